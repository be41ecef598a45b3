"""Sweep plumbing shared by the memory, speed and fit apps: one record per point, skip-on-rerun, one CSV per sweep.

Layout (``out_dir`` = ``scratch``, a git-ignored folder, by default, relative to where the command was started;
only ``make reproduce`` or an explicit ``out_dir=results`` writes the published ``results/``)::

    <out_dir>/<app>/<sweep>/<point>.json   one record per point: the done-index. <point> = config_hash of the
                                           resolved config without logger/hydra/force/out_dir/hydra_dir/sweep
    <out_dir>/<app>/<sweep>.csv            the tidy table, rebuilt from the records after every run
    outputs/<app>/<sweep>/.../summary.json   every job's own summary in its Hydra output dir

Single run vs multirun (decided from Hydra's run mode):

* single run (no ``-m``): any failure (bad input, out of memory, error) prints ONE line on stderr and exits
  non-zero (2: bad input, 1: out of memory or another failure); nothing under ``out_dir`` is written.
* multirun (``-m``): a failing point is recorded with ``status`` (``oom`` or ``error``) and a one-line
  ``message``, and the sweep goes on; it ends with a line saying how many points failed and exits 1 when
  any point ended in ``error`` (``oom`` is an answer, not a failure). Bad input on the command line itself
  (an unknown config-group option, an unwritable ``out_dir``) stops the sweep before any point runs.

Re-runs skip points whose record says ``ok`` or ``oom`` (a definite answer); ``error`` points are tried again;
``force=true`` measures everything again. Every file is written to a temporary name and ``os.replace``-d, so a
crash never leaves a half-written record or CSV behind.
"""
from __future__ import annotations

import contextlib
import difflib
import json
import math
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from actcomp import ActcompError, get_preset

from .common import PROVENANCE_COLS, atomic_write, config_hash, log_metrics, provenance_row, wandb_run

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
# Keys that do not change what is measured: left out of the point hash and of the CSV's config columns.
NOT_MEASURED = ("logger", "hydra", "force", "out_dir", "hydra_dir", "sweep", "app")
DONE = ("ok", "oom")  # statuses a re-run does not repeat
GROUPS = ("model", "compression", "device", "logger", "experiment", "hydra/launcher")
# Hydra warns that our conf/hydra/launcher/*.yaml share their names with the plugins' schemas; that match is
# what we want (it type-checks our files), so the deprecation notice is only noise on every run.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")


class BenchError(ValueError):
    """Bad input detected by the apps (one line, fit for a CLI)."""


class OutputError(BenchError):
    """The results folder cannot be written."""


# ------------------------------------------------------------------------------------------ small helpers

def one_line(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    msg = lines[0] if lines else ""
    if not isinstance(e, (ActcompError, BenchError)):
        msg = f"{type(e).__name__}: {msg}"
    return msg[:400]


def is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    s = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in s or "can't allocate memory" in s)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], OSError)


def ensure_writable(folder: Path, keep: bool = False) -> Path:
    """Prove ``folder`` is writable (creating it for the test); OutputError (one line) otherwise.

    Unless ``keep``, folders created only for the test are removed again, so a run that then fails leaves no
    empty ``<out_dir>/<app>/<sweep>/`` behind; the writers create them when they really write (atomic_write).
    A multirun keeps them (every point leaves a record), so parallel workers never race a removal.
    """
    folder = Path(folder)
    created = [] if keep else [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"output dir {folder} is not writable ({e.strerror or e})") from None
    finally:
        for p in created:  # deepest first; one a concurrent job filled stays
            with _suppress():
                p.rmdir()
    return folder


def original_cwd() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.cwd)
    except (ValueError, ImportError, AttributeError):
        return Path.cwd()


def abs_path(p: str | os.PathLike) -> Path:
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else original_cwd() / p


def is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ValueError, ImportError):
        return False


def job_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ValueError, ImportError):
        return None


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
LATER_KEYS = {"compile": False}


def point_key(cfg: DictConfig) -> str:
    later = tuple(k for k, v in LATER_KEYS.items() if k in cfg and cfg[k] is v)
    return config_hash(cfg, drop=NOT_MEASURED + later)


