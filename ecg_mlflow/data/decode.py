"""Decoding only JPEG and PNG, within a memory budget tied to the model's input size.

`preprocess.load_pixels` is the one preprocessing function; this module holds what keeps it
safe on untrusted bytes (serving) and strict on dataset files (training):

- the format is read from the magic bytes before Pillow sees the data, and only JPEG and PNG
  are opened (Pillow knows dozens of formats, some with their own decoder bugs, EPS even
  calls Ghostscript); another format is refused by name;
- a decompression bomb is refused from the header: more pixels than the model can use
  (`max_source_pixels`), or more decoded bytes per compressed byte than a real report
  compresses to (`MAX_EXPANSION`);
- a large image is decoded lean (`decode_reduced`): a JPEG in draft mode (libjpeg scales by
  1/2, 1/4 or 1/8 while decoding), any image converted to RGB and box-reduced strip by strip,
  so the only full-size buffer is the decoder's own, in the file's native mode;
- every exception a decoder raises becomes an ImageDecodeError that says why.

Images up to EXACT_PATH_PIXELS (a Mendeley original has 3.5 M) keep the exact decoding of
before, so the pixels, the cached features and the predictions of the dataset are unchanged.
"""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image

ACCEPTED_FORMATS: tuple[str, ...] = ("JPEG", "PNG")
"""What the serving contract and the dataset take (DESIGN.md); everything else is refused."""

FORMAT_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (0, b"II+\x00", "BigTIFF"),
    (0, b"MM\x00+", "BigTIFF"),
    (0, b"BM", "BMP"),
    (8, b"WEBP", "WEBP"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"DDS ", "DDS"),
    (0, b"BLP1", "BLP"),
    (0, b"BLP2", "BLP"),
    (0, b"8BPS", "PSD"),
    (0, b"%!PS", "EPS"),
    (0, b"\xc5\xd0\xd3\xc6", "EPS"),
    (0, b"%PDF", "PDF document"),
    (0, b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypavif", "AVIF"),
    (0, b"qoif", "QOI"),
    (0, b"icns", "ICNS"),
    (0, b"\x76\x2f\x31\x01", "OpenEXR"),
    (0, b"SIMPLE  =", "FITS"),
    (0, b"\x59\xa6\x6a\x95", "Sun raster"),
    (0, b"#define", "XBM"),
    (0, b"/* XPM */", "XPM"),
    (0, b"<svg", "SVG document"),
    (0, b"<?xml", "XML document"),
    (0, b"\x0a\x05\x01", "PCX"),
    (0, b"\x01\xda", "SGI"),
    (0, b"Image type: ", "IM"),
    (0, b"PK\x03\x04", "ZIP archive"),
)
"""(offset, magic, name): the formats a user may send by mistake, named in the refusal. TGA
has no magic bytes; it is refused as 'not an image'."""
NETPBM_MAGIC = frozenset(b"1234567f")
"""PBM/PGM/PPM/PAM/PFM files start with P and one of these characters."""
SNIFF_BYTES = 16

MAX_PIXELS: int = 40_000_000
"""Images with more pixels (from the file header) are refused before any decoding, whatever
the model. A Mendeley original has 3.5 M."""
MIN_SOURCE_PIXELS: int = 16_777_216
"""Any model takes images up to 16 M pixels (4096 x 4096): an original, a 300 dpi scan."""
SOURCE_PIXELS_PER_INPUT_PIXEL: int = 32
"""Beyond MIN_SOURCE_PIXELS a model takes up to 32 source pixels per input pixel: more is
detail the resize throws away (JPEG's draft mode drops up to 8 x 8 at decode time)."""
MAX_EXPANSION: int = 2048
"""Decoded RGB bytes per compressed byte. A JPEG report expands 10-50 x, a clean line-art PNG
up to ~700 x; a palette PNG bomb of tens of megapixels in a few kilobytes 3,000-10,000 x."""
EXPANSION_FREE_PIXELS: int = 1_048_576
"""Images up to 1 M pixels (a few MB decoded) skip the expansion check: small is harmless."""
EXACT_PATH_PIXELS: int = 4_194_304
"""Images up to 4 M pixels decode exactly as they always did (full decode, RGB, crop, one
bilinear resize); larger ones go through `decode_reduced`, which bounds their memory."""
REDUCING_GAP: int = 2
"""The lean path keeps at least twice the output size before the final bilinear resize."""
STRIP_PIXELS: int = 1_048_576
"""Pixels per strip when a large image is converted to RGB and reduced strip by strip."""
MAX_REASON_CHARS = 200

_ORIENTATION_TAG = 0x0112
_TRANSPOSE_OF_ORIENTATION = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SWAPPING_ORIENTATIONS = frozenset({5, 6, 7, 8})


class ImageDecodeError(ValueError):
    """An input that cannot be turned into pixels; the message says why."""


def read_head(source: bytes | Path) -> bytes:
    """The first SNIFF_BYTES of the input, to recognise its format."""
    if isinstance(source, bytes):
        return source[:SNIFF_BYTES]
    with open(source, "rb") as stream:
        return stream.read(SNIFF_BYTES)


