"""module_inference: weights, the detector from a run, batched prediction with flip TTA, overlap removal,
the thresholds and the gate.

The detector is the real Mask R-CNN of ``configs/tiny.yaml`` (conftest's ``tiny_cfg``; trained
once per session in ``tiny_trained``) or a canned fake whose output is known.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from detectron2.modeling import build_model
from detectron2.structures import Instances
from PIL import Image

import module_config
import module_inference
import module_preprocessing
import module_train
from module_inference import Thresholds


# ---------------------------------------------------------------- weights
def test_missing_weights_file_is_a_clear_error(tmp_path):
    missing = str(tmp_path / "nowhere.pth")
    with pytest.raises(FileNotFoundError, match="nowhere.pth"):
        module_inference.resolve_weights(missing)
    assert module_inference.resolve_weights("") == ""


def test_failed_download_says_where_to_put_the_file(tmp_path, monkeypatch):
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    url = "http://127.0.0.1:9/models/mask_rcnn_test.pkl"  # port 9 (discard): refused at once
    with pytest.raises(RuntimeError, match="could not download") as info:
        module_inference.resolve_weights(url)
    assert str(tmp_path / "cache" / "models" / "mask_rcnn_test.pkl") in str(info.value)
    expected = tmp_path / "cache" / "detectron2" / "COCO-InstanceSegmentation" / "m" / "model_final.pkl"
    assert module_inference.get_weights_cache_path("detectron2://COCO-InstanceSegmentation/m/model_final.pkl") == expected


# ---------------------------------------------------------------- flip TTA merging
def _box_mask(y0, y1, x0, x1, shape=(20, 20)):
    mask = np.zeros(shape, bool)
    mask[y0:y1, x0:x1] = True
    return mask


def test_tta_merge_majority_mask_and_consensus_score():
    a1, a2, a3 = _box_mask(2, 10, 2, 6), _box_mask(2, 10, 2, 7), _box_mask(3, 10, 2, 6)
    lonely = _box_mask(14, 18, 14, 18)
    views = [
        {"masks": np.stack([a1, lonely]), "scores": np.array([0.9, 0.6], np.float32)},
        {"masks": np.stack([a2]), "scores": np.array([0.8], np.float32)},
        {"masks": np.stack([a3]), "scores": np.array([0.7], np.float32)},
    ]
    merged = module_inference.merge_tta_predictions(views)
    assert merged["scores"].dtype == np.float32
    np.testing.assert_allclose(merged["scores"], [(0.9 + 0.8 + 0.7) / 3, 0.6 / 3], rtol=1e-6)
    # majority of three: rows 3..9 x cols 2..5 are in all; row 2 in two of three; col 6 in one
    np.testing.assert_array_equal(merged["masks"][0], _box_mask(2, 10, 2, 6))
    np.testing.assert_array_equal(merged["masks"][1], lonely)


def test_tta_merge_two_members_take_the_union_and_no_view_is_used_twice():
    a, b = _box_mask(0, 8, 0, 8), _box_mask(0, 8, 0, 6)
    views = [
        {"masks": np.stack([a, a]), "scores": np.array([0.9, 0.5], np.float32)},  # a duplicate in one view
        {"masks": np.stack([b]), "scores": np.array([0.9], np.float32)},
    ]
    merged = module_inference.merge_tta_predictions(views)
    assert len(merged["scores"]) == 2  # the duplicate does not join its own view's group
    np.testing.assert_array_equal(merged["masks"][0], a | b)
    empty = {"masks": np.zeros((0, 20, 20), bool), "scores": np.zeros(0, np.float32)}
    out = module_inference.merge_tta_predictions([empty, empty, empty])
    assert out["masks"].shape == (0, 20, 20) and out["scores"].shape == (0,)


# ---------------------------------------------------------------- batched prediction
class FakeDetector(torch.nn.Module):
    """Canned detector: one mask where the (resized) input is bright, pasted at the original size."""

    input_format = "BGR"

    def inference(self, batched_inputs):
        outputs = []
        for x in batched_inputs:
            bright = (x["image"].float().mean(0) > 125).float()[None, None]
            mask = torch.nn.functional.interpolate(bright, size=(x["height"], x["width"]), mode="nearest")[0] > 0.5
            instances = Instances((x["height"], x["width"]))
            instances.pred_masks = mask
            instances.scores = torch.tensor([0.9])
            outputs.append({"instances": instances})
        return outputs


def _asymmetric_image(height=48, width=80):
    image = np.zeros((height, width, 3), np.uint8)
    image[4:30, 6:12] = 255  # an L: vertical bar...
    image[24:30, 12:40] = 255  # ...with a foot to the right
    return image


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("shape, min_iou", [((64, 64), 1.0), ((48, 80), 0.85)])
def test_predict_instances_maps_masks_back_to_the_original_frame(tta, shape, min_iou):
    image = _asymmetric_image(*shape)
    (prediction,) = module_inference.predict_instances(FakeDetector(), [image], input_size=64, tta=tta)
    assert prediction["masks"].shape == (1, *shape) and prediction["masks"].dtype == bool
    assert prediction["scores"].dtype == np.float32
    # an un-flip bug would put the vflip/hflip view's mask elsewhere: it would not merge and
    # would come out as a second detection with a third of the score
    np.testing.assert_allclose(prediction["scores"], [0.9], rtol=1e-6)
    truth = image[:, :, 0] > 0
    iou = (prediction["masks"][0] & truth).sum() / (prediction["masks"][0] | truth).sum()
    assert iou >= min_iou  # exact at input size 64; 48x80 -> 64x64 -> 48x80 blurs the edges


# ---------------------------------------------------------------- a backbone of any width
def test_the_any_width_backbone_at_width_64_is_detectron2s_own(tiny_cfg):
    from detectron2.layers import ShapeSpec
    from detectron2.modeling.backbone.fpn import build_resnet_fpn_backbone

    model_cfg = module_config.get_model_cfg(tiny_cfg("MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64",
                                                     "MODEL.RESNETS.STEM_OUT_CHANNELS", "64"))
    torch.manual_seed(0)
    theirs = build_resnet_fpn_backbone(model_cfg, ShapeSpec(channels=3)).eval()
    ours = module_inference.build_basic_resnet_fpn_backbone(model_cfg, ShapeSpec(channels=3)).eval()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    ours.load_state_dict(theirs.state_dict())
    image = torch.rand(1, 3, 64, 64) * 255
    with torch.no_grad():
        expected, got = theirs(image), ours(image)
    assert list(got) == list(expected)  # p2..p6
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], msg=name)


def test_a_half_width_detector_trains_predicts_and_saves(tiny_cfg, tmp_path):
    cfg = tiny_cfg("MODEL.BACKBONE.NAME", module_inference.BASIC_RESNET_FPN, "MODEL.RESNETS.DEPTH", "18",
                   "MODEL.RESNETS.STEM_OUT_CHANNELS", "32", "MODEL.RESNETS.RES2_OUT_CHANNELS", "32")
    model = build_model(module_config.get_model_cfg(cfg))
    widths = {k: v.shape[0] for k, v in model.state_dict().items() if k.endswith("conv1.weight") or k.endswith("conv2.weight")}
    assert widths["backbone.bottom_up.stem.conv1.weight"] == 32
    assert widths["backbone.bottom_up.res2.0.conv2.weight"] == 32 and widths["backbone.bottom_up.res5.1.conv2.weight"] == 256
    full = build_model(module_config.get_model_cfg(tiny_cfg("MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64")))
    count = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.startswith("backbone.bottom_up"))  # noqa: E731
    assert count(model) < 0.3 * count(full)  # half the width: about a quarter of the weights
    # a training step on a real batch: finite losses, gradients down to the stem
    from detectron2.utils.events import EventStorage

    mapper = module_train.ShipDatasetMapper(cfg, 64, is_train=True)
    train, _ = module_preprocessing.get_train_val_dicts(cfg)
    model.train()
    batch = [mapper(dict(d)) for d in train[:2]]
    with EventStorage(0):
        losses = model(batch)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.bottom_up.stem.conv1.weight.grad.abs().sum() > 0
    # saved and loaded through the run's own path, then predicting at the image size
    module_train.AtomicCheckpointer(model, str(tmp_path), extra_state={"input_size": 64}).save("w")
    loaded = module_inference.load_detector(cfg, tmp_path / "w.pth")
    prediction = module_inference.predict_instances(loaded, [np.full((64, 64, 3), 90, np.uint8)], input_size=64)[0]
    assert prediction["masks"].shape[1:] == (64, 64)
    deep = cfg.clone()
    deep.defrost()
    deep.MODEL.RESNETS.DEPTH = 50
    with pytest.raises(ValueError, match="DEPTH must be 18 or 34"):
        build_model(module_config.get_model_cfg(deep))


def test_load_detector_and_predict_with_the_real_model(tiny_cfg, tmp_path):
    cfg = tiny_cfg()
    model = build_model(module_config.get_model_cfg(cfg))
    weights = tmp_path / "w.pth"
    module_train.AtomicCheckpointer(model, str(tmp_path), extra_state={"input_size": 32}).save("w")
    loaded = module_inference.load_detector(cfg, weights)
    assert not loaded.training and loaded.input_size == 32
    assert next(loaded.parameters()).device.type == torch.device(cfg.MODEL.DEVICE).type  # "auto": cpu here
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    images = [_asymmetric_image(), np.full((64, 64, 3), 90, np.uint8)]
    loaded.train()
    for tta in (False, True):
        predictions = module_inference.predict_instances(loaded, images, input_size=64, tta=tta, batch_size=1)
        assert len(predictions) == 2 and loaded.training  # the mode is restored
        for prediction, image in zip(predictions, images):
            n = len(prediction["scores"])
            assert prediction["masks"].shape == (n, *image.shape[:2]) and prediction["masks"].dtype == bool
            assert prediction["scores"].dtype == np.float32 and np.all(np.diff(prediction["scores"]) <= 0)
    # on a CPU the weights are channels-last, and predict as the contiguous model does
    conv = next(m for m in loaded.modules() if isinstance(m, torch.nn.Conv2d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last)
    model.eval()
    for got, expected in zip(module_inference.predict_instances(loaded, images, input_size=64),
                             module_inference.predict_instances(model, images, input_size=64)):
        np.testing.assert_allclose(got["scores"], expected["scores"], rtol=1e-4, atol=1e-5)
        assert got["masks"].shape == expected["masks"].shape
        if len(expected["scores"]):
            assert (got["masks"] == expected["masks"]).mean() > 0.999
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        module_inference.load_detector(cfg, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="uint8 RGB"):
        module_inference.predict_instances(loaded, [np.zeros((8, 8), np.uint8)], input_size=64)


def test_score_floor_drops_only_detections_no_threshold_keeps(tiny_cfg, tmp_path):
    """The detector's own test score filter raised under the prediction's lowest threshold
    (set_score_floor): fewer raw detections, the same ones after the thresholds. An untrained
    Mask R-CNN gives 50 overlapping detections per image."""
    cfg = tiny_cfg("SUBMIT.MERGE_IOS", "0")  # no fragment merging: the thresholds alone set the floor
    torch.manual_seed(0)
    module_train.AtomicCheckpointer(build_model(module_config.get_model_cfg(cfg)), str(tmp_path),
                                    extra_state={"input_size": 64}).save("untrained")
    model = module_inference.load_detector(cfg, tmp_path / "untrained.pth")
    images = [_asymmetric_image(), np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)]
    everything = module_inference.predict_instances(model, images, batch_size=2)
    scores = np.concatenate([p["scores"] for p in everything])
    threshold = float(np.quantile(scores, 0.6))  # 40% of the detections pass
    thresholds = Thresholds(classifier=0.0, score=threshold, min_area=0)
    floor = module_inference.set_score_floor(model, module_inference.lowest_kept_score(cfg, thresholds))
    assert floor == pytest.approx(threshold - module_inference.SCORE_FLOOR_MARGIN)
    assert module_inference.set_score_floor(model, 0.01) == floor  # never lowered
    floored = module_inference.predict_instances(model, images, batch_size=2)
    assert sum(len(p["scores"]) for p in floored) < len(scores)
    assert min(p["scores"].min() for p in floored) > floor
    for a, b in zip(everything, floored):
        kept_a, kept_b = module_inference.apply_thresholds(a, thresholds), module_inference.apply_thresholds(b, thresholds)
        np.testing.assert_array_equal(kept_a[1], kept_b[1])
        np.testing.assert_array_equal(kept_a[0], kept_b[0])
        assert len(kept_a[1]) > 0
    # what each setting lets through: TTA merges the views' scores (no floor); merging, its own minimum
    by_size = Thresholds(classifier=0.0, score=0.5, min_area=0, score_by_size=(0.3, 0.6), size_edges=(100.0,))
    assert module_inference.lowest_kept_score(cfg, by_size) == 0.3
    assert module_inference.lowest_kept_score(tiny_cfg("SUBMIT.TTA", "True"), thresholds) is None
    merging = tiny_cfg("SUBMIT.MERGE_IOS", "0.3", "SUBMIT.MERGE_MIN_SCORE", "0.2")
    assert module_inference.lowest_kept_score(merging, Thresholds(0.0, 0.5, 0)) == 0.2
    assert module_inference.set_score_floor(model, None) is None


def test_load_detector_takes_the_runs_best_weights_by_default(tiny_trained, tiny_cfg):
    cfg = tiny_trained.cfg
    assert module_inference.get_default_weights_path(cfg) == module_config.get_detector_path(cfg, "best")
    model = module_inference.load_detector(cfg)
    best = torch.load(module_config.get_detector_path(cfg, "best"))
    assert model.input_size == best["input_size"] == 64 and not model.training
    for name, value in best["model"].items():
        torch.testing.assert_close(model.state_dict()[name], value, msg=name)
    image = np.asarray(Image.open(next(iter(sorted((tiny_trained.input_dir / "test_v2").glob("*.jpg"))))))
    (prediction,) = module_inference.predict_instances(model, [image])  # at the checkpoint's input size
    assert prediction["masks"].shape[1:] == (64, 64)
    with pytest.raises(FileNotFoundError, match="no detector weights in the run .*module_train.py"):
        module_inference.load_detector(tiny_cfg())  # a run that trained nothing


def test_load_detector_predicts_at_the_configs_test_size(tiny_trained):
    """``DETECTOR.TEST_SIZE`` sets the size the model predicts at (upscaled from the 64 px it was
    trained at); the masks still come back at the image's own size."""
    cfg = tiny_trained.cfg.clone()
    cfg.defrost()
    cfg.DETECTOR.TEST_SIZE = 96
    model = module_inference.load_detector(cfg)
    assert (model.input_size, model.trained_size) == (96, 64)
    image = np.asarray(Image.open(next(iter(sorted((tiny_trained.input_dir / "test_v2").glob("*.jpg"))))))
    seen = []
    handle = model.backbone.register_forward_pre_hook(lambda module, args: seen.append(tuple(args[0].shape[-2:])))
    try:
        (prediction,) = module_inference.predict_instances(model, [image])
    finally:
        handle.remove()
    assert seen == [(96, 96)] and prediction["masks"].shape[1:] == image.shape[:2]


