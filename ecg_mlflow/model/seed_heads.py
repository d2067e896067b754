"""The heads of several seeds of one backbone, trained together in one computation.

`train_head` fits one head with Keras' `fit`; at batch 16 every step is mostly Keras'
overhead and its unfused Adam (about ten elementwise passes over each 2048 x 1024
kernel). Here each seed's step is a handful of Numba loops on Numba's threads
(model/head_kernels.py): the forward pass, and per dense layer the input gradient and
one loop that forms the weight gradient and applies Adam in the same pass over kernel
and moments; the first layer's loop also takes the updated rows on into the next batch's
forward pass, so the next step does not read that kernel again. The first kernel and
its moments (25 MB at width 2048) are read and written every step, which bounds a step
by memory traffic (on an Intel Xeon of this kind about 24 GB/s, as a plain copy gets);
this crosses them the fewest times Adam allows (on the real lite0 features, forming the
next forward pass in the update took a seed's step from 2.11 to 1.99 ms), and sweeps
them in alternate directions so each step starts on what is still in cache.
Seeds take turns epoch by epoch (one seed's whole epoch, then the next's), so every
epoch ends with a report of all seeds that trained it, and a seed that stopped early
costs nothing more. The arithmetic is the same on any number of threads; a study deals
a backbone's seeds into one-thread child processes (model/head_process.py). (A
TensorFlow graph with every seed's step side by side and Adam in TensorFlow's fused
kernel came before this: its matmuls at these shapes ran at half OpenBLAS' speed, and
its gradient and update were two passes over memory.)

Every seed stays an independent replicate with the randomness `train_head` gives it:

- initial weights: the head `build_head` draws after `keras.utils.set_random_seed(seed)`,
  exactly as `train_head` does (the same Keras layers, the same glorot-uniform/zeros);
- shuffle order: the permutation Keras' ArrayDataAdapter draws, traced after the same
  seeding, so each epoch sees the batches `fit` would give it (under `set_random_seed`
  Keras repeats one permutation every epoch; this trainer reproduces that, whatever it is);
- dropout masks: those of `tf.nn.experimental.stateless_dropout` (what Keras' Dropout
  calls under TensorFlow) with the seed the layer draws at that step (its SeedGenerator's
  state [s0, step]), drawn bit for bit in Numba (model/dropout_masks.py);
- its own train and validation rows (index arrays into one shared feature matrix; sizes
  may differ per seed), its own early stopping with its own best weights, its own curves.

How close to `train_head` (tests/test_seed_heads.py): the batches and masks are the same,
the arithmetic is not bitwise. Reductions run in another order (a full-batch validation
pass instead of Keras' batches of 16, the weight gradient summed row by row instead of
in a oneDNN matmul, multiply-adds fused in Adam too), so values differ in the last
float32 digits (~1e-7 relative per step). Training amplifies that slowly: the curves
agree to within CURVE_TOLERANCE over the first epochs and the trained heads give the
same test labels; over many epochs the difference can grow as it does between any two
float orders of the same computation. A seed whose validation loss ties its best to the
last digit could therefore stop one epoch apart from `train_head`. Subnormals flush to
zero here as in TensorFlow's threads (model/denormals.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ecg_mlflow.model.head import HeadConfig, HeadHistory, build_head
from ecg_mlflow.model.dropout_masks import dropout_masks
from ecg_mlflow.model.head_kernels import (FORWARD_CHUNKS, bias_step, dense_forward, dense_step, input_gradient,
                                           sum_chunks)

ADAM_BETA_1 = 0.9  # Keras' Adam defaults, which train_head uses
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7
CURVE_TOLERANCE = 1e-5
"""Absolute agreement of a seed's curves with train_head's over the first epochs."""

EpochHook = Callable[[int, dict[int, dict[str, float]]], None]
"""on_epoch_end(epoch, logs by seed) with 1-based epochs, once per epoch, after every seed
that trained it (those alone are in the dict): what Optuna's pruning needs, one report
per epoch of the whole trial."""


@dataclass(frozen=True)
class SeedRows:
    """One seed's training and validation rows of the shared feature matrix."""

    seed: int
    train: np.ndarray  # row indices
    val: np.ndarray


