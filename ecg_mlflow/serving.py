"""The served model: ECG report image bytes in, diagnosis and class probabilities out.

`EcgImageClassifier` is an MLflow pyfunc (DESIGN.md, serving contract). It wraps the Keras
model that a train run logged (no retraining) and preprocesses with `load_pixels`, the same
function training used, at the source run's image size and crop. The logged pyfunc carries
its own copy of the `ecg_mlflow` package (`code_paths`), so a registered version keeps the
preprocessing it was promoted with even when the installed package changes later; it needs
only the pinned libraries (mlflow, keras, tensorflow-cpu, pillow, numpy, pandas). It is
logged as models-from-code (a two-line script, MODEL_SCRIPT), so loading it unpickles
nothing, and the Keras model loads in safe mode.

Bad input never reaches the model: every row is decoded first, every bad row is collected,
and one `BadImageRows` (an MlflowException with INVALID_PARAMETER_VALUE, which MLflow's
scoring server answers with HTTP 400) names them all with their reasons.
"""

from __future__ import annotations

import base64
import json
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from ecg_mlflow import names
from ecg_mlflow.classes import CLASSES
from ecg_mlflow.preprocess import ImageDecodeError, load_pixels

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
OUTPUT_COLUMNS: tuple[str, ...] = (LABEL_COLUMN,) + names.PROB_COLUMNS
KERAS_ARTIFACT = "keras_model"
SERVING_MODEL_NAME = "model"
"""Name of the serving pyfunc inside the promote run (`runs:/<promote run>/model`)."""
PREDICT_BATCH = 8
"""Images per Keras call: bounds the activation memory of a large request."""
SERVING_REQUIREMENTS = ("mlflow", "keras", "tensorflow-cpu", "pillow", "numpy", "pandas")
PACKAGE_DIR = Path(__file__).resolve().parent
MODEL_SCRIPT = (
    "from mlflow.models import set_model\n"
    "from ecg_mlflow.serving import EcgImageClassifier\n"
    "set_model(EcgImageClassifier())\n"
)
"""The models-from-code entry MLflow runs at load time (ecg_mlflow comes from code_paths)."""


class BadImageRows(MlflowException):
    """Rows of a request that are no usable image. `rows` maps row position to reason."""

    def __init__(self, rows: dict[int, str], n_rows: int):
        self.rows = dict(rows)
        listed = "; ".join(f"row {i}: {reason}" for i, reason in sorted(self.rows.items()))
        super().__init__(
            f"{len(self.rows)} of {n_rows} rows of column {IMAGE_COLUMN!r} are not usable "
            f"images (rows count from 0 in request order): {listed}",
            error_code=INVALID_PARAMETER_VALUE,
        )


class MissingImageColumn(MlflowException):
    """A request without the `image` column."""

    def __init__(self, columns: Sequence[str]):
        self.columns = list(columns)
        sent = f" (columns: {', '.join(map(str, self.columns))})" if self.columns else ""
        super().__init__(
            f"the request has no {IMAGE_COLUMN!r} column{sent}; send "
            f'{{"dataframe_records": [{{"{IMAGE_COLUMN}": "<base64 JPEG or PNG bytes>"}}]}}',
            error_code=INVALID_PARAMETER_VALUE,
        )


@dataclass(frozen=True)
class Preprocessing:
    """How the source run prepared its images; the serving model repeats exactly this."""

    arch: str
    image_height: int
    image_width: int
    crop: str

    def to_config(self) -> dict[str, Any]:
        return {"arch": self.arch, "image_height": self.image_height,
                "image_width": self.image_width, "crop": self.crop}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Preprocessing:
        return cls(str(config["arch"]), int(config["image_height"]), int(config["image_width"]),
                   str(config["crop"]))

    @classmethod
    def from_run_params(cls, params: dict[str, str], run_id: str) -> Preprocessing:
        """Parse and validate the train run's params (the same parser as training)."""
        from ecg_mlflow.config import ConfigError, parse_train_config

        keys = ("arch", "image_height", "image_width", "crop")
        missing = [k for k in keys if k not in params]
        if missing:
            raise ValueError(f"run {run_id} lacks the param(s) {', '.join(missing)}; is it a train run?")
        try:
            config = parse_train_config(**{k: params[k] for k in keys})
        except ConfigError as exc:
            raise ValueError(f"run {run_id} has unusable preprocessing params: {exc}") from None
        return cls(config.arch, config.image_height, config.image_width, config.crop)


