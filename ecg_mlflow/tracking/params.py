"""Logging params once: `mlflow run` has already logged the raw entry-point values."""

from __future__ import annotations


def log_unlogged_params(run_id: str, params: dict[str, str]) -> None:
    """Log the params the run does not have yet. `mlflow run` has already logged the raw entry
    point values, which MLflow will not overwrite; those keep the user's spelling."""
    import mlflow
    from mlflow.tracking import MlflowClient

    logged = MlflowClient().get_run(run_id).data.params
    mlflow.log_params({k: v for k, v in params.items() if k not in logged})
