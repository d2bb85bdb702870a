"""The pipeline's one config: every default with a comment, its valid range, and the run folder's layout.

The config is a detectron2 ``CfgNode``: detectron2's own keys (``MODEL``, ``SOLVER``, ``INPUT``,
``DATALOADER``, ...) start from the model-zoo base ``COCO-InstanceSegmentation/
mask_rcnn_R_50_FPN_3x.yaml``; :func:`add_airbus_config` adds the project's groups (``PATHS``,
``DATA``, ``SYNTH``, ``CLASSIFIER``, ``DETECTOR``, ``SUBMIT``, ``DETECT``) and sets the project's defaults for
detectron2 keys. :func:`get_cfg` then merges a YAML file (which may name a ``_BASE_``) and
overrides (``KEY VALUE`` or ``KEY=VALUE``), and checks every value against :data:`VALID`, the
ranges kept next to the defaults. Merging is strict: a misspelt key raises ``KeyError``; a value
out of range raises ``ValueError`` naming the key, the value and the valid range.

    cfg = get_cfg("configs/demo.yaml", ["CLASSIFIER.EPOCHS", "2"])
    run_dir = get_run_dir(cfg)        # runs/<PATHS.RUN_NAME>
    save_cfg(cfg, run_dir)            # runs/<run>/config.yaml, written atomically

Also here, once: the **run folder's layout** (``get_*_path(cfg)``: every file the pipeline writes
under ``runs/<run>/``), the detector's **resolution stages** (:func:`get_stages`) and their
detectron2 configs (:func:`get_model_cfg`), and the **command-line convention** every module
follows (:func:`add_config_args`, :func:`parse_overrides`, :func:`setup_logging`).

Imports nothing of the project but :mod:`module_files` (atomic writes). Importing this module does
nothing but define functions.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import re
from pathlib import Path
from typing import Callable, Sequence

import contextlib
import warnings
from typing import Iterator


@contextlib.contextmanager
def quiet_jit_deprecation() -> Iterator[None]:
    """Silence, for the block, the FutureWarning that ``torch.jit.script`` is deprecated: detectron2,
    fvcore and fastai script a few functions at import, ~20 warnings on every ``--help`` otherwise."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".torch\.jit\.script. is deprecated", category=FutureWarning)
        yield


with quiet_jit_deprecation():
    from detectron2 import model_zoo
    from detectron2.config import CfgNode as CN
    from detectron2.config import get_cfg as get_detectron2_cfg

from module_files import atomic_path

BASE_MODEL_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
COCO_MASK_RCNN_WEIGHTS = (
    "detectron2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl"
)
DEFAULT_CONFIG = "configs/airbus.yaml"  # what every command line uses without --config

# Values the choice keys take (each module imports its tuple from here).
CHECK_MODES = ("off", "error", "skip")  # DATA.CHECK_IMAGES
BALANCE_MODES = ("weights", "sampler", "none")  # CLASSIFIER.BALANCE
PRECISIONS = ("auto", "fp32", "bf16", "int8")  # CLASSIFIER.PRECISION
BEST_METRICS = ("f2_ships", "f2")  # DETECTOR.BEST_METRIC
NORMS = ("BN", "GN", "SyncBN")  # DETECTOR.RANDOM_INIT_NORM
STRETCH_MODES = ("auto", "percentile", "none")  # DETECT.STRETCH
DETECT_FORMATS = ("geojson", "coco", "csv")  # DETECT.FORMATS
GEOJSON_CRSS = ("native", "EPSG:4326")  # DETECT.GEOJSON_CRS


