#!/usr/bin/env python
"""End-to-end submission speed on CPU, gated (classifier in front) against ungated (detector on all).

On a generated test set that is 78% ship-free (module_synthetic, Kaggle's share), both runs go
through ``module_submit.predict_rows`` with the same detector and the same score threshold and
minimum area; the gated run adds the classifier and sends only images with p_ship >= the
threshold to the detector. Prints images/s of both, their ratio (goal >= 3x) and the local F2 of
both submissions against the generated truth (the gated F2 must be equal or better).

Models: those of the config's run folder when they exist (``make demo`` trains them), else a
short training here into ``runs/bench_submit`` (classifier ``--classifier-epochs`` epochs,
detector ``--detector-iters`` iterations at the config's last stage size).

    python bench/bench_submit.py                                   # configs/demo.yaml, 100 test images
    python bench/bench_submit.py --n-test 200 --classifier-threshold 0.5
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import module_config  # noqa: E402
import module_metric  # noqa: E402
import module_submit  # noqa: E402
import module_synthetic  # noqa: E402
import module_inference  # noqa: E402
import module_files  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--n-test", type=int, default=100, help="generated test images (78%% ship-free)")
    parser.add_argument("--seed", type=int, default=123, help="seed of the generated test set")
    parser.add_argument("--classifier-threshold", type=float, default=None,
                        help="gate threshold (default: the run's tuned one, else SUBMIT.CLASSIFIER_THRESHOLD)")
    parser.add_argument("--retrain", action="store_true", help="train fresh models even if the run has some")
    parser.add_argument("--classifier-epochs", type=int, default=6, help="epochs of the short classifier training")
    parser.add_argument("--detector-iters", type=int, default=60, help="iterations of the short detector training")
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "bench_submit"), help="scratch folder")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def get_models(args, cfg):
    """(cfg, classifier path, detector weights): the run's own, or freshly trained short ones."""
    try:
        classifier = module_config.get_classifier_path(cfg)
        weights = module_inference.get_default_weights_path(cfg)
        if classifier.is_file() and not args.retrain:
            print(f"models: the run's own ({classifier}, {weights})")
            return cfg, classifier, weights
    except FileNotFoundError:
        pass
    import module_classifier
    import module_preprocessing
    import module_train

    size = int(cfg.DETECTOR.STAGES[-1][0])
    cfg = module_config.get_cfg(args.config, [
        *args.opts, "PATHS.RUNS_DIR", str(Path(args.out_dir) / "runs"), "PATHS.RUN_NAME", "bench",
        "CLASSIFIER.EPOCHS", str(args.classifier_epochs),
        "DETECTOR.STAGES", f"[[{size}, {args.detector_iters}, 0.01, 10]]",
        "DETECTOR.EVAL_PERIOD", str(10 * args.detector_iters), "DETECTOR.EVAL_MAX_IMAGES", "8",
        "MODEL.DEVICE", "cpu"])
    print(f"models: training short ones in {module_config.get_run_dir(cfg)} "
          f"(classifier {args.classifier_epochs} epochs, detector {args.detector_iters} iterations at {size} px)")
    module_synthetic.prepare_synthetic_input(cfg)
    train_dicts, val_dicts = module_preprocessing.get_train_val_dicts(cfg)
    start = time.perf_counter()
    classifier = module_classifier.train_classifier(cfg, train_dicts, val_dicts, fresh=args.retrain)["export"]
    print(f"  classifier trained in {time.perf_counter() - start:.0f} s")
    start = time.perf_counter()
    module_train.train_detector(cfg, train_dicts, val_dicts, fresh=args.retrain)
    print(f"  detector trained in {time.perf_counter() - start:.0f} s")
    return cfg, classifier, module_inference.get_default_weights_path(cfg)


