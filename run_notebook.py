"""Run the driver notebook headless and keep everything it made in the run folder.

    python run_notebook.py --config configs/demo.yaml            # what `make demo` runs
    python run_notebook.py --config configs/airbus.yaml          # `make run`: the Kaggle data
    python run_notebook.py --config configs/demo.yaml CLASSIFIER.EPOCHS 1   # KEY VALUE overrides

Steps: resolve the config -> generate the demo's data (``module_synthetic.prepare_synthetic_input``,
synthetic configs only) and check the Kaggle-layout input folder
(``module_preprocessing.check_input_layout``), so a wrong ``input/`` fails in seconds with a
clear message instead of inside the notebook -> execute ``module_notebook.ipynb`` through
papermill with the config path and overrides as its parameters -> export the executed notebook
to HTML -> print the local F2 (and the all-empty baseline it must beat) and where to look. Into
``runs/<RUN_NAME>/`` go ``module_notebook.ipynb`` (executed, also when a cell failed: it shows
where) and ``module_notebook.html``, next to what the pipeline writes there itself
(``submission/submission.csv``, ``scores.json``, TensorBoard logs). Both files are written
atomically. The kernel runs in the current folder, so the config's relative paths mean the same
to this script and to the notebook.

``scores.json`` (``module_config.get_scores_path``) is written by the notebook's scoring cell with
:func:`write_scores` and read back with :func:`read_scores`.

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
NOTEBOOK = ROOT / "module_notebook.ipynb"

logger = logging.getLogger(__name__)


class NotebookFailed(RuntimeError):
    """A notebook cell raised; the executed notebook (with the traceback) was still saved."""


def get_partial_path(output: str | os.PathLike) -> Path:
    """The hidden file papermill rewrites after every cell while ``output`` runs."""
    output = Path(output)
    return output.with_name(f".{output.stem}.running{output.suffix}")


def current_section(partial: str | os.PathLike) -> tuple[str, int, int]:
    """``(section heading, running cell number, cell count)`` of a notebook papermill is executing,
    from the copy it saves after every cell (``("", 0, 0)`` while there is none yet)."""
    try:
        cells = json.loads(Path(partial).read_text()).get("cells", [])
    except (OSError, ValueError):
        return "", 0, 0
    section, running = "", 0
    for k, cell in enumerate(cells):
        if cell.get("cell_type") == "markdown":
            lines = [ln for ln in "".join(cell.get("source", "")).splitlines() if ln.startswith("## ")]
            section = lines[0][3:].strip() if lines else section
        status = cell.get("metadata", {}).get("papermill", {}).get("status")
        if status == "running":
            running = k + 1
            break
    return (section if running else ""), running, len(cells)


class ProgressPrinter:
    """Prints one status line every ``interval`` seconds while the notebook runs: the section and
    cell, the running step with its epoch or iteration, loss, validation score and ETAs (from
    ``runs/<run>/progress.json``, ``module_progress``). Plain lines, for terminals, CI logs and
    ``docker logs`` alike; the notebook keeps its own progress bars."""

    def __init__(self, cfg, partial: Path, interval: float = 30.0):
        import threading

        from module_config import get_progress_path

        self.cfg, self.partial, self.interval = cfg, partial, interval
        self.progress_path = get_progress_path(cfg)
        self.started = time.time()
        self._stop = threading.Event()
        self._where = "starting the kernel"
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self.progress_path.unlink(missing_ok=True)  # a previous run's last line is not this run's
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            print(self.line(), flush=True)

    def remaining_after(self, progress: dict | None) -> tuple[float | None, bool]:
        """``(seconds, partial)``: planned seconds of the steps after the running one: the detector's
        time budget while the classifier trains, its later stages while it trains (``plan.json``),
        tuning and prediction from the detector's measured inference speed once known. ``partial`` when some later step is not known yet (the sum is a
        lower bound); ``(None, False)`` when nothing is known."""
        step = (progress or {}).get("step", "")
        if not step.startswith(("classifier", "detector")):
            return None, False
        later, partial = 0.0, False
        if step.startswith("detector stage"):  # its later stages, as the time budget planned them
            if (progress or {}).get("remaining_plan_s") is not None:
                later += progress["remaining_plan_s"]
            else:
                partial = True
        if step.startswith("classifier"):
            if self.cfg.DETECTOR.TIME_BUDGET_MIN > 0:
                later += 60 * self.cfg.DETECTOR.TIME_BUDGET_MIN
            else:
                partial = True
        seconds_per_image = (progress or {}).get("infer_s_per_image")
        n_images = self.cfg.SYNTH.N_TEST + self.cfg.DATA.VAL_FRACTION * self.cfg.SYNTH.N_TRAIN \
            if self.cfg.SYNTH.ENABLED else None
        if seconds_per_image and n_images:
            later += n_images * seconds_per_image * (3 if self.cfg.SUBMIT.TTA else 1)
        else:
            partial = True
        return (later if later > 0 else None), partial

    def line(self) -> str:
        from module_progress import format_progress, read_progress

        section, cell, n_cells = current_section(self.partial)
        progress = read_progress(self.progress_path)
        if progress is not None:
            remaining, partial = self.remaining_after(progress)
            progress = dict(progress, remaining_plan_s=remaining, remaining_plan_partial=partial)
        if cell:
            self._where = f"{section} (cell {cell}/{n_cells})" if section else f"cell {cell}/{n_cells}"
        return format_progress(progress, self._where, elapsed_s=time.time() - self.started)


def execute_notebook(notebook: str | os.PathLike, output: str | os.PathLike, parameters: dict,
                     kernel_name: str = "python3", cwd: str | os.PathLike = ROOT,
                     cell_timeout: int | None = None) -> Path:
    """Execute ``notebook`` with papermill into ``output``; return ``output``.

    papermill rewrites its output after every cell; that happens in a hidden file beside
    ``output``, renamed onto it at the end, so ``output`` is always a complete notebook. When a cell
    raises, the executed notebook is still moved into place and :class:`NotebookFailed` names the
    cell.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    partial = get_partial_path(output)
    try:
        papermill.execute_notebook(
            str(notebook), str(partial), parameters=parameters, kernel_name=kernel_name,
            cwd=str(cwd), progress_bar=False, request_save_on_cell_execute=True,
            execution_timeout=cell_timeout,
        )
    except PapermillExecutionError as exc:
        os.replace(partial, output)
        raise NotebookFailed(
            f"cell {exc.exec_count} of {notebook} raised {exc.ename}: {exc.evalue}\n"
            f"The executed notebook, traceback included, is {output}"
        ) from None
    except BaseException:
        if partial.exists():  # interrupted or the kernel died: keep what ran, for debugging
            os.replace(partial, output)
        raise
    os.replace(partial, output)
    return output


