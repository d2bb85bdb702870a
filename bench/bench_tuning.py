#!/usr/bin/env python
"""Threshold tuning under a prevalence shift: today's tuner against the prevalence-aware, guarded one.

Generated data (module_synthetic): a training set 50% ship-free, and two test sets of independent
tiles, 78% and 95% ship-free. Short models are trained on the training set (classifier
``--classifier-epochs`` epochs, detector ``--detector-iters`` iterations at ``--image-size``).
Both models run once over the validation split and each test set (ungated, every detection kept
above the grid's lowest score: ``module_tuning.collect_tune_cache``); each tuner's thresholds are
then scored on each test set from those outputs (``module_tuning.evaluate_thresholds``: what a
submission at those thresholds scores, gate included, without running the models again).

Tuners, all on the same validation split (50% ship-free) and the config's SUBMIT.TUNE_* grids:

- **today**: plain F2 maximisation at the validation split's share (no guard, one score threshold);
- **new**: ``SUBMIT.TARGET_EMPTY_FRACTION`` = the test set's share, the no-harm guard and
  size-aware thresholds on (the defaults);
- **new, default target**: the defaults with the target left at -1 (the training split's 50%).

Baseline, measured in the same run on the same test images: **all-empty** (no ship anywhere),
whose F2 is the test set's share of ship-free images. Prints each tuner's test F2, its ratio to
all-empty and its gain over it.

    python bench/bench_tuning.py                              # configs/demo.yaml models at 256 px
    python bench/bench_tuning.py --n-test 400 --detector-iters 300
"""
from __future__ import annotations

import argparse
import logging
import os
import pickle
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import module_config  # noqa: E402
import module_files  # noqa: E402
import module_inference  # noqa: E402
import module_preprocessing  # noqa: E402
import module_synthetic  # noqa: E402
import module_tuning  # noqa: E402

