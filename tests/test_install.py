"""The detectron2 install: what the patched pb1-detectron2 sdist must give us."""
from __future__ import annotations

import hashlib
import importlib
import io
import os
import stat
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import install_detectron2  # noqa: E402


def test_installed_version_is_the_patched_one():
    assert install_detectron2.installed_patch_version() == install_detectron2.PATCH_VERSION


def test_second_install_is_a_quick_no_op():
    out = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "install_detectron2.py")],
        capture_output=True, text=True, check=True, timeout=60,
    )
    assert "already installed" in out.stdout


def test_model_zoo_yamls_are_shipped():
    from detectron2 import model_zoo

    path = Path(model_zoo.get_config_file("COCO-InstanceSegmentation/mask_rcnn_R_50_FPN_3x.yaml"))
    assert path.is_file()
    assert (path.parent.parent / "Base-RCNN-FPN.yaml").is_file()


def test_c_standin_reports_versions_and_refuses_ops_clearly():
    from detectron2 import _C
    from detectron2.utils.collect_env import collect_env_info

    assert _C.has_cuda() is False
    assert "without its C++ extension" in collect_env_info()
    with pytest.raises(RuntimeError, match="box_iou_rotated is unavailable.*use_fast_impl=False"):
        _C.box_iou_rotated(None, None)


def test_patched_modules_import_and_work_with_new_numpy_and_pillow():
    from detectron2.data.transforms import ExtentTransform
    from detectron2.structures import BitMasks, PolygonMasks

    # (c) Image.LINEAR -> BILINEAR
    out = ExtentTransform((0, 0, 4, 4), (2, 2)).apply_image(np.zeros((4, 4, 3), np.uint8))
    assert out.shape == (2, 2, 3)
    # (e) np.bool alias removed: polygons -> bitmasks goes through masks.py
    poly = PolygonMasks([[np.array([0.0, 0.0, 4.0, 0.0, 4.0, 4.0])]])
    bitmask = BitMasks.from_polygon_masks(poly, 6, 6)
    assert bitmask.tensor.shape == (1, 6, 6) and bitmask.tensor.any()
    for name in ("detectron2.evaluation", "detectron2.engine", "detectron2.layers.rotated_boxes"):
        importlib.import_module(name)


def test_coco_evaluator_slow_path_runs_without_the_extension(tmp_path):
    import torch
    from pycocotools import mask as mask_util

    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import COCOEvaluator
    from detectron2.structures import BoxMode, Boxes, Instances

    mask = np.zeros((32, 48), np.uint8)
    mask[4:12, 6:30] = 1
    rle = mask_util.encode(np.asfortranarray(mask))
    rle["counts"] = rle["counts"].decode()
    name = "install_test_coco_eval"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [{
            "file_name": "x.jpg", "image_id": 1, "height": 32, "width": 48,
            "annotations": [{"bbox": [6, 4, 24, 8], "bbox_mode": BoxMode.XYWH_ABS,
                             "segmentation": rle, "category_id": 0, "iscrowd": 0}],
        }])
        MetadataCatalog.get(name).set(thing_classes=["ship"])
    evaluator = COCOEvaluator(name, output_dir=str(tmp_path), use_fast_impl=False)
    evaluator.reset()
    inst = Instances((32, 48))
    inst.pred_boxes = Boxes(torch.tensor([[6.0, 4.0, 30.0, 12.0]]))
    inst.scores = torch.tensor([0.9])
    inst.pred_classes = torch.tensor([0])
    inst.pred_masks = torch.from_numpy(mask[None].astype(bool))
    evaluator.process([{"image_id": 1}], [{"instances": inst}])
    results = evaluator.evaluate()
    assert results["segm"]["AP"] == pytest.approx(100.0)


def _fake_sdist(tmp_path: Path, setup_text: str) -> Path:
    """A tarball with the sdist's layout whose setup.py is ``setup_text``."""
    root = tmp_path / "pb1-detectron2-0.6"
    (root / "detectron2").mkdir(parents=True)
    (root / "setup.py").write_text(setup_text)
    tar_path = tmp_path / "fake.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(root, arcname=root.name)
    return tar_path


