"""The client side of the serving contract: what `predict --url` and the benchmarks send."""

from __future__ import annotations

import base64
import json
import re
from typing import Sequence

import pandas as pd

from ecg_mlflow import schema
from ecg_mlflow.serving.limits import DEFAULT_MAX_ROWS
from ecg_mlflow.serving.pyfunc import EXPLAIN_COLUMNS, IMAGE_COLUMN, OUTPUT_COLUMNS


class ServingError(RuntimeError):
    """The server refused a request or could not be reached; the message says which."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


def invocation_payload(images: Sequence[bytes], *, explain: bool = False) -> str:
    """The JSON body of `POST /invocations`: one record per image, bytes as base64; with
    `explain`, the param that asks for the per-region attribution too."""
    records = [{IMAGE_COLUMN: base64.b64encode(bytes(image)).decode("ascii")} for image in images]
    body: dict = {"dataframe_records": records}
    if explain:
        body["params"] = {schema.EXPLAIN_PARAM: True}
    return json.dumps(body)


def invocations_url(url: str) -> str:
    """`http://host:5001` -> `http://host:5001/invocations`; a full URL stays as it is."""
    from urllib.parse import urlsplit

    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"url must look like http://127.0.0.1:5001, got {url!r}")
    return url if parts.path.strip("/") else url.rstrip("/") + "/invocations"


def predict_over_http(url: str, images: Sequence[bytes], *, timeout: float = 300.0, session=None,
                      explain: bool = False, chunk_rows: int = DEFAULT_MAX_ROWS) -> pd.DataFrame:
    """Send images to a served model, `chunk_rows` per request (the server's default row
    limit), and return its frame (label + prob_* per image, in order; with `explain`, also
    the text share and attr_<region> columns)."""
    frames = [post_chunk(url, images[start:start + chunk_rows], start, timeout=timeout, session=session,
                         explain=explain)
              for start in range(0, len(images), chunk_rows)] or [post_chunk(url, [], 0, timeout=timeout,
                                                                             session=session, explain=explain)]
    return pd.concat(frames, ignore_index=True)


def post_chunk(url: str, images: Sequence[bytes], start: int, *, timeout: float, session=None,
               explain: bool = False) -> pd.DataFrame:
    """One request; an error's `row i` is renumbered to count from the first image sent overall."""
    import requests

    http = session or requests
    try:
        response = http.post(invocations_url(url), data=invocation_payload(images, explain=explain),
                             headers={"Content-Type": "application/json"}, timeout=timeout)
    except requests.RequestException as exc:
        raise ServingError(f"cannot reach the model server at {url}: {exc}") from None
    if response.status_code != 200:
        try:
            message = response.json().get("message", response.text)
        except ValueError:
            message = response.text
        # the scoring server prefixes "Failed to predict data '<the whole frame>'. Error: "
        message = message.split("\nError: ", 1)[-1]
        if start:
            message = re.sub(r"\brow (\d+):", lambda m: f"row {int(m[1]) + start}:", message)
            message = f"(images {start}-{start + len(images) - 1}) {message}"
        raise ServingError(f"server answered HTTP {response.status_code}: {message}", response.status_code)
    predictions = response.json()["predictions"]
    return pd.DataFrame(predictions, columns=list(OUTPUT_COLUMNS + (EXPLAIN_COLUMNS if explain else ())))
