"""Model conversion: route each module's saved-for-backward tensors through the compressed ops.

How: every selected module gets a per-instance class swap to a subclass of its own class (as
``torch.nn.utils.parametrize`` does). The subclass's ``forward`` runs the original ``forward`` inside a
``TorchFunctionMode`` that redirects only that module's op (``F.conv2d``, ``F.batch_norm``, ``F.relu``, ...)
to a compressed autograd function with the *same arguments*. So timm's conv variants keep their maths
(``Conv2dSame`` pads first, ``StdConv2d``/``ScaledStdConv2d`` standardize the weight first and gradients
still reach the raw weight and gain), the forward output is bitwise the original, and parameters,
``state_dict`` keys and ``isinstance`` checks are unchanged. ``restore`` swaps the class back.

Eval mode and ``torch.no_grad()`` run the original forward untouched.
"""
from __future__ import annotations

import fnmatch
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import ops
from .config import ActcompError, CompressionConfig, as_config
from .peers import apply_peer, remove_peer

# --------------------------------------------------------------------------------------- module kinds

_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)
_ACT_MODULES = ("torch.nn.modules.activation", "timm.layers.activations")
_SE_NAMES = ("SqueezeExcite", "SEModule", "EffectiveSEModule", "LayerScale")


def module_kind(m: nn.Module) -> str | None:
    if isinstance(m, nn.Conv2d):
        return "conv"
    if isinstance(m, _NORMS):
        return "norm"
    if isinstance(m, nn.MaxPool2d):
        return "pool"
    if isinstance(m, nn.Linear):
        return "linear"
    cls = getattr(type(m), "_actcomp_orig_cls", type(m))  # judge a converted module by its own class
    if any(cls.__module__.startswith(p) for p in _ACT_MODULES) and not list(m.children()):
        return "act"
    if any(n in cls.__name__ for n in _SE_NAMES) or isinstance(getattr(m, "gamma", None), nn.Parameter):
        return "se"  # scale multiplies: SE gates, layer-scale (LayerScale modules, ConvNeXt blocks' gamma)
    return None


@dataclass
class ModuleSpec:
    name: str
    kind: str
    cfg: CompressionConfig
    block: int = 1
    bits: int | None = None  # conv input coded at this many bits (actcomp.ops.code); None: uncoded
    compiled_only: bool = False  # an activation converted only under torch.compile on CPU (see _compiled_masks)
    act: ModuleSpec | None = None  # a norm's activation child, routed by the norm's intercept (see _act_child)
    via_parent: bool = False  # this activation's calls are routed by its parent norm's intercept


def _block_for(name: str, cfg: CompressionConfig) -> int:
    if isinstance(cfg.block, Mapping):
        for pat, b in cfg.block.items():
            if fnmatch.fnmatchcase(name, pat):
                return b
        return 1
    return cfg.block


def _bits_for(name: str, cfg: CompressionConfig) -> int | None:
    if isinstance(cfg.conv_bits, Mapping):
        for pat, b in cfg.conv_bits.items():
            if fnmatch.fnmatchcase(name, pat):
                return b
        return None
    return cfg.conv_bits


def _selected(name: str, cfg: CompressionConfig) -> bool:
    if cfg.include and not any(fnmatch.fnmatchcase(name, p) for p in cfg.include):
        return False
    return not any(fnmatch.fnmatchcase(name, p) for p in cfg.exclude)


def _wants(spec_kind: str, block: int, cfg: CompressionConfig, bits: int | None = None) -> bool:
    if spec_kind == "conv":
        return block > 1 or cfg.copy_b1 or bits is not None
    if spec_kind == "act":
        return cfg.relu != "none" or cfg.act != "none"
    if spec_kind == "se":
        return cfg.mul != "none"
    return getattr(cfg, spec_kind) != "none"


def _compiled_masks(cfg: CompressionConfig) -> bool:
    """Whether ReLU-family activations left native save a packed bit mask under ``torch.compile`` on CPU.

    Once the next conv saves a pooled copy, nothing saves the ReLU's output any more, and Inductor's partitioner
    saves a bool mask of it instead. Inductor's CPU code writes bool tensors ~10x slower than a ReLU, which made
    compiled ResNet-50 pool4 1.31x native. The packed mask (``ops.relu``) gives the same gradient, bitwise, and
    is 8x smaller than the bool mask. One of a native norm's output saves nothing: its region is recomputed in
    backward from the norm's saved input (the model's own mode marks norm outputs, see _NORM_OUTPUT). Eager, and on
    CUDA, these activations stay native."""
    return cfg.relu == "none" and cfg.compresses_convs


