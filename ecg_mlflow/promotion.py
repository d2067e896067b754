"""Promotion: from an analysis run to the registry's `champion`, only when the statistics say so.

`plan_promotion` reads the analysis run (tags `significant_<metric>`, `winner_<metric>`),
refuses a difference that is not significant after Bonferroni (unless forced), and picks
the winning backbone's train run with the best VALIDATION metric: the test set already
decided the comparison, so choosing a seed by it would report an optimistic test score.
`register_version` and `move_champion` change the registry; none of these open a run.

After a cross-validated study (analysis param `cv` > 0) no train run of the study is the model
to serve: each fold's model saw (k-1)/k of the images and was scored on the folds that decided
the comparison. The plan then names a FINAL model instead: the winner trained once more with the
study's configuration on its fixed split (split policy, seed FINAL_SEED), from the feature cache
the study filled. `train_final_model` trains it as a train run tagged `ecg.final_of` = the
analysis run; a later promotion of the same analysis reuses that run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING

from ecg_mlflow import schema
from ecg_mlflow.config import TrainConfig, resolve_train_config
from ecg_mlflow.model.engines import resolve_engine
from ecg_mlflow.parsing import ConfigError, parse_bool
from ecg_mlflow.tracking.search import (
    LATEST, RunNotFound, filter_quote, find_experiment_id, find_run_of_role, latest_run_of_role, search_all_runs,
)

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities import Run
    from mlflow.entities.model_registry import ModelVersion

REGISTERED_MODEL_DESCRIPTION = (
    "ECG report image classifier (myocardial infarction, history of MI, abnormal heartbeat, "
    "normal). Input: DataFrame with an `image` column (JPEG/PNG bytes; base64 in JSON, at most "
    "32 rows per request by default). "
    "Output per image: `label` and `prob_mi`, `prob_hmi`, `prob_ahb`, `prob_norm`. "
    f"Alias `{schema.CHAMPION_ALIAS}` is the promoted model, `{schema.PREVIOUS_CHAMPION_ALIAS}` "
    "the one it replaced."
)


FINAL_SEED = 1
"""Seed of the final model trained after a cross-validated study."""
TAG_FINAL_OF = "ecg.final_of"
"""On a final model's train run: the analysis run of the cross-validated study it serves."""


class PromotionError(ValueError):
    """The analysis run, the study's runs or a parameter cannot be used; says which."""


class PromotionRefused(PromotionError):
    """The analysis did not find the winner significantly better; the message says why."""


@dataclass(frozen=True)
class PromotionPlan:
    """Everything `promote` decided before touching the registry."""

    model_name: str
    metric: str
    analysis_run_id: str
    study_run_id: str
    arch: str
    other_arch: str
    significant: bool
    forced: bool
    p_values: dict[str, float]
    """Every p-value the analysis logged (`<metric>_p_bonferroni`, `accuracy_p_mcnemar`, ...)."""
    source_run_id: str
    source_params: dict[str, str]
    source_metrics: dict[str, float]
    n_candidates: int
    existing_version: str | None = None
    """The version that already serves `source_run_id`, if any (no new version then)."""
    notes: tuple[str, ...] = field(default=())
    final_config: TrainConfig | None = None
    """After a cross-validated study: what the final model trains with (else None)."""
    cv: int = 0

    @property
    def needs_training(self) -> bool:
        """A final model is due and none was trained for this analysis yet."""
        return self.final_config is not None and not self.source_run_id

    @property
    def p_bonferroni(self) -> float | None:
        return self.p_values.get(schema.stat_metric(self.metric, schema.STAT_P_BONFERRONI))

    @property
    def val_metric(self) -> str:
        return schema.split_metric("val", self.metric)

    @property
    def seed(self) -> str:
        return self.source_params.get("seed", "?")


def parse_metric(raw: str) -> str:
    metric = str(raw).strip()
    if metric not in schema.SUMMARY_METRICS:
        raise ConfigError(f"metric must be one of {', '.join(schema.SUMMARY_METRICS)}; got {raw!r}")
    return metric


