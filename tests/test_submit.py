"""module_submit's logic with fake models: gate, overlap removal, failures, shards, validate, score, tune.

The models are plain callables here (the unit under test is the plumbing around them); the full
path with real trained models is in test_submit_models.py.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

import module_config
import module_files
import module_inference
import module_rle
import module_submit
import module_tuning
from module_inference import Thresholds
from module_submit import get_args_parser, main
from module_tuning import TuneImage

REPO_ROOT = Path(__file__).resolve().parents[1]


def run_cli(*argv: str) -> int:
    return main(get_args_parser().parse_args([str(a) for a in argv]))


def rect(shape, top, left, height, width) -> np.ndarray:
    """(H, W) bool mask with a filled rectangle; rows top..top+height, columns left..left+width."""
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + height, left:left + width] = True
    return mask


def write_jpeg(path: Path, size: int = 32, value: int = 90) -> Path:
    Image.fromarray(np.full((size, size, 3), value, dtype=np.uint8)).save(path, quality=95)
    return path


def write_csv(path: Path, rows: list[tuple[str, str]], header: str = "ImageId,EncodedPixels") -> Path:
    path.write_text(header + "\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return path


# --------------------------------------------------------------------------- overlap logic
SHAPE = (6, 5)  # tall, so a transposed mask lands elsewhere


def canned_detections() -> tuple[np.ndarray, np.ndarray]:
    """Four overlapping detections on a 6x5 image, checked by hand below.

    A score 0.9: rows 0-2, cols 0-1 (6 px)
    B score 0.8: rows 1-5, col 1 (5 px; rows 1-2 of it are A's) -> keeps rows 3-5, col 1 (3 px)
    C score 0.3: rows 4-5, cols 3-4, below the 0.5 score threshold -> dropped
    D score 0.7: rows 0-1, cols 1-2 (4 px; 2 px are A's) -> keeps 2 px, below min area 3 -> dropped
    """
    masks = np.stack([rect(SHAPE, 0, 0, 3, 2), rect(SHAPE, 1, 1, 5, 1), rect(SHAPE, 4, 3, 2, 2),
                      rect(SHAPE, 0, 1, 2, 2)])
    return masks, np.array([0.9, 0.8, 0.3, 0.7], dtype=np.float32)


def test_overlaps_resolved_exactly_by_score():
    masks, scores = canned_detections()
    rles = module_submit.instances_to_rles(masks, scores, Thresholds(0.5, score=0.5, min_area=3))
    # Column-major, 1-indexed on a 6-row image: A = rows 0-2 of cols 0 and 1 -> pixels 1-3, 7-9.
    assert rles == ["1 3 7 3", "10 3"]  # A whole; B keeps rows 3-5 of col 1 (pixels 10-12)
    decoded = np.stack([module_rle.rle_decode(r, SHAPE).astype(bool) for r in rles])
    assert not (decoded[0] & decoded[1]).any()
    np.testing.assert_array_equal(decoded[1], rect(SHAPE, 3, 1, 3, 1))


def test_min_area_counts_pixels_after_overlap_removal():
    masks, scores = canned_detections()
    # With min area 2, D's 2 remaining pixels (rows 0-1, col 2) survive; C still fails the score.
    rles = module_submit.instances_to_rles(masks, scores, Thresholds(0.5, score=0.5, min_area=2))
    assert rles == ["1 3 7 3", "10 3", "13 2"]


class FakeDetector:
    """Canned overlapping detections for every image; records which images it saw."""

    def __init__(self, shape=SHAPE):
        self.shape = shape
        self.seen_shapes: list[tuple] = []
        self.calls = 0

    def __call__(self, images):
        self.calls += 1
        self.seen_shapes.extend(image.shape for image in images)
        masks, scores = canned_detections()
        return [{"masks": masks, "scores": scores} for _ in images]


def make_images(folder: Path, names, size=SHAPE):
    folder.mkdir(exist_ok=True)
    for name in names:
        Image.fromarray(np.zeros((*size, 3), dtype=np.uint8)).save(folder / name)
    return folder


def test_gate_keeps_low_p_ship_images_from_the_detector(tmp_path):
    names = [f"{k:09x}.png" for k in range(5)]
    folder = make_images(tmp_path / "images", names)
    p_ship = dict(zip(names, [0.1, 0.95, 0.49, 0.5, 0.8]))
    seen_by_classifier = []

    def p_ship_fn(paths):
        seen_by_classifier.extend(Path(p).name for p in paths)
        return np.array([p_ship[Path(p).name] for p in paths])

    detector = FakeDetector()
    result = module_submit.predict_rows(names, folder, detector, Thresholds(0.5, 0.5, 3), p_ship_fn=p_ship_fn,
                                        batch_size=2, chunk_size=3, progress=False)
    assert seen_by_classifier == names
    assert len(detector.seen_shapes) == 3 and detector.calls == 2  # 0.95 | 0.5, 0.8 in batches of 2
    rows = result.rows.groupby("ImageId", sort=False)["EncodedPixels"].apply(list)
    assert list(rows.index) == names
    for name in names:
        expected = ["1 3 7 3", "10 3"] if p_ship[name] >= 0.5 else [""]
        assert rows[name] == expected, name
    assert result.n_detected == 3 and result.failures.empty
    assert result.p_ship.loc[names[2]] == pytest.approx(0.49)


def test_ungated_runs_detector_on_every_image(tmp_path):
    names = [f"{k:09x}.png" for k in range(3)]
    folder = make_images(tmp_path / "images", names)
    detector = FakeDetector()
    result = module_submit.predict_rows(names, folder, detector, Thresholds(0.0, 0.5, 3),
                                        p_ship_fn=lambda paths: pytest.fail("ungated must not classify"),
                                        progress=False)
    assert len(detector.seen_shapes) == 3 and result.n_detected == 3
    assert result.p_ship.isna().all()


def test_missing_and_corrupt_images_get_blank_rows_and_a_report(tmp_path):
    folder = make_images(tmp_path / "images", ["a.jpg", "c.jpg"])
    good = (folder / "c.jpg").read_bytes()
    (folder / "b.jpg").write_bytes(good[: len(good) // 2])  # truncated JPEG
    ids = ["a.jpg", "b.jpg", "c.jpg", "missing.jpg"]
    ids_csv = write_csv(tmp_path / "ids.csv", [(i, "1 2") for i in ids])
    detector = FakeDetector()
    result = module_submit.predict_rows(ids, folder, detector, Thresholds(0.5, 0.5, 3),
                                        p_ship_fn=lambda paths: np.ones(len(paths)), progress=False)
    assert sorted(result.failures["ImageId"]) == ["b.jpg", "missing.jpg"]
    assert "missing.jpg" in result.failures.set_index("ImageId").loc["missing.jpg", "reason"]
    assert set(result.rows["ImageId"]) == set(ids)
    assert result.rows.loc[result.rows["ImageId"].isin(["b.jpg", "missing.jpg"]), "EncodedPixels"].eq("").all()
    out = tmp_path / "sub.csv"
    module_submit.write_submission(result.rows, out)
    report = pd.read_csv(module_files.write_failure_report(result.failures, out))
    assert sorted(report["ImageId"]) == ["b.jpg", "missing.jpg"]
    assert module_submit.validate_submission(out, ids_csv, SHAPE) == []


def test_classifier_nan_is_a_failure_not_a_crash(tmp_path):
    folder = make_images(tmp_path / "images", ["a.png", "b.png"])
    result = module_submit.predict_rows(["a.png", "b.png"], folder, FakeDetector(), Thresholds(0.5, 0.5, 3),
                                        p_ship_fn=lambda paths: np.array([np.nan, 0.9]), progress=False)
    assert list(result.failures["ImageId"]) == ["a.png"]
    assert result.rows.set_index("ImageId").loc["a.png", "EncodedPixels"] == ""


# --------------------------------------------------------------------------- shards and merge
def test_shards_merge_back_in_id_order(tmp_path):
    ids = [f"{k:09x}.jpg" for k in range(10)]
    ids_csv = write_csv(tmp_path / "ids.csv", [(i, "1 2") for i in ids])
    shards = []
    for index in range(3):
        part = module_submit.select_shard(ids, index, 3)
        rows = [(i, "5 3") for i in part] + [(part[0], "20 1")]  # one image with two ships
        shards.append(write_csv(tmp_path / f"part{index}.csv", rows))
    assert run_cli("merge", "--shards", *shards, "--ids", ids_csv, "--out", tmp_path / "all.csv") == 0
    merged = pd.read_csv(tmp_path / "all.csv", dtype=str, keep_default_na=False)
    assert list(pd.unique(merged["ImageId"])) == ids and len(merged) == 13
    with pytest.raises(ValueError, match="in no shard"):
        run_cli("merge", "--shards", *shards[:2], "--ids", ids_csv, "--out", tmp_path / "bad.csv")
    with pytest.raises(ValueError, match="in both"):
        run_cli("merge", "--shards", shards[0], shards[0], shards[1], shards[2], "--ids", ids_csv,
                "--out", tmp_path / "bad.csv")
    assert not (tmp_path / "bad.csv").exists()


@pytest.mark.parametrize("bad_row, problem", [
    ("265143 1 265910", "invalid RLE"),  # an odd number of tokens: a broken shard, not Kaggle RLE
    ("10 5 12 3", "invalid RLE"),  # overlapping runs
    ("", "blank row although"),  # a blank row beside the image's mask row
])
def test_merge_validates_every_shard_and_names_the_bad_one(tmp_path, bad_row, problem):
    ids = [f"{k:09x}.jpg" for k in range(6)]
    ids_csv = write_csv(tmp_path / "ids.csv", [(i, "1 2") for i in ids])
    good = write_csv(tmp_path / "part0.csv", [(i, "5 3") for i in module_submit.select_shard(ids, 0, 2)])
    part = module_submit.select_shard(ids, 1, 2)
    bad = write_csv(tmp_path / "part1.csv", [(i, "5 3") for i in part] + [(part[1], bad_row)])
    with pytest.raises(ValueError, match=rf"shard {bad}: 1 violation\(s\), first: line 5: {part[1]}: {problem}"):
        run_cli("merge", "--shards", good, bad, "--ids", ids_csv, "--out", tmp_path / "all.csv")
    assert not (tmp_path / "all.csv").exists()


@pytest.mark.parametrize("text", ["3/3", "-1/3", "1", "a/b", "0/0"])
def test_bad_shard_spec_is_rejected(text):
    with pytest.raises(ValueError, match="--shard"):
        module_config.parse_shard(text)


# --------------------------------------------------------------------------- validate
VALID_ROWS = [("a.jpg", "1 3 10 2"), ("a.jpg", "20 5"), ("b.jpg", ""), ("c.jpg", "589820 4")]


@pytest.mark.parametrize("case, rows, header, expected", [
    ("header", VALID_ROWS, "ImageId,Pixels", "line 1: header"),
    ("missing id", VALID_ROWS[:3], None, "c.jpg: ImageId missing"),
    ("unknown id", VALID_ROWS + [("zzz.jpg", "")], None, "line 6: zzz.jpg: ImageId is not in the id list"),
    ("non-integer token", [("a.jpg", "1 3 x 2")] + VALID_ROWS[2:], None, "line 2: a.jpg: invalid RLE"),
    ("odd token count", [("a.jpg", "1 3 10")] + VALID_ROWS[2:], None, "line 2: a.jpg: invalid RLE"),
    ("start not positive", [("a.jpg", "0 3")] + VALID_ROWS[2:], None, "line 2: a.jpg: invalid RLE"),
    ("length not positive", [("a.jpg", "5 0")] + VALID_ROWS[2:], None, "line 2: a.jpg: invalid RLE"),
    ("unsorted runs", [("a.jpg", "10 2 1 3")] + VALID_ROWS[2:], None, "line 2: a.jpg: invalid RLE"),
    ("outside 768x768", VALID_ROWS[:3] + [("c.jpg", "589822 4")], None, "line 5: c.jpg: invalid RLE"),
    ("masks overlap", [("a.jpg", "1 3 10 2"), ("a.jpg", "11 5")] + VALID_ROWS[2:], None,
     "line 3: a.jpg: mask overlaps the mask on line 2"),
    ("blank row beside masks", VALID_ROWS + [("a.jpg", "")], None, "a.jpg: blank row although"),
    ("two blank rows", VALID_ROWS + [("b.jpg", "")], None, "line 6: b.jpg: 2 blank rows"),
])
def test_validate_catches_each_violation(tmp_path, capsys, case, rows, header, expected):
    ids_csv = write_csv(tmp_path / "ids.csv", [("a.jpg", "1 2"), ("b.jpg", "1 2"), ("c.jpg", "1 2")])
    sub = write_csv(tmp_path / "sub.csv", rows, **({"header": header} if header else {}))
    assert run_cli("validate", "--submission", sub, "--ids", ids_csv) == 1, case
    out = capsys.readouterr().out
    assert expected in out, out
    assert out.strip().splitlines()[-1].startswith("INVALID: 1 violations"), out  # that one, and no false alarm


def test_validate_without_the_encoded_pixels_column_does_not_call_present_ids_missing(tmp_path, capsys):
    ids_csv = write_csv(tmp_path / "ids.csv", [("a.jpg", "1 2"), ("b.jpg", "1 2"), ("c.jpg", "1 2")])
    sub = tmp_path / "sub.csv"
    sub.write_text("ImageId\na.jpg\nb.jpg\n")  # c.jpg really is missing
    violations = module_submit.validate_submission(sub, ids_csv)
    assert [(v.line, v.image_id, v.kind) for v in violations] == [
        (1, "", "header"), (2, "a.jpg", "fields"), (3, "b.jpg", "fields"), (0, "c.jpg", "missing id")]
    assert run_cli("validate", "--submission", sub, "--ids", ids_csv) == 1
    out = capsys.readouterr().out
    assert "a.jpg: ImageId missing" not in out and "c.jpg: ImageId missing" in out
    assert "line 2: a.jpg: expected 2 fields, got 1" in out


def test_validate_accepts_a_valid_submission(tmp_path, capsys):
    ids_csv = write_csv(tmp_path / "ids.csv", [("a.jpg", "1 2"), ("b.jpg", "1 2"), ("c.jpg", "1 2")])
    sub = write_csv(tmp_path / "sub.csv", VALID_ROWS)
    assert run_cli("validate", "--submission", sub, "--ids", ids_csv) == 0
    assert capsys.readouterr().out.strip().startswith("VALID")


# --------------------------------------------------------------------------- score
def test_score_prints_f2_last_and_json(tmp_path, capsys):
    truth = write_csv(tmp_path / "truth.csv", [("a.jpg", "1 10"), ("b.jpg", "")])
    # a: the ship found plus one false mask -> 5/(5+1) at every threshold; b: empty and empty -> 1.
    sub = write_csv(tmp_path / "sub.csv", [("a.jpg", "1 10"), ("a.jpg", "100 10"), ("b.jpg", "")])
    assert run_cli("score", "--submission", sub, "--truth", truth) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].split()[0] == "F2" and float(lines[-1].split()[1]) == pytest.approx((5 / 6 + 1) / 2, abs=1e-5)
    assert run_cli("score", "--submission", sub, "--truth", truth, "--json") == 0
    body = json.loads(capsys.readouterr().out)
    assert body["f2"] == pytest.approx((5 / 6 + 1) / 2)
    assert {r["ImageId"]: r["f2"] for r in body["per_image"]} == pytest.approx({"a.jpg": 5 / 6, "b.jpg": 1.0})


def test_score_rejects_an_extra_column_like_validate_does(tmp_path, capsys):
    truth = write_csv(tmp_path / "truth.csv", [("a.jpg", "1 10"), ("b.jpg", "")])
    sub = tmp_path / "sub.csv"
    sub.write_text("ImageId,EncodedPixels,Confidence\na.jpg,1 10,0.9\nb.jpg,,0.1\n")
    assert run_cli("validate", "--submission", sub, "--ids", truth) == 1
    assert "header is 'ImageId,EncodedPixels,Confidence'" in capsys.readouterr().out
    with pytest.raises(ValueError, match=rf"{sub}: not a valid submission .*header is 'ImageId,EncodedPixels,Confidence'"):
        run_cli("score", "--submission", sub, "--truth", truth)
    with pytest.raises(ValueError, match="not a valid submission"):
        module_submit.score_report(sub, truth)


def test_score_rejects_two_blank_rows_like_validate_does(tmp_path):
    truth = write_csv(tmp_path / "truth.csv", [("a.jpg", "1 10"), ("b.jpg", "")])
    sub = write_csv(tmp_path / "sub.csv", [("a.jpg", "1 10"), ("b.jpg", ""), ("b.jpg", "")])
    with pytest.raises(ValueError, match=r"line 4: b.jpg: 2 blank rows"):
        module_submit.score_report(sub, truth)


@pytest.mark.parametrize("which, text, message", [
    ("truth", "ImageId,EncodedPixels\n", "only a header, no rows"),
    ("truth", "", "the file is empty"),
    ("submission", "ImageId,EncodedPixels\n", "ImageId missing"),
    ("submission", "", "file is empty"),
], ids=["truth header-only", "truth 0-byte", "submission header-only", "submission 0-byte"])
def test_score_of_a_header_only_or_empty_file_is_an_error_naming_it(tmp_path, which, text, message):
    files = {"truth": write_csv(tmp_path / "truth.csv", [("a.jpg", "1 10"), ("b.jpg", "")]),
             "submission": write_csv(tmp_path / "sub.csv", [("a.jpg", "1 10"), ("b.jpg", "")])}
    files[which].write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        run_cli("score", "--submission", files["submission"], "--truth", files["truth"])
    assert str(files[which]) in str(info.value)


# --------------------------------------------------------------------------- tune
def constructed_cache(tmp_path: Path) -> list[TuneImage]:
    """Five images whose best thresholds are known: classifier 0.5, score 0.6, min area 20.

    On the grids classifier [0.2, 0.5, 0.8] x score [0.3, 0.6, 0.9] x min area [0, 20, 100], only
    (0.5, 0.6, 20) gives every image F2 1:
    - E1 ship-free, p 0.3, a confident false mask: needs classifier > 0.3;
    - S1 p 0.6: its ship (score 0.95) and a false mask (score 0.5): needs classifier <= 0.6, score > 0.5;
    - S2 p 0.9: its ship has score 0.7 (needs score <= 0.7) and a 12-px false mask (needs min area > 12);
    - S3 p 0.9: a 50-px ship (needs min area <= 50);
    - E2 ship-free, p 0.1, nothing detected.
    """
    shape = (64, 64)
    ship, other, small = rect(shape, 10, 10, 10, 20), rect(shape, 40, 40, 10, 20), rect(shape, 50, 5, 3, 4)
    little = rect(shape, 30, 30, 5, 10)
    none = np.zeros((0, *shape), dtype=bool)
    specs = [("e1.png", 0.3, none, [(other, 0.95)]),
             ("s1.png", 0.6, ship[None], [(ship, 0.95), (other, 0.5)]),
             ("s2.png", 0.9, ship[None], [(ship, 0.7), (small, 0.95)]),
             ("s3.png", 0.9, little[None], [(little, 0.95)]),
             ("e2.png", 0.1, none, [])]
    cache = []
    for name, p, true, detections in specs:
        write_jpeg(tmp_path / name, size=64)
        pred = np.stack([m for m, _ in detections]) if detections else none
        cache.append(TuneImage.from_masks(name, str(tmp_path / name), p, pred,
                                          np.array([s for _, s in detections]), true))
    return cache


def test_tune_picks_the_known_best_thresholds(tmp_path):
    cfg = module_config.get_cfg(None, [
        "PATHS.RUNS_DIR", str(tmp_path / "runs"), "PATHS.RUN_NAME", "t",
        "SUBMIT.TUNE_CLASSIFIER_THRESHOLDS", "[0.2, 0.5, 0.8]", "SUBMIT.TUNE_SCORE_THRESHOLDS", "[0.3, 0.6, 0.9]",
        "SUBMIT.TUNE_MIN_AREAS", "[0, 20, 100]"])
    cache = constructed_cache(tmp_path)
    out_dir = module_config.get_submission_dir(cfg)
    chosen, f2, grid = module_tuning.tune(cache, cfg, progress=False)
    assert chosen == Thresholds(0.5, 0.6, 20) and f2 == pytest.approx(1.0)
    assert len(grid) == 27 and (grid["f2"] < 1.0).sum() == 26
    # One step away on each axis costs exactly the image that needs it: one of five.
    for column, value in (("classifier_threshold", 0.8), ("score_threshold", 0.9), ("min_area", 0)):
        row = grid[(grid["classifier_threshold"] == (value if column == "classifier_threshold" else 0.5))
                   & (grid["score_threshold"] == (value if column == "score_threshold" else 0.6))
                   & (grid["min_area"] == (value if column == "min_area" else 20))]
        assert row["f2"].item() < 1.0
    assert (tmp_path / "runs/t/plots/tune_f2.png").stat().st_size > 0
    assert (tmp_path / "runs/t/plots/val_overlays.png").stat().st_size > 0
    assert module_config.get_submission_path(cfg, "thresholds") == out_dir / "thresholds.yaml"
    pd.testing.assert_frame_equal(pd.read_csv(out_dir / "tune_grid.csv"), grid)
    saved = yaml.safe_load((out_dir / "thresholds.yaml").read_text())
    assert saved["thresholds"] == {"CLASSIFIER_THRESHOLD": 0.5, "SCORE_THRESHOLD": 0.6, "MIN_AREA": 20}
    assert saved["detector_alone_f2"] is None  # no classifier threshold 0 in this grid
    # predict picks them up.
    assert module_inference.get_thresholds(cfg)[0] == chosen


def test_tune_image_crops_to_the_frame_of_all_masks():
    shape = (40, 30)
    pred = np.stack([rect(shape, 5, 3, 4, 6), rect(shape, 20, 10, 3, 3)])
    true = np.stack([rect(shape, 6, 3, 4, 6)])
    image = TuneImage.from_masks("x.jpg", "x.jpg", 0.7, pred, np.array([0.9, 0.8]), true)
    pred_c, true_c, offset = image.decode()
    assert offset == (5, 3) and pred_c.shape == (2, 18, 10) and true_c.shape == (1, 18, 10)
    np.testing.assert_array_equal(pred_c, pred[:, 5:23, 3:13])
    np.testing.assert_array_equal(true_c, true[:, 5:23, 3:13])
    full_pred, full_true, _ = image.decode(crop=False)
    np.testing.assert_array_equal(full_pred, pred)
    np.testing.assert_array_equal(full_true, true)


# --------------------------------------------------------------------------- full scale
def test_full_scale_submission_from_three_shards_validates(tmp_path, airbus_sample, capsys):
    """The 15,606 competition test ids, predicted in 3 shards by fast fake models, merged, validated."""
    ids_csv = airbus_sample / "sample_submission_v2.csv"
    ids = module_files.read_image_ids(ids_csv)
    assert len(ids) == 15606
    shape = module_rle.KAGGLE_SHAPE
    # About 22% of the images pass the gate; each gets two overlapping ships whose place depends on the id.
    p_ship_fn = lambda paths: np.array([int(Path(p).stem[:6], 16) % 100 / 100 for p in paths])

    def detect_fn(images):
        out = []
        for image in images:
            k = int(image[0, 0, 0])
            masks = np.stack([rect(shape, 3 * k, 2 * k, 30, 12), rect(shape, 3 * k + 20, 2 * k + 5, 30, 12)])
            out.append({"masks": masks, "scores": np.array([0.6, 0.9], dtype=np.float32)})
        return out

    load_image = lambda path: np.full((1, 1, 3), int(Path(path).stem[:6], 16) % 200, dtype=np.uint8)
    shards = []
    for index in range(3):
        part = module_submit.select_shard(ids, index, 3)
        result = module_submit.predict_rows(part, tmp_path / "no-images-needed", detect_fn, Thresholds(0.78, 0.5, 20),
                                            p_ship_fn=p_ship_fn, batch_size=16, load_image=load_image,
                                            progress=False)
        shards.append(module_submit.write_submission(result.rows, tmp_path / f"part{index}.csv"))
    out = tmp_path / "submission.csv"
    assert run_cli("merge", "--shards", *shards, "--ids", ids_csv, "--out", out) == 0
    merged = pd.read_csv(out, dtype=str, keep_default_na=False)
    assert list(pd.unique(merged["ImageId"])) == ids
    per_image = merged.groupby("ImageId")["EncodedPixels"].apply(list)
    ship_images = per_image[per_image.map(lambda r: r != [""])]
    assert 0.18 < len(ship_images) / len(ids) < 0.26 and ship_images.map(len).eq(2).all()
    capsys.readouterr()
    assert run_cli("validate", "--submission", out, "--ids", ids_csv) == 0, capsys.readouterr().out
    # The same file with one row dropped and two masks made to overlap is caught.
    dropped = next(i for i in ids if per_image[i] == [""])
    broken = merged[merged["ImageId"] != dropped].copy()
    first_ship = ship_images.index[0]
    rows = broken.index[broken["ImageId"] == first_ship]
    broken.loc[rows[1], "EncodedPixels"] = broken.loc[rows[0], "EncodedPixels"]
    broken.to_csv(tmp_path / "broken.csv", index=False)
    assert run_cli("validate", "--submission", tmp_path / "broken.csv", "--ids", ids_csv) == 1
    report = capsys.readouterr().out
    assert f"{dropped}: ImageId missing" in report and f"{first_ship}: mask overlaps" in report
