"""Memory over one training step: bytes allocated after every dispatched op (batch, forward, backward, optimizer).

    from actcomp.measure import step_timeline
    df = step_timeline("resnet18", 64, img_size=224, preset="full4")      # predicted on meta, nothing allocated
    df.allocated_bytes.max()                                              # == step_memory(...).peak_bytes

The step is exactly the one :func:`actcomp.measure.step_memory` measures (same model preparation, primed
optimizer, input batch created inside the step, ``zero_grad(set_to_none=True)`` at the end), run under a
``MemTracker`` subclass that appends the tracker's current total after each aten op. Rows are in dispatch
order: ``op_index`` counts ops from 0, ``op`` is the aten overload (``convolution.default``), ``phase`` is
``batch`` (input and labels created), ``forward`` (model and loss), ``backward``, ``optimizer``
(``optimizer.step()``) or ``after step`` (gradients released); a last row ``op="end"`` holds what is live after
the step. Frees are accounted when a storage dies, so the row after an op includes every free since the op
before it. ``device="meta"`` predicts (any batch size, nothing computed); ``device="cpu"`` measures real tensors.
"""
from __future__ import annotations

import gc

import torch

from ..devices import parse_device
from ..errors import ActcompError, check_int
from ..models import check_model_name
from .memory import live_bytes, prepare, run_step
from .tracker import tracker_cls

__all__ = ["PHASES", "step_timeline"]

PHASES = ("batch", "forward", "backward", "optimizer", "after step")
_MARK_PHASE = {"before_forward": "forward", "after_forward": "backward"}


def _timeline_tracker_cls():
    from torch.distributed._tools.mem_tracker import _TOTAL_KEY

    class _TimelineTracker(tracker_cls()):
        """MemTracker that records (op, phase, current total bytes) after every dispatched op."""

        def __init__(self, device: torch.device, meta_cache: bool = False):
            super().__init__(meta_cache=meta_cache)
            self.rows: list[tuple[str, str, int]] = []
            self.phase = "batch"
            self._opt_seen = False
            self._dev = device

        def current(self) -> int:
            snap = self._curr_mem_snap.get(self._dev)
            return int(snap.get(_TOTAL_KEY, 0)) if snap else 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            res = super().__torch_dispatch__(func, types, args, kwargs)
            if self._in_opt:
                self._opt_seen = True
                phase = "optimizer"
            else:
                phase = "after step" if self._opt_seen else self.phase
            name = getattr(func, "__name__", None) or str(func)
            self.rows.append((name, phase, self.current()))
            return res

    return _TimelineTracker


def step_timeline(model, batch_size: int, img_size: int = 224, preset=None, device="meta", optimizer: str = "sgd",
                  dtype="float32", num_classes: int = 1000, in_chans: int = 3):
    """Allocated bytes after every op of one steady-state training step of ``model`` (a timm name or module).

    Returns a DataFrame with columns ``op_index, op, phase, allocated_bytes`` (see the module docstring).
    ``preset``: a preset name, CompressionConfig or mapping (None: ``none``). ``device``: ``meta`` (predicted)
    or ``cpu`` (measured). Optimizer as in ``step_memory`` (timm name; SGD momentum 0.9 by default).
    """
    import pandas as pd

    check_int(batch_size, "batch_size")
    dev = parse_device(device)
    if dev.type not in ("meta", "cpu"):
        raise ActcompError(f"step_timeline runs on meta (predicted) or cpu (measured), not {dev.type!r}; "
                           f"use device='meta' as the GPU stand-in")
    if isinstance(model, str):
        check_model_name(model)
    prep = prepare(model, preset if preset is not None or isinstance(model, str) else None, dev,
                   optimizer=optimizer, dtype=dtype, amp=False, channels_last=False, num_classes=num_classes,
                   img_size=img_size, foreach=None, in_chans=in_chans)
    with prep.mode():
        tracker = _timeline_tracker_cls()(prep.device, meta_cache=prep.device.type == "meta")
        tracker.track_external(prep.model, prep.opt)
        marks: dict[str, int] = {}

        def mark(name: str) -> None:  # the step's fixed points also switch the tracker's phase
            marks[name] = live_bytes(prep, tracker)
            tracker.phase = _MARK_PHASE[name]

        gc.freeze()  # as step_memory does: long-lived objects are not rescanned by collections during the step
        try:
            with tracker:
                run_step(prep, batch_size, mark)
                gc.collect()  # what the step dropped is freed before the last reading
                tracker.rows.append(("end", "after step", tracker.current()))
        finally:
            gc.unfreeze()
    df = pd.DataFrame(tracker.rows, columns=["op", "phase", "allocated_bytes"])
    df.insert(0, "op_index", range(len(df)))
    return df
