"""Records: one JSON file per point (the done-index), the tidy CSV rebuilt from them, the console table, and
``collect`` (aggregate records and job summaries found anywhere)."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from ..common import PROVENANCE_COLS, atomic_write, config_hash
from ..errors import BenchError
from .paths import ensure_writable, sweep_paths

# Keys that do not change what is measured: left out of the point hash and of the CSV's config columns.
NOT_MEASURED = ("logger", "hydra", "force", "out_dir", "hydra_dir", "sweep", "app")
DONE = ("ok", "oom")  # statuses a re-run does not repeat


def flatten(d: Any, prefix: str = "") -> dict:
    """Nested dicts -> {"a.b": v}; lists become JSON strings (one CSV cell)."""
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        if not d and prefix:
            out[prefix[:-1]] = "{}"
        return out
    if isinstance(d, (list, tuple)):
        return {prefix[:-1]: json.dumps(list(d))}
    return {prefix[:-1]: d}


def measured_config(cfg: DictConfig) -> dict:
    d = OmegaConf.to_container(cfg, resolve=True)
    return {k: v for k, v in d.items() if k not in NOT_MEASURED}


# Keys added after results were recorded: left out of the hash at their default, so older records still match.
# speed's `blocks` at 1 (what records made before it measured: one block); its default 3 is a new measurement.
LATER_KEYS = {"compile": False, "blocks": 1, "max_blocks": None, "target_iqr": None}


def point_key(cfg: DictConfig) -> str:
    later = tuple(k for k, v in LATER_KEYS.items() if k in cfg and type(cfg[k]) is type(v) and cfg[k] == v)
    return config_hash(cfg, drop=NOT_MEASURED + later)



def read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None



def records_frame(records: list[dict]):
    """One tidy row per point: point, app, sweep, status, message, config keys, metrics, elapsed, provenance."""
    import pandas as pd

    rows, cfg_cols, met_cols = [], [], []
    for r in records:
        for c in r.get("config", {}):
            if c not in cfg_cols:
                cfg_cols.append(c)
        for c in r.get("metrics", {}):
            if c not in met_cols:
                met_cols.append(c)
        rows.append(dict(point=r["point"], app=r["app"], sweep=r["sweep"], status=r["status"],
                         message=r.get("message", ""), **r.get("config", {}), **r.get("metrics", {}),
                         elapsed_s=r.get("elapsed_s"), **r.get("provenance", {})))
    cfg_cols.sort(key=_cfg_order)
    cols = ["point", "app", "sweep", "status", "message", *cfg_cols, *met_cols, "elapsed_s", *PROVENANCE_COLS]
    df = pd.DataFrame(rows, columns=cols)
    for c in met_cols:  # byte counts stay integers even where a failed point leaves a gap
        if c.endswith("_bytes") and pd.api.types.is_numeric_dtype(df[c]):
            df[c] = df[c].astype("Int64")
    if "saved_total_bytes" in df:
        # An op kind a model does not have saves 0 bytes (the kinds are the union over rows).
        has = df["saved_total_bytes"].notna()
        for c in df.columns:
            if c.startswith("saved_") and c.endswith("_bytes"):
                df.loc[has, c] = df.loc[has, c].fillna(0).astype("int64")
    varying = [c for c in cfg_cols if df[c].astype(str).nunique() > 1]
    if varying and len(df):
        df = df.sort_values(varying, kind="stable", key=_sort_key).reset_index(drop=True)
    return df


_FIRST = ("model.name", "compression.name", "batch_size", "img_size", "device.name")


def _cfg_order(c: str):
    # The keys a reader looks for first; the rest in their config order (sort is stable).
    return _FIRST.index(c) if c in _FIRST else len(_FIRST)


def _sort_key(col):
    import pandas as pd

    num = pd.to_numeric(col, errors="coerce")
    return num if num.notna().all() else col.astype(str)


RECORD_KEYS = ("point", "app", "sweep", "status")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr, flush=True)


def bad_record(r: dict | None) -> str | None:
    """Why a record cannot be aggregated (None if it can): unreadable (e.g. truncated) or keys missing."""
    if r is None:
        return "unreadable (truncated or not JSON)"
    if not isinstance(r, dict):
        return "not a JSON object"
    lack = [k for k in RECORD_KEYS if k not in r]
    return f"lacks key(s) {', '.join(lack)}" if lack else None


def load_records(rec_dir: Path) -> list[dict]:
    """Every record of a sweep; one that cannot be used is left out with a warning, never silently."""
    out = []
    for p in sorted(Path(rec_dir).glob("*.json")):
        r = read_record(p)
        why = bad_record(r)
        if why is None and p.stem != r["point"]:
            why = f"names point {r['point']!r}, not its file name"
        if why:
            _warn(f"{p}: {why}; left out of {Path(rec_dir).with_suffix('.csv').name} (rerun that point or delete "
                  f"the file)")
            continue
        out.append(r)
    return out


def write_csv(rec_dir: Path, csv_path: Path):
    """Rebuild ``csv_path`` from every record in ``rec_dir`` (atomic replace). Returns the frame."""
    df = records_frame(load_records(rec_dir))
    ensure_writable(csv_path.parent)
    atomic_write(csv_path, df.to_csv(index=False))
    return df


def console_table(summaries: list[dict], max_rows: int = 60) -> str:
    """A readable table of a sweep's points: varying config keys, status and the app's key metrics."""
    import pandas as pd

    if not summaries:
        return "(no points)"
    rows = []
    for s in summaries:
        row = {k: v for k, v in s.get("config", {}).items()}
        row["status"] = s.get("status", "?") + (" (done before)" if s.get("run") == "skipped" else "")
        for m in s.get("display", []):
            v = s.get("metrics", {}).get(m)
            if m.endswith("_bytes"):
                row[m.replace("_bytes", "_MiB")] = round(v / 2**20, 1) if isinstance(v, (int, float)) else None
            else:
                row[m] = v
        row["message"] = (s.get("message") or "")[:60]
        rows.append(row)
    df = pd.DataFrame(rows)
    cfg_keys = list(summaries[0].get("config", {}))
    keep = [c for c in df.columns if (c not in cfg_keys or df[c].astype(str).nunique() > 1) and df[c].notna().any()]
    if not (df["message"] != "").any():
        keep.remove("message")
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_colwidth", 60):
        text = df[keep].head(max_rows).to_string(index=False)
    if len(df) > max_rows:
        text += f"\n... {len(df) - max_rows} more rows in the CSV"
    return text


def collect(paths: list[Path], out_dir: Path | None = None, quiet: bool = False) -> list[Path]:
    """Aggregate records/summaries found under ``paths`` into one CSV per (app, sweep). Returns the CSVs.

    A path may be a Hydra run/multirun dir (``summary.json`` in job dirs: their records are copied into the
    sweep's records folder if missing, so a sweep run elsewhere can be collected here), a records folder
    (``results/<app>/<sweep>/``) or any folder above them (``results/``).
    """
    targets: dict[Path, Path] = {}
    for root in paths:
        root = Path(root)
        if not root.exists():
            raise BenchError(f"{root}: no such directory")
        for s in sorted(root.rglob("summary.json")):
            rec = read_record(s)
            why = bad_record(rec)
            if why:
                _warn(f"{s}: {why}; skipped")
                continue
            if not rec.get("recorded"):
                continue  # e.g. a failed single run: reported on stderr, never part of the results
            base = Path(out_dir) if out_dir is not None else None
            if base is None:
                base = _out_dir_of(s)
            rec_dir, csv_path = sweep_paths(base, rec["app"], rec["sweep"])
            ensure_writable(rec_dir)
            target = rec_dir / f"{rec['point']}.json"
            if not target.exists():
                clean = {k: v for k, v in rec.items() if k not in ("run", "recorded")}
                atomic_write(target, json.dumps(clean, indent=1, default=str))
            targets[rec_dir] = csv_path
        for r in sorted(root.rglob("*.json")):
            if r.name != "summary.json" and len(r.stem) == 12 and all(c in "0123456789abcdef" for c in r.stem):
                targets.setdefault(r.parent, r.parent.with_suffix(".csv"))
    written = []
    for rec_dir, csv_path in targets.items():
        df = write_csv(rec_dir, csv_path)
        written.append(csv_path)
        if not quiet:
            print(f"{csv_path}: {len(df)} points ({count_statuses(df['status'].tolist())})")
    return written


def _out_dir_of(summary_path: Path) -> Path:
    """out_dir of the job that wrote ``summary_path`` (from its .hydra/config.yaml), else ./scratch."""
    cfg_file = summary_path.parent / ".hydra" / "config.yaml"
    hydra_file = summary_path.parent / ".hydra" / "hydra.yaml"
    try:
        out = OmegaConf.load(cfg_file).get("out_dir", "results")
        cwd = OmegaConf.load(hydra_file).hydra.runtime.cwd
        p = Path(out)
        return p if p.is_absolute() else Path(cwd) / p
    except Exception:  # noqa: BLE001
        return Path("scratch").resolve()


def count_statuses(statuses: list[str]) -> str:
    c: dict[str, int] = {}
    for s in statuses:
        c[s] = c.get(s, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in c.items()) or "empty"


