"""Peak memory of one full training step (forward, loss, backward, optimizer step), predicted or measured.

    from actcomp.measure import step_memory
    step_memory("resnet50", 256, preset="full4").peak_bytes          # predicted on meta: nothing allocated
    step_memory("resnet18", 8, img_size=64, device="cpu")             # measured on CPU (MemTracker)

How each device is handled:

- ``meta``: the model is built on the meta device, converted, and one step runs there under
  ``torch.distributed._tools.mem_tracker.MemTracker``, which follows every storage as it is created and
  freed. Nothing is computed or allocated, so any batch size can be predicted in about a second.
  The meta device has no autocast, so ``amp`` runs on fake CPU tensors (``FakeTensorMode``) with CPU
  bf16 autocast instead; fp16 is predicted with bf16 (same sizes). Optimizers use the multi-tensor
  (``foreach``) path by default here, as they do on CUDA, since meta stands in for a GPU.
- ``cpu``: real tensors, the same MemTracker measurement (CPU's default single-tensor optimizer path).
- ``cuda``: ``reset_peak_memory_stats`` before the step, ``max_memory_allocated``/``max_memory_reserved``
  after; the MemTracker breakdown of the same step and the meta prediction come with it.

Which peak: the **steady-state** step, i.e. optimizer state (SGD momentum buffers, Adam moments) already
allocated, as in every step after the first. Before the measured step the optimizer is primed (meta/cpu: one
``step()`` on zero gradients, which allocates its state exactly as a real first step does; cuda: a full real
warm-up step, which also allocates cuDNN/cuBLAS workspaces). Gradients are released with
``zero_grad(set_to_none=True)`` after every step, as timm's train loop does, so they count only while backward
produces them. The input batch and labels are created inside the measured step (as a data loader's batch
would arrive) and count in the peak, not in ``after_forward_bytes``. The step itself is
:func:`actcomp.step.train_step`.

Assumptions worth knowing: the loss is cross-entropy over ``num_classes``; on meta, attention without mask or
dropout runs a fused kernel (output + log-sum-exp saved, as flash/memory-efficient attention on a GPU), not
the math path meta would otherwise take; allocator rounding, the CUDA context and library workspaces are not in
the prediction (expect a GPU peak within about ±10%).
"""
from __future__ import annotations

import collections
import contextlib
import copy
import gc
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import as_config
from ..convert import compress, config_of
from ..devices import parse_amp, parse_device, parse_dtype
from ..errors import ActcompError, check_int
from ..models import build_model, check_model_name, in_chans_of
from ..step import make_optimizer, prime, train_step
from .tracker import breakdown, total, tracker_cls

__all__ = ["Prepared", "StepMemory", "measure_step", "prepare", "prepare_cached", "run_step", "step_memory"]


@dataclass
class StepMemory:
    """Memory of one steady-state training step, in bytes."""

    peak_bytes: int  # peak of the whole step: forward, loss, backward, optimizer.step()
    breakdown: dict[str, int]  # bytes live at the peak by MemTracker category
    after_forward_bytes: int  # live after forward+loss minus live before forward: what the graph keeps
    method: str  # "memtracker-meta" (predicted), "memtracker-cpu" (measured), "cuda" (measured)
    predicted_peak_bytes: int | None = None  # cuda only: the meta prediction of the same step
    reserved_bytes: int | None = None  # cuda only: max_memory_reserved
    info: dict = field(default_factory=dict, compare=False)  # model/preset/batch/... of this point

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / 2**30


# ------------------------------------------------------------------------------------------ preparation

