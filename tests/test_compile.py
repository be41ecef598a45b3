"""torch.compile on compressed models: same forward and gradients as the eager compressed model, no graph breaks.

Gradient checks use backend="aot_eager" (AOTAutograd's functionalization, where the in-place/aliasing bug
lived, without inductor's C++ build time); one test runs inductor.
"""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from test_codes import CODED_REPRESENTATIVES

import actcomp
from actcomp import PRESETS
from actcomp.measure import compare_step_times

# The speed-app test composes our launcher yamls, which share the plugins' schema names on purpose.
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema:UserWarning")

# Measured on CPU fp32 (aot_eager): forward and every parameter gradient bitwise equal for every preset.
# Inductor reorders float sums (and so can flip an int8 code at a rounding tie): measured forward max abs
# difference 7e-8 and worst per-parameter relative gradient difference 4e-5 (full4); bounds 1e-5 and 1e-4.
INDUCTOR_RTOL = 1e-4


def _grads(model, fn, x):
    model.zero_grad(set_to_none=True)
    y = fn(x)
    (y * torch.linspace(-1, 1, y.shape[-1])).sum().backward()
    return y.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _compare(base, preset, x, backend="aot_eager", seed=0):
    """(forward max abs diff, {param: relative L2 gradient difference}) of compiled vs eager compressed ``base``."""
    # Compress each copy: the int8/offload peers key parameters by storage, which a deepcopy does not keep.
    model, twin = (actcomp.compress(copy.deepcopy(base), preset).train() for _ in range(2))
    torch._dynamo.reset()
    torch.manual_seed(seed)
    ye, ge = _grads(model, model, x)
    torch.manual_seed(seed)
    yc, gc = _grads(twin, torch.compile(twin, backend=backend), x)
    assert set(ge) == set(gc), f"gradients missing under compile: {sorted(set(ge) ^ set(gc))[:3]}"
    # Relative to the parameter's gradient norm, floored at 1e-3 of the largest one: the bias of a conv followed
    # by BatchNorm has a gradient that is zero up to rounding, where a plain relative error means nothing.
    floor = 1e-3 * max(g.norm().item() for g in ge.values())
    rel = {n: ((ge[n] - gc[n]).norm() / max(ge[n].norm().item(), floor)).item() for n in ge}
    return (ye - yc).abs().max().item(), rel


def _stem(act=None):
    # Conv -> BN -> in-place ReLU in a Sequential: the pattern of timm's deep stems (resnet*d conv1).
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act or nn.ReLU(inplace=True),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def test_full_preset_inplace_relu_after_int8_batchnorm_matches_eager():
    # Was: BN's int8 recompute broke the graph, the in-place ReLU's input became a graph input, and its
    # mark_dirty alias made the gradient skip the mask (relative error ~1 on the stem's BN/conv grads).
    fwd, rel = _compare(_stem(), "full2", torch.randn(2, 3, 8, 8))
    assert fwd == 0.0
    assert max(rel.values()) == 0.0, rel


class _GraphBreak(nn.Module):
    def forward(self, x):
        torch._dynamo.graph_break()  # any break (user code, an unsupported op) right before an in-place activation
        return x


ACTS = {"relu": lambda: nn.ReLU(inplace=True), "relu6": lambda: nn.ReLU6(inplace=True),
        "leaky_relu": lambda: nn.LeakyReLU(0.1, inplace=True),
        # A negative slope flips the output's sign: the mask comes from the input then, not the output.
        "leaky_relu_negative_slope": lambda: nn.LeakyReLU(-0.5)}


@pytest.mark.parametrize("act", ACTS)
def test_inplace_bitmask_activation_on_a_graph_input_matches_eager(act):
    m = _stem(nn.Sequential(_GraphBreak(), ACTS[act]()))
    fwd, rel = _compare(m, {"relu": "bitmask", "name": "mask_only"}, torch.randn(2, 3, 8, 8))
    assert fwd == 0.0
    assert max(rel.values()) == 0.0, rel


@pytest.mark.parametrize("shape,layout", [((2, 16, 5, 7), "nchw"), ((2, 16, 5, 7), "nhwc"), ((2, 24, 1, 1), "nhwc"),
                                          ((2, 32, 6, 6), "slice"), ((2, 12, 3, 3), "nchw"), ((5, 37), "nchw")])
