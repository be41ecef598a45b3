"""Compact storage formats for saved activations: 1-bit masks and 8-bit affine codes.

All functions are pure tensor code, so they run unchanged on CPU, CUDA and the ``meta`` device
(which is how big-batch memory is predicted without allocating).
"""
from __future__ import annotations

import torch


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, device=device, dtype=torch.uint8)


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8, 8 elements per byte (flattened, zero-padded at the end)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    bits = flat.view(-1, 8).to(torch.uint8) << _shifts(flat.device)
    return bits.sum(dim=1, dtype=torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a bool tensor of ``shape``."""
    n = 1
    for s in shape:
        n *= s
    bits = (packed.unsqueeze(1) >> _shifts(packed.device)) & 1
    return bits.reshape(-1)[:n].view(shape).bool()


def packed_bits_nbytes(numel: int) -> int:
    return (numel + 7) // 8


MIN_GROUP = 64  # below this many elements per group, the 8-byte (lo, scale) pair costs more than it helps


def group_shape(shape) -> tuple[int, int]:
    """(groups, elements per group) for a tensor shape.

    One (n, c) plane of an NCHW tensor when the plane has >= 64 elements; else, for NCHW, one channel over
    N·H·W: small maps such as (N, C, 1, 1) must not mix channels of wildly different scales in one code, and
    per-channel groups match the statistics BatchNorm computes. Otherwise one row over the last dim when it has
    >= 64 elements (tokens × channels); else one group per sample.
    """
    numel = 1
    for s in shape:
        numel *= s
    if numel == 0 or len(shape) == 0:
        return 1, numel
    if len(shape) == 4 and shape[2] * shape[3] >= MIN_GROUP:
        return shape[0] * shape[1], shape[2] * shape[3]
    if len(shape) == 4:
        return shape[1], numel // shape[1]
    if len(shape) >= 2 and shape[-1] >= MIN_GROUP:
        return numel // shape[-1], shape[-1]
    return shape[0], numel // shape[0]


def _channel_groups(shape) -> bool:
    return len(shape) == 4 and group_shape(shape) == (shape[1], shape[0] * shape[2] * shape[3]) and shape[0] > 1


def _rows(x: torch.Tensor) -> torch.Tensor:
    if _channel_groups(x.shape):
        return x.transpose(0, 1).reshape(x.shape[1], -1)  # a copy; only for maps under 64 pixels
    return x.reshape(group_shape(x.shape))


def _unrows(r: torch.Tensor, shape) -> torch.Tensor:
    if _channel_groups(shape):
        return r.view(shape[1], shape[0], shape[2], shape[3]).transpose(0, 1).contiguous()
    return r.view(shape)


def quantize_uint8(x: torch.Tensor, stochastic: bool = False):
    """Per-group affine uint8 code: ``x ≈ lo + q * scale`` with |error| <= scale/2 (deterministic rounding).

    Returns ``(q, lo, scale)``; q has x's shape, lo/scale are fp32 with one value per group.
    Stochastic rounding makes the code unbiased (E[x̂] = x) at up to one step of error.
    """
    r = _rows(x.detach()).float()
    lo = r.amin(dim=1, keepdim=True)
    hi = r.amax(dim=1, keepdim=True)
    scale = ((hi - lo) / 255.0).clamp_min(1e-12)
    v = (r - lo).div_(scale)  # in place after the one unavoidable temporary: keeps the forward peak down
    if stochastic:
        v = (v + torch.rand_like(v)).floor_()
    else:
        v = v.round_()
    q = _unrows(v.clamp_(0, 255).to(torch.uint8), x.shape)
    return q, lo, scale


def dequantize_uint8(q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r = _rows(q).float().mul_(scale).add_(lo)
    return _unrows(r, q.shape).to(dtype)


def quantized_nbytes(shape) -> int:
    """Bytes of :func:`quantize_uint8`'s output for a tensor of ``shape`` (1 byte/element + 8 bytes/group)."""
    groups, per = group_shape(tuple(shape))
    return groups * per + 8 * groups
