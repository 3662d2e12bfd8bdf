"""Same seed, same bits: what PyTorch's arithmetic needs to repeat itself exactly, set in one place.

On CPU, matrix products go to Intel MKL (in PyTorch's x86 builds). By default MKL may split a product
between threads differently from one process to the next, and take a different code path for arrays at
different memory addresses, so a gradient can differ in its last bits between two runs of the same
command. MKL's conditional numerical reproducibility (CNR) mode, in its AUTO branch, keeps the fastest
code this CPU has and fixes both: the same product gives the same bits in every process that uses the
same number of threads. It can only be switched on before the process's first MKL call, so every command
does it first (`cli.main`); a program using the library calls `pin_cpu_arithmetic()` itself.

On CUDA, cuBLAS needs a fixed workspace and PyTorch its deterministic kernels, which cost speed: they are
set only when a run asks for them (`train --deterministic`).
"""

from __future__ import annotations

import ctypes
import os
from functools import cache
from pathlib import Path

import torch

MKL_CBWR_AUTO = 2  # mkl.h: the CPU's own best code branch, in CNR mode
MKL_CBWR_ALL = -1  # mkl.h: "which branch is set?"
CUBLAS_WORKSPACE = ":4096:8"  # the setting cuBLAS documents for deterministic results


@cache
def _mkl() -> ctypes.CDLL | None:
    """The library PyTorch's CPU build links MKL into, if it exports MKL's CNR switch."""
    if not torch.backends.mkl.is_available():
        return None
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        lib.mkl_serv_cbwr_set, lib.mkl_serv_cbwr_get, lib.MKL_Set_Dynamic  # noqa: B018 (all three must exist)
    except (OSError, AttributeError):
        return None
    return lib


def pin_cpu_arithmetic() -> bool:
    """Make CPU matrix products bit-reproducible across processes (MKL CNR, AUTO branch; threads fixed).

    Call it before the first matrix product of the process. Returns whether the mode is on (False where
    PyTorch has no MKL, e.g. on ARM, where there is nothing to pin, or when MKL was used before)."""
    lib = _mkl()
    if lib is None:
        return False
    lib.MKL_Set_Dynamic(ctypes.c_int(0))  # MKL must not choose fewer threads than asked from one call to the next
    pinned = lib.mkl_serv_cbwr_get(ctypes.c_int(MKL_CBWR_ALL)) == MKL_CBWR_AUTO
    pinned = pinned or lib.mkl_serv_cbwr_set(ctypes.c_int(MKL_CBWR_AUTO)) == 0
    # MKL's vector math (VML: torch.exp on CPU) sets itself up on its first call; where two threads make that
    # first call at once, exp can round differently in the last bit for the rest of the process (BENCHMARKS.md,
    # "The first exp of a process"). A first call here, on one thread, before any parallel work, settles it.
    torch.ones(16).exp_()
    return pinned


def cpu_arithmetic_is_pinned() -> bool:
    lib = _mkl()
    return lib is not None and lib.mkl_serv_cbwr_get(ctypes.c_int(MKL_CBWR_ALL)) == MKL_CBWR_AUTO


def make_cuda_deterministic() -> None:
    """cuBLAS with a fixed workspace, PyTorch's deterministic kernels, no cuDNN autotuning.

    Must run before the first cuBLAS call. Ops with no deterministic kernel warn rather than fail."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.benchmark = False
