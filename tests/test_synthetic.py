"""The synthetic generator writes Kaggle's layout and formats, with data worth learning from."""
from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

import module_synthetic
from module_rle import rle_decode, rle_encode

SIZE = 256
N_TRAIN, N_TEST = 100, 20


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("synthetic")
    return module_synthetic.generate_dataset(out, N_TRAIN, N_TEST, seed=0, image_size=SIZE)


def read_csv(path) -> pd.DataFrame:
    return pd.read_csv(path, dtype=str, keep_default_na=False)


def masks_by_image(csv_path, size=SIZE) -> dict[str, list[np.ndarray]]:
    """ImageId -> list of (H, W) uint8 masks ([] for a ship-free image)."""
    out: dict[str, list[np.ndarray]] = {}
    for image_id, rle in read_csv(csv_path).itertuples(index=False):
        out.setdefault(image_id, [])
        if rle:
            out[image_id].append(rle_decode(rle, (size, size)))
    return out


def test_layout_and_csv_formats(dataset):
    out = dataset["train_csv"].parent
    assert sorted(p.name for p in out.iterdir()) == [
        "sample_submission_v2.csv", "test_ship_segmentations.csv", "test_v2", "train_ship_segmentations_v2.csv", "train_v2"]
    for csv, images in (("train_csv", "train_images"), ("test_truth", "test_images")):
        text = dataset[csv].read_text()
        assert text.startswith("ImageId,EncodedPixels\n")
        frame = read_csv(dataset[csv])
        assert list(frame.columns) == ["ImageId", "EncodedPixels"]
        assert frame["ImageId"].is_monotonic_increasing  # sorted, as Kaggle's files
        assert all(re.fullmatch(r"[0-9a-f]{9}\.jpg", i) for i in frame["ImageId"])
        assert set(frame["ImageId"]) == {p.name for p in dataset[images].glob("*")}
        # Each image: exactly one blank row, or one row per ship and no blank row.
        for image_id, rles in frame.groupby("ImageId")["EncodedPixels"]:
            assert (rles == "").sum() == (1 if len(rles) == 1 and rles.iloc[0] == "" else 0), image_id
        ship_free = frame[frame["EncodedPixels"] == ""]["ImageId"]
        assert all(f"{i},\n" in text for i in ship_free)  # blank written as nothing, as Kaggle does
    train_ids = set(read_csv(dataset["train_csv"])["ImageId"])
    test_ids = set(read_csv(dataset["test_truth"])["ImageId"])
    assert len(train_ids) == N_TRAIN and len(test_ids) == N_TEST and not train_ids & test_ids
    sample = read_csv(dataset["sample_submission"])
    assert set(sample["ImageId"]) == test_ids and (sample["EncodedPixels"] == "1 2").all()


def test_images_are_rgb_jpegs_of_the_requested_size(dataset):
    for path in sorted(dataset["train_images"].glob("*.jpg"))[:10]:
        assert path.read_bytes()[:2] == b"\xff\xd8"
        image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8


def test_masks_are_valid_canonical_and_never_overlap(dataset):
    for csv in ("train_csv", "test_truth"):
        for image_id, masks in masks_by_image(dataset[csv]).items():
            for mask in masks:
                assert mask.shape == (SIZE, SIZE) and mask.any(), image_id
                assert rle_decode(rle_encode(mask), (SIZE, SIZE)).tolist() == mask.tolist()
            if masks:
                assert np.sum(masks, axis=0).max() == 1, f"{image_id}: masks overlap"


def test_empty_fraction_near_target(dataset):
    for csv, n in (("train_csv", N_TRAIN), ("test_truth", N_TEST)):
        masks = masks_by_image(dataset[csv])
        n_empty = sum(not m for m in masks.values())
        assert n_empty == round(0.78 * n), (csv, n_empty)  # met up to rounding


def mask_length(mask: np.ndarray) -> float:
    """Longest side (px) of the minimum-area rectangle around a mask's pixels."""
    points = np.argwhere(mask)[:, ::-1].astype(np.float32)
    (_, _), (w, h), _ = cv2.minAreaRect(points)
    return max(w, h) + 1


