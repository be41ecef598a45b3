"""``make gpu-check``: the GPU measurements of the suite in one short run (about 8 minutes on one H100/H200).

    python -m benchmarks.gpu_check                           # CUDA: writes results/gpu/{memory,speed,fit}.csv
    python -m benchmarks.gpu_check device=cpu toy=true out=/tmp/gpu   # the same code path on CPU at toy size

For each model x preset x batch size it records the measured step peak (``max_memory_allocated`` and
``max_memory_reserved`` after a reset, one warm-up step first) beside the meta prediction of the same step;
for each model x batch size, step-time ratios to native measured interleaved in one process, eager and
``torch.compile``d, repeated in ``blocks`` blocks so the ratio comes with its spread; and for each model x
``fit_presets`` one largest-batch verification: the predicted largest batch under ``fit_budget_gib`` against a
real out-of-memory search with the allocator capped at that budget.

Options (key=value):
  device=cuda        cuda, or cpu (the code path only: MemTracker instead of the allocator, no OOM search)
  toy=false          tiny models and sizes (for tests and a first look)
  models=            comma-separated timm names (default resnet18,resnet50,efficientnet_b0,convnext_tiny)
  presets=           default none,authors_b1,pool4,full4,ckpt
  batches=           default 32,128
  img_size=224
  blocks=3  iters=5  warmup=2   step-time blocks, timed steps per block and preset, warm-up steps
  compile=both       eager, compiled or both (compiled: torch.compile of every model, native included)
  compile_models=    models timed compiled (default resnet18,resnet50: compiling costs ~1 min per model and preset)
  fit_presets=none,full4   fit_budget_gib=8
  time_limit_s=420   parts not started by then are recorded as skipped (the run stays within its slot)
  out=results/gpu    (toy or device=cpu: scratch/gpu_check)

Needs torch, timm and pandas only (no Hydra, no W&B). Exit: 0 when every point was measured, 1 when some
failed or were skipped, 2 on bad options or when CUDA is asked for and absent.
"""
from __future__ import annotations

import inspect
import statistics
import sys
import time
from pathlib import Path

from .cli import parse_kv

REPO = Path(__file__).resolve().parent.parent
DEFAULTS = dict(device="cuda", toy="false", models="", presets="none,authors_b1,pool4,full4,ckpt", batches="",
                img_size="", blocks="3", iters="5", warmup="2", compile="both", compile_models="",
                fit_presets="none,full4", fit_budget_gib="", time_limit_s="420", out="")
TOY = dict(models="test_resnet,test_efficientnet", batches="2,4", img_size="64", compile_models="test_resnet",
           fit_budget_gib="0.0625")
FULL = dict(models="resnet18,resnet50,efficientnet_b0,convnext_tiny", batches="32,128", img_size="224",
            compile_models="resnet18,resnet50", fit_budget_gib="8")


def _ints(s: str, key: str, lo: int = 1) -> list[int]:
    from .errors import int_option

    vals = [int_option(v, key, lo, text=True, error=ValueError) for v in s.split(",") if v.strip()]
    if not vals:
        raise ValueError(f"{key}={s!r}: give integers >= {lo}, separated by commas")
    return vals


def _names(s: str) -> list[str]:
    return [v.strip() for v in s.split(",") if v.strip()]


