"""BatchNorm, LayerNorm and GroupNorm with an 8-bit code of the input and a closed-form backward.

Forward: the original call (``F.batch_norm``/``F.layer_norm``/``F.group_norm`` with the caller's arguments), so
the output is exact and BatchNorm's running statistics are updated exactly once, here. Saved: the uint8 code of the
input (:func:`quant.quantize_uint8`) and the affine parameters — the same bytes as before.

Backward: decode x̃, take the statistics (mean and 1/sqrt(var + eps) over the op's reduction dims, in fp32 as the
native kernels do) — BatchNorm in training mode: those of x itself, which its forward kernel returns anyway and the
op keeps (2 floats per channel; a strided var_mean of x̃ cost more than the whole BN); LayerNorm/GroupNorm: those of
x̃ — and call the native backward kernel (``native_batch_norm_backward``, ...), which evaluates the
standard closed form dx = γ·rstd·(dy − mean(dy) − x̂·mean(dy·x̂)), dγ = Σ dy·x̂, dβ = Σ dy. No forward of the op is
re-run and no autograd graph is built. The gradients are those of the op at x̃ (the contract of the recompute this
replaces, with BatchNorm's exact statistics). Why a code of x, and x̃'s statistics for LayerNorm/GroupNorm
(``python -m benchmarks.norm_variants`` measures the options): the exact forward statistics come out only marginally
closer (BatchNorm input gradient rel. L2 0.015% instead of 0.020%, weight gradient the same) but would cost 8 bytes
per normalized row for LayerNorm/GroupNorm (BatchNorm: per channel, nothing); a code of
x̂ = (x − mean)·rstd is the same code as that of x wherever a code group lies inside one normalized row (always for
BatchNorm and GroupNorm on maps of >= 64 pixels, LayerNorm over >= 64 features) and needs rstd per row besides.
Where a code group spans rows — LayerNorm over < 64 features, timm's LayerNorm2d (an NHWC image row of
positions) — rows of very different scale share one code and the small ones lose their precision (measured: an
input-gradient error 16–17× the gradient's norm on rows spread over 10⁻²..10², 0.2–0.3% at equal scales); coding x̂ would fix it for 4 bytes a row.
|x − x̃| <= (max − min)/510 per code group. BatchNorm in eval mode (running statistics) uses them in backward,
read when backward runs, as autograd of the native op would.

Shared code (BatchNorm in training mode, NCHW maps, ``share=True``): the output is y = a·x + c per channel
(a = γ·rstd, c = β − mean·a, from the forward statistics), so the input's code is also a code of the output,
ỹ = (a·lo + c) + q·(a·scale) per code group, with |y − ỹ| <= |a|·scale/2 — the same bound as a code of y made
directly (its range is |a| times x's). The activation after the norm (timm's BatchNormAct2d) saves that: the
same uint8 tensor and 8 bytes per group, no second quantize pass (:func:`output_code`).
"""
from __future__ import annotations

import torch

from .quant import dequantize_uint8, group_shape, quantize_uint8

__all__ = ["ClosedFormNorm", "batch_norm", "layer_norm", "group_norm", "output_code"]

_aten = torch.ops.aten


def _rstd(var: torch.Tensor, eps: float) -> torch.Tensor:
    return (var + eps).rsqrt()


def _bn_backward(dy, x, w, rm, rv, training, eps, mask, stats):
    if training:
        if stats is None:  # no forward statistics (a backend that does not return them): those of x̃
            dims = [0, *range(2, x.dim())]
            var, mean = torch.var_mean(x.float(), dims, correction=0)
            stats = mean, _rstd(var, eps)
        return _aten.native_batch_norm_backward(dy, x, w, None, None, *stats, True, eps, mask)
    return _aten.native_batch_norm_backward(dy, x, w, rm, rv, None, None, False, eps, mask)


def _ln_backward(dy, x, shape, w, b, eps, mask):
    dims = list(range(x.dim() - len(shape), x.dim()))
    var, mean = torch.var_mean(x.float(), dims, correction=0, keepdim=True)
    return _aten.native_layer_norm_backward(dy, x, shape, mean, _rstd(var, eps), w, b, mask)


def _gn_backward(dy, x, groups, w, eps, mask):
    n, c = x.shape[0], x.shape[1]
    hw = x.numel() // max(n * c, 1)
    var, mean = torch.var_mean(x.float().reshape(n, groups, -1), -1, correction=0)
    return _aten.native_group_norm_backward(dy, x, mean, _rstd(var, eps), w, n, c, hw, groups, mask)


