"""Gated inference to an overlap-free Kaggle submission; threshold tuning, validation, local score.

The pipeline of ``predict``, image by image::

    image --classifier--> p_ship --(p_ship < SUBMIT.CLASSIFIER_THRESHOLD)--> one blank row
                                 \\--(else)--> detector (batched, optional flip TTA)
                                     --> module_preprocessing.resolve_overlaps(score threshold,
                                         min area; each pixel to the highest-scoring mask)
                                     --> module_preprocessing.rle_encode --> one row per ship

Command line (every subcommand takes trailing ``KEY VALUE`` config overrides where it has --config):

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
exists, else the SUBMIT.* config values; a SUBMIT.* key given on the command line wins over both.
It logs which source each threshold came from.

Masks everywhere in this module are ``(N, H, W)`` bool arrays in image pixel order (row, column);
the Kaggle RLE strings are column-major and 1-indexed (module_preprocessing is their one home).

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import json
import logging
import math
import pickle
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import pandas as pd
import yaml
from PIL import Image
from tqdm.auto import tqdm

import module_config
import module_metric
import module_preprocessing

logger = logging.getLogger(__name__)

SUBMISSION_COLUMNS = ("ImageId", "EncodedPixels")
KAGGLE_SHAPE = (768, 768)

# A callable giving p_ship for image files: list of paths -> (N,) float array in [0, 1].
PShipFn = Callable[[Sequence[Path]], np.ndarray]
# A callable detecting ships: list of (H, W, 3) uint8 RGB images -> list of
# {"masks": (N, H, W) bool at the image size, "scores": (N,) float}.
DetectFn = Callable[[Sequence[np.ndarray]], list]
# A callable reading one image file -> (H, W, 3) uint8 RGB; raises on a corrupt file.
LoadImageFn = Callable[[Path], np.ndarray]


# ============================================================================ thresholds
@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The three post-processing thresholds of ``predict``."""

    classifier: float  # images with p_ship below this get a blank row; <= 0: no classifier at all
    score: float  # detections with a score below this are dropped
    min_area: int  # masks smaller than this (px, after overlap removal) are dropped

    def as_config(self) -> dict:
        return {"CLASSIFIER_THRESHOLD": float(self.classifier), "SCORE_THRESHOLD": float(self.score),
                "MIN_AREA": int(self.min_area)}


_THRESHOLD_KEYS = {"CLASSIFIER_THRESHOLD": "classifier", "SCORE_THRESHOLD": "score", "MIN_AREA": "min_area"}


def get_submission_dir(cfg) -> Path:
    """``runs/<run>/submission``, created if missing."""
    out = module_config.get_run_dir(cfg) / "submission"
    out.mkdir(parents=True, exist_ok=True)
    return out


def get_thresholds_path(cfg) -> Path:
    """Where ``tune`` writes the chosen thresholds and ``predict`` looks for them."""
    return module_config.get_run_dir(cfg) / "submission" / "thresholds.yaml"


def get_thresholds(cfg, thresholds_file: str | Path | None = None,
                   overridden: Iterable[str] = ()) -> tuple[Thresholds, dict]:
    """The thresholds ``predict`` uses, and where each came from.

    Precedence per key: a ``SUBMIT.<KEY>`` override given on the command line (``overridden``),
    then ``thresholds_file`` (default: the run's tuned thresholds.yaml, when it exists), then the
    config. Returns ``(Thresholds, {key: source})``.
    """
    path = Path(thresholds_file) if thresholds_file else get_thresholds_path(cfg)
    tuned: dict = {}
    if path.is_file():
        loaded = yaml.safe_load(path.read_text()) or {}
        tuned = loaded.get("thresholds", loaded)
        unknown = set(tuned) - set(_THRESHOLD_KEYS)
        if unknown:
            raise ValueError(f"{path}: unknown threshold keys {sorted(unknown)}; "
                             f"expected {sorted(_THRESHOLD_KEYS)}")
    elif thresholds_file:
        raise FileNotFoundError(f"thresholds file {path} does not exist")
    overridden = set(overridden)
    values, sources = {}, {}
    for key, field in _THRESHOLD_KEYS.items():
        if f"SUBMIT.{key}" in overridden or key not in tuned:
            values[field] = cfg.SUBMIT[key]
            sources[key] = "command line" if f"SUBMIT.{key}" in overridden else "config"
        else:
            values[field] = tuned[key]
            sources[key] = str(path)
    thresholds = Thresholds(float(values["classifier"]), float(values["score"]), int(values["min_area"]))
    return thresholds, sources


