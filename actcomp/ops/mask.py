"""ReLU-family activations that save a 1-bit mask instead of a full tensor.

Exact: the gradient of ReLU, ReLU6 (hardtanh) and LeakyReLU depends only on which elements were in the
linear region, so the mask reproduces the native gradient bitwise. In-place calls stay in place, so the
full-size tensor is not kept alive by the activation.

Under ``torch.compile`` an in-place call runs out of place and copies the result back into ``x``: dynamo
mishandles ``mark_dirty`` on a tensor that enters the graph as an input (which any graph break before the
activation causes, e.g. a BatchNorm recomputed from int8 just before it): the returned alias bypasses this
function's backward and the gradient skips the mask. A plain ``copy_`` is functionalized correctly.

Under ``torch.compile`` the mask is packed by an opaque custom op (:func:`region_bits`, the eager kernels). Traced
as plain ops, Inductor's partitioner either saves the comparison as a bool tensor, whose stores Inductor's CPU code
writes about 10x slower than a ReLU, or recomputes compare + pack + unpack inside the backward kernels; the opaque
op is saved as it is.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .quant import pack_bits, unpack_bits


def _region(x: torch.Tensor, lo: float, hi: float | None) -> torch.Tensor:
    """Where lo < x (< hi): the linear region of the ReLU family (no upper bound, None, for ReLU and LeakyReLU)."""
    return x > lo if hi is None else (x > lo) & (x < hi)


@torch.library.custom_op("actcomp::region_bits", mutates_args=())
def region_bits(x: torch.Tensor, lo: float, hi: float | None) -> torch.Tensor:
    """pack_bits(lo < x (< hi)): one op the compiler cannot split (see the module docstring)."""
    return pack_bits(_region(x, lo, hi))


@region_bits.register_fake
def _(x, lo, hi):
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


class MaskedActivation(torch.autograd.Function):
    kind = "activation"

    @staticmethod
    def forward(ctx, x, fn, lo, hi, slope, inplace, name):
        # lo < x < hi: where the gradient passes unchanged; elsewhere it is multiplied by slope.
        mask = region_bits(x, lo, hi) if torch.compiler.is_compiling() else pack_bits(_region(x, lo, hi))
        ctx.shape, ctx.slope, ctx.actcomp_name, ctx.kind = x.shape, slope, name, "activation"
        ctx.save_for_backward(mask)
        if inplace:
            fn(x, True)
            ctx.mark_dirty(x)
            return x
        return fn(x, False)

    @staticmethod
    def backward(ctx, dy):
        (mask,) = ctx.saved_tensors
        if ctx.slope == 0.0 and dy.is_floating_point():
            # The mask as 0/1 in dy's dtype: one dtype, no casting loop. dy * 1 == dy and dy * 0 == ±0 bitwise,
            # as the bool-mask product gave. In place (one allocation) when that keeps dy's layout (a later
            # BatchNorm backward sums in layout order: channels_last must stay channels_last).
            m = unpack_bits(mask, ctx.shape, dy.dtype)
            return (m.mul_(dy) if dy.is_contiguous() else dy * m), None, None, None, None, None, None
        m = unpack_bits(mask, ctx.shape)
        if ctx.slope == 0.0:
            dx = dy * m
        else:
            dx = torch.where(m, dy, dy * ctx.slope)
        return dx, None, None, None, None, None, None


def _apply(x, fn, lo, hi, slope, inplace, name):
    if inplace and torch.compiler.is_compiling():
        return x.copy_(MaskedActivation.apply(x, fn, lo, hi, slope, False, name))
    return MaskedActivation.apply(x, fn, lo, hi, slope, inplace, name)


def relu(x, inplace=False, name=""):
    return _apply(x, lambda t, ip: F.relu(t, inplace=ip), 0.0, None, 0.0, inplace, name)


def hardtanh(x, min_val=-1.0, max_val=1.0, inplace=False, name=""):
    return _apply(
        x, lambda t, ip: F.hardtanh(t, min_val, max_val, inplace=ip), float(min_val), float(max_val), 0.0, inplace,
        name,
    )


def leaky_relu(x, negative_slope=0.01, inplace=False, name=""):
    return _apply(
        x, lambda t, ip: F.leaky_relu(t, negative_slope, inplace=ip), 0.0, None, float(negative_slope),
        inplace, name,
    )
