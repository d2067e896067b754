"""Fan the feature pass out as one Indexed Kubernetes Job: N pods, pod I runs `features --shard I/N`.

    python infra/k8s/submit_features.py --arch resnet50 --shards 16 [--parallelism 8] \
        [-P weights=imagenet -P cache_dir=s3://ecg-mlflow/features ...] [--image IMAGE] [--apply]

Prints the Job (YAML) by default, to read or to pipe into `kubectl apply -f -`; `--apply` runs
kubectl itself. Every value is checked with the project's own parsers before anything is
submitted. When the Job is complete, the cache holds every unique image's features, and the
training Jobs of submit_grid.py (same `-P` values, same cache_dir) compute nothing.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

K8S_DIR = Path(__file__).resolve().parent
TEMPLATE = K8S_DIR / "features_job_template.yaml"
SHARD_VARIABLE = "SHARD_INDEX"
MAX_SHARDS = 10_000
"""Kubernetes caps an Indexed Job's completions (100,000) and parallelism; this is plenty."""


class FeaturesJobError(ValueError):
    """A bad argument; the message names it."""


def k8s_defaults() -> dict[str, str]:
    """data and cache_dir as infra/k8s/MLproject sets them for the Jobs (the mounted PVCs)."""
    params = yaml.safe_load((K8S_DIR / "MLproject").read_text())["entry_points"]["main"]["parameters"]
    return {name: str(params[name]["default"]) for name in ("data", "cache_dir")}


def default_image() -> str:
    """The image infra/k8s/Dockerfile builds (MLproject docker_env); it holds the project."""
    return yaml.safe_load((K8S_DIR / "MLproject").read_text())["docker_env"]["image"]


def parse_params(pairs: list[str], arch: str) -> dict[str, str]:
    """`-P name=value` options of `features`; checked by the project's parser (with `arch`, as
    image sizes depend on the backbone), except the paths, which exist only in the pod."""
    from ecg_mlflow.commands.features import FEATURE_OPTIONS
    from ecg_mlflow.config import ConfigError, parse_train_config

    params = k8s_defaults()
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep:
            raise FeaturesJobError(f"-P {pair!r}: write it as name=value")
        if name not in FEATURE_OPTIONS:
            raise FeaturesJobError(f"-P {name}: not an option of `features`; choose from {', '.join(FEATURE_OPTIONS)}")
        if value == "":
            raise FeaturesJobError(f"-P {name}: empty value")
        params[name] = value
    checked = {k: v for k, v in params.items() if k not in ("data", "weights")}  # paths in the pod
    try:
        parse_train_config(arch=arch, **checked)
    except ConfigError as exc:
        raise FeaturesJobError(f"-P {exc}") from None
    return params


def parse_arch(raw: str) -> str:
    from ecg_mlflow.model.backbones import BACKBONES

    if raw not in BACKBONES:
        raise FeaturesJobError(f"--arch must be one of {', '.join(BACKBONES)}; got {raw!r}")
    return raw


def parse_count(name: str, raw: int, maximum: int = MAX_SHARDS) -> int:
    if not 1 <= raw <= maximum:
        raise FeaturesJobError(f"{name} must lie in 1..{maximum}, got {raw}")
    return raw


def features_command(arch: str, shards: int, params: dict[str, str]) -> list[str]:
    """The container command; $(SHARD_INDEX) is expanded by Kubernetes in each pod."""
    words = ["python", "-m", "ecg_mlflow", "features", "--arch", arch, "--shard", f"$({SHARD_VARIABLE})/{shards}"]
    for name, value in params.items():
        words += ["--" + name.replace("_", "-"), value]
    return words


def job_name(arch: str, shards: int) -> str:
    return f"ecg-features-{arch}-{shards}-shards"


def render_job(arch: str, shards: int, parallelism: int, params: dict[str, str], image: str) -> dict:
    """The Indexed Job: template + name, image, command, completions and parallelism."""
    job = yaml.safe_load(TEMPLATE.read_text())
    job["metadata"]["name"] = job_name(arch, shards)
    job["spec"]["completions"] = shards
    job["spec"]["parallelism"] = min(parallelism, shards)
    container = job["spec"]["template"]["spec"]["containers"][0]
    container["image"] = image
    container["command"] = features_command(arch, shards, params)
    return job


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", required=True, help="the backbone")
    parser.add_argument("--shards", type=int, required=True, help="N: pods, each with 1/N of the unique images")
    parser.add_argument("--parallelism", type=int, default=None, help="pods at once (default: all N)")
    parser.add_argument("-P", dest="params", action="append", default=[], metavar="NAME=VALUE",
                        help="an option of `features` (weights, image_height, image_width, crop, cache_dir, data)")
    parser.add_argument("--image", default=None, help="the project image the cluster pulls (default: MLproject's)")
    parser.add_argument("--apply", action="store_true", help="kubectl apply the Job instead of printing it")
    args = parser.parse_args(argv)
    try:
        arch = parse_arch(args.arch)
        shards = parse_count("--shards", args.shards)
        parallelism = parse_count("--parallelism", args.parallelism or shards)
        job = render_job(arch, shards, parallelism, parse_params(args.params, arch), args.image or default_image())
    except FeaturesJobError as exc:
        print(f"submit_features: {exc}", file=sys.stderr)
        return 2
    manifest = yaml.safe_dump(job, sort_keys=False)
    if not args.apply:
        print(manifest, end="")
        return 0
    command = ["kubectl", "apply", "-f", "-"]
    try:
        done = subprocess.run(command, input=manifest, text=True)
    except FileNotFoundError:
        print(f"submit_features: kubectl not found; print the Job and apply it elsewhere: "
              f"{shlex.join(sys.argv[:1] + [a for a in sys.argv[1:] if a != '--apply'])}", file=sys.stderr)
        return 1
    return done.returncode


if __name__ == "__main__":
    sys.exit(main())
