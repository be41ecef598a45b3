"""Save an 8-bit code of an op's input and recompute the op from it in backward.

Used for activations that need values (SiLU, GELU, Hardswish, Sigmoid, ...) and for normalization layers
(BatchNorm, LayerNorm, GroupNorm). Forward output: exact (the original call). Gradients: those of the op
evaluated at x̂, where |x - x̂| <= (max - min)/510 per group (see ``quant.group_shape``: an (n, c) plane,
a token row, or a sample). Relative L2 gradient errors per op are measured by ``python -m benchmarks.exactness``
(results/exactness/exactness.csv); tests bound them at 2% (Hardswish 6%: a code can cross a kink of its
derivative). BatchNorm running statistics are updated exactly once, in the forward pass; the
recomputation in backward uses batch statistics of x̂ and never touches the buffers.
"""
from __future__ import annotations

import torch

from .quant import dequantize_uint8, quantize_uint8


class RecomputeFromInt8(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fwd, bwd, kind, stochastic, name, x, *params):
        y = fwd(x, *params)
        q, lo, scale = quantize_uint8(x, stochastic)
        ctx.bwd, ctx.dtype, ctx.kind, ctx.actcomp_name = bwd, x.dtype, kind, name
        ctx.save_for_backward(q, lo, scale, *params)
        return y

    @staticmethod
    def backward(ctx, dy):
        q, lo, scale, *params = ctx.saved_tensors
        need = ctx.needs_input_grad[5:]
        with torch.enable_grad():
            x = dequantize_uint8(q, lo, scale, ctx.dtype).requires_grad_(need[0])
            ps = [p.detach().requires_grad_(r) if p is not None else None for p, r in zip(params, need[1:])]
            y = ctx.bwd(x, *ps)
            wrt = [t for t, r in zip([x, *ps], need) if r and t is not None]
            # autocast is off in backward: y may be fp32 while dy is bf16/fp16 (and vice versa)
            grads = iter(torch.autograd.grad(y, wrt, dy.to(y.dtype), allow_unused=True)) if wrt else iter(())
        out = [next(grads) if r and t is not None else None for t, r in zip([x, *ps], need)]
        return (None, None, None, None, None, *out)


def recompute(fwd, bwd, kind, x, params=(), stochastic=False, name=""):
    """Apply ``fwd(x, *params)`` exactly; backward differentiates ``bwd`` at the int8-coded x."""
    return RecomputeFromInt8.apply(fwd, bwd, kind, stochastic, name, x, *params)
