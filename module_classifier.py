"""Ship / no-ship image classifier (fastai ``vision_learner``, ResNet34) whose probability gates the detector.

About 78% of Kaggle tiles hold no ship, and any predicted mask on such a tile scores 0 for it, so
``module_submit`` sends only images with ``p_ship >= SUBMIT.CLASSIFIER_THRESHOLD`` to the detector.

    cfg = get_cfg("configs/demo.yaml")
    train_dicts, val_dicts = get_train_val_dicts(cfg)        # module_preprocessing
    export = train_classifier(cfg, train_dicts, val_dicts)   # runs/<run>/classifier/export.pkl
    learner = load_classifier(export)
    p_ship = predict_p_ship(learner, image_paths, batch_size=64, tta=True)  # DataFrame ImageId, p_ship

Command line:

    python module_classifier.py train --config configs/demo.yaml CLASSIFIER.EPOCHS 2
    python module_classifier.py predict --config configs/demo.yaml --images runs/demo/input/test_v2 \
        --out runs/demo/p_ship.csv

Outputs of a training run, all under ``runs/<run>/classifier/``: ``export.pkl`` (the learner,
for :func:`load_classifier`), ``config.yaml`` (the resolved config), ``history.csv`` (per-epoch
losses and metrics), ``val_predictions.csv`` (ImageId, has_ship, p_ship of the validation split),
``val_thresholds.csv`` + ``val_thresholds.png`` (the precision/recall report over thresholds) and
TensorBoard event files. The threshold itself is tuned for end-to-end F2 by ``module_submit``.

Precision (``CLASSIFIER.PRECISION``, :func:`resolve_precision`): by default prediction runs under
bfloat16 autocast on a CPU with native bf16 (1.7-2x faster than fp32) and float16 autocast on
CUDA; CPU training runs under bf16 autocast too (:func:`training_precision`). ``fp32`` turns it off.
``int8`` (x86 CPUs) predicts with a statically quantized copy of the model, calibrated on training
images at the end of training (:func:`calibrate_int8`, stored in the export): the fastest on CPU,
at some cost in agreement with fp32.

Training can also learn from the ships' masks (``CLASSIFIER.CELL_LOSS_WEIGHT``: a cell head on
layer3, :class:`ShipCellsModel` and :class:`ShipCellsLoss`); the export is the plain classifier.

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import logging
import os
import time
import weakref
from pathlib import Path
from typing import ContextManager, Iterator, Sequence
from urllib.parse import urlparse

import numpy as np
import pandas as pd
import torch
import torchvision

import module_config

with module_config.quiet_jit_deprecation():  # fastai scripts a few functions at import
    from fastai.callback.core import Callback, CancelFitException
    from fastai.callback.schedule import ParamScheduler
    from fastai.callback.tensorboard import TensorBoardCallback
    from fastai.metrics import AccumMetric, ActivationType, accuracy, skm_to_fastai
    from fastai.vision.all import (
        AffineCoordTfm,
        CategoryBlock,
        ColReader,
        ColSplitter,
        CrossEntropyLossFlat,
        DataBlock,
        IntToFloatTensor,
        Learner,
        MaskBlock,
        Normalize,
        PILImage,
        Resize,
        ResizeMethod,
        TensorImage,
        ToTensor,
        TransformBlock,
        aug_transforms,
        imagenet_stats,
        load_learner,
        set_seed,
        to_float,
        vision_learner,
    )
from sklearn import metrics as skm
from tqdm.auto import tqdm

from module_config import BALANCE_MODES, PRECISIONS, get_classifier_dir, get_classifier_path, save_cfg
from module_rle import coco_to_masks
from module_progress import ProgressReporter, median_step_seconds
from module_files import (atomic_path, check_failure_limit, check_images, list_images, read_image, reduce_image,
                          set_aside, write_failure_report)

logger = logging.getLogger(__name__)

SHIP, NO_SHIP = "ship", "no_ship"
CLASSES = [NO_SHIP, SHIP]  # fixed vocab: index 1 is the ship class
BAD_IMAGE_POLICIES = ("error", "skip")
INT8_ENGINE = "x86"  # PyTorch's quantized CPU engine (fbgemm + oneDNN): runs int8 models, names their qconfig
# Flip TTA views, as tensor dims to flip on an (N, C, H, W) batch: identity, horizontal, vertical, both.
TTA_FLIP_DIMS = [(), (3,), (2,), (2, 3)]
# Thresholds of the validation report.
REPORT_THRESHOLDS = np.round(np.arange(0.0, 1.0001, 0.05), 2)


# ---------------------------------------------------------------- images


class ReducedImageOpener:
    """Open an image file as an RGB ``PILImage`` under the one image policy
    (``module_files.read_image``: complete, RGB, and ``image_size`` square when given), letting the
    JPEG decoder shrink it (DCT scaling by M/8) while both sides stay >= ``size`` (a 768 px Kaggle
    tile decodes at 288 px for a 256 px model, about 3x faster than a full decode;
    ``module_files.reduced_size``). Images in memory get the same reduction
    (``module_files.reduce_image``, :func:`predict_p_ship_arrays`).

    Used for training and prediction alike, so both see the same pixels; it travels in the export,
    so prediction keeps the tile size training had. A missing file raises ``FileNotFoundError``
    and a bad one ``module_files.ImageError`` (a ``ValueError``), each naming the file.
    """

    def __init__(self, size: int, image_size: int | None = None):
        self.size = size  # side of the square model input (px)
        self.image_size = image_size  # side every image file must have (DATA.IMAGE_SIZE); None: any

    def __call__(self, item) -> PILImage:
        if isinstance(item, (str, os.PathLike)):
            image_size = getattr(self, "image_size", None)  # exports made before it was recorded: any
            return PILImage.create(read_image(item, image_size, reduce_to=self.size))
        return PILImage.create(item)  # a PIL image, array or tensor, e.g. from learn.predict(img)


# ---------------------------------------------------------------- data and model


def get_label_frame(train_dicts: Sequence[dict], val_dicts: Sequence[dict]) -> pd.DataFrame:
    """One row per image: ``file_name``, ``image_id``, ``label`` (ship / no_ship: any annotation or
    none), ``is_valid`` and ``segmentation`` (the annotations' COCO RLEs, for
    ``CLASSIFIER.CELL_LOSS_WEIGHT``: :class:`ShipMask`). Raises if a split is empty, a file is
    missing or a class is absent."""
    if not train_dicts or not val_dicts:
        raise ValueError(f"the classifier needs images in both splits; got {len(train_dicts)} train "
                         f"and {len(val_dicts)} validation dataset dicts")
    rows = [
        {"file_name": str(d["file_name"]), "image_id": d["image_id"],
         "label": SHIP if d["annotations"] else NO_SHIP, "is_valid": is_valid,
         "segmentation": [a.get("segmentation") for a in d["annotations"]]}
        for dicts, is_valid in ((train_dicts, False), (val_dicts, True))
        for d in dicts
    ]
    frame = pd.DataFrame(rows)
    missing = [f for f in frame["file_name"] if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of the dataset dicts do not exist, e.g. {missing[:3]}")
    train_labels = set(frame.loc[~frame["is_valid"], "label"])
    if train_labels != set(CLASSES):
        raise ValueError(f"the training split needs both ship and ship-free images; it has only {train_labels}")
    return frame


def get_file_name(item) -> str:
    """The image of a training row (``file_name`` column); anything else (a path, a PIL image) as is,
    so that ``learn.predict("x.jpg")`` and ``dls.test_dl(paths)`` work on the exported learner."""
    return item["file_name"] if isinstance(item, (pd.Series, dict)) else item


def get_augmentations(cfg) -> list:
    """Batch transforms: flips, rotation, lighting (train only, fastai applies them on the batch),
    then ImageNet normalization (always, pretrained or not)."""
    return [
        *aug_transforms(do_flip=True, flip_vert=True, max_rotate=cfg.CLASSIFIER.MAX_ROTATE,
                        max_lighting=cfg.CLASSIFIER.MAX_LIGHTING, max_zoom=1.0, max_warp=0.0),
        Normalize.from_stats(*imagenet_stats),
    ]


class ShipMask:
    """A training row -> its ships' pixels as one ``(size, size)`` uint8 mask (1: a ship), each
    output pixel the maximum over the tile pixels it covers, so that a ship a few pixels long at
    the tile's size is not lost at the classifier's. The target of ``CLASSIFIER.CELL_LOSS_WEIGHT``
    (:class:`ShipCellsLoss`); a module-level class, so that the export, which keeps the data
    pipeline, unpickles."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, row) -> np.ndarray:
        rles = list(row["segmentation"])
        if any(rle is None for rle in rles):
            raise ValueError(f"{row['file_name']}: an annotation without a 'segmentation' (COCO RLE); "
                             "CLASSIFIER.CELL_LOSS_WEIGHT > 0 learns from the ships' masks")
        if not rles:
            return np.zeros((self.size, self.size), np.uint8)
        mask = torch.from_numpy(coco_to_masks(rles, rles[0]["size"]).any(0)).float()[None, None]
        return torch.nn.functional.adaptive_max_pool2d(mask, self.size)[0, 0].to(torch.uint8).numpy()


