"""2-D convolution that saves a packed integer code of its (optionally b×b-pooled) input for the weight gradient.

Exactness (stated per output):
- forward output: exact; it is the very ``F.conv2d`` call the module would make.
- input gradient and bias gradient: exact; they need only the weight and the output gradient.
- weight gradient: from the decoded (then nearest-upsampled, when pooled) input. The code is per group affine,
  ``x̂ = lo + q·scale`` with ``q`` in ``[0, 2^bits - 1]``, and rounded stochastically, so it is unbiased:
  ``E[x̂] = pool_b(x)`` (``x`` itself at b=1). The weight gradient is linear in the saved input, so its
  expectation is the gradient from the uncoded (pooled) input: exact in expectation at b=1. Measured relative L2
  error of one draw's weight gradient (``python -m benchmarks.exactness "conv_presets=[pool2,pool4,q8,q4,q2,p2q8,
  p2q4]" "presets=[]" "parts=[ops]"``; 3×3 conv 1→32 on 16 Fashion-MNIST test images at 32 px): 8 bits 0.003,
  4 bits 0.049, 2 bits 0.287; 2×2 pool + 8 bits 0.270 (pool2 alone 0.270, pool4 0.466).

Groups: one (n, c) plane when the (pooled) plane has >= 64 elements, else one channel over N·H·W (as the uint8
codes of the other ops): activations differ in scale mostly between channels, and an (n, c) plane is a
contiguous row, so grouping needs no copy. Measured on the conv inputs of a timm ResNet-18 (random init, 32
Fashion-MNIST test images at 64 px), one draw: per-plane groups decode with a relative L2 error of 0.0042 / 0.071
/ 0.355 at 8 / 4 / 2 bits, per-channel groups over the batch 0.0052 / 0.088 / 0.438. ``lo``/``scale`` are fp32,
8 bytes per group.

Packing: ``8 // bits`` codes per byte over the flattened code tensor (zero-padded once at the end), so a
4-bit code of ``n`` elements takes ``ceil(n / 2)`` bytes and a 2-bit code ``ceil(n / 4)``. The packed uint8
tensor is what autograd keeps, so the saved-bytes walk and the meta-device prediction see the packed size.

Random numbers come from torch's default generator of the tensor's device (``torch.rand``), so a run is
bitwise reproducible under ``torch.manual_seed``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .blockgrad import block_weight_grad
from .conv import (
    block_grad_factor,
    pointwise_factor,
    pool_blocks,
    pooled_weight_grad,
    resolve_padding,
    unpool_blocks,
)

__all__ = ["BITS", "CodedConv2d", "code_groups", "coded_nbytes", "decode", "encode", "pack_codes", "unpack_codes"]

BITS = (8, 4, 2)
MIN_PLANE = 64  # an (n, c) plane smaller than this is grouped per channel: 8 bytes per group would dominate


def code_groups(shape) -> tuple[int, int]:
    """(groups, elements per group) of an NCHW tensor's code (see the module docstring)."""
    n, c, h, w = shape
    if h * w >= MIN_PLANE or n == 1:
        return n * c, h * w
    return c, n * h * w


def _per_channel(shape) -> bool:
    return code_groups(shape)[0] != shape[0] * shape[1]


def _rows(x: torch.Tensor) -> torch.Tensor:
    if _per_channel(x.shape):
        return x.transpose(0, 1).reshape(x.shape[1], -1)  # a copy; only for maps under 64 pixels
    return x.reshape(code_groups(x.shape))


def _unrows(r: torch.Tensor, shape) -> torch.Tensor:
    n, c, h, w = shape
    if _per_channel(shape):
        return r.view(c, n, h, w).transpose(0, 1)
    return r.view(shape)


def _check_bits(bits) -> int:
    if bits not in BITS or isinstance(bits, bool):
        raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {bits!r}")
    return bits


def _shifts(bits: int, device) -> torch.Tensor:
    return torch.arange(0, 8, bits, device=device, dtype=torch.uint8)