def add_airbus_config(cfg: CN) -> CN:
    """Add the project's keys to ``cfg`` (in place) and set its defaults for detectron2 keys."""
    # ---------------------------------------------------------------- paths
    cfg.PATHS = CN()
    # Folder with the Kaggle data: train_v2/, test_v2/, train_ship_segmentations_v2.csv,
    # sample_submission_v2.csv (the layout of `kaggle competitions download`, unzipped).
    cfg.PATHS.INPUT_DIR = "input"
    # Every output goes under RUNS_DIR/RUN_NAME (checkpoints, logs, TensorBoard, submission).
    cfg.PATHS.RUNS_DIR = "runs"
    cfg.PATHS.RUN_NAME = "airbus"

    # ---------------------------------------------------------------- data
    cfg.DATA = CN()
    # File and folder names inside PATHS.INPUT_DIR (absolute paths are taken as they are).
    cfg.DATA.TRAIN_CSV = "train_ship_segmentations_v2.csv"
    cfg.DATA.TRAIN_IMAGES = "train_v2"
    cfg.DATA.TEST_IMAGES = "test_v2"
    cfg.DATA.SAMPLE_SUBMISSION = "sample_submission_v2.csv"
    # Ground truth of the test images, for a local score. Kaggle does not publish it; the
    # synthetic generator writes it. Empty: no local test score.
    cfg.DATA.TEST_TRUTH_CSV = ""
    # Kaggle tiles are 768x768; every image is checked against this size when CHECK_IMAGES is on.
    cfg.DATA.IMAGE_SIZE = 768
    # Image checks when building dataset dicts: "off" (trust the CSV), "error" (stop at the first
    # missing/corrupt/wrong-size file, naming it), "skip" (drop such files and report them).
    cfg.DATA.CHECK_IMAGES = "skip"
    # Fraction of images held out for validation by the overlap-aware split.
    cfg.DATA.VAL_FRACTION = 0.1
    # Seed of the split (deterministic given the seed).
    cfg.DATA.SPLIT_SEED = 42
    # Use at most this many training images (0: all). For quick experiments.
    cfg.DATA.MAX_IMAGES = 0

    # ---------------------------------------------------------------- synthetic data
    cfg.SYNTH = CN()
    # Generate a synthetic Kaggle-format dataset into PATHS.INPUT_DIR when the Kaggle data is
    # not there. Real-data configs keep this off, so a missing download is an error.
    cfg.SYNTH.ENABLED = False
    cfg.SYNTH.N_TRAIN = 400  # training images
    cfg.SYNTH.N_TEST = 100  # test images (their truth goes to a separate CSV)
    cfg.SYNTH.SEED = 0  # same seed, same dataset
    cfg.SYNTH.EMPTY_FRACTION = 0.78  # share of ship-free images, as in train_v2
    cfg.SYNTH.IMAGE_SIZE = 768  # side of the square tiles

    # ---------------------------------------------------------------- classifier
    cfg.CLASSIFIER = CN()
    cfg.CLASSIFIER.ARCH = "resnet34"  # torchvision architecture for fastai's vision_learner
    # Channels of every layer times WIDTH (random init only: module_classifier.narrow_resnet).
    cfg.CLASSIFIER.WIDTH = 1.0
    # Load ImageNet weights (needs the torch hub cache or network). False: random init.
    cfg.CLASSIFIER.PRETRAINED = True
    cfg.CLASSIFIER.IMAGE_SIZE = 256  # images are resized to this square side
    cfg.CLASSIFIER.BATCH_SIZE = 64  # images per training/prediction batch
    cfg.CLASSIFIER.EPOCHS = 4  # one-cycle epochs
    cfg.CLASSIFIER.LR = 1e-3  # one-cycle maximum learning rate
    # Handling of the ~78% ship-free images: "weights" (class-weighted loss), "sampler"
    # (balanced sampling, with replacement: half of each batch ship tiles), or "none". From random
    # init on generated data the sampler learns far more per epoch (configs/demo.yaml uses it;
    # BENCHMARKS.md); for pretrained weights on Kaggle's data both are untested here.
    cfg.CLASSIFIER.BALANCE = "weights"
    cfg.CLASSIFIER.TTA = True  # flip TTA at prediction time
    cfg.CLASSIFIER.NUM_WORKERS = 4  # data-loader workers
    cfg.CLASSIFIER.MAX_ROTATE = 20.0  # training augmentation: rotation drawn from [-MAX_ROTATE, +MAX_ROTATE] deg
    cfg.CLASSIFIER.MAX_LIGHTING = 0.2  # training augmentation: brightness/contrast change up to this
    cfg.CLASSIFIER.SEED = 0  # seed of weights init, shuffling and augmentation (reproducible runs)
    # Precision of the classifier's forward passes: "fp32"; "bf16" (bfloat16 autocast); or "auto":
    # on CUDA float16 autocast, on CPU bf16 where the CPU has native bf16 (AVX512-BF16 / AMX),
    # else fp32. Applies to prediction, and to training on CPU (backward, weights and optimizer
    # stay float32); CUDA training stays float32. On an AVX512-BF16 CPU bf16 predicts 1.7-2x
    # faster (p_ship within 0.005 of fp32 on the demo model) and trains ~1.6x faster per epoch;
    # on a CPU without native bf16 it runs, emulated and slower.
    # "int8" (x86 CPUs only): prediction through a statically quantized copy (FX graph mode, int8
    # convolutions), calibrated on INT8_CALIBRATION_IMAGES training images at the end of training
    # and stored in the export; training itself runs as "auto". ~1.8x faster than bf16 here, but
    # p_ship strays further from fp32 (BENCHMARKS.md).
    cfg.CLASSIFIER.PRECISION = "auto"
    cfg.CLASSIFIER.INT8_CALIBRATION_IMAGES = 256  # training images (seeded sample) that calibrate int8
    # Wall-clock budget of classifier training in minutes (0: train CLASSIFIER.EPOCHS as set). A
    # timed probe of a few batches after warmup sets the number of epochs that ends inside it.
    cfg.CLASSIFIER.TIME_BUDGET_MIN = 0.0
    # Weight of an auxiliary training loss (0: off): a 1x1 convolution on the ResNet's layer3
    # features predicts which cells of the image (16 x 16 px at the classifier's size) hold ship
    # pixels, learnt from the ground-truth masks (module_classifier.ShipCellsModel, ShipCellsLoss).
    # Training only: the export and p_ship are the plain classifier's. From random init on the
    # demo's data it learns where ships are much sooner (configs/demo.yaml uses 1.0; BENCHMARKS.md);
    # with ImageNet weights on Kaggle's data untested here.
    cfg.CLASSIFIER.CELL_LOSS_WEIGHT = 0.0
    # Space to depth at the input (1: off): each N x N square of pixels enters the ResNet's first
    # convolution as one pixel of 3 * N * N channels (module_classifier.SpaceToDepthStem). The
    # network then costs about what it does at IMAGE_SIZE / N, but sees every pixel at IMAGE_SIZE.
    # On the demo's data (256 px tiles, N 2), trained 12 minutes, it keeps the scene gate's few-pixel
    # ships with a gate as cheap as the 128 px one; trained 3 minutes it lost more (BENCHMARKS.md,
    # "Scene detection", seventeenth session). IMAGE_SIZE must be a multiple of N. Untested on
    # Kaggle's 768 px tiles (N 3 at IMAGE_SIZE 768 would cost about what 256 px does).
    cfg.CLASSIFIER.SPACE_TO_DEPTH = 1

    # ---------------------------------------------------------------- detector
    cfg.DETECTOR = CN()
    # Resolution stages, trained in order, each starting from the previous stage's weights:
    # [input size (px), iterations, base LR, warmup iterations].
    cfg.DETECTOR.STAGES = [[256, 20000, 0.02, 1000], [512, 20000, 0.01, 500], [768, 20000, 0.005, 500]]
    # Share of ship-free images mixed into training as hard negatives (0: ship images only).
    cfg.DETECTOR.EMPTY_FRACTION = 0.1
    # Train on CROP_SIZE px square crops of the stage-sized image, each holding a ship of the tile
    # (module_train.ShipCrop; 0: whole images). Cheaper steps where ships are small; prediction and
    # validation still see whole images at the stage size. Best a multiple of 32 (the FPN pads its
    # inputs to that).
    cfg.DETECTOR.CROP_SIZE = 0
    cfg.DETECTOR.HFLIP_PROB = 0.5  # horizontal flip probability
    cfg.DETECTOR.VFLIP_PROB = 0.5  # vertical flip probability
    cfg.DETECTOR.ROTATION_DEG = 20.0  # rotation drawn uniformly from [-ROTATION_DEG, +ROTATION_DEG]
    cfg.DETECTOR.LIGHTING_STD = 0.1  # std of random lighting (brightness/contrast) factor
    # Run the validation hook (competition F2 + COCO AP) every EVAL_PERIOD iterations.
    cfg.DETECTOR.EVAL_PERIOD = 5000
    # Which validation F2 picks runs/<run>/detector/model_best.pth: "f2_ships" (over images with
    # ships: the classifier gate keeps the detector off most ship-free tiles, and on ~78% empty
    # tiles the overall F2 favours an early model that predicts nothing) or "f2" (every image).
    cfg.DETECTOR.BEST_METRIC = "f2_ships"
    cfg.DETECTOR.VIS_IMAGES = 4  # ground-truth/prediction overlays written to TensorBoard
    # Validate on at most this many validation images (an even spread over the split; 0: all).
    cfg.DETECTOR.EVAL_MAX_IMAGES = 1000
    cfg.DETECTOR.EVAL_BATCH_SIZE = 8  # images per forward pass in the validation hook
    # Each stage's LR drops by SOLVER.GAMMA at these fractions of its iterations (under a time
    # budget: of its iterations or of its time, whichever comes first; module_train.DeadlineLRMultiplier).
    cfg.DETECTOR.LR_DECAY_AT = [0.75, 0.9]
    # With MODEL.WEIGHTS "" (random init) the ResNet uses this norm instead of FrozenBN, and
    # BACKBONE.FREEZE_AT becomes 0: "BN", "GN" or "SyncBN" (multi-GPU only).
    cfg.DETECTOR.RANDOM_INIT_NORM = "BN"
    # With MODEL.WEIGHTS "" only: start stage 1's ResNet from the trained ship classifier's body
    # (CLASSIFIER.ARCH must be the same ResNet as MODEL.RESNETS.DEPTH), so the detector does not
    # learn its features from nothing; the FPN and heads stay random. The classifier trains first.
    cfg.DETECTOR.BACKBONE_FROM_CLASSIFIER = False
    # Seed of the hard-negative sample, weight init, sampling and augmentation (each rank adds
    # its rank). -1: random.
    cfg.DETECTOR.SEED = 0
    cfg.DETECTOR.LOG_PERIOD = 20  # write losses/LR to the log, metrics.json, TensorBoard every N iterations
    cfg.DETECTOR.MAX_CHECKPOINTS_KEPT = 3  # periodic checkpoints kept per stage (0: all)
    # Wall-clock budget of detector training (all stages) in minutes (0: the iterations as set). A
    # timed probe at each stage's size sets the iterations so that training ends inside it; the
    # stages keep their proportions, warmup and LR steps scale with them.
    cfg.DETECTOR.TIME_BUDGET_MIN = 0.0
    # Input size (px, square) of prediction after training: tuning, the submission, scenes and the
    # benchmarks (module_inference.load_detector). 0: the size of the stage the checkpoint was
    # trained at. Upscaling at test time helps small ships; the validation hook during training
    # keeps each stage's own size.
    cfg.DETECTOR.TEST_SIZE = 0

    # ---------------------------------------------------------------- submission
    cfg.SUBMIT = CN()
    # Images whose classifier p_ship is below this get an empty row; the detector skips them.
    cfg.SUBMIT.CLASSIFIER_THRESHOLD = 0.5
    cfg.SUBMIT.SCORE_THRESHOLD = 0.5  # detections below this score are dropped
    cfg.SUBMIT.MIN_AREA = 20  # masks smaller than this (px, after overlap removal) are dropped
    cfg.SUBMIT.TTA = False  # flip TTA for the detector, masks merged
    # Detections of one ship merged into one (module_inference.merge_fragments): a detection whose
    # mask overlaps a higher-scoring one's by at least this share of the smaller mask joins it
    # (union of the masks, the higher score). 0: off. For a detector that puts several parts of
    # a ship in several detections (the demo's, trained minutes on a CPU); a well-trained one
    # rarely does, and merging can join two ships moored side by side whose masks bleed.
    cfg.SUBMIT.MERGE_IOS = 0.0
    cfg.SUBMIT.MERGE_MIN_SCORE = 0.1  # detections below this score neither lead nor join a merge
    cfg.SUBMIT.BATCH_SIZE = 8  # detector images per forward pass
    # `predict` fails (exit 1, the report of failed files still written) when more images than
    # this cannot be read: a share of the images when < 1, else a count.
    cfg.SUBMIT.MAX_FAILED = 0.01
    # Grids searched by `module_submit.py tune` on the validation split. Classifier threshold 0
    # is the detector alone (no gate); high score thresholds let it stay silent on doubtful images.
    cfg.SUBMIT.TUNE_CLASSIFIER_THRESHOLDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    cfg.SUBMIT.TUNE_SCORE_THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    cfg.SUBMIT.TUNE_MIN_AREAS = [0, 10, 20, 40, 80]
    # Expected share of ship-free images where the submission will be used. `tune` weights the
    # validation images so that the ship-free ones carry this share of the F2, chooses for it and
    # reports the F2 to expect there: one false ship zeroes a ship-free tile, so the more of them,
    # the more cautious the choice. -1: the training split's own share (Kaggle's case: its test
    # set is ship-free about as often as train_v2, ~78%).
    cfg.SUBMIT.TARGET_EMPTY_FRACTION = -1.0
    # The no-harm guard of `tune`: a setting is eligible only when its gain in F2 (at the target
    # share) over predicting no ship anywhere stays above 0 at this lower confidence bound,
    # estimated by a Bayesian bootstrap of the validation images (GUARD_BOOTSTRAP resamples,
    # seeded by GUARD_SEED; ship-free and ship images weighted apart, each kind with one
    # pessimistic pseudo-image at half weight, so a false ship never seen on a small split is not
    # taken as impossible). When no setting is eligible, `tune` keeps the most conservative
    # setting no worse than all-empty on validation (the fewest images with a predicted ship), or
    # predicts no ship at all, and says so in the log and thresholds.yaml. 0: no guard (the best
    # expected F2 at the target share).
    cfg.SUBMIT.GUARD_CONFIDENCE = 0.9
    cfg.SUBMIT.GUARD_BOOTSTRAP = 1000
    cfg.SUBMIT.GUARD_SEED = 0
    # Size buckets of masks (px of a 768 x 768 tile; scaled with the image area for other sizes):
    # [100, 1000] makes small (< 100 px), medium and large (>= 1000 px) ships. They split the
    # error report's F2 by size, and the size-aware score thresholds below.
    cfg.SUBMIT.SIZE_BUCKET_EDGES = [100, 1000]
    # Score thresholds per size bucket (len(SIZE_BUCKET_EDGES) + 1 values, by each detection's
    # mask area as predicted); they replace SCORE_THRESHOLD. []: one threshold for every size.
    cfg.SUBMIT.SCORE_THRESHOLDS_BY_SIZE = []
    # `tune` also tries score thresholds per size bucket (every combination of
    # TUNE_SCORE_THRESHOLDS over the buckets, with each of TUNE_MIN_AREAS, behind the chosen gate)
    # and keeps them only when they beat the single threshold at the guard's lower confidence
    # bound (with GUARD_CONFIDENCE 0: by any gain).
    cfg.SUBMIT.TUNE_SIZE_AWARE = True

    # ---------------------------------------------------------------- scene detection (module_detect)
    cfg.DETECT = CN()
    # Side of the square slices a scene is cut into (px). 0: DATA.IMAGE_SIZE, the tile size both
    # models were trained on and the thresholds tuned for. `--tile` overrides.
    cfg.DETECT.TILE_SIZE = 0
    # Overlap of neighbouring slices (px), < the tile size: a ship shorter than this that a slice's
    # border cuts lies whole in the neighbouring slice (longer ones are merged from their pieces).
    # -1: a sixth of the tile size (128 px at 768, 42 at 256). `--overlap` overrides.
    cfg.DETECT.OVERLAP = -1
    # Detections of two overlapping slices are one ship when their masks' IoU inside the two slices'
    # common band is at least this; the ship's mask is then their union, its score the higher one.
    cfg.DETECT.MERGE_IOU = 0.5
    # GeoTIFF bands (1-based) read as red, green and blue; [1, 1, 1] for a single-band scene.
    cfg.DETECT.BANDS = [1, 2, 3]
    # Raster values -> 8-bit RGB: "auto" (8-bit data as they are, other types "percentile"),
    # "percentile" (per band, linear from the STRETCH_PERCENTILES of a decimated read to 0..255,
    # clipped), "none" (values clipped to 0..255).
    cfg.DETECT.STRETCH = "auto"
    cfg.DETECT.STRETCH_PERCENTILES = [2.0, 98.0]  # low and high percentile of the stretch, over valid pixels
    cfg.DETECT.STRETCH_SAMPLE_SIZE = 1024  # longest side (px) of the decimated read the percentiles come from
    # Slices with at most this share of valid (not nodata) pixels are skipped before the models
    # (0: only slices without any data).
    cfg.DETECT.MIN_VALID_FRACTION = 0.0
    # Flip TTA in the scene gate (the submission's gate follows CLASSIFIER.TTA). Off: one pass
    # instead of four over every slice, most of them sea; p_ship then moves by 0.015-0.026 on
    # average from the TTA mean, and 1 of the demo's 200 test tiles changes side of the tuned
    # gate (BENCHMARKS.md, "Scene detection"). Tuning records the validation tiles' p_ship this
    # way too, so that the scene gate (GATE_SHIP_RECALL) is chosen on what it will see.
    cfg.DETECT.GATE_TTA = False
    # The scene gate: the share of the true ships the detector finds on validation (at the tuned
    # score and area thresholds, ungated) that the gate must keep. Scenes are gated at the highest
    # classifier threshold that keeps it (from thresholds.yaml's `scene_gate`, written by tuning),
    # never above the submission's: that one is tuned for the Kaggle F2, where a false ship on a
    # ship-free tile costs the whole tile, and drops ship tiles a scene would rather keep: a demo
    # run's 0.9 kept 48 of the 54 validation ships its detector found, 0.53 keeps 53; on the
    # 4,096 px bench scene the gated run then missed 3 of the 49 true ships ungated finds, not 19,
    # at 2.3x instead of 4.1x the ungated speed (BENCHMARKS.md, "Scene detection"). <= 0: the submission's.
    cfg.DETECT.GATE_SHIP_RECALL = 0.98
    # Slices read, gated and detected together; bounds memory (CHUNK_TILES x tile^2 x 3 bytes of pixels).
    cfg.DETECT.CHUNK_TILES = 32
    # Outputs per scene, any of "geojson", "coco", "csv" (the quicklook PNG and the report always).
    cfg.DETECT.FORMATS = ["geojson", "coco", "csv"]
    # GeoJSON coordinates of a georeferenced scene: "native" (the raster's CRS) or "EPSG:4326"
    # (lon/lat, RFC 7946). A scene without a CRS always gets pixel coordinates, said so in the file.
    cfg.DETECT.GEOJSON_CRS = "native"
    cfg.DETECT.QUICKLOOK_SIZE = 2048  # longest side of the quicklook PNG (px)
    # GDAL's block cache while reading rasters (MB); GDAL's own default, 5% of RAM, can reach GBs.
    # Enough for a row of blocks (scene width x block height x bands x bytes) reads each block once.
    cfg.DETECT.GDAL_CACHE_MB = 64
    # oneDNN (PyTorch's CPU kernels) caches a compiled kernel per input shape, 1024 by default; the
    # mask head sees a new shape for each count of detections, and over a large scene that cache
    # grew by 1.5 GB (BENCHMARKS.md). This caps it, set when detection starts, unless the
    # environment sets ONEDNN_PRIMITIVE_CACHE_CAPACITY; it takes effect only if nothing ran on
    # oneDNN before in the process (a command line, a fresh kernel). 0: oneDNN's default.
    cfg.DETECT.ONEDNN_CACHE_CAPACITY = 64
    # `module_detect.py` fails (exit 1, every output and the failure report still written) when more
    # scenes than this cannot be read: a share of the scenes when < 1, else a count.
    cfg.DETECT.MAX_FAILED = 0.0

    # ---------------------------------------------------------------- detectron2 keys
    cfg.MODEL.DEVICE = "auto"  # "auto": cuda when available, else cpu
    cfg.MODEL.WEIGHTS = COCO_MASK_RCNN_WEIGHTS  # "" for random init (then BN + FREEZE_AT 0)
    cfg.MODEL.ROI_HEADS.NUM_CLASSES = 1  # ship
    # Ships are ~10 to ~300 px long at 768 px (masks of 7 to ~18,500 px), often 3:1 to 5:1 and
    # in any orientation. Anchors 16..256 on P2..P6 cover them (the smallest anchor still matches
    # a 10 px hull, whose best anchor is kept positive by the RPN's low-quality matching); the
    # extra aspect ratios 1:4 and 4:1 fit axis-aligned hulls. Inputs of stage sizes below 768
    # shrink ships: at 256 px they are ~3 to ~100 px, still within the anchor range.
    cfg.MODEL.ANCHOR_GENERATOR.SIZES = [[16], [32], [64], [128], [256]]
    cfg.MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS = [[0.25, 0.5, 1.0, 2.0, 4.0]]
    # At most 14 ships per image: 256 sampled RoIs per image (not 512) still hold every
    # positive, at half the box/mask-head cost.
    cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE = 256
    # Ships moored side by side have overlapping boxes: keep more of them through NMS.
    cfg.MODEL.ROI_HEADS.NMS_THRESH_TEST = 0.6
    # The mapper builds BitMasks from the COCO RLE (ships are small: polygons gain nothing).
    cfg.INPUT.MASK_FORMAT = "bitmask"
    cfg.DATALOADER.NUM_WORKERS = 4  # detector data-loader workers (use 0-1 on 2 cores)
    cfg.SOLVER.IMS_PER_BATCH = 8  # images per detector iteration, all GPUs together
    cfg.SOLVER.CHECKPOINT_PERIOD = 2000  # iterations between resumable checkpoints
    cfg.TEST.DETECTIONS_PER_IMAGE = 50  # at most 14 ships per Kaggle image
    return cfg


