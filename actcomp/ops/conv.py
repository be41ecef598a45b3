"""2-D convolution that saves a pooled copy of its input for the weight gradient (the paper's method).

Exactness (stated per output):
- forward output: exact; it is the very ``F.conv2d`` call the module would make.
- input gradient: exact; it needs only the weight and the output gradient.
- bias gradient: exact (sum of the output gradient).
- weight gradient: approximate; computed from the input reconstructed by nearest upsampling of the
  b×b block means (or maxima). Exact when the input is constant over aligned b×b blocks, and bitwise
  equal to native PyTorch for the authors' b=1 copy.

Pointwise (1×1, unpadded) convolutions whose stride divides b take a shortcut with the same value
(:func:`pooled_weight_grad`): every output position reads one pixel, and the upsampled input is constant
over each block, so dW = Σ_blocks (Σ of dy over the outputs reading that block) ⊗ pool_b(x). The output
gradient is sum-pooled instead of the input being upsampled: no full-size x̂, and a weight-gradient GEMM
(b/stride)² times smaller. Equal to the upsampled formulation up to float summation order (tested within
1e-5); the approximation is the pooling's, not the shortcut's.

Non-divisible H/W: edge blocks are pooled over the pixels they really contain (``ceil_mode``, no padding,
so the divisor is the true pixel count) and the upsampled tensor is cropped back to H×W. Blocks therefore
stay aligned with the input's top-left corner. The authors' code instead zero-pads at the top/left, which
shifts every block and mixes padding into the means; we deliberately do not copy that.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .blockgrad import block_factor, block_weight_grad
from .quant import fused_allowed, modes_active, run_fused

# Eager CPU block pooling through an Inductor-compiled kernel: ATen's CPU avg_pool2d is slow for these
# non-overlapping windows (4x4: ~3 ReLU passes; 2x2 worse), the compiled loop is 2.5-10x faster and bitwise the
# same (each window summed in the same order, then divided; tests/test_conv_op.py) for 2x2 and 4x4 windows. Used
# for NCHW maps whose sides the window divides: partial edge windows (8x8 ones were not bitwise) and each odd
# side would add recompiles past Dynamo's limit. Same switch and fallback as the fused quantize
# (ACTCOMP_FUSED=0; off by itself where Inductor cannot compile).
_POOL_FNS: dict = {}
FUSED_POOL_MIN_ELEMENTS = 1 << 14  # below this the compiled call's overhead outweighs the pass it saves


def _pool_kernel(k: tuple[int, int], divisor_override):
    def pool(t):
        return F.avg_pool2d(t, k, k, ceil_mode=True, divisor_override=divisor_override)

    # Dynamo keeps its compiled entries (and their recompile limit, 8) per code object: one per (window,
    # divisor), so that only dtypes and edge cases share it
    code = pool.__code__.replace(co_name=f"avg_pool_{k[0]}x{k[1]}_{divisor_override}")
    fn = types.FunctionType(code, pool.__globals__, code.co_name, None, pool.__closure__)
    return torch.compile(fn, dynamic=True, fullgraph=True)


def _avg_pool(x: torch.Tensor, k: tuple[int, int], divisor_override=None) -> torch.Tensor:
    """``F.avg_pool2d(x, k, k, ceil_mode=True, divisor_override=...)``: non-overlapping windows, true-count (or
    ``divisor_override``) edge windows."""
    if (k in ((2, 2), (4, 4)) and fused_allowed(x) and x.dim() == 4 and x.is_contiguous()
            and x.shape[-2] % k[0] == 0 and x.shape[-1] % k[1] == 0 and x.numel() >= FUSED_POOL_MIN_ELEMENTS):
        key = (k, divisor_override)
        if key not in _POOL_FNS:
            _POOL_FNS[key] = _pool_kernel(k, divisor_override)
        out = run_fused(_POOL_FNS[key], "pooling", x)
        if out is not None:
            return out
    if k == (2, 2) and divisor_override in (None, 1) and _plain_cpu_2x2(x):
        total = _sum_2x2(x)
        return total if divisor_override == 1 else total.mul_(0.25)  # /4 as *0.25: avg_pool2d's bits (tested)
    return F.avg_pool2d(x, k, k, ceil_mode=True, divisor_override=divisor_override)


def pool_blocks(x: torch.Tensor, block: int, mode: str = "avg") -> torch.Tensor:
    """Non-overlapping block pooling with partial edge blocks (true-count averages)."""
    if mode == "avg":
        return _avg_pool(x, (block, block))
    if mode == "max":
        return F.max_pool2d(x, block, block, ceil_mode=True)
    raise ValueError(f"unknown pooling mode {mode!r}; expected 'avg' or 'max'")


def _plain_cpu_2x2(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dim() == 4 and x.dtype in (torch.float32, torch.float64)
            and x.shape[-2] % 2 == 0 and x.shape[-1] % 2 == 0 and x.is_contiguous()
            and not torch.compiler.is_compiling())


def _sum_2x2(x: torch.Tensor) -> torch.Tensor:
    """2x2 block sums of an even NCHW map: the four strided quarters added into one output in avg_pool2d's window
    order (x00 + x01 + x10 + x11), so its bits. ~1.7x faster on CPU, whose NCHW avg_pool2d kernel is slowest at
    2x2; the same single output allocation, no temporary."""
    return torch.add(x[..., 0::2, 0::2], x[..., 0::2, 1::2]).add_(x[..., 1::2, 0::2]).add_(x[..., 1::2, 1::2])


def unpool_blocks(p: torch.Tensor, block: int, size: tuple[int, int]) -> torch.Tensor:
    """Nearest upsampling by ``block``, cropped to ``size`` (H, W)."""
    if block == 1:
        return p
    # Widen the small map first (its strided copy is 1/block of the output), then repeat whole rows: a copy with
    # contiguous inner rows. About 2x faster on CPU than two repeat_interleave calls; the same values and strides.
    n, c, h, w = p.shape
    up = p.unsqueeze(-1).expand(n, c, h, w, block).reshape(n, c, h, w * block)
    up = up.unsqueeze(3).expand(n, c, h, block, w * block).reshape(n, c, h * block, w * block)
    return up[..., : size[0], : size[1]]


def pointwise_factor(weight_shape, stride, sym, extra, block) -> tuple[int, int] | None:
    """f = block / stride where :func:`pooled_weight_grad` applies (1×1 unpadded kernel, stride dividing the
    block), else None: checked before the saved input is decoded or upsampled."""
    if block == 1 or tuple(weight_shape[-2:]) != (1, 1) or tuple(sym) != (0, 0) or tuple(extra) != (0, 0):
        return None
    if block % stride[0] or block % stride[1]:
        return None
    return block // stride[0], block // stride[1]


def pooled_weight_grad(dy, p, weight, groups, f):
    """The weight gradient from the upsampled ``p`` without upsampling it, for f = :func:`pointwise_factor`.

    Output (i, j) of a 1×1 conv with stride s reads input (s·i, s·j), which lies in block (i // f, j // f), so the
    f×f sums of dy (true edge sums: ceil mode, no padding) meet ``p`` position for position: ceil(ceil(H/s)/f) =
    ceil(H/b).
    """
    dy_sum = dy if f == (1, 1) else _avg_pool(dy, tuple(f), divisor_override=1)
    return torch.ops.aten.convolution_backward(
        dy_sum, p, weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], groups, (False, True, False))[1]


def block_grad_factor(dy, weight_shape, stride, sym, extra, dilation, groups, block, hw):
    """f for :func:`blockgrad.block_weight_grad` where the weight gradient from the upsampled input is computed at
    block resolution instead (CPU only so far, see there), else None: the caller then upsamples. Not under a
    dispatch mode (CPU memory measurement), so that it measures what the meta-device prediction, which models CUDA,
    predicts; under torch.compile, traced like any other ops."""
    if dy.device.type != "cpu" or (not torch.compiler.is_compiling() and modes_active()):
        return None
    return block_factor(weight_shape, stride, sym, extra, dilation, block, hw, groups)


def pooled_nbytes(shape, block: int, itemsize: int) -> int:
    n, c, h, w = shape
    return n * c * (-(-h // block)) * (-(-w // block)) * itemsize


def resolve_padding(padding, weight_shape, dilation):
    """Explicit (symmetric padding, extra right/bottom padding) for int, tuple, 'valid' or 'same'.

    PyTorch implements asymmetric 'same' padding by padding the extra row/column at the bottom/right,
    then convolving with the smaller symmetric padding; we mirror that in backward.
    """
    kh, kw = weight_shape[-2:]
    dil = _pair(dilation)
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), (0, 0)
        if padding == "same":
            sym, extra = [], []
            for d, k in zip(dil, (kh, kw)):
                total = d * (k - 1)
                left = total // 2
                sym.append(left)
                extra.append(total - 2 * left)
            return tuple(sym), tuple(extra)
        raise ValueError(f"unknown padding {padding!r}")
    return _pair(padding), (0, 0)


class PooledConv2d(torch.autograd.Function):
    """``y = conv2d(x, w, b)``; saves ``pool_b(x)`` instead of ``x``.

    ``grad_filter=True`` is the gradient-filtering variant: the output gradient is pooled as well and the
    weight gradient is computed at low resolution (b² fewer positions, scaled by b²). Fewer FLOPs; its
    error is measured by the benchmarks, not assumed.
    """

    kind = "conv input"

    @staticmethod
    def forward(ctx, x, weight, bias, stride, padding, dilation, groups, block, mode, grad_filter, copy_b1, name):
        y = F.conv2d(x, weight, bias, stride, padding, dilation, groups)
        sym, extra = resolve_padding(padding, weight.shape, dilation)
        ctx.conf = (_pair(stride), sym, extra, _pair(dilation), groups, block, grad_filter)
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.has_bias = bias is not None
        ctx.actcomp_name, ctx.kind = name, "conv input"
        if block == 1:
            # The authors' baseline: avg_pool2d(x, 1) is a full copy of x (kept on purpose: it is the baseline the paper's savings are measured against).
            saved = F.avg_pool2d(x, 1) if copy_b1 else x
        else:
            saved = pool_blocks(x, block, mode)
        ctx.save_for_backward(saved, weight)
        return y

    @staticmethod
    def backward(ctx, dy):
        saved, weight = ctx.saved_tensors
        stride, sym, extra, dilation, groups, block, grad_filter = ctx.conf
        n, c, h, w = ctx.x_shape
        need_x, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.has_bias and ctx.needs_input_grad[2]
        # Geometry of the (possibly right/bottom-padded) input the convolution really saw.
        hp, wp = h + extra[0], w + extra[1]
        bias_sizes = [weight.shape[0]] if ctx.has_bias else None
        dx = dw = db = None
        if grad_filter and block > 1 and need_w:
            dw = _filtered_weight_grad(saved.to(dy.dtype), weight, dy, stride, sym, extra, dilation, groups, block)
            dw = dw.to(weight.dtype) if dw is not None else None
        # Under autocast dy is bf16/fp16 while x and w are fp32: compute in dy's dtype, as the native conv did.
        weight_c = weight.to(dy.dtype)
        f = pointwise_factor(weight.shape, stride, sym, extra, block)
        if need_w and dw is None and f is not None:
            dw = pooled_weight_grad(dy, saved.to(dy.dtype), weight_c, groups, f).to(weight.dtype)
        fb = block_grad_factor(dy, weight.shape, stride, sym, extra, dilation, groups, block, (h, w))
        if need_w and dw is None and fb is not None:
            dw = block_weight_grad(dy, saved.to(dy.dtype), weight.shape, stride, sym, groups, fb).to(weight.dtype)
        mask = (need_x, need_w and dw is None, need_b)
        if any(mask):
            if mask[1]:
                x_hat = unpool_blocks(saved.to(dy.dtype), block, (h, w))
                if extra != (0, 0):
                    x_hat = F.pad(x_hat, (0, extra[1], 0, extra[0]))
            else:  # not read when the weight gradient is not requested; zeros, never uninitialized memory
                x_hat = dy.new_zeros(()).expand(n, c, hp, wp)
            gx, gw, gb = torch.ops.aten.convolution_backward(
                dy, x_hat, weight_c, bias_sizes, list(stride), list(sym), list(dilation), False, [0, 0], groups, mask
            )
            if mask[0]:
                dx = (gx[..., :h, :w] if extra != (0, 0) else gx).to(ctx.x_dtype)
            if mask[1]:
                dw = gw.to(weight.dtype)
            if mask[2]:
                db = gb.to(weight.dtype)
        return dx, dw, db, None, None, None, None, None, None, None, None, None


def _filtered_weight_grad(x_low, weight, dy, stride, sym, extra, dilation, groups, block):
    """Weight gradient at low resolution: pooled input against the output gradient pooled to match."""
    if extra != (0, 0):
        x_low = F.pad(x_low, (0, -(-extra[1] // block), 0, -(-extra[0] // block)))
    out_hw = _conv_out_hw(x_low.shape[-2:], weight.shape[-2:], stride, sym, dilation)
    if min(out_hw) < 1:
        return None  # too small to filter; the caller falls back to the upsampled gradient
    # Sum-preserving pooling of dy: each low-resolution position stands for that many full-resolution ones.
    ratio = dy.shape[-2] * dy.shape[-1] / (out_hw[0] * out_hw[1])
    dy_low = F.adaptive_avg_pool2d(dy.float(), out_hw) * ratio
    # fp32 and a zero-filled placeholder weight: the bf16 CPU kernel on tiny (1x1) maps with padding gave
    # non-finite taps now and then (taps that only ever see padding); the low-resolution product is cheap.
    w0 = weight.new_zeros((), dtype=torch.float32).expand(weight.shape)
    return torch.ops.aten.convolution_backward(
        dy_low, x_low.float(), w0, None, list(stride), list(sym), list(dilation), False, [0, 0], groups,
        (False, True, False))[1]


def _conv_out_hw(hw, khw, stride, pad, dil):
    return tuple((hw[i] + 2 * pad[i] - dil[i] * (khw[i] - 1) - 1) // stride[i] + 1 for i in range(2))
