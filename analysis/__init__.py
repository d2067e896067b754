"""Statistics over the tracked runs of a study: the `analyze` entry point.

Talks to training only through MLflow (the run schema in DESIGN.md / `ecg_mlflow.schema`):
`gather` finds a study's finished train runs and pairs them by seed, `stats` holds the pure
statistics, `run` computes a `StudyAnalysis` and logs it, `report` writes tables and figures.
"""
