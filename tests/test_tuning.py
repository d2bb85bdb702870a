"""module_tuning on caches built by hand (known masks, scores and p_ship; no model): tuning for the
target's share of ship-free images, the no-harm guard, size-aware score thresholds, and the error
report of module_metric that tune and score write.

Every case is small enough to check on paper; each test's docstring gives the arithmetic.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math

import numpy as np
import pandas as pd
import pytest
import yaml

import module_config
import module_inference
import module_metric
import module_submit
import module_tuning
from module_inference import Thresholds
from module_rle import rle_encode
from module_tuning import TuneImage


def rect(shape, top, left, height, width) -> np.ndarray:
    """(H, W) bool mask with a filled rectangle; rows top..top+height, columns left..left+width."""
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + height, left:left + width] = True
    return mask


def stack(masks, shape) -> np.ndarray:
    return np.stack(masks) if len(masks) else np.zeros((0, *shape), dtype=bool)


def image(name: str, shape, true=(), detections=(), p_ship: float = 1.0) -> TuneImage:
    """A cached image: ``true`` masks, ``detections`` as (mask, score) pairs."""
    return TuneImage.from_masks(name, name, p_ship, stack([m for m, _ in detections], shape),
                                np.array([s for _, s in detections], dtype=np.float32), stack(list(true), shape))


def get_cfg(tmp_path, *overrides):
    return module_config.get_cfg(None, ["PATHS.RUNS_DIR", str(tmp_path / "runs"), "PATHS.RUN_NAME", "t",
                                        *map(str, overrides)])


def blank_loader(shape):
    return lambda path: np.zeros((*shape, 3), dtype=np.uint8)


# Today's tuner: plain F2 maximisation at the validation split's own share, no guard, one score threshold.
TODAY = ("SUBMIT.GUARD_CONFIDENCE", 0, "SUBMIT.TUNE_SIZE_AWARE", False)


# --------------------------------------------------------------------------- the target's share
SHAPE = (32, 40)  # (H, W), not square
SHIP = rect(SHAPE, 10, 12, 8, 12)


def shifted_split(n_empty: int, n_ships: int) -> list[TuneImage]:
    """A detector with known behaviour, on ``n_empty`` ship-free and ``n_ships`` ship images:

    - ship image k: its ship found at score 0.95 when k % 10 < 3 (30%), else at score 0.5;
    - ship-free image k: a false ship at score 0.5 when k % 5 < 3 (60%), else nothing.
    """
    free = [image(f"e{k}.jpg", SHAPE, detections=[(SHIP, 0.5)] if k % 5 < 3 else []) for k in range(n_empty)]
    ships = [image(f"s{k}.jpg", SHAPE, true=[SHIP], detections=[(SHIP, 0.95 if k % 10 < 3 else 0.5)])
             for k in range(n_ships)]
    return free + ships


GRID = ("SUBMIT.TUNE_CLASSIFIER_THRESHOLDS", "[0.0]", "SUBMIT.TUNE_SCORE_THRESHOLDS", "[0.3, 0.6, 0.9]",
        "SUBMIT.TUNE_MIN_AREAS", "[0]")


def test_prevalence_aware_tuning_holds_on_a_ship_sparse_test_set_where_todays_tuner_falls_below_all_empty(tmp_path):
    """Validation 40 ship-free + 40 ship images (50%), test 39 + 11 (78%).

    Score 0.3 keeps every ship and the false ships of 60% of the ship-free images; 0.6 keeps only
    the 30% of ships found at 0.95 and no false ship. At 50%: 0.5 + 0.5 * 0.4 = 0.70 against
    0.5 * 0.3 + 0.5 = 0.65, so today's tuner takes 0.3. At 78%: 0.22 + 0.78 * 0.4 = 0.532 against
    0.22 * 0.3 + 0.78 = 0.846: the new tuner takes 0.6. On the test set (24 of 39 ship-free
    images with a false ship, 4 of 11 ships at 0.95): 0.3 scores (15 + 11) / 50 = 0.52 < 0.78,
    0.6 scores (39 + 4) / 50 = 0.86 >= 0.78.
    """
    validation, test = shifted_split(40, 40), shifted_split(39, 11)
    all_empty_test = 39 / 50
    today = module_tuning.tune(validation, get_cfg(tmp_path / "today", *GRID, *TODAY), progress=False,
                               load_image=blank_loader(SHAPE))
    assert today.thresholds == Thresholds(0.0, 0.3, 0) and today.f2 == pytest.approx(0.70)
    today_test = module_tuning.evaluate_thresholds(test, today.thresholds).mean()
    assert today_test == pytest.approx(26 / 50) and today_test < all_empty_test  # the regression case

    cfg = get_cfg(tmp_path / "new", *GRID, "SUBMIT.TARGET_EMPTY_FRACTION", 0.78)
    new = module_tuning.tune(validation, cfg, progress=False, load_image=blank_loader(SHAPE))
    assert new.thresholds == Thresholds(0.0, 0.6, 0) and new.guard["passed"] is True
    assert new.target_f2 == pytest.approx(0.22 * 0.3 + 0.78) and new.f2 == pytest.approx(0.65)
    new_test = module_tuning.evaluate_thresholds(test, new.thresholds).mean()
    assert new_test == pytest.approx(43 / 50) and new_test >= all_empty_test
    # The grid has both curves; thresholds.yaml says what was tuned for and what to expect.
    row = new.grid.set_index("score_threshold").loc[0.3]
    assert row["f2"] == pytest.approx(0.70) and row["f2_target"] == pytest.approx(0.532)
    saved = yaml.safe_load(module_config.get_submission_path(cfg, "thresholds").read_text())
    assert saved["thresholds"] == {"CLASSIFIER_THRESHOLD": 0.0, "SCORE_THRESHOLD": 0.6, "MIN_AREA": 0}
    assert saved["target_empty_fraction"] == 0.78 and saved["target_f2"] == pytest.approx(0.846)
    assert saved["target_all_empty_f2"] == 0.78 and saved["all_empty_f2"] == 0.5
    assert saved["guard"]["passed"] is True and saved["guard"]["gain_lower_bound"] > 0
    assert module_config.get_plot_path(cfg, "tune_f2").stat().st_size > 0


def test_the_default_target_is_the_training_splits_share(tmp_path):
    """-1 (the default) takes the training split's share; without one, the validation split's."""
    validation = shifted_split(40, 40)
    cfg = get_cfg(tmp_path, *GRID)
    assert cfg.SUBMIT.TARGET_EMPTY_FRACTION == -1
    result = module_tuning.tune(validation, cfg, progress=False, train_empty_fraction=0.78,
                                load_image=blank_loader(SHAPE))
    assert result.target_empty_fraction == 0.78 and result.thresholds.score == 0.6
    result = module_tuning.tune(validation, cfg, progress=False, load_image=blank_loader(SHAPE))
    assert result.target_empty_fraction == 0.5 and result.thresholds.score == 0.3
    assert result.grid["f2_target"].tolist() == result.grid["f2"].tolist()


@pytest.mark.parametrize("value, ok", [(-1, True), (0, True), (0.78, True), (1, True), (-0.5, False), (1.2, False)])
def test_target_share_is_range_checked(value, ok):
    if ok:
        assert module_config.get_cfg(None, ["SUBMIT.TARGET_EMPTY_FRACTION", str(value)]).SUBMIT.TARGET_EMPTY_FRACTION \
            == value
    else:
        with pytest.raises(ValueError, match="SUBMIT.TARGET_EMPTY_FRACTION .*or -1"):
            module_config.get_cfg(None, ["SUBMIT.TARGET_EMPTY_FRACTION", str(value)])


def test_demo_config_tunes_for_its_test_sets_share():
    cfg = module_config.get_cfg("configs/demo.yaml")
    assert cfg.SUBMIT.TARGET_EMPTY_FRACTION == pytest.approx(0.78)


def test_demo_config_guards_at_80_percent_below_the_default():
    # its 222 validation tiles make the bootstrap bound wide: at 90% the guard fell back on good models
    assert module_config.get_cfg("configs/demo.yaml").SUBMIT.GUARD_CONFIDENCE == pytest.approx(0.8)
    assert module_config.get_cfg(None).SUBMIT.GUARD_CONFIDENCE == pytest.approx(0.9)


# --------------------------------------------------------------------------- the bootstrap
def test_bootstrap_weights_each_kind_apart_with_a_pseudo_image_and_match_a_loop():
    has_ships = np.array([False, False, False, True, True])
    weights = module_tuning.get_bootstrap_weights(has_ships, 4000, seed=3)
    assert weights.empty.shape == (4000, 4) and weights.ships.shape == (4000, 3)  # 3 + 1 and 2 + 1 pseudo
    np.testing.assert_allclose(weights.empty.sum(axis=1), 1, rtol=1e-5)
    np.testing.assert_allclose(weights.ships.sum(axis=1), 1, rtol=1e-5)
    again = module_tuning.get_bootstrap_weights(has_ships, 4000, seed=3)
    np.testing.assert_array_equal(weights.empty, again.empty)  # seeded
    # Dirichlet(1, 1, 1, 0.5): the pseudo-image's mean weight is 0.5 / 3.5.
    assert weights.empty[:, -1].mean() == pytest.approx(0.5 / 3.5, abs=0.01)
    values = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [0.5, 0.0], [1.0, 0.25]])
    got = module_tuning.bootstrap_target_f2(values, weights, 0.8, pseudo=(-1.0, 0.0))
    for b in range(5):  # the same as weighting each resample by hand
        empty = weights.empty[b, :3] @ values[:3] - weights.empty[b, 3]
        ships = weights.ships[b, :2] @ values[3:]
        np.testing.assert_allclose(got[b], 0.8 * empty + 0.2 * ships, rtol=1e-5)


# --------------------------------------------------------------------------- the no-harm guard
NOISY_GRID = ("SUBMIT.TUNE_CLASSIFIER_THRESHOLDS", "[0.0]", "SUBMIT.TUNE_SCORE_THRESHOLDS", "[0.5, 0.95]",
              "SUBMIT.TUNE_MIN_AREAS", "[0]", "SUBMIT.TARGET_EMPTY_FRACTION", 0.5)


def noisy_small_split() -> list[TuneImage]:
    """3 ship images (2 found at score 0.9, 1 not found) and 3 ship-free (1 false ship at 0.9).

    Score 0.5: F2 0.5 * 2/3 + 0.5 * 2/3 = 0.667 against all-empty 0.5, a gain of 1/6; but in a
    resample the gain is <= 0 whenever the ships found are no more than the false ships drawn:
    P = 233/729 = 32%, far above the 10% a 90% lower bound allows. Score 0.95 predicts nothing.
    """
    found = [image(f"s{k}.jpg", SHAPE, true=[SHIP], detections=[(SHIP, 0.9)]) for k in range(2)]
    return (found + [image("s2.jpg", SHAPE, true=[SHIP])]
            + [image("e0.jpg", SHAPE, detections=[(SHIP, 0.9)])] + [image(f"e{k}.jpg", SHAPE) for k in (1, 2)])


def test_guard_falls_back_on_a_split_too_small_to_support_a_choice(tmp_path, caplog):
    cache = noisy_small_split()
    unguarded = module_tuning.tune(cache, get_cfg(tmp_path / "off", *NOISY_GRID, "SUBMIT.GUARD_CONFIDENCE", 0),
                                   progress=False, load_image=blank_loader(SHAPE))
    assert unguarded.thresholds.score == 0.5 and unguarded.f2 == pytest.approx(4 / 6)
    cfg = get_cfg(tmp_path / "on", *NOISY_GRID)
    with caplog.at_level(logging.WARNING, logger="module_tuning"):
        guarded = module_tuning.tune(cache, cfg, progress=False, load_image=blank_loader(SHAPE))
    # Fallback: of the settings no worse than all-empty (0.5 and 0.95), the one predicting on fewest images.
    assert guarded.thresholds == Thresholds(0.0, 0.95, 0) and guarded.f2 == pytest.approx(0.5)
    assert guarded.guard["passed"] is False and "fewest" not in guarded.guard["fallback"]
    assert "no-harm guard" in caplog.text and "falling back" in caplog.text and "lower bound" in caplog.text
    saved = yaml.safe_load(module_config.get_submission_path(cfg, "thresholds").read_text())
    assert saved["guard"]["passed"] is False and "most conservative" in saved["guard"]["fallback"]
    assert saved["guard"]["bootstrap"] == 1000 and saved["guard"]["confidence"] == 0.9


def test_choose_from_sweep_is_tunes_choice_on_any_subset_of_the_images():
    """The guarded choice on its own (what bench/bench_val_size.py draws validation splits for):
    on the noisy split it falls back as :func:`tune` does; on 10 copies of it (the same F2 per
    setting, 10x the images) the guard passes and score 0.5 is taken."""
    cache = noisy_small_split()
    sweep = module_tuning.sweep_thresholds(cache, [0.0], [0.5, 0.95], [0], progress=False)
    choice, weights, problem = module_tuning.choose_from_sweep(sweep, 0.5, 0.5, 0.9, 1000, 0)
    assert choice.thresholds == Thresholds(0.0, 0.95, 0) and choice.guard["passed"] is False and problem == ""
    assert {"f2_target", "n_predicting", "gain_lower"} <= set(sweep.grid.columns)
    assert list(sweep.grid["n_predicting"]) == [3, 0] and weights.ships.shape == (1000, 4)
    big = module_tuning.sweep_thresholds(cache * 10, [0.0], [0.5, 0.95], [0], progress=False)
    choice, _, _ = module_tuning.choose_from_sweep(big, 0.5, 0.5, 0.9, 1000, 0)
    assert choice.thresholds == Thresholds(0.0, 0.5, 0) and choice.guard["passed"] is True
    assert choice.target_f2 == pytest.approx(4 / 6)
    one_kind = module_tuning.sweep_thresholds(cache[:1] + cache[3:], [0.0], [0.5], [0], progress=False)
    _, _, problem = module_tuning.choose_from_sweep(one_kind, 0.5, 0.5, 0.9, 100, 0)
    assert "1 image(s) with ships" in problem
    _, weights, _ = module_tuning.choose_from_sweep(big, 0.5, 0.5, 0.0, 1000, 0)  # no guard: no bootstrap
    assert weights is None and big.grid["gain_lower"].isna().all()


def rare_false_ships(n_empty: int, n_ships: int) -> list[TuneImage]:
    """Ship image k: its ship found at 0.95 when k % 10 < 3, else nothing; ship-free image k: a
    false ship at 0.97 when k % 50 == 37 (one tile in 50: none among the first 20)."""
    free = [image(f"e{k}.jpg", SHAPE, detections=[(SHIP, 0.97)] if k % 50 == 37 else []) for k in range(n_empty)]
    ships = [image(f"s{k}.jpg", SHAPE, true=[SHIP], detections=[(SHIP, 0.95)] if k % 10 < 3 else [])
             for k in range(n_ships)]
    return free + ships


def test_guard_does_not_take_a_false_ship_never_seen_on_validation_as_impossible(tmp_path):
    """Validation: 20 clean ship-free images, 20 ship images of which 6 are found. Test: 95%
    ship-free, 190 + 10 images, with false ships on 4 of the 190 (none was on validation).

    Tuned for 95% without the guard, score 0.3 expects 0.95 + 0.05 * 0.3 = 0.965 and scores
    (186 + 3) / 200 = 0.945 on the test, below all-empty's 0.95: 4 false ships cost more than 3
    ships gain. The guard's pseudo-image (a false ship on an unseen ship-free tile, weight about
    1/40 here, times 0.95) outweighs the expected gain of 0.015: it falls back to the setting that
    predicts on no validation image, and the test scores all-empty's 0.95.
    """
    validation, test = rare_false_ships(20, 20), rare_false_ships(190, 10)
    grid = ("SUBMIT.TUNE_CLASSIFIER_THRESHOLDS", "[0.0]", "SUBMIT.TUNE_SCORE_THRESHOLDS", "[0.3, 0.6, 0.9, 0.99]",
            "SUBMIT.TUNE_MIN_AREAS", "[0]", "SUBMIT.TARGET_EMPTY_FRACTION", 0.95)
    unguarded = module_tuning.tune(validation, get_cfg(tmp_path / "off", *grid, "SUBMIT.GUARD_CONFIDENCE", 0),
                                   progress=False, load_image=blank_loader(SHAPE))
    assert unguarded.thresholds.score == 0.3 and unguarded.target_f2 == pytest.approx(0.965)
    assert module_tuning.evaluate_thresholds(test, unguarded.thresholds).mean() == pytest.approx(0.945)
    guarded = module_tuning.tune(validation, get_cfg(tmp_path / "on", *grid), progress=False,
                                 load_image=blank_loader(SHAPE))
    assert guarded.guard["passed"] is False and guarded.thresholds.score == 0.99
    assert module_tuning.evaluate_thresholds(test, guarded.thresholds).mean() == pytest.approx(0.95)
    # At 50% ship-free the same split supports the choice: the guard passes.
    passed = module_tuning.tune(validation, get_cfg(tmp_path / "half", *grid, "SUBMIT.TARGET_EMPTY_FRACTION", 0.5),
                                progress=False, load_image=blank_loader(SHAPE))
    assert passed.guard["passed"] is True and passed.thresholds.score == 0.3


def test_guard_fails_by_rule_with_one_image_of_a_kind(tmp_path, caplog):
    """One ship image, found perfectly, and three clean ship-free images: a bootstrap cannot
    resample one image's spread, so the guard does not pass whatever the gain."""
    cache = [image("s0.jpg", SHAPE, true=[SHIP], detections=[(SHIP, 0.9)])] + [image(f"e{k}.jpg", SHAPE)
                                                                               for k in range(3)]
    with caplog.at_level(logging.WARNING, logger="module_tuning"):
        result = module_tuning.tune(cache, get_cfg(tmp_path, *NOISY_GRID), progress=False,
                                    load_image=blank_loader(SHAPE))
    assert result.guard["passed"] is False and "too small to support a choice" in result.guard["reason"]
    assert "1 image(s) with ships" in caplog.text
    assert result.thresholds.score == 0.95 and not result.size_aware["on"]