def build_dataloaders(cfg, frame: pd.DataFrame, masks: bool | None = None):
    """fastai ``DataLoaders`` over :func:`get_label_frame`'s rows, balanced per ``CLASSIFIER.BALANCE``.
    A batch is ``(images, labels)``; with ``masks`` (default: ``CLASSIFIER.CELL_LOSS_WEIGHT`` > 0)
    ``(images, ship masks, labels)`` (:class:`ShipMask`: flipped and rotated with the images;
    :class:`ShipCellsLoss` takes the masks off before the loss and metrics see the batch)."""
    size = cfg.CLASSIFIER.IMAGE_SIZE
    if size % cfg.CLASSIFIER.SPACE_TO_DEPTH:
        raise ValueError(f"CLASSIFIER.IMAGE_SIZE {size} is not a multiple of CLASSIFIER.SPACE_TO_DEPTH "
                         f"{cfg.CLASSIFIER.SPACE_TO_DEPTH}: expected whole blocks of pixels")
    image = TransformBlock(type_tfms=ReducedImageOpener(size, cfg.DATA.IMAGE_SIZE), batch_tfms=IntToFloatTensor)
    blocks, getters = (image, CategoryBlock(vocab=CLASSES)), [get_file_name, ColReader("label")]
    if cfg.CLASSIFIER.CELL_LOSS_WEIGHT > 0 if masks is None else masks:
        blocks, getters = (image, MaskBlock(), blocks[1]), [get_file_name, ShipMask(size), ColReader("label")]
    block = DataBlock(
        blocks=blocks,
        getters=getters,
        n_inp=1,
        splitter=ColSplitter("is_valid"),
        # Squish, not crop: a ship at the border of a non-square image must stay in view.
        item_tfms=Resize(size, method=ResizeMethod.Squish),
        batch_tfms=get_augmentations(cfg),
    )
    loader_args = dict(bs=cfg.CLASSIFIER.BATCH_SIZE, num_workers=cfg.CLASSIFIER.NUM_WORKERS)
    if cfg.CLASSIFIER.BALANCE == "sampler":
        # Each class drawn with equal probability: weight 1 / class count (only the train rows are used).
        counts = frame.loc[~frame["is_valid"], "label"].value_counts()
        weights = 1.0 / frame["label"].map(counts).to_numpy(dtype=np.float64)
        return block.weighted_dataloaders(frame, weights, **loader_args)
    return block.dataloaders(frame, **loader_args)


def get_loss(cfg, frame: pd.DataFrame):
    """Cross entropy; class-weighted (inverse frequency, mean weight 1) when ``BALANCE`` is ``weights``."""
    if cfg.CLASSIFIER.BALANCE not in BALANCE_MODES:
        raise ValueError(f"CLASSIFIER.BALANCE {cfg.CLASSIFIER.BALANCE!r}: expected one of {BALANCE_MODES}")
    if cfg.CLASSIFIER.BALANCE != "weights":
        return CrossEntropyLossFlat()
    counts = frame.loc[~frame["is_valid"], "label"].value_counts()  # both classes: get_label_frame checks
    weights = torch.tensor([counts.sum() / (len(CLASSES) * counts[c]) for c in CLASSES], dtype=torch.float32)
    return CrossEntropyLossFlat(weight=weights)


def roc_auc_or_nan(targets: np.ndarray, scores: np.ndarray) -> float:
    """ROC AUC of ``scores`` for binary ``targets``; NaN when only one class is present."""
    if len(np.unique(targets)) < 2:
        return float("nan")
    return float(skm.roc_auc_score(targets, scores))


def get_metrics() -> list:
    """Accuracy, precision and recall of the ship class (at argmax), ROC AUC of p_ship."""
    precision = skm_to_fastai(skm.precision_score, pos_label=1, zero_division=0)
    recall = skm_to_fastai(skm.recall_score, pos_label=1, zero_division=0)
    precision._name, recall._name = "precision_ship", "recall_ship"
    # BinarySoftmax keeps the last column of the softmax over dim -1: the ship class (CLASSES[1]).
    roc_auc = AccumMetric(roc_auc_or_nan, dim_argmax=-1, activation=ActivationType.BinarySoftmax, to_np=True,
                          invert_arg=True, flatten=True, name="roc_auc")
    return [accuracy, precision, recall, roc_auc]


def narrow_resnet(name: str, width: float, pretrained: bool = False, **kwargs) -> torchvision.models.ResNet:
    """torchvision's ResNet ``name`` with every layer's channels times ``width``, randomly
    initialized as torchvision initializes it (ImageNet weights exist for the full width only).

    The module names and order are torchvision's, so fastai cuts its body as usual and
    ``DETECTOR.BACKBONE_FROM_CLASSIFIER`` maps it onto the detector's ResNet of the same widths
    (at 0.5: ``MODEL.RESNETS.STEM_OUT_CHANNELS``/``RES2_OUT_CHANNELS`` 32,
    ``module_inference.build_basic_resnet``). Why: a ResNet-18 at half width costs about a quarter of
    the multiply-adds, so a CPU trains more epochs of it in the same minutes.
    """
    if pretrained:
        raise ValueError(f"CLASSIFIER.WIDTH {width}: ImageNet weights exist for the full width only; "
                         "set CLASSIFIER.PRETRAINED False, or CLASSIFIER.WIDTH 1.0")
    model = getattr(torchvision.models, name)(weights=None, **kwargs)
    block = type(model.layer1[0])

    def channels(n: int) -> int:
        return max(8, int(round(n * width)))

    model.inplanes = channels(64)
    model.conv1 = torch.nn.Conv2d(3, channels(64), kernel_size=7, stride=2, padding=3, bias=False)
    model.bn1 = torch.nn.BatchNorm2d(channels(64))
    for i, planes in enumerate((64, 128, 256, 512), start=1):
        n_blocks = len(getattr(model, f"layer{i}"))
        setattr(model, f"layer{i}", model._make_layer(block, channels(planes), n_blocks, stride=1 if i == 1 else 2))
    model.fc = torch.nn.Linear(channels(512) * block.expansion, model.fc.out_features)
    for module in model.modules():  # torchvision.models.ResNet's own initialization
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(module, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(module.weight)
            torch.nn.init.zeros_(module.bias)
    return model


def get_arch(name: str, pretrained: bool, width: float = 1.0):
    """The torchvision constructor ``name`` (at ``width`` other than 1: :func:`narrow_resnet`); with
    ``pretrained``, makes sure its ImageNet weights are in the torch hub cache (downloading them if
    the network allows), else raises with the fix."""
    if not name.startswith("resnet") or not hasattr(torchvision.models, name):
        raise ValueError(f"CLASSIFIER.ARCH {name!r}: expected a torchvision ResNet, e.g. resnet18, resnet34, resnet50")
    if width != 1.0:
        if pretrained:
            narrow_resnet(name, width, pretrained=True)  # raises, saying what to do
        return functools.partial(narrow_resnet, name, width)
    arch = getattr(torchvision.models, name)
    if pretrained:
        weights = torchvision.models.get_model_weights(name).DEFAULT
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(urlparse(weights.url).path).name
        if not cached.is_file():
            try:
                weights.get_state_dict(progress=True, check_hash=True)  # downloads into `cached`
            except Exception as exc:  # no network: URLError, socket errors, hash mismatch, ...
                raise RuntimeError(
                    f"CLASSIFIER.PRETRAINED is True but the ImageNet weights of {name} are not in the torch "
                    f"hub cache and cannot be downloaded ({type(exc).__name__}: {exc}). Either download "
                    f"{weights.url} and place it at {cached} (the cache honours $TORCH_HOME; "
                    f"`python tools/prefetch_weights.py` does this), or train from random init: "
                    f"CLASSIFIER.PRETRAINED False."
                ) from exc
    return arch


def build_learner(cfg, dls, loss_func, path: Path) -> Learner:
    """``vision_learner`` with ``CLASSIFIER.ARCH``; outputs (export) go to ``path``. With
    ``CLASSIFIER.CELL_LOSS_WEIGHT`` > 0 its model is a :class:`ShipCellsModel` (the same body and
    head, plus the cell head that training alone uses) and it has the :class:`ShipCellsLoss`
    callback; :func:`drop_cell_head` makes it the plain classifier again."""
    arch = get_arch(cfg.CLASSIFIER.ARCH, cfg.CLASSIFIER.PRETRAINED, cfg.CLASSIFIER.WIDTH)
    learn = vision_learner(dls, arch, normalize=False,  # get_augmentations normalizes
                           pretrained=cfg.CLASSIFIER.PRETRAINED, loss_func=loss_func,
                           metrics=get_metrics(), path=path)
    if cfg.CLASSIFIER.SPACE_TO_DEPTH > 1:
        learn.model[0][0] = SpaceToDepthStem(learn.model[0][0], cfg.CLASSIFIER.SPACE_TO_DEPTH)
    if cfg.CLASSIFIER.CELL_LOSS_WEIGHT > 0:
        learn.model = ShipCellsModel(learn.model[0], learn.model[1])
        learn.add_cb(ShipCellsLoss(cfg.CLASSIFIER.CELL_LOSS_WEIGHT))
    return learn


class SpaceToDepthStem(torch.nn.Module):
    """The ResNet's first convolution on the image rearranged space to depth
    (``CLASSIFIER.SPACE_TO_DEPTH``): each ``block`` x ``block`` square of pixels becomes one pixel
    of ``3 * block**2`` channels (``torch.nn.PixelUnshuffle``), and the convolution (the same
    kernel, stride and padding as ``conv``) reads those channels. The rest of the network runs at
    ``1 / block`` the side, so it costs what it would on an image resized to that side, but no
    pixel is averaged away first: a ship a few pixels across keeps its contrast.

    Its weights start as ``conv``'s, each input channel's spread evenly over its ``block**2``
    sub-pixels: the stem then computes exactly ``conv`` on the image average-pooled by ``block``,
    as the classifier on the smaller image starts (ImageNet's stem, when pretrained).
    ``module_train.classifier_body_to_detectron2`` folds them back into one RGB kernel."""

    def __init__(self, conv: torch.nn.Conv2d, block: int):
        super().__init__()
        self.block = int(block)
        self.unshuffle = torch.nn.PixelUnshuffle(self.block)
        self.conv = torch.nn.Conv2d(conv.in_channels * self.block ** 2, conv.out_channels, conv.kernel_size,
                                    stride=conv.stride, padding=conv.padding, bias=conv.bias is not None)
        with torch.no_grad():
            # PixelUnshuffle's output channel c * block**2 + k is input channel c's sub-pixel k
            self.conv.weight.copy_(conv.weight.repeat_interleave(self.block ** 2, dim=1) / self.block ** 2)
            if conv.bias is not None:
                self.conv.bias.copy_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.unshuffle(x))


