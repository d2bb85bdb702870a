"""The pipeline config: defaults in one place, strict merging, saved with the run."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

import module_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["airbus.yaml", "demo.yaml"])
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


def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with module_config.atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
    with module_config.atomic_path(target) as tmp:
        assert tmp.suffix == ".csv" and tmp != target
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_input_paths_resolve_against_input_dir(tmp_path):
    cfg = module_config.get_cfg(None, ["PATHS.INPUT_DIR", str(tmp_path)])
    assert module_config.get_input_path(cfg, cfg.DATA.TRAIN_CSV) == tmp_path / "train_ship_segmentations_v2.csv"
    assert module_config.get_input_path(cfg, "/abs/x.csv") == Path("/abs/x.csv")


def test_integer_override_of_a_float_key_is_taken_as_float():
    cfg = module_config.get_cfg(None, ["SUBMIT.CLASSIFIER_THRESHOLD", "0", "SUBMIT.SCORE_THRESHOLD", "1"])
    assert cfg.SUBMIT.CLASSIFIER_THRESHOLD == 0.0 and isinstance(cfg.SUBMIT.CLASSIFIER_THRESHOLD, float)
    assert cfg.SUBMIT.SCORE_THRESHOLD == 1.0


def test_atomic_path_gives_the_file_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with module_config.atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644
