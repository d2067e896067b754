"""Keras backend portability: which backend, its requirements in every logged model, its
determinism and precision, and models that move between TensorFlow and JAX.

The requirement tests read real package metadata (importlib.metadata) from site folders that
hold a `*.dist-info` for each package, as pip leaves them, so the TensorFlow build a GPU
install brings (`tensorflow`) and the CPU one (`tensorflow-cpu`) are both checked on any
machine. The cross-backend and JAX subprocess tests run in the JAX lane (`make test-jax`), once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ecg_mlflow.model.backend import (
    BACKEND_MODULES, DTYPE_POLICIES, INSTALL_HINT, PRECISIONS, XLA_DETERMINISM_FLAG, backend_name,
    check_precision, configured_backend,
)
from ecg_mlflow.tracking.model_logging import installed_distribution, keras_requirements

from conftest import PROJECT_ROOT

BACKENDS = ("tensorflow", "jax")
ACTIVE = backend_name()
OTHER = next(b for b in BACKENDS if b != ACTIVE)
OTHER_INSTALLED = importlib.util.find_spec(BACKEND_MODULES[OTHER]) is not None
IN_JAX_LANE = ACTIVE == "jax"
jax_lane_only = pytest.mark.skipif(
    not IN_JAX_LANE, reason="runs JAX in subprocesses: in the JAX lane (`make test-jax`), not twice")
needs_both_backends = pytest.mark.skipif(
    not IN_JAX_LANE or not OTHER_INSTALLED,
    reason=f"runs both backends in subprocesses: once, in the JAX lane (`make test-jax`), where both are "
           f"installed (active {ACTIVE}, {OTHER} {'installed' if OTHER_INSTALLED else 'not installed'})",
)


def fake_site(root: Path, **versions: str) -> list[str]:
    """A site folder holding a dist-info (METADATA as pip writes it) per `name=version`."""
    root.mkdir(parents=True, exist_ok=True)
    for name, version in versions.items():
        dist = name.replace("-", "_")
        info = root / f"{dist}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    return [str(root)]


def run_python(code: str, backend: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(PROJECT_ROOT), TF_CPP_MIN_LOG_LEVEL="3")
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.parametrize("tensorflow", ["tensorflow", "tensorflow-cpu"])
def test_the_model_names_the_tensorflow_build_that_is_installed(tensorflow, tmp_path):
    """A GPU install (`.[gpu]`) brings `tensorflow`, a CPU one `tensorflow-cpu`: each model
    names its own, and either serves on the other kind of machine."""
    site = fake_site(tmp_path, mlflow="3.17.2", keras="3.15.1", **{tensorflow: "2.21.0"})
    assert installed_distribution(("tensorflow-cpu", "tensorflow"), site) == tensorflow
    assert keras_requirements(backend="tensorflow", path=site) == [
        "mlflow==3.17.2", "keras==3.15.1", f"{tensorflow}==2.21.0"]


def test_a_jax_model_names_jax_and_jaxlib(tmp_path):
    site = fake_site(tmp_path, mlflow="3.17.2", keras="3.15.1", jax="0.10.2", jaxlib="0.10.2", pillow="13.0.0")
    assert keras_requirements("pillow", backend="jax", path=site) == [
        "mlflow==3.17.2", "keras==3.15.1", "jax==0.10.2", "jaxlib==0.10.2", "pillow==13.0.0"]


def test_no_tensorflow_build_installed_is_an_error_naming_the_candidates(tmp_path):
    site = fake_site(tmp_path, mlflow="3.17.2", keras="3.15.1")
    with pytest.raises(RuntimeError, match="none of tensorflow-cpu, tensorflow"):
        keras_requirements(backend="tensorflow", path=site)


def test_the_active_backend_is_what_the_requirements_pin():
    names = [r.split("==")[0] for r in keras_requirements()]
    if ACTIVE == "jax":
        assert names == ["mlflow", "keras", "jax", "jaxlib"]
    else:
        assert names[:2] == ["mlflow", "keras"] and names[2].startswith("tensorflow")


def test_a_missing_backend_is_one_line_naming_the_extras(tmp_path):
    """KERAS_BACKEND names a backend that is not installed: the CLI says so in one line,
    before Keras' ImportError."""
    env = dict(os.environ, KERAS_BACKEND="torch", PYTHONPATH=str(PROJECT_ROOT))
    if importlib.util.find_spec("torch") is not None:
        pytest.skip("torch is installed here, so KERAS_BACKEND=torch is no missing backend")
    done = subprocess.run([sys.executable, "-m", "ecg_mlflow", "synth", "--out", str(tmp_path / "x")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert lines == [f"Error: Keras backend 'torch' is not installed (torch not found); {INSTALL_HINT}"]
    assert "'.[cpu]'" in lines[0] and "'.[gpu]'" in lines[0] and "'.[cpu,jax]'" in lines[0]


def test_the_configured_backend_is_read_as_keras_reads_it(tmp_path):
    """keras.json under KERAS_HOME, overridden by KERAS_BACKEND (read without importing Keras)."""
    (tmp_path / "keras.json").write_text(json.dumps({"backend": "jax"}))
    code = "from ecg_mlflow.model.backend import configured_backend as c; print(c())"
    env = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    env.update(KERAS_HOME=str(tmp_path), PYTHONPATH=str(PROJECT_ROOT))
    from_file = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    from_env = subprocess.run([sys.executable, "-c", code], env=dict(env, KERAS_BACKEND="tensorflow"),
                              capture_output=True, text=True)
    assert from_file.stdout.strip() == "jax" and from_env.stdout.strip() == "tensorflow"
    assert configured_backend() == ACTIVE


def test_precision_values_and_policies():
    assert PRECISIONS == ("fp32", "bf16") and set(DTYPE_POLICIES) == set(PRECISIONS)
    assert check_precision("bf16") == "bf16"
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16"):
        check_precision("fp16")


@pytest.mark.parametrize("precision", PRECISIONS)
def test_the_whole_model_equals_the_head_at_each_precision(precision, tmp_path):
    """The exactness contract (<= 1e-5) at fp32 and bf16: the extractor built in the
    precision scope computes the cached features and serves inside the whole model."""
    from ecg_mlflow.config import parse_train_config
    from ecg_mlflow.data.manifest import build_manifest
    from ecg_mlflow.data.preprocess import load_batch
    from ecg_mlflow.model.backbones import build_feature_extractor
    from ecg_mlflow.model.backend import precision_scope
    from ecg_mlflow.model.features import FeatureKey, extract_features
    from ecg_mlflow.model.head import build_head
    from ecg_mlflow.model.whole_model import assemble_model, check_model_matches_head
    from ecg_mlflow.synth.reports import write_synthetic_dataset

    import keras

    write_synthetic_dataset(tmp_path / "data", per_class=1, seed=0, width=442, height=314)
    records = build_manifest(tmp_path / "data").records
    paths = {r.sha256: tmp_path / "data" / r.relpath for r in records}
    with precision_scope(precision) as policy:
        extractor = build_feature_extractor("mobilenetv3large", "none", 64, 64)
    assert keras.config.dtype_policy().name == "float32", "the scope restores the global policy"
    assert extractor.dtype_policy.name == policy == DTYPE_POLICIES[precision]
    key = FeatureKey("mobilenetv3large", "none", 64, 64, "none")
    features, _ = extract_features(paths, key, tmp_path / "cache", build_extractor=lambda: extractor)
    config = parse_train_config(arch="mobilenetv3large", weights="none", image_height="64", image_width="64")
    head = build_head(960, (16,), 0.2)
    model = assemble_model(config, head, extractor=extractor)
    pixels = load_batch([tmp_path / "data" / r.relpath for r in records], 64, 64)
    cached = np.stack([features[r.sha256] for r in records])
    assert check_model_matches_head(model, head, pixels, cached) <= 1e-5


BLOCK_TENSORFLOW = """
import sys
class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] == 'tensorflow':
            raise ImportError('TensorFlow is blocked on the JAX path')
sys.meta_path.insert(0, NoTensorFlow())
"""
"""Prefix of a subprocess script: TensorFlow cannot be imported, even where it is installed."""


@jax_lane_only
def test_the_jax_path_trains_without_importing_tensorflow(tmp_path):
    """Determinism and training under JAX run with TensorFlow unimportable, even where it is
    installed (Keras' own set_random_seed would import it otherwise); XLA is asked for
    deterministic GPU kernels."""
    code = BLOCK_TENSORFLOW + """
import os
import numpy as np
from ecg_mlflow.model.backend import backend_name, device_kind, make_deterministic
from ecg_mlflow.model.head import HeadConfig, train_head
rng = np.random.default_rng(0)
x = rng.normal(size=(24, 16)).astype('float32'); y = np.eye(4, dtype='float32')[rng.integers(0, 4, 24)]
config = HeadConfig(dense_units=(8,), max_epochs=3)
a, _ = train_head(x[:16], y[:16], x[16:], y[16:], config, seed=5)
b, _ = train_head(x[:16], y[:16], x[16:], y[16:], config, seed=5)
same = all(np.array_equal(u, v) for u, v in zip(a.get_weights(), b.get_weights()))
print(backend_name(), device_kind(), same, 'tensorflow' in sys.modules, os.environ.get('XLA_FLAGS', ''))
"""
    done = run_python(code, "jax", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    backend, device, same, tensorflow_imported, flags = done.stdout.split(maxsplit=4)
    assert (backend, device, same, tensorflow_imported) == ("jax", "cpu", "True", "False")
    assert XLA_DETERMINISM_FLAG in flags


@jax_lane_only
def test_under_jax_without_tensorflow_the_seeds_together_trainer_says_what_to_install(tmp_path):
    """A JAX-only install trains one seed (Keras' fit) but not a study's seeds together, which
    run in TensorFlow: that is one line naming the extras, not an ImportError deep inside."""
    code = BLOCK_TENSORFLOW + """
import numpy as np
from ecg_mlflow.model.backend import BackendMissingError
from ecg_mlflow.model.head import HeadConfig
from ecg_mlflow.model.seed_heads import SeedRows, train_seed_heads
x = np.zeros((8, 4), 'float32'); y = np.eye(4, dtype='float32')[[0, 1, 2, 3] * 2]
try:
    train_seed_heads(x, y, [SeedRows(1, np.arange(6), np.arange(6, 8))], HeadConfig(dense_units=(4,), max_epochs=1))
except BackendMissingError as exc:
    print(exc)
"""
    done = run_python(code, "jax", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == (
        "the study's and tune's head trainer (seeds together) draws Keras' shuffle orders "
        "with TensorFlow under every Keras backend, and TensorFlow is not importable: add '.[cpu]' or "
        "'.[gpu]' to '.[jax]'")


@jax_lane_only
def test_under_jax_the_default_engine_is_keras_and_openvino_is_refused_saying_why(tmp_path):
    """OpenVINO converts Keras models through TensorFlow: under KERAS_BACKEND=jax the CLI's
    default is engine=keras, and an explicit engine=openvino is one ConfigError naming engine."""
    code = """
from ecg_mlflow.config import DEFAULT_ENGINE, ConfigError, resolve_train_config
print(DEFAULT_ENGINE)
try:
    resolve_train_config(arch="mobilenetv3large", weights="none", engine="openvino")
except ConfigError as exc:
    print(exc)
"""
    done = run_python(code, "jax", tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    default, refusal = done.stdout.strip().split("\n", 1)
    assert default == "keras"
    assert refusal.startswith("engine: engine=openvino precision=fp32 cannot run on this host")
    if importlib.util.find_spec("openvino") is not None:
        assert "the Keras backend is jax" in refusal
    else:
        assert "openvino is not importable" in refusal


SAVE_MODEL = """
import numpy as np, keras
from ecg_mlflow.config import parse_train_config
from ecg_mlflow.model.head import build_head
from ecg_mlflow.model.whole_model import assemble_model
keras.utils.set_random_seed(3)
config = parse_train_config(arch="vgg16", weights="none", image_height="64", image_width="96")
head = build_head(512, (16,), 0.2)
model = assemble_model(config, head)
pixels = np.random.default_rng(1).uniform(0, 255, (4, 64, 96, 3)).astype("float32")
np.save("pixels.npy", pixels)
np.save("saved_by_{backend}.npy", np.asarray(model.predict(pixels, verbose=0)))
model.save("model_{backend}.keras")
"""
LOAD_MODEL = """
import numpy as np, keras
model = keras.saving.load_model("model_{other}.keras", compile=False, safe_mode=True)
np.save("loaded_by_{backend}.npy", np.asarray(model.predict(np.load("pixels.npy"), verbose=0)))
"""


@needs_both_backends
def test_a_model_saved_under_one_backend_predicts_the_same_under_the_other(tmp_path):
    """The logged `.keras` file is backend-neutral: trained under JAX it serves under
    TensorFlow and the other way round, within the whole-model tolerance."""
    from ecg_mlflow.model.whole_model import EQUALITY_TOLERANCE

    for backend in BACKENDS:
        done = run_python(SAVE_MODEL.format(backend=backend), backend, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
    for backend, other in (BACKENDS, BACKENDS[::-1]):
        done = run_python(LOAD_MODEL.format(backend=backend, other=other), backend, tmp_path)
        assert done.returncode == 0, done.stderr[-3000:]
        saved, loaded = np.load(tmp_path / f"saved_by_{other}.npy"), np.load(tmp_path / f"loaded_by_{backend}.npy")
        assert np.abs(saved - loaded).max() <= EQUALITY_TOLERANCE, (other, backend)
