"""Gated inference to an overlap-free Kaggle submission; validation, local score with an error report.

The pipeline of ``predict``, image by image (the inference itself is ``module_inference``'s)::

    image --classifier--> p_ship --(p_ship < SUBMIT.CLASSIFIER_THRESHOLD)--> one blank row
                                 \\--(else)--> detector (batched, optional flip TTA)
                                     --> module_inference.resolve_overlaps(score threshold,
                                         min area; each pixel to the highest-scoring mask)
                                     --> module_rle.rle_encode --> one row per ship

The library the notebook calls (the command lines are thin wrappers over it):

    paths = predict_submission(cfg)                 # -> runs/<run>/submission/submission.csv
    violations = validate_submission(paths["submission"], ids_csv)   # [] when valid
    result = score_report(paths["submission"], truth_csv)            # the local F2; result.errors
    write_score_errors(cfg, result)                 # -> the error report's table and picture in the run

Threshold tuning is ``module_tuning`` (``tune_thresholds``); ``tune`` below is its command line.

Command line (every subcommand with --config takes trailing ``KEY VALUE`` / ``KEY=VALUE`` overrides):

    python module_submit.py predict --config configs/demo.yaml
    python module_submit.py predict --config C --images DIR --ids sample_submission_v2.csv \\
        --out part0.csv --shard 0/3                     # shards 0/3, 1/3, 2/3 on three machines
    python module_submit.py merge --shards part0.csv part1.csv part2.csv \\
        --ids sample_submission_v2.csv --out submission.csv
    python module_submit.py tune --config C             # -> runs/<run>/submission/thresholds.yaml
    python module_submit.py validate --submission S --ids sample_submission_v2.csv
    python module_submit.py score --submission S --truth T [--json] [--config C]   # C: report into its run
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
import json
import logging
import sys
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

import module_config
import module_metric
import module_plots
from module_config import get_cfg_from_args, get_plot_path, get_submission_path, parse_shard
from module_files import (TooManyFailures, atomic_path, check_failure_limit, get_failure_report_path, list_images,
                          read_image, read_image_ids, read_segmentation_csv, write_failure_report)
from module_inference import (DetectFn, PShipFn, Thresholds, apply_thresholds, build_detect_fn, build_p_ship_fn,
                              get_thresholds)
from module_progress import ProgressReporter
from module_rle import KAGGLE_SHAPE, find_overlapping_masks, parse_rle, rle_encode

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
                 progress: bool = True, progress_path: Path | None = None) -> PredictResult:
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
    reporter = ProgressReporter(progress_path, "submission: gate and detector on the test images", len(image_ids), "image")
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
        reporter.update(done=bar.n)
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
                 shape: tuple[int, int] = KAGGLE_SHAPE,
                 size_edges: Sequence[float] | None = None) -> module_metric.ScoreResult:
    """The local competition score of a submission (``module_metric.score_submission``), with its
    error report (``result.errors``: failures by kind, F2 by ship size, ceilings; no gate data).

    A submission file is first checked by :func:`validate_submission` against the truth's
    ImageIds, so scoring rejects what ``validate`` rejects (an extra column, duplicate blank rows,
    a blank row beside masks...): ``ValueError`` naming the file, the line and the problem.
    ``module_metric.format_score_report`` (per-threshold counts, ship-free against ship images,
    recall per ship size, the error report; last line ``F2 <value>``) and
    ``module_metric.score_to_json`` present it. ``size_edges``: the error report's size buckets
    (px at 768 x 768; default ``SUBMIT.SIZE_BUCKET_EDGES`` of the default config).
    """
    if not isinstance(submission, pd.DataFrame):
        ids = read_segmentation_csv(truth, "truth")["ImageId"] if not isinstance(truth, pd.DataFrame) \
            else truth["ImageId"]
        violations = validate_submission(submission, list(dict.fromkeys(ids)), shape)
        if violations:
            listing = "; ".join(str(v) for v in violations[:3])
            raise ValueError(f"{submission}: not a valid submission ({len(violations)} violation(s): {listing}"
                             f"{' ...' if len(violations) > 3 else ''}); `module_submit.py validate` lists them all")
    if size_edges is None:
        size_edges = module_config.get_cfg(None).SUBMIT.SIZE_BUCKET_EDGES
    return module_metric.score_submission(submission, truth, shape=shape, size_edges=[float(e) for e in size_edges])


def write_score_errors(cfg, result: module_metric.ScoreResult, title: str = "test submission") -> dict[str, Path]:
    """The error report of a scored submission into the run folder: its long table
    (``submission/score_errors.csv``) and its picture (``plots/score_errors.png``)."""
    if result.errors is None:
        raise ValueError("the score has no error report: score it with score_report")
    paths = {"errors": get_submission_path(cfg, "score_errors"), "errors_plot": get_plot_path(cfg, "score_errors")}
    with atomic_path(paths["errors"]) as tmp:
        module_metric.error_report_to_frame(result.errors).to_csv(tmp, index=False)
    module_plots.save_figure(module_plots.plot_error_report(result.errors, title), paths["errors_plot"], dpi=90)
    return paths


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
    detect_fn = build_detect_fn(cfg, weights, thresholds)
    result = predict_rows(image_ids, image_dir, detect_fn, thresholds, p_ship_fn=p_ship_fn,
                          batch_size=cfg.SUBMIT.BATCH_SIZE, chunk_size=4 * cfg.CLASSIFIER.BATCH_SIZE,
                          load_image=lambda path: read_image(path, cfg.DATA.IMAGE_SIZE), progress=progress,
                          progress_path=module_config.get_progress_path(cfg))
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
    score.add_argument("--config", default=None,
                       help="write the error report (table and picture) into this config's run folder, with its "
                            "SUBMIT.SIZE_BUCKET_EDGES (default: print it only, default config's size buckets)")
    score.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides (with --config)")

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
    import module_tuning  # only here: the rest of this module does not need it

    module_synthetic.prepare_synthetic_input(cfg)
    result = module_tuning.tune_thresholds(cfg, classifier=args.classifier, weights=args.weights,
                                           reuse_cache=not args.fresh, progress=not args.no_progress)
    print(module_metric.format_error_report(result.errors))
    print(f"expected F2 {result.target_f2:.6f} at {result.target_empty_fraction:.1%} ship-free images")
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
    if args.opts and not args.config:
        raise ValueError(f"config overrides {args.opts} need --config")
    cfg = get_cfg_from_args(args) if args.config else None
    result = score_report(args.submission, args.truth, (args.image_size, args.image_size),
                          size_edges=cfg.SUBMIT.SIZE_BUCKET_EDGES if cfg is not None else None)
    if cfg is not None:
        for what, path in write_score_errors(cfg, result, f"{args.submission}").items():
            logger.info("wrote %s: %s", what, path)
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