@pytest.mark.parametrize("lo,hi", [(0.0, None), (0.0, 6.0), (-1.0, 1.0)])
def test_region_bits_round_trips_in_every_layout(shape, layout, lo, hi):
    # The op behind the compiled masks: channel-packed for NCHW shapes with C % 8 == 0 (same bytes as the flat
    # packing), flat otherwise; exactly the fake's strides (compiled code views the result by them).
    from actcomp.ops.mask import _region, _unpack, region_bits
    x = torch.randn(shape) * 3
    x = {"nhwc": lambda t: t.contiguous(memory_format=torch.channels_last), "slice": lambda t: t[:, ::2],
         "nchw": lambda t: t}[layout](x)
    bits = region_bits(x, lo, hi)
    assert bits.dtype == torch.uint8 and bits.numel() == -(-x.numel() // 8)
    assert bits.is_contiguous() and bits.stride() == torch.empty(bits.shape).stride()
    assert bits.dim() == (4 if len(shape) == 4 and x.shape[1] % 8 == 0 else 1)
    assert torch.equal(_unpack(bits, x.shape, torch.bool), _region(x, lo, hi))
    if bits.dim() == 4 and x.is_contiguous():  # the plain-op packing used under compile: the same bytes
        from actcomp.ops.mask import pack_channels
        assert torch.equal(pack_channels(x, lo, hi), bits)
        assert torch.equal(torch.compile(pack_channels, backend="aot_eager")(x, lo, hi), bits)


def _tiny():
    # One of each converted op: conv, BN + in-place ReLU, max-pool, SiLU, squeeze-excite mul, Linear.
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.SiLU(inplace=True),
                         timm.layers.SEModule(16), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4))


# ckpt needs a timm model (below); the coded presets by their representatives (tests/test_codes.py)
@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "ckpt" and (PRESETS[p].conv_bits is None
                                                                          or p in CODED_REPRESENTATIVES)])
def test_every_preset_compiled_matches_eager(preset):
    fwd, rel = _compare(_tiny(), preset, torch.randn(2, 3, 16, 16))
    assert fwd == 0.0
    assert max(rel.values()) == 0.0, max(rel.items(), key=lambda kv: kv[1])


@pytest.mark.parametrize("name,preset", [("test_resnet", "full2"), ("test_resnet", "ckpt"), ("test_resnet", "pool4"),
                                         ("test_efficientnet", "full4"), ("mobilenetv3_small_050", "full4")])
def test_timm_families_compiled_match_eager_without_graph_breaks(name, preset):
    # test_resnet: timm's deep stem (three convs, BN + in-place ReLU in an nn.Sequential), max-pool, basic blocks;
    # test_efficientnet: SiLU recomputed from int8, squeeze-excite muls, depthwise convs; mobilenetv3: Hardswish
    # after BatchNorm (its code shared), Hardsigmoid gates (compiled ones went uncoded, see below).
    torch._dynamo.utils.counters.clear()
    fwd, rel = _compare(timm.create_model(name, num_classes=10), preset, torch.randn(2, 3, 32, 32))
    assert fwd == 0.0
    assert max(rel.values()) == 0.0, max(rel.items(), key=lambda kv: kv[1])
    # ckpt is exact but breaks the graph (5 on test_resnet): its BatchNorm-statistics guard hook asks
    # torch._C._current_graph_task_id(), an op dynamo cannot trace.
    if preset != "ckpt":
        assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])


@pytest.mark.parametrize("act", [nn.Hardswish, nn.Hardsigmoid])
def test_activations_torch_lists_as_not_overridable_are_coded_under_compile(act):
    # torch.overrides lists F.hardswish/F.hardsigmoid as not overridable, and Dynamo used to skip every mode for them:
    # compiled models kept their inputs whole (and MobileNetV3's gradients differed from eager by up to 7%).
    m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), act(), nn.AdaptiveAvgPool2d(2),
                      nn.Conv2d(8, 8, 1), act(), nn.Flatten(), nn.Linear(32, 4))
    spec = {"preset": "none", "act": "int8", "name": "acts_only"}
    x = torch.randn(2, 3, 8, 8)
    assert len(actcomp.summary(actcomp.compress(copy.deepcopy(m), spec), x)) == 2
    # one min (and max) per coded input in the compiled forward graph
    targets = _forward_graph_targets(actcomp.compress(copy.deepcopy(m), spec).train(), x)
    assert targets.count("aten.amin.default") == 2, targets
    fwd, rel = _compare(m, spec, x)
    assert fwd == 0.0 and max(rel.values()) == 0.0, rel


