"""The analysis of one study as a library call: gather, compute, return; and log it to a run.

`analyze_study()` never opens an MLflow run; `log_analysis()` writes into a run that the
caller opened (the `analyze` command, or the study driver at its end).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from analysis.cv import CVAnalysis, analyze_cv_pairs, log_cv_analysis
from analysis.gather import LATEST, StudyPairs, gather_study, load_predictions
from analysis.stats import (
    DEFAULT_RESAMPLES,
    SUPPORTED_METRICS,
    MetricComparison,
    McNemarTest,
    Summary,
    compare_metric,
    describe,
    ensemble_correct,
    mcnemar_exact,
    paired_bootstrap,
)
from ecg_mlflow import schema
from ecg_mlflow.parsing import ConfigError
from ecg_mlflow.schema import CLASSES

if TYPE_CHECKING:
    from mlflow import MlflowClient

MCNEMAR_METRIC = "accuracy"
"""McNemar compares per-image correctness, i.e. accuracy only."""


def parse_metrics(text: str | Sequence[str]) -> tuple[str, ...]:
    """`"accuracy,f1_macro"` -> ("accuracy", "f1_macro"); ConfigError names the bad entry."""
    items = [m.strip() for m in text.split(",")] if isinstance(text, str) else [str(m).strip() for m in text]
    items = [m for m in items if m]
    if not items:
        raise ConfigError(f"metrics is empty; allowed: {', '.join(SUPPORTED_METRICS)}")
    for metric in items:
        if metric not in SUPPORTED_METRICS:
            raise ConfigError(f"metrics: unknown metric {metric!r}; allowed: {', '.join(SUPPORTED_METRICS)}")
    doubled = sorted({m for m in items if items.count(m) > 1})
    if doubled:
        raise ConfigError(f"metrics: {', '.join(doubled)} listed more than once")
    return tuple(items)


def parse_alpha(text: str | float) -> float:
    """alpha as a number strictly between 0 and 1; ConfigError otherwise."""
    try:
        alpha = float(text)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"alpha must be a number strictly between 0 and 1, got {text!r}") from error
    if not 0.0 < alpha < 1.0:
        raise ConfigError(f"alpha must be a number strictly between 0 and 1, got {text!r}")
    return alpha


@dataclass(frozen=True)
class ClassSummary:
    """One backbone's per-seed values of one per-class metric (e.g. F1 of MI)."""

    metric: str
    cls: str
    arch: str
    summary: Summary