# ============================================================================ valid values
def _number(low: float | None = None, high: float | None = None, *, integer: bool = False,
            low_open: bool = False, high_open: bool = False) -> tuple[Callable, str]:
    """A check for a number in [low, high] (open ends as asked), and its text for the error."""
    def check(value) -> bool:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            return False
        if integer and value != int(value):
            return False
        if low is not None and (value <= low if low_open else value < low):
            return False
        return high is None or (value < high if high_open else value <= high)

    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        text = f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    elif low is not None:
        text = f"{kind} {'>' if low_open else '>='} {low:g}"
    else:
        text = kind
    return check, text


def _each(rule: tuple[Callable, str]) -> tuple[Callable, str]:
    check, text = rule
    return (lambda values: isinstance(values, (list, tuple)) and len(values) > 0 and all(check(v) for v in values),
            f"a non-empty list, each {text}")


def _one_of(values: Sequence[str]) -> tuple[Callable, str]:
    return (lambda value: value in values), f"one of {', '.join(map(repr, values))}"


PROBABILITY = _number(0, 1)
FRACTION = _number(0, 1, high_open=True)  # a share that must leave something: [0, 1)
POSITIVE_INT = _number(1, integer=True)
COUNT = _number(0, integer=True)  # 0 or more
DEGREES = _number(0, 180)

