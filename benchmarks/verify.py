"""``make verify``: re-run the study into a scratch folder and say, number by number, whether it reproduces.

    python -m benchmarks.reproduce verify=true                           # every stage, CPU scale (~47 min)
    python -m benchmarks.reproduce verify=true quick=true                # toy scale vs results/quick/
    python -m benchmarks.reproduce verify=true stages=table,timeline     # some stages only
    python -m benchmarks.reproduce verify=true compare_only=true out=scratch/verify-...   # compare again, run nothing

The re-run goes to ``scratch/verify-<UTC time>/`` (or ``out=``; never into ``results/``) with the same commands
as ``make reproduce``. Then every committed CSV of those stages is compared with its re-run counterpart: rows
matched on their key columns (model, preset, batch, seed, ...), every other column compared by its kind with
the tolerance of ``conf/verify.yaml`` (the one place they are set). Prints a table per stage, writes every
compared cell to ``<out>/verify/comparison.csv``, and exits 1 when a value is beyond tolerance or a committed
row/CSV is missing from the re-run (0 when everything reproduced, 2 on bad options).

On a CUDA machine with committed GPU CSVs (``results/gpu/*.csv``) the GPU stages run too, and each measured
``max_memory_allocated`` point is set against its meta prediction (``<out>/verify/gpu_prediction.csv``).
"""
from __future__ import annotations

import fnmatch
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
TOLERANCES = REPO / "conf" / "verify.yaml"

# ------------------------------------------------------------------------------------------ column kinds

