"""Inference, in one home: the detector from a run, batched prediction, flip TTA, overlap removal, the gate.

Used by the training validation hook (``module_train``), threshold tuning (``module_tuning``), the
Kaggle submission (``module_submit``) and scene detection (``module_detect``):

    model = load_detector(cfg)                       # runs/<run>/detector/model_best.pth, eval mode
    preds = predict_instances(model, [rgb_uint8_image], tta=True)
    preds[0]["masks"]   # (N, H, W) bool at the image's own size; preds[0]["scores"] (N,) float32
    masks, scores = apply_thresholds(preds[0], get_thresholds(cfg)[0])  # overlap-free, thresholded

* **the model**: :func:`load_detector` builds the Mask R-CNN of the config
  (``module_config.get_model_cfg``) and loads a checkpoint (by default the run's best);
  :func:`resolve_weights` turns ``MODEL.WEIGHTS`` URLs into cached files, or says what to do
  without network.
* **batched prediction** :func:`predict_instances`: images go through
  :func:`get_eval_augmentations`, the very resize the training mapper applies with
  ``is_train=False`` (``module_train.ShipDatasetMapper``), then the model in batches; masks are
  pasted back at each image's size.
* **flip TTA** :func:`merge_tta_predictions`; **a ship's fragments merged** :func:`merge_fragments`
  (``SUBMIT.MERGE_IOS``); **overlap removal** :func:`resolve_overlaps` (each
  pixel to the highest-scoring mask, as Kaggle requires) and the three thresholds
  (:class:`Thresholds`, :func:`get_thresholds`: the run's tuned ones, the config's otherwise; the
  score threshold optionally one per mask-size bucket).
* **the gate**: :func:`build_p_ship_fn` wraps the run's exported classifier (``module_classifier``,
  imported only when a gate is built) as ``paths -> p_ship``.

* **a backbone of any width** :func:`build_basic_resnet_fpn_backbone`: the ResNet-18/34 FPN with
  ``MODEL.RESNETS.STEM_OUT_CHANNELS`` and ``RES2_OUT_CHANNELS`` free (detectron2's own builder
  requires 64 for these depths); the demo's half-width detector (32) steps 2.1x faster on a CPU.

Masks here are ``(N, H, W)`` bool arrays in image pixel order (row, column).

Importing this module defines functions and registers that backbone with detectron2's
``BACKBONE_REGISTRY`` (once); it does nothing else.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import torch

import module_config
from module_config import get_detector_path, get_model_cfg, get_stage_path, get_stages
from module_metric import get_size_buckets
from module_rle import masks_to_coco

logger = logging.getLogger(__name__)

# detectron2's model-zoo URL scheme and where its PathManager downloads it from.
DETECTRON2_URL_PREFIX = "detectron2://"
DETECTRON2_DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/detectron2/"
# TTA views as (name, numpy axis of an (H, W, ...) image to flip; None: the original).
TTA_VIEWS = (("original", None), ("hflip", 1), ("vflip", 0))

# A callable giving p_ship for image files: list of paths -> (N,) float array in [0, 1] (NaN: unreadable).
PShipFn = Callable[[Sequence[Path]], np.ndarray]
# A callable detecting ships: list of (H, W, 3) uint8 RGB images -> list of
# {"masks": (N, H, W) bool at the image size, "scores": (N,) float}.
DetectFn = Callable[[Sequence[np.ndarray]], list]


# ============================================================================ weights
def get_weights_cache_path(url: str) -> Path:
    """Where detectron2's PathManager keeps a downloaded ``detectron2://`` or http(s) URL."""
    from iopath.common.file_io import get_cache_dir

    if url.startswith(DETECTRON2_URL_PREFIX):
        url = DETECTRON2_DOWNLOAD_URL + url[len(DETECTRON2_URL_PREFIX):]
    return Path(get_cache_dir()) / urlparse(url).path.lstrip("/")


def resolve_weights(weights: str) -> str:
    """A local file for ``weights`` ("" stays ""): URLs are downloaded (or found in the cache).

    Raises ``FileNotFoundError`` for a local path that does not exist and ``RuntimeError`` saying
    where to put the file when a download fails (e.g. no network).
    """
    from detectron2.utils.file_io import PathManager

    if not weights:
        return ""
    if "://" not in weights:
        if not Path(weights).is_file():
            raise FileNotFoundError(
                f"MODEL.WEIGHTS {weights!r} does not exist. Give an existing .pth/.pkl file, a "
                'detectron2:// model-zoo URL, or "" for random init.'
            )
        return weights
    cache = get_weights_cache_path(weights)
    try:
        return PathManager.get_local_path(weights)
    except Exception as exc:  # iopath raises whatever urllib raises
        raise RuntimeError(
            f"could not download the pretrained weights {weights} ({type(exc).__name__}: {exc}). "
            f"Download the file on a machine with network access and put it at {cache} "
            "(or run `python tools/prefetch_weights.py`), or set MODEL.WEIGHTS to a local file, "
            'or to "" for random init.'
        ) from exc


