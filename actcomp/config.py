"""Compression configuration, presets and validation (no torch model is touched here)."""
from __future__ import annotations

import dataclasses
import difflib
import numbers
from collections.abc import Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from .errors import ActcompError  # noqa: F401  (re-exported: actcomp.config.ActcompError predates errors.py)

_CHOICES = {
    "conv_pool": ("avg", "max"),
    "relu": ("none", "bitmask"),
    "act": ("none", "int8"),
    "norm": ("none", "int8"),
    "pool": ("none", "int8"),
    "linear": ("none", "int8"),
    "mul": ("none", "int8"),
    "peer": ("none", "ckpt", "int8", "offload"),
}


@dataclass(frozen=True)
class CompressionConfig:
    """What each kind of op saves for backward.

    block: conv-input pooling factor b; an int for every conv, or a mapping of module-name glob patterns to b
        (first match wins, unmatched convs stay native), e.g. ``{"layer1.*": 2, "*": 4}``.
    conv_pool: "avg" (the paper) or "max".
    copy_b1: route b=1 convs through the compressed function, saving ``avg_pool2d(x, 1)``: the authors'
        uncompressed baseline, which keeps a full copy. Without it, b=1 is native PyTorch.
    grad_filter: also pool the output gradient and compute the weight gradient at low resolution.
    conv_bits: save each conv input (b×b-pooled first where b > 1) as a packed, stochastically rounded per-group
        integer code of 8, 4 or 2 bits (``actcomp.ops.code``); None keeps it uncoded. An int for every conv,
        or a mapping of module-name glob patterns to bits or None (first match wins, unmatched: uncoded).
    relu/act/norm/pool/linear/mul: how ReLU-family activations, value activations (SiLU, GELU, ...),
        normalization inputs, max-pool indices, Linear inputs and squeeze-excite gating muls are saved.
    include/exclude: module-name glob patterns restricting which modules are converted.
    peer: a non-pooling baseline applied to the whole model (checkpointing, int8 everything, CPU offload).
    grad_error: per conv layer, the relative weight-gradient error that ``actcomp.plan_budget`` measured for
        its choice (informational: ``summary`` reports it; no effect on conversion).
    """

    name: str = "custom"
    block: int | Mapping[str, int] = 1
    conv_pool: str = "avg"
    copy_b1: bool = False
    grad_filter: bool = False
    conv_bits: int | Mapping[str, int | None] | None = None
    relu: str = "none"
    act: str = "none"
    norm: str = "none"
    pool: str = "none"
    linear: str = "none"
    mul: str = "none"
    stochastic_rounding: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    peer: str = "none"
    description: str = field(default="", compare=False)
    grad_error: Mapping[str, float] | None = field(default=None, compare=False)

    def __post_init__(self):
        validate(self)

    @property
    def compresses_convs(self) -> bool:
        blocks = self.block.values() if isinstance(self.block, Mapping) else [self.block]
        bits = self.conv_bits.values() if isinstance(self.conv_bits, Mapping) else [self.conv_bits]
        return self.copy_b1 or any(b > 1 for b in blocks) or any(b is not None for b in bits)

    def replace(self, **kw) -> CompressionConfig:
        _check_keys(kw)
        return dataclasses.replace(self, **kw)


def _show(v) -> str:
    """A value for a one-line message: its repr, cut short, with its type."""
    r = " ".join(repr(v).split())
    return f"{r if len(r) <= 60 else r[:57] + '...'} ({type(v).__name__})"


def _check_block(b, where="block"):
    if isinstance(b, bool) or not isinstance(b, numbers.Integral):
        form = " or a {pattern: int} mapping" if where == "block" else ""
        raise ActcompError(f"{where} must be an int >= 1{form}, got {_show(b)}")
    if b < 1:
        raise ActcompError(f"{where} must be an int >= 1, got {b}")
    return int(b)


CONV_BITS = (8, 4, 2)


def _check_bits(v, where="conv_bits"):
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) not in CONV_BITS:
        form = " or a {pattern: bits} mapping" if where == "conv_bits" else ""
        raise ActcompError(f"{where} must be one of {', '.join(map(str, CONV_BITS))} or None{form}, got {_show(v)}")
    return int(v)


