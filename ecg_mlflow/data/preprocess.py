"""The one preprocessing function: image bytes or file in, uint8 RGB pixels out.

Training, evaluation and serving all call `load_pixels`, so a model never sees pixels
prepared differently from the ones it was trained on. Backbone-specific input scaling is
NOT done here: it lives inside the saved model, which takes RGB values 0..255.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from ecg_mlflow.data.decode import (
    EXACT_PATH_PIXELS,
    MAX_PIXELS,
    ImageDecodeError,
    check_expansion,
    check_pixels,
    decode_reduced,
    describe_failure,
    max_source_pixels,
    open_accepted,
)

__all__ = ["CROPS", "GRID_BOX", "MAX_PIXELS", "ImageDecodeError", "load_batch", "load_pixels", "open_image"]

CROPS: tuple[str, ...] = ("none", "grid")

GRID_BOX: tuple[float, float, float, float] = (72 / 2213, 287 / 1572, 2173 / 2213, 1514 / 1572)
"""The trace grid as fractions (left, top, right, bottom) of the 2213 x 1572 Mendeley
original (x 72..2173, y 287..1514). `crop="grid"` keeps only this box, dropping the printed
header (exam ID) and footer (heart rate) a model could otherwise read instead of the traces.
Fractions, so the box applies to the half-size copies and to any other size alike."""

SUPPORTED_MODES: frozenset[str] = frozenset(
    {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr"}
)
"""PIL modes with a faithful conversion to 8-bit RGB; 16/32-bit and float modes are refused."""

RESAMPLE = Image.Resampling.BILINEAR
"""Resize filter: PIL's bilinear, which widens its support when shrinking, so downscaling
averages over the source area (no aliasing of the thin trace lines)."""

_PAPER_WHITE = (255, 255, 255)


def open_image(source: bytes | str | Path, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Open lazily (header only) and refuse empty, non-JPEG/PNG, oversized, bomb or odd-mode input."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data: bytes | Path = bytes(source)
        n_bytes = len(data)
    else:
        data = Path(source)
        try:
            n_bytes = data.stat().st_size
        except OSError as exc:
            raise ImageDecodeError(f"cannot read file: {exc.strerror or exc}") from exc
    if n_bytes == 0:
        raise ImageDecodeError("empty input: 0 bytes" if isinstance(data, bytes) else "empty file: 0 bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = open_accepted(data)
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageDecodeError(f"image too large: {exc}; the limit is {max_pixels} pixels") from exc
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"not a readable JPEG/PNG image ({describe_failure(exc)})") from exc
    except Exception as exc:  # a decoder bug on hostile bytes is still just a bad image
        raise ImageDecodeError(f"cannot read the image header ({describe_failure(exc)})") from exc
    check_pixels(image.size, max_pixels)
    check_expansion(image.size, n_bytes)
    if image.mode not in SUPPORTED_MODES:
        raise ImageDecodeError(
            f"unsupported image mode {image.mode!r}: use 8-bit RGB, grayscale or palette images"
        )
    return image


def decode(image: Image.Image) -> Image.Image:
    """Decode the pixel data, turning truncation and corrupt data into ImageDecodeError."""
    try:
        image.load()
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageDecodeError(f"truncated or corrupt image data ({exc})") from exc
    return image


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert to RGB; transparent areas become paper white, not the hidden colour under them."""
    if image.mode == "RGB":
        return image
    has_alpha = image.mode in ("LA", "La", "PA", "RGBA", "RGBa") or (
        image.mode == "P" and "transparency" in image.info
    )
    if not has_alpha:
        return image.convert("RGB")
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _PAPER_WHITE + (255,))
    return Image.alpha_composite(background, rgba).convert("RGB")


def crop_box(size: tuple[int, int], crop: str) -> tuple[int, int, int, int]:
    """The pixel box that `crop` keeps of an image of `size` (width, height)."""
    if crop not in CROPS:
        raise ValueError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
    width, height = size
    if crop == "none":
        return (0, 0, width, height)
    left, top, right, bottom = GRID_BOX
    return (round(left * width), round(top * height), round(right * width), round(bottom * height))


def load_pixels(source: bytes | str | Path, height: int, width: int, crop: str = "none") -> np.ndarray:
    """Decode, apply EXIF orientation, convert to RGB, crop, resize: uint8 (height, width, 3).

    Args:
        source: encoded image bytes (JPEG, PNG, ...) or a path to an image file.
        height, width: output size in pixels.
        crop: "none" keeps the whole report, "grid" keeps only GRID_BOX (the trace grid).

    Raises:
        ImageDecodeError: empty, not an image, truncated, too large or unsupported mode.
        ValueError: a bad `height`, `width` or `crop` argument.
    """
    if height < 1 or width < 1:
        raise ValueError(f"height and width must be positive, got {height} x {width}")
    crop_box((1, 1), crop)  # validates crop before any decoding
    try:
        return decode_pixels(open_image(source, max_source_pixels(height, width)), height, width, crop)
    except ImageDecodeError as exc:
        if isinstance(source, (bytes, bytearray, memoryview)):
            raise
        raise ImageDecodeError(f"{source}: {exc}") from exc


def decode_pixels(image: Image.Image, height: int, width: int, crop: str) -> np.ndarray:
    """The pixels of an opened image; any exception of a decoder becomes an ImageDecodeError."""
    try:
        if image.width * image.height <= EXACT_PATH_PIXELS:
            image = to_rgb(ImageOps.exif_transpose(decode(image)))
        else:
            image = decode_reduced(image, uncropped_size(height, width, crop), to_rgb)
        box = crop_box(image.size, crop)
        if box != (0, 0, *image.size):
            image = image.crop(box)
        if image.size != (width, height):
            image = image.resize((width, height), RESAMPLE)
        return np.asarray(image, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except (OSError, SyntaxError, ValueError, EOFError) as exc:
        raise ImageDecodeError(f"truncated or corrupt image data ({describe_failure(exc)})") from exc
    except MemoryError as exc:
        raise ImageDecodeError("out of memory decoding the image") from exc
    except Exception as exc:  # a decoder bug on hostile bytes is still just a bad image
        raise ImageDecodeError(f"cannot decode the image ({describe_failure(exc)})") from exc


def uncropped_size(height: int, width: int, crop: str) -> tuple[int, int]:
    """(width, height) of the whole image whose `crop` box resizes to height x width."""
    left, top, right, bottom = crop_box((1_000_000, 1_000_000), crop)
    return (-(-width * 1_000_000 // (right - left)), -(-height * 1_000_000 // (bottom - top)))


def load_batch(sources, height: int, width: int, crop: str = "none") -> np.ndarray:
    """`load_pixels` over `sources`, stacked as the float32 batch a backbone takes. The feature
    cache and the logged model's check both build their batches here, so the network sees the
    very same array either way."""
    return np.stack([load_pixels(source, height, width, crop) for source in sources]).astype(np.float32)