def _copy_to(model: nn.Module, device: torch.device, empty: bool, dtype: torch.dtype | None = None,
             channels_last: bool = False) -> nn.Module:
    """A deep copy of ``model`` on ``device`` (the caller's model is left untouched).

    Parameters and buffers are pre-seeded in deepcopy's memo, so the copy never duplicates them on their
    original device; ``empty`` (meta/fake prediction) copies no values at all. A hook-based peer is
    re-applied, since it keys parameters by storage. ``dtype``/``channels_last`` apply to floating-point
    tensors as they are copied (``Module.to`` cannot swap fake tensors).
    """
    memo = {}
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in memo:
            continue
        dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
        fmt = torch.channels_last if channels_last and t.dim() == 4 else torch.preserve_format
        if empty:  # torch.empty, not empty_like: under FakeTensorMode the source (a meta tensor) is not fake
            new = torch.empty(t.shape, device=device, dtype=dt,
                              memory_format=torch.contiguous_format if fmt is torch.preserve_format else fmt)
        else:
            new = t.detach().to(device, dt, copy=True, memory_format=fmt)
        memo[id(t)] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    out = copy.deepcopy(model, memo)
    cfg = config_of(out)
    if cfg is not None:
        compress(out, cfg)
    return out


@dataclass
class Prepared:
    """A converted model with its (primed) optimizer on one device, reusable for several batch sizes."""

    model: nn.Module
    opt: torch.optim.Optimizer
    device: torch.device
    dtype: torch.dtype
    amp_dtype: torch.dtype | None
    channels_last: bool
    in_chans: int
    num_classes: int
    img_size: int
    label: str
    fake_mode: object = None
    scaler: object = None
    cuda_baseline: int = 0  # bytes the caller had allocated on the GPU before this point was built

    def mode(self):
        return self.fake_mode if self.fake_mode is not None else contextlib.nullcontext()


def prepare(model, preset, device, optimizer, dtype, amp, channels_last, num_classes, img_size, foreach,
            in_chans=3) -> Prepared:
    """``model`` (a timm name or a module, copied) built on ``device``, converted with ``preset``, with its
    optimizer (primed on meta/cpu)."""
    dev = parse_device(device)
    pdt = parse_dtype(dtype)
    amp_dt = parse_amp(amp, dev.type)
    check_int(img_size, "img_size")
    check_int(num_classes, "num_classes")
    # preset None keeps a passed module's own conversion; for a model name it means "none".
    cfg = None if isinstance(model, nn.Module) and preset is None else as_config("none" if preset is None else preset)
    # Prediction builds and converts on meta first (timm's initialisers run there, not under fake tensors).
    build_dev = torch.device("meta") if dev.type == "meta" else dev
    if isinstance(model, nn.Module):
        label = type(model).__name__
        m = _copy_to(model, build_dev, empty=build_dev.type == "meta")
        in_chans = in_chans_of(m, in_chans)
        num_classes = getattr(m, "num_classes", num_classes) or num_classes
    else:
        label = str(model)
        m = build_model(model, num_classes=num_classes, in_chans=in_chans, device=build_dev, img_size=img_size)
    fake = None
    if dev.type == "meta" and amp_dt is not None:
        # meta has no autocast: an AMP prediction runs on fake CPU tensors under CPU bf16 autocast (fp16 has the
        # same sizes; CPU and CUDA autocast agree on convs and matmuls, the bulk of the memory).
        from torch._subclasses.fake_tensor import FakeTensorMode

        fake, dev, amp_dt = FakeTensorMode(), torch.device("cpu"), torch.bfloat16
        with fake:
            m = _copy_to(m, dev, empty=True, dtype=pdt, channels_last=channels_last)
    else:
        if any(p.dtype != pdt for p in m.parameters()):
            m = m.to(dtype=pdt)
        if channels_last:
            m = m.to(memory_format=torch.channels_last)
    # Converted last: the int8/offload peers key parameters by storage, which .to() replaces.
    if cfg is not None:
        with fake if fake is not None else contextlib.nullcontext():
            compress(m, cfg)
    m.train()
    with fake if fake is not None else contextlib.nullcontext():
        # meta stands in for a GPU, where optimizers default to the multi-tensor path (its temporaries count).
        opt = make_optimizer(m, optimizer, foreach if foreach is not None else (True if dev.type == "meta" else None))
        # fp16 autocast on CUDA trains with a GradScaler (fp32 master weights); the scaler cannot unscale fp16 params.
        scaler = torch.amp.GradScaler("cuda") if dev.type == "cuda" and amp_dt == torch.float16 \
            and pdt == torch.float32 else None
        if dev.type != "cuda":
            prime(m, opt)
    return Prepared(m, opt, dev, pdt, amp_dt, channels_last, in_chans, num_classes, img_size, label, fake, scaler)


