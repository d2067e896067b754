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
from ecg_mlflow.serving.client import predict_over_http
from ecg_mlflow.data.decode import max_source_pixels
from ecg_mlflow.serving.limits import DEFAULT_MAX_ROWS, MAX_LISTED_ROWS, MAX_ROWS_ENV

from infra_fixtures import listening_addresses
from serving_fixtures import (
    FOREIGN_FORMATS,
    foreign_image,
    hand_analysis_run,
    palette_bomb,
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
FOREIGN_REFUSALS = {"TGA": "not an image: no JPEG or PNG header",
                    "PPM": "Netpbm (PBM/PGM/PPM) image; only JPEG and PNG are accepted"}


def _tiny_png() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("L", (2, 2), 255).save(buffer, "PNG")
    return buffer.getvalue()


TINY_PNG = _tiny_png()
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
    # half of a real original: the decoded size stays under the compression-ratio limit (a
    # 5 KB head of one is refused earlier, as a decompression bomb)
    ("truncated", lambda good: [{IMAGE_COLUMN: _b64(good[: len(good) // 2])}], ["row 0: truncated"]),
    ("too large", lambda good: [{IMAGE_COLUMN: _b64(good)}, {IMAGE_COLUMN: _b64(good)},
                                {IMAGE_COLUMN: _b64(png_header_only(20000, 20000))}],
     ["row 2: image too large", "400000000 pixels"]),
    ("several", lambda good: [{IMAGE_COLUMN: ""}, {IMAGE_COLUMN: _b64(good)}, {IMAGE_COLUMN: _b64(b"xx")}],
     ["2 of 3 rows", "row 0: empty", "row 2: not an image"]),
    ("no image column", lambda good: [{"picture": _b64(good)}], ["no 'image' column"]),
    ("not base64", lambda good: [{IMAGE_COLUMN: "abcde"}], ["row 0: not base64"]),
    ("null", lambda good: [{IMAGE_COLUMN: _b64(good)}, {IMAGE_COLUMN: None}], ["row 1: missing image (null)"]),
    ("numeric", lambda good: [{IMAGE_COLUMN: 12}, {IMAGE_COLUMN: 2.5}],
     # JSON numbers in one column reach the model as pandas made them (both floats here)
     ["row 0: expected base64 JPEG/PNG bytes, got", "row 1: expected base64 JPEG/PNG bytes, got float"]),
    ("palette bomb", lambda good: [{IMAGE_COLUMN: _b64(palette_bomb(4000, 4000))}],
     ["row 0: decompression bomb", "4000 x 4000", "the limit is 2048 x its size"]),
    ("bomb over the pixel limit", lambda good: [{IMAGE_COLUMN: _b64(palette_bomb(6000, 6000))}],
     ["row 0: image too large", f"the limit is {max_source_pixels(64, 128)} pixels"]),
    ("DDS", lambda good: [{IMAGE_COLUMN: _b64(b"DDS |" + bytes(200))}], ["row 0: DDS image; only JPEG and PNG"]),
    ("BLP", lambda good: [{IMAGE_COLUMN: _b64(b"BLP1" + bytes(200))}], ["row 0: BLP image; only JPEG and PNG"]),
    ("too many rows", lambda good: [{IMAGE_COLUMN: _b64(TINY_PNG)}] * (DEFAULT_MAX_ROWS + 1),
     [f"the limit is {DEFAULT_MAX_ROWS} rows per request", MAX_ROWS_ENV]),
] + [(fmt, (lambda good, fmt=fmt: [{IMAGE_COLUMN: _b64(good)}, {IMAGE_COLUMN: _b64(foreign_image(fmt))}]),
      ["row 1: " + FOREIGN_REFUSALS.get(fmt, f"{fmt} image; only JPEG and PNG are accepted")])
     for fmt in FOREIGN_FORMATS])
def test_bad_input_gets_400_naming_the_row_and_the_server_keeps_serving(server, originals, case, records, expected):
    url = server[0].url
    response = _post(url, records(originals[0]))
    assert response.status_code == 400, f"{case}: {response.status_code} {response.text[:500]}"
    assert "stack_trace" not in response.json() and "Traceback" not in response.text
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


def _post_params(url: str, records: list[dict], params: dict) -> requests.Response:
    return requests.post(f"{url}/invocations", data=json.dumps({"dataframe_records": records, "params": params}),
                         headers={"Content-Type": "application/json"}, timeout=300)


def test_explain_param_adds_region_attribution_and_plain_replies_stay_plain(server, originals):
    from ecg_mlflow.serving.pyfunc import EXPLAIN_COLUMNS

    records = [{IMAGE_COLUMN: _b64(b)} for b in originals[:3]]
    plain = _post(server[0].url, records)
    explained = _post_params(server[0].url, records, {schema.EXPLAIN_PARAM: True})
    assert plain.status_code == 200 and explained.status_code == 200, explained.text[:500]
    plain_frame = pd.DataFrame(plain.json()["predictions"])
    frame = pd.DataFrame(explained.json()["predictions"])
    assert list(plain_frame.columns) == ["label", *schema.PROB_COLUMNS]
    assert list(frame.columns) == ["label", *schema.PROB_COLUMNS, *EXPLAIN_COLUMNS]
    assert list(frame["label"]) == list(plain_frame["label"])
    np.testing.assert_allclose(frame[list(schema.PROB_COLUMNS)], plain_frame[list(schema.PROB_COLUMNS)], atol=1e-5)
    assert frame[schema.COL_TEXT_SHARE].between(0, 1).all()
    off = _post_params(server[0].url, records, {schema.EXPLAIN_PARAM: False})
    assert list(pd.DataFrame(off.json()["predictions"]).columns) == list(plain_frame.columns)

    local = mlflow.pyfunc.load_model(CHAMPION_URI).predict(pd.DataFrame({IMAGE_COLUMN: originals[:3]}),
                                                           params={schema.EXPLAIN_PARAM: True})
    np.testing.assert_allclose(frame[list(EXPLAIN_COLUMNS)], local[list(EXPLAIN_COLUMNS)], rtol=1e-4, atol=1e-6)


def test_explain_command_writes_overlays_and_a_table(server, real_originals, tmp_path):
    from ecg_mlflow.commands.explain import TABLE, explain

    files = sorted(p for p in real_originals.rglob("*") if p.is_file())[:2]
    for option, value in (("--url", server[0].url), ("--model", CHAMPION_URI)):
        out = tmp_path / option.strip("-")
        result = CliRunner().invoke(explain, [*map(str, files), option, value, "--out", str(out)])
        assert result.exit_code == 0, result.output
        table = pd.read_csv(out / TABLE)
        assert list(table["file"]) == [str(f) for f in files] and schema.COL_TEXT_SHARE in table.columns
        assert len(list(out.glob("*_overlay.png"))) == 2
    by_url, by_model = (pd.read_csv(tmp_path / name / TABLE) for name in ("url", "model"))
    np.testing.assert_allclose(by_url[schema.COL_TEXT_SHARE], by_model[schema.COL_TEXT_SHARE], atol=1e-5)
    refused = CliRunner().invoke(explain, [str(files[0]), "--out", str(tmp_path / "x")])
    assert refused.exit_code == 2 and "exactly one of" in refused.output
def test_a_reply_to_many_bad_rows_stays_small_and_carries_no_trace(server):
    url = server[0].url
    records = [{IMAGE_COLUMN: _b64(b"GIF89a" + bytes(400))} for _ in range(DEFAULT_MAX_ROWS)]
    response = _post(url, records)
    assert response.status_code == 400
    body = response.json()
    assert "stack_trace" not in body and "Traceback" not in response.text
    assert f"and {DEFAULT_MAX_ROWS - MAX_LISTED_ROWS} more bad rows, not listed" in body["message"]
    assert len(response.content) < 8_000, len(response.content)


def test_four_concurrent_bombs_are_refused_and_the_server_keeps_serving(server, originals):
    from concurrent.futures import ThreadPoolExecutor

    url = server[0].url
    bomb = _b64(palette_bomb(4000, 4000))
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda _: _post(url, [{IMAGE_COLUMN: bomb}] * 4), range(4)))
    assert [r.status_code for r in replies] == [400] * 4
    assert all("row 3: decompression bomb" in r.json()["message"] for r in replies)
    after = _post(url, [{IMAGE_COLUMN: _b64(originals[1])}])
    assert after.status_code == 200 and len(after.json()["predictions"]) == 1


def test_a_decoder_failure_keeps_its_trace_in_the_server_log_only(server, originals):
    running = server[0]
    response = _post(running.url, [{IMAGE_COLUMN: _b64(originals[0][: len(originals[0]) // 2])}])
    assert response.status_code == 400 and "Traceback" not in response.text
    assert "row 0: truncated or corrupt image data" in response.json()["message"]
    log = running.log_tail(20_000)
    assert "row 0 refused: truncated" in log and "Traceback" in log


def test_the_client_sends_chunks_and_names_rows_across_them(server, originals):
    from ecg_mlflow.serving.client import ServingError

    url = server[0].url
    frame = predict_over_http(url, originals[:3], chunk_rows=2)
    assert len(frame) == 3 and set(frame["label"]) <= set(CLASSES)
    with pytest.raises(ServingError, match=r"\(images 2-3\) .*row 3: GIF image") as caught:
        predict_over_http(url, [originals[0], originals[1], originals[2], foreign_image("GIF")], chunk_rows=2)
    assert caught.value.status == 400