@dataclass(frozen=True)
class StudyAnalysis:
    """The result of analysing one study: what the report, the run and `promote` use."""

    experiment_id: str
    study_run_id: str
    archs: tuple[str, str]
    seeds: tuple[int, ...]
    run_ids: dict[str, tuple[str, ...]]
    metrics: tuple[str, ...]
    alpha: float
    comparisons: tuple[MetricComparison, ...]
    per_class: tuple[ClassSummary, ...]
    mcnemar: McNemarTest
    n_images: int
    n_resamples: int
    bootstrap_seed: int
    warnings: tuple[str, ...]
    text_shares: tuple[ClassSummary, ...] = ()
    """Per backbone, the seeds' test_text_attribution_share (cls "all") and per true class."""

    @property
    def first(self) -> str:
        return self.archs[0]

    @property
    def second(self) -> str:
        return self.archs[1]

    @property
    def n_pairs(self) -> int:
        return len(self.seeds)

    @property
    def confidence(self) -> float:
        """1 - alpha / k: the Bonferroni-matched confidence of every interval (98.75% for 4)."""
        return 1 - self.alpha / len(self.metrics)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def comparison(self, metric: str) -> MetricComparison:
        for item in self.comparisons:
            if item.metric == metric:
                return item
        raise KeyError(f"metric {metric!r} was not analysed; analysed: {', '.join(self.metrics)}")

    @property
    def significant(self) -> bool:
        """The primary metric's difference passes the Bonferroni-adjusted t-test."""
        return self.comparison(self.primary_metric).significant

    @property
    def winner(self) -> str:
        """The primary metric's winner when significant, else `none` (nothing to promote)."""
        primary = self.comparison(self.primary_metric)
        return primary.winner if primary.significant else schema.NO_WINNER

    def disagreements(self) -> list[str]:
        """Plain sentences for each metric where seed-level and image-level tests disagree."""
        return [text for c in self.comparisons if (text := c.disagreement()) is not None]

    def to_frame(self) -> pd.DataFrame:
        """results.csv: one row per metric."""
        return pd.DataFrame([c.to_dict() for c in self.comparisons])

    def per_class_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [{"metric": p.metric, "class": p.cls, "arch": p.arch, **p.summary.to_dict()} for p in self.per_class]
        )

    def text_share_frame(self) -> pd.DataFrame:
        return pd.DataFrame(
            [{"class": p.cls, "arch": p.arch, **p.summary.to_dict()} for p in self.text_shares]
        )

    def to_dict(self) -> dict[str, Any]:
        """results.json."""
        return {
            "experiment_id": self.experiment_id,
            "study_run_id": self.study_run_id,
            "archs": list(self.archs),
            "difference": f"{self.first} minus {self.second}",
            "seeds": list(self.seeds),
            "n_pairs": self.n_pairs,
            "run_ids": {a: list(ids) for a, ids in self.run_ids.items()},
            "metrics": list(self.metrics),
            "alpha": self.alpha,
            "confidence": self.confidence,
            "primary_metric": self.primary_metric,
            "winner": self.winner,
            "significant": self.significant,
            "n_test_images": self.n_images,
            "n_resamples": self.n_resamples,
            "bootstrap_seed": self.bootstrap_seed,
            "comparisons": [_json_safe(c.to_dict()) for c in self.comparisons],
            "mcnemar": self.mcnemar.to_dict(),
            "mcnemar_correctness": "seed ensemble: argmax of the mean probabilities over seeds",
            "per_class": [_json_safe(r) for r in self.per_class_frame().to_dict(orient="records")],
            "text_attribution_share": [_json_safe(r) for r in self.text_share_frame().to_dict(orient="records")],
            "disagreements": self.disagreements(),
            "warnings": list(self.warnings),
        }


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """NaN/inf are not JSON: write them as null."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def _per_class(pairs: StudyPairs, confidence: float) -> tuple[ClassSummary, ...]:
    rows = []
    for metric in schema.PER_CLASS_METRICS:
        for cls in CLASSES:
            key = schema.class_metric("test", metric, cls)
            if not all(key in r.metrics for arch in pairs.archs for r in pairs.runs[arch]):
                continue
            for arch in pairs.archs:
                rows.append(ClassSummary(metric, cls, arch, describe(pairs.values(arch, key), confidence)))
    return tuple(rows)


TEXT_SHARE_ALL = "all"


def _text_shares(pairs: StudyPairs, confidence: float) -> tuple[ClassSummary, ...]:
    """The text share of every paired run, per backbone: overall and per true class; a
    metric missing (runs from before explanations) or NaN (no test image of the class) on
    any run is left out."""
    keyed = [(TEXT_SHARE_ALL, schema.METRIC_TEXT_SHARE)] + [(c, schema.text_share_metric(c)) for c in CLASSES]
    rows = []
    for cls, key in keyed:
        runs = [r for arch in pairs.archs for r in pairs.runs[arch]]
        if not all(key in r.metrics and math.isfinite(r.metrics[key]) for r in runs):
            continue
        for arch in pairs.archs:
            rows.append(ClassSummary(schema.METRIC_TEXT_SHARE, cls, arch, describe(pairs.values(arch, key), confidence)))
    return tuple(rows)


def analyze_study(
    client: MlflowClient | None = None,
    experiment: str = schema.DEFAULT_EXPERIMENT,
    study: str = LATEST,
    metrics: str | Sequence[str] = SUPPORTED_METRICS,
    alpha: float | str = 0.05,
    *,
    n_resamples: int = DEFAULT_RESAMPLES,
    bootstrap_seed: int = 0,
) -> StudyAnalysis | CVAnalysis:
    """Gather a study's paired train runs from MLflow and compute every statistic; for a
    cross-validated study (param cv > 0) the CVAnalysis of analysis.cv instead.

    Args:
        client: MLflow client (default: one for the current tracking URI).
        experiment: experiment name holding the study.
        study: the study parent run id, or `latest`.
        metrics: which summary metrics (comma-separated or a sequence); the first is primary.
        alpha: family-wise level; intervals use confidence 1 - alpha / len(metrics).
        n_resamples, bootstrap_seed: the paired bootstrap over test images.

    Raises:
        ValueError (StudyNotFound, PairingError among them) with one clear message.
    """
    from mlflow import MlflowClient

    chosen = parse_metrics(metrics)
    level = parse_alpha(alpha)
    client = client or MlflowClient()
    pairs = gather_study(client, experiment, study)
    if pairs.design[0]:  # a cross-validated study: every image tested once per repeat
        return analyze_cv_pairs(client, pairs, chosen, level)
    first, second = pairs.archs
    k = len(chosen)
    predictions = load_predictions(client, pairs)
    boot = paired_bootstrap(
        predictions.true,
        predictions.predicted[first],
        predictions.predicted[second],
        chosen,
        n_classes=len(CLASSES),
        n_resamples=n_resamples,
        confidence=1 - level / k,
        seed=bootstrap_seed,
    )
    mcnemar = mcnemar_exact(
        ensemble_correct(predictions.true, predictions.probabilities[first]),
        ensemble_correct(predictions.true, predictions.probabilities[second]),
    )
    comparisons = tuple(
        compare_metric(
            metric,
            first,
            second,
            pairs.values(first, schema.split_metric("test", metric)),
            pairs.values(second, schema.split_metric("test", metric)),
            alpha=level,
            k=k,
            bootstrap=boot[metric],
            mcnemar=mcnemar if metric == MCNEMAR_METRIC else None,
        )
        for metric in chosen
    )
    return StudyAnalysis(
        experiment_id=pairs.experiment_id,
        study_run_id=pairs.study_run_id,
        archs=pairs.archs,
        seeds=pairs.seeds,
        run_ids={a: tuple(r.run_id for r in pairs.runs[a]) for a in pairs.archs},
        metrics=chosen,
        alpha=level,
        comparisons=comparisons,
        per_class=_per_class(pairs, 1 - level / k),
        text_shares=_text_shares(pairs, 1 - level / k),
        mcnemar=mcnemar,
        n_images=int(predictions.true.size),
        n_resamples=n_resamples,
        bootstrap_seed=bootstrap_seed,
        warnings=pairs.warnings,
    )


def analysis_tags(analysis: StudyAnalysis) -> dict[str, str]:
    """Tags of the analysis run (see `ecg_mlflow.schema`)."""
    tags = {
        schema.TAG_ROLE: schema.ROLE_ANALYSIS,
        schema.TAG_STUDY: analysis.study_run_id,
        schema.TAG_PRIMARY_METRIC: analysis.primary_metric,
        schema.TAG_WINNER: analysis.winner,
        schema.TAG_SIGNIFICANT: str(analysis.significant).lower(),
    }
    for c in analysis.comparisons:
        tags[schema.winner_tag(c.metric)] = c.winner
        tags[schema.significant_tag(c.metric)] = str(c.significant).lower()
    return tags


def analysis_params(analysis: StudyAnalysis, study: str, experiment: str) -> dict[str, str]:
    """Params of the analysis run; `study` is the request as given (`latest` or an id)."""
    return {
        schema.PARAM_ARCHS: ",".join(analysis.archs),
        schema.PARAM_N_PAIRS: str(analysis.n_pairs),
        schema.PARAM_STUDY: study,
        schema.PARAM_STUDY_RUN_ID: analysis.study_run_id,
        schema.PARAM_EXPERIMENT: experiment,
        schema.PARAM_ALPHA: str(analysis.alpha),
        schema.PARAM_METRICS: ",".join(analysis.metrics),
        schema.PARAM_SEEDS: ",".join(str(s) for s in analysis.seeds),
        schema.PARAM_N_RESAMPLES: str(analysis.n_resamples),
        schema.PARAM_BOOTSTRAP_SEED: str(analysis.bootstrap_seed),
        schema.PARAM_N_TEST_IMAGES: str(analysis.n_images),
    }


def analysis_metrics(analysis: StudyAnalysis) -> dict[str, float]:
    """Metrics of the analysis run; NaN (e.g. t of identical runs) is left out."""
    values: dict[str, float] = {}
    for c in analysis.comparisons:
        m = c.metric
        values[schema.stat_metric(m, schema.STAT_MEAN_DIFF)] = c.ttest.mean_diff
        values[schema.stat_metric(m, schema.STAT_MEAN_FIRST)] = c.first_summary.mean
        values[schema.stat_metric(m, schema.STAT_MEAN_SECOND)] = c.second_summary.mean
        values[schema.stat_metric(m, schema.STAT_DIFF_CI_LOW)] = c.ttest.ci_low
        values[schema.stat_metric(m, schema.STAT_DIFF_CI_HIGH)] = c.ttest.ci_high
        values[schema.stat_metric(m, schema.STAT_T)] = c.ttest.t
        values[schema.stat_metric(m, schema.STAT_P_TTEST)] = c.ttest.p
        values[schema.stat_metric(m, schema.STAT_P_BONFERRONI)] = c.p_bonferroni
        values[schema.stat_metric(m, schema.STAT_P_WILCOXON)] = c.wilcoxon.p
        values[schema.stat_metric(m, schema.STAT_D_Z)] = c.d_z
        if c.bootstrap is not None:
            values[schema.stat_metric(m, schema.STAT_P_BOOTSTRAP)] = c.bootstrap.p
            values[schema.stat_metric(m, schema.STAT_BOOTSTRAP_CI_LOW)] = c.bootstrap.ci_low
            values[schema.stat_metric(m, schema.STAT_BOOTSTRAP_CI_HIGH)] = c.bootstrap.ci_high
    values[schema.stat_metric(MCNEMAR_METRIC, schema.STAT_P_MCNEMAR)] = analysis.mcnemar.p
    return {k: float(v) for k, v in values.items() if math.isfinite(v)}


def log_analysis(
    analysis: StudyAnalysis,
    run_id: str,
    *,
    study: str | None = None,
    experiment: str = schema.DEFAULT_EXPERIMENT,
    client: MlflowClient | None = None,
) -> None:
    """Log tags, params, metrics and the report artifacts into the (already open) run `run_id`.

    Params that the run already carries (e.g. logged by `mlflow run` from the entry point's
    parameters, possibly spelled differently such as `0.050`) are kept as they are.
    """
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    from analysis.report import write_artifacts

    client = client or MlflowClient()
    if isinstance(analysis, CVAnalysis):
        log_cv_analysis(analysis, run_id, study=study or analysis.study_run_id, experiment=experiment, client=client)
        return
    existing = client.get_run(run_id).data.params
    params = analysis_params(analysis, study or analysis.study_run_id, experiment)
    now = int(pd.Timestamp.now(tz="UTC").timestamp() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in analysis_metrics(analysis).items()],
        params=[Param(k, v) for k, v in params.items() if k not in existing],
        tags=[RunTag(k, v) for k, v in analysis_tags(analysis).items()],
    )
    with tempfile.TemporaryDirectory(prefix="ecg-analysis-") as tmp:
        write_artifacts(analysis, Path(tmp))
        client.log_artifacts(run_id, tmp)