@dataclass(frozen=True)
class SeedStart:
    """What a seed starts from, drawn under its Keras seeding: the head's initial weights,
    its dropout layers' seeds and every epoch's order. Plain arrays, so the training can
    run in a process without Keras (model/head_process.py)."""

    rows: SeedRows
    weights: list[np.ndarray]  # kernel, bias per dense layer: the head's get_weights()
    dropout_seeds: np.ndarray
    orders: tuple[np.ndarray, ...]  # positions into rows.train, one per epoch up to max_epochs


@dataclass
class _Seed:
    """Everything one seed owns while training: its weights, Adam slots and curves."""

    rows: SeedRows
    weights: list[np.ndarray]  # kernel, bias per dense layer, in pages of their own
    momenta: list[np.ndarray]
    velocities: list[np.ndarray]
    dropout_seeds: np.ndarray
    orders: Iterator[np.ndarray]
    upcoming: np.ndarray | None  # the next epoch's order, drawn one epoch ahead
    history: HeadHistory
    steps: int = 0  # Adam iterations and dropout draws so far
    wait: int = 0
    best_loss: float | None = None
    best_weights: list[np.ndarray] | None = None
    active: bool = True
    first_z: np.ndarray | None = None  # the next step's first-layer pre-activation, formed by this step

    @classmethod
    def from_start(cls, start: SeedStart) -> "_Seed":
        weights = [_in_own_pages(w) for w in start.weights]
        orders = iter(start.orders)
        return cls(
            rows=start.rows, weights=weights,
            momenta=[_zeros_in_own_pages(w.shape) for w in weights],
            velocities=[_zeros_in_own_pages(w.shape) for w in weights],
            dropout_seeds=start.dropout_seeds, orders=orders, upcoming=next(orders), history=HeadHistory(),
        )


def train_seed_heads(
    features: np.ndarray,
    labels: np.ndarray,
    seeds: Sequence[SeedRows],
    config: HeadConfig,
    *,
    on_epoch_end: EpochHook | None = None,
    shuffle: bool = True,
) -> dict[int, tuple[object, HeadHistory]]:
    """Fit one head per seed, as `train_head` would for each, all in one computation.

    Args:
        features: [N, D] float32 backbone features of every row any seed uses.
        labels: [N, 4] one-hot labels of those rows.
        seeds: per seed its training and validation row indices (distinct seeds).
        config: the head and its optimisation, shared by the seeds.
        on_epoch_end: called after each epoch with every seed that trained it and its
            Keras logs (loss, accuracy, val_loss, val_accuracy); an exception raised here
            stops all (Optuna's TrialPruned, for one).
        shuffle: False feeds rows in index order (for comparisons).

    Returns:
        seed -> (Keras head with the restored best weights, HeadHistory).
    """
    heads, starts = start_seed_heads(seeds, features.shape[1], config, shuffle=shuffle)
    return finish_seed_heads(heads, train_started_seeds(features, labels, starts, config, on_epoch_end=on_epoch_end))


def start_seed_heads(seeds: Sequence[SeedRows], feature_dim: int, config: HeadConfig, *,
                     shuffle: bool = True) -> tuple[dict[int, object], list[SeedStart]]:
    """Each seed's Keras head and its start (`SeedStart`): the part of training that needs
    Keras and TensorFlow (their seeding, Keras' shuffle orders)."""
    from ecg_mlflow.model.backend import tensorflow_for_heads

    if len({s.seed for s in seeds}) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {[s.seed for s in seeds]}")
    tensorflow_for_heads()  # Keras' shuffle orders (tf.data), whatever the backend
    heads, starts = {}, []
    for rows in seeds:
        heads[rows.seed], start = _start_seed(rows, feature_dim, config, shuffle)
        starts.append(start)
    return heads, starts


def train_started_seeds(
    features: np.ndarray, labels: np.ndarray, starts: Sequence[SeedStart], config: HeadConfig, *,
    on_epoch_end: EpochHook | None = None,
) -> dict[int, tuple[list[np.ndarray], HeadHistory]]:
    """The training itself, NumPy and the Numba kernels alone: seed -> (best weights,
    HeadHistory). Arguments as train_seed_heads'."""
    x = np.ascontiguousarray(features, np.float32)
    y = np.ascontiguousarray(labels, np.float32)
    states = [_Seed.from_start(start) for start in starts]
    masks = _build_dropout_masks(config)
    for epoch in range(1, config.max_epochs + 1):
        live = [state for state in states if state.active]
        if not live:
            break
        logs_by_seed = {}
        for state in live:
            logs = _train_epoch(state, x, y, config, masks) | _validate(state, x, y)
            _record_epoch(state, logs)
            logs_by_seed[state.rows.seed] = logs
            state.active = not _should_stop(state, epoch, config.patience)
        if on_epoch_end is not None:
            on_epoch_end(epoch, logs_by_seed)
    return {s.rows.seed: _finish_seed(s) for s in states}


