"""Compiled inner loops of the Kaggle RLE codec (numba), for whole CSV files and long lists of strings.

Private to :mod:`module_preprocessing`, which imports this module on first use; the codec's
rules and errors are documented there (:func:`module_preprocessing.parse_rle`). The kernels,
each one pass over its input, releasing the GIL:

* :func:`scan_rows` reads the text of a Kaggle CSV body (``ImageId,EncodedPixels`` lines) or of
  RLE strings joined by newlines: every run of every row, validated by parse_rle's rules;
* :func:`summarise_rows` turns the runs into each row's bounding box, area and COCO
  compressed-RLE counts string, byte for byte what pycocotools writes;
* :func:`overlapping_pairs` finds masks of one image that share pixels, on their runs;
* :func:`gather_ids` copies short ImageIds into one block to sort on, and :func:`join_ids` into
  one text that a single decode and split turn into Python strings.

:func:`scan` and :func:`summarise` drive the first two over pieces of a large input in threads,
one per core. A row the scanner rejects is only *located* here (its index);
``module_preprocessing`` then runs the strict per-string parser on that row, which names the
problem, the ImageId and the line. The kernels are compiled once per machine (``cache=True``:
a few seconds, kept in ``__pycache__`` or ``$NUMBA_CACHE_DIR``; where no folder is writable they
compile in each process, with a warning); importing numba and loading them costs 0.4-0.9 s once
per process.
"""
from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor

import numba
import numpy as np

# scan_rows status codes
OK = 0
UNUSUAL = 1  # CSV structure this scanner leaves to pandas: quotes, blank lines, a missing comma, a blank ImageId
BAD_ROW = 2  # a row whose EncodedPixels are not valid runs (the strict parser says why)

UNCACHED: list[str] = []  # kernels compiled in each process: numba found no cache folder to write


def _jit(func):
    """``numba.njit``, cached on disk; compiled anew in each process where no cache folder is writable
    (no writable ``__pycache__``, ``$NUMBA_CACHE_DIR`` or user cache folder: numba refuses to cache)."""
    try:
        return numba.njit(cache=True, nogil=True, boundscheck=False)(func)
    except RuntimeError as exc:  # "cannot cache function ...: no locator available"
        if not UNCACHED:
            warnings.warn(f"{exc}; the RLE kernels will compile in each process (a few seconds). Set "
                          "NUMBA_CACHE_DIR to a writable folder to keep them.", RuntimeWarning, stacklevel=2)
        UNCACHED.append(func.__name__)
        return numba.njit(nogil=True, boundscheck=False)(func)


@_jit
def _is_space(c) -> bool:
    return c == 32 or (9 <= c <= 13)  # what C's isspace and np.fromstring skip: space \t \n \v \f \r


@_jit
def count_rows(buf):
    """``(rows, separators)``: an upper bound on the rows of ``buf`` and its whitespace bytes other than newlines."""
    rows = 1
    spaces = 0
    for i in range(buf.size):
        c = buf[i]
        if c == 10:
            rows += 1
        elif _is_space(c):
            spaces += 1
    return rows, spaces


def run_capacity(rows: int, spaces: int) -> int:
    """Room for every run of a text with ``rows`` rows and ``spaces`` separators (one token more than separators per row)."""
    return (spaces + rows) // 2 + 1


