"""Linear layer and broadcast gating multiply with an 8-bit saved input.

Linear: output exact; input gradient exact (dy @ W); bias gradient exact; weight gradient uses x̂
(uint8 per group, |x - x̂| <= group range / 510; error measured by ``python -m benchmarks.exactness``).
Scale multiply ``x * s`` with a small broadcast ``s`` (squeeze-excite gate (N, C, 1, 1), layer-scale gamma):
output exact; gradient to x exact (dy * s); gradient to s uses x̂.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import dequantize_uint8, quantize_uint8


class Int8Linear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, stochastic, name):
        y = F.linear(x, weight, bias)
        q, lo, scale = quantize_uint8(x, stochastic)
        ctx.dtype, ctx.has_bias, ctx.actcomp_name, ctx.kind = x.dtype, bias is not None, name, "linear input"
        ctx.save_for_backward(q, lo, scale, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, lo, scale, weight = ctx.saved_tensors
        dx = dw = db = None
        if ctx.needs_input_grad[0]:
            dx = dy.matmul(weight.to(dy.dtype)).to(ctx.dtype)
        if ctx.needs_input_grad[1]:
            x = dequantize_uint8(q, lo, scale, ctx.dtype)
            dw = dy.reshape(-1, dy.shape[-1]).t().matmul(x.reshape(-1, x.shape[-1]).to(dy.dtype)).to(weight.dtype)
        if ctx.has_bias and ctx.needs_input_grad[2]:
            db = dy.reshape(-1, dy.shape[-1]).sum(0).to(weight.dtype)
        return dx, dw, db, None, None


class Int8ScaleMul(torch.autograd.Function):
    """``x * s`` where ``s`` is small and broadcasts to ``x`` (squeeze-excite gate, layer-scale gamma)."""

    @staticmethod
    def forward(ctx, x, scale, stochastic, name):
        q, lo, sc = quantize_uint8(x, stochastic)
        ctx.dtype, ctx.actcomp_name, ctx.kind = x.dtype, name, "mul"
        ctx.save_for_backward(q, lo, sc, scale)
        return x * scale

    @staticmethod
    def backward(ctx, dy):
        q, lo, sc, scale = ctx.saved_tensors
        dx = ds = None
        if ctx.needs_input_grad[0]:
            dx = dy * scale
        if ctx.needs_input_grad[1]:
            x = dequantize_uint8(q, lo, sc, ctx.dtype)
            ds = (dy * x).sum_to_size(scale.shape)
        return dx, ds, None, None
