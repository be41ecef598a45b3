"""The largest batch that fits a memory budget: predicted (meta/cpu) or found by real OOM tries on a GPU.

    from actcomp.measure import largest_batch, largest_batches
    largest_batch("efficientnet_b0", "pool4", 8 * 2**30)              # doubling + bisection on the prediction
    largest_batches("resnet50", "full4", [8 * 2**30, 16 * 2**30])     # secant start + gallop, peaks shared
"""
from __future__ import annotations

import gc

import torch
import torch.nn as nn

from ..devices import parse_device
from ..errors import ActcompError, check_int
from ..models import check_model_name
from .memory import measure_step, prepare, prepare_cached, run_step

__all__ = ["largest_batch", "largest_batches", "verify_largest_batch_cuda"]

_STEP_OPTIONS = {"optimizer": "sgd", "dtype": "float32", "amp": False, "channels_last": False, "num_classes": 1000,
                 "foreach": None, "in_chans": 3}


def _step_kw(kw: dict) -> dict:
    unknown = set(kw) - set(_STEP_OPTIONS)
    if unknown:
        raise ActcompError(f"unknown option(s) {', '.join(sorted(unknown))}; known: {', '.join(_STEP_OPTIONS)}")
    return {**_STEP_OPTIONS, **kw}


def _fit_prepared(fn: str, model, preset, budgets, img_size, device, max_batch, kw):
    """Checks shared by the batch searches, then the model built and converted once for all the predictions."""
    for b in budgets:
        check_int(b, "budget_bytes")
    check_int(max_batch, "max_batch")
    dev = parse_device(device)
    if dev.type == "cuda":
        raise ActcompError(f"{fn} predicts on meta/cpu; on a GPU use verify_largest_batch_cuda()")
    if isinstance(model, str):
        check_model_name(model)
    return prepare_cached(model, preset, dev, dict(img_size=img_size, **_step_kw(kw)))


def largest_batch(model: str | nn.Module, preset, budget_bytes: int, img_size: int = 224, device="meta",
                  max_batch: int = 1 << 16, **kw) -> int:
    """Largest batch whose predicted step peak is <= ``budget_bytes`` (doubling, then bisection); 0 if none fits.

    The model is built and converted once and reused for every batch size tried. ``device`` is "meta"
    (default) or "cpu"; on a GPU use :func:`verify_largest_batch_cuda` for a real OOM search.
    """
    prep = _fit_prepared("largest_batch", model, preset, [budget_bytes], img_size, device, max_batch, kw)

    def fits(b: int) -> bool:
        return measure_step(prep, b).peak_bytes <= budget_bytes

    return _search(fits, max_batch)


def largest_batches(model: str | nn.Module, preset, budgets_bytes: list[int], img_size: int = 224, device="meta",
                    max_batch: int = 1 << 16, **kw) -> list[int]:
    """:func:`largest_batch` for several budgets at once, with far fewer step predictions.

    Peaks are cached across budgets, and each search starts from a secant estimate (a step's peak grows almost
    linearly with the batch) and gallops outward from it, so a budget costs a handful of predictions instead of
    ~2·log2(batch). The answer is still the exact search result on the predicted peaks, not the estimate.
    """
    prep = _fit_prepared("largest_batches", model, preset, budgets_bytes, img_size, device, max_batch, kw)
    cache: dict[int, int] = {}

    def peak(b: int) -> int:
        if b not in cache:
            cache[b] = measure_step(prep, b).peak_bytes
        return cache[b]

    out = []
    for budget in budgets_bytes:
        def fits(b: int, budget=budget) -> bool:
            return peak(b) <= budget

        if not fits(1):
            out.append(0)
            continue
        out.append(_gallop(fits, _secant_estimate(peak, budget, max_batch), max_batch))
    return out


def _secant_estimate(peak, budget: int, max_batch: int) -> int:
    """Batch whose peak is about ``budget``: secant steps on the (nearly linear) peak-vs-batch curve."""
    b1, b2 = min(8, max_batch), min(32, max_batch)
    for _ in range(5):
        p1, p2 = peak(b1), peak(b2)
        if b2 == b1 or p2 <= p1:
            return b2
        nxt = int(min(max(b2 + (budget - p2) * (b2 - b1) / (p2 - p1), 1), max_batch))
        if abs(nxt - b2) <= 1:
            return nxt
        b1, b2 = b2, nxt
    return b2


def _gallop(fits, est: int, max_batch: int) -> int:
    """Largest b <= max_batch with fits(b) (monotone, fits(1) true), searching outward from ``est``."""
    step = 1
    if fits(est):
        lo = est
        while True:
            if lo == max_batch:
                return lo
            hi = min(lo + step, max_batch)
            if not fits(hi):
                return _bisect(fits, lo, hi)
            lo, step = hi, step * 2
    hi = est
    while True:
        lo = max(hi - step, 1)
        if fits(lo):
            return _bisect(fits, lo, hi)
        hi, step = lo, step * 2


def _search(fits, max_batch: int, start: int = 1) -> int:
    """Largest b in [1, max_batch] with fits(b), assuming fits is monotone; 0 if fits(1) is false."""
    if not fits(1):
        return 0
    lo = 1  # fits
    b = max(2, min(start, max_batch))
    hi = None  # does not fit
    while hi is None:
        if b > max_batch:
            return max_batch if fits(max_batch) else _bisect(fits, lo, max_batch)
        if fits(b):
            lo, b = b, b * 2
        else:
            hi = b
    return _bisect(fits, lo, hi)


def _bisect(fits, lo: int, hi: int) -> int:
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo


def verify_largest_batch_cuda(model: str | nn.Module, preset, budget_bytes: int | None = None, img_size: int = 224,
                              max_batch: int = 1 << 16, start: int | None = None, device="cuda", **kw) -> int:
    """Largest batch that really trains a step on the GPU without running out of memory (0 if batch 1 fails).

    ``budget_bytes`` caps this process's allocator at that many bytes (``set_per_process_memory_fraction``),
    emulating a smaller GPU; None uses the whole device. ``start`` (e.g. the prediction of
    :func:`largest_batch`) is the first batch size tried after 1. Each try builds a fresh model.
    """
    dev = parse_device(device)
    if dev.type != "cuda":
        raise ActcompError("verify_largest_batch_cuda needs device='cuda'")
    if budget_bytes is not None:
        check_int(budget_bytes, "budget_bytes")
    check_int(max_batch, "max_batch")
    kw = _step_kw(kw)
    kw["img_size"] = img_size
    total = torch.cuda.get_device_properties(dev).total_memory
    if budget_bytes is not None and budget_bytes > total:
        raise ActcompError(f"budget {budget_bytes} B exceeds the GPU's {total} B")

    def fits(b: int) -> bool:
        prep = None
        try:
            prep = prepare(model, preset, dev, **kw)
            run_step(prep, b)
            run_step(prep, b)  # the second step carries the optimizer state: the steady-state peak
            return True
        except torch.OutOfMemoryError:
            return False
        finally:
            del prep
            gc.collect()
            torch.cuda.empty_cache()

    idx = dev.index if dev.index is not None else torch.cuda.current_device()
    if budget_bytes is not None:
        torch.cuda.set_per_process_memory_fraction(budget_bytes / total, idx)
    try:
        return _search(fits, max_batch, start or 2)
    finally:
        if budget_bytes is not None:
            torch.cuda.set_per_process_memory_fraction(1.0, idx)