def parse_force(raw: str | bool) -> bool:
    """parse_bool, taking an empty value as false."""
    if not str(raw).strip():
        return False
    return parse_bool("force", raw)


def parse_model_name(raw: str) -> str:
    name = str(raw).strip()
    if not name or "/" in name or ":" in name or "@" in name:
        raise ConfigError(f"model_name must be a plain registered model name (no / : @), got {raw!r}")
    return name


def find_analysis_run(client: MlflowClient, experiment: str, analysis_run: str = LATEST) -> Run:
    """The newest finished analysis run of `experiment`, or the run `analysis_run` (checked)."""
    try:
        experiment_id = find_experiment_id(client, experiment)
    except RunNotFound as exc:
        raise PromotionError(f"experiment: {exc}") from None
    analysis_run = str(analysis_run).strip()
    if analysis_run == LATEST:
        run = latest_run_of_role(client, experiment_id, schema.ROLE_ANALYSIS, finished=True)
        if run is None:
            raise PromotionError(
                f"analysis_run: no finished analysis run (tag {schema.TAG_ROLE}={schema.ROLE_ANALYSIS}) "
                f"in experiment {experiment!r}; run `ecg-mlflow analyze` first"
            )
        return run
    try:
        run = find_run_of_role(client, experiment_id, analysis_run, schema.ROLE_ANALYSIS)
    except RunNotFound as exc:
        raise PromotionError(f"analysis_run: {exc}") from None
    if run.info.status != "FINISHED":
        raise PromotionError(f"analysis_run: run {analysis_run} is {run.info.status}, not FINISHED")
    return run


def _p_values(run: Run) -> dict[str, float]:
    return {k: v for k, v in run.data.metrics.items() if "_p_" in k and math.isfinite(v)}


def check_significance(run: Run, metric: str, force: bool) -> tuple[str, str, bool]:
    """(winner, other, significant) of `metric`; PromotionRefused unless significant or forced."""
    tags, params = run.data.tags, run.data.params
    run_id = run.info.run_id
    winner = tags.get(schema.winner_tag(metric))
    significant = tags.get(schema.significant_tag(metric))
    if winner is None or significant is None:
        analysed = params.get(schema.PARAM_METRICS, "(unknown)")
        raise PromotionError(
            f"metric: analysis run {run_id} did not analyse {metric!r} (analysed: {analysed}); "
            f"rerun `ecg-mlflow analyze --metrics {metric},...` or pick one of those"
        )
    archs = [a.strip() for a in params.get(schema.PARAM_ARCHS, "").split(",") if a.strip()]
    others = [a for a in archs if a != winner]
    other = others[0] if others else "the other backbone"
    is_significant = significant == "true"
    if not is_significant and not force:
        p = run.data.metrics.get(schema.stat_metric(metric, schema.STAT_P_BONFERRONI))
        alpha = params.get(schema.PARAM_ALPHA, "0.05")
        p_text = f"Bonferroni-adjusted p = {p:.4g}" if p is not None else "no finite p-value"
        raise PromotionRefused(
            f"not promoting: analysis run {run_id} found no significant difference in {metric} "
            f"between {winner} and {other} ({p_text}, alpha {alpha}). The higher mean alone is "
            f"no evidence; pass force=true (--force) to promote {winner} anyway"
        )
    return winner, other, is_significant


def select_source_run(client: MlflowClient, experiment_id: str, study_run_id: str, arch: str, metric: str) -> tuple[Run, int]:
    """The study's finished train run of `arch` with the best validation `metric` (ties:
    lower validation loss, then the earlier run); also how many runs competed."""
    val_key = schema.split_metric("val", metric)
    filter_string = (
        f"tags.`{schema.TAG_ROLE}` = {filter_quote(schema.ROLE_TRAIN)} and "
        f"tags.`{schema.TAG_STUDY}` = {filter_quote(study_run_id)} and "
        f"params.arch = {filter_quote(arch)} and attributes.status = 'FINISHED'"
    )
    runs = [r for r in search_all_runs(client, experiment_id, filter_string) if val_key in r.data.metrics]
    if not runs:
        raise PromotionError(
            f"study {study_run_id} has no finished train run of {arch} with metric {val_key!r}"
        )
    val_loss = schema.split_metric("val", "loss")

    def rank(run: Run):
        m = run.data.metrics
        return (-m[val_key], m.get(val_loss, math.inf), run.info.start_time or 0, run.info.run_id)

    best = min(runs, key=rank)
    if best.data.params.get("log_model", "true") == "false":
        raise PromotionError(
            f"run {best.info.run_id} ({arch}, seed {best.data.params.get('seed')}) has the best "
            f"{val_key} but was trained with log_model=false: there is no model to serve"
        )
    return best, len(runs)