KEY = "key"
# Every column of every committed CSV, by name (fnmatch patterns allowed). Columns whose meaning depends on the
# file are in OVERRIDES; a column found in neither is reported as unclassified (never silently skipped).
COLUMNS: dict[str, str] = {
    # what identifies a row: the configuration of the point
    **{c: KEY for c in (
        "model", "preset", "model.name", "compression.name", "batch_size", "img_size", "image_size", "device.name",
        "amp", "channels_last", "optimizer", "model.num_classes", "model.in_chans", "dtype", "saved_by_op",
        "budgets_gib", "max_batch", "verify_cuda", "warmup", "iters", "compile", "blocks", "max_blocks", "target_iqr",
        "app", "sweep", "layer", "op_index",
        "model_kwargs", "data", "seed", "n_train", "n_val", "optim", "target_kind", "baseline")},
    # predicted memory (meta) and saved bytes, and what is computed from them
    **{c: "memory" for c in (
        "peak_bytes", "after_forward_bytes", "predicted_peak_bytes", "reserved_bytes", "peak_*_bytes",
        "saved_*_bytes", "max_batch_*gib", "allocated_bytes", "weight_mib", "input_mib", "pool2_mib", "pool4_mib",
        "saved_mib", "activation_mib", "conv_input_mib", "linear_input_mib", "norm_input_mib", "pool_mib",
        "vs_none_pct", "vs_authors_b1_pct", "peak_gib", "activation_gib", "after_forward_gib", "peak_mem_mib")},
    **{c: "exact" for c in ("status", "method", "saved_device", "op", "phase", "lr", "samples_seen", "epochs",
                            "peak_mem_source")},
    **{c: "top1_final" for c in ("final_val_top1", "best_val_top1")},
    **{c: "top1_epoch" for c in ("train_top1", "val_top1", "val_top5")},
    **{c: "loss" for c in ("train_loss", "val_loss")},
    **{c: "cosine_train" for c in ("grad_cos_mean", "grad_cos_min")},
    **{c: "wall" for c in (
        "elapsed_s", "median_step_s", "min_step_s", "max_step_s", "images_per_s", "none_median_step_s",
        "none_images_per_s", "median_s", "min_s", "max_s", "epoch_time_s", "eval_time_s", "cpu_time_s",
        "cpu_elapsed_s", "total_time_s", "time_s", "baseline_time_s", "time_ratio", "baseline_cpu_time_s",
        "cpu_time_ratio", "total_cpu_time_s", "mean_images_per_s", "ratio_q25", "ratio_q75", "load_start",
        "load_end")},
    **{c: "provenance" for c in ("git_sha", "torch_version", "timm_version", "python_version", "device_name",
                                 "date", "torch", "timm", "python")},
    **{c: "info" for c in ("point", "run_id", "message", "saved_note", "reached", "baseline_reached",
                           "epochs_ratio", "fit_note", "blocks_run")},
    "lower_bound_*gib": "exact",  # fit: the answer reached max_batch (a lower bound)
}
# (CSV path pattern relative to the results root, {column: kind}) for names that mean different things
OVERRIDES: list[tuple[str, dict[str, str]]] = [
    ("speed/*.csv", {"ratio_to_none": "step_ratio"}),
    ("table/*.csv", {"device": "provenance"}),
    ("exactness/grad_cosine.csv", {"cosine": "cosine_batch", "seed": KEY, "torch_threads": KEY}),
    ("exactness/*.csv", {**{c: KEY for c in ("op", "input", "shape", "output", "torch_threads", "part", "conv",
                                             "reference")},
                         "saved_bytes": "memory", "saved_bytes_native": "memory", "ratio_to_native": "memory",
                         "exact_by_design": "exact", "bitwise": "exact", "rel_l2": "op_error", "cosine": "op_error",
                         "max_abs_err": "op_error"}),
    ("train/frontier/frontier.csv", {"peak_ratio": "memory", "r50_b256_peak_ratio": "memory",
                                     "epochs_to_*": "epochs_to_target", "target_*": "top1_final",
                                     "time_to_*": "wall", "cpu_time_to_*": "wall", "epochs_ratio_*": "info"}),
    ("train/*/epochs.csv", {"epoch": KEY}),
    ("train/*/grad_cosine.csv", {"epoch": KEY, "cosine": "cosine_train"}),
    # the baseline_best targets move with the baseline's best accuracy, so they are values, not keys
    ("train/*/summary.csv", {"epoch": "epochs_to_target", "baseline_epoch": "epochs_to_target",
                             "target": "top1_final"}),
]
# A compared column -> the committed columns of its spread (25th, 75th percentile over repeated blocks): where a
# row has them and the kind sets spread_abs/spread_iqr, the band is [q25, q75] widened (spread_band)
SPREAD_OF = {"ratio_to_none": ("ratio_q25", "ratio_q75")}
# CSVs whose rows repeat a key by design and are matched in file order: one row per fixed target (85, 88, 90)
IN_ORDER = ("train/*/summary.csv",)
# CSV path pattern -> the reproduce stage that writes it (first match wins)
STAGE_OF: list[tuple[str, str]] = [
    ("table/*.csv", "table"), ("memory/memory_by_op.csv", "memory_by_op"), ("memory/memory_batch.csv", "memory_batch"),
    ("memory/memory_models.csv", "memory_models"), ("memory/gpu_memory.csv", "gpu_memory"),
    ("fit/fit_models.csv", "fit"), ("fit/fit_models_cuda.csv", "gpu_fit"),
    ("memory/whole_set_peak.csv", "whole_set_peak"), ("speed/whole_set_speed.csv", "whole_set_speed"),
    ("speed/speed_compiled.csv", "speed_compiled"), ("speed/*.csv", "speed"), ("exactness/grad_cosine.csv", "grad_cosine"), ("timeline/*.csv", "timeline"),
    ("exactness/*.csv", "exactness"),
    *((f"train/{e}/*.csv", e) for e in ("paper_imagenet_resnet18", "paper_imagenet_resnet34", "paper_imagenet_resnet50")),
    ("train/frontier/frontier_resnet18*/*.csv", "frontier_resnet18"),
    ("train/frontier/frontier_mobile*/*.csv", "frontier_mobile"), ("train/frontier/frontier.csv", "frontier_mobile"),
    ("train/*/*.csv", "train"),
]
# Not results of a stage: logs (stage times), the toy reference inside results/, Hydra/W&B run folders; GPU
# check CSVs are set against their predictions separately (gpu_prediction_error).
NOT_COMPARED = ("logs/*", "quick/*", "outputs/*", "wandb/*", "figures/*", "verify/*", "gpu/*")


