"""Compact storage formats for saved activations: 1-bit masks and 8-bit affine codes.

All functions are pure tensor code, so they run unchanged on CPU, CUDA and the ``meta`` device
(which is how big-batch memory is predicted without allocating).
"""
from __future__ import annotations

import os
import sys
import warnings

import torch


def _shifts(device: torch.device) -> torch.Tensor:
    return torch.arange(8, device=device, dtype=torch.uint8)


# Eight 0/1 bytes read as one little-endian int64 and multiplied by this constant put byte i's bit at bit 56 + i:
# the partial products land on distinct bits (no carries) and the unwanted ones overflow past bit 63 or stay
# below bit 56. One multiply per 8 elements instead of a uint8 copy, 8 shifts and a sum.
_PACK_MAGIC = 0x0102040810204080


def _unpack_table(device: torch.device) -> torch.Tensor:
    """(256, 8) bool: row v holds the bits of v, lowest first. Built per call (a few tiny ops): a cached
    tensor could be a fake or meta tensor left over from a memory prediction."""
    return ((torch.arange(256, device=device).unsqueeze(1) >> torch.arange(8, device=device)) & 1).bool()


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Pack a boolean tensor into uint8, 8 elements per byte (flattened, zero-padded at the end)."""
    flat = mask.reshape(-1)
    pad = (-flat.numel()) % 8
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    if torch.compiler.is_compiling() or sys.byteorder != "little" or flat.dtype != torch.bool:
        # Plain shift + sum: Inductor fuses it into one reduction kernel (no dtype bitcast in the graph).
        bits = flat.view(-1, 8).to(torch.uint8) << _shifts(flat.device)
        return bits.sum(dim=1, dtype=torch.uint8)
    if flat.storage_offset() % 8:
        flat = flat.clone()  # an int64 view needs an 8-byte aligned start
    return ((flat.view(torch.int64) * _PACK_MAGIC) >> 56).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, shape: torch.Size, dtype: torch.dtype = torch.bool) -> torch.Tensor:
    """Inverse of :func:`pack_bits`: a tensor of ``shape`` holding the bits as ``dtype`` (bool, or 0/1 in a
    floating dtype: a ReLU backward then multiplies in one dtype, where ``dy * bool_mask`` takes ATen's
    scalar casting loop, ~5x slower on CPU)."""
    n = 1
    for s in shape:
        n *= s
    if torch.compiler.is_compiling():
        bits = (packed.unsqueeze(1) >> _shifts(packed.device)) & 1
        return bits.reshape(-1)[:n].view(shape).to(dtype)
    # One gather writes the bits directly (vs shift, and, cast: three full-size passes).
    bits = _unpack_table(packed.device).to(dtype).index_select(0, packed.reshape(-1).int())
    return bits.reshape(-1)[:n].view(shape)


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


# Eager quantize/dequantize run in row chunks of about this many elements: on CPU the fp32 temporary stays in
# cache (the separate sub/div/round/clamp/copy passes then cost about one pass over memory), and everywhere the
# full-size fp32 temporaries that used to set the forward peak shrink to one chunk. CUDA (and meta, its
# stand-in for memory prediction) uses big chunks: each op there is a kernel launch.
CHUNK_ELEMENTS = {"cpu": 1 << 19}
DEVICE_CHUNK_ELEMENTS = 1 << 24


def chunk_rows(shape, device: torch.device) -> int:
    """Rows per chunk for a (rows, columns) pass over a tensor on ``device`` (at least one row).

    All rows when compiling: there Inductor fuses the pass into one loop, and a Python loop would only be
    unrolled into the graph.
    """
    if torch.compiler.is_compiling():
        return max(1, shape[0])
    limit = CHUNK_ELEMENTS.get(device.type, DEVICE_CHUNK_ELEMENTS)
    return max(1, min(shape[0], limit // max(1, shape[1])))


def _column_major(t: torch.Tensor) -> bool:
    return t.shape[0] > 1 and t.shape[1] > 1 and t.stride(0) < t.stride(1)


def _elementwise_out(r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An empty (rows, columns) tensor with the strides an elementwise op on ``r`` gives its result: r's memory
    order, made dense (as TensorIterator lays it out).

    The eager chunked path must give the plain formulation's strides, not just its values: later kernels may
    choose their algorithm, and so their summation order, by layout (an (N, C, 1, 1) map reads as contiguous
    and as channels_last), so other strides would mean other gradient bits than under torch.compile.
    """
    if _column_major(r):  # per-channel rows of a channels_last map or of 1x1 maps: a transposed view
        return torch.empty(r.shape[::-1], dtype=dtype, device=r.device).t()
    return torch.empty(r.shape, dtype=dtype, device=r.device)


