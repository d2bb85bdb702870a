"""The whole submission path with real, tiny, freshly trained models on generated data (CPU).

conftest's ``tiny_trained`` generates the 64 px Kaggle-format dataset of ``configs/tiny.yaml``,
trains its fastai classifier (1 epoch) and its Mask R-CNN (one 64 px stage of a few iterations)
through their modules' functions, once per session. These tests drive module_submit's command line
on that run: predict (gated, then ungated with every detection kept so that the real model's
overlapping masks go through the overlap resolver), validate, score, tune, predict with the tuned
thresholds, visualize, and predict over unreadable images.
"""
from __future__ import annotations

import logging
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml

import module_config
import module_files
import module_inference
import module_submit


def run_cli(*argv) -> int:
    return module_submit.main(module_submit.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture()
def predict(tiny_trained, tiny_config):
    """``predict(out, *overrides, flags=()) -> exit status`` of ``module_submit.py predict --config
    configs/tiny.yaml`` on the trained run; ``overrides`` go after the run's own."""
    def run(out, *overrides, flags=()) -> int:
        return run_cli("predict", "--config", tiny_config, "--out", out, "--no-progress", *flags,
                       *tiny_trained.opts, *overrides)

    return run


def test_gated_submission_from_real_models_validates_and_scores(tiny_trained, predict, tmp_path, capsys):
    input_dir, size = tiny_trained.input_dir, tiny_trained.cfg.DATA.IMAGE_SIZE
    sample = input_dir / "sample_submission_v2.csv"
    out = tmp_path / "submission.csv"
    assert predict(out, "SUBMIT.CLASSIFIER_THRESHOLD", "0.5") == 0
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    p_ship = pd.read_csv(tmp_path / "submission_p_ship.csv").set_index("ImageId")["p_ship"]
    assert set(rows["ImageId"]) == set(module_files.read_image_ids(sample)) == set(p_ship.index)
    assert p_ship.between(0, 1).all()
    gated_out = p_ship.index[p_ship < 0.5]
    assert rows.loc[rows["ImageId"].isin(gated_out), "EncodedPixels"].eq("").all()
    assert pd.read_csv(tmp_path / "submission_failures.csv").empty
    capsys.readouterr()
    assert run_cli("validate", "--submission", out, "--ids", sample, "--image-size", size) == 0, capsys.readouterr().out
    assert run_cli("score", "--submission", out, "--truth", input_dir / "test_ship_segmentations.csv",
                   "--image-size", size) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert last[0] == "F2" and 0.0 <= float(last[1]) <= 1.0


def test_every_real_detection_kept_is_made_overlap_free(tiny_cfg, tiny_paths, tiny_config, tiny_dataset, tmp_path,
                                                        capsys, monkeypatch):
    """Ungated, no score threshold, no minimum area: an untrained (random-init) Mask R-CNN of the
    tiny config gives 50 overlapping masks per image; they all reach resolve_overlaps, and the
    submission still validates."""
    import torch
    from detectron2.modeling import build_model

    import module_train
    from module_rle import rle_decode

    if torch.cuda.is_available():
        # cuDNN runs fp32 convolutions as TF32 by default: the CLI's batch of another shape then
        # moved 21 of this untrained model's 2,632 near-0.5 mask pixels (H200). The test is of the
        # overlap removal, not of TF32, so both passes run in full fp32 there.
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    cfg = tiny_cfg()
    torch.manual_seed(0)
    untrained = build_model(module_config.get_model_cfg(cfg))
    module_train.AtomicCheckpointer(untrained, str(tmp_path), extra_state={"input_size": 64}).save("untrained")
    weights = tmp_path / "untrained.pth"
    model = module_inference.load_detector(cfg, weights)
    image_path = sorted((tiny_dataset / "test_v2").glob("*.jpg"))[0]
    raw = module_inference.predict_instances(model, [module_files.read_image(image_path)])[0]
    assert raw["masks"].shape[1:] == (cfg.DATA.IMAGE_SIZE, cfg.DATA.IMAGE_SIZE)
    assert raw["masks"].sum(axis=0).max() > 1  # the raw output overlaps
    out = tmp_path / "all.csv"
    assert run_cli("predict", "--config", tiny_config, "--out", out, "--no-progress", "--weights", weights,
                   *tiny_paths, "SUBMIT.CLASSIFIER_THRESHOLD", "0", "SUBMIT.SCORE_THRESHOLD", "0",
                   "SUBMIT.MIN_AREA", "0") == 0
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    capsys.readouterr()
    assert run_cli("validate", "--submission", out, "--ids", tiny_dataset / "sample_submission_v2.csv",
                   "--image-size", cfg.DATA.IMAGE_SIZE) == 0, capsys.readouterr().out
    assert pd.read_csv(tmp_path / "all_p_ship.csv")["p_ship"].isna().all()  # ungated: nothing classified
    mine = rows.loc[(rows["ImageId"] == image_path.name) & (rows["EncodedPixels"] != ""), "EncodedPixels"]
    assert len(mine) > 1  # several of the overlapping masks kept what no higher-scoring mask took
    kept = np.stack([rle_decode(r, (cfg.DATA.IMAGE_SIZE, cfg.DATA.IMAGE_SIZE)) for r in mine])
    assert kept.sum(axis=0).max() == 1
    # Every pixel of a detection is kept once. The CLI predicts this image in a batch with others,
    # and a different batch shape can move a mask logit across 0.5 at a pixel (2,632 against 2,631
    # pixels on an AVX2-only EPYC), so the two unions may differ by a few pixels, no more.
    union, raw_union = kept.sum(axis=0) > 0, raw["masks"].any(axis=0)
    assert np.count_nonzero(union != raw_union) <= max(4, raw_union.sum() // 500)


def test_tune_on_validation_split_feeds_predict(tiny_trained, predict, tiny_config, tmp_path, capsys, caplog):
    # Tuning writes thresholds.yaml into the run, which every later prediction of it would take:
    # on a copy of the session's run, so that no other test depends on running before this one.
    runs = tmp_path / "runs"
    shutil.copytree(tiny_trained.cfg.PATHS.RUNS_DIR, runs)
    opts = [*tiny_trained.opts, "PATHS.RUNS_DIR", str(runs)]
    cfg, input_dir = module_config.get_cfg(tiny_config, opts), tiny_trained.input_dir
    assert not module_config.get_submission_path(cfg, "thresholds").exists()
    tune = ["tune", "--config", tiny_config, "--no-progress"]
    assert run_cli(*tune, *opts) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("F2 ")
    thresholds_file = module_config.get_submission_path(cfg, "thresholds")
    saved = yaml.safe_load(thresholds_file.read_text())
    grid = pd.read_csv(module_config.get_submission_path(cfg, "tune_grid"))
    sizes = [len(cfg.SUBMIT[f"TUNE_{k}"]) for k in ("CLASSIFIER_THRESHOLDS", "SCORE_THRESHOLDS", "MIN_AREAS")]
    assert len(grid) == sizes[0] * sizes[1] * sizes[2] == 8
    # the chosen setting's validation F2 is one of the grid's (the no-harm guard may prefer a safer one than the max)
    assert min(abs(grid["f2"] - saved["validation_f2"])) < 1e-9 or saved.get("guard")
    assert saved["n_validation_images"] == len(tiny_trained.val_dicts)
    # classifier threshold 0.0 is in tiny.yaml's grid: the detector alone is reported
    assert saved["detector_alone_f2"] == pytest.approx(grid.loc[grid["classifier_threshold"] == 0.0, "f2"].max())
    assert module_config.get_plot_path(cfg, "tune_f2").is_file() and module_config.get_plot_path(cfg, "val_overlays").is_file()
    # predict now takes the tuned thresholds, and says so.
    with caplog.at_level(logging.INFO, logger="module_submit"):
        assert predict(tmp_path / "tuned.csv", "PATHS.RUNS_DIR", str(runs)) == 0
    assert f"SUBMIT.SCORE_THRESHOLD = {saved['thresholds']['SCORE_THRESHOLD']} (from {thresholds_file})" in caplog.text
    # A second tune reuses the cached model outputs (the default); --fresh runs the models again.
    cache = module_config.get_submission_path(cfg, "tune_cache")
    stamp = cache.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="module_tuning"):
        assert run_cli(*tune, *opts) == 0
    assert "reused the model outputs" in caplog.text and cache.stat().st_mtime_ns == stamp
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="module_tuning"):
        assert run_cli(*tune, "--fresh", *opts) == 0
    assert "reused the model outputs" not in caplog.text and cache.stat().st_mtime_ns != stamp
    # Another test-time input size is another model output: not reused.
    stamp = cache.stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="module_tuning"):
        assert run_cli(*tune, *opts, "DETECTOR.TEST_SIZE", "96") == 0
    assert "made with other models or images: recomputing" in caplog.text and cache.stat().st_mtime_ns != stamp
    assert run_cli(*tune, *opts) == 0  # back at the trained size, for the checks below
    assert yaml.safe_load(thresholds_file.read_text())["thresholds"] == saved["thresholds"]  # same models, same choice
    # Overlays of the submission against the test truth.
    assert run_cli("visualize", "--submission", tmp_path / "tuned.csv", "--truth",
                   input_dir / "test_ship_segmentations.csv", "--images", input_dir / "test_v2",
                   "--out", tmp_path / "overlays.png", "--count", "4") == 0
    assert (tmp_path / "overlays.png").stat().st_size > 0