def load_tolerances(quick: bool = False, path: Path = TOLERANCES) -> dict[str, dict]:
    """kind -> {exact|abs|rel|report, what}; quick=true applies the file's toy-scale overrides."""
    from omegaconf import OmegaConf

    raw = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    tol = {k: dict(v) for k, v in raw["kinds"].items()}
    if quick:
        for k, v in (raw.get("quick") or {}).items():
            if k not in tol:
                raise ValueError(f"{path.name}: quick.{k} is not a kind")
            tol[k] = {**{a: b for a, b in tol[k].items() if a in ("what", "unit")}, **v}
    return tol


def tolerance_text(t: dict) -> str:
    """How a kind is compared, as the README states it."""
    if t.get("report"):
        return "reported, never compared"
    if t.get("exact"):
        return "exact"
    unit = f" {t['unit']}" if t.get("unit") else ""
    parts = ([f"±{t['abs']:g}{unit}"] if t.get("abs") else []) + ([f"±{100 * t['rel']:g}%"] if t.get("rel") else [])
    fixed = " + ".join(parts) or "exact"
    if "spread_abs" in t or "spread_iqr" in t:
        return (f"[q25, q75] ± max({t.get('spread_abs', 0):g}, {t.get('spread_iqr', 0):g}×IQR); "
                f"without q25/q75: {fixed}")
    return fixed


def spread_band(t: dict, q25: float, q75: float) -> tuple[float, float]:
    """The committed interquartile range [q25, q75] of a repeated measurement, widened on both sides by
    max(spread_abs, spread_iqr × IQR): a re-run agrees when its value lies inside."""
    m = max(float(t.get("spread_abs", 0) or 0), float(t.get("spread_iqr", 0) or 0) * (q75 - q25))
    return q25 - m, q75 + m


def kind_of(rel: str, col: str) -> str | None:
    for pat, cols in OVERRIDES:
        if fnmatch.fnmatch(rel, pat):
            if col in cols:
                return cols[col]
            hit = next((k for p, k in cols.items() if any(ch in p for ch in "*?[") and fnmatch.fnmatch(col, p)), None)
            if hit:
                return hit
    if col in COLUMNS:
        return COLUMNS[col]
    return next((k for p, k in COLUMNS.items() if any(ch in p for ch in "*?[") and fnmatch.fnmatch(col, p)), None)


def stage_of(rel: str) -> str | None:
    return next((s for pat, s in STAGE_OF if fnmatch.fnmatch(rel, pat)), None)


def result_csvs(root: Path) -> dict[str, Path]:
    """rel path -> path of every stage CSV under ``root`` (not logs, references, run folders)."""
    out = {}
    for p in sorted(root.rglob("*.csv")):
        rel = p.relative_to(root).as_posix()
        if not any(fnmatch.fnmatch(rel, pat) for pat in NOT_COMPARED):
            out[rel] = p
    return out


# ------------------------------------------------------------------------------------------ comparison

def _num(s: str) -> float | None:
    s = s.strip()
    if s == "" or s.lower() == "nan":
        return math.nan
    if s in ("True", "False"):
        return float(s == "True")
    try:
        return float(s)
    except ValueError:
        return None


