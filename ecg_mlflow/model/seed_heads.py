"""The heads of several seeds of one backbone, trained together in one computation.

`train_head` fits one head with Keras' `fit`; at batch 16 every step is mostly Keras'
overhead and its unfused Adam (about ten elementwise passes over each 2048 x 1024
kernel). Here one TensorFlow graph holds one step of every seed: each seed's forward
pass, gradient and Adam update sit in their own `tf.cond` branch, so the executor runs
the seeds side by side on the CPU's cores and a seed that has no batch (it stopped early,
or its epoch is shorter) costs nothing. Adam runs in TensorFlow's fused kernel (one pass
per variable; Keras' unfused update took about 3x as long, an XLA-fused one 2x). The matmuls are per seed (2-D, oneDNN):
on this CPU a stacked [S, 16, 2048] x [S, 2048, 1024] BatchMatMul took 35 ms against
15 ms for ten 2-D matmuls in one graph, and XLA's CPU dot was slower still.

Every seed stays an independent replicate with the randomness `train_head` gives it:

- initial weights: the head `build_head` draws after `keras.utils.set_random_seed(seed)`,
  exactly as `train_head` does (the same Keras layers, the same glorot-uniform/zeros);
- shuffle order: Keras' own ArrayDataAdapter, built after the same seeding, so each epoch
  sees the batches `fit` would give it (under `set_random_seed` Keras repeats one
  permutation every epoch; this trainer reproduces that, whatever it is);
- dropout masks: `tf.nn.experimental.stateless_dropout` with the seed Keras' Dropout
  layer draws at that step (its SeedGenerator's state [s0, step]);
- its own train and validation rows (index arrays into one shared feature matrix; sizes
  may differ per seed), its own early stopping with its own best weights, its own curves.

How close to `train_head` (tests/test_seed_heads.py): the batches and masks are the same,
the arithmetic is not bitwise. Reductions run in another order (a full-batch validation
pass instead of Keras' batches of 16, oneDNN matmuls in another graph), so values differ
in the last float32 digits (~1e-7 relative per step). Training amplifies that slowly:
the curves agree to within CURVE_TOLERANCE over the first epochs and the trained heads
give the same test labels; over many epochs the difference can grow as it does between
any two float orders of the same computation. A seed whose validation loss ties its best
to the last digit could therefore stop one epoch apart from `train_head`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import numpy as np

from ecg_mlflow.model.head import HeadConfig, HeadHistory, build_head

ADAM_BETA_1 = 0.9  # Keras' Adam defaults, which train_head uses
ADAM_BETA_2 = 0.999
ADAM_EPSILON = 1e-7
INT32_SEED_MODULUS = 2**31 - 2  # Keras' _cast_seed: floormod(seed, int32.max - 1)
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


@dataclass
class _Seed:
    """Everything one seed owns while training: its head, variables, slots and curves."""

    rows: SeedRows
    head: object  # the Keras head train_head would start from
    variables: list
    momenta: list
    velocities: list
    dropout_seeds: list[int]
    orders: Iterator[np.ndarray]
    history: HeadHistory
    steps: int = 0  # Adam iterations and dropout draws so far
    wait: int = 0
    best_loss: float | None = None
    best_weights: list[np.ndarray] | None = None
    active: bool = True


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
    from ecg_mlflow.model.backend import tensorflow_for_heads

    tf = tensorflow_for_heads()
    if len({s.seed for s in seeds}) != len(seeds):
        raise ValueError(f"seeds must be distinct, got {[s.seed for s in seeds]}")
    tf.config.experimental.enable_op_determinism()
    states = [_start_seed(rows, features.shape[1], config, shuffle) for rows in seeds]
    x = tf.constant(features, tf.float32)
    y = tf.constant(labels, tf.float32)
    step = _build_step(states, x, y, config)
    validate = _build_validation(states, x, y)
    for epoch in range(1, config.max_epochs + 1):
        live = [index for index, state in enumerate(states) if state.active]
        if not live:
            break
        sums = _run_epoch(states, step, config.batch_size)
        val_loss, val_accuracy = (t.numpy() for t in validate(tf.constant([s.active for s in states])))
        logs_by_seed = {}
        for index in live:
            state = states[index]
            logs = {
                "loss": float(sums[index][0] / len(state.rows.train)),
                "accuracy": float(sums[index][1] / len(state.rows.train)),
                "val_loss": float(val_loss[index]),
                "val_accuracy": float(val_accuracy[index]),
            }
            _record_epoch(state, logs)
            logs_by_seed[state.rows.seed] = logs
            state.active = not _should_stop(state, epoch, config.patience)
        if on_epoch_end is not None:
            on_epoch_end(epoch, logs_by_seed)
    return {s.rows.seed: _finish_seed(s) for s in states}


def _start_seed(rows: SeedRows, feature_dim: int, config: HeadConfig, shuffle: bool) -> _Seed:
    """Seed the way train_head does, then take the head's initial weights, its dropout
    layers' seeds and Keras' shuffle order from the very objects `fit` would use."""
    import keras
    import tensorflow as tf

    if len(rows.train) == 0 or len(rows.val) == 0:
        raise ValueError(f"seed {rows.seed}: needs training and validation rows")
    keras.utils.set_random_seed(rows.seed)
    head = build_head(feature_dim, config.dense_units, config.dropout)
    variables = [tf.Variable(w, dtype=tf.float32) for w in head.get_weights()]
    dropout_seeds = [_layer_seed(layer) for layer in head.layers if isinstance(layer, keras.layers.Dropout)]
    orders = _keras_epoch_orders(len(rows.train), config.batch_size, shuffle, config.max_epochs)
    return _Seed(
        rows=rows, head=head, variables=variables,
        momenta=[tf.Variable(tf.zeros_like(v)) for v in variables],
        velocities=[tf.Variable(tf.zeros_like(v)) for v in variables],
        dropout_seeds=dropout_seeds, orders=orders, history=HeadHistory(),
    )


def _layer_seed(dropout) -> int:
    """The first half of a Dropout layer's SeedGenerator state; Keras makes none (and
    draws nothing) at rate 0."""
    generator = getattr(dropout, "seed_generator", None)
    return 0 if generator is None else int(generator.state.numpy()[0])


def _keras_epoch_orders(n: int, batch_size: int, shuffle: bool, max_epochs: int) -> Iterator[np.ndarray]:
    """Positions 0..n-1 in the order Keras' fit feeds them, one array per epoch, from the
    same ArrayDataAdapter `fit` builds (Keras is pinned; this is its internal module).

    The orders are drawn now, while the global seed is this seed's: the dataset's shuffle
    reads the global seed when it is iterated. Under `set_random_seed` Keras repeats one
    permutation every epoch; when two epochs agree that one is reused, otherwise every
    epoch's order is drawn here."""
    import itertools

    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    if not shuffle:
        return itertools.repeat(np.arange(n))
    dataset = ArrayDataAdapter(np.arange(n), batch_size=batch_size, shuffle=True).get_tf_dataset()

    def draw() -> np.ndarray:
        return np.concatenate([batch.numpy() for batch in dataset])

    first, second = draw(), draw()
    if np.array_equal(first, second):
        return itertools.repeat(first)
    return iter([first, second] + [draw() for _ in range(max_epochs - 2)])