# The valid values of the project's keys (and of the detectron2 keys it relies on), checked by
# get_cfg once the file and the overrides are merged. One table, next to the defaults above.
VALID: dict[str, tuple[Callable, str]] = {
    "DATA.IMAGE_SIZE": POSITIVE_INT,
    "DATA.CHECK_IMAGES": _one_of(CHECK_MODES),
    "DATA.VAL_FRACTION": _number(0, 1, low_open=True, high_open=True),
    "DATA.SPLIT_SEED": COUNT,
    "DATA.MAX_IMAGES": COUNT,
    "SYNTH.N_TRAIN": POSITIVE_INT,
    "SYNTH.N_TEST": POSITIVE_INT,
    "SYNTH.SEED": COUNT,
    "SYNTH.EMPTY_FRACTION": FRACTION,
    "SYNTH.IMAGE_SIZE": _number(32, integer=True),
    "CLASSIFIER.IMAGE_SIZE": _number(16, integer=True),
    "CLASSIFIER.BATCH_SIZE": POSITIVE_INT,
    "CLASSIFIER.EPOCHS": POSITIVE_INT,
    "CLASSIFIER.LR": _number(0, low_open=True),
    "CLASSIFIER.BALANCE": _one_of(BALANCE_MODES),
    "CLASSIFIER.NUM_WORKERS": COUNT,
    "CLASSIFIER.MAX_ROTATE": DEGREES,
    "CLASSIFIER.MAX_LIGHTING": FRACTION,
    "CLASSIFIER.SEED": COUNT,
    "CLASSIFIER.PRECISION": _one_of(PRECISIONS),
    "CLASSIFIER.INT8_CALIBRATION_IMAGES": POSITIVE_INT,
    "CLASSIFIER.TIME_BUDGET_MIN": _number(0),
    "CLASSIFIER.WIDTH": _number(0.125, 4),
    "CLASSIFIER.CELL_LOSS_WEIGHT": _number(0),
    "CLASSIFIER.SPACE_TO_DEPTH": POSITIVE_INT,
    "DETECTOR.EMPTY_FRACTION": FRACTION,
    "DETECTOR.CROP_SIZE": COUNT,
    "DETECTOR.HFLIP_PROB": PROBABILITY,
    "DETECTOR.VFLIP_PROB": PROBABILITY,
    "DETECTOR.ROTATION_DEG": DEGREES,
    "DETECTOR.LIGHTING_STD": _number(0, 1),
    "DETECTOR.EVAL_PERIOD": COUNT,
    "DETECTOR.BEST_METRIC": _one_of(BEST_METRICS),
    "DETECTOR.VIS_IMAGES": COUNT,
    "DETECTOR.EVAL_MAX_IMAGES": COUNT,
    "DETECTOR.EVAL_BATCH_SIZE": POSITIVE_INT,
    "DETECTOR.LR_DECAY_AT": (lambda v: isinstance(v, (list, tuple)) and all(_number(0, 1, low_open=True,
                             high_open=True)[0](f) for f in v), "a list of fractions in (0, 1)"),
    "DETECTOR.RANDOM_INIT_NORM": _one_of(NORMS),
    "DETECTOR.BACKBONE_FROM_CLASSIFIER": (lambda v: isinstance(v, bool), "True or False"),
    "DETECTOR.SEED": _number(-1, integer=True),
    "DETECTOR.LOG_PERIOD": POSITIVE_INT,
    "DETECTOR.MAX_CHECKPOINTS_KEPT": COUNT,
    "DETECTOR.TIME_BUDGET_MIN": _number(0),
    "DETECTOR.TEST_SIZE": COUNT,
    "SUBMIT.CLASSIFIER_THRESHOLD": PROBABILITY,
    "SUBMIT.SCORE_THRESHOLD": PROBABILITY,
    "SUBMIT.MIN_AREA": COUNT,
    "SUBMIT.MERGE_IOS": PROBABILITY,
    "SUBMIT.MERGE_MIN_SCORE": PROBABILITY,
    "SUBMIT.BATCH_SIZE": POSITIVE_INT,
    "SUBMIT.MAX_FAILED": _number(0),
    "SUBMIT.TUNE_CLASSIFIER_THRESHOLDS": _each(PROBABILITY),
    "SUBMIT.TUNE_SCORE_THRESHOLDS": _each(PROBABILITY),
    "SUBMIT.TUNE_MIN_AREAS": _each(COUNT),
    "SUBMIT.TARGET_EMPTY_FRACTION": (lambda v: _number(0, 1)[0](v) or (_number()[0](v) and v == -1),
                                     "a number in [0, 1], or -1 (the training split's share)"),
    "SUBMIT.GUARD_CONFIDENCE": FRACTION,
    "SUBMIT.GUARD_BOOTSTRAP": POSITIVE_INT,
    "SUBMIT.GUARD_SEED": COUNT,
    "SUBMIT.SIZE_BUCKET_EDGES": (lambda v: isinstance(v, (list, tuple)) and all(_number(0, low_open=True)[0](e)
                                 for e in v) and list(v) == sorted(set(v)),
                                 "a list of increasing areas > 0 (px), possibly empty"),
    "SUBMIT.SCORE_THRESHOLDS_BY_SIZE": (lambda v: isinstance(v, (list, tuple)) and all(PROBABILITY[0](e) for e in v),
                                        "a list of numbers in [0, 1] (len(SIZE_BUCKET_EDGES) + 1 of them), or []"),
    "DETECT.TILE_SIZE": COUNT,
    "DETECT.OVERLAP": _number(-1, integer=True),
    "DETECT.MERGE_IOU": _number(0, 1, low_open=True),
    "DETECT.BANDS": (lambda v: isinstance(v, (list, tuple)) and len(v) == 3 and all(POSITIVE_INT[0](b) for b in v),
                     "a list of 3 band numbers (1-based): red, green, blue"),
    "DETECT.STRETCH": _one_of(STRETCH_MODES),
    "DETECT.STRETCH_PERCENTILES": (lambda v: isinstance(v, (list, tuple)) and len(v) == 2
                                   and all(_number(0, 100)[0](p) for p in v) and v[0] < v[1],
                                   "[low, high] percentiles with 0 <= low < high <= 100"),
    "DETECT.STRETCH_SAMPLE_SIZE": _number(16, integer=True),
    "DETECT.MIN_VALID_FRACTION": FRACTION,
    "DETECT.CHUNK_TILES": POSITIVE_INT,
    "DETECT.GATE_TTA": (lambda v: isinstance(v, bool), "True or False"),
    "DETECT.FORMATS": (lambda v: isinstance(v, (list, tuple)) and all(f in DETECT_FORMATS for f in v),
                       f"a list of formats, each one of {', '.join(map(repr, DETECT_FORMATS))}"),
    "DETECT.GEOJSON_CRS": _one_of(GEOJSON_CRSS),
    "DETECT.QUICKLOOK_SIZE": _number(64, integer=True),
    "DETECT.GDAL_CACHE_MB": _number(16, integer=True),
    "DETECT.ONEDNN_CACHE_CAPACITY": COUNT,
    "DETECT.MAX_FAILED": _number(0),
    "SOLVER.IMS_PER_BATCH": POSITIVE_INT,
    "SOLVER.CHECKPOINT_PERIOD": POSITIVE_INT,
    "SOLVER.GAMMA": _number(0, 1, low_open=True),
    "MODEL.ROI_HEADS.NUM_CLASSES": POSITIVE_INT,
    "DATALOADER.NUM_WORKERS": COUNT,
    "TEST.DETECTIONS_PER_IMAGE": POSITIVE_INT,
}