def compare_value(kind: str, t: dict, a: str, b: str, nan_as: float | None = None,
                  band: tuple[float, float] | None = None) -> tuple[str, float | None]:
    """(verdict, |difference|) of committed ``a`` vs re-run ``b``: equal, within, beyond or reported.

    ``band``: the committed spread's band (:func:`spread_band`), used instead of abs/rel when given."""
    if t.get("report"):
        return ("equal" if a == b else "reported"), None
    if a == b:
        return "equal", 0.0
    x, y = _num(a), _num(b)
    if x is None or y is None:  # text
        return "beyond", None
    if nan_as is not None:  # e.g. a target never reached counts as reached one epoch after the last
        x, y = (nan_as if math.isnan(x) else x), (nan_as if math.isnan(y) else y)
    if math.isnan(x) and math.isnan(y):
        return "equal", 0.0
    if math.isnan(x) or math.isnan(y):
        return "beyond", None
    d = abs(y - x)
    if d == 0:
        return "equal", 0.0
    if t.get("exact"):
        return "beyond", d
    if band is not None:
        return ("within" if band[0] - 1e-12 <= y <= band[1] + 1e-12 else "beyond"), d
    bound = float(t.get("abs", 0) or 0) + float(t.get("rel", 0) or 0) * abs(x)
    return ("within" if d <= bound + 1e-12 * max(1.0, abs(x)) else "beyond"), d


def _band(t: dict, row: dict, col: str) -> tuple[float, float] | None:
    """The spread band of ``col`` from the committed row's quartile columns (None: no spread recorded, or the
    kind sets no spread margin; the fixed band applies)."""
    if col not in SPREAD_OF or not ("spread_abs" in t or "spread_iqr" in t):
        return None
    q = [_num(str(row.get(c, ""))) for c in SPREAD_OF[col]]
    if any(v is None or math.isnan(v) for v in q):
        return None
    return spread_band(t, *q)


@dataclass
class FileResult:
    rel: str
    stage: str
    rows: int = 0                # rows matched on their keys and compared
    equal: int = 0
    within: int = 0
    beyond: int = 0
    missing_rerun: int = 0       # committed rows the re-run did not produce
    missing_committed: int = 0   # re-run rows with no committed counterpart
    notes: list[str] = field(default_factory=list)
    cells: list[dict] = field(default_factory=list)
    provenance: dict[str, tuple[str, str]] = field(default_factory=dict)


_RANK = {"equal": 0, "reported": 0, "within": 1, "beyond": 2}


def _read(p: Path) -> pd.DataFrame:
    return pd.read_csv(p, dtype=str, keep_default_na=False)


def _keyed(df: pd.DataFrame, keys: list[str]) -> dict[tuple, dict]:
    """Row by key tuple; a repeated key gets its occurrence number appended (rows kept in file order)."""
    out, seen = {}, {}
    for r in df.to_dict("records"):
        k = tuple(r[c] for c in keys)
        n = seen.get(k, 0)
        seen[k] = n + 1
        out[(*k, n) if n else k] = r
    return out


