"""Heads trained in a child process (what a study does) are the heads train_seed_heads
gives in this process, bit for bit; the child's failures reach the caller, and the child
does not outlive it."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import numpy as np
import pytest

from ecg_mlflow.model.head import HeadConfig
from ecg_mlflow.model.head_process import HeadsInChildProcess
from ecg_mlflow.model.seed_heads import SeedRows, train_seed_heads


def _problem(n: int = 120, dim: int = 24, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    x = (rng.normal(0, 1.5, (4, dim))[labels] + rng.normal(0, 1, (n, dim))).astype(np.float32)
    return x, np.eye(4, dtype=np.float32)[labels]


SEEDS = [SeedRows(3, np.arange(0, 80), np.arange(80, 100)), SeedRows(4, np.arange(10, 85), np.arange(85, 110))]
CONFIG = HeadConfig(dense_units=(32, 16), dropout=0.2, learning_rate=1e-3, batch_size=16, max_epochs=5, patience=2)


def test_heads_from_the_child_are_those_trained_here_bit_for_bit():
    x, y = _problem()
    here = train_seed_heads(x, y, SEEDS, CONFIG)
    training = HeadsInChildProcess(x, y, SEEDS, CONFIG)
    try:
        there, seconds = training.result()
    finally:
        training.close()
    assert seconds > 0 and set(there) == {3, 4}
    for seed, (head, history) in here.items():
        child_head, child_history = there[seed]
        assert child_history == history
        for mine, theirs in zip(head.get_weights(), child_head.get_weights()):
            assert np.array_equal(mine, theirs)


def test_an_error_in_the_child_is_raised_by_result():
    x, y = _problem()
    training = HeadsInChildProcess(x, y[:50], SEEDS, CONFIG)  # labels of 50 rows for rows up to 110
    try:
        with pytest.raises(IndexError, match="out of bounds"):
            training.result()
    finally:
        training.close()


def test_a_child_stopped_before_it_answers_is_a_clear_error():
    x, y = _problem(n=2000, dim=256)
    many = [SeedRows(s, np.arange(0, 1600), np.arange(1600, 2000)) for s in range(1, 5)]
    training = HeadsInChildProcess(x, y, many, HeadConfig(max_epochs=100, patience=100))
    training.close()
    with pytest.raises(RuntimeError, match=r"head training process \(pid \d+\) exited with code -9 before it answered"):
        training.result()


CHILD_OF_A_DYING_PARENT = """
import os, sys, numpy as np
from ecg_mlflow.model.head import HeadConfig
from ecg_mlflow.model.head_process import HeadsInChildProcess
from ecg_mlflow.model.seed_heads import SeedRows
x = np.random.default_rng(0).random((2000, 256), dtype=np.float32)
y = np.eye(4, dtype=np.float32)[np.arange(2000) % 4]
seeds = [SeedRows(s, np.arange(0, 1600), np.arange(1600, 2000)) for s in range(1, 5)]
training = HeadsInChildProcess(x, y, seeds, HeadConfig(max_epochs=100, patience=100))
print(training.pid, flush=True)
os._exit(0)  # no close(): as if killed
"""


def test_the_child_dies_with_its_parent():
    parent = subprocess.run([sys.executable, "-c", CHILD_OF_A_DYING_PARENT], capture_output=True, text=True,
                            check=True, timeout=120)
    child = int(parent.stdout.split()[-1])
    deadline = time.monotonic() + 10
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child), f"head training process {child} outlived its parent"


def _alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie, dead but not yet reaped by init, does not)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
