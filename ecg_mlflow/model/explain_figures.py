"""Pictures and tables of explanations: heatmap overlays, region tints, the per-class chart.

Not served (matplotlib): the served model returns numbers only.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

from ecg_mlflow import schema
from ecg_mlflow.data.classes import CLASSES
from ecg_mlflow.model import regions

OVERLAY_ALPHA = 0.45
COLORMAP = "jet"
OUTLINE = (255, 255, 255)


def _colour(values: np.ndarray) -> np.ndarray:
    """Values in 0..1 -> uint8 RGB through COLORMAP."""
    from matplotlib import colormaps

    return colormaps[COLORMAP](np.clip(values, 0.0, 1.0), bytes=True)[..., :3]


def _outline_regions(image: Image.Image, crop: str) -> None:
    draw = ImageDraw.Draw(image)
    width, height = image.size
    for _, page_box in regions.rectangles():
        box = regions.input_box(page_box, crop)
        if box is not None:
            x0, y0, x1, y1 = box
            draw.rectangle([x0 * width, y0 * height, x1 * width - 1, y1 * height - 1], outline=OUTLINE, width=1)


def _caption(image: Image.Image, text: str) -> Image.Image:
    band = 14 if image.height < 400 else 24
    out = Image.new("RGB", (image.width, image.height + band), (255, 255, 255))
    out.paste(image, (0, band))
    ImageDraw.Draw(out).text((4, 2), text, fill=(0, 0, 0))
    return out


def overlay_picture(pixels: np.ndarray, cam: np.ndarray, crop: str, caption: str = "") -> Image.Image:
    """The model input with ReLU(Grad-CAM) over it: the coarse map upsampled bilinearly to
    the input (for the eye only; the region sums use the map's own cells), scaled to its
    maximum, and the template regions outlined."""
    height, width = pixels.shape[:2]
    positive = np.clip(cam, 0.0, None).astype(np.float32)
    peak = float(positive.max())
    scaled = positive / peak if peak > 0 else positive
    upsampled = np.asarray(Image.fromarray(scaled, mode="F").resize((width, height), Image.Resampling.BILINEAR))
    blended = (1 - OVERLAY_ALPHA) * pixels.astype(np.float32) + OVERLAY_ALPHA * _colour(upsampled)
    image = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    _outline_regions(image, crop)
    return _caption(image, caption) if caption else image


def region_tint_picture(pixels: np.ndarray, attribution: np.ndarray, crop: str, caption: str = "") -> Image.Image:
    """The input with each template region tinted by its share of the positive attribution:
    the picture that per-region numbers alone allow (e.g. from a served model)."""
    height, width = pixels.shape[:2]
    shares = regions.positive_shares(np.asarray(attribution, np.float64))
    peak = shares.max()
    masks = regions.pixel_masks(height, width, crop)
    level = np.tensordot(shares / peak if peak > 0 else shares, masks.astype(np.float32), axes=1)
    blended = (1 - OVERLAY_ALPHA) * pixels.astype(np.float32) + OVERLAY_ALPHA * _colour(level)
    image = Image.fromarray(blended.clip(0, 255).astype(np.uint8))
    _outline_regions(image, crop)
    return _caption(image, caption) if caption else image


def attribution_frame(
    relpaths: Sequence[str], shas: Sequence[str], true_labels: Sequence[str] | None,
    predicted: np.ndarray, of_predicted: np.ndarray,
) -> pd.DataFrame:
    """One row per image: names, classes, text share and `attr_<region>` (predicted class)."""
    frame = pd.DataFrame({schema.COL_RELPATH: list(relpaths), schema.COL_SHA256: list(shas)})
    if true_labels is not None:
        frame[schema.COL_TRUE] = list(true_labels)
    frame[schema.COL_PRED] = [CLASSES[i] for i in predicted]
    frame[schema.COL_TEXT_SHARE] = regions.text_shares(of_predicted)
    for index, slug in enumerate(regions.REGION_SLUGS):
        frame[schema.attribution_column(slug)] = of_predicted[:, index]
    return frame


def class_region_shares(frame: pd.DataFrame, by: str = schema.COL_TRUE) -> pd.DataFrame:
    """Mean positive share per region (columns) for each class present (rows, CLASSES order)."""
    columns = [schema.attribution_column(s) for s in regions.REGION_SLUGS]
    shares = pd.DataFrame(regions.positive_shares(frame[columns].to_numpy(np.float64)),
                          columns=list(regions.REGION_NAMES), index=frame.index)
    shares[by] = frame[by].to_numpy()
    means = shares.groupby(by).mean()
    return means.reindex([c for c in CLASSES if c in means.index])


def plot_region_chart(frame: pd.DataFrame, title: str):
    """Grouped bars: per true class, the mean share of the positive attribution per region."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = class_region_shares(frame)
    figure, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / max(1, len(means))
    x = np.arange(len(regions.REGION_NAMES))
    for offset, (cls, row) in enumerate(means.iterrows()):
        ax.bar(x + (offset - (len(means) - 1) / 2) * width, row.to_numpy(), width, label=cls)
    ax.set_xticks(x, regions.REGION_NAMES)
    ax.set_ylabel("share of positive Grad-CAM")
    ax.set_title(title)
    ax.legend(title="true class")
    figure.tight_layout()
    return figure
