#!/usr/bin/env python
"""Scene detection on a large, mostly-sea scene: gated against ungated slicing, and against SAHI.

The scene (``--grid`` x ``--grid`` cells, 16 x 16 by default: 4,096 px at the demo's 256 px tiles,
georeferenced, ``--sea`` (85%) of the cells ship-free, the others holding ships, drawn at random,
seeded), one of two kinds (``--scene``):

* ``rendered`` (the default): one continuous scene drawn by the generator of the demo's tiles
  (``module_synthetic.render_scene`` at the scene's size: sea, waves, whitecaps, and the land,
  harbour or clouds it draws for the seed), as many ships in each ship cell as in a generated
  ship tile, JPEG-compressed once as the tiles are. No seams: a slice sees one sea. The
  generator's distractors keep their tile-sized texture over the whole scene, so land comes as
  an archipelago over up to half of it and clouds as a speckle over all of it (at the demo's
  256 px, seeds 5 and 7: land, under 80% open sea; 1: a harbour and clouds; 4: clouds; 0, 2, 3
  and 6: open sea; BENCHMARKS.md).
* ``mosaic``: the run's generated test tiles side by side (the figures before the fourteenth
  session). Unrelated tiles meet at seams that nearly every slice straddles (slices of 256 px at
  a 224 px stride), and the classifier reads seams as structure: with the fourteenth session's
  models, 16.7% of the ship-free slices pass a gate of 0.1 against 5.5% of the same cells
  aligned (BENCHMARKS.md). A harder scene than a real one for the gate.

Three ways over the same scene, with the
same detector weights (the run's best), the same slices (``DATA.IMAGE_SIZE``, ``--overlap``) and
the same score threshold, each in its own process so that its peak RSS is its own:

* **gated**: ``module_detect.detect`` with the run's classifier and tuned thresholds, the gate at
  the scene gate (``DETECT.GATE_SHIP_RECALL``; ``DETECT.GATE_SHIP_RECALL 0``: the submission's gate);
* **ungated**: the same with the classifier threshold at 0 (the detector on every slice);
* **sahi**: SAHI 0.12.8's ``get_sliced_prediction`` over ``Detectron2DetectionModel`` (its
  ``DefaultPredictor``, built from the same detectron2 config and weights, on the same device),
  GREEDYNMM / IOS 0.5 (SAHI's defaults), no full-image pass; the scene read whole with rasterio, as SAHI needs it.

Printed: seconds, slices/s, peak RSS and its rise over the process's RSS once the models are
loaded; ratios against the named baseline; ships found, and agreement: gated against ungated on
the ship-bearing cells, ours against SAHI's everywhere (instances matched one to one, greedily by
score, at mask IoU >= 0.9); and the true ships each finds (the scene's ground truth: the
generator's labels, or the test tiles' truth CSV for the mosaic; matched at mask IoU >= 0.5).

    .venv/bin/python bench/bench_detect.py --config configs/demo.yaml [--run runs/demo] [--grid 16] [KEY VALUE ...]

``SUBMIT.*`` overrides win over the run's tuned thresholds in the gated run (e.g.
``SUBMIT.CLASSIFIER_THRESHOLD 0.5``: the gate's speed against the ships it keeps).

SAHI is only needed here, not by the pipeline; it is not in requirements.txt because it requires
``opencv-python``, which would overwrite the pinned ``opencv-python-headless``. Install it without
its dependencies (it runs with the headless OpenCV): ``.venv/bin/pip install --no-deps sahi==0.12.8``.
Without it the SAHI comparison is skipped with a message.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import module_config  # noqa: E402
import module_detect  # noqa: E402
import module_inference  # noqa: E402
from module_files import atomic_path, list_images, read_segmentation_csv  # noqa: E402
from module_rle import rle_decode  # noqa: E402

METHODS = ("gated", "ungated", "sahi")
SCENES = ("mosaic", "rendered")
RENDERED_MAX_SIDE = 8192  # a rendered scene is drawn whole in memory (float32 layers): 4,096 px takes ~1 GB
MATCH_IOU = 0.9
TRUTH_IOU = 0.5  # the competition's loosest threshold


def add_scene_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The run and the scene's arguments (also bench_gate_sweep.py's: the same scene)."""
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--run", default=None, help="run folder with the models (default the config's)")
    parser.add_argument("--grid", type=int, default=16, help="cells per side of the scene")
    parser.add_argument("--sea", type=float, default=0.85, help="share of ship-free cells")
    parser.add_argument("--overlap", type=int, default=32, help="slice overlap (px)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scene", choices=SCENES, default="rendered",
                        help="mosaic: the run's test tiles side by side; rendered: one continuous generated scene")
    return parser


def get_args_parser() -> argparse.ArgumentParser:
    parser = add_scene_args(argparse.ArgumentParser(description=__doc__.split("\n\n")[0]))
    parser.add_argument("--out", default=None, help="scratch folder (default runs/<run>/bench_detect)")
    parser.add_argument("--methods", default=",".join(METHODS), help="which of gated,ungated,sahi to run")
    parser.add_argument("--method", default=None, help=argparse.SUPPRESS)  # internal: run one method, print JSON
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides: KEY VALUE ...")
    return parser


def get_cfg(args):
    opts = list(args.opts or [])
    if args.run:
        run = Path(args.run)
        opts += ["PATHS.RUNS_DIR", str(run.parent), "PATHS.RUN_NAME", run.name]
    return module_config.get_cfg(args.config, opts)


# ---------------------------------------------------------------- the scene
SCENE_CRS_EPSG = 32631  # UTM 31N, 3 m pixels: a georeferenced scene, as users' are


def scene_transform():
    from affine import Affine

    return Affine.translation(500_000, 4_650_000) * Affine.scale(3, -3)


def build_scene(cfg, grid: int, sea: float, seed: int, out: Path, kind: str = "mosaic") -> dict:
    """The scene GeoTIFF, which cells hold ships and its true ships:
    ``{"path", "tile", "ship_cells": [[r, c], ...], "true_ships": [Detection JSON, ...], ...}``.

    ``mosaic``: the run's generated test tiles side by side, ``1 - sea`` of the cells ship tiles,
    the rest ship-free ones (with their land, harbours and clouds); the tiles are unrelated, so
    nearly every slice straddles a seam between two different scenes. ``rendered``: one continuous
    scene drawn by the generator of those tiles (:func:`build_rendered_scene`)."""
    if kind == "rendered":
        return build_rendered_scene(cfg, grid, sea, seed, out)
    if kind != "mosaic":
        raise ValueError(f"scene {kind!r}: expected one of {SCENES}")
    from rasterio.crs import CRS

    images = list_images(module_config.get_input_path(cfg, cfg.DATA.TEST_IMAGES))
    truth_csv = module_config.get_input_path(cfg, cfg.DATA.TEST_TRUTH_CSV) if cfg.DATA.TEST_TRUTH_CSV else None
    if truth_csv is None or not truth_csv.is_file():
        raise SystemExit("the bench needs the run's test truth (DATA.TEST_TRUTH_CSV): use a generated dataset")
    truth = read_segmentation_csv(truth_csv, "truth")
    with_ships = set(truth.loc[truth["EncodedPixels"] != "", "ImageId"])
    ship_tiles = [p for p in images if p.name in with_ships]
    sea_tiles = [p for p in images if p.name not in with_ships]
    rng = np.random.default_rng(seed)
    cells = grid * grid
    n_ship = max(1, round(cells * (1 - sea)))
    ship_cells = set(map(int, rng.choice(cells, n_ship, replace=False)))
    tile = cfg.DATA.IMAGE_SIZE
    path = out / f"scene_{grid}x{grid}.tif"
    out.mkdir(parents=True, exist_ok=True)
    ship_order = rng.permutation(len(ship_tiles))
    sources, used = [], 0
    for cell in range(cells):
        if cell in ship_cells:
            sources.append(ship_tiles[ship_order[used % len(ship_tiles)]])
            used += 1
        else:
            sources.append(sea_tiles[int(rng.integers(len(sea_tiles)))])
    module_detect.write_mosaic(sources, grid, path, crs=CRS.from_epsg(SCENE_CRS_EPSG), transform=scene_transform())
    rles = truth.loc[truth["EncodedPixels"] != ""].groupby("ImageId")["EncodedPixels"].apply(list)
    true_ships = []
    for cell in sorted(ship_cells):
        r, c = divmod(cell, grid)
        for rle in rles[sources[cell].name]:
            mask = rle_decode(rle, (tile, tile), image_id=sources[cell].name)
            true_ships.append(module_detect.mask_to_detection(mask, r * tile, c * tile, 1.0).to_json())
    return {"path": str(path), "tile": tile, "ship_cells": sorted(divmod(c, grid) for c in ship_cells),
            "n_ship_tiles_available": len(ship_tiles), "true_ships": true_ships}


def build_rendered_scene(cfg, grid: int, sea: float, seed: int, out: Path) -> dict:
    """One continuous generated scene, ``grid`` x ``grid`` cells of ``DATA.IMAGE_SIZE``:
    ``module_synthetic.render_scene`` at the scene's size and the tiles' scale (sea, waves,
    whitecaps, and the land, harbour and clouds it draws for the seed, continuous across the
    scene), its ships within ``1 - sea`` of the cells, drawn at random, as many in each as in a
    generated ship tile (``module_synthetic.ship_count``: one in most, up to 15). JPEG-compressed
    and decoded once, at the generator's quality, so that the models see the textures of the
    tiles they were trained on. No seams: a slice sees one scene. The ship cells returned are
    those holding ship pixels (a cell drawn for ships may get none: land can fill it)."""
    import cv2
    from rasterio.crs import CRS
    import rasterio

    import module_synthetic

    tile = cfg.DATA.IMAGE_SIZE
    side = grid * tile
    if side > RENDERED_MAX_SIDE:
        raise SystemExit(f"--scene rendered draws the scene whole in memory: at most {RENDERED_MAX_SIDE} px a side, "
                         f"not {side} (--grid {grid}); use --scene mosaic for larger scenes")
    rng = np.random.default_rng(seed)
    cells = grid * grid
    n_ship = max(1, round(cells * (1 - sea)))
    region = np.zeros(cells, np.int32)
    region[np.sort(rng.choice(cells, n_ship, replace=False))] = np.arange(1, n_ship + 1)
    region = np.kron(region.reshape(grid, grid), np.ones((tile, tile), np.int32))
    counts = [module_synthetic.ship_count(rng) for _ in range(n_ship)]  # as many as in a generated ship tile
    image, labels = module_synthetic.render_scene(rng, side, side, counts, scale=tile / module_synthetic.KAGGLE_SIZE,
                                                  ship_region=region)
    jpeg = np.frombuffer(module_synthetic.encode_jpeg(image, "the rendered scene"), np.uint8)
    image = cv2.imdecode(jpeg, cv2.IMREAD_COLOR)[..., ::-1]
    path = out / f"scene_{grid}x{grid}_rendered.tif"
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, rasterio.open(
            tmp, "w", driver="GTiff", height=side, width=side, count=3, dtype="uint8",
            crs=CRS.from_epsg(SCENE_CRS_EPSG), transform=scene_transform(), tiled=True, blockxsize=256,
            blockysize=256, compress="deflate") as dst:
        dst.write(np.ascontiguousarray(image.transpose(2, 0, 1)))
    true_ships = []
    for k, box in enumerate(module_synthetic.label_boxes(labels, int(labels.max())), start=1):
        if box is not None:
            detection = module_detect.mask_to_detection(labels[box] == k, box[0].start, box[1].start, 1.0)
            true_ships.append(detection.to_json())
    has_ship = labels.reshape(grid, tile, grid, tile).any(axis=(1, 3))
    return {"path": str(path), "tile": tile, "ship_cells": [list(map(int, rc)) for rc in np.argwhere(has_ship)],
            "true_ships": true_ships, "scene": "rendered"}


# ---------------------------------------------------------------- one method, in its own process
def rss_mb() -> float:
    from module_progress import peak_rss_mb

    return peak_rss_mb()


def run_ours(cfg, scene: dict, gated: bool, out: Path, overlap: int, opts=()) -> dict:
    # SUBMIT.* keys given on the command line (e.g. another gate threshold) win over the tuned ones
    overrides = list(opts) if gated else ["SUBMIT.CLASSIFIER_THRESHOLD", "0"]
    thresholds = module_inference.get_scene_thresholds(cfg, overridden=overrides)[0]  # what detect gates at
    detect_fn = module_inference.build_detect_fn(cfg, thresholds=thresholds)
    p_ship_fn = module_inference.build_p_ship_array_fn(cfg) if gated and thresholds.classifier > 0 else None
    run_cfg = cfg
    if not gated:
        run_cfg = cfg.clone()
        run_cfg.defrost()
        run_cfg.SUBMIT.CLASSIFIER_THRESHOLD = 0.0
        run_cfg.freeze()
    base = rss_mb()
    started = time.perf_counter()
    result = module_detect.detect(run_cfg, [scene["path"]], out=out, overlap=overlap, detect_fn=detect_fn,
                                  p_ship_fn=p_ship_fn, overridden=overrides, progress=False)
    seconds = time.perf_counter() - started
    ships = [s.to_json() for s in result.scenes[0].ships]
    return {"seconds": seconds, "base_mb": base, "peak_mb": rss_mb(), "counts": result.scenes[0].counts,
            "ships": ships, "thresholds": thresholds.as_config(), "step_seconds": result.report["totals"]["step_seconds"]}


def run_sahi(cfg, scene: dict, overlap: int) -> dict:
    import cv2
    import rasterio
    from sahi.models.detectron2 import Detectron2DetectionModel
    from sahi.predict import get_sliced_prediction

    thresholds = module_inference.get_thresholds(cfg)[0]
    weights = module_inference.get_default_weights_path(cfg)
    model_cfg = module_config.get_model_cfg(cfg)
    config_path = Path(scene["path"]).with_name("sahi_model_config.yaml")
    config_path.write_text(model_cfg.dump())
    import torch

    # what module_inference.load_detector predicts at, on the device it loads to (MODEL.DEVICE: cuda
    # where there is one; until the fifteenth session SAHI ran on the CPU even on a GPU machine)
    input_size, _ = module_inference.get_input_sizes(cfg, torch.load(weights, map_location="cpu", weights_only=False))
    model = Detectron2DetectionModel(model_path=str(weights), config_path=str(config_path),
                                     confidence_threshold=thresholds.score, image_size=input_size,
                                     device=cfg.MODEL.DEVICE,
                                     category_mapping={"0": "ship"}, load_at_init=True)
    tile = scene["tile"]
    base = rss_mb()
    started = time.perf_counter()
    with rasterio.open(scene["path"]) as src:
        image = np.ascontiguousarray(src.read().transpose(1, 2, 0))
    result = get_sliced_prediction(image, model, slice_height=tile, slice_width=tile,
                                   overlap_height_ratio=overlap / tile, overlap_width_ratio=overlap / tile,
                                   perform_standard_pred=False, postprocess_type="GREEDYNMM",
                                   postprocess_match_metric="IOS", postprocess_match_threshold=0.5, verbose=0)
    seconds = time.perf_counter() - started
    peak = rss_mb()
    ships = []
    for prediction in result.object_prediction_list:
        x0, y0, x1, y1 = (int(round(v)) for v in prediction.bbox.to_xyxy())
        x0, y0 = max(0, x0 - 1), max(0, y0 - 1)
        crop = np.zeros((y1 - y0 + 2, x1 - x0 + 2), np.uint8)
        for polygon in prediction.mask.segmentation:
            points = np.asarray(polygon, np.float64).reshape(-1, 2) - [x0, y0]
            cv2.fillPoly(crop, [np.round(points).astype(np.int32)], 1)
        ship = module_detect.mask_to_detection(crop.astype(bool), y0, x0, float(prediction.score.value))
        if ship is not None:
            ships.append(ship.to_json())
    n_slices = len(module_detect.get_tiles(image.shape[0], image.shape[1], tile, overlap))
    return {"seconds": seconds, "base_mb": base, "peak_mb": peak, "counts": {"tiles_total": n_slices,
            "tiles_detected": n_slices, "ships": len(ships)}, "ships": ships}


# ---------------------------------------------------------------- agreement
def match(a: list, b: list, iou: float = MATCH_IOU) -> int:
    """Instances of ``a`` and ``b`` (Detection JSON) matched one to one, greedily by ``a``'s score, at mask IoU >= ``iou``."""
    return len(matched_of(a, b, iou))


def matched_of(a: list, b: list, iou: float = MATCH_IOU) -> set:
    """The indices into ``a`` of the instances :func:`match` matches."""
    ships_a = [module_detect.Detection.from_json(s) for s in a]
    ships_b = [module_detect.Detection.from_json(s) for s in b]
    masks_b = [s.decode() for s in ships_b]
    used = set()
    matched = set()
    for index, ship in sorted(enumerate(ships_a), key=lambda item: -item[1].score):
        mask = ship.decode()
        best, best_iou = None, 0.0
        for k, (other, other_mask) in enumerate(zip(ships_b, masks_b)):
            if k in used:
                continue
            r0, c0 = min(ship.row, other.row), min(ship.col, other.col)
            r1 = max(ship.row + ship.height, other.row + other.height)
            c1 = max(ship.col + ship.width, other.col + other.width)
            if r1 - r0 > ship.height + other.height or c1 - c0 > ship.width + other.width:
                continue  # boxes apart
            canvas_a = np.zeros((r1 - r0, c1 - c0), bool)
            canvas_b = np.zeros_like(canvas_a)
            canvas_a[ship.row - r0:ship.row - r0 + ship.height, ship.col - c0:ship.col - c0 + ship.width] = mask
            canvas_b[other.row - r0:other.row - r0 + other.height, other.col - c0:other.col - c0 + other.width] = other_mask
            union = np.count_nonzero(canvas_a | canvas_b)
            value = np.count_nonzero(canvas_a & canvas_b) / union if union else 0.0
            if value > best_iou:
                best, best_iou = k, value
        if best is not None and best_iou >= iou:
            used.add(best)
            matched.add(index)
    return matched


def on_ship_cells(ships: list, cells: list, tile: int) -> list:
    """The ships whose bounding-box centre lies in a ship-bearing cell."""
    wanted = {tuple(c) for c in cells}
    return [s for s in ships if ((s["row"] + s["height"] // 2) // tile, (s["col"] + s["width"] // 2) // tile) in wanted]


# ---------------------------------------------------------------- driver
def main(args) -> int:
    cfg = get_cfg(args)
    out = Path(args.out) if args.out else module_config.get_run_dir(cfg) / "bench_detect"
    if args.method:
        scene = json.loads((out / "scene.json").read_text())
        if args.method == "sahi":
            result = run_sahi(cfg, scene, args.overlap)
        else:
            result = run_ours(cfg, scene, args.method == "gated", out / args.method, args.overlap, args.opts or ())
        (out / f"{args.method}.json").write_text(json.dumps(result))
        return 0
    import torch

    try:
        module_inference.get_default_weights_path(cfg)
    except FileNotFoundError as exc:
        print(f"SKIPPED: the run has no trained models to benchmark ({exc}); `make demo` trains the demo's")
        return 0
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, {os.cpu_count()} cores")
    thresholds, sources = module_inference.get_scene_thresholds(cfg, overridden=args.opts or ())
    print(f"run {module_config.get_run_dir(cfg)}: detector {module_inference.get_default_weights_path(cfg)}, "
          f"thresholds {thresholds} ({sources}); the submission's gate "
          f"{module_inference.get_thresholds(cfg, overridden=args.opts or ())[0].classifier}")
    scene = build_scene(cfg, args.grid, args.sea, args.seed, out, args.scene)
    (out / "scene.json").write_text(json.dumps(scene))
    side = args.grid * scene["tile"]
    print(f"scene {scene['path']}: {side} x {side} px, {len(scene['ship_cells'])} of {args.grid ** 2} cells with "
          f"ships ({1 - len(scene['ship_cells']) / args.grid ** 2:.0%} without; land and clouds as drawn), "
          f"slices {scene['tile']} px, overlap {args.overlap} px")
    methods = [m for m in args.methods.split(",") if m]
    if "sahi" in methods:
        import importlib.util

        if importlib.util.find_spec("sahi") is None:
            print("SAHI is not installed: `.venv/bin/pip install --no-deps sahi==0.12.8` (see the docstring); "
                  "skipping the SAHI comparison")
            methods.remove("sahi")
    results = {}
    for method in methods:
        command = [sys.executable, __file__, "--config", args.config, "--overlap", str(args.overlap),
                   "--out", str(out), "--method", method]
        if args.run:
            command += ["--run", args.run]
        done = subprocess.run(command + list(args.opts or []), cwd=ROOT, capture_output=True, text=True)
        if done.returncode:
            print(done.stderr[-4000:])
            raise SystemExit(f"{method} failed")
        results[method] = json.loads((out / f"{method}.json").read_text())
        r = results[method]
        print(f"{method:8s} {r['seconds']:8.1f} s  {r['counts']['tiles_total'] / r['seconds']:6.2f} slices/s  "
              f"detector on {r['counts'].get('tiles_detected')} of {r['counts']['tiles_total']} slices  "
              f"ships {len(r['ships'])}  peak RSS {r['peak_mb']:.0f} MB (+{r['peak_mb'] - r['base_mb']:.0f} MB "
              f"over {r['base_mb']:.0f} MB with the models loaded)")
        if "step_seconds" in r:
            print("         time by step: " + ", ".join(f"{k} {v:.1f} s" for k, v in r["step_seconds"].items()))
    if "gated" in results and "ungated" in results:
        gated, ungated = results["gated"], results["ungated"]
        print(f"gated vs ungated (baseline): {ungated['seconds'] / gated['seconds']:.2f}x faster (goal >= 3x)")
        a = on_ship_cells(gated["ships"], scene["ship_cells"], scene["tile"])
        b = on_ship_cells(ungated["ships"], scene["ship_cells"], scene["tile"])
        print(f"  ships on the ship-bearing cells: gated {len(a)}, ungated {len(b)}, matched {match(a, b)} "
              f"(IoU >= {MATCH_IOU}); on open sea: gated {len(gated['ships']) - len(a)}, "
              f"ungated {len(ungated['ships']) - len(b)}")
    truth = scene.get("true_ships", [])
    if truth:
        found = {name: matched_of(truth, r["ships"], TRUTH_IOU) for name, r in results.items()}
        print(f"  true ships found (the scene's ground truth, matched one to one at mask IoU >= {TRUTH_IOU}): "
              + ", ".join(f"{name} {len(n)}" for name, n in found.items()) + f" of {len(truth)}"
              + (f"; found by ungated and missed by gated: {len(found['ungated'] - found['gated'])}, "
                 f"by gated and not ungated: {len(found['gated'] - found['ungated'])}"
                 if {"gated", "ungated"} <= found.keys() else ""))
    if "sahi" in results and "gated" in results:
        for name in ("gated", "ungated"):
            if name not in results:
                continue
            ours, sahi_result = results[name], results["sahi"]
            print(f"{name} vs SAHI get_sliced_prediction (baseline): {sahi_result['seconds'] / ours['seconds']:.2f}x "
                  f"faster (goal >= 2x); peak RSS {ours['peak_mb'] / sahi_result['peak_mb']:.2f} of SAHI's, rise "
                  f"over the loaded models {(ours['peak_mb'] - ours['base_mb']) / max(1e-9, sahi_result['peak_mb'] - sahi_result['base_mb']):.2f} "
                  f"of SAHI's (goal <= 0.5)")
            matched = match(ours["ships"], sahi_result["ships"])
            loose = match(ours["ships"], sahi_result["ships"], 0.5)
            print(f"  agreement: {matched} matched at IoU >= {MATCH_IOU} ({loose} at IoU >= 0.5) of "
                  f"{len(ours['ships'])} ours and {len(sahi_result['ships'])} SAHI's")
    (out / "summary.json").write_text(json.dumps({m: {k: v for k, v in r.items() if k != "ships"}
                                                  for m, r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
