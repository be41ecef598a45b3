"""PooledConv2d: exact parts bitwise/gradcheck, approximated part exact on block-constant inputs."""
import pytest
import torch
import torch.nn.functional as F

from actcomp.ops import CodedConv2d, PooledConv2d, decode, encode, pool_blocks, unpool_blocks
from actcomp.ops import conv as conv_mod

GEOMETRIES = [  # (cin, cout, k, stride, padding, dilation, groups, bias)
    (4, 6, 3, 1, 1, 1, 1, True),
    (4, 6, 3, 2, 1, 1, 1, False),
    (4, 6, 3, 1, 2, 2, 1, True),
    (4, 8, 3, 1, 1, 1, 2, True),
    (4, 4, 3, 1, 1, 1, 4, False),  # depthwise
    (4, 6, 1, 1, 0, 1, 1, True),
    (4, 6, 1, 2, 0, 1, 1, False),  # strided pointwise (a ResNet downsample): the shortcut where b % 2 == 0
    (4, 8, 1, 1, 0, 1, 2, True),  # grouped pointwise
    (4, 6, 3, 1, "same", 1, 1, True),
    (4, 6, 4, 1, "same", 1, 1, False),  # asymmetric 'same'
    (4, 6, 3, 1, "valid", 1, 1, True),
    (4, 6, 5, 2, 2, 1, 1, True),
]


def _apply(x, w, b, geo, block, mode="avg", grad_filter=False, copy_b1=False):
    _, _, _, s, p, d, g, _ = geo
    return PooledConv2d.apply(x, w, b, s, p, d, g, block, mode, grad_filter, copy_b1, "t")


