"""Backbone engines: `engine` and `precision` validated and in the cache key, OpenVINO features
equal Keras' within the stated tolerances, and a model trained through OpenVINO is checked,
logged, promoted, loaded and served through OpenVINO, or says at load time what it falls back
to (a host without openvino or without bf16, simulated by the variables engines.py reads)."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import mlflow
import numpy as np
import openvino
import pandas as pd
import pytest
import requests
from click.testing import CliRunner
from mlflow import MlflowClient

from ecg_mlflow import schema
from ecg_mlflow.cli import main
from ecg_mlflow.config import ConfigError, parse_train_config, resolve_train_config
from ecg_mlflow.data.manifest import build_manifest
from ecg_mlflow.data.preprocess import load_batch
from ecg_mlflow.model.engines import (
    BF16_CAPABILITY, DISABLE_BF16_ENV, DISABLE_OPENVINO_ENV, bf16_missing, cpu_capabilities, resolve_engine,
    whole_model_runner,
)
from ecg_mlflow.model.features import FeatureKey, extract_features
from ecg_mlflow.serving.packaging import keras_file_of_run
from ecg_mlflow.serving.pyfunc import IMAGE_COLUMN

from serving_fixtures import (
    hand_analysis_run, isolated_store, model_server, shared_cache, shared_demo_set, train_study,
)

FP32_TOLERANCE = 1e-4
"""OpenVINO fp32 vs Keras fp32: max abs difference of pooled features over the largest |feature|
(measured 2e-6 to 3e-6 here; the kernels differ, so the last bits do)."""
BF16_MIN_COSINE = 0.99
"""OpenVINO bf16 vs Keras fp32 features, per image. bf16 keeps 8 bits of mantissa: on an
AVX-512 BF16 host the EfficientNet-Lite0 features of these 12 reports at 64 x 128 measured
cosine 0.9979 at the least, while single features moved by up to 12% of the largest (the
max-difference measure above suits fp32, not bf16; 3e-3 on a random ResNet-50 at 512 x
1024 on an AMX host)."""
KERAS_BF16_MIN_COSINE = 0.95
"""Keras bf16 vs Keras fp32 features, per image (0.994-0.997 for the EfficientNet-Lites on real
reports at 512 x 1024: docs/benchmarks.md, "Keras bf16 on this CPU")."""
SERVED_TOLERANCE = 1e-5
FEATURE_ARCH = "efficientnetlite0"  # pretrained, offline: real features of real images
ARCHS = ("mobilenetv3large", "vgg16")
CHAMPION_URI = f"models:/{schema.DEFAULT_MODEL_NAME}@{schema.CHAMPION_ALIAS}"


# ---- parameters and the cache key --------------------------------------------------------


def test_engine_and_precision_are_validated_naming_the_parameter():
    with pytest.raises(ConfigError, match="^engine must be one of keras, openvino; got 'tensorrt'"):
        parse_train_config(engine="tensorrt")
    with pytest.raises(ConfigError, match="^precision must be one of fp32, bf16; got 'fp16'"):
        parse_train_config(precision="fp16")
    config = parse_train_config(engine=" keras ", precision="fp32")
    assert (config.engine, config.precision) == ("keras", "fp32")
    params = parse_train_config(engine="openvino", precision="bf16").as_params()
    assert (params[schema.PARAM_ENGINE], params[schema.PARAM_PRECISION]) == ("openvino", "bf16")


def test_entries_differing_only_in_engine_or_precision_are_different_cache_entries():
    keras_fp32 = FeatureKey("vgg16", "none", 64, 128, "none")
    keys = [keras_fp32, replace(keras_fp32, engine="openvino"),
            replace(keras_fp32, engine="openvino", precision="bf16")]
    assert len({key.digest for key in keys}) == 3
    assert "engine" not in keras_fp32.fields()  # Keras fp32 keeps the key caches already have
    assert keys[1].fields()["openvino"] == openvino.__version__


def test_training_refuses_an_engine_this_host_cannot_run(monkeypatch, tmp_path):
    monkeypatch.setenv(DISABLE_OPENVINO_ENV, "1")
    choice = resolve_engine("openvino", "fp32")
    assert choice.fallback and (choice.engine, choice.precision) == ("keras", "fp32")
    with pytest.raises(ConfigError, match=rf"^engine: engine=openvino precision=fp32 cannot run on this host "
                                          rf"\(openvino disabled by {DISABLE_OPENVINO_ENV}\)"):
        resolve_train_config(engine="openvino", cache_dir=str(tmp_path))
    monkeypatch.delenv(DISABLE_OPENVINO_ENV)
    monkeypatch.setenv(DISABLE_BF16_ENV, "1")
    choice = resolve_engine("openvino", "bf16")
    assert (choice.engine, choice.precision, choice.reason) == ("openvino", "fp32", f"bf16 disabled by {DISABLE_BF16_ENV}")
    with pytest.raises(ConfigError, match="^precision: engine=openvino precision=bf16 cannot run on this host"):
        resolve_train_config(engine="openvino", precision="bf16", cache_dir=str(tmp_path))


def test_keras_bf16_trains_on_a_gpu_only():
    """engine=keras precision=bf16 is Keras' mixed_bfloat16, which pays on a GPU: a valid
    pair, but training refuses it on a CPU with one line naming precision and the device."""
    from ecg_mlflow.model.backend import device_kind, keras_bf16_missing

    assert (keras_bf16_missing() == "") == (device_kind() == "gpu")
    parse_train_config(engine="keras", precision="bf16")  # the pair itself is valid
    if device_kind() != "gpu":
        with pytest.raises(ConfigError, match=r"^precision: engine=keras precision=bf16 cannot run on this host "
                                              r"\(Keras' bf16 pays on a GPU only, and the \w+ backend computes on the cpu"):
            resolve_train_config(engine="keras", precision="bf16")


def test_bf16_is_offered_exactly_where_the_cpu_has_it():
    """Read from OpenVINO, not assumed: without BF16 in its capabilities OpenVINO silently
    computes in f32, which a run must not record as bf16."""
    assert (bf16_missing() == "") == (BF16_CAPABILITY in cpu_capabilities())


# ---- features -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_sample(real_images) -> dict[str, Path]:
    """Twelve real reports (three per class), unique by content."""
    manifest = build_manifest(real_images, progress=False)
    chosen: dict[str, Path] = {}
    per_class: dict[str, int] = {}
    for record in manifest.records:
        if record.sha256 not in chosen and per_class.get(record.label, 0) < 3:
            chosen[record.sha256] = manifest.path_of(record)
            per_class[record.label] = per_class.get(record.label, 0) + 1
    return chosen


def _features(sample, tmp_path, engine: str, precision: str) -> np.ndarray:
    key = FeatureKey(FEATURE_ARCH, "imagenet", 64, 128, "none", engine, precision)
    features, stats = extract_features(sample, key, tmp_path / "cache")
    assert stats.misses == len(sample)
    return np.stack([features[sha] for sha in sorted(sample)])


@pytest.fixture(scope="module")
def keras_features(real_sample, tmp_path_factory) -> np.ndarray:
    return _features(real_sample, tmp_path_factory.mktemp("keras"), "keras", "fp32")


def test_openvino_fp32_features_equal_keras_fp32(real_sample, keras_features, tmp_path):
    features = _features(real_sample, tmp_path, "openvino", "fp32")
    assert np.abs(features - keras_features).max() <= FP32_TOLERANCE * np.abs(keras_features).max()


def test_openvino_bf16_features_are_close_to_keras_fp32(real_sample, keras_features, tmp_path):
    if bf16_missing():
        pytest.skip(f"no bf16 on this host: {bf16_missing()}")
    features = _features(real_sample, tmp_path, "openvino", "bf16")
    cosine = (features * keras_features).sum(1) / (
        np.linalg.norm(features, axis=1) * np.linalg.norm(keras_features, axis=1))
    assert cosine.min() >= BF16_MIN_COSINE
    assert np.abs(features - keras_features).max() > FP32_TOLERANCE * np.abs(keras_features).max()  # bf16 ran


# ---- trained, logged, promoted and served through OpenVINO ---------------------------------


def test_keras_bf16_features_are_bf16_and_the_whole_model_serves_them(real_sample, keras_features, tmp_path):
    """The path a GPU runs, run here on the CPU (slowly, which is why training refuses it
    here): the extractor is built in bfloat16, its features differ from fp32 by bf16
    rounding, and the assembled whole model computes exactly those features (1e-5)."""
    from ecg_mlflow.model.features import key_extractor
    from ecg_mlflow.model.head import build_head
    from ecg_mlflow.model.whole_model import EQUALITY_TOLERANCE, assemble_model, check_model_matches_head

    features = _features(real_sample, tmp_path, "keras", "bf16")
    # bf16 really ran (not 0); every layer's activations are rounded to bf16, so the features
    # move away from fp32, by a cosine of about 0.99.
    assert np.abs(features - keras_features).max() > 0
    cosine = (features * keras_features).sum(1) / np.linalg.norm(features, axis=1) / np.linalg.norm(keras_features, axis=1)
    assert cosine.min() > KERAS_BF16_MIN_COSINE, cosine
    config = parse_train_config(arch=FEATURE_ARCH, weights="imagenet", image_height="64", image_width="128",
                                engine="keras", precision="bf16")
    extractor = key_extractor(config.feature_key())
    assert extractor.dtype_policy.name == "mixed_bfloat16"
    assert key_extractor(replace(config.feature_key(), precision="fp32")).dtype_policy.name == "float32"
    head = build_head(features.shape[1], (16,), 0.2)
    model = assemble_model(config, head)
    runner = whole_model_runner(model, "keras", "bf16")
    pixels = load_batch([real_sample[sha] for sha in sorted(real_sample)], 64, 128)
    assert check_model_matches_head(runner, head, pixels, features) <= EQUALITY_TOLERANCE


def test_a_backbones_seeds_share_its_openvino_pass_on_the_check_images(real_sample, keras_features, monkeypatch):
    """Every seed of a backbone checks its whole model on the same read-only test images:
    the compiled backbone runs on them once, and each seed's check is its own head on those
    features, equal to a fresh pass; a writeable batch (a request) runs the backbone."""
    import keras

    from ecg_mlflow.model.head import build_head
    from ecg_mlflow.model.whole_model import EQUALITY_TOLERANCE, assemble_model, check_model_matches_head

    config = parse_train_config(arch=FEATURE_ARCH, weights="imagenet", image_height="64", image_width="128",
                                engine="openvino", precision="fp32")
    heads = []
    for seed in (1, 2):
        keras.utils.set_random_seed(seed)
        heads.append(build_head(keras_features.shape[1], (16,), 0.2))
    runners = [whole_model_runner(assemble_model(config, head), "openvino", "fp32") for head in heads]
    backbone = runners[0].backbone
    assert runners[1].backbone is backbone  # one compilation per extractor
    passes = []
    run_backbone = backbone.predict_on_batch
    monkeypatch.setattr(backbone, "predict_on_batch", lambda batch: passes.append(len(batch)) or run_backbone(batch))
    pixels = load_batch([real_sample[sha] for sha in sorted(real_sample)], 64, 128)
    pixels.flags.writeable = False
    for runner, head in zip(runners, heads):
        assert check_model_matches_head(runner, head, pixels, keras_features) <= EQUALITY_TOLERANCE
    assert sum(passes) == len(pixels)  # the first seed's check ran the backbone, the second's did not
    kept = [runner.predict(pixels) for runner in runners]
    fresh = [runner.predict(pixels.copy()) for runner in runners]
    assert sum(passes) == 3 * len(pixels)
    for a, b in zip(kept, fresh):
        np.testing.assert_array_equal(a, b)
    assert np.abs(kept[0] - kept[1]).max() > 1e-3  # each its own head


def test_a_backbone_is_converted_once_for_its_feature_pass_and_its_whole_models(real_sample, tmp_path, monkeypatch):
    """The feature pass (maps and features) and the whole model (its check, the served model)
    run one OpenVINO compilation of the backbone's maps model: one conversion, and the whole
    model's features are the cached ones."""
    import keras

    from ecg_mlflow.model import engines
    from ecg_mlflow.model.head import build_head
    from ecg_mlflow.model.region_cache import extract_features_and_region_maps
    from ecg_mlflow.model.whole_model import assemble_model

    conversions = []
    convert = engines.convert_keras
    monkeypatch.setattr(engines, "convert_keras", lambda model: conversions.append(model.name) or convert(model))
    height, width = 48, 96  # a size no other test builds, so its extractor is converted here
    key = FeatureKey(FEATURE_ARCH, "imagenet", height, width, "none", "openvino", "fp32")
    features, _, stats = extract_features_and_region_maps(real_sample, key, tmp_path)
    assert stats.misses == len(real_sample) and len(conversions) == 1
    config = parse_train_config(arch=FEATURE_ARCH, weights="imagenet", image_height=str(height),
                                image_width=str(width), engine="openvino", precision="fp32")
    keras.utils.set_random_seed(1)
    runner = whole_model_runner(assemble_model(config, build_head(1280, (16,), 0.2)), "openvino", "fp32")
    assert len(conversions) == 1, conversions
    shas = sorted(real_sample)
    served = runner.backbone.predict_on_batch(load_batch([real_sample[s] for s in shas], height, width))
    np.testing.assert_allclose(served, np.stack([features[s] for s in shas]), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def promoted(tmp_path_factory):
    """Two real runs with engine=openvino, the first promoted through the CLI."""
    root = tmp_path_factory.mktemp("engine-store")
    with isolated_store(root) as uri:
        study = train_study("engines", root, shared_demo_set(tmp_path_factory), shared_cache(tmp_path_factory),
                            ARCHS, (1,), params={"engine": "openvino", "precision": "fp32"})
        analysis = hand_analysis_run(study, ARCHS[0], ARCHS[1], significant=True)
        result = CliRunner().invoke(main, ["promote", "--experiment", "engines", "--analysis-run", analysis])
        assert result.exit_code == 0, result.output
        yield {"uri": uri, "root": root, "source": study.runs[(ARCHS[0], 1)]}


@pytest.fixture(scope="module")
def originals(real_originals) -> list[bytes]:
    return [p.read_bytes() for p in sorted(real_originals.rglob("*")) if p.is_file()]


@pytest.mark.slow
def test_the_whole_model_check_passes_through_openvino_and_requires_it(promoted):
    run = mlflow.get_run(promoted["source"])
    assert run.data.params[schema.PARAM_ENGINE] == "openvino"
    assert run.data.metrics[schema.METRIC_MODEL_MAX_ABS_DIFF] <= 1e-5
    probe = mlflow.artifacts.load_dict(f"runs:/{promoted['source']}/{schema.ARTIFACT_ENGINE_PROBE}")
    assert probe[schema.CONFIG_ENGINE] == "openvino" and np.asarray(probe[schema.CONFIG_PROBE]).shape == (2, 4)
    requirements = mlflow.pyfunc.get_model_dependencies(f"runs:/{promoted['source']}/{schema.MODEL_ARTIFACT}")
    assert f"openvino=={openvino.__version__.split('-')[0]}" in Path(requirements).read_text()


@pytest.mark.slow
def test_the_promoted_version_records_its_engine(promoted):
    version = MlflowClient().get_model_version_by_alias(schema.DEFAULT_MODEL_NAME, schema.CHAMPION_ALIAS)
    assert {k: version.tags[k] for k in (schema.PARAM_ENGINE, schema.PARAM_PRECISION, schema.TAG_SERVED_ENGINE,
                                         schema.TAG_SERVED_PRECISION)} == {
        schema.PARAM_ENGINE: "openvino", schema.PARAM_PRECISION: "fp32",
        schema.TAG_SERVED_ENGINE: "openvino", schema.TAG_SERVED_PRECISION: "fp32"}
    requirements = Path(mlflow.pyfunc.get_model_dependencies(CHAMPION_URI)).read_text()
    assert "openvino==" in requirements


@pytest.mark.slow
def test_the_pyfunc_runs_the_recorded_engine(promoted, originals, tmp_path):
    model = mlflow.pyfunc.load_model(CHAMPION_URI)
    classifier = model.unwrap_python_model()
    assert (classifier.engine.engine, classifier.engine.precision, classifier.engine.fallback) == ("openvino", "fp32", False)
    assert classifier.probe_diff <= SERVED_TOLERANCE
    served = model.predict(pd.DataFrame({IMAGE_COLUMN: originals}))[list(schema.PROB_COLUMNS)].to_numpy()
    # independent path: the train run's Keras file through the engine, training's preprocessing
    import keras

    keras_model = keras.saving.load_model(keras_file_of_run(promoted["source"], tmp_path), compile=False)
    pixels = load_batch(originals, 64, 128)
    expected = whole_model_runner(keras_model, "openvino", "fp32").predict(pixels)
    np.testing.assert_allclose(served, expected, atol=SERVED_TOLERANCE)


@pytest.mark.slow
def test_a_host_without_openvino_says_what_it_falls_back_to(promoted, monkeypatch, caplog):
    monkeypatch.setenv(DISABLE_OPENVINO_ENV, "1")
    with caplog.at_level(logging.INFO, logger="ecg_mlflow.serving.pyfunc"):
        classifier = mlflow.pyfunc.load_model(CHAMPION_URI).unwrap_python_model()
    assert (classifier.engine.engine, classifier.engine.precision) == ("keras", "fp32")
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING and "ECG classifier" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    assert (f"recorded engine openvino, precision fp32 cannot run here (openvino disabled by "
            f"{DISABLE_OPENVINO_ENV}); falling back to engine keras, precision fp32; max abs difference "
            "from the recorded engine's probabilities on the probe input") in warned[0]
    assert classifier.probe_diff is not None and classifier.probe_diff <= SERVED_TOLERANCE


@pytest.mark.slow
def test_a_host_without_bf16_says_what_it_falls_back_to(promoted, monkeypatch, caplog):
    """The version is loaded as if it recorded bf16 (MLflow's model_config override)."""
    monkeypatch.setenv(DISABLE_BF16_ENV, "1")
    with caplog.at_level(logging.INFO, logger="ecg_mlflow.serving.pyfunc"):
        model = mlflow.pyfunc.load_model(CHAMPION_URI, model_config={schema.CONFIG_PRECISION: "bf16"})
    classifier = model.unwrap_python_model()
    assert (classifier.engine.engine, classifier.engine.precision) == ("openvino", "fp32")
    assert "recorded engine openvino, precision bf16 cannot run here (bf16 disabled by" in caplog.text
    assert "falling back to engine openvino, precision fp32" in caplog.text


@pytest.mark.slow
def test_mlflow_models_serve_runs_the_engine_it_was_trained_with(promoted, originals):
    import base64
    import json

    with model_server(CHAMPION_URI, promoted["uri"], promoted["root"] / "server.log") as server:
        records = [{IMAGE_COLUMN: base64.b64encode(b).decode("ascii")} for b in originals]
        response = requests.post(f"{server.url}/invocations", data=json.dumps({"dataframe_records": records}),
                                 headers={"Content-Type": "application/json"}, timeout=300)
        assert response.status_code == 200, response.text
        log = server.log_tail(20000)
    served = pd.DataFrame(response.json()["predictions"])
    local = mlflow.pyfunc.load_model(CHAMPION_URI).predict(pd.DataFrame({IMAGE_COLUMN: originals}))
    assert list(served["label"]) == list(local["label"])
    np.testing.assert_allclose(served[list(schema.PROB_COLUMNS)].to_numpy(),
                               local[list(schema.PROB_COLUMNS)].to_numpy(), atol=SERVED_TOLERANCE)
    assert "ECG classifier serving with engine openvino, precision fp32" in log, log


def test_a_keras_fp32_study_keeps_the_key_it_had_before_engines():
    """A study that was running before engines existed, resumed with engine=keras, adopts its
    finished runs; the other engines and precisions are other studies."""
    import hashlib
    import json

    from ecg_mlflow.study import study_key

    config = parse_train_config(engine="keras", precision="fp32")
    before = {k: v for k, v in config.as_params().items()
              if k not in schema.STUDY_KEY_EXEMPT_PARAMS | {"engine", "precision"}}
    before["head_config"] = ""
    blob = json.dumps({"archs": ["vgg16"], "params": before, "data": "d"}, sort_keys=True)
    assert study_key(("vgg16",), config, "d") == hashlib.sha256(blob.encode()).hexdigest()[:24]
    others = {study_key(("vgg16",), replace(config, engine=e, precision=p), "d")
              for e, p in (("openvino", "fp32"), ("openvino", "bf16"))}
    assert len(others | {study_key(("vgg16",), config, "d")}) == 3


def test_the_decode_pool_feeds_every_batch_in_order(tmp_path_factory, tmp_path):
    """Three batches decoded by the pool, ahead of the backbone: each image's features are those
    of its own pixels, exactly as one thread with load_batch would have fed them."""
    from ecg_mlflow.model.backbones import build_feature_extractor
    from ecg_mlflow.model.features import FEATURE_BATCH_SIZE, _pad_batch

    manifest = build_manifest(shared_demo_set(tmp_path_factory), progress=False)
    paths = {r.sha256: manifest.path_of(r) for r in manifest.records[:20]}
    model = build_feature_extractor("vgg16", "none", 32, 32)
    features, stats = extract_features(paths, FeatureKey("vgg16", "none", 32, 32, "none", "keras", "fp32"), tmp_path,
                                       build_extractor=lambda: model)
    assert stats.misses == len(paths) == 20
    shas = sorted(paths)
    for start in range(0, len(shas), FEATURE_BATCH_SIZE):
        batch = shas[start:start + FEATURE_BATCH_SIZE]
        expected = np.asarray(model.predict_on_batch(_pad_batch(load_batch([paths[s] for s in batch], 32, 32))))
        np.testing.assert_array_equal(np.stack([features[s] for s in batch]), expected[:len(batch)])
