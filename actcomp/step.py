"""The one training step: forward, loss, backward, ``optimizer.step()``, gradients released.

    from actcomp.step import make_optimizer, train_step
    opt = make_optimizer(model, "sgd")          # the paper's recipe: momentum 0.9, weight decay 1e-4
    train_step(model, opt, x, y)                # amp_dtype=torch.bfloat16 for autocast, scaler for fp16

Measurement (``actcomp.measure``: peak memory, step time, memory timeline) runs exactly this step, so what is
measured is what trains.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ActcompError, one_line

__all__ = ["backward", "loss_fn", "make_optimizer", "prime", "train_step"]


def loss_fn(out, target):
    """Cross-entropy, averaged over the outputs of models that return several (distilled ViTs: ``(x, x_dist)``)."""
    outs = out if isinstance(out, (tuple, list)) else [out]
    return sum(F.cross_entropy(o.float(), target) for o in outs) / len(outs)


def make_optimizer(model: nn.Module, name: str = "sgd", foreach: bool | None = None, lr: float = 0.01,
                   weight_decay: float = 1e-4, momentum: float = 0.9):
    """``timm.optim.create_optimizer_v2``; defaults are the paper's recipe (momentum 0.9, weight decay 1e-4;
    timm leaves bias/norm parameters undecayed). ``foreach``: the multi-tensor path (None: the device's default)."""
    from timm.optim import create_optimizer_v2

    try:
        return create_optimizer_v2(model, opt=name, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                   foreach=foreach)
    except (ValueError, AssertionError, KeyError, TypeError) as e:
        raise ActcompError(f"cannot create optimizer {name!r}: {one_line(e, 300, typed=True)}") from None


def prime(model: nn.Module, opt) -> None:
    """Allocate the optimizer state a first step would create, with zero gradients (no forward needed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def backward(loss: torch.Tensor, keep_modes: bool = False) -> None:
    """``loss.backward()``; with ``keep_modes`` the torch-function modes stay active throughout.

    ``loss.backward()`` and ``torch.autograd.backward`` are themselves torch functions: the mode that handles them
    (the fused-attention routing on meta) is switched off for the whole backward pass, so checkpointing would
    recompute its blocks with a different attention kernel. The engine is then run directly, as
    ``torch.autograd.backward`` does after its override check.
    """
    run = getattr(torch.autograd.graph, "_engine_run_backward", None)
    if not keep_modes or run is None:
        loss.backward()
        return
    run((loss,), (torch.ones_like(loss),), False, False, (), allow_unreachable=True, accumulate_grad=True)


def train_step(model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor, amp_dtype: torch.dtype | None = None,
               scaler=None, criterion: Callable = loss_fn, mark: Callable[[str], None] | None = None,
               keep_modes: bool = False, label: str = "model", return_loss: bool = False):
    """One step: forward and loss (under autocast with ``amp_dtype``), backward (through ``scaler`` when given),
    ``opt.step()``, ``opt.zero_grad(set_to_none=True)``.

    ``mark(name)`` is called with ``"before_forward"`` and ``"after_forward"`` (the forward output dropped, the
    loss kept): measurement reads memory there. A forward that fails raises a one-line ActcompError naming
    ``label``, the batch and image size (CPU out-of-memory: MemoryError; CUDA's OutOfMemoryError passes through).
    ``return_loss``: return the loss, detached (otherwise nothing is kept, and nothing extra runs).
    """
    if mark is not None:
        mark("before_forward")
    amp = torch.autocast(x.device.type, dtype=amp_dtype) if amp_dtype is not None else contextlib.nullcontext()
    try:
        with amp:
            out = model(x)
            loss = criterion(out, y)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError, ZeroDivisionError) as e:
        if isinstance(e, RuntimeError) and "can't allocate memory" in str(e):
            raise MemoryError(f"out of memory at batch {x.shape[0]}: {one_line(e, 300, typed=True)}") from None
        raise ActcompError(f"{label} failed in forward at batch {x.shape[0]}, img_size={x.shape[-1]} "
                           f"(image too small for the model?): {one_line(e, 300, typed=True)}") from None
    del out  # what backward needs is in the graph; the logits themselves are not kept
    if mark is not None:
        mark("after_forward")
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        backward(loss, keep_modes=keep_modes)
        opt.step()
    kept = loss.detach() if return_loss else None
    del loss
    opt.zero_grad(set_to_none=True)
    return kept
