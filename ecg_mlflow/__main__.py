"""`python -m ecg_mlflow` is the `ecg-mlflow` CLI (MLproject entry points call it)."""

from ecg_mlflow.cli import main

if __name__ == "__main__":
    main()
