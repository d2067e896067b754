"""Content hashes: SHA-256 for identity, a difference hash (dHash) tuned for ECG reports.

Why not the textbook 8 x 8 dHash of the whole page: every report has the same layout
(header, pink grid, lead labels, calibration pulses), so on the 491 unique real reports the
whole-page 64-bit dHash puts different reports at Hamming distance 0, and a 16 x 16 one at
distance 5 while a re-encoded copy drifts up to 45. Mostly-white cells compare as near-ties
and flip with any re-encoding. What tells reports apart is where the traces run.

So the hash here is a dHash of an *ink map* of the trace grid:
  1. decode cheaply as grayscale (JPEG `draft()` DCT scaling, to at least WORK_SIZE),
     apply EXIF orientation, crop the trace grid (preprocess.GRID_BOX), resize to WORK_SIZE;
  2. ink = max(0, INK_LEVEL - gray): the pink grid (gray ~235) and the paper become exactly
     0, only the traces and labels stay, so blank cells no longer flip at random;
  3. area-average to (HASH_WIDTH + 1) x HASH_HEIGHT cells, one bit per horizontally adjacent
     pair: right cell darker than left by more than MARGIN; 64 x 16 = 1024 bits.

Measured on the real data (ecg-images, 491 unique reports, 120,295 pairs of distinct
reports) the distance between two different reports is at least 85 (0.1 percentile 130,
median 223). Between copies of one report: the 8 untouched 2213 x 1572 originals and their
half-size quality-85 copies in ecg-images at most 56; a quality-50 re-encode at most 7. A
threshold of 64 separates the two: no pair of distinct real reports is near, every real
re-encoded/resized copy is. Limitation, measured too: a copy rescaled by an odd factor with
another resampler (0.9x bilinear) or decoded through a different path (PNG round trip) can
drift to 70..140 and then counts as distinct.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageOps

from ecg_mlflow.data.near_duplicates import near_pairs_packed
from ecg_mlflow.data.preprocess import crop_box, to_rgb

WORK_SIZE: tuple[int, int] = (288, 204)
INK_LEVEL: float = 200.0
HASH_WIDTH: int = 64
HASH_HEIGHT: int = 16
MARGIN: float = 1.0
HASH_BITS: int = HASH_WIDTH * HASH_HEIGHT

NEAR_DUPLICATE_DISTANCE: int = 64
"""dHash Hamming distance (of HASH_BITS) at or below which two images are the same report;
chosen from the measured gap between copies (<= 56) and distinct reports (>= 85), see above."""

_CHUNK_ROWS = 128


def sha256_hex(data: bytes) -> str:
    """Hex SHA-256 of the file bytes: the identity of an image's content."""
    return hashlib.sha256(data).hexdigest()


def dhash(image: Image.Image) -> str:
    """Ink-map dHash (hex, HASH_BITS bits) of a lazily opened image; decodes it cheaply.

    The image must not be loaded yet (so JPEG `draft()` can still cut the decoding cost);
    decoding errors propagate as the caller's decoder raises them.
    """
    if image.format == "JPEG":
        image.draft("L", WORK_SIZE)
    image.load()
    image = ImageOps.exif_transpose(image)
    if image.mode not in ("L", "RGB"):
        image = to_rgb(image)
    gray = image.convert("L").crop(crop_box(image.size, "grid")).resize(WORK_SIZE, Image.Resampling.BOX)
    ink = np.clip(INK_LEVEL - np.asarray(gray, dtype=np.float32), 0.0, None)
    cells = np.asarray(
        Image.fromarray(ink, mode="F").resize((HASH_WIDTH + 1, HASH_HEIGHT), Image.Resampling.BOX)
    )
    bits = (cells[:, 1:] - cells[:, :-1]) > MARGIN
    return np.packbits(bits.ravel()).tobytes().hex()


def hash_matrix(hashes: Sequence[str]) -> np.ndarray:
    """Hex hashes as a (n, bytes) uint8 array, ready for `hamming`."""
    if not hashes:
        return np.zeros((0, HASH_BITS // 8), dtype=np.uint8)
    return np.frombuffer(b"".join(bytes.fromhex(h) for h in hashes), dtype=np.uint8).reshape(len(hashes), -1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """All pairwise Hamming distances between rows of `a` and rows of `b` (hash matrices)."""
    out = np.empty((len(a), len(b)), dtype=np.int32)
    for start in range(0, len(a), _CHUNK_ROWS):
        block = a[start : start + _CHUNK_ROWS, None, :] ^ b[None, :, :]
        out[start : start + _CHUNK_ROWS] = np.bitwise_count(block).sum(axis=-1, dtype=np.int32)
    return out


def hash_distance(a: str, b: str) -> int:
    """Hamming distance between two hex hashes."""
    return int(hamming(hash_matrix([a]), hash_matrix([b]))[0, 0])


def near_pairs(hashes: Sequence[str], threshold: int = NEAR_DUPLICATE_DISTANCE) -> list[tuple[int, int]]:
    """Index pairs (i < j), sorted, whose hashes lie within `threshold` of each other.

    Multi-index hashing (ecg_mlflow.data.near_duplicates): exact, and bounded in memory
    where the all-pairs matrix of 100,000 hashes would need about 40 GiB."""
    return near_pairs_packed(hash_matrix(hashes), threshold)


def _reference_near_pairs(hashes: Sequence[str], threshold: int = NEAR_DUPLICATE_DISTANCE) -> list[tuple[int, int]]:
    """The all-pairs search near_pairs replaced (quadratic time and memory): the reference
    its tests and the scaling benchmark compare against."""
    matrix = hash_matrix(hashes)
    distances = hamming(matrix, matrix)
    i, j = np.nonzero(np.triu(distances <= threshold, k=1))
    return list(zip(i.tolist(), j.tolist()))
