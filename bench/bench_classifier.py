#!/usr/bin/env python
"""The ship/no-ship classifier on CPU: what a short training learns, and batched inference speed.

1. Learning: the classifier of ``--config`` (default configs/demo.yaml: ResNet34 from random
   init at 128 px, one-cycle, on the demo's generated 256 px data, 78% ship-free, split by
   module_preprocessing) trains as ``make demo`` trains it (at ``CLASSIFIER.PRECISION``). Prints
   the per-epoch curve (losses, accuracy, precision, recall, ROC AUC), the wall time and the
   validation ROC AUC (goal >= 0.95 within 5 minutes).
   With generated data, also the ROC AUC on ``--holdout`` independent tiles (SYNTH.SEED + 1, so
   other scenes; never trained on): the validation split's 23 ship tiles of 101 give an AUC with
   about +-0.04 of noise, so the hold-out figure is the one to trust.
   Then the trained classifier's validation ROC AUC at each precision (fp32, bf16, int8 on x86:
   what lower precision costs), int8 calibrated as training calibrates it.
2. Inference at 256 px with ResNet34 (the real default): ``module_classifier.predict_p_ship`` (a
   test DataLoader, ``--batch-size`` images per forward pass) at fp32, at ``CLASSIFIER.PRECISION``
   (default auto: bf16 autocast on a CPU with native bf16) and at int8 (x86 CPUs; calibration not
   timed), against a per-image ``learn.predict`` loop (the usual Kaggle usage, fp32), same images
   and weights, in the same run. Goal >= 5x. Prints the max |p difference| of each batched pass
   against the loop (fp32: ~0).

    .venv/bin/python bench/bench_classifier.py [--config configs/demo.yaml] [--n-infer 48] [KEY VALUE ...]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import module_classifier  # noqa: E402
import module_synthetic  # noqa: E402
from module_files import read_segmentation_csv  # noqa: E402
import module_preprocessing  # noqa: E402
from module_config import get_cfg, get_input_path  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--n-infer", type=int, default=48, help="test images timed for inference")
    parser.add_argument("--batch-size", type=int, default=16, help="inference batch size")
    parser.add_argument("--holdout", type=int, default=2000,
                        help="independent generated tiles for an unbiased ROC AUC (0: skip)")
    parser.add_argument("--out", default="", help="work folder: input/ and runs/ (default: a temporary one)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return parser


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_classifier_"))
    cfg = get_cfg(args.config, ["PATHS.INPUT_DIR", str(work / "input"), "PATHS.RUNS_DIR", str(work / "runs"),
                                "PATHS.RUN_NAME", "bench", *args.opts])
    module_synthetic.prepare_synthetic_input(cfg)
    train_dicts, val_dicts = module_preprocessing.get_train_val_dicts(cfg)

    # 1. learning
    start = time.perf_counter()
    paths = module_classifier.train_classifier(cfg, train_dicts, val_dicts, fresh=True)
    export = paths["export"]
    train_s = time.perf_counter() - start
    curve = pd.read_csv(paths["history"])
    predictions = pd.read_csv(paths["val_predictions"])
    auc = module_classifier.roc_auc_or_nan(predictions["has_ship"].to_numpy(), predictions["p_ship"].to_numpy())
    c = cfg.CLASSIFIER
    print(f"learning: {len(train_dicts)} train / {len(val_dicts)} val generated {cfg.DATA.IMAGE_SIZE} px images, "
          f"{np.mean([not d['annotations'] for d in train_dicts]):.0%} ship-free; {c.ARCH} "
          f"{'pretrained' if c.PRETRAINED else 'random init'} at {c.IMAGE_SIZE} px, {c.EPOCHS} epochs, LR {c.LR}, "
          f"balance {c.BALANCE}: {train_s / 60:.1f} min")
    print(curve.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"validation ROC AUC {auc:.4f} at CLASSIFIER.PRECISION {c.PRECISION} (goal >= 0.95 within 5 min)")
    trained = module_classifier.load_classifier(export)  # as make demo's later steps load it
    holdout = holdout_auc(cfg, trained, work / "holdout", args.holdout) if args.holdout and cfg.SYNTH.ENABLED else None
    auc_by_precision = validation_auc_by_precision(cfg, trained, train_dicts, val_dicts)

    # 2. inference at 256 px, ResNet34 (speed does not depend on the weights: random init)
    infer_cfg = get_cfg(REPO_ROOT / "configs" / "demo.yaml", [
        "PATHS.RUNS_DIR", str(work / "runs"), "PATHS.RUN_NAME", "bench256", "CLASSIFIER.ARCH", "resnet34",
        "CLASSIFIER.PRETRAINED", "False", "CLASSIFIER.IMAGE_SIZE", "256", "CLASSIFIER.NUM_WORKERS", "0"])
    frame = module_classifier.get_label_frame(train_dicts, val_dicts)
    learner = module_classifier.build_learner(infer_cfg, module_classifier.build_dataloaders(infer_cfg, frame),
                                              module_classifier.get_loss(infer_cfg, frame), work / "runs" / "bench256")
    learner.model.eval()
    images = sorted(get_input_path(cfg, cfg.DATA.TEST_IMAGES).glob("*.jpg"))[: args.n_infer]
    precision = cfg.CLASSIFIER.PRECISION  # the config's (overrides included), default auto
    used = module_classifier.resolve_precision(precision, next(learner.model.parameters()).device)
    passes = [("fp32", "fp32"), (used, precision)]
    if has_int8():
        start = time.perf_counter()
        module_classifier.calibrate_int8(learner, module_classifier.get_int8_calibration_paths(infer_cfg, frame),
                                         batch_size=args.batch_size, progress=False)
        module_classifier.int8_model(learner)
        print(f"int8 calibration on {infer_cfg.CLASSIFIER.INT8_CALIBRATION_IMAGES} training images and conversion "
              f"(not timed below): {time.perf_counter() - start:.1f} s")
        passes.append(("int8", "int8"))
    batched, batched_s = {}, {}
    for name, value in passes:
        if name in batched:
            continue  # the config's precision is one of the others
        module_classifier.predict_p_ship(learner, images[:4], batch_size=4, progress=False, precision=value)  # warm-up
        start = time.perf_counter()
        batched[name] = module_classifier.predict_p_ship(learner, images, batch_size=args.batch_size,
                                                         progress=False, precision=value)
        batched_s[name] = time.perf_counter() - start
    ship = list(learner.dls.vocab).index(module_classifier.SHIP)
    looped = []
    with learner.no_bar(), learner.no_logging():
        learner.predict(str(images[0]))  # warm-up
        start = time.perf_counter()
        for image in images:
            looped.append(float(learner.predict(str(image))[2][ship]))
        loop_s = time.perf_counter() - start
    max_diff = {name: float(np.abs(result["p_ship"].to_numpy() - np.array(looped)).max())
                for name, result in batched.items()}
    ratio = loop_s / batched_s[used]
    print(f"inference at 256 px, ResNet34, {len(images)} images, CPU ({torch.get_num_threads()} threads), "
          f"CLASSIFIER.PRECISION {precision} -> {used}:")
    for name in batched:
        print(f"  batched (bs {args.batch_size}) {name}: {len(images) / batched_s[name]:.2f} img/s "
              f"({loop_s / batched_s[name]:.1f}x learn.predict), max |p difference| vs learn.predict "
              f"{max_diff[name]:.1e}")
    print(f"  per-image learn.predict (fp32): {len(images) / loop_s:.2f} img/s")
    print(f"  batched {used} (CLASSIFIER.PRECISION {precision}) vs learn.predict: {ratio:.1f}x (goal >= 5x); "
          f"batched {used} vs batched fp32: {batched_s['fp32'] / batched_s[used]:.2f}x")
    return {"auc": auc, "holdout_auc": holdout, "auc_by_precision": auc_by_precision, "train_s": train_s,
            "precision": used, "batched_ips": len(images) / batched_s[used], "batched_fp32_ips": len(images) / batched_s["fp32"],
            "loop_ips": len(images) / loop_s, "ratio": ratio,
            "ratios": {name: loop_s / seconds for name, seconds in batched_s.items()},
            "max_diff": max_diff[used], "max_diff_fp32": max_diff["fp32"]}


def has_int8() -> bool:
    try:
        return module_classifier.resolve_precision("int8", "cpu") == "int8"
    except ValueError:  # not an x86 build
        return False


def predict(cfg, learner, paths: list, precision: str) -> np.ndarray:
    """p_ship of ``paths`` as the pipeline predicts them (flip TTA per CLASSIFIER.TTA), at ``precision``."""
    return module_classifier.predict_p_ship(learner, paths, batch_size=cfg.CLASSIFIER.BATCH_SIZE,
                                            tta=cfg.CLASSIFIER.TTA, progress=False,
                                            precision=precision)["p_ship"].to_numpy()


def holdout_auc(cfg, learner, out: Path, n: int) -> float:
    """ROC AUC of the trained classifier (at CLASSIFIER.PRECISION, flip TTA per CLASSIFIER.TTA) on
    ``n`` tiles generated like the training data but with another seed (SYNTH.SEED + 1): other
    scenes, so nothing overlaps the training tiles. Prints it; the tiles are kept in ``out`` and
    reused by a later run with the same settings."""
    import json

    paths = module_synthetic.get_dataset_paths(out)
    wanted = dict(n_train=n, n_test=0, seed=cfg.SYNTH.SEED + 1, empty_fraction=cfg.SYNTH.EMPTY_FRACTION,
                  image_size=cfg.SYNTH.IMAGE_SIZE)
    manifest = Path(out) / "holdout.json"
    if not manifest.is_file() or json.loads(manifest.read_text()) != wanted:
        module_synthetic.generate_dataset(out, overwrite=True, **wanted)
        manifest.write_text(json.dumps(wanted))
    has_ship = read_segmentation_csv(paths["train_csv"]).groupby("ImageId", sort=True)["EncodedPixels"].agg(
        lambda rles: (rles != "").any())
    p_ship = predict(cfg, learner, [paths["train_images"] / i for i in has_ship.index], cfg.CLASSIFIER.PRECISION)
    auc = module_classifier.roc_auc_or_nan(has_ship.to_numpy(), p_ship)
    print(f"hold-out ROC AUC {auc:.4f} on {len(has_ship)} independent generated tiles ({int(has_ship.sum())} with "
          f"ships, SYNTH.SEED {cfg.SYNTH.SEED + 1}) (goal >= 0.95)")
    return auc


def validation_auc_by_precision(cfg, learner, train_dicts: list, val_dicts: list) -> dict:
    """The trained classifier's validation ROC AUC (flip TTA per CLASSIFIER.TTA) at fp32, at bf16
    (on a CPU with native bf16) and at int8 (x86: calibrated as training calibrates it, when the
    export carries no calibration), with the max |p_ship difference| of each against fp32. Prints
    them; returns {precision: AUC}."""
    precisions = ["fp32"] + ["bf16"] * module_classifier.cpu_has_native_bf16() + ["int8"] * has_int8()
    if "int8" in precisions and not getattr(learner, "int8_observers", None):
        frame = module_classifier.get_label_frame(train_dicts, val_dicts)
        module_classifier.calibrate_int8(learner, module_classifier.get_int8_calibration_paths(cfg, frame),
                                         batch_size=cfg.CLASSIFIER.BATCH_SIZE, progress=False)
    has_ship = np.array([bool(d["annotations"]) for d in val_dicts])
    p_ship = {name: predict(cfg, learner, [d["file_name"] for d in val_dicts], name) for name in precisions}
    aucs = {name: module_classifier.roc_auc_or_nan(has_ship, p) for name, p in p_ship.items()}
    print(f"validation ({has_ship.sum()} ship / {(~has_ship).sum()} ship-free images) by precision:")
    for name, p in p_ship.items():
        changed = int(((p >= 0.5) != (p_ship["fp32"] >= 0.5)).sum())
        print(f"  {name}: ROC AUC {aucs[name]:.4f}, max |p_ship - fp32| {np.abs(p - p_ship['fp32']).max():.4f}, "
              f"{changed} decision(s) at 0.5 differ from fp32")
    return aucs


if __name__ == "__main__":
    main(get_args_parser().parse_args())
