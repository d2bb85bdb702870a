"""The competition metric on cases checkable by hand, on files, and on the real Kaggle truth.

Per image: F2(t) = 5TP / (5TP + 4FN + FP) at t = 0.50..0.95, a match needs IoU > t; the image
scores the mean over t; empty truth + no prediction = 1; the score is the mean over images.
"""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

import module_metric
from module_rle import kaggle_rles_to_coco, rle_encode

SHAPE = (24, 40)  # (H, W), not square: a transposed mask would not even fit


def box(top: int, left: int, height: int, width: int, shape=SHAPE) -> np.ndarray:
    """(H, W) bool mask with a filled rectangle."""
    mask = np.zeros(shape, bool)
    mask[top:top + height, left:left + width] = True
    return mask


def stack(*masks) -> np.ndarray:
    return np.stack(masks) if masks else np.zeros((0, *SHAPE), bool)


NINE_SHIPS = [box(r * 8, c * 12, 4, 6) for r in range(3) for c in range(3)]


@pytest.mark.parametrize("true_masks, pred_masks, expected", [
    pytest.param([], [], 1.0, id="empty-vs-empty"),
    pytest.param([], [box(2, 3, 4, 5)], 0.0, id="empty-vs-prediction"),
    pytest.param([box(2, 3, 4, 5)], [], 0.0, id="ship-vs-nothing"),
    pytest.param([box(2, 3, 4, 5)], [box(2, 3, 4, 5)], 1.0, id="exact"),
    # TP=1, FP=1, FN=0 at every threshold: 5 / (5 + 1)
    pytest.param([box(2, 3, 4, 5)], [box(2, 3, 4, 5), box(15, 20, 3, 3)], 5 / 6, id="one-ship-one-extra"),
    # TP=1, FN=8: 5 / (5 + 32)
    pytest.param(NINE_SHIPS, [NINE_SHIPS[4]], 5 / 37, id="nine-ships-one-found"),
    # TP=2, FP=1, FN=1: 10 / (10 + 4 + 1)
    pytest.param([box(0, 0, 3, 3), box(10, 10, 3, 3), box(20, 30, 3, 3)],
                 [box(0, 0, 3, 3), box(10, 10, 3, 3), box(5, 30, 2, 2)], 10 / 15, id="two-of-three-one-extra"),
])
def test_f2_masks_hand_computed(true_masks, pred_masks, expected):
    assert module_metric.f2_masks(stack(*true_masks), stack(*pred_masks)) == pytest.approx(expected, abs=1e-12)


# A 20 px wide box shifted right by k columns: IoU = (20 - k) / (20 + k). Unmatched at a
# threshold gives TP=0, FP=1, FN=1, i.e. F2=0; matched gives 1. So F2 = (#thresholds < IoU) / 10.
@pytest.mark.parametrize("shift, iou, thresholds_passed", [
    (0, 1.0, 10),
    (1, 19 / 21, 9),  # 0.905 > 0.90
    (2, 18 / 22, 7),  # 0.818: 0.50 .. 0.80
    (4, 16 / 24, 4),  # 0.667: 0.50 .. 0.65
    (5, 15 / 25, 2),  # exactly 0.6: "IoU > 0.6" fails, only 0.50 and 0.55 pass
    (8, 12 / 28, 0),  # 0.43
])
def test_shifted_mask_crosses_thresholds(shift, iou, thresholds_passed):
    truth, prediction = box(5, 2, 6, 20), box(5, 2 + shift, 6, 20)
    assert module_metric.iou_masks(stack(truth), stack(prediction))[0, 0] == pytest.approx(iou)
    assert module_metric.f2_masks(stack(truth), stack(prediction)) == pytest.approx(thresholds_passed / 10)
    # The same through Kaggle RLE strings, and through COCO RLE (the dataset dicts' segmentation).
    assert module_metric.f2_image([rle_encode(truth)], [rle_encode(prediction)], SHAPE) == pytest.approx(
        thresholds_passed / 10)
    true_coco, pred_coco = kaggle_rles_to_coco([rle_encode(truth), rle_encode(prediction)], SHAPE)
    assert module_metric.f2_coco([true_coco], [pred_coco]) == pytest.approx(thresholds_passed / 10)


def test_iou_exactly_half_never_matches():
    # 15 px wide, shifted by 5: IoU = 10 / 20 = 0.5, and a match needs IoU > 0.5.
    assert module_metric.f2_masks(stack(box(0, 0, 4, 15)), stack(box(0, 5, 4, 15))) == 0.0


def test_f2_image_hand_written_rle():
    # 4x4 image, pixels numbered down the columns: "1 4" is the first column.
    assert module_metric.f2_image(["1 4"], ["1 4"], (4, 4)) == 1.0
    assert module_metric.f2_image(["1 4"], ["1 3"], (4, 4)) == pytest.approx(0.5)  # IoU 0.75: 5 thresholds
    assert module_metric.f2_image(["1 4"], ["5 4"], (4, 4)) == 0.0  # the second column
    assert module_metric.f2_image([""], [""], (4, 4)) == 1.0  # blank rows are "no ship"


