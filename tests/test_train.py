"""One training run: the run schema, the feature cache, the model check, bad input, signals."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ecg_mlflow import schema
from ecg_mlflow.cli import main
from ecg_mlflow.config import DEFAULT_ENGINE, parse_train_config
from ecg_mlflow.model.features import FeatureCache, FeatureKey
from ecg_mlflow.model.region_cache import FullMapCache, RegionMapCache
from ecg_mlflow.data.preprocess import load_pixels
from ecg_mlflow.synth.reports import write_synthetic_dataset
from ecg_mlflow.train import train_and_log
from ecg_mlflow.model.whole_model import assemble_model, check_model_matches_head

from conftest import PROJECT_ROOT
from serving_fixtures import server_env

VENV_BIN = Path(sys.executable).parent
SCHEMA_PARAMS = (
    "arch", "seed", "data", "weights", "image_height", "image_width", "split", "crop",
    "learning_rate", "batch_size", "max_epochs", "patience", "dense_units", "dropout", "cache_dir",
    schema.PARAM_DATA_DIGEST, schema.PARAM_TEST_DIGEST, schema.PARAM_N_TRAIN, schema.PARAM_N_VAL,
    schema.PARAM_N_TEST,
)


@pytest.fixture(scope="module")
def demo_set(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "demo"
    write_synthetic_dataset(out, per_class=8, seed=0, width=442, height=314, duplicates=0.25)
    return out


def _runs(experiment: str = schema.DEFAULT_EXPERIMENT):
    return mlflow.search_runs(experiment_names=[experiment], output_format="list")


@pytest.mark.slow
@pytest.mark.timeout(1200)  # `mlflow run` (900 s subprocess limit)
def test_mlflow_run_main_logs_the_whole_run_schema(demo_set, tracking_uri, tmp_path):
    command = [
        "mlflow", "run", str(PROJECT_ROOT), "--env-manager", "local",
        "--experiment-name", schema.DEFAULT_EXPERIMENT,
        "-P", "arch=resnet50", "-P", "seed=3", "-P", f"data={demo_set}", "-P", "weights=none",
        "-P", "image_height=128", "-P", "image_width=256", "-P", f"cache_dir={tmp_path / 'cache'}",
    ]
    done = subprocess.run(command, env=server_env(tracking_uri), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    runs = _runs()
    assert len(runs) == 1, "training must log into the run that `mlflow run` created"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "resnet50-s3"
    assert run.data.tags[schema.TAG_ROLE] == schema.ROLE_TRAIN
    assert set(SCHEMA_PARAMS) <= set(run.data.params)
    assert run.data.params["weights"] == "none" and run.data.params["seed"] == "3"
    assert set(schema.TRAIN_RUN_METRICS) <= set(run.data.metrics)

    client = mlflow.MlflowClient()
    stopped = int(run.data.metrics[schema.METRIC_STOPPED_EPOCH])
    for key in schema.EPOCH_METRICS:
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted({m.step for m in history}) == list(range(1, stopped + 1)), key
    # The final validation loss is that of the restored best epoch, not of the last one.
    # The epoch curve is the first value logged at each step (the final metric is logged again
    # at the last step, later); best_epoch, early stopping and the final value follow from it.
    best = int(run.data.metrics[schema.METRIC_BEST_EPOCH])
    curve: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run.info.run_id, "val_loss"), key=lambda m: m.timestamp):
        curve.setdefault(m.step, m.value)
    assert best == min(curve, key=lambda step: (curve[step], step))
    max_epochs, patience = int(run.data.params["max_epochs"]), int(run.data.params["patience"])
    assert stopped == max_epochs or stopped - best == patience
    assert abs(run.data.metrics["val_loss"] - curve[best]) < 1e-3
    artifacts = {a.path for folder in (None, schema.ARTIFACT_EXPLANATIONS)
                 for a in client.list_artifacts(run.info.run_id, folder)}
    assert set(schema.TRAIN_RUN_ARTIFACTS) <= artifacts
    assert run.inputs.dataset_inputs[0].dataset.digest == run.data.params[schema.PARAM_DATA_DIGEST][:36]

    # The logged model reloads through pyfunc and gives the logged test predictions.
    predictions = pd.read_csv(mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path=schema.ARTIFACT_PREDICTIONS))
    assert len(predictions) == int(run.data.params[schema.PARAM_N_TEST])
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/{schema.MODEL_ARTIFACT}")
    sample = predictions.head(5)
    pixels = np.stack([load_pixels(demo_set / p, 128, 256) for p in sample[schema.COL_RELPATH]]).astype(np.float32)
    served = np.asarray(model.predict(pixels))
    np.testing.assert_allclose(served, sample[list(schema.PROB_COLUMNS)].to_numpy(), atol=1e-5)


def test_second_run_reads_the_cache_and_reproduces_the_seed(demo_set, tracking_uri, tmp_path, monkeypatch):
    config = parse_train_config(
        arch="vgg16", seed="2", data=str(demo_set), weights="none", image_height="64",
        image_width="128", max_epochs="8", cache_dir=str(tmp_path / "cache"), log_model="false",
    )
    mlflow.set_experiment(schema.DEFAULT_EXPERIMENT)
    with mlflow.start_run():
        first = train_and_log(config, progress=False)
    assert first.cache.misses > 0 and first.cache.hits == 0

    import ecg_mlflow.model.backbones

    def no_backbone(*args, **kwargs):
        raise AssertionError("the backbone ran although every feature was cached")

    monkeypatch.setattr(ecg_mlflow.model.backbones, "shared_feature_extractor", no_backbone)
    with mlflow.start_run():
        second = train_and_log(config, progress=False)
    assert second.cache.misses == 0 and second.cache.hits == first.cache.misses
    for key in schema.evaluation_metric_names("test") + schema.evaluation_metric_names("val"):
        a, b = first.metrics[key], second.metrics[key]
        assert (np.isnan(a) and np.isnan(b)) or a == b, key
    logged = mlflow.get_run(second.run_id).data.metrics
    assert logged["cache_misses"] == 0


def test_damaged_cache_entry_is_recomputed(demo_set, tmp_path):
    from ecg_mlflow.data.manifest import build_manifest
    from ecg_mlflow.model.features import extract_features

    manifest = build_manifest(demo_set)
    paths = {r.sha256: manifest.path_of(r) for r in manifest.records[:4]}
    key = FeatureKey("vgg16", "none", 64, 64, "none")
    clean, _ = extract_features(paths, key, tmp_path)
    cache = FeatureCache(tmp_path, key)
    victim, truncated = sorted(paths)[:2]
    entry = cache.entry_path(victim)
    blob = bytearray(entry.read_bytes())
    blob[10] ^= 0xFF  # flip bits: length right, checksum wrong
    entry.write_bytes(bytes(blob))
    cache.entry_path(truncated).write_bytes(entry.read_bytes()[:100])
    again, stats = extract_features(paths, key, tmp_path)
    assert (stats.damaged, stats.misses, stats.hits) == (2, 2, 2)
    for sha in paths:
        np.testing.assert_array_equal(again[sha], clean[sha])
    assert not list(tmp_path.rglob("*.tmp"))


def test_whole_model_must_equal_the_head_on_cached_features(demo_set, tmp_path):
    from ecg_mlflow.model.backbones import build_feature_extractor
    from ecg_mlflow.model.head import build_head

    config = parse_train_config(arch="vgg16", weights="none", image_height="64", image_width="64")
    paths = sorted(demo_set.rglob("*.jpg"))[:3]
    pixels = np.stack([load_pixels(p, 64, 64) for p in paths]).astype(np.float32)
    features = np.asarray(build_feature_extractor("vgg16", "none", 64, 64)(pixels))
    head = build_head(512, (8,), 0.2)
    model = assemble_model(config, head)
    assert check_model_matches_head(model, head, pixels, features) <= 1e-5
    other = build_head(512, (8,), 0.2)  # slightly different weights: not the evaluated model
    other.set_weights([w * 1.01 for w in head.get_weights()])
    with pytest.raises(RuntimeError, match="disagrees with the trained head"):
        check_model_matches_head(model, other, pixels, features)


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("--arch", "resnet51", "arch must be one of"),
        ("--seed", "abc", "seed must be an integer"),
        ("--seed", "-1", "seed must be at least 0"),
        ("--image-height", "0", "image_height must be an integer from 1 to 4096, got '0'"),
        ("--learning-rate", "2", "learning_rate must lie in"),
        ("--dropout", "1.5", "dropout must lie in"),
        ("--dense-units", "a,b", "dense_units must be"),
        ("--split", "random", "split must be one of paper, grouped"),
        ("--crop", "full", "crop must be one of"),
        ("--weights", "/no/such/file.h5", "weights must be imagenet, none or the path"),
        ("--batch-size", "0", "batch_size must be at least 1"),
        ("--log-model", "maybe", "log_model must be true or false"),
    ],
)
def test_bad_parameter_fails_with_one_line_naming_it(option, value, message, demo_set, tracking_uri):
    result = CliRunner().invoke(main, ["train", "--data", str(demo_set), "--weights", "none", option, value])
    assert result.exit_code == 2
    assert message in result.output
    assert not _runs(), "a bad parameter must fail before any run is opened"


def test_too_small_image_for_backbone_names_both_parameters(demo_set):
    result = CliRunner().invoke(main, ["train", "--arch", "inceptionv3", "--image-height", "64", "--data", str(demo_set)])
    assert result.exit_code == 2 and "image_height/image_width" in result.output


def test_missing_dataset_says_how_to_get_one(tracking_uri, tmp_path):
    result = CliRunner().invoke(main, ["train", "--data", str(tmp_path / "nowhere"), "--weights", "none"])
    assert result.exit_code == 2
    assert "ecg-mlflow data download" in result.output and "ecg-mlflow synth" in result.output
    assert not _runs()


def test_training_on_a_subset_of_the_real_images(real_images, tracking_uri, tmp_path):
    subset = tmp_path / "real-subset"
    for folder in sorted(real_images.iterdir()):
        target = subset / folder.name
        target.mkdir(parents=True)
        # Ten files per class, twins first (MI(n) == MI(n+30) etc.), so leakage can show.
        by_content: dict[str, list[Path]] = {}
        for path in sorted(folder.glob("*.jpg")):
            by_content.setdefault(hashlib.sha256(path.read_bytes()).hexdigest(), []).append(path)
        groups = sorted(by_content.values(), key=lambda g: (-len(g), g[0].name))
        chosen = [p for g in groups[:5] for p in g][:10]
        chosen += [g[0] for g in groups[5:]][: 10 - len(chosen)]
        for path in chosen:
            shutil.copy(path, target / path.name)
    config = parse_train_config(
        arch="resnet50", seed="1", data=str(subset), weights="none", image_height="64",
        image_width="128", max_epochs="5", cache_dir=str(tmp_path / "cache"), log_model="false",
    )
    mlflow.set_experiment(schema.DEFAULT_EXPERIMENT)
    with mlflow.start_run():
        result = train_and_log(config, progress=False)
    run = mlflow.get_run(result.run_id)
    assert int(run.data.params[schema.PARAM_N_TEST]) == len(result.split.test) == 8
    assert run.data.metrics[schema.METRIC_LEAKAGE_EXACT] == result.leakage.exact > 0
    assert 0.0 <= run.data.metrics["test_accuracy"] <= 1.0
    split_csv = pd.read_csv(mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path=schema.ARTIFACT_SPLIT))
    assert len(split_csv) == 40 and set(split_csv["subset"]) == {"train", "val", "test"}


@pytest.mark.slow
def test_sigterm_ends_the_run_killed_and_leaves_the_cache_sound(demo_set, tracking_uri, tmp_path):
    cache_dir = tmp_path / "cache"
    command = [
        str(VENV_BIN / "ecg-mlflow"), "train", "--arch", "resnet50", "--data", str(demo_set),
        "--weights", "none", "--image-height", "256", "--image-width", "512", "--cache-dir", str(cache_dir),
    ]
    process = subprocess.Popen(command, env=server_env(tracking_uri), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and not list(cache_dir.rglob("*.f32")):
        time.sleep(0.2)
    assert list(cache_dir.rglob("*.f32")), "feature extraction never started"
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=120) == 130
    run = _runs()[0]
    assert run.info.status == "KILLED"
    key = parse_train_config(arch="resnet50", weights="none", image_height="256", image_width="512").feature_key()
    assert key.engine == DEFAULT_ENGINE  # the command's default engine, whose entries these are
    # The pass writes three stores under the features' folder (the overlay sample's full maps
    # first, then region maps, then features): each entry must load from its own store.
    stores = [FeatureCache(cache_dir, key), RegionMapCache(cache_dir, key), FullMapCache(cache_dir, key)]

    def owner(path):  # the innermost store holding the entry (an entry outside all of them fails here)
        return max((store for store in stores if store.folder in path.parents), key=lambda s: len(s.folder.parts))

    loaded = [owner(path).load(path.stem) is not None for path in cache_dir.rglob("*.f32")]
    assert loaded and all(loaded)
    assert not list(cache_dir.rglob("*.tmp"))


def test_cached_features_are_exactly_what_the_logged_model_computes(demo_set, tmp_path):
    """The cache is filled in graph mode, as Keras' predict runs the logged model; eager
    calls round differently and broke the 1e-5 check on EfficientNetV2-S at 512 x 1024."""
    from ecg_mlflow.data.manifest import build_manifest
    from ecg_mlflow.model.features import extract_features
    from ecg_mlflow.model.head import build_head

    manifest = build_manifest(demo_set)
    records = manifest.records[:4]
    key = FeatureKey("efficientnetv2s", "none", 96, 128, "none")
    features, _ = extract_features({r.sha256: manifest.path_of(r) for r in records}, key, tmp_path)
    config = parse_train_config(arch="efficientnetv2s", weights="none", image_height="96", image_width="128")
    head = build_head(1280, (16,), 0.2)
    pixels = np.stack([load_pixels(manifest.path_of(r), 96, 128) for r in records]).astype(np.float32)
    cached = np.stack([features[r.sha256] for r in records])
    # Bit for bit: the logged model's Keras predict, and the same Keras head on the cache.
    whole = assemble_model(config, head).predict(pixels, verbose=0)
    np.testing.assert_array_equal(whole, head.predict(cached, verbose=0))
