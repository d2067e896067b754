"""Tuning throughput: Optuna trials per minute on the real data's cached features.

Runs the `tune` pipeline (parent run, nested MLflow run per trial, SQLite Optuna storage)
twice on the real ECG images: first on an empty feature cache (one backbone pass per
unique image), then on the warm cache (no backbone pass at all), and reports the feature
time and the trials per minute measured from the trials' own start and end times.

    .venv/bin/python benchmarks/tune_throughput.py --n-trials 12

Throw-away MLflow store, Optuna storage and (by default) feature cache live in a
temporary folder. The head trains as in the paper (up to 100 epochs, patience 5).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "ecg-images"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REAL_IMAGES))
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--weights", default="none")
    parser.add_argument("--image-height", default="128")
    parser.add_argument("--image-width", default="256")
    parser.add_argument("--n-trials", default="12")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--max-epochs", default="100")
    parser.add_argument("--patience", default="5")
    parser.add_argument("--cache-dir", default="", help="default: a fresh temporary folder (cold start)")
    return parser.parse_args()


def run_worker(config, manifest, label: str) -> dict[str, float]:
    """One `tune` worker into a fresh parent run; its trials' throughput from the storage."""
    import mlflow
    import optuna

    from ecg_mlflow import names
    from ecg_mlflow.commands.tune import tune_and_log

    mlflow.set_experiment("tune-benchmark")
    start = time.perf_counter()
    with mlflow.start_run(run_name=label, tags={names.TAG_ROLE: names.ROLE_TUNE}) as run:
        summary = tune_and_log(config, manifest, progress=False)
    wall = time.perf_counter() - start
    metrics = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    study = optuna.load_study(study_name=config.study_name, storage=config.storage)
    mine = [t for t in study.trials if t.number in set(summary.ran)]
    first = min(t.datetime_start for t in mine)
    last = max(t.datetime_complete for t in mine)
    trial_seconds = (last - first).total_seconds()
    states = {s: sum(t.state.name == s for t in mine) for s in ("COMPLETE", "PRUNED", "FAIL")}
    return {
        "trials": len(mine), **states, "backbone_passes": summary.cache_misses,
        "cache_hits": summary.cache_hits, "trial_seconds": trial_seconds,
        "trials_per_minute": 60 * len(mine) / trial_seconds, "wall_seconds": wall,
        "features_seconds": metrics[names.METRIC_TIME_FEATURES],
    }


def main() -> None:
    args = parse_args()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if not Path(args.data).is_dir():
        raise SystemExit(f"real data not found at {args.data}")
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp:
        import mlflow
        import optuna

        from ecg_mlflow.train import load_dataset
        from ecg_mlflow.tune import parse_tune_config

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")
        cache_dir = args.cache_dir or f"{tmp}/features"
        manifest = load_dataset(args.data, progress=False)
        results = []
        for label in ("cold cache", "warm cache"):
            config = parse_tune_config(
                arch=args.arch, data=args.data, weights=args.weights,
                image_height=args.image_height, image_width=args.image_width,
                max_epochs=args.max_epochs, patience=args.patience, cache_dir=cache_dir,
                n_trials=args.n_trials, seeds=args.seeds, storage=f"sqlite:///{tmp}/optuna.db",
                study_name=f"bench-{label.split()[0]}",
            )
            started = time.perf_counter()
            row = run_worker(config, manifest, label)
            results.append((label, row, time.perf_counter() - started))

    import keras
    import tensorflow as tf

    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs visible; "
          f"tensorflow {tf.__version__}, keras {keras.__version__}, optuna {optuna.__version__}")
    print(f"data: {args.data} ({len(manifest.records)} files, "
          f"{len({r.sha256 for r in manifest.records})} unique); {args.arch}, weights={args.weights}, "
          f"{args.image_height}x{args.image_width}; seeds {args.seeds}; max_epochs {args.max_epochs}, "
          f"patience {args.patience}")
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")
    print("| worker | backbone passes | cache hits | features (s) | trials | complete | pruned "
          "| trial time (s) | trials/min | worker wall (s) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for label, row, _ in results:
        print(f"| {label} | {row['backbone_passes']} | {row['cache_hits']} | {row['features_seconds']:.1f} "
              f"| {row['trials']} | {row['COMPLETE']} | {row['PRUNED']} | {row['trial_seconds']:.1f} "
              f"| {row['trials_per_minute']:.2f} | {row['wall_seconds']:.1f} |")


if __name__ == "__main__":
    main()