@_jit
def scan_rows(buf, with_ids, n_pixels, max_rows, starts, lengths):
    """Runs of every row of ``buf`` (uint8 text, one row per ``\\n``-terminated line, at most ``max_rows``).

    ``with_ids``: each line is ``ImageId,EncodedPixels`` (a Kaggle CSV body); otherwise each line is
    EncodedPixels only. Tokens are decimal integers separated by whitespace, alternating 1-indexed
    start and length; a run must have length >= 1, start after the previous run's end and end
    within ``n_pixels``. The runs (0-indexed starts) are written to ``starts`` and ``lengths``
    (room: :func:`run_capacity` of :func:`count_rows`).

    Returns ``(status, row, id_start, id_end, field_start, field_end, n_runs, total_runs)``: byte
    offsets of each row's ImageId (empty without ids) and EncodedPixels field, and its number of
    runs. On ``UNUSUAL`` or ``BAD_ROW``, ``row`` is the index of the offending row (its offsets are
    filled in as far as the scan got) and the arrays are partial.
    """
    n = buf.size
    id_start = np.zeros(max_rows, np.int64)
    id_end = np.zeros(max_rows, np.int64)
    field_start = np.zeros(max_rows, np.int64)
    field_end = np.zeros(max_rows, np.int64)
    n_runs = np.zeros(max_rows, np.int64)
    row = 0
    r = 0
    i = 0
    status = OK
    while i < n:
        if with_ids:
            s = i
            printable = False
            while i < n and buf[i] != 44 and buf[i] != 10 and buf[i] != 34 and buf[i] != 0:
                if not _is_space(buf[i]):
                    printable = True
                i += 1
            id_start[row] = s
            id_end[row] = i
            if i >= n or buf[i] != 44 or not printable:  # no comma, a quote or NUL, or a blank ImageId
                status = UNUSUAL
                break
            i += 1
        field_start[row] = i
        first = r
        have_start = False
        pending = 0
        previous_end = 0
        while i < n and buf[i] != 10:
            c = buf[i]
            if _is_space(c):
                i += 1
                continue
            if c == 44 or c == 34:  # a third field or a quote: pandas' business
                status = UNUSUAL if with_ids else BAD_ROW
                break
            if c < 48 or c > 57:
                status = BAD_ROW
                break
            value = 0
            while i < n and 48 <= buf[i] <= 57:
                if value < 1 << 50:  # larger is past any image anyway; stop before int64 overflows
                    value = value * 10 + (buf[i] - 48)
                i += 1
            if i < n and not _is_space(buf[i]):  # "12x", "1.5"
                status = BAD_ROW
                break
            if have_start:
                start = pending - 1
                if value < 1 or start < previous_end or start + value > n_pixels:
                    status = BAD_ROW
                    break
                starts[r] = start
                lengths[r] = value
                r += 1
                previous_end = start + value
                have_start = False
            else:
                pending = value
                have_start = True
        if status == OK and have_start:  # an odd number of tokens
            status = BAD_ROW
        if status != OK:
            while i < n and buf[i] != 10:
                i += 1
            field_end[row] = i
            break
        field_end[row] = i
        n_runs[row] = r - first
        row += 1
        i += 1
    rows = row + 1 if status != OK else row
    return status, row, id_start[:rows], id_end[:rows], field_start[:rows], field_end[:rows], n_runs[:rows], r


@_jit
def _put_count(chars, p, x):
    """pycocotools' ``rleToString`` for one (delta) count: 5-bit groups, low first, as chars 48 + group."""
    more = True
    while more:
        c = x & 0x1F
        x >>= 5
        more = (x != -1) if (c & 0x10) else (x != 0)
        if more:
            c |= 0x20
        chars[p] = c + 48
        p += 1
    return p


@_jit
def empty_mask_counts(height, width):
    """The COCO compressed counts of an all-background ``height`` x ``width`` mask (uint8 text)."""
    chars = np.empty(16, np.uint8)
    return chars[:_put_count(chars, 0, height * width)]


@_jit
def summarise_rows(starts, lengths, n_runs, height, width):
    """Per row: ``bbox`` (N, 4) float64 ``[x, y, w, h]`` (pycocotools' ``toBbox``; zeros if empty),
    ``area`` (N,) int64, and ``chars`` (uint8): the COCO compressed counts of each row's mask,
    each followed by a newline (never a counts character), so that one ``split`` makes the strings.

    The uncompressed COCO counts of a row are ``gap, length, gap, length, ..., tail`` (column-major,
    like Kaggle's runs); the tail (background after the last run) is left out when it is 0, as
    pycocotools' own encoder does. An empty row gets an empty string (its mask's counts, the single
    count ``H*W``, are :func:`empty_mask_counts`): most Kaggle rows are empty, and the dataset dicts
    need no string for them.
    """
    n = n_runs.size
    n_pixels = height * width
    bits = 1
    while (1 << bits) <= n_pixels:
        bits += 1
    per_count = (bits + 1 + 4) // 5  # a signed delta of up to `bits` bits, 5 bits per char
    bbox = np.zeros((n, 4))
    area = np.zeros(n, np.int64)
    chars = np.empty(per_count * (2 * starts.size + n) + n, np.uint8)
    p = 0
    r = 0
    for k in range(n):
        m = n_runs[k]
        if m == 0:
            chars[p] = 10
            p += 1
            continue
        xmin = n_pixels
        xmax = -1
        ymin = n_pixels
        ymax = -1
        a = 0
        previous_end = 0
        back1 = 0  # the count before the current one
        back2 = 0  # the one before that (pycocotools writes counts from the fourth on as deltas to it)
        index = 0
        for j in range(r, r + m):
            start = np.int64(starts[j])
            length = np.int64(lengths[j])
            a += length
            col0 = start // height
            row0 = start - col0 * height
            last = start + length - 1
            col1 = last // height
            row1 = last - col1 * height
            if col1 > col0:  # the run wraps past a column's bottom: the box spans every row
                row0 = 0
                row1 = height - 1
            xmin = min(xmin, col0)
            xmax = max(xmax, col1)
            ymin = min(ymin, row0)
            ymax = max(ymax, row1)
            for count in (start - previous_end, length):
                p = _put_count(chars, p, count - back2 if index > 2 else count)
                back2 = back1
                back1 = count
                index += 1
            previous_end = start + length
        tail = n_pixels - previous_end
        if tail > 0:
            p = _put_count(chars, p, tail - back2 if index > 2 else tail)
        r += m
        bbox[k, 0] = xmin
        bbox[k, 1] = ymin
        bbox[k, 2] = xmax - xmin + 1
        bbox[k, 3] = ymax - ymin + 1
        area[k] = a
        chars[p] = 10
        p += 1
    return bbox, area, chars[:p]