TEST_SHARES = (0.78, 0.95)
# Today's tuner: no guard, one score threshold, and (with no training share given to `tune`) the
# validation split's own share of ship-free images.
TODAY = ["SUBMIT.GUARD_CONFIDENCE", "0", "SUBMIT.TUNE_SIZE_AWARE", "False", "SUBMIT.TARGET_EMPTY_FRACTION", "-1"]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="models and grids from here")
    parser.add_argument("--n-train", type=int, default=400, help="generated training images (50%% ship-free)")
    parser.add_argument("--n-test", type=int, default=300, help="generated images per test set (78%%, 95%% ship-free)")
    parser.add_argument("--image-size", type=int, default=256, help="side of the generated tiles (px)")
    parser.add_argument("--seed", type=int, default=7, help="seed of the generated data (test sets: seed + 1, + 2)")
    parser.add_argument("--classifier-epochs", type=int, default=4)
    parser.add_argument("--detector-iters", type=int, default=200, help="detector iterations (one stage)")
    parser.add_argument("--out-dir", default=str(ROOT / "runs" / "bench_tuning"), help="scratch folder (data, models)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def generate(out: Path, n_train: int, n_test: int, seed: int, empty_fraction: float, image_size: int) -> Path:
    """A generated dataset in Kaggle's layout, made once and reused."""
    if not (out / module_synthetic.TRAIN_CSV).is_file():
        module_synthetic.generate_dataset(out, n_train=n_train, n_test=n_test, seed=seed,
                                          empty_fraction=empty_fraction, image_size=image_size, overwrite=True)
    return out


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out_dir)
    size = args.image_size
    start = time.perf_counter()
    train_dir = generate(out / f"train_{args.n_train}_{size}px_seed{args.seed}", args.n_train, 0, args.seed, 0.5, size)
    test_dirs = {share: generate(out / f"test{round(share * 100)}_{args.n_test}_{size}px_seed{args.seed + k + 1}", 0,
                                 args.n_test, args.seed + k + 1, share, size) for k, share in enumerate(TEST_SHARES)}
    generated = time.perf_counter() - start
    base = [*args.opts, "PATHS.INPUT_DIR", str(train_dir), "PATHS.RUNS_DIR", str(out / "runs"),
            "PATHS.RUN_NAME", f"bench_{size}px_seed{args.seed}_c{args.classifier_epochs}_d{args.detector_iters}", "SYNTH.ENABLED", "False", "DATA.IMAGE_SIZE", str(size),
            "DATA.VAL_FRACTION", "0.25", "CLASSIFIER.EPOCHS", str(args.classifier_epochs),
            "DETECTOR.STAGES", f"[[{size}, {args.detector_iters}, 0.02, 20]]",
            "DETECTOR.EVAL_PERIOD", str(10 * args.detector_iters), "DETECTOR.EVAL_MAX_IMAGES", "8",
            "MODEL.DEVICE", "cpu"]
    cfg = module_config.get_cfg(args.config, base)
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}, "
          f"{os.cpu_count()} cores visible; data generated in {generated:.0f} s")

    import module_classifier
    import module_train

    train_dicts, val_dicts = module_preprocessing.get_train_val_dicts(cfg)
    start = time.perf_counter()
    module_classifier.train_classifier(cfg, train_dicts, val_dicts)
    module_train.train_detector(cfg, train_dicts, val_dicts)
    print(f"models: {len(train_dicts)} training images ({np.mean([not d['annotations'] for d in train_dicts]):.0%} "
          f"ship-free), trained in {time.perf_counter() - start:.0f} s (or reused from {module_config.get_run_dir(cfg)})")

    start = time.perf_counter()
    detect_fn = module_inference.build_detect_fn(cfg)
    p_ship_fn = module_inference.build_p_ship_fn(cfg)
    min_score = min(cfg.SUBMIT.TUNE_SCORE_THRESHOLDS)
    load = lambda path: module_files.read_image(path, size)  # noqa: E731

    def outputs(dicts, name):
        """The models' outputs on ``dicts``, kept beside the models (the same models: the same outputs)."""
        models = [module_inference.get_default_weights_path(cfg), module_config.get_classifier_path(cfg)]
        stamp = "_".join(str(p.stat().st_mtime_ns) for p in models)  # other models: other outputs
        path = module_config.get_run_dir(cfg) / f"bench_outputs_{name}_{stamp}.pkl"
        if path.is_file():
            return pickle.loads(path.read_bytes())
        cache = module_tuning.collect_tune_cache(dicts, detect_fn, p_ship_fn, batch_size=cfg.SUBMIT.BATCH_SIZE,
                                                 min_score=min_score, load_image=load, progress=False)
        path.write_bytes(pickle.dumps(cache))
        return cache

    validation = outputs(val_dicts, "validation")
    tests = {}
    for share, folder in test_dirs.items():
        paths = module_synthetic.get_dataset_paths(folder)
        dicts = module_preprocessing.load_dataset_dicts(paths["test_truth"], paths["test_images"], image_size=size)
        tests[share] = outputs(dicts, folder.name)
    print(f"model outputs on {len(validation)} validation and {sum(map(len, tests.values()))} test images in "
          f"{time.perf_counter() - start:.0f} s")

    tuners = {"today": module_config.get_cfg(args.config, [*base, *TODAY, "PATHS.RUN_NAME", "bench_today"]),
              "new, default target": module_config.get_cfg(args.config, [*base, "PATHS.RUN_NAME", "bench_default",
                                                                         "SUBMIT.TARGET_EMPTY_FRACTION", "-1"])}
    for share in TEST_SHARES:
        tuners[f"new, target {share:.0%}"] = module_config.get_cfg(args.config, [
            *base, "PATHS.RUN_NAME", f"bench_new{round(share * 100)}", "SUBMIT.TARGET_EMPTY_FRACTION", str(share)])
    train_empty = float(np.mean([not d["annotations"] for d in train_dicts]))
    start = time.perf_counter()
    chosen = {}
    for name, tuner_cfg in tuners.items():
        result = module_tuning.tune(validation, tuner_cfg, progress=False,
                                    train_empty_fraction=None if name == "today" else train_empty)
        chosen[name] = result
        guard = result.guard.get("passed")
        print(f"  {name:22s} {result.thresholds.as_config()}  validation F2 {result.f2:.4f}, expected at target "
              f"{result.target_f2:.4f} ({result.target_empty_fraction:.0%}); guard "
              f"{'off' if guard is None else 'passed' if guard else 'fell back'}, size-aware "
              f"{'on' if result.size_aware.get('on') else 'off'}")
    print(f"tuning: {len(tuners)} tuners in {time.perf_counter() - start:.0f} s "
          f"(validation {np.mean([not c.has_ships for c in validation]):.0%} ship-free)")

    print()
    header = f"{'test set':>22s} {'images':>7s} {'all-empty':>10s}"
    names = ["today", "new, default target", "new, target at test"]
    print(header + "".join(f" {n:>22s}" for n in names))
    for share, cache in tests.items():
        all_empty = float(np.mean([not c.has_ships for c in cache]))
        figures = []
        for name in ("today", "new, default target", f"new, target {share:.0%}"):
            f2 = float(module_tuning.evaluate_thresholds(cache, chosen[name].thresholds).mean())
            figures.append(f"{f2:.4f} ({f2 / all_empty:.3f}x, {f2 - all_empty:+.4f})")
        print(f"{f'{share:.0%} ship-free':>22s} {len(cache):7d} {all_empty:10.4f}" + "".join(f" {f:>22s}" for f in figures))
    print("\n(test F2, its ratio to all-empty, its gain over all-empty; all-empty is the baseline, measured on "
          "the same images)")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
