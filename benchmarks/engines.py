"""Backbone engines side by side: seconds per image and feature differences for each engine x
precision, the decode + resize cost of an original, and heads trained on each engine's features.

    .venv/bin/python benchmarks/engines.py --keras-cache /path/to/feature-cache

1. Speed and exactness: the three Lite backbones (weights=imagenet, offline), resnet50 and
   efficientnetv2s (weights=none: the FLOPs are the same as with ImageNet weights) at 512 x 1024,
   batch 8, on real images (../shared/data/ecg-images): Keras fp32, OpenVINO fp32, OpenVINO
   bf16. The first batch of each engine is a warm-up (graph tracing), the others are timed;
   feature differences are over every image, as max abs difference and that over the largest absolute Keras feature.
2. Decode + resize (`load_pixels`) of the 2213 x 1572 originals, one thread and the
   feature pass's pool (features.DECODE_WORKERS).
3. Heads: efficientnetlite0 (ImageNet) features at 512 x 1024 of the real data's unique
   images, Keras fp32 (read from `--keras-cache`, a feature cache folder, e.g. a study's, where
   present; the others are not computed), OpenVINO fp32 and bf16 (through the feature pass,
   decoding included), then the paper's head for each seed on each, split=grouped, and the
   per-seed test accuracy differences.

Prints tables and writes the "Backbone engines" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED = PROJECT_ROOT.parent / "shared" / "data"
HEIGHT, WIDTH, BATCH = 512, 1024, 8
SPEED_ARCHS = (("efficientnetlite0", "imagenet"), ("efficientnetlite1", "imagenet"), ("efficientnetlite2", "imagenet"),
               ("resnet50", "none"), ("efficientnetv2s", "none"))
"""Every registered backbone; the Lite ones with their offline ImageNet weights, the others
random (weights=none): Keras cannot download theirs here, and the weights do not change the FLOPs."""
HEAD_ARCH = "efficientnetlite0"
COMBOS = (("keras", "fp32"), ("openvino", "fp32"), ("openvino", "bf16"))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(SHARED / "ecg-images"))
    parser.add_argument("--originals", default=str(SHARED / "ecg-originals-sample"))
    parser.add_argument("--batches", type=int, default=3, help="batches of 8 per engine, the first a warm-up")
    parser.add_argument("--keras-cache", default="", help="feature cache folder holding Keras fp32 features")
    parser.add_argument("--head-images", type=int, default=200, help="at most this many unique images for heads")
    parser.add_argument("--seeds", default="1-3")
    parser.add_argument("--archs", default=",".join(a for a, _ in SPEED_ARCHS), help="backbones timed, in order")
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args()


def real_sample(data: str, n: int):
    """The manifest and `n` unique real images spread over the classes (sorted by content)."""
    from ecg_mlflow.data.manifest import build_manifest

    manifest = build_manifest(data, progress=False)
    unique = {}
    for record in manifest.records:
        unique.setdefault(record.sha256, manifest.path_of(record))
    shas = sorted(unique)
    return manifest, [unique[s] for s in shas[:: max(1, len(shas) // n)][:n]]


def interleaved_passes(runs: dict[str, object], batches: list[np.ndarray]) -> dict[str, tuple[np.ndarray, float]]:
    """Features of every batch and seconds per image over all batches but the first (a
    warm-up), for each runner; the runners take turns batch by batch, so a shared machine's
    changing load weighs on all of them alike."""
    outputs = {name: [] for name in runs}
    seconds = {name: 0.0 for name in runs}
    for index, batch in enumerate(batches):
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name].append(np.asarray(run(batch)))
            if index:
                seconds[name] += time.perf_counter() - start
    timed = BATCH * max(1, len(batches) - 1)
    return {name: (np.concatenate(outputs[name]), seconds[name] / timed) for name in runs}


def speed_rows(paths, n_batches: int, archs, on_arch=lambda rows, notes: None) -> tuple[list[list[object]], dict]:
    """One row per (arch, engine, precision): s/image, speed-up, differences vs Keras fp32;
    `on_arch` sees the rows so far after each backbone (the section is written as it goes)."""
    import keras

    from ecg_mlflow.data.preprocess import load_batch
    from ecg_mlflow.model.backbones import build_feature_extractor
    from ecg_mlflow.model.engines import OpenVinoRunner, bf16_missing, convert_keras

    pixels = load_batch(paths[: BATCH * n_batches], HEIGHT, WIDTH)
    batches = [pixels[i:i + BATCH] for i in range(0, len(pixels), BATCH)]
    rows, notes = [], {"bf16_missing": bf16_missing(), "convert_s": {}, "compiled": {}}
    for arch, weights in archs:
        model = build_feature_extractor(arch, weights, HEIGHT, WIDTH)
        start = time.perf_counter()
        converted = convert_keras(model)
        notes["convert_s"][arch] = time.perf_counter() - start
        runs = {("keras", "fp32"): model.predict_on_batch}
        for precision in ("fp32", "bf16"):
            runner = OpenVinoRunner(model, precision, converted=converted)
            notes["compiled"][(arch, precision)] = runner.compiled_precision
            runs[("openvino", precision)] = runner.predict_on_batch
        results = interleaved_passes(runs, batches)
        reference, keras_s = results[("keras", "fp32")]
        for (engine, precision), (features, seconds) in results.items():
            diff = float(np.abs(features - reference).max())
            rows.append([arch, weights, engine, precision, f"{seconds:.3f}", f"{keras_s / seconds:.2f}x",
                         f"{diff:.1e}", f"{diff / float(np.abs(reference).max()):.1e}"])
            print(rows[-1], flush=True)
        del model, converted, runs, results
        keras.backend.clear_session()
        gc.collect()
        on_arch(rows, notes)
    return rows, notes


def decode_rows(originals: str, half_size: list[Path]) -> list[list[object]]:
    """load_pixels to 512 x 1024: ms per image in one thread, and with the pass's pool."""
    from ecg_mlflow.data.preprocess import load_pixels
    from ecg_mlflow.model.features import DECODE_WORKERS

    rows = []
    files = sorted(p for p in Path(originals).rglob("*") if p.is_file())
    for name, sources in (("original 2213 x 1572", files), ("half-size copy (the study's images)", half_size[:16])):
        load_pixels(sources[0], HEIGHT, WIDTH)
        start = time.perf_counter()
        for source in sources:
            load_pixels(source, HEIGHT, WIDTH)
        one = (time.perf_counter() - start) / len(sources)
        with ThreadPoolExecutor(DECODE_WORKERS) as pool:
            start = time.perf_counter()
            list(pool.map(lambda s: load_pixels(s, HEIGHT, WIDTH), sources * 2))
            pooled = (time.perf_counter() - start) / (2 * len(sources))
        rows.append([name, len(sources), f"{one * 1000:.0f}", DECODE_WORKERS, f"{pooled * 1000:.0f}"])
        print(rows[-1], flush=True)
    return rows