def test_wrong_sdist_is_refused_by_checksum(tmp_path, capsys):
    tar_path = _fake_sdist(tmp_path, "print('hi')\n")
    with pytest.raises(SystemExit, match="sha256 of .* expected 5d2e9e51"):
        install_detectron2.main(["--sdist", str(tar_path), "--force"])


def test_patch_that_does_not_match_fails_loudly(tmp_path):
    root = tmp_path / "src"
    (root / "detectron2").mkdir(parents=True)
    (root / "setup.py").write_text("setup(ext_modules=get_extensions())\n")  # not the expected text
    with pytest.raises(SystemExit, match="patch mismatch in setup.py: expected 1 occurrence"):
        install_detectron2.apply_patches(root)


# Unpacking the sdist: tarfile's `data` filter where the Python has it (3.11.4+), the explicit
# checks of safe_member() where it does not (Debian 12's 3.11.2). Both branches run here; on
# 3.11.2 itself the fallback is exercised by `make docker-test`, which builds the image on Debian
# 12's python3.11.

def test_data_filter_detection_matches_the_python_version():
    print(f"Python {sys.version.split()[0]}: data filter {install_detectron2.TAR_HAS_DATA_FILTER}")
    if sys.version_info[:2] == (3, 11):
        assert install_detectron2.TAR_HAS_DATA_FILTER == (sys.version_info >= (3, 11, 4))


@pytest.fixture(params=["data_filter", "fallback"])
def tar_branch(request, monkeypatch):
    """Run the test with tarfile's filter, then as on Python < 3.11.4 (no `filter` argument)."""
    if request.param == "data_filter":
        if not install_detectron2.TAR_HAS_DATA_FILTER:
            pytest.skip(f"Python {sys.version.split()[0]} has no tarfile data filter")
        return request.param
    original = tarfile.TarFile.extractall

    def extractall_as_on_3_11_2(self, path=".", members=None, *, numeric_owner=False, **kwargs):
        if kwargs:
            raise TypeError(f"TarFile.extractall() got an unexpected keyword argument {next(iter(kwargs))!r}")
        return original(self, path, members, numeric_owner=numeric_owner)

    monkeypatch.setattr(install_detectron2, "TAR_HAS_DATA_FILTER", False)
    monkeypatch.setattr(tarfile.TarFile, "extractall", extractall_as_on_3_11_2)
    return request.param


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "", mode: int = 0o644) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname, info.mode = kind, linkname, mode
    return info


def _write_tar(path: Path, members: list[tarfile.TarInfo]) -> Path:
    """A .tar.gz with ``members``; regular files hold their own name as content."""
    with tarfile.open(path, "w:gz") as tar:
        for info in members:
            data = info.name.encode() if info.isreg() else b""
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture
def box(tmp_path) -> Path:
    """``box/dest`` is where archives are unpacked; nothing else may ever appear in ``box``."""
    (tmp_path / "box" / "dest").mkdir(parents=True)
    return tmp_path / "box"


def test_extract_tar_unpacks_files_folders_and_links_inside(tar_branch, tmp_path, box):
    archive = _write_tar(tmp_path / "ok.tar.gz", [
        _member("pkg", tarfile.DIRTYPE, mode=0o755),
        _member("pkg/run.sh", mode=0o4777),  # setuid, world-writable: both are dropped
        _member("pkg/sub/data.txt"),
        _member("pkg/link", tarfile.SYMTYPE, linkname="sub/data.txt"),
        _member("pkg/hard", tarfile.LNKTYPE, linkname="pkg/sub/data.txt"),
    ])
    dest = box / "dest"
    install_detectron2.extract_tar(archive, dest)
    assert (dest / "pkg" / "sub" / "data.txt").read_text() == "pkg/sub/data.txt"
    assert os.readlink(dest / "pkg" / "link") == "sub/data.txt"
    assert (dest / "pkg" / "hard").read_text() == "pkg/sub/data.txt"
    assert stat.S_IMODE((dest / "pkg" / "run.sh").stat().st_mode) == 0o755
    assert list(box.iterdir()) == [dest]


