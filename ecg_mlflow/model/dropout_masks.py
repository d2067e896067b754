"""Keras' dropout masks, drawn in Numba: the same bits TensorFlow's stateless dropout
gives, without a TensorFlow call per seed and epoch.

Under TensorFlow, Keras' Dropout layer calls `tf.nn.experimental.stateless_dropout` with
the seed [layer seed, step] (each taken mod 2^31 - 2). On the CPU that op is Philox-4x32-10:
the seed is scrambled into a key and counter by one Philox call (TensorFlow's GenerateKey),
the i-th group of four uniforms is Philox(counter + i, key), each uint32 becomes a float32
in [0, 1) from its low 23 bits, and an element is kept where its uniform is >= rate, scaled
by float32(1 / (1 - rate)). tests/test_dropout_masks.py holds this to TensorFlow's op bit
for bit. (Drawn through TensorFlow, with one `map_fn` over an epoch's steps, the masks had
cost about 10 ms per seed and epoch, a tenth of the epoch's training.)
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

SEED_MODULUS = 2**31 - 2  # Keras' _cast_seed: floormod(seed, int32.max - 1)
_LOW_32 = np.uint64(0xFFFFFFFF)
_M0, _M1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)  # Philox-4x32's multipliers
_W0, _W1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)  # and its key increments
_SCRAMBLE_KEY = (np.uint64(0x3EC8F720), np.uint64(0x02461E29))  # TensorFlow's GenerateKey


def dropout_masks(layer_seeds: np.ndarray, first_step: int, steps: int, batch: int,
                  widths, rate: float) -> list[np.ndarray]:
    """Per hidden layer, [steps, batch, width] float32 factors Keras' Dropout applies at
    steps first_step.. (float32(1 / (1 - rate)) where kept, 0 where dropped)."""
    keep_scale = np.float32(1 / (1 - rate))
    return [_layer_masks(int(seed) % SEED_MODULUS, first_step, steps, batch, width, np.float32(rate), keep_scale)
            for seed, width in zip(layer_seeds, widths)]


@njit(parallel=True, cache=True)
def _layer_masks(layer_seed, first_step, steps, batch, width, rate, keep_scale):
    n = batch * width
    out = np.empty((steps, n), np.float32)
    for s in prange(steps):
        step = np.uint64((first_step + np.int64(s)) % SEED_MODULUS)
        k0, k1, c2, c3 = _philox(np.uint64(layer_seed), np.uint64(0), step, np.uint64(0),
                                 _SCRAMBLE_KEY[0], _SCRAMBLE_KEY[1])
        bits = np.empty(4 * ((n + 3) // 4), np.uint32)
        for group in range(len(bits) // 4):
            u = _philox(np.uint64(group) & _LOW_32, np.uint64(group) >> np.uint64(32), c2, c3, k0, k1)
            for lane in range(4):  # TensorFlow's Uint32ToFloat: 1.m from the low 23 bits, minus 1
                bits[4 * group + lane] = np.uint32(0x3F800000 | (u[lane] & np.uint64(0x7FFFFF)))
        uniforms = bits.view(np.float32)
        row = out[s]
        for i in range(n):
            row[i] = keep_scale if uniforms[i] - np.float32(1) >= rate else np.float32(0)
    return out.reshape((steps, batch, width))


@njit(cache=True, inline="always")
def _philox(c0, c1, c2, c3, k0, k1):
    """Philox-4x32-10 of counter (c0..c3) under key (k0, k1), uint32 values in uint64s."""
    for _ in range(10):
        p0, p1 = _M0 * c0, _M1 * c2
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _LOW_32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _LOW_32
        k0, k1 = (k0 + _W0) & _LOW_32, (k1 + _W1) & _LOW_32
    return c0, c1, c2, c3
