"""Paired statistics for comparing two backbones trained with the same seeds.

Two kinds of evidence, because every seed of a study is scored on ONE shared test set:

- seed level (the paper's protocol): per-seed metric values, paired by seed. The paired
  t-test, its Bonferroni correction, the Wilcoxon signed-rank test and Cohen's d_z only see
  the variation that comes from training (initialisation, validation split, batch order).
- test-image level: a paired bootstrap over the test images (every run's metric recomputed on
  each resample from its per-image predictions) and an exact McNemar test on per-image
  correctness. These see the sampling noise of the test set, which the seed-level tests miss.

Every function here is pure (numbers in, small frozen dataclasses out), checks its inputs in
one `_validate_*` function and raises `ValueError` naming the problem and the allowed values.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from scipy import stats as sps

SUPPORTED_METRICS: tuple[str, ...] = ("accuracy", "precision_macro", "recall_macro", "f1_macro")
"""Metrics the bootstrap can recompute from per-image predictions (the paper's four)."""

DEFAULT_RESAMPLES = 2000
EXACT_WILCOXON_MAX_N = 50
"""Up to this many pairs scipy's exact null distribution (no ties) is used, as scipy's `auto`."""
PERMUTATION_WILCOXON_MAX_N = 13
"""With ties or zero differences, up to 2**13 sign flips are enumerated: still exact."""


def _plain(value: Any) -> Any:
    """numpy scalars to Python ones, so `to_dict()` is JSON-ready."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


class _Result:
    """Shared `to_dict()` / `to_frame()` for the result dataclasses."""

    def to_dict(self) -> dict[str, Any]:
        return _plain(asdict(self))  # type: ignore[call-overload]

    def to_frame(self) -> pd.DataFrame:
        """One-row table, for reports."""
        return pd.DataFrame([self.to_dict()])


# ----------------------------------------------------------------------------- validation


def _validate_confidence(confidence: float, name: str = "confidence") -> float:
    if not isinstance(confidence, (int, float)) or not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"{name} must be a number strictly between 0 and 1, got {confidence!r}")
    return float(confidence)


def _validate_alpha(alpha: float) -> float:
    return _validate_confidence(alpha, name="alpha")


def _validate_sample(values: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(values, dtype=float)
    if array.ndim != 1:
        raise ValueError(f"{name} must be one-dimensional, got shape {array.shape}")
    if array.size < 2:
        raise ValueError(f"{name} needs at least 2 values (n >= 2), got {array.size}")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name} contains NaN or infinite values: {array.tolist()}")
    return array


def _validate_paired(x: ArrayLike, y: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Two finite 1-D samples of equal length n >= 2 (pair i of x belongs with pair i of y)."""
    first = _validate_sample(x, "x")
    second = _validate_sample(y, "y")
    if first.size != second.size:
        raise ValueError(
            f"paired samples must have equal lengths, got x with {first.size} and y with "
            f"{second.size} values"
        )
    return first, second


def _validate_metric(metric: str) -> str:
    if metric not in SUPPORTED_METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(SUPPORTED_METRICS)}")
    return metric


def _validate_k(k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"number of comparisons k must be an integer >= 1, got {k!r}")
    return int(k)


# ----------------------------------------------------------------------------- seed level


@dataclass(frozen=True)
class Summary(_Result):
    """Mean of one backbone's per-seed values with a t-based confidence interval."""

    n: int
    mean: float
    sd: float
    ci_low: float
    ci_high: float
    confidence: float


def describe(values: ArrayLike, confidence: float = 0.95) -> Summary:
    """n, mean, SD (ddof=1) and the t interval mean +- t_{(1+c)/2, n-1} * SD / sqrt(n)."""
    sample = _validate_sample(values, "values")
    confidence = _validate_confidence(confidence)
    n = sample.size
    mean = float(sample.mean())
    sd = float(sample.std(ddof=1))
    half = float(sps.t.ppf((1 + confidence) / 2, n - 1)) * sd / math.sqrt(n)
    return Summary(n, mean, sd, mean - half, mean + half, confidence)


