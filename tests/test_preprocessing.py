"""The Kaggle data layer: RLE codec, dataset dicts, COCO export, image checks, split, input layout."""
from __future__ import annotations

import gc
import json
import shutil

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as mask_util

import module_preprocessing as mp
from bench.kaggle_kernels import kernel_rle_decode, kernel_rle_encode
from module_config import get_cfg
from tests.conftest import REPO_ROOT

DEMO_CONFIG = REPO_ROOT / "configs" / "demo.yaml"


# ---------------------------------------------------------------- codec: hand-checked cases
def test_pixel_order_is_column_major_and_one_indexed():
    mask = np.zeros((3, 4), np.uint8)  # H=3, W=4
    mask[0, 1] = 1  # row 0, column 1: the 4th pixel top-to-bottom, left-to-right
    mask[2, 1] = mask[0, 2] = 1  # rows 2 of column 1 and 0 of column 2 are consecutive: one run
    assert mp.rle_encode(mask) == "4 1 6 2"
    np.testing.assert_array_equal(mp.rle_decode("4 1 6 2", (3, 4)), mask)


def test_blank_and_nan_decode_to_empty_and_empty_encodes_blank():
    for blank in ("", "  ", None, float("nan")):
        assert mp.rle_decode(blank, (5, 7)).shape == (5, 7)
        assert not mp.rle_decode(blank, (5, 7)).any()
    assert mp.rle_encode(np.zeros((8, 8), bool)) == ""


def test_runs_wrap_across_columns_as_kaggle_does():
    mask = np.zeros((4, 3), np.uint8)
    mask[3, 0] = mask[0, 1] = 1  # bottom of column 0, top of column 1: adjacent pixels 4 and 5
    assert mp.rle_encode(mask) == kernel_rle_encode(mask) == "4 2"


@pytest.mark.parametrize("rle, message", [
    ("1 2 3", "odd number of tokens"),
    ("1 2 x 4", "token 3 'x' is not a positive integer"),
    ("1 2 3.5 4", "token 3 '3.5' is not a positive integer"),
    ("0 2", "starts are 1-indexed"),
    ("5 0", "has length 0"),
    ("35 2", "past the image's 35 pixels"),
    ("10 2 3 2", "is not after"),
    ("3 4 5 1", "overlaps"),
])
def test_invalid_rle_is_rejected_with_the_reason(rle, message):
    for call in (lambda: mp.rle_decode(rle, (5, 7), image_id="abc.jpg", line=7),
                 lambda: mp.parse_rle(rle, (5, 7), image_id="abc.jpg", line=7),
                 lambda: mp.kaggle_rle_to_coco(rle, (5, 7), image_id="abc.jpg", line=7)):
        with pytest.raises(mp.RLEError, match=message) as info:
            call()
        assert "ImageId abc.jpg" in str(info.value) and "line 7" in str(info.value)


def test_bad_row_in_a_csv_names_file_line_and_image(tmp_path):
    (tmp_path / "images").mkdir()
    csv = tmp_path / "truth.csv"
    csv.write_text("ImageId,EncodedPixels\na.jpg,1 3\nb.jpg,\nc.jpg,10 3 5 2\n")
    with pytest.raises(mp.RLEError) as info:
        mp.load_dataset_dicts(csv, tmp_path / "images")
    text = str(info.value)
    assert str(csv) in text and "line 4" in text and "ImageId c.jpg" in text and "sorted" in text
    assert gc.isenabled()  # the conversion pauses the garbage collector; an error does not leave it off