# ---------------------------------------------------------------- overlap removal and thresholds
def _rect(shape, top, left, height, width) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[top:top + height, left:left + width] = True
    return mask


def test_resolve_overlaps_gives_each_pixel_to_the_highest_score():
    shape = (6, 5)
    masks = np.stack([_rect(shape, 1, 1, 5, 1),  # B 0.8: rows 1-5 of col 1, rows 1-2 are A's
                      _rect(shape, 0, 0, 3, 2),  # A 0.9: rows 0-2, cols 0-1
                      _rect(shape, 4, 3, 2, 2),  # C 0.3: below the threshold
                      _rect(shape, 0, 1, 2, 2)])  # D 0.7: 2 of its 4 px are A's, 2 left
    scores = np.array([0.8, 0.9, 0.3, 0.7], np.float32)
    before = masks.copy()
    kept, kept_scores = module_inference.resolve_overlaps(masks, scores, score_threshold=0.5, min_area=3)
    np.testing.assert_array_equal(masks, before)  # inputs untouched
    assert kept.dtype == bool and kept_scores.tolist() == pytest.approx([0.9, 0.8])
    np.testing.assert_array_equal(kept[0], _rect(shape, 0, 0, 3, 2))
    np.testing.assert_array_equal(kept[1], _rect(shape, 3, 1, 3, 1))
    assert kept.sum(axis=0).max() == 1
    kept, kept_scores = module_inference.resolve_overlaps(masks, scores, score_threshold=0.5, min_area=2)
    assert kept_scores.tolist() == pytest.approx([0.9, 0.8, 0.7])  # D's 2 remaining px are enough now
    np.testing.assert_array_equal(kept[2], _rect(shape, 0, 2, 2, 1))
    ties = np.stack([_rect(shape, 0, 0, 2, 2), _rect(shape, 1, 1, 2, 2)])
    kept, _ = module_inference.resolve_overlaps(ties, np.array([0.5, 0.5]))
    assert kept[0].sum() == 4 and kept[1].sum() == 3  # a tie goes to the earlier mask
    empty, empty_scores = module_inference.resolve_overlaps(np.zeros((0, *shape), bool), np.zeros(0))
    assert empty.shape == (0, *shape) and empty_scores.shape == (0,)
    with pytest.raises(ValueError, match=r"masks must be \(N, H, W\)"):
        module_inference.resolve_overlaps(masks[0], scores[:1])
    with pytest.raises(ValueError, match="scores must be"):
        module_inference.resolve_overlaps(masks, scores[:2])
    prediction = {"masks": masks, "scores": scores}
    kept, _ = module_inference.apply_thresholds(prediction, Thresholds(classifier=0.5, score=0.5, min_area=3))
    assert len(kept) == 2


