"""actcomp.plan_budget: per-layer conv-input codes under a memory budget, chosen by measured gradient error."""
import copy
import functools
import math

import pytest
import timm
import torch
import torch.nn as nn

import actcomp
from actcomp import ActcompError
from actcomp.policy import CANDIDATES


@functools.cache
def _built(name, kw=()):
    torch.manual_seed(0)
    return timm.create_model(name, pretrained=False, num_classes=10, **dict(kw))


def _model(name, **kw):
    return copy.deepcopy(_built(name, tuple(sorted(kw.items()))))


def _x(n=2, px=32, seed=1):
    return torch.randn(n, 3, px, px, generator=torch.Generator().manual_seed(seed))


@functools.cache
def _plans(name="test_resnet"):
    x = _x()
    return {b: actcomp.plan_budget(_model(name), x, b) for b in (0.5, 0.25, 0.1)}


def test_budget_is_met_as_realized_by_the_conversion_and_tighter_never_costs_more():
    plans = _plans()
    x = _x()
    for b, p in plans.items():
        assert p.planned_bytes <= b * p.native_bytes
        m = actcomp.compress(_model("test_resnet"), p.config)
        # what the converted model really saves (summary's conv rows + untouched convs), not the plan's own count
        assert actcomp.conv_input_fraction(m, x) == pytest.approx(p.fraction, abs=0)
        assert p.fraction <= b
    bytes_ = [plans[b].planned_bytes for b in (0.5, 0.25, 0.1)]
    assert bytes_ == sorted(bytes_, reverse=True)
    errs = [sum(plans[b].error.values()) for b in (0.5, 0.25, 0.1)]
    assert errs == sorted(errs)  # less memory, more gradient error


def test_deterministic_for_model_input_and_seed_and_rng_untouched():
    x = _x()
    torch.manual_seed(123)
    state = torch.get_rng_state()
    a = actcomp.plan_budget(_model("test_resnet"), x, 0.25, seed=0)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's RNG stream is not consumed
    b = actcomp.plan_budget(_model("test_resnet"), x, 0.25, seed=0)
    assert a.config == b.config and a.error == b.error and a.choice == b.choice
    c = actcomp.plan_budget(_model("test_resnet"), x, 0.25, seed=1)
    assert c.error != a.error  # other loss weights and code draws


def test_model_is_not_modified():
    m = _model("test_resnet")
    before = {k: v.clone() for k, v in m.state_dict().items()}
    actcomp.compress(m, "q4")
    actcomp.plan_budget(m, _x(), 0.25)
    assert actcomp.config_of(m).name == "q4"
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())  # BN running stats included
    assert all(p.grad is None for p in m.parameters())


class _TwoInputs(nn.Module):
    """Two identical convs: ``smooth`` sees a per-plane constant input (every code decodes it exactly),
    ``rough`` sees noise (every code loses something)."""

    def __init__(self):
        super().__init__()
        self.smooth = nn.Conv2d(3, 8, 3, padding=1)
        self.rough = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        const = x.mean(dim=(2, 3), keepdim=True).expand_as(x).contiguous()
        return (self.smooth(const) + self.rough(x)).mean(dim=(2, 3))


def test_the_sensitive_layer_gets_the_finer_code():
    torch.manual_seed(0)
    m, x = _TwoInputs(), _x(4, 32)
    cands = [c for c in CANDIDATES if c[0] in ("native", "q8", "p4q4")]
    p = actcomp.plan_budget(m, x, 0.2, candidates=cands)
    assert p.choice == {"smooth": "p4q4", "rough": "q8"}
    assert p.error["smooth"] < 1e-9 < p.error["rough"]  # exact up to float rounding


def test_loose_budget_keeps_every_conv_native():
    p = actcomp.plan_budget(_model("test_resnet"), _x(), 1.0)
    assert set(p.choice.values()) == {"native"} and not p.config.compresses_convs and p.fraction == 1


