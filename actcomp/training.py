"""Training with compressed activations: convergence, time-to-accuracy and schedule overhead (no Hydra, no W&B).

    from actcomp.data import build_data
    from actcomp.training import TrainConfig, train
    data = build_data("fashion_mnist", image_size=32, channels=3)
    res = train(TrainConfig(model="resnet18", preset="pool4", epochs=3, batch_size=128,
                            opt=dict(opt="sgd", lr=0.1), sched=dict(sched="cosine")), data, callback=print)
    res.history[-1]["val_top1"]

What is held equal across presets (so that a compression preset is the only difference): the model is built
under ``torch.manual_seed(seed)`` *before* it is converted, so every preset starts from the same weights, and the
training batches come from a ``DistributedSampler`` seeded with ``seed`` and re-shuffled per epoch from
``(seed, epoch)`` alone, so every preset sees the same batches in the same order (also after a resume).

Checkpoints (every epoch, written atomically) hold the model, optimizer, scheduler, grad scaler, every RNG
state, the epoch and the history; a run resumed from one ends, on CPU with the same seed, with the same
metrics as an uninterrupted run. Resuming with more epochs is allowed when the schedule does not depend on the
run's length (a step decay every N epochs) and refused otherwise (a cosine fitted to the old length would train
the extra epochs at its minimum rate).
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler, Sampler
from tqdm.auto import tqdm

from .config import ActcompError, as_config
from .convert import compress, config_of
from .data import DataBundle

MIB = 2.0**20


class TrainError(ActcompError):
    """A training run that cannot start or go on (one line, fit for a CLI)."""


@dataclass
class TrainConfig:
    """One training run. ``opt`` goes to timm ``create_optimizer_v2``, ``sched`` to ``create_scheduler_v2``."""

    model: str = "resnet18"
    model_kwargs: dict = field(default_factory=dict)  # extra timm.create_model kwargs (e.g. channels, stem_width)
    preset: Any = "none"  # preset name, CompressionConfig or mapping (actcomp.compress)
    epochs: int = 1
    batch_size: int = 64  # per process (as timm's train.py)
    epoch_samples: int | None = None  # samples per epoch (None: the whole training set); see EpochSampler
    eval_batch_size: int | None = None  # default: 2 x batch_size
    opt: dict = field(default_factory=lambda: dict(opt="sgd", lr=0.1, momentum=0.9, weight_decay=1e-4))
    sched: dict = field(default_factory=lambda: dict(sched="step", decay_epochs=30, decay_rate=0.1))
    label_smoothing: float = 0.0
    seed: int = 0
    deterministic: bool = False  # torch.use_deterministic_algorithms (warn only) + no cuDNN benchmarking
    amp: bool | str = False  # False | True (fp16 on cuda, bf16 elsewhere) | "bf16" | "fp16"
    channels_last: bool = False
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    threads: int | None = None  # torch CPU threads (None: leave as is)
    num_workers: int = 0
    grad_cosine: bool = False  # per-layer cosine(compressed, exact) weight grads on a fixed batch, every epoch
    memory: bool = True  # on CPU: saved-for-backward accounting + predicted step peak, once per run
    ckpt_path: str | None = None  # checkpoint written after every epoch (None: none)
    resume: bool = False  # continue from ckpt_path when it exists
    stop_after_epoch: int | None = None  # stop once this epoch is done (an interruption, for tests)
    targets: tuple = ()  # val top-1 targets (%) for the summary's time-to-accuracy
    progress: bool = True


@dataclass
class TrainResult:
    history: list[dict]  # one row per epoch (see EPOCH_COLUMNS)
    summary: dict
    finished: bool  # False when stopped early by stop_after_epoch
    cosines: list[dict] = field(default_factory=list)  # long format: epoch, layer, cosine


EPOCH_COLUMNS = [
    "epoch", "samples_seen", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
    "epoch_time_s", "eval_time_s", "cpu_time_s", "elapsed_s", "images_per_s",
    "peak_mem_mib", "peak_mem_source", "saved_mib", "grad_cos_mean", "grad_cos_min",
]

# Keys that may differ between a checkpoint and the run resuming it (they do not change the trajectory).
_RESUME_FREE = {"epochs", "ckpt_path", "resume", "stop_after_epoch", "targets", "progress", "num_workers",
                "grad_cosine", "memory", "threads", "eval_batch_size", "device"}


# ----------------------------------------------------------------------------------------- seeding / RNG

def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        # CUBLAS needs this before the first cuBLAS call for deterministic matmuls.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


# CPU kernels are chosen per instruction set at run time: ATen's vectorized kernels (ATEN_CPU_CAPABILITY), oneDNN's
# convolutions (ONEDNN_MAX_CPU_ISA) and MKL's GEMMs (MKL_CBWR). Each changes the floating-point summation order,
# so an AVX-512 host and an AVX2 host train to different bits from the same seed. The values are read once, on
# the first kernel call, so pinning works only before any tensor op of the process.
_ISA_ENV = {"avx2": dict(ATEN_CPU_CAPABILITY="avx2", ONEDNN_MAX_CPU_ISA="AVX2", MKL_CBWR="AVX2"),
            "avx512": dict(ATEN_CPU_CAPABILITY="avx512", ONEDNN_MAX_CPU_ISA="AVX512_CORE", MKL_CBWR="AVX512"),
            "default": dict(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41", MKL_CBWR="COMPATIBLE")}


def pin_cpu_numerics(isa: str | None = None, threads: int | None = None) -> dict:
    """Fix what decides the bits of a CPU run besides the seed: the torch thread count and (``isa``) the
    instruction set of the ATen, oneDNN and MKL kernels. Call it before the process runs any tensor op.

    ``isa="avx2"`` gives every x86-64 host with AVX2 the kernels an AVX2-only host picks by itself (on such a
    host nothing changes). Returns :func:`cpu_numerics`. Raises :class:`TrainError` when torch already chose
    other kernels (an op ran before) or the CPU lacks the instruction set.
    """
    if threads is not None:
        if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
            raise TrainError(f"threads must be a positive int, got {threads!r}")
        torch.set_num_threads(threads)
    if isa is not None:
        key = str(isa).lower()
        if key not in _ISA_ENV:
            raise TrainError(f"cpu_isa must be one of {', '.join(_ISA_ENV)} (or null), got {isa!r}")
        before = {k: os.environ.get(k) for k in _ISA_ENV[key]}
        os.environ.update(_ISA_ENV[key])
        got = torch.backends.cpu.get_cpu_capability()
        if got.lower() != _ISA_ENV[key]["ATEN_CPU_CAPABILITY"]:
            for k, v in before.items():  # leave the environment as it was
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
            raise TrainError(f"cpu_isa={key} could not be pinned: torch runs {got} kernels (an op ran before the "
                             f"pinning, or this CPU lacks {key}); start Python with "
                             + " ".join(f"{k}={v}" for k, v in _ISA_ENV[key].items()))
    return cpu_numerics()


def cpu_numerics() -> dict:
    """What this process's CPU results depend on besides code, versions and seed (recorded with a run)."""
    return dict(threads=torch.get_num_threads(), cpu_capability=torch.backends.cpu.get_cpu_capability(),
                **{k: os.environ.get(k, "") for k in ("ONEDNN_MAX_CPU_ISA", "MKL_CBWR")})