def test_guard_predicts_no_ship_when_every_setting_is_worse_than_all_empty(tmp_path, caplog):
    """Every ship-free image has a false ship at 0.97 and no ship is ever found: every setting
    scores below all-empty, so nothing at all is predicted, and prediction honours it."""
    cache = ([image(f"e{k}.jpg", SHAPE, detections=[(SHIP, 0.97)], p_ship=0.9) for k in range(4)]
             + [image(f"s{k}.jpg", SHAPE, true=[SHIP], p_ship=0.9) for k in range(4)])
    cfg = get_cfg(tmp_path, *NOISY_GRID, "SUBMIT.TUNE_CLASSIFIER_THRESHOLDS", "[0.0, 0.5]")
    with caplog.at_level(logging.WARNING, logger="module_tuning"):
        result = module_tuning.tune(cache, cfg, progress=False, load_image=blank_loader(SHAPE))
    assert result.thresholds == Thresholds(1.0, math.inf, 0) and "no ship at all" in caplog.text
    assert result.f2 == 0.5 and result.target_f2 == 0.5
    thresholds, sources = module_inference.get_thresholds(cfg)
    assert thresholds == result.thresholds and sources["SCORE_THRESHOLD"].endswith("thresholds.yaml")
    masks, scores = stack([SHIP, rect(SHAPE, 0, 0, 3, 3)], SHAPE), np.array([1.0, 0.99], np.float32)
    assert module_submit.instances_to_rles(masks, scores, thresholds) == []


