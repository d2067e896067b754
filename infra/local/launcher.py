"""Local team tracking server for tests and CI: PostgreSQL 15, moto's S3 server, MLflow.

The three services run as plain processes on loopback ports, with all their state (data,
logs, pids, ports, an `env` file of exports) in one folder: `$ECG_MLFLOW_INFRA_DIR`, by
default `<project>/.infra`. `up` is idempotent and starts only what is not answering, so the
fault tests can stop one service (`down --only postgres`) and bring it back (`up --only
postgres` or `restart postgres`) on the same port while the others keep running.

Usage: launcher.py up [--only SERVICE] | down [--only SERVICE] [--purge] | restart SERVICE
| status. The executables `infra/local/up`, `down`, `restart` and `status` call this file.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PG_BIN = Path(os.environ.get("ECG_MLFLOW_PG_BIN", "/usr/lib/postgresql/15/bin"))
SERVICES: tuple[str, ...] = ("postgres", "s3", "mlflow")
"""In start order: MLflow needs the database and the bucket."""

BUCKET = os.environ.get("ECG_MLFLOW_S3_BUCKET", "ecg-mlflow")
DATABASES: tuple[str, ...] = ("mlflow", "optuna")
# moto accepts any credentials; these are not secrets, only placeholders boto3 insists on.
S3_DUMMY_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}
S3_REGION = "us-east-1"
PG_SUPERUSER = "postgres"


class InfraError(RuntimeError):
    """A service did not come up; the message names it and shows its log tail."""


@dataclass(frozen=True)
class Layout:
    """Where one launcher instance keeps its state."""

    root: Path

    @property
    def ports_file(self) -> Path:
        return self.root / "ports.json"

    @property
    def secrets_file(self) -> Path:
        return self.root / "postgres.password"

    @property
    def env_file(self) -> Path:
        return self.root / "env"

    @property
    def pg_dir(self) -> Path:
        return self.root / "postgres"

    @property
    def pg_data(self) -> Path:
        return self.pg_dir / "data"

    def log(self, service: str) -> Path:
        if service == "postgres":
            return self.pg_dir / "postgres.log"
        return self.root / f"{service}.log"

    def pid_file(self, service: str) -> Path:
        return self.root / f"{service}.pid"


def state_dir() -> Path:
    """`$ECG_MLFLOW_INFRA_DIR`, or `.infra/` in the project (git-ignored)."""
    return Path(os.environ.get("ECG_MLFLOW_INFRA_DIR") or PROJECT_ROOT / ".infra").resolve()


def bind_host() -> str:
    """Loopback unless `ECG_MLFLOW_INFRA_HOST` says otherwise (off by default, on purpose)."""
    return os.environ.get("ECG_MLFLOW_INFRA_HOST", "127.0.0.1")


def timeout_s() -> float:
    return float(os.environ.get("ECG_MLFLOW_INFRA_TIMEOUT", "180"))


def venv_bin(name: str) -> str:
    """An executable of the project's virtualenv, else of the running interpreter, else PATH."""
    for folder in (PROJECT_ROOT / ".venv" / "bin", Path(sys.executable).parent):
        if (folder / name).exists():
            return str(folder / name)
    found = shutil.which(name)
    if found is None:
        raise InfraError(f"`{name}` not found in {PROJECT_ROOT / '.venv/bin'} nor on PATH")
    return found


# --- ports, secrets, pids ------------------------------------------------------------------


def free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def load_ports(layout: Layout, host: str) -> dict[str, int]:
    """Ports chosen on the first `up` and kept, so a restarted service keeps its address."""
    if layout.ports_file.exists():
        return json.loads(layout.ports_file.read_text())
    ports = {service: free_port(host) for service in SERVICES}
    layout.ports_file.write_text(json.dumps(ports, indent=2))
    return ports


def postgres_password(layout: Layout) -> str:
    if not layout.secrets_file.exists():
        layout.secrets_file.write_text(secrets.token_urlsafe(18))
        layout.secrets_file.chmod(0o600)
    return layout.secrets_file.read_text().strip()


def read_pid(layout: Layout, service: str) -> int | None:
    try:
        return int(layout.pid_file(service).read_text())
    except (FileNotFoundError, ValueError):
        return None


