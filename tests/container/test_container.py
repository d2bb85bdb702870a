"""The Docker image, built and run for real: `make docker-test` (not part of `make test`).

What `docker compose up --build` does, done with the tools a machine without a Docker daemon has
(Debian packages only), and where this differs from Docker it says so:

- **Base image**: a stand-in for ``python:3.11-slim-bookworm``, which cannot be pulled here, built
  with ``debootstrap --variant=minbase bookworm`` plus ``python3.11``, ``python3.11-venv``,
  ``python3-pip`` and ``ca-certificates`` (Debian 12's Python, 3.11.2, where the official image
  has the latest 3.11), ``python`` linked to ``python3.11``. It is cached in buildah's local
  storage as ``localhost/airbus-standin-python:<hash of its recipe>``; a changed recipe builds a
  new one and drops the old tags.
- **Build**: ``buildah build`` instead of ``docker build``, with ``--isolation chroot --network
  host`` (no daemon, no container runtime needed), ``--layers`` (cached between runs like
  Docker's), ``--format docker`` (keeps the HEALTHCHECK), ``--build-arg BASE_IMAGE=<stand-in>``,
  ``--build-arg PREFETCH_WEIGHTS=0`` (the weight hosts are out of reach here: this is the offline
  build), ``--build-arg UID=1000`` (a non-root user whatever runs the test), and the machine's CA
  bundle mounted read-only over the image's own (``--volume``), for pip and the detectron2
  installer behind TLS-inspecting networks; it is not part of the image.
- **Run**: ``buildah run --isolation chroot --network host`` instead of ``docker run`` (``podman
  run`` fails on such machines: ``crun: setrlimit RLIMIT_NOFILE: Operation not permitted``), so
  the ports are the host's own (8888 and 6006 must be free) and there is no ``init``; the command
  is the image's ENTRYPOINT, read from the image. The mounts are compose's: the checkout at
  ``/workspace``, and temporary folders owned by the UID at ``/workspace/runs`` and
  ``/workspace/input`` (compose mounts ``./runs`` and ``./input``), so nothing is written into
  the checkout.

Containers are removed at the end (also ones an interrupted run left); images stay cached.
Logs go to ``runs/test-artifacts/container/``. With Docker, the README's Docker section shows
the same checks.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import nbformat
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tools"))
import install_detectron2  # noqa: E402

ARTIFACTS = ROOT / "runs" / "test-artifacts" / "container"
IMAGE = "localhost/airbus-ship-detection:docker-test"
UID = 1000  # the image's user (--build-arg UID): not root, whoever runs the test
CONTAINER_PREFIX = "airbus-docker-test-"
CA_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"  # Debian's path, in the host and in the image
RUN_FLAGS = ["--isolation", "chroot", "--network", "host"]
LAB_PORT, TENSORBOARD_PORT = 8888, 6006  # docker/entrypoint.sh's; host networking: the host's ports
TINY_RUN = "tiny"  # configs/tiny.yaml's PATHS.RUN_NAME
WEIGHT_PATHS = [  # configs/airbus.yaml's pretrained weights in the image (the README's table)
    "/home/airbus/.torch/iopath_cache/detectron2/COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/137849600/"
    "model_final_f10217.pkl",
    "/home/airbus/.cache/torch/hub/checkpoints/resnet34-b627a593.pth",
]
COCO_WEIGHTS = "detectron2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl"

# The stand-in base image; every field goes into its tag, so a change builds a new one.
BASE_REPO = "localhost/airbus-standin-python"
BASE_RECIPE = {
    "debootstrap": ["--variant=minbase", "--include=python3.11,python3.11-venv,python3-pip,ca-certificates",
                    "bookworm"],
    "mirror": "http://deb.debian.org/debian",
    "links": {"/usr/bin/python": "python3.11"},  # the official image has `python`
    "removed": ["var/cache/apt/archives/*.deb", "var/lib/apt/lists/*"],
    "env": {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"},
    "cmd": ["python3"],
}
DEBIAN_12_PYTHON = "3.11.2"

pytestmark = pytest.mark.skipif(
    os.environ.get("AIRBUS_DOCKER_TEST") != "1",
    reason="builds and runs the Docker image (~8 min on a fresh machine): run `make docker-test`",
)


def buildah(*args: str, timeout: float = 600, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(["buildah", *args], capture_output=True, text=True, timeout=timeout,
                            stdin=subprocess.DEVNULL)
    if check and result.returncode != 0:
        raise RuntimeError(f"buildah {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def image_id(name: str) -> str | None:
    result = buildah("inspect", "--type", "image", "--format", "{{.FromImageID}}", name, check=False)
    return result.stdout.strip() if result.returncode == 0 else None


def image_exists(name: str) -> bool:
    return image_id(name) is not None


def image_config(name: str) -> dict:
    """The image's config (User, Entrypoint, Env, ...), as `docker inspect` shows it."""
    return json.loads(buildah("inspect", "--type", "image", name).stdout)["Docker"]["config"]


