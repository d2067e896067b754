"""A real browser on the team server's MLflow UI: headless Chromium renders the experiment
page (a React app that fetches the runs) and the study's runs appear by their readable schema.

The runs table nests child runs under their collapsed parent unless the list is filtered AND
sorted by something other than the start time (MLflow's `nestChildren` rule), so the page is
opened with a filter on the train runs, sorted by run name: the URL a user would share."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from urllib.parse import quote, urlencode

import pytest

from ecg_mlflow import schema

from team_study import team_study

pytestmark = [pytest.mark.infra, pytest.mark.slow, pytest.mark.timeout(1500)]  # may be the first to run the team study
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=15000", "--window-size=1400,900",
)


def chromium() -> str:
    found = str(CHROMIUM) if CHROMIUM.exists() else shutil.which("chromium")
    if found:
        return found
    message = f"chromium not installed ({CHROMIUM} missing); run infra/install-system-deps"
    if os.environ.get("ECG_MLFLOW_REQUIRE_INFRA") == "1":
        pytest.fail(f"ECG_MLFLOW_REQUIRE_INFRA=1 but {message}", pytrace=False)
    pytest.skip(message)


def runs_page_url(tracking_uri: str, experiment_id: str) -> str:
    query = urlencode({"searchFilter": f"tags.`{schema.TAG_ROLE}` = '{schema.ROLE_TRAIN}'",
                       "orderByKey": "tags.`mlflow.runName`", "orderByAsc": "true"}, quote_via=quote)
    return f"{tracking_uri}/#/experiments/{experiment_id}/runs?{query}"


def run_chromium(binary: str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """One headless Chromium with a throwaway profile; no network beyond loopback is used."""
    return subprocess.run([binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=180)


def test_the_experiment_page_lists_the_study_runs_by_name(team_server, tmp_path_factory, tmp_path):
    binary = chromium()
    study = team_study(team_server, tmp_path_factory.getbasetemp())
    url = runs_page_url(team_server.tracking_uri, study.experiment_id)

    dumped = run_chromium(binary, tmp_path / "profile-dom", "--dump-dom", url)
    assert dumped.returncode == 0, dumped.stderr[-2000:]
    dom = dumped.stdout
    assert study.experiment in dom, "the page did not render the experiment (still loading?)"
    for run_name, run_id in study.runs.items():  # vgg16-s1, vgg16-s2, mobilenetv3large-s1, ...
        assert f">{run_name}<" in dom, f"run {run_name} not shown on {url}"
        assert f"/runs/{run_id}\"" in dom, f"run {run_name} is not a link to its run page"

    screenshot = tmp_path / "experiment-page.png"
    shot = run_chromium(binary, tmp_path / "profile-shot", f"--screenshot={screenshot}", url)
    assert shot.returncode == 0, shot.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 20_000
    keep = os.environ.get("ECG_MLFLOW_SCREENSHOT_DIR")
    if keep:  # for a person to look at (docs/reliability.md says what it shows)
        shutil.copy(screenshot, Path(keep) / screenshot.name)
