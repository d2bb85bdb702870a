"""The whole submission path with real, tiny, freshly trained models on generated data (CPU).

One module-scoped run generates a 64 px Kaggle-format dataset, trains the fastai classifier
(1 epoch) and the Mask R-CNN (one 64 px stage of a few iterations) through their modules'
functions, then drives module_submit's command line: predict (gated, then ungated with every
detection kept so that the real model's overlapping masks go through the overlap resolver),
validate, score, tune, predict with the tuned thresholds, visualize.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

import module_classifier
import module_config
import module_preprocessing
import module_submit
import module_train

REPO_ROOT = Path(__file__).resolve().parents[1]
SIZE = 64
TINY = [
    "SYNTH.N_TRAIN", "40", "SYNTH.N_TEST", "12", "SYNTH.IMAGE_SIZE", str(SIZE), "DATA.IMAGE_SIZE", str(SIZE),
    "DATA.VAL_FRACTION", "0.2",
    "CLASSIFIER.IMAGE_SIZE", "64", "CLASSIFIER.EPOCHS", "1", "CLASSIFIER.BATCH_SIZE", "8", "CLASSIFIER.TTA", "False",
    "CLASSIFIER.NUM_WORKERS", "0", "CLASSIFIER.PRETRAINED", "False", "CLASSIFIER.ARCH", "resnet18",
    "DETECTOR.STAGES", f"[[{SIZE}, 3, 0.005, 0]]", "DETECTOR.EVAL_PERIOD", "1000", "DETECTOR.EVAL_MAX_IMAGES", "4",
    "DETECTOR.VIS_IMAGES", "1", "SOLVER.IMS_PER_BATCH", "2", "DATALOADER.NUM_WORKERS", "0",
    "SUBMIT.BATCH_SIZE", "4",
    "SUBMIT.TUNE_CLASSIFIER_THRESHOLDS", "[0.0, 0.5]", "SUBMIT.TUNE_SCORE_THRESHOLDS", "[0.0, 0.5]",
    "SUBMIT.TUNE_MIN_AREAS", "[0, 10]",
]


def run_cli(*argv) -> int:
    return module_submit.main(module_submit.get_args_parser().parse_args([str(a) for a in argv]))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """(opts, cfg, input folder) of a run whose classifier and detector were just trained."""
    root = tmp_path_factory.mktemp("submit_models")
    opts = ["PATHS.RUNS_DIR", str(root / "runs"), "PATHS.INPUT_DIR", str(root / "input"), *TINY]
    cfg = module_config.get_cfg(REPO_ROOT / "configs" / "demo.yaml", opts)
    module_preprocessing.prepare_input(cfg)
    train_dicts, val_dicts = module_preprocessing.get_train_val_dicts(cfg)
    module_classifier.train_classifier(cfg, train_dicts, val_dicts)
    module_train.train_detector(cfg)
    return opts, cfg, Path(cfg.PATHS.INPUT_DIR)


def predict(opts, out: Path, *extra: str) -> int:
    return run_cli("predict", "--config", REPO_ROOT / "configs" / "demo.yaml", "--out", out, "--no-progress",
                   *opts, *extra)


def test_gated_submission_from_real_models_validates_and_scores(trained_run, tmp_path, capsys):
    opts, cfg, input_dir = trained_run
    sample = input_dir / "sample_submission_v2.csv"
    out = tmp_path / "submission.csv"
    assert predict(opts, out, "SUBMIT.CLASSIFIER_THRESHOLD", "0.5") == 0
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    p_ship = pd.read_csv(tmp_path / "submission_p_ship.csv").set_index("ImageId")["p_ship"]
    assert set(rows["ImageId"]) == set(module_submit.read_image_ids(sample)) == set(p_ship.index)
    assert p_ship.between(0, 1).all()
    gated_out = p_ship.index[p_ship < 0.5]
    assert rows.loc[rows["ImageId"].isin(gated_out), "EncodedPixels"].eq("").all()
    assert pd.read_csv(tmp_path / "submission_failures.csv").empty
    capsys.readouterr()
    assert run_cli("validate", "--submission", out, "--ids", sample, "--image-size", SIZE) == 0, capsys.readouterr().out
    assert run_cli("score", "--submission", out, "--truth", input_dir / "test_ship_segmentations.csv",
                   "--image-size", SIZE) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert last[0] == "F2" and 0.0 <= float(last[1]) <= 1.0


def test_every_real_detection_kept_is_made_overlap_free(trained_run, tmp_path, capsys):
    """Ungated, no score threshold, no minimum area: the untrained detector's many overlapping
    masks all reach resolve_overlaps, and the submission still validates."""
    opts, cfg, input_dir = trained_run
    model = module_train.load_detector(cfg, module_submit.get_default_weights_path(cfg))
    image = module_submit.read_image(next((input_dir / "test_v2").iterdir()))
    raw = module_train.predict_instances(model, [image], input_size=model.input_size)[0]
    assert raw["masks"].shape[1:] == (SIZE, SIZE)
    out = tmp_path / "all.csv"
    assert predict(opts, out, "SUBMIT.CLASSIFIER_THRESHOLD", "0", "SUBMIT.SCORE_THRESHOLD", "0",
                   "SUBMIT.MIN_AREA", "0") == 0
    rows = pd.read_csv(out, dtype=str, keep_default_na=False)
    n_masks = int((rows["EncodedPixels"] != "").sum())
    capsys.readouterr()
    assert run_cli("validate", "--submission", out, "--ids", input_dir / "sample_submission_v2.csv",
                   "--image-size", SIZE) == 0, capsys.readouterr().out
    if len(raw["masks"]) > 1:  # the raw output overlaps; what was written does not (validate passed)
        assert n_masks > 0


def test_tune_on_validation_split_feeds_predict(trained_run, tmp_path, capsys, caplog):
    opts, cfg, input_dir = trained_run
    assert run_cli("tune", "--config", REPO_ROOT / "configs" / "demo.yaml", "--no-progress", *opts) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("F2 ")
    run_dir = module_config.get_run_dir(cfg)
    saved = yaml.safe_load((run_dir / "submission" / "thresholds.yaml").read_text())
    grid = pd.read_csv(run_dir / "submission" / "tune_grid.csv")
    assert len(grid) == 8 and saved["validation_f2"] == pytest.approx(grid["f2"].max())
    # classifier threshold 0.0 is in this grid: the detector alone is reported
    assert saved["detector_alone_f2"] == pytest.approx(grid.loc[grid["classifier_threshold"] == 0.0, "f2"].max())
    assert (run_dir / "plots" / "tune_f2.png").is_file() and (run_dir / "plots" / "val_overlays.png").is_file()
    # predict now takes the tuned thresholds, and says so.
    with caplog.at_level(logging.INFO, logger="module_submit"):
        assert predict(opts, tmp_path / "tuned.csv") == 0
    assert "thresholds.yaml" in caplog.text and "SUBMIT.SCORE_THRESHOLD" in caplog.text
    # A second tune re-uses the cached model outputs.
    with caplog.at_level(logging.INFO, logger="module_submit"):
        assert run_cli("tune", "--config", REPO_ROOT / "configs" / "demo.yaml", "--no-progress", "--reuse-cache",
                       *opts) == 0
    assert "reusing the model outputs" in caplog.text
    # Overlays of the submission against the test truth.
    assert run_cli("visualize", "--submission", tmp_path / "tuned.csv", "--truth",
                   input_dir / "test_ship_segmentations.csv", "--images", input_dir / "test_v2",
                   "--out", tmp_path / "overlays.png", "--count", "4") == 0
    assert (tmp_path / "overlays.png").stat().st_size > 0