@_jit
def _shared_pixels(starts, lengths, a0, a1, b0, b1):
    """Pixels shared by runs ``a0:a1`` and ``b0:b1`` (each sorted and disjoint): one merge pass."""
    total = 0
    i = a0
    j = b0
    while i < a1 and j < b1:
        end_a = np.int64(starts[i]) + lengths[i]
        end_b = np.int64(starts[j]) + lengths[j]
        low = max(np.int64(starts[i]), np.int64(starts[j]))
        high = min(end_a, end_b)
        if high > low:
            total += high - low
        if end_a < end_b:
            i += 1
        else:
            j += 1
    return total


@_jit
def overlapping_pairs(order, group_start, group_size, n_runs, offsets, starts, lengths, bbox):
    """Pairs of masks of one image that share pixels, as an ``(M, 3)`` int64 array ``row_a, row_b, pixels``.

    ``order`` lists the rows grouped by image (group ``g`` is ``order[group_start[g]:][:group_size[g]]``);
    only pairs whose boxes intersect are compared, on their runs.
    """
    found = []
    for g in range(group_start.size):
        first = group_start[g]
        for u in range(first, first + group_size[g]):
            a = order[u]
            if n_runs[a] == 0:
                continue
            for v in range(u + 1, first + group_size[g]):
                b = order[v]
                if n_runs[b] == 0:
                    continue
                if not (bbox[a, 0] < bbox[b, 0] + bbox[b, 2] and bbox[b, 0] < bbox[a, 0] + bbox[a, 2]
                        and bbox[a, 1] < bbox[b, 1] + bbox[b, 3] and bbox[b, 1] < bbox[a, 1] + bbox[a, 3]):
                    continue
                pixels = _shared_pixels(starts, lengths, offsets[a], offsets[a] + n_runs[a],
                                        offsets[b], offsets[b] + n_runs[b])
                if pixels:
                    found.append((a, b, pixels))
    out = np.empty((len(found), 3), np.int64)
    for k in range(len(found)):
        out[k, 0], out[k, 1], out[k, 2] = found[k]
    return out


@_jit
def gather_ids(buf, id_start, id_end, width):
    """The ImageIds at those offsets as an ``(N, width)`` uint8 block, NUL-padded (a sort key:
    UTF-8 bytes sort as their code points do), and whether all are ASCII."""
    block = np.zeros((id_start.size, width), np.uint8)
    high = 0
    for k in range(id_start.size):
        for j in range(id_end[k] - id_start[k]):
            c = buf[id_start[k] + j]
            high |= c
            block[k, j] = c
    return block, high < 128


@_jit
def join_ids(buf, id_start, id_end, rows):
    """The ImageIds of ``rows``, each followed by a newline, as one uint8 text (decoded and split at once)."""
    size = 0
    for k in rows:
        size += id_end[k] - id_start[k] + 1
    out = np.empty(size, np.uint8)
    p = 0
    for k in rows:
        for i in range(id_start[k], id_end[k]):
            out[p] = buf[i]
            p += 1
        out[p] = 10
        p += 1
    return out


@_jit
def empty_int32(n):
    return np.empty(n, np.int32)


@_jit
def empty_int64(n):
    return np.empty(n, np.int64)


@_jit
def move_down(a, to, start, n):
    """``a[to:to + n] = a[start:start + n]`` in place, for ``to <= start`` (no temporary copy)."""
    for i in range(n):
        a[to + i] = a[start + i]


