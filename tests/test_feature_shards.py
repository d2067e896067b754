"""`ecg-mlflow features --shard I/N`: real CLI processes sharing one S3 cache (moto)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from conftest import PROJECT_ROOT
from ecg_mlflow.cli import main
from ecg_mlflow.data.manifest import unique_contents
from ecg_mlflow.model.features import select_shard, shard_of
from ecg_mlflow.data.hashing import sha256_hex

REPORT = re.compile(r"shard (\d+)/(\d+): (\d+) of (\d+) unique images; (\d+) computed, (\d+) cached, (\d+) damaged")
TINY = ("--arch", "vgg16", "--weights", "none", "--image-height", "32", "--image-width", "32")


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """Small synthetic reports with byte-identical copies, made by the real `synth` command."""
    out = tmp_path_factory.mktemp("shards") / "data"
    result = CliRunner().invoke(main, ["synth", "--out", str(out), "--per-class", "5", "--width", "256",
                                       "--height", "182", "--duplicates", "0.4", "--no-progress"])
    assert result.exit_code == 0, result.output
    return out


def features_process(data, cache_dir: str, shard: str, env: dict[str, str]) -> subprocess.Popen:
    """The real CLI in its own process, as a Job would run it."""
    return subprocess.Popen(
        [sys.executable, "-m", "ecg_mlflow", "features", "--data", str(data), "--cache-dir", cache_dir,
         "--shard", shard, *TINY],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=PROJECT_ROOT,
        env={**os.environ, **env, "TF_CPP_MIN_LOG_LEVEL": "3"},
    )


def report_of(process: subprocess.Popen) -> dict[str, int]:
    """Wait for a features process; its one report line as numbers."""
    stdout, stderr = process.communicate(timeout=600)
    assert process.returncode == 0, stderr[-3000:]
    match = REPORT.search(stdout)
    assert match, stdout
    keys = ("index", "count", "shard", "unique", "computed", "cached", "damaged")
    return dict(zip(keys, map(int, match.groups())))


def test_two_shards_pass_each_unique_image_once_then_everything_is_cached(synthetic, s3_server):
    unique = unique_contents(synthetic)
    files = sum(1 for p in synthetic.rglob("*.jpg"))
    assert len(unique) < files  # the copies must not be computed twice
    cache, env = f"s3://{s3_server.bucket}/shards", s3_server.env()
    processes = [features_process(synthetic, cache, f"{k}/2", env) for k in range(2)]  # at once
    reports = [report_of(process) for process in processes]
    assert [r["unique"] for r in reports] == [len(unique)] * 2
    assert sum(r["computed"] for r in reports) == len(unique)  # one backbone pass per unique image
    assert [r["computed"] for r in reports] == [r["shard"] for r in reports]
    shards = [set(select_shard(unique, k, 2)) for k in range(2)]
    assert not shards[0] & shards[1] and shards[0] | shards[1] == set(unique)
    assert [len(s) for s in shards] == [r["shard"] for r in reports]

    listed = s3_server.client().list_objects_v2(Bucket=s3_server.bucket, Prefix="shards/")["Contents"]
    stored = {o["Key"].rsplit("/", 1)[-1].removesuffix(".f32") for o in listed if o["Key"].endswith(".f32")}
    assert stored == set(unique)

    everything = report_of(features_process(synthetic, cache, "0/1", env))
    assert (everything["computed"], everything["cached"]) == (0, len(unique))


def test_the_features_command_fills_what_a_train_run_of_its_engine_reads(synthetic, tmp_path):
    """`--engine keras` (not the default): the entries land under train's key for that engine,
    features and region maps both, so such a run passes no image; the default engine's key
    stays empty."""
    from ecg_mlflow.config import DEFAULT_ENGINE, parse_train_config
    from ecg_mlflow.model.features import FeatureCache
    from ecg_mlflow.model.region_cache import extract_features_and_region_maps

    result = CliRunner().invoke(main, ["features", "--data", str(synthetic), "--cache-dir", str(tmp_path),
                                       "--engine", "keras", *TINY])
    assert result.exit_code == 0, result.output
    unique = unique_contents(synthetic)
    assert REPORT.search(result.output).group(5) == str(len(unique))
    tiny = dict(zip((k.lstrip("-").replace("-", "_") for k in TINY[::2]), TINY[1::2]))
    key = parse_train_config(**tiny, engine="keras").feature_key()
    _, region_maps, stats = extract_features_and_region_maps(unique, key, tmp_path)
    assert (stats.misses, stats.hits, len(region_maps)) == (0, len(unique), len(unique))
    assert DEFAULT_ENGINE != "keras"
    default = FeatureCache(tmp_path, parse_train_config(**tiny).feature_key())
    assert not any(default.has_entry(sha) for sha in unique)


def test_shards_are_stable_and_cover_every_content_once():
    shas = [sha256_hex(str(k).encode()) for k in range(1000)]
    for count in (1, 2, 7):
        owners = [shard_of(sha, count) for sha in shas]
        assert owners == [shard_of(sha, count) for sha in shas]
        assert set(owners) == set(range(count))
        assert max(owners.count(k) for k in range(count)) < 1.25 * len(shas) / count  # even sizes
    assert shard_of("ff" * 32, 4) == int("ff" * 8, 16) % 4


@pytest.mark.parametrize("shard, message", [
    ("3/2", "shard '3/2': I/N needs N >= 1 and 0 <= I < N"),
    ("0/0", "shard '0/0': I/N needs N >= 1"),
    ("1", "shard must look like I/N"),
    ("-1/2", "shard must look like I/N"),
])
def test_bad_shards_fail_with_one_line_and_exit_2(synthetic, shard, message):
    result = CliRunner().invoke(main, ["features", "--data", str(synthetic), "--shard", shard, *TINY])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
