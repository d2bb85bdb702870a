"""Wall-clock budgets (the planning arithmetic, a real tiny run), live progress, the GPU check's CPU form."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
import torch

import module_classifier
import module_config
import module_preprocessing
import module_progress
import module_train
from module_config import Stage

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the arithmetic, at given speeds
def test_stages_keep_their_proportions_and_fit_the_budget():
    stages = [Stage(1, 256, 1000, 0.02, 100), Stage(2, 512, 500, 0.01, 50)]
    # 0.1 s and 0.4 s per iteration; validation 100 images at 0.01 / 0.04 s each, every 250 iterations
    plan = module_train.plan_stages(stages, [0.1, 0.4], [0.01, 0.04], 100, 250, budget_s=300, margin=0.0)
    # validations: stage 1 5x1 s, stage 2 3x4 s = 17 s; training at full length: 100 + 200 = 300 s
    assert plan.scale == pytest.approx((300 - 17) / 300)
    assert [s[1] for s in plan.stages] == [round(1000 * plan.scale), round(500 * plan.scale)]
    assert plan.stages[0][1] / plan.stages[1][1] == pytest.approx(2.0, rel=0.01)  # proportions kept
    assert [s[3] for s in plan.stages] == [round(100 * plan.scale), round(50 * plan.scale)]  # warmup scales
    assert plan.eval_period == round(250 * plan.scale)
    assert sum(plan.expected_s) == pytest.approx(300, rel=0.01)


def test_a_larger_budget_trains_longer_and_the_margin_is_kept():
    stages = [Stage(1, 64, 100, 0.01, 10)]
    plan = module_train.plan_stages(stages, [0.5], [0.0], 0, 0, budget_s=200)
    assert plan.scale == pytest.approx(200 * 0.95 / 50) and plan.stages[0][1] == 380
    assert plan.eval_period == 0 and sum(plan.expected_s) <= 200


def test_a_budget_too_small_keeps_a_minimum_and_says_so():
    plan = module_train.plan_stages([Stage(1, 64, 100, 0.01, 5)], [1.0], [0.0], 0, 0, budget_s=3, min_iterations=10)
    assert plan.stages[0][1] == 10 and plan.stages[0][3] <= 9 and "too small" in plan.notes[0]


@pytest.mark.parametrize("budget, epoch, fixed, expected", [(100, 10, 5, 9), (100, 30, 0, 3), (10, 30, 0, 1)])
def test_classifier_epochs_for_a_budget(budget, epoch, fixed, expected):
    assert module_classifier.epochs_for_budget(budget, epoch, fixed)[0] == expected


def test_stage_deadlines_keep_the_stages_together_to_the_budget():
    grace = 1 + module_train.TOTAL_GRACE
    clock = module_train.BudgetClock({1: 100.0, 2: 100.0, 3: 100.0})
    # stage 1 alone: its share plus 20% and 5 s, capped by the budget so far (its share plus 3%)
    assert clock.start(1, now=0.0) == pytest.approx(100 * grace)
    clock.finished(1, 103.0, resumed=False)
    # it overran to 103 s: stage 2 gets the rest of the first 200 s (plus 3%), not 125 s of its own
    assert clock.start(2, now=103.0) == pytest.approx(200 * grace)
    clock.finished(2, 47.0, resumed=False)
    # stage 2 ended early, at 150 s: stage 3 may use 20% more than its share, and no more
    assert clock.start(3, now=150.0) == pytest.approx(150 + 1.2 * 100 + 5)
    # however the stages went, the last one ends by the budget's end plus 3%
    late = module_train.BudgetClock({1: 100.0, 2: 100.0})
    late.start(1, 0.0)
    late.finished(1, 250.0, resumed=False)
    assert late.start(2, now=250.0) == pytest.approx(200 * grace)  # already past: stops at its first iteration
    assert module_train.BudgetClock({}).start(1, 0.0) is None  # no budget, no deadline


def test_stage_deadlines_hold_across_calls_through_the_spent_ledger():
    """The notebook trains one stage a cell: each call's clock starts from plan.json's spent_s."""
    grace = 1 + module_train.TOTAL_GRACE
    # stage 1 overran by 60 s in an earlier call: stage 2, in a call of its own, gets 60 s less
    assert module_train.BudgetClock({1: 100.0, 2: 100.0}, {"1": 160.0}).start(2, now=1000.0) == pytest.approx(
        1000 + 200 * grace - 160)
    # a stage stopped after 30 s and resumed later has its grace less those 30 s
    assert module_train.BudgetClock({1: 100.0}, {"1": 30.0}).start(1, now=50.0) == pytest.approx(50 + 100 * grace - 30)
    # an earlier stage with no record (trained without a budget) counts as its share
    assert module_train.BudgetClock({1: 100.0, 2: 50.0}).start(2, now=1.0) == pytest.approx(1 + 150 * grace - 100)
    clock = module_train.BudgetClock({1: 100.0}, {"1": 30.0})
    clock.finished(1, 20.0, resumed=True)
    assert clock.spent == {1: 50.0}
    clock.finished(1, 20.0, resumed=False)  # trained again from its start: its record starts over
    assert clock.spent == {1: 20.0}


def test_training_stops_early_enough_for_the_closing_validation():
    """StopGuard keeps the closing validation's seconds, scaled by the stage's slowdown so far."""
    guard = module_train.StopGuard(None, Stage(1, 64, 100, 0.01, 1), deadline=1000.0, validation_s=20.0,
                                   planned_s_per_iter=0.5)
    guard.trainer = types.SimpleNamespace(iter=9, start_iter=0, max_iter=100)
    assert guard.reserve_s(now=0.0) == 20.0  # before training: the planned seconds
    guard._started = (100.0, 0)
    assert guard.reserve_s(now=105.0) == 20.0  # 10 iterations in 5 s: at the planned speed
    assert guard.reserve_s(now=110.0) == pytest.approx(40.0)  # twice as slow: twice the reserve
    guard._started, guard.trainer.iter = (time.time(), 0), 20  # 21 iterations in no time: the planned reserve
    guard.deadline = time.time() + 1000.0
    guard.after_step()  # far from the deadline: goes on
    guard.deadline = time.time() + 10.0  # 10 s left, but the closing validation needs 20 s
    with pytest.raises(module_train._StageTimeUp):
        guard.after_step()


def test_a_stage_cut_by_its_deadline_still_reaches_its_lr_decays():
    """The schedule runs by iterations or by the stage's clock, whichever is further on: a stage
    running at half its planned speed decays its LR on time, not never."""
    from detectron2.solver.lr_scheduler import LRMultiplier
    from fvcore.common.param_scheduler import MultiStepParamScheduler

    guard = module_train.StopGuard(None, Stage(1, 64, 100, 0.1, 0), deadline=200.0)
    assert guard.time_fraction(now=50.0) == 0.0  # before training
    guard._started = (100.0, 0)
    assert guard.time_fraction(now=150.0) == pytest.approx(0.5) and guard.time_fraction(now=250.0) == 1.0
    guard._started = (100.0, 50)  # resumed at iteration 50 of 100: half done before this call
    assert guard.time_fraction(now=150.0) == pytest.approx(0.75)
    now = {"t": 0.0}
    guard._started, guard.trainer = (0.0, 0), types.SimpleNamespace(iter=0, start_iter=0, max_iter=100)
    steps = MultiStepParamScheduler([1.0, 0.1, 0.01], milestones=[75, 90], num_updates=100)

    def lr_after(scheduler_class, iterations, seconds_per_iter, **kwargs):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
        scheduler = scheduler_class(optimizer, steps, max_iter=100, **kwargs)
        for i in range(iterations):
            now["t"] = (i + 1) * seconds_per_iter
            optimizer.step()
            scheduler.step()
        return optimizer.param_groups[0]["lr"], scheduler

    clock = {"clock": lambda: guard.time_fraction(now["t"])}
    # at half the planned speed (4 s an iteration where 2 were planned): cut at iteration 50
    assert lr_after(LRMultiplier, 49, 4.0)[0] == pytest.approx(0.1)  # by iterations: never decayed
    lr, scheduler = lr_after(module_train.DeadlineLRMultiplier, 49, 4.0, **clock)
    assert lr == pytest.approx(0.001)  # by the clock: both decays before the cut
    assert set(scheduler.state_dict()) == {"base_lrs", "last_epoch"}  # the clock is not saved
    # on schedule the two agree
    assert lr_after(module_train.DeadlineLRMultiplier, 80, 2.0, **clock)[0] == pytest.approx(
        lr_after(LRMultiplier, 80, 2.0)[0]) == pytest.approx(0.01)


# ---------------------------------------------------------------- a real tiny run
def test_a_tiny_detector_run_with_a_budget_ends_with_the_planned_iterations(tiny_cfg, caplog, monkeypatch):
    cfg = tiny_cfg("DETECTOR.STAGES", "[[64, 4, 0.01, 1]]", "DETECTOR.TIME_BUDGET_MIN", "0.25",
                   "DETECTOR.EVAL_PERIOD", "2")
    train, val = module_preprocessing.get_train_val_dicts(cfg)
    # The stage's deadline stays on, an hour away: a CI machine whose speed changes after the probe
    # (on a loaded machine the probe itself can take most of the 15 s, leaving the stage a share of
    # a few seconds) must not turn this test of the plan into one of the deadline
    # (test_the_deadline_ends_a_stage_cleanly_with_final_weights tests that).
    shares = module_train._stage_shares
    monkeypatch.setattr(module_train, "_stage_shares", lambda record: dict.fromkeys(shares(record), 3600.0))
    with caplog.at_level("INFO", logger="module_train"):
        paths = module_train.train_detector(cfg, train, val)
    record = json.loads(paths["plan"].read_text())
    planned = record["plan"]["stages"][0][1]
    assert record["plan"]["s_per_iter"][0] > 0 and "expected_end" in record
    assert 0 < record["spent_s"]["1"] < 600  # the stage's seconds, for the deadlines of later calls
    assert "time budget 0.25 min" in caplog.text
    checkpoint = torch.load(paths["final"], weights_only=False)
    assert checkpoint["iteration"] == planned - 1 and "truncated" not in checkpoint  # a valid, complete checkpoint
    saved = module_config.get_cfg(str(paths["config"]))  # the resolved config records the plan
    assert saved.DETECTOR.STAGES[0][1] == planned
    caplog.clear()
    with caplog.at_level("INFO", logger="module_train"):
        module_train.train_detector(cfg, train, val)  # again: the plan is replayed, not re-planned
    assert "replaying the plan" in caplog.text and "reused" in caplog.text


def test_the_deadline_ends_a_stage_cleanly_with_final_weights(tiny_cfg):
    cfg = tiny_cfg("DETECTOR.STAGES", "[[64, 50, 0.01, 1]]", "DETECTOR.EVAL_PERIOD", "0")
    train, val = module_preprocessing.get_train_val_dicts(cfg)
    stage = module_config.get_stage(cfg, 1)
    final, outcome = module_train.train_stage(cfg, stage, train, val, deadline=time.time() + 2)
    checkpoint = torch.load(final, weights_only=False)
    assert "by the time budget" in outcome and checkpoint["truncated"] and checkpoint["iteration"] < 49


# ---------------------------------------------------------------- progress
def test_progress_lines_say_step_position_loss_and_eta(tmp_path):
    path = tmp_path / "progress.json"
    reporter = module_progress.ProgressReporter(path, "detector stage 1/3 @ 256 px", 100, "iter")
    reporter.fields["started"] -= 10  # ten seconds ago
    reporter._start_done = 0
    reporter.update(done=20, loss=1.5, val_f2=0.61, force=True)
    progress = module_progress.read_progress(path)
    assert progress["eta_s"] == pytest.approx(40, rel=0.05)  # 10 s for 20 iterations, 80 to go
    line = module_progress.format_progress({**progress, "remaining_plan_s": 60}, "4. Detector", elapsed_s=75)
    assert "4. Detector" in line and "20/100 iters" in line and "loss 1.5" in line and "val F2 0.6100" in line
    assert "step ETA 40s" in line and "run ETA ~1m40s" in line and "+1m15s" in line
    partial = module_progress.format_progress({**progress, "remaining_plan_s": 60, "remaining_plan_partial": True})
    assert "run ETA >1m40s" in partial  # some later step not known yet: a lower bound
    assert module_progress.plural("batch") == "batches" and module_progress.plural("image") == "images"


def test_the_run_eta_counts_the_detector_budget_while_the_classifier_trains(tiny_cfg, tmp_path):
    import run_notebook

    cfg = tiny_cfg("DETECTOR.TIME_BUDGET_MIN", "2")
    printer = run_notebook.ProgressPrinter(cfg, tmp_path / "partial.ipynb")
    assert printer.remaining_after({"step": "classifier epoch 1/3"}) == (120.0, True)  # inference not known yet
    assert printer.remaining_after({"step": "tuning: both models"}) == (None, False)
    n_images = cfg.SYNTH.N_TEST + cfg.DATA.VAL_FRACTION * cfg.SYNTH.N_TRAIN
    inference = n_images * 0.5 * (3 if cfg.SUBMIT.TTA else 1)
    known = printer.remaining_after({"step": "detector stage 2/3 @ 64 px", "infer_s_per_image": 0.5,
                                     "remaining_plan_s": 40.0})  # stage 3's planned seconds
    assert cfg.SYNTH.ENABLED and known == (pytest.approx(40.0 + inference), False)
    unplanned = printer.remaining_after({"step": "detector stage 2/3 @ 64 px", "infer_s_per_image": 0.5})
    assert unplanned == (pytest.approx(inference), True)


def test_the_detector_progress_counts_the_planned_later_stages(tiny_cfg):
    cfg = tiny_cfg("DETECTOR.TIME_BUDGET_MIN", "1")
    stages = module_config.get_stages(cfg)
    plan_path = module_config.get_detector_path(cfg, "plan")
    assert module_train.planned_seconds_after(cfg, stages[0]) is None  # no plan yet
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    plan_path.write_text(json.dumps({"plan": {"expected_s": [10.0, 20.0, 30.0][:len(stages)]}}))
    assert module_train.planned_seconds_after(cfg, stages[0]) == pytest.approx(sum([20.0, 30.0][:len(stages) - 1]))
    assert module_train.planned_seconds_after(cfg, stages[-1]) == 0.0
    assert module_train.planned_seconds_after(tiny_cfg(), stages[0]) is None  # no budget: no plan counts


def test_run_notebook_prints_live_progress(tiny_config, tiny_paths):
    result = subprocess.run([sys.executable, "run_notebook.py", "--config", str(tiny_config), "--no-html",
                             "--progress-interval", "2", *tiny_paths, "CLASSIFIER.EPOCHS", "3"],
                            cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[") and " | " in line]
    assert len(lines) >= 3
    assert any("classifier epoch" in line for line in lines) or any("detector stage" in line for line in lines)
    assert any("(cell " in line for line in lines)
    assert "Executing:" not in result.stderr  # papermill's one-line bar is off: plain lines only


# ---------------------------------------------------------------- the GPU check, on a CPU
@pytest.mark.slow
def test_device_check_runs_in_its_tiny_form(tmp_path):
    out = tmp_path / "check.json"
    result = subprocess.run(["bash", "bench/device_check.sh", "--tiny", "--json", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report = json.loads(out.read_text())
    training = report["detector_training"]["fp32"]
    assert training["module_train_s_per_iter"] > 0 and training["default_trainer_s_per_iter"] > 0
    assert report["detector_inference"]["images_per_s"] > 0 and report["classifier_inference"]["images_per_s"] > 0
    assert report["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def test_peak_rss_counts_this_program_not_the_process_it_was_forked_from():
    """A child forked from a process holding 600 MB and exec'd into a small Python reports its own
    peak (VmHWM), where ``ru_maxrss`` carries the parent's memory across exec."""
    import numpy as np

    ballast = np.ones(600 * 2**20 // 8)  # 600 MB resident in this process
    code = "import module_progress, resource; print(module_progress.peak_rss_mb(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    own, maxrss = map(float, done.stdout.split())
    assert ballast.sum() > 0 and own < 300, (own, maxrss)


def test_the_probes_take_the_median_step_so_a_moment_of_other_work_does_not_shorten_the_plan():
    from module_progress import median_step_seconds

    ticks = iter([0, 5, 6, 6, 7, 7, 17, 17, 18, 18, 19])  # the warm-up's start (not timed), then 1, 1, 10, 1, 1 s
    calls = []
    seconds = median_step_seconds(lambda: calls.append(1), count=5, warmup=1, clock=lambda: next(ticks))
    assert seconds == 1.0 and len(calls) == 6  # the mean of the five would be 2.8
