"""compress()/restore(): exact forward, gradients reach every weight, policy, state, errors."""
import copy
import functools

import pytest
import timm
import torch
import torch.nn as nn
from test_codes import CODED_REPRESENTATIVES
from timm.layers import Conv2dSame, MixedConv2d, ScaledStdConv2d, StdConv2d

import actcomp
from actcomp import PRESETS, ActcompError

# The families of 9 timm models, width-reduced (same module kinds as the full-size model, a fraction of the
# compute): timm's test_* models; resnet18 at 1/4 width; tinynet_e for efficientnet_b0 (same blocks: depthwise,
# squeeze-excite, SiLU); test_efficientnet with TF "same" padding (Conv2dSame) and TF BatchNorm eps for
# tf_efficientnet_b0;
# mobilenetv3_small_050 (hard-swish, hard-sigmoid SE); nf_resnet26 at 1/8 width (ScaledStdConv2d);
# resnetv2_50x1_bit at 1/8 width in its deep layers (StdConv2d, GroupNorm pre-activation, 32 channels per group).
MODELS = {"test_resnet": ("test_resnet", {}), "test_efficientnet": ("test_efficientnet", {}),
          "test_convnext": ("test_convnext", {}),
          "resnet18": ("resnet18", dict(channels=(16, 32, 64, 128), stem_width=16)),
          "efficientnet_b0": ("tinynet_e", {}),
          "tf_efficientnet_b0": ("test_efficientnet", dict(pad_type="same", bn_eps=1e-3)),
          "mobilenetv3_small_100": ("mobilenetv3_small_050", {}),
          "nf_resnet26": ("nf_resnet26", dict(channels=(32, 64, 128, 256))),
          "resnetv2_50x1_bit": ("resnetv2_50x1_bit", dict(channels=(128, 128, 256, 256), stem_chs=32))}


# Every preset, the coded ones by their representatives (tests/test_codes.py runs each coded preset)
EVERY_PRESET = [p for p in PRESETS if PRESETS[p].conv_bits is None or p in CODED_REPRESENTATIVES]


@functools.cache
def _built(name, kw):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **dict(kw)), torch.get_rng_state()


def _model(name, **kw):
    # Built once per test module, then copied: the same weights and RNG state as building it here.
    m, rng = _built(name, tuple(sorted(kw.items())))
    torch.set_rng_state(rng)
    return copy.deepcopy(m)


def _convs(m):
    return [(n, c) for n, c in m.named_modules() if isinstance(c, nn.Conv2d)]


@pytest.mark.parametrize("name", MODELS)
def test_every_preset_keeps_forward_and_trains_a_step(name):
    base = _model(MODELS[name][0], **MODELS[name][1])
    x = torch.randn(2, 3, 64, 64)
    base.train()
    ref = base(x)
    for preset in EVERY_PRESET:
        m = actcomp.compress(copy.deepcopy(base), preset)
        opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
        out = m(x)
        assert torch.equal(out, ref), f"{name}/{preset}: forward changed"
        out.logsumexp(1).mean().backward()
        missing = [n for n, c in _convs(m) if c.weight.grad is None]
        assert not missing, f"{name}/{preset}: no gradient for {missing[:3]}"
        opt.step()


def test_authors_b1_gradients_bitwise_equal_native_on_weight_standardized_convs():
    # nf_resnet26: ScaledStdConv2d (weight standardized, learnable gain) -> grads must reach weight and gain.
    base = _model("nf_resnet26")
    x = torch.randn(2, 3, 64, 64)
    grads = []
    for preset in ("none", "authors_b1"):
        m = actcomp.compress(copy.deepcopy(base), preset)
        m(x).sum().backward()
        grads.append({k: p.grad for k, p in m.named_parameters()})
    assert any("gain" in k for k in grads[0])
    for k in grads[0]:
        assert grads[1][k] is not None and torch.equal(grads[0][k], grads[1][k]), k


@pytest.mark.parametrize("conv", [
    lambda: Conv2dSame(4, 6, 3, stride=2),
    lambda: StdConv2d(4, 6, 3, padding=1),
    lambda: ScaledStdConv2d(4, 6, 3, padding=1),
    lambda: MixedConv2d(4, 6, [3, 5]),
    lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
    lambda: nn.Conv2d(4, 6, 4, padding="same", dilation=1),
], ids=["Conv2dSame", "StdConv2d", "ScaledStdConv2d", "MixedConv2d", "reflect", "circular", "same-even"])
def test_timm_conv_kinds_keep_their_maths(conv):
    torch.manual_seed(0)
    m = conv()
    x = torch.randn(2, 4, 11, 11, requires_grad=True)
    ref = m(x)
    ref.sum().backward()
    g_ref = {k: p.grad.clone() for k, p in m.named_parameters()}
    gx_ref = x.grad.clone()
    m.zero_grad()
    x.grad = None
    actcomp.compress(m, "authors_b1")
    out = m(x)
    assert torch.equal(out, ref)
    out.sum().backward()
    assert torch.equal(x.grad, gx_ref)
    for k, p in m.named_parameters():
        assert torch.equal(p.grad, g_ref[k]), k
    actcomp.compress(m, "pool2")
    assert torch.equal(m(x), ref)


