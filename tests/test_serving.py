"""The serving pyfunc in process: contract, equality with the Keras model, bad input, predict --model."""

from __future__ import annotations

import base64
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
from ecg_mlflow.data.decode import max_source_pixels
from ecg_mlflow.data.preprocess import load_pixels
from ecg_mlflow.serving.pyfunc import EXPLAIN_COLUMNS, IMAGE_COLUMN, decode_rows, KERAS_ARTIFACT, OUTPUT_COLUMNS, BadImageRows, MissingImageColumn, Preprocessing, TooManyRows
from ecg_mlflow.serving.packaging import SERVED_MODULES, preprocessing_of_run, MODEL_SCRIPT, keras_file_of_run, log_serving_model, serving_signature

from serving_fixtures import (
    isolated_store,
    png_header_only,
    shared_cache,
    shared_demo_set,
    train_study,
)

pytestmark = pytest.mark.timeout(1200)  # the module fixture trains models in the first test's setup
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
    assert inputs == [{"type": "any", "name": IMAGE_COLUMN, "required": False}]
    outputs = meta.signature.outputs.to_dict()
    assert [o["name"] for o in outputs] == list(OUTPUT_COLUMNS + EXPLAIN_COLUMNS)
    assert [o["type"] for o in outputs] == ["string"] + ["double"] * (4 + len(EXPLAIN_COLUMNS))
    assert all(o["required"] is False for o in outputs[len(OUTPUT_COLUMNS):])  # only with `explain`
    assert meta.signature.params.to_dict() == [
        {"name": schema.EXPLAIN_PARAM, "type": "boolean", "default": False, "shape": None}]
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
    probe = pyfunc["config"].pop(schema.CONFIG_PROBE)
    assert pyfunc["config"] == {"arch": ARCH, "image_height": int(run_params["image_height"]),
                                "image_width": int(run_params["image_width"]), "crop": run_params["crop"],
                                schema.CONFIG_ENGINE: "keras", schema.CONFIG_PRECISION: "fp32"}
    assert np.asarray(probe).shape == (2, 4)  # the recorded engine's output on the probe input
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
    assert error.rows[2] == "PDF document; only JPEG and PNG are accepted"
    assert "truncated" in error.rows[3]
    assert "too large" in error.rows[4] and str(max_source_pixels(64, 128)) in error.rows[4]
    assert "null" in error.rows[5]
    for index in (1, 2, 3, 4, 5):
        assert f"row {index}:" in error.message
    assert "row 0:" not in error.message and "row 6:" not in error.message


def test_base64_text_null_and_numeric_rows_are_named_in_process(served, originals):
    good = originals[0][1]
    text = base64.encodebytes(good).decode("ascii")  # with newlines, as MLflow's client writes it
    frame = served["model"].predict(pd.DataFrame({IMAGE_COLUMN: [text, good]}))
    assert frame["label"][0] == frame["label"][1]
    np.testing.assert_allclose(frame[list(schema.PROB_COLUMNS)].iloc[0], frame[list(schema.PROB_COLUMNS)].iloc[1])
    with pytest.raises(BadImageRows) as caught:
        served["model"].predict(pd.DataFrame({IMAGE_COLUMN: [text, None, 7, "abcde", "é", 2.5]}, dtype=object))
    assert sorted(caught.value.rows) == [1, 2, 3, 4, 5]
    assert caught.value.rows[1] == "missing image (null)"
    assert caught.value.rows[2] == "expected base64 JPEG/PNG bytes, got int"
    assert caught.value.rows[3].startswith("not base64") and caught.value.rows[4].startswith("not base64")


def test_an_error_reply_lists_the_first_bad_rows_and_counts_the_rest(served):
    from ecg_mlflow.serving.limits import MAX_LISTED_ROWS

    rows = [b"GIF89a" + bytes(20) for _ in range(30)] + [b"x" * 5000 for _ in range(2)]
    with pytest.raises(BadImageRows) as caught:
        served["model"].predict(pd.DataFrame({IMAGE_COLUMN: rows}))
    error = caught.value
    assert len(error.rows) == 32 and f"row {MAX_LISTED_ROWS - 1}: GIF image" in error.message
    assert f"row {MAX_LISTED_ROWS}:" not in error.message
    assert f"and {32 - MAX_LISTED_ROWS} more bad rows, not listed" in error.message
    assert len(error.message) < 3000


