"""What a study found: the best head as a document, state counts, and the figures.
"""

from __future__ import annotations

import warnings

from ecg_mlflow.model.head import HeadConfig
from ecg_mlflow.tune.config import OBJECTIVE, OBJECTIVE_DESCRIPTION
from ecg_mlflow.tune.objective import MLFLOW_RUN_ATTR
from ecg_mlflow.tune.space import head_from_params


def best_head_document(study, base: HeadConfig) -> dict[str, object]:
    """best_head.json: the head fields `main --head-config` reads, plus provenance."""
    trial = study.best_trial
    head = head_from_params(trial.params, base)
    return {
        "dense_units": list(head.dense_units),
        "dropout": head.dropout,
        "learning_rate": head.learning_rate,
        "batch_size": head.batch_size,
        "value": trial.value,
        "objective": OBJECTIVE_DESCRIPTION,
        "trial": trial.number,
        "study": study.study_name,
        "mlflow_run_id": trial.user_attrs.get(MLFLOW_RUN_ATTR),
    }


def count_states(trials) -> dict[str, int]:
    """Trials by state name (COMPLETE, PRUNED, FAIL, RUNNING, WAITING)."""
    counts: dict[str, int] = {}
    for trial in trials:
        counts[trial.state.name] = counts.get(trial.state.name, 0) + 1
    return counts


def plot_history(study):
    """Optimisation history (objective per trial and best so far), as a Figure."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna.visualization.matplotlib.plot_optimization_history(study)
    axes.set_title(f"{study.study_name}: {OBJECTIVE} (lower is better)")
    return axes.figure


def plot_importances(study):
    """fANOVA parameter importances over the completed trials, as a Figure; None while
    fewer than two trials completed (importances are undefined)."""
    import optuna

    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        axes = optuna.visualization.matplotlib.plot_param_importances(study)
    return axes.figure