def _forward_graph_targets(model, x):
    """Targets of the call_function nodes in the AOTAutograd forward graph(s) of ``torch.compile(model)``."""
    from torch._dynamo.backends.common import aot_autograd
    from torch._functorch.aot_autograd import make_boxed_func

    seen = []

    def fw(gm, _):
        seen.extend(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return make_boxed_func(gm.forward)

    torch._dynamo.reset()
    torch.compile(model, backend=aot_autograd(fw_compiler=fw, bw_compiler=lambda gm, _: make_boxed_func(gm.forward)))(
        x).sum().backward()
    return seen


class _Residual(nn.Module):
    """conv -> BN -> in-place ReLU -> conv -> BN, += the block input, in-place ReLU (timm's ResNet blocks)."""

    def __init__(self, act=lambda: nn.ReLU(inplace=True)):
        super().__init__()
        self.conv1, self.bn1, self.act1 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), act()
        self.conv2, self.bn2, self.act2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), act()

    def forward(self, x):
        y = self.bn2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        y += x
        return self.act2(y)


def _residual_net(act=lambda: nn.ReLU(inplace=True)):
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Residual(act), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(8, 4))


def _saved_by_inductor(model, x):
    """dtype -> count of the activation-sized tensors the Inductor-compiled forward keeps for backward (masks of any
    size: a packed one is 1/8 of its activation)."""
    torch._dynamo.reset()
    gf = torch.compile(model)(x).grad_fn
    while "CompiledFunction" not in type(gf).__name__:
        gf = gf.next_functions[0][0]
    counts = {}
    for t in gf.saved_tensors:
        if t.numel() >= x.numel() or (t.dtype in (torch.bool, torch.uint8) and t.numel() >= 64):
            counts[t.dtype] = counts.get(t.dtype, 0) + 1
    return counts


@pytest.mark.parametrize("preset,packed", [("pool4", 1), ("authors_b1", 1), ("full4", 2), ("none", 0), ("int8", 0)])
def test_compiled_relu_masks_are_packed_bits_eager_stays_native(preset, packed):
    # Once the next conv saves a pooled copy, the partitioner would save each ReLU's bool mask, which Inductor's CPU
    # code writes slowly. Conv-compressing presets with native ReLUs: a ReLU of a BatchNorm's output is recomputed in
    # backward from what the norm saves (nothing saved), the one after the shortcut's in-place add saves packed bits.
    # full4 codes the norms' inputs, so both save packed bits (exact: test_timm_families... below). NCHW: plain ops
    # (ops.mask.pack_channels) fused into the activation's kernel; channels_last: the opaque op region_bits.
    m = actcomp.compress(_residual_net(), preset).train()
    x = torch.randn(2, 3, 8, 8)
    targets = _forward_graph_targets(m, x)
    assert targets.count("aten.bitwise_or.Tensor") == 7 * packed and "actcomp.region_bits.default" not in targets
    cl = _forward_graph_targets(m.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last))
    assert cl.count("actcomp.region_bits.default") == packed
    m.to(memory_format=torch.contiguous_format)
    if not PRESETS[preset].compresses_convs or PRESETS[preset].relu != "none":
        return
    assert m[1].act1._actcomp.compiled_only and m._actcomp.kind == "root"
    y = m[1].act1(m[1].bn1(m[1].conv1(m[0](torch.randn(2, 3, 8, 8)))))  # eager: the native ReLU, nothing recorded
    assert type(y.grad_fn).__name__ == "ReluBackward0"
    assert not (actcomp.summary(m, torch.randn(2, 3, 8, 8)).op == "relu").any()


@pytest.mark.parametrize("preset,uint8", [("pool4", 1), ("p2q8", 4)])
def test_compiled_relu_of_a_norm_saves_nothing_under_inductor(preset, uint8):
    # What the partitioner really keeps: no bool masks (slow to write on CPU), the one packed mask (the ReLU after
    # the in-place shortcut add; p2q8 adds its three conv-input codes), and no more float tensors than native.
    x = torch.randn(2, 3, 16, 16)
    native = _saved_by_inductor(_residual_net().train(), x)
    saved = _saved_by_inductor(actcomp.compress(_residual_net(), preset).train(), x)
    assert torch.bool not in saved and saved.get(torch.uint8) == uint8, saved
    assert saved.get(torch.float32, 0) <= native[torch.float32], (saved, native)