def decode_rows(images: Sequence[Any], prep: Preprocessing) -> np.ndarray:
    """All rows as float32 (n, H, W, 3) pixels 0..255; BadImageRows names every bad row."""
    pixels: list[np.ndarray] = []
    bad: dict[int, str] = {}
    for index, value in enumerate(images):
        if value is None or (isinstance(value, float) and np.isnan(value)):
            bad[index] = "missing image (null)"
            continue
        if not isinstance(value, (bytes, bytearray, memoryview)):
            bad[index] = f"expected image bytes, got {type(value).__name__}"
            continue
        try:
            pixels.append(load_pixels(bytes(value), prep.image_height, prep.image_width, prep.crop))
        except ImageDecodeError as exc:
            bad[index] = str(exc)
    if bad:
        raise BadImageRows(bad, len(images))
    if not pixels:
        return np.zeros((0, prep.image_height, prep.image_width, 3), np.float32)
    return np.stack(pixels).astype(np.float32)


def probabilities_frame(probabilities: np.ndarray) -> pd.DataFrame:
    """(n, 4) probabilities in CLASSES order -> the served frame: label + prob_* (float64)."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(CLASSES))
    frame = pd.DataFrame(probabilities, columns=list(names.PROB_COLUMNS))
    labels = [CLASSES[i] for i in probabilities.argmax(axis=1)] if len(frame) else []
    frame.insert(0, LABEL_COLUMN, pd.Series(labels, dtype=object))
    return frame


class EcgImageClassifier(PythonModel):
    """Pyfunc: DataFrame with a binary `image` column -> `label` and `prob_*` per row."""

    def load_context(self, context) -> None:
        import keras

        self._prep = Preprocessing.from_config(context.model_config)
        # safe_mode: refuse any lambda or arbitrary-code deserialisation; the model has
        # built-in layers only (backbones.py), so a model that needs more is not ours.
        self._model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False, safe_mode=True)
        self._lock = threading.Lock()
        # The first call traces the graph (seconds); pay it at load time, not on a request.
        self._infer(np.zeros((1, self._prep.image_height, self._prep.image_width, 3), np.float32))

    def _infer(self, pixels: np.ndarray) -> np.ndarray:
        # The scoring server runs requests in threads; TF already uses every core for one
        # batch, so inference is serialised while decoding (in PIL, GIL released) overlaps.
        with self._lock:
            out = [np.asarray(self._model.predict_on_batch(pixels[i:i + PREDICT_BATCH]))
                   for i in range(0, len(pixels), PREDICT_BATCH)]
        return np.concatenate(out) if out else np.zeros((0, len(CLASSES)))

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Args:
            model_input: one row per image; column `image` holds JPEG/PNG bytes (the
                scoring server has already base64-decoded them from JSON).

        Returns:
            One row per image: `label` (a class of CLASSES) and `prob_mi`, `prob_hmi`,
            `prob_ahb`, `prob_norm` (float64, summing to 1).

        Raises:
            MissingImageColumn, BadImageRows: MlflowExceptions that the server answers with 400.
        """
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            columns = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else []
            raise MissingImageColumn(columns)
        pixels = decode_rows(list(model_input[IMAGE_COLUMN]), self._prep)
        return probabilities_frame(self._infer(pixels))


