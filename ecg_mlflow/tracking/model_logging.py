"""Logging the whole model: signature, pinned requirements, and the check that it computes
what was evaluated (see ecg_mlflow.model.whole_model)."""

from __future__ import annotations

import functools
from pathlib import Path
import sys
from typing import Sequence

import numpy as np

from ecg_mlflow import schema
from ecg_mlflow.config import TrainConfig
from ecg_mlflow.data.preprocess import load_batch, load_pixels
from ecg_mlflow.model.engines import probe_pixels, whole_model_runner
from ecg_mlflow.model.whole_model import assemble_model, check_model_matches_head
from ecg_mlflow.tracking.keras_archive import WholeModelArchive

TENSORFLOW_DISTRIBUTIONS = ("tensorflow-cpu", "tensorflow", "tensorflow-intel", "tensorflow-macos")
"""The names TensorFlow is installed under (CPU build, CUDA build, vendor builds): a model
names the one that is installed, so it serves on a GPU machine and on a CPU one alike."""
BACKEND_PACKAGES = {"jax": ("jax", "jaxlib"), "torch": ("torch",)}


def file_stamp(path) -> tuple[str, int, int]:
    """(path, size, modification time): the key of a decoded file, so a file changed on
    disk is decoded again."""
    stat = Path(path).stat()
    return str(path), stat.st_size, stat.st_mtime_ns


def sample_pixels(image_paths, height: int, width: int, crop: str) -> np.ndarray:
    """The check's images, decoded once per process: every seed of a study checks its
    model on the same test images."""
    pixels = _decoded(tuple(file_stamp(p) for p in image_paths), height, width, crop)
    pixels.flags.writeable = False  # shared between calls
    return pixels


@functools.lru_cache(maxsize=2)
def _decoded(stamps: tuple, height: int, width: int, crop: str) -> np.ndarray:
    return load_batch([path for path, _, _ in stamps], height, width, crop)


def image_pixels(path, height: int, width: int, crop: str) -> np.ndarray:
    """`load_pixels` of one file, decoded once per process (read-only): every seed of a
    study overlays the same sample of test images (tracking/explanations.py)."""
    return _image_pixels(file_stamp(path), height, width, crop)


@functools.lru_cache(maxsize=16)  # two overlay samples of eight
def _image_pixels(stamp: tuple, height: int, width: int, crop: str) -> np.ndarray:
    pixels = load_pixels(stamp[0], height, width, crop)
    pixels.flags.writeable = False
    return pixels


def model_signature(height: int, width: int):
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    return ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, height, width, 3), "image")]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, 4), "probabilities")]),
    )


def installed_version(name: str, path: Sequence[str] | None = None) -> str:
    """Version of the installed distribution `name`, looked up in `path` (default sys.path);
    PackageNotFoundError when it is not installed there."""
    from importlib.metadata import PackageNotFoundError, distributions

    for found in distributions(name=name, path=list(path) if path is not None else sys.path):
        return found.version
    raise PackageNotFoundError(name)


def pinned_requirements(*packages: str, path: Sequence[str] | None = None) -> list[str]:
    """`name==version` of installed packages, so MLflow skips slow requirement inference."""
    return [f"{p}=={installed_version(p, path)}" for p in packages]


def installed_distribution(candidates: Sequence[str], path: Sequence[str] | None = None) -> str:
    """The first of `candidates` that is installed; which TensorFlow build is here."""
    from importlib.metadata import PackageNotFoundError

    for name in candidates:
        try:
            installed_version(name, path)
            return name
        except PackageNotFoundError:
            continue
    raise RuntimeError(f"none of {', '.join(candidates)} is installed")


def engine_packages(engine: str) -> tuple[str, ...]:
    """The packages an engine adds to a model's requirements."""
    return ("openvino",) if engine == "openvino" else ()


def backend_packages(backend: str, path: Sequence[str] | None = None) -> tuple[str, ...]:
    """The distributions a model needs for `backend`: JAX's two, or TensorFlow under the
    name it is installed as (tensorflow-cpu from `.[cpu]`, tensorflow from `.[gpu]`)."""
    return BACKEND_PACKAGES.get(backend) or (installed_distribution(TENSORFLOW_DISTRIBUTIONS, path),)


def keras_requirements(*extra: str, backend: str | None = None, path: Sequence[str] | None = None) -> list[str]:
    """mlflow, keras and the backend that is installed and active (TensorFlow under
    whichever distribution name, or JAX), plus `extra`, pinned to their installed versions.

    A model trained on a GPU machine (`tensorflow==...`) serves on a CPU one and the other
    way round: the plain `tensorflow` wheel runs on the CPU (CUDA comes only with its
    `and-cuda` extra), and `mlflow models serve --env-manager local` installs nothing.
    `backend` and `path` default to the active Keras backend and sys.path."""
    if backend is None:
        from ecg_mlflow.model.backend import backend_name

        backend = backend_name()
    return pinned_requirements("mlflow", "keras", *backend_packages(backend, path), *extra, path=path)


def log_whole_model(config: TrainConfig, head, image_paths, features, say) -> float:
    """Assemble, check against the head on cached features through the run's engine (the path
    the served model runs), record the engine's output on the probe input, log the model."""
    import mlflow

    model = assemble_model(config, head)
    runner = whole_model_runner(model, config.engine, config.precision)
    pixels = sample_pixels(image_paths, config.image_height, config.image_width, config.crop)
    diff = check_model_matches_head(runner, head, pixels, features)
    mlflow.log_metric(schema.METRIC_MODEL_MAX_ABS_DIFF, diff)
    probe = runner.predict(probe_pixels(config.image_height, config.image_width))
    mlflow.log_dict({schema.CONFIG_ENGINE: config.engine, schema.CONFIG_PRECISION: config.precision,
                     schema.CONFIG_PROBE: probe.astype(float).tolist()}, schema.ARTIFACT_ENGINE_PROBE)
    say(f"whole model ({runner.choice.describe()}) equals head on cached features "
        f"(max abs diff {diff:.1e}); logging it")
    mlflow.keras.log_model(
        WholeModelArchive(model),  # Keras' archive, the backbone's part saved once per process
        name=schema.MODEL_ARTIFACT,
        signature=model_signature(config.image_height, config.image_width),
        pip_requirements=keras_requirements(*engine_packages(config.engine)),
    )
    return diff
