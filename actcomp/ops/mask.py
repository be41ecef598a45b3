"""ReLU-family activations that save a 1-bit mask instead of a full tensor.

Exact: the gradient of ReLU, ReLU6 (hardtanh) and LeakyReLU depends only on which elements were in the
linear region, so the mask reproduces the native gradient bitwise. In-place calls stay in place, so the
full-size tensor is not kept alive by the activation.

Under ``torch.compile`` an in-place call runs out of place and copies the result back into ``x``: dynamo
mishandles ``mark_dirty`` on a tensor that enters the graph as an input (which any graph break before the
activation causes, e.g. a BatchNorm recomputed from int8 just before it): the returned alias bypasses this
function's backward and the gradient skips the mask. A plain ``copy_`` is functionalized correctly.

Under ``torch.compile`` the mask of the activation's *output* (the same region for every slope >= 0) is packed 8
channels per byte. For NCHW-contiguous activations with C % 8 == 0 the packing is plain pointwise ops
(:func:`pack_channels`) that Inductor fuses into the kernel making the activation. Otherwise an opaque custom op
does it (:func:`region_bits`, the eager kernels), in whatever layout Inductor chose (``flexible_layout``; under
channels_last the backward's unpack reads one byte for 8 consecutive elements); as an opaque op it is saved as
it is, where a plain bool comparison would be saved as a bool tensor, whose stores Inductor's CPU code writes about
10x slower than a ReLU. Same bytes as the flat packing.

Under ``torch.compile`` an activation of a native norm's untouched output saves nothing instead
(:class:`RegionRecomputed`): its region is recomputed in backward from the norm's own saved input.
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from .quant import _PACK_MAGIC, pack_bits, unpack_bits


def _region(x: torch.Tensor, lo: float, hi: float | None) -> torch.Tensor:
    """Where lo < x (< hi): the linear region of the ReLU family (no upper bound, None, for ReLU and LeakyReLU)."""
    return x > lo if hi is None else (x > lo) & (x < hi)


def _channel_packed(shape) -> bool:
    """Whether region_bits packs this shape along channels: NCHW with whole bytes of channels."""
    return len(shape) == 4 and shape[1] % 8 == 0


@torch.library.custom_op("actcomp::region_bits", mutates_args=(), tags=(torch._C.Tag.flexible_layout,))
def region_bits(x: torch.Tensor, lo: float, hi: float | None) -> torch.Tensor:
    """lo < x (< hi) packed into bits: one op the compiler cannot split (see the module docstring).

    NCHW with C % 8 == 0: (N, C/8, H, W), bit j of channel byte k is channel 8k + j. Otherwise the flat
    :func:`pack_bits` layout."""
    if not _channel_packed(x.shape):
        return pack_bits(_region(x, lo, hi))
    n, c, h, w = x.shape
    if x.is_contiguous(memory_format=torch.channels_last) and sys.byteorder == "little":
        # NHWC in memory: 8 consecutive channels are 8 consecutive bytes, one int64 multiply packs them.
        r = _region(x.permute(0, 2, 3, 1), lo, hi).reshape(-1)  # a view: the permute is dense
        packed = ((r.view(torch.int64) * _PACK_MAGIC) >> 56).to(torch.uint8)
        return _as_fake(packed.view(n, h, w, c // 8).permute(0, 3, 1, 2))
    r = _region(x, lo, hi).reshape(n, c // 8, 8, h, w).to(torch.uint8) << _channel_shifts(x.device)
    return _as_fake(r.sum(2, dtype=torch.uint8))


def pack_channels(x: torch.Tensor, lo: float, hi: float | None) -> torch.Tensor:
    """:func:`region_bits`' channel packing of an NCHW ``x`` in plain pointwise ops, for ``torch.compile``: each
    output byte ORs eight shifted compares, which Inductor fuses into the kernel that makes ``x`` (no pass of its
    own), and the partitioner keeps the packed bytes. (Summed over a size-8 dim instead, as region_bits does eagerly,
    Inductor's CPU reduction ran 3-5x slower than ATen, ad hoc.)"""
    n, c, h, w = x.shape
    v = _region(x, lo, hi).view(n, c // 8, 8, h, w)
    out = v[:, :, 0].to(torch.uint8)
    for j in range(1, 8):
        out = out | (v[:, :, j].to(torch.uint8) << j)
    return out


def _as_fake(t: torch.Tensor) -> torch.Tensor:
    # Exactly the fake's (standard contiguous) strides: compiled code views the result by them. .contiguous()
    # can keep odd strides on size-1 dims (H = W = 1), a clone in contiguous_format does not.
    return t.clone(memory_format=torch.contiguous_format)


@region_bits.register_fake
def _(x, lo, hi):
    if _channel_packed(x.shape):
        n, c, h, w = x.shape
        return x.new_empty((n, c // 8, h, w), dtype=torch.uint8)
    return x.new_empty(((x.numel() + 7) // 8,), dtype=torch.uint8)


def _channel_shifts(device) -> torch.Tensor:
    return torch.arange(8, device=device, dtype=torch.uint8).view(1, 1, 8, 1, 1)


def _unpack(mask: torch.Tensor, shape, dtype: torch.dtype) -> torch.Tensor:
    """The region as ``dtype`` 0/1 (or bool) of ``shape``, from either packing."""
    if mask.dim() == 4:  # region_bits' channel packing
        n, c8, h, w = mask.shape
        return ((mask.unsqueeze(2) >> _channel_shifts(mask.device)) & 1).reshape(n, c8 * 8, h, w).to(dtype)
    return unpack_bits(mask, shape, dtype)


class MaskedActivation(torch.autograd.Function):
    kind = "activation"

    @staticmethod
    def forward(ctx, x, fn, lo, hi, slope, inplace, name):
        # lo < x < hi: where the gradient passes unchanged; elsewhere it is multiplied by slope.
        ctx.shape, ctx.slope, ctx.actcomp_name, ctx.kind = x.shape, slope, name, "activation"
        if torch.compiler.is_compiling():  # out of place here (see _apply)
            y = fn(x, False)
            # For slope >= 0 the output is in the open region exactly where the input is (clamp, or sign kept).
            t = y if slope >= 0 else x
            plain = _channel_packed(t.shape) and t.is_contiguous()
            ctx.save_for_backward(pack_channels(t, lo, hi) if plain else region_bits(t, lo, hi))
            return y
        ctx.save_for_backward(pack_bits(_region(x, lo, hi)))
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
            m = _unpack(mask, ctx.shape, dy.dtype)
            return (m.mul_(dy) if dy.is_contiguous() else dy * m), None, None, None, None, None, None
        return _through(dy, _unpack(mask, ctx.shape, torch.bool), ctx.slope), None, None, None, None, None, None


def _through(dy: torch.Tensor, m: torch.Tensor, slope: float) -> torch.Tensor:
    """dy where the bool region ``m`` holds, ``slope`` * dy elsewhere (the product a bool-mask ReLU backward
    takes; a floating dy multiplies by m in its own dtype, as MaskedActivation's fast path does)."""
    if slope != 0.0:
        return torch.where(m, dy, dy * slope)
    return dy * (m.to(dy.dtype) if dy.is_floating_point() else m)


class RegionRecomputed(torch.autograd.Function):
    """Under ``torch.compile`` only, for an activation of a norm's output (``recompute`` in :func:`relu`): saves the
    activation's input and takes the region from it in backward, with the same product as
    :class:`MaskedActivation` (so the same bits). Inductor's partitioner then recomputes the input from what the
    norm saves anyway (its input and statistics) inside the norm's backward kernels: nothing saved, no extra pass.

    The partitioner's choice is empirical (tests/test_compile.py checks it): given the output (as the native ReLU
    backward is, through a view) it saves a bool mask instead, which Inductor's CPU code writes slowly; given the
    input of an in-place call, Dynamo hands backward the tensor after the copy back, with the same result. So an
    in-place call saves a clone of its input, which the partitioner recomputes and never writes."""

    kind = "activation"

    @staticmethod
    def forward(ctx, x, fn, lo, hi, slope, inplace, name):
        ctx.region, ctx.slope, ctx.actcomp_name, ctx.kind = (lo, hi), slope, name, "activation"
        ctx.save_for_backward(x.clone() if inplace else x)
        return fn(x, False)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _through(dy, _region(x, *ctx.region), ctx.slope), None, None, None, None, None, None


def _apply(x, fn, lo, hi, slope, inplace, name, recompute=False):
    if torch.compiler.is_compiling():  # out of place, copied back: see the module docstring
        if recompute:
            y = RegionRecomputed.apply(x, fn, lo, hi, slope, inplace, name)
        else:
            y = MaskedActivation.apply(x, fn, lo, hi, slope, False, name)
        return x.copy_(y) if inplace else y
    return MaskedActivation.apply(x, fn, lo, hi, slope, inplace, name)


# recompute=True (honoured under torch.compile only): x is a norm's output that nothing changed since, so the
# partitioner can rebuild it in backward from what the norm saves anyway (RegionRecomputed); otherwise packed bits.
def relu(x, inplace=False, name="", recompute=False):
    return _apply(x, lambda t, ip: F.relu(t, inplace=ip), 0.0, None, 0.0, inplace, name, recompute)


def hardtanh(x, min_val=-1.0, max_val=1.0, inplace=False, name="", recompute=False):
    return _apply(
        x, lambda t, ip: F.hardtanh(t, min_val, max_val, inplace=ip), float(min_val), float(max_val), 0.0, inplace,
        name, recompute,
    )


def leaky_relu(x, negative_slope=0.01, inplace=False, name="", recompute=False):
    return _apply(
        x, lambda t, ip: F.leaky_relu(t, negative_slope, inplace=ip), 0.0, None, float(negative_slope),
        inplace, name, recompute,
    )
