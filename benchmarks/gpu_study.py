"""The real-data study on one GPU under KERAS_BACKEND=jax: feature pass, heads, whole study.

Measures, on ../shared/data/ecg-images at the paper's 512 x 1024:
  1. the backbone pass of every unique image, per backbone and precision (images/s, and the
     device's peak memory where JAX reports it: jax.devices()[0].memory_stats());
  2. `ecg-mlflow study` (resnet50 + efficientnetv2s x seeds 1-10) on the feature cache that
     the fp32 pass filled: every head, every whole model assembled, checked and logged, and
     the analysis.
It writes the "GPU study (JAX)" section of docs/benchmarks.md, naming the device it ran on.

    KERAS_BACKEND=jax .venv-gpu/bin/python benchmarks/gpu_study.py --precisions fp32,bf16   # on a GPU
    KERAS_BACKEND=jax .venv/bin/python benchmarks/gpu_study.py --tiny                       # CPU check

`--tiny` is the check that the script works where there is no GPU: 4 images per class,
64 x 128, seeds 1-2, at most 5 epochs; its section says that no GPU figure was measured.
Everything it tracks lives under --workdir (default .bench/gpu-study, git-ignored). A GPU
machine needs `pip install -e '.[gpu,jax-cuda]'` (JAX with its CUDA plugin).
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "ecg-images"
SECTION = "GPU study (JAX)"
ARCHS = ("resnet50", "efficientnetv2s")
TINY = {"per_class": 4, "image_height": "64", "image_width": "128", "seeds": "1-2", "max_epochs": "5"}
"""The --tiny configuration: enough to run every step, far too small to mean anything."""
GIB = 2**30
EXPERIMENT = "gpu-study"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REAL_IMAGES))
    parser.add_argument("--seeds", default="1-10")
    parser.add_argument("--image-height", default="512")
    parser.add_argument("--image-width", default="1024")
    parser.add_argument("--max-epochs", default="100")
    parser.add_argument("--weights", default="none", help="imagenet where Keras can download it")
    parser.add_argument("--precisions", default="fp32", help="feature passes to time: fp32, bf16 or fp32,bf16")
    parser.add_argument("--study-precision", default="fp32", help="the study's precision (its features come from "
                        "that pass): fp32 or bf16 (engine=keras bf16 trains on a GPU only)")
    parser.add_argument("--workdir", default=str(PROJECT_ROOT / ".bench" / "gpu-study"))
    parser.add_argument("--tiny", action="store_true", help="the CPU check: 4 images per class, 64 x 128, seeds 1-2")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        args.seeds, args.max_epochs = TINY["seeds"], TINY["max_epochs"]
        args.image_height, args.image_width = TINY["image_height"], TINY["image_width"]
    return args


def use_jax() -> dict[str, str]:
    """KERAS_BACKEND=jax for this process and the study's; no preallocation of 75% of the
    GPU per process (the study runs in a second process), so peak memory is the real need."""
    if os.environ.get("KERAS_BACKEND", "jax") != "jax":
        sys.exit(f"gpu_study.py is the JAX study; KERAS_BACKEND is {os.environ['KERAS_BACKEND']!r}")
    os.environ.update(KERAS_BACKEND="jax", XLA_PYTHON_CLIENT_PREALLOCATE="false", TF_CPP_MIN_LOG_LEVEL="3")
    from ecg_mlflow.model.backend import check_backend_installed, request_xla_determinism

    check_backend_installed()
    request_xla_determinism()
    return dict(os.environ)


def tiny_copy(data: Path, out: Path, per_class: int) -> Path:
    """The first `per_class` files of each class folder (sorted), for --tiny."""
    shutil.rmtree(out, ignore_errors=True)
    for folder in sorted(p for p in data.iterdir() if p.is_dir()):
        (out / folder.name).mkdir(parents=True)
        for path in sorted(p for p in folder.iterdir() if p.is_file())[:per_class]:
            shutil.copy(path, out / folder.name / path.name)
    return out


def device_line() -> str:
    """The device JAX computes on, e.g. `gpu NVIDIA H100 80GB HBM3` or `cpu cpu`."""
    import jax

    device = jax.devices()[0]
    return f"{device.platform} {getattr(device, 'device_kind', '')}".strip()


def peak_memory_gib() -> float | None:
    """The device's peak bytes in use so far, where JAX reports it (GPUs do, CPUs do not)."""
    import jax

    stats = jax.devices()[0].memory_stats()
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / GIB


def time_feature_pass(arch: str, precision: str, args, paths_by_sha, cache: Path) -> dict[str, object]:
    """One cold backbone pass over every unique image through engine=keras at `precision`
    (what a study with that precision computes, into the key it reads); images/s and memory."""
    from ecg_mlflow.model.features import FeatureKey, extract_features

    key = FeatureKey(arch, args.weights, int(args.image_height), int(args.image_width), "none", "keras", precision)
    shutil.rmtree(cache / arch / key.digest, ignore_errors=True)
    _, stats = extract_features(paths_by_sha, key, cache, progress=True)
    gc.collect()
    return {"arch": arch, "precision": precision, "images": stats.misses, "seconds": stats.seconds,
            "images_per_s": stats.misses / stats.seconds, "peak_gib": peak_memory_gib()}


