"""Measurement of a training step: peak memory (predicted on meta, measured on cpu/cuda), the largest batch that
fits a budget, step time against native PyTorch, and memory over the step op by op.

    metacache.py  cached meta kernels (what makes a meta prediction fast)
    tracker.py    the MemTracker subclass and its snapshots
    memory.py     step_memory: model preparation, the measured step, the CUDA path
    search.py     largest_batch(es) on the prediction, verify_largest_batch_cuda by real OOM tries
    speed.py      compare_step_times
    timeline.py   step_timeline

Every measurement runs :func:`actcomp.step.train_step` on a model from :func:`actcomp.models.build_model`.
"""
from .memory import StepMemory, step_memory
from .search import largest_batch, largest_batches, verify_largest_batch_cuda
from .speed import compare_step_times
from .timeline import PHASES, step_timeline

__all__ = ["PHASES", "StepMemory", "compare_step_times", "largest_batch", "largest_batches", "step_memory",
           "step_timeline", "verify_largest_batch_cuda"]
