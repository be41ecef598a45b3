"""Checkpoints: written atomically after every epoch, and a resume that continues a run bitwise or refuses in one line.

A checkpoint holds the model, optimizer, scheduler, grad scaler, every process's RNG state, the epoch, the
history and a fingerprint of the settings that decide the trajectory. Resuming with more epochs is allowed when
the schedule does not depend on the run's length (a step decay every N epochs) and refused otherwise (a cosine
fitted to the old length would train the extra epochs at its minimum rate).
"""
from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

from ..config import as_config
from ..policy import budget_spec
from .config import TrainConfig, TrainError
from .distributed import Dist
from .numerics import cpu_numerics, set_rng_state

# Keys that may differ between a checkpoint and the run resuming it (they do not change the trajectory).
_RESUME_FREE = {"epochs", "ckpt_path", "resume", "stop_after_epoch", "targets", "progress", "num_workers",
                "grad_cosine", "memory", "threads", "eval_batch_size", "device"}


def fingerprint(cfg: TrainConfig) -> dict:
    """The settings a resumed run must share with its checkpoint (the preset resolved to its full config)."""
    d = asdict(cfg)
    planned = budget_spec(cfg.preset)
    if planned is not None:
        d["preset"] = planned  # the plan is a function of the spec, the seed and the data, all fingerprinted
    else:
        d["preset"] = asdict(as_config(cfg.preset))
        d["preset"].pop("description", None)
    return {k: v for k, v in d.items() if k not in _RESUME_FREE}


def _diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return "; ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:3])


def atomic_save(obj, path: Path) -> None:
    """Write then rename: a run killed mid-write keeps its previous checkpoint intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save(path: Path, cfg: TrainConfig, epoch: int, num_updates: int, model: nn.Module, optimizer, scheduler,
         scaler, history: list[dict], cosines: list[dict], rngs: list[dict]) -> None:
    atomic_save(dict(version=1, epoch=epoch, epochs=cfg.epochs, num_updates=num_updates, model=model.state_dict(),
                     optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     scaler=scaler.state_dict() if scaler is not None else None, history=history,
                     cosines=cosines, fingerprint=fingerprint(cfg), rng=rngs, numerics=cpu_numerics()), path)


@dataclass
class Progress:
    """Where a run starts: epoch 0, or where its checkpoint left off."""

    epoch: int = 0
    num_updates: int = 0
    history: list[dict] = field(default_factory=list)
    cosines: list[dict] = field(default_factory=list)


def resume(cfg: TrainConfig, d: Dist, model: nn.Module, optimizer, scheduler, scaler,
           fresh_schedule: Callable[[int], dict]) -> Progress:
    """Load ``cfg.ckpt_path`` into the run's objects and RNG when ``cfg.resume`` and the file exists (after
    checking that it comes from the same settings and schedule); refuse to overwrite it without ``resume``.

    ``fresh_schedule(epochs)``: the state of a new scheduler for that many epochs (see check_schedule_length).
    """
    ckpt = Path(cfg.ckpt_path) if cfg.ckpt_path else None
    if ckpt is None:
        return Progress()
    if not (cfg.resume and ckpt.is_file()):
        if ckpt.exists() and not cfg.resume:
            raise TrainError(f"{ckpt} already exists; pass resume=true to continue it, or use another output dir")
        return Progress()
    state = torch.load(ckpt, map_location="cpu", weights_only=False)
    if state.get("fingerprint") != fingerprint(cfg):
        raise TrainError(f"checkpoint {ckpt} was written by a different run "
                         f"({_diff(state.get('fingerprint', {}), fingerprint(cfg))}); "
                         f"use a new output dir or the same settings")
    check_schedule_length(state, cfg, ckpt, fresh_schedule)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    rngs = state["rng"]
    set_rng_state(rngs[d.rank] if len(rngs) == d.world else rngs[0])
    was, now = state.get("numerics"), cpu_numerics()
    if d.device.type == "cpu" and was and was != now:  # allowed, but the bits of the rest will differ
        print(f"note: resuming with CPU numerics {now} instead of the checkpoint's {was}: the continuation "
              f"is not bitwise what an uninterrupted run would give", file=sys.stderr)
    return Progress(state["epoch"], state["num_updates"], list(state["history"]), list(state.get("cosines", [])))


def schedule_state(cfg: TrainConfig, epochs: int, updates_per_epoch: int, create_scheduler_v2) -> dict:
    """The state of a fresh ``cfg.sched`` scheduler for ``epochs`` epochs (on a stand-in optimizer)."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=float(cfg.opt.get("lr", 0.1)))
    sched, _ = create_scheduler_v2(opt, num_epochs=epochs, updates_per_epoch=updates_per_epoch, **dict(cfg.sched))
    return sched.state_dict()


def check_schedule_length(state: dict, cfg: TrainConfig, ckpt: Path, fresh: Callable[[int], dict]) -> None:
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


__all__ = ["Progress", "atomic_save", "check_schedule_length", "fingerprint", "resume", "save", "schedule_state"]