def _lookup(cfg: CN, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def check_cfg(cfg: CN, source: str = "") -> None:
    """Raise ``ValueError`` naming the key, the value and the valid range for the first value out of
    :data:`VALID` (and for a malformed ``DETECTOR.STAGES``: :func:`get_stages`; for score
    thresholds by size that do not fit the size buckets)."""
    where = f"{source}: " if source else ""
    for key, (check, expected) in VALID.items():
        if _has_key(cfg, key):
            value = _lookup(cfg, key)
            if not check(value):
                raise ValueError(f"{where}{key} is {value!r}; expected {expected}")
    if _has_key(cfg, "SUBMIT.SCORE_THRESHOLDS_BY_SIZE") and cfg.SUBMIT.SCORE_THRESHOLDS_BY_SIZE and \
            len(cfg.SUBMIT.SCORE_THRESHOLDS_BY_SIZE) != len(cfg.SUBMIT.SIZE_BUCKET_EDGES) + 1:
        raise ValueError(f"{where}SUBMIT.SCORE_THRESHOLDS_BY_SIZE is {list(cfg.SUBMIT.SCORE_THRESHOLDS_BY_SIZE)}; "
                         f"expected one per size bucket: {len(cfg.SUBMIT.SIZE_BUCKET_EDGES) + 1} for SUBMIT."
                         f"SIZE_BUCKET_EDGES {list(cfg.SUBMIT.SIZE_BUCKET_EDGES)}, or []")
    if _has_key(cfg, "DETECTOR.BACKBONE_FROM_CLASSIFIER") and cfg.DETECTOR.BACKBONE_FROM_CLASSIFIER and cfg.MODEL.WEIGHTS:
        raise ValueError(f"{where}DETECTOR.BACKBONE_FROM_CLASSIFIER is True and MODEL.WEIGHTS is {cfg.MODEL.WEIGHTS!r}: "
                         "the classifier's body replaces random init only; set MODEL.WEIGHTS \"\" or the key False")
    try:
        get_stages(cfg)
    except ValueError as exc:
        raise ValueError(f"{where}{exc}") from None


# ============================================================================ loading
def get_cfg(config_file: str | os.PathLike | None = None, opts: Sequence[str] = ()) -> CN:
    """Return the frozen, checked config: defaults <- ``config_file`` <- ``opts``.

    ``opts``: ``KEY VALUE`` pairs, ``KEY=VALUE`` tokens, or both (:func:`parse_overrides`).
    Unknown keys raise ``KeyError`` naming the key; values out of range ``ValueError`` naming the
    key, the value and the range (:func:`check_cfg`). ``MODEL.DEVICE: auto`` is resolved here.
    """
    cfg = get_detectron2_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(BASE_MODEL_CONFIG))
    add_airbus_config(cfg)
    if config_file is not None:
        if not Path(config_file).is_file():
            raise FileNotFoundError(f"config file {config_file} does not exist")
        try:
            _merge_config_file(cfg, config_file)
        except KeyError as exc:
            raise KeyError(f"{config_file}: {exc.args[0]} (see module_config.py for every key)") from None
    opts = parse_overrides(opts)
    for key in opts[0::2]:
        if not _has_key(cfg, key):
            raise KeyError(f"override {key!r}: no such config key (see module_config.py)")
    cfg.merge_from_list(_floats_for_float_keys(cfg, opts))
    check_cfg(cfg, " ".join(filter(None, [str(config_file or ""), "with overrides" if opts else ""])))
    if cfg.MODEL.DEVICE == "auto":
        import torch

        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.freeze()
    return cfg


