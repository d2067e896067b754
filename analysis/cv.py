"""The analysis of a cross-validated study: every image tested once per repeat, fold by fold.

A CV study (study params `cv` = k > 0, `cv_repeats` = r) has one train run per backbone and
(repeat, fold) cell, tagged `ecg.repeat` / `ecg.fold`; the two backbones' runs of a cell share
its seed, so `gather.gather_study` pairs them as it pairs seeds. Here, per metric:

- the mean over the k r cells of the paired difference (first minus second backbone),
- the corrected resampled t-test (stats.corrected_resampled_ttest), Bonferroni over the metrics,
  its interval at 1 - alpha / m, and the naive t-test over folds beside it for contrast,
- Dietterich's 5x2cv t-test and Alpaydin's F-test where the design is 5 repeats of 2 folds,
- out-of-fold metrics: each repeat's test_predictions.csv pooled over its folds (every image
  once), the metric computed on the pool, averaged over repeats; and the pooled confusion
  matrix per backbone (summed over repeats).
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from analysis.gather import PairingError, StudyPairs, TrainRun, _class_indices, read_predictions
from analysis.stats import (
    FIVE_BY_TWO, CorrectedTTest, FiveByTwoTest, _plain, bonferroni, confusion_metrics,
    corrected_resampled_ttest, five_by_two_cv_test,
)
from ecg_mlflow import schema
from ecg_mlflow.schema import CLASSES

if TYPE_CHECKING:
    from mlflow import MlflowClient

Cell = tuple[int, int]
"""(repeat, fold)."""


def cell_of(run: TrainRun, folds: int, repeats: int) -> Cell:
    """The (repeat, fold) a train run of a CV study tested on, from its tags."""
    try:
        cell = int(run.tags[schema.TAG_REPEAT]), int(run.tags[schema.TAG_FOLD])
    except (KeyError, ValueError):
        raise PairingError(
            f"{run.label()} lacks integer tags {schema.TAG_REPEAT} and {schema.TAG_FOLD}: "
            f"it is not a run of a cross-validated study"
        ) from None
    if not (0 <= cell[0] < repeats and 0 <= cell[1] < folds):
        raise PairingError(f"{run.label()} is fold {cell[1]} of repeat {cell[0]}, outside the study's "
                           f"{repeats} x {folds} design")
    return cell


def order_cells(pairs: StudyPairs) -> dict[Cell, int]:
    """(repeat, fold) -> index into pairs.seeds, for the complete k x r grid, or PairingError
    naming every missing cell (a CV study without every fold does not test every image)."""
    folds, repeats = pairs.design
    first, second = pairs.archs
    index: dict[Cell, int] = {}
    for i, seed in enumerate(pairs.seeds):
        a, b = pairs.runs[first][i], pairs.runs[second][i]
        cell = cell_of(a, folds, repeats)
        if cell_of(b, folds, repeats) != cell:
            raise PairingError(f"seed {seed}: {a.label()} and {b.label()} tested on different folds")
        index[cell] = i
    missing = [(r, f) for r in range(repeats) for f in range(folds) if (r, f) not in index]
    if missing:
        names = ", ".join(f"fold {f} of repeat {r}" for r, f in missing)
        raise PairingError(
            f"the {repeats} x {folds}-fold study lacks a finished pair of runs for {names}; "
            f"rerun the same study to train only those"
        )
    return dict(sorted(index.items()))


def fold_sizes(pairs: StudyPairs, cells: dict[Cell, int]) -> tuple[float, float]:
    """Mean over the cells of (n_train + n_val, n_test): the training folds (validation
    included, as Nadeau and Bengio count them) and the test fold."""
    train, test = [], []
    for i in cells.values():
        run = pairs.runs[pairs.archs[0]][i]
        try:
            train.append(int(run.params[schema.PARAM_N_TRAIN]) + int(run.params[schema.PARAM_N_VAL]))
            test.append(int(run.params[schema.PARAM_N_TEST]))
        except (KeyError, ValueError):
            raise PairingError(f"{run.label()} lacks integer params n_train, n_val, n_test") from None
    return float(np.mean(train)), float(np.mean(test))


@dataclass(frozen=True)
class OutOfFold:
    """Per repeat, every image's prediction from the fold that tested it."""

    relpaths: tuple[str, ...]
    true: np.ndarray
    """(images,) true class index."""
    predicted: dict[str, np.ndarray]
    """arch -> (repeats, images) predicted class index."""


