"""Backbone engines: run the frozen Keras extractor through Keras or through OpenVINO on the CPU.

The Keras model stays the one artifact (built by backbones.py, saved and loaded in safe mode);
an engine only decides how its forward pass is executed. `openvino` converts the Keras model
with `openvino.convert_model` and compiles it for the CPU at a precision: `fp32`
(INFERENCE_PRECISION_HINT f32) or `bf16` (bf16 matrix kernels, AMX or AVX-512 BF16).

Training, the whole-model check and the served model all go through `whole_model_runner`, so
the check compares like with like: the served model runs the very engine path the check ran.

What a host can run is settled by `resolve_engine`, which says what it falls back to and why:
openvino not importable, or the CPU without native bf16 (OpenVINO then silently computes in
f32, so the capability is checked, not assumed). Two environment variables simulate such a
host for tests and for comparing engines on one machine: ECG_MLFLOW_DISABLE_OPENVINO=1 (as if
openvino were not installed) and ECG_MLFLOW_DISABLE_BF16=1 (as if the CPU had no bf16).

Under OpenVINO a backbone is compiled as its maps model (`maps_model_of`), whose pooled output
is the extractor's: one conversion per backbone serves the feature pass, which needs the maps too,
and the whole model. This module imports nothing else of ecg_mlflow but explain.py (for that
network): the served model ships both (SERVED_MODULES).
"""

from __future__ import annotations

import functools
import os
import threading
import warnings
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

ENGINES: tuple[str, ...] = ("keras", "openvino")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16")
DISABLE_OPENVINO_ENV = "ECG_MLFLOW_DISABLE_OPENVINO"
DISABLE_BF16_ENV = "ECG_MLFLOW_DISABLE_BF16"
OPENVINO_DEVICE = "CPU"
OPENVINO_PRECISION = {"fp32": "f32", "bf16": "bf16"}
"""Our precision name -> OpenVINO's INFERENCE_PRECISION_HINT value."""
BF16_CAPABILITY = "BF16"
"""Entry of the CPU plugin's OPTIMIZATION_CAPABILITIES on CPUs with native bf16."""
COMPILED_CACHE_SIZE = 4
PROBE_SEED = 20260412
PROBE_IMAGES = 2


class EngineUnavailable(RuntimeError):
    """The requested engine or precision cannot run on this host; the message says why."""


@dataclass(frozen=True)
class EngineChoice:
    """What runs (engine, precision) for what was asked; `reason` says why they differ."""

    requested_engine: str
    requested_precision: str
    engine: str
    precision: str
    reason: str = ""

    @property
    def fallback(self) -> bool:
        return (self.engine, self.precision) != (self.requested_engine, self.requested_precision)

    def describe(self) -> str:
        ran = f"engine {self.engine}, precision {self.precision}"
        if not self.fallback:
            return ran
        return (f"recorded engine {self.requested_engine}, precision {self.requested_precision} "
                f"cannot run here ({self.reason}); falling back to {ran}")


def check_engine_pair(engine: str, precision: str) -> None:
    """Refuse names outside ENGINES/PRECISIONS. Every pair is a valid name: keras + bf16 is
    Keras' mixed_bfloat16 (for a GPU; training checks the device, config.py), openvino + bf16
    OpenVINO's bf16 kernels (for a CPU with AMX or AVX-512 BF16)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}; got {engine!r}")
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}; got {precision!r}")


def openvino_missing() -> str:
    """Why openvino cannot be used here, or "" when it can."""
    if os.environ.get(DISABLE_OPENVINO_ENV, "").strip() not in ("", "0"):
        return f"openvino disabled by {DISABLE_OPENVINO_ENV}"
    try:
        import openvino  # noqa: F401
    except ImportError as exc:
        return f"openvino is not importable ({exc})"
    import keras

    if keras.backend.backend() != "tensorflow":
        return f"openvino converts Keras models through TensorFlow and the Keras backend is {keras.backend.backend()}"
    return ""


def cpu_capabilities() -> tuple[str, ...]:
    """OpenVINO's OPTIMIZATION_CAPABILITIES of the CPU (FP32, INT8, BF16, ...)."""
    import openvino

    return tuple(openvino.Core().get_property(OPENVINO_DEVICE, "OPTIMIZATION_CAPABILITIES"))


def bf16_missing() -> str:
    """Why the CPU cannot compute in bf16, or "" when it can."""
    if os.environ.get(DISABLE_BF16_ENV, "").strip() not in ("", "0"):
        return f"bf16 disabled by {DISABLE_BF16_ENV}"
    capabilities = cpu_capabilities()
    if BF16_CAPABILITY not in capabilities:
        return (f"the CPU has no native bf16 (OpenVINO capabilities {', '.join(capabilities)}; "
                "bf16 needs AMX or AVX-512 BF16)")
    return ""


