"""The statistics of analysis/stats.py pinned to scipy, pingouin, R and hand-computed values."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pingouin as pg
import pytest
from scipy import stats as sps
from scipy.stats import rankdata
from sklearn.metrics import accuracy_score, f1_score, precision_score, recall_score

from analysis.stats import (
    bonferroni,
    cohens_dz,
    compare_metric,
    confusion_metrics,
    describe,
    ensemble_correct,
    mcnemar_exact,
    paired_bootstrap,
    paired_ttest,
    wilcoxon_signed_rank,
)

# Student's sleep data (R: datasets::sleep), extra hours of sleep, drug 1 and drug 2 per patient.
SLEEP_1 = [0.7, -1.6, -0.2, -1.2, -0.1, 3.4, 3.7, 0.8, 0.0, 2.0]
SLEEP_2 = [1.9, 0.8, 1.1, 0.1, -0.1, 4.4, 5.5, 1.6, 4.6, 3.4]


def test_paired_ttest_matches_r_textbook_values():
    # R: with(sleep, t.test(extra[group == 1], extra[group == 2], paired = TRUE))
    # t = -4.0621, df = 9, p-value = 0.002833, 95 percent CI -2.4598858 -0.7001142, mean -1.58
    result = paired_ttest(SLEEP_1, SLEEP_2, confidence=0.95)
    assert result.t == pytest.approx(-4.0621, abs=1e-4)
    assert result.df == 9
    assert result.p == pytest.approx(0.002833, abs=1e-6)
    assert result.ci_low == pytest.approx(-2.4598858, abs=1e-7)
    assert result.ci_high == pytest.approx(-0.7001142, abs=1e-7)
    assert result.mean_diff == pytest.approx(-1.58)


def test_paired_ttest_matches_scipy_and_pingouin_at_98_75_percent():
    rng = np.random.default_rng(3)
    x, y = rng.normal(0.80, 0.02, 10), rng.normal(0.78, 0.03, 10)
    result = paired_ttest(x, y, confidence=0.9875)
    reference = sps.ttest_rel(x, y)
    assert result.t == pytest.approx(reference.statistic, rel=1e-12)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-12)
    interval = reference.confidence_interval(0.9875)
    assert (result.ci_low, result.ci_high) == pytest.approx((interval.low, interval.high), rel=1e-12)

    oracle = pg.ttest(x, y, paired=True, confidence=0.9875).iloc[0]
    ci_column = next(c for c in oracle.index if str(c).startswith("CI"))
    assert result.t == pytest.approx(oracle["T"], rel=1e-9)
    assert result.df == oracle["dof"]
    assert result.p == pytest.approx(oracle["p_val"], rel=1e-9)
    assert result.ci_low == pytest.approx(oracle[ci_column][0], abs=5e-3)  # pingouin rounds its CI
    assert result.ci_high == pytest.approx(oracle[ci_column][1], abs=5e-3)

    # by hand: mean(d) +- t_{(1 + 0.9875) / 2, 9} * SD(d) / sqrt(10)
    d = x - y
    half = sps.t.ppf(1 - 0.0125 / 2, 9) * d.std(ddof=1) / math.sqrt(10)
    assert (result.ci_low, result.ci_high) == pytest.approx((d.mean() - half, d.mean() + half), rel=1e-12)


def test_describe_gives_the_t_interval_of_the_mean():
    values = [0.81, 0.79, 0.84, 0.80, 0.83]
    summary = describe(values, confidence=0.9875)
    low, high = sps.t.interval(0.9875, 4, loc=np.mean(values), scale=sps.sem(values))
    assert summary.n == 5
    assert summary.mean == pytest.approx(np.mean(values))
    assert summary.sd == pytest.approx(np.std(values, ddof=1))
    assert (summary.ci_low, summary.ci_high) == pytest.approx((low, high), rel=1e-12)


def test_cohens_dz_is_mean_over_sd_of_differences():
    # sleep data: d = drug1 - drug2, mean -1.58, SD 1.229995; d_z = t / sqrt(n) = -4.0621 / sqrt(10)
    assert cohens_dz(SLEEP_1, SLEEP_2) == pytest.approx(-1.2845576, abs=1e-6)
    assert cohens_dz(SLEEP_1, SLEEP_2) == pytest.approx(paired_ttest(SLEEP_1, SLEEP_2).t / math.sqrt(10))
    # not pingouin's paired cohen-d (pooled SD of x and y), which is 0.832 here
    assert abs(cohens_dz(SLEEP_1, SLEEP_2)) != pytest.approx(0.8321811, abs=1e-3)


def test_bonferroni_multiplies_and_caps_at_one():
    assert bonferroni(0.01, 4) == pytest.approx(0.04)
    assert bonferroni(0.3, 4) == 1.0
    assert bonferroni(0.25, 4) == 1.0
    assert math.isnan(bonferroni(math.nan, 4))
    with pytest.raises(ValueError, match="k must be an integer >= 1"):
        bonferroni(0.01, 0)
    with pytest.raises(ValueError, match=r"p-value must lie in \[0, 1\]"):
        bonferroni(1.5, 4)


def _brute_force_wilcoxon_p(x, y) -> float:
    """Exact two-sided p by enumerating all 2**n sign assignments of the ranked |d| (zeros dropped)."""
    d = np.subtract(x, y)
    d = d[d != 0]
    ranks = rankdata(np.abs(d))
    observed = ranks[d > 0].sum()
    totals = [sum(r for r, s in zip(ranks, signs) if s) for signs in itertools.product([0, 1], repeat=d.size)]
    totals = np.array(totals)
    return min(1.0, 2 * min(np.mean(totals <= observed + 1e-9), np.mean(totals >= observed - 1e-9)))


def test_wilcoxon_exact_without_ties_matches_enumeration_and_pingouin():
    x = [0.82, 0.85, 0.79, 0.88, 0.81, 0.86, 0.80]
    y = [0.80, 0.81, 0.80, 0.83, 0.78, 0.80, 0.795]
    result = wilcoxon_signed_rank(x, y)
    assert result.method == "exact"
    assert result.p == pytest.approx(_brute_force_wilcoxon_p(x, y), rel=1e-12)
    assert result.p == pytest.approx(pg.wilcoxon(x, y).iloc[0]["p_val"], rel=1e-12)
    assert result.statistic == pytest.approx(sps.wilcoxon(x, y).statistic)


def test_wilcoxon_with_ties_is_exact_permutation():
    x = [0.80, 0.82, 0.81, 0.85, 0.80, 0.79]
    y = [0.78, 0.80, 0.81, 0.82, 0.78, 0.80]  # |d| = .02, .02, 0, .03, .02, .01: ties and a zero
    result = wilcoxon_signed_rank(np.round(x, 2), np.round(y, 2))
    assert result.method.startswith("exact permutation")
    assert result.n_nonzero == 5
    assert result.p == pytest.approx(_brute_force_wilcoxon_p(np.round(x, 2), np.round(y, 2)), rel=1e-9)


def test_wilcoxon_five_pairs_cannot_go_below_0_0625():
    # all five differences positive: the most extreme outcome, exact p = 2 / 2**5
    result = wilcoxon_signed_rank([0.9, 0.91, 0.92, 0.93, 0.95], [0.8, 0.8, 0.8, 0.8, 0.8])
    assert result.p == pytest.approx(0.0625)
    assert result.min_p == pytest.approx(0.0625)


def test_mcnemar_exact_matches_binomial_by_hand():
    # b = 1, c = 9: p = 2 * sum_{i<=1} C(10, i) / 2**10 = 2 * (1 + 10) / 1024 = 0.021484375
    first = np.array([True] * 1 + [False] * 9 + [True] * 20 + [False] * 5)
    second = np.array([False] * 1 + [True] * 9 + [True] * 20 + [False] * 5)
    result = mcnemar_exact(first, second)
    assert (result.b, result.c, result.n) == (1, 9, 35)
    assert result.p == pytest.approx(22 / 1024, rel=1e-12)
    assert result.p == pytest.approx(sps.binomtest(1, 10, 0.5).pvalue)
    # b = c: p = 1; no discordant images: p = 1
    assert mcnemar_exact(np.array([True, False]), np.array([False, True])).p == pytest.approx(1.0)
    assert mcnemar_exact(np.array([True, True]), np.array([True, True])).p == 1.0


def test_ensemble_correct_uses_argmax_of_mean_probabilities():
    true = np.array([0, 1])
    probs = np.array([[[0.6, 0.4], [0.6, 0.4]], [[0.3, 0.7], [0.0, 1.0]]])  # 2 seeds x 2 images x 2 classes
    # image 0: mean (0.45, 0.55) -> class 1, wrong; image 1: mean (0.3, 0.7) -> class 1, right
    assert ensemble_correct(true, probs).tolist() == [False, True]


def _random_runs(rng, true, n_runs, hit_rate, k=4):
    guesses = rng.integers(0, k, size=(n_runs, true.size))
    return np.where(rng.random((n_runs, true.size)) < hit_rate, true, guesses)


def test_confusion_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    true = rng.integers(0, 4, 60)
    pred = _random_runs(rng, true, 1, 0.6)[0]
    confusion = np.zeros((4, 4))
    np.add.at(confusion, (true, pred), 1)
    got = confusion_metrics(confusion)
    assert got["accuracy"] == pytest.approx(accuracy_score(true, pred))
    assert got["precision_macro"] == pytest.approx(precision_score(true, pred, average="macro", zero_division=0))
    assert got["recall_macro"] == pytest.approx(recall_score(true, pred, average="macro", zero_division=0))
    assert got["f1_macro"] == pytest.approx(f1_score(true, pred, average="macro", zero_division=0))


def test_bootstrap_identical_predictions_give_zero_difference_and_p_one():
    rng = np.random.default_rng(1)
    true = rng.integers(0, 4, 50)
    runs = _random_runs(rng, true, 3, 0.7)
    results = paired_bootstrap(true, runs, runs.copy(), n_resamples=500, seed=7)
    for result in results.values():
        assert result.observed_diff == 0.0
        assert (result.ci_low, result.ci_high) == (0.0, 0.0)
        assert result.p == 1.0


def test_bootstrap_always_right_vs_always_wrong_gives_difference_one_and_tiny_p():
    true = np.tile(np.arange(4), 10)
    right = np.tile(true, (3, 1))
    wrong = (right + 1) % 4
    result = paired_bootstrap(true, right, wrong, ("accuracy",), n_resamples=999, seed=0)["accuracy"]
    assert result.observed_diff == 1.0
    assert (result.ci_low, result.ci_high) == (1.0, 1.0)
    assert result.p == pytest.approx(2 / 1000)  # 2 * (1 + 0) / (B + 1): nothing on the other side of 0


def test_bootstrap_matches_a_loop_over_resamples_with_sklearn():
    rng = np.random.default_rng(2)
    true = rng.integers(0, 4, 40)
    first, second = _random_runs(rng, true, 3, 0.75), _random_runs(rng, true, 3, 0.6)
    n_resamples, seed, confidence = 200, 11, 0.9
    got = paired_bootstrap(true, first, second, n_resamples=n_resamples, seed=seed, confidence=confidence)

    # the same draws, one resample at a time, metrics from scikit-learn
    draws = np.random.default_rng(seed).integers(0, true.size, size=(n_resamples, true.size))
    scorers = {
        "accuracy": accuracy_score,
        "f1_macro": lambda t, p: f1_score(t, p, average="macro", labels=range(4), zero_division=0),
        "recall_macro": lambda t, p: recall_score(t, p, average="macro", labels=range(4), zero_division=0),
        "precision_macro": lambda t, p: precision_score(t, p, average="macro", labels=range(4), zero_division=0),
    }
    for metric, score in scorers.items():
        diffs = np.array(
            [np.mean([score(true[i], r[i]) for r in first]) - np.mean([score(true[i], r[i]) for r in second]) for i in draws]
        )
        observed = np.mean([score(true, r) for r in first]) - np.mean([score(true, r) for r in second])
        assert got[metric].observed_diff == pytest.approx(observed, abs=1e-12)
        low, high = np.quantile(diffs, [0.05, 0.95])
        assert (got[metric].ci_low, got[metric].ci_high) == pytest.approx((low, high), abs=1e-12)
        p = min(1.0, 2 * min((1 + np.sum(diffs <= 0)) / 201, (1 + np.sum(diffs >= 0)) / 201))
        assert got[metric].p == pytest.approx(p)


@pytest.mark.parametrize("metric", ["accuracy", "f1_macro"])
def test_bootstrap_interval_agrees_with_scipy_bootstrap(metric):
    """Independent of our draws: scipy.stats.bootstrap (paired, percentile) over the same
    images gives the same interval within Monte Carlo error (both seeded, so deterministic)."""
    rng = np.random.default_rng(5)
    true = rng.integers(0, 4, 60)
    first, second = _random_runs(rng, true, 3, 0.8), _random_runs(rng, true, 3, 0.55)
    n_resamples, confidence = 4000, 0.9
    got = paired_bootstrap(true, first, second, (metric,), n_resamples=n_resamples, seed=3,
                           confidence=confidence)[metric]
    def f1_macro(t, p):  # numpy, for speed (checked against scikit-learn below)
        confusion = np.zeros((4, 4))
        np.add.at(confusion, (t, p), 1)
        tp, predicted, actual = np.diag(confusion), confusion.sum(0), confusion.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            f1 = np.nan_to_num(2 * tp / (predicted + actual))
        return f1.mean()

    score = {"accuracy": lambda t, p: np.mean(t == p), "f1_macro": f1_macro}[metric]
    assert f1_macro(true, first[0]) == pytest.approx(f1_score(true, first[0], average="macro", zero_division=0))

    def difference(images):  # the statistic over one resample of image indices
        return (np.mean([score(true[images], run[images]) for run in first])
                - np.mean([score(true[images], run[images]) for run in second]))

    reference = sps.bootstrap((np.arange(true.size),), difference, paired=True, vectorized=False,
                              n_resamples=n_resamples, confidence_level=confidence, method="percentile",
                              random_state=np.random.default_rng(17))
    assert got.observed_diff == pytest.approx(difference(np.arange(true.size)), abs=1e-12)
    assert got.observed_diff > 0.1  # a real difference, so the interval is not degenerate
    width = reference.confidence_interval.high - reference.confidence_interval.low
    assert width > 0.05
    # Monte Carlo error of a 5% / 95% quantile with 4000 draws is well under 0.01 here
    assert got.ci_low == pytest.approx(reference.confidence_interval.low, abs=0.015)
    assert got.ci_high == pytest.approx(reference.confidence_interval.high, abs=0.015)
    assert got.p < 0.01 and reference.confidence_interval.low > 0


def test_compare_metric_uses_bonferroni_confidence_and_names_the_winner():
    x, y = [0.80, 0.82, 0.81, 0.83, 0.84], [0.78, 0.79, 0.80, 0.80, 0.79]
    result = compare_metric("accuracy", "resnet50", "efficientnetv2s", x, y, alpha=0.05, k=4)
    assert result.confidence == pytest.approx(0.9875)
    assert result.first_summary.confidence == pytest.approx(0.9875)
    assert result.winner == "resnet50"
    assert result.p_bonferroni == pytest.approx(min(1, 4 * sps.ttest_rel(x, y).pvalue))
    # R: t.test(x, y, paired = TRUE)$p.value = 0.01346508; x 4 = 0.05386 > 0.05. Significant
    # unadjusted, not after Bonferroni: the verdict must follow the adjusted p.
    assert result.p_bonferroni == pytest.approx(0.0538603017, rel=1e-8)
    assert result.significant is False
    clear = compare_metric("accuracy", "resnet50", "efficientnetv2s",
                           [0.85, 0.841, 0.849, 0.85, 0.842], y, alpha=0.05, k=4)
    # R: t.test(c(.85,.841,.849,.85,.842), y, paired = TRUE)$p.value * 4 (about 1e-4)
    assert clear.p_bonferroni == pytest.approx(4 * sps.ttest_rel([0.85, 0.841, 0.849, 0.85, 0.842], y).pvalue)
    assert clear.p_bonferroni < 0.001 and clear.significant is True
    row = result.to_dict()
    assert row["mean_diff"] == pytest.approx(np.mean(np.subtract(x, y)))
    assert row["winner"] == "resnet50"
    assert list(result.to_frame()["metric"]) == ["accuracy"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: paired_ttest([0.1, 0.2, 0.3], [0.1, 0.2]), "equal lengths"),
        (lambda: paired_ttest([0.1], [0.2]), r"at least 2 values \(n >= 2\)"),
        (lambda: paired_ttest([0.1, math.nan], [0.2, 0.3]), "NaN or infinite"),
        (lambda: paired_ttest([0.1, 0.2], [0.2, 0.3], confidence=1.5), "confidence must be"),
        (lambda: compare_metric("accuracy", "a", "b", [0.1, 0.2], [0.2, 0.3], alpha=0.0), "alpha must be"),
        (lambda: compare_metric("accuracy", "a", "b", [0.1, 0.2], [0.2, 0.3], alpha=1.2), "alpha must be"),
        (lambda: wilcoxon_signed_rank([0.1, 0.2, 0.3], [0.2, 0.3]), "equal lengths"),
        (lambda: cohens_dz([[0.1, 0.2]], [[0.2, 0.3]]), "one-dimensional"),
        (lambda: paired_bootstrap([0, 1], [[0, 1]], [[0, 1]], ("auc",), n_resamples=100), "unknown metric 'auc'"),
        (lambda: paired_bootstrap([0, 1], [[0, 1, 1]], [[0, 1]], n_resamples=100), r"shape \(runs, 2 images\)"),
        (lambda: paired_bootstrap([0, 1], [[0, 7]], [[0, 1]], n_resamples=100), "integer class indices in 0..3"),
        (lambda: paired_bootstrap([0, 1], [[0, 1]], [[0, 1]], n_resamples=10), "n_resamples must be"),
        (lambda: mcnemar_exact(np.array([True]), np.array([True, False])), "equal lengths"),
        (lambda: mcnemar_exact(np.array([1, 0]), np.array([True, False])), "boolean"),
    ],
)
def test_bad_input_raises_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_disagreement_between_seed_and_image_level_tests_is_said_in_plain_words():
    # seeds disagree a lot (t-test not significant) while every image favours the first backbone
    true = np.tile(np.arange(4), 10)
    right, wrong = np.tile(true, (3, 1)), (np.tile(true, (3, 1)) + 1) % 4
    boot = paired_bootstrap(true, right, wrong, ("accuracy",), n_resamples=999)["accuracy"]
    result = compare_metric(
        "accuracy", "a", "b", [0.9, 0.5, 0.95], [0.6, 0.7, 0.5], alpha=0.05, k=4, bootstrap=boot
    )
    assert not result.significant
    assert result.image_level_significant
    sentence = result.disagreement()
    assert sentence.startswith("accuracy: the seed-level t-test does not call the difference significant")
    assert "the bootstrap over test images does" in sentence
    agreeing = compare_metric("accuracy", "a", "b", [0.9, 0.5, 0.95], [0.6, 0.7, 0.5], alpha=0.05, k=4)
    assert agreeing.disagreement() is None


def test_bootstrap_macro_averages_over_all_classes_like_training():
    # class 3 never occurs in the test set: training (sklearn, labels=CLASSES, zero_division=0)
    # still averages over 4 classes, so the bootstrap must as well
    true = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    first = np.array([[0, 1, 2, 0, 1, 3, 0, 1]])
    second = np.array([[0, 1, 1, 0, 2, 2, 0, 0]])
    got = paired_bootstrap(true, first, second, ("f1_macro", "precision_macro"), n_resamples=100)
    for metric, score in (("f1_macro", f1_score), ("precision_macro", precision_score)):
        expected = score(true, first[0], average="macro", labels=range(4), zero_division=0) - score(
            true, second[0], average="macro", labels=range(4), zero_division=0
        )
        assert got[metric].observed_diff == pytest.approx(expected, abs=1e-12)


# ----------------------------------------------------------------------------- cross-validation

from analysis.stats import corrected_resampled_ttest, five_by_two_cv_test  # noqa: E402

CV_DIFFS = [0.02, 0.05, -0.01, 0.04, 0.03]
"""A hand-made 5-fold CV: accuracy of backbone A minus B per fold; folds of 185 test images,
740 training images (validation included), so n_test / n_train = 0.25."""


def test_corrected_resampled_ttest_by_hand():
    # mean(d) = 0.13 / 5 = 0.026; deviations -0.006, 0.024, -0.036, 0.014, 0.004;
    # squares sum to 3.6e-5 + 5.76e-4 + 1.296e-3 + 1.96e-4 + 1.6e-5 = 2.12e-3; var = 2.12e-3 / 4 = 5.3e-4.
    # se = sqrt((1/5 + 185/740) * 5.3e-4) = sqrt(0.45 * 5.3e-4) = sqrt(2.385e-4) = 0.0154434452
    # t = 0.026 / 0.0154434452 = 1.6835622, df = 4
    # p = 2 * scipy.stats.t.sf(1.6835622, 4) = 0.16755322
    # 98.75% CI: t_{0.99375, 4} = scipy.stats.t.ppf(0.99375, 4) = 4.3146560;
    #   0.026 -+ 4.3146560 * 0.0154434452 = [-0.0406332, 0.0926332]
    # naive: se = sqrt(5.3e-4 / 5) = 0.0102956, t = 2.5253432 (= scipy.stats.ttest_1samp), p = 0.0649859
    result = corrected_resampled_ttest(CV_DIFFS, n_train=740, n_test=185, n_folds=5, confidence=0.9875)
    assert result.mean_diff == pytest.approx(0.026, abs=1e-15)
    assert result.sd_diff**2 == pytest.approx(5.3e-4, rel=1e-12)
    assert result.se == pytest.approx(math.sqrt(2.385e-4), rel=1e-12)
    assert result.t == pytest.approx(1.6835622, abs=1e-7)
    assert result.df == 4
    assert result.p == pytest.approx(0.16755322, abs=1e-8)
    assert result.p == pytest.approx(2 * sps.t.sf(0.026 / math.sqrt(2.385e-4), 4), rel=1e-12)
    assert (result.ci_low, result.ci_high) == (pytest.approx(-0.0406332, abs=1e-7), pytest.approx(0.0926332, abs=1e-7))
    assert result.t_uncorrected == pytest.approx(2.5253432, abs=1e-7)
    assert result.p_uncorrected == pytest.approx(0.0649859, abs=1e-7)
    assert result.note == ""
    frame = result.to_frame()
    assert list(frame["t"]) == [result.t]


def test_corrected_ttest_without_overlap_is_the_one_sample_ttest():
    """n_test / n_train -> 0 leaves 1/J: the ordinary t-test over the k r differences (scipy)."""
    diffs = np.array([0.03, -0.01, 0.02, 0.04, 0.0, 0.01, 0.05, 0.02, -0.02, 0.03])
    result = corrected_resampled_ttest(diffs, n_train=1e12, n_test=1e-6, n_folds=5, n_repeats=2)
    reference = sps.ttest_1samp(diffs, 0.0)
    assert result.df == 9 == reference.df
    assert result.t == pytest.approx(reference.statistic, rel=1e-9)
    assert result.p == pytest.approx(reference.pvalue, rel=1e-9)
    assert result.t == pytest.approx(result.t_uncorrected, rel=1e-9)
    # Bouckaert & Frank: 10 x 10 differences -> J = 100, df = 99; the correction only widens
    wide = corrected_resampled_ttest(np.tile(diffs, 10), n_train=740, n_test=185, n_folds=10, n_repeats=10)
    assert wide.df == 99 and abs(wide.t) < abs(wide.t_uncorrected) and wide.p > wide.p_uncorrected
    assert wide.t == pytest.approx(diffs.mean() / math.sqrt((1 / 100 + 0.25) * np.tile(diffs, 10).var(ddof=1)))


def test_corrected_ttest_degenerate_differences_say_so():
    zero = corrected_resampled_ttest([0.0, 0.0, 0.0], n_train=20, n_test=10, n_folds=3)
    assert (zero.t, zero.p, zero.ci_low, zero.ci_high) == (0.0, 1.0, 0.0, 0.0)
    assert "every difference is 0" in zero.note
    same = corrected_resampled_ttest([0.02, 0.02], n_train=20, n_test=20, n_folds=2)
    assert same.t == math.inf and same.p == 0.0 and same.mean_diff == pytest.approx(0.02)
    assert "zero variance" in same.note and "+0.02" in same.note


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"differences": [0.1, 0.2, 0.3], "n_folds": 2}, r"2 = 2, got 3"),
    ({"differences": [0.1, math.nan], "n_folds": 2}, "NaN"),
    ({"differences": [0.1, 0.2], "n_folds": 1, "n_repeats": 2}, "n_folds must be an integer >= 2"),
    ({"differences": [0.1, 0.2], "n_folds": 2, "n_train": 0}, "n_train must be a positive number"),
])
def test_corrected_ttest_rejects_bad_input(kwargs, message):
    args = {"n_train": 10, "n_test": 10, "n_repeats": 1, **kwargs}
    with pytest.raises(ValueError, match=message):
        corrected_resampled_ttest(**args)


FIVE_BY_TWO_DIFFS = [[0.03, 0.01], [0.02, 0.04], [-0.01, 0.01], [0.05, 0.01], [0.02, 0.00]]
"""A hand-made 5x2cv table: rows are repeats, columns the two folds."""


def test_five_by_two_cv_tests_by_hand():
    # pbar_i = 0.02, 0.03, 0.00, 0.03, 0.01; s_i^2 = 2e-4, 2e-4, 2e-4, 8e-4, 2e-4; sum = 1.6e-3
    # Dietterich: t = p_1^(1) / sqrt(1.6e-3 / 5) = 0.03 / sqrt(3.2e-4) = 1.6770510, df 5,
    #   p = 2 * scipy.stats.t.sf(1.6770510, 5) = 0.15437725
    # Alpaydin: sum p^2 = 9e-4 + 1e-4 + 4e-4 + 1.6e-3 + 1e-4 + 1e-4 + 2.5e-3 + 1e-4 + 4e-4 + 0 = 6.2e-3
    #   F = 6.2e-3 / (2 * 1.6e-3) = 1.9375, p = scipy.stats.f.sf(1.9375, 10, 5) = 0.24106329
    result = five_by_two_cv_test(FIVE_BY_TWO_DIFFS)
    assert result.t == pytest.approx(0.03 / math.sqrt(3.2e-4), rel=1e-12)
    assert result.t == pytest.approx(1.6770510, abs=1e-7)
    assert result.df == 5 and result.p == pytest.approx(0.15437725, abs=1e-8)
    assert result.f == pytest.approx(1.9375, rel=1e-12) and result.f_df == (10, 5)
    assert result.p_f == pytest.approx(0.24106329, abs=1e-8)
    # on the same table the corrected resampled t-test (J = 10, n_test / n_train = 1 for 2 folds)
    # is a different statistic with the same sign: both see a small positive difference
    corrected = corrected_resampled_ttest(np.ravel(FIVE_BY_TWO_DIFFS), n_train=100, n_test=100, n_folds=2, n_repeats=5)
    assert corrected.mean_diff == pytest.approx(0.018) and 0 < corrected.t < result.t


def test_five_by_two_degenerate_and_bad_shapes():
    zero = five_by_two_cv_test(np.zeros((5, 2)))
    assert (zero.t, zero.p, zero.f, zero.p_f) == (0.0, 1.0, 0.0, 1.0) and zero.note
    flat = five_by_two_cv_test(np.full((5, 2), 0.01))
    assert flat.t == math.inf and flat.p == 0.0 and flat.p_f == 0.0
    with pytest.raises(ValueError, match=r"shape \(5 repeats, 2 folds\)"):
        five_by_two_cv_test(np.zeros((2, 5)))


# ---- degenerate inputs: results that must not look like evidence ---------------------------


def test_identical_nonzero_differences_give_no_t_test_and_no_verdict():
    """Every seed 0.02 better: SD(d) = 0, so t and p are undefined, the effect size is +inf,
    Bonferroni keeps NaN, and nothing is called significant."""
    y = np.array([0.70, 0.75, 0.80, 0.72, 0.78])
    x = y + 0.02
    result = paired_ttest(x, y, 0.95)
    assert math.isnan(result.p) and math.isnan(result.t) and result.df == 4
    assert result.sd_diff == 0.0 and result.mean_diff == pytest.approx(0.02)
    assert result.ci_low == result.ci_high == result.mean_diff
    # scipy 1.17 answers t = inf, p = 0 here ("infinitely significant" from 5 equal numbers);
    # the analysis deliberately reports no p-value instead, so no promotion can follow from it
    with np.errstate(all="ignore"):
        assert sps.ttest_rel(x, y).statistic == math.inf
    assert cohens_dz(x, y) == math.inf and cohens_dz(y, x) == -math.inf
    comparison = compare_metric("accuracy", "a", "b", x, y, alpha=0.05, k=4)
    assert math.isnan(comparison.p_bonferroni) and comparison.significant is False
    # Wilcoxon sees 5 positive differences with tied ranks: all 2**5 sign flips, p = 2/32
    wilcoxon = wilcoxon_signed_rank(x, y)
    assert wilcoxon.n_nonzero == 5 and wilcoxon.p == pytest.approx(2 / 32)


def test_all_zero_differences_give_p_one_and_no_effect():
    x = np.array([0.8, 0.7, 0.9, 0.85])
    result = paired_ttest(x, x.copy(), 0.95)
    assert math.isnan(result.p) and result.mean_diff == 0.0 and (result.ci_low, result.ci_high) == (0.0, 0.0)
    assert math.isnan(cohens_dz(x, x.copy()))
    wilcoxon = wilcoxon_signed_rank(x, x.copy())
    assert (wilcoxon.n_nonzero, wilcoxon.p, wilcoxon.statistic) == (0, 1.0, 0.0)
    assert wilcoxon.method == "all differences zero"
    comparison = compare_metric("accuracy", "a", "b", x, x.copy(), alpha=0.05, k=4)
    assert comparison.significant is False


def test_wilcoxon_uses_the_normal_approximation_at_larger_n_and_matches_the_formula():
    """n = 60 distinct differences (above the exact limit of 50): the p-value is the normal
    approximation, computed here from its textbook formula (no continuity correction)."""
    rng = np.random.default_rng(8)
    y = rng.uniform(0.6, 0.8, 60)
    x = y + rng.normal(0.01, 0.03, 60)
    d = x - y
    assert np.unique(np.abs(d)).size == 60 and np.all(d != 0)
    result = wilcoxon_signed_rank(x, y)
    assert result.method == "normal approximation" and result.n_nonzero == 60
    n = 60
    ranks = rankdata(np.abs(d))
    w_plus = ranks[d > 0].sum()
    z = (w_plus - n * (n + 1) / 4) / math.sqrt(n * (n + 1) * (2 * n + 1) / 24)
    assert result.p == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-9)
    assert result.statistic == pytest.approx(min(w_plus, n * (n + 1) / 2 - w_plus))
    assert 0.0 < result.p < 0.05  # a real shift of 0.01 per pair
