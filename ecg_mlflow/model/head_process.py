"""Seeds' heads trained in a process of their own, while the study's process goes on.

A study trains a backbone's seeds in as many child processes as there are cores, each on
one Numba thread, and logs each process's seeds as soon as it is done, on the core that
process frees, beside those still training (ecg_mlflow/study.py). One thread per process
wastes nothing on keeping threads in step: on the 2-core Intel Xeon of docs/benchmarks.md,
3 seeds of 8 epochs each (random 1280-wide features) trained in 3.2 s on one thread and
2.0 s on two, and two one-thread processes trained 6 such seeds in 3.3 s against 3.9 s for
one two-thread process; with early stopping the process whose seeds stop first idles, and
10 real seeds took about as long either way. The child imports NumPy, Numba and the
kernels only, no Keras (the Keras part of a start, `start_seed_heads`, runs in the
parent). On a thread of the parent instead, the trainer's Python loop and the logging
beside it took turns on the GIL and slowed each other down.

The child dies with its parent (PR_SET_PDEATHSIG, Linux), ignores Ctrl-C (the parent,
which gets it too, stops the child in `close`), and answers on its own copy of stdout,
so stray prints go to stderr instead of into the answer.
"""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, wait
from typing import Sequence

import numpy as np

from ecg_mlflow.model.head import HeadConfig, HeadHistory
from ecg_mlflow.model.seed_heads import SeedRows, finish_seed_heads, start_seed_heads, train_started_seeds

CHILD_NUMBA_THREADS = 1


class HeadsInChildProcess:
    """`train_seed_heads` of these seeds in a child process, started now; `result()` waits
    for it. Create it on a thread that outlives the training (the child dies with it)."""

    def __init__(self, features: np.ndarray, labels: np.ndarray, seeds: Sequence[SeedRows], config: HeadConfig):
        self._heads, starts = start_seed_heads(seeds, features.shape[1], config)
        job = pickle.dumps((features, labels, starts, config), protocol=pickle.HIGHEST_PROTOCOL)
        env = {**os.environ, "NUMBA_NUM_THREADS": str(CHILD_NUMBA_THREADS)}
        self._process = subprocess.Popen([sys.executable, "-m", __name__, str(os.getpid())],
                                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._answer: Future = Future()
        self._talk = threading.Thread(target=self._exchange, args=(job,), daemon=True)
        self._talk.start()

    @property
    def pid(self) -> int:
        return self._process.pid

    def _exchange(self, job: bytes) -> None:
        try:
            answer, _ = self._process.communicate(job)
        except BaseException as exc:  # a closed pipe once close() killed the child
            self._answer.set_exception(exc)
            return
        self._answer.set_result(answer)

    def result(self) -> tuple[dict[int, tuple[object, HeadHistory]], float]:
        """seed -> (Keras head with its best weights, history), as train_seed_heads gives,
        and the seconds the child trained; the child's error is raised here."""
        answer = self._answer.result()
        if not answer:
            raise RuntimeError(f"the head training process (pid {self.pid}) exited with code "
                               f"{self._process.returncode} before it answered; its messages are above")
        outcome, payload, seconds = pickle.loads(answer)
        if outcome == "error":
            raise payload
        return finish_seed_heads(self._heads, payload), seconds

    def close(self) -> None:
        """Stop the child if it still trains (the caller was interrupted or failed)."""
        if self._process.poll() is None:
            self._process.kill()
        self._talk.join()


def deal(items: Sequence, hands: int) -> list[list]:
    """`items` dealt round-robin into at most `hands` non-empty lists: a backbone's seeds
    into the processes that train them."""
    return [list(items[i::hands]) for i in range(min(hands, len(items)))]


def wait_for_first(trainings: Sequence[HeadsInChildProcess]) -> int:
    """The index of the first of `trainings` to finish (or fail)."""
    done, _ = wait([training._answer for training in trainings], return_when=FIRST_COMPLETED)
    return next(i for i, training in enumerate(trainings) if training._answer in done)


def _die_with_parent(parent: int) -> None:
    """SIGKILL this process when its parent dies (Linux), and exit now if it already has."""
    if sys.platform.startswith("linux"):
        import ctypes

        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent:
        sys.exit(1)


def _answer(outcome: str, payload, seconds: float) -> bytes:
    """The pickled answer; an error that does not pickle goes back as its text."""
    try:
        return pickle.dumps((outcome, payload, seconds), protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        return pickle.dumps((outcome, RuntimeError(f"{type(payload).__name__}: {payload}"), seconds))


def main(parent: int) -> None:
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    answer_to = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    features, labels, starts, config = pickle.load(sys.stdin.buffer)
    start = time.perf_counter()
    try:
        answer = _answer("ok", train_started_seeds(features, labels, starts, config), time.perf_counter() - start)
    except Exception as exc:
        answer = _answer("error", exc, time.perf_counter() - start)
    answer_to.write(answer)
    answer_to.close()


if __name__ == "__main__":
    main(int(sys.argv[1]))
