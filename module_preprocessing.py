"""The Kaggle data layer: RLE codec, CSV + images -> dataset dicts, COCO export, split, input layout.

Everything that reads ``train_ship_segmentations_v2.csv`` or turns a mask into a Kaggle string
lives here, once:

* the **RLE codec** (:func:`parse_rle`, :func:`rle_decode`, :func:`rle_encode`,
  :func:`kaggle_rle_to_coco`, :func:`coco_to_kaggle_rle`, :func:`rle_bbox`, :func:`rle_area`).
  Kaggle RLE is space-separated ``start length`` pairs, 1-indexed, over the pixels numbered
  **column-major** (top to bottom, then left to right), sorted and non-overlapping. COCO RLE is
  column-major too, so the two convert on the runs without building a mask;
* the **overlap resolver** :func:`resolve_overlaps` (each pixel to the highest-scoring mask), used
  by the validation hook and the submission;
* **dataset dicts** :func:`load_dataset_dicts` (detectron2 format, ``segmentation`` as COCO RLE),
  optional image checks, ground-truth overlap report, COCO JSON export. The loops over a whole
  CSV (parsing, validating, COCO counts, boxes, overlaps) are compiled, in
  :mod:`module_rle_kernels` (numba);
* the **overlap-aware split** :func:`split_train_val`: Kaggle tiles are 768 px crops of larger
  scenes overlapping at multiples of 256 px; tiles that share a 256 px block stay in one fold;
* the run-level entry points :func:`prepare_input`, :func:`get_train_val_dicts`,
  :func:`register_airbus_datasets`.

Command line (``python module_preprocessing.py -h``)::

    python module_preprocessing.py dicts --csv input/train_ship_segmentations_v2.csv --images input/train_v2
    python module_preprocessing.py coco  --csv CSV --images DIR --out train_coco.json
    python module_preprocessing.py split --csv CSV --images DIR --out split.csv
    python module_preprocessing.py synth --out input --n-train 400 --n-test 100 --seed 0

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

logger = logging.getLogger(__name__)

KAGGLE_SHAPE = (768, 768)  # (height, width) of every Kaggle tile


# ============================================================================ RLE codec
class RLEError(ValueError):
    """An invalid Kaggle RLE string; the message names the ImageId and CSV line when known."""

    def __init__(self, message: str, image_id: str | None = None, line: int | None = None,
                 csv_path: str | os.PathLike | None = None):
        self.image_id, self.line, self.csv_path, self.reason = image_id, line, csv_path, message
        where = [str(csv_path) if csv_path else "", f"line {line}" if line else "",
                 f"ImageId {image_id}" if image_id else ""]
        prefix = ", ".join(w for w in where if w)
        super().__init__(f"{prefix}: {message}" if prefix else message)


_ASCII_SPACE = " \t\n\v\f\r"  # what separates tokens (C's isspace); other Unicode spaces are errors


def _is_blank(rle) -> bool:
    if rle is None:
        return True
    if isinstance(rle, float):  # pandas reads a blank EncodedPixels as NaN
        return rle != rle
    return isinstance(rle, str) and not rle.strip(_ASCII_SPACE)


def _explain_bad_runs(tokens: np.ndarray, n_pixels: int) -> str:
    """Why ``tokens`` (1-indexed start/length pairs, even count) are not valid runs."""
    starts, lengths = tokens[0::2], tokens[1::2]
    bad = np.flatnonzero(starts < 1)
    if bad.size:
        return f"run {bad[0] + 1} starts at {starts[bad[0]]}; starts are 1-indexed (>= 1)"
    bad = np.flatnonzero(lengths < 1)
    if bad.size:
        return f"run {bad[0] + 1} (start {starts[bad[0]]}) has length {lengths[bad[0]]}; lengths must be >= 1"
    ends = starts + lengths - 1  # last pixel, 1-indexed
    bad = np.flatnonzero(ends > n_pixels)
    if bad.size:
        k = bad[0]
        return (f"run {k + 1} (start {starts[k]}, length {lengths[k]}) ends at pixel {ends[k]}, "
                f"past the image's {n_pixels} pixels")
    bad = np.flatnonzero(starts[1:] <= ends[:-1])
    if bad.size:
        k = bad[0]
        what = "overlaps" if starts[k + 1] >= starts[k] else "is not after"
        return (f"run {k + 2} (start {starts[k + 1]}) {what} run {k + 1} (start {starts[k]}, length "
                f"{lengths[k]}); runs must be sorted and must not overlap")
    return "invalid runs"


_RLE_CHARS = str.maketrans("", "", "0123456789" + _ASCII_SPACE)  # deleting these leaves only bad chars


def _tokens(rle: str, image_id=None, line=None, csv_path=None) -> np.ndarray:
    """The integers of ``rle`` (int64), or an RLEError naming the first bad token."""
    if not isinstance(rle, str):
        raise RLEError(f"expected a str, got {type(rle).__name__}", image_id, line, csv_path)
    leftover = rle.translate(_RLE_CHARS)
    if leftover:  # anything but digits and ASCII whitespace ("1.5", "-3", "1,2", "1+2")
        for k, token in enumerate(rle.split()):
            if not (token.isascii() and token.isdigit()):
                raise RLEError(f"token {k + 1} {token[:20]!r} is not a positive integer", image_id, line, csv_path)
        raise RLEError(f"character {leftover[0]!r} between the tokens; expected digits separated by spaces",
                       image_id, line, csv_path)
    tokens = np.fromstring(rle, dtype=np.int64, sep=" ")  # C parser
    if tokens.size % 2:
        raise RLEError(f"odd number of tokens ({tokens.size}); expected 'start length' pairs",
                       image_id, line, csv_path)
    return tokens


def parse_rle(rle: str, shape: tuple[int, int] = KAGGLE_SHAPE, *, image_id: str | None = None,
              line: int | None = None, csv_path=None) -> tuple[np.ndarray, np.ndarray]:
    """Validated runs of a Kaggle RLE: ``(starts, lengths)``, int64, **0-indexed** column-major starts.

    ``""``, ASCII whitespace, ``None`` and NaN are the empty mask (two empty arrays). Raises
    :class:`RLEError` (a ``ValueError``) for an odd token count, a non-integer token, start < 1,
    length < 1, a run past ``H*W``, or runs that are unsorted or overlap; ``image_id``, ``line``
    and ``csv_path`` only go into the message.
    """
    if _is_blank(rle):
        empty = np.zeros(0, np.int64)
        return empty, empty.copy()
    tokens = _tokens(rle, image_id, line, csv_path)
    n_pixels = int(shape[0]) * int(shape[1])
    starts, lengths = tokens[0::2] - 1, tokens[1::2].copy()
    ends = starts + lengths
    # One vector test for every rule: lengths >= 1, first start >= 0, each start >= previous end,
    # last end <= H*W.
    if (lengths.size and (lengths.min() < 1 or starts[0] < 0 or ends[-1] > n_pixels
                          or (starts[1:] < ends[:-1]).any())):
        raise RLEError(_explain_bad_runs(tokens, n_pixels), image_id, line, csv_path)
    return starts, lengths


_ALTERNATING = np.tile(np.array([0, 1], np.uint8), 4096)  # 0,1,0,1... values of the run counts


def rle_decode(rle: str, shape: tuple[int, int] = KAGGLE_SHAPE, *, image_id: str | None = None,
               line: int | None = None) -> np.ndarray:
    """Kaggle RLE -> mask ``(H, W)`` uint8 0/1 (``shape = (H, W)``); blank/NaN -> all zeros.

    The result is a transposed view of a column-major buffer (Fortran order, like pycocotools'
    ``decode`` and the Kaggle kernels); ``np.ascontiguousarray`` it if a library needs C order.
    Raises :class:`RLEError` for an invalid string (see :func:`parse_rle`).
    """
    height, width = int(shape[0]), int(shape[1])
    if _is_blank(rle):
        return np.zeros((width, height), np.uint8).T
    tokens = _tokens(rle, image_id, line)
    n_pixels = height * width
    flat = np.zeros(n_pixels, np.uint8)  # calloc: the floor of any decoder that returns a fresh mask
    if tokens.size:
        # Only the span from the first run's start to the last run's end is written, in one C
        # pass over the counts run, gap, run, gap, ..., run. A negative gap (unsorted or
        # overlapping runs) makes np.repeat raise; a run past H*W makes the assignment raise.
        counts = np.empty(tokens.size - 1, np.int64)
        counts[0::2] = tokens[1::2]
        counts[1::2] = tokens[2::2] - tokens[0:-2:2] - tokens[1:-2:2]
        first, end = int(tokens[0]) - 1, int(tokens[-2] + tokens[-1]) - 1
        values = _ALTERNATING[1:counts.size + 1] if counts.size < _ALTERNATING.size \
            else np.resize(_ALTERNATING[::-1], counts.size)
        try:
            if first < 0 or end > n_pixels or tokens[1::2].min() < 1:
                raise ValueError
            flat[first:end] = np.repeat(values, counts)
        except ValueError:
            raise RLEError(_explain_bad_runs(tokens, n_pixels), image_id, line) from None
    return flat.reshape(width, height).T


def _runs_to_string(starts0: np.ndarray, lengths: np.ndarray) -> str:
    out = np.empty(2 * starts0.size, np.int64)
    out[0::2] = starts0 + 1
    out[1::2] = lengths
    return " ".join(map(str, out.tolist()))


def _as_binary(mask) -> np.ndarray:
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"expected a 2-D mask (H, W), got shape {mask.shape}")
    if mask.dtype == np.bool_ or (mask.dtype.itemsize == 1 and mask.dtype.kind in "ui"):
        return mask
    return mask != 0


def _nonzero_span(flat_words: np.ndarray) -> tuple[int, int] | None:
    """First and last index of a nonzero 8-byte word, or None when all are zero."""
    nonzero = flat_words != 0
    first = int(nonzero.argmax())
    if not nonzero[first]:
        return None
    return first, nonzero.size - 1 - int(nonzero[::-1].argmax())


def mask_to_runs(mask) -> tuple[np.ndarray, np.ndarray]:
    """Runs of a mask ``(H, W)`` (nonzero = ship): ``(starts, lengths)`` int64, 0-indexed column-major.

    Works on the bounding box only: ships are small, so scanning the 590k-pixel tile once (8
    bytes at a time) and diffing the crop beats diffing the whole transposed image.
    """
    m = _as_binary(mask)
    height, width = m.shape
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if m.flags.c_contiguous and width % 8 == 0 and m.dtype.itemsize == 1:
        span = _nonzero_span(m.reshape(-1).view(np.uint64))
        if span is None:
            return empty
        r0, r1 = span[0] * 8 // width, span[1] * 8 // width + 1
        cols = np.flatnonzero(m[r0:r1].any(axis=0))
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
    elif m.flags.f_contiguous and height % 8 == 0 and m.dtype.itemsize == 1:
        span = _nonzero_span(m.T.reshape(-1).view(np.uint64))
        if span is None:
            return empty
        c0, c1 = span[0] * 8 // height, span[1] * 8 // height + 1
        rows = np.flatnonzero(m[:, c0:c1].any(axis=1))
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
    else:
        rows = np.flatnonzero(m.any(axis=1))
        if rows.size == 0:
            return empty
        r0, r1 = int(rows[0]), int(rows[-1]) + 1
        cols = np.flatnonzero(m[r0:r1].any(axis=0))
        c0, c1 = int(cols[0]), int(cols[-1]) + 1
    crop_h, crop_w = r1 - r0, c1 - c0
    # Column-major copy of the crop with one zero row under each column, so that runs never join
    # across columns -- except when the crop is full height, where Kaggle's runs do wrap.
    col_h = crop_h if crop_h == height else crop_h + 1
    buf = np.zeros(crop_w * col_h + 2, np.bool_)
    buf[1:1 + crop_w * col_h].reshape(crop_w, col_h)[:, :crop_h] = m[r0:r1, c0:c1].T
    edges = np.flatnonzero(buf[1:] != buf[:-1])
    begin, end = edges[0::2], edges[1::2]
    col, row = np.divmod(begin, col_h)
    return (col + c0) * height + row + r0, end - begin


def rle_encode(mask) -> str:
    """Mask ``(H, W)`` (any dtype, nonzero = ship; C or Fortran order) -> Kaggle RLE; ``""`` if empty.

    Column-major, 1-indexed, space-separated ``start length`` pairs: bit-identical to the Kaggle
    kernels' ``rle_encode`` (``img.T.flatten()`` and a diff) on 0/1 masks.
    """
    starts, lengths = mask_to_runs(mask)
    return _runs_to_string(starts, lengths) if starts.size else ""


def kaggle_rle_to_coco(rle: str, shape: tuple[int, int] = KAGGLE_SHAPE, *, image_id: str | None = None,
                       line: int | None = None) -> dict:
    """Kaggle RLE -> COCO compressed RLE ``{"size": [H, W], "counts": str}``, built from the runs.

    Both formats are column-major, so the uncompressed COCO counts are the gaps and lengths of
    the runs; they are compressed as pycocotools does (byte-identical), in compiled code. No mask
    is built. Blank is the empty mask.
    """
    return kaggle_rles_to_coco([rle], shape, image_ids=None if image_id is None else [image_id],
                               lines=None if line is None else [line])[0]


def kaggle_rles_to_coco(rles: Sequence[str], shape: tuple[int, int] = KAGGLE_SHAPE, *,
                        image_ids: Sequence[str] | None = None, lines: Sequence[int] | None = None) -> list[dict]:
    """:func:`kaggle_rle_to_coco` for many strings of one ``shape``, parsed and compressed in one pass."""
    if not len(rles):
        return []
    return _ParsedRuns(rles, shape, image_ids, lines).coco(empty=True)


def _coco_string_to_counts(counts: str | bytes) -> np.ndarray:
    """Uncompressed counts from COCO's counts string, in numpy (pycocotools' ``rleFrString``).

    Each value is little-endian 5-bit groups in chars ``48 + group`` (bit 0x20: more groups follow;
    bit 0x10 of the last group: negative); values from the fourth on are deltas to the value two back.
    """
    data = np.frombuffer(counts.encode("ascii") if isinstance(counts, str) else bytes(counts), np.uint8)
    if data.size == 0:
        return np.zeros(0, np.int64)
    chars = data.astype(np.int64) - 48
    last = np.flatnonzero((chars & 0x20) == 0)  # the last char of each value
    first = np.concatenate([[0], last[:-1] + 1])
    position = np.arange(data.size) - np.repeat(first, last - first + 1)  # group index within its value
    values = np.add.reduceat((chars & 0x1F) << (5 * position), first)
    negative = (chars[last] & 0x10) != 0
    values[negative] -= np.left_shift(1, 5 * (last - first + 1)[negative])
    out = values.copy()
    out[1::2] = np.cumsum(values[1::2])
    out[2::2] = np.cumsum(values[2::2])
    return out


def coco_to_kaggle_rle(coco: dict) -> str:
    """COCO RLE (compressed ``counts`` str/bytes, or uncompressed list) -> Kaggle RLE, on the runs."""
    counts = coco["counts"]
    counts = np.asarray(counts, np.int64) if isinstance(counts, (list, tuple, np.ndarray)) \
        else _coco_string_to_counts(counts)
    if counts.size < 2:
        return ""
    bounds = np.cumsum(counts)
    starts, ends = bounds[0:-1:2], bounds[1::2]
    keep = ends > starts  # COCO allows zero-length runs; Kaggle does not
    return _runs_to_string(starts[keep], (ends - starts)[keep]) if keep.any() else ""


def _runs_bbox(starts: np.ndarray, lengths: np.ndarray, height: int) -> list[float]:
    col0, row0 = np.divmod(starts, height)
    col1, row1 = np.divmod(starts + lengths - 1, height)
    wraps = col1 > col0  # a run over a column's bottom edge covers rows 0..H-1 in the box
    ymin = 0 if wraps.any() else int(row0.min())
    ymax = height - 1 if wraps.any() else int(row1.max())
    xmin, xmax = int(col0.min()), int(col1.max())
    return [float(xmin), float(ymin), float(xmax - xmin + 1), float(ymax - ymin + 1)]


def rle_bbox(rle: str, shape: tuple[int, int] = KAGGLE_SHAPE) -> list[float]:
    """``[x, y, w, h]`` (XYWH_ABS, pixels, as pycocotools' ``toBbox``) of a Kaggle RLE; zeros if empty."""
    starts, lengths = parse_rle(rle, shape)
    return _runs_bbox(starts, lengths, int(shape[0])) if starts.size else [0.0, 0.0, 0.0, 0.0]


def rle_area(rle: str, shape: tuple[int, int] = KAGGLE_SHAPE) -> int:
    """Number of mask pixels of a Kaggle RLE (validated against ``shape``)."""
    return int(parse_rle(rle, shape)[1].sum())


# ============================================================================ overlaps
def resolve_overlaps(masks: np.ndarray, scores: np.ndarray, score_threshold: float = 0.0,
                     min_area: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Make predicted masks disjoint, as Kaggle requires.

    ``masks`` ``(N, H, W)`` (bool or 0/1), ``scores`` ``(N,)``. Drops detections with
    ``score < score_threshold``, gives each pixel to the highest-scoring mask (ties: the earlier
    one in the input), then drops masks left with fewer than ``max(min_area, 1)`` pixels.
    Returns ``(masks (K, H, W) bool, scores (K,))`` sorted by score, descending; inputs untouched.
    """
    masks = np.asarray(masks)
    scores = np.asarray(scores)
    if masks.ndim != 3:
        raise ValueError(f"masks must be (N, H, W), got shape {masks.shape}")
    if scores.shape != (masks.shape[0],):
        raise ValueError(f"scores must be ({masks.shape[0]},) to match masks, got shape {scores.shape}")
    order = np.argsort(-scores, kind="stable")
    order = order[scores[order] >= score_threshold]
    taken = np.zeros(masks.shape[1:], np.bool_)
    kept_masks, kept = [], []
    for k in order:
        mask = masks[k].astype(np.bool_, copy=True)
        mask &= ~taken
        taken |= mask
        if np.count_nonzero(mask) >= max(int(min_area), 1):
            kept_masks.append(mask)
            kept.append(k)
    out_masks = np.stack(kept_masks) if kept_masks else np.zeros((0,) + masks.shape[1:], np.bool_)
    return out_masks, scores[np.asarray(kept, np.int64)]


# ============================================================================ CSV -> runs
CSV_COLUMNS = ("ImageId", "EncodedPixels")


def read_segmentation_csv(csv_path: str | os.PathLike):
    """A Kaggle ``ImageId,EncodedPixels`` CSV as a DataFrame of str (blank EncodedPixels -> ``""``).

    Raises ``FileNotFoundError`` or ``ValueError`` naming the file (wrong header, blank ImageId).
    """
    import pandas as pd

    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"{csv_path}: CSV not found")
    frame = pd.read_csv(csv_path, dtype=str, keep_default_na=False, na_filter=False)
    if tuple(frame.columns) != CSV_COLUMNS:
        raise ValueError(f"{csv_path}: columns are {list(frame.columns)}, expected {list(CSV_COLUMNS)} "
                         "(Kaggle's train_ship_segmentations_v2.csv format)")
    blank = np.flatnonzero(frame["ImageId"].str.strip().to_numpy() == "")
    if blank.size:
        raise ValueError(f"{csv_path}, line {blank[0] + 2}: blank ImageId")
    return frame


def _kernels():
    """:mod:`module_rle_kernels` (numba), imported on first use: 0.4-0.9 s once per process."""
    import module_rle_kernels

    return module_rle_kernels


class _ParsedRuns:
    """Every run of many Kaggle RLE strings (or of a whole CSV), parsed and validated in one compiled pass.

    ``starts`` (0-indexed, column-major) and ``lengths`` of all runs, row by row; ``n_runs[i]`` runs
    belong to row ``i``; ``offsets[i]`` is the index of its first run. This constructor takes a
    list of strings (blank, ``None`` and NaN are empty masks); :meth:`from_runs` takes runs that
    :func:`module_rle_kernels.scan_rows` read from a CSV. A row the compiled scanner rejects goes
    to :func:`parse_rle`, which raises the error naming it.
    """

    def __init__(self, rles: Sequence[str], shape: tuple[int, int], image_ids: Sequence[str] | None = None,
                 lines: Sequence[int] | None = None, csv_path=None):
        where = lambda k: dict(image_id=image_ids[k] if image_ids is not None else None,  # noqa: E731
                               line=lines[k] if lines is not None else None, csv_path=csv_path)
        texts = list(rles)
        for k, rle in enumerate(texts):
            if not isinstance(rle, str):
                if not _is_blank(rle):
                    parse_rle(rle, shape, **where(k))  # raises: not a str
                texts[k] = ""
        joined = "\n".join(texts) + "\n" if texts else ""
        if joined.count("\n") != len(texts):  # newlines inside a string: whitespace, as parse_rle reads them
            texts = [t.replace("\n", " ") for t in texts]
            joined = "\n".join(texts) + "\n"
        kernels = _kernels()
        n_pixels = int(shape[0]) * int(shape[1])
        status, row, *_, n_runs, starts, lengths = kernels.scan(
            np.frombuffer(joined.encode("utf-8"), np.uint8), False, n_pixels)
        if status != kernels.OK:
            parse_rle(texts[row], shape, **where(row))
            raise RLEError("invalid EncodedPixels (rejected by the compiled scanner)", **where(row))
        self._set(shape, n_runs, starts, lengths)

    @classmethod
    def from_runs(cls, shape: tuple[int, int], n_runs: np.ndarray, starts: np.ndarray,
                  lengths: np.ndarray) -> "_ParsedRuns":
        runs = cls.__new__(cls)
        runs._set(shape, n_runs, starts, lengths)
        return runs

    def _set(self, shape, n_runs, starts, lengths):
        self.shape = (int(shape[0]), int(shape[1]))
        self.n_runs, self.starts, self.lengths = n_runs, starts, lengths
        self.offsets = np.zeros(n_runs.size, np.int64)
        np.cumsum(n_runs[:-1], out=self.offsets[1:])
        self._summary = None

    def _summarise(self):
        """``(bbox, area, counts)`` of every row, from one compiled pass (computed once)."""
        if self._summary is None:
            self._summary = _kernels().summarise(self.starts, self.lengths, self.n_runs, *self.shape)
        return self._summary

    def bboxes(self) -> np.ndarray:
        """``(N, 4)`` float64 ``[x, y, w, h]`` of each string's mask (pycocotools' ``toBbox``); 0 if empty."""
        return self._summarise()[0]

    def areas(self) -> np.ndarray:
        """``(N,)`` int64 pixel count of each string's mask."""
        return self._summarise()[1]

    def coco_counts(self, rows: np.ndarray | None = None) -> list[str]:
        """COCO compressed counts strings of ``rows`` (all rows by default), byte for byte what
        pycocotools' encoder writes (an empty mask is the single count H*W)."""
        counts = self._summarise()[2]  # blank for an empty mask
        empty = str(memoryview(_kernels().empty_mask_counts(*self.shape)), "ascii")
        return [c or empty for c in (counts if rows is None else (counts[k] for k in rows.tolist()))]

    def coco(self, empty: bool = False) -> list[dict | None]:
        """COCO compressed RLE ``{"size": [H, W], "counts": str}`` of each row; ``None`` for an empty
        mask unless ``empty``."""
        height, width = self.shape
        counts = self.coco_counts()
        if empty:
            return [{"size": [height, width], "counts": c} for c in counts]
        return [None if m == 0 else {"size": [height, width], "counts": c}
                for c, m in zip(counts, self.n_runs.tolist())]


# ============================================================================ image checks
CHECK_MODES = ("off", "error", "skip")


class ImageCheckError(ValueError):
    """A missing, corrupt or wrong-size image (``check_images="error"``); the message names the file."""


def check_image(path: str | os.PathLike, image_size: int | None = KAGGLE_SHAPE[0]) -> str | None:
    """What is wrong with one image file, or None: it exists, decodes, and is ``image_size`` square.

    JPEGs are decoded fully only when the end-of-image marker is missing (a truncated download,
    like Kaggle's ``6384c3e78.jpg``), so checking 200k tiles takes minutes, not hours.
    """
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        return "missing file"
    try:
        with Image.open(path) as image:
            size = image.size
            if image_size and size != (image_size, image_size):
                return f"size {size[0]}x{size[1]}, expected {image_size}x{image_size}"
            suspect = image.format != "JPEG"
            if not suspect:
                with open(path, "rb") as handle:
                    handle.seek(-2, os.SEEK_END)
                    suspect = handle.read(2) != b"\xff\xd9"
            if suspect:
                image.load()  # raises on truncated or corrupt data
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for bad files
        return f"cannot decode ({type(exc).__name__}: {exc})"
    return None


def check_images(paths: Sequence[str | os.PathLike], image_size: int | None = KAGGLE_SHAPE[0],
                 num_workers: int | None = None) -> dict[str, str]:
    """:func:`check_image` over many files (threads, tqdm bar): ``{path: problem}`` of the bad ones."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    paths = [str(p) for p in paths]
    workers = num_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        problems = list(tqdm(pool.map(lambda p: check_image(p, image_size), paths, chunksize=64),
                             total=len(paths), desc="checking images", unit="img", disable=None))
    return {p: problem for p, problem in zip(paths, problems) if problem}


# ============================================================================ dataset dicts
OVERLAP_MODES = ("warn", "error", "background")


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


def _find_overlaps(runs: _ParsedRuns, group_start: np.ndarray, group_size: np.ndarray,
                   rows_sorted: np.ndarray) -> list[tuple[int, int, int]]:
    """Pairs of rows (CSV order indices) of one image whose masks share pixels: (row_a, row_b, pixels).

    Masks whose boxes intersect are compared on their runs, in compiled code
    (:func:`module_rle_kernels.overlapping_pairs`); no mask is built.
    """
    pairs = _kernels().overlapping_pairs(rows_sorted, group_start, group_size, runs.n_runs, runs.offsets,
                                         runs.starts, runs.lengths, runs.bboxes())
    return sorted((min(a, b), max(a, b), pixels) for a, b, pixels in pairs.tolist())


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
        kernels = _kernels()
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
        self.runs = _ParsedRuns.from_runs(shape, n_runs, starts, lengths)
        return True

    @staticmethod
    def _decode_ids(body: np.ndarray, id_start: np.ndarray, id_end: np.ndarray):
        """``(keys, ids_of)``: the ImageIds at those byte offsets as a numpy array to sort on, and a
        function giving the ``str`` ImageIds of an index array of rows. Short ASCII names (Kaggle's) are
        sorted as one NUL-padded bytes block; the strings are made by one decode and one split."""
        kernels = _kernels()

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
        frame = read_segmentation_csv(self.csv_path)
        image_ids = frame["ImageId"].tolist()
        self._rles = frame["EncodedPixels"].tolist()
        keys = self._keys = np.asarray(image_ids, dtype=str)
        self._ids_of = lambda rows: keys[rows].tolist()
        lines = range(2, len(image_ids) + 2)  # the header is line 1
        self.runs = _ParsedRuns(self._rles, shape, image_ids, lines, self.csv_path)

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

        pairs = _find_overlaps(self.runs, self.group_start, self.group_size, self.order)
        return pd.DataFrame([(self.image_id(a), a + 2, b + 2, p) for a, b, p in pairs],
                            columns=["ImageId", "line_a", "line_b", "pixels"])


def find_ground_truth_overlaps(csv_path: str | os.PathLike, shape: tuple[int, int] = KAGGLE_SHAPE):
    """Masks of one image that share pixels: DataFrame ``ImageId, line_a, line_b, pixels``.

    Kaggle's v2 ground truth has none (overlaps were set to background), and a submission with
    any is rejected; a hand-made or merged CSV may have some. Computed on the runs, no mask built.
    """
    return _LoadedCSV(csv_path, shape).overlaps()


def _remove_overlaps(rles: list[str], shape) -> list[str]:
    """Set pixels shared by several masks to background (what Kaggle did for v2); drops emptied masks."""
    masks = np.stack([rle_decode(r, shape).astype(np.bool_) for r in rles])
    shared = masks.sum(axis=0) > 1
    return [r for r in (rle_encode(m & ~shared) for m in masks) if r]


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
    first missing / undecodable / wrong-size file), ``"skip"`` (drop such images, log them).
    overlaps: ground-truth masks of one image sharing pixels are ``"warn"``-ed about, an
    ``"error"``, or set to ``"background"`` in both masks (as Kaggle did for v2).
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
            skipped = globals()["check_images"]([d["file_name"] for d in dicts], image_size)
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
    """:func:`load_dataset_dicts` before the image checks: ``(dicts, overlap table)``."""
    from detectron2.structures import BoxMode

    loaded = _LoadedCSV(csv_path, shape)
    runs = loaded.runs
    overlap_table = loaded.overlaps()
    replaced: dict[int, list[dict]] = {}  # group index -> annotations rebuilt without the overlaps
    if len(overlap_table):
        first = overlap_table.iloc[0]
        message = (f"{csv_path}: {len(overlap_table)} pairs of ground-truth masks overlap in "
                   f"{overlap_table.ImageId.nunique()} images (first: {first.ImageId}, lines {first.line_a} and "
                   f"{first.line_b}, {first.pixels} px)")
        if overlaps == "error":
            raise ValueError(message + "; Kaggle's v2 truth has none (overlaps=background removes them)")
        logger.warning("%s; %s", message, "setting them to background" if overlaps == "background"
                       else "kept as they are (overlaps='background' removes them, as Kaggle did for v2)")
        if overlaps == "background":
            group_of_id = {image_id: g for g, image_id in enumerate(loaded.group_ids)}
            for image_id in overlap_table.ImageId.unique():
                g = group_of_id[image_id]
                rows = loaded.order[loaded.group_start[g]:loaded.group_start[g] + loaded.group_size[g]]
                texts = [loaded.rle_text(r) for r in rows]
                fixed = _remove_overlaps([t for t in texts if not _is_blank(t)], shape)
                fixed_runs = _ParsedRuns(fixed, shape)
                replaced[g] = _annotations(fixed_runs, np.flatnonzero(fixed_runs.n_runs > 0), BoxMode.XYWH_ABS)

    # The mask rows in ImageId order (CSV order within an image); image g owns a contiguous slice.
    has_mask = runs.n_runs[loaded.order] > 0
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


def _annotations(runs: _ParsedRuns, rows: np.ndarray, mode) -> list[dict]:
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

    from module_config import atomic_path

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
SYNTH_MANIFEST = "synthetic.json"  # written beside generated data: its parameters


def _expected_layout(cfg) -> dict[str, Path]:
    from module_config import get_input_path

    return {"train CSV": get_input_path(cfg, cfg.DATA.TRAIN_CSV),
            "train images": get_input_path(cfg, cfg.DATA.TRAIN_IMAGES),
            "test images": get_input_path(cfg, cfg.DATA.TEST_IMAGES),
            "sample submission": get_input_path(cfg, cfg.DATA.SAMPLE_SUBMISSION)}


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


def prepare_input(cfg, test: bool = True) -> Path:
    """Check ``PATHS.INPUT_DIR`` holds Kaggle's layout (generating synthetic data first if the config
    says so); returns the folder. Raises ``FileNotFoundError`` naming what is missing and how to fix it.

    With ``SYNTH.ENABLED`` the dataset is generated when absent, and regenerated when the
    ``SYNTH`` settings changed since (only over data this function generated: it leaves a
    ``synthetic.json`` manifest; a folder without one is never overwritten). ``test=False``
    checks only what training needs (the train CSV and images).
    """
    import json

    from module_config import atomic_path

    input_dir = Path(cfg.PATHS.INPUT_DIR)
    layout = _expected_layout(cfg)
    if cfg.SYNTH.ENABLED:
        import module_synthetic

        wanted = {"n_train": int(cfg.SYNTH.N_TRAIN), "n_test": int(cfg.SYNTH.N_TEST), "seed": int(cfg.SYNTH.SEED),
                  "empty_fraction": float(cfg.SYNTH.EMPTY_FRACTION), "image_size": int(cfg.SYNTH.IMAGE_SIZE)}
        manifest = input_dir / SYNTH_MANIFEST
        have = json.loads(manifest.read_text()) if manifest.is_file() else None
        if not layout["train CSV"].is_file() or (have is not None and have != wanted):
            logger.info("generating a synthetic Kaggle-format dataset in %s (%s)", input_dir, wanted)
            module_synthetic.generate_dataset(input_dir, overwrite=have is not None, **wanted)
            with atomic_path(manifest) as tmp:
                tmp.write_text(json.dumps(wanted, indent=1))
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


def _split_fingerprint(cfg, csv_path: Path) -> dict:
    stat = csv_path.stat()
    return {"csv": str(csv_path.resolve()), "csv_bytes": stat.st_size, "csv_mtime_ns": stat.st_mtime_ns,
            "val_fraction": float(cfg.DATA.VAL_FRACTION), "seed": int(cfg.DATA.SPLIT_SEED),
            "max_images": int(cfg.DATA.MAX_IMAGES), "check_images": cfg.DATA.CHECK_IMAGES}


def get_split_path(cfg) -> Path:
    """``runs/<run>/split.csv``: each training image's fold and overlap group (reused while valid)."""
    return Path(cfg.PATHS.RUNS_DIR) / cfg.PATHS.RUN_NAME / "split.csv"


def subsample_dicts(dicts: Sequence[dict], max_images: int, seed: int) -> list[dict]:
    """At most ``max_images`` dicts (0: all), a seeded sample in the original order."""
    if not max_images or max_images >= len(dicts):
        return list(dicts)
    keep = np.sort(np.random.default_rng(seed).choice(len(dicts), max_images, replace=False))
    return [dicts[i] for i in keep.tolist()]


_DICTS_CACHE: dict[str, tuple[list[dict], list[dict]]] = {}  # fingerprint -> split, for one process


def get_train_val_dicts(cfg) -> tuple[list[dict], list[dict]]:
    """The run's ``(train_dicts, val_dicts)`` from the config's ``DATA`` keys.

    First :func:`prepare_input` (so synthetic configs generate their data). Reads ``DATA.TRAIN_CSV`` and ``DATA.TRAIN_IMAGES`` under ``PATHS.INPUT_DIR``, checks images
    per ``DATA.CHECK_IMAGES``, keeps at most ``DATA.MAX_IMAGES``, and splits with
    :func:`split_train_val` (``DATA.VAL_FRACTION``, ``DATA.SPLIT_SEED``). The split is written to
    ``runs/<run>/split.csv`` (atomically) and reused while the CSV and these keys are unchanged,
    so the classifier, the detector and the submission see the same folds, and images are
    hashed once. Within a process the result is cached.
    """
    import json

    import pandas as pd

    from module_config import atomic_path

    prepare_input(cfg, test=False)  # generates synthetic data if the config says so; clear errors on a wrong layout
    layout = _expected_layout(cfg)
    csv_path, image_dir = layout["train CSV"], layout["train images"]
    fingerprint = _split_fingerprint(cfg, csv_path)
    key = json.dumps([fingerprint, str(image_dir.resolve()), int(cfg.DATA.IMAGE_SIZE)], sort_keys=True)
    if key in _DICTS_CACHE:
        train, val = _DICTS_CACHE[key]
        return list(train), list(val)
    dicts = load_dataset_dicts(csv_path, image_dir, check_images=cfg.DATA.CHECK_IMAGES,
                               image_size=cfg.DATA.IMAGE_SIZE, overlaps="background")
    dicts = subsample_dicts(dicts, int(cfg.DATA.MAX_IMAGES), int(cfg.DATA.SPLIT_SEED))
    if not dicts:
        raise ValueError(f"{csv_path}: no usable training images (all missing or skipped?)")
    split_path = get_split_path(cfg)
    meta_path = split_path.with_suffix(".json")
    ids = [d["image_id"] for d in dicts]
    saved = None
    if split_path.is_file() and meta_path.is_file() and json.loads(meta_path.read_text()) == fingerprint:
        saved = pd.read_csv(split_path, dtype={"ImageId": str})
        if saved["ImageId"].tolist() != ids:
            saved = None
    if saved is None:
        saved = get_split_table(dicts, float(cfg.DATA.VAL_FRACTION), int(cfg.DATA.SPLIT_SEED))
        with atomic_path(split_path) as tmp:
            saved.to_csv(tmp, index=False)
        with atomic_path(meta_path) as tmp:
            tmp.write_text(json.dumps(fingerprint, indent=1))
        logger.info("split %d images into %d train / %d val (%d overlap groups); wrote %s", len(ids),
                    int((saved.fold == "train").sum()), int((saved.fold == "val").sum()), saved.group.nunique(),
                    split_path)
    is_val = (saved["fold"] == "val").to_numpy()
    train = [d for d, v in zip(dicts, is_val) if not v]
    val = [d for d, v in zip(dicts, is_val) if v]
    _DICTS_CACHE[key] = (train, val)
    return list(train), list(val)


TRAIN_DATASET, VAL_DATASET = "airbus_train", "airbus_val"


def register_airbus_datasets(cfg) -> tuple[str, str]:
    """Register ``airbus_train`` / ``airbus_val`` in detectron2's catalogs (idempotent: re-registers
    for the given config); returns the names. Nothing is read until a dataset is asked for."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    for index, name in enumerate((TRAIN_DATASET, VAL_DATASET)):
        if name in DatasetCatalog.list():
            DatasetCatalog.remove(name)
            MetadataCatalog.remove(name)
        DatasetCatalog.register(name, lambda index=index: get_train_val_dicts(cfg)[index])
        MetadataCatalog.get(name).set(thing_classes=["ship"], evaluator_type="coco")
    return TRAIN_DATASET, VAL_DATASET


# ============================================================================ command line
def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="Kaggle Airbus CSV + images -> dataset dicts, COCO JSON, split; "
                                                 "synthetic Kaggle-format data.")
    sub = parser.add_subparsers(dest="command", required=True)

    def add_data_args(p, out_required: bool):
        p.add_argument("--csv", required=True, help="Kaggle ImageId,EncodedPixels CSV")
        p.add_argument("--images", required=True, help="folder of the CSV's images")
        p.add_argument("--image-size", type=int, default=KAGGLE_SHAPE[0], help="side of the tiles (px)")
        p.add_argument("--check-images", choices=CHECK_MODES, default="off",
                       help="check that each file exists, decodes and has the size: stop, or skip and report")
        p.add_argument("--overlaps", choices=OVERLAP_MODES, default="warn",
                       help="ground-truth masks that share pixels: warn, error, or set them to background")
        p.add_argument("--out", required=out_required, help="output file")

    add_data_args(sub.add_parser("dicts", help="build and validate dataset dicts; print a summary"), False)
    add_data_args(sub.add_parser("coco", help="write a COCO instances JSON"), True)
    split = sub.add_parser("split", help="overlap-aware train/val split, written as a CSV")
    add_data_args(split, True)
    split.add_argument("--val-fraction", type=float, default=0.1)
    split.add_argument("--seed", type=int, default=42)
    synth = sub.add_parser("synth", help="generate a synthetic dataset in Kaggle's layout")
    synth.add_argument("--out", required=True, help="folder to write train_v2/, test_v2/ and the CSVs into")
    synth.add_argument("--n-train", type=int, default=400)
    synth.add_argument("--n-test", type=int, default=100)
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--empty-fraction", type=float, default=0.78)
    synth.add_argument("--image-size", type=int, default=KAGGLE_SHAPE[0])
    synth.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    return parser


def main(args: argparse.Namespace):
    from module_config import atomic_path

    if args.command == "synth":
        import module_synthetic

        paths = module_synthetic.generate_dataset(args.out, args.n_train, args.n_test, seed=args.seed,
                                                  empty_fraction=args.empty_fraction, image_size=args.image_size,
                                                  overwrite=args.overwrite)
        for name, path in paths.items():
            print(f"{name}: {path}")
        return paths
    report: dict = {}
    dicts = load_dataset_dicts(args.csv, args.images, check_images=args.check_images, image_size=args.image_size,
                               overlaps=args.overlaps, report=report)
    n_ships = np.array([len(d["annotations"]) for d in dicts])
    print(f"{len(dicts)} images, {int(n_ships.sum())} ships, {np.mean(n_ships == 0):.1%} ship-free, "
          f"{len(report['skipped'])} skipped, {len(report['overlaps'])} overlapping mask pairs")
    for path, problem in report["skipped"].items():
        print(f"skipped {path}: {problem}")
    if args.command == "coco":
        print(f"wrote {save_coco_json(dicts, args.out)}")
    elif args.command == "split":
        frame = get_split_table(dicts, args.val_fraction, args.seed)
        with atomic_path(args.out) as tmp:
            frame.to_csv(tmp, index=False)
        print(f"{int((frame.fold == 'train').sum())} train / {int((frame.fold == 'val').sum())} val images, "
              f"{frame.group.nunique()} overlap groups; wrote {args.out}")
    return dicts


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    main(get_args_parser().parse_args())
