"""The driver notebook, executed headless through papermill on ``configs/tiny.yaml`` (a few 64 px
synthetic images, a few iterations per stage): every cell runs without an error, shows its
pictures, and the run leaves a valid submission, its local score and an HTML report.

One execution (about two minutes on two CPU cores) serves every test: ``run_notebook.main`` runs
the notebook into a temporary run folder (``PATHS.RUNS_DIR`` / ``PATHS.INPUT_DIR`` overridden),
so nothing is written into the checkout.
"""
from __future__ import annotations

import contextlib
import io
import json

import nbformat
import numpy as np
import pandas as pd
import pytest

import run_notebook
from module_config import get_cfg, get_input_path, get_scores_path
from module_submit import validate_submission

CELL_TIMEOUT_S = 600  # one cell; the whole tiny run takes ~2 minutes

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_config):
    """``run_notebook.main`` on the tiny config in a temporary folder (its data generated there too);
    yields its result and config."""
    tmp = tmp_path_factory.mktemp("notebook")
    opts = ["PATHS.RUNS_DIR", str(tmp / "runs"), "PATHS.INPUT_DIR", str(tmp / "input")]
    args = run_notebook.get_args_parser().parse_args(
        ["--config", str(tiny_config), "--cell-timeout", str(CELL_TIMEOUT_S), *opts])
    assert not args.fresh
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = run_notebook.main(args)
    print(printed.getvalue())
    cfg = get_cfg(tiny_config, opts)
    executed = nbformat.read(str(result["notebook"]), as_version=4)
    yield {"result": result, "cfg": cfg, "notebook": executed, "tmp": tmp, "printed": printed.getvalue(),
           "config": tiny_config}


def code_cells(notebook) -> list:
    return [c for c in notebook.cells if c.cell_type == "code"]


def outputs(notebook) -> list:
    return [o for c in code_cells(notebook) for o in c.get("outputs", [])]


def cell_text(cell) -> str:
    """Everything a cell printed or showed as text."""
    parts = []
    for output in cell.get("outputs", []):
        if output.output_type == "stream":
            parts.append(output.text)
        elif "text/plain" in output.get("data", {}):
            parts.append(output.data["text/plain"])
    return "".join(parts)


def test_run_writes_into_the_temporary_folder_only(tiny_run):
    run_dir = tiny_run["result"]["run_dir"]
    assert run_dir == tiny_run["tmp"] / "runs" / "tiny"
    assert tiny_run["result"]["notebook"] == run_dir / "module_notebook.ipynb"
    assert (tiny_run["tmp"] / "input" / "train_ship_segmentations_v2.csv").is_file()
    assert (run_dir / "config.yaml").is_file()


def test_every_code_cell_ran_in_order_without_an_error(tiny_run):
    notebook = tiny_run["notebook"]
    cells = code_cells(notebook)
    errors = [(k, o.get("ename"), o.get("evalue")) for k, c in enumerate(cells) for o in c.get("outputs", [])
              if o.output_type == "error"]
    assert not errors, f"cells with error outputs: {errors}"
    counts = [c.execution_count for c in cells]
    assert all(isinstance(n, int) for n in counts), f"not every code cell ran: {counts}"
    assert counts == sorted(counts)
    assert not notebook.metadata.get("papermill", {}).get("exception")
    tracebacks = [k for k, c in enumerate(cells) if "Traceback (most recent call last)" in cell_text(c)]
    assert not tracebacks, f"cells printing a traceback: {tracebacks}"


def test_papermill_injected_the_parameters_after_the_parameters_cell(tiny_run):
    cells = code_cells(tiny_run["notebook"])
    tags = [c.metadata.get("tags", []) for c in cells]
    assert "parameters" in tags[0]
    assert "injected-parameters" in tags[1]
    assert str(tiny_run["config"]) in cells[1].source
    assert "FRESH = False" in cells[1].source  # run_notebook without --fresh continues the run


def test_pictures_tables_and_progress_bars_are_in_the_outputs(tiny_run):
    data = [o.get("data", {}) for o in outputs(tiny_run["notebook"])]
    png = sum("image/png" in d for d in data)
    tables = sum("<table" in d.get("text/html", "") for d in data)
    widgets = sum("application/vnd.jupyter.widget-view+json" in d for d in data)
    assert png >= 10, f"expected the notebook's pictures, found {png} PNG outputs"
    assert tables >= 3, f"expected the dataset summary, PR table and score tables, found {tables}"
    assert widgets >= 1, "no tqdm.auto progress bar rendered as a widget"


