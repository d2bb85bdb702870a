"""Run the driver notebook headless and keep everything it made in the run folder.

    python run_notebook.py --config configs/demo.yaml            # what `make demo` runs
    python run_notebook.py --config configs/airbus.yaml          # `make run`: the Kaggle data
    python run_notebook.py --config configs/demo.yaml CLASSIFIER.EPOCHS 1   # KEY VALUE overrides

Steps: resolve the config -> check (or, for synthetic configs, generate) the Kaggle-layout input
folder with ``module_preprocessing.prepare_input``, so a wrong ``input/`` fails in seconds with
a clear message instead of inside the notebook -> execute ``module_notebook.ipynb`` through
papermill with the config path and overrides as its parameters -> export the executed notebook
to HTML -> print the local F2 (and the all-empty baseline it must beat) and where to look. Into
``runs/<RUN_NAME>/`` go ``module_notebook.ipynb`` (executed, also when a cell failed: it shows
where) and ``module_notebook.html``, next to what the pipeline writes there itself
(``submission/submission.csv``, ``scores.json``, TensorBoard logs). Both files are written
atomically. The kernel runs in the current folder, so the config's relative paths mean the same
to this script and to the notebook.

``scores.json`` is written by the notebook's scoring cell with :func:`write_scores` and read back
with :func:`read_scores`: its one home is here.

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
SCORES_FILE = "scores.json"  # written by the notebook's scoring cell into the run folder

logger = logging.getLogger(__name__)


class NotebookFailed(RuntimeError):
    """A notebook cell raised; the executed notebook (with the traceback) was still saved."""


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
    partial = output.with_name(f".{output.stem}.running{output.suffix}")
    try:
        papermill.execute_notebook(
            str(notebook), str(partial), parameters=parameters, kernel_name=kernel_name,
            cwd=str(cwd), progress_bar=True, request_save_on_cell_execute=True,
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

    from module_config import atomic_path

    body, _ = HTMLExporter(template_name="lab").from_notebook_node(nbformat.read(str(notebook), as_version=4))
    with atomic_path(output) as tmp:
        tmp.write_text(body, encoding="utf-8")
    return Path(output)


def read_scores(run_dir: str | os.PathLike) -> dict | None:
    """The scores the notebook wrote into the run folder (None when it wrote none)."""
    path = Path(run_dir) / SCORES_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def write_scores(run_dir: str | os.PathLike, result, what: str) -> Path | None:
    """Write the notebook's local score into ``run_dir/scores.json`` (atomically); return its path.

    ``result`` is a ``module_metric.ScoreResult`` (``module_submit.score_report``), or None when
    the config has no test truth: then a stale ``scores.json`` is removed and nothing is written.
    Keys: ``f2`` (the competition score), ``what`` (which images), ``all_empty_f2`` (the score of
    a submission without any ship, the baseline to beat), ``n_images``, and the breakdowns of
    ``module_metric.score_to_json`` (per IoU threshold, by image type, recall by size, per image).
    """
    from module_config import atomic_path
    from module_metric import score_to_json

    path = Path(run_dir) / SCORES_FILE
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
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/demo.yaml", help="pipeline config (YAML)")
    parser.add_argument("--notebook", default=str(NOTEBOOK), help="the driver notebook to execute")
    parser.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    parser.add_argument("--cell-timeout", type=int, default=None,
                        help="seconds one cell may run (default: no limit)")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML export")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides: KEY VALUE pairs, e.g. CLASSIFIER.EPOCHS 1")
    return parser


def main(args: argparse.Namespace) -> dict:
    """Run the notebook for ``args.config``; return the paths written and the scores."""
    from module_config import get_cfg, get_run_dir
    from module_preprocessing import prepare_input
    from module_submit import get_submission_dir

    started = time.perf_counter()
    cfg = get_cfg(args.config, args.opts)
    run_dir = get_run_dir(cfg)
    input_dir = prepare_input(cfg)  # raises, naming the folder and what is missing, on a wrong layout
    print(f"[run_notebook] config {args.config}, input {input_dir}, run folder {run_dir}", flush=True)

    notebook = run_dir / Path(args.notebook).name
    parameters = {"CONFIG": str(args.config), "OVERRIDES": list(args.opts)}
    # The kernel runs in the current folder, so that the config's relative paths (runs/...) mean
    # what they mean here; the project's modules are found through PYTHONPATH.
    add_to_pythonpath(ROOT)
    try:
        execute_notebook(args.notebook, notebook, parameters, kernel_name=args.kernel, cwd=Path.cwd(),
                         cell_timeout=args.cell_timeout)
    except NotebookFailed:  # export the failed run too: the HTML shows the traceback in context
        if not args.no_html:
            export_html(notebook, notebook.with_suffix(".html"))
        raise
    html = None if args.no_html else export_html(notebook, notebook.with_suffix(".html"))
    scores = read_scores(run_dir)
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
    submission = get_submission_dir(cfg) / "submission.csv"  # where `module_submit.py predict` writes it
    for name, path in (("submission", submission), ("scores", run_dir / SCORES_FILE)):
        if path.is_file():
            lines.append(f"  {name + ':':<19}{path}")
    lines.append(f"  TensorBoard:       tensorboard --logdir {run_dir}   (then http://localhost:6006)")
    print("\n".join(lines), flush=True)
    return {"run_dir": run_dir, "notebook": notebook, "html": html, "scores": scores}


if __name__ == "__main__":
    args = get_args_parser().parse_args()
    main(args)