def pack_codes(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes < 2**bits into a flat uint8 tensor, ``8 // bits`` per byte (zero-padded at the end)."""
    per = 8 // _check_bits(bits)
    flat = q.reshape(-1)
    if per == 1:
        return flat
    pad = (-flat.numel()) % per
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    # disjoint bit fields, so the sum is their bitwise OR
    return (flat.view(-1, per) << _shifts(bits, flat.device)).sum(dim=1, dtype=torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, numel: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes, flat uint8."""
    if _check_bits(bits) == 8:
        return packed[:numel]
    q = (packed.unsqueeze(1) >> _shifts(bits, packed.device)) & (2**bits - 1)
    return q.reshape(-1)[:numel]


def coded_nbytes(shape, bits: int) -> int:
    """Bytes :func:`encode` keeps for an NCHW tensor of ``shape``: packed codes + 8 bytes (lo, scale) per group."""
    groups, per = code_groups(tuple(shape))
    return -(-groups * per * _check_bits(bits) // 8) + 8 * groups


def encode(x: torch.Tensor, bits: int):
    """Stochastically rounded per-group affine code of an NCHW tensor: ``(packed, lo, scale)``.

    ``E[decode(encode(x))] = x`` (up to float rounding); each element is off by less than one step
    ``scale = (max - min) / (2^bits - 1)`` of its group.
    """
    levels = 2 ** _check_bits(bits) - 1
    r = _rows(x.detach()).float()
    lo = r.amin(dim=1, keepdim=True)
    scale = ((r.amax(dim=1, keepdim=True) - lo) / levels).clamp_min(1e-12)
    v = (r - lo).div_(scale)  # in place after the one unavoidable temporary: keeps the forward peak down
    v = v.add_(torch.rand_like(v)).floor_().clamp_(0, levels).to(torch.uint8)
    # codes in group-row order; decode reads them back in the same order
    return pack_codes(v, bits), lo, scale


def decode(packed: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, bits: int, shape, dtype) -> torch.Tensor:
    groups, per = code_groups(tuple(shape))
    q = unpack_codes(packed, bits, groups * per).view(groups, per)
    return _unrows(q.float().mul_(scale).add_(lo), shape).to(dtype)


class CodedConv2d(torch.autograd.Function):
    """``y = conv2d(x, w, b)``; saves ``encode(pool_b(x), bits)`` (``encode(x, bits)`` at b=1) instead of ``x``."""

    kind = "conv input"

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, block, mode, bits, name):
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        sym, extra = resolve_padding(padding, weight.shape, dilation)
        ctx.conf = (_pair(stride), sym, extra, _pair(dilation), groups, block, bits)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.has_bias = bias is not None
        ctx.actcomp_name, ctx.kind = name, "conv input"
        p = pool_blocks(x.detach(), block, mode) if block > 1 else x.detach()
        ctx.p_shape = p.shape
        packed, lo, scale = encode(p, bits)
        ctx.save_for_backward(packed, lo, scale, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        packed, lo, scale, weight = ctx.saved_tensors
        stride, sym, extra, dilation, groups, block, bits = ctx.conf
        n, c, h, w = ctx.x_shape
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = ctx.has_bias and ctx.needs_input_grad[2]
        dx = dw = db = None
        f = pointwise_factor(weight.shape, stride, sym, extra, block)
        if need_w and f is not None:  # the exact 1x1 shortcut (conv.pooled_weight_grad): no full-size x̂
            x_low = decode(packed, lo, scale, bits, ctx.p_shape, dy.dtype)
            dw = pooled_weight_grad(dy, x_low, weight.to(dy.dtype), groups, f).to(weight.dtype)
        fb = block_grad_factor(dy, weight.shape, stride, sym, extra, dilation, groups, block, (h, w))
        if need_w and f is None and fb is not None:  # k×k: the weight gradient at block resolution (blockgrad.py)
            x_low = decode(packed, lo, scale, bits, ctx.p_shape, dy.dtype)
            dw = block_weight_grad(dy, x_low, weight.shape, stride, sym, groups, fb).to(weight.dtype)
        mask = (need_x, need_w and dw is None, need_b)
        if any(mask):
            if mask[1]:
                x_hat = unpool_blocks(decode(packed, lo, scale, bits, ctx.p_shape, dy.dtype), block, (h, w))
                if extra != (0, 0):
                    x_hat = F.pad(x_hat, (0, extra[1], 0, extra[0]))
            else:  # not read when the weight gradient is not requested; zeros, never uninitialized memory
                x_hat = dy.new_zeros(()).expand(n, c, h + extra[0], w + extra[1])
            bias_sizes = [weight.shape[0]] if ctx.has_bias else None
            # Under autocast dy is bf16/fp16 while x and w are fp32: compute in dy's dtype, as the native conv did.
            gx, gw, gb = torch.ops.aten.convolution_backward(
                dy, x_hat, weight.to(dy.dtype), bias_sizes, list(stride), list(sym), list(dilation), False, [0, 0],
                groups, mask)
            if need_x:
                dx = (gx[..., :h, :w] if extra != (0, 0) else gx).to(ctx.x_dtype)
            if mask[1]:
                dw = gw.to(weight.dtype)
            if need_b:
                db = gb.to(weight.dtype)
        return dx, dw, db, None, None, None, None, None, None, None, None
