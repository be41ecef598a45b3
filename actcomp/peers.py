"""Peer baselines a user would pick instead of pooling, in the same API (``compress(model, "ckpt")``).

- ``ckpt``: timm's ``set_grad_checkpointing``. BatchNorm running statistics are protected from the second
  update that recomputation would otherwise make (they are snapshotted and restored around any forward that
  runs inside a backward pass).
- ``int8``: every saved floating-point tensor (parameters excluded) stored as per-group uint8 through
  ``saved_tensors_hooks`` (ActNN/GACT-style, 8 bits, deterministic rounding).
- ``offload``: ``torch.autograd.graph.save_on_cpu``. On a CPU-only machine this moves nothing; on ``meta``
  (memory prediction) the saved tensors are modelled as leaving the device.
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import is_fake

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


def _bn_guard_pre(m, args):
    if m.training and m.track_running_stats and torch._C._current_graph_task_id() != -1:
        m._actcomp_stats = [b.clone() for b in (m.running_mean, m.running_var, m.num_batches_tracked)]


def _bn_guard_post(m, args, out):
    saved = m.__dict__.pop("_actcomp_stats", None)
    if saved is not None:
        for b, s in zip((m.running_mean, m.running_var, m.num_batches_tracked), saved):
            b.copy_(s)


def apply_peer(model: nn.Module, cfg) -> None:
    if cfg.peer == "none":
        return
    model._actcomp_peer = cfg.peer
    if cfg.peer == "ckpt":
        model.set_grad_checkpointing(True)
        handles = []
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                handles += [m.register_forward_pre_hook(_bn_guard_pre), m.register_forward_hook(_bn_guard_post)]
        model._actcomp_handles = handles
        return
    model._actcomp_param_keys = {_key(p) for p in model.parameters()}
    cls = type(model)
    if cls not in _HOOKED_CACHE:
        _HOOKED_CACHE[cls] = type(f"Hooked{cls.__name__}", (_Hooked, cls), {"_actcomp_orig_root": cls})
    model.__class__ = _HOOKED_CACHE[cls]


def remove_peer(model: nn.Module) -> None:
    kind = model.__dict__.pop("_actcomp_peer", None)
    if kind is None:
        return
    if kind == "ckpt":
        model.set_grad_checkpointing(False)
        for h in model.__dict__.pop("_actcomp_handles", []):
            h.remove()
        return
    model.__dict__.pop("_actcomp_param_keys", None)
    if isinstance(model, _Hooked):
        model.__class__ = model._actcomp_orig_root