def drop_cell_head(learn: Learner, cfg, frame: pd.DataFrame) -> Learner:
    """After training with ``CLASSIFIER.CELL_LOSS_WEIGHT``: the plain classifier, as exported and
    used for prediction (fastai's ``Sequential(body, head)``, data of images and labels, no
    :class:`ShipCellsLoss`). A learner without the cell head is returned as is."""
    if not isinstance(learn.model, ShipCellsModel):
        return learn
    learn.remove_cbs([cb for cb in learn.cbs if isinstance(cb, ShipCellsLoss)])
    learn.model = learn.model.plain()
    learn.opt = None  # its optimizer held the cell head too (export builds one for the plain model)
    learn.dls = build_dataloaders(cfg, frame, masks=False)  # learn.predict decodes (image, label)
    return learn


class ShipCellsModel(torch.nn.Sequential):
    """fastai's ``(body, head)``, plus a 1x1 convolution on the body's ``layer3`` features (stride
    16: 8 x 8 cells at 128 px) that predicts which cells hold ship pixels. Its logits are kept in
    ``cells`` in training mode for :class:`ShipCellsLoss`; the forward pass returns the head's
    logits, as the plain model's does, and :meth:`plain` is that model again (exported).

    Why: from random init the image label alone teaches slowly where the ships are (one bit per
    tile, and most ships cover a few pixels); the masks say it per cell. Four 250-batch runs of the
    demo's classifier (AVX2, scored on 1,000 independent generated tiles): ROC AUC 0.962 / 0.963
    against 0.947 / 0.950, ship tiles passing at 1% of the ship-free ones 66% / 72% against 50% /
    58%; through fastai in the same 3 minutes (8 epochs against 11: the masks cost data time)
    0.975 against 0.964 (BENCHMARKS.md, "The classifier learns where the ships are")."""

    LAYER3_END = 7  # fastai's ResNet body: conv1, bn1, relu, maxpool, layer1, layer2, layer3 | layer4

    def __init__(self, body: torch.nn.Module, head: torch.nn.Module):
        # layer3's output channels: its last BatchNorm's (no forward pass: that would move the
        # BatchNorm statistics, pretrained ones included)
        channels = [m for m in body[:self.LAYER3_END].modules() if isinstance(m, torch.nn.BatchNorm2d)][-1].num_features
        super().__init__(body, head, torch.nn.Conv2d(channels, 1, kernel_size=1))
        self.cells: torch.Tensor | None = None

    def __getitem__(self, index):
        if isinstance(index, slice):  # a plain Sequential (fastai's splitter takes m[1:]: head and cell head)
            return torch.nn.Sequential(*list(self._modules.values())[index])
        return super().__getitem__(index)

    def forward(self, x):
        body, head, cell_head = self[0], self[1], self[2]
        features = body[:self.LAYER3_END](x)
        self.cells = cell_head(features) if self.training else None
        return head(body[self.LAYER3_END:](features))

    def plain(self) -> torch.nn.Sequential:
        """The classifier without the cell head: fastai's own ``Sequential(body, head)``."""
        return torch.nn.Sequential(self[0], self[1])


class ShipCellsLoss(Callback):
    """Adds ``weight`` x the cell loss to the training loss: binary cross entropy of the
    :class:`ShipCellsModel`'s cell logits against the batch's :class:`ShipMask` max-pooled to the
    cells (a cell is a ship cell when any of its pixels is), ship cells weighted ``pos_weight``
    (they are few). Takes the masks out of the batch before the loss and the metrics see it, in
    validation too (where no cell loss is added: the validation loss and metrics stay the
    classifier's own)."""

    def __init__(self, weight: float, pos_weight: float = 10.0):
        self.weight, self.pos_weight, self.masks = float(weight), float(pos_weight), None

    def before_batch(self):
        if len(self.learn.yb) == 2:
            self.masks, label = self.learn.yb
            self.learn.yb = (label,)

    def after_loss(self):
        cells = getattr(self.learn.model, "cells", None)
        if not self.training or cells is None or self.masks is None:
            return
        masks = self.masks.as_subclass(torch.Tensor).float()[:, None]
        target = torch.nn.functional.adaptive_max_pool2d(masks, cells.shape[-2:])
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            cells.as_subclass(torch.Tensor).float(), target,
            pos_weight=torch.tensor(self.pos_weight, device=target.device))
        self.learn.loss_grad = self.learn.loss_grad + self.weight * loss
        self.learn.loss = self.learn.loss_grad.clone()

    def after_batch(self):
        self.masks = None
        if isinstance(self.learn.model, ShipCellsModel):
            self.learn.model.cells = None


# ---------------------------------------------------------------- precision


@functools.lru_cache(maxsize=None)
def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bfloat16 natively on this CPU (AVX512-BF16 or AMX); False when torch
    cannot tell."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # a private op: absent or failing in some torch builds
        return False


