"""`make setup`'s requirements installer (tools/install_requirements.py): uv under pip's configuration."""
from __future__ import annotations

import base64
import hashlib
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import install_requirements  # noqa: E402

# The format `python -m pip config list` prints (pip 25): one key a line, the files' and the
# environment's levels both listed.
PIP_CONFIG_LIST = """\
:env:.cert='/etc/ssl/certs/ca-certificates.crt'
:env:.default-timeout='180'
:env:.disable-pip-version-check='1'
:env:.find-links='/opt/wheels'
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///opt/pypi/simple file:///opt/pypi-more/simple'
global.find-links='/somewhere/else'
global.timeout='60'
"""


def test_pip_config_is_read_with_the_environment_winning_and_lists_split():
    config = install_requirements.parse_pip_config(PIP_CONFIG_LIST)
    assert config == {
        "cert": ["/etc/ssl/certs/ca-certificates.crt"],
        "find-links": ["/opt/wheels"],  # PIP_FIND_LINKS over the file's
        "constraint": ["/etc/xdg/pip/constraints.txt"],
        "extra-index-url": ["file:///opt/pypi/simple", "file:///opt/pypi-more/simple"],
        "timeout": ["60"],
    }
    assert install_requirements.parse_pip_config("") == {}


def test_uv_gets_pips_sources_and_picks_across_indexes_as_pip_does():
    config = install_requirements.parse_pip_config(PIP_CONFIG_LIST)
    cmd, env = install_requirements.uv_command("uv", "/v/bin/python", "req.txt", config)
    assert cmd[:8] == ["uv", "pip", "install", "--python", "/v/bin/python", "--compile-bytecode", "-r", "req.txt"]
    args = " ".join(cmd[8:])
    assert args == ("--extra-index-url file:///opt/pypi/simple --extra-index-url file:///opt/pypi-more/simple "
                    "--find-links /opt/wheels --constraint /etc/xdg/pip/constraints.txt "
                    "--index-strategy unsafe-best-match")
    assert env == {"SSL_CERT_FILE": "/etc/ssl/certs/ca-certificates.crt", "UV_HTTP_TIMEOUT": "60"}
    # no configuration: PyPI, uv's defaults
    cmd, env = install_requirements.uv_command("uv", "py", "r.txt", {})
    assert cmd == ["uv", "pip", "install", "--python", "py", "--compile-bytecode", "-r", "r.txt"] and env == {}
    cmd, _ = install_requirements.uv_command("uv", "py", "r.txt", {"index-url": ["https://mirror/simple"],
                                                                    "no-index": ["true"]})
    assert cmd[-3:] == ["--index-url", "https://mirror/simple", "--no-index"]


def _write_wheel(folder: Path, name: str = "airbus_probe", version: str = "1.0") -> Path:
    """A minimal pure-Python wheel (PEP 427) whose module says its version."""
    dist = f"{name}-{version}.dist-info"
    files = {
        f"{name}/__init__.py": f"VERSION = {version!r}\n",
        f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n",
        f"{dist}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for path, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(text.encode())}")
    files[f"{dist}/RECORD"] = "\n".join(record + [f"{dist}/RECORD,,"]) + "\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, text in files.items():
            archive.writestr(path, text)
    return wheel


@pytest.fixture(scope="module")
def offline_source(tmp_path_factory):
    """A find-links folder with one wheel, a requirements file pinning it, and a fresh venv."""
    root = tmp_path_factory.mktemp("install")
    (root / "wheels").mkdir()
    _write_wheel(root / "wheels")
    (root / "requirements.txt").write_text("airbus_probe==1.0\n")
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, timeout=300)
    return root


@pytest.mark.parametrize("installer", ["uv", "pip"])
def test_installs_offline_from_pips_find_links_into_the_interpreters_venv(offline_source, installer):
    uv = install_requirements.find_uv()
    if installer == "uv" and uv is None:
        pytest.skip("uv is not installed beside this interpreter (make setup installs it)")
    python = offline_source / "venv" / "bin" / "python"
    subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "airbus_probe"], timeout=120)
    env = {**os.environ, "PIP_FIND_LINKS": str(offline_source / "wheels"), "PIP_NO_INDEX": "1",
           "PIP_CONFIG_FILE": os.devnull, "PATH": f"{Path(uv).parent if uv else ''}:{os.environ['PATH']}"}
    env.pop("AIRBUS_INSTALLER", None)
    args = [str(python), str(ROOT / "tools" / "install_requirements.py"), str(offline_source / "requirements.txt")]
    out = subprocess.run(args + (["--pip"] if installer == "pip" else []), env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "installing with pip" not in out.stderr  # uv did it, no fallback
    version = subprocess.run([str(python), "-c", "import airbus_probe; print(airbus_probe.VERSION)"],
                             capture_output=True, text=True, check=True, timeout=60).stdout.strip()
    assert version == "1.0"


def test_a_failing_uv_falls_back_to_pip_and_a_missing_file_is_named(offline_source, tmp_path):
    python = offline_source / "venv" / "bin" / "python"
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "uv").write_text("#!/bin/sh\necho 'uv: broken' >&2\nexit 3\n")
    (fake / "uv").chmod(0o755)
    env = {**os.environ, "PIP_FIND_LINKS": str(offline_source / "wheels"), "PIP_NO_INDEX": "1",
           "PIP_CONFIG_FILE": os.devnull, "PATH": f"{fake}:/usr/bin:/bin"}
    subprocess.run([str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "airbus_probe"], timeout=120)
    script = str(ROOT / "tools" / "install_requirements.py")
    out = subprocess.run([str(python), script, str(offline_source / "requirements.txt")], env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "uv failed (exit 3)" in out.stderr and "installing with pip instead" in out.stderr
    subprocess.run([str(python), "-c", "import airbus_probe"], check=True, timeout=60)
    missing = subprocess.run([str(python), script, str(tmp_path / "nope.txt")], env=env, capture_output=True,
                             text=True, timeout=60)
    assert missing.returncode == 2 and "nope.txt: file not found" in missing.stderr
