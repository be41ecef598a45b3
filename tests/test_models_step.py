"""actcomp.models (the one model builder) and actcomp.step (the one training step)."""
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import actcomp
from actcomp import ActcompError
from actcomp.measure.metacache import FreshTensor, Mark, out_spec, rebuild, signature
from actcomp.models import build_model, in_chans_of
from actcomp.step import loss_fn, make_optimizer, train_step


def test_build_model_seed_gives_the_same_weights_and_leaves_the_callers_rng_alone():
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    a = build_model("test_resnet", num_classes=10, in_chans=1, seed=3)
    b = build_model("test_resnet", num_classes=10, in_chans=1, seed=3, preset="pool4")
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected
    assert actcomp.config_of(a) is None and actcomp.config_of(b).name == "pool4"
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    torch.manual_seed(3)
    c = build_model("test_resnet", num_classes=10, in_chans=1)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), c.state_dict().values()))
    assert in_chans_of(a) == 1 and a.num_classes == 10


def test_build_model_errors_are_one_line():
    with pytest.raises(ActcompError, match="did you mean"):
        build_model("resnet5O")
    with pytest.raises(ActcompError, match=r"cannot build test_resnet with \{'no_such_kw': 1\}") as e:
        build_model("test_resnet", model_kwargs={"no_such_kw": 1})
    assert "\n" not in str(e.value)


def test_train_step_is_a_plain_sgd_step_and_marks_its_fixed_points():
    torch.manual_seed(0)
    m1 = build_model("test_resnet", num_classes=10, seed=0)
    m2 = build_model("test_resnet", num_classes=10, seed=0)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 10, (2,))
    o1, o2 = make_optimizer(m1, "sgd"), make_optimizer(m2, "sgd")
    seen = []
    loss = train_step(m1, o1, x, y, mark=seen.append, return_loss=True)
    ref = F.cross_entropy(m2(x), y)
    ref.backward()
    o2.step()
    assert seen == ["before_forward", "after_forward"]
    assert torch.equal(loss, ref.detach()) and not loss.requires_grad
    assert all(p.grad is None for p in m1.parameters())
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    assert train_step(m1, o1, x, y) is None


def test_train_step_forward_failure_names_the_point():
    m = build_model("test_resnet", num_classes=10)
    with pytest.raises(ActcompError, match=r"^mynet failed in forward at batch 1, img_size=1 ") as e:
        train_step(m, make_optimizer(m), torch.randn(1, 3, 1, 1), torch.tensor([0]), label="mynet")
    assert "\n" not in str(e.value)
    with pytest.raises(ActcompError, match="cannot create optimizer 'nosuch'"):
        make_optimizer(m, "nosuch")


def test_loss_fn_averages_tuple_outputs():
    a, b, y = torch.randn(2, 5), torch.randn(2, 5), torch.tensor([1, 3])
    assert torch.allclose(loss_fn((a, b), y), (F.cross_entropy(a, y) + F.cross_entropy(b, y)) / 2)
    assert torch.equal(loss_fn(a, y), F.cross_entropy(a, y))


def test_metacache_records_are_named_and_rebuild_exactly():
    t = torch.empty_strided((2, 3, 4), (12, 1, 3), device="meta")
    spec = out_spec(t)
    assert spec == FreshTensor((2, 3, 4), (12, 1, 3), torch.float32)
    r = rebuild(spec)
    assert (r.shape, r.stride(), r.dtype, r.device.type) == (t.shape, t.stride(), t.dtype, "meta")
    assert out_spec(None) is Mark.NONE and out_spec(t[:, 1:]) is None  # a view is not a fresh output
    assert signature((t, 1, None)).items[0].shape == (2, 3, 4)
    assert signature(1) != signature(True) and signature(torch.zeros(1)) is None  # only meta tensors are cached
