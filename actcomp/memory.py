"""Peak memory of one full training step (forward, loss, backward, optimizer step), predicted or measured.

    from actcomp.memory import step_memory, largest_batch
    step_memory("resnet50", 256, preset="full4").peak_bytes          # predicted on meta: nothing allocated
    step_memory("resnet18", 8, img_size=64, device="cpu")             # measured on CPU (MemTracker)
    largest_batch("efficientnet_b0", "pool4", 8 * 2**30)              # doubling + bisection on the prediction

How each device is handled:

- ``meta``: the model is built on the meta device, converted, and one step runs there under
  ``torch.distributed._tools.mem_tracker.MemTracker``, which follows every storage as it is created and
  freed. Nothing is computed or allocated, so any batch size can be predicted in about a second.
  The meta device has no autocast, so ``amp`` runs on fake CPU tensors (``FakeTensorMode``) with CPU
  bf16 autocast instead; fp16 is predicted with bf16 (same sizes). Optimizers use the multi-tensor
  (``foreach``) path by default here, as they do on CUDA, since meta stands in for a GPU.
- ``cpu``: real tensors, the same MemTracker measurement (CPU's default single-tensor optimizer path).
- ``cuda``: ``reset_peak_memory_stats`` before the step, ``max_memory_allocated``/``max_memory_reserved``
  after; the MemTracker breakdown of the same step and the meta prediction come with it.

Which peak: the **steady-state** step, i.e. optimizer state (SGD momentum buffers, Adam moments) already
allocated, as in every step after the first. Before the measured step the optimizer is primed (meta/cpu: one
``step()`` on zero gradients, which allocates its state exactly as a real first step does; cuda: a full real
warm-up step, which also allocates cuDNN/cuBLAS workspaces). Gradients are released with
``zero_grad(set_to_none=True)`` after every step, as timm's train loop does, so they count only while backward
produces them. The input batch and labels are created inside the measured step (as a data loader's batch
would arrive) and count in the peak, not in ``after_forward_bytes``.

Assumptions worth knowing: the loss is cross-entropy over ``num_classes``; on meta, attention without mask or
dropout runs a fused kernel (output + log-sum-exp saved, as flash/memory-efficient attention on a GPU), not
the math path meta would otherwise take; allocator rounding, the CUDA context and library workspaces are not in
the prediction (expect a GPU peak within about ±10%).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import difflib
import functools
import gc
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ActcompError, as_config
from .convert import compress, config_of

__all__ = ["StepMemory", "build_model", "step_memory", "largest_batch", "verify_largest_batch_cuda"]

_CATEGORIES = {"Parameter": "parameter", "Buffer": "buffer", "Gradient": "gradient", "Activation": "activation",
               "Temp": "temp", "Optstate": "optimizer", "Other": "other"}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
_AMP = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}


@dataclass
class StepMemory:
    """Memory of one steady-state training step, in bytes."""

    peak_bytes: int  # peak of the whole step: forward, loss, backward, optimizer.step()
    breakdown: dict[str, int]  # bytes live at the peak by MemTracker category
    after_forward_bytes: int  # live after forward+loss minus live before forward: what the graph keeps
    method: str  # "memtracker-meta" (predicted), "memtracker-cpu" (measured), "cuda" (measured)
    predicted_peak_bytes: int | None = None  # cuda only: the meta prediction of the same step
    reserved_bytes: int | None = None  # cuda only: max_memory_reserved
    info: dict = field(default_factory=dict, compare=False)  # model/preset/batch/... of this point

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


# ------------------------------------------------------------------------------------------ models

@functools.lru_cache(maxsize=1)
def _timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def _check_model_name(name: str) -> None:
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), _timm_names(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ActcompError(f"unknown timm model {name!r}{hint}")


def build_model(name: str, num_classes: int = 1000, in_chans: int = 3, device="cpu", img_size: int | None = None,
                **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False)`` built directly on ``device`` (``meta``: no allocation).

    ``img_size`` is passed to models that take it (ViT-style models have a fixed patch grid); models that do not
    accept it are built without it.
    """
    import timm

    _check_model_name(name)
    kw = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **kwargs)
    with torch.device(device):
        if img_size is not None:
            try:
                return timm.create_model(name, img_size=img_size, **kw)
            except TypeError as e:
                if "img_size" not in str(e):
                    raise ActcompError(f"cannot build {name}: {_first_line(e)}") from None
            except (RuntimeError, ValueError, AssertionError, ZeroDivisionError) as e:
                raise ActcompError(f"cannot build {name} for img_size={img_size}: {_first_line(e)}") from None
        try:
            return timm.create_model(name, **kw)
        except (TypeError, RuntimeError, ValueError, AssertionError) as e:
            raise ActcompError(f"cannot build {name}: {_first_line(e)}") from None