def test_a_request_over_the_row_limit_is_refused_before_decoding(served):
    from ecg_mlflow.serving.limits import DEFAULT_MAX_ROWS, MAX_ROWS_ENV

    with pytest.raises(TooManyRows) as caught:
        served["model"].predict(pd.DataFrame({IMAGE_COLUMN: [b"x"] * (DEFAULT_MAX_ROWS + 1)}))
    assert caught.value.get_http_status_code() == 400
    assert f"{DEFAULT_MAX_ROWS + 1} rows; the limit is {DEFAULT_MAX_ROWS} rows per request" in caught.value.message
    assert MAX_ROWS_ENV in caught.value.message


def test_a_frame_without_the_image_column_is_a_400_naming_it(served):
    with pytest.raises(MissingImageColumn) as caught:
        served["model"].predict(pd.DataFrame({"picture": [b"x"]}))
    assert caught.value.get_http_status_code() == 400
    assert "'image'" in caught.value.message and "dataframe_records" in caught.value.message


def test_png_rgba_and_grayscale_inputs_are_served(served, originals):
    """An RGBA PNG is served as its RGB content, a grayscale PNG as that gray image in RGB:
    each prediction equals the one of the RGB-converted image."""

    def png(image: Image.Image) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

    rgb = Image.open(io.BytesIO(originals[0][1])).convert("RGB")
    gray = rgb.convert("L")
    pairs = [(png(rgb.convert("RGBA")), png(rgb)), (png(gray), png(gray.convert("RGB")))]
    frame = served["model"].predict(pd.DataFrame({IMAGE_COLUMN: [image for pair in pairs for image in pair]}))
    probs = frame[list(schema.PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    for i, mode in enumerate(("RGBA", "L")):
        assert frame["label"][2 * i] == frame["label"][2 * i + 1], mode
        np.testing.assert_allclose(probs[2 * i], probs[2 * i + 1], atol=1e-6, err_msg=mode)
    # and what the model sees: RGBA decoded as its RGB content, grayscale as that gray in RGB,
    # bit for bit, and the two modes really different inputs (a near-constant tiny model would
    # pass the probability checks above on any input)
    prep = served["model"].unwrap_python_model().preprocessing
    pixels = decode_rows([image for pair in pairs for image in pair], prep)
    np.testing.assert_array_equal(pixels[0], pixels[1])
    np.testing.assert_array_equal(pixels[2], pixels[3])
    assert np.abs(pixels[0].astype(np.float64) - pixels[2]).max() > 10


def test_preprocessing_is_parsed_from_run_params_with_clear_errors():
    prep = preprocessing_of_run({"arch": "resnet50", "image_height": "512", "image_width": "1024",
                                          "crop": "grid"}, "r1")
    assert prep == Preprocessing("resnet50", 512, 1024, "grid")
    assert Preprocessing.from_config(prep.to_config()) == prep
    with pytest.raises(ValueError, match="run r2 lacks the param.*crop"):
        preprocessing_of_run({"arch": "resnet50", "image_height": "512", "image_width": "1024"}, "r2")
    with pytest.raises(ValueError, match="run r3 .*image_height"):
        preprocessing_of_run({"arch": "resnet50", "image_height": "tall", "image_width": "1024",
                                       "crop": "none"}, "r3")


def test_a_run_without_a_keras_model_cannot_be_served(served):
    with mlflow.start_run(experiment_id=served["experiment_id"], run_name="no-model") as bare:
        mlflow.log_params({"arch": ARCH, "image_height": "64", "image_width": "128", "crop": "none"})
    with mlflow.start_run(experiment_id=served["experiment_id"]):
        with pytest.raises(ValueError, match=f"run {bare.info.run_id} has no usable logged Keras model"):
            log_serving_model(bare.info.run_id)


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
