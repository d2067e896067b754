"""NumPy's BLAS runs on one thread in ecg-mlflow's processes unless the user says otherwise
(ecg_mlflow/__init__.py): its worker threads would spin beside OpenVINO's threads and the
head processes. Read in a fresh interpreter, where ecg_mlflow is imported before NumPy, as
in its commands."""

from __future__ import annotations

import os
import subprocess
import sys

BLAS_THREADS = ("import ecg_mlflow, numpy, threadpoolctl\n"
                "print([pool['num_threads'] for pool in threadpoolctl.threadpool_info() if pool['user_api'] == 'blas'])")


def blas_threads(**env: str) -> str:
    inherited = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    result = subprocess.run([sys.executable, "-c", BLAS_THREADS], capture_output=True, text=True, timeout=120,
                            env={**inherited, **env})
    assert result.returncode == 0, result.stderr[-2000:]
    return result.stdout.strip()


def test_numpy_blas_runs_on_one_thread_unless_the_user_sets_it():
    assert blas_threads() == "[1]"
    assert blas_threads(OPENBLAS_NUM_THREADS="2") == "[2]"
