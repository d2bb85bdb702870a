"""Synthetic Kaggle-format ship data: the embedded default dataset (demo, tests, no download).

`generate_dataset` writes exactly the layout and formats of the Kaggle "Airbus Ship Detection
Challenge" download::

    out_dir/train_v2/<ImageId>.jpg             RGB JPEG tiles, image_size x image_size
    out_dir/train_ship_segmentations_v2.csv    ImageId,EncodedPixels: one row per ship, one row
                                               with blank EncodedPixels per ship-free image
    out_dir/test_v2/<ImageId>.jpg
    out_dir/sample_submission_v2.csv           every test ImageId, EncodedPixels "1 2" (as Kaggle's)
    out_dir/test_ship_segmentations.csv        the held-back test truth (Kaggle keeps its own)

ImageIds look like Kaggle's (9 lowercase hex digits + ".jpg"). EncodedPixels is Kaggle RLE
(column-major, 1-indexed), written by ``module_rle.rle_encode``. Masks of one image
never overlap: ships are rasterised into one label map, a later ship taking the pixels it shares
with an earlier one (painter's order, which is also how they are drawn).

What is drawn, all at random but deterministic given ``seed``:

- sea: a base colour, low-frequency brightness, a gradient, waves, pixel noise, whitecaps;
- ships: elongated hulls with a pointed bow and a lighter deck, in any orientation, about
  10 to 300 px long at 768 px (scaled with ``image_size``), several per image (counts roughly as
  in train_v2), some moored side by side or alongside a pier (touching), many with a wake;
- distractors, equally likely with and without ships: land with a beach and buildings,
  harbours (a straight quay with ship-like piers), clouds with their shadows.

Overlapping tiles: about `SCENE_SHARE` of the training images are crops of larger scenes,
`SCENE_GRID` x `SCENE_GRID` tiles at offsets of 256 px (scaled with ``image_size``:
`get_scene_step`), so tiles of a scene overlap by 2/3 as Kaggle's do, and a ship near the middle
appears, cut or whole, in several tiles with consistent masks. This is what an overlap-aware
train/validation split must group; the test images are all independent.

Files are written atomically; the training CSV last, so its presence marks a complete dataset.
Generating is a step of its own: the entry points (the notebook, ``run_notebook.py``, the
training and submission command lines) call :func:`prepare_synthetic_input`, which generates the
config's ``SYNTH`` dataset into ``PATHS.INPUT_DIR`` when it is missing or its settings changed.
Reading data (``module_preprocessing``) never writes any.

    python module_synthetic.py --config configs/demo.yaml          # the config's SYNTH dataset
    python module_synthetic.py --out input --n-train 400 --n-test 100 --image-size 256

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from tqdm.auto import tqdm

import module_config
from module_files import atomic_path
from module_rle import KAGGLE_SIZE, rle_encode

logger = logging.getLogger(__name__)

# Ship length range (px) at 768 px; scaled by image_size / 768. Lengths are log-uniform.
SHIP_LENGTH_RANGE = (10.0, 300.0)
# Relative frequency of 1, 2, ..., 15 ships in an image with ships (roughly train_v2's).
SHIP_COUNT_WEIGHTS = (60, 18, 8, 5, 3, 2, 1.5, 1, 0.7, 0.5, 0.4, 0.3, 0.2, 0.2, 0.2)
# Share of training images that are overlapping crops of a larger scene.
SCENE_SHARE = 0.15
# A scene is cut into SCENE_GRID x SCENE_GRID tiles at SCENE_STEP px offsets (at 768 px).
SCENE_GRID = 2
SCENE_STEP = 256
JPEG_QUALITY = 92
# Probability of each distractor in a scene (independent of whether it holds ships).
LAND_PROB = 0.2
HARBOUR_PROB = 0.12
CLOUD_PROB = 0.2
WHITECAP_PROB = 0.2

TRAIN_IMAGES = "train_v2"
TEST_IMAGES = "test_v2"
TRAIN_CSV = "train_ship_segmentations_v2.csv"
SAMPLE_SUBMISSION = "sample_submission_v2.csv"
TEST_TRUTH_CSV = "test_ship_segmentations.csv"

_SEA_COLOURS = np.array([  # RGB anchors seen in train_v2: navy, teals, blue-grey, green-grey, coastal
    (16, 36, 56), (22, 62, 66), (30, 88, 90), (44, 58, 74), (48, 64, 60), (62, 104, 104), (66, 72, 62),
], dtype=np.float32)
_LAND_COLOURS = np.array([(112, 100, 80), (82, 96, 62), (128, 124, 114), (98, 88, 70)], dtype=np.float32)
_HULL_COLOURS = np.array([  # white/grey hulls most often, then red, orange, blue, green, black
    (215, 215, 210), (185, 188, 190), (150, 152, 155), (170, 60, 50), (200, 120, 50),
    (60, 90, 160), (70, 130, 90), (40, 40, 42),
], dtype=np.float32)
_HULL_WEIGHTS = np.array([0.3, 0.2, 0.12, 0.1, 0.08, 0.08, 0.06, 0.06])


# ---------------------------------------------------------------- texture helpers
def _smooth_noise(rng: np.random.Generator, height: int, width: int, cell: float) -> np.ndarray:
    """(H, W) float32 value noise, roughly unit variance, features about ``cell`` px wide."""
    cell = max(float(cell), 1.0)
    rows, cols = int(math.ceil(height / cell)) + 3, int(math.ceil(width / cell)) + 3
    coarse = rng.standard_normal((rows, cols)).astype(np.float32)
    big = cv2.resize(coarse, (int(cols * cell), int(rows * cell)), interpolation=cv2.INTER_CUBIC)
    top, left = int(rng.integers(0, max(1, big.shape[0] - height))), int(rng.integers(0, max(1, big.shape[1] - width)))
    return big[top:top + height, left:left + width]


def _fbm(rng: np.random.Generator, height: int, width: int, cell: float, octaves: int = 3) -> np.ndarray:
    """(H, W) float32 fractal noise: octaves of `_smooth_noise`, halving the cell and the amplitude."""
    total = np.zeros((height, width), np.float32)
    for octave in range(octaves):
        total += _smooth_noise(rng, height, width, cell / 2 ** octave) * 0.5 ** octave
    return total / np.sqrt(sum(0.25 ** o for o in range(octaves)))


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    return xs, ys


def _rotated_rectangle(center, length: float, width: float, angle: float) -> np.ndarray:
    """(4, 2) float corners (x, y) of a rectangle whose long axis points at ``angle`` (radians)."""
    direction, normal = np.array([math.cos(angle), math.sin(angle)]), np.array([-math.sin(angle), math.cos(angle)])
    corners = [(-0.5, -0.5), (0.5, -0.5), (0.5, 0.5), (-0.5, 0.5)]
    return np.array([np.asarray(center) + u * length * direction + v * width * normal for u, v in corners])


def _fill(canvas: np.ndarray, polygon: np.ndarray, value) -> None:
    """Fill a float (x, y) polygon into ``canvas`` in place, with 1/16 px precision."""
    points = np.round(np.asarray(polygon) * 16).astype(np.int32).reshape(-1, 1, 2)
    cv2.fillPoly(canvas, [points], value, lineType=cv2.LINE_8, shift=4)


# ---------------------------------------------------------------- scene layers
def _draw_sea(rng, height, width, scale) -> np.ndarray:
    """(H, W, 3) float32 RGB sea: base colour, slow brightness, gradient, waves, noise."""
    xs, ys = _grid(height, width)
    base = _SEA_COLOURS[rng.integers(len(_SEA_COLOURS))] + rng.normal(0, 6, 3).astype(np.float32)
    light = _fbm(rng, height, width, 220 * scale) * rng.uniform(3, 12)
    angle = rng.uniform(0, 2 * math.pi)
    ramp = (xs * math.cos(angle) + ys * math.sin(angle)) / max(height, width) * rng.uniform(-14, 14)
    wave_angle, wavelength = rng.uniform(0, math.pi), rng.uniform(7, 24) * scale + 2
    warp = _smooth_noise(rng, height, width, 40 * scale) * 3
    phase = (xs * math.cos(wave_angle) + ys * math.sin(wave_angle)) / wavelength * 2 * math.pi + warp
    swell = np.clip(_smooth_noise(rng, height, width, 120 * scale), 0, None)  # waves show in patches
    waves = np.sin(phase) * rng.uniform(0.5, 2.5) * swell
    chop = _smooth_noise(rng, height, width, 3 * scale + 1) * rng.uniform(1, 3)  # fine ripples
    brightness = light + ramp + waves + chop + rng.normal(0, rng.uniform(1, 3), (height, width)).astype(np.float32)
    sea = base[None, None, :] + brightness[..., None] * np.array([0.9, 1.0, 1.05], np.float32)
    if rng.random() < WHITECAP_PROB:  # rough sea: small bright specks, smaller than any ship
        n_caps = int(rng.integers(20, 120) * height * width / KAGGLE_SIZE ** 2) + 1
        caps = np.zeros((height, width), np.float32)
        for x, y in zip(rng.uniform(0, width, n_caps), rng.uniform(0, height, n_caps)):
            cv2.circle(caps, (int(x), int(y)), max(1, int(rng.uniform(0.5, 2) * scale)), 1.0, -1)
        caps = cv2.GaussianBlur(caps, (0, 0), 0.8) * rng.uniform(40, 90)
        sea += caps[..., None]
    return sea


def _draw_land(rng, sea: np.ndarray, land: np.ndarray, scale: float) -> None:
    """Paint a textured land region with a beach and buildings onto ``sea``; mark it in ``land``.

    sea: (H, W, 3) float32 RGB, edited in place; land: (H, W) uint8 0/1, set where land is.
    """
    height, width = land.shape
    xs, ys = _grid(height, width)
    angle = rng.uniform(0, 2 * math.pi)
    field = _fbm(rng, height, width, 260 * scale) + (xs * math.cos(angle) + ys * math.sin(angle)) / max(height, width) * 4
    cover = rng.uniform(0.12, 0.45)
    region = (field > np.quantile(field, 1 - cover)).astype(np.uint8)
    _paint_land(rng, sea, region, scale)
    land |= region


def _paint_land(rng, sea, region, scale) -> None:
    height, width = region.shape
    colour = _LAND_COLOURS[rng.integers(len(_LAND_COLOURS))]
    texture = _fbm(rng, height, width, 30 * scale) * 18 + rng.normal(0, 6, (height, width)).astype(np.float32)
    ground = colour[None, None, :] + texture[..., None]
    # Buildings and fields: rectangles of other tones, some bright and ship-sized.
    blocks = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(10, 60) * height * width / KAGGLE_SIZE ** 2) + 2):
        rectangle = _rotated_rectangle((rng.uniform(0, width), rng.uniform(0, height)),
                                       rng.uniform(6, 60) * scale + 1, rng.uniform(4, 30) * scale + 1,
                                       rng.uniform(0, math.pi))
        _fill(blocks, rectangle, float(rng.uniform(-50, 90)))
    ground += blocks[..., None]
    beach = cv2.dilate(region, np.ones((3, 3), np.uint8), iterations=max(1, int(round(2 * scale)))) - region
    inside = region.astype(bool)
    sea[inside] = ground[inside]
    sea[beach.astype(bool)] = np.array([178, 168, 140], np.float32) + rng.normal(0, 8, 3).astype(np.float32)


def _draw_harbour(rng, sea: np.ndarray, land: np.ndarray, scale: float) -> list[np.ndarray]:
    """A straight quay with piers (ship-like bright rectangles) into the sea; returns the piers.

    Each pier is a (4, 2) float (x, y) polygon. ``land`` (H, W) uint8 is set on quay and piers.
    """
    height, width = land.shape
    xs, ys = _grid(height, width)
    angle = rng.uniform(0, 2 * math.pi)
    normal = np.array([math.cos(angle), math.sin(angle)])  # points from the quay into the sea
    offset = rng.uniform(0.1, 0.35) * min(height, width)
    centre = np.array([width / 2, height / 2]) - normal * (min(height, width) / 2 - offset)
    distance = (xs - centre[0]) * normal[0] + (ys - centre[1]) * normal[1]
    region = (distance < 0).astype(np.uint8)
    _paint_land(rng, sea, region, scale)
    land |= region
    piers = []
    along = np.array([-normal[1], normal[0]])
    concrete = rng.uniform(150, 205)
    for position in np.sort(rng.uniform(-0.6, 0.6, int(rng.integers(2, 6)))) * max(height, width):
        length, pier_width = rng.uniform(40, 220) * scale + 4, rng.uniform(5, 16) * scale + 2
        root = centre + along * position
        pier = _rotated_rectangle(root + normal * length / 2, length, pier_width, angle)
        piers.append(pier)
        mask = np.zeros((height, width), np.uint8)
        _fill(mask, pier, 1)
        sea[mask.astype(bool)] = concrete + rng.normal(0, 4, 3).astype(np.float32)
        land |= mask
    return piers


def _draw_clouds(rng, image: np.ndarray, scale: float) -> None:
    """Blend soft clouds (and their offset shadows) over ``image`` (H, W, 3) float32, in place."""
    height, width = image.shape[:2]
    field = _fbm(rng, height, width, 260 * scale, octaves=5)
    cover = rng.uniform(0.1, 0.5)
    threshold = np.quantile(field, 1 - cover)
    # A soft ramp above the threshold: wispy edges, thick cores.
    alpha = np.clip((field - threshold) * rng.uniform(0.25, 0.6), 0, rng.uniform(0.35, 0.8))
    shift = (int(rng.uniform(-20, 20) * scale), int(rng.uniform(-20, 20) * scale))
    shadow = np.roll(alpha, shift, axis=(0, 1))[..., None] * 0.35
    image *= 1 - shadow
    white = rng.uniform(215, 245)
    image[:] = image * (1 - alpha[..., None]) + white * alpha[..., None]


# ---------------------------------------------------------------- ships
def _hull_polygon(center, length: float, width: float, angle: float) -> np.ndarray:
    """(7, 2) float (x, y): a hull with a flat stern, straight sides and a pointed bow at ``angle``."""
    bow = min(0.35 * length, 1.6 * width)
    half = width / 2
    local = [(-length / 2, -0.8 * half), (-length / 2 + 0.2 * width, -half), (length / 2 - bow, -half),
             (length / 2, 0.0), (length / 2 - bow, half), (-length / 2 + 0.2 * width, half), (-length / 2, 0.8 * half)]
    direction, normal = np.array([math.cos(angle), math.sin(angle)]), np.array([-math.sin(angle), math.cos(angle)])
    return np.array([np.asarray(center) + u * direction + v * normal for u, v in local])


def _propose_ship(rng, ships: list[dict], piers: list[np.ndarray], height: int, width: int, scale: float) -> dict:
    """A random ship: free, moored beside an earlier ship (touching it), or alongside a pier.

    Returns {center (x, y), length, beam (px), angle (radians, bow direction), moving, touching}.
    """
    low, high = (max(4.0, v * scale) for v in SHIP_LENGTH_RANGE)
    length = float(math.exp(rng.uniform(math.log(low), math.log(high))))
    aspect = rng.uniform(3.5, 7.0)
    mode = rng.random()
    touching = True
    if ships and mode < 0.3:  # side by side with an earlier ship, same heading
        other = ships[int(rng.integers(len(ships)))]
        length = float(np.clip(other["length"] * rng.uniform(0.7, 1.3), low, high))
        beam = max(2.0, length / aspect)
        angle = other["angle"] + rng.normal(0, 0.03)
        normal = np.array([-math.sin(angle), math.cos(angle)])
        direction = np.array([math.cos(angle), math.sin(angle)])
        center = (other["center"] + rng.choice([-1.0, 1.0]) * normal * (other["beam"] + beam) / 2
                  + direction * rng.uniform(-0.3, 0.3) * length)
        moving = False
    elif piers and mode < 0.55:  # alongside a pier, bow out or in
        pier = piers[int(rng.integers(len(piers)))]
        root, tip = (pier[0] + pier[3]) / 2, (pier[1] + pier[2]) / 2
        pier_width = float(np.linalg.norm(pier[3] - pier[0]))
        axis = (tip - root) / max(float(np.linalg.norm(tip - root)), 1e-6)
        normal = np.array([-axis[1], axis[0]])
        beam = max(2.0, length / aspect)
        angle = math.atan2(axis[1], axis[0]) + (math.pi if rng.random() < 0.5 else 0.0)
        center = (root + (tip - root) * rng.uniform(0.3, 0.8)
                  + rng.choice([-1.0, 1.0]) * normal * ((pier_width + beam) / 2 + 0.5))
        moving = False
    else:
        beam = max(2.0, length / aspect)
        angle = rng.uniform(0, 2 * math.pi)
        center = np.array([rng.uniform(0, width), rng.uniform(0, height)])
        moving = bool(rng.random() < 0.6)
        touching = False
    return {"center": np.asarray(center, dtype=np.float64), "length": length, "beam": beam,
            "angle": float(angle), "moving": moving, "touching": touching}


def _place_ships(rng, n_ships: int, land: np.ndarray, piers: list[np.ndarray], scale: float) -> tuple[np.ndarray, list[dict]]:
    """Place up to ``n_ships`` hulls on the sea; returns the label map and the ships.

    labels: (H, W) int32, 0 for no ship, k for the k-th ship of the list (1-based). Each pixel
    has one label, so masks never overlap: where two hulls share pixels (touching ships), the
    later one takes them. A free ship may not touch land or another ship; a moored one may
    share up to 40% of its pixels with its neighbour (a 1 px seam for slim hulls).
    """
    height, width = land.shape
    labels = np.zeros((height, width), np.int32)
    ships: list[dict] = []
    for _ in range(40 * n_ships):
        if len(ships) == n_ships:
            break
        ship = _propose_ship(rng, ships, piers, height, width, scale)
        cx, cy = ship["center"]
        if not (0 <= cx < width and 0 <= cy < height):
            continue
        polygon = _hull_polygon(ship["center"], ship["length"], ship["beam"], ship["angle"])
        x0, y0 = (max(0, int(math.floor(v)) - 1) for v in polygon.min(axis=0))
        x1, y1 = min(width, int(math.ceil(polygon[:, 0].max())) + 2), min(height, int(math.ceil(polygon[:, 1].max())) + 2)
        if x1 <= x0 or y1 <= y0:
            continue
        footprint = np.zeros((y1 - y0, x1 - x0), np.uint8)
        _fill(footprint, polygon - (x0, y0), 1)
        footprint = footprint.astype(bool)
        area = int(footprint.sum())
        if area == 0:
            continue
        allowed, land_allowed = (0.4, 0.1) if ship["touching"] else (0.0, 0.0)
        if land[y0:y1, x0:x1][footprint].sum() > land_allowed * area:
            continue
        shared = np.bincount(labels[y0:y1, x0:x1][footprint], minlength=len(ships) + 1)[1:]
        if shared.sum() > allowed * area or any(n > allowed * s["area"] for n, s in zip(shared, ships)):
            continue
        labels[y0:y1, x0:x1][footprint] = len(ships) + 1
        ship.update(polygon=polygon, bbox=(x0, y0, x1, y1), area=area)
        ships.append(ship)
    return labels, ships


def _local_coordinates(ship: dict, x0: int, y0: int, x1: int, y1: int) -> tuple[np.ndarray, np.ndarray]:
    """(u, v) of the pixel centres of a box: u along the bow direction, v across, from the ship centre."""
    xs, ys = np.meshgrid(np.arange(x0, x1, dtype=np.float32), np.arange(y0, y1, dtype=np.float32))
    dx, dy = xs - ship["center"][0], ys - ship["center"][1]
    cos, sin = math.cos(ship["angle"]), math.sin(ship["angle"])
    return dx * cos + dy * sin, -dx * sin + dy * cos


def _draw_wake(rng, image: np.ndarray, ship: dict) -> None:
    """Blend a foam trail and Kelvin arms behind a moving ship into ``image`` (H, W, 3) float32."""
    height, width = image.shape[:2]
    length, beam = ship["length"], ship["beam"]
    wake_length = length * rng.uniform(1.5, 4.0)
    direction = np.array([math.cos(ship["angle"]), math.sin(ship["angle"])])
    stern = ship["center"] - direction * length / 2
    end = stern - direction * wake_length
    reach = wake_length * 0.4 + beam
    x0, x1 = int(max(0, min(stern[0], end[0]) - reach)), int(min(width, max(stern[0], end[0]) + reach + 1))
    y0, y1 = int(max(0, min(stern[1], end[1]) - reach)), int(min(height, max(stern[1], end[1]) + reach + 1))
    if x1 <= x0 or y1 <= y0:
        return
    u, v = _local_coordinates(ship, x0, y0, x1, y1)
    behind = np.clip(-(u + length / 2), 0, None)  # distance behind the stern
    core = np.exp(-(v / (0.5 * beam + 0.12 * behind)) ** 2) * np.exp(-behind / (0.5 * wake_length))
    arms = np.exp(-((np.abs(v) - 0.354 * behind) / (0.5 * beam + 1)) ** 2) * np.exp(-behind / (0.35 * wake_length)) * 0.5
    alpha = np.clip((core + arms) * (behind > 0) * rng.uniform(0.25, 0.6), 0, 0.8)[..., None]
    foam = np.float32(rng.uniform(190, 235))
    image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1 - alpha) + foam * alpha


def _paint_hull(rng, image: np.ndarray, labels: np.ndarray, label: int, ship: dict) -> None:
    """Paint ship ``label``'s pixels of ``labels`` with a shaded hull, a deck and a bridge."""
    x0, y0, x1, y1 = ship["bbox"]
    inside = labels[y0:y1, x0:x1] == label
    if not inside.any():
        return
    colour = _HULL_COLOURS[rng.choice(len(_HULL_COLOURS), p=_HULL_WEIGHTS)] + rng.normal(0, 8, 3).astype(np.float32)
    # Keep the hull visibly distinct from the water around it (learnable), else make it white.
    sea_luminance = float(image[y0:y1, x0:x1][inside].mean())
    if abs(float(colour.mean()) - sea_luminance) < 50:
        colour = np.float32(rng.uniform(170, 235)) + rng.normal(0, 8, 3).astype(np.float32)
    u, v = _local_coordinates(ship, x0, y0, x1, y1)
    length, beam = ship["length"], ship["beam"]
    across = np.clip(v / (beam / 2), -1, 1)
    # Sunlit on one side, darker towards the rails; a little paint and rust noise.
    shade = (1 + 0.15 * across * rng.choice([-1.0, 1.0])) * (1 - 0.15 * across ** 4)
    pixels = colour[None, None, :] * shade[..., None] + rng.normal(0, 5, (*shade.shape, 3)).astype(np.float32)
    if length >= 16:  # decks and bridges show only on ships a few pixels wide
        deck = (np.abs(v) < 0.3 * beam) & (u > -0.35 * length) & (u < 0.2 * length)
        bridge = (np.abs(v) < 0.38 * beam) & (u > -0.45 * length) & (u < -0.3 * length)
        deck_colour = np.clip(colour * rng.uniform(0.7, 1.3), 0, 255)
        pixels[deck] = deck_colour
        pixels[bridge] = np.float32(rng.uniform(215, 250))
    region = image[y0:y1, x0:x1]
    region[inside] = pixels[inside]


