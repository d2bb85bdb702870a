"""The detector's mapper: resize and augmentations keep image and masks aligned (no model here).

The test image is asymmetric: a bright L-shaped "ship" and a bright square at known places on a
dark background, and the masks are exactly those shapes. After any augmentation, the bright
pixels of the output image must coincide with the output masks; a flip of only one of them, a
transposition, or a rotation in the wrong direction or unit breaks that.
"""
from __future__ import annotations

import copy

import cv2
import numpy as np
import pycocotools.mask as mask_util
import pytest
from detectron2.data import transforms as T
from detectron2.structures import BoxMode

import module_train
from module_config import get_cfg

SIZE = 64


def _coco_rle(mask: np.ndarray) -> dict:
    rle = mask_util.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode()
    return rle


def _shapes() -> list[np.ndarray]:
    """Two non-overlapping, asymmetric masks (H, W) uint8 on a 64x64 image."""
    l_shape = np.zeros((SIZE, SIZE), np.uint8)
    l_shape[8:40, 10:16] = 1  # long vertical bar, upper left
    l_shape[34:40, 16:30] = 1  # foot pointing right
    square = np.zeros((SIZE, SIZE), np.uint8)
    square[44:54, 44:58] = 1  # lower right, wider than tall
    return [l_shape, square]


@pytest.fixture()
def asymmetric_dict(tmp_path):
    """A dataset dict whose image is bright exactly where its masks are (PNG: lossless)."""
    masks = _shapes()
    image = np.full((SIZE, SIZE, 3), 20, np.uint8)
    for m in masks:
        image[m.astype(bool)] = (230, 200, 180)
    path = tmp_path / "asym.png"
    cv2.imwrite(str(path), image[:, :, ::-1])
    annotations = [
        {"bbox": list(mask_util.toBbox(_coco_rle(m))), "bbox_mode": BoxMode.XYWH_ABS, "segmentation": _coco_rle(m),
         "category_id": 0, "iscrowd": 0}
        for m in masks
    ]
    return {"file_name": str(path), "height": SIZE, "width": SIZE, "image_id": "asym.png", "annotations": annotations}


def _cfg(**detector) -> object:
    opts = ["MODEL.DEVICE", "cpu", "DETECTOR.HFLIP_PROB", "0.0", "DETECTOR.VFLIP_PROB", "0.0",
            "DETECTOR.ROTATION_DEG", "0.0", "DETECTOR.LIGHTING_STD", "0.0"]
    for key, value in detector.items():
        opts += [f"DETECTOR.{key}", str(value)]
    return get_cfg(None, opts)


def _bright(image_chw) -> np.ndarray:
    return image_chw.numpy().mean(axis=0) > 125


def _mask_union(instances) -> np.ndarray:
    return instances.gt_masks.tensor.numpy().any(axis=0)


def _iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max((a | b).sum(), 1))


def test_no_augmentation_keeps_masks_and_tight_boxes(asymmetric_dict):
    out = module_train.ShipDatasetMapper(_cfg(), SIZE, is_train=True)(asymmetric_dict)
    masks = out["instances"].gt_masks.tensor.numpy()
    np.testing.assert_array_equal(masks, np.stack(_shapes()).astype(bool))
    np.testing.assert_array_equal(_bright(out["image"]), _mask_union(out["instances"]))
    # tight XYXY boxes, exclusive max corner: the L spans x 10..29, y 8..39
    assert out["instances"].gt_boxes.tensor[0].tolist() == [10, 8, 30, 40]
    assert out["instances"].gt_classes.tolist() == [0, 0]


@pytest.mark.parametrize(
    "aug, expected",
    [
        ({"HFLIP_PROB": 1.0}, lambda m: m[:, ::-1]),
        ({"VFLIP_PROB": 1.0}, lambda m: m[::-1, :]),
        ({"HFLIP_PROB": 1.0, "VFLIP_PROB": 1.0}, lambda m: m[::-1, ::-1]),
    ],
    ids=["hflip", "vflip", "both"],
)
def test_flips_move_image_and_masks_together(asymmetric_dict, aug, expected):
    out = module_train.ShipDatasetMapper(_cfg(**aug), SIZE, is_train=True)(asymmetric_dict)
    masks = out["instances"].gt_masks.tensor.numpy()
    np.testing.assert_array_equal(masks, np.stack([expected(m) for m in _shapes()]).astype(bool))
    np.testing.assert_array_equal(_bright(out["image"]), _mask_union(out["instances"]))