# --------------------------------------------------------------------------- size-aware thresholds
BIG = (96, 96)  # 1/64 of a 768 x 768 tile: edges [1600, 6400] are 25 and 100 px here
SIZE_GRID = ("SUBMIT.TUNE_CLASSIFIER_THRESHOLDS", "[0.0]", "SUBMIT.TUNE_SCORE_THRESHOLDS", "[0.5, 0.7, 0.9]",
             "SUBMIT.TUNE_MIN_AREAS", "[0, 20]", "SUBMIT.SIZE_BUCKET_EDGES", "[1600, 6400]",
             "SUBMIT.TARGET_EMPTY_FRACTION", 0.5)


def small_false_ships(n_small_ships: int = 10) -> list[TuneImage]:
    """10 ship images with a large ship (144 px) found at 0.6; ``n_small_ships`` with a small ship
    (16 px) found at 0.95; 20 ship-free images each with a small false ship (16 px) at 0.8.

    One score threshold cannot keep the large ships and drop the small false ones (0.6 < 0.8);
    a minimum area cannot tell the small ships from the false ones (both 16 px). With 10 small
    ships the best single setting scores 0.75 at 50% ship-free (score <= 0.6 with min area 20, or
    score 0.9), and small 0.9 / large 0.5 with min area 0 scores 1.0.
    """
    large, small = rect(BIG, 20, 30, 12, 12), rect(BIG, 60, 10, 4, 4)
    false_ship = rect(BIG, 70, 70, 4, 4)
    return ([image(f"l{k}.jpg", BIG, true=[large], detections=[(large, 0.6)]) for k in range(10)]
            + [image(f"m{k}.jpg", BIG, true=[small], detections=[(small, 0.95)]) for k in range(n_small_ships)]
            + [image(f"e{k}.jpg", BIG, detections=[(false_ship, 0.8)]) for k in range(20)])