def load_out_of_fold(client: MlflowClient, pairs: StudyPairs, cells: dict[Cell, int]) -> OutOfFold:
    """Pool each repeat's test_predictions.csv over its folds; check every image is tested
    exactly once per repeat and the same images (and labels) in every repeat and backbone."""
    from mlflow.exceptions import MlflowException

    _, repeats = pairs.design
    pooled: dict[str, list[pd.DataFrame]] = {a: [] for a in pairs.archs}
    with tempfile.TemporaryDirectory(prefix="ecg-cv-analysis-") as tmp:
        for arch in pairs.archs:
            for repeat in range(repeats):
                frames = []
                for (r, _), i in cells.items():
                    if r != repeat:
                        continue
                    run = pairs.runs[arch][i]
                    try:
                        local = client.download_artifacts(run.run_id, schema.ARTIFACT_PREDICTIONS, str(Path(tmp) / run.run_id))
                    except (MlflowException, OSError) as error:
                        raise PairingError(f"{run.label()} has no {schema.ARTIFACT_PREDICTIONS} artifact") from error
                    frame = read_predictions(Path(local), run)
                    frame["_run"] = run.label()
                    frames.append(frame)
                pooled[arch].append(_pool(frames, arch, repeat))
    reference = pooled[pairs.archs[0]][0]
    columns = [schema.COL_RELPATH, schema.COL_SHA256, schema.COL_TRUE]
    for arch in pairs.archs:
        for repeat, frame in enumerate(pooled[arch]):
            if not frame[columns].astype(str).equals(reference[columns].astype(str)):
                raise PairingError(
                    f"repeat {repeat} of {arch} tested other images (or labels) than repeat 0 of "
                    f"{pairs.archs[0]}: out-of-fold pooling needs every image once per repeat"
                )
    dummy = pairs.runs[pairs.archs[0]][0]
    return OutOfFold(
        relpaths=tuple(reference[schema.COL_RELPATH]),
        true=_class_indices(reference[schema.COL_TRUE], dummy, schema.COL_TRUE),
        predicted={a: np.stack([_class_indices(f[schema.COL_PRED], dummy, schema.COL_PRED) for f in pooled[a]])
                   for a in pairs.archs},
    )


def _pool(frames: list[pd.DataFrame], arch: str, repeat: int) -> pd.DataFrame:
    frame = pd.concat(frames, ignore_index=True)
    doubled = frame[frame[schema.COL_RELPATH].duplicated(keep=False)]
    if not doubled.empty:
        first = doubled.iloc[0]
        runs = sorted(set(doubled[doubled[schema.COL_RELPATH] == first[schema.COL_RELPATH]]["_run"]))
        raise PairingError(
            f"repeat {repeat} of {arch}: {doubled[schema.COL_RELPATH].nunique()} image(s) tested in more than "
            f"one fold, e.g. {first[schema.COL_RELPATH]!r} by {' and '.join(runs)}"
        )
    return frame.drop(columns="_run").sort_values(schema.COL_RELPATH, kind="stable").reset_index(drop=True)


def pooled_confusions(true: np.ndarray, predicted: np.ndarray, n_classes: int) -> np.ndarray:
    """(repeats, true, predicted) counts of one backbone's out-of-fold predictions."""
    counts = np.zeros((predicted.shape[0], n_classes, n_classes), dtype=np.int64)
    for repeat, row in enumerate(predicted):
        np.add.at(counts[repeat], (true, row), 1)
    return counts


