"""Heads of several seeds trained together are the heads train_head gives each seed:
same initialisation, shuffle order and dropout masks, own validation rows, own early
stopping. Tolerance: CURVE_TOLERANCE on the curves (float32 rounding in another order, see
ecg_mlflow/model/seed_heads.py), the same test labels."""

from __future__ import annotations

import numpy as np
import pytest

from ecg_mlflow.model.head import HeadConfig, train_head
from ecg_mlflow.model.seed_heads import CURVE_TOLERANCE, SeedRows, _keras_epoch_orders, train_seed_heads

CURVES = ("loss", "accuracy", "val_loss", "val_accuracy")
N_ROWS, N_TEST, DIM = 140, 30, 16


def _blobs(seed: int = 0, spread: float = 1.5):
    """Four Gaussian blobs: features and one-hot labels of N_ROWS rows (the last N_TEST
    rows are the shared test rows)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, N_ROWS)
    x = (rng.normal(0, spread, (4, DIM))[labels] + rng.normal(0, 1, (N_ROWS, DIM))).astype(np.float32)
    return x, np.eye(4, dtype=np.float32)[labels]


def _rows(seed: int, n_train: int) -> SeedRows:
    """A per-seed validation draw from the non-test rows, `n_train` rows to train on."""
    order = np.random.default_rng(100 + seed).permutation(N_ROWS - N_TEST)
    return SeedRows(seed, np.sort(order[:n_train]), np.sort(order[n_train:n_train + 25]))


def _alone(x, y, rows: SeedRows, config: HeadConfig, **kwargs):
    return train_head(x[rows.train], y[rows.train], x[rows.val], y[rows.val], config, rows.seed, **kwargs)


def _assert_same_curves(history, other, epochs: int) -> None:
    assert len(history.val_loss) >= epochs and len(other.val_loss) >= epochs
    for curve in CURVES:
        np.testing.assert_allclose(getattr(history, curve)[:epochs], getattr(other, curve)[:epochs],
                                   atol=CURVE_TOLERANCE, rtol=0, err_msg=curve)


def test_a_seed_trained_with_others_is_its_train_head():
    """Dropout and shuffling on, ragged train sizes (the last batches are partial and of
    different sizes): each seed's curves and test labels are train_head's."""
    x, y = _blobs()
    config = HeadConfig(dense_units=(32, 16), dropout=0.2, learning_rate=1e-3, batch_size=16,
                        max_epochs=6, patience=10)
    seeds = [_rows(3, 70), _rows(4, 81), _rows(5, 90)]
    together = train_seed_heads(x, y, seeds, config)
    test = x[-N_TEST:]
    for rows in seeds:
        head, history = _alone(x, y, rows, config)
        joint_head, joint_history = together[rows.seed]
        _assert_same_curves(history, joint_history, config.max_epochs)
        assert joint_history.stopped_epoch == history.stopped_epoch == config.max_epochs
        alone_probs, joint_probs = head.predict(test, verbose=0), joint_head.predict(test, verbose=0)
        np.testing.assert_array_equal(alone_probs.argmax(1), joint_probs.argmax(1))
        assert np.abs(alone_probs - joint_probs).max() < CURVE_TOLERANCE


def test_without_dropout_and_shuffling_too():
    """The deterministic case (the benchmarks' fused comparison): same curves."""
    x, y = _blobs(1)
    config = HeadConfig(dense_units=(24,), dropout=0.0, learning_rate=1e-3, batch_size=8,
                        max_epochs=4, patience=10)
    rows = _rows(7, 60)
    _, history = _alone(x, y, rows, config, shuffle=False)
    _, joint = train_seed_heads(x, y, [rows, _rows(8, 50)], config, shuffle=False)[7]
    _assert_same_curves(history, joint, config.max_epochs)


def test_randomness_is_per_seed_and_reproducible():
    """Seeds on the same rows start, shuffle and drop out differently; a seed gives the
    same head whether trained alone or beside others."""
    x, y = _blobs(2)
    config = HeadConfig(dense_units=(16,), dropout=0.3, learning_rate=1e-2, batch_size=8,
                        max_epochs=3, patience=10)
    same = _rows(1, 80)
    twins = [same, SeedRows(2, same.train, same.val)]
    together = train_seed_heads(x, y, twins, config)
    again = train_seed_heads(x, y, [twins[0]], config)
    probs = {seed: head.predict(x, verbose=0) for seed, (head, _) in together.items()}
    assert not np.allclose(probs[1], probs[2], atol=1e-3)
    assert together[1][1].loss != together[2][1].loss
    np.testing.assert_array_equal(probs[1], again[1][0].predict(x, verbose=0))
    assert together[1][1].val_loss == again[1][1].val_loss


def test_each_seed_stops_at_its_own_epoch_with_its_own_best_weights():
    """A seed validated on shuffled labels gets worse while it learns and stops early; its
    neighbour on true labels keeps training. Each restores the weights of its best epoch,
    and the stopped seed trains no further epoch."""
    import keras

    x, y = _blobs(3, spread=1.0)
    config = HeadConfig(dense_units=(32,), dropout=0.0, learning_rate=3e-3, batch_size=16,
                        max_epochs=12, patience=2)
    good = _rows(1, 90)
    noisy_val = N_ROWS + np.arange(len(good.val))  # appended copies with permuted labels
    x_all = np.concatenate([x, x[good.val]])
    y_all = np.concatenate([y, np.random.default_rng(0).permutation(np.roll(y[good.val], 1, axis=1))])
    bad = SeedRows(2, good.train, noisy_val)
    epochs: dict[int, list[int]] = {1: [], 2: []}
    reports: list[int] = []

    def on_epoch_end(epoch, logs_by_seed):
        reports.append(epoch)
        for seed, logs in logs_by_seed.items():
            epochs[seed].append(epoch)
            assert set(logs) == set(CURVES)

    result = train_seed_heads(x_all, y_all, [good, bad], config, on_epoch_end=on_epoch_end)
    stopped = {seed: history.stopped_epoch for seed, (_, history) in result.items()}
    assert stopped[2] < stopped[1]
    assert reports == list(range(1, max(stopped.values()) + 1))  # one report per epoch of the trial
    for seed, (head, history) in result.items():
        assert epochs[seed] == list(range(1, history.stopped_epoch + 1))  # a stopped seed reports no more
        assert history.best_epoch == int(np.argmin(history.val_loss)) + 1
        if history.stopped_epoch < config.max_epochs:
            assert history.stopped_epoch == history.best_epoch + config.patience
        rows = good.val if seed == 1 else noisy_val
        probs = head.predict(x_all[rows], verbose=0)
        assert probs.min() > 1e-6  # so Keras' clipping in the loss below changes nothing
        loss = keras.losses.categorical_crossentropy(y_all[rows], probs)
        assert abs(float(np.mean(loss)) - min(history.val_loss)) < 1e-5


def test_duplicate_or_empty_seeds_are_refused():
    x, y = _blobs()
    config = HeadConfig(dense_units=(8,), max_epochs=1)
    with pytest.raises(ValueError, match="distinct"):
        train_seed_heads(x, y, [_rows(1, 50), _rows(1, 60)], config)
    with pytest.raises(ValueError, match="validation rows"):
        train_seed_heads(x, y, [SeedRows(1, np.arange(10), np.arange(0))], config)


@pytest.mark.parametrize("n", [17, 100, 593])
def test_shuffle_orders_are_the_ones_keras_fit_draws(n):
    """The trainer draws its orders from the permutation dataset alone; fit batches them
    through the whole ArrayDataAdapter pipeline: every epoch's order is the same."""
    import keras
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    for seed in (1, 7, 42):
        keras.utils.set_random_seed(seed)
        orders = _keras_epoch_orders(n, True, 3)
        ours = [next(orders) for _ in range(3)]
        keras.utils.set_random_seed(seed)
        batches = ArrayDataAdapter(np.arange(n), batch_size=16, shuffle=True).get_tf_dataset()
        fits = [np.concatenate([b.numpy() for b in batches]) for _ in range(3)]
        assert not np.array_equal(fits[0], np.arange(n))
        for epoch, (mine, fit) in enumerate(zip(ours, fits)):
            assert np.array_equal(mine, fit), (seed, epoch)


def test_kernels_and_moments_get_pages_of_their_own():
    """Large arrays are copied into a fresh mapping aligned to 2 MiB (huge pages), small
    ones stay ordinary copies; both hold the values, writable, in C order."""
    from ecg_mlflow.model.seed_heads import HUGE_PAGE, _in_own_pages

    big = np.random.default_rng(0).normal(size=(1280, 1024))
    small = np.arange(512, dtype=np.float32)
    for values, aligned in ((big, True), (small, False)):
        copy = _in_own_pages(values)
        assert copy.dtype == np.float32 and copy.flags.writeable and copy.flags.c_contiguous
        assert np.array_equal(copy, values.astype(np.float32))
        if aligned:
            assert copy.ctypes.data % HUGE_PAGE == 0
        else:
            assert copy.base is None  # an ordinary copy
        copy[0] = 7  # its own memory
        assert values.ravel()[0] != 7


def test_compile_kernels_leaves_every_kernel_compiled_on_disk(tmp_path):
    """What `make setup` runs: afterwards a new process finds each of the trainer's Numba
    kernels in the on-disk cache instead of compiling it in a first study."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}
    subprocess.run([sys.executable, "-c", "from ecg_mlflow.model.seed_heads import compile_kernels; compile_kernels()"],
                   check=True, env=env, capture_output=True)
    cached = {path.name.split(".")[1].rsplit("-", 1)[0] for path in tmp_path.rglob("*.nbi")}  # module.name-line
    assert {"dense_forward", "dense_step", "input_gradient", "bias_step", "_layer_masks"} <= cached, cached
