"""The Kaggle data layer: CSV + images -> dataset dicts (ground-truth checks, image checks), COCO export,
the overlap-aware split, the input layout check and the run's saved split.

The codec itself is tested in test_rle.py, the image policy and the CSV reader in test_files.py.
"""
from __future__ import annotations

import gc
import json
import logging
import shutil

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as mask_util

import module_config
import module_preprocessing as mp
import module_rle
from bench.kaggle_kernels import kernel_rle_decode
from module_config import get_cfg
from module_rle import rle_encode


def _write_csv(path, rows, newline="\n", quote=False, blank_line=False, final_newline=True, bom=False):
    lines = ["ImageId,EncodedPixels"] + [f'"{i}","{r}"' if quote else f"{i},{r}" for i, r in rows]
    if blank_line:
        lines.insert(len(lines) // 2, "")
    text = newline.join(lines) + (newline if final_newline else "")
    path.write_bytes(text.encode("utf-8-sig" if bom else "utf-8"))
    return path


def _csv_rows(segmentations_subset_csv, n=400):
    frame = pd.read_csv(segmentations_subset_csv, dtype=str, keep_default_na=False, nrows=n)
    return list(zip(frame.ImageId, frame.EncodedPixels))


def _decoded(annotations) -> list[np.ndarray]:
    return [mask_util.decode({"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()})
            for a in annotations]


# ---------------------------------------------------------------- dataset dicts: the CSV
def test_bad_row_in_a_csv_names_file_line_and_image(tmp_path):
    (tmp_path / "images").mkdir()
    csv = tmp_path / "truth.csv"
    csv.write_text("ImageId,EncodedPixels\na.jpg,1 3\nb.jpg,\nc.jpg,10 3 5 2\n")
    with pytest.raises(module_rle.RLEError) as info:
        mp.load_dataset_dicts(csv, tmp_path / "images")
    text = str(info.value)
    assert str(csv) in text and "line 4" in text and "ImageId c.jpg" in text and "sorted" in text
    assert gc.isenabled()  # the conversion pauses the garbage collector; an error does not leave it off


def test_dataset_dicts_leave_the_garbage_collector_as_they_found_it(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    csv = tmp_path / "truth.csv"
    csv.write_text("ImageId,EncodedPixels\na.jpg,1 3\nb.jpg,\n")
    seen = []
    coco_counts = module_rle.ParsedRuns.coco_counts
    monkeypatch.setattr(module_rle.ParsedRuns, "coco_counts",
                        lambda self, rows=None: seen.append(gc.isenabled()) or coco_counts(self, rows))
    assert len(mp.load_dataset_dicts(csv, tmp_path / "images")) == 2
    assert gc.isenabled() and gc.get_freeze_count() == 0  # the new objects went to the oldest generation
    gc.disable()
    try:
        mp.load_dataset_dicts(csv, tmp_path / "images")
        assert not gc.isenabled()  # a caller's disabled collector stays disabled
    finally:
        gc.enable()
    assert seen == [False, False]  # paused while the dicts are built
    gc.freeze()  # a caller's frozen objects (say, before a fork) stay frozen
    try:
        frozen = gc.get_freeze_count()
        mp.load_dataset_dicts(csv, tmp_path / "images")
        assert gc.get_freeze_count() == frozen
    finally:
        gc.unfreeze()


def test_csv_with_wrong_header_or_missing_file_is_a_clear_error(tmp_path):
    csv = tmp_path / "bad.csv"
    csv.write_text("id,rle\na.jpg,1 2\n")
    with pytest.raises(ValueError, match=r"bad.csv: the header is 'id,rle', expected exactly 'ImageId,EncodedPixels'"):
        mp.load_dataset_dicts(csv, tmp_path)
    csv.write_text("ImageId,EncodedPixels,Extra\na.jpg,1 2,x\n")
    with pytest.raises(ValueError, match="bad.csv: the header is 'ImageId,EncodedPixels,Extra'"):
        mp.load_dataset_dicts(csv, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        mp.load_dataset_dicts(tmp_path / "missing.csv", tmp_path)


@pytest.mark.parametrize("text, message", [("ImageId,EncodedPixels\n", "only a header, no rows"),
                                           ("ImageId,EncodedPixels\r\n", "only a header, no rows"),
                                           ("", "the file is empty")], ids=["header-only", "header-only-crlf", "0-byte"])
def test_header_only_or_empty_csv_is_an_error_naming_the_file(tmp_path, text, message):
    (tmp_path / "images").mkdir()
    csv = tmp_path / "truth.csv"
    csv.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        mp.load_dataset_dicts(csv, tmp_path / "images")
    assert str(csv) in str(info.value)


def test_csv_layouts_give_the_same_dicts_fast_or_through_pandas(segmentations_subset_csv, tmp_path, monkeypatch):
    rows = _csv_rows(segmentations_subset_csv)
    rows = rows[200:] + rows[:200]  # not sorted by ImageId: the dicts still are
    (tmp_path / "images").mkdir()
    read_with_pandas = []
    original = mp._LoadedCSV._read_with_pandas
    monkeypatch.setattr(mp._LoadedCSV, "_read_with_pandas",
                        lambda self, shape: read_with_pandas.append(self.csv_path.name) or original(self, shape))
    layouts = {"kaggle.csv": {}, "crlf.csv": {"newline": "\r\n"}, "no_final_newline.csv": {"final_newline": False},
               "quoted.csv": {"quote": True}, "blank_line.csv": {"blank_line": True}, "bom.csv": {"bom": True}}
    dicts = {name: mp.load_dataset_dicts(_write_csv(tmp_path / name, rows, **kw), tmp_path / "images")
             for name, kw in layouts.items()}
    assert read_with_pandas == ["quoted.csv", "blank_line.csv", "bom.csv"]  # Kaggle's layout never does
    reference = dicts.pop("kaggle.csv")
    assert [d["image_id"] for d in reference] == sorted({i for i, _ in rows})
    assert sum(len(d["annotations"]) for d in reference) == sum(1 for _, r in rows if r)
    for name, other in dicts.items():
        assert other == reference, name


def test_ship_free_images_keep_empty_annotations(tmp_path):
    (tmp_path / "images").mkdir()
    dicts = mp.load_dataset_dicts(_write_csv(tmp_path / "blank.csv", [("a.jpg", ""), ("b.jpg", "")]), tmp_path / "images")
    assert [(d["image_id"], d["annotations"]) for d in dicts] == [("a.jpg", []), ("b.jpg", [])]


def test_image_ids_of_any_length_or_script_are_kept_and_sorted(tmp_path):
    (tmp_path / "images").mkdir()
    rows = [("zeta-long-name.jpg", "1 2"), ("b.jpg", ""), ("ñandú.jpg", "5 3"), ("b.jpg", "10 1"), ("a.jpg", "")]
    csv = _write_csv(tmp_path / "truth.csv", rows)
    dicts = mp.load_dataset_dicts(csv, tmp_path / "images")
    assert [d["image_id"] for d in dicts] == sorted({i for i, _ in rows})
    assert [len(d["annotations"]) for d in dicts] == [0, 1, 1, 1]
    with pytest.raises(module_rle.RLEError, match="line 4, ImageId ñandú.jpg: run 1 starts at 0"):
        mp.load_dataset_dicts(_write_csv(tmp_path / "bad.csv", rows[:2] + [("ñandú.jpg", "0 3")]), tmp_path / "images")


@settings(max_examples=60, deadline=None)
@given(mask_list=st.lists(arrays(np.uint8, (6, 8), elements=st.integers(0, 1)), min_size=2, max_size=5))
def test_ground_truth_overlaps_match_a_pixel_count(tmp_path_factory, mask_list):
    masks = [m for m in mask_list if m.any()]
    csv = tmp_path_factory.mktemp("overlaps") / "truth.csv"
    _write_csv(csv, [("x.jpg", rle_encode(m)) for m in masks] + [("y.jpg", "")])
    expected = [{"ImageId": "x.jpg", "line_a": a + 2, "line_b": b + 2, "pixels": int((masks[a] & masks[b]).sum())}
                for a in range(len(masks)) for b in range(a + 1, len(masks)) if (masks[a] & masks[b]).any()]
    assert mp.find_ground_truth_overlaps(csv, (6, 8)).to_dict("records") == expected


# ---------------------------------------------------------------- dataset dicts on the real sample
@pytest.fixture(scope="module")
def real_dicts(airbus_truth_csv, airbus_images):
    return mp.load_dataset_dicts(airbus_truth_csv, airbus_images, check_images="error")


def test_real_sample_becomes_detectron2_dicts(real_dicts, airbus_truth_csv, airbus_images):
    from detectron2.structures import BoxMode

    assert len(real_dicts) == 64
    assert sum(bool(d["annotations"]) for d in real_dicts) == 40  # ship-free images are kept
    assert [d["image_id"] for d in real_dicts] == sorted(d["image_id"] for d in real_dicts)
    truth = pd.read_csv(airbus_truth_csv, dtype=str, keep_default_na=False)
    by_id = truth.groupby("ImageId")["EncodedPixels"].apply(lambda s: [r for r in s if r])
    for d in real_dicts:
        assert d["file_name"] == str(airbus_images / d["image_id"]) and (d["height"], d["width"]) == (768, 768)
        assert len(d["annotations"]) == len(by_id[d["image_id"]])
        for annotation, rle in zip(d["annotations"], by_id[d["image_id"]]):
            assert annotation["bbox_mode"] == BoxMode.XYWH_ABS
            assert annotation["category_id"] == 0 and annotation["iscrowd"] == 0
            mask = mask_util.decode({"size": annotation["segmentation"]["size"],
                                     "counts": annotation["segmentation"]["counts"].encode()})
            np.testing.assert_array_equal(mask, kernel_rle_decode(rle))
            rows, cols = np.nonzero(mask)
            assert annotation["bbox"] == [cols.min(), rows.min(), cols.max() - cols.min() + 1,
                                          rows.max() - rows.min() + 1]
    again = mp.load_dataset_dicts(airbus_truth_csv, airbus_images)
    assert again == real_dicts  # same list, same order, every call


def test_coco_export_cli_writes_standard_instances_json(airbus_truth_csv, airbus_images, tmp_path, repo_root):
    from pycocotools.coco import COCO

    out = tmp_path / "coco" / "train.json"
    args = mp.get_args_parser().parse_args(["coco", "--csv", str(airbus_truth_csv), "--images", str(airbus_images),
                                            "--out", str(out), "--config", str(repo_root / "configs" / "airbus.yaml")])
    mp.main(args)
    coco = COCO(str(out))
    assert len(coco.getImgIds()) == 64 and coco.loadCats(1)[0]["name"] == "ship"
    n_masks = (pd.read_csv(airbus_truth_csv)["EncodedPixels"].notna()).sum()
    assert len(coco.getAnnIds()) == n_masks
    annotation = coco.loadAnns(coco.getAnnIds())[0]
    assert annotation["area"] == coco.annToMask(annotation).sum() > 0
    assert not list(out.parent.glob(".*tmp*"))


def test_dicts_cli_prints_a_summary(airbus_truth_csv, airbus_images, capsys):
    mp.main(mp.get_args_parser().parse_args(["dicts", "--csv", str(airbus_truth_csv), "--images",
                                             str(airbus_images)]))
    assert "64 images" in capsys.readouterr().out


# ---------------------------------------------------------------- image checks
@pytest.fixture()
def bad_image_folder(airbus_truth_csv, airbus_images, tmp_path):
    """Three real images: one fine, one truncated (like Kaggle's 6384c3e78.jpg), one missing."""
    from PIL import Image

    truth = pd.read_csv(airbus_truth_csv, dtype=str, keep_default_na=False)
    ids = sorted(truth.ImageId.unique())[:4]
    folder = tmp_path / "images"
    folder.mkdir()
    shutil.copy(airbus_images / ids[0], folder / ids[0])
    data = (airbus_images / ids[1]).read_bytes()
    (folder / ids[1]).write_bytes(data[: len(data) // 2])
    Image.new("RGB", (100, 80)).save(folder / ids[3])  # wrong size
    csv = tmp_path / "truth.csv"
    truth[truth.ImageId.isin(ids)].to_csv(csv, index=False)
    return csv, folder, ids


def test_image_checks_stop_at_a_bad_file_naming_it(bad_image_folder):
    csv, folder, ids = bad_image_folder
    with pytest.raises(mp.ImageCheckError, match=ids[1]) as info:
        mp.load_dataset_dicts(csv, folder, check_images="error")
    assert "cannot decode" in str(info.value)


def test_image_checks_skip_and_report_bad_files(bad_image_folder):
    csv, folder, ids = bad_image_folder
    report = {}
    dicts = mp.load_dataset_dicts(csv, folder, check_images="skip", report=report)
    assert [d["image_id"] for d in dicts] == [ids[0]]
    problems = {k.rsplit("/", 1)[-1]: v for k, v in report["skipped"].items()}
    assert set(problems) == set(ids[1:])
    assert "cannot decode" in problems[ids[1]] and "missing" in problems[ids[2]]
    assert "expected 768x768" in problems[ids[3]]


def test_missing_image_folder_is_an_error(airbus_truth_csv, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mp.load_dataset_dicts(airbus_truth_csv, tmp_path / "nowhere")


# ---------------------------------------------------------------- ground-truth overlaps
def test_ground_truth_overlaps_are_found_and_set_to_background(tmp_path):
    shape = (768, 768)
    a = np.zeros(shape, np.uint8)
    a[10:20, 10:20] = 1
    b = np.zeros(shape, np.uint8)
    b[15:25, 15:30] = 1  # shares 5x5 pixels with a
    c = np.zeros(shape, np.uint8)
    c[100:110, 100:105] = 1
    csv = tmp_path / "truth.csv"
    pd.DataFrame({"ImageId": ["x.jpg", "x.jpg", "x.jpg", "y.jpg"],
                  "EncodedPixels": [rle_encode(a), rle_encode(b), rle_encode(c), ""]}).to_csv(csv, index=False)
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="x.jpg, lines 2 and 3, 25 px"):
        mp.load_dataset_dicts(csv, tmp_path / "images", overlaps="error")
    dicts = mp.load_dataset_dicts(csv, tmp_path / "images", overlaps="background")
    decoded = [mask_util.decode({"size": x["segmentation"]["size"], "counts": x["segmentation"]["counts"].encode()})
               for x in dicts[0]["annotations"]]
    assert len(decoded) == 3 and np.sum(decoded, axis=0).max() == 1
    assert [m.sum() for m in decoded] == [100 - 25, 150 - 25, 50]
    report = {}
    mp.load_dataset_dicts(csv, tmp_path / "images", overlaps="warn", report=report)
    assert report["overlaps"].to_dict("records") == [{"ImageId": "x.jpg", "line_a": 2, "line_b": 3, "pixels": 25}]
    table = mp.find_ground_truth_overlaps(csv)  # the same table, without building the dicts
    assert table.to_dict("records") == [{"ImageId": "x.jpg", "line_a": 2, "line_b": 3, "pixels": 25}]


@pytest.mark.parametrize("duplicate", ["same text", "same pixels written differently"])
def test_a_duplicated_ground_truth_row_is_dropped_and_the_ship_kept(tmp_path, caplog, duplicate):
    """Kaggle sets pixels shared by two masks to background; a row written twice must not erase its ship."""
    shape = (768, 768)
    ship = np.zeros(shape, np.uint8)
    ship[10:20, 10:12] = 1  # two columns of 10 px: "1 10" runs at rows 10..19 of columns 10 and 11
    other = np.zeros(shape, np.uint8)
    other[100:103, 50:60] = 1
    rle = rle_encode(ship)
    assert rle == "7691 10 8459 10"
    again = rle if duplicate == "same text" else "7691 4 7695 6 8459 10"  # the same pixels, runs split
    csv = _write_csv(tmp_path / "truth.csv", [("x.jpg", rle), ("x.jpg", rle_encode(other)), ("x.jpg", again),
                                              ("y.jpg", "")])
    (tmp_path / "images").mkdir()
    report = {}
    with caplog.at_level(logging.WARNING, logger="module_preprocessing"):
        dicts = mp.load_dataset_dicts(csv, tmp_path / "images", overlaps="background", report=report)
    assert "x.jpg line 4 (= line 2)" in caplog.text  # the warning names the lines
    masks = _decoded(dicts[0]["annotations"])
    assert len(masks) == 2  # the ship once, the other ship; nothing set to background
    np.testing.assert_array_equal(masks[0], ship)
    np.testing.assert_array_equal(masks[1], other)
    assert list(report["overlaps"].columns) == ["ImageId", "line_a", "line_b", "pixels"]
    assert report["overlaps"].empty  # a duplicate is not an overlap
    # nor an error under overlaps="error"
    assert len(mp.load_dataset_dicts(csv, tmp_path / "images", overlaps="error")[0]["annotations"]) == 2


def test_real_ground_truth_has_no_overlaps(segmentations_subset_csv):
    assert len(mp.find_ground_truth_overlaps(segmentations_subset_csv)) == 0


# ---------------------------------------------------------------- split
def _neighbour_tiles(image_a, image_b):
    """Two 768 px tiles of one 1024 px wide scene, 256 px apart, JPEG-encoded separately (as Kaggle's)."""
    scene = np.concatenate([image_a, image_b[:, :256]], axis=1)
    return scene[:, :768], scene[:, 256:1024]


def test_real_tiles_that_share_blocks_are_grouped_and_distinct_ones_are_not(airbus_images, tmp_path):
    from PIL import Image

    files = sorted(airbus_images.glob("*.jpg"))
    signatures = mp.compute_block_signatures(files)
    assert len(np.unique(mp.group_overlapping_tiles(signatures))) == 64  # 64 distinct real tiles
    busy = sorted(files, key=lambda f: -np.asarray(Image.open(f).convert("L"), np.float32).std())[:3]
    paths = []
    for k, (a, b) in enumerate([(busy[0], busy[1]), (busy[2], busy[0])]):
        left, right = _neighbour_tiles(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
        for side, tile in (("l", left), ("r", right)):
            paths.append(tmp_path / f"{k}{side}.jpg")
            Image.fromarray(tile).save(paths[-1], quality=95)
    groups = mp.group_overlapping_tiles(np.concatenate([signatures, mp.compute_block_signatures(paths)]))
    # Scene 0 = busy[0] | busy[1][:, :256], scene 1 = busy[2] | busy[0][:, :256]: each new tile shares
    # blocks with busy[0], busy[1] or busy[2], so those three and the four new tiles form one group.
    joined = groups[[files.index(b) for b in busy] + list(range(64, 68))]
    assert (joined == joined[0]).all(), groups
    assert len(np.unique(groups)) == 64 - 2  # the 61 other real tiles stay alone


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """A small synthetic Kaggle-format dataset at 256 px (the demo's size): some tiles are crops of one scene."""
    import module_synthetic

    root = tmp_path_factory.mktemp("synthetic")
    paths = module_synthetic.generate_dataset(root, 80, 4, seed=3, image_size=256)
    dicts = mp.load_dataset_dicts(paths["train_csv"], paths["train_images"], image_size=256)
    return root, paths, dicts


def _scenes(dicts, size=256):
    """Pairs of tiles whose shared part is (nearly) identical: the generator's crops of one scene."""
    from PIL import Image

    import module_synthetic

    step = module_synthetic.get_scene_step(size)
    grey = {d["image_id"]: np.asarray(Image.open(d["file_name"]).convert("L"), np.float32) for d in dicts}
    pairs = set()
    for a, image_a in grey.items():
        for b, image_b in grey.items():
            if a != b and (np.abs(image_a[:, step:] - image_b[:, :-step]).mean() < 3
                           or np.abs(image_a[step:] - image_b[:-step]).mean() < 3):
                pairs.add((a, b))
    return pairs


def test_synthetic_scene_tiles_are_grouped_and_the_split_keeps_them_together(synthetic):
    _, _, dicts = synthetic
    pairs = _scenes(dicts)
    assert len(pairs) >= 8  # 2x2 tiles per scene: 4 neighbour pairs per scene
    groups = mp.group_overlapping_tiles(mp.compute_block_signatures([d["file_name"] for d in dicts]))
    group_of = {d["image_id"]: g for d, g in zip(dicts, groups)}
    assert all(group_of[a] == group_of[b] for a, b in pairs)
    in_pairs = {x for pair in pairs for x in pair}
    assert len({group_of[x] for x in in_pairs}) == len(in_pairs) // 4  # one group per 4-tile scene
    assert len(set(groups.tolist())) == len(dicts) - 3 * len(in_pairs) // 4  # no other tile is joined
    train, val = mp.split_train_val(dicts, val_fraction=0.3, seed=1, groups=groups)
    train_groups = {group_of[d["image_id"]] for d in train}
    assert not train_groups & {group_of[d["image_id"]] for d in val}
    assert len(train) + len(val) == len(dicts) and 0.2 < len(val) / len(dicts) < 0.4


def test_split_is_deterministic_stratified_and_keeps_order():
    rng = np.random.default_rng(0)
    n = 2000
    groups = np.repeat(np.arange(n // 2), 2)[:n]  # pairs of tiles
    ships = np.where(rng.random(n) < 0.78, 0, rng.integers(1, 9, n))
    ships[1::2] = ships[0::2]  # both tiles of a pair see the same ships
    folds = mp.assign_folds(groups, ships, 0.2, seed=5)
    np.testing.assert_array_equal(folds, mp.assign_folds(groups, ships, 0.2, seed=5))
    assert not np.array_equal(folds, mp.assign_folds(groups, ships, 0.2, seed=6))
    assert (folds[0::2] == folds[1::2]).all()
    strata = np.array([mp.ship_count_stratum(c) for c in ships])
    for s in np.unique(strata):
        share = folds[strata == s].mean()
        assert abs(share - 0.2) < 0.05, (s, share)
    dicts = [{"image_id": f"{k:09x}.jpg", "annotations": [{}] * int(c)} for k, c in enumerate(ships)]
    train, val = mp.split_train_val(dicts, 0.2, seed=5, groups=groups)
    assert [d["image_id"] for d in val] == [d["image_id"] for d, v in zip(dicts, folds) if v]
    with pytest.raises(ValueError, match="val_fraction"):
        mp.assign_folds(groups, ships, 1.5, seed=0)


def test_split_cli_writes_folds(synthetic, tmp_path):
    root, paths, dicts = synthetic
    out = tmp_path / "split.csv"
    mp.main(mp.get_args_parser().parse_args(["split", "--csv", str(paths["train_csv"]), "--images",
                                             str(paths["train_images"]), "--image-size", "256", "--out", str(out),
                                             "--val-fraction", "0.25", "--seed", "2"]))
    table = pd.read_csv(out)
    assert list(table.columns) == ["ImageId", "fold", "group", "n_ships"] and len(table) == len(dicts)
    assert set(table.fold) == {"train", "val"}
    assert table.groupby("group").fold.nunique().max() == 1


# ---------------------------------------------------------------- run-level entry points
@pytest.mark.parametrize("layout, message", [
    ("none", "does not exist. Download the data with `kaggle competitions download"),
    ("nested", "it is inside"),
    ("zipped", "found train_v2.zip instead"),
    ("no_csv", "train CSV not found"),
    ("empty", "holds no .jpg files"),
])
def test_input_layout_check_explains_a_wrong_layout(tmp_path, repo_root, layout, message):
    root = tmp_path / "input"
    cfg = get_cfg(repo_root / "configs" / "airbus.yaml", ["PATHS.INPUT_DIR", str(root)])
    if layout != "none":
        base = root / "airbus-ship-detection" if layout == "nested" else root
        for folder in ("train_v2", "test_v2"):
            (base / folder).mkdir(parents=True)
            if layout != "empty":
                (base / folder / "a.jpg").write_bytes(b"")
        for name in ("train_ship_segmentations_v2.csv", "sample_submission_v2.csv"):
            if not (layout == "no_csv" and name.startswith("train")):
                (base / name).write_text("ImageId,EncodedPixels\n")
        if layout == "zipped":
            shutil.rmtree(base / "train_v2")
            (base / "train_v2.zip").write_bytes(b"")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(FileNotFoundError, match=message.replace("(", "\\(")):
        mp.check_input_layout(cfg)
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # reads, never writes


def test_input_layout_check_of_a_complete_folder_and_of_training_only(tiny_cfg, tiny_dataset, tmp_path):
    assert mp.check_input_layout(tiny_cfg()) == tiny_dataset
    train_only = tmp_path / "train_only"
    shutil.copytree(tiny_dataset / "train_v2", train_only / "train_v2")
    shutil.copy(tiny_dataset / "train_ship_segmentations_v2.csv", train_only)
    cfg = tiny_cfg(input_dir=train_only)
    assert mp.check_input_layout(cfg, test=False) == train_only
    with pytest.raises(FileNotFoundError, match="test images not found"):
        mp.check_input_layout(cfg)


def test_reading_never_generates_data(tiny_cfg, tmp_path):
    cfg = tiny_cfg(input_dir=tmp_path / "input")  # a synthetic config, but nothing generated yet
    assert cfg.SYNTH.ENABLED
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mp.get_train_val_dicts(cfg)
    assert not (tmp_path / "input").exists()


def test_train_val_dicts_are_saved_and_reused(tiny_cfg):
    cfg = tiny_cfg()
    mp._DICTS_CACHE.clear()  # as in a new process: other tests read the same dataset
    train, val = mp.get_train_val_dicts(cfg)
    assert len(train) + len(val) == cfg.SYNTH.N_TRAIN and val
    assert any(d["annotations"] for d in val) and any(d["annotations"] for d in train)
    split = module_config.get_split_path(cfg)
    table = pd.read_csv(split)
    assert table.loc[table.fold == "val", "ImageId"].tolist() == [d["image_id"] for d in val]
    meta = json.loads(split.with_suffix(".json").read_text())
    assert set(meta) == {"fingerprint", "skipped"} and meta["skipped"] == {}
    assert meta["fingerprint"]["val_fraction"] == cfg.DATA.VAL_FRACTION
    mtime = split.stat().st_mtime_ns
    mp._DICTS_CACHE.clear()
    assert mp.get_train_val_dicts(cfg) == (train, val)
    assert split.stat().st_mtime_ns == mtime  # the saved split was reused, not recomputed
    small_train, small_val = mp.get_train_val_dicts(tiny_cfg("DATA.MAX_IMAGES", "12"))
    assert len(small_train) + len(small_val) == 12


def test_every_run_folder_gets_its_split_even_when_the_process_read_the_data_before(make_tiny_cfg, tmp_path):
    first, second = make_tiny_cfg(tmp_path / "first"), make_tiny_cfg(tmp_path / "second")
    assert mp.get_train_val_dicts(first) == mp.get_train_val_dicts(second)
    for cfg in (first, second):  # the classifier, the detector and the submission read the folds from there
        assert module_config.get_split_path(cfg).is_file(), module_config.get_split_path(cfg)


def test_images_skipped_by_the_check_are_recorded_and_skipped_again(tiny_cfg, tiny_dataset, tmp_path):
    input_dir = tmp_path / "input"
    shutil.copytree(tiny_dataset, input_dir)
    victim = sorted((input_dir / "train_v2").glob("*.jpg"))[3]
    data = victim.read_bytes()
    victim.write_bytes(data[:len(data) // 2] + b"\xff\xd9")  # truncated, its end marker restored
    cfg = tiny_cfg("DATA.CHECK_IMAGES", "skip", input_dir=input_dir)
    train, val = mp.get_train_val_dicts(cfg)
    assert victim.name not in {d["image_id"] for d in train + val}
    assert len(train) + len(val) == cfg.SYNTH.N_TRAIN - 1
    meta = json.loads(module_config.get_split_path(cfg).with_suffix(".json").read_text())
    assert list(meta["skipped"]) == [str(victim)] and "cannot decode" in meta["skipped"][str(victim)]
    mp._DICTS_CACHE.clear()
    assert mp.get_train_val_dicts(cfg) == (train, val)  # reused: the bad image stays out


def test_cli_defaults_to_the_configs_data(tiny_cfg, tiny_paths, tiny_config, capsys):
    cfg = tiny_cfg()
    args = mp.get_args_parser().parse_args(["dicts", "--config", str(tiny_config), *tiny_paths])
    assert args.csv is None and args.images is None and args.config == str(tiny_config)
    dicts = mp.main(args)
    assert len(dicts) == cfg.SYNTH.N_TRAIN
    out = capsys.readouterr().out
    assert "train_ship_segmentations_v2.csv" in out and f"{cfg.SYNTH.N_TRAIN} images" in out
    with pytest.raises(SystemExit):
        mp.get_args_parser().parse_args(["dicts", "--out", "x.json"])  # dicts writes nothing
