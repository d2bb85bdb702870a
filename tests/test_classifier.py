"""module_classifier: the real fastai ResNet34 of ``configs/tiny.yaml`` (random init) at 64 px, 1 epoch, on CPU.

One module-scoped training on a hand-built dataset (PNG/JPEG tiles with and without a bright
hull) serves the export/reload, CSV and bad-input tests; the generated Kaggle-format data and the
real Kaggle sample each get their own 1-epoch run through the public entry points. Configs come
from conftest's ``tiny_cfg`` / ``make_tiny_cfg`` (``configs/tiny.yaml``).
"""
from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

import module_classifier as mc
import module_config
from module_rle import masks_to_coco

LR = ["CLASSIFIER.LR", "1e-3"]  # pinned: the demo's LR (tiny inherits it) is tuned for 1,000 images; 24 saturate


def write_tile(path: Path, rng: np.random.Generator, ship: bool, size: int = 64) -> dict:
    """A sea-noise tile, with a bright 4x12 px hull when ``ship``; returns its dataset dict."""
    pixels = rng.normal(70, 12, (size, size, 3)).clip(0, 255).astype(np.uint8)
    annotations = []
    if ship:
        y, x = rng.integers(4, size - 16, 2)
        pixels[y:y + 4, x:x + 12] = 235
        mask = np.zeros((size, size), bool)
        mask[y:y + 4, x:x + 12] = True
        annotations = [{"bbox": [int(x), int(y), 12, 4], "category_id": 0, "iscrowd": 0,
                        "segmentation": masks_to_coco(mask[None])[0]}]
    Image.fromarray(pixels).save(path)
    return {"file_name": str(path), "height": size, "width": size, "image_id": path.name,
            "annotations": annotations}


@pytest.fixture(scope="module")
def tiles(tmp_path_factory):
    """24 train + 8 val hand-built 64 px tiles (a third with a ship), PNG and JPEG mixed."""
    root = tmp_path_factory.mktemp("tiny")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    dicts = [write_tile(root / "images" / f"tile{i:02d}.{'png' if i % 2 else 'jpg'}", rng, ship=i % 3 == 0)
             for i in range(32)]
    return root, dicts[:24], dicts[24:]


@pytest.fixture(scope="module")
def trained(tiles, make_tiny_cfg):
    """(cfg, export path) of one 1-epoch run of the tiny config on ``tiles``."""
    root, train_dicts, val_dicts = tiles
    cfg = make_tiny_cfg(root / "runs", *LR)
    export = mc.train_classifier(cfg, train_dicts, val_dicts)["export"]
    return cfg, export


@pytest.fixture(scope="module")
def learner(trained):
    return mc.load_classifier(trained[1])


# ---------------------------------------------------------------- plain logic


def test_threshold_table_by_hand():
    has_ship = np.array([True, True, False, False, False])
    p_ship = np.array([0.9, 0.4, 0.6, 0.1, 0.0])
    table = mc.get_threshold_table(has_ship, p_ship, thresholds=[0.0, 0.5, 0.95]).set_index("threshold")
    assert table.loc[0.0, ["tp", "fp", "fn", "tn"]].tolist() == [2, 3, 0, 0]
    assert table.loc[0.5, ["tp", "fp", "fn", "tn"]].tolist() == [1, 1, 1, 2]
    assert table.loc[0.5, "precision"] == 0.5 and table.loc[0.5, "recall"] == 0.5
    assert table.loc[0.5, "kept_fraction"] == pytest.approx(0.4)
    # nothing kept: precision is 1 by convention, recall 0
    assert table.loc[0.95, ["tp", "fp", "precision", "recall", "kept_fraction"]].tolist() == [0, 0, 1.0, 0.0, 0.0]


def test_roc_auc_is_nan_for_one_class():
    assert np.isnan(mc.roc_auc_or_nan(np.array([0, 0]), np.array([0.2, 0.7])))
    assert mc.roc_auc_or_nan(np.array([0, 1, 1]), np.array([0.1, 0.7, 0.6])) == 1.0


# ---------------------------------------------------------------- training and its outputs


