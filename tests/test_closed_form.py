"""Closed-form backward of the int8-coded norms and smooth activations (actcomp/ops/norm.py, act.py).

Each converted op must give the gradients autograd of the native op gives at the decoded input x̃ (BatchNorm in
training mode: with the exact batch statistics of x, which its forward returns and the op keeps) — to fp32
rounding for the norms (their statistics are reduced in a different order), bitwise for the activations (the same
native derivative kernels) — with the forward output bitwise native and no forward op re-run in backward.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import actcomp
from actcomp.ops import dequantize_uint8, quantize_uint8

WHOLE_SET = {"preset": "full4", "block": 1}  # the whole-set settings, nothing to pool in a bare op


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _decoded(x):
    return dequantize_uint8(*quantize_uint8(x), x.dtype)


def _run(m, x, dy):
    xi = x.clone().requires_grad_(True)
    y = m(xi * 1.0)  # non-leaf input, as inside a network
    y.backward(dy)
    return y.detach(), xi.grad, {n: p.grad for n, p in m.named_parameters()}


def _perturbed(m):
    m = copy.deepcopy(m).train()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.3)
    return m


ACTS = [nn.SiLU(), nn.GELU(), nn.GELU(approximate="tanh"), nn.Sigmoid(), nn.Tanh(), nn.Hardswish(),
        nn.Hardsigmoid(), nn.Mish(), nn.ELU(0.5), nn.CELU(0.7), nn.SELU(), nn.SiLU(inplace=True),
        nn.Hardswish(inplace=True)]


@pytest.mark.parametrize("act", ACTS, ids=lambda m: repr(m))
def test_activation_gradient_is_native_derivative_at_decoded_input(act):
    x = torch.randn(4, 8, 10, 10, generator=torch.Generator().manual_seed(0)) * 3 + 1
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    y0, _, _ = _run(copy.deepcopy(act), x, dy)
    _, g_ref, _ = _run(copy.deepcopy(act), _decoded(x), dy)
    y1, g1, _ = _run(actcomp.compress(copy.deepcopy(act), WHOLE_SET), x, dy)
    assert torch.equal(y1, y0)
    assert torch.equal(g1, g_ref)


class _Functional(nn.Module):
    """Calls timm and user code make without an activation module."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


@pytest.mark.parametrize("fn", [torch.sigmoid, torch.Tensor.sigmoid, lambda x: x.sigmoid_(), torch.tanh,
                                lambda x: F.gelu(x, approximate="tanh"), lambda x: F.elu(x, 0.3, False),
                                lambda x: F.celu(x, alpha=2.0), lambda x: F.hardsigmoid(x, True)])
def test_functional_call_forms_take_the_closed_form(fn):
    x = torch.randn(4, 8, 10, 10, generator=torch.Generator().manual_seed(0)) * 3
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    act = _Functional(fn)
    # convert judges activations by the module's home: pose as one of torch's activation modules
    act.__class__ = type("Act", (_Functional,), {"__module__": "torch.nn.modules.activation"})
    native = _run(copy.deepcopy(act), _decoded(x), dy)
    c = actcomp.compress(copy.deepcopy(act), WHOLE_SET)
    xi = x.clone().requires_grad_(True)
    y = c(xi * 1.0)
    assert type(y.grad_fn).__name__ == "ClosedFormActivationBackward"
    y.backward(dy)
    assert torch.equal(xi.grad, native[1])


def _bn_reference(m, x, dy):
    """BatchNorm in training mode: the native backward kernel at x̃ with the batch statistics of x itself (the
    forward's, which the op keeps: 2 floats per channel)."""
    dims = [0, *range(2, x.dim())]
    var, mean = torch.var_mean(x, dims, correction=0)
    w = m.weight.detach() if m.weight is not None else None
    mask = [True, m.weight is not None, m.bias is not None]
    dx, dw, db = torch.ops.aten.native_batch_norm_backward(dy, _decoded(x), w, None, None, mean,
                                                           (var + m.eps).rsqrt(), True, m.eps, mask)
    return dx, ({"weight": dw, "bias": db} if m.weight is not None else {})


def _ln2d_reference(m, x, dy):
    """timm LayerNorm2d normalizes the NHWC permute: the code is taken of that tensor."""
    xp = _decoded(x.permute(0, 2, 3, 1)).detach().requires_grad_(True)
    m = copy.deepcopy(m)
    y = F.layer_norm(xp, m.normalized_shape, m.weight, m.bias, m.eps).permute(0, 3, 1, 2)
    y.backward(dy)
    return xp.grad.permute(0, 3, 1, 2), {n: p.grad for n, p in m.named_parameters()}