def write_thresholds(path: str | Path, thresholds: Thresholds, f2: float, extra: dict | None = None) -> Path:
    """Write the tuned thresholds (and the local F2 they reached) to ``path`` atomically."""
    path = Path(path)
    body = {"thresholds": thresholds.as_config(), "validation_f2": float(f2), **(extra or {})}
    with module_config.atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


# ============================================================================ predict: core
def read_image(path: str | Path, expected_size: int | None = None) -> np.ndarray:
    """Decode an image file fully -> ``(H, W, 3)`` uint8 RGB.

    Raises ``OSError``/``ValueError`` naming the file when it is missing, truncated or corrupt,
    or (with ``expected_size``) not ``expected_size`` x ``expected_size``.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()  # a truncated JPEG fails here, not at open()
            array = np.asarray(image.convert("RGB"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except Exception as exc:  # PIL raises several types for corrupt files
        raise OSError(f"{path}: cannot decode image ({exc})") from exc
    if expected_size and array.shape[:2] != (expected_size, expected_size):
        raise ValueError(f"{path}: image is {array.shape[1]}x{array.shape[0]}, "
                         f"expected {expected_size}x{expected_size}")
    return array


def instances_to_rles(masks: np.ndarray, scores: np.ndarray, thresholds: Thresholds) -> list[str]:
    """Detections of one image -> its Kaggle RLE strings, overlap-free, by score descending.

    ``masks``: ``(N, H, W)`` bool (row, column order); ``scores``: ``(N,)``. The score threshold,
    pixel ownership (highest score wins) and minimum area are module_preprocessing.resolve_overlaps'.
    Returns ``[]`` when nothing survives.
    """
    masks = np.asarray(masks, dtype=bool)
    scores = np.asarray(scores, dtype=np.float32)
    if masks.ndim != 3 or len(masks) != len(scores):
        raise ValueError(f"expected masks (N, H, W) and scores (N,), got {masks.shape} and {scores.shape}")
    if len(masks) == 0:
        return []
    kept, _ = module_preprocessing.resolve_overlaps(masks, scores, score_threshold=thresholds.score,
                                                    min_area=thresholds.min_area)
    return [rle for rle in (module_preprocessing.rle_encode(mask) for mask in kept) if rle]


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
    with module_config.atomic_path(path) as tmp:
        rows.loc[:, list(SUBMISSION_COLUMNS)].fillna("").to_csv(tmp, index=False)
    return path


def get_failures_path(submission_path: str | Path) -> Path:
    """The failure report beside a submission: ``<stem>_failures.csv``."""
    path = Path(submission_path)
    return path.with_name(f"{path.stem}_failures.csv")


def write_failures(failures: pd.DataFrame, submission_path: str | Path) -> Path:
    """Write the unreadable-image report beside the submission (always, so a stale one never lingers)."""
    out = get_failures_path(submission_path)
    with module_config.atomic_path(out) as tmp:
        failures.loc[:, ["ImageId", "reason"]].to_csv(tmp, index=False)
    return out


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


def read_image_ids(ids_csv: str | Path) -> list[str]:
    """The ImageIds of a Kaggle-format CSV (sample_submission_v2.csv), unique, in file order."""
    ids_csv = Path(ids_csv)
    if not ids_csv.is_file():
        raise FileNotFoundError(f"id list {ids_csv} does not exist")
    frame = pd.read_csv(ids_csv, dtype=str, keep_default_na=False)
    if "ImageId" not in frame.columns:
        raise ValueError(f"{ids_csv}: no ImageId column (columns: {list(frame.columns)})")
    return list(dict.fromkeys(frame["ImageId"]))


def read_submission(path: str | Path) -> pd.DataFrame:
    """Read a submission CSV with exactly the header ``ImageId,EncodedPixels``; blanks stay ""."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"submission {path} does not exist")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    if tuple(frame.columns) != SUBMISSION_COLUMNS:
        raise ValueError(f"{path}: header is {','.join(frame.columns)}, expected {','.join(SUBMISSION_COLUMNS)}")
    return frame


