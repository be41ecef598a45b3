"""train(): set a run up, then per epoch the training steps, evaluation, diagnostics, a checkpoint and a row.

What is held equal across presets (so that a compression preset is the only difference): the model is built
under ``torch.manual_seed(seed)`` *before* it is converted, so every preset starts from the same weights, and the
training batches come from a sampler seeded with ``seed`` and re-shuffled per epoch from ``(seed, epoch)``
alone, so every preset sees the same batches in the same order (also after a resume).
"""
from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from .. import models
from ..convert import config_of
from ..data import DataBundle
from ..devices import parse_amp
from ..errors import ActcompError, check_int, one_line
from ..policy import budget_spec
from ..step import train_step
from . import checkpoint
from .config import TrainConfig, TrainError, TrainResult
from .distributed import Dist, EpochSampler, ShardSampler, all_rng_states, all_sum, init_distributed
from .numerics import preserved_rng, rng_state, seed_everything
from .probes import MIB, cosine_columns, first_batch, memory_columns
from .tta import summarize


def build_model(cfg: TrainConfig, num_classes: int, in_chans: int, calib=None) -> nn.Module:
    """``cfg.model`` built under ``torch.manual_seed(cfg.seed)`` with ``cfg.model_kwargs``, then converted with
    ``cfg.preset``: every preset starts from bitwise the same weights. A budget preset plans its per-layer codes
    on ``calib`` (images, labels) with ``cfg.seed``: the same plan on a resume."""
    kw = dict(preset=cfg.preset)
    spec = budget_spec(cfg.preset)
    if spec is not None:
        if calib is None:
            raise TrainError(f"budget preset {cfg.preset!r} needs a calibration batch")
        spec.setdefault("seed", cfg.seed)
        kw = dict(preset=spec, example_input=calib[0], target=calib[1])
    with preserved_rng():  # every stream, CUDA's included, as the run seeded it
        return models.build_model(cfg.model, num_classes, in_chans, seed=cfg.seed,
                                  model_kwargs=dict(cfg.model_kwargs or {}), **kw)


