"""Only JPEG and PNG, refused by header otherwise; bombs refused; large images decoded lean."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps

from ecg_mlflow.data import decode
from ecg_mlflow.data.manifest import build_manifest
from ecg_mlflow.data.preprocess import ImageDecodeError, load_pixels, to_rgb

from serving_fixtures import FOREIGN_FORMATS, foreign_image, palette_bomb


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def _report_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Light paper with dark random strokes: detail at every scale, compresses like a report."""
    rng = np.random.default_rng(seed)
    pixels = np.full((height, width, 3), 235, np.uint8)
    pixels[:, :, 1] = 210
    for _ in range(400):
        y, x = rng.integers(0, height - 4), rng.integers(0, width - 200)
        pixels[y:y + 3, x:x + 200] = (20, 20, 40)
    pixels[::50, :] = (240, 160, 160)
    return Image.fromarray(pixels)


def _old_path(data: bytes, height: int, width: int) -> np.ndarray:
    """Full decode, EXIF, RGB, one bilinear resize: the decoding of before."""
    image = to_rgb(ImageOps.exif_transpose(Image.open(io.BytesIO(data))))
    return np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))


@pytest.mark.parametrize("fmt", FOREIGN_FORMATS)
def test_formats_other_than_jpeg_and_png_are_refused_by_name(fmt):
    data = foreign_image(fmt)
    with pytest.raises(ImageDecodeError) as caught:
        load_pixels(data, 16, 16)
    expected = {"TGA": "not an image: no JPEG or PNG header",  # TGA has no magic bytes
                "PPM": "Netpbm (PBM/PGM/PPM) image; only JPEG and PNG are accepted"}
    assert str(caught.value).startswith(expected.get(fmt, f"{fmt} image; only JPEG and PNG are accepted"))


@pytest.mark.parametrize("head, name", [
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "EPS image"),
    (b"DDS |\x00\x00\x00" + b"\xff" * 200, "DDS image"),
    (b"BLP1" + b"\x00" * 200, "BLP image"),
    (b"%PDF-1.4\n", "PDF document"),
])
def test_hostile_headers_never_reach_pillow(head, name, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("Pillow was asked to open a refused format")

    monkeypatch.setattr(decode.Image, "open", refuse)  # proves the refusal comes first
    with pytest.raises(ImageDecodeError, match=f"^{name}; only JPEG and PNG are accepted"):
        load_pixels(head, 16, 16)


def test_a_dataset_file_in_another_format_is_named_by_its_path(tmp_path: Path):
    gif = tmp_path / "MI" / "disguised.jpg"
    gif.parent.mkdir()
    gif.write_bytes(foreign_image("GIF"))
    for label in ("HMI", "AHB", "NORM"):
        (tmp_path / label).mkdir()
        (tmp_path / label / "a.png").write_bytes(_encoded(Image.new("RGB", (8, 8)), "PNG"))
    with pytest.raises(ImageDecodeError, match=f"^{gif}: GIF image; only JPEG and PNG"):
        load_pixels(gif, 8, 8)
    with pytest.raises(Exception, match="MI/disguised.jpg: GIF image; only JPEG and PNG are accepted"):
        build_manifest(tmp_path)


def test_a_palette_bomb_is_refused_from_its_header_by_its_expansion():
    bomb = palette_bomb(4000, 4000)
    assert len(bomb) < 40_000 and 4000 * 4000 <= decode.max_source_pixels(512, 1024)
    with pytest.raises(ImageDecodeError, match=r"decompression bomb: \d+ bytes would decode to 4000 x 4000"):
        load_pixels(bomb, 512, 1024)


def test_the_pixel_limit_follows_the_model_input():
    assert decode.max_source_pixels(64, 128) == decode.MIN_SOURCE_PIXELS
    assert decode.max_source_pixels(1024, 1024) == 32 * 1024 * 1024
    assert decode.max_source_pixels(4096, 4096) == decode.MAX_PIXELS
    with pytest.raises(ImageDecodeError, match=f"6000 x 6000 = 36000000 pixels, the limit is {decode.MIN_SOURCE_PIXELS}"):
        load_pixels(palette_bomb(6000, 6000), 512, 1024)


@pytest.mark.parametrize("mode", ["P", "PA", "RGBA", "LA", "1", "L"])
def test_reducing_in_strips_equals_converting_then_reducing(mode):
    image = _report_like(1003, 701).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    image = image.convert(mode) if mode != "PA" else image.convert("PA")
    if mode == "P":
        image.info["transparency"] = 3
    old_strip = decode.STRIP_PIXELS
    try:
        decode.STRIP_PIXELS = 20_000  # many strips, a short last one
        for factor in (1, 3, 4):
            strips = decode.reduce_in_strips(image, factor, to_rgb)
            assert np.array_equal(np.asarray(strips), np.asarray(to_rgb(image).reduce(factor))), (mode, factor)
    finally:
        decode.STRIP_PIXELS = old_strip


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_a_large_image_decodes_lean_and_close_to_the_exact_path(fmt):
    image = _report_like(3000, 2100)  # 6.3 M pixels: over EXACT_PATH_PIXELS
    data = _encoded(image, fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    lean = load_pixels(data, 128, 256).astype(int)
    exact = _old_path(data, 128, 256).astype(int)
    assert lean.shape == exact.shape == (128, 256, 3)
    assert np.abs(lean - exact).mean() < 2.0 and np.percentile(np.abs(lean - exact), 99) < 24


def test_images_up_to_the_exact_path_limit_decode_as_before(real_originals: Path):
    for path in sorted(real_originals.rglob("*.jpg"))[:2]:
        data = path.read_bytes()
        assert np.array_equal(load_pixels(data, 128, 256), _old_path(data, 128, 256))
    small = _encoded(_report_like(2000, 2000), "PNG")  # 4.0 M pixels, at the limit
    assert np.array_equal(load_pixels(small, 64, 128), _old_path(small, 64, 128))


def test_the_lean_path_applies_exif_orientation():
    image = _report_like(3000, 2100)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees clockwise
    data = _encoded(image, "JPEG", quality=95, exif=exif.tobytes())
    lean = load_pixels(data, 256, 128).astype(int)
    exact = _old_path(data, 256, 128).astype(int)
    assert np.abs(lean - exact).mean() < 2.0


def test_decoder_failures_are_one_short_line():
    reason = decode.describe_failure(KeyError("x" * 5000))
    assert reason.startswith("KeyError: ") and len(reason) <= 10 + decode.MAX_REASON_CHARS
    whole = _encoded(_report_like(3000, 2100), "JPEG")
    truncated = whole[:len(whole) // 2]
    with pytest.raises(ImageDecodeError, match="truncated or corrupt"):
        load_pixels(truncated, 64, 128)
