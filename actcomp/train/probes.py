"""Per-epoch measurements beside the training run (memory, gradient cosine); none of them shifts the run's RNG."""
from __future__ import annotations

import copy
import math
import sys

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader

from ..convert import config_of
from ..errors import one_line
from .numerics import preserved_rng

MIB = 2.0**20


def first_batch(ds, n: int):
    """The first ``n`` samples of ``ds``, unshuffled: the same fixed batch for every preset and after a resume.
    Loading draws random numbers (loader seed, flips), so the run's RNG is restored afterwards."""
    with preserved_rng():
        return next(iter(DataLoader(ds, batch_size=min(n, len(ds)), shuffle=False)))


def memory_columns(model: nn.Module, x: torch.Tensor, num_classes: int, optimizer: str = "sgd", amp: bool = False,
                   channels_last: bool = False) -> dict:
    """CPU runs have no allocator peak worth reporting (max_memory_allocated is CUDA-only): report instead the
    bytes autograd saves for backward at this batch (measured) and the predicted peak of one training step at
    this batch size (MemTracker on meta). The columns peak_mem_mib, peak_mem_source and saved_mib."""
    import actcomp  # the top-level API: saved_bytes, step_memory

    out = dict(saved_mib=float("nan"), peak_mem_mib=float("nan"), peak_mem_source="unavailable")
    with preserved_rng():
        m = copy.deepcopy(model)  # the accounting forward updates BatchNorm statistics: not on the real model
        try:
            out["saved_mib"] = actcomp.saved_bytes(m, x).total_bytes / MIB
            out["peak_mem_mib"], out["peak_mem_source"] = out["saved_mib"], "saved-for-backward (accounting)"
        except ValueError:
            pass  # hook-based peers (ckpt/int8/offload) hide their saved tensors from the graph walk
        try:
            sm = actcomp.step_memory(copy.deepcopy(model), x.shape[0], img_size=x.shape[-1], device="meta",
                                     optimizer=optimizer, num_classes=num_classes, in_chans=x.shape[1], amp=amp,
                                     channels_last=channels_last)
            out["peak_mem_mib"], out["peak_mem_source"] = sm.peak_bytes / MIB, "predicted step peak (meta)"
        except Exception as e:  # an optional estimate; the run must not fail for it
            print(f"note: step-peak prediction unavailable ({one_line(e, 160, typed=True)})", file=sys.stderr)
    return out


def cosine_columns(model: nn.Module, batch, epoch: int) -> tuple[dict, list[dict]]:
    """Per-layer cosine between the weight gradients of ``model``'s preset and native ones on ``batch``: the
    columns grad_cos_mean/grad_cos_min (NaN where every layer is NaN) and one row per layer (epoch, layer,
    cosine). ``batch`` None: NaN columns and no rows."""
    from ..diagnostics import grad_cosine

    cols = dict(grad_cos_mean=float("nan"), grad_cos_min=float("nan"))
    if batch is None:
        return cols, []
    with preserved_rng():
        cs = grad_cosine(model, config_of(model), *batch)
    vals = [v for v in cs.values() if not math.isnan(v)]
    if vals:
        cols.update(grad_cos_mean=float(np.mean(vals)), grad_cos_min=float(np.min(vals)))
    return cols, [dict(epoch=epoch, layer=k, cosine=v) for k, v in cs.items()]


__all__ = ["MIB", "cosine_columns", "first_batch", "memory_columns"]