def _params(geo, dtype=torch.float32):
    cin, cout, k, *_, g, bias = geo
    w = torch.randn(cout, cin // g, k, k, dtype=dtype, requires_grad=True)
    b = torch.randn(cout, dtype=dtype, requires_grad=True) if bias else None
    return w, b


def _grads(fn, x, w, b, dy):
    out = fn(x, w, b)
    out.backward(dy)
    return out.detach(), [t.grad.clone() for t in (x, w, b) if t is not None]


@pytest.mark.parametrize("geo", GEOMETRIES, ids=str)
def test_b1_authors_copy_bitwise_equal_to_native(geo):
    w, b = _params(geo)
    x = torch.randn(2, 4, 11, 13, requires_grad=True)
    _, _, _, s, p, d, g, _ = geo
    ref_out = F.conv2d(x, w, b, s, p, d, g)
    dy = torch.randn_like(ref_out)
    out0, g0 = _grads(lambda x, w, b: F.conv2d(x, w, b, s, p, d, g), x, w, b, dy)
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    out1, g1 = _grads(lambda x, w, b: _apply(x, w, b, geo, 1, copy_b1=True), x, w, b, dy)
    assert torch.equal(out0, out1)
    for a, c in zip(g0, g1):
        assert torch.equal(a, c)


def _block_constant(n, c, h, w, block, dtype=torch.float32):
    low = torch.randn(n, c, -(-h // block), -(-w // block), dtype=dtype)
    return unpool_blocks(low, block, (h, w)).contiguous()


@pytest.mark.parametrize("geo", GEOMETRIES, ids=str)
@pytest.mark.parametrize("block,hw", [(2, (12, 12)), (2, (11, 13)), (4, (13, 10)), (3, (9, 14))])
@pytest.mark.parametrize("mode", ["avg", "max"])
def test_weight_grad_exact_on_block_constant_inputs(geo, block, hw, mode):
    w, b = _params(geo)
    x = _block_constant(2, 4, *hw, block).requires_grad_(True)
    _, _, _, s, p, d, g, _ = geo
    dy = torch.randn_like(F.conv2d(x, w, b, s, p, d, g))
    out0, g0 = _grads(lambda x, w, b: F.conv2d(x, w, b, s, p, d, g), x, w, b, dy)
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    out1, g1 = _grads(lambda x, w, b: _apply(x, w, b, geo, block, mode), x, w, b, dy)
    assert torch.equal(out0, out1)  # forward is the same call
    for a, c in zip(g0, g1):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


def test_weight_grad_is_approximate_on_generic_input():
    geo = GEOMETRIES[0]
    w, b = _params(geo)
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    dy = torch.randn(2, 6, 12, 12)
    _, gref = _grads(lambda x, w, b: F.conv2d(x, w, b, 1, 1), x, w, b, dy)
    x.grad = w.grad = b.grad = None
    _, gp = _grads(lambda x, w, b: _apply(x, w, b, geo, 2), x, w, b, dy)
    assert torch.equal(gp[0], gref[0])  # input gradient: exact
    assert not torch.allclose(gp[1], gref[1], atol=1e-3)  # weight gradient: approximated


@pytest.mark.parametrize("geo", [GEOMETRIES[1], GEOMETRIES[3], GEOMETRIES[7]], ids=str)
def test_gradcheck_exact_parts_float64(geo):
    w, b = _params(geo, torch.float64)
    w.requires_grad_(False)  # the weight gradient is the approximated part
    x = torch.randn(1, 4, 7, 9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, b: _apply(x, w, b, geo, 2), (x, b) if b is not None else (x, None))


def test_pooling_partial_blocks_use_true_pixel_count():
    x = torch.arange(25.0).view(1, 1, 5, 5)
    p = pool_blocks(x, 2)
    assert p.shape == (1, 1, 3, 3)
    assert p[0, 0, 0, 2] == (x[0, 0, 0, 4] + x[0, 0, 1, 4]) / 2  # right edge: 2 real pixels
    assert p[0, 0, 2, 2] == x[0, 0, 4, 4]  # corner: 1 real pixel, no zero padding mixed in
    assert p[0, 0, 0, 0] == x[0, 0, :2, :2].mean()  # blocks aligned to the top-left corner
    up = unpool_blocks(p, 2, (5, 5))
    assert up.shape == x.shape and up[0, 0, 4, 4] == x[0, 0, 4, 4]


def test_grad_filter_exact_for_pointwise_conv_on_block_constant_input():
    geo = (4, 6, 1, 1, 0, 1, 1, True)
    w, b = _params(geo)
    x = _block_constant(2, 4, 8, 8, 2).requires_grad_(True)
    dy = torch.randn(2, 6, 8, 8)
    _, gref = _grads(lambda x, w, b: F.conv2d(x, w, b), x, w, b, dy)
    x.grad = w.grad = b.grad = None
    _, gf = _grads(lambda x, w, b: _apply(x, w, b, geo, 2, grad_filter=True), x, w, b, dy)
    for a, c in zip(gref, gf):
        torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-5)


POINTWISE = [  # (stride, groups, block, (h, w)): the pooled_weight_grad shortcut, and where it must fall back
    (1, 1, 2, (12, 12)), (1, 2, 4, (13, 10)), (2, 1, 4, (12, 12)), (2, 1, 2, (11, 13)), (1, 1, 4, (1, 1)),
    (2, 1, 3, (9, 14)),  # 3 % 2: no shortcut, the upsampled path
]


def _upsampled_weight_grad(x_low, block, hw, dy, w, stride, groups):
    x_hat = unpool_blocks(x_low, block, hw)
    return torch.ops.aten.convolution_backward(
        dy, x_hat, w, None, [stride, stride], [0, 0], [1, 1], False, [0, 0], groups, (False, True, False))[1]


@pytest.mark.parametrize("stride,groups,block,hw", POINTWISE, ids=str)
@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, False), (torch.float32, True),
                                                 (torch.bfloat16, False)])