def accuracy_counts(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, per k (k capped at the number of classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(y[:, None])
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, d: Dist | None = None, amp_dtype=None,
             fmt=torch.contiguous_format) -> tuple[float, float, float, float]:
    """Summed val loss, top-1 hits, top-5 hits and count (summed over processes under DDP)."""
    d = d or Dist(device=next(model.parameters()).device)
    model.eval()
    tot = [0.0, 0.0, 0.0, 0.0]
    for x, y in loader:
        x = x.to(d.device, non_blocking=True, memory_format=fmt)
        y = y.to(d.device, non_blocking=True)
        with torch.autocast(d.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
            out = model(x)
        tot[0] += float(F.cross_entropy(out.float(), y, reduction="sum"))
        c1, c5 = accuracy_counts(out, y)
        tot[1] += c1
        tot[2] += c5
        tot[3] += y.shape[0]
    return tuple(all_sum(tot, d))


@dataclass
class Run:
    """Everything one training run is made of, built by :func:`setup`."""

    cfg: TrainConfig
    d: Dist
    model: nn.Module  # the converted model (checkpointed, evaluated, diagnosed)
    ddp_model: nn.Module  # the model the steps run (DistributedDataParallel under torchrun)
    train_loader: DataLoader
    val_loader: DataLoader
    optimizer: torch.optim.Optimizer
    scheduler: object  # a timm scheduler
    num_epochs: int
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    fmt: torch.memory_format
    preset: str
    criterion: nn.Module
    num_updates: int = 0


def train(cfg: TrainConfig, data: DataBundle, callback: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``cfg.model`` with ``cfg.preset`` on ``data``; ``callback(row)`` after every epoch (rank 0)."""
    for key in ("epochs", "batch_size", "epoch_samples"):
        check_int(getattr(cfg, key), key, 1, none_ok=key == "epoch_samples", error=TrainError)
    if cfg.resume and not cfg.ckpt_path:
        raise TrainError("resume needs a checkpoint path")
    d = init_distributed(cfg.device)
    try:
        return _train(cfg, data, callback, d)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _train(cfg: TrainConfig, data: DataBundle, callback, d: Dist) -> TrainResult:
    from timm.scheduler import create_scheduler_v2

    r = setup(cfg, data, d)
    done = checkpoint.resume(cfg, d, r.model, r.optimizer, r.scheduler, r.scaler, lambda n: checkpoint.schedule_state(
        cfg, n, len(r.train_loader), create_scheduler_v2))
    r.num_updates, history, cosines = done.num_updates, done.history, done.cosines
    # Fixed batch for the gradient-cosine diagnostic: the first training samples, the same for every preset.
    cos_batch = None
    if cfg.grad_cosine and d.main:
        xs, ys = first_batch(data.train, cfg.batch_size)
        cos_batch = (xs.to(d.device), ys.to(d.device))
    mem: dict | None = None
    finished = True

    for epoch in range(done.epoch, r.num_epochs):
        e1 = epoch + 1
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        lr0 = r.optimizer.param_groups[0]["lr"]  # the rate the epoch starts with (per-step schedules move it)
        sums, train_time, cpu_time = train_epoch(r, epoch)
        tl, tc, tn = all_sum(sums, d)
        if not math.isfinite(tl):
            raise TrainError(f"training loss became non-finite in epoch {e1} (preset {r.preset})")

        t1 = time.perf_counter()
        vl, v1, v5, vn = evaluate(r.model, r.val_loader, d, r.amp_dtype, r.fmt)
        eval_time = time.perf_counter() - t1

        prev = history[-1] if history else dict(samples_seen=0, elapsed_s=0.0)
        row = dict(epoch=e1, samples_seen=int(tn) + prev["samples_seen"], lr=lr0, train_loss=tl / tn,
                   train_top1=100 * tc / tn, val_loss=vl / vn, val_top1=100 * v1 / vn, val_top5=100 * v5 / vn,
                   epoch_time_s=train_time, eval_time_s=eval_time, cpu_time_s=cpu_time,
                   elapsed_s=prev["elapsed_s"] + train_time + eval_time,
                   images_per_s=tn / train_time if train_time > 0 else float("nan"))  # all processes together
        r.scheduler.step(e1, row["val_top1"])

        if d.device.type == "cuda":
            row.update(peak_mem_mib=torch.cuda.max_memory_allocated(d.device) / MIB,
                       peak_mem_source="cuda max_memory_allocated", saved_mib=float("nan"))
        elif cfg.memory and d.main:
            if mem is None:  # independent of the weights: computed once per process
                xb, _ = first_batch(data.train, cfg.batch_size)
                mem = memory_columns(r.model, xb.to(memory_format=r.fmt), data.num_classes,
                                     str(cfg.opt.get("opt", "sgd")), bool(cfg.amp), cfg.channels_last)
            row.update(mem)
        else:
            row.update(peak_mem_mib=float("nan"), peak_mem_source="not measured", saved_mib=float("nan"))
        cols, rows = cosine_columns(r.model, cos_batch, e1)
        row.update(cols)
        cosines.extend(rows)

        history.append(row)
        rngs = all_rng_states(rng_state(), d)
        if d.main and cfg.ckpt_path:
            checkpoint.save(Path(cfg.ckpt_path), cfg, e1, r.num_updates, r.model, r.optimizer, r.scheduler,
                            r.scaler, history, cosines, rngs)
        if d.main and callback is not None:
            with preserved_rng():  # whatever the callback does, the next epoch starts from the checkpointed state
                callback(dict(row, preset=r.preset))
        if cfg.stop_after_epoch is not None and e1 >= cfg.stop_after_epoch and e1 < r.num_epochs:
            finished = False
            break

    summary = summarize(history, cfg.targets)
    summary.update(preset=r.preset, model=cfg.model, epochs_planned=r.num_epochs, finished=finished,
                   world_size=d.world, device=str(d.device), n_train=len(data.train), n_val=len(data.val))
    return TrainResult(history, summary, finished, cosines)


def setup(cfg: TrainConfig, data: DataBundle, d: Dist) -> Run:
    """Seeds, model, loaders, optimizer and schedule of a run (no checkpoint loaded yet)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    seed_everything(cfg.seed + d.rank, cfg.deterministic)
    try:
        amp_dtype = parse_amp(cfg.amp, d.device.type)
    except ActcompError as e:
        raise TrainError(one_line(e)) from None
    per_epoch = cfg.epoch_samples or len(data.train)
    if per_epoch < cfg.batch_size * d.world:
        raise TrainError(f"batch_size={cfg.batch_size} x {d.world} process(es) exceeds the {per_epoch} "
                         f"training samples per epoch (the last partial batch is dropped)")

    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    # A budget preset calibrates on the first training samples (unshuffled: the same batch on every rank).
    calib = first_batch(data.train, cfg.batch_size) if budget_spec(cfg.preset) is not None else None
    model = build_model(cfg, data.num_classes, data.in_chans, calib).to(d.device, memory_format=fmt)

    if cfg.epoch_samples:
        sampler = EpochSampler(len(data.train), cfg.epoch_samples, cfg.seed, d.rank, d.world)
    else:
        sampler = DistributedSampler(data.train, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
    loader_kw = dict(num_workers=cfg.num_workers, pin_memory=d.device.type == "cuda")
    # drop_last: a trailing batch of 1 would break BatchNorm and skew per-step timing.
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **loader_kw)
    val_loader = DataLoader(data.val, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                            sampler=ShardSampler(len(data.val), d.rank, d.world), **loader_kw)
    try:
        optimizer = create_optimizer_v2(model, **dict(cfg.opt))
        scheduler, num_epochs = create_scheduler_v2(optimizer, num_epochs=cfg.epochs,
                                                    updates_per_epoch=len(train_loader), **dict(cfg.sched))
    except (TypeError, ValueError, AssertionError) as e:
        raise TrainError(f"optimizer/scheduler: {one_line(e, 200, typed=False)}") from None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None
    ddp_model = model
    if d.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)
    return Run(cfg, d, model, ddp_model, train_loader, val_loader, optimizer, scheduler, num_epochs, scaler,
               amp_dtype, fmt, config_of(model).name, nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing))


def train_epoch(r: Run, epoch: int) -> tuple[list[float], float, float]:
    """The training steps of one epoch (:func:`actcomp.step.train_step`, the step memory and speed measure):
    (loss x n, correct, n) summed on this process, wall and CPU seconds."""
    r.train_loader.sampler.set_epoch(epoch)
    r.ddp_model.train()
    # loss*n, correct, n: accumulated on the device so that a GPU step does not wait for a host sync
    sums = torch.zeros(3, dtype=torch.float64, device=r.d.device)
    bar = tqdm(r.train_loader, desc=f"{r.preset} epoch {epoch + 1}/{r.num_epochs}", leave=False,
               disable=not (r.cfg.progress and r.d.main), dynamic_ncols=True,
               mininterval=0.5 if sys.stderr.isatty() else 30, file=sys.stderr)
    hits = []

    def criterion(out, y):  # the step keeps no logits: count the top-1 hits on the way
        hits.append(out.detach().argmax(1).eq(y).sum())
        return r.criterion(out, y)

    t0, c0 = time.perf_counter(), time.process_time()
    for step, (x, y) in enumerate(bar):
        x = x.to(r.d.device, non_blocking=True, memory_format=r.fmt)
        y = y.to(r.d.device, non_blocking=True)
        ld = train_step(r.ddp_model, r.optimizer, x, y, r.amp_dtype, r.scaler, criterion,
                        label=f"{r.cfg.model} ({r.preset})", return_loss=True)
        r.num_updates += 1
        r.scheduler.step_update(num_updates=r.num_updates)
        n = y.shape[0]
        sums[0] += ld.double() * n
        sums[1] += hits.pop()
        sums[2] += n
        if step % 10 == 0:  # a host sync, so only now and then
            if not math.isfinite(float(ld)):
                raise TrainError(f"training loss became {float(ld)} at epoch {epoch + 1}, step {step + 1} "
                                 f"(preset {r.preset}); the last checkpoint is from epoch {epoch}")
            s = sums.tolist()
            bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{100 * s[1] / s[2]:.1f}", refresh=False)
    if r.d.device.type == "cuda":
        torch.cuda.synchronize(r.d.device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    bar.close()
    return sums.tolist(), wall, cpu


__all__ = ["Run", "accuracy_counts", "build_model", "evaluate", "setup", "train", "train_epoch"]