# ---------------------------------------------------------------- a ship's fragments merged
def test_merge_fragments_unions_the_parts_of_one_ship_and_leaves_other_ships_alone():
    shape = (20, 30)
    masks = np.stack([
        _rect(shape, 2, 2, 3, 10),    # 0.6: the bow half of a ship (rows 2-4, cols 2-11)
        _rect(shape, 2, 10, 3, 10),   # 0.8: its stern half, overlapping the bow by cols 10-11
        _rect(shape, 3, 18, 1, 6),    # 0.3: a sliver overlapping the stern only (cols 18-19): joins the grown group
        _rect(shape, 12, 2, 4, 8),    # 0.7: another ship, far away
        _rect(shape, 12, 9, 4, 3),    # 0.05: a low-score part touching it: below min_score, left as it is
    ])
    scores = np.array([0.6, 0.8, 0.3, 0.7, 0.05], np.float32)
    merged = module_inference.merge_fragments({"masks": masks, "scores": scores}, min_ios=0.1, min_score=0.1)
    np.testing.assert_array_equal(merged["scores"], np.array([0.8, 0.7, 0.05], np.float32))
    np.testing.assert_array_equal(merged["masks"][0], masks[0] | masks[1] | masks[2])
    np.testing.assert_array_equal(merged["masks"][1], masks[3])
    np.testing.assert_array_equal(merged["masks"][2], masks[4])
    # an overlap below min_ios of the smaller mask: no merge (bow and stern share 6 of 30 px: 0.2)
    apart = module_inference.merge_fragments({"masks": masks[:2], "scores": scores[:2]}, min_ios=0.25)
    np.testing.assert_array_equal(apart["scores"], np.array([0.8, 0.6], np.float32))
    np.testing.assert_array_equal(apart["masks"], masks[[1, 0]])
    # off, and the edge cases: sorted by score, the masks untouched
    off = module_inference.merge_fragments({"masks": masks, "scores": scores}, min_ios=0.0)
    np.testing.assert_array_equal(off["masks"], masks[np.argsort(-scores, kind="stable")])
    empty = module_inference.merge_fragments({"masks": np.zeros((0, *shape), bool), "scores": np.zeros(0)}, 0.1)
    assert empty["masks"].shape == (0, *shape) and empty["scores"].shape == (0,)


