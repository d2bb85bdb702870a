"""Ships in scenes of any size: sliced, gated detection -> GeoJSON, COCO results, a CSV of measured ships.

A scene (JPEG, PNG or GeoTIFF of any size; folders of them) is cut into square slices of the
models' working size (``DETECT.TILE_SIZE``, by default ``DATA.IMAGE_SIZE``) overlapping by
``DETECT.OVERLAP`` px, and each slice goes through the run's models exactly as a Kaggle tile does::

    slice --nodata only?--> skipped          (GeoTIFF nodata / mask / alpha)
          --classifier--> p_ship < threshold --> skipped (the gate: most of a maritime scene is sea)
          --detector (batched)--> score threshold, overlap removal inside the slice
    all slices --> merge across slice borders --> overlap removal between ships --> min area
               --> per ship: outline, area, minimum-area rotated rectangle --> outputs

* **The gate** keeps a slice when its p_ship reaches the run's tuned classifier threshold, lowered
  to the scene gate (``DETECT.GATE_SHIP_RECALL``, ``module_inference.get_scene_thresholds``): the
  submission's threshold is tuned for the Kaggle F2 and drops ship tiles; in a scene the gate is
  there for speed, and keeps the share of the validation ships the detector finds that the key
  says. ``SUBMIT.CLASSIFIER_THRESHOLD`` on the command line wins; 0 turns the gate off.
* **Reading** (:func:`open_scene`): GeoTIFFs through rasterio, in windows (a 20,000 px scene is
  never in memory at full resolution): bands ``DETECT.BANDS`` as RGB, 8-bit data as they are and
  other types stretched per band from the ``DETECT.STRETCH_PERCENTILES`` (2-98) of a decimated
  read (``DETECT.STRETCH``), nodata (nodata value, mask band or alpha) skipped. JPEG and PNG are
  decoded whole (``module_files.read_image``).
* **Merging** (:func:`merge_detections`): masks live per detection as a COCO RLE of their bounding
  box crop plus the crop's place in the scene (:class:`Detection`), never as a scene-sized array.
  Two detections from different slices are one ship when their masks' IoU inside the two slices'
  common band is >= ``DETECT.MERGE_IOU`` (a ship cut by one slice's border and whole or cut
  elsewhere in the other; a duplicate of a ship inside the band); the ship is the union of its
  pieces with the highest score, at most one piece per slice. Then, as in the submission, each
  pixel goes to the highest-scoring ship and ships under ``SUBMIT.MIN_AREA`` px are dropped
  (:func:`remove_overlaps`, the semantics of ``module_inference.resolve_overlaps``).
* **Measures** (:func:`measure_ships`): area; the minimum-area rectangle enclosing the mask's
  pixels (``cv2.minAreaRect`` on the corners of its contour pixels): centre, length, width and
  heading (the long axis, degrees clockwise from the image's up, in [0, 180): a mask does not tell
  bow from stern); for a georeferenced scene also in metres on the ground (a local east/north
  frame at each ship on the WGS84 ellipsoid, whatever the CRS), the centre in the CRS and in
  lon/lat, and the heading from true north.
* **Outputs** per scene, written atomically into ``--out``: ``<scene>.geojson`` (polygons tracing
  the mask's pixel edges, in the raster's CRS or EPSG:4326 (``DETECT.GEOJSON_CRS``), or in pixel
  coordinates, said so in the file), ``<scene>_coco.json`` (COCO results, RLE at scene size),
  ``<scene>_ships.csv``, ``<scene>_quicklook.png``; for the run ``report.json`` (tiles total,
  skipped for nodata, gated out, detected; ships; time) and ``report_failures.csv``.
* **Scale-out**: under ``torchrun`` every rank takes every world-size-th slice of all scenes,
  rank 0 gathers the slices' detections (gloo) and merges; ``--shard i/n`` does the same over
  machines (each writes ``detect_shard<i>of<n>.json``) and ``merge`` combines the shard files.

Command line (trailing ``KEY VALUE`` pairs override the config; put them last)::

    python module_detect.py --config configs/demo.yaml --images scene.tif --out runs/demo/detect
    python module_detect.py --config C --images scenes/ --out DIR --format geojson,csv --tile 768 --overlap 128
    torchrun --nproc_per_node 4 module_detect.py --config C --images big.tif --out DIR
    python module_detect.py --config C --images scenes/ --out DIR --shard 0/3     # on three machines
    python module_detect.py merge --shards DIR/detect_shard0of3.json ... --out DIR

Layering: imports ``module_inference`` (models, thresholds, the gate), ``module_config``,
``module_files``, ``module_rle`` and ``module_plots``; nothing imports it. Masks are ``(H, W)`` or
``(N, H, W)`` bool arrays in image pixel order (row, column); COCO RLE is column-major.

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

import module_config
import module_plots
from module_config import DETECT_FORMATS, parse_shard
from module_files import (TooManyFailures, atomic_path, check_failure_limit, get_failure_report_path, read_image,
                          write_failure_report, write_text_atomic)
from module_inference import (DetectFn, PShipArrayFn, Thresholds, apply_thresholds, build_detect_fn,
                              build_p_ship_array_fn, get_scene_thresholds)
from module_rle import masks_to_coco

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # decoded whole by module_files.read_image
RASTER_SUFFIXES = (".tif", ".tiff")  # read in windows through rasterio
SCENE_SUFFIXES = IMAGE_SUFFIXES + RASTER_SUFFIXES  # what a folder given to --images contributes
PART_VERSION = 1  # layout of a shard file
# Where a run's time goes (the report's "step_seconds", summed over processes): waiting for slices
# to be read (the reading itself overlaps the models), the gate, the detector, its masks turned
# into scene detections; and, in `finish`, merging, measuring and writing the outputs.
STEPS = ("read_wait", "gate", "detector", "slice_masks")
SHIP_CATEGORY_ID = 1  # category_id of every COCO result
PIXEL_COORDINATES_NOTE = ("pixel coordinates: x = column, y = row, in pixels from the top-left corner of the "
                          "scene (y points down; the centre of the top-left pixel is (0.5, 0.5)); the scene has "
                          "no georeferencing")
# The rectangle through the outermost contour pixel centres falls short of a straight edge by 0 to
# 1 px (half a pixel at each end of an edge along the pixel grid, next to nothing for an oblique
# one): half a pixel added to its length and width bounds the error at +-0.5 px.
RECTANGLE_GROWTH_PX = 0.5
DISTRIBUTED_TIMEOUT = datetime.timedelta(hours=6)  # ranks that finish early wait this long for the others
# WGS84, for metres on the ground around each ship.
WGS84_A = 6378137.0
WGS84_F = 1 / 298.257223563
# The CSV's columns, in order (metric columns empty when the scene is not georeferenced).
SHIP_COLUMNS = ("scene", "ship", "score", "area_px", "area_m2", "centre_x_px", "centre_y_px", "length_px",
                "width_px", "heading_deg", "centre_x", "centre_y", "lon", "lat", "length_m", "width_m",
                "heading_geo_deg", "bbox_x", "bbox_y", "bbox_w", "bbox_h", "tiles")


class SceneError(ValueError):
    """A scene that cannot be read or used (corrupt, unsupported bands or data type); names the file."""


# ============================================================================ settings
@dataclasses.dataclass(frozen=True)
class DetectSettings:
    """Everything a detection run's outputs depend on besides the models (travels in shard files)."""

    tile: int  # slice side (px)
    overlap: int  # overlap of neighbouring slices (px)
    thresholds: Thresholds  # classifier (<= 0: ungated), score, min area
    merge_iou: float = 0.5  # DETECT.MERGE_IOU
    bands: tuple = (1, 2, 3)  # DETECT.BANDS
    stretch: str = "auto"  # DETECT.STRETCH
    percentiles: tuple = (2.0, 98.0)  # DETECT.STRETCH_PERCENTILES
    stretch_sample_size: int = 1024  # DETECT.STRETCH_SAMPLE_SIZE
    min_valid_fraction: float = 0.0  # DETECT.MIN_VALID_FRACTION
    chunk_tiles: int = 32  # DETECT.CHUNK_TILES
    batch_size: int = 8  # detector tiles per call (SUBMIT.BATCH_SIZE)
    formats: tuple = DETECT_FORMATS  # DETECT.FORMATS
    geojson_crs: str = "native"  # DETECT.GEOJSON_CRS
    quicklook_size: int = 2048  # DETECT.QUICKLOOK_SIZE
    gdal_cache_mb: int = 64  # DETECT.GDAL_CACHE_MB
    gate_tta: bool = False  # DETECT.GATE_TTA (flip TTA in the gate)

    def to_json(self) -> dict:
        out = dataclasses.asdict(self)
        out["thresholds"] = dataclasses.asdict(self.thresholds)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "DetectSettings":
        data = dict(data)
        data["thresholds"] = Thresholds(**{k: tuple(v) if isinstance(v, list) else v
                                           for k, v in data["thresholds"].items()})
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


