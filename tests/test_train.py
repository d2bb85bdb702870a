"""The detector for real, at tiny sizes: training stages, validation hook, checkpoints, resume.

Every test runs the real detectron2 Mask R-CNN of ``configs/tiny.yaml`` (a ResNet-18 FPN with
narrow heads) on its 64 px synthetic Kaggle-format data (the ``tiny_cfg`` and ``tiny_dataset``
fixtures of conftest.py), for a few iterations. Inference (load_detector, predict_instances) is
tested in test_inference.py.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
from detectron2.layers import FrozenBatchNorm2d
from detectron2.modeling import build_model

import module_config
import module_inference
import module_synthetic
import module_train
from module_preprocessing import get_train_val_dicts

TWO_STAGES = "[[32, 3, 0.01, 1], [64, 3, 0.01, 1]]"


# ---------------------------------------------------------------- model building
def test_random_init_model_has_trainable_batch_norm(tiny_cfg):
    model = build_model(module_config.get_model_cfg(tiny_cfg()))
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in model.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in model.backbone.modules())
    assert all(p.requires_grad for p in model.backbone.parameters())  # FREEZE_AT 0


# ---------------------------------------------------------------- training
def test_best_weights_break_ties_by_mask_ap_then_by_newer_weights():
    # An undertrained detector: F2 on ship images 0 at every check, its masks improving.
    checks = [{"f2_ships": 0.0, "segm_AP": 0.0}, {"f2_ships": 0.0, "segm_AP": 0.8}, {"f2_ships": 0.0, "segm_AP": 6.1}]
    best, kept = {}, []
    for k, metrics in enumerate(checks):
        if module_train.is_new_best(metrics, "f2_ships", best):
            best = {"value": metrics["f2_ships"], "segm_AP": metrics["segm_AP"]}
            kept.append(k)
    assert kept == [0, 1, 2]  # before: the first check only, the worst masks
    assert not module_train.is_new_best({"f2_ships": 0.0, "segm_AP": 5.0}, "f2_ships", best)  # worse masks
    assert module_train.is_new_best({"f2_ships": 0.0, "segm_AP": 6.1}, "f2_ships", best)  # exact tie: the newer
    # the metric comes first: a higher F2 wins over a higher AP, and the reverse does not
    assert module_train.is_new_best({"f2_ships": 0.1, "segm_AP": 0.0}, "f2_ships", best)
    assert not module_train.is_new_best({"f2_ships": 0.1, "segm_AP": 9.0}, "f2_ships", {"value": 0.2, "segm_AP": 1.0})
    # no AP (NaN, or an older model_best.json without it) counts as lowest, not as an error
    assert module_train.is_new_best({"f2_ships": 0.2, "segm_AP": float("nan")}, "f2_ships", {"value": 0.2})
    assert not module_train.is_new_best({"f2_ships": 0.1, "segm_AP": float("nan")}, "f2_ships", {"value": 0.2})
    assert module_train.is_new_best({"f2": 0.5}, "f2", {})


def test_train_detector_runs_every_stage_at_its_size(tiny_cfg, tmp_path):
    cfg = tiny_cfg("DETECTOR.STAGES", TWO_STAGES, "DETECTOR.EVAL_MAX_IMAGES", "4")
    paths = module_train.train_detector(cfg, *get_train_val_dicts(cfg))
    detector_dir = tmp_path / "runs" / "tiny" / "detector"
    expected = {"final": detector_dir / "stage2_64" / "model_final.pth", "best": detector_dir / "model_best.pth",
                "config": detector_dir / "config.yaml", "log": detector_dir / "log.txt"}
    assert {key: paths[key] for key in expected} == expected and all(path.is_file() for path in expected.values())
    assert paths.get("plan") is None  # no DETECTOR.TIME_BUDGET_MIN: nothing planned
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
    # the kept weights are the last check with the best (metric, mask AP): a tiny detector ties on F2
    keys = [module_train._best_key(r[best["metric"]], r["segm_AP"]) for r in records]
    last_best = max(k for k in range(len(records)) if keys[k] == max(keys))
    assert (best["stage"], best["iteration"]) == (records[last_best]["stage"], records[last_best]["iteration"])
    best_checkpoint = torch.load(detector_dir / "model_best.pth")
    assert best_checkpoint["input_size"] == best["input_size"]
    assert (detector_dir / "config.yaml").is_file()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(detector_dir / "stage2_64"), size_guidance={"images": 0}).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"total_loss", "loss_mask", "loss_rpn_cls", "lr", "val/f2", "val/f2_ships"} <= scalars
    assert len(events.Tags()["images"]) == cfg.DETECTOR.VIS_IMAGES == 2  # ground-truth/prediction overlays


def test_backbone_sees_the_stage_size_on_every_iteration(tiny_cfg):
    cfg = tiny_cfg("DETECTOR.STAGES", "[[96, 2, 0.01, 0]]")
    stage = module_config.get_stage(cfg, 1)
    train_dicts, val_dicts = get_train_val_dicts(cfg)
    trainer = module_train.build_stage_trainer(cfg, stage, train_dicts, val_dicts[:1], init_weights="", resume=False)
    shapes = []
    module_inference.unwrap_model(trainer.model).backbone.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    trainer.train(trainer.start_iter, stage.iterations)
    # two training iterations, then the validation hook's inference on the same size
    assert shapes[:2] == [(2, 3, 96, 96)] * 2 and all(s[-2:] == (96, 96) for s in shapes)
    assert trainer.input_size_guard.seen_shape == (2, 3, 96, 96)


def test_crops_train_on_the_crop_and_validate_on_whole_images(tiny_cfg):
    cfg = tiny_cfg("DETECTOR.STAGES", "[[96, 2, 0.01, 0]]", "DETECTOR.CROP_SIZE", "64")
    stage = module_config.get_stage(cfg, 1)
    assert module_train.training_input_size(cfg, stage) == 64
    train_dicts, val_dicts = get_train_val_dicts(cfg)
    trainer = module_train.build_stage_trainer(cfg, stage, train_dicts, val_dicts[:1], init_weights="", resume=False)
    shapes = []
    module_inference.unwrap_model(trainer.model).backbone.register_forward_pre_hook(lambda m, args: shapes.append(tuple(args[0].shape)))
    trainer.train(trainer.start_iter, stage.iterations)
    # two training iterations on 64 px crops of the 96 px image, then validation on whole 96 px images
    assert shapes[:2] == [(2, 3, 64, 64)] * 2 and shapes[2:] and all(s[-2:] == (96, 96) for s in shapes[2:])
    assert trainer.input_size_guard.seen_shape == (2, 3, 64, 64)
    # a crop no smaller than the stage: whole images
    assert module_train.training_input_size(module_config.get_cfg(None, ["DETECTOR.CROP_SIZE", "96"]), stage) == 96


def test_resume_restores_model_optimizer_schedule_and_iteration(tiny_cfg):
    cfg = tiny_cfg("DETECTOR.EVAL_PERIOD", "0", "DETECTOR.STAGES", "[[64, 4, 0.01, 1]]", "SOLVER.CHECKPOINT_PERIOD", "2")
    stage = module_config.get_stage(cfg, 1)
    train_dicts, _ = get_train_val_dicts(cfg)
    trainer = module_train.build_stage_trainer(cfg, stage, train_dicts, [], init_weights="", resume=False)
    trainer.train(0, stage.iterations)
    stage_dir = module_config.get_stage_dir(cfg, stage)
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
    model_state = module_inference.unwrap_model(resumed.model).state_dict()
    for name, value in saved["model"].items():
        torch.testing.assert_close(model_state[name], value)
    # warmup (1 iteration) is over and the first decay (3 of 4 iterations) not reached yet
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)


def test_train_detector_errors(tiny_cfg, tmp_path):
    with pytest.raises(ValueError, match="multiple of 32"):  # checked with the config, before any work
        tiny_cfg("DETECTOR.STAGES", "[[32, 2, 0.01, 0], [100, 2, 0.01, 0]]")
    with pytest.raises(ValueError, match="DETECTOR.BEST_METRIC is 'segm_AP'; expected one of"):
        tiny_cfg("DETECTOR.BEST_METRIC", "segm_AP")
    cfg = tiny_cfg("DETECTOR.STAGES", TWO_STAGES)
    train_dicts, val_dicts = get_train_val_dicts(cfg)
    missing = tiny_cfg("DETECTOR.STAGES", TWO_STAGES, "MODEL.WEIGHTS", str(tmp_path / "missing_weights.pth"))
    with pytest.raises(FileNotFoundError, match="missing_weights.pth"):
        module_train.train_detector(missing, train_dicts, val_dicts)
    with pytest.raises(FileNotFoundError, match="train stage 1 first"):
        module_train.train_detector(cfg, train_dicts, val_dicts, stage=2)
    with pytest.raises(ValueError, match="stage 3 does not exist"):
        module_train.train_detector(cfg, train_dicts, val_dicts, stage=3)
    no_ships = tmp_path / "no_ships"  # SYNTH.EMPTY_FRACTION must stay below 1: generated directly
    module_synthetic.generate_dataset(no_ships, n_train=6, n_test=1, empty_fraction=1.0, image_size=64)
    empty = tiny_cfg("PATHS.RUN_NAME", "empty", input_dir=no_ships)
    with pytest.raises(ValueError, match="no image with ships"):
        module_train.train_detector(empty, *get_train_val_dicts(empty))


# ---------------------------------------------------------------- backbone from the classifier
def _classifier_run(tiny_cfg, tiny_trained, *overrides: str):
    """A tiny run whose classifier is ``tiny_trained``'s (ResNet-34), copied into its run folder."""
    import shutil

    cfg = tiny_cfg("DETECTOR.BACKBONE_FROM_CLASSIFIER", "True", *overrides)
    export = module_config.get_classifier_path(cfg)
    export.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(module_config.get_classifier_path(tiny_trained.cfg), export)
    return cfg


