"""Both split policies on the 928 real files, with their leakage."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from ecg_mlflow.data.manifest import Manifest, build_manifest
from ecg_mlflow.schema import COL_RELPATH, COL_SHA256
from ecg_mlflow.data.splits import TEST_SEED, duplicate_groups, make_split, measure_leakage


@pytest.fixture(scope="module")
def manifest(real_images: Path) -> Manifest:
    return build_manifest(real_images)


def _labels(manifest: Manifest, relpaths) -> Counter:
    label = {r.relpath: r.label for r in manifest.records}
    return Counter(label[p] for p in relpaths)


def _check_partition(manifest: Manifest, split) -> None:
    train, val, test = set(split.train), set(split.val), set(split.test)
    assert not (train & val or train & test or val & test)
    assert train | val | test == {r.relpath for r in manifest.records}
    assert list(split.test) == sorted(split.test) and list(split.train) == sorted(split.train)


def test_paper_split_sizes_and_determinism(manifest: Manifest) -> None:
    first, second = make_split(manifest, "paper", 0), make_split(manifest, "paper", 1)
    for split in (first, second):
        assert (len(split.train), len(split.val), len(split.test)) == (593, 148, 187)
        _check_partition(manifest, split)
        # test: ceil(0.2 n) per class; val: floor(0.2 * 741) = 148 spread by class
        assert _labels(manifest, split.test) == {"MI": 48, "HMI": 35, "AHB": 47, "NORM": 57}
        assert sum(_labels(manifest, split.val).values()) == 148
    assert first.test == second.test and first.test_digest == second.test_digest
    assert first.val != second.val  # validation follows the run seed
    assert make_split(manifest, "paper", 1) == second  # same seeds, same split
    assert make_split(manifest, "paper", 1, test_seed=TEST_SEED + 1).test != second.test


def test_paper_split_leaks_about_two_thirds(manifest: Manifest) -> None:
    split = make_split(manifest, "paper", 0)
    leakage = measure_leakage(manifest, split)
    assert leakage.n_test == 187
    assert 0.6 <= leakage.exact / leakage.n_test <= 0.7  # README: about 65%
    assert leakage.near >= leakage.exact
    sha = {r.relpath: r.sha256 for r in manifest.records}
    seen = {sha[p] for p in split.train + split.val}
    mi_test = [p for p in split.test if p.startswith("ECG Images of Myocardial")]
    assert mi_test and all(sha[p] in seen for p in mi_test)  # README: MI 100%


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grouped_split_has_no_leakage(manifest: Manifest, seed: int) -> None:
    split = make_split(manifest, "grouped", seed)
    _check_partition(manifest, split)
    leakage = measure_leakage(manifest, split)
    assert (leakage.exact, leakage.near) == (0, 0)
    assert leakage.n_test == len(split.test)
    sha = {r.relpath: r.sha256 for r in manifest.records}
    assert not {sha[p] for p in split.val} & {sha[p] for p in split.train}  # no val copy in train
    assert 0.18 <= len(split.test) / 928 <= 0.22 and 0.14 <= len(split.val) / 928 <= 0.18
    assert set(_labels(manifest, split.test)) == {"MI", "HMI", "AHB", "NORM"}
    assert split.test == make_split(manifest, "grouped", seed + 10).test


def test_duplicate_groups_of_real_data(manifest: Manifest) -> None:
    groups = duplicate_groups(manifest)
    assert len(groups) == 491  # the twins are the only duplicates
    sha = {r.relpath: r.sha256 for r in manifest.records}
    assert all(len({sha[p] for p in g}) == 1 for g in groups)
    assert sorted(p for g in groups for p in g) == sorted(sha)


def test_split_frame(manifest: Manifest) -> None:
    split = make_split(manifest, "grouped", 0)
    frame = split.to_frame(manifest)
    assert list(frame.columns) == [COL_RELPATH, "label", COL_SHA256, "subset"]
    assert frame["subset"].value_counts().to_dict() == {
        "train": len(split.train), "val": len(split.val), "test": len(split.test)
    }
    small = manifest.subset(split.test[:5])
    assert len(split.to_frame(small)) == 5


def test_bad_arguments(manifest: Manifest) -> None:
    with pytest.raises(ValueError, match="paper, grouped"):
        make_split(manifest, "random", 0)
    with pytest.raises(ValueError, match="test_fraction"):
        make_split(manifest, "paper", 0, test_fraction=1.5)