def test_dataset_dicts_leave_the_garbage_collector_as_they_found_it(tmp_path, monkeypatch):
    (tmp_path / "images").mkdir()
    csv = tmp_path / "truth.csv"
    csv.write_text("ImageId,EncodedPixels\na.jpg,1 3\nb.jpg,\n")
    seen = []
    coco_counts = mp._ParsedRuns.coco_counts
    monkeypatch.setattr(mp._ParsedRuns, "coco_counts",
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
    with pytest.raises(ValueError, match="expected \\['ImageId', 'EncodedPixels'\\]"):
        mp.load_dataset_dicts(csv, tmp_path)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        mp.load_dataset_dicts(tmp_path / "missing.csv", tmp_path)


# ---------------------------------------------------------------- codec: properties
def masks(max_side: int = 24):
    shapes = st.tuples(st.integers(1, max_side), st.integers(1, max_side))
    return shapes.flatmap(lambda shape: arrays(np.uint8, shape, elements=st.integers(0, 1)))


@settings(max_examples=300, deadline=None)
@given(masks())
def test_round_trip_random_masks_any_shape(mask):
    rle = mp.rle_encode(mask)
    decoded = mp.rle_decode(rle, mask.shape)
    np.testing.assert_array_equal(decoded, mask)
    assert decoded.dtype == np.uint8 and decoded.shape == mask.shape
    assert rle == kernel_rle_encode(mask)  # bit-identical to the kernels, also for non-square masks
    assert mp.rle_encode(np.asfortranarray(mask)) == rle == mp.rle_encode(mask.astype(bool))


@settings(max_examples=200, deadline=None)
@given(masks())
def test_coco_side_agrees_with_pycocotools(mask):
    rle = mp.rle_encode(mask)
    reference = mask_util.encode(np.asfortranarray(mask))
    coco = mp.kaggle_rle_to_coco(rle, mask.shape)
    assert coco["size"] == list(mask.shape)
    assert coco["counts"] == reference["counts"].decode("ascii")
    assert mp.coco_to_kaggle_rle(coco) == rle
    assert mp.coco_to_kaggle_rle(reference) == rle  # bytes counts too
    assert mp.rle_area(rle, mask.shape) == int(mask_util.area(reference)) == int(mask.sum())
    if mask.any():
        np.testing.assert_allclose(mp.rle_bbox(rle, mask.shape), mask_util.toBbox(reference))


def _pycocotools_counts(mask: np.ndarray) -> str:
    return mask_util.encode(np.asfortranarray(mask))["counts"].decode("ascii")


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 24).flatmap(lambda side: st.lists(arrays(np.uint8, (side, side + 3), elements=st.integers(0, 1)),
                                                        min_size=1, max_size=6)))
def test_batched_coco_compression_matches_pycocotools(mask_list):
    # The dataset-dict path compresses every mask of a CSV in one compiled pass (no pycocotools).
    shape = mask_list[0].shape
    runs = mp._ParsedRuns([mp.rle_encode(m) for m in mask_list], shape)
    for mask, coco in zip(mask_list, runs.coco()):
        if mask.any():
            assert coco == {"size": list(shape), "counts": _pycocotools_counts(mask)}
        else:
            assert coco is None


def test_batched_coco_compression_on_edge_masks():
    # values of 4+ five-bit groups, negative deltas, a mask ending on the last pixel, a full one
    shape = (1500, 1700)
    big = np.zeros(shape, np.uint8)
    big[700:705, 800] = 1
    big[3, 1650:1690] = 1
    ends_on_last_pixel = np.zeros(shape, np.uint8)
    ends_on_last_pixel[-40:, -2:] = 1
    full = np.ones(shape, np.uint8)
    tiny = np.zeros(shape, np.uint8)
    tiny[0, 0] = 1
    mask_list = [big, ends_on_last_pixel, full, tiny]
    coco = mp._ParsedRuns([mp.rle_encode(m) for m in mask_list], shape).coco()
    assert [c["counts"] for c in coco] == [_pycocotools_counts(m) for m in mask_list]
    for mask, c in zip(mask_list, coco):
        np.testing.assert_array_equal(mask_util.decode({"size": c["size"], "counts": c["counts"].encode()}), mask)


def test_asymmetric_mask_would_fail_if_transposed():
    mask = np.zeros((6, 9), np.uint8)
    mask[1, 2:7] = 1  # a horizontal bar: transposing it gives a different mask
    rle = mp.rle_encode(mask)
    assert rle == "14 1 20 1 26 1 32 1 38 1"
    assert not np.array_equal(mp.rle_decode(rle, (9, 6)).T, mask[:, :6].T)
    assert mp.rle_bbox(rle, mask.shape) == [2.0, 1.0, 5.0, 1.0]


def test_bit_identical_to_the_kaggle_kernels_on_every_real_row(segmentations_subset_csv):
    rles = pd.read_csv(segmentations_subset_csv, dtype=str, keep_default_na=False)["EncodedPixels"].tolist()
    ships = [r for r in rles if r]
    assert len(ships) > 40_000
    mismatches = []
    for k, rle in enumerate(ships):
        reference = kernel_rle_decode(rle)
        ours = mp.rle_decode(rle)
        if not np.array_equal(ours, reference) or mp.rle_encode(ours) != kernel_rle_encode(reference):
            mismatches.append(k)
    assert not mismatches, f"{len(mismatches)} rows differ, first {ships[mismatches[0]][:60]}"