def test_the_detector_backbone_starts_from_the_classifier_and_computes_its_features(tiny_cfg, tiny_trained):
    import module_classifier

    cfg = _classifier_run(tiny_cfg, tiny_trained, "MODEL.RESNETS.DEPTH", "34", "DETECTOR.STAGES", "[[64, 2, 0.01, 0]]",
                          "DETECTOR.EVAL_PERIOD", "0")
    train_dicts, val_dicts = get_train_val_dicts(cfg)
    module_train.train_detector(cfg, train_dicts, val_dicts)
    detector_dir = module_config.get_detector_dir(cfg)
    log = (detector_dir / "log.txt").read_text()
    assert "stage 1 starts its ResNet (216 tensors) from the classifier" in log
    init = module_config.get_detector_path(cfg, "classifier_init")
    assert f"from {init}" in log  # stage 1's start
    fingerprint = json.loads((detector_dir / "stage1_64" / "stage.json").read_text())
    assert fingerprint["init"].startswith(f"classifier {module_config.get_classifier_path(cfg)}@")

    # the detector's ResNet, as written, computes the classifier body's features on the same image
    body = module_classifier.load_classifier(module_config.get_classifier_path(cfg)).model[0].eval().float()
    state = torch.load(init)["model"]
    assert all(name.startswith("backbone.bottom_up.") for name in state)
    assert_detector_resnet_computes_the_body(cfg, state, body)

    # a retrained classifier is another start: stage 1 is set aside and trained again
    export = module_config.get_classifier_path(cfg)
    os.utime(export, ns=(export.stat().st_atime_ns, export.stat().st_mtime_ns + 10**9))
    module_train.train_detector(cfg, train_dicts, val_dicts)
    log = (detector_dir / "log.txt").read_text()
    assert "its settings changed since its checkpoints were saved (init:" in log


