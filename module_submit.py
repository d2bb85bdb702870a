"""Gated inference to an overlap-free Kaggle submission; threshold tuning, validation, local score.

The pipeline of ``predict``, image by image (the inference itself is ``module_inference``'s)::

    image --classifier--> p_ship --(p_ship < SUBMIT.CLASSIFIER_THRESHOLD)--> one blank row
                                 \\--(else)--> detector (batched, optional flip TTA)
                                     --> module_inference.resolve_overlaps(score threshold,
                                         min area; each pixel to the highest-scoring mask)
                                     --> module_rle.rle_encode --> one row per ship

The library the notebook calls (the command lines are thin wrappers over it):

    chosen = tune_thresholds(cfg, val_dicts)        # -> runs/<run>/submission/thresholds.yaml
    paths = predict_submission(cfg)                 # -> runs/<run>/submission/submission.csv
    violations = validate_submission(paths["submission"], ids_csv)   # [] when valid
    result = score_report(paths["submission"], truth_csv)            # the local F2

Command line (every subcommand with --config takes trailing ``KEY VALUE`` / ``KEY=VALUE`` overrides):

    python module_submit.py predict --config configs/demo.yaml
    python module_submit.py predict --config C --images DIR --ids sample_submission_v2.csv \\
        --out part0.csv --shard 0/3                     # shards 0/3, 1/3, 2/3 on three machines
    python module_submit.py merge --shards part0.csv part1.csv part2.csv \\
        --ids sample_submission_v2.csv --out submission.csv
    python module_submit.py tune --config C             # -> runs/<run>/submission/thresholds.yaml
    python module_submit.py validate --submission S --ids sample_submission_v2.csv
    python module_submit.py score --submission S --truth T [--json]
    python module_submit.py visualize --submission S --truth T --images DIR --out overlays.png

Thresholds: ``predict`` uses runs/<run>/submission/thresholds.yaml (written by ``tune``) when it
exists, else the SUBMIT.* config values; a SUBMIT.* key given on the command line wins over both
(``module_inference.get_thresholds``). It logs which source each threshold came from.

Masks everywhere in this module are ``(N, H, W)`` bool arrays in image pixel order (row, column);
the Kaggle RLE strings are column-major and 1-indexed (``module_rle`` is their one home).

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import pickle
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

import module_config
import module_metric
import module_plots
from module_config import get_cfg_from_args, get_plot_path, get_submission_path
from module_files import (TooManyFailures, atomic_path, check_failure_limit, get_failure_report_path, list_images,
                          read_image, read_image_ids, read_segmentation_csv, write_failure_report)
from module_inference import (DetectFn, PShipFn, Thresholds, apply_thresholds, build_detect_fn, build_p_ship_fn,
                              get_default_weights_path, get_thresholds, resolve_overlaps)
from module_rle import KAGGLE_SHAPE, coco_to_masks, find_overlapping_masks, masks_to_coco, parse_rle, rle_encode

logger = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ("ImageId", "EncodedPixels")

# A callable reading one image file -> (H, W, 3) uint8 RGB; raises on a corrupt file.
LoadImageFn = Callable[[Path], np.ndarray]


# ============================================================================ predict: core
def instances_to_rles(masks: np.ndarray, scores: np.ndarray, thresholds: Thresholds) -> list[str]:
    """Detections of one image -> its Kaggle RLE strings, overlap-free, by score descending.

    ``masks``: ``(N, H, W)`` bool (row, column order); ``scores``: ``(N,)``. The score threshold,
    pixel ownership (highest score wins) and minimum area are module_inference.apply_thresholds'.
    Returns ``[]`` when nothing survives.
    """
    masks = np.asarray(masks, dtype=bool)
    scores = np.asarray(scores, dtype=np.float32)
    if masks.ndim != 3 or len(masks) != len(scores):
        raise ValueError(f"expected masks (N, H, W) and scores (N,), got {masks.shape} and {scores.shape}")
    if len(masks) == 0:
        return []
    kept, _ = apply_thresholds({"masks": masks, "scores": scores}, thresholds)
    return [rle for rle in (rle_encode(mask) for mask in kept) if rle]


@dataclasses.dataclass
class PredictResult:
    """What ``predict_rows`` produced."""

    rows: pd.DataFrame  # ImageId, EncodedPixels ("" for no ship); every ImageId, in input order
    p_ship: pd.Series  # ImageId -> classifier probability (NaN: not classified)
    failures: pd.DataFrame  # ImageId, reason: images that could not be read (they got a blank row)
    n_detected: int  # images the detector ran on


def predict_rows(image_ids: Sequence[str], image_dir: str | Path, detect_fn: DetectFn,
                 thresholds: Thresholds, p_ship_fn: PShipFn | None = None, batch_size: int = 8,
                 chunk_size: int = 256, load_image: LoadImageFn = read_image,
                 progress: bool = True) -> PredictResult:
    """Gate, detect, resolve overlaps and encode every image of ``image_ids`` (files in ``image_dir``).

    Per chunk of ``chunk_size`` images: ``p_ship_fn`` scores them (skipped when it is None or
    ``thresholds.classifier <= 0``: ungated); an image with ``p_ship < thresholds.classifier``
    gets a blank row and never reaches the detector; the others are decoded with ``load_image``
    and go to ``detect_fn`` in batches of ``batch_size``. An image that cannot be read (NaN from
    ``p_ship_fn``, or ``load_image`` raising) is logged, gets a blank row and is listed in
    ``failures``. Every ImageId gets at least one row, in the order of ``image_ids``.
    """
    image_dir = Path(image_dir)
    image_ids = list(image_ids)
    if len(set(image_ids)) != len(image_ids):
        raise ValueError("image_ids has duplicates")
    gated = p_ship_fn is not None and thresholds.classifier > 0
    rles: dict[str, list[str]] = {}
    p_ship = pd.Series(np.nan, index=pd.Index(image_ids, name="ImageId"), name="p_ship")
    failures: list[dict] = []
    n_detected = 0

    def fail(image_id: str, reason: str) -> None:
        logger.warning("%s: blank row, image unreadable: %s", image_id, reason)
        failures.append({"ImageId": image_id, "reason": reason})

    bar = tqdm(total=len(image_ids), unit="img", desc="predict", disable=not progress, smoothing=0.05)
    for start in range(0, len(image_ids), chunk_size):
        chunk = image_ids[start:start + chunk_size]
        to_detect = chunk
        if gated:
            probabilities = np.asarray(p_ship_fn([image_dir / i for i in chunk]), dtype=np.float64)
            if probabilities.shape != (len(chunk),):
                raise ValueError(f"p_ship_fn returned shape {probabilities.shape} for {len(chunk)} images")
            p_ship.loc[chunk] = probabilities
            to_detect = [i for i, p in zip(chunk, probabilities) if p >= thresholds.classifier]
            for image_id in (i for i, p in zip(chunk, probabilities) if np.isnan(p)):
                try:  # the classifier could not read it: find out why
                    load_image(image_dir / image_id)
                    fail(image_id, "the classifier could not read it")
                except Exception as exc:
                    fail(image_id, str(exc))
        for batch_start in range(0, len(to_detect), batch_size):
            batch, images = [], []
            for image_id in to_detect[batch_start:batch_start + batch_size]:
                try:
                    images.append(load_image(image_dir / image_id))
                    batch.append(image_id)
                except Exception as exc:
                    fail(image_id, str(exc))
            if not batch:
                continue
            outputs = detect_fn(images)
            if len(outputs) != len(batch):
                raise ValueError(f"detect_fn returned {len(outputs)} outputs for {len(batch)} images")
            for image_id, output in zip(batch, outputs):
                rles[image_id] = instances_to_rles(output["masks"], output["scores"], thresholds)
            n_detected += len(batch)
            bar.set_postfix(detected=n_detected, failed=len(failures), refresh=False)
        bar.update(len(chunk))
    bar.close()
    records = [(image_id, rle) for image_id in image_ids for rle in (rles.get(image_id) or [""])]
    rows = pd.DataFrame(records, columns=list(SUBMISSION_COLUMNS))
    return PredictResult(rows, p_ship, pd.DataFrame(failures, columns=["ImageId", "reason"]), n_detected)


def write_submission(rows: pd.DataFrame, path: str | Path) -> Path:
    """Write ``ImageId,EncodedPixels`` rows to ``path`` atomically (blank field for no ship)."""
    path = Path(path)
    missing = [c for c in SUBMISSION_COLUMNS if c not in rows.columns]
    if missing:
        raise ValueError(f"rows lack columns {missing}")
    with atomic_path(path) as tmp:
        rows.loc[:, list(SUBMISSION_COLUMNS)].fillna("").to_csv(tmp, index=False)
    return path


# ============================================================================ shards
def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``, with ``0 <= i < n`` (shards are numbered from 0)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/3") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need n >= 1 and 0 <= i < n (shards are numbered from 0)")
    return index, count


def select_shard(image_ids: Sequence[str], index: int, count: int) -> list[str]:
    """Shard ``index`` of ``count``: every ``count``-th id from position ``index`` (balanced)."""
    return list(image_ids)[index::count]


def read_submission(path: str | Path, what: str = "submission") -> pd.DataFrame:
    """A submission CSV with exactly the header ``ImageId,EncodedPixels`` (``module_files``' reader;
    blanks stay ""); columns ImageId, EncodedPixels."""
    return read_segmentation_csv(path, what, allow_no_rows=True)[list(SUBMISSION_COLUMNS)]


def merge_shards(shard_paths: Sequence[str | Path], image_ids: Sequence[str],
                 shape: tuple[int, int] = KAGGLE_SHAPE) -> pd.DataFrame:
    """Concatenate shard submissions into one, ordered as ``image_ids``; every shard is validated.

    Each shard gets :func:`validate_submission`'s checks against its own ImageIds (header, fields,
    RLE, blank rows, overlaps); the first violation raises ``ValueError`` naming the shard and the
    line. Then: an id missing from every shard, in two shards, or not in ``image_ids`` raises
    ``ValueError`` naming the shard and ImageIds.
    """
    frames, owner = [], {}
    for path in shard_paths:
        frame = read_submission(path, "shard")
        violations = validate_submission(path, list(dict.fromkeys(frame["ImageId"])), shape)
        if violations:
            raise ValueError(f"shard {path}: {len(violations)} violation(s), first: {violations[0]} "
                             f"(check it with `module_submit.py validate`)")
        for image_id in frame["ImageId"].unique():
            if image_id in owner:
                raise ValueError(f"ImageId {image_id} is in both {owner[image_id]} and {path}")
            owner[image_id] = path
        frames.append(frame)
    merged = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(SUBMISSION_COLUMNS))
    wanted = set(image_ids)
    unknown = [i for i in owner if i not in wanted]
    if unknown:
        raise ValueError(f"{len(unknown)} ImageIds not in the id list, e.g. {unknown[:5]} "
                         f"(from {owner[unknown[0]]})")
    missing = [i for i in image_ids if i not in owner]
    if missing:
        raise ValueError(f"{len(missing)} of {len(image_ids)} ImageIds are in no shard, e.g. {missing[:5]}; "
                         f"is a shard missing? got {len(shard_paths)} shard files")
    order = {image_id: k for k, image_id in enumerate(image_ids)}
    merged["_order"] = merged["ImageId"].map(order)
    return merged.sort_values("_order", kind="stable").drop(columns="_order").reset_index(drop=True)


# ============================================================================ validate
@dataclasses.dataclass(frozen=True)
class Violation:
    """One problem of a submission; ``line`` is the 1-based line in the file (header = 1), 0: file-level."""

    line: int
    image_id: str
    message: str
    kind: str  # header, fields, unknown id, missing id, rle, blank rows, overlap

    def __str__(self) -> str:
        where = f"line {self.line}" if self.line else "file"
        return f"{where}: {self.image_id + ': ' if self.image_id else ''}{self.message}"


def validate_submission(submission: str | Path, ids: str | Path | Sequence[str],
                        shape: tuple[int, int] = KAGGLE_SHAPE) -> list[Violation]:
    """Every problem of a submission file, in file order; ``[]`` when it is valid.

    Checks: the header is exactly ``ImageId,EncodedPixels``; every id of ``ids`` (a CSV with an
    ImageId column, or a list) is present and no other id appears; each RLE is valid for
    ``shape`` (tokens are integers in pairs, starts >= 1, lengths >= 1, runs sorted, not
    overlapping, inside H*W; module_rle.parse_rle is the judge); an image with a
    blank row has no mask rows and at most one blank row; no two masks of one image overlap
    (module_rle.find_overlapping_masks). A missing file raises ``FileNotFoundError``.
    """
    submission = Path(submission)
    violations: list[Violation] = []
    if not submission.is_file():
        raise FileNotFoundError(f"submission {submission}: file not found")
    with open(submission, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        records = list(reader)
    if header is None:
        return [Violation(0, "", "file is empty (expected the header ImageId,EncodedPixels)", "header")]
    if tuple(header) != SUBMISSION_COLUMNS:
        violations.append(Violation(1, "", f"header is {','.join(header)!r}, expected 'ImageId,EncodedPixels'",
                                    "header"))
    id_list = read_image_ids(ids) if isinstance(ids, (str, Path)) else list(ids)
    wanted = set(id_list)
    runs_by_image: dict[str, list[tuple[int, np.ndarray, np.ndarray]]] = {}
    blank_lines: dict[str, list[int]] = {}
    for k, record in enumerate(records):
        line = k + 2
        if len(record) != 2:
            violations.append(Violation(line, record[0] if record else "", f"expected 2 fields, got {len(record)}",
                                        "fields"))
            if record and record[0] in wanted:
                runs_by_image.setdefault(record[0], [])  # present, if malformed: not also "missing"
            continue
        image_id, rle = record[0], record[1].strip()
        if image_id not in wanted:
            violations.append(Violation(line, image_id, "ImageId is not in the id list", "unknown id"))
        if not rle:
            blank_lines.setdefault(image_id, []).append(line)
            runs_by_image.setdefault(image_id, [])
            continue
        try:
            starts, lengths = parse_rle(rle, shape)
        except ValueError as exc:
            violations.append(Violation(line, image_id, f"invalid RLE: {exc}", "rle"))
            runs_by_image.setdefault(image_id, [])
            continue
        if len(starts) == 0:
            blank_lines.setdefault(image_id, []).append(line)
        runs_by_image.setdefault(image_id, []).append((line, starts, lengths))
    for image_id, lines in blank_lines.items():
        if len(lines) > 1:
            violations.append(Violation(lines[1], image_id, f"{len(lines)} blank rows (lines {lines}); expected one",
                                        "blank rows"))
        if runs_by_image[image_id]:
            violations.append(Violation(lines[0], image_id, "blank row although the image has mask rows "
                                        f"(lines {[r[0] for r in runs_by_image[image_id]]})", "blank rows"))
    for image_id, masks in runs_by_image.items():
        pairs = find_overlapping_masks([(s, n) for _, s, n in masks], shape)
        violations.extend(Violation(masks[b][0], image_id, f"mask overlaps the mask on line {masks[a][0]} ({pixels} px)",
                                    "overlap") for a, b, pixels in pairs)
    missing = [i for i in id_list if i not in runs_by_image]
    violations.extend(Violation(0, i, "ImageId missing (every id needs a row; blank for no ship)", "missing id")
                      for i in missing)
    return sorted(violations, key=lambda v: (v.line == 0, v.line))


# ============================================================================ score
def score_report(submission: str | Path | pd.DataFrame, truth: str | Path | pd.DataFrame,
                 shape: tuple[int, int] = KAGGLE_SHAPE) -> module_metric.ScoreResult:
    """The local competition score of a submission (``module_metric.score_submission``).

    A submission file is first checked by :func:`validate_submission` against the truth's
    ImageIds, so scoring rejects what ``validate`` rejects (an extra column, duplicate blank rows,
    a blank row beside masks...): ``ValueError`` naming the file, the line and the problem.
    ``module_metric.format_score_report`` (per-threshold counts, ship-free against ship images,
    recall per ship size; last line ``F2 <value>``) and ``module_metric.score_to_json`` present it.
    """
    if not isinstance(submission, pd.DataFrame):
        ids = read_segmentation_csv(truth, "truth")["ImageId"] if not isinstance(truth, pd.DataFrame) \
            else truth["ImageId"]
        violations = validate_submission(submission, list(dict.fromkeys(ids)), shape)
        if violations:
            listing = "; ".join(str(v) for v in violations[:3])
            raise ValueError(f"{submission}: not a valid submission ({len(violations)} violation(s): {listing}"
                             f"{' ...' if len(violations) > 3 else ''}); `module_submit.py validate` lists them all")
    return module_metric.score_submission(submission, truth, shape=shape)


# ============================================================================ tune
@dataclasses.dataclass
class TuneImage:
    """The cached model outputs and truth of one validation image; masks as COCO RLE of (H, W)."""

    image_id: str
    file_name: str
    p_ship: float  # classifier probability (NaN: unreadable; then gated out at every threshold)
    pred_rles: list  # one COCO RLE dict per detection
    scores: np.ndarray  # (N,) float32, the detections' scores
    true_rles: list  # one COCO RLE dict per true ship
    shape: tuple[int, int]  # (H, W)

    @classmethod
    def from_masks(cls, image_id: str, file_name: str, p_ship: float, pred_masks: np.ndarray,
                   scores: np.ndarray, true_masks: np.ndarray) -> "TuneImage":
        """From ``(N, H, W)`` predicted and ``(M, H, W)`` true bool masks of one image."""
        shape = tuple(int(v) for v in (pred_masks if len(pred_masks) else true_masks).shape[1:])
        return cls(image_id, file_name, float(p_ship), masks_to_coco(np.asarray(pred_masks, bool)),
                   np.asarray(scores, dtype=np.float32), masks_to_coco(np.asarray(true_masks, bool)), shape)

    def decode(self, crop: bool = True) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
        """``(pred (N, h, w), true (M, h, w), (row, col) offset)`` bool masks.

        With ``crop``, both are cut to the bounding box of all of them: that changes neither IoU,
        nor pixel ownership, nor areas, and makes the sweep work on small arrays.
        """
        pred, true = coco_to_masks(self.pred_rles, self.shape), coco_to_masks(self.true_rles, self.shape)
        return crop_to_common_frame(pred, true) if crop else (pred, true, (0, 0))


def crop_to_common_frame(pred_masks: np.ndarray, true_masks: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Crop ``(N, H, W)`` and ``(M, H, W)`` bool masks to the bounding box of all of them.

    Returns ``(pred, true, (row, column) offset)``; an image without any mask gets a 0x0 frame.
    """
    union = np.zeros(pred_masks.shape[1:] if len(pred_masks) else true_masks.shape[1:], dtype=bool)
    for masks in (pred_masks, true_masks):
        if len(masks):
            union |= masks.any(axis=0)
    rows, cols = np.nonzero(union.any(axis=1))[0], np.nonzero(union.any(axis=0))[0]
    if len(rows) == 0:
        return pred_masks[:, :0, :0], true_masks[:, :0, :0], (0, 0)
    y0, y1, x0, x1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    return pred_masks[:, y0:y1, x0:x1], true_masks[:, y0:y1, x0:x1], (int(y0), int(x0))