UNSAFE_MEMBERS = {  # what each archive holds after a harmless first file; box/dest is the target
    "dot-dot": [_member("../evil")],
    "dot-dot inside a path": [_member("pkg/../../evil")],
    "symlink to an absolute path": [_member("pkg/link", tarfile.SYMTYPE, linkname="/etc/passwd")],
    "symlink out of the tree": [_member("pkg/link", tarfile.SYMTYPE, linkname="../../evil")],
    "hard link out of the tree": [_member("pkg/hard", tarfile.LNKTYPE, linkname="../evil")],
    "symlink out through an earlier symlink": [
        _member("pkg/up", tarfile.SYMTYPE, linkname=".."),  # box/dest itself: allowed
        _member("pkg/up2", tarfile.SYMTYPE, linkname="up/.."),  # box/dest/.. = box: refused
    ],
    "file through a symlinked folder": [
        _member("pkg/here", tarfile.SYMTYPE, linkname="."),
        _member("pkg/here/../../evil"),
    ],
    "character device": [_member("pkg/null", tarfile.CHRTYPE)],
    "fifo": [_member("pkg/pipe", tarfile.FIFOTYPE)],
}


@pytest.mark.parametrize("case", list(UNSAFE_MEMBERS))
def test_extract_tar_refuses_members_that_escape_or_are_special(tar_branch, tmp_path, box, case):
    archive = _write_tar(tmp_path / "bad.tar.gz", [_member("pkg/ok.txt")] + UNSAFE_MEMBERS[case])
    with pytest.raises(tarfile.TarError) as refused:
        install_detectron2.extract_tar(archive, box / "dest")
    print(f"{tar_branch}, {case}: {type(refused.value).__name__}: {refused.value}")
    assert list(box.iterdir()) == [box / "dest"], "something was written outside the destination"


def test_extract_tar_never_writes_to_an_absolute_member_path(tar_branch, tmp_path, box):
    """The data filter strips the leading '/' and unpacks inside; the fallback refuses outright."""
    evil = box / "evil"
    archive = _write_tar(tmp_path / "abs.tar.gz", [_member(str(evil))])
    if tar_branch == "fallback":
        with pytest.raises(install_detectron2.UnsafeTarMember, match="absolute path"):
            install_detectron2.extract_tar(archive, box / "dest")
    else:
        install_detectron2.extract_tar(archive, box / "dest")
        assert (box / "dest" / str(evil).lstrip("/")).is_file()
    assert not evil.exists()


def test_a_refused_member_stops_the_install_with_a_message(monkeypatch, tmp_path):
    archive = _write_tar(tmp_path / "bad.tar.gz", [_member("../evil")])
    monkeypatch.setattr(install_detectron2, "SDIST_SHA256", install_detectron2.sha256(archive))
    monkeypatch.setattr(install_detectron2, "TAR_HAS_DATA_FILTER", False)
    with pytest.raises(SystemExit, match=r"refusing to unpack .*bad.tar.gz: '../evil': '..' in the path"):
        install_detectron2.main(["--sdist", str(archive), "--force"])


def _tree(root: Path) -> dict[str, tuple]:
    """Every path under ``root``: (kind, mode bits, link target or content digest)."""
    tree = {}
    for path in sorted(root.rglob("*")):
        st = path.lstat()
        if path.is_symlink():
            tree[str(path.relative_to(root))] = ("link", None, os.readlink(path))
        elif path.is_dir():
            tree[str(path.relative_to(root))] = ("dir", None, None)
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            tree[str(path.relative_to(root))] = ("file", stat.S_IMODE(st.st_mode), digest)
    return tree


def test_both_branches_unpack_the_real_sdist_identically(monkeypatch, tmp_path):
    """The sdist `make setup` downloaded (.cache/) unpacks to the same files, modes and links."""
    sdist = ROOT / ".cache" / install_detectron2.SDIST_NAME
    if not sdist.is_file() or not install_detectron2.TAR_HAS_DATA_FILTER:
        pytest.skip(f"needs {sdist} (`make setup` downloads it) and Python >= 3.11.4")
    install_detectron2.extract_tar(sdist, tmp_path / "filter")
    monkeypatch.setattr(install_detectron2, "TAR_HAS_DATA_FILTER", False)
    install_detectron2.extract_tar(sdist, tmp_path / "fallback")
    with_filter, fallback = _tree(tmp_path / "filter"), _tree(tmp_path / "fallback")
    assert len(with_filter) > 300 and with_filter == fallback