def resolve_precision(precision: str, device: torch.device | str) -> str:
    """What ``CLASSIFIER.PRECISION`` means on ``device``: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"int8"``.

    ``"fp32"`` and ``"bf16"`` are taken as they are (bf16 on a CPU without native bf16 runs, but
    emulated and slower than fp32). ``"auto"``: ``"fp16"`` on CUDA; on CPU ``"bf16"`` when
    :func:`cpu_has_native_bf16`, else ``"fp32"``; ``"fp32"`` on other devices. ``"int8"`` (the
    statically quantized model of :func:`calibrate_int8`) is for x86 CPUs only: elsewhere it raises.
    Any other value raises ``ValueError`` naming the key and the allowed values.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"CLASSIFIER.PRECISION {precision!r}: expected one of {PRECISIONS}")
    device_type = torch.device(device).type
    if precision == "int8":
        if device_type != "cpu" or INT8_ENGINE not in torch.backends.quantized.supported_engines:
            raise ValueError(f"CLASSIFIER.PRECISION 'int8' runs on x86 CPUs only (PyTorch's {INT8_ENGINE!r} "
                             f"quantized engine), not on {torch.device(device)} here; use 'auto' instead")
        return precision
    if precision != "auto":
        return precision
    if device_type == "cuda":
        return "fp16"
    if device_type == "cpu" and cpu_has_native_bf16():
        return "bf16"
    return "fp32"


def autocast_context(precision: str, device: torch.device | str) -> ContextManager:
    """The one place where a precision becomes an autocast region: ``torch.autocast`` on
    ``device``'s type with the dtype of :func:`resolve_precision` (bfloat16 or float16), or a
    no-op context for fp32. Ops that autocast keeps in float32 stay float32; outputs of the
    others are in the low dtype, so cast results with ``.float()``."""
    resolved = resolve_precision(precision, device)
    if resolved in ("fp32", "int8"):  # an int8 model (int8_model) runs its own dtypes
        return contextlib.nullcontext()
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[resolved]
    return torch.autocast(torch.device(device).type, dtype=dtype)


class CPUAutocast(Callback):
    """Run each batch's forward pass and loss (training and validation) under CPU bfloat16 autocast;
    the backward pass, the weights and the optimizer stay float32 (bf16 has float32's exponent
    range, so there is no loss scaling). fastai's own ``MixedPrecision`` is CUDA-only.

    fastai sends no event when a batch raises (``KeyboardInterrupt`` included): call :meth:`close`
    after the fit, as :func:`training_precision` does, so that autocast never stays on."""

    order = 10  # as fastai's MixedPrecision: after the batch is on its device

    def __init__(self):
        self._autocast = None

    def before_batch(self):
        self.close()
        self._autocast = autocast_context("bf16", "cpu")
        self._autocast.__enter__()

    def after_pred(self):
        self.learn.pred = to_float(self.pred)  # the loss and the metrics in float32

    def after_loss(self):
        self.close()

    def after_batch(self):
        self.close()  # a batch cancelled before its loss

    def close(self):
        """Leave the autocast region of the current batch, if any (idempotent)."""
        if self._autocast is not None:
            region, self._autocast = self._autocast, None
            region.__exit__(None, None, None)


def training_precision_name(learn: Learner, precision: str) -> str:
    """What :func:`training_precision` trains ``learn`` at: ``"bf16"`` (CPU bf16 autocast) or ``"fp32"``."""
    device = getattr(learn.dls, "device", None) or torch.device("cpu")  # where fastai's fit puts the model
    if precision == "int8":
        precision = "auto"  # int8 is for prediction only (calibrate_int8): train as auto would
    if resolve_precision(precision, device) != "bf16" or torch.device(device).type != "cpu":
        return "fp32"
    return "bf16"


@contextlib.contextmanager
def training_precision(learn: Learner, precision: str) -> Iterator[str]:
    """Within the block, ``learn``'s fits run at ``precision`` (``CLASSIFIER.PRECISION``) where it
    resolves to bf16 on CPU (:class:`CPUAutocast`; on an AVX512-BF16 CPU about 1.6x faster epochs
    than fp32, 1.8x per step); elsewhere, CUDA included, training stays float32; ``"int8"`` (a
    prediction precision, :func:`calibrate_int8`) trains as ``"auto"`` does. Yields the precision
    training runs at (``"bf16"`` or ``"fp32"``). The callback is gone after the block (the export
    carries none), and autocast is off again even when the fit raises."""
    if training_precision_name(learn, precision) != "bf16":
        yield "fp32"
        return
    autocast = CPUAutocast()
    with learn.added_cbs([autocast]):
        try:
            yield "bf16"
        finally:
            autocast.close()


# ---------------------------------------------------------------- int8

# Converted int8 models, per learner, with the observer statistics they were built from.
_INT8_MODELS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


@contextlib.contextmanager
def _quiet_int8_warnings() -> Iterator[None]:
    """Silence what torch.ao's FX quantization warns on every call (the observers' ``reduce_range``
    and the quantized-tensor API's deprecation in favour of torchao); anything else still shows."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*reduce_range will be deprecated.*")
        warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*deprecated.*")
        yield


def _prepare_int8(learner: Learner) -> torch.fx.GraphModule:
    """A float32 CPU copy of ``learner.model`` with FX graph-mode observers inserted: the
    ``INT8_ENGINE`` default for the body (int8 convolutions with per-channel weights, activations
    observed by histogram, BatchNorm folded into the convolutions, ~90% of the time in int8
    kernels). fastai's head (the model's last child) stays float32: its ``AdaptiveConcatPool2d``
    concatenates max- and average-pooled features whose int8 scales differ, which costs accuracy
    (p_ship off fp32 by up to 0.26 on the demo model, against 0.07 with a float head) for no speed."""
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import prepare_fx

    model = copy.deepcopy(learner.model).cpu().eval().to(memory_format=torch.contiguous_format)
    mapping = get_default_qconfig_mapping(INT8_ENGINE)
    if isinstance(model, torch.nn.Sequential) and len(model) > 1:  # vision_learner: (body, head)
        mapping = mapping.set_module_name(str(len(model) - 1), None)
    example = torch.zeros(1, 3, 64, 64)  # the body is fully convolutional and the head pools
    with _quiet_int8_warnings():
        return prepare_fx(model, mapping, example_inputs=(example,))


def calibrate_int8(learner: Learner, image_paths: Sequence[str | os.PathLike], batch_size: int = 64,
                   progress: bool = True) -> dict:
    """Calibrate the static int8 quantization of ``learner.model`` on ``image_paths`` (as
    prediction sees them: no augmentation) and store the observers' statistics (~0.6 MB) on the
    learner as ``learner.int8_observers``, which ``learn.export`` keeps. Returns them.

    ``CLASSIFIER.PRECISION int8`` then predicts with :func:`int8_model`. Calibrate on a few
    hundred training images of both classes; calibrate again after training further.
    """
    resolve_precision("int8", "cpu")  # an x86 CPU build, or a clear error
    paths = [str(p) for p in image_paths]
    if not paths:
        raise ValueError("calibrate_int8: no calibration images")
    prepared = _prepare_int8(learner)
    dl = prediction_dataloader(learner, paths, batch_size)
    with torch.inference_mode(), tqdm(total=len(paths), desc="int8 calibration", unit="img",
                                      disable=not progress) as bar:
        for (batch,) in dl:
            prepared(batch.as_subclass(torch.Tensor).cpu().contiguous(memory_format=torch.channels_last))
            bar.update(len(batch))
    learner.int8_observers = {k: v.detach().clone() for k, v in prepared.state_dict().items()
                              if "activation_post_process" in k}
    return learner.int8_observers


def get_int8_calibration_paths(cfg, frame: pd.DataFrame) -> list[str]:
    """The training images (of :func:`get_label_frame`'s rows) that calibrate int8: a sample of
    ``CLASSIFIER.INT8_CALIBRATION_IMAGES`` drawn with ``CLASSIFIER.SEED``, sorted."""
    train_files = frame.loc[~frame["is_valid"], "file_name"].to_numpy()
    n = min(cfg.CLASSIFIER.INT8_CALIBRATION_IMAGES, len(train_files))
    return sorted(np.random.default_rng(cfg.CLASSIFIER.SEED).choice(train_files, n, replace=False).tolist())


def int8_model(learner: Learner) -> torch.nn.Module:
    """The int8 CPU model of ``learner`` (built once from ``learner.int8_observers``, then
    cached): an FX ``GraphModule`` taking and returning what ``learner.model`` does, fastest on
    channels-last input. Raises ``ValueError`` with the fix when the learner was never calibrated."""
    from torch.ao.quantization.quantize_fx import convert_fx

    resolve_precision("int8", "cpu")
    observers = getattr(learner, "int8_observers", None)
    if not observers:
        raise ValueError("CLASSIFIER.PRECISION int8: this classifier carries no int8 calibration. Train it "
                         "with CLASSIFIER.PRECISION int8 (it calibrates on training images before the "
                         "export), or call module_classifier.calibrate_int8(learner, image_paths)")
    cached = _INT8_MODELS.get(learner)
    if cached is not None and cached[0] is observers:
        return cached[1]
    prepared = _prepare_int8(learner)
    # on the CPU: a learner loaded on a GPU machine (load_learner maps the export to CUDA) brings
    # CUDA observers, which some observers adopt as they are, and FX's convert refuses two devices
    cpu_observers = {k: v.cpu() for k, v in observers.items()}
    unexpected = prepared.load_state_dict(cpu_observers, strict=False).unexpected_keys
    if unexpected:
        raise ValueError(f"the int8 calibration does not fit this classifier's model (e.g. {unexpected[:2]}): "
                         "call module_classifier.calibrate_int8(learner, image_paths) again")
    if torch.backends.quantized.engine != INT8_ENGINE:
        torch.backends.quantized.engine = INT8_ENGINE
    with _quiet_int8_warnings():
        model = convert_fx(prepared).eval()
    _INT8_MODELS[learner] = (observers, model)
    return model


# ---------------------------------------------------------------- training


class TrainingTensorBoard(TensorBoardCallback):
    """fastai's ``TensorBoardCallback`` without its quirk of logging ``train_loss`` and the
    hyper-parameters after validation batches too: it logs them after training batches only."""

    def after_batch(self):
        if self.training:
            super().after_batch()


# ---------------------------------------------------------------- time budget, progress


