"""The Kaggle data layer: CSV + images -> dataset dicts, COCO export, overlap-aware split, input layout.

Reads, never writes data (``module_synthetic`` generates the demo's), and never decodes a mask it
does not need: the codec is ``module_rle``'s, images follow ``module_files``' one policy.

* **dataset dicts** :func:`load_dataset_dicts` (detectron2 format, ``segmentation`` as COCO RLE),
  optional image checks, ground-truth checks (identical rows dropped, overlaps reported or set
  to background), COCO JSON export. The loops over a whole CSV (parsing, validating, COCO
  counts, boxes, overlaps) are compiled, in :mod:`module_rle_kernels` (numba);
* the **overlap-aware split** :func:`split_train_val`: Kaggle tiles are 768 px crops of larger
  scenes overlapping at multiples of 256 px; tiles that share a 256 px block stay in one fold;
* the run-level entry points :func:`check_input_layout` and :func:`get_train_val_dicts`.

Command line (``python module_preprocessing.py -h``); the CSV and images default to the config's::

    python module_preprocessing.py dicts --config configs/airbus.yaml --check-images skip
    python module_preprocessing.py coco  --csv input/train_ship_segmentations_v2.csv --images input/train_v2 --out train_coco.json
    python module_preprocessing.py split --config configs/demo.yaml --out split.csv

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import argparse
import contextlib
import gc
import logging
import mmap
import os
from pathlib import Path
from typing import Sequence

import numpy as np

import module_config
from module_config import CHECK_MODES
from module_files import CSV_COLUMNS, ImageError, atomic_path, check_image, read_segmentation_csv
from module_files import check_images as check_image_files
from module_rle import KAGGLE_SHAPE, ParsedRuns, RLEError, get_kernels, parse_rle, rle_decode, rle_encode

logger = logging.getLogger(__name__)


# ============================================================================ dataset dicts
OVERLAP_MODES = ("warn", "error", "background")
# A ground-truth ship that loses more than this share of its pixels to overlaps set to background
# is reported by name.
MOSTLY_LOST = 0.5


class ImageCheckError(ImageError):
    """A missing, corrupt or wrong-size image (``check_images="error"``); the message names the file,
    the ImageId and the CSV."""


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector while building many small acyclic objects.

    A train_v2 CSV becomes ~700k dicts and lists; every 700 allocations the collector would
    rescan the young ones, which more than doubles the conversion time. Nothing built here is
    cyclic, so nothing is left for the collector. On exit the new objects are moved to the oldest
    generation at once (``gc.freeze`` then ``gc.unfreeze``, two list splices; skipped if the
    caller froze objects of their own), where a re-enabled collector would otherwise walk all of
    them as young ones first (0.1-0.4 s); the collector then runs again as it was.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if gc.get_freeze_count() == 0:
            gc.freeze()  # what was built is long-lived: hand it to the oldest generation at once (two
            gc.unfreeze()  # list splices) rather than have the re-enabled collector walk it as young objects
        if enabled:
            gc.enable()


def _map_file(path: Path) -> np.ndarray:
    """A file's bytes as a read-only uint8 array, mapped from the page cache (POSIX: no copy, no zeroed
    pages to fault in; the file must not shrink while the array lives), else read into memory."""
    size = path.stat().st_size
    if size == 0:
        return np.zeros(0, np.uint8)
    if hasattr(mmap, "MAP_SHARED"):
        with open(path, "rb") as handle:
            mapped = mmap.mmap(handle.fileno(), size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0),
                               prot=mmap.PROT_READ)
        return np.frombuffer(mapped, np.uint8)
    return np.fromfile(path, np.uint8)


class _LoadedCSV:
    """A segmentation CSV parsed into runs and grouped by ImageId (sorted), rows kept in CSV order.

    Kaggle's layout (header ``ImageId,EncodedPixels``, one unquoted row per line) is read straight
    from the file's bytes by the compiled scanner; anything else (quoted fields, blank lines, another
    header) is read by pandas (:func:`read_segmentation_csv`), which also names what is wrong.
    """

    def __init__(self, csv_path, shape):
        self.csv_path = Path(csv_path)
        if not self.csv_path.is_file():
            raise FileNotFoundError(f"{csv_path}: CSV not found")
        if not self._scan(_map_file(self.csv_path), shape):
            self._read_with_pandas(shape)
        keys = self._keys  # ImageIds as a numpy str or bytes array, to sort on
        self.order = np.arange(keys.size) if (keys[1:] >= keys[:-1]).all() else np.argsort(keys, kind="stable")
        sorted_keys = keys[self.order]  # rows grouped by ImageId, CSV order inside
        new_group = np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]) if keys.size else np.zeros(0, bool)
        self.group_start = np.flatnonzero(new_group)
        self.group_size = np.diff(np.concatenate([self.group_start, [keys.size]]))
        self.group_ids = self._ids_of(self.order[self.group_start])

    def _scan(self, data: np.ndarray, shape) -> bool:
        """Read Kaggle's layout with :func:`module_rle_kernels.scan_rows`; False when it is not that layout."""
        header = ",".join(CSV_COLUMNS).encode()
        head = data[:len(header) + 2].tobytes()
        if head.startswith(header + b"\n"):
            self._body = body = data[len(header) + 1:]
        elif head.startswith(header + b"\r\n"):
            self._body = body = data[len(header) + 2:]
        else:
            return False
        self._rles = None  # the EncodedPixels stay bytes in the file: see rle_text
        kernels = get_kernels()
        (status, row, id_start, id_end, self._field_start, self._field_end, n_runs, starts,
         lengths) = kernels.scan(body, True, int(shape[0]) * int(shape[1]))
        if status == kernels.UNUSUAL:
            return False
        try:
            self._keys, self._ids_of = self._decode_ids(body, id_start, id_end)
        except UnicodeDecodeError:
            return False
        if status != kernels.OK:
            where = dict(image_id=self.image_id(row), line=row + 2, csv_path=self.csv_path)  # line 1: the header
            parse_rle(self.rle_text(row), shape, **where)
            raise RLEError("invalid EncodedPixels (rejected by the compiled scanner)", **where)
        self.runs = ParsedRuns.from_runs(shape, n_runs, starts, lengths)
        return True

    @staticmethod
    def _decode_ids(body: np.ndarray, id_start: np.ndarray, id_end: np.ndarray):
        """``(keys, ids_of)``: the ImageIds at those byte offsets as a numpy array to sort on, and a
        function giving the ``str`` ImageIds of an index array of rows. Short ASCII names (Kaggle's) are
        sorted as one NUL-padded bytes block; the strings are made by one decode and one split."""
        kernels = get_kernels()

        def ids_of(rows: np.ndarray) -> list[str]:
            return str(memoryview(kernels.join_ids(body, id_start, id_end, rows)), "utf-8").split("\n")[:-1]

        widths = id_end - id_start
        width = int(widths.max()) if widths.size else 0
        if 0 < width <= 64:
            block, ascii_only = kernels.gather_ids(body, id_start, id_end, width)
            if ascii_only:  # nothing to validate: sort on the bytes, decode only the ids asked for
                return block.view(f"S{width}").ravel(), ids_of
        keys = np.array(ids_of(np.arange(widths.size)), dtype=str)  # decodes (and validates) every id once
        return keys, lambda rows: keys[rows].tolist()

    def _read_with_pandas(self, shape):
        frame = read_segmentation_csv(self.csv_path, "segmentation CSV", allow_no_rows=True)
        image_ids = frame["ImageId"].tolist()
        self._rles = frame["EncodedPixels"].tolist()
        keys = self._keys = np.asarray(image_ids, dtype=str)
        self._ids_of = lambda rows: keys[rows].tolist()
        self._lines = frame["line"].to_numpy()
        self.runs = ParsedRuns(self._rles, shape, image_ids, self._lines.tolist(), self.csv_path)

    def line(self, row: int) -> int:
        """The line of a row (CSV order) in the file; the header is line 1."""
        return int(self._lines[row]) if self._rles is not None else row + 2

    def image_id(self, row: int) -> str:
        return self._ids_of(np.array([row]))[0]

    def rle_text(self, row: int) -> str:
        """The EncodedPixels of a row (CSV order), as written in the file."""
        if self._rles is not None:
            return self._rles[row]
        return self._body[self._field_start[row]:self._field_end[row]].tobytes().decode("utf-8", errors="replace")

    def overlaps(self):
        """DataFrame of ground-truth mask pairs that share pixels (CSV lines, pixels)."""
        import pandas as pd

        pairs = self.runs.overlapping_pairs(self.group_start, self.group_size, self.order)
        areas = self.runs.areas()
        return pd.DataFrame([(self.image_id(a), a, b, self.line(a), self.line(b), p, p == areas[a] == areas[b])
                             for a, b, p in pairs],
                            columns=["ImageId", "row_a", "row_b", "line_a", "line_b", "pixels", "identical"])