def rng_state() -> dict:
    st = dict(python=random.getstate(), numpy=np.random.get_state(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


@contextlib.contextmanager
def preserved_rng():
    """Diagnostics and accounting run inside this, so they never shift the training run's random stream."""
    st = rng_state()
    try:
        yield
    finally:
        set_rng_state(st)


# ----------------------------------------------------------------------------------------- distributed

@dataclass
class _Dist:
    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    owns_group: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0


def _resolve_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise TrainError(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TrainError("device=cuda requested but CUDA is not available on this machine; use device=cpu")
    if dev.type not in ("cpu", "cuda"):
        raise TrainError(f"device {spec!r} cannot train; use cpu or cuda")
    return dev


def _init_distributed(device: str) -> _Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK: join the group (gloo on CPU, nccl on CUDA)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    dev = _resolve_device(device)
    if world <= 1:
        return _Dist(device=dev)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if dev.type == "cuda":
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        owns = True
    return _Dist(dist.get_rank(), dist.get_world_size(), dev, owns)


class EpochSampler(Sampler):
    """Epochs shorter (or longer) than the dataset, for evaluating more often than once per pass.

    The training stream is the endless concatenation of permutations of the whole set, pass ``p`` shuffled by a
    generator seeded from ``(seed, p)``; epoch ``e`` is samples ``[e*k, (e+1)*k)`` of that stream, so every
    sample is seen once per pass and the order is a pure function of (seed, epoch): the same for every preset
    and after a resume. Under DDP each process takes every ``world``-th sample of the epoch.
    """

    def __init__(self, n: int, k: int, seed: int = 0, rank: int = 0, world: int = 1):
        self.n, self.k, self.seed, self.rank, self.world, self.epoch = n, k, seed, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _perm(self, p: int) -> list[int]:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + p)).tolist()

    def __iter__(self):
        idx, pos = [], self.epoch * self.k
        while len(idx) < self.k:
            p, off = divmod(pos + len(idx), self.n)
            idx += self._perm(p)[off: off + self.k - len(idx)]
        return iter(idx[self.rank:: self.world][: len(self)])

    def __len__(self) -> int:
        return self.k // self.world


class _ShardSampler(Sampler):
    """Every ``world``-th index from ``rank``: each val sample is evaluated exactly once across processes
    (DistributedSampler would pad with duplicates and bias the metrics)."""

    def __init__(self, n: int, rank: int, world: int):
        self.idx = list(range(rank, n, world))

    def __iter__(self):
        return iter(self.idx)

    def __len__(self):
        return len(self.idx)


def _all_sum(values: list[float], d: _Dist) -> list[float]:
    if d.world == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=d.device if d.device.type == "cuda" else "cpu")
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------------------- building blocks