def _memory_order(out: torch.Tensor, *ts: torch.Tensor):
    """``out`` and the same-shaped ``ts`` as 2-D views whose rows follow out's memory: transposed when out runs
    down its columns. Chunks of rows are then contiguous blocks of out, and the random numbers of stochastic
    rounding, drawn chunk after chunk in memory order, are those one draw over the whole tensor gives."""
    if _column_major(out):
        return (out.t(), *(t.t() for t in ts))
    return (out, *ts)


def _plain_quantize(r: torch.Tensor):
    """The deterministic code of a (groups, elements) tensor as one expression: what Inductor fuses."""
    lo, hi = r.amin(dim=1, keepdim=True).float(), r.amax(dim=1, keepdim=True).float()
    scale = ((hi - lo) / 255.0).clamp_min(1e-12)
    return ((r.float() - lo) / scale).round().clamp(0, 255).to(torch.uint8), lo, scale


# Eager CPU quantize through one Inductor-compiled kernel: min/max and the code in one C++ loop nest per row
# block, ~2x faster than the chunked ATen passes, no fp32 temporary, and bitwise the same code (the same fp32
# ops; tests/test_quant.py checks it). Off with ACTCOMP_FUSED=0; off by itself (one warning) where Inductor
# cannot compile (no C++ compiler). Stochastic rounding stays on the chunked path: torch.rand's stream there is
# what makes a seeded run reproducible, and Inductor draws its own numbers. CUDA stays eager too (untested
# Triton division rounding; its chunks are already one kernel launch per op). Dequantize stays chunked: the
# compiled uint8 -> fp32 loop measured slower (ad hoc: 5.8 vs 3.4 ms for 6.3M fp32 elements).
FUSED = {"enabled": os.environ.get("ACTCOMP_FUSED", "1") != "0", "fn": None}
FUSED_MIN_ELEMENTS = 1 << 14  # below this the compiled call's guard overhead outweighs the passes it saves
_FUSED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def fused_allowed(t: torch.Tensor) -> bool:
    """Whether eager work on ``t`` may run through an Inductor-compiled CPU kernel (quantize here, pooling in
    ``conv.py``): on, CPU, a floating dtype, not compiling already, and no mode active."""
    return (FUSED["enabled"] and t.device.type == "cpu" and t.dtype in _FUSED_DTYPES
            and not torch.compiler.is_compiling() and not modes_active())


def modes_active() -> bool:
    """Whether a dispatch mode (fake tensors, memory tracking) or a live torch-function mode sees the ATen ops: a
    compiled kernel would hide them or be traced by them, and a CPU-only formulation would make what such a mode
    measures differ from the meta-device prediction."""
    return torch._C._len_torch_dispatch_stack() > 0 or torch._C._is_torch_function_mode_enabled()


def _fused_ok(r: torch.Tensor) -> bool:
    return (fused_allowed(r) and r.is_contiguous() and r.shape[0] > 1 and r.shape[1] > 1
            and r.numel() >= FUSED_MIN_ELEMENTS)


def compiled_quantize():
    """``_plain_quantize`` under ``torch.compile``, built once per process (compiled at its first call)."""
    if FUSED["fn"] is None:
        FUSED["fn"] = torch.compile(_plain_quantize, dynamic=True, fullgraph=True)
    return FUSED["fn"]


def run_fused(fn, what: str, *args):
    """``fn(*args)``, a compiled kernel, under no_grad; None if it cannot run: then every fused kernel is off
    for the rest of the process (one warning) and the caller takes its eager path."""
    try:
        with torch.no_grad():
            return fn(*args)
    except Exception as e:  # noqa: BLE001 - any compile failure: fall back for the rest of the process
        FUSED["enabled"] = False
        msg = " ".join(str(e).split())[:200]
        warnings.warn(f"actcomp: fused {what} disabled, torch.compile failed ({type(e).__name__}: {msg}); "
                      "using the eager paths", RuntimeWarning, stacklevel=4)
        return None


def _fused_quantize(r: torch.Tensor):
    """``_plain_quantize(r)`` compiled (None if it cannot be: then the chunked path runs)."""
    return run_fused(compiled_quantize(), "quantize", r)


