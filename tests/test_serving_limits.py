"""The served model's limits: where they are read from, how they fail, how errors stay small."""

from __future__ import annotations

import pytest

from ecg_mlflow.parsing import ConfigError
from ecg_mlflow.serving import limits
from ecg_mlflow.serving.limits import ServingLimits, list_bad_rows, resolve_limits


def test_defaults_then_model_config_then_environment():
    assert resolve_limits({}, {}) == ServingLimits(limits.DEFAULT_MAX_ROWS, limits.DEFAULT_MAX_CONCURRENT_REQUESTS,
                                                  limits.DEFAULT_QUEUE_TIMEOUT_S)
    config = {"max_rows": 8, "max_concurrent_requests": "3", "arch": "resnet50"}
    assert resolve_limits(config, {}) == ServingLimits(8, 3, limits.DEFAULT_QUEUE_TIMEOUT_S)
    environ = {limits.MAX_ROWS_ENV: "4", limits.MAX_CONCURRENT_ENV: " ", limits.QUEUE_TIMEOUT_ENV: "5"}
    assert resolve_limits(config, environ) == ServingLimits(4, 3, 5)


@pytest.mark.parametrize("environ, config, named", [
    ({limits.MAX_ROWS_ENV: "many"}, {}, limits.MAX_ROWS_ENV),
    ({limits.MAX_ROWS_ENV: "0"}, {}, limits.MAX_ROWS_ENV),
    ({}, {"max_concurrent_requests": -1}, "model config max_concurrent_requests"),
    ({limits.QUEUE_TIMEOUT_ENV: "1e9"}, {}, limits.QUEUE_TIMEOUT_ENV),
])
def test_a_bad_limit_fails_naming_it(environ, config, named):
    with pytest.raises(ConfigError, match=f"^{named} must be an integer"):
        resolve_limits(config, environ)


def test_bad_rows_are_listed_up_to_a_bound_with_short_reasons():
    rows = {i: "x" * 10_000 for i in range(1000)}
    text = list_bad_rows(rows)
    assert text.startswith("row 0: xxx") and f"row {limits.MAX_LISTED_ROWS - 1}:" in text
    assert f"row {limits.MAX_LISTED_ROWS}:" not in text
    assert text.endswith(f"and {1000 - limits.MAX_LISTED_ROWS} more bad rows, not listed")
    assert len(text) < limits.MAX_LISTED_ROWS * (limits.MAX_REASON_CHARS + 12) + 60
    assert list_bad_rows({3: "a\nb"}) == "row 3: a b"