def test_submission_is_valid_and_the_notebook_says_so(tiny_run):
    cfg = tiny_run["cfg"]
    submission = tiny_run["result"]["run_dir"] / "submission" / "submission.csv"
    assert submission.is_file()
    ids = get_input_path(cfg, cfg.DATA.SAMPLE_SUBMISSION)
    size = cfg.DATA.IMAGE_SIZE
    assert validate_submission(submission, ids, (size, size)) == []
    validate_cell = next(c for c in code_cells(tiny_run["notebook"]) if "validate_submission(" in c.source)
    text = cell_text(validate_cell)
    assert f"VALID: {submission}" in text and "INVALID" not in text


def test_scores_json_holds_the_local_f2_and_the_baseline(tiny_run):
    scores = json.loads(get_scores_path(tiny_run["cfg"]).read_text())
    assert get_scores_path(tiny_run["cfg"]) == tiny_run["result"]["run_dir"] / "scores.json"
    assert scores == tiny_run["result"]["scores"] == run_notebook.read_scores(tiny_run["cfg"])
    assert 0.0 <= scores["f2"] <= 1.0
    assert 0.0 <= scores["all_empty_f2"] <= 1.0
    assert scores["n_images"] == tiny_run["cfg"].SYNTH.N_TEST
    assert {"per_threshold", "by_image_type", "recall_by_size", "per_image"} <= set(scores)


def test_html_report_and_tensorboard_events(tiny_run):
    result = tiny_run["result"]
    html = result["html"]
    assert html == result["run_dir"] / "module_notebook.html" and html.is_file()
    text = html.read_text(encoding="utf-8")
    assert "data:image/png;base64" in text and "Traceback (most recent call last)" not in text
    events = sorted((result["run_dir"] / "detector").glob("stage*/events.out.tfevents.*"))
    assert len(events) == len(tiny_run["cfg"].DETECTOR.STAGES)


def test_main_prints_the_score_the_baseline_and_where_to_look(tiny_run):
    printed, result = tiny_run["printed"], tiny_run["result"]
    scores = result["scores"]
    assert "local F2 (" in printed and f"{scores['f2']:.4f}" in printed
    assert f"all-empty baseline F2 (no ship predicted anywhere): {scores['all_empty_f2']:.4f}" in printed
    for path in (result["notebook"], result["html"], result["run_dir"] / "submission" / "submission.csv"):
        assert str(path) in printed


def test_fresh_is_a_command_line_flag_of_the_runner():
    parser = run_notebook.get_args_parser()
    assert not parser.parse_args([]).fresh and parser.parse_args(["--fresh"]).fresh
    assert parser.parse_args([]).config == "configs/airbus.yaml"


def test_a_failing_cell_still_saves_the_executed_notebook(tmp_path):
    """NotebookFailed names the cell, and the executed notebook (traceback included) is kept."""
    notebook = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("CONFIG = None\nOVERRIDES = []", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("x = 1"),
        nbformat.v4.new_code_cell("raise ValueError('boom')"),
    ], metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}})
    source = tmp_path / "failing.ipynb"
    nbformat.write(notebook, str(source))
    out = tmp_path / "out" / "failing.ipynb"
    with pytest.raises(run_notebook.NotebookFailed, match="ValueError: boom"):
        run_notebook.execute_notebook(source, out, {"CONFIG": "x", "OVERRIDES": []}, cwd=tmp_path)
    executed = nbformat.read(str(out), as_version=4)
    assert any(o.output_type == "error" for c in code_cells(executed) for o in c.get("outputs", []))
    assert not list(out.parent.glob(".*running*"))