def _patterns(v, key):
    """include/exclude: one glob pattern or a sequence of them, as a tuple."""
    if isinstance(v, str):
        return (v,)
    if isinstance(v, (Sequence, Set)) and not isinstance(v, bytes) and all(isinstance(p, str) for p in v):
        return tuple(sorted(v)) if isinstance(v, Set) else tuple(v)
    raise ActcompError(f"{key} must be a glob pattern or a list of them, got {_show(v)}")


def _normalize(cfg: CompressionConfig) -> None:
    """Validate every field (one-line ActcompError) and store the canonical form (tuples, plain ints)."""
    for key in _STRINGS:
        v = getattr(cfg, key)
        if not isinstance(v, str):
            raise ActcompError(f"{key} must be a string, got {_show(v)}")
    for key in _BOOLS:
        v = getattr(cfg, key)
        if not isinstance(v, bool):  # "false" or 0 would silently mean something else
            raise ActcompError(f"{key} must be true or false (a bool), got {_show(v)}")
    for key, allowed in _CHOICES.items():
        v = getattr(cfg, key)
        if not isinstance(v, str) or v not in allowed:
            raise ActcompError(f"{key}={repr(v) if isinstance(v, str) else _show(v)} is not one of {', '.join(allowed)}")
    object.__setattr__(cfg, "block", _per_layer(cfg.block, "block", _check_block, "an int or {pattern: int}"))
    object.__setattr__(cfg, "conv_bits", _per_layer(cfg.conv_bits, "conv_bits", _check_bits,
                                                    "8, 4, 2, None or {pattern: bits}"))
    for key in ("include", "exclude"):
        object.__setattr__(cfg, key, _patterns(getattr(cfg, key), key))
    if cfg.grad_error is not None:
        if not isinstance(cfg.grad_error, Mapping) or not all(
                isinstance(k, str) and isinstance(v, numbers.Real) and not isinstance(v, bool)
                for k, v in cfg.grad_error.items()):
            raise ActcompError(f"grad_error must be a {{layer: number}} mapping or None, got {_show(cfg.grad_error)}")
        object.__setattr__(cfg, "grad_error", {k: float(v) for k, v in cfg.grad_error.items()})


def _per_layer(value, key: str, check, hint: str):
    """One value for every conv (checked by ``check``), or a non-empty {module-name glob: value} mapping."""
    if not isinstance(value, Mapping):
        return check(value)
    if not value:
        raise ActcompError(f"{key} mapping is empty; give {hint}")
    out = {}
    for pat, v in value.items():
        if not isinstance(pat, str):
            raise ActcompError(f"{key} pattern must be a string, got {_show(pat)}")
        out[pat] = check(v, f"{key}[{pat!r}]")
    return out


def validate(cfg: CompressionConfig) -> None:
    _normalize(cfg)
    if cfg.peer != "none" and (cfg.compresses_convs or any(getattr(cfg, k) != "none" for k in _WHOLE_SET)):
        raise ActcompError(f"peer={cfg.peer!r} is a stand-alone baseline; do not combine it with other compression")
    if cfg.conv_bits is not None and (cfg.copy_b1 or cfg.grad_filter):
        what = "copy_b1 (the authors' uncompressed copy)" if cfg.copy_b1 else "grad_filter"
        raise ActcompError(f"conv_bits cannot be combined with {what}")


_STRINGS = ("name", "description")
_BOOLS = ("copy_b1", "grad_filter", "stochastic_rounding")
_WHOLE_SET = ("relu", "act", "norm", "pool", "linear", "mul")
_FULL = dict(relu="bitmask", act="int8", norm="int8", pool="int8", linear="int8", mul="int8")

