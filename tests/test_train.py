"""The detector for real, at tiny sizes: training stages, validation hook, checkpoints, inference.

Every test runs the real detectron2 Mask R-CNN (a ResNet-18 FPN with narrow heads) on 64 px
synthetic Kaggle-format data from module_synthetic, for a few iterations. The helpers here are
also used by the other test_train_* files.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model
from detectron2.structures import Instances

import module_synthetic
import module_train
from module_config import get_cfg

IMAGE_SIZE = 64


def tiny_opts(data_dir, runs_dir, run="tiny", stages="[[32, 3, 0.01, 1], [64, 3, 0.01, 1]]") -> list[str]:
    """Config overrides for a fast Mask R-CNN on 64 px images (a few hundred ms per iteration)."""
    return [
        "PATHS.INPUT_DIR", str(data_dir), "PATHS.RUNS_DIR", str(runs_dir), "PATHS.RUN_NAME", run,
        "DATA.IMAGE_SIZE", str(IMAGE_SIZE), "DATA.VAL_FRACTION", "0.25",
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        "MODEL.RESNETS.DEPTH", "18", "MODEL.RESNETS.RES2_OUT_CHANNELS", "64", "MODEL.FPN.OUT_CHANNELS", "32",
        "MODEL.ROI_BOX_HEAD.FC_DIM", "64", "MODEL.ROI_MASK_HEAD.CONV_DIM", "32",
        "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "100",
        "MODEL.RPN.PRE_NMS_TOPK_TEST", "200", "MODEL.RPN.POST_NMS_TOPK_TEST", "100",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "MODEL.ANCHOR_GENERATOR.SIZES", "[[8], [16], [32], [64], [128]]",
        "SOLVER.IMS_PER_BATCH", "2", "SOLVER.CHECKPOINT_PERIOD", "2", "DATALOADER.NUM_WORKERS", "0",
        "DETECTOR.STAGES", stages, "DETECTOR.EVAL_PERIOD", "2", "DETECTOR.EVAL_MAX_IMAGES", "4",
        "DETECTOR.LOG_PERIOD", "1", "DETECTOR.VIS_IMAGES", "2", "DETECTOR.EMPTY_FRACTION", "0.2",
        "SUBMIT.SCORE_THRESHOLD", "0.0", "SUBMIT.MIN_AREA", "0",
    ]


def make_tiny_dataset(out_dir, n_train=16, empty_fraction=0.25) -> Path:
    """A 64 px Kaggle-layout dataset (train_v2/, train_ship_segmentations_v2.csv)."""
    module_synthetic.generate_dataset(out_dir, n_train=n_train, n_test=0, seed=0, empty_fraction=empty_fraction, image_size=IMAGE_SIZE)
    return Path(out_dir)


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


def _cfg(tiny_data, tmp_path, *extra, **kwargs):
    return get_cfg(None, tiny_opts(tiny_data, tmp_path / "runs", **kwargs) + list(extra))


# ---------------------------------------------------------------- model building
def test_random_init_model_has_trainable_batch_norm(tiny_data, tmp_path):
    model = build_model(module_train.get_model_cfg(_cfg(tiny_data, tmp_path)))
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert all(p.requires_grad for p in model.backbone.parameters())  # FREEZE_AT 0


# ---------------------------------------------------------------- training
def test_train_detector_runs_every_stage_at_its_size(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path)
    final = module_train.train_detector(cfg)
    detector_dir = tmp_path / "runs" / "tiny" / "detector"
    assert final == detector_dir / "stage2_64" / "model_final.pth" and final.is_file()
    log = (detector_dir / "log.txt").read_text()
    # the guard saw the batch entering the backbone at each stage's size
    assert "[stage1_32] backbone input (2, 3, 32, 32)" in log
    assert "[stage2_64] backbone input (2, 3, 64, 64)" in log
    assert "input 32x32 px" in log and "input 64x64 px" in log
    assert f"from {detector_dir / 'stage1_32' / 'model_final.pth'}" in log  # stage 2 starts from stage 1
    assert 'MODEL.WEIGHTS is "": random init' in log
    for stage in ("stage1_32", "stage2_64"):
        stage_dir = detector_dir / stage
        checkpoint = torch.load(stage_dir / "model_final.pth")  # torch>=2.6 default: weights_only=True
        assert checkpoint["input_size"] == int(stage.split("_")[1]) and checkpoint["iteration"] == 2
        assert {"model", "optimizer", "scheduler"} <= set(checkpoint)
        iterations = [json.loads(line)["iteration"] for line in (stage_dir / "metrics.json").read_text().splitlines()]
        assert iterations == [0, 1, 2]
        assert len(list(stage_dir.glob("events.out.tfevents.*"))) == 1
    records = [json.loads(line) for line in (detector_dir / "val_metrics.jsonl").read_text().splitlines()]
    assert [(r["stage"], r["input_size"], r["iteration"]) for r in records] == [(1, 32, 1), (1, 32, 2), (2, 64, 1), (2, 64, 2)]
    for r in records:
        assert 0.0 <= r["f2"] <= 1.0 and r["n_images"] == 4 and "segm_AP" in r and "bbox_AP" in r
        assert r["f2_all_empty_baseline"] == pytest.approx(1 - r["n_ship_images"] / 4)
    best = json.loads((detector_dir / "model_best.json").read_text())
    assert best["metric"] == "f2_ships" or (best["metric"] == "f2" and all(r["f2_ships"] is None for r in records))
    assert best["value"] == max(r[best["metric"]] for r in records if r[best["metric"]] is not None)
    best_checkpoint = torch.load(detector_dir / "model_best.pth")
    assert best_checkpoint["input_size"] == best["input_size"]
    assert (detector_dir / "config.yaml").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(detector_dir / "stage2_64"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"total_loss", "loss_mask", "loss_rpn_cls", "lr", "val/f2", "val/f2_ships"} <= scalars
    assert len(events.Tags()["images"]) == 2  # VIS_IMAGES overlays


def test_backbone_sees_the_stage_size_on_every_iteration(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path, stages="[[96, 2, 0.01, 0]]")
    stage = module_train.get_stage(cfg, 1)
    from module_preprocessing import get_train_val_dicts

    train_dicts, val_dicts = get_train_val_dicts(cfg)
    trainer = module_train.build_stage_trainer(cfg, stage, train_dicts, val_dicts[:1], init_weights="", resume=False)
    shapes = []
    module_train.unwrap_model(trainer.model).backbone.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    trainer.train(trainer.start_iter, stage.iterations)
    # two training iterations, then the validation hook's inference on the same size
    assert shapes[:2] == [(2, 3, 96, 96)] * 2 and all(s[-2:] == (96, 96) for s in shapes)
    assert trainer.input_size_guard.seen_shape == (2, 3, 96, 96)


def test_resume_restores_model_optimizer_schedule_and_iteration(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path, "DETECTOR.EVAL_PERIOD", "0", stages="[[64, 4, 0.01, 1]]")
    stage = module_train.get_stage(cfg, 1)
    from module_preprocessing import get_train_val_dicts

    train_dicts, _ = get_train_val_dicts(cfg)
    trainer = module_train.build_stage_trainer(cfg, stage, train_dicts, [], init_weights="", resume=False)
    trainer.train(0, stage.iterations)
    stage_dir = module_train.get_stage_dir(cfg, stage)
    # pretend the run died right after model_0000001 (iteration 1) was written
    (stage_dir / "last_checkpoint").write_text("model_0000001.pth")
    saved = torch.load(stage_dir / "model_0000001.pth")  # weights_only=True (torch>=2.6 default)
    resumed = module_train.build_stage_trainer(cfg, stage, train_dicts, [], init_weights="", resume=True)
    assert resumed.start_iter == 2
    assert resumed.checkpointer.checkpointables["scheduler"].last_epoch == saved["scheduler"]["last_epoch"] == 2
    optimizer_state = resumed.optimizer.state_dict()
    assert optimizer_state["state"].keys() == saved["optimizer"]["state"].keys() and optimizer_state["state"]
    key = next(iter(saved["optimizer"]["state"]))
    torch.testing.assert_close(optimizer_state["state"][key]["momentum_buffer"], saved["optimizer"]["state"][key]["momentum_buffer"])
    model_state = module_train.unwrap_model(resumed.model).state_dict()
    for name, value in saved["model"].items():
        torch.testing.assert_close(model_state[name], value)
    # warmup (1 iteration) is over and the first decay (3 of 4 iterations) not reached yet
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_train_detector_errors(tiny_data, tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):
        module_train.train_detector(_cfg(tiny_data, tmp_path, stages="[[32, 2, 0.01, 0], [100, 2, 0.01, 0]]"))
    with pytest.raises(FileNotFoundError, match="missing_weights.pth"):
        module_train.train_detector(_cfg(tiny_data, tmp_path, "MODEL.WEIGHTS", str(tmp_path / "missing_weights.pth")))
    with pytest.raises(FileNotFoundError, match="train stage 1 first"):
        module_train.train_detector(_cfg(tiny_data, tmp_path, run="no_stage1"), stage=2)
    with pytest.raises(ValueError, match="BEST_METRIC 'segm_AP': expected one of"):
        module_train.train_detector(_cfg(tiny_data, tmp_path, "DETECTOR.BEST_METRIC", "segm_AP"))
    no_ships = make_tiny_dataset(tmp_path / "no_ships", n_train=6, empty_fraction=1.0)
    with pytest.raises(ValueError, match="no image with ships"):
        module_train.train_detector(_cfg(no_ships, tmp_path, run="empty"))


# ---------------------------------------------------------------- inference
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
    (prediction,) = module_train.predict_instances(FakeDetector(), [image], input_size=64, tta=tta)
    assert prediction["masks"].shape == (1, *shape) and prediction["masks"].dtype == bool
    assert prediction["scores"].dtype == np.float32
    # an un-flip bug would put the vflip/hflip view's mask elsewhere: it would not merge and
    # would come out as a second detection with a third of the score
    np.testing.assert_allclose(prediction["scores"], [0.9], rtol=1e-6)
    truth = image[:, :, 0] > 0
    iou = (prediction["masks"][0] & truth).sum() / (prediction["masks"][0] | truth).sum()
    assert iou >= min_iou  # exact at input size 64; 48x80 -> 64x64 -> 48x80 blurs the edges


def test_load_detector_and_predict_with_the_real_model(tiny_data, tmp_path):
    cfg = _cfg(tiny_data, tmp_path)
    model = build_model(module_train.get_model_cfg(cfg))
    weights = tmp_path / "w.pth"
    module_train.AtomicCheckpointer(model, str(tmp_path), extra_state={"input_size": 32}).save("w")
    loaded = module_train.load_detector(cfg, weights)
    assert not loaded.training and loaded.input_size == 32
    assert next(loaded.parameters()).device.type == "cpu"
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    images = [_asymmetric_image(), np.full((64, 64, 3), 90, np.uint8)]
    loaded.train()
    for tta in (False, True):
        predictions = module_train.predict_instances(loaded, images, input_size=64, tta=tta, batch_size=1)
        assert len(predictions) == 2 and loaded.training  # the mode is restored
        for prediction, image in zip(predictions, images):
            n = len(prediction["scores"])
            assert prediction["masks"].shape == (n, *image.shape[:2]) and prediction["masks"].dtype == bool
            assert prediction["scores"].dtype == np.float32 and np.all(np.diff(prediction["scores"]) <= 0)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        module_train.load_detector(cfg, tmp_path / "nope.pth")
    with pytest.raises(ValueError, match="uint8 RGB"):
        module_train.predict_instances(loaded, [np.zeros((8, 8), np.uint8)], input_size=64)


def test_cli_parses_the_documented_shape():
    args = module_train.get_args_parser().parse_args(
        ["--config", "configs/demo.yaml", "--stage", "2", "--resume", "SOLVER.IMS_PER_BATCH", "4"]
    )
    assert (args.config, args.stage, args.resume, args.opts) == ("configs/demo.yaml", 2, True, ["SOLVER.IMS_PER_BATCH", "4"])
    assert re.search(r"KEY VALUE", module_train.get_args_parser().format_help())
