"""ecg-mlflow: a tracked transfer-learning study on ECG report images."""

import os

__version__ = "0.1.0"

# TensorFlow's C++ start-up chatter (CPU features, oneDNN) buries the progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# NumPy's matrix products here are small (a batch's region pooling, a head's Jacobian), and
# they run beside OpenVINO's threads and the head processes, which keep every core busy.
# OpenBLAS' worker threads wait for work by spinning, on those cores: a cold bf16 study
# (benchmarks/cold_study.py, 2 cores) used 231-239 CPU seconds with them, 210-215 without.
# Read when NumPy loads OpenBLAS, so it holds where ecg_mlflow comes first (its commands).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from ecg_mlflow.telemetry import keep_usage_data_local  # noqa: E402

keep_usage_data_local()  # before anything imports OpenVINO