def _first_line(e: BaseException) -> str:
    s = str(e).strip().splitlines()
    return f"{type(e).__name__}: {s[0] if s else ''}"[:300]


def _copy_to(model: nn.Module, device: torch.device, empty: bool, dtype: torch.dtype | None = None,
             channels_last: bool = False) -> nn.Module:
    """A deep copy of ``model`` on ``device`` (the caller's model is left untouched).

    Parameters and buffers are pre-seeded in deepcopy's memo, so the copy never duplicates them on their
    original device; ``empty`` (meta/fake prediction) copies no values at all. A hook-based peer is
    re-applied, since it keys parameters by storage. ``dtype``/``channels_last`` apply to floating-point
    tensors as they are copied (``Module.to`` cannot swap fake tensors).
    """
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
        fmt = torch.channels_last if channels_last and t.dim() == 4 else torch.preserve_format
        if empty:  # torch.empty, not empty_like: under FakeTensorMode the source (a meta tensor) is not fake
            new = torch.empty(t.shape, device=device, dtype=dt,
                              memory_format=torch.contiguous_format if fmt is torch.preserve_format else fmt)
        else:
            new = t.detach().to(device, dt, copy=True, memory_format=fmt)
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    out = copy.deepcopy(model, memo)
    cfg = config_of(out)
    if cfg is not None:
        compress(out, cfg)
    return out


# ------------------------------------------------------------------------------------------ the step

_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _meta_sig(a, tensor_sig):
    """Hashable metadata of an op argument, tensors described by ``tensor_sig`` (None: not cacheable)."""
    if isinstance(a, torch.Tensor):
        return tensor_sig(a) if a.device.type == "meta" else None
    if isinstance(a, (tuple, list)):
        out = []
        for e in a:
            s = _meta_sig(e, tensor_sig)
            if s is None and e is not None:
                return None
            out.append(s)
        return ("L", tuple(out))
    if isinstance(a, _SCALARS):
        return (type(a), a)
    return None


def _tensor_sig(a: torch.Tensor):
    return ("T", tuple(a.shape), a.stride(), a.dtype, a.storage_offset())


def _sig(a):
    """Hashable metadata of an op argument (None: not cacheable)."""
    return _meta_sig(a, _tensor_sig)


def _fresh_nbytes(shape, stride, itemsize) -> int:
    if any(s == 0 for s in shape):
        return 0
    return (1 + sum((n - 1) * st for n, st in zip(shape, stride))) * itemsize


def _out_spec(res):
    """How to rebuild ``res`` from metadata alone; None when it holds anything but fresh tensors/None."""
    if res is None:
        return ("N",)
    if isinstance(res, torch.Tensor):
        if res.storage_offset() != 0 or res.untyped_storage().nbytes() != _fresh_nbytes(
                res.shape, res.stride(), res.element_size()):
            return None
        return ("T", tuple(res.shape), res.stride(), res.dtype)
    if isinstance(res, (tuple, list)):
        tensors = [t for t in res if isinstance(t, torch.Tensor)]
        if len({t.untyped_storage()._cdata for t in tensors}) != len(tensors):
            return None  # outputs sharing a storage
        parts = [_out_spec(e) for e in res]
        return None if any(p is None for p in parts) else ("L", type(res), tuple(parts))
    return None


def _rebuild(spec):
    if spec[0] == "N":
        return None
    if spec[0] == "T":
        return torch.empty_strided(spec[1], spec[2], dtype=spec[3], device="meta")
    return spec[1](_rebuild(p) for p in spec[2])


_OP_KIND: dict = {}
_META_CACHE: dict = {}  # exact signature -> output spec
_RULES: dict = {}  # size-free signature -> output rule (or _NO_RULE)
_NO_RULE = ("no rule",)


def _op_kind(func) -> tuple[str, bool]:
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
        if not sch.is_mutable and all(r.alias_info is None for r in rets):
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


def _dense(shape, stride) -> bool:
    expected = 1
    for n, st in sorted(((n, st) for n, st in zip(shape, stride) if n != 1), key=lambda x: x[1]):
        if st != expected:
            return False
        expected *= n
    return True


def _tensor_asig(a: torch.Tensor):
    if a.dim() < 2:
        return _tensor_sig(a)
    st, sh = a.stride(), a.shape
    order = sorted(set(st))
    return ("A", a.dtype, tuple(order.index(x) for x in st), tuple(n == 1 for n in sh),
            a.storage_offset() == 0 and _dense(sh, st))