def merge_shards(shard_paths: Sequence[str | Path], image_ids: Sequence[str]) -> pd.DataFrame:
    """Concatenate shard submissions into one, ordered as ``image_ids``; checks completeness.

    Raises ``ValueError`` naming the shard and ImageIds when an id is missing from every shard,
    appears in two shards, or is not in ``image_ids``.
    """
    frames, owner = [], {}
    for path in shard_paths:
        frame = read_submission(path)
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
    overlapping, inside H*W; module_preprocessing.parse_rle is the judge); an image with a
    blank row has no mask rows and at most one blank row; no two masks of one image overlap.
    """
    submission = Path(submission)
    violations: list[Violation] = []
    with open(submission, newline="") as handle:
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
            continue
        image_id, rle = record[0], record[1].strip()
        if image_id not in wanted:
            violations.append(Violation(line, image_id, "ImageId is not in the id list", "unknown id"))
        if not rle:
            blank_lines.setdefault(image_id, []).append(line)
            runs_by_image.setdefault(image_id, [])
            continue
        try:
            starts, lengths = module_preprocessing.parse_rle(rle, shape)
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
        violations.extend(_find_overlaps(image_id, masks))
    missing = [i for i in id_list if i not in runs_by_image]
    violations.extend(Violation(0, i, "ImageId missing (every id needs a row; blank for no ship)", "missing id")
                      for i in missing)
    return sorted(violations, key=lambda v: (v.line == 0, v.line))


def _find_overlaps(image_id: str, masks: list[tuple[int, np.ndarray, np.ndarray]]) -> list[Violation]:
    """Overlapping masks of one image, found on the runs (no mask is built)."""
    if len(masks) < 2:
        return []
    lines = np.concatenate([np.full(len(s), line) for line, s, _ in masks])
    starts = np.concatenate([s for _, s, _ in masks]).astype(np.int64)
    ends = starts + np.concatenate([n for _, _, n in masks]).astype(np.int64)
    order = np.argsort(starts, kind="stable")
    starts, ends, lines = starts[order], ends[order], lines[order]
    # A run overlaps an earlier one when it starts before the furthest end seen so far.
    furthest = np.maximum.accumulate(ends)
    which = np.maximum.accumulate(np.where(ends == furthest, np.arange(len(ends)), 0))
    clash = np.nonzero(starts[1:] < furthest[:-1])[0] + 1
    pairs = sorted({tuple(sorted((int(lines[which[k - 1]]), int(lines[k])))) for k in clash})
    return [Violation(b, image_id, f"mask overlaps the mask on line {a}", "overlap") for a, b in pairs if a != b]


# ============================================================================ score
def score_report(submission: str | Path | pd.DataFrame, truth: str | Path | pd.DataFrame,
                 shape: tuple[int, int] = KAGGLE_SHAPE) -> module_metric.ScoreResult:
    """The local competition score of a submission: module_metric.score_submission, nothing added.

    ``module_metric.format_score_report`` (per-threshold counts, ship-free against ship images,
    recall per ship size; last line ``F2 <value>``) and ``module_metric.score_to_json`` present it.
    """
    return module_metric.score_submission(submission, truth, shape=shape)


# ============================================================================ tune
def masks_to_coco(masks: np.ndarray) -> list[dict]:
    """``(N, H, W)`` bool masks -> N COCO RLE dicts (compact storage; pycocotools' encoder)."""
    from pycocotools import mask as mask_util

    masks = np.asarray(masks, dtype=bool)
    if len(masks) == 0:
        return []
    return mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def coco_to_masks(rles: Sequence[dict], shape: tuple[int, int]) -> np.ndarray:
    """COCO RLE dicts -> ``(N, H, W)`` bool masks (``shape`` = (H, W), used when N is 0)."""
    from pycocotools import mask as mask_util

    if not len(rles):
        return np.zeros((0, *shape), dtype=bool)
    return mask_util.decode(list(rles)).transpose(2, 0, 1).astype(bool)


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
        return cls(image_id, file_name, float(p_ship), masks_to_coco(pred_masks),
                   np.asarray(scores, dtype=np.float32), masks_to_coco(true_masks), shape)

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
            kept, _ = module_preprocessing.resolve_overlaps(pred, image.scores, score_threshold=score,
                                                            min_area=min_area)
            detector_f2[k, j] = _image_f2(true, kept)
    rows = []
    for c in classifier_thresholds:
        passed = p_ship >= c  # NaN (unreadable) never passes
        for j, (score, min_area) in enumerate(combos):
            f2 = np.where(passed, detector_f2[:, j], f2_empty)
            rows.append((float(c), score, min_area, float(f2.mean())))
    return pd.DataFrame(rows, columns=["classifier_threshold", "score_threshold", "min_area", "f2"])


def choose_thresholds(grid: pd.DataFrame) -> tuple[Thresholds, float]:
    """The setting with the highest F2; ties go to the first in grid order. -> (Thresholds, f2)."""
    best = grid.loc[grid["f2"].idxmax()]
    return Thresholds(float(best["classifier_threshold"]), float(best["score_threshold"]),
                      int(best["min_area"])), float(best["f2"])


def plot_tune_grid(grid: pd.DataFrame, chosen: Thresholds, out_path: str | Path) -> Path:
    """Plot F2 against each threshold (the best F2 over the other two), the chosen one marked."""
    from matplotlib.figure import Figure  # no pyplot: no backend switch, no figure left open

    panels = [("classifier_threshold", chosen.classifier, "classifier threshold (p_ship)"),
              ("score_threshold", chosen.score, "detection score threshold"),
              ("min_area", chosen.min_area, "minimum mask area (px)")]
    fig = Figure(figsize=(13, 3.8), layout="constrained")
    axes = fig.subplots(1, 3, sharey=True)
    for ax, (column, value, label) in zip(axes, panels):
        profile = grid.groupby(column)["f2"].max()
        ax.plot(profile.index, profile.values, marker="o")
        ax.axvline(value, color="tab:red", linestyle="--", label=f"chosen {value:g}")
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower center")
    axes[0].set_ylabel("validation F2 (best over the others)")
    fig.suptitle(f"Threshold tuning: best F2 {grid['f2'].max():.4f}")
    out_path = Path(out_path)
    with module_config.atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=100)
    return out_path