def build_model(cfg: TrainConfig, num_classes: int, in_chans: int) -> nn.Module:
    """``timm.create_model(pretrained=False)`` under ``torch.manual_seed(cfg.seed)``, then converted."""
    import timm

    if not timm.is_model(cfg.model):
        import difflib

        close = difflib.get_close_matches(cfg.model, timm.list_models(), n=3, cutoff=0.6)
        raise TrainError(f"unknown timm model {cfg.model!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    with preserved_rng():
        # Seeded here, before conversion: every preset starts from bitwise the same weights.
        torch.manual_seed(cfg.seed)
        try:
            model = timm.create_model(cfg.model, pretrained=False, num_classes=num_classes, in_chans=in_chans,
                                      **dict(cfg.model_kwargs or {}))
        except (TypeError, ValueError, AssertionError, RuntimeError) as e:
            raise TrainError(f"cannot build {cfg.model} with {dict(cfg.model_kwargs or {})}: "
                             f"{str(e).splitlines()[0][:200]}") from None
    return compress(model, cfg.preset)


def _amp_dtype(amp, dev: torch.device) -> torch.dtype | None:
    if amp in (False, None, "false", "none", "off"):
        return None
    if amp is True or amp in ("true", "on"):
        return torch.float16 if dev.type == "cuda" else torch.bfloat16
    if amp in ("bf16", "bfloat16"):
        return torch.bfloat16
    if amp in ("fp16", "float16"):
        if dev.type != "cuda":
            raise TrainError("amp=fp16 needs CUDA; use amp=bf16 on CPU")
        return torch.float16
    raise TrainError(f"amp must be false, true, bf16 or fp16, got {amp!r}")


def accuracy_counts(logits: torch.Tensor, y: torch.Tensor, ks=(1, 5)) -> list[int]:
    """Number of samples whose label is among the top-k logits, per k (k capped at the number of classes)."""
    kmax = min(max(ks), logits.shape[1])
    top = logits.topk(kmax, dim=1).indices
    hit = top.eq(y[:, None])
    return [int(hit[:, : min(k, kmax)].any(dim=1).sum()) for k in ks]


def _atomic_save(obj, path: Path) -> None:
    """Write then rename: a run killed mid-write keeps its previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _fingerprint(cfg: TrainConfig) -> dict:
    d = asdict(cfg)
    d["preset"] = asdict(as_config(cfg.preset))
    d["preset"].pop("description", None)
    return {k: v for k, v in d.items() if k not in _RESUME_FREE}


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3])


def _memory_rows(model: nn.Module, cfg: TrainConfig, x: torch.Tensor, num_classes: int) -> dict:
    """CPU runs have no allocator peak worth reporting (max_memory_allocated is CUDA-only): report instead the
    bytes autograd saves for backward at this batch (measured) and, when ``actcomp.memory`` is available, the
    predicted peak of one training step at this batch size (MemTracker on meta)."""
    out = dict(saved_mib=float("nan"), peak_mem_mib=float("nan"), peak_mem_source="unavailable")
    import actcomp

    with preserved_rng():
        m = copy.deepcopy(model)  # the accounting forward updates BatchNorm statistics: not on the real model
        try:
            out["saved_mib"] = actcomp.saved_bytes(m, x).total_bytes / MIB
            out["peak_mem_mib"], out["peak_mem_source"] = out["saved_mib"], "saved-for-backward (accounting)"
        except ValueError:
            pass  # hook-based peers (ckpt/int8/offload) hide their saved tensors from the graph walk
        try:
            from .measure import step_memory

            sm = step_memory(copy.deepcopy(model), x.shape[0], img_size=x.shape[-1], device="meta",
                             optimizer=str(cfg.opt.get("opt", "sgd")), num_classes=num_classes,
                             in_chans=x.shape[1], amp=bool(cfg.amp), channels_last=cfg.channels_last)
            out["peak_mem_mib"], out["peak_mem_source"] = sm.peak_bytes / MIB, "predicted step peak (meta)"
        except Exception as e:  # an optional estimate; the run must not fail for it
            print(f"note: step-peak prediction unavailable ({type(e).__name__}: {str(e)[:120]})", file=sys.stderr)
    return out


# ----------------------------------------------------------------------------------------- the loop

def train(cfg: TrainConfig, data: DataBundle, callback: Callable[[dict], None] | None = None) -> TrainResult:
    """Train ``cfg.model`` with ``cfg.preset`` on ``data``; ``callback(row)`` after every epoch (rank 0)."""
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    for key in ("epochs", "batch_size", "epoch_samples"):
        v = getattr(cfg, key)
        if key == "epoch_samples" and v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise TrainError(f"{key} must be a positive int, got {v!r}")
    if cfg.resume and not cfg.ckpt_path:
        raise TrainError("resume needs a checkpoint path")
    d = _init_distributed(cfg.device)
    try:
        return _train(cfg, data, callback, d, create_optimizer_v2, create_scheduler_v2)
    finally:
        if d.owns_group:
            dist.destroy_process_group()


def _train(cfg, data, callback, d: _Dist, create_optimizer_v2, create_scheduler_v2) -> TrainResult:
    if cfg.threads:
        torch.set_num_threads(int(cfg.threads))
    seed_everything(cfg.seed + d.rank, cfg.deterministic)
    amp_dtype = _amp_dtype(cfg.amp, d.device)
    per_epoch = cfg.epoch_samples or len(data.train)
    if per_epoch < cfg.batch_size * d.world:
        raise TrainError(f"batch_size={cfg.batch_size} x {d.world} process(es) exceeds the {per_epoch} "
                         f"training samples per epoch (the last partial batch is dropped)")

    model = build_model(cfg, data.num_classes, data.in_chans)
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model = model.to(d.device, memory_format=fmt)
    preset_name = config_of(model).name

    if cfg.epoch_samples:
        sampler = EpochSampler(len(data.train), cfg.epoch_samples, cfg.seed, d.rank, d.world)
    else:
        sampler = DistributedSampler(data.train, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed)
    loader_kw = dict(num_workers=cfg.num_workers, pin_memory=d.device.type == "cuda")
    # drop_last: a trailing batch of 1 would break BatchNorm and skew per-step timing.
    train_loader = DataLoader(data.train, batch_size=cfg.batch_size, sampler=sampler, drop_last=True, **loader_kw)
    val_loader = DataLoader(data.val, batch_size=cfg.eval_batch_size or 2 * cfg.batch_size,
                            sampler=_ShardSampler(len(data.val), d.rank, d.world), **loader_kw)

    try:
        optimizer = create_optimizer_v2(model, **dict(cfg.opt))
        scheduler, num_epochs = create_scheduler_v2(optimizer, num_epochs=cfg.epochs,
                                                    updates_per_epoch=len(train_loader), **dict(cfg.sched))
    except (TypeError, ValueError, AssertionError) as e:
        raise TrainError(f"optimizer/scheduler: {str(e).splitlines()[0][:200]}") from None
    scaler = torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None

    ddp_model = model
    if d.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None)

    history: list[dict] = []
    cosines: list[dict] = []
    start_epoch, num_updates = 0, 0
    ckpt = Path(cfg.ckpt_path) if cfg.ckpt_path else None
    if ckpt is not None and cfg.resume and ckpt.is_file():
        state = torch.load(ckpt, map_location="cpu", weights_only=False)
        if state.get("fingerprint") != _fingerprint(cfg):
            raise TrainError(f"checkpoint {ckpt} was written by a different run ({_diff(state.get('fingerprint', {}), _fingerprint(cfg))}); "
                             f"use a new output dir or the same settings")
        _check_schedule_length(state, cfg, ckpt, lambda n: _schedule_state(cfg, n, len(train_loader),
                                                                           create_scheduler_v2))
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, num_updates = state["epoch"], state["num_updates"]
        history, cosines = list(state["history"]), list(state.get("cosines", []))
        rngs = state["rng"]
        set_rng_state(rngs[d.rank] if len(rngs) == d.world else rngs[0])
        was, now = state.get("numerics"), cpu_numerics()
        if d.device.type == "cpu" and was and was != now:  # allowed, but the bits of the rest will differ
            print(f"note: resuming with CPU numerics {now} instead of the checkpoint's {was}: the continuation "
                  f"is not bitwise what an uninterrupted run would give", file=sys.stderr)
    elif ckpt is not None and ckpt.exists() and not cfg.resume:
        raise TrainError(f"{ckpt} already exists; pass resume=true to continue it, or use another output dir")

    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    # Fixed batch for the gradient-cosine diagnostic: the first training samples, the same for every preset.
    cos_batch = None
    if cfg.grad_cosine and d.main:
        with preserved_rng():  # loading draws random numbers (loader seed, flips); a resumed run must not see it
            xs, ys = _first_batch(data.train, cfg.batch_size)
        cos_batch = (xs.to(d.device), ys.to(d.device))
    mem: dict | None = None
    finished = True

    for epoch in range(start_epoch, num_epochs):
        e1 = epoch + 1
        sampler.set_epoch(epoch)
        if d.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d.device)
        ddp_model.train()
        # loss*n, correct, n: accumulated on the device so that a GPU step does not wait for a host sync
        sums = torch.zeros(3, dtype=torch.float64, device=d.device)
        show = cfg.progress and d.main
        bar = tqdm(train_loader, desc=f"{preset_name} epoch {e1}/{num_epochs}", disable=not show, leave=False,
                   dynamic_ncols=True, mininterval=0.5 if sys.stderr.isatty() else 30, file=sys.stderr)
        lr0 = optimizer.param_groups[0]["lr"]  # the rate the epoch starts with (per-step schedules move it)
        t0, c0 = time.perf_counter(), time.process_time()
        for step, (x, y) in enumerate(bar):
            x = x.to(d.device, non_blocking=True, memory_format=fmt)
            y = y.to(d.device, non_blocking=True)
            with torch.autocast(d.device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                out = ddp_model(x)
                loss = criterion(out, y)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            num_updates += 1
            scheduler.step_update(num_updates=num_updates)
            n = y.shape[0]
            ld = loss.detach()
            sums[0] += ld.double() * n
            sums[1] += out.detach().argmax(1).eq(y).sum()
            sums[2] += n
            if step % 10 == 0:  # a host sync, so only now and then
                if not math.isfinite(float(ld)):
                    raise TrainError(f"training loss became {float(ld)} at epoch {e1}, step {step + 1} "
                                     f"(preset {preset_name}); the last checkpoint is from epoch {epoch}")
                s = sums.tolist()
                bar.set_postfix(loss=f"{s[0] / s[2]:.3f}", acc=f"{100 * s[1] / s[2]:.1f}", refresh=False)
        if d.device.type == "cuda":
            torch.cuda.synchronize(d.device)
        train_time, cpu_time = time.perf_counter() - t0, time.process_time() - c0
        bar.close()
        tl, tc, tn = _all_sum(sums.tolist(), d)
        if not math.isfinite(tl):
            raise TrainError(f"training loss became non-finite in epoch {e1} (preset {preset_name})")

        t1 = time.perf_counter()
        vl, v1, v5, vn = evaluate(model, val_loader, d, amp_dtype, fmt)
        eval_time = time.perf_counter() - t1

        row = dict(epoch=e1, samples_seen=int(tn) + (history[-1]["samples_seen"] if history else 0), lr=lr0, train_loss=tl / tn, train_top1=100 * tc / tn,
                   val_loss=vl / vn, val_top1=100 * v1 / vn, val_top5=100 * v5 / vn,
                   epoch_time_s=train_time, eval_time_s=eval_time, cpu_time_s=cpu_time,
                   elapsed_s=(history[-1]["elapsed_s"] if history else 0.0) + train_time + eval_time,
                   images_per_s=tn / train_time if train_time > 0 else float("nan"))  # all processes together
        scheduler.step(e1, row["val_top1"])

        if d.device.type == "cuda":
            row.update(peak_mem_mib=torch.cuda.max_memory_allocated(d.device) / MIB,
                       peak_mem_source="cuda max_memory_allocated", saved_mib=float("nan"))
        elif cfg.memory and d.main:
            if mem is None:  # independent of the weights: computed once per process
                with preserved_rng():
                    xb, _ = _first_batch(data.train, cfg.batch_size)
                mem = _memory_rows(model, cfg, xb.to(memory_format=fmt), data.num_classes)
            row.update(mem)
        else:
            row.update(peak_mem_mib=float("nan"), peak_mem_source="not measured", saved_mib=float("nan"))

        row.update(grad_cos_mean=float("nan"), grad_cos_min=float("nan"))
        if cos_batch is not None:
            from .diagnostics import grad_cosine

            with preserved_rng():
                cs = grad_cosine(model, config_of(model), *cos_batch)
            vals = [v for v in cs.values() if not math.isnan(v)]
            if vals:
                row.update(grad_cos_mean=float(np.mean(vals)), grad_cos_min=float(np.min(vals)))
            cosines.extend(dict(epoch=e1, layer=k, cosine=v) for k, v in cs.items())

        history.append(row)
        rngs = [rng_state()]
        if d.world > 1:  # each process's RNG state, so a resumed DDP run continues every stream
            rngs = [None] * d.world
            dist.all_gather_object(rngs, rng_state())
        if d.main and ckpt is not None:
            _atomic_save(dict(version=1, epoch=e1, epochs=cfg.epochs, num_updates=num_updates, model=model.state_dict(),
                              optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                              scaler=scaler.state_dict() if scaler is not None else None, history=history,
                              cosines=cosines, fingerprint=_fingerprint(cfg), rng=rngs,
                              numerics=cpu_numerics()), ckpt)
        if d.main and callback is not None:
            with preserved_rng():  # whatever the callback does, the next epoch starts from the checkpointed state
                callback(dict(row, preset=preset_name))
        if cfg.stop_after_epoch is not None and e1 >= cfg.stop_after_epoch and e1 < num_epochs:
            finished = False
            break

    summary = summarize(history, cfg.targets)
    summary.update(preset=preset_name, model=cfg.model, epochs_planned=num_epochs, finished=finished,
                   world_size=d.world, device=str(d.device), n_train=len(data.train), n_val=len(data.val))
    return TrainResult(history, summary, finished, cosines)


def _schedule_state(cfg: TrainConfig, epochs: int, updates_per_epoch: int, create_scheduler_v2) -> dict:
    """The state of a fresh ``cfg.sched`` scheduler for ``epochs`` epochs (on a stand-in optimizer)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=float(cfg.opt.get("lr", 0.1)))
    sched, _ = create_scheduler_v2(opt, num_epochs=epochs, updates_per_epoch=updates_per_epoch, **dict(cfg.sched))
    return sched.state_dict()