def test_coco_conversion_matches_pycocotools_on_real_rows(segmentations_subset_csv):
    rles = pd.read_csv(segmentations_subset_csv, dtype=str, keep_default_na=False, nrows=3000)["EncodedPixels"]
    rles = [r for r in rles if r]
    ours = mp.kaggle_rles_to_coco(rles)
    for rle, coco in zip(rles, ours):
        reference = mask_util.encode(np.asfortranarray(kernel_rle_decode(rle)))
        assert coco["counts"] == reference["counts"].decode("ascii")
    np.testing.assert_allclose([mp.rle_bbox(r) for r in rles[:500]],
                               mask_util.toBbox([{"size": c["size"], "counts": c["counts"].encode()}
                                                 for c in ours[:500]]))


# ---------------------------------------------------------------- the compiled scanner (module_rle_kernels)
_RLE_ALPHABET = st.sampled_from(["1", "2", "3", "0", "7", "12", "35", "999", " ", " ", "  ", "\t", "\r", "\x0b",
                                 "\n", "-", ".", ",", "x", "\xa0", "\u0663", "+"])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.lists(_RLE_ALPHABET, max_size=12).map("".join), min_size=1, max_size=5))
def test_compiled_scanner_accepts_and_rejects_exactly_what_parse_rle_does(texts):
    shape = (7, 9)
    verdicts = []
    for text in texts:
        try:
            verdicts.append(mp.parse_rle(text, shape))
        except mp.RLEError as exc:
            verdicts.append(exc)
    bad = [k for k, v in enumerate(verdicts) if isinstance(v, Exception)]
    ids = [f"{k}.jpg" for k in range(len(texts))]
    if bad:
        with pytest.raises(mp.RLEError) as info:
            mp._ParsedRuns(texts, shape, image_ids=ids, lines=range(2, len(texts) + 2))
        # the first bad string is named, with parse_rle's own reason
        assert info.value.image_id == ids[bad[0]] and info.value.reason == verdicts[bad[0]].reason
    else:
        runs = mp._ParsedRuns(texts, shape, image_ids=ids)
        for k, (starts, lengths) in enumerate(verdicts):
            own = slice(runs.offsets[k], runs.offsets[k] + runs.n_runs[k])
            np.testing.assert_array_equal(runs.starts[own], starts)
            np.testing.assert_array_equal(runs.lengths[own], lengths)


def _csv_rows(segmentations_subset_csv, n=400):
    frame = pd.read_csv(segmentations_subset_csv, dtype=str, keep_default_na=False, nrows=n)
    return list(zip(frame.ImageId, frame.EncodedPixels))


