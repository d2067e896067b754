"""Region-pooled maps made in the feature pass and cached beside the features.

`extract_features_and_region_maps` is `features.extract_features` with a second product:
where an image misses either cache, ONE backbone pass (the extractor split before its global
average pooling, explain.build_maps_model) yields the pooled features and the last
convolution's maps, and the maps are reduced at once to (regions x channels) region-pooled
maps (regions.pool_by_region), about 80 KB an image. Those explain any head of any seed by
region (regions.py) without another backbone pass.

The region-map cache is a FeatureCache (folder or S3) inside the features' own (same key: backbone,
weights, size, crop, engine and precision, Keras), named by the template's digest, so a changed template never
reuses old maps; the same checksummed atomic entries. A few images (the overlay sample of
every run) also keep their FULL maps, in a third folder of the same kind, so that the
overlay pictures of a 20-run study cost one backbone pass for those images, not twenty; where
the caller names them (`full_maps_of`), that is the feature pass itself, not a pass of its own.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Callable, Collection, Sequence

import numpy as np

from ecg_mlflow.model import regions
from ecg_mlflow.model.backbones import get_spec
from ecg_mlflow.model.cache_store import open_store
from ecg_mlflow.model.engines import maps_model_of, maps_runner
from ecg_mlflow.model.features import (
    _CHECKSUM_BYTES, KEY_FILE, LOAD_CHUNK, CacheStats, FeatureCache, FeatureKey, _pad_batch, decoded_batches,
    key_extractor,
)

_SHAPE_VALUES = 3  # a full-map entry starts with its (h, w, k)


class RegionMapCache(FeatureCache):
    """Region-pooled maps (regions x feature_dim float32) of one FeatureKey and template, in
    the same store (folder or S3) as the features."""

    def __init__(self, root: str | Path, key: FeatureKey):
        self.key = key
        self.dim = len(regions.REGIONS) * get_spec(key.arch).feature_dim
        self.backend = open_store(root, f"{key.arch}/{key.digest}/regions-{regions.template_digest()}")
        if not self.backend.exists(KEY_FILE):
            fields = {**key.fields(), **regions.template_fields()}
            self.backend.write(KEY_FILE, json.dumps(fields, indent=2, sort_keys=True).encode())


class FullMapCache(FeatureCache):
    """Full last-conv maps (h, w, k) of a few images; the shape travels in the entry."""

    def __init__(self, root: str | Path, key: FeatureKey):
        self.key = key
        self.dim = None
        self.backend = open_store(root, f"{key.arch}/{key.digest}/maps")

    def decode(self, blob: bytes | None) -> np.ndarray | None:
        if blob is None:
            return None
        body, checksum = blob[:-_CHECKSUM_BYTES], blob[-_CHECKSUM_BYTES:]
        if len(body) < 4 * _SHAPE_VALUES or hashlib.sha256(body).digest() != checksum:
            return None
        values = np.frombuffer(body, dtype=np.float32)
        shape = tuple(int(v) for v in values[:_SHAPE_VALUES])
        if int(np.prod(shape)) != len(values) - _SHAPE_VALUES:
            return None
        return values[_SHAPE_VALUES:].reshape(shape).copy()

    def store(self, sha256: str, maps: np.ndarray) -> None:
        values = np.concatenate([np.asarray(maps.shape, np.float32), np.ravel(maps).astype(np.float32)])
        body = values.tobytes()
        self.backend.write(self.entry_name(sha256), body + hashlib.sha256(body).digest())


def shared_maps_model(key: FeatureKey):
    """The maps model of the process-wide extractor of `key` (built once, like the extractor)."""
    return maps_model_of(key_extractor(key))


def extract_features_and_region_maps(
    paths_by_sha: dict[str, Path],
    key: FeatureKey,
    cache_dir: str | Path,
    *,
    build_maps_model: Callable | None = None,
    progress: bool = False,
    full_maps_of: Collection[str] = (),
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], CacheStats]:
    """Features and region-pooled maps of every unique image (sha256 -> path), from the
    caches where possible, else from one backbone pass per missing image. The images of
    `full_maps_of` that pass keep their full maps too (FullMapCache, what load_full_maps
    reads: the overlay sample, which then needs no pass of its own).

    Returns features (feature_dim,) and region maps (regions, feature_dim) by sha256, and
    what the caches did (a miss is an image that needed the backbone). Features already
    cached are kept as they are, so earlier runs' numbers do not move.
    """
    start = time.perf_counter()
    features_cache, maps_cache = FeatureCache(cache_dir, key), RegionMapCache(cache_dir, key)
    features: dict[str, np.ndarray] = {}
    region_maps: dict[str, np.ndarray] = {}
    missing: list[str] = []
    damaged = 0
    shas = sorted(paths_by_sha)
    for first in range(0, len(shas), LOAD_CHUNK):  # chunked, as extract_features reads (S3: concurrently)
        chunk = shas[first : first + LOAD_CHUNK]
        for sha, feature_blob, maps_blob in zip(chunk, features_cache.read_entries(chunk),
                                                maps_cache.read_entries(chunk)):
            vector, pooled = features_cache.decode(feature_blob), maps_cache.decode(maps_blob)
            if vector is not None:
                features[sha] = vector
            if pooled is not None:
                region_maps[sha] = pooled.reshape(len(regions.REGIONS), -1)
            if vector is None or pooled is None:
                damaged += vector is None and feature_blob is not None
                missing.append(sha)
    if missing:
        model = build_maps_model() if build_maps_model is not None else shared_maps_model(key)
        full_maps = FullMapCache(cache_dir, key) if full_maps_of else None
        for sha, maps, vector in run_maps_pass(model, missing, paths_by_sha, key, progress):
            if full_maps is not None and sha in full_maps_of:
                full_maps.store(sha, maps)
            pooled = regions.pool_by_region(maps[None], regions.region_weights(*maps.shape[:2], key.crop))[0]
            maps_cache.store(sha, pooled)
            region_maps[sha] = pooled
            if sha not in features:
                features_cache.store(sha, vector)
                features[sha] = vector
    stats = CacheStats(hits=len(paths_by_sha) - len(missing), misses=len(missing), damaged=damaged,
                       seconds=time.perf_counter() - start)
    return features, region_maps, stats


def run_maps_pass(model, shas: Sequence[str], paths_by_sha, key: FeatureKey, progress: bool = False):
    """Yield (sha, maps (h, w, k), features) batch by batch through the key's engine, padded
    as the feature pass pads (the same rounding whatever else was missing)."""
    runner = maps_runner(model, key.engine, key.precision)
    for batch, pixels in decoded_batches(shas, paths_by_sha, key, progress, f"{key.arch} features+maps"):
        maps, vectors = runner.predict_on_batch(_pad_batch(pixels))
        maps, vectors = np.asarray(maps)[: len(batch)], np.asarray(vectors)[: len(batch)]
        yield from zip(batch, maps, vectors)


def load_full_maps(
    paths_by_sha: dict[str, Path], key: FeatureKey, cache_dir: str | Path
) -> dict[str, np.ndarray]:
    """Full last-conv maps (h, w, k) of a few images (the overlay sample), cached: the
    backbone runs only for the ones a previous run has not stored."""
    cache = FullMapCache(cache_dir, key)
    found = {sha: cache.load(sha) for sha in sorted(paths_by_sha)}
    missing = [sha for sha, maps in found.items() if maps is None]
    if missing:
        for sha, maps, _ in run_maps_pass(shared_maps_model(key), missing, paths_by_sha, key):
            cache.store(sha, maps)
            found[sha] = maps
    return found
