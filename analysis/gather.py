"""Find a study and its finished train runs in MLflow, pair them by seed, load predictions.

Reads only the run schema of DESIGN.md (`ecg_mlflow.schema`): the study parent (tag
`ecg.role=study`, params `archs` and `seeds`) and its train children (tags `ecg.role=train`,
`ecg.study=<parent id>`, params, `test_*` metrics, the `test_predictions.csv` artifact).
"""

from __future__ import annotations

import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ecg_mlflow import schema
from ecg_mlflow.schema import CLASSES
from ecg_mlflow.tracking.search import (
    LATEST, ExperimentNotFound, RunNotFound, filter_quote, find_experiment_id, find_run_of_role,
    latest_run_of_role, search_all_runs,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run

MISSING = "<missing>"


class StudyNotFound(RunNotFound):
    """The experiment or the study named by the user does not exist."""


class PairingError(ValueError):
    """The train runs of a study cannot be compared pair by pair."""


class AnalysisWarning(UserWarning):
    """Something the analysis worked around (a missing or doubled seed); also in the report."""


@dataclass(frozen=True)
class TrainRun:
    """What the analysis needs from one finished train run."""

    run_id: str
    arch: str
    seed: int
    start_time: int
    params: dict[str, str]
    metrics: dict[str, float]
    tags: dict[str, str] = field(default_factory=dict)

    def label(self) -> str:
        return f"run {self.run_id} ({self.arch}, seed {self.seed})"


@dataclass(frozen=True)
class StudyPairs:
    """The seed-paired train runs of a study: runs[arch][i] belongs with seeds[i]."""

    experiment_id: str
    study_run_id: str
    archs: tuple[str, str]
    seeds: tuple[int, ...]
    runs: dict[str, tuple[TrainRun, ...]]
    warnings: tuple[str, ...] = field(default=())
    study_params: dict[str, str] = field(default_factory=dict)
    """The study parent's params (`cv`, `cv_repeats` say whether it cross-validated)."""

    @property
    def design(self) -> tuple[int, int]:
        """(folds, repeats) of a cross-validated study; (0, 1) for the fixed split."""
        return study_design(self.study_params)

    def values(self, arch: str, metric_key: str) -> np.ndarray:
        """One logged metric of every paired run of `arch`, in seed order."""
        missing = [r.label() for r in self.runs[arch] if metric_key not in r.metrics]
        if missing:
            raise PairingError(f"metric {metric_key!r} is not logged on {', '.join(missing)}")
        return np.array([r.metrics[metric_key] for r in self.runs[arch]], dtype=float)


@dataclass(frozen=True)
class TestPredictions:
    """Per-image predictions of every paired run, aligned on one shared test set."""

    relpaths: tuple[str, ...]
    true: np.ndarray
    """True class index per image (index into CLASSES)."""
    predicted: dict[str, np.ndarray]
    """arch -> (runs, images) predicted class indices, runs in seed order."""
    probabilities: dict[str, np.ndarray]
    """arch -> (runs, images, classes) probabilities, columns in CLASSES order."""


def _warn(message: str, collected: list[str]) -> None:
    collected.append(message)
    warnings.warn(message, AnalysisWarning, stacklevel=3)


def find_study_run(client: MlflowClient, experiment_id: str, study: str) -> Run:
    """The study parent run: `latest` (newest run tagged ecg.role=study) or a run id."""
    if study == LATEST:
        found = latest_run_of_role(client, experiment_id, schema.ROLE_STUDY)
        if found is None:
            raise StudyNotFound(
                f"no study run (tag {schema.TAG_ROLE}={schema.ROLE_STUDY}) in experiment id "
                f"{experiment_id}; run the `study` entry point first or pass --study <run id>"
            )
        return found
    try:
        return find_run_of_role(client, experiment_id, study, schema.ROLE_STUDY)
    except RunNotFound as exc:
        raise StudyNotFound(str(exc)) from None


def study_archs(study_run: Run) -> tuple[str, str]:
    """The two backbones of the study, in the order of its `archs` param (first minus second)."""
    raw = study_run.data.params.get(schema.PARAM_ARCHS)
    if raw is None:
        raise PairingError(f"study run {study_run.info.run_id} has no {schema.PARAM_ARCHS!r} param")
    archs = tuple(dict.fromkeys(a.strip() for a in raw.split(",") if a.strip()))
    if len(archs) != 2:
        raise PairingError(
            f"study run {study_run.info.run_id} has archs={raw!r}; the paired analysis compares "
            f"exactly two backbones"
        )
    return archs  # type: ignore[return-value]


def study_design(params: dict[str, str]) -> tuple[int, int]:
    """(cv, cv_repeats) from a study run's params; studies from before CV have neither: (0, 1)."""
    try:
        return int(params.get(schema.PARAM_CV, "0") or 0), int(params.get(schema.PARAM_CV_REPEATS, "1") or 1)
    except ValueError:
        raise PairingError(
            f"study params {schema.PARAM_CV}={params.get(schema.PARAM_CV)!r}, "
            f"{schema.PARAM_CV_REPEATS}={params.get(schema.PARAM_CV_REPEATS)!r} are not integers"
        ) from None


def parse_seed_spec(spec: str) -> tuple[int, ...] | None:
    """`"1-10"`, `"1,2,5"` or `"1-3,7"` -> seeds; None when the text is not of that form."""
    from ecg_mlflow.parsing import ConfigError, parse_seeds

    try:
        return parse_seeds(spec)
    except ConfigError:
        return None


def _to_train_run(run: Run) -> TrainRun:
    params = dict(run.data.params)
    arch, seed = params.get("arch"), params.get("seed")
    if arch is None or seed is None:
        raise PairingError(f"train run {run.info.run_id} lacks the 'arch' or 'seed' param")
    try:
        seed_number = int(seed)
    except ValueError as error:
        raise PairingError(f"train run {run.info.run_id} has a non-integer seed {seed!r}") from error
    return TrainRun(run.info.run_id, arch, seed_number, int(run.info.start_time or 0), params, dict(run.data.metrics),
                    dict(run.data.tags))


def pair_runs(
    runs: list[TrainRun], archs: tuple[str, str], declared_seeds: tuple[int, ...] | None, collected: list[str]
) -> tuple[tuple[int, ...], dict[str, tuple[TrainRun, ...]]]:
    """Pair runs by seed: latest run per (arch, seed), drop seeds with one arch, warn each time."""
    by_key: dict[tuple[str, int], list[TrainRun]] = defaultdict(list)
    for run in runs:
        if run.arch not in archs:
            _warn(f"ignoring {run.label()}: arch {run.arch!r} is not one of the study's {', '.join(archs)}", collected)
            continue
        by_key[(run.arch, run.seed)].append(run)
    chosen: dict[tuple[str, int], TrainRun] = {}
    for (arch, seed), candidates in sorted(by_key.items()):
        candidates.sort(key=lambda r: (r.start_time, r.run_id))
        chosen[(arch, seed)] = candidates[-1]
        if len(candidates) > 1:
            _warn(
                f"seed {seed} of {arch} has {len(candidates)} finished runs "
                f"({', '.join(r.run_id for r in candidates)}); using the latest, {candidates[-1].run_id}",
                collected,
            )
    seen = sorted({seed for _, seed in chosen})
    paired = []
    for seed in seen:
        have = [a for a in archs if (a, seed) in chosen]
        if len(have) == 2:
            paired.append(seed)
        else:
            lacking = next(a for a in archs if a not in have)
            _warn(f"seed {seed} has a finished run only for {have[0]} (none for {lacking}); dropped", collected)
    for seed in declared_seeds or ():
        if seed not in seen:
            _warn(f"seed {seed} of the study has no finished train run for either backbone", collected)
    if len(paired) < 2:
        raise PairingError(
            f"only {len(paired)} complete seed pair(s) of {archs[0]} and {archs[1]} "
            f"(seeds {paired}); the paired analysis needs at least 2"
        )
    return tuple(paired), {a: tuple(chosen[(a, s)] for s in paired) for a in archs}


def canonical_param(value: str) -> str:
    """One spelling per value, so pairs logged as `1e-4` and `0.0001` (`mlflow run` keeps the
    user's spelling), `True` and `true`, or `1024, 512` and `1024,512` count as the same."""
    parts = []
    for part in value.split(","):
        part = part.strip()
        if part.lower() in ("true", "false"):
            parts.append(part.lower())
            continue
        try:
            parts.append(repr(float(part)))
        except ValueError:
            parts.append(part)
    return ",".join(parts)


def check_pairs(seeds: tuple[int, ...], runs: dict[str, tuple[TrainRun, ...]], archs: tuple[str, str]) -> None:
    """Refuse pairs that differ in anything but PAIRING_EXEMPT_PARAMS, listing every difference."""
    differences = []
    for index, seed in enumerate(seeds):
        first, second = runs[archs[0]][index], runs[archs[1]][index]
        for param in sorted((first.params.keys() | second.params.keys()) - schema.PAIRING_EXEMPT_PARAMS):
            a, b = first.params.get(param, MISSING), second.params.get(param, MISSING)
            if canonical_param(a) != canonical_param(b):
                differences.append(f"  seed {seed}: {param}: {archs[0]}={a!r} vs {archs[1]}={b!r}")
    if differences:
        raise PairingError(
            f"{len(differences)} difference(s) between paired runs, which may differ only in "
            f"{', '.join(sorted(schema.PAIRING_EXEMPT_PARAMS))}:\n" + "\n".join(differences)
        )


def gather_study(client: MlflowClient, experiment: str = schema.DEFAULT_EXPERIMENT, study: str = LATEST) -> StudyPairs:
    """Find the study, its finished train runs, pair them by seed and validate the pairs.

    Raises StudyNotFound (unknown experiment or study) or PairingError (params differ
    within a pair, fewer than 2 pairs); warns (AnalysisWarning) about dropped or doubled seeds.
    """
    collected: list[str] = []
    try:
        experiment_id = find_experiment_id(client, experiment)
    except ExperimentNotFound as exc:
        raise StudyNotFound(str(exc)) from None
    study_run = find_study_run(client, experiment_id, study)
    study_id = study_run.info.run_id
    archs = study_archs(study_run)
    children = search_all_runs(
        client,
        experiment_id,
        f"tags.`{schema.TAG_ROLE}` = {filter_quote(schema.ROLE_TRAIN)} and tags.`{schema.TAG_STUDY}` = {filter_quote(study_id)}",
    )
    finished = [r for r in children if r.info.status == "FINISHED"]
    if len(finished) < len(children):
        _warn(f"ignoring {len(children) - len(finished)} train run(s) of the study that did not finish", collected)
    folds, repeats = study_design(study_run.data.params)
    if folds:  # a CV study's seeds are its cells' (under `mlflow run` the `seeds` param is the default)
        declared: tuple[int, ...] | None = tuple(range(1, folds * repeats + 1))
    else:
        declared = parse_seed_spec(study_run.data.params.get(schema.PARAM_SEEDS, ""))
    seeds, paired = pair_runs([_to_train_run(r) for r in finished], archs, declared, collected)
    check_pairs(seeds, paired, archs)
    return StudyPairs(experiment_id, study_id, archs, seeds, paired, tuple(collected), dict(study_run.data.params))


def _class_indices(values: pd.Series, run: TrainRun, column: str) -> np.ndarray:
    lookup = {c.upper(): i for i, c in enumerate(CLASSES)}
    unknown = sorted({str(v) for v in values if str(v).upper() not in lookup})
    if unknown:
        raise PairingError(
            f"{schema.ARTIFACT_PREDICTIONS} of {run.label()}: column {column} has unknown classes "
            f"{unknown}; allowed: {', '.join(CLASSES)}"
        )
    return np.array([lookup[str(v).upper()] for v in values], dtype=np.int64)


def read_predictions(path: Path, run: TrainRun) -> pd.DataFrame:
    """One run's test_predictions.csv, checked against the schema and sorted by relpath."""
    frame = pd.read_csv(path, dtype={schema.COL_RELPATH: str, schema.COL_SHA256: str})
    missing = [c for c in schema.PREDICTION_COLUMNS if c not in frame.columns]
    if missing:
        raise PairingError(f"{schema.ARTIFACT_PREDICTIONS} of {run.label()} lacks columns {missing}")
    if frame.empty:
        raise PairingError(f"{schema.ARTIFACT_PREDICTIONS} of {run.label()} has no rows")
    doubled = frame[schema.COL_RELPATH][frame[schema.COL_RELPATH].duplicated()].tolist()
    if doubled:
        raise PairingError(f"{schema.ARTIFACT_PREDICTIONS} of {run.label()} lists images twice: {doubled[:5]}")
    return frame.sort_values(schema.COL_RELPATH, kind="stable").reset_index(drop=True)


def load_predictions(client: MlflowClient, pairs: StudyPairs) -> TestPredictions:
    """Download every paired run's predictions and align them on the shared test set."""
    from mlflow.exceptions import MlflowException

    reference: tuple[TrainRun, pd.DataFrame] | None = None
    predicted: dict[str, list[np.ndarray]] = {a: [] for a in pairs.archs}
    probabilities: dict[str, list[np.ndarray]] = {a: [] for a in pairs.archs}
    with tempfile.TemporaryDirectory(prefix="ecg-analysis-") as tmp:
        for arch in pairs.archs:
            for run in pairs.runs[arch]:
                try:
                    local = client.download_artifacts(run.run_id, schema.ARTIFACT_PREDICTIONS, str(Path(tmp) / run.run_id))
                except (MlflowException, OSError) as error:
                    raise PairingError(f"{run.label()} has no {schema.ARTIFACT_PREDICTIONS} artifact") from error
                frame = read_predictions(Path(local), run)
                if reference is None:
                    reference = (run, frame)
                else:
                    _check_same_test_set(reference, (run, frame))
                predicted[arch].append(_class_indices(frame[schema.COL_PRED], run, schema.COL_PRED))
                probabilities[arch].append(frame[list(schema.PROB_COLUMNS)].to_numpy(dtype=float))
    if reference is None:
        raise PairingError(f"study run {pairs.study_run_id} has no paired train runs to load")
    ref_run, ref_frame = reference
    return TestPredictions(
        relpaths=tuple(ref_frame[schema.COL_RELPATH]),
        true=_class_indices(ref_frame[schema.COL_TRUE], ref_run, schema.COL_TRUE),
        predicted={a: np.stack(v) for a, v in predicted.items()},
        probabilities={a: np.stack(v) for a, v in probabilities.items()},
    )


def _check_same_test_set(reference: tuple[TrainRun, pd.DataFrame], other: tuple[TrainRun, pd.DataFrame]) -> None:
    (ref_run, ref), (run, frame) = reference, other
    columns = [schema.COL_RELPATH, schema.COL_SHA256, schema.COL_TRUE]
    if len(ref) != len(frame) or not ref[columns].astype(str).equals(frame[columns].astype(str)):
        raise PairingError(
            f"{run.label()} was scored on a different test set than {ref_run.label()} "
            f"({len(frame)} vs {len(ref)} images, or different relpath/sha256/true_class): "
            f"image-level tests need one shared test set"
        )