# ============================================================================ the model
def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The detector inside a DistributedDataParallel wrapper (or the model itself)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode (no autograd) for the block and restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


# The name of :func:`build_basic_resnet_fpn_backbone` in configs (``MODEL.BACKBONE.NAME``).
BASIC_RESNET_FPN = "build_basic_resnet_fpn_backbone"


def build_basic_resnet(cfg, input_shape):
    """detectron2's ResNet-18 or -34 (``MODEL.RESNETS.DEPTH``) of any width: the stem has
    ``STEM_OUT_CHANNELS``, res2 ``RES2_OUT_CHANNELS``, each later stage twice the one before.

    With 64 and 64 it is exactly ``build_resnet_backbone``'s ResNet (same modules, same names),
    which asserts ``RES2_OUT_CHANNELS == 64`` for these depths.
    """
    from detectron2.modeling.backbone import ResNet
    from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem

    r = cfg.MODEL.RESNETS
    if r.DEPTH not in (18, 34):
        raise ValueError(f"MODEL.BACKBONE.NAME {BASIC_RESNET_FPN}: MODEL.RESNETS.DEPTH must be 18 or 34 (basic "
                         f"blocks), got {r.DEPTH}; use build_resnet_fpn_backbone for R50 and deeper")
    if r.RES5_DILATION != 1 or r.NUM_GROUPS != 1 or any(r.DEFORM_ON_PER_STAGE):
        raise ValueError(f"MODEL.BACKBONE.NAME {BASIC_RESNET_FPN}: basic blocks take no RES5_DILATION, NUM_GROUPS "
                         "or deformable convolutions")
    blocks = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}[r.DEPTH]
    stem = BasicStem(in_channels=input_shape.channels, out_channels=r.STEM_OUT_CHANNELS, norm=r.NORM)
    in_channels, out_channels, stages = r.STEM_OUT_CHANNELS, r.RES2_OUT_CHANNELS, []
    for k, n in enumerate(blocks):
        stages.append(ResNet.make_stage(block_class=BasicBlock, num_blocks=n, in_channels=in_channels,
                                        out_channels=out_channels, norm=r.NORM,
                                        stride_per_block=[1 if k == 0 else 2] + [1] * (n - 1)))
        in_channels, out_channels = out_channels, 2 * out_channels
    return ResNet(stem, stages, out_features=r.OUT_FEATURES, freeze_at=cfg.MODEL.BACKBONE.FREEZE_AT)


def build_basic_resnet_fpn_backbone(cfg, input_shape):
    """:func:`build_basic_resnet` under detectron2's FPN (``MODEL.FPN.*``, P6 by max pooling),
    as ``build_resnet_fpn_backbone`` puts one over its ResNet."""
    from detectron2.modeling.backbone import FPN
    from detectron2.modeling.backbone.fpn import LastLevelMaxPool

    return FPN(bottom_up=build_basic_resnet(cfg, input_shape), in_features=cfg.MODEL.FPN.IN_FEATURES,
               out_channels=cfg.MODEL.FPN.OUT_CHANNELS, norm=cfg.MODEL.FPN.NORM, top_block=LastLevelMaxPool(),
               fuse_type=cfg.MODEL.FPN.FUSE_TYPE)


def _register_backbones() -> None:
    from detectron2.modeling import BACKBONE_REGISTRY

    if BASIC_RESNET_FPN not in BACKBONE_REGISTRY:
        BACKBONE_REGISTRY.register(build_basic_resnet_fpn_backbone)


_register_backbones()


def get_default_weights_path(cfg) -> Path:
    """The detector weights of the run: the best by validation F2, else the last stage's final ones."""
    candidates = [get_detector_path(cfg, "best"), get_stage_path(cfg, get_stages(cfg)[-1], "final")]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no detector weights in the run ({' or '.join(map(str, candidates))}): "
                            "train with module_train.py (or the notebook), or pass --weights")


def get_input_sizes(cfg, checkpoint: dict) -> tuple[int, int]:
    """``(predict at, trained at)`` for a detector checkpoint's dict (or its extra state): the
    stage size recorded in it (the last stage's for files that record none), and
    ``DETECTOR.TEST_SIZE`` where set, else that size."""
    trained = int(checkpoint.get("input_size", get_stages(cfg)[-1].size))
    return int(cfg.DETECTOR.TEST_SIZE) or trained, trained