def parse_formats(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"geojson,coco"`` (or a list) -> ``("geojson", "coco")``; an unknown name is a ``ValueError``."""
    names = [t.strip().lower() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [n for n in names if n not in DETECT_FORMATS]
    if unknown:
        raise ValueError(f"--format {','.join(names)}: unknown {unknown}; expected any of {', '.join(DETECT_FORMATS)}")
    return tuple(dict.fromkeys(names))


def get_detect_settings(cfg, thresholds: Thresholds, tile: int | None = None, overlap: int | None = None,
                        formats: str | Sequence[str] | None = None, geojson_crs: str | None = None) -> DetectSettings:
    """The settings of ``cfg``'s ``DETECT`` group, the arguments winning; checks tile and overlap."""
    tile = int(tile or cfg.DETECT.TILE_SIZE or cfg.DATA.IMAGE_SIZE)
    overlap = int(cfg.DETECT.OVERLAP if overlap is None else overlap)
    overlap = tile // 6 if overlap == -1 else overlap
    if tile < 32:
        raise ValueError(f"tile size {tile}: expected at least 32 px")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap {overlap}: expected 0 <= overlap < the tile size {tile}")
    crs = geojson_crs or cfg.DETECT.GEOJSON_CRS
    if crs not in module_config.GEOJSON_CRSS:
        raise ValueError(f"GeoJSON CRS {crs!r}: expected one of {module_config.GEOJSON_CRSS}")
    return DetectSettings(
        tile=tile, overlap=overlap, thresholds=thresholds, merge_iou=float(cfg.DETECT.MERGE_IOU),
        bands=tuple(int(b) for b in cfg.DETECT.BANDS), stretch=cfg.DETECT.STRETCH,
        percentiles=tuple(float(p) for p in cfg.DETECT.STRETCH_PERCENTILES),
        stretch_sample_size=int(cfg.DETECT.STRETCH_SAMPLE_SIZE), min_valid_fraction=float(cfg.DETECT.MIN_VALID_FRACTION),
        chunk_tiles=int(cfg.DETECT.CHUNK_TILES), batch_size=int(cfg.SUBMIT.BATCH_SIZE),
        formats=parse_formats(cfg.DETECT.FORMATS if formats is None else formats), geojson_crs=crs,
        quicklook_size=int(cfg.DETECT.QUICKLOOK_SIZE), gdal_cache_mb=int(cfg.DETECT.GDAL_CACHE_MB),
        gate_tta=bool(cfg.DETECT.GATE_TTA))


# ============================================================================ scenes
@dataclasses.dataclass
class SceneInfo:
    """What is known of a scene once its header is read (JSON-able: it travels in shard files)."""

    path: str
    name: str  # output file stem: the file name without its suffix
    height: int
    width: int
    kind: str  # "raster" (rasterio, windowed) or "image" (decoded whole)
    crs: str | None = None  # WKT of the CRS of a georeferenced scene, else None
    transform: tuple | None = None  # affine (a, b, c, d, e, f) pixel (col, row) -> CRS of a georeferenced scene
    stretch: list | None = None  # per band [low, high] -> [0, 255]; None: values as they are
    warnings: list = dataclasses.field(default_factory=list)

    @property
    def georeferenced(self) -> bool:
        return self.crs is not None and self.transform is not None

    def get_transform(self):
        from affine import Affine

        return Affine(*self.transform) if self.transform else Affine.identity()


class ImageScene:
    """A JPEG or PNG scene, decoded whole on first read (``module_files.read_image``)."""

    def __init__(self, info: SceneInfo):
        self.info = info
        self._pixels: np.ndarray | None = None

    def _image(self) -> np.ndarray:
        if self._pixels is None:
            try:
                self._pixels = read_image(self.info.path, convert=True)
            except (OSError, ValueError) as exc:
                raise SceneError(f"{self.info.path}: cannot read the image: {exc}") from None
        return self._pixels

    def read(self, row: int, col: int, height: int, width: int) -> tuple[np.ndarray, np.ndarray | None]:
        """``(rgb (height, width, 3) uint8, valid (height, width) bool or None: all valid)``."""
        return self._image()[row:row + height, col:col + width], None

    def read_overview(self, max_side: int) -> np.ndarray:
        import cv2

        image = self._image()
        scale = min(1.0, max_side / max(image.shape[:2]))
        if scale == 1.0:
            return image.copy()
        size = (max(1, round(image.shape[1] * scale)), max(1, round(image.shape[0] * scale)))
        return cv2.resize(image, size, interpolation=cv2.INTER_AREA)

    def close(self) -> None:
        self._pixels = None


class RasterScene:
    """A GeoTIFF (anything rasterio opens) read in windows, bands and stretch per the settings."""

    def __init__(self, info: SceneInfo, settings: DetectSettings):
        import rasterio

        self.info, self.settings = info, settings
        self._env = rasterio.Env(GDAL_CACHEMAX=settings.gdal_cache_mb * 1024 * 1024)
        self._env.__enter__()
        try:
            self.dataset = rasterio.open(info.path)
        except Exception:
            self._env.__exit__(None, None, None)
            raise

    def _to_rgb(self, data: np.ndarray) -> np.ndarray:
        """``(3, h, w)`` raster values -> ``(h, w, 3)`` uint8 by the scene's stretch."""
        if self.info.stretch is None:
            out = np.clip(data, 0, 255).astype(np.uint8) if data.dtype != np.uint8 else data
        else:
            out = np.empty(data.shape, np.uint8)
            for band, (low, high) in enumerate(self.info.stretch):
                scaled = (data[band].astype(np.float32) - np.float32(low)) * np.float32(255.0 / (high - low))
                scaled = np.nan_to_num(scaled, nan=0.0, posinf=255.0, neginf=0.0)
                out[band] = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return np.ascontiguousarray(out.transpose(1, 2, 0))

    def read(self, row: int, col: int, height: int, width: int) -> tuple[np.ndarray | None, np.ndarray]:
        """``(rgb (height, width, 3) uint8 or None when nothing is valid, valid (height, width) bool)``."""
        from rasterio.windows import Window

        window = Window(col, row, width, height)
        try:
            valid = self.dataset.dataset_mask(window=window) > 0
            if not valid.any():
                return None, valid
            rgb = self._to_rgb(self.dataset.read(list(self.settings.bands), window=window))
        except Exception as exc:  # rasterio raises RasterioIOError / CPLE_* for a corrupt block
            raise SceneError(f"{self.info.path}: cannot read the window at row {row}, column {col}: {exc}") from None
        rgb[~valid] = 0
        return rgb, valid

    def read_overview(self, max_side: int, strip_rows: int = 64) -> np.ndarray:
        """The scene shrunk by a whole factor to at most ``max_side`` px, read in strips of
        ``strip_rows`` output rows (each the average of factor x factor pixels): bounded memory."""
        from rasterio.enums import Resampling
        from rasterio.windows import Window

        factor = max(1, math.ceil(max(self.info.height, self.info.width) / max_side))
        height, width = math.ceil(self.info.height / factor), math.ceil(self.info.width / factor)
        rgb = np.zeros((height, width, 3), np.uint8)
        bands = list(self.settings.bands)
        for top in range(0, height, strip_rows):
            rows = min(strip_rows, height - top)
            window = Window(0, top * factor, self.info.width, min(rows * factor, self.info.height - top * factor))
            data = self.dataset.read(bands, window=window, out_shape=(3, rows, width), resampling=Resampling.average)
            valid = self.dataset.dataset_mask(window=window, out_shape=(rows, width),
                                               resampling=Resampling.nearest) > 0
            strip = self._to_rgb(data)
            strip[~valid] = 0
            rgb[top:top + rows] = strip
        return rgb

    def close(self) -> None:
        self.dataset.close()
        self._env.__exit__(None, None, None)


def list_scenes(paths: Sequence[str | os.PathLike]) -> tuple[list[Path], list[dict]]:
    """The scene files of ``paths`` (files as given; folders: their JPEG/PNG/TIFF files, sorted) and
    ``[{"path", "reason"}]`` for paths that do not exist or are folders without scenes."""
    scenes, failures = [], []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in SCENE_SUFFIXES)
            if not found:
                failures.append({"path": str(path), "reason": f"{path}: folder holds no {'/'.join(SCENE_SUFFIXES)} files"})
            scenes += found
        elif path.is_file():
            scenes.append(path)
        else:
            failures.append({"path": str(path), "reason": f"{path}: no such file or folder"})
    names: dict[str, Path] = {}
    unique = []
    for path in scenes:
        if path.stem in names:
            failures.append({"path": str(path), "reason": f"{path}: a second scene named {path.stem!r} (also {names[path.stem]}): "
                             "outputs are named after the file; rename one or detect them separately"})
            continue
        names[path.stem] = path
        unique.append(path)
    return unique, failures


def _is_raster(path: Path) -> bool:
    if path.suffix.lower() in RASTER_SUFFIXES:
        return True
    if path.suffix.lower() in IMAGE_SUFFIXES:
        return False
    with open(path, "rb") as handle:  # an unknown suffix: TIFF magic numbers go to rasterio
        return handle.read(4) in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def read_scene_info(path: str | os.PathLike, settings: DetectSettings) -> SceneInfo:
    """Read a scene's header (and, for a raster that needs it, the stretch statistics): size, CRS,
    transform. Raises :class:`SceneError` naming the file for anything unusable; a GeoTIFF without a
    CRS (or transform) falls back to pixel coordinates with a warning (logged and kept in ``warnings``)."""
    path = Path(path)
    if not path.is_file():
        raise SceneError(f"{path}: no such file")
    if not _is_raster(path):
        from module_files import image_size

        try:
            height, width = image_size(path)
        except Exception as exc:
            raise SceneError(f"{path}: cannot read the image header ({type(exc).__name__}: {exc})") from None
        return SceneInfo(str(path), path.stem, int(height), int(width), "image")
    import rasterio

    try:
        with rasterio.Env(GDAL_CACHEMAX=settings.gdal_cache_mb * 1024 * 1024), rasterio.open(path) as src:
            return _raster_info(path, src, settings)
    except SceneError:
        raise
    except Exception as exc:  # rasterio.errors.RasterioIOError for a file GDAL cannot open
        raise SceneError(f"{path}: cannot open the raster ({type(exc).__name__}: {exc})") from None


