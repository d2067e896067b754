"""The report template's regions and the attribution arithmetic on them (no Keras here).

Every Mendeley report (and every synthetic one, synth/reports.py) prints the same template:
a header (exam ID, patient line, diagnosis block) above the trace grid, the grid holding
3 x 4 lead panels of 2.5 s and a 10 s rhythm strip, and a footer (filter settings, heart
rate, date) below it. REGIONS names those parts as rectangles in fractions of the page; the
grid is preprocess.GRID_BOX and the panel borders follow synth/reports.py's millimetre layout,
which matches the real pages to a few pixels at 2213 x 1572. The regions PARTITION the page:
the thin strips left and right of the grid are the region `margin`, so every input pixel
belongs to exactly one region and region attributions add up to the whole image's.

Grad-CAM per region, from region-pooled maps (why one backbone pass is enough):
the head sits on global-average-pooled features f_k = (1/HW) sum_ij A_k(i,j) of the last
convolution A, so the gradient of a class score y wrt A_k(i,j) is (1/HW) dy/df_k, the same
at every position; Grad-CAM's channel weights are alpha_k = (1/HW) dy/df_k, and the map is
L(i,j) = sum_k alpha_k A_k(i,j). Summed over a region r with cell weights w_r(i,j) (the
fraction of map cell (i,j) inside r), S_r = sum_k dy/df_k P_rk where
P_rk = (1/HW) sum_ij w_r(i,j) A_k(i,j) are the REGION-POOLED MAPS (regions x channels).
Since the weights of a cell sum to 1 over regions, sum_r P_rk = f_k: the pooled features,
split by region. So S_r is linear in A, the regions' S_r add up to sum_k f_k dy/df_k, and a
cached P (one per image, made in the feature pass) explains any head, any seed.

These are SIGNED linear sums, before Grad-CAM's ReLU; the overlay picture shows ReLU(L).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np

from ecg_mlflow.data.preprocess import GRID_BOX

TEMPLATE_VERSION = 1
"""Bumped whenever a rectangle below changes: part of the region-map cache key."""

GRID_MM = (266.8, 155.8)  # the grid box in millimetres (synth/reports.py GRID_MM)
_LEAD_X_MM = (0.0, 73.5, 136.0, 198.5, GRID_MM[0])  # panel borders: traces start at 11 mm, 62.5 mm per column
_ROW_Y_MM = (0.0, 42.05, 79.6, 117.7, GRID_MM[1])  # midway between the row baselines 23.3, 60.8, 98.4, 137.0
LEAD_ROWS: tuple[tuple[str, ...], ...] = (
    ("I", "aVR", "V1", "V4"),
    ("II", "aVL", "V2", "V5"),
    ("III", "aVF", "V3", "V6"),
)
TEXT_REGIONS: tuple[str, ...] = ("header", "footer")
"""The printed text outside the grid (exam ID, heart rate, settings, date); the lead names
printed inside the panels belong to their panels."""


@dataclass(frozen=True)
class Region:
    """One rectangle of the template, in fractions (left, top, right, bottom) of the page."""

    name: str
    box: tuple[float, float, float, float]

    @property
    def slug(self) -> str:
        """Lower-case name for metric and column names: `aVR` -> `avr`."""
        return self.name.lower()


def _grid_fraction(x_mm: float, y_mm: float) -> tuple[float, float]:
    left, top, right, bottom = GRID_BOX
    return left + (right - left) * x_mm / GRID_MM[0], top + (bottom - top) * y_mm / GRID_MM[1]


def _lead_regions() -> list[Region]:
    regions = []
    for row, leads in enumerate(LEAD_ROWS):
        for column, lead in enumerate(leads):
            x0, y0 = _grid_fraction(_LEAD_X_MM[column], _ROW_Y_MM[row])
            x1, y1 = _grid_fraction(_LEAD_X_MM[column + 1], _ROW_Y_MM[row + 1])
            regions.append(Region(lead, (x0, y0, x1, y1)))
    return regions


def _build_regions() -> tuple[tuple[Region, ...], tuple[Region, ...]]:
    """(regions, extra rectangles): every region is one rectangle except `margin`, the
    two strips beside the grid, which gets its second rectangle from the extras."""
    left, top, right, bottom = GRID_BOX
    rhythm_top = _grid_fraction(0.0, _ROW_Y_MM[3])[1]
    regions = (
        *_lead_regions(),
        Region("rhythm", (left, rhythm_top, right, bottom)),
        Region("header", (0.0, 0.0, 1.0, top)),
        Region("footer", (0.0, bottom, 1.0, 1.0)),
        Region("margin", (0.0, top, left, bottom)),
    )
    return regions, (Region("margin", (right, top, 1.0, bottom)),)


REGIONS, _EXTRA_RECTANGLES = _build_regions()
REGION_NAMES: tuple[str, ...] = tuple(r.name for r in REGIONS)
REGION_SLUGS: tuple[str, ...] = tuple(r.slug for r in REGIONS)
TEXT_INDEX: tuple[int, ...] = tuple(REGION_NAMES.index(n) for n in TEXT_REGIONS)


def rectangles() -> list[tuple[int, tuple[float, float, float, float]]]:
    """(region index, page-fraction box) of every rectangle of the template."""
    found = [(i, r.box) for i, r in enumerate(REGIONS)]
    return found + [(REGION_NAMES.index(r.name), r.box) for r in _EXTRA_RECTANGLES]


def input_box(page_box: tuple[float, float, float, float], crop: str) -> tuple[float, float, float, float] | None:
    """A page-fraction box in fractions of the model INPUT after `crop`, or None if it lies
    outside the input. With crop=grid the input is GRID_BOX, so the header and footer are
    not in it: their boxes vanish and their attribution is 0 by construction."""
    if crop == "none":
        return page_box
    if crop != "grid":
        raise ValueError(f"crop must be none or grid, got {crop!r}")
    left, top, right, bottom = GRID_BOX
    x0, x1 = ((v - left) / (right - left) for v in (page_box[0], page_box[2]))
    y0, y1 = ((v - top) / (bottom - top) for v in (page_box[1], page_box[3]))
    x0, y0, x1, y1 = max(x0, 0.0), max(y0, 0.0), min(x1, 1.0), min(y1, 1.0)
    if x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def _coverage(start: float, stop: float, cells: int) -> np.ndarray:
    """Fraction of each of `cells` equal intervals of [0, 1] that [start, stop] covers."""
    edges = np.linspace(0.0, 1.0, cells + 1)
    overlap = np.clip(np.minimum(edges[1:], stop) - np.maximum(edges[:-1], start), 0.0, None)
    return overlap * cells


def region_weights(height: int, width: int, crop: str) -> np.ndarray:
    """(regions, height, width) float32: the fraction of each cell of a height x width grid
    over the model input that lies in each region. Cells are an even partition of the input
    (a convolution map's cell (i, j) is taken to stand for its patch of pixels); the weights
    of a cell sum to 1 over the regions. The same function gives pixel masks (height and
    width of the input) and map masks (the last convolution's 16 x 32 at 512 x 1024)."""
    weights = np.zeros((len(REGIONS), height, width), np.float64)
    for index, page_box in rectangles():
        box = input_box(page_box, crop)
        if box is None:
            continue
        weights[index] += np.outer(_coverage(box[1], box[3], height), _coverage(box[0], box[2], width))
    return weights.astype(np.float32)


def pixel_masks(height: int, width: int, crop: str) -> np.ndarray:
    """(regions, height, width) bool: each input pixel in the region holding most of it."""
    weights = region_weights(height, width, crop)
    return np.arange(len(REGIONS))[:, None, None] == weights.argmax(axis=0)[None]


def template_fields() -> dict[str, object]:
    """What region-pooled maps depend on beyond the features' key (which already holds the
    backbone, the input size and the crop, hence the map's resolution): the template."""
    return {
        "template": TEMPLATE_VERSION,
        "rectangles": [[REGION_NAMES[i], *box] for i, box in rectangles()],
    }


def template_digest() -> str:
    """Short content digest of the template: a changed rectangle never reuses old maps."""
    blob = json.dumps(template_fields(), sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def pool_by_region(maps: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(n, h, w, k) last-conv maps and (regions, h, w) weights -> (n, regions, k) region-pooled
    maps P_rk = (1/hw) sum_ij w_r(i,j) A_k(i,j); over regions they sum to the pooled features."""
    n, h, w, _ = maps.shape
    return np.einsum("nhwk,rhw->nrk", maps.astype(np.float32), weights, optimize=True) / np.float32(h * w)


def region_attribution(gradients: np.ndarray, pooled_maps: np.ndarray) -> np.ndarray:
    """Grad-CAM summed per region: (n, classes, k) head gradients dy/df and (n, regions, k)
    region-pooled maps -> (n, classes, regions) S = sum_k dy/df_k P_rk (signed, score units)."""
    return np.einsum("nck,nrk->ncr", gradients, pooled_maps, optimize=True)


def positive_shares(attribution: np.ndarray) -> np.ndarray:
    """(..., regions) signed attributions -> each region's share of the positive mass
    max(S_r, 0) / sum_r max(S_r, 0); all zero where no region is positive."""
    positive = np.clip(attribution, 0.0, None)
    total = positive.sum(axis=-1, keepdims=True)
    return np.divide(positive, total, out=np.zeros_like(positive), where=total > 0)


def text_shares(attribution: np.ndarray) -> np.ndarray:
    """(..., regions) -> (...) the TEXT ATTRIBUTION SHARE: the share of the positive region
    attribution that falls on the header and the footer."""
    return positive_shares(attribution)[..., list(TEXT_INDEX)].sum(axis=-1)


def of_predicted(attribution: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """(n, classes, regions) and predicted class indices (n,) -> (n, regions)."""
    return attribution[np.arange(len(predicted)), np.asarray(predicted, dtype=int)]