def ship_lengths(masks_of_images, size) -> list[float]:
    """Lengths of the masks that do not touch the image border (those may be cut)."""
    return [mask_length(m) for masks in masks_of_images.values() for m in masks
            if not (m[0].any() or m[-1].any() or m[:, 0].any() or m[:, -1].any())]


def test_ship_lengths_span_the_scaled_range(dataset):
    lengths = ship_lengths(masks_by_image(dataset["train_csv"]), SIZE)
    low, high = (v * SIZE / 768 for v in module_synthetic.SHIP_LENGTH_RANGE)  # 3.3 .. 100 px
    assert len(lengths) >= 20
    assert min(lengths) >= 2 and max(lengths) <= high + 3
    assert min(lengths) <= 2 * max(low, 4) and max(lengths) >= high / 3  # small and large ships both occur


def test_ship_lengths_at_kaggle_size(tmp_path):
    paths = module_synthetic.generate_dataset(tmp_path, 6, 0, seed=3, empty_fraction=0.0, image_size=768)
    masks = masks_by_image(paths["train_csv"], 768)
    assert all(masks.values())  # empty_fraction=0: every image has ships
    lengths = ship_lengths(masks, 768)
    assert lengths and min(lengths) >= 8 and max(lengths) <= 303


def test_several_ships_per_image_and_some_touch(dataset):
    masks = masks_by_image(dataset["train_csv"])
    counts = [len(m) for m in masks.values() if m]
    assert max(counts) >= 3
    touching = 0
    for image_masks in masks.values():
        for i, a in enumerate(image_masks):
            grown = cv2.dilate(a, np.ones((3, 3), np.uint8))
            touching += sum(bool((grown & b).any()) for b in image_masks[i + 1:])
    assert touching >= 1


def test_ships_stand_out_from_the_water_around_them(dataset):
    contrasts = []
    for image_id, image_masks in masks_by_image(dataset["train_csv"]).items():
        if not image_masks:
            continue
        gray = cv2.imread(str(dataset["train_images"] / image_id), cv2.IMREAD_GRAYSCALE).astype(float)
        union = np.sum(image_masks, axis=0).astype(np.uint8)
        for mask in image_masks:
            if mask.sum() < 10:
                continue
            ring = cv2.dilate(mask, np.ones((5, 5), np.uint8)) & (1 - union)
            contrasts.append(abs(gray[mask > 0].mean() - gray[ring > 0].mean()))
    assert np.median(contrasts) >= 30


def test_ship_free_images_carry_distractors(dataset):
    with_bright_region = 0
    ship_free = [i for i, m in masks_by_image(dataset["train_csv"]).items() if not m]
    for image_id in ship_free:
        gray = cv2.imread(str(dataset["train_images"] / image_id), cv2.IMREAD_GRAYSCALE)
        # land, beaches, piers and clouds are bright; open sea is not
        with_bright_region += int((gray >= 140).sum() >= 30)
    assert 0.15 <= with_bright_region / len(ship_free) <= 0.9


def test_some_training_tiles_overlap_as_crops_of_one_scene(dataset):
    step = module_synthetic.get_scene_step(SIZE)
    assert step == 85 and module_synthetic.get_scene_step(768) == 256
    ids = sorted(p.name for p in dataset["train_images"].glob("*.jpg"))
    images = np.stack([cv2.imread(str(dataset["train_images"] / i), cv2.IMREAD_GRAYSCALE) for i in ids]).astype(np.float32)
    masks = masks_by_image(dataset["train_csv"])
    union = {i: (np.sum(m, axis=0) > 0 if m else np.zeros((SIZE, SIZE), bool)) for i, m in masks.items()}
    pairs = 0
    for axis in (1, 2):  # B is A moved `step` px right (axis 2) or down (axis 1)
        a_part = images.take(range(step, step + 8), axis=axis)
        b_part = images.take(range(0, 8), axis=axis)
        strip_diff = np.abs(a_part[:, None] - b_part[None, :]).mean(axis=(2, 3))
        np.fill_diagonal(strip_diff, np.inf)
        for a, b in zip(*np.nonzero(strip_diff < 8)):  # candidates; unrelated flat seas can be close
            overlap_a = images[a].take(range(step, SIZE), axis=axis - 1).ravel()
            overlap_b = images[b].take(range(0, SIZE - step), axis=axis - 1).ravel()
            if np.corrcoef(overlap_a, overlap_b)[0, 1] < 0.8:  # the same pixels (up to JPEG) correlate
                continue
            # the ground truth agrees on the shared pixels
            assert (union[ids[a]].take(range(step, SIZE), axis=axis - 1)
                    == union[ids[b]].take(range(0, SIZE - step), axis=axis - 1)).all()
            pairs += 1
    n_scenes = round(module_synthetic.SCENE_SHARE * N_TRAIN / 4)
    assert pairs == 4 * n_scenes  # 2x2 tiles: 2 horizontal and 2 vertical neighbours per scene
    assert 4 * n_scenes <= 0.2 * N_TRAIN  # a modest share