def image_size(name: str) -> str:
    """The uncompressed size, as `docker images` shows it (e.g. "7.6 GB")."""
    return buildah("images", "--format", "{{.Size}}", name).stdout.strip()


def remove_containers(names: list[str]) -> None:
    for name in names:
        buildah("rm", name, check=False)


def our_containers() -> list[str]:
    out = buildah("containers", "--format", "{{.ContainerName}}").stdout
    return [name for name in out.split() if name.startswith(CONTAINER_PREFIX)]


def port_in_use(port: int) -> bool:
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def http_get(url: str, headers: dict | None = None, timeout: float = 10) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


def owned_folder(path: Path) -> Path:
    """``path`` created and owned by the image's user, as compose's bind-mounted ./runs is."""
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, UID)
    return path


@pytest.fixture(scope="session")
def container_tools():
    missing = [tool for tool in ("buildah", "debootstrap") if shutil.which(tool) is None]
    if missing:
        pytest.fail(f"{missing} not installed: run `make docker-test` (as root it apt-get installs them)")
    if os.geteuid() != 0:
        pytest.fail("the container test needs root (debootstrap, buildah's chroot isolation)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    remove_containers(our_containers())  # left by an interrupted run
    yield
    remove_containers(our_containers())
    leftover = our_containers()
    assert not leftover, f"containers left behind: {leftover}"


@pytest.fixture(scope="session")
def base_image(container_tools) -> str:
    """The Debian 12 stand-in for python:3.11-slim-bookworm, built once per recipe."""
    tag = hashlib.sha256(json.dumps(BASE_RECIPE, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{BASE_REPO}:{tag}"
    if image_exists(name):
        print(f"\nbase image: {name} (cached)")
        return name
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="airbus-standin-", dir="/var/tmp") as tmp:
        rootfs = Path(tmp) / "rootfs"
        with open(ARTIFACTS / "debootstrap.log", "w") as log:
            subprocess.run(["debootstrap", *BASE_RECIPE["debootstrap"], str(rootfs), BASE_RECIPE["mirror"]],
                           stdout=log, stderr=subprocess.STDOUT, check=True, timeout=1200)
        for link, target in BASE_RECIPE["links"].items():
            (rootfs / link.lstrip("/")).symlink_to(target)
        for pattern in BASE_RECIPE["removed"]:
            for path in rootfs.glob(pattern):
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()
        archive = Path(tmp) / "rootfs.tar"
        subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(archive), "."], check=True)
        working = buildah("from", "--name", f"{CONTAINER_PREFIX}base", "scratch").stdout.strip()
        try:
            buildah("add", working, str(archive), "/")  # a local tar is unpacked, owners kept
            config = [arg for key, value in BASE_RECIPE["env"].items() for arg in ("--env", f"{key}={value}")]
            buildah("config", *config, "--cmd", json.dumps(BASE_RECIPE["cmd"]), working)
            buildah("commit", working, name)
        finally:
            remove_containers([working])
    stale = buildah("images", "--format", "{{.Name}}:{{.Tag}}", BASE_REPO, check=False).stdout.split()
    for old in set(stale) - {name}:
        buildah("rmi", old, check=False)
    print(f"\nbase image: {name} built in {time.monotonic() - started:.0f} s")
    return name


