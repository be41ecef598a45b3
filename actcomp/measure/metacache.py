"""Cached meta kernels: an aten op's output metadata computed once per input signature.

Many meta kernels are Python (every pointwise op goes through the prims' reference implementation, BatchNorm's
is a decomposition into a dozen of them) and dominate a meta step's run time. On meta an output is nothing but
its shape, strides and dtype, which depend only on the inputs' metadata and the non-tensor arguments, so
:class:`MetaCached` computes them once per signature and rebuilds the outputs from the record afterwards.
"""
from __future__ import annotations

import enum
from typing import NamedTuple

import torch

__all__ = ["BroadcastOut", "FixedOut", "FreshSeq", "FreshTensor", "LayoutSig", "Mark", "MetaCached", "Rule",
           "ScalarSig", "SeqSig", "TensorSig", "apply_rule", "layout_signature", "make_rule", "op_kind", "out_spec",
           "rebuild", "signature"]

_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


class Mark(enum.Enum):
    """Singleton records (compared by identity)."""

    NONE = "no output"  # an output slot that is None
    INPLACE = "in place"  # the op returned its mutated first argument
    NO_RULE = "no rule"  # a size-free signature whose outputs no rule describes: use the exact cache


# ---------------------------------------------------------------------------- input signatures (hashable keys)

class TensorSig(NamedTuple):
    """A meta tensor argument, exactly."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype
    offset: int


class LayoutSig(NamedTuple):
    """A meta tensor argument of 2+ dims without its sizes: what decides a pointwise output's dtype and layout."""

    dtype: torch.dtype
    stride_order: tuple  # rank of each dim's stride among the distinct strides
    unit_dims: tuple  # which dims have size 1 (they broadcast)
    dense: bool  # dense from storage offset 0


class SeqSig(NamedTuple):
    """A tuple/list argument: its elements' signatures (None for None elements)."""

    items: tuple


class ScalarSig(NamedTuple):
    """A non-tensor argument (its type too: 1, 1.0 and True are equal, yet not the same argument)."""

    type: type
    value: object


def _arg_sig(a, tensor_sig):
    """Hashable metadata of an op argument, tensors described by ``tensor_sig`` (None: not cacheable)."""
    if isinstance(a, torch.Tensor):
        return tensor_sig(a) if a.device.type == "meta" else None
    if isinstance(a, (tuple, list)):
        out = []
        for e in a:
            s = _arg_sig(e, tensor_sig)
            if s is None and e is not None:
                return None
            out.append(s)
        return SeqSig(tuple(out))
    if isinstance(a, _SCALARS):
        return ScalarSig(type(a), a)
    return None


def _tensor_sig(a: torch.Tensor) -> TensorSig:
    return TensorSig(tuple(a.shape), a.stride(), a.dtype, a.storage_offset())


def signature(a):
    """Exact hashable metadata of an op argument (None: not cacheable)."""
    return _arg_sig(a, _tensor_sig)


def _dense(shape, stride) -> bool:
    expected = 1
    for n, st in sorted(((n, st) for n, st in zip(shape, stride) if n != 1), key=lambda x: x[1]):
        if st != expected:
            return False
        expected *= n
    return True


def _tensor_layout_sig(a: torch.Tensor):
    if a.dim() < 2:
        return _tensor_sig(a)
    st, sh = a.stride(), a.shape
    order = sorted(set(st))
    return LayoutSig(a.dtype, tuple(order.index(x) for x in st), tuple(n == 1 for n in sh),
                     a.storage_offset() == 0 and _dense(sh, st))


def layout_signature(a):
    """Like :func:`signature` but size-free for tensors of 2+ dims (see :class:`LayoutSig`)."""
    return _arg_sig(a, _tensor_layout_sig)


# ---------------------------------------------------------------------------- output records

class FreshTensor(NamedTuple):
    """A fresh output tensor (own storage of exactly its size, offset 0)."""

    shape: tuple
    stride: tuple
    dtype: torch.dtype


class FreshSeq(NamedTuple):
    """A tuple/list of outputs, each a FreshTensor or Mark.NONE, no two sharing a storage."""

    type: type
    parts: tuple


def _fresh_nbytes(shape, stride, itemsize) -> int:
    if any(s == 0 for s in shape):
        return 0
    return (1 + sum((n - 1) * st for n, st in zip(shape, stride))) * itemsize