@dataclass(frozen=True)
class CVComparison:
    """One metric of a CV study: first backbone minus second over the k r cells."""

    metric: str
    first: str
    second: str
    alpha: float
    k: int
    """Metrics in the Bonferroni family."""
    first_values: tuple[float, ...]
    second_values: tuple[float, ...]
    """Per-cell test metrics, cells in (repeat, fold) order."""
    ttest: CorrectedTTest
    p_bonferroni: float
    oof_first: float
    oof_second: float
    """Out-of-fold metric (every image once per repeat), mean over repeats."""
    five_by_two: FiveByTwoTest | None = None

    @property
    def first_mean(self) -> float:
        return float(np.mean(self.first_values))

    @property
    def second_mean(self) -> float:
        return float(np.mean(self.second_values))

    @property
    def winner(self) -> str:
        """The backbone with the higher mean over cells (the first one on an exact tie)."""
        return self.first if self.first_mean >= self.second_mean else self.second

    @property
    def significant(self) -> bool:
        """Bonferroni-adjusted corrected resampled t-test p < alpha."""
        return bool(self.p_bonferroni < self.alpha)

    @property
    def naive_significant(self) -> bool:
        return bool(bonferroni(self.ttest.p_uncorrected, self.k) < self.alpha)

    def disagreement(self) -> str | None:
        """A sentence when the naive t-test over folds and the corrected one disagree."""
        if self.naive_significant == self.significant:
            return None
        return (
            f"{self.metric}: the naive t-test over the {self.ttest.n} folds would call the difference "
            f"significant (Bonferroni p = {bonferroni(self.ttest.p_uncorrected, self.k):.4g}); the corrected "
            f"resampled t-test does not (Bonferroni p = {self.p_bonferroni:.4g}): the folds' training sets "
            "overlap, so their differences are not independent and the naive test is too confident."
        )

    def to_dict(self) -> dict[str, Any]:
        """One flat row of results.csv."""
        t, fxt = self.ttest, self.five_by_two
        return _plain({
            "metric": self.metric, "first": self.first, "second": self.second,
            "n_folds": t.n_folds, "n_repeats": t.n_repeats, "confidence": t.confidence,
            "first_mean": self.first_mean, "second_mean": self.second_mean,
            "diff_mean": t.mean_diff, "sd_diff": t.sd_diff, "n_train": t.n_train, "n_test": t.n_test,
            "se_corrected": t.se, "t_corrected": t.t, "df": t.df, "p_corrected": t.p,
            "p_corrected_bonferroni": self.p_bonferroni, "ci_low": t.ci_low, "ci_high": t.ci_high,
            "t_uncorrected": t.t_uncorrected, "p_uncorrected": t.p_uncorrected,
            "oof_first": self.oof_first, "oof_second": self.oof_second,
            "t_5x2cv": fxt.t if fxt else math.nan, "p_5x2cv": fxt.p if fxt else math.nan,
            "f_5x2cv": fxt.f if fxt else math.nan, "p_f_5x2cv": fxt.p_f if fxt else math.nan,
            "winner": self.winner, "significant": self.significant, "note": t.note,
        })


def compare_cv_metric(metric: str, archs: tuple[str, str], first_values: np.ndarray, second_values: np.ndarray,
                      oof: tuple[float, float], *, folds: int, repeats: int, n_train: float, n_test: float,
                      alpha: float, k: int) -> CVComparison:
    """The corrected resampled t-test (and 5x2cv where the design fits) of one metric."""
    diffs = np.asarray(first_values, dtype=float) - np.asarray(second_values, dtype=float)
    ttest = corrected_resampled_ttest(diffs, n_train=n_train, n_test=n_test, n_folds=folds, n_repeats=repeats,
                                      confidence=1 - alpha / k)
    five_by_two = five_by_two_cv_test(diffs.reshape(repeats, folds)) if (repeats, folds) == FIVE_BY_TWO else None
    return CVComparison(metric, archs[0], archs[1], alpha, k, tuple(map(float, first_values)),
                        tuple(map(float, second_values)), ttest, bonferroni(ttest.p, k), oof[0], oof[1], five_by_two)


