"""The whole cold study on the real data against its feature pass alone.

Runs `ecg-mlflow study` of two offline pretrained backbones, 10 seeds, 512 x 1024,
split=grouped, engine=openvino fp32 (the default engine), into a fresh tracking store with an
empty feature cache (every unique image through each backbone, region maps included), then
reads the tracked runs: the study's wall time, its backbone passes (`time_features_s` over its
runs), its heads (`time_head_s`) and the rest (assembling, checking and logging 20 runs, the
analysis). Writes the "Cold 20-run study" section of docs/benchmarks.md.

    .venv/bin/python benchmarks/cold_study.py
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "ecg-images"
SECTION = "Cold 20-run study"
EXPERIMENT = "cold-study"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REAL_IMAGES))
    parser.add_argument("--archs", default="efficientnetlite0,efficientnetlite2")
    parser.add_argument("--seeds", default="1-10")
    parser.add_argument("--workdir", default=str(PROJECT_ROOT / ".bench" / "cold-study"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args()


def run_cold_study(args: argparse.Namespace, workdir: Path) -> None:
    """The study on an empty cache, in a fresh store under `workdir` (both replaced)."""
    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "cache").mkdir(parents=True)
    command = [str(Path(sys.executable).parent / "ecg-mlflow"), "study", "--archs", args.archs, "--seeds", args.seeds,
               "--split", "grouped", "--data", args.data, "--weights", "imagenet", "--engine", "openvino",
               "--precision", "fp32", "--cache-dir", str(workdir / "cache"), "--experiment", EXPERIMENT]
    print(" ".join(command), flush=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    subprocess.run(command, check=True, env=env, cwd=workdir)
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    workdir = Path(args.workdir).resolve()
    run_cold_study(args, workdir)

    import mlflow

    from real_results import tracked_studies
    from report import machine, markdown_table, write_section

    studies = tracked_studies(mlflow.MlflowClient(), EXPERIMENT, "openvino")
    study, children, _ = studies[("grouped", "none")]
    wall = (study.info.end_time - study.info.start_time) / 1000
    features = sum(r.data.metrics.get("time_features_s", 0.0) for r in children)
    heads = sum(r.data.metrics.get("time_head_s", 0.0) for r in children)
    rest = wall - features - heads
    logging = {run.info.run_id: (run.info.end_time - run.info.start_time) / 1000 for run in children}
    first = [min((r for r in children if r.data.params["arch"] == arch), key=lambda r: r.info.start_time)
             for arch in args.archs.split(",")]
    first_s = sum(logging[r.info.run_id] for r in first)
    later_s = sum(logging.values()) - first_s
    later_n = len(children) - len(first)
    rows = [["whole study", f"{wall:.0f}", f"{wall / features:.2f}x"],
            ["backbone passes (features and region maps)", f"{features:.0f}", "1.00x"],
            ["heads (seeds of a backbone together)", f"{heads:.0f}", f"{heads / features:.2f}x"],
            [f"the rest: {len(children)} runs checked and logged, analysis", f"{rest:.0f}", f"{rest / features:.2f}x"],
            [f"- logging the first run of each backbone ({len(first)})", f"{first_s:.0f}", f"{first_s / features:.2f}x"],
            [f"- logging the other {later_n} runs", f"{later_s:.0f}", f"{later_s / features:.2f}x"],
            ["- the rest of the rest (manifest, splits, reading the cache per seed, analysis)",
             f"{rest - first_s - later_s:.0f}", f"{(rest - first_s - later_s) / features:.2f}x"]]
    table = markdown_table(["part", "seconds", "of the feature pass"], rows)
    body = (
        f"`benchmarks/cold_study.py`: `ecg-mlflow study --archs {args.archs} --seeds {args.seeds} --split grouped "
        f"--engine openvino --precision fp32` on the real data at 512 x 1024 (ImageNet weights, offline) with an "
        f"empty feature cache, into a fresh tracking store; the parts are read from its {len(children)} tracked "
        f"runs (`time_features_s`, `time_head_s`). Machine: {machine()} (load average "
        f"{os.getloadavg()[0]:.1f} when written).\n\n{table}\n\n"
        f"Logging a run (its child run's own duration: the runs open after their seeds' heads are "
        f"trained) is the whole model (assembled, checked through OpenVINO on four test images and the "
        f"probe, logged with `mlflow.keras.log_model` from the backbone's first archive, "
        f"tracking/keras_archive.py), the explanations (region table and chart, eight overlays), the "
        f"confusion matrix and curves: {later_s / max(later_n, 1):.1f} s per run after the first of its "
        f"backbone, {first_s / len(first):.1f} s for that first one, which also runs the backbone on the "
        f"check's and the probe's images and has Keras save the archive the later seeds start from."
    )
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
