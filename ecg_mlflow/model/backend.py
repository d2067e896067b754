"""The Keras backend a run computes with, and the few things that differ between backends.

Keras 3 models are backend-neutral: a `.keras` file saved under TensorFlow loads under JAX
and the other way round. What is not neutral lives here, one function per concern, with one
implementation per backend: determinism (`make_deterministic`), the precision of the
backbone pass (`precision_scope`), the device the backend computes on. TensorFlow is
imported only on the TensorFlow path, JAX only on the JAX path, with one exception: the
seeds-together head trainer draws each seed's shuffle order with TensorFlow's tf.data
under every backend, as Keras' fit does (`tensorflow_for_heads`), which is why every
install has TensorFlow (`.[cpu]` or `.[gpu]`).

Which backend is active is Keras' decision (KERAS_BACKEND, else `backend` in
$KERAS_HOME/keras.json, else TensorFlow); `configured_backend` reads it the same way without
importing Keras, so a missing backend fails with one line naming the extras to install
instead of Keras' ImportError deep in a traceback.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Callable, Iterator

from ecg_mlflow.model.engines import PRECISIONS as ENGINE_PRECISIONS

DEFAULT_BACKEND = "tensorflow"
"""Keras' own default when neither KERAS_BACKEND nor keras.json names one."""
BACKEND_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch", "numpy": "numpy"}
"""Backend name -> the module Keras imports for it."""
INSTALL_HINT = (
    "install one: pip install -e '.[cpu]' (TensorFlow, CPU), '.[gpu]' (TensorFlow with CUDA, "
    "Linux) or '.[cpu,jax]' and set KERAS_BACKEND=jax"
)
XLA_DETERMINISM_FLAG = "--xla_gpu_deterministic_ops=true"
"""XLA's switch to deterministic GPU kernels (scatter, reductions); read when JAX starts its
GPU backend. XLA on the CPU is deterministic already."""
PRECISIONS = ENGINE_PRECISIONS
"""Values of the `precision` parameter: the engines' (one list for both)."""
DTYPE_POLICIES = {"fp32": "float32", "bf16": "mixed_bfloat16"}
"""Keras dtype policy per precision: bf16 computes in bfloat16 and keeps float32 variables."""


class BackendMissingError(ImportError):
    """The Keras backend that is configured is not installed."""


def configured_backend() -> str:
    """The backend Keras will use, read as Keras reads it, without importing Keras."""
    if "keras" in sys.modules:
        return sys.modules["keras"].backend.backend()
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    config = _keras_dir() / "keras.json"
    try:
        return json.loads(config.read_text()).get("backend", DEFAULT_BACKEND)
    except (OSError, ValueError):
        return DEFAULT_BACKEND


def _keras_dir() -> Path:
    """$KERAS_HOME, else ~/.keras (/tmp/.keras where the home folder is read-only), as Keras."""
    if os.environ.get("KERAS_HOME"):
        return Path(os.environ["KERAS_HOME"])
    home = Path.home()
    return (home if os.access(home, os.W_OK) else Path("/tmp")) / ".keras"


def check_backend_installed() -> str:
    """The configured backend's name; BackendMissingError (one line) when it is not installed."""
    name = configured_backend()
    module = BACKEND_MODULES.get(name, name)
    if importlib.util.find_spec(module) is None:
        raise BackendMissingError(f"Keras backend {name!r} is not installed ({module} not found); {INSTALL_HINT}")
    return name


def backend_name() -> str:
    """The active Keras backend: `tensorflow` or `jax` (what train runs tag)."""
    check_backend_installed()
    import keras

    return keras.backend.backend()


def backend_version() -> str:
    """`tensorflow 2.21.0` or `jax 0.10.2`: the active backend and its version, for reports."""
    import importlib

    name = backend_name()
    return f"{name} {importlib.import_module(BACKEND_MODULES[name]).__version__}"


