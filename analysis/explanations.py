"""How much the tracked models read the printed text: text shares and region shares of train
runs, grouped by backbone, crop and split (the `crop=none` vs `crop=grid` comparison).

Reads the run schema only: the `test_text_attribution_share*` metrics and the
`explanations/region_attribution.csv` artifact (signed Grad-CAM per region of the predicted
class, one row per test image) of every finished train run.

    python -m analysis.explanations --experiment ecg-cvd [--markdown out.md]

prints, per (arch, crop, split), the mean text share over runs (overall and per true class)
and the mean share of the positive attribution per region and true class.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd

from ecg_mlflow import schema
from ecg_mlflow.schema import CLASSES
from ecg_mlflow.tracking.search import find_experiment_id, role_filter, search_all_runs

if TYPE_CHECKING:
    from mlflow import MlflowClient

GROUP_PARAMS = ("arch", "crop", "split")


def text_share_frame(runs) -> pd.DataFrame:
    """One row per (arch, crop, split): runs, and the mean over runs of every text-share metric."""
    rows = []
    for run in runs:
        row = {p: run.data.params.get(p, "?") for p in GROUP_PARAMS}
        row.update({m: run.data.metrics.get(m, np.nan) for m in schema.TEXT_SHARE_METRICS})
        rows.append(row)
    if not rows:
        return pd.DataFrame(columns=[*GROUP_PARAMS, "runs", *schema.TEXT_SHARE_METRICS])
    frame = pd.DataFrame(rows)
    grouped = frame.groupby(list(GROUP_PARAMS))
    out = grouped[list(schema.TEXT_SHARE_METRICS)].mean()
    out.insert(0, "runs", grouped.size())
    return out.reset_index()


def region_shares(table: pd.DataFrame) -> pd.DataFrame:
    """Per true class, the mean over images of each region's share of the positive
    attribution (the run's region_attribution.csv); columns are region slugs."""
    columns = [c for c in table.columns if c.startswith(schema.ATTRIBUTION_PREFIX)]
    positive = table[columns].clip(lower=0).to_numpy(np.float64)
    total = positive.sum(axis=1, keepdims=True)
    shares = np.divide(positive, total, out=np.zeros_like(positive), where=total > 0)
    frame = pd.DataFrame(shares, columns=[c[len(schema.ATTRIBUTION_PREFIX):] for c in columns])
    frame[schema.COL_TRUE] = table[schema.COL_TRUE].to_numpy()
    return frame.groupby(schema.COL_TRUE).mean()


def region_share_frame(client: MlflowClient, runs) -> pd.DataFrame:
    """Rows (arch, crop, split, true class), columns regions: region shares averaged over runs."""
    parts = []
    with tempfile.TemporaryDirectory(prefix="ecg-explanations-") as tmp:
        for run in runs:
            try:
                path = client.download_artifacts(run.info.run_id, schema.ARTIFACT_REGION_TABLE, tmp)
            except Exception:  # a run from before explanations were logged
                continue
            shares = region_shares(pd.read_csv(path)).reset_index()
            for p in GROUP_PARAMS:
                shares[p] = run.data.params.get(p, "?")
            parts.append(shares)
            Path(path).unlink()
    if not parts:
        return pd.DataFrame()
    frame = pd.concat(parts, ignore_index=True)
    out = frame.groupby([*GROUP_PARAMS, schema.COL_TRUE]).mean(numeric_only=True).reset_index()
    order = {c: i for i, c in enumerate(CLASSES)}
    return out.sort_values([*GROUP_PARAMS, schema.COL_TRUE], key=lambda s: s.map(order) if s.name == schema.COL_TRUE else s)


def finished_train_runs(client: MlflowClient, experiment: str):
    return search_all_runs(client, find_experiment_id(client, experiment),
                           role_filter(schema.ROLE_TRAIN, finished=True))


def markdown(frame: pd.DataFrame, digits: int = 3) -> str:
    if frame.empty:
        return "(no runs with explanations)"
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    lines = [header, "|" + "|".join(" --- " for _ in frame.columns) + "|"]
    for row in frame.itertuples(index=False):
        lines.append("| " + " | ".join(f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default=schema.DEFAULT_EXPERIMENT)
    parser.add_argument("--markdown", type=Path, default=None, help="also write the tables to this file")
    args = parser.parse_args(argv)
    from mlflow import MlflowClient

    client = MlflowClient()
    runs = finished_train_runs(client, args.experiment)
    text = (f"## Text attribution share (mean over runs)\n\n{markdown(text_share_frame(runs))}\n\n"
            f"## Share of positive Grad-CAM per region and true class (mean over runs)\n\n"
            f"{markdown(region_share_frame(client, runs))}\n")
    print(text)
    if args.markdown:
        args.markdown.write_text(text)


if __name__ == "__main__":
    main()
