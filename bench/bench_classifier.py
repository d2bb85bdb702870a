#!/usr/bin/env python
"""The ship/no-ship classifier on CPU: batched inference speed, and what a short training learns.

1. Learning: a synthetic Kaggle-format dataset (module_synthetic, 78% ship-free, ``--size`` px) is
   split by module_preprocessing; the fastai ResNet34 trains from random init (offline) for
   ``--epochs`` one-cycle epochs at ``--train-size`` px, within a wall-clock budget. Prints the
   per-epoch curve (losses, accuracy, precision, recall, ROC AUC) and the validation ROC AUC
   (goal >= 0.95 within 5 minutes).
2. Inference, at 256 px (the real default): ``module_classifier.predict_p_ship`` (a test
   DataLoader, many images per forward pass) against a per-image ``learn.predict`` loop (the usual
   Kaggle usage), on the same images with the same weights, in the same run. Goal >= 5x. Both
   give the same probabilities, which is checked.

    .venv/bin/python bench/bench_classifier.py [--n-train 400] [--epochs 6] [--n-infer 48]
"""
from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import module_classifier  # noqa: E402
import module_preprocessing  # noqa: E402
import module_synthetic  # noqa: E402
from module_config import get_cfg  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n-train", type=int, default=400, help="synthetic training images (split 80/20)")
    parser.add_argument("--size", type=int, default=256, help="side of the synthetic tiles (px)")
    parser.add_argument("--train-size", type=int, default=128, help="classifier input size for the learning run")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--arch", default="resnet34", help="torchvision ResNet of the learning run")
    parser.add_argument("--train-batch", type=int, default=32, help="training batch size")
    parser.add_argument("--balance", default="weights", help="CLASSIFIER.BALANCE of the learning run")
    parser.add_argument("--n-infer", type=int, default=48, help="images timed for inference")
    parser.add_argument("--batch-size", type=int, default=16, help="inference batch size")
    parser.add_argument("--out", default="", help="work folder (default: a temporary one)")
    return parser


def main(args: argparse.Namespace) -> dict:
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    work = Path(args.out or tempfile.mkdtemp(prefix="bench_classifier_"))
    paths = module_synthetic.get_dataset_paths(work / "input")
    if not paths["train_csv"].is_file():
        module_synthetic.generate_dataset(work / "input", args.n_train, args.n_infer, seed=0, image_size=args.size)
    cfg = get_cfg(REPO_ROOT / "configs" / "demo.yaml", [
        "PATHS.INPUT_DIR", str(work / "input"), "PATHS.RUNS_DIR", str(work / "runs"), "PATHS.RUN_NAME", "bench",
        "SYNTH.ENABLED", "False", "DATA.IMAGE_SIZE", str(args.size), "DATA.VAL_FRACTION", "0.2",
        "CLASSIFIER.IMAGE_SIZE", str(args.train_size), "CLASSIFIER.EPOCHS", str(args.epochs),
        "CLASSIFIER.LR", str(args.lr), "CLASSIFIER.BATCH_SIZE", str(args.train_batch),
        "CLASSIFIER.ARCH", args.arch, "CLASSIFIER.BALANCE", args.balance, "CLASSIFIER.TTA", "False",
        "CLASSIFIER.NUM_WORKERS", "0"])
    train_dicts, val_dicts = module_preprocessing.get_train_val_dicts(cfg)

    # 1. learning
    start = time.perf_counter()
    export = module_classifier.train_classifier(cfg, train_dicts, val_dicts)
    train_s = time.perf_counter() - start
    import pandas as pd

    curve = pd.read_csv(export.parent / "history.csv")
    predictions = pd.read_csv(export.parent / "val_predictions.csv")
    auc = module_classifier.roc_auc_or_nan(predictions["has_ship"].to_numpy(), predictions["p_ship"].to_numpy())
    print(f"learning: {len(train_dicts)} train / {len(val_dicts)} val synthetic {args.size} px images, "
          f"{np.mean([not d['annotations'] for d in train_dicts]):.0%} ship-free; ResNet34 random init at "
          f"{args.train_size} px, {args.epochs} epochs in {train_s / 60:.1f} min")
    print(curve.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"validation ROC AUC {auc:.4f} (goal >= 0.95 within 5 min)")

    # 2. inference at 256 px: the same weights, input size 256
    learner = module_classifier.load_classifier(export)
    infer_cfg = get_cfg(REPO_ROOT / "configs" / "demo.yaml", [
        "PATHS.RUNS_DIR", str(work / "runs"), "PATHS.RUN_NAME", "bench256", "CLASSIFIER.IMAGE_SIZE", "256",
        "CLASSIFIER.ARCH", args.arch,
        "CLASSIFIER.EPOCHS", "1", "CLASSIFIER.NUM_WORKERS", "0"])
    learner256 = module_classifier.build_learner(
        infer_cfg, module_classifier.build_dataloaders(infer_cfg, module_classifier.get_label_frame(train_dicts, val_dicts)),
        learner.loss_func, work / "runs" / "bench256")
    learner256.model.load_state_dict(learner.model.state_dict())
    learner256.model.eval()
    images = sorted(paths["test_images"].glob("*.jpg"))[: args.n_infer]
    module_classifier.predict_p_ship(learner256, images[:4], batch_size=4, progress=False)  # warm-up
    start = time.perf_counter()
    batched = module_classifier.predict_p_ship(learner256, images, batch_size=args.batch_size, progress=False)
    batched_s = time.perf_counter() - start
    ship = list(learner256.dls.vocab).index(module_classifier.SHIP)
    learner256.predict(str(images[0]))  # warm-up
    start = time.perf_counter()
    looped = []
    with learner256.no_bar(), learner256.no_logging():
        for image in images:
            looped.append(float(learner256.predict(str(image))[2][ship]))
    loop_s = time.perf_counter() - start
    max_diff = float(np.abs(batched["p_ship"].to_numpy() - np.array(looped)).max())
    ratio = loop_s / batched_s
    print(f"inference at 256 px, {len(images)} images, CPU ({torch.get_num_threads()} threads): "
          f"batched (bs {args.batch_size}) {len(images) / batched_s:.2f} img/s | per-image learn.predict "
          f"{len(images) / loop_s:.2f} img/s | {ratio:.1f}x (goal >= 5x); max |p difference| {max_diff:.2e}")
    return {"auc": auc, "train_s": train_s, "batched_ips": len(images) / batched_s,
            "loop_ips": len(images) / loop_s, "ratio": ratio, "max_diff": max_diff}


if __name__ == "__main__":
    main(get_args_parser().parse_args())