def test_deterministic_by_seed_through_the_command_line(tmp_path):
    def run(out, seed, *extra):
        args = module_synthetic.get_args_parser().parse_args(
            ["--out", str(out), "--n-train", "10", "--n-test", "3", "--seed", str(seed), "--image-size", "128", *extra])
        return module_synthetic.main(args)

    first, second, other = run(tmp_path / "a", 5), run(tmp_path / "b", 5), run(tmp_path / "c", 6)
    for key in ("train_csv", "test_truth", "sample_submission"):
        assert first[key].read_bytes() == second[key].read_bytes()
        assert first[key].read_bytes() != other[key].read_bytes()
    for path in first["train_images"].glob("*.jpg"):
        assert path.read_bytes() == (second["train_images"] / path.name).read_bytes()
    with pytest.raises(FileExistsError, match="overwrite"):
        run(tmp_path / "a", 7)
    replaced = run(tmp_path / "a", 6, "--overwrite", "--contact-sheet", str(tmp_path / "sheet.png"))
    assert replaced["train_csv"].read_bytes() == other["train_csv"].read_bytes()
    assert {p.name for p in replaced["train_images"].glob("*")} == {p.name for p in other["train_images"].glob("*")}
    # the contact sheet is module_plots' picture of the training set: the same figure, saved the same way
    import module_plots

    sheet = cv2.imread(str(tmp_path / "sheet.png"))
    reference = module_plots.save_figure(module_plots.plot_submission_overlays(
        replaced["train_csv"], replaced["train_images"], count=12), tmp_path / "reference.png")
    assert sheet is not None and sheet.shape == cv2.imread(str(reference)).shape


def test_bad_arguments_are_errors(tmp_path):
    with pytest.raises(ValueError, match="empty_fraction"):
        module_synthetic.generate_dataset(tmp_path, 2, 1, empty_fraction=1.5)
    with pytest.raises(ValueError, match="n_train"):
        module_synthetic.generate_dataset(tmp_path, -1, 1)


def test_command_line_defaults_to_the_configs_synthetic_dataset(tiny_config, tmp_path):
    out = tmp_path / "input"
    args = module_synthetic.get_args_parser().parse_args(["--config", str(tiny_config), "PATHS.INPUT_DIR", str(out)])
    assert (args.out, args.n_train, args.image_size) == (None, None, None)
    paths = module_synthetic.main(args)
    assert paths["train_csv"] == out / "train_ship_segmentations_v2.csv"
    frame = read_csv(paths["train_csv"])
    assert frame["ImageId"].nunique() == 32 and read_csv(paths["sample_submission"]).shape[0] == 8  # tiny's SYNTH
    image = cv2.imread(str(next(paths["test_images"].glob("*.jpg"))))
    assert image.shape == (64, 64, 3)
    n_free = sum(not m for m in masks_by_image(paths["train_csv"], 64).values())
    assert n_free == round(0.5 * 32)  # SYNTH.EMPTY_FRACTION of tiny.yaml


