"""Explanations: cost per explained image and agreement of Grad-CAM with occlusion.

Three ways to explain an image by report region, side by side on the same real images and
the same trained head:

- Grad-CAM from cached region maps: what every train run does for its whole test set. The
  region-pooled maps come out of the feature pass (its extra cost is measured: pass with
  maps against the plain feature pass); per image only the head's Jacobian remains.
- Grad-CAM with the full map: one backbone pass for the map (the overlay pictures, the
  served model's `explain`, `ecg-mlflow explain --model`).
- Occlusion: grey out each region in turn, one backbone pass per region.

The head is trained on the features of `--per-class` unique images per class (the first
image of each class is held out and explained). Agreement: per explained image, Spearman's
rank correlation between the Grad-CAM region sums (predicted class) and the occlusion drops
over the regions in the input, and whether both put the same region first.

    .venv/bin/python benchmarks/explanations.py --per-class 8

Prints a table and writes the "Explanations" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "ecg-images"
HEAD_EPOCHS = 30
CACHED_REPEATS = 20


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REAL_IMAGES))
    parser.add_argument("--arch", default="efficientnetlite0")
    parser.add_argument("--weights", default="imagenet")
    parser.add_argument("--per-class", type=int, default=8, help="unique images per class (first by name)")
    parser.add_argument("--image-height", type=int, default=512)
    parser.add_argument("--image-width", type=int, default=1024)
    parser.add_argument("--crop", default="none", choices=("none", "grid"))
    parser.add_argument("--no-write", action="store_true", help="print only")
    return parser.parse_args()


def unique_subset(data: str, per_class: int) -> tuple[dict[str, Path], dict[str, str]]:
    """(sha -> path, sha -> class) of the first `per_class` unique images of each class."""
    from ecg_mlflow.data.manifest import build_manifest

    manifest = build_manifest(data, progress=False)
    paths: dict[str, Path] = {}
    labels: dict[str, str] = {}
    counts: dict[str, int] = {}
    for record in manifest.records:
        if record.sha256 in paths or counts.get(record.label, 0) >= per_class:
            continue
        paths[record.sha256] = manifest.path_of(record)
        labels[record.sha256] = record.label
        counts[record.label] = counts.get(record.label, 0) + 1
    return paths, labels


def timed(function, *args, **kwargs):
    start = time.perf_counter()
    result = function(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    args = parse_args()
    from ecg_mlflow.data.classes import CLASSES
    from ecg_mlflow.data.preprocess import load_batch
    from ecg_mlflow.model import regions
    from ecg_mlflow.model.backbones import shared_feature_extractor
    from ecg_mlflow.model.explain import explain_pixels, explain_pooled, occlusion_drops, spearman
    from ecg_mlflow.model.explain_figures import overlay_picture
    from ecg_mlflow.model.features import FeatureKey, extract_features
    from ecg_mlflow.model.head import HeadConfig, one_hot, train_head
    from ecg_mlflow.model.region_cache import extract_features_and_region_maps, shared_maps_model

    paths, labels = unique_subset(args.data, args.per_class)
    key = FeatureKey(args.arch, args.weights, args.image_height, args.image_width, args.crop)
    shared_feature_extractor(key.arch, key.weights, key.height, key.width)
    shared_maps_model(key)
    with tempfile.TemporaryDirectory(prefix="ecg-explain-bench-") as tmp:
        # Warm both graphs on one image, so neither pass pays tracing.
        warm = dict(list(paths.items())[:1])
        extract_features(warm, key, Path(tmp) / "warm-a")
        extract_features_and_region_maps(warm, key, Path(tmp) / "warm-b")
        (plain, _), plain_s = timed(extract_features, paths, key, Path(tmp) / "plain")
        (features, pooled, _), maps_s = timed(extract_features_and_region_maps, paths, key, Path(tmp) / "maps")
    shas = sorted(paths)
    explained = [next(s for s in shas if labels[s] == cls) for cls in CLASSES if cls in labels.values()]
    trained = [s for s in shas if s not in explained]
    x, y = np.stack([features[s] for s in trained]), one_hot([labels[s] for s in trained])
    head, _ = train_head(x, y, x, y, HeadConfig(max_epochs=HEAD_EPOCHS, patience=HEAD_EPOCHS), seed=1)

    f_exp = np.stack([features[s] for s in explained])
    p_exp = np.stack([pooled[s] for s in explained])
    explain_pooled(head, f_exp, p_exp)  # trace the Jacobian once
    start = time.perf_counter()
    for _ in range(CACHED_REPEATS):
        cached = explain_pooled(head, f_exp, p_exp)
    cached_s = (time.perf_counter() - start) / CACHED_REPEATS / len(explained)

    pixels = load_batch([paths[s] for s in explained], key.height, key.width, key.crop)
    maps_model = shared_maps_model(key)
    explain_pixels(maps_model, head, pixels[:1], key.crop)
    start = time.perf_counter()
    full = [explain_pixels(maps_model, head, pixels[i:i + 1], key.crop) for i in range(len(explained))]
    for i, one in enumerate(full):
        overlay_picture(pixels[i].astype(np.uint8), one.cam[0], key.crop)
    full_s = (time.perf_counter() - start) / len(explained)

    import keras

    extractor = shared_feature_extractor(key.arch, key.weights, key.height, key.width)
    inputs = keras.Input((key.height, key.width, 3))
    whole = keras.Model(inputs, head(extractor(inputs)))
    (drops, predicted), occlusion_total = timed(
        occlusion_drops, lambda p: np.asarray(whole.predict_on_batch(p)), pixels, key.crop)
    occlusion_s = occlusion_total / len(explained)

    present = [r for r in range(len(regions.REGIONS)) if regions.pixel_masks(key.height, key.width, key.crop)[r].any()]
    gradcam = cached.of_predicted
    rho = [spearman(gradcam[i, present], drops[i, present]) for i in range(len(explained))]
    top_same = [int(np.argmax(gradcam[i, present]) == np.argmax(drops[i, present])) for i in range(len(explained))]
    occlusion_text = regions.text_shares(drops)
    diff = max(float(np.abs(one.attribution[0] - cached.attribution[i]).max()) for i, one in enumerate(full))

    n = len(paths)
    rows = [
        ["Grad-CAM from cached region maps", f"{cached_s * 1e3:.3f} ms", "0 (maps made in the feature pass)"],
        ["Grad-CAM, full map + overlay", f"{full_s:.2f} s", "1"],
        ["occlusion (grey regions)", f"{occlusion_s:.2f} s", f"1 + {len(present)}"],
    ]
    from report import machine, markdown_table, write_section

    table = markdown_table(["method", "seconds per explained image", "backbone passes per image"], rows)
    agreement = markdown_table(
        ["image class", "predicted", "Spearman (Grad-CAM vs occlusion)", "same top region",
         "top region Grad-CAM / occlusion", "text share Grad-CAM / occlusion"],
        [[labels[s], CLASSES[int(predicted[i])], f"{rho[i]:.2f}", "yes" if top_same[i] else "no",
          f"{regions.REGION_NAMES[present[int(np.argmax(gradcam[i, present]))]]} / "
          f"{regions.REGION_NAMES[present[int(np.argmax(drops[i, present]))]]}",
          f"{cached.text_shares[i]:.2f} / {occlusion_text[i]:.2f}"] for i, s in enumerate(explained)],
    )
    body = f"""Written by `benchmarks/explanations.py --per-class {args.per_class}` ({machine()}):
{args.arch} weights={args.weights} at {key.height} x {key.width}, crop={key.crop}, {n} unique real images
({args.per_class} per class; the first of each class held out and explained, a paper head trained on the
others for {HEAD_EPOCHS} epochs).

Feature pass over the {n} images: {plain_s / n:.3f} s per image plain, {maps_s / n:.3f} s per image with
the region-pooled maps (x{maps_s / plain_s:.2f}); the maps add {len(regions.REGIONS)} x
{features[shas[0]].shape[0]} floats ({pooled[shas[0]].nbytes // 1024} KB) per image to the cache.

{table}

The cached route is what every train run does for its whole test set, so a 20-run study's
explanations cost one feature pass with maps (the study's own) plus, per run, a head Jacobian
over the test set and a full-map pass for the overlay sample only while its full maps are not
cached (once per study). Full-map and cached region sums agree to {diff:.1e} (logit units).

Agreement of the region rankings on the {len(explained)} held-out images (mean Spearman
{np.nanmean(rho):.2f}, same top region {sum(top_same)}/{len(explained)}):

{agreement}
"""
    print(body)
    if not args.no_write:
        write_section("Explanations", body)


if __name__ == "__main__":
    main()
