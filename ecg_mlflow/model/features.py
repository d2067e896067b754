"""Feature cache: the frozen backbone runs once per unique image content.

An entry is addressed by the image's SHA-256 under a folder keyed by everything that
changes the features (backbone, weights, preprocessing, Keras version and backend). Each entry holds
the float32 features followed by the SHA-256 of those bytes, is written to a temporary
file and renamed into place (atomic), and is recomputed when its length or checksum is
wrong, so a damaged entry is never trusted. A process killed mid-write (SIGKILL, power
loss) can leave a `.*.tmp` file behind: nothing ever reads one, and opening the cache
removes those older than an hour (no write takes that long), so they cannot pile up.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from ecg_mlflow.model.backbones import get_spec, weights_identity
from ecg_mlflow.data.preprocess import load_batch

FEATURE_BATCH_SIZE = 8
_CHECKSUM_BYTES = 32
STALE_TMP_SECONDS = 3600
CACHE_ENV = "ECG_MLFLOW_CACHE_DIR"


def default_cache_dir() -> Path:
    """`$ECG_MLFLOW_CACHE_DIR`, else the user cache folder (`$XDG_CACHE_HOME` or ~/.cache)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
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

    def fields(self) -> dict[str, object]:
        import keras

        from ecg_mlflow.model.backend import backend_name

        return {
            "arch": self.arch,
            "weights": weights_identity(self.weights, self.arch),
            "height": self.height,
            "width": self.width,
            "crop": self.crop,
            "keras": keras.__version__,
            "backend": backend_name(),  # TensorFlow and JAX kernels round differently
            "pass": "predict_on_batch",  # features of eager calls differ in the last digits
        }

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
    """Content-addressed store of pooled features for one FeatureKey."""

    def __init__(self, root: str | Path, key: FeatureKey):
        self.key = key
        self.dim = get_spec(key.arch).feature_dim
        self.folder = Path(root) / key.arch / key.digest
        self.folder.mkdir(parents=True, exist_ok=True)
        remove_stale_tmp(self.folder)
        meta = self.folder / "key.json"
        if not meta.exists():
            _atomic_write(meta, json.dumps(key.fields(), indent=2, sort_keys=True).encode())

    def entry_path(self, sha256: str) -> Path:
        return self.folder / sha256[:2] / f"{sha256}.f32"

    def load(self, sha256: str) -> np.ndarray | None:
        """The cached features, or None if absent or damaged."""
        path = self.entry_path(sha256)
        try:
            blob = path.read_bytes()
        except FileNotFoundError:
            return None
        body, checksum = blob[:-_CHECKSUM_BYTES], blob[-_CHECKSUM_BYTES:]
        if len(body) != self.dim * 4 or hashlib.sha256(body).digest() != checksum:
            return None
        return np.frombuffer(body, dtype=np.float32).copy()

    def store(self, sha256: str, features: np.ndarray) -> None:
        body = np.ascontiguousarray(features, dtype=np.float32).tobytes()
        if len(body) != self.dim * 4:
            raise ValueError(f"features of {sha256} have {len(body) // 4} values, expected {self.dim}")
        path = self.entry_path(sha256)
        path.parent.mkdir(parents=True, exist_ok=True)
        _atomic_write(path, body + hashlib.sha256(body).digest())


def remove_stale_tmp(folder: Path, max_age_s: float = STALE_TMP_SECONDS) -> int:
    """Delete the temporary files of writes killed more than `max_age_s` ago; return how many.

    A younger one may belong to a write in progress in another process, so it stays."""
    cutoff = time.time() - max_age_s
    removed = 0
    for tmp in [*folder.glob(".*.tmp"), *folder.glob("*/.*.tmp")]:
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                removed += 1
        except FileNotFoundError:  # another process cleaned it first
            pass
    return removed


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    content hash, in batches. Returns the features by sha256 and what the cache did.
    """
    start = time.perf_counter()
    cache = FeatureCache(cache_dir, key)
    features: dict[str, np.ndarray] = {}
    missing: list[str] = []
    damaged = 0
    for sha in sorted(paths_by_sha):
        cached = cache.load(sha)
        if cached is None:
            damaged += cache.entry_path(sha).exists()
            missing.append(sha)
        else:
            features[sha] = cached
    if missing:
        if build_extractor is None:
            from ecg_mlflow.model.backbones import shared_feature_extractor

            extractor = shared_feature_extractor(key.arch, key.weights, key.height, key.width)
        else:
            extractor = build_extractor()
        for sha, vector in _run_backbone(extractor, missing, paths_by_sha, key, progress):
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
    """Yield (sha, features) batch by batch; decoding of the next batch overlaps the pass."""
    from tqdm import tqdm

    def decode(batch: Sequence[str]) -> np.ndarray:
        return load_batch([paths_by_sha[s] for s in batch], key.height, key.width, key.crop)

    batches = [shas[i : i + FEATURE_BATCH_SIZE] for i in range(0, len(shas), FEATURE_BATCH_SIZE)]
    bar = tqdm(
        total=len(shas), desc=f"{key.arch} features", unit="img", disable=not progress
    )
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(decode, batches[0])
        for index, batch in enumerate(batches):
            pixels = pending.result()
            if index + 1 < len(batches):
                pending = pool.submit(decode, batches[index + 1])
            # Graph mode, as Keras' predict runs the logged model: eager calls round
            # differently (~1e-5 on EfficientNetV2-S at 512 x 1024).
            out = np.asarray(extractor.predict_on_batch(_pad_batch(pixels)))[: len(batch)]
            for sha, vector in zip(batch, out):
                yield sha, vector
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
