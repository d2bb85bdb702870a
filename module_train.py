"""Mask R-CNN ship detector: training in resolution stages, validated by the competition F2.

    train_dicts, val_dicts = module_preprocessing.get_train_val_dicts(cfg)
    paths = train_detector(cfg, train_dicts, val_dicts)   # {"final": ..., "best": ..., ...}

Training (:func:`train_detector`) runs the stages of ``DETECTOR.STAGES`` in order, by default
256 -> 512 -> 768 px. Each stage

- really trains at its size: the mapper resizes image and masks to ``size x size`` and a guard
  checks, on the first iteration, that the batch entering the backbone has that size;
- starts from the previous stage's final weights (stage 1: ``MODEL.WEIGHTS``) with its own LR
  schedule (warmup, then steps at ``DETECTOR.LR_DECAY_AT`` of its iterations);
- has its own folder ``runs/<run>/detector/stage<i>_<size>/`` with checkpoints (written
  atomically), ``metrics.json`` (JSON lines) and TensorBoard events (losses, LR, validation
  metrics, ground-truth/prediction overlays);
- is validated every ``DETECTOR.EVAL_PERIOD`` iterations and at its end: competition F2
  (``module_metric.f2_masks`` after ``module_inference.resolve_overlaps`` with
  ``SUBMIT.SCORE_THRESHOLD``/``SUBMIT.MIN_AREA``) and COCO AP (pycocotools). Every result is
  appended to ``runs/<run>/detector/val_metrics.jsonl``; the best weights over all stages by
  ``DETECTOR.BEST_METRIC`` (default: F2 on the validation images with ships, where the gated
  detector runs; ties go by mask AP, then to the newer weights) go to
  ``runs/<run>/detector/model_best.pth`` (with ``model_best.json``: the metric, its value, F2,
  mask AP, stage, input size).

Augmentations (training only, in `ShipDatasetMapper`): resize to the stage size, a square crop
of ``DETECTOR.CROP_SIZE`` px around a random ship of the tile (0: none; :class:`ShipCrop`), horizontal
flip, vertical flip, rotation uniform in +-``DETECTOR.ROTATION_DEG`` degrees (boxes recomputed
from the rotated masks), random brightness/contrast with std ``DETECTOR.LIGHTING_STD``.

    python module_train.py --config configs/demo.yaml                      # all stages
    python module_train.py --config configs/airbus.yaml --stage 2 --resume   # one stage, resumed
    torchrun --nproc_per_node 4 module_train.py --config configs/airbus.yaml SOLVER.IMS_PER_BATCH 16

The model's stages and detectron2 config are ``module_config``'s (:func:`module_config.get_stages`,
:func:`module_config.get_model_cfg`); prediction, in validation as everywhere, is
``module_inference``'s, whose resize is the first step of this module's training mapper.

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
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

import module_config  # first: it imports detectron2 quietly (see there)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog, build_detection_train_loader
from detectron2.data import transforms as T
from detectron2.engine import AMPTrainer, SimpleTrainer, hooks
from detectron2.engine.train_loop import HookBase
from detectron2.evaluation import COCOEvaluator
from detectron2.modeling import build_model
from detectron2.solver import build_lr_scheduler, build_optimizer
from detectron2.solver.lr_scheduler import LRMultiplier
from detectron2.structures import BitMasks, BoxMode, Instances
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.events import CommonMetricPrinter, EventStorage, JSONWriter, TensorboardXWriter, get_event_storage
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from module_config import (Stage, get_detector_dir, get_detector_path, get_model_cfg, get_stage,
                           get_stage_dir, get_stage_path, get_stages, save_cfg, uses_random_init)
from module_files import atomic_path, read_image, set_aside
from module_inference import (get_eval_augmentations, get_merge_args, predict_instances, resolve_overlaps,
                              resolve_weights, unwrap_model)
from module_metric import f2_masks
from module_plots import draw_outlines
from module_progress import ProgressReporter, median_step_seconds
from module_rle import coco_to_masks

logger = logging.getLogger(__name__)

# Collective operations wait this long, e.g. the other ranks at the barrier while rank 0 runs
# the validation hook on the whole validation subset.
DISTRIBUTED_TIMEOUT = datetime.timedelta(hours=2)


# ---------------------------------------------------------------- checkpoints
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


class ShipCrop(T.Augmentation):
    """A ``size`` x ``size`` crop that holds a ship: one of the image's boxes (XYXY, after the
    resize) drawn at random, the crop placed at random among those that hold all of it (those that
    hold its centre when it is larger than the crop); a random crop on a ship-free image. An image
    no larger than ``size`` is left as it is.

    Why: the ships are small, and most of a tile is sea. A crop around a ship costs the backbone a
    fraction of the tile (a quarter at half the side) and keeps the ship, so a training budget
    buys more ships per second; the network is convolutional, so it predicts whole tiles as before.
    """

    input_args = ("image", "boxes")

    def __init__(self, size: int):
        super().__init__()
        self.size = int(size)

    @staticmethod
    def _origin(lo: float, hi: float, limit: int, size: int) -> int:
        """A random crop start in ``[0, limit - size]`` whose crop holds ``[lo, hi)`` where it fits,
        else the middle of it."""
        if hi - lo > size:
            lo = hi = (lo + hi) / 2
        first = max(0, math.ceil(hi) - size)
        last = min(limit - size, math.floor(lo))
        return int(np.random.randint(first, last + 1)) if last >= first else int(np.clip(round(lo), 0, limit - size))

    def get_transform(self, image: np.ndarray, boxes: np.ndarray | None) -> T.Transform:
        h, w = image.shape[:2]
        ch, cw = min(self.size, h), min(self.size, w)
        if (ch, cw) == (h, w):
            return T.NoOpTransform()
        if boxes is not None and len(boxes):
            x0, y0, x1, y1 = np.asarray(boxes, float)[np.random.randint(len(boxes))]
            left, top = self._origin(x0, x1, w, cw), self._origin(y0, y1, h, ch)
        else:
            left, top = np.random.randint(w - cw + 1), np.random.randint(h - ch + 1)
        return T.CropTransform(int(left), int(top), cw, ch, orig_w=w, orig_h=h)


def build_augmentations(cfg: CfgNode, input_size: int, is_train: bool) -> list[T.Augmentation]:
    """Resize to ``input_size`` square (``module_inference.get_eval_augmentations``: what inference
    does too), then (training) the crop around a ship (``DETECTOR.CROP_SIZE``), flips, rotation and
    lighting."""
    augs: list[T.Augmentation] = get_eval_augmentations(input_size)
    if not is_train:
        return augs
    d = cfg.DETECTOR
    if 0 < d.CROP_SIZE < input_size:
        augs.append(ShipCrop(d.CROP_SIZE))
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
    """(N, H, W) uint8 0/1 masks of the dataset-dict annotations (COCO RLE; row-major arrays). uint8, not
    bool: detectron2's resize of a segmentation takes the PIL path for uint8 only."""
    return coco_to_masks([a["segmentation"] for a in annotations if not a.get("iscrowd", 0)],
                         (height, width)).view(np.uint8)


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
    """Dataset dict -> model input: image resized to ``input_size`` square, augmented when training
    (then ``DETECTOR.CROP_SIZE`` square where that crop is on: :func:`training_input_size`).

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
        aug_seed = dataset_dict.pop("aug_seed", None)
        if aug_seed is not None:  # the augmentations of this sample depend on its stream position only
            np.random.seed(np.random.SeedSequence(aug_seed).generate_state(1)[0])
        image = read_image(dataset_dict["file_name"])  # the one image policy: complete, RGB
        expected = (dataset_dict["height"], dataset_dict["width"])
        if image.shape[:2] != expected:
            raise ValueError(f"{dataset_dict['file_name']}: image is {image.shape[1]}x{image.shape[0]}, its dataset "
                             f"dict says {expected[1]}x{expected[0]}")
        if self.image_format == "BGR":
            image = image[:, :, ::-1]
        annotations = dataset_dict.pop("annotations", [])
        boxes = np.array([BoxMode.convert(a["bbox"], a["bbox_mode"], BoxMode.XYXY_ABS) for a in annotations
                          if not a.get("iscrowd", 0)], float).reshape(-1, 4)  # where ShipCrop looks for ships
        aug_input = T.AugInput(np.ascontiguousarray(image), boxes=boxes)
        transforms = self.augmentations(aug_input)
        image = aug_input.image
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
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

    Predictions come from `predict_instances` (no TTA; fragments merged as ``SUBMIT.MERGE_IOS``
    says), then ``resolve_overlaps`` with
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
        images = [read_image(d["file_name"]) for d in chunk]
        for d, prediction in zip(chunk, predict_instances(model, images, input_size, batch_size=batch,
                                                          **get_merge_args(cfg))):
            masks, scores = resolve_overlaps(
                prediction["masks"], prediction["scores"], score_threshold=cfg.SUBMIT.SCORE_THRESHOLD, min_area=cfg.SUBMIT.MIN_AREA
            )
            true_masks = decode_annotation_masks(d["annotations"], d["height"], d["width"])
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


def _json_safe(value):
    return None if isinstance(value, float) and not math.isfinite(value) else value


def _best_key(value, segm_ap) -> tuple[float, float]:
    finite = lambda v: float(v) if v is not None and math.isfinite(float(v)) else -1.0  # noqa: E731
    return finite(value), finite(segm_ap)


def is_new_best(metrics: dict, metric: str, best: dict) -> bool:
    """Whether a validation's ``metrics`` replace ``best`` (``model_best.json``'s content, ``{}``: none yet).

    Compared on ``metric``, then on mask AP (``segm_AP``); an exact tie goes to the newer
    checkpoint, which has trained longer. An undertrained detector scores no mask above the
    validation's score threshold at every check (F2 on ship images 0 throughout, as on a slow
    CPU within a short budget): without the tie rules its first checkpoint would be kept and
    every later one, however much better its masks, thrown away.
    """
    if not best:
        return True
    return _best_key(metrics[metric], metrics.get("segm_AP")) >= _best_key(best.get("value"), best.get("segm_AP"))


class ValidationHook(HookBase):
    """Every ``DETECTOR.EVAL_PERIOD`` iterations and at the end of a stage: F2 and COCO AP.

    Runs on rank 0 (the others wait): writes ``val/*`` scalars and overlays to the event
    storage (TensorBoard, metrics.json), appends a line to ``val_metrics.jsonl`` and saves
    ``model_best.pth`` (+ ``model_best.json``) when ``DETECTOR.BEST_METRIC`` beats or ties the best
    so far in this run (:func:`is_new_best`).
    """

    def __init__(self, cfg: CfgNode, stage: Stage, val_dicts: Sequence[dict]):
        self.cfg = cfg
        self.stage = stage
        self.dicts = select_eval_dicts(val_dicts, cfg.DETECTOR.EVAL_MAX_IMAGES)
        self.period = cfg.DETECTOR.EVAL_PERIOD
        self.metrics_path = get_detector_path(cfg, "val_metrics")
        self.best_path = get_detector_path(cfg, "best")
        self.best_info_path = get_detector_path(cfg, "best_info")
        self.last_metrics: dict | None = None
        self.last_iteration: int | None = None  # the iteration last evaluated

    def after_step(self) -> None:
        next_iter = self.trainer.iter + 1
        if (self.period > 0 and next_iter % self.period == 0) or next_iter == self.trainer.max_iter:
            self.evaluate()

    def evaluate(self) -> dict | None:
        self.last_iteration = self.trainer.iter
        metrics = None
        if comm.is_main_process() and self.dicts:
            metrics = self._evaluate_main()
        comm.synchronize()
        return metrics

    def _evaluate_main(self) -> dict:
        iteration = self.trainer.iter
        model = unwrap_model(self.trainer.model)
        started = time.perf_counter()
        metrics, predictions = evaluate_detector(self.cfg, model, self.dicts, self.stage.size)
        metrics["seconds_per_image"] = (time.perf_counter() - started) / max(len(self.dicts), 1)
        self.last_metrics = metrics
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
        if is_new_best(metrics, metric, best):
            info = {"metric": metric, "value": metrics[metric], "f2": metrics["f2"], "f2_ships": _json_safe(metrics["f2_ships"]),
                    "segm_AP": _json_safe(metrics.get("segm_AP")),
                    "stage": self.stage.index, "input_size": self.stage.size, "iteration": iteration}
            with atomic_path(self.best_path) as tmp:
                torch.save({"model": model.state_dict(), **info}, tmp)
            with atomic_path(self.best_info_path) as tmp:
                tmp.write_text(json.dumps(info, indent=1))
            logger.info(f"new best {metric} {metrics[metric]:.4f}, segm AP {metrics.get('segm_AP', float('nan')):.2f} "
                        f"(was {best.get('value', float('nan')):.4f}, {_best_key(0, best.get('segm_AP'))[1]:.2f}): "
                        f"saved {self.best_path}")
        return metrics

    def _put_overlays(self, storage, predictions: Sequence[dict]) -> None:
        order = sorted(range(len(self.dicts)), key=lambda i: not self.dicts[i]["annotations"])
        for k, i in enumerate(order[: self.cfg.DETECTOR.VIS_IMAGES]):
            d = self.dicts[i]
            image = read_image(d["file_name"])
            true_masks = decode_annotation_masks(d["annotations"], d["height"], d["width"])
            overlay = draw_outlines(image, true_masks, predictions[i]["masks"])
            storage.put_image(f"val/overlay_{k}_{Path(d['file_name']).stem}", overlay.transpose(2, 0, 1).astype(np.float32) / 255)


def training_input_size(cfg: CfgNode, stage: Stage) -> int:
    """The side of the training inputs of ``stage``: its size, or ``DETECTOR.CROP_SIZE`` where that
    crop is on and smaller (the crop is cut from the image resized to the stage size)."""
    crop = int(cfg.DETECTOR.CROP_SIZE)
    return crop if 0 < crop < stage.size else stage.size


class InputSizeGuard(HookBase):
    """Checks, on a stage's first iteration, that the batch entering the backbone has the stage's
    training size (:func:`training_input_size`: the stage size, or the crop cut at that scale).

    Logs ``[stage<i>_<size>] backbone input (N, 3, S, S)``; raises ``RuntimeError`` otherwise.
    This is what makes "every stage trained at 768" impossible.
    """

    def __init__(self, stage: Stage, input_size: int | None = None):
        self.stage = stage
        self.input_size = stage.size if input_size is None else input_size
        self.seen_shape: tuple[int, ...] | None = None
        self._handle = None

    def before_train(self) -> None:
        backbone = unwrap_model(self.trainer.model).backbone
        self._handle = backbone.register_forward_pre_hook(self._check)

    def _check(self, module, args) -> None:
        shape = tuple(args[0].shape)
        self._handle.remove()
        self.seen_shape = shape
        divisor = max(1, getattr(module, "size_divisibility", 0) or 1)  # the model pads its batch to this
        side = -(-self.input_size // divisor) * divisor
        expected = (side, side)
        if shape[-2:] != expected:
            raise RuntimeError(f"[{self.stage.name}] the backbone received inputs of {shape[-2:]}, expected {expected}")
        crop = f" ({self.input_size} px crops of the image at {self.stage.size} px)" if self.input_size != self.stage.size else ""
        logger.info(f"[{self.stage.name}] backbone input {shape}: the model trains at {self.stage.size}x{self.stage.size} px{crop}")

    def after_train(self) -> None:
        if self._handle is not None:
            self._handle.remove()


class _MetricPrinter(CommonMetricPrinter):
    """detectron2's printer, whose ETA divides by zero when a stage stops early (a signal, the time
    budget) on an iteration it has just written: the writers write once more after training."""

    def _get_eta(self, storage):
        try:
            return super()._get_eta(storage)
        except ZeroDivisionError:
            return None


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


# ---------------------------------------------------------------- resumable data stream
def _stream_seed(*parts: int) -> int:
    """A 32-bit seed that depends on ``parts`` only (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


class ResumableSampler(torch.utils.data.Sampler):
    """An infinite stream of dataset indices: one seeded permutation of ``range(size)`` per epoch, each
    index coded with its **position** in the stream (``position * size + index``, see
    :class:`PositionedDataset`). Rank ``r`` of ``w`` takes positions ``start + r, start + r + w, ...``.

    The stream from ``start`` on is the same whether training started at 0 or resumes at
    ``start`` (= iterations done x ``SOLVER.IMS_PER_BATCH``), so a resumed stage sees the very
    images, in the very order and with the very augmentations, that an uninterrupted one would.
    """

    def __init__(self, size: int, seed: int, start: int = 0):
        if size < 1:
            raise ValueError("ResumableSampler needs a non-empty dataset")
        self.size, self.seed, self.start = int(size), int(seed), int(start)

    def permutation(self, epoch: int) -> np.ndarray:
        return np.random.default_rng(_stream_seed(self.seed, epoch)).permutation(self.size)

    def __iter__(self):
        rank, world = comm.get_rank(), comm.get_world_size()
        position, epoch, order = self.start + rank, -1, None
        while True:
            current, offset = divmod(position, self.size)
            if current != epoch:
                epoch, order = current, self.permutation(current)
            yield position * self.size + int(order[offset])
            position += world


class PositionedDataset(torch.utils.data.Dataset):
    """Dataset dicts addressed by :class:`ResumableSampler`'s codes: item ``code`` is a shallow copy
    of ``dicts[code % len]`` with ``aug_seed`` = (seed, stage, stream position), which
    :class:`ShipDatasetMapper` uses to seed that sample's augmentations."""

    def __init__(self, dicts: Sequence[dict], seed: int, stage: int):
        self.dicts, self.seed, self.stage = list(dicts), int(seed), int(stage)
        self._worker_quiet = False

    def __len__(self) -> int:
        return len(self.dicts)

    def __getitem__(self, code: int) -> dict:
        if not self._worker_quiet and torch.utils.data.get_worker_info() is not None:
            # Ctrl-C reaches the whole process group: data-loader workers leave it to the trainer
            # (StopGuard saves a checkpoint) instead of dying under it.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            self._worker_quiet = True
        position, index = divmod(int(code), len(self.dicts))
        return {**self.dicts[index], "aug_seed": [self.seed, self.stage, position]}


# ---------------------------------------------------------------- hooks: determinism, stopping, checkpoints, progress
class StepSeed(HookBase):
    """Seeds torch before every iteration from (seed, stage, rank, iteration), so the model's own
    sampling (RPN and RoI sampling) in an iteration does not depend on what ran before: with the
    data stream of :class:`ResumableSampler`, a resumed stage repeats an uninterrupted one."""

    def __init__(self, seed: int, stage: int):
        self.seed, self.stage = int(seed), int(stage)

    def before_step(self) -> None:
        torch.manual_seed(_stream_seed(self.seed, self.stage, comm.get_rank(), self.trainer.iter))


class TrainingStopped(KeyboardInterrupt):
    """Training stopped on SIGTERM or SIGINT after saving a checkpoint; the message names it."""

    def __init__(self, message: str, signum: int, checkpoint: Path | None):
        super().__init__(message)
        self.signum, self.checkpoint = signum, checkpoint


class _StageTimeUp(BaseException):
    """A stage ran past its share of ``DETECTOR.TIME_BUDGET_MIN`` (caught by ``train_stage``; not an
    ``Exception``, so detectron2's trainer does not log it as a crash)."""


class DeadlineLRMultiplier(LRMultiplier):
    """detectron2's ``LRMultiplier`` whose schedule runs by iterations or by the stage's clock,
    whichever is further on: ``where = max(iteration / max_iter, clock())``.

    A stage that its time budget cuts short (the machine slowed after the probe) would otherwise
    end at its full LR, before the decays at ``DETECTOR.LR_DECAY_AT``, and keep noisy weights:
    with the clock (:meth:`StopGuard.time_fraction`) the decays come on time. On schedule the two
    agree; ``clock`` None is plain ``LRMultiplier``. The state saved is ``LRMultiplier``'s.
    """

    def __init__(self, optimizer, multiplier, max_iter: int, last_iter: int = -1,
                 clock: Callable[[], float] | None = None):
        self._clock = clock  # before super().__init__, which computes the first LR
        super().__init__(optimizer, multiplier, max_iter, last_iter)

    def get_lr(self) -> list[float]:
        where = self.last_epoch / self._max_iter
        if self._clock is not None:
            where = max(where, min(float(self._clock()), 1.0))
        multiplier = self._multiplier(where)
        return [base_lr * multiplier for base_lr in self.base_lrs]


class StopGuard(HookBase):
    """Ends a stage cleanly on SIGTERM / SIGINT, or when it overruns its deadline (time budget).

    Signals only set a flag; after the current iteration every rank agrees (one all-reduce under
    torchrun, so all stop at the same iteration), rank 0 saves ``model_<iter>.pth`` and the
    trainer raises :class:`TrainingStopped` naming it. A deadline raises ``_StageTimeUp`` the same
    way; ``train_stage`` then saves the stage's final weights and goes on. Installs the handlers
    only in the main thread, and puts the previous ones back after training.

    The stage's closing validation comes after its last iteration, so training stops that long
    before the deadline: ``validation_s`` (its expected seconds at the planned speed) times the
    stage's slowdown so far, its seconds per iteration against ``planned_s_per_iter``.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, checkpointer: "AtomicCheckpointer", stage: Stage, deadline: float | None = None,
                 validation_s: float = 0.0, planned_s_per_iter: float = 0.0):
        self.checkpointer, self.stage, self.deadline = checkpointer, stage, deadline
        self.validation_s, self.planned_s_per_iter = validation_s, planned_s_per_iter
        self.received: int | None = None
        self._previous: dict = {}
        self._started: tuple[float, int] | None = None  # (time, iteration) of this call's first step

    def reserve_s(self, now: float) -> float:
        """Seconds to keep for the closing validation (see the class docstring)."""
        if not self.validation_s or self._started is None:
            return self.validation_s
        started, first = self._started
        done = self.trainer.iter + 1 - first
        if done < 5 or self.planned_s_per_iter <= 0:
            return self.validation_s
        return self.validation_s * max(1.0, (now - started) / done / self.planned_s_per_iter)

    def time_fraction(self, now: float | None = None) -> float:
        """How far the stage is through its time, 0 to 1: from where this call started (its share
        of the iterations already done, for a resumed stage) to the deadline less the closing
        validation's reserve; 0 without a deadline or before training starts."""
        if self.deadline is None or self._started is None:
            return 0.0
        now = time.time() if now is None else now
        started, first = self._started
        done_before = first / max(1, self.stage.iterations)
        span = self.deadline - self.reserve_s(now) - started
        if span <= 0:
            return 1.0
        return min(1.0, done_before + (1.0 - done_before) * max(0.0, now - started) / span)

    def _handle(self, signum, frame) -> None:
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now
        self.received = signum
        logger.warning(f"[{self.stage.name}] {signal.Signals(signum).name} received: stopping after this iteration "
                       "with a checkpoint")

    def before_train(self) -> None:
        self._started = (time.time(), self.trainer.start_iter)
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)

    def after_train(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def after_step(self) -> None:
        code = self.received or 0
        last = self.trainer.iter + 1 >= self.trainer.max_iter  # the stage ends here anyway
        now = time.time()
        if self.deadline is not None and not last and now > self.deadline - self.reserve_s(now):
            code = code or -1
        if comm.get_world_size() > 1:
            flag = torch.tensor([code], dtype=torch.int64)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            code = int(flag.item())
        if code == 0:
            return
        iteration = self.trainer.iter
        if code == -1:
            validation = getattr(self.trainer, "validation", None)
            if validation is not None and validation.last_iteration != iteration:
                validation.evaluate()  # the stage's end: its last weights are validated, as at a planned end
            raise _StageTimeUp(f"[{self.stage.name}] stage deadline passed at iteration {iteration + 1}")
        path = None
        if comm.is_main_process():
            self.checkpointer.save(f"model_{iteration:07d}", iteration=iteration)
            path = Path(self.checkpointer.save_dir) / f"model_{iteration:07d}.pth"
        comm.synchronize()
        raise TrainingStopped(
            f"[{self.stage.name}] stopped by {signal.Signals(code).name} after iteration {iteration + 1} of "
            f"{self.stage.iterations}; checkpoint {path or 'saved by rank 0'}. Resume with the same command "
            "(it continues by default), e.g. `python module_train.py --config <config>`, or Run All in the notebook",
            code, path)


class RetainingPeriodicCheckpointer(hooks.PeriodicCheckpointer):
    """detectron2's periodic checkpointer that also counts the stage's checkpoints saved before a
    resume against ``max_to_keep`` (detectron2 only counts those of the current process)."""

    def before_train(self) -> None:
        super().before_train()
        if self.max_to_keep is not None and comm.is_main_process():
            folder = Path(self.checkpointer.save_dir)
            earlier = sorted(folder.glob("model_[0-9]*.pth"))
            self.recent_checkpoints = [str(p) for p in earlier]
            while len(self.recent_checkpoints) > self.max_to_keep:
                Path(self.recent_checkpoints.pop(0)).unlink(missing_ok=True)


class ProgressHook(HookBase):
    """Writes the stage's iteration, loss and latest validation F2 to ``runs/<run>/progress.json``,
    and, under a time budget, the planned seconds of the later stages (``remaining_plan_s``, from
    ``plan.json``) for the run's ETA."""

    def __init__(self, cfg: CfgNode, stage: Stage, n_stages: int, validation: "ValidationHook"):
        self.reporter = None
        self.validation = validation
        if comm.is_main_process():
            self.reporter = ProgressReporter(module_config.get_progress_path(cfg),
                                             f"detector stage {stage.index}/{n_stages} @ {stage.size} px",
                                             stage.iterations, "iter",
                                             remaining_plan_s=planned_seconds_after(cfg, stage))

    def before_train(self) -> None:
        if self.reporter is not None:
            self.reporter.update(done=self.trainer.start_iter, force=True)

    def after_step(self) -> None:
        if self.reporter is None:
            return
        storage = get_event_storage()
        loss = storage.history("total_loss").latest() if "total_loss" in storage.histories() else None
        metrics = self.validation.last_metrics or {}
        fresh = metrics.get("_reported") is None and metrics
        if fresh:
            metrics["_reported"] = True
        self.reporter.update(done=self.trainer.iter + 1, loss=loss, val_f2=metrics.get("f2"),
                             infer_s_per_image=metrics.get("seconds_per_image"), force=bool(fresh))


# ---------------------------------------------------------------- time budget
@dataclasses.dataclass
class TrainingPlan:
    """Stage lengths that fit ``budget_s`` (``DETECTOR.TIME_BUDGET_MIN``), from measured speeds."""

    budget_s: float
    scale: float  # planned iterations / configured iterations
    stages: list  # [[size, iterations, base LR, warmup], ...] as DETECTOR.STAGES
    eval_period: int
    s_per_iter: list  # measured per stage
    s_per_eval_image: list  # measured per stage (validation inference)
    expected_s: list  # expected seconds of each stage, validation included
    notes: list = dataclasses.field(default_factory=list)


def plan_stages(stages: Sequence[Stage], s_per_iter: Sequence[float], s_per_eval_image: Sequence[float],
                n_eval_images: int, eval_period: int, budget_s: float, margin: float = 0.05,
                min_iterations: int = 10) -> TrainingPlan:
    """Scale every stage's iterations by one factor so that training, validation included, ends
    inside ``budget_s`` (less a ``margin`` share for what is not measured).

    Stage ``k`` costs ``iterations_k * s_per_iter[k]`` plus its validations: one every
    ``eval_period`` iterations and one at its end, each ``n_eval_images * s_per_eval_image[k]``.
    The validation period scales with the iterations, so each stage keeps its number of
    validations; warmup scales too (LR decay points are fractions of a stage: they follow).
    Stages keep their proportions. A stage is never planned below ``min_iterations`` (the plan
    then notes that the budget is too small for it).
    """
    n_evals = [(s.iterations // eval_period if eval_period > 0 else 0) + 1 for s in stages]
    eval_s = sum(e * n_eval_images * v for e, v in zip(n_evals, s_per_eval_image))
    train_s = sum(s.iterations * t for s, t in zip(stages, s_per_iter))
    available = budget_s * (1 - margin) - eval_s
    scale = max(available, 0.0) / train_s if train_s > 0 else 1.0
    planned, expected, notes = [], [], []
    for stage, t, v, e in zip(stages, s_per_iter, s_per_eval_image, n_evals):
        iterations = int(round(stage.iterations * scale))
        if iterations < min_iterations:
            notes.append(f"stage {stage.index}: {iterations} iterations fit the budget; {min_iterations} planned "
                         "(the budget is too small for this configuration)")
            iterations = min_iterations
        warmup = 0 if stage.warmup == 0 else min(max(1, int(round(stage.warmup * scale))), iterations - 1)
        planned.append([stage.size, iterations, stage.base_lr, warmup])
        expected.append(iterations * t + e * n_eval_images * v)
    effective = sum(p[1] for p in planned) / max(sum(s.iterations for s in stages), 1)  # after the minimum
    period = max(1, int(round(eval_period * effective))) if eval_period > 0 else 0
    return TrainingPlan(float(budget_s), float(scale), planned, period, [float(t) for t in s_per_iter],
                        [float(v) for v in s_per_eval_image], [float(x) for x in expected], notes)


def measure_stage_speed(cfg: CfgNode, stage: Stage, train_dicts: Sequence[dict], eval_dicts: Sequence[dict],
                        warmup: int = 1, steps: int = 5) -> tuple[float, float]:
    """(seconds per training iteration, seconds per validation image) of ``stage``, measured on a
    throwaway model after ``warmup`` iterations: data loading, forward, backward, optimizer step
    (the median over ``steps`` iterations: a moment of other work does not shorten the plan);
    then one batch of validation inference after one warm-up batch."""
    model_cfg = get_model_cfg(cfg, stage)
    model = build_model(model_cfg)
    optimizer = build_optimizer(model_cfg, model)
    loader = build_detection_train_loader(
        PositionedDataset(train_dicts, 0, stage.index), mapper=ShipDatasetMapper(cfg, stage.size, is_train=True),
        sampler=ResumableSampler(len(train_dicts), 0), total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False, num_workers=cfg.DATALOADER.NUM_WORKERS)
    batches = iter(loader)
    model.train()

    def step() -> None:
        losses = sum(model(next(batches)).values())
        optimizer.zero_grad()
        losses.backward()
        optimizer.step()

    with EventStorage(0):  # the model logs training statistics into one
        s_per_iter = median_step_seconds(step, steps, warmup)
    batch = max(1, min(cfg.DETECTOR.EVAL_BATCH_SIZE, len(eval_dicts)))
    images = [read_image(d["file_name"]) for d in list(eval_dicts)[:batch]] or [
        np.zeros((stage.size, stage.size, 3), np.uint8)]
    predict_instances(model, images, stage.size, batch_size=batch)
    started = time.perf_counter()
    predict_instances(model, images, stage.size, batch_size=batch)
    s_per_image = (time.perf_counter() - started) / len(images)
    return s_per_iter, s_per_image


def _plan_inputs(cfg: CfgNode, n_train: int, n_eval: int) -> dict:
    """What a plan depends on: replayed (not re-planned) while these are the same."""
    return {"budget_min": float(cfg.DETECTOR.TIME_BUDGET_MIN), "stages": [list(s) for s in cfg.DETECTOR.STAGES],
            "eval_period": int(cfg.DETECTOR.EVAL_PERIOD), "crop": int(cfg.DETECTOR.CROP_SIZE), "model": cfg.MODEL.dump(), "batch": int(cfg.SOLVER.IMS_PER_BATCH),
            "workers": int(cfg.DATALOADER.NUM_WORKERS), "device": cfg.MODEL.DEVICE, "n_train": n_train, "n_eval": n_eval}


def get_planned_cfg(cfg: CfgNode, train_dicts: Sequence[dict], eval_dicts: Sequence[dict]) -> tuple[CfgNode, dict | None]:
    """The config to train with: ``cfg`` itself without a time budget; with one, ``cfg`` with the
    stages and validation period of the plan (:func:`plan_stages` on speeds measured by
    :func:`measure_stage_speed`), which is saved in ``runs/<run>/detector/plan.json`` and replayed,
    not re-planned, while its inputs are unchanged (a resumed run keeps its schedule).
    Returns ``(config, plan record or None)``.
    """
    if cfg.DETECTOR.TIME_BUDGET_MIN <= 0:
        return cfg, None
    plan_path = get_detector_path(cfg, "plan")
    inputs = _plan_inputs(cfg, len(train_dicts), len(eval_dicts))
    record = json.loads(plan_path.read_text()) if plan_path.is_file() else None
    if record is not None and record.get("inputs") == inputs:
        logger.info(f"time budget: replaying the plan of {record['planned_at']} ({plan_path}): stages "
                    f"{record['plan']['stages']}, validation every {record['plan']['eval_period']} iterations")
    else:
        started = time.time()
        stages = get_stages(cfg)
        speeds = []
        reporter = ProgressReporter(module_config.get_progress_path(cfg) if comm.is_main_process() else None,
                                    "detector: measuring speed for the time budget", len(stages), "stage")
        for stage in stages:
            reporter.update(done=stage.index - 1, force=True)
            with _quiet_loggers("detectron2", "fvcore"):
                speeds.append(measure_stage_speed(cfg, stage, train_dicts, eval_dicts))
            logger.info(f"time budget: {stage.name} measured at {speeds[-1][0]:.3f} s/iter, "
                        f"{speeds[-1][1]:.3f} s per validation image")
        probe_s = time.time() - started
        budget_s = cfg.DETECTOR.TIME_BUDGET_MIN * 60 - probe_s
        plan = plan_stages(stages, [s for s, _ in speeds], [v for _, v in speeds], len(eval_dicts),
                           cfg.DETECTOR.EVAL_PERIOD, budget_s)
        record = {"inputs": inputs, "plan": dataclasses.asdict(plan), "probe_s": probe_s,
                  "planned_at": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "expected_end": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() + sum(plan.expected_s)))}
        for note in plan.notes:
            logger.warning(f"time budget: {note}")
        logger.info(f"time budget {cfg.DETECTOR.TIME_BUDGET_MIN:g} min (probe {probe_s:.0f} s): iterations x{plan.scale:.3f} "
                    f"-> stages {plan.stages}, validation every {plan.eval_period} iterations, expected "
                    f"{[round(x) for x in plan.expected_s]} s per stage, end ~{record['expected_end']}")
        if comm.is_main_process():
            with atomic_path(plan_path) as tmp:
                tmp.write_text(json.dumps(record, indent=1))
    planned = cfg.clone()
    planned.defrost()
    planned.DETECTOR.STAGES = [list(s) for s in record["plan"]["stages"]]
    planned.DETECTOR.EVAL_PERIOD = int(record["plan"]["eval_period"])
    planned.freeze()
    return planned, record


@contextlib.contextmanager
def _quiet_loggers(*names: str) -> Iterator[None]:
    loggers = [logging.getLogger(n) for n in names]
    levels = [q.level for q in loggers]
    for q in loggers:
        q.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for q, level in zip(loggers, levels):
            q.setLevel(level)


# ---------------------------------------------------------------- training
def build_stage_trainer(cfg: CfgNode, stage: Stage, train_dicts: Sequence[dict], val_dicts: Sequence[dict],
                        init_weights: str, resume: bool, deadline: float | None = None, validation_s: float = 0.0,
                        planned_s_per_iter: float = 0.0) -> SimpleTrainer:
    """A detectron2 ``SimpleTrainer`` for ``stage`` with its hooks, loaded and ready to ``train``.

    ``init_weights`` ("" = random init) seeds the model unless ``resume`` finds a checkpoint
    in the stage folder, which then restores model, optimizer, LR schedule and iteration; the data
    stream (:class:`ResumableSampler`) and the per-iteration seeds (:class:`StepSeed`) continue
    where they were. ``deadline`` (epoch seconds): the stage ends there (time budget), its closing
    validation included (:class:`StopGuard`: ``validation_s``, ``planned_s_per_iter``).
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
        model, str(stage_dir), extra_state={"stage": stage.index, "input_size": stage.size}, optimizer=optimizer
    )
    stop_guard = StopGuard(checkpointer, stage, deadline, validation_s, planned_s_per_iter)
    if deadline is not None:  # the LR decays come on time also when the budget cuts the stage short
        scheduler = DeadlineLRMultiplier(optimizer, scheduler._multiplier, scheduler._max_iter,
                                         clock=stop_guard.time_fraction)
    checkpointer.add_checkpointable("scheduler", scheduler)
    loaded = checkpointer.resume_or_load(init_weights, resume=resume)
    start_iter = loaded.get("iteration", -1) + 1 if resume and checkpointer.has_checkpoint() else 0

    seed = cfg.DETECTOR.SEED if cfg.DETECTOR.SEED >= 0 else int(np.random.SeedSequence().generate_state(1)[0])
    loader = build_detection_train_loader(
        PositionedDataset(train_dicts, seed, stage.index),
        mapper=ShipDatasetMapper(cfg, stage.size, is_train=True),
        sampler=ResumableSampler(len(train_dicts), _stream_seed(seed, stage.index), start_iter * cfg.SOLVER.IMS_PER_BATCH),
        total_batch_size=cfg.SOLVER.IMS_PER_BATCH,
        aspect_ratio_grouping=False,
        num_workers=cfg.DATALOADER.NUM_WORKERS,
    )
    trainer_class = AMPTrainer if cfg.SOLVER.AMP.ENABLED and device.startswith("cuda") else SimpleTrainer
    trainer = trainer_class(model, loader, optimizer)
    trainer.start_iter = start_iter
    trainer.stage_max_iter = stage.iterations
    trainer.checkpointer = checkpointer
    trainer.input_size_guard = InputSizeGuard(stage, training_input_size(cfg, stage))
    trainer.validation = ValidationHook(cfg, stage, val_dicts)

    writers = []
    n_stages = len(get_stages(cfg))
    if comm.is_main_process():
        stage_dir.mkdir(parents=True, exist_ok=True)
        printer = _MetricPrinter(stage.iterations)
        printer.logger = _StagePrefix(printer.logger, {"tag": f"stage {stage.index}/{n_stages} @ {stage.size}px"})
        writers = [printer, JSONWriter(str(get_stage_path(cfg, stage, "metrics"))), TensorboardXWriter(str(stage_dir))]
    trainer.register_hooks(
        [
            hooks.IterationTimer(),
            StepSeed(seed, stage.index),
            hooks.LRScheduler(optimizer=optimizer, scheduler=scheduler),
            trainer.input_size_guard,
            trainer.validation,
            ProgressHook(cfg, stage, n_stages, trainer.validation),
            hooks.PeriodicWriter(writers, period=cfg.DETECTOR.LOG_PERIOD),
            # after the writer: an iteration's metrics are on disk before its checkpoint is, so a
            # kill between the two can repeat a metrics line on resume but never lose one
            RetainingPeriodicCheckpointer(checkpointer, cfg.SOLVER.CHECKPOINT_PERIOD, max_iter=stage.iterations,
                                          max_to_keep=cfg.DETECTOR.MAX_CHECKPOINTS_KEPT or None),
            # last: a stop comes after this iteration's writes
            stop_guard,
        ]
    )
    return trainer


# Keys that change nothing a stage learns: a checkpoint stays valid across changes of these.
_STAGE_NEUTRAL_KEYS = {"DETECTOR": ("EVAL_PERIOD", "VIS_IMAGES", "EVAL_MAX_IMAGES", "EVAL_BATCH_SIZE", "LOG_PERIOD",
                                    "MAX_CHECKPOINTS_KEPT", "BEST_METRIC", "TIME_BUDGET_MIN", "STAGES")}


def get_stage_fingerprint(cfg: CfgNode, stage: Stage, train_dicts: Sequence[dict]) -> dict:
    """What a stage's checkpoints were trained with: the stage itself, the model, the solver, the
    augmentations, the init weights and the training images. A checkpoint whose fingerprint
    differs is not resumed (its folder is moved aside and the stage trains from its start)."""
    detector = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.DETECTOR.items()
                if k not in _STAGE_NEUTRAL_KEYS["DETECTOR"]}
    solver = {k: v for k, v in cfg.SOLVER.items() if k not in ("CHECKPOINT_PERIOD", "MAX_ITER", "BASE_LR", "STEPS",
                                                               "WARMUP_ITERS")}
    model = cfg.MODEL.clone()
    model.defrost()
    model.DEVICE = ""  # a CPU checkpoint resumes on a GPU and back
    ids = hashlib.sha256("\n".join(d["image_id"] for d in train_dicts).encode()).hexdigest()
    return {"stage": [stage.size, stage.iterations, stage.base_lr, stage.warmup],
            "model": model.dump(), "solver": json.loads(json.dumps(solver, default=str)), "detector": detector,
            "input_format": cfg.INPUT.FORMAT, "train_images": len(train_dicts), "train_ids_sha256": ids}


def _fingerprint_changes(old: dict, new: dict) -> list[str]:
    changes = []
    for key in new:
        if old.get(key) != new[key]:
            if isinstance(new[key], dict) and isinstance(old.get(key), dict):
                changes += [f"{key}.{k}: {old[key].get(k)!r} -> {v!r}" for k, v in new[key].items() if old[key].get(k) != v]
            elif key == "model":
                changes.append("MODEL settings")
            else:
                changes.append(f"{key}: {old.get(key)!r} -> {new[key]!r}")
    return changes


def _set_aside_from(cfg: CfgNode, stage: Stage, why: str) -> None:
    """Move ``stage``'s folder, those of the later stages (trained from it) and the best weights aside."""
    if not comm.is_main_process():
        return
    logger.warning(f"[{stage.name}] {why}: the stage and the later ones start over; earlier outputs are moved aside")
    for later in get_stages(cfg)[stage.index - 1:]:
        set_aside(get_stage_dir(cfg, later), logger)
    for what in ("best", "best_info"):
        set_aside(get_detector_path(cfg, what), logger)


def train_stage(cfg: CfgNode, stage: Stage, train_dicts: Sequence[dict], val_dicts: Sequence[dict],
                fresh: bool = False, deadline: float | None = None, validation_s: float = 0.0,
                planned_s_per_iter: float = 0.0) -> tuple[Path, str]:
    """Train one stage (see the module docstring); returns ``(its model_final.pth, outcome)``.
    ``deadline``, ``validation_s``, ``planned_s_per_iter``: the time budget's (:class:`StopGuard`).

    Outcome: ``"reused"`` (finished before, same fingerprint), ``"resumed at N"`` (continued from
    its last checkpoint) or ``"trained"``. ``fresh``, or a fingerprint that changed
    (:func:`get_stage_fingerprint`), moves the stage's earlier outputs aside first (never deletes).
    """
    stages = get_stages(cfg)
    stage_dir = get_stage_dir(cfg, stage)
    final_path = get_stage_path(cfg, stage, "final")
    fingerprint_path = get_stage_path(cfg, stage, "fingerprint")
    if stage.index == 1 and cfg.DETECTOR.BACKBONE_FROM_CLASSIFIER:
        export = module_config.get_classifier_path(cfg, "export")
        init_weights = str(get_detector_path(cfg, "classifier_init"))  # written below when the stage trains
        init_tag = f"classifier {export}@{export.stat().st_mtime_ns if export.is_file() else 'missing'}"
    elif stage.index == 1:
        init_weights = resolve_weights(cfg.MODEL.WEIGHTS)
        init_tag = init_weights
    else:
        previous = get_stage_path(cfg, stages[stage.index - 2], "final")
        if not previous.is_file():
            raise FileNotFoundError(
                f"{stage.name} starts from the previous stage's final weights {previous}, which do not exist: "
                f"train stage {stage.index - 1} first (--stage {stage.index - 1})"
            )
        init_weights = str(previous)
        init_tag = f"{init_weights}@{previous.stat().st_mtime_ns}"
    fingerprint = get_stage_fingerprint(cfg, stage, train_dicts)
    fingerprint["init"] = init_tag
    started_before = get_stage_path(cfg, stage, "last_checkpoint").exists()
    if fresh and started_before:
        _set_aside_from(cfg, stage, "FRESH / --fresh")
    elif started_before and fingerprint_path.is_file():
        old = json.loads(fingerprint_path.read_text())
        if old != fingerprint:
            _set_aside_from(cfg, stage, "its settings changed since its checkpoints were saved ("
                            + "; ".join(_fingerprint_changes(old, fingerprint)[:6]) + ")")
    comm.synchronize()
    if final_path.is_file():
        logger.info(f"[{stage.name}] reused: finished before ({final_path}, same settings)")
        return final_path, "reused"
    if comm.is_main_process():
        stage_dir.mkdir(parents=True, exist_ok=True)
        with atomic_path(fingerprint_path) as tmp:
            tmp.write_text(json.dumps(fingerprint, indent=1))
    comm.synchronize()
    if stage.index == 1 and cfg.DETECTOR.BACKBONE_FROM_CLASSIFIER and not get_stage_path(cfg, stage, "last_checkpoint").exists():
        write_classifier_init(cfg)
    trainer = build_stage_trainer(cfg, stage, train_dicts, val_dicts, init_weights, resume=True, deadline=deadline,
                                  validation_s=validation_s, planned_s_per_iter=planned_s_per_iter)
    steps = get_model_cfg(cfg, stage).SOLVER.STEPS
    if trainer.start_iter:
        outcome = f"resumed at {trainer.start_iter}"
        logger.info(f"=== {stage.name}: stage {stage.index}/{len(stages)}, input {stage.size}x{stage.size} px: resuming from "
                    f"{trainer.checkpointer.get_checkpoint_file()} at iteration {trainer.start_iter} of {stage.iterations} "
                    f"(base LR {stage.base_lr:g}, warmup {stage.warmup}, LR x{cfg.SOLVER.GAMMA:g} at {steps}) -> {stage_dir}")
    else:
        outcome = "trained"
        logger.info(f"=== {stage.name}: stage {stage.index}/{len(stages)}, input {stage.size}x{stage.size} px, "
                    f"{stage.iterations} iterations, base LR {stage.base_lr:g}, warmup {stage.warmup}, LR "
                    f"x{cfg.SOLVER.GAMMA:g} at {steps}, from {init_weights or 'random init'} -> {stage_dir}")
    before = parameter_digest(trainer.model)
    try:
        trainer.train(trainer.start_iter, stage.iterations)
    except _StageTimeUp as exc:
        logger.warning(f"{exc}: its share of DETECTOR.TIME_BUDGET_MIN is spent; saving its final weights")
        if comm.is_main_process():
            trainer.checkpointer.save("model_final", iteration=trainer.iter, truncated=True)
        comm.synchronize()
        outcome += f", ended at iteration {trainer.iter + 1} by the time budget"
    _check_replicas_in_sync(stage, before, trainer.model)
    logger.info(f"[{stage.name}] {outcome}")
    return final_path, outcome


# torchvision ResNet names (fastai's body: a Sequential of conv1, bn1, relu, maxpool, layer1..4) ->
# detectron2's ResNet under the FPN.
_BODY_STAGES = {"4": "res2", "5": "res3", "6": "res4", "7": "res5"}
_BLOCK_PARTS = {"conv1": "conv1", "bn1": "conv1.norm", "conv2": "conv2", "bn2": "conv2.norm", "conv3": "conv3",
                "bn3": "conv3.norm", "downsample.0": "shortcut", "downsample.1": "shortcut.norm"}


def classifier_body_to_detectron2(body_state: dict, cfg: CfgNode) -> dict[str, torch.Tensor]:
    """The state of a fastai ResNet body (``learn.model[0]``) under detectron2's names
    (``backbone.bottom_up.stem.conv1.weight``, ``backbone.bottom_up.res2.0.conv1.norm.weight``, ...).

    The first convolution is rewritten for the detector's input: fastai feeds it RGB scaled to
    [0, 1] and normalized with ImageNet's mean and std; detectron2 feeds ``INPUT.FORMAT`` (BGR)
    0-255 minus ``MODEL.PIXEL_MEAN``, divided by ``MODEL.PIXEL_STD``. With the default
    ``PIXEL_MEAN`` (ImageNet's mean x 255) the rewritten convolution computes exactly what the
    classifier's did on the same image. A space-to-depth stem's convolution
    (``CLASSIFIER.SPACE_TO_DEPTH``, ``module_classifier.SpaceToDepthStem``) is first folded back
    into one RGB kernel, each channel's sub-pixel kernels summed: the kernel it applies to an image
    whose blocks are flat, that is to the image at ``1 / block`` the side. The detector then starts
    from it as it does from a classifier trained on smaller images (the demo's at 128 px); an
    untrained stem folds back to the kernel it started from. ``ValueError`` names the first tensor
    whose shape differs from the detector's (another ResNet depth or width).
    """
    from fastai.vision.all import imagenet_stats

    prefix = "backbone.bottom_up."
    out = {}
    for key, value in body_state.items():
        head, _, rest = key.partition(".")
        if head == "0" and rest == "conv.weight":  # SpaceToDepthStem: channel c * block**2 + k is c's sub-pixel k
            value = value.unflatten(1, (-1, value.shape[1] // 3)).sum(2)
            name = "stem.conv1.weight"
        elif head == "0":
            name = "stem.conv1." + rest
        elif head == "1":
            name = "stem.conv1.norm." + rest
        elif head in _BODY_STAGES:
            block, _, part = rest.partition(".")
            module, _, leaf = part.rpartition(".")
            if module not in _BLOCK_PARTS:
                raise ValueError(f"classifier body tensor {key!r}: not a torchvision ResNet block part")
            name = f"{_BODY_STAGES[head]}.{block}.{_BLOCK_PARTS[module]}.{leaf}"
        else:
            raise ValueError(f"classifier body tensor {key!r}: expected a torchvision ResNet body (fastai vision_learner)")
        out[prefix + name] = value.detach().float().cpu().clone()  # a classifier loaded on a GPU is on CUDA
    conv1 = out[prefix + "stem.conv1.weight"]
    mean, std = (torch.tensor(v, dtype=torch.float32) for v in imagenet_stats)
    if cfg.INPUT.FORMAT == "BGR":
        conv1, mean, std = conv1.flip(1), mean.flip(0), std.flip(0)
    pixel_std = torch.tensor(cfg.MODEL.PIXEL_STD, dtype=torch.float32)
    out[prefix + "stem.conv1.weight"] = conv1 * (pixel_std / (255.0 * std)).view(1, -1, 1, 1)
    pixel_mean = torch.tensor(cfg.MODEL.PIXEL_MEAN, dtype=torch.float32)
    if (pixel_mean - 255.0 * mean).abs().max() > 1.0:
        logger.warning(f"MODEL.PIXEL_MEAN {list(cfg.MODEL.PIXEL_MEAN)} is not ImageNet's mean x 255 in {cfg.INPUT.FORMAT}: "
                       "the detector's first layer sees the classifier's input shifted by the difference")
    expected = {k: v.shape for k, v in build_model(get_model_cfg(cfg)).state_dict().items() if k.startswith(prefix)}
    for name, value in out.items():
        if name not in expected or expected[name] != value.shape:
            raise ValueError(
                f"DETECTOR.BACKBONE_FROM_CLASSIFIER: the classifier's {name.removeprefix(prefix)} "
                f"{tuple(value.shape)} does not fit the detector ({tuple(expected[name]) if name in expected else 'absent'}): "
                f"CLASSIFIER.ARCH {cfg.CLASSIFIER.ARCH} against MODEL.RESNETS.DEPTH {cfg.MODEL.RESNETS.DEPTH} "
                f"(RES2_OUT_CHANNELS {cfg.MODEL.RESNETS.RES2_OUT_CHANNELS}); they must be the same ResNet")
    return out


def _classifier_export(cfg: CfgNode) -> Path:
    """The classifier export stage 1 starts from; ``FileNotFoundError`` saying what to do when absent."""
    export = module_config.get_classifier_path(cfg, "export")
    if not export.is_file():
        raise FileNotFoundError(
            f"DETECTOR.BACKBONE_FROM_CLASSIFIER is True but the classifier export {export} does not exist: train the "
            "classifier first (python module_classifier.py train --config CONFIG), or set the key False")
    return export


def write_classifier_init(cfg: CfgNode) -> str:
    """Write stage 1's starting weights from the trained classifier (``DETECTOR.BACKBONE_FROM_CLASSIFIER``)
    to ``runs/<run>/detector/init_from_classifier.pth`` and return its path, tagged with the
    classifier export's modification time (a retrained classifier changes stage 1's fingerprint).
    """
    import module_classifier

    export = _classifier_export(cfg)
    body = module_classifier.load_classifier(export).model[0]
    state = classifier_body_to_detectron2(body.state_dict(), cfg)
    path = get_detector_path(cfg, "classifier_init")
    if comm.is_main_process():
        with atomic_path(path) as tmp:
            torch.save({"model": state, "__source__": str(export)}, tmp)
    comm.synchronize()
    logger.info(f"DETECTOR.BACKBONE_FROM_CLASSIFIER: stage 1 starts its ResNet ({len(state)} tensors) from the classifier "
                f"{export}; the FPN and heads start random -> {path}")
    return str(path)


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
        handler.setFormatter(logging.Formatter(module_config.LOG_FORMAT))
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


def planned_seconds_after(cfg: CfgNode, stage: Stage) -> float | None:
    """Planned seconds of the stages after ``stage`` (``plan.json``'s expected times, validation
    included); 0.0 for the last stage, None without a time budget's plan."""
    n_stages = len(cfg.DETECTOR.STAGES)
    if stage.index >= n_stages:
        return 0.0
    plan_path = get_detector_path(cfg, "plan")
    if cfg.DETECTOR.TIME_BUDGET_MIN <= 0 or not plan_path.is_file():
        return None
    try:
        expected = json.loads(plan_path.read_text())["plan"]["expected_s"]
    except (OSError, ValueError, KeyError):
        return None
    return float(sum(expected[stage.index:n_stages]))


# A stage may overrun its planned share of the budget by this fraction (plus STAGE_GRACE_S) where
# earlier stages left time unused, and the stages together (BudgetClock: across calls) by TOTAL_GRACE
# of the budget: a probe's s/iter is noisy (a later stage ran 40% slower than its probe on a
# shared host), and the budget is a promise to the user's clock.
STAGE_GRACE, STAGE_GRACE_S, TOTAL_GRACE = 0.2, 5.0, 0.03


def _stage_shares(record: dict | None) -> dict[int, float]:
    """Each stage's planned share of the budget, in seconds (by 1-based index); empty without a budget."""
    if record is None:
        return {}
    plan = record["plan"]
    return {k + 1: x / max(sum(plan["expected_s"]), 1e-9) * plan["budget_s"] for k, x in enumerate(plan["expected_s"])}


class BudgetClock:
    """The deadlines of the stages under a time budget, from their planned shares and the seconds
    each has spent so far (``plan.json``'s ``spent_s``, written after every stage), so that stages
    trained in separate calls (the notebook trains one stage a cell; a run resumed later) keep to
    the budget together as those of one call do.

    A stage may run its planned share of the budget plus :data:`STAGE_GRACE` and
    :data:`STAGE_GRACE_S` (less what it spent in earlier calls), but never past the budget of the
    stages up to it (their shares summed, plus :data:`TOTAL_GRACE`, less what the earlier stages
    spent): a stage that overran leaves less to the next, one that ended early leaves more. An
    earlier stage with no record (trained before the ledger, or without a budget) counts as its share.
    """

    def __init__(self, shares: dict[int, float], spent: dict | None = None):
        self.shares = shares
        self.spent = {int(k): float(v) for k, v in (spent or {}).items()}

    def start(self, index: int, now: float) -> float | None:
        """Stage ``index`` starts at ``now``: its deadline (epoch seconds; None: no budget)."""
        if index not in self.shares:
            return None
        own_before = self.spent.get(index, 0.0)
        earlier = sum(self.spent.get(j, share) for j, share in self.shares.items() if j < index)
        up_to = (1 + TOTAL_GRACE) * sum(share for j, share in self.shares.items() if j <= index)
        own = (1 + STAGE_GRACE) * self.shares[index] + STAGE_GRACE_S
        return now + min(own, up_to - earlier) - own_before

    def finished(self, index: int, seconds: float, resumed: bool) -> None:
        """Stage ``index`` took ``seconds`` in this call: its record, or added to it when it ``resumed``."""
        self.spent[index] = (self.spent.get(index, 0.0) if resumed else 0.0) + float(seconds)


def _closing_validation(record: dict | None, stage: Stage, n_eval: int) -> tuple[float, float]:
    """(expected seconds of ``stage``'s closing validation, its planned seconds per iteration)."""
    if record is None or not n_eval:
        return 0.0, 0.0
    plan = record["plan"]
    return n_eval * plan["s_per_eval_image"][stage.index - 1], plan["s_per_iter"][stage.index - 1]


def _save_spent(cfg: CfgNode, record: dict, spent: dict[int, float]) -> None:
    """Write the stages' spent seconds into ``plan.json`` (rank 0, atomically)."""
    record["spent_s"] = {str(k): round(v, 3) for k, v in sorted(spent.items())}
    if comm.is_main_process():
        with atomic_path(get_detector_path(cfg, "plan")) as tmp:
            tmp.write_text(json.dumps(record, indent=1))


def train_detector(cfg: CfgNode, train_dicts: Sequence[dict], val_dicts: Sequence[dict], stage: int | None = None,
                   fresh: bool = False) -> dict[str, Path]:
    """Train the stages (all, or only ``stage``) on the dataset dicts; return the paths written.

    ``train_dicts``: the training split (ship-free images are sampled as hard negatives,
    ``DETECTOR.EMPTY_FRACTION``); ``val_dicts``: the validation split (F2 and COCO AP every
    ``DETECTOR.EVAL_PERIOD`` iterations).

    **Continues by default**: a finished stage is reused, an unfinished one resumes from its last
    checkpoint with its schedule (``train_stage``); ``fresh`` starts the stages over, moving the
    earlier outputs aside (never deleting them). A stage whose settings changed since its
    checkpoints is started over, with a warning naming the change. SIGTERM or SIGINT saves a
    checkpoint and raises :class:`TrainingStopped` naming it. With ``DETECTOR.TIME_BUDGET_MIN``
    the iterations are planned to fit (:func:`get_planned_cfg`; the plan is replayed on resume)
    and each stage ends at its share of the budget. Works under ``torchrun`` (call
    :func:`init_distributed` first; :func:`main` does).

    Returns ``{"final": last trained stage's model_final.pth, "best": model_best.pth (the best by
    DETECTOR.BEST_METRIC over all stages), "config": the saved (planned) config, "log": log.txt,
    "plan": plan.json or None}``.
    """
    selected_index = stage
    resolve_weights(cfg.MODEL.WEIGHTS)  # fail before any work
    log_path = get_detector_path(cfg, "log")
    with _log_to_file(log_path):
        if comm.get_world_size() > 1:
            logger.info(f"distributed: rank {comm.get_rank()} of {comm.get_world_size()} ({dist.get_backend()}); only rank 0 writes")
        if uses_random_init(cfg):
            logger.info(
                f'MODEL.WEIGHTS is "": random init, ResNet norm {cfg.DETECTOR.RANDOM_INIT_NORM} (not FrozenBN), '
                "BACKBONE.FREEZE_AT 0 (every layer trains)"
                + ("; stage 1 starts its ResNet from the classifier (DETECTOR.BACKBONE_FROM_CLASSIFIER)"
                   if cfg.DETECTOR.BACKBONE_FROM_CLASSIFIER else "")
            )
        if cfg.DETECTOR.BACKBONE_FROM_CLASSIFIER and selected_index in (None, 1):
            _classifier_export(cfg)  # fail before any work
        seed_everything(cfg)
        n_all = len(train_dicts)
        train_dicts = select_training_dicts(train_dicts, cfg.DETECTOR.EMPTY_FRACTION, max(cfg.DETECTOR.SEED, 0))
        n_empty = sum(not d["annotations"] for d in train_dicts)
        eval_dicts = select_eval_dicts(val_dicts, cfg.DETECTOR.EVAL_MAX_IMAGES)
        logger.info(
            f"detector training set: {len(train_dicts) - n_empty} images with ships + {n_empty} ship-free hard negatives "
            f"(of {n_all} training images); validation: {len(eval_dicts)} images"
        )
        if fresh and selected_index in (None, 1) and comm.is_main_process():
            set_aside(get_detector_path(cfg, "plan"), logger)  # a fresh run plans anew
        cfg, record = get_planned_cfg(cfg, train_dicts, eval_dicts)
        config_path = save_cfg(cfg, get_detector_dir(cfg)) if comm.is_main_process() else None
        stages = get_stages(cfg)
        selected = stages if selected_index is None else [get_stage(cfg, selected_index)]
        clock = BudgetClock(_stage_shares(record), record.get("spent_s") if record else None)
        final = None
        for current in selected:
            started = time.time()
            deadline = clock.start(current.index, started)
            resuming = not fresh and get_stage_path(cfg, current, "last_checkpoint").exists()
            validation_s, s_per_iter = _closing_validation(record, current, len(eval_dicts))
            outcome = "stopped"
            try:
                final, outcome = train_stage(cfg, current, train_dicts, val_dicts, fresh=fresh, deadline=deadline,
                                             validation_s=validation_s, planned_s_per_iter=s_per_iter)
            finally:  # a stopped stage's time counts too: it resumes with what is left
                if record is not None and outcome != "reused":
                    resumed = outcome.startswith("resumed") if outcome != "stopped" else resuming
                    clock.finished(current.index, time.time() - started, resumed=resumed)
                    _save_spent(cfg, record, clock.spent)
    return {"final": final, "best": get_detector_path(cfg, "best"), "config": config_path, "log": log_path,
            "plan": get_detector_path(cfg, "plan") if record else None}


# ---------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Train the Mask R-CNN ship detector in resolution stages (runs under torchrun too).",
        epilog="example: python module_train.py --config configs/demo.yaml --stage 1 SOLVER.IMS_PER_BATCH 2",
    )
    parser.add_argument("--stage", type=int, default=None, help="train only this stage (1-based); default: all stages")
    parser.add_argument("--fresh", action="store_true",
                        help="start over instead of continuing (the default: finished stages are reused, an unfinished "
                             "one resumes from its last checkpoint); earlier outputs are moved aside, never deleted")
    module_config.add_config_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict[str, Path]:
    """Generate the synthetic data if the config asks for it, read the split, train."""
    import module_preprocessing
    import module_synthetic

    cfg = module_config.get_cfg_from_args(args)
    rank, world_size = init_distributed(cfg.MODEL.DEVICE)
    module_config.setup_logging(rank)
    try:
        if rank == 0:
            module_synthetic.prepare_synthetic_input(cfg)
        comm.synchronize()
        train_dicts, val_dicts = module_preprocessing.get_train_val_dicts(cfg)
        try:
            paths = train_detector(cfg, train_dicts, val_dicts, stage=args.stage, fresh=args.fresh)
        except TrainingStopped as exc:
            logger.error(str(exc))
            raise SystemExit(128 + exc.signum) from None
        logger.info(f"final weights: {paths['final']}")
        return paths
    finally:
        if world_size > 1 and dist.is_initialized():
            dist.barrier()  # every rank done before any tears the group down (gloo aborts otherwise)
            dist.destroy_process_group()


if __name__ == "__main__":
    main(get_args_parser().parse_args())
