#!/usr/bin/env python
"""How much the tuned thresholds owe to the size of the validation split.

A run's two models (``--run``, default the config's) predict once over ``--n-pool`` independent
generated tiles (module_synthetic at the config's tile size, 78% ship-free, seed ``--seed``,
which the demo's own data does not use); the outputs are cached next to the run
(``module_tuning.collect_tune_cache``). Then, ``--draws`` times for each validation size, a draw
of that many pool tiles (stratified: the pool's share with ships) is the validation split: the
config's tuner chooses on it (its grids, target share and no-harm guard:
``module_tuning.choose_from_sweep``), and the choice is scored on the rest of the pool at the
target share, as a test set would score it.

Baseline, in the same run on the same draws' complements: the first size (default 100, the demo's
validation split before 2026-12-03) at the first guard confidence (``--guards``, default the
config's ``SUBMIT.GUARD_CONFIDENCE``; every guard sees the same draws). Per size it prints the held-out F2 of the choice (mean, sd,
10th percentile), the regret against the best setting on the held-out tiles, the gate
thresholds chosen, and the mean gain over all-empty as a ratio to the baseline's.

    python bench/bench_val_size.py --run runs/demo                   # the demo's models
    python bench/bench_val_size.py --run runs/demo --sizes 100,220 --draws 300 --guards 0.9,0.8,0
"""
from __future__ import annotations

import argparse
import collections
import logging
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


