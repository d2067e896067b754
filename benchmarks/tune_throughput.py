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
import tempfile
import time
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "ecg-images"
BENCHMARKS_MD = PROJECT_ROOT / "docs" / "benchmarks.md"
SECTION = "Tuning throughput"


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
    parser.add_argument("--write", action="store_true",
                        help=f"replace the '{SECTION}' section of docs/benchmarks.md with the results")
    return parser.parse_args()


def run_worker(config, manifest, label: str) -> dict[str, float]:
    """One `tune` worker into a fresh parent run; its trials' throughput from the storage."""
    import mlflow
    import optuna

    from ecg_mlflow import schema
    from ecg_mlflow.tune.tracking import tune_and_log

    mlflow.set_experiment("tune-benchmark")
    start = time.perf_counter()
    with mlflow.start_run(run_name=label, tags={schema.TAG_ROLE: schema.ROLE_TUNE}) as run:
        summary = tune_and_log(config, manifest, progress=False)
    wall = time.perf_counter() - start
    metrics = mlflow.MlflowClient().get_run(run.info.run_id).data.metrics
    study = optuna.load_study(study_name=config.study_name, storage=config.storage)
    mine = [t for t in study.trials if t.number in set(summary.ran)]
    first = min(t.datetime_start for t in mine)
    last = max(t.datetime_complete for t in mine)
    trial_seconds = (last - first).total_seconds()
    states = {s: sum(t.state.name == s for t in mine) for s in ("COMPLETE", "PRUNED", "FAIL")}
    epochs = sum(len(t.intermediate_values) for t in mine)
    return {
        "trials": len(mine), **states, "epochs": epochs, "backbone_passes": summary.cache_misses,
        "cache_hits": summary.cache_hits, "trial_seconds": trial_seconds,
        "trials_per_minute": 60 * len(mine) / trial_seconds, "wall_seconds": wall,
        "features_seconds": metrics[schema.METRIC_TIME_FEATURES],
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
        from ecg_mlflow.tune.config import parse_tune_config

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
            results.append((label, run_worker(config, manifest, label)))

    text = report(args, manifest, results)
    print(f"## {SECTION}\n\n{text}")
    if args.write:
        from report import write_section

        write_section(SECTION, text)
        print(f"wrote the '{SECTION}' section of {BENCHMARKS_MD}")


def report(args, manifest, results) -> str:
    """The markdown section's body: settings, one row per worker, what it means."""
    import keras
    import optuna

    from ecg_mlflow.model.backend import backend_version

    cold, warm = results[0][1], results[1][1]
    from report import machine

    lines = [
        f"Written by `benchmarks/tune_throughput.py --n-trials {args.n_trials}` on "
        f"{machine()} (shared; load average "
        f"{os.getloadavg()[0]:.1f} at the end), backend {backend_version()}, Keras "
        f"{keras.__version__}, Optuna {optuna.__version__}.", "",
        f"The real images ({len(manifest.records)} files, "
        f"{len({r.sha256 for r in manifest.records})} unique), {args.arch} with weights={args.weights} "
        f"at {args.image_height} x {args.image_width} (chosen so the cold feature pass takes about "
        f"a minute or two here; throughput after it does not depend on the image size), seeds "
        f"{args.seeds}, max_epochs {args.max_epochs}, patience {args.patience}, split paper "
        f"(593 train / 148 validation rows per trial). Each worker is a full `tune` run: a parent "
        "MLflow run and one nested run per trial (SQLite tracking store and SQLite Optuna "
        "storage), TPE and median pruning as shipped. Trials per minute are measured from the "
        "first trial's start to the last trial's end in the Optuna storage.", "",
        "| worker | backbone passes | cache hits | features (s) | trials | complete | pruned "
        "| epochs trained | trial time (s) | trials/min | epochs/s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for label, row in results:
        lines.append(
            f"| {label} | {row['backbone_passes']} | {row['cache_hits']} | {row['features_seconds']:.1f} "
            f"| {row['trials']} | {row['COMPLETE']} | {row['PRUNED']} | {row['epochs']} "
            f"| {row['trial_seconds']:.1f} | {row['trials_per_minute']:.2f} "
            f"| {row['epochs'] / row['trial_seconds']:.1f} |")
    lines += [
        "",
        f"- The backbone runs once per unique image on a cold cache ({cold['backbone_passes']} passes, "
        f"{cold['features_seconds']:.0f} s) and never again: the warm worker made "
        f"{warm['backbone_passes']} backbone passes and read all {warm['cache_hits']} features from "
        f"the cache in {warm['features_seconds']:.2f} s.",
        f"- About **{warm['trials_per_minute']:.1f} trials per minute** on cached features "
        f"({60 / warm['trials_per_minute']:.0f} s per trial: {warm['epochs'] / warm['trials']:.1f} epochs "
        f"on average at {warm['trial_seconds'] / warm['epochs']:.2f} s each, which includes building "
        "each head and one MLflow metric batch per epoch). Median pruning stopped "
        f"{warm['PRUNED']} of {warm['trials']} trials early. 30 trials with one seed take about "
        f"{30 / warm['trials_per_minute']:.0f} minutes here (with one seed per trial; several seeds "
        "train together, in one computation: `--seeds` measures that).",
        "- Not measured here: parallel workers on one PostgreSQL study should add throughput only "
        "where cores are free, since each head already uses every core TensorFlow sees.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
