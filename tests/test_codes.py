"""CodedConv2d (actcomp.ops.code): exact forward and input gradient, packed sizes, unbiased and reproducible codes."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import actcomp
from actcomp import ActcompError
from actcomp.ops import CodedConv2d, PooledConv2d, coded_nbytes, decode, encode, pack_codes, unpack_codes
from actcomp.ops.code import code_groups

GEOMETRIES = [  # (cin, cout, k, stride, padding, dilation, groups, bias)
    (4, 6, 3, 1, 1, 1, 1, True),
    (4, 6, 3, 2, 1, 1, 1, False),
    (4, 6, 3, 1, 2, 2, 1, True),
    (4, 4, 3, 1, 1, 1, 4, False),  # depthwise
    (4, 6, 1, 1, 0, 1, 1, True),
    (4, 6, 4, 1, "same", 1, 1, False),  # asymmetric 'same'
    (4, 6, 5, 2, 2, 1, 1, True),
]


def _params(geo):
    cin, cout, k, *_, g, bias = geo
    w = torch.randn(cout, cin // g, k, k, requires_grad=True)
    b = torch.randn(cout, requires_grad=True) if bias else None
    return w, b


def _run(fn, x, w, b, dy):
    for t in (x, w, b):
        if t is not None:
            t.grad = None
    out = fn(x, w, b)
    out.backward(dy)
    return out.detach(), [t.grad.clone() for t in (x, w, b) if t is not None]


def _coded(geo, block, bits):
    _, _, _, s, p, d, g, _ = geo
    return lambda x, w, b: CodedConv2d.apply(x, w, b, s, p, d, g, block, "avg", bits, "t")


def _native(geo):
    _, _, _, s, p, d, g, _ = geo
    return lambda x, w, b: F.conv2d(x, w, b, s, p, d, g)


# ------------------------------------------------------------------------------------------ packing and sizes

@pytest.mark.parametrize("bits", [8, 4, 2])
def test_pack_roundtrip_and_hand_computed_sizes(bits):
    q = torch.randint(0, 2**bits, (105,), dtype=torch.uint8)  # odd: the last byte is part padding
    packed = pack_codes(q, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == {8: 105, 4: 53, 2: 27}[bits]
    assert torch.equal(unpack_codes(packed, bits, 105), q)
    # (1, 3, 5, 7): a 35-pixel plane < 64, so one group per channel: 3 groups of 35, 8 bytes (lo, scale) each
    assert code_groups((1, 3, 5, 7)) == (3, 35) and code_groups((2, 3, 5, 7)) == (3, 70)
    assert code_groups((2, 3, 8, 8)) == (6, 64)
    assert coded_nbytes((1, 3, 5, 7), bits) == {8: 105, 4: 53, 2: 27}[bits] + 24
    assert coded_nbytes((2, 3, 9, 9), bits) == {8: 486, 4: 243, 2: 122}[bits] + 48


@pytest.mark.parametrize("bits", [8, 4, 2])
def test_saved_storage_is_the_packed_size(bits):
    conv = nn.Conv2d(3, 5, 3, padding=1)
    actcomp.compress(conv, {"conv_bits": bits, "name": f"q{bits}"})
    x = torch.randn(2, 3, 9, 11)
    rep = actcomp.saved_bytes(conv, x)
    # 2 planes of 99 pixels per channel: per-plane groups; weight excluded (a parameter)
    assert rep.by_kind == {"conv input": coded_nbytes((2, 3, 9, 11), bits)}
    assert rep.total_bytes == -(-2 * 3 * 99 * bits // 8) + 8 * 6
    table = actcomp.summary(conv, x)
    assert list(table.bits) == [bits] and list(table.saved_bytes_compressed) == [rep.total_bytes]


def test_pooled_then_coded_bytes_equal_pool4_on_large_maps():
    # p2q8: 2x2 pooled, one byte per pooled element = a quarter byte per input element, as pool4's fp32 floats
    x = torch.randn(2, 8, 32, 32)
    got = {}
    for preset in ("pool4", "p2q8", "q8", "q4", "q2", "p2q4"):
        conv = actcomp.compress(nn.Conv2d(8, 8, 3, padding=1), preset)
        got[preset] = actcomp.saved_bytes(conv, x).total_bytes
    n = x.numel()
    groups = 16 * 8  # (lo, scale) fp32 pair per (n, c) plane
    assert got["pool4"] == n // 4 and got["p2q8"] == n // 4 + groups
    assert got["q8"] == n + groups and got["q4"] == n // 2 + groups and got["q2"] == n // 4 + groups
    assert got["p2q4"] == n // 8 + groups


# ------------------------------------------------------------------------------------------ exactness

@pytest.mark.parametrize("block", [1, 2])
@pytest.mark.parametrize("bits", [8, 4, 2])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=str)
def test_forward_input_and_bias_grads_bitwise_native(geo, bits, block):
    w, b = _params(geo)
    x = torch.randn(2, 4, 11, 13, requires_grad=True)
    ref = _native(geo)(x, w, b)
    dy = torch.randn_like(ref)
    out0, g0 = _run(_native(geo), x, w, b, dy)
    out1, g1 = _run(_coded(geo, block, bits), x, w, b, dy)
    assert torch.equal(out0, out1)
    assert torch.equal(g0[0], g1[0])  # input gradient
    if b is not None:
        assert torch.equal(g0[2], g1[2])
    if block == 1:  # the weight gradient is approximate; bounds for N(0, 1) inputs, well above the measured errors
        rel = ((g1[1] - g0[1]).norm() / g0[1].norm()).item()
        assert rel < {8: 0.02, 4: 0.3, 2: 1.5}[bits], rel


@pytest.mark.parametrize("bits", [4, 2])
def test_inputs_on_the_code_grid_give_the_native_weight_gradient(bits):
    # Integer inputs spanning 0..2^bits-1 in every (n, c) plane: scale 1, every value on the grid, so the code is
    # exact whatever the random draw, and the weight gradient is the native one.
    geo = (4, 6, 3, 1, 1, 1, 1, True)
    w, b = _params(geo)
    x = torch.randint(0, 2**bits, (2, 4, 9, 9)).float()
    x[:, :, 0, 0], x[:, :, 0, 1] = 0, 2**bits - 1
    x.requires_grad_(True)
    dy = torch.randn(2, 6, 9, 9)
    _, g0 = _run(_native(geo), x, w, b, dy)
    _, g1 = _run(_coded(geo, 1, bits), x, w, b, dy)
    assert torch.allclose(g0[1], g1[1], rtol=1e-6, atol=1e-6)


def _relu_input(shape, seed=1):
    g = torch.Generator().manual_seed(seed)
    return F.relu(torch.randn(shape, generator=g) + 0.3)  # post-ReLU: skewed, many exact zeros


@pytest.mark.parametrize("bits,block", [(2, 1), (4, 1), (8, 2)])
def test_codes_are_unbiased(bits, block):
    """Mean weight gradient over many draws -> the uncoded one (native at b=1, pool-b's at b>1), error ~1/sqrt(N).

    A batch of N copies of one sample draws N independent codes (one group per (n, c) plane), and the weight
    gradient sums over the batch: divided by N it is the mean of N single-draw gradients, in one call.
    """
    geo = (8, 8, 3, 1, 1, 1, 1, False)
    w, _ = _params(geo)
    x1 = _relu_input((1, 8, 16, 16))
    dy1 = torch.randn(1, 8, 16, 16)
    _, _, _, s, p, d, g, _ = geo

    def pooled(x, w, b):
        return PooledConv2d.apply(x, w, b, s, p, d, g, block, "avg", False, False, "t")

    exact = _run(_native(geo) if block == 1 else pooled, x1.clone().requires_grad_(True), w, None, dy1)[1][1]

    def err(n, reps=4):  # relative L2 error of the mean of n draws, averaged over ``reps`` independent means
        x = x1.expand(n, -1, -1, -1).clone().requires_grad_(True)
        out = []
        for _ in range(reps):
            mean = _run(_coded(geo, block, bits), x, w, None, dy1.expand(n, -1, -1, -1))[1][1] / n
            out.append(((mean - exact).norm() / exact.norm()).item())
        return sum(out) / reps

    e1, e16, e256 = err(1), err(16), err(256)
    # Unbiased: the error falls as 1/sqrt(N) (16x more draws -> 4x less error); a bias would make it level off.
    assert e16 < e1 / 3 and e256 < e16 / 3, (e1, e16, e256)


def test_bitwise_determinism_under_a_fixed_seed():
    geo = (4, 6, 3, 1, 1, 1, 1, True)
    w, b = _params(geo)
    x = _relu_input((2, 4, 12, 12)).requires_grad_(True)
    dy = torch.randn(2, 6, 12, 12)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(_run(_coded(geo, 1, 2), x, w, b, dy)[1][1])
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    # the codes themselves, on a whole model too
    torch.manual_seed(3)
    a = encode(x.detach(), 4)
    torch.manual_seed(3)
    assert all(torch.equal(s, t) for s, t in zip(a, encode(x.detach(), 4)))
    assert decode(*a, 4, x.shape, torch.float32).shape == x.shape


def test_model_steps_are_bitwise_reproducible():
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, stride=2), nn.SiLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    x = torch.randn(2, 3, 16, 16)
    grads = []
    for _ in range(2):
        m = actcomp.compress(copy.deepcopy(base), "full_q2")
        torch.manual_seed(11)
        m(x).logsumexp(1).mean().backward()
        grads.append([p.grad.clone() for p in m.parameters()])
    assert all(torch.equal(a, c) for a, c in zip(*grads))


# The coded presets share one conv op over (block, bits) and the whole-set ops of full2/full4; the every-preset
# tests across timm families (test_convert.py, test_compile.py) take these three, which cover its paths: packed
# 2-bit at full resolution, 2x2-pooled then packed 4-bit, 8-bit with the whole set. Every coded preset runs below.
CODED_PRESETS = [p for p, c in actcomp.PRESETS.items() if c.conv_bits is not None]
CODED_REPRESENTATIVES = ("q2", "p2q4", "full_q8")


@pytest.mark.parametrize("family", ["test_resnet", "test_efficientnet"])
def test_every_coded_preset_keeps_forward_and_trains_a_step(family):
    import timm

    assert set(CODED_REPRESENTATIVES) <= set(CODED_PRESETS)
    torch.manual_seed(0)
    base = timm.create_model(family, num_classes=10).train()
    x = torch.randn(2, 3, 32, 32)
    ref = base(x)
    for preset in CODED_PRESETS:
        m = actcomp.compress(copy.deepcopy(base), preset)
        out = m(x)
        assert torch.equal(out, ref), preset
        out.logsumexp(1).mean().backward()
        assert all(c.weight.grad is not None for c in m.modules() if isinstance(c, nn.Conv2d)), preset


# ------------------------------------------------------------------------------------------ config and accounting

@pytest.mark.parametrize("bad,msg", [
    ({"conv_bits": 3}, "conv_bits must be one of 8, 4, 2 or None"),
    ({"conv_bits": "4"}, "conv_bits must be one of"),
    ({"conv_bits": True}, "conv_bits must be one of"),
    ({"conv_bits": 8.0}, "conv_bits must be one of"),
    ({"conv_bits": {}}, "conv_bits mapping is empty"),
    ({"conv_bits": {"layer1.*": 16}}, r"conv_bits\['layer1.\*'\] must be one of"),
    ({"conv_bits": {1: 4}}, "conv_bits pattern must be a string"),
    ({"conv_bits": 4, "copy_b1": True}, "cannot be combined with copy_b1"),
    ({"conv_bits": 4, "grad_filter": True, "block": 2}, "cannot be combined with grad_filter"),
    ({"conv_bits": 4, "peer": "int8"}, "stand-alone baseline"),
])
def test_bad_conv_bits_is_a_one_line_error(bad, msg):
    with pytest.raises(ActcompError, match=msg) as e:
        actcomp.CompressionConfig(**bad)
    assert "\n" not in str(e.value)
    conv = actcomp.compress(nn.Sequential(nn.Conv2d(3, 3, 3)), "pool2")
    with pytest.raises(ActcompError, match=msg):
        actcomp.compress(conv, bad)
    assert actcomp.config_of(conv).name == "pool2"


def test_per_layer_bits_mapping():
    import timm

    m = timm.create_model("resnet18", channels=(16, 32, 64, 128), stem_width=16, num_classes=10)
    actcomp.compress(m, {"block": {"layer4.*": 2}, "conv_bits": {"layer1.*": 4, "layer3.*": None, "*": 8},
                         "name": "mixed"})
    assert m.layer1[0].conv1._actcomp.bits == 4 and m.layer2[0].conv1._actcomp.bits == 8
    assert m.layer4[0].conv1._actcomp.bits == 8 and m.layer4[0].conv1._actcomp.block == 2
    assert not hasattr(m.layer3[0].conv1, "_actcomp")  # no pooling, no code: native
    table = actcomp.summary(m, torch.randn(2, 3, 64, 64)).set_index("layer")
    assert table.loc["layer1.0.conv2", "bits"] == 4 and table.loc["conv1", "bits"] == 8


@pytest.mark.parametrize("preset", ["q4", "p2q8"])
def test_meta_prediction_equals_cpu_measurement_for_coded_presets(preset):
    meta = actcomp.step_memory("test_resnet", 4, img_size=48, preset=preset, device="meta", foreach=False)
    cpu = actcomp.step_memory("test_resnet", 4, img_size=48, preset=preset, device="cpu", foreach=False)
    assert meta.peak_bytes == cpu.peak_bytes and meta.after_forward_bytes == cpu.after_forward_bytes
    assert meta.breakdown == cpu.breakdown


def test_compiled_coded_conv_matches_eager_without_graph_breaks():
    base = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, padding=1))
    x = torch.randn(2, 3, 16, 16)
    grads = []
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    for compiled in (False, True):
        m = actcomp.compress(copy.deepcopy(base), "full_p2q8")
        fn = torch.compile(m, backend="aot_eager") if compiled else m
        torch.manual_seed(5)
        fn(x).sum().backward()
        grads.append([p.grad for p in m.parameters()])
    assert all(torch.equal(a, c) for a, c in zip(*grads))
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
