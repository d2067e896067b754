"""The feature cache on S3 (a real moto server) keeps the folder cache's promises."""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from ecg_mlflow.model.backbones import get_spec
from ecg_mlflow.config import ConfigError, parse_train_config
from ecg_mlflow.model.features import FeatureCache, FeatureKey, extract_features
from ecg_mlflow.data.hashing import sha256_hex
from ecg_mlflow.model import cache_store
from ecg_mlflow.model.cache_store import CacheStoreError

KEY = FeatureKey("vgg16", "none", 32, 32, "none")
DIM = get_spec(KEY.arch).feature_dim
N_IMAGES = 6


class CountingExtractor:
    """Stands in for the backbone: features from the pixels, and a count of images passed
    (the blank rows that pad a short last batch to the batch size are not images)."""

    def __init__(self):
        self.images = 0
        self.lock = threading.Lock()

    def predict_on_batch(self, pixels: np.ndarray) -> np.ndarray:
        with self.lock:
            self.images += int(pixels.reshape(len(pixels), -1).any(axis=1).sum())
        means = pixels.reshape(len(pixels), -1).mean(axis=1, keepdims=True)
        return np.repeat(means, DIM, axis=1) + np.arange(DIM, dtype=np.float32)


@pytest.fixture()
def s3_env(s3_server, monkeypatch):
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    return s3_server


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> dict[str, object]:
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    paths = {}
    for k in range(N_IMAGES):
        path = folder / f"img{k}.png"
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(path)
        paths[sha256_hex(path.read_bytes())] = path
    return paths


def objects(s3_server, prefix: str) -> dict[str, bytes]:
    client = s3_server.client()
    listed = client.list_objects_v2(Bucket=s3_server.bucket, Prefix=prefix).get("Contents", [])
    return {o["Key"]: client.get_object(Bucket=s3_server.bucket, Key=o["Key"])["Body"].read() for o in listed}


def test_round_trip_keeps_the_folder_layout_under_the_prefix(s3_env):
    cache = FeatureCache(f"s3://{s3_env.bucket}/round-trip/", KEY)
    sha = "ab" * 32
    assert cache.load(sha) is None and not cache.has_entry(sha)
    vector = np.linspace(0, 1, DIM, dtype=np.float32)
    cache.store(sha, vector)
    np.testing.assert_array_equal(cache.load(sha), vector)
    stored = objects(s3_env, "round-trip/")
    base = f"round-trip/{KEY.arch}/{KEY.digest}"
    assert set(stored) == {f"{base}/key.json", f"{base}/ab/{sha}.f32"}
    assert len(stored[f"{base}/ab/{sha}.f32"]) == DIM * 4 + 32  # features + SHA-256 trailer


def test_damaged_objects_are_recomputed_not_trusted(s3_env, images):
    url = f"s3://{s3_env.bucket}/damaged"
    first = CountingExtractor()
    clean, stats = extract_features(images, KEY, url, build_extractor=lambda: first)
    assert (stats.misses, first.images) == (N_IMAGES, N_IMAGES)

    flipped, truncated = sorted(images)[:2]
    client, base = s3_env.client(), f"damaged/{KEY.arch}/{KEY.digest}"
    blob = bytearray(client.get_object(Bucket=s3_env.bucket, Key=f"{base}/{flipped[:2]}/{flipped}.f32")["Body"].read())
    blob[10] ^= 0xFF  # length right, checksum wrong
    client.put_object(Bucket=s3_env.bucket, Key=f"{base}/{flipped[:2]}/{flipped}.f32", Body=bytes(blob))
    client.put_object(Bucket=s3_env.bucket, Key=f"{base}/{truncated[:2]}/{truncated}.f32", Body=bytes(blob[:100]))

    second = CountingExtractor()
    again, stats = extract_features(images, KEY, url, build_extractor=lambda: second)
    assert (stats.damaged, stats.misses, stats.hits, second.images) == (2, 2, N_IMAGES - 2, 2)
    for sha in images:
        np.testing.assert_array_equal(again[sha], clean[sha])
    _, stats = extract_features(images, KEY, url, build_extractor=lambda: pytest.fail("all cached"))
    assert (stats.hits, stats.misses, stats.damaged) == (N_IMAGES, 0, 0)


def test_two_caches_writing_the_same_entries_at_once_leave_every_entry_sound(s3_env, images):
    url = f"s3://{s3_env.bucket}/concurrent"
    extractors = [CountingExtractor(), CountingExtractor()]
    results, start = [None, None], threading.Barrier(2)

    def fill(k: int) -> None:
        start.wait()
        results[k] = extract_features(images, KEY, url, build_extractor=lambda: extractors[k])

    threads = [threading.Thread(target=fill, args=(k,)) for k in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert all(r is not None for r in results)
    for sha in images:
        np.testing.assert_array_equal(results[0][0][sha], results[1][0][sha])
    fresh = FeatureCache(url, KEY)
    for sha in images:
        np.testing.assert_array_equal(fresh.load(sha), results[0][0][sha])
    stored = objects(s3_env, "concurrent/")
    assert len(stored) == N_IMAGES + 1  # one object per content, and key.json


def test_a_missing_bucket_fails_with_one_line_naming_cache_dir(s3_env):
    with pytest.raises(CacheStoreError, match=r"cache_dir s3://no-such-bucket/x.*create it"):
        FeatureCache("s3://no-such-bucket/x", KEY)


def test_cache_dir_accepts_folders_and_s3_urls_only():
    assert parse_train_config(cache_dir="s3://ecg-cache/features").cache_dir == "s3://ecg-cache/features"
    assert parse_train_config(cache_dir="/tmp/features").cache_dir == "/tmp/features"
    for bad, message in (("s3://", "names no bucket"), ("s3://Bad_Bucket/x", "no S3 bucket name"),
                         ("gs://bucket/x", "folder or an s3://bucket/prefix URL")):
        with pytest.raises(ConfigError, match=message):
            parse_train_config(cache_dir=bad)


def test_an_unreachable_endpoint_fails_with_one_line_naming_it(s3_env, monkeypatch):
    monkeypatch.setattr(cache_store, "S3_ATTEMPTS", 1)
    monkeypatch.setenv("MLFLOW_S3_ENDPOINT_URL", "http://127.0.0.1:9")  # discard port: refused
    with pytest.raises(CacheStoreError, match=r"cannot reach S3 at http://127.0.0.1:9 .*MLFLOW_S3_ENDPOINT_URL"):
        cache_store.open_store(f"s3://{s3_env.bucket}/x", "vgg16")