def test_size_aware_thresholds_are_chosen_where_small_false_ships_dominate(tmp_path):
    cache = small_false_ships()
    cfg = get_cfg(tmp_path, *SIZE_GRID)
    result = module_tuning.tune(cache, cfg, progress=False, load_image=blank_loader(BIG))
    assert result.grid["f2"].max() == pytest.approx(0.75)
    assert result.size_aware["on"] and result.f2 == pytest.approx(1.0)
    assert result.thresholds == Thresholds(0.0, 0.5, 0, (0.9, 0.5, 0.5), (1600.0, 6400.0))
    assert result.size_aware["improvement"] == pytest.approx(0.25) and result.size_aware["improvement_lower_bound"] > 0
    # Written, read back by prediction, and applied to full-size masks exactly as tuning did.
    saved = yaml.safe_load(module_config.get_submission_path(cfg, "thresholds").read_text())
    assert saved["thresholds"]["SCORE_THRESHOLDS_BY_SIZE"] == [0.9, 0.5, 0.5]
    assert saved["thresholds"]["SIZE_BUCKET_EDGES"] == [1600.0, 6400.0]
    thresholds, sources = module_inference.get_thresholds(cfg)
    assert thresholds == result.thresholds and sources["SCORE_THRESHOLDS_BY_SIZE"].endswith("thresholds.yaml")
    for cached in (cache[0], cache[10], cache[20]):  # large ship, small ship, small false ship
        pred, _, _ = cached.decode(crop=False)
        kept, _ = module_inference.apply_thresholds({"masks": pred, "scores": cached.scores}, thresholds)
        np.testing.assert_array_equal(kept, module_tuning.kept_masks(cached, pred, thresholds))
        assert len(kept) == (0 if cached.image_id.startswith("e") else 1)
    assert module_tuning.evaluate_thresholds(cache, thresholds).mean() == pytest.approx(1.0)
    # A single score threshold on the command line turns the tuned per-size ones off.
    command_line = ["SUBMIT.SCORE_THRESHOLD", "0.7"]
    cfg = get_cfg(tmp_path, *SIZE_GRID, *command_line)
    thresholds, sources = module_inference.get_thresholds(cfg, overridden=command_line)
    assert thresholds == Thresholds(0.0, 0.7, 0) and "SCORE_THRESHOLDS_BY_SIZE" not in sources


