"""The default engine on the real data: a whole cold study through OpenVINO fp32 against the
same study through Keras fp32, seed by seed.

Runs (with --run) `ecg-mlflow study` of two offline pretrained backbones, 10 seeds, 512 x
1024, split=grouped, crop=none, with `--engine openvino` on a feature cache that holds no
OpenVINO entries (a cold study: every unique image through the backbone, region maps
included), into the experiment of the Keras study that `benchmarks/real_results.py` tracked.
Then, from the tracked runs alone: the per-seed test accuracy of each (backbone, seed) under
both engines (same seeds, so the same splits and head initialisations), the paired t-test
and Wilcoxon test of the differences, the two analyses' verdicts, and the cold study's time
against its feature pass (the `time_features_s` of its runs). Writes the "Default engine on
the real data" section of docs/benchmarks.md.

    MLFLOW_TRACKING_URI=sqlite:///... .venv/bin/python benchmarks/engine_study.py --run --cache-dir DIR
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "ecg-images"
SECTION = "Default engine on the real data"
BASELINE, CANDIDATE = "keras", "openvino"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REAL_IMAGES))
    parser.add_argument("--archs", default="efficientnetlite0,efficientnetlite2")
    parser.add_argument("--seeds", default="1-10")
    parser.add_argument("--experiment", default="ecg-cvd-real")
    parser.add_argument("--cache-dir", required=True, help="the feature cache (its Keras entries stay untouched)")
    parser.add_argument("--run", action="store_true", help="run the OpenVINO study first (resumable)")
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args()


def study_command(args, engine: str) -> list[str]:
    return ["ecg-mlflow", "study", "--archs", args.archs, "--seeds", args.seeds, "--data", args.data,
            "--weights", "imagenet", "--split", "grouped", "--crop", "none", "--engine", engine,
            "--cache-dir", args.cache_dir, "--experiment", args.experiment]


def accuracy_by_pair(children) -> dict[tuple[str, int], float]:
    return {(r.data.params["arch"], int(r.data.params["seed"])): r.data.metrics["test_accuracy"] for r in children}


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.run:
        command = study_command(args, CANDIDATE)
        print(" ".join(command), flush=True)
        subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], check=True)

    import mlflow
    from scipy import stats

    from real_results import tracked_studies
    from report import machine, markdown_table, write_section

    from ecg_mlflow import schema

    client = mlflow.MlflowClient()
    found = {}
    for engine in (BASELINE, CANDIDATE):
        studies = tracked_studies(client, args.experiment, engine)
        if ("grouped", "none") not in studies:
            sys.exit(f"no finished grouped / crop none study with engine {engine} in {args.experiment}")
        found[engine] = studies[("grouped", "none")]
    base, cand = (accuracy_by_pair(found[e][1]) for e in (BASELINE, CANDIDATE))
    pairs = sorted(set(base) & set(cand))
    diffs = np.array([cand[p] - base[p] for p in pairs])
    rows = [[arch, seed, f"{base[(arch, seed)]:.4f}", f"{cand[(arch, seed)]:.4f}", f"{cand[(arch, seed)] - base[(arch, seed)]:+.4f}"]
            for arch, seed in pairs]
    t = stats.ttest_rel([cand[p] for p in pairs], [base[p] for p in pairs])
    nonzero = diffs[diffs != 0]
    wilcoxon_p = float(stats.wilcoxon(nonzero).pvalue) if len(nonzero) else 1.0
    archs = args.archs.split(",")
    seed_sd = {a: float(np.std([base[p] for p in pairs if p[0] == a], ddof=1)) for a in archs}

    study, children, analysis = found[CANDIDATE]
    wall = (study.info.end_time - study.info.start_time) / 1000
    feature_s = sum(r.data.metrics.get("time_features_s", 0.0) for r in children)
    head_s = sum(r.data.metrics.get("time_head_s", 0.0) for r in children)
    misses = sum(r.data.metrics.get("cache_misses", 0.0) for r in children)

    def verdict(engine: str) -> str:
        run = found[engine][2]
        if run is None:
            return f"{engine}: no analysis"
        p = run.data.metrics.get(schema.stat_metric("accuracy", schema.STAT_P_BONFERRONI), float("nan"))
        return f"{engine}: accuracy Bonferroni p = {p:.3g}, winner tag {run.data.tags.get(schema.TAG_WINNER, '?')}"

    body = f"""Written by `benchmarks/engine_study.py --run` on {machine()} (shared; load average
{os.getloadavg()[0]:.1f} when written), from the tracked runs of two studies of {args.archs}
(ImageNet, offline), seeds {args.seeds}, 512 x 1024, split=grouped, crop=none: one through
Keras fp32 (docs/results.md), one through OpenVINO fp32 on a cold cache. Same seeds, so the
same splits, head initialisations and batches; only the engine of the backbone pass differs.

{markdown_table(["backbone", "seed", f"test accuracy {BASELINE}", f"test accuracy {CANDIDATE}", "difference"], rows)}

- Differences ({CANDIDATE} - {BASELINE}) over {len(pairs)} (backbone, seed) pairs: mean {diffs.mean():+.4f},
  max |difference| {np.abs(diffs).max():.4f}, {int((diffs == 0).sum())} of {len(pairs)} identical; paired
  t-test p = {t.pvalue if np.isfinite(t.pvalue) else float('nan'):.3g}, Wilcoxon p = {wilcoxon_p:.3g}. Seed noise for scale: the SD of
  test accuracy over seeds under {BASELINE} is {', '.join(f'{seed_sd[a]:.4f} ({a})' for a in archs)}.
- The studies' own analyses: {verdict(BASELINE)}; {verdict(CANDIDATE)}.
- The cold {CANDIDATE} study: {wall:.0f} s in all for {len(children)} runs; its backbone passes
  ({int(misses)} images over the runs that missed the cache, features and region maps) took
  {feature_s:.0f} s, the heads {head_s:.0f} s: the whole study is {wall / max(feature_s, 1e-9):.2f}x its
  feature pass.
"""
    print(body)
    if not args.no_write:
        write_section(SECTION, body)


if __name__ == "__main__":
    main()
