"""The served model's limits: rows per request, requests decoding at once, error size.

Memory of the server is what these bound. One request holds its rows as uint8 pixels at the
model's input size (1.5 MiB a row at 512 x 1024) plus one row being decoded (bounded by
data/decode.py); at most `max_concurrent_requests` requests decode and predict at a time,
the others wait for a slot. Error replies list the first MAX_LISTED_ROWS bad rows and count
the rest, so a request of a thousand bad rows gets a reply of a few kilobytes.

Each limit is read, in this order, from an environment variable of the serving process, the
model config (`mlflow models serve` passes SERVING_MODEL_CONFIG), or the default below.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping

from ecg_mlflow.parsing import parse_int

DEFAULT_MAX_ROWS = 32
"""Rows per request (48 MiB of pixels at 512 x 1024); clients send larger sets in chunks."""
DEFAULT_MAX_CONCURRENT_REQUESTS = 2
"""Requests decoding and predicting at once; inference is serialised anyway (pyfunc._infer)."""
DEFAULT_QUEUE_TIMEOUT_S = 60
"""How long a request waits for a decoding slot before it is answered 503 (busy)."""
MAX_ROWS_LIMIT = 10_000
MAX_CONCURRENT_LIMIT = 64

MAX_ROWS_ENV = "ECG_MLFLOW_MAX_ROWS"
MAX_CONCURRENT_ENV = "ECG_MLFLOW_MAX_CONCURRENT_REQUESTS"
QUEUE_TIMEOUT_ENV = "ECG_MLFLOW_QUEUE_TIMEOUT_S"
CONFIG_MAX_ROWS = "max_rows"
CONFIG_MAX_CONCURRENT = "max_concurrent_requests"
CONFIG_QUEUE_TIMEOUT = "queue_timeout_s"

MAX_LISTED_ROWS = 20
"""Bad rows named one by one in an error reply; the rest are counted."""
MAX_REASON_CHARS = 200
"""A reason longer than this (a decoder's own message) is cut."""


@dataclass(frozen=True)
class ServingLimits:
    """The limits one served model enforces."""

    max_rows: int = DEFAULT_MAX_ROWS
    max_concurrent_requests: int = DEFAULT_MAX_CONCURRENT_REQUESTS
    queue_timeout_s: int = DEFAULT_QUEUE_TIMEOUT_S


def read_limit(env_name: str, config_key: str, default: int, maximum: int, *,
               environ: Mapping[str, str], config: Mapping[str, Any]) -> int:
    """One limit: the environment, then the model config, then the default (ConfigError names it)."""
    if environ.get(env_name, "").strip():
        return parse_int(env_name, environ[env_name], minimum=1, maximum=maximum)
    if config.get(config_key) not in (None, ""):
        return parse_int(f"model config {config_key}", config[config_key], minimum=1, maximum=maximum)
    return default


def resolve_limits(config: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> ServingLimits:
    """The limits of a served model, from the serving environment and its model config."""
    environ = os.environ if environ is None else environ
    config = config or {}
    return ServingLimits(
        max_rows=read_limit(MAX_ROWS_ENV, CONFIG_MAX_ROWS, DEFAULT_MAX_ROWS, MAX_ROWS_LIMIT,
                            environ=environ, config=config),
        max_concurrent_requests=read_limit(MAX_CONCURRENT_ENV, CONFIG_MAX_CONCURRENT,
                                           DEFAULT_MAX_CONCURRENT_REQUESTS, MAX_CONCURRENT_LIMIT,
                                           environ=environ, config=config),
        queue_timeout_s=read_limit(QUEUE_TIMEOUT_ENV, CONFIG_QUEUE_TIMEOUT, DEFAULT_QUEUE_TIMEOUT_S, 3600,
                                   environ=environ, config=config),
    )


def shorten(reason: str) -> str:
    """A reason cut to MAX_REASON_CHARS, on one line."""
    text = " ".join(str(reason).split())
    return text if len(text) <= MAX_REASON_CHARS else text[:MAX_REASON_CHARS - 3] + "..."


def list_bad_rows(rows: Mapping[int, str]) -> str:
    """`row i: reason` for the first MAX_LISTED_ROWS rows, then a count of the others."""
    ordered = sorted(rows.items())
    listed = "; ".join(f"row {i}: {shorten(reason)}" for i, reason in ordered[:MAX_LISTED_ROWS])
    rest = len(ordered) - MAX_LISTED_ROWS
    return listed + (f"; and {rest} more bad rows, not listed" if rest > 0 else "")
