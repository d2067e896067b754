"""The served model: ECG report image bytes in, diagnosis and class probabilities out.

`EcgImageClassifier` is an MLflow pyfunc (DESIGN.md, serving contract). It wraps the Keras
model that a train run logged (no retraining) and preprocesses with `load_pixels`, the same
function training used, at the source run's image size and crop. The logged pyfunc carries
its own copy of the modules it imports (`code_paths`, see packaging.py), so a registered
version keeps the preprocessing it was promoted with even when the installed package changes
later. It is logged as models-from-code, so loading it unpickles nothing, and the Keras model
loads in safe mode.

With the param `explain` (schema.EXPLAIN_PARAM, boolean, default false) the reply also holds
each image's Grad-CAM attribution per report region for its predicted class
(`attr_<region>`) and its text share (model/explain.py, model/regions.py); the network that
gives the last convolution's maps is built on the first such request, so plain requests do
exactly the work they did before.

Bad input never reaches the model: every row is decoded first, every bad row is collected,
and one `BadImageRows` (an MlflowException with INVALID_PARAMETER_VALUE, which MLflow's
scoring server answers with HTTP 400) names them all with their reasons.
"""

from __future__ import annotations

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
from ecg_mlflow.model import regions

IMAGE_COLUMN = "image"
LABEL_COLUMN = "label"
OUTPUT_COLUMNS: tuple[str, ...] = (LABEL_COLUMN,) + schema.PROB_COLUMNS
EXPLAIN_COLUMNS: tuple[str, ...] = (schema.COL_TEXT_SHARE,) + tuple(
    schema.attribution_column(s) for s in regions.REGION_SLUGS
)
"""Added to OUTPUT_COLUMNS when a request sets `explain`."""
KERAS_ARTIFACT = "keras_model"
PREDICT_BATCH = 8
"""Images per Keras call: bounds the activation memory of a large request."""


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


def explanation_frame(probabilities: np.ndarray, of_predicted: np.ndarray) -> pd.DataFrame:
    """The served frame plus the text share and `attr_<region>` of the predicted class."""
    frame = probabilities_frame(probabilities)
    frame[schema.COL_TEXT_SHARE] = regions.text_shares(of_predicted).astype(np.float64)
    for index, slug in enumerate(regions.REGION_SLUGS):
        frame[schema.attribution_column(slug)] = np.asarray(of_predicted[:, index], np.float64)
    return frame


def wants_explanation(params: dict[str, Any] | None) -> bool:
    """Whether the request's params ask for attributions (a bool, or "true"/"1" as text)."""
    value = (params or {}).get(schema.EXPLAIN_PARAM, False)
    return value is True or str(value).strip().lower() in ("true", "1")


def probabilities_frame(probabilities: np.ndarray) -> pd.DataFrame:
    """(n, 4) probabilities in CLASSES order -> the served frame: label + prob_* (float64)."""
    probabilities = np.asarray(probabilities, dtype=np.float64).reshape(-1, len(CLASSES))
    frame = pd.DataFrame(probabilities, columns=list(schema.PROB_COLUMNS))
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
        self._explainer = None  # (maps model, head), built on the first `explain` request
        # The first call traces the graph (seconds); pay it at load time, not on a request.
        self._infer(np.zeros((1, self._prep.image_height, self._prep.image_width, 3), np.float32))

    def _infer(self, pixels: np.ndarray) -> np.ndarray:
        # The scoring server runs requests in threads; TF already uses every core for one
        # batch, so inference is serialised while decoding (in PIL, GIL released) overlaps.
        with self._lock:
            out = [np.asarray(self._model.predict_on_batch(pixels[i:i + PREDICT_BATCH]))
                   for i in range(0, len(pixels), PREDICT_BATCH)]
        return np.concatenate(out) if out else np.zeros((0, len(CLASSES)))

    def _explain(self, pixels: np.ndarray):
        from ecg_mlflow.model.explain import build_maps_model, explain_pixels, split_whole_model

        with self._lock:
            if self._explainer is None:
                extractor, head = split_whole_model(self._model)
                self._explainer = (build_maps_model(extractor), head)
            maps_model, head = self._explainer
            return explain_pixels(maps_model, head, pixels, self._prep.crop)

    @property
    def preprocessing(self) -> Preprocessing:
        return self._prep

    def explain_images(self, images: Sequence[Any]):
        """(pixels, model/explain.Explanation with the Grad-CAM map) of image bytes: what
        `ecg-mlflow explain --model` draws its overlays from. BadImageRows names bad rows."""
        pixels = decode_rows(list(images), self._prep)
        return pixels, self._explain(pixels)

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Args:
            model_input: one row per image; column `image` holds JPEG/PNG bytes (the
                scoring server has already base64-decoded them from JSON).
            params: `{"explain": true}` adds the per-region attribution (EXPLAIN_COLUMNS).

        Returns:
            One row per image: `label` (a class of CLASSES) and `prob_mi`, `prob_hmi`,
            `prob_ahb`, `prob_norm` (float64, summing to 1); with `explain`, also
            `text_attribution_share` and `attr_<region>` (Grad-CAM of the predicted class,
            signed, logit units; regions of model/regions.py).

        Raises:
            MissingImageColumn, BadImageRows: MlflowExceptions that the server answers with 400.
        """
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            columns = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else []
            raise MissingImageColumn(columns)
        pixels = decode_rows(list(model_input[IMAGE_COLUMN]), self._prep)
        if wants_explanation(params) and len(pixels):
            explained = self._explain(pixels)
            return explanation_frame(explained.probabilities, explained.of_predicted)
        return probabilities_frame(self._infer(pixels))
