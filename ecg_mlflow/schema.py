"""Names of the run schema (DESIGN.md): tags, params, metrics and artifacts.

Training, the study driver, the analysis, promotion and the tests all read these
constants, so a name is typed once.
"""

from __future__ import annotations

from ecg_mlflow.data.classes import CLASS_SLUGS, CLASSES  # noqa: F401 (the class order is part of the schema)

DEFAULT_EXPERIMENT = "ecg-cvd"
DEFAULT_MODEL_NAME = "ecg-cvd-classifier"
CHAMPION_ALIAS = "champion"
PREVIOUS_CHAMPION_ALIAS = "previous-champion"
TAG_SOURCE_RUN = "source_run_id"
"""Model version tag (and promote run param) naming the train run whose model the version serves."""

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
TAG_KERAS_BACKEND = "ecg.keras_backend"  # on train runs: the Keras backend that computed, tensorflow | jax
TAG_DEVICE = "ecg.device"  # on train runs: where the backend computed, cpu | gpu
TUNE_STATE_COMPLETE = "complete"
TUNE_STATE_PRUNED = "pruned"
TUNE_STATE_FAILED = "failed"

SPLIT_POLICIES: tuple[str, ...] = ("paper", "grouped")
"""Values of the `split` parameter (see ecg_mlflow.data.splits); here so that parsing parameters,
as every CLI command does at start, does not import the dataset layer and pandas."""

# Params that every train run carries beside its entry point parameters.
PARAM_DATA_DIGEST = "data_digest"
PARAM_TEST_DIGEST = "test_digest"
PARAM_N_TRAIN = "n_train"
PARAM_N_VAL = "n_val"
PARAM_N_TEST = "n_test"

STUDY_KEY_EXEMPT_PARAMS: frozenset[str] = frozenset({"arch", "seed", "data", "cache_dir"})
"""Params outside a study's identity: the grid's own axes (backbone, seed) and where data and
cache live (the data digest says whether the data is the same). `log_model` is IN the key:
a study that must serve a model may not adopt runs that logged none."""
PRE_ENGINE_PARAMS: dict[str, str] = {"engine": "keras", "precision": "fp32"}
"""What every run trained before `engine` and `precision` existed computed with: a study key
leaves these values out, so a study run with them still adopts the runs it finished before."""
PAIRING_EXEMPT_PARAMS: frozenset[str] = STUDY_KEY_EXEMPT_PARAMS | {"log_model"}
"""Params that may differ between the two runs of a seed pair: those outside the study key,
and `log_model`, which changes what was saved, not what was measured."""
HEAD_PARAM_PREFIX = "head."
"""Train runs log the head that actually trained as `head.<field>`: under `mlflow run` the raw
entry-point values are logged first and cannot be overwritten, and `head_config` may differ."""

# Study runs
TAG_STUDY_KEY = "ecg.study_key"
TAG_FOLD = "ecg.fold"
"""On the train runs of a cross-validated study: the test fold, 0..cv-1."""
TAG_REPEAT = "ecg.repeat"
"""On the train runs of a cross-validated study: the repeat, 0..cv_repeats-1."""
PARAM_CV = "cv"
"""Study param: folds of the cross-validation; 0 is the fixed split."""
PARAM_CV_REPEATS = "cv_repeats"
TAG_SUPERSEDED_BY = "ecg.superseded_by"
TAG_ADOPTED_FROM = "ecg.adopted_from"

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
METRIC_CACHE_HITS = "cache_hits"
METRIC_CACHE_MISSES = "cache_misses"
EPOCH_METRICS: tuple[str, ...] = ("loss", "accuracy", "val_loss", "val_accuracy")

# Explanations (model/regions.py defines the regions and the share, model/explain.py the method)
METRIC_TEXT_SHARE = "test_text_attribution_share"
"""Mean over test images of the share of positive Grad-CAM region attribution, for the
predicted class, that lies on the printed header and footer (0 by construction with crop=grid)."""


def text_share_metric(cls: str) -> str:
    """`text_share_metric("MI") -> "test_text_attribution_share_mi"`: the mean over the test
    images whose TRUE class is `cls`."""
    return f"{METRIC_TEXT_SHARE}_{CLASS_SLUGS[cls]}"