def add_pool_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of the scripts that score a run's models on the generated pool (this one,
    bench_test_size.py)."""
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"), help="grids, guard, target from here")
    parser.add_argument("--run", default=None, help="run folder with the models (default the config's)")
    parser.add_argument("--n-pool", type=int, default=1000, help="independent generated tiles")
    parser.add_argument("--seed", type=int, default=11, help="the pool's generator seed (the demo's data: 0)")
    return parser


def get_run_cfg(args):
    """The config of ``args`` (``--run`` pointing at the run folder), or None, said so, where the
    run has no trained models: as bench_detect.py, so that `make bench` goes on."""
    opts = list(args.opts or [])
    if args.run:
        run = Path(args.run)
        opts += ["PATHS.RUNS_DIR", str(run.parent), "PATHS.RUN_NAME", run.name]
    cfg = module_config.get_cfg(args.config, opts)
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
          f"run {module_config.get_run_dir(cfg)}")
    missing = [p for p in (module_config.get_detector_path(cfg), module_config.get_classifier_path(cfg))
               if not p.is_file()]
    if missing:
        print(f"SKIPPED: the run has no trained models to benchmark ({missing[0]} is missing); `make demo` trains "
              "the demo's, or pass --run")
        return None
    return cfg


def get_args_parser() -> argparse.ArgumentParser:
    parser = add_pool_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--sizes", default="100,150,220,300", help="validation sizes; the first is the baseline")
    parser.add_argument("--draws", type=int, default=150, help="draws per size")
    parser.add_argument("--bootstrap", type=int, default=400, help="guard resamples per draw (the tuner's: 1000)")
    parser.add_argument("--guards", default=None,
                        help="guard confidences to compare, e.g. 0.9,0.8,0 (default the config's GUARD_CONFIDENCE)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def get_pool_dicts(size: int, n_pool: int, seed: int, parent: Path) -> list[dict]:
    """The dataset dicts of ``n_pool`` independent generated tiles of ``size`` px (module_synthetic,
    seed ``seed``), generated once into ``parent/pool_<n>_<size>px_seed<seed>``."""
    pool_dir = Path(parent) / f"pool_{n_pool}_{size}px_seed{seed}"
    paths = module_synthetic.get_dataset_paths(pool_dir)
    if not paths["test_truth"].is_file():
        module_synthetic.generate_dataset(pool_dir, 0, n_pool, seed=seed, image_size=size, overwrite=True)
    return module_preprocessing.load_dataset_dicts(paths["test_truth"], paths["test_images"], image_size=size)


def get_pool_cache(cfg, n_pool: int, seed: int) -> tuple[list[module_tuning.TuneImage], float]:
    """Both models' outputs on the generated pool, cached under the run's folder (one file per
    ``DETECTOR.TEST_SIZE``: bench_test_size.py compares them), and the seconds the models took."""
    size = int(cfg.DATA.IMAGE_SIZE)
    run_dir = module_config.get_run_dir(cfg)
    at = f"_at{cfg.DETECTOR.TEST_SIZE}" if cfg.DETECTOR.TEST_SIZE else ""
    cache_path = run_dir / "bench_val_size" / f"pool_{n_pool}_{size}px_seed{seed}{at}.pkl"
    weights, classifier = module_config.get_detector_path(cfg), module_config.get_classifier_path(cfg)
    # the tuner's own cache key: the models' files and the settings that change their outputs
    fingerprint = module_tuning._cache_fingerprint(weights, classifier) + module_tuning._inference_key(cfg)
    if cache_path.is_file():
        stored = pickle.loads(cache_path.read_bytes())
        if stored.get("fingerprint") == fingerprint:
            return stored["images"], stored.get("seconds", float("nan"))
    dicts = get_pool_dicts(size, n_pool, seed, cache_path.parent)
    started = time.perf_counter()
    cache = module_tuning.collect_tune_cache(
        dicts, module_inference.build_detect_fn(cfg, weights), module_inference.build_p_ship_fn(cfg, classifier),
        batch_size=cfg.SUBMIT.BATCH_SIZE, min_score=min(cfg.SUBMIT.TUNE_SCORE_THRESHOLDS))
    seconds = time.perf_counter() - started
    print(f"both models on {len(cache)} pool tiles: {seconds:.0f} s")
    with module_files.atomic_path(cache_path) as tmp:
        tmp.write_bytes(pickle.dumps({"fingerprint": fingerprint, "images": cache, "seconds": seconds}))
    return cache, seconds


def simulate(sweep: module_tuning.Sweep, size: int, draws: int, target: float, confidence: float, n_resamples: int,
             rng: np.random.Generator) -> dict:
    """``draws`` validation splits of ``size`` pool tiles: the held-out F2 of each one's choice."""
    ships, empty = np.flatnonzero(sweep.has_ships), np.flatnonzero(~sweep.has_ships)
    n_ships = int(round(size * len(ships) / len(sweep.has_ships)))
    held_out, best, gates = [], [], []
    for draw in range(draws):
        chosen = np.concatenate([rng.choice(ships, n_ships, replace=False),
                                 rng.choice(empty, size - n_ships, replace=False)])
        rest = np.setdiff1d(np.arange(len(sweep.has_ships)), chosen)
        grid = sweep.grid[module_tuning.GRID_COLUMNS].copy()
        grid["f2"] = sweep.f2[chosen].mean(axis=0)
        part = module_tuning.Sweep(grid, sweep.f2[chosen], sweep.predicts[chosen], sweep.detector_f2[chosen],
                                   sweep.has_ships[chosen])
        choice, _, _ = module_tuning.choose_from_sweep(part, target, target, confidence, n_resamples, draw)
        scored = module_tuning.target_mean(sweep.f2[rest], sweep.has_ships[rest], target)
        held_out.append(float(scored[choice.row]) if choice.row is not None else target)
        best.append(float(scored.max()))
        gates.append(choice.thresholds.classifier)
    held_out = np.array(held_out)
    return {"size": size, "ships": n_ships, "mean": held_out.mean(), "sd": held_out.std(),
            "p10": np.quantile(held_out, 0.1), "regret": float(np.mean(np.array(best) - held_out)),
            "gates": dict(sorted(collections.Counter(round(g, 2) for g in gates).items()))}


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    cfg = get_run_cfg(args)
    if cfg is None:
        return 0
    cache, _ = get_pool_cache(cfg, args.n_pool, args.seed)
    submit = cfg.SUBMIT
    sweep = module_tuning.sweep_thresholds(cache, submit.TUNE_CLASSIFIER_THRESHOLDS, submit.TUNE_SCORE_THRESHOLDS,
                                           submit.TUNE_MIN_AREAS, progress=False)
    target = float(submit.TARGET_EMPTY_FRACTION)
    if not 0 < target < 1:
        raise SystemExit(f"SUBMIT.TARGET_EMPTY_FRACTION is {target}: give the pool's share (0.78) on the command line")
    best = module_tuning.target_mean(sweep.f2, sweep.has_ships, target).max()
    print(f"pool: {len(cache)} tiles, {int(sweep.has_ships.sum())} with ships; best setting on the whole pool "
          f"F2 {best:.4f} at {target:.0%} ship-free (all-empty {target:.2f}); {args.draws} draws per size")
    guards = [float(g) for g in args.guards.split(",")] if args.guards else [float(submit.GUARD_CONFIDENCE)]
    rows = []
    for guard in guards:  # the same draws for every guard: the same seed
        rng = np.random.default_rng(args.seed)
        rows += [{**simulate(sweep, int(size), args.draws, target, guard, args.bootstrap, rng), "guard": guard}
                 for size in args.sizes.split(",")]
    base_gain = rows[0]["mean"] - target
    print(f"| validation tiles (with ships) | guard | held-out F2: mean | sd | 10th pct | regret | gain over all-empty "
          f"vs {rows[0]['size']}, guard {rows[0]['guard']:g} | gate thresholds chosen |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for row in rows:
        ratio = (row["mean"] - target) / base_gain if base_gain > 0 else float("nan")
        print(f"| {row['size']} ({row['ships']}) | {row['guard']:g} | {row['mean']:.4f} | {row['sd']:.4f} | "
              f"{row['p10']:.4f} | {row['regret']:.4f} | {ratio:.2f}x | {row['gates']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