def _check_schedule_length(state: dict, cfg: TrainConfig, ckpt: Path, fresh: Callable[[int], dict]) -> None:
    """A resumed run may ask for more epochs only when the schedule does not depend on the length (a step decay
    every N epochs); a cosine schedule fitted to the old length would keep its minimum rate for the extra
    epochs, and refitting it mid-run would make a schedule no uninterrupted run has. Refused in one line."""
    done = int(state["epoch"])
    if cfg.epochs < done:
        raise TrainError(f"checkpoint {ckpt} already holds {done} epochs; epochs={cfg.epochs} is fewer "
                         f"(resume with epochs>={done})")
    old = state.get("epochs")
    if old == cfg.epochs:
        return
    # metric: set by the last step; base_values: the optimizer's groups (the stand-in has one; lr is fingerprinted)
    ignore = {"metric", "base_values"}
    # Checkpoints written before the length was stored: compare with the checkpoint's own scheduler.
    a = fresh(int(old)) if old is not None else state["scheduler"]
    b = fresh(cfg.epochs)
    if {k: v for k, v in a.items() if k not in ignore} != {k: v for k, v in b.items() if k not in ignore}:
        kind, was = cfg.sched.get("sched", "?"), f"{old}-epoch" if old is not None else "shorter"
        raise TrainError(f"checkpoint {ckpt} was trained on a {was} {kind} schedule and epochs={cfg.epochs} would "
                         f"change it (its learning rate is at its minimum once the old length is reached); resume "
                         f"with {f'epochs={old}' if old is not None else 'the epochs it was started with'}, or "
                         f"start a new run with epochs={cfg.epochs}")


