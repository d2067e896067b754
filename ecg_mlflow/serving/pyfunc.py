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

With the param `explain` (schema.EXPLAIN_PARAM, boolean, default false) the reply also holds
each image's Grad-CAM attribution per report region for its predicted class
(`attr_<region>`) and its text share (model/explain.py, model/regions.py); the network that
gives the last convolution's maps is built on the first such request, so plain requests do
exactly the work they did before.

Bad input never reaches the model: every row is decoded first, every bad row is collected,
and one `BadImageRows` (an MlflowException with INVALID_PARAMETER_VALUE, which MLflow's
scoring server answers with HTTP 400) names them with their reasons (the first
limits.MAX_LISTED_ROWS, then a count). The `image` column is declared `any` in the
signature, so MLflow hands over the JSON values as they came (a null, a number, bad base64)
and `image_bytes` decodes base64 here, naming the row that fails; in process, bytes pass.

Memory is bounded (serving/limits.py): a request has at most `max_rows` rows, decoded one at
a time into a uint8 buffer at the model's input size; at most `max_concurrent_requests`
requests decode and predict at once. Any other failure is logged with its stack trace and
answered with a short message: MLflow would otherwise put the trace in the reply.
"""

from __future__ import annotations

import base64
import binascii
import logging
import threading
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE
from mlflow.pyfunc import PythonModel

from ecg_mlflow import schema
from ecg_mlflow.data.classes import CLASSES
from ecg_mlflow.data.preprocess import ImageDecodeError, load_pixels
from ecg_mlflow.model import regions
from ecg_mlflow.serving.limits import MAX_ROWS_ENV, list_bad_rows, resolve_limits
from ecg_mlflow.model.engines import EngineChoice, probe_pixels, whole_model_runner

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
LOGGED_TRACES_PER_REQUEST = 3
"""Decoder failures per request whose stack trace goes to the server log."""

LOGGER = logging.getLogger(__name__)


class BadImageRows(MlflowException):
    """Rows of a request that are no usable image. `rows` maps row position to reason."""

    def __init__(self, rows: dict[int, str], n_rows: int):
        self.rows = dict(rows)
        listed = list_bad_rows(self.rows)
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


class TooManyRows(MlflowException):
    """A request with more rows than the served model takes at once."""

    def __init__(self, n_rows: int, max_rows: int):
        super().__init__(
            f"the request has {n_rows} rows; the limit is {max_rows} rows per request "
            f"({MAX_ROWS_ENV} on the server); send the images in chunks of at most {max_rows}",
            error_code=INVALID_PARAMETER_VALUE,
        )


class ServerBusy(MlflowException):
    """No decoding slot came free in time (HTTP 503); the client may retry."""

    def __init__(self, max_concurrent: int, waited_s: float):
        super().__init__(
            f"server busy: {max_concurrent} requests are decoding at once (the limit) and no slot "
            f"came free within {waited_s:.0f} s; retry later",
            error_code=TEMPORARILY_UNAVAILABLE,
        )


class PredictionFailed(MlflowException):
    """An unexpected failure: the reply says so in one line; the server log has the trace."""

    def __init__(self, exc: BaseException):
        super().__init__(
            f"internal error while predicting ({type(exc).__name__}); the server log has the details",
            error_code=INTERNAL_ERROR,
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



def image_bytes(value: Any) -> bytes:
    """A row's image bytes: bytes as they are (in process), a str as base64 (JSON over HTTP,
    newlines allowed as MLflow's own client writes them); anything else is an ImageDecodeError."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        raise ImageDecodeError("missing image (null)")
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if not isinstance(value, str):
        raise ImageDecodeError(f"expected base64 JPEG/PNG bytes, got {type(value).__name__}")
    try:
        return base64.b64decode("".join(value.split()), validate=True)
    except (binascii.Error, ValueError):
        raise ImageDecodeError("not base64: send the JPEG/PNG bytes base64-encoded") from None