def _region_counts(n_ships, ship_region, height: int, width: int) -> list[int]:
    """The ship counts of :func:`render_scene`: ``[n_ships]`` without regions, else one per region."""
    if ship_region is None:
        return [int(n_ships)]
    if np.shape(ship_region) != (height, width):
        raise ValueError(f"ship_region has shape {np.shape(ship_region)}, expected ({height}, {width})")
    counts = [int(n) for n in np.atleast_1d(n_ships)]
    if len(counts) != int(np.max(ship_region, initial=0)):
        raise ValueError(f"ship_region has {int(np.max(ship_region, initial=0))} regions, n_ships {len(counts)} counts")
    return counts


def label_boxes(labels: np.ndarray, count: int) -> list[tuple[slice, slice] | None]:
    """The bounding box ``(rows, cols)`` slices of labels 1..``count`` of an (H, W) int map (None
    for a label that is absent), as ``scipy.ndimage.find_objects`` gives them."""
    flat = np.flatnonzero(labels)
    keys = labels.ravel()[flat]
    rows, cols = np.divmod(flat, labels.shape[1])
    low = np.full((2, count + 1), np.iinfo(np.int64).max)
    high = np.full((2, count + 1), -1)
    for axis, values in enumerate((rows, cols)):
        np.minimum.at(low[axis], keys, values)
        np.maximum.at(high[axis], keys, values)
    return [(slice(int(low[0, k]), int(high[0, k]) + 1), slice(int(low[1, k]), int(high[1, k]) + 1))
            if high[0, k] >= 0 else None for k in range(1, count + 1)]