def serving_signature():
    """ColSpec binary `image` in; `label` string and four doubles out. `image` is declared
    optional only so that a request without it reaches `predict` and gets a 400 naming it
    (MLflow's own check for a missing required column answers 500)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", IMAGE_COLUMN, required=False)]),
        outputs=Schema([ColSpec("string", LABEL_COLUMN)] + [ColSpec("double", c) for c in names.PROB_COLUMNS]),
    )


def keras_file_of_run(run_id: str, dst: Path) -> Path:
    """Download the Keras model a train run logged (`runs:/<id>/model`) and return its
    `.keras` file, located through the model's MLmodel (keras flavor `data` folder)."""
    import mlflow
    from mlflow.models import Model

    uri = f"runs:/{run_id}/{names.MODEL_ARTIFACT}"
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
        flavor = Model.load(str(local)).flavors["keras"]
    except Exception as exc:
        raise ValueError(
            f"run {run_id} has no usable logged Keras model at {uri} ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else exc!r}); train it with log_model=true"
        ) from None
    found = sorted((local / flavor.get("data", "data")).glob("*.keras"))
    if len(found) != 1:
        raise ValueError(f"run {run_id}: expected one .keras file in the logged model, found {len(found)}")
    return found[0]


def _package_copy(dst: Path) -> Path:
    """A clean copy of the ecg_mlflow package (no caches) to ship with the model."""
    target = dst / "ecg_mlflow"
    shutil.copytree(PACKAGE_DIR, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return target


def log_serving_model(source_run_id: str, *, name: str = SERVING_MODEL_NAME):
    """Log the serving pyfunc built from `source_run_id`'s Keras model into the ACTIVE run.

    Returns the ModelInfo (its `model_uri` is what `promote` registers)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from ecg_mlflow.whole_model import pinned_requirements

    if mlflow.active_run() is None:
        raise RuntimeError("log_serving_model needs an active MLflow run")
    params = MlflowClient().get_run(source_run_id).data.params
    prep = Preprocessing.from_run_params(params, source_run_id)
    with tempfile.TemporaryDirectory(prefix="ecg-serving-") as tmp:
        keras_file = keras_file_of_run(source_run_id, Path(tmp) / "download")
        code = _package_copy(Path(tmp) / "code")
        script = Path(tmp) / "ecg_serving_model.py"
        script.write_text(MODEL_SCRIPT)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(script),
            artifacts={KERAS_ARTIFACT: str(keras_file)},
            model_config=prep.to_config(),
            code_paths=[str(code)],
            signature=serving_signature(),
            pip_requirements=pinned_requirements(*SERVING_REQUIREMENTS),
            tags={"source_run_id": source_run_id},
        )


# ---- client side of the contract: what `predict --url` and the benchmark send -------------


class ServingError(RuntimeError):
    """The server refused a request or could not be reached; the message says which."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def invocation_payload(images: Sequence[bytes]) -> str:
    """The JSON body of `POST /invocations`: one record per image, bytes as base64."""
    records = [{IMAGE_COLUMN: base64.b64encode(bytes(image)).decode("ascii")} for image in images]
    return json.dumps({"dataframe_records": records})


def invocations_url(url: str) -> str:
    """`http://host:5001` -> `http://host:5001/invocations`; a full URL stays as it is."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must look like http://127.0.0.1:5001, got {url!r}")
    return url if parts.path.strip("/") else url.rstrip("/") + "/invocations"


def predict_over_http(url: str, images: Sequence[bytes], *, timeout: float = 300.0, session=None) -> pd.DataFrame:
    """Send images to a served model and return its frame (label + prob_* per image)."""
    import requests

    http = session or requests
    try:
        response = http.post(invocations_url(url), data=invocation_payload(images),
                             headers={"Content-Type": "application/json"}, timeout=timeout)
    except requests.RequestException as exc:
        raise ServingError(f"cannot reach the model server at {url}: {exc}") from None
    if response.status_code != 200:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        # the scoring server prefixes "Failed to predict data '<the whole frame>'. Error: "
        message = message.split("\nError: ", 1)[-1]
        raise ServingError(f"server answered HTTP {response.status_code}: {message}", response.status_code)
    predictions = response.json()["predictions"]
    return pd.DataFrame(predictions, columns=list(OUTPUT_COLUMNS))
