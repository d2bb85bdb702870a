"""bench/bench_detect.py: the matching of instances (plain logic: which ships two lists share), the sweep's
counts, and the rendered scene."""
import numpy as np
import pytest

import module_detect
from bench.bench_detect import match, matched_of, on_ship_cells


def _ship(row, col, height, width, score=1.0, scene=64):
    mask = np.zeros((scene, scene), bool)
    mask[row:row + height, col:col + width] = True
    return module_detect.mask_to_detection(mask, 0, 0, score).to_json()


def test_matched_of_names_the_matched_instances_one_to_one():
    truth = [_ship(2, 2, 6, 10), _ship(30, 30, 8, 4), _ship(50, 10, 5, 5)]
    found = [_ship(2, 2, 6, 9, 0.9),   # the first ship, IoU 0.9
             _ship(30, 30, 8, 1, 0.8),  # a quarter of the second: IoU 0.25
             _ship(2, 3, 6, 9, 0.7)]    # the first ship again: one to one, no second match
    assert matched_of(truth, found, 0.5) == {0}
    assert match(truth, found, 0.5) == 1
    assert matched_of(truth, found, 0.2) == {0, 1}
    assert matched_of(truth, [], 0.5) == set()


def test_on_ship_cells_keeps_the_ships_centred_in_those_cells():
    ships = [_ship(2, 2, 6, 10), _ship(40, 40, 6, 6)]
    assert on_ship_cells(ships, [[0, 0]], 32) == [ships[0]]
    assert on_ship_cells(ships, [[1, 1]], 32) == [ships[1]]


def test_gate_sweep_counts_slices_speed_and_lost_ships_per_threshold():
    from bench.bench_gate_sweep import sweep
    from module_inference import Thresholds

    tiles = module_detect.get_tiles(64, 192, 64, 0)  # three slices in a row
    settings = module_detect.DetectSettings(tile=64, overlap=0, thresholds=Thresholds(0.5, 0.5, 0))
    truth = [_ship(10, 10, 6, 20, scene=192), _ship(20, 80, 8, 8, scene=192)]  # in slices 0 and 1; slice 2 is sea

    def found(index, ship):
        return module_detect.Detection.from_json(dict(ship, tiles=[index]))

    records = [{"index": 0, "p_ship": 0.9, "seconds": 1.0, "detections": [found(0, truth[0])]},
               {"index": 1, "p_ship": 0.3, "seconds": 1.0, "detections": [found(1, truth[1])]},
               {"index": 2, "p_ship": 0.6, "seconds": 1.0, "detections": []}]
    rows = sweep(records, 0.2, tiles, settings, truth, [0.95, 0.5], {0.5: " (the scene gate)"})
    assert [r["name"] for r in rows] == ["gate 0.95", "gate 0.5 (the scene gate)", "gate 0.3 (highest losing none)",
                                         "oracle (slices touching a true ship)"]
    assert [r["slices"] for r in rows] == [0, 2, 3, 2]
    assert [r["lost"] for r in rows] == [2, 1, 0, 0]
    assert [r["found"] for r in rows] == [0, 1, 2, 2]
    assert np.allclose([r["ratio"] for r in rows], [3 / 0.2, 3 / 2.2, 3 / 3.2, 3 / 2.2])


def test_rendered_scene_is_one_georeferenced_scene_with_its_ships_in_the_ship_cells(tmp_path):
    """--scene rendered: a continuous generated GeoTIFF, ships only in the drawn ship cells, its
    true ships (pixel masks in scene coordinates) exactly the ships in the image's labels."""
    import rasterio

    import module_config
    from bench.bench_detect import SCENE_CRS_EPSG, build_scene

    cfg = module_config.get_cfg("configs/tiny.yaml")  # 64 px tiles
    scene = build_scene(cfg, grid=4, sea=0.75, seed=1, out=tmp_path, kind="rendered")
    with rasterio.open(scene["path"]) as src:
        assert (src.width, src.height, src.count, src.dtypes[0]) == (256, 256, 3, "uint8")
        assert src.crs.to_epsg() == SCENE_CRS_EPSG and src.transform.a == 3
        image = src.read()
    assert image.std() > 1  # drawn, not blank
    tile, truth = scene["tile"], scene["true_ships"]
    assert tile == 64 and truth and 1 <= len(scene["ship_cells"]) <= 4  # 4 of 16 cells drawn as ship cells
    cells = {tuple(c) for c in scene["ship_cells"]}
    for ship in truth:
        assert ((ship["row"] + ship["height"] // 2) // tile, (ship["col"] + ship["width"] // 2) // tile) in cells
    assert on_ship_cells(truth, scene["ship_cells"], tile) == truth
    with pytest.raises(SystemExit, match="at most 8192 px"):
        build_scene(cfg, grid=200, sea=0.85, seed=0, out=tmp_path, kind="rendered")


def test_gate_bench_times_each_part_and_the_direct_path_gives_the_baselines_p_ship(tiny_trained, tiny_config,
                                                                                      capsys):
    """bench/bench_gate.py on the tiny run: every part timed, p_ship of the direct path and of
    fastai's test DataLoader identical."""
    from bench.bench_gate import get_args_parser, main

    result = main(get_args_parser().parse_args(["--config", str(tiny_config), "--n", "20", "--rounds", "1",
                                                *tiny_trained.opts]))
    out = capsys.readouterr().out
    assert set(result) == {"baseline_ms", "direct, converting each call_ms", "the gate (direct)_ms", "model alone_ms",
                           "preparation alone_ms", "identity resampling alone_ms"}
    assert all(ms > 0 for ms in result.values())
    assert "max |difference| 0.00e+00" in out and "20 slices of 64 px" in out


@pytest.mark.slow
def test_device_scene_script_runs_every_bench_and_brings_back_their_summaries(tiny_trained, tiny_config, tmp_path):
    """bench/device_scene.sh, the scene benches prepared for a lent GPU, on the tiny run on this CPU:
    bench_gate's printout, and for each scene size bench_detect's summary of the gated and ungated
    runs (SAHI where installed, on the first size only); the scenes themselves are not kept in OUT."""
    import json
    import os
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "out"
    env = dict(os.environ, SCENE_GRIDS="3 4", GATE_SLICES="8")
    result = subprocess.run(["bash", "bench/device_scene.sh", str(out), "--config", str(tiny_config),
                             *tiny_trained.opts], cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "max |difference| 0.00e+00" in (out / "bench_gate.log").read_text()
    for grid in (3, 4):
        summary = json.loads((out / f"bench_detect_grid{grid}.json").read_text())
        assert {"gated", "ungated"} <= set(summary)
        assert grid == 3 or "sahi" not in summary  # SAHI on the first size only
        assert summary["ungated"]["counts"]["tiles_detected"] == summary["ungated"]["counts"]["tiles_total"] > 0
    assert sorted(p.name for p in out.iterdir()) == ["bench_detect_grid3.json", "bench_detect_grid3.log",
                                                      "bench_detect_grid4.json", "bench_detect_grid4.log",
                                                      "bench_gate.log", "device.txt"]
