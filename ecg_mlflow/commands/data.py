"""`ecg-mlflow data describe|verify|download`: look at, check and fetch a dataset folder."""

from __future__ import annotations

import json
import sys

import click

_EXIT_CODES_HELP = (
    "Exit code: 0 when every file matches; otherwise the sum of 8 (files missing), "
    "16 (files changed: SHA-256 differs) and 32 (extra files). 1 and 2 are errors."
)


@click.group("data")
def data() -> None:
    """Describe, verify and download ECG image datasets (a folder of class folders)."""


@data.command("describe")
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
@click.option("--skip-bad", is_flag=True, help="Exclude and count unreadable images instead of failing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of a table.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
def describe_command(directory: str, skip_bad: bool, as_json: bool, progress: bool) -> None:
    """Per class: files, unique images, duplicate groups, near-duplicate pairs; and the digest."""
    from ecg_mlflow.data.manifest import DatasetError, build_manifest, describe

    try:
        manifest = build_manifest(directory, skip_bad=skip_bad, progress=progress and not as_json)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from None
    table = describe(manifest)
    if as_json:
        report = {
            "root": str(manifest.root),
            "digest": manifest.digest,
            "classes": {label: {k: int(v) for k, v in row.items()} for label, row in table.iterrows()},
            "ignored": manifest.n_ignored,
            "bad": [{"relpath": p, "reason": r} for p, r in manifest.bad],
        }
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(table.to_string())
    click.echo(f"ignored stray files: {manifest.n_ignored}")
    click.echo(f"bad images excluded: {len(manifest.bad)}")
    for relpath, reason in manifest.bad:
        click.echo(f"  {relpath}: {reason}")
    click.echo(f"digest: {manifest.digest}")


def _report(result, limit: int = 20) -> None:  # result: mendeley.Verification
    click.echo(f"{result.root}: {result.summary()}")
    for kind in ("missing", "changed", "extra"):
        paths = getattr(result, kind)
        for relpath in paths[:limit]:
            click.echo(f"  {kind}: {relpath}")
        if len(paths) > limit:
            click.echo(f"  ... and {len(paths) - limit} more {kind}")


@data.command("verify", epilog=_EXIT_CODES_HELP)
@click.argument("directory", type=click.Path(exists=True, file_okay=False))
def verify_command(directory: str) -> None:
    """Check DIRECTORY file by file against the published Mendeley v2 SHA-256 list."""
    from ecg_mlflow.data.manifest import DatasetError
    from ecg_mlflow.data.mendeley import verify

    try:
        result = verify(directory)
    except DatasetError as exc:
        raise click.ClickException(str(exc)) from None
    _report(result)
    sys.exit(result.exit_code)


@data.command("download", epilog=_EXIT_CODES_HELP)
@click.argument("directory", type=click.Path(file_okay=False))
@click.option("--url", default=None, help="Archive to fetch. Default: the public Mendeley v2 download.")
@click.option("--attempts", default=4, show_default=True, type=click.IntRange(min=1), help="Tries before giving up.")
@click.option("--backoff", default=2.0, show_default=True, type=click.FloatRange(min=0.0),
              help="Seconds before the first retry; doubles with every retry.")
def download_command(directory: str, url: str | None, attempts: int, backoff: float) -> None:
    """Download the Mendeley v2 archive, unpack its class folders into DIRECTORY, verify them."""
    from ecg_mlflow.data.manifest import DatasetError
    from ecg_mlflow.data.mendeley import MENDELEY_URL
    from ecg_mlflow.data.download import DownloadError, download_dataset

    try:
        result = download_dataset(directory, url or MENDELEY_URL, attempts=attempts, backoff_s=backoff)
    except (DownloadError, DatasetError) as exc:
        raise click.ClickException(str(exc)) from None
    _report(result)
    sys.exit(result.exit_code)
