"""Feature cache: the frozen backbone runs once per unique image content.

An entry is addressed by the image's SHA-256 under a folder keyed by everything that
changes the features (backbone, weights, preprocessing, engine and precision, Keras
version and backend). Each entry holds the float32 features followed by the SHA-256 of those bytes and is
published atomically; it is recomputed when its length or checksum is wrong, so a damaged entry is never trusted.
The bytes live in a folder or under an S3 prefix (`cache_dir=s3://bucket/prefix`), with the
same layout (arch/digest/sha[:2]/sha.f32 and key.json); ecg_mlflow.model.cache_store says how
each store publishes atomically and cleans up after killed writers. Entries are content
addressed, so any number of processes and machines may fill one cache at once.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ecg_mlflow.model.backbones import get_spec, weights_identity
from ecg_mlflow.model.cache_store import CacheStore, is_s3_url, open_store
from ecg_mlflow.model.engines import extractor_runner
from ecg_mlflow.data.preprocess import load_pixels

FEATURE_BATCH_SIZE = 8
DECODE_WORKERS = max(1, min(4, os.cpu_count() or 1))
"""Threads decoding and resizing images while the backbone runs (PIL releases the GIL): a
2213 x 1572 original takes about as long to decode as a fast engine's pass over it."""
PREFETCH_BATCHES = 2
"""Batches decoded ahead of the backbone: bounds the memory of decoded pixels."""
_CHECKSUM_BYTES = 32
KEY_FILE = "key.json"
LOAD_CHUNK = 1024
"""Entries read at once: enough to keep S3 busy, few enough that raw bytes stay small."""
CACHE_ENV = "ECG_MLFLOW_CACHE_DIR"


def default_cache_dir() -> str | Path:
    """`$ECG_MLFLOW_CACHE_DIR` (a folder or an s3:// URL), else the user cache folder
    (`$XDG_CACHE_HOME` or ~/.cache)."""
    if os.environ.get(CACHE_ENV):
        value = os.environ[CACHE_ENV]
        return value if is_s3_url(value) else Path(value)
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "ecg-mlflow" / "features"


