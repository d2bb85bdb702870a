#!/usr/bin/env python
"""The scene gate's trade, from one pass: speed against the true ships it drops, for many thresholds.

``bench_detect.py`` measures one gate threshold end to end. This script answers the question
behind it: at which threshold does a gated scene still find every ship the detector finds
ungated, and how fast is it there? Over ``bench_detect.py``'s scene (``--scene rendered`` or
``mosaic``, built the same way and seed), every slice is read once, scored by the gate
(one pass, as ``module_detect`` gates: ``DETECT.GATE_TTA``) and given to the detector alone
(batch 1, timed). Then, for each threshold, from those records:

* the slices passing, and the **estimated** gated time: the gate on every slice plus the detector
  on the passing ones; its ratio against the ungated time (the detector on every slice, the
  baseline, measured in the same pass). Merging and writing (1.5-3 s at 4,096 px) and batching
  are left out, so these ratios run higher than ``bench_detect.py``'s measured ones;
* the true ships found (the mosaic's ground truth, matched one to one at mask IoU >= 0.5, after
  the same merge as ``module_detect``) and how many of those found ungated the gate loses.

Also printed: the highest threshold losing none; the run's scene gate (``DETECT.GATE_SHIP_RECALL``
on its validation ships) and the submission's; and an **oracle gate** passing exactly the slices
that touch a true ship: the most any gate could save on this scene.

    .venv/bin/python bench/bench_gate_sweep.py --config configs/demo.yaml [--run runs/demo] [--overlap 32]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import module_config  # noqa: E402
import module_detect  # noqa: E402
import module_inference  # noqa: E402
from bench import bench_detect  # noqa: E402

THRESHOLDS = (0.95, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.02, 0.01)


def get_args_parser() -> argparse.ArgumentParser:
    parser = bench_detect.add_scene_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--thresholds", default=",".join(map(str, THRESHOLDS)), help="gate thresholds to report")
    parser.add_argument("--out", default=None, help="scratch folder (default runs/<run>/bench_gate_sweep)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def record_slices(cfg, scene: dict, overlap: int) -> tuple[list[dict], float, module_detect.DetectSettings, list]:
    """Every slice's p_ship, detector seconds and detections: ``(records, gate seconds, settings, tiles)``."""
    thresholds = module_inference.get_thresholds(cfg)[0]
    settings = module_detect.get_detect_settings(cfg, thresholds, overlap=overlap)
    info = module_detect.read_scene_info(scene["path"], settings)
    tiles = module_detect.get_tiles(info.height, info.width, settings.tile, settings.overlap)
    p_ship_fn = module_inference.build_p_ship_array_fn(cfg)
    detect_fn = module_inference.build_detect_fn(cfg)
    records, gate_seconds = [], 0.0
    source = module_detect.open_scene(info, settings)
    try:
        for chunk in module_detect._chunks(tiles, settings.chunk_tiles):
            images, valids, kept, _ = module_detect._read_chunk(source, chunk, settings)
            started = time.perf_counter()
            p_ship = p_ship_fn(images) if images else []
            gate_seconds += time.perf_counter() - started
            for image, valid, tile, p in zip(images, valids, kept, p_ship):
                started = time.perf_counter()
                prediction = detect_fn([image])[0]
                seconds = time.perf_counter() - started
                detections = module_detect.tile_detections(prediction, tile, valid, settings.thresholds)
                records.append({"index": tile.index, "p_ship": float(p), "seconds": seconds, "detections": detections})
    finally:
        source.close()
    return records, gate_seconds, settings, tiles


def evaluate(records: list[dict], passed: set, tiles: list, settings, truth: list) -> set:
    """The indices of the true ships found when the detector runs on the ``passed`` slices only."""
    detections = [d for r in records if r["index"] in passed for d in r["detections"]]
    ships = [s.to_json() for s in module_detect.get_ships(detections, tiles, settings)]
    return bench_detect.matched_of(truth, ships, bench_detect.TRUTH_IOU)


