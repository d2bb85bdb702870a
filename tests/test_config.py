"""The pipeline config: defaults in one place, strict merging, saved with the run."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

import module_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["airbus.yaml", "demo.yaml", "tiny.yaml"])
def test_shipped_configs_load(name):
    cfg = module_config.get_cfg(ROOT / "configs" / name)
    assert cfg.MODEL.ROI_HEADS.NUM_CLASSES == 1
    assert cfg.MODEL.MASK_ON
    assert cfg.MODEL.DEVICE in ("cpu", "cuda")
    assert len(cfg.DETECTOR.STAGES) >= 1
    assert cfg.is_frozen()


def test_real_config_uses_coco_weights_and_demo_random_init():
    real = module_config.get_cfg(ROOT / "configs" / "airbus.yaml")
    demo = module_config.get_cfg(ROOT / "configs" / "demo.yaml")
    assert real.MODEL.WEIGHTS.endswith("model_final_f10217.pkl")
    assert not real.SYNTH.ENABLED
    assert demo.MODEL.WEIGHTS == ""
    assert demo.SYNTH.ENABLED and not demo.CLASSIFIER.PRETRAINED


def test_the_demo_trains_to_time_budgets_and_the_real_config_keeps_its_models():
    real = module_config.get_cfg(ROOT / "configs" / "airbus.yaml")
    demo = module_config.get_cfg(ROOT / "configs" / "demo.yaml")
    tiny = module_config.get_cfg(ROOT / "configs" / "tiny.yaml")
    assert real.CLASSIFIER.ARCH == "resnet34" and real.MODEL.RESNETS.DEPTH == 50 and "FPN" in real.MODEL.BACKBONE.NAME.upper()
    assert real.CLASSIFIER.TIME_BUDGET_MIN == real.DETECTOR.TIME_BUDGET_MIN == 0  # epochs and iterations as set
    assert demo.CLASSIFIER.ARCH == "resnet18" and demo.CLASSIFIER.TIME_BUDGET_MIN > 0 and demo.DETECTOR.TIME_BUDGET_MIN > 0
    assert demo.CLASSIFIER.TIME_BUDGET_MIN + demo.DETECTOR.TIME_BUDGET_MIN <= 16  # + data, tuning, prediction: <= 20 min
    assert tiny.CLASSIFIER.TIME_BUDGET_MIN == tiny.DETECTOR.TIME_BUDGET_MIN == 0  # the tests' runs stay tiny
    # the demo's cheaper steps: a half-width classifier, detector crops; the real config has neither
    assert demo.CLASSIFIER.WIDTH == 0.5 and 0 < demo.DETECTOR.CROP_SIZE < demo.DETECTOR.STAGES[0][0]
    assert real.CLASSIFIER.WIDTH == tiny.CLASSIFIER.WIDTH == 1.0 and real.DETECTOR.CROP_SIZE == tiny.DETECTOR.CROP_SIZE == 0
    # the demo's detector starts from its classifier's ResNet (the same ResNet-18 at half width); the
    # real config starts from COCO weights
    assert demo.DETECTOR.BACKBONE_FROM_CLASSIFIER and not real.DETECTOR.BACKBONE_FROM_CLASSIFIER
    assert not tiny.DETECTOR.BACKBONE_FROM_CLASSIFIER  # tiny: a ResNet-34 classifier, a ResNet-18 detector
    # the demo merges its detector's fragments of one ship; the real config does not (it could join moored ships)
    assert demo.SUBMIT.MERGE_IOS > 0 and real.SUBMIT.MERGE_IOS == 0
    # the demo samples fewer regions per crop than the real config per tile (roi_align backward is slow on a CPU)
    assert demo.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE == 64 < real.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE
    # the demo's detector: ResNet-18 at half width, through the project's backbone builder
    from detectron2.modeling import build_model

    model = build_model(module_config.get_model_cfg(demo))
    assert demo.MODEL.BACKBONE.NAME == "build_basic_resnet_fpn_backbone"
    assert model.backbone.bottom_up.res2[0].conv1.weight.shape[0] == 32
    assert model.backbone.bottom_up.res5[-1].conv2.weight.shape[0] == 256


def test_real_config_has_three_stages_256_512_768():
    cfg = module_config.get_cfg(ROOT / "configs" / "airbus.yaml")
    assert [stage[0] for stage in cfg.DETECTOR.STAGES] == [256, 512, 768]
    assert cfg.DETECTOR.ROTATION_DEG == 20.0  # degrees, not radians


def test_overrides_win_and_are_typed():
    cfg = module_config.get_cfg(ROOT / "configs" / "demo.yaml", ["CLASSIFIER.EPOCHS", "7", "PATHS.RUN_NAME", "x"])
    assert cfg.CLASSIFIER.EPOCHS == 7 and cfg.PATHS.RUN_NAME == "x"


def test_misspelt_override_is_an_error():
    with pytest.raises(KeyError, match="CLASIFIER.EPOCHS"):
        module_config.get_cfg(ROOT / "configs" / "demo.yaml", ["CLASIFIER.EPOCHS", "2"])


def test_odd_overrides_are_an_error():
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        module_config.get_cfg(None, ["CLASSIFIER.EPOCHS"])


def test_misspelt_key_in_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {ROOT / 'configs' / 'demo.yaml'}\nCLASSIFIER:\n  EPOCS: 3\n")
    with pytest.raises(KeyError, match=r"bad.yaml: Non-existent config key: CLASSIFIER.EPOCS"):
        module_config.get_cfg(bad)


def test_missing_config_file_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        module_config.get_cfg(tmp_path / "nope.yaml")


def test_resolved_config_is_saved_and_reloads_identically(tmp_path):
    cfg = module_config.get_cfg(ROOT / "configs" / "demo.yaml", ["PATHS.RUNS_DIR", str(tmp_path)])
    run_dir = module_config.get_run_dir(cfg)
    assert run_dir == tmp_path / "demo" and run_dir.is_dir()
    saved = module_config.save_cfg(cfg, run_dir)
    assert yaml.safe_load(saved.read_text())["CLASSIFIER"] == dict(cfg.CLASSIFIER)
    again = module_config.get_cfg(saved)
    assert yaml.safe_load(again.dump()) == yaml.safe_load(cfg.dump())


def test_every_project_default_has_a_comment():
    """Each key set in add_airbus_config sits under a comment or carries one on its line."""
    lines = (ROOT / "module_config.py").read_text().splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith("def add_airbus_config"))
    end = next(i for i, l in enumerate(lines) if l.startswith("def get_cfg"))
    undocumented = []
    for i in range(start, end):
        line = lines[i].strip()
        if line.startswith("cfg.") and "=" in line and "CN()" not in line and "#" not in line:
            prev = i - 1
            while lines[prev].strip().startswith("cfg.") and "#" not in lines[prev] and "CN()" not in lines[prev]:
                prev -= 1  # a run of keys under one comment
            if not lines[prev].strip().startswith("#"):
                undocumented.append(line)
    assert not undocumented, undocumented


def test_input_paths_resolve_against_input_dir(tmp_path):
    cfg = module_config.get_cfg(None, ["PATHS.INPUT_DIR", str(tmp_path)])
    assert module_config.get_input_path(cfg, cfg.DATA.TRAIN_CSV) == tmp_path / "train_ship_segmentations_v2.csv"
    assert module_config.get_input_path(cfg, "/abs/x.csv") == Path("/abs/x.csv")


def test_integer_override_of_a_float_key_is_taken_as_float():
    cfg = module_config.get_cfg(None, ["SUBMIT.CLASSIFIER_THRESHOLD", "0", "SUBMIT.SCORE_THRESHOLD", "1"])
    assert cfg.SUBMIT.CLASSIFIER_THRESHOLD == 0.0 and isinstance(cfg.SUBMIT.CLASSIFIER_THRESHOLD, float)
    assert cfg.SUBMIT.SCORE_THRESHOLD == 1.0


def test_whole_numbers_for_float_keys_in_a_config_file_are_floats(tmp_path):
    (tmp_path / "base.yaml").write_text("_BASE_: " + str(ROOT / "configs" / "demo.yaml") + "\n")
    (tmp_path / "mine.yaml").write_text("_BASE_: base.yaml\nCLASSIFIER:\n  TIME_BUDGET_MIN: 4\n"
                                        "SUBMIT:\n  SCORE_THRESHOLD: 1\n")
    cfg = module_config.get_cfg(tmp_path / "mine.yaml")
    assert cfg.CLASSIFIER.TIME_BUDGET_MIN == 4.0 and isinstance(cfg.CLASSIFIER.TIME_BUDGET_MIN, float)
    assert cfg.SUBMIT.SCORE_THRESHOLD == 1.0 and cfg.PATHS.RUN_NAME == "demo"  # the bases are followed
    (tmp_path / "bad.yaml").write_text("CLASSIFIER:\n  EPOCHS: 2.5\n")  # no float -> int: still an error
    with pytest.raises(ValueError, match="EPOCHS"):
        module_config.get_cfg(tmp_path / "bad.yaml")


def test_tiny_config_is_the_demo_at_tiny_sizes():
    tiny = module_config.get_cfg(ROOT / "configs" / "tiny.yaml")
    assert tiny.SYNTH.ENABLED and tiny.SYNTH.IMAGE_SIZE == tiny.DATA.IMAGE_SIZE == tiny.CLASSIFIER.IMAGE_SIZE == 64
    assert tiny.MODEL.WEIGHTS == "" and not tiny.CLASSIFIER.PRETRAINED and tiny.PATHS.RUN_NAME == "tiny"
    assert all(size % 32 == 0 for size, *_ in tiny.DETECTOR.STAGES)


# ---------------------------------------------------------------- overrides
@pytest.mark.parametrize("opts, expected", [
    (["CLASSIFIER.EPOCHS=2"], ["CLASSIFIER.EPOCHS", "2"]),
    (["CLASSIFIER.EPOCHS", "2", "PATHS.RUN_NAME=a=b"], ["CLASSIFIER.EPOCHS", "2", "PATHS.RUN_NAME", "a=b"]),
    (["PATHS.RUN_NAME", "x=1"], ["PATHS.RUN_NAME", "x=1"]),  # a value with "=" in it stays a value
    ([], []),
])
def test_parse_overrides(opts, expected):
    assert module_config.parse_overrides(opts) == expected


def test_key_equals_value_overrides_are_accepted_by_get_cfg():
    cfg = module_config.get_cfg(ROOT / "configs" / "demo.yaml",
                                ["CLASSIFIER.EPOCHS=3", "PATHS.RUN_NAME", "x=y", "DETECTOR.STAGES=[[64, 2, 0.01, 0]]"])
    assert cfg.CLASSIFIER.EPOCHS == 3 and cfg.PATHS.RUN_NAME == "x=y"
    assert [list(s) for s in cfg.DETECTOR.STAGES] == [[64, 2, 0.01, 0]]
    with pytest.raises(KeyError, match="CLASIFIER.EPOCHS"):
        module_config.get_cfg(None, ["CLASIFIER.EPOCHS=2"])
    with pytest.raises(ValueError, match="KEY VALUE pairs"):
        module_config.parse_overrides(["CLASSIFIER.EPOCHS=2", "CLASSIFIER.LR"])


# ---------------------------------------------------------------- valid values
@pytest.mark.parametrize("key, value, expected", [
    ("SUBMIT.SCORE_THRESHOLD", "1.5", "SUBMIT.SCORE_THRESHOLD is 1.5; expected a number in [0, 1]"),
    ("SUBMIT.CLASSIFIER_THRESHOLD", "-0.1", "SUBMIT.CLASSIFIER_THRESHOLD is -0.1; expected a number in [0, 1]"),
    ("DATA.VAL_FRACTION", "1.0", "DATA.VAL_FRACTION is 1.0; expected a number in (0, 1)"),
    ("SUBMIT.MIN_AREA", "-3", "SUBMIT.MIN_AREA is -3; expected an integer >= 0"),
    ("CLASSIFIER.EPOCHS", "0", "CLASSIFIER.EPOCHS is 0; expected an integer >= 1"),
    ("CLASSIFIER.BALANCE", "oversample", "CLASSIFIER.BALANCE is 'oversample'; expected one of 'weights', 'sampler', "
                                         "'none'"),
    ("DETECTOR.BEST_METRIC", "segm_AP", "DETECTOR.BEST_METRIC is 'segm_AP'; expected one of 'f2_ships', 'f2'"),
    ("SUBMIT.TUNE_MIN_AREAS", "[]", "SUBMIT.TUNE_MIN_AREAS is []; expected a non-empty list, each an integer >= 0"),
    ("SUBMIT.MAX_FAILED", "-1", "SUBMIT.MAX_FAILED is -1.0; expected a number >= 0"),
    ("CLASSIFIER.TIME_BUDGET_MIN", "-5", "CLASSIFIER.TIME_BUDGET_MIN is -5.0; expected a number >= 0"),
    ("SUBMIT.MERGE_IOS", "2", "SUBMIT.MERGE_IOS is 2.0; expected a number in [0, 1]"),
])
def test_values_out_of_range_name_the_key_the_value_and_the_range(key, value, expected):
    with pytest.raises(ValueError) as info:
        module_config.get_cfg(ROOT / "configs" / "demo.yaml", [key, value])
    assert expected in str(info.value)


def test_values_in_range_and_the_new_keys_defaults():
    cfg = module_config.get_cfg(None, ["SUBMIT.SCORE_THRESHOLD", "1", "DATA.VAL_FRACTION", "0.5", "SUBMIT.MAX_FAILED", "3"])
    assert cfg.SUBMIT.SCORE_THRESHOLD == 1.0 and cfg.SUBMIT.MAX_FAILED == 3
    defaults = module_config.get_cfg(None)
    assert defaults.SUBMIT.MAX_FAILED == 0.01
    assert defaults.CLASSIFIER.TIME_BUDGET_MIN == 0.0 and defaults.DETECTOR.TIME_BUDGET_MIN == 0.0
    assert set(module_config.VALID) >= {"SUBMIT.SCORE_THRESHOLD", "SUBMIT.MAX_FAILED", "CLASSIFIER.TIME_BUDGET_MIN",
                                        "DETECTOR.TIME_BUDGET_MIN"}


def test_value_out_of_range_in_a_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"_BASE_: {ROOT / 'configs' / 'demo.yaml'}\nSUBMIT:\n  SCORE_THRESHOLD: 1.5\n")
    with pytest.raises(ValueError, match=r"bad.yaml: SUBMIT.SCORE_THRESHOLD is 1.5; expected a number in \[0, 1\]"):
        module_config.get_cfg(bad)


def test_a_malformed_stage_list_is_a_config_error():
    with pytest.raises(ValueError, match="DETECTOR.STAGES entry 1 .*multiple of 32"):
        module_config.get_cfg(None, ["DETECTOR.STAGES", "[[100, 2, 0.01, 0]]"])


# ---------------------------------------------------------------- the command lines
def _parsers():
    import module_classifier
    import module_preprocessing
    import module_submit
    import module_synthetic
    import module_train
    import run_notebook

    return {
        "module_preprocessing dicts": (module_preprocessing.get_args_parser(), ["dicts"]),
        "module_preprocessing split": (module_preprocessing.get_args_parser(), ["split", "--out", "s.csv"]),
        "module_classifier train": (module_classifier.get_args_parser(), ["train"]),
        "module_classifier predict": (module_classifier.get_args_parser(), ["predict", "--images", "i", "--out", "o"]),
        "module_train": (module_train.get_args_parser(), []),
        "module_submit predict": (module_submit.get_args_parser(), ["predict"]),
        "module_submit tune": (module_submit.get_args_parser(), ["tune"]),
        "module_synthetic": (module_synthetic.get_args_parser(), []),
        "run_notebook": (run_notebook.get_args_parser(), []),
    }


def test_every_command_line_defaults_to_the_airbus_config_and_takes_overrides():
    for name, (parser, argv) in _parsers().items():
        args = parser.parse_args(argv)
        assert args.config == module_config.DEFAULT_CONFIG == "configs/airbus.yaml", name
        assert args.opts == [], name
        args = parser.parse_args([*argv, "--config", "configs/tiny.yaml", "SUBMIT.MIN_AREA=5", "CLASSIFIER.EPOCHS", "2"])
        assert args.opts == ["SUBMIT.MIN_AREA=5", "CLASSIFIER.EPOCHS", "2"], name
        cfg = module_config.get_cfg_from_args(args)
        assert (cfg.SUBMIT.MIN_AREA, cfg.CLASSIFIER.EPOCHS, cfg.PATHS.RUN_NAME) == (5, 2, "tiny"), name


# ---------------------------------------------------------------- the run folder's layout
def test_run_folder_paths_have_one_name_each(tmp_path):
    cfg = module_config.get_cfg(ROOT / "configs" / "tiny.yaml", ["PATHS.RUNS_DIR", str(tmp_path)])
    run = tmp_path / "tiny"
    stage = module_config.get_stages(cfg)[0]
    assert module_config.get_classifier_path(cfg) == run / "classifier" / "export.pkl"
    assert module_config.get_classifier_path(cfg, "history") == run / "classifier" / "history.csv"
    assert module_config.get_detector_path(cfg) == run / "detector" / "model_best.pth"
    assert module_config.get_detector_path(cfg, "val_metrics") == run / "detector" / "val_metrics.jsonl"
    assert module_config.get_stage_dir(cfg, stage) == run / "detector" / "stage1_64"
    assert module_config.get_stage_path(cfg, stage, "last_checkpoint") == run / "detector" / "stage1_64" / "last_checkpoint"
    assert module_config.get_submission_path(cfg) == run / "submission" / "submission.csv"
    assert module_config.get_submission_path(cfg, "thresholds") == run / "submission" / "thresholds.yaml"
    assert module_config.get_plot_path(cfg, "tune_f2") == run / "plots" / "tune_f2.png"
    assert module_config.get_split_path(cfg) == run / "split.csv" and module_config.get_scores_path(cfg) == run / "scores.json"
    with pytest.raises(KeyError, match=r"detector file 'bestest': expected one of \['best', 'best_info'"):
        module_config.get_detector_path(cfg, "bestest")
