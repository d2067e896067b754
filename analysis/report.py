"""Turn a StudyAnalysis into what people read: terminal table, report.md, results files, figures."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ecg_mlflow import schema

if TYPE_CHECKING:
    from analysis.cv import CVAnalysis
    from analysis.run import StudyAnalysis
    from analysis.stats import MetricComparison

BAR_COLOURS = ("#4C72B0", "#DD8452")


def _num(value: float, digits: int = 4) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"


def _mean_ci(mean: float, low: float, high: float) -> str:
    return f"{mean:.4f} [{low:.4f}, {high:.4f}]"


def summary_rows(analysis: StudyAnalysis) -> list[dict[str, str]]:
    """One display row per metric: the columns of the terminal and markdown tables."""
    level = f"{analysis.confidence:.2%}".rstrip("0").rstrip(".")
    rows = []
    for c in analysis.comparisons:
        boot = c.bootstrap
        rows.append(
            {
                "metric": c.metric,
                f"{c.first} mean [{level} CI]": _mean_ci(c.first_summary.mean, c.first_summary.ci_low, c.first_summary.ci_high),
                f"{c.second} mean [{level} CI]": _mean_ci(c.second_summary.mean, c.second_summary.ci_low, c.second_summary.ci_high),
                "diff [CI]": _mean_ci(c.ttest.mean_diff, c.ttest.ci_low, c.ttest.ci_high),
                "t (df)": f"{_num(c.ttest.t, 3)} ({c.ttest.df})",
                "p": _num(c.ttest.p),
                "p Bonf.": _num(c.p_bonferroni),
                "p Wilcoxon": _num(c.wilcoxon.p),
                "d_z": _num(c.d_z, 3),
                "boot diff [CI]": _mean_ci(boot.observed_diff, boot.ci_low, boot.ci_high) if boot else "n/a",
                "p boot": _num(boot.p) if boot else "n/a",
                "p McNemar": _num(c.mcnemar.p) if c.mcnemar else "",
                "winner": c.winner,
                "sig.": "*" if c.significant else "ns",
            }
        )
    return rows


def terminal_table(analysis: StudyAnalysis) -> str:
    """The results as an aligned text table (printed by `analyze`)."""
    rows = summary_rows(analysis)
    columns = list(rows[0])
    widths = {col: max(len(col), *(len(r[col]) for r in rows)) for col in columns}
    lines = ["  ".join(col.ljust(widths[col]) for col in columns)]
    lines.append("  ".join("-" * widths[col] for col in columns))
    lines += ["  ".join(r[col].ljust(widths[col]) for col in columns) for r in rows]
    return "\n".join(lines)


def _markdown_table(rows: list[dict[str, str]]) -> str:
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def _wilcoxon_note(analysis: StudyAnalysis) -> str:
    c = analysis.comparisons[0]
    level = analysis.alpha / len(analysis.metrics)
    note = (
        f"Wilcoxon signed-rank p-values use: "
        f"{', '.join(sorted({x.wilcoxon.method for x in analysis.comparisons}))}. "
        f"With {c.wilcoxon.n} pairs the exact two-sided p cannot go below 2/2^{c.wilcoxon.n} = "
        f"{_num(2 / 2**c.wilcoxon.n)}"
    )
    if 2 / 2**c.wilcoxon.n >= level:
        note += f", so it cannot reach the Bonferroni level {_num(level)} whatever the data."
    else:
        note += "."
    return note


def _verdict(analysis: StudyAnalysis) -> str:
    primary = analysis.comparison(analysis.primary_metric)
    if primary.significant:
        return (
            f"**{primary.winner}** wins on {primary.metric} (mean difference "
            f"{primary.ttest.mean_diff:+.4f}, Bonferroni-adjusted p = {_num(primary.p_bonferroni)} "
            f"< alpha = {analysis.alpha}). Tag `winner` = `{analysis.winner}`."
        )
    return (
        f"No significant difference on the primary metric {primary.metric} "
        f"(Bonferroni-adjusted p = {_num(primary.p_bonferroni)}, alpha = {analysis.alpha}); "
        f"{primary.winner} has the higher mean. Tag `winner` = `{schema.NO_WINNER}`."
    )


def markdown_report(analysis: StudyAnalysis) -> str:
    """report.md: the tables, the verdict, and plain words on what the tests see."""
    first, second = analysis.archs
    mc = analysis.mcnemar
    level = f"{analysis.confidence:.2%}"
    lines = [
        f"# Analysis of study `{analysis.study_run_id}`",
        "",
        f"- Backbones: **{first}** vs **{second}**; differences are {first} minus {second}.",
        f"- Seeds paired: {len(analysis.seeds)} ({', '.join(map(str, analysis.seeds))}); "
        f"test images: {analysis.n_images} (one test set shared by every run).",
        f"- Metrics: {', '.join(analysis.metrics)} (primary: {analysis.primary_metric}); "
        f"alpha = {analysis.alpha}, Bonferroni over {len(analysis.metrics)} metrics, "
        f"so every interval is a {level} interval.",
        "",
        "## Verdict",
        "",
        _verdict(analysis),
        "",
        "## Results",
        "",
        _markdown_table(summary_rows(analysis)),
        "",
        "Seed level (the paper's protocol): mean, SD and t interval per backbone, paired t-test "
        "(two-sided), Bonferroni-adjusted p (capped at 1), Wilcoxon signed-rank, Cohen's "
        "d_z = mean(diff) / SD(diff). `sig.` is Bonferroni p < alpha.",
        "",
        _wilcoxon_note(analysis),
        "",
        "## Test-image level",
        "",
        "All seeds share one test set, so the seed-level tests see only training noise (seed, "
        "validation split, batch order), not the chance of which images landed in the test set. "
        f"The paired bootstrap resamples the {analysis.n_images} test images with replacement "
        f"({analysis.n_resamples} resamples, seed {analysis.bootstrap_seed}), recomputes every "
        "run's metric on each resample from its per-image predictions, averages over seeds per "
        "backbone and takes the difference (percentile interval; two-sided p with the +1 "
        "correction).",
        "",
        f"Exact McNemar on accuracy: per-image correctness of each backbone is that of its seed "
        f"ensemble (argmax of the mean probability over seeds). {first} right and {second} wrong: "
        f"b = {mc.b}; {first} wrong and {second} right: c = {mc.c}; exact binomial p = {_num(mc.p)} "
        f"(ensemble accuracy {mc.first_correct}/{mc.n} vs {mc.second_correct}/{mc.n}).",
        "",
        "## Do the two kinds of test agree?",
        "",
    ]
    disagreements = analysis.disagreements()
    if disagreements:
        lines += [f"- {text}" for text in disagreements]
    else:
        lines.append(
            "Yes: for every metric the seed-level t-test (after Bonferroni) and the test-image-level "
            "tests (bootstrap, and McNemar for accuracy, after Bonferroni) reach the same verdict."
        )
    per_class = analysis.per_class_frame()
    if not per_class.empty:
        lines += ["", "## Per class", ""]
        rows = [
            {
                "metric": r["metric"],
                "class": r["class"],
                "backbone": r["arch"],
                f"mean [{level} CI]": _mean_ci(r["mean"], r["ci_low"], r["ci_high"]),
            }
            for r in per_class.to_dict(orient="records")
        ]
        lines.append(_markdown_table(rows))
    lines += _text_share_section(analysis)
    if analysis.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in analysis.warnings]
    lines += ["", "## Runs", ""]
    for arch, ids in analysis.run_ids.items():
        lines.append(f"- {arch}: " + ", ".join(f"seed {s}: `{i}`" for s, i in zip(analysis.seeds, ids)))
    return "\n".join(lines) + "\n"


def _text_share_section(analysis: StudyAnalysis) -> list[str]:
    """Both backbones' text attribution share side by side (mean over seeds [CI])."""
    frame = analysis.text_share_frame()
    if frame.empty:
        return []
    level = f"{analysis.confidence:.2%}"
    rows = []
    for cls in frame["class"].unique():
        chosen = frame[frame["class"] == cls].set_index("arch")
        rows.append({"true class": cls, **{
            f"{arch} mean [{level} CI]": _mean_ci(chosen.loc[arch, "mean"], chosen.loc[arch, "ci_low"], chosen.loc[arch, "ci_high"])
            for arch in analysis.archs}})
    return [
        "", "## Printed text", "",
        f"`{schema.METRIC_TEXT_SHARE}`: per test image, the share of the positive Grad-CAM attribution "
        "of the predicted class that lies on the printed header and footer (exam ID, heart rate), "
        "averaged over the test images (of one true class); here the mean over seeds. 0 by "
        "construction when the runs cropped to the grid. Attribution is not causation: see "
        "docs/explanations.md.", "",
        _markdown_table(rows),
    ]