@dataclass(frozen=True)
class FeatureKey:
    """Everything that changes what the backbone outputs for given image bytes."""

    arch: str
    weights: str
    height: int
    width: int
    crop: str
    engine: str = "keras"
    precision: str = "fp32"

    def fields(self) -> dict[str, object]:
        import keras

        from ecg_mlflow.model.backend import backend_name

        fields: dict[str, object] = {
            "arch": self.arch,
            "weights": weights_identity(self.weights, self.arch),
            "height": self.height,
            "width": self.width,
            "crop": self.crop,
            "keras": keras.__version__,
            "pass": "predict_on_batch",  # features of eager calls differ in the last digits
        }
        # TensorFlow and JAX kernels round differently; TensorFlow keeps the key it had before
        # backends were chosen, so its caches stay valid.
        backend = backend_name()
        if backend != "tensorflow":
            fields["backend"] = backend
        # Keras fp32 keeps the key it had before engines existed, so its caches stay valid.
        if (self.engine, self.precision) != ("keras", "fp32"):
            fields.update(engine=self.engine, precision=self.precision)
        if self.engine == "openvino":
            import openvino

            fields["openvino"] = openvino.__version__
        return fields

    @property
    def digest(self) -> str:
        blob = json.dumps(self.fields(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:20]


@dataclass(frozen=True)
class CacheStats:
    """What one extraction did: hits, misses (backbone passes), damaged entries, seconds."""

    hits: int
    misses: int
    damaged: int
    seconds: float


class FeatureCache:
    """Content-addressed store of pooled features for one FeatureKey, in a folder or on S3."""

    def __init__(self, root: str | Path, key: FeatureKey):
        self.key = key
        self.dim = get_spec(key.arch).feature_dim
        self.backend: CacheStore = open_store(root, f"{key.arch}/{key.digest}")
        if not self.backend.exists(KEY_FILE):
            self.backend.write(KEY_FILE, json.dumps(key.fields(), indent=2, sort_keys=True).encode())

    @property
    def folder(self) -> Path:
        """The folder of a folder-backed cache (an S3-backed one has none)."""
        return self.backend.folder

    @staticmethod
    def entry_name(sha256: str) -> str:
        return f"{sha256[:2]}/{sha256}.f32"

    def entry_path(self, sha256: str) -> Path:
        """The file of an entry in a folder-backed cache."""
        return self.backend.path(self.entry_name(sha256))

    def has_entry(self, sha256: str) -> bool:
        """Whether an entry exists at all, sound or not."""
        return self.backend.exists(self.entry_name(sha256))

    def load(self, sha256: str) -> np.ndarray | None:
        """The cached features, or None if absent or damaged."""
        return self.decode(self.backend.read(self.entry_name(sha256)))

    def read_entries(self, shas: Sequence[str]) -> list[bytes | None]:
        """The raw entries (None where absent), fetched concurrently where the store is remote;
        `decode` tells a sound entry from a damaged one."""
        return self.backend.read_many([self.entry_name(s) for s in shas])

    def decode(self, blob: bytes | None) -> np.ndarray | None:
        """Features from an entry's bytes; None unless length and checksum are right."""
        if blob is None:
            return None
        body, checksum = blob[:-_CHECKSUM_BYTES], blob[-_CHECKSUM_BYTES:]
        if len(body) != self.dim * 4 or hashlib.sha256(body).digest() != checksum:
            return None
        return np.frombuffer(body, dtype=np.float32).copy()

    def store(self, sha256: str, features: np.ndarray) -> None:
        body = np.ascontiguousarray(features, dtype=np.float32).tobytes()
        if len(body) != self.dim * 4:
            raise ValueError(f"features of {sha256} have {len(body) // 4} values, expected {self.dim}")
        self.backend.write(self.entry_name(sha256), body + hashlib.sha256(body).digest())


def shard_of(sha256: str, count: int) -> int:
    """The shard (0..count-1) of an image content: stable across runs, machines and data
    folders, and even in size, since SHA-256 values are uniform."""
    return int(sha256[:16], 16) % count


def select_shard(paths_by_sha: dict[str, Path], index: int, count: int) -> dict[str, Path]:
    """The contents of shard `index` of `count`: N processes with shards 0..N-1 together
    cover every content exactly once."""
    return {sha: path for sha, path in paths_by_sha.items() if shard_of(sha, count) == index}


def key_extractor(key: FeatureKey):
    """The process-wide frozen extractor that computes `key`'s features: its layers in
    bfloat16 (Keras' mixed_bfloat16) for engine=keras at bf16, else in float32, which
    OpenVINO compiles at the key's precision itself."""
    from ecg_mlflow.model.backbones import shared_feature_extractor

    precision = key.precision if key.engine == "keras" else "fp32"
    return shared_feature_extractor(key.arch, key.weights, key.height, key.width, precision)


def extract_features(
    paths_by_sha: dict[str, Path],
    key: FeatureKey,
    cache_dir: str | Path,
    *,
    build_extractor: Callable | None = None,
    progress: bool = False,
) -> tuple[dict[str, np.ndarray], CacheStats]:
    """Features for every unique image (sha256 -> path), from the cache where possible.

    The backbone is built only when something is missing, and runs once per missing
    content hash, in batches, through the key's engine at its precision. Returns the
    features by sha256 and what the cache did.
    """
    start = time.perf_counter()
    cache = FeatureCache(cache_dir, key)
    features: dict[str, np.ndarray] = {}
    missing: list[str] = []
    damaged = 0
    shas = sorted(paths_by_sha)
    for first in range(0, len(shas), LOAD_CHUNK):
        chunk = shas[first : first + LOAD_CHUNK]
        for sha, blob in zip(chunk, cache.read_entries(chunk)):
            cached = cache.decode(blob)
            if cached is None:
                damaged += blob is not None
                missing.append(sha)
            else:
                features[sha] = cached
    if missing:
        extractor = key_extractor(key) if build_extractor is None else build_extractor()
        runner = extractor_runner(extractor, key.engine, key.precision)
        for sha, vector in _run_backbone(runner, missing, paths_by_sha, key, progress):
            cache.store(sha, vector)
            features[sha] = vector
    stats = CacheStats(
        hits=len(paths_by_sha) - len(missing),
        misses=len(missing),
        damaged=damaged,
        seconds=time.perf_counter() - start,
    )
    return features, stats


def _run_backbone(extractor, shas: Sequence[str], paths_by_sha, key: FeatureKey, progress: bool):
    """Yield (sha, features) batch by batch."""
    for batch, pixels in decoded_batches(shas, paths_by_sha, key, progress, f"{key.arch} features"):
        # Graph mode, as Keras' predict runs the logged model: eager calls round
        # differently (~1e-5 on EfficientNetV2-S at 512 x 1024).
        out = np.asarray(extractor.predict_on_batch(_pad_batch(pixels)))[: len(batch)]
        yield from zip(batch, out)


def decoded_batches(shas: Sequence[str], paths_by_sha, key: FeatureKey, progress: bool, desc: str):
    """Yield (shas, float32 pixels) per FEATURE_BATCH_SIZE batch, with a progress bar.
    DECODE_WORKERS threads decode and resize the images of the next PREFETCH_BATCHES batches
    while the caller runs the backbone on this one."""
    from tqdm import tqdm

    def decode(sha: str) -> np.ndarray:
        return load_pixels(paths_by_sha[sha], key.height, key.width, key.crop)

    batches = [shas[i : i + FEATURE_BATCH_SIZE] for i in range(0, len(shas), FEATURE_BATCH_SIZE)]
    bar = tqdm(total=len(shas), desc=desc, unit="img", disable=not progress)
    with ThreadPoolExecutor(max_workers=DECODE_WORKERS, thread_name_prefix="decode") as pool:
        pending: deque = deque()
        upcoming = iter(batches)

        def submit_next() -> None:
            following = next(upcoming, None)
            if following is not None:
                pending.append([pool.submit(decode, sha) for sha in following])

        for _ in range(PREFETCH_BATCHES + 1):
            submit_next()
        for batch in batches:
            # The same float32 batch as load_batch (which the whole-model check uses).
            pixels = np.stack([future.result() for future in pending.popleft()]).astype(np.float32)
            submit_next()
            yield batch, pixels
            bar.update(len(batch))
    bar.close()


def _pad_batch(pixels: np.ndarray) -> np.ndarray:
    """Pad a short last batch to FEATURE_BATCH_SIZE with blank images: the CPU kernels round
    differently at different batch sizes (last bits, ~2e-7), so an image's features would
    depend on how many others happened to be missing from the cache with it."""
    short = FEATURE_BATCH_SIZE - len(pixels)
    if short <= 0:
        return pixels
    return np.concatenate([pixels, np.zeros((short, *pixels.shape[1:]), pixels.dtype)])