@dataclass(frozen=True)
class PairedTTest(_Result):
    """Paired t-test of x - y, with the confidence interval of the mean difference."""

    n: int
    mean_diff: float
    sd_diff: float
    ci_low: float
    ci_high: float
    confidence: float
    t: float
    df: int
    p: float


def paired_ttest(x: ArrayLike, y: ArrayLike, confidence: float = 0.95) -> PairedTTest:
    """Two-sided paired t-test (scipy.stats.ttest_rel semantics).

    Notes:
        d_i = x_i - y_i; t = mean(d) / (SD(d) / sqrt(n)), df = n - 1,
        p = 2 * P(T_{n-1} >= |t|); CI = mean(d) +- t_{(1+c)/2, n-1} * SD(d) / sqrt(n).
        When every difference is identical SD(d) = 0 and t, p are NaN (scipy's answer).
    """
    first, second = _validate_paired(x, y)
    confidence = _validate_confidence(confidence)
    diff = first - second
    n = diff.size
    sd = float(diff.std(ddof=1))
    if sd == 0.0:
        mean = float(diff.mean())
        return PairedTTest(n, mean, 0.0, mean, mean, confidence, math.nan, n - 1, math.nan)
    result = sps.ttest_rel(first, second)
    interval = result.confidence_interval(confidence_level=confidence)
    return PairedTTest(
        n=n,
        mean_diff=float(diff.mean()),
        sd_diff=sd,
        ci_low=float(interval.low),
        ci_high=float(interval.high),
        confidence=confidence,
        t=float(result.statistic),
        df=int(result.df),
        p=float(result.pvalue),
    )


def bonferroni(p: float, k: int) -> float:
    """Bonferroni-adjusted p-value: min(1, p * k); NaN stays NaN."""
    k = _validate_k(k)
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return math.nan
    if not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p-value must lie in [0, 1], got {p!r}")
    return min(1.0, float(p) * k)


def cohens_dz(x: ArrayLike, y: ArrayLike) -> float:
    """Cohen's d_z = mean(x - y) / SD(x - y) (ddof=1): the paired effect size.

    Equal to t / sqrt(n). Not pingouin's paired "cohen-d", which divides by the average SD of
    x and y. With SD(d) = 0 it is +-inf (or NaN when the mean difference is 0 as well).
    """
    first, second = _validate_paired(x, y)
    diff = first - second
    sd = float(diff.std(ddof=1))
    mean = float(diff.mean())
    if sd == 0.0:
        return math.nan if mean == 0.0 else math.copysign(math.inf, mean)
    return mean / sd


@dataclass(frozen=True)
class WilcoxonTest(_Result):
    """Wilcoxon signed-rank test of x - y (zero differences dropped, Wilcoxon's method)."""

    n: int
    n_nonzero: int
    statistic: float
    p: float
    method: str
    min_p: float
    """The smallest two-sided p this n can give (exact test): 2 / 2**n_nonzero."""


def wilcoxon_signed_rank(x: ArrayLike, y: ArrayLike) -> WilcoxonTest:
    """Two-sided Wilcoxon signed-rank test; says which p-value method it used.

    Notes:
        `exact` (scipy's exact null distribution) when there are no ties and no zero
        differences and n <= 50; `exact permutation` (all 2**n sign flips enumerated) when
        there are ties or zeros and n <= 13; `normal approximation` otherwise. This is
        scipy's own `method="auto"` choice, made explicit so reports can name it. With n
        non-zero pairs the exact two-sided p cannot go below 2 / 2**n (0.0625 for n = 5).
    """
    first, second = _validate_paired(x, y)
    diff = first - second
    nonzero = diff[diff != 0]
    n_nonzero = int(nonzero.size)
    min_p = min(1.0, 2.0 / 2.0**n_nonzero) if n_nonzero else 1.0
    if n_nonzero == 0:
        return WilcoxonTest(diff.size, 0, 0.0, 1.0, "all differences zero", 1.0)
    has_ties = np.unique(np.abs(nonzero)).size < n_nonzero
    has_zeros = n_nonzero < diff.size
    if not (has_ties or has_zeros) and diff.size <= EXACT_WILCOXON_MAX_N:
        method, label = "exact", "exact"
    elif diff.size <= PERMUTATION_WILCOXON_MAX_N:
        method, label = sps.PermutationMethod(), "exact permutation (ties or zeros)"
    else:
        method, label = "asymptotic", "normal approximation"
    result = sps.wilcoxon(first, second, zero_method="wilcox", method=method)
    return WilcoxonTest(
        n=diff.size,
        n_nonzero=n_nonzero,
        statistic=float(result.statistic),
        p=float(min(1.0, result.pvalue)),
        method=label,
        min_p=min_p,
    )