def test_compress_with_a_budget_spec_and_summary_reports_the_measured_error():
    x = _x()
    m = actcomp.compress(_model("test_resnet"), {"budget": 0.25, "seed": 0}, example_input=x)
    cfg = actcomp.config_of(m)
    assert cfg == _plans()[0.25].config and cfg.name == "budget0.25"
    table = actcomp.summary(m, x).set_index("layer")
    for name, err in _plans()[0.25].error.items():
        if name in table.index:
            assert table.loc[name, "grad_error"] == err
    m2 = actcomp.compress(_model("test_resnet"), "full_budget0.25", example_input=x)
    assert actcomp.config_of(m2).block == cfg.block and actcomp.config_of(m2).relu == "bitmask"
    assert actcomp.summary(actcomp.compress(_model("test_resnet"), "q4"), x).grad_error.isna().all()


@pytest.mark.parametrize("budget", [0, -0.5, 1.5, float("nan"), "0.25", True, None])
def test_bad_budget_is_a_one_line_error(budget):
    m = _model("test_resnet")
    with pytest.raises(ActcompError, match=r"budget must be a number in \(0, 1\]") as e:
        actcomp.compress(m, {"budget": budget}, example_input=_x())
    assert "\n" not in str(e.value) and actcomp.config_of(m) is None


@pytest.mark.parametrize("spec, msg", [
    ({"budget": 0.25}, "needs a calibration batch: actcomp.compress\\(model, spec, example_input=x\\)"),
    ("budget0.25", "needs a calibration batch"),
])
def test_missing_calibration_input_says_how_to_pass_one(spec, msg):
    m = _model("test_resnet")
    with pytest.raises(ActcompError, match=msg):
        actcomp.compress(m, spec)
    assert actcomp.config_of(m) is None


def test_other_bad_inputs_are_one_line_errors():
    m, x = _model("test_resnet"), _x()
    with pytest.raises(ActcompError, match="planned per model"):
        actcomp.as_config("budget0.25")
    with pytest.raises(ActcompError, match="below what the candidates reach"):
        actcomp.plan_budget(m, x, 1e-4)
    with pytest.raises(ActcompError, match="unknown compression option"):
        actcomp.compress(m, {"budget": 0.5, "bogus": 1}, example_input=x)
    with pytest.raises(ActcompError, match="base must be"):
        actcomp.plan_budget(m, x, 0.5, base="most")
    with pytest.raises(ActcompError, match="real calibration batch"):
        actcomp.plan_budget(m, x.to("meta"), 0.5)
    assert actcomp.config_of(m) is None


# width-reduced families as in test_convert.py: plain convs, depthwise + SE + SiLU, hard-swish + depthwise,
# TF "same" padding (Conv2dSame), 7x7 depthwise + LayerNorm
FAMILIES = {"test_resnet": ("test_resnet", {}), "test_efficientnet": ("test_efficientnet", {}),
            "mobilenetv3_small_100": ("mobilenetv3_small_050", {}),
            "tf_efficientnet_b0": ("test_efficientnet", dict(pad_type="same", bn_eps=1e-3)),
            "test_convnext": ("test_convnext", {})}


@pytest.mark.parametrize("family", FAMILIES)
def test_families_plan_meet_the_budget_and_train(family):
    name, kw = FAMILIES[family]
    x, y = _x(2, 32), torch.tensor([1, 2])
    p = actcomp.plan_budget(_model(name, **kw), x, 0.3, target=y)
    m = actcomp.compress(_model(name, **kw), p.config)
    assert actcomp.conv_input_fraction(m, x) <= 0.3
    m.train()
    torch.nn.functional.cross_entropy(m(x), y).backward()
    assert all(q.grad is not None and torch.isfinite(q.grad).all() for q in m.parameters() if q.requires_grad)
    assert all(math.isfinite(e) for e in p.error.values())
