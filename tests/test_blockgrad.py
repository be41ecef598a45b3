"""k×k weight gradients from a pooled input at block resolution (actcomp/ops/blockgrad.py): the value of the
upsampled formulation (up to summation order), without building the full-size input, and the fallbacks."""
import pytest
import torch

from actcomp.ops import CodedConv2d, PooledConv2d, blockgrad, decode, encode, pool_blocks, unpool_blocks
from actcomp.ops import conv as conv_mod

GEOMETRIES = [  # (cin, cout, k, stride, padding, groups)
    (8, 6, 3, 1, 1, 1), (8, 6, 3, 2, 1, 1), (8, 6, 5, 1, 2, 1), (8, 6, 5, 2, 2, 1), (8, 6, 3, 1, 0, 1),
    (8, 6, 2, 2, 0, 1), (8, 6, 1, 1, 1, 1), (16, 8, 3, 1, 1, 2), (8, 8, 5, 1, 2, 8), (8, 8, 5, 2, 2, 8),
    (8, 8, 3, 2, 1, 8), (8, 16, 5, 1, 2, 8),  # last: depthwise with a channel multiplier (the grouped path)
]


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _upsampled(x_low, block, hw, dy, w, stride, padding, groups):
    return torch.ops.aten.convolution_backward(
        dy, unpool_blocks(x_low, block, hw), w, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0], groups,
        (False, True, False))[1]


def _run(x, w, geo, block, dy=None):
    *_, stride, padding, groups = geo
    xx = x.clone().requires_grad_(True)
    ww = w.clone().requires_grad_(True)
    y = PooledConv2d.apply(xx, ww, None, stride, padding, 1, groups, block, "avg", False, False, "t")
    dy = torch.randn_like(y) if dy is None else dy
    y.backward(dy)
    return xx.grad, ww.grad, dy


@pytest.mark.parametrize("geo", GEOMETRIES, ids=str)
@pytest.mark.parametrize("block", [4, 8])
def test_block_weight_grad_equals_the_upsampled_gradient_without_upsampling(monkeypatch, geo, block):
    cin, cout, k, stride, padding, groups = geo
    monkeypatch.setattr(conv_mod, "unpool_blocks", lambda *a: pytest.fail("upsampled the input"))
    x = torch.randn(4, cin, 32, 16)
    w = torch.randn(cout, cin // groups, k, k)
    gx, gw, dy = _run(x, w, geo, block)
    assert _rel(gw, _upsampled(pool_blocks(x, block), block, (32, 16), dy, w, stride, padding, groups)) < 1e-5
    # the input gradient is the native one, bit for bit
    ref = torch.ops.aten.convolution_backward(dy, x, w, None, [stride] * 2, [padding] * 2, [1, 1], False, [0, 0],
                                              groups, (True, False, False))[0]
    assert torch.equal(gx, ref)


@pytest.mark.parametrize("dtype,channels_last", [(torch.float32, True), (torch.bfloat16, False)])
def test_block_weight_grad_other_layouts_and_dtypes(dtype, channels_last):
    geo = GEOMETRIES[0]
    x = torch.randn(8, 8, 32, 32).to(dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(6, 8, 3, 3).to(dtype)
    gx, gw, dy = _run(x, w, geo, 4)
    assert gw.dtype == dtype and gx.shape == x.shape
    ref = _upsampled(pool_blocks(x, 4).float(), 4, (32, 32), dy.float(), w.float(), 1, 1, 1)
    assert _rel(gw, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("case", ["dilation", "partial blocks", "asymmetric same", "block 3 stride 2",
                                  "depthwise 3x3 stride 1", "stride = block", "few input channels"])
def test_block_weight_grad_falls_back_to_upsampling(monkeypatch, case):
    calls = []
    real = conv_mod.unpool_blocks
    monkeypatch.setattr(conv_mod, "unpool_blocks", lambda *a: calls.append(1) or real(*a))
    hw, padding, dilation, k, stride, block, groups, cin = (16, 16), 1, 1, 3, 1, 4, 1, 8
    if case == "dilation":
        padding, dilation = 2, 2
    elif case == "partial blocks":
        hw = (18, 16)
    elif case == "asymmetric same":
        padding, k = "same", 4
    elif case == "block 3 stride 2":
        stride, block = 2, 3
    elif case == "depthwise 3x3 stride 1":  # the native kernels measured as fast or faster (see blockgrad.py)
        groups = 8
    elif case == "stride = block":
        stride, block = 2, 2
    else:
        cin = 3
    x = torch.randn(2, cin, *hw, requires_grad=True)
    w = torch.randn(6 if groups == 1 else cin, cin // groups, k, k, requires_grad=True)
    y = PooledConv2d.apply(x, w, None, stride, padding, dilation, groups, block, "avg", False, False, "t")
    dy = torch.randn_like(y)
    y.backward(dy)
    assert calls  # the upsampled path
    assert torch.isfinite(w.grad).all()
    assert blockgrad.block_factor(w.shape, (stride,) * 2, (1, 1), (0, 0), (dilation,) * 2, block, hw, groups) is None \
        or case == "asymmetric same"  # 'same' with an even kernel: caught by its extra padding


def test_coded_conv_weight_grad_at_block_resolution(monkeypatch):
    monkeypatch.setattr(conv_mod, "unpool_blocks", lambda *a: pytest.fail("upsampled the input"))
    x = torch.randn(4, 8, 16, 16)
    w = torch.randn(6, 8, 3, 3, requires_grad=True)
    torch.manual_seed(0)
    y = CodedConv2d.apply(x.clone().requires_grad_(True), w, None, 1, 1, 1, 1, 4, "avg", 8, "t")
    dy = torch.randn_like(y)
    y.backward(dy)
    torch.manual_seed(0)
    p = pool_blocks(x, 4)
    x_low = decode(*encode(p, 8), 8, p.shape, torch.float32)
    monkeypatch.undo()
    assert _rel(w.grad, _upsampled(x_low, 4, (16, 16), dy, w.detach(), 1, 1, 1)) < 1e-5


@pytest.mark.parametrize("block,stride", [(2, 1), (4, 1), (4, 2)])
def test_block_weight_grad_is_closer_to_fp64_than_native_fp32_on_block_constant_input(block, stride):
    """On an input constant over the blocks there is nothing to approximate: the block sums then add fewer fp32
    terms than native's kernel, and land closer to the fp64 gradient (measured ~3e-7 vs ~1.5e-6)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, 8, 8, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
    w = torch.randn(32, 16, 3, 3, generator=g)
    dy = torch.randn(8, 32, 32 // stride, 32 // stride, generator=g)

    def native(dy, x, w):
        return torch.ops.aten.convolution_backward(dy, x, w, None, [stride] * 2, [1, 1], [1, 1], False, [0, 0], 1,
                                                   (False, True, False))[1]

    exact = native(dy.double(), x.double(), w.double())
    f = (block // stride,) * 2
    ours = blockgrad.block_weight_grad(dy, pool_blocks(x, block), w.shape, (stride,) * 2, (1, 1), 1, f)
    assert _rel(ours.double(), exact) <= _rel(native(dy, x, w).double(), exact)