def sweep_paths(out_dir: Path, app: str, sweep: str) -> tuple[Path, Path]:
    """(records folder, CSV path) of one sweep."""
    return out_dir / app / sweep, out_dir / app / f"{sweep}.csv"


def compression_spec(comp: DictConfig | dict):
    """The compression group as actcomp input: the preset name, or {preset, **overrides} when keys were added.

    Checked here so that an unknown preset is one line with suggestions (actcomp.get_preset's message).
    """
    d = OmegaConf.to_container(comp, resolve=True) if isinstance(comp, DictConfig) else dict(comp)
    name = d.pop("name", None)
    if name is None:
        raise BenchError("compression.name is missing; pick a preset, e.g. compression=pool4")
    get_preset(name)
    return {"preset": name, **d} if d else name


def check_block(img_size: int, spec) -> None:
    """An image smaller than the pooling block leaves nothing to pool (the first conv sees the image itself)."""
    from collections.abc import Mapping

    from actcomp import as_config

    c = as_config(spec)
    b = max(c.block.values()) if isinstance(c.block, Mapping) else c.block
    if b > 1 and img_size < b:
        raise BenchError(f"img_size={img_size} is smaller than the {b}x{b} pooling block of preset {c.name!r}; "
                         f"use img_size >= {b}")


def check_common(cfg: DictConfig, batch: bool = True) -> None:
    """Config-level checks every app shares (one clear line each)."""
    import torch

    def _int(key, lo=1):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise BenchError(f"{key}={v!r}: must be an integer >= {lo}")

    if batch:
        _int("batch_size")
    _int("img_size")
    for key in ("channels_last", "saved_by_op"):  # a string like "maybe" would count as true (amp, dtype: actcomp)
        if key in cfg and not isinstance(cfg.get(key), bool):
            raise BenchError(f"{key}={cfg.get(key)!r}: use true or false")
    for key, lo in (("warmup", 0), ("iters", 1)):
        if key in cfg:
            _int(key, lo)
    dev = str(cfg.device.name)
    if dev.split(":")[0] not in ("meta", "cpu", "cuda"):
        raise BenchError(f"device.name={dev!r}: use device=meta, device=cpu or device=cuda")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"device=cuda but CUDA is not available (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda or 'none'}); use device=meta or device=cpu")


# ------------------------------------------------------------------------------------------ records

def read_record(path: Path) -> dict | None:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


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
        _die(app, str(e), 2)
    if not isinstance(cfg.get("force", False), bool):  # "maybe" would silently redo a whole sweep
        _die(app, f"force={cfg.get('force')!r}: use true or false", 2)
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
    except (ActcompError, BenchError) as e:
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
        _die(app, message, code)
    return {**record, "run": "measured", "recorded": recorded}


