"""`ecg-mlflow features --shard I/N`: fill a shared feature cache with one shard of the images.

N of these at once (processes, machines, Kubernetes Jobs: infra/k8s/submit_features.py), all
with the same cache (`--cache-dir s3://bucket/prefix` or a shared folder), run the backbone
once per unique image between them: each takes only the contents whose SHA-256 falls in its
shard. Later `train`, `study` and `tune` runs with that cache find every feature and region map
cached.
"""

from __future__ import annotations

import click

from ecg_mlflow.model.backbones import BACKBONES
from ecg_mlflow.commands.options import TRAIN_OPTIONS, parse_or_exit, reported_errors, stop_on_sigterm
from ecg_mlflow.config import ConfigError, parse_shard

FEATURE_OPTIONS = ("data", "weights", "image_height", "image_width", "crop", "cache_dir", "engine", "precision")
"""The training options that change which features are computed, or where they go."""


def feature_options(func):
    """Decorate with the training options of FEATURE_OPTIONS, same defaults and help."""
    for name, default, help_text in reversed([o for o in TRAIN_OPTIONS if o[0] in FEATURE_OPTIONS]):
        flag = "--" + name.replace("_", "-")
        func = click.option(flag, name, default=default, show_default=bool(default), help=help_text)(func)
    return func


@click.command("features")
@click.option("--arch", default="resnet50", show_default=True, help=f"backbone: {', '.join(BACKBONES)}")
@click.option("--shard", default="0/1", show_default=True,
              help="I/N: compute shard I (0..N-1) of the unique images; N processes cover them all")
@feature_options
@click.option("--progress/--no-progress", default=False, show_default=True, help="progress bar on stderr")
def features(shard: str, progress: bool, **raw: str) -> None:
    """Compute the frozen backbone's features of one shard of the unique images into the cache."""
    config = parse_or_exit(**raw)
    try:
        index, count = parse_shard(shard)
    except ConfigError as exc:
        raise click.BadParameter(str(exc)) from None
    stop_on_sigterm()
    from ecg_mlflow.data.manifest import unique_contents
    from ecg_mlflow.model.features import default_cache_dir, select_shard
    from ecg_mlflow.model.region_cache import extract_features_and_region_maps

    with reported_errors("the entries written so far stay valid; rerun to finish the shard"):
        everything = unique_contents(config.data)
        mine = select_shard(everything, index, count)
        cache_dir = config.cache_dir or default_cache_dir()
        # Features and region maps, as a train run needs them: the runs then pass no image.
        _, _, stats = extract_features_and_region_maps(mine, config.feature_key(), cache_dir, progress=progress)
    click.echo(
        f"shard {index}/{count}: {len(mine)} of {len(everything)} unique images; "
        f"{stats.misses} computed, {stats.hits} cached, {stats.damaged} damaged; "
        f"{stats.seconds:.1f} s; cache {cache_dir}"
    )
