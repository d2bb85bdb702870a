#!/usr/bin/env python
"""Install a pinned requirements file into the running interpreter's environment with uv, under
pip's own configuration; with pip where uv is missing or fails.

Why uv: `make setup` installs about 7 GB of wheels (PyPI's torch carries CUDA's libraries). pip
unpacks and compiles them one at a time; uv (a PyPI wheel, pinned in the Makefile) does it in
parallel. The same requirements from a cold cache on the 2-core machine of BENCHMARKS.md: pip 198 s,
uv 47 s (``--compile-bytecode`` included: measured in BENCHMARKS.md, "Set-up"). Every minute saved
is a minute the demo's models can train within `make demo`'s 20.

uv does not read pip's configuration, so this reads it (``python -m pip config list``, which merges
the files and ``PIP_*`` variables) and passes on what decides where packages come from:
``index-url``, ``extra-index-url``, ``find-links``, ``constraint``, ``no-index``, ``cert`` (as
``SSL_CERT_FILE``), ``timeout`` (as ``UV_HTTP_TIMEOUT``). With more than one index, pip takes the
best match from all of them; so does uv with ``--index-strategy unsafe-best-match`` (its default
takes a package from the first index that has it). The requirements pin every version, so both
resolve to the same files.

Usage (the Makefile's): .venv/bin/python tools/install_requirements.py requirements.txt [--pip]
``--pip`` (or ``AIRBUS_INSTALLER=pip``) installs with pip, as before.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

# pip config keys -> how uv gets them
INDEX_KEYS = ("index-url", "extra-index-url", "find-links", "constraint", "no-index")


def parse_pip_config(text: str) -> dict[str, list[str]]:
    """``pip config list`` output -> ``{key: [values]}`` for the keys that decide where packages come
    from (``index-url``, ``extra-index-url``, ``find-links``, ``constraint``, ``no-index``,
    ``cert``, ``timeout``). Lines look like ``global.extra-index-url='a b'`` or ``:env:.find-links='/x'``;
    a value may hold several entries separated by whitespace (pip splits them so). Where a key is
    set at several levels, the environment wins over the files (pip's order: ``:env:`` last)."""
    found: dict[str, dict[str, list[str]]] = {}
    for line in text.splitlines():
        if "=" not in line:
            continue
        name, _, value = line.partition("=")
        section, _, key = name.strip().rpartition(".")
        key = key.strip()
        if key not in INDEX_KEYS + ("cert", "timeout"):
            continue
        try:
            values = shlex.split(value.strip())  # strips pip's quotes
        except ValueError:
            values = [value.strip().strip("'\"")]
        values = [v for part in values for v in part.split()]
        level = "env" if section == ":env:" else "file"
        found.setdefault(key, {})[level] = values
    return {key: levels.get("env", levels.get("file", [])) for key, levels in found.items()}


def uv_command(uv: str, python: str, requirements: str, pip_config: dict[str, list[str]]) -> tuple[list[str], dict]:
    """The ``uv pip install`` command line and the extra environment that reproduce pip's sources."""
    cmd = [uv, "pip", "install", "--python", python, "--compile-bytecode", "-r", requirements]
    for url in pip_config.get("index-url", [])[:1]:
        cmd += ["--index-url", url]
    for url in pip_config.get("extra-index-url", []):
        cmd += ["--extra-index-url", url]
    for place in pip_config.get("find-links", []):
        cmd += ["--find-links", place]
    for path in pip_config.get("constraint", []):
        cmd += ["--constraint", path]
    if pip_config.get("no-index", ["false"])[0].lower() in ("1", "true", "yes", "on"):
        cmd += ["--no-index"]
    if len(pip_config.get("extra-index-url", [])) + len(pip_config.get("find-links", [])) > 0:
        cmd += ["--index-strategy", "unsafe-best-match"]  # pip's behaviour across indexes
    env = {}
    for path in pip_config.get("cert", [])[:1]:
        env["SSL_CERT_FILE"] = path
    for seconds in pip_config.get("timeout", [])[:1]:
        env["UV_HTTP_TIMEOUT"] = seconds
    return cmd, env


def find_uv() -> str | None:
    """The ``uv`` beside the running interpreter (the venv's, pip-installed), else on PATH."""
    beside = Path(sys.executable).parent / "uv"
    return str(beside) if beside.is_file() else shutil.which("uv")


def pip_install(requirements: str, quiet: bool) -> int:
    return subprocess.call([sys.executable, "-m", "pip", "install", *(["--quiet"] if quiet else []), "-r", requirements])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("requirements")
    parser.add_argument("--pip", action="store_true", help="install with pip, not uv")
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not Path(args.requirements).is_file():
        print(f"install_requirements: {args.requirements}: file not found", file=sys.stderr)
        return 2
    if args.pip or os.environ.get("AIRBUS_INSTALLER") == "pip":
        return pip_install(args.requirements, quiet=not args.verbose)
    uv = find_uv()
    if uv is None:
        print("install_requirements: uv not found beside the interpreter nor on PATH; installing with pip "
              "(slower)", file=sys.stderr)
        return pip_install(args.requirements, quiet=not args.verbose)
    listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    config = parse_pip_config(listed.stdout if listed.returncode == 0 else "")
    cmd, extra_env = uv_command(uv, sys.executable, args.requirements, config)
    if not args.verbose:
        cmd.append("--quiet")
    code = subprocess.call(cmd, env={**os.environ, **extra_env})
    if code != 0:
        print(f"install_requirements: uv failed (exit {code}): {shlex.join(cmd)}\n"
              "install_requirements: installing with pip instead", file=sys.stderr)
        return pip_install(args.requirements, quiet=not args.verbose)
    return 0


if __name__ == "__main__":
    sys.exit(main())
