"""The champion behind a real `mlflow models serve --env-manager local` on a loopback port."""

from __future__ import annotations

import base64
import json

import mlflow
import numpy as np
import pandas as pd
import pytest
import requests
from click.testing import CliRunner
from mlflow import MlflowClient

from ecg_mlflow import schema
from ecg_mlflow.cli import main
from ecg_mlflow.data.classes import CLASSES
from ecg_mlflow.serving.pyfunc import IMAGE_COLUMN

from infra_fixtures import listening_addresses
from serving_fixtures import (
    hand_analysis_run,
    isolated_store,
    model_server,
    png_header_only,
    shared_cache,
    shared_demo_set,
    train_study,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]  # training and server start-up in setup
TOLD_HOST = "127.0.0.2"
"""Another loopback address (all of 127/8 is loopback on Linux): the server must bind where told."""
CHAMPION_URI = f"models:/{schema.DEFAULT_MODEL_NAME}@{schema.CHAMPION_ALIAS}"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Train, promote through the CLI, serve the champion; yield (server, store uri)."""
    root = tmp_path_factory.mktemp("http-store")
    with isolated_store(root) as uri:
        study = train_study("http", root, shared_demo_set(tmp_path_factory), shared_cache(tmp_path_factory),
                            ("mobilenetv3large", "vgg16"), (1,))
        analysis = hand_analysis_run(study, "mobilenetv3large", "vgg16", significant=True)
        promoted = CliRunner().invoke(main, ["promote", "--experiment", "http", "--analysis-run", analysis])
        assert promoted.exit_code == 0, promoted.output
        with model_server(CHAMPION_URI, uri, root / "server.log", host=TOLD_HOST) as running:
            yield running, uri


@pytest.fixture(scope="module")
def originals(real_originals) -> list[bytes]:
    files = sorted(p for p in real_originals.rglob("*") if p.is_file())
    return [p.read_bytes() for p in files]


def _post(url: str, records: list[dict]) -> requests.Response:
    return requests.post(f"{url}/invocations", data=json.dumps({"dataframe_records": records}),
                         headers={"Content-Type": "application/json"}, timeout=300)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def test_champion_alias_resolves_to_the_promoted_version(server):
    version = MlflowClient().get_model_version_by_alias(schema.DEFAULT_MODEL_NAME, schema.CHAMPION_ALIAS)
    assert str(version.version) == "1" and version.tags["arch"] == "mobilenetv3large"
    assert requests.get(f"{server[0].url}/health", timeout=5).status_code == 200


def test_the_server_binds_where_told_and_nowhere_else(server):
    """The told case of test_team_server's `binds to loopback unless told`: `-h 127.0.0.2`
    listens on 127.0.0.2 only (not 127.0.0.1, not every address)."""
    port = int(server[0].url.rsplit(":", 1)[1])
    told_hex = "".join(f"{int(part):02X}" for part in reversed(TOLD_HOST.split(".")))
    assert told_hex == "0200007F"
    assert listening_addresses(port) == {told_hex}
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/ping", timeout=5)


def test_originals_over_http_equal_the_in_process_prediction(server, originals):
    response = _post(server[0].url, [{IMAGE_COLUMN: _b64(b)} for b in originals])
    assert response.status_code == 200, response.text
    served = pd.DataFrame(response.json()["predictions"])
    assert list(served.columns) == ["label", *schema.PROB_COLUMNS] and len(served) == 8
    probs = served[list(schema.PROB_COLUMNS)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert set(served["label"]) <= set(CLASSES)

    local = mlflow.pyfunc.load_model(CHAMPION_URI).predict(pd.DataFrame({IMAGE_COLUMN: originals}))
    assert list(served["label"]) == list(local["label"])
    np.testing.assert_allclose(probs, local[list(schema.PROB_COLUMNS)].to_numpy(), atol=1e-6)


@pytest.mark.parametrize("case, records, expected", [
    ("empty", lambda good: [{IMAGE_COLUMN: _b64(good)}, {IMAGE_COLUMN: ""}], ["row 1: empty input"]),
    ("not an image", lambda good: [{IMAGE_COLUMN: _b64(b"GIF? no, plain text")}], ["row 0: not an image"]),
    ("truncated", lambda good: [{IMAGE_COLUMN: _b64(good[:5000])}], ["row 0: truncated"]),
    ("too large", lambda good: [{IMAGE_COLUMN: _b64(good)}, {IMAGE_COLUMN: _b64(good)},
                                {IMAGE_COLUMN: _b64(png_header_only(20000, 20000))}],
     ["row 2: image too large", "400000000 pixels"]),
    ("several", lambda good: [{IMAGE_COLUMN: ""}, {IMAGE_COLUMN: _b64(good)}, {IMAGE_COLUMN: _b64(b"xx")}],
     ["2 of 3 rows", "row 0: empty", "row 2: not an image"]),
    ("no image column", lambda good: [{"picture": _b64(good)}], ["no 'image' column"]),
    ("not base64", lambda good: [{IMAGE_COLUMN: "abcde"}], ["column image", "base64"]),
])
def test_bad_input_gets_400_naming_the_row_and_the_server_keeps_serving(server, originals, case, records, expected):
    url = server[0].url
    response = _post(url, records(originals[0]))
    assert response.status_code == 400, f"{case}: {response.status_code} {response.text[:500]}"
    message = response.json()["message"]
    for fragment in expected:
        assert fragment in message, f"{case}: {fragment!r} not in {message[-600:]!r}"
    after = _post(url, [{IMAGE_COLUMN: _b64(originals[1])}])
    assert after.status_code == 200 and len(after.json()["predictions"]) == 1


def test_predict_command_over_http(server, real_originals, tmp_path):
    url = server[0].url
    files = sorted(p for p in real_originals.rglob("*") if p.is_file())[:2]
    result = CliRunner().invoke(main, ["predict", *map(str, files), "--url", url, "--json"])
    assert result.exit_code == 0, result.output
    records = json.loads(result.output)
    assert [r["file"] for r in records] == [str(f) for f in files]
    # against the champion loaded in this process, not against the command's own HTTP client
    local = mlflow.pyfunc.load_model(CHAMPION_URI).predict(pd.DataFrame({IMAGE_COLUMN: [f.read_bytes() for f in files]}))
    assert [r["label"] for r in records] == list(local["label"])
    np.testing.assert_allclose([[r[c] for c in schema.PROB_COLUMNS] for r in records],
                               local[list(schema.PROB_COLUMNS)].to_numpy(), atol=1e-6, rtol=0)

    bad = tmp_path / "empty.png"
    bad.write_bytes(b"")
    refused = CliRunner().invoke(main, ["predict", str(files[0]), str(bad), "--url", url])
    assert refused.exit_code == 1
    assert "HTTP 400" in refused.output and "row 1: empty input" in refused.output
    assert f"1={bad}" in refused.output and "Failed to predict data" not in refused.output

    gone = CliRunner().invoke(main, ["predict", str(files[0]), "--url", "http://127.0.0.1:9"])
    assert gone.exit_code == 1 and "cannot reach the model server" in gone.output
