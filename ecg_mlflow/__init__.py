"""ecg-mlflow: a tracked transfer-learning study on ECG report images."""

__version__ = "0.1.0"
