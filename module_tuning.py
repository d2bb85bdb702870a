"""Threshold tuning on the validation split: for the test set's share of ship-free images, with a
no-harm guard against predicting nothing, optional size-aware score thresholds, and an error report.

The library the notebook calls (``module_submit.py tune`` is its command line)::

    tuned = tune_thresholds(cfg, val_dicts, train_dicts=train_dicts)   # -> runs/<run>/submission/thresholds.yaml
    tuned.thresholds, tuned.target_f2, tuned.guard, tuned.errors       # what was chosen, and why

How a choice is made, step by step (:func:`tune` on a cache of model outputs):

1. **One model pass** (:func:`collect_tune_cache`): the classifier and the ungated detector run
   once over the validation images; every detection above the grid's lowest score is kept
   (:class:`TuneImage`), so any threshold can be evaluated without a model.
2. **Per-image F2 of every setting** (:func:`sweep_thresholds`): classifier threshold x score
   threshold x minimum area (the ``SUBMIT.TUNE_*`` grids); an image the gate keeps from the
   detector scores 1 when ship-free and 0 otherwise. Detections go through the very thresholds
   and overlap removal of prediction (``module_inference.apply_thresholds``).
3. **The target's share of ship-free images** (``SUBMIT.TARGET_EMPTY_FRACTION``; -1: the training
   split's): each setting's F2 is ``share * mean F2 over ship-free images + (1 - share) * mean F2
   over ship images`` (:func:`target_mean`), and predicting no ship at all scores ``share``.
4. **The no-harm guard** (``SUBMIT.GUARD_*``, :func:`choose_thresholds`): a seeded Bayesian
   bootstrap of the validation images, ``GUARD_BOOTSTRAP`` resamples, ship-free and ship images
   weighted apart (the target share fixes the kinds' shares), each kind with one pessimistic
   pseudo-image (:data:`PRIOR_WEIGHT`: a false ship never seen on validation is not taken as
   impossible). One matrix of weights makes every setting's resampled F2 one matrix product
   (:func:`bootstrap_target_f2`). Eligible: settings whose gain over all-empty stays > 0 at the
   ``GUARD_CONFIDENCE`` lower bound; the best expected F2 among them wins. None eligible: the
   most conservative setting still no worse than all-empty on validation (the fewest images
   with a predicted ship), or no ship at all (:data:`NO_SHIP_SCORE`); the log and
   thresholds.yaml say so. Fewer than two images of a kind that carries weight is too little to
   resample: the guard then fails by rule.
5. **Size-aware score thresholds** (``SUBMIT.TUNE_SIZE_AWARE``): one score threshold per size
   bucket (``SUBMIT.SIZE_BUCKET_EDGES``), every combination of the score grid with every minimum
   area, behind the chosen gate; kept only when the gain over the single threshold clears the
   same lower bound (:func:`choose_size_thresholds`).
6. **The scene gate** (:func:`get_scene_gate`): for ``module_detect``, the p_ship of every true
   ship the detector finds at the chosen thresholds, ungated, as the scene gate computes it (one
   pass with ``DETECT.GATE_TTA False``, the default; the submission's gate averages flips with
   ``CLASSIFIER.TTA``); scenes are gated at the highest
   threshold keeping ``DETECT.GATE_SHIP_RECALL`` of them (``module_inference.get_scene_thresholds``).
7. **Files** into the run folder: thresholds.yaml (:func:`write_thresholds`), the grids as CSV, the
   F2 curves at both shares (``module_plots.plot_tune_prevalence``), the error report of the
   choice (``module_metric.get_error_report``: table and picture) and overlays.

Masks are ``(N, H, W)`` bool arrays in image pixel order (row, column); cached masks are COCO RLE.

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import math
import pickle
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import yaml
from tqdm.auto import tqdm

import module_config
import module_inference
import module_metric
import module_plots
from module_config import get_plot_path, get_submission_path
from module_files import atomic_path, read_image
from module_inference import (DetectFn, PShipFn, Thresholds, build_detect_fn, build_p_ship_fn,
                              get_default_weights_path, resolve_overlaps)
from module_progress import ProgressReporter
from module_rle import coco_to_masks, masks_to_coco

logger = logging.getLogger(__name__)

# A callable reading one image file -> (H, W, 3) uint8 RGB; raises on a corrupt file.
LoadImageFn = Callable[[Path], np.ndarray]
# The score threshold of "no ship at all": above every detection score (scores are <= 1).
NO_SHIP_SCORE = math.inf
# The bootstrap needs at least this many images of a kind (ship-free, with ships) that carries
# weight at the target share: one image has no spread to resample.
MIN_IMAGES_PER_KIND = 2
# The guard's prior: besides its validation images, each kind of image gets one pessimistic
# pseudo-image at half an image's weight (Jeffreys' prior for a rate): a ship-free tile on which
# every setting predicts a false ship, and a ship tile on which every setting misses. A failure
# never seen on validation (no false ship on n ship-free tiles) then still weighs about 1/(2n)
# instead of nothing: it decides at high shares of ship-free images, and fades on large splits.
PRIOR_WEIGHT = 0.5
# A candidate's gain on the two pseudo-images, over all-empty or over the setting it would replace:
# it puts a false ship on the ship-free tile (-1), and gains nothing on the ship tile (0).
GAIN_ON_PSEUDO = (-1.0, 0.0)
GRID_COLUMNS = ["classifier_threshold", "score_threshold", "min_area"]


# ============================================================================ the cache of model outputs
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
    # p_ship as module_detect's scene gate computes it (DETECT.GATE_TTA) where that differs from
    # CLASSIFIER.TTA, the submission's; NaN: the same as p_ship (see scene_p_ship)
    gate_p_ship: float = math.nan

    @classmethod
    def from_masks(cls, image_id: str, file_name: str, p_ship: float, pred_masks: np.ndarray,
                   scores: np.ndarray, true_masks: np.ndarray) -> "TuneImage":
        """From ``(N, H, W)`` predicted and ``(M, H, W)`` true bool masks of one image."""
        shape = tuple(int(v) for v in (pred_masks if len(pred_masks) else true_masks).shape[1:])
        return cls(image_id, file_name, float(p_ship), masks_to_coco(np.asarray(pred_masks, bool)),
                   np.asarray(scores, dtype=np.float32), masks_to_coco(np.asarray(true_masks, bool)), shape)

    @property
    def has_ships(self) -> bool:
        return len(self.true_rles) > 0

    @property
    def scene_p_ship(self) -> float:
        """The p_ship the scene gate sees: ``gate_p_ship`` where recorded, else ``p_ship``."""
        gate_p_ship = getattr(self, "gate_p_ship", math.nan)  # caches pickled before the field have none
        return self.p_ship if math.isnan(gate_p_ship) else gate_p_ship

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
                       progress: bool = True, progress_path: Path | None = None,
                       gate_p_ship_fn: PShipFn | None = None) -> list[TuneImage]:
    """Run the classifier and the (ungated) detector once over validation dataset dicts.

    Every image goes through the detector, so that any classifier threshold can be evaluated
    afterwards without a model; detections below ``min_score`` (the lowest score threshold of
    the grid) are not kept. ``p_ship_fn`` None: p_ship is 1 for every image. ``gate_p_ship_fn``:
    the scene gate's p_ship (:attr:`TuneImage.gate_p_ship`), where it is computed otherwise (flip
    TTA or not). Truth comes from the dicts' ``annotations`` (COCO RLE ``segmentation``).
    """
    paths = [Path(d["file_name"]) for d in dicts]
    p_ship = (np.asarray(p_ship_fn(paths), dtype=np.float64) if p_ship_fn is not None and paths
              else np.ones(len(paths)))
    gate_p_ship = (np.asarray(gate_p_ship_fn(paths), dtype=np.float64) if gate_p_ship_fn is not None and paths
                   else np.full(len(paths), np.nan))
    cache: list[TuneImage] = []
    bar = tqdm(total=len(dicts), unit="img", desc="tune: detect", disable=not progress)
    reporter = ProgressReporter(progress_path, "tuning: both models on the validation split", len(dicts), "image")
    for start in range(0, len(dicts), batch_size):
        batch = list(dicts[start:start + batch_size])
        outputs = detect_fn([load_image(Path(d["file_name"])) for d in batch])
        for k, (record, output) in enumerate(zip(batch, outputs)):
            scores = np.asarray(output["scores"], dtype=np.float32)
            keep = scores >= min_score
            cache.append(TuneImage(str(record["image_id"]), str(record["file_name"]), float(p_ship[start + k]),
                                   masks_to_coco(np.asarray(output["masks"], dtype=bool)[keep]), scores[keep],
                                   [a["segmentation"] for a in record.get("annotations", [])],
                                   (int(record["height"]), int(record["width"])), float(gate_p_ship[start + k])))
        bar.update(len(batch))
        reporter.update(done=bar.n)
    bar.close()
    return cache


def _cache_fingerprint(*paths: Path | None) -> str:
    digest = hashlib.sha256()
    for path in paths:
        if path is not None:
            stat = Path(path).stat()
            digest.update(f"{Path(path).resolve()}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()


def _inference_key(cfg) -> str:
    """The settings that change the models' outputs for the same weights: part of a cache's key."""
    return str([cfg.SUBMIT.TTA, cfg.SUBMIT.MERGE_IOS, cfg.SUBMIT.MERGE_MIN_SCORE, cfg.CLASSIFIER.TTA,
                cfg.CLASSIFIER.PRECISION, cfg.DETECTOR.TEST_SIZE, cfg.DETECT.GATE_TTA])


# ============================================================================ per-image F2 of every setting
def keep_by_score(scores: np.ndarray, areas: np.ndarray, score_setting: Sequence[float], edges: Sequence[float],
                  shape: tuple[int, int]) -> np.ndarray:
    """Which detections pass the score threshold(s): ``(N,)`` bool.

    ``score_setting``: one threshold, or one per size bucket of ``edges`` (by each mask's
    ``areas`` in an ``(H, W)`` image), exactly as ``module_inference.Thresholds`` applies them.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if len(score_setting) == 1:
        return scores >= np.float32(score_setting[0])
    thresholds = Thresholds(0.0, 0.0, 0, tuple(score_setting), tuple(edges))
    return scores >= thresholds.get_score_thresholds(areas, shape).astype(np.float32)