def _act_child(m: nn.Module, specs: dict) -> ModuleSpec | None:
    """The spec of a norm module's activation child when the norm's output goes straight into it (timm's
    BatchNormAct2d: norm, then ``drop`` = Identity, then ``act``): the norm's intercept then routes the child's
    calls too, and a closed-form activation of the norm's output saves the norm input's code instead of its own
    (ops.norm.output_code: no second quantize pass, 8 bytes per group instead of 1 per element)."""
    act = m._modules.get("act")
    if act is None or set(m._modules) - {"act", "drop"} or not isinstance(m._modules.get("drop", nn.Identity()),
                                                                         nn.Identity):
        return None
    if isinstance(act, (nn.ReLU, nn.LeakyReLU, nn.Hardtanh)):  # ReLU6 too: 1-bit masks, nothing to share
        return None
    return specs.get(id(act))


def plan(model: nn.Module, cfg: CompressionConfig) -> list[tuple[str, nn.Module, ModuleSpec]]:
    """Which modules a config converts, without touching the model."""
    out = []
    for name, m in model.named_modules():
        kind = module_kind(m)
        if kind is None or not _selected(name, cfg):
            continue
        block = _block_for(name, cfg) if kind == "conv" else 1
        bits = _bits_for(name, cfg) if kind == "conv" else None
        if _wants(kind, block, cfg, bits):
            out.append((name, m, ModuleSpec(name, kind, cfg, block, bits)))
        elif kind == "act" and _compiled_masks(cfg):
            out.append((name, m, ModuleSpec(name, kind, cfg, compiled_only=True)))
    if _compiled_masks(cfg) and not any(m is model for _, m, _ in out):
        out.insert(0, ("", model, ModuleSpec("", "root", cfg, compiled_only=True)))  # marks norm outputs (_route)
    acts = {id(m): s for _, m, s in out if s.kind == "act"}
    for _, m, s in out:
        child = _act_child(m, acts) if s.kind == "norm" else None
        if child is not None:
            s.act, child.via_parent = child, True
    return out


# ------------------------------------------------------------------------------------------ the mode

_RECORDER: list | None = None  # set by summary(): rows describing each compressed call


def _record(spec: ModuleSpec, op: str, shape, before: int, after: int, note: str = ""):
    if _RECORDER is not None:
        _RECORDER.append(dict(layer=spec.name, op=op, input_shape=tuple(shape), block=spec.block, bits=spec.bits,
                              saved_bytes_native=before, saved_bytes_compressed=after, note=note,
                              grad_error=(spec.cfg.grad_error or {}).get(spec.name, float("nan"))))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _bind(args, kwargs, names, defaults):
    vals = dict(zip(names, args))
    vals.update(kwargs)
    return [vals.get(n, defaults.get(n)) for n in names]