# ---------------------------------------------------------------- the helpers the notebook calls
def test_validation_metrics_keep_each_stages_latest_run(tmp_path):
    """val_metrics.jsonl is appended to across runs: a stage's iteration going down starts a new run."""
    from module_plots import plot_validation_f2, read_validation_metrics

    records = [(1, 9, 0.1), (1, 19, 0.2), (2, 9, 0.3),  # a first run, stopped in stage 2
               (1, 9, 0.4), (1, 19, 0.5), (2, 9, 0.6), (2, 19, 0.7)]  # the run started over
    (tmp_path / "val_metrics.jsonl").write_text("".join(
        json.dumps({"stage": s, "input_size": 32 * s, "iteration": i, "f2": f, "f2_ships": f / 2, "f2_empty": 1.0,
                    "f2_all_empty_baseline": 0.75, "n_images": 8}) + "\n" for s, i, f in records))
    frame = read_validation_metrics(tmp_path)
    assert frame[["stage", "iteration", "f2"]].values.tolist() == [[1, 9, 0.4], [1, 19, 0.5], [2, 9, 0.6], [2, 19, 0.7]]
    assert plot_validation_f2(frame).axes[0].lines  # draws
    assert read_validation_metrics(tmp_path / "missing").empty
    assert not plot_validation_f2(read_validation_metrics(tmp_path / "missing")).axes[0].lines


def test_stage_metrics_are_read_in_stage_order_without_set_aside_runs(tmp_path):
    from module_plots import read_stage_metrics

    for name, loss in (("stage10_96", 3.0), ("stage2_64", 2.0), ("stage1_32", 1.0), ("stage1_32.old-20260101-000000", 9.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text(json.dumps({"iteration": 0, "total_loss": loss}) + "\n")
    (tmp_path / "stage3_128").mkdir()  # no metrics.json yet
    metrics = read_stage_metrics(tmp_path)
    assert list(metrics) == ["stage1_32", "stage2_64", "stage10_96"]
    assert [m["total_loss"].item() for m in metrics.values()] == [1.0, 2.0, 3.0]


def test_write_scores_without_truth_removes_a_stale_file(tiny_cfg):
    cfg = tiny_cfg()
    get_scores_path(cfg).write_text('{"f2": 0.5}')
    assert run_notebook.read_scores(cfg) == {"f2": 0.5}
    assert run_notebook.write_scores(cfg, None, what="test images") is None
    assert run_notebook.read_scores(cfg) is None and not get_scores_path(cfg).exists()


def test_write_scores_keeps_the_f2_and_the_all_empty_baseline(tiny_cfg):
    import module_metric

    cfg = tiny_cfg()
    truth = pd.DataFrame({"ImageId": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "EncodedPixels": ["1 3", "", "", "5 2"]})
    submission = pd.DataFrame({"ImageId": ["a.jpg", "b.jpg", "c.jpg", "d.jpg"], "EncodedPixels": ["1 3", "", "1 1", ""]})
    result = module_metric.score_submission(submission, truth, shape=(4, 4))
    path = run_notebook.write_scores(cfg, result, what="hand-made images")
    assert path == get_scores_path(cfg)
    scores = run_notebook.read_scores(cfg)
    assert scores["f2"] == pytest.approx((1 + 1 + 0 + 0) / 4) and scores["what"] == "hand-made images"
    assert scores["all_empty_f2"] == 0.5  # b and c are ship-free


def test_submission_overlays_with_and_without_truth(tmp_path):
    """Two 6x5 images: the predicted mask is drawn where the Kaggle RLE (column-major) puts it."""
    from PIL import Image

    from module_plots import plot_submission_overlays

    for name in ("a.png", "b.png"):
        Image.fromarray(np.zeros((6, 5, 3), np.uint8)).save(tmp_path / name)
    submission = pd.DataFrame({"ImageId": ["a.png", "b.png"], "EncodedPixels": ["2 3", ""]})  # a: column 0, rows 1-3
    truth = pd.DataFrame({"ImageId": ["a.png", "b.png"], "EncodedPixels": ["2 3", ""]})
    fig = plot_submission_overlays(submission, tmp_path, truth=truth, count=2)
    shown = fig.axes[0].images[0].get_array()
    filled = shown[..., 0] > shown[..., 1]  # red fill (outlines are green)
    assert filled[1:4, 0].all() and not filled[0, :].any() and not filled[:, 1:].any()
    assert "F2 1.00" in fig.axes[0].get_title() and "F2 1.00" in fig.axes[1].get_title()
    assert "F2" not in plot_submission_overlays(submission, tmp_path, count=2).axes[0].get_title()
