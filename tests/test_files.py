"""module_files: atomic writes, the one image policy (read_image, check_image), the ImageId,EncodedPixels
CSV reader, image listing and the failure reports."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

import module_files


def write_jpeg(path: Path, size: int = 96, seed: int = 0) -> Path:
    """A noisy RGB JPEG: enough entropy that its second half holds real image data."""
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    return path


def truncate_keeping_end_marker(source: Path, target: Path) -> Path:
    """The first half of a JPEG with its end-of-image marker put back (what a cut download plus a
    naive repair looks like): PIL decodes it without a word and fills the rest with grey."""
    data = source.read_bytes()
    target.write_bytes(data[:len(data) // 2] + b"\xff\xd9")
    return target


# ---------------------------------------------------------------- atomic writes
def test_atomic_path_keeps_old_file_on_failure(tmp_path):
    target = tmp_path / "out.csv"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with module_files.atomic_path(target) as tmp:
            tmp.write_text("half-written")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert list(tmp_path.iterdir()) == [target]
    with module_files.atomic_path(target) as tmp:
        assert tmp.suffix == ".csv" and tmp != target
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert module_files.write_text_atomic(tmp_path / "sub" / "note.txt", "hello").read_text() == "hello"


def test_atomic_path_gives_the_file_umask_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        with module_files.atomic_path(tmp_path / "out.txt") as tmp:
            tmp.write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "out.txt").stat().st_mode & 0o777 == 0o644


def test_set_aside_moves_an_earlier_output_and_deletes_nothing(tmp_path):
    folder = tmp_path / "classifier"
    folder.mkdir()
    (folder / "export.pkl").write_text("first")
    moved = module_files.set_aside(folder)
    assert moved.name.startswith("classifier.old-") and (moved / "export.pkl").read_text() == "first"
    assert not folder.exists()
    folder.mkdir()
    again = module_files.set_aside(folder)  # the same second: a distinct name, nothing overwritten
    assert again != moved and again.is_dir() and moved.is_dir()
    assert module_files.set_aside(tmp_path / "nothing") is None


# ---------------------------------------------------------------- the image policy
def test_read_image_gives_rgb_uint8_rows_by_columns(tmp_path):
    pixels = np.zeros((6, 10, 3), np.uint8)
    pixels[1, 7] = (255, 0, 0)  # one red pixel, row 1 column 7: a transposition moves it
    Image.fromarray(pixels).save(tmp_path / "a.png")
    image = module_files.read_image(tmp_path / "a.png")
    assert image.shape == (6, 10, 3) and image.dtype == np.uint8
    np.testing.assert_array_equal(image, pixels)
    jpeg = module_files.read_image(write_jpeg(tmp_path / "b.jpg", size=64))
    assert jpeg.shape == (64, 64, 3) and jpeg.dtype == np.uint8
    np.testing.assert_allclose(jpeg.mean(), np.asarray(Image.open(tmp_path / "b.jpg")).mean(), atol=1.0)
    assert module_files.image_size(tmp_path / "a.png") == (6, 10)


def test_read_image_checks_the_size_and_names_the_file(tmp_path):
    path = write_jpeg(tmp_path / "big.jpg", size=96)
    assert module_files.read_image(path, 96).shape == (96, 96, 3)
    with pytest.raises(module_files.ImageError, match=r"big.jpg: size 96x96, expected 64x64"):
        module_files.read_image(path, 64)
    Image.new("RGB", (100, 80)).save(tmp_path / "wide.png")
    with pytest.raises(module_files.ImageError, match=r"wide.png: size 100x80, expected 64x64"):
        module_files.read_image(tmp_path / "wide.png", 64)
    # decoded at a quarter through the DCT, the size check still applies to the file's size
    reduced = module_files.read_image(path, 96, reduce_to=24)
    assert reduced.shape == (24, 24, 3)


def test_reduced_size_is_the_jpeg_decoders_scale():
    assert module_files.reduced_size(768, 768, 256) == (288, 288)  # 3/8, not 1/2
    assert module_files.reduced_size(768, 768, 128) == (192, 192)
    assert module_files.reduced_size(256, 256, 128) == (128, 128)
    assert module_files.reduced_size(1000, 1000, 128) == (250, 250)  # sides rounded up
    assert module_files.reduced_size(50, 80, 64) == (50, 80)  # a side below the target: no reduction
    assert module_files.reduced_size(300, 300, None) == (300, 300)


@pytest.mark.parametrize("side, reduce_to", [(256, 128), (768, 256), (768, 128)])
def test_reduce_image_gives_the_pixels_of_a_reduced_jpeg_decode(tmp_path, side, reduce_to):
    """Pixels in memory reduced as the JPEG decoder reduces the file: the decoder's size, and the
    decoder's pixels to within a grey level or two on a generated sea-and-ships tile, closer
    than a bilinear resize gets (what the classifier saw for in-memory slices before)."""
    import cv2
    import module_synthetic

    image, _ = module_synthetic.render_scene(np.random.default_rng(side + reduce_to), side, side, 3, scale=side / 768)
    path = tmp_path / "tile.jpg"
    assert cv2.imwrite(str(path), image[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 92])
    full = module_files.read_image(path)
    decoded = module_files.read_image(path, reduce_to=reduce_to)
    reduced = module_files.reduce_image(full, reduce_to)
    assert reduced.shape == decoded.shape == (*module_files.reduced_size(side, side, reduce_to), 3)
    assert reduced.dtype == np.uint8
    area_error = np.abs(reduced.astype(int) - decoded).mean()
    bilinear = np.asarray(Image.fromarray(full).resize(decoded.shape[1::-1], Image.BILINEAR))
    assert area_error < 1.5 and area_error < np.abs(bilinear.astype(int) - decoded).mean()
    assert module_files.reduce_image(decoded, decoded.shape[0]) is decoded  # nothing to reduce: itself


def test_read_image_takes_rgb_only_unless_asked_to_convert(tmp_path):
    Image.new("L", (8, 8), 128).save(tmp_path / "grey.png")
    Image.new("RGBA", (8, 8)).save(tmp_path / "alpha.png")
    for name, mode in (("grey.png", "L"), ("alpha.png", "RGBA")):
        with pytest.raises(module_files.ImageError, match=rf"{name}: mode {mode}, expected RGB"):
            module_files.read_image(tmp_path / name)
        assert module_files.read_image(tmp_path / name, convert=True).shape == (8, 8, 3)


def test_grey_jpeg_is_rejected_and_converted_when_asked(tmp_path):
    Image.new("L", (16, 16), 128).save(tmp_path / "grey.jpg")
    with pytest.raises(module_files.ImageError, match="grey.jpg"):
        module_files.read_image(tmp_path / "grey.jpg")
    converted = module_files.read_image(tmp_path / "grey.jpg", convert=True)  # "grey ... become RGB"
    assert converted.shape == (16, 16, 3) and abs(int(converted.mean()) - 128) <= 2


def test_missing_folder_and_undecodable_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.jpg"):
        module_files.read_image(tmp_path / "nothing.jpg")
    with pytest.raises(module_files.ImageError, match="is a folder"):
        module_files.read_image(tmp_path)
    (tmp_path / "text.jpg").write_bytes(b"ImageId,EncodedPixels\n")
    (tmp_path / "empty.png").write_bytes(b"")
    for name in ("text.jpg", "empty.png"):
        with pytest.raises(module_files.ImageError, match=rf"{name}: cannot decode image"):
            module_files.read_image(tmp_path / name)
        assert isinstance(module_files.ImageError("x"), ValueError)


def test_truncated_jpeg_is_corrupt_even_with_its_end_marker_restored(tmp_path):
    source = write_jpeg(tmp_path / "full.jpg", size=256)
    cut = truncate_keeping_end_marker(source, tmp_path / "cut.jpg")
    with Image.open(cut) as lenient:
        lenient.load()  # PIL: no error, the lost half comes back grey
    assert module_files.check_image(source) is None
    problem = module_files.check_image(cut)
    assert problem is not None and "cannot decode" in problem and "Corrupt JPEG" in problem
    with pytest.raises(module_files.ImageError, match="cut.jpg"):
        module_files.read_image(cut)
    half = tmp_path / "half.jpg"  # and without the marker, of course
    half.write_bytes(source.read_bytes()[:source.stat().st_size // 2])
    assert "cannot decode" in module_files.check_image(half)


def test_truncated_real_kaggle_tile_with_end_marker_is_corrupt(airbus_images, tmp_path):
    source = sorted(airbus_images.glob("*.jpg"))[0]
    assert module_files.check_image(source, 768) is None
    cut = truncate_keeping_end_marker(source, tmp_path / source.name)
    assert "cannot decode" in module_files.check_image(cut, 768)


def test_check_images_reports_only_the_bad_ones_in_input_order(tmp_path):
    good = write_jpeg(tmp_path / "good.jpg", size=64)
    cut = truncate_keeping_end_marker(write_jpeg(tmp_path / "full.jpg", size=64, seed=1), tmp_path / "cut.jpg")
    wrong_size = write_jpeg(tmp_path / "wrong.jpg", size=32)
    missing = tmp_path / "missing.jpg"
    problems = module_files.check_images([missing, good, cut, wrong_size], 64, progress=False)
    assert list(problems) == [str(missing), str(cut), str(wrong_size)]
    assert problems[str(missing)] == "missing file"
    assert "cannot decode" in problems[str(cut)] and problems[str(wrong_size)] == "size 32x32, expected 64x64"
    assert module_files.check_images([good], 64, num_workers=1, progress=False) == {}


def test_list_images_takes_image_suffixes_in_name_order(tmp_path):
    for name in ("b.jpg", "a.PNG", "c.jpeg", "notes.txt", "d.jpg.bak"):
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "sub.jpg").mkdir()  # a folder named like an image is not one
    assert [p.name for p in module_files.list_images(tmp_path)] == ["a.PNG", "b.jpg", "c.jpeg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no .jpg/.jpeg/.png files"):
        module_files.list_images(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        module_files.list_images(tmp_path / "nowhere")


# ---------------------------------------------------------------- the ImageId,EncodedPixels reader
def test_segmentation_csv_keeps_lines_blanks_and_strips_whitespace(tmp_path):
    csv = tmp_path / "truth.csv"
    csv.write_text('ImageId,EncodedPixels\na.jpg,1 3\nb.jpg,\n\n"c.jpg"," 5 2 "\n')
    frame = module_files.read_segmentation_csv(csv)
    assert list(frame.columns) == ["ImageId", "EncodedPixels", "line"]
    assert frame["ImageId"].tolist() == ["a.jpg", "b.jpg", "c.jpg"]
    assert frame["EncodedPixels"].tolist() == ["1 3", "", "5 2"]
    assert frame["line"].tolist() == [2, 3, 5]  # the header is line 1; the blank line 4 is skipped
    bom = tmp_path / "bom.csv"
    bom.write_bytes("ImageId,EncodedPixels\r\na.jpg,1 3\r\n".encode("utf-8-sig"))
    assert module_files.read_segmentation_csv(bom)[["ImageId", "EncodedPixels"]].values.tolist() == [["a.jpg", "1 3"]]


@pytest.mark.parametrize("text, message", [
    ("ImageId,EncodedPixels,Extra\na.jpg,1 3,x\n", r"the header is 'ImageId,EncodedPixels,Extra', expected exactly "
                                                   r"'ImageId,EncodedPixels'"),
    ("id,rle\na.jpg,1 3\n", "the header is 'id,rle', expected exactly 'ImageId,EncodedPixels'"),
    ("ImageId\na.jpg\n", "the header is 'ImageId'"),
    ("ImageId,EncodedPixels\na.jpg,1 3\nb.jpg,5 1,7\n", "line 3: 3 fields, expected 2"),
    ("ImageId,EncodedPixels\na.jpg,1 3\n ,5 1\n", "line 3: blank ImageId"),
    ("", "the file is empty"),
    ("  \n", "the file is empty"),
    ("ImageId,EncodedPixels\n", "only a header, no rows"),
])
def test_segmentation_csv_errors_name_the_file_and_what_was_expected(tmp_path, text, message):
    csv = tmp_path / "given.csv"
    csv.write_text(text)
    with pytest.raises(ValueError, match=message) as info:
        module_files.read_segmentation_csv(csv, "submission")
    assert str(info.value).startswith(f"submission {csv}")


def test_header_only_csv_is_allowed_when_asked_and_a_missing_one_is_named(tmp_path):
    csv = tmp_path / "header.csv"
    csv.write_text("ImageId,EncodedPixels\n")
    frame = module_files.read_segmentation_csv(csv, allow_no_rows=True)
    assert frame.empty and list(frame.columns) == ["ImageId", "EncodedPixels", "line"]
    with pytest.raises(FileNotFoundError, match="truth .*nope.csv: file not found"):
        module_files.read_segmentation_csv(tmp_path / "nope.csv", "truth")


def test_read_image_ids_unique_in_file_order(tmp_path):
    csv = tmp_path / "sample.csv"
    csv.write_text("ImageId,EncodedPixels\nb.jpg,1 2\na.jpg,1 2\nb.jpg,3 4\n")
    assert module_files.read_image_ids(csv) == ["b.jpg", "a.jpg"]
    for text, message in (("", "the file is empty"), ("ImageId,EncodedPixels\n", "only a header"),
                          ("id,x\na.jpg,1\n", "no ImageId column")):
        csv.write_text(text)
        with pytest.raises(ValueError, match=message):
            module_files.read_image_ids(csv)


# ---------------------------------------------------------------- failure reports
def test_failure_report_sits_beside_the_output_and_is_always_written(tmp_path):
    out = tmp_path / "part0.csv"
    assert module_files.get_failure_report_path(out) == tmp_path / "part0_failures.csv"
    failures = pd.DataFrame({"ImageId": ["a.jpg"], "reason": ["missing file"], "extra": [1]})
    report = module_files.write_failure_report(failures, out)
    assert pd.read_csv(report).to_dict("records") == [{"ImageId": "a.jpg", "reason": "missing file"}]
    module_files.write_failure_report(failures.iloc[:0], out)  # nothing failed: an empty report, not a stale one
    assert pd.read_csv(report).empty


def test_failure_limit_is_a_share_below_one_and_a_count_above(tmp_path):
    report = tmp_path / "x_failures.csv"
    module_files.check_failure_limit(1, 100, 0.01, report)  # 1% of 100 allowed
    with pytest.raises(module_files.TooManyFailures, match=r"2 of 100 images .* 1.0% of 100 .*x_failures.csv"):
        module_files.check_failure_limit(2, 100, 0.01, report)
    module_files.check_failure_limit(3, 3, 3, report)  # a count
    with pytest.raises(module_files.TooManyFailures, match="more than the 2 allowed"):
        module_files.check_failure_limit(3, 3, 2, report)
    with pytest.raises(module_files.TooManyFailures):
        module_files.check_failure_limit(1, 5, 0, report)  # 0: none allowed
    with pytest.raises(ValueError, match="max_failed must be >= 0"):
        module_files.check_failure_limit(0, 5, -1, report)
