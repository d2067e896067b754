"""Faults against the team server: a study killed with SIGKILL, the tracking server stopped
mid-study, four processes logging at once, PostgreSQL restarted mid-study; and the security
rules (loopback binding, Keras safe mode). Figures are in docs/reliability.md.

Each study here is 2 backbones x 2 seeds at 64x64 without logged models, in its own
experiment, so the tests do not see each other's runs.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from ecg_mlflow import schema
from ecg_mlflow.model.features import FeatureCache, FeatureKey

from team_study import (
    ARCHS, PAIR_NAMES, SEEDS, SMALL, VENV_BIN, demo_set, kill_if_running, mlflow_client, run_client,
    start_client, study_children, study_command, study_parents, wait_for,
)

N_PAIRS = len(PAIR_NAMES)
QUICK = ("--log-model", "false", "--analyze", "false")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return demo_set(tmp_path_factory.getbasetemp())


def cache_entries(cache: Path) -> dict[Path, FeatureCache]:
    """Every feature file of a cache folder, with the FeatureCache that can read it."""
    found = {}
    for meta in cache.glob("*/*/key.json"):
        fields = json.loads(meta.read_text())
        # key.json holds the weights' identity; every study here uses weights=none. Engine and
        # precision appear only where they are not Keras fp32 (the key from before engines).
        cache_obj = FeatureCache(cache, FeatureKey(fields["arch"], "none", fields["height"], fields["width"],
                                                   fields["crop"], fields.get("engine", "keras"),
                                                   fields.get("precision", "fp32")))
        assert cache_obj.folder == meta.parent, "key.json does not match its folder"
        found.update({entry: cache_obj for entry in meta.parent.glob("*/*.f32")})
    return found


def assert_cache_sound(cache: Path, expected_per_arch: int) -> None:
    entries = cache_entries(cache)
    for entry, cache_obj in entries.items():
        assert cache_obj.load(entry.stem) is not None, f"damaged cache entry {entry}"
    per_arch = {}
    for entry in entries:
        arch = entry.relative_to(cache).parts[0]
        per_arch[arch] = per_arch.get(arch, 0) + 1
    assert per_arch == {arch: expected_per_arch for arch in ARCHS}, per_arch


def tmp_files(cache: Path) -> set[Path]:
    return set(cache.rglob(".*.tmp"))


def run_named(client, experiment_id: str, parent_id: str, name: str, status: str | None = None):
    for run in study_children(client, experiment_id, parent_id):
        if run.info.run_name == name and (status is None or run.info.status == status):
            return run
    return None


def first_parent(client, experiment: str):
    parents = study_parents(client, experiment)
    return parents[0] if parents else None


def finished_pairs(client, experiment_id: str, parent_id: str) -> set[str]:
    return {r.info.run_name for r in study_children(client, experiment_id, parent_id) if r.info.status == "FINISHED"}


@pytest.fixture
def team_server(private_team_server):
    """These tests stop and restart the server's parts: they get a server of their own."""
    return private_team_server


def rerun_study(team_server, data: Path, cache: Path, experiment: str):
    """Run the same study again to completion; return (new parent run, its children)."""
    again = run_client(study_command(data, cache, experiment, *QUICK), team_server)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    client = mlflow_client(team_server)
    parent = study_parents(client, experiment)[-1]
    return parent, study_children(client, parent.info.experiment_id, parent.info.run_id)


# ---- SIGKILL ------------------------------------------------------------------------------


