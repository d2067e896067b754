"""ecg-mlflow: a tracked transfer-learning study on ECG report images."""

import os

__version__ = "0.1.0"

# TensorFlow's C++ start-up chatter (CPU features, oneDNN) buries the progress lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from ecg_mlflow.telemetry import keep_usage_data_local  # noqa: E402

keep_usage_data_local()  # before anything imports OpenVINO
