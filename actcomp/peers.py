"""Peer baselines a user would pick instead of pooling, in the same API (``compress(model, "ckpt")``).

- ``ckpt``: timm's ``set_grad_checkpointing``. Running statistics (BatchNorm, InstanceNorm, EvoNorm-B) are
  protected from the second update that recomputation would otherwise make: they are snapshotted and restored
  around any forward that runs inside a backward pass, also when the recomputation is stopped early.
  A model that refuses checkpointing is an ``ActcompError``.
- ``int8``: every saved floating-point tensor (parameters excluded) stored as per-group uint8 through
  ``saved_tensors_hooks`` (ActNN/GACT-style, 8 bits, deterministic rounding).
- ``offload``: ``torch.autograd.graph.save_on_cpu``. On a CPU-only machine this moves nothing; on ``meta``
  (memory prediction) the saved tensors are modelled as leaving the device.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake

from .config import ActcompError
from .ops.quant import dequantize_uint8, quantize_uint8


class _Int8Saved:
    __slots__ = ("q", "lo", "scale", "dtype")

    def __init__(self, t):
        self.q, self.lo, self.scale = quantize_uint8(t)
        self.dtype = t.dtype


class _Hooked:
    """Mixin for the root module: runs forward inside the peer's saved-tensor hooks."""

    def forward(self, *args, **kwargs):
        if not (self.training and torch.is_grad_enabled()):
            return super().forward(*args, **kwargs)
        with _hooks_for(self):
            return super().forward(*args, **kwargs)


def _hooks_for(model):
    kind = model._actcomp_peer
    params = model._actcomp_param_keys
    if kind == "offload":
        p0 = next(model.parameters(), None)
        dev = p0.device if p0 is not None else torch.device("cpu")
        # Prediction (meta, or fake tensors for AMP): saved tensors leave the device, come back in backward.
        if dev.type == "meta" or (p0 is not None and is_fake(p0)):
            return torch.autograd.graph.saved_tensors_hooks(
                lambda t: t if _key(t) in params else (t.shape, t.dtype, t.device),
                lambda s: s if isinstance(s, torch.Tensor) else torch.empty(s[0], dtype=s[1], device=s[2]))
        return torch.autograd.graph.save_on_cpu(pin_memory=dev.type == "cuda")

    def pack(t):
        if not t.is_floating_point() or t.numel() < 1024 or _key(t) in params:
            return t
        return _Int8Saved(t)

    def unpack(s):
        return dequantize_uint8(s.q, s.lo, s.scale, s.dtype) if isinstance(s, _Int8Saved) else s

    return torch.autograd.graph.saved_tensors_hooks(pack, unpack)


def _key(t):
    return t.untyped_storage()._cdata


_HOOKED_CACHE: dict[type, type] = {}


_STAT_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")


def _stat_buffers(m):
    """The module's own running-statistics buffers (BatchNorm family, InstanceNorm with stats, EvoNorm-B)."""
    return [b for n, b in m.named_buffers(recurse=False) if n in _STAT_BUFFERS]


def _stats_guard_pre(m, args):
    # A forward inside a backward pass is checkpoint recomputation: the stats were already updated once.
    if m.training and torch._C._current_graph_task_id() != -1:
        m.__dict__.setdefault("_actcomp_stats", []).append([b.clone() for b in _stat_buffers(m)])


def _stats_guard_post(m, args, out):
    # Registered with always_call: non-reentrant checkpoint stops recomputation by raising inside the last op
    # that saves a tensor, which may be this module's batch_norm; the stats must be restored then too.
    # Written through .data: the recomputed graph may have saved these buffers, and a version bump would make
    # its backward fail (reentrant checkpoint); training-mode BatchNorm backward does not read them.
    stack = m.__dict__.get("_actcomp_stats")
    if stack:
        for b, s in zip(_stat_buffers(m), stack.pop()):
            b.data.copy_(s)
        if not stack:
            del m.__dict__["_actcomp_stats"]


_MISSING = object()


def _switches(model: nn.Module):
    """timm keeps the checkpointing switch in ``grad_checkpointing`` attributes on the model and its stages."""
    return [(m, m.__dict__.get("grad_checkpointing", _MISSING)) for m in model.modules()]


def _put_switches(saved) -> None:
    for m, v in saved:
        if v is _MISSING:
            m.__dict__.pop("grad_checkpointing", None)
        else:
            m.__dict__["grad_checkpointing"] = v


def _one_line(e: Exception) -> str:
    return " ".join(f"{type(e).__name__}: {e}".split())


def _apply_ckpt(model: nn.Module) -> None:
    """set_grad_checkpointing(True) + running-stats guards, all or nothing."""
    if not callable(getattr(model, "set_grad_checkpointing", None)):
        raise ActcompError(f"peer 'ckpt' needs a model with set_grad_checkpointing() (timm models); "
                           f"{type(model).__name__} has none")
    before = _switches(model)
    try:
        model.set_grad_checkpointing(True)
    except Exception as e:  # timm: `assert not enable, 'gradient checkpointing not supported'`
        _put_switches(before)
        raise ActcompError(f"peer 'ckpt': {type(model).__name__} does not support gradient checkpointing "
                           f"({_one_line(e)})") from e
    handles = []
    try:
        for m in model.modules():
            if _stat_buffers(m):
                handles += [m.register_forward_pre_hook(_stats_guard_pre),
                            m.register_forward_hook(_stats_guard_post, always_call=True)]
    except Exception as e:
        _remove_ckpt(model, before, handles)
        raise ActcompError(f"peer 'ckpt' cannot be applied to {type(model).__name__} ({_one_line(e)})") from e
    model._actcomp_ckpt = (before, handles)


def _remove_ckpt(model: nn.Module, before, handles) -> None:
    for h in handles:
        h.remove()
    model.set_grad_checkpointing(False)
    _put_switches(before)  # a model the user had checkpointed before compress() stays checkpointed
    for m in model.modules():
        m.__dict__.pop("_actcomp_stats", None)


def apply_peer(model: nn.Module, cfg) -> None:
    if cfg.peer == "none":
        return
    if cfg.peer == "ckpt":
        _apply_ckpt(model)
        model._actcomp_peer = cfg.peer
        return
    cls = type(model)
    if cls not in _HOOKED_CACHE:
        _HOOKED_CACHE[cls] = type(f"Hooked{cls.__name__}", (_Hooked, cls), {"_actcomp_orig_root": cls})
    model._actcomp_param_keys = {_key(p) for p in model.parameters()}
    model._actcomp_peer = cfg.peer
    model.__class__ = _HOOKED_CACHE[cls]


def remove_peer(model: nn.Module) -> None:
    kind = model.__dict__.pop("_actcomp_peer", None)
    if kind is None:
        return
    if kind == "ckpt":
        _remove_ckpt(model, *model.__dict__.pop("_actcomp_ckpt"))
        return
    model.__dict__.pop("_actcomp_param_keys", None)
    if isinstance(model, _Hooked):
        model.__class__ = model._actcomp_orig_root
