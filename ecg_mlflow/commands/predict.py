"""`ecg-mlflow predict FILES...`: diagnose ECG images with a served model or a model URI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ecg_mlflow import schema


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--url", default=None, help="a served model, e.g. http://127.0.0.1:5001 (POST /invocations)")
@click.option("--model", "model_uri", default=None,
              help=f"a model URI predicted in this process, e.g. models:/{schema.DEFAULT_MODEL_NAME}@{schema.CHAMPION_ALIAS}")
@click.option("--json", "as_json", is_flag=True, help="one JSON list of {file, label, prob_*} for machines")
def predict(files: tuple[Path, ...], url: str | None, model_uri: str | None, as_json: bool) -> None:
    """Print the diagnosis (label) and the four class probabilities of each image FILE.

    Exactly one of --url and --model. All files go in one request; if any is not a usable
    image, nothing is predicted and every bad file is named with its reason.
    """
    if (url is None) == (model_uri is None):
        raise click.UsageError("give exactly one of --url (a served model) and --model (a model URI)")
    images = [path.read_bytes() for path in files]
    if url is not None:
        frame = _over_http(url, images, files)
    else:
        frame = _in_process(model_uri, images, files)
    frame.insert(0, "file", [str(p) for p in files])
    if as_json:
        click.echo(json.dumps(frame.to_dict(orient="records"), indent=2))
        return
    width = max(len("file"), *(len(str(p)) for p in files))
    header = f"{'file':<{width}}  {'label':<5}  " + "  ".join(f"{c:>9}" for c in schema.PROB_COLUMNS)
    click.echo(header)
    for row in frame.itertuples(index=False):
        record = row._asdict()
        probs = "  ".join(f"{record[c]:>9.4f}" for c in schema.PROB_COLUMNS)
        click.echo(f"{record['file']:<{width}}  {record['label']:<5}  {probs}")


def _legend(files: tuple[Path, ...]) -> str:
    return "rows: " + ", ".join(f"{i}={p}" for i, p in enumerate(files))


def _over_http(url: str, images: list[bytes], files: tuple[Path, ...]):
    from ecg_mlflow.serving.client import ServingError, predict_over_http

    try:
        return predict_over_http(url, images)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    except ServingError as exc:
        message = str(exc)
        if exc.status == 400:
            message += f"\n{_legend(files)}"
        click.echo(f"error: {message}", err=True)
        sys.exit(1)


def _in_process(model_uri: str, images: list[bytes], files: tuple[Path, ...]):
    import mlflow
    import pandas as pd
    from mlflow.exceptions import MlflowException

    from ecg_mlflow.serving.pyfunc import IMAGE_COLUMN

    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except (MlflowException, OSError) as exc:
        raise click.BadParameter(f"cannot load {model_uri!r}: {exc}", param_hint="--model") from None
    try:
        return model.predict(pd.DataFrame({IMAGE_COLUMN: images}))
    except MlflowException as exc:
        rows = getattr(exc, "rows", None)  # BadImageRows, whichever copy of the class raised it
        if rows is None:
            raise click.ClickException(exc.message) from None
        for row, reason in sorted(rows.items()):
            click.echo(f"error: {files[row]}: {reason}", err=True)
        click.echo(f"error: {len(rows)} of {len(files)} files are not usable images; nothing predicted", err=True)
        sys.exit(1)