def finish_seed_heads(heads: dict[int, object], trained: dict[int, tuple[list[np.ndarray], HeadHistory]]
                      ) -> dict[int, tuple[object, HeadHistory]]:
    """Each seed's Keras head with its best weights, beside its history."""
    for seed, (weights, _) in trained.items():
        heads[seed].set_weights(weights)
    return {seed: (heads[seed], history) for seed, (_, history) in trained.items()}


def compile_kernels() -> None:
    """Have Numba compile the trainer's kernels (a few seconds; cached on disk after, per
    install): `make setup` does it, so a user's first study does not pay it in its heads,
    and the benchmarks do it before they time anything. One tiny seed for one epoch."""
    rng = np.random.default_rng(0)
    features = rng.random((40, 8), dtype=np.float32)
    labels = np.eye(4, dtype=np.float32)[np.arange(40) % 4]
    train_seed_heads(features, labels, [SeedRows(1, np.arange(32), np.arange(32, 40))], HeadConfig(max_epochs=1))


def _start_seed(rows: SeedRows, feature_dim: int, config: HeadConfig, shuffle: bool) -> tuple[object, SeedStart]:
    """Seed the way train_head does, then take the head's initial weights, its dropout
    layers' seeds and Keras' shuffle orders from the very objects `fit` would use."""
    import itertools

    import keras

    if len(rows.train) == 0 or len(rows.val) == 0:
        raise ValueError(f"seed {rows.seed}: needs training and validation rows")
    keras.utils.set_random_seed(rows.seed)
    head = build_head(feature_dim, config.dense_units, config.dropout)
    dropout_seeds = np.array([_layer_seed(layer) for layer in head.layers
                              if isinstance(layer, keras.layers.Dropout)], np.int64)
    orders = tuple(itertools.islice(_keras_epoch_orders(len(rows.train), shuffle, config.max_epochs),
                                    config.max_epochs))
    return head, SeedStart(rows, [np.asarray(w, np.float32) for w in head.get_weights()], dropout_seeds, orders)


HUGE_PAGE = 2 * 1024 * 1024


def _in_own_pages(values) -> np.ndarray:
    """A float32 copy of `values` in pages of its own (`_zeros_in_own_pages`)."""
    values = np.asarray(values, np.float32)
    array = _zeros_in_own_pages(values.shape)
    array[...] = values
    return array


def _zeros_in_own_pages(shape) -> np.ndarray:
    """float32 zeros in a fresh anonymous mapping (zero-filled by the kernel), aligned to
    and asking for 2 MiB pages. A step streams every kernel and moment, and with 4 KiB
    pages its TLB misses cost as much as the arithmetic. NumPy asks for huge pages only
    when malloc maps an array afresh; once a process has freed large buffers
    (TensorFlow's, after Keras' fit or a backbone pass), glibc serves arrays of this size
    from its heap instead, in small pages (measured: the same 10 heads 54.8 s instead of
    38.9 s)."""
    import mmap

    size = int(np.prod(shape))
    nbytes = 4 * size
    if nbytes < HUGE_PAGE:  # a bias: a page of its own would waste most of it
        return np.zeros(shape, np.float32)
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    start = -np.frombuffer(mapping, np.uint8, count=0).ctypes.data % HUGE_PAGE
    if hasattr(mmap, "MADV_HUGEPAGE"):
        mapping.madvise(mmap.MADV_HUGEPAGE, start, nbytes)
    return np.frombuffer(mapping, np.float32, count=size, offset=start).reshape(shape)


def _layer_seed(dropout) -> int:
    """The first half of a Dropout layer's SeedGenerator state; Keras makes none (and
    draws nothing) at rate 0."""
    generator = getattr(dropout, "seed_generator", None)
    return 0 if generator is None else int(generator.state.numpy()[0])


