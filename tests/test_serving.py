"""The serving pyfunc in process: contract, equality with the Keras model, bad input, predict --model."""

from __future__ import annotations

import io
import json

import keras
import mlflow
import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from mlflow.models import Model
from PIL import Image

from ecg_mlflow import schema
from ecg_mlflow.data.classes import CLASSES
from ecg_mlflow.cli import main
from ecg_mlflow.data.preprocess import MAX_PIXELS, load_pixels
from ecg_mlflow.serving.pyfunc import IMAGE_COLUMN, KERAS_ARTIFACT, OUTPUT_COLUMNS, BadImageRows, MissingImageColumn, Preprocessing
from ecg_mlflow.serving.packaging import SERVED_MODULES, MODEL_SCRIPT, keras_file_of_run, log_serving_model, serving_signature

from serving_fixtures import (
    isolated_store,
    png_header_only,
    shared_cache,
    shared_demo_set,
    train_study,
)

ARCH = "mobilenetv3large"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One real train run and the serving pyfunc logged from it, in a module-wide store."""
    root = tmp_path_factory.mktemp("serving-store")
    with isolated_store(root):
        study = train_study("serving", root, shared_demo_set(tmp_path_factory), shared_cache(tmp_path_factory),
                            (ARCH,), (1,))
        source = study.runs[(ARCH, 1)]
        with mlflow.start_run(experiment_id=study.experiment_id, run_name="serving"):
            info = log_serving_model(source)
        model = mlflow.pyfunc.load_model(info.model_uri)
        yield {"source": source, "info": info, "model": model, "experiment_id": study.experiment_id}


@pytest.fixture(scope="module")
def originals(real_originals) -> list[tuple[str, bytes]]:
    files = sorted(p for p in real_originals.rglob("*") if p.is_file())
    assert len(files) == 8
    return [(p.name, p.read_bytes()) for p in files]


def test_signature_and_packaging_state_the_contract(served):
    local = mlflow.artifacts.download_artifacts(served["info"].model_uri)
    meta = Model.load(local)
    assert meta.signature == serving_signature()
    inputs = meta.signature.inputs.to_dict()
    assert inputs == [{"type": "binary", "name": IMAGE_COLUMN, "required": False}]
    outputs = meta.signature.outputs.to_dict()
    assert [o["name"] for o in outputs] == list(OUTPUT_COLUMNS)
    assert [o["type"] for o in outputs] == ["string"] + ["double"] * 4
    pyfunc = meta.flavors["python_function"]
    # models-from-code (nothing unpickled at load) with the package shipped as code
    assert "model_code_path" in pyfunc and "cloudpickle" not in json.dumps(pyfunc.get("loader_module", ""))
    from pathlib import Path

    assert (Path(local) / Path(pyfunc["model_code_path"]).name).read_text() == MODEL_SCRIPT
    shipped = Path(local) / pyfunc["code"] / "ecg_mlflow"
    assert sorted(str(p.relative_to(shipped)) for p in shipped.rglob("*.py")) == sorted(SERVED_MODULES)
    assert (shipped / "data" / "preprocess.py").is_file() and not (shipped / "train.py").exists()
    assert not list((Path(local) / pyfunc["code"]).rglob("__pycache__"))
    # the preprocessing settings are the source run's params
    run_params = mlflow.get_run(served["source"]).data.params
    assert pyfunc["config"] == {"arch": ARCH, "image_height": int(run_params["image_height"]),
                                "image_width": int(run_params["image_width"]), "crop": run_params["crop"]}
    # the backend as installed here: tensorflow-cpu (`.[cpu]`), tensorflow (`.[gpu]`) or jax
    from ecg_mlflow.model.backend import backend_name
    from ecg_mlflow.tracking.model_logging import backend_packages, installed_version

    requirements = (Path(local) / "requirements.txt").read_text().splitlines()
    for package in ("mlflow", "keras", *backend_packages(backend_name()), "pillow", "pandas"):
        assert f"{package}=={installed_version(package)}" in requirements


def test_real_originals_match_the_keras_model_on_load_pixels(served, originals, tmp_path):
    frame = served["model"].predict(pd.DataFrame({IMAGE_COLUMN: [b for _, b in originals]}))
    assert list(frame.columns) == list(OUTPUT_COLUMNS)
    assert len(frame) == len(originals)
    probs = frame[list(schema.PROB_COLUMNS)].to_numpy()
    assert probs.dtype == np.float64
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert set(frame["label"]) <= set(CLASSES)
    assert list(frame["label"]) == [CLASSES[i] for i in probs.argmax(axis=1)]

    # independent path: the train run's own Keras file, training's preprocessing function
    keras_model = keras.saving.load_model(keras_file_of_run(served["source"], tmp_path), compile=False)
    params = mlflow.get_run(served["source"]).data.params
    pixels = np.stack([load_pixels(b, int(params["image_height"]), int(params["image_width"]), params["crop"])
                       for _, b in originals]).astype(np.float32)
    expected = np.asarray(keras_model.predict(pixels, verbose=0))
    np.testing.assert_allclose(probs, expected, atol=1e-6)


def test_every_bad_row_is_named_with_its_reason_in_one_error(served, originals):
    good = originals[0][1]
    truncated = good[: len(good) // 3]
    rows = [good, b"", b"%PDF-1.4 not an image", truncated, png_header_only(8000, 6000), None, good]
    with pytest.raises(BadImageRows) as caught:
        served["model"].predict(pd.DataFrame({IMAGE_COLUMN: rows}))
    error = caught.value
    assert error.error_code == "INVALID_PARAMETER_VALUE" and error.get_http_status_code() == 400
    assert sorted(error.rows) == [1, 2, 3, 4, 5]
    assert "empty" in error.rows[1]
    assert "not an image" in error.rows[2]
    assert "truncated" in error.rows[3]
    assert "too large" in error.rows[4] and str(MAX_PIXELS) in error.rows[4]
    assert "null" in error.rows[5]
    for index in (1, 2, 3, 4, 5):
        assert f"row {index}:" in error.message
    assert "row 0:" not in error.message and "row 6:" not in error.message


def test_a_frame_without_the_image_column_is_a_400_naming_it(served):
    with pytest.raises(MissingImageColumn) as caught:
        served["model"].predict(pd.DataFrame({"picture": [b"x"]}))
    assert caught.value.get_http_status_code() == 400
    assert "'image'" in caught.value.message and "dataframe_records" in caught.value.message


def test_png_rgba_and_grayscale_inputs_are_served(served, originals):
    rgb = Image.open(io.BytesIO(originals[0][1]))
    encoded = []
    for mode in ("RGBA", "L"):
        buffer = io.BytesIO()
        rgb.convert(mode).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    frame = served["model"].predict(pd.DataFrame({IMAGE_COLUMN: encoded}))
    np.testing.assert_allclose(frame[list(schema.PROB_COLUMNS)].sum(axis=1), 1.0, atol=1e-5)


def test_preprocessing_is_parsed_from_run_params_with_clear_errors():
    prep = Preprocessing.from_run_params({"arch": "resnet50", "image_height": "512", "image_width": "1024",
                                          "crop": "grid"}, "r1")
    assert prep == Preprocessing("resnet50", 512, 1024, "grid")
    assert Preprocessing.from_config(prep.to_config()) == prep
    with pytest.raises(ValueError, match="run r2 lacks the param.*crop"):
        Preprocessing.from_run_params({"arch": "resnet50", "image_height": "512", "image_width": "1024"}, "r2")
    with pytest.raises(ValueError, match="run r3 .*image_height"):
        Preprocessing.from_run_params({"arch": "resnet50", "image_height": "tall", "image_width": "1024",
                                       "crop": "none"}, "r3")


def test_a_run_without_a_keras_model_cannot_be_served(served):
    with mlflow.start_run(experiment_id=served["experiment_id"], run_name="no-model") as bare:
        mlflow.log_params({"arch": ARCH, "image_height": "64", "image_width": "128", "crop": "none"})
    with mlflow.start_run(experiment_id=served["experiment_id"]):
        with pytest.raises(ValueError, match=f"run {bare.info.run_id} has no usable logged Keras model"):
            log_serving_model(bare.info.run_id)


def test_the_keras_model_is_loaded_in_safe_mode(served, tmp_path):
    """A .keras file with a Python lambda inside is refused at load time, not executed."""
    inputs = keras.Input((4, 4, 3))
    outputs = keras.layers.Lambda(lambda x: x * 2.0)(inputs)
    unsafe = tmp_path / "unsafe.keras"
    keras.Model(inputs, outputs).save(unsafe)
    script = tmp_path / "model.py"
    script.write_text(MODEL_SCRIPT)
    from ecg_mlflow.serving.packaging import _package_copy

    code = _package_copy(tmp_path / "code")
    with mlflow.start_run(experiment_id=served["experiment_id"], run_name="unsafe"):
        info = mlflow.pyfunc.log_model(
            name="unsafe", python_model=str(script), artifacts={KERAS_ARTIFACT: str(unsafe)},
            model_config=Preprocessing(ARCH, 4, 4, "none").to_config(), code_paths=[str(code)],
            signature=serving_signature(),
        )
    with pytest.raises(Exception, match="(?i)lambda|safe_mode"):
        mlflow.pyfunc.load_model(info.model_uri)


def test_predict_command_in_process_prints_labels_and_json(served, real_originals, tmp_path):
    files = sorted(p for p in real_originals.rglob("*") if p.is_file())[:3]
    uri = served["info"].model_uri
    runner = CliRunner()
    table = runner.invoke(main, ["predict", *map(str, files), "--model", uri])
    assert table.exit_code == 0, table.output
    lines = table.output.strip().splitlines()
    assert lines[0].split()[:2] == ["file", "label"] and "prob_norm" in lines[0]
    assert len(lines) == 4 and all(str(f) in line for f, line in zip(files, lines[1:]))

    as_json = runner.invoke(main, ["predict", *map(str, files), "--model", uri, "--json"])
    assert as_json.exit_code == 0, as_json.output
    records = json.loads(as_json.output)
    expected = served["model"].predict(pd.DataFrame({IMAGE_COLUMN: [f.read_bytes() for f in files]}))
    assert [r["file"] for r in records] == [str(f) for f in files]
    assert [r["label"] for r in records] == list(expected["label"])
    np.testing.assert_allclose([[r[c] for c in schema.PROB_COLUMNS] for r in records],
                               expected[list(schema.PROB_COLUMNS)].to_numpy(), atol=1e-9)

    bad = tmp_path / "notes.jpg"
    bad.write_bytes(b"not a jpeg")
    refused = runner.invoke(main, ["predict", str(files[0]), str(bad), "--model", uri])
    assert refused.exit_code == 1
    assert f"{bad}: not an image" in refused.output and "1 of 2 files" in refused.output


def test_predict_command_needs_exactly_one_target(real_originals):
    image = str(next(p for p in real_originals.rglob("*.jpg")))
    runner = CliRunner()
    neither = runner.invoke(main, ["predict", image])
    both = runner.invoke(main, ["predict", image, "--url", "http://127.0.0.1:1", "--model", "models:/x/1"])
    assert neither.exit_code == 2 and both.exit_code == 2
    assert "exactly one of --url" in neither.output and "exactly one of --url" in both.output
    bad_url = runner.invoke(main, ["predict", image, "--url", "localhost:5001"])
    assert bad_url.exit_code == 2 and "url must look like http://" in bad_url.output
    missing = runner.invoke(main, ["predict", "/nonexistent.jpg", "--model", "models:/x/1"])
    assert missing.exit_code == 2 and "/nonexistent.jpg" in missing.output