def _raster_info(path: Path, src, settings: DetectSettings) -> SceneInfo:
    from rasterio.enums import Resampling

    bands = list(settings.bands)
    if src.count < max(bands):
        raise SceneError(f"{path}: {src.count} band(s), but DETECT.BANDS {bands} (red, green, blue) asks for band "
                         f"{max(bands)}; set DETECT.BANDS to three of bands 1..{src.count} "
                         "(e.g. [1, 1, 1] for a single-band scene)")
    dtypes = {src.dtypes[b - 1] for b in bands}
    if any(np.dtype(d).kind not in "uif" for d in dtypes):
        raise SceneError(f"{path}: data type {sorted(dtypes)} is not supported (expected integers or floats)")
    info = SceneInfo(str(path), path.stem, int(src.height), int(src.width), "raster")
    identity = src.transform.is_identity
    if src.crs is None or identity:
        why = "no CRS" if src.crs is None else "no geotransform"
        info.warnings.append(f"{path}: GeoTIFF with {why}: ships are given in pixel coordinates")
        logger.warning("%s", info.warnings[-1])
    else:
        info.crs = src.crs.to_wkt()
        info.transform = tuple(src.transform)[:6]
    stretch = settings.stretch
    if stretch == "auto":
        stretch = "none" if dtypes == {"uint8"} else "percentile"
    if stretch == "percentile":
        scale = min(1.0, settings.stretch_sample_size / max(src.height, src.width))
        shape = (len(bands), max(1, round(src.height * scale)), max(1, round(src.width * scale)))
        sample = src.read(bands, out_shape=shape, masked=True, resampling=Resampling.nearest)
        info.stretch = []
        for band in range(len(bands)):
            values = sample[band].compressed().astype(np.float64)
            values = values[np.isfinite(values)]
            low, high = (np.percentile(values, settings.percentiles) if values.size else (0.0, 255.0))
            info.stretch.append([float(low), float(high if high > low else low + 1.0)])
    return info


def open_scene(info: SceneInfo, settings: DetectSettings):
    """A reader of the scene (:class:`RasterScene` or :class:`ImageScene`), to ``close()`` after use."""
    if info.kind == "raster":
        try:
            return RasterScene(info, settings)
        except Exception as exc:
            raise SceneError(f"{info.path}: cannot open the raster ({type(exc).__name__}: {exc})") from None
    return ImageScene(info)


# ============================================================================ slicing
@dataclasses.dataclass(frozen=True)
class Tile:
    """One slice of a scene: its window (inside the scene) and its place in the slicing order."""

    index: int
    row: int
    col: int
    height: int  # < the tile size only for a scene smaller than a tile (the slice is padded)
    width: int


def get_tile_origins(length: int, tile: int, overlap: int) -> list[int]:
    """Starts of the slices along one axis: every ``tile - overlap`` px, the last one moved back to
    end at the scene's edge (so it overlaps its neighbour more); ``[0]`` when ``length <= tile``."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    origins = list(range(0, length - tile, stride))
    if origins[-1] != length - tile:
        origins.append(length - tile)
    return origins


def get_tiles(height: int, width: int, tile: int, overlap: int) -> list[Tile]:
    """The slices of a ``height`` x ``width`` scene, row by row."""
    rows, cols = get_tile_origins(height, tile, overlap), get_tile_origins(width, tile, overlap)
    return [Tile(i * len(cols) + j, r, c, min(tile, height - r), min(tile, width - c))
            for i, r in enumerate(rows) for j, c in enumerate(cols)]


# ============================================================================ detections
@dataclasses.dataclass
class Detection:
    """One instance mask in a scene: the COCO RLE of its bounding-box crop and where the crop sits.

    ``mask`` is pycocotools' RLE (``counts`` a str) of a ``(height, width)`` bool crop whose top-left
    pixel is scene pixel ``(row, col)``; ``tiles`` the slices it was seen in.
    """

    score: float
    row: int
    col: int
    height: int
    width: int
    mask: dict
    tiles: tuple = ()

    def decode(self) -> np.ndarray:
        """The ``(height, width)`` bool crop."""
        from pycocotools import mask as mask_util

        rle = {"size": self.mask["size"], "counts": self.mask["counts"].encode()}
        return mask_util.decode(rle).astype(bool)

    def to_json(self) -> dict:
        return dataclasses.asdict(self) | {"tiles": list(self.tiles)}

    @classmethod
    def from_json(cls, data: dict) -> "Detection":
        return cls(**(data | {"tiles": tuple(data["tiles"])}))


def mask_to_detection(mask: np.ndarray, row: int, col: int, score: float, tiles: tuple = ()) -> Detection | None:
    """The :class:`Detection` of an ``(H, W)`` bool mask whose top-left pixel is scene pixel
    ``(row, col)``: cropped to its bounding box; None for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if not rows.size:
        return None
    r0, r1, c0, c1 = rows[0], rows[-1] + 1, cols[0], cols[-1] + 1
    rle = masks_to_coco(mask[None, r0:r1, c0:c1])[0]
    return Detection(float(score), int(row + r0), int(col + c0), int(r1 - r0), int(c1 - c0),
                     {"size": [int(r1 - r0), int(c1 - c0)], "counts": rle["counts"].decode()}, tuple(tiles))


def tile_detections(prediction: dict, tile: Tile, valid: np.ndarray | None, thresholds: Thresholds) -> list[Detection]:
    """One slice's raw prediction (``masks`` (N, T, T) at the padded slice size, ``scores``) ->
    :class:`Detection` s in scene coordinates: cut to the slice's window, nodata pixels removed,
    then the submission's post-processing of one image (``module_inference.apply_thresholds``:
    score threshold, overlap removal inside the slice) except the minimum area, which waits until
    the ships are merged across slices (a ship's piece at a border may be small)."""
    masks = np.asarray(prediction["masks"], bool)[:, :tile.height, :tile.width]
    if valid is not None:
        masks = masks & valid[None]
    masks, scores = apply_thresholds({"masks": masks, "scores": prediction["scores"]},
                                     dataclasses.replace(thresholds, min_area=0))
    out = [mask_to_detection(m, tile.row, tile.col, s, (tile.index,)) for m, s in zip(masks, scores)]
    return [d for d in out if d is not None]


def _paste(canvas: np.ndarray, detection: Detection, row: int, col: int, mask: np.ndarray | None = None) -> None:
    """OR ``detection``'s crop into ``canvas`` whose top-left is scene pixel ``(row, col)`` (clipped)."""
    mask = detection.decode() if mask is None else mask
    r0, c0 = detection.row - row, detection.col - col
    rs, cs = max(0, -r0), max(0, -c0)
    re, ce = min(mask.shape[0], canvas.shape[0] - r0), min(mask.shape[1], canvas.shape[1] - c0)
    if re > rs and ce > cs:
        canvas[r0 + rs:r0 + re, c0 + cs:c0 + ce] |= mask[rs:re, cs:ce]


def _window_of(detection: Detection) -> tuple[int, int, int, int]:
    return detection.row, detection.col, detection.row + detection.height, detection.col + detection.width


def _intersect(a: tuple, b: tuple) -> tuple | None:
    """Intersection of two ``(r0, c0, r1, c1)`` windows, or None when empty."""
    r0, c0, r1, c1 = max(a[0], b[0]), max(a[1], b[1]), min(a[2], b[2]), min(a[3], b[3])
    return (r0, c0, r1, c1) if r1 > r0 and c1 > c0 else None


def _crop(detection: Detection, mask: np.ndarray, window: tuple) -> np.ndarray:
    """``detection``'s pixels inside ``window`` ``(r0, c0, r1, c1)``, as a window-sized bool array."""
    canvas = np.zeros((window[2] - window[0], window[3] - window[1]), bool)
    _paste(canvas, detection, window[0], window[1], mask)
    return canvas


