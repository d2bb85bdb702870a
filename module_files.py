"""Files in and out, each with one policy: atomic writes, the image reader and check, the CSV readers.

A leaf: it imports nothing of the project.

* :func:`atomic_path`: every output is written to a temporary file beside it and renamed onto it.
* :func:`read_image` and :func:`check_image`: **one image policy** for every command (dataset
  dicts, classifier training and prediction, the detector's mapper, the submission): the file
  exists, decodes **completely** (JPEGs through libjpeg-turbo in strict mode, so a truncated file
  is an error even when its end marker was put back, where PIL would return grey), is RGB, and
  (when asked) has the expected square size. The error names the file and says what was expected.
* :func:`read_segmentation_csv`: **the reader of** ``ImageId,EncodedPixels`` **CSVs** (Kaggle's
  ground truth, submissions, shards): exactly those two columns, blanks as ``""``, each row's line
  number kept for error messages; an empty or header-only file is an error naming it.
* :func:`read_image_ids`, :func:`list_images`: the ImageIds of a CSV, the images of a folder.

Importing this module does nothing but define functions.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")  # what list_images takes for an image
CSV_COLUMNS = ("ImageId", "EncodedPixels")  # Kaggle's segmentation and submission CSVs
_JPEG_MAGIC = b"\xff\xd8"


# ============================================================================ atomic writes
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    A crash mid-write leaves the previous file intact. The suffix is kept so that writers that
    infer the format from it (pandas, matplotlib, torch) behave the same.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():  # mkstemp makes 0600 files: give the result the usual umask permissions
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` through :func:`atomic_path`; returns the path."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


# ============================================================================ images
class ImageError(ValueError):
    """An image file that breaks the image policy (corrupt, truncated, wrong size or mode); the
    message names the file."""


def _decode_jpeg(data: bytes, reduce_to: int | None, convert: bool = False) -> np.ndarray:
    """(H, W, 3) uint8 RGB of JPEG bytes, decoded strictly (libjpeg-turbo's warnings are errors);
    a grey JPEG only with ``convert`` (libjpeg-turbo expands it to RGB)."""
    import simplejpeg

    height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    if colorspace not in ("YCbCr", "RGB") and not (convert and colorspace == "Gray"):
        raise ImageError(f"JPEG colour space {colorspace}, expected RGB (YCbCr)")
    kwargs = {}
    if reduce_to:  # DCT scaling (by M/8, the smallest keeping both sides >= reduce_to: reduced_size)
        kwargs = {"min_height": min(int(reduce_to), height), "min_width": min(int(reduce_to), width)}
    return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, **kwargs)


def reduced_size(height: int, width: int, reduce_to: int | None) -> tuple[int, int]:
    """``(height, width)`` of a ``height`` x ``width`` JPEG decoded by :func:`read_image` with
    ``reduce_to``: libjpeg-turbo's DCT scaling by the smallest M/8 (M = 1..8, sides rounded up)
    keeping both sides >= ``reduce_to`` (or the side itself, when smaller). A 768 px tile decodes at
    288 px (3/8) for 256, at 192 (1/4) for 128; a 256 px tile at 128 (1/2) for 128."""
    if not reduce_to:
        return height, width
    need_h, need_w = min(int(reduce_to), height), min(int(reduce_to), width)
    for m in range(1, 9):
        h, w = -(-height * m // 8), -(-width * m // 8)
        if h >= need_h and w >= need_w:
            return h, w
    return height, width


def reduce_image(image: np.ndarray, reduce_to: int | None) -> np.ndarray:
    """The pixels :func:`read_image` with ``reduce_to`` gives for a JPEG, for an image already in
    memory (a scene's slice): area-averaged (``cv2.INTER_AREA``) to :func:`reduced_size`, which
    approximates the decoder's DCT scaling (mean |difference| 0.1-1.9 grey levels on Kaggle and
    generated tiles, against 0.4-3.1 for PIL's bilinear resize, which is what a model trained on
    reduced decodes would otherwise see). ``image`` itself when no reduction applies."""
    height, width = image.shape[:2]
    size = reduced_size(height, width, reduce_to)
    if size == (height, width):
        return image
    import cv2

    return cv2.resize(image, (size[1], size[0]), interpolation=cv2.INTER_AREA)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """``(height, width)`` of an image file from its header (nothing decoded)."""
    from PIL import Image

    with Image.open(path) as image:
        return image.height, image.width


def read_image(path: str | os.PathLike, image_size: int | None = None, *, reduce_to: int | None = None,
               convert: bool = False) -> np.ndarray:
    """Decode an image file **completely** -> ``(H, W, 3)`` uint8 RGB (row-major); the one image policy.

    Raises ``FileNotFoundError`` for a missing file and :class:`ImageError` (a ``ValueError``)
    naming the file for anything else: undecodable or truncated data (JPEGs are decoded by
    libjpeg-turbo in strict mode, so half a JPEG with its end marker restored is caught), a mode
    other than RGB (unless ``convert``: grey, palette, RGBA... become RGB), or, with ``image_size``,
    a size other than ``image_size`` x ``image_size``. ``reduce_to``: a JPEG may be decoded at a
    reduced scale (M/8) while both sides stay >= ``reduce_to`` (:func:`reduced_size`: a 768 px tile
    decodes at 288 px for a 256 px model, ~3x faster; :func:`reduce_image` does the same to pixels
    in memory); the size check is on the file's full size.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except IsADirectoryError:
        raise ImageError(f"{path}: is a folder, expected an image file") from None
    try:
        if data[:2] == _JPEG_MAGIC:
            import simplejpeg

            height, width = simplejpeg.decode_jpeg_header(data)[:2]
            _check_size(path, height, width, image_size)
            array = _decode_jpeg(data, reduce_to, convert)
        else:
            array = _decode_other(path, data, image_size, convert)
    except ImageError as exc:
        raise ImageError(str(exc) if str(exc).startswith(str(path)) else f"{path}: {exc}") from None
    except Exception as exc:  # decoders raise ValueError, OSError, SyntaxError... for bad files
        raise ImageError(f"{path}: cannot decode image ({type(exc).__name__}: {exc})") from None
    return array


def _check_size(path: Path, height: int, width: int, image_size: int | None) -> None:
    if image_size and (height, width) != (int(image_size), int(image_size)):
        raise ImageError(f"{path}: size {width}x{height}, expected {image_size}x{image_size}")


def _decode_other(path: Path, data: bytes, image_size: int | None, convert: bool) -> np.ndarray:
    import io

    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        _check_size(path, image.height, image.width, image_size)
        image.load()  # a truncated PNG fails here, not at open()
        if image.mode != "RGB":
            if not convert:
                raise ImageError(f"{path}: mode {image.mode}, expected RGB (3 channels, 8 bits)")
            image = image.convert("RGB")
        return np.asarray(image)


def check_image(path: str | os.PathLike, image_size: int | None = None) -> str | None:
    """What is wrong with one image file under :func:`read_image`'s policy, or None.

    The whole file is decoded (about 2 ms for a 768 px tile), so truncation is always caught.
    """
    try:
        read_image(path, image_size)
    except FileNotFoundError:
        return "missing file"
    except ImageError as exc:
        return str(exc).removeprefix(f"{path}: ")
    return None


def check_images(paths: Sequence[str | os.PathLike], image_size: int | None = None,
                 num_workers: int | None = None, progress: bool = True) -> dict[str, str]:
    """:func:`check_image` over many files (threads: the decoder releases the GIL; tqdm bar):
    ``{path: problem}`` of the bad ones, in input order."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    paths = [str(p) for p in paths]
    workers = num_workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(workers) as pool:
        problems = list(tqdm(pool.map(lambda p: check_image(p, image_size), paths, chunksize=64),
                             total=len(paths), desc="checking images", unit="img",
                             disable=None if progress else True))
    return {p: problem for p, problem in zip(paths, problems) if problem}


def list_images(folder: str | os.PathLike) -> list[Path]:
    """The image files (``.jpg``, ``.jpeg``, ``.png``, any case) directly in ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise ValueError(f"image folder {folder} holds no {'/'.join(IMAGE_SUFFIXES)} files")
    return images


# ============================================================================ CSVs
def _csv_text_problem(path: Path) -> str | None:
    """Why a CSV file cannot hold any row (missing, 0 bytes, only a header), or None."""
    if not path.is_file():
        return "file not found"
    with open(path, "rb") as handle:
        head = handle.read(1 << 16)
    if not head.strip():
        return "the file is empty (0 bytes or only blanks)"
    return None


def read_segmentation_csv(path: str | os.PathLike, what: str = "CSV", allow_no_rows: bool = False):
    """An ``ImageId,EncodedPixels`` CSV (Kaggle's ground truth, a submission, a shard) as a DataFrame.

    Columns: ``ImageId``, ``EncodedPixels`` (str; a blank field is ``""``; surrounding ASCII
    whitespace stripped) and ``line`` (the row's line in the file; the header is line 1). The
    RLE strings themselves are not parsed here (``module_rle.parse_rle`` is their judge).

    Raises ``FileNotFoundError``, or ``ValueError`` naming ``what``, the file and what was expected
    for: an empty file, a header other than exactly ``ImageId,EncodedPixels`` (an extra column
    is an error, as Kaggle's validator has it), a row with another number of fields, a blank
    ImageId, and a header-only file (unless ``allow_no_rows``).
    """
    import csv

    import pandas as pd

    path = Path(path)
    problem = _csv_text_problem(path)
    if problem == "file not found":
        raise FileNotFoundError(f"{what} {path}: file not found")
    if problem:
        raise ValueError(f"{what} {path}: {problem}; expected the header ImageId,EncodedPixels and one row per "
                         "mask (a blank EncodedPixels for an image without ships)")
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        if tuple(h.strip() for h in header) != CSV_COLUMNS:
            raise ValueError(f"{what} {path}: the header is {','.join(header)!r}, expected exactly "
                             f"'{','.join(CSV_COLUMNS)}' (Kaggle's format)")
        ids, rles, lines = [], [], []
        for record in reader:
            line = reader.line_num
            if not record or (len(record) == 1 and not record[0].strip()):
                continue  # a blank line
            if len(record) != 2:
                raise ValueError(f"{what} {path}, line {line}: {len(record)} fields, expected 2 "
                                 "(ImageId,EncodedPixels)")
            image_id = record[0].strip()
            if not image_id:
                raise ValueError(f"{what} {path}, line {line}: blank ImageId")
            ids.append(image_id)
            rles.append(record[1].strip(" \t\n\v\f\r"))
            lines.append(line)
    if not ids and not allow_no_rows:
        raise ValueError(f"{what} {path}: only a header, no rows; expected one row per mask (a blank "
                         "EncodedPixels for an image without ships)")
    return pd.DataFrame({"ImageId": pd.Series(ids, dtype=object), "EncodedPixels": pd.Series(rles, dtype=object),
                         "line": pd.Series(lines, dtype=np.int64)})


def read_image_ids(path: str | os.PathLike, what: str = "id list") -> list[str]:
    """The ImageIds of a CSV with an ``ImageId`` column (``sample_submission_v2.csv``), unique, in
    file order. An empty or header-only file, or one without the column, is an error naming it."""
    import pandas as pd

    path = Path(path)
    problem = _csv_text_problem(path)
    if problem == "file not found":
        raise FileNotFoundError(f"{what} {path}: file not found")
    if problem:
        raise ValueError(f"{what} {path}: {problem}; expected a CSV with an ImageId column")
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, usecols=lambda c: c == "ImageId")
    if "ImageId" not in frame.columns:
        raise ValueError(f"{what} {path}: no ImageId column")
    if not len(frame):
        raise ValueError(f"{what} {path}: only a header, no ImageIds")
    return list(dict.fromkeys(frame["ImageId"].str.strip()))