def _place_ships_by_region(rng, counts, land: np.ndarray, piers: list[np.ndarray], scale: float,
                           region: np.ndarray) -> tuple[np.ndarray, list[dict]]:
    """:func:`_place_ships` region by region (``region`` == k holds ``counts[k - 1]`` ships), each
    within the region's bounding box and kept out of land, of the other regions and of the ships
    already placed; one label map, the ships in scene coordinates."""
    labels = np.zeros(land.shape, np.int32)
    ships: list[dict] = []
    for k, (count, box) in enumerate(zip(counts, label_boxes(region, len(counts))), start=1):
        if count <= 0 or box is None:
            continue
        y0, x0 = box[0].start, box[1].start
        keep_out = (land[box].astype(bool) | (region[box] != k) | (labels[box] > 0)).astype(np.uint8)
        shift = np.array([x0, y0], np.float64)
        more_labels, more = _place_ships(rng, count, keep_out, [pier - shift for pier in piers], scale)
        labels[box][more_labels > 0] = more_labels[more_labels > 0] + len(ships)
        for ship in more:  # into scene coordinates
            bx0, by0, bx1, by1 = ship["bbox"]
            ship.update(center=ship["center"] + shift, polygon=ship["polygon"] + shift,
                        bbox=(bx0 + x0, by0 + y0, bx1 + x0, by1 + y0))
        ships += more
    return labels, ships