def test_b1_without_authors_copy_is_native():
    m = _model("resnet18")
    actcomp.compress(m, {"block": 1, "name": "b1"})
    assert not any(type(c).__name__.startswith("Compressed") for c in m.modules())
    x = torch.randn(2, 3, 64, 64)
    assert actcomp.saved_bytes(m, x).total_bytes == actcomp.saved_bytes(_model("resnet18"), x).total_bytes


def test_state_identity_idempotence_and_reversibility():
    m = _model("resnet18")
    params = {k: p for k, p in m.named_parameters()}
    keys = list(m.state_dict())
    opt = torch.optim.SGD(m.parameters(), lr=0.1)  # made before conversion: must keep working
    actcomp.compress(m, "pool4")
    actcomp.compress(m, "pool4")
    assert all(p is params[k] for k, p in m.named_parameters())
    assert list(m.state_dict()) == keys
    assert isinstance(m.conv1, nn.Conv2d) and type(m.conv1).__name__ == "CompressedConv2d"
    m(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    actcomp.compress(m, "pool2")  # reconfigure
    assert m.conv1._actcomp.block == 2
    actcomp.restore(m)
    assert type(m.conv1) is nn.Conv2d and not hasattr(m.conv1, "_actcomp")
    assert actcomp.config_of(m) is None
    m.load_state_dict(_model("resnet18").state_dict())


def test_eval_and_no_grad_take_the_plain_path():
    m = actcomp.compress(_model("resnet18"), "pool4")
    x = torch.randn(2, 3, 32, 32)
    m.eval()
    out = m(x)
    names = {n.name() for n in actcomp.accounting.walk([out.grad_fn])}
    assert "PooledConv2dBackward" not in names and "ConvolutionBackward0" in names
    m.train()
    with torch.no_grad():
        assert m(x).grad_fn is None
    names = {n.name() for n in actcomp.accounting.walk([m(x).grad_fn])}
    assert "PooledConv2dBackward" in names


def test_policy_per_layer_blocks_include_exclude_and_small_inputs():
    m = _model("resnet18")
    cfg = {"block": {"layer1.*": 2, "layer4.*": 8, "*": 4}, "exclude": ["conv1"], "name": "mixed"}
    actcomp.compress(m, cfg)
    assert not hasattr(m.conv1, "_actcomp")
    assert m.layer1[0].conv1._actcomp.block == 2 and m.layer3[0].conv1._actcomp.block == 4
    table = actcomp.summary(m, torch.randn(2, 3, 64, 64))
    assert {"layer", "op", "input_shape", "block", "saved_bytes_native", "saved_bytes_compressed"} <= set(table)
    row = table[table.layer == "layer1.0.conv1"].iloc[0]
    assert row.input_shape == (2, 64, 16, 16) and row.saved_bytes_compressed == 2 * 64 * 8 * 8 * 4
    # layer4 inputs are 4x4 (or 2x2) at 64 px: smaller than b=8, so they stay native and say so
    small = table[table.layer.str.startswith("layer4")]
    assert (small.note.str.contains("smaller than block")).all()
    assert (small.saved_bytes_native == small.saved_bytes_compressed).all()
    m2 = actcomp.compress(_model("resnet18"), {"block": 2, "include": ["layer2.*"], "name": "only2"})
    # the model itself gets a compile-only mode that marks norm outputs (convert._root_call): not a layer
    conv_names = {n for n, c in m2.named_modules() if hasattr(c, "_actcomp") and c._actcomp.kind != "root"}
    assert conv_names and all(n.startswith("layer2.") for n in conv_names)


@pytest.mark.parametrize("bad,msg", [
    ("pool3", "unknown preset"),
    ({"block": 0}, "block must be an int >= 1"),
    ({"block": 2.0}, "block must be an int >= 1"),
    ({"block": True}, "block must be an int >= 1"),
    ({"block": {"layer1.*": -1}}, "block"),
    ({"relu": "zip"}, "relu='zip' is not one of"),
    ({"blok": 2}, "unknown compression option"),
    ({"preset": "pool2", 3: 1}, "unknown compression option"),
    ({"copy_b1": "false"}, "copy_b1 must be true or false"),
    ({"grad_filter": 1}, "grad_filter must be true or false"),
    ({"stochastic_rounding": "yes"}, "stochastic_rounding must be true or false"),
    ({"name": 3}, "name must be a string"),
    ({"description": None}, "description must be a string"),
    ({"block": "4"}, "block must be an int >= 1 or a"),
    ({"block": [2, 4]}, "block must be an int >= 1 or a"),
    ({"block": {}}, "block mapping is empty"),
    ({"block": {1: 2}}, "block pattern must be a string"),
    ({"block": {"layer1.*": 2.0}}, r"block\['layer1.\*'\] must be an int >= 1"),
    ({"conv_pool": None}, "conv_pool=None"),
    ({"relu": ["bitmask"]}, "relu=.* is not one of"),
    ({"include": 5}, "include must be a glob pattern or a list of them"),
    ({"exclude": ["conv1", 1]}, "exclude must be a glob pattern or a list of them"),
    ({"exclude": {"conv1": 1}}, "exclude must be a glob pattern or a list of them"),
    ({"peer": "ckpt", "block": 2}, "stand-alone baseline"),
])
def test_bad_config_raises_and_leaves_model_unchanged(bad, msg):
    m = actcomp.compress(_model("resnet18"), "pool2")
    before = [type(c) for c in m.modules()]
    with pytest.raises(ActcompError, match=msg):
        actcomp.compress(m, bad)
    assert [type(c) for c in m.modules()] == before
    assert actcomp.config_of(m).name == "pool2"


@pytest.mark.parametrize("bad,msg", [
    ({"copy_b1": "false"}, "copy_b1 must be true or false"),
    ({"grad_filter": None}, "grad_filter must be true or false"),
    ({"stochastic_rounding": 0}, "stochastic_rounding must be true or false"),
    ({"name": None}, "name must be a string"),
    ({"block": torch.ones(3, 3)}, "block must be an int >= 1"),
    ({"block": -2}, "block must be an int >= 1"),
    ({"include": [b"conv1"]}, "include must be"),
    ({"norm": "int4"}, "norm='int4' is not one of"),
])
def test_compression_config_checks_every_option_in_one_line(bad, msg):
    with pytest.raises(ActcompError, match=msg) as e:
        actcomp.CompressionConfig(**bad)
    assert "\n" not in str(e.value)
    with pytest.raises(ActcompError, match="unknown compression option"):
        PRESETS["pool2"].replace(blok=2)


def test_config_accepts_one_pattern_and_integral_blocks():
    import numpy as np

    c = actcomp.as_config({"block": {"layer1.*": np.int64(2)}, "include": "layer1.*", "exclude": ("conv1",)})
    assert c.include == ("layer1.*",) and c.exclude == ("conv1",)
    assert type(c.block["layer1.*"]) is int and type(actcomp.CompressionConfig(block=np.int32(4)).block) is int
    m = actcomp.compress(_model("resnet18"), c)
    assert {n.split(".")[0] for n, x in m.named_modules() if hasattr(x, "_actcomp") and n} == {"layer1"}


def test_model_without_convolutions_is_a_clear_error():
    mlp = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ActcompError, match="has no Conv2d"):
        actcomp.compress(mlp, "pool4")
    assert type(mlp[0]) is nn.Linear and actcomp.config_of(mlp) is None
    with pytest.raises(ActcompError, match="needs a torch.nn.Module"):
        actcomp.compress("resnet18", "pool4")


