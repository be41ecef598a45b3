"""Time-to-accuracy from per-epoch histories: when a run reaches a target, and its schedule overhead over a baseline."""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from .config import TrainError


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


__all__ = ["Reached", "overhead_table", "schedule_overhead", "summarize", "time_to_accuracy"]