@pytest.fixture(scope="session")
def image(base_image) -> str:
    """The project's Dockerfile built with buildah on the stand-in, offline (PREFETCH_WEIGHTS=0)."""
    if not Path(CA_BUNDLE).is_file():
        pytest.fail(f"{CA_BUNDLE} missing: install ca-certificates")
    command = [
        "buildah", "build", *RUN_FLAGS, "--layers", "--format", "docker", "--pull=never",
        "--volume", f"{CA_BUNDLE}:{CA_BUNDLE}:ro",
        "--build-arg", f"BASE_IMAGE={base_image}", "--build-arg", "PREFETCH_WEIGHTS=0",
        "--build-arg", f"UID={UID}", "--tag", IMAGE, "--file", str(ROOT / "Dockerfile"), str(ROOT),
    ]
    log = ARTIFACTS / "build.log"
    previous = image_id(IMAGE)
    started = time.monotonic()
    with open(log, "w") as out:
        result = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                timeout=3600)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, f"build failed after {elapsed:.0f} s; log {log}:\n{log.read_text()[-4000:]}"
    cached = log.read_text().count("Using cache")
    if previous and previous != image_id(IMAGE):  # untagged now; the layer cache does not need it
        buildah("rmi", previous, check=False)
    print(f"\nimage: {IMAGE} built in {elapsed:.0f} s ({cached} steps from the cache), "
          f"{image_size(IMAGE)}; log {log}")
    return IMAGE


@contextlib.contextmanager
def container(image_name: str, role: str):
    """A fresh working container from ``image_name``, removed afterwards."""
    name = buildah("from", "--pull=never", "--name", f"{CONTAINER_PREFIX}{role}-{os.getpid()}",
                   image_name).stdout.strip()
    try:
        yield name
    finally:
        remove_containers([name])


def run_command(name: str, command: list[str], volumes: dict[Path, str] | None = None,
                env: dict[str, str] | None = None) -> list[str]:
    """`buildah run` of ``command`` in the container ``name``; ``volumes``: {host path: "target[:ro]"}."""
    args = ["buildah", "run", *RUN_FLAGS]
    for source, target in (volumes or {}).items():
        args += ["--volume", f"{source}:{target}"]
    for key, value in (env or {}).items():
        args += ["--env", f"{key}={value}"]
    return [*args, name, "--", *command]


