"""Every registered backbone builds, is frozen, and yields features of its declared width."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from ecg_mlflow.model.backbones import (
    BACKBONES,
    BACKBONE_SEED,
    BackboneError,
    build_feature_extractor,
    get_spec,
    scaling_matrix,
    weights_identity,
)

from conftest import PROJECT_ROOT

SMALL = (80, 96)  # above every backbone's minimum (InceptionV3 needs 75)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (2, *SMALL, 3)).astype(np.float32)


@pytest.mark.parametrize("arch", sorted(BACKBONES))
def test_every_backbone_builds_frozen_and_yields_declared_features(arch, pixels):
    model = build_feature_extractor(arch, "none", *SMALL)
    features = np.asarray(model(pixels, training=False))
    assert features.shape == (2, get_spec(arch).feature_dim)
    assert np.isfinite(features).all()
    assert model.trainable_weights == []
    # Different images give different features: the backbone is not a constant.
    assert not np.allclose(features[0], features[1], rtol=1e-3, atol=0)


def test_random_backbone_is_the_same_for_every_build_and_size():
    first = build_feature_extractor("resnet50", "none", 64, 64)
    second = build_feature_extractor("resnet50", "none", 96, 128)
    for a, b in zip(first.get_weights(), second.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert weights_identity("none") == f"random-seed{BACKBONE_SEED}"


def test_caffe_scaling_matches_keras_preprocess_input():
    from keras.applications.resnet50 import preprocess_input

    image = np.random.default_rng(1).uniform(0, 255, (1, 4, 5, 3)).astype(np.float32)
    kernel, bias = scaling_matrix("caffe")
    ours = image @ kernel + bias
    np.testing.assert_allclose(ours, preprocess_input(image.copy()), atol=1e-4)


def test_torch_and_tf_scaling_match_keras(pixels):
    from keras.applications import densenet, inception_v3

    image = pixels[:1, :4, :4]
    for scaling, reference in (("torch", densenet.preprocess_input), ("tf", inception_v3.preprocess_input)):
        kernel, bias = scaling_matrix(scaling)
        np.testing.assert_allclose(image @ kernel + bias, reference(image.copy()), atol=1e-4)


def test_lite_scaling_is_the_tf_lite_mean_and_std(pixels):
    image = pixels[:1, :4, :4]
    kernel, bias = scaling_matrix("lite")
    np.testing.assert_allclose(image @ kernel + bias, (image - 127.0) / 128.0, atol=1e-6)


def test_weights_file_round_trip_and_mismatch(tmp_path, pixels):
    model = build_feature_extractor("vgg16", "none", *SMALL)
    backbone = model.get_layer("vgg16")
    path = tmp_path / "vgg16.weights.h5"
    backbone.save_weights(str(path))
    loaded = build_feature_extractor("vgg16", str(path), *SMALL)
    np.testing.assert_allclose(loaded(pixels), model(pixels), atol=1e-5)
    assert weights_identity(str(path)).startswith("file-")
    with pytest.raises(BackboneError, match="does not fit resnet50"):
        build_feature_extractor("resnet50", str(path), *SMALL)


_DOWNLOAD_PROBE = """
import sys
from ecg_mlflow.model.backbones import BackboneError, build_feature_extractor
try:
    build_feature_extractor("vgg16", "imagenet", 80, 96)
except BackboneError as exc:
    print(exc)
    sys.exit(3)
print("downloaded")
"""


def test_imagenet_download_failure_names_the_alternatives(tmp_path):
    """The real Keras download path, made to fail the same way on every machine: an empty
    KERAS_HOME (no cached weights) and HTTPS through a proxy on a loopback port that refuses
    connections (bound, never listening), through urllib's standard proxy variables."""
    keras_home = tmp_path / "keras-home"
    keras_home.mkdir()
    with socket.socket() as refusing:
        refusing.bind(("127.0.0.1", 0))  # held, not listening: connections get RST
        proxy = f"http://127.0.0.1:{refusing.getsockname()[1]}"
        env = {k: v for k, v in os.environ.items() if k.lower() not in ("no_proxy", "https_proxy", "http_proxy")}
        env.update(KERAS_HOME=str(keras_home), https_proxy=proxy, HTTPS_PROXY=proxy, http_proxy=proxy,
                   HTTP_PROXY=proxy, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=str(PROJECT_ROOT))
        done = subprocess.run([sys.executable, "-c", _DOWNLOAD_PROBE], env=env, cwd=tmp_path,
                              capture_output=True, text=True, timeout=300)
    message = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    assert done.returncode == 3, done.stdout[-2000:] + done.stderr[-2000:]
    # it did try Keras' download (of the no-top VGG16 file), and failed on the connection
    assert "URL fetch failure on https://storage.googleapis.com/" in message, message
    assert "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5" in message, message
    assert "Connection refused" in message, message  # refused by our proxy port, not by DNS or a firewall
    assert "weights=none" in message and "weights=/path/to/file" in message
    assert "efficientnetlite0/efficientnetlite1/efficientnetlite2 with weights=imagenet" in message
    assert not list(keras_home.rglob("*.h5")), "a failed download left a weights file behind"


def test_unknown_backbone_and_too_small_image_are_refused():
    with pytest.raises(BackboneError, match="unknown backbone 'resnet51'.*resnet50"):
        get_spec("resnet51")
    with pytest.raises(BackboneError, match="inceptionv3 needs images of at least 75x75"):
        build_feature_extractor("inceptionv3", "none", 64, 64)