class FragmentingDetector(FakeDetector):
    """Canned detector that sees a bright bar as two overlapping halves (an undertrained detector's habit)."""

    def inference(self, batched_inputs):
        outputs = []
        for x in batched_inputs:
            height, width = x["height"], x["width"]
            instances = Instances((height, width))
            halves = torch.zeros((2, height, width), dtype=torch.bool)
            halves[0, 10:14, 4:24] = True  # overlapping by 8 of its 20 columns: IoS 0.4
            halves[1, 10:14, 16:40] = True
            instances.pred_masks = halves
            instances.scores = torch.tensor([0.5, 0.9])
            outputs.append({"instances": instances})
        return outputs


def test_predict_instances_merges_fragments_as_the_config_says():
    image = np.zeros((48, 48, 3), np.uint8)
    (raw,) = module_inference.predict_instances(FragmentingDetector(), [image], input_size=48)
    assert len(raw["scores"]) == 2
    assert module_config.get_cfg("configs/airbus.yaml").SUBMIT.MERGE_IOS == 0.0  # off unless a config says (the real one does not)
    cfg = module_config.get_cfg("configs/airbus.yaml", ["SUBMIT.MERGE_IOS", "0.3"])
    (merged,) = module_inference.predict_instances(FragmentingDetector(), [image], input_size=48,
                                                   **module_inference.get_merge_args(cfg))
    np.testing.assert_allclose(merged["scores"], [0.9])
    np.testing.assert_array_equal(merged["masks"][0], raw["masks"].any(axis=0))


