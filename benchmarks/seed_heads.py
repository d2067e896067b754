"""Head training: the heads of 10 seeds trained together against one after another.

On the same features, splits and seeds, side by side in one run, for the two widths of
the paper's backbones (2048: ResNet-50, 1280: EfficientNetV2-S): `train_seed_heads`
(all seeds in one computation) against `train_head` per seed (Keras' fit), the paper's
head (batch 16, up to 100 epochs, patience 5). Features are the real data's when
`--cache-dir` holds a complete feature cache of ../shared/data/ecg-images for that
backbone (512 x 1024, the entries of --weights and --engine), split as the paper does
per seed, else random features of the real shapes (593 train / 148 validation per seed
from 741 rows, 187 test rows) with the real class balance.

    .venv/bin/python benchmarks/seed_heads.py --seeds 10 \
        --archs resnet50,efficientnetv2s,efficientnetlite0 --weights imagenet --engine openvino \
        --cache-dir DIR   # random features for the first two, the real data's for the Lite

Prints a table and writes the "Head training: seeds together" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "ecg-images"
WIDTHS = {"resnet50": 2048, "efficientnetv2s": 1280, "efficientnetlite0": 1280, "efficientnetlite2": 1280}
N_TRAIN, N_VAL, N_TEST = 593, 148, 187
RANDOM_SEED = 0
SPLIT_SEED = 42


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=10, help="seeds 1..N")
    parser.add_argument("--archs", default=",".join(WIDTHS))
    parser.add_argument("--max-epochs", type=int, default=100)
    parser.add_argument("--cache-dir", default="", help="a feature cache of the real data, if any")
    parser.add_argument("--weights", default="none", help="the cache entries' weights (imagenet: the Lites)")
    parser.add_argument("--engine", default="keras", help="the cache entries' engine")
    parser.add_argument("--data", default=str(REAL_IMAGES))
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args()


def cached_real_features(arch: str, data: str, cache_dir: str, weights: str, engine: str):
    """(features, one-hot labels, train/val/test rows per seed) from a complete cache of
    the real data, or None when any image's features are missing."""
    from ecg_mlflow.config import PAPER_HEIGHT, PAPER_WIDTH
    from ecg_mlflow.data.manifest import build_manifest
    from ecg_mlflow.model.features import FeatureCache, FeatureKey
    from ecg_mlflow.model.head import one_hot

    if not cache_dir or not Path(data).is_dir():
        return None
    manifest = build_manifest(data, progress=False)
    cache = FeatureCache(cache_dir, FeatureKey(arch, weights, PAPER_HEIGHT, PAPER_WIDTH, "none", engine, "fp32"))
    rows = [cache.load(r.sha256) for r in manifest.records]
    if any(r is None for r in rows):
        return None
    return manifest, np.stack(rows), one_hot([r.label for r in manifest.records])


def random_features(width: int):
    """Gaussian features of the real shapes, labels in the real data's class balance."""
    rng = np.random.default_rng(RANDOM_SEED)
    n = N_TRAIN + N_VAL + N_TEST
    labels = rng.choice(4, size=n, p=(0.26, 0.18, 0.25, 0.31))
    features = np.abs(rng.normal(0, 1, (n, width))).astype(np.float32)  # post-ReLU pooling
    return features, np.eye(4, dtype=np.float32)[labels]


def seed_rows(n_seeds: int, real=None):
    """Per seed its train and validation rows, and the shared test rows: the paper's split
    on real data, else a fixed test draw and one validation draw per seed."""
    from ecg_mlflow.model.seed_heads import SeedRows
    from ecg_mlflow.data.splits import make_split

    if real is not None:
        manifest = real[0]
        index = {r.relpath: i for i, r in enumerate(manifest.records)}
        rows = []
        for seed in range(1, n_seeds + 1):
            split = make_split(manifest, "paper", seed)
            rows.append(SeedRows(seed, np.array([index[p] for p in split.train]),
                                 np.array([index[p] for p in split.val])))
        return rows, np.array([index[p] for p in split.test])
    test = np.random.default_rng(SPLIT_SEED).permutation(N_TRAIN + N_VAL + N_TEST)
    rest, test = test[N_TEST:], np.sort(test[:N_TEST])
    rows = []
    for seed in range(1, n_seeds + 1):
        order = np.random.default_rng(seed).permutation(rest)
        rows.append(SeedRows(seed, np.sort(order[N_VAL:]), np.sort(order[:N_VAL])))
    return rows, test


def one_after_another(features, labels, rows, config):
    """train_head per seed, as the study did before; seconds, test probabilities, epochs."""
    import keras

    from ecg_mlflow.model.head import train_head

    start = time.perf_counter()
    heads = {}
    for r in rows:
        keras.backend.clear_session()
        heads[r.seed] = train_head(features[r.train], labels[r.train], features[r.val], labels[r.val],
                                   config, r.seed)
    return time.perf_counter() - start, heads


def together(features, labels, rows, config):
    from ecg_mlflow.model.seed_heads import train_seed_heads

    start = time.perf_counter()
    heads = train_seed_heads(features, labels, rows, config)
    return time.perf_counter() - start, heads


def in_processes(features, labels, rows, config):
    """train_seed_heads as a study runs it: the seeds dealt into head_processes() one-thread
    child processes, all at once."""
    from ecg_mlflow.model.head_process import HeadsInChildProcess, deal
    from ecg_mlflow.study import head_processes

    start = time.perf_counter()
    trainings = [HeadsInChildProcess(features, labels, group, config) for group in deal(rows, head_processes())]
    heads = {}
    try:
        for training in trainings:
            heads.update(training.result()[0])
    finally:
        for training in trainings:
            training.close()
    return time.perf_counter() - start, heads


