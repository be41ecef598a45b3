"""The authors' diagnostic: per-layer cosine similarity between compressed and exact weight gradients."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import CompressionConfig
from .convert import compress, restore


def weight_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """Weight gradients of the cross-entropy loss on (x, y), for every module with a ``weight`` of ndim >= 2."""
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    out = {}
    for name, m in model.named_modules():
        w = getattr(m, "weight", None)
        if isinstance(w, torch.Tensor) and w.dim() >= 2 and w.grad is not None:
            out[name] = w.grad.detach().clone()
    model.zero_grad(set_to_none=True)
    return out


def grad_cosine(model: nn.Module, spec: str | CompressionConfig | dict, x: torch.Tensor, y: torch.Tensor
                ) -> dict[str, float]:
    """Cosine similarity per layer between weight gradients under ``spec`` and native ones, on the same batch.

    Layers whose gradient is exactly zero give NaN. Runs on a deep copy in training mode (BatchNorm running statistics of ``model`` are not touched);
    ``model`` keeps whatever conversion it had.
    """
    ref = copy.deepcopy(model)
    restore(ref)
    ref.train()
    cmp_ = copy.deepcopy(ref)
    compress(cmp_, spec)
    cmp_.train()
    with torch.random.fork_rng(devices=[]):
        g_ref = weight_grads(ref, x, y)
    with torch.random.fork_rng(devices=[]):
        g_cmp = weight_grads(cmp_, x, y)
    return {k: _cos(g_ref[k], g_cmp[k]) for k in g_ref if k in g_cmp}


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity; NaN when either gradient is exactly zero (e.g. timm's zero-init last BN gamma)."""
    a, b = a.flatten().double(), b.flatten().double()
    if not a.any() or not b.any():
        return float("nan")
    return F.cosine_similarity(a, b, dim=0).item()


__all__ = ["grad_cosine", "weight_grads"]
