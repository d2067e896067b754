"""ecg-mlflow's processes send no usage reports (ecg_mlflow/telemetry.py): OpenVINO's converter
sends nothing and writes no client id, and MLflow's telemetry is off. A library's own opt-in
still counts.

Each check runs in a fresh interpreter with a bare environment (PATH, and a HOME of its
own). Both libraries stay silent in CI or under pytest of their own accord, so the checks
strip the variables that tell them so (CI, PYTEST_CURRENT_TEST).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from ecg_mlflow.telemetry import MLFLOW_SWITCH, OPENVINO_TELEMETRY_MODULE, keep_usage_data_local

CONVERT_AND_COUNT = """
import multiprocessing
forks = []
start = multiprocessing.Process.start
multiprocessing.Process.start = lambda self: (forks.append(self), start(self))[1]
import time
import ecg_mlflow
import keras
from ecg_mlflow.model.engines import convert_keras
from openvino.tools.ovc import telemetry_utils
inputs = keras.Input((8,))
convert_keras(keras.Model(inputs, keras.layers.Dense(2)(inputs)))
time.sleep(2)  # a sender thread would have forked by now
print(telemetry_utils.tm.__name__, len(forks))
"""


def bare_python(code: str, home: Path, **env: str) -> str:
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=240,
                            env={"PATH": os.environ["PATH"], "HOME": str(home), **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip().splitlines()[-1]


def test_openvino_conversion_sends_nothing_and_writes_no_client_id(tmp_path):
    module, forks = bare_python(CONVERT_AND_COUNT, tmp_path).split()
    assert (module, forks) == ("openvino.tools.ovc.telemetry_stub", "0")
    assert not (tmp_path / "intel").exists()  # OpenVINO's telemetry keeps its client id there


def test_openvino_users_opt_in_is_kept(tmp_path):
    (tmp_path / "intel").mkdir()
    (tmp_path / "intel" / "openvino_telemetry").write_text("1")  # what `opt_in_out --opt_in` writes
    code = "import ecg_mlflow, openvino\nfrom openvino.tools.ovc import telemetry_utils\nprint(telemetry_utils.tm.__name__)"
    assert bare_python(code, tmp_path) == OPENVINO_TELEMETRY_MODULE


def test_mlflow_telemetry_is_off_unless_asked_for(tmp_path):
    code = "import ecg_mlflow\nfrom mlflow.telemetry.utils import is_telemetry_disabled\nprint(is_telemetry_disabled())"
    assert bare_python(code, tmp_path) == "True"
    assert bare_python(code, tmp_path, **{MLFLOW_SWITCH: "false"}) == "False"


def test_a_telemetry_package_imported_before_is_left_alone(tmp_path):
    imported = object()
    environ, modules = {}, {OPENVINO_TELEMETRY_MODULE: imported}
    keep_usage_data_local(environ, modules, tmp_path / "no-consent-file")
    assert modules == {OPENVINO_TELEMETRY_MODULE: imported}
    assert environ == {MLFLOW_SWITCH: "true"}
