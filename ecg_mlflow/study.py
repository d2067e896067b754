"""The study: the arch x seed grid as child runs of one parent run, resumable.

Per backbone, the missing seeds are prepared (features from the cache after the first);
after the last backbone's pass their heads train together in child processes, a
backbone's seeds split between as many processes as there are cores, and as each
process finishes its seeds are logged, each as its own child run exactly as
`train_and_log` logs one, while the others train on. A study is identified by its key:
the data digest, the backbones and every training parameter except the seed (and where
data and cache live). Rerunning a study with the same key opens a new parent run and
adopts the FINISHED child runs of earlier parents with that key instead of training them
again; only missing or failed pairs train.

With `cv` > 0 the grid is (arch, repeat, fold) instead of (arch, seed): every image is tested
once per repeat (see ecg_mlflow.data.folds for the folds and the seed of each cell), the child
runs are tagged `ecg.repeat` and `ecg.fold`, and cv and cv_repeats are part of the key.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

from ecg_mlflow import schema
from ecg_mlflow.model.backbones import BACKBONES
from ecg_mlflow.config import ConfigError, TrainConfig, head_config_digest, parse_seeds  # noqa: F401 (re-exported)
from ecg_mlflow.data.folds import Fold, make_folds
from ecg_mlflow.data.manifest import Manifest
from ecg_mlflow.parsing import parse_int
from ecg_mlflow.tracking.search import filter_quote
from ecg_mlflow.train import run_name



def parse_archs(text: str) -> tuple[str, ...]:
    """'resnet50,efficientnetv2s' -> the backbones in the given order (the order defines
    the sign of the analysis' differences: first minus second)."""
    archs = tuple(a.strip() for a in str(text).split(",") if a.strip())
    unknown = [a for a in archs if a not in BACKBONES]
    if not archs or unknown or len(set(archs)) != len(archs):
        raise ConfigError(
            f"archs must be distinct backbones among {', '.join(BACKBONES)}; got {text!r}"
        )
    return archs


MAX_FOLDS = 100
MAX_REPEATS = 100


def parse_cv(raw) -> int:
    """Folds of the cross-validation: 0 (the fixed split, as the paper) or 2..MAX_FOLDS."""
    folds = parse_int(schema.PARAM_CV, raw, minimum=0, maximum=MAX_FOLDS)
    if folds == 1:
        raise ConfigError(f"cv must be 0 (the fixed split) or at least 2 folds, got {raw!r}")
    return folds


def parse_cv_repeats(raw) -> int:
    return parse_int(schema.PARAM_CV_REPEATS, raw, minimum=1, maximum=MAX_REPEATS)


def study_key(archs: Sequence[str], config: TrainConfig, data_digest: str, cv: int = 0, cv_repeats: int = 1) -> str:
    """Identity of a study: same key, same experiment (seeds may be added). A fixed-split
    study (cv = 0) keeps the key it had before cross-validation existed."""
    params = {k: v for k, v in config.as_params().items() if k not in schema.STUDY_KEY_EXEMPT_PARAMS
              and schema.PRE_ENGINE_PARAMS.get(k) != v}
    params["head_config"] = head_config_digest(config)  # the head's content, not the file's path
    if cv:
        params.update({schema.PARAM_CV: str(cv), schema.PARAM_CV_REPEATS: str(cv_repeats)})
    blob = json.dumps({"archs": list(archs), "params": params, "data": data_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class StudyCell:
    """One child run of the grid: a backbone, its seed and, in a cross-validation, its fold."""

    arch: str
    seed: int
    fold: Fold | None = None

    def name_suffix(self) -> str:
        """What follows the run name `resnet50-s3`: `-r0-f2` for fold 2 of repeat 0."""
        return "" if self.fold is None else f"-r{self.fold.repeat}-f{self.fold.fold}"

    def config(self, base: TrainConfig) -> TrainConfig:
        return replace(base, arch=self.arch, seed=self.seed)

    def run_name(self) -> str:
        """`resnet50-s3`, and `resnet50-s3-r0-f2` for fold 2 of repeat 0."""
        return run_name(TrainConfig(arch=self.arch, seed=self.seed)) + self.name_suffix()

    def tags(self) -> dict[str, str]:
        if self.fold is None:
            return {}
        return {schema.TAG_REPEAT: str(self.fold.repeat), schema.TAG_FOLD: str(self.fold.fold)}


def study_cells(archs: Sequence[str], seeds: Sequence[int], manifest: Manifest, policy: str,
                cv: int = 0, cv_repeats: int = 1) -> list[StudyCell]:
    """The grid in training order (backbone-major: one backbone pass per image per backbone);
    with cv > 0 the seeds are those of the (repeat, fold) cells. ConfigError names cv."""
    if not cv:
        return [StudyCell(arch, seed) for arch in archs for seed in seeds]
    try:
        folds = make_folds(manifest, policy, cv, cv_repeats)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    return [StudyCell(arch, fold.seed, fold) for arch in archs for fold in folds]


@dataclass
class StudyProgress:
    """Runs done and an estimate of the time left, from the pairs trained so far."""

    total: int
    done: int = 0
    trained_seconds: list[float] = field(default_factory=list)

    def line(self, what: str) -> str:
        left = self.total - self.done
        if self.trained_seconds and left:
            eta = left * sum(self.trained_seconds) / len(self.trained_seconds)
            return f"[{self.done}/{self.total}] {what}; about {eta:.0f} s left"
        return f"[{self.done}/{self.total}] {what}"


@dataclass(frozen=True)
class StudyOutcome:
    trained: tuple[str, ...]  # run ids trained now
    adopted: tuple[str, ...]  # finished run ids taken over from earlier parents
    failed: tuple[tuple[str, int, str], ...]  # (arch, seed, error)


def _earlier_finished_runs(client, experiment_id: str, key: str, parent_id: str) -> dict[tuple[str, int], object]:
    """Latest FINISHED train run per (arch, seed) under earlier parents with this key."""
    parents = client.search_runs(
        [experiment_id],
        filter_string=(f"tags.`{schema.TAG_STUDY_KEY}` = {filter_quote(key)} and "
                       f"tags.`{schema.TAG_ROLE}` = {filter_quote(schema.ROLE_STUDY)}"),
        max_results=1000,
    )
    found: dict[tuple[str, int], object] = {}
    for parent in parents:
        if parent.info.run_id == parent_id:
            continue
        children = client.search_runs(
            [experiment_id],
            filter_string=(
                f"tags.`{schema.TAG_STUDY}` = {filter_quote(parent.info.run_id)} and "
                f"tags.`{schema.TAG_ROLE}` = {filter_quote(schema.ROLE_TRAIN)} and attributes.status = 'FINISHED'"
            ),
            max_results=5000,
        )
        for run in children:
            pair = (run.data.params.get("arch"), int(run.data.params.get("seed", -1)))
            if pair not in found or run.info.start_time > found[pair].info.start_time:
                found[pair] = run
    return found


def adopt_run(client, run, parent_id: str) -> None:
    """Move a finished child run under the current study parent (tags are mutable)."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    old_parent = run.data.tags.get(schema.TAG_STUDY, "")
    client.set_tag(run.info.run_id, schema.TAG_STUDY, parent_id)
    client.set_tag(run.info.run_id, MLFLOW_PARENT_RUN_ID, parent_id)
    client.set_tag(run.info.run_id, schema.TAG_ADOPTED_FROM, old_parent)
    if old_parent:
        client.set_tag(old_parent, schema.TAG_SUPERSEDED_BY, parent_id)


def run_study(
    archs: Sequence[str],
    seeds: Sequence[int],
    base: TrainConfig,
    manifest: Manifest,
    *,
    say: Callable[[str], None] = print,
    progress: bool = True,
    cv: int = 0,
    cv_repeats: int = 1,
) -> StudyOutcome:
    """Train every missing (arch, seed) pair, or with cv > 0 every missing (arch, repeat,
    fold) cell, as a child of the ACTIVE run (the parent)."""
    import mlflow

    from ecg_mlflow.tracking.params import log_unlogged_params

    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("run_study needs an active MLflow parent run")
    client = mlflow.MlflowClient()
    parent_id = parent.info.run_id
    cells = study_cells(archs, seeds, manifest, base.split, cv, cv_repeats)
    key = study_key(archs, base, manifest.digest, cv, cv_repeats)
    mlflow.set_tags({schema.TAG_ROLE: schema.ROLE_STUDY, schema.TAG_STUDY_KEY: key})
    cell_seeds = sorted({cell.seed for cell in cells})
    params = {**base.as_params(), schema.PARAM_ARCHS: ",".join(archs), schema.PARAM_SEEDS: ",".join(map(str, cell_seeds)),
              schema.PARAM_DATA_DIGEST: manifest.digest, schema.PARAM_CV: str(cv),
              schema.PARAM_CV_REPEATS: str(cv_repeats)}
    log_unlogged_params(parent_id, {k: v for k, v in params.items() if k not in ("arch", "seed")})

    earlier = _earlier_finished_runs(client, parent.info.experiment_id, key, parent_id)
    status = StudyProgress(total=len(cells))
    outcome = _Tally(status, say, parent_id)
    prepared = []
    for arch in archs:  # backbone-major order: one backbone pass per image per backbone
        missing = []
        for cell in (c for c in cells if c.arch == arch):
            if (arch, cell.seed) in earlier:
                outcome.adopt(client, earlier[(arch, cell.seed)], cell)
            else:
                missing.append(cell)
        prepared += _prepare_cells(missing, base, manifest, outcome, progress=progress)
    _train_and_log(prepared, outcome, progress=progress)
    mlflow.log_metrics({"runs_trained": len(outcome.trained), "runs_reused": len(outcome.adopted),
                        "runs_failed": len(outcome.failed)})
    return StudyOutcome(tuple(outcome.trained), tuple(outcome.adopted), tuple(outcome.failed))


@dataclass
class _Tally:
    """What the study did so far, and the progress lines it says."""

    status: StudyProgress
    say: Callable[[str], None]
    parent_id: str
    trained: list[str] = field(default_factory=list)
    adopted: list[str] = field(default_factory=list)
    failed: list[tuple[str, int, str]] = field(default_factory=list)

    def adopt(self, client, run, cell: StudyCell) -> None:
        adopt_run(client, run, self.parent_id)
        self.adopted.append(run.info.run_id)
        self.status.done += 1
        self.say(self.status.line(f"{cell.run_name()} already finished in run {run.info.run_id}: reused"))

    def fail(self, cell: StudyCell, exc: BaseException) -> None:
        self.failed.append((cell.arch, cell.seed, f"{type(exc).__name__}: {exc}"))
        self.status.done += 1
        self.say(self.status.line(f"{cell.run_name()} FAILED: {type(exc).__name__}: {exc}"))

    def finish(self, cell: StudyCell, run_id: str, seconds: float) -> None:
        self.trained.append(run_id)
        self.status.done += 1
        self.status.trained_seconds.append(seconds)
        self.say(self.status.line(f"{cell.run_name()} finished in {seconds:.1f} s"))


def _prepare_cells(cells: Sequence[StudyCell], base: TrainConfig, manifest: Manifest, tally: _Tally, *,
                   progress: bool) -> list[tuple[StudyCell, object]]:
    """(cell, PreparedRun) of each cell: its seed's split or its fold, and the features (the
    backbone's pass for the first cell of a backbone). A cell that fails fails alone."""
    from ecg_mlflow.train import prepare_run

    prepared = []
    for cell in cells:
        try:
            prepared.append((cell, prepare_run(cell.config(base), manifest, progress=progress,
                                               split=cell.fold.split if cell.fold else None)))
        except Exception as exc:  # one failed pair must not lose the others
            _record_failed_run(cell, exc, tally)
    return prepared


def head_processes() -> int:
    """Child processes training heads at once: one per core this process may use."""
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class _CellsTraining:
    """Cells of one backbone whose heads train together in a child process."""

    prepared: list  # (StudyCell, PreparedRun)
    heads: object  # ecg_mlflow.train.HeadsTogether


def _train_and_log(prepared: list[tuple[StudyCell, object]], tally: _Tally, *, progress: bool) -> None:
    """Train the heads of every prepared cell, after all backbone passes, then log each cell
    as its own child run.

    Each backbone's seeds are dealt into head_processes() groups, and each group trains in
    a child process on one thread (model/head_process.py), head_processes() at a time. A
    group is logged as soon as it finishes, on the core its process frees, beside the
    groups still training (on 2 cores the cold study of docs/benchmarks.md took 133 s
    instead of 147 s when each backbone's heads trained on two threads in the study's
    process and its runs were logged after).
    A study killed before a group is logged logged nothing of its cells, so its rerun
    trains them again (and only them)."""
    from ecg_mlflow.model.head_process import deal, wait_for_first

    at_once = head_processes()
    groups = [group for arch in dict.fromkeys(cell.arch for cell, _ in prepared)
              for group in deal([pair for pair in prepared if pair[0].arch == arch], at_once)]
    running: list[_CellsTraining] = []
    try:
        while groups or running:
            while groups and len(running) < at_once:
                started = _start_cells(groups.pop(0), tally)
                running += [started] if started else []
            if running:
                finished = wait_for_first([training.heads.training for training in running])
                _log_cells(running.pop(finished), tally, progress=progress)
    finally:
        for training in running:  # interrupted: their runs are not logged, so a rerun trains them
            training.heads.close()


def _start_cells(prepared: list[tuple[StudyCell, object]], tally: _Tally) -> _CellsTraining | None:
    """Start training the cells' heads together; a failed start fails them."""
    from ecg_mlflow.train import start_prepared_together

    try:
        return _CellsTraining(prepared, start_prepared_together([run for _, run in prepared]))
    except Exception as exc:
        for cell, _ in prepared:
            _record_failed_run(cell, exc, tally)
        return None


def _log_cells(training: _CellsTraining, tally: _Tally, *, progress: bool) -> None:
    """Wait for the cells' heads, then log each cell as its own child run; a failed joint
    training fails the cells it trained."""
    try:
        trained = training.heads.result()
    except Exception as exc:
        for cell, _ in training.prepared:
            _record_failed_run(cell, exc, tally)
        return
    finally:
        training.heads.close()
    for (cell, run), head in zip(training.prepared, trained):
        _log_child_run(cell, run, head, tally, progress=progress)


def _start_child(cell: StudyCell, parent_id: str):
    import mlflow

    tags = {schema.TAG_ROLE: schema.ROLE_TRAIN, schema.TAG_STUDY: parent_id, **cell.tags()}
    return mlflow.start_run(run_name=cell.run_name(), nested=True, tags=tags)


def _record_failed_run(cell: StudyCell, exc: Exception, tally: _Tally) -> None:
    """A FAILED child run for a cell that could not train, so the rerun retries it."""
    _start_child(cell, tally.parent_id)
    _end_child_on_error(exc)
    tally.fail(cell, exc)


def _log_child_run(cell: StudyCell, run, trained, tally: _Tally, *, progress: bool) -> None:
    """One cell's child run, logged exactly as `train_and_log` logs a run."""
    import mlflow

    from ecg_mlflow.train import log_run_inputs, log_run_outcome

    start = time.perf_counter()
    child = _start_child(cell, tally.parent_id)
    try:
        log_run_inputs(run)
        log_run_outcome(run, trained, progress=progress)
    except BaseException as exc:
        _end_child_on_error(exc)
        tally.fail(cell, exc)
        return
    mlflow.end_run(status="FINISHED")
    tally.finish(cell, child.info.run_id, trained.seconds + time.perf_counter() - start)


def _end_child_on_error(exc: BaseException) -> None:
    """End the active child run as tracking.runs.end_run_on_error says. One failed pair must
    not lose the others, so only Ctrl-C/SIGTERM and a gone server (no pair can succeed
    without it) stop the study: those are raised again."""
    from ecg_mlflow.tracking.runs import end_run_on_error
    from ecg_mlflow.tracking.server import is_unreachable, unavailable_error

    end_run_on_error(exc)
    if not isinstance(exc, Exception):
        raise exc
    if is_unreachable(exc):
        raise unavailable_error(exc) from None