def kept_masks(image: TuneImage, pred: np.ndarray, thresholds: Thresholds) -> np.ndarray:
    """The detector's masks of ``image`` a prediction keeps at ``thresholds``, the gate left out.

    ``pred``: its decoded ``(N, h, w)`` masks (cropped or not: areas are the same). Matches
    ``module_inference.apply_thresholds`` on the full-size masks.
    """
    if not len(pred):
        return pred
    setting = thresholds.score_by_size or (thresholds.score,)
    keep = keep_by_score(image.scores, pred.sum(axis=(1, 2)), setting, thresholds.size_edges, image.shape)
    return resolve_overlaps(pred[keep], image.scores[keep], score_threshold=-np.inf,
                            min_area=thresholds.min_area)[0]


def sweep_detector(cache: Sequence[TuneImage], score_settings: Sequence[Sequence[float]], min_areas: Sequence[int],
                   edges: Sequence[float] = (), progress: bool = True,
                   dtype=np.float64) -> tuple[np.ndarray, np.ndarray]:
    """Per-image F2 of the detector alone (no gate) at every (score setting, minimum area).

    ``score_settings``: each one threshold, or one per size bucket of ``edges``. Columns run over
    settings, then minimum areas. Each image is decoded once; each distinct set of detections
    passing the score threshold(s) is made overlap-free once (a minimum area only drops masks
    afterwards: pixels of a dropped mask stay taken, as in ``resolve_overlaps``) and its IoU with
    the truth computed once. Returns ``(f2 (n_images, n_columns) of ``dtype``, predicts (n_images,
    n_columns) bool: at least one mask kept)``.
    """
    min_areas = [int(a) for a in min_areas]
    settings = np.asarray([tuple(setting) for setting in score_settings], dtype=np.float32)  # (S, 1 or buckets)
    if settings.ndim != 2 or settings.shape[1] not in (1, len(edges) + 1):
        raise ValueError(f"score settings must all have 1 or {len(edges) + 1} thresholds, got shape {settings.shape}")
    n_columns = len(settings) * len(min_areas)
    f2 = np.repeat(np.array([0.0 if c.has_ships else 1.0 for c in cache], dtype=dtype)[:, None], n_columns, axis=1)
    predicts = np.zeros((len(cache), n_columns), dtype=bool)
    for k, image in enumerate(tqdm(cache, desc="tune: sweep", unit="img", disable=not progress)):
        if not len(image.pred_rles):
            continue
        pred, true, _ = image.decode()
        if settings.shape[1] == 1:
            thresholds = np.broadcast_to(settings, (len(settings), len(pred)))
        else:  # each detection's bucket, by its area as predicted (keep_by_score's rule)
            thresholds = settings[:, module_metric.get_size_buckets(pred.sum(axis=(1, 2)), edges, image.shape)]
        # Which detections pass, for every setting at once; each distinct set is resolved once.
        kept_sets, which = np.unique(image.scores[None, :] >= thresholds, axis=0, return_inverse=True)
        outcome = np.zeros((len(kept_sets), len(min_areas)), dtype=np.float64)
        predicting = np.zeros((len(kept_sets), len(min_areas)), dtype=bool)
        for u, keep in enumerate(kept_sets):
            kept = resolve_overlaps(pred[keep], image.scores[keep], score_threshold=-np.inf)[0]
            iou = module_metric.iou_masks(true, kept) if len(true) and len(kept) else np.zeros((len(true), len(kept)))
            kept_areas = kept.sum(axis=(1, 2))
            for m, min_area in enumerate(min_areas):
                selected = kept_areas >= max(min_area, 1)
                predicting[u, m] = selected.any()
                outcome[u, m] = module_metric.f2_from_iou(iou[:, selected]) if selected.any() else (
                    0.0 if image.has_ships else 1.0)
        f2[k] = outcome[np.ravel(which)].ravel()
        predicts[k] = predicting[np.ravel(which)].ravel()
    return f2, predicts