def assert_detector_resnet_computes_the_body(cfg, state: dict, body: torch.nn.Module) -> torch.Tensor:
    """Load ``state`` (the detector's ResNet tensors) into the config's detector and check that its
    ResNet computes the classifier ``body``'s features on one image: detectron2's BGR 0-255 input
    against fastai's RGB ImageNet-normalized one. Returns the detector's res5 features."""
    from fastai.vision.all import imagenet_stats

    model = build_model(module_config.get_model_cfg(cfg)).eval().cpu()  # compared on the CPU, GPU or not
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not [m for m in missing if "bottom_up" in m]
    body = body.cpu()  # a classifier loaded on a GPU machine is on CUDA
    rgb = torch.randint(0, 256, (3, 64, 64), generator=torch.Generator().manual_seed(0)).float()
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in imagenet_stats)
    with torch.no_grad():
        expected = body(((rgb / 255 - mean) / std)[None])
        bgr = rgb.flip(0)  # INPUT.FORMAT BGR, 0-255
        got = model.backbone.bottom_up(((bgr - model.pixel_mean) / model.pixel_std)[None])["res5"]
    # fp32 through 18 layers by two convolution paths: a trained body's features (up to ~10) differ
    # in the 4th digit (one element in 2,048 by 2e-4 relative, a cell-loss-trained body)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=1e-3)
    return got