def _first_batch(ds, n: int):
    return next(iter(DataLoader(ds, batch_size=min(n, len(ds)), shuffle=False)))


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, d: _Dist | None = None, amp_dtype=None,
             fmt=torch.contiguous_format) -> tuple[float, float, float, float]:
    """Summed val loss, top-1 hits, top-5 hits and count (summed over processes under DDP)."""
    d = d or _Dist(device=next(model.parameters()).device)
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
    return tuple(_all_sum(tot, d))


# ----------------------------------------------------------------------------------------- time-to-accuracy

def _records(history) -> list[dict]:
    if hasattr(history, "to_dict"):  # a pandas DataFrame
        return history.sort_values("epoch").to_dict("records")
    return sorted((dict(r) for r in history), key=lambda r: r["epoch"])


@dataclass(frozen=True)
class Reached:
    epoch: int | None  # first epoch whose metric >= target (None: never)
    time_s: float | None  # the time column at that epoch


def time_to_accuracy(history, target: float, metric: str = "val_top1", time_key: str = "elapsed_s") -> Reached:
    """First epoch (and its cumulative time) at which ``metric`` reaches ``target``."""
    for r in _records(history):
        v = r.get(metric)
        if v is not None and not (isinstance(v, float) and math.isnan(v)) and v >= target:
            return Reached(int(r["epoch"]), float(r[time_key]) if r.get(time_key) is not None else None)
    return Reached(None, None)