def _keras_epoch_orders(n: int, shuffle: bool, max_epochs: int) -> Iterator[np.ndarray]:
    """Positions 0..n-1 in the order Keras' fit feeds them, one array per epoch.

    Keras' ArrayDataAdapter (what `fit` builds for arrays; Keras is pinned) draws each
    epoch's order as `tf.random.shuffle(tf.range(n))` in the map of a one-element dataset,
    then cuts it into batches in that order. Here that dataset alone: the same function
    traced after the same seeding, so its shuffle gets the same graph and op seed (the
    whole adapter pipeline cost four times as long per seed; tests/test_seed_heads.py
    holds the two equal). The orders are drawn now, while the global seed is this seed's.
    Under `set_random_seed` every epoch repeats one permutation (each epoch is a new
    iterator over the same dataset); when two draws agree that one is reused, otherwise
    every epoch's order is drawn here. (The batch size does not change the order.)"""
    import itertools

    from ecg_mlflow.model.backend import tensorflow_for_heads

    if not shuffle:
        return itertools.repeat(np.arange(n))
    tf = tensorflow_for_heads()

    def permutation(_):  # ArrayDataAdapter.get_tf_dataset's, op for op
        indices = tf.range(n, dtype=tf.int64)
        indices = tf.random.shuffle(indices)
        return indices

    epoch = tf.data.Dataset.range(1).map(permutation)

    def draw() -> np.ndarray:
        return next(iter(epoch)).numpy()

    first, second = draw(), draw()
    if np.array_equal(first, second):
        return itertools.repeat(first)
    return iter([first, second] + [draw() for _ in range(max_epochs - 2)])


def _build_dropout_masks(config: HeadConfig) -> Callable[[np.ndarray, int, int], list[np.ndarray]]:
    """masks(layer seeds, first step, steps): per hidden layer, [steps, batch_size, width]
    factors Keras' Dropout applies at those steps (model/dropout_masks.py: TensorFlow's
    stateless dropout, bit for bit); none at rate 0, where Keras draws nothing. A partial
    batch's mask is the first rows of a full one's: a stateless draw's stream does not
    depend on the shape asked for."""
    if config.dropout <= 0:
        return lambda layer_seeds, first, steps: []
    return lambda layer_seeds, first, steps: dropout_masks(
        layer_seeds, first, steps, config.batch_size, config.dense_units, config.dropout)


def _train_epoch(state: _Seed, x: np.ndarray, y: np.ndarray, config: HeadConfig, masks) -> dict[str, float]:
    """One epoch of one seed, batch by batch in its Keras order: the epoch's mean loss
    and accuracy, as Keras' fit logs them."""
    order = state.rows.train[state.upcoming]
    state.upcoming = next(state.orders, None)
    starts = range(0, len(order), config.batch_size)
    epoch_masks = masks(state.dropout_seeds, state.steps, len(starts))
    loss_sum = correct = 0.0
    for index, start in enumerate(starts):
        rows = order[start:start + config.batch_size]
        if index + 1 < len(starts):
            next_rows = order[start + config.batch_size:start + 2 * config.batch_size]
        else:  # the next epoch's first batch, if the seed trains on
            next_rows = None if state.upcoming is None else state.rows.train[state.upcoming[:config.batch_size]]
        batch_masks = [m[index, :len(rows)] for m in epoch_masks]
        batch_loss, batch_correct = _train_step(state, x[rows], y[rows], batch_masks, config.learning_rate,
                                                None if next_rows is None else x[next_rows])
        loss_sum += batch_loss * len(rows)
        correct += batch_correct
        state.steps += 1
    return {"loss": loss_sum / len(order), "accuracy": correct / len(order)}


