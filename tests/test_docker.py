"""The Docker image and Compose file, checked without a Docker engine (none runs here).

The compose file is validated against the compose spec (check-jsonschema ships it, offline), the
Dockerfile is linted by hadolint, and what matters for users is asserted: GPU reservation, ports,
volumes, the install steps shared with `make setup`, the weight pre-fetch into the caches the
libraries really read, and the non-root user.
"""
from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
COCO_WEIGHTS = "detectron2://COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x/137849600/model_final_f10217.pkl"


def dockerfile_instructions(path: Path = ROOT / "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions, current = [], ""
    for line in path.read_text().splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.lstrip().startswith("#"):
            continue  # a comment inside a continued instruction
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            keyword, _, rest = current.strip().partition(" ")
            instructions.append((keyword.upper(), rest.strip()))
            current = ""
    return instructions


def interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Compose-style ``${VAR:-default}`` / ``${VAR}`` interpolation (the subset the file uses)."""
    env = env or {}

    def substitute(match: re.Match) -> str:
        name, op, default = match.group(1), match.group(2), match.group(3) or ""
        if op == ":-":
            return env.get(name) or default
        return env.get(name, "")

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", substitute, value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


@pytest.fixture(scope="module")
def lab(compose) -> dict:
    assert list(compose["services"]) == ["lab"]
    return compose["services"]["lab"]


def test_compose_file_is_valid_against_the_compose_spec():
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(ROOT / "docker-compose.yml")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_spec_check_rejects_a_broken_file(tmp_path):
    """The validator really checks: a misspelt key inside a service fails."""
    broken = tmp_path / "docker-compose.yml"
    broken.write_text((ROOT / "docker-compose.yml").read_text().replace("shm_size:", "shm_sise:"))
    result = subprocess.run(
        [str(BIN / "check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(broken)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "shm_sise" in result.stdout + result.stderr


def test_dockerfile_passes_hadolint():
    result = subprocess.run(
        [str(BIN / "hadolint"), "--failure-threshold", "error", "--no-color", str(ROOT / "Dockerfile")],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    print(result.stdout or "hadolint: no findings")


def test_compose_reserves_the_gpu(lab):
    devices = lab["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices), devices


def test_compose_shm_is_large_enough_for_data_loaders(lab):
    size = str(lab["shm_size"]).lower()
    value, unit = re.fullmatch(r"(\d+)\s*([kmg]?)b?", size).groups()
    assert int(value) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit] >= 2 * 2**30, size


def test_compose_publishes_jupyterlab_and_tensorboard(lab):
    targets = {interpolate(p).rsplit(":", 1)[-1] for p in lab["ports"]}
    assert targets == {"8888", "6006"}
    published = {interpolate(p).split(":")[-2] for p in lab["ports"]}
    assert published == {"8888", "6006"}


def test_compose_mounts_input_runs_and_the_code(lab):
    mounts = {}
    for volume in lab["volumes"]:
        source, target = interpolate(volume).split(":")[:2]
        mounts[target] = source
    assert mounts["/workspace"] == "."
    assert mounts["/workspace/input"] == "./input"
    assert mounts["/workspace/runs"] == "./runs"
    assert interpolate(lab["volumes"][1], {"AIRBUS_INPUT": "/data/airbus"}).startswith("/data/airbus:")


def test_compose_takes_the_jupyter_token_from_the_environment(lab):
    token = lab["environment"]["JUPYTER_TOKEN"]
    # `${VAR:?message}`: compose refuses to start without it, so the Lab is never tokenless.
    assert re.fullmatch(r"\$\{JUPYTER_TOKEN:\?.+\}", token), token


def test_dockerfile_installs_what_make_setup_installs():
    instructions = dockerfile_instructions()
    runs = [args for keyword, args in instructions if keyword == "RUN"]
    install = next(r for r in runs if "-r requirements.txt" in r)
    assert "tools/install_detectron2.py" in install
    pip_pin = re.search(r"pip==([\d.]+)", (ROOT / "Makefile").read_text()).group(1)
    assert f"pip=={pip_pin}" in install, "the image should use the pip version that `make setup` pins"
    copies = [args for keyword, args in instructions if keyword == "COPY"]
    assert any(c.split()[-2:] == ["requirements.txt", "/workspace/requirements.txt"] for c in copies)
    base = next(args for keyword, args in instructions if keyword == "FROM")
    assert base.startswith("python:3.11"), base


def test_dockerfile_prefetches_weights_as_the_non_root_user():
    instructions = dockerfile_instructions()
    users = [(i, args) for i, (keyword, args) in enumerate(instructions) if keyword == "USER"]
    assert users, "the image must not run as root"
    last_user = users[-1][1]
    assert last_user.split(":")[0] not in {"root", "0"}
    arg_uid = next(args for keyword, args in instructions if keyword == "ARG" and args.startswith("UID="))
    assert arg_uid != "UID=0"
    prefetch = [i for i, (keyword, args) in enumerate(instructions)
                if keyword == "RUN" and "tools/prefetch_weights.py" in args]
    assert prefetch and prefetch[0] > users[0][0], "weights must land in the user's home caches"
    assert "configs/airbus.yaml" in instructions[prefetch[0]][1]
    # nothing may move the caches away from where the prefetch put them
    envs = " ".join(args for keyword, args in instructions if keyword == "ENV")
    assert not re.search(r"\b(HOME|FVCORE_CACHE|TORCH_HOME|XDG_CACHE_HOME)=", envs)


def test_image_serves_jupyterlab_on_8888_and_tensorboard_on_runs():
    instructions = dockerfile_instructions()
    exposed = {port for keyword, args in instructions if keyword == "EXPOSE" for port in args.split()}
    assert {"8888", "6006"} <= exposed
    entrypoint = json.loads(next(args for keyword, args in instructions if keyword == "ENTRYPOINT"))
    copied = next(args.split() for keyword, args in instructions
                  if keyword == "COPY" and args.split()[-1] == entrypoint[0])
    script = (ROOT / copied[-2]).read_text()
    assert os.access(ROOT / copied[-2], os.X_OK)
    lab_line = next(line for line in script.splitlines() if "jupyter lab" in line)
    assert "exec " in lab_line and "--port=8888" in lab_line and "--ip=0.0.0.0" in script
    board = shlex.split(next(line for line in script.splitlines() if line.startswith("tensorboard")))
    assert board[board.index("--port") + 1] == "6006"
    assert board[board.index("--logdir") + 1].endswith("/workspace/runs}")  # ${RUNS_DIR:-/workspace/runs}
    assert "JUPYTER_TOKEN:?" in script  # refuses to start tokenless
    # the news popup is silenced in the image's JupyterLab
    settings = next(args.split() for keyword, args in instructions if keyword == "COPY" and "overrides.json" in args)
    assert settings[-1] == "/opt/venv/share/jupyter/lab/settings/overrides.json"
    overrides = json.loads((ROOT / settings[-2]).read_text())
    assert overrides["@jupyterlab/apputils-extension:notification"]["fetchNews"] == "false"


def test_dockerignore_keeps_data_and_environments_out():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    assert {"input", "runs", ".venv", ".git"} <= ignored


def _run_python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**os.environ, **env, "OMP_NUM_THREADS": "1"})


def test_prefetched_coco_weights_are_where_detectron2_looks(tmp_path):
    """The pre-fetch target is the file detectron2's PathManager returns, with no network."""
    env = {"FVCORE_CACHE": str(tmp_path / "iopath"), "TORCH_HOME": str(tmp_path / "torch")}
    result = subprocess.run([sys.executable, "tools/prefetch_weights.py", "--dry-run"], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, env={**os.environ, **env})
    assert result.returncode == 0, result.stderr
    targets = dict(line.split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    expected = (tmp_path / "iopath" / "detectron2" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_3x"
                / "137849600" / "model_final_f10217.pkl")
    assert Path(targets["detector"]) == expected
    assert Path(targets["classifier"]) == tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth"

    expected.parent.mkdir(parents=True)
    expected.write_bytes(b"stand-in for the 170 MB pickle")
    found = _run_python(
        "from detectron2.utils.file_io import PathManager; "
        f"print(PathManager.get_local_path({COCO_WEIGHTS!r}))", env)
    assert found.returncode == 0, found.stderr
    assert Path(found.stdout.strip().splitlines()[-1]) == expected


def test_prefetched_resnet34_is_what_fastai_loads(tmp_path):
    """A state dict at the hub-cache path is what `resnet34(weights=DEFAULT)` loads, offline."""
    env = {"TORCH_HOME": str(tmp_path / "torch")}
    target = tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    code = (
        "import sys, torch, torchvision\n"
        "torch.manual_seed(0)\n"
        "model = torchvision.models.resnet34()\n"
        "torch.nn.init.constant_(model.fc.bias, 0.25)\n"
        f"torch.save(model.state_dict(), {str(target)!r})\n"
        "from fastai.vision.learner import create_vision_model\n"
        "loaded = create_vision_model(torchvision.models.resnet34, n_out=2, pretrained=True)\n"
        "first = loaded[0][0].weight\n"
        "assert torch.equal(first, model.conv1.weight), 'fastai did not load the cached weights'\n"
        "print('ok')\n"
    )
    target.parent.mkdir(parents=True)
    result = _run_python(code, env)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-2000:]