def _build_step(states: list[_Seed], x, y, config: HeadConfig):
    """One training step of every seed in one graph; a seed's branch runs only if it has
    a batch. Returns per seed the batch's summed loss and number of correct rows.

    The seed's step is one tf.function taking its variables as arguments, so it is traced
    once for all seeds (tracing it per seed took longer than an epoch of ten seeds)."""
    import tensorflow as tf

    rate = float(config.dropout)
    n_hidden = len(config.dense_units)
    lr = tf.constant(config.learning_rate, tf.float32)

    @tf.function(autograph=False)  # plain Python loops over layers; nothing to convert
    def seed_step(rows, step, dropout_seeds, kernels, momenta, velocities):
        batch_x, batch_y = tf.gather(x, rows), tf.gather(y, rows)
        with tf.GradientTape() as tape:
            h = batch_x
            for layer in range(n_hidden):
                h = tf.nn.relu(tf.matmul(h, kernels[2 * layer]) + kernels[2 * layer + 1])
                if rate > 0:
                    h = tf.nn.experimental.stateless_dropout(
                        h, rate=rate, seed=_dropout_seed(dropout_seeds[layer], step))
            logits = tf.matmul(h, kernels[-2]) + kernels[-1]
            loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(batch_y, logits))
        grads = tape.gradient(loss, kernels)
        t = tf.cast(step + 1, tf.float32)  # Keras: beta ** (iterations + 1), in float32
        powers = (tf.pow(tf.constant(ADAM_BETA_1, tf.float32), t), tf.pow(tf.constant(ADAM_BETA_2, tf.float32), t))
        for variable, m, v, g in zip(kernels, momenta, velocities, grads):
            _adam_update(variable, m, v, g, *powers, lr)
        correct = tf.reduce_sum(tf.cast(
            tf.equal(tf.argmax(tf.nn.softmax(logits), 1), tf.argmax(batch_y, 1)), tf.float32))
        n = tf.cast(tf.shape(rows)[0], tf.float32)
        return tf.stack([loss * n, correct])

    signature = ([tf.TensorSpec([None], tf.int32)] * len(states), tf.TensorSpec([len(states)], tf.bool),
                 tf.TensorSpec([len(states)], tf.int64))

    @tf.function(input_signature=signature, autograph=False)
    def step(rows, active, steps):
        outs = []
        for index, state in enumerate(states):
            def train(state=state, index=index):
                return seed_step(rows[index], steps[index], tf.constant(state.dropout_seeds, tf.int64),
                                 state.variables, state.momenta, state.velocities)
            outs.append(tf.cond(active[index], train, lambda: tf.zeros([2])))
        return tf.stack(outs)

    return step