def resolve_engine(engine: str, precision: str) -> EngineChoice:
    """The engine and precision this host runs for the requested pair, and why if they differ:
    without openvino, Keras fp32; without native bf16, OpenVINO fp32."""
    check_engine_pair(engine, precision)
    if engine == "keras":
        return EngineChoice(engine, precision, engine, precision)
    missing = openvino_missing()
    if missing:
        return EngineChoice(engine, precision, "keras", "fp32", missing)
    if precision == "bf16":
        missing = bf16_missing()
        if missing:
            return EngineChoice(engine, precision, "openvino", "fp32", missing)
    return EngineChoice(engine, precision, engine, precision)


def require_engine(engine: str, precision: str) -> EngineChoice:
    """resolve_engine, raising EngineUnavailable instead of falling back: features and models
    are recorded with the engine they were computed with, so training never substitutes."""
    choice = resolve_engine(engine, precision)
    if choice.fallback:
        name = "engine" if choice.engine != engine else "precision"
        raise EngineUnavailable(
            f"{name}: engine={engine} precision={precision} cannot run on this host "
            f"({choice.reason}); choose another {name}"
        )
    return choice


def convert_keras(model):
    """The OpenVINO model of a Keras model (traced through TensorFlow: tens of seconds)."""
    import openvino

    with warnings.catch_warnings():  # Keras' note on input structure during tracing
        warnings.simplefilter("ignore")
        return openvino.convert_model(model)


class OpenVinoRunner:
    """A Keras model compiled by OpenVINO for the CPU, called like `predict_on_batch`:
    a float32 batch in, one array out (a list of arrays for a model with several outputs).
    `converted` reuses one conversion for several precisions."""

    def __init__(self, model, precision: str, *, converted=None):
        import openvino

        converted = convert_keras(model) if converted is None else converted
        config = {"INFERENCE_PRECISION_HINT": OPENVINO_PRECISION[precision], "PERFORMANCE_HINT": "LATENCY"}
        self.compiled = openvino.Core().compile_model(converted, OPENVINO_DEVICE, config)
        self.precision = precision
        self.n_outputs = len(self.compiled.outputs)
        self.features: PooledFeatures | None = None  # of a maps model: compiled_features' view of it

    @property
    def compiled_precision(self) -> str:
        """The precision OpenVINO actually compiled for (f32 where the CPU lacks bf16)."""
        return str(self.compiled.get_property("INFERENCE_PRECISION_HINT"))

    def predict_on_batch(self, pixels: np.ndarray):
        # One infer request per call: a compiled model's own request is not thread-safe.
        request = self.compiled.create_infer_request()
        request.infer({0: np.ascontiguousarray(pixels, dtype=np.float32)})
        outputs = [np.array(request.get_output_tensor(i).data, copy=True) for i in range(self.n_outputs)]
        return outputs[0] if self.n_outputs == 1 else outputs


_COMPILED: OrderedDict[tuple[int, str], tuple[object, OpenVinoRunner]] = OrderedDict()
_COMPILED_LOCK = threading.Lock()


def compiled_openvino(model, precision: str) -> OpenVinoRunner:
    """The OpenVINO compilation of `model` at `precision`, once per model object and process
    (converting a backbone takes tens of seconds); the model is kept so its id stays its own."""
    key = (id(model), precision)
    with _COMPILED_LOCK:
        found = _COMPILED.get(key)
        if found is not None and found[0] is model:
            _COMPILED.move_to_end(key)
            return found[1]
    runner = OpenVinoRunner(model, precision)
    with _COMPILED_LOCK:
        _COMPILED[key] = (model, runner)
        while len(_COMPILED) > COMPILED_CACHE_SIZE:
            _COMPILED.popitem(last=False)
    return runner


def extractor_runner(extractor, engine: str, precision: str):
    """What runs the frozen extractor for (engine, precision): the Keras model itself, or the
    OpenVINO compilation of its maps model, for the features (`compiled_features`). Fails
    (EngineUnavailable) where the host cannot run the pair."""
    choice = require_engine(engine, precision)
    if choice.engine == "keras":
        return extractor
    return compiled_features(extractor, choice.precision)


def maps_runner(maps_model, engine: str, precision: str):
    """What runs a maps model (`maps_model_of`) for (engine, precision): the Keras model
    itself, or its OpenVINO compilation; both give [maps, features]."""
    choice = require_engine(engine, precision)
    if choice.engine == "keras":
        return maps_model
    return compiled_openvino(maps_model, choice.precision)


def maps_model_of(extractor):
    """The extractor's network with two outputs, its last convolution's maps and the pooled
    features (explain.build_maps_model), built once per extractor object. It is the one
    network OpenVINO compiles per backbone: the feature pass takes both outputs, the whole
    model (its check in training and the served model) the features alone. So a study
    converts each backbone once, not twice (a few seconds each), and the served model runs
    the very graph its cached features came from."""
    from ecg_mlflow.model.explain import build_maps_model

    cached = getattr(extractor, "_ecg_maps_model", None)
    if cached is None:
        cached = build_maps_model(extractor)
        extractor._ecg_maps_model = cached
    return cached


