"""The Docker image and Compose file, checked without a Docker engine (none runs here).

The compose file is validated against the compose spec (check-jsonschema ships it, offline), the
Dockerfile is linted by hadolint, and what matters for users is asserted: GPU reservation, ports,
volumes, the install steps shared with `make setup`, the weight pre-fetch into the caches the
libraries really read, and the non-root user.
"""
from __future__ import annotations

import ast
import fnmatch
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


def build_arg_defaults(instructions: list[tuple[str, str]]) -> dict[str, str]:
    """``ARG NAME=default`` -> {NAME: default}."""
    return dict(args.split("=", 1) for keyword, args in instructions if keyword == "ARG" and "=" in args)


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
    assert base == "${BASE_IMAGE}", base
    default = build_arg_defaults(instructions)["BASE_IMAGE"]
    assert default == "python:3.11-slim-bookworm", "the official image is the default base"


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


def test_prefetch_check_names_each_missing_file_and_where_it_goes(tmp_path):
    """What the entrypoint prints for an image built with PREFETCH_WEIGHTS=0, and its exit code."""
    env = {**os.environ, "FVCORE_CACHE": str(tmp_path / "iopath"), "TORCH_HOME": str(tmp_path / "torch")}
    check = [sys.executable, "tools/prefetch_weights.py", "--check", "--config", "configs/airbus.yaml"]
    missing = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert missing.returncode == 1, missing.stderr[-2000:]
    detector = (tmp_path / "iopath" / "detectron2" / "COCO-InstanceSegmentation" / "mask_rcnn_R_50_FPN_3x"
                / "137849600" / "model_final_f10217.pkl")
    classifier = tmp_path / "torch" / "hub" / "checkpoints" / "resnet34-b627a593.pth"
    assert f"detector weights missing: {detector}" in missing.stdout
    assert f"classifier weights missing: {classifier}" in missing.stdout
    assert "https://dl.fbaipublicfiles.com/detectron2/COCO-InstanceSegmentation/" in missing.stdout
    assert "https://download.pytorch.org/models/resnet34-b627a593.pth" in missing.stdout

    folders = subprocess.run([*check[:2], "--make-folders", *check[3:]], cwd=ROOT, capture_output=True,
                             text=True, timeout=300, env=env)
    assert folders.returncode == 0 and detector.parent.is_dir() and classifier.parent.is_dir(), folders.stderr
    assert not detector.exists() and not classifier.exists()
    detector.write_bytes(b"stand-in")
    one_left = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert one_left.returncode == 1 and str(detector) not in one_left.stdout and str(classifier) in one_left.stdout
    classifier.write_bytes(b"stand-in")
    both = subprocess.run(check, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert both.returncode == 0 and "pretrained weights present" in both.stdout, both.stdout


def _prefetch_step() -> str:
    return next(args for keyword, args in dockerfile_instructions()
                if keyword == "RUN" and "tools/prefetch_weights.py" in args)


def test_prefetch_weights_build_arg_defaults_to_on_and_0_skips_the_download(tmp_path):
    """The prefetch RUN step run by sh with a stand-in `python` that records its arguments."""
    assert build_arg_defaults(dockerfile_instructions())["PREFETCH_WEIGHTS"] == "1"
    (tmp_path / "python").write_text('#!/bin/sh\necho "python $*"\n')
    (tmp_path / "python").chmod(0o755)
    outcomes = {}
    for value in ("1", "0", "yes"):
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "PREFETCH_WEIGHTS": value}
        result = subprocess.run(["sh", "-c", _prefetch_step()], capture_output=True, text=True, env=env, timeout=30)
        outcomes[value] = (result.returncode, result.stdout + result.stderr)
    assert outcomes["1"] == (0, "python tools/prefetch_weights.py --config configs/airbus.yaml\n")
    assert outcomes["0"] == (0, "PREFETCH_WEIGHTS=0: no pretrained weights in this image; they go to:\n"
                                "python tools/prefetch_weights.py --config configs/airbus.yaml --make-folders\n")
    assert outcomes["yes"][0] != 0 and "must be 0 or 1" in outcomes["yes"][1]


def project_imports(module: str) -> set[str]:
    """The repo's ``module_*`` modules ``module`` imports, directly or through each other."""
    found, todo = set(), [module]
    while todo:
        tree = ast.parse((ROOT / f"{todo.pop()}.py").read_text())
        for node in ast.walk(tree):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            for name in names:
                if (ROOT / f"{name}.py").is_file() and name not in found:
                    found.add(name)
                    todo.append(name)
    return found


def test_prefetch_step_has_every_module_the_config_loader_imports():
    """The files copied before the prefetch step are enough for prefetch_weights.py's imports."""
    instructions = dockerfile_instructions()
    step = instructions.index(("RUN", _prefetch_step()))
    copied = [args.split()[-2] for keyword, args in instructions[:step] if keyword == "COPY"]
    needed = {"tools/prefetch_weights.py"} | {f"{m}.py" for m in project_imports("tools/prefetch_weights")}
    assert "module_config.py" in needed
    missing = [path for path in needed if not any(fnmatch.fnmatch(path, pattern) for pattern in copied)]
    assert not missing, f"copied before the prefetch step: {copied}; also needed: {missing}"


def _entrypoint(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", str(ROOT / "docker" / "entrypoint.sh"), *args], capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", **env}, timeout=30)


def test_entrypoint_runs_a_command_instead_of_the_lab():
    """`docker run IMAGE python run_notebook.py ...` runs that command, no token needed."""
    result = _entrypoint("echo", "headless", env={})
    assert (result.returncode, result.stdout) == (0, "headless\n"), result.stderr


def test_entrypoint_refuses_to_start_the_lab_without_a_token():
    result = _entrypoint(env={})
    assert result.returncode != 0 and "set JUPYTER_TOKEN" in result.stderr
    result = _entrypoint("--ServerApp.log_level=DEBUG", env={})  # options go to the Lab: token still needed
    assert result.returncode != 0 and "set JUPYTER_TOKEN" in result.stderr


def test_entrypoint_checks_the_weights_without_stopping_the_lab():
    script = (ROOT / "docker" / "entrypoint.sh").read_text().splitlines()
    check = next(line for line in script if "prefetch_weights.py --check" in line)
    assert check.rstrip().endswith("|| true")
    assert script.index(check) < next(i for i, line in enumerate(script) if "exec jupyter lab" in line)
