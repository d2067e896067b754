"""Cross-validation folds: every image tested once per repeat, duplicates kept in one fold.

A repeat assigns the units of the split policy (duplicate groups for `grouped`, single files
for `paper`) to k folds, stratified by class, with scikit-learn's StratifiedGroupKFold
shuffled by CV_SEED + repeat: the repeat index alone drives the fold assignment. Fold f of
repeat r is then a Split whose test set is fold f; its validation set (for early stopping)
is drawn from the other k - 1 folds, whole units at a time, with the run's training seed,
so validation never touches the test fold and, under `grouped`, no copy of a test image is
trained or validated on.

The training seed of the child run (repeat r, fold f) is `cv_seed(r, f, k) = r * k + f + 1`:
one distinct seed per (repeat, fold), the same for every backbone, so the two backbones'
runs of one cell are paired by seed exactly as the runs of the fixed-split study are.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ecg_mlflow.data.manifest import Manifest
from ecg_mlflow.data.splits import TEST_SEED, Split, _draw_stratified, _units

CV_SEED = TEST_SEED
"""Repeat r shuffles the fold assignment with CV_SEED + r (repeat 0 uses the paper's 42)."""
VAL_FRACTION = 0.2
"""Share of the training folds' units held out for early stopping, as the fixed split does."""


@dataclass(frozen=True)
class Fold:
    """One cell of a cross-validation: repeat r, fold f, the seed it trains with, its split."""

    repeat: int
    fold: int
    seed: int
    split: Split


def cv_seed(repeat: int, fold: int, k: int) -> int:
    """The training seed of cell (repeat, fold) of a k-fold study: r * k + f + 1."""
    return repeat * k + fold + 1


def _validate_folds(k: int, repeats: int, n_smallest_class: int) -> None:
    if isinstance(k, bool) or not isinstance(k, int) or k < 2:
        raise ValueError(f"cv must be an integer of at least 2 folds, got {k!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"cv_repeats must be an integer of at least 1, got {repeats!r}")
    if k > n_smallest_class:
        raise ValueError(
            f"cv={k} folds need at least {k} distinct images (duplicate groups) in every class; "
            f"the smallest class has {n_smallest_class}"
        )


def assign_folds(manifest: Manifest, policy: str, k: int, repeat: int) -> dict[str, int]:
    """relpath -> test fold (0..k-1) of one repeat: whole units, stratified by class."""
    from sklearn.model_selection import StratifiedGroupKFold

    units, by_class = _units(manifest, policy)
    label_of_unit = {u: label for label, us in by_class.items() for u in us}
    unit_ids = np.arange(len(units))
    labels = np.array([label_of_unit[u] for u in unit_ids])
    # one row per unit (its class), the unit as the group: folds hold whole units
    splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=CV_SEED + repeat)
    fold_of: dict[str, int] = {}
    for fold, (_, test_units) in enumerate(splitter.split(unit_ids, labels, groups=unit_ids)):
        for u in test_units:
            fold_of.update({p: fold for p in units[u]})
    return fold_of


def make_folds(manifest: Manifest, policy: str, k: int, repeats: int = 1, *,
               val_fraction: float = VAL_FRACTION) -> tuple[Fold, ...]:
    """Every (repeat, fold) cell of a repeated k-fold cross-validation, repeat-major.

    Raises ValueError naming `cv` or `cv_repeats` when the design cannot be built.
    """
    units, by_class = _units(manifest, policy)
    _validate_folds(k, repeats, min((len(us) for us in by_class.values()), default=0))
    unit_of = {p: u for u, members in enumerate(units) for p in members}
    cells = []
    for repeat in range(repeats):
        fold_of = assign_folds(manifest, policy, k, repeat)
        for fold in range(k):
            seed = cv_seed(repeat, fold, k)
            test_units = {unit_of[p] for p, f in fold_of.items() if f == fold}
            rest = {label: [u for u in us if u not in test_units] for label, us in by_class.items()}
            val_units = _draw_stratified(rest, val_fraction, seed)
            train_units = set(range(len(units))) - test_units - val_units

            def files(chosen: set[int]) -> tuple[str, ...]:
                return tuple(sorted(p for u in chosen for p in units[u]))

            split = Split(policy, seed, files(train_units), files(val_units), files(test_units))
            cells.append(Fold(repeat, fold, seed, split))
    return tuple(cells)