def _with_epochs(cfg, epochs: int):
    planned = cfg.clone()
    planned.defrost()
    planned.CLASSIFIER.EPOCHS = int(epochs)
    planned.freeze()
    return planned


def measure_batch_seconds(learn: Learner, precision: str, warmup: int = 2, steps: int = 5) -> tuple[float, float]:
    """(seconds per training batch, seconds per validation batch) of ``learn``'s data and model at
    ``precision``, measured on a throwaway copy of the model after ``warmup`` batches: data loading
    and augmentation, forward, loss, backward and an optimizer step; forward only for validation.
    Each is the median over ``steps`` batches, so that a moment of other work on the machine does
    not shorten the plan (the budget's deadline guards against a slowdown that lasts)."""
    model = copy.deepcopy(learn.model)
    device = next(model.parameters()).device
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    resolved = "bf16" if training_precision_name(learn, precision) == "bf16" else "fp32"

    def timed(loader, train: bool, count: int) -> float:
        model.train(train)
        batches = iter(loader)

        def step() -> None:
            nonlocal batches
            try:
                batch = next(batches)
            except StopIteration:
                batches = iter(loader)
                batch = next(batches)
            xb, yb = batch[0].as_subclass(torch.Tensor).to(device), batch[-1]  # (images, [masks,] labels)
            with torch.set_grad_enabled(train), autocast_context(resolved, device):
                loss = learn.loss_func(model(xb).float(), yb.as_subclass(torch.Tensor).to(device))
                if getattr(model, "cells", None) is not None:  # ShipCellsModel: its cell head's cost too
                    loss = loss + model.cells.float().mean()
            if train:
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()

        return median_step_seconds(step, count, warmup)

    return timed(learn.dls.train, True, steps), timed(learn.dls.valid, False, steps)


# fastai's own cost per epoch beyond the batches (metrics, recorder, TensorBoard, progress bars):
# 0.75 s measured on the 2-core machine with the tiny config, where it dominates; rounded up.
EPOCH_OVERHEAD_S = 1.0


def epochs_for_budget(budget_s: float, epoch_s: float, fixed_s: float = 0.0) -> tuple[int, float]:
    """``(epochs, exact fit)``: whole epochs of ``epoch_s`` seconds that fit in ``budget_s`` after
    ``fixed_s`` seconds of other work; at least one epoch (the exact fit may be below 1)."""
    fit = (budget_s - fixed_s) / epoch_s
    return max(1, int(fit)), fit


def plan_epochs(cfg, learn: Learner, margin: float = 0.05) -> dict:
    """The number of one-cycle epochs that ends training, the validation report and the export
    inside ``CLASSIFIER.TIME_BUDGET_MIN``, from the speeds :func:`measure_batch_seconds` measures
    (the probe's own time counts). Returns the plan, as saved in ``plan.json``."""
    started = time.time()
    s_train, s_valid = measure_batch_seconds(learn, cfg.CLASSIFIER.PRECISION)
    n_train, n_valid = len(learn.dls.train), len(learn.dls.valid)
    epoch_s = n_train * s_train + n_valid * s_valid + EPOCH_OVERHEAD_S
    views = len(TTA_FLIP_DIMS) if cfg.CLASSIFIER.TTA else 1
    report_s = n_valid * s_valid * views  # the validation report's prediction after training
    calibration_s = (cfg.CLASSIFIER.INT8_CALIBRATION_IMAGES / cfg.CLASSIFIER.BATCH_SIZE * s_valid
                     if cfg.CLASSIFIER.PRECISION == "int8" else 0.0)
    budget_s = 60 * cfg.CLASSIFIER.TIME_BUDGET_MIN * (1 - margin) - (time.time() - started)
    epochs, fit = epochs_for_budget(budget_s, epoch_s, report_s + calibration_s)
    fit_end = time.time() + budget_s - report_s - calibration_s  # where ClockSchedule ends the one-cycle
    plan = {"budget_min": float(cfg.CLASSIFIER.TIME_BUDGET_MIN), "configured_epochs": int(cfg.CLASSIFIER.EPOCHS),
            "epochs": epochs, "s_per_train_batch": s_train, "s_per_valid_batch": s_valid, "train_batches": n_train,
            "valid_batches": n_valid, "expected_s": epochs * epoch_s + report_s + calibration_s,
            "probe_s": time.time() - started, "started": started, "fit_end": fit_end,
            "expected_end": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(time.time() + epochs * epoch_s + report_s))}
    if fit < 1:
        logger.warning("classifier: one epoch takes %.0f s, more than the time budget of %g min leaves; training 1",
                       epoch_s, cfg.CLASSIFIER.TIME_BUDGET_MIN)
    logger.info("classifier: time budget %g min: %.3f s per training batch, %.3f s per validation batch -> %d epochs "
                "(configured %d), end ~%s", cfg.CLASSIFIER.TIME_BUDGET_MIN, s_train, s_valid, epochs,
                cfg.CLASSIFIER.EPOCHS, plan["expected_end"])
    return plan


class ClockSchedule(Callback):
    """Keeps fastai's one-cycle schedule on the clock as well as on the batch count.

    ``ParamScheduler`` sets the learning rate from ``learn.pct_train``, the share of the planned
    batches done. Before each training batch this sets that position to the larger of the batches
    done and the share of the time from the fit's start to ``end`` (epoch seconds: the end the
    time budget leaves for training, ``plan_epochs``' ``fit_end``). Where the plan holds, the batch
    count leads and the schedule is fastai's own; where the machine turns out slower than its
    probe, the learning rate still comes down by ``end``, so that a fit the budget cuts
    (:class:`RunProgress`) ends annealed, not in the middle of its high-LR phase.
    """

    order = ParamScheduler.order - 1  # before ParamScheduler reads the position

    def __init__(self, end: float):
        self.end, self.start = end, None

    def before_fit(self):
        self.start = time.time()

    def before_batch(self):
        if not self.training:
            return
        by_batches = self.learn.train_iter / (self.n_iter * self.n_epoch)
        by_clock = (time.time() - self.start) / max(self.end - self.start, 1e-9)
        self.learn.pct_train = min(1.0, max(by_batches, by_clock))


class RunProgress(Callback):
    """Writes epoch, batch, smoothed loss and validation ROC AUC to ``runs/<run>/progress.json``, and
    ends the fit cleanly (``CancelFitException``: the export follows) once ``deadline`` (epoch
    seconds, the time budget) has passed."""

    order = 90

    def __init__(self, path, deadline: float | None = None):
        self.path, self.deadline, self.reporter = path, deadline, None

    def before_fit(self):
        total = self.n_epoch * len(self.dls.train)
        self.reporter = ProgressReporter(self.path, f"classifier epoch 1/{self.n_epoch}", total, "batch",
                                         planned_s=(self.deadline - time.time()) if self.deadline else None)

    def after_batch(self):
        if not self.training:
            return
        done = self.epoch * len(self.dls.train) + self.iter + 1
        self.reporter.update(done=done, step=f"classifier epoch {self.epoch + 1}/{self.n_epoch}",
                             loss=float(self.learn.smooth_loss))
        if self.deadline is not None and time.time() > self.deadline:
            logger.warning("classifier: CLASSIFIER.TIME_BUDGET_MIN is spent at epoch %d/%d, batch %d: ending the fit",
                           self.epoch + 1, self.n_epoch, self.iter + 1)
            raise CancelFitException()

    def after_epoch(self):
        names = [n for n in self.recorder.metric_names if n not in ("epoch", "time")]
        values = dict(zip(names, self.recorder.values[-1])) if self.recorder.values else {}
        auc = values.get("roc_auc")
        self.reporter.update(val_auc=float(auc) if auc is not None else None, force=True)


# CLASSIFIER keys that change nothing in the trained weights (prediction settings): an export is
# reused across changes of these.
PREDICTION_ONLY_KEYS = ("TTA", "NUM_WORKERS", "BATCH_SIZE_PREDICT")
# Keys added after exports were made, at the value that trains as before they existed: left out of
# the fingerprint there, so that an upgrade does not train again a classifier it would train alike.
NEUTRAL_KEYS = {"SPACE_TO_DEPTH": 1}


def get_training_fingerprint(cfg, frame: pd.DataFrame) -> dict:
    """What an export was trained from: the ``CLASSIFIER`` settings that shape the weights, the
    tile size, the device kind, and a digest of the labelled images (file, label, fold)."""
    import hashlib

    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in cfg.CLASSIFIER.items()
                if k not in PREDICTION_ONLY_KEYS and (k not in NEUTRAL_KEYS or v != NEUTRAL_KEYS[k])}
    rows = frame[["file_name", "label", "is_valid"]].astype(str).agg(",".join, axis=1)
    digest = hashlib.sha256("\n".join(rows).encode()).hexdigest()
    return {"classifier": settings, "image_size": int(cfg.DATA.IMAGE_SIZE),
            "device": "cuda" if torch.cuda.is_available() else "cpu", "images": len(frame), "data_sha256": digest}


