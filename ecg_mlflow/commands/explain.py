"""`ecg-mlflow explain FILES...`: which report regions a model looked at, per image.

Writes DIR/region_attribution.csv (one row per file: label, probabilities, text share and
the Grad-CAM attribution of the predicted class per template region) and one overlay PNG per
file: the Grad-CAM heatmap with --model (the map is computed here), or each region tinted by
its share of the attribution with --url (a server returns region numbers only).
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from ecg_mlflow import schema

TINT_HEIGHT = 512
"""Height of the region-tint pictures of --url (the page keeps its aspect ratio)."""
TABLE = "region_attribution.csv"


@click.command()
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--model", "model_uri", default=None,
              help=f"a serving model URI explained in this process, e.g. models:/{schema.DEFAULT_MODEL_NAME}@{schema.CHAMPION_ALIAS}")
@click.option("--url", default=None, help="a served model, e.g. http://127.0.0.1:5001 (asked with param explain=true)")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="folder for the table and overlays")
def explain(files: tuple[Path, ...], model_uri: str | None, url: str | None, out: Path) -> None:
    """Explain each image FILE by report region (12 leads, rhythm strip, header, footer,
    margin): Grad-CAM of the predicted class, and the share on the printed text."""
    if (url is None) == (model_uri is None):
        raise click.UsageError("give exactly one of --model (a model URI) and --url (a served model)")
    images = [path.read_bytes() for path in files]
    out.mkdir(parents=True, exist_ok=True)
    if model_uri is not None:
        frame, pictures = _in_process(model_uri, images, files)
    else:
        frame, pictures = _over_http(url, images, files)
    frame.insert(0, "file", [str(p) for p in files])
    frame.to_csv(out / TABLE, index=False)
    for index, (path, picture) in enumerate(zip(files, pictures)):
        picture.save(out / f"{index:03d}_{path.stem}_overlay.png")
    for row in frame.itertuples(index=False):
        record = row._asdict()
        click.echo(f"{record['file']}: {record['label']}, text share {record[schema.COL_TEXT_SHARE]:.3f}")
    click.echo(f"wrote {out / TABLE} and {len(pictures)} overlays")


def _caption(label: str, share: float) -> str:
    return f"predicted {label}  text share {share:.2f}"


def _in_process(model_uri: str, images: list[bytes], files: tuple[Path, ...]):
    import mlflow
    from mlflow.exceptions import MlflowException

    from ecg_mlflow.model.explain_figures import overlay_picture
    from ecg_mlflow.serving.pyfunc import explanation_frame

    try:
        model = mlflow.pyfunc.load_model(model_uri).unwrap_python_model()
    except (MlflowException, OSError, AttributeError) as exc:
        raise click.BadParameter(f"cannot load {model_uri!r} as a serving model: {exc}", param_hint="--model") from None
    if not hasattr(model, "explain_images"):  # duck-typed: the model's own copy of the class
        raise click.BadParameter(f"{model_uri!r} is no ecg-mlflow serving model", param_hint="--model")
    try:
        pixels, explained = model.explain_images(images)
    except MlflowException as exc:
        _fail_on_bad_rows(exc, files)
    frame = explanation_frame(explained.probabilities, explained.of_predicted)
    crop = model.preprocessing.crop
    pictures = [overlay_picture(pixels[i], explained.cam[i], crop, _caption(frame.label[i], frame[schema.COL_TEXT_SHARE][i]))
                for i in range(len(files))]
    return frame, pictures


def _over_http(url: str, images: list[bytes], files: tuple[Path, ...]):
    import numpy as np

    from ecg_mlflow.data.preprocess import ImageDecodeError, load_pixels, open_image
    from ecg_mlflow.model.explain_figures import region_tint_picture
    from ecg_mlflow.model.regions import REGION_SLUGS
    from ecg_mlflow.serving.client import ServingError, predict_over_http

    try:
        frame = predict_over_http(url, images, explain=True)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--url") from None
    except ServingError as exc:
        click.echo(f"error: {exc}\nrows: " + ", ".join(f"{i}={p}" for i, p in enumerate(files)), err=True)
        sys.exit(1)
    columns = [schema.attribution_column(s) for s in REGION_SLUGS]
    pictures = []
    for i, image in enumerate(images):
        try:
            width, height = open_image(image).size
            pixels = load_pixels(image, TINT_HEIGHT, max(1, round(TINT_HEIGHT * width / height)))
        except ImageDecodeError as exc:
            raise click.ClickException(f"{files[i]}: {exc}") from None
        attribution = frame.loc[i, columns].to_numpy(np.float64)
        pictures.append(region_tint_picture(pixels, attribution, "none",
                                            _caption(frame.label[i], frame[schema.COL_TEXT_SHARE][i])))
    return frame, pictures


def _fail_on_bad_rows(exc, files: tuple[Path, ...]) -> None:
    rows = getattr(exc, "rows", None)
    if rows is None:
        raise click.ClickException(exc.message) from None
    for row, reason in sorted(rows.items()):
        click.echo(f"error: {files[row]}: {reason}", err=True)
    click.echo(f"error: {len(rows)} of {len(files)} files are not usable images; nothing explained", err=True)
    sys.exit(1)