def apply_gate(detector_values: np.ndarray, p_ship: np.ndarray, gated_value: np.ndarray,
               classifier_thresholds: Sequence[float]) -> np.ndarray:
    """``(n_images, len(classifier_thresholds) * n_columns)``: per classifier threshold, the
    detector's value where ``p_ship >= threshold`` (NaN never passes), else ``gated_value``."""
    blocks = []
    for threshold in classifier_thresholds:
        passed = (np.asarray(p_ship) >= threshold)[:, None]
        blocks.append(np.where(passed, detector_values, np.asarray(gated_value)[:, None]))
    return np.concatenate(blocks, axis=1) if blocks else detector_values[:, :0]


@dataclasses.dataclass
class Sweep:
    """Every setting of a grid with each validation image's F2 under it."""

    grid: pd.DataFrame  # one row per setting (classifier_threshold, score_threshold, min_area, f2, ...)
    f2: np.ndarray  # (n_images, n_settings) float64: each image's F2 under each setting
    predicts: np.ndarray  # (n_images, n_settings) bool: the setting predicts a ship on the image
    detector_f2: np.ndarray  # (n_images, n_score x n_min_area): the detector alone, no gate
    has_ships: np.ndarray  # (n_images,) bool


def sweep_thresholds(cache: Sequence[TuneImage], classifier_thresholds: Sequence[float],
                     score_thresholds: Sequence[float], min_areas: Sequence[int], progress: bool = True) -> Sweep:
    """Each image's F2 at every (classifier, score, min area) combination.

    An image with ``p_ship < classifier threshold`` gets no prediction (F2 1 if ship-free, else
    0); otherwise its cached detections go through the score threshold, overlap removal and the
    minimum area (:func:`sweep_detector`). ``grid`` is in grid order (classifier, then score, then
    min area) with ``f2`` the mean over images (the validation split's own share of ship-free images).
    """
    if not len(cache):
        raise ValueError("no validation images to tune on")
    has_ships = np.array([c.has_ships for c in cache])
    p_ship = np.array([c.p_ship for c in cache])
    detector_f2, detector_predicts = sweep_detector(cache, [(float(s),) for s in score_thresholds], min_areas,
                                                    progress=progress)
    f2 = apply_gate(detector_f2, p_ship, (~has_ships).astype(np.float64), classifier_thresholds)
    predicts = apply_gate(detector_predicts, p_ship, np.zeros(len(cache), bool), classifier_thresholds)
    grid = pd.DataFrame([(float(c), float(s), int(a)) for c in classifier_thresholds for s in score_thresholds
                         for a in min_areas], columns=GRID_COLUMNS)
    grid["f2"] = f2.mean(axis=0)
    return Sweep(grid, f2, predicts, detector_f2, has_ships)


# ============================================================================ the target share and the bootstrap
def target_mean(values: np.ndarray, has_ships: np.ndarray, empty_fraction: float | None) -> np.ndarray:
    """Column means of ``(n_images, k)`` per-image values with the ship-free images carrying
    ``empty_fraction`` of the weight (None: the plain mean): ``module_metric.prevalence_mean`` per column."""
    values = np.asarray(values)
    if empty_fraction is None or has_ships.all() or not has_ships.any():
        return values.mean(axis=0, dtype=np.float64)
    return (empty_fraction * values[~has_ships].mean(axis=0, dtype=np.float64)
            + (1 - empty_fraction) * values[has_ships].mean(axis=0, dtype=np.float64))


@dataclasses.dataclass
class BootstrapWeights:
    """Bayesian-bootstrap weights of the validation images, one row per resample.

    Each kind of image (ship-free, with ships) is weighted apart (the target share fixes the
    kinds' shares): its validation images, then its pseudo-image (:data:`PRIOR_WEIGHT`), with
    weights summing to 1 in every row.
    """

    empty: np.ndarray  # (n_resamples, n_ship_free + 1) float32
    ships: np.ndarray  # (n_resamples, n_with_ships + 1) float32
    has_ships: np.ndarray  # (n_images,) bool


def get_bootstrap_weights(has_ships: np.ndarray, n_resamples: int, seed: int,
                          prior_weight: float = PRIOR_WEIGHT) -> BootstrapWeights:
    """Seeded Bayesian-bootstrap weights (Rubin 1981): per kind of image, Dirichlet weights with
    parameter 1 for each validation image and ``prior_weight`` for the kind's pseudo-image."""
    rng = np.random.default_rng(seed)
    has_ships = np.asarray(has_ships, dtype=bool)
    weights = []
    for kind in (~has_ships, has_ships):
        shape = np.append(np.ones(int(kind.sum())), prior_weight)
        draws = rng.gamma(shape, size=(n_resamples, len(shape)))
        weights.append((draws / draws.sum(axis=1, keepdims=True)).astype(np.float32))
    return BootstrapWeights(weights[0], weights[1], has_ships)


def bootstrap_target_f2(values: np.ndarray, weights: BootstrapWeights, empty_fraction: float | None,
                        pseudo: tuple[float, float] = (0.0, 0.0)) -> np.ndarray:
    """``(n_resamples, k)``: each resample's target-weighted mean of ``(n_images, k)`` values.

    ``pseudo``: the value of every column on the ship-free and on the ship pseudo-image (for a
    candidate's gains: :data:`GAIN_ON_PSEUDO`; for plain F2: 0 and 0). ``empty_fraction`` None:
    the validation split's own share.
    """
    has_ships = weights.has_ships
    share = float(np.mean(~has_ships)) if empty_fraction is None else empty_fraction
    values = np.asarray(values, dtype=np.float32)
    parts = []
    for kind, w, value in ((~has_ships, weights.empty, pseudo[0]), (has_ships, weights.ships, pseudo[1])):
        parts.append(w[:, :-1] @ values[kind] + w[:, -1:] * np.float32(value))
    return share * parts[0] + (1 - share) * parts[1]


