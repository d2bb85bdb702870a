"""module_detect: scenes of any size, sliced and gated, merged across slice borders, measured, written.

Real libraries throughout (rasterio, shapely, pycocotools, OpenCV, detectron2, fastai). The models
are either the real tiny run of ``configs/tiny.yaml`` (conftest's ``tiny_trained``: its classifier,
and its detector with the mask head's bias raised so that its masks are not empty) through
``load_detector``/``predict_instances``, or, where the unit under test is the slicing, merging or
measuring, a fake detector whose output is known: every connected region of pixels that differ
from the sea is one ship.

Scenes are mosaics of real Kaggle tiles (``airbus_images``) and real ships cut out with their
masks (``airbus_truth_csv``), or synthetic rectangles at known angles; GeoTIFFs are written with
rasterio with a known CRS and transform.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import rasterio
import rasterio.warp
from affine import Affine
from PIL import Image
from rasterio.crs import CRS
from rasterio.features import rasterize

import module_detect as md
import module_inference
from module_files import read_image, read_segmentation_csv
from module_rle import rle_decode

SEA = (0, 255, 0)  # a colour no real ship pixel has: the fake detector's background
UTM_31N = CRS.from_epsg(32631)


# ---------------------------------------------------------------- helpers
def fake_detect_fn(is_ship=None, calls: list | None = None):
    """A detector whose output is known: each 8-connected region of ship pixels is one instance
    (``is_ship(image) -> (H, W) bool``; default: pixels that differ from :data:`SEA`), scored by
    its size (bigger first); masks at the image size, as ``predict_instances`` gives them."""
    is_ship = is_ship or (lambda image: np.any(image != np.array(SEA, np.uint8), axis=2))

    def detect(images):
        if calls is not None:
            calls.append(len(images))
        out = []
        for image in images:
            count, labels = cv2.connectedComponents(is_ship(image).astype(np.uint8), connectivity=8)
            masks = np.stack([labels == k for k in range(1, count)]) if count > 1 else \
                np.zeros((0, *image.shape[:2]), bool)
            scores = np.array([0.5 + 0.4 * min(1.0, m.sum() / 5000) for m in masks], np.float32)
            order = np.argsort(-scores, kind="stable")
            out.append({"masks": masks[order], "scores": scores[order]})
        return out

    return detect


def scene_masks(ships, height: int, width: int) -> np.ndarray:
    """``(N, H, W)`` bool of :class:`module_detect.Detection` ships (tests only: small scenes)."""
    out = np.zeros((len(ships), height, width), bool)
    for k, ship in enumerate(ships):
        out[k, ship.row:ship.row + ship.height, ship.col:ship.col + ship.width] = ship.decode()
    return out


def write_geotiff(path: Path, bands: np.ndarray, crs=None, transform=None, nodata=None, **profile) -> Path:
    """Write ``bands`` ``(C, H, W)`` as a tiled GeoTIFF (CRS and transform optional)."""
    count, height, width = bands.shape
    options = dict(driver="GTiff", height=height, width=width, count=count, dtype=bands.dtype.name,
                   crs=crs, transform=transform or Affine.identity(), nodata=nodata, tiled=True,
                   blockxsize=256, blockysize=256, **profile)
    with rasterio.open(path, "w", **options) as dst:
        dst.write(bands)
    return path


def rotated_rectangle(shape, centre, length, width, heading_deg) -> np.ndarray:
    """``(H, W)`` bool: pixels whose centre lies in the rectangle ``length`` x ``width`` at
    ``centre`` (x, y), its long side ``heading_deg`` clockwise from image up."""
    theta = np.radians(heading_deg)
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    dx, dy = xs - centre[0], ys - centre[1]
    along = dx * np.sin(theta) - dy * np.cos(theta)
    across = dx * np.cos(theta) + dy * np.sin(theta)
    return (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)


def sea_scene(height: int, width: int) -> np.ndarray:
    scene = np.empty((height, width, 3), np.uint8)
    scene[:] = SEA
    return scene


@pytest.fixture()
def fake_cfg(tiny_cfg):
    """The tiny config, ungated, score threshold 0.5, no minimum area (the fake's scores are >= 0.5)."""
    return lambda *overrides: tiny_cfg("SUBMIT.CLASSIFIER_THRESHOLD", "0", "SUBMIT.SCORE_THRESHOLD", "0.5",
                                       "SUBMIT.MIN_AREA", "0", *overrides)


@pytest.fixture(scope="module")
def real_tiles(airbus_images, airbus_truth_csv):
    """Four real 768 px tiles with ships (name, RGB, their ship masks), in file-name order."""
    truth = read_segmentation_csv(airbus_truth_csv, "truth")
    with_ships = sorted(truth.loc[truth["EncodedPixels"] != "", "ImageId"].unique())[:4]
    tiles = []
    for name in with_ships:
        masks = [rle_decode(r).astype(bool) for r in truth.loc[truth["ImageId"] == name, "EncodedPixels"]]
        tiles.append((name, read_image(airbus_images / name), masks))
    return tiles


@pytest.fixture(scope="module")
def real_ship(real_tiles):
    """A real ship cut out of its tile with its mask: ``(RGB crop, mask crop)``, one 4-connected
    region 36-60 px long, turned so that its long side is horizontal."""
    for _, image, masks in real_tiles:
        for mask in masks:
            rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
            crop = mask[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            pixels = image[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]
            if crop.shape[0] > crop.shape[1]:
                crop, pixels = crop.T, pixels.transpose(1, 0, 2)
            if 36 <= crop.shape[1] <= 60 and cv2.connectedComponents(crop.astype(np.uint8), connectivity=4)[0] == 2:
                if not np.any(np.all(pixels[crop] == SEA, axis=1)):
                    return np.ascontiguousarray(pixels), np.ascontiguousarray(crop)
    pytest.skip("no suitable ship in the sample")


@pytest.fixture(scope="module")
def biased_detector(tiny_trained, tmp_path_factory) -> Path:
    """The tiny run's detector with +1 on its mask head's bias: three training iterations leave
    every mask logit below 0 (empty masks); raised, the masks fill the boxes, as a real model's do."""
    import torch

    from module_config import get_detector_path

    checkpoint = torch.load(get_detector_path(tiny_trained.cfg, "best"), map_location="cpu", weights_only=False)
    checkpoint["model"]["roi_heads.mask_head.predictor.bias"] += 1.0
    path = tmp_path_factory.mktemp("detector") / "model_biased.pth"
    torch.save(checkpoint, path)
    return path


@pytest.fixture(scope="module")
def tiny_run_cfg(tiny_trained, tiny_config):
    """The tiny trained run's config; detections from score 0.1 (its scores are low), min area 30."""
    import module_config

    return lambda *overrides: module_config.get_cfg(tiny_config, [*tiny_trained.opts, "SUBMIT.SCORE_THRESHOLD", "0.1",
                                                                  "SUBMIT.MIN_AREA", "30", *overrides])


# ---------------------------------------------------------------- slicing, RLE, measures: plain logic
@pytest.mark.parametrize("length, tile, overlap, expected", [
    (100, 100, 20, [0]),  # one slice
    (60, 100, 20, [0]),  # smaller than a slice: padded
    (300, 100, 0, [0, 100, 200]),  # aligned, no overlap
    (300, 100, 20, [0, 80, 160, 200]),  # the last one moved back to the edge
    (260, 100, 20, [0, 80, 160]),
])
def test_tile_origins(length, tile, overlap, expected):
    assert md.get_tile_origins(length, tile, overlap) == expected


def test_tiles_cover_the_scene_row_by_row():
    tiles = md.get_tiles(250, 130, 100, 30)
    assert [(t.row, t.col) for t in tiles] == [(0, 0), (0, 30), (70, 0), (70, 30), (140, 0), (140, 30),
                                               (150, 0), (150, 30)]
    assert [t.index for t in tiles] == list(range(8))
    covered = np.zeros((250, 130), int)
    for t in tiles:
        covered[t.row:t.row + t.height, t.col:t.col + t.width] += 1
    assert covered.min() == 1


def test_scene_rle_equals_pycocotools_on_the_dense_mask():
    from pycocotools import mask as mask_util

    rng = np.random.default_rng(0)
    height, width = 37, 23  # asymmetric: a transposition fails
    for trial in range(300):
        mask = np.zeros((height, width), bool)
        r0, c0 = rng.integers(0, height), rng.integers(0, width)
        h, w = rng.integers(1, height - r0 + 1), rng.integers(1, width - c0 + 1)
        mask[r0:r0 + h, c0:c0 + w] = rng.random((h, w)) < 0.6 if trial % 3 else True
        ship = md.mask_to_detection(mask, 0, 0, 0.9)
        if ship is None:
            continue
        dense = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
        assert md.scene_rle(ship, height, width)["counts"] == dense["counts"].decode(), trial


@pytest.mark.parametrize("heading", [0, 13, 30, 45, 72, 90, 118, 151, 179])
@pytest.mark.parametrize("length, width", [(60, 12), (100, 20), (150, 25)])
def test_rotated_rectangle_length_width_and_heading(heading, length, width):
    """Within 1 px and 1 degree (the pixel grid quantises a small ship's heading: 4 degrees at worst for 24 x 6 px)."""
    mask = rotated_rectangle((260, 240), (121.3, 128.6), length, width, heading)
    measures = md.measure_mask(mask)
    assert abs(measures["length_px"] - length) <= 1.0
    assert abs(measures["width_px"] - width) <= 1.0
    assert abs((measures["heading_deg"] - heading + 90) % 180 - 90) <= 1.0
    assert abs(measures["centre_x_px"] - 121.3) <= 0.5 and abs(measures["centre_y_px"] - 128.6) <= 0.5
    assert measures["area_px"] == mask.sum()


def test_measures_of_an_axis_aligned_box_by_hand():
    mask = np.zeros((10, 20), bool)
    mask[2:5, 3:15] = True  # 3 rows x 12 columns: a horizontal ship
    measures = md.measure_mask(mask, row=100, col=200)
    assert measures["area_px"] == 36
    assert measures["heading_deg"] == pytest.approx(90.0)
    assert measures["centre_x_px"] == pytest.approx(200 + 9.0) and measures["centre_y_px"] == pytest.approx(100 + 3.5)
    # pixel centres span 11 x 2; half a pixel is added (RECTANGLE_GROWTH_PX)
    assert measures["length_px"] == pytest.approx(11.5) and measures["width_px"] == pytest.approx(2.5)


def test_remove_overlaps_is_resolve_overlaps_on_crops():
    """Same semantics as the submission's overlap removal, without dense scene masks."""
    rng = np.random.default_rng(1)
    height, width = 60, 45
    for trial in range(30):
        masks = []
        for _ in range(6):
            mask = np.zeros((height, width), bool)
            r, c = rng.integers(0, height - 10), rng.integers(0, width - 10)
            mask[r:r + rng.integers(2, 20), c:c + rng.integers(2, 20)] = True
            masks.append(mask)
        scores = rng.choice([0.9, 0.8, 0.7, 0.6], size=6).astype(np.float32)  # ties too
        order = np.argsort(-scores, kind="stable")
        ships = [md.mask_to_detection(masks[k], 0, 0, scores[k]) for k in order]
        expected, expected_scores = module_inference.resolve_overlaps(np.stack(masks), scores, min_area=25)
        kept = md.remove_overlaps(ships, min_area=25)
        np.testing.assert_array_equal(scene_masks(kept, height, width), expected)
        np.testing.assert_array_equal([s.score for s in kept], expected_scores)


def test_merge_joins_pieces_in_the_band_and_keeps_neighbours_apart():
    tiles = md.get_tiles(100, 180, 100, 20)  # two slices: columns 0-99 and 80-179, band 80-99
    assert [(t.col, t.width) for t in tiles] == [(0, 100), (80, 100)]
    ship = np.zeros((100, 180), bool)
    ship[40:46, 60:130] = True  # crosses the band
    other = np.zeros((100, 180), bool)
    other[48:52, 82:96] = True  # inside the band, next to it: seen by both slices
    pieces = []
    for tile in tiles:
        window = (slice(tile.row, tile.row + tile.height), slice(tile.col, tile.col + tile.width))
        for mask, score in ((ship, 0.9), (other, 0.7)):
            pieces.append(md.mask_to_detection(mask[window], tile.row, tile.col, score, (tile.index,)))
    merged = md.merge_detections(pieces, tiles, merge_iou=0.5)
    assert len(merged) == 2
    np.testing.assert_array_equal(scene_masks(merged, 100, 180), np.stack([ship, other]))
    assert [m.tiles for m in merged] == [(0, 1), (0, 1)]
    # no overlap band: the cut ship stays two pieces
    tiles = md.get_tiles(100, 200, 100, 0)
    pieces = [md.mask_to_detection(np.pad(ship, ((0, 0), (0, 20)))[:, t.col:t.col + 100], 0, t.col, 0.9, (t.index,))
              for t in tiles]
    assert len(md.merge_detections(pieces, tiles, 0.5)) == 2


# ---------------------------------------------------------------- 1. a scene from real tiles
@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_write_mosaic_lays_tiles_row_by_row_and_pads_the_short_row(real_tiles, tmp_path, suffix):
    """Three real tiles, two per row: tile k at (k // 2, k % 2) * 768, black in the missing cell;
    the GeoTIFF keeps the CRS and transform it was given."""
    paths = []
    for name, image, _ in real_tiles[:3]:
        Image.fromarray(image).save(tmp_path / f"{name}.png")
        paths.append(tmp_path / f"{name}.png")
    transform = Affine.translation(500_000, 4_650_000) * Affine.scale(3, -3)
    out = md.write_mosaic(paths, 2, tmp_path / f"scene{suffix}", crs=UTM_31N, transform=transform)
    if suffix == ".tif":
        with rasterio.open(out) as src:
            assert src.crs == UTM_31N and src.transform == transform
            scene = src.read().transpose(1, 2, 0)
    else:
        scene = np.asarray(Image.open(out).convert("RGB"))
    assert scene.shape == (1536, 1536, 3)
    for k, (_, image, _) in enumerate(real_tiles[:3]):
        row, col = divmod(k, 2)
        np.testing.assert_array_equal(scene[row * 768:(row + 1) * 768, col * 768:(col + 1) * 768], image)
    assert not scene[768:, 768:].any()
    assert not list(tmp_path.glob("*.tmp*")), "written atomically, nothing left behind"


@pytest.mark.parametrize("merge_ios, min_expected", [(0.0, 10), (0.3, 3)])
def test_mosaic_without_overlap_gives_the_per_tile_predictions_shifted(real_tiles, tiny_run_cfg, biased_detector,
                                                                       tmp_path, merge_ios, min_expected):
    """End to end through load_detector / predict_instances: aligned slices, no overlap -> exactly
    what predicting each tile alone gives (``apply_thresholds``), shifted by the tile's offset;
    with and without merging each tile's fragments of a ship (``SUBMIT.MERGE_IOS``)."""
    cfg = tiny_run_cfg("SUBMIT.CLASSIFIER_THRESHOLD", "0", "SUBMIT.MERGE_IOS", str(merge_ios))
    offsets = [(0, 0), (0, 768), (768, 0), (768, 768)]
    mosaic = np.zeros((1536, 1536, 3), np.uint8)
    for (_, image, _), (row, col) in zip(real_tiles, offsets):
        mosaic[row:row + 768, col:col + 768] = image
    Image.fromarray(mosaic).save(tmp_path / "mosaic.png")

    result = md.detect(cfg, [tmp_path / "mosaic.png"], out=tmp_path / "out", tile=768, overlap=0,
                       weights=biased_detector, progress=False)
    scene = result.scenes[0]
    assert scene.counts == {"tiles_total": 4, "tiles_nodata": 0, "tiles_gated_out": 0, "tiles_detected": 4,
                            "ships": len(scene.ships), "merge_seconds": scene.counts["merge_seconds"]}

    model = module_inference.load_detector(cfg, biased_detector)
    thresholds = module_inference.get_thresholds(cfg)[0]
    predictions = module_inference.predict_instances(model, [t[1] for t in real_tiles],
                                                     batch_size=cfg.SUBMIT.BATCH_SIZE,
                                                     **module_inference.get_merge_args(cfg))
    expected = []
    for prediction, (row, col) in zip(predictions, offsets):
        masks, scores = module_inference.apply_thresholds(prediction, thresholds)
        expected += [(float(s), md.mask_to_detection(m, row, col, s)) for m, s in zip(masks, scores)]
    assert len(expected) > min_expected, "the tiny detector should find something on real tiles"
    key = (lambda d: (-d.score, d.row, d.col))
    expected_ships = sorted((d for _, d in expected), key=key)
    got = sorted(scene.ships, key=key)
    assert [(d.score, d.row, d.col, d.height, d.width, d.mask["counts"]) for d in got] == \
        [(d.score, d.row, d.col, d.height, d.width, d.mask["counts"]) for d in expected_ships]
    coco = json.loads((tmp_path / "out" / "mosaic_coco.json").read_text())
    assert len(coco) == len(expected_ships) and {c["image_id"] for c in coco} == {"mosaic"}


def _paste(scene: np.ndarray, pixels: np.ndarray, crop: np.ndarray, centre: tuple[int, int]) -> np.ndarray:
    """Paste the ship centred at ``centre`` (row, col); returns its mask in the scene."""
    truth = np.zeros(scene.shape[:2], bool)
    row, col = centre[0] - crop.shape[0] // 2, centre[1] - crop.shape[1] // 2
    truth[row:row + crop.shape[0], col:col + crop.shape[1]] = crop
    scene[truth] = pixels[crop]
    return truth


@pytest.mark.parametrize("place, centre, n_tiles", [
    ("cut by one slice's border, whole in the other", (60, 256), 2),
    ("cut by both slices' borders", (60, 240), 2),
    ("in the corner of four slices", (240, 240), 4),
])
def test_a_ship_across_a_slice_border_is_one_feature(real_ship, fake_cfg, tmp_path, place, centre, n_tiles):
    """A real ship pasted across slice borders (tile 256, overlap 32: slices at 0 and 224, band
    224..255): one feature, its mask exactly the pasted one."""
    pixels, crop = real_ship
    scene = sea_scene(480, 480)
    truth = _paste(scene, pixels, crop, centre)
    Image.fromarray(scene).save(tmp_path / "scene.png")

    result = md.detect(fake_cfg(), [tmp_path / "scene.png"], out=tmp_path / "out", tile=256, overlap=32,
                       detect_fn=fake_detect_fn(), progress=False)
    ships = result.scenes[0].ships
    assert len(ships) == 1
    np.testing.assert_array_equal(scene_masks(ships, 480, 480)[0], truth)
    assert len(ships[0].tiles) == n_tiles
    features = json.loads((tmp_path / "out" / "scene.geojson").read_text())["features"]
    assert len(features) == 1 and features[0]["properties"]["area_px"] == truth.sum()


def test_without_overlap_a_slice_border_cuts_the_ship(real_ship, fake_cfg, tmp_path):
    pixels, crop = real_ship
    scene = sea_scene(512, 512)
    _paste(scene, pixels, crop, (60, 256))  # slices at 0 and 256: the border at 256 cuts it
    Image.fromarray(scene).save(tmp_path / "cut.png")
    result = md.detect(fake_cfg(), [tmp_path / "cut.png"], out=tmp_path / "out", tile=256, overlap=0,
                       detect_fn=fake_detect_fn(), progress=False)
    assert len(result.scenes[0].ships) >= 2


def test_a_duplicate_inside_the_band_is_removed_and_sea_tiles_are_gated(fake_cfg, tmp_path):
    scene = sea_scene(256, 448)  # slices at columns 0 and 192
    ship = rotated_rectangle((256, 448), (224, 128), 40, 8, 30)  # wholly inside the band 192..255
    scene[ship] = (200, 200, 200)
    Image.fromarray(scene).save(tmp_path / "dup.png")
    seen = []

    def gate(images):  # a fake gate: p_ship 1 where any pixel is not sea
        seen.append(len(images))
        return np.array([float(np.any(img != np.array(SEA, np.uint8))) for img in images])

    calls = []
    result = md.detect(fake_cfg("SUBMIT.CLASSIFIER_THRESHOLD", "0.5"), [tmp_path / "dup.png"], out=tmp_path / "o",
                       tile=256, overlap=64, detect_fn=fake_detect_fn(calls=calls), p_ship_fn=gate, progress=False)
    assert len(result.scenes[0].ships) == 1 and result.scenes[0].ships[0].tiles == (0, 1)
    assert sum(seen) == 2 and sum(calls) == 2
    # a scene of sea: every slice gated out, the detector never called
    Image.fromarray(sea_scene(256, 448)).save(tmp_path / "sea.png")
    calls.clear()
    result = md.detect(fake_cfg("SUBMIT.CLASSIFIER_THRESHOLD", "0.5"), [tmp_path / "sea.png"], out=tmp_path / "o",
                       tile=256, overlap=64, detect_fn=fake_detect_fn(calls=calls), p_ship_fn=gate, progress=False)
    assert result.scenes[0].counts["tiles_gated_out"] == 2 and calls == []
    report = json.loads(result.report_path.read_text())
    assert report["totals"]["tiles_total"] == report["totals"]["tiles_gated_out"] == 2
    assert report["totals"]["tiles_detected"] == report["totals"]["ships"] == 0
    # where the time went: the gate ran, the detector never did
    steps = report["totals"]["step_seconds"]
    assert set(steps) == {*md.STEPS, "merge_and_write"} and steps["gate"] > 0 and steps["detector"] == 0


def test_scenes_are_gated_at_the_scene_gate_of_the_tuned_thresholds(fake_cfg, tmp_path):
    """A bright ship in the first slice (p_ship 1.0) and a dim one in the second (p_ship 0.3). The
    tuned gate 0.9 would drop the dim one; thresholds.yaml's scene gate (its detector found ships
    at p_ship 1.0 and 0.3 on validation) lowers it to 0.3 and both are found. The command line's
    classifier threshold and GATE_SHIP_RECALL 0 give the tuned gate back."""
    import module_tuning

    scene = sea_scene(256, 448)  # slices at columns 0 and 192
    scene[100:108, 20:60] = 200  # in the first slice only
    scene[100:108, 380:420] = 150  # in the second only
    Image.fromarray(scene).save(tmp_path / "two.png")

    def gate(images):
        return np.array([1.0 if np.any(img == 200) else 0.3 if np.any(img == 150) else 0.0 for img in images])

    thresholds = tmp_path / "thresholds.yaml"
    module_tuning.write_thresholds(thresholds, module_inference.Thresholds(0.9, 0.5, 0), f2=0.8, extra={
        module_inference.SCENE_GATE_KEY: {"found_ship_p_ship": [1.0, 0.3]}})

    def run(*overrides, command_line=()):
        return md.detect(fake_cfg(*overrides, *command_line), [tmp_path / "two.png"], out=tmp_path / "o", tile=256,
                         overlap=64, thresholds_file=thresholds, overridden=command_line, detect_fn=fake_detect_fn(),
                         p_ship_fn=gate, progress=False)

    result = run()
    assert result.scenes[0].counts["tiles_detected"] == 2 and len(result.scenes[0].ships) == 2
    assert "lowered from 0.9" in json.loads(result.report_path.read_text())["thresholds_sources"]["CLASSIFIER_THRESHOLD"]
    for kept in (run("DETECT.GATE_SHIP_RECALL", "0"), run(command_line=["SUBMIT.CLASSIFIER_THRESHOLD", "0.9"])):
        assert kept.scenes[0].counts["tiles_gated_out"] == 1 and len(kept.scenes[0].ships) == 1


def test_array_gate_reduces_larger_slices_as_the_jpeg_decoder_reduces_files(tiny_trained):
    """A slice larger than the classifier's input is first reduced as a JPEG file of it would be
    decoded for the classifier (module_files.reduce_image: area-averaged to the DCT-scaled size),
    not only squished by the pipeline's resize: the pixels the model was trained on."""
    import cv2
    import module_classifier
    from module_config import get_classifier_path
    from module_files import list_images, reduce_image

    learner = module_classifier.load_classifier(get_classifier_path(tiny_trained.cfg))
    size = tiny_trained.cfg.CLASSIFIER.IMAGE_SIZE
    assert module_classifier._opener_size(learner) == size
    tiles = [read_image(p) for p in list_images(tiny_trained.input_dir / "test_v2")[:6]]
    large = [cv2.resize(t, (2 * size, 2 * size), interpolation=cv2.INTER_NEAREST) for t in tiles]  # 2x the input
    p_large = module_classifier.predict_p_ship_arrays(learner, large, batch_size=4, precision="fp32")
    p_reduced = module_classifier.predict_p_ship_arrays(learner, [reduce_image(a, size) for a in large], batch_size=4,
                                                        precision="fp32")
    np.testing.assert_allclose(p_large, p_reduced, atol=1e-6)
    np.testing.assert_array_equal(reduce_image(large[0], size), tiles[0])  # 2x2 blocks of one pixel average to it


def test_array_batches_are_the_prediction_dataloaders_tensors(tiny_trained):
    """The gate's batches of in-memory slices skip fastai's DataLoader but are the files' tensors
    exactly: the learner's test pipeline over PIL images of the reduced slices (Resize where a
    slice is not at the input size, to float, ImageNet normalisation), with none of the training
    split's batch augmentations (the exported learner's loaders carry Dihedral and Brightness).
    Dihedral, an affine transform with the identity matrix at the test split, only resamples the
    batch there (values moved by ~1e-5): both paths skip it; one with an output size is kept."""
    import torch
    from fastai.vision.all import AffineCoordTfm, Normalize, PILImage

    import module_classifier
    from module_config import get_classifier_path
    from module_files import list_images, reduce_image

    learner = module_classifier.load_classifier(get_classifier_path(tiny_trained.cfg))
    size = module_classifier._opener_size(learner)
    tiles = [read_image(p) for p in list_images(tiny_trained.input_dir / "test_v2")[:5]]
    odd = [np.ascontiguousarray(t[:size - 9, :size // 2 + 3]) for t in tiles]  # squished by the learner's Resize
    assert any(type(t).__name__ in ("Dihedral", "Brightness") for t in learner.dls.valid.after_batch.fs)
    assert [type(t).__name__ for t in learner.dls.valid.after_batch.fs if module_classifier._only_resamples(t)] == \
        ["Dihedral"]
    assert not module_classifier._only_resamples(AffineCoordTfm(size=8))  # it resizes: kept
    assert not module_classifier._only_resamples(Normalize.from_stats([0.5] * 3, [0.2] * 3))
    for images in (tiles, odd):
        items = [PILImage.create(reduce_image(image, size)) for image in images]
        expected = [b for (b,) in module_classifier.prediction_dataloader(learner, items, 2)]
        resampled = [b for (b,) in learner.dls.test_dl(items, bs=2, num_workers=0, shuffle=False)]
        assert 0 < max(float((a - b).abs().max()) for a, b in zip(resampled, expected)) < 1e-4
        got = list(module_classifier._array_batches(learner, images, 2))
        assert [tuple(b.shape) for b in got] == [tuple(b.shape) for b in expected] == \
            [(2, 3, size, size), (2, 3, size, size), (1, 3, size, size)]
        for a, b in zip(got, expected):
            torch.testing.assert_close(a.as_subclass(torch.Tensor), b.as_subclass(torch.Tensor), rtol=0, atol=0)
    with pytest.raises(ValueError, match="one size"):  # a learner without a Resize cannot batch mixed sizes
        learner.dls.valid.after_item.fs = [t for t in learner.dls.valid.after_item.fs if type(t).__name__ != "Resize"]
        list(module_classifier._array_batches(learner, [tiles[0], odd[0]], 2))


def test_the_gates_model_stays_in_the_layout_it_came_in(tiny_trained):
    """predict_p_ship_arrays converts a contiguous model to channels-last for its passes and puts it
    back; a model already channels-last (the scene gate's, converted once) is left so; p_ship the same."""
    import torch

    import module_classifier
    from module_config import get_classifier_path
    from module_files import list_images

    learner = module_classifier.load_classifier(get_classifier_path(tiny_trained.cfg))
    arrays = [read_image(p) for p in list_images(tiny_trained.input_dir / "test_v2")[:6]]
    assert not module_classifier.is_channels_last(learner.model)
    first = module_classifier.predict_p_ship_arrays(learner, arrays, batch_size=4, precision="fp32")
    assert not module_classifier.is_channels_last(learner.model)
    learner.model.to(memory_format=torch.channels_last)
    again = module_classifier.predict_p_ship_arrays(learner, arrays, batch_size=4, precision="fp32")
    assert module_classifier.is_channels_last(learner.model)
    np.testing.assert_array_equal(first, again)


def test_array_gate_matches_the_file_gate_and_gates_slices(tiny_trained, tiny_run_cfg, biased_detector, tmp_path):
    """The classifier on in-memory tiles gives what it gives on the same pixels in files; detect
    records it per slice and sends only slices at or above the threshold to the detector."""
    import module_classifier
    from module_config import get_classifier_path
    from module_files import list_images

    paths = list_images(tiny_trained.input_dir / "test_v2")
    learner = module_classifier.load_classifier(get_classifier_path(tiny_trained.cfg))
    arrays = [read_image(p) for p in paths]
    from_files = module_classifier.predict_p_ship(learner, paths, batch_size=4, progress=False, precision="fp32")
    from_arrays = module_classifier.predict_p_ship_arrays(learner, arrays, batch_size=4, precision="fp32")
    np.testing.assert_allclose(from_arrays, from_files["p_ship"].to_numpy(), atol=1e-6)
    assert from_arrays.dtype == np.float32 and len(from_arrays) == len(paths)

    cfg = tiny_run_cfg("CLASSIFIER.PRECISION", "fp32")
    gate = module_inference.build_p_ship_array_fn(cfg)  # DETECT.GATE_TTA False: one pass, as from_arrays
    np.testing.assert_allclose(gate(arrays), from_arrays, atol=1e-6)
    with_tta = module_inference.build_p_ship_array_fn(tiny_run_cfg("CLASSIFIER.PRECISION", "fp32", "DETECT.GATE_TTA", "True"))
    np.testing.assert_allclose(with_tta(arrays), module_classifier.predict_p_ship_arrays(
        learner, arrays, batch_size=4, tta=True, precision="fp32"), atol=1e-6)
    mosaic = np.concatenate(arrays[:4], axis=1)  # 64 x 256: four slices of 64 px
    Image.fromarray(mosaic).save(tmp_path / "strip.png")
    expected_p = gate(arrays[:4])
    threshold = float(np.sort(expected_p)[1]) if len(set(expected_p)) > 1 else 0.5
    cfg = tiny_run_cfg("CLASSIFIER.PRECISION", "fp32", "SUBMIT.CLASSIFIER_THRESHOLD", str(threshold))
    calls = []
    result = md.detect(cfg, [tmp_path / "strip.png"], out=tmp_path / "out", tile=64, overlap=0,
                       detect_fn=fake_detect_fn(lambda image: image.mean(axis=2) > 250, calls), progress=False)
    counts = result.scenes[0].counts
    assert counts["tiles_detected"] == int(np.sum(expected_p >= threshold)) == sum(calls)
    assert counts["tiles_gated_out"] == 4 - counts["tiles_detected"]


# ---------------------------------------------------------------- 2. georeferencing
def test_geotiff_polygons_map_back_onto_the_predicted_pixels_and_ships_are_measured(fake_cfg, tmp_path):
    heading, length, width = 35.0, 60, 12
    scene = sea_scene(400, 500)
    ship = rotated_rectangle((400, 500), (300.0, 250.0), length, width, heading)
    scene[ship] = (230, 220, 210)
    transform = Affine.translation(500_000.0, 4_650_000.0) * Affine.scale(3.0, -3.0)  # 3 m pixels, north up
    path = write_geotiff(tmp_path / "utm.tif", scene.transpose(2, 0, 1), crs=UTM_31N, transform=transform)

    result = md.detect(fake_cfg(), [path], out=tmp_path / "out", tile=256, overlap=64, detect_fn=fake_detect_fn(),
                       progress=False)
    predicted = scene_masks(result.scenes[0].ships, 400, 500)
    np.testing.assert_array_equal(predicted, ship[None])
    collection = json.loads((tmp_path / "out" / "utm.geojson").read_text())
    assert collection["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32631"
    assert collection["coordinate_system"] == "EPSG:32631"
    (feature,) = collection["features"]
    # Through the inverse transform every vertex lands on a pixel corner, and the polygon covers
    # exactly the predicted pixels.
    for ring in feature["geometry"]["coordinates"]:
        cols, rows = (~transform) * np.asarray(ring).T
        np.testing.assert_allclose(cols, np.round(cols), atol=1e-6)
        np.testing.assert_allclose(rows, np.round(rows), atol=1e-6)
    back = rasterize([feature["geometry"]], out_shape=(400, 500), transform=transform).astype(bool)
    np.testing.assert_array_equal(back, predicted[0])

    row = pd.read_csv(tmp_path / "out" / "utm_ships.csv").iloc[0]
    assert abs(row["length_px"] - length) <= 1 and abs(row["width_px"] - width) <= 1
    assert abs((row["heading_deg"] - heading + 90) % 180 - 90) <= 1
    # UTM zone 31's central meridian (easting 500 km): grid north is true north, scale 0.9996
    assert abs((row["heading_geo_deg"] - heading + 90) % 180 - 90) <= 1
    assert row["length_m"] == pytest.approx(3.0 * row["length_px"] / 0.9996, rel=1e-3)
    assert row["area_m2"] == pytest.approx(ship.sum() * 9.0 / 0.9996 ** 2, rel=1e-3)
    centre = transform * (row["centre_x_px"], row["centre_y_px"])
    assert (row["centre_x"], row["centre_y"]) == pytest.approx(centre)
    (lon,), (lat,) = rasterio.warp.transform(UTM_31N, CRS.from_epsg(4326), [centre[0]], [centre[1]])
    assert (row["lon"], row["lat"]) == pytest.approx((lon, lat), abs=1e-9)

    # lon/lat on request: the same polygon, reprojected
    md.detect(fake_cfg("DETECT.GEOJSON_CRS", "EPSG:4326"), [path], out=tmp_path / "wgs84", tile=256, overlap=64,
              detect_fn=fake_detect_fn(), progress=False)
    wgs84 = json.loads((tmp_path / "wgs84" / "utm.geojson").read_text())
    assert wgs84["coordinate_system"] == "EPSG:4326" and "crs" not in wgs84
    lon, lat = np.asarray(wgs84["features"][0]["geometry"]["coordinates"][0]).mean(axis=0)
    assert lon == pytest.approx(row["lon"], abs=1e-3) and lat == pytest.approx(row["lat"], abs=1e-3)


def test_sixteen_bit_geotiff_is_stretched_and_nodata_slices_are_skipped(fake_cfg, tmp_path):
    """16-bit data go through the per-band 2-98 percentile stretch (percentiles of the valid
    pixels); slices of nodata never reach the models."""
    rng = np.random.default_rng(0)
    grey = rng.integers(20, 60, (300, 600)).astype(np.uint16)
    ship = rotated_rectangle((300, 600), (150, 150), 100, 25, 60)  # > 2% of the valid pixels: at the 98th
    grey[ship] = 240
    bands = np.stack([grey * 40 + 1000, grey * 30 + 900, grey * 20 + 800]).astype(np.uint16)
    bands[:, :, 300:] = 0  # the right half: no data
    path = write_geotiff(tmp_path / "pan.tif", bands, crs=UTM_31N,
                         transform=Affine.translation(500_000, 4_650_000) * Affine.scale(2, -2), nodata=0)
    calls = []
    result = md.detect(fake_cfg(), [path], out=tmp_path / "out", tile=256, overlap=0,
                       detect_fn=fake_detect_fn(lambda image: image.mean(axis=2) > 200, calls), progress=False)
    scene = result.scenes[0]
    for band, (low, high) in zip(bands, scene.info.stretch):
        assert (low, high) == pytest.approx(tuple(np.percentile(band[:, :300], [2, 98])))
    np.testing.assert_array_equal(scene_masks(scene.ships, 300, 600), ship[None])
    tiles = md.get_tiles(300, 600, 256, 0)
    nodata = [t for t in tiles if t.col >= 300]
    assert scene.counts["tiles_nodata"] == len(nodata) and sum(calls) == len(tiles) - len(nodata)
    assert (tmp_path / "out" / "pan_quicklook.png").is_file()


# ---------------------------------------------------------------- 3. memory
@pytest.mark.slow
def test_a_12000_px_mostly_sea_geotiff_stays_under_2_gb(tiny_trained, biased_detector, tmp_path, repo_root):
    """Windowed reads, the gate and per-ship crops: peak RSS of the whole process < 2 GB on a
    12,000 x 12,000 scene (432 MB as RGB), with the real tiny detector on the slices the gate keeps."""
    size, block = 12_000, 512
    path = tmp_path / "big.tif"
    ships = [(1_000, 2_000), (6_100, 6_050), (11_500, 400)]
    with rasterio.open(path, "w", driver="GTiff", height=size, width=size, count=3, dtype="uint8", crs=UTM_31N,
                       transform=Affine.translation(400_000, 4_700_000) * Affine.scale(1.5, -1.5), tiled=True,
                       blockxsize=block, blockysize=block, compress="deflate") as dst:
        for row in range(0, size, block):
            strip = np.empty((3, min(block, size - row), size), np.uint8)
            strip[0], strip[1], strip[2] = 20, 45, 70  # open sea
            for r, c in ships:
                if row <= r < row + block:
                    strip[:, r - row:r - row + 8, c:c + 40] = 235
            dst.write(strip, window=rasterio.windows.Window(0, row, size, strip.shape[1]))
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {str(repo_root)!r})
        import numpy as np
        import module_config, module_detect, module_progress
        cfg = module_config.get_cfg({str(repo_root / "configs" / "tiny.yaml")!r},
                                    {tiny_trained.opts!r} + ["SUBMIT.SCORE_THRESHOLD", "0.1", "DETECT.CHUNK_TILES", "32"])
        gate = lambda images: np.array([float(img.max() > 200) for img in images])
        result = module_detect.detect(cfg, [{str(path)!r}], out={str(tmp_path / "out")!r}, tile=768, overlap=128,
                                      weights={str(biased_detector)!r}, p_ship_fn=gate, progress=False)
        peak_mb = module_progress.peak_rss_mb()  # VmHWM: ru_maxrss would count the forking pytest's memory
        print(json.dumps({{"peak_mb": peak_mb, **result.scenes[0].counts}}))
    """))
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stats = json.loads(done.stdout.strip().splitlines()[-1])
    assert stats["tiles_total"] == 19 * 19
    assert stats["tiles_detected"] <= 12 and stats["tiles_gated_out"] >= 19 * 19 - 12
    assert stats["peak_mb"] < 2048, stats
    assert (tmp_path / "out" / "big_quicklook.png").is_file()


# ---------------------------------------------------------------- 4. bad input
def test_bad_files_are_named_and_never_lose_the_others(fake_cfg, tmp_path, caplog):
    folder = tmp_path / "scenes"
    folder.mkdir()
    good = sea_scene(200, 300)
    good[rotated_rectangle((200, 300), (100, 100), 30, 8, 0)] = 250
    Image.fromarray(good).save(folder / "good.png")
    (folder / "garbage.jpg").write_bytes(b"not an image at all")
    noise = np.random.default_rng(0).integers(0, 255, (200, 300, 3), dtype=np.uint8)
    Image.fromarray(noise).save(tmp_path / "whole.jpg", quality=95)
    whole = (tmp_path / "whole.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[:len(whole) // 2])  # the header is fine: fails when decoded
    write_geotiff(folder / "two_bands.tif", np.zeros((2, 64, 64), np.uint8), crs=UTM_31N,
                  transform=Affine.translation(500_000, 4_650_000) * Affine.scale(1, -1))
    write_geotiff(folder / "no_crs.tif", good.transpose(2, 0, 1))  # no CRS, identity transform

    result = md.detect(fake_cfg(), [folder, tmp_path / "missing.tif"], out=tmp_path / "out",
                       tile=256, overlap=32, detect_fn=fake_detect_fn(lambda i: i.mean(axis=2) > 200),
                       max_failed=10, progress=False)
    reasons = {Path(f["path"]).name: f["reason"] for f in result.failures}
    assert set(reasons) == {"garbage.jpg", "truncated.jpg", "two_bands.tif", "missing.tif"}
    assert all(name in reason for name, reason in reasons.items())  # each message names its file
    assert "2 band(s)" in reasons["two_bands.tif"] and "DETECT.BANDS" in reasons["two_bands.tif"]
    assert {s.info.name: len(s.ships) for s in result.scenes} == {"good": 1, "no_crs": 1}
    no_crs = json.loads((tmp_path / "out" / "no_crs.geojson").read_text())
    assert no_crs["coordinate_system"] == "pixel" and "pixel coordinates" in no_crs["coordinate_note"]
    assert any("no_crs.tif" in r.getMessage() and "no CRS" in r.getMessage() for r in caplog.records)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["totals"]["failed"] == 4 and report["totals"]["scenes"] == 2
    assert any("no CRS" in w for s in report["scenes"] if s["name"] == "no_crs" for w in s["warnings"])
    failures = pd.read_csv(tmp_path / "out" / "report_failures.csv")
    assert sorted(Path(p).name for p in failures["ImageId"]) == sorted(reasons)
    assert (tmp_path / "out" / "good.geojson").is_file() and (tmp_path / "out" / "good_ships.csv").is_file()


def test_command_line_exits_1_on_failures_after_writing_everything(tiny_trained, biased_detector, tiny_config,
                                                                   tmp_path):
    good = sea_scene(128, 128)
    Image.fromarray(good).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    run_dir = Path(tiny_trained.cfg.PATHS.RUNS_DIR) / tiny_trained.cfg.PATHS.RUN_NAME
    args = md.parse_args(["--config", str(tiny_config), "--images", str(tmp_path / "good.png"), str(tmp_path / "bad.png"),
                          "--out", str(tmp_path / "out"), "--format", "geojson,csv", "--tile", "64", "--overlap", "16",
                          "--run", str(run_dir), "--weights", str(biased_detector), "--no-progress",
                          "PATHS.INPUT_DIR", str(tiny_trained.input_dir), "DETECTOR.STAGES", "[[64, 3, 0.01, 0]]"])
    assert args.command == "detect"
    assert md.main(args) == 1  # DETECT.MAX_FAILED 0
    assert (tmp_path / "out" / "good.geojson").is_file() and not (tmp_path / "out" / "good_coco.json").exists()
    assert "bad.png" in (tmp_path / "out" / "report_failures.csv").read_text()
    args.max_failed = 1
    assert md.main(args) == 0


# ---------------------------------------------------------------- 5. distribution
def _two_scenes(folder: Path, real_tiles) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    mosaic = np.concatenate([np.concatenate([t[1][:320, :320] for t in real_tiles[:2]], axis=1),
                             np.concatenate([t[1][:320, :320] for t in real_tiles[2:4]], axis=1)], axis=0)
    Image.fromarray(mosaic).save(folder / "mosaic.png")
    write_geotiff(folder / "geo.tif", mosaic[:400, :500].transpose(2, 0, 1).copy(), crs=UTM_31N,
                  transform=Affine.translation(500_000, 4_650_000) * Affine.scale(3, -3))
    return [folder / "mosaic.png", folder / "geo.tif"]


def test_shards_merged_give_the_single_run(real_tiles, fake_cfg, tmp_path):
    scenes = _two_scenes(tmp_path / "scenes", real_tiles)
    is_ship = (lambda image: image.mean(axis=2) > 120)
    md.detect(fake_cfg(), scenes, out=tmp_path / "one", tile=128, overlap=32, detect_fn=fake_detect_fn(is_ship),
              progress=False)
    parts = [md.detect(fake_cfg(), scenes, out=tmp_path / "parts", tile=128, overlap=32, shard=f"{i}/3",
                       detect_fn=fake_detect_fn(is_ship), progress=False) for i in range(3)]
    assert [p.name for p in parts] == [f"detect_shard{i}of3.json" for i in range(3)]
    with pytest.raises(ValueError, match="shard missing"):
        md.merge_part_files(parts[:2], tmp_path / "merged")
    assert md.main(md.parse_args(["merge", "--shards", *map(str, parts), "--out", str(tmp_path / "merged")])) == 0
    for name in ("mosaic.geojson", "geo.geojson", "mosaic_coco.json", "geo_ships.csv"):
        assert (tmp_path / "merged" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    assert json.loads((tmp_path / "one" / "geo.geojson").read_text())["features"], "the test needs ships"


@pytest.mark.slow
def test_torchrun_two_processes_give_the_same_geojson_as_one(real_tiles, tiny_trained, biased_detector, tiny_config,
                                                             tmp_path, repo_root):
    """Real models, classifier gate on: ``torchrun --nproc_per_node 2`` (CPU, gloo) writes what one
    process writes. One thread and batches of one in both, so each slice's arithmetic is the same."""
    scenes = _two_scenes(tmp_path / "scenes", real_tiles)
    run_dir = Path(tiny_trained.cfg.PATHS.RUNS_DIR) / tiny_trained.cfg.PATHS.RUN_NAME
    common = ["--config", str(tiny_config), "--images", *map(str, scenes), "--tile", "128", "--overlap", "32",
              "--run-dir", str(run_dir), "--weights", str(biased_detector), "--no-progress",
              "PATHS.INPUT_DIR", str(tiny_trained.input_dir), "DETECTOR.STAGES", "[[64, 3, 0.01, 0]]",
              "SUBMIT.BATCH_SIZE", "1", "SUBMIT.SCORE_THRESHOLD", "0.05", "SUBMIT.CLASSIFIER_THRESHOLD", "0.01",
              "CLASSIFIER.PRECISION", "fp32", "CLASSIFIER.BATCH_SIZE", "1"]
    # score threshold 0.05 (detectron2's own floor): the tiny run's best weights are its last check's
    # (ties go to the newer weights), whose three iterations leave the ship scores low
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    script = str(repo_root / "module_detect.py")
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    runs = {"one": [sys.executable, script], "two": [torchrun, "--standalone", "--nproc_per_node", "2", script]}
    for name, command in runs.items():
        done = subprocess.run([*command, "--out", str(tmp_path / name), *common], capture_output=True, text=True,
                              env=env, cwd=repo_root, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
    for name in ("mosaic.geojson", "geo.geojson", "mosaic_coco.json", "geo_ships.csv"):
        assert (tmp_path / "two" / name).read_text() == (tmp_path / "one" / name).read_text(), name
    one = json.loads((tmp_path / "one" / "report.json").read_text())
    two = json.loads((tmp_path / "two" / "report.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2
    assert one["totals"]["tiles_detected"] == two["totals"]["tiles_detected"] > 0
    for report in (one, two):  # the processes' step times are summed
        assert report["totals"]["step_seconds"]["detector"] > 0 and report["totals"]["step_seconds"]["gate"] > 0
    assert json.loads((tmp_path / "one" / "mosaic.geojson").read_text())["features"], "the test needs ships"


# ---------------------------------------------------------------- the notebook
@pytest.mark.slow
def test_detect_notebook_runs_on_a_mosaic_of_test_tiles_and_shows_the_quicklook(tiny_trained, tiny_config, tmp_path,
                                                                                 repo_root):
    import papermill

    out = tmp_path / "executed.ipynb"
    papermill.execute_notebook(str(repo_root / "detect_notebook.ipynb"), str(out), kernel_name="python3",
                               cwd=str(repo_root), progress_bar=False,
                               parameters={"CONFIG": str(tiny_config), "OVERRIDES": tiny_trained.opts,
                                           "TILES": 8, "COLUMNS": 4, "OUT": str(tmp_path / "detect")})
    notebook = json.loads(out.read_text())
    outputs = [o for c in notebook["cells"] if c["cell_type"] == "code" for o in c.get("outputs", [])]
    assert not any(o.get("output_type") == "error" for o in outputs)
    assert any("image/png" in o.get("data", {}) for o in outputs), "the quicklook is shown"
    report = json.loads((tmp_path / "detect" / "detections" / "report.json").read_text())
    assert report["scenes"][0]["name"] == "mosaic" and report["totals"]["tiles_total"] > 0
