"""`ecg-mlflow synth`: write a synthetic ECG report dataset (MLproject entry point `synth`)."""

from __future__ import annotations

import time

import click

from ecg_mlflow.commands.options import BadValue
from ecg_mlflow.parsing import ConfigError, parse_float, parse_int


@click.command("synth")
@click.option("--out", required=True,
              help="Directory to write; must be new, empty, or a previous synth output (replaced).")
@click.option("--per-class", "per_class", default="25", show_default=True,
              help="Files per class, copies included.")
@click.option("--seed", default="0", show_default=True, help="Same seed, byte-identical files.")
@click.option("--width", default="2213", show_default=True, help="Page width in pixels.")
@click.option("--height", default="1572", show_default=True, help="Page height in pixels.")
@click.option("--duplicates", default="0.0", show_default=True,
              help="Fraction of each class's files that are byte-identical copies (the real set: about 0.47).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Show a progress bar.")
def synth(out: str, per_class: str, seed: str, width: str, height: str, duplicates: str, progress: bool) -> None:
    """Write synthetic 12-lead ECG reports in the Mendeley folder layout.

    Each class (MI, HMI, AHB, NORM) gets its own folder with files named like the real set
    (MI(1).jpg, PMI(1).jpg, HB(1).jpg, Normal(1).jpg).
    """
    from ecg_mlflow.synth.reports import MAX_HEIGHT, MAX_WIDTH, MIN_HEIGHT, MIN_WIDTH, write_synthetic_dataset

    try:
        n = parse_int("--per-class", per_class, minimum=1)
        s = parse_int("--seed", seed, minimum=0)
        w = parse_int("--width", width, minimum=MIN_WIDTH, maximum=MAX_WIDTH)
        h = parse_int("--height", height, minimum=MIN_HEIGHT, maximum=MAX_HEIGHT)
        d = parse_float("--duplicates", duplicates, 0.0, 1.0, low_open=False)
    except ConfigError as exc:
        raise BadValue(str(exc)) from None

    started = time.perf_counter()
    try:
        summary = write_synthetic_dataset(
            out, per_class=n, seed=s, width=w, height=h, duplicates=d, progress=progress
        )
    except ValueError as error:
        raise click.ClickException(str(error)) from None
    seconds = time.perf_counter() - started

    click.echo(f"wrote {summary.total_files} synthetic ECG reports ({w} x {h}, seed {s}) to {summary.out}")
    for cls, files in summary.files.items():
        click.echo(f"  {cls:<5} {files:>5} files  {summary.unique[cls]:>5} unique")
    click.echo(f"in {seconds:.1f} s ({summary.total_files / seconds:.1f} files/s)")