def _write_csv(path, rows, newline="\n", quote=False, blank_line=False, final_newline=True, bom=False):
    lines = ["ImageId,EncodedPixels"] + [f'"{i}","{r}"' if quote else f"{i},{r}" for i, r in rows]
    if blank_line:
        lines.insert(len(lines) // 2, "")
    text = newline.join(lines) + (newline if final_newline else "")
    path.write_bytes(text.encode("utf-8-sig" if bom else "utf-8"))
    return path


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


def test_empty_inputs_give_empty_results(tmp_path):
    (tmp_path / "images").mkdir()
    header_only = tmp_path / "header_only.csv"
    header_only.write_text("ImageId,EncodedPixels\n")
    assert mp.load_dataset_dicts(header_only, tmp_path / "images") == []
    assert mp.kaggle_rles_to_coco([]) == [] and mp._ParsedRuns([], (768, 768)).coco() == []
    empty = mask_util.encode(np.zeros((768, 768), np.uint8, order="F"))["counts"].decode("ascii")
    assert mp.kaggle_rle_to_coco("") == {"size": [768, 768], "counts": empty}
    dicts = mp.load_dataset_dicts(_write_csv(tmp_path / "blank.csv", [("a.jpg", ""), ("b.jpg", "")]), tmp_path / "images")
    assert [d["annotations"] for d in dicts] == [[], []]


def test_image_ids_of_any_length_or_script_are_kept_and_sorted(tmp_path):
    (tmp_path / "images").mkdir()
    rows = [("zeta-long-name.jpg", "1 2"), ("b.jpg", ""), ("ñandú.jpg", "5 3"), ("b.jpg", "10 1"), ("a.jpg", "")]
    csv = _write_csv(tmp_path / "truth.csv", rows)
    dicts = mp.load_dataset_dicts(csv, tmp_path / "images")
    assert [d["image_id"] for d in dicts] == sorted({i for i, _ in rows})
    assert [len(d["annotations"]) for d in dicts] == [0, 1, 1, 1]
    with pytest.raises(mp.RLEError, match="line 4, ImageId ñandú.jpg: run 1 starts at 0"):
        mp.load_dataset_dicts(_write_csv(tmp_path / "bad.csv", rows[:2] + [("ñandú.jpg", "0 3")]), tmp_path / "images")


def test_parallel_scan_matches_one_thread_and_names_the_first_bad_row(segmentations_subset_csv):
    import module_rle_kernels as kernels

    rows = _csv_rows(segmentations_subset_csv, n=3000)
    body = "".join(f"{i},{r}\n" for i, r in rows).encode()
    buf = np.frombuffer(body, np.uint8)
    one = kernels.scan(buf, True, 768 * 768, workers=1)
    assert one[0] == kernels.OK and one[6].size == len(rows)
    for workers in (2, 3, 7):
        many = kernels.scan(buf, True, 768 * 768, workers=workers)
        for a, b in zip(one, many):
            np.testing.assert_array_equal(a, b)
        summary = kernels.summarise(one[7], one[8], one[6], 768, 768, workers=workers)
        for a, b in zip(kernels.summarise(one[7], one[8], one[6], 768, 768, workers=1), summary):
            np.testing.assert_array_equal(a, b)
    # two bad rows, in the second and third quarters: the first is reported, counted from the start
    bad_rows = [len(rows) // 2 + 5, 3 * len(rows) // 4]
    broken = [(i, "3 x" if k in bad_rows else r) for k, (i, r) in enumerate(rows)]
    buf = np.frombuffer("".join(f"{i},{r}\n" for i, r in broken).encode(), np.uint8)
    for workers in (1, 2, 4):
        status, row, id_start, id_end, *_ = kernels.scan(buf, True, 768 * 768, workers=workers)
        assert status == kernels.BAD_ROW and row == bad_rows[0]
        assert buf[id_start[row]:id_end[row]].tobytes().decode() == rows[bad_rows[0]][0]


def test_kernels_work_without_a_writable_cache_folder():
    import os
    import subprocess
    import sys

    # ZipCacheLocator alone finds no place for a file outside a zip: what numba sees on a read-only
    # install without a writable $NUMBA_CACHE_DIR or home
    env = dict(os.environ, NUMBA_CACHE_LOCATOR_CLASSES="ZipCacheLocator")
    code = ("import module_preprocessing as mp, module_rle_kernels as k; "
            "print(mp.kaggle_rle_to_coco('1 3')['counts'], len(k.UNCACHED) > 5)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == [mp.kaggle_rle_to_coco("1 3")["counts"], "True"]
    assert "NUMBA_CACHE_DIR" in out.stderr and out.stderr.count("RuntimeWarning") == 1


def test_runs_past_two_to_the_31_pixels_are_kept_exactly():
    shape = (50_000, 50_000)  # 2.5e9 pixels: the runs are stored as int64, not int32
    rle = "1 3 2400000000 7"
    runs = mp._ParsedRuns([rle], shape)
    assert runs.starts.dtype == np.int64 and runs.starts.tolist() == [0, 2_399_999_999]
    reference = mask_util.frPyObjects([{"size": list(shape), "counts": [0, 3, 2_399_999_996, 7,
                                                                         2_500_000_000 - 2_400_000_006]}], *shape)
    assert mp.kaggle_rle_to_coco(rle, shape)["counts"] == reference[0]["counts"].decode("ascii")
    assert mp._ParsedRuns(["1 3"], (768, 768)).starts.dtype == np.int32


@settings(max_examples=60, deadline=None)
@given(mask_list=st.lists(arrays(np.uint8, (6, 8), elements=st.integers(0, 1)), min_size=2, max_size=5))
def test_ground_truth_overlaps_match_a_pixel_count(tmp_path_factory, mask_list):
    masks = [m for m in mask_list if m.any()]
    csv = tmp_path_factory.mktemp("overlaps") / "truth.csv"
    _write_csv(csv, [("x.jpg", mp.rle_encode(m)) for m in masks] + [("y.jpg", "")])
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


def test_coco_export_cli_writes_standard_instances_json(airbus_truth_csv, airbus_images, tmp_path):
    from pycocotools.coco import COCO

    out = tmp_path / "coco" / "train.json"
    args = mp.get_args_parser().parse_args(["coco", "--csv", str(airbus_truth_csv), "--images", str(airbus_images),
                                            "--out", str(out)])
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
                  "EncodedPixels": [mp.rle_encode(a), mp.rle_encode(b), mp.rle_encode(c), ""]}).to_csv(csv, index=False)
    table = mp.find_ground_truth_overlaps(csv)
    assert table.to_dict("records") == [{"ImageId": "x.jpg", "line_a": 2, "line_b": 3, "pixels": 25}]
    (tmp_path / "images").mkdir()
    with pytest.raises(ValueError, match="x.jpg, lines 2 and 3, 25 px"):
        mp.load_dataset_dicts(csv, tmp_path / "images", overlaps="error")
    dicts = mp.load_dataset_dicts(csv, tmp_path / "images", overlaps="background")
    decoded = [mask_util.decode({"size": x["segmentation"]["size"], "counts": x["segmentation"]["counts"].encode()})
               for x in dicts[0]["annotations"]]
    assert len(decoded) == 3 and np.sum(decoded, axis=0).max() == 1
    assert [m.sum() for m in decoded] == [100 - 25, 150 - 25, 50]


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
def demo_cfg(tmp_path, *opts):
    return get_cfg(DEMO_CONFIG, ["PATHS.RUNS_DIR", str(tmp_path / "runs"), "PATHS.INPUT_DIR", str(tmp_path / "input"),
                                 "SYNTH.N_TRAIN", "24", "SYNTH.N_TEST", "3", "SYNTH.IMAGE_SIZE", "128",
                                 "DATA.IMAGE_SIZE", "128", "DATA.VAL_FRACTION", "0.25", *opts])


def test_prepare_input_generates_then_reuses_then_regenerates_on_change(tmp_path):
    cfg = demo_cfg(tmp_path)
    assert mp.prepare_input(cfg) == tmp_path / "input"
    csv = tmp_path / "input" / "train_ship_segmentations_v2.csv"
    manifest = json.loads((tmp_path / "input" / mp.SYNTH_MANIFEST).read_text())
    assert manifest["n_train"] == 24 and csv.is_file()
    mtime = csv.stat().st_mtime_ns
    mp.prepare_input(cfg)
    assert csv.stat().st_mtime_ns == mtime  # nothing regenerated
    mp.prepare_input(demo_cfg(tmp_path, "SYNTH.N_TRAIN", "30"))
    assert pd.read_csv(csv).ImageId.nunique() == 30


def test_prepare_input_never_overwrites_data_it_did_not_generate(tmp_path):
    cfg = demo_cfg(tmp_path)
    mp.prepare_input(cfg)
    (tmp_path / "input" / mp.SYNTH_MANIFEST).unlink()  # now it looks like the user's own data
    mp.prepare_input(demo_cfg(tmp_path, "SYNTH.N_TRAIN", "30"))
    assert pd.read_csv(tmp_path / "input" / "train_ship_segmentations_v2.csv").ImageId.nunique() == 24


@pytest.mark.parametrize("layout, message", [
    ("none", "does not exist. Download the data with `kaggle competitions download"),
    ("nested", "it is inside"),
    ("zipped", "found train_v2.zip instead"),
    ("no_csv", "train CSV not found"),
    ("empty", "holds no .jpg files"),
])
def test_prepare_input_explains_a_wrong_layout(tmp_path, layout, message):
    root = tmp_path / "input"
    cfg = get_cfg(REPO_ROOT / "configs" / "airbus.yaml", ["PATHS.INPUT_DIR", str(root)])
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
    with pytest.raises(FileNotFoundError, match=message.replace("(", "\\(")):
        mp.prepare_input(cfg)


def test_train_val_dicts_are_saved_reused_and_registered(tmp_path):
    from detectron2.data import DatasetCatalog

    cfg = demo_cfg(tmp_path)
    train, val = mp.get_train_val_dicts(cfg)
    assert len(train) + len(val) == 24 and val
    split = mp.get_split_path(cfg)
    table = pd.read_csv(split)
    assert table.loc[table.fold == "val", "ImageId"].tolist() == [d["image_id"] for d in val]
    mtime = split.stat().st_mtime_ns
    mp._DICTS_CACHE.clear()
    assert mp.get_train_val_dicts(cfg) == (train, val)
    assert split.stat().st_mtime_ns == mtime  # the saved split was reused, not recomputed
    assert mp.register_airbus_datasets(cfg) == ("airbus_train", "airbus_val")
    mp.register_airbus_datasets(cfg)  # idempotent
    assert DatasetCatalog.get("airbus_val") == val
    small_train, small_val = mp.get_train_val_dicts(demo_cfg(tmp_path, "DATA.MAX_IMAGES", "12"))
    assert len(small_train) + len(small_val) == 12


def test_synth_cli_writes_kaggle_layout(tmp_path):
    out = tmp_path / "data"
    mp.main(mp.get_args_parser().parse_args(["synth", "--out", str(out), "--n-train", "5", "--n-test", "2",
                                             "--image-size", "64", "--seed", "1"]))
    assert len(list((out / "train_v2").glob("*.jpg"))) == 5 and len(list((out / "test_v2").glob("*.jpg"))) == 2
    assert pd.read_csv(out / "sample_submission_v2.csv").shape[0] == 2