def _bbox_pairs(detections: Sequence[Detection]) -> np.ndarray:
    """``(K, 2)`` index pairs ``i < j`` of detections whose bounding boxes share pixels (STRtree)."""
    from shapely import STRtree, box

    if len(detections) < 2:
        return np.zeros((0, 2), np.int64)
    # Shrunk by a hair so that boxes that only touch do not count.
    boxes = [box(d.col + 1e-6, d.row + 1e-6, d.col + d.width - 1e-6, d.row + d.height - 1e-6) for d in detections]
    pairs = STRtree(boxes).query(boxes, predicate="intersects").T
    pairs = pairs[pairs[:, 0] < pairs[:, 1]]
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def merge_detections(detections: Sequence[Detection], tiles: Sequence[Tile], merge_iou: float) -> list[Detection]:
    """One :class:`Detection` per ship from the slices' detections (each slice's already overlap-free).

    Two detections of different slices are candidates when both slices cover a common band (their
    windows intersect); their IoU is taken over that band only (a ship cut by one slice's border
    is whole in the band in both). Candidates with IoU >= ``merge_iou`` are joined greedily, the
    highest IoU first, never two pieces of one slice in one ship. A ship is the union of its
    pieces (an OR over its bounding box, never a scene-sized mask), its score the highest, its
    ``tiles`` all of its pieces'. Returns the ships in a canonical order (score descending, then
    position), the same whichever process or shard detected which slice.
    """
    windows = {t.index: (t.row, t.col, t.row + t.height, t.col + t.width) for t in tiles}
    detections = sorted(detections, key=lambda d: (d.tiles, -d.score, d.row, d.col, d.height, d.width))
    masks: dict[int, np.ndarray] = {}

    def mask_of(i: int) -> np.ndarray:
        if i not in masks:
            masks[i] = detections[i].decode()
        return masks[i]

    candidates = []
    for i, j in _bbox_pairs(detections):
        ti, tj = detections[i].tiles[0], detections[j].tiles[0]
        if ti == tj:
            continue
        band = _intersect(windows[ti], windows[tj])
        if band is None:
            continue
        (ar0, ac0, ar1, ac1), (br0, bc0, br1, bc1) = _window_of(detections[i]), _window_of(detections[j])
        region = _intersect(band, (min(ar0, br0), min(ac0, bc0), max(ar1, br1), max(ac1, bc1)))
        if region is None:
            continue
        a_band = _crop(detections[i], mask_of(i), region)
        b_band = _crop(detections[j], mask_of(j), region)
        intersection = np.count_nonzero(a_band & b_band)
        if intersection:
            iou = intersection / np.count_nonzero(a_band | b_band)
            if iou >= merge_iou:
                candidates.append((-iou, int(i), int(j)))
    parent = list(range(len(detections)))
    members_tiles = [set(d.tiles) for d in detections]

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for _, i, j in sorted(candidates):
        a, b = find(i), find(j)
        if a != b and not members_tiles[a] & members_tiles[b]:
            parent[b] = a
            members_tiles[a] |= members_tiles[b]
    groups: dict[int, list[int]] = {}
    for i in range(len(detections)):
        groups.setdefault(find(i), []).append(i)
    ships = []
    for members in groups.values():
        if len(members) == 1:
            ships.append(detections[members[0]])
            continue
        r0 = min(detections[k].row for k in members)
        c0 = min(detections[k].col for k in members)
        r1 = max(detections[k].row + detections[k].height for k in members)
        c1 = max(detections[k].col + detections[k].width for k in members)
        canvas = np.zeros((r1 - r0, c1 - c0), bool)
        for k in members:
            _paste(canvas, detections[k], r0, c0, mask_of(k))
        tiles_seen = tuple(sorted({t for k in members for t in detections[k].tiles}))
        ships.append(mask_to_detection(canvas, r0, c0, max(detections[k].score for k in members), tiles_seen))
    return sorted(ships, key=lambda d: (-d.score, d.row, d.col, d.height, d.width))


def remove_overlaps(ships: Sequence[Detection], min_area: int = 0) -> list[Detection]:
    """Overlap-free ships, as ``module_inference.resolve_overlaps`` does within an image: in the
    given order (score descending), each pixel goes to the first ship holding it (the pixels of a
    ship later dropped count as taken, as there), then ships left with fewer than
    ``max(min_area, 1)`` px are dropped. Works on bounding-box crops only."""
    ships = list(ships)
    kept = []
    pairs = _bbox_pairs(ships)
    earlier: dict[int, list[int]] = {}
    for i, j in pairs:
        earlier.setdefault(int(j), []).append(int(i))
    for k, ship in enumerate(ships):
        mask = ship.decode()
        if k in earlier:
            taken = np.zeros_like(mask)
            for i in earlier[k]:
                _paste(taken, ships[i], ship.row, ship.col)
            mask &= ~taken
        if np.count_nonzero(mask) >= max(int(min_area), 1):
            trimmed = mask_to_detection(mask, ship.row, ship.col, ship.score, ship.tiles) if k in earlier else ship
            kept.append(trimmed)
    return kept


def get_ships(detections: Sequence[Detection], tiles: Sequence[Tile], settings: DetectSettings) -> list[Detection]:
    """A scene's ships from its slices' detections: :func:`merge_detections` across slice borders,
    then :func:`remove_overlaps` between ships (``settings.merge_iou``, ``.thresholds.min_area``)."""
    return remove_overlaps(merge_detections(detections, tiles, settings.merge_iou), settings.thresholds.min_area)


# ============================================================================ measures and geometry
def _outline_polygons(ship: Detection, mask: np.ndarray):
    """The ship's outline as a shapely (Multi)Polygon in scene pixel coordinates, tracing pixel
    edges exactly (``rasterio.features.shapes``): rasterized back, it gives the mask."""
    from affine import Affine
    from rasterio.features import shapes
    from shapely.geometry import MultiPolygon, shape

    polygons = [shape(geometry) for geometry, value in
                shapes(mask.astype(np.uint8), mask=mask, transform=Affine.translation(ship.col, ship.row)) if value]
    return polygons[0] if len(polygons) == 1 else MultiPolygon(polygons)


def _rectangle(points: np.ndarray) -> tuple[float, float, float, float, np.ndarray]:
    """``(centre x, centre y, length, width, unit vector (dx, dy) of the long side)`` of the
    minimum-area rectangle around ``(K, 2)`` points ``(x, y)`` (``cv2.minAreaRect``)."""
    import cv2

    rect = cv2.minAreaRect(points.astype(np.float32))
    corners = cv2.boxPoints(rect).astype(np.float64)
    first, second = corners[1] - corners[0], corners[2] - corners[1]
    side, other = (first, second) if np.hypot(*first) >= np.hypot(*second) else (second, first)
    length = float(np.hypot(*side))
    unit = side / length if length > 0 else np.array([0.0, -1.0])
    return float(rect[0][0]), float(rect[0][1]), length, float(np.hypot(*other)), unit


def _heading(east: float, north: float) -> float:
    """Direction of an axis, degrees clockwise from north (or image up), in [0, 180)."""
    return math.degrees(math.atan2(east, north)) % 180.0