def run(label, image_ids, image_dir, detect_fn, thresholds, p_ship_fn, cfg, truth, out_dir):
    load = lambda path: module_files.read_image(path, cfg.DATA.IMAGE_SIZE)  # noqa: E731
    start = time.perf_counter()
    result = module_submit.predict_rows(image_ids, image_dir, detect_fn, thresholds, p_ship_fn=p_ship_fn,
                                        batch_size=cfg.SUBMIT.BATCH_SIZE, chunk_size=4 * cfg.CLASSIFIER.BATCH_SIZE,
                                        load_image=load, progress=False)
    seconds = time.perf_counter() - start
    out = module_submit.write_submission(result.rows, Path(out_dir) / f"{label}.csv")
    score = module_metric.score_submission(out, truth, shape=(cfg.DATA.IMAGE_SIZE,) * 2)
    return {"label": label, "seconds": seconds, "images_per_s": len(image_ids) / seconds,
            "detected": result.n_detected, "f2": score.f2, "by_type": module_metric.f2_by_image_type(score)}


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    cfg = module_config.get_cfg(args.config, [*args.opts, "MODEL.DEVICE", "cpu"])
    cfg, classifier, weights = get_models(args, cfg)
    out_dir = Path(args.out_dir)
    data = out_dir / f"test_{args.n_test}_{cfg.SYNTH.IMAGE_SIZE}px_seed{args.seed}"
    if not (data / module_synthetic.TEST_TRUTH_CSV).is_file():
        module_synthetic.generate_dataset(data, n_train=0, n_test=args.n_test, seed=args.seed,
                                          empty_fraction=0.78, image_size=cfg.SYNTH.IMAGE_SIZE, overwrite=True)
    truth = data / module_synthetic.TEST_TRUTH_CSV
    image_ids = module_files.read_image_ids(data / module_synthetic.SAMPLE_SUBMISSION)
    n_empty = sum(1 for i, rows in module_metric.read_rle_table(truth, "truth").groupby("ImageId")["EncodedPixels"]
                  if (rows == "").all())
    thresholds, sources = module_inference.get_thresholds(cfg)
    if args.classifier_threshold is not None:
        thresholds = module_inference.Thresholds(args.classifier_threshold, thresholds.score, thresholds.min_area)
        sources["CLASSIFIER_THRESHOLD"] = "--classifier-threshold"
    print(f"test set: {len(image_ids)} generated {cfg.SYNTH.IMAGE_SIZE} px images, {n_empty / len(image_ids):.0%} "
          f"ship-free ({data})")
    print(f"thresholds: {thresholds.as_config()} ({sources})")
    print(f"CPU, torch threads: {torch.get_num_threads()}, {os.cpu_count()} cores visible")

    detect_fn = module_inference.build_detect_fn(cfg, weights)
    p_ship_fn = module_inference.build_p_ship_fn(cfg, classifier)
    detect_fn([np.zeros((cfg.DATA.IMAGE_SIZE, cfg.DATA.IMAGE_SIZE, 3), np.uint8)])  # warm-up
    p_ship_fn([data / "test_v2" / image_ids[0]])
    ungated = run("ungated", image_ids, data / "test_v2", detect_fn,
                  module_inference.Thresholds(0.0, thresholds.score, thresholds.min_area), None, cfg, truth, out_dir)
    gated = run("gated", image_ids, data / "test_v2", detect_fn, thresholds, p_ship_fn, cfg, truth, out_dir)

    print()
    print(f"{'':10s} {'images/s':>9s} {'seconds':>8s} {'detector ran on':>16s} {'F2':>7s} "
          f"{'F2 ship-free':>13s} {'F2 ships':>9s}")
    for r in (ungated, gated):
        by_type = r["by_type"].set_index("images")["f2"]
        print(f"{r['label']:10s} {r['images_per_s']:9.2f} {r['seconds']:8.1f} {r['detected']:>10d} images "
              f"{r['f2']:7.4f} {by_type['ship-free']:13.4f} {by_type['with ships']:9.4f}")
    ratio = gated["images_per_s"] / ungated["images_per_s"]
    print(f"\ngated / ungated speed: {ratio:.2f}x (goal >= 3x); "
          f"F2 gated - ungated: {gated['f2'] - ungated['f2']:+.4f} (goal >= 0)")
    met = ratio >= 3 and gated["f2"] >= ungated["f2"]
    print("goals met" if met else "GOALS NOT MET")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
