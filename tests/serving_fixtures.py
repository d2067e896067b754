"""Helpers for the serving and promotion tests: a module-wide MLflow store, a small real
study, hand-made analysis runs, hostile images and a real `mlflow models serve` process.

Training is the expensive part, so the synthetic dataset and the feature cache live once
per pytest session (under the session's base temp folder) and each module trains only the
runs it needs.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import requests

from ecg_mlflow import schema
from team_study import demo_set

VENV_BIN = Path(sys.executable).parent
SMALL = {"weights": "none", "image_height": "64", "image_width": "128", "max_epochs": "3", "engine": "keras"}
"""Training settings of the test models: tiny images, a seeded random frozen backbone, Keras
(test_engines.py trains and serves through OpenVINO with `train_study(..., params=...)`)."""


@contextmanager
def isolated_store(root: Path) -> Iterator[str]:
    """A SQLite tracking + registry store under `root` for a whole module; artifacts under
    `root` too (MLflow ignores MLFLOW_ARTIFACT_ROOT, so experiments get explicit locations)."""
    import mlflow
    import pytest

    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", uri)
        patch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
        mlflow.set_tracking_uri(uri)
        try:
            yield uri
        finally:
            mlflow.set_tracking_uri(None)


def experiment_id(name: str, root: Path) -> str:
    """Create `name` with its artifacts under `root` (or return its id)."""
    import mlflow

    found = mlflow.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return mlflow.create_experiment(name, artifact_location=(root / "artifacts" / name).as_uri())


def shared_demo_set(tmp_path_factory) -> Path:
    """24 synthetic reports (6 per class), written once per session."""
    return demo_set(tmp_path_factory.getbasetemp())


def shared_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "serving-feature-cache"


@dataclass(frozen=True)
class Study:
    experiment: str
    experiment_id: str
    study_run_id: str
    runs: dict[tuple[str, int], str]
    """(arch, seed) -> train run id."""


def train_study(experiment: str, root: Path, data: Path, cache: Path, archs: tuple[str, ...],
                seeds: tuple[int, ...], params: dict[str, str] | None = None) -> Study:
    """A study parent run (ecg.role=study, param archs) with one real train child per
    (arch, seed), built as the study driver does; `params` overrides SMALL."""
    import mlflow

    from ecg_mlflow.config import parse_train_config
    from ecg_mlflow.train import load_dataset, train_and_log

    exp_id = experiment_id(experiment, root)
    manifest = load_dataset(str(data), progress=False)
    runs = {}
    with mlflow.start_run(experiment_id=exp_id, run_name="study",
                          tags={schema.TAG_ROLE: schema.ROLE_STUDY}) as parent:
        mlflow.log_params({"archs": ",".join(archs), "seeds": ",".join(map(str, seeds))})
        for arch in archs:
            for seed in seeds:
                tags = {schema.TAG_STUDY: parent.info.run_id, schema.TAG_ROLE: schema.ROLE_TRAIN}
                with mlflow.start_run(experiment_id=exp_id, nested=True, run_name=f"{arch}-s{seed}",
                                      tags=tags) as child:
                    config = parse_train_config(arch=arch, seed=str(seed), data=str(data),
                                                cache_dir=str(cache), **{**SMALL, **(params or {})})
                    train_and_log(config, manifest=manifest, progress=False)
                    runs[(arch, seed)] = child.info.run_id
    return Study(experiment, exp_id, parent.info.run_id, runs)


def hand_analysis_run(study: Study, winner: str, other: str, *, significant: bool, metric: str = "accuracy",
                      p_bonferroni: float = 0.001) -> str:
    """An analysis run with the tags, params and metrics of ecg_mlflow/schema.py, its verdict
    chosen by the test (the real statistics are tested in test_analysis.py)."""
    import mlflow

    tags = {
        schema.TAG_ROLE: schema.ROLE_ANALYSIS,
        schema.TAG_STUDY: study.study_run_id,
        schema.TAG_PRIMARY_METRIC: metric,
        schema.TAG_WINNER: winner if significant else schema.NO_WINNER,
        schema.TAG_SIGNIFICANT: str(significant).lower(),
        schema.winner_tag(metric): winner,
        schema.significant_tag(metric): str(significant).lower(),
    }
    with mlflow.start_run(experiment_id=study.experiment_id, run_name="analysis-by-hand", tags=tags) as run:
        mlflow.log_params({schema.PARAM_ARCHS: f"{winner},{other}", schema.PARAM_STUDY_RUN_ID: study.study_run_id,
                           schema.PARAM_ALPHA: "0.05", schema.PARAM_METRICS: metric})
        mlflow.log_metrics({schema.stat_metric(metric, schema.STAT_P_BONFERRONI): p_bonferroni,
                            schema.stat_metric(metric, schema.STAT_P_TTEST): p_bonferroni / 4})
    return run.info.run_id


# ---- hostile inputs ---------------------------------------------------------------------


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height (no real pixel data): an 'absurdly large'
    upload that must be refused from the header alone, without decoding."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


# ---- a real model server ----------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class ModelServer:
    url: str
    process: subprocess.Popen
    log: Path

    def log_tail(self, n: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""


def server_env(tracking_uri: str) -> dict[str, str]:
    env = dict(os.environ, MLFLOW_TRACKING_URI=tracking_uri, TF_CPP_MIN_LOG_LEVEL="3")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"  # `python`/`uvicorn` of the venv
    return env


def stop_process_group(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGTERM to the group a server was started in (start_new_session=True), SIGKILL if it
    does not exit within `timeout`: `mlflow models serve` runs its workers as children."""
    import signal

    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextmanager
def model_server(model_uri: str, tracking_uri: str, log: Path, *, workers: int | None = None,
                 host: str = "127.0.0.1", startup_timeout: float = 240.0) -> Iterator[ModelServer]:
    """`mlflow models serve -m MODEL_URI -h HOST --env-manager local` on a free port of `host`
    (a loopback address); waits for /ping, yields, then stops the whole process group it started."""
    port = free_port(host)
    command = ["mlflow", "models", "serve", "-m", model_uri, "-h", host, "-p", str(port),
               "--env-manager", "local"]
    if workers:
        command += ["--workers", str(workers)]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, env=server_env(tracking_uri), stdout=out, stderr=subprocess.STDOUT,
                                   start_new_session=True)
    server = ModelServer(f"http://{host}:{port}", process, log)
    try:
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"model server exited with {process.returncode}:\n{server.log_tail()}")
            try:
                if requests.get(f"{server.url}/ping", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"model server not up after {startup_timeout:.0f} s:\n{server.log_tail()}")
            time.sleep(0.5)
        yield server
    finally:
        stop_process_group(process, timeout=20)


FOREIGN_FORMATS: tuple[str, ...] = ("GIF", "TIFF", "BMP", "WEBP", "TGA", "PPM", "ICO", "EPS", "DDS", "BLP")
"""Formats Pillow decodes that the serving contract refuses (the issue's list)."""


def foreign_image(fmt: str) -> bytes:
    """A small real image in `fmt`, written by Pillow."""
    import io

    from PIL import Image

    image = Image.new("RGB", (64, 32), (200, 30, 30))
    buffer = io.BytesIO()
    (image.convert("P") if fmt == "BLP" else image).save(buffer, fmt)
    return buffer.getvalue()


def palette_bomb(width: int, height: int) -> bytes:
    """A palette PNG with transparency, one colour: tens of megapixels in a few kilobytes,
    which the old path turned into several full-size RGBA copies (the issue's bomb)."""
    import io

    from PIL import Image

    image = Image.new("P", (width, height), 0)
    image.putpalette([255, 255, 255] * 256)
    buffer = io.BytesIO()
    image.save(buffer, "PNG", transparency=0, optimize=True)
    return buffer.getvalue()