def load_detector(cfg, weights: str | os.PathLike | None = None) -> torch.nn.Module:
    """The Mask R-CNN of ``cfg`` with ``weights`` (default: the run's, :func:`get_default_weights_path`)
    loaded, in eval mode on ``cfg.MODEL.DEVICE`` (on a CPU with channels-last weights: faster, and
    the same predictions).

    ``model.input_size``, the size it predicts at, is ``DETECTOR.TEST_SIZE`` where set, else
    ``model.trained_size``: the input size recorded in the checkpoint (the stage it was trained at;
    the last stage's size for files that do not record one).
    """
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    weights = str(weights) if weights else str(get_default_weights_path(cfg))
    if "://" not in weights and not Path(weights).is_file():
        raise FileNotFoundError(f"detector weights {weights!r} do not exist")
    model = build_model(get_model_cfg(cfg))
    extra = DetectionCheckpointer(model).load(resolve_weights(weights))
    model.input_size, model.trained_size = get_input_sizes(cfg, extra)
    if next(model.parameters()).device.type == "cpu":
        # oneDNN's NHWC convolutions: 1.20x images/s on AVX-512, 1.13x on AVX2, the same masks
        # (bench/bench_cpu_precision.py: mean mask IoU 1.0000, every instance matched)
        model.to(memory_format=torch.channels_last)
    model.eval()
    return model


# ============================================================================ batched prediction
def get_eval_augmentations(input_size: int) -> list:
    """What every image goes through before the model outside training: a resize to ``input_size``
    square. The training mapper starts with the same list (``module_train.build_augmentations``)."""
    from detectron2.data import transforms as T

    return [T.Resize((input_size, input_size))]


def to_model_inputs(images: Sequence[np.ndarray], input_size: int, input_format: str = "BGR") -> list[dict]:
    """detectron2 model inputs of ``(H, W, 3)`` uint8 RGB images: resized by
    :func:`get_eval_augmentations`, in ``input_format`` channel order, with the original size."""
    from detectron2.data import transforms as T

    augmentations = T.AugmentationList(get_eval_augmentations(input_size))
    inputs = []
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        if input_format == "BGR":
            image = image[:, :, ::-1]
        aug_input = T.AugInput(np.ascontiguousarray(image))
        augmentations(aug_input)
        tensor = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        inputs.append({"image": tensor, "height": height, "width": width})
    return inputs


def _instances_to_prediction(instances) -> dict:
    instances = instances.to("cpu")
    masks = instances.pred_masks.numpy().astype(bool) if instances.has("pred_masks") else None
    if masks is None or len(instances) == 0:
        masks = np.zeros((0, *instances.image_size), bool)
    scores = instances.scores.float().numpy()  # float32 also from a bf16 autocast pass
    order = np.argsort(-scores, kind="stable")
    return {"masks": masks[order], "scores": scores[order]}


def merge_tta_predictions(views: Sequence[dict], iou_threshold: float = 0.5) -> dict:
    """Merge per-view predictions (already un-flipped to the original frame) into one.

    Detections of all views are pooled and taken in score order; each unassigned detection
    gathers, from every other view, the unassigned detection with the highest mask IoU if that
    IoU is >= ``iou_threshold``. A group's mask is the pixels covered by at least half of its
    members (1: itself, 2: their union, 3: the majority); its score is the sum of the members'
    scores divided by the number of views, so a ship seen in one view only is down-weighted.
    Masks: (N, H, W) bool; the result may overlap (resolve overlaps afterwards).
    """
    from pycocotools import mask as mask_util

    n_views = len(views)
    masks = [v["masks"] for v in views]
    height, width = views[0]["masks"].shape[1:]
    entries = [(float(s), vi, di) for vi, v in enumerate(views) for di, s in enumerate(v["scores"])]
    if not entries:
        return {"masks": np.zeros((0, height, width), bool), "scores": np.zeros(0, np.float32)}
    entries.sort(key=lambda e: -e[0])
    rles = [masks_to_coco(m) for m in masks]
    # IoU between every pair of views: iou[(a, b)] has shape (n_a, n_b)
    iou = {}
    for a in range(n_views):
        for b in range(n_views):
            if a != b and len(rles[a]) and len(rles[b]):
                iou[(a, b)] = np.asarray(mask_util.iou(rles[a], rles[b], [0] * len(rles[b])))
    used = [np.zeros(len(v["scores"]), bool) for v in views]
    out_masks, out_scores = [], []
    for score, vi, di in entries:
        if used[vi][di]:
            continue
        used[vi][di] = True
        members = [masks[vi][di]]
        total = score
        for vj in range(n_views):
            if vj == vi or (vi, vj) not in iou:
                continue
            candidates = np.where(~used[vj], iou[(vi, vj)][di], -1.0)
            best = int(np.argmax(candidates))
            if candidates[best] >= iou_threshold:
                used[vj][best] = True
                members.append(masks[vj][best])
                total += float(views[vj]["scores"][best])
        out_masks.append(np.mean(members, axis=0) >= 0.5)
        out_scores.append(total / n_views)
    scores = np.asarray(out_scores, np.float32)
    order = np.argsort(-scores, kind="stable")
    return {"masks": np.stack(out_masks)[order], "scores": scores[order]}


