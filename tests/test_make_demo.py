"""`make demo`, the README's first command, end to end: synthetic reports, the tracked study of
two offline pretrained backbones, its analysis and a champion in the registry, promoted with
`--force` (and saying so) exactly when the analysis is not significant."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ecg_mlflow import schema

from conftest import PROJECT_ROOT

DEMO_EXPERIMENT = "ecg-cvd"  # what the Makefile's study and promote use
FALLBACK_LINE = "demo: the 3-seed demo study is not significant; promoting anyway (--force)"


@pytest.mark.slow
@pytest.mark.timeout(1500)  # synth, a 2 x 3 study at 128 x 256 with its analysis, promotion
def test_make_demo_tracks_a_study_and_registers_a_champion(tmp_path):
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    # the experiment made here, so its artifacts stay in tmp_path (not ./mlruns of the project)
    client.create_experiment(DEMO_EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    venv = Path(sys.prefix)  # the venv running the tests: make installs nothing new into it
    mlruns_before = (PROJECT_ROOT / "mlruns").exists()
    env = dict(os.environ, MLFLOW_TRACKING_URI=uri, TF_CPP_MIN_LOG_LEVEL="3",
               MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false")
    done = subprocess.run(
        ["make", "demo", f"VENV={venv}", f"DEMO_DATA={tmp_path / 'demo'}", f"DEMO_CACHE={tmp_path / 'cache'}"],
        cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=1400,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]

    experiment = client.get_experiment_by_name(DEMO_EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    train = [r for r in runs if r.data.tags.get(schema.TAG_ROLE) == schema.ROLE_TRAIN]
    assert sorted(r.info.run_name for r in train) == sorted(
        f"{arch}-s{seed}" for arch in ("efficientnetlite0", "efficientnetlite1") for seed in (1, 2, 3))
    assert all(r.info.status == "FINISHED" and r.data.params["weights"] == "imagenet" for r in train)
    analyses = [r for r in runs if r.data.tags.get(schema.TAG_ROLE) == schema.ROLE_ANALYSIS]
    assert len(analyses) == 1
    significant = analyses[0].data.tags[schema.significant_tag("accuracy")] == "true"

    version = client.get_model_version_by_alias(schema.DEFAULT_MODEL_NAME, schema.CHAMPION_ALIAS)
    assert version.tags["analysis_run_id"] == analyses[0].info.run_id
    assert version.tags["forced"] == str(not significant).lower()
    # make echoes the recipe (the fallback's `echo "..."` included); the printed line is its own
    printed = any(line.startswith(FALLBACK_LINE) for line in output.splitlines())
    assert printed == (not significant), output[-4000:]
    assert f"serve -m \"models:/{schema.DEFAULT_MODEL_NAME}@{schema.CHAMPION_ALIAS}\"" in output
    assert (PROJECT_ROOT / "mlruns").exists() == mlruns_before, "the demo wrote ./mlruns into the project"
