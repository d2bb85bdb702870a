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
    errors: the error report (`get_error_report`, no gate data), when `score_submission` was given
        size-bucket edges; else None.
    """

    f2: float
    per_image: pd.DataFrame
    per_threshold: pd.DataFrame
    per_ship: pd.DataFrame
    errors: "ErrorReport | None" = None


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
    size_edges: Sequence[float] | None = None,
) -> ScoreResult:
    """Score a Kaggle submission against ground truth (both ``ImageId,EncodedPixels``, path or DataFrame).

    shape: (H, W) of the images; runs past H*W are an error (IoU itself needs no shape).
    missing: truth ImageIds absent from the submission are an "error" (as on Kaggle), or
        count as predicted "empty".
    check_overlaps: overlapping predicted masks in one image are an error, as on Kaggle.
    size_edges: also build the error report (``errors``) with these size buckets (px at 768 x 768).
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
    outcomes = []
    # Only images with ships on both sides need IoU; the others' counts follow from n_true, n_pred.
    for i, image_id in enumerate(image_ids):
        if image_id in busy_rows:
            _check_no_overlap(image_id, busy_rows[image_id], shape)
        true_coco, pred_coco = true_by_image.get(image_id, []), pred_by_image.get(image_id, [])
        iou = _coco_iou(true_coco, pred_coco)  # (0, n) or (n, 0) without a decode when a side is empty
        if size_edges is not None:
            outcomes.append(get_image_outcome(image_id, iou, mask_util.area(true_coco) if true_coco else [],
                                              mask_util.area(pred_coco) if pred_coco else [], shape))
        if n_true[i] == 0:
            continue
        matched = match_greedy(iou) if n_pred[i] else np.zeros(n_true[i])
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
    errors = get_error_report(outcomes, size_edges, gate_known=False) if size_edges is not None else None
    return ScoreResult(f2=f2, per_image=per_image, per_threshold=per_threshold, per_ship=per_ship, errors=errors)


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
        *([format_error_report(result.errors), ""] if result.errors is not None else []),
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
        **({"errors": error_report_to_json(result.errors)} if result.errors is not None else {}),
    }


# ---------------------------------------------------------------- the error report
# What happened to each true ship and to each prediction, at IoU 0.5 (the first threshold). Every
# true ship gets one of the ship kinds, every prediction one of the prediction kinds; where more
# than one applies, the first in this order wins. The error report counts them.
ERROR_KINDS = {
    "matched": "matched at IoU > 0.5",
    "gate_removed": "ships the gate removed",
    "missed": "ships the detector missed",
    "low_iou": "matches below IoU 0.5",
    "merged": "one prediction covering two ships",
    "split": "one ship split in two",
    "false_ship_free": "false ships on ship-free tiles",
    "false_beside_ships": "false ships on tiles with ships",
}
SHIP_KINDS = ("matched", "gate_removed", "merged", "split", "low_iou", "missed")  # in order of precedence
PREDICTION_KINDS = ("matched", "false_ship_free", "merged", "split", "low_iou", "false_beside_ships")
# A prediction "covers" a ship when at least this share of the ship's pixels is in it, and lies
# "inside" a ship when at least this share of its own pixels is in the ship: a prediction covering
# two ships is a merge, two predictions inside one ship are a split.
COVER_FRACTION = 0.5
# The size buckets' edges are mask areas in px of a Kaggle tile (768 x 768); for other image
# sizes they scale with the image's area, as the ships of module_synthetic do.
SIZE_REFERENCE_AREA = KAGGLE_SHAPE[0] * KAGGLE_SHAPE[1]


