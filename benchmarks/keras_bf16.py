"""Keras' own bf16 (engine=keras precision=bf16, mixed_bfloat16) against Keras fp32 on this CPU.

Why training refuses engine=keras precision=bf16 without a GPU: measured, side by side in one
process, on real reports at the paper's 512 x 1024, batch 8, after a warm-up batch. Per
backbone: seconds per image at fp32 and bf16 and their ratio, and how far the bf16 features
are from fp32 (max difference relative to the largest feature, per-image cosine).

    .venv/bin/python benchmarks/keras_bf16.py --images 16

Writes the "Keras bf16 on this CPU" section of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from report import machine, markdown_table, write_section

PROJECT_ROOT = Path(__file__).resolve().parents[1]
REAL_IMAGES = PROJECT_ROOT.parent / "shared" / "data" / "ecg-images"
SECTION = "Keras bf16 on this CPU"
BACKBONES = (("efficientnetlite0", "imagenet"), ("efficientnetlite2", "imagenet"), ("resnet50", "none"))
BATCH = 8


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(REAL_IMAGES))
    parser.add_argument("--images", type=int, default=16, help="real reports per backbone (a multiple of 8)")
    parser.add_argument("--image-height", type=int, default=512)
    parser.add_argument("--image-width", type=int, default=1024)
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args()


def real_pixels(data: Path, count: int, height: int, width: int) -> np.ndarray:
    """`count` distinct real reports, spread over the classes, decoded as training decodes."""
    from ecg_mlflow.data.manifest import build_manifest
    from ecg_mlflow.data.preprocess import load_batch

    manifest = build_manifest(data, progress=False)
    unique = list({r.sha256: r for r in manifest.records}.values())
    chosen = unique[:: max(1, len(unique) // count)][:count]
    return load_batch([manifest.path_of(r) for r in chosen], height, width)


def seconds_per_image(extractor, pixels: np.ndarray) -> tuple[float, np.ndarray]:
    extractor.predict_on_batch(pixels[:BATCH])  # warm-up: graph tracing, kernel choice
    start = time.perf_counter()
    features = np.concatenate([np.asarray(extractor.predict_on_batch(pixels[i:i + BATCH]))
                               for i in range(0, len(pixels), BATCH)])
    return (time.perf_counter() - start) / len(pixels), features.astype(np.float32)


def measure(arch: str, weights: str, pixels: np.ndarray) -> tuple[list[object], float]:
    """The table row of one backbone, and its bf16 / fp32 time ratio."""
    from ecg_mlflow.model.backbones import shared_feature_extractor

    height, width = pixels.shape[1:3]
    fp32_s, fp32 = seconds_per_image(shared_feature_extractor(arch, weights, height, width, "fp32"), pixels)
    bf16_s, bf16 = seconds_per_image(shared_feature_extractor(arch, weights, height, width, "bf16"), pixels)
    relative = float(np.abs(bf16 - fp32).max() / np.abs(fp32).max())
    cosine = (bf16 * fp32).sum(1) / np.linalg.norm(bf16, axis=1) / np.linalg.norm(fp32, axis=1)
    row = [arch, weights, f"{fp32_s:.3f}", f"{bf16_s:.3f}", f"{bf16_s / fp32_s:.2f}x", f"{relative:.3f}",
           f"{cosine.min():.4f}", f"{cosine.mean():.4f}"]
    print(" | ".join(map(str, row)), flush=True)
    return row, bf16_s / fp32_s


def main() -> None:
    args = parse_args()
    from ecg_mlflow.model.backend import backend_version, device_kind

    pixels = real_pixels(Path(args.data), args.images, args.image_height, args.image_width)
    measured = [measure(arch, weights, pixels) for arch, weights in BACKBONES]
    rows, ratios = [row for row, _ in measured], [ratio for _, ratio in measured]
    verdict = ("On this CPU (no native bf16) Keras' bf16 is slower than its fp32 for every backbone, so training "
               "refuses engine=keras precision=bf16 without a GPU (`keras_bf16_missing`)"
               if min(ratios) > 1 else
               "On this CPU Keras' bf16 was not slower than fp32 for every backbone: the refusal of engine=keras "
               "precision=bf16 without a GPU (`keras_bf16_missing`) should be revisited")
    table = markdown_table(
        ["backbone", "weights", "fp32 s/image", "bf16 s/image", "bf16 / fp32 time", "max abs(bf16 - fp32) / max abs(fp32)",
         "min cosine", "mean cosine"], rows)
    text = (
        f"`benchmarks/keras_bf16.py --images {args.images}`: Keras' mixed_bfloat16 extractor (what "
        f"engine=keras precision=bf16 builds) against its float32 one, {len(pixels)} distinct real reports at "
        f"{args.image_height} x {args.image_width}, batch {BATCH}, after a warm-up batch, one process, "
        f"{backend_version()} on the {device_kind()}. Machine: {machine()}.\n\n{table}\n\n"
        f"{verdict}; on a CPU, bf16 is OpenVINO's "
        "(engine=openvino, which needs AMX or AVX-512 BF16). Keras rounds every layer's activations to "
        "bf16, so its features move away from fp32 (the last three columns); each run records its precision in the feature-cache key and its params, "
        "and its whole model is checked against its own bf16 features at 1e-5, as at fp32. No GPU was "
        "measured here."
    )
    print(text)
    if not args.no_write:
        write_section(SECTION, text)
        print(f"wrote the '{SECTION}' section of docs/benchmarks.md")


if __name__ == "__main__":
    main()