def out_spec(res):
    """How to rebuild ``res`` from metadata alone; None when it holds anything but fresh tensors/None."""
    if res is None:
        return Mark.NONE
    if isinstance(res, torch.Tensor):
        if res.storage_offset() != 0 or res.untyped_storage().nbytes() != _fresh_nbytes(
                res.shape, res.stride(), res.element_size()):
            return None
        return FreshTensor(tuple(res.shape), res.stride(), res.dtype)
    if isinstance(res, (tuple, list)):
        tensors = [t for t in res if isinstance(t, torch.Tensor)]
        if len({t.untyped_storage()._cdata for t in tensors}) != len(tensors):
            return None  # outputs sharing a storage
        parts = [out_spec(e) for e in res]
        return None if any(p is None for p in parts) else FreshSeq(type(res), tuple(parts))
    return None


def rebuild(spec):
    """New meta outputs as recorded by :func:`out_spec`."""
    if spec is Mark.NONE:
        return None
    if type(spec) is FreshTensor:
        return torch.empty_strided(spec.shape, spec.stride, dtype=spec.dtype, device="meta")
    return spec.type(rebuild(p) for p in spec.parts)


# ---------------------------------------------------------------------------- size-free rules

class BroadcastOut(NamedTuple):
    """An output of the inputs' broadcast shape (BatchNorm: its input's shape), laid out in dim order ``perm``."""

    dtype: torch.dtype
    perm: list


class FixedOut(NamedTuple):
    """An output whose size does not follow the inputs' (BatchNorm's per-channel statistics)."""

    spec: FreshTensor


class Rule(NamedTuple):
    """Outputs of a size-free op for inputs of any size: one record per output, in a container (None: one)."""

    container: type | None
    outs: tuple  # BroadcastOut | FixedOut | Mark.NONE


_OP_KIND: dict = {}
_META_CACHE: dict = {}  # (op, exact signature) -> out_spec or Mark.INPLACE
_RULES: dict = {}  # (op, size-free signature) -> Rule, Mark.INPLACE or Mark.NO_RULE
# Views whose schema declares no alias: rebuilding them as fresh outputs would count their input's storage twice
# (reshape of a non-contiguous tensor is clone + _unsafe_view; measured: +288 B on a test_convnext full4 peak).
_UNANNOTATED_VIEWS = frozenset({torch.ops.aten._unsafe_view.default})


def op_kind(func) -> tuple[str, bool]:
    """('fresh' | 'inplace' | 'other', size_free).

    fresh: outputs alias nothing; inplace: pointwise, returns its mutated first argument; other: not cached.
    size_free: the outputs follow the inputs' sizes by a fixed rule (pointwise ops broadcast their inputs;
    BatchNorm's main output has its input's shape, the rest are per-channel), so one call describes all sizes.
    """
    k = _OP_KIND.get(func)
    if k is None:
        sch = func._schema
        rets = sch.returns
        pointwise = torch.Tag.pointwise in func.tags
        if func in _UNANNOTATED_VIEWS:
            kind = "other"
        elif not sch.is_mutable and all(r.alias_info is None for r in rets):
            kind = "fresh"
        elif (pointwise and len(rets) == 1 and rets[0].alias_info is not None
              and sch.arguments and sch.arguments[0].alias_info is not None and sch.arguments[0].alias_info.is_write
              and not any(a.alias_info is not None and a.alias_info.is_write for a in sch.arguments[1:])):
            kind = "inplace"
        else:
            kind = "other"
        bn = func in (torch.ops.aten.native_batch_norm.default, torch.ops.aten.native_batch_norm_backward.default)
        k = _OP_KIND[func] = (kind, kind != "other" and ((pointwise and len(rets) == 1) or bn))
    return k


def _base_shape(args) -> tuple | None:
    """Broadcast shape of the tensor arguments (for BatchNorm: its first argument's shape)."""
    shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
    if not shapes:
        return None
    nd = max(len(x) for x in shapes)
    out = [1] * nd
    for x in shapes:
        for i, n in enumerate(x, nd - len(x)):
            if n != 1:
                if out[i] not in (1, n):
                    return None
                out[i] = n
    return tuple(out)