def existing_version(client: MlflowClient, model_name: str, source_run_id: str) -> str | None:
    """The registered version that already serves `source_run_id`, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = {filter_quote(model_name)}")
    except MlflowException:
        return None
    found = [v.version for v in versions if v.tags.get(schema.TAG_SOURCE_RUN) == source_run_id]
    return str(min(found, key=int)) if found else None


def plan_promotion(
    client: MlflowClient | None = None,
    experiment: str = schema.DEFAULT_EXPERIMENT,
    analysis_run: str = LATEST,
    metric: str = "accuracy",
    model_name: str = schema.DEFAULT_MODEL_NAME,
    force: bool | str = False,
) -> PromotionPlan:
    """Decide what to promote; PromotionRefused when the analysis does not support it."""
    from mlflow import MlflowClient

    client = client or MlflowClient()
    metric = parse_metric(metric)
    force = parse_force(force)
    model_name = parse_model_name(model_name)
    run = find_analysis_run(client, experiment, analysis_run)
    winner, other, significant = check_significance(run, metric, force)
    study = run.data.params.get(schema.PARAM_STUDY_RUN_ID) or run.data.tags.get(schema.TAG_STUDY)
    if not study:
        raise PromotionError(f"analysis run {run.info.run_id} names no study ({schema.PARAM_STUDY_RUN_ID})")
    notes = () if significant else (f"forced: {metric} difference not significant",)
    folds = cv_folds(run)
    if folds:
        return plan_final_model(client, run, study, winner, other, metric, model_name, significant, force, notes)
    source, n = select_source_run(client, run.info.experiment_id, study, winner, metric)
    return PromotionPlan(
        model_name=model_name, metric=metric, analysis_run_id=run.info.run_id, study_run_id=study,
        arch=winner, other_arch=other, significant=significant, forced=force and not significant,
        p_values=_p_values(run),
        source_run_id=source.info.run_id, source_params=dict(source.data.params),
        source_metrics=dict(source.data.metrics), n_candidates=n,
        existing_version=existing_version(client, model_name, source.info.run_id), notes=notes,
    )


def cv_folds(analysis: Run) -> int:
    """Folds of the study an analysis run analysed (0: the fixed split)."""
    try:
        return int(analysis.data.params.get(schema.PARAM_CV, "0") or 0)
    except ValueError:
        raise PromotionError(f"analysis run {analysis.info.run_id} has a non-integer param "
                             f"{schema.PARAM_CV}={analysis.data.params[schema.PARAM_CV]!r}") from None


def final_config(client: MlflowClient, study_run_id: str, arch: str) -> TrainConfig:
    """The study's training configuration for `arch` and FINAL_SEED, from the study run's params."""
    params = client.get_run(study_run_id).data.params
    raw = {f.name: params[f.name] for f in fields(TrainConfig) if f.name in params and f.name not in ("arch", "seed")}
    try:
        config = resolve_train_config(arch=arch, seed=str(FINAL_SEED), **raw)
    except ConfigError as exc:
        raise PromotionError(f"study run {study_run_id}: its configuration cannot be trained again: {exc}") from None
    return replace(config, log_model=True)  # the fold models need none; the served model does


def final_command(config: TrainConfig, experiment: str) -> str:
    """The `ecg-mlflow train` line that trains the same final model by hand."""
    import shlex

    words = ["ecg-mlflow", "train"]
    for key, value in config.as_params().items():
        if value != "":
            words += ["--" + key.replace("_", "-"), value]
    return shlex.join(words + ["--experiment", experiment])


def find_final_run(client: MlflowClient, experiment_id: str, analysis_run_id: str, arch: str) -> Run | None:
    """The finished final model of `arch` trained for this analysis, if any (the newest)."""
    runs = search_all_runs(client, experiment_id, (
        f"tags.`{TAG_FINAL_OF}` = {filter_quote(analysis_run_id)} and params.arch = {filter_quote(arch)} and "
        f"attributes.status = 'FINISHED'"))
    return max(runs, key=lambda r: r.info.start_time or 0) if runs else None


def plan_final_model(client: MlflowClient, run: Run, study: str, winner: str, other: str, metric: str,
                     model_name: str, significant: bool, force: bool, notes: tuple[str, ...]) -> PromotionPlan:
    """The plan after a cross-validated study: the winner's final model, trained or to train."""
    config = final_config(client, study, winner)
    final = find_final_run(client, run.info.experiment_id, run.info.run_id, winner)
    folds = cv_folds(run)
    notes = notes + (f"cross-validated study ({folds} folds): promoting a final {winner} model trained with the "
                     f"study's configuration on its fixed split, seed {FINAL_SEED}",)
    return PromotionPlan(
        model_name=model_name, metric=metric, analysis_run_id=run.info.run_id, study_run_id=study,
        arch=winner, other_arch=other, significant=significant, forced=force and not significant,
        p_values=_p_values(run), source_run_id=final.info.run_id if final else "",
        source_params=dict(final.data.params) if final else config.as_params(),
        source_metrics=dict(final.data.metrics) if final else {}, n_candidates=0,
        existing_version=existing_version(client, model_name, final.info.run_id) if final else None,
        notes=notes, final_config=config, cv=folds,
    )