def parse_overrides(opts: Sequence[str]) -> list[str]:
    """Config overrides as flat ``[KEY, VALUE, ...]``: ``KEY VALUE`` pairs and ``KEY=VALUE`` tokens
    (``["A.B=1", "C.D", "2"]`` -> ``["A.B", "1", "C.D", "2"]``). An odd count is a ``ValueError``."""
    flat: list[str] = []
    expect_value = False
    for token in opts:
        token = str(token)
        key, sep, value = token.partition("=")
        if not expect_value and sep and re.fullmatch(r"[A-Z0-9_]+(\.[A-Z0-9_]+)+", key):
            flat.extend([key, value])
        else:
            flat.append(token)
            expect_value = not expect_value
    if len(flat) % 2:
        raise ValueError(f"overrides must be KEY VALUE pairs (or KEY=VALUE), got an odd number: {list(opts)}")
    return flat


def _merge_config_file(cfg: CN, config_file: str | os.PathLike) -> None:
    """``cfg.merge_from_file``, with whole numbers given to float keys made floats (a YAML
    ``TIME_BUDGET_MIN: 4`` is fine, as ``4.0`` is); ``_BASE_`` files are followed as detectron2 does."""
    loaded = cfg.load_yaml_with_base(str(config_file), allow_unsafe=False)
    _floats_in_tree(cfg, loaded)
    loaded.setdefault("VERSION", cfg.VERSION)
    cfg.merge_from_other_cfg(type(cfg)(loaded))