def quantize_uint8(x: torch.Tensor, stochastic: bool = False):
    """Per-group affine uint8 code: ``x ≈ lo + q * scale`` with |error| <= scale/2 (deterministic rounding).

    Returns ``(q, lo, scale)``; q has x's shape, lo/scale are fp32 with one value per group.
    Stochastic rounding makes the code unbiased (E[x̂] = x) at up to one step of error.
    """
    r = _rows(x.detach())
    if not stochastic and torch.compiler.is_compiling():
        q, lo, scale = _plain_quantize(r)  # the model's own graph fuses it
        return _unrows(q, x.shape), lo, scale
    if not stochastic and _fused_ok(r):
        fused = _fused_quantize(r)
        if fused is not None:
            return _unrows(fused[0], x.shape), fused[1], fused[2]
    # min/max commute with the (monotonic) cast to fp32, so they are taken in x's dtype. aminmax reads x once
    # on CUDA; its CPU kernel is ~4x slower than amin + amax (torch 2.14).
    if r.device.type == "cuda":
        lo, hi = torch.aminmax(r, dim=1, keepdim=True)
    else:
        lo, hi = r.amin(dim=1, keepdim=True), r.amax(dim=1, keepdim=True)
    lo, hi = lo.float(), hi.float()
    scale = ((hi - lo) / 255.0).clamp_min(1e-12)
    if torch.compiler.is_compiling():
        # Stochastic rounding as one expression: Inductor fuses it into a single loop/kernel with no full-size
        # temporary (deterministic rounding: _plain_quantize above).
        v = (r.float() - lo) / scale
        v = (v + torch.rand_like(v)).floor()
        return _unrows(v.clamp(0, 255).to(torch.uint8), x.shape), lo, scale
    q = _elementwise_out(r, torch.uint8)
    qm, rm, lom, scm = _memory_order(q, r, lo.expand(r.shape), scale.expand(r.shape))
    step = chunk_rows(qm.shape, r.device)
    buf = torch.empty((step, qm.shape[1]), dtype=torch.float32, device=r.device)
    # fp32 -> uint8 is a scalar casting loop in ATen on CPU (~4x slower than fp32 -> int32 -> uint8, both
    # vectorized); the values are integers in [0, 255] by then, so the detour is exact.
    ibuf = torch.empty_like(buf, dtype=torch.int32) if r.device.type == "cpu" else None
    for i in range(0, qm.shape[0], step):
        j = min(i + step, qm.shape[0])
        v = buf[: j - i]
        # The same fp32 ops, element by element, as on the whole tensor (bitwise equal).
        if rm.dtype == torch.float32:
            torch.sub(rm[i:j], lom[i:j], out=v)
        else:
            v.copy_(rm[i:j]).sub_(lom[i:j])
        v.div_(scm[i:j])
        if stochastic:
            v.add_(torch.rand_like(v)).floor_()
        else:
            v.round_()
        v.clamp_(0, 255)
        qm[i:j].copy_(v if ibuf is None else ibuf[: j - i].copy_(v))
    return _unrows(q, x.shape), lo, scale


def dequantize_uint8(q: torch.Tensor, lo: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    r = _rows(q)
    if torch.compiler.is_compiling():
        return _unrows(r.float().mul_(scale).add_(lo), q.shape).to(dtype)
    out = torch.empty_like(r, dtype=dtype)  # the strides r.float() gives (a dense input's own)
    om, rm, lom, scm = _memory_order(out, r, lo.expand(r.shape), scale.expand(r.shape))
    step = chunk_rows(om.shape, r.device)
    buf = None if dtype == torch.float32 else torch.empty((step, om.shape[1]), dtype=torch.float32, device=r.device)
    for i in range(0, om.shape[0], step):
        j = min(i + step, om.shape[0])
        v = om[i:j] if buf is None else buf[: j - i]
        # Convert first: a mixed uint8 * fp32 op takes ATen's slow casting loop (~40x slower on CPU).
        v.copy_(rm[i:j]).mul_(scm[i:j]).add_(lom[i:j])
        if buf is not None:
            om[i:j].copy_(v)
    return _unrows(out, q.shape)


def quantized_nbytes(shape) -> int:
    """Bytes of :func:`quantize_uint8`'s output for a tensor of ``shape`` (1 byte/element + 8 bytes/group)."""
    groups, per = group_shape(tuple(shape))
    return groups * per + 8 * groups
