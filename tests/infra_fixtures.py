"""Pytest plugin: a real team tracking server (PostgreSQL 15 + moto S3 + MLflow) for a session.

Register it in tests/conftest.py with `from infra_fixtures import team_server, private_team_server`.
The fixture starts `infra/local/up` in a fresh state folder, yields a `TeamServer` that tells
clients where everything is and lets fault tests stop, start and restart one service, and runs
`infra/local/down --purge` at the end. Where PostgreSQL 15 is not installed it skips, unless
`ECG_MLFLOW_REQUIRE_INFRA=1` (CI), where it fails.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
INFRA_LOCAL = PROJECT_ROOT / "infra" / "local"
INITDB = Path("/usr/lib/postgresql/15/bin/initdb")
SERVICES = ("postgres", "s3", "mlflow")
UP_KEYS = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_S3_ENDPOINT_URL",
    "ECG_MLFLOW_S3_BUCKET",
    "ECG_MLFLOW_POSTGRES_URI",
    "ECG_MLFLOW_OPTUNA_STORAGE",
)
LOOPBACK_HEX = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it
S3_DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}


def s3_client(endpoint: str):
    """A boto3 S3 client for a moto server (dummy credentials)."""
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **{
        "aws_access_key_id": S3_DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": S3_DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    })


def require_infra() -> None:
    """Skip (or, with ECG_MLFLOW_REQUIRE_INFRA=1, fail) where PostgreSQL 15 is missing."""
    if INITDB.exists():
        return
    message = f"PostgreSQL 15 not installed ({INITDB} missing); run infra/install-system-deps"
    if os.environ.get("ECG_MLFLOW_REQUIRE_INFRA") == "1":
        pytest.fail(f"ECG_MLFLOW_REQUIRE_INFRA=1 but {message}", pytrace=False)
    pytest.skip(message)


def listening_addresses(port: int) -> set[str]:
    """Local addresses (hex, as in /proc/net/tcp) with a listening socket on `port`."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        if not Path(table).exists():
            continue
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            address, port_hex = fields[1].split(":")
            if fields[3] == "0A" and int(port_hex, 16) == port:  # 0A = LISTEN
                found.add(address)
    return found


def parse_up_output(stdout: str) -> dict[str, str]:
    """The `KEY=VALUE` lines `infra/local/up` prints, as a dict."""
    found = {}
    for line in stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep and key in UP_KEYS:
            found[key] = value
    missing = [k for k in UP_KEYS if k not in found]
    if missing:
        raise RuntimeError(f"infra/local/up printed no {', '.join(missing)} line; output:\n{stdout}")
    return found


@dataclass
class TeamServer:
    """A running local team server and the handles the fault tests need."""

    state_dir: Path
    settings: dict[str, str] = field(default_factory=dict)

    @property
    def tracking_uri(self) -> str:
        return self.settings["MLFLOW_TRACKING_URI"]

    @property
    def s3_endpoint(self) -> str:
        return self.settings["MLFLOW_S3_ENDPOINT_URL"]

    @property
    def bucket(self) -> str:
        return self.settings["ECG_MLFLOW_S3_BUCKET"]

    @property
    def postgres_uri(self) -> str:
        return self.settings["ECG_MLFLOW_POSTGRES_URI"]

    @property
    def optuna_storage(self) -> str:
        return self.settings["ECG_MLFLOW_OPTUNA_STORAGE"]

    def client_env(self) -> dict[str, str]:
        """Environment for a client process (a training subprocess, `mlflow run`, ...)."""
        return {**os.environ, **self.settings, "MLFLOW_TRACKING_URI": self.tracking_uri}

    def s3(self):
        """A boto3 S3 client for the test server (dummy credentials)."""
        return s3_client(self.s3_endpoint)

    def run_script(self, name: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """Run `infra/local/<name>` against this server's state folder; raise with its stderr."""
        result = subprocess.run(
            [str(INFRA_LOCAL / name), *args],
            env={**os.environ, "ECG_MLFLOW_INFRA_DIR": str(self.state_dir)},
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(
                f"infra/local/{name} {' '.join(args)} exited {result.returncode}:\n{result.stderr}"
            )
        return result

    def up(self, only: str | None = None) -> None:
        result = self.run_script("up", *(["--only", only] if only else []))
        self.settings = parse_up_output(result.stdout)

    def stop(self, service: str) -> None:
        """Stop one service (`postgres`, `s3` or `mlflow`); `start` brings it back on its port."""
        self.run_script("down", "--only", service)

    def start(self, service: str) -> None:
        self.up(only=service)

    def restart(self, service: str) -> None:
        self.run_script("restart", service)

    def down(self, purge: bool = True) -> None:
        self.run_script("down", *(["--purge"] if purge else []))


def start_team_server() -> TeamServer:
    """Start a fresh server in a new folder the `postgres` user can reach (not pytest's 0700 tmp)."""
    require_infra()
    state = Path(tempfile.mkdtemp(prefix="ecg-mlflow-infra-"))
    state.chmod(0o711)
    server = TeamServer(state_dir=state)
    try:
        server.up()
    except BaseException:
        server.down()
        raise
    return server


@pytest.fixture(scope="session")
def team_server():
    """A running local team server for the whole session; torn down (and purged) at the end."""
    server = start_team_server()
    try:
        yield server
    finally:
        server.down()


@pytest.fixture(scope="module")
def private_team_server():
    """A team server of one test module's own, for tests that stop, restart or take down its
    parts: moto keeps objects in memory, so a `down`/`up` of the shared server would empty the
    bucket under every later module's runs (the study cached in tests/team_study.py)."""
    server = start_team_server()
    try:
        yield server
    finally:
        server.down()


@dataclass
class S3Server:
    """A moto S3 server alone (no PostgreSQL, no MLflow) and its bucket."""

    endpoint: str
    bucket: str = "ecg-mlflow"

    def env(self) -> dict[str, str]:
        """What a client process needs to reach it, as MLflow's S3 clients read it."""
        return {"MLFLOW_S3_ENDPOINT_URL": self.endpoint, "AWS_DEFAULT_REGION": "us-east-1", **S3_DUMMY_CREDENTIALS}

    def client(self):
        return s3_client(self.endpoint)


@pytest.fixture(scope="module")
def s3_server():
    """moto's S3 server on a free loopback port for one module (objects live in its memory,
    so no other module sees them); skipped where moto is not installed."""
    import shutil
    import socket
    import sys
    import time
    import urllib.request

    executable = Path(sys.executable).with_name("moto_server")
    if not executable.exists():
        found = shutil.which("moto_server")
        if found is None:
            pytest.skip("moto_server not installed (pip install -e .[test])")
        executable = Path(found)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    process = subprocess.Popen([str(executable), "-H", "127.0.0.1", "-p", str(port)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    server = S3Server(f"http://127.0.0.1:{port}")
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{server.endpoint}/moto-api/", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server on port {port} did not start (exit {process.poll()})")
                time.sleep(0.2)
        server.client().create_bucket(Bucket=server.bucket)
        yield server
    finally:
        process.terminate()
        process.wait(timeout=30)