def merge_fragments(prediction: dict, min_ios: float, min_score: float = 0.0) -> dict:
    """One ship from its fragments: detections whose masks overlap are unioned into one.

    An undertrained detector often puts several detections on one ship, each a part of it, with
    boxes too unlike for the box NMS to remove (detectron2's ``NMS_THRESH_TEST``): after overlap
    removal each part matches the ship at a low IoU, so the ship is a miss and the parts false
    ships. Here, in score order, each detection not yet taken leads a group and takes every other
    detection whose mask overlaps the group's mask by at least ``min_ios`` of the smaller of the
    two (intersection over the smaller area), again and again as the group's mask grows; the
    group becomes one detection, the union of its masks with the leader's score. Detections
    scoring below ``min_score`` neither lead nor join (they are left as they are).

    ``prediction``: ``masks`` (N, H, W) bool, ``scores`` (N,), sorted or not. Returns the same
    kind of dict, sorted by score, highest first; masks may still overlap (remove overlaps
    afterwards). ``min_ios <= 0``: the prediction as it is.
    """
    from pycocotools import mask as mask_util

    masks, scores = np.asarray(prediction["masks"], bool), np.asarray(prediction["scores"], np.float32)
    order = np.argsort(-scores, kind="stable")
    masks, scores = masks[order], scores[order]  # copies: a leader's union is written into its own row below
    candidates = np.nonzero(scores >= min_score)[0]
    if min_ios <= 0 or len(candidates) < 2:
        return {"masks": masks, "scores": scores}
    rles = masks_to_coco(masks[candidates])
    areas = mask_util.area(rles).astype(np.float64)
    taken = np.zeros(len(candidates), bool)
    dropped: list[int] = []
    for lead in range(len(candidates)):
        if taken[lead]:
            continue
        taken[lead] = True
        group, group_area, members = rles[lead], areas[lead], [lead]
        while True:
            rest = np.nonzero(~taken)[0]
            if not len(rest) or group_area == 0:
                break
            iou = np.asarray(mask_util.iou([group], [rles[r] for r in rest], [0] * len(rest)), np.float64)[0]
            intersection = iou * (group_area + areas[rest]) / (1.0 + iou)
            joining = rest[intersection >= min_ios * np.maximum(np.minimum(group_area, areas[rest]), 1.0)]
            if not len(joining):
                break
            taken[joining] = True
            members += joining.tolist()
            group = mask_util.merge([group] + [rles[r] for r in joining])
            group_area = float(mask_util.area(group))
        if len(members) > 1:  # members join one group only and never lead: their rows stay as predicted
            masks[candidates[lead]] = masks[candidates[members]].any(axis=0)
            dropped += candidates[members[1:]].tolist()
    keep = np.setdiff1d(np.arange(len(scores)), dropped)
    return {"masks": masks[keep], "scores": scores[keep]}


def predict_instances(model: torch.nn.Module, images: Sequence[np.ndarray], input_size: int | None = None,
                      tta: bool = False, batch_size: int = 8, merge_ios: float = 0.0,
                      merge_min_score: float = 0.0) -> list[dict]:
    """Masks and scores for each (H, W, 3) uint8 RGB image, at the image's own size.

    Each image is resized to ``input_size`` square (default ``model.input_size``: the size the
    checkpoint was trained at) by :func:`to_model_inputs`, the model runs in batches of
    ``batch_size``, and masks are pasted back at (H, W). Returns one dict per image: ``masks``
    (N, H, W) bool (row-major, may overlap) and ``scores`` (N,) float32, sorted by score, highest
    first. ``tta``: the original, horizontally and vertically flipped images are predicted,
    un-flipped and merged by :func:`merge_tta_predictions`. ``merge_ios`` > 0: each image's
    fragments of one ship are then merged (:func:`merge_fragments` with ``merge_min_score``;
    ``SUBMIT.MERGE_IOS`` and ``.MERGE_MIN_SCORE`` in the config). The model's mode is restored afterwards.
    """
    net = unwrap_model(model)
    input_size = int(input_size or getattr(net, "input_size"))
    views = TTA_VIEWS if tta else TTA_VIEWS[:1]
    results: list[dict] = []
    with eval_mode(net):
        for start in range(0, len(images), batch_size):
            batch = list(images[start:start + batch_size])
            per_view = []
            for _, axis in views:
                flipped = batch if axis is None else [np.flip(image, axis) for image in batch]
                outputs = net.inference(to_model_inputs(flipped, input_size, net.input_format))
                predictions = [_instances_to_prediction(o["instances"]) for o in outputs]
                if axis is not None:  # masks are (N, H, W): image axis a is mask axis a + 1
                    predictions = [{"masks": np.ascontiguousarray(np.flip(p["masks"], axis + 1)),
                                    "scores": p["scores"]} for p in predictions]
                per_view.append(predictions)
            merged = per_view[0] if not tta else [merge_tta_predictions([view[i] for view in per_view])
                                                  for i in range(len(batch))]
            results += [merge_fragments(p, merge_ios, merge_min_score) if merge_ios > 0 else p for p in merged]
    return results