def find_ground_truth_overlaps(csv_path: str | os.PathLike, shape: tuple[int, int] = KAGGLE_SHAPE):
    """Masks of one image that share pixels: DataFrame ``ImageId, line_a, line_b, pixels``.

    Kaggle's v2 ground truth has none (overlaps were set to background), and a submission with
    any is rejected; a hand-made or merged CSV may have some. Computed on the runs, no mask built.
    """
    return _LoadedCSV(csv_path, shape).overlaps()[["ImageId", "line_a", "line_b", "pixels"]]


def _remove_overlaps(rles: list[str], shape) -> tuple[list[str], np.ndarray]:
    """Set pixels shared by several masks to background (Kaggle's rule for v2): only the shared
    pixels go, the ships stay. Returns the new strings (emptied masks dropped) and the share of
    pixels each input mask lost."""
    masks = np.stack([rle_decode(r, shape).astype(np.bool_) for r in rles])
    shared = masks.sum(axis=0) > 1
    kept = masks & ~shared
    lost = 1.0 - kept.sum(axis=(1, 2)) / np.maximum(masks.sum(axis=(1, 2)), 1)
    return [r for r in (rle_encode(m) for m in kept) if r], lost


def load_dataset_dicts(csv_path: str | os.PathLike, image_dir: str | os.PathLike, check_images: str = "off",
                       image_size: int = KAGGLE_SHAPE[0], overlaps: str = "warn",
                       report: dict | None = None) -> list[dict]:
    """A Kaggle segmentation CSV + image folder -> detectron2 dataset dicts, sorted by ImageId.

    Each dict: ``file_name`` (str), ``height``, ``width`` (= ``image_size``), ``image_id`` (the
    Kaggle ImageId, e.g. ``"000155de5.jpg"``), ``annotations``: one per CSV row with a mask, in
    CSV order (``[]`` for a ship-free image), each ``{"bbox": [x, y, w, h], "bbox_mode":
    BoxMode.XYWH_ABS, "segmentation": {"size": [H, W], "counts": str} (COCO RLE, column-major),
    "category_id": 0, "iscrowd": 0}``. Masks are converted on the runs; no image is read unless
    ``check_images`` is on.

    check_images: ``"off"`` (trust the CSV), ``"error"`` (raise :class:`ImageCheckError` at the
    first missing / undecodable / truncated / wrong-size file: ``module_files.check_image``),
    ``"skip"`` (drop such images, log them).
    overlaps: ground-truth masks of one image sharing pixels are ``"warn"``-ed about, an
    ``"error"``, or their shared pixels set to ``"background"`` (Kaggle's rule for v2; a ship
    losing most of its pixels is named in a warning). Either way a row identical to an earlier
    mask of its image is dropped first (one warning names the lines): a duplicate never erases a
    ship. An empty or header-only CSV is a ``ValueError`` naming the file.
    report: a dict to fill with ``skipped`` ({file_name: problem}) and ``overlaps`` (DataFrame).
    The same inputs give the same list, in the same order, on every call.
    """
    if check_images not in CHECK_MODES:
        raise ValueError(f"check_images={check_images!r}; expected one of {CHECK_MODES}")
    if overlaps not in OVERLAP_MODES:
        raise ValueError(f"overlaps={overlaps!r}; expected one of {OVERLAP_MODES}")
    image_dir = Path(image_dir)
    if not image_dir.is_dir():
        raise FileNotFoundError(f"image folder {image_dir} not found (for {csv_path})")
    with _gc_paused():
        dicts, overlap_table = _build_dataset_dicts(csv_path, image_dir, (int(image_size), int(image_size)), overlaps)

    skipped: dict[str, str] = {}
    if check_images != "off":
        if check_images == "error":
            for d in dicts:  # stop at the first bad file
                problem = check_image(d["file_name"], image_size)
                if problem:
                    raise ImageCheckError(f"{d['file_name']}: {problem} (ImageId {d['image_id']} of {csv_path}; "
                                          "check_images='skip' drops such images)")
        else:
            skipped = check_image_files([d["file_name"] for d in dicts], image_size)
            if skipped:
                listing = "; ".join(f"{Path(p).name}: {why}" for p, why in list(skipped.items())[:10])
                logger.warning("skipping %d of %d images of %s: %s%s", len(skipped), len(dicts), csv_path, listing,
                               " ..." if len(skipped) > 10 else "")
                dicts = [d for d in dicts if d["file_name"] not in skipped]
    if report is not None:
        report["skipped"] = skipped
        report["overlaps"] = overlap_table
    return dicts


