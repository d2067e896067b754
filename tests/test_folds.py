"""Cross-validation folds on the 928 real files: every image tested once per repeat, no
duplicate group split across folds, classes stratified, validation apart from test."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ecg_mlflow.data.folds import cv_seed, make_folds
from ecg_mlflow.data.manifest import Manifest, build_manifest
from ecg_mlflow.data.splits import duplicate_groups, measure_leakage

K, REPEATS = 5, 2


@pytest.fixture(scope="module")
def manifest(real_images: Path) -> Manifest:
    return build_manifest(real_images, progress=False)


@pytest.fixture(scope="module")
def folds(manifest: Manifest):
    return make_folds(manifest, "grouped", K, REPEATS)


def test_every_image_is_tested_exactly_once_per_repeat(manifest, folds):
    everything = sorted(r.relpath for r in manifest.records)
    assert [(f.repeat, f.fold) for f in folds] == [(r, k) for r in range(REPEATS) for k in range(K)]
    for repeat in range(REPEATS):
        tested = [p for f in folds if f.repeat == repeat for p in f.split.test]
        assert sorted(tested) == everything  # once each: no doubles, none left out
    assert folds[0].split.test != folds[K].split.test  # the repeat reshuffles the folds


def test_no_duplicate_group_is_split_and_nothing_leaks(manifest, folds):
    groups = duplicate_groups(manifest)
    for f in folds:
        test = set(f.split.test)
        assert all(set(g) <= test or not set(g) & test for g in groups)
        train, val = set(f.split.train), set(f.split.val)
        assert not (train & val or train & test or val & test)
        assert train | val | test == {r.relpath for r in manifest.records}
        assert all(set(g) <= val or not set(g) & val for g in groups)  # validation is grouped too
        leakage = measure_leakage(manifest, f.split)
        assert (leakage.exact, leakage.near) == (0, 0)


def test_classes_are_stratified_and_sizes_balanced(manifest, folds):
    label = {r.relpath: r.label for r in manifest.records}
    overall = Counter(label.values())
    for f in folds:
        counts = Counter(label[p] for p in f.split.test)
        for cls, n in overall.items():
            # MI has 30 groups of about 8 copies: a fold's share may miss by one group
            assert abs(counts[cls] - n / K) <= 10, (f.repeat, f.fold, cls, counts[cls])
        assert 170 <= len(f.split.test) <= 200
        # validation: about 20% of the training folds, drawn from them only
        assert 0.17 <= len(f.split.val) / (len(f.split.train) + len(f.split.val)) <= 0.23


def test_seeds_one_per_cell_and_the_design_is_reproducible(manifest, folds):
    assert [f.seed for f in folds] == list(range(1, K * REPEATS + 1))
    assert all(f.split.seed == f.seed == cv_seed(f.repeat, f.fold, K) for f in folds)
    again = make_folds(manifest, "grouped", K, REPEATS)
    assert [f.split for f in again] == [f.split for f in folds]


def test_bad_designs_fail_naming_the_parameter(manifest):
    with pytest.raises(ValueError, match="cv must be an integer of at least 2"):
        make_folds(manifest, "grouped", 1)
    with pytest.raises(ValueError, match="cv_repeats must be an integer of at least 1"):
        make_folds(manifest, "grouped", 2, 0)
    with pytest.raises(ValueError, match="smallest class has 30"):  # MI: 30 unique images
        make_folds(manifest, "grouped", 31)
