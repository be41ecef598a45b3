"""The activation after a BatchNorm saves the norm input's code (actcomp/ops/norm.py: output_code).

BatchNorm in training mode outputs y = a·x + c per channel, so the uint8 code of x is a code of y with
lo' = a·lo + c, scale' = a·scale: the activation saves the same uint8 tensor (no bytes, no quantize pass) and
gets the same error bound as a code of y made directly.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import BatchNormAct2d, GroupNormAct

import actcomp
from actcomp.ops import dequantize_uint8, quantize_uint8
from actcomp.ops.norm import output_code
from actcomp.ops.quant import group_shape

WHOLE_SET = {"preset": "full4", "block": 1}
SHARED = "code shared with the norm input"


def _bn_act(c=8, **kw):
    m = BatchNormAct2d(c, act_layer=nn.SiLU, **kw)
    with torch.no_grad():  # negative and zero scales too: lo'/scale' then flip sign or vanish
        m.weight.copy_(torch.linspace(-2, 2, c))
        m.weight[1] = 0.0
        m.bias.copy_(torch.linspace(-1, 1, c))
    return m


@pytest.mark.parametrize("shape", [(4, 8, 10, 10), (4, 8, 3, 3), (1, 8, 3, 3), (1, 8, 9, 9)],
                         ids=["planes", "channels", "one-sample-small", "one-sample"])
def test_output_code_is_a_code_of_the_batchnorm_output_within_the_direct_bound(shape):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * torch.linspace(0.1, 5, shape[1]).view(1, -1, 1, 1) + 3
    m = _bn_act(shape[1])
    y, mean, rstd, _, _ = torch.ops.aten._batch_norm_impl_index(x, m.weight, m.bias, None, None, True, 0.1, 1e-5,
                                                                False)
    q, lo, scale = quantize_uint8(x)
    lo2, scale2 = output_code(x.shape, lo, scale, m.weight, m.bias, (mean, rstd))
    assert lo2.shape == scale2.shape == (group_shape(shape)[0], 1)
    err = (dequantize_uint8(q, lo2, scale2, torch.float32) - y).abs()
    rows = err.transpose(0, 1).reshape(shape[1], -1) if group_shape(shape)[0] == shape[1] and shape[0] > 1 else \
        err.reshape(group_shape(shape))
    assert (rows.amax(1, keepdim=True) <= scale2.abs() / 2 * (1 + 1e-4) + 1e-6).all()
    # the bound equals that of a code of y made directly: its range is |a| times x's
    _, _, scale_y = quantize_uint8(y)
    live = scale_y > 1e-6
    assert torch.allclose(scale2.abs()[live], scale_y[live], rtol=1e-4)


def test_output_code_is_empty_without_statistics_or_for_non_maps():
    q, lo, scale = quantize_uint8(torch.randn(4, 8, 10, 10))
    assert output_code((4, 8, 10, 10), lo, scale, None, None, ())[0].numel() == 0
    assert output_code((4, 80), lo, scale, None, None, (torch.zeros(80), torch.ones(80)))[0].numel() == 0


def _grads(m, x, dz):
    xi = x.clone().requires_grad_(True)
    z = m(xi * 1.0)
    z.backward(dz)
    return z.detach(), xi.grad, [p.grad.clone() for p in m.parameters()]


def test_batchnorm_act_saves_one_code_and_gradient_is_the_derivative_at_the_shared_code():
    x = torch.randn(4, 8, 10, 10, generator=torch.Generator().manual_seed(0)) * 2 + 1
    dz = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    native = _bn_act()
    m = actcomp.compress(copy.deepcopy(native), WHOLE_SET).train()
    # bytes: the BN's code (1 byte/element + lo, scale per (n, c) plane) and statistics (mean, rstd per channel);
    # the activation adds only its lo', scale' per plane
    assert actcomp.saved_bytes(m, x).total_bytes == 4 * 8 * 100 + 8 * 32 + 8 * 8 + 8 * 32
    rows = actcomp.summary(m, x)
    act = rows[rows.op == "silu"].iloc[0]
    assert act.note == SHARED and act.saved_bytes_compressed == 8 * 32

    z, dx, dp = _grads(m, x, dz)
    z0, _, _ = _grads(copy.deepcopy(native), x, dz)
    assert torch.equal(z, z0)  # forward exact
    # reference: SiLU's derivative at ỹ (the input's code mapped through the BN affine), fed into the same
    # compressed BatchNorm alone
    y, mean, rstd, _, _ = torch.ops.aten._batch_norm_impl_index(x, native.weight, native.bias, None, None, True,
                                                                0.1, 1e-5, False)
    q, lo, scale = quantize_uint8(x)
    y_tilde = dequantize_uint8(q, *output_code(x.shape, lo, scale, native.weight, native.bias, (mean, rstd)),
                               torch.float32)
    dy = torch.ops.aten.silu_backward(dz, y_tilde)
    bn = nn.BatchNorm2d(8)
    bn.load_state_dict(native.state_dict())
    _, dx_ref, dp_ref = _grads(actcomp.compress(bn, WHOLE_SET).train(), x, dy)
    assert torch.equal(dx, dx_ref)
    assert all(torch.equal(a, b) for a, b in zip(dp, dp_ref))

    actcomp.restore(m)
    assert type(m.act) is nn.SiLU and "_actcomp" not in m.act.__dict__


def test_unshared_where_something_runs_between_norm_and_act():
    x = torch.randn(4, 8, 10, 10, generator=torch.Generator().manual_seed(0))
    dz = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    # a drop layer between them: the act codes its own input
    m = actcomp.compress(_bn_act(drop_layer=nn.Dropout), WHOLE_SET).train()
    rows = actcomp.summary(m, x)
    assert (rows[rows.op == "silu"].note != SHARED).all()
    assert rows[rows.op == "silu"].saved_bytes_compressed.iloc[0] == 4 * 8 * 100 + 8 * 32

    # same structure, but the forward changes the norm's output before the act: the act's input is not the
    # norm's output, so it codes its own (gradients bitwise those of the same ops as separate modules)
    class Scaled(BatchNormAct2d):
        def forward(self, x):
            return self.act(F.batch_norm(x, None, None, self.weight, self.bias, True, 0.1, self.eps) * 2)

    class Twice(nn.Module):
        def forward(self, x):
            return x * 2

    odd = _bn_act()
    odd.__class__ = Scaled
    seq = nn.Sequential(nn.BatchNorm2d(8, track_running_stats=False), Twice(), nn.SiLU())
    seq[0].load_state_dict({k: v for k, v in odd.state_dict().items() if k in ("weight", "bias")})
    a = _grads(actcomp.compress(odd, WHOLE_SET).train(), x, dz)
    b = _grads(actcomp.compress(seq, WHOLE_SET).train(), x, dz)
    assert (actcomp.summary(odd, x).note != SHARED).all()
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert all(torch.equal(p, r) for p, r in zip(a[2], b[2]))


def test_group_norm_act_keeps_its_act_compressed_without_sharing():
    m = GroupNormAct(8, 2, act_layer=nn.SiLU)
    x = torch.randn(4, 8, 10, 10)
    c = actcomp.compress(copy.deepcopy(m), WHOLE_SET).train()
    rows = actcomp.summary(c, x)
    act = rows[rows.op == "silu"].iloc[0]
    assert act.note == "" and act.saved_bytes_compressed == 4 * 8 * 100 + 8 * 32
    z, dx, _ = _grads(c, x, torch.ones_like(x))
    z0, dx0, _ = _grads(m, x, torch.ones_like(x))
    assert torch.equal(z, z0) and ((dx - dx0).norm() / dx0.norm()).item() < 0.02


def test_timm_efficientnet_shares_every_batchnorm_silu_pair():
    m = actcomp.compress(timm.create_model("efficientnet_b0", num_classes=10), "full4").train()
    rows = actcomp.summary(m, torch.randn(2, 3, 64, 64))
    silu = rows[rows.op == "silu"]
    after_bn = silu.layer.str.endswith(".act") | (silu.layer == "bn1.act")
    assert after_bn.sum() == 33 and (silu[after_bn].note == SHARED).all()
    assert (silu[~after_bn].note != SHARED).all()  # the squeeze-excite SiLUs follow a conv


def test_backward_makes_no_zero_gradient_for_the_shared_code():
    # The norm returns the code as extra, non-differentiable outputs; autograd would hand backward a zero
    # gradient for each (a full-size uint8 temporary: +14 MB on MobileNetV2's predicted peak before the fix).
    from torch.utils._python_dispatch import TorchDispatchMode

    class ZeroCodes(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if "zeros" in str(func) and out.dtype == torch.uint8:  # a zero gradient for the code
                self.seen.append((str(func), out.numel()))
            return out

    m = actcomp.compress(_bn_act(), WHOLE_SET).train()
    z = m(torch.randn(4, 8, 10, 10, requires_grad=True) * 1.0)
    with ZeroCodes() as mode:
        z.sum().backward()
    assert not mode.seen, mode.seen