@pytest.mark.infra
@pytest.mark.slow
@pytest.mark.timeout(1500)  # whole studies against a server being stopped, killed or restarted
def test_study_killed_with_sigkill_resumes_with_only_the_missing_runs(team_server, data, tmp_path):
    experiment, cache, log = "fault-sigkill", tmp_path / "cache", tmp_path / "study.log"
    client = mlflow_client(team_server)
    study = start_client(study_command(data, cache, experiment, *QUICK), team_server, log)
    try:
        # the first run of the second backbone: it is building that backbone and filling the cache
        parent = wait_for(lambda: first_parent(client, experiment), "the study run", study, log)
        exp_id, old_parent_id = parent.info.experiment_id, parent.info.run_id
        victim_name = f"{ARCHS[1]}-s{SEEDS[0]}"
        victim = wait_for(lambda: run_named(client, exp_id, old_parent_id, victim_name, "RUNNING"),
                          f"{victim_name} running", study, log)
        os.killpg(study.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        assert study.wait(timeout=30) == -signal.SIGKILL
    finally:
        kill_if_running(study)

    # SIGKILL runs no handler: the run killed and its parent stay RUNNING on the server
    assert client.get_run(victim.info.run_id).info.status == "RUNNING"
    assert client.get_run(old_parent_id).info.status == "RUNNING"
    done_before = finished_pairs(client, exp_id, old_parent_id)
    assert victim_name not in done_before and len(done_before) < N_PAIRS
    for entry, cache_obj in cache_entries(cache).items():  # a kill mid-write leaves no bad entry
        assert cache_obj.load(entry.stem) is not None, f"damaged cache entry {entry} after SIGKILL"
    left_by_kill = tmp_files(cache)

    new_parent, children = rerun_study(team_server, data, cache, experiment)
    recovered_s = time.monotonic() - killed_at
    assert new_parent.data.metrics["runs_trained"] == N_PAIRS - len(done_before)
    assert new_parent.data.metrics["runs_reused"] == len(done_before)
    assert new_parent.data.metrics["runs_failed"] == 0
    finished = {r.info.run_name: r for r in children if r.info.status == "FINISHED"}
    assert sorted(finished) == list(PAIR_NAMES)
    assert all(finished[name].data.tags[schema.TAG_ADOPTED_FROM] == old_parent_id for name in done_before)
    # the stale RUNNING run is not adopted: a new run trained that pair, the old one is left as it was
    assert finished[victim_name].info.run_id != victim.info.run_id
    stale = client.get_run(victim.info.run_id)
    assert stale.info.status == "RUNNING" and stale.data.tags[schema.TAG_STUDY] == old_parent_id
    assert schema.TAG_ADOPTED_FROM not in stale.data.tags
    assert_cache_sound(cache, expected_per_arch=24)
    assert tmp_files(cache) <= left_by_kill, "the rerun left temporary files of its own"
    print(f"\nSIGKILL: {len(done_before)} finished before the kill; rerun done {recovered_s:.1f} s after it")


KILLED_WRITER = textwrap.dedent("""
    import os, sys, time
    import numpy as np
    from ecg_mlflow.model.features import FeatureCache, FeatureKey
    cache = FeatureCache(sys.argv[1], FeatureKey("vgg16", "none", 64, 64, "none"))
    cache.store("aa" * 32, np.ones(cache.dim, np.float32))
    def stuck_replace(src, dst):  # the temporary file is written and synced; hang before the rename
        open(sys.argv[2], "w").write(src)
        time.sleep(600)
    os.replace = stuck_replace
    cache.store("bb" * 32, np.full(cache.dim, 2.0, np.float32))
""")


@pytest.mark.infra
def test_a_write_killed_before_its_rename_leaves_only_an_ignored_tmp_file(tmp_path):
    """Deterministic version of a SIGKILL mid-write: the cache never reads the leftover, a
    later write of the same entry is unharmed, and it is removed once it is an hour old."""
    cache_root, ready = tmp_path / "cache", tmp_path / "tmp-written"
    writer = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(cache_root), str(ready)],
                              env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    try:
        wait_for(lambda: ready.exists() and ready.read_text(), "the temporary file", writer, timeout=120)
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
    leftover = Path(ready.read_text())
    assert leftover.exists() and leftover.name.endswith(".tmp") and leftover.stat().st_size > 0

    cache = FeatureCache(cache_root, FeatureKey("vgg16", "none", 64, 64, "none"))
    assert leftover.exists(), "a young temporary file may be a write in progress: it must stay"
    assert cache.load("bb" * 32) is None  # never renamed into place: absent, not half-read
    np.testing.assert_array_equal(cache.load("aa" * 32), np.ones(cache.dim, np.float32))
    cache.store("bb" * 32, np.full(cache.dim, 3.0, np.float32))
    np.testing.assert_array_equal(cache.load("bb" * 32), np.full(cache.dim, 3.0, np.float32))

    hour_ago = time.time() - 3700
    os.utime(leftover, (hour_ago, hour_ago))
    young = leftover.with_name(".young.f32.x.tmp")
    young.write_bytes(b"in progress")
    FeatureCache(cache_root, FeatureKey("vgg16", "none", 64, 64, "none"))
    assert not leftover.exists() and young.exists()
    np.testing.assert_array_equal(cache.load("bb" * 32), np.full(cache.dim, 3.0, np.float32))


# ---- tracking server stopped --------------------------------------------------------------