_PREP_CACHE: collections.OrderedDict = collections.OrderedDict()


def prepare_cached(model, preset, dev: torch.device, kw: dict) -> Prepared:
    """:func:`prepare`, reusing the last few meta predictions' models: a meta step changes nothing in a model or
    its optimizer (no values), so the same prepared model serves every batch size of a sweep."""
    if dev.type != "meta" or not isinstance(model, str):
        return prepare(model, preset, dev, **kw)
    cfg = as_config("none" if preset is None else preset)
    key = (model, repr(cfg), tuple(sorted((k, repr(v)) for k, v in kw.items())))
    prep = _PREP_CACHE.get(key)
    if prep is None:
        prep = _PREP_CACHE[key] = prepare(model, cfg, dev, **kw)
        while len(_PREP_CACHE) > 4:
            _PREP_CACHE.popitem(last=False)
    _PREP_CACHE.move_to_end(key)
    return prep


# ------------------------------------------------------------------------------------------ the step

def _fused_attention_mode():
    from torch.overrides import TorchFunctionMode

    class _FusedAttention(TorchFunctionMode):
        """On meta, ``F.scaled_dot_product_attention`` can only pick its math path, which keeps the T×T attention
        matrix for backward; GPUs and CPUs run a fused kernel that keeps just the output and a log-sum-exp.
        Route the call to the fused CPU kernel (it has meta kernels), whose saved tensors match theirs."""

        def __torch_function__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                names = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa"]
                a = dict(zip(names, args), **kwargs)
                q = a["query"]
                if (a.get("attn_mask") is None and not a.get("enable_gqa", False) and not a.get("dropout_p", 0.0)
                        and q.device.type == "meta" and q.dim() == 4 and a["key"].shape[1] == q.shape[1]):
                    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
                        q, a["key"], a["value"], 0.0, bool(a.get("is_causal", False)), scale=a.get("scale"))[0]
            return func(*args, **kwargs)

    return _FusedAttention()


def live_bytes(prep: Prepared, tracker) -> int:
    """Bytes allocated now: the CUDA allocator's count on cuda, the tracker's elsewhere."""
    if prep.device.type == "cuda":
        return torch.cuda.memory_allocated(prep.device)
    return total(tracker, prep.device)


def run_step(prep: Prepared, batch_size: int, mark=None) -> None:
    """Batch creation, then :func:`actcomp.step.train_step` (``mark`` as there)."""
    meta = prep.device.type == "meta"
    # Also active in backward, where checkpointing recomputes the forward and must pick the same kernels.
    with _fused_attention_mode() if meta else contextlib.nullcontext():
        dev = prep.device
        # Created inside the step, as a loader's batch arrives: it counts in the peak.
        x = torch.randn(batch_size, prep.in_chans, prep.img_size, prep.img_size, device=dev,
                        dtype=prep.dtype if prep.amp_dtype is None else torch.float32)
        if prep.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, prep.num_classes, (batch_size,), device=dev)
        train_step(prep.model, prep.opt, x, y, amp_dtype=prep.amp_dtype, scaler=prep.scaler, mark=mark,
                   keep_modes=meta, label=prep.label)