def output_code(shape, lo, scale, w, b, stats):
    """(lo', scale') coding BatchNorm's output with the input's uint8 code: y = a·x + c per channel, so per code
    group lo' = a·lo + c and scale' = a·scale (negative where γ is). Empty where there is nothing to share: no
    forward statistics (eval mode) or not an NCHW map."""
    if not stats or len(shape) != 4:
        return lo[:0], scale[:0]
    mean, rstd = stats
    a = rstd if w is None else w.float() * rstd
    c = -mean * a if b is None else b.float() - mean * a
    if group_shape(shape)[0] != shape[1]:  # one group per (n, c) plane: row n*C + c (else one per channel)
        a, c = a.repeat(shape[0]), c.repeat(shape[0])
    return lo * a.unsqueeze(1) + c.unsqueeze(1), scale * a.unsqueeze(1)


class ClosedFormNorm(torch.autograd.Function):
    """``apply(op, args, stochastic, name, share, x, weight, bias)``; ``op``: "batch_norm" (args: running_mean,
    running_var, training, momentum, eps), "layer_norm" (normalized_shape, eps) or "group_norm" (groups, eps).
    ``share``: return ``(y, q, lo', scale')``, the output's code from the input's (:func:`output_code`;
    non-differentiable), instead of ``y``."""

    @staticmethod
    def forward(ctx, op, args, stochastic, name, share, x, w, b):
        stats = ()
        if op == "batch_norm":
            rm, rv, training, momentum, eps = args
            # The op F.batch_norm dispatches to (same output, same running-statistics update), which also returns
            # the batch mean and 1/sqrt(var + eps) its own backward would use: kept (2 floats per channel), the
            # backward needs no reduction over the decoded input (a strided var_mean cost more than the BN).
            y, mean, rstd, _, _ = _aten._batch_norm_impl_index(x, w, b, rm, rv, training, momentum, eps,
                                                               torch.backends.cudnn.enabled)
            if training and mean.numel() == x.shape[1] and rstd.numel() == x.shape[1]:
                stats = (mean, rstd)
        elif op == "layer_norm":
            y = torch.nn.functional.layer_norm(x, args[0], w, b, args[1])
        else:
            y = torch.nn.functional.group_norm(x, args[0], w, b, args[1])
        q, lo, scale = quantize_uint8(x, stochastic)
        ctx.op, ctx.args, ctx.dtype, ctx.kind, ctx.actcomp_name = op, args, x.dtype, "norm input", name
        ctx.save_for_backward(q, lo, scale, w, b, *stats)
        if not share:
            return y
        lo2, scale2 = output_code(x.shape, lo, scale, w, b, stats)
        ctx.mark_non_differentiable(q, lo2, scale2)
        # else autograd hands backward a zero gradient for each extra output: a full-size temporary for q
        ctx.set_materialize_grads(False)
        return y, q, lo2, scale2

    @staticmethod
    def backward(ctx, dy, *_):
        q, lo, scale, w, b, *stats = ctx.saved_tensors
        need = ctx.needs_input_grad[5:]
        mask = [need[0], need[1] and w is not None, need[2] and b is not None]
        if not any(mask) or dy is None:  # dy None: y's gradient is undefined (grads not materialized when shared)
            return None, None, None, None, None, None, None, None
        x = dequantize_uint8(q, lo, scale, ctx.dtype)
        # autocast is off in backward: dy may be fp32 while x is bf16/fp16 (and vice versa)
        dy = dy.to(x.dtype)
        if ctx.op == "batch_norm":
            rm, rv, training, _, eps = ctx.args
            dx, dw, db = _bn_backward(dy, x, w, rm, rv, training, eps, mask, tuple(stats) or None)
        elif ctx.op == "layer_norm":
            dx, dw, db = _ln_backward(dy, x, list(ctx.args[0]), w, b, ctx.args[1], mask)
        else:
            dx, dw, db = _gn_backward(dy, x, ctx.args[0], w, ctx.args[1], mask)
        return (None, None, None, None, None, dx if mask[0] else None, dw if mask[1] else None,
                db if mask[2] else None)


def batch_norm(x, running_mean, running_var, weight, bias, training, momentum, eps, stochastic=False, name="",
               share=False):
    """``F.batch_norm`` exactly; backward in closed form at the uint8-coded input. ``share``: return
    ``(y, q, lo', scale')``, y's code from x's (lo'/scale' empty where there is none, see :func:`output_code`)."""
    return ClosedFormNorm.apply("batch_norm", (running_mean, running_var, training, momentum, eps), stochastic,
                                name, share, x, weight, bias)


def layer_norm(x, normalized_shape, weight, bias, eps, stochastic=False, name=""):
    """``F.layer_norm`` exactly; backward in closed form at the uint8-coded input."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    return ClosedFormNorm.apply("layer_norm", (shape, eps), stochastic, name, False, x, weight, bias)


def group_norm(x, num_groups, weight, bias, eps, stochastic=False, name=""):
    """``F.group_norm`` exactly; backward in closed form at the uint8-coded input."""
    return ClosedFormNorm.apply("group_norm", (num_groups, eps), stochastic, name, False, x, weight, bias)
