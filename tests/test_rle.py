"""module_rle, the one home of the Kaggle RLE codec: hand-checked cases, properties against the Kaggle
kernels and pycocotools, the compiled scanner (module_rle_kernels), masks <-> COCO RLE, the overlap finder."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from pycocotools import mask as mask_util

import module_rle as rle_codec
from bench.kaggle_kernels import kernel_rle_decode, kernel_rle_encode


# ---------------------------------------------------------------- hand-checked cases
def test_pixel_order_is_column_major_and_one_indexed():
    mask = np.zeros((3, 4), np.uint8)  # H=3, W=4
    mask[0, 1] = 1  # row 0, column 1: the 4th pixel top-to-bottom, left-to-right
    mask[2, 1] = mask[0, 2] = 1  # rows 2 of column 1 and 0 of column 2 are consecutive: one run
    assert rle_codec.rle_encode(mask) == "4 1 6 2"
    np.testing.assert_array_equal(rle_codec.rle_decode("4 1 6 2", (3, 4)), mask)


def test_blank_and_nan_decode_to_empty_and_empty_encodes_blank():
    for blank in ("", "  ", None, float("nan")):
        assert rle_codec.is_blank(blank)
        assert rle_codec.rle_decode(blank, (5, 7)).shape == (5, 7)
        assert not rle_codec.rle_decode(blank, (5, 7)).any()
    assert not rle_codec.is_blank("1 2") and not rle_codec.is_blank(0.0)
    assert rle_codec.rle_encode(np.zeros((8, 8), bool)) == ""


def test_runs_wrap_across_columns_as_kaggle_does():
    mask = np.zeros((4, 3), np.uint8)
    mask[3, 0] = mask[0, 1] = 1  # bottom of column 0, top of column 1: adjacent pixels 4 and 5
    assert rle_codec.rle_encode(mask) == kernel_rle_encode(mask) == "4 2"


def test_kaggle_tile_shape_is_the_default():
    assert rle_codec.KAGGLE_SHAPE == (rle_codec.KAGGLE_SIZE, rle_codec.KAGGLE_SIZE) == (768, 768)
    assert rle_codec.rle_decode("589823 2").shape == (768, 768)  # the last two pixels of a tile
    with pytest.raises(rle_codec.RLEError, match="past the image's 589824 pixels"):
        rle_codec.parse_rle("589824 2")


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
    for call in (lambda: rle_codec.rle_decode(rle, (5, 7), image_id="abc.jpg", line=7),
                 lambda: rle_codec.parse_rle(rle, (5, 7), image_id="abc.jpg", line=7),
                 lambda: rle_codec.kaggle_rle_to_coco(rle, (5, 7), image_id="abc.jpg", line=7)):
        with pytest.raises(rle_codec.RLEError, match=message) as info:
            call()
        assert "ImageId abc.jpg" in str(info.value) and "line 7" in str(info.value)
        assert isinstance(info.value, ValueError)


def test_parse_rle_gives_zero_indexed_runs():
    starts, lengths = rle_codec.parse_rle("4 1 6 2", (3, 4))
    assert starts.tolist() == [3, 5] and lengths.tolist() == [1, 2]
    assert starts.dtype == lengths.dtype == np.int64
    assert rle_codec.rle_area("4 1 6 2", (3, 4)) == 3


def test_asymmetric_mask_would_fail_if_transposed():
    mask = np.zeros((6, 9), np.uint8)
    mask[1, 2:7] = 1  # a horizontal bar: transposing it gives a different mask
    rle = rle_codec.rle_encode(mask)
    assert rle == "14 1 20 1 26 1 32 1 38 1"
    assert not np.array_equal(rle_codec.rle_decode(rle, (9, 6)).T, mask[:, :6].T)
    assert rle_codec.rle_bbox(rle, mask.shape) == [2.0, 1.0, 5.0, 1.0]


# ---------------------------------------------------------------- properties
def masks(max_side: int = 24):
    shapes = st.tuples(st.integers(1, max_side), st.integers(1, max_side))
    return shapes.flatmap(lambda shape: arrays(np.uint8, shape, elements=st.integers(0, 1)))


@settings(max_examples=300, deadline=None)
@given(masks())
def test_round_trip_random_masks_any_shape(mask):
    rle = rle_codec.rle_encode(mask)
    decoded = rle_codec.rle_decode(rle, mask.shape)
    np.testing.assert_array_equal(decoded, mask)
    assert decoded.dtype == np.uint8 and decoded.shape == mask.shape
    assert rle == kernel_rle_encode(mask)  # bit-identical to the kernels, also for non-square masks
    assert rle_codec.rle_encode(np.asfortranarray(mask)) == rle == rle_codec.rle_encode(mask.astype(bool))


@settings(max_examples=200, deadline=None)
@given(masks())
def test_coco_side_agrees_with_pycocotools(mask):
    rle = rle_codec.rle_encode(mask)
    reference = mask_util.encode(np.asfortranarray(mask))
    coco = rle_codec.kaggle_rle_to_coco(rle, mask.shape)
    assert coco["size"] == list(mask.shape)
    assert coco["counts"] == reference["counts"].decode("ascii")
    assert rle_codec.coco_to_kaggle_rle(coco) == rle
    assert rle_codec.coco_to_kaggle_rle(reference) == rle  # bytes counts too
    assert rle_codec.rle_area(rle, mask.shape) == int(mask_util.area(reference)) == int(mask.sum())
    if mask.any():
        np.testing.assert_allclose(rle_codec.rle_bbox(rle, mask.shape), mask_util.toBbox(reference))


def _pycocotools_counts(mask: np.ndarray) -> str:
    return mask_util.encode(np.asfortranarray(mask))["counts"].decode("ascii")


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 24).flatmap(lambda side: st.lists(arrays(np.uint8, (side, side + 3), elements=st.integers(0, 1)),
                                                        min_size=1, max_size=6)))
def test_batched_coco_compression_matches_pycocotools(mask_list):
    # The dataset-dict path compresses every mask of a CSV in one compiled pass (no pycocotools).
    shape = mask_list[0].shape
    runs = rle_codec.ParsedRuns([rle_codec.rle_encode(m) for m in mask_list], shape)
    for mask, coco in zip(mask_list, runs.coco()):
        if mask.any():
            assert coco == {"size": list(shape), "counts": _pycocotools_counts(mask)}
        else:
            assert coco is None
    np.testing.assert_array_equal(runs.areas(), [int(m.sum()) for m in mask_list])


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
    coco = rle_codec.ParsedRuns([rle_codec.rle_encode(m) for m in mask_list], shape).coco()
    assert [c["counts"] for c in coco] == [_pycocotools_counts(m) for m in mask_list]
    for mask, c in zip(mask_list, coco):
        np.testing.assert_array_equal(mask_util.decode({"size": c["size"], "counts": c["counts"].encode()}), mask)


def test_empty_inputs_give_empty_results():
    assert rle_codec.kaggle_rles_to_coco([]) == [] and rle_codec.ParsedRuns([], (768, 768)).coco() == []
    empty = mask_util.encode(np.zeros((768, 768), np.uint8, order="F"))["counts"].decode("ascii")
    assert rle_codec.kaggle_rle_to_coco("") == {"size": [768, 768], "counts": empty}
    assert rle_codec.coco_to_kaggle_rle({"size": [768, 768], "counts": empty}) == ""


def test_runs_past_two_to_the_31_pixels_are_kept_exactly():
    shape = (50_000, 50_000)  # 2.5e9 pixels: the runs are stored as int64, not int32
    rle = "1 3 2400000000 7"
    runs = rle_codec.ParsedRuns([rle], shape)
    assert runs.starts.dtype == np.int64 and runs.starts.tolist() == [0, 2_399_999_999]
    reference = mask_util.frPyObjects([{"size": list(shape), "counts": [0, 3, 2_399_999_996, 7,
                                                                         2_500_000_000 - 2_400_000_006]}], *shape)
    assert rle_codec.kaggle_rle_to_coco(rle, shape)["counts"] == reference[0]["counts"].decode("ascii")
    assert rle_codec.ParsedRuns(["1 3"], (768, 768)).starts.dtype == np.int32


# ---------------------------------------------------------------- on the real Kaggle rows
def test_bit_identical_to_the_kaggle_kernels_on_every_real_row(segmentations_subset_csv):
    rles = pd.read_csv(segmentations_subset_csv, dtype=str, keep_default_na=False)["EncodedPixels"].tolist()
    ships = [r for r in rles if r]
    assert len(ships) > 40_000
    mismatches = []
    for k, rle in enumerate(ships):
        reference = kernel_rle_decode(rle)
        ours = rle_codec.rle_decode(rle)
        if not np.array_equal(ours, reference) or rle_codec.rle_encode(ours) != kernel_rle_encode(reference):
            mismatches.append(k)
    assert not mismatches, f"{len(mismatches)} rows differ, first {ships[mismatches[0]][:60]}"


def test_coco_conversion_matches_pycocotools_on_real_rows(segmentations_subset_csv):
    rles = pd.read_csv(segmentations_subset_csv, dtype=str, keep_default_na=False, nrows=3000)["EncodedPixels"]
    rles = [r for r in rles if r]
    ours = rle_codec.kaggle_rles_to_coco(rles)
    for rle, coco in zip(rles, ours):
        reference = mask_util.encode(np.asfortranarray(kernel_rle_decode(rle)))
        assert coco["counts"] == reference["counts"].decode("ascii")
    np.testing.assert_allclose([rle_codec.rle_bbox(r) for r in rles[:500]],
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
            verdicts.append(rle_codec.parse_rle(text, shape))
        except rle_codec.RLEError as exc:
            verdicts.append(exc)
    bad = [k for k, v in enumerate(verdicts) if isinstance(v, Exception)]
    ids = [f"{k}.jpg" for k in range(len(texts))]
    if bad:
        with pytest.raises(rle_codec.RLEError) as info:
            rle_codec.ParsedRuns(texts, shape, image_ids=ids, lines=range(2, len(texts) + 2))
        # the first bad string is named, with parse_rle's own reason
        assert info.value.image_id == ids[bad[0]] and info.value.reason == verdicts[bad[0]].reason
    else:
        runs = rle_codec.ParsedRuns(texts, shape, image_ids=ids)
        for k, (starts, lengths) in enumerate(verdicts):
            own = slice(runs.offsets[k], runs.offsets[k] + runs.n_runs[k])
            np.testing.assert_array_equal(runs.starts[own], starts)
            np.testing.assert_array_equal(runs.lengths[own], lengths)


def test_parallel_scan_matches_one_thread_and_names_the_first_bad_row(segmentations_subset_csv):
    kernels = rle_codec.get_kernels()

    frame = pd.read_csv(segmentations_subset_csv, dtype=str, keep_default_na=False, nrows=3000)
    rows = list(zip(frame.ImageId, frame.EncodedPixels))
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


def test_kernels_work_without_a_writable_cache_folder(repo_root):
    # ZipCacheLocator alone finds no place for a file outside a zip: what numba sees on a read-only
    # install without a writable $NUMBA_CACHE_DIR or home
    env = dict(os.environ, NUMBA_CACHE_LOCATOR_CLASSES="ZipCacheLocator")
    code = ("import module_rle as r, module_rle_kernels as k; "
            "print(r.kaggle_rle_to_coco('1 3')['counts'], len(k.UNCACHED) > 5)")
    out = subprocess.run([sys.executable, "-c", code], cwd=repo_root, env=env, capture_output=True, text=True,
                         check=True)
    assert out.stdout.split() == [rle_codec.kaggle_rle_to_coco("1 3")["counts"], "True"]
    assert "NUMBA_CACHE_DIR" in out.stderr and out.stderr.count("RuntimeWarning") == 1


# ---------------------------------------------------------------- masks <-> COCO RLE
def test_masks_to_coco_and_back_keep_pixel_order():
    shape = (5, 9)  # not square: a transposition would not even fit
    masks = np.zeros((2, *shape), bool)
    masks[0, 1, 2:7] = True  # a horizontal bar
    masks[1, 0:4, 8] = True  # a vertical bar in the last column
    coco = rle_codec.masks_to_coco(masks)
    assert [c["size"] for c in coco] == [list(shape)] * 2
    back = rle_codec.coco_to_masks(coco, shape)
    assert back.dtype == bool and back.shape == (2, *shape)
    np.testing.assert_array_equal(back, masks)
    # the same masks through the Kaggle strings: column-major on both sides
    assert [rle_codec.coco_to_kaggle_rle(c) for c in coco] == [rle_codec.rle_encode(m) for m in masks]
    np.testing.assert_array_equal(rle_codec.coco_area(coco), [5, 4])
    assert rle_codec.masks_to_coco(np.zeros((0, *shape), bool)) == [] and rle_codec.masks_to_coco([]) == []
    assert rle_codec.coco_to_masks([], shape).shape == (0, *shape)
    with pytest.raises(ValueError, match=r"\(N, H, W\)"):
        rle_codec.masks_to_coco(np.zeros(4, bool))


# ---------------------------------------------------------------- the overlap finder
def test_overlapping_masks_are_named_by_index_without_false_alarms():
    # (starts, lengths), 0-indexed column-major, as parse_rle returns them
    runs = [(np.array([1, 30]), np.array([5, 5])),  # pixels 1-5 and 30-34
            (np.array([6, 40]), np.array([3, 2])),  # 6-8 and 40-41: touches the first, shares nothing
            (np.array([100]), np.array([50])),  # 100-149
            (np.array([120]), np.array([2]))]  # 120-121: inside the third
    assert rle_codec.find_overlapping_masks(runs) == [(2, 3, 2)]
    assert rle_codec.find_overlapping_masks(runs[:2]) == [] and rle_codec.find_overlapping_masks(runs[:1]) == []


@settings(max_examples=60, deadline=None)
@given(mask_list=st.lists(arrays(np.uint8, (6, 8), elements=st.integers(0, 1)), min_size=2, max_size=5))
def test_overlapping_masks_match_a_pixel_count(mask_list):
    shape = (6, 8)
    runs = [rle_codec.parse_rle(rle_codec.rle_encode(m), shape) for m in mask_list]
    expected = [(a, b, int((mask_list[a] & mask_list[b]).sum())) for a in range(len(mask_list))
                for b in range(a + 1, len(mask_list)) if (mask_list[a] & mask_list[b]).any()]
    assert rle_codec.find_overlapping_masks(runs, shape) == expected