# ============================================================================ overlap removal, thresholds
def resolve_overlaps(masks: np.ndarray, scores: np.ndarray, score_threshold: float = 0.0,
                     min_area: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Make predicted masks disjoint, as Kaggle requires.

    ``masks`` ``(N, H, W)`` (bool or 0/1), ``scores`` ``(N,)``. Drops detections with
    ``score < score_threshold``, gives each pixel to the highest-scoring mask (ties: the earlier
    one in the input), then drops masks left with fewer than ``max(min_area, 1)`` pixels.
    Returns ``(masks (K, H, W) bool, scores (K,))`` sorted by score, descending; inputs untouched.
    """
    masks = np.asarray(masks)
    scores = np.asarray(scores)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if scores.shape != (masks.shape[0],):
        raise ValueError(f"scores must be ({masks.shape[0]},) to match masks, got shape {scores.shape}")
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] >= score_threshold]
    taken = np.zeros(masks.shape[1:], np.bool_)
    kept_masks, kept = [], []
    for k in order:
        mask = masks[k].astype(np.bool_, copy=True)
        mask &= ~taken
        taken |= mask
        if np.count_nonzero(mask) >= max(int(min_area), 1):
            kept_masks.append(mask)
            kept.append(k)
    out_masks = np.stack(kept_masks) if kept_masks else np.zeros((0,) + masks.shape[1:], np.bool_)
    return out_masks, scores[np.asarray(kept, np.int64)]


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """The post-processing thresholds of a gated prediction.

    With ``score_by_size`` (optional) the score threshold depends on the size of the detection:
    a detection whose mask has ``area`` px goes by ``score_by_size[k]``, k its bucket of
    ``size_edges`` (px of a 768 x 768 tile, scaled to the image's area:
    ``module_metric.get_size_buckets``), and ``score`` is not used. Empty: one threshold for all.
    """

    classifier: float  # images with p_ship below this get no ship; <= 0: no classifier at all
    score: float  # detections with a score below this are dropped
    min_area: int  # masks smaller than this (px, after overlap removal) are dropped
    score_by_size: tuple = ()  # per size bucket (len(size_edges) + 1 values); () : `score` for every size
    size_edges: tuple = ()  # bucket edges of score_by_size, mask area in px of a 768 x 768 tile

    def __post_init__(self):
        if self.score_by_size and len(self.score_by_size) != len(self.size_edges) + 1:
            raise ValueError(f"score thresholds by size {list(self.score_by_size)} need {len(self.score_by_size) - 1} "
                             f"size-bucket edges, got {list(self.size_edges)}")
        if list(self.size_edges) != sorted(self.size_edges):
            raise ValueError(f"size-bucket edges {list(self.size_edges)} must increase")

    def as_config(self) -> dict:
        values = {"CLASSIFIER_THRESHOLD": float(self.classifier), "SCORE_THRESHOLD": float(self.score),
                  "MIN_AREA": int(self.min_area)}
        if self.score_by_size:
            values["SCORE_THRESHOLDS_BY_SIZE"] = [float(v) for v in self.score_by_size]
            values["SIZE_BUCKET_EDGES"] = [float(v) for v in self.size_edges]
        return values

    def get_score_thresholds(self, areas, shape: tuple[int, int]) -> np.ndarray:
        """The score threshold of each detection, from its mask ``areas`` (px) in an ``(H, W)`` image.

        float32, as the scores are: a score passes when ``score >= threshold`` in float32, the
        comparison ``resolve_overlaps`` makes for a single threshold.
        """
        areas = np.asarray(areas)
        if not self.score_by_size:
            return np.full(areas.shape, self.score, dtype=np.float32)
        return np.asarray(self.score_by_size, dtype=np.float32)[get_size_buckets(areas, self.size_edges, shape)]


THRESHOLD_KEYS = {"CLASSIFIER_THRESHOLD": "classifier", "SCORE_THRESHOLD": "score", "MIN_AREA": "min_area",
                  "SCORE_THRESHOLDS_BY_SIZE": "score_by_size", "SIZE_BUCKET_EDGES": "size_edges"}
SIZE_KEYS = ("SCORE_THRESHOLDS_BY_SIZE", "SIZE_BUCKET_EDGES")  # they apply together, or not at all


def apply_thresholds(prediction: dict, thresholds: Thresholds) -> tuple[np.ndarray, np.ndarray]:
    """One image's raw prediction (``masks`` (N, H, W), ``scores`` (N,)) -> overlap-free
    ``(masks (K, H, W) bool, scores (K,))`` after the score threshold and the minimum area.

    Size-aware thresholds (``thresholds.score_by_size``) go by each mask's area as predicted,
    before overlap removal; the detections that pass then go through :func:`resolve_overlaps`.
    """
    masks = np.asarray(prediction["masks"], bool)
    scores = np.asarray(prediction["scores"], np.float32)
    if not thresholds.score_by_size:
        return resolve_overlaps(masks, scores, score_threshold=thresholds.score, min_area=thresholds.min_area)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    keep = scores >= thresholds.get_score_thresholds(masks.sum(axis=(1, 2)), masks.shape[1:])
    return resolve_overlaps(masks[keep], scores[keep], score_threshold=-np.inf, min_area=thresholds.min_area)


def get_thresholds(cfg, thresholds_file: str | Path | None = None,
                   overridden: Iterable[str] = ()) -> tuple[Thresholds, dict]:
    """The thresholds a prediction uses, and where each came from.

    Precedence per key: a ``SUBMIT.<KEY>`` override given on the command line (``overridden``),
    then ``thresholds_file`` (default: the run's tuned ``thresholds.yaml``, when it exists), then
    the config. Returns ``(Thresholds, {key: source})``.

    Size-aware score thresholds (``SCORE_THRESHOLDS_BY_SIZE`` with its ``SIZE_BUCKET_EDGES``,
    from one source) apply only when no single ``SCORE_THRESHOLD`` came from a source that ranks
    above theirs: ``SUBMIT.SCORE_THRESHOLD`` on the command line turns the tuned per-size ones
    off. The sources then list the size keys only when they apply.
    """
    import yaml

    path = Path(thresholds_file) if thresholds_file else module_config.get_submission_path(cfg, "thresholds")
    tuned: dict = {}
    if path.is_file():
        loaded = yaml.safe_load(path.read_text()) or {}
        tuned = loaded.get("thresholds", loaded)
        unknown = set(tuned) - set(THRESHOLD_KEYS)
        if unknown:
            raise ValueError(f"{path}: unknown threshold keys {sorted(unknown)}; expected {sorted(THRESHOLD_KEYS)}")
    elif thresholds_file:
        raise FileNotFoundError(f"thresholds file {path} does not exist")
    overridden = set(module_config.parse_overrides(list(overridden))[0::2]) if overridden else set()
    values, sources, rank = {}, {}, {}
    for key, field in THRESHOLD_KEYS.items():
        if f"SUBMIT.{key}" in overridden or key not in tuned:
            values[field] = cfg.SUBMIT[key]
            sources[key] = "command line" if f"SUBMIT.{key}" in overridden else "config"
        else:
            values[field] = tuned[key]
            sources[key] = str(path)
        rank[key] = {"command line": 2, "config": 0}.get(sources[key], 1)
    # The per-size thresholds and their edges come as a pair, from the per-size key's source.
    by_size_source = sources["SCORE_THRESHOLDS_BY_SIZE"]
    if by_size_source == str(path) and "SIZE_BUCKET_EDGES" in tuned and "SUBMIT.SIZE_BUCKET_EDGES" not in overridden:
        values["size_edges"], sources["SIZE_BUCKET_EDGES"] = tuned["SIZE_BUCKET_EDGES"], str(path)
    by_size = [float(v) for v in values["score_by_size"] or []]
    if by_size and rank["SCORE_THRESHOLD"] > rank["SCORE_THRESHOLDS_BY_SIZE"]:
        logger.info("SUBMIT.SCORE_THRESHOLD from the %s overrides the score thresholds by size of the %s",
                    sources["SCORE_THRESHOLD"], by_size_source)
        by_size = []
    if not by_size:
        for key in SIZE_KEYS:
            sources.pop(key)
    thresholds = Thresholds(float(values["classifier"]), float(values["score"]), int(values["min_area"]),
                            tuple(by_size), tuple(float(v) for v in values["size_edges"]) if by_size else ())
    return thresholds, sources


# The block of thresholds.yaml that module_tuning.tune writes for scene detection (module_detect).
SCENE_GATE_KEY = "scene_gate"


def get_scene_gate_threshold(found_ship_p_ship, ship_recall: float, gate: float) -> float:
    """The classifier threshold that gates the slices of a scene: the highest one that keeps
    ``ship_recall`` of the true ships the detector finds on validation, never above ``gate``.

    ``found_ship_p_ship``: for each true validation ship the detector finds on its own (at the
    tuned score and area thresholds, matched at IoU > 0.5), the p_ship of its tile
    (``module_tuning.get_found_ship_p_ship``). Keeping a share ``r`` of ``n`` of them keeps the
    ``r n`` (rounded to the nearest ship, at least one) with the highest p_ship: the threshold is
    the lowest of those values. Rounded, not rounded up: at 0.98 of 47 ships one may go, so that a
    single ship on a tile the classifier scores 0.1 does not open the gate to most of the sea. ``gate``
    (the submission's tuned classifier threshold) is returned as it is when ``ship_recall <= 0``,
    when ``gate <= 0`` (ungated) and when the detector found no ship on validation.

    Why a second gate: the submission's threshold is tuned for the Kaggle F2, where one false
    ship makes a ship-free image score 0, so it also filters false ships and may gate out ship
    tiles (the demo's 0.9 kept 48 of the 54 ships its detector found). In a scene the gate is
    there for speed; a ship it drops is lost (BENCHMARKS.md, "Scene detection").
    """
    values = np.sort(np.asarray(found_ship_p_ship, dtype=np.float64))[::-1]
    values = values[np.isfinite(values)]
    if gate <= 0 or ship_recall <= 0 or not len(values):
        return float(gate)
    keep = min(len(values), max(1, math.floor(min(float(ship_recall), 1.0) * len(values) + 0.5)))
    return float(min(gate, values[keep - 1]))


def get_scene_thresholds(cfg, thresholds_file: str | Path | None = None,
                         overridden: Iterable[str] = ()) -> tuple[Thresholds, dict]:
    """:func:`get_thresholds` for scenes: the classifier threshold lowered to the scene gate.

    The scene gate (:func:`get_scene_gate_threshold` at ``DETECT.GATE_SHIP_RECALL``) comes from the
    ``scene_gate`` block that tuning writes into thresholds.yaml. It applies only when the
    classifier threshold itself came from that file: not when ``SUBMIT.CLASSIFIER_THRESHOLD`` is
    given on the command line, not with the config's threshold, not with ``GATE_SHIP_RECALL <= 0``.
    """
    import yaml

    thresholds, sources = get_thresholds(cfg, thresholds_file, overridden)
    recall = float(cfg.DETECT.GATE_SHIP_RECALL)
    path = Path(thresholds_file) if thresholds_file else module_config.get_submission_path(cfg, "thresholds")
    if recall <= 0 or thresholds.classifier <= 0 or sources["CLASSIFIER_THRESHOLD"] != str(path):
        return thresholds, sources
    block = (yaml.safe_load(path.read_text()) or {}).get(SCENE_GATE_KEY)
    if not block:
        logger.info("%s has no %s block (tuned by an earlier version; `module_submit.py tune` writes it): scenes are "
                    "gated at the submission's classifier threshold %s", path, SCENE_GATE_KEY, thresholds.classifier)
        return thresholds, sources
    found = [float(v) for v in block.get("found_ship_p_ship") or []]
    gate = get_scene_gate_threshold(found, recall, thresholds.classifier)
    if gate < thresholds.classifier:
        kept = sum(v >= gate for v in found)
        sources["CLASSIFIER_THRESHOLD"] = (f"{path}, lowered from {thresholds.classifier} by DETECT.GATE_SHIP_RECALL "
                                           f"{recall}: keeps {kept} of the {len(found)} ships the detector found on "
                                           f"validation, against {sum(v >= thresholds.classifier for v in found)}")
        thresholds = dataclasses.replace(thresholds, classifier=gate)
    return thresholds, sources


# ============================================================================ callables for the gated pipeline
def build_p_ship_fn(cfg, classifier_path: str | Path | None = None, tta: bool | None = None) -> PShipFn:
    """A :data:`PShipFn` over the run's exported classifier (``CLASSIFIER.BATCH_SIZE``, ``.TTA``, ``.PRECISION``;
    ``tta`` given: flip TTA or not, whatever ``CLASSIFIER.TTA`` says).

    Unreadable images get NaN (they are listed by the caller, which knows why)."""
    import module_classifier  # here: tuning, submission and scenes need it; training the detector does not

    path = Path(classifier_path) if classifier_path else module_config.get_classifier_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"classifier {path} does not exist; train it with module_classifier.py, "
                                "pass --classifier, or set SUBMIT.CLASSIFIER_THRESHOLD 0 to run ungated")
    learner = module_classifier.load_classifier(path)

    def p_ship_fn(paths: Sequence[Path]) -> np.ndarray:
        frame = module_classifier.predict_p_ship(learner, list(paths), batch_size=cfg.CLASSIFIER.BATCH_SIZE,
                                                 tta=cfg.CLASSIFIER.TTA if tta is None else bool(tta),
                                                 num_workers=cfg.CLASSIFIER.NUM_WORKERS, on_bad_image="skip",
                                                 progress=False, precision=cfg.CLASSIFIER.PRECISION)
        by_id = frame.set_index("ImageId")["p_ship"]  # skipped (unreadable) images are absent: NaN
        return by_id.reindex([Path(p).name for p in paths]).to_numpy(dtype=np.float64)

    return p_ship_fn


def get_merge_args(cfg) -> dict:
    """:func:`predict_instances`' fragment-merge arguments from the config (``SUBMIT.MERGE_*``)."""
    return {"merge_ios": float(cfg.SUBMIT.MERGE_IOS), "merge_min_score": float(cfg.SUBMIT.MERGE_MIN_SCORE)}


# How far under the lowest score a prediction keeps the detector's own score filter is set
# (set_score_floor): more than a bf16 or fp16 score's rounding near any threshold, so a detection
# the float32 comparison of apply_thresholds keeps is never filtered inside the model.
SCORE_FLOOR_MARGIN = 0.01


def lowest_kept_score(cfg, thresholds: Thresholds) -> float | None:
    """The lowest detection score a prediction with ``thresholds`` can use (:func:`apply_thresholds`:
    the score threshold, the lowest of the size-aware ones; with ``SUBMIT.MERGE_IOS`` > 0 also
    ``SUBMIT.MERGE_MIN_SCORE``: lower fragments join a ship's mask), or None when any detection can
    count (``SUBMIT.TTA``: a view's low score adds to a ship's merged score)."""
    if cfg.SUBMIT.TTA:
        return None
    lowest = min(thresholds.score_by_size) if thresholds.score_by_size else thresholds.score
    if float(cfg.SUBMIT.MERGE_IOS) > 0:
        lowest = min(lowest, float(cfg.SUBMIT.MERGE_MIN_SCORE))
    return float(lowest)


def set_score_floor(model: torch.nn.Module, min_score: float | None) -> float | None:
    """Raise the detector's own test score filter (detectron2's ``ROI_HEADS.SCORE_THRESH_TEST``,
    0.05 by default) to ``min_score - SCORE_FLOOR_MARGIN``, never lower it: detections no threshold
    keeps are then dropped before their masks are predicted, pasted at the image's size and copied
    out (the demo's models on 200 test tiles, AVX512: 5% of the detector's time with its fragment
    merging, which keeps fragments down to 0.1, 12% without). The detections kept are the
    same: the filter comes before the box NMS, which only ever removes a box for a higher-scoring
    one, and before the per-image top-k, which ranks by score. Returns the filter now in force, or
    None (``min_score`` None, or a model without a detectron2 box predictor)."""
    predictor = getattr(getattr(unwrap_model(model), "roi_heads", None), "box_predictor", None)
    if min_score is None or not hasattr(predictor, "test_score_thresh"):
        return None
    predictor.test_score_thresh = max(float(predictor.test_score_thresh), float(min_score) - SCORE_FLOOR_MARGIN)
    return predictor.test_score_thresh


def build_detect_fn(cfg, weights: str | Path | None = None, thresholds: Thresholds | None = None) -> DetectFn:
    """A :data:`DetectFn` over the run's detector, at ``DETECTOR.TEST_SIZE`` where set, else at the
    input size its checkpoint was trained at (:func:`load_detector`).

    ``SUBMIT.TTA`` turns on flip TTA; ``SUBMIT.BATCH_SIZE`` images per pass; ``SUBMIT.MERGE_IOS``
    (> 0) merges each ship's fragments (:func:`merge_fragments`). ``thresholds``: the ones the
    predictions will go through (:func:`apply_thresholds`); detections under all of them are then
    dropped inside the model (:func:`set_score_floor`). Without them (tuning, which sweeps the
    score threshold), every detection over the model's own test threshold comes out.
    """
    model = load_detector(cfg, weights)
    floor = set_score_floor(model, lowest_kept_score(cfg, thresholds) if thresholds is not None else None)
    logger.info("detector %s at input size %d (trained at %d), TTA %s%s", weights or get_default_weights_path(cfg),
                model.input_size, model.trained_size, cfg.SUBMIT.TTA,
                f", detections under {floor:.3f} dropped in the model" if floor is not None else "")

    def detect_fn(images: Sequence[np.ndarray]) -> list:
        return predict_instances(model, list(images), tta=cfg.SUBMIT.TTA, batch_size=cfg.SUBMIT.BATCH_SIZE,
                                 **get_merge_args(cfg))

    return detect_fn


# A callable giving p_ship for in-memory tiles: list of (H, W, 3) uint8 RGB arrays -> (N,) float array in [0, 1].
PShipArrayFn = Callable[[Sequence[np.ndarray]], np.ndarray]


def build_p_ship_array_fn(cfg, classifier_path: str | Path | None = None) -> PShipArrayFn:
    """A :data:`PShipArrayFn` over the run's exported classifier: :func:`build_p_ship_fn` for tiles
    held in memory (scene slices, ``module_detect``), with the same ``CLASSIFIER.BATCH_SIZE`` and
    ``.PRECISION``, and flip TTA as ``DETECT.GATE_TTA`` says (``module_classifier.predict_p_ship_arrays``)."""
    import module_classifier  # here: only gated prediction needs it

    path = Path(classifier_path) if classifier_path else module_config.get_classifier_path(cfg)
    if not path.is_file():
        raise FileNotFoundError(f"classifier {path} does not exist; train it with module_classifier.py, "
                                "pass --classifier, or set SUBMIT.CLASSIFIER_THRESHOLD 0 to run ungated")
    learner = module_classifier.load_classifier(path)
    # channels-last once here, not at every call (predict_p_ship_arrays leaves such a model as it is)
    learner.model.to(memory_format=torch.channels_last)

    def p_ship_array_fn(images: Sequence[np.ndarray]) -> np.ndarray:
        return module_classifier.predict_p_ship_arrays(learner, list(images), batch_size=cfg.CLASSIFIER.BATCH_SIZE,
                                                       tta=cfg.DETECT.GATE_TTA, precision=cfg.CLASSIFIER.PRECISION
                                                       ).astype(np.float64)

    return p_ship_array_fn
