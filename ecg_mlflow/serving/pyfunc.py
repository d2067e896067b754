"""The served model: ECG report image bytes in, diagnosis and class probabilities out.

`EcgImageClassifier` is an MLflow pyfunc (DESIGN.md, serving contract). It wraps the Keras
model that a train run logged (no retraining) and preprocesses with `load_pixels`, the same
function training used, at the source run's image size and crop. It runs the model through
the engine and precision the run's features were computed with (model/engines.py: the
backbone compiled by OpenVINO, the head in Keras), the path the run's whole-model check ran;
where this host cannot, it logs a warning at load time naming what it falls back to and the
measured difference from the recorded engine's output on a fixed probe input. The logged pyfunc carries
its own copy of the modules it imports (`code_paths`, see packaging.py), so a registered
version keeps the preprocessing it was promoted with even when the installed package changes
later. It is logged as models-from-code, so loading it unpickles nothing, and the Keras model
loads in safe mode.

Bad input never reaches the model: every row is decoded first, every bad row is collected,
and one `BadImageRows` (an MlflowException with INVALID_PARAMETER_VALUE, which MLflow's
scoring server answers with HTTP 400) names them all with their reasons.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from ecg_mlflow import schema
from ecg_mlflow.data.classes import CLASSES
from ecg_mlflow.data.preprocess import ImageDecodeError, load_pixels
from ecg_mlflow.model.engines import EngineChoice, probe_pixels, whole_model_runner

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
OUTPUT_COLUMNS: tuple[str, ...] = (LABEL_COLUMN,) + schema.PROB_COLUMNS
KERAS_ARTIFACT = "keras_model"
PREDICT_BATCH = 8
"""Images per Keras call: bounds the activation memory of a large request."""
LOGGER = logging.getLogger(__name__)


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
    frame = pd.DataFrame(probabilities, columns=list(schema.PROB_COLUMNS))
    labels = [CLASSES[i] for i in probabilities.argmax(axis=1)] if len(frame) else []
    frame.insert(0, LABEL_COLUMN, pd.Series(labels, dtype=object))
    return frame


def report_engine(choice: EngineChoice, probe_out: np.ndarray, recorded) -> float | None:
    """Log which engine serves (a warning when it is not the recorded one) with the max abs
    difference of its probabilities on the probe input from the recorded engine's; return it."""
    if not LOGGER.handlers and not logging.getLogger().handlers:  # the scoring server sets none
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        LOGGER.addHandler(handler)
        LOGGER.setLevel(logging.INFO)
    diff = None
    if recorded is not None:
        diff = float(np.abs(np.asarray(recorded, np.float64) - probe_out).max())
    measured = (f"max abs difference from the recorded engine's probabilities on the probe input "
                f"{diff:.2e}" if diff is not None else "no recorded probe output to compare with")
    if choice.fallback:
        LOGGER.warning("ECG classifier: %s; %s", choice.describe(), measured)
    else:
        LOGGER.info("ECG classifier serving with %s; %s", choice.describe(), measured)
    return diff


class EcgImageClassifier(PythonModel):
    """Pyfunc: DataFrame with a binary `image` column -> `label` and `prob_*` per row."""

    def load_context(self, context) -> None:
        import keras

        config = context.model_config
        self._prep = Preprocessing.from_config(config)
        # safe_mode: refuse any lambda or arbitrary-code deserialisation; the model has
        # built-in layers only (backbones.py), so a model that needs more is not ours.
        self._model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False, safe_mode=True)
        self._lock = threading.Lock()
        self._runner = whole_model_runner(self._model, str(config.get(schema.CONFIG_ENGINE, "keras")),
                                          str(config.get(schema.CONFIG_PRECISION, "fp32")), allow_fallback=True)
        # The probe also pays the first call's graph tracing at load time, not on a request.
        self.probe_diff = report_engine(self.engine, self._infer(self._probe()), config.get(schema.CONFIG_PROBE))

    @property
    def engine(self) -> EngineChoice:
        """The engine and precision this model runs, and what was recorded."""
        return self._runner.choice

    def _probe(self) -> np.ndarray:
        return probe_pixels(self._prep.image_height, self._prep.image_width)

    def _infer(self, pixels: np.ndarray) -> np.ndarray:
        # The scoring server runs requests in threads; the engine already uses every core for
        # one batch, so inference is serialised while decoding (in PIL, GIL released) overlaps.
        with self._lock:
            out = [self._runner.predict_on_batch(pixels[i:i + PREDICT_BATCH])
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