def _floats_in_tree(node: CN, loaded: dict) -> None:
    for key, value in loaded.items():
        current = node.get(key) if isinstance(node, CN) else None
        if isinstance(current, CN) and isinstance(value, dict):
            _floats_in_tree(current, value)
        elif isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
            loaded[key] = float(value)


def _floats_for_float_keys(cfg: CN, opts: Sequence[str]) -> list:
    """``opts`` with integer literals given to float keys made floats (``SUBMIT.MIN_SCORE 0`` is fine)."""
    import contextlib
    from ast import literal_eval

    out = list(opts)
    for k in range(0, len(out), 2):
        value = out[k + 1]
        current = _lookup(cfg, out[k])
        if isinstance(current, float) and isinstance(value, str):
            with contextlib.suppress(ValueError, SyntaxError):
                parsed = literal_eval(value)
                if isinstance(parsed, int) and not isinstance(parsed, bool):
                    out[k + 1] = float(parsed)
    return out


def _has_key(cfg: CN, dotted: str) -> bool:
    node = cfg
    for part in dotted.split("."):
        if not isinstance(node, CN) or part not in node:
            return False
        node = node[part]
    return True


def save_cfg(cfg: CN, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically) and return its path."""
    out = Path(run_dir) / "config.yaml"
    with atomic_path(out) as tmp:
        tmp.write_text(cfg.dump())
    return out


# ============================================================================ command line
def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` -> ``(i, n)``, with ``0 <= i < n`` (shards are numbered from 0)."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: expected i/n, e.g. 0/3") from None
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard {text!r}: need n >= 1 and 0 <= i < n (shards are numbered from 0)")
    return index, count


def add_config_args(parser: argparse.ArgumentParser, overrides: bool = True) -> argparse.ArgumentParser:
    """The options every command with a config takes: ``--config`` (default :data:`DEFAULT_CONFIG`)
    and trailing overrides (``KEY VALUE`` or ``KEY=VALUE``)."""
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"pipeline config YAML (default {DEFAULT_CONFIG}; configs/demo.yaml: generated data)")
    if overrides:
        parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                            help="config overrides: KEY VALUE or KEY=VALUE, e.g. CLASSIFIER.EPOCHS 2")
    return parser


def get_cfg_from_args(args: argparse.Namespace) -> CN:
    """:func:`get_cfg` of a namespace made by a parser with :func:`add_config_args`."""
    return get_cfg(args.config, getattr(args, "opts", []) or [])


LOG_FORMAT = "[%(asctime)s %(name)s %(levelname)s] %(message)s"


def setup_logging(rank: int = 0) -> None:
    """INFO logging to stderr for rank 0 (WARNING for other ranks), unless the process already set
    logging up (a notebook, a test): the one logging set-up of every command line."""
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING, format=LOG_FORMAT)


# ============================================================================ run folder layout
def get_run_dir(cfg: CN) -> Path:
    """``PATHS.RUNS_DIR/PATHS.RUN_NAME``, created if missing."""
    run_dir = Path(cfg.PATHS.RUNS_DIR) / cfg.PATHS.RUN_NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def get_input_path(cfg: CN, name: str) -> Path:
    """A ``DATA.*`` file or folder name resolved against ``PATHS.INPUT_DIR`` (absolute kept)."""
    path = Path(name)
    return path if path.is_absolute() else Path(cfg.PATHS.INPUT_DIR) / path


def _in_dir(folder: Path, name: str) -> Path:
    """``folder / name``, with ``folder`` created (``name`` is not)."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


# Every file the pipeline writes under runs/<run>/, by component: {what: file name}.
CLASSIFIER_FILES = {
    "export": "export.pkl",  # the fastai learner (module_classifier.load_classifier)
    "fingerprint": "export.json",  # config and data the export was trained on (reuse check)
    "history": "history.csv",  # per-epoch losses and metrics
    "val_predictions": "val_predictions.csv",  # ImageId, has_ship, p_ship of the validation split
    "val_thresholds": "val_thresholds.csv",  # the gate's precision/recall over thresholds
    "val_thresholds_plot": "val_thresholds.png",
    "plan": "plan.json",  # the time-budget plan (CLASSIFIER.TIME_BUDGET_MIN)
}
DETECTOR_FILES = {
    "best": "model_best.pth",  # best weights over all stages by DETECTOR.BEST_METRIC
    "best_info": "model_best.json",
    "val_metrics": "val_metrics.jsonl",  # one line per validation
    "log": "log.txt",
    "plan": "plan.json",  # the time-budget plan (DETECTOR.TIME_BUDGET_MIN)
    "classifier_init": "init_from_classifier.pth",  # stage 1's start (DETECTOR.BACKBONE_FROM_CLASSIFIER)
}
STAGE_FILES = {
    "final": "model_final.pth",  # a finished stage's weights
    "last_checkpoint": "last_checkpoint",  # detectron2's tag of the latest checkpoint
    "metrics": "metrics.json",  # detectron2's JSON lines of losses and validation scalars
    "fingerprint": "stage.json",  # the settings the stage was trained with (resume check)
}
SUBMISSION_FILES = {
    "submission": "submission.csv",
    "thresholds": "thresholds.yaml",  # what `tune` chose and `predict` uses
    "tune_grid": "tune_grid.csv",
    "tune_cache": "tune_cache.pkl",  # the models' outputs on the validation split
    "tune_errors": "tune_errors.csv",  # the error report of the chosen thresholds
    "tune_size_grid": "tune_size_grid.csv",  # the size-aware score thresholds tried
    "score_errors": "score_errors.csv",  # the error report of a scored submission (`score --config`)
}
PLOT_FILES = {
    "tune_f2": "tune_f2.png",
    "val_overlays": "val_overlays.png",
    "tune_errors": "tune_errors.png",
    "score_errors": "score_errors.png",
}


