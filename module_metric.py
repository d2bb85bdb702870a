"""The competition metric, in one home: F2 averaged over IoU thresholds, then over images.

Definition (Kaggle "Airbus Ship Detection Challenge"), per image:

- at each IoU threshold t in 0.50, 0.55, ..., 0.95 a predicted mask matches a true mask when
  IoU > t (strictly); matching is one-to-one;
- F2(t) = 5 TP / (5 TP + 4 FN + FP); the image scores the mean of F2(t) over the thresholds;
- an image with no ships and no prediction scores 1; any prediction on a ship-free image scores 0.

The score of a submission is the mean over images.

Matching is greedy by IoU (highest pair first, each mask used once). Kaggle's masks never
overlap, and a mask can then have IoU > 0.5 with at most one mask of the other side, so the
matching is unique at every threshold; greedy only matters for overlapping inputs. Greedy
matching at threshold t equals the full greedy matching restricted to pairs with IoU > t, so
one matching serves all thresholds.

IoU is computed by pycocotools on COCO RLE converted directly from the Kaggle runs
(``module_rle.kaggle_rles_to_coco``): no mask is decoded, which is what makes scoring 15,606
images take seconds. CSVs are read by ``module_files.read_segmentation_csv`` (the one reader:
what ``module_submit.py validate`` rejects, scoring rejects too), and overlapping predicted masks
are found by ``module_rle.find_overlapping_masks``.

    result = score_submission("submission.csv", "truth.csv")
    print(format_score_report(result))    # last line: "F2 0.71234"
    f2 = f2_masks(true_masks, pred_masks)  # in memory, (N, H, W) bool; validation hook, tuning

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Sequence

import numpy as np
import pandas as pd
import pycocotools.mask as mask_util

from module_files import read_segmentation_csv
from module_rle import KAGGLE_SHAPE, RLEError, find_overlapping_masks, kaggle_rles_to_coco, masks_to_coco, parse_rle

# 0.50, 0.55, ..., 0.95, each the double nearest the decimal, so that "IoU > t" is decided as on
# paper when IoU is exactly t (e.g. 3/5 is not > 0.6). np.arange(0.5, 1, 0.05) drifts off the
# decimals (0.6000000000000001, 0.7000000000000002, ...).
IOU_THRESHOLDS = tuple(t / 100 for t in range(50, 100, 5))
# Default ship-size buckets (mask area in pixels) of `recall_by_size`: <100, 100-1000, ...
SIZE_BUCKET_EDGES = (100, 1000, 5000)

_THRESHOLDS = np.asarray(IOU_THRESHOLDS)


@dataclasses.dataclass
class ScoreResult:
    """What `score_submission` returns.

    f2: the competition score (mean of per_image.f2).
    per_image: one row per ImageId (sorted): ImageId, f2, n_true, n_pred.
    per_threshold: one row per IoU threshold: threshold, tp, fp, fn (summed over images) and
        f2 (mean over images of the per-image F2 at that threshold; their mean is ``f2``).
    per_ship: one row per true ship: ImageId, area (px), iou (IoU with its matched prediction,
        0.0 when unmatched), recall (share of the IoU thresholds at which it is matched: a ship
        matched with IoU 0.72 has recall 0.5). Feeds `recall_by_size`.
    """

    f2: float
    per_image: pd.DataFrame
    per_threshold: pd.DataFrame
    per_ship: pd.DataFrame


# ---------------------------------------------------------------- the math, on IoU matrices
def match_greedy(iou: np.ndarray, min_iou: float = IOU_THRESHOLDS[0]) -> np.ndarray:
    """One-to-one greedy matching of an IoU matrix; returns each true mask's matched IoU.

    iou: (n_true, n_pred) float. Pairs are taken in decreasing IoU (ties by index, so the
    result is deterministic); a pair is kept when neither mask is matched yet and its IoU is
    > ``min_iou``. Returns (n_true,) float64: the IoU of the true mask's match, 0.0 if none.
    """
    iou = np.asarray(iou, dtype=np.float64)
    matched = np.zeros(iou.shape[0], dtype=np.float64)
    true_idx, pred_idx = np.nonzero(iou > min_iou)
    if true_idx.size == 0:
        return matched
    # The usual case (non-overlapping masks): every row and column has at most one candidate.
    if np.unique(true_idx).size == true_idx.size and np.unique(pred_idx).size == pred_idx.size:
        matched[true_idx] = iou[true_idx, pred_idx]
        return matched
    values = iou[true_idx, pred_idx]
    order = np.lexsort((pred_idx, true_idx, -values))
    used_pred = set()
    for k in order:
        t, p = true_idx[k], pred_idx[k]
        if matched[t] == 0.0 and p not in used_pred:
            matched[t] = values[k]
            used_pred.add(p)
    return matched


def counts_from_matches(matched_iou: np.ndarray, n_pred: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TP, FP, FN at each of `IOU_THRESHOLDS` from the true masks' matched IoUs (`match_greedy`).

    Returns three (10,) int64 arrays.
    """
    matched_iou = np.asarray(matched_iou, dtype=np.float64)
    tp = (matched_iou[:, None] > _THRESHOLDS[None, :]).sum(axis=0).astype(np.int64)
    return tp, n_pred - tp, matched_iou.size - tp


