"""Explanations of one model on one image: Grad-CAM on the last convolution, per template
region (see model/regions.py for the arithmetic), and region occlusion as a second opinion.

Grad-CAM needs, per image, the last convolution's map A (to draw it) or only its
region-pooled form P (to sum it per region), and the head's gradient dy/df at the image's
pooled features. The class score y is the head's LOGIT (the softmax's input), as in the
Grad-CAM paper: probabilities saturate, logits do not. The head is the paper's dense stack,
no BatchNorm, dropout off at inference, so images are independent and one batched Jacobian
gives every image's gradients.

Occlusion greys a region out (OCCLUSION_FILL), reruns backbone and head and reports the
drop in the probability of the class predicted on the intact image: one backbone pass per
region per image, so only for a small sample.

Served (serving/packaging.py SERVED_MODULES): imports only model/regions and, inside
functions, Keras (backend-neutral: the head's gradients are computed in NumPy).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from ecg_mlflow.model import regions

OCCLUSION_FILL = 128
"""Grey (RGB 128) that occlusion paints over a region: a neutral value, but a grey block is
nothing a report ever shows, so the drop measures the model's reaction to an unusual input
as much as the loss of the region's content."""
EXPLAIN_BATCH = 8


class ExplainError(ValueError):
    """A model whose structure Grad-CAM here cannot use (no global average pooling at the
    end of its backbone, no softmax dense layer at the end of its head)."""


@dataclass(frozen=True)
class Explanation:
    """Grad-CAM of a batch of images.

    probabilities: (n, classes) of the head; predicted: (n,) class indices;
    attribution: (n, classes, regions) signed region sums of Grad-CAM per class;
    cam: (n, h, w) Grad-CAM map of the predicted class before ReLU (None when only
    region-pooled maps were given).
    """

    probabilities: np.ndarray
    predicted: np.ndarray
    attribution: np.ndarray
    cam: np.ndarray | None = None

    @property
    def of_predicted(self) -> np.ndarray:
        """(n, regions): each image's attribution for its predicted class."""
        return regions.of_predicted(self.attribution, self.predicted)

    @property
    def text_shares(self) -> np.ndarray:
        return regions.text_shares(self.of_predicted)


def _non_input(layers) -> list:
    import keras

    return [layer for layer in layers if not isinstance(layer, keras.layers.InputLayer)]


def build_maps_model(extractor):
    """From a feature extractor (input scaling, then a backbone that ends in global average
    pooling) the same network with two outputs: the last convolution's maps and the pooled
    features. Shares the extractor's layers and weights; the features are the same ops."""
    import keras

    *prefix, backbone = _non_input(extractor.layers)
    pool = backbone.layers[-1] if hasattr(backbone, "layers") else None
    if not isinstance(pool, keras.layers.GlobalAveragePooling2D):
        raise ExplainError(
            f"{extractor.name}: Grad-CAM here needs a backbone ending in GlobalAveragePooling2D, "
            f"found {type(pool).__name__ if pool is not None else type(backbone).__name__}"
        )
    conv = keras.Model(backbone.inputs, pool.input, name=f"{backbone.name}_maps")
    inputs = keras.Input(shape=extractor.input_shape[1:], name="image", dtype="float32")
    x = inputs
    for layer in prefix:
        x = layer(x)
    maps = conv(x)
    return keras.Model(inputs, [maps, pool(maps)], name=f"{extractor.name}_maps")