def test_thresholds_precedence_command_line_then_tuned_then_config(tmp_path):
    import module_tuning

    cfg = module_config.get_cfg(None, ["PATHS.RUNS_DIR", str(tmp_path), "PATHS.RUN_NAME", "t"])
    thresholds, sources = module_inference.get_thresholds(cfg)
    assert thresholds == Thresholds(cfg.SUBMIT.CLASSIFIER_THRESHOLD, cfg.SUBMIT.SCORE_THRESHOLD, cfg.SUBMIT.MIN_AREA)
    assert set(sources.values()) == {"config"}
    module_tuning.write_thresholds(module_config.get_submission_path(cfg, "thresholds"), Thresholds(0.3, 0.7, 40), f2=0.6)
    # overridden: the command line's overrides, as given (KEY VALUE or KEY=VALUE)
    command_line = ["SUBMIT.MIN_AREA", "7"]
    cfg = module_config.get_cfg(None, ["PATHS.RUNS_DIR", str(tmp_path), "PATHS.RUN_NAME", "t", *command_line])
    thresholds, sources = module_inference.get_thresholds(cfg, overridden=command_line)
    assert (thresholds.classifier, thresholds.score) == (0.3, 0.7)
    assert thresholds.min_area == 7 and sources["MIN_AREA"] == "command line"
    assert sources["SCORE_THRESHOLD"].endswith("thresholds.yaml")
    command_line = ["SUBMIT.SCORE_THRESHOLD=0.2"]
    cfg = module_config.get_cfg(None, ["PATHS.RUNS_DIR", str(tmp_path), "PATHS.RUN_NAME", "t", *command_line])
    thresholds, sources = module_inference.get_thresholds(cfg, overridden=command_line)
    assert thresholds == Thresholds(0.3, 0.2, 40) and sources["SCORE_THRESHOLD"] == "command line"
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        module_inference.get_thresholds(cfg, tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("thresholds:\n  SCORE: 0.5\n")
    with pytest.raises(ValueError, match="unknown threshold keys \\['SCORE'\\]"):
        module_inference.get_thresholds(cfg, tmp_path / "bad.yaml")


@pytest.mark.parametrize("found, recall, gate, expected", [
    ([0.99, 0.95, 0.5, 0.3], 0.98, 0.9, 0.3),  # 0.98 * 4 = 3.92, rounded 4 ships: the lowest value
    ([0.9] * 46 + [0.1], 0.98, 0.95, 0.9),  # 0.98 * 47 = 46.06: one outlier does not open the gate
    ([0.99, 0.95, 0.5, 0.3], 0.75, 0.9, 0.5),  # 3 of 4
    ([0.99, 0.95, 0.5, 0.3], 0.5, 0.9, 0.9),  # 2 of 4 at 0.95: never above the submission's gate
    ([0.3, 0.99, 0.5, 0.95], 0.75, 0.9, 0.5),  # the order given does not matter
    ([0.99, 0.95, 0.5, 0.3], 0.0, 0.9, 0.9),  # recall 0: the submission's gate
    ([0.99, 0.95, 0.5, 0.3], 1.0, 0.0, 0.0),  # ungated stays ungated
    ([], 0.98, 0.9, 0.9),  # no ship found on validation: nothing to go by
    ([0.8, float("nan")], 1.0, 0.9, 0.8),  # an unreadable image's NaN is no ship
])
def test_scene_gate_threshold_keeps_the_share_of_found_ships(found, recall, gate, expected):
    assert module_inference.get_scene_gate_threshold(found, recall, gate) == pytest.approx(expected)


def test_scene_thresholds_lower_only_a_tuned_gate(tmp_path):
    """The scene gate applies to the tuned classifier threshold only: not to a command-line one,
    not with GATE_SHIP_RECALL 0, not without the scene_gate block; the other thresholds stay."""
    import module_tuning

    base = ["PATHS.RUNS_DIR", str(tmp_path), "PATHS.RUN_NAME", "t"]
    cfg = module_config.get_cfg(None, base)
    path = module_config.get_submission_path(cfg, "thresholds")
    module_tuning.write_thresholds(path, Thresholds(0.9, 0.7, 40), f2=0.6)
    assert module_inference.get_scene_thresholds(cfg) == module_inference.get_thresholds(cfg)  # no block yet
    module_tuning.write_thresholds(path, Thresholds(0.9, 0.7, 40), f2=0.6, extra={
        module_inference.SCENE_GATE_KEY: {"found_ship_p_ship": [0.99, 0.97, 0.95, 0.6, 0.4]}})
    thresholds, sources = module_inference.get_scene_thresholds(cfg)  # 0.98 of 5: all 5
    assert thresholds == Thresholds(0.4, 0.7, 40)
    assert "lowered from 0.9" in sources["CLASSIFIER_THRESHOLD"] and "keeps 5 of the 5" in sources["CLASSIFIER_THRESHOLD"]
    assert module_inference.get_thresholds(cfg)[0] == Thresholds(0.9, 0.7, 40), "the submission's are unchanged"
    cfg = module_config.get_cfg(None, [*base, "DETECT.GATE_SHIP_RECALL", "0.8"])
    assert module_inference.get_scene_thresholds(cfg)[0].classifier == 0.6
    cfg = module_config.get_cfg(None, [*base, "DETECT.GATE_SHIP_RECALL", "0"])
    assert module_inference.get_scene_thresholds(cfg)[0].classifier == 0.9
    command_line = ["SUBMIT.CLASSIFIER_THRESHOLD", "0.95"]
    cfg = module_config.get_cfg(None, [*base, *command_line])
    thresholds, sources = module_inference.get_scene_thresholds(cfg, overridden=command_line)
    assert thresholds.classifier == 0.95 and sources["CLASSIFIER_THRESHOLD"] == "command line"
    other = tmp_path / "other.yaml"  # a thresholds file given explicitly carries its own block
    module_tuning.write_thresholds(other, Thresholds(0.5, 0.7, 40), f2=0.6, extra={
        module_inference.SCENE_GATE_KEY: {"found_ship_p_ship": [0.9, 0.2]}})
    assert module_inference.get_scene_thresholds(module_config.get_cfg(None, base), other)[0].classifier == 0.2


# ---------------------------------------------------------------- the gate
def test_p_ship_fn_of_the_runs_classifier_gives_nan_for_unreadable_images(tiny_trained, tmp_path, tiny_cfg):
    p_ship_fn = module_inference.build_p_ship_fn(tiny_trained.cfg)
    good = sorted((tiny_trained.input_dir / "test_v2").glob("*.jpg"))[:2]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good[0].read_bytes()[:200])
    p_ship = p_ship_fn([good[0], broken, good[1], tmp_path / "missing.jpg"])
    assert p_ship.shape == (4,) and p_ship.dtype == np.float64
    assert np.isnan(p_ship[[1, 3]]).all() and ((p_ship[[0, 2]] >= 0) & (p_ship[[0, 2]] <= 1)).all()
    with pytest.raises(FileNotFoundError, match="CLASSIFIER_THRESHOLD 0 to run ungated"):
        module_inference.build_p_ship_fn(tiny_cfg())