def export_html(notebook: str | os.PathLike, output: str | os.PathLike) -> Path:
    """Export an executed notebook to a self-contained HTML file (images inline), atomically."""
    import nbformat
    from nbconvert import HTMLExporter

    from module_files import atomic_path

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nbformat.read(str(notebook), as_version=4))
    with atomic_path(output) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return Path(output)


def read_scores(cfg) -> dict | None:
    """The scores the notebook wrote into the run folder (None when it wrote none)."""
    from module_config import get_scores_path

    path = get_scores_path(cfg)
    return json.loads(path.read_text()) if path.is_file() else None


def write_scores(cfg, result, what: str) -> Path | None:
    """Write the notebook's local score into ``runs/<run>/scores.json`` (atomically); return its path.

    ``result`` is a ``module_metric.ScoreResult`` (``module_submit.score_report``), or None when
    the config has no test truth: then a stale ``scores.json`` is removed and nothing is written.
    Keys: ``f2`` (the competition score), ``what`` (which images), ``all_empty_f2`` (the score of
    a submission without any ship, the baseline to beat), ``n_images``, and the breakdowns of
    ``module_metric.score_to_json`` (per IoU threshold, by image type, recall by size, per image).
    """
    from module_config import get_scores_path
    from module_files import atomic_path
    from module_metric import score_to_json

    path = get_scores_path(cfg)
    if result is None:
        path.unlink(missing_ok=True)
        return None
    scores = score_to_json(result)
    scores = {"f2": scores.pop("f2"), "what": what,
              "all_empty_f2": float((result.per_image["n_true"] == 0).mean()) if len(result.per_image) else None,
              **scores}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(scores, indent=1))
    return path