def pid_alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of this process still "exists"; reap it if it is ours.
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def log_tail(path: Path, lines: int = 25) -> str:
    if not path.exists():
        return f"(no log at {path})"
    text = path.read_text(errors="replace").splitlines()[-lines:]
    return "\n".join(f"    {line}" for line in text) or "    (log is empty)"


def wait_until(service: str, check, layout: Layout, pid: int | None = None) -> None:
    """Poll `check()` until it is true; fail with the service's log tail on timeout or death."""
    deadline = time.monotonic() + timeout_s()
    last_error = "no answer yet"
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception as exc:  # any failure to answer means "not yet"
            last_error = f"{type(exc).__name__}: {exc}"
        if pid is not None and not pid_alive(pid):
            raise InfraError(
                f"{service} exited during start-up ({last_error}); log {layout.log(service)}:\n"
                f"{log_tail(layout.log(service))}"
            )
        time.sleep(0.3)
    raise InfraError(
        f"{service} did not answer within {timeout_s():.0f} s ({last_error}); "
        f"log {layout.log(service)}:\n{log_tail(layout.log(service))}"
    )


def spawn(layout: Layout, service: str, argv: list[str], env: dict[str, str]) -> int:
    """Start a detached process group (so `down` can stop the server and its workers)."""
    with open(layout.log(service), "ab") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **env},
            start_new_session=True,
            cwd=layout.root,
        )
    layout.pid_file(service).write_text(str(proc.pid))
    return proc.pid


def stop_group(layout: Layout, service: str, grace_s: float = 15.0) -> None:
    """SIGTERM the service's process group, SIGKILL it if it lingers; forget the pid."""
    pid = read_pid(layout, service)
    if pid_alive(pid):
        try:
            os.killpg(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace_s
        while pid_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.2)
        if pid_alive(pid):
            try:
                os.killpg(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    layout.pid_file(service).unlink(missing_ok=True)


# --- PostgreSQL ----------------------------------------------------------------------------


def as_postgres(argv: list[str]) -> list[str]:
    """PostgreSQL refuses to run as root: drop to the `postgres` user when we are root."""
    if os.geteuid() == 0:
        return ["runuser", "-u", PG_SUPERUSER, "--", *argv]
    return argv


def postgres_uri(host: str, port: int, password: str, database: str) -> str:
    return f"postgresql+psycopg2://{PG_SUPERUSER}:{password}@{host}:{port}/{database}"


def postgres_answers(host: str, port: int, password: str) -> bool:
    import psycopg2

    conn = psycopg2.connect(
        host=host, port=port, user=PG_SUPERUSER, password=password, dbname="postgres", connect_timeout=3
    )
    conn.close()
    return True


def init_postgres(layout: Layout, password: str) -> None:
    """initdb once: password (scram) auth over TCP, no unix socket in a shared folder."""
    if (layout.pg_data / "PG_VERSION").exists():
        return
    initdb = PG_BIN / "initdb"
    if not initdb.exists():
        raise InfraError(f"postgres: {initdb} not found; run infra/install-system-deps (PostgreSQL 15)")
    layout.pg_dir.mkdir(parents=True, exist_ok=True)
    pwfile = layout.pg_dir / "initdb.pw"
    pwfile.write_text(password + "\n")
    if os.geteuid() == 0:
        shutil.chown(layout.pg_dir, PG_SUPERUSER, PG_SUPERUSER)
        shutil.chown(pwfile, PG_SUPERUSER, PG_SUPERUSER)
        # The postgres user must reach the folder: fail clearly instead of a cryptic initdb error.
        probe = subprocess.run(as_postgres(["test", "-w", str(layout.pg_dir)]), capture_output=True)
        if probe.returncode != 0:
            raise InfraError(
                f"postgres: user {PG_SUPERUSER!r} cannot write {layout.pg_dir}; give every parent "
                f"folder of {layout.root} search permission (chmod o+x) or set ECG_MLFLOW_INFRA_DIR"
            )
    pwfile.chmod(0o600)
    result = subprocess.run(
        as_postgres(
            [
                str(initdb),
                "-D", str(layout.pg_data),
                "-U", PG_SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-host=scram-sha-256",
                "--auth-local=scram-sha-256",
                "--encoding=UTF8",
                "--no-instructions",
            ]
        ),
        capture_output=True,
        text=True,
    )
    pwfile.unlink(missing_ok=True)
    if result.returncode != 0:
        raise InfraError(f"postgres: initdb failed:\n{result.stdout}{result.stderr}")


def start_postgres(layout: Layout, host: str, port: int, password: str) -> None:
    init_postgres(layout, password)
    log = layout.log("postgres")
    # pg_ctl -w waits for the server itself; the log must be writable by the postgres user.
    options = f"-c listen_addresses={host} -p {port} -c unix_socket_directories=''"
    result = subprocess.run(
        as_postgres(
            [str(PG_BIN / "pg_ctl"), "-D", str(layout.pg_data), "-l", str(log), "-o", options,
             "-w", "-t", str(int(timeout_s())), "start"]
        ),
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise InfraError(
            f"postgres: pg_ctl start failed ({result.stdout.strip()} {result.stderr.strip()}); "
            f"log {log}:\n{log_tail(log)}"
        )
    postmaster_pid = (layout.pg_data / "postmaster.pid").read_text().split()[0]
    layout.pid_file("postgres").write_text(postmaster_pid)
    wait_until("postgres", lambda: postgres_answers(host, port, password), layout)
    create_databases(host, port, password)


def create_databases(host: str, port: int, password: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host=host, port=port, user=PG_SUPERUSER, password=password, dbname="postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for name in DATABASES:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
                if cur.fetchone() is None:
                    cur.execute(f'CREATE DATABASE "{name}"')
    finally:
        conn.close()


def stop_postgres(layout: Layout) -> None:
    if not (layout.pg_data / "postmaster.pid").exists():
        layout.pid_file("postgres").unlink(missing_ok=True)
        return
    subprocess.run(
        as_postgres([str(PG_BIN / "pg_ctl"), "-D", str(layout.pg_data), "-m", "fast", "-w", "stop"]),
        capture_output=True,
        text=True,
    )
    layout.pid_file("postgres").unlink(missing_ok=True)


# --- S3 (moto) -----------------------------------------------------------------------------


def s3_client(endpoint: str):
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=S3_REGION,
        aws_access_key_id=S3_DUMMY_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=S3_DUMMY_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
    )


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=3) as response:
        return 200 <= response.status < 300


def start_s3(layout: Layout, host: str, port: int) -> None:
    """moto keeps objects in memory: a restarted S3 server comes back with an empty bucket."""
    endpoint = f"http://{host}:{port}"
    pid = spawn(layout, "s3", [venv_bin("moto_server"), "-H", host, "-p", str(port)], {})
    wait_until("s3", lambda: http_ok(f"{endpoint}/moto-api/"), layout, pid)
    client = s3_client(endpoint)
    if BUCKET not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=BUCKET)