class _KeepsInput(nn.Module):
    """An in-place activation whose return value is dropped: the caller reads the norm's output tensor again."""

    def __init__(self, act):
        super().__init__()
        self.bn, self.act = nn.BatchNorm2d(8), act

    def forward(self, x):
        out = self.bn(x)
        self.act(out)
        return out * 2


@pytest.mark.parametrize("act", ["relu", "relu6", "leaky_relu", "leaky_relu_negative_slope"])
@pytest.mark.parametrize("where", ["residual", "kept", "graph_break"])
def test_recomputed_relu_regions_match_eager(act, where):
    # The ReLU family after a native norm under compile (recomputed region), in place or not, after an in-place add
    # (packed bits), with its return value dropped (in-place semantics kept) and after a graph break.
    if where == "residual":
        m = _residual_net(ACTS[act])
    elif where == "kept":
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _KeepsInput(ACTS[act]()), nn.Conv2d(8, 8, 3, padding=1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    else:
        m = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), _GraphBreak(), ACTS[act](),
                          nn.Conv2d(8, 8, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    fwd, rel = _compare(m, "pool4", torch.randn(2, 3, 8, 8))
    assert fwd == 0.0
    assert max(rel.values()) == 0.0, rel


def test_channels_last_pool4_compiled_within_summation_order():
    # With the packed-bit ReLU masks (above) channels_last is not bitwise under compile (measured 2e-6 on
    # resnet18; bitwise without them): float summation order, not a different gradient.
    m = timm.create_model("test_resnet", num_classes=10).to(memory_format=torch.channels_last)
    fwd, rel = _compare(m, "pool4", torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))
    assert fwd == 0.0
    assert max(rel.values()) < 1e-5, max(rel.items(), key=lambda kv: kv[1])


def test_inductor_full4_within_tolerance():
    fwd, rel = _compare(_stem(), "full4", torch.randn(2, 3, 8, 8), backend="inductor")
    assert fwd < 1e-5
    assert max(rel.values()) < INDUCTOR_RTOL, rel


def test_compare_step_times_compiles_every_preset(monkeypatch):
    calls = []
    real = torch.compile

    def fake_compile(model, **kw):  # aot_eager: the same dynamo/AOTAutograd path without inductor's build time
        calls.append(type(model).__name__)
        return real(model, backend="aot_eager")

    monkeypatch.setattr(torch, "compile", fake_compile)
    df = compare_step_times("test_resnet", ["pool4"], batch_size=2, img_size=32, warmup=1, iters=1, compile=True)
    assert list(df.preset) == ["none", "pool4"] and df["compile"].all()
    assert len(calls) == 2, calls


@pytest.mark.parametrize("kw,msg", [(dict(compile="yes"), "compile must be True or False"),
                                    (dict(compile=True, warmup=0), "compile=True needs warmup >= 1")])
def test_compare_step_times_bad_compile(kw, msg):
    with pytest.raises(actcomp.ActcompError, match=msg):
        compare_step_times("test_resnet", ["pool4"], 2, img_size=32, **kw)


def test_speed_app_passes_compile_and_keeps_older_point_keys(tmp_path, monkeypatch):
    import pandas as pd
    from omegaconf import OmegaConf
    from test_benchmarks import TINY, run_app

    import benchmarks.speed as app
    from benchmarks.common import config_hash
    from benchmarks.sweep import NOT_MEASURED, point_key

    seen = []

    def fake(model, presets, batch_size, **kw):
        seen.append(kw["compile"])
        return pd.DataFrame([dict(preset=p, median_s=1.0, min_s=1.0, max_s=1.0, images_per_s=2.0, ratio_to_none=1.0,
                                  ratio_q25=1.0, ratio_q75=1.0, blocks=3, load_start=1.0, load_end=1.0)
                             for p in ["none", "pool2"]])

    monkeypatch.setattr(app, "compare_step_times", fake)
    args = ["model=test_resnet", "compression=pool2", "batch_size=2", *TINY]
    assert run_app("speed", [*args, "compile=true"], tmp_path, monkeypatch) == 0
    assert run_app("speed", args, tmp_path, monkeypatch) == 0
    assert seen == [True, False]
    # compile=false (the default) is left out of the point key: records made before the key existed still match.
    cfg = OmegaConf.create({"app": "speed", "batch_size": 2, "compile": False})
    assert point_key(cfg) == config_hash(OmegaConf.create({"app": "speed", "batch_size": 2}), drop=NOT_MEASURED)
    assert point_key(OmegaConf.merge(cfg, {"compile": True})) != point_key(cfg)
