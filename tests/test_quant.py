"""The fast quantize/pack kernels (issue 12): chunked eager path and bit tricks against the plain formulations."""
import pytest
import torch
import torch.nn.functional as F

from actcomp.ops import pool, quant
from actcomp.ops.quant import dequantize_uint8, pack_bits, quantize_uint8, unpack_bits


def _plain(monkeypatch):
    """Run the ops as under torch.compile: one unchunked expression each (the reference formulation)."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)


def _reference(monkeypatch, fn, *args):
    with monkeypatch.context() as m:
        _plain(m)
        return fn(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("shape", [(4, 6, 9, 9), (5, 16, 1, 1), (3, 7, 5, 5), (20, 70), (6, 10)])
@pytest.mark.parametrize("stochastic", [False, True])
def test_chunked_quantize_bitwise_equals_plain_expression(monkeypatch, dtype, shape, stochastic):
    monkeypatch.setitem(quant.CHUNK_ELEMENTS, "cpu", 100)  # many chunks, some smaller than one row
    x = (torch.randn(shape) * 3 + 1).to(dtype)
    torch.manual_seed(3)
    q, lo, scale = quantize_uint8(x, stochastic)
    torch.manual_seed(3)
    q0, lo0, scale0 = _reference(monkeypatch, quantize_uint8, x, stochastic)
    assert _same(q, q0) and torch.equal(lo, lo0) and torch.equal(scale, scale0)
    x_hat = dequantize_uint8(q, lo, scale, dtype)
    assert x_hat.dtype == dtype and _same(x_hat, _reference(monkeypatch, dequantize_uint8, q, lo, scale, dtype))


def _same(a, b):
    # Strides too: kernels downstream may pick their summation order by layout (a (N, C, 1, 1) map is both
    # contiguous and channels_last), and eager must give compile's bits (tests/test_compile.py).
    return torch.equal(a, b) and a.stride() == b.stride()


def _layout(x, kind):
    if kind == "channels_last":
        return x.to(memory_format=torch.channels_last)
    wide = torch.cat([x, x], dim=1)  # a channel slice: strided, not dense
    if kind == "channels_last_slice":
        wide = wide.to(memory_format=torch.channels_last)
    return wide[:, : x.shape[1]]


@pytest.mark.parametrize("kind", ["channels_last", "slice", "channels_last_slice"])
@pytest.mark.parametrize("shape", [(4, 6, 9, 9), (3, 7, 5, 5), (5, 16, 1, 1), (1, 16, 1, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("stochastic", [False, True])
def test_chunked_quantize_strided_inputs_give_the_plain_codes_and_strides(monkeypatch, kind, shape, dtype,
                                                                          stochastic):
    # Per-channel groups of a channels_last or 1x1 map are a transposed (column-major) view of x: the chunked
    # path walks them in memory order, and its outputs must have the plain expression's strides.
    monkeypatch.setitem(quant.CHUNK_ELEMENTS, "cpu", 20)
    x = _layout((torch.randn(shape) * 3 + 1).to(dtype), kind)
    torch.manual_seed(5)
    q, lo, scale = quantize_uint8(x, stochastic)
    torch.manual_seed(5)
    q0, lo0, scale0 = _reference(monkeypatch, quantize_uint8, x, stochastic)
    assert _same(q, q0) and torch.equal(lo, lo0) and torch.equal(scale, scale0)
    for codes in (q, _layout(q, kind)):  # also codes in another layout than quantize gives
        x_hat = dequantize_uint8(codes, lo, scale, dtype)
        assert _same(x_hat, _reference(monkeypatch, dequantize_uint8, codes, lo, scale, dtype))


def test_quantize_non_contiguous_input_and_error_bound():
    x = torch.randn(4, 8, 12, 12).permute(0, 1, 3, 2)
    q, lo, scale = quantize_uint8(x)
    err = (dequantize_uint8(q, lo, scale, x.dtype) - x).abs().view(32, -1)
    assert (err <= scale * 0.5 + 1e-6).all()


def test_stochastic_rounding_deterministic_under_a_fixed_seed():
    x = torch.randn(8, 16, 10, 10)
    codes = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        codes.append(quantize_uint8(x, stochastic=True)[0])
    assert torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 65, 1000, 4099])
def test_pack_bits_equals_shift_and_sum_and_round_trips(monkeypatch, n):
    m = torch.rand(n) > 0.5
    p = pack_bits(m)
    assert p.dtype == torch.uint8 and p.numel() == (n + 7) // 8
    assert torch.equal(p, _reference(monkeypatch, pack_bits, m))
    assert torch.equal(unpack_bits(p, m.shape), m)
    assert torch.equal(_reference(monkeypatch, unpack_bits, p, m.shape), m)


def test_pack_bits_views_all_ones_and_shapes():
    base = torch.rand(10, 16) > 0.5
    for m in (base[:, 3:11], base.view(-1)[3:], torch.ones(3, 5, 7, dtype=torch.bool)):
        assert torch.equal(unpack_bits(pack_bits(m), m.shape), m)
    assert pack_bits(torch.ones(16, dtype=torch.bool)).tolist() == [255, 255]
    assert pack_bits(torch.tensor([True, False, False, False, False, False, False, True])).tolist() == [129]


def test_ops_run_on_meta():
    q, lo, scale = quantize_uint8(torch.empty(8, 64, 112, 112, device="meta"))
    assert q.shape == (8, 64, 112, 112) and q.dtype == torch.uint8 and lo.shape == (512, 1)
    assert dequantize_uint8(q, lo, scale, torch.bfloat16).dtype == torch.bfloat16
    m = torch.empty(1001, dtype=torch.bool, device="meta")
    assert unpack_bits(pack_bits(m), m.shape).shape == m.shape


@pytest.mark.parametrize("args", [(3, 2, 1, 1, False), (3, 2, 1, 2, True), (2, 2, 0, 1, False), ((3, 2), (2, 1), (1, 0), 1, True)])
def test_chunked_compact_maxpool_gradient_exact(monkeypatch, args):
    monkeypatch.setitem(quant.CHUNK_ELEMENTS, "cpu", 50)
    x = torch.randn(2, 3, 11, 10, requires_grad=True)
    y = pool.CompactMaxPool2d.apply(x, *args, "p")
    dy = torch.randn_like(y)
    ref = F.max_pool2d(x, *args[:4], ceil_mode=args[4])
    assert torch.equal(y, ref)
    assert torch.equal(torch.autograd.grad(y, x, dy)[0], torch.autograd.grad(ref, x, dy)[0])


def test_quantize_and_pack_trace_without_graph_breaks():
    def f(x):
        q, lo, scale = quantize_uint8(x)
        return dequantize_uint8(q, lo, scale, x.dtype), unpack_bits(pack_bits(x > 0), x.shape)

    explained = torch._dynamo.explain(f)(torch.randn(2, 4, 9, 9))
    assert explained.graph_break_count == 0 and explained.graph_count == 1


def _count_fused(monkeypatch):
    calls = []
    fn = quant.compiled_quantize()
    monkeypatch.setitem(quant.FUSED, "fn", lambda r: calls.append(r.shape) or fn(r))
    monkeypatch.setitem(quant.FUSED, "enabled", True)
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape,channels_last", [((4, 40, 16, 16), False), ((4, 40, 16, 16), True),
                                                 ((64, 300, 7, 7), False),
                                                 ((3, 200, 96), False)])
def test_fused_quantize_bitwise_equals_chunked_path(monkeypatch, dtype, shape, channels_last):
    calls = _count_fused(monkeypatch)
    x = torch.randn(shape) * 3 + 1
    x.view(-1)[::97] = 40.0  # outliers: codes across the whole range
    x = x.to(dtype)
    if channels_last:  # the rows are then a copy (contiguous), codes and strides as the chunked path gives
        x = x.to(memory_format=torch.channels_last)
    q, lo, scale = quantize_uint8(x)
    assert calls, "the fused kernel did not run"
    monkeypatch.setitem(quant.FUSED, "enabled", False)
    q0, lo0, scale0 = quantize_uint8(x)
    assert _same(q, q0) and torch.equal(lo, lo0) and torch.equal(scale, scale0)


def test_fused_quantize_not_used_where_bits_would_differ_or_nothing_is_gained(monkeypatch):
    calls = _count_fused(monkeypatch)
    big = torch.randn(4, 40, 16, 16)
    quantize_uint8(big, stochastic=True)  # the seeded torch.rand stream
    quantize_uint8(big.to(torch.float64))
    quantize_uint8(torch.randn(2, 4, 9, 9))  # small
    # per-channel rows of a channels_last map are a column-major view: the chunked path keeps its strides
    quantize_uint8(torch.randn(64, 300, 7, 7).to(memory_format=torch.channels_last))
    _reference(monkeypatch, quantize_uint8, big)  # under compile: the model's own graph fuses it
    assert calls == []
    quantize_uint8(big)
    assert calls == [(160, 256)]


def test_fused_quantize_compile_failure_falls_back_once_with_a_warning(monkeypatch):
    def broken(r):
        raise RuntimeError("no C++ compiler\nfound")

    monkeypatch.setitem(quant.FUSED, "fn", broken)
    monkeypatch.setitem(quant.FUSED, "enabled", True)
    x = torch.randn(4, 40, 16, 16)
    with pytest.warns(RuntimeWarning, match="fused quantize disabled.*no C\\+\\+ compiler found"):
        q, lo, scale = quantize_uint8(x)
    assert quant.FUSED["enabled"] is False
    q0, lo0, scale0 = quantize_uint8(x)
    assert torch.equal(q, q0) and torch.equal(lo, lo0) and torch.equal(scale, scale0)