def tune(cache: Sequence[TuneImage], cfg, out_dir: str | Path, plots_dir: str | Path,
         progress: bool = True) -> tuple[Thresholds, float, pd.DataFrame]:
    """Sweep the SUBMIT.TUNE_* grids on ``cache``; write thresholds.yaml, the grid CSV and the plots.

    Returns ``(chosen thresholds, their F2, grid)``.
    """
    grid = sweep_thresholds(cache, cfg.SUBMIT.TUNE_CLASSIFIER_THRESHOLDS, cfg.SUBMIT.TUNE_SCORE_THRESHOLDS,
                            cfg.SUBMIT.TUNE_MIN_AREAS, progress=progress)
    chosen, f2 = choose_thresholds(grid)
    out_dir, plots_dir = Path(out_dir), Path(plots_dir)
    with module_config.atomic_path(out_dir / "tune_grid.csv") as tmp:
        grid.to_csv(tmp, index=False)
    config_f2 = grid.loc[(grid["classifier_threshold"] == cfg.SUBMIT.CLASSIFIER_THRESHOLD)
                         & (grid["score_threshold"] == cfg.SUBMIT.SCORE_THRESHOLD)
                         & (grid["min_area"] == cfg.SUBMIT.MIN_AREA), "f2"]
    ungated = grid.loc[grid["classifier_threshold"] <= 0, "f2"]  # threshold 0: the detector alone, no gate
    detector_alone_f2 = float(ungated.max()) if len(ungated) else None
    all_empty_f2 = float(np.mean([len(c.true_rles) == 0 for c in cache]))
    write_thresholds(out_dir / "thresholds.yaml", chosen, f2, {
        "n_validation_images": len(cache),
        "config_thresholds_f2": float(config_f2.iloc[0]) if len(config_f2) else None,
        "all_empty_f2": all_empty_f2,
        "detector_alone_f2": detector_alone_f2,
    })
    logger.info("detector alone (classifier threshold 0): best F2 %s; predicting no ship anywhere: F2 %.4f",
                "not in the grid" if detector_alone_f2 is None else f"{detector_alone_f2:.4f}", all_empty_f2)
    plot_tune_grid(grid, chosen, plots_dir / "tune_f2.png")
    save_tune_overlays(cache, chosen, plots_dir / "val_overlays.png")
    return chosen, f2, grid