def test_size_aware_thresholds_stay_off_when_the_gain_is_within_the_guards_margin(tmp_path):
    """One small ship instead of ten: size-aware thresholds gain that one image of 31 (never
    losing one), too little against the guard's prior of an unseen tile where the change costs a
    false ship: off."""
    result = module_tuning.tune(small_false_ships(1), get_cfg(tmp_path, *SIZE_GRID), progress=False,
                                load_image=blank_loader(BIG))
    assert not result.size_aware["on"] and result.size_aware["best_improvement"] > 0
    assert not result.thresholds.score_by_size


def test_thresholds_by_size_must_fit_the_buckets():
    with pytest.raises(ValueError, match="need 2 size-bucket edges"):
        Thresholds(0.5, 0.5, 0, (0.9, 0.5, 0.5), (100.0,))
    with pytest.raises(ValueError, match="SCORE_THRESHOLDS_BY_SIZE .* one per size bucket"):
        module_config.get_cfg(None, ["SUBMIT.SCORE_THRESHOLDS_BY_SIZE", "[0.5, 0.6]"])
    # 768 x 768: 99 px is small (0.9), 100 px medium (0.6), 1000 px large (0.5); at 384 x 384 a quarter of that.
    thresholds = Thresholds(0.5, 0.5, 0, (0.9, 0.6, 0.5), (100.0, 1000.0))
    np.testing.assert_allclose(thresholds.get_score_thresholds([99, 100, 999, 1000], (768, 768)), [0.9, 0.6, 0.6, 0.5])
    np.testing.assert_allclose(thresholds.get_score_thresholds([24, 25, 249, 250], (384, 384)), [0.9, 0.6, 0.6, 0.5])


def test_thresholds_by_size_from_the_config_alone(tmp_path):
    """Without thresholds.yaml the config's per-size thresholds apply, with the config's edges."""
    cfg = get_cfg(tmp_path, "SUBMIT.SCORE_THRESHOLDS_BY_SIZE", "[0.9, 0.6, 0.5]")
    thresholds, sources = module_inference.get_thresholds(cfg)
    assert thresholds == Thresholds(0.5, 0.5, 20, (0.9, 0.6, 0.5), (100.0, 1000.0))
    assert sources["SCORE_THRESHOLDS_BY_SIZE"] == sources["SIZE_BUCKET_EDGES"] == "config"
    plain, sources = module_inference.get_thresholds(get_cfg(tmp_path))
    assert plain == Thresholds(0.5, 0.5, 20) and set(sources) == {"CLASSIFIER_THRESHOLD", "SCORE_THRESHOLD", "MIN_AREA"}


# --------------------------------------------------------------------------- the error report
CASE = (48, 40)  # (H, W), not square