def lower_bound(samples: np.ndarray, confidence: float) -> np.ndarray:
    """The ``confidence`` lower bound of each column of bootstrap samples (the 1 - confidence quantile)."""
    return np.quantile(samples, 1.0 - confidence, axis=0, method="lower").astype(np.float64)


def bootstrap_lower_bound(values: np.ndarray, weights: BootstrapWeights, empty_fraction: float | None,
                          confidence: float, pseudo: tuple[float, float] = (0.0, 0.0), chunk: int = 256) -> np.ndarray:
    """:func:`lower_bound` of :func:`bootstrap_target_f2` for each column of ``(n_images, k)``
    values, ``chunk`` columns at a time (memory: n_resamples x chunk)."""
    return np.concatenate([lower_bound(bootstrap_target_f2(values[:, start:start + chunk], weights, empty_fraction,
                                                           pseudo), confidence)
                           for start in range(0, values.shape[1], chunk)]) if values.shape[1] else np.zeros(0)


def resolve_target_fraction(cfg, has_ships: np.ndarray, train_empty_fraction: float | None) -> tuple[float, str]:
    """``SUBMIT.TARGET_EMPTY_FRACTION`` resolved: ``(share of ship-free images, where it came from)``.

    -1 means the training split's share (``train_empty_fraction``); without it, the validation
    split's, which the split's stratification by ship count keeps close to the training split's.
    """
    target = float(cfg.SUBMIT.TARGET_EMPTY_FRACTION)
    if target >= 0:
        return target, "SUBMIT.TARGET_EMPTY_FRACTION"
    if train_empty_fraction is not None:
        return float(train_empty_fraction), "the training split"
    return float(np.mean(~has_ships)), "the validation split (no training split given)"


# ============================================================================ the choice
@dataclasses.dataclass
class Choice:
    """A setting chosen from a grid, and the guard's verdict on it."""

    thresholds: Thresholds
    row: int | None  # its row in the grid; None: no ship at all
    validation_f2: float  # F2 on the validation split as it is
    target_f2: float  # expected F2 at the target share of ship-free images
    guard: dict  # confidence, passed, gain_lower_bound, reason, fallback (None or what was kept instead)


def get_no_ship_thresholds(gated: bool) -> Thresholds:
    """Thresholds that predict no ship: every detection is below :data:`NO_SHIP_SCORE`; with a
    classifier (``gated``) the gate at 1.0 also keeps nearly every image from the detector."""
    return Thresholds(1.0 if gated else 0.0, NO_SHIP_SCORE, 0)


def choose_thresholds(grid: pd.DataFrame, confidence: float, target_all_empty: float, gated: bool = True,
                      guard_problem: str = "") -> Choice:
    """The guarded choice from a grid with columns classifier_threshold, score_threshold,
    min_area, f2, f2_target, gain_lower and n_predicting (images with a predicted ship).

    ``confidence`` 0: the best ``f2_target`` (ties: the first in grid order). Otherwise the best
    ``f2_target`` among settings with ``gain_lower > 0``; when there is none (or
    ``guard_problem`` says why the guard cannot pass), the setting with the fewest
    ``n_predicting`` (ties: the higher classifier, score and minimum-area thresholds) among those
    with ``f2_target >= target_all_empty``, else no ship at all (:func:`get_no_ship_thresholds`).
    """
    def thresholds_of(row: int) -> Thresholds:
        best = grid.loc[row]
        return Thresholds(float(best["classifier_threshold"]), float(best["score_threshold"]), int(best["min_area"]))

    if confidence <= 0:
        row = int(grid["f2_target"].to_numpy().argmax())
        return Choice(thresholds_of(row), row, float(grid.loc[row, "f2"]), float(grid.loc[row, "f2_target"]),
                      {"confidence": 0.0, "passed": None, "gain_lower_bound": None, "reason": "no guard",
                       "fallback": None})
    eligible = np.flatnonzero(grid["gain_lower"].to_numpy() > 0) if not guard_problem else np.zeros(0, int)
    guard = {"confidence": float(confidence)}
    if len(eligible):
        row = int(eligible[grid["f2_target"].to_numpy()[eligible].argmax()])
        guard.update(passed=True, gain_lower_bound=float(grid.loc[row, "gain_lower"]),
                     reason=f"its gain over all-empty stays above 0 at the {confidence:.0%} lower bound", fallback=None)
        return Choice(thresholds_of(row), row, float(grid.loc[row, "f2"]), float(grid.loc[row, "f2_target"]), guard)
    reason = guard_problem or (f"no setting's gain over all-empty stays above 0 at the {confidence:.0%} lower "
                               f"bound (best {grid['gain_lower'].max():+.4f})")
    safe = grid[grid["f2_target"] >= target_all_empty - 1e-12]
    if len(safe):
        order = safe.sort_values(["n_predicting", "classifier_threshold", "score_threshold", "min_area"],
                                 ascending=[True, False, False, False], kind="stable")
        row = int(order.index[0])
        guard.update(passed=False, gain_lower_bound=float(grid.loc[row, "gain_lower"]), reason=reason,
                     fallback=f"the most conservative setting no worse than all-empty on validation: a predicted "
                              f"ship on {int(grid.loc[row, 'n_predicting'])} of the validation images")
        return Choice(thresholds_of(row), row, float(grid.loc[row, "f2"]), float(grid.loc[row, "f2_target"]), guard)
    guard.update(passed=False, gain_lower_bound=None, reason=reason,
                 fallback="no ship at all: every setting of the grid is worse than all-empty on validation")
    return Choice(get_no_ship_thresholds(gated), None, float("nan"), float(target_all_empty), guard)


