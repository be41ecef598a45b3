"""Training loop: a run killed mid-way and resumed ends bitwise as an uninterrupted one; the per-layer gradient
cosine logged during training (values, one row per layer and epoch, 1.0 where the preset is exact)."""
import math

import pytest
import torch
from test_training import _tiny_cfg  # the same tiny run: test_resnet, pool2, 3 epochs, dropout

from actcomp.data import build_data
from actcomp.train import train

# Timings and the host-dependent memory source are the only columns that may differ between two runs.
WALL = {"epoch_time_s", "eval_time_s", "cpu_time_s", "elapsed_s", "images_per_s"}


@pytest.fixture(scope="module")
def data():
    return build_data("synthetic", n_train=48, n_val=16, image_size=16)


class Killed(Exception):
    pass


def _kill_after(epoch: int):
    def callback(row):
        if row["epoch"] == epoch:  # the epoch's checkpoint is written; the process dies before the next epoch
            raise Killed
    return callback


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else
                                        _same(a[k], b[k]) if isinstance(a[k], dict) else a[k] == b[k] for k in a)


def test_killed_run_resumes_bitwise(data, tmp_path):
    """Interrupted after epoch 1 of 3 (dropout, gradient cosine and the memory columns on), then resume=true:
    every metric, every cosine, the weights and the optimizer state equal an uninterrupted run's bit for bit."""
    kw = dict(grad_cosine=True, memory=True)
    full = train(_tiny_cfg(ckpt_path=str(tmp_path / "full.pt"), **kw), data)
    with pytest.raises(Killed):
        train(_tiny_cfg(ckpt_path=str(tmp_path / "cut.pt"), **kw), data, callback=_kill_after(1))
    assert torch.load(tmp_path / "cut.pt", weights_only=False)["epoch"] == 1
    torch.manual_seed(123)  # whatever the process did in between: the checkpoint's RNG state is what counts
    rest = train(_tiny_cfg(ckpt_path=str(tmp_path / "cut.pt"), resume=True, **kw), data)
    assert rest.finished and [r["epoch"] for r in rest.history] == [1, 2, 3]
    strip = [[{k: v for k, v in r.items() if k not in WALL} for r in res.history] for res in (full, rest)]
    assert strip[0] == strip[1]
    assert rest.cosines == full.cosines and len(full.cosines) > 0
    a, b = (torch.load(tmp_path / f, weights_only=False) for f in ("full.pt", "cut.pt"))
    assert _same(a["model"], b["model"]) and _same(a["optimizer"], b["optimizer"])
    assert a["num_updates"] == b["num_updates"] == 3 * (48 // 16)


def _weight_layers() -> list[str]:
    import timm

    m = timm.create_model("test_resnet", num_classes=10, in_chans=3)
    return [n for n, mod in m.named_modules() if isinstance(getattr(mod, "weight", None), torch.Tensor)
            and mod.weight.dim() >= 2]


@pytest.mark.parametrize("preset", ["none", "authors_b1", "pool2"])
def test_grad_cosine_during_training(data, preset):
    """One row per weight layer (conv and linear) per epoch, values in [-1, 1] (NaN where timm's zero-init last
    BatchNorm gamma makes a gradient exactly zero); the history's mean/min are those of the rows. ``none`` against
    native and the authors' b=1 copy (bitwise native gradients) give 1.0; pooled conv inputs give less."""
    res = train(_tiny_cfg(preset=preset, epochs=2, grad_cosine=True), data)
    layers = _weight_layers()
    for e in (1, 2):
        rows = [r for r in res.cosines if r["epoch"] == e]
        assert [r["layer"] for r in rows] == layers
        vals = [r["cosine"] for r in rows if not math.isnan(r["cosine"])]
        assert len(vals) >= len(layers) // 2 and all(-1 <= v <= 1 + 1e-12 for v in vals)
        h = res.history[e - 1]
        assert h["grad_cos_mean"] == pytest.approx(sum(vals) / len(vals), abs=1e-12)
        assert h["grad_cos_min"] == min(vals)
        convs = [r["cosine"] for r in rows if not math.isnan(r["cosine"]) and r["layer"] != "fc"]
        if preset in ("none", "authors_b1"):
            assert convs == pytest.approx([1.0] * len(convs), abs=1e-12)
        else:
            assert min(convs) < 1 - 1e-6


def test_grad_cosine_does_not_change_the_run(data):
    """The diagnostic runs on copies outside the run's RNG stream: the trajectory is the same without it."""
    on = train(_tiny_cfg(epochs=2, grad_cosine=True), data).history
    off = train(_tiny_cfg(epochs=2), data).history
    keys = ("train_loss", "train_top1", "val_loss", "val_top1", "lr")
    assert [[r[k] for k in keys] for r in on] == [[r[k] for k in keys] for r in off]
    assert all(math.isnan(r["grad_cos_mean"]) for r in off) and not any(math.isnan(r["grad_cos_mean"]) for r in on)