def head_layers(head) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """The head's weights as (kernel, bias) of its ReLU Dense layers, and of the softmax
    Dense layer that ends it (Dropout is the identity at inference); ValueError naming
    any other layer, since the Jacobian below (and head.head_probabilities) are exact for
    this stack only."""
    import keras

    *hidden, last = _non_input(head.layers)
    if not isinstance(last, keras.layers.Dense) or last.activation is not keras.activations.softmax:
        raise ValueError(f"{head.name}: the head must end in a softmax Dense layer")
    dense = []
    for layer in hidden:
        if isinstance(layer, keras.layers.Dropout):
            continue
        if not isinstance(layer, keras.layers.Dense) or layer.activation is not keras.activations.relu:
            raise ValueError(f"{head.name}: layer {layer.name} is not a ReLU Dense or a Dropout layer")
        dense.append(tuple(np.asarray(w, np.float32) for w in layer.get_weights()))
    return dense, tuple(np.asarray(w, np.float32) for w in last.get_weights())


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by each row's maximum (no overflow)."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def head_gradients(head, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, classes, k) gradients d logit_c / d f_k at each image's features, and the (n,
    classes) probabilities. Costs a head pass and its Jacobian: no backbone.

    In NumPy from the head's weights, so it is the same under every Keras backend: the
    head is ReLU Dense layers, then logits W x + b, so each image's Jacobian is the
    product of the kernels with the ReLU's on/off pattern of that image (the gradient
    TensorFlow and JAX give ReLU, 0 at exactly 0). Images are independent in the head (no
    BatchNorm, dropout off), so a batch is every image's own Jacobian at once: each layer
    one (n * classes, units) matmul. ExplainError for a head of other layers."""
    try:
        dense, (kernel, bias) = head_layers(head)
    except ValueError as exc:
        raise ExplainError(str(exc)) from None
    x = np.asarray(features, np.float32)
    active = []
    for w, b in dense:
        z = x @ w + b
        active.append(z > 0)
        x = np.maximum(z, 0)
    n, classes = len(x), kernel.shape[1]
    gradients = np.broadcast_to(kernel.T, (n, classes, kernel.shape[0]))  # (n, classes, units)
    for (w, _), on in zip(reversed(dense), reversed(active)):
        masked = (gradients * on[:, None, :]).reshape(n * classes, -1)
        gradients = (masked @ w.T).reshape(n, classes, -1)
    return np.ascontiguousarray(gradients, np.float32), softmax(x @ kernel + bias)


def explain_pooled(head, features: np.ndarray, pooled_maps: np.ndarray) -> Explanation:
    """Grad-CAM per region from cached region-pooled maps (n, regions, k): no backbone pass."""
    gradients, probabilities = head_gradients(head, features)
    return Explanation(probabilities, probabilities.argmax(axis=1), regions.region_attribution(gradients, pooled_maps))


def explain_maps(head, maps: np.ndarray, features: np.ndarray, crop: str) -> Explanation:
    """Grad-CAM from full last-conv maps (n, h, w, k): region sums and the predicted class's map."""
    n, h, w, _ = maps.shape
    gradients, probabilities = head_gradients(head, features)
    predicted = probabilities.argmax(axis=1)
    alpha = gradients[np.arange(n), predicted] / np.float32(h * w)  # Grad-CAM's channel weights
    cam = np.einsum("nhwk,nk->nhw", maps, alpha, optimize=True)
    pooled = regions.pool_by_region(maps, regions.region_weights(h, w, crop))
    return Explanation(probabilities, predicted, regions.region_attribution(gradients, pooled), cam)


def run_maps_model(maps_model, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(maps, features) of float32 pixels 0..255, EXPLAIN_BATCH images per call."""
    maps, features = [], []
    for start in range(0, len(pixels), EXPLAIN_BATCH):
        m, f = maps_model.predict_on_batch(pixels[start:start + EXPLAIN_BATCH])
        maps.append(np.asarray(m))
        features.append(np.asarray(f))
    return np.concatenate(maps), np.concatenate(features)


def explain_pixels(maps_model, head, pixels: np.ndarray, crop: str) -> Explanation:
    """Grad-CAM of images: one backbone pass for the maps, then the head's gradients."""
    maps, features = run_maps_model(maps_model, pixels)
    return explain_maps(head, maps, features, crop)


def occlusion_drops(
    predict: Callable[[np.ndarray], np.ndarray], pixels: np.ndarray, crop: str, fill: int = OCCLUSION_FILL
) -> tuple[np.ndarray, np.ndarray]:
    """(n, regions) drop of the predicted class's probability when each region is greyed
    out (0 for a region outside the input), and the (n,) predicted classes. `predict` maps
    float32 pixels to probabilities; it runs 1 + (regions in the input) times per image."""
    n, height, width, _ = pixels.shape
    masks = regions.pixel_masks(height, width, crop)
    present = [r for r in range(len(masks)) if masks[r].any()]
    base = predict(pixels)
    predicted = base.argmax(axis=1)
    drops = np.zeros((n, len(masks)), np.float64)
    for i in range(n):
        occluded = np.repeat(pixels[i:i + 1], len(present), axis=0)
        for row, r in enumerate(present):
            occluded[row][masks[r]] = fill
        probabilities = np.concatenate([predict(occluded[s:s + EXPLAIN_BATCH])
                                        for s in range(0, len(present), EXPLAIN_BATCH)])
        drops[i, present] = base[i, predicted[i]] - probabilities[:, predicted[i]]
    return drops, predicted


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two region score vectors (average ranks for ties)."""
    import pandas as pd

    return float(pd.Series(a).rank().corr(pd.Series(b).rank()))