def s3_answers(endpoint: str) -> bool:
    s3_client(endpoint).head_bucket(Bucket=BUCKET)
    return True


# --- MLflow --------------------------------------------------------------------------------


def start_mlflow(layout: Layout, host: str, ports: dict[str, int], password: str) -> None:
    argv = [
        venv_bin("mlflow"), "server",
        "--backend-store-uri", postgres_uri(host, ports["postgres"], password, "mlflow"),
        "--artifacts-destination", f"s3://{BUCKET}/artifacts",
        "--serve-artifacts",
        "--host", host,
        "--port", str(ports["mlflow"]),
        "--workers", os.environ.get("ECG_MLFLOW_INFRA_WORKERS", "2"),
    ]
    env = {
        **S3_DUMMY_CREDENTIALS,
        "AWS_DEFAULT_REGION": S3_REGION,
        "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{ports['s3']}",
        # The huey job runner is an extra process per server; the project uses no server jobs.
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        # No usage reports from the server unless asked for (MLflow 3 sends them by default).
        "MLFLOW_DISABLE_TELEMETRY": os.environ.get("MLFLOW_DISABLE_TELEMETRY", "true"),
    }
    pid = spawn(layout, "mlflow", argv, env)
    wait_until("mlflow", lambda: http_ok(f"http://{host}:{ports['mlflow']}/health"), layout, pid)


# --- commands ------------------------------------------------------------------------------


