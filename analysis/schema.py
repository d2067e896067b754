"""Names on the analysis run: what `promote` and the UI read (tags, params, metrics, artifacts).

Tags:
    `ecg.role=analysis`, `ecg.study=<study run id>`;
    per metric m: `winner_<m>` (backbone with the higher mean) and `significant_<m>`
    ("true"/"false": Bonferroni-adjusted paired t-test p < alpha, the paper's criterion);
    `primary_metric` (the first metric listed, accuracy by default);
    `winner`: the primary metric's winner when that difference is significant, else "none";
    `significant`: "true"/"false" for the primary metric.
Metrics: `<m>_<stat>` for the stats below; `accuracy_p_mcnemar`.
"""

from __future__ import annotations

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


def stat_metric(metric: str, stat: str) -> str:
    """`stat_metric("accuracy", STAT_P_TTEST) -> "accuracy_p_ttest"`."""
    return f"{metric}_{stat}"