PRESETS: dict[str, CompressionConfig] = {
    p.name: p
    for p in [
        CompressionConfig("none", description="native PyTorch: nothing compressed"),
        CompressionConfig("authors_b1", copy_b1=True,
                          description="the authors' baseline: every conv through the function with b=1 (full copy)"),
        CompressionConfig("pool2", block=2, description="the paper's method: conv inputs 2x2 average-pooled"),
        CompressionConfig("pool4", block=4, description="the paper's method: conv inputs 4x4 average-pooled"),
        CompressionConfig("pool8", block=8, description="the paper's method: conv inputs 8x8 average-pooled"),
        CompressionConfig("maxpool2", block=2, conv_pool="max", description="conv inputs 2x2 max-pooled"),
        CompressionConfig("pool2_gf", block=2, grad_filter=True,
                          description="pool2 + gradient filtering (output gradient pooled too)"),
        CompressionConfig("pool4_gf", block=4, grad_filter=True,
                          description="pool4 + gradient filtering (output gradient pooled too)"),
        CompressionConfig("full2", block=2, **_FULL,
                          description="conv inputs 2x2 pooled + every other saved tensor compressed"),
        CompressionConfig("full4", block=4, **_FULL,
                          description="conv inputs 4x4 pooled + every other saved tensor compressed"),
        # Coded conv inputs: q<bits> codes the full-resolution input, p<b>q<bits> pools b×b first, full_* adds
        # the whole-set compression of full2/full4. Bytes per conv-input element (fp32 native 4 B, group
        # (lo, scale) pairs aside): q8 1, q4 0.5, q2 0.25, p2q8 0.25 (= pool4), p2q4 0.125.
        CompressionConfig("q8", conv_bits=8, description="conv inputs as 8-bit stochastic codes"),
        CompressionConfig("q4", conv_bits=4, description="conv inputs as 4-bit stochastic codes (2 per byte)"),
        CompressionConfig("q2", conv_bits=2, description="conv inputs as 2-bit stochastic codes (4 per byte)"),
        CompressionConfig("p2q8", block=2, conv_bits=8,
                          description="conv inputs 2x2 average-pooled, then 8-bit stochastic codes (pool4's bytes)"),
        CompressionConfig("p2q4", block=2, conv_bits=4,
                          description="conv inputs 2x2 average-pooled, then 4-bit stochastic codes"),
        CompressionConfig("full_q8", conv_bits=8, **_FULL, description="q8 + every other saved tensor compressed"),
        CompressionConfig("full_q4", conv_bits=4, **_FULL, description="q4 + every other saved tensor compressed"),
        CompressionConfig("full_q2", conv_bits=2, **_FULL, description="q2 + every other saved tensor compressed"),
        CompressionConfig("full_p2q8", block=2, conv_bits=8, **_FULL,
                          description="p2q8 + every other saved tensor compressed"),
        CompressionConfig("ckpt", peer="ckpt", description="peer: gradient checkpointing (timm set_grad_checkpointing)"),
        CompressionConfig("int8", peer="int8", description="peer: every saved float tensor as per-group uint8 (ActNN/GACT-style)"),
        CompressionConfig("offload", peer="offload", description="peer: saved tensors offloaded to host memory (save_on_cpu)"),
    ]
}


def get_preset(name: str) -> CompressionConfig:
    if isinstance(name, str) and name.removeprefix("full_").startswith("budget"):
        # planned per model: needs the model and a calibration batch, so it cannot be a fixed preset
        raise ActcompError(f"{name!r} is planned per model: actcomp.compress(model, {name!r}, example_input=x) "
                           "or actcomp.plan_budget(model, x, budget)")
    if not isinstance(name, str) or name not in PRESETS:
        close = difflib.get_close_matches(str(name), PRESETS, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ActcompError(f"unknown preset {name!r}{hint}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def _check_keys(d: dict) -> dict:
    known = [f.name for f in dataclasses.fields(CompressionConfig)]
    unknown = sorted(str(k) for k in d if k not in known)
    if unknown:
        raise ActcompError(f"unknown compression option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    return d


def as_config(spec: str | CompressionConfig | Mapping[str, Any]) -> CompressionConfig:
    """A preset name, a CompressionConfig, or a mapping (optionally with ``preset`` as the base)."""
    if isinstance(spec, CompressionConfig):
        return spec
    if isinstance(spec, str):
        return get_preset(spec)
    if isinstance(spec, Mapping):
        d = dict(spec)
        base = get_preset(d.pop("preset")) if "preset" in d else CompressionConfig()
        return base.replace(**_check_keys(d))
    raise ActcompError(f"compression must be a preset name, CompressionConfig or mapping, got {type(spec).__name__}")