def _fingerprint_changes(old: dict, new: dict) -> list[str]:
    changes = [f"CLASSIFIER.{k}: {old.get('classifier', {}).get(k)!r} -> {v!r}"
               for k, v in new["classifier"].items() if old.get("classifier", {}).get(k) != v]
    changes += [f"{k}: {old.get(k)!r} -> {new[k]!r}" for k in ("image_size", "device", "images")
                if old.get(k) != new[k]]
    if old.get("data_sha256") != new["data_sha256"] and old.get("images") == new["images"]:
        changes.append("the images or their labels/folds")
    return changes


def get_output_paths(cfg) -> dict[str, Path]:
    """Every file a classifier training run writes (``module_config.CLASSIFIER_FILES``), by name."""
    return {what: get_classifier_path(cfg, what) for what in module_config.CLASSIFIER_FILES if what != "plan"}


def train_classifier(cfg, train_dicts: Sequence[dict], val_dicts: Sequence[dict], fresh: bool = False) -> dict[str, Path]:
    """Train with one-cycle for ``CLASSIFIER.EPOCHS`` (on CPU under bf16 autocast where
    ``CLASSIFIER.PRECISION`` resolves to bf16: :func:`training_precision`), export the learner and
    write the validation report (predicted at ``CLASSIFIER.PRECISION``). Labels: an image is
    ``ship`` when its dict has any annotation.

    An export trained on the same config and data (:func:`get_training_fingerprint`, stored beside
    it as ``export.json``) is **reused**, not trained again, unless ``fresh``. When ``fresh`` or the
    config or data changed, the earlier ``runs/<run>/classifier`` folder is moved aside (never
    deleted), with a warning naming what changed. Returns :func:`get_output_paths`
    (``export``: ``runs/<run>/classifier/export.pkl``, ``history``, ``val_thresholds``, ...).
    """
    frame = get_label_frame(train_dicts, val_dicts)
    paths = get_output_paths(cfg)
    fingerprint = get_training_fingerprint(cfg, frame)
    old = json.loads(paths["fingerprint"].read_text()) if paths["fingerprint"].is_file() else None
    if paths["export"].is_file():
        if old == fingerprint and not fresh:
            logger.info("classifier: reused %s (trained on the same config and data; --fresh / FRESH = True trains "
                        "again)", paths["export"])
            return paths
        why = "FRESH / --fresh" if fresh else ("; ".join(_fingerprint_changes(old, fingerprint)) if old
                                                else "no record of what it was trained on")
        logger.warning("classifier: training again (%s)", why)
        set_aside(get_classifier_dir(cfg), logger)
    out_dir = get_classifier_dir(cfg)
    set_seed(cfg.CLASSIFIER.SEED, reproducible=True)
    loss_func = get_loss(cfg, frame)
    dls = build_dataloaders(cfg, frame)
    learn = build_learner(cfg, dls, loss_func, out_dir)
    learn.tile_size = int(cfg.DATA.IMAGE_SIZE)  # what ReducedImageOpener enforces; travels in the export
    lr = cfg.CLASSIFIER.LR
    if cfg.CLASSIFIER.PRETRAINED:
        # Satellite tiles are far from ImageNet: train the whole body, at a tenth of the head's LR.
        learn.unfreeze()
        lr = slice(lr / 10, lr)
    epochs, deadline = cfg.CLASSIFIER.EPOCHS, None
    if cfg.CLASSIFIER.TIME_BUDGET_MIN > 0:
        plan = plan_epochs(cfg, learn)
        epochs, deadline = plan["epochs"], plan["started"] + 60 * cfg.CLASSIFIER.TIME_BUDGET_MIN
        with atomic_path(get_classifier_path(cfg, "plan")) as tmp:
            tmp.write_text(json.dumps(plan, indent=1))
    save_cfg(_with_epochs(cfg, epochs), out_dir)  # the resolved config: the planned epochs
    logger.info("classifier: %d train / %d val images, %.1f%% with ships; image size %d, %d epochs",
                (~frame["is_valid"]).sum(), frame["is_valid"].sum(), 100 * (frame["label"] == SHIP).mean(),
                cfg.CLASSIFIER.IMAGE_SIZE, epochs)
    # Passed to fit, not to the learner, so the exported learner carries no writer.
    callbacks = [TrainingTensorBoard(log_dir=str(out_dir), trace_model=False, log_preds=False),
                 RunProgress(module_config.get_progress_path(cfg), deadline)]
    if deadline is not None:
        callbacks.append(ClockSchedule(plan["fit_end"]))
    with training_precision(learn, cfg.CLASSIFIER.PRECISION) as precision:
        logger.info("classifier: training at %s (CLASSIFIER.PRECISION %s)", precision, cfg.CLASSIFIER.PRECISION)
        learn.fit_one_cycle(epochs, lr, cbs=callbacks)
    drop_cell_head(learn, cfg, frame)  # the cell head only served training
    history = get_history(learn)
    with atomic_path(paths["history"]) as tmp:
        history.to_csv(tmp, index=False)

    if cfg.CLASSIFIER.PRECISION == "int8":
        calibration = get_int8_calibration_paths(cfg, frame)
        logger.info("classifier: calibrating int8 on %d training images", len(calibration))
        calibrate_int8(learn, calibration, batch_size=cfg.CLASSIFIER.BATCH_SIZE)

    with atomic_path(paths["export"]) as tmp:
        learn.export(tmp)
    logger.info("classifier exported to %s", paths["export"])

    val = frame[frame["is_valid"]]
    predictions = predict_p_ship(learn, val["file_name"].tolist(), batch_size=cfg.CLASSIFIER.BATCH_SIZE,
                                 tta=cfg.CLASSIFIER.TTA, num_workers=cfg.CLASSIFIER.NUM_WORKERS,
                                 precision=cfg.CLASSIFIER.PRECISION)
    predictions.insert(1, "has_ship", (val["label"] == SHIP).to_numpy())
    write_validation_report(predictions, cfg)
    with atomic_path(paths["fingerprint"]) as tmp:  # last: the export is complete and reported
        tmp.write_text(json.dumps(fingerprint, indent=1))
    return paths


def get_history(learn: Learner) -> pd.DataFrame:
    """Per-epoch ``epoch, train_loss, valid_loss, <metrics>`` from the learner's recorder."""
    names = [n for n in learn.recorder.metric_names if n not in ("epoch", "time")]
    history = pd.DataFrame([list(v) for v in learn.recorder.values], columns=names)
    history.insert(0, "epoch", range(len(history)))
    return history


# ---------------------------------------------------------------- validation report


def get_threshold_table(has_ship: np.ndarray, p_ship: np.ndarray,
                        thresholds: Sequence[float] = REPORT_THRESHOLDS) -> pd.DataFrame:
    """Gate quality per threshold: an image is sent to the detector when ``p_ship >= threshold``.

    Columns: threshold, tp, fp, fn, tn (ship images kept / ship-free kept / ship images gated out /
    ship-free gated out), precision, recall (of the ship class; precision 1 when nothing is kept),
    kept_fraction (share of images the detector has to process).
    """
    has_ship = np.asarray(has_ship, dtype=bool)
    p_ship = np.asarray(p_ship, dtype=np.float64)
    rows = []
    for t in thresholds:
        kept = p_ship >= t
        tp, fp = int((kept & has_ship).sum()), int((kept & ~has_ship).sum())
        fn, tn = int((~kept & has_ship).sum()), int((~kept & ~has_ship).sum())
        rows.append({"threshold": float(t), "tp": tp, "fp": fp, "fn": fn, "tn": tn,
                     "precision": tp / (tp + fp) if tp + fp else 1.0,
                     "recall": tp / (tp + fn) if tp + fn else 1.0,
                     "kept_fraction": kept.mean() if len(kept) else 0.0})
    return pd.DataFrame(rows)


def write_validation_report(predictions: pd.DataFrame, cfg) -> pd.DataFrame:
    """Write ``val_predictions.csv``, ``val_thresholds.csv`` and ``val_thresholds.png`` into the
    run's classifier folder; ``predictions`` has columns ImageId, has_ship, p_ship. Returns the
    threshold table."""
    import module_plots

    table = get_threshold_table(predictions["has_ship"], predictions["p_ship"])
    auc = roc_auc_or_nan(predictions["has_ship"].to_numpy(), predictions["p_ship"].to_numpy())
    with atomic_path(get_classifier_path(cfg, "val_predictions")) as tmp:
        predictions.to_csv(tmp, index=False)
    with atomic_path(get_classifier_path(cfg, "val_thresholds")) as tmp:
        table.to_csv(tmp, index=False)
    module_plots.save_figure(module_plots.plot_gate_report(table, auc, len(predictions)),
                             get_classifier_path(cfg, "val_thresholds_plot"))
    logger.info("validation ROC AUC %.4f; report in %s\n%s", auc, get_classifier_path(cfg, "val_thresholds"),
                table.to_string(index=False, float_format="%.3f"))
    return table


