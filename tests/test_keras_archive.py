"""A later seed's whole-model archive, written from the first seed's by rewriting the head's
weights, is the archive Keras' own save writes for that seed: the same members, the same
configuration, every dataset and attribute of the weights file equal, and it loads into
a model that predicts what the seed's model predicts."""

from __future__ import annotations

import io
import json
import zipfile

import h5py
import numpy as np
import pytest

from ecg_mlflow.tracking import keras_archive
from ecg_mlflow.tracking.keras_archive import WholeModelArchive, save_whole_model

HEIGHT, WIDTH = 64, 128


def _whole_model(seed: int, units=(32, 16)):
    import keras

    from ecg_mlflow.model.backbones import shared_feature_extractor
    from ecg_mlflow.model.head import build_head

    extractor = shared_feature_extractor("efficientnetlite0", "imagenet", HEIGHT, WIDTH)
    keras.utils.set_random_seed(seed)
    head = build_head(1280, units, 0.5)
    inputs = keras.Input(shape=(HEIGHT, WIDTH, 3), name="image", dtype="float32")
    return keras.Model(inputs, head(extractor(inputs)), name="ecg_efficientnetlite0")


def _h5_contents(data: bytes) -> dict[str, object]:
    """Every group's attributes and every dataset's values in a weights file, by path."""
    found: dict[str, object] = {}
    with h5py.File(io.BytesIO(data), "r") as store:
        def visit(path, item):
            found[path + "@attrs"] = dict(item.attrs)
            if isinstance(item, h5py.Dataset):
                found[path] = (item.dtype, item[()])
        store.visititems(visit)
    return found


def _members(path) -> dict[str, bytes]:
    with zipfile.ZipFile(path) as archive:
        return {name: archive.read(name) for name in archive.namelist()}


@pytest.fixture(autouse=True)
def _no_templates():
    keras_archive.clear_templates()
    yield
    keras_archive.clear_templates()


def test_a_later_seeds_archive_is_the_one_keras_saves(tmp_path):
    first, second = _whole_model(1), _whole_model(2)
    save_whole_model(first, tmp_path / "first.keras")
    assert len(keras_archive._TEMPLATES) == 1  # the first was saved by Keras and kept
    save_whole_model(second, tmp_path / "patched.keras")
    second.save(tmp_path / "keras.keras")

    patched, by_keras = _members(tmp_path / "patched.keras"), _members(tmp_path / "keras.keras")
    assert list(patched) == list(by_keras) == ["metadata.json", "config.json", "model.weights.h5"]
    assert patched["config.json"] == by_keras["config.json"]
    assert json.loads(patched["metadata.json"]).keys() == json.loads(by_keras["metadata.json"]).keys()
    ours, theirs = _h5_contents(patched["model.weights.h5"]), _h5_contents(by_keras["model.weights.h5"])
    assert ours.keys() == theirs.keys()
    for path, value in theirs.items():
        if path.endswith("@attrs"):
            assert ours[path] == value, path
        else:
            assert ours[path][0] == value[0], path
            np.testing.assert_array_equal(ours[path][1], value[1], err_msg=path)
    # The heads differ, so the patch wrote something: seed 2's kernel is not seed 1's.
    first_h5 = _h5_contents(_members(tmp_path / "first.keras")["model.weights.h5"])
    assert any(not np.array_equal(first_h5[p][1], v[1]) for p, v in theirs.items() if not p.endswith("@attrs"))


def test_the_patched_archive_loads_and_predicts_as_the_seeds_model(tmp_path):
    import keras

    first, second = _whole_model(1), _whole_model(2)
    save_whole_model(first, tmp_path / "first.keras")
    WholeModelArchive(second).save(tmp_path / "second.keras")
    loaded = keras.saving.load_model(tmp_path / "second.keras")
    pixels = np.random.default_rng(0).uniform(0, 255, (2, HEIGHT, WIDTH, 3)).astype(np.float32)
    np.testing.assert_allclose(loaded.predict_on_batch(pixels), second.predict_on_batch(pixels), atol=1e-6)


def test_a_head_of_another_shape_is_saved_by_keras(tmp_path):
    first, other = _whole_model(1), _whole_model(2, units=(24,))
    save_whole_model(first, tmp_path / "first.keras")
    save_whole_model(other, tmp_path / "other.keras")
    assert len(keras_archive._TEMPLATES) == 2  # a template of its own, not the first's patched
    other.save(tmp_path / "keras.keras")
    assert _members(tmp_path / "other.keras")["config.json"] == _members(tmp_path / "keras.keras")["config.json"]
