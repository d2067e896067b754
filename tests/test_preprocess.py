"""The one preprocessing function on real originals and on the odd inputs users send."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ecg_mlflow.data.preprocess import MAX_PIXELS, ImageDecodeError, load_pixels

from serving_fixtures import png_header_only

MI_ORIGINAL = "ECG Images of Myocardial Infarction Patients (240x12=2880)/MI(1).jpg"


def _png_bytes(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def test_real_original_gives_uint8_rgb_of_requested_size(real_originals: Path) -> None:
    pixels = load_pixels(real_originals / MI_ORIGINAL, 128, 256)
    assert pixels.shape == (128, 256, 3)
    assert pixels.dtype == np.uint8
    assert pixels.min() < 60 and pixels.max() > 200  # dark traces on light paper, not a blank


def test_bytes_and_path_give_identical_pixels(real_originals: Path) -> None:
    path = real_originals / MI_ORIGINAL
    assert np.array_equal(load_pixels(path.read_bytes(), 64, 128, "grid"), load_pixels(path, 64, 128, "grid"))
    assert np.array_equal(load_pixels(str(path), 64, 128), load_pixels(path, 64, 128))


def test_grid_crop_keeps_the_trace_grid_and_drops_the_header(real_originals: Path) -> None:
    path = real_originals / MI_ORIGINAL
    with Image.open(path) as original:
        assert original.size == (2213, 1572)
        # README: the trace grid lies within x 72..2173, y 287..1514 of the original
        expected = np.asarray(original.convert("RGB").crop((72, 287, 2173, 1514)).resize((256, 128), Image.Resampling.BILINEAR))
        header = np.asarray(original.convert("L").crop((0, 0, 2213, 287)))
    grid = load_pixels(path, 128, 256, "grid")
    whole = load_pixels(path, 128, 256, "none")
    assert not np.array_equal(grid, whole)
    assert np.abs(grid.astype(int) - expected.astype(int)).max() <= 1
    assert header.min() < 50  # the header holds dark printed text (exam ID) ...
    top_rows_of_whole = whole[: 128 * 287 // 1572]
    assert top_rows_of_whole.min() < 160  # ... that the uncropped output keeps at its top,
    # while the grid output is exactly the README box, which starts below the header


def test_exif_orientation_is_applied() -> None:
    stored = Image.new("RGB", (40, 20), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 20, 20))  # stored: left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    buf = io.BytesIO()
    stored.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    pixels = load_pixels(buf.getvalue(), 40, 20)
    assert pixels.shape == (40, 20, 3)
    top, bottom = pixels[5, 10].astype(int), pixels[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # displayed: red on top
    assert bottom[2] > 200 and bottom[0] < 60  # blue at the bottom


@pytest.mark.parametrize(
    ("image", "expected"),
    [
        (Image.new("RGBA", (8, 6), (10, 20, 30, 0)), (255, 255, 255)),  # transparent -> paper white
        (Image.new("RGBA", (8, 6), (10, 20, 30, 255)), (10, 20, 30)),
        (Image.new("L", (8, 6), 100), (100, 100, 100)),
        (Image.new("LA", (8, 6), (100, 255)), (100, 100, 100)),
        (Image.new("1", (8, 6), 1), (255, 255, 255)),
        (Image.new("RGB", (8, 6), (200, 30, 60)).convert("P", palette=Image.Palette.ADAPTIVE), (200, 30, 60)),
    ],
    ids=["rgba-transparent", "rgba-opaque", "grayscale", "grayscale-alpha", "bilevel", "palette"],
)
def test_png_modes_become_rgb(image: Image.Image, expected: tuple[int, int, int]) -> None:
    pixels = load_pixels(_png_bytes(image), 6, 8)
    assert pixels.shape == (6, 8, 3) and pixels.dtype == np.uint8
    assert tuple(pixels[3, 4].tolist()) == expected


@pytest.mark.parametrize(("width", "height"), [(8000, 6000), (100_000, 100_000)], ids=["over-limit", "bomb"])
def test_too_large_fails_fast_before_decoding(width: int, height: int) -> None:
    assert width * height > MAX_PIXELS
    with pytest.raises(ImageDecodeError, match="too large"):
        load_pixels(png_header_only(width, height), 32, 32)


def test_bad_inputs_raise_image_decode_error(real_originals: Path, tmp_path: Path) -> None:
    data = (real_originals / MI_ORIGINAL).read_bytes()
    empty = tmp_path / "empty.jpg"
    empty.write_bytes(b"")
    cases = {
        "empty": (b"", "empty"),
        "empty file": (empty, "empty"),
        "garbage": (b"this is not an image at all" * 10, "not an image"),
        "truncated": (data[: len(data) // 2], "truncated"),
        "16-bit": (_png_bytes(Image.new("I;16", (4, 4))), "unsupported image mode"),
    }
    for name, (source, why) in cases.items():
        with pytest.raises(ImageDecodeError, match=why):
            load_pixels(source, 16, 16)
        assert issubclass(ImageDecodeError, ValueError), name


def test_bad_arguments_are_named() -> None:
    png = _png_bytes(Image.new("RGB", (4, 4)))
    with pytest.raises(ValueError, match="crop must be one of none, grid"):
        load_pixels(png, 4, 4, crop="header")
    with pytest.raises(ValueError, match="height and width"):
        load_pixels(png, 0, 4)