def exports(host: str, ports: dict[str, int], password: str) -> dict[str, str]:
    """What clients need; with --serve-artifacts they reach S3 only through MLflow."""
    return {
        "MLFLOW_TRACKING_URI": f"http://{host}:{ports['mlflow']}",
        "MLFLOW_S3_ENDPOINT_URL": f"http://{host}:{ports['s3']}",
        "ECG_MLFLOW_S3_BUCKET": BUCKET,
        "ECG_MLFLOW_POSTGRES_URI": postgres_uri(host, ports["postgres"], password, "mlflow"),
        "ECG_MLFLOW_OPTUNA_STORAGE": postgres_uri(host, ports["postgres"], password, "optuna"),
        **S3_DUMMY_CREDENTIALS,
    }


def is_up(service: str, layout: Layout, host: str, ports: dict[str, int], password: str) -> bool:
    """Alive and answering, not merely a pid file."""
    try:
        if service == "postgres":
            return postgres_answers(host, ports["postgres"], password)
        if not pid_alive(read_pid(layout, service)):
            return False
        if service == "s3":
            return s3_answers(f"http://{host}:{ports['s3']}")
        return http_ok(f"http://{host}:{ports['mlflow']}/health")
    except Exception:
        return False


def port_taken(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex((host, port)) == 0


def up(only: str | None = None) -> dict[str, str]:
    layout = Layout(state_dir())
    layout.root.mkdir(parents=True, exist_ok=True)
    host = bind_host()
    ports = load_ports(layout, host)
    password = postgres_password(layout)
    for service in SERVICES if only is None else (only,):
        if is_up(service, layout, host, ports, password):
            continue
        stop(layout, service)  # clear a half-dead process or a stale pid before starting
        if port_taken(host, ports[service]):
            raise InfraError(
                f"{service}: port {host}:{ports[service]} (from {layout.ports_file}) is used by "
                f"another process; stop it, or `down --purge` to pick new ports"
            )
        try:
            if service == "postgres":
                start_postgres(layout, host, ports["postgres"], password)
            elif service == "s3":
                start_s3(layout, host, ports["s3"])
            else:
                start_mlflow(layout, host, ports, password)
        except BaseException:
            stop(layout, service)  # leave no half-started process behind the error
            raise
    env = exports(host, ports, password)
    layout.env_file.write_text("".join(f"export {k}={v}\n" for k, v in env.items()))
    layout.env_file.chmod(0o600)
    return env


def stop(layout: Layout, service: str) -> None:
    if service == "postgres":
        stop_postgres(layout)
    else:
        stop_group(layout, service)


def down(only: str | None = None, purge: bool = False) -> None:
    layout = Layout(state_dir())
    if not layout.root.exists():
        return
    for service in reversed(SERVICES) if only is None else (only,):
        stop(layout, service)
    if purge and only is None:
        shutil.rmtree(layout.root)


def status() -> dict[str, bool]:
    layout = Layout(state_dir())
    if not layout.ports_file.exists():
        return {service: False for service in SERVICES}
    host, ports, password = bind_host(), load_ports(layout, bind_host()), postgres_password(layout)
    return {service: is_up(service, layout, host, ports, password) for service in SERVICES}


def print_exports(env: dict[str, str]) -> None:
    """The `KEY=VALUE` lines `up` prints: every export but the placeholder S3 credentials."""
    for key, value in env.items():
        if key not in S3_DUMMY_CREDENTIALS:
            print(f"{key}={value}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_up = sub.add_parser("up", help="start what is not answering, print the client settings")
    p_up.add_argument("--only", choices=SERVICES)
    p_down = sub.add_parser("down", help="stop the services (safe to repeat)")
    p_down.add_argument("--only", choices=SERVICES)
    p_down.add_argument("--purge", action="store_true", help="also delete the state folder")
    p_restart = sub.add_parser("restart", help="stop one service and start it on the same port")
    p_restart.add_argument("service", choices=SERVICES)
    sub.add_parser("status", help="which services answer")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            started = time.monotonic()
            env = up(args.only)
            print_exports(env)
            print(f"# infra up in {time.monotonic() - started:.1f} s; state in {state_dir()}", file=sys.stderr)
        elif args.command == "down":
            down(args.only, args.purge)
        elif args.command == "restart":
            down(args.service)
            print_exports(up(args.service))
        else:
            states = status()
            for service, answering in states.items():
                print(f"{service}: {'up' if answering else 'down'}")
            return 0 if all(states.values()) else 3
    except InfraError as exc:
        print(f"infra/local: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
