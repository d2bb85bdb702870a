"""The training entry point as separate processes: a real SIGKILL then a run that continues, and torchrun on CPU.

The command line runs ``configs/tiny.yaml`` on conftest's generated ``tiny_dataset`` (``tiny_paths``
points it there), with the stage schedule each test needs.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import torch

import module_inference
import module_train


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_sigkill_mid_stage_then_the_next_run_continues_from_the_last_checkpoint(tiny_paths, tiny_config, repo_root, tmp_path):
    iterations = 40
    opts = [*tiny_paths, "PATHS.RUN_NAME", "killed", "MODEL.DEVICE", "cpu",
            "DETECTOR.STAGES", f"[[64, {iterations}, 0.01, 2]]", "SOLVER.CHECKPOINT_PERIOD", "5",
            "DETECTOR.EVAL_PERIOD", "0", "DETECTOR.MAX_CHECKPOINTS_KEPT", "0"]
    stage_dir = tmp_path / "runs" / "killed" / "detector" / "stage1_64"
    command = [sys.executable, "module_train.py", "--config", str(tiny_config), *opts]
    process = subprocess.Popen(command, cwd=repo_root, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not (stage_dir / "last_checkpoint").exists():
            assert process.poll() is None, f"training ended before its first checkpoint: {process.stderr.read().decode()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 180 s"
            time.sleep(0.02)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert not (stage_dir / "model_final.pth").exists(), "the run finished before the kill"
    last = (stage_dir / "last_checkpoint").read_text()
    killed_at = int(re.fullmatch(r"model_(\d{7})\.pth", last).group(1))
    assert torch.load(stage_dir / last)["iteration"] == killed_at  # complete, loadable file
    logged_before = [json.loads(line)["iteration"] for line in (stage_dir / "metrics.json").read_text().splitlines()]

    # the same command again: it continues the stage (the default), no flag needed
    paths = module_train.main(module_train.get_args_parser().parse_args(["--config", str(tiny_config), *opts]))

    final = paths["final"]
    assert final == stage_dir / "model_final.pth"
    assert torch.load(final)["iteration"] == iterations - 1
    log = (tmp_path / "runs" / "killed" / "detector" / "log.txt").read_text()
    assert f"resuming from {stage_dir / last} at iteration {killed_at + 1}" in log
    logged_after = [json.loads(line)["iteration"] for line in (stage_dir / "metrics.json").read_text().splitlines()][len(logged_before):]
    # it continued right after the checkpoint: only iterations since the checkpoint are redone
    assert logged_after == list(range(killed_at + 1, iterations))
    assert logged_before[: killed_at + 1] == list(range(killed_at + 1))


def test_torchrun_two_cpu_processes_stay_in_sync_and_only_rank_0_writes(tiny_paths, tiny_cfg, tiny_config, repo_root,
                                                                          tmp_path):
    run = ["PATHS.RUN_NAME", "ddp", "MODEL.DEVICE", "cpu", "DETECTOR.STAGES", "[[64, 2, 0.01, 0]]",
           "SOLVER.CHECKPOINT_PERIOD", "1", "DETECTOR.EVAL_PERIOD", "0"]
    opts = [*tiny_paths, *run]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "module_train.py", "--config", str(tiny_config), *opts,
    ]
    result = subprocess.run(command, cwd=repo_root, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    detector_dir = tmp_path / "runs" / "ddp" / "detector"
    log = (detector_dir / "log.txt").read_text()
    assert "distributed: rank 0 of 2 (gloo)" in log
    # SHA-256 of every parameter, gathered from both ranks after the last step
    match = re.search(r"\[stage1_64\] parameters ([0-9a-f]{16}) -> ([0-9a-f]{16}), identical on 2 rank\(s\)", log)
    assert match, log[-3000:]
    before, after = match.groups()
    assert before != after  # the steps changed the weights
    stage_dir = detector_dir / "stage1_64"
    final = torch.load(stage_dir / "model_final.pth")
    model = module_inference.load_detector(tiny_cfg(*run), stage_dir / "model_final.pth")
    assert module_train.parameter_digest(model) == after  # what rank 0 saved is what both ranks hold
    assert final["iteration"] == 1
    # only rank 0 wrote: one event file, one line per iteration, one validation record
    assert len(list(stage_dir.glob("events.out.tfevents.*"))) == 1
    assert [json.loads(line)["iteration"] for line in (stage_dir / "metrics.json").read_text().splitlines()] == [0, 1]
    assert len((detector_dir / "val_metrics.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in stage_dir.iterdir() if p.suffix == ".pth") == ["model_0000000.pth", "model_0000001.pth", "model_final.pth"]
    assert "rank 1" not in log