def request_xla_determinism() -> None:
    """Ask XLA for deterministic GPU kernels. Effective only before JAX starts its backend,
    so commands call it first thing; later calls are harmless."""
    flags = os.environ.get("XLA_FLAGS", "")
    if XLA_DETERMINISM_FLAG.split("=")[0] not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {XLA_DETERMINISM_FLAG}".strip()


def _tensorflow_determinism() -> None:
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


DETERMINISM: dict[str, Callable[[], None]] = {
    "tensorflow": _tensorflow_determinism,
    "jax": request_xla_determinism,
}
"""Backend -> what makes its kernels deterministic (besides the seeds Keras sets)."""


def make_deterministic(seed: int) -> None:
    """Same seed and data, same weights: seed Python, NumPy and the backend (Keras), then
    switch the backend to deterministic kernels."""
    import keras

    keras.utils.set_random_seed(seed)
    DETERMINISM[backend_name()]()


def tensorflow_for_heads():
    """TensorFlow, as the seeds-together head trainer (model/seed_heads.py) uses it under
    every Keras backend: it draws each seed's shuffle order with the tf.data permutation
    Keras' fit draws (its dropout masks are TensorFlow's too, drawn in Numba). Under
    another backend (JAX on a GPU) TensorFlow gets no GPU: it would take the GPU's memory
    from the backend that runs the backbone.
    BackendMissingError (one line) where TensorFlow is not installed."""
    try:
        import tensorflow as tf
    except ImportError:
        raise BackendMissingError(
            "the study's and tune's head trainer (seeds together) draws Keras' shuffle orders with "
            "TensorFlow under every Keras backend, and TensorFlow is not importable: add "
            "'.[cpu]' or '.[gpu]' to '.[jax]'") from None

    if backend_name() != "tensorflow":
        try:
            tf.config.set_visible_devices([], "GPU")
        except RuntimeError:  # TensorFlow had initialised its devices already: keep them
            pass
    return tf


def device_kind() -> str:
    """`gpu` or `cpu` (or `tpu`): where the active backend computes."""
    if backend_name() == "jax":
        import jax

        return jax.devices()[0].platform
    import tensorflow as tf

    return "gpu" if tf.config.list_logical_devices("GPU") else "cpu"


def keras_bf16_missing() -> str:
    """Why engine=keras at bf16 does not pay here, or "" where it does (a GPU). On a CPU
    Keras' bf16 kernels are slower than its fp32 ones (docs/benchmarks.md, "Keras bf16 on
    this CPU"); OpenVINO is the CPU's bf16 engine, where the CPU has native bf16."""
    device = device_kind()
    if device == "gpu":
        return ""
    return f"Keras' bf16 pays on a GPU only, and the {backend_name()} backend computes on the {device} here"


def check_precision(precision: str) -> str:
    """`precision` itself if it is one of PRECISIONS; ValueError naming the values otherwise."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def _matmul_precision(precision: str) -> None:
    """fp32 means float32 matmuls and convolutions: no TF32 on Ampere and later GPUs, where
    both backends use it by default for float32; bf16 leaves the fast default."""
    if backend_name() == "jax":
        import jax

        jax.config.update("jax_default_matmul_precision", "highest" if precision == "fp32" else None)
    else:
        import tensorflow as tf

        tf.config.experimental.enable_tensor_float_32_execution(precision != "fp32")


@contextlib.contextmanager
def precision_scope(precision: str) -> Iterator[str]:
    """Build the backbone inside this scope to run its pass at `precision`.

    Layers take Keras' global dtype policy when they are built, so the extractor built here
    keeps bf16 for its life (feature pass and whole model alike, hence the same numbers),
    while the head, built after the scope, trains in float32 on the float32 cache. Yields
    the Keras policy name.
    """
    import keras

    policy = DTYPE_POLICIES[check_precision(precision)]
    previous = keras.config.dtype_policy()
    _matmul_precision(precision)
    keras.config.set_dtype_policy(policy)
    try:
        yield policy
    finally:
        keras.config.set_dtype_policy(previous)