def test_greedy_matching_is_one_to_one():
    # Overlapping inputs (never in Kaggle truth): true 0 matches pred 0 (0.9); true 1 would only
    # match pred 0 too, which is taken.
    iou = np.array([[0.9, 0.6], [0.7, 0.0]])
    np.testing.assert_allclose(module_metric.match_greedy(iou), [0.9, 0.0])
    # TP is 1, not 2, FP 1, FN 1: 5 / (5 + 4 + 1) = 0.5 at the 8 thresholds 0.50 .. 0.85; 0 at 0.90, 0.95.
    assert module_metric.f2_from_iou(iou) == pytest.approx(0.5 * 8 / 10)


def test_f2_masks_agrees_with_a_plain_numpy_reference():
    rng = np.random.default_rng(0)
    for _ in range(20):
        truth = [box(int(rng.integers(0, 18)), c * 10, int(rng.integers(2, 6)), int(rng.integers(2, 9))) for c in range(3)]
        prediction = [np.roll(m, int(rng.integers(-2, 3)), axis=1) for m in truth[: int(rng.integers(0, 4))]]
        iou = np.array([[(t & p).sum() / (t | p).sum() for p in prediction] for t in truth]).reshape(3, len(prediction))
        expected = np.mean([
            5 * (tp := int(((iou > t).any(axis=1)).sum())) / (5 * tp + 4 * (3 - tp) + (len(prediction) - tp))
            for t in module_metric.IOU_THRESHOLDS])
        assert module_metric.f2_masks(np.stack(truth), stack(*prediction)) == pytest.approx(expected)


# ---------------------------------------------------------------- whole submissions
def _frames():
    """Four images: empty/empty (1), one ship + extra (5/6), prediction on empty (0), 9 ships vs 1 (5/37)."""
    ship, extra = rle_encode(box(2, 3, 4, 5)), rle_encode(box(15, 20, 3, 3))
    nine = [rle_encode(m) for m in NINE_SHIPS]
    truth = pd.DataFrame({"ImageId": ["a.jpg", "b.jpg", "c.jpg"] + ["d.jpg"] * 9, "EncodedPixels": ["", ship, ""] + nine})
    submission = pd.DataFrame({"ImageId": ["a.jpg", "b.jpg", "b.jpg", "c.jpg", "d.jpg"],
                               "EncodedPixels": ["", ship, extra, ship, nine[4]]})
    return submission, truth


def test_score_submission_mean_over_images_and_counts():
    submission, truth = _frames()
    result = module_metric.score_submission(submission, truth, shape=SHAPE)
    per_image = result.per_image.set_index("ImageId")
    np.testing.assert_allclose(per_image["f2"].to_numpy(), [1.0, 5 / 6, 0.0, 5 / 37])
    assert per_image["n_true"].tolist() == [0, 1, 0, 9]
    assert per_image["n_pred"].tolist() == [0, 2, 1, 1]
    assert result.f2 == pytest.approx((1 + 5 / 6 + 0 + 5 / 37) / 4)
    # At every threshold: TP = 1 (b) + 1 (d), FP = 1 (b) + 1 (c), FN = 8 (d).
    assert result.per_threshold["threshold"].tolist() == list(module_metric.IOU_THRESHOLDS)
    assert (result.per_threshold[["tp", "fp", "fn"]].to_numpy() == [2, 2, 8]).all()
    assert result.per_threshold["f2"].mean() == pytest.approx(result.f2)
    assert len(result.per_ship) == 10 and result.per_ship["recall"].sum() == pytest.approx(2.0)


def test_score_submission_from_csv_files(tmp_path):
    submission, truth = _frames()
    submission.to_csv(tmp_path / "submission.csv", index=False)
    truth.to_csv(tmp_path / "truth.csv", index=False)
    assert "a.jpg,\n" in (tmp_path / "truth.csv").read_text()  # blank rows as Kaggle writes them
    from_files = module_metric.score_submission(tmp_path / "submission.csv", str(tmp_path / "truth.csv"), shape=SHAPE)
    assert from_files.f2 == pytest.approx(module_metric.score_submission(submission, truth, shape=SHAPE).f2)


def test_report_and_json():
    submission, truth = _frames()
    result = module_metric.score_submission(submission, truth, shape=SHAPE)
    report = module_metric.format_score_report(result)
    assert report.splitlines()[-1] == f"F2 {result.f2:.5f}"
    as_json = json.loads(json.dumps(module_metric.score_to_json(result)))
    assert as_json["f2"] == pytest.approx(result.f2)
    assert {r["ImageId"]: r["f2"] for r in as_json["per_image"]}["b.jpg"] == pytest.approx(5 / 6)
    by_type = module_metric.f2_by_image_type(result).set_index("images")
    assert by_type.loc["ship-free", "f2"] == pytest.approx(0.5)  # a: 1, c: 0
    assert by_type.loc["with ships", "f2"] == pytest.approx((5 / 6 + 5 / 37) / 2)
    by_size = module_metric.recall_by_size(result, edges=(25,)).set_index("size")  # ships of 20 and 24 px
    assert by_size.loc["<25", "n_ships"] == 10 and by_size.loc["<25", "recall"] == pytest.approx(0.2)