def _train_step(state: _Seed, batch_x: np.ndarray, batch_y: np.ndarray, masks: list, learning_rate: float,
                next_x: np.ndarray | None):
    """One Adam step of one seed: forward with its dropout masks, backward, and each
    layer's update fused with its weight gradient (model/head_kernels.py); the first
    layer's update also forms the next batch's (`next_x`) first-layer pre-activation,
    which the next step starts from. Returns the batch's mean loss and number of
    correct rows."""
    weights = state.weights
    n_layers = len(weights) // 2
    inputs, pre_activations = [batch_x], []
    h = batch_x
    for layer in range(n_layers - 1):
        z = state.first_z if layer == 0 and state.first_z is not None else _dense(h, weights[2 * layer],
                                                                                  weights[2 * layer + 1])
        pre_activations.append(z)
        h = np.maximum(z, 0)
        if masks:
            h = h * masks[layer]
        inputs.append(h)
    probabilities, losses = _softmax_cross_entropy(_dense(h, weights[-2], weights[-1]), batch_y)
    grad = (probabilities - batch_y) / np.float32(len(batch_y))
    adam = _adam_scalars(learning_rate, state.steps)
    fuse = n_layers > 1 and next_x is not None  # the first layer is a hidden one, and a step follows
    partial = np.empty((FORWARD_CHUNKS, len(next_x), weights[0].shape[1]), np.float32) if fuse else None
    state.first_z = None
    for layer in reversed(range(n_layers)):
        kernel, bias = 2 * layer, 2 * layer + 1
        if layer:
            below = np.empty((len(grad), weights[kernel].shape[0]), np.float32)
            input_gradient(grad, weights[kernel], below)  # with the kernel before its update
        ahead = (next_x, partial) if layer == 0 and fuse else ()
        dense_step(np.ascontiguousarray(inputs[layer].T), grad, weights[kernel],
                   state.momenta[kernel], state.velocities[kernel], *adam,
                   state.steps % 2 == 1, *ahead)  # backwards on odd steps: the rows in cache first
        bias_step(grad, weights[bias], state.momenta[bias], state.velocities[bias], *adam)
        if ahead:
            state.first_z = np.empty((len(next_x), weights[0].shape[1]), np.float32)
            sum_chunks(partial, weights[bias], state.first_z)
        if layer:
            below = below * masks[layer - 1] if masks else below
            grad = below * (pre_activations[layer - 1] > 0)
    hits = probabilities.argmax(1) == batch_y.argmax(1)
    return float(losses.mean()), float(hits.sum())


def _dense(inputs: np.ndarray, kernel: np.ndarray, bias: np.ndarray) -> np.ndarray:
    out = np.empty((len(inputs), kernel.shape[1]), np.float32)
    dense_forward(np.ascontiguousarray(inputs), kernel, bias, out)
    return out


def _softmax_cross_entropy(logits: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities and per-row cross-entropy, in float32 from the logits."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    total = exp.sum(axis=1, keepdims=True)
    return exp / total, np.log(total[:, 0]) - (truth * shifted).sum(axis=1)


def _adam_scalars(learning_rate: float, steps: int) -> tuple[np.float32, ...]:
    """Keras' Adam at iteration `steps`, in float32 as it forms them: alpha (the learning
    rate with both bias corrections), 1 - beta_1, 1 - beta_2 and epsilon."""
    f32 = np.float32
    t = f32(steps + 1)
    beta_1_power, beta_2_power = f32(ADAM_BETA_1) ** t, f32(ADAM_BETA_2) ** t
    alpha = f32(learning_rate) * np.sqrt(f32(1) - beta_2_power) / (f32(1) - beta_1_power)
    return f32(alpha), f32(1 - ADAM_BETA_1), f32(1 - ADAM_BETA_2), f32(ADAM_EPSILON)


def _validate(state: _Seed, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Validation loss and accuracy of one seed's head, inference mode (no dropout)."""
    weights = state.weights
    h = x[state.rows.val]
    for layer in range(len(weights) // 2 - 1):
        h = np.maximum(_dense(h, weights[2 * layer], weights[2 * layer + 1]), 0)
    truth = y[state.rows.val]
    probabilities, losses = _softmax_cross_entropy(_dense(h, weights[-2], weights[-1]), truth)
    hits = probabilities.argmax(1) == truth.argmax(1)
    return {"val_loss": float(losses.mean()), "val_accuracy": float(hits.mean())}


def _record_epoch(state: _Seed, logs: dict[str, float]) -> None:
    history = state.history
    for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
        getattr(history, key).append(logs[key])


def _should_stop(state: _Seed, epoch: int, patience: int) -> bool:
    """Keras' EarlyStopping(val_loss, patience, restore_best_weights=True), step by step:
    a strictly lower loss is the new best (its weights kept); otherwise stop once
    `patience` epochs have passed without one (never after the first epoch)."""
    current = state.history.val_loss[-1]
    state.wait += 1
    if state.best_loss is None or current < state.best_loss:
        state.best_loss = current
        state.best_weights = [w.copy() for w in state.weights]
        state.wait = 0
        return False
    return state.wait >= patience and epoch > 1


def _finish_seed(state: _Seed) -> tuple[list[np.ndarray], HeadHistory]:
    """The seed's best weights, and its history."""
    history = state.history
    history.stopped_epoch = len(history.val_loss)
    history.best_epoch = int(np.argmin(history.val_loss)) + 1
    return state.best_weights, history