@pytest.mark.parametrize("gate", ["0.5", "0"], ids=["gated", "ungated"])
def test_predict_over_unreadable_images_exits_1_and_still_writes_the_failure_report(tiny_trained, predict, tmp_path,
                                                                                     gate):
    folder = tmp_path / "images"
    folder.mkdir()
    good = sorted((tiny_trained.input_dir / "test_v2").glob("*.jpg"))[0].read_bytes()
    (folder / "truncated.jpg").write_bytes(good[:len(good) // 2] + b"\xff\xd9")
    (folder / "text.jpg").write_bytes(b"ImageId,EncodedPixels\n")
    (folder / "empty.jpg").write_bytes(b"")
    out = tmp_path / "sub.csv"
    assert predict(out, "SUBMIT.CLASSIFIER_THRESHOLD", gate, flags=["--images", folder]) == 1  # 3 of 3 > 1%
    report = pd.read_csv(tmp_path / "sub_failures.csv")
    assert sorted(report["ImageId"]) == ["empty.jpg", "text.jpg", "truncated.jpg"]
    assert report["reason"].str.contains("cannot decode").all()
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)  # the submission is written too: blank rows
    assert sorted(rows["ImageId"]) == sorted(report["ImageId"]) and rows["EncodedPixels"].eq("").all()
    # a limit the failures stay within: exit 0 (a count, as --max-failed 3 says)
    assert predict(tmp_path / "ok.csv", "SUBMIT.CLASSIFIER_THRESHOLD", gate,
                   flags=["--images", folder, "--max-failed", "3"]) == 0
    assert len(pd.read_csv(tmp_path / "ok_failures.csv")) == 3
    with pytest.raises(module_files.TooManyFailures, match="3 of 3 images could not be read"):
        module_submit.predict_submission(tiny_trained.cfg, images=folder, out=tmp_path / "lib.csv", progress=False)
    assert len(pd.read_csv(tmp_path / "lib_failures.csv")) == 3


def test_tuning_records_the_scene_gates_own_p_ship(tiny_trained, make_tiny_cfg, tmp_path):
    """tiny.yaml's classifier predicts without TTA; scenes gated with DETECT.GATE_TTA True see the
    flip mean: tuning records that (one more classifier pass) and chooses the scene gate on it."""
    import pickle

    import module_classifier
    import module_tuning

    classifier, weights = tiny_trained.classifier["export"], module_inference.get_default_weights_path(tiny_trained.cfg)
    cfg = make_tiny_cfg(tmp_path / "runs", "DETECTOR.STAGES", "[[64, 3, 0.01, 0]]", "DETECT.GATE_TTA", "True")
    val = tiny_trained.val_dicts
    module_tuning.tune_thresholds(cfg, val, classifier=classifier, weights=weights, progress=False,
                                  train_dicts=tiny_trained.train_dicts)
    cache = pickle.loads(module_config.get_submission_path(cfg, "tune_cache").read_bytes())["images"]
    learner = module_classifier.load_classifier(classifier)
    paths = [d["file_name"] for d in val]
    for tta, values in ((False, [c.p_ship for c in cache]), (True, [c.scene_p_ship for c in cache])):
        expected = module_classifier.predict_p_ship(learner, paths, batch_size=8, tta=tta, num_workers=0,
                                                    progress=False)["p_ship"].to_numpy()
        np.testing.assert_allclose(values, expected, atol=1e-5)
    assert not any(np.isnan(c.gate_p_ship) for c in cache)  # recorded, not fallen back to p_ship