def _adam_update(variable, m, v, gradient, beta_1_power, beta_2_power, lr) -> None:
    """Keras' Adam.update_step in TensorFlow's fused kernel (one multithreaded pass over
    variable, m and v instead of Keras' ten). The formula is Keras', term for term; the
    kernel forms 1 - beta in float32, which differs from Keras' float64-then-float32 by
    2e-7 (beta_1) and 1.3e-5 (beta_2) relative, i.e. ~1e-9 per weight per step."""
    import tensorflow as tf

    tf.raw_ops.ResourceApplyAdam(
        var=variable.handle, m=m.handle, v=v.handle, beta1_power=beta_1_power,
        beta2_power=beta_2_power, lr=lr, beta1=tf.constant(ADAM_BETA_1, tf.float32),
        beta2=tf.constant(ADAM_BETA_2, tf.float32), epsilon=tf.constant(ADAM_EPSILON, tf.float32),
        grad=gradient,
    )


def _dropout_seed(layer_seed, step):
    """The int32 seed Keras' Dropout passes to stateless_dropout at `step`."""
    import tensorflow as tf

    state = tf.stack([layer_seed, step])
    return tf.cast(tf.math.floormod(state, INT32_SEED_MODULUS), tf.int32)


def _build_validation(states: list[_Seed], x, y):
    """Validation loss and accuracy of every active seed, inference mode (no dropout);
    like the step, one traced function serves every seed."""
    import tensorflow as tf

    @tf.function(autograph=False)
    def evaluate(rows, kernels):
        h = tf.gather(x, rows)
        for layer in range(len(kernels) // 2 - 1):
            h = tf.nn.relu(tf.matmul(h, kernels[2 * layer]) + kernels[2 * layer + 1])
        logits = tf.matmul(h, kernels[-2]) + kernels[-1]
        truth = tf.gather(y, rows)
        loss = tf.reduce_mean(tf.nn.softmax_cross_entropy_with_logits(truth, logits))
        hits = tf.equal(tf.argmax(tf.nn.softmax(logits), 1), tf.argmax(truth, 1))
        return tf.stack([loss, tf.reduce_mean(tf.cast(hits, tf.float32))])

    rows = [tf.constant(s.rows.val, tf.int32) for s in states]

    @tf.function(input_signature=(tf.TensorSpec([len(states)], tf.bool),), autograph=False)
    def validate(active):
        outs = tf.stack([
            tf.cond(active[i], lambda i=i, s=s: evaluate(rows[i], s.variables), lambda: tf.zeros([2]))
            for i, s in enumerate(states)
        ])
        return outs[:, 0], outs[:, 1]

    return validate


def _run_epoch(states: list[_Seed], step, batch_size: int) -> np.ndarray:
    """One epoch of every active seed: step k trains each seed that has a k-th batch.
    Returns per seed (summed loss, correct rows) over its epoch."""
    import tensorflow as tf

    orders = [s.rows.train[next(s.orders)] if s.active else None for s in states]
    n_steps = max(-(-len(o) // batch_size) for o in orders if o is not None)
    sums = np.zeros((len(states), 2))
    empty = tf.zeros([0], tf.int32)
    for k in range(n_steps):
        batches = [o[k * batch_size:(k + 1) * batch_size] if o is not None else () for o in orders]
        active = [len(b) > 0 for b in batches]
        out = step([tf.constant(b, tf.int32) if len(b) else empty for b in batches],
                   tf.constant(active), tf.constant([s.steps for s in states], tf.int64))
        sums += out.numpy()
        for state, moved in zip(states, active):
            state.steps += int(moved)
    return sums


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
        state.best_weights = [v.numpy() for v in state.variables]
        state.wait = 0
        return False
    return state.wait >= patience and epoch > 1


def _finish_seed(state: _Seed) -> tuple[object, HeadHistory]:
    """The Keras head with the seed's best weights, and its history."""
    state.head.set_weights(state.best_weights)
    history = state.history
    history.stopped_epoch = len(history.val_loss)
    history.best_epoch = int(np.argmin(history.val_loss)) + 1
    return state.head, history