def collect_tune_cache(dicts: Sequence[dict], detect_fn: DetectFn, p_ship_fn: PShipFn | None = None,
                       batch_size: int = 8, min_score: float = 0.0, load_image: LoadImageFn = read_image,
                       progress: bool = True) -> list[TuneImage]:
    """Run the classifier and the (ungated) detector once over validation dataset dicts.

    Every image goes through the detector, so that any classifier threshold can be evaluated
    afterwards without a model; detections below ``min_score`` (the lowest score threshold of
    the grid) are not kept. ``p_ship_fn`` None: p_ship is 1 for every image. Truth comes from
    the dicts' ``annotations`` (COCO RLE ``segmentation``).
    """
    paths = [Path(d["file_name"]) for d in dicts]
    p_ship = (np.asarray(p_ship_fn(paths), dtype=np.float64) if p_ship_fn is not None and paths
              else np.ones(len(paths)))
    cache: list[TuneImage] = []
    bar = tqdm(total=len(dicts), unit="img", desc="tune: detect", disable=not progress)
    for start in range(0, len(dicts), batch_size):
        batch = list(dicts[start:start + batch_size])
        outputs = detect_fn([load_image(Path(d["file_name"])) for d in batch])
        for k, (record, output) in enumerate(zip(batch, outputs)):
            scores = np.asarray(output["scores"], dtype=np.float32)
            keep = scores >= min_score
            cache.append(TuneImage(str(record["image_id"]), str(record["file_name"]), float(p_ship[start + k]),
                                   masks_to_coco(np.asarray(output["masks"], dtype=bool)[keep]), scores[keep],
                                   [a["segmentation"] for a in record.get("annotations", [])],
                                   (int(record["height"]), int(record["width"]))))
        bar.update(len(batch))
    bar.close()
    return cache


