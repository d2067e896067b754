"""When the tracking server does not answer: a bounded wait, then one clear error.

MLflow's client retries every HTTP request with exponential backoff (7 retries, factor 2:
about four minutes per request), and a command that fails then tries again to end its runs
FAILED, so a stopped server used to cost a study 10+ minutes and a page of tracebacks. The
commands bound the retries (about 30 s, enough to ride out a restart of the server or its
database), stop at the first request that still fails, and name the server.
"""

from __future__ import annotations

import os

RETRY_DEFAULTS: dict[str, str] = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "5",  # waits 0 + 2 + 4 + 8 + 16 s (+ jitter) before giving up
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
"""Used where the user has not set these variables; theirs always win."""


class TrackingServerUnavailable(RuntimeError):
    """The tracking server did not answer within the retry budget; the work so far is kept."""


def bound_http_retries() -> None:
    """Apply RETRY_DEFAULTS to the environment where unset (MLflow reads them per request)."""
    for name, value in RETRY_DEFAULTS.items():
        os.environ.setdefault(name, value)


def is_unreachable(exc: BaseException) -> bool:
    """True when `exc` (or what it was raised from) is a failed connection, a timeout or
    retries exhausted on 5xx answers: the server, not the request, is at fault."""
    import requests
    import urllib3

    unreachable = (
        requests.exceptions.ConnectionError,
        requests.exceptions.Timeout,
        requests.exceptions.RetryError,
        urllib3.exceptions.MaxRetryError,
        TrackingServerUnavailable,
    )
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, unreachable):
            return True
        seen.add(id(current))
        # MLflow wraps the requests error without `from`, so follow __context__ as well
        current = current.__cause__ or current.__context__
    return False


def unavailable_error(exc: BaseException) -> TrackingServerUnavailable:
    """The one-line error a command shows, naming the server and how to go on."""
    import mlflow

    if isinstance(exc, TrackingServerUnavailable):
        return exc
    first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return TrackingServerUnavailable(
        f"the MLflow tracking server at {mlflow.get_tracking_uri()} does not answer "
        f"({first_line[:300]}). Finished runs are kept; start the server again and rerun "
        "the same command"
    )


def end_run_once(status: str) -> None:
    """End the active run with a single request and no retries; never raises.

    Pops MLflow's active-run stack either way, so its exit handler does not retry once more
    (and would mark the run FINISHED). A run the server never hears about stays RUNNING; a
    rerun of the study trains that pair again and leaves the stale run alone."""
    import mlflow

    saved = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        mlflow.end_run(status=status)
    except Exception:
        pass
    finally:
        if saved is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = saved
