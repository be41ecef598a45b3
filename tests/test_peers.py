"""Peer baselines (ckpt, int8, offload): running statistics under checkpointing, all-or-nothing conversion."""
import copy

import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

import actcomp
from actcomp import ActcompError


def _stats(m):
    return {n: b.clone() for n, b in m.named_buffers() if n.rsplit(".", 1)[-1] in
            ("running_mean", "running_var", "num_batches_tracked")}


def _train(m, x, steps=3):
    torch.manual_seed(1)
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    m.train()
    for _ in range(steps):
        opt.zero_grad()
        m(x).logsumexp(1).mean().backward()
        opt.step()
    m.eval()
    with torch.no_grad():
        out = m(x)
    return _stats(m), out


def _assert_same_stats(a, b):
    assert a.keys() == b.keys() and a
    bad = [k for k in a if not torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-6)]
    assert not bad, f"{len(bad)} of {len(a)} running-stat buffers differ from native, e.g. {bad[:3]}"


class _CkptTail(nn.Module):
    """A checkpointed segment whose last tensor-saving op is a BatchNorm (where recomputation stops early)."""

    def __init__(self, reentrant):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = nn.Sequential(nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.head = nn.Linear(8, 10)
        self.reentrant = reentrant
        self.grad_checkpointing = False

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def forward(self, x):
        x = self.stem(x)
        if self.grad_checkpointing and self.training:
            x = checkpoint(self.block, x, use_reentrant=self.reentrant)
        else:
            x = self.block(x)
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("reentrant", [False, True])
def test_ckpt_running_stats_equal_native_when_recomputation_stops_in_batchnorm(reentrant):
    torch.manual_seed(0)
    base, x = _CkptTail(reentrant), torch.randn(4, 3, 8, 8)
    ref_stats, ref_out = _train(copy.deepcopy(base), x)
    m = actcomp.compress(copy.deepcopy(base), "ckpt")
    stats, out = _train(m, x)
    _assert_same_stats(ref_stats, stats)
    torch.testing.assert_close(out, ref_out)  # eval forward: no stale snapshot copied back
    assert not any("_actcomp_stats" in c.__dict__ for c in m.modules())


# Families whose checkpointed segments end in a BatchNorm (before the fix 30 and 160 buffers were off here).
@pytest.mark.parametrize("name", ["ghostnet_050", "tinynet_e"])
def test_ckpt_running_stats_equal_native_on_timm_families(name):
    torch.manual_seed(0)
    base, x = timm.create_model(name, pretrained=False, num_classes=10), torch.randn(4, 3, 32, 32)
    ref_stats, _ = _train(copy.deepcopy(base), x, steps=2)
    stats, _ = _train(actcomp.compress(copy.deepcopy(base), "ckpt"), x, steps=2)
    _assert_same_stats(ref_stats, stats)


def _snapshot(m):
    return ([type(c) for c in m.modules()],
            [{k: v for k, v in c.__dict__.items() if k.startswith("_actcomp") or k == "grad_checkpointing"}
             for c in m.modules()],
            [(len(c._forward_hooks), len(c._forward_pre_hooks)) for c in m.modules()])


def _same(a, b):
    # configs and hook handles are compared by identity of what they point at, the rest by value
    return a[0] == b[0] and a[2] == b[2] and [sorted(d) for d in a[1]] == [sorted(d) for d in b[1]] and all(
        d1.get("grad_checkpointing") == d2.get("grad_checkpointing") for d1, d2 in zip(a[1], b[1]))


@pytest.mark.parametrize("earlier", [None, "pool2", "int8", "full4"])
def test_ckpt_on_timm_model_without_checkpointing_is_a_clear_error(earlier):
    m = timm.create_model("dla46_c", pretrained=False, num_classes=10)
    if earlier:
        actcomp.compress(m, earlier)
    before = _snapshot(m)
    with pytest.raises(ActcompError, match="DLA does not support gradient checkpointing") as e:
        actcomp.compress(m, "ckpt")
    assert "\n" not in str(e.value)
    assert _same(_snapshot(m), before)
    assert getattr(actcomp.config_of(m), "name", None) == earlier
    assert m.__dict__.get("_actcomp_peer") != "ckpt"


class _HalfCheckpointable(nn.Module):
    """Switches its first stage on, then refuses (a partial set_grad_checkpointing)."""

    def __init__(self):
        super().__init__()
        self.stages = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 4, 3))

    def set_grad_checkpointing(self, enable=True):
        self.stages[0].grad_checkpointing = enable
        assert not enable, "gradient checkpointing not supported"

    def forward(self, x):
        return self.stages(x)


def test_ckpt_refused_halfway_leaves_no_switch_on():
    m = _HalfCheckpointable()
    with pytest.raises(ActcompError, match="does not support gradient checkpointing"):
        actcomp.compress(m, "ckpt")
    assert "grad_checkpointing" not in m.stages[0].__dict__ and actcomp.config_of(m) is None


class _Final(nn.Module):
    """A model class that forbids subclassing (the int8/offload peers swap the root to a subclass)."""

    def __init_subclass__(cls, **kw):
        raise TypeError(f"{cls.__name__}: _Final cannot be subclassed")

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).relu()


@pytest.mark.parametrize("peer", ["int8", "offload"])
def test_hook_peer_failure_is_an_actcomp_error_and_keeps_earlier_conversion(peer):
    m = actcomp.compress(_Final(), "full2")
    before = _snapshot(m)
    with pytest.raises(ActcompError, match=f"preset '{peer}' cannot convert _Final: TypeError"):
        actcomp.compress(m, peer)
    assert _same(_snapshot(m), before) and actcomp.config_of(m).name == "full2"
    x = torch.randn(2, 3, 8, 8)
    m(x).sum().backward()  # the earlier conversion still trains
    assert m.conv.weight.grad is not None


def test_scripted_model_is_refused():
    sm = torch.jit.script(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()))
    for preset in ("pool2", "int8", "ckpt"):
        with pytest.raises(ActcompError, match="TorchScript"):
            actcomp.compress(sm, preset)
        assert type(sm) is torch.jit.RecursiveScriptModule
