"""The rules the test suite itself follows: in CI (ECG_MLFLOW_REQUIRE_INFRA=1) missing real
data fails instead of skipping, and every test has a time limit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import PROJECT_ROOT, SHARED_DATA_ENV

REAL_DATA_TESTS = (
    "tests/test_dataset.py::test_describe_real_dataset_matches_readme",  # real_images
    "tests/test_preprocess.py::test_real_original_gives_uint8_rgb_of_requested_size",  # real_originals
    "tests/test_mendeley.py::test_packaged_facts_equal_the_shared_copy",  # real_facts
)


def _pytest(tmp_path, *, require_infra: bool) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ECG_MLFLOW_REQUIRE_INFRA"}
    env[SHARED_DATA_ENV] = str(tmp_path / "no-shared-data")
    if require_infra:
        env["ECG_MLFLOW_REQUIRE_INFRA"] = "1"
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-o", "addopts=", "-rsE", *REAL_DATA_TESTS],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=300,
    )


@pytest.mark.parametrize("require_infra", [False, True])
def test_missing_real_data_skips_locally_and_fails_where_ci_requires_it(tmp_path, require_infra):
    result = _pytest(tmp_path, require_infra=require_infra)
    output = result.stdout + result.stderr
    missing = str(tmp_path / "no-shared-data")
    assert missing in output, output[-3000:]
    if require_infra:
        assert result.returncode == 1, output[-3000:]
        assert f"{len(REAL_DATA_TESTS)} errors" in output and "skipped" not in output, output[-3000:]
        assert "ECG_MLFLOW_REQUIRE_INFRA=1 but" in output
    else:
        assert result.returncode == 0, output[-3000:]
        assert f"{len(REAL_DATA_TESTS)} skipped" in output and "error" not in output.lower(), output[-3000:]


def test_every_test_has_a_time_limit(pytestconfig):
    """pytest-timeout is installed (the test extra pins it) and configured: a hung test fails
    on its own after at most 600 s (or its marked limit) instead of stalling CI."""
    assert pytestconfig.pluginmanager.hasplugin("timeout")
    assert float(pytestconfig.getini("timeout")) == 600