def train_final_model(plan: PromotionPlan, *, progress: bool = True) -> PromotionPlan:
    """Train the plan's final model as a nested train run of the active (promote) run; the
    plan with that run as its source."""
    import mlflow

    from ecg_mlflow.tracking.runs import end_run_on_error
    from ecg_mlflow.train import load_dataset, run_name, train_and_log

    config = plan.final_config
    if config is None:
        raise PromotionError("this promotion needs no final model: its study was not cross-validated")
    manifest = load_dataset(config.data, progress=progress)
    tags = {schema.TAG_ROLE: schema.ROLE_TRAIN, TAG_FINAL_OF: plan.analysis_run_id}
    run = mlflow.start_run(run_name=f"{run_name(config)}-final", nested=True, tags=tags)
    try:
        result = train_and_log(config, manifest=manifest, progress=progress)
    except BaseException as exc:
        end_run_on_error(exc)
        raise
    mlflow.end_run(status="FINISHED")
    params = mlflow.MlflowClient().get_run(run.info.run_id).data.params
    return replace(plan, source_run_id=run.info.run_id, source_params=dict(params), source_metrics=dict(result.metrics))


def served_engine_tags(source_params: dict[str, str]) -> dict[str, str]:
    """The engine and precision the served model loads with on this host: the recorded ones
    (runs from before engines: Keras fp32), or what this host falls back to."""
    choice = resolve_engine(source_params.get(schema.PARAM_ENGINE, "keras"),
                            source_params.get(schema.PARAM_PRECISION, "fp32"))
    return {schema.TAG_SERVED_ENGINE: choice.engine, schema.TAG_SERVED_PRECISION: choice.precision}