def _image_f2(true_masks: np.ndarray, pred_masks: np.ndarray) -> float:
    if len(pred_masks) == 0:
        return 1.0 if len(true_masks) == 0 else 0.0
    if len(true_masks) == 0:
        return 0.0
    return float(module_metric.f2_masks(true_masks, pred_masks))


def sweep_thresholds(cache: Sequence[TuneImage], classifier_thresholds: Sequence[float],
                     score_thresholds: Sequence[float], min_areas: Sequence[int],
                     progress: bool = True) -> pd.DataFrame:
    """Mean F2 over the cached images for every (classifier, score, min area) combination.

    An image with ``p_ship < classifier threshold`` gets no prediction (F2 1 if ship-free, else
    0); otherwise its cached detections go through resolve_overlaps(score, min area) and the
    metric. Each image is decoded once; the detector-side F2 of each (score, min area) is reused
    for every classifier threshold. Returns a DataFrame [classifier_threshold, score_threshold,
    min_area, f2] in grid order (classifier, then score, then min area).
    """
    if not len(cache):
        raise ValueError("no validation images to tune on")
    p_ship = np.array([c.p_ship for c in cache])
    f2_empty = np.array([1.0 if len(c.true_rles) == 0 else 0.0 for c in cache])
    combos = [(float(s), int(a)) for s in score_thresholds for a in min_areas]
    detector_f2 = np.repeat(f2_empty[:, None], len(combos), axis=1)  # (images, combos)
    for k, image in enumerate(tqdm(cache, desc="tune: sweep", unit="img", disable=not progress)):
        if not len(image.pred_rles):
            continue
        pred, true, _ = image.decode()
        for j, (score, min_area) in enumerate(combos):
            kept, _ = resolve_overlaps(pred, image.scores, score_threshold=score, min_area=min_area)
            detector_f2[k, j] = _image_f2(true, kept)
    rows = []
    for c in classifier_thresholds:
        passed = p_ship >= c  # NaN (unreadable) never passes
        for j, (score, min_area) in enumerate(combos):
            f2 = np.where(passed, detector_f2[:, j], f2_empty)
            rows.append((float(c), score, min_area, float(f2.mean())))
    return pd.DataFrame(rows, columns=["classifier_threshold", "score_threshold", "min_area", "f2"])


