"""Train/validation/test splits and the leakage between them.

`paper` splits files as Chen & Chen did (stratified by class, test drawn once with seed 42,
validation drawn per run seed): on the real data about two thirds of the test images then
have a byte-identical twin in training. `grouped` draws whole groups of exact and near
duplicates, so no copy of a test image is trained on. Leakage is measured for either.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ecg_mlflow.data.classes import CLASSES
from ecg_mlflow.data.manifest import Manifest
from ecg_mlflow.data.hashing import NEAR_DUPLICATE_DISTANCE, near_pairs
from ecg_mlflow.schema import COL_RELPATH, COL_SHA256, SPLIT_POLICIES

TEST_SEED = 42
SUBSETS: tuple[str, ...] = ("train", "val", "test")
COL_LABEL = "label"
COL_SUBSET = "subset"

__all__ = [
    "NEAR_DUPLICATE_DISTANCE", "SPLIT_POLICIES", "TEST_SEED", "Leakage", "Split",
    "duplicate_groups", "make_split", "measure_leakage",
]


@dataclass(frozen=True)
class Split:
    policy: str
    seed: int
    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    @property
    def test_digest(self) -> str:
        """SHA-256 over the sorted test relpaths: equal digests, equal test sets."""
        return hashlib.sha256("".join(f"{p}\n" for p in sorted(self.test)).encode("utf-8")).hexdigest()

    def to_frame(self, manifest: Manifest) -> pd.DataFrame:
        """split.csv: relpath, label, sha256, subset (train | val | test), sorted by relpath."""
        subset_of = {p: name for name in SUBSETS for p in getattr(self, name)}
        rows = [
            {COL_RELPATH: r.relpath, COL_LABEL: r.label, COL_SHA256: r.sha256, COL_SUBSET: subset_of[r.relpath]}
            for r in manifest.records
            if r.relpath in subset_of
        ]
        return pd.DataFrame(rows, columns=[COL_RELPATH, COL_LABEL, COL_SHA256, COL_SUBSET])


@dataclass(frozen=True)
class Leakage:
    n_test: int
    exact: int
    near: int


def duplicate_groups(manifest: Manifest) -> list[list[str]]:
    """Groups of relpaths showing the same report: identical bytes or dHash within
    NEAR_DUPLICATE_DISTANCE, joined transitively. Every record is in exactly one group;
    groups and their members are sorted."""
    contents = sorted({r.sha256: r.dhash for r in manifest.records}.items())
    parent = list(range(len(contents)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j in near_pairs([look for _, look in contents]):
        parent[find(i)] = find(j)
    index = {sha: k for k, (sha, _) in enumerate(contents)}
    groups: dict[int, list[str]] = {}
    for r in manifest.records:
        groups.setdefault(find(index[r.sha256]), []).append(r.relpath)
    return sorted(sorted(g) for g in groups.values())


def _validate(policy: str, test_fraction: float, val_fraction: float) -> None:
    if policy not in SPLIT_POLICIES:
        raise ValueError(f"split policy must be one of {', '.join(SPLIT_POLICIES)}, got {policy!r}")
    for name, value in (("test_fraction", test_fraction), ("val_fraction", val_fraction)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must lie strictly between 0 and 1, got {value}")


def _draw_test(units_by_class: dict[str, list], fraction: float, seed: int) -> set[int]:
    """ceil(fraction * n) units of every class, like the paper's per-class test draw."""
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for label in CLASSES:
        units = units_by_class.get(label, [])
        n = min(math.ceil(fraction * len(units)), len(units))
        chosen.update(units[k] for k in rng.permutation(len(units))[:n])
    return chosen


def _draw_stratified(units_by_class: dict[str, list], fraction: float, seed: int) -> set[int]:
    """floor(fraction * total) units, spread over classes by largest remainder (as sklearn's
    stratified draw with an integer size does), each class drawn at random."""
    total = sum(len(u) for u in units_by_class.values())
    target = math.floor(fraction * total)
    labels = [c for c in CLASSES if units_by_class.get(c)]
    exact = np.array([fraction * len(units_by_class[c]) for c in labels])
    counts = np.floor(exact).astype(int)
    for k in np.argsort(-(exact - counts), kind="stable")[: target - counts.sum()]:
        counts[k] += 1
    rng = np.random.default_rng(seed)
    chosen: set[int] = set()
    for label, n in zip(labels, counts):
        units = units_by_class[label]
        chosen.update(units[k] for k in rng.permutation(len(units))[:n])
    return chosen


def _units(manifest: Manifest, policy: str) -> tuple[list[list[str]], dict[str, list[int]]]:
    """The things a policy draws (single files or duplicate groups), indexed by class."""
    if policy == "paper":
        units = [[r.relpath] for r in manifest.records]
    else:
        units = duplicate_groups(manifest)
    label_of = {r.relpath: r.label for r in manifest.records}
    by_class: dict[str, list[int]] = {}
    for k, members in enumerate(units):
        labels = [label_of[p] for p in members]
        # a group spanning classes (never in the real data) is stratified by its majority class
        majority = max(CLASSES, key=lambda c: (labels.count(c), -CLASSES.index(c)))
        by_class.setdefault(majority, []).append(k)
    return units, by_class


def make_split(
    manifest: Manifest,
    policy: str,
    seed: int,
    *,
    test_fraction: float = 0.2,
    val_fraction: float = 0.2,
    test_seed: int = TEST_SEED,
) -> Split:
    """Split a manifest: test drawn with `test_seed` only, validation from the rest with `seed`.

    On the 928 real files `paper` gives 593 train / 148 val / 187 test: 187 is the sum over
    classes of ceil(0.2 n), 148 = floor(0.2 * 741) as Keras' validation_split leaves 593.
    """
    _validate(policy, test_fraction, val_fraction)
    units, by_class = _units(manifest, policy)
    test = _draw_test(by_class, test_fraction, test_seed)
    rest = {label: [k for k in ks if k not in test] for label, ks in by_class.items()}
    val = _draw_stratified(rest, val_fraction, seed)

    def files(ks: Sequence[int] | set[int]) -> tuple[str, ...]:
        return tuple(sorted(p for k in ks for p in units[k]))

    train = set(range(len(units))) - test - val
    return Split(policy, seed, files(train), files(val), files(test))


def measure_leakage(manifest: Manifest, split: Split) -> Leakage:
    """How many test images have an exact (same SHA-256) or near (dHash within
    NEAR_DUPLICATE_DISTANCE, exact copies included) duplicate in train or validation."""
    by_path = {r.relpath: r for r in manifest.records}
    test = [by_path[p] for p in split.test]
    seen = [by_path[p] for p in split.train + split.val]
    seen_sha = {r.sha256 for r in seen}
    exact = sum(1 for r in test if r.sha256 in seen_sha)
    if not test or not seen:
        return Leakage(len(test), exact, exact)
    # One near-pair search over test + seen hashes instead of a test x seen distance matrix
    # (20,000 x 80,000 of them would be 6 GiB); a pair (i, j) has i < j, so tests come first.
    looks = [r.dhash for r in test] + sorted({r.dhash for r in seen})
    near_test = {i for i, j in near_pairs(looks) if i < len(test) <= j}
    return Leakage(len(test), exact, len(near_test))