def measure_step(prep: Prepared, batch_size: int) -> StepMemory:
    """One steady-state step under MemTracker (and the CUDA allocator's statistics on cuda)."""
    check_int(batch_size, "batch_size")
    cuda = prep.device.type == "cuda"
    with prep.mode():
        if cuda:
            torch.cuda.synchronize(prep.device)
            torch.cuda.reset_peak_memory_stats(prep.device)
        tracker = tracker_cls()(meta_cache=prep.device.type == "meta")
        tracker.track_external(prep.model, prep.opt)
        marks: dict[str, int] = {}

        def mark(name: str) -> None:
            marks[name] = live_bytes(prep, tracker)

        # Hundreds of thousands of long-lived objects (torch, timm) make every full garbage collection during the
        # step slow; frozen, they are skipped. Objects created by the step are collected as usual.
        freeze = gc.get_freeze_count() == 0  # never thaw objects the caller froze
        if freeze:
            gc.freeze()
        try:
            with tracker:
                run_step(prep, batch_size, mark)
        finally:
            if freeze:
                gc.unfreeze()
        peak_snap = tracker.get_tracker_snapshot("peak").get(prep.device, {})
    parts = breakdown(peak_snap)
    tracked_peak = int(peak_snap.get("Total", 0))
    after = marks["after_forward"] - marks["before_forward"]
    if not cuda:
        method = "memtracker-meta" if prep.device.type == "meta" or prep.fake_mode is not None else "memtracker-cpu"
        return StepMemory(tracked_peak, parts, after, method)
    torch.cuda.synchronize(prep.device)
    # Everything this step needs was allocated by us (model, optimizer state, workspaces of the warm-up);
    # what the caller had allocated before is left out via the baseline taken before the model was built.
    peak = torch.cuda.max_memory_allocated(prep.device) - prep.cuda_baseline
    reserved = torch.cuda.max_memory_reserved(prep.device)
    return StepMemory(int(peak), parts, int(after), "cuda", reserved_bytes=int(reserved))


def step_memory(model: str | nn.Module, batch_size: int, img_size: int = 224, preset=None, device="meta",
                optimizer: str = "sgd", dtype="float32", amp=False, channels_last: bool = False,
                num_classes: int = 1000, in_chans: int = 3, foreach: bool | None = None) -> StepMemory:
    """Peak memory of one steady-state training step of ``model`` (a timm name or a module) at ``batch_size``.

    preset: a preset name, CompressionConfig or mapping; ``None`` means "none" for a name and "as converted"
        for a module (a passed module is copied, never trained in place).
    device: "meta" (predict), "cpu" (measure with MemTracker) or "cuda" (measure with the allocator).
    optimizer: any timm optimizer name (SGD with momentum 0.9 by default; weight decay 1e-4).
    amp: False, True (fp16 on cuda, bf16 elsewhere), "bf16" or "fp16" (cuda, or meta as a prediction).
    foreach: the optimizer's multi-tensor path; None = the device's default (meta mimics CUDA: on).
    """
    check_int(batch_size, "batch_size")
    dev = parse_device(device)
    if isinstance(model, str):
        check_model_name(model)
    elif not isinstance(model, nn.Module):
        raise ActcompError(f"model must be a timm model name or an nn.Module, got {type(model).__name__}")
    kw = dict(optimizer=optimizer, dtype=dtype, amp=amp, channels_last=channels_last, num_classes=num_classes,
              img_size=img_size, foreach=foreach, in_chans=in_chans)
    if dev.type != "cuda":
        res = measure_step(prepare_cached(model, preset, dev, kw), batch_size)
    else:
        predicted = step_memory(model, batch_size, preset=preset, device="meta", **kw).peak_bytes
        res = _cuda_step(model, preset, dev, batch_size, kw)
        res.predicted_peak_bytes = predicted
    res.info = dict(model=model if isinstance(model, str) else type(model).__name__, batch_size=batch_size,
                    img_size=img_size, preset=_preset_name(model, preset), device=str(dev), optimizer=optimizer,
                    dtype=str(parse_dtype(dtype)).replace("torch.", ""), amp=amp, channels_last=channels_last)
    return res


def _preset_name(model, preset) -> str:
    if preset is None:
        cfg = config_of(model) if isinstance(model, nn.Module) else None
        return cfg.name if cfg is not None else "none"
    return as_config(preset).name


def _cuda_step(model, preset, dev, batch_size, kw) -> StepMemory:
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.synchronize(dev)
    baseline = torch.cuda.memory_allocated(dev)
    prep = prepare(model, preset, dev, **kw)
    prep.cuda_baseline = baseline
    try:
        run_step(prep, batch_size)  # warm-up: optimizer state, cuDNN/cuBLAS workspaces
        return measure_step(prep, batch_size)
    finally:
        del prep
        gc.collect()
        torch.cuda.empty_cache()
