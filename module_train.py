"""Mask R-CNN ship detector: training in resolution stages, validation by the competition F2, inference.

Training (``train_detector``) runs the stages of ``DETECTOR.STAGES`` in order, by default
256 -> 512 -> 768 px. Each stage

- really trains at its size: the mapper resizes image and masks to ``size x size`` and a guard
  checks, on the first iteration, that the batch entering the backbone has that size;
- starts from the previous stage's final weights (stage 1: ``MODEL.WEIGHTS``) with its own LR
  schedule (warmup, then steps at ``DETECTOR.LR_DECAY_AT`` of its iterations);
- has its own folder ``runs/<run>/detector/stage<i>_<size>/`` with checkpoints (written
  atomically), ``metrics.json`` (JSON lines) and TensorBoard events (losses, LR, validation
  metrics, ground-truth/prediction overlays);
- is validated every ``DETECTOR.EVAL_PERIOD`` iterations and at its end: competition F2
  (``module_metric.f2_masks`` after ``module_preprocessing.resolve_overlaps`` with
  ``SUBMIT.SCORE_THRESHOLD``/``SUBMIT.MIN_AREA``) and COCO AP (pycocotools). Every result is
  appended to ``runs/<run>/detector/val_metrics.jsonl``; the best weights over all stages by
  ``DETECTOR.BEST_METRIC`` (default: F2 on the validation images with ships, where the gated
  detector runs) go to ``runs/<run>/detector/model_best.pth`` (with ``model_best.json``: the
  metric, its value, F2, stage, input size).

Augmentations (training only, in `ShipDatasetMapper`): resize to the stage size, horizontal
flip, vertical flip, rotation uniform in +-``DETECTOR.ROTATION_DEG`` degrees (boxes recomputed
from the rotated masks), random brightness/contrast with std ``DETECTOR.LIGHTING_STD``.

    python module_train.py --config configs/demo.yaml                      # all stages
    python module_train.py --config configs/airbus.yaml --stage 2 --resume   # one stage, resumed
    torchrun --nproc_per_node 4 module_train.py --config configs/airbus.yaml SOLVER.IMS_PER_BATCH 16

Inference, shared with the submission code:

    model = load_detector(cfg, "runs/airbus/detector/model_best.pth")      # eval mode, on device
    preds = predict_instances(model, [rgb_uint8_image], input_size=768, tta=True)
    preds[0]["masks"]   # (N, H, W) bool at the image's own size; preds[0]["scores"] (N,) float32

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Iterator, Sequence
from urllib.parse import urlparse

import cv2
import numpy as np
import pycocotools.mask as mask_util
import torch
import torch.distributed as dist
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.data.samplers import TrainingSampler
from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
from detectron2.engine.train_loop import HookBase
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.structures import BitMasks, Instances
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, JSONWriter, TensorboardXWriter, get_event_storage
from detectron2.utils.file_io import PathManager
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from module_config import atomic_path, get_cfg, get_run_dir, save_cfg
from module_metric import f2_masks
from module_preprocessing import get_train_val_dicts, register_airbus_datasets, resolve_overlaps

logger = logging.getLogger(__name__)

# detectron2's model-zoo URL scheme and where its PathManager downloads it from.
DETECTRON2_URL_PREFIX = "detectron2://"
DETECTRON2_DOWNLOAD_URL = "https://dl.fbaipublicfiles.com/detectron2/"
# Collective operations wait this long, e.g. the other ranks at the barrier while rank 0 runs
# the validation hook on the whole validation subset.
DISTRIBUTED_TIMEOUT = datetime.timedelta(hours=2)
# TTA views as (name, numpy axis of an (H, W, ...) image to flip; None: the original).
TTA_VIEWS = (("original", None), ("hflip", 1), ("vflip", 0))


# ---------------------------------------------------------------- stages and config
@dataclasses.dataclass(frozen=True)
class Stage:
    """One resolution stage of ``DETECTOR.STAGES`` (index counts from 1)."""

    index: int
    size: int  # input side in px: images and masks are resized to size x size
    iterations: int
    base_lr: float
    warmup: int  # linear warmup iterations

    @property
    def name(self) -> str:
        return f"stage{self.index}_{self.size}"


def get_stages(cfg: CfgNode) -> list[Stage]:
    """``DETECTOR.STAGES`` checked and parsed; a bad entry raises ``ValueError`` naming it."""
    raw = cfg.DETECTOR.STAGES
    if not raw:
        raise ValueError("DETECTOR.STAGES is empty: give at least one [size, iterations, base LR, warmup]")
    stages = []
    for i, entry in enumerate(raw, start=1):
        where = f"DETECTOR.STAGES entry {i} ({list(entry) if isinstance(entry, (list, tuple)) else entry!r})"
        if not isinstance(entry, (list, tuple)) or len(entry) != 4:
            raise ValueError(f"{where}: expected [size, iterations, base LR, warmup iterations]")
        size, iterations, base_lr, warmup = entry
        if isinstance(size, bool) or not isinstance(size, (int, float)) or size != int(size):
            raise ValueError(f"{where}: input size {size!r} must be an integer number of pixels")
        if not 32 <= size <= 4096 or int(size) % 32:
            raise ValueError(
                f"{where}: input size {size} must be a multiple of 32 between 32 and 4096 "
                "(the FPN pads inputs to multiples of 32)"
            )
        if isinstance(iterations, bool) or not isinstance(iterations, (int, float)) or iterations != int(iterations) or iterations < 1:
            raise ValueError(f"{where}: iterations {iterations!r} must be a positive integer")
        if not isinstance(base_lr, (int, float)) or not base_lr > 0:
            raise ValueError(f"{where}: base LR {base_lr!r} must be a positive number")
        if not isinstance(warmup, (int, float)) or warmup != int(warmup) or warmup < 0:
            raise ValueError(f"{where}: warmup {warmup!r} must be a non-negative integer")
        stages.append(Stage(i, int(size), int(iterations), float(base_lr), int(warmup)))
    return stages


def get_stage(cfg: CfgNode, index: int) -> Stage:
    """Stage ``index`` (from 1) of ``DETECTOR.STAGES``; ``ValueError`` when there is none."""
    stages = get_stages(cfg)
    if not 1 <= index <= len(stages):
        raise ValueError(f"stage {index} does not exist: DETECTOR.STAGES has stages 1..{len(stages)}")
    return stages[index - 1]


def get_detector_dir(cfg: CfgNode) -> Path:
    """``runs/<run>/detector`` (created)."""
    path = get_run_dir(cfg) / "detector"
    path.mkdir(parents=True, exist_ok=True)
    return path


def get_stage_dir(cfg: CfgNode, stage: Stage) -> Path:
    """``runs/<run>/detector/stage<i>_<size>`` (not created)."""
    return get_run_dir(cfg) / "detector" / stage.name


def uses_random_init(cfg: CfgNode) -> bool:
    """True when ``MODEL.WEIGHTS`` is empty: the backbone then needs trainable norms."""
    return not cfg.MODEL.WEIGHTS


def get_model_cfg(cfg: CfgNode, stage: Stage | None = None) -> CfgNode:
    """The detectron2 config of ``stage`` (architecture, input size, solver, output folder).

    Without a stage, the last stage's input size (inference). Random init (``MODEL.WEIGHTS``
    empty) replaces FrozenBN by ``DETECTOR.RANDOM_INIT_NORM`` and trains every layer
    (``FREEZE_AT`` 0): FrozenBN keeps the random statistics frozen and diverges within a few
    iterations. This depends only on ``MODEL.WEIGHTS`` of ``cfg``, so training and
    `load_detector` build the same architecture.
    """
    stage = stage or get_stages(cfg)[-1]
    out = cfg.clone()
    out.defrost()
    out.INPUT.MIN_SIZE_TRAIN = (stage.size,)
    out.INPUT.MAX_SIZE_TRAIN = stage.size
    out.INPUT.MIN_SIZE_TEST = stage.size
    out.INPUT.MAX_SIZE_TEST = stage.size
    out.SOLVER.MAX_ITER = stage.iterations
    out.SOLVER.BASE_LR = stage.base_lr
    out.SOLVER.WARMUP_ITERS = stage.warmup
    out.SOLVER.STEPS = tuple(sorted({int(f * stage.iterations) for f in cfg.DETECTOR.LR_DECAY_AT if 0 < f < 1}))
    out.OUTPUT_DIR = str(get_stage_dir(cfg, stage))
    if uses_random_init(cfg):
        out.MODEL.RESNETS.NORM = cfg.DETECTOR.RANDOM_INIT_NORM
        out.MODEL.BACKBONE.FREEZE_AT = 0
    out.freeze()
    return out


# ---------------------------------------------------------------- weights
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


class AtomicCheckpointer(DetectionCheckpointer):
    """detectron2's checkpointer with atomic writes and the stage recorded in every file.

    A crash mid-save leaves the previous checkpoint and ``last_checkpoint`` tag intact. Files are
    plain tensors, ints and floats, so torch>=2.6's default ``torch.load(weights_only=True)``
    loads them (optimizer and LR-scheduler state included).
    """

    def __init__(self, model, save_dir: str = "", *, extra_state: dict | None = None, **checkpointables):
        super().__init__(model, save_dir, **checkpointables)
        self.extra_state = dict(extra_state or {})

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk:
            return
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(self.extra_state)
        data.update(kwargs)
        basename = f"{name}.pth"
        save_file = Path(self.save_dir) / basename
        self.logger.info(f"Saving checkpoint to {save_file}")
        with atomic_path(save_file) as tmp:
            torch.save(data, tmp)
        self.tag_last_checkpoint(basename)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        with atomic_path(Path(self.save_dir) / "last_checkpoint") as tmp:
            tmp.write_text(last_filename_basename)


# ---------------------------------------------------------------- data
class RandomBrightnessContrast(T.Augmentation):
    """Random lighting: brightness and contrast factors drawn from N(1, std) (photometric only)."""

    def __init__(self, std: float):
        super().__init__()
        self.std = std

    def get_transform(self, image: np.ndarray) -> T.Transform:
        brightness, contrast = np.random.normal(1.0, self.std, size=2).clip(0.0, None)
        return T.TransformList(
            [
                T.BlendTransform(src_image=0.0, src_weight=1 - brightness, dst_weight=brightness),
                T.BlendTransform(src_image=float(image.mean()), src_weight=1 - contrast, dst_weight=contrast),
            ]
        )


def build_augmentations(cfg: CfgNode, input_size: int, is_train: bool) -> list[T.Augmentation]:
    """Resize to ``input_size`` square, then (training) flips, rotation and lighting."""
    augs: list[T.Augmentation] = [T.Resize((input_size, input_size))]
    if not is_train:
        return augs
    d = cfg.DETECTOR
    if d.HFLIP_PROB > 0:
        augs.append(T.RandomFlip(prob=d.HFLIP_PROB, horizontal=True, vertical=False))
    if d.VFLIP_PROB > 0:
        augs.append(T.RandomFlip(prob=d.VFLIP_PROB, horizontal=False, vertical=True))
    if d.ROTATION_DEG > 0:
        # Degrees (cv2 convention), not radians or fractions: +-20 means +-20 degrees.
        augs.append(T.RandomRotation([-d.ROTATION_DEG, d.ROTATION_DEG], expand=False, sample_style="range"))
    if d.LIGHTING_STD > 0:
        augs.append(RandomBrightnessContrast(d.LIGHTING_STD))
    return augs


def decode_annotation_masks(annotations: Sequence[dict], height: int, width: int) -> np.ndarray:
    """(N, H, W) uint8 0/1 masks of the dataset-dict annotations (COCO RLE, row-major arrays)."""
    masks = [mask_util.decode(a["segmentation"]) for a in annotations if not a.get("iscrowd", 0)]
    if not masks:
        return np.zeros((0, height, width), np.uint8)
    return np.stack(masks).astype(np.uint8)


def masks_to_instances(masks: np.ndarray | Sequence[np.ndarray], image_size: tuple[int, int]) -> Instances:
    """Ground-truth ``Instances`` from (N, H, W) 0/1 masks; boxes are the masks' tight boxes.

    Masks with no pixel left (e.g. rotated out of the image) are dropped. Boxes are XYXY with an
    exclusive max corner, recomputed from the masks (never transformed boxes, which grow).
    """
    masks = [np.asarray(m, bool) for m in masks]
    masks = [m for m in masks if m.any()]
    instances = Instances(image_size)
    tensor = torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, *image_size), dtype=torch.bool)
    bitmasks = BitMasks(tensor)
    instances.gt_masks = bitmasks
    instances.gt_boxes = bitmasks.get_bounding_boxes()
    instances.gt_classes = torch.zeros(len(masks), dtype=torch.int64)
    return instances


class ShipDatasetMapper:
    """Dataset dict -> model input: image resized to ``input_size`` square, augmented when training.

    Output: a copy of the dict (the input is deep-copied, never modified) with ``image`` a
    (3, S, S) uint8 tensor in ``INPUT.FORMAT`` channel order and, when training, ``instances``
    with ``gt_masks`` (BitMasks, (N, S, S) bool), ``gt_boxes`` (tight boxes of those masks) and
    ``gt_classes`` (0 = ship). Masks go through the same geometric transforms as the image
    (nearest-neighbour), so they stay aligned.
    """

    def __init__(self, cfg: CfgNode, input_size: int, is_train: bool = True):
        self.input_size = input_size
        self.is_train = is_train
        self.image_format = cfg.INPUT.FORMAT
        self.augmentations = T.AugmentationList(build_augmentations(cfg, input_size, is_train))

    def __call__(self, dataset_dict: dict) -> dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = detection_utils.read_image(dataset_dict["file_name"], format=self.image_format)
        detection_utils.check_image_size(dataset_dict, image)
        aug_input = T.AugInput(image)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        annotations = dataset_dict.pop("annotations", [])
        if self.is_train:
            masks = decode_annotation_masks(annotations, dataset_dict["height"], dataset_dict["width"])
            masks = [transforms.apply_segmentation(m) for m in masks]
            dataset_dict["instances"] = masks_to_instances(masks, image.shape[:2])
        return dataset_dict


def select_training_dicts(dicts: Sequence[dict], empty_fraction: float, seed: int) -> list[dict]:
    """Every image with ships plus ship-free hard negatives making ``empty_fraction`` of the result.

    Negatives are a random (seeded) sample of the ship-free images; the result keeps the input
    order. Raises ``ValueError`` when there is no image with ships.
    """
    if not 0 <= empty_fraction < 1:
        raise ValueError(f"DETECTOR.EMPTY_FRACTION must be in [0, 1), got {empty_fraction}")
    ship_ids = [i for i, d in enumerate(dicts) if d["annotations"]]
    empty_ids = [i for i, d in enumerate(dicts) if not d["annotations"]]
    if not ship_ids:
        raise ValueError(
            f"the detector's training split has no image with ships ({len(dicts)} images, "
            f"{len(empty_ids)} ship-free): check DATA.TRAIN_CSV and DATA.MAX_IMAGES"
        )
    n_empty = min(len(empty_ids), round(empty_fraction / (1 - empty_fraction) * len(ship_ids)))
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(empty_ids), size=n_empty, replace=False) if n_empty else []
    keep = sorted(ship_ids + [empty_ids[j] for j in chosen])
    return [dicts[i] for i in keep]


def select_eval_dicts(dicts: Sequence[dict], max_images: int) -> list[dict]:
    """At most ``max_images`` (0: all) validation dicts, a fixed spread over the split."""
    if not max_images or len(dicts) <= max_images:
        return list(dicts)
    keep = np.linspace(0, len(dicts) - 1, max_images).round().astype(int)
    return [dicts[i] for i in sorted(set(keep.tolist()))]


# ---------------------------------------------------------------- inference
def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The detector inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode (no grad) for the block and restore its previous mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield model
    finally:
        model.train(was_training)


def load_detector(cfg: CfgNode, weights: str | os.PathLike) -> torch.nn.Module:
    """The Mask R-CNN of ``cfg`` with ``weights`` loaded, in eval mode on ``cfg.MODEL.DEVICE``.

    ``model.input_size`` is the input size recorded in the checkpoint (the stage it was trained
    at; the last stage's size for files that do not record one).
    """
    weights = str(weights)
    if not weights or ("://" not in weights and not Path(weights).is_file()):
        raise FileNotFoundError(f"detector weights {weights!r} do not exist")
    model = build_model(get_model_cfg(cfg))
    extra = AtomicCheckpointer(model).load(resolve_weights(weights))
    model.input_size = int(extra.get("input_size", get_stages(cfg)[-1].size))
    model.eval()
    return model


def _to_model_inputs(images: Sequence[np.ndarray], input_size: int, input_format: str) -> list[dict]:
    inputs = []
    for i, image in enumerate(images):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array, got {image.shape} {image.dtype}")
        height, width = image.shape[:2]
        if input_format == "BGR":
            image = image[:, :, ::-1]
        resized = T.ResizeTransform(height, width, input_size, input_size).apply_image(np.ascontiguousarray(image))
        tensor = torch.as_tensor(np.ascontiguousarray(resized.transpose(2, 0, 1)))
        inputs.append({"image": tensor, "height": height, "width": width})
    return inputs


def _instances_to_prediction(instances: Instances) -> dict:
    instances = instances.to("cpu")
    masks = instances.pred_masks.numpy().astype(bool) if instances.has("pred_masks") else None
    if masks is None or len(instances) == 0:
        masks = np.zeros((0, *instances.image_size), bool)
    scores = instances.scores.numpy().astype(np.float32)
    order = np.argsort(-scores, kind="stable")
    return {"masks": masks[order], "scores": scores[order]}


def _encode_masks(masks: np.ndarray) -> list[dict]:
    if len(masks) == 0:
        return []
    return mask_util.encode(np.asfortranarray(masks.transpose(1, 2, 0).astype(np.uint8)))


def merge_tta_predictions(views: Sequence[dict], iou_threshold: float = 0.5) -> dict:
    """Merge per-view predictions (already un-flipped to the original frame) into one.

    Detections of all views are pooled and taken in score order; each unassigned detection
    gathers, from every other view, the unassigned detection with the highest mask IoU if that
    IoU is >= ``iou_threshold``. A group's mask is the pixels covered by at least half of its
    members (1: itself, 2: their union, 3: the majority); its score is the sum of the members'
    scores divided by the number of views, so a ship seen in one view only is down-weighted.
    Masks: (N, H, W) bool; the result may overlap (resolve overlaps afterwards).
    """
    n_views = len(views)
    masks = [v["masks"] for v in views]
    height, width = views[0]["masks"].shape[1:]
    entries = [(float(s), vi, di) for vi, v in enumerate(views) for di, s in enumerate(v["scores"])]
    if not entries:
        return {"masks": np.zeros((0, height, width), bool), "scores": np.zeros(0, np.float32)}
    entries.sort(key=lambda e: -e[0])
    rles = [_encode_masks(m) for m in masks]
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


def predict_instances(
    model: torch.nn.Module,
    images: Sequence[np.ndarray],
    input_size: int,
    tta: bool = False,
    batch_size: int = 8,
) -> list[dict]:
    """Masks and scores for each (H, W, 3) uint8 RGB image, at the image's own size.

    Each image is resized to ``input_size`` square (as in training), the model runs in batches
    of ``batch_size``, and masks are pasted back at (H, W). Returns one dict per image:
    ``masks`` (N, H, W) bool (row-major, may overlap) and ``scores`` (N,) float32, sorted by
    score, highest first. ``tta``: the original, horizontally and vertically flipped images are
    predicted, un-flipped and merged by `merge_tta_predictions`. The model's train/eval mode
    is restored afterwards.
    """
    net = unwrap_model(model)
    views = TTA_VIEWS if tta else TTA_VIEWS[:1]
    results: list[dict] = []
    with eval_mode(net):
        for start in range(0, len(images), batch_size):
            batch = list(images[start:start + batch_size])
            per_view = []
            for _, axis in views:
                flipped = batch if axis is None else [np.flip(image, axis) for image in batch]
                outputs = net.inference(_to_model_inputs(flipped, input_size, net.input_format))
                predictions = [_instances_to_prediction(o["instances"]) for o in outputs]
                if axis is not None:  # masks are (N, H, W): image axis a is mask axis a + 1
                    predictions = [{"masks": np.ascontiguousarray(np.flip(p["masks"], axis + 1)), "scores": p["scores"]} for p in predictions]
                per_view.append(predictions)
            if not tta:
                results += per_view[0]
            else:
                results += [merge_tta_predictions([view[i] for view in per_view]) for i in range(len(batch))]
    return results


# ---------------------------------------------------------------- validation
def _prediction_instances(masks: np.ndarray, scores: np.ndarray) -> Instances:
    instances = Instances(masks.shape[1:])
    bitmasks = BitMasks(torch.from_numpy(masks))
    instances.pred_masks = bitmasks.tensor
    instances.pred_boxes = bitmasks.get_bounding_boxes()
    instances.scores = torch.from_numpy(scores)
    instances.pred_classes = torch.zeros(len(scores), dtype=torch.int64)
    return instances


def compute_coco_ap(dicts: Sequence[dict], predictions: Sequence[dict]) -> dict[str, float]:
    """COCO box and mask AP (pycocotools, via ``COCOEvaluator(use_fast_impl=False)``).

    ``predictions[i]`` (``masks`` (N, H, W) bool, ``scores``) belongs to ``dicts[i]``; boxes are
    the masks' tight boxes. The dicts are registered under a temporary name for the evaluation
    only, so nothing stale is cached between runs. Returns e.g. ``segm_AP``, ``segm_AP50``,
    ``bbox_AP`` (percent, NaN without predictions).
    """
    name = f"_airbus_detector_eval_{os.getpid()}_{time.monotonic_ns()}"
    DatasetCatalog.register(name, lambda: list(dicts))
    MetadataCatalog.get(name).set(thing_classes=["ship"])
    quiet = [logging.getLogger(n) for n in ("detectron2.data.datasets.coco", "detectron2.evaluation.coco_evaluation")]
    levels = [q.level for q in quiet]
    for q in quiet:  # the conversion and the per-category tables would flood the training log
        q.setLevel(logging.WARNING)
    try:
        from detectron2.data.datasets.coco import convert_to_coco_json
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            json_file = os.path.join(tmp, "val_coco.json")
            convert_to_coco_json(name, json_file, allow_cached=False)
            MetadataCatalog.get(name).set(json_file=json_file)
            evaluator = COCOEvaluator(name, tasks=("bbox", "segm"), distributed=False, output_dir=None, use_fast_impl=False)
            evaluator.reset()
            for d, p in zip(dicts, predictions):
                evaluator.process([{"image_id": d["image_id"]}], [{"instances": _prediction_instances(p["masks"], p["scores"])}])
            with contextlib.redirect_stdout(open(os.devnull, "w")):
                results = evaluator.evaluate()
    finally:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
        for q, level in zip(quiet, levels):
            q.setLevel(level)
    out = {}
    for task, metrics in (results or {}).items():
        for key in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            if key in metrics:
                out[f"{task}_{key}"] = float(metrics[key])
    return out


def evaluate_detector(cfg: CfgNode, model: torch.nn.Module, dicts: Sequence[dict], input_size: int) -> tuple[dict, list[dict]]:
    """Competition F2 and COCO AP of ``model`` on ``dicts`` at ``input_size``.

    Predictions come from `predict_instances` (no TTA), then ``resolve_overlaps`` with
    ``SUBMIT.SCORE_THRESHOLD``/``SUBMIT.MIN_AREA`` as in a submission, then ``f2_masks`` per image.
    COCO AP uses the raw predictions (every score). Returns (metrics, per-image predictions
    after overlap removal): ``f2`` (mean over images), ``f2_ships`` / ``f2_empty`` (over images
    with / without ships), ``f2_all_empty_baseline`` (the score of predicting nothing), counts
    and the ``segm_*``/``bbox_*`` APs.
    """
    f2s, has_ships, raw, resolved = [], [], [], []
    batch = cfg.DETECTOR.EVAL_BATCH_SIZE
    for start in tqdm(range(0, len(dicts), batch), desc=f"validation @ {input_size}px", leave=False):
        chunk = dicts[start:start + batch]
        images = [detection_utils.read_image(d["file_name"], format="RGB") for d in chunk]
        for d, prediction in zip(chunk, predict_instances(model, images, input_size, batch_size=batch)):
            masks, scores = resolve_overlaps(
                prediction["masks"], prediction["scores"], score_threshold=cfg.SUBMIT.SCORE_THRESHOLD, min_area=cfg.SUBMIT.MIN_AREA
            )
            true_masks = decode_annotation_masks(d["annotations"], d["height"], d["width"]).astype(bool)
            f2s.append(f2_masks(true_masks, masks))
            has_ships.append(len(true_masks) > 0)
            raw.append(prediction)
            resolved.append({"masks": masks, "scores": scores})
    f2s, has_ships = np.asarray(f2s, float), np.asarray(has_ships, bool)
    metrics = {
        "f2": float(f2s.mean()) if len(f2s) else float("nan"),
        "f2_ships": float(f2s[has_ships].mean()) if has_ships.any() else float("nan"),
        "f2_empty": float(f2s[~has_ships].mean()) if (~has_ships).any() else float("nan"),
        "f2_all_empty_baseline": float((~has_ships).mean()) if len(f2s) else float("nan"),
        "n_images": int(len(f2s)),
        "n_ship_images": int(has_ships.sum()),
        "n_predicted": int(sum(len(p["scores"]) for p in resolved)),
    }
    metrics.update(compute_coco_ap(dicts, raw))
    return metrics, resolved


def draw_overlay(image: np.ndarray, true_masks: np.ndarray, pred_masks: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8 RGB with true mask outlines in green and predicted ones in red."""
    out = np.ascontiguousarray(image.copy())
    for masks, colour in ((true_masks, (0, 255, 0)), (pred_masks, (255, 0, 0))):
        for mask in masks:
            contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
            cv2.drawContours(out, contours, -1, colour, 1)
    return out


def _json_safe(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


BEST_METRICS = ("f2_ships", "f2")  # what DETECTOR.BEST_METRIC may name


class ValidationHook(HookBase):
    """Every ``DETECTOR.EVAL_PERIOD`` iterations and at the end of a stage: F2 and COCO AP.

    Runs on rank 0 (the others wait): writes ``val/*`` scalars and overlays to the event
    storage (TensorBoard, metrics.json), appends a line to ``val_metrics.jsonl`` and saves
    ``model_best.pth`` (+ ``model_best.json``) when ``DETECTOR.BEST_METRIC`` beats the best so far
    in this run.
    """

    def __init__(self, cfg: CfgNode, stage: Stage, val_dicts: Sequence[dict]):
        self.cfg = cfg
        self.stage = stage
        self.dicts = select_eval_dicts(val_dicts, cfg.DETECTOR.EVAL_MAX_IMAGES)
        self.period = cfg.DETECTOR.EVAL_PERIOD
        detector_dir = get_run_dir(cfg) / "detector"
        self.metrics_path = detector_dir / "val_metrics.jsonl"
        self.best_path = detector_dir / "model_best.pth"
        self.best_info_path = detector_dir / "model_best.json"

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if (self.period > 0 and next_iter % self.period == 0) or next_iter == self.trainer.max_iter:
            self.evaluate()

    def evaluate(self) -> dict | None:
        metrics = None
        if comm.is_main_process() and self.dicts:
            metrics = self._evaluate_main()
        comm.synchronize()
        return metrics

    def _evaluate_main(self) -> dict:
        iteration = self.trainer.iter
        model = unwrap_model(self.trainer.model)
        metrics, predictions = evaluate_detector(self.cfg, model, self.dicts, self.stage.size)
        storage = get_event_storage()
        storage.put_scalars(**{f"val/{k}": v for k, v in metrics.items() if isinstance(v, float) and math.isfinite(v)}, smoothing_hint=False)
        self._put_overlays(storage, predictions)
        record = {"stage": self.stage.index, "input_size": self.stage.size, "iteration": iteration, **metrics}
        record = {k: _json_safe(v) for k, v in record.items()}
        self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        previous = self.metrics_path.read_text() if self.metrics_path.exists() else ""
        with atomic_path(self.metrics_path) as tmp:
            tmp.write_text(previous + json.dumps(record) + "\n")
        logger.info(
            f"[{self.stage.name}] validation @ iter {iteration}: F2 {metrics['f2']:.4f} (ships {metrics['f2_ships']:.4f}, "
            f"empty {metrics['f2_empty']:.4f}, all-empty baseline {metrics['f2_all_empty_baseline']:.4f}), "
            f"segm AP {metrics.get('segm_AP', float('nan')):.2f}, {metrics['n_predicted']} masks on {metrics['n_images']} images"
        )
        metric = self.cfg.DETECTOR.BEST_METRIC
        if not math.isfinite(metrics[metric]):  # e.g. f2_ships on a validation set without ships
            metric = "f2"
        best = json.loads(self.best_info_path.read_text()) if self.best_info_path.exists() else {}
        best.setdefault("value", -1.0)
        if metrics[metric] > best["value"]:
            info = {"metric": metric, "value": metrics[metric], "f2": metrics["f2"], "f2_ships": _json_safe(metrics["f2_ships"]),
                    "stage": self.stage.index, "input_size": self.stage.size, "iteration": iteration}
            with atomic_path(self.best_path) as tmp:
                torch.save({"model": model.state_dict(), **info}, tmp)
            with atomic_path(self.best_info_path) as tmp:
                tmp.write_text(json.dumps(info, indent=1))
            logger.info(f"new best {metric} {metrics[metric]:.4f} (was {best['value']:.4f}): saved {self.best_path}")
        return metrics

    def _put_overlays(self, storage, predictions: Sequence[dict]) -> None:
        order = sorted(range(len(self.dicts)), key=lambda i: not self.dicts[i]["annotations"])
        for k, i in enumerate(order[: self.cfg.DETECTOR.VIS_IMAGES]):
            d = self.dicts[i]
            image = detection_utils.read_image(d["file_name"], format="RGB")
            true_masks = decode_annotation_masks(d["annotations"], d["height"], d["width"])
            overlay = draw_overlay(image, true_masks, predictions[i]["masks"])
            storage.put_image(f"val/overlay_{k}_{Path(d['file_name']).stem}", overlay.transpose(2, 0, 1).astype(np.float32) / 255)


class InputSizeGuard(HookBase):
    """Checks, on a stage's first iteration, that the batch entering the backbone has the stage size.

    Logs ``[stage<i>_<size>] backbone input (N, 3, S, S)``; raises ``RuntimeError`` otherwise.
    This is what makes "every stage trained at 768" impossible.
    """

    def __init__(self, stage: Stage):
        self.stage = stage
        self.seen_shape: tuple[int, ...] | None = None
        self._handle = None

    def before_train(self) -> None:
        backbone = unwrap_model(self.trainer.model).backbone
        self._handle = backbone.register_forward_pre_hook(self._check)

    def _check(self, module, args) -> None:
        shape = tuple(args[0].shape)
        self._handle.remove()
        self.seen_shape = shape
        expected = (self.stage.size, self.stage.size)
        if shape[-2:] != expected:
            raise RuntimeError(f"[{self.stage.name}] the backbone received inputs of {shape[-2:]}, expected {expected}")
        logger.info(f"[{self.stage.name}] backbone input {shape}: the model trains at {self.stage.size}x{self.stage.size} px")

    def after_train(self) -> None:
        if self._handle is not None:
            self._handle.remove()


class _StagePrefix(logging.LoggerAdapter):
    def process(self, msg, kwargs):
        return f"[{self.extra['tag']}] {msg}", kwargs


# ---------------------------------------------------------------- distributed
def init_distributed(device: str) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment; (rank, world size).

    gloo on CPU, NCCL on GPU. Without ``WORLD_SIZE`` > 1 (a plain ``python`` run) nothing is
    done. Also sets detectron2's per-machine process group, which its ``launch`` would set.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    use_cuda = device.startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method="env://", timeout=DISTRIBUTED_TIMEOUT)
    for machine in range(world_size // local_world):
        group = dist.new_group(list(range(machine * local_world, (machine + 1) * local_world)))
        if machine == rank // local_world:
            comm._LOCAL_PROCESS_GROUP = group
    return rank, world_size


def wrap_distributed(model: torch.nn.Module, device: str) -> torch.nn.Module:
    """DDP-wrap ``model`` when running distributed (``device_ids`` only on GPU), else unchanged."""
    if comm.get_world_size() <= 1:
        return model
    if device.startswith("cuda"):
        return DistributedDataParallel(model, device_ids=[comm.get_local_rank()], broadcast_buffers=False)
    return DistributedDataParallel(model, broadcast_buffers=False)


def parameter_digest(model: torch.nn.Module) -> str:
    """SHA-256 (16 hex digits) of every parameter's bytes: equal across ranks iff the replicas are."""
    digest = hashlib.sha256()
    for parameter in unwrap_model(model).parameters():
        digest.update(parameter.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


# ---------------------------------------------------------------- training
def build_stage_trainer(
    cfg: CfgNode, stage: Stage, train_dicts: Sequence[dict], val_dicts: Sequence[dict], init_weights: str, resume: bool
) -> SimpleTrainer:
    """A detectron2 ``SimpleTrainer`` for ``stage`` with its hooks, loaded and ready to ``train``.

    ``init_weights`` ("" = random init) seeds the model unless ``resume`` finds a checkpoint
    in the stage folder, which then restores model, optimizer, LR schedule and iteration.
    ``trainer.start_iter`` / ``trainer.stage_max_iter`` say where it goes.
    """
    model_cfg = get_model_cfg(cfg, stage)
    device = model_cfg.MODEL.DEVICE
    stage_dir = Path(model_cfg.OUTPUT_DIR)
    model = build_model(model_cfg)
    optimizer = build_optimizer(model_cfg, model)
    scheduler = build_lr_scheduler(model_cfg, optimizer)
    model = wrap_distributed(model, device)
    checkpointer = AtomicCheckpointer(
        model, str(stage_dir), extra_state={"stage": stage.index, "input_size": stage.size}, optimizer=optimizer, scheduler=scheduler
    )
    loaded = checkpointer.resume_or_load(init_weights, resume=resume)
    start_iter = loaded.get("iteration", -1) + 1 if resume and checkpointer.has_checkpoint() else 0
    if resume and start_iter:
        logger.info(f"[{stage.name}] resuming from {checkpointer.get_checkpoint_file()} at iteration {start_iter}")

    seed = cfg.DETECTOR.SEED
    sampler = TrainingSampler(len(train_dicts), shuffle=True, seed=None if seed < 0 else seed + start_iter)
    loader = build_detection_train_loader(
        list(train_dicts),
        mapper=ShipDatasetMapper(cfg, stage.size, is_train=True),
        sampler=sampler,
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    trainer_class = AMPTrainer if cfg.SOLVER.AMP.ENABLED and device.startswith("cuda") else SimpleTrainer
    trainer = trainer_class(model, loader, optimizer)
    trainer.start_iter = start_iter
    trainer.stage_max_iter = stage.iterations
    trainer.checkpointer = checkpointer
    trainer.input_size_guard = InputSizeGuard(stage)

    writers = []
    if comm.is_main_process():
        stage_dir.mkdir(parents=True, exist_ok=True)
        printer = CommonMetricPrinter(stage.iterations)
        printer.logger = _StagePrefix(printer.logger, {"tag": f"stage {stage.index}/{len(get_stages(cfg))} @ {stage.size}px"})
        writers = [printer, JSONWriter(str(stage_dir / "metrics.json")), TensorboardXWriter(str(stage_dir))]
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            hooks.LRScheduler(optimizer=optimizer, scheduler=scheduler),
            trainer.input_size_guard,
            hooks.PeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=stage.iterations, max_to_keep=cfg.DETECTOR.MAX_CHECKPOINTS_KEPT or None),
            ValidationHook(cfg, stage, val_dicts),
            hooks.PeriodicWriter(writers, period=cfg.DETECTOR.LOG_PERIOD),
        ]
    )
    return trainer


def _set_aside(path: Path) -> None:
    """Rename an earlier output out of the way (nothing is deleted)."""
    if path.exists():
        target = path.with_name(f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        path.rename(target)
        logger.warning(f"moved the earlier {path} to {target}")


def train_stage(cfg: CfgNode, stage: Stage, train_dicts: Sequence[dict], val_dicts: Sequence[dict], resume: bool = False) -> Path:
    """Train one stage (see the module docstring); returns its ``model_final.pth``."""
    stages = get_stages(cfg)
    stage_dir = get_stage_dir(cfg, stage)
    if stage.index == 1:
        init_weights = resolve_weights(cfg.MODEL.WEIGHTS)
    else:
        previous = get_stage_dir(cfg, stages[stage.index - 2]) / "model_final.pth"
        if not previous.is_file():
            raise FileNotFoundError(
                f"{stage.name} starts from the previous stage's final weights {previous}, which do not exist: "
                f"train stage {stage.index - 1} first (--stage {stage.index - 1})"
            )
        init_weights = str(previous)
    if comm.is_main_process():
        if not resume and (stage_dir / "last_checkpoint").exists():
            logger.warning(f"{stage_dir} holds an earlier run of {stage.name}; starting it over (use --resume to continue it)")
            _set_aside(stage_dir)
            if stage.index == 1:
                for name in ("model_best.pth", "model_best.json"):
                    _set_aside(stage_dir.parent / name)
        stage_dir.mkdir(parents=True, exist_ok=True)
    comm.synchronize()
    logger.info(
        f"=== {stage.name}: stage {stage.index}/{len(stages)}, input {stage.size}x{stage.size} px, {stage.iterations} iterations, "
        f"base LR {stage.base_lr:g}, warmup {stage.warmup}, LR x{cfg.SOLVER.GAMMA:g} at {get_model_cfg(cfg, stage).SOLVER.STEPS}, "
        f"from {init_weights or 'random init'} -> {stage_dir}"
    )
    trainer = build_stage_trainer(cfg, stage, train_dicts, val_dicts, init_weights, resume)
    if trainer.start_iter >= stage.iterations:
        logger.info(f"[{stage.name}] already complete ({stage.iterations} iterations)")
    else:
        before = parameter_digest(trainer.model)
        trainer.train(trainer.start_iter, stage.iterations)
        _check_replicas_in_sync(stage, before, trainer.model)
    return stage_dir / "model_final.pth"


def _check_replicas_in_sync(stage: Stage, before: str, model: torch.nn.Module) -> None:
    """Compare the parameters of every rank after training (``RuntimeError`` if they differ)."""
    after = parameter_digest(model)
    digests = comm.all_gather(after)
    if len(set(digests)) > 1:
        raise RuntimeError(f"[{stage.name}] model replicas diverged across ranks: parameter digests {digests}")
    logger.info(f"[{stage.name}] parameters {before} -> {after}, identical on {len(digests)} rank(s)")


def seed_everything(cfg: CfgNode) -> None:
    """Seed torch/numpy/random with ``DETECTOR.SEED + rank`` (random seeds when SEED < 0)."""
    seed = cfg.DETECTOR.SEED
    seed_all_rng(None if seed < 0 else seed + comm.get_rank())


@contextlib.contextmanager
def _log_to_file(path: Path) -> Iterator[None]:
    """Copy INFO and above to ``path`` (rank 0) for the block, whatever the root logger's level."""
    root = logging.getLogger()
    handler, level = None, root.level
    if comm.is_main_process():
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("[%(asctime)s %(name)s %(levelname)s] %(message)s"))
        handler.setLevel(logging.INFO)
        root.addHandler(handler)
        if root.getEffectiveLevel() > logging.INFO:
            root.setLevel(logging.INFO)
    try:
        yield
    finally:
        if handler is not None:
            root.removeHandler(handler)
            root.setLevel(level)
            handler.close()


def train_detector(cfg: CfgNode, stage: int | None = None, resume: bool = False) -> Path:
    """Train the stages (all, or only ``stage``) and return the last trained stage's final weights.

    With ``resume``, stages already complete (``model_final.pth`` present) are skipped and the
    current stage continues from its last checkpoint with the same schedule. The best weights
    by ``DETECTOR.BEST_METRIC`` over all stages are ``runs/<run>/detector/model_best.pth``. Works under ``torchrun``
    (call `init_distributed` first; `main` does).
    """
    stages = get_stages(cfg)
    if cfg.DETECTOR.BEST_METRIC not in BEST_METRICS:
        raise ValueError(f"DETECTOR.BEST_METRIC {cfg.DETECTOR.BEST_METRIC!r}: expected one of {BEST_METRICS}")
    selected = stages if stage is None else [get_stage(cfg, stage)]
    resolve_weights(cfg.MODEL.WEIGHTS)  # fail before reading any data
    detector_dir = get_run_dir(cfg) / "detector"
    with _log_to_file(detector_dir / "log.txt"):
        if comm.is_main_process():
            save_cfg(cfg, get_detector_dir(cfg))
        if comm.get_world_size() > 1:
            logger.info(f"distributed: rank {comm.get_rank()} of {comm.get_world_size()} ({dist.get_backend()}); only rank 0 writes")
        if uses_random_init(cfg):
            logger.info(
                f'MODEL.WEIGHTS is "": random init, ResNet norm {cfg.DETECTOR.RANDOM_INIT_NORM} (not FrozenBN), '
                "BACKBONE.FREEZE_AT 0 (every layer trains)"
            )
        seed_everything(cfg)
        train_dicts, val_dicts = get_train_val_dicts(cfg)
        register_airbus_datasets(cfg)
        n_all = len(train_dicts)
        train_dicts = select_training_dicts(train_dicts, cfg.DETECTOR.EMPTY_FRACTION, max(cfg.DETECTOR.SEED, 0))
        n_empty = sum(not d["annotations"] for d in train_dicts)
        logger.info(
            f"detector training set: {len(train_dicts) - n_empty} images with ships + {n_empty} ship-free hard negatives "
            f"(of {n_all} training images); validation: {len(select_eval_dicts(val_dicts, cfg.DETECTOR.EVAL_MAX_IMAGES))} images"
        )
        final = None
        resuming = resume
        for current in selected:
            final_path = get_stage_dir(cfg, current) / "model_final.pth"
            if stage is None and resume and final_path.is_file():
                logger.info(f"[{current.name}] complete ({final_path} exists): skipped")
                final = final_path
                continue
            final = train_stage(cfg, current, train_dicts, val_dicts, resume=resuming)
            resuming = False  # later stages start fresh from this one
    return final


# ---------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the Mask R-CNN ship detector in resolution stages (runs under torchrun too).",
        epilog="example: python module_train.py --config configs/demo.yaml --stage 1 SOLVER.IMS_PER_BATCH 2",
    )
    parser.add_argument("--config", required=True, help="YAML config (configs/airbus.yaml, configs/demo.yaml)")
    parser.add_argument("--stage", type=int, default=None, help="train only this stage (1-based); default: all stages")
    parser.add_argument("--resume", action="store_true", help="continue the current stage from its last checkpoint")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def main(args: argparse.Namespace) -> Path:
    cfg = get_cfg(args.config, args.opts)
    rank, world_size = init_distributed(cfg.MODEL.DEVICE)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format="[%(asctime)s %(name)s %(levelname)s] %(message)s")
    try:
        final = train_detector(cfg, stage=args.stage, resume=args.resume)
        logger.info(f"final weights: {final}")
        return final
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
