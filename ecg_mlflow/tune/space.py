"""The search space over the head: what a trial suggests, and the head a set of params means.
"""

from __future__ import annotations

from dataclasses import replace

from ecg_mlflow.model.head import HeadConfig
from ecg_mlflow.tune.config import (
    DIRECTION, OBJECTIVE_DESCRIPTION, PRUNER_STARTUP_TRIALS, PRUNER_WARMUP_EPOCHS, SAMPLER_STARTUP_TRIALS,
)

# Search space. 0 second-layer units means "no second dense layer".
UNITS_1: tuple[int, ...] = (64, 128, 256, 512, 1024)
UNITS_2: tuple[int, ...] = (0, 32, 64, 128, 256, 512)
DROPOUT_RANGE = (0.0, 0.5)
LEARNING_RATE_RANGE = (1e-5, 1e-2)
BATCH_SIZES: tuple[int, ...] = (8, 16, 32, 64)


def suggest_head(trial, base: HeadConfig) -> HeadConfig:
    """Sample a head: two dense layers (the second may be absent), dropout, learning
    rate (log scale) and batch size; epochs and patience stay those of `base`."""
    units_1 = trial.suggest_categorical("units_1", UNITS_1)
    units_2 = trial.suggest_categorical("units_2", UNITS_2)
    return replace(
        base,
        dense_units=(units_1, units_2) if units_2 else (units_1,),
        dropout=trial.suggest_float("dropout", *DROPOUT_RANGE),
        learning_rate=trial.suggest_float("learning_rate", *LEARNING_RATE_RANGE, log=True),
        batch_size=trial.suggest_categorical("batch_size", BATCH_SIZES),
    )


def head_from_params(params: dict, base: HeadConfig) -> HeadConfig:
    """The HeadConfig a trial's params stand for."""
    units = (int(params["units_1"]), int(params["units_2"]))
    return replace(
        base,
        dense_units=units if units[1] else units[:1],
        dropout=float(params["dropout"]),
        learning_rate=float(params["learning_rate"]),
        batch_size=int(params["batch_size"]),
    )


def params_from_head(config: HeadConfig) -> dict[str, object]:
    """Trial params of a head in the search space (for enqueuing the paper's head)."""
    units_2 = config.dense_units[1] if len(config.dense_units) > 1 else 0
    return {
        "units_1": config.dense_units[0], "units_2": units_2, "dropout": config.dropout,
        "learning_rate": config.learning_rate, "batch_size": config.batch_size,
    }


def search_space_document() -> dict[str, object]:
    """The search space as logged on the parent run."""
    return {
        "units_1": list(UNITS_1), "units_2 (0 = no second layer)": list(UNITS_2),
        "dropout": list(DROPOUT_RANGE), "learning_rate (log)": list(LEARNING_RATE_RANGE),
        "batch_size": list(BATCH_SIZES), "objective": OBJECTIVE_DESCRIPTION,
        "direction": DIRECTION,
        "pruner": f"MedianPruner(n_startup_trials={PRUNER_STARTUP_TRIALS}, n_warmup_steps={PRUNER_WARMUP_EPOCHS})",
        "sampler": f"TPESampler(n_startup_trials={SAMPLER_STARTUP_TRIALS}, constant_liar=True), "
                   "reseeded per trial from sampler_seed + trial number",
    }