@dataclass(frozen=True)
class CVAnalysis:
    """Everything `analyze` computed for a cross-validated study."""

    experiment_id: str
    study_run_id: str
    archs: tuple[str, str]
    n_folds: int
    n_repeats: int
    cells: tuple[Cell, ...]
    run_ids: dict[str, tuple[str, ...]]
    """arch -> train run ids in cell order."""
    metrics: tuple[str, ...]
    alpha: float
    comparisons: tuple[CVComparison, ...]
    confusion: dict[str, np.ndarray]
    """arch -> (true, predicted) out-of-fold counts summed over repeats (CLASSES order)."""
    n_images: int
    warnings: tuple[str, ...] = field(default=())

    @property
    def first(self) -> str:
        return self.archs[0]

    @property
    def second(self) -> str:
        return self.archs[1]

    @property
    def n_pairs(self) -> int:
        return len(self.cells)

    @property
    def seeds(self) -> tuple[int, ...]:
        return tuple(r * self.n_folds + f + 1 for r, f in self.cells)

    @property
    def confidence(self) -> float:
        return 1 - self.alpha / len(self.metrics)

    @property
    def primary_metric(self) -> str:
        return self.metrics[0]

    def comparison(self, metric: str) -> CVComparison:
        for item in self.comparisons:
            if item.metric == metric:
                return item
        raise KeyError(f"metric {metric!r} was not analysed; analysed: {', '.join(self.metrics)}")

    @property
    def significant(self) -> bool:
        return self.comparison(self.primary_metric).significant

    @property
    def winner(self) -> str:
        primary = self.comparison(self.primary_metric)
        return primary.winner if primary.significant else schema.NO_WINNER

    def disagreements(self) -> list[str]:
        return [text for c in self.comparisons if (text := c.disagreement()) is not None]

    def to_frame(self) -> pd.DataFrame:
        """results.csv: one row per metric."""
        return pd.DataFrame([c.to_dict() for c in self.comparisons])

    def confusion_dict(self) -> dict[str, Any]:
        """oof_confusion.json: per backbone, rows true class, columns predicted class."""
        return {
            "classes": list(CLASSES), "rows": "true class", "columns": "predicted class",
            "repeats_summed": self.n_repeats, "n_images": self.n_images,
            "counts": {a: m.astype(int).tolist() for a, m in self.confusion.items()},
        }

    def to_dict(self) -> dict[str, Any]:
        """results.json."""
        return {
            "experiment_id": self.experiment_id, "study_run_id": self.study_run_id,
            "archs": list(self.archs), "difference": f"{self.first} minus {self.second}",
            "cv": self.n_folds, "cv_repeats": self.n_repeats, "n_pairs": self.n_pairs,
            "cells": [{"repeat": r, "fold": f, **{a: self.run_ids[a][i] for a in self.archs}}
                      for i, (r, f) in enumerate(self.cells)],
            "metrics": list(self.metrics), "alpha": self.alpha, "confidence": self.confidence,
            "primary_metric": self.primary_metric, "winner": self.winner, "significant": self.significant,
            "n_images": self.n_images,
            "test": "corrected resampled t-test (Nadeau & Bengio 2003; Bouckaert & Frank 2004)",
            "comparisons": [_json_safe(c.to_dict()) for c in self.comparisons],
            "out_of_fold_confusion": self.confusion_dict(),
            "disagreements": self.disagreements(), "warnings": list(self.warnings),
        }


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


def analyze_cv_pairs(client: MlflowClient, pairs: StudyPairs, metrics: Sequence[str], alpha: float) -> CVAnalysis:
    """Every statistic of a cross-validated study from its paired runs (gather.gather_study)."""
    folds, repeats = pairs.design
    cells = order_cells(pairs)
    n_train, n_test = fold_sizes(pairs, cells)
    oof = load_out_of_fold(client, pairs, cells)
    confusions = {a: pooled_confusions(oof.true, oof.predicted[a], len(CLASSES)) for a in pairs.archs}
    pooled = {a: confusion_metrics(confusions[a]) for a in pairs.archs}
    order = list(cells.values())
    comparisons = []
    for metric in metrics:
        key = schema.split_metric("test", metric)
        values = {a: pairs.values(a, key)[order] for a in pairs.archs}
        comparisons.append(compare_cv_metric(
            metric, pairs.archs, values[pairs.archs[0]], values[pairs.archs[1]],
            tuple(float(pooled[a][metric].mean()) for a in pairs.archs),
            folds=folds, repeats=repeats, n_train=n_train, n_test=n_test, alpha=alpha, k=len(metrics),
        ))
    return CVAnalysis(
        experiment_id=pairs.experiment_id, study_run_id=pairs.study_run_id, archs=pairs.archs,
        n_folds=folds, n_repeats=repeats, cells=tuple(cells),
        run_ids={a: tuple(pairs.runs[a][i].run_id for i in order) for a in pairs.archs},
        metrics=tuple(metrics), alpha=alpha, comparisons=tuple(comparisons),
        confusion={a: c.sum(axis=0) for a, c in confusions.items()}, n_images=len(oof.relpaths),
        warnings=pairs.warnings,
    )