def compare_csv(rel: str, committed: Path | None, rerun: Path | None, tol: dict[str, dict]) -> FileResult:
    fr = FileResult(rel, stage_of(rel) or "?")
    a = _read(committed) if committed is not None else None
    b = _read(rerun) if rerun is not None else None
    if a is None or b is None:
        n = len(a if a is not None else b)
        if a is None:
            fr.missing_committed = n
            fr.notes.append("CSV not committed (only in the re-run)")
        else:
            fr.missing_rerun = n
            fr.notes.append("CSV missing from the re-run")
        return fr
    cols = list(a.columns) + [c for c in b.columns if c not in a.columns]
    kinds = {c: kind_of(rel, c) for c in cols}
    unknown = [c for c, k in kinds.items() if k is None]
    if unknown:
        fr.notes.append(f"unclassified column(s), not compared: {', '.join(unknown)} (add them to "
                        f"benchmarks/verify.py COLUMNS)")
    only_a = [c for c in a.columns if c not in b.columns]
    only_b = [c for c in b.columns if c not in a.columns]
    if only_b:
        fr.notes.append(f"column(s) only in the re-run: {', '.join(only_b)}")
    keys = [c for c in a.columns if kinds[c] == KEY and c in b.columns]
    if only_a:
        missing_keys = [c for c in only_a if kinds[c] == KEY]
        fr.notes.append(f"column(s) missing from the re-run: {', '.join(only_a)}"
                        + (" (rows matched on the remaining keys)" if missing_keys else ""))
    ka, kb = _keyed(a, keys), _keyed(b, keys)
    if len(ka) and len({k[:len(keys)] for k in ka}) < len(ka) and not any(fnmatch.fnmatch(rel, p) for p in IN_ORDER):
        fr.notes.append("repeated keys: rows with the same key matched in file order")
    fr.missing_rerun = sum(k not in kb for k in ka)
    fr.missing_committed = sum(k not in ka for k in kb)
    compared = [c for c in a.columns if kinds[c] not in (None, KEY)]
    epochs_col = "epochs" if "epochs" in a.columns else None
    for k, ra in ka.items():
        keytxt = ";".join(f"{c}={v}" for c, v in zip(keys, k))
        if k not in kb:
            fr.cells.append(dict(stage=fr.stage, file=rel, key=keytxt, column="", kind="", committed="", rerun="",
                                 difference="", tolerance="", verdict="missing in re-run"))
            continue
        rb = kb[k]
        fr.rows += 1
        worst = "equal"
        for c in compared:
            kind = kinds[c]
            t = tol.get(kind, {"report": True})
            va = ra[c]
            band = None
            if c not in b.columns:
                verdict, d, vb = ("reported" if t.get("report") else "beyond"), None, "(no column)"
            else:
                vb = rb[c]
                nan_as = None
                if kind == "epochs_to_target" and epochs_col:
                    e = _num(ra[epochs_col])
                    nan_as = e + 1 if e is not None and not math.isnan(e) else None
                band = _band(t, ra, c)
                verdict, d = compare_value(kind, t, va, vb, nan_as, band)
            if kind == "provenance" and va != vb:
                fr.provenance.setdefault(c, (va, vb))
            worst = max(worst, verdict, key=_RANK.get)
            ttxt = tolerance_text(t) if band is None else f"[{band[0]:.3g}, {band[1]:.3g}] (committed spread)"
            fr.cells.append(dict(stage=fr.stage, file=rel, key=keytxt, column=c, kind=kind, committed=va, rerun=vb,
                                 difference="" if d is None else f"{d:.6g}", tolerance=ttxt, verdict=verdict))
        setattr(fr, worst, getattr(fr, worst) + 1)
    for k in kb:
        if k not in ka:
            fr.cells.append(dict(stage=fr.stage, file=rel, key=";".join(f"{c}={v}" for c, v in zip(keys, k)),
                                 column="", kind="", committed="", rerun="", difference="", tolerance="",
                                 verdict="missing in committed"))
    return fr


def compare_roots(committed: Path, rerun: Path, stages: list[str] | None, tol: dict[str, dict]) -> list[FileResult]:
    """Every stage CSV of ``committed`` (and of ``rerun``) of the given stages, compared file by file."""
    a, b = result_csvs(committed), result_csvs(rerun)
    out = []
    for rel in sorted(set(a) | set(b)):
        st = stage_of(rel)
        if st is None:
            fr = FileResult(rel, "?")
            fr.notes.append("no stage writes this CSV (add it to benchmarks/verify.py STAGE_OF); not compared")
            out.append(fr)
            continue
        if stages is not None and st not in stages:
            continue
        out.append(compare_csv(rel, a.get(rel), b.get(rel), tol))
    return out


def failed(results: list[FileResult]) -> bool:
    return any(r.beyond or r.missing_rerun for r in results)


