"""Names of the run schema (DESIGN.md): tags, params, metrics and artifacts.

Training, the study driver, the analysis, promotion and the tests all read these
constants, so a name is typed once.
"""

from __future__ import annotations

from ecg_mlflow.classes import CLASS_SLUGS, CLASSES

DEFAULT_EXPERIMENT = "ecg-cvd"
DEFAULT_MODEL_NAME = "ecg-cvd-classifier"
CHAMPION_ALIAS = "champion"
PREVIOUS_CHAMPION_ALIAS = "previous-champion"

# Tags
TAG_ROLE = "ecg.role"
TAG_STUDY = "ecg.study"
ROLE_TRAIN = "train"
ROLE_STUDY = "study"
ROLE_ANALYSIS = "analysis"
ROLE_TUNE = "tune"
ROLE_PROMOTE = "promote"
ROLE_TUNE_TRIAL = "tune-trial"
TAG_TUNE_STUDY = "ecg.tune.study"  # the Optuna study name, on the tune run and its trial runs
TAG_TUNE_TRIAL = "ecg.tune.trial"  # the Optuna trial number
TAG_TUNE_STATE = "ecg.tune.state"  # TUNE_STATE_COMPLETE, _PRUNED or _FAILED
TAG_TUNE_CREATED_STUDY = "ecg.tune.created_study"  # whether this worker created the study
TUNE_STATE_COMPLETE = "complete"
TUNE_STATE_PRUNED = "pruned"
TUNE_STATE_FAILED = "failed"

SPLIT_POLICIES: tuple[str, ...] = ("paper", "grouped")
"""Values of the `split` parameter (see ecg_mlflow.splits); here so that parsing parameters,
as every CLI command does at start, does not import the dataset layer and pandas."""

# Params that every train run carries beside its entry point parameters.
PARAM_DATA_DIGEST = "data_digest"
PARAM_TEST_DIGEST = "test_digest"
PARAM_N_TRAIN = "n_train"
PARAM_N_VAL = "n_val"
PARAM_N_TEST = "n_test"

PAIRING_EXEMPT_PARAMS: frozenset[str] = frozenset({"arch", "seed", "data", "cache_dir", "log_model"})
"""Params that may differ between the two runs of a seed pair: the backbone itself, the
seed (pairs share it by construction), and where data and cache live (the digests say
whether the data is the same)."""

# Metrics
SUMMARY_METRICS: tuple[str, ...] = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
"""The paper's four metrics, in the order of its tables."""
EXTRA_OVERALL_METRICS: tuple[str, ...] = ("roc_auc_macro", "loss")
PER_CLASS_METRICS: tuple[str, ...] = ("precision", "recall", "f1")
EVAL_SPLITS: tuple[str, ...] = ("test", "val")


def split_metric(split: str, metric: str) -> str:
    """`split_metric("test", "f1_macro") -> "test_f1_macro"`."""
    return f"{split}_{metric}"


def class_metric(split: str, metric: str, cls: str) -> str:
    """`class_metric("test", "f1", "MI") -> "test_f1_mi"`."""
    return f"{split}_{metric}_{CLASS_SLUGS[cls]}"


def evaluation_metric_names(split: str) -> tuple[str, ...]:
    """Every metric one evaluated split logs, overall then per class."""
    overall = [split_metric(split, m) for m in SUMMARY_METRICS + EXTRA_OVERALL_METRICS]
    per_class = [class_metric(split, m, c) for c in CLASSES for m in PER_CLASS_METRICS]
    return tuple(overall + per_class)


METRIC_BEST_EPOCH = "best_epoch"
METRIC_STOPPED_EPOCH = "stopped_epoch"
METRIC_LEAKAGE_EXACT = "test_leakage_exact"
METRIC_LEAKAGE_NEAR = "test_leakage_near"
METRIC_TIME_FEATURES = "time_features_s"
METRIC_TIME_HEAD = "time_head_s"
EPOCH_METRICS: tuple[str, ...] = ("loss", "accuracy", "val_loss", "val_accuracy")

TRAIN_RUN_METRICS: tuple[str, ...] = (
    evaluation_metric_names("test")
    + evaluation_metric_names("val")
    + (
        METRIC_BEST_EPOCH,
        METRIC_STOPPED_EPOCH,
        METRIC_LEAKAGE_EXACT,
        METRIC_LEAKAGE_NEAR,
        METRIC_TIME_FEATURES,
        METRIC_TIME_HEAD,
    )
)

def filter_quote(value: str) -> str:
    """A value as a quoted literal of an MLflow search filter (`tags.x = 'value'`)."""
    return "'" + str(value).replace("'", "\\'") + "'"


# Artifacts of a train run
ARTIFACT_PREDICTIONS = "test_predictions.csv"
ARTIFACT_CONFUSION_PNG = "confusion_matrix.png"
ARTIFACT_CONFUSION_JSON = "confusion_matrix.json"
ARTIFACT_CURVES = "training_curves.png"
ARTIFACT_SPLIT = "split.csv"
MODEL_ARTIFACT = "model"
TRAIN_RUN_ARTIFACTS: tuple[str, ...] = (
    ARTIFACT_PREDICTIONS,
    ARTIFACT_CONFUSION_PNG,
    ARTIFACT_CONFUSION_JSON,
    ARTIFACT_CURVES,
    ARTIFACT_SPLIT,
)

# Columns of test_predictions.csv
COL_RELPATH = "relpath"
COL_SHA256 = "sha256"
COL_TRUE = "true_class"
COL_PRED = "predicted_class"


def prob_column(cls: str) -> str:
    """`prob_column("MI") -> "prob_mi"`: the probability columns of predictions and serving."""
    return f"prob_{CLASS_SLUGS[cls]}"


PROB_COLUMNS: tuple[str, ...] = tuple(prob_column(c) for c in CLASSES)
PREDICTION_COLUMNS: tuple[str, ...] = (COL_RELPATH, COL_SHA256, COL_TRUE, COL_PRED) + PROB_COLUMNS