def cached_keras_features(manifest, keras_cache: str, limit: int, workdir: Path) -> dict[str, np.ndarray]:
    """Keras fp32 features of HEAD_ARCH at 512 x 1024 that `keras_cache` holds, read from a
    copy of its folder (the cache may belong to a running study: nothing is written there)."""
    import shutil

    from ecg_mlflow.model.features import FeatureCache, FeatureKey

    key = FeatureKey(HEAD_ARCH, "imagenet", HEIGHT, WIDTH, "none")
    folder = Path(keras_cache) / HEAD_ARCH / key.digest
    if not folder.is_dir():
        return {}
    shutil.copytree(folder, workdir / HEAD_ARCH / key.digest, ignore=shutil.ignore_patterns(".*.tmp"))
    cache = FeatureCache(workdir, key)
    found = {}
    for sha in sorted({r.sha256 for r in manifest.records}):
        vector = cache.load(sha)
        if vector is not None:
            found[sha] = vector
        if len(found) >= limit:
            break
    return found


def head_rows(manifest, keras_features: dict, seeds, workdir: Path):
    """Per seed: test accuracy of the paper's head on each engine's features (same split)."""
    from ecg_mlflow.data.splits import make_split
    from ecg_mlflow.model.engines import bf16_missing
    from ecg_mlflow.model.evaluation import evaluate
    from ecg_mlflow.model.features import FeatureKey, extract_features
    from ecg_mlflow.model.head import HeadConfig, one_hot, train_head

    subset = manifest.subset([r.relpath for r in manifest.records if r.sha256 in keras_features])
    paths = {}
    for record in subset.records:
        paths.setdefault(record.sha256, subset.path_of(record))
    sets = {("keras", "fp32"): keras_features}
    pass_s = {}
    for engine, precision in COMBOS[1:]:
        if precision == "bf16" and bf16_missing():
            continue
        key = FeatureKey(HEAD_ARCH, "imagenet", HEIGHT, WIDTH, "none", engine, precision)
        features, stats = extract_features(paths, key, workdir / "cache", progress=True)
        sets[(engine, precision)] = features
        pass_s[(engine, precision)] = stats.seconds / max(1, stats.misses)
    records = {r.relpath: r for r in subset.records}
    rows, diffs = [], {}
    for seed in seeds:
        split = make_split(subset, "grouped", seed)
        accuracy = {}
        for combo, features in sets.items():
            def xy(part):
                files = getattr(split, part)
                return (np.stack([features[records[p].sha256] for p in files]),
                        one_hot([records[p].label for p in files]))

            head, _ = train_head(*xy("train"), *xy("val"), HeadConfig(), seed)
            x_test, _ = xy("test")
            probs = np.asarray(head.predict(x_test, verbose=0))
            accuracy[combo] = evaluate("test", [records[p].label for p in split.test], probs)["test_accuracy"]
        base = accuracy[("keras", "fp32")]
        row = [seed, len(split.train), len(split.test)] + [f"{accuracy[c]:.3f}" for c in sets]
        row += [f"{accuracy[c] - base:+.3f}" for c in list(sets)[1:]]
        for c in list(sets)[1:]:
            diffs.setdefault(c, []).append(accuracy[c] - base)
        rows.append(row)
        print(row, flush=True)
    return rows, list(sets), diffs, pass_s, len(paths)