def report(results: list[FileResult], tol: dict[str, dict], out=sys.stdout, max_cells: int = 25) -> None:
    """Per-stage table, then the values beyond tolerance, notes and provenance differences."""
    hdr = ("stage", "CSVs", "rows", "equal", "within tol.", "BEYOND", "missing in re-run", "only in re-run")
    rows = []
    for st in dict.fromkeys(r.stage for r in results):
        rs = [r for r in results if r.stage == st]
        rows.append((st, len(rs), sum(r.rows for r in rs), sum(r.equal for r in rs), sum(r.within for r in rs),
                     sum(r.beyond for r in rs), sum(r.missing_rerun for r in rs),
                     sum(r.missing_committed for r in rs)))
    rows.append(("TOTAL", *(sum(r[i] for r in rows) for i in range(1, len(hdr)))))
    w = [max(len(str(x)) for x in col) for col in zip(hdr, *rows)]
    line = lambda r: "  " + "  ".join(str(x).ljust(w[0]) if i == 0 else str(x).rjust(w[i])  # noqa: E731
                                      for i, x in enumerate(r))
    print("\n" + line(hdr), file=out)
    for r in rows:
        print(line(r), file=out)
    beyond = [c for r in results for c in r.cells if c["verdict"] == "beyond"]
    if beyond:
        print(f"\nbeyond tolerance ({len(beyond)} value(s)" + (f", first {max_cells}" if len(beyond) > max_cells
                                                                 else "") + "):", file=out)
        for c in beyond[:max_cells]:
            print(f"  {c['file']} [{c['key']}] {c['column']} ({c['kind']}, {c['tolerance']}): committed "
                  f"{c['committed']!r}, re-run {c['rerun']!r}", file=out)
    within = {}
    for r in results:
        for c in r.cells:
            if c["verdict"] == "within":
                d = float(c["difference"])
                if d > within.get(c["kind"], (0, ""))[0]:
                    within[c["kind"]] = (d, f"{c['file']} {c['column']}")
    for kind, (d, where) in within.items():
        print(f"  within tolerance: {kind} differs by up to {d:.4g} ({tolerance_text(tol[kind])}; {where})", file=out)
    for r in results:
        for n in r.notes:
            print(f"  note: {r.rel}: {n}", file=out)
    prov = {}
    for r in results:
        for c, (va, vb) in r.provenance.items():
            if c not in ("date", "git_sha"):
                prov.setdefault(f"{c}: committed {va!r}, re-run {vb!r}", []).append(r.stage)
    for what, sts in prov.items():
        print(f"  provenance differs ({', '.join(dict.fromkeys(sts))}): {what}", file=out)


def write_cells(results: list[FileResult], path: Path) -> None:
    from .common import atomic_write_csv

    cols = ["stage", "file", "key", "column", "kind", "committed", "rerun", "difference", "tolerance", "verdict"]
    atomic_write_csv(pd.DataFrame([c for r in results for c in r.cells], columns=cols), path)


# ------------------------------------------------------------------------------------------ GPU predictions

def gpu_prediction_error(df: pd.DataFrame) -> pd.DataFrame:
    """Measured CUDA step peaks (``method == cuda``: ``peak_bytes`` is ``max_memory_allocated``) against the meta
    prediction stored beside them (``predicted_peak_bytes``): one row per point with the error in bytes and %
    (positive: the prediction is above the measurement)."""
    df = df.rename(columns={"model.name": "model", "compression.name": "preset"})
    need = {"method", "peak_bytes", "predicted_peak_bytes"}
    if not need <= set(df.columns):
        return pd.DataFrame()
    df = df[df["method"].astype(str) == "cuda"]
    if "status" in df:
        df = df[df["status"].astype(str) == "ok"]
    meas = pd.to_numeric(df["peak_bytes"], errors="coerce")
    pred = pd.to_numeric(df["predicted_peak_bytes"], errors="coerce")
    keep = meas.notna() & pred.notna() & (meas > 0)
    keys = [c for c in ("model", "preset", "batch_size", "img_size", "dtype", "amp") if c in df.columns]
    out = df.loc[keep, keys].copy()
    out["measured_bytes"] = meas[keep].astype("int64")
    out["predicted_bytes"] = pred[keep].astype("int64")
    out["error_bytes"] = out["predicted_bytes"] - out["measured_bytes"]
    out["error_pct"] = 100.0 * out["error_bytes"] / out["measured_bytes"]
    return out.reset_index(drop=True)


def has_gpu_reference(committed: Path) -> bool:
    return any((committed / "gpu").glob("**/*.csv"))


