#!/usr/bin/env python
"""What predicting at a larger input size (``DETECTOR.TEST_SIZE``) buys with the same weights.

A run's two models (``--run``, default the config's) predict over ``--n-pool`` independent
generated tiles (bench_val_size.py's pool: module_synthetic at the config's tile size, 78%
ship-free, seed ``--seed``, which the demo's own data does not use) once per test size; the
outputs are cached next to the run, one file per size. Per size it prints the seconds per tile of
both models, the detector alone on the tiles with ships (its F2 at the best score threshold, no
gate), and the gated pipeline at its best setting of the config's grids on the whole pool at
the config's target share of ship-free tiles (an upper bound for what tuning finds: the same
bound for every size).

Baseline, in the same run: the size the checkpoint was trained at (``--sizes`` starts with 0).

    python bench/bench_test_size.py --run runs/demo                      # the demo's models
    python bench/bench_test_size.py --run runs/demo --sizes 0,384,448,512 --n-pool 400
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import module_config  # noqa: E402
import module_inference  # noqa: E402
import module_tuning  # noqa: E402
from bench.bench_val_size import add_pool_args, get_pool_cache, get_run_cfg  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = add_pool_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--sizes", default="0,384,448", help="test sizes in px; 0: the trained size, the baseline")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    cfg = get_run_cfg(args)
    if cfg is None:
        return 0
    weights = module_config.get_detector_path(cfg)
    _, trained = module_inference.get_input_sizes(cfg, torch.load(weights, map_location="cpu", weights_only=False))
    target = float(cfg.SUBMIT.TARGET_EMPTY_FRACTION)
    if not 0 < target < 1:
        raise SystemExit(f"SUBMIT.TARGET_EMPTY_FRACTION is {target}: give the pool's share (0.78) on the command line")
    submit = cfg.SUBMIT
    rows = []
    for size in (int(s) for s in args.sizes.split(",")):
        sized = cfg.clone()
        sized.defrost()
        sized.DETECTOR.TEST_SIZE = size
        cache, seconds = get_pool_cache(sized, args.n_pool, args.seed)
        sweep = module_tuning.sweep_thresholds(cache, submit.TUNE_CLASSIFIER_THRESHOLDS, submit.TUNE_SCORE_THRESHOLDS,
                                               submit.TUNE_MIN_AREAS, progress=False)
        gated = module_tuning.target_mean(sweep.f2, sweep.has_ships, target)
        best = int(np.argmax(gated))
        rows.append({"size": size or trained, "s_per_tile": seconds / len(cache),
                     "detector_ships": float(sweep.detector_f2[sweep.has_ships].mean(axis=0).max()),
                     "gated": float(gated[best]), "ships_at_best": float(sweep.f2[sweep.has_ships, best].mean()),
                     "setting": sweep.grid.iloc[best][module_tuning.GRID_COLUMNS].tolist()})
    base = rows[0]
    print(f"pool: {args.n_pool} tiles, {int(sweep.has_ships.sum())} with ships; trained at {trained} px; "
          f"the gated F2 at {target:.0%} ship-free (all-empty {target:.2f})")
    print("| test size | s per tile (both models) | vs trained size | detector alone, ship tiles: F2 | "
          "gated, best setting: F2 | its ship tiles | its setting (gate / score / min area) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        setting = " / ".join(f"{v:g}" for v in row["setting"])
        print(f"| {row['size']} | {row['s_per_tile']:.3f} | {row['s_per_tile'] / base['s_per_tile']:.2f}x | "
              f"{row['detector_ships']:.3f} ({row['detector_ships'] - base['detector_ships']:+.3f}) | "
              f"{row['gated']:.4f} ({row['gated'] - base['gated']:+.4f}) | {row['ships_at_best']:.3f} | {setting} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