def _bar_group(ax, labels: list[str], comparisons_or_values, archs: tuple[str, str]) -> np.ndarray:
    """Grouped bars with asymmetric CI error bars; returns the top of each group."""
    x = np.arange(len(labels))
    width = 0.38
    tops = np.zeros(len(labels))
    for offset, arch, colour, summaries in zip((-width / 2, width / 2), archs, BAR_COLOURS, comparisons_or_values):
        means = np.array([s.mean for s in summaries])
        low = np.array([s.mean - s.ci_low for s in summaries])
        high = np.array([s.ci_high - s.mean for s in summaries])
        ax.bar(x + offset, means, width, yerr=[low, high], capsize=4, label=arch, color=colour)
        tops = np.maximum(tops, means + high)
    ax.set_xticks(x, labels)
    return tops


def plot_figure2(analysis: StudyAnalysis, path: Path) -> Path:
    """Bars per metric and backbone, CI error bars, `*` / `ns` marks: the paper's Figure 2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    comparisons: tuple[MetricComparison, ...] = analysis.comparisons
    fig, ax = plt.subplots(figsize=(2.2 + 1.8 * len(comparisons), 4.5))
    tops = _bar_group(
        ax,
        [c.metric for c in comparisons],
        ([c.first_summary for c in comparisons], [c.second_summary for c in comparisons]),
        analysis.archs,
    )
    ceiling = min(1.15, max(1.0, float(tops.max()) + 0.1))
    for index, (c, top) in enumerate(zip(comparisons, tops)):
        # Very few seeds give intervals past the axis; keep the mark inside the picture.
        mark_at = min(top + 0.02, ceiling - 0.06)
        ax.text(index, mark_at, "*" if c.significant else "ns", ha="center", va="bottom", fontsize=12)
    ax.set_ylim(0, ceiling)
    ax.set_ylabel("test score (mean over seeds)")
    ax.set_title(
        f"{analysis.first} vs {analysis.second}: {analysis.n_pairs} seeds, "
        f"{analysis.confidence:.2%} CI; * Bonferroni p < {analysis.alpha}"
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def plot_per_class(analysis: StudyAnalysis, path: Path) -> Path:
    """Per-class precision, recall and F1 per backbone with CI error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(dict.fromkeys(p.metric for p in analysis.per_class))
    fig, axes = plt.subplots(1, max(1, len(metrics)), figsize=(4.5 * max(1, len(metrics)), 4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        rows = [p for p in analysis.per_class if p.metric == metric]
        classes = list(dict.fromkeys(p.cls for p in rows))
        by_arch = tuple([p.summary for p in rows if p.arch == arch] for arch in analysis.archs)
        _bar_group(ax, classes, by_arch, analysis.archs)
        ax.set_ylim(0, 1.15)
        ax.set_title(f"test {metric} per class")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, frameon=False)
    if not metrics:
        axes[0][0].text(0.5, 0.5, "no per-class metrics logged", ha="center", va="center")
    fig.suptitle(f"{analysis.first} vs {analysis.second}\nmean over {analysis.n_pairs} seeds, {analysis.confidence:.2%} CI")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_artifacts(analysis: StudyAnalysis, folder: Path) -> list[Path]:
    """results.csv, results.json, report.md, figure2.png, per_class.png into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in schema.ANALYSIS_ARTIFACTS]
    csv, js, md, fig2, per_class = paths
    analysis.to_frame().to_csv(csv, index=False)
    js.write_text(json.dumps(analysis.to_dict(), indent=2, allow_nan=False) + "\n")
    md.write_text(markdown_report(analysis))
    plot_figure2(analysis, fig2)
    plot_per_class(analysis, per_class)
    return paths


# ----------------------------------------------------------------------------- cross-validation


def cv_summary_rows(analysis: CVAnalysis) -> list[dict[str, str]]:
    """One display row per metric of a cross-validated study."""
    level = f"{analysis.confidence:.2%}".rstrip("0").rstrip(".")
    rows = []
    for c in analysis.comparisons:
        t, fxt = c.ttest, c.five_by_two
        row = {
            "metric": c.metric,
            f"{c.first} mean": f"{c.first_mean:.4f}",
            f"{c.second} mean": f"{c.second_mean:.4f}",
            f"diff [{level} CI]": _mean_ci(t.mean_diff, t.ci_low, t.ci_high),
            "t corr. (df)": f"{_num(t.t, 3)} ({t.df})",
            "p corr.": _num(t.p),
            "p corr. Bonf.": _num(c.p_bonferroni),
            "p naive": _num(t.p_uncorrected),
            f"OOF {c.first}": f"{c.oof_first:.4f}",
            f"OOF {c.second}": f"{c.oof_second:.4f}",
        }
        if fxt is not None:
            row["p 5x2cv t"] = _num(fxt.p)
            row["p 5x2cv F"] = _num(fxt.p_f)
        row.update({"winner": c.winner, "sig.": "*" if c.significant else "ns"})
        rows.append(row)
    return rows


def cv_terminal_table(analysis: CVAnalysis) -> str:
    rows = cv_summary_rows(analysis)
    columns = list(rows[0])
    widths = {col: max(len(col), *(len(r[col]) for r in rows)) for col in columns}
    lines = ["  ".join(col.ljust(widths[col]) for col in columns), "  ".join("-" * widths[col] for col in columns)]
    lines += ["  ".join(r[col].ljust(widths[col]) for col in columns) for r in rows]
    return "\n".join(lines)


def _cv_verdict(analysis: CVAnalysis) -> str:
    primary = analysis.comparison(analysis.primary_metric)
    if primary.significant:
        return (f"**{primary.winner}** wins on {primary.metric} (mean difference {primary.ttest.mean_diff:+.4f}, "
                f"corrected resampled t-test, Bonferroni-adjusted p = {_num(primary.p_bonferroni)} < alpha = "
                f"{analysis.alpha}). Tag `winner` = `{analysis.winner}`.")
    return (f"No significant difference on the primary metric {primary.metric} (corrected resampled t-test, "
            f"Bonferroni-adjusted p = {_num(primary.p_bonferroni)}, alpha = {analysis.alpha}); {primary.winner} "
            f"has the higher mean. Tag `winner` = `{schema.NO_WINNER}`.")


def _confusion_table(analysis: CVAnalysis, arch: str) -> str:
    matrix = analysis.confusion[arch]
    rows = [{"true \\ predicted": cls, **{p: str(int(matrix[i, j])) for j, p in enumerate(schema.CLASSES)}}
            for i, cls in enumerate(schema.CLASSES)]
    return _markdown_table(rows)


def markdown_cv_report(analysis: CVAnalysis) -> str:
    """report.md of a cross-validated study."""
    first, second = analysis.archs
    k, r = analysis.n_folds, analysis.n_repeats
    c0 = analysis.comparisons[0].ttest
    lines = [
        f"# Analysis of cross-validated study `{analysis.study_run_id}`",
        "",
        f"- Backbones: **{first}** vs **{second}**; differences are {first} minus {second}.",
        f"- Design: {r} repeat(s) of {k}-fold cross-validation, {analysis.n_pairs} paired cells; every one of "
        f"the {analysis.n_images} images is tested once per repeat. Folds: about {c0.n_test:.0f} test images, "
        f"{c0.n_train:.0f} training images (validation for early stopping included).",
        f"- Metrics: {', '.join(analysis.metrics)} (primary: {analysis.primary_metric}); alpha = {analysis.alpha}, "
        f"Bonferroni over {len(analysis.metrics)} metrics, {analysis.confidence:.2%} intervals.",
        "", "## Verdict", "", _cv_verdict(analysis), "", "## Results", "",
        _markdown_table(cv_summary_rows(analysis)), "",
        "The corrected resampled t-test (Nadeau & Bengio 2003; Bouckaert & Frank 2004 for repeated k-fold): "
        "t = mean(d) / sqrt((1/(k r) + n_test/n_train) var(d)), df = k r - 1, over the per-cell differences d. "
        "The folds' training sets overlap, so their differences are correlated; the naive t-test over folds "
        "(`p naive`, variance / (k r)) ignores that and is too confident. OOF: the metric of each repeat's "
        "out-of-fold predictions (every image predicted by the model that did not train on it), mean over repeats.",
    ]
    if any(c.five_by_two for c in analysis.comparisons):
        lines += ["", "5x2cv (5 repeats of 2 folds): Dietterich's paired t-test (t = p_1^(1) / sqrt(mean s_i^2), "
                  "df 5) and Alpaydin's combined F-test (F(10, 5)) as second opinions."]
    notes = [f"- {c.metric}: {c.ttest.note}" for c in analysis.comparisons if c.ttest.note]
    if notes:
        lines += ["", "## Degenerate differences", ""] + notes
    disagreements = analysis.disagreements()
    if disagreements:
        lines += ["", "## Naive versus corrected", ""] + [f"- {text}" for text in disagreements]
    lines += ["", "## Out-of-fold confusion matrices", "",
              f"Counts over {r} repeat(s) (each image counted once per repeat); rows true class, columns predicted."]
    for arch in analysis.archs:
        lines += ["", f"### {arch}", "", _confusion_table(analysis, arch)]
    if analysis.warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in analysis.warnings]
    lines += ["", "## Runs", ""]
    for i, (rep, fold) in enumerate(analysis.cells):
        runs = ", ".join(f"{a} `{analysis.run_ids[a][i]}`" for a in analysis.archs)
        lines.append(f"- repeat {rep}, fold {fold}: {runs}")
    return "\n".join(lines) + "\n"


def plot_oof_confusion(analysis: CVAnalysis, path: Path) -> Path:
    """The out-of-fold confusion matrix of each backbone, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(analysis.archs), figsize=(4.6 * len(analysis.archs), 4.2), squeeze=False)
    for ax, arch in zip(axes[0], analysis.archs):
        matrix = analysis.confusion[arch]
        ax.imshow(matrix, cmap="Blues")
        for (i, j), value in np.ndenumerate(matrix):
            ax.text(j, i, str(int(value)), ha="center", va="center",
                    color="white" if value > matrix.max() / 2 else "black")
        ax.set_xticks(range(len(schema.CLASSES)), schema.CLASSES)
        ax.set_yticks(range(len(schema.CLASSES)), schema.CLASSES)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{arch} out of fold")
    fig.suptitle(f"{analysis.n_repeats} x {analysis.n_folds}-fold CV, {analysis.n_images} images per repeat")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_cv_artifacts(analysis: CVAnalysis, folder: Path) -> list[Path]:
    """results.csv, results.json, report.md, oof_confusion.json/.png into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in schema.CV_ANALYSIS_ARTIFACTS]
    csv, js, md, confusion_json, confusion_png = paths
    analysis.to_frame().to_csv(csv, index=False)
    js.write_text(json.dumps(analysis.to_dict(), indent=2, allow_nan=False) + "\n")
    md.write_text(markdown_cv_report(analysis))
    confusion_json.write_text(json.dumps(analysis.confusion_dict(), indent=2) + "\n")
    plot_oof_confusion(analysis, confusion_png)
    return paths
