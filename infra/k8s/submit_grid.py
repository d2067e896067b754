"""Fan the study's (arch x seed) grid out as one Kubernetes Job per cell.

    python infra/k8s/submit_grid.py --archs resnet50,efficientnetv2s --seeds 1-10 \
        [-P weights=imagenet -P split=grouped ...] [--wait] [--dry-run]

It creates the study parent run first (tag `ecg.role=study`, params `archs` and `seeds`, as the
`study` entry point does), then submits `mlflow run infra/k8s --backend kubernetes` once per
cell and tags each child run `ecg.role=train`, `ecg.study=<parent id>` and nests it under the
parent. The analysis then reads the study like any other: `ecg-mlflow analyze --study <id>`.
Run it from the project root with MLFLOW_TRACKING_URI (and MLFLOW_TRACKING_USERNAME/PASSWORD)
pointing at the team server as this machine reaches it; the Jobs reach it through the
`ecg-mlflow-tracking` Secret (see kubernetes_job_template.yaml and docs/infra.md).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

K8S_DIR = Path(__file__).resolve().parent
PROJECT_ROOT = K8S_DIR.parents[1]
DEFAULT_BACKEND_CONFIG = K8S_DIR / "kubernetes_config.json"
# Kubernetes expands $(VAR) in an env value from the variables defined before it: the
# MLFLOW_TRACKING_URI that MLflow appends becomes the Secret's URI inside the pod.
IN_CLUSTER_TRACKING_URI = "$(ECG_MLFLOW_TRACKING_URI)"
GRID_PARAMS = ("arch", "seed")


class GridError(ValueError):
    """A bad argument; the message names it."""


@dataclass(frozen=True)
class GridCell:
    """One Job of the grid."""

    arch: str
    seed: int

    @property
    def run_name(self) -> str:
        return f"{self.arch}-s{self.seed}"  # as ecg_mlflow.train.run_name names train runs

    def parameters(self, shared: dict[str, str]) -> dict[str, str]:
        return {**shared, "arch": self.arch, "seed": str(self.seed)}


def parse_archs(raw: str) -> tuple[str, ...]:
    """`"resnet50,efficientnetv2s"` -> names, checked against the backbone registry."""
    from ecg_mlflow.config import ConfigError
    from ecg_mlflow.study import parse_archs as project_parse_archs

    try:
        return project_parse_archs(raw)
    except ConfigError as exc:
        raise GridError(f"--{exc}") from None


def parse_seeds(raw: str) -> tuple[int, ...]:
    """`"1-10"`, `"1,2,5"` or `"1-3,7"` -> sorted distinct seeds (the project's parser)."""
    from ecg_mlflow.config import ConfigError
    from ecg_mlflow.config import parse_seeds as project_parse_seeds

    try:
        return project_parse_seeds(raw, name="--seeds")
    except ConfigError as exc:
        raise GridError(str(exc)) from None


def entry_point_parameters() -> tuple[str, ...]:
    """The parameters infra/k8s/MLproject's `main` declares."""
    from mlflow.projects._project_spec import load_project

    return tuple(load_project(str(K8S_DIR)).get_entry_point("main").parameters)


def parse_params(pairs: list[str]) -> dict[str, str]:
    """`-P name=value` pairs shared by every Job; names must be parameters of the entry point."""
    declared = entry_point_parameters()
    params: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise GridError(f"-P {pair!r}: write it as name=value")
        if name in GRID_PARAMS:
            raise GridError(f"-P {name}: set by the grid; use --archs / --seeds")
        if name not in declared:
            raise GridError(f"-P {name}: not a parameter of infra/k8s main; choose from {', '.join(declared)}")
        if value == "":
            raise GridError(f"-P {name}: empty value (MLflow's Kubernetes backend would pass it as '')")
        params[name] = value
    return params


def plan_grid(archs: tuple[str, ...], seeds: tuple[int, ...]) -> list[GridCell]:
    """Seed-major order, so the first Jobs to finish already form complete pairs."""
    return [GridCell(arch, seed) for seed in seeds for arch in archs]


def seeds_spec(seeds: tuple[int, ...]) -> str:
    return ",".join(str(s) for s in seeds)


def create_study_run(client, experiment_id: str, archs: tuple[str, ...], seeds: tuple[int, ...],
                     shared: dict[str, str]) -> str:
    """The study parent the analysis looks for: tag ecg.role=study, params archs and seeds."""
    from mlflow.entities import Param

    from ecg_mlflow import schema

    run = client.create_run(
        experiment_id,
        run_name=f"study-k8s-{'-vs-'.join(archs)}",
        tags={schema.TAG_ROLE: schema.ROLE_STUDY, "ecg.backend": "kubernetes"},
    )
    params = {"archs": ",".join(archs), "seeds": seeds_spec(seeds), **shared}
    client.log_batch(run.info.run_id, params=[Param(name, value) for name, value in params.items()])
    return run.info.run_id


def tag_child(client, run_id: str, study_run_id: str) -> None:
    """Make a submitted run a train run of the study, nested under the parent in the UI."""
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    from ecg_mlflow import schema

    client.set_tag(run_id, schema.TAG_ROLE, schema.ROLE_TRAIN)
    client.set_tag(run_id, schema.TAG_STUDY, study_run_id)
    client.set_tag(run_id, MLFLOW_PARENT_RUN_ID, study_run_id)


def mlflow_run_command(cell: GridCell, shared: dict[str, str], backend_config: Path, experiment_id: str) -> str:
    """The equivalent shell command, for --dry-run and for the docs."""
    words = ["mlflow", "run", str(K8S_DIR.relative_to(PROJECT_ROOT)), "--backend", "kubernetes",
             "--backend-config", str(backend_config), "--experiment-id", experiment_id,
             "--run-name", cell.run_name]
    for name, value in cell.parameters(shared).items():
        words += ["-P", f"{name}={value}"]
    return f"KUBE_MLFLOW_TRACKING_URI={shlex.quote(IN_CLUSTER_TRACKING_URI)} " + shlex.join(words)


def check_submitter() -> None:
    """MLflow's Kubernetes backend needs the docker and kubernetes Python packages here."""
    missing = []
    for module in ("docker", "kubernetes"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise GridError(
            f"the kubernetes backend needs the Python package(s) {', '.join(missing)} on the "
            f"submitting machine: pip install {' '.join(missing)} (and a docker daemon, kubectl context)"
        )


def submit(cells: list[GridCell], shared: dict[str, str], backend_config: Path, experiment_id: str,
           study_run_id: str, client, cluster_tracking_uri: str) -> list:
    """Submit every cell asynchronously; return MLflow's SubmittedRun objects."""
    import mlflow.projects

    os.environ["KUBE_MLFLOW_TRACKING_URI"] = cluster_tracking_uri
    submitted = []
    for cell in cells:
        job = mlflow.projects.run(
            str(K8S_DIR),
            entry_point="main",
            parameters=cell.parameters(shared),
            experiment_id=experiment_id,
            backend="kubernetes",
            backend_config=str(backend_config),
            synchronous=False,
            run_name=cell.run_name,
        )
        tag_child(client, job.run_id, study_run_id)
        print(f"{cell.run_name}\t{job.run_id}", flush=True)
        submitted.append(job)
    return submitted


def main(argv: list[str] | None = None) -> int:
    from ecg_mlflow import schema

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--archs", required=True, help="comma-separated backbones")
    parser.add_argument("--seeds", required=True, help="e.g. 1-10 or 1,2,5")
    parser.add_argument("-P", dest="params", action="append", default=[], metavar="NAME=VALUE",
                        help="a parameter of infra/k8s main shared by every Job")
    parser.add_argument("--experiment", default=schema.DEFAULT_EXPERIMENT)
    parser.add_argument("--backend-config", type=Path, default=DEFAULT_BACKEND_CONFIG)
    parser.add_argument("--cluster-tracking-uri", default=IN_CLUSTER_TRACKING_URI,
                        help="MLFLOW_TRACKING_URI inside the pods (default: from the Secret)")
    parser.add_argument("--wait", action="store_true", help="wait for every Job, then close the study run")
    parser.add_argument("--dry-run", action="store_true", help="print the submissions, touch nothing")
    args = parser.parse_args(argv)
    try:
        archs, seeds = parse_archs(args.archs), parse_seeds(args.seeds)
        shared = parse_params(args.params)
        if not args.backend_config.is_file():
            raise GridError(f"--backend-config: {args.backend_config} not found")
        cells = plan_grid(archs, seeds)
        if args.dry_run:
            for cell in cells:
                print(mlflow_run_command(cell, shared, args.backend_config, "<experiment id>"))
            return 0
        check_submitter()
    except GridError as exc:
        print(f"submit_grid: {exc}", file=sys.stderr)
        return 2

    from mlflow import MlflowClient

    client = MlflowClient()
    experiment = client.get_experiment_by_name(args.experiment)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(args.experiment)
    study_run_id = create_study_run(client, experiment_id, archs, seeds, shared)
    print(f"study run {study_run_id}: {len(cells)} Jobs", flush=True)
    jobs = submit(cells, shared, args.backend_config, experiment_id, study_run_id, client, args.cluster_tracking_uri)
    if not args.wait:
        print(f"submitted; when the Jobs are done: ecg-mlflow analyze --study {study_run_id}")
        return 0
    ok = all(job.wait() for job in jobs)
    client.set_terminated(study_run_id, "FINISHED" if ok else "FAILED")
    print(f"study run {study_run_id} {'finished' if ok else 'FAILED (see the failed Jobs)'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