def test_training_writes_export_history_report_and_tensorboard(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg, export = trained
    out_dir = export.parent
    assert export == Path(cfg.PATHS.RUNS_DIR) / cfg.PATHS.RUN_NAME / "classifier" / "export.pkl"
    assert export.stat().st_size > 80e6  # ResNet34 weights are in it
    assert (out_dir / "config.yaml").is_file()
    history = pd.read_csv(out_dir / "history.csv")
    assert history.columns.tolist() == ["epoch", "train_loss", "valid_loss", "accuracy", "precision_ship",
                                        "recall_ship", "roc_auc"]
    assert len(history) == 1 and history["train_loss"].notna().all()
    assert 0.0 <= history["roc_auc"].iloc[0] <= 1.0

    predictions = pd.read_csv(out_dir / "val_predictions.csv")
    assert predictions.columns.tolist() == ["ImageId", "has_ship", "p_ship"]
    assert len(predictions) == 8 and predictions["has_ship"].sum() == 3  # tiles 24, 27, 30
    table = pd.read_csv(out_dir / "val_thresholds.csv")
    assert table["threshold"].tolist() == pytest.approx(mc.REPORT_THRESHOLDS.tolist())
    assert (table[["tp", "fn"]].sum(axis=1) == 3).all() and (table[["fp", "tn"]].sum(axis=1) == 5).all()
    assert table["recall"].is_monotonic_decreasing
    assert (out_dir / "val_thresholds.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    events = EventAccumulator(str(out_dir)).Reload()
    tags = events.Tags()["scalars"]
    assert {"train_loss", "valid_loss", "roc_auc", "precision_ship", "recall_ship"} <= set(tags)
    assert len(events.Scalars("train_loss")) == 24 // cfg.CLASSIFIER.BATCH_SIZE  # one per training batch


def test_an_export_of_the_same_config_and_data_is_reused_and_fresh_trains_again(trained, tiles, make_tiny_cfg,
                                                                                tmp_path, caplog):
    cfg, export = trained
    _, train_dicts, val_dicts = tiles
    # the trained run's classifier folder, in another run folder: same config and data, other PATHS
    copy_cfg = make_tiny_cfg(tmp_path / "runs", *LR)
    folder = module_config.get_classifier_dir(copy_cfg)
    shutil.copytree(export.parent, folder)
    copied = folder / "export.pkl"
    stamp = copied.stat().st_mtime_ns
    with caplog.at_level(logging.INFO, logger="module_classifier"):
        paths = mc.train_classifier(copy_cfg, train_dicts, val_dicts)
    assert "reused" in caplog.text and paths["export"] == copied and copied.stat().st_mtime_ns == stamp
    assert set(paths) == {"export", "fingerprint", "history", "val_predictions", "val_thresholds",
                          "val_thresholds_plot"} and all(p.is_file() for p in paths.values())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="module_classifier"):
        paths = mc.train_classifier(copy_cfg, train_dicts, val_dicts, fresh=True)
    assert "reused" not in caplog.text and "training again" in caplog.text
    assert paths["export"].is_file() and paths["export"].stat().st_mtime_ns != stamp
    set_aside = [p for p in folder.parent.iterdir() if p.name.startswith("classifier.old-")]
    assert len(set_aside) == 1 and set_aside[0].name in caplog.text  # moved aside, not deleted, and said so
    assert (set_aside[0] / "export.pkl").stat().st_mtime_ns == stamp


def fp32_atol(learner) -> float:
    """How far two fp32 passes of the same images may differ: 1e-6 on a CPU; on CUDA, cuDNN runs
    fp32 convolutions as TF32 by default, and batches of other sizes differed by up to 5e-4 (H200)."""
    return 1e-6 if next(learner.model.parameters()).device.type == "cpu" else 2e-3


def test_export_reload_gives_identical_probabilities(trained, tiles, learner):
    from fastai.vision.all import load_learner

    cfg, export = trained
    _, _, val_dicts = tiles
    paths = [d["file_name"] for d in val_dicts]
    atol = fp32_atol(learner)
    # fp32: learn.predict below runs fp32, and bf16 differs from it by ~5e-3, not 1e-5.
    first = mc.predict_p_ship(learner, paths, batch_size=3, precision="fp32")
    assert first["p_ship"].nunique() > 1  # not saturated, so the comparison means something
    again = mc.predict_p_ship(load_learner(export), paths, batch_size=8, precision="fp32")
    pd.testing.assert_frame_equal(first, again, check_exact=False, rtol=0, atol=atol)
    reported = pd.read_csv(export.parent / "val_predictions.csv")  # from the in-memory learner
    same_precision = mc.predict_p_ship(learner, paths, batch_size=cfg.CLASSIFIER.BATCH_SIZE,
                                       precision=cfg.CLASSIFIER.PRECISION)  # as train_classifier predicts
    np.testing.assert_allclose(reported["p_ship"], same_precision["p_ship"], atol=atol)
    # The usual Kaggle call on the exported learner agrees with the batched path.
    _, _, probs = learner.predict(paths[0])
    assert float(probs[1]) == pytest.approx(first["p_ship"].iloc[0], abs=max(atol, 1e-5))


def test_flip_tta_is_the_mean_over_the_four_flips(tmp_path, learner):
    write_tile(tmp_path / "tile.png", np.random.default_rng(1), ship=True)  # hull off-centre: flips differ
    pixels = np.asarray(Image.open(tmp_path / "tile.png"))
    flips = {"id": pixels, "h": pixels[:, ::-1], "v": pixels[::-1], "hv": pixels[::-1, ::-1]}
    for name, array in flips.items():
        Image.fromarray(np.ascontiguousarray(array)).save(tmp_path / f"{name}.png")  # lossless, 64 px: no resize
    # fp32: under bf16 a batch of 4 images and four batches of 1 may round differently.
    plain = mc.predict_p_ship(learner, [tmp_path / f"{n}.png" for n in flips], tta=False, precision="fp32")
    tta = mc.predict_p_ship(learner, [tmp_path / "id.png"], tta=True, precision="fp32")
    assert plain["p_ship"].nunique() > 1
    assert tta["p_ship"].iloc[0] == pytest.approx(plain["p_ship"].mean(), abs=fp32_atol(learner))


def test_predict_cli_writes_every_image(trained, tiles, tmp_path, tiny_config):
    cfg, export = trained
    root, _, _ = tiles
    out = tmp_path / "sub" / "p_ship.csv"
    args = mc.get_args_parser().parse_args(
        ["predict", "--config", str(tiny_config), "--images", str(root / "images"), "--out", str(out),
         "--tta", "--model", str(export), "CLASSIFIER.BATCH_SIZE=16", "CLASSIFIER.NUM_WORKERS", "0"])
    assert mc.main(args) == out
    assert out.read_text().splitlines()[0] == "ImageId,p_ship"
    table = pd.read_csv(out)
    assert table["ImageId"].tolist() == sorted(p.name for p in (root / "images").iterdir())
    assert table["p_ship"].between(0.0, 1.0).all()
    assert pd.read_csv(out.parent / "p_ship_failures.csv").empty  # the failure report is always written
    assert not list(out.parent.glob(".*tmp*"))  # the atomic writer left no temporary file


def test_cli_generates_the_data_and_trains_on_it(tmp_path, tiny_config):
    args = mc.get_args_parser().parse_args(
        ["train", "--config", str(tiny_config), "PATHS.RUNS_DIR", str(tmp_path / "runs"),
         "PATHS.INPUT_DIR", str(tmp_path / "input"), "CLASSIFIER.BALANCE=sampler", "=".join(LR)])
    assert not args.fresh
    export = mc.main(args)["export"]  # the command line generated tiny.yaml's synthetic dataset first
    assert export == tmp_path / "runs" / "tiny" / "classifier" / "export.pkl"
    predictions = pd.read_csv(export.parent / "val_predictions.csv")
    truth = pd.read_csv(tmp_path / "input" / "train_ship_segmentations_v2.csv")
    has_ship = truth.groupby("ImageId")["EncodedPixels"].apply(lambda s: s.notna().any())
    assert len(predictions) >= 5
    assert (predictions["has_ship"].to_numpy() == has_ship[predictions["ImageId"]].to_numpy()).all()
    assert predictions["p_ship"].between(0, 1).all()


@pytest.mark.parametrize("balance, ship_share", [("sampler", 0.5), ("weights", 1 / 3)])
def test_balanced_sampler_draws_half_ship_tiles_and_leaves_validation_alone(tiles, tiny_cfg, balance, ship_share):
    _, train_dicts, val_dicts = tiles  # a third of the tiles hold a ship
    cfg = tiny_cfg("CLASSIFIER.BALANCE", balance, *LR)
    frame = mc.get_label_frame(train_dicts, val_dicts)
    dls = mc.build_dataloaders(cfg, frame)
    labels = dls.train.items["label"].to_numpy()
    drawn = np.concatenate([labels[list(dls.train.get_idxs())] for _ in range(100)])  # 100 epochs of 24
    assert len(drawn) == 100 * len(train_dicts)
    assert abs((drawn == mc.SHIP).mean() - ship_share) < 0.05
    assert sorted(dls.valid.get_idxs()) == list(range(len(val_dicts)))  # every validation tile, once


def test_trains_on_the_real_kaggle_sample(airbus_images, airbus_truth_csv, tiny_cfg):
    import module_preprocessing as preprocessing

    dicts = preprocessing.load_dataset_dicts(airbus_truth_csv, airbus_images)
    assert len(dicts) == 64 and sum(bool(d["annotations"]) for d in dicts) == 40
    train_dicts, val_dicts = preprocessing.split_train_val(dicts, val_fraction=0.25, seed=0)
    cfg = tiny_cfg("DATA.IMAGE_SIZE", "768", *LR)  # Kaggle's tiles, decoded small for a 64 px model
    learner = mc.load_classifier(mc.train_classifier(cfg, train_dicts, val_dicts)["export"])
    predictions = mc.predict_p_ship(learner, [d["file_name"] for d in val_dicts], batch_size=16)
    assert predictions["ImageId"].tolist() == [d["image_id"] for d in val_dicts]
    assert predictions["p_ship"].between(0, 1).all()


# ---------------------------------------------------------------- precision


def test_bf16_probabilities_are_close_to_fp32(learner, tiles):
    _, train_dicts, val_dicts = tiles
    paths = [d["file_name"] for d in train_dicts + val_dicts]
    fp32 = mc.predict_p_ship(learner, paths, batch_size=16, tta=True, precision="fp32")
    bf16 = mc.predict_p_ship(learner, paths, batch_size=16, tta=True, precision="bf16")
    assert fp32["ImageId"].tolist() == bf16["ImageId"].tolist()
    for frame in (fp32, bf16):
        assert frame["p_ship"].dtype == np.float32 and frame["p_ship"].between(0.0, 1.0).all()
    assert fp32["p_ship"].nunique() > 1
    np.testing.assert_allclose(bf16["p_ship"], fp32["p_ship"], atol=0.05)
    assert not (bf16["p_ship"] == fp32["p_ship"]).all()  # bf16 did run
    auto = mc.predict_p_ship(learner, paths, batch_size=16, tta=True, precision="auto")
    resolved = mc.resolve_precision("auto", next(learner.model.parameters()).device)
    if resolved == "fp16":  # CUDA
        np.testing.assert_allclose(auto["p_ship"], fp32["p_ship"], atol=0.05)
    else:
        pd.testing.assert_frame_equal(auto, bf16 if resolved == "bf16" else fp32)


def test_auto_precision_resolves_per_device(monkeypatch):
    monkeypatch.setattr(mc, "cpu_has_native_bf16", lambda: True)
    assert mc.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(mc, "cpu_has_native_bf16", lambda: False)
    assert mc.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert mc.resolve_precision("bf16", "cpu") == "bf16"  # explicit: taken as it is
    assert mc.resolve_precision("auto", torch.device("cuda")) == "fp16"
    assert mc.resolve_precision("fp32", "cuda") == "fp32" and mc.resolve_precision("bf16", "cuda") == "bf16"
    assert mc.resolve_precision("auto", "meta") == "fp32"
    with mc.autocast_context("fp32", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    with mc.autocast_context("bf16", "cpu"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert torch.ones(2, 2).mm(torch.ones(2, 2)).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")


def test_native_bf16_check_survives_a_missing_op(monkeypatch):
    def missing():
        raise RuntimeError("no such op")

    mc.cpu_has_native_bf16.cache_clear()
    try:
        monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", missing)
        assert mc.cpu_has_native_bf16() is False
        assert mc.resolve_precision("auto", "cpu") == "fp32"
    finally:
        monkeypatch.undo()
        mc.cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize("precision", ["fp16", "FP32", "", "bfloat16"])
def test_invalid_precision_names_the_key_and_the_choices(learner, tiles, tiny_cfg, tmp_path, precision):
    _, train_dicts, val_dicts = tiles
    message = rf"CLASSIFIER.PRECISION {precision!r}: expected one of \('auto', 'fp32', 'bf16', 'int8'\)"
    with pytest.raises(ValueError, match=message):
        mc.predict_p_ship(learner, [val_dicts[0]["file_name"]], precision=precision)
    # in a config, the range check of get_cfg says it before anything is trained
    with pytest.raises(ValueError, match=rf"CLASSIFIER.PRECISION is {precision!r}; expected one of 'auto', 'fp32', "
                                         r"'bf16', 'int8'"):
        tiny_cfg("CLASSIFIER.PRECISION", precision)
    assert not (tmp_path / "runs" / "tiny" / "classifier" / "export.pkl").exists()


def test_int8_is_calibrated_at_training_exported_and_close_to_fp32(tiles, tiny_cfg, tiny_config, tmp_path):
    _, train_dicts, val_dicts = tiles
    cfg = tiny_cfg("CLASSIFIER.PRECISION", "int8", "CLASSIFIER.INT8_CALIBRATION_IMAGES", "12", *LR)
    export = mc.train_classifier(cfg, train_dicts, val_dicts)["export"]
    learner = mc.load_classifier(export)
    observers = learner.int8_observers  # calibrated before the export, and carried by it
    assert observers and all("activation_post_process" in k for k in observers)
    paths = [d["file_name"] for d in train_dicts + val_dicts]
    int8 = mc.predict_p_ship(learner, paths, batch_size=16, tta=True, precision="int8")
    fp32 = mc.predict_p_ship(learner, paths, batch_size=16, tta=True, precision="fp32")
    assert int8["ImageId"].tolist() == fp32["ImageId"].tolist()
    assert int8["p_ship"].dtype == np.float32 and int8["p_ship"].between(0.0, 1.0).all()
    assert not (int8["p_ship"] == fp32["p_ship"]).all()  # int8 did run
    np.testing.assert_allclose(int8["p_ship"], fp32["p_ship"], atol=0.1)
    model = mc.int8_model(learner)
    assert mc.int8_model(learner) is model  # converted once per learner
    assert any(isinstance(m, torch.ao.nn.quantized.Conv2d) for m in model.modules())
    # The validation report was predicted at int8, and a reloaded export predicts the same.
    reported = pd.read_csv(export.parent / "val_predictions.csv")
    again = mc.predict_p_ship(mc.load_classifier(export), reported["ImageId"].map(
        {d["image_id"]: d["file_name"] for d in val_dicts}), batch_size=3, tta=cfg.CLASSIFIER.TTA, precision="int8")
    np.testing.assert_allclose(reported["p_ship"], again["p_ship"], atol=1e-6)
    # ... and so does the command line with the same override.
    root, out = Path(val_dicts[0]["file_name"]).parent, tmp_path / "p_ship_int8.csv"
    mc.main(mc.get_args_parser().parse_args(
        ["predict", "--config", str(tiny_config), "--images", str(root), "--out", str(out), "--no-tta",
         "--model", str(export), "CLASSIFIER.NUM_WORKERS", "0", "CLASSIFIER.PRECISION", "int8"]))
    cli = pd.read_csv(out).set_index("ImageId")["p_ship"]
    direct = mc.predict_p_ship(learner, [root / name for name in cli.index], precision="int8")
    np.testing.assert_allclose(cli.to_numpy(), direct["p_ship"], atol=1e-5)  # the CSV keeps 6 decimals


def test_int8_without_calibration_says_how(trained, tiles):
    learner = mc.load_classifier(trained[1])  # trained at the demo's precision: no int8 calibration
    assert not getattr(learner, "int8_observers", None)
    with pytest.raises(ValueError, match="carries no int8 calibration.*calibrate_int8"):
        mc.predict_p_ship(learner, ["no/such/image.jpg"], precision="int8")  # before any image is read
    _, train_dicts, val_dicts = tiles
    mc.calibrate_int8(learner, [d["file_name"] for d in train_dicts[:8]], batch_size=4, progress=False)
    p_ship = mc.predict_p_ship(learner, [d["file_name"] for d in val_dicts], precision="int8")
    assert p_ship["p_ship"].between(0.0, 1.0).all()
    with pytest.raises(ValueError, match="no calibration images"):
        mc.calibrate_int8(learner, [])


def test_int8_is_for_cpu_only_and_trains_as_auto():
    assert mc.resolve_precision("int8", "cpu") == "int8"
    with pytest.raises(ValueError, match="'int8' runs on x86 CPUs only.*not on cuda"):
        mc.resolve_precision("int8", "cuda")
    with mc.autocast_context("int8", "cpu"):
        assert not torch.is_autocast_enabled("cpu")
    learn = tiny_fastai_learner()
    with mc.training_precision(learn, "int8") as used:
        assert used == ("bf16" if mc.resolve_precision("auto", "cpu") == "bf16" else "fp32")


def tiny_fastai_learner(model=None):
    """A fastai Learner over 16 random 8x8 images, on CPU."""
    from fastai.data.core import DataLoaders
    from fastai.vision.all import CrossEntropyLossFlat, Learner

    torch.manual_seed(0)
    items = list(zip(torch.randn(16, 3, 8, 8), torch.randint(0, 2, (16,))))
    dls = DataLoaders.from_dsets(items, items[:8], bs=4, device=torch.device("cpu"))
    model = model or torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1),
                                         torch.nn.Flatten(), torch.nn.Linear(4, 2))
    return Learner(dls, model, loss_func=CrossEntropyLossFlat())


@pytest.mark.parametrize("precision, expected", [("bf16", torch.bfloat16), ("fp32", torch.float32)])
def test_training_precision_runs_forward_at_bf16_and_the_rest_at_fp32(precision, expected):
    from fastai.callback.core import Callback

    seen = {"pred": set(), "loss": set(), "autocast_in_loss": set(), "weights": set(), "grads": set()}

    class EarlyProbe(Callback):
        order = 5  # before CPUAutocast (order 10) casts the prediction to float32

        def after_pred(self):
            seen["pred"].add(self.pred.dtype)

    class LateProbe(Callback):
        order = 20  # after CPUAutocast left autocast

        def after_loss(self):
            seen["loss"].add(self.loss_grad.dtype)
            seen["autocast_in_loss"].add(torch.is_autocast_enabled("cpu"))

        def after_backward(self):
            seen["weights"] |= {p.dtype for p in self.model.parameters()}
            seen["grads"] |= {p.grad.dtype for p in self.model.parameters()}

    learn = tiny_fastai_learner()
    with mc.training_precision(learn, precision) as used:
        learn.fit(1, 1e-2, cbs=[EarlyProbe(), LateProbe()])
    assert used == precision
    assert seen["pred"] == {expected}
    assert seen["loss"] == seen["weights"] == seen["grads"] == {torch.float32}
    assert seen["autocast_in_loss"] == {False}
    assert not torch.is_autocast_enabled("cpu")
    assert not any(isinstance(cb, mc.CPUAutocast) for cb in learn.cbs)  # not exported with the learner
    assert np.isfinite(learn.recorder.values[-1][0])


def test_training_precision_turns_autocast_off_when_a_batch_raises():
    class Interrupted(torch.nn.Module):  # Ctrl-C in the middle of the third forward pass
        def __init__(self):
            super().__init__()
            self.linear, self.calls = torch.nn.Linear(3 * 8 * 8, 2), 0

        def forward(self, x):
            self.calls += 1
            if self.calls == 3:
                assert torch.is_autocast_enabled("cpu")
                raise KeyboardInterrupt
            return self.linear(x.flatten(1))

    learn = tiny_fastai_learner(Interrupted())
    with pytest.raises(KeyboardInterrupt):
        with mc.training_precision(learn, "bf16"):
            learn.fit(1, 1e-2)
    assert not torch.is_autocast_enabled("cpu")
    assert not any(isinstance(cb, mc.CPUAutocast) for cb in learn.cbs)


def test_training_precision_is_fp32_on_cuda():
    learn = tiny_fastai_learner()
    learn.dls.device = torch.device("cuda")  # only read: nothing runs
    with mc.training_precision(learn, "auto") as used:
        assert used == "fp32" and not any(isinstance(cb, mc.CPUAutocast) for cb in learn.cbs)


# ---------------------------------------------------------------- bad input


def test_missing_image_errors_or_is_skipped(learner, tiles):
    _, _, val_dicts = tiles
    paths = [Path(d["file_name"]) for d in val_dicts[:3]]
    gone = paths[0].with_name("gone.jpg")
    with pytest.raises(FileNotFoundError, match="gone.jpg"):
        mc.predict_p_ship(learner, [*paths, gone])
    result = mc.predict_p_ship(learner, [*paths, gone], on_bad_image="skip")
    assert result["ImageId"].tolist() == [p.name for p in paths]
    assert result.attrs["skipped"] == [str(gone)]


@pytest.mark.parametrize("corruption", ["truncated", "truncated_end_marker_restored", "not_an_image", "empty"])
def test_corrupt_image_errors_or_is_skipped(learner, tiles, tmp_path, corruption):
    _, _, val_dicts = tiles
    good = Path(val_dicts[0]["file_name"])
    bad = tmp_path / "bad.jpg"
    jpeg = tmp_path / "full.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(jpeg, quality=95)
    half = jpeg.read_bytes()[: jpeg.stat().st_size // 2]
    content = {"truncated": half, "truncated_end_marker_restored": half + b"\xff\xd9",
               "not_an_image": b"ImageId,EncodedPixels\n", "empty": b""}[corruption]
    bad.write_bytes(content)
    with pytest.raises(ValueError, match="bad.jpg"):
        mc.predict_p_ship(learner, [good, bad])
    result = mc.predict_p_ship(learner, [good, bad], on_bad_image="skip")
    assert result["ImageId"].tolist() == [good.name] and result.attrs["skipped"] == [str(bad)]
    assert len(result.attrs["reasons"]) == 1 and "cannot decode" in result.attrs["reasons"][0]


def test_an_image_of_another_size_than_the_training_tiles_is_rejected(learner, tiles, tmp_path):
    """The model was trained on tiny.yaml's 64 px tiles (DATA.IMAGE_SIZE, kept in the export): a
    512 px image is a bad image, not silently shrunk."""
    _, _, val_dicts = tiles
    good = Path(val_dicts[0]["file_name"])
    big = tmp_path / "big.png"
    Image.fromarray(np.full((512, 512, 3), 90, np.uint8)).save(big)
    with pytest.raises(ValueError, match=r"big.png: size 512x512, expected 64x64"):
        mc.predict_p_ship(learner, [good, big])
    opener = mc.ReducedImageOpener(64, 64)
    assert np.asarray(opener(good)).shape == (64, 64, 3)
    with pytest.raises(ValueError, match="expected 64x64"):
        opener(big)
    result = mc.predict_p_ship(learner, [good, big], on_bad_image="skip")
    assert result["ImageId"].tolist() == [good.name] and result.attrs["skipped"] == [str(big)]
    assert result.attrs["reasons"] == ["size 512x512, expected 64x64"]


def test_predict_cli_skips_bad_images_into_a_report_and_fails_over_the_limit(trained, tiles, tmp_path, tiny_config):
    import module_files

    _, export = trained
    _, _, val_dicts = tiles
    folder = tmp_path / "folder"
    folder.mkdir()
    good = Path(val_dicts[0]["file_name"])
    shutil.copy(good, folder / good.name)
    (folder / "cut.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    out = tmp_path / "p_ship.csv"
    argv = ["predict", "--config", str(tiny_config), "--images", str(folder), "--out", str(out), "--model", str(export),
            "--on-bad-image", "skip"]
    assert mc.main(mc.get_args_parser().parse_args([*argv, "--max-failed", "1"])) == out  # one failure allowed
    assert pd.read_csv(out)["ImageId"].tolist() == [good.name]
    report = pd.read_csv(tmp_path / "p_ship_failures.csv")
    assert report["ImageId"].tolist() == ["cut.jpg"] and "cannot decode" in report["reason"].iloc[0]
    out.unlink()
    with pytest.raises(module_files.TooManyFailures, match="1 of 2 images .*p_ship_failures.csv"):
        mc.main(mc.get_args_parser().parse_args(argv))  # SUBMIT.MAX_FAILED 0.01 of 2 images: none allowed
    assert pd.read_csv(out)["ImageId"].tolist() == [good.name]  # written anyway, and so is the report
    assert pd.read_csv(tmp_path / "p_ship_failures.csv")["ImageId"].tolist() == ["cut.jpg"]


def test_bad_image_policy_is_checked(learner, tiles):
    with pytest.raises(ValueError, match="'error', 'skip'"):
        mc.predict_p_ship(learner, [tiles[1][0]["file_name"]], on_bad_image="ignore")


def test_predict_cli_empty_or_missing_folder(trained, tmp_path, tiny_config):
    _, export = trained
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    parser = mc.get_args_parser()
    base = ["predict", "--config", str(tiny_config), "--out", str(tmp_path / "p.csv"), "--model", str(export)]
    with pytest.raises(ValueError, match="holds no .jpg"):
        mc.main(parser.parse_args([*base, "--images", str(tmp_path / "empty")]))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        mc.main(parser.parse_args([*base, "--images", str(tmp_path / "nowhere")]))
    assert not (tmp_path / "p.csv").exists()


def test_predict_cli_without_a_trained_model(tiles, tmp_path, tiny_config):
    root, _, _ = tiles
    args = mc.get_args_parser().parse_args(
        ["predict", "--config", str(tiny_config), "--images", str(root / "images"), "--out", str(tmp_path / "p.csv"),
         "PATHS.RUNS_DIR", str(tmp_path / "runs")])
    with pytest.raises(FileNotFoundError, match="export.pkl does not exist; train one first"):
        mc.main(args)


def test_train_cli_with_missing_data(tmp_path, repo_root):
    args = mc.get_args_parser().parse_args(
        ["train", "--config", str(repo_root / "configs" / "airbus.yaml"), "PATHS.INPUT_DIR", str(tmp_path / "nodata"),
         "PATHS.RUNS_DIR", str(tmp_path / "runs")])
    with pytest.raises(FileNotFoundError, match="nodata"):
        mc.main(args)


def test_training_dicts_with_missing_file_or_one_class(tiles, tiny_cfg, tmp_path):
    _, train_dicts, val_dicts = tiles
    cfg = tiny_cfg()
    moved = dict(train_dicts[0], file_name=str(tmp_path / "moved.jpg"))
    with pytest.raises(FileNotFoundError, match="moved.jpg"):
        mc.train_classifier(cfg, [moved, *train_dicts[1:]], val_dicts)
    with pytest.raises(ValueError, match="both ship and ship-free"):
        mc.train_classifier(cfg, [d for d in train_dicts if not d["annotations"]], val_dicts)
    with pytest.raises(ValueError, match="0 validation"):
        mc.train_classifier(cfg, train_dicts, [])
    with pytest.raises(ValueError, match="CLASSIFIER.BALANCE is 'oversample'; expected one of 'weights', 'sampler'"):
        tiny_cfg("CLASSIFIER.BALANCE", "oversample")  # the config's range check, before any training
    assert not (tmp_path / "runs" / "tiny" / "classifier" / "export.pkl").exists()


def test_pretrained_offline_says_where_the_weights_go(tiles, tiny_cfg, tmp_path, monkeypatch):
    _, train_dicts, val_dicts = tiles
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))  # an empty hub cache

    def offline(*args, **kwargs):
        raise OSError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    cfg = tiny_cfg("CLASSIFIER.PRETRAINED", "True")
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    with pytest.raises(RuntimeError, match=rf"(?s){expected}.*CLASSIFIER.PRETRAINED False"):
        mc.train_classifier(cfg, train_dicts, val_dicts)


def test_unknown_arch_names_the_valid_ones(tiles, tiny_cfg):
    _, train_dicts, val_dicts = tiles
    with pytest.raises(ValueError, match="CLASSIFIER.ARCH 'vgg16': expected a torchvision ResNet, .*resnet34"):
        mc.train_classifier(tiny_cfg("CLASSIFIER.ARCH", "vgg16"), train_dicts, val_dicts)


def test_a_half_width_resnet_trains_exports_and_predicts(tiles, tiny_cfg):
    """CLASSIFIER.WIDTH 0.5: torchvision's ResNet-18 with half the channels in every layer, through
    fastai's training, export (the constructor is pickled with the learner) and prediction."""
    root, train_dicts, val_dicts = tiles
    cfg = tiny_cfg("CLASSIFIER.ARCH", "resnet18", "CLASSIFIER.WIDTH", "0.5", *LR)
    export = mc.train_classifier(cfg, train_dicts, val_dicts)["export"]
    learn = mc.load_classifier(export)
    body = learn.model[0]
    assert [body[0].out_channels] + [getattr(body, str(i))[-1].conv2.out_channels for i in range(4, 8)] == [32, 32, 64, 128, 256]
    full = sum(p.numel() for p in mc.narrow_resnet("resnet18", 1.0).parameters())
    half = sum(p.numel() for p in mc.narrow_resnet("resnet18", 0.5).parameters())
    assert half < 0.3 * full  # a quarter of the weights (and of the multiply-adds), plus the wider fc's
    p_ship = mc.predict_p_ship(learn, [d["file_name"] for d in val_dicts])["p_ship"]
    assert len(p_ship) == len(val_dicts) and p_ship.between(0, 1).all()


def test_space_to_depth_stem_starts_as_the_stem_on_the_smaller_image():
    """SpaceToDepthStem: block x block squares become channels; at the start it computes the
    original convolution on the image average-pooled by the block, and it keeps every pixel: two
    images with the same block means (a 1 px ship moved within its block) still differ after it."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, kernel_size=7, stride=2, padding=3, bias=False)
    stem = mc.SpaceToDepthStem(conv, 2)
    assert stem.conv.weight.shape == (8, 12, 7, 7) and stem.conv.stride == (2, 2)
    image = torch.rand(2, 3, 32, 32)
    torch.testing.assert_close(stem(image), conv(torch.nn.functional.avg_pool2d(image, 2)), atol=1e-5, rtol=1e-4)
    a, b = torch.zeros(1, 3, 32, 32), torch.zeros(1, 3, 32, 32)
    a[..., 10, 10], b[..., 11, 11] = 1.0, 1.0  # the same 2 x 2 block, another pixel of it
    torch.nn.init.normal_(stem.conv.weight)  # a stem that has learnt (its sub-pixel kernels differ)
    assert not torch.allclose(stem(a), stem(b))


def test_a_space_to_depth_classifier_trains_exports_and_predicts_in_int8(tiles, tiny_cfg):
    """CLASSIFIER.SPACE_TO_DEPTH 2: the body's first layer is a SpaceToDepthStem through training
    (with the cell loss: its cells are then 32 px), export, float and int8 prediction; an image size
    that is not a multiple of the block is refused before anything is read."""
    _, train_dicts, val_dicts = tiles
    cfg = tiny_cfg("CLASSIFIER.SPACE_TO_DEPTH", "2", "CLASSIFIER.CELL_LOSS_WEIGHT", "1.0", "CLASSIFIER.PRECISION", "int8",
                   "CLASSIFIER.INT8_CALIBRATION_IMAGES", "12", *LR)
    export = mc.train_classifier(cfg, train_dicts, val_dicts)["export"]
    learner = mc.load_classifier(export)
    assert isinstance(learner.model[0][0], mc.SpaceToDepthStem) and learner.model[0][0].block == 2
    paths = [d["file_name"] for d in val_dicts]
    fp32 = mc.predict_p_ship(learner, paths, precision="fp32")["p_ship"]
    int8 = mc.predict_p_ship(learner, paths, precision="int8")["p_ship"]
    assert fp32.between(0, 1).all() and int8.between(0, 1).all()
    np.testing.assert_allclose(int8, fp32, atol=0.1)
    frame = mc.get_label_frame(train_dicts, val_dicts)
    assert mc.get_training_fingerprint(cfg, frame)["classifier"]["SPACE_TO_DEPTH"] == 2
    # at 1 (off) the key is left out, so exports made before it existed are reused, not trained again
    assert "SPACE_TO_DEPTH" not in mc.get_training_fingerprint(tiny_cfg(*LR), frame)["classifier"]
    with pytest.raises(ValueError, match="CLASSIFIER.IMAGE_SIZE 63 is not a multiple of CLASSIFIER.SPACE_TO_DEPTH 2"):
        mc.build_dataloaders(tiny_cfg("CLASSIFIER.SPACE_TO_DEPTH", "2", "CLASSIFIER.IMAGE_SIZE", "63"),
                             mc.get_label_frame(train_dicts, val_dicts))


def test_ship_mask_keeps_a_ship_of_a_few_pixels_at_the_classifiers_size():
    """ShipMask: the union of a tile's ships, each output pixel the maximum of the pixels it covers."""
    mask = np.zeros((256, 256), bool)
    mask[101, 50:53] = True  # a 1 x 3 px ship: a nearest resize to 64 px could drop it
    other = np.zeros((256, 256), bool)
    other[200:208, 8:40] = True
    row = {"file_name": "a.jpg", "segmentation": masks_to_coco(np.stack([mask, other]))}
    small = mc.ShipMask(64)(row)
    expected = np.zeros((64, 64), np.uint8)
    expected[25, 12:14] = 1  # rows 100-103 -> 25; columns 48-51 and 52-55 -> 12, 13
    expected[50:52, 2:10] = 1
    assert small.dtype == np.uint8 and np.array_equal(small, expected)
    assert not mc.ShipMask(64)({"file_name": "b.jpg", "segmentation": []}).any()
    with pytest.raises(ValueError, match="c.jpg: an annotation without a 'segmentation'"):
        mc.ShipMask(64)({"file_name": "c.jpg", "segmentation": [None]})


def test_the_cell_loss_trains_the_cell_head_and_the_export_is_the_plain_classifier(tiles, tiny_cfg):
    """CLASSIFIER.CELL_LOSS_WEIGHT: batches carry the ship masks, flipped and rotated with the
    images; the training loss adds the cell loss (its weight moves the loss), the cell head learns,
    and the export is fastai's plain (body, head), predicting as any other."""
    _, train_dicts, val_dicts = tiles
    frame = mc.get_label_frame(train_dicts, val_dicts)
    cfg = tiny_cfg("CLASSIFIER.CELL_LOSS_WEIGHT", "1.0", "CLASSIFIER.MAX_ROTATE", "0", *LR)
    dls = mc.build_dataloaders(cfg, frame)
    images, masks, labels = dls.valid.one_batch()  # validation: no augmentation
    assert masks.shape == (len(images), cfg.CLASSIFIER.IMAGE_SIZE, cfg.CLASSIFIER.IMAGE_SIZE)
    for image, mask, label in zip(images, masks, labels):  # the mask is where the bright hull is
        assert bool(mask.any()) == bool(label == mc.CLASSES.index(mc.SHIP))
        if mask.any():
            grey = image.mean(0)
            assert grey[mask.bool()].mean() > grey[~mask.bool()].mean() + 1.0  # normalized: hull 235, sea ~70

    learn = mc.build_learner(cfg, dls, mc.get_loss(cfg, frame), Path(cfg.PATHS.RUNS_DIR))
    assert isinstance(learn.model, mc.ShipCellsModel) and any(isinstance(cb, mc.ShipCellsLoss) for cb in learn.cbs)
    start = learn.model[2].weight.detach().clone()
    seen = {}

    class Spy(mc.Callback):
        order = 50  # after ShipCellsLoss (0)

        def after_loss(self):
            if self.training:
                plain = learn.loss_func(self.learn.pred, *self.learn.yb)
                seen.setdefault("added", []).append(float(self.learn.loss_grad - plain))
                seen["cells"] = tuple(learn.model.cells.shape)

    mc.set_seed(0)
    learn.fit_one_cycle(1, 1e-3, cbs=[Spy()])  # ShipCellsLoss: the learner's own
    side = cfg.CLASSIFIER.IMAGE_SIZE // 16
    assert seen["cells"] == (cfg.CLASSIFIER.BATCH_SIZE, 1, side, side)  # layer3: stride 16
    assert all(added > 0 for added in seen["added"])  # the cell loss was added to every training batch
    assert not torch.equal(learn.model[2].weight.cpu(), start.cpu())  # and the cell head learnt from it
    assert learn.model.cells is None  # nothing kept after the batch
    train_loss, valid_loss, *metrics = learn.recorder.values[-1]  # validation ran on labels alone
    assert np.isfinite(valid_loss) and len(metrics) == len(learn.recorder.metric_names) - 4

    export = mc.train_classifier(cfg, train_dicts, val_dicts)["export"]
    exported = mc.load_classifier(export)
    assert type(exported.model) is torch.nn.Sequential and len(exported.model) == 2  # the plain classifier
    assert not any(isinstance(cb, mc.ShipCellsLoss) for cb in exported.cbs)
    label, _, probs = exported.predict(val_dicts[0]["file_name"])  # the usual fastai call decodes
    assert label in mc.CLASSES and probs.shape == (2,)
    p_ship = mc.predict_p_ship(mc.load_classifier(export), [d["file_name"] for d in val_dicts])["p_ship"]
    assert len(p_ship) == len(val_dicts) and p_ship.between(0, 1).all()


def test_the_one_cycle_follows_the_clock_when_the_machine_is_slower_than_planned(tiles, tiny_cfg):
    """ClockSchedule: with the fit's time already spent (a probe far too optimistic), every batch
    runs at the one-cycle's final learning rate; with time to spare, the schedule is fastai's own."""
    import time

    _, train_dicts, val_dicts = tiles
    cfg = tiny_cfg(*LR)
    frame = mc.get_label_frame(train_dicts, val_dicts)

    def lrs(*cbs) -> list[float]:
        learn = mc.build_learner(cfg, mc.build_dataloaders(cfg, frame), mc.get_loss(cfg, frame), Path(cfg.PATHS.RUNS_DIR))
        learn.fit_one_cycle(2, 1e-3, cbs=list(cbs))
        return learn.recorder.lrs

    planned = lrs()
    assert len(planned) == 6 and max(planned) == pytest.approx(1e-3, rel=0.3)  # 3 batches an epoch, warm-up, peak
    # the batch count leads (an end ~30 years away: the clock's share stays under 1e-7, where an hour's
    # share after a loaded machine's slow first batch moved the first LR by more than approx allows)
    assert lrs(mc.ClockSchedule(end=time.time() + 1e9)) == pytest.approx(planned)
    late = lrs(mc.ClockSchedule(end=time.time()))  # the clock says the fit should be over
    assert late == pytest.approx([1e-3 / 1e5] * 6)  # fit_one_cycle's final LR (lr_max / div_final)


def test_a_narrow_resnet_has_no_imagenet_weights():
    with pytest.raises(ValueError, match="CLASSIFIER.WIDTH 0.5: ImageNet weights exist for the full width only"):
        mc.get_arch("resnet18", pretrained=True, width=0.5)
    model = mc.narrow_resnet("resnet34", 0.25)
    assert model.conv1.out_channels == 16 and model.fc.in_features == 128 and len(model.layer3) == 6
    assert model(torch.zeros(1, 3, 64, 64)).shape == (1, 1000)


def test_corrupt_image_in_a_worker_process_is_named(learner, tiles, tmp_path):
    good = Path(tiles[2][0]["file_name"])
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(good.read_bytes()[:100] if good.suffix == ".jpg" else b"\xff\xd8\xff\xe0 not a jpeg")
    with pytest.raises(ValueError, match="broken.jpg"):
        mc.predict_p_ship(learner, [good, bad], num_workers=1)
    result = mc.predict_p_ship(learner, [good, bad], num_workers=1, on_bad_image="skip")
    assert result["ImageId"].tolist() == [good.name] and result.attrs["skipped"] == [str(bad)]


def test_logits_that_overflow_fp16_run_again_in_fp32(monkeypatch):
    # CUDA's "auto" is fp16 autocast, whose range ends at 65,504; CPU fp16 autocast overflows alike.
    monkeypatch.setattr(mc, "autocast_context", lambda precision, device: torch.autocast("cpu", dtype=torch.float16))
    monkeypatch.setattr(mc, "resolve_precision", lambda precision, device: "fp16")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 4, 2)).eval()
    batch = torch.rand(3, 3, 4, 4)
    batch[1] *= 1e5  # logits far beyond fp16's range
    with torch.inference_mode():
        logits = mc._forward_views(model, batch, mc.TTA_FLIP_DIMS, "auto", torch.device("cpu"))
        exact = [model(batch.flip(dims) if dims else batch) for dims in mc.TTA_FLIP_DIMS]
        with torch.autocast("cpu", dtype=torch.float16):
            assert not model(batch).isfinite().all()  # the overflow the fallback is for
    for got, want in zip(logits, exact):
        assert got.dtype == torch.float32 and got.isfinite().all()
        torch.testing.assert_close(got[1], want[1])  # image 1 again in float32: exact
        torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=1e-2, rtol=1e-2)  # the others: fp16
    p_ship = torch.softmax(logits[0], dim=1)[:, 1]
    assert not p_ship.isnan().any()