def sweep(records: list[dict], gate_seconds: float, tiles: list, settings, truth: list,
          thresholds: list[float], labels: dict | None = None) -> list[dict]:
    """One row per gate threshold (highest first), then the highest threshold losing none of the
    true ships found ungated, then the oracle gate (the slices touching a true ship). A row:
    ``name``, ``threshold`` (None for the oracle), ``slices`` passing, ``ratio`` (estimated:
    ungated detector seconds over the gate's plus the passing slices' detector seconds),
    ``found`` and ``lost`` (true ships found ungated and not gated)."""
    labels = labels or {}
    ungated_seconds = sum(r["seconds"] for r in records)
    found_ungated = evaluate(records, {r["index"] for r in records}, tiles, settings, truth)

    def row(name: str, threshold: float | None, passed: set) -> dict:
        found = evaluate(records, passed, tiles, settings, truth)
        seconds = gate_seconds + sum(r["seconds"] for r in records if r["index"] in passed)
        return {"name": name, "threshold": threshold, "slices": len(passed), "ratio": ungated_seconds / seconds,
                "found": len(found), "lost": len(found_ungated - found)}

    def passing(threshold: float) -> set:
        return {r["index"] for r in records if r["p_ship"] >= threshold}

    rows = [row(f"gate {t:.4g}" + labels.get(t, ""), t, passing(t)) for t in sorted(set(thresholds), reverse=True)]
    # candidates: the p_ship of slices with detections (passing one without changes nothing), highest first
    for threshold in sorted({r["p_ship"] for r in records if r["detections"]}, reverse=True):
        if not found_ungated - evaluate(records, passing(threshold), tiles, settings, truth):
            rows.append(row(f"gate {threshold:.4g} (highest losing none)", threshold, passing(threshold)))
            break
    touching = {t.index for t in tiles for s in truth
                if t.row < s["row"] + s["height"] and s["row"] < t.row + t.height
                and t.col < s["col"] + s["width"] and s["col"] < t.col + t.width}
    rows.append(row("oracle (slices touching a true ship)", None, touching))
    return rows


def main(args) -> int:
    import torch

    cfg = bench_detect.get_cfg(args)
    try:
        module_inference.get_default_weights_path(cfg)
    except FileNotFoundError as exc:
        print(f"SKIPPED: the run has no trained models ({exc}); `make demo` trains the demo's")
        return 0
    out = Path(args.out) if args.out else module_config.get_run_dir(cfg) / "bench_gate_sweep"
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {os.cpu_count()} cores; run {module_config.get_run_dir(cfg)}")
    scene = bench_detect.build_scene(cfg, args.grid, args.sea, args.seed, out, args.scene)
    truth = scene["true_ships"]
    records, gate_seconds, settings, tiles = record_slices(cfg, scene, args.overlap)
    n = len(records)
    ungated_seconds = sum(r["seconds"] for r in records)
    print(f"scene {scene['path']}: {len(scene['ship_cells'])} of {args.grid ** 2} cells with ships, {n} slices of "
          f"{settings.tile} px, overlap {settings.overlap} px; {len(truth)} true ships")
    print(f"ungated (baseline): detector {ungated_seconds:.1f} s on {n} slices ({1000 * ungated_seconds / n:.0f} ms a "
          f"slice, batch 1); the gate {gate_seconds:.1f} s ({1000 * gate_seconds / n:.1f} ms a slice)")
    submission_gate = module_inference.get_thresholds(cfg)[0].classifier
    scene_gate = module_inference.get_scene_thresholds(cfg)[0].classifier
    labels = {submission_gate: " (the submission's gate)", scene_gate: " (the scene gate)"}
    if scene_gate == submission_gate:
        labels[scene_gate] = " (the submission's gate and the scene gate)"
    thresholds = [float(t) for t in args.thresholds.split(",")] + [submission_gate, scene_gate]
    rows = sweep(records, gate_seconds, tiles, settings, truth, thresholds, labels)
    found_ungated = evaluate(records, {r["index"] for r in records}, tiles, settings, truth)
    print(f"  ungated: true ships found {len(found_ungated)} of {len(truth)}")
    for r in rows:
        print(f"  {r['name']:52s} slices {r['slices']:4d} of {n}  est. {r['ratio']:5.2f}x  "
              f"true ships {r['found']:3d}, lost {r['lost']}")
    (out / "sweep.json").write_text(json.dumps({"slices": n, "ungated_seconds": ungated_seconds,
                                                "gate_seconds": gate_seconds, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