def gpu_report(rerun: Path, out=sys.stdout) -> pd.DataFrame:
    frames = []
    for p in sorted(rerun.glob("gpu/**/*.csv")) + sorted(rerun.glob("memory/*.csv")):
        f = gpu_prediction_error(pd.read_csv(p))
        if len(f):
            f.insert(0, "file", p.relative_to(rerun).as_posix())
            frames.append(f)
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if df.empty:
        print("\nGPU: no measured (method=cuda) points in the re-run", file=out)
        return df
    print(f"\nGPU: meta prediction vs measured max_memory_allocated, {len(df)} point(s) "
          f"(error: predicted - measured)", file=out)
    for _, r in df.iterrows():
        print(f"  {r['model']} {r['preset']} batch {r.get('batch_size', '?')}: measured {r['measured_bytes']} B, "
              f"predicted {r['predicted_bytes']} B, error {r['error_bytes']:+d} B ({r['error_pct']:+.2f}%)", file=out)
    e = df["error_pct"].abs()
    print(f"  |error|: median {e.median():.2f}%, max {e.max():.2f}%", file=out)
    return df


# ------------------------------------------------------------------------------------------ the mode

def run_verify(o: dict) -> int:
    """``reproduce verify=true``: run the stages into ``o['out']`` (reproduce's own loop), then compare."""
    from . import reproduce

    committed: Path = o["reference"]
    try:
        tol = load_tolerances(o["quick"])
    except (OSError, ValueError, KeyError) as e:
        print(f"verify: cannot read {TOLERANCES.name} ({e})", file=sys.stderr)
        return 2
    gpu = o["paper"] and has_gpu_reference(committed)
    names = [s.name for s in reproduce.plan({**o, "paper": gpu}) if s.name != "figures"]
    unknown = [s for s in o["stages"] if s not in names]
    if unknown:
        print(f"verify: unknown stage(s) {', '.join(unknown)}; stages here: {', '.join(names)}", file=sys.stderr)
        return 2
    stages = o["stages"] or names
    print(f"verify: committed {reproduce.rel_path(committed)} vs a re-run in {reproduce.rel_path(o['out'])} "
          f"(stages: {', '.join(stages)})", flush=True)
    rc_run = 0
    if not o["compare_only"]:
        argv = [f"quick={str(o['quick']).lower()}", f"out={o['out']}", f"stages={','.join(stages)}",
                f"paper={str(gpu).lower()}", f"logger={o['logger'] or 'disabled'}",
                f"force={str(o['force']).lower()}", f"dry_run={str(o['dry_run']).lower()}",
                f"fork={str(o['fork']).lower()}", f"heartbeat={o['heartbeat']:g}", f"study={str(o['study']).lower()}"]
        t0 = time.perf_counter()
        rc_run = reproduce.main(argv)
        print(f"verify: re-run ended with exit status {rc_run} after {reproduce.fmt_duration(time.perf_counter() - t0)}",
              flush=True)
        if o["dry_run"]:
            return rc_run
    elif not o["out"].is_dir():
        print(f"verify: compare_only=true: {o['out']} does not exist", file=sys.stderr)
        return 2
    results = compare_roots(committed, o["out"], stages, tol)
    print(f"\n{'=' * 100}\nverify: committed {reproduce.rel_path(committed)} vs re-run {reproduce.rel_path(o['out'])}"
          f"{' (toy scale)' if o['quick'] else ''}; tolerances: conf/verify.yaml")
    report(results, tol)
    cells = o["out"] / "verify" / "comparison.csv"
    write_cells(results, cells)
    print(f"  every compared value: {reproduce.rel_path(cells)}")
    if gpu:
        import torch

        if torch.cuda.is_available():
            g = gpu_report(o["out"])
            if len(g):
                from .common import atomic_write_csv

                atomic_write_csv(g, o["out"] / "verify" / "gpu_prediction.csv")
    bad = failed(results)
    if bad or rc_run:
        why = (["values beyond tolerance or committed rows missing"] if bad else []) + \
              ([f"the re-run exited with {rc_run}"] if rc_run else [])
        print(f"verify: NOT reproduced: {'; '.join(why)}", file=sys.stderr)
        return 1
    print("verify: reproduced: every committed value compared is equal or within tolerance")
    return 0