# ============================================================================ runs: set aside, failure reports
def set_aside(path: str | os.PathLike, logger=None) -> Path | None:
    """Rename an earlier output out of the way (``<name>.old-<time>``; nothing is deleted); returns
    where it went, or None when ``path`` does not exist."""
    import time

    path = Path(path)
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = path.with_name(f"{path.name}.old-{stamp}")
    counter = 1
    while target.exists():
        target = path.with_name(f"{path.name}.old-{stamp}-{counter}")
        counter += 1
    path.rename(target)
    if logger is not None:
        logger.warning("moved the earlier %s to %s", path, target)
    return target


class TooManyFailures(RuntimeError):
    """More images failed than the limit allows (``--max-failed``); the report of failed files was written."""


def get_failure_report_path(out_path: str | os.PathLike) -> Path:
    """The report of failed images beside an output: ``<stem>_failures.csv``."""
    path = Path(out_path)
    return path.with_name(f"{path.stem}_failures.csv")


def write_failure_report(failures, out_path: str | os.PathLike) -> Path:
    """Write ``ImageId,reason`` of the images that failed beside ``out_path`` (always, also when
    empty, so a stale report never lingers), atomically; returns its path."""
    report = get_failure_report_path(out_path)
    with atomic_path(report) as tmp:
        failures.loc[:, ["ImageId", "reason"]].to_csv(tmp, index=False)
    return report


def check_failure_limit(n_failed: int, n_total: int, max_failed: float, report: str | os.PathLike) -> None:
    """Raise :class:`TooManyFailures` when ``n_failed`` of ``n_total`` images exceed ``max_failed``:
    a share of the images when < 1 (0.01: 1%), else a count."""
    if max_failed < 0:
        raise ValueError(f"max_failed must be >= 0, got {max_failed}")
    limit = max_failed * n_total if max_failed < 1 else max_failed
    if n_failed > limit:
        allowed = f"{max_failed:.1%} of {n_total}" if max_failed < 1 else f"{int(max_failed)}"
        raise TooManyFailures(f"{n_failed} of {n_total} images could not be read, more than the {allowed} allowed "
                              f"(--max-failed / SUBMIT.MAX_FAILED); the failed files are listed in {report}")