def _perm(shape, stride) -> list[int]:
    return sorted(range(len(shape)), key=lambda d: (-stride[d], d))


def _permuted_strides(shape, perm) -> tuple:
    st, acc = [0] * len(shape), 1
    for d in reversed(perm):
        st[d] = acc
        acc *= shape[d]
    return tuple(st)


def make_rule(func, kind, args, res):
    """The size-free description of ``res`` (None when it cannot be given)."""
    if kind == "inplace":
        return Mark.INPLACE if res is args[0] else None
    bn = torch.Tag.pointwise not in func.tags
    base = tuple(args[0].shape) if bn else _base_shape(args)
    outs = res if isinstance(res, (tuple, list)) else (res,)
    if base is None or (not bn and len(outs) != 1):
        return None
    rule = []
    for t in outs:
        if t is None:
            rule.append(Mark.NONE)
        elif tuple(t.shape) == base and len(base) >= 2:
            perm = _perm(t.shape, t.stride())
            if t.storage_offset() != 0 or _permuted_strides(base, perm) != t.stride() \
                    or t.untyped_storage().nbytes() != _fresh_nbytes(t.shape, t.stride(), t.element_size()):
                return None
            rule.append(BroadcastOut(t.dtype, perm))
        elif bn and t.dim() <= 1:  # per-channel statistics: independent of batch and image size
            spec = out_spec(t)
            if spec is None:
                return None
            rule.append(FixedOut(spec))
        else:
            return None
    return Rule(type(res) if isinstance(res, (tuple, list)) else None, tuple(rule))


def apply_rule(rule: Rule, args, bn: bool):
    """New meta outputs of ``rule`` for these inputs (None: their shapes do not broadcast)."""
    base = tuple(args[0].shape) if bn else _base_shape(args)
    if base is None:
        return None
    outs = []
    for r in rule.outs:
        if r is Mark.NONE:
            outs.append(None)
        elif type(r) is BroadcastOut:
            outs.append(torch.empty_strided(base, _permuted_strides(base, r.perm), dtype=r.dtype, device="meta"))
        else:
            outs.append(rebuild(r.spec))
    return outs[0] if rule.container is None else rule.container(outs)


class MetaCached:
    """Calls an aten op on meta tensors, reusing the output metadata of an earlier call.

    Pointwise ops and BatchNorm get one entry for all sizes (a size-free signature; outputs rebuilt from the
    inputs' broadcast shape and the recorded layout, checked to reproduce the first call exactly); other ops whose
    outputs alias nothing get one entry per exact signature (rebuilt with ``empty_strided``, same storage size,
    checked). In-place pointwise ops return their first argument. Everything else runs as usual.
    """

    __slots__ = ("func",)

    def __init__(self, func):
        self.func = func

    def __call__(self, *args, **kwargs):
        func = self.func
        kind, size_free = op_kind(func)
        if kind == "other":
            return func(*args, **kwargs)
        if size_free:
            akey = (func, layout_signature(args), layout_signature(tuple(kwargs.items())) if kwargs else None)
            if akey[1] is not None and (not kwargs or akey[2] is not None):
                rule = _RULES.get(akey)
                if rule is None:
                    res = func(*args, **kwargs)
                    _remember(_RULES, akey, make_rule(func, kind, args, res) or Mark.NO_RULE)
                    return res
                if rule is not Mark.NO_RULE:
                    if kind == "inplace":
                        return args[0]
                    out = apply_rule(rule, args, bn=torch.Tag.pointwise not in func.tags)
                    if out is not None:
                        return out
        key = (func, signature(args), signature(tuple(kwargs.items())) if kwargs else None)
        if key[1] is None or (kwargs and key[2] is None):
            return func(*args, **kwargs)
        spec = _META_CACHE.get(key)
        if spec is not None:
            return args[0] if kind == "inplace" else rebuild(spec)
        res = func(*args, **kwargs)
        if kind == "inplace":
            spec = Mark.INPLACE if res is args[0] else None
        else:
            spec = out_spec(res)
        if spec is not None:
            _remember(_META_CACHE, key, spec)
        return res


def _remember(cache: dict, key, value) -> None:
    if len(cache) > 200_000:  # bounded: exact signatures differ per model and batch size
        cache.clear()
    cache[key] = value