def decode_rows(images: Sequence[Any], prep: Preprocessing) -> np.ndarray:
    """All rows as uint8 (n, H, W, 3) pixels 0..255, decoded one at a time into one buffer;
    BadImageRows names every bad row (the first few decoder traces go to the server log)."""
    pixels = np.zeros((len(images), prep.image_height, prep.image_width, 3), np.uint8)
    bad: dict[int, str] = {}
    for index, value in enumerate(images):
        try:
            pixels[index] = load_pixels(image_bytes(value), prep.image_height, prep.image_width, prep.crop)
        except ImageDecodeError as exc:
            bad[index] = str(exc)
            if exc.__cause__ is not None and len(bad) <= LOGGED_TRACES_PER_REQUEST:
                LOGGER.warning("row %d refused: %s", index, exc, exc_info=exc)
    if bad:
        raise BadImageRows(bad, len(images))
    return pixels


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
    """Pyfunc: DataFrame with an `image` column (bytes or base64) -> `label` and `prob_*` per row."""

    def load_context(self, context) -> None:
        import keras

        config = context.model_config
        self._prep = Preprocessing.from_config(config)
        # safe_mode: refuse any lambda or arbitrary-code deserialisation; the model has
        # built-in layers only (backbones.py), so a model that needs more is not ours.
        self._model = keras.saving.load_model(context.artifacts[KERAS_ARTIFACT], compile=False, safe_mode=True)
        self._lock = threading.Lock()
        self._explainer = None  # (maps model, head), built on the first `explain` request
        self._limits = resolve_limits(context.model_config)
        self._slots = threading.BoundedSemaphore(self._limits.max_concurrent_requests)
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
            out = [self._runner.predict_on_batch(pixels[i:i + PREDICT_BATCH].astype(np.float32))
                   for i in range(0, len(pixels), PREDICT_BATCH)]
        return np.concatenate(out) if out else np.zeros((0, len(CLASSES)))

    def _explain(self, pixels: np.ndarray):
        from ecg_mlflow.model.engines import split_whole_model
        from ecg_mlflow.model.explain import build_maps_model, explain_pixels

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
            model_input: one row per image; column `image` holds JPEG/PNG bytes, or their
                base64 text (as JSON carries them over HTTP); at most `max_rows` rows.
            params: `{"explain": true}` adds the per-region attribution (EXPLAIN_COLUMNS).

        Returns:
            One row per image: `label` (a class of CLASSES) and `prob_mi`, `prob_hmi`,
            `prob_ahb`, `prob_norm` (float64, summing to 1); with `explain`, also
            `text_attribution_share` and `attr_<region>` (Grad-CAM of the predicted class,
            signed, logit units; regions of model/regions.py).

        Raises:
            MissingImageColumn, TooManyRows, BadImageRows: answered with HTTP 400.
            ServerBusy: no decoding slot within `queue_timeout_s` (503).
            PredictionFailed: anything else, in one line without a trace (500).
        """
        if not isinstance(model_input, pd.DataFrame) or IMAGE_COLUMN not in model_input.columns:
            columns = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else []
            raise MissingImageColumn(columns)
        limits = self._limits
        if len(model_input) > limits.max_rows:
            raise TooManyRows(len(model_input), limits.max_rows)
        if not self._slots.acquire(timeout=limits.queue_timeout_s):
            raise ServerBusy(limits.max_concurrent_requests, limits.queue_timeout_s)
        try:
            pixels = decode_rows(list(model_input[IMAGE_COLUMN]), self._prep)
            if wants_explanation(params) and len(pixels):
                explained = self._explain(pixels)
                return explanation_frame(explained.probabilities, explained.of_predicted)
            return probabilities_frame(self._infer(pixels))
        except MlflowException:
            raise
        except Exception as exc:
            LOGGER.exception("prediction failed")
            raise PredictionFailed(exc) from None
        finally:
            self._slots.release()
