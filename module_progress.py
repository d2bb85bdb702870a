"""Live progress of a run, in one file: what is running, how far it is, its loss, F2 and ETA.

The long steps write ``runs/<run>/progress.json`` (``module_config.get_progress_path``) as they go
(the classifier after each batch, the detector after each iteration, tuning and prediction per
chunk), at most every :data:`MIN_WRITE_INTERVAL_S` seconds, atomically. ``run_notebook.py``
(``make demo``, ``make run``) reads it from its own process and prints one plain line every
:data:`PRINT_INTERVAL_S` seconds: the notebook section, the step, epoch or iteration out of the
total, the latest loss and validation F2, and the ETAs of the step and of the run. Plain lines, not
a redrawn bar, so CI logs and ``docker logs`` stay readable.

    reporter = ProgressReporter(get_progress_path(cfg), step="detector stage 1/3 @ 256 px", total=500, unit="iter")
    reporter.update(done=20, loss=1.23)          # throttled; reporter.update(..., force=True) writes now
    line = format_progress(read_progress(path), section="4. Detector")

A leaf: it imports nothing of the project but :mod:`module_files`. Importing it does nothing.
"""
from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Callable

from module_files import atomic_path

MIN_WRITE_INTERVAL_S = 2.0  # the writers' throttle
PRINT_INTERVAL_S = 30.0  # run_notebook's status line


class ProgressReporter:
    """Writes one step's progress to ``path``: ``done`` of ``total`` ``unit``s since it started, the
    ETA from the mean pace so far, and any extra fields (``loss``, ``val_f2``, ...). Throttled.

    ``planned_s``: the step's planned duration (a time budget), used for the ETA before the
    first unit is done. ``remaining_plan_s``: planned seconds of the run's steps after this one.
    """

    def __init__(self, path: str | os.PathLike | None, step: str, total: int, unit: str,
                 planned_s: float | None = None, remaining_plan_s: float | None = None):
        self.path = Path(path) if path else None
        self.fields = {"step": step, "total": int(total), "unit": unit, "done": 0, "started": time.time(),
                       "planned_s": planned_s, "remaining_plan_s": remaining_plan_s}
        self._start_done = None  # the first `done` seen: a resumed step's pace counts from there
        self._written = 0.0
        self.update(done=0, force=True)

    def update(self, done: int | None = None, force: bool = False, **fields) -> None:
        """Record ``done`` and ``fields``; write when ``force`` or the throttle interval has passed."""
        now = time.time()
        if done is not None:
            if self._start_done is None:
                self._start_done, self.fields["started"] = int(done), now
            self.fields["done"] = int(done)
        self.fields.update({k: v for k, v in fields.items() if v is not None})
        if self.path is None or (not force and now - self._written < MIN_WRITE_INTERVAL_S):
            return
        self.fields["updated"] = now
        self.fields["eta_s"] = self.eta_s(now)
        self._written = now
        try:
            with atomic_path(self.path) as tmp:
                tmp.write_text(json.dumps(self.fields))
        except OSError:  # progress is a courtesy: a full disk must not stop training
            pass

    def eta_s(self, now: float | None = None) -> float | None:
        """Seconds left for this step, from the pace so far (or the plan before any progress)."""
        now = now or time.time()
        done, total = self.fields["done"], self.fields["total"]
        progressed = done - (self._start_done or 0)
        if total and progressed > 0:
            return max(0.0, (now - self.fields["started"]) / progressed * (total - done))
        planned = self.fields.get("planned_s")
        return max(0.0, planned - (now - self.fields["started"])) if planned else None


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB: ``VmHWM`` of ``/proc/self/status`` on Linux.

    Not ``getrusage().ru_maxrss``: Linux carries that across ``exec`` from the memory the process
    had before it (a child that ``subprocess`` forks from a 4 GB pytest reports 4 GB), where
    ``VmHWM`` counts only the program running now. Falls back to ``ru_maxrss`` elsewhere."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_progress(path: str | os.PathLike) -> dict | None:
    """The progress a step last wrote (None when there is none or it is unreadable mid-write)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def format_duration(seconds: float | None) -> str:
    """``"1h02m"``, ``"4m05s"``, ``"12s"``; ``"?"`` for None."""
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def median_step_seconds(step: Callable[[], object], count: int, warmup: int = 0,
                        clock: Callable[[], float] = time.perf_counter) -> float:
    """Call ``step`` ``warmup + count`` times; the median seconds of the last ``count`` calls (the
    time-budget probes: a moment of other work on the machine moves a mean, not the median)."""
    seconds = []
    for k in range(warmup + count):
        started = clock()
        step()
        if k >= warmup:
            seconds.append(clock() - started)
    return float(statistics.median(seconds))


def plural(unit: str) -> str:
    """``"batch"`` -> ``"batches"``, ``"iter"`` -> ``"iters"``."""
    if not unit:
        return unit
    return unit + ("es" if unit.endswith(("ch", "sh", "s", "x")) else "s")


def format_progress(progress: dict | None, section: str = "", elapsed_s: float | None = None,
                    now: float | None = None) -> str:
    """One status line: ``[12:03:15 +4m10s] | 3. Classifier | classifier epoch 5/12: 140/336 batches |
    loss 0.412 | step ETA 2m10s | run ETA ~9m00s`` (parts without data are left out). The run ETA
    adds ``remaining_plan_s``, the steps after this one; ``run ETA >...`` when
    ``remaining_plan_partial`` says that some of them are not known yet (a lower bound)."""
    now = now or time.time()
    parts = [f"[{time.strftime('%H:%M:%S', time.localtime(now))}"
             + (f" +{format_duration(elapsed_s)}]" if elapsed_s is not None else "]")]
    if section:
        parts.append(section)
    stale = progress is not None and now - progress.get("updated", now) > 3 * PRINT_INTERVAL_S
    if progress and not stale:
        unit, total = progress.get("unit", ""), progress.get("total", 0)
        parts.append(f"{progress.get('step', '')}: {progress.get('done', 0)}/{total} {plural(unit)}" if total
                     else str(progress.get("step", "")))
        if progress.get("loss") is not None:
            parts.append(f"loss {progress['loss']:.4g}")
        if progress.get("val_f2") is not None:
            parts.append(f"val F2 {progress['val_f2']:.4f}")
        if progress.get("val_auc") is not None:
            parts.append(f"val ROC AUC {progress['val_auc']:.3f}")
        eta = progress.get("eta_s")
        if eta is not None:
            eta = max(0.0, eta - (now - progress.get("updated", now)))
            parts.append(f"step ETA {format_duration(eta)}")
            if progress.get("remaining_plan_s") is not None:
                at_least = ">" if progress.get("remaining_plan_partial") else "~"
                parts.append(f"run ETA {at_least}{format_duration(eta + progress['remaining_plan_s'])}")
    return " | ".join(parts)
