"""Packaging the served model: the pyfunc of serving/pyfunc.py around a train run's Keras
model, with its preprocessing, signature, pinned requirements and a copy of exactly the
modules serving imports (SERVED_MODULES), nothing of training, tuning or synthesis."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from ecg_mlflow import schema
from ecg_mlflow.serving.pyfunc import EXPLAIN_COLUMNS, IMAGE_COLUMN, KERAS_ARTIFACT, LABEL_COLUMN, Preprocessing

SERVING_MODEL_NAME = "model"
"""Name of the serving pyfunc inside the promote run (`runs:/<promote run>/model`)."""
SERVING_EXTRA_REQUIREMENTS = ("pillow", "numpy", "pandas")
PACKAGE_DIR = Path(__file__).resolve().parent.parent
SERVED_MODULES: tuple[str, ...] = (
    "__init__.py",
    "parsing.py",
    "schema.py",
    "telemetry.py",
    "data/__init__.py",
    "data/classes.py",
    "data/decode.py",
    "data/preprocess.py",
    "model/__init__.py",
    "model/regions.py",
    "model/explain.py",
    "model/engines.py",
    "serving/__init__.py",
    "serving/limits.py",
    "serving/pyfunc.py",
)
"""What the served model imports, relative to the package: shipped with every version."""
MODEL_SCRIPT = (
    "from mlflow.models import set_model\n"
    "from ecg_mlflow.serving.pyfunc import EcgImageClassifier\n"
    "set_model(EcgImageClassifier())\n"
)
"""The models-from-code entry MLflow runs at load time (ecg_mlflow comes from code_paths)."""


def preprocessing_of_run(params: dict[str, str], run_id: str) -> Preprocessing:
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
    return Preprocessing(config.arch, config.image_height, config.image_width, config.crop)


def engine_config_of_run(params: dict[str, str], run_id: str) -> dict[str, object]:
    """The engine, precision and probe output the train run recorded, for the serving model's
    config. Runs from before engines existed ran Keras fp32 and recorded no probe."""
    import json

    import mlflow

    config: dict[str, object] = {
        schema.CONFIG_ENGINE: params.get(schema.PARAM_ENGINE, "keras"),
        schema.CONFIG_PRECISION: params.get(schema.PARAM_PRECISION, "fp32"),
    }
    try:
        probe = json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{schema.ARTIFACT_ENGINE_PROBE}"))
    except Exception:  # no probe recorded (an older run): nothing to compare a fallback with
        return config
    config[schema.CONFIG_PROBE] = probe[schema.CONFIG_PROBE]
    return config


def serving_signature():
    """ColSpec `image` of type any in; `label` string and four doubles out, plus the optional
    explanation columns; param `explain` (boolean, default false) asks for those.

    `image` is `any`, not `binary`: for a binary column MLflow base64-decodes the JSON values
    itself and fails on a null, a number or bad base64 with an error that names no row; as
    `any` they reach `predict`, which decodes base64 row by row (pyfunc.image_bytes) and names
    each bad row. It is optional only so that a request without it reaches `predict` and gets
    a 400 naming it (MLflow's own check for a missing required column answers 500)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec(AnyType(), IMAGE_COLUMN, required=False)]),
        outputs=Schema([ColSpec("string", LABEL_COLUMN)] + [ColSpec("double", c) for c in schema.PROB_COLUMNS]
                       + [ColSpec("double", c, required=False) for c in EXPLAIN_COLUMNS]),
        params=ParamSchema([ParamSpec(schema.EXPLAIN_PARAM, "boolean", False)]),
    )


def keras_file_of_run(run_id: str, dst: Path) -> Path:
    """Download the Keras model a train run logged (`runs:/<id>/model`) and return its
    `.keras` file, located through the model's MLmodel (keras flavor `data` folder)."""
    import mlflow
    from mlflow.models import Model

    uri = f"runs:/{run_id}/{schema.MODEL_ARTIFACT}"
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
    """The modules serving imports (SERVED_MODULES), as a package to ship with the model."""
    target = dst / "ecg_mlflow"
    for module in SERVED_MODULES:
        (target / module).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(PACKAGE_DIR / module, target / module)
    return target


def log_serving_model(source_run_id: str, *, name: str = SERVING_MODEL_NAME):
    """Log the serving pyfunc built from `source_run_id`'s Keras model into the ACTIVE run.

    Returns the ModelInfo (its `model_uri` is what `promote` registers)."""
    import mlflow
    from mlflow.tracking import MlflowClient

    from ecg_mlflow.tracking.model_logging import engine_packages, keras_requirements

    if mlflow.active_run() is None:
        raise RuntimeError("log_serving_model needs an active MLflow run")
    params = MlflowClient().get_run(source_run_id).data.params
    prep = preprocessing_of_run(params, source_run_id)
    engine = engine_config_of_run(params, source_run_id)
    with tempfile.TemporaryDirectory(prefix="ecg-serving-") as tmp:
        keras_file = keras_file_of_run(source_run_id, Path(tmp) / "download")
        code = _package_copy(Path(tmp) / "code")
        script = Path(tmp) / "ecg_serving_model.py"
        script.write_text(MODEL_SCRIPT)
        return mlflow.pyfunc.log_model(
            name=name,
            python_model=str(script),
            artifacts={KERAS_ARTIFACT: str(keras_file)},
            model_config={**prep.to_config(), **engine},
            code_paths=[str(code)],
            signature=serving_signature(),
            pip_requirements=keras_requirements(
                *SERVING_EXTRA_REQUIREMENTS, *engine_packages(str(engine[schema.CONFIG_ENGINE]))),
            tags={schema.TAG_SOURCE_RUN: source_run_id},
        )
