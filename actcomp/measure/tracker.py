"""The memory tracker: ``torch.distributed._tools.mem_tracker.MemTracker``, made cheap enough for many meta steps.

:func:`tracker_cls` returns the subclass (built on first use: importing MemTracker costs time); :func:`total` and
:func:`breakdown` read its snapshots.
"""
from __future__ import annotations

import functools

import torch

from .metacache import MetaCached

__all__ = ["CATEGORIES", "StorageMap", "breakdown", "total", "tracker_cls"]

# MemTracker's reference types -> the names StepMemory.breakdown uses.
CATEGORIES = {"Parameter": "parameter", "Buffer": "buffer", "Gradient": "gradient", "Activation": "activation",
              "Temp": "temp", "Optstate": "optimizer", "Other": "other"}


class StorageMap:
    """Stand-in for MemTracker's storage table (a WeakIdKeyDictionary, which builds a weak reference on every
    lookup: the largest single cost of tracking a meta step). Keyed by the storage's C++ address; an entry
    whose storage has died, or whose address was reused by a new storage, reads as absent. MemTracker's
    own weak-reference callbacks (one per storage, made at first sight) still account the frees."""

    __slots__ = ("_d",)

    def __init__(self):
        self._d = {}

    def get(self, st, default=None):
        v = self._d.get(st._cdata)
        if v is None or v[1]() is not st:
            return default
        return v

    def __setitem__(self, st, v):
        self._d[st._cdata] = v

    def __contains__(self, st):
        return self.get(st) is not None


def _tensors_in(res):
    if isinstance(res, torch.Tensor):
        return (res,)
    if isinstance(res, (tuple, list)):
        return [t for r in res for t in _tensors_in(r)]
    return ()


@functools.lru_cache(maxsize=1)
def tracker_cls():
    """The MemTracker subclass: ``tracker_cls()(meta_cache=True)`` runs meta ops through :class:`MetaCached`."""
    from torch.distributed._tools import mem_tracker as mt

    class PeakTracker(mt.MemTracker):
        def __init__(self, meta_cache: bool = False):
            super().__init__()
            self._meta_cache = meta_cache
            self._WINFO = StorageMap()

        # Snapshots are {device: {category: int}}: a two-level copy is a deep copy, at a fraction of the cost.
        def get_tracker_snapshot(self, type: str = "current"):
            if type not in ("current", "peak"):
                raise ValueError(f"Invalid type {type}")
            snap = self._curr_mem_snap if type == "current" else self._peak_mem_snap
            return {dev: dict(d) for dev, d in snap.items()}

        # MemTracker updates a per-module peak for every op, a loop over all modules seen so far; that loop is
        # half its overhead. Only the global peak and its breakdown are needed here.
        def _update_peak_stats(self, peak_state) -> None:
            for dev, snap in self._curr_mem_snap.items():
                if self._peak_mem.get(dev, 0) < snap[mt._TOTAL_KEY]:
                    self._peak_mem[dev] = snap[mt._TOTAL_KEY]
                    self._peak_mem_snap[dev] = dict(snap)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if not self._meta_cache:
                return super().__torch_dispatch__(func, types, args, kwargs)
            # On plain meta tensors (no DTensor, no fake mode) MemTracker's dispatch reduces to the lines below;
            # written out, without its per-op pytree and fake-mode lookups, and with cached meta kernels.
            res = MetaCached(func)(*args, **(kwargs or {}))
            if self._in_opt:
                reftype = mt._MemRefType.OPT
            elif self._mod_tracker.is_bw and not self._in_ac:
                reftype = mt._MemRefType.TEMP
            else:
                reftype = mt._MemRefType.ACT
            for t in _tensors_in(res):
                self._track(reftype, t)
            self._update_peak_stats(None)
            return res

    return PeakTracker


def total(tracker, dev: torch.device) -> int:
    """Bytes the tracker sees live on ``dev`` now."""
    snap = tracker.get_tracker_snapshot("current").get(dev, {})
    return int(snap.get("Total", 0))


def breakdown(snap: dict) -> dict[str, int]:
    """A snapshot of one device as {category: bytes} (the total left out)."""
    return {CATEGORIES.get(getattr(k, "value", k), str(k)): int(v) for k, v in snap.items() if k != "Total"}