def _cache_fingerprint(*paths: Path | None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path is not None:
            stat = Path(path).stat()
            digest.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def choose_thresholds(grid: pd.DataFrame) -> tuple[Thresholds, float]:
    """The setting with the highest F2; ties go to the first in grid order. -> (Thresholds, f2)."""
    best = grid.loc[grid["f2"].idxmax()]
    return Thresholds(float(best["classifier_threshold"]), float(best["score_threshold"]),
                      int(best["min_area"])), float(best["f2"])


def write_thresholds(path: str | Path, thresholds: Thresholds, f2: float, extra: dict | None = None) -> Path:
    """Write the tuned thresholds (and the local F2 they reached) to ``path`` atomically."""
    path = Path(path)
    body = {"thresholds": thresholds.as_config(), "validation_f2": float(f2), **(extra or {})}
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


def tune(cache: Sequence[TuneImage], cfg, progress: bool = True) -> tuple[Thresholds, float, pd.DataFrame]:
    """Sweep the SUBMIT.TUNE_* grids on ``cache``; write thresholds.yaml, the grid CSV and the plots
    into the run folder. Returns ``(chosen thresholds, their F2, grid)``.
    """
    grid = sweep_thresholds(cache, cfg.SUBMIT.TUNE_CLASSIFIER_THRESHOLDS, cfg.SUBMIT.TUNE_SCORE_THRESHOLDS,
                            cfg.SUBMIT.TUNE_MIN_AREAS, progress=progress)
    chosen, f2 = choose_thresholds(grid)
    with atomic_path(get_submission_path(cfg, "tune_grid")) as tmp:
        grid.to_csv(tmp, index=False)
    config_f2 = grid.loc[(grid["classifier_threshold"] == cfg.SUBMIT.CLASSIFIER_THRESHOLD)
                         & (grid["score_threshold"] == cfg.SUBMIT.SCORE_THRESHOLD)
                         & (grid["min_area"] == cfg.SUBMIT.MIN_AREA), "f2"]
    ungated = grid.loc[grid["classifier_threshold"] <= 0, "f2"]  # threshold 0: the detector alone, no gate
    detector_alone_f2 = float(ungated.max()) if len(ungated) else None
    all_empty_f2 = float(np.mean([len(c.true_rles) == 0 for c in cache]))
    write_thresholds(get_submission_path(cfg, "thresholds"), chosen, f2, {
        "n_validation_images": len(cache),
        "config_thresholds_f2": float(config_f2.iloc[0]) if len(config_f2) else None,
        "all_empty_f2": all_empty_f2,
        "detector_alone_f2": detector_alone_f2,
    })
    logger.info("detector alone (classifier threshold 0): best F2 %s; predicting no ship anywhere: F2 %.4f",
                "not in the grid" if detector_alone_f2 is None else f"{detector_alone_f2:.4f}", all_empty_f2)
    module_plots.save_figure(module_plots.plot_tune_grid(grid, chosen.classifier, chosen.score, chosen.min_area),
                             get_plot_path(cfg, "tune_f2"), dpi=100)
    module_plots.save_figure(plot_tune_overlays(cache, chosen), get_plot_path(cfg, "val_overlays"), dpi=80)
    return chosen, f2, grid


def _kept_masks(image: TuneImage, thresholds: Thresholds) -> np.ndarray:
    """The masks a submission would keep for a cached image at ``thresholds`` (gate included)."""
    pred, _, _ = image.decode(crop=False)
    if not image.p_ship >= thresholds.classifier or not len(pred):
        return pred[:0]
    return resolve_overlaps(pred, image.scores, score_threshold=thresholds.score, min_area=thresholds.min_area)[0]


def plot_tune_overlays(cache: Sequence[TuneImage], thresholds: Thresholds, count: int = 8,
                       load_image: LoadImageFn = read_image):
    """GT/prediction overlays of a sample of validation images at ``thresholds`` (gate included)."""
    # Sampling needs the number of kept predictions of ship-free images: count those only.
    n_kept = [len(_kept_masks(c, thresholds)) if not c.true_rles and c.pred_rles else 0 for c in cache]
    chosen = module_plots.pick_overlay_sample([len(c.true_rles) > 0 for c in cache], n_kept, count)
    images, trues, preds, titles = [], [], [], []
    for k in chosen:
        image = cache[k]
        true, pred = coco_to_masks(image.true_rles, image.shape), _kept_masks(image, thresholds)
        images.append(load_image(Path(image.file_name)))
        trues.append(true)
        preds.append(pred)
        titles.append(f"{image.image_id} p_ship {image.p_ship:.2f}\n"
                      f"F2 {_image_f2(true, pred):.2f} ({len(true)} true, {len(pred)} pred)")
    return module_plots.plot_overlays(images, trues, preds, titles)


@dataclasses.dataclass
class TuneResult:
    """What :func:`tune_thresholds` chose and where it wrote it."""

    thresholds: Thresholds
    f2: float  # validation F2 at the chosen thresholds
    grid: pd.DataFrame  # every setting tried: classifier_threshold, score_threshold, min_area, f2
    paths: dict  # thresholds (yaml), grid (csv), cache (pkl), plots


def tune_thresholds(cfg, val_dicts: Sequence[dict] | None = None, classifier: str | Path | None = None,
                    weights: str | Path | None = None, reuse_cache: bool = True, progress: bool = True) -> TuneResult:
    """Choose the three thresholds for the local F2 on the validation split; write thresholds.yaml.

    ``val_dicts`` default to the run's validation split (``module_preprocessing.get_train_val_dicts``).
    Both models run once over the split (ungated, every detection above the grid's lowest score
    kept) into ``tune_cache.pkl``, which is reused while the models and images are the same
    (``reuse_cache``); then the ``SUBMIT.TUNE_*`` grids are swept (:func:`tune`). Without a
    classifier export the tuning is ungated (p_ship = 1).
    """
    if val_dicts is None:
        import module_preprocessing

        _, val_dicts = module_preprocessing.get_train_val_dicts(cfg)
    classifier = Path(classifier) if classifier else module_config.get_classifier_path(cfg)
    weights = Path(weights) if weights else get_default_weights_path(cfg)
    use_classifier = classifier.is_file()
    if not use_classifier:
        logger.warning("no classifier at %s: tuning ungated (p_ship = 1 for every image)", classifier)
    fingerprint = _cache_fingerprint(weights, classifier if use_classifier else None) + str(
        [d["image_id"] for d in val_dicts]) + str(min(cfg.SUBMIT.TUNE_SCORE_THRESHOLDS)) + str(
        [cfg.SUBMIT.TTA, cfg.CLASSIFIER.TTA, cfg.CLASSIFIER.PRECISION])
    cache_path = get_submission_path(cfg, "tune_cache")
    cache = None
    if reuse_cache and cache_path.is_file():
        stored = pickle.loads(cache_path.read_bytes())
        if stored.get("fingerprint") == fingerprint:
            cache = stored["images"]
            logger.info("tuning: reused the model outputs cached in %s (same models and images)", cache_path)
        else:
            logger.info("tuning: %s was made with other models or images: recomputing", cache_path)
    if cache is None:
        p_ship_fn = build_p_ship_fn(cfg, classifier) if use_classifier else None
        cache = collect_tune_cache(val_dicts, build_detect_fn(cfg, weights), p_ship_fn,
                                   batch_size=cfg.SUBMIT.BATCH_SIZE, min_score=min(cfg.SUBMIT.TUNE_SCORE_THRESHOLDS),
                                   progress=progress)
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(pickle.dumps({"fingerprint": fingerprint, "images": cache}))
    chosen, f2, grid = tune(cache, cfg, progress=progress)
    paths = {"thresholds": get_submission_path(cfg, "thresholds"), "grid": get_submission_path(cfg, "tune_grid"),
             "cache": cache_path, "plot": get_plot_path(cfg, "tune_f2"), "overlays": get_plot_path(cfg, "val_overlays")}
    logger.info("chosen on %d validation images: %s -> F2 %.4f; written to %s", len(cache), chosen.as_config(), f2,
                paths["thresholds"])
    return TuneResult(chosen, f2, grid, paths)


# ============================================================================ predict: the run's submission
def predict_submission(cfg, images: str | Path | None = None, ids: str | Path | Sequence[str] | None = None,
                       out: str | Path | None = None, shard: str | None = None,
                       thresholds_file: str | Path | None = None, overridden: Sequence[str] = (),
                       classifier: str | Path | None = None, weights: str | Path | None = None,
                       max_failed: float | None = None, progress: bool = True) -> dict[str, Path]:
    """Predict the run's submission: every ImageId gets at least one row; written atomically.

    ``images``: the test folder (default ``DATA.TEST_IMAGES``); ``ids``: a CSV or list of ImageIds
    (default ``DATA.SAMPLE_SUBMISSION`` when ``images`` is not given, else every image file in
    it); ``out`` default ``runs/<run>/submission/submission.csv``; ``shard`` ``"i/n"`` predicts
    every n-th id from i (merge the parts with :func:`merge_shards`). Thresholds come from
    :func:`module_inference.get_thresholds` (``overridden``: the ``SUBMIT.*`` keys given on the
    command line win). Beside the submission go ``<stem>_p_ship.csv`` and ``<stem>_failures.csv``
    (unreadable images, which got a blank row). More failures than ``max_failed`` (default
    ``SUBMIT.MAX_FAILED``: a share if < 1, else a count) raise ``module_files.TooManyFailures``
    after everything is written. Returns ``{"submission", "failures", "p_ship"}`` paths.
    """
    image_dir = Path(images) if images else module_config.get_input_path(cfg, cfg.DATA.TEST_IMAGES)
    sample = module_config.get_input_path(cfg, cfg.DATA.SAMPLE_SUBMISSION)
    if ids is not None:
        image_ids = read_image_ids(ids) if isinstance(ids, (str, Path)) else list(ids)
    elif not images and sample.is_file():
        image_ids = read_image_ids(sample, "sample submission")
    else:
        image_ids = [p.name for p in list_images(image_dir)]
    out = Path(out) if out else get_submission_path(cfg)
    if shard:
        index, count = parse_shard(shard)
        image_ids = select_shard(image_ids, index, count)
        if out == get_submission_path(cfg):
            out = out.with_name(f"submission_shard{index}of{count}.csv")
        logger.info("shard %d/%d: %d images", index, count, len(image_ids))
    thresholds, sources = get_thresholds(cfg, thresholds_file, overridden=overridden)
    for key, source in sources.items():
        logger.info("SUBMIT.%s = %s (from %s)", key, thresholds.as_config()[key], source)
    p_ship_fn = build_p_ship_fn(cfg, classifier) if thresholds.classifier > 0 else None
    if p_ship_fn is None:
        logger.info("classifier threshold <= 0: ungated, the detector sees every image")
    detect_fn = build_detect_fn(cfg, weights)
    result = predict_rows(image_ids, image_dir, detect_fn, thresholds, p_ship_fn=p_ship_fn,
                          batch_size=cfg.SUBMIT.BATCH_SIZE, chunk_size=4 * cfg.CLASSIFIER.BATCH_SIZE,
                          load_image=lambda path: read_image(path, cfg.DATA.IMAGE_SIZE), progress=progress)
    write_submission(result.rows, out)
    failures_path = write_failure_report(result.failures, out)
    p_ship_path = out.with_name(f"{out.stem}_p_ship.csv")
    with atomic_path(p_ship_path) as tmp:
        result.p_ship.reset_index().to_csv(tmp, index=False)
    n_ship_images = int((result.rows["EncodedPixels"] != "").groupby(result.rows["ImageId"]).any().sum())
    logger.info("wrote %s: %d images, %d rows; the detector ran on %d; %d images with ships; %d unreadable (%s)",
                out, len(image_ids), len(result.rows), result.n_detected, n_ship_images, len(result.failures),
                failures_path)
    check_failure_limit(len(result.failures), len(image_ids),
                        cfg.SUBMIT.MAX_FAILED if max_failed is None else max_failed, failures_path)
    return {"submission": out, "failures": failures_path, "p_ship": p_ship_path}


# ============================================================================ command line
def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--classifier", default=None, help="exported classifier (default runs/<run>/classifier/export.pkl)")
    parser.add_argument("--weights", default=None, help="detector weights (default runs/<run>/detector/model_best.pth)")
    module_config.add_config_args(parser)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    predict = commands.add_parser("predict", help="gated inference -> submission CSV")
    predict.add_argument("--images", default=None, help="folder of test images (default: DATA.TEST_IMAGES)")
    predict.add_argument("--ids", default=None, help="CSV with the ImageIds to predict (default: DATA.SAMPLE_SUBMISSION "
                         "when --images is not given, else every image file in --images)")
    predict.add_argument("--out", default=None, help="submission CSV (default runs/<run>/submission/submission.csv)")
    predict.add_argument("--shard", default=None, help="i/n: predict only shard i (from 0) of n; merge with `merge`")
    predict.add_argument("--thresholds", default=None, help="thresholds YAML (default runs/<run>/submission/thresholds.yaml "
                         "when present, else the SUBMIT.* config)")
    predict.add_argument("--max-failed", type=float, default=None,
                         help="exit 1 when more images cannot be read (a share if < 1, else a count; default "
                              "SUBMIT.MAX_FAILED); the submission and the failure report are written either way")
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_model_args(predict)

    merge = commands.add_parser("merge", help="shard submissions -> one submission, each shard validated")
    merge.add_argument("--shards", nargs="+", required=True, help="shard CSVs written by predict --shard")
    merge.add_argument("--ids", required=True, help="CSV with every ImageId (sample_submission_v2.csv)")
    merge.add_argument("--out", required=True, help="merged submission CSV")
    merge.add_argument("--image-size", type=int, default=KAGGLE_SHAPE[0], help="image side in px (Kaggle: 768)")

    tune_parser = commands.add_parser("tune", help="grid-search the thresholds on the validation split")
    tune_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune_parser.add_argument("--fresh", action="store_true",
                             help="run the models again instead of reusing their cached outputs (same models)")
    _add_model_args(tune_parser)

    validate = commands.add_parser("validate", help="check a submission file; exit 0 valid, 1 invalid")
    validate.add_argument("--submission", required=True)
    validate.add_argument("--ids", required=True, help="CSV with every ImageId (sample_submission_v2.csv)")
    validate.add_argument("--image-size", type=int, default=KAGGLE_SHAPE[0], help="image side in px (Kaggle: 768)")

    score = commands.add_parser("score", help="local competition F2 of a submission against a truth CSV")
    score.add_argument("--submission", required=True)
    score.add_argument("--truth", required=True, help="ground truth CSV, Kaggle format")
    score.add_argument("--json", action="store_true", help="print one JSON object (f2, breakdowns, per-image scores)")
    score.add_argument("--per-image-csv", default=None, help="also write the per-image scores to this CSV")
    score.add_argument("--image-size", type=int, default=KAGGLE_SHAPE[0], help="image side in px (Kaggle: 768)")

    visualize = commands.add_parser("visualize", help="ground-truth/prediction overlays of a submission")
    visualize.add_argument("--submission", required=True)
    visualize.add_argument("--truth", required=True)
    visualize.add_argument("--images", required=True, help="folder of the submission's images")
    visualize.add_argument("--out", required=True, help="PNG to write")
    visualize.add_argument("--count", type=int, default=8, help="number of images")
    return parser


def main(args: argparse.Namespace) -> int:
    """Run one subcommand; returns the exit status (0 success, 1 invalid / too many failures)."""
    module_config.setup_logging()
    commands = {"predict": _main_predict, "merge": _main_merge, "tune": _main_tune,
                "validate": _main_validate, "score": _main_score, "visualize": _main_visualize}
    return commands[args.command](args)


def _main_predict(args: argparse.Namespace) -> int:
    cfg = get_cfg_from_args(args)
    import module_synthetic

    module_synthetic.prepare_synthetic_input(cfg)
    try:
        predict_submission(cfg, images=args.images, ids=args.ids, out=args.out, shard=args.shard,
                           thresholds_file=args.thresholds, overridden=args.opts, classifier=args.classifier,
                           weights=args.weights, max_failed=args.max_failed, progress=not args.no_progress)
    except TooManyFailures as exc:
        logger.error("%s", exc)
        return 1
    return 0


def _main_merge(args: argparse.Namespace) -> int:
    image_ids = read_image_ids(args.ids)
    merged = merge_shards(args.shards, image_ids, (args.image_size, args.image_size))
    write_submission(merged, args.out)
    failure_reports = [get_failure_report_path(p) for p in args.shards if get_failure_report_path(p).is_file()]
    if failure_reports:
        failures = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in failure_reports],
                             ignore_index=True)
        write_failure_report(failures, args.out)
        logger.info("%d unreadable images across the shards (%s)", len(failures), get_failure_report_path(args.out))
    logger.info("merged %d shards into %s: %d images, %d rows", len(args.shards), args.out, len(image_ids), len(merged))
    return 0