@pytest.mark.parametrize("change, message", [
    (lambda s, t: (pd.concat([s, pd.DataFrame({"ImageId": ["zz.jpg"], "EncodedPixels": [""]})]), t), "zz.jpg"),
    (lambda s, t: (s[s.ImageId != "c.jpg"], t), "c.jpg"),
    (lambda s, t: (s.rename(columns={"EncodedPixels": "Pixels"}), t), "EncodedPixels"),
    (lambda s, t: (s.assign(EncodedPixels=s.EncodedPixels.where(s.ImageId != "c.jpg", "1 2 3")), t), "c.jpg"),
    (lambda s, t: (s.assign(EncodedPixels=s.EncodedPixels.where(s.ImageId != "c.jpg", "5 3000")), t), "c.jpg"),
    (lambda s, t: (pd.concat([s, pd.DataFrame({"ImageId": ["b.jpg"], "EncodedPixels": [s.EncodedPixels[1]]})]), t),
     "overlap"),
])
def test_score_submission_rejects_bad_input_clearly(change, message):
    submission, truth = change(*_frames())
    with pytest.raises(ValueError, match=message):
        module_metric.score_submission(submission, truth, shape=SHAPE)


def test_missing_images_can_count_as_empty():
    submission, truth = _frames()
    result = module_metric.score_submission(submission[submission.ImageId != "b.jpg"], truth, shape=SHAPE,
                                            missing="empty")
    assert result.per_image.set_index("ImageId").loc["b.jpg", "f2"] == 0.0


# ---------------------------------------------------------------- real Kaggle truth
def test_real_truth_scores_itself_one_and_blank_scores_ship_free_share(airbus_truth_csv):
    truth = pd.read_csv(airbus_truth_csv, dtype=str, keep_default_na=False)
    assert module_metric.score_submission(truth, airbus_truth_csv).f2 == 1.0
    blank = pd.DataFrame({"ImageId": truth["ImageId"].unique(), "EncodedPixels": ""})
    result = module_metric.score_submission(blank, airbus_truth_csv)
    ship_free = (truth.groupby("ImageId")["EncodedPixels"].apply(lambda s: (s == "").all())).mean()
    assert result.f2 == pytest.approx(ship_free)  # 24 of the 64 images
    assert result.per_threshold["tp"].sum() == 0
    assert result.per_threshold["fn"].iloc[0] == (truth["EncodedPixels"] != "").sum()


def test_rows_of_csv_files_are_named_by_file_and_line(tmp_path):
    submission, truth = _frames()
    submission.loc[submission.ImageId == "c.jpg", "EncodedPixels"] = "1 2 3"  # odd token count
    submission.to_csv(tmp_path / "submission.csv", index=False)
    truth.to_csv(tmp_path / "truth.csv", index=False)
    table = module_metric.read_rle_table(tmp_path / "submission.csv", "submission")
    assert list(table.columns) == ["ImageId", "EncodedPixels", "source_row"]
    assert table["source_row"].tolist() == [f"{tmp_path / 'submission.csv'} line {n}" for n in range(2, 7)]
    assert table["EncodedPixels"].iloc[0] == ""  # a blank field, not NaN
    with pytest.raises(ValueError, match=rf"{tmp_path / 'submission.csv'} line 5, ImageId c.jpg: invalid EncodedPixels"):
        module_metric.score_submission(tmp_path / "submission.csv", tmp_path / "truth.csv", shape=SHAPE)
    frame_rows = module_metric.read_rle_table(truth, "truth")["source_row"]
    assert frame_rows.iloc[0] == "truth row 0"


def test_a_csv_with_an_extra_column_or_no_rows_is_rejected_naming_it(tmp_path):
    submission, truth = _frames()
    truth.to_csv(tmp_path / "truth.csv", index=False)
    submission.assign(Confidence=0.5).to_csv(tmp_path / "extra.csv", index=False)
    with pytest.raises(ValueError, match="extra.csv: the header is 'ImageId,EncodedPixels,Confidence'"):
        module_metric.score_submission(tmp_path / "extra.csv", tmp_path / "truth.csv", shape=SHAPE)
    (tmp_path / "header_only.csv").write_text("ImageId,EncodedPixels\n")
    with pytest.raises(ValueError, match="header_only.csv: only a header"):
        module_metric.score_submission(submission, tmp_path / "header_only.csv", shape=SHAPE)
