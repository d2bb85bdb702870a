"""The notebook and TensorBoard, driven in a real browser (Debian's Chromium through Playwright).

- JupyterLab runs on 127.0.0.1 with a token, temporary settings/workspace/runtime folders and the
  news popup silenced (``share/jupyter/lab/settings/overrides.json`` in the environment's prefix).
  The test opens ``module_notebook.ipynb``, clicks Run > Run All Cells, waits for every cell, and
  asserts that outputs (pictures, tables, progress bars) render and no cell shows an error. The
  notebook runs on ``configs/tiny.yaml`` (a few 64 px synthetic images, a few iterations): a copy
  with papermill's parameter injection sits in a temporary folder that is the server's root, so
  the run writes nothing into the checkout.
- TensorBoard serves that run's ``runs/`` folder; the scalars page must show the training curves.
- ``tensorboard.ipynb``, the side notebook, is opened and run in the same JupyterLab on that
  ``runs/``: with nothing on its ``PORT`` it starts a TensorBoard through the ``%tensorboard``
  magic on ``FALLBACK_PORT``; with a TensorBoard already there (the container's entrypoint's) it
  shows that one and starts none. Either way the dashboard must render in the output's iframe.

Screenshots go to ``runs/test-artifacts/browser/`` (printed). Servers are stopped by PID.
Skips with a reason where ``/usr/bin/chromium`` is missing (``make system-deps`` installs it).
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-quic"]
ARTIFACTS = ROOT / "runs" / "test-artifacts" / "browser"
TINY_CONFIG = ROOT / "configs" / "tiny.yaml"
NOTEBOOK = ROOT / "module_notebook.ipynb"
TENSORBOARD_NOTEBOOK = ROOT / "tensorboard.ipynb"
RUN_ALL_TIMEOUT_S = 420
LAB_OVERRIDES = ROOT / "docker" / "overrides.json"  # the same file the Docker image installs

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not CHROMIUM.exists(), reason=f"{CHROMIUM} missing: run `make system-deps` "
                       "(apt-get install chromium) to enable the browser tests"),
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}; log {log}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s; log {log}:\n{log.read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    """Stop a server we started, by its PID: SIGTERM, then SIGKILL after 20 s."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


def silence_lab_news() -> Path:
    """Merge docker/overrides.json into ``<prefix>/share/jupyter/lab/settings/overrides.json``."""
    target = Path(sys.prefix) / "share" / "jupyter" / "lab" / "settings" / "overrides.json"
    current = json.loads(target.read_text()) if target.is_file() else {}
    wanted = json.loads(LAB_OVERRIDES.read_text())
    merged = {**current, **{k: {**current.get(k, {}), **v} for k, v in wanted.items()}}
    if merged != current:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(merged, indent=2) + "\n")
    return target


def write_parameterized_notebook(folder: Path, config: Path) -> Path:
    """The repo's notebook with papermill's parameter injection (CONFIG = ``config``), in ``folder``."""
    return write_notebook(NOTEBOOK, folder / NOTEBOOK.name, {"CONFIG": str(config), "OVERRIDES": []})


def write_notebook(source: Path, out: Path, parameters: dict) -> Path:
    """``source`` with papermill's parameter injection of ``parameters``, written to ``out``."""
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    notebook = parameterize_notebook(load_notebook_node(str(source)), parameters)
    nbformat.write(notebook, str(out))
    return out


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {ARTIFACTS}")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def lab_server(tmp_path_factory):
    """JupyterLab on 127.0.0.1 with a token, rooted in a fresh folder; yields (url, token, root)."""
    root = tmp_path_factory.mktemp("lab-root")
    home = tmp_path_factory.mktemp("lab-home")
    settings = home / "user-settings"
    # Deterministic UI: every cell rendered (no windowing), no autosave racing the test's save.
    (settings / "@jupyterlab" / "notebook-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "notebook-extension" / "tracker.jupyterlab-settings").write_text(
        json.dumps({"windowingMode": "none"}))
    (settings / "@jupyterlab" / "docmanager-extension").mkdir(parents=True)
    (settings / "@jupyterlab" / "docmanager-extension" / "plugin.jupyterlab-settings").write_text(
        json.dumps({"autosave": False}))
    silence_lab_news()
    token = secrets.token_hex(16)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "JUPYTER_CONFIG_DIR": str(home / "config"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "IPYTHONDIR": str(home / "ipython"), "OMP_NUM_THREADS": "1", "MPLBACKEND": ""}
    env.pop("MPLBACKEND")
    log = home / "jupyterlab.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
             f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
             f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={home / 'workspaces'}"]
            + (["--allow-root"] if os.geteuid() == 0 else []),  # CI containers run as root
            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=root,
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/api/status?token={token}", process, log)
        yield url, token, root
    finally:
        stop(process)
        print(f"JupyterLab (pid {process.pid}) stopped; log {log}")


