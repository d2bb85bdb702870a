#!/usr/bin/env python
"""Install detectron2 v0.6 (pure Python) from PyPI's ``pb1-detectron2==0.6`` sdist, patched.

detectron2 publishes no wheel on PyPI. The ``pb1-detectron2==0.6`` sdist is byte-identical to
upstream v0.6's Python code but cannot be installed as published:

  (a) it ships no C++/CUDA sources, so building ``detectron2._C`` fails. We build without the
      extension and install a pure-Python ``detectron2/_C.py`` stand-in whose ops raise a clear
      error. Mask R-CNN R50-FPN uses none of them (they serve rotated boxes, deformable conv and
      the fast COCO evaluator: use ``COCOEvaluator(use_fast_impl=False)``);
  (b) its wheel ships no model-zoo YAMLs (``setup.py`` globs a ``configs/`` folder that the
      sdist does not have);
  (c) ``PIL.Image.LINEAR`` is gone in Pillow >= 10;
  (d) ``model_zoo.py`` imports ``pkg_resources``, gone in setuptools >= 81;
  (e) the ``np.int``/``np.float``/``np.str``/``np.bool`` aliases are gone in numpy >= 1.24;
  (f) its ``install_requires`` pins ``black==21.4b2`` and ``iopath<0.1.10`` for no runtime need.

Steps: download (or take ``--sdist PATH``) -> check the sha256 -> unpack safely (tarfile's
``data`` filter where the Python has it, 3.11.4 and later; on older ones, such as Debian 12's
3.11.2, :func:`safe_member` applies the same checks) -> patch, where every replacement
must match the expected number of times or the script stops -> ``pip install
--no-build-isolation --no-deps`` into the running interpreter's environment. A marker inside the
installed package records the patch version, so a second run with nothing to do takes well under
a second. Only the standard library is used, and the only network access is to the PyPI index.

Usage: python tools/install_detectron2.py [--sdist FILE] [--force] [--cache-dir DIR]
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import html.parser
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path

SDIST_NAME = "pb1-detectron2-0.6.tar.gz"
SDIST_SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
PATCH_VERSION = "airbus-1"  # bump whenever PATCHES or the stand-in change
MARKER = "_airbus_patch.txt"

C_STANDIN = '''"""Pure-Python stand-in for detectron2's C++/CUDA extension (installed by the Airbus project).

