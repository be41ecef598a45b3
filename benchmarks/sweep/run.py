"""One point of a sweep: skip if done, measure, record, log to W&B."""
from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Callable

from omegaconf import DictConfig, OmegaConf

from actcomp.errors import ActcompError, one_line

from ..common import atomic_write, log_metrics, provenance_row, wandb_run
from ..errors import OutputError
from .errors import die, is_oom
from .paths import abs_path, ensure_writable, is_multirun, job_dir, sweep_paths
from .records import DONE, flatten, measured_config, point_key, read_record


def _prov(device: str) -> dict:
    return provenance_row(device if not device.startswith("cuda") or _cuda_ok() else "cpu")


def _cuda_ok() -> bool:
    import torch

    return torch.cuda.is_available()


def run_point(cfg: DictConfig, measure: Callable[[DictConfig], dict], display: tuple[str, ...] = ()) -> dict:
    """Run one point of ``cfg.app``: skip if already done, measure, record, log to W&B.

    ``measure(cfg)`` returns a flat dict of metrics; it raises on bad input or failure.
    ``display``: metric names shown in the end-of-sweep console table.
    """
    app, sweep = str(cfg.app), str(cfg.sweep)
    multirun = is_multirun()
    rec_dir, _ = sweep_paths(abs_path(cfg.out_dir), app, sweep)
    try:
        ensure_writable(rec_dir)  # before any work: a result that cannot be kept is not worth measuring
    except OutputError as e:
        die(app, str(e), 2)
    if not isinstance(cfg.get("force", False), bool):  # "maybe" would silently redo a whole sweep
        die(app, f"force={cfg.get('force')!r}: use true or false", 2)
    key = point_key(cfg)
    rec_path = rec_dir / f"{key}.json"
    prev = read_record(rec_path)
    if prev is not None and prev.get("status") in DONE and not cfg.get("force", False):
        summary = {**prev, "run": "skipped", "recorded": True}
        _write_summary(summary)
        return summary

    t0 = time.perf_counter()
    status, message, metrics, code = "ok", "", {}, 0
    try:
        metrics = measure(cfg)
    except ActcompError as e:  # bad input (BenchError is one)
        status, message, code = "error", one_line(e), 2
    except Exception as e:  # noqa: BLE001  a failing point is recorded, the sweep goes on
        status, message, code = ("oom" if is_oom(e) else "error"), one_line(e), 1
        if status == "oom" and not message.lower().startswith("out of memory"):
            message = f"out of memory: {message}"
    elapsed = time.perf_counter() - t0
    record = dict(point=key, app=app, sweep=sweep, status=status, message=message,
                  config=flatten(measured_config(cfg)), metrics=metrics, elapsed_s=round(elapsed, 3),
                  provenance=_prov(str(cfg.device.name)), display=list(display))
    recorded = status == "ok" or multirun
    if recorded:
        atomic_write(rec_path, json.dumps(record, indent=1, default=str))
    _write_summary({**record, "run": "measured", "recorded": recorded})
    _log_wandb(cfg, record)
    if status != "ok" and not multirun:
        die(app, message, code)
    return {**record, "run": "measured", "recorded": recorded}



def _write_summary(summary: dict) -> None:
    d = job_dir()
    if d is not None:
        with contextlib.suppress(OSError):
            d.mkdir(parents=True, exist_ok=True)
            atomic_write(d / "summary.json", json.dumps(summary, indent=1, default=str))


def _log_wandb(cfg: DictConfig, record: dict) -> None:
    """Config + metrics to W&B (offline by default). A W&B problem is reported, never fatal."""
    c = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if c.get("logger") is None:
        return
    c.logger.group = c.logger.get("group") or f"{record['app']}/{record['sweep']}"
    c.logger.dir = str(abs_path(c.logger.get("dir") or "."))
    try:
        with wandb_run(c, job_type=record["app"], name=f"{record['app']}-{record['sweep']}-{record['point']}") as run:
            if run is not None:
                log_metrics(run, wandb_metrics(str(cfg.device.name), record["metrics"]))
                run.summary.update(dict(status=record["status"], message=record["message"], point=record["point"],
                                        elapsed_s=record["elapsed_s"], **record["provenance"]))
    except Exception as e:  # noqa: BLE001
        print(f"{record['app']}: W&B logging skipped: {one_line(e)}", file=sys.stderr)


def wandb_metrics(device: str, metrics: dict) -> dict:
    """Metrics under their W&B names: on device=meta every byte count is a prediction, and the key says so
    (``peak_bytes`` -> ``predicted_peak_bytes``); the CSV keeps its columns (its ``method`` column says it)."""
    if device != "meta":
        return dict(metrics)
    return {(f"predicted_{k}" if k.endswith("_bytes") and not k.startswith("predicted_") else k): v
            for k, v in metrics.items() if not (k.startswith("predicted_") and v is None)}


# ------------------------------------------------------------------------------------------ aggregation