def wait_for_kernel_idle(page, timeout_s: float) -> None:
    """Wait until the status bar reads "<kernel> | Idle" (the kernel started and answered)."""
    page.locator(".jp-StatusBar-Widget", has_text="| Idle").first.wait_for(timeout=timeout_s * 1000)


def code_cell_prompts(page) -> list[str]:
    return page.locator(".jp-NotebookPanel:visible .jp-CodeCell .jp-InputArea-prompt").all_inner_texts()


def open_and_run_all(page, url: str, token: str, notebook: Path, timeout_s: float = RUN_ALL_TIMEOUT_S,
                     workspace: str | None = None) -> tuple[list[str], float]:
    """Open ``notebook`` (in the Lab's root) in JupyterLab, click Run > Run All Cells, wait for the
    last cell or the first error; return the cells' prompts and the seconds Run All took.
    ``workspace``: a fresh named one, so that no notebook opened before is restored next to it."""
    n_code = sum(c.cell_type == "code" for c in nbformat.read(str(notebook), as_version=4).cells)
    lab = f"{url}/lab/workspaces/{workspace}" if workspace else f"{url}/lab"
    page.goto(f"{lab}/tree/{notebook.name}?token={token}", wait_until="domcontentloaded")
    wait_for_kernel_idle(page, timeout_s=90)
    page.screenshot(path=str(ARTIFACTS / f"lab-opened-{notebook.stem}.png"))

    page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text="Run").first.click()
    page.locator(".lm-Menu-item:visible .lm-Menu-itemLabel").get_by_text("Run All Cells", exact=True).click()
    started = time.monotonic()
    prompts: list[str] = []
    while time.monotonic() - started < timeout_s:
        if page.locator(".jp-Dialog").count():  # e.g. a kernel prompt: fail now with a picture
            page.screenshot(path=str(ARTIFACTS / "lab-dialog.png"))
            raise AssertionError(f"unexpected dialog: {page.locator('.jp-Dialog').inner_text()!r}")
        prompts = code_cell_prompts(page)
        finished = len(prompts) == n_code and all(p.strip("[]: ").isdigit() for p in prompts)
        # Run All stops at the first error: the cells after it keep an empty or "*" prompt
        failed = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                              has_text="Traceback").count() > 0
        if finished or failed:
            break
        time.sleep(2)
    wait_for_kernel_idle(page, timeout_s=60)
    return prompts, time.monotonic() - started


@pytest.fixture(scope="module")
def lab_run_all(lab_server, browser):
    """Open the notebook in JupyterLab, Run All, save; yields what the page and the saved file show."""
    url, token, root = lab_server
    notebook = write_parameterized_notebook(root, TINY_CONFIG)
    n_code = sum(c.cell_type == "code" for c in nbformat.read(str(notebook), as_version=4).cells)
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    console_errors: list[str] = []
    page.on("console", lambda msg: console_errors.append(msg.text) if msg.type == "error" else None)
    prompts, elapsed = open_and_run_all(page, url, token, notebook)

    cells = page.locator(".jp-NotebookPanel:visible .jp-Cell")
    shots = []
    for k in range(cells.count()):  # one screenshot per cell with a picture or a widget
        cell = cells.nth(k)
        if cell.locator(".jp-RenderedImage img, .widget-hprogress").count():
            cell.scroll_into_view_if_needed()
            path = ARTIFACTS / f"lab-cell-{k:02d}.png"
            cell.screenshot(path=str(path))
            shots.append(path)
    page.screenshot(path=str(ARTIFACTS / "lab-after-run-all.png"))
    dom = {
        "prompts": prompts,
        "images": page.locator(".jp-OutputArea .jp-RenderedImage img").count(),
        "tables": page.locator(".jp-OutputArea-output table").count(),
        "progress_bars": page.locator(".jp-OutputArea-output .widget-hprogress").count(),
        "tracebacks": page.locator(".jp-OutputArea-output", has_text="Traceback (most recent call last)").count(),
        "elapsed_s": elapsed,
        "screenshots": shots,
        "console_errors": console_errors,
    }
    # Save through the UI, then read what JupyterLab wrote: the outputs as the notebook has them.
    mtime = notebook.stat().st_mtime
    page.locator(".jp-NotebookPanel:visible .jp-Notebook").first.click(position={"x": 5, "y": 5})
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + 60
    while notebook.stat().st_mtime == mtime and time.monotonic() < deadline:
        time.sleep(0.5)
    saved = nbformat.read(str(notebook), as_version=4)
    page.close()
    yield {"dom": dom, "saved": saved, "root": root, "n_code": n_code}


