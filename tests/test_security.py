"""Security rules: servers bind to loopback unless told otherwise, and model loading keeps
Keras' safe mode (a model that carries code is refused).

Covered elsewhere, with the real servers and files:
- infra/local binds PostgreSQL, S3 and MLflow to 127.0.0.1: tests/test_local_infra.py;
  docker-compose publishes every port on ${ECG_MLFLOW_BIND_ADDRESS:-127.0.0.1}: test_infra_files.py.
- `mlflow models serve` of the champion, started without --host, listens on 127.0.0.1 only:
  tests/test_team_server.py::test_promote_then_serve_the_champion_from_the_registry; told
  `-h 127.0.0.2`, it listens there only: tests/test_serve_http.py::test_the_server_binds_where_told_and_nowhere_else.
- A dataset symlink pointing outside the dataset folder is refused:
  tests/test_dataset.py::test_symlink_outside_dataset_is_refused.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pytest

from ecg_mlflow import schema
from ecg_mlflow.serving.packaging import log_serving_model


def test_model_serving_defaults_to_loopback():
    from mlflow.models.cli import serve

    (host,) = [p for p in serve.params if p.name == "host"]
    assert host.default == "127.0.0.1"


def test_the_launcher_binds_to_loopback_unless_told(monkeypatch):
    from infra_fixtures import PROJECT_ROOT

    monkeypatch.syspath_prepend(str(PROJECT_ROOT / "infra" / "local"))
    import launcher

    monkeypatch.delenv("ECG_MLFLOW_INFRA_HOST", raising=False)
    assert launcher.bind_host() == "127.0.0.1"


def _code_carrying_model(size: int):
    """A Keras model with a Lambda layer: loading it runs Python code stored in the file."""
    import keras

    inputs = keras.Input((size, size, 3))
    x = keras.layers.Lambda(lambda t: t * 2.0, name="runs_code")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    outputs = keras.layers.Dense(4, activation="softmax")(x)
    return keras.Model(inputs, outputs)


def test_a_served_model_with_a_lambda_layer_is_refused_by_safe_mode(tracking_uri, tmp_path):
    """Through the project's own path: a train-like run logs the Keras model, promotion's
    `log_serving_model` wraps it, and loading the pyfunc (what `mlflow models serve` does)
    refuses it; the same file loads without safe mode, so the refusal is safe mode's."""
    import keras

    size = 32
    model = _code_carrying_model(size)
    with mlflow.start_run(run_name="hostile-train") as source:
        mlflow.log_params({"arch": "mobilenetv3large", "image_height": size, "image_width": size, "crop": "none"})
        mlflow.keras.log_model(model, name=schema.MODEL_ARTIFACT)
    with mlflow.start_run(run_name="hostile-promote"):
        info = log_serving_model(source.info.run_id)

    # Keras' own refusal (keras/src/layers/core/lambda_layer.py), raised before any code runs
    with pytest.raises(ValueError, match=r"deserialization of a `Lambda` layer whose `function` is a Python "
                                         r"lambda.*arbitrary code execution.*safe_mode=False"):
        mlflow.pyfunc.load_model(info.model_uri)

    local = mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(tmp_path / "model"))
    (keras_file,) = Path(local).rglob("*.keras")
    loaded = keras.saving.load_model(keras_file, compile=False, safe_mode=False)
    pixels = np.ones((1, size, size, 3), np.float32)
    np.testing.assert_allclose(loaded.predict(pixels, verbose=0), model.predict(pixels, verbose=0), atol=1e-6)