@pytest.mark.infra
@pytest.mark.slow
@pytest.mark.timeout(1500)  # whole studies against a server being stopped, killed or restarted
def test_tracking_server_stopped_mid_study_fails_clearly_then_resumes(team_server, data, tmp_path):
    experiment, cache, log = "fault-server-stop", tmp_path / "cache", tmp_path / "study.log"
    client = mlflow_client(team_server)
    study = start_client(study_command(data, cache, experiment, *QUICK), team_server, log)
    try:
        parent = wait_for(lambda: first_parent(client, experiment), "the study run", study, log)
        exp_id, old_parent_id = parent.info.experiment_id, parent.info.run_id
        wait_for(lambda: run_named(client, exp_id, old_parent_id, f"{ARCHS[0]}-s{SEEDS[0]}", "FINISHED"),
                 "the first run finished", study, log)
        stopped_at = time.monotonic()
        team_server.stop("mlflow")
        # MLflow's own retries alone would take 10+ minutes here; the study gives up in about 30 s
        returncode = study.wait(timeout=240)
        failed_after_s = time.monotonic() - stopped_at
    finally:
        kill_if_running(study)
        team_server.start("mlflow")
    output = log.read_text(errors="replace")
    assert returncode == 1, output[-3000:]
    assert f"the MLflow tracking server at {team_server.tracking_uri} does not answer" in output
    assert "rerun the same command" in output and "Traceback" not in output

    restarted_at = time.monotonic()
    done_before = finished_pairs(client, exp_id, old_parent_id)
    assert f"{ARCHS[0]}-s{SEEDS[0]}" in done_before and len(done_before) < N_PAIRS
    new_parent, children = rerun_study(team_server, data, cache, experiment)
    assert new_parent.data.metrics["runs_trained"] == N_PAIRS - len(done_before)
    assert new_parent.data.metrics["runs_reused"] == len(done_before)
    assert sorted(r.info.run_name for r in children if r.info.status == "FINISHED") == list(PAIR_NAMES)
    assert_cache_sound(cache, expected_per_arch=24)
    print(f"\nserver stop: study failed {failed_after_s:.1f} s after the stop; "
          f"resumed study done {time.monotonic() - restarted_at:.1f} s after the restart")


# ---- concurrent writers -------------------------------------------------------------------


@pytest.mark.infra
@pytest.mark.slow
@pytest.mark.timeout(1500)  # whole studies against a server being stopped, killed or restarted
def test_four_processes_log_runs_at_once(team_server, data, tmp_path):
    """Four `ecg-mlflow train` processes, one cold feature cache: the server takes four
    writers at once and the cache four concurrent writers of the same entries."""
    experiment, cache = "fault-concurrent", tmp_path / "cache"
    arch = ARCHS[1]
    processes = []
    for seed in (1, 2, 3, 4):
        command = [str(VENV_BIN / "ecg-mlflow"), "train", "--arch", arch, "--seed", str(seed), "--data", str(data),
                   *SMALL, "--cache-dir", str(cache), "--log-model", "false", "--experiment", experiment]
        processes.append((seed, start_client(command, team_server, tmp_path / f"train-{seed}.log")))
    started = time.monotonic()
    try:
        for seed, process in processes:
            returncode = process.wait(timeout=900)
            assert returncode == 0, (tmp_path / f"train-{seed}.log").read_text(errors="replace")[-3000:]
    finally:
        for _, process in processes:
            kill_if_running(process)
    elapsed = time.monotonic() - started

    client = mlflow_client(team_server)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    assert sorted(r.info.run_name for r in runs) == [f"{arch}-s{s}" for s in (1, 2, 3, 4)]
    for run in runs:
        assert run.info.status == "FINISHED"
        assert {"test_accuracy", "test_f1_macro", "val_loss"} <= set(run.data.metrics)
        assert len(client.get_metric_history(run.info.run_id, "loss")) >= 1
        logged = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"test_predictions.csv", "confusion_matrix.png", "split.csv"} <= logged, logged
    entries = cache_entries(cache)
    assert len(entries) == 24 and not tmp_files(cache)
    assert all(obj.load(entry.stem) is not None for entry, obj in entries.items())
    print(f"\nfour writers: all done in {elapsed:.1f} s")


# ---- PostgreSQL restarted -----------------------------------------------------------------


@pytest.mark.infra
@pytest.mark.slow
@pytest.mark.timeout(1500)  # whole studies against a server being stopped, killed or restarted
def test_study_completes_across_a_postgres_restart(team_server, data, tmp_path):
    """The server's pool pings connections before use and the client retries 5xx answers,
    so a restart of the database between two runs and another during one cost nothing."""
    experiment, cache, log = "fault-postgres", tmp_path / "cache", tmp_path / "study.log"
    client = mlflow_client(team_server)
    study = start_client(study_command(data, cache, experiment, *QUICK), team_server, log)
    try:
        parent = wait_for(lambda: first_parent(client, experiment), "the study run", study, log)
        exp_id, parent_id = parent.info.experiment_id, parent.info.run_id
        wait_for(lambda: run_named(client, exp_id, parent_id, f"{ARCHS[0]}-s{SEEDS[0]}", "FINISHED"),
                 "the first run finished", study, log)
        team_server.restart("postgres")
        wait_for(lambda: run_named(client, exp_id, parent_id, f"{ARCHS[1]}-s{SEEDS[0]}", "RUNNING"),
                 f"{ARCHS[1]}-s{SEEDS[0]} running", study, log)
        team_server.restart("postgres")
        returncode = study.wait(timeout=600)
    finally:
        kill_if_running(study)
    output = log.read_text(errors="replace")
    assert returncode == 0, output[-3000:]
    final = client.get_run(parent_id)
    assert final.info.status == "FINISHED" and final.data.metrics["runs_trained"] == N_PAIRS
    children = study_children(client, exp_id, parent_id)
    assert sorted(r.info.run_name for r in children if r.info.status == "FINISHED") == list(PAIR_NAMES)
    assert len(children) == N_PAIRS
