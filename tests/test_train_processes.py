"""The training entry point as separate processes: a real SIGKILL then --resume, and torchrun on CPU."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import module_train
from test_train import make_tiny_dataset, tiny_opts

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return make_tiny_dataset(tmp_path_factory.mktemp("tiny_data"))


def _config_file(tmp_path) -> Path:
    path = tmp_path / "tiny.yaml"
    path.write_text("MODEL:\n  DEVICE: cpu\n")
    return path


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def test_sigkill_mid_stage_then_resume_continues_from_the_last_checkpoint(tiny_data, tmp_path):
    iterations = 40
    opts = tiny_opts(tiny_data, tmp_path / "runs", run="killed", stages=f"[[64, {iterations}, 0.01, 2]]")
    opts += ["SOLVER.CHECKPOINT_PERIOD", "5", "DETECTOR.EVAL_PERIOD", "0", "DETECTOR.MAX_CHECKPOINTS_KEPT", "0"]
    stage_dir = tmp_path / "runs" / "killed" / "detector" / "stage1_64"
    command = [sys.executable, "module_train.py", "--config", str(_config_file(tmp_path)), *opts]
    process = subprocess.Popen(command, cwd=REPO_ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
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

    final = module_train.main(module_train.get_args_parser().parse_args(["--config", str(_config_file(tmp_path)), "--resume", *opts]))

    assert final == stage_dir / "model_final.pth"
    assert torch.load(final)["iteration"] == iterations - 1
    log = (tmp_path / "runs" / "killed" / "detector" / "log.txt").read_text()
    assert f"resuming from {stage_dir / last} at iteration {killed_at + 1}" in log
    logged_after = [json.loads(line)["iteration"] for line in (stage_dir / "metrics.json").read_text().splitlines()][len(logged_before):]
    # it continued right after the checkpoint: only iterations since the checkpoint are redone
    assert logged_after == list(range(killed_at + 1, iterations))
    assert logged_before[: killed_at + 1] == list(range(killed_at + 1))


def test_torchrun_two_cpu_processes_stay_in_sync_and_only_rank_0_writes(tiny_data, tmp_path):
    opts = tiny_opts(tiny_data, tmp_path / "runs", run="ddp", stages="[[64, 2, 0.01, 0]]")
    opts += ["SOLVER.CHECKPOINT_PERIOD", "1", "DETECTOR.EVAL_PERIOD", "0"]
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "module_train.py", "--config", str(_config_file(tmp_path)), *opts,
    ]
    result = subprocess.run(command, cwd=REPO_ROOT, env=_env(), capture_output=True, text=True, timeout=300)
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
    model = module_train.load_detector(module_train.get_cfg(None, opts), stage_dir / "model_final.pth")
    assert module_train.parameter_digest(model) == after  # what rank 0 saved is what both ranks hold
    assert final["iteration"] == 1
    # only rank 0 wrote: one event file, one line per iteration, one validation record
    assert len(list(stage_dir.glob("events.out.tfevents.*"))) == 1
    assert [json.loads(line)["iteration"] for line in (stage_dir / "metrics.json").read_text().splitlines()] == [0, 1]
    assert len((detector_dir / "val_metrics.jsonl").read_text().splitlines()) == 1
    assert sorted(p.name for p in stage_dir.iterdir() if p.suffix == ".pth") == ["model_0000000.pth", "model_0000001.pth", "model_final.pth"]
    assert "rank 1" not in log