def schedule_overhead(history, baseline, target: float | None = None, delta: float = 0.5, metric: str = "val_top1",
                      time_key: str = "elapsed_s") -> dict:
    """Epochs and time a run needs to reach ``target`` over the baseline's (ratios > 1: a longer schedule).

    target: a fixed value of ``metric``, or None for the baseline's best minus ``delta``.
    Ratios are NaN when either run never reaches the target.
    """
    base = _records(baseline)
    if target is None:
        target = max(r[metric] for r in base) - delta
    a, b = time_to_accuracy(history, target, metric, time_key), time_to_accuracy(base, target, metric, time_key)
    nan = float("nan")
    return dict(target=float(target), reached=a.epoch is not None, epoch=a.epoch, time_s=a.time_s,
                baseline_reached=b.epoch is not None, baseline_epoch=b.epoch, baseline_time_s=b.time_s,
                epochs_ratio=a.epoch / b.epoch if a.epoch and b.epoch else nan,
                time_ratio=a.time_s / b.time_s if a.time_s and b.time_s else nan)


def overhead_table(histories: Mapping[str, Any], baseline: str = "none", targets: Iterable[float] = (),
                   deltas: Iterable[float] = (), metric: str = "val_top1", time_key: str = "elapsed_s") -> list[dict]:
    """One row per (run, target): time-to-accuracy of every run in ``histories`` against ``histories[baseline]``,
    for each fixed target and each "baseline best minus delta" target. Also final/best accuracy per run."""
    if baseline not in histories:
        raise TrainError(f"baseline {baseline!r} not among the runs ({', '.join(histories)})")
    base = histories[baseline]
    rows = []
    for name, h in histories.items():
        recs = _records(h)
        common = dict(run=name, final_val_top1=recs[-1][metric], best_val_top1=max(r[metric] for r in recs),
                      epochs=len(recs), total_time_s=recs[-1][time_key])
        for t in targets:
            rows.append(dict(common, target_kind="fixed", **schedule_overhead(recs, base, t, metric=metric,
                                                                               time_key=time_key)))
        for dl in deltas:
            rows.append(dict(common, target_kind=f"baseline_best-{dl:g}",
                             **schedule_overhead(recs, base, None, dl, metric, time_key)))
    return rows