def _named(files: dict[str, str], what: str, component: str) -> str:
    if what not in files:
        raise KeyError(f"{component} file {what!r}: expected one of {sorted(files)}")
    return files[what]


def get_classifier_dir(cfg: CN) -> Path:
    """``runs/<run>/classifier`` (the run folder is created; this one when written into)."""
    return _in_dir(get_run_dir(cfg), "classifier")


def get_classifier_path(cfg: CN, what: str = "export") -> Path:
    """A classifier output (:data:`CLASSIFIER_FILES`): ``runs/<run>/classifier/export.pkl`` by default."""
    return get_classifier_dir(cfg) / _named(CLASSIFIER_FILES, what, "classifier")


def get_detector_dir(cfg: CN) -> Path:
    """``runs/<run>/detector`` (the run folder is created; this one when written into)."""
    return _in_dir(get_run_dir(cfg), "detector")


def get_detector_path(cfg: CN, what: str = "best") -> Path:
    """A detector output (:data:`DETECTOR_FILES`): ``runs/<run>/detector/model_best.pth`` by default."""
    return get_detector_dir(cfg) / _named(DETECTOR_FILES, what, "detector")


def get_stage_dir(cfg: CN, stage: "Stage") -> Path:
    """``runs/<run>/detector/stage<i>_<size>`` (not created)."""
    return get_detector_dir(cfg) / stage.name


def get_stage_path(cfg: CN, stage: "Stage", what: str = "final") -> Path:
    """A stage output (:data:`STAGE_FILES`): ``runs/<run>/detector/stage<i>_<size>/model_final.pth`` by default."""
    return get_stage_dir(cfg, stage) / _named(STAGE_FILES, what, "stage")


STAGE_FOLDER = re.compile(r"^stage(\d+)_(\d+)$")  # Stage.name; earlier runs moved aside get a suffix


def get_submission_dir(cfg: CN) -> Path:
    """``runs/<run>/submission`` (the run folder is created; this one when written into)."""
    return _in_dir(get_run_dir(cfg), "submission")


def get_submission_path(cfg: CN, what: str = "submission") -> Path:
    """A submission output (:data:`SUBMISSION_FILES`): ``runs/<run>/submission/submission.csv`` by default."""
    return get_submission_dir(cfg) / _named(SUBMISSION_FILES, what, "submission")


def get_detect_dir(cfg: CN) -> Path:
    """``runs/<run>/detect`` (the run folder is created): where ``module_detect.py`` writes without ``--out``."""
    return _in_dir(get_run_dir(cfg), "detect")


def get_plot_path(cfg: CN, what: str) -> Path:
    """A picture the pipeline saves (:data:`PLOT_FILES`) in ``runs/<run>/plots``."""
    return _in_dir(get_run_dir(cfg), "plots") / _named(PLOT_FILES, what, "plot")


def get_split_path(cfg: CN) -> Path:
    """``runs/<run>/split.csv``: each training image's fold and overlap group (reused while valid)."""
    return get_run_dir(cfg) / "split.csv"


def get_scores_path(cfg: CN) -> Path:
    """``runs/<run>/scores.json``: the local test score the notebook writes."""
    return get_run_dir(cfg) / "scores.json"


def get_progress_path(cfg: CN) -> Path:
    """``runs/<run>/progress.json``: what is running now (step, epoch or iteration, loss, ETA)."""
    return get_run_dir(cfg) / "progress.json"


# ============================================================================ detector stages
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


def get_stages(cfg: CN) -> list[Stage]:
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
        if (isinstance(iterations, bool) or not isinstance(iterations, (int, float)) or iterations != int(iterations)
                or iterations < 1):
            raise ValueError(f"{where}: iterations {iterations!r} must be a positive integer")
        if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not base_lr > 0:
            raise ValueError(f"{where}: base LR {base_lr!r} must be a positive number")
        if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or warmup != int(warmup) or warmup < 0:
            raise ValueError(f"{where}: warmup {warmup!r} must be a non-negative integer")
        stages.append(Stage(i, int(size), int(iterations), float(base_lr), int(warmup)))
    return stages


def get_stage(cfg: CN, index: int) -> Stage:
    """Stage ``index`` (from 1) of ``DETECTOR.STAGES``; ``ValueError`` when there is none."""
    stages = get_stages(cfg)
    if not 1 <= index <= len(stages):
        raise ValueError(f"stage {index} does not exist: DETECTOR.STAGES has stages 1..{len(stages)}")
    return stages[index - 1]


def uses_random_init(cfg: CN) -> bool:
    """True when ``MODEL.WEIGHTS`` is empty: the backbone then needs trainable norms."""
    return not cfg.MODEL.WEIGHTS


def get_model_cfg(cfg: CN, stage: Stage | None = None) -> CN:
    """The detectron2 config of ``stage`` (architecture, input size, solver, output folder).

    Without a stage, the last stage's input size (inference). Random init (``MODEL.WEIGHTS``
    empty) replaces FrozenBN by ``DETECTOR.RANDOM_INIT_NORM`` and trains every layer
    (``FREEZE_AT`` 0): FrozenBN keeps the random statistics frozen and diverges within a few
    iterations. This depends only on ``MODEL.WEIGHTS`` of ``cfg``, so training and inference
    build the same architecture. Calling it registers the project's backbone
    (``module_inference.build_basic_resnet_fpn_backbone``) for whichever module builds the model.
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
    import module_inference  # noqa: F401  registers build_basic_resnet_fpn_backbone, whichever module builds the model
    return out