def _contour_centres(mask: np.ndarray) -> np.ndarray:
    """``(K, 2)`` float ``(x, y)`` centres of the mask's outer contour pixels, in crop pixel-edge
    coordinates (pixel (row 0, column 0) has its centre at (0.5, 0.5))."""
    import cv2

    padded = np.pad(mask.astype(np.uint8), 1)
    contours, _ = cv2.findContours(padded, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return np.concatenate([c.reshape(-1, 2) for c in contours]).astype(np.float64) - 0.5  # -1 padding, +0.5 centre


def measure_mask(mask: np.ndarray, row: int = 0, col: int = 0) -> dict:
    """Pixel measures of a ``(h, w)`` bool mask whose top-left pixel is scene pixel ``(row, col)``.

    ``area_px``; the minimum-area rotated rectangle (``cv2.minAreaRect`` on the centres of the
    mask's contour pixels) grown by :data:`RECTANGLE_GROWTH_PX` in length and width:
    ``centre_x_px``, ``centre_y_px`` (pixel-edge coordinates: the top-left pixel's centre is
    (0.5, 0.5)), ``length_px`` >= ``width_px``, ``heading_deg`` (the long side, degrees clockwise
    from image up, in [0, 180): a mask does not tell bow from stern); ``axis_x``, ``axis_y``: the
    long side's unit vector (image x right, y down).

    Accuracy on rasterized rectangles (every angle, sub-pixel positions): length and width within
    about 0.5 px; the heading, quantised by the pixel grid, within 4 degrees at 24 x 6 px, 1.2 at
    40 x 8, 1.0 at 60 x 12 and 0.05 at 150 x 25.
    """
    cx, cy, length, width, unit = _rectangle(_contour_centres(mask))
    return {"area_px": int(np.count_nonzero(mask)), "centre_x_px": round(col + cx, 3), "centre_y_px": round(row + cy, 3),
            "length_px": round(length + RECTANGLE_GROWTH_PX, 3), "width_px": round(width + RECTANGLE_GROWTH_PX, 3),
            "heading_deg": round(_heading(unit[0], -unit[1]), 3), "axis_x": float(unit[0]), "axis_y": float(unit[1])}


def _metres_per_pixel(info: SceneInfo, centres: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For pixel points ``(N, 2)`` ``(x, y)``: their CRS coordinates ``(N, 2)``, lon/lat ``(N, 2)``
    and the Jacobians ``(N, 2, 2)`` pixel step -> metres (east, north) on the WGS84 ellipsoid."""
    from rasterio.crs import CRS
    from rasterio.warp import transform as warp_points

    transform = info.get_transform()
    steps = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    points = (centres[:, None, :] + steps[None]).reshape(-1, 2)
    xs, ys = transform * (points[:, 0], points[:, 1])
    lons, lats = warp_points(CRS.from_wkt(info.crs), CRS.from_epsg(4326), list(xs), list(ys))
    lons, lats = np.asarray(lons).reshape(-1, 3), np.asarray(lats).reshape(-1, 3)
    phi = np.radians(lats[:, 0])
    e2 = WGS84_F * (2 - WGS84_F)
    sin2 = np.sin(phi) ** 2
    east_per_degree = np.radians(1.0) * WGS84_A / np.sqrt(1 - e2 * sin2) * np.cos(phi)
    north_per_degree = np.radians(1.0) * WGS84_A * (1 - e2) / (1 - e2 * sin2) ** 1.5
    d_lon = (lons[:, 1:] - lons[:, :1] + 180.0) % 360.0 - 180.0
    d_lat = lats[:, 1:] - lats[:, :1]
    jacobians = np.stack([d_lon * east_per_degree[:, None], d_lat * north_per_degree[:, None]], axis=1)
    crs_xy = np.stack([np.asarray(xs).reshape(-1, 3)[:, 0], np.asarray(ys).reshape(-1, 3)[:, 0]], axis=1)
    return crs_xy, np.stack([lons[:, 0], lats[:, 0]], axis=1), jacobians


def measure_ships(ships: Sequence[Detection], info: SceneInfo) -> list[dict]:
    """Per ship: score, :func:`measure_mask`'s pixel measures, its bounding box and the slices it was
    seen in; when ``info`` is georeferenced also the centre in the CRS (``centre_x``, ``centre_y``)
    and in ``lon``/``lat``, ``area_m2``, ``length_m``, ``width_m`` and ``heading_geo_deg``
    (clockwise from true north), measured in a local east/north frame in metres at each ship."""
    rows = []
    for number, ship in enumerate(ships, start=1):
        measures = measure_mask(ship.decode(), ship.row, ship.col)
        rows.append({"ship": number, "score": ship.score, **measures, "bbox_x": ship.col, "bbox_y": ship.row,
                     "bbox_w": ship.width, "bbox_h": ship.height, "tiles": len(ship.tiles)})
    if rows and info.georeferenced:
        centres = np.array([[r["centre_x_px"], r["centre_y_px"]] for r in rows])
        crs_xy, lonlat, jacobians = _metres_per_pixel(info, centres)
        for row, xy, ll, jacobian in zip(rows, crs_xy, lonlat, jacobians):
            # The pixel rectangle's sides, mapped to metres (east, north) on the ground.
            axis = np.array([row["axis_x"], row["axis_y"]])
            long_side = jacobian @ (axis * row["length_px"])
            short_side = jacobian @ (np.array([-axis[1], axis[0]]) * row["width_px"])
            row.update(centre_x=float(xy[0]), centre_y=float(xy[1]), lon=float(ll[0]), lat=float(ll[1]),
                       area_m2=round(row["area_px"] * float(abs(np.linalg.det(jacobian))), 3),
                       length_m=round(float(np.hypot(*long_side)), 3), width_m=round(float(np.hypot(*short_side)), 3),
                       heading_geo_deg=round(_heading(long_side[0], long_side[1]), 3))
    for row in rows:
        del row["axis_x"], row["axis_y"]
    return rows


# ============================================================================ outputs
def _geojson_crs_member(info: SceneInfo, target: str) -> tuple[dict | None, str]:
    from rasterio.crs import CRS

    if not info.georeferenced:
        return None, "pixel"
    if target == "EPSG:4326":
        return None, "EPSG:4326"
    crs = CRS.from_wkt(info.crs)
    epsg = crs.to_epsg()
    name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg else crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}, f"EPSG:{epsg}" if epsg else crs.to_wkt()


def _to_output_geometry(geometry, info: SceneInfo, target: str) -> dict:
    from rasterio.crs import CRS
    from rasterio.warp import transform_geom
    from shapely.affinity import affine_transform
    from shapely.geometry import mapping

    if not info.georeferenced:
        return mapping(geometry)
    a, b, c, d, e, f = info.transform
    projected = mapping(affine_transform(geometry, [a, b, d, e, c, f]))
    if target == "EPSG:4326":
        return transform_geom(CRS.from_wkt(info.crs), CRS.from_epsg(4326), projected)
    return projected


def _clean(value):
    """JSON-able: numpy scalars to Python, NaN to None; tuples to lists."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def build_geojson(ships: Sequence[Detection], measures: Sequence[dict], info: SceneInfo, target: str = "native") -> dict:
    """A GeoJSON FeatureCollection: one (Multi)Polygon feature per ship, its measures as properties,
    in the raster's CRS (``target`` "native"; the legacy ``crs`` member names it for GIS tools) or
    lon/lat (``"EPSG:4326"``); a scene without georeferencing gets pixel coordinates, said so in
    ``coordinate_system`` and ``coordinate_note``."""
    crs_member, system = _geojson_crs_member(info, target)
    features = []
    for ship, properties in zip(ships, measures):
        geometry = _to_output_geometry(_outline_polygons(ship, ship.decode()), info, target)
        features.append({"type": "Feature", "id": properties["ship"], "geometry": geometry,
                         "properties": _clean({"scene": info.name, **properties})})
    collection = {"type": "FeatureCollection", "name": info.name, "coordinate_system": system}
    if crs_member:
        collection["crs"] = crs_member
    if not info.georeferenced:
        collection["coordinate_note"] = PIXEL_COORDINATES_NOTE
    collection["features"] = features
    return _clean(collection)


def scene_rle(ship: Detection, height: int, width: int, mask: np.ndarray | None = None) -> dict:
    """COCO RLE (compressed, ``counts`` a str) of ``ship``'s mask at the scene's size ``(height,
    width)``, built from the crop's column runs: no scene-sized array is made."""
    from pycocotools import mask as mask_util

    mask = ship.decode() if mask is None else mask
    columns = np.pad(mask.T.astype(np.int8), ((0, 0), (1, 1)))  # (w, h + 2): a crop column per row
    edges = np.diff(columns, axis=1)
    start_cols, start_rows = np.nonzero(edges == 1)  # row-major over (w, h + 1): by column, then row
    end_cols, end_rows = np.nonzero(edges == -1)
    starts = (ship.col + start_cols).astype(np.int64) * height + ship.row + start_rows
    ends = (ship.col + end_cols).astype(np.int64) * height + ship.row + end_rows
    joined = np.flatnonzero(starts[1:] == ends[:-1])  # a run through a column's end into the next one
    starts, ends = np.delete(starts, joined + 1), np.delete(ends, joined)
    counts = np.empty(2 * len(starts) + 1, np.int64)  # zeros, ones, zeros, ..., ones, zeros
    counts[0] = starts[0] if len(starts) else height * width
    if len(starts):
        counts[1::2] = ends - starts
        counts[2:-1:2] = starts[1:] - ends[:-1]
        counts[-1] = height * width - ends[-1]
        if counts[-1] == 0:  # as pycocotools' encoder: no trailing empty run
            counts = counts[:-1]
    rle = mask_util.frPyObjects({"size": [int(height), int(width)], "counts": counts.tolist()}, int(height), int(width))
    return {"size": [int(height), int(width)], "counts": rle["counts"].decode()}


def build_coco_results(ships: Sequence[Detection], measures: Sequence[dict], info: SceneInfo) -> list[dict]:
    """COCO results (``loadRes`` format): one per ship, RLE at the scene's size, ``image_id`` the scene name."""
    return [{"image_id": info.name, "category_id": SHIP_CATEGORY_ID, "score": float(ship.score),
             "segmentation": scene_rle(ship, info.height, info.width), "area": int(m["area_px"]),
             "bbox": [ship.col, ship.row, ship.width, ship.height]} for ship, m in zip(ships, measures)]


def build_ship_table(measures: Sequence[dict], info: SceneInfo) -> pd.DataFrame:
    """The CSV's rows: :data:`SHIP_COLUMNS`, one row per ship (metric columns empty without georeferencing)."""
    frame = pd.DataFrame([{"scene": info.name, **m} for m in measures], columns=list(SHIP_COLUMNS))
    return frame


def get_output_paths(out_dir: str | os.PathLike, name: str) -> dict[str, Path]:
    """Where a scene's outputs go: ``{"geojson", "coco", "csv", "quicklook"}``."""
    out_dir = Path(out_dir)
    return {"geojson": out_dir / f"{name}.geojson", "coco": out_dir / f"{name}_coco.json",
            "csv": out_dir / f"{name}_ships.csv", "quicklook": out_dir / f"{name}_quicklook.png"}


def get_report_path(out_dir: str | os.PathLike) -> Path:
    """The run report ``report.json`` in ``out_dir`` (its failures beside it: ``report_failures.csv``)."""
    return Path(out_dir) / "report.json"


def get_shard_path(out_dir: str | os.PathLike, index: int, count: int) -> Path:
    """A shard's part file: ``detect_shard<i>of<n>.json``."""
    return Path(out_dir) / f"detect_shard{index}of{count}.json"


def write_json(path: Path, data) -> Path:
    return write_text_atomic(path, json.dumps(data, indent=1, allow_nan=False) + "\n")


QUICKLOOK_PNG_LEVEL = 3  # zlib level of the quicklook PNG (write_quicklook)


def write_quicklook(path: Path, ships: Sequence[Detection], info: SceneInfo, settings: DetectSettings,
                    detected_tiles: Sequence[Tile] = ()) -> Path:
    """A downscaled RGB picture of the scene (longest side ``quicklook_size``), the slices the
    detector ran on outlined in yellow and the ships in red; written atomically."""
    from PIL import Image

    scene = open_scene(info, settings)
    try:
        image = scene.read_overview(settings.quicklook_size)
    finally:
        scene.close()
    scale_y, scale_x = image.shape[0] / info.height, image.shape[1] / info.width
    boxes = [np.array([[t.col, t.row], [t.col + t.width, t.row], [t.col + t.width, t.row + t.height],
                       [t.col, t.row + t.height]], np.float64) * [scale_x, scale_y] for t in detected_tiles]
    image = module_plots.draw_polygon_outlines(image, boxes, colour=(255, 220, 0), thickness=1)
    rings = []
    for ship in ships:
        geometry = _outline_polygons(ship, ship.decode())
        for polygon in getattr(geometry, "geoms", [geometry]):
            rings.append(np.asarray(polygon.exterior.coords) * [scale_x, scale_y])
    image = module_plots.draw_polygon_outlines(image, rings, colour=(255, 0, 0), thickness=2)
    with atomic_path(path) as tmp:
        # zlib level 3, not PIL's 6: a 2,048 px quicklook in 0.31 s against 0.91 (4% larger, 3.2 MB);
        # on a mostly-sea scene the gate leaves little else, so 6 cost a tenth of the gated time.
        Image.fromarray(image).save(tmp, format="PNG", compress_level=QUICKLOOK_PNG_LEVEL)
    return path


def write_mosaic(paths: Sequence[str | os.PathLike], columns: int, out: str | os.PathLike, crs: str | None = None,
                 transform=None) -> Path:
    """A scene made of equal-size tiles (image files, row by row, ``columns`` per row; black where
    the last row is short): a GeoTIFF written window by window when ``out`` ends in .tif/.tiff
    (``crs``, ``transform`` optional), else a PNG/JPEG. For demos, tests and benchmarks."""
    out = Path(out)
    first = read_image(paths[0])
    size = first.shape[0]
    rows = math.ceil(len(paths) / columns)
    height, width = rows * size, columns * size
    if out.suffix.lower() in RASTER_SUFFIXES:
        import rasterio
        from affine import Affine
        from rasterio.windows import Window

        with atomic_path(out) as tmp, rasterio.open(
                tmp, "w", driver="GTiff", height=height, width=width, count=3, dtype="uint8", crs=crs,
                transform=transform or Affine.identity(), tiled=True, blockxsize=256, blockysize=256,
                compress="deflate") as dst:
            for k, path in enumerate(paths):
                row, col = divmod(k, columns)
                dst.write(read_image(path, size).transpose(2, 0, 1), window=Window(col * size, row * size, size, size))
        return out
    from PIL import Image

    scene = np.zeros((height, width, 3), np.uint8)
    for k, path in enumerate(paths):
        row, col = divmod(k, columns)
        scene[row * size:(row + 1) * size, col * size:(col + 1) * size] = read_image(path, size)
    with atomic_path(out) as tmp:
        Image.fromarray(scene).save(tmp)
    return out


# ============================================================================ detection of slices (one process's share)
def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


def _read_chunk(scene, chunk: Sequence[Tile], settings: DetectSettings) -> tuple[list, list, list, list]:
    """Read a chunk of slices: ``(images, valid masks, their tiles, tiles without data)``; images
    are ``(tile, tile, 3)`` uint8, a slice of a scene smaller than a tile padded with black."""
    size = settings.tile
    images, valids, kept, empty = [], [], [], []
    for tile in chunk:
        rgb, valid = scene.read(tile.row, tile.col, tile.height, tile.width)
        valid_share = 1.0 if valid is None else float(np.count_nonzero(valid)) / valid.size
        if rgb is None or valid_share <= settings.min_valid_fraction:
            empty.append(tile)
            continue
        if rgb.shape[:2] != (size, size):
            padded = np.zeros((size, size, 3), np.uint8)
            padded[:tile.height, :tile.width] = rgb
            rgb = padded
        images.append(np.ascontiguousarray(rgb))
        valids.append(valid)
        kept.append(tile)
    return images, valids, kept, empty


@contextlib.contextmanager
def _timed(seconds: dict, step: str) -> Iterator[None]:
    """Add the wall-clock time of the ``with`` block to ``seconds[step]``."""
    started = time.perf_counter()
    try:
        yield
    finally:
        seconds[step] += time.perf_counter() - started


def detect_tiles(scene, tiles: Sequence[Tile], settings: DetectSettings, detect_fn: DetectFn,
                 p_ship_fn: PShipArrayFn | None = None, bar=None) -> dict:
    """Run the models on ``tiles`` of an open ``scene``, chunk by chunk: ``chunk_tiles`` slices read
    (the next chunk is read in a thread meanwhile), gated, then detected in batches of
    ``batch_size``; nothing else of the scene is read.

    Returns ``{"tiles": {index: {"status", "p_ship"}}, "detections": [Detection, ...],
    "step_seconds": {...}}``; status ``"nodata"`` (at most ``min_valid_fraction`` valid pixels: not
    given to the models), ``"gated"`` (p_ship below the classifier threshold) or ``"detected"``.
    ``step_seconds`` (:data:`STEPS`): where the time went, wall clock in this thread.
    """
    from concurrent.futures import ThreadPoolExecutor

    status: dict[int, dict] = {}
    detections: list[Detection] = []
    seconds = dict.fromkeys(STEPS, 0.0)
    n_detected = 0
    chunks = list(_chunks(list(tiles), settings.chunk_tiles))
    with ThreadPoolExecutor(1, thread_name_prefix="read-slices") as reader:
        pending = reader.submit(_read_chunk, scene, chunks[0], settings) if chunks else None
        for number, chunk in enumerate(chunks):
            with _timed(seconds, "read_wait"):
                images, valids, kept, empty = pending.result()
            if number + 1 < len(chunks):  # GDAL and the decoders release the GIL: reading overlaps the models
                pending = reader.submit(_read_chunk, scene, chunks[number + 1], settings)
            for tile in empty:
                status[tile.index] = {"status": "nodata", "p_ship": None}
            with _timed(seconds, "gate"):
                p_ship = p_ship_fn(images) if (p_ship_fn is not None and images) else np.full(len(images), np.nan)
            go = [k for k in range(len(kept)) if p_ship_fn is None or p_ship[k] >= settings.thresholds.classifier]
            for k, tile in enumerate(kept):
                status[tile.index] = {"status": "gated", "p_ship": None if np.isnan(p_ship[k]) else float(p_ship[k])}
            for k in go:
                status[kept[k].index]["status"] = "detected"
            n_detected += len(go)
            for batch in _chunks(go, settings.batch_size):
                with _timed(seconds, "detector"):
                    predictions = detect_fn([images[k] for k in batch])
                with _timed(seconds, "slice_masks"):
                    for k, prediction in zip(batch, predictions):
                        detections += tile_detections(prediction, kept[k], valids[k], settings.thresholds)
            if bar is not None:
                bar.update(len(chunk))
                bar.set_postfix(detected=n_detected, refresh=False)
    return {"tiles": status, "detections": detections, "step_seconds": seconds}


def select_work(scenes: Sequence[SceneInfo], settings: DetectSettings, shard: tuple[int, int] = (0, 1),
                rank: tuple[int, int] = (0, 1)) -> list[tuple[int, Tile]]:
    """A process's ``(scene number, tile)`` pairs: of all scenes' slices in order, every n-th from i
    for shard ``(i, n)``, and of those every w-th from r for rank ``(r, w)`` (balanced; a shard's
    slices do not depend on how many processes detect it)."""
    work = [(s, tile) for s, info in enumerate(scenes) for tile in get_tiles(info.height, info.width, settings.tile,
                                                                             settings.overlap)]
    return work[shard[0]::shard[1]][rank[0]::rank[1]]


def detect_part(scene_paths: Sequence[Path], settings: DetectSettings, detect_fn: DetectFn,
                p_ship_fn: PShipArrayFn | None = None, shard: tuple[int, int] = (0, 1),
                rank: tuple[int, int] = (0, 1), failures: Sequence[dict] = (), progress: bool = True) -> dict:
    """This process's part of a run: every scene's header, then its slices (:func:`select_work` of
    ``shard`` and ``rank``) through :func:`detect_tiles`. A scene that cannot be read is recorded in
    ``failures`` (path and reason) and the others go on. JSON-able (a shard file's content)."""
    started = time.perf_counter()
    failures = list(failures)
    infos: list[SceneInfo] = []
    for path in scene_paths:
        try:
            infos.append(read_scene_info(path, settings))
        except SceneError as exc:
            logger.error("%s", exc)
            failures.append({"path": str(path), "reason": str(exc)})
    work = select_work(infos, settings, shard, rank)
    tiles: dict[str, dict] = {info.name: {} for info in infos}
    detections: dict[str, list] = {info.name: [] for info in infos}
    failed = set()
    step_seconds = dict.fromkeys(STEPS, 0.0)
    with tqdm(total=len(work), desc="detect", unit="tiles", disable=not progress, dynamic_ncols=True) as bar:
        for number, info in enumerate(infos):
            scene_tiles = [tile for s, tile in work if s == number]
            if not scene_tiles:
                continue
            scene, done_before = None, bar.n
            try:
                scene = open_scene(info, settings)
                result = detect_tiles(scene, scene_tiles, settings, detect_fn, p_ship_fn, bar)
            except SceneError as exc:
                logger.error("%s", exc)
                failures.append({"path": info.path, "reason": str(exc)})
                failed.add(info.name)
                bar.update(len(scene_tiles) - (bar.n - done_before))  # the rest of its tiles count as done
                continue
            finally:
                if scene is not None:
                    scene.close()
            tiles[info.name] = {str(k): v for k, v in result["tiles"].items()}
            for step, value in result["step_seconds"].items():
                step_seconds[step] += value
            detections[info.name] = [d.to_json() for d in result["detections"]]
    return {"version": PART_VERSION, "share": [*shard, *rank], "settings": settings.to_json(),
            "scenes": [dataclasses.asdict(info) for info in infos if info.name not in failed],
            "failures": failures, "tiles": {k: v for k, v in tiles.items() if k not in failed},
            "detections": {k: v for k, v in detections.items() if k not in failed},
            "seconds": time.perf_counter() - started, "step_seconds": step_seconds}


# ============================================================================ merging parts, writing outputs
def combine_parts(parts: Sequence[dict]) -> dict:
    """One part from the parts of one run (processes, shards): settings and scene lists must agree;
    every slice of a scene must be in exactly one part, else ``ValueError`` naming the scene. A
    scene that failed in any part is a failure of the run (its other parts are dropped)."""
    if not parts:
        raise ValueError("no parts to merge")
    for part in parts:
        if part.get("version") != PART_VERSION:
            raise ValueError(f"a part of version {part.get('version')!r}; expected {PART_VERSION}")
    settings = parts[0]["settings"]
    for part in parts[1:]:
        if part["settings"] != settings:
            raise ValueError("the parts were detected with different settings (tile, overlap, thresholds, ...): "
                             f"{part['share']} differs from {parts[0]['share']}")
    failures = {}
    for part in parts:
        for failure in part["failures"]:
            failures.setdefault(failure["path"], failure)
    failed_paths = set(failures)
    scenes = {}
    for part in parts:
        for scene in part["scenes"]:
            if scene["path"] not in failed_paths:
                scenes.setdefault(scene["name"], scene)
    tiles: dict[str, dict] = {name: {} for name in scenes}
    detections: dict[str, list] = {name: [] for name in scenes}
    for part in parts:
        for name in scenes:
            for index, status in part["tiles"].get(name, {}).items():
                if index in tiles[name]:
                    raise ValueError(f"scene {name}: slice {index} is in two parts; were shards given twice?")
                tiles[name][index] = status
            detections[name] += part["detections"].get(name, [])
    settings_obj = DetectSettings.from_json(settings)
    shares = sorted({tuple(p["share"]) for p in parts})
    for name, scene in scenes.items():
        expected = len(get_tiles(scene["height"], scene["width"], settings_obj.tile, settings_obj.overlap))
        if len(tiles[name]) != expected:
            raise ValueError(f"scene {name}: {len(tiles[name])} of its {expected} slices are in the parts "
                             f"(shares {shares}); is a shard missing?")
    return {"version": PART_VERSION, "share": [0, 1, 0, 1], "settings": settings, "scenes": list(scenes.values()),
            "failures": list(failures.values()), "tiles": tiles, "detections": detections,
            "seconds": max(p["seconds"] for p in parts),
            "step_seconds": {step: sum(p.get("step_seconds", {}).get(step, 0.0) for p in parts) for step in STEPS}}


@dataclasses.dataclass
class SceneResult:
    """A finished scene: its ships (one :class:`Detection` each, overlap-free, in ship order), their
    measures, the slice counts and the files written."""

    info: SceneInfo
    ships: list
    measures: list
    counts: dict
    outputs: dict


def finish_scene(info: SceneInfo, tile_status: dict, detections: Sequence[Detection], settings: DetectSettings,
                 out_dir: str | os.PathLike | None) -> SceneResult:
    """Merge a scene's slice detections into ships, measure them and (with ``out_dir``) write the outputs."""
    tiles = get_tiles(info.height, info.width, settings.tile, settings.overlap)
    ships = get_ships(detections, tiles, settings)
    measures = measure_ships(ships, info)
    statuses = [tile_status[str(t.index)]["status"] for t in tiles]
    counts = {"tiles_total": len(tiles), "tiles_nodata": statuses.count("nodata"),
              "tiles_gated_out": statuses.count("gated"), "tiles_detected": statuses.count("detected"),
              "ships": len(ships)}
    outputs: dict[str, str] = {}
    if out_dir is not None:
        paths = get_output_paths(out_dir, info.name)
        if "geojson" in settings.formats:
            outputs["geojson"] = str(write_json(paths["geojson"], build_geojson(ships, measures, info,
                                                                               settings.geojson_crs)))
        if "coco" in settings.formats:
            outputs["coco"] = str(write_json(paths["coco"], build_coco_results(ships, measures, info)))
        if "csv" in settings.formats:
            with atomic_path(paths["csv"]) as tmp:
                build_ship_table(measures, info).to_csv(tmp, index=False)
            outputs["csv"] = str(paths["csv"])
        detected = [t for t, s in zip(tiles, statuses) if s == "detected"]
        try:
            outputs["quicklook"] = str(write_quicklook(paths["quicklook"], ships, info, settings, detected))
        except (SceneError, OSError, ValueError) as exc:  # e.g. merging on a machine without the scene
            info.warnings.append(f"{info.path}: no quicklook ({exc})")
            logger.warning("%s", info.warnings[-1])
    return SceneResult(info, ships, measures, counts, outputs)


@dataclasses.dataclass
class DetectResult:
    """A finished run: the scenes, the failures (path, reason), the report and where it went."""

    scenes: list
    failures: list
    report: dict
    report_path: Path | None


def finish(part: dict, out_dir: str | os.PathLike | None, seconds: float | None = None,
           extra: dict | None = None) -> DetectResult:
    """Merge, measure and write every scene of a combined part; then the run report and failure report."""
    settings = DetectSettings.from_json(part["settings"])
    results = []
    for scene in part["scenes"]:
        info = SceneInfo(**scene)
        started = time.perf_counter()
        detections = [Detection.from_json(d) for d in part["detections"][info.name]]
        results.append(finish_scene(info, part["tiles"][info.name], detections, settings, out_dir))
        results[-1].counts["merge_seconds"] = time.perf_counter() - started
    totals = {key: sum(r.counts[key] for r in results) for key in
              ("tiles_total", "tiles_nodata", "tiles_gated_out", "tiles_detected", "ships")}
    total_seconds = part["seconds"] if seconds is None else seconds
    step_seconds = {**dict.fromkeys(STEPS, 0.0), **part.get("step_seconds", {}),
                    "merge_and_write": sum(r.counts["merge_seconds"] for r in results)}
    report = _clean({
        "scenes": [{"name": r.info.name, "path": r.info.path, "height": r.info.height, "width": r.info.width,
                    "georeferenced": r.info.georeferenced, "crs": r.info.crs, "stretch": r.info.stretch,
                    **r.counts, "warnings": r.info.warnings, "outputs": r.outputs} for r in results],
        "failed": part["failures"], "totals": {**totals, "scenes": len(results), "failed": len(part["failures"]),
                                               "seconds": total_seconds, "step_seconds": step_seconds,
                                               "tiles_per_second": totals["tiles_total"] / max(total_seconds, 1e-9)},
        "settings": part["settings"], **(extra or {})})
    report_path = None
    if out_dir is not None:
        report_path = write_json(get_report_path(out_dir), report)
        frame = pd.DataFrame([{"ImageId": f["path"], "reason": f["reason"]} for f in part["failures"]],
                             columns=["ImageId", "reason"])
        write_failure_report(frame, report_path)
    logger.info("%d scene(s): %d tiles, %d without data, %d gated out, %d detected; %d ships; %d failed; %.1f s",
                len(results), totals["tiles_total"], totals["tiles_nodata"], totals["tiles_gated_out"],
                totals["tiles_detected"], totals["ships"], len(part["failures"]), total_seconds)
    logger.info("time by step (s, summed over processes): %s",
                ", ".join(f"{step} {value:.1f}" for step, value in step_seconds.items()))
    return DetectResult(results, part["failures"], report, report_path)


# ============================================================================ distributed
def limit_onednn_cache(capacity: int) -> None:
    """Cap oneDNN's cache of compiled kernels at ``capacity`` shapes (``DETECT.ONEDNN_CACHE_CAPACITY``)
    unless the environment already sets it; oneDNN reads it when it builds its first kernel."""
    if capacity > 0 and "ONEDNN_PRIMITIVE_CACHE_CAPACITY" not in os.environ:
        os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = str(int(capacity))


def init_distributed(device: str = "cpu") -> tuple[int, int]:
    """Join the process group torchrun describes (gloo: only Python objects travel); ``(rank, world
    size)``, ``(0, 1)`` without ``WORLD_SIZE`` > 1. On CUDA each rank uses GPU ``LOCAL_RANK``."""
    import torch
    import torch.distributed as dist

    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1
    if not dist.is_initialized():
        if device.startswith("cuda"):
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("gloo", init_method="env://", timeout=DISTRIBUTED_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def gather_parts(part: dict, rank: int, world_size: int) -> list[dict] | None:
    """Every rank's part on rank 0 (None on the others)."""
    import torch.distributed as dist

    if world_size <= 1:
        return [part]
    parts = [None] * world_size if rank == 0 else None
    dist.gather_object(part, parts, dst=0)
    return parts


# ============================================================================ the library entry point
def detect(cfg, images: Sequence[str | os.PathLike], out: str | os.PathLike | None = None,
           formats: str | Sequence[str] | None = None, tile: int | None = None, overlap: int | None = None,
           shard: str | None = None, thresholds_file: str | os.PathLike | None = None, overridden: Sequence[str] = (),
           classifier: str | os.PathLike | None = None, weights: str | os.PathLike | None = None,
           geojson_crs: str | None = None, max_failed: float | None = None, progress: bool = True,
           detect_fn: DetectFn | None = None, p_ship_fn: PShipArrayFn | None = None) -> DetectResult | Path | None:
    """Detect ships in ``images`` (scene files and folders) with the run's models and thresholds.

    ``out`` (default ``runs/<run>/detect``) receives the outputs (:func:`finish`); ``formats``,
    ``tile``, ``overlap`` and ``geojson_crs`` override ``DETECT.*``. Thresholds come from
    :func:`module_inference.get_scene_thresholds` (the run's tuned ones, the gate lowered to keep
    ``DETECT.GATE_SHIP_RECALL`` of the ships the detector found on validation; ``overridden``
    ``SUBMIT.*`` keys win). ``detect_fn`` / ``p_ship_fn`` replace the run's detector / gate (tests, benchmarks); the
    gate is off when the classifier threshold is <= 0. Under torchrun every rank calls this; rank 0
    returns the :class:`DetectResult`, the others None. With ``shard`` ``"i/n"`` the part is written
    to ``detect_shard<i>of<n>.json`` in ``out`` (merge them with :func:`merge_part_files`) and its
    path returned. More failed scenes than ``max_failed`` (default ``DETECT.MAX_FAILED``) raise
    ``module_files.TooManyFailures`` after everything is written.
    """
    started = time.perf_counter()
    limit_onednn_cache(cfg.DETECT.ONEDNN_CACHE_CAPACITY)
    rank, world_size = init_distributed(cfg.MODEL.DEVICE)
    out_dir = Path(out) if out else module_config.get_detect_dir(cfg)
    thresholds, sources = get_scene_thresholds(cfg, thresholds_file, overridden=overridden)
    if rank == 0:
        for key, source in sources.items():
            logger.info("SUBMIT.%s = %s (from %s)", key, thresholds.as_config()[key], source)
    settings = get_detect_settings(cfg, thresholds, tile, overlap, formats, geojson_crs)
    scene_paths, failures = list_scenes(images)
    if thresholds.classifier <= 0:
        p_ship_fn = None
        if rank == 0:
            logger.info("classifier threshold <= 0: ungated, the detector sees every slice")
    elif p_ship_fn is None:
        p_ship_fn = build_p_ship_array_fn(cfg, classifier)
    detect_fn = detect_fn or build_detect_fn(cfg, weights, thresholds)
    shard_index, shard_count = parse_shard(shard) if shard else (0, 1)
    part = detect_part(scene_paths, settings, detect_fn, p_ship_fn, (shard_index, shard_count), (rank, world_size),
                       failures, progress and rank == 0)
    parts = gather_parts(part, rank, world_size)
    if rank != 0:
        return None
    part = combine_parts(parts) if len(parts) > 1 else parts[0]
    if shard:
        part["share"] = [shard_index, shard_count, 0, 1]
        path = write_json(get_shard_path(out_dir, shard_index, shard_count), part)
        logger.info("wrote shard %d/%d of %d scene(s) to %s; merge the shards with `module_detect.py merge`",
                    shard_index, shard_count, len(part["scenes"]), path)
        return path
    extra = {"world_size": world_size, "thresholds_sources": sources}
    result = finish(part, out_dir, seconds=time.perf_counter() - started, extra=extra)
    _check_failures(result, cfg.DETECT.MAX_FAILED if max_failed is None else max_failed)
    return result


def _check_failures(result: DetectResult, max_failed: float) -> None:
    n_failed = len(result.failures)
    report = get_failure_report_path(result.report_path) if result.report_path else "the report"
    check_failure_limit(n_failed, n_failed + len(result.scenes), max_failed, report)


def merge_part_files(shard_paths: Sequence[str | os.PathLike], out: str | os.PathLike,
                     formats: str | Sequence[str] | None = None, max_failed: float = 0.0) -> DetectResult:
    """Combine shard files (:func:`detect` with ``shard``) and write the outputs into ``out``."""
    parts = []
    for path in shard_paths:
        try:
            parts.append(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError) as exc:
            raise ValueError(f"shard {path}: cannot read it ({exc})") from None
    counts = {p["share"][1] for p in parts}
    if len(counts) > 1:
        raise ValueError(f"the shards come from different splits (n = {sorted(counts)})")
    indexes = [p["share"][0] for p in parts]
    if len(set(indexes)) < len(indexes):
        raise ValueError(f"a shard is given twice: shard indexes {sorted(indexes)}")
    part = combine_parts(parts)
    if formats is not None:
        part["settings"] = {**part["settings"], "formats": list(parse_formats(formats))}
    result = finish(part, out, extra={"shards": [str(p) for p in shard_paths]})
    _check_failures(result, max_failed)
    return result


# ============================================================================ command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Without a subcommand, `detect` is meant: "
                                            "module_detect.py --config C --images scene.tif --out DIR")
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("detect", help="detect ships in scenes (the default subcommand)")
    run.add_argument("--images", nargs="+", required=True, help="scene files (JPEG, PNG, GeoTIFF) and folders of them")
    run.add_argument("--out", default=None, help="output folder (default runs/<run>/detect)")
    run.add_argument("--format", default=None, help=f"comma-separated outputs among {','.join(DETECT_FORMATS)} "
                     "(default DETECT.FORMATS); the quicklook and the report are always written")
    run.add_argument("--tile", type=int, default=None, help="slice side in px (default DETECT.TILE_SIZE, "
                     "0: DATA.IMAGE_SIZE)")
    run.add_argument("--overlap", type=int, default=None, help="slice overlap in px (default DETECT.OVERLAP)")
    run.add_argument("--geojson-crs", default=None, choices=module_config.GEOJSON_CRSS,
                     help="GeoJSON coordinates of georeferenced scenes (default DETECT.GEOJSON_CRS)")
    run.add_argument("--run", "--run-dir", dest="run", default=None, help="run folder whose models and thresholds "
                     "are used (default PATHS.RUNS_DIR/PATHS.RUN_NAME); under torchrun spell it --run-dir "
                     "(torchrun takes --run for its own --run-path)")
    run.add_argument("--shard", default=None, help="i/n: detect only share i (from 0) of n of the slices; "
                     "combine the shard files with `merge`")
    run.add_argument("--thresholds", default=None, help="thresholds YAML (default the run's tuned "
                     "submission/thresholds.yaml when present, else SUBMIT.*)")
    run.add_argument("--classifier", default=None, help="exported classifier (default the run's)")
    run.add_argument("--weights", default=None, help="detector weights (default the run's best)")
    run.add_argument("--max-failed", type=float, default=None, help="exit 1 when more scenes cannot be read "
                     "(a share if < 1, else a count; default DETECT.MAX_FAILED); outputs are written either way")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    module_config.add_config_args(run)
    merge = commands.add_parser("merge", help="shard files of `detect --shard` -> the outputs")
    merge.add_argument("--shards", nargs="+", required=True, help="the detect_shard<i>of<n>.json files")
    merge.add_argument("--out", required=True, help="output folder")
    merge.add_argument("--format", default=None, help="comma-separated outputs (default: as detected)")
    merge.add_argument("--max-failed", type=float, default=0.0, help="exit 1 when more scenes failed (default 0)")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a command line; without a subcommand, ``detect`` is meant."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("detect", "merge", "-h", "--help"):
        argv = ["detect", *argv]
    return get_args_parser().parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """Run ``detect`` or ``merge``; returns the exit status (0, or 1 for too many failed scenes)."""
    module_config.setup_logging(int(os.environ.get("RANK", "0")))
    try:
        if args.command == "merge":
            merge_part_files(args.shards, args.out, args.format, args.max_failed)
            return 0
        opts = list(args.opts or [])
        if args.run:
            run = Path(args.run)
            opts += ["PATHS.RUNS_DIR", str(run.parent), "PATHS.RUN_NAME", run.name]
        cfg = module_config.get_cfg(args.config, opts)
        detect(cfg, args.images, out=args.out, formats=args.format, tile=args.tile, overlap=args.overlap,
               shard=args.shard, thresholds_file=args.thresholds, overridden=args.opts or [],
               classifier=args.classifier, weights=args.weights, geojson_crs=args.geojson_crs,
               max_failed=args.max_failed, progress=not args.no_progress)
    except TooManyFailures as exc:
        logger.error("%s", exc)
        return 1
    finally:
        _close_distributed()
    return 0


def _close_distributed() -> None:
    with contextlib.suppress(Exception):
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main(parse_args()))
