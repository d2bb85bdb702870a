"""The pipeline's one config: every default, with a comment, in one place.

The config is a detectron2 ``CfgNode``: detectron2's own keys (``MODEL``, ``SOLVER``, ``INPUT``,
``DATALOADER``, ...) start from the model-zoo base ``COCO-InstanceSegmentation/
mask_rcnn_R_50_FPN_3x.yaml``; :func:`add_airbus_config` adds the project's groups (``PATHS``,
``DATA``, ``SYNTH``, ``CLASSIFIER``, ``DETECTOR``, ``SUBMIT``) and sets the project's defaults for
detectron2 keys. :func:`get_cfg` then merges a YAML file (which may name a ``_BASE_``) and
``KEY VALUE`` overrides. Merging is strict: a misspelt key raises ``KeyError``.

    cfg = get_cfg("configs/demo.yaml", ["CLASSIFIER.EPOCHS", "2"])
    run_dir = get_run_dir(cfg)        # runs/<PATHS.RUN_NAME>
    save_cfg(cfg, run_dir)            # runs/<run>/config.yaml, written atomically

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

from detectron2 import model_zoo
from detectron2.config import CfgNode as CN
from detectron2.config import get_cfg as get_detectron2_cfg

BASE_MODEL_CONFIG = "COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"
COCO_MASK_RCNN_WEIGHTS = (
    "detectron2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl"
)


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

    # ---------------------------------------------------------------- detector
    cfg.DETECTOR = CN()
    # Resolution stages, trained in order, each starting from the previous stage's weights:
    # [input size (px), iterations, base LR, warmup iterations].
    cfg.DETECTOR.STAGES = [[256, 20000, 0.02, 1000], [512, 20000, 0.01, 500], [768, 20000, 0.005, 500]]
    # Share of ship-free images mixed into training as hard negatives (0: ship images only).
    cfg.DETECTOR.EMPTY_FRACTION = 0.1
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
    # Each stage's LR drops by SOLVER.GAMMA at these fractions of its iterations.
    cfg.DETECTOR.LR_DECAY_AT = [0.75, 0.9]
    # With MODEL.WEIGHTS "" (random init) the ResNet uses this norm instead of FrozenBN, and
    # BACKBONE.FREEZE_AT becomes 0: "BN", "GN" or "SyncBN" (multi-GPU only).
    cfg.DETECTOR.RANDOM_INIT_NORM = "BN"
    # Seed of the hard-negative sample, weight init, sampling and augmentation (each rank adds
    # its rank). -1: random.
    cfg.DETECTOR.SEED = 0
    cfg.DETECTOR.LOG_PERIOD = 20  # write losses/LR to the log, metrics.json, TensorBoard every N iterations
    cfg.DETECTOR.MAX_CHECKPOINTS_KEPT = 3  # periodic checkpoints kept per stage (0: all)

    # ---------------------------------------------------------------- submission
    cfg.SUBMIT = CN()
    # Images whose classifier p_ship is below this get an empty row; the detector skips them.
    cfg.SUBMIT.CLASSIFIER_THRESHOLD = 0.5
    cfg.SUBMIT.SCORE_THRESHOLD = 0.5  # detections below this score are dropped
    cfg.SUBMIT.MIN_AREA = 20  # masks smaller than this (px, after overlap removal) are dropped
    cfg.SUBMIT.TTA = False  # flip TTA for the detector, masks merged
    cfg.SUBMIT.BATCH_SIZE = 8  # detector images per forward pass
    # Grids searched by `module_submit.py tune` on the validation split. Classifier threshold 0
    # is the detector alone (no gate); high score thresholds let it stay silent on doubtful images.
    cfg.SUBMIT.TUNE_CLASSIFIER_THRESHOLDS = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
    cfg.SUBMIT.TUNE_SCORE_THRESHOLDS = [0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95]
    cfg.SUBMIT.TUNE_MIN_AREAS = [0, 10, 20, 40, 80]

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


def get_cfg(config_file: str | os.PathLike | None = None, opts: Sequence[str] = ()) -> CN:
    """Return the frozen config: defaults <- ``config_file`` <- ``opts`` (``KEY VALUE`` pairs).

    Unknown keys raise ``KeyError`` naming the key. ``MODEL.DEVICE: auto`` is resolved here.
    """
    cfg = get_detectron2_cfg()
    cfg.merge_from_file(model_zoo.get_config_file(BASE_MODEL_CONFIG))
    add_airbus_config(cfg)
    if config_file is not None:
        if not Path(config_file).is_file():
            raise FileNotFoundError(f"config file {config_file} does not exist")
        try:
            cfg.merge_from_file(str(config_file))
        except KeyError as exc:
            raise KeyError(f"{config_file}: {exc.args[0]} (see module_config.py for every key)") from None
    if len(opts) % 2:
        raise ValueError(f"overrides must be KEY VALUE pairs, got an odd number: {list(opts)}")
    for key in opts[0::2]:
        if not _has_key(cfg, key):
            raise KeyError(f"override {key!r}: no such config key (see module_config.py)")
    cfg.merge_from_list(_floats_for_float_keys(cfg, opts))
    if cfg.MODEL.DEVICE == "auto":
        import torch

        cfg.MODEL.DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
    cfg.freeze()
    return cfg


def _floats_for_float_keys(cfg: CN, opts: Sequence[str]) -> list:
    """``opts`` with integer literals given to float keys made floats (``SUBMIT.MIN_SCORE 0`` is fine)."""
    from ast import literal_eval

    out = list(opts)
    for k in range(0, len(out), 2):
        value = out[k + 1]
        current = cfg
        for part in out[k].split("."):
            current = current[part]
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


def get_run_dir(cfg: CN) -> Path:
    """``PATHS.RUNS_DIR/PATHS.RUN_NAME``, created if missing."""
    run_dir = Path(cfg.PATHS.RUNS_DIR) / cfg.PATHS.RUN_NAME
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def get_input_path(cfg: CN, name: str) -> Path:
    """A ``DATA.*`` file or folder name resolved against ``PATHS.INPUT_DIR`` (absolute kept)."""
    path = Path(name)
    return path if path.is_absolute() else Path(cfg.PATHS.INPUT_DIR) / path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash mid-write leaves the previous file intact. The suffix is kept so that writers that
    infer the format from it (pandas, matplotlib, torch) behave the same.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files: give the result the usual umask permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def save_cfg(cfg: CN, run_dir: str | os.PathLike) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically) and return its path."""
    out = Path(run_dir) / "config.yaml"
    with atomic_path(out) as tmp:
        tmp.write_text(cfg.dump())
    return out