def test_preset_error_suggests_close_names():
    with pytest.raises(ActcompError, match="did you mean pool4"):
        actcomp.get_preset("pol4")


def test_ops_inside_a_compressed_op_do_not_reach_enclosing_intercepts(monkeypatch):
    """timm's BatchNormAct2d converts as a norm whose act child converts too: the act's code (amin, amax, sub, ...)
    must run without passing through the BatchNorm's intercept (a Python call per op otherwise)."""
    from timm.layers import BatchNormAct2d

    from actcomp import convert

    seen = []
    orig = convert._Intercept.__torch_function__

    def counting(self, func, types, args=(), kwargs=None):
        seen.append(getattr(func, "__name__", str(func)))
        return orig(self, func, types, args, kwargs)

    monkeypatch.setattr(convert._Intercept, "__torch_function__", counting)
    m = actcomp.compress(nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), BatchNormAct2d(8, act_layer=nn.SiLU)).train(),
                         "full4")
    x = torch.randn(2, 8, 16, 16, requires_grad=True)
    m(x).sum().backward()
    assert {"conv2d", "batch_norm", "silu"} <= set(seen)  # the three ops were intercepted and compressed
    assert not {"amin", "amax", "sub", "div_", "avg_pool2d"} & set(seen), seen
    assert x.grad is not None and torch.isfinite(x.grad).all()