def _build_dataset_dicts(csv_path, image_dir: Path, shape: tuple[int, int], overlaps: str):
    """:func:`load_dataset_dicts` before the image checks: ``(dicts, overlap table)``.

    Ground truth is never erased by a duplicate: a mask identical to an earlier mask of the same
    image (the same row twice, or the same pixels written differently) is dropped first, with one
    warning naming the lines; only the overlaps left are reported, or set to background.
    """
    from detectron2.structures import BoxMode

    loaded = _LoadedCSV(csv_path, shape)
    if loaded.runs.n_runs.size == 0:
        raise ValueError(f"{csv_path}: only a header, no rows; expected one row per ship (a blank EncodedPixels "
                         "for an image without ships)")
    runs = loaded.runs
    overlap_table = loaded.overlaps()
    dropped = np.zeros(runs.n_runs.size, bool)  # rows that repeat an earlier mask of their image
    identical = overlap_table[overlap_table.identical]
    if len(identical):
        dropped[identical.row_b.to_numpy()] = True
        lines = ", ".join(f"{r.ImageId} line {r.line_b} (= line {r.line_a})" for r in identical.head(10).itertuples())
        logger.warning("%s: %d ground-truth rows repeat an earlier mask of their image and are dropped: %s%s",
                       csv_path, int(dropped.sum()), lines, " ..." if len(identical) > 10 else "")
        overlap_table = overlap_table[~(dropped[overlap_table.row_a.to_numpy()] | dropped[overlap_table.row_b.to_numpy()])]
    overlap_table = overlap_table.drop(columns=["row_a", "row_b", "identical"]).reset_index(drop=True)
    replaced: dict[int, list[dict]] = {}  # group index -> annotations rebuilt without the overlaps
    if len(overlap_table):
        first = overlap_table.iloc[0]
        message = (f"{csv_path}: {len(overlap_table)} pairs of ground-truth masks overlap in "
                   f"{overlap_table.ImageId.nunique()} images (first: {first.ImageId}, lines {first.line_a} and "
                   f"{first.line_b}, {first.pixels} px)")
        if overlaps == "error":
            raise ValueError(message + "; Kaggle's v2 truth has none (overlaps=background removes them)")
        logger.warning("%s; %s", message, "setting the shared pixels to background" if overlaps == "background"
                       else "kept as they are (overlaps='background' removes them, as Kaggle did for v2)")
        if overlaps == "background":
            group_of_id = {image_id: g for g, image_id in enumerate(loaded.group_ids)}
            for image_id in overlap_table.ImageId.unique():
                g = group_of_id[image_id]
                rows = [r for r in loaded.order[loaded.group_start[g]:loaded.group_start[g] + loaded.group_size[g]]
                        if runs.n_runs[r] and not dropped[r]]
                fixed, lost = _remove_overlaps([loaded.rle_text(r) for r in rows], shape)
                for r, share in zip(rows, lost.tolist()):
                    if share > MOSTLY_LOST:
                        logger.warning("%s: ImageId %s, line %d: the ship loses %.0f%% of its pixels to overlaps "
                                       "set to background", csv_path, image_id, loaded.line(r), 100 * share)
                fixed_runs = ParsedRuns(fixed, shape)
                replaced[g] = _annotations(fixed_runs, np.flatnonzero(fixed_runs.n_runs > 0), BoxMode.XYWH_ABS)

    # The mask rows in ImageId order (CSV order within an image); image g owns a contiguous slice.
    has_mask = (runs.n_runs > 0)[loaded.order] & ~dropped[loaded.order]
    annotations = _annotations(runs, loaded.order[has_mask], BoxMode.XYWH_ABS)
    bounds = np.zeros(loaded.group_start.size + 1, np.int64)
    if has_mask.size:
        np.cumsum(np.add.reduceat(has_mask.astype(np.int64), loaded.group_start), out=bounds[1:])
    bounds = bounds.tolist()
    group_annotations = [annotations[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
    for g, fixed_annotations in replaced.items():
        group_annotations[g] = fixed_annotations
    prefix, height, width = str(image_dir) + os.sep, shape[0], shape[1]
    dicts = [{"file_name": prefix + image_id, "height": height, "width": width, "image_id": image_id,
              "annotations": annotations} for image_id, annotations in zip(loaded.group_ids, group_annotations)]
    return dicts, overlap_table


def _annotations(runs: ParsedRuns, rows: np.ndarray, mode) -> list[dict]:
    """detectron2 annotation dicts of the (nonempty) ``rows`` of ``runs``, in that order."""
    height, width = runs.shape
    return [{"bbox": box, "bbox_mode": mode, "segmentation": {"size": [height, width], "counts": counts},
             "category_id": 0, "iscrowd": 0} for box, counts in zip(runs.bboxes()[rows].tolist(), runs.coco_counts(rows))]


# ============================================================================ COCO export
def dicts_to_coco(dicts: Sequence[dict], description: str = "Airbus Ship Detection") -> dict:
    """Dataset dicts -> a standard COCO instances dict (category 1 "ship", RLE segmentation, area, bbox).

    Image ids are 1..N in the order of ``dicts``; ``file_name`` is the Kaggle ImageId (relative to
    the image folder), as COCO tools expect.
    """
    from pycocotools import mask as mask_util

    images, annotations = [], []
    for index, d in enumerate(dicts, start=1):
        images.append({"id": index, "file_name": Path(d["file_name"]).name, "height": d["height"],
                       "width": d["width"]})
        for a in d["annotations"]:
            annotations.append({"id": len(annotations) + 1, "image_id": index, "category_id": a["category_id"] + 1,
                                "segmentation": a["segmentation"], "bbox": list(a["bbox"]),
                                "iscrowd": a.get("iscrowd", 0)})
    if annotations:
        areas = mask_util.area([{"size": a["segmentation"]["size"], "counts": a["segmentation"]["counts"].encode()}
                                for a in annotations])
        for a, area in zip(annotations, areas.tolist()):
            a["area"] = float(area)
    return {"info": {"description": description}, "licenses": [], "images": images, "annotations": annotations,
            "categories": [{"id": 1, "name": "ship", "supercategory": "ship"}]}


def save_coco_json(dicts: Sequence[dict], out_path: str | os.PathLike) -> Path:
    """Write :func:`dicts_to_coco` as JSON, atomically; returns the path."""
    import json

    out_path = Path(out_path)
    coco = dicts_to_coco(dicts)
    with atomic_path(out_path) as tmp:
        with open(tmp, "w") as handle:
            json.dump(coco, handle)
    logger.info("wrote %s: %d images, %d annotations", out_path, len(coco["images"]), len(coco["annotations"]))
    return out_path


# ============================================================================ overlap-aware split
BLOCK_GRID = 3  # Kaggle tiles overlap at multiples of 256 px = a third of the 768 px tile
_SIGNATURE_CELLS = 8  # each block is described by its 8x8 grid of mean grey levels
_KEY_CELLS = 4  # ... and bucketed by a coarse 4x4 grid of them
_KEY_STEP = 6.0  # grey levels per bucket of the coarse key (two grids, offset by half a step)
# Blocks match when their 8x8 signatures differ by at most this on average (grey levels). Blocks
# two Kaggle tiles share decode identically (0.0); at 256 px the synthetic scenes' thirds fall
# on other pixels than the JPEG blocks and differ by ~0.1; distinct blocks of the real sample
# (std >= 1) differ by >= 1.08.
_MATCH_TOLERANCE = 0.3
_MIN_BLOCK_STD = 1.0  # flatter blocks (open sea, cloud) match anything: they never join tiles
SHIP_COUNT_STRATA = (0, 1, 2, 4, 7)  # stratum lower bounds of an image's ship count


def block_signatures(path: str | os.PathLike, grid: int = BLOCK_GRID) -> np.ndarray:
    """``(grid*grid, 8, 8)`` float32 mean grey levels of each block of the tile, row-major blocks.

    Blocks start every ``round(side / grid)`` px (256 at 768 px: Kaggle's tile offsets), so a
    block two tiles share covers the same scene pixels in both. Decoded at up to a quarter of the
    size through JPEG's DCT scaling (``Image.draft``) when the block offset divides by it; that
    scaling is block-local like the encoding itself, so shared blocks give the same numbers. A
    margin of 1/16 of the block is left out on each side: JPEG's chroma upsampling there reads
    pixels of the neighbouring block, which differ between the tiles.
    """
    from PIL import Image

    with Image.open(path) as image:
        side = min(image.size)
        step = int(round(side / grid))
        reduce = next(r for r in (4, 2, 1) if r == 1 or (step % r == 0 and step // r >= 2 * _SIGNATURE_CELLS))
        image.draft("L", (image.width // reduce, image.height // reduce))
        grey = np.asarray(image.convert("L"), dtype=np.float32)
    step //= reduce
    length = min(step, min(grey.shape) - (grid - 1) * step)  # the same size for every block
    if length < _SIGNATURE_CELLS:  # tiny test tiles: repeat pixels up to one per cell
        factor = -(-_SIGNATURE_CELLS // length)
        grey = grey.repeat(factor, axis=0).repeat(factor, axis=1)
        step, length = step * factor, length * factor
    margin = length // 16
    cell = (length - 2 * margin) // _SIGNATURE_CELLS
    inset = (length - cell * _SIGNATURE_CELLS) // 2
    out = np.empty((grid * grid, _SIGNATURE_CELLS, _SIGNATURE_CELLS), np.float32)
    span = cell * _SIGNATURE_CELLS
    for b in range(grid * grid):
        top, left = (b // grid) * step + inset, (b % grid) * step + inset
        crop = grey[top:top + span, left:left + span]
        out[b] = crop.reshape(_SIGNATURE_CELLS, cell, _SIGNATURE_CELLS, cell).mean(axis=(1, 3))
    return out


def compute_block_signatures(paths: Sequence[str | os.PathLike], num_workers: int | None = None) -> np.ndarray:
    """:func:`block_signatures` of many tiles (threads, tqdm bar): ``(N, 9, 8, 8)`` float32."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    paths = [str(p) for p in paths]
    if not paths:
        return np.zeros((0, BLOCK_GRID * BLOCK_GRID, _SIGNATURE_CELLS, _SIGNATURE_CELLS), np.float32)
    with ThreadPoolExecutor(num_workers or min(8, os.cpu_count() or 1)) as pool:
        signatures = list(tqdm(pool.map(block_signatures, paths, chunksize=32), total=len(paths),
                               desc="block signatures", unit="img", disable=None))
    return np.stack(signatures)


def group_overlapping_tiles(signatures: np.ndarray) -> np.ndarray:
    """Group ids ``(N,)`` int64 such that tiles sharing a block (transitively) share an id.

    ``signatures``: ``(N, blocks, 8, 8)`` from :func:`compute_block_signatures`. Blocks are
    bucketed by their coarse 4x4 means on two grids offset by half a step (so two nearly equal
    blocks share a bucket on at least one of them, almost surely), then matched on the full 8x8
    signature (mean absolute difference within :data:`_MATCH_TOLERANCE`); featureless blocks are never matched. Groups are
    numbered by their first tile.
    """
    n_images = signatures.shape[0]
    parent = np.arange(n_images)

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    flat = signatures.reshape(n_images * signatures.shape[1], -1)
    image_of_block = np.repeat(np.arange(n_images), signatures.shape[1])
    informative = flat.std(axis=1) >= _MIN_BLOCK_STD
    blocks = np.flatnonzero(informative)
    side = signatures.shape[-1]
    factor = side // _KEY_CELLS
    coarse = signatures.reshape(n_images * signatures.shape[1], _KEY_CELLS, factor, _KEY_CELLS, factor)
    coarse = coarse.mean(axis=(2, 4)).reshape(-1, _KEY_CELLS * _KEY_CELLS)[blocks]
    for offset in (0.0, 0.5):
        keys = np.floor(coarse / _KEY_STEP + offset).astype(np.int16)
        _, bucket = np.unique(keys, axis=0, return_inverse=True)
        bucket = bucket.reshape(-1)
        order = np.argsort(bucket, kind="stable")
        starts = np.flatnonzero(np.diff(bucket[order], prepend=-1))
        sizes = np.diff(np.append(starts, order.size))
        for start, size in zip(starts[sizes > 1].tolist(), sizes[sizes > 1].tolist()):
            ids = blocks[order[start:start + size]]
            images = image_of_block[ids]
            if images.min() == images.max():
                continue
            rows = max(1, 2 ** 24 // (size * flat.shape[1]))  # bound the pairwise array (~64 MB)
            for top in range(0, size, rows):
                diff = np.abs(flat[ids[top:top + rows], None, :] - flat[ids][None, :, :]).mean(axis=2)
                a, b = np.nonzero(diff <= _MATCH_TOLERANCE)
                for i, j in zip(images[a + top].tolist(), images[b].tolist()):
                    ri, rj = find(i), find(j)
                    if ri != rj:
                        parent[max(ri, rj)] = min(ri, rj)
    roots = np.array([find(i) for i in range(n_images)], np.int64)
    _, groups = np.unique(roots, return_inverse=True)  # roots are first members: ids in order of first tile
    return groups.reshape(-1).astype(np.int64)


def ship_count_stratum(n_ships: int) -> int:
    """Index of the :data:`SHIP_COUNT_STRATA` bucket of an image with ``n_ships`` ships."""
    return int(np.searchsorted(SHIP_COUNT_STRATA, n_ships, side="right") - 1)


def assign_folds(groups: np.ndarray, ship_counts: np.ndarray, val_fraction: float, seed: int) -> np.ndarray:
    """Boolean ``(N,)``: True for validation images; whole groups go to one fold.

    Stratified by ship count: each group belongs to the stratum of its busiest tile, and groups
    of each stratum are taken in a seeded random order into validation while that keeps the
    stratum's validation share closest to ``val_fraction``. Deterministic given ``seed``.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    groups = np.asarray(groups, np.int64)
    ship_counts = np.asarray(ship_counts, np.int64)
    n_groups = int(groups.max()) + 1 if groups.size else 0
    size = np.bincount(groups, minlength=n_groups)
    busiest = np.zeros(n_groups, np.int64)
    np.maximum.at(busiest, groups, ship_counts)
    stratum = np.array([ship_count_stratum(c) for c in busiest.tolist()], np.int64)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n_groups)
    is_val_group = np.zeros(n_groups, bool)
    for s in np.unique(stratum).tolist():
        members = order[stratum[order] == s]
        target = val_fraction * size[members].sum()
        taken = 0
        for g in members.tolist():
            if abs(taken + size[g] - target) < abs(taken - target):
                is_val_group[g] = True
                taken += size[g]
    return is_val_group[groups]


def get_split_table(dicts: Sequence[dict], val_fraction: float, seed: int, groups: np.ndarray | None = None):
    """The split of ``dicts`` as a DataFrame ``ImageId, fold ("train"/"val"), group, n_ships``, in order.

    Tiles that share a 256 px block (:func:`group_overlapping_tiles` on their images, unless
    ``groups`` is given) always land in the same fold (:func:`assign_folds`, stratified by ship
    count), so validation never sees a ship the model trained on. Deterministic given ``seed``.
    """
    import pandas as pd

    if groups is None:
        groups = group_overlapping_tiles(compute_block_signatures([d["file_name"] for d in dicts]))
    n_ships = np.array([len(d["annotations"]) for d in dicts], np.int64)
    is_val = assign_folds(groups, n_ships, val_fraction, seed)
    return pd.DataFrame({"ImageId": [d["image_id"] for d in dicts], "fold": np.where(is_val, "val", "train"),
                         "group": np.asarray(groups, np.int64), "n_ships": n_ships})


def split_train_val(dicts: Sequence[dict], val_fraction: float = 0.1, seed: int = 42,
                    groups: np.ndarray | None = None) -> tuple[list[dict], list[dict]]:
    """``(train_dicts, val_dicts)`` of :func:`get_split_table`, order kept."""
    is_val = (get_split_table(dicts, val_fraction, seed, groups)["fold"] == "val").to_numpy()
    return ([d for d, v in zip(dicts, is_val) if not v], [d for d, v in zip(dicts, is_val) if v])


# ============================================================================ run-level entry points
def _expected_layout(cfg) -> dict[str, Path]:
    get = module_config.get_input_path
    return {"train CSV": get(cfg, cfg.DATA.TRAIN_CSV), "train images": get(cfg, cfg.DATA.TRAIN_IMAGES),
            "test images": get(cfg, cfg.DATA.TEST_IMAGES), "sample submission": get(cfg, cfg.DATA.SAMPLE_SUBMISSION)}


def _layout_hint(input_dir: Path, missing: Path) -> str:
    """A guess at what the user did instead (a nested unzip folder, a v1 name, a zip left zipped)."""
    if not input_dir.is_dir():
        return ""
    names = sorted(p.name for p in input_dir.iterdir())
    hints = []
    nested = [p for p in input_dir.iterdir() if p.is_dir() and (p / missing.name).exists()]
    if nested:
        hints.append(f"it is inside {nested[0]}: point PATHS.INPUT_DIR there, or move its contents up")
    wanted = {missing.name, missing.name.replace("_v2", "")}  # v1 of the competition had no _v2
    similar = [n for n in names if n != missing.name and (n in wanted or n.removesuffix(".zip") in wanted)]
    if similar:
        hints.append(f"found {', '.join(similar[:3])} instead (unzip it, or rename it to {missing.name})")
    if not hints:
        hints.append(f"{input_dir} holds: {', '.join(names[:10]) or 'nothing'}")
    return "; ".join(hints)


def check_input_layout(cfg, test: bool = True) -> Path:
    """Check that ``PATHS.INPUT_DIR`` holds Kaggle's layout; returns the folder. Reads, never writes
    (``module_synthetic.prepare_synthetic_input`` generates the demo's data first).

    Raises ``FileNotFoundError`` naming what is missing and how to fix it (a nested unzip folder,
    a zip left zipped, the v1 names). ``test=False`` checks only what training needs.
    """
    input_dir = Path(cfg.PATHS.INPUT_DIR)
    layout = _expected_layout(cfg)
    if not input_dir.is_dir():
        raise FileNotFoundError(
            f"input folder {input_dir} does not exist. Download the data with `kaggle competitions download -c "
            f"airbus-ship-detection` and unzip it into {input_dir}/, or use configs/demo.yaml (synthetic data)")
    needed = ("train CSV", "train images", "test images", "sample submission") if test else ("train CSV", "train images")
    for what in needed:
        path = layout[what]
        exists = path.is_file() if path.suffix == ".csv" else path.is_dir()
        if not exists:
            raise FileNotFoundError(f"{what} not found: expected {path} ({_layout_hint(path.parent, path)})")
    for what in [w for w in needed if w.endswith("images")]:
        if not any(layout[what].glob("*.jpg")):
            raise FileNotFoundError(f"{what}: {layout[what]} holds no .jpg files")
    return input_dir


def _split_fingerprint(cfg, csv_path: Path, image_dir: Path) -> dict:
    stat = csv_path.stat()
    return {"csv": str(csv_path.resolve()), "csv_bytes": stat.st_size, "csv_mtime_ns": stat.st_mtime_ns,
            "images": str(image_dir.resolve()), "images_mtime_ns": image_dir.stat().st_mtime_ns,
            "image_size": int(cfg.DATA.IMAGE_SIZE), "val_fraction": float(cfg.DATA.VAL_FRACTION),
            "seed": int(cfg.DATA.SPLIT_SEED), "max_images": int(cfg.DATA.MAX_IMAGES),
            "check_images": cfg.DATA.CHECK_IMAGES}


def subsample_dicts(dicts: Sequence[dict], max_images: int, seed: int) -> list[dict]:
    """At most ``max_images`` dicts (0: all), a seeded sample in the original order."""
    if not max_images or max_images >= len(dicts):
        return list(dicts)
    keep = np.sort(np.random.default_rng(seed).choice(len(dicts), max_images, replace=False))
    return [dicts[i] for i in keep.tolist()]


_DICTS_CACHE: dict[str, tuple] = {}  # fingerprint -> (train, val, split table, split meta), for one process


def get_train_val_dicts(cfg) -> tuple[list[dict], list[dict]]:
    """The run's ``(train_dicts, val_dicts)`` from the config's ``DATA`` keys.

    Reads ``DATA.TRAIN_CSV`` and ``DATA.TRAIN_IMAGES`` under ``PATHS.INPUT_DIR`` (after
    :func:`check_input_layout`), checks the images per ``DATA.CHECK_IMAGES``, keeps at most
    ``DATA.MAX_IMAGES``, and splits with :func:`split_train_val` (``DATA.VAL_FRACTION``,
    ``DATA.SPLIT_SEED``). The split and the images the checks skipped are written to
    ``runs/<run>/split.csv`` / ``split.json`` (atomically) and reused while the CSV, the image
    folder and these keys are unchanged, so the classifier, the detector and the submission see
    the same folds, and images are checked and hashed once. Within a process the result is cached.
    """
    import json

    import pandas as pd

    check_input_layout(cfg, test=False)
    layout = _expected_layout(cfg)
    csv_path, image_dir = layout["train CSV"], layout["train images"]
    fingerprint = _split_fingerprint(cfg, csv_path, image_dir)
    key = json.dumps(fingerprint, sort_keys=True)
    split_path = module_config.get_split_path(cfg)
    meta_path = split_path.with_suffix(".json")
    if key in _DICTS_CACHE:
        train, val, table, meta = _DICTS_CACHE[key]
        if not split_path.is_file():  # another run folder than the one this process first split for
            _write_split(split_path, table, meta)
        return list(train), list(val)
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    reuse = split_path.is_file() and meta.get("fingerprint") == fingerprint
    check = cfg.DATA.CHECK_IMAGES
    report: dict = {}
    dicts = load_dataset_dicts(csv_path, image_dir, check_images="off" if reuse and check == "skip" else check,
                               image_size=cfg.DATA.IMAGE_SIZE, overlaps="background", report=report)
    skipped = meta.get("skipped", {}) if reuse else report["skipped"]
    if reuse and skipped:
        logger.warning("skipping the %d images the image check found bad before (%s): %s", len(skipped), meta_path,
                       "; ".join(f"{Path(p).name}: {why}" for p, why in list(skipped.items())[:10]))
        dicts = [d for d in dicts if d["file_name"] not in skipped]
    dicts = subsample_dicts(dicts, int(cfg.DATA.MAX_IMAGES), int(cfg.DATA.SPLIT_SEED))
    if not dicts:
        raise ValueError(f"{csv_path}: no usable training images (all missing or skipped?)")
    ids = [d["image_id"] for d in dicts]
    saved = pd.read_csv(split_path, dtype={"ImageId": str}, keep_default_na=False) if reuse else None
    if saved is not None and saved["ImageId"].tolist() != ids:
        saved = None
    if saved is None:
        saved = get_split_table(dicts, float(cfg.DATA.VAL_FRACTION), int(cfg.DATA.SPLIT_SEED))
        _write_split(split_path, saved, {"fingerprint": fingerprint, "skipped": skipped})
        logger.info("split %d images into %d train / %d val (%d overlap groups); wrote %s", len(ids),
                    int((saved.fold == "train").sum()), int((saved.fold == "val").sum()), saved.group.nunique(),
                    split_path)
    is_val = (saved["fold"] == "val").to_numpy()
    train = [d for d, v in zip(dicts, is_val) if not v]
    val = [d for d, v in zip(dicts, is_val) if v]
    _DICTS_CACHE[key] = (train, val, saved, {"fingerprint": fingerprint, "skipped": skipped})
    return list(train), list(val)


def _write_split(split_path: Path, table, meta: dict) -> None:
    """``split.csv`` (the table) and ``split.json`` (fingerprint, skipped images), atomically."""
    import json

    with atomic_path(split_path) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(split_path.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps(meta, indent=1))


# ============================================================================ command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Kaggle Airbus CSV + images -> dataset dicts (checked), COCO JSON, "
                                                 "overlap-aware split. --csv and --images default to the config's.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_data_args(p, out_help: str | None):
        p.add_argument("--csv", default=None, help="Kaggle ImageId,EncodedPixels CSV (default DATA.TRAIN_CSV)")
        p.add_argument("--images", default=None, help="folder of the CSV's images (default DATA.TRAIN_IMAGES)")
        p.add_argument("--image-size", type=int, default=None, help="side of the tiles in px (default DATA.IMAGE_SIZE)")
        p.add_argument("--check-images", choices=CHECK_MODES, default="off",
                       help="decode every image (size, mode, truncation): stop at a bad one, or skip and report")
        p.add_argument("--overlaps", choices=OVERLAP_MODES, default="warn",
                       help="ground-truth masks that share pixels: warn, error, or set the shared pixels to background")
        if out_help:
            p.add_argument("--out", required=True, help=out_help)
        module_config.add_config_args(p)

    add_data_args(sub.add_parser("dicts", help="build and validate dataset dicts; print a summary"), None)
    add_data_args(sub.add_parser("coco", help="write a COCO instances JSON"), "COCO JSON to write")
    split = sub.add_parser("split", help="overlap-aware train/val split, written as a CSV")
    add_data_args(split, "split CSV to write (ImageId, fold, group, n_ships)")
    split.add_argument("--val-fraction", type=float, default=None, help="default DATA.VAL_FRACTION")
    split.add_argument("--seed", type=int, default=None, help="default DATA.SPLIT_SEED")
    return parser


def main(args: argparse.Namespace):
    module_config.setup_logging()
    cfg = module_config.get_cfg_from_args(args)
    layout = _expected_layout(cfg)
    csv_path = args.csv or layout["train CSV"]
    image_size = args.image_size or cfg.DATA.IMAGE_SIZE
    report: dict = {}
    dicts = load_dataset_dicts(csv_path, args.images or layout["train images"], check_images=args.check_images,
                               image_size=image_size, overlaps=args.overlaps, report=report)
    n_ships = np.array([len(d["annotations"]) for d in dicts])
    print(f"{csv_path}: {len(dicts)} images, {int(n_ships.sum())} ships, "
          f"{np.mean(n_ships == 0) if len(dicts) else 0:.1%} ship-free, {len(report['skipped'])} skipped, "
          f"{len(report['overlaps'])} overlapping mask pairs")
    for path, problem in report["skipped"].items():
        print(f"skipped {path}: {problem}")
    if args.command == "coco":
        print(f"wrote {save_coco_json(dicts, args.out)}")
    elif args.command == "split":
        frame = get_split_table(dicts, args.val_fraction if args.val_fraction is not None else cfg.DATA.VAL_FRACTION,
                                args.seed if args.seed is not None else cfg.DATA.SPLIT_SEED)
        with atomic_path(args.out) as tmp:
            frame.to_csv(tmp, index=False)
        print(f"{int((frame.fold == 'train').sum())} train / {int((frame.fold == 'val').sum())} val images, "
              f"{frame.group.nunique()} overlap groups; wrote {args.out}")
    return dicts


if __name__ == "__main__":
    main(get_args_parser().parse_args())
