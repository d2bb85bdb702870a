"""Runs continue where they stopped: SIGTERM checkpoints, exact resume, reuse, changed settings, Run All again."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from detectron2.engine import HookBase

import module_config
import module_preprocessing
import module_train

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


def _train_command(tiny_config, opts) -> list[str]:
    return [sys.executable, "module_train.py", "--config", str(tiny_config), *opts]


def _wait_for(path: Path, text: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return
        time.sleep(0.1)
    raise AssertionError(f"{text!r} never appeared in {path}:\n{path.read_text(errors='replace')[-3000:]}")


def _final_weights(cfg) -> dict:
    stage = module_config.get_stages(cfg)[0]
    return torch.load(module_config.get_stage_path(cfg, stage, "final"), weights_only=False)["model"]


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_the_resumed_stage_equals_an_uninterrupted_one(tiny_config, tiny_paths,
                                                                                        tmp_path):
    """A real SIGTERM mid-stage: exit 143, a checkpoint at the iteration reached, a message naming it;
    the resumed run loses no iteration and ends with the very weights of an uninterrupted run of
    the same seed (measured on this CPU: max |difference| 0.0, bit-identical)."""
    stage_opts = ["DETECTOR.STAGES", "[[64, 24, 0.01, 2]]", "DETECTOR.EVAL_PERIOD", "0",
                  "SOLVER.CHECKPOINT_PERIOD", "1000", "DETECTOR.LOG_PERIOD", "1"]
    full = [*tiny_paths, *stage_opts, "PATHS.RUN_NAME", "full"]
    cut = [*tiny_paths, *stage_opts, "PATHS.RUN_NAME", "cut"]
    subprocess.run(_train_command(tiny_config, full), cwd=ROOT, env=_env(), check=True, capture_output=True, timeout=600)

    log = tmp_path / "cut.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(_train_command(tiny_config, cut), cwd=ROOT, env=_env(), stdout=handle,
                                   stderr=subprocess.STDOUT)
        _wait_for(log, "iter: 8 ")
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
    text = log.read_text()
    assert "SIGTERM received" in text and "stopped by SIGTERM after iteration" in text
    stopped_at = int(text.split("stopped by SIGTERM after iteration ")[1].split()[0])
    assert 9 <= stopped_at < 24
    checkpoint = tmp_path / "runs" / "cut" / "detector" / "stage1_64" / f"model_{stopped_at - 1:07d}.pth"
    assert checkpoint.is_file() and str(checkpoint) in text
    assert torch.load(checkpoint, weights_only=False)["iteration"] == stopped_at - 1

    resumed = subprocess.run(_train_command(tiny_config, cut), cwd=ROOT, env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {checkpoint} at iteration {stopped_at} of 24" in resumed.stderr
    assert "random init" not in resumed.stderr.split("resuming from")[0].split("===")[-1]
    metrics = [json.loads(line) for line in (checkpoint.parent / "metrics.json").read_text().splitlines()]
    assert sorted({m["iteration"] for m in metrics}) == list(range(24))  # not one iteration lost or repeated
    a = _final_weights(module_config.get_cfg(tiny_config, full))
    b = _final_weights(module_config.get_cfg(tiny_config, cut))
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) == 0.0


def test_checkpoints_saved_before_a_resume_count_against_the_limit(tiny_cfg):
    cfg = tiny_cfg("DETECTOR.STAGES", "[[64, 6, 0.01, 0]]", "SOLVER.CHECKPOINT_PERIOD", "1",
                   "DETECTOR.MAX_CHECKPOINTS_KEPT", "2", "DETECTOR.EVAL_PERIOD", "0")
    train, val = module_preprocessing.get_train_val_dicts(cfg)
    stage = module_config.get_stage(cfg, 1)
    stage_dir = module_config.get_stage_dir(cfg, stage)
    trainer = module_train.build_stage_trainer(cfg, stage, train, val, "", resume=False)
    guard = next(h for h in trainer._hooks if isinstance(h, module_train.StopGuard))

    class SignalAfterThree(HookBase):
        def after_step(self):
            if self.trainer.iter == 2:
                guard.received = signal.SIGTERM  # what the handler records; StopGuard acts after the next step

    trainer.register_hooks([SignalAfterThree()])
    with pytest.raises(module_train.TrainingStopped):
        trainer.train(0, stage.iterations)
    assert sorted(p.name for p in stage_dir.glob("model_0*.pth")) == ["model_0000002.pth", "model_0000003.pth"]
    module_train.train_detector(cfg, train, val)  # resumes at 4 and finishes: the earlier two count
    assert sorted(p.name for p in stage_dir.glob("model_0*.pth")) == ["model_0000004.pth", "model_0000005.pth"]


def test_a_finished_stage_is_reused_and_changed_settings_start_it_over(tiny_cfg, caplog):
    cfg = tiny_cfg("DETECTOR.STAGES", "[[64, 2, 0.01, 0]]", "DETECTOR.EVAL_PERIOD", "0")
    train, val = module_preprocessing.get_train_val_dicts(cfg)
    module_train.train_detector(cfg, train, val)
    stage_dir = module_config.get_stage_dir(cfg, module_config.get_stage(cfg, 1))
    final = stage_dir / "model_final.pth"
    stamp = final.stat().st_mtime_ns
    with caplog.at_level("INFO", logger="module_train"):
        module_train.train_detector(cfg, train, val)
    assert final.stat().st_mtime_ns == stamp and "reused: finished before" in caplog.text

    changed = tiny_cfg("DETECTOR.STAGES", "[[64, 2, 0.01, 0]]", "DETECTOR.EVAL_PERIOD", "0",
                       "MODEL.RESNETS.DEPTH", "34")  # another backbone: the checkpoint means nothing to it
    caplog.clear()
    with caplog.at_level("INFO"):
        module_train.train_detector(changed, train, val)
    assert "its settings changed since its checkpoints were saved" in caplog.text
    assert "MODEL settings" in caplog.text
    moved = [p for p in stage_dir.parent.iterdir() if p.name.startswith("stage1_64.old-")]
    assert len(moved) == 1 and (moved[0] / "model_final.pth").is_file()  # moved aside, never deleted
    assert final.is_file() and final.stat().st_mtime_ns != stamp

    caplog.clear()
    with caplog.at_level("INFO"):
        module_train.train_detector(changed, train, val, fresh=True)
    assert "FRESH / --fresh" in caplog.text
    assert len([p for p in stage_dir.parent.iterdir() if p.name.startswith("stage1_64.old-")]) == 2


@pytest.mark.slow
def test_run_all_again_after_the_kernel_died_in_the_detector_cell_reuses_and_resumes(tiny_config, tiny_paths,
                                                                                     tmp_path):
    """A real Run All (run_notebook.py) whose kernel is killed while the detector trains; run again,
    the classifier is reused and the stage resumes from its last periodic checkpoint."""
    import psutil

    opts = [*tiny_paths, "DETECTOR.STAGES", "[[64, 40, 0.01, 1], [96, 2, 0.01, 0], [128, 2, 0.01, 0]]",
            "SOLVER.CHECKPOINT_PERIOD", "2",
            "DETECTOR.EVAL_PERIOD", "0"]
    command = [sys.executable, "run_notebook.py", "--config", str(tiny_config), "--no-html", *opts]
    cfg = module_config.get_cfg(tiny_config, opts)
    stage_dir = module_config.get_stage_dir(cfg, module_config.get_stage(cfg, 1))
    first = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while not list(stage_dir.glob("model_000000[4-9].pth")):
        assert time.time() < deadline and first.poll() is None, "the detector never checkpointed"
        time.sleep(0.2)
    kernels = [p for p in psutil.Process(first.pid).children(recursive=True) if "ipykernel" in " ".join(p.cmdline())]
    assert kernels, "no kernel process found"
    for kernel in kernels:
        kernel.kill()
    output, _ = first.communicate(timeout=120)
    assert first.returncode != 0

    second = subprocess.run(command, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    executed = (module_config.get_run_dir(cfg) / "module_notebook.ipynb").read_text()
    assert "classifier: reused" in executed
    assert "resuming from" in executed and "at iteration" in executed
    resumed_at = int(executed.split("at iteration ")[1].split()[0])
    assert resumed_at >= 5


@pytest.mark.slow
def test_sigterm_under_torchrun_stops_every_rank_at_the_same_iteration(tiny_config, tiny_paths, tmp_path):
    """torchrun forwards SIGTERM to its two CPU ranks: they agree on the iteration (one all-reduce),
    rank 0 alone writes the checkpoint, and the run continues from it afterwards."""
    opts = [*tiny_paths, "PATHS.RUN_NAME", "ddp", "DETECTOR.STAGES", "[[64, 40, 0.01, 1]]", "DETECTOR.EVAL_PERIOD", "0",
            "SOLVER.CHECKPOINT_PERIOD", "1000", "DETECTOR.LOG_PERIOD", "1"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "module_train.py", "--config", str(tiny_config), *opts]
    log = tmp_path / "ddp.log"
    with open(log, "w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=handle, stderr=subprocess.STDOUT)
        _wait_for(log, "iter: 4 ", timeout=300)
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=180)
    text = log.read_text()
    assert process.returncode != 0
    stopped = [int(part.split()[0]) for part in text.split("stopped by SIGTERM after iteration ")[1:]]
    assert stopped, text[-3000:]
    stage_dir = tmp_path / "runs" / "ddp" / "detector" / "stage1_64"
    written = sorted(p.name for p in stage_dir.glob("model_0*.pth"))
    assert written == [f"model_{stopped[0] - 1:07d}.pth"]  # one file: rank 0's, at the agreed iteration
    resumed = subprocess.run([sys.executable, "module_train.py", "--config", str(tiny_config), *opts], cwd=ROOT,
                             env=_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at iteration {stopped[0]} of 40" in resumed.stderr