def version_tags(plan: PromotionPlan, promote_run_id: str) -> dict[str, str]:
    """Tags of the new version: provenance, backbone, preprocessing, p-values, test metrics."""
    tags = {
        schema.TAG_SOURCE_RUN: plan.source_run_id,
        "analysis_run_id": plan.analysis_run_id,
        "study_run_id": plan.study_run_id,
        "promote_run_id": promote_run_id,
        "arch": plan.arch,
        "seed": plan.seed,
        "promotion_metric": plan.metric,
        "significant": str(plan.significant).lower(),
        "forced": str(plan.forced).lower(),
    }
    for key in ("image_height", "image_width", "crop", "weights", "split", schema.PARAM_DATA_DIGEST,
                schema.PARAM_ENGINE, schema.PARAM_PRECISION):
        if key in plan.source_params:
            tags[key] = plan.source_params[key]
    tags.update(served_engine_tags(plan.source_params))
    tags.update({k: f"{v:.6g}" for k, v in sorted(plan.p_values.items())})
    for metric in schema.SUMMARY_METRICS + ("roc_auc_macro",):
        for split in schema.EVAL_SPLITS:
            key = schema.split_metric(split, metric)
            if key in plan.source_metrics:
                tags[key] = f"{plan.source_metrics[key]:.6g}"
    return tags


def version_description(plan: PromotionPlan) -> str:
    """A few sentences a reader of the registry UI needs: what, why, how good."""
    m = plan.source_metrics
    test = ", ".join(
        f"{metric} {m[schema.split_metric('test', metric)]:.3f}"
        for metric in schema.SUMMARY_METRICS if schema.split_metric("test", metric) in m
    )
    p = plan.p_bonferroni
    p_text = f"Bonferroni-adjusted p = {p:.3g}" if p is not None else "no finite p-value"
    verdict = (
        f"significantly better than {plan.other_arch} on {plan.metric} ({p_text})"
        if plan.significant else
        f"NOT significantly better than {plan.other_arch} on {plan.metric} ({p_text}); promoted with force"
    )
    size = f"{plan.source_params.get('image_height', '?')}x{plan.source_params.get('image_width', '?')}"
    chosen = (
        f"After the {plan.cv}-fold cross-validation this final model was trained with the study's "
        f"configuration on its fixed split (seed {plan.seed}); the cross-validated estimate is the "
        f"study's, this test set took part in the comparison."
        if plan.cv else
        f"This seed had the best validation {plan.metric} ({m.get(plan.val_metric, float('nan')):.3f}) of "
        f"{plan.n_candidates} {plan.arch} runs."
    )
    return (
        f"{plan.arch} (seed {plan.seed}, train run {plan.source_run_id}): {verdict}, according to "
        f"analysis run {plan.analysis_run_id} of study {plan.study_run_id}. {chosen} Test set: {test}. Input images are resized to "
        f"{size} (crop {plan.source_params.get('crop', 'none')}), weights "
        f"{plan.source_params.get('weights', '?')}."
    )


def register_version(client: MlflowClient, plan: PromotionPlan, model_uri: str, promote_run_id: str) -> ModelVersion:
    """Register `model_uri` under plan.model_name with tags and description."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        registered = client.get_registered_model(plan.model_name)
    except MlflowException:
        registered = client.create_registered_model(plan.model_name, description=REGISTERED_MODEL_DESCRIPTION)
    if not registered.description:
        client.update_registered_model(plan.model_name, description=REGISTERED_MODEL_DESCRIPTION)
    version = mlflow.register_model(model_uri, plan.model_name, tags=version_tags(plan, promote_run_id))
    return client.update_model_version(plan.model_name, version.version, description=version_description(plan))


@dataclass(frozen=True)
class AliasMove:
    """What `move_champion` did: the version it replaced (if any), and whether it moved."""

    previous: str | None
    changed: bool


def move_champion(client: MlflowClient, model_name: str, version: str) -> AliasMove:
    """Point `champion` at `version` and `previous-champion` at the version it replaces."""
    from mlflow.exceptions import MlflowException

    try:
        current = client.get_model_version_by_alias(model_name, schema.CHAMPION_ALIAS).version
    except MlflowException:
        current = None
    if current is not None and str(current) == str(version):
        return AliasMove(None, False)
    if current is not None:
        client.set_registered_model_alias(model_name, schema.PREVIOUS_CHAMPION_ALIAS, str(current))
    client.set_registered_model_alias(model_name, schema.CHAMPION_ALIAS, str(version))
    return AliasMove(str(current) if current is not None else None, True)