def _conv(spec, args, kwargs):
    x, w, b, stride, padding, dilation, groups = _bind(
        args, kwargs, ["input", "weight", "bias", "stride", "padding", "dilation", "groups"],
        dict(stride=1, padding=0, dilation=1, groups=1))
    cfg, blk = spec.cfg, spec.block
    if x.dim() != 4 or (blk > 1 and (x.shape[-2] < blk or x.shape[-1] < blk)):
        _record(spec, "conv2d", x.shape, _nbytes(x), _nbytes(x), "skipped: input smaller than block")
        return F.conv2d(x, w, b, stride, padding, dilation, groups)
    if spec.bits is not None:
        pooled = x.shape if blk == 1 else (*x.shape[:2], -(-x.shape[2] // blk), -(-x.shape[3] // blk))
        _record(spec, "conv2d", x.shape, _nbytes(x), ops.coded_nbytes(pooled, spec.bits))
        return ops.CodedConv2d.apply(x, w, b, stride, padding, dilation, groups, blk, cfg.conv_pool, spec.bits,
                                     spec.name)
    after = ops.pooled_nbytes(x.shape, blk, x.element_size())
    _record(spec, "conv2d", x.shape, _nbytes(x), after)
    return ops.PooledConv2d.apply(x, w, b, stride, padding, dilation, groups, blk, cfg.conv_pool,
                                  cfg.grad_filter, cfg.copy_b1, spec.name)


def _norm_call(func, spec, args, kwargs, share=False):
    """The compressed norm's output; with ``share`` (batch_norm only) ``(y, code)``: code = y's ``(q, lo, scale)``
    from the input's code, or None where there is none (ops.norm.output_code)."""
    sr = spec.cfg.stochastic_rounding
    if func is F.batch_norm:
        x, rm, rv, w, b, training, momentum, eps = _bind(
            args, kwargs, ["input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"],
            dict(weight=None, bias=None, training=False, momentum=0.1, eps=1e-5))
        _record(spec, func.__name__, x.shape, _nbytes(x), ops.quantized_nbytes(x.shape))
        if not share:
            return ops.batch_norm(x, rm, rv, w, b, training, momentum, eps, sr, spec.name)
        y, *code = ops.batch_norm(x, rm, rv, w, b, training, momentum, eps, sr, spec.name, share=True)
        return y, (tuple(code) if code[1].numel() else None)
    if func is F.layer_norm:
        x, shape, w, b, eps = _bind(args, kwargs, ["input", "normalized_shape", "weight", "bias", "eps"],
                                    dict(weight=None, bias=None, eps=1e-5))
        _record(spec, func.__name__, x.shape, _nbytes(x), ops.quantized_nbytes(x.shape))
        return ops.layer_norm(x, shape, w, b, eps, sr, spec.name)
    x, groups, w, b, eps = _bind(args, kwargs, ["input", "num_groups", "weight", "bias", "eps"],
                                 dict(weight=None, bias=None, eps=1e-5))
    _record(spec, func.__name__, x.shape, _nbytes(x), ops.quantized_nbytes(x.shape))
    return ops.group_norm(x, groups, w, b, eps, sr, spec.name)


_VALUE_ACTS = {F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.mish, torch.sigmoid, torch.Tensor.sigmoid,
               torch.Tensor.sigmoid_, torch.tanh, torch.Tensor.tanh, F.elu, F.selu, F.celu}
_MASK_ACTS = {F.relu, torch.relu, torch.relu_, torch.Tensor.relu, torch.Tensor.relu_, F.relu6, F.hardtanh,
              F.leaky_relu}
_INPLACE_METHODS = {torch.relu_, torch.Tensor.relu_}


# torch lists F.hardswish and F.hardsigmoid among the functions __torch_function__ cannot override
# (torch.overrides.get_ignored_functions), although their bodies dispatch it in eager; Dynamo trusts that list, so
# under torch.compile no mode saw them: compiled models kept those activations' inputs whole while eager coded
# them (and the gradients differed). Added to Dynamo's set when a model with converted activations is made.
_DYNAMO_HIDDEN_ACTS = (F.hardswish, F.hardsigmoid)


def _let_dynamo_dispatch_acts() -> None:
    from torch._dynamo.variables.torch import get_overridable_functions

    get_overridable_functions().update(_DYNAMO_HIDDEN_ACTS)  # a cached set: every later trace sees them


def _on_cpu(args) -> bool:
    return bool(args) and isinstance(args[0], torch.Tensor) and args[0].device.type == "cpu"


def _act_call(func, spec, args, kwargs, code=None):
    """The compressed activation; ``code``: x's ``(q, lo, scale)`` shared by the norm that produced x (used by the
    closed-form activations; the others ignore it)."""
    x = args[0]
    cfg = spec.cfg
    if func in _MASK_ACTS:  # relu="bitmask", or a native one under compile (_compiled_masks)
        inplace = bool(kwargs.get("inplace", False) or (len(args) > 1 and args[-1] is True)) or func in _INPLACE_METHODS
        # An in-place call on a leaf that requires grad is an error in PyTorch too; stay out of place then.
        inplace = inplace and not (x.is_leaf and x.requires_grad)
        _record(spec, getattr(func, "__name__", "relu"), x.shape, _nbytes(x), ops.packed_bits_nbytes(x.numel()))
        # a native activation of a native norm's untouched output, under compile: nothing to save (ops.mask)
        recompute = spec.compiled_only and getattr(x, _NORM_OUTPUT, False) is True
        if func is F.leaky_relu:
            slope = kwargs.get("negative_slope", args[1] if len(args) > 1 and not isinstance(args[1], bool) else 0.01)
            return ops.leaky_relu(x, slope, inplace, spec.name, recompute)
        if func is F.hardtanh or func is F.relu6:
            if func is F.relu6:
                lo, hi = 0.0, 6.0
            else:
                lo, hi = _bind(args[1:], kwargs, ["min_val", "max_val"], dict(min_val=-1.0, max_val=1.0))
            return ops.hardtanh(x, lo, hi, inplace, spec.name, recompute)
        return ops.relu(x, inplace, spec.name, recompute)
    if func in _VALUE_ACTS and cfg.act == "int8":
        # In-place variants run out of place: callers use the returned tensor (x = act(x)).
        kw = {k: v for k, v in kwargs.items() if k != "inplace"}
        rest = tuple(a for a in args[1:] if not isinstance(a, bool))
        closed = _closed_form_act(func, rest, kw)
        shared = closed is not None and code is not None
        _record(spec, getattr(func, "__name__", "act"), x.shape, _nbytes(x),
                8 * code[1].numel() if shared else ops.quantized_nbytes(x.shape),
                "code shared with the norm input" if shared else "")
        if closed is not None:
            return ops.activation(closed[0], x, closed[1], cfg.stochastic_rounding, spec.name, code)
        plain = {torch.Tensor.sigmoid_: torch.sigmoid}.get(func, func)

        def fn(x_):
            return plain(x_, *rest, **kw)

        return ops.recompute(fn, fn, "activation", x, (), cfg.stochastic_rounding, spec.name)
    return func(*args, **kwargs)


_ACT_OPS = {F.silu: "silu", F.gelu: "gelu", F.hardswish: "hardswish", F.hardsigmoid: "hardsigmoid", F.mish: "mish",
            torch.sigmoid: "sigmoid", torch.Tensor.sigmoid: "sigmoid", torch.Tensor.sigmoid_: "sigmoid",
            torch.tanh: "tanh", torch.Tensor.tanh: "tanh", F.elu: "elu", F.celu: "celu", F.selu: "selu"}


def _closed_form_act(func, rest, kw):
    """(op, params) of ops.activation for a call with a closed-form derivative; None: recompute instead."""
    op = _ACT_OPS.get(func)
    if op == "gelu" and len(rest) + len(kw) <= 1 and set(kw) <= {"approximate"}:
        approx = kw.get("approximate", rest[0] if rest else "none")
        return (op, (approx,)) if approx in ("none", "tanh") else None
    if op in ("elu", "celu") and len(rest) + len(kw) <= 1 and set(kw) <= {"alpha"}:
        return op, (float(kw.get("alpha", rest[0] if rest else 1.0)),)
    if op is not None and op not in ("gelu", "elu", "celu") and not rest and not kw:
        return op, ()
    return None


# Under torch.compile, with activations left native (_compiled_masks): the model's own mode (kind "root") marks
# each native norm's output with this attribute, and clears it when an op changes the tensor in place (timm's
# ResNet blocks add the shortcut into bn3's output with +=). A marked activation input is rebuilt in backward from
# what the norm saves anyway (ops.mask.RegionRecomputed); the mark only steers that choice, both give the same
# gradient. Dynamo keeps tensor attributes without graph breaks.
_NORM_OUTPUT = "_actcomp_norm_output"
_NORM_FUNCS = (F.batch_norm, F.layer_norm, F.group_norm)
_NOT_CHANGED = {torch.Tensor.contiguous, torch.Tensor.to, torch.Tensor.requires_grad_, torch.Tensor.retain_grad}


def _root_call(func, args, kwargs):
    out = func(*args, **kwargs)
    if func in _NORM_FUNCS:
        if isinstance(out, torch.Tensor):
            setattr(out, _NORM_OUTPUT, True)
    elif out is args[0] and func not in _NOT_CHANGED:
        setattr(out, _NORM_OUTPUT, False)
    return out


_MUL_FUNCS = {torch.Tensor.__mul__, torch.Tensor.__rmul__, torch.mul, torch.Tensor.mul}


class _Intercept(TorchFunctionMode):
    def __init__(self, spec: ModuleSpec):
        super().__init__()
        self.spec = spec
        self.shared = None  # (y, code): the last batch-norm output of this forward and its code (spec.act only)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not self._ours(func, args, kwargs):
            return func(*args, **kwargs)  # other modes and subclasses still see it, as without us
        if torch.compiler.is_compiling():
            return self._route(func, args, kwargs)
        # Ours runs with torch-function handling off: an enclosing converted module's mode (timm's BatchNormAct2d
        # around its act, an SE block around its convs) would otherwise see every op inside the compressed op
        # (~4800 extra Python calls per EfficientNet-B0 step). Nothing inside our ops needs intercepting.
        with torch._C.DisableTorchFunction():
            return self._route(func, args, kwargs)

    def _ours(self, func, args, kwargs) -> bool:
        return _handles(self.spec, func, args, kwargs) or (
            self.spec.act is not None and _handles(self.spec.act, func, args, kwargs))

    def _route(self, func, args, kwargs):
        spec = self.spec
        if spec.act is not None and _handles(spec.act, func, args, kwargs):
            # the norm's activation child; its input is normally the output of the norm just before it
            shared, self.shared = self.shared, None
            code = shared[1] if shared is not None and args and args[0] is shared[0] else None
            return _act_call(func, spec.act, args, kwargs, code)
        kind = spec.kind
        if kind == "norm":
            if spec.act is None or func is not F.batch_norm:
                return _norm_call(func, spec, args, kwargs)
            self.shared = _norm_call(func, spec, args, kwargs, share=True)
            return self.shared[0]
        if kind == "conv":
            return _conv(spec, args, kwargs)
        if kind == "root":
            return _root_call(func, args, kwargs)
        if kind == "act":
            return _act_call(func, spec, args, kwargs)
        if kind == "pool":
            x, k, s, p, d, ceil = _bind(args, kwargs, ["input", "kernel_size", "stride", "padding", "dilation",
                                                      "ceil_mode"], dict(stride=None, padding=0, dilation=1,
                                                                         ceil_mode=False))
            _record(spec, "max_pool2d", x.shape, _nbytes(x), 0)
            return ops.max_pool2d(x, k, s, p, d, ceil, spec.name)
        if kind == "linear":
            x, w, b = _bind(args, kwargs, ["input", "weight", "bias"], dict(bias=None))
            _record(spec, "linear", x.shape, _nbytes(x), ops.quantized_nbytes(x.shape))
            return ops.Int8Linear.apply(x, w, b, spec.cfg.stochastic_rounding, spec.name)
        big, small = _scale_operands(*args)
        _record(spec, "mul", big.shape, _nbytes(big), ops.quantized_nbytes(big.shape))
        return ops.Int8ScaleMul.apply(big, small, spec.cfg.stochastic_rounding, spec.name)


def _handles(spec: ModuleSpec, func, args, kwargs) -> bool:
    """Whether a call is one that a module of this spec compresses."""
    kind = spec.kind
    if kind == "conv":
        return func is F.conv2d
    if kind == "norm":
        return func in (F.batch_norm, F.layer_norm, F.group_norm)
    if kind == "act":
        cfg = spec.cfg
        if func in _MASK_ACTS and cfg.relu == "none":
            return _compiled_masks(cfg) and torch.compiler.is_compiling() and _on_cpu(args)
        return (func in _MASK_ACTS and cfg.relu == "bitmask") or (func in _VALUE_ACTS and cfg.act == "int8")
    if kind == "pool":
        return func is F.max_pool2d and not kwargs.get("return_indices", False)
    if kind == "root":  # norms, and whatever a marked tensor goes through (an in-place op clears its mark)
        return func in _NORM_FUNCS or (bool(args) and getattr(args[0], _NORM_OUTPUT, False) is True)
    if kind == "linear":
        return func is F.linear
    return kind == "se" and func in _MUL_FUNCS and len(args) == 2 and _scale_operands(*args)[0] is not None


def _scale_operands(a, b):
    """(big, small) when one operand is a small tensor broadcast over a big one (at least 2x more elements)."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None, None
    big, small = (a, b) if a.numel() >= b.numel() else (b, a)
    if small.numel() * 2 > big.numel() or torch.broadcast_shapes(a.shape, b.shape) != big.shape:
        return None, None
    return big, small


class _Compressed:
    """Mixin placed in front of the module's own class."""

    def forward(self, *args, **kwargs):
        spec = self._actcomp
        if spec.via_parent or not (self.training and torch.is_grad_enabled()) or (
                spec.compiled_only and not torch.compiler.is_compiling()):
            return super().forward(*args, **kwargs)
        with _Intercept(spec):
            return super().forward(*args, **kwargs)


_CLASS_CACHE: dict[type, type] = {}


def _compressed_class(cls: type) -> type:
    if cls not in _CLASS_CACHE:
        _CLASS_CACHE[cls] = type(f"Compressed{cls.__name__}", (_Compressed, cls), {"_actcomp_orig_cls": cls})
    return _CLASS_CACHE[cls]


# ----------------------------------------------------------------------------------------- public API

def compress(model: nn.Module, spec: str | CompressionConfig | Mapping = "none",
             example_input: torch.Tensor | None = None, target: torch.Tensor | None = None) -> nn.Module:
    """Convert ``model`` in place for ``spec`` (preset name, CompressionConfig or mapping) and return it.

    A budget spec (``{"budget": 0.25, ...}``, ``"budget0.25"``, ``"full_budget0.25"``) plans per-layer codes
    on the calibration batch ``example_input`` first (:func:`actcomp.policy.plan_budget`; ``target``: its class
    labels, for a cross-entropy calibration loss).

    Idempotent (a converted model is first restored), reversible with :func:`restore`. Raises
    :class:`ActcompError` and leaves the model unchanged on bad input.
    """
    if not isinstance(model, nn.Module):
        raise ActcompError(f"compress() needs a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        # Scripted code bypasses the Python forward that the conversion relies on.
        raise ActcompError("compress() needs an eager nn.Module, got a TorchScript module; compress before "
                           "torch.jit.script")
    from .policy import budget_spec, config_for_budget  # lazy: policy imports this module

    planned = budget_spec(spec)
    cfg = as_config(spec) if planned is None else config_for_budget(model, planned, example_input, target)
    if cfg.compresses_convs and not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        raise ActcompError(f"preset {cfg.name!r} pools convolution inputs, but {type(model).__name__} has no Conv2d")
    todo = plan(model, cfg)
    if cfg.compresses_convs and not any(s.kind == "conv" for _, _, s in todo):
        raise ActcompError(f"preset {cfg.name!r}: no Conv2d matched include/exclude/block patterns")
    earlier = config_of(model)
    restore(model)
    try:
        _convert(model, todo, cfg)
    except Exception as e:
        # All or nothing: undo what was done and bring back the earlier conversion.
        restore(model)
        if earlier is not None:
            _convert(model, plan(model, earlier), earlier)
        if isinstance(e, ActcompError):
            raise
        raise ActcompError(f"preset {cfg.name!r} cannot convert {type(model).__name__}: "
                           f"{type(e).__name__}: {' '.join(str(e).split())}") from e
    return model


def _convert(model: nn.Module, todo, cfg: CompressionConfig) -> None:
    if any(s.kind == "act" for _, _, s in todo):
        _let_dynamo_dispatch_acts()
    for _, m, s in todo:
        m._actcomp = s
        m.__class__ = _compressed_class(type(m))
    apply_peer(model, cfg)
    model._actcomp_config = cfg


def restore(model: nn.Module) -> nn.Module:
    """Undo :func:`compress`: native modules again, same parameters and state."""
    for m in model.modules():
        if isinstance(m, _Compressed):
            m.__class__ = m._actcomp_orig_cls
        m.__dict__.pop("_actcomp", None)
    remove_peer(model)
    model.__dict__.pop("_actcomp_config", None)
    return model


def config_of(model: nn.Module) -> CompressionConfig | None:
    return model.__dict__.get("_actcomp_config")


def summary(model: nn.Module, example_input: torch.Tensor):
    """One training-mode forward; a row per compressed call: layer, op, input shape, b, code bits (None: uncoded),
    saved bytes before/after, and for a budget plan the relative weight-gradient error it measured for the
    layer's choice (``grad_error``; NaN otherwise).

    Runs on any device, ``meta`` included (no real compute there). Returns a pandas DataFrame.
    """
    import pandas as pd

    global _RECORDER
    was_training = model.training
    _RECORDER = rows = []
    try:
        model.train()
        with torch.enable_grad():
            model(example_input)
    finally:
        _RECORDER = None
        model.train(was_training)
    return pd.DataFrame(rows, columns=["layer", "op", "input_shape", "block", "bits", "saved_bytes_native",
                                       "saved_bytes_compressed", "note", "grad_error"])