def _die(app: str, message: str, code: int):
    print(f"{app}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)


def _write_summary(summary: dict) -> None:
    d = job_dir()
    if d is not None:
        with _suppress():
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
            print(f"{csv_path}: {len(df)} points ({_counts(df['status'].tolist())})")
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


def _counts(statuses: list[str]) -> str:
    c: dict[str, int] = {}
    for s in statuses:
        c[s] = c.get(s, 0) + 1
    return ", ".join(f"{v} {k}" for k, v in c.items()) or "empty"


# ------------------------------------------------------------------------------------------ CLI preflight

def count_points(config: DictConfig) -> int:
    """Number of jobs the basic sweeper will launch (its own cartesian-product rule, last override wins)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    args += list(config.hydra.overrides.task)
    sizes: dict[str, int] = {}
    for o in OverridesParser.create().parse_overrides(args):
        sizes[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
    return math.prod(sizes.values()) if sizes else 1


def swept_keys(config: DictConfig) -> list[str]:
    """Keys that take more than one value in this sweep (what tells its points apart)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    args += list(config.hydra.overrides.task)
    return [o.get_key_element() for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()]


def group_options(group: str) -> list[str]:
    # nested folders are options too: experiment=memory/memory_models is conf/experiment/memory/memory_models.yaml
    return sorted(p.relative_to(CONF_DIR / group).with_suffix("").as_posix() for p in (CONF_DIR / group).rglob("*.yaml"))


def preflight(argv: list[str], groups: tuple[str, ...] = GROUPS) -> str | None:
    """Check config-group choices on the command line (Hydra would print a multi-line error). None if fine.

    ``groups``: the config groups of the app (conf/<group>/*.yaml are the choices)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            o = parser.parse_override(arg)
        except HydraException as e:
            return f"cannot parse override {arg!r}: {one_line(e)}"
        key = o.key_or_group
        if key not in groups or o.is_delete():
            continue
        vals = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        opts = group_options(key) + (["basic", "joblib", "submitit_local", "submitit_slurm"]
                                     if key == "hydra/launcher" else [])
        for v in vals:
            if v in opts or (key == "experiment" and v == "null"):
                continue
            if key == "compression":
                try:
                    get_preset(v)
                except ActcompError as e:
                    return str(e)
                return f"preset {v!r} has no conf/compression/{v}.yaml"
            if key == "model":
                return _unknown_model(v, opts)
            close = difflib.get_close_matches(v, opts, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            return f"unknown {key} {v!r}{hint}; known: {', '.join(opts)}"
    return None


def _unknown_model(v: str, curated: list[str]) -> str:
    import timm

    if timm.is_model(v):
        return f"no config conf/model/{v}.yaml; {v} is a timm model: use model.name={v}"
    close = difflib.get_close_matches(v, curated, n=2) + difflib.get_close_matches(v, timm.list_models(), n=3)
    close = list(dict.fromkeys(close))[:4]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown model {v!r}{hint}; curated configs: conf/model/, any timm model: model.name=<timm name>"


def cli(app: str, hydra_main: Callable[[], Any]) -> None:
    """Entry point of an app: one-line preflight of the command line, then Hydra."""
    msg = preflight(sys.argv[1:])
    if msg:
        print(f"{app}: {msg}", file=sys.stderr)
        raise SystemExit(2)
    hydra_main()


# ------------------------------------------------------------------------------------------ callback

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object

_BARS: dict[int, Any] = {}  # (tqdm bar, stop event, poll thread) of the launcher process; never pickled
_STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # SIGINT already aborts joblib, which then kills its workers


def kill_joblib_workers(signum: int, frame: Any = None) -> None:
    """Signal handler of a joblib sweep's launcher: kill the loky workers, then exit.

    Without it, a ``kill`` of the launcher leaves its workers running their points and writing into the run
    dirs and records after the sweep was stopped (records are atomic, so killing a worker loses no file).
    """
    import signal

    try:
        from joblib.externals.loky import reusable_executor

        ex = reusable_executor._executor
        if ex is not None:
            pids = [p.pid for p in getattr(ex, "_processes", {}).values()]
            ex.shutdown(wait=False, kill_workers=True)
            for pid in pids:  # shutdown kills from its manager thread, asynchronously: make sure before exiting
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    except Exception:  # noqa: BLE001  exit all the same
        pass
    print(f"sweep stopped by {signal.Signals(signum).name}; worker processes killed", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)


class CollectCallback(Callback):
    """Registered in conf (hydra.callbacks.collect): progress over a sweep, then its CSV and a console table.

    The bar lives in the launcher process and counts job summaries on disk, so it also moves for launchers that
    run points in other processes (joblib, submitit); there ``on_job_end`` runs in the worker and does nothing.
    """

    def __init__(self) -> None:
        self.pid: int | None = None
        self.n = 0
        self.swept: list[str] = []

    # -- start: refuse an unwritable results folder before any point runs (one line, exit 2)
    def _check_out(self, config: DictConfig, run_dir: str, keep: bool = False) -> None:
        app = config.get("app", "bench")
        try:
            ensure_writable(sweep_paths(abs_path(config.out_dir), app, str(config.sweep))[0], keep=keep)
            ensure_writable(abs_path(run_dir).parent)
        except OutputError as e:
            _die(app, str(e), 2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check_out(config, config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check_out(config, config.hydra.sweep.dir, keep=True)
        import threading

        from tqdm import tqdm

        if "joblib" in str(config.hydra.launcher.get("_target_", "")).lower():
            self._install_stop_handlers()
        self.pid, self.n = os.getpid(), count_points(config)
        self.swept = swept_keys(config)
        bar = tqdm(total=self.n, desc=f"{config.app}/{config.sweep}", unit="point", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
        # The bar counts job summaries in the sweep dir, so it moves whichever launcher runs the points
        # (in this process, joblib workers or submitit jobs).
        stop = threading.Event()
        thread = threading.Thread(target=_poll, args=(bar, Path(config.hydra.sweep.dir), stop), daemon=True)
        thread.start()
        _BARS[self.pid] = (bar, stop, thread)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            s = job_return.return_value
        except Exception as e:  # noqa: BLE001  (a job that raised: e.g. an unwritable folder)
            s = {"status": "error", "message": one_line(e)}
        status = (("skipped" if s.get("run") == "skipped" else s.get("status", "?"))
                  if isinstance(s, dict) else "?")
        label = " ".join(o for o in config.hydra.overrides.task if o.split("=")[0] in self.swept) or config.sweep
        entry = _BARS.get(os.getpid()) if os.getpid() == self.pid else None
        if entry is not None:  # the launcher process; in joblib/submitit workers the bar's poller counts it
            entry[0].set_postfix_str(f"{status}: {label}"[:70], refresh=False)

    def _install_stop_handlers(self) -> None:
        import signal
        import threading

        self._old_handlers = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in _STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old_handlers[sig] = signal.signal(sig, kill_joblib_workers)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import signal

        for sig, h in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, h)
        sweep_dir = Path(config.hydra.sweep.dir)
        entry = _BARS.pop(os.getpid(), None)
        if entry is not None:
            bar, stop, thread = entry
            stop.set()
            thread.join()
            _advance(bar, sweep_dir)
            bar.close()
        summaries = [read_record(p) for p in sorted(sweep_dir.glob("*/summary.json"), key=_job_num)]
        self._finish(config, [s for s in summaries if s])

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        s = read_record(Path(config.hydra.runtime.output_dir) / "summary.json")
        self._finish(config, [s] if s else [])

    def _finish(self, config: DictConfig, summaries: list[dict]) -> None:
        app, sweep = str(config.app), str(config.sweep)
        rec_dir, csv_path = sweep_paths(abs_path(config.out_dir), app, sweep)
        try:
            df = write_csv(rec_dir, csv_path)
        except OutputError as e:
            _die(app, str(e), 2)
        print(console_table(summaries))
        statuses = [_status(s) for s in summaries]
        print(f"{app}/{sweep}: this run {len(summaries)} points ({_counts(statuses)}); "
              f"{csv_path} now holds {len(df)} points")
        if summaries and all(st == "skipped" for st in statuses):
            print(f"{app}/{sweep}: every point was already done in {rec_dir}; nothing measured. To measure again "
                  f"add force=true, or write elsewhere with out_dir=<folder>")
        failed = statuses.count("error")
        if self.n > len(summaries):  # multirun only (self.n is 0 otherwise)
            failed += self.n - len(summaries)  # jobs that died before writing their summary
        if failed:
            _die(app, f"{failed} of {max(len(summaries), self.n)} points failed (status error; see the message column of "
                      f"{csv_path}); a rerun retries them", 1)


def _advance(bar, sweep_dir: Path) -> None:
    k = len(list(sweep_dir.glob("*/summary.json")))
    if k > bar.n:
        bar.update(k - bar.n)


def _poll(bar, sweep_dir: Path, stop) -> None:
    while not stop.wait(1.0):
        _advance(bar, sweep_dir)


def _status(s: dict) -> str:
    return "skipped" if s.get("run") == "skipped" else s.get("status", "?")


def _job_num(p: Path):
    return int(p.parent.name) if p.parent.name.isdigit() else p.parent.name