def hand_built_case():
    """One image with every kind of outcome, as (true masks, predicted masks):

    - A (40 px) and P1 the same: matched;
    - B and C (24 px each, a gap between) under P2 (52 px): IoU 0.46 each: both merged, P2 merged;
    - D (80 px) cut into P3 and P4 (40 px each): IoU 0.5, not > 0.5: D split, P3 and P4 split;
    - E (40 px) and P5 half over it: IoU 20/60: low_iou, both;
    - F: nothing touches it: missed;
    - P6 touches no ship: a false ship beside ships.
    """
    true = [rect(CASE, 0, 0, 4, 10), rect(CASE, 10, 0, 4, 6), rect(CASE, 10, 7, 4, 6), rect(CASE, 20, 0, 4, 20),
            rect(CASE, 30, 0, 4, 10), rect(CASE, 40, 0, 4, 10)]
    pred = [rect(CASE, 0, 0, 4, 10), rect(CASE, 10, 0, 4, 13), rect(CASE, 20, 0, 4, 10), rect(CASE, 20, 10, 4, 10),
            rect(CASE, 30, 5, 4, 10), rect(CASE, 40, 30, 4, 6)]
    return stack(true, CASE), stack(pred, CASE)


EXPECTED_FAILURES = {  # kind: (ships, predictions, images)
    "matched": (1, 1, 1), "gate_removed": (2, 0, 1), "missed": (1, 0, 1), "low_iou": (1, 1, 1),
    "merged": (2, 1, 1), "split": (1, 2, 1), "false_ship_free": (0, 2, 1), "false_beside_ships": (0, 1, 1)}


def outcome(image_id, true, pred, gated_out=False):
    iou = module_metric.iou_masks(true, pred) if len(true) and len(pred) else np.zeros((len(true), len(pred)))
    return module_metric.get_image_outcome(image_id, iou, true.sum(axis=(1, 2)), pred.sum(axis=(1, 2)),
                                           true.shape[1:] if len(true) else pred.shape[1:], gated_out=gated_out)


def test_each_failure_kind_is_counted_right_on_a_hand_built_case():
    true, pred = hand_built_case()
    main = outcome("main.png", true, pred)
    assert list(main.true_kind) == ["matched", "merged", "merged", "split", "low_iou", "missed"]
    assert list(main.pred_kind) == ["matched", "merged", "split", "split", "low_iou", "false_beside_ships"]
    free = outcome("free.png", stack([], CASE), stack([rect(CASE, 0, 0, 3, 3), rect(CASE, 9, 9, 2, 2)], CASE))
    gated = outcome("gated.png", stack([rect(CASE, 0, 0, 3, 3), rect(CASE, 9, 9, 2, 2)], CASE), stack([], CASE),
                    gated_out=True)
    report = module_metric.get_error_report([main, free, gated], edges=[100, 1000])
    got = {row.kind: (row.ships, row.predictions, row.images) for row in report.failures.itertuples()}
    assert got == EXPECTED_FAILURES
    assert report.failures["ships"].sum() == 8 and report.failures["predictions"].sum() == 8
    # TP/FP/FN: one match at IoU 1.0 in the whole case, at every threshold.
    assert report.per_threshold[["tp", "fp", "fn"]].drop_duplicates().values.tolist() == [[1, 7, 7]]
    # Main image F2 at every threshold: 5 / (5 + 4 * 5 + 5); the others score 0.
    assert report.f2 == pytest.approx((5 / 30) / 3)
    # Ceilings: the perfect detector behind the gate loses the gated image only; all-empty: the ship-free one.
    ceilings = report.ceilings.set_index("case")["f2"]
    assert ceilings["all empty"] == pytest.approx(1 / 3) and ceilings["perfect detector"] == pytest.approx(2 / 3)
    assert ceilings["oracle gate"] == pytest.approx((5 / 30 + 1 + 0) / 3)  # ship-free left empty, gated stays 0


def test_a_prediction_covering_two_ships_and_matching_one_of_them():
    """G (60 px) and H (18 px) under one 84 px prediction: IoU 60/84 with G, a match; H is lost to the merge."""
    shape = (8, 16)
    true = stack([rect(shape, 0, 0, 6, 10), rect(shape, 0, 11, 6, 3)], shape)
    result = outcome("x.png", true, stack([rect(shape, 0, 0, 6, 14)], shape))
    assert list(result.true_kind) == ["matched", "merged"] and list(result.pred_kind) == ["matched"]


def test_f2_by_size_pools_ships_and_predictions_by_their_own_size():
    """At 768 x 768 with edges (100, 1000): a small ship (50 px) found exactly, a large ship
    (1200 px) missed, and a small false prediction (60 px) elsewhere. Small: TP 1, FP 1 -> 5/6;
    medium: nothing (NaN); large: FN 1 -> 0."""
    shape = (768, 768)
    small, large, false_ship = rect(shape, 0, 0, 5, 10), rect(shape, 100, 100, 30, 40), rect(shape, 300, 300, 6, 10)
    report = module_metric.get_error_report([outcome("a", stack([small, large], shape), stack([small, false_ship], shape))],
                                            edges=[100, 1000])
    by_size = report.by_size.set_index("size")
    assert list(by_size.index) == ["small <100 px", "medium 100-1000 px", "large >=1000 px"]
    assert by_size["f2"].iloc[0] == pytest.approx(5 / 6) and math.isnan(by_size["f2"].iloc[1])
    assert by_size["f2"].iloc[2] == 0.0 and by_size["n_ships"].tolist() == [1, 0, 1]
    assert by_size["n_predictions"].tolist() == [2, 0, 0] and by_size["recall_50"].iloc[0] == 1.0