# ============================================================================ visuals
def draw_overlays(images: Sequence[np.ndarray], true_masks: Sequence[np.ndarray],
                  pred_masks: Sequence[np.ndarray], titles: Sequence[str], out_path: str | Path,
                  columns: int = 4) -> Path:
    """Save a grid of images with ground truth (green outline) and predictions (red fill).

    ``images``: ``(H, W, 3)`` uint8 RGB; masks: ``(N, H, W)`` bool per image, same H, W.
    """
    from matplotlib.figure import Figure  # no pyplot: no backend switch, no figure left open
    from skimage.segmentation import find_boundaries

    count = max(len(images), 1)
    columns = min(columns, count)
    rows = math.ceil(count / columns)
    fig = Figure(figsize=(4 * columns, 4.2 * rows), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, true, pred, title in zip(axes.ravel(), images, true_masks, pred_masks, titles):
        canvas = image.astype(np.float32) / 255.0
        if len(pred):
            red = pred.any(axis=0)
            canvas[red] = 0.5 * canvas[red] + 0.5 * np.array([1.0, 0.1, 0.1])
        for mask in true:
            canvas[find_boundaries(mask, mode="outer")] = (0.1, 1.0, 0.1)
        ax.imshow(canvas)
        ax.set_title(title, fontsize=9)
    fig.suptitle("ground truth: green outline, prediction: red fill", fontsize=10)
    out_path = Path(out_path)
    with module_config.atomic_path(out_path) as tmp:
        fig.savefig(tmp, dpi=80)
    return out_path


def pick_overlay_sample(has_ships: Sequence[bool], n_predictions: Sequence[int], count: int = 8) -> list[int]:
    """Indices to show: ship images first, then ship-free images with the most predictions."""
    ship = [k for k, s in enumerate(has_ships) if s]
    free = sorted((k for k, s in enumerate(has_ships) if not s), key=lambda k: -n_predictions[k])
    first = ship[:max(count - count // 4, count - len(free))]
    return sorted(first + free[:count - len(first)])


def save_tune_overlays(cache: Sequence[TuneImage], thresholds: Thresholds, out_path: str | Path,
                       count: int = 8, load_image: LoadImageFn = read_image) -> Path:
    """GT/prediction overlays of a sample of validation images at ``thresholds`` (gate included)."""
    def kept_masks(image: TuneImage) -> np.ndarray:
        pred, _, _ = image.decode(crop=False)
        if not image.p_ship >= thresholds.classifier or not len(pred):
            return pred[:0]
        return module_preprocessing.resolve_overlaps(pred, image.scores, score_threshold=thresholds.score,
                                                     min_area=thresholds.min_area)[0]

    # Sampling needs the number of kept predictions of ship-free images: count those only.
    n_kept = [len(kept_masks(c)) if not c.true_rles and c.pred_rles else 0 for c in cache]
    chosen = pick_overlay_sample([len(c.true_rles) > 0 for c in cache], n_kept, count)
    images, trues, preds, titles = [], [], [], []
    for k in chosen:
        image = cache[k]
        true, pred = coco_to_masks(image.true_rles, image.shape), kept_masks(image)
        images.append(load_image(Path(image.file_name)))
        trues.append(true)
        preds.append(pred)
        titles.append(f"{image.image_id} p_ship {image.p_ship:.2f}\n"
                      f"F2 {_image_f2(true, pred):.2f} ({len(true)} true, {len(pred)} pred)")
    return draw_overlays(images, trues, preds, titles, out_path)


def save_submission_overlays(submission: str | Path | pd.DataFrame, truth: str | Path | pd.DataFrame,
                             image_dir: str | Path, out_path: str | Path, count: int = 8) -> Path:
    """GT/prediction overlays for a sample of the images of a submission (truth CSV needed)."""
    sub = read_submission(submission) if not isinstance(submission, pd.DataFrame) else submission
    true = read_submission(truth) if not isinstance(truth, pd.DataFrame) else truth
    sub_rles = sub.groupby("ImageId", sort=True)["EncodedPixels"].apply(lambda s: [r for r in s if r])
    true_rles = true.groupby("ImageId", sort=True)["EncodedPixels"].apply(lambda s: [r for r in s if r])
    ids = [i for i in sub_rles.index if i in true_rles.index]
    chosen = pick_overlay_sample([bool(true_rles[i]) for i in ids], [len(sub_rles[i]) for i in ids], count)
    images, trues, preds, titles = [], [], [], []
    for k in chosen:
        image_id = ids[k]
        image = read_image(Path(image_dir) / image_id)
        shape = image.shape[:2]
        decode = lambda rles: (np.stack([module_preprocessing.rle_decode(r, shape).astype(bool) for r in rles])
                               if rles else np.zeros((0, *shape), dtype=bool))
        t, p = decode(true_rles[image_id]), decode(sub_rles[image_id])
        images.append(image)
        trues.append(t)
        preds.append(p)
        titles.append(f"{image_id}\nF2 {module_metric.f2_image(true_rles[image_id], sub_rles[image_id], shape):.2f} "
                      f"({len(t)} true, {len(p)} pred)")
    return draw_overlays(images, trues, preds, titles, out_path)


# ============================================================================ models
def get_default_classifier_path(cfg) -> Path:
    """The classifier exported by module_classifier.train_classifier for this run."""
    return module_config.get_run_dir(cfg) / "classifier" / "export.pkl"


def get_default_weights_path(cfg) -> Path:
    """The detector weights for this run: the best by validation F2, else the final ones."""
    detector_dir = module_config.get_run_dir(cfg) / "detector"
    for name in ("model_best.pth", "model_final.pth"):
        if (detector_dir / name).is_file():
            return detector_dir / name
    raise FileNotFoundError(f"no detector weights in {detector_dir} (model_best.pth or model_final.pth); "
                            "train with module_train.py or pass --weights")


def build_p_ship_fn(cfg, classifier_path: str | Path | None = None) -> PShipFn:
    """A PShipFn over module_classifier's exported learner (CLASSIFIER.BATCH_SIZE, CLASSIFIER.TTA)."""
    import module_classifier  # here, not at the top: validate/merge/score need no model stack

    path = Path(classifier_path) if classifier_path else get_default_classifier_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"classifier {path} does not exist; train it with module_classifier.py, "
                                "pass --classifier, or set SUBMIT.CLASSIFIER_THRESHOLD 0 to run ungated")
    learner = module_classifier.load_classifier(path)

    def p_ship_fn(paths: Sequence[Path]) -> np.ndarray:
        frame = module_classifier.predict_p_ship(learner, list(paths), batch_size=cfg.CLASSIFIER.BATCH_SIZE,
                                                 tta=cfg.CLASSIFIER.TTA, num_workers=cfg.CLASSIFIER.NUM_WORKERS,
                                                 on_bad_image="skip", progress=False,
                                                 precision=cfg.CLASSIFIER.PRECISION)
        by_id = frame.set_index("ImageId")["p_ship"]  # skipped (unreadable) images are absent: NaN
        return by_id.reindex([Path(p).name for p in paths]).to_numpy(dtype=np.float64)

    return p_ship_fn


def build_detect_fn(cfg, weights: str | Path | None = None) -> DetectFn:
    """A DetectFn over module_train's detector, at the input size its checkpoint was trained at.

    SUBMIT.TTA turns on flip TTA (masks merged by module_train); SUBMIT.BATCH_SIZE images per pass.
    """
    import module_train  # here, not at the top: validate/merge/score need no model stack

    weights = Path(weights) if weights else get_default_weights_path(cfg)
    model = module_train.load_detector(cfg, weights)
    logger.info("detector %s at input size %d, TTA %s", weights, model.input_size, cfg.SUBMIT.TTA)

    def detect_fn(images: Sequence[np.ndarray]) -> list:
        return module_train.predict_instances(model, list(images), input_size=model.input_size,
                                              tta=cfg.SUBMIT.TTA, batch_size=cfg.SUBMIT.BATCH_SIZE)

    return detect_fn


# ============================================================================ command line
def _add_config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default="configs/airbus.yaml", help="pipeline config YAML")
    parser.add_argument("--classifier", default=None, help="exported classifier (default runs/<run>/classifier/export.pkl)")
    parser.add_argument("--weights", default=None, help="detector weights (default runs/<run>/detector/model_best.pth)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")


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
    predict.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_config_args(predict)

    merge = commands.add_parser("merge", help="shard submissions -> one submission, checked for completeness")
    merge.add_argument("--shards", nargs="+", required=True, help="shard CSVs written by predict --shard")
    merge.add_argument("--ids", required=True, help="CSV with every ImageId (sample_submission_v2.csv)")
    merge.add_argument("--out", required=True, help="merged submission CSV")

    tune_parser = commands.add_parser("tune", help="grid-search the thresholds on the validation split")
    tune_parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    tune_parser.add_argument("--reuse-cache", action="store_true",
                             help="reuse the cached model outputs of a previous tune (same models) instead of re-running them")
    _add_config_args(tune_parser)

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
    commands = {"predict": _main_predict, "merge": _main_merge, "tune": _main_tune,
                "validate": _main_validate, "score": _main_score, "visualize": _main_visualize}
    return commands[args.command](args)


def _setup_logging() -> None:
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")


def _list_images(image_dir: Path) -> list[str]:
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} does not exist")
    names = sorted(p.name for p in image_dir.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    if not names:
        raise ValueError(f"image folder {image_dir} holds no .jpg/.jpeg/.png file")
    return names


def _main_predict(args: argparse.Namespace) -> int:
    _setup_logging()
    cfg = module_config.get_cfg(args.config, args.opts)
    image_dir = Path(args.images) if args.images else module_config.get_input_path(cfg, cfg.DATA.TEST_IMAGES)
    sample = module_config.get_input_path(cfg, cfg.DATA.SAMPLE_SUBMISSION)
    if args.ids:
        image_ids = read_image_ids(args.ids)
    elif not args.images and sample.is_file():
        image_ids = read_image_ids(sample)
    else:
        image_ids = _list_images(image_dir)
    out = Path(args.out) if args.out else get_submission_dir(cfg) / "submission.csv"
    if args.shard:
        index, count = parse_shard(args.shard)
        image_ids = select_shard(image_ids, index, count)
        if not args.out:
            out = out.with_name(f"submission_shard{index}of{count}.csv")
        logger.info("shard %d/%d: %d images", index, count, len(image_ids))
    thresholds, sources = get_thresholds(cfg, args.thresholds, overridden=args.opts[0::2])
    for key, source in sources.items():
        logger.info("SUBMIT.%s = %s (from %s)", key, thresholds.as_config()[key], source)
    p_ship_fn = build_p_ship_fn(cfg, args.classifier) if thresholds.classifier > 0 else None
    if p_ship_fn is None:
        logger.info("classifier threshold <= 0: ungated, the detector sees every image")
    detect_fn = build_detect_fn(cfg, args.weights)
    result = predict_rows(image_ids, image_dir, detect_fn, thresholds, p_ship_fn=p_ship_fn,
                          batch_size=cfg.SUBMIT.BATCH_SIZE, chunk_size=4 * cfg.CLASSIFIER.BATCH_SIZE,
                          load_image=lambda path: read_image(path, cfg.DATA.IMAGE_SIZE),
                          progress=not args.no_progress)
    write_submission(result.rows, out)
    failures_path = write_failures(result.failures, out)
    with module_config.atomic_path(out.with_name(f"{out.stem}_p_ship.csv")) as tmp:
        result.p_ship.reset_index().to_csv(tmp, index=False)
    n_ship_images = int((result.rows["EncodedPixels"] != "").groupby(result.rows["ImageId"]).any().sum())
    logger.info("wrote %s: %d images, %d rows; the detector ran on %d; %d images with ships; %d unreadable (%s)",
                out, len(image_ids), len(result.rows), result.n_detected, n_ship_images, len(result.failures),
                failures_path)
    return 0


def _main_merge(args: argparse.Namespace) -> int:
    _setup_logging()
    image_ids = read_image_ids(args.ids)
    merged = merge_shards(args.shards, image_ids)
    write_submission(merged, args.out)
    failure_reports = [get_failures_path(p) for p in args.shards if get_failures_path(p).is_file()]
    if failure_reports:
        failures = pd.concat([pd.read_csv(p, dtype=str, keep_default_na=False) for p in failure_reports],
                             ignore_index=True)
        write_failures(failures, args.out)
        logger.info("%d unreadable images across the shards (%s)", len(failures), get_failures_path(args.out))
    logger.info("merged %d shards into %s: %d images, %d rows", len(args.shards), args.out, len(image_ids), len(merged))
    return 0


def _cache_fingerprint(*paths: Path | None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path is not None:
            stat = Path(path).stat()
            digest.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def _main_tune(args: argparse.Namespace) -> int:
    _setup_logging()
    cfg = module_config.get_cfg(args.config, args.opts)
    _, val_dicts = module_preprocessing.get_train_val_dicts(cfg)
    out_dir = get_submission_dir(cfg)
    plots_dir = module_config.get_run_dir(cfg) / "plots"
    classifier = Path(args.classifier) if args.classifier else get_default_classifier_path(cfg)
    weights = Path(args.weights) if args.weights else get_default_weights_path(cfg)
    use_classifier = classifier.is_file()
    if not use_classifier:
        logger.warning("no classifier at %s: tuning ungated (p_ship = 1 for every image)", classifier)
    fingerprint = _cache_fingerprint(weights, classifier if use_classifier else None) + str(
        [d["image_id"] for d in val_dicts])
    cache_path = out_dir / "tune_cache.pkl"
    cache = None
    if args.reuse_cache and cache_path.is_file():
        stored = pickle.loads(cache_path.read_bytes())
        if stored.get("fingerprint") == fingerprint:
            cache = stored["images"]
            logger.info("reusing the model outputs cached in %s", cache_path)
        else:
            logger.info("%s was made with other models or images: recomputing", cache_path)
    if cache is None:
        p_ship_fn = build_p_ship_fn(cfg, classifier) if use_classifier else None
        cache = collect_tune_cache(val_dicts, build_detect_fn(cfg, weights), p_ship_fn,
                                   batch_size=cfg.SUBMIT.BATCH_SIZE, min_score=min(cfg.SUBMIT.TUNE_SCORE_THRESHOLDS),
                                   progress=not args.no_progress)
        with module_config.atomic_path(cache_path) as tmp:
            tmp.write_bytes(pickle.dumps({"fingerprint": fingerprint, "images": cache}))
    chosen, f2, grid = tune(cache, cfg, out_dir, plots_dir, progress=not args.no_progress)
    logger.info("chosen on %d validation images: %s -> F2 %.4f; written to %s; plots in %s",
                len(cache), chosen.as_config(), f2, out_dir / "thresholds.yaml", plots_dir)
    print(f"F2 {f2:.6f}")
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
        with module_config.atomic_path(args.per_image_csv) as tmp:
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
    out = save_submission_overlays(args.submission, args.truth, args.images, args.out, count=args.count)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