def _asig(a):
    """Like ``_sig`` but size-free for tensors of 2+ dims: dtype, order of the strides, which dims have size 1,
    and whether the tensor is dense from offset 0 (what decides a pointwise output's dtype and layout)."""
    return _meta_sig(a, _tensor_asig)


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


def _make_rule(func, kind, args, res):
    """The size-free description of ``res`` (None when it cannot be given)."""
    if kind == "inplace":
        return ("I",) if res is args[0] else None
    bn = torch.Tag.pointwise not in func.tags
    base = tuple(args[0].shape) if bn else _base_shape(args)
    outs = res if isinstance(res, (tuple, list)) else (res,)
    if base is None or (not bn and len(outs) != 1):
        return None
    rule = []
    for t in outs:
        if t is None:
            rule.append(("N",))
        elif tuple(t.shape) == base and len(base) >= 2:
            perm = _perm(t.shape, t.stride())
            if t.storage_offset() != 0 or _permuted_strides(base, perm) != t.stride() \
                    or t.untyped_storage().nbytes() != _fresh_nbytes(t.shape, t.stride(), t.element_size()):
                return None
            rule.append(("B", t.dtype, perm))
        elif bn and t.dim() <= 1:  # per-channel statistics: independent of batch and image size
            spec = _out_spec(t)
            if spec is None:
                return None
            rule.append(("E", spec))
        else:
            return None
    return (type(res) if isinstance(res, (tuple, list)) else None, tuple(rule))


def _apply_rule(rule, args, bn: bool):
    base = tuple(args[0].shape) if bn else _base_shape(args)
    if base is None:
        return None
    outs = []
    for r in rule[1]:
        if r[0] == "N":
            outs.append(None)
        elif r[0] == "B":
            outs.append(torch.empty_strided(base, _permuted_strides(base, r[2]), dtype=r[1], device="meta"))
        else:
            outs.append(_rebuild(r[1]))
    return outs[0] if rule[0] is None else rule[0](outs)


class _MetaCached:
    """Calls an aten op on meta tensors, reusing the output metadata of an earlier call.

    Many meta kernels are Python (every pointwise op goes through the prims' reference implementation,
    BatchNorm's is a decomposition into a dozen of them) and dominate a meta step's run time. On meta an output
    is nothing but its shape, strides and dtype, which depend only on the inputs' metadata and the non-tensor
    arguments, so they are computed once per signature. Pointwise ops and BatchNorm get one entry for all
    sizes (a size-free signature; outputs rebuilt from the inputs' broadcast shape and the recorded layout,
    checked to reproduce the first call exactly); other ops whose outputs alias nothing get one entry per exact
    signature (rebuilt with ``empty_strided``, same storage size, checked). In-place pointwise ops return their
    first argument. Everything else runs as usual.
    """

    __slots__ = ("func",)

    def __init__(self, func):
        self.func = func

    def __call__(self, *args, **kwargs):
        func = self.func
        kind, size_free = _op_kind(func)
        if kind == "other":
            return func(*args, **kwargs)
        if size_free:
            akey = (func, _asig(args), _asig(tuple(kwargs.items())) if kwargs else None)
            if akey[1] is not None and (not kwargs or akey[2] is not None):
                rule = _RULES.get(akey)
                if rule is None:
                    res = func(*args, **kwargs)
                    _remember(_RULES, akey, _make_rule(func, kind, args, res) or _NO_RULE)
                    return res
                if rule is not _NO_RULE:
                    if kind == "inplace":
                        return args[0]
                    out = _apply_rule(rule, args, bn=torch.Tag.pointwise not in func.tags)
                    if out is not None:
                        return out
        key = (func, _sig(args), _sig(tuple(kwargs.items())) if kwargs else None)
        if key[1] is None or (kwargs and key[2] is None):
            return func(*args, **kwargs)
        spec = _META_CACHE.get(key)
        if spec is not None:
            return args[0] if kind == "inplace" else _rebuild(spec)
        res = func(*args, **kwargs)
        if kind == "inplace":
            spec = ("I",) if res is args[0] else None
        else:
            spec = _out_spec(res)
        if spec is not None:
            _remember(_META_CACHE, key, spec)
        return res


def _remember(cache: dict, key, value) -> None:
    if len(cache) > 200_000:  # bounded: exact signatures differ per model and batch size
        cache.clear()
    cache[key] = value