def compare(features, test, alone, joint) -> tuple[float, float, int]:
    """Share of test rows with the same label, max abs probability difference, and how
    many seeds stopped at the same epoch, over all seeds."""
    same, diffs, epochs = [], [], 0
    for seed, (head, history) in alone.items():
        other, other_history = joint[seed]
        a = np.asarray(head.predict(features[test], verbose=0))
        b = np.asarray(other.predict(features[test], verbose=0))
        same.append((a.argmax(1) == b.argmax(1)).mean())
        diffs.append(np.abs(a - b).max())
        epochs += history.stopped_epoch == other_history.stopped_epoch
    return float(np.mean(same)), float(np.max(diffs)), epochs


def main() -> None:
    args = parse_args()
    from report import machine, markdown_table, write_section
    from ecg_mlflow.model.head import HeadConfig
    from ecg_mlflow.model.seed_heads import compile_kernels  # before the long first part
    from ecg_mlflow.study import head_processes

    config = HeadConfig(max_epochs=args.max_epochs)
    compile_kernels()
    rows_out, sources = [], set()
    for arch in args.archs.split(","):
        real = cached_real_features(arch, args.data, args.cache_dir, args.weights, args.engine)
        features, labels = (real[1], real[2]) if real is not None else random_features(WIDTHS[arch])
        source = "real (cached)" if real is not None else "random"
        sources.add(source)
        rows, test = seed_rows(args.seeds, real)
        print(f"{arch} ({features.shape[1]} wide): {args.seeds} seeds one after another ...", flush=True)
        alone_s, alone = one_after_another(features, labels, rows, config)
        print(f"{arch}: {alone_s:.1f} s; together ...", flush=True)
        joint_s, joint = together(features, labels, rows, config)
        print(f"{arch}: {joint_s:.1f} s; in {head_processes()} one-thread processes ...", flush=True)
        split_s, split = in_processes(features, labels, rows, config)
        print(f"{arch}: {split_s:.1f} s", flush=True)
        same, diff, epochs = compare(features, test, alone, joint)
        _, split_diff, _ = compare(features, test, joint, split)
        trained = sum(h.stopped_epoch for _, h in alone.values())
        rows_out.append([arch, source, f"{len(rows[0].train)} / {len(rows[0].val)} / {len(test)}",
                         features.shape[1], args.seeds, trained, f"{alone_s:.1f}", f"{joint_s:.1f}",
                         f"{alone_s / joint_s:.1f}x", f"{split_s:.1f}", f"{alone_s / split_s:.1f}x",
                         f"{same:.1%}", f"{diff:.1g}", f"{epochs}/{args.seeds}", f"{split_diff:.1g}"])
    processes = head_processes()
    header = ["features of", "features", "seed 1's train / val / test rows", "width", "seeds",
              "epochs trained (all seeds)", "one after another: s", "together: s", "speed-up",
              f"together in {processes} processes: s", "speed-up", "same test labels", "max abs prob diff",
              "same stopped epoch", "processes vs one: max abs prob diff"]
    table = markdown_table(header, rows_out)
    print(table)
    if args.no_write:
        return
    cache_args = "`"
    if "real (cached)" in sources:
        cache_args = (f" --weights {args.weights} --engine {args.engine} --cache-dir <cache>` (the cache: the one "
                      "benchmarks/cold_study.py fills)")
    body = (
        f"`benchmarks/seed_heads.py --seeds {args.seeds} --max-epochs {args.max_epochs} --archs {args.archs}"
        f"{cache_args}: the paper's "
        f"head (1024-512-4, dropout 0.2, Adam 1e-4, batch 16, patience 5) for seeds 1-{args.seeds} on "
        f"{' and '.join(sorted(sources))} features (real: the cached {args.weights} / {args.engine} features "
        "of the real data at 512 x 1024, split as the paper does per seed; random: Gaussian features of "
        "the real shapes, validation drawn per seed), trained one after another with `train_head` "
        f"(Keras' fit, as studies did before), all together with `train_seed_heads` in this process, and "
        f"dealt into {processes} one-thread child processes at once (model/head_process.py: what a study "
        "does), after Numba has compiled the trainer's kernels (once per install, cached on disk). "
        f"Machine: {machine()}.\n\n{table}\n\n"
        "Both ways give every seed the same initial weights, shuffle order and dropout masks "
        "(ecg_mlflow/model/seed_heads.py says how); the differences left are float32 rounding in "
        "another reduction order, which long training can amplify on random features. "
        "Where the time goes: Keras runs one seed's step at a time with an unfused Adam (about ten "
        "elementwise passes over each 2048 x 1024 kernel); together, each step is a few Numba loops "
        "(model/head_kernels.py): the forward pass, and per dense layer its weight gradient and Adam "
        "update in one pass over kernel and moments (the first layer's pass also forms the next "
        "batch's forward pass), blocked four by four, with subnormals flushed to zero "
        "as TensorFlow does; the dropout masks are TensorFlow's, drawn in Numba "
        "(model/dropout_masks.py); a seed that stopped costs nothing. The first kernel and its two "
        "moments are read and written every step (25 MB at width 2048). Dealt into one-thread child "
        "processes (the last columns; the same heads either way), the seeds take about as long as on two "
        "threads in this process: one thread per process wastes nothing on keeping threads in step, but "
        "the process whose seeds stop first leaves its core idle. A study gains from the processes "
        "otherwise: it logs each process's runs on the core it frees, beside the others' training "
        "(see the cold study below)."
    )
    write_section("Head training: seeds together", body)


if __name__ == "__main__":
    main()
