"""The detector's plain logic: stage parsing and stage configs (module_config), hard negatives and the
validation subset (module_train). Weights and TTA merging are inference's: test_inference.py."""
from __future__ import annotations

import pytest

import module_config
import module_train
from module_config import get_cfg


def _cfg(*opts):
    return get_cfg(None, ["MODEL.DEVICE", "cpu", *opts])


# ---------------------------------------------------------------- stages
def test_default_stages_are_256_512_768():
    stages = module_config.get_stages(_cfg())
    assert [s.size for s in stages] == [256, 512, 768]
    assert [s.name for s in stages] == ["stage1_256", "stage2_512", "stage3_768"]


@pytest.mark.parametrize(
    "stages, message",
    [
        ("[[250, 10, 0.01, 0]]", "multiple of 32"),
        ("[[256, 10, 0.01, 0], [0, 10, 0.01, 0]]", "entry 2"),
        ("[[8192, 10, 0.01, 0]]", "multiple of 32 between"),
        ("[[256.5, 10, 0.01, 0]]", "integer number of pixels"),
        ("[['big', 10, 0.01, 0]]", "integer number of pixels"),
        ("[[256, 0, 0.01, 0]]", "iterations"),
        ("[[256, 10, -0.01, 0]]", "base LR"),
        ("[[256, 10, 0.01]]", r"expected \[size, iterations, base LR, warmup"),
        ("[]", "empty"),
    ],
)
def test_bad_stage_lists_are_clear_errors(stages, message):
    with pytest.raises(ValueError, match=message):
        module_config.get_stages(_cfg("DETECTOR.STAGES", stages))


def test_stage_config_sets_size_schedule_and_folder(tmp_path):
    cfg = _cfg("PATHS.RUNS_DIR", str(tmp_path), "PATHS.RUN_NAME", "r",
               "DETECTOR.STAGES", "[[128, 100, 0.02, 10], [192, 40, 0.005, 4]]", "DETECTOR.LR_DECAY_AT", "[0.5, 0.75]")
    first, second = module_config.get_stages(cfg)
    model_cfg = module_config.get_model_cfg(cfg, second)
    assert model_cfg.INPUT.MIN_SIZE_TRAIN == (192,) and model_cfg.INPUT.MAX_SIZE_TRAIN == 192
    assert model_cfg.INPUT.MIN_SIZE_TEST == 192 and model_cfg.INPUT.MAX_SIZE_TEST == 192
    assert (model_cfg.SOLVER.MAX_ITER, model_cfg.SOLVER.BASE_LR, model_cfg.SOLVER.WARMUP_ITERS) == (40, 0.005, 4)
    assert model_cfg.SOLVER.STEPS == (20, 30)
    assert model_cfg.OUTPUT_DIR == str(tmp_path / "r" / "detector" / "stage2_192")
    assert module_config.get_model_cfg(cfg, first).SOLVER.STEPS == (50, 75)
    assert module_config.get_model_cfg(cfg).INPUT.MIN_SIZE_TEST == 192  # no stage: the last one
    with pytest.raises(ValueError, match="stage 3 does not exist"):
        module_config.get_stage(cfg, 3)


def test_random_init_switches_frozen_bn_off():
    random_init = module_config.get_model_cfg(_cfg("MODEL.WEIGHTS", ""))
    assert random_init.MODEL.RESNETS.NORM == "BN" and random_init.MODEL.BACKBONE.FREEZE_AT == 0
    gn = module_config.get_model_cfg(_cfg("MODEL.WEIGHTS", "", "DETECTOR.RANDOM_INIT_NORM", "GN"))
    assert gn.MODEL.RESNETS.NORM == "GN"
    pretrained = module_config.get_model_cfg(_cfg())
    assert pretrained.MODEL.RESNETS.NORM == "FrozenBN" and pretrained.MODEL.BACKBONE.FREEZE_AT == 2


# ---------------------------------------------------------------- hard negatives
def _dicts(n_ships, n_empty):
    ships = [{"image_id": f"s{i}", "annotations": [{"x": 1}]} for i in range(n_ships)]
    empty = [{"image_id": f"e{i}", "annotations": []} for i in range(n_empty)]
    return sorted(ships + empty, key=lambda d: d["image_id"])


@pytest.mark.parametrize("fraction, n_empty_expected", [(0.0, 0), (0.2, 5), (0.5, 20), (0.9, 30)])
def test_hard_negative_fraction(fraction, n_empty_expected):
    dicts = _dicts(20, 30)
    out = module_train.select_training_dicts(dicts, fraction, seed=0)
    assert sum(bool(d["annotations"]) for d in out) == 20  # every ship image
    assert sum(not d["annotations"] for d in out) == n_empty_expected  # capped by the 30 available
    assert out == [d for d in dicts if d in out]  # input order kept
    assert out == module_train.select_training_dicts(dicts, fraction, seed=0)  # deterministic


def test_empty_training_split_is_a_clear_error():
    with pytest.raises(ValueError, match="no image with ships"):
        module_train.select_training_dicts(_dicts(0, 5), 0.1, seed=0)
    with pytest.raises(ValueError, match="EMPTY_FRACTION"):
        module_train.select_training_dicts(_dicts(3, 5), 1.0, seed=0)


def test_eval_subset_is_spread_and_capped():
    dicts = _dicts(10, 10)
    assert module_train.select_eval_dicts(dicts, 0) == dicts
    subset = module_train.select_eval_dicts(dicts, 5)
    assert len(subset) == 5 and subset[0] is dicts[0] and subset[-1] is dicts[-1]