def run_study(args, data: Path, cache: Path, env: dict[str, str]) -> None:
    command = [
        str(Path(sys.executable).parent / "ecg-mlflow"), "study", "--archs", ",".join(ARCHS),
        "--seeds", args.seeds, "--data", str(data), "--weights", args.weights,
        "--image-height", args.image_height, "--image-width", args.image_width,
        "--max-epochs", args.max_epochs, "--cache-dir", str(cache), "--experiment", EXPERIMENT,
        "--engine", "keras", "--precision", args.study_precision,
    ]
    print(f"study: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, env=env, check=True)


def study_times() -> dict[str, float]:
    """Wall time of the latest study (its parent run) and its heads, from what MLflow tracked."""
    from mlflow import MlflowClient

    from ecg_mlflow import schema
    from ecg_mlflow.tracking.search import filter_quote, find_experiment_id, latest_run_of_role, search_all_runs

    client = MlflowClient()
    experiment_id = find_experiment_id(client, EXPERIMENT)
    parent = latest_run_of_role(client, experiment_id, schema.ROLE_STUDY, finished=True)
    children = search_all_runs(client, experiment_id, f"tags.`{schema.TAG_ROLE}` = {filter_quote(schema.ROLE_TRAIN)} and "
                                                      f"tags.`{schema.TAG_STUDY}` = {filter_quote(parent.info.run_id)}")
    heads = [r.data.metrics[schema.METRIC_TIME_HEAD] for r in children]
    return {"study_s": (parent.info.end_time - parent.info.start_time) / 1000, "runs": len(children),
            "heads_s": sum(heads), "head_mean_s": sum(heads) / len(heads),
            "backends": sorted({r.data.tags.get(schema.TAG_KERAS_BACKEND, "?") for r in children}),
            "devices": sorted({r.data.tags.get(schema.TAG_DEVICE, "?") for r in children})}


def section(args, device: str, passes: list[dict], study: dict, unique: int, files: int, total_s: float) -> str:
    from report import machine, markdown_table

    from ecg_mlflow.model.backend import backend_version

    on_gpu = device.startswith("gpu")
    memory = lambda row: "not reported" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"  # noqa: E731
    table = markdown_table(
        ["backbone", "precision", "images", "seconds", "images/s", "peak device memory (GiB)"],
        [[r["arch"], r["precision"], r["images"], f"{r['seconds']:.1f}", f"{r['images_per_s']:.1f}", memory(r)]
         for r in passes])
    command = "benchmarks/gpu_study.py " + ("--tiny" if args.tiny else
                                            f"--seeds {args.seeds} --precisions {args.precisions}")
    warning = "" if on_gpu and not args.tiny else (
        "**No GPU figures were measured.** This run was the script's check on a machine without a GPU "
        f"(device: {device}){': `--tiny`, ' + str(TINY['per_class']) + ' images per class' if args.tiny else ''}; "
        "its numbers say that every step runs under JAX, nothing about GPU speed. Rerun on a GPU "
        "(`pip install -e '.[gpu,jax-cuda]'`, then `KERAS_BACKEND=jax python benchmarks/gpu_study.py "
        "--precisions fp32,bf16`) to replace this section.\n\n")
    return (
        f"{warning}`{command}`: {', '.join(ARCHS)} x seeds {args.seeds}, {args.image_height} x "
        f"{args.image_width}, weights={args.weights}, {files} files ({unique} unique), Keras backend "
        f"{backend_version()} on {device}. Machine: {machine()}.\n\n"
        f"Backbone pass over every unique image (cold cache):\n\n{table}\n\n"
        f"Study ({study['runs']} runs + analysis at {args.study_precision}, on the cache that pass filled; the runs are tagged "
        f"backend {', '.join(study['backends'])}, device {', '.join(study['devices'])}): "
        f"{study['study_s']:.0f} s, of which heads {study['heads_s']:.0f} s ({study['head_mean_s']:.1f} s per "
        f"run); with that precision's passes, {total_s:.0f} s in all. Peak device memory is JAX's "
        "`peak_bytes_in_use` of this process after each pass (cumulative; without preallocation), "
        "where the device reports it (CPUs do not)."
    )


def main() -> None:
    args = parse_args()
    env = use_jax()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mlflow

    from report import write_section

    from ecg_mlflow.data.manifest import build_manifest
    from ecg_mlflow.model.backend import PRECISIONS, check_precision

    workdir = Path(args.workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    data = tiny_copy(Path(args.data), workdir / "tiny-data", TINY["per_class"]) if args.tiny else Path(args.data)
    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    env["MLFLOW_TRACKING_URI"] = uri
    os.chdir(workdir)  # the store's artifacts (./mlruns) stay in the workdir
    mlflow.set_tracking_uri(uri)
    precisions = [check_precision(p) for p in args.precisions.split(",")]
    manifest = build_manifest(data)
    paths_by_sha = {}
    for record in manifest.records:
        paths_by_sha.setdefault(record.sha256, manifest.path_of(record))

    start = time.perf_counter()
    passes = []
    study_precision = check_precision(args.study_precision)
    for precision in sorted(set(precisions) | {study_precision}, key=PRECISIONS.index):
        # One cache: the passes at each precision fill their own keys, the study reads its own.
        passes += [time_feature_pass(arch, precision, args, paths_by_sha, workdir / "cache") for arch in ARCHS]
    pass_s = sum(r["seconds"] for r in passes if r["precision"] == study_precision)
    run_study(args, data, workdir / "cache", env)
    study = study_times()
    text = section(args, device_line(), passes, study, len(paths_by_sha), len(manifest.records),
                   pass_s + study["study_s"])
    print(text)
    print(f"(script wall time {time.perf_counter() - start:.0f} s)")
    if not args.no_write:
        write_section(SECTION, text)
        print(f"wrote the '{SECTION}' section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