def summarize(history, targets: Iterable[float] = ()) -> dict:
    recs = _records(history)
    if not recs:
        return dict(epochs_done=0)
    best = max(recs, key=lambda r: r["val_top1"])
    last = recs[-1]
    out = dict(epochs_done=len(recs), best_val_top1=best["val_top1"], best_epoch=best["epoch"],
               final_val_top1=last["val_top1"], final_val_top5=last["val_top5"], final_val_loss=last["val_loss"],
               final_train_loss=last["train_loss"], total_elapsed_s=last["elapsed_s"],
               mean_images_per_s=float(np.mean([r["images_per_s"] for r in recs])),
               peak_mem_mib=max((r.get("peak_mem_mib", float("nan")) for r in recs), default=float("nan")),
               peak_mem_source=last.get("peak_mem_source"), saved_mib=last.get("saved_mib"))
    for t in targets:
        r = time_to_accuracy(recs, t)
        out[f"tta_{t:g}_epoch"], out[f"tta_{t:g}_time_s"] = r.epoch, r.time_s
    return out


__all__ = ["EPOCH_COLUMNS", "EpochSampler", "Reached", "TrainConfig", "TrainError", "TrainResult", "accuracy_counts", "build_model",
           "cpu_numerics", "evaluate", "overhead_table", "pin_cpu_numerics", "preserved_rng", "rng_state", "schedule_overhead", "seed_everything",
           "set_rng_state", "summarize", "time_to_accuracy", "train"]
