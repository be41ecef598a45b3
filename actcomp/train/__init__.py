"""Training with compressed activations: convergence, time-to-accuracy and schedule overhead (no Hydra, no W&B).

    from actcomp.data import build_data
    from actcomp.train import TrainConfig, train
    data = build_data("fashion_mnist", image_size=32, channels=3)
    res = train(TrainConfig(model="resnet18", preset="pool4", epochs=3, batch_size=128,
                            opt=dict(opt="sgd", lr=0.1), sched=dict(sched="cosine")), data, callback=print)
    res.history[-1]["val_top1"]

Every preset starts from the same weights and sees the same batches in the same order (loop.py says how), so a
compression preset is the only difference between runs. A run resumed from its checkpoint ends, on CPU with the
same seed and numerics, bitwise as an uninterrupted run (checkpoint.py).

    config.py       TrainConfig, TrainResult, TrainError, EPOCH_COLUMNS
    numerics.py     seeds, RNG state, CPU threads and kernel ISA: what decides the bits of a run
    distributed.py  device, torchrun process group, samplers splitting epochs between processes
    checkpoint.py   atomic checkpoints, and resuming from one (same settings, same schedule) or refusing
    probes.py       per-epoch memory and gradient-cosine columns, outside the run's RNG stream
    loop.py         train(): setup, the epoch's training steps, evaluate
    tta.py          time-to-accuracy, schedule overhead against a baseline, run summary
"""
from .config import EPOCH_COLUMNS, TrainConfig, TrainError, TrainResult
from .distributed import EpochSampler
from .loop import accuracy_counts, build_model, evaluate, train
from .numerics import cpu_numerics, pin_cpu_numerics, preserved_rng, rng_state, seed_everything, set_rng_state
from .tta import Reached, overhead_table, schedule_overhead, summarize, time_to_accuracy

__all__ = ["EPOCH_COLUMNS", "EpochSampler", "Reached", "TrainConfig", "TrainError", "TrainResult", "accuracy_counts",
           "build_model", "cpu_numerics", "evaluate", "overhead_table", "pin_cpu_numerics", "preserved_rng",
           "rng_state", "schedule_overhead", "seed_everything", "set_rng_state", "summarize", "time_to_accuracy",
           "train"]