class PooledFeatures:
    """A compiled maps model called for its pooled features alone, like a compiled extractor."""

    def __init__(self, maps: OpenVinoRunner):
        self.maps = maps

    def predict_on_batch(self, pixels: np.ndarray) -> np.ndarray:
        return self.maps.predict_on_batch(pixels)[1]


def compiled_features(extractor, precision: str) -> PooledFeatures:
    """The extractor's features through OpenVINO: its maps model compiled (once per process,
    `compiled_openvino`), one PooledFeatures per compilation."""
    maps = compiled_openvino(maps_model_of(extractor), precision)
    with _COMPILED_LOCK:
        if maps.features is None:
            maps.features = PooledFeatures(maps)
        return maps.features


def split_whole_model(model):
    """(backbone, head) of a whole model as whole_model.assemble_model builds it: an input,
    the frozen extractor, the head (the extractor's first output is the pooled features)."""
    import keras

    inner = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    if len(inner) != 2 or not all(isinstance(layer, keras.Model) for layer in inner):
        names = ", ".join(layer.name for layer in inner)
        raise ValueError(f"expected a whole model of extractor and head, found layers {names}")
    return inner[0], inner[1]


_BACKBONE_OUTPUTS: OrderedDict[tuple[int, int, int], tuple[object, np.ndarray, list]] = OrderedDict()
_BACKBONE_OUTPUTS_LOCK = threading.Lock()
BACKBONE_OUTPUTS_CACHE_SIZE = 8


class WholeModelRunner:
    """The whole model run by an engine: Keras end to end, or the backbone through OpenVINO and
    the head in Keras. `predict_on_batch` takes RGB 0..255 pixels, returns probabilities.

    With OpenVINO, `predict` keeps the compiled backbone's features of a read-only batch
    (per compiled backbone and batch object): training checks every seed's model on the
    same read-only test images and probe, so a backbone's seeds run it on them once, and
    each seed's check runs its own head on those features. Requests arrive writeable and
    always run the backbone."""

    def __init__(self, model, choice: EngineChoice):
        self.choice = choice
        self.model = model
        if choice.engine == "keras":
            self.backbone, self.head = None, None
        else:
            backbone, self.head = split_whole_model(model)
            self.backbone = compiled_features(backbone, choice.precision)

    def predict_on_batch(self, pixels: np.ndarray) -> np.ndarray:
        if self.backbone is None:
            return np.asarray(self.model.predict_on_batch(pixels))
        return self._head(self.backbone.predict_on_batch(pixels))

    def predict(self, pixels: np.ndarray, batch_size: int = 8) -> np.ndarray:
        if self.backbone is None or pixels.flags.writeable:
            out = [self.predict_on_batch(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
        else:
            out = [self._head(features) for features in self._kept_features(pixels, batch_size)]
        return np.concatenate(out)

    def _head(self, features) -> np.ndarray:
        features = features[0] if isinstance(features, list) else features
        return np.asarray(self.head.predict_on_batch(features))

    def _kept_features(self, pixels: np.ndarray, batch_size: int) -> list:
        key = (id(self.backbone), id(pixels), batch_size)
        with _BACKBONE_OUTPUTS_LOCK:
            found = _BACKBONE_OUTPUTS.get(key)
            if found is not None and found[0] is self.backbone and found[1] is pixels:
                return found[2]
        features = [self.backbone.predict_on_batch(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)]
        with _BACKBONE_OUTPUTS_LOCK:  # the backbone and batch are kept so their ids stay theirs
            _BACKBONE_OUTPUTS[key] = (self.backbone, pixels, features)
            while len(_BACKBONE_OUTPUTS) > BACKBONE_OUTPUTS_CACHE_SIZE:
                _BACKBONE_OUTPUTS.popitem(last=False)
        return features


def whole_model_runner(model, engine: str, precision: str, *, allow_fallback: bool = False) -> WholeModelRunner:
    """The whole model under (engine, precision). Training refuses a substitute (the default);
    serving passes allow_fallback=True and reports `runner.choice.describe()`."""
    choice = resolve_engine(engine, precision) if allow_fallback else require_engine(engine, precision)
    return WholeModelRunner(model, choice)


@functools.lru_cache(maxsize=4)
def probe_pixels(height: int, width: int) -> np.ndarray:
    """Fixed pseudo-random RGB images (PROBE_SEED): the input on which a served model's
    engine is compared with the recorded engine's output. One read-only array per size."""
    rng = np.random.default_rng(PROBE_SEED)
    pixels = rng.integers(0, 256, (PROBE_IMAGES, height, width, 3), dtype=np.uint8).astype(np.float32)
    pixels.flags.writeable = False
    return pixels