def test_a_half_width_classifier_body_fits_the_half_width_detector(tiny_cfg):
    """CLASSIFIER.WIDTH 0.5 (module_classifier.narrow_resnet) against the demo's detector ResNet
    (build_basic_resnet_fpn_backbone at 32 channels): the same tensors, the same features."""
    import module_classifier
    from fastai.vision.all import create_body

    cfg = tiny_cfg("CLASSIFIER.ARCH", "resnet18", "CLASSIFIER.WIDTH", "0.5", "MODEL.BACKBONE.NAME",
                   "build_basic_resnet_fpn_backbone", "MODEL.RESNETS.STEM_OUT_CHANNELS", "32",
                   "MODEL.RESNETS.RES2_OUT_CHANNELS", "32")
    torch.manual_seed(0)
    body = create_body(module_classifier.narrow_resnet("resnet18", 0.5), pretrained=False).eval()
    state = module_train.classifier_body_to_detectron2(body.state_dict(), cfg)
    got = assert_detector_resnet_computes_the_body(cfg, state, body)
    assert got.shape[1] == 256

    # CLASSIFIER.SPACE_TO_DEPTH: the stem's 12-channel kernel folds back into an RGB one; an
    # untrained stem (the RGB kernel spread over its 2 x 2 sub-pixels) folds back to that kernel
    body[0] = module_classifier.SpaceToDepthStem(body[0], 2)
    assert body[0].conv.weight.shape[1] == 12
    folded = module_train.classifier_body_to_detectron2(body.state_dict(), cfg)
    assert folded.keys() == state.keys()
    for name in state:
        torch.testing.assert_close(folded[name], state[name], atol=1e-6, rtol=1e-5)


def test_backbone_from_the_classifier_errors(tiny_cfg, tiny_trained):
    with pytest.raises(ValueError, match="BACKBONE_FROM_CLASSIFIER is True and MODEL.WEIGHTS is 'w.pth'"):
        tiny_cfg("DETECTOR.BACKBONE_FROM_CLASSIFIER", "True", "MODEL.WEIGHTS", "w.pth")
    cfg = tiny_cfg("DETECTOR.BACKBONE_FROM_CLASSIFIER", "True")  # no classifier trained in this run
    with pytest.raises(FileNotFoundError, match=r"classifier export .*export.pkl does not exist: train the classifier first"):
        module_train.train_detector(cfg, *get_train_val_dicts(cfg))
    assert not module_config.get_stage_dir(cfg, module_config.get_stage(cfg, 1)).exists()  # before any work
    # the demo pairs ResNet-18 with ResNet-18; tiny's classifier is ResNet-34 against a ResNet-18 detector
    mismatched = _classifier_run(tiny_cfg, tiny_trained, "PATHS.RUN_NAME", "mismatch")
    with pytest.raises(ValueError, match=r"classifier's res2.2.conv1.weight .* does not fit the detector \(absent\): "
                                         r"CLASSIFIER.ARCH resnet34 against MODEL.RESNETS.DEPTH 18"):
        module_train.train_detector(mismatched, *get_train_val_dicts(mismatched))


# ---------------------------------------------------------------- command line
def test_cli_parses_the_documented_shape():
    args = module_train.get_args_parser().parse_args(
        ["--config", "configs/demo.yaml", "--stage", "2", "SOLVER.IMS_PER_BATCH", "4", "DETECTOR.EVAL_PERIOD=10"]
    )
    assert (args.config, args.stage, args.opts) == ("configs/demo.yaml", 2, ["SOLVER.IMS_PER_BATCH", "4",
                                                                             "DETECTOR.EVAL_PERIOD=10"])
    assert module_config.get_cfg_from_args(args).DETECTOR.EVAL_PERIOD == 10
    assert re.search(r"KEY VALUE", module_train.get_args_parser().format_help())
    assert module_train.get_args_parser().parse_args([]).config == "configs/airbus.yaml"


def test_help_prints_no_future_warning(repo_root):
    """detectron2, fvcore and fastai script functions at import: torch's deprecation warning of
    torch.jit.script must not flood every --help."""
    result = subprocess.run([sys.executable, "module_train.py", "--help"], cwd=repo_root, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--stage" in result.stdout and "KEY VALUE" in result.stdout
    assert "FutureWarning" not in result.stderr + result.stdout, result.stderr[-2000:]