# ---------------------------------------------------------------- prediction


def load_classifier(path: str | os.PathLike) -> Learner:
    """The learner exported by :func:`train_classifier`, on the GPU when there is one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"classifier export {path} does not exist; train one first: "
                                "python module_classifier.py train --config CONFIG")
    return load_learner(path, cpu=not torch.cuda.is_available())


def predict_p_ship(learner: Learner, image_paths: Sequence[str | os.PathLike], batch_size: int = 64,
                   tta: bool = False, num_workers: int = 0, on_bad_image: str = "error",
                   progress: bool = True, precision: str = "auto") -> pd.DataFrame:
    """Probability that each image holds a ship, batched through a test DataLoader.

    Returns a DataFrame ``ImageId`` (file name), ``p_ship`` (float32 in [0, 1]) in the order of
    ``image_paths``. ``tta`` averages the probabilities of the four flips (4x the compute).
    ``precision`` (a ``CLASSIFIER.PRECISION`` value, see :func:`resolve_precision`) is that of the
    forward passes; the softmax and the TTA mean are float32. ``"auto"`` is bf16 on a CPU with
    native bf16 (1.7-2x faster than fp32, p_ship within ~0.005 of it) and fp16 on CUDA; pass
    ``"fp32"`` for probabilities that match ``learner.predict``. ``"int8"`` (x86 CPU only) runs
    :func:`int8_model`: fastest, but p_ship moves further from fp32 (see BENCHMARKS.md), and the
    learner must carry a calibration (:func:`calibrate_int8`), else this raises before any image is read.
    ``on_bad_image``: ``"error"`` raises at the first missing/corrupt file, naming it; ``"skip"``
    leaves missing and unreadable files out, logs them and lists them in ``result.attrs["skipped"]``
    (paths) and ``result.attrs["reasons"]`` (when a corrupt file stops the batched pass, every
    image is checked and the pass is redone). Images must have the tile size the classifier was
    trained on (``DATA.IMAGE_SIZE``, kept in the export): another size is a bad image.
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ValueError(f"on_bad_image {on_bad_image!r}: expected one of {BAD_IMAGE_POLICIES}")
    if resolve_precision(precision, "cpu") == "int8":  # a bad value fails here, before any image is read
        int8_model(learner)  # ... and so does a missing int8 calibration
    paths = [Path(p) for p in image_paths]
    if not paths:
        raise ValueError("no images to classify")
    names = pd.Series([p.name for p in paths])
    if names.duplicated().any():
        raise ValueError(f"image file names must be unique (they are the ImageIds); repeated: "
                         f"{sorted(set(names[names.duplicated()]))[:5]}")
    skipped = [p for p in paths if not p.is_file()]
    reasons = ["missing file"] * len(skipped)
    if skipped and on_bad_image == "error":
        raise FileNotFoundError(f"{len(skipped)} image(s) do not exist, e.g. {[str(p) for p in skipped[:3]]}")
    paths = [p for p in paths if p.is_file()]
    p_ship = np.empty(0, dtype=np.float32)
    try:
        if paths:
            p_ship = _predict_batches(learner, paths, batch_size, tta, num_workers, progress, precision)
    except (ValueError, FileNotFoundError) as exc:  # an unreadable image (re-raised by a worker or not)
        if on_bad_image == "error":
            raise
        # Only now pay for a check of every image: the usual all-readable case decodes each once.
        logger.warning("an image could not be read, checking all %d: %s", len(paths), str(exc).splitlines()[-1])
        problems = check_images(paths, _opener_image_size(learner), progress=progress)
        skipped += [p for p in paths if str(p) in problems]
        reasons += [problems[str(p)] for p in paths if str(p) in problems]
        paths = [p for p in paths if str(p) not in problems]
        if paths:
            p_ship = _predict_batches(learner, paths, batch_size, tta, num_workers, progress, precision)
    if skipped:
        logger.warning("skipped %d unreadable image(s): %s", len(skipped), [str(p) for p in skipped])
    result = pd.DataFrame({"ImageId": [p.name for p in paths], "p_ship": p_ship})
    result.attrs["skipped"] = [str(p) for p in skipped]
    result.attrs["reasons"] = reasons
    return result


def predict_p_ship_arrays(learner: Learner, images: Sequence[np.ndarray], batch_size: int = 64, tta: bool = False,
                          precision: str = "auto", progress: bool = False) -> np.ndarray:
    """Probability that each in-memory tile holds a ship: ``(H, W, 3)`` uint8 RGB arrays -> ``(N,)``
    float32 in [0, 1], in order (scene tiles, ``module_detect``).

    The same path as :func:`predict_p_ship` (the learner's test pipeline: opener, squish resize to
    ``CLASSIFIER.IMAGE_SIZE``, ImageNet normalisation; the same batches, ``precision``, flip ``tta``),
    minus the file: no decoding and no tile-size check, so a tile of any size is resized. Each
    array is first reduced as the opener's JPEG decoder reduces a file (``module_files.reduce_image``:
    area-averaged to the DCT-scaled size), so the model sees the pixels it was trained on: with a
    plain resize instead, the demo's ship tiles scored 0.025 lower on average (up to 0.27) than
    the same tiles read from their files, and the scene gate, chosen on files, lost ships it keeps
    there (BENCHMARKS.md, "Scene detection", fourteenth session). The result is within ~0.06 (mean
    0.001) of :func:`predict_p_ship` on JPEG files holding the same pixels.
    """
    images = list(images)
    for i, image in enumerate(images):
        if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(f"image {i}: expected an (H, W, 3) uint8 RGB array, got "
                             f"{getattr(image, 'shape', type(image))} {getattr(image, 'dtype', '')}")
    if resolve_precision(precision, "cpu") == "int8":  # a missing int8 calibration fails before any work
        int8_model(learner)
    if not images:
        return np.empty(0, dtype=np.float32)
    batches = _array_batches(learner, images, batch_size)
    return _predict_batches(learner, batches, batch_size, tta, 0, progress, precision, total=len(images))


def _array_batches(learner: Learner, images: Sequence[np.ndarray], batch_size: int) -> Iterator[torch.Tensor]:
    """The learner's test pipeline for in-memory ``images``, a batch at a time, without a fastai
    DataLoader: each image reduced (:func:`reduce_image`), then the learner's own item transforms
    only where they change it (its ``Resize``, squish: a reduced tile is already at its size, and PIL
    returns an image resized to its own size unchanged), stacked, and the learner's batch
    transforms (to float, ImageNet normalisation) on the loader's device, but for those that only
    resample (:func:`_only_resamples`). The same tensors as :func:`prediction_dataloader` over
    ``PILImage`` items (the files' path), without its per-item cost: the DataLoader and fastai's
    type dispatch took ~0.3 ms of the ~1.8 ms a 256 px slice cost the gate on a 2-core CPU
    (``bench/bench_gate.py``). On a GPU, where the model costs nearly nothing, the gate cost 3.9
    ms a slice, not yet split into its parts (BENCHMARKS.md, "GPU")."""
    reduce_to = _opener_size(learner)
    valid = learner.dls.valid
    item_tfms = [t for t in valid.after_item.fs if not isinstance(t, ToTensor)]
    batch_tfms = [t for t in valid.after_batch.fs if not _only_resamples(t)]
    device = getattr(valid, "device", None) or torch.device("cpu")
    target = (reduce_to, reduce_to) if reduce_to else None
    for start in range(0, len(images), batch_size):
        pixels = []
        for image in images[start:start + batch_size]:
            image = reduce_image(image, reduce_to)
            if image.shape[:2] != target:
                item = PILImage.create(image)
                for tfm in item_tfms:
                    item = tfm(item, split_idx=1)
                image = np.asarray(item)
            pixels.append(image)
        if len({p.shape for p in pixels}) > 1:
            raise ValueError(f"images {start}..{start + len(pixels) - 1}: the learner's item transforms gave "
                             f"sizes {sorted({p.shape for p in pixels})}; expected one size to batch")
        batch = TensorImage(torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).to(device))
        for tfm in batch_tfms:  # as a test set's: the training split's augmentations pass it by
            batch = tfm(batch, split_idx=1)
        yield batch


def prediction_dataloader(learner: Learner, items: Sequence, batch_size: int, num_workers: int = 0):
    """``learner.dls.test_dl`` over ``items`` (files or PIL images), in order, without the batch
    transforms that only resample (:func:`_only_resamples`): every prediction of files goes through
    it, so that files and in-memory slices (:func:`_array_batches`) give the same tensors."""
    dl = learner.dls.test_dl(items, bs=batch_size, num_workers=num_workers, shuffle=False, drop_last=False)
    dl.after_batch.fs = dl.after_batch.fs.filter(lambda t: not _only_resamples(t))  # this loader's own pipeline
    return dl


