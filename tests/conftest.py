"""Shared fixtures: the real dataset in ../shared/data and an isolated MLflow store."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA_ENV = "ECG_MLFLOW_SHARED_DATA"
"""Points the tests at another copy of ../shared/data (and lets a test aim them at nothing)."""
SHARED_DATA = Path(os.environ.get(SHARED_DATA_ENV) or PROJECT_ROOT.parent / "shared" / "data")
REAL_IMAGES = SHARED_DATA / "ecg-images"
REAL_ORIGINALS = SHARED_DATA / "ecg-originals-sample"
REAL_FACTS = SHARED_DATA / "mendeley-v2-originals.csv"


def infra_required() -> bool:
    """CI (`.ci/run`) sets ECG_MLFLOW_REQUIRE_INFRA=1: there, what a test needs must be present."""
    return os.environ.get("ECG_MLFLOW_REQUIRE_INFRA") == "1"


def require_real_data(path: Path, what: str) -> Path:
    """`path` if it exists; else skip, or fail where CI requires infra (the data is always
    present in CI, so a missing folder there is a broken checkout, not a reason to skip)."""
    if path.exists():
        return path
    message = f"{what} not found at {path} (it is always present in CI; {SHARED_DATA_ENV} overrides)"
    if infra_required():
        pytest.fail(f"ECG_MLFLOW_REQUIRE_INFRA=1 but {message}", pytrace=False)
    pytest.skip(message)


@pytest.fixture(scope="session")
def real_images() -> Path:
    """The 928 real ECG reports (half-size JPEGs); skipped where ../shared/data is absent,
    failed there when ECG_MLFLOW_REQUIRE_INFRA=1."""
    return require_real_data(REAL_IMAGES, "real dataset")


@pytest.fixture(scope="session")
def real_originals() -> Path:
    """Two untouched 2213 x 1572 originals per class (skip/fail rule as `real_images`)."""
    return require_real_data(REAL_ORIGINALS, "original sample")


@pytest.fixture(scope="session")
def real_facts() -> Path:
    """The published per-file facts of the Mendeley originals (skip/fail rule as `real_images`)."""
    return require_real_data(REAL_FACTS, "Mendeley facts file")


INFRA_FIXTURES = ("team_server", "private_team_server")
"""PostgreSQL + S3 + MLflow server (infra/local/up), in any module."""
SLOW_FIXTURES = {
    "test_promote.py": "study",  # trains 2 backbones x 2 seeds
    "test_serving.py": "served",  # trains a run and logs the serving model
    "test_serve_http.py": "server",  # trains, promotes and starts `mlflow models serve`
}
"""Module fixtures that train models (module -> fixture)."""


TEAM_GROUP = "team-server"


def pytest_collection_modifyitems(config, items):
    """A test that uses a team server or a training module fixture is `slow` (and `infra` for
    the servers), so the fast lane (`-m "not slow"`) never starts one by accident.

    For `make test`'s two workers (pytest-xdist, `--dist loadgroup`) every test is grouped
    by its module, so a module fixture (a trained model, a served one) is built once; the
    users of the shared team server form one group, so it starts, and the team study runs,
    on one worker only."""
    for item in items:
        uses = set(item.fixturenames)
        team = bool(uses & set(INFRA_FIXTURES))
        if team:
            item.add_marker(pytest.mark.infra)
            item.add_marker(pytest.mark.slow)
        if SLOW_FIXTURES.get(item.path.name) in uses:
            item.add_marker(pytest.mark.slow)
        item.add_marker(pytest.mark.xdist_group(TEAM_GROUP if team else item.path.name))


_MLFLOW_CONTEXT_VARS = ("MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID")


def _forget_mlflow_context() -> None:
    """`mlflow.set_experiment` writes MLFLOW_EXPERIMENT_ID into os.environ and a module
    global; left over, they point the next test (and its `mlflow run` subprocesses) at an
    experiment of another store."""
    import mlflow
    from mlflow.tracking import fluent

    while mlflow.active_run() is not None:
        mlflow.end_run()
    for name in _MLFLOW_CONTEXT_VARS:
        os.environ.pop(name, None)
    fluent._active_experiment_id = None


@pytest.fixture(autouse=True)
def isolated_mlflow_context():
    """Every test starts and ends without an active experiment or run."""
    _forget_mlflow_context()
    yield
    _forget_mlflow_context()


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A fresh SQLite tracking store for one test, set as the default. The test runs in
    tmp_path, so the store's default artifact root (./mlruns) lies there too."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.chdir(tmp_path)
    import mlflow

    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


from infra_fixtures import private_team_server, s3_server, team_server  # noqa: E402,F401  (PostgreSQL + S3 + MLflow server; S3 alone)