@_jit
def next_line(buf, at):
    """The offset just past the first newline at or after ``at`` (``buf.size`` when there is none)."""
    while at < buf.size and buf[at] != 10:
        at += 1
    return min(at + 1, buf.size)


# ---------------------------------------------------------------------------- drivers (plain Python)
# The kernels release the GIL, so a large input is cut into pieces at line ends (rows) and the
# pieces run in threads, one per core, up to 8; below these sizes one thread is quicker.
PARALLEL_MIN_BYTES = 4 << 20
PARALLEL_MIN_RUNS = 1 << 19


def _n_workers(size: int, min_size: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, 8, size // min_size))


def _in_threads(work, n: int) -> list:
    if n == 1:
        return [work(0)]
    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(work, range(n)))


def scan(buf: np.ndarray, with_ids: bool, n_pixels: int, workers: int | None = None) -> tuple:
    """:func:`scan_rows` over all of ``buf``, in pieces of whole lines scanned in parallel.

    Returns ``(status, row, id_start, id_end, field_start, field_end, n_runs, starts, lengths)``,
    offsets into ``buf`` and ``row`` counted from its start. On an error, the per-row arrays reach
    the offending row (the first one in the text), and the runs are partial.
    """
    parts = workers or _n_workers(buf.size, PARALLEL_MIN_BYTES)
    cuts = [0]
    for k in range(1, parts):
        cut = next_line(buf, max(cuts[-1], buf.size * k // parts))
        if cut < buf.size:
            cuts.append(cut)
    cuts.append(buf.size)
    pieces = [buf[a:b] for a, b in zip(cuts[:-1], cuts[1:])]
    counts = [count_rows(piece) for piece in pieces]
    capacity = [run_capacity(rows, spaces) for rows, spaces in counts]
    base = np.concatenate([[0], np.cumsum(capacity)]).tolist()
    # int32 halves the memory traffic for any real tile. The arrays come from numba's allocator
    # (malloc): numpy asks for transparent huge pages on large arrays, and faulting those in
    # stalled on memory compaction here (the scan took 0.07 to 0.2 s instead of 0.07).
    empty = empty_int32 if n_pixels < 2 ** 31 else empty_int64
    starts, lengths = empty(base[-1]), empty(base[-1])
    results = _in_threads(lambda k: scan_rows(pieces[k], with_ids, n_pixels, counts[k][0], starts[base[k]:base[k + 1]],
                                              lengths[base[k]:base[k + 1]]), len(pieces))
    rows = [[], [], [], [], []]  # id_start, id_end, field_start, field_end, n_runs of each piece
    status, row, total, before = OK, 0, 0, 0
    for k, (status, row, *per_row, n_found) in enumerate(results):
        for out, values, shift in zip(rows, per_row, (cuts[k], cuts[k], cuts[k], cuts[k], 0)):
            out.append(values + shift if shift else values)
        if base[k] != total:  # close the gap left by the pieces before
            move_down(starts, total, base[k], n_found)
            move_down(lengths, total, base[k], n_found)
        total += n_found
        if status != OK:
            row += before
            break
        before += per_row[4].size
        row = before
    merged = [np.concatenate(out) if len(out) > 1 else out[0] for out in rows]
    return (status, row, *merged, starts[:total], lengths[:total])


def summarise(starts: np.ndarray, lengths: np.ndarray, n_runs: np.ndarray, height: int, width: int,
              workers: int | None = None) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """:func:`summarise_rows` of all rows, in pieces of rows with about equal runs, in parallel:
    ``(bbox, area, counts)``, ``counts`` the list of each row's COCO counts string."""
    parts = workers or _n_workers(starts.size, PARALLEL_MIN_RUNS)
    run_end = np.cumsum(n_runs)
    inner = np.searchsorted(run_end, starts.size * np.arange(1, parts) // parts).tolist()
    cuts = [0, *sorted({c for c in inner if 0 < c < n_runs.size}), n_runs.size]
    run_cuts = [int(run_end[c - 1]) if c else 0 for c in cuts]
    results = _in_threads(lambda k: summarise_rows(starts[run_cuts[k]:run_cuts[k + 1]],
                                                   lengths[run_cuts[k]:run_cuts[k + 1]],
                                                   n_runs[cuts[k]:cuts[k + 1]], height, width), len(cuts) - 1)
    counts = []
    for _, _, chars in results:  # decoded straight from the kernel's buffer, split in one call
        counts += str(memoryview(chars), "ascii").split("\n")[:-1]
    if len(results) == 1:
        return results[0][0], results[0][1], counts
    return np.concatenate([r[0] for r in results]), np.concatenate([r[1] for r in results]), counts
