"""The feature-cache key: entries that differ in anything that changes the backbone's output
never share a folder; equal settings always do."""

from __future__ import annotations

import dataclasses
import json

import pytest

from ecg_mlflow.model.features import FeatureCache, FeatureKey

BASE = dict(arch="vgg16", weights="none", height=64, width=128, crop="none")


def _variant(field: dataclasses.Field, value):
    """Another valid value of one key field (unknown fields: a different value of their type)."""
    known = {"arch": "resnet50", "weights": "imagenet", "height": 96, "width": 96, "crop": "grid",
             "engine": "openvino", "precision": "bf16"}
    if field.name in known and known[field.name] != value:
        return known[field.name]
    return value + 1 if isinstance(value, int) else f"{value}-other"


def _key(**changes) -> FeatureKey:
    defaults = {f.name: f.default for f in dataclasses.fields(FeatureKey) if f.default is not dataclasses.MISSING}
    return FeatureKey(**{**defaults, **BASE, **changes})


def test_equal_settings_share_a_digest_and_a_folder(tmp_path):
    assert _key().digest == _key().digest
    assert FeatureCache(tmp_path, _key()).folder == FeatureCache(tmp_path, _key()).folder
    written = json.loads((FeatureCache(tmp_path, _key()).folder / "key.json").read_text())
    assert written == _key().fields()


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(FeatureKey)])
def test_every_key_field_separates_entries(field, tmp_path):
    """Every field of FeatureKey (crop, size, weights, and whatever is added later, such as
    the engine) changes the digest, the recorded fields and the cache folder."""
    base = _key()
    (spec,) = [f for f in dataclasses.fields(FeatureKey) if f.name == field]
    other = _key(**{field: _variant(spec, getattr(base, field))})
    assert other.digest != base.digest
    assert other.fields() != base.fields()
    assert FeatureCache(tmp_path, other).folder != FeatureCache(tmp_path, base).folder


def test_weights_files_are_keyed_by_content_not_by_path(tmp_path):
    """Retraining a backbone into the same file must not reuse features of the old weights;
    the same bytes under another name may."""
    path = tmp_path / "backbone.weights.h5"
    path.write_bytes(b"first weights")
    first = _key(weights=str(path)).digest
    path.write_bytes(b"second weights")
    second = _key(weights=str(path)).digest
    assert first != second
    copy = tmp_path / "elsewhere.weights.h5"
    copy.write_bytes(b"second weights")
    assert _key(weights=str(copy)).digest == second
    assert first not in (_key().digest, _key(weights="imagenet").digest)


def test_height_and_width_are_not_interchangeable():
    assert _key(height=64, width=128).digest != _key(height=128, width=64).digest
