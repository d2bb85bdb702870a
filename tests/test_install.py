"""The detectron2 install: what the patched pb1-detectron2 sdist must give us."""
from __future__ import annotations

import importlib
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