def parse(argv: list[str]) -> dict:
    o = parse_kv(argv, DEFAULTS, __doc__)
    from .cli import flag

    toy = flag(o, "toy")
    for k, v in (TOY if toy else FULL).items():
        o[k] = o[k] or v
    dev = o["device"].strip().lower()
    if dev != "cpu" and not dev.startswith("cuda"):
        raise ValueError(f"device={o['device']!r}: use cuda or cpu")
    mode = o["compile"].strip().lower()
    if mode not in ("eager", "compiled", "both"):
        raise ValueError(f"compile={o['compile']!r}: use eager, compiled or both")
    try:
        budget = float(o["fit_budget_gib"])
        limit = float(o["time_limit_s"])
    except ValueError:
        raise ValueError("fit_budget_gib and time_limit_s take numbers") from None
    if budget <= 0 or limit <= 0:
        raise ValueError("fit_budget_gib and time_limit_s must be positive")
    res = dict(device=dev, toy=toy, models=_names(o["models"]), presets=_names(o["presets"]),
               batches=_ints(o["batches"], "batches"), img_size=_ints(o["img_size"], "img_size")[0],
               blocks=_ints(o["blocks"], "blocks")[0], iters=_ints(o["iters"], "iters")[0],
               warmup=_ints(o["warmup"], "warmup", lo=0)[0], compile=mode,
               compile_models=_names(o["compile_models"]), fit_presets=_names(o["fit_presets"]),
               fit_budget_gib=budget, time_limit_s=limit)
    if not res["models"] or not res["presets"]:
        raise ValueError("models= and presets= need at least one name each")
    cpu_path = dev == "cpu" or toy
    out = Path(o["out"] or (REPO / ("scratch/gpu_check" if cpu_path else "results/gpu"))).expanduser()
    res["out"] = out if out.is_absolute() else Path.cwd() / out
    if cpu_path and res["out"].resolve().is_relative_to((REPO / "results").resolve()):
        raise ValueError("device=cpu or toy=true never writes into results/; pick another out=")
    return res


class Clock:
    """Elapsed time against the run's limit: parts not started in time are recorded as skipped."""

    def __init__(self, limit_s: float):
        self.t0, self.limit = time.perf_counter(), limit_s

    def left(self) -> bool:
        return time.perf_counter() - self.t0 < self.limit

    def __str__(self) -> str:
        return f"{time.perf_counter() - self.t0:5.0f}s"


def _err(e: BaseException) -> str:
    from actcomp.errors import one_line

    return one_line(e, limit=300, typed=True)


def check_memory(o: dict, clock: Clock) -> list[dict]:
    """Measured step peak beside the meta prediction, per model x preset x batch."""
    import torch

    from actcomp.measure import step_memory

    rows = []
    for model in o["models"]:
        for preset in o["presets"]:
            for b in o["batches"]:
                row = dict(model=model, preset=preset, batch_size=b, img_size=o["img_size"], dtype="float32",
                           method="cuda" if o["device"].startswith("cuda") else "memtracker-cpu")
                if not clock.left():
                    rows.append(dict(row, status="skipped", message="time limit"))
                    continue
                # CPU steps its optimizer per tensor, CUDA with foreach: the prediction follows the device measured.
                kw = dict(img_size=o["img_size"], preset=preset, foreach=o["device"].startswith("cuda"))
                try:
                    pred = step_memory(model, b, device="meta", **kw)
                    got = step_memory(model, b, device=o["device"], **kw)
                    row.update(peak_bytes=got.peak_bytes, predicted_peak_bytes=pred.peak_bytes,
                               reserved_bytes=getattr(got, "reserved_bytes", None),
                               prediction_error=got.peak_bytes / pred.peak_bytes - 1, status="ok", message="")
                except torch.OutOfMemoryError as e:
                    row.update(status="oom", message=_err(e))
                except Exception as e:  # noqa: BLE001  (a failed point is recorded; the check goes on)
                    row.update(status="error", message=_err(e))
                rows.append(row)
                err = f"{row['prediction_error']:+.1%}" if row["status"] == "ok" else row["status"]
                print(f"[{clock}] memory {model} {preset} b{b}: {err}", flush=True)
    return rows


