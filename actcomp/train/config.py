"""What a training run is given (TrainConfig) and what it gives back (TrainResult, one EPOCH_COLUMNS row per epoch)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ..errors import ActcompError


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

__all__ = ["EPOCH_COLUMNS", "TrainConfig", "TrainError", "TrainResult"]