def cv_analysis_tags(analysis: CVAnalysis) -> dict[str, str]:
    """The tags every analysis run carries (see ecg_mlflow.schema); significance is the
    corrected resampled t-test's after Bonferroni."""
    tags = {
        schema.TAG_ROLE: schema.ROLE_ANALYSIS, schema.TAG_STUDY: analysis.study_run_id,
        schema.TAG_PRIMARY_METRIC: analysis.primary_metric, schema.TAG_WINNER: analysis.winner,
        schema.TAG_SIGNIFICANT: str(analysis.significant).lower(),
    }
    for c in analysis.comparisons:
        tags[schema.winner_tag(c.metric)] = c.winner
        tags[schema.significant_tag(c.metric)] = str(c.significant).lower()
    return tags


def cv_analysis_params(analysis: CVAnalysis, study: str, experiment: str) -> dict[str, str]:
    return {
        schema.PARAM_ARCHS: ",".join(analysis.archs), schema.PARAM_N_PAIRS: str(analysis.n_pairs),
        schema.PARAM_STUDY: study, schema.PARAM_STUDY_RUN_ID: analysis.study_run_id,
        schema.PARAM_EXPERIMENT: experiment, schema.PARAM_ALPHA: str(analysis.alpha),
        schema.PARAM_METRICS: ",".join(analysis.metrics),
        schema.PARAM_SEEDS: ",".join(map(str, analysis.seeds)),
        schema.PARAM_CV: str(analysis.n_folds), schema.PARAM_CV_REPEATS: str(analysis.n_repeats),
        schema.PARAM_N_TEST_IMAGES: str(analysis.n_images),
    }


def cv_analysis_metrics(analysis: CVAnalysis) -> dict[str, float]:
    """`cv_<metric>_<stat>` of the analysis run, plus `<metric>_p_bonferroni` (what promote
    quotes); an infinite t (every difference equal, see the report) is left out."""
    values: dict[str, float] = {}
    for c in analysis.comparisons:
        t, m = c.ttest, c.metric
        values.update({
            schema.cv_metric(m, schema.CV_DIFF_MEAN): t.mean_diff,
            schema.cv_metric(m, schema.CV_T_CORRECTED): t.t,
            schema.cv_metric(m, schema.CV_P_CORRECTED): t.p,
            schema.cv_metric(m, schema.CV_P_CORRECTED_BONFERRONI): c.p_bonferroni,
            schema.cv_metric(m, schema.CV_CI_LOW): t.ci_low,
            schema.cv_metric(m, schema.CV_CI_HIGH): t.ci_high,
            schema.cv_metric(m, schema.CV_P_UNCORRECTED): t.p_uncorrected,
            schema.cv_metric(m, schema.CV_OOF_FIRST): c.oof_first,
            schema.cv_metric(m, schema.CV_OOF_SECOND): c.oof_second,
            schema.stat_metric(m, schema.STAT_P_BONFERRONI): c.p_bonferroni,
        })
        if c.five_by_two is not None:
            values.update({
                schema.cv_metric(m, schema.CV_T_5X2): c.five_by_two.t,
                schema.cv_metric(m, schema.CV_P_5X2): c.five_by_two.p,
                schema.cv_metric(m, schema.CV_F_5X2): c.five_by_two.f,
                schema.cv_metric(m, schema.CV_P_F_5X2): c.five_by_two.p_f,
            })
    return {k: float(v) for k, v in values.items() if math.isfinite(v)}


def log_cv_analysis(analysis: CVAnalysis, run_id: str, *, study: str, experiment: str,
                    client: MlflowClient) -> None:
    """Tags, params, metrics and the CV report artifacts into the open run `run_id`."""
    from mlflow.entities import Metric, Param, RunTag

    from analysis.report import write_cv_artifacts

    existing = client.get_run(run_id).data.params
    now = int(pd.Timestamp.now(tz="UTC").timestamp() * 1000)
    client.log_batch(
        run_id,
        metrics=[Metric(k, v, now, 0) for k, v in cv_analysis_metrics(analysis).items()],
        params=[Param(k, v) for k, v in cv_analysis_params(analysis, study, experiment).items() if k not in existing],
        tags=[RunTag(k, v) for k, v in cv_analysis_tags(analysis).items()],
    )
    with tempfile.TemporaryDirectory(prefix="ecg-cv-analysis-") as tmp:
        write_cv_artifacts(analysis, Path(tmp))
        client.log_artifacts(run_id, tmp)
