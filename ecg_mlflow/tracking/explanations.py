"""Logging a train run's explanations (schema: `explanations/`, the text-share metrics).

The whole test set is explained from the region-pooled maps cached in the feature pass (a
head Jacobian, no backbone); the overlay sample (OVERLAY_PER_CLASS test images per class)
needs full maps, which are cached too, so a study pays that pass once.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np

from ecg_mlflow import schema
from ecg_mlflow.data.classes import CLASSES
from ecg_mlflow.model import regions
from ecg_mlflow.model.features import FeatureKey

OVERLAY_PER_CLASS = 2


def overlay_sample(relpaths: Sequence[str], labels: Sequence[str], shas: Sequence[str]) -> list[int]:
    """Indices of the first OVERLAY_PER_CLASS distinct images of every class (list order):
    the same for every seed of a study, since the test set is."""
    chosen: list[int] = []
    seen: set[str] = set()
    for cls in CLASSES:
        picked = 0
        for index, (label, sha) in enumerate(zip(labels, shas)):
            if label == cls and sha not in seen and picked < OVERLAY_PER_CLASS:
                chosen.append(index)
                seen.add(sha)
                picked += 1
    return chosen


def text_share_metrics(text_shares: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """The mean text share over all images and over the images of each true class (NaN for
    a class without test images)."""
    labels = np.asarray(labels)
    metrics = {schema.METRIC_TEXT_SHARE: float(np.mean(text_shares)) if len(text_shares) else float("nan")}
    for cls in CLASSES:
        chosen = text_shares[labels == cls]
        metrics[schema.text_share_metric(cls)] = float(chosen.mean()) if len(chosen) else float("nan")
    return metrics


def log_explanations(
    key: FeatureKey, cache_dir: str | Path, head, relpaths: Sequence[str], shas: Sequence[str],
    labels: Sequence[str], features: np.ndarray, region_maps: np.ndarray, paths: Sequence[Path], title: str,
) -> dict[str, float]:
    """Explain the test images, log the table, the chart and the overlays into the active
    run, and return the text-share metrics (the caller logs them with the others)."""
    import matplotlib.pyplot as plt
    import mlflow

    from ecg_mlflow.model.explain import explain_maps, explain_pooled
    from ecg_mlflow.model.explain_figures import attribution_frame, overlay_picture, plot_region_chart
    from ecg_mlflow.model.region_cache import load_full_maps
    from ecg_mlflow.tracking.model_logging import image_pixels

    sample = overlay_sample(relpaths, labels, shas)
    maps = load_full_maps({shas[i]: Path(paths[i]) for i in sample}, key, cache_dir)
    full = explain_maps(head, np.stack([maps[shas[i]] for i in sample]), features[sample], key.crop) if sample else None

    def overlay_png(j: int) -> bytes:
        i = sample[j]
        predicted = CLASSES[int(full.predicted[j])]
        caption = (f"{relpaths[i]}  true {labels[i]}  predicted {predicted} "
                   f"(p={full.probabilities[j].max():.2f})  text share {full.text_shares[j]:.2f}")
        pixels = image_pixels(paths[i], key.height, key.width, key.crop)  # decoded by the first seed
        return png_bytes(overlay_picture(pixels, full.cam[j], key.crop, caption))

    # Decoding, blending and PNG encoding release the GIL: the sample's pictures are made
    # on both cores while the chart is drawn, then logged in order.
    with ThreadPoolExecutor(OVERLAY_THREADS) as pool:
        pictures = pool.map(overlay_png, range(len(sample)))
        explained = explain_pooled(head, features, region_maps)
        frame = attribution_frame(relpaths, shas, labels, explained.predicted, explained.of_predicted)
        mlflow.log_text(frame.to_csv(index=False), schema.ARTIFACT_REGION_TABLE)
        figure = plot_region_chart(frame, f"{title}: Grad-CAM per report region (test set, n={len(frame)})")
        mlflow.log_figure(figure, schema.ARTIFACT_REGION_CHART)
        plt.close(figure)
        pictures = list(pictures)
    numbers: dict[str, int] = {}
    for i, png in zip(sample, pictures):
        numbers[labels[i]] = numbers.get(labels[i], 0) + 1
        log_bytes(png, schema.overlay_artifact(labels[i], numbers[labels[i]]))
    return text_share_metrics(explained.text_shares, labels)


OVERLAY_THREADS = 2
OVERLAY_PNG_LEVEL = 1
"""zlib level of the overlay PNGs. They are photo-like (a report under a colour map), so
PIL's default level 6 compresses them little better: at 512 x 1024, 268 ms and 685 KiB per
image against 78 ms and 780 KiB at level 1 (lossless either way), eight images per run."""


def png_bytes(image) -> bytes:
    """A PIL image as PNG at OVERLAY_PNG_LEVEL."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=OVERLAY_PNG_LEVEL)
    return buffer.getvalue()


def log_bytes(data: bytes, artifact_file: str) -> None:
    """`data` as the artifact `artifact_file` of the active run."""
    import tempfile

    import mlflow

    target = Path(artifact_file)
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / target.name
        path.write_bytes(data)
        mlflow.log_artifact(str(path), artifact_path=str(target.parent) if target.parent != Path(".") else None)
