"""A per-layer conv-input compression policy under a memory budget (``actcomp.plan_budget``).

Budget: a fraction of the native *conv-input* saved bytes (the fp32/bf16 inputs every Conv2d keeps for its
weight gradient, as ``summary``'s ``saved_bytes_native`` counts them). The other saved tensors are left to
``base``: "none" keeps them native, "full" compresses them as ``full4`` does; either way they are outside the
budget.

Sensitivity (as GACT/ActNN do, on one calibration batch): one native forward and backward captures every
conv's input x and output gradient dy; for each candidate compressor c the layer's weight gradient is recomputed
from the decoded input, and its error is the relative squared error ``||dW_c - dW||^2 / ||dW||^2`` (one
stochastic draw: an unbiased estimate of the expected error). A layer whose weight gradient is exactly zero on
the batch (e.g. behind timm's zero-initialised last BatchNorm gamma) is scored by the decoded input's relative
squared error ``||x_c - x||^2 / ||x||^2`` instead, so it is not coded blindly.

Choice: every layer starts at its most accurate candidate (native); the layer/candidate pair with the smallest
error increase per byte saved is taken, repeatedly, until the conv-input bytes fit the budget (ties: model order,
then candidate order). Deterministic for a given model, input and seed: the calibration loss weights, dropout
and the codes' random draws come from a generator seeded with ``seed`` (the global RNG state is restored).
"""
from __future__ import annotations

import copy
import glob
import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

from .config import CompressionConfig, get_preset
from .errors import ActcompError
from .ops.code import coded_nbytes, decode, encode
from .ops.conv import pool_blocks, pooled_nbytes, resolve_padding, unpool_blocks

__all__ = ["CANDIDATES", "BudgetPlan", "budget_spec", "check_budget", "config_for_budget", "conv_input_fraction", "plan_budget"]

# (name, block b, code bits or None); bytes per fp32 input element: 4, 1, 0.5, 0.25, 0.25, 0.25, 0.125,
# 0.0625, 0.0625, 0.03125 (coded ones + 8 B per group).
CANDIDATES: tuple[tuple[str, int, int | None], ...] = (
    ("native", 1, None), ("q8", 1, 8), ("q4", 1, 4), ("q2", 1, 2), ("p2q8", 2, 8), ("pool4", 4, None),
    ("p2q4", 2, 4), ("p2q2", 2, 2), ("p4q8", 4, 8), ("p4q4", 4, 4),
)


@dataclass
class BudgetPlan:
    """What :func:`plan_budget` chose: per conv layer its candidate, bytes and measured error."""

    config: CompressionConfig
    choice: dict[str, str]          # layer -> candidate name
    error: dict[str, float]         # layer -> relative squared weight-gradient error of the choice
    native_bytes: int               # conv-input bytes saved natively (every recorded conv)
    planned_bytes: int              # conv-input bytes under the choice

    @property
    def fraction(self) -> float:
        return self.planned_bytes / self.native_bytes


