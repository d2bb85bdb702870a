"""The Kaggle RLE codec, COCO RLE conversions, mask helpers and the tile shape: one home for each.

A leaf: it imports nothing of the project (its compiled loops, :mod:`module_rle_kernels`, on first use).

* **Kaggle RLE** (:func:`parse_rle`, :func:`rle_decode`, :func:`rle_encode`, :func:`rle_bbox`,
  :func:`rle_area`): space-separated ``start length`` pairs, 1-indexed, over the pixels numbered
  **column-major** (top to bottom, then left to right), sorted and non-overlapping.
* **Kaggle <-> COCO RLE** (:func:`kaggle_rle_to_coco`, :func:`kaggle_rles_to_coco`,
  :func:`coco_to_kaggle_rle`): COCO RLE is column-major too, so the two convert on the runs
  without building a mask.
* **masks <-> COCO RLE** (:func:`masks_to_coco`, :func:`coco_to_masks`): ``(N, H, W)`` bool masks
  in image pixel order (row, column) and pycocotools' ``{"size": [H, W], "counts": ...}``.
* **the overlap finder** (:func:`find_overlapping_masks`): masks of one image that share pixels,
  found on their runs (no mask built); the ground-truth check, the submission validator and the
  metric all ask it. (Overlap *removal* for predictions is ``module_inference.resolve_overlaps``.)
* **the tile shape** :data:`KAGGLE_SHAPE`.

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

KAGGLE_SIZE = 768  # side of every Kaggle tile (px)
KAGGLE_SHAPE = (KAGGLE_SIZE, KAGGLE_SIZE)  # (height, width) of every Kaggle tile


# ============================================================================ Kaggle RLE
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


def is_blank(rle) -> bool:
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
    if is_blank(rle):
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
    if is_blank(rle):
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
    return ParsedRuns(rles, shape, image_ids, lines).coco(empty=True)


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




def get_kernels():
    """:mod:`module_rle_kernels` (numba), imported on first use: 0.4-0.9 s once per process."""
    import module_rle_kernels

    return module_rle_kernels


class ParsedRuns:
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
                if not is_blank(rle):
                    parse_rle(rle, shape, **where(k))  # raises: not a str
                texts[k] = ""
        joined = "\n".join(texts) + "\n" if texts else ""
        if joined.count("\n") != len(texts):  # newlines inside a string: whitespace, as parse_rle reads them
            texts = [t.replace("\n", " ") for t in texts]
            joined = "\n".join(texts) + "\n"
        kernels = get_kernels()
        n_pixels = int(shape[0]) * int(shape[1])
        status, row, *_, n_runs, starts, lengths = kernels.scan(
            np.frombuffer(joined.encode("utf-8"), np.uint8), False, n_pixels)
        if status != kernels.OK:
            parse_rle(texts[row], shape, **where(row))
            raise RLEError("invalid EncodedPixels (rejected by the compiled scanner)", **where(row))
        self._set(shape, n_runs, starts, lengths)

    @classmethod
    def from_runs(cls, shape: tuple[int, int], n_runs: np.ndarray, starts: np.ndarray,
                  lengths: np.ndarray) -> "ParsedRuns":
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
            self._summary = get_kernels().summarise(self.starts, self.lengths, self.n_runs, *self.shape)
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
        empty = str(memoryview(get_kernels().empty_mask_counts(*self.shape)), "ascii")
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

    def overlapping_pairs(self, group_start: np.ndarray, group_size: np.ndarray,
                          rows_sorted: np.ndarray) -> list[tuple[int, int, int]]:
        """Pairs of rows ``(a, b, pixels)`` (``a < b``, sorted) whose masks share pixels, within each
        group of rows (``rows_sorted[group_start[g]:group_start[g] + group_size[g]]``: one image).

        Masks whose boxes intersect are compared on their runs, in compiled code
        (:func:`module_rle_kernels.overlapping_pairs`); no mask is built.
        """
        pairs = get_kernels().overlapping_pairs(rows_sorted, group_start, group_size, self.n_runs, self.offsets,
                                             self.starts, self.lengths, self.bboxes())
        return sorted((min(a, b), max(a, b), pixels) for a, b, pixels in pairs.tolist())



# ============================================================================ masks <-> COCO RLE
def masks_to_coco(masks) -> list[dict]:
    """``(N, H, W)`` masks (bool or 0/1; or a list of ``(H, W)``) -> N COCO RLE dicts (pycocotools' encoder).

    Row-major masks in image pixel order; the COCO counts are column-major, as pycocotools writes
    them (``counts`` as bytes). ``[]`` for N = 0.
    """
    from pycocotools import mask as mask_util

    if isinstance(masks, np.ndarray) and masks.ndim == 3:
        stack = masks
    else:
        masks = list(masks)
        if not masks:
            return []
        stack = np.stack([np.asarray(m) for m in masks])
    if stack.ndim != 3:
        raise ValueError(f"expected masks of shape (N, H, W) or a list of (H, W), got {stack.shape}")
    if stack.shape[0] == 0:
        return []
    # pycocotools wants (H, W, N) uint8 in Fortran order: column-major, as Kaggle's RLE.
    return mask_util.encode(np.asfortranarray((stack != 0).transpose(1, 2, 0).astype(np.uint8)))


def coco_to_masks(rles: Sequence[dict], shape: tuple[int, int]) -> np.ndarray:
    """COCO RLE dicts -> ``(N, H, W)`` bool masks, row-major (``shape`` = (H, W), used when N is 0)."""
    from pycocotools import mask as mask_util

    rles = [r for r in rles]
    if not rles:
        return np.zeros((0, int(shape[0]), int(shape[1])), dtype=bool)
    return mask_util.decode(rles).transpose(2, 0, 1).astype(bool)


def coco_area(rles: Sequence[dict]) -> np.ndarray:
    """``(N,)`` int64 pixel counts of COCO RLE dicts (str or bytes counts), without decoding."""
    from pycocotools import mask as mask_util

    rles = [r if isinstance(r["counts"], bytes) else {"size": r["size"], "counts": r["counts"].encode()}
            for r in rles]
    return np.asarray(mask_util.area(rles), np.int64).reshape(-1) if rles else np.zeros(0, np.int64)


# ============================================================================ overlap finder
def find_overlapping_masks(runs: Sequence[tuple[np.ndarray, np.ndarray]],
                           shape: tuple[int, int] = KAGGLE_SHAPE) -> list[tuple[int, int, int]]:
    """Pairs of masks of one image that share pixels: ``(a, b, pixels)`` with ``a < b``, sorted.

    ``runs``: each mask's ``(starts, lengths)`` as :func:`parse_rle` returns them (0-indexed,
    column-major). Masks whose boxes meet are compared on their runs in compiled code; no mask is
    built. The same kernel checks a whole ground-truth CSV (``module_preprocessing``).
    """
    if len(runs) < 2:
        return []
    n_runs = np.array([len(s) for s, _ in runs], np.int64)
    starts = np.concatenate([np.asarray(s, np.int64) for s, _ in runs])
    lengths = np.concatenate([np.asarray(n, np.int64) for _, n in runs])
    parsed = ParsedRuns.from_runs(shape, n_runs, starts, lengths)
    return parsed.overlapping_pairs(np.zeros(1, np.int64), np.array([len(runs)], np.int64),
                                    np.arange(len(runs), dtype=np.int64))