def sniff_format(head: bytes) -> str:
    """The format named by the magic bytes; JPEG and PNG pass, any other is refused by name."""
    for offset, magic, name in FORMAT_SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            if name in ACCEPTED_FORMATS:
                return name
            what = name if name.endswith(("document", "archive")) else f"{name} image"
            raise ImageDecodeError(f"{what}; only {' and '.join(ACCEPTED_FORMATS)} are accepted")
    if len(head) >= 2 and head[0:1] == b"P" and head[1] in NETPBM_MAGIC:
        raise ImageDecodeError(f"Netpbm (PBM/PGM/PPM) image; only {' and '.join(ACCEPTED_FORMATS)} are accepted")
    raise ImageDecodeError(f"not an image: no {' or '.join(ACCEPTED_FORMATS)} header (first bytes {head[:8]!r})")


def open_accepted(source: bytes | Path) -> Image.Image:
    """Image.open limited to the accepted formats, after the header says which one it is."""
    sniff_format(read_head(source))
    stream = io.BytesIO(source) if isinstance(source, bytes) else source
    return Image.open(stream, formats=list(ACCEPTED_FORMATS))


def max_source_pixels(height: int, width: int) -> int:
    """How many pixels an image may have for a model whose input is height x width."""
    return min(MAX_PIXELS, max(MIN_SOURCE_PIXELS, SOURCE_PIXELS_PER_INPUT_PIXEL * height * width))


def check_pixels(size: tuple[int, int], limit: int) -> None:
    """Refuse, from the header, an image with more than `limit` pixels."""
    width, height = size
    if width * height > limit:
        raise ImageDecodeError(
            f"image too large: {width} x {height} = {width * height} pixels, the limit is {limit} pixels"
        )


def check_expansion(size: tuple[int, int], n_bytes: int) -> None:
    """Refuse an image whose decoded RGB size is more than MAX_EXPANSION x its compressed size."""
    width, height = size
    if width * height <= EXPANSION_FREE_PIXELS:
        return
    decoded = 3 * width * height
    if decoded > MAX_EXPANSION * n_bytes:
        raise ImageDecodeError(
            f"decompression bomb: {n_bytes} bytes would decode to {width} x {height} pixels "
            f"({decoded // n_bytes} x), the limit is {MAX_EXPANSION} x its size"
        )


def describe_failure(exc: BaseException) -> str:
    """One short line for an unexpected decoder exception (the server log keeps its trace)."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return f"{type(exc).__name__}: {text[:MAX_REASON_CHARS]}"


def orientation_of(image: Image.Image) -> int:
    """The EXIF orientation (1 = as stored), read before decoding."""
    try:
        value = int(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a corrupt EXIF block is ignored, as ImageOps.exif_transpose does
        return 1
    return value if value in _TRANSPOSE_OF_ORIENTATION else 1


def stored_target(image: Image.Image, target: tuple[int, int], orientation: int) -> tuple[int, int]:
    """`target` (width, height, upright) in the file's stored orientation."""
    return (target[1], target[0]) if orientation in _SWAPPING_ORIENTATIONS else target


def reduction_factor(size: tuple[int, int], target: tuple[int, int]) -> int:
    """The box-reduction that keeps at least REDUCING_GAP x `target` on both sides."""
    return max(1, min(size[0] // (REDUCING_GAP * target[0]), size[1] // (REDUCING_GAP * target[1])))


def reduce_in_strips(image: Image.Image, factor: int, to_rgb) -> Image.Image:
    """`to_rgb(image).reduce(factor)`, converted strip by strip so that no full-size RGB(A)
    copy exists; strips are whole multiples of `factor` rows, so the result is the same."""
    if factor == 1:
        return to_rgb(image)
    width, height = image.size
    out = Image.new("RGB", (-(-width // factor), -(-height // factor)))
    rows = factor * max(1, STRIP_PIXELS // (width * factor))
    for top in range(0, height, rows):
        strip = to_rgb(image.crop((0, top, width, min(height, top + rows))))
        out.paste(strip.reduce(factor), (0, top // factor))
    return out


def decode_reduced(image: Image.Image, target: tuple[int, int], to_rgb) -> Image.Image:
    """Decode a large image into RGB at no less than REDUCING_GAP x `target` (width, height,
    upright, before any crop), EXIF orientation applied. Memory: the decoder's native buffer
    (after JPEG draft scaling) plus one strip."""
    orientation = orientation_of(image)
    stored = stored_target(image, target, orientation)
    if image.format == "JPEG":
        image.draft(image.mode if image.mode in ("RGB", "L", "CMYK") else "RGB",
                    (REDUCING_GAP * stored[0], REDUCING_GAP * stored[1]))
    image.load()
    reduced = reduce_in_strips(image, reduction_factor(image.size, stored), to_rgb)
    if orientation != 1:
        reduced = reduced.transpose(_TRANSPOSE_OF_ORIENTATION[orientation])
    return reduced