def test_tune_writes_the_error_report_of_its_choice_with_the_gate(tmp_path):
    """The hand-built case as a cache: the gated image has p_ship 0.1 (and a detection the gate
    hides); everything passes a score of 0.5. Same counts as from the masks, and the oracle gate
    gets the detector's output on the gated image."""
    true, pred = hand_built_case()
    hidden = rect(CASE, 0, 0, 3, 3)
    cache = [TuneImage.from_masks("main.png", "main.png", 0.9, pred, np.full(len(pred), 0.9, np.float32), true),
             image("free.png", CASE, detections=[(rect(CASE, 0, 0, 3, 3), 0.9), (rect(CASE, 9, 9, 2, 2), 0.9)],
                   p_ship=0.9),
             image("gated.png", CASE, true=[hidden, rect(CASE, 9, 9, 2, 2)], detections=[(hidden, 0.9)], p_ship=0.1)]
    cfg = get_cfg(tmp_path, "SUBMIT.TUNE_CLASSIFIER_THRESHOLDS", "[0.5]", "SUBMIT.TUNE_SCORE_THRESHOLDS", "[0.5]",
                  "SUBMIT.TUNE_MIN_AREAS", "[0]", "SUBMIT.GUARD_CONFIDENCE", 0, "SUBMIT.TUNE_SIZE_AWARE", False)
    result = module_tuning.tune(cache, cfg, progress=False, load_image=blank_loader(CASE))
    got = {row.kind: (row.ships, row.predictions, row.images) for row in result.errors.failures.itertuples()}
    assert got == EXPECTED_FAILURES
    ceilings = result.errors.ceilings.set_index("case")["f2"]
    # Oracle gate: the gated image goes to the detector, which finds one of its two ships: 5 / (5 + 4).
    assert ceilings["oracle gate"] == pytest.approx((5 / 30 + 1 + 5 / 9) / 3)
    table = pd.read_csv(result.paths["errors"])
    assert table.query("section == 'failures' and item == 'merged' and measure == 'ships'")["value"].item() == 2
    assert result.paths["errors_plot"].stat().st_size > 0


def test_score_reports_the_same_failures_without_the_gate(tmp_path, capsys):
    """The hand-built case as CSVs: score cannot tell the gate, so the gated image's ships are missed."""
    true, pred = hand_built_case()
    gated_true = [rect(CASE, 0, 0, 3, 3), rect(CASE, 9, 9, 2, 2)]
    truth = ([("main.png", rle_encode(m)) for m in true] + [("free.png", "")]
             + [("gated.png", rle_encode(m)) for m in gated_true])
    submission = ([("main.png", rle_encode(m)) for m in pred] + [("gated.png", "")]
                  + [("free.png", rle_encode(rect(CASE, 0, 0, 3, 3))), ("free.png", rle_encode(rect(CASE, 9, 9, 2, 2)))])
    for name, rows in (("truth.csv", truth), ("sub.csv", submission)):
        pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"]).to_csv(tmp_path / name, index=False)
    result = module_submit.score_report(tmp_path / "sub.csv", tmp_path / "truth.csv", CASE, size_edges=[100, 1000])
    got = {row.kind: (row.ships, row.predictions) for row in result.errors.failures.itertuples()}
    expected = {k: v[:2] for k, v in EXPECTED_FAILURES.items()}
    expected["missed"], expected["gate_removed"] = (3, 0), (np.nan, 0)
    assert {k: v for k, v in got.items() if k != "gate_removed"} == {k: v for k, v in expected.items()
                                                                       if k != "gate_removed"}
    assert math.isnan(got["gate_removed"][0])
    assert result.errors.f2 == pytest.approx(result.f2)
    assert math.isnan(result.errors.ceilings.set_index("case").loc["perfect detector", "f2"])
    # The command line (square images: the same runs, column-major over 48 rows, decode alike at 48 x 48):
    # the report in the text and the JSON, and with --config in that config's run folder.
    argv = ["score", "--submission", tmp_path / "sub.csv", "--truth", tmp_path / "truth.csv", "--image-size", "48"]
    assert module_submit.main(module_submit.get_args_parser().parse_args([str(a) for a in argv])) == 0
    out = capsys.readouterr().out
    assert "one prediction covering two ships" in out and out.strip().splitlines()[-1].startswith("F2 ")
    assert module_submit.main(module_submit.get_args_parser().parse_args([str(a) for a in argv] + ["--json"])) == 0
    body = json.loads(capsys.readouterr().out)
    assert {r["kind"]: r["ships"] for r in body["errors"]["failures"]}["merged"] == 2
    argv += ["--config", "configs/tiny.yaml", "PATHS.RUNS_DIR", str(tmp_path / "runs")]
    assert module_submit.main(module_submit.get_args_parser().parse_args([str(a) for a in argv])) == 0
    assert (tmp_path / "runs/tiny/submission/score_errors.csv").is_file()
    assert (tmp_path / "runs/tiny/plots/score_errors.png").stat().st_size > 0


