"""Save an 8-bit code of an op's input and recompute the op from it in backward: the fallback.

The norms (ops/norm.py) and the smooth activations (ops/act.py) have closed-form backwards and no longer come
here; convert.py uses this only for an activation call whose arguments it does not recognise (e.g. a future
keyword of ``F.gelu``), which still gets the right gradient, just by re-running the op under autograd.
Forward output: exact (the original call). Gradients: those of the op evaluated at x̂, where
|x - x̂| <= (max - min)/510 per group (see ``quant.group_shape``: an (n, c) plane, a token row, or a sample).
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
        if torch.compiler.is_compiling():
            return (None, None, None, None, None, *_vjp_at_codes(ctx, q, lo, scale, params, need, dy))
        with torch.enable_grad():
            x = dequantize_uint8(q, lo, scale, ctx.dtype).requires_grad_(need[0])
            ps = [p.detach().requires_grad_(r) if p is not None else None for p, r in zip(params, need[1:])]
            y = ctx.bwd(x, *ps)
            wrt = [t for t, r in zip([x, *ps], need) if r and t is not None]
            # autocast is off in backward: y may be fp32 while dy is bf16/fp16 (and vice versa)
            grads = iter(torch.autograd.grad(y, wrt, dy.to(y.dtype), allow_unused=True)) if wrt else iter(())
        out = [next(grads) if r and t is not None else None for t, r in zip([x, *ps], need)]
        return (None, None, None, None, None, *out)


def _vjp_at_codes(ctx, q, lo, scale, params, need, dy):
    # torch.autograd.grad in a backward is a graph break for dynamo (and each break splits the model's graph);
    # torch.func.vjp computes the same gradients and traces into the compiled graph.
    x = dequantize_uint8(q, lo, scale, ctx.dtype)
    full = [x, *params]
    idx = [i for i, (t, r) in enumerate(zip(full, need)) if r and t is not None]
    if not idx:
        return [None] * len(full)

    def f(*wrt):
        args = list(full)
        for i, t in zip(idx, wrt):
            args[i] = t
        return ctx.bwd(*args)

    y, vjp_fn = torch.func.vjp(f, *[full[i].detach() for i in idx])
    grads = dict(zip(idx, vjp_fn(dy.to(y.dtype))))
    return [grads.get(i) for i in range(len(full))]


def recompute(fwd, bwd, kind, x, params=(), stochastic=False, name=""):
    """Apply ``fwd(x, *params)`` exactly; backward differentiates ``bwd`` at the int8-coded x."""
    return RecomputeFromInt8.apply(fwd, bwd, kind, stochastic, name, x, *params)
