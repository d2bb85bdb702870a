#!/usr/bin/env python
"""What the classifier's cell loss (``CLASSIFIER.CELL_LOSS_WEIGHT``) buys in the same minutes.

Trains the config's classifier (the demo's: half-width ResNet-18 at 128 px, random init, its
``CLASSIFIER.TIME_BUDGET_MIN``) on the config's data in pairs, each pair with one seed
(``CLASSIFIER.SEED`` 0, 1, ...): the baseline without the cell loss (weight 0) and the same
with ``--weight``. Each classifier is scored on ``--n-pool`` independent generated tiles
(bench_val_size.py's pool: module_synthetic at the config's tile size, 78% ship-free, seed
``--seed``, which the demo's own data does not use): ROC AUC, the share of ship tiles passing
where 1% of the ship-free tiles do, and the shares passing at ``--threshold`` (the demo's tuned
gate is usually 0.9). Printed per run and as the mean difference against the baseline.

    python bench/bench_cell_loss.py                      # one pair, the demo's config and data
    python bench/bench_cell_loss.py --pairs 2 --weight 1.0 --out runs/bench_cell_loss [KEY VALUE ...]

The runs go to ``--out`` (default ``runs/bench_cell_loss``), one folder each; the demo's data is
generated into ``PATHS.INPUT_DIR`` where it is missing, as `make demo` does.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

import module_classifier  # noqa: E402
import module_config  # noqa: E402
import module_inference  # noqa: E402
import module_preprocessing  # noqa: E402
import module_synthetic  # noqa: E402
from bench.bench_val_size import get_pool_dicts  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--pairs", type=int, default=1, help="pairs of runs (seeds 0, 1, ...)")
    parser.add_argument("--weight", type=float, default=1.0, help="CLASSIFIER.CELL_LOSS_WEIGHT against 0")
    parser.add_argument("--n-pool", type=int, default=1000, help="independent generated tiles")
    parser.add_argument("--seed", type=int, default=11, help="the pool's generator seed (the demo's data: 0)")
    parser.add_argument("--threshold", type=float, default=0.9, help="a gate threshold to report the passing shares at")
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench_cell_loss"), help="runs folder")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def get_pool(cfg, n_pool: int, seed: int, out: Path) -> tuple[list[Path], np.ndarray]:
    """The pool's image paths and which hold ships (generated once under ``out``)."""
    dicts = get_pool_dicts(int(cfg.DATA.IMAGE_SIZE), n_pool, seed, out)
    return [Path(d["file_name"]) for d in dicts], np.array([bool(d["annotations"]) for d in dicts])


def score(p_ship: np.ndarray, has_ship: np.ndarray, threshold: float) -> dict:
    at_1pct = np.quantile(p_ship[~has_ship], 0.99)
    return {"roc_auc": float(roc_auc_score(has_ship, p_ship)),
            "ships_at_fpr_1pct": float((p_ship[has_ship] > at_1pct).mean()),
            "ships_passing": float((p_ship[has_ship] >= threshold).mean()),
            "ship_free_passing": float((p_ship[~has_ship] >= threshold).mean())}


def main(args) -> int:
    logging.basicConfig(level=logging.WARNING)
    out = Path(args.out)
    base = module_config.get_cfg(args.config, list(args.opts or []))
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
          f"classifier {base.CLASSIFIER.ARCH} x{base.CLASSIFIER.WIDTH} at {base.CLASSIFIER.IMAGE_SIZE} px, "
          f"budget {base.CLASSIFIER.TIME_BUDGET_MIN} min (epochs {base.CLASSIFIER.EPOCHS} without one)")
    module_synthetic.prepare_synthetic_input(base)
    pool, has_ship = get_pool(base, args.n_pool, args.seed, out)
    print(f"pool: {len(pool)} tiles, {has_ship.sum()} with ships (seed {args.seed})")
    results = {}
    for pair in range(args.pairs):
        for weight in (0.0, args.weight):
            name = f"cells{weight:g}_seed{pair}"
            cfg = module_config.get_cfg(args.config, list(args.opts or []) + [
                "PATHS.RUNS_DIR", str(out), "PATHS.RUN_NAME", name,
                "CLASSIFIER.CELL_LOSS_WEIGHT", str(weight), "CLASSIFIER.SEED", str(pair)])
            train_dicts, val_dicts = module_preprocessing.get_train_val_dicts(cfg)
            started = time.perf_counter()
            paths = module_classifier.train_classifier(cfg, train_dicts, val_dicts, fresh=True)
            seconds = time.perf_counter() - started
            epochs = len(pd.read_csv(paths["history"]))
            p_ship = np.asarray(module_inference.build_p_ship_fn(cfg, paths["export"])(pool), dtype=float)
            results[(pair, weight)] = row = score(p_ship, has_ship, args.threshold)
            print(f"{name}: {epochs} epochs in {seconds:.0f} s; ROC AUC {row['roc_auc']:.4f}; ship tiles passing "
                  f"where 1% of the ship-free do {row['ships_at_fpr_1pct']:.3f}; at {args.threshold}: ship tiles "
                  f"{row['ships_passing']:.3f}, ship-free {row['ship_free_passing']:.4f}", flush=True)
    print(f"\nweight {args.weight:g} against the baseline (weight 0), mean over {args.pairs} pair(s):")
    for key in ("roc_auc", "ships_at_fpr_1pct", "ships_passing", "ship_free_passing"):
        new = np.mean([results[(p, args.weight)][key] for p in range(args.pairs)])
        old = np.mean([results[(p, 0.0)][key] for p in range(args.pairs)])
        print(f"  {key}: {old:.4f} -> {new:.4f} ({new - old:+.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
