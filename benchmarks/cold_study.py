"""The whole cold study on the real data against its feature pass alone.

Runs `ecg-mlflow study` of two offline pretrained backbones, 10 seeds, 512 x 1024,
split=grouped, engine=openvino fp32 (the default engine; `--precision bf16` for its bf16, the
fastest engine on a CPU with AMX), into a fresh tracking store with an
empty feature cache (every unique image through each backbone, region maps included), then
reads the tracked runs: the study's wall time, its backbone passes (`time_features_s` over its
runs), then what follows them up to the last run logged (heads in child processes, each
process's runs logged as it finishes: `time_head_s` and the runs' durations say what went
on side by side), and the analysis. Writes the "Cold 20-run study" section of
docs/benchmarks.md ("Cold 20-run study, OpenVINO bf16" for bf16).

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
    parser.add_argument("--precision", default="fp32", choices=("fp32", "bf16"),
                        help="OpenVINO's precision (bf16 where the CPU has it natively: AMX or AVX-512 BF16)")
    parser.add_argument("--workdir", help="default: .bench/cold-study, .bench/cold-study-bf16 for bf16")
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args()


def default_workdir(precision: str) -> Path:
    """.bench/cold-study for fp32 (the cache benchmarks/seed_heads.py reads), a folder per
    other precision."""
    return PROJECT_ROOT / ".bench" / ("cold-study" if precision == "fp32" else f"cold-study-{precision}")


def run_cold_study(args: argparse.Namespace, workdir: Path) -> float:
    """The study on an empty cache, in a fresh store under `workdir` (both replaced); returns
    the CPU seconds (user + system) of the study and every process it waited for, its head
    processes included."""
    import resource

    shutil.rmtree(workdir, ignore_errors=True)
    (workdir / "cache").mkdir(parents=True)
    command = [str(Path(sys.executable).parent / "ecg-mlflow"), "study", "--archs", args.archs, "--seeds", args.seeds,
               "--split", "grouped", "--data", args.data, "--weights", "imagenet", "--engine", "openvino",
               "--precision", args.precision, "--cache-dir", str(workdir / "cache"), "--experiment", EXPERIMENT]
    print(" ".join(command), flush=True)
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, env=env, cwd=workdir)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    os.environ["MLFLOW_TRACKING_URI"] = env["MLFLOW_TRACKING_URI"]
    return (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    workdir = Path(args.workdir or default_workdir(args.precision)).resolve()
    cpu_seconds = run_cold_study(args, workdir)

    import mlflow

    from real_results import tracked_studies
    from report import machine, markdown_table, write_section

    from ecg_mlflow.study import head_processes

    processes = head_processes()  # one per core the study may use
    studies = tracked_studies(mlflow.MlflowClient(), EXPERIMENT, "openvino")
    study, children, _ = studies[("grouped", "none")]
    wall = (study.info.end_time - study.info.start_time) / 1000
    features = sum(r.data.metrics.get("time_features_s", 0.0) for r in children)
    heads = sum(r.data.metrics.get("time_head_s", 0.0) for r in children)
    after_passes = (max(r.info.end_time for r in children) - study.info.start_time) / 1000 - features
    logging = {run.info.run_id: (run.info.end_time - run.info.start_time) / 1000 for run in children}
    first = [min((r for r in children if r.data.params["arch"] == arch), key=lambda r: r.info.start_time)
             for arch in args.archs.split(",")]
    first_s = sum(logging[r.info.run_id] for r in first)
    later_s = sum(logging.values()) - first_s
    later_n = len(children) - len(first)

    def row(part: str, seconds: float, share: bool = True) -> list[str]:
        return [part, f"{seconds:.0f}", f"{seconds / features:.2f}x" if share else ""]

    rows = [row("whole study", wall),
            row("backbone passes (features and region maps), one after another", features),
            row(f"the rest up to the last run logged: heads in {processes} one-thread processes at once, each "
                f"process's runs logged as it finishes (and the manifest, splits, reading the cache per seed)",
                after_passes),
            row("- heads, process-seconds (summed over processes that ran side by side)", heads, share=False),
            row(f"- logging {len(children)} runs (their child runs' durations)", first_s + later_s, share=False),
            row("the analysis", wall - features - after_passes),
            row(f"CPU time of the study's processes (user + system, summed), over {processes} cores: no "
                f"schedule of this work on {processes} cores ends sooner", cpu_seconds / processes)]
    table = markdown_table(["part", "seconds", "of the feature pass"], rows)
    body = (
        f"`benchmarks/cold_study.py`: `ecg-mlflow study --archs {args.archs} --seeds {args.seeds} --split grouped "
        f"--engine openvino --precision {args.precision}` on the real data at 512 x 1024 (ImageNet weights, offline) with an "
        f"empty feature cache, into a fresh tracking store; the parts are read from its {len(children)} tracked "
        f"runs (`time_features_s`, `time_head_s`, their start and end). Machine: {machine()} (load average "
        f"{os.getloadavg()[0]:.1f} when written).\n\n{table}\n\n"
        f"The passes run first, nothing beside them; then each backbone's seeds train in {processes} child "
        f"processes, {processes} at a time, and the runs of a process are logged while the others train on "
        f"(ecg_mlflow/study.py). Logging a run (its child run's own duration) is the whole model (assembled, "
        f"checked through OpenVINO on four test images and the probe, logged with `mlflow.keras.log_model` from "
        f"the backbone's first archive, tracking/keras_archive.py), the explanations (region table and chart, "
        f"eight overlays), the confusion matrix and curves: {later_s / max(later_n, 1):.1f} s per run after the "
        f"first of its backbone, {first_s / len(first):.1f} s for that first one, which also runs the backbone on "
        f"the check's and the probe's images and has Keras save the archive the later seeds start from. "
        f"The study used {cpu_seconds:.0f} CPU seconds in all, {cpu_seconds / wall / processes:.0%} of its "
        f"{processes} cores over its wall time; a study of 1.3x its feature pass would have "
        f"{1.3 * features * processes:.0f} core-seconds for the same work."
    )
    print(body)
    if not args.no_write:
        write_section(SECTION + ("" if args.precision == "fp32" else f", OpenVINO {args.precision}"), body)


if __name__ == "__main__":
    main()