def run_in(name: str, *command: str, volumes: dict[Path, str] | None = None,
           timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(run_command(name, list(command), volumes), capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="session")
def entrypoint(image) -> list[str]:
    return image_config(image)["Entrypoint"]


@pytest.fixture(scope="session")
def workspace(tmp_path_factory) -> dict[Path, str]:
    """Compose's mounts: the checkout at /workspace, ./runs and ./input (here temporary, UID's)."""
    tmp = tmp_path_factory.mktemp("workspace")
    tmp.chmod(0o755)
    return {ROOT: "/workspace", owned_folder(tmp / "runs"): "/workspace/runs",
            owned_folder(tmp / "input"): "/workspace/input"}


def test_image_python_is_debian_12s_and_detectron2_came_through_the_fallback_unpacking(image):
    """Debian 12's python3.11 (3.11.2) has no tarfile data filter: the installer's fallback ran."""
    code = ("import sys, tarfile; sys.path.insert(0, 'tools'); import install_detectron2 as i; "
            "print(sys.version.split()[0], hasattr(tarfile, 'data_filter'), i.installed_patch_version())")
    with container(image, "python") as name:
        result = run_in(name, "python", "-c", code)
    assert result.returncode == 0, result.stderr
    version, has_filter, patch = result.stdout.split()
    print(f"Python in the image: {version}; tarfile data filter: {has_filter}; detectron2 patch: {patch}")
    assert version == DEBIAN_12_PYTHON and has_filter == "False"
    assert patch == install_detectron2.PATCH_VERSION


def test_libraries_import_in_the_image(image):
    code = ("import torch, torchvision, detectron2, fastai, cv2, pycocotools.mask, numba, tensorboard, "
            "jupyterlab, papermill; from detectron2 import model_zoo; "
            "print(torch.__version__, detectron2.__version__, fastai.__version__, cv2.__version__, "
            "numba.__version__)")
    with container(image, "imports") as name:
        result = run_in(name, "python", "-c", code)
    assert result.returncode == 0, result.stderr[-3000:]
    print(f"in the image: torch, detectron2, fastai, cv2, numba = {result.stdout.split()}")
    assert "+cu" in result.stdout.split()[0], "the image should carry PyPI's CUDA build of torch"


def test_image_runs_as_the_non_root_user(image):
    config = image_config(image)
    assert config["User"] == f"{UID}:{UID}", config["User"]
    with container(image, "user") as name:
        result = run_in(name, "sh", "-c", 'id; echo "HOME=$HOME"')
    print(result.stdout.strip())
    assert result.returncode == 0, result.stderr
    assert f"uid={UID}(airbus) gid={UID}(airbus)" in result.stdout
    assert "HOME=/home/airbus" in result.stdout


def test_offline_image_has_no_weights_and_the_check_names_each_file(image):
    """PREFETCH_WEIGHTS=0: `prefetch_weights.py --check` names both files and their cache paths."""
    with container(image, "weights") as name:
        result = run_in(name, "python", "tools/prefetch_weights.py", "--check", "--config", "configs/airbus.yaml")
    assert result.returncode == 1, result.stdout + result.stderr
    for path in WEIGHT_PATHS:
        assert f"missing: {path}" in result.stdout, result.stdout


def test_weights_mounted_at_their_paths_are_found(image, tmp_path):
    """The README's offline recipe: the two files mounted read-only, one by one, at their paths."""
    volumes = {}
    for path in WEIGHT_PATHS:
        stand_in = tmp_path / Path(path).name
        stand_in.write_bytes(b"stand-in for the weights")
        stand_in.chmod(0o644)
        volumes[stand_in] = f"{path}:ro"
    code = f"from detectron2.utils.file_io import PathManager; print(PathManager.get_local_path({COCO_WEIGHTS!r}))"
    with container(image, "mounted-weights") as name:
        check = run_in(name, "python", "tools/prefetch_weights.py", "--check", "--config", "configs/airbus.yaml",
                       volumes=volumes)
        found = run_in(name, "python", "-c", code, volumes=volumes)  # iopath locks in the file's folder
    assert check.returncode == 0 and "pretrained weights present" in check.stdout, check.stdout + check.stderr
    assert found.returncode == 0, found.stderr[-3000:]
    assert found.stdout.strip().splitlines()[-1] == WEIGHT_PATHS[0]


class Lab:
    """The entrypoint running in a container: JupyterLab on 8888, TensorBoard on 6006."""

    def __init__(self, process: subprocess.Popen, token: str, log: Path):
        self.process, self.token, self.log = process, token, log

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, url: str, timeout_s: float = 240) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the entrypoint exited with {self.process.returncode}:\n{self.output()[-4000:]}")
            with contextlib.suppress(OSError):
                if http_get(url, timeout=5)[0] == 200:
                    return
            time.sleep(1)
        raise TimeoutError(f"{url} did not answer in {timeout_s} s:\n{self.output()[-4000:]}")

    def stop(self) -> None:
        """SIGTERM to the process group the test started (buildah run and all it runs), then SIGKILL."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)


@pytest.fixture(scope="module")
def lab(image, entrypoint, workspace):
    busy = [port for port in (LAB_PORT, TENSORBOARD_PORT) if port_in_use(port)]
    if busy:
        pytest.fail(f"port(s) {busy} already in use on this machine; `buildah run` shares the host's network")
    token = secrets.token_hex(16)
    log = ARTIFACTS / "entrypoint.log"
    with container(image, "lab") as name, open(log, "w") as out:
        command = run_command(name, entrypoint, workspace, env={"JUPYTER_TOKEN": token})
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   start_new_session=True)  # its own process group: stopped as one
        lab = Lab(process, token, log)
        try:
            started = time.monotonic()
            lab.wait_for(f"http://127.0.0.1:{LAB_PORT}/api")
            lab.wait_for(f"http://127.0.0.1:{TENSORBOARD_PORT}/data/environment")
            print(f"\nentrypoint: JupyterLab and TensorBoard answered after {time.monotonic() - started:.0f} s")
            yield lab
        finally:
            lab.stop()
            print(f"entrypoint stopped; log {log}")


def test_jupyterlab_answers_with_the_token_and_refuses_without(lab):
    url = f"http://127.0.0.1:{LAB_PORT}/api/contents"
    status, body = http_get(url, headers={"Authorization": f"token {lab.token}"})
    assert status == 200, body[:500]
    names = {item["name"] for item in json.loads(body)["content"]}
    assert {"module_notebook.ipynb", "tensorboard.ipynb", "runs"} <= names, names  # the mounted checkout
    assert http_get(f"{url}?token={lab.token}")[0] == 200
    for headers in ({}, {"Authorization": f"token {secrets.token_hex(16)}"}):
        status, _ = http_get(url, headers=headers)
        assert status == 403, f"the Lab answered {status} to a request without the token"


def test_tensorboard_answers_on_runs(lab):
    status, body = http_get(f"http://127.0.0.1:{TENSORBOARD_PORT}/data/environment")
    assert status == 200
    assert json.loads(body)["data_location"] == "/workspace/runs"


def test_entrypoint_servers_run_as_the_non_root_user(lab):
    """With chroot isolation the container's processes are the host's: read their real UIDs."""
    servers = {}
    for process in psutil.Process(lab.process.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            cmdline = process.cmdline()  # [/opt/venv/bin/python, /opt/venv/bin/jupyter-lab, ...]
            program = Path(cmdline[1]).name if len(cmdline) > 1 else ""
            if program in ("jupyter-lab", "tensorboard"):
                servers[program] = process.uids().real
    print(f"server processes and their UIDs: {servers}")
    assert servers == {"jupyter-lab": UID, "tensorboard": UID}


def test_entrypoint_names_the_missing_weights_and_starts_the_lab_anyway(lab):
    output = lab.output()
    for path in WEIGHT_PATHS:
        assert f"missing: {path}" in output, output[-3000:]
    assert lab.process.poll() is None


def test_tensorboard_notebook_reuses_the_entrypoints_server(lab, image, workspace):
    """tensorboard.ipynb in the container shows the server on 6006 and starts no second one."""
    with container(image, "tensorboard-notebook") as name:
        result = run_in(name, "python", "-m", "papermill", "tensorboard.ipynb", "runs/tensorboard.ipynb",
                        volumes=workspace, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = next(source for source, target in workspace.items() if target == "/workspace/runs")
    outputs = nbformat.read(str(runs / "tensorboard.ipynb"), as_version=4).cells[-1].outputs
    text = "".join(o.get("text", "") for o in outputs)
    html = "".join(o.get("data", {}).get("text/html", "") for o in outputs)
    assert f"TensorBoard on port {TENSORBOARD_PORT} (reused), serving /workspace/runs" in text, text
    assert f"const port = {TENSORBOARD_PORT};" in html


def test_tiny_pipeline_runs_headless_and_writes_as_the_user(image, entrypoint, workspace):
    """`python run_notebook.py --config configs/tiny.yaml` in the container, the checkout mounted."""
    runs = next(source for source, target in workspace.items() if target == "/workspace/runs")
    started = time.monotonic()
    with container(image, "tiny") as name:
        result = run_in(name, *entrypoint, "python", "run_notebook.py", "--config", "configs/tiny.yaml",
                        volumes=workspace, timeout=1200)
    elapsed = time.monotonic() - started
    run_dir = runs / TINY_RUN
    (ARTIFACTS / "tiny-run.log").write_text(result.stdout + result.stderr)
    assert result.returncode == 0, (f"tiny run failed after {elapsed:.0f} s (executed notebook, warnings included: "
                                    f"{run_dir / 'module_notebook.ipynb'}):\n{(result.stdout + result.stderr)[-4000:]}")
    print(f"tiny pipeline in the container: {elapsed:.0f} s\n{result.stdout[-800:]}")
    scores = json.loads((run_dir / "scores.json").read_text())
    assert 0 <= scores["f2"] <= 1
    written = [run_dir / "scores.json", run_dir / "module_notebook.ipynb", run_dir / "module_notebook.html"]
    for path in written:
        assert path.is_file(), path
    owners = {path.stat().st_uid for path in run_dir.rglob("*")} | {run_dir.stat().st_uid}
    print(f"owners of the {len(list(run_dir.rglob('*')))} paths under runs/{TINY_RUN}: {owners}")
    assert owners == {UID} and 0 not in owners