def choose_from_sweep(sweep: Sweep, target: float, weighting: float | None, confidence: float, n_resamples: int,
                      seed: int, gated: bool = True) -> tuple[Choice, BootstrapWeights | None, str]:
    """The guarded choice (:func:`choose_thresholds`) from a sweep's per-image F2; adds the
    columns ``f2_target``, ``n_predicting`` and ``gain_lower`` to ``sweep.grid`` in place.

    ``target``: the share of ship-free images tuned for (the all-empty F2 the guard compares
    with); ``weighting``: that share for the means, or None for the split's own. Returns the
    choice, the bootstrap weights (None without the guard) and why the guard cannot run ("" when
    it can).
    """
    has_ships, grid = sweep.has_ships, sweep.grid
    grid["f2_target"] = target_mean(sweep.f2, has_ships, weighting)
    grid["n_predicting"] = sweep.predicts.sum(axis=0)
    weights, guard_problem = None, ""
    if confidence > 0:
        shares = {"ship-free": target, "with ships": 1 - target}
        sizes = {"ship-free": int((~has_ships).sum()), "with ships": int(has_ships.sum())}
        thin = [kind for kind in sizes if shares[kind] > 0 and sizes[kind] < MIN_IMAGES_PER_KIND]
        if thin:
            guard_problem = ("the validation split is too small to support a choice: "
                             + ", ".join(f"{sizes[k]} image(s) {k}" for k in thin)
                             + f" (the bootstrap needs at least {MIN_IMAGES_PER_KIND} of each kind)")
        weights = get_bootstrap_weights(has_ships, n_resamples, seed)
        all_empty = (~has_ships).astype(np.float64)
        grid["gain_lower"] = bootstrap_lower_bound(sweep.f2 - all_empty[:, None], weights, weighting, confidence,
                                                   GAIN_ON_PSEUDO)
    else:
        grid["gain_lower"] = np.nan
    choice = choose_thresholds(grid, confidence, target, gated=gated, guard_problem=guard_problem)
    return choice, weights, guard_problem


def _size_columns(edges: Sequence[float]) -> list[str]:
    names = {1: ("small", "large"), 2: ("small", "medium", "large")}.get(len(edges))
    return [f"score_{name}" for name in names] if names else [f"score_size{k}" for k in range(len(edges) + 1)]