# --------------------------------------------------------------------------- the scene gate
def test_tune_writes_the_scene_gate_from_the_ships_the_detector_finds(tmp_path):
    """Six ship images at p_ship 0.99, 0.95, 0.9, 0.8, 0.4, 0.1; the detector finds the ship on all
    but the 0.8 one (its detection misses: IoU 0) and finds nothing on four ship-free images at
    p_ship 0.05, 0.2, 0.5, 0.97. The gate is tuned at 0.9 (the grid [0.9]). Found ships' p_ship:
    0.99, 0.95, 0.9, 0.4, 0.1; at GATE_SHIP_RECALL 0.75 keep 3.75, rounded 4, of them: 0.4, which
    passes the ship-free images at 0.5 and 0.97 (50%); the submission's 0.9 keeps 3, passes 25%."""
    elsewhere = rect(SHAPE, 0, 0, 4, 4)
    p_ships = [0.99, 0.95, 0.9, 0.8, 0.4, 0.1]
    cache = [image(f"s{k}.jpg", SHAPE, true=[SHIP], detections=[(elsewhere if p == 0.8 else SHIP, 0.9)], p_ship=p)
             for k, p in enumerate(p_ships)]
    cache += [image(f"e{k}.jpg", SHAPE, p_ship=p) for k, p in enumerate([0.05, 0.2, 0.5, 0.97])]
    cfg = get_cfg(tmp_path, "SUBMIT.TUNE_CLASSIFIER_THRESHOLDS", "[0.9]", "SUBMIT.TUNE_SCORE_THRESHOLDS", "[0.5]",
                  "SUBMIT.TUNE_MIN_AREAS", "[0]", "SUBMIT.GUARD_CONFIDENCE", 0, "SUBMIT.TUNE_SIZE_AWARE", False,
                  "DETECT.GATE_SHIP_RECALL", 0.75)
    result = module_tuning.tune(cache, cfg, progress=False, load_image=blank_loader(SHAPE))
    assert result.thresholds.classifier == 0.9
    np.testing.assert_allclose(module_tuning.get_found_ship_p_ship(cache, result.thresholds), [0.99, 0.95, 0.9, 0.4, 0.1])
    saved = yaml.safe_load(module_config.get_submission_path(cfg, "thresholds").read_text())
    gate = saved[module_inference.SCENE_GATE_KEY]
    assert gate == result.scene_gate | {"ship_free_passed": 0.5, "submission_gate_ship_free_passed": 0.25}
    assert gate["found_ship_p_ship"] == [0.99, 0.95, 0.9, 0.4, 0.1]
    assert (gate["classifier_threshold"], gate["ships_found"], gate["ships_kept"]) == (0.4, 5, 4)
    assert gate["submission_gate_ships_kept"] == 3
    # what module_detect gates at, read back from thresholds.yaml
    assert module_inference.get_scene_thresholds(cfg)[0] == dataclasses.replace(result.thresholds, classifier=0.4)


def test_the_scene_gate_is_chosen_on_the_p_ship_the_scene_gate_computes(tmp_path):
    """Scenes are gated in one pass (DETECT.GATE_TTA False) where the submission's p_ship averages
    flips: where tuning recorded the one-pass value (gate_p_ship), the found ships and the ship-free
    share are counted on it; where not (NaN, or a cache pickled before the field), on p_ship."""
    cache = [image(f"s{k}.jpg", SHAPE, true=[SHIP], detections=[(SHIP, 0.9)], p_ship=p)
             for k, p in enumerate([0.99, 0.95, 0.9])]
    cache += [image(f"e{k}.jpg", SHAPE, p_ship=p) for k, p in enumerate([0.05, 0.5])]
    thresholds = Thresholds(0.9, 0.5, 0)
    np.testing.assert_allclose(module_tuning.get_found_ship_p_ship(cache, thresholds), [0.99, 0.95, 0.9])
    cache[1] = dataclasses.replace(cache[1], gate_p_ship=0.3)  # one pass scores this ship's tile lower
    cache[4] = dataclasses.replace(cache[4], gate_p_ship=0.1)  # and this ship-free one (p_ship 0.5)
    np.testing.assert_allclose(module_tuning.get_found_ship_p_ship(cache, thresholds), [0.99, 0.9, 0.3])
    gate = module_tuning.get_scene_gate(cache, thresholds, 1.0)
    assert (gate["classifier_threshold"], gate["ships_kept"], gate["ship_free_passed"]) == (0.3, 3, 0.0)
    del cache[1].__dict__["gate_p_ship"]  # as unpickled from a cache written before the field
    assert cache[1].scene_p_ship == 0.95


def test_the_tune_cache_records_the_scene_gates_p_ship_where_it_differs():
    dicts = [{"image_id": f"{k}.jpg", "file_name": f"{k}.jpg", "height": SHAPE[0], "width": SHAPE[1],
              "annotations": []} for k in range(3)]
    def detect_fn(images):
        return [{"masks": np.zeros((0, *SHAPE), bool), "scores": np.zeros(0, np.float32)} for _ in images]
    cache = module_tuning.collect_tune_cache(dicts, detect_fn, lambda paths: [0.9, 0.5, 0.1], progress=False,
                                             load_image=blank_loader(SHAPE),
                                             gate_p_ship_fn=lambda paths: [0.8, 0.6, 0.0])
    assert [c.p_ship for c in cache] == [0.9, 0.5, 0.1]
    assert [c.scene_p_ship for c in cache] == [0.8, 0.6, 0.0]
    plain = module_tuning.collect_tune_cache(dicts, detect_fn, lambda paths: [0.9, 0.5, 0.1], progress=False,
                                             load_image=blank_loader(SHAPE))
    assert all(np.isnan(c.gate_p_ship) for c in plain) and [c.scene_p_ship for c in plain] == [0.9, 0.5, 0.1]
