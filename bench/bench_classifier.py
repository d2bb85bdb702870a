#!/usr/bin/env python
"""The ship/no-ship classifier on CPU: what a short training learns, and batched inference speed.

1. Learning: the classifier of ``--config`` (default configs/demo.yaml: ResNet34 from random
   init at 128 px, one-cycle, on the demo's generated 256 px data, 78% ship-free, split by
   module_preprocessing) trains as ``make demo`` trains it (at ``CLASSIFIER.PRECISION``). Prints
   the per-epoch curve (losses, accuracy, precision, recall, ROC AUC), the wall time and the
   validation ROC AUC (goal >= 0.95 within 5 minutes).
2. Inference at 256 px with ResNet34 (the real default): ``module_classifier.predict_p_ship`` (a
   test DataLoader, ``--batch-size`` images per forward pass) at ``CLASSIFIER.PRECISION`` (default
   auto: bf16 autocast on a CPU with native bf16) and at fp32, against a per-image
   ``learn.predict`` loop (the usual Kaggle usage, fp32), same images and weights, in the same run.
   Goal >= 5x. Prints the max |p difference| of each batched pass against the loop (fp32: ~0).

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
import module_preprocessing  # noqa: E402
from module_config import get_cfg, get_input_path  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--n-infer", type=int, default=48, help="test images timed for inference")
    parser.add_argument("--batch-size", type=int, default=16, help="inference batch size")
    parser.add_argument("--out", default="", help="work folder: input/ and runs/ (default: a temporary one)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides: KEY VALUE ...")
    return parser


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.WARNING)
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_classifier_"))
    cfg = get_cfg(args.config, ["PATHS.INPUT_DIR", str(work / "input"), "PATHS.RUNS_DIR", str(work / "runs"),
                                "PATHS.RUN_NAME", "bench", *args.opts])
    train_dicts, val_dicts = module_preprocessing.get_train_val_dicts(cfg)  # generates the data if needed

    # 1. learning
    start = time.perf_counter()
    export = module_classifier.train_classifier(cfg, train_dicts, val_dicts)
    train_s = time.perf_counter() - start
    curve = pd.read_csv(export.parent / "history.csv")
    predictions = pd.read_csv(export.parent / "val_predictions.csv")
    auc = module_classifier.roc_auc_or_nan(predictions["has_ship"].to_numpy(), predictions["p_ship"].to_numpy())
    c = cfg.CLASSIFIER
    print(f"learning: {len(train_dicts)} train / {len(val_dicts)} val generated {cfg.DATA.IMAGE_SIZE} px images, "
          f"{np.mean([not d['annotations'] for d in train_dicts]):.0%} ship-free; {c.ARCH} "
          f"{'pretrained' if c.PRETRAINED else 'random init'} at {c.IMAGE_SIZE} px, {c.EPOCHS} epochs, LR {c.LR}, "
          f"balance {c.BALANCE}: {train_s / 60:.1f} min")
    print(curve.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"validation ROC AUC {auc:.4f} (goal >= 0.95 within 5 min)")

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
    batched, batched_s = {}, {}
    for name, value in (("fp32", "fp32"), (used, precision)):
        if name in batched:
            continue  # the config's precision is fp32 too
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
        print(f"  batched (bs {args.batch_size}) {name}: {len(images) / batched_s[name]:.2f} img/s, "
              f"max |p difference| vs learn.predict {max_diff[name]:.1e}")
    print(f"  per-image learn.predict (fp32): {len(images) / loop_s:.2f} img/s")
    print(f"  batched {used} vs learn.predict: {ratio:.1f}x (goal >= 5x); batched {used} vs batched fp32: "
          f"{batched_s['fp32'] / batched_s[used]:.2f}x")
    return {"auc": auc, "train_s": train_s, "precision": used, "batched_ips": len(images) / batched_s[used],
            "batched_fp32_ips": len(images) / batched_s["fp32"], "loop_ips": len(images) / loop_s,
            "ratio": ratio, "max_diff": max_diff[used], "max_diff_fp32": max_diff["fp32"]}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
