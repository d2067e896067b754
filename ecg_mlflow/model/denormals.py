"""Subnormal floats flushed to zero inside the head kernels, as TensorFlow does.

TensorFlow runs its CPU kernels with the x86 MXCSR bits FTZ (results that would be
subnormal become zero) and DAZ (subnormal inputs read as zero) set in its threads, so
Keras' Adam under `train_head` never carries a subnormal moment. Numba's threads run
with both bits clear, and there Adam's first moments of rarely active features decay
(times 0.9 a step) into the subnormal range after about 650 steps, where every
operation on them takes a microcode assist: on an Intel Xeon (Sapphire Rapids class)
one lite0 head's step went from 2.1 to 5.5 ms once 6% of its first-layer moments were
subnormal, and stayed at 2.1 ms with the bits set (measured here). Setting them also
brings the kernels' arithmetic closer to `train_head`'s.

`flush_subnormals()` sets both bits on the calling thread and returns the previous
MXCSR; `restore_float_mode(saved)` puts it back. A parallel kernel calls the pair at the
start and end of each prange task, so Numba's worker threads and the caller's own
thread (NumPy, Python) keep IEEE behaviour outside the kernels. On other CPUs the pair
does nothing. (Numba's on-disk cache keys each kernel by its own file alone: after
editing this one, touch model/head_kernels.py so its kernels compile again.)
"""

from __future__ import annotations

import platform

from numba import njit, types

FTZ_DAZ = 0x8040  # MXCSR bit 15 (flush to zero) and bit 6 (denormals are zero)

if platform.machine().lower() in ("x86_64", "amd64", "i686", "x86"):
    from llvmlite import ir
    from numba.core import cgutils
    from numba.extending import intrinsic

    def _mxcsr_call(builder, name: str, slot) -> None:
        """llvm.x86.sse.stmxcsr / ldmxcsr: store MXCSR to, or load it from, a 32-bit slot."""
        byte_pointer = ir.PointerType(ir.IntType(8))
        function = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [byte_pointer]), name)
        builder.call(function, [builder.bitcast(slot, byte_pointer)])

    @intrinsic
    def _read_mxcsr(typingctx):
        def codegen(context, builder, signature, args):
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            _mxcsr_call(builder, "llvm.x86.sse.stmxcsr", slot)
            return builder.load(slot)

        return types.uint32(), codegen

    @intrinsic
    def _write_mxcsr(typingctx, value):
        def codegen(context, builder, signature, args):
            slot = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(context.cast(builder, args[0], signature.args[0], types.uint32), slot)
            _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", slot)
            return context.get_dummy_value()

        return types.none(value), codegen

    @njit(cache=True, inline="always")
    def flush_subnormals():
        saved = _read_mxcsr()
        _write_mxcsr(saved | FTZ_DAZ)
        return saved

    @njit(cache=True, inline="always")
    def restore_float_mode(saved):
        _write_mxcsr(saved)

else:  # no MXCSR: the kernels run in the CPU's default mode

    @njit(cache=True, inline="always")
    def flush_subnormals():
        return 0

    @njit(cache=True, inline="always")
    def restore_float_mode(saved):
        pass