def _main_tune(args: argparse.Namespace) -> int:
    cfg = get_cfg_from_args(args)
    import module_synthetic

    module_synthetic.prepare_synthetic_input(cfg)
    result = tune_thresholds(cfg, classifier=args.classifier, weights=args.weights, reuse_cache=not args.fresh,
                             progress=not args.no_progress)
    print(f"F2 {result.f2:.6f}")
    return 0


def _main_validate(args: argparse.Namespace) -> int:
    violations = validate_submission(args.submission, args.ids, (args.image_size, args.image_size))
    for violation in violations:
        print(f"{args.submission}: {violation}")
    if violations:
        kinds = pd.Series([v.kind for v in violations]).value_counts()
        print(f"INVALID: {len(violations)} violations in {args.submission} ("
              + ", ".join(f"{kind}: {count}" for kind, count in kinds.items()) + ")")
        return 1
    print(f"VALID: {args.submission}")
    return 0


def _main_score(args: argparse.Namespace) -> int:
    result = score_report(args.submission, args.truth, (args.image_size, args.image_size))
    if args.per_image_csv:
        with atomic_path(args.per_image_csv) as tmp:
            result.per_image.to_csv(tmp, index=False)
    if args.json:
        print(json.dumps(module_metric.score_to_json(result)))
        return 0
    busy = result.per_image[(result.per_image["n_true"] > 0) | (result.per_image["n_pred"] > 0)]
    print("per image: the 10 lowest-scoring images with ships or predictions "
          "(--per-image-csv or --json for every image):")
    print(busy.sort_values("f2", kind="stable").head(10).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print()
    print(module_metric.format_score_report(result))  # its last line is "F2 <value>"
    return 0


def _main_visualize(args: argparse.Namespace) -> int:
    out = module_plots.save_figure(module_plots.plot_submission_overlays(args.submission, args.images, args.truth,
                                                                         count=args.count), args.out, dpi=80)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
