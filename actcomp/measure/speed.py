"""Training-step time of several presets against native PyTorch, measured side by side in one process.

    from actcomp.measure import compare_step_times
    compare_step_times("resnet18", ["pool4", "full4"], batch_size=32, img_size=64)

Every preset trains its own deep copy of one identically initialised model on the same fixed batch (built
once, outside the timed region). After warm-up, timing runs in ``blocks`` blocks of ``iters`` iterations; each
iteration times one step of every preset in turn, rotating the starting preset, so machine noise and thermal
drift hit all presets alike. Each block gives one ratio per preset; the median of the block ratios is reported
with their interquartile range, so a ratio comes with its spread. On CUDA each step is bracketed by
``torch.cuda.synchronize``. ``compile=True`` times each preset's model under ``torch.compile`` (inductor); the
first warm-up step compiles, so warm-up must be >= 1. The step is :func:`actcomp.step.train_step`.
"""
from __future__ import annotations

import copy
import math
import os
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

__all__ = ["compare_step_times", "quantile"]


def quantile(xs: list[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` by linear interpolation between order statistics (numpy's default method);
    one value is its own every quantile."""
    s = sorted(xs)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # not every platform has a load average
        return math.nan


def compare_step_times(model: str | nn.Module, presets: list, batch_size: int, img_size: int = 224, device="cpu",
                       warmup: int = 2, iters: int = 5, optimizer: str = "sgd", amp=False,
                       channels_last: bool = False, num_classes: int = 1000, seed: int = 0, compile: bool = False,
                       blocks: int = 3, max_blocks: int | None = None, target_iqr: float | None = None):
    """One row per preset (``none`` always included, first): step times, images/s, ratio to ``none`` and its spread.

    A step is forward, cross-entropy, backward, ``optimizer.step()`` and ``zero_grad``. After ``warmup``
    untimed steps per preset, ``blocks`` blocks of ``iters`` interleaved steps per preset are timed. Per block,
    a preset's ratio is the median of its ``iters`` step times / the median of ``none``'s in that block.
    Columns: ``ratio_to_none`` = median of the block ratios (above 1: slower; with one block: the old
    median/median over all timed steps); ``ratio_q25``, ``ratio_q75`` = 25th/75th percentiles of the block
    ratios (linear interpolation, see :func:`quantile`; with 3 blocks: halfway between the smallest and the
    median ratio, and between the median and the largest; with 1 block both equal the ratio); ``blocks`` =
    blocks timed; ``median_s``/``min_s``/``max_s`` over every timed step of the preset; ``images_per_s`` =
    batch_size / median_s; ``load_start``/``load_end`` = the machine's 1-minute load average
    (``os.getloadavg()[0]``, NaN where unavailable) just before warm-up and just after the last block — the
    other work the ratio shared the CPU with.

    Adaptive mode (``max_blocks`` and ``target_iqr``, given together): after ``blocks`` blocks, add blocks one at
    a time until ``ratio_q75 - ratio_q25 <= target_iqr`` for every preset, or ``max_blocks`` blocks ran.
    Returns a pandas DataFrame.
    """
    import pandas as pd

    dev = parse_device(device)
    if dev.type == "meta":
        raise ActcompError("step times need real compute; use device='cpu' or 'cuda', not meta")
    check_int(batch_size, "batch_size")
    check_int(img_size, "img_size")
    check_int(warmup, "warmup", lo=0)
    check_int(iters, "iters")
    check_int(blocks, "blocks")
    if (max_blocks is None) != (target_iqr is None):
        raise ActcompError("max_blocks and target_iqr go together (adaptive mode): give both or neither, got "
                           f"max_blocks={max_blocks!r}, target_iqr={target_iqr!r}")
    check_int(max_blocks, "max_blocks", lo=blocks, none_ok=True)
    if target_iqr is not None and (isinstance(target_iqr, bool) or not isinstance(target_iqr, (int, float))
                                   or not target_iqr >= 0 or math.isinf(target_iqr)):
        raise ActcompError(f"target_iqr must be a finite number >= 0 or None, got {target_iqr!r}")
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
    load_start = _load()
    for _ in range(warmup):
        for name in order:
            step(name)
    times: dict[str, list[float]] = {n: [] for n in order}
    ratios: dict[str, list[float]] = {n: [] for n in order}
    i = 0  # one rotation across all blocks: a block starts where the previous one left off
    limit = max_blocks if max_blocks is not None else blocks
    for b in range(limit):
        block: dict[str, list[float]] = {n: [] for n in order}
        for _ in range(iters):
            k = i % len(order)  # rotate who goes first, so no preset always runs right after the same neighbour
            for name in order[k:] + order[:k]:
                block[name].append(step(name))
            i += 1
        base_med = statistics.median(block["none"])
        for name in order:
            times[name] += block[name]
            ratios[name].append(statistics.median(block[name]) / base_med)
        if b + 1 >= blocks and target_iqr is not None and all(
                quantile(r, 0.75) - quantile(r, 0.25) <= target_iqr for r in ratios.values()):
            break
    load_end = _load()

    rows = []
    for name in order:
        med, r = statistics.median(times[name]), ratios[name]
        rows.append(dict(model=label, preset=name, batch_size=batch_size, img_size=img_size, device=str(dev),
                         amp=amp, channels_last=channels_last, compile=compile, iters=iters, blocks=len(r),
                         median_s=med, min_s=min(times[name]), max_s=max(times[name]), images_per_s=batch_size / med,
                         ratio_to_none=statistics.median(r), ratio_q25=quantile(r, 0.25),
                         ratio_q75=quantile(r, 0.75), load_start=load_start, load_end=load_end))
    return pd.DataFrame(rows)
