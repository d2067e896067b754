"""The served model runs the copy of ecg_mlflow it ships (`code_paths`), not whatever
ecg_mlflow the serving machine has installed or on its path."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from ecg_mlflow import schema
from ecg_mlflow.serving.packaging import log_serving_model

MARKER = "SHIPPED_COPY_MARKER = 'from the model folder'\n"
PROBE = """
import io, json, sys
import mlflow, pandas as pd
from PIL import Image
model = mlflow.pyfunc.load_model(sys.argv[1])
buffer = io.BytesIO()
Image.new("RGB", (40, 30), (200, 30, 30)).save(buffer, format="PNG")
frame = model.predict(pd.DataFrame({"image": [buffer.getvalue()]}))
import ecg_mlflow, ecg_mlflow.schema
print(json.dumps({"file": ecg_mlflow.__file__, "marker": getattr(ecg_mlflow.schema, "SHIPPED_COPY_MARKER", None),
                  "columns": list(frame.columns)}))
"""


def _tiny_keras_model(size: int):
    import keras

    inputs = keras.Input((size, size, 3))
    x = keras.layers.GlobalAveragePooling2D()(inputs)
    return keras.Model(inputs, keras.layers.Dense(4, activation="softmax")(x))


@pytest.mark.slow  # a fresh process that loads TensorFlow and the model
@pytest.mark.timeout(900)
def test_the_served_model_imports_its_shipped_copy(tracking_uri, tmp_path):
    size = 32
    with mlflow.start_run(run_name="tiny-train") as source:
        mlflow.log_params({"arch": "mobilenetv3large", "image_height": size, "image_width": size, "crop": "none"})
        mlflow.keras.log_model(_tiny_keras_model(size), name=schema.MODEL_ARTIFACT)
    with mlflow.start_run(run_name="tiny-promote"):
        info = log_serving_model(source.info.run_id)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=info.model_uri, dst_path=str(tmp_path / "model")))
    (shipped_schema,) = local.rglob("ecg_mlflow/schema.py")
    shipped_schema.write_text(shipped_schema.read_text() + MARKER)  # only the shipped copy has it

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    done = subprocess.run([sys.executable, "-c", PROBE, str(local)], cwd=elsewhere, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    found = json.loads(done.stdout.strip().splitlines()[-1])
    assert found["marker"] == "from the model folder", found
    assert Path(found["file"]).resolve().is_relative_to(local.resolve()), found["file"]
    assert found["columns"] == ["label", *schema.PROB_COLUMNS]
