#!/usr/bin/env python
"""Prepare basic auth, then exec the command (the `mlflow server ...` line of the compose file).

MLflow's basic-auth app reads its settings from an ini file (MLFLOW_AUTH_CONFIG_PATH) and the
first admin's password from MLFLOW_AUTH_ADMIN_PASSWORD. The ini cannot read the environment,
so it is written here: the users and permissions live in their own PostgreSQL database
(created here if missing), so they survive a rebuilt container. No password has a default.
"""

from __future__ import annotations

import os
import sys
from urllib.parse import quote

REQUIRED = ("POSTGRES_USER", "POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")


def require_env() -> dict[str, str]:
    missing = [name for name in REQUIRED if not os.environ.get(name)]
    if missing:
        sys.exit(f"mlflow-entrypoint: set {', '.join(missing)} (see infra/.env.example)")
    return {name: os.environ[name] for name in REQUIRED}


def create_auth_database(user: str, password: str, host: str, port: str, name: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host=host, port=port, user=user, password=password, dbname="postgres")
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,))
        if cur.fetchone() is None:
            cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()


def write_auth_config(path: str, database_uri: str) -> None:
    admin = os.environ.get("MLFLOW_AUTH_ADMIN_USERNAME", "admin")
    text = (
        "[mlflow]\n"
        f"default_permission = {os.environ.get('MLFLOW_AUTH_DEFAULT_PERMISSION', 'READ')}\n"
        f"database_uri = {database_uri.replace('%', '%%')}\n"
        f"admin_username = {admin}\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def main() -> None:
    env = require_env()
    host = os.environ.get("POSTGRES_HOST", "postgres")
    port = os.environ.get("POSTGRES_PORT", "5432")
    auth_db = os.environ.get("MLFLOW_AUTH_DB", "mlflow_auth")
    create_auth_database(env["POSTGRES_USER"], env["POSTGRES_PASSWORD"], host, port, auth_db)
    uri = (
        f"postgresql+psycopg2://{quote(env['POSTGRES_USER'], safe='')}:"
        f"{quote(env['POSTGRES_PASSWORD'], safe='')}@{host}:{port}/{auth_db}"
    )
    write_auth_config(os.environ["MLFLOW_AUTH_CONFIG_PATH"], uri)
    os.execvp(sys.argv[1], sys.argv[1:])


if __name__ == "__main__":
    main()