PyPI's pb1-detectron2 sdist ships no C++ sources, so the compiled ops are unavailable. Mask R-CNN
R50-FPN needs none of them. Any op called raises a RuntimeError naming it.
"""


def get_compiler_version():
    return "none (detectron2 installed without its C++ extension)"


def get_cuda_version():
    return "none (detectron2 installed without its C++ extension)"


def has_cuda():
    return False


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def _unavailable(*args, **kwargs):
        raise RuntimeError(
            f"detectron2._C.{name} is unavailable: this detectron2 was installed from PyPI's "
            "pb1-detectron2 sdist, which has no C++/CUDA sources. Rotated boxes, deformable "
            "convolution and the fast COCO evaluator need it; use "
            "COCOEvaluator(..., use_fast_impl=False) and non-rotated models."
        )

    _unavailable.__name__ = name
    return _unavailable
'''

# (path inside the sdist, old text, new text, expected number of occurrences)
PATCHES: list[tuple[str, str, str, int]] = [
    # (a) no extension
    ("setup.py", "    ext_modules=get_extensions(),\n", "    ext_modules=[],\n", 1),
    # (b) ship the model-zoo configs that the sdist holds in detectron2/model_zoo/configs
    (
        "setup.py",
        'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
        'package_data={"detectron2.model_zoo": ['
        '"configs/*.yaml", "configs/*/*.yaml", "configs/*/*/*.yaml", '
        '"configs/*/*.py", "configs/*/*/*.py", "configs/*/*/*/*.py"]},',
        1,
    ),
    # (f) runtime requirements only
    ("setup.py", '        "black==21.4b2",\n', "", 1),
    ("setup.py", '        "iopath>=0.1.7,<0.1.10",\n', '        "iopath>=0.1.7,<0.2",\n', 1),
    ("setup.py", '        "future",  # used by caffe2\n', "", 1),
    ("setup.py", '        "pydot",  # used to save caffe2 SVGs\n', "", 1),
    # (c) Pillow >= 10
    ("detectron2/data/transforms/transform.py", "interp=Image.LINEAR", "interp=Image.BILINEAR", 1),
    # (d) setuptools >= 81
    ("detectron2/model_zoo/model_zoo.py", "import pkg_resources\n", "", 1),
    (
        "detectron2/model_zoo/model_zoo.py",
        'cfg_file = pkg_resources.resource_filename(\n'
        '        "detectron2.model_zoo", os.path.join("configs", config_path)\n'
        "    )",
        'cfg_file = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)',
        1,
    ),
]

# (e) numpy >= 1.24: np.int/np.float/np.str/np.bool -> the builtins; file -> expected count
NUMPY_ALIAS = re.compile(r"\bnp\.(int|float|str|bool)\b(?![\w(])")
NUMPY_ALIAS_COUNTS = {
    "detectron2/data/build.py": 2,
    "detectron2/data/datasets/pascal_voc.py": 1,
    "detectron2/evaluation/pascal_voc_evaluation.py": 2,
    "detectron2/evaluation/sem_seg_evaluation.py": 7,
    "detectron2/structures/masks.py": 3,
    "detectron2/utils/video_visualizer.py": 1,
    "detectron2/utils/visualizer.py": 3,
}


# tarfile's extraction filters (``extractall(filter="data")``) exist from Python 3.11.4 on; Debian
# 12's python3.11 is 3.11.2. Where they are missing, safe_member() does the checking.
TAR_HAS_DATA_FILTER = hasattr(tarfile, "data_filter")


class UnsafeTarMember(tarfile.TarError):
    """A tar member that would land outside the destination folder, or is not plain data."""


def _inside(path: str, dest: str) -> bool:
    """Whether ``path``, with every link already on disk resolved, stays inside ``dest``."""
    real = os.path.realpath(path)
    return os.path.commonpath([real, dest]) == dest


def safe_member(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo:
    """A copy of ``member`` that is safe to extract into ``dest`` (a realpath), or UnsafeTarMember.

    The fallback for Pythons without tarfile's ``data`` filter, with the same rules where it
    matters: absolute names and ``..`` components are refused; so are names and link targets that
    resolve outside ``dest`` (through links extracted before this member too, so call it just
    before extracting each member, in order) and anything but files, folders and links. The copy
    has no owner (the extracting user's), no setuid/setgid/sticky bits and no group/other write.
    """
    name = member.name
    if name.startswith("/") or os.path.isabs(name):
        raise UnsafeTarMember(f"{name!r}: absolute path")
    if ".." in name.replace(os.sep, "/").split("/"):
        raise UnsafeTarMember(f"{name!r}: '..' in the path")
    if not (member.isreg() or member.isdir() or member.issym() or member.islnk()):
        raise UnsafeTarMember(f"{name!r}: not a file, folder or link (device or FIFO)")
    if not _inside(os.path.join(dest, name), dest):
        raise UnsafeTarMember(f"{name!r}: resolves outside {dest}")
    if member.issym() or member.islnk():
        if os.path.isabs(member.linkname):
            raise UnsafeTarMember(f"{name!r}: link to the absolute path {member.linkname!r}")
        # a symlink's target is relative to its folder, a hard link's to the archive's root
        base = os.path.dirname(name) if member.issym() else ""
        if not _inside(os.path.join(dest, base, member.linkname), dest):
            raise UnsafeTarMember(f"{name!r}: link to {member.linkname!r}, outside {dest}")
    safe = copy.copy(member)
    safe.mode = member.mode & 0o755 | (0o700 if member.isdir() else 0o600)
    safe.uid, safe.gid, safe.uname, safe.gname = os.getuid(), os.getgid(), "", ""
    return safe


def extract_tar(archive: Path, dest: Path) -> None:
    """Unpack ``archive`` into ``dest``, refusing members that would write outside it."""
    with tarfile.open(archive) as tar:
        if TAR_HAS_DATA_FILTER:
            tar.extractall(dest, filter="data")
            return
        real_dest = os.path.realpath(dest)
        for member in tar.getmembers():  # in order: each check sees the links extracted before it
            tar.extract(safe_member(member, real_dest), real_dest)


class _LinkParser(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "a":
            self.links += [v for k, v in attrs if k == "href" and v]


def index_urls() -> list[str]:
    """PyPI simple-index URLs to try: $PIP_INDEX_URL (if set), then pypi.org."""
    urls = [os.environ["PIP_INDEX_URL"]] if os.environ.get("PIP_INDEX_URL") else []
    return urls + ["https://pypi.org/simple/"]


def download_sdist(dest: Path) -> Path:
    """Find the sdist on the PyPI simple index and download it to ``dest``."""
    errors = []
    for index in index_urls():
        page = urllib.parse.urljoin(index.rstrip("/") + "/", "pb1-detectron2/")
        try:
            with urllib.request.urlopen(page, timeout=60) as response:
                parser = _LinkParser()
                parser.feed(response.read().decode("utf-8", "replace"))
            link = next(l for l in parser.links if l.split("#")[0].endswith(SDIST_NAME))
            url = urllib.parse.urljoin(page, link.split("#")[0])
            print(f"[detectron2] downloading {url}", flush=True)
            with urllib.request.urlopen(url, timeout=300) as response, open(dest, "wb") as out:
                shutil.copyfileobj(response, out)
            return dest
        except Exception as exc:  # try the next index
            errors.append(f"{page}: {exc!r}")
    raise SystemExit(
        "[detectron2] could not download " + SDIST_NAME + " from the PyPI index:\n  "
        + "\n  ".join(errors)
        + "\nDownload it by hand (pip download cannot, its setup.py imports torch) and pass "
        "--sdist PATH, or put it in the cache folder (--cache-dir)."
    )


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def apply_patches(root: Path) -> None:
    """Apply PATCHES in ``root``; stop if any replacement does not match exactly as expected."""
    for rel, old, new, count in PATCHES:
        path = root / rel
        text = path.read_text()
        found = text.count(old)
        if found != count:
            raise SystemExit(
                f"[detectron2] patch mismatch in {rel}: expected {count} occurrence(s) of "
                f"{old!r}, found {found}. The sdist is not the one this script was written for."
            )
        path.write_text(text.replace(old, new))
    for rel, count in NUMPY_ALIAS_COUNTS.items():
        path = root / rel
        text, found = NUMPY_ALIAS.subn(r"\1", path.read_text())
        if found != count:
            raise SystemExit(
                f"[detectron2] patch mismatch in {rel}: expected {count} numpy alias(es), "
                f"found {found}. The sdist is not the one this script was written for."
            )
        path.write_text(text)
    leftover = [str(p.relative_to(root)) for p in root.rglob("*.py") if NUMPY_ALIAS.search(p.read_text())]
    if leftover:
        raise SystemExit(f"[detectron2] numpy aliases left unpatched in: {leftover}")
    (root / "detectron2" / "_C.py").write_text(C_STANDIN)
    (root / "detectron2" / MARKER).write_text(PATCH_VERSION + "\n")
    setup = (root / "setup.py").read_text()
    setup = setup.replace(
        '"detectron2.model_zoo": [', '"detectron2": ["_airbus_patch.txt"], "detectron2.model_zoo": ['
    )
    (root / "setup.py").write_text(setup)


def installed_patch_version() -> str | None:
    spec = importlib.util.find_spec("detectron2")
    if spec is None or not spec.submodule_search_locations:
        return None
    marker = Path(list(spec.submodule_search_locations)[0]) / MARKER
    return marker.read_text().strip() if marker.exists() else None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sdist", type=Path, help="use this local pb1-detectron2-0.6.tar.gz")
    parser.add_argument("--cache-dir", type=Path, default=Path(".cache"),
                        help="where the downloaded sdist is kept (default: .cache)")
    parser.add_argument("--force", action="store_true", help="reinstall even if up to date")
    parser.add_argument("--wheel-dir", type=Path, default=None,
                        help="build a wheel of the patched sdist into this folder instead of installing "
                             "(for a machine without registry access: bench/device_wheels.sh)")
    args = parser.parse_args(argv)

    if args.wheel_dir is None and not args.force and installed_patch_version() == PATCH_VERSION:
        print(f"[detectron2] already installed ({PATCH_VERSION})")
        return 0

    sdist = args.sdist
    if sdist is None:
        args.cache_dir.mkdir(parents=True, exist_ok=True)
        sdist = args.cache_dir / SDIST_NAME
        if not sdist.exists() or sha256(sdist) != SDIST_SHA256:
            partial = sdist.with_suffix(".part")
            download_sdist(partial)
            os.replace(partial, sdist)
    digest = sha256(sdist)
    if digest != SDIST_SHA256:
        raise SystemExit(f"[detectron2] sha256 of {sdist} is {digest}, expected {SDIST_SHA256}")

    with tempfile.TemporaryDirectory(prefix="d2-build-") as tmp:
        try:
            extract_tar(sdist, Path(tmp))
        except tarfile.TarError as exc:
            raise SystemExit(f"[detectron2] refusing to unpack {sdist}: {exc}") from None
        root = Path(tmp) / "pb1-detectron2-0.6"
        apply_patches(root)
        if args.wheel_dir is not None:
            args.wheel_dir.mkdir(parents=True, exist_ok=True)
            subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "--quiet",
                            "--wheel-dir", str(args.wheel_dir), str(root)], check=True)
            print(f"[detectron2] wheel ({PATCH_VERSION}) written to {args.wheel_dir}")
            return 0
        print("[detectron2] patched; installing", flush=True)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps",
             "--quiet", str(root)],
            check=True,
        )
    print(f"[detectron2] installed ({PATCH_VERSION})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