def check_speed(o: dict, clock: Clock) -> list[dict]:
    """Interleaved step-time ratios to native, eager and compiled, over ``blocks`` blocks (median, min, max)."""
    from actcomp.measure import compare_step_times

    can_compile = "compile" in inspect.signature(compare_step_times).parameters
    modes = {"eager": ["eager"], "compiled": ["compiled"], "both": ["eager", "compiled"]}[o["compile"]]
    rows = []
    for model in o["models"]:
        for b in o["batches"]:
            for mode in modes:
                base = dict(model=model, batch_size=b, img_size=o["img_size"], mode=mode, blocks=o["blocks"],
                            iters=o["iters"])
                if mode == "compiled" and model not in o["compile_models"]:
                    continue
                why = ("time limit" if not clock.left() else
                       "this actcomp has no compiled step timing" if mode == "compiled" and not can_compile else "")
                if why:
                    rows += [dict(base, preset=p, status="skipped", message=why) for p in o["presets"]]
                    continue
                kw = dict(compile=True) if mode == "compiled" else {}
                if "blocks" in inspect.signature(compare_step_times).parameters:
                    kw["blocks"] = 1  # the loop below repeats the blocks itself
                ratios: dict[str, list[float]] = {}
                step_s: dict[str, list[float]] = {}
                try:
                    for _ in range(o["blocks"]):
                        df = compare_step_times(model, o["presets"], b, img_size=o["img_size"], device=o["device"],
                                                warmup=o["warmup"], iters=o["iters"], **kw)
                        for r in df.itertuples():
                            ratios.setdefault(r.preset, []).append(r.ratio_to_none)
                            step_s.setdefault(r.preset, []).append(r.median_s)
                except Exception as e:  # noqa: BLE001
                    rows += [dict(base, preset=p, status="error", message=_err(e)) for p in o["presets"]]
                    print(f"[{clock}] speed {model} b{b} {mode}: {_err(e)}", flush=True)
                    continue
                for p, rs in ratios.items():
                    rows.append(dict(base, preset=p, ratio_median=statistics.median(rs), ratio_min=min(rs),
                                     ratio_max=max(rs), step_ms_median=1e3 * statistics.median(step_s[p]),
                                     status="ok", message=""))
                print(f"[{clock}] speed {model} b{b} {mode}: "
                      + ", ".join(f"{p} {statistics.median(r):.2f}" for p, r in ratios.items()), flush=True)
    return rows


def check_fit(o: dict, clock: Clock) -> list[dict]:
    """Predicted largest batch under the budget, and (CUDA) the real out-of-memory search started from it."""
    from actcomp.measure import largest_batch, verify_largest_batch_cuda

    budget = int(o["fit_budget_gib"] * 2**30)
    rows = []
    for model in o["models"]:
        for preset in o["fit_presets"]:
            row = dict(model=model, preset=preset, img_size=o["img_size"], budget_gib=o["fit_budget_gib"])
            if not clock.left():
                rows.append(dict(row, status="skipped", message="time limit"))
                continue
            try:
                pred = largest_batch(model, preset, budget, img_size=o["img_size"], device="meta")
                row.update(predicted_batch=pred)
                if o["device"].startswith("cuda"):
                    got = verify_largest_batch_cuda(model, preset, budget, img_size=o["img_size"],
                                                    start=max(pred, 2), device=o["device"])
                    row.update(verified_batch=got, batch_error=got / pred - 1 if pred else None, status="ok",
                               message="")
                else:
                    row.update(status="unverified", message="no out-of-memory search without CUDA")
            except Exception as e:  # noqa: BLE001
                row.update(status="error", message=_err(e))
            rows.append(row)
            print(f"[{clock}] fit {model} {preset}: predicted {row.get('predicted_batch')}, "
                  f"verified {row.get('verified_batch')} ({row['status']})", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    try:
        o = parse(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    import torch

    if o["device"].startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (device=cpu toy=true runs the code path on CPU)", file=sys.stderr)
        return 2
    import pandas as pd

    from .common import atomic_write_csv, provenance_row

    print(f"gpu_check: {len(o['models'])} models x {len(o['presets'])} presets x batches {o['batches']} at "
          f"{o['img_size']} px on {o['device']} into {o['out']}", flush=True)
    clock = Clock(o["time_limit_s"])
    prov = provenance_row(o["device"])
    parts = {"memory": check_memory, "speed": check_speed, "fit": check_fit}
    bad = 0
    for name, fn in parts.items():
        rows = fn(o, clock)
        bad += sum(r["status"] not in ("ok", "unverified") for r in rows)
        atomic_write_csv(pd.DataFrame([dict(r, **prov) for r in rows]), o["out"] / f"{name}.csv")
    print(f"gpu_check: wrote {', '.join(f'{n}.csv' for n in parts)} in {o['out']} after {clock}; "
          f"{bad} point(s) failed or skipped", flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