TEXT_SHARE_METRICS: tuple[str, ...] = (METRIC_TEXT_SHARE,) + tuple(text_share_metric(c) for c in CLASSES)

TRAIN_RUN_METRICS: tuple[str, ...] = (
    TEXT_SHARE_METRICS
    + evaluation_metric_names("test")
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


# Artifacts of a train run
ARTIFACT_PREDICTIONS = "test_predictions.csv"
ARTIFACT_CONFUSION_PNG = "confusion_matrix.png"
ARTIFACT_CONFUSION_JSON = "confusion_matrix.json"
ARTIFACT_CURVES = "training_curves.png"
ARTIFACT_SPLIT = "split.csv"
MODEL_ARTIFACT = "model"
ARTIFACT_ENGINE_PROBE = "engine_probe.json"
"""The logged model's output on engines.probe_pixels under the run's engine and precision:
what a served model that must fall back to another engine measures its difference against."""
METRIC_MODEL_MAX_ABS_DIFF = "model_max_abs_diff"
PARAM_ENGINE = "engine"
PARAM_PRECISION = "precision"
# Keys of the serving model's config (MLmodel model_config) beside its preprocessing.
CONFIG_ENGINE = "engine"
CONFIG_PRECISION = "precision"
CONFIG_PROBE = "engine_probe"
TAG_SERVED_ENGINE = "served_engine"
TAG_SERVED_PRECISION = "served_precision"
"""Model version tags at promotion: the engine and precision the promoting host's serving
model loads with (the recorded ones unless that host had to fall back)."""
ARTIFACT_HEAD = "head.json"
"""The head fields a `head_config` file set, on runs trained with one."""
ARTIFACT_EXPLANATIONS = "explanations"
ARTIFACT_REGION_TABLE = f"{ARTIFACT_EXPLANATIONS}/region_attribution.csv"
"""One row per test image: relpath, sha256, true and predicted class, text share, then the
signed Grad-CAM attribution of the predicted class per region (`attr_<region>`, logit units)."""
ARTIFACT_REGION_CHART = f"{ARTIFACT_EXPLANATIONS}/region_attribution.png"
"""Per true class: mean share of the positive attribution per region."""


def overlay_artifact(cls: str, number: int) -> str:
    """`overlay_artifact("MI", 1) -> "explanations/overlay_mi_1.png"`."""
    return f"{ARTIFACT_EXPLANATIONS}/overlay_{CLASS_SLUGS[cls]}_{number}.png"


TRAIN_RUN_ARTIFACTS: tuple[str, ...] = (
    ARTIFACT_REGION_TABLE,
    ARTIFACT_REGION_CHART,
    ARTIFACT_PREDICTIONS,
    ARTIFACT_CONFUSION_PNG,
    ARTIFACT_CONFUSION_JSON,
    ARTIFACT_CURVES,
    ARTIFACT_SPLIT,
)

# Columns of explanation tables and of the served model's reply with `explain`
COL_TEXT_SHARE = "text_attribution_share"
ATTRIBUTION_PREFIX = "attr_"
EXPLAIN_PARAM = "explain"
"""Serving param (boolean, default false): reply with the per-region attribution too."""


def attribution_column(region_slug: str) -> str:
    """`attribution_column("avr") -> "attr_avr"`: a region's signed Grad-CAM attribution."""
    return ATTRIBUTION_PREFIX + region_slug


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


# The analysis run
# Names on the analysis run: what `promote` and the UI read (tags, params, metrics, artifacts).
# 
# Tags:
#     `ecg.role=analysis`, `ecg.study=<study run id>`;
#     per metric m: `winner_<m>` (backbone with the higher mean) and `significant_<m>`
#     ("true"/"false": Bonferroni-adjusted paired t-test p < alpha, the paper's criterion);
#     `primary_metric` (the first metric listed, accuracy by default);
#     `winner`: the primary metric's winner when that difference is significant, else "none";
#     `significant`: "true"/"false" for the primary metric.
# Metrics: `<m>_<stat>` for the stats below; `accuracy_p_mcnemar`.

TAG_WINNER = "winner"
TAG_SIGNIFICANT = "significant"
TAG_PRIMARY_METRIC = "primary_metric"
NO_WINNER = "none"

PARAM_ARCHS = "archs"
PARAM_N_PAIRS = "n_pairs"
PARAM_STUDY = "study"
PARAM_STUDY_RUN_ID = "study_run_id"
PARAM_ALPHA = "alpha"
PARAM_METRICS = "metrics"
PARAM_EXPERIMENT = "experiment"
PARAM_SEEDS = "seeds"
PARAM_N_RESAMPLES = "n_resamples"
PARAM_BOOTSTRAP_SEED = "bootstrap_seed"
PARAM_N_TEST_IMAGES = "n_test_images"

STAT_MEAN_DIFF = "mean_diff"
CV_DIFF_MEAN = "diff_mean"
CV_T_CORRECTED = "t_corrected"
CV_P_CORRECTED = "p_corrected"
CV_P_CORRECTED_BONFERRONI = "p_corrected_bonferroni"
CV_CI_LOW = "ci_low"
CV_CI_HIGH = "ci_high"
CV_P_UNCORRECTED = "p_uncorrected"
CV_T_5X2 = "t_5x2cv"
CV_P_5X2 = "p_5x2cv"
CV_F_5X2 = "f_5x2cv"
CV_P_F_5X2 = "p_f_5x2cv"
CV_OOF_FIRST = "oof_first"
CV_OOF_SECOND = "oof_second"
STAT_P_TTEST = "p_ttest"
STAT_P_BONFERRONI = "p_bonferroni"
STAT_P_WILCOXON = "p_wilcoxon"
STAT_P_BOOTSTRAP = "p_bootstrap"
STAT_P_MCNEMAR = "p_mcnemar"
STAT_T = "t"
STAT_D_Z = "d_z"
STAT_DIFF_CI_LOW = "diff_ci_low"
STAT_DIFF_CI_HIGH = "diff_ci_high"
STAT_BOOTSTRAP_CI_LOW = "bootstrap_ci_low"
STAT_BOOTSTRAP_CI_HIGH = "bootstrap_ci_high"
STAT_MEAN_FIRST = "mean_first"
STAT_MEAN_SECOND = "mean_second"

ARTIFACT_RESULTS_CSV = "results.csv"
ARTIFACT_RESULTS_JSON = "results.json"
ARTIFACT_REPORT = "report.md"
ARTIFACT_FIGURE2 = "figure2.png"
ARTIFACT_PER_CLASS = "per_class.png"
ANALYSIS_ARTIFACTS: tuple[str, ...] = (
    ARTIFACT_RESULTS_CSV,
    ARTIFACT_RESULTS_JSON,
    ARTIFACT_REPORT,
    ARTIFACT_FIGURE2,
    ARTIFACT_PER_CLASS,
)


def winner_tag(metric: str) -> str:
    """`winner_tag("accuracy") -> "winner_accuracy"`."""
    return f"winner_{metric}"


def significant_tag(metric: str) -> str:
    """`significant_tag("accuracy") -> "significant_accuracy"`."""
    return f"significant_{metric}"


def cv_metric(metric: str, stat: str) -> str:
    """`cv_metric("accuracy", CV_P_CORRECTED) -> "cv_accuracy_p_corrected"`: the analysis run
    of a cross-validated study."""
    return f"cv_{metric}_{stat}"


ARTIFACT_OOF_CONFUSION_JSON = "oof_confusion.json"
ARTIFACT_OOF_CONFUSION_PNG = "oof_confusion.png"
CV_ANALYSIS_ARTIFACTS: tuple[str, ...] = (
    ARTIFACT_RESULTS_CSV,
    ARTIFACT_RESULTS_JSON,
    ARTIFACT_REPORT,
    ARTIFACT_OOF_CONFUSION_JSON,
    ARTIFACT_OOF_CONFUSION_PNG,
)


def stat_metric(metric: str, stat: str) -> str:
    """`stat_metric("accuracy", STAT_P_TTEST) -> "accuracy_p_ttest"`."""
    return f"{metric}_{stat}"


# Artifacts of a tune run (its tags and roles are above)
# Artifacts of the tune run (its tags and roles are in ecg_mlflow.schema).
ARTIFACT_BEST_HEAD = "best_head.json"
ARTIFACT_HISTORY = "optimization_history.png"
ARTIFACT_IMPORTANCES = "param_importances.png"
ARTIFACT_TRIALS = "trials.csv"
ARTIFACT_SEARCH_SPACE = "search_space.json"