def _only_resamples(tfm) -> bool:
    """Whether batch transform ``tfm`` does nothing at the test split but resample the batch onto
    its own grid: fastai's affine augmentations (:class:`AffineCoordTfm`: the flips and rotation of
    ``aug_transforms``) use the identity matrix outside training, and without an output ``size``
    they keep the batch's, so all that is left is a bilinear ``grid_sample`` at the pixel centres
    (the same values to ~1e-5; on a 2-core CPU 0.18 ms a slice at 128 px and 0.8-1.0 ms at 256,
    ``bench/bench_gate.py``)."""
    return isinstance(tfm, AffineCoordTfm) and getattr(tfm, "size", None) is None


def _opener_size(learner: Learner) -> int | None:
    """The side the learner's :class:`ReducedImageOpener` reduces JPEG files to: that of its
    ``Resize`` item transform (both ``CLASSIFIER.IMAGE_SIZE``, :func:`build_dataloaders`), or None
    for a learner without one. (The opener itself is wrapped by fastai out of reach.)"""
    try:
        tfms = learner.dls.valid.after_item.fs
    except AttributeError:
        return None
    return next((int(max(t.size)) for t in tfms if isinstance(t, Resize)), None)


def _opener_image_size(learner: Learner) -> int | None:
    """The tile size the learner's image opener enforces (``DATA.IMAGE_SIZE`` at training, recorded on
    the learner as ``tile_size`` and exported with it), or None for exports that do not record it."""
    return getattr(learner, "tile_size", None)


def _forward_views(model: torch.nn.Module, batch: torch.Tensor, views, precision: str,
                   device: torch.device) -> list[torch.Tensor]:
    """float32 logits of ``model`` on ``batch`` and each flip of ``views``, under
    :func:`autocast_context`. fp16 ends at 65,504: a confident model's logits can overflow it (seen
    on CUDA, as a NaN p_ship), so images with a non-finite logit in any view run again in float32."""
    with autocast_context(precision, device):
        logits = [model(batch.flip(dims) if dims else batch).float() for dims in views]
    bad = ~torch.stack([view.isfinite().all(dim=1) for view in logits]).all(dim=0)
    if bad.any() and resolve_precision(precision, device) in ("fp16", "bf16"):
        redo = batch[bad]
        for view, dims in zip(logits, views):
            view[bad] = model(redo.flip(dims) if dims else redo).float()
    return logits


def _predict_batches(learner: Learner, inputs: list[Path] | Iterator[torch.Tensor], batch_size: int, tta: bool,
                     num_workers: int, progress: bool, precision: str, total: int | None = None) -> np.ndarray:
    """p_ship (float32, in order) of readable image ``inputs`` (files or PIL images), or of the
    batches of an iterator of prepared batch tensors (:func:`_array_batches`; ``total`` images):
    forward passes under :func:`autocast_context` (or through :func:`int8_model`), softmax and TTA
    mean in float32."""
    ship = list(learner.dls.vocab).index(SHIP)
    if isinstance(inputs, list):
        items = [str(p) if isinstance(p, (str, os.PathLike)) else p for p in inputs]
        dl = prediction_dataloader(learner, items, batch_size, num_workers)
        total = len(items)
    else:
        dl = ((batch,) for batch in inputs)
    device = next(learner.model.parameters()).device
    if precision == "int8":  # the quantized copy (int8_model) runs on the CPU, wherever the learner is
        device = torch.device("cpu")
    resolved = resolve_precision(precision, device)
    logger.debug("p_ship of %d images at %s on %s", total, resolved, device)
    views = TTA_FLIP_DIMS if tta else TTA_FLIP_DIMS[:1]
    out = []
    # channels-last convolutions are ~1.4x faster on CPU (oneDNN) and on tensor-core GPUs (int8
    # ~1.7x); the learner's model is put back as it was afterwards. A model already channels-last
    # (the scene gate's, converted once: ResNet-34's round trip costs ~27 ms a call on a 2-core
    # CPU) stays so.
    float_model = resolved != "int8"
    convert = float_model and not is_channels_last(learner.model)
    model = learner.model.eval() if float_model else int8_model(learner)
    if convert:
        model.to(memory_format=torch.channels_last)
    try:
        with torch.inference_mode(), contextlib.nullcontext() if float_model else _quiet_int8_warnings(), \
                tqdm(total=total, desc="p_ship", unit="img", disable=not progress) as bar:
            for (batch,) in dl:
                # Plain tensor: fastai's TensorImage dispatch costs time on every layer.
                batch = batch.as_subclass(torch.Tensor).to(device).contiguous(memory_format=torch.channels_last)
                logits = _forward_views(model, batch, views, precision, device)
                probs = sum(torch.softmax(view, dim=1)[:, ship] for view in logits)
                out.append((probs / len(views)).cpu())
                bar.update(len(batch))
    finally:
        if convert:
            model.to(memory_format=torch.contiguous_format)
    return torch.cat(out).clamp_(0.0, 1.0).numpy()


def is_channels_last(model: torch.nn.Module) -> bool:
    """Whether ``model``'s first 4-d weight (its first convolution's) is in channels-last layout."""
    weight = next((p for p in model.parameters() if p.dim() == 4), None)
    return weight is not None and weight.is_contiguous(memory_format=torch.channels_last) \
        and not weight.is_contiguous()


def write_predictions(predictions: pd.DataFrame, out: str | os.PathLike) -> Path:
    """Write ``ImageId,p_ship`` to ``out`` atomically."""
    out = Path(out)
    with atomic_path(out) as tmp:
        predictions[["ImageId", "p_ship"]].to_csv(tmp, index=False, float_format="%.6f")
    return out


# ---------------------------------------------------------------- command line


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Ship / no-ship classifier: train, or predict p_ship for a folder.")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train on the config's data, export runs/<run>/classifier/export.pkl; "
                                              "an export of the same config and data is reused")
    train.add_argument("--fresh", action="store_true",
                       help="train again even if the export matches (the earlier folder is moved aside, not deleted)")
    predict = commands.add_parser("predict", help="write ImageId,p_ship for every image in a folder")
    predict.add_argument("--images", required=True, help="folder of images")
    predict.add_argument("--out", required=True, help="CSV to write (ImageId,p_ship)")
    predict.add_argument("--model", default=None, help="exported learner (default runs/<run>/classifier/export.pkl)")
    predict.add_argument("--tta", default=None, action=argparse.BooleanOptionalAction,
                         help="flip TTA (default CLASSIFIER.TTA)")
    predict.add_argument("--on-bad-image", choices=BAD_IMAGE_POLICIES, default="error",
                         help="missing/corrupt/wrong-size image: stop naming it, or skip and list it")
    predict.add_argument("--max-failed", type=float, default=None,
                         help="with --on-bad-image skip: exit 1 when more images fail (a share if < 1, else a count; "
                              "default SUBMIT.MAX_FAILED); the report of failed files is written either way")
    for sub in (train, predict):
        module_config.add_config_args(sub)
    return parser


def main(args: argparse.Namespace) -> dict[str, Path] | Path:
    module_config.setup_logging()
    cfg = module_config.get_cfg_from_args(args)
    if args.command == "train":
        import module_preprocessing
        import module_synthetic

        module_synthetic.prepare_synthetic_input(cfg)
        train_dicts, val_dicts = module_preprocessing.get_train_val_dicts(cfg)
        return train_classifier(cfg, train_dicts, val_dicts, fresh=args.fresh)
    images = list_images(args.images)
    learner = load_classifier(args.model or get_classifier_path(cfg))
    tta = cfg.CLASSIFIER.TTA if args.tta is None else args.tta
    predictions = predict_p_ship(learner, images, batch_size=cfg.CLASSIFIER.BATCH_SIZE, tta=tta,
                                 num_workers=cfg.CLASSIFIER.NUM_WORKERS, on_bad_image=args.on_bad_image,
                                 precision=cfg.CLASSIFIER.PRECISION)
    out = write_predictions(predictions, args.out)
    logger.info("wrote p_ship of %d images to %s", len(predictions), out)
    skipped = predictions.attrs["skipped"]
    failures = pd.DataFrame({"ImageId": [Path(p).name for p in skipped], "reason": predictions.attrs["reasons"]})
    report = write_failure_report(failures, out)
    if skipped:
        logger.warning("%d image(s) skipped (%s): %s", len(skipped), report, skipped[:10])
    check_failure_limit(len(skipped), len(images), cfg.SUBMIT.MAX_FAILED if args.max_failed is None else args.max_failed,
                        report)
    return out


if __name__ == "__main__":
    main(get_args_parser().parse_args())