def test_rotation_keeps_alignment_and_recomputes_tight_boxes(asymmetric_dict):
    np.random.seed(3)
    mapper = module_train.ShipDatasetMapper(_cfg(ROTATION_DEG=20.0), SIZE, is_train=True)
    moved = 0
    for _ in range(5):
        out = mapper(asymmetric_dict)
        instances = out["instances"]
        union = _mask_union(instances)
        moved += _iou(union, np.stack(_shapes()).any(0).astype(bool)) < 0.8
        # bilinear image vs nearest-neighbour masks differ only along the edges
        assert _iou(_bright(out["image"]), union) > 0.85
        masks = instances.gt_masks.tensor.numpy()
        for mask, box in zip(masks, instances.gt_boxes.tensor.numpy()):
            ys, xs = np.nonzero(mask)
            np.testing.assert_array_equal(box, [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    assert moved >= 3, "the rotation hardly moved the masks"


def test_rotation_angles_are_degrees_within_the_range():
    cfg = _cfg(ROTATION_DEG=20.0)
    augs = T.AugmentationList(module_train.build_augmentations(cfg, SIZE, is_train=True))
    np.random.seed(0)
    angles = []
    for _ in range(300):
        transforms = augs(T.AugInput(np.zeros((SIZE, SIZE, 3), np.uint8)))
        angles += [t.angle for t in transforms.transforms if isinstance(t, T.RotationTransform)]
    angles = np.asarray(angles)
    assert len(angles) >= 299  # an angle of exactly 0 is a no-op transform
    assert angles.min() >= -20 and angles.max() <= 20
    assert angles.min() < -17 and angles.max() > 17  # degrees, not 0.2 or radians
    assert abs(angles.mean()) < 2.5  # uniform, centred


def test_rotated_box_is_tighter_than_the_rotated_old_box(asymmetric_dict):
    """Rotating the box corners would give a larger box; ours comes from the rotated mask."""
    l_shape = _shapes()[0]
    transform = T.RotationTransform(SIZE, SIZE, 20.0, expand=False)
    rotated = transform.apply_segmentation(l_shape)
    tight = module_train.masks_to_instances([rotated], (SIZE, SIZE)).gt_boxes.tensor[0].numpy()
    corner_box = transform.apply_box(np.array([[10, 8, 30, 40]], float))[0]
    assert (tight[2] - tight[0]) * (tight[3] - tight[1]) < 0.95 * (corner_box[2] - corner_box[0]) * (corner_box[3] - corner_box[1])


def test_lighting_changes_pixels_but_not_masks(asymmetric_dict):
    np.random.seed(1)
    mapper = module_train.ShipDatasetMapper(_cfg(LIGHTING_STD=0.1), SIZE, is_train=True)
    plain = module_train.ShipDatasetMapper(_cfg(), SIZE, is_train=True)(asymmetric_dict)
    changed = 0
    for _ in range(5):
        out = mapper(asymmetric_dict)
        np.testing.assert_array_equal(out["instances"].gt_masks.tensor, plain["instances"].gt_masks.tensor)
        changed += not np.array_equal(out["image"].numpy(), plain["image"].numpy())
        np.testing.assert_array_equal(_bright(out["image"]), _mask_union(out["instances"]))
    assert changed == 5


def test_lighting_factor_std():
    np.random.seed(0)
    aug = module_train.RandomBrightnessContrast(0.1)
    factors = [aug.get_transform(np.full((4, 4, 3), 100, np.uint8)).transforms[0].dst_weight for _ in range(2000)]
    assert 0.09 < np.std(factors) < 0.11 and abs(np.mean(factors) - 1) < 0.01


@pytest.mark.parametrize("size", [32, 96])
def test_resize_to_stage_size_keeps_alignment(asymmetric_dict, size):
    out = module_train.ShipDatasetMapper(_cfg(), size, is_train=True)(asymmetric_dict)
    assert tuple(out["image"].shape) == (3, size, size)
    assert out["instances"].gt_masks.tensor.shape[1:] == (size, size)
    assert out["instances"].image_size == (size, size)
    assert _iou(_bright(out["image"]), _mask_union(out["instances"])) > 0.85


def test_mapper_deep_copies_its_input(asymmetric_dict):
    before = copy.deepcopy(asymmetric_dict)
    mapper = module_train.ShipDatasetMapper(_cfg(HFLIP_PROB=1.0, ROTATION_DEG=20.0, LIGHTING_STD=0.1), SIZE, is_train=True)
    mapper(asymmetric_dict)
    assert asymmetric_dict == before


def test_ship_free_image_and_masks_rotated_away(asymmetric_dict):
    empty = dict(asymmetric_dict, annotations=[])
    out = module_train.ShipDatasetMapper(_cfg(), SIZE, is_train=True)(empty)
    assert len(out["instances"]) == 0 and out["instances"].gt_boxes.tensor.shape == (0, 4)
    # a mask that lost every pixel is dropped (not kept with an empty box)
    corner = np.zeros((SIZE, SIZE), np.uint8)
    corner[0, 0] = 1
    rotated = T.RotationTransform(SIZE, SIZE, 20.0, expand=False).apply_segmentation(corner)
    assert rotated.sum() == 0
    assert len(module_train.masks_to_instances([rotated, _shapes()[1]], (SIZE, SIZE))) == 1


def test_inference_mapper_has_no_augmentation_or_instances(asymmetric_dict):
    out = module_train.ShipDatasetMapper(_cfg(HFLIP_PROB=1.0), 32, is_train=False)(asymmetric_dict)
    assert "instances" not in out and tuple(out["image"].shape) == (3, 32, 32)


def test_annotation_masks_decode_as_uint8_in_image_pixel_order(asymmetric_dict):
    """uint8, not bool: detectron2 resizes a segmentation through PIL for uint8 only."""
    masks = module_train.decode_annotation_masks(asymmetric_dict["annotations"], SIZE, SIZE)
    assert masks.dtype == np.uint8 and masks.shape == (2, SIZE, SIZE)
    np.testing.assert_array_equal(masks, np.stack(_shapes()))
    crowd = [dict(asymmetric_dict["annotations"][0], iscrowd=1), asymmetric_dict["annotations"][1]]
    assert len(module_train.decode_annotation_masks(crowd, SIZE, SIZE)) == 1  # crowd regions are not ships
    assert module_train.decode_annotation_masks([], SIZE, SIZE).shape == (0, SIZE, SIZE)


def test_validation_overlays_outline_truth_green_and_prediction_red():
    from module_plots import draw_outlines

    image = np.full((SIZE, SIZE, 3), 40, np.uint8)
    truth, prediction = _shapes()
    out = draw_outlines(image, [truth], [prediction])
    assert out.shape == image.shape and out.dtype == np.uint8 and (image == 40).all()  # a copy
    green = (out == (0, 255, 0)).all(axis=2)
    red = (out == (255, 0, 0)).all(axis=2)
    assert green[8, 10] and green[39, 29] and not green[20, 12]  # the L's corners, not its inside
    assert red[44, 44] and red[53, 57] and not red[48, 50]  # the square's corners, not its inside
    assert not (green | red)[0:5, :].any()  # nothing drawn away from the masks


def _areas(instances) -> list[int]:
    return sorted(int(m.sum()) for m in instances.gt_masks.tensor.numpy())


@pytest.mark.parametrize("seed", range(8))
def test_ship_crop_holds_a_whole_ship_and_keeps_masks_aligned(asymmetric_dict, seed):
    """A 32 px crop of the 64 px image: the L (32x20 px) and the square (10x14) each fit it, so
    the crop holds at least one of them whole, and image and masks still coincide."""
    np.random.seed(seed)
    out = module_train.ShipDatasetMapper(_cfg(CROP_SIZE=32), SIZE, is_train=True)(asymmetric_dict)
    assert tuple(out["image"].shape) == (3, 32, 32)
    instances = out["instances"]
    whole = [int(m.sum()) for m in _shapes()]
    assert set(_areas(instances)) & set(whole), (seed, _areas(instances), whole)
    assert _iou(_bright(out["image"]), _mask_union(instances)) > 0.95
    boxes = instances.gt_boxes.tensor.numpy()
    assert (boxes >= 0).all() and (boxes <= 32).all()


def test_ship_crop_after_resize_and_with_the_other_augmentations(asymmetric_dict):
    """The crop is cut from the stage-sized image (here 96 px), and flips and rotation follow it."""
    np.random.seed(0)
    cfg = _cfg(CROP_SIZE=40, HFLIP_PROB=0.5, VFLIP_PROB=0.5, ROTATION_DEG=20.0)
    for _ in range(5):
        out = module_train.ShipDatasetMapper(cfg, 96, is_train=True)(asymmetric_dict)
        assert tuple(out["image"].shape) == (3, 40, 40) and len(out["instances"]) >= 1
        assert _iou(_bright(out["image"]), _mask_union(out["instances"])) > 0.8


def test_ship_crop_on_a_ship_free_image_and_when_the_image_is_no_larger(asymmetric_dict, tmp_path):
    empty = dict(asymmetric_dict, annotations=[])
    out = module_train.ShipDatasetMapper(_cfg(CROP_SIZE=32), SIZE, is_train=True)(empty)
    assert tuple(out["image"].shape) == (3, 32, 32) and len(out["instances"]) == 0
    whole = module_train.ShipDatasetMapper(_cfg(CROP_SIZE=SIZE), SIZE, is_train=True)(asymmetric_dict)
    assert tuple(whole["image"].shape) == (3, SIZE, SIZE) and _areas(whole["instances"]) == sorted(int(m.sum()) for m in _shapes())
    evaluation = module_train.ShipDatasetMapper(_cfg(CROP_SIZE=32), SIZE, is_train=False)(asymmetric_dict)
    assert tuple(evaluation["image"].shape) == (3, SIZE, SIZE)  # never cropped outside training


def test_ship_crop_origin_holds_the_ship_or_its_centre():
    np.random.seed(0)
    origin = module_train.ShipCrop._origin
    starts = {origin(10, 30, 64, 32) for _ in range(200)}  # a 20 px ship in a 32 px crop: starts 0..10
    assert starts == set(range(0, 11))
    starts = {origin(50, 60, 64, 32) for _ in range(200)}  # near the far edge: the crop stops at the edge
    assert starts == set(range(28, 33))
    starts = {origin(0, 50, 64, 32) for _ in range(200)}  # larger than the crop: its centre (25) is inside
    assert all(s <= 25 < s + 32 for s in starts) and len(starts) > 1