# ----------------------------------------------------------------------------- image level


def confusion_metrics(confusion: np.ndarray, labels: Sequence[int] | None = None) -> dict[str, np.ndarray]:
    """The four summary metrics from confusion counts `[..., true, predicted]`.

    Macro averages run over `labels` (default: all classes), with 0 for a class whose
    precision or recall is undefined (scikit-learn's `zero_division=0`).
    """
    counts = np.asarray(confusion, dtype=float)
    k = counts.shape[-1]
    chosen = np.arange(k) if labels is None else np.asarray(labels, dtype=int)
    tp = np.diagonal(counts, axis1=-2, axis2=-1)
    predicted = counts.sum(axis=-2)
    actual = counts.sum(axis=-1)
    total = counts.sum(axis=(-2, -1))
    with np.errstate(divide="ignore", invalid="ignore"):
        precision = np.where(predicted > 0, tp / predicted, 0.0)
        recall = np.where(actual > 0, tp / actual, 0.0)
        f1 = np.where(predicted + actual > 0, 2 * tp / (predicted + actual), 0.0)
        accuracy = np.where(total > 0, tp.sum(axis=-1) / total, 0.0)
    return {
        "accuracy": accuracy,
        "precision_macro": precision[..., chosen].mean(axis=-1),
        "recall_macro": recall[..., chosen].mean(axis=-1),
        "f1_macro": f1[..., chosen].mean(axis=-1),
    }


@dataclass(frozen=True)
class BootstrapTest(_Result):
    """Paired bootstrap over test images of (mean over seeds of first) - (... of second)."""

    metric: str
    n_images: int
    n_first: int
    n_second: int
    n_resamples: int
    observed_diff: float
    ci_low: float
    ci_high: float
    confidence: float
    p: float
    seed: int


