"""What decides the bits of a run besides code and data: seeds, the RNG streams, CPU threads and kernel ISA."""
from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from .config import TrainError


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # CUBLAS needs this before the first cuBLAS call for deterministic matmuls.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


# CPU kernels are chosen per instruction set at run time: ATen's vectorized kernels (ATEN_CPU_CAPABILITY), oneDNN's
# convolutions (ONEDNN_MAX_CPU_ISA) and MKL's GEMMs (MKL_CBWR). Each changes the floating-point summation order,
# so an AVX-512 host and an AVX2 host train to different bits from the same seed. The values are read once, on
# the first kernel call, so pinning works only before any tensor op of the process.
_ISA_ENV = {"avx2": dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_CBWR="AVX2"),
            "avx512": dict(ATEN_CPU_CAPABILITY="avx512", ONEDNN_MAX_CPU_ISA="AVX512_CORE", MKL_CBWR="AVX512"),
            "default": dict(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41", MKL_CBWR="COMPATIBLE")}


def pin_cpu_numerics(isa: str | None = None, threads: int | None = None) -> dict:
    """Fix what decides the bits of a CPU run besides the seed: the torch thread count and (``isa``) the
    instruction set of the ATen, oneDNN and MKL kernels. Call it before the process runs any tensor op.

    ``isa="avx2"`` gives every x86-64 host with AVX2 the kernels an AVX2-only host picks by itself (on such a
    host nothing changes). Returns :func:`cpu_numerics`. Raises :class:`TrainError` when torch already chose
    other kernels (an op ran before) or the CPU lacks the instruction set.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise TrainError(f"threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)
    if isa is not None:
        key = str(isa).lower()
        if key not in _ISA_ENV:
            raise TrainError(f"cpu_isa must be one of {', '.join(_ISA_ENV)} (or null), got {isa!r}")
        before = {k: os.environ.get(k) for k in _ISA_ENV[key]}
        os.environ.update(_ISA_ENV[key])
        got = torch.backends.cpu.get_cpu_capability()
        if got.lower() != _ISA_ENV[key]["ATEN_CPU_CAPABILITY"]:
            for k, v in before.items():  # leave the environment as it was
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            raise TrainError(f"cpu_isa={key} could not be pinned: torch runs {got} kernels (an op ran before the "
                             f"pinning, or this CPU lacks {key}); start Python with "
                             + " ".join(f"{k}={v}" for k, v in _ISA_ENV[key].items()))
    return cpu_numerics()


def cpu_numerics() -> dict:
    """What this process's CPU results depend on besides code, versions and seed (recorded with a run)."""
    return dict(threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                **{k: os.environ.get(k, "") for k in ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR")})


def rng_state() -> dict:
    st = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Diagnostics and accounting run inside this, so they never shift the training run's random stream."""
    st = rng_state()
    try:
        yield
    finally:
        set_rng_state(st)


__all__ = ["cpu_numerics", "pin_cpu_numerics", "preserved_rng", "rng_state", "seed_everything", "set_rng_state"]
