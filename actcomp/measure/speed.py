"""Training-step time of several presets against native PyTorch, measured side by side in one process.

    from actcomp.measure import compare_step_times
    compare_step_times("resnet18", ["pool4", "full4"], batch_size=32, img_size=64)

Every preset trains its own deep copy of one identically initialised model on the same fixed batch (built
once, outside the timed region). After warm-up, each iteration times one step of every preset in turn,
rotating the starting preset, so machine noise and thermal drift hit all presets alike; the median of the
iterations is reported. On CUDA each step is bracketed by ``torch.cuda.synchronize``. ``compile=True`` times
each preset's model under ``torch.compile`` (inductor); the first warm-up step compiles, so warm-up must be >= 1.
The step is :func:`actcomp.step.train_step`.
"""
from __future__ import annotations

import copy
import statistics
import time

import torch
import torch.nn as nn

from ..config import as_config
from ..convert import compress
from ..devices import parse_amp, parse_device
from ..errors import ActcompError, check_int
from ..models import build_model, in_chans_of
from ..step import make_optimizer, train_step

__all__ = ["compare_step_times"]


def compare_step_times(model: str | nn.Module, presets: list, batch_size: int, img_size: int = 224, device="cpu",
                       warmup: int = 2, iters: int = 5, optimizer: str = "sgd", amp=False,
                       channels_last: bool = False, num_classes: int = 1000, seed: int = 0, compile: bool = False):
    """One row per preset (``none`` always included, first): median step time, images/s, ratio to ``none``.

    ``ratio_to_none`` = median step time / median step time of ``none`` (above 1: slower). A step is forward,
    cross-entropy, backward, ``optimizer.step()`` and ``zero_grad``. Returns a pandas DataFrame.
    """
    import pandas as pd

    dev = parse_device(device)
    if dev.type == "meta":
        raise ActcompError("step times need real compute; use device='cpu' or 'cuda', not meta")
    check_int(batch_size, "batch_size")
    check_int(img_size, "img_size")
    check_int(warmup, "warmup", lo=0)
    check_int(iters, "iters")
    if not isinstance(compile, bool):
        raise ActcompError(f"compile must be True or False, got {compile!r}")
    if compile and warmup < 1:
        raise ActcompError("compile=True needs warmup >= 1: the first step compiles and must not be timed")
    amp_dt = parse_amp(amp, dev.type)
    if isinstance(presets, str):
        presets = [presets]
    cfgs = {"none": as_config("none")}
    for p in presets:  # validated up front: a typo fails before any model is built
        cfg = as_config(p)
        name, k = cfg.name, 2
        while name in cfgs and cfgs[name] != cfg:  # a custom config that reuses a preset's name
            name, k = f"{cfg.name}#{k}", k + 1
        cfgs[name] = cfg

    torch.manual_seed(seed)
    if isinstance(model, nn.Module):
        base, label = copy.deepcopy(model).cpu(), type(model).__name__
        num_classes = getattr(base, "num_classes", num_classes) or num_classes
    else:
        base, label = build_model(model, num_classes=num_classes, device="cpu", img_size=img_size), model
    in_chans = in_chans_of(base)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch_size, in_chans, img_size, img_size, generator=g).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)

    runs = {}
    for name, cfg in cfgs.items():
        m = copy.deepcopy(base).to(dev)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
        compress(m, cfg)  # after .to(): the int8/offload peers key parameters by storage
        m.train()
        scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and amp_dt == torch.float16 else None
        fwd = torch.compile(m) if compile else m
        runs[name] = (fwd, make_optimizer(m, optimizer, None), scaler)
    del base

    def step(name: str) -> float:
        m, opt, scaler = runs[name]
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        t0 = time.perf_counter()
        train_step(m, opt, x, y, amp_dtype=amp_dt, scaler=scaler, label=f"{label} [{name}]")
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        return time.perf_counter() - t0

    order = list(runs)
    for _ in range(warmup):
        for name in order:
            step(name)
    times: dict[str, list[float]] = {n: [] for n in order}
    for i in range(iters):
        k = i % len(order)  # rotate who goes first, so no preset always runs right after the same neighbour
        for name in order[k:] + order[:k]:
            times[name].append(step(name))

    base_med = statistics.median(times["none"])
    rows = []
    for name in order:
        med = statistics.median(times[name])
        rows.append(dict(model=label, preset=name, batch_size=batch_size, img_size=img_size, device=str(dev),
                         amp=amp, channels_last=channels_last, compile=compile, iters=iters, median_s=med,
                         min_s=min(times[name]), max_s=max(times[name]), images_per_s=batch_size / med,
                         ratio_to_none=med / base_med))
    return pd.DataFrame(rows)