def f2_from_counts(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """Per-threshold F2 = 5TP / (5TP + 4FN + FP); 1.0 where there is nothing at all (0/0)."""
    tp, fp, fn = (np.asarray(a, dtype=np.float64) for a in (tp, fp, fn))
    denominator = 5 * tp + 4 * fn + fp
    safe = np.where(denominator > 0, denominator, 1.0)
    return np.where(denominator > 0, 5 * tp / safe, 1.0)


def f2_from_iou(iou: np.ndarray) -> float:
    """The F2 of one image from its (n_true, n_pred) IoU matrix (either side may be 0)."""
    iou = np.asarray(iou, dtype=np.float64)
    n_true, n_pred = iou.shape
    tp, fp, fn = counts_from_matches(match_greedy(iou), n_pred)
    return float(f2_from_counts(tp, fp, fn).mean())


# ---------------------------------------------------------------- IoU
def _coco_iou(true_coco: Sequence[dict], pred_coco: Sequence[dict]) -> np.ndarray:
    """(n_true, n_pred) IoU of COCO RLE dicts, by pycocotools (no decoding)."""
    if not true_coco or not pred_coco:
        return np.zeros((len(true_coco), len(pred_coco)), dtype=np.float64)
    # pycocotools returns (n_dt, n_gt); iscrowd=0 everywhere gives the plain IoU.
    iou = mask_util.iou(list(pred_coco), list(true_coco), [0] * len(true_coco))
    return np.asarray(iou, dtype=np.float64).reshape(len(pred_coco), len(true_coco)).T


def iou_masks(true_masks, pred_masks) -> np.ndarray:
    """(n_true, n_pred) IoU of in-memory masks.

    true_masks, pred_masks: (N, H, W) arrays (bool or 0/1, any N including 0) or lists of
    (H, W) arrays; every mask of both sides has the same (H, W).
    """
    true_coco = masks_to_coco(true_masks)
    pred_coco = masks_to_coco(pred_masks)
    if true_coco and pred_coco and true_coco[0]["size"] != pred_coco[0]["size"]:
        raise ValueError(f"true masks are {true_coco[0]['size']} but predicted masks are {pred_coco[0]['size']}")
    return _coco_iou(true_coco, pred_coco)


def f2_masks(true_masks, pred_masks) -> float:
    """F2 of one image from in-memory masks (for the training validation hook and tuning).

    true_masks, pred_masks: (N, H, W) bool/uint8 arrays (N may be 0) or lists of (H, W) arrays.
    Masks with no pixel set still count as masks (a prediction is a prediction).
    """
    return f2_from_iou(iou_masks(true_masks, pred_masks))


def f2_image(true_rles: Sequence[str], pred_rles: Sequence[str], shape: tuple[int, int] = KAGGLE_SHAPE) -> float:
    """F2 of one image from Kaggle RLE strings (column-major, 1-indexed); blank strings are ignored.

    ``shape`` (H, W) only bounds the runs: IoU depends on the pixel numbers alone.
    """
    true_coco = kaggle_rles_to_coco([r for r in true_rles if isinstance(r, str) and r.strip()], shape)
    pred_coco = kaggle_rles_to_coco([r for r in pred_rles if isinstance(r, str) and r.strip()], shape)
    return f2_coco(true_coco, pred_coco)


def f2_coco(true_coco: Sequence[dict], pred_coco: Sequence[dict]) -> float:
    """F2 of one image from COCO RLE dicts (``{"size": [H, W], "counts": ...}``, as in the dataset
    dicts' ``segmentation``), without decoding them."""
    return f2_from_iou(_coco_iou(list(true_coco), list(pred_coco)))


# ---------------------------------------------------------------- submissions
def read_rle_table(table: pd.DataFrame | str | os.PathLike, what: str) -> pd.DataFrame:
    """A Kaggle ``ImageId,EncodedPixels`` CSV (path, read by ``module_files.read_segmentation_csv``)
    or DataFrame, with a ``source_row`` column naming each row in errors ("<file> line <n>", or
    "<what> row <label>" for a DataFrame). Blank and NaN EncodedPixels become ""."""
    if isinstance(table, pd.DataFrame):
        missing = {"ImageId", "EncodedPixels"} - set(table.columns)
        if missing:
            raise ValueError(f"{what}: expected columns ImageId,EncodedPixels; missing {sorted(missing)}")
        frame = table[["ImageId", "EncodedPixels"]].copy()
        frame["source_row"] = [f"{what} row {label}" for label in table.index]
        encoded = frame["EncodedPixels"]
        frame["EncodedPixels"] = encoded.where(encoded.notna(), "").astype(str).str.strip()
        frame["ImageId"] = frame["ImageId"].astype(str)
    else:
        frame = read_segmentation_csv(table, what)
        frame["source_row"] = [f"{table} line {line}" for line in frame["line"]]
    return frame[["ImageId", "EncodedPixels", "source_row"]].reset_index(drop=True)


def _coco_by_image(frame: pd.DataFrame, shape: tuple[int, int]) -> dict[str, list[dict]]:
    """ImageId -> COCO RLE dicts of its non-blank rows, errors naming the row and ImageId."""
    rows = frame[frame["EncodedPixels"] != ""]
    image_ids, rles = rows["ImageId"].tolist(), rows["EncodedPixels"].tolist()
    try:
        # One batched conversion; `lines` are 1-based positions in `rows`, mapped back on error.
        cocos = kaggle_rles_to_coco(rles, shape, image_ids=image_ids, lines=range(1, len(rles) + 1))
    except RLEError as exc:
        source_row = rows["source_row"].iloc[exc.line - 1] if exc.line else "?"
        raise ValueError(f"{source_row}, ImageId {exc.image_id}: invalid EncodedPixels for a "
                         f"{shape[0]}x{shape[1]} image: {exc.reason}") from None
    by_image: dict[str, list[dict]] = {}
    for image_id, coco in zip(image_ids, cocos):
        by_image.setdefault(image_id, []).append(coco)
    return by_image


def _check_no_overlap(image_id: str, rows: pd.DataFrame, shape: tuple[int, int]) -> None:
    """``rows``: the image's non-blank submission rows (EncodedPixels, source_row)."""
    runs = [parse_rle(r, shape) for r in rows["EncodedPixels"]]
    pairs = find_overlapping_masks(runs, shape)
    if pairs:
        a, b, pixels = pairs[0]
        raise ValueError(f"submission, ImageId {image_id}: predicted masks overlap ({rows['source_row'].iloc[a]} and "
                         f"{rows['source_row'].iloc[b]} share {pixels} px); Kaggle rejects overlapping masks "
                         "(module_inference.resolve_overlaps removes them)")


def score_submission(
    submission: pd.DataFrame | str | os.PathLike,
    truth: pd.DataFrame | str | os.PathLike,
    shape: tuple[int, int] = KAGGLE_SHAPE,
    missing: str = "error",
    check_overlaps: bool = True,
) -> ScoreResult:
    """Score a Kaggle submission against ground truth (both ``ImageId,EncodedPixels``, path or DataFrame).

    shape: (H, W) of the images; runs past H*W are an error (IoU itself needs no shape).
    missing: truth ImageIds absent from the submission are an "error" (as on Kaggle), or
        count as predicted "empty".
    check_overlaps: overlapping predicted masks in one image are an error, as on Kaggle.
    Submission ImageIds absent from the truth are always an error.
    """
    if missing not in ("error", "empty"):
        raise ValueError(f"missing={missing!r}: expected 'error' or 'empty'")
    sub = read_rle_table(submission, "submission")
    gt = read_rle_table(truth, "truth")
    truth_set = set(gt["ImageId"])
    sub_ids = set(sub["ImageId"])
    extra = sorted(sub_ids - truth_set)
    if extra:
        raise ValueError(f"submission: {len(extra)} ImageId(s) not in the truth, e.g. {extra[:5]} "
                         f"(the truth has {len(truth_set)} images)")
    absent = sorted(truth_set - sub_ids)
    if absent and missing == "error":
        raise ValueError(f"submission: {len(absent)} truth ImageId(s) have no row, e.g. {absent[:5]}; a submission "
                         "needs a row for every image (blank EncodedPixels for none), or pass missing='empty'")

    true_by_image = _coco_by_image(gt, shape)
    pred_by_image = _coco_by_image(sub, shape)
    image_ids = sorted(truth_set)
    n_images = len(image_ids)
    n_true = np.array([len(true_by_image.get(i, ())) for i in image_ids], dtype=np.int64)
    n_pred = np.array([len(pred_by_image.get(i, ())) for i in image_ids], dtype=np.int64)
    tp = np.zeros((n_images, len(IOU_THRESHOLDS)), dtype=np.int64)
    busy = {i for i, n in zip(image_ids, n_pred) if n > 1} if check_overlaps else set()
    busy_rows = dict(tuple(sub[sub["ImageId"].isin(busy) & (sub["EncodedPixels"] != "")].groupby("ImageId"))) if busy else {}
    ship_image, ship_area, ship_iou = [], [], []
    # Only images with ships on both sides need IoU; the others' counts follow from n_true, n_pred.
    for i, image_id in enumerate(image_ids):
        if image_id in busy_rows:
            _check_no_overlap(image_id, busy_rows[image_id], shape)
        if n_true[i] == 0:
            continue
        true_coco = true_by_image[image_id]
        matched = match_greedy(_coco_iou(true_coco, pred_by_image[image_id])) if n_pred[i] else np.zeros(n_true[i])
        tp[i] = (matched[:, None] > _THRESHOLDS[None, :]).sum(axis=0)
        ship_image.extend([image_id] * n_true[i])
        ship_area.append(mask_util.area(true_coco))
        ship_iou.append(matched)
    fp, fn = n_pred[:, None] - tp, n_true[:, None] - tp
    per_image_threshold = f2_from_counts(tp, fp, fn)  # (n_images, 10); 0/0 (nothing at all) is 1
    image_f2 = per_image_threshold.mean(axis=1)

    per_image = pd.DataFrame({"ImageId": image_ids, "f2": image_f2, "n_true": n_true, "n_pred": n_pred})
    per_threshold = pd.DataFrame({
        "threshold": IOU_THRESHOLDS, "tp": tp.sum(axis=0), "fp": fp.sum(axis=0), "fn": fn.sum(axis=0),
        "f2": per_image_threshold.mean(axis=0) if n_images else np.full(len(IOU_THRESHOLDS), np.nan),
    })
    ship_iou = np.concatenate(ship_iou) if ship_iou else np.zeros(0)
    per_ship = pd.DataFrame({"ImageId": pd.Series(ship_image, dtype=str),
                             "area": np.concatenate(ship_area).astype(np.int64) if ship_area else np.zeros(0, np.int64),
                             "iou": ship_iou,
                             "recall": (ship_iou[:, None] > _THRESHOLDS[None, :]).mean(axis=1)})
    f2 = float(image_f2.mean()) if n_images else float("nan")
    return ScoreResult(f2=f2, per_image=per_image, per_threshold=per_threshold, per_ship=per_ship)


def match_ships(submission, truth, **kwargs) -> pd.DataFrame:
    """One row per true ship: ImageId, area (px), iou, recall; `score_submission`'s ``per_ship``.

    Keyword arguments go to `score_submission`.
    """
    return score_submission(submission, truth, **kwargs).per_ship


# ---------------------------------------------------------------- breakdowns and reports
def recall_by_size(result: ScoreResult, edges: Sequence[int] = SIZE_BUCKET_EDGES) -> pd.DataFrame:
    """Recall of true ships per size bucket (mask area, px): columns size, n_ships, recall_50, recall.

    recall_50 is the share of ships matched at IoU > 0.5; recall averages over the thresholds
    (a ship matched with IoU 0.72 counts at 5 of the 10 thresholds).
    """
    bounds = [0, *edges, math.inf]
    labels = [f"<{bounds[1]}"] + [f"{lo}-{hi}" for lo, hi in zip(bounds[1:-2], bounds[2:-1])] + [f">={bounds[-2]}"]
    area = result.per_ship["area"].to_numpy()
    iou = result.per_ship["iou"].to_numpy()
    passed = result.per_ship["recall"].to_numpy()
    rows = []
    for label, lo, hi in zip(labels, bounds[:-1], bounds[1:]):
        inside = (area >= lo) & (area < hi)
        count = int(inside.sum())
        rows.append({"size": label, "n_ships": count,
                     "recall_50": float((iou[inside] > IOU_THRESHOLDS[0]).mean()) if count else float("nan"),
                     "recall": float(passed[inside].mean()) if count else float("nan")})
    return pd.DataFrame(rows)


def f2_by_image_type(result: ScoreResult) -> pd.DataFrame:
    """Mean F2 of ship-free images and of images with ships: columns images, n_images, f2."""
    rows = []
    for label, selected in (("ship-free", result.per_image["n_true"] == 0),
                            ("with ships", result.per_image["n_true"] > 0)):
        part = result.per_image.loc[selected, "f2"]
        rows.append({"images": label, "n_images": int(part.size),
                     "f2": float(part.mean()) if part.size else float("nan")})
    return pd.DataFrame(rows)


def format_score_report(result: ScoreResult) -> str:
    """A human-readable report; its last line is ``F2 <value>`` (what `module_submit.py score` prints)."""
    per_image = result.per_image
    lines = [
        f"images: {len(per_image)} ({int((per_image['n_true'] > 0).sum())} with ships), "
        f"true ships: {int(per_image['n_true'].sum())}, predicted masks: {int(per_image['n_pred'].sum())}",
        "",
        "per IoU threshold (TP/FP/FN summed over images; F2 averaged over images):",
        result.per_threshold.assign(threshold=[f"{t:.2f}" for t in result.per_threshold["threshold"]])
        .to_string(index=False, float_format=lambda v: f"{v:.4f}"),
        "",
        "by image type:",
        f2_by_image_type(result).to_string(index=False, float_format=lambda v: f"{v:.4f}"),
        "",
        "recall by ship size (px):",
        recall_by_size(result).to_string(index=False, float_format=lambda v: f"{v:.4f}"),
        "",
        f"F2 {result.f2:.5f}",
    ]
    return "\n".join(lines)


def score_to_json(result: ScoreResult) -> dict:
    """A JSON-ready dict: f2, per_threshold, by_image_type, recall_by_size, per_image (a list of
    {ImageId, f2, n_true, n_pred})."""

    def records(frame: pd.DataFrame) -> list[dict]:
        return [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
                for row in frame.to_dict(orient="records")]

    def plain(frame: pd.DataFrame) -> pd.DataFrame:
        # numpy scalars are not JSON-serialisable; .tolist() per column gives Python ones.
        return pd.DataFrame({c: pd.Series(frame[c].tolist(), dtype=object) for c in frame.columns})

    return {
        "f2": result.f2,
        "n_images": int(len(result.per_image)),
        "per_threshold": records(plain(result.per_threshold)),
        "by_image_type": records(plain(f2_by_image_type(result))),
        "recall_by_size": records(plain(recall_by_size(result))),
        "per_image": records(plain(result.per_image)),
    }