def test_pointwise_shortcut_equals_the_upsampled_weight_gradient(stride, groups, block, hw, dtype, channels_last):
    """1x1 convs: dy sum-pooled against pool_b(x) is the gradient from the upsampled pool_b(x), on any input."""
    x = torch.randn(2, 4, *hw, dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(6 if groups == 1 else 8, 4 // groups, 1, 1, dtype=dtype, requires_grad=True)
    xx = x.clone().requires_grad_(True)
    y = PooledConv2d.apply(xx, w, None, stride, 0, 1, groups, block, "avg", False, False, "t")
    dy = torch.randn_like(y)
    y.backward(dy)
    ref = _upsampled_weight_grad(pool_blocks(x, block), block, hw, dy, w.detach(), stride, groups)
    if dtype == torch.float32:
        torch.testing.assert_close(w.grad, ref, rtol=1e-5, atol=1e-5)
    else:  # bf16: both sum in fp32 inside the kernels, but round inputs/outputs to 8 bits of mantissa
        assert ((w.grad.float() - ref.float()).norm() / ref.float().norm()).item() < 1e-2
    assert xx.grad is not None and xx.grad.shape == x.shape
    shortcut = conv_mod.pointwise_factor(w.shape, (stride, stride), (0, 0), (0, 0), block)
    assert (shortcut is None) == (block % stride != 0)


def test_pointwise_shortcut_never_builds_the_full_size_input(monkeypatch):
    def fail(*a, **k):
        raise AssertionError("unpool_blocks called: the 1x1 shortcut was not taken")

    monkeypatch.setattr(conv_mod, "unpool_blocks", fail)
    x = torch.randn(2, 4, 12, 12, requires_grad=True)
    w = torch.randn(6, 4, 1, 1, requires_grad=True)
    PooledConv2d.apply(x, w, None, 2, 0, 1, 1, 4, "avg", False, False, "t").sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("bits", [8, 2])
@pytest.mark.parametrize("stride", [1, 2])
def test_coded_pointwise_shortcut_equals_the_upsampled_decoded_gradient(bits, stride):
    x = torch.relu(torch.randn(2, 4, 12, 12))
    w = torch.randn(6, 4, 1, 1, requires_grad=True)
    torch.manual_seed(3)
    y = CodedConv2d.apply(x, w, None, stride, 0, 1, 1, 2, "avg", bits, "t")
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.manual_seed(3)  # the same draw: encode is the forward's only random call
    p = pool_blocks(x, 2)
    x_low = decode(*encode(p, bits), bits, p.shape, torch.float32)
    ref = _upsampled_weight_grad(x_low, 2, (12, 12), dy, w.detach(), stride, 1)
    torch.testing.assert_close(w.grad, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 3, 4, 6), (4, 8, 16, 16), (1, 2, 2, 2), (2, 3, 5, 6), (2, 3, 6, 7)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_pool_blocks_2x2_is_bitwise_avg_pool2d(shape, dtype, layout):
    """The CPU 2x2 fast path (even maps, NCHW) and every fallback give avg_pool2d's bits and strides."""
    x = (torch.randn(shape) * 100).to(dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(shape[0], shape[1] + 1, *shape[2:]).to(dtype)[:, 1:]
    ref = F.avg_pool2d(x, 2, 2, ceil_mode=True)
    got = pool_blocks(x, 2)
    assert torch.equal(got, ref) and got.stride() == ref.stride()
    dy_sum = F.avg_pool2d(x, 2, 2, ceil_mode=True, divisor_override=1)
    w = torch.randn(3, shape[1], 1, 1, dtype=dtype)
    # the same sum inside the pointwise shortcut (stride 1, block 2): dW = sum_pool(dy) against p
    dw = conv_mod.pooled_weight_grad(x[:, :3] if shape[1] >= 3 else x, ref[:, : min(3, shape[1])],
                                     w[: min(3, shape[1]), : min(3, shape[1])], 1, (2, 2))
    ref_dw = torch.ops.aten.convolution_backward(
        dy_sum[:, : min(3, shape[1])], ref[:, : min(3, shape[1])], w[: min(3, shape[1]), : min(3, shape[1])], None,
        [1, 1], [0, 0], [1, 1], False, [0, 0], 1, (False, True, False))[1]
    assert torch.equal(dw, ref_dw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block,divisor", [(2, None), (4, None), (2, 1), (4, 1)])
def test_compiled_cpu_pooling_is_bitwise_avg_pool2d_where_used(monkeypatch, dtype, block, divisor):
    """Eager CPU pooling (pool_blocks, the shortcut's dy sums) runs through an Inductor kernel on NCHW maps the
    window divides; elsewhere ATen's. Either way avg_pool2d's bits and strides."""
    from actcomp.ops import quant
    monkeypatch.setitem(quant.FUSED, "enabled", True)
    used = []
    real = conv_mod.run_fused
    monkeypatch.setattr(conv_mod, "run_fused", lambda fn, what, x: used.append(x.shape) or real(fn, what, x))
    cases = {"nchw": (torch.randn(4, 32, 32, 32), True), "batch 1": (torch.randn(1, 64, 32, 32), True),
             "odd side": (torch.randn(4, 32, 33, 32), False),
             "channels_last": (torch.randn(4, 32, 32, 32).to(memory_format=torch.channels_last), False),
             "small": (torch.randn(2, 8, 16, 16), False)}
    for name, (x, compiled) in cases.items():
        x = (x * 100).to(dtype)
        used.clear()
        ref = F.avg_pool2d(x, block, block, ceil_mode=True, divisor_override=divisor)
        got = conv_mod._avg_pool(x, (block, block), divisor)
        assert torch.equal(got, ref) and got.stride() == ref.stride(), name
        assert bool(used) == compiled, name
    assert quant.FUSED["enabled"]  # no compile failure and no recompile-limit hit on the way