def main() -> None:
    args = parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from report import write_section

    from ecg_mlflow.parsing import parse_seeds

    started = time.perf_counter()
    manifest, sample = real_sample(args.data, BATCH * args.batches)
    archs = [(a, w) for a, w in SPEED_ARCHS if a in args.archs.split(",")]
    state: dict = {"speed": [], "notes": {}, "decode": [], "heads": None}

    # Without backbones to time (`--archs ""`) only the heads run, into a section of their own.
    title = "Backbone engines" if archs else "Backbone engines: heads"

    def publish(partial: bool) -> None:
        text = section(args, state, started, partial)
        print(text, flush=True)
        if not args.no_write:
            write_section(title, text)

    if archs:
        state["decode"] = decode_rows(args.originals, sample)

    def on_arch(rows, notes) -> None:
        state["speed"], state["notes"] = rows, notes
        publish(partial=True)

    speed_rows(sample, args.batches, archs, on_arch)
    if args.keras_cache:
        with tempfile.TemporaryDirectory(prefix="ecg-engines-") as tmp:
            keras_features = cached_keras_features(manifest, args.keras_cache, args.head_images, Path(tmp) / "keras")
            if keras_features:
                state["heads"] = head_rows(manifest, keras_features, parse_seeds(args.seeds), Path(tmp))
    publish(partial=False)


def section(args, state, started: float, partial: bool) -> str:
    """The benchmark's section of docs/benchmarks.md from what has been measured so far."""
    from report import machine, markdown_table

    from ecg_mlflow.model.engines import cpu_capabilities

    speed, notes, decode, heads = state["speed"], state["notes"], state["decode"], state["heads"]
    body = [f"`benchmarks/engines.py --archs '{args.archs}' --batches {args.batches} --seeds {args.seeds} --head-images "
            f"{args.head_images}` on {machine()} (shared; load average {os.getloadavg()[0]:.1f} when written), "
            f"CPU `{cpu_name()}`, OpenVINO capabilities {', '.join(cpu_capabilities())}; "
            f"{time.perf_counter() - started:.0f} s" + (" so far (partial: the run was still going)." if partial else " in all.")]
    if speed:
        body += ["", f"Backbone pass at {HEIGHT} x {WIDTH}, batch {BATCH}, on {BATCH * args.batches} real images "
                 f"(ecg-images): first batch a warm-up, {args.batches - 1} timed, the engines taking turns batch by "
                 "batch. Differences are of pooled "
                 "features against Keras fp32 over every image: max abs, and that over the largest absolute feature.", "",
                 markdown_table(["backbone", "weights", "engine", "precision", "s/image", "vs keras",
                                 "max abs diff", "diff / max abs feature"], speed), ""]
        body.append("OpenVINO conversion (`openvino.convert_model` of the Keras extractor, once per process): "
                    + ", ".join(f"{a} {s:.0f} s" for a, s in notes["convert_s"].items()) + ".")
        compiled = {p for (a, q), p in notes["compiled"].items() if q == "bf16"}
        if notes["bf16_missing"]:
            body.append(f"bf16 here: {notes['bf16_missing']}. Asked for bf16, OpenVINO compiled for "
                        f"{', '.join(sorted(compiled))} and computed in f32 (same speed, same features), so "
                        "`resolve_engine` refuses precision=bf16 for training here and the served model falls "
                        "back to fp32 with a warning.")
    if decode:
        body += ["", "Decode + resize (`load_pixels` to 512 x 1024), ms per image:", "",
                 markdown_table(["images", "n", "1 thread", "pool threads", "pool, per image"], decode)]
    if heads:
        rows, combos, diffs, pass_s, n_unique = heads
        names = [f"{e} {p}" for e, p in combos]
        body += ["", f"Heads on {HEAD_ARCH} (ImageNet) features at {HEIGHT} x {WIDTH} of {n_unique} unique real "
                 "images (those whose Keras fp32 features the given cache held), split=grouped on that subset, "
                 "the paper's head, test accuracy per seed:", "",
                 markdown_table(["seed", "n train", "n test", *names, *[f"{n} - keras fp32" for n in names[1:]]],
                                rows), ""]
        for combo, values in diffs.items():
            body.append(f"- {combo[0]} {combo[1]} - keras fp32: mean {np.mean(values):+.4f}, max |diff| "
                        f"{np.max(np.abs(values)):.4f} over {len(values)} seeds; its feature pass "
                        f"(decode included) {pass_s[combo]:.3f} s/image.")
    return "\n".join(body)


def cpu_name() -> str:
    from ecg_mlflow.model.engines import OPENVINO_DEVICE

    import openvino

    return openvino.Core().get_property(OPENVINO_DEVICE, "FULL_DEVICE_NAME")


if __name__ == "__main__":
    main()