NORMS = [
    ("bn", lambda: nn.BatchNorm2d(16), (8, 16, 14, 14), False),
    ("bn_channels_last", lambda: nn.BatchNorm2d(16), (8, 16, 14, 14), True),
    ("bn_small_map", lambda: nn.BatchNorm2d(16), (8, 16, 3, 3), False),
    ("bn_no_affine", lambda: nn.BatchNorm2d(16, affine=False), (8, 16, 14, 14), False),
    ("bn_no_running_stats", lambda: nn.BatchNorm2d(16, track_running_stats=False), (8, 16, 6, 6), False),
    ("bn1d", lambda: nn.BatchNorm1d(16), (32, 16), False),
    ("ln_last_dim", lambda: nn.LayerNorm(64), (8, 49, 64), False),
    ("ln_short_rows", lambda: nn.LayerNorm(32), (8, 9, 32), False),
    ("ln_last_two_dims", lambda: nn.LayerNorm([7, 64]), (8, 7, 64), False),
    ("ln_no_affine", lambda: nn.LayerNorm(64, elementwise_affine=False), (8, 49, 64), False),
    ("gn_groups_lt_channels", lambda: nn.GroupNorm(4, 16), (8, 16, 14, 14), False),
    ("gn_groups_eq_channels", lambda: nn.GroupNorm(16, 16), (8, 16, 14, 14), False),
    ("gn_one_group_small_map", lambda: nn.GroupNorm(1, 16), (8, 16, 5, 5), False),
    ("gn_channels_last", lambda: nn.GroupNorm(4, 16), (8, 16, 14, 14), True),
    ("timm_layernorm2d", lambda: timm.layers.LayerNorm2d(16), (8, 16, 14, 14), False),
]


@pytest.mark.parametrize("make,shape,cl", [n[1:] for n in NORMS], ids=[n[0] for n in NORMS])
def test_norm_gradient_is_native_autograd_at_decoded_input(make, shape, cl):
    base = _perturbed(make())
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3 + 1
    if cl:
        x = x.to(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(2))
    m0, m1 = copy.deepcopy(base), actcomp.compress(copy.deepcopy(base), WHOLE_SET)
    y0, _, _ = _run(m0, x, dy)
    y1, g1, p1 = _run(m1, x, dy)
    assert torch.equal(y1, y0)
    for k in base.state_dict():  # running statistics updated exactly once, as native's
        assert torch.equal(m1.state_dict()[k], m0.state_dict()[k]), k
    if isinstance(base, timm.layers.LayerNorm2d):
        g_ref, p_ref = _ln2d_reference(base, x, dy)
    elif isinstance(base, nn.modules.batchnorm._BatchNorm):
        g_ref, p_ref = _bn_reference(base, x, dy)
    else:
        _, g_ref, p_ref = _run(copy.deepcopy(base), _decoded(x), dy)
    assert _rel(g1, g_ref) < 1e-5
    for n, g in p_ref.items():
        assert _rel(p1[n], g) < 1e-5, n


def test_batchnorm_eval_statistics_inside_training_module():
    # F.batch_norm(training=False) from a module in training mode (frozen statistics): backward uses them.
    class Frozen(nn.BatchNorm2d):
        def forward(self, x):
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)

    base = _perturbed(Frozen(8))
    base.running_mean.uniform_(-1, 1)
    base.running_var.uniform_(0.5, 2)
    x = torch.randn(4, 8, 10, 10, generator=torch.Generator().manual_seed(0)) * 2
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    y0, _, _ = _run(copy.deepcopy(base), x, dy)
    _, g_ref, p_ref = _run(copy.deepcopy(base), _decoded(x), dy)
    y1, g1, p1 = _run(actcomp.compress(copy.deepcopy(base), WHOLE_SET), x, dy)
    assert torch.equal(y1, y0)
    assert _rel(g1, g_ref) < 1e-6
    assert _rel(p1["weight"], p_ref["weight"]) < 1e-5 and torch.equal(p1["bias"], p_ref["bias"])


class _AtenOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_backward_runs_no_forward_of_the_op():
    m = actcomp.compress(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.SiLU(), nn.GroupNorm(2, 8),
                                       nn.GELU(), nn.Flatten(2), nn.LayerNorm(36), nn.Sigmoid()), "full4")
    y = m(torch.randn(2, 3, 8, 8))
    with _AtenOps() as ops:
        y.sum().backward()
    # (sigmoid itself does run: σ(x̃) is part of its derivative σ(1 − σ))
    forwards = {"native_batch_norm", "_native_batch_norm_legit", "native_layer_norm", "native_group_norm",
                "silu", "gelu"}
    assert not ops.seen & forwards, ops.seen & forwards
    assert {"native_batch_norm_backward", "native_group_norm_backward", "native_layer_norm_backward",
            "silu_backward", "gelu_backward", "sigmoid_backward"} <= ops.seen


def test_bf16_autocast_gradients_match_native_dtype_and_are_close():
    base = _perturbed(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.SiLU(),
                                    nn.GroupNorm(2, 8), nn.GELU()))
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for spec in (None, {"preset": "full4", "block": 1}):
        m = copy.deepcopy(base)
        if spec:
            actcomp.compress(m, spec)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        y.float().square().mean().backward()
        grads.append({n: p.grad for n, p in m.named_parameters()})
    for n, g in grads[0].items():
        assert grads[1][n].dtype == g.dtype and _rel(grads[1][n], g) < 0.05, n