def render_scene(rng: np.random.Generator, height: int, width: int, n_ships,
                 scale: float = 1.0, ship_region: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Draw one scene; returns (image (H, W, 3) uint8 RGB, labels (H, W) int32).

    labels holds 0 for no ship and k for the k-th ship (1-based, ships never share a pixel).
    ``n_ships`` > 0 guarantees at least one ship (retrying the layout); 0 guarantees none.
    ``scale``: image_size / 768, the size of ships, textures and distractors relative to Kaggle's.
    ``ship_region``: an (H, W) int map of where ships may lie, 0 nowhere, k > 0 the k-th region,
    each region with its own ships (``n_ships`` then a sequence, the k-th region's count at k - 1),
    kept out of the rest as out of land, moored beside ships of their own region only: e.g. the
    ship cells of a large scene, as many ships in each as in a tile (``bench/bench_detect.py``).
    Without it, ``n_ships`` (an int) anywhere on the sea.
    """
    counts = _region_counts(n_ships, ship_region, height, width)
    for attempt in range(6):
        image = _draw_sea(rng, height, width, scale)
        land = np.zeros((height, width), np.uint8)
        piers: list[np.ndarray] = []
        kind = rng.random()
        if attempt < 4:  # if ships find no room, later attempts drop the land
            if kind < HARBOUR_PROB:
                piers = _draw_harbour(rng, image, land, scale)
            elif kind < HARBOUR_PROB + LAND_PROB:
                _draw_land(rng, image, land, scale)
        if ship_region is None:
            labels, ships = _place_ships(rng, counts[0], land, piers, scale)
        else:
            labels, ships = _place_ships_by_region(rng, counts, land, piers, scale, ship_region)
        if sum(counts) == 0 or ships:
            break
    else:
        raise RuntimeError(f"could not place any of {sum(counts)} ships on a {height}x{width} scene")
    for ship in ships:
        if ship["moving"]:
            _draw_wake(rng, image, ship)
    for label, ship in enumerate(ships, start=1):
        _paint_hull(rng, image, labels, label, ship)
    image = cv2.GaussianBlur(image, (0, 0), 0.6)  # optics: no edge is perfectly sharp
    if rng.random() < CLOUD_PROB:
        _draw_clouds(rng, image, scale)
    image += rng.normal(0, 1.5, image.shape).astype(np.float32)
    return np.clip(image, 0, 255).astype(np.uint8), labels


# ---------------------------------------------------------------- dataset
def _image_ids(seed: int, count: int) -> list[str]:
    """``count`` distinct Kaggle-like ImageIds ("9 hex digits.jpg"), deterministic by seed."""
    rng = np.random.default_rng([seed, 7])
    ids: list[str] = []
    seen: set[str] = set()
    while len(ids) < count:
        for value in rng.integers(0, 16 ** 9, size=count - len(ids), dtype=np.int64):
            name = f"{int(value):09x}.jpg"
            if name not in seen:
                seen.add(name)
                ids.append(name)
    return ids


def ship_count(rng) -> int:
    """The ship count of a generated ship tile: 1 to 15, roughly as in train_v2 (SHIP_COUNT_WEIGHTS)."""
    weights = np.asarray(SHIP_COUNT_WEIGHTS, dtype=np.float64)
    return int(rng.choice(len(weights), p=weights / weights.sum())) + 1


def _rles(labels: np.ndarray) -> list[str]:
    """Kaggle RLE strings of the ships of a label map, in label order; [] when there is none."""
    present = np.unique(labels)
    return [rle_encode((labels == k).astype(np.uint8)) for k in present[present > 0]]


def encode_jpeg(image: np.ndarray, what: str = "an image") -> bytes:
    """(H, W, 3) uint8 RGB -> the generator's JPEG bytes (OpenCV, quality ``JPEG_QUALITY``)."""
    ok, buffer = cv2.imencode(".jpg", np.ascontiguousarray(image[..., ::-1]), [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for {what}")
    return buffer.tobytes()


def _write_jpeg(path: Path, image: np.ndarray) -> None:
    data = encode_jpeg(image, str(path))
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> None:
    frame = pd.DataFrame(rows, columns=["ImageId", "EncodedPixels"])
    frame = frame.sort_values("ImageId", kind="stable")  # Kaggle's files are sorted by ImageId
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False)


def get_scene_step(image_size: int) -> int:
    """Offset (px) between neighbouring tiles of a scene: 256 at 768 px, scaled and rounded.

    At 768 px the offset is a multiple of JPEG's 16 px blocks, so the pixels two tiles share
    decode almost bit-identically, as in Kaggle; at other sizes (85 px at 256) they differ by
    about one grey level (JPEG blocks fall differently).
    """
    return int(round(SCENE_STEP * image_size / KAGGLE_SIZE))


def get_dataset_paths(out_dir: str | os.PathLike) -> dict[str, Path]:
    """The Kaggle-layout paths under ``out_dir`` (what `generate_dataset` writes)."""
    out = Path(out_dir)
    return {"train_images": out / TRAIN_IMAGES, "train_csv": out / TRAIN_CSV, "test_images": out / TEST_IMAGES,
            "sample_submission": out / SAMPLE_SUBMISSION, "test_truth": out / TEST_TRUTH_CSV}


def generate_dataset(out_dir: str | os.PathLike, n_train: int, n_test: int, seed: int = 0,
                     empty_fraction: float = 0.78, image_size: int = KAGGLE_SIZE,
                     overwrite: bool = False) -> dict[str, Path]:
    """Write a synthetic dataset in Kaggle's layout under ``out_dir``; returns `get_dataset_paths`.

    n_train, n_test: numbers of images. empty_fraction: share of ship-free images, in each of
    train and test (met exactly up to rounding). image_size: side of the square tiles (px).
    Identical arguments give identical files. An existing dataset there is an error unless
    ``overwrite`` (which first deletes the JPEGs of train_v2/ and test_v2/ and the CSVs).
    """
    if n_train < 0 or n_test < 0:
        raise ValueError(f"n_train and n_test must be >= 0, got {n_train}, {n_test}")
    if not 0.0 <= empty_fraction <= 1.0:
        raise ValueError(f"empty_fraction must be in [0, 1], got {empty_fraction}")
    if image_size < 32:
        raise ValueError(f"image_size must be >= 32 px, got {image_size}")
    paths = get_dataset_paths(out_dir)
    existing = [paths[k] for k in ("train_csv", "sample_submission", "test_truth") if paths[k].exists()]
    existing += [d for d in (paths["train_images"], paths["test_images"]) if d.is_dir() and any(d.glob("*.jpg"))]
    if existing and not overwrite:
        raise FileExistsError(f"{out_dir} already holds data ({existing[0]}); pass overwrite=True (--overwrite)")
    for path in existing:
        for jpeg in ([path] if path.is_file() else path.glob("*.jpg")):
            jpeg.unlink()
    paths["train_images"].mkdir(parents=True, exist_ok=True)
    paths["test_images"].mkdir(parents=True, exist_ok=True)

    scale = image_size / KAGGLE_SIZE
    ids = _image_ids(seed, n_train + n_test)
    train_ids, test_ids = ids[:n_train], ids[n_train:]
    progress = tqdm(total=n_train + n_test, desc="synthetic images", unit="img", disable=None)

    # Training: first the overlapping tiles of larger scenes, then independent tiles.
    train_rows: list[tuple[str, str]] = []
    tiles_per_scene = SCENE_GRID * SCENE_GRID
    n_scenes = int(round(SCENE_SHARE * n_train / tiles_per_scene))
    step = get_scene_step(image_size)
    scene_side = image_size + step * (SCENE_GRID - 1)
    next_id = iter(train_ids)
    n_empty_scene_tiles = 0
    for scene in range(n_scenes):
        rng = np.random.default_rng([seed, 1, scene])
        # A scene covers (scene_side / image_size)^2 tiles' worth of sea: more ships.
        n_ships = min(ship_count(rng) + ship_count(rng), 2 * len(SHIP_COUNT_WEIGHTS))
        image, labels = render_scene(rng, scene_side, scene_side, n_ships, scale)
        for row in range(SCENE_GRID):
            for col in range(SCENE_GRID):
                image_id = next(next_id)
                top, left = row * step, col * step
                tile_labels = labels[top:top + image_size, left:left + image_size]
                _write_jpeg(paths["train_images"] / image_id, image[top:top + image_size, left:left + image_size])
                rles = _rles(tile_labels)
                n_empty_scene_tiles += not rles
                train_rows += [(image_id, r) for r in rles] or [(image_id, "")]
                progress.update()
    n_independent = n_train - n_scenes * tiles_per_scene
    n_empty = int(np.clip(round(empty_fraction * n_train) - n_empty_scene_tiles, 0, n_independent))
    train_rows += _write_independent(paths["train_images"], list(next_id), n_empty, seed, 2, image_size, progress)

    # Test: independent tiles only.
    test_rows = _write_independent(paths["test_images"], test_ids, int(round(empty_fraction * n_test)),
                                   seed, 3, image_size, progress)
    progress.close()

    _write_csv(paths["test_truth"], test_rows)
    _write_csv(paths["sample_submission"], [(image_id, "1 2") for image_id in test_ids])
    _write_csv(paths["train_csv"], train_rows)  # last: its presence marks a complete dataset
    logger.info("synthetic dataset: %d train images (%d in %d overlapping scenes), %d test images, %d px, in %s",
                n_train, n_scenes * tiles_per_scene, n_scenes, n_test, image_size, out_dir)
    return paths


def _write_independent(folder: Path, image_ids: list[str], n_empty: int, seed: int, stream: int,
                       image_size: int, progress) -> list[tuple[str, str]]:
    """Render and write independent tiles, ``n_empty`` of them ship-free; returns their CSV rows."""
    order = np.random.default_rng([seed, stream, 10 ** 9]).permutation(len(image_ids))
    empty = set(order[:n_empty].tolist())
    rows: list[tuple[str, str]] = []
    scale = image_size / KAGGLE_SIZE
    for index, image_id in enumerate(image_ids):
        rng = np.random.default_rng([seed, stream, index])
        n_ships = 0 if index in empty else ship_count(rng)
        image, labels = render_scene(rng, image_size, image_size, n_ships, scale)
        _write_jpeg(folder / image_id, image)
        rows += [(image_id, r) for r in _rles(labels)] or [(image_id, "")]
        progress.update()
    return rows


# ---------------------------------------------------------------- the config's dataset
SYNTH_MANIFEST = "synthetic.json"  # written beside generated data: the settings it was made with


def get_synthetic_settings(cfg) -> dict:
    """The :func:`generate_dataset` arguments of the config's ``SYNTH`` keys."""
    return {"n_train": int(cfg.SYNTH.N_TRAIN), "n_test": int(cfg.SYNTH.N_TEST), "seed": int(cfg.SYNTH.SEED),
            "empty_fraction": float(cfg.SYNTH.EMPTY_FRACTION), "image_size": int(cfg.SYNTH.IMAGE_SIZE)}


def prepare_synthetic_input(cfg) -> Path | None:
    """With ``SYNTH.ENABLED``, make sure ``PATHS.INPUT_DIR`` holds the config's synthetic dataset;
    returns the folder (None when the config uses real data: nothing is done).

    The dataset is generated when its training CSV is absent, and regenerated when the ``SYNTH``
    settings changed since, but only over data this function generated (it leaves a
    ``synthetic.json`` manifest; a folder without one is never overwritten).
    """
    import json

    if not cfg.SYNTH.ENABLED:
        return None
    input_dir = Path(cfg.PATHS.INPUT_DIR)
    wanted = get_synthetic_settings(cfg)
    manifest = input_dir / SYNTH_MANIFEST
    have = json.loads(manifest.read_text()) if manifest.is_file() else None
    train_csv = module_config.get_input_path(cfg, cfg.DATA.TRAIN_CSV)
    if not train_csv.is_file() or (have is not None and have != wanted):
        logger.info("generating a synthetic Kaggle-format dataset in %s (%s)", input_dir, wanted)
        generate_dataset(input_dir, overwrite=have is not None, **wanted)
        with atomic_path(manifest) as tmp:
            tmp.write_text(json.dumps(wanted, indent=1))
    return input_dir


# ---------------------------------------------------------------- command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Write a synthetic dataset in the Kaggle Airbus layout: the config's "
                                                 "SYNTH dataset into PATHS.INPUT_DIR, or as the options say.")
    parser.add_argument("--out", default=None, help="output folder (gets train_v2/, test_v2/ and the CSVs); "
                                                     "default PATHS.INPUT_DIR of the config")
    parser.add_argument("--n-train", type=int, default=None, help="number of training images (default SYNTH.N_TRAIN)")
    parser.add_argument("--n-test", type=int, default=None, help="number of test images (default SYNTH.N_TEST)")
    parser.add_argument("--seed", type=int, default=None, help="same seed, same files (default SYNTH.SEED)")
    parser.add_argument("--empty-fraction", type=float, default=None,
                        help="share of ship-free images (default SYNTH.EMPTY_FRACTION)")
    parser.add_argument("--image-size", type=int, default=None,
                        help="side of the square tiles in px (default SYNTH.IMAGE_SIZE)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--contact-sheet", default="", help="also save a PNG of training images with ships outlined")
    module_config.add_config_args(parser)
    return parser


def main(args: argparse.Namespace) -> dict[str, Path]:
    module_config.setup_logging()
    cfg = module_config.get_cfg_from_args(args)
    settings = get_synthetic_settings(cfg)
    for key in settings:
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    paths = generate_dataset(args.out or cfg.PATHS.INPUT_DIR, overwrite=args.overwrite, **settings)
    if args.contact_sheet:
        import module_plots  # pictures only when asked for

        module_plots.save_figure(module_plots.plot_submission_overlays(paths["train_csv"], paths["train_images"],
                                                                       count=12), args.contact_sheet)
    for name, path in paths.items():
        print(f"{name}: {path}")
    return paths


if __name__ == "__main__":
    main(get_args_parser().parse_args())
