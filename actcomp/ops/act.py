"""Smooth activations with an 8-bit code of the input and a closed-form derivative in backward.

Forward: the original call, so the output is exact. Saved: the uint8 code of the input
(:func:`quant.quantize_uint8`), the same bytes as before. Backward: the derivative evaluated directly at the decoded
input x̃ by the native derivative kernels autograd itself uses — SiLU σ(x)(1 + x(1 − σ(x))), GELU (erf and tanh
approximations), Sigmoid σ(1 − σ), Tanh 1 − tanh², Hardswish and Hardsigmoid (piecewise), Mish, ELU/SELU/CELU —
with no re-run of the op under autograd. The gradient is that of the op at x̃, |x − x̃| <= (max − min)/510 per code
group: the contract of the recompute this replaces. After a BatchNorm in training mode the code may be given
instead (``code=(q, lo, scale)``, the norm input's code mapped through its per-channel affine, see
``norm.output_code``): the same uint8 tensor the norm saves, so it costs 8 bytes per group and no quantize pass;
the bound is the same, |a|·(max − min)/510 for the norm's y = a·x + c.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ActcompError
from .quant import dequantize_uint8, quantize_uint8

__all__ = ["ClosedFormActivation", "CLOSED_FORM_ACTS", "activation"]

_aten = torch.ops.aten

# SELU's constants, as torch.nn.functional.selu uses them.
_SELU_ALPHA, _SELU_SCALE = 1.6732632423543772848170429916717, 1.0507009873554804934193349852946


def _forward(op: str, x: torch.Tensor, p: tuple) -> torch.Tensor:
    if op == "silu":
        return F.silu(x)
    if op == "gelu":
        return F.gelu(x, approximate=p[0])
    if op == "hardswish":
        return F.hardswish(x)
    if op == "hardsigmoid":
        return F.hardsigmoid(x)
    if op == "sigmoid":
        return torch.sigmoid(x)
    if op == "tanh":
        return torch.tanh(x)
    if op == "mish":
        return F.mish(x)
    if op == "elu":
        return F.elu(x, p[0])
    if op == "celu":
        return F.celu(x, p[0])
    return F.selu(x)


def _derivative(op: str, dy: torch.Tensor, x: torch.Tensor, p: tuple) -> torch.Tensor:
    if op == "silu":
        return _aten.silu_backward(dy, x)
    if op == "gelu":
        return _aten.gelu_backward(dy, x, approximate=p[0])
    if op == "hardswish":
        return _aten.hardswish_backward(dy, x)
    if op == "hardsigmoid":
        return _aten.hardsigmoid_backward(dy, x)
    if op == "sigmoid":
        return _aten.sigmoid_backward(dy, torch.sigmoid(x))
    if op == "tanh":
        return _aten.tanh_backward(dy, torch.tanh(x))
    if op == "mish":
        return _aten.mish_backward(dy, x)
    if op == "elu":
        return _aten.elu_backward(dy, p[0], 1.0, 1.0, False, x)
    if op == "celu":
        return _aten.elu_backward(dy, p[0], 1.0, 1.0 / p[0], False, x)
    return _aten.elu_backward(dy, _SELU_ALPHA, _SELU_SCALE, 1.0, False, x)


CLOSED_FORM_ACTS = ("silu", "gelu", "hardswish", "hardsigmoid", "sigmoid", "tanh", "mish", "elu", "celu", "selu")


class ClosedFormActivation(torch.autograd.Function):
    """``apply(op, params, stochastic, name, x, q, lo, scale)``; ``op`` one of :data:`CLOSED_FORM_ACTS`,
    ``params``: GELU's ``(approximate,)``, ELU's/CELU's ``(alpha,)``, else ``()``; ``q, lo, scale``: x's code if
    known already (saved as given), else None (x is quantized here)."""

    @staticmethod
    def forward(ctx, op, params, stochastic, name, x, q, lo, scale):
        y = _forward(op, x, params)
        if q is None:
            q, lo, scale = quantize_uint8(x, stochastic)
        ctx.op, ctx.params, ctx.dtype, ctx.kind, ctx.actcomp_name = op, params, x.dtype, "activation", name
        ctx.save_for_backward(q, lo, scale)
        return y

    @staticmethod
    def backward(ctx, dy):
        if not ctx.needs_input_grad[4]:
            return None, None, None, None, None, None, None, None
        q, lo, scale = ctx.saved_tensors
        x = dequantize_uint8(q, lo, scale, ctx.dtype)
        # autocast is off in backward: dy may be fp32 while x is bf16/fp16 (and vice versa)
        return None, None, None, None, _derivative(ctx.op, dy.to(x.dtype), x, ctx.params), None, None, None


def activation(op: str, x: torch.Tensor, params: tuple = (), stochastic: bool = False, name: str = "", code=None):
    """The activation ``op`` of x exactly; backward: its closed-form derivative at the uint8-coded x (``code``:
    x's ``(q, lo, scale)`` when known, e.g. from the BatchNorm that produced x; else x is quantized here)."""
    if op not in CLOSED_FORM_ACTS:
        raise ActcompError(f"no closed-form derivative for {op!r}; known: {', '.join(CLOSED_FORM_ACTS)}")
    return ClosedFormActivation.apply(op, tuple(params), stochastic, name, x, *(code or (None, None, None)))