class _StorageMap:
    """Stand-in for MemTracker's storage table (a WeakIdKeyDictionary, which builds a weak reference on every
    lookup: the largest single cost of tracking a meta step). Keyed by the storage's C++ address; an entry
    whose storage has died, or whose address was reused by a new storage, reads as absent. MemTracker's
    own weak-reference callbacks (one per storage, made at first sight) still account the frees."""

    __slots__ = ("_d",)

    def __init__(self):
        self._d = {}

    def get(self, st, default=None):
        v = self._d.get(st._cdata)
        if v is None or v[1]() is not st:
            return default
        return v

    def __setitem__(self, st, v):
        self._d[st._cdata] = v

    def __contains__(self, st):
        return self.get(st) is not None


def _tensors_in(res):
    if isinstance(res, torch.Tensor):
        return (res,)
    if isinstance(res, (tuple, list)):
        return [t for r in res for t in _tensors_in(r)]
    return ()


@functools.lru_cache(maxsize=1)
def _tracker_cls():
    from torch.distributed._tools import mem_tracker as mt

    class _PeakTracker(mt.MemTracker):
        def __init__(self, meta_cache: bool = False):
            super().__init__()
            self._meta_cache = meta_cache
            self._WINFO = _StorageMap()

        # Snapshots are {device: {category: int}}: a two-level copy is a deep copy, at a fraction of the cost.
        def get_tracker_snapshot(self, type: str = "current"):
            if type not in ("current", "peak"):
                raise ValueError(f"Invalid type {type}")
            snap = self._curr_mem_snap if type == "current" else self._peak_mem_snap
            return {dev: dict(d) for dev, d in snap.items()}

        # MemTracker updates a per-module peak for every op, a loop over all modules seen so far; that loop is
        # half its overhead. Only the global peak and its breakdown are needed here.
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[mt._TOTAL_KEY]:
                    self._peak_mem[dev] = snap[mt._TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self._meta_cache:
                return super().__torch_dispatch__(func, types, args, kwargs)
            # On plain meta tensors (no DTensor, no fake mode) MemTracker's dispatch reduces to the lines below;
            # written out, without its per-op pytree and fake-mode lookups, and with cached meta kernels.
            res = _MetaCached(func)(*args, **(kwargs or {}))
            if self._in_opt:
                reftype = mt._MemRefType.OPT
            elif self._mod_tracker.is_bw and not self._in_ac:
                reftype = mt._MemRefType.TEMP
            else:
                reftype = mt._MemRefType.ACT
            for t in _tensors_in(res):
                self._track(reftype, t)
            self._update_peak_stats(None)
            return res

    return _PeakTracker


def _total(tracker, dev: torch.device) -> int:
    snap = tracker.get_tracker_snapshot("current").get(dev, {})
    return int(snap.get("Total", 0))


def _loss(out, target):
    outs = out if isinstance(out, (tuple, list)) else [out]  # e.g. distilled ViTs return (x, x_dist) in training
    return sum(F.cross_entropy(o.float(), target) for o in outs) / len(outs)


@dataclass
class _Prepared:
    """A converted model with its (primed) optimizer on one device, reusable for several batch sizes."""

    model: nn.Module
    opt: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype
    amp_dtype: torch.dtype | None
    channels_last: bool
    in_chans: int
    num_classes: int
    img_size: int
    label: str
    fake_mode: object = None
    scaler: object = None
    cuda_baseline: int = 0  # bytes the caller had allocated on the GPU before this point was built

    def mode(self):
        return self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()


def _parse_amp(amp, device_type: str) -> torch.dtype | None:
    if amp is False or amp is None:
        return None
    if amp is True:
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    if not isinstance(amp, str) or amp.lower() not in _AMP:
        raise ActcompError(f"amp must be False, True, 'bf16' or 'fp16', got {amp!r}")
    dt = _AMP[amp.lower()]
    if dt == torch.float16 and device_type == "cpu":
        raise ActcompError("amp='fp16' needs CUDA; use amp='bf16' on CPU (or device='meta' to predict)")
    return dt


def _parse_dtype(dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str) or dtype.lower() not in _DTYPES:
        raise ActcompError(f"dtype must be one of float32, bfloat16, float16, got {dtype!r}")
    return _DTYPES[dtype.lower()]


def _parse_device(device) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ActcompError(f"unknown device {device!r}; use meta, cpu or cuda") from None
    if dev.type not in ("meta", "cpu", "cuda"):
        raise ActcompError(f"device {device!r} is not supported; use meta, cpu or cuda")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ActcompError("device=cuda requested but CUDA is not available")
        if dev.index is None:  # MemTracker keys its snapshots by the tensors' device, which has an index
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ActcompError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def _check_int(v, what, lo=1):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ActcompError(f"{what} must be an int >= {lo}, got {v!r}")


def _prepare(model, preset, device, optimizer, dtype, amp, channels_last, num_classes, img_size, foreach,
             in_chans=3) -> _Prepared:
    dev = _parse_device(device)
    pdt = _parse_dtype(dtype)
    amp_dt = _parse_amp(amp, dev.type)
    _check_int(img_size, "img_size")
    _check_int(num_classes, "num_classes")
    # preset None keeps a passed module's own conversion; for a model name it means "none".
    cfg = None if isinstance(model, nn.Module) and preset is None else as_config("none" if preset is None else preset)
    # Prediction builds and converts on meta first (timm's initialisers run there, not under fake tensors).
    build_dev = torch.device("meta") if dev.type == "meta" else dev
    if isinstance(model, nn.Module):
        label = type(model).__name__
        m = _copy_to(model, build_dev, empty=build_dev.type == "meta")
        in_chans = _in_chans_of(m, in_chans)
        num_classes = getattr(m, "num_classes", num_classes) or num_classes
    else:
        label = str(model)
        m = build_model(model, num_classes=num_classes, in_chans=in_chans, device=build_dev, img_size=img_size)
    fake = None
    if dev.type == "meta" and amp_dt is not None:
        # meta has no autocast: an AMP prediction runs on fake CPU tensors under CPU bf16 autocast (fp16 has the
        # same sizes; CPU and CUDA autocast agree on convs and matmuls, the bulk of the memory).
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake, dev, amp_dt = FakeTensorMode(), torch.device("cpu"), torch.bfloat16
        with fake:
            m = _copy_to(m, dev, empty=True, dtype=pdt, channels_last=channels_last)
    else:
        if any(p.dtype != pdt for p in m.parameters()):
            m = m.to(dtype=pdt)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
    # Converted last: the int8/offload peers key parameters by storage, which .to() replaces.
    if cfg is not None:
        with fake if fake is not None else contextlib.nullcontext():
            compress(m, cfg)
    m.train()
    with fake if fake is not None else contextlib.nullcontext():
        # meta stands in for a GPU, where optimizers default to the multi-tensor path (its temporaries count).
        opt = _make_optimizer(m, optimizer, foreach if foreach is not None else (True if dev.type == "meta" else None))
        # fp16 autocast on CUDA trains with a GradScaler (fp32 master weights); the scaler cannot unscale fp16 params.
        scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and amp_dt == torch.float16 \
            and pdt == torch.float32 else None
        if dev.type != "cuda":
            _prime(m, opt)
    return _Prepared(m, opt, dev, pdt, amp_dt, channels_last, in_chans, num_classes, img_size, label, fake, scaler)


def _in_chans_of(m: nn.Module, default: int) -> int:
    conv = next((c for c in m.modules() if isinstance(c, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else default


def _make_optimizer(model, name, foreach):
    from timm.optim import create_optimizer_v2

    # The paper's recipe: momentum 0.9, weight decay 1e-4 (timm leaves bias/norm parameters undecayed).
    try:
        return create_optimizer_v2(model, opt=name, lr=0.01, weight_decay=1e-4, momentum=0.9, foreach=foreach)
    except (ValueError, AssertionError, KeyError, TypeError) as e:
        raise ActcompError(f"cannot create optimizer {name!r}: {_first_line(e)}") from None


def _prime(model, opt):
    """Allocate the optimizer state a first step would create, with zero gradients (no forward needed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)


def _fused_attention_mode():
    from torch.overrides import TorchFunctionMode

    class _FusedAttention(TorchFunctionMode):
        """On meta, ``F.scaled_dot_product_attention`` can only pick its math path, which keeps the T×T attention
        matrix for backward; GPUs and CPUs run a fused kernel that keeps just the output and a log-sum-exp.
        Route the call to the fused CPU kernel (it has meta kernels), whose saved tensors match theirs."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
                a = dict(zip(names, args), **kwargs)
                q = a["query"]
                if (a.get("attn_mask") is None and not a.get("enable_gqa", False) and not a.get("dropout_p", 0.0)
                        and q.device.type == "meta" and q.dim() == 4 and a["key"].shape[1] == q.shape[1]):
                    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                        q, a["key"], a["value"], 0.0, bool(a.get("is_causal", False)), scale=a.get("scale"))[0]
            return func(*args, **kwargs)

    return _FusedAttention()


def _one_step(prep: _Prepared, batch_size: int, marks: dict | None = None, tracker=None):
    """Batch creation, forward, loss, backward, optimizer step, gradients released."""
    # Also active in backward, where checkpointing recomputes the forward and must pick the same kernels.
    with _fused_attention_mode() if prep.device.type == "meta" else contextlib.nullcontext():
        _step(prep, batch_size, marks, tracker)


def _step(prep: _Prepared, batch_size: int, marks: dict | None, tracker):
    dev = prep.device
    x = torch.randn(batch_size, prep.in_chans, prep.img_size, prep.img_size, device=dev,
                    dtype=prep.dtype if prep.amp_dtype is None else torch.float32)
    if prep.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, prep.num_classes, (batch_size,), device=dev)
    if marks is not None:
        marks["before_forward"] = _live(prep, tracker)
    amp = torch.autocast(dev.type, dtype=prep.amp_dtype) if prep.amp_dtype is not None else contextlib.nullcontext()
    try:
        with amp:
            out = prep.model(x)
            loss = _loss(out, y)
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, ValueError, AssertionError, IndexError, ZeroDivisionError) as e:
        if isinstance(e, RuntimeError) and "can't allocate memory" in str(e):
            raise MemoryError(f"out of memory at batch {batch_size}: {_first_line(e)}") from None  # CPU OOM
        raise ActcompError(f"{prep.label} failed in forward at batch {batch_size}, img_size={prep.img_size} "
                           f"(image too small for the model?): {_first_line(e)}") from None
    del out
    if marks is not None:
        marks["after_forward"] = _live(prep, tracker)
    if prep.scaler is not None:
        prep.scaler.scale(loss).backward()
        prep.scaler.step(prep.opt)
        prep.scaler.update()
    else:
        _backward(loss, keep_modes=dev.type == "meta")
        prep.opt.step()
    del loss
    prep.opt.zero_grad(set_to_none=True)


def _backward(loss: torch.Tensor, keep_modes: bool) -> None:
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


def _live(prep: _Prepared, tracker) -> int:
    if prep.device.type == "cuda":
        return torch.cuda.memory_allocated(prep.device)
    return _total(tracker, prep.device)


def _measure(prep: _Prepared, batch_size: int) -> StepMemory:
    """One steady-state step under MemTracker (and the CUDA allocator's statistics on cuda)."""
    _check_int(batch_size, "batch_size")
    cuda = prep.device.type == "cuda"
    with prep.mode():
        if cuda:
            torch.cuda.synchronize(prep.device)
            torch.cuda.reset_peak_memory_stats(prep.device)
        tracker = _tracker_cls()(meta_cache=prep.device.type == "meta")
        tracker.track_external(prep.model, prep.opt)
        marks: dict[str, int] = {}
        # Hundreds of thousands of long-lived objects (torch, timm) make every full garbage collection during the
        # step slow; frozen, they are skipped. Objects created by the step are collected as usual.
        freeze = gc.get_freeze_count() == 0  # never thaw objects the caller froze
        if freeze:
            gc.freeze()
        try:
            with tracker:
                _one_step(prep, batch_size, marks, tracker)
        finally:
            if freeze:
                gc.unfreeze()
        peak_snap = tracker.get_tracker_snapshot("peak").get(prep.device, {})
    breakdown = {_CATEGORIES.get(getattr(k, "value", k), str(k)): int(v) for k, v in peak_snap.items() if k != "Total"}
    tracked_peak = int(peak_snap.get("Total", 0))
    after = marks["after_forward"] - marks["before_forward"]
    if not cuda:
        method = "memtracker-meta" if prep.device.type == "meta" or prep.fake_mode is not None else "memtracker-cpu"
        return StepMemory(tracked_peak, breakdown, after, method)
    torch.cuda.synchronize(prep.device)
    # Everything this step needs was allocated by us (model, optimizer state, workspaces of the warm-up);
    # what the caller had allocated before is left out via the baseline taken before the model was built.
    peak = torch.cuda.max_memory_allocated(prep.device) - prep.cuda_baseline
    reserved = torch.cuda.max_memory_reserved(prep.device)
    return StepMemory(int(peak), breakdown, int(after), "cuda", reserved_bytes=int(reserved))


def step_memory(model: str | nn.Module, batch_size: int, img_size: int = 224, preset=None, device="meta",
                optimizer: str = "sgd", dtype="float32", amp=False, channels_last: bool = False,
                num_classes: int = 1000, in_chans: int = 3, foreach: bool | None = None) -> StepMemory:
    """Peak memory of one steady-state training step of ``model`` (a timm name or a module) at ``batch_size``.

    preset: a preset name, CompressionConfig or mapping; ``None`` means "none" for a name and "as converted"
        for a module (a passed module is copied, never trained in place).
    device: "meta" (predict), "cpu" (measure with MemTracker) or "cuda" (measure with the allocator).
    optimizer: any timm optimizer name (SGD with momentum 0.9 by default; weight decay 1e-4).
    amp: False, True (fp16 on cuda, bf16 elsewhere), "bf16" or "fp16" (cuda, or meta as a prediction).
    foreach: the optimizer's multi-tensor path; None = the device's default (meta mimics CUDA: on).
    """
    _check_int(batch_size, "batch_size")
    dev = _parse_device(device)
    if isinstance(model, str):
        _check_model_name(model)
    elif not isinstance(model, nn.Module):
        raise ActcompError(f"model must be a timm model name or an nn.Module, got {type(model).__name__}")
    kw = dict(optimizer=optimizer, dtype=dtype, amp=amp, channels_last=channels_last, num_classes=num_classes,
              img_size=img_size, foreach=foreach, in_chans=in_chans)
    if dev.type != "cuda":
        res = _measure(_prepared(model, preset, dev, kw), batch_size)
    else:
        predicted = step_memory(model, batch_size, preset=preset, device="meta", **kw).peak_bytes
        res = _cuda_step(model, preset, dev, batch_size, kw)
        res.predicted_peak_bytes = predicted
    res.info = dict(model=model if isinstance(model, str) else type(model).__name__, batch_size=batch_size,
                    img_size=img_size, preset=_preset_name(model, preset), device=str(dev), optimizer=optimizer,
                    dtype=str(_parse_dtype(dtype)).replace("torch.", ""), amp=amp, channels_last=channels_last)
    return res


_PREP_CACHE: collections.OrderedDict = collections.OrderedDict()


def _prepared(model, preset, dev: torch.device, kw: dict) -> _Prepared:
    """``_prepare``, reusing the last few meta predictions' models: a meta step changes nothing in a model or
    its optimizer (no values), so the same prepared model serves every batch size of a sweep."""
    if dev.type != "meta" or not isinstance(model, str):
        return _prepare(model, preset, dev, **kw)
    cfg = as_config("none" if preset is None else preset)
    key = (model, repr(cfg), tuple(sorted((k, repr(v)) for k, v in kw.items())))
    prep = _PREP_CACHE.get(key)
    if prep is None:
        prep = _PREP_CACHE[key] = _prepare(model, cfg, dev, **kw)
        while len(_PREP_CACHE) > 4:
            _PREP_CACHE.popitem(last=False)
    _PREP_CACHE.move_to_end(key)
    return prep


def _preset_name(model, preset) -> str:
    if preset is None:
        cfg = config_of(model) if isinstance(model, nn.Module) else None
        return cfg.name if cfg is not None else "none"
    return as_config(preset).name


def _cuda_step(model, preset, dev, batch_size, kw) -> StepMemory:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(dev)
    baseline = torch.cuda.memory_allocated(dev)
    prep = _prepare(model, preset, dev, **kw)
    prep.cuda_baseline = baseline
    try:
        _one_step(prep, batch_size)  # warm-up: optimizer state, cuDNN/cuBLAS workspaces
        return _measure(prep, batch_size)
    finally:
        del prep
        gc.collect()
        torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ fitting

def _fit_prepared(fn: str, model, preset, budgets, img_size, device, max_batch, kw):
    """Checks shared by the batch searches, then the model built and converted once for all the predictions."""
    for b in budgets:
        _check_int(b, "budget_bytes")
    _check_int(max_batch, "max_batch")
    dev = _parse_device(device)
    if dev.type == "cuda":
        raise ActcompError(f"{fn} predicts on meta/cpu; on a GPU use verify_largest_batch_cuda()")
    if isinstance(model, str):
        _check_model_name(model)
    return _prepared(model, preset, dev, dict(img_size=img_size, **_step_kw(kw)))


def largest_batch(model: str | nn.Module, preset, budget_bytes: int, img_size: int = 224, device="meta",
                  max_batch: int = 1 << 16, **kw) -> int:
    """Largest batch whose predicted step peak is <= ``budget_bytes`` (doubling, then bisection); 0 if none fits.

    The model is built and converted once and reused for every batch size tried. ``device`` is "meta"
    (default) or "cpu"; on a GPU use :func:`verify_largest_batch_cuda` for a real OOM search.
    """
    prep = _fit_prepared("largest_batch", model, preset, [budget_bytes], img_size, device, max_batch, kw)

    def fits(b: int) -> bool:
        return _measure(prep, b).peak_bytes <= budget_bytes

    return _search(fits, max_batch)


def largest_batches(model: str | nn.Module, preset, budgets_bytes: list[int], img_size: int = 224, device="meta",
                    max_batch: int = 1 << 16, **kw) -> list[int]:
    """:func:`largest_batch` for several budgets at once, with far fewer step predictions.

    Peaks are cached across budgets, and each search starts from a secant estimate (a step's peak grows almost
    linearly with the batch) and gallops outward from it, so a budget costs a handful of predictions instead of
    ~2·log2(batch). The answer is still the exact search result on the predicted peaks, not the estimate.
    """
    prep = _fit_prepared("largest_batches", model, preset, budgets_bytes, img_size, device, max_batch, kw)
    cache: dict[int, int] = {}

    def peak(b: int) -> int:
        if b not in cache:
            cache[b] = _measure(prep, b).peak_bytes
        return cache[b]

    out = []
    for budget in budgets_bytes:
        def fits(b: int, budget=budget) -> bool:
            return peak(b) <= budget

        if not fits(1):
            out.append(0)
            continue
        out.append(_gallop(fits, _secant_estimate(peak, budget, max_batch), max_batch))
    return out


def _secant_estimate(peak, budget: int, max_batch: int) -> int:
    """Batch whose peak is about ``budget``: secant steps on the (nearly linear) peak-vs-batch curve."""
    b1, b2 = min(8, max_batch), min(32, max_batch)
    for _ in range(5):
        p1, p2 = peak(b1), peak(b2)
        if b2 == b1 or p2 <= p1:
            return b2
        nxt = int(min(max(b2 + (budget - p2) * (b2 - b1) / (p2 - p1), 1), max_batch))
        if abs(nxt - b2) <= 1:
            return nxt
        b1, b2 = b2, nxt
    return b2


def _gallop(fits, est: int, max_batch: int) -> int:
    """Largest b <= max_batch with fits(b) (monotone, fits(1) true), searching outward from ``est``."""
    step = 1
    if fits(est):
        lo = est
        while True:
            if lo == max_batch:
                return lo
            hi = min(lo + step, max_batch)
            if not fits(hi):
                return _bisect(fits, lo, hi)
            lo, step = hi, step * 2
    hi = est
    while True:
        lo = max(hi - step, 1)
        if fits(lo):
            return _bisect(fits, lo, hi)
        hi, step = lo, step * 2


def _step_kw(kw: dict) -> dict:
    allowed = {"optimizer": "sgd", "dtype": "float32", "amp": False, "channels_last": False, "num_classes": 1000,
               "foreach": None, "in_chans": 3}
    unknown = set(kw) - set(allowed)
    if unknown:
        raise ActcompError(f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(allowed)}")
    return {**allowed, **kw}


def _search(fits, max_batch: int, start: int = 1) -> int:
    """Largest b in [1, max_batch] with fits(b), assuming fits is monotone; 0 if fits(1) is false."""
    if not fits(1):
        return 0
    lo = 1  # fits
    b = max(2, min(start, max_batch))
    hi = None  # does not fit
    while hi is None:
        if b > max_batch:
            return max_batch if fits(max_batch) else _bisect(fits, lo, max_batch)
        if fits(b):
            lo, b = b, b * 2
        else:
            hi = b
    return _bisect(fits, lo, hi)


def _bisect(fits, lo: int, hi: int) -> int:
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def verify_largest_batch_cuda(model: str | nn.Module, preset, budget_bytes: int | None = None, img_size: int = 224,
                              max_batch: int = 1 << 16, start: int | None = None, device="cuda", **kw) -> int:
    """Largest batch that really trains a step on the GPU without running out of memory (0 if batch 1 fails).

    ``budget_bytes`` caps this process's allocator at that many bytes (``set_per_process_memory_fraction``),
    emulating a smaller GPU; None uses the whole device. ``start`` (e.g. the prediction of
    :func:`largest_batch`) is the first batch size tried after 1. Each try builds a fresh model.
    """
    dev = _parse_device(device)
    if dev.type != "cuda":
        raise ActcompError("verify_largest_batch_cuda needs device='cuda'")
    if budget_bytes is not None:
        _check_int(budget_bytes, "budget_bytes")
    _check_int(max_batch, "max_batch")
    kw = _step_kw(kw)
    kw["img_size"] = img_size
    total = torch.cuda.get_device_properties(dev).total_memory
    if budget_bytes is not None and budget_bytes > total:
        raise ActcompError(f"budget {budget_bytes} B exceeds the GPU's {total} B")

    def fits(b: int) -> bool:
        prep = None
        try:
            prep = _prepare(model, preset, dev, **kw)
            _one_step(prep, b)
            _one_step(prep, b)  # the second step carries the optimizer state: the steady-state peak
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del prep
            gc.collect()
            torch.cuda.empty_cache()

    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if budget_bytes is not None:
        torch.cuda.set_per_process_memory_fraction(budget_bytes / total, idx)
    try:
        return _search(fits, max_batch, start or 2)
    finally:
        if budget_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, idx)