class _Capture(TorchFunctionMode):
    """Records the first ``F.conv2d`` call of each Conv2d module (its exact arguments, after timm's own padding
    or weight standardization) and hooks its output gradient."""

    def __init__(self, convs: dict[nn.Module, str], grads: bool):
        super().__init__()
        self.convs, self.grads, self.current, self.calls = convs, grads, None, {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = self.current
        if func is F.conv2d and name is not None and name not in self.calls:
            vals = dict(zip(["input", "weight", "bias", "stride", "padding", "dilation", "groups"], args))
            vals.update(kwargs)
            x, w = vals["input"], vals["weight"]
            if x.dim() == 4:
                rec = dict(x=x.detach(), w=w.detach(), stride=vals.get("stride", 1), padding=vals.get("padding", 0),
                           dilation=vals.get("dilation", 1), groups=vals.get("groups", 1), dy=None)
                self.calls[name] = rec
                if self.grads and out.requires_grad:
                    out.register_hook(lambda g, rec=rec: rec.__setitem__("dy", g.detach()))
        return out


def _run_capture(model: nn.Module, x: torch.Tensor, grads: bool, loss_fn=None) -> dict[str, dict]:
    convs = {m: n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    mode = _Capture(convs, grads)
    handles = []
    for m, n in convs.items():
        handles.append(m.register_forward_pre_hook(lambda mod, a, n=n: setattr(mode, "current", n)))
        handles.append(m.register_forward_hook(lambda mod, a, o: setattr(mode, "current", None)))
    try:
        with mode:
            out = model(x)
        if grads:
            loss_fn(out).backward()
    finally:
        for h in handles:
            h.remove()
    return mode.calls


def _weight_grad(x, dy, rec) -> torch.Tensor:
    w = rec["w"]
    sym, extra = resolve_padding(rec["padding"], w.shape, rec["dilation"])
    if extra != (0, 0):
        x = F.pad(x, (0, extra[1], 0, extra[0]))
    return torch.ops.aten.convolution_backward(
        dy.float(), x.float(), w.float(), None, list(_pair(rec["stride"])), list(sym), list(_pair(rec["dilation"])),
        False, [0, 0], rec["groups"], (False, True, False))[1]


def _decoded(x: torch.Tensor, block: int, bits: int | None) -> torch.Tensor:
    p = pool_blocks(x, block, "avg") if block > 1 else x
    if bits is not None:
        p = decode(*encode(p, bits), bits, p.shape, x.dtype)
    return unpool_blocks(p, block, tuple(x.shape[-2:]))


def _nbytes(shape, itemsize: int, block: int, bits: int | None) -> int:
    if bits is None:
        return pooled_nbytes(shape, block, itemsize)
    pooled = shape if block == 1 else (*shape[:2], -(-shape[2] // block), -(-shape[3] // block))
    return coded_nbytes(pooled, bits)


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).square().sum() / ref.double().square().sum()).item()


def check_budget(budget) -> float:
    """``budget`` as a float in (0, 1], or a one-line ActcompError."""
    if isinstance(budget, bool) or not isinstance(budget, numbers.Real) or not 0 < float(budget) <= 1:
        raise ActcompError(f"budget must be a number in (0, 1] (a fraction of the native conv-input saved bytes), "
                           f"got {budget!r}")
    return float(budget)


def plan_budget(model: nn.Module, example_input: torch.Tensor, budget: float, *, target: torch.Tensor | None = None,
                seed: int = 0, base: str = "none", candidates=CANDIDATES, name: str | None = None) -> BudgetPlan:
    """Choose per conv layer a compressor among ``candidates`` so the conv-input saved bytes fit
    ``budget`` × native, keeping the summed relative weight-gradient error low (see the module docstring).

    ``example_input``: the calibration batch (its shape fixes the bytes); ``target``: class labels for a
    cross-entropy loss (default: the outputs summed with fixed random weights drawn from ``seed``). ``model`` is
    not modified (a native deep copy runs). Returns a :class:`BudgetPlan`; its ``config`` goes to ``compress``.
    """
    budget = check_budget(budget)
    if base not in ("none", "full"):
        raise ActcompError(f"base must be 'none' or 'full', got {base!r}")
    if not isinstance(model, nn.Module):
        raise ActcompError(f"plan_budget() needs a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(example_input, torch.Tensor) or example_input.device.type == "meta":
        raise ActcompError("plan_budget() needs a real calibration batch (a tensor on cpu or cuda) as example_input")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ActcompError(f"seed must be an int, got {seed!r}")
    from .convert import restore  # here: convert imports this module lazily

    ref = restore(copy.deepcopy(model)).train()
    dev = example_input.device
    with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
        torch.manual_seed(seed)

        def loss_fn(out):
            if isinstance(out, (tuple, list)):
                out = out[0]
            if target is not None:
                return F.cross_entropy(out, target)
            return (out * torch.randn(out.shape, device=out.device, dtype=out.dtype)).sum()

        with torch.enable_grad():
            calls = _run_capture(ref, example_input, True, loss_fn)
        if not calls:
            raise ActcompError(f"plan_budget(): {type(model).__name__} ran no Conv2d on the calibration batch")
        layers = []  # (name, [(cand, bytes, error)])
        for lname, rec in calls.items():
            x, dy = rec.pop("x"), rec.pop("dy")
            shape, item = tuple(x.shape), x.element_size()
            opts = []
            dw = _weight_grad(x, dy, rec) if dy is not None else None
            by_input = dw is None or not dw.any()
            for cname, b, bits in candidates:
                if b > 1 and (shape[2] < b or shape[3] < b):
                    continue  # compress() would leave it native
                if cname == "native" or (b == 1 and bits is None):
                    opts.append((cname, b, bits, math.prod(shape) * item, 0.0))
                    continue
                xh = _decoded(x, b, bits)
                err = _rel(xh, x) if by_input else _rel(_weight_grad(xh, dy, rec), dw)
                opts.append((cname, b, bits, _nbytes(shape, item, b, bits), err))
            if not opts:  # every candidate pools by more than the map: compress() leaves such a conv native
                opts.append(("native", 1, None, math.prod(shape) * item, 0.0))
            layers.append((lname, math.prod(shape) * item, opts))
            del x, dy, dw
    native = sum(nb for _, nb, _ in layers)
    cur = {lname: max(range(len(opts)), key=lambda i: (opts[i][3], -opts[i][4])) for lname, _, opts in layers}
    total = sum(opts[cur[lname]][3] for lname, _, opts in layers)
    limit = budget * native
    while total > limit:
        best = None
        for li, (lname, _, opts) in enumerate(layers):
            c = opts[cur[lname]]
            for i, o in enumerate(opts):
                if o[3] < c[3]:
                    key = ((o[4] - c[4]) / (c[3] - o[3]), li, i)
                    if best is None or key < best[0]:
                        best = (key, lname, i)
        if best is None:
            lowest = sum(min(o[3] for o in opts) for _, _, opts in layers) / native
            raise ActcompError(f"budget {budget:g} is below what the candidates reach on this model and input "
                               f"({lowest:.4f} of the native conv-input bytes)")
        _, lname, i = best
        opts = next(o for n, _, o in layers if n == lname)
        total -= opts[cur[lname]][3] - opts[i][3]
        cur[lname] = i
    chosen = {lname: opts[cur[lname]] for lname, _, opts in layers}
    # exact names as patterns (escaped: a glob character in a name must match only itself)
    blocks = {glob.escape(n): o[1] for n, o in chosen.items() if o[1] > 1}
    bits = {glob.escape(n): o[2] for n, o in chosen.items() if o[2] is not None}
    errors = {n: o[4] for n, o in chosen.items()}
    full = get_preset("full4")
    extra = {k: getattr(full, k) for k in ("relu", "act", "norm", "pool", "linear", "mul")} if base == "full" else {}
    cfg = CompressionConfig(name=name or f"{'full_' if base == 'full' else ''}budget{budget:g}", block=blocks or 1,
                            conv_bits=bits or None, grad_error=errors, **extra,
                            description=f"per-layer codes for {budget:g} of the native conv-input bytes "
                                        f"(plan_budget, seed {seed})")
    return BudgetPlan(cfg, {n: o[0] for n, o in chosen.items()}, errors, native, total)


_NAMED = re.compile(r"(full_)?budget(\d*\.?\d+(?:e-?\d+)?)")


def budget_spec(spec) -> dict | None:
    """The planning arguments a compression spec asks for, or None if it is not a budget spec.

    ``"budget0.25"`` / ``"full_budget0.25"`` (a named budget preset), or a mapping with a ``budget`` key and
    optionally ``seed``, ``base`` ("none"/"full") and any whole-set option of CompressionConfig.
    """
    if isinstance(spec, str):
        m = _NAMED.fullmatch(spec)
        return dict(budget=float(m.group(2)), base="full" if m.group(1) else "none") if m else None
    if isinstance(spec, Mapping) and "budget" in spec:
        return dict(spec)
    return None


def config_for_budget(model: nn.Module, spec: dict, example_input, target=None) -> CompressionConfig:
    """compress()'s path for a budget spec: plan on ``example_input``, then apply the spec's other options."""
    d = dict(spec)
    budget = d.pop("budget")
    if example_input is None:
        raise ActcompError(f"a budget spec ({budget!r}) needs a calibration batch: "
                           "actcomp.compress(model, spec, example_input=x)")
    kw = {k: d.pop(k) for k in ("seed", "base") if k in d}
    if "preset" in d:
        raise ActcompError("a budget spec takes no preset; use base='full' for the whole-set compression")
    plan = plan_budget(model, example_input, budget, target=target, **kw)
    return plan.config.replace(**d) if d else plan.config


def conv_input_fraction(model: nn.Module, example_input: torch.Tensor) -> float:
    """Conv-input saved bytes of ``model`` as converted, over native: ``summary``'s conv rows plus the native
    bytes of convs it left alone, over every conv's native input bytes (one forward, any device)."""
    from .convert import summary

    was_training = model.training
    try:
        model.eval()  # only shapes are needed: leave BatchNorm running statistics alone
        with torch.no_grad():
            calls = _run_capture(model, example_input, False)
    finally:
        model.train(was_training)
    native = {n: r["x"].numel() * r["x"].element_size() for n, r in calls.items()}
    rows = summary(model, example_input)
    rows = rows[rows.op == "conv2d"].groupby("layer").first()
    got = {n: int(rows.loc[n, "saved_bytes_compressed"]) if n in rows.index else b for n, b in native.items()}
    return sum(got.values()) / sum(native.values())