def add_to_pythonpath(folder: str | os.PathLike) -> None:
    """Put ``folder`` first on ``$PYTHONPATH`` (once), for the kernels this process starts."""
    folder = str(folder)
    parts = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if folder not in parts:
        os.environ["PYTHONPATH"] = os.pathsep.join([folder, *parts])


def get_args_parser() -> argparse.ArgumentParser:
    from module_config import add_config_args

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fresh", action="store_true",
                        help="start the run over (earlier outputs are moved aside, never deleted); default: continue it")
    parser.add_argument("--notebook", default=str(NOTEBOOK), help="the driver notebook to execute")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    parser.add_argument("--cell-timeout", type=int, default=None,
                        help="seconds one cell may run (default: no limit)")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML export")
    parser.add_argument("--progress-interval", type=float, default=30.0,
                        help="seconds between the status lines printed while the notebook runs")
    add_config_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict:
    """Run the notebook for ``args.config``; return the paths written and the scores."""
    from module_config import get_cfg_from_args, get_run_dir, get_scores_path, get_submission_path
    from module_preprocessing import check_input_layout
    from module_synthetic import prepare_synthetic_input

    from module_config import setup_logging

    setup_logging()
    started = time.perf_counter()
    cfg = get_cfg_from_args(args)
    run_dir = get_run_dir(cfg)
    prepare_synthetic_input(cfg)  # the demo's generated data; nothing for real-data configs
    input_dir = check_input_layout(cfg)  # raises, naming the folder and what is missing, on a wrong layout
    print(f"[run_notebook] config {args.config}, input {input_dir}, run folder {run_dir}", flush=True)

    notebook = run_dir / Path(args.notebook).name
    parameters = {"CONFIG": str(args.config), "OVERRIDES": list(args.opts), "FRESH": bool(args.fresh)}
    # The kernel runs in the current folder, so that the config's relative paths (runs/...) mean
    # what they mean here; the project's modules are found through PYTHONPATH.
    add_to_pythonpath(ROOT)
    try:
        with ProgressPrinter(cfg, get_partial_path(notebook), interval=args.progress_interval):
            execute_notebook(args.notebook, notebook, parameters, kernel_name=args.kernel, cwd=Path.cwd(),
                             cell_timeout=args.cell_timeout)
    except NotebookFailed:  # export the failed run too: the HTML shows the traceback in context
        if not args.no_html:
            export_html(notebook, notebook.with_suffix(".html"))
        raise
    html = None if args.no_html else export_html(notebook, notebook.with_suffix(".html"))
    scores = read_scores(cfg)
    minutes = (time.perf_counter() - started) / 60

    lines = [f"[run_notebook] done in {minutes:.1f} min."]
    if scores is not None:
        lines.append(f"  local F2 ({scores.get('what', 'test images')}): {scores['f2']:.4f}")
        if scores.get("all_empty_f2") is not None:
            lines.append(f"  all-empty baseline F2 (no ship predicted anywhere): {scores['all_empty_f2']:.4f}")
    else:
        lines.append("  no local F2: the config has no DATA.TEST_TRUTH_CSV (Kaggle keeps the test truth).")
    lines += [f"  executed notebook: {notebook}"]
    if html is not None:
        lines.append(f"  HTML report:       {html}")
    for name, path in (("submission", get_submission_path(cfg)), ("scores", get_scores_path(cfg))):
        if path.is_file():
            lines.append(f"  {name + ':':<19}{path}")
    lines.append(f"  TensorBoard:       tensorboard --logdir {run_dir}   (then http://localhost:6006)")
    print("\n".join(lines), flush=True)
    return {"run_dir": run_dir, "notebook": notebook, "html": html, "scores": scores}


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    main(args)