# ---------------------------------------------------------------- the config's dataset
def test_prepare_generates_then_reuses_then_regenerates_on_change(tiny_cfg, tmp_path):
    input_dir = tmp_path / "input"
    assert module_synthetic.prepare_synthetic_input(tiny_cfg(input_dir=input_dir)) == input_dir
    csv = input_dir / "train_ship_segmentations_v2.csv"
    manifest = json.loads((input_dir / module_synthetic.SYNTH_MANIFEST).read_text())
    assert manifest == {"n_train": 32, "n_test": 8, "seed": 0, "empty_fraction": 0.5, "image_size": 64}
    mtime = csv.stat().st_mtime_ns
    module_synthetic.prepare_synthetic_input(tiny_cfg(input_dir=input_dir))
    assert csv.stat().st_mtime_ns == mtime  # nothing regenerated
    module_synthetic.prepare_synthetic_input(tiny_cfg("SYNTH.N_TRAIN", "36", input_dir=input_dir))
    assert read_csv(csv)["ImageId"].nunique() == 36
    assert len(list((input_dir / "train_v2").glob("*.jpg"))) == 36  # the old tiles went with the old dataset


def test_prepare_never_overwrites_data_it_did_not_generate(tiny_cfg, tmp_path):
    input_dir = tmp_path / "input"
    module_synthetic.prepare_synthetic_input(tiny_cfg(input_dir=input_dir))
    (input_dir / module_synthetic.SYNTH_MANIFEST).unlink()  # now it looks like the user's own data
    module_synthetic.prepare_synthetic_input(tiny_cfg("SYNTH.N_TRAIN", "36", input_dir=input_dir))
    assert read_csv(input_dir / "train_ship_segmentations_v2.csv")["ImageId"].nunique() == 32


def test_prepare_does_nothing_for_real_data_configs(repo_root, tmp_path):
    import module_config

    cfg = module_config.get_cfg(repo_root / "configs" / "airbus.yaml", ["PATHS.INPUT_DIR", str(tmp_path / "input")])
    assert module_synthetic.prepare_synthetic_input(cfg) is None
    assert not (tmp_path / "input").exists()


def test_render_scene_keeps_each_regions_ships_in_it():
    """Ships by region (a large scene's ship cells): each region's count, inside it, none elsewhere;
    without regions the scene is what it always was (the datasets stay the same by seed)."""
    side, cell = 256, 64
    region = np.zeros((side, side), np.int32)
    region[0:64, 0:64], region[128:192, 64:128], region[192:256, 192:256] = 1, 2, 3
    image, labels = module_synthetic.render_scene(np.random.default_rng(4), side, side, [2, 0, 3], scale=1 / 3,
                                                  ship_region=region)
    assert image.shape == (side, side, 3) and labels.max() >= 1
    for k in range(1, labels.max() + 1):
        pixels = region[labels == k]
        assert pixels.size and np.bincount(pixels).argmax() in (1, 3)  # in region 1 or 3, never 2 or outside
        assert np.mean(pixels > 0) >= 0.9  # a moored ship may lean out of its region by 10% at most
    per_region = {r: len({int(k) for k in np.unique(labels[region == r]) if k}) for r in (1, 2, 3)}
    assert per_region[2] == 0 and 1 <= per_region[1] <= 2 and 1 <= per_region[3] <= 3
    assert not labels[region == 0].any() or np.mean(labels[region == 0] > 0) < 0.01
    again = module_synthetic.render_scene(np.random.default_rng(4), side, side, [2, 0, 3], scale=1 / 3, ship_region=region)
    np.testing.assert_array_equal(again[1], labels)
    plain = module_synthetic.render_scene(np.random.default_rng(5), 128, 128, 2, scale=1 / 3)
    np.testing.assert_array_equal(plain[0], module_synthetic.render_scene(np.random.default_rng(5), 128, 128, 2,
                                                                          scale=1 / 3)[0])
    with pytest.raises(ValueError, match="3 regions, n_ships 2 counts"):
        module_synthetic.render_scene(np.random.default_rng(0), side, side, [1, 1], ship_region=region)
    with pytest.raises(ValueError, match=r"ship_region has shape \(2, 2\), expected \(256, 256\)"):
        module_synthetic.render_scene(np.random.default_rng(0), side, side, [1], ship_region=np.ones((2, 2), int))
