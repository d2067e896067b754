"""The study: the arch x seed grid as child runs of one parent run, resumable.

Every (arch, seed) pair trains through `train_and_log` in this process, so each
backbone's features come from the cache after its first seed. A study is identified by
its key: the data digest, the backbones and every training parameter except the seed
(and where data and cache live). Rerunning a study with the same key opens a new parent
run and adopts the FINISHED child runs of earlier parents with that key instead of
training them again; only missing or failed pairs train.
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
from ecg_mlflow.data.manifest import Manifest
from ecg_mlflow.tracking.search import filter_quote



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


def study_key(archs: Sequence[str], config: TrainConfig, data_digest: str) -> str:
    """Identity of a study: same key, same experiment (seeds may be added)."""
    params = {k: v for k, v in config.as_params().items() if k not in schema.STUDY_KEY_EXEMPT_PARAMS
              and schema.PRE_ENGINE_PARAMS.get(k) != v}
    params["head_config"] = head_config_digest(config)  # the head's content, not the file's path
    blob = json.dumps({"archs": list(archs), "params": params, "data": data_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


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
) -> StudyOutcome:
    """Train every missing (arch, seed) pair as a child of the ACTIVE run (the parent)."""
    import mlflow

    from ecg_mlflow.tracking.runs import end_run_on_error
    from ecg_mlflow.tracking.server import is_unreachable, unavailable_error
    from ecg_mlflow.tracking.params import log_unlogged_params
    from ecg_mlflow.train import run_name, train_and_log

    parent = mlflow.active_run()
    if parent is None:
        raise RuntimeError("run_study needs an active MLflow parent run")
    client = mlflow.MlflowClient()
    parent_id = parent.info.run_id
    key = study_key(archs, base, manifest.digest)
    mlflow.set_tags({schema.TAG_ROLE: schema.ROLE_STUDY, schema.TAG_STUDY_KEY: key})
    params = {**base.as_params(), schema.PARAM_ARCHS: ",".join(archs), schema.PARAM_SEEDS: ",".join(map(str, seeds)),
              schema.PARAM_DATA_DIGEST: manifest.digest}
    log_unlogged_params(parent_id, {k: v for k, v in params.items() if k not in ("arch", "seed")})

    earlier = _earlier_finished_runs(client, parent.info.experiment_id, key, parent_id)
    status = StudyProgress(total=len(archs) * len(seeds))
    trained, adopted, failed = [], [], []
    for arch in archs:  # backbone-major order: one backbone pass per image per backbone
        for seed in seeds:
            config = replace(base, arch=arch, seed=seed)
            name = run_name(config)
            if (arch, seed) in earlier:
                run = earlier[(arch, seed)]
                adopt_run(client, run, parent_id)
                adopted.append(run.info.run_id)
                status.done += 1
                say(status.line(f"{name} already finished in run {run.info.run_id}: reused"))
                continue
            start = time.perf_counter()
            tags = {schema.TAG_ROLE: schema.ROLE_TRAIN, schema.TAG_STUDY: parent_id}
            child = mlflow.start_run(run_name=name, nested=True, tags=tags)
            try:
                train_and_log(config, manifest=manifest, progress=progress)
            except BaseException as exc:
                end_run_on_error(exc)
                if isinstance(exc, KeyboardInterrupt) or not isinstance(exc, Exception):
                    raise
                if is_unreachable(exc):  # one failed pair must not lose the others, but
                    raise unavailable_error(exc) from None  # without a server none can succeed
                failed.append((arch, seed, f"{type(exc).__name__}: {exc}"))
                status.done += 1
                say(status.line(f"{name} FAILED: {type(exc).__name__}: {exc}"))
                continue
            mlflow.end_run(status="FINISHED")
            trained.append(child.info.run_id)
            status.done += 1
            status.trained_seconds.append(time.perf_counter() - start)
            say(status.line(f"{name} finished in {status.trained_seconds[-1]:.1f} s"))
    mlflow.log_metrics({"runs_trained": len(trained), "runs_reused": len(adopted), "runs_failed": len(failed)})
    return StudyOutcome(tuple(trained), tuple(adopted), tuple(failed))