def scale_size_edges(edges: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """Size-bucket edges given in px of a 768 x 768 tile -> px of an ``(H, W)`` image (by area)."""
    return np.asarray(edges, dtype=np.float64) * (float(shape[0]) * float(shape[1]) / SIZE_REFERENCE_AREA)


def get_size_buckets(areas, edges: Sequence[float], shape: tuple[int, int]) -> np.ndarray:
    """The size bucket (0 .. len(edges)) of each mask area (px) of an ``(H, W)`` image.

    Bucket k holds areas in [edge k-1, edge k) after :func:`scale_size_edges`: with edges
    (100, 1000) at 768 x 768, 99 px is bucket 0, 100 px bucket 1, 1000 px bucket 2.
    """
    return np.searchsorted(scale_size_edges(edges, shape), np.asarray(areas, dtype=np.float64),
                           side="right").astype(np.int64)


def get_size_labels(edges: Sequence[float]) -> list[str]:
    """Names of the buckets of ``edges`` (px at 768 x 768): "small <100 px", "medium 100-1000 px", ..."""
    if not len(edges):
        return ["all sizes"]
    bounds = [f"<{edges[0]:g}"] + [f"{lo:g}-{hi:g}" for lo, hi in zip(edges[:-1], edges[1:])] + [f">={edges[-1]:g}"]
    names = {1: ("small", "large"), 2: ("small", "medium", "large")}.get(len(edges))
    return [f"{name} {bound} px" for name, bound in zip(names, bounds)] if names else [f"{b} px" for b in bounds]


def match_pairs(iou: np.ndarray, min_iou: float = IOU_THRESHOLDS[0]) -> tuple[np.ndarray, np.ndarray]:
    """The matched IoU of each true mask and of each prediction (0.0: unmatched), by `match_greedy`'s rule.

    iou: (n_true, n_pred). Returns ``(true_iou (n_true,), pred_iou (n_pred,))`` float64.
    """
    iou = np.asarray(iou, dtype=np.float64)
    true_iou, pred_iou = np.zeros(iou.shape[0]), np.zeros(iou.shape[1])
    true_idx, pred_idx = np.nonzero(iou > min_iou)
    values = iou[true_idx, pred_idx]
    for k in np.lexsort((pred_idx, true_idx, -values)):
        t, p = true_idx[k], pred_idx[k]
        if true_iou[t] == 0.0 and pred_iou[p] == 0.0:
            true_iou[t] = pred_iou[p] = values[k]
    return true_iou, pred_iou


@dataclasses.dataclass
class ImageOutcome:
    """One image's ships and predictions, each with its kind (`ERROR_KINDS`), matched IoU and area."""

    image_id: str
    shape: tuple[int, int]  # (H, W): size buckets scale with the image's area
    true_kind: np.ndarray  # (n_true,) str, one of SHIP_KINDS
    pred_kind: np.ndarray  # (n_pred,) str, one of PREDICTION_KINDS
    true_iou: np.ndarray  # (n_true,) IoU of the ship's match (0.0: none)
    pred_iou: np.ndarray  # (n_pred,) IoU of the prediction's match (0.0: none)
    true_area: np.ndarray  # (n_true,) px
    pred_area: np.ndarray  # (n_pred,) px
    gated_out: bool = False  # the gate kept the image from the detector (None-like False when unknown)

    def counts(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """TP, FP, FN at each of `IOU_THRESHOLDS` (three (10,) int64 arrays)."""
        return counts_from_matches(self.true_iou, len(self.pred_iou))

    @property
    def f2(self) -> float:
        """The image's competition F2."""
        return float(f2_from_counts(*self.counts()).mean())


def get_image_outcome(image_id: str, iou: np.ndarray, true_area, pred_area, shape: tuple[int, int],
                      gated_out: bool = False) -> ImageOutcome:
    """Name what happened to each ship and each prediction of one image (the error report's unit).

    iou: (n_true, n_pred); true_area, pred_area: mask areas (px); ``gated_out``: the classifier
    gate kept the image from the detector (it must then have no prediction). Ships, in order of
    precedence: matched (IoU > 0.5, one-to-one as the metric matches), gate_removed, merged (not
    matched, and covered by a prediction that covers another ship too), split (two or more
    predictions lie inside it), low_iou (some prediction overlaps it), missed (none touches it).
    Predictions: matched, false_ship_free (the image has no ship), merged (covers two or more
    ships), split (lies inside a ship that two or more predictions lie inside), low_iou (overlaps a
    ship), false_beside_ships (touches no ship). "Covers" and "inside" are `COVER_FRACTION` of the
    ship's and of the prediction's pixels; intersections follow from IoU and the two areas.
    """
    iou = np.asarray(iou, dtype=np.float64).reshape(len(true_area), len(pred_area))
    true_area, pred_area = np.asarray(true_area, np.float64), np.asarray(pred_area, np.float64)
    n_true, n_pred = iou.shape
    if gated_out and n_pred:
        raise ValueError(f"{image_id}: an image the gate removed cannot have {n_pred} predictions")
    true_iou, pred_iou = match_pairs(iou)
    true_kind = np.where(true_iou > 0, "matched", "gate_removed" if gated_out else "missed").astype(object)
    pred_kind = np.where(pred_iou > 0, "matched", "false_ship_free" if n_true == 0 else "false_beside_ships")
    pred_kind = pred_kind.astype(object)
    if n_true and n_pred:
        # inter = IoU (a + b) / (1 + IoU); the tolerance keeps exact halves exact.
        inter = iou * (true_area[:, None] + pred_area[None, :]) / (1.0 + iou)
        touches = inter > 0
        covers = touches & (inter >= COVER_FRACTION * true_area[:, None] - 1e-9)
        inside = touches & (inter >= COVER_FRACTION * pred_area[None, :] - 1e-9)
        merging = covers.sum(axis=0) >= 2  # (n_pred,)
        split = inside.sum(axis=1) >= 2  # (n_true,)
        for t in np.flatnonzero(true_iou == 0):
            true_kind[t] = ("merged" if (covers[t] & merging).any() else "split" if split[t]
                            else "low_iou" if touches[t].any() else "missed")
        for p in np.flatnonzero(pred_iou == 0):
            pred_kind[p] = ("merged" if merging[p] else "split" if (inside[:, p] & split).any()
                            else "low_iou" if touches[:, p].any() else "false_beside_ships")
    return ImageOutcome(str(image_id), (int(shape[0]), int(shape[1])), true_kind, pred_kind, true_iou, pred_iou,
                        true_area, pred_area, bool(gated_out))


def prevalence_mean(values, has_ships, empty_fraction: float | None = None) -> float:
    """Mean of per-image ``values``, the ship-free images weighted to carry ``empty_fraction`` of it.

    ``empty_fraction`` None: the plain mean (the sample's own prevalence). A kind of image the
    sample lacks cannot be reweighted: the plain mean then too.
    """
    values, has_ships = np.asarray(values, dtype=np.float64), np.asarray(has_ships, dtype=bool)
    if empty_fraction is None or has_ships.all() or not has_ships.any():
        return float(values.mean()) if values.size else float("nan")
    return float(empty_fraction * values[~has_ships].mean() + (1 - empty_fraction) * values[has_ships].mean())


@dataclasses.dataclass
class ErrorReport:
    """Where the score is lost: what `get_error_report` returns.

    failures: one row per `ERROR_KINDS` kind: kind, description, ships, predictions, images (the
        ship and prediction columns each add up to all ships / all predictions; images: those with
        at least one of the kind; NaN where the kind cannot be told, e.g. the gate without gate data).
    per_threshold: threshold, tp, fp, fn (summed over images).
    by_size: one row per size bucket: size, n_ships, n_predictions, recall_50 (ships matched at IoU
        > 0.5), f2 (pooled over images: ships by their area, unmatched predictions by theirs;
        5 TP / (5 TP + 4 FN + FP) at each threshold, averaged over thresholds).
    ceilings: case, f2 (and f2_target when a target prevalence was given), note.
    f2: the competition F2 of the outcomes.
    """

    failures: pd.DataFrame
    per_threshold: pd.DataFrame
    by_size: pd.DataFrame
    ceilings: pd.DataFrame
    f2: float


def get_error_report(outcomes: Sequence[ImageOutcome], edges: Sequence[float], gate_known: bool = True,
                     oracle_f2=None, empty_fraction: float | None = None) -> ErrorReport:
    """The error report of per-image outcomes (:func:`get_image_outcome`).

    edges: size-bucket edges (px at 768 x 768, scaled per image by :func:`scale_size_edges`).
    gate_known: whether ``gated_out`` is known (False for a submission file: "gate_removed" is then
        NaN, and ships the gate removed count as missed).
    oracle_f2: per image, the F2 of the detector alone (no gate) at the same thresholds: the
        oracle-gate ceiling lets it through on ship images only. None: each image's own F2 stands
        in on ship images (a lower bound: ships the gate removed stay lost).
    empty_fraction: also give the ceilings at this share of ship-free images (``f2_target``).
    """
    outcomes = list(outcomes)
    edges = list(edges)
    labels = get_size_labels(edges)
    true_kind = np.concatenate([o.true_kind for o in outcomes]) if outcomes else np.zeros(0, object)
    pred_kind = np.concatenate([o.pred_kind for o in outcomes]) if outcomes else np.zeros(0, object)
    rows = []
    for kind, description in ERROR_KINDS.items():
        ships = int((true_kind == kind).sum()) if kind in SHIP_KINDS else 0
        predictions = int((pred_kind == kind).sum()) if kind in PREDICTION_KINDS else 0
        images = sum(1 for o in outcomes if (o.true_kind == kind).any() or (o.pred_kind == kind).any())
        row = {"kind": kind, "description": description, "ships": ships, "predictions": predictions, "images": images}
        if kind == "gate_removed" and not gate_known:
            row.update(ships=np.nan, images=np.nan)
        if kind == "missed" and not gate_known:
            row["description"] = "ships missed (by the gate or the detector)"
        rows.append(row)
    failures = pd.DataFrame(rows).astype({"ships": "float64", "images": "float64"})
    failures["predictions"] = failures["predictions"].astype(np.int64)
    if gate_known:
        failures = failures.astype({"ships": np.int64, "images": np.int64})

    counts = [o.counts() for o in outcomes]
    tp, fp, fn = (np.sum([c[k] for c in counts], axis=0) if counts else np.zeros(len(IOU_THRESHOLDS), np.int64)
                  for k in range(3))
    per_threshold = pd.DataFrame({"threshold": IOU_THRESHOLDS, "tp": tp, "fp": fp, "fn": fn})

    n_buckets = len(edges) + 1
    ship_tp, ship_n = np.zeros((n_buckets, len(IOU_THRESHOLDS))), np.zeros(n_buckets)
    pred_fp, pred_n = np.zeros((n_buckets, len(IOU_THRESHOLDS))), np.zeros(n_buckets)
    ship_50 = np.zeros(n_buckets)
    for o in outcomes:
        for bucket, matched in zip(get_size_buckets(o.true_area, edges, o.shape), o.true_iou):
            ship_n[bucket] += 1
            ship_tp[bucket] += matched > _THRESHOLDS
            ship_50[bucket] += matched > IOU_THRESHOLDS[0]
        for bucket, matched in zip(get_size_buckets(o.pred_area, edges, o.shape), o.pred_iou):
            pred_n[bucket] += 1
            pred_fp[bucket] += ~(matched > _THRESHOLDS)
    by_size_f2 = [float(f2_from_counts(ship_tp[b], pred_fp[b], ship_n[b] - ship_tp[b]).mean())
                  if ship_n[b] + pred_n[b] else float("nan") for b in range(n_buckets)]
    by_size = pd.DataFrame({"size": labels, "n_ships": ship_n.astype(np.int64), "n_predictions": pred_n.astype(np.int64),
                            "recall_50": np.where(ship_n > 0, ship_50 / np.maximum(ship_n, 1), np.nan),
                            "f2": by_size_f2})

    image_f2 = np.array([o.f2 for o in outcomes])
    has_ships = np.array([len(o.true_kind) > 0 for o in outcomes], dtype=bool)
    passed = None if not gate_known else np.array([not o.gated_out for o in outcomes], dtype=bool)
    ceilings = get_ceilings(image_f2, has_ships, oracle_f2=oracle_f2, passed=passed, empty_fraction=empty_fraction)
    return ErrorReport(failures, per_threshold, by_size, ceilings,
                       float(image_f2.mean()) if len(image_f2) else float("nan"))


def get_ceilings(image_f2, has_ships, oracle_f2=None, passed=None, empty_fraction: float | None = None) -> pd.DataFrame:
    """What the score would be with a perfect part: columns case, f2 (, f2_target), note.

    image_f2: each image's F2 as predicted; has_ships: whether it has true ships; oracle_f2: each
    image's F2 with the detector alone (None: ``image_f2`` stands in, a lower bound); passed:
    whether the gate let it through (None: unknown, no perfect-detector figure).
    Cases: as predicted; all empty (no ship anywhere); oracle gate (a perfect gate in front of the
    same detector: ship-free images empty, ship images get the detector's output); perfect
    detector behind the same gate (images through the gate scored 1, ship images gated out 0).
    """
    image_f2, has_ships = np.asarray(image_f2, np.float64), np.asarray(has_ships, bool)
    detector = image_f2 if oracle_f2 is None else np.asarray(oracle_f2, np.float64)
    cases = [("as predicted", image_f2, ""),
             ("all empty", (~has_ships).astype(np.float64), "no ship predicted anywhere"),
             ("oracle gate", np.where(has_ships, detector, 1.0),
              "a perfect gate in front of the same detector" if oracle_f2 is not None else
              "ship-free images left empty (a lower bound: gated-out ships stay lost)"),
             ("perfect detector", None if passed is None else np.where(np.asarray(passed, bool) | ~has_ships, 1.0, 0.0),
              "behind the same gate" if passed is not None else "needs the gate's decisions")]
    rows = []
    for case, values, note in cases:
        row = {"case": case, "f2": prevalence_mean(values, has_ships) if values is not None else float("nan")}
        if empty_fraction is not None:
            row["f2_target"] = (prevalence_mean(values, has_ships, empty_fraction) if values is not None
                                else float("nan"))
        rows.append({**row, "note": note})
    return pd.DataFrame(rows)


def format_error_report(report: ErrorReport) -> str:
    """The error report as text: failures by kind, F2 by ship size, the ceilings."""
    number = lambda v: f"{v:.4f}"  # noqa: E731
    failures = report.failures[["description", "ships", "predictions", "images"]].rename(
        columns={"description": "kind"})
    return "\n".join([
        "failures by kind (at IoU 0.5; each ship and each prediction counted once):",
        failures.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.0f}"),
        "",
        "F2 by ship size (pooled over images; px of a 768 x 768 tile):",
        report.by_size.to_string(index=False, na_rep="-", float_format=number),
        "",
        "ceilings:",
        report.ceilings.to_string(index=False, na_rep="-", float_format=number),
    ])


def error_report_to_frame(report: ErrorReport) -> pd.DataFrame:
    """Every figure of the report in one long table: section, item, measure, value (for a CSV)."""
    rows = []
    for _, row in report.failures.iterrows():
        rows += [("failures", row["kind"], m, row[m]) for m in ("ships", "predictions", "images")]
    for _, row in report.per_threshold.iterrows():
        rows += [("per_threshold", f"{row['threshold']:.2f}", m, row[m]) for m in ("tp", "fp", "fn")]
    for _, row in report.by_size.iterrows():
        rows += [("by_size", row["size"], m, row[m]) for m in ("n_ships", "n_predictions", "recall_50", "f2")]
    for _, row in report.ceilings.iterrows():
        rows += [("ceilings", row["case"], m, row[m]) for m in ("f2", "f2_target") if m in row]
    rows.append(("total", "all", "f2", report.f2))
    return pd.DataFrame(rows, columns=["section", "item", "measure", "value"])


def error_report_to_json(report: ErrorReport) -> dict:
    """A JSON-ready dict of the report: f2, failures, per_threshold, by_size, ceilings."""
    def records(frame: pd.DataFrame) -> list[dict]:
        out = []
        for row in frame.to_dict(orient="records"):
            out.append({k: (None if isinstance(v, float) and math.isnan(v) else
                            v.item() if isinstance(v, np.generic) else v) for k, v in row.items()})
        return out

    return {"f2": report.f2, "failures": records(report.failures), "per_threshold": records(report.per_threshold),
            "by_size": records(report.by_size), "ceilings": records(report.ceilings)}
