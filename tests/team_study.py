"""Helpers for the tests that run the pipeline through the team server (PostgreSQL + S3 +
`mlflow server`): client processes, a small synthetic dataset, and one real study of
2 backbones x 2 seeds with its analysis, shared by test_team_server.py and test_browser.py.

The study is expensive, so it runs once per team server (one per pytest session) and is
memoised here: importing a session fixture into two modules would run it twice.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ecg_mlflow import schema

VENV_BIN = Path(sys.executable).parent
ARCHS = ("vgg16", "mobilenetv3large")
SEEDS = (1, 2)
PAIR_NAMES = tuple(sorted(f"{a}-s{s}" for a in ARCHS for s in SEEDS))
"""The run names of the study's (arch, seed) pairs, sorted."""
SMALL = ("--weights", "none", "--image-height", "64", "--image-width", "64", "--max-epochs", "3")
"""Training settings of every test run here: tiny images, a seeded random frozen backbone."""
STUDY_EXPERIMENT = "team-study"


def client_env(team_server) -> dict[str, str]:
    """A client process's environment: the server's settings, the venv first on PATH."""
    env = team_server.client_env()
    env.update(TF_CPP_MIN_LOG_LEVEL="3", MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", PYTHONUNBUFFERED="1")
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    return env


def demo_set(base: Path) -> Path:
    """24 synthetic reports (6 per class) under `base`, written once."""
    from ecg_mlflow.synth.reports import write_synthetic_dataset

    out = base / "team-demo-set"
    if not (out / "done").exists():
        write_synthetic_dataset(out / "data", per_class=6, seed=0, width=442, height=314)
        (out / "done").write_text("ok")
    return out / "data"


def study_command(data: Path, cache: Path, experiment: str, *extra: str) -> list[str]:
    return [str(VENV_BIN / "ecg-mlflow"), "study", "--archs", ",".join(ARCHS),
            "--seeds", f"{SEEDS[0]}-{SEEDS[-1]}", "--data", str(data), *SMALL,
            "--cache-dir", str(cache), "--experiment", experiment, *extra]


def run_client(command: list[str], team_server, *, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, env=client_env(team_server), capture_output=True, text=True, timeout=timeout)


def start_client(command: list[str], team_server, log: Path) -> subprocess.Popen:
    """A client process in its own session (so a kill reaches only it), output into `log`."""
    with open(log, "wb") as out:
        return subprocess.Popen(command, env=client_env(team_server), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def kill_if_running(process: subprocess.Popen) -> None:
    """SIGKILL the group of a client that is still running (cleanup after a failed wait)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=30)


def mlflow_client(team_server):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=team_server.tracking_uri, registry_uri=team_server.tracking_uri)


def study_parents(client, experiment: str) -> list:
    """Study parent runs of `experiment`, oldest first."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], f"tags.`{schema.TAG_ROLE}` = '{schema.ROLE_STUDY}'",
                              order_by=["attributes.start_time ASC"])


def study_children(client, experiment_id: str, parent_id: str) -> list:
    return client.search_runs(
        [experiment_id],
        f"tags.`{schema.TAG_STUDY}` = '{parent_id}' and tags.`{schema.TAG_ROLE}` = '{schema.ROLE_TRAIN}'",
    )


def wait_for(condition, what: str, process: subprocess.Popen | None = None, log: Path | None = None,
             timeout: float = 600, poll: float = 0.25):
    """Poll `condition()` until it returns something truthy; fail if the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            found = condition()
        except Exception:  # the server may be between states; keep polling
            found = None
        if found:
            return found
        if process is not None and process.poll() is not None:
            tail = log.read_text(errors="replace")[-3000:] if log else ""
            raise AssertionError(f"process exited ({process.returncode}) before {what}:\n{tail}")
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(poll)


@dataclass(frozen=True)
class TeamStudy:
    experiment: str
    experiment_id: str
    parent_run_id: str
    runs: dict[str, str]
    """run name (`vgg16-s1`) -> train run id."""
    analysis_run_id: str
    output: str


_STUDIES: dict[str, TeamStudy] = {}


def team_study(team_server, base: Path) -> TeamStudy:
    """The study of ARCHS x SEEDS through `ecg-mlflow study` against the team server, with
    models logged and the analysis at the end; run once per server."""
    if team_server.tracking_uri in _STUDIES:
        return _STUDIES[team_server.tracking_uri]
    done = run_client(study_command(demo_set(base), base / "team-feature-cache", STUDY_EXPERIMENT), team_server)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    client = mlflow_client(team_server)
    parent = study_parents(client, STUDY_EXPERIMENT)[-1]
    exp_id = parent.info.experiment_id
    children = study_children(client, exp_id, parent.info.run_id)
    analyses = client.search_runs(
        [exp_id], f"tags.`{schema.TAG_ROLE}` = '{schema.ROLE_ANALYSIS}' and "
                  f"tags.`{schema.TAG_STUDY}` = '{parent.info.run_id}'")
    assert len(analyses) == 1, f"expected one analysis run of study {parent.info.run_id}, found {len(analyses)}"
    study = TeamStudy(STUDY_EXPERIMENT, exp_id, parent.info.run_id,
                      {r.info.run_name: r.info.run_id for r in children}, analyses[0].info.run_id,
                      done.stdout + done.stderr)
    _STUDIES[team_server.tracking_uri] = study
    return study
