"""Weight gradient of a k×k convolution whose saved input is constant over b×b blocks, computed at block resolution.

The pooled conv presets reconstruct the input as x̂ = nearest-upsampled block means, so x̂ is constant over each b×b
block. The weight gradient dW[o, i, u, v] = Σ dy[n, o, y, x] · x̂[n, i, s·y + u − p, s·x + v − p] then only needs, per
block, the sum of dy over the outputs that read that block through tap (u, v):

    dW[o, i, u, v] = Σ_{n, a, c} D[n, o, u, v, a, c] · pool_b(x)[n, i, a, c]

With f = b / s, the outputs y whose tap u lands in block row a are exactly y ∈ [f·a + o_u, f·a + o_u + f) with
o_u = ceil((p − u) / s), so D is a separable f×f window sum of dy at (at most) k offsets per axis: two GEMMs with
0/1 selection matrices, D = M_h · dy · M_wᵀ per plane. The contraction with pool_b(x) runs at 1/b² of the input
resolution: a dense 3×3 conv's weight-gradient GEMM shrinks b²-fold, and the full-size x̂ is never built. Same
value as the upsampled formulation up to float summation order (tested within 1e-5); the approximation is the
pooling's, not this one's. (A non-finite dy makes whole planes of D NaN through 0·inf, where the upsampled path
gives inf/NaN in fewer taps: non-finite either way.) :func:`conv.pooled_weight_grad` is the 1×1 case.

Applies where it is this simple: dilation 1, symmetric padding, stride dividing b, b dividing H and W (no partial
edge blocks). Used on CPU only so far, and not where it measured slower than the native kernel on the upsampled
input: depthwise 3×3 stride-1 convs, convs with stride = b, and convs with fewer than 8 input channels per group. Ad hoc, b=4, EfficientNet-B0/ResNet-50 layer shapes at batch 16, this CPU: depthwise
5×5 and strided weight gradients 4-8× faster, dense 3×3 2-4×; other devices keep the upsampled path until
measured there.
"""
from __future__ import annotations

import torch

__all__ = ["block_factor", "block_weight_grad"]


# Below this many input channels per group (a stem conv on RGB) the native weight gradient is cheap and building
# the window sums costs more (ad hoc: ResNet-50's 7x7 stem at 128 px, 40 ms upsampled vs 114 ms here at b=4).
MIN_INPUT_CHANNELS = 8


def block_factor(weight_shape, stride, sym, extra, dilation, block, hw, groups=1) -> tuple[int, int] | None:
    """f = block / stride per axis where :func:`block_weight_grad` applies (see the module docstring), else None."""
    if block == 1 or tuple(dilation) != (1, 1) or tuple(extra) != (0, 0):
        return None
    if any(block % s for s in stride) or any(n % block for n in hw):
        return None
    f = block // stride[0], block // stride[1]
    if min(f) == 1:  # stride = block: the window sums would be k² copies of dy
        return None
    if _depthwise(weight_shape, groups):
        return None if tuple(weight_shape[-2:]) == (3, 3) and tuple(stride) == (1, 1) else f
    return None if weight_shape[1] < MIN_INPUT_CHANNELS else f


def _depthwise(weight_shape, groups) -> bool:
    return weight_shape[1] == 1 and groups > 1  # one input channel per group (any channel multiplier)


def _offsets(k: int, pad: int, s: int) -> list[int]:
    # o_u = ceil((pad - u) / s): the first output whose tap u reads block 0
    return [-((u - pad) // s) for u in range(k)]


def _selection(length: int, offsets, f: int, blocks: int, like: torch.Tensor) -> torch.Tensor:
    """(len(offsets)·blocks, length) 0/1: row (j, a) picks the outputs [f·a + offsets[j], +f) that exist."""
    i = torch.arange(length, device=like.device)
    start = (f * torch.arange(blocks, device=like.device))[None, :, None] + \
        torch.tensor(offsets, device=like.device)[:, None, None]
    return ((i >= start) & (i < start + f)).reshape(len(offsets) * blocks, length).to(like.dtype)


def block_weight_grad(dy: torch.Tensor, p: torch.Tensor, weight_shape, stride, sym, groups: int, f) -> torch.Tensor:
    """dW of a conv (weight of ``weight_shape``) from the upsampled ``p`` = pool_b(x), without upsampling it, for
    f = :func:`block_factor`. Returned in fp32 for half-precision dy (the caller casts to the weight's dtype)."""
    kh, kw = weight_shape[-2:]
    oh, ow = _offsets(kh, sym[0], stride[0]), _offsets(kw, sym[1], stride[1])
    uh, uw = sorted(set(oh)), sorted(set(ow))  # taps sharing an offset (stride > 1) share a sum
    d = dy if dy.dtype in (torch.float32, torch.float64) else dy.float()  # the conv kernels accumulate in fp32 too
    if torch.compiler.is_compiling():
        # A graph bakes in views chosen from the traced (meta) strides, and CPU kernels can disagree with their meta
        # functions (channels_last convolution_backward: a view then failed under aot_eager). Copies fix the layout.
        d, p = d.clone(memory_format=torch.contiguous_format), p.clone(memory_format=torch.contiguous_format)
    n, o, ho, wo = d.shape
    a, b = p.shape[-2:]
    rows, cols = _selection(ho, uh, f[0], a, d), _selection(wo, uw, f[1], b, d)
    t = d.reshape(n * o * ho, wo) @ cols.t()  # (N·O·Ho, Kv·B): sums along W
    t = t.view(n * o, ho, len(uw) * b).transpose(1, 2).reshape(-1, ho) @ rows.t()  # (N·O·Kv·B, Ku·A): along H
    sums = t.view(n, groups, o // groups, len(uw), b, len(uh), a)
    pp = p.to(d.dtype).reshape(n, groups, -1, a, b)
    dw = torch.einsum("ngovbua,ngiab->goiuv", sums, pp).reshape(o, weight_shape[1], len(uh), len(uw))
    iu = torch.tensor([uh.index(v) for v in oh], device=d.device)
    iv = torch.tensor([uw.index(v) for v in ow], device=d.device)
    return dw.index_select(2, iu).index_select(3, iv)