def _validate_predictions(
    true: ArrayLike, first: ArrayLike, second: ArrayLike, n_classes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth = np.asarray(true)
    runs_first = np.atleast_2d(np.asarray(first))
    runs_second = np.atleast_2d(np.asarray(second))
    if truth.ndim != 1 or truth.size < 1:
        raise ValueError(f"true labels must be a non-empty 1-D array, got shape {truth.shape}")
    for name, runs in (("first", runs_first), ("second", runs_second)):
        if runs.ndim != 2 or runs.shape[0] < 1 or runs.shape[1] != truth.size:
            raise ValueError(
                f"{name} predictions must have shape (runs, {truth.size} images), got {runs.shape}"
            )
    for name, labels in (("true", truth), ("first", runs_first), ("second", runs_second)):
        if not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(f"{name} labels must be integer class indices in 0..{n_classes - 1}")
    return truth.astype(np.int64), runs_first.astype(np.int64), runs_second.astype(np.int64)


def _resample_weights(n_images: int, n_resamples: int, seed: int) -> np.ndarray:
    """Row 0: the observed test set (every image once); rows 1..B: how often each image is drawn."""
    rng = np.random.default_rng(seed)
    drawn = rng.integers(0, n_images, size=(n_resamples, n_images))
    offsets = (np.arange(n_resamples) * n_images)[:, None]
    counts = np.bincount((drawn + offsets).ravel(), minlength=n_resamples * n_images)
    weights = counts.reshape(n_resamples, n_images).astype(float)
    return np.vstack([np.ones((1, n_images)), weights])


def _weighted_confusions(true: np.ndarray, runs: np.ndarray, weights: np.ndarray, k: int) -> np.ndarray:
    """Confusion counts of every run under every weighting: shape (weightings, runs, k, k)."""
    n_runs, n_images = runs.shape
    onehot = np.zeros((n_images, n_runs, k * k))
    onehot[np.arange(n_images)[:, None], np.arange(n_runs)[None, :], (true[:, None] * k + runs.T)] = 1.0
    return (weights @ onehot.reshape(n_images, -1)).reshape(-1, n_runs, k, k)


def paired_bootstrap(
    true: ArrayLike,
    first: ArrayLike,
    second: ArrayLike,
    metrics: Sequence[str] = SUPPORTED_METRICS,
    *,
    n_classes: int = 4,
    n_resamples: int = DEFAULT_RESAMPLES,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, BootstrapTest]:
    """Paired bootstrap over test images of the difference between two backbones.

    Args:
        true: true class index of each test image, shape (n_images,).
        first, second: predicted class index per run (one row per seed) and image, shape
            (runs, n_images); all runs scored on the same images in the same order.
        metrics: which of SUPPORTED_METRICS to report.
        n_classes: number of classes (confusion matrix size).
        n_resamples: B, the number of bootstrap resamples (>= 100).
        confidence: level of the percentile interval.
        seed: seed of the resampling, so the answer is reproducible.

    Returns:
        metric -> BootstrapTest. The observed difference is on the full test set.

    Notes:
        Each resample draws n_images image indices with replacement, the SAME indices for
        every run of both backbones (that is the pairing); each run's metric is recomputed from
        its confusion counts on the resample, averaged over the runs of each backbone, and
        differenced. Macro averages run over all n_classes classes with 0 for an undefined
        precision or recall, as training logs them (scikit-learn, labels=CLASSES,
        zero_division=0), so the observed difference equals the logged metrics' difference.
        CI: percentiles (1-c)/2 and (1+c)/2 of the B differences. Two-sided p with the +1
        correction: p = min(1, 2 * min((1 + #{d* <= 0}) / (B + 1), (1 + #{d* >= 0}) / (B + 1))).
        Vectorised: per-image resample counts (B x n) times one-hot (true, predicted) codes
        give every confusion matrix in one matrix product.
    """
    for metric in metrics:
        _validate_metric(metric)
    if not metrics:
        raise ValueError(f"metrics must name at least one of {', '.join(SUPPORTED_METRICS)}")
    confidence = _validate_confidence(confidence)
    if isinstance(n_resamples, bool) or not isinstance(n_resamples, (int, np.integer)) or n_resamples < 100:
        raise ValueError(f"n_resamples must be an integer >= 100, got {n_resamples!r}")
    truth, runs_first, runs_second = _validate_predictions(true, first, second, n_classes)
    weights = _resample_weights(truth.size, int(n_resamples), seed)
    per_first = confusion_metrics(_weighted_confusions(truth, runs_first, weights, n_classes))
    per_second = confusion_metrics(_weighted_confusions(truth, runs_second, weights, n_classes))
    tail = (1 - confidence) / 2
    results: dict[str, BootstrapTest] = {}
    for metric in metrics:
        diffs = per_first[metric].mean(axis=1) - per_second[metric].mean(axis=1)
        observed, resampled = float(diffs[0]), diffs[1:]
        low, high = np.quantile(resampled, [tail, 1 - tail])
        share_low = (1 + np.count_nonzero(resampled <= 0)) / (n_resamples + 1)
        share_high = (1 + np.count_nonzero(resampled >= 0)) / (n_resamples + 1)
        results[metric] = BootstrapTest(
            metric=metric,
            n_images=int(truth.size),
            n_first=int(runs_first.shape[0]),
            n_second=int(runs_second.shape[0]),
            n_resamples=int(n_resamples),
            observed_diff=observed,
            ci_low=float(low),
            ci_high=float(high),
            confidence=confidence,
            p=float(min(1.0, 2 * min(share_low, share_high))),
            seed=int(seed),
        )
    return results


def ensemble_correct(true: ArrayLike, probabilities: ArrayLike) -> np.ndarray:
    """Per-image correctness of a backbone's seed ensemble: argmax of the mean probabilities.

    Args:
        true: true class index per image, shape (n_images,).
        probabilities: shape (runs, n_images, n_classes), one slice per seed.
    """
    truth = np.asarray(true)
    probs = np.asarray(probabilities, dtype=float)
    if probs.ndim != 3 or probs.shape[1] != truth.size:
        raise ValueError(
            f"probabilities must have shape (runs, {truth.size} images, classes), got {probs.shape}"
        )
    return probs.mean(axis=0).argmax(axis=1) == truth


@dataclass(frozen=True)
class McNemarTest(_Result):
    """Exact McNemar test on paired per-image correctness."""

    n: int
    first_correct: int
    second_correct: int
    b: int
    """Images the first backbone gets right and the second wrong."""
    c: int
    """Images the first backbone gets wrong and the second right."""
    p: float


def mcnemar_exact(first_correct: ArrayLike, second_correct: ArrayLike) -> McNemarTest:
    """Exact two-sided McNemar test: b ~ Binomial(b + c, 1/2) under H0.

    Notes:
        p = scipy.stats.binomtest(b, b + c, 0.5).pvalue (for p = 1/2 this is
        min(1, 2 * P(X <= min(b, c)))); p = 1 when there are no discordant images.
    """
    first = np.asarray(first_correct)
    second = np.asarray(second_correct)
    for name, values in (("first_correct", first), ("second_correct", second)):
        if values.ndim != 1 or values.size < 1 or values.dtype != bool:
            raise ValueError(f"{name} must be a non-empty 1-D boolean array, got {values.dtype} {values.shape}")
    if first.size != second.size:
        raise ValueError(
            f"paired correctness must have equal lengths, got {first.size} and {second.size} images"
        )
    b = int(np.count_nonzero(first & ~second))
    c = int(np.count_nonzero(~first & second))
    p = 1.0 if b + c == 0 else float(sps.binomtest(b, b + c, 0.5).pvalue)
    return McNemarTest(
        n=int(first.size),
        first_correct=int(first.sum()),
        second_correct=int(second.sum()),
        b=b,
        c=c,
        p=min(1.0, p),
    )


# ----------------------------------------------------------------------------- one metric


@dataclass(frozen=True)
class MetricComparison(_Result):
    """Everything the report says about one metric: first backbone minus second."""

    metric: str
    first: str
    second: str
    alpha: float
    k: int
    first_summary: Summary
    second_summary: Summary
    ttest: PairedTTest
    p_bonferroni: float
    wilcoxon: WilcoxonTest
    d_z: float
    bootstrap: BootstrapTest | None = None
    mcnemar: McNemarTest | None = None

    @property
    def confidence(self) -> float:
        return self.ttest.confidence

    @property
    def winner(self) -> str:
        """The backbone with the higher mean (the first one on an exact tie)."""
        return self.first if self.first_summary.mean >= self.second_summary.mean else self.second

    @property
    def significant(self) -> bool:
        """The paper's criterion: Bonferroni-adjusted paired t-test p < alpha."""
        return bool(self.p_bonferroni < self.alpha)

    @property
    def p_bootstrap_bonferroni(self) -> float:
        return bonferroni(self.bootstrap.p, self.k) if self.bootstrap else math.nan

    @property
    def p_mcnemar_bonferroni(self) -> float:
        return bonferroni(self.mcnemar.p, self.k) if self.mcnemar else math.nan

    def image_level_tests(self) -> dict[str, tuple[float, bool]]:
        """Test-image-level tests run for this metric: name -> (Bonferroni p, p < alpha)."""
        tests: dict[str, tuple[float, bool]] = {}
        if self.bootstrap:
            tests["the bootstrap over test images"] = (self.p_bootstrap_bonferroni, self.p_bootstrap_bonferroni < self.alpha)
        if self.mcnemar:
            tests["McNemar on the seed ensembles"] = (self.p_mcnemar_bonferroni, self.p_mcnemar_bonferroni < self.alpha)
        return tests

    @property
    def image_level_significant(self) -> bool | None:
        """Any test-image-level test significant after Bonferroni; None when none ran."""
        tests = self.image_level_tests()
        return None if not tests else any(sig for _, sig in tests.values())

    def disagreement(self) -> str | None:
        """A plain sentence when a test-image-level test disagrees with the t-test, else None."""
        tests = self.image_level_tests()
        if all(sig == self.significant for _, sig in tests.values()):
            return None
        verdict = "calls" if self.significant else "does not call"
        parts = [
            f"{name} {'does' if sig else 'does not'} (Bonferroni p = {p:.4g})" for name, (p, sig) in tests.items()
        ]
        why = (
            "the seeds agree with each other, but the shared test set is too small to rule out "
            "that the difference comes from which images happened to be drawn for testing"
            if self.significant
            else "with the trained models held fixed the difference is consistent across test "
            f"images, but it varies too much from seed to seed ({self.ttest.n} pairs) for the t-test"
        )
        return (
            f"{self.metric}: the seed-level t-test {verdict} the difference significant "
            f"(Bonferroni p = {self.p_bonferroni:.4g}); " + "; ".join(parts) + f". Reading: {why}."
        )

    def to_dict(self) -> dict[str, Any]:
        """One flat row: the columns of results.csv."""
        row: dict[str, Any] = {
            "metric": self.metric,
            "first": self.first,
            "second": self.second,
            "n_pairs": self.ttest.n,
            "confidence": self.confidence,
        }
        for label, summary in (("first", self.first_summary), ("second", self.second_summary)):
            row[f"{label}_mean"] = summary.mean
            row[f"{label}_sd"] = summary.sd
            row[f"{label}_ci_low"] = summary.ci_low
            row[f"{label}_ci_high"] = summary.ci_high
        row.update(
            mean_diff=self.ttest.mean_diff,
            sd_diff=self.ttest.sd_diff,
            diff_ci_low=self.ttest.ci_low,
            diff_ci_high=self.ttest.ci_high,
            t=self.ttest.t,
            df=self.ttest.df,
            p_ttest=self.ttest.p,
            p_bonferroni=self.p_bonferroni,
            p_wilcoxon=self.wilcoxon.p,
            wilcoxon_method=self.wilcoxon.method,
            wilcoxon_min_p=self.wilcoxon.min_p,
            d_z=self.d_z,
            winner=self.winner,
            significant=self.significant,
        )
        boot = self.bootstrap
        row.update(
            bootstrap_diff=boot.observed_diff if boot else math.nan,
            bootstrap_ci_low=boot.ci_low if boot else math.nan,
            bootstrap_ci_high=boot.ci_high if boot else math.nan,
            p_bootstrap=boot.p if boot else math.nan,
            p_bootstrap_bonferroni=self.p_bootstrap_bonferroni,
            mcnemar_b=self.mcnemar.b if self.mcnemar else math.nan,
            mcnemar_c=self.mcnemar.c if self.mcnemar else math.nan,
            p_mcnemar=self.mcnemar.p if self.mcnemar else math.nan,
            image_level_significant=self.image_level_significant,
        )
        return _plain(row)


def compare_metric(
    metric: str,
    first: str,
    second: str,
    x: ArrayLike,
    y: ArrayLike,
    *,
    alpha: float = 0.05,
    k: int = 1,
    bootstrap: BootstrapTest | None = None,
    mcnemar: McNemarTest | None = None,
) -> MetricComparison:
    """The paper's comparison of one metric, at confidence 1 - alpha / k (Bonferroni).

    Args:
        metric: metric name (for the report).
        first, second: backbone names; differences are first minus second.
        x, y: per-seed values of the first and second backbone, paired by position.
        alpha: family-wise significance level; k: number of metrics in the family.
        bootstrap, mcnemar: the image-level results for this metric, if computed.
    """
    alpha = _validate_alpha(alpha)
    k = _validate_k(k)
    first_values, second_values = _validate_paired(x, y)
    confidence = 1 - alpha / k
    ttest = paired_ttest(first_values, second_values, confidence)
    return MetricComparison(
        metric=metric,
        first=first,
        second=second,
        alpha=alpha,
        k=k,
        first_summary=describe(first_values, confidence),
        second_summary=describe(second_values, confidence),
        ttest=ttest,
        p_bonferroni=bonferroni(ttest.p, k),
        wilcoxon=wilcoxon_signed_rank(first_values, second_values),
        d_z=cohens_dz(first_values, second_values),
        bootstrap=bootstrap,
        mcnemar=mcnemar,
    )


# ----------------------------------------------------------------------------- cross-validation


def _validate_cv_differences(differences: ArrayLike, n_folds: int, n_repeats: int) -> np.ndarray:
    """One finite difference per (repeat, fold) cell, k * r of them, k >= 2."""
    for name, value, least in (("n_folds", n_folds, 2), ("n_repeats", n_repeats, 1)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    diffs = np.asarray(differences, dtype=float).ravel()
    if diffs.size != n_folds * n_repeats:
        raise ValueError(
            f"differences must hold one value per (repeat, fold): {n_repeats} x {n_folds} = "
            f"{n_folds * n_repeats}, got {diffs.size}"
        )
    if not np.all(np.isfinite(diffs)):
        raise ValueError(f"differences contain NaN or infinite values: {diffs.tolist()}")
    return diffs


def _validate_sizes(n_train: float, n_test: float) -> tuple[float, float]:
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not value > 0:
            raise ValueError(f"{name} must be a positive number of images, got {value!r}")
    return float(n_train), float(n_test)


def _degenerate_t(mean: float) -> tuple[float, float, str]:
    """(t, p, note) when every difference is the same number (zero variance)."""
    if mean == 0.0:
        return 0.0, 1.0, "every difference is 0: no difference in any fold (t = 0, p = 1)"
    return (
        math.copysign(math.inf, mean), 0.0,
        f"every difference equals {mean:+.6g}: zero variance, so t is {'+' if mean > 0 else '-'}inf "
        "and p = 0 (the limit); the same difference in every fold, but no spread to test it against",
    )


@dataclass(frozen=True)
class CorrectedTTest(_Result):
    """Corrected resampled t-test of the per-fold differences of a (repeated) k-fold CV."""

    n: int
    n_folds: int
    n_repeats: int
    mean_diff: float
    sd_diff: float
    n_train: float
    n_test: float
    se: float
    """Corrected standard error sqrt((1/(k r) + n_test/n_train) * var(d))."""
    t: float
    df: int
    p: float
    ci_low: float
    ci_high: float
    confidence: float
    t_uncorrected: float
    p_uncorrected: float
    """The naive t-test over folds (variance / (k r)), which ignores the overlap of training sets."""
    note: str = ""


def corrected_resampled_ttest(
    differences: ArrayLike,
    *,
    n_train: float,
    n_test: float,
    n_folds: int,
    n_repeats: int = 1,
    confidence: float = 0.95,
) -> CorrectedTTest:
    """Two-sided corrected resampled t-test over the k * r fold differences of a repeated k-fold CV.

    Args:
        differences: first minus second backbone, one value per (repeat, fold) cell.
        n_train: images a fold's model learned from, its validation part included (the
            training folds); n_test: images of a test fold. Means over the folds when they differ.
        n_folds, n_repeats: k and r.
        confidence: level of the interval of the mean difference.

    Notes:
        Nadeau & Bengio (2003, Machine Learning 52:239-281) replace the naive variance of the
        mean, var(d) / J, by (1/J + n_test/n_train) * var(d), because the J training sets
        overlap and the differences are positively correlated; Bouckaert & Frank (2004,
        PAKDD, LNCS 3056:3-12) apply it to r repeats of k-fold CV with J = k r:

            t = mean(d) / sqrt((1/(k r) + n_test/n_train) * var(d)),  df = k r - 1,

        var(d) with ddof = 1, p = 2 * P(T_df >= |t|), CI = mean(d) +- t_{(1+c)/2, df} * se.
        With zero variance (every difference equal) t, p are the limits, stated in `note`:
        t = 0, p = 1 when every difference is 0; t = +-inf, p = 0 otherwise.
    """
    diffs = _validate_cv_differences(differences, n_folds, n_repeats)
    n_train, n_test = _validate_sizes(n_train, n_test)
    confidence = _validate_confidence(confidence)
    n = diffs.size
    df = n - 1
    mean = float(diffs.mean())
    var = float(diffs.var(ddof=1))
    se = math.sqrt((1.0 / n + n_test / n_train) * var)
    if var == 0.0:
        t, p, note = _degenerate_t(mean)
        return CorrectedTTest(n, n_folds, n_repeats, mean, 0.0, n_train, n_test, 0.0, t, df, p, mean, mean,
                              confidence, t, p, note)
    t = mean / se
    t_naive = mean / math.sqrt(var / n)
    half = float(sps.t.ppf((1 + confidence) / 2, df)) * se
    return CorrectedTTest(
        n=n, n_folds=int(n_folds), n_repeats=int(n_repeats), mean_diff=mean, sd_diff=math.sqrt(var),
        n_train=n_train, n_test=n_test, se=se, t=t, df=df, p=float(2 * sps.t.sf(abs(t), df)),
        ci_low=mean - half, ci_high=mean + half, confidence=confidence,
        t_uncorrected=t_naive, p_uncorrected=float(2 * sps.t.sf(abs(t_naive), df)),
    )


FIVE_BY_TWO = (5, 2)
"""The design of Dietterich's test: 5 repeats of 2-fold CV."""


@dataclass(frozen=True)
class FiveByTwoTest(_Result):
    """Dietterich's 5x2cv paired t-test and Alpaydin's combined 5x2cv F-test."""

    t: float
    df: int
    p: float
    f: float
    f_df: tuple[int, int]
    p_f: float
    note: str = ""


def five_by_two_cv_test(differences: ArrayLike) -> FiveByTwoTest:
    """Both 5x2cv tests from the differences of 5 repeats x 2 folds.

    Args:
        differences: shape (5, 2): first minus second backbone, row = repeat, column = fold.

    Notes:
        Dietterich (1998, Neural Computation 10:1895-1923): with p_i^(j) the difference in fold
        j of repeat i, pbar_i = (p_i^(1) + p_i^(2)) / 2 and s_i^2 = sum_j (p_i^(j) - pbar_i)^2,
        t = p_1^(1) / sqrt(sum_i s_i^2 / 5) ~ t_5. Alpaydin (1999, Neural Computation
        11:1885-1892) combines all ten differences: F = sum_ij (p_i^(j))^2 / (2 sum_i s_i^2)
        ~ F(10, 5), one-sided (large F rejects). With sum_i s_i^2 = 0 both are limits, stated
        in `note` (0 and p = 1 when every difference is 0, infinite and p = 0 otherwise).
    """
    table = np.asarray(differences, dtype=float)
    if table.shape != FIVE_BY_TWO:
        raise ValueError(f"the 5x2cv tests need differences of shape (5 repeats, 2 folds), got {table.shape}")
    if not np.all(np.isfinite(table)):
        raise ValueError(f"differences contain NaN or infinite values: {table.tolist()}")
    s2 = ((table - table.mean(axis=1, keepdims=True)) ** 2).sum(axis=1)
    total = float(s2.sum())
    squares = float((table**2).sum())
    if total == 0.0:
        first = float(table[0, 0])
        t = 0.0 if first == 0.0 else math.copysign(math.inf, first)
        f = 0.0 if squares == 0.0 else math.inf
        note = ("every difference is 0" if squares == 0.0 else
                "both folds of every repeat have the same difference: zero variance, limits reported")
        return FiveByTwoTest(t, 5, 1.0 if t == 0.0 else 0.0, f, (10, 5), 1.0 if f == 0.0 else 0.0, note)
    t = float(table[0, 0]) / math.sqrt(total / 5)
    f = squares / (2 * total)
    return FiveByTwoTest(t, 5, float(2 * sps.t.sf(abs(t), 5)), f, (10, 5), float(sps.f.sf(f, 10, 5)))