def choose_size_thresholds(cache: Sequence[TuneImage], sweep: Sweep, choice: Choice, cfg, empty_fraction: float | None,
                           weights: BootstrapWeights | None, progress: bool = True) -> tuple[Thresholds, pd.DataFrame, dict]:
    """Try one score threshold per size bucket behind ``choice``'s gate.

    Every combination of ``SUBMIT.TUNE_SCORE_THRESHOLDS`` over the buckets of
    ``SUBMIT.SIZE_BUCKET_EDGES``, with every ``SUBMIT.TUNE_MIN_AREAS``, is swept at the chosen
    classifier threshold. With the guard on (``weights`` given), a combination is
    eligible when its gain over all-empty and its gain over ``choice`` both stay above 0 at the
    ``GUARD_CONFIDENCE`` lower bound; without it, when its expected F2 beats ``choice``'s. The best
    expected F2 among the eligible is used. Returns ``(thresholds: choice's or the size-aware ones,
    the size grid, a summary for thresholds.yaml)``.
    """
    edges = [float(e) for e in cfg.SUBMIT.SIZE_BUCKET_EDGES]
    confidence = float(cfg.SUBMIT.GUARD_CONFIDENCE)
    grid = sweep.grid
    base = choice.row if choice.row is not None else int(grid["f2_target"].to_numpy().argmax())
    classifier = float(grid.loc[base, "classifier_threshold"])
    scores = [float(s) for s in cfg.SUBMIT.TUNE_SCORE_THRESHOLDS]
    min_areas = [int(a) for a in cfg.SUBMIT.TUNE_MIN_AREAS]
    settings = list(itertools.product(scores, repeat=len(edges) + 1))
    detector_f2, detector_predicts = sweep_detector(cache, settings, min_areas, edges, progress=progress,
                                                    dtype=np.float32)
    p_ship = np.array([c.p_ship for c in cache])
    all_empty = (~sweep.has_ships).astype(np.float32)
    f2 = apply_gate(detector_f2, p_ship, all_empty, [classifier])
    predicts = apply_gate(detector_predicts, p_ship, np.zeros(len(cache), bool), [classifier])
    current = sweep.f2[:, choice.row] if choice.row is not None else all_empty
    size_grid = pd.DataFrame([(*setting, min_area) for setting in settings for min_area in min_areas],
                             columns=[*_size_columns(edges), "min_area"])
    size_grid.insert(0, "classifier_threshold", classifier)
    size_grid["f2"] = f2.mean(axis=0, dtype=np.float64)
    size_grid["f2_target"] = target_mean(f2, sweep.has_ships, empty_fraction)
    size_grid["n_predicting"] = predicts.sum(axis=0)
    size_grid["improvement"] = size_grid["f2_target"] - choice.target_f2
    if weights is not None:
        size_grid["gain_lower"] = bootstrap_lower_bound(f2 - all_empty[:, None], weights, empty_fraction, confidence,
                                                        GAIN_ON_PSEUDO)
        size_grid["improvement_lower"] = bootstrap_lower_bound(f2 - current[:, None].astype(np.float32), weights,
                                                               empty_fraction, confidence, GAIN_ON_PSEUDO)
        eligible = (size_grid["gain_lower"] > 0) & (size_grid["improvement_lower"] > 0)
    else:
        eligible = size_grid["improvement"] > 1e-6  # above float32 noise: the same setting is no gain
    summary = {"tried": len(size_grid), "on": bool(eligible.any()), "size_bucket_edges": edges}
    if not eligible.any():
        best = int(size_grid["f2_target"].to_numpy().argmax())
        summary.update(best_improvement=float(size_grid.loc[best, "improvement"]),
                       best_improvement_lower_bound=float(size_grid.loc[best, "improvement_lower"])
                       if weights is not None else None)
        return choice.thresholds, size_grid, summary
    row = int(np.flatnonzero(eligible)[size_grid["f2_target"].to_numpy()[eligible].argmax()])
    by_size = tuple(float(v) for v in settings[row // len(min_areas)])
    single = choice.thresholds.score if choice.row is not None else float(grid.loc[base, "score_threshold"])
    thresholds = Thresholds(classifier, single, int(size_grid.loc[row, "min_area"]), by_size, tuple(edges))
    summary.update(row=row, score_thresholds_by_size=list(by_size), validation_f2=float(size_grid.loc[row, "f2"]),
                   target_f2=float(size_grid.loc[row, "f2_target"]),
                   improvement=float(size_grid.loc[row, "improvement"]),
                   improvement_lower_bound=float(size_grid.loc[row, "improvement_lower"]) if weights is not None else None)
    return thresholds, size_grid, summary


# ============================================================================ the error report of a choice
def get_tune_outcomes(cache: Sequence[TuneImage], thresholds: Thresholds) -> tuple[list, np.ndarray]:
    """Each validation image's outcome at ``thresholds`` (``module_metric.get_image_outcome``,
    the gate included), and each image's F2 with the detector alone (the oracle gate's input)."""
    outcomes, detector_f2 = [], []
    for image in cache:
        pred, true, _ = image.decode()
        kept = kept_masks(image, pred, thresholds)
        iou = module_metric.iou_masks(true, kept) if len(true) and len(kept) else np.zeros((len(true), len(kept)))
        true_area, kept_area = true.sum(axis=(1, 2)), kept.sum(axis=(1, 2))
        detector = module_metric.get_image_outcome(image.image_id, iou, true_area, kept_area, image.shape)
        detector_f2.append(detector.f2)
        passed = image.p_ship >= thresholds.classifier
        outcomes.append(detector if passed else module_metric.get_image_outcome(
            image.image_id, np.zeros((len(true), 0)), true_area, [], image.shape, gated_out=True))
    return outcomes, np.array(detector_f2)


def evaluate_thresholds(cache: Sequence[TuneImage], thresholds: Thresholds) -> np.ndarray:
    """Each cached image's competition F2 at ``thresholds``, the gate included: ``(n_images,)``.

    What a submission at ``thresholds`` would score on these images (``.mean()``), without a model.
    """
    return np.array([outcome.f2 for outcome in get_tune_outcomes(cache, thresholds)[0]])


def get_found_ship_p_ship(cache: Sequence[TuneImage], thresholds: Thresholds) -> np.ndarray:
    """For each true ship the detector finds at ``thresholds`` with the gate left out (matched one to
    one at IoU > 0.5, as the metric's first threshold), the p_ship of its image as the scene gate
    computes it (:attr:`TuneImage.scene_p_ship`); highest first.

    What the scene gate is chosen from (``module_inference.get_scene_gate_threshold``): gating at
    ``t`` loses exactly the found ships whose value is below ``t``.
    """
    outcomes, _ = get_tune_outcomes(cache, dataclasses.replace(thresholds, classifier=0.0))
    values = [image.scene_p_ship for image, outcome in zip(cache, outcomes) if np.isfinite(image.scene_p_ship)
              for _ in range(int((outcome.true_iou > 0).sum()))]
    return np.sort(np.asarray(values, dtype=np.float64))[::-1]


def get_scene_gate(cache: Sequence[TuneImage], thresholds: Thresholds, ship_recall: float) -> dict:
    """thresholds.yaml's ``scene_gate`` block: the found ships' p_ship (floored to 6 decimals, so
    that the written values never exceed the true ones) and, at ``ship_recall``
    (``DETECT.GATE_SHIP_RECALL``), the scene gate with the ships it keeps and the share of
    ship-free validation images it passes, next to the submission's gate."""
    found = np.floor(get_found_ship_p_ship(cache, thresholds) * 1e6) / 1e6
    gate = module_inference.get_scene_gate_threshold(found, ship_recall, thresholds.classifier)
    free = np.array([image.scene_p_ship for image in cache if not image.has_ships], dtype=np.float64)
    passed = (lambda t: float(np.mean(free >= t)) if len(free) else None)
    return {"what": "p_ship of the validation image of each true ship the detector finds at these thresholds, "
                    "ungated, as the scene gate computes it (DETECT.GATE_TTA); module_detect gates scenes at the "
                    "highest classifier threshold keeping DETECT.GATE_SHIP_RECALL of them, never above "
                    "CLASSIFIER_THRESHOLD",
            "ship_recall": float(ship_recall), "classifier_threshold": gate, "ships_found": int(len(found)),
            "ships_kept": int(np.sum(found >= gate)), "ship_free_passed": passed(gate),
            "submission_gate_ships_kept": int(np.sum(found >= thresholds.classifier)),
            "submission_gate_ship_free_passed": passed(thresholds.classifier),
            "found_ship_p_ship": [float(v) for v in found]}


def get_tune_error_report(cache: Sequence[TuneImage], thresholds: Thresholds, edges: Sequence[float],
                          empty_fraction: float | None = None) -> module_metric.ErrorReport:
    """The error report of ``thresholds`` on the cached validation images (gate known; the
    oracle gate uses the detector's cached output on every image)."""
    outcomes, detector_f2 = get_tune_outcomes(cache, thresholds)
    return module_metric.get_error_report(outcomes, edges, gate_known=True, oracle_f2=detector_f2,
                                          empty_fraction=empty_fraction)


def write_error_report(report: module_metric.ErrorReport, table_path: Path, plot_path: Path, title: str) -> dict:
    """The report's long table (``module_metric.error_report_to_frame``) as CSV and its picture as PNG."""
    with atomic_path(table_path) as tmp:
        module_metric.error_report_to_frame(report).to_csv(tmp, index=False)
    module_plots.save_figure(module_plots.plot_error_report(report, title), plot_path, dpi=90)
    return {"errors": table_path, "errors_plot": plot_path}


# ============================================================================ tune: choose and write
def _rounded(value, digits: int = 6):
    """``value`` with its floats (in dicts and lists too) rounded: bootstrap bounds are float32 sums."""
    if isinstance(value, dict):
        return {k: _rounded(v, digits) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rounded(v, digits) for v in value]
    return round(float(value), digits) if isinstance(value, float) and math.isfinite(value) else value


def write_thresholds(path: str | Path, thresholds: Thresholds, f2: float, extra: dict | None = None) -> Path:
    """Write the tuned thresholds (and the local F2 they reached) to ``path`` atomically; the
    figures of ``extra`` are rounded to 6 decimals (the thresholds are written as they are)."""
    path = Path(path)
    body = {"thresholds": thresholds.as_config(), "validation_f2": round(float(f2), 6), **_rounded(extra or {})}
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(body, sort_keys=False))
    return path


@dataclasses.dataclass
class TuneResult:
    """What :func:`tune` chose, why, and where it wrote it; unpacks as ``(thresholds, f2, grid)``."""

    thresholds: Thresholds
    f2: float  # validation F2 at the chosen thresholds (the split's own share of ship-free images)
    grid: pd.DataFrame  # every setting tried: classifier_threshold, score_threshold, min_area, f2, f2_target, ...
    paths: dict  # thresholds (yaml), grid (csv), plot, errors (csv), errors_plot, overlays, cache (pkl)
    target_empty_fraction: float = float("nan")  # the share of ship-free images tuned for
    target_f2: float = float("nan")  # the F2 to expect at that share
    guard: dict = dataclasses.field(default_factory=dict)  # the no-harm guard's verdict
    size_aware: dict = dataclasses.field(default_factory=dict)  # the size-aware thresholds' verdict
    size_grid: pd.DataFrame | None = None  # the size-aware settings tried
    errors: module_metric.ErrorReport | None = None  # the error report of the choice on validation
    scene_gate: dict = dataclasses.field(default_factory=dict)  # thresholds.yaml's scene_gate (module_detect)

    def __iter__(self):
        return iter((self.thresholds, self.f2, self.grid))

    def summary(self) -> pd.DataFrame:
        """A one-column table of the choice: thresholds, both shares, both F2, guard, size-aware."""
        values = {**{f"SUBMIT.{k}": v for k, v in self.thresholds.as_config().items()},
                  "validation F2": round(self.f2, 4),
                  "target share of ship-free images": round(self.target_empty_fraction, 4),
                  "expected F2 at the target share": round(self.target_f2, 4),
                  "all-empty F2 at the target share": round(self.target_empty_fraction, 4),
                  "guard": ("off" if self.guard.get("passed") is None else "passed" if self.guard["passed"]
                            else f"fell back: {self.guard.get('fallback')}"),
                  "size-aware score thresholds": "on" if self.size_aware.get("on") else "off"}
        return pd.Series(values, name="value").astype(str).to_frame()


def tune(cache: Sequence[TuneImage], cfg, progress: bool = True, train_empty_fraction: float | None = None,
         load_image: LoadImageFn = read_image) -> TuneResult:
    """Choose thresholds on ``cache`` for the target share of ship-free images, guarded; write
    thresholds.yaml, the grids, the F2 curves, the error report and overlays into the run folder.

    ``train_empty_fraction``: the training split's share of ship-free images, the target when
    ``SUBMIT.TARGET_EMPTY_FRACTION`` is -1 (None: the validation split's). With
    ``GUARD_CONFIDENCE 0``, ``TUNE_SIZE_AWARE False`` and the validation split's own share, this
    is the plain F2 maximisation of earlier versions.
    """
    submit = cfg.SUBMIT
    sweep = sweep_thresholds(cache, submit.TUNE_CLASSIFIER_THRESHOLDS, submit.TUNE_SCORE_THRESHOLDS,
                             submit.TUNE_MIN_AREAS, progress=progress)
    has_ships = sweep.has_ships
    validation_empty = float(np.mean(~has_ships))
    target, target_source = resolve_target_fraction(cfg, has_ships, train_empty_fraction)
    weighting = target  # None: the plain mean (the validation split's own share, exactly)
    if has_ships.all() or not has_ships.any():
        logger.warning("the validation split has %s: F2 cannot be reweighted to %.1f%% ship-free images; tuning at "
                       "the split's own share", "no ship-free image" if has_ships.all() else "no ship", 100 * target)
        target, target_source, weighting = validation_empty, "the validation split (it has one kind of image only)", None
    elif target_source.startswith("the validation split"):
        weighting = None
    logger.info("tuning for %.1f%% ship-free images (from %s); the validation split has %.1f%% (%d of %d images)",
                100 * target, target_source, 100 * validation_empty, int((~has_ships).sum()), len(has_ships))
    grid = sweep.grid
    confidence = float(submit.GUARD_CONFIDENCE)
    gated = bool(np.any(np.array([c.p_ship for c in cache]) < 1))
    choice, weights, guard_problem = choose_from_sweep(sweep, target, weighting, confidence,
                                                       int(submit.GUARD_BOOTSTRAP), int(submit.GUARD_SEED), gated)
    if choice.guard.get("passed") is False:
        logger.warning("no-harm guard (%d validation images, %d resamples): %s; falling back to %s: %s",
                       len(cache), int(submit.GUARD_BOOTSTRAP), choice.guard["reason"], choice.guard["fallback"],
                       choice.thresholds.as_config())

    thresholds, size_grid, size_aware = choice.thresholds, None, {"tried": 0, "on": False}
    edges = [float(e) for e in submit.SIZE_BUCKET_EDGES]
    if submit.TUNE_SIZE_AWARE and edges and guard_problem:
        size_aware["reason"] = "not tried: the validation split is too small for the guard"
    elif submit.TUNE_SIZE_AWARE and edges:
        thresholds, size_grid, size_aware = choose_size_thresholds(cache, sweep, choice, cfg, weighting, weights,
                                                                   progress=progress)
        logger.info("size-aware score thresholds: %s (%d combinations tried)%s", "on" if size_aware["on"] else "off",
                    size_aware["tried"], f": {list(thresholds.score_by_size)} for sizes "
                    f"{module_metric.get_size_labels(edges)}" if size_aware["on"] else "")
    validation_f2 = size_aware["validation_f2"] if size_aware.get("on") else choice.validation_f2
    target_f2 = size_aware["target_f2"] if size_aware.get("on") else choice.target_f2

    errors = get_tune_error_report(cache, thresholds, edges, weighting)
    if math.isnan(validation_f2):  # no ship at all: its F2 is the all-empty one
        validation_f2 = validation_empty
    paths = {"thresholds": get_submission_path(cfg, "thresholds"), "grid": get_submission_path(cfg, "tune_grid"),
             "plot": get_plot_path(cfg, "tune_f2"), "overlays": get_plot_path(cfg, "val_overlays")}
    with atomic_path(paths["grid"]) as tmp:
        grid.to_csv(tmp, index=False)
    if size_grid is not None:
        paths["size_grid"] = get_submission_path(cfg, "tune_size_grid")
        with atomic_path(paths["size_grid"]) as tmp:
            size_grid.to_csv(tmp, index=False)
    config_f2 = grid.loc[(grid["classifier_threshold"] == submit.CLASSIFIER_THRESHOLD)
                         & (grid["score_threshold"] == submit.SCORE_THRESHOLD)
                         & (grid["min_area"] == submit.MIN_AREA), "f2"]
    ungated = grid.loc[grid["classifier_threshold"] <= 0, "f2"]  # threshold 0: the detector alone, no gate
    detector_alone_f2 = float(ungated.max()) if len(ungated) else None
    scene_gate = get_scene_gate(cache, thresholds, float(cfg.DETECT.GATE_SHIP_RECALL))
    write_thresholds(paths["thresholds"], thresholds, validation_f2, {
        "n_validation_images": len(cache),
        "validation_empty_fraction": validation_empty,
        "target_empty_fraction": float(target),
        "target_empty_fraction_from": target_source,
        "target_f2": float(target_f2),
        "target_all_empty_f2": float(target),
        "config_thresholds_f2": float(config_f2.iloc[0]) if len(config_f2) else None,
        "all_empty_f2": validation_empty,
        "detector_alone_f2": detector_alone_f2,
        "guard": {**choice.guard, "bootstrap": int(submit.GUARD_BOOTSTRAP), "seed": int(submit.GUARD_SEED)},
        "size_aware": size_aware,
        module_inference.SCENE_GATE_KEY: scene_gate,
    })
    logger.info("detector alone (classifier threshold 0): best F2 %s; predicting no ship anywhere: F2 %.4f",
                "not in the grid" if detector_alone_f2 is None else f"{detector_alone_f2:.4f}", validation_empty)
    logger.info("chosen on %d validation images: %s -> F2 %.4f on validation (all-empty %.4f); expected F2 %.4f at "
                "%.1f%% ship-free images (all-empty %.4f); guard: %s", len(cache), thresholds.as_config(),
                validation_f2, validation_empty, target_f2, 100 * target, target,
                "off" if choice.guard["passed"] is None else "passed" if choice.guard["passed"] else "fell back")
    if thresholds.classifier > 0 and scene_gate["ships_found"]:
        logger.info("scene gate (module_detect, DETECT.GATE_SHIP_RECALL %.2f): p_ship >= %.4f keeps %d of the %d true ships "
                    "the detector finds on validation and passes %.1f%% of the ship-free images; the submission's "
                    "gate %.4f keeps %d and passes %.1f%%", scene_gate["ship_recall"], scene_gate["classifier_threshold"],
                    scene_gate["ships_kept"], scene_gate["ships_found"], 100 * (scene_gate["ship_free_passed"] or 0),
                    thresholds.classifier, scene_gate["submission_gate_ships_kept"],
                    100 * (scene_gate["submission_gate_ship_free_passed"] or 0))
    module_plots.save_figure(module_plots.plot_tune_prevalence(
        grid, thresholds if choice.row is not None else None, validation_empty, target, choice.guard),
        paths["plot"], dpi=100)
    paths.update(write_error_report(errors, get_submission_path(cfg, "tune_errors"), get_plot_path(cfg, "tune_errors"),
                                    f"validation split, {len(cache)} images, at the chosen thresholds"))
    module_plots.save_figure(plot_tune_overlays(cache, thresholds, load_image=load_image), paths["overlays"], dpi=80)
    return TuneResult(thresholds, float(validation_f2), grid, paths, float(target), float(target_f2),
                      choice.guard, size_aware, size_grid, errors, scene_gate)


def plot_tune_overlays(cache: Sequence[TuneImage], thresholds: Thresholds, count: int = 8,
                       load_image: LoadImageFn = read_image):
    """GT/prediction overlays of a sample of validation images at ``thresholds`` (gate included)."""
    def kept(image: TuneImage) -> np.ndarray:
        pred, _, _ = image.decode(crop=False)
        return kept_masks(image, pred, thresholds) if image.p_ship >= thresholds.classifier else pred[:0]

    # Sampling needs the number of kept predictions of ship-free images: count those only.
    n_kept = [len(kept(c)) if not c.true_rles and c.pred_rles else 0 for c in cache]
    chosen = module_plots.pick_overlay_sample([c.has_ships for c in cache], n_kept, count)
    images, trues, preds, titles = [], [], [], []
    for k in chosen:
        image = cache[k]
        true, pred = coco_to_masks(image.true_rles, image.shape), kept(image)
        f2 = module_metric.f2_masks(true, pred) if len(pred) else float(not len(true))
        images.append(load_image(Path(image.file_name)))
        trues.append(true)
        preds.append(pred)
        titles.append(f"{image.image_id} p_ship {image.p_ship:.2f}\nF2 {f2:.2f} ({len(true)} true, {len(pred)} pred)")
    return module_plots.plot_overlays(images, trues, preds, titles)


# ============================================================================ tune_thresholds: the run's tuning
def tune_thresholds(cfg, val_dicts: Sequence[dict] | None = None, classifier: str | Path | None = None,
                    weights: str | Path | None = None, reuse_cache: bool = True, progress: bool = True,
                    train_dicts: Sequence[dict] | None = None) -> TuneResult:
    """Choose the thresholds on the validation split for the target share of ship-free images;
    write thresholds.yaml and the reports.

    ``val_dicts`` (and ``train_dicts``, whose share of ship-free images is the default target)
    default to the run's split (``module_preprocessing.get_train_val_dicts``). Both models run
    once over the validation images (ungated, every detection above the grid's lowest score
    kept) into ``tune_cache.pkl``, which is reused while the models and images are the same
    (``reuse_cache``); then :func:`tune` chooses. Without a classifier export the tuning is
    ungated (p_ship = 1).
    """
    if val_dicts is None:
        import module_preprocessing

        train_dicts, val_dicts = module_preprocessing.get_train_val_dicts(cfg)
    train_empty = float(np.mean([not d.get("annotations") for d in train_dicts])) if train_dicts else None
    classifier = Path(classifier) if classifier else module_config.get_classifier_path(cfg)
    weights = Path(weights) if weights else get_default_weights_path(cfg)
    use_classifier = classifier.is_file()
    if not use_classifier:
        logger.warning("no classifier at %s: tuning ungated (p_ship = 1 for every image)", classifier)
    fingerprint = _cache_fingerprint(weights, classifier if use_classifier else None) + str(
        [d["image_id"] for d in val_dicts]) + str(min(cfg.SUBMIT.TUNE_SCORE_THRESHOLDS)) + _inference_key(cfg)
    cache_path = get_submission_path(cfg, "tune_cache")
    cache = None
    if reuse_cache and cache_path.is_file():
        try:
            stored = pickle.loads(cache_path.read_bytes())
        except (AttributeError, ImportError, pickle.UnpicklingError, EOFError) as exc:  # e.g. from an older version
            logger.info("tuning: %s cannot be read (%s): recomputing", cache_path, exc)
            stored = {}
        if stored.get("fingerprint") == fingerprint:
            cache = stored["images"]
            logger.info("tuning: reused the model outputs cached in %s (same models and images)", cache_path)
        elif stored:
            logger.info("tuning: %s was made with other models or images: recomputing", cache_path)
    if cache is None:
        p_ship_fn = build_p_ship_fn(cfg, classifier) if use_classifier else None
        # the scene gate's own p_ship where scenes are gated otherwise (one pass against flip TTA)
        gate_p_ship_fn = (build_p_ship_fn(cfg, classifier, tta=cfg.DETECT.GATE_TTA)
                          if use_classifier and cfg.DETECT.GATE_TTA != cfg.CLASSIFIER.TTA else None)
        cache = collect_tune_cache(val_dicts, build_detect_fn(cfg, weights), p_ship_fn,
                                   batch_size=cfg.SUBMIT.BATCH_SIZE, min_score=min(cfg.SUBMIT.TUNE_SCORE_THRESHOLDS),
                                   progress=progress, progress_path=module_config.get_progress_path(cfg),
                                   gate_p_ship_fn=gate_p_ship_fn)
        with atomic_path(cache_path) as tmp:
            tmp.write_bytes(pickle.dumps({"fingerprint": fingerprint, "images": cache}))
    result = tune(cache, cfg, progress=progress, train_empty_fraction=train_empty)
    result.paths["cache"] = cache_path
    logger.info("written to %s", result.paths["thresholds"])
    return result