def test_jupyterlab_runs_the_notebook_top_to_bottom(lab_run_all):
    dom, saved, n_code = lab_run_all["dom"], lab_run_all["saved"], lab_run_all["n_code"]
    print(f"Run All took {dom['elapsed_s']:.0f} s; screenshots: {[p.name for p in dom['screenshots']]}")
    errors = [(k, o.get("ename"), o.get("evalue")) for k, c in enumerate(saved.cells) if c.cell_type == "code"
              for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, f"cells with error outputs: {errors}"
    assert dom["tracebacks"] == 0
    counts = [c.execution_count for c in saved.cells if c.cell_type == "code"]
    assert len(counts) == n_code and all(isinstance(n, int) for n in counts), f"not every cell ran: {counts}"
    assert counts == sorted(counts), "cells ran out of order"
    assert all(p.strip("[]: ").isdigit() for p in dom["prompts"]), dom["prompts"]


def test_jupyterlab_renders_pictures_tables_and_progress_bars(lab_run_all):
    dom, saved = lab_run_all["dom"], lab_run_all["saved"]
    png_outputs = sum("image/png" in o.get("data", {}) for c in saved.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert png_outputs >= 6, f"expected the notebook's pictures, found {png_outputs} PNG outputs"
    assert dom["images"] >= png_outputs, dom  # every PNG output is on the page
    assert dom["tables"] >= 2, dom  # dataset summary, PR table, score table
    assert dom["progress_bars"] >= 1, "tqdm.auto progress bars did not render as widgets"
    for path in dom["screenshots"]:
        assert path.stat().st_size > 5_000, f"{path} looks blank"


def test_tensorboard_scalars_page_shows_the_training_curves(lab_run_all, browser, tmp_path):
    runs = lab_run_all["root"] / "runs"
    events = sorted(runs.rglob("events.out.tfevents.*"))
    assert events, f"the notebook run wrote no TensorBoard event files under {runs}"
    port = free_port()
    log = tmp_path / "tensorboard.log"
    with open(log, "w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs), "--host", "127.0.0.1",
             "--port", str(port), "--load_fast", "false"],
            stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{url}/data/runs", process, log)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        # TensorBoard 2.21's scalars live on the Time Series dashboard, one card-view per tag
        page.goto(f"{url}/#timeseries", wait_until="domcontentloaded")
        tag = "total_loss"
        page.locator("card-view").first.wait_for(timeout=60_000)
        search = page.locator("input[placeholder='Filter tags (regex)']")  # cards render lazily: filter, then look
        search.fill("loss")
        page.locator("card-view", has_text="loss_mask").first.wait_for(timeout=60_000)
        n_cards = page.locator("card-view", has_text="loss").count()  # total, cls, box_reg, mask, rpn ...
        search.fill(tag)
        card = page.locator("card-view", has_text=tag).first
        card.wait_for(timeout=60_000)
        card.scroll_into_view_if_needed()
        page.wait_for_timeout(2000)  # let the line chart draw
        page.screenshot(path=str(ARTIFACTS / "tensorboard-scalars.png"))
        card.screenshot(path=str(ARTIFACTS / "tensorboard-total-loss.png"))
        text = page.locator("body").inner_text()
        assert tag in text
        assert n_cards >= 3, "expected several loss charts"
        # the chart is drawn (SVG or canvas), not an empty card
        assert card.locator("svg path, canvas").count() > 0
        runs_listed = json.loads(urllib.request.urlopen(f"{url}/data/runs", timeout=10).read())
        assert any("stage" in run or "detector" in run for run in runs_listed), runs_listed
        page.close()
    finally:
        stop(process)
        print(f"TensorBoard (pid {process.pid}) stopped; screenshots in {ARTIFACTS}")


SCALAR_RUN, SCALAR_TAGS = "tensorboard-notebook-test", ("side_notebook_loss", "side_notebook_lr")


@pytest.fixture(scope="module")
def scalar_runs(lab_server) -> Path:
    """The Lab root's ``runs/`` with a run of two curves (next to what the notebook wrote there)."""
    from torch.utils.tensorboard import SummaryWriter

    runs = lab_server[2] / "runs"
    with SummaryWriter(str(runs / SCALAR_RUN)) as writer:
        for step in range(20):
            for k, tag in enumerate(SCALAR_TAGS):
                writer.add_scalar(tag, 1.0 / (step + 1 + k), step)
    return runs


def tensorboard_servers() -> dict[int, int]:
    """{port: pid} of the TensorBoards this machine's user started (TensorBoard's own records)."""
    from tensorboard import manager

    return {info.port: info.pid for info in manager.get_all()}


def run_tensorboard_notebook(browser, lab_server, name: str, port: int, fallback_port: int):
    """tensorboard.ipynb with PORT/FALLBACK_PORT, run in JupyterLab; returns the page and the outputs."""
    url, token, root = lab_server
    notebook = write_notebook(TENSORBOARD_NOTEBOOK, root / f"{name}.ipynb",
                              {"PORT": port, "FALLBACK_PORT": fallback_port, "HEIGHT": 700})
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    prompts, elapsed = open_and_run_all(page, url, token, notebook, timeout_s=180, workspace=name)
    print(f"{notebook.name}: Run All took {elapsed:.0f} s, prompts {prompts}")
    outputs = page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output")
    assert page.locator(".jp-OutputArea-output", has_text="Traceback").count() == 0, outputs.all_inner_texts()
    return page, "\n".join(outputs.all_inner_texts())


def assert_dashboard_in_the_output_iframe(page, port: int, shot: str) -> None:
    """The output's iframe points at ``port``; TensorBoard's dashboard renders in it, with our run's chart."""
    iframe = page.locator(".jp-NotebookPanel:visible .jp-OutputArea-output iframe").first
    iframe.wait_for(timeout=60_000)
    iframe.scroll_into_view_if_needed()
    src = iframe.get_attribute("src") or ""
    assert src.rstrip("/").endswith(f":{port}"), src
    frame = page.frame_locator(".jp-NotebookPanel:visible .jp-OutputArea-output iframe").first
    frame.locator("card-view").first.wait_for(timeout=60_000)  # the Time Series dashboard's charts
    frame.locator("input[placeholder='Filter tags (regex)']").fill(SCALAR_TAGS[0])  # cards render lazily
    card = frame.locator("card-view", has_text=SCALAR_TAGS[0]).first
    card.wait_for(timeout=60_000)
    page.wait_for_timeout(2000)  # let the chart draw
    iframe.screenshot(path=str(ARTIFACTS / shot))
    text = frame.locator("body").inner_text()
    assert "TensorBoard" in text and SCALAR_RUN in text, text[:2000]
    assert card.locator("svg path, canvas").count() > 0, "the chart is not drawn"


def test_tensorboard_notebook_starts_its_own_server_when_none_answers(scalar_runs, lab_server, browser):
    """Outside the container: nothing on PORT, so %tensorboard serves runs/ on FALLBACK_PORT."""
    port, fallback = free_port(), free_port()  # nothing listens on `port`
    before = tensorboard_servers()
    page, text = run_tensorboard_notebook(browser, lab_server, "tensorboard-own", port, fallback)
    started = {p: pid for p, pid in tensorboard_servers().items() if p not in before}
    try:
        assert list(started) == [fallback], f"TensorBoards started by the notebook: {started}"
        assert "reused" not in text
        assert_dashboard_in_the_output_iframe(page, fallback, "tensorboard-notebook-own.png")
    finally:
        page.close()
        for pid in started.values():  # the magic's server outlives the page: stop it by its PID
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)


def test_tensorboard_notebook_reuses_a_running_server(scalar_runs, lab_server, browser, tmp_path):
    """In the container: the entrypoint's TensorBoard answers on PORT; it is shown, none is started."""
    runs = scalar_runs
    port, fallback = free_port(), free_port()
    log = tmp_path / "tensorboard.log"
    with open(log, "w") as out:  # stands for the entrypoint's server
        process = subprocess.Popen(
            [sys.executable, "-m", "tensorboard.main", "--logdir", str(runs), "--host", "127.0.0.1",
             "--port", str(port)], stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for_http(f"http://127.0.0.1:{port}/data/environment", process, log)
        before = tensorboard_servers()
        page, text = run_tensorboard_notebook(browser, lab_server, "tensorboard-reuse", port, fallback)
        try:
            assert f"TensorBoard on port {port} (reused), serving {runs}" in text, text
            assert tensorboard_servers().keys() <= before.keys(), "the notebook started a second TensorBoard"
            assert_dashboard_in_the_output_iframe(page, port, "tensorboard-notebook-reused.png")
        finally:
            page.close()
    finally:
        stop(process)
