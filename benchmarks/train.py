"""Training app: convergence, time-to-accuracy and schedule overhead of a compression preset on real data.

    python -m benchmarks.train data=fashion_mnist model=resnet18 compression=pool4 epochs=3 optim=sgd_cosine
    python -m benchmarks.train -m experiment=train/fmnist_reference              # the CPU reference study
    python -m benchmarks.train -m experiment=train/paper_imagenet_resnet50 data.root=/data/imagenet   # the paper
    python -m benchmarks.train collect outputs/train/fmnist_reference --out results/train/fmnist_reference
    torchrun --nproc_per_node=4 -m benchmarks.train experiment=...        # DDP (one process per GPU)

Each job writes into its Hydra output dir: ``history.csv`` (one row per epoch, rewritten after every epoch),
``grad_cosine.csv`` (with ``grad_cosine=true``), ``checkpoint.pt`` (every epoch; ``resume=true`` continues it),
``summary.json`` and ``train.log`` (the console lines with timestamps). A run ends by printing its final and best
accuracy, the time to each target and where its files went. Every epoch is also logged to W&B (offline unless
``logger.mode=online``; runs grouped by sweep, named ``<preset> <model> s<seed>`` plus the other swept keys; the
summary holds time-to-accuracy, and a CollectTrain sweep adds a ``collect`` run with the overhead ratios).
A multirun with the :class:`CollectTrain` callback (the experiments set it) ends by writing one tidy CSV of every
epoch of every run, a summary with time-to-accuracy and overhead against the baseline run, and the cosines.
Bad input: one line on stderr (``error: ...``), exit status 2.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import sys
import warnings
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from actcomp import ActcompError
from actcomp.data import build_data
from actcomp.errors import one_line
from actcomp.train import EPOCH_COLUMNS, TrainConfig, cpu_numerics, overhead_table, pin_cpu_numerics, train

from .common import (
    PROVENANCE_COLS,
    SWEPT_ENV,
    atomic_write,
    config_hash,
    log_metrics,
    provenance_row,
    wandb_run,
)
from .hydra_conf import CONF_DIR, VERSION_BASE
from .sweep import GROUPS, BenchError, check_block, compression_spec, int_option, preflight

# Hydra sends this logger to the console and to <run dir>/train.log (the console format: conf/train.yaml).
log = logging.getLogger("benchmarks.train")
TRAIN_GROUPS = (*GROUPS, "data", "optim")

warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")

RUN_COLS = ("preset", "model", "model_kwargs", "data", "seed", "batch_size", "image_size", "n_train", "n_val", "optim", "run_id")


def _write_csv(path: Path, rows: list[dict], columns: list[str]) -> None:
    import pandas as pd

    df = pd.DataFrame(rows)
    cols = [c for c in columns if c in df.columns] + [c for c in df.columns if c not in columns]
    atomic_write(path, df[cols].to_csv(index=False) if len(df) else ",".join(columns) + "\n")


def _container(x):
    return OmegaConf.to_container(x, resolve=True) if isinstance(x, DictConfig) or OmegaConf.is_list(x) else x


def check_config(cfg: DictConfig) -> None:
    """Scalar keys a typo would otherwise turn into a traceback deep inside training (one line each)."""
    def _int(key, lo, none_ok=False):
        int_option(cfg.get(key), key, lo, none_ok=none_ok)

    _int("seed", 0)
    _int("epochs", 1)
    _int("batch_size", 1)
    _int("num_workers", 0)
    for key in ("eval_batch_size", "epoch_samples", "threads", "stop_after_epoch"):
        _int(key, 1, none_ok=True)
    ls = cfg.get("label_smoothing")
    if isinstance(ls, bool) or not isinstance(ls, (int, float)) or not 0 <= ls < 1:
        raise BenchError(f"label_smoothing={ls!r}: must be a number in [0, 1)")
    t = _container(cfg.get("targets"))
    if not isinstance(t, list) or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in t):
        raise BenchError(f"targets={t!r}: must be a list of numbers (val top-1 %), e.g. targets=[85,90]")


def _timestamped() -> bool:
    """Whether this job's output dir is named after the time it started (then it never holds a checkpoint)."""
    hc = HydraConfig.get()
    raw = OmegaConf.to_container(hc.sweep if _multirun() else hc.run, resolve=False)
    return any("${now:" in str(v) for v in raw.values())


def _multirun() -> bool:
    from hydra.types import RunMode

    return HydraConfig.get().mode == RunMode.MULTIRUN


def wandb_group(sweep_dir: str, hydra_dir: str, name: str) -> str:
    """The W&B group of a sweep: its folder below hydra_dir (train/<name>/multirun-<time>, train/<name>)."""
    try:
        return Path(sweep_dir).resolve().relative_to(Path(hydra_dir).resolve()).as_posix()
    except ValueError:
        return f"train/{name}/{Path(sweep_dir).name}"


def _run_name(preset: str, model: str, seed: int) -> str:
    """``pool4 resnet18 s0``, plus the other keys this sweep varies (``pool4 resnet18 s0 optim.lr=0.05``)."""
    name = f"{preset} {model} s{seed}"
    if _multirun():
        swept = set(filter(None, os.environ.get(SWEPT_ENV, "").split(","))) - {"compression", "model", "model.name",
                                                                                "seed"}
        name += "".join(f" {o}" for o in HydraConfig.get().overrides.task
                        if o.split("=", 1)[0].lstrip("+~") in swept)
    return name


def wandb_metrics(row: dict) -> dict:
    """Epoch/summary numbers for W&B; the peak key says what the number is (on CPU it is a prediction)."""
    src = str(row.get("peak_mem_source") or "")
    out = {k: v for k, v in row.items() if k != "peak_mem_mib"}
    if "peak_mem_mib" in row:
        if src.startswith("predicted"):
            out["predicted_step_peak_mib"] = row["peak_mem_mib"]
        elif src.startswith("cuda"):
            out["cuda_max_allocated_mib"] = row["peak_mem_mib"]
        # else: the saved-for-backward fallback, already logged as saved_mib
    return out


def train_config(cfg: DictConfig, ckpt: Path | None) -> TrainConfig:
    o = dict(_container(cfg.optim))
    o.pop("name", None)
    sched = o.pop("sched", None) or {}
    m = cfg.model
    # resume: false | true (this output dir's checkpoint) | a run dir or checkpoint file to continue from
    return TrainConfig(
        model=m.name, model_kwargs=dict(_container(m.get("kwargs")) or {}), preset=compression_spec(cfg.compression, budget=True),
        epochs=cfg.epochs, batch_size=cfg.batch_size, epoch_samples=cfg.epoch_samples, eval_batch_size=cfg.eval_batch_size, opt=o, sched=sched,
        label_smoothing=cfg.label_smoothing, seed=cfg.seed, deterministic=cfg.deterministic, amp=cfg.amp,
        channels_last=cfg.channels_last, device=_device(cfg), threads=cfg.threads, num_workers=cfg.num_workers,
        grad_cosine=cfg.grad_cosine, memory=cfg.memory, ckpt_path=str(ckpt) if ckpt else None,
        resume=cfg.resume is not False, stop_after_epoch=cfg.stop_after_epoch,
        targets=tuple(_container(cfg.targets) or ()), progress=cfg.progress)


def _device(cfg: DictConfig) -> str:
    d = cfg.get("device", "cpu")
    name = d.get("name", "cpu") if isinstance(d, DictConfig) else str(d)
    if name == "meta":
        raise ActcompError("device=meta predicts memory only; training needs device=cpu or device=cuda")
    return name


def _prepare_resume(cfg: DictConfig, out: Path) -> Path:
    """The checkpoint path in this job's dir; ``resume=<path>`` copies that checkpoint here first (the original
    is never written to)."""
    ckpt = out / "checkpoint.pt"
    r = cfg.resume
    if r in (False, True, None):
        return ckpt
    src = Path(str(r)).expanduser()
    src = src / "checkpoint.pt" if src.is_dir() else src
    if not src.is_file():
        raise ActcompError(f"resume={r}: no checkpoint found (expected a run dir holding checkpoint.pt, or the file)")
    if src.resolve() != ckpt.resolve():
        if ckpt.exists():
            raise ActcompError(f"{ckpt} already exists; resume from it with resume=true, or use a new output dir")
        shutil.copy2(src, ckpt)
    return ckpt


def run(cfg: DictConfig) -> dict:
    check_config(cfg)
    # First, before any tensor op (the data resize included): thread count and kernel ISA decide the run's bits.
    pin_cpu_numerics(cfg.get("cpu_isa"), int(cfg.threads) if cfg.threads else None)
    out = Path(HydraConfig.get().runtime.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = _prepare_resume(cfg, out)
    dcfg = dict(_container(cfg.data))
    data_name = dcfg.pop("name")
    spec = compression_spec(cfg.compression, budget=True)
    if isinstance(dcfg.get("image_size"), int):
        check_block(dcfg["image_size"], spec)  # before loading: the same refusal as memory/speed/fit
    data = build_data(data_name, **dcfg)
    check_block(data.image_size, spec)
    tc = train_config(cfg, ckpt)
    rank = int(os.environ.get("RANK", "0"))
    if cfg.resume is True and not ckpt.is_file() and rank == 0:
        # The default run dir is named after the start time, so resume=true alone never finds an earlier run.
        hint = ("; every run gets a new timestamped dir: to continue one, pass resume=<its run dir>"
                if _timestamped() else "")
        print(f"note: resume=true but {out} holds no checkpoint: training from scratch{hint}",
              file=sys.stderr, flush=True)
    run_id = config_hash(cfg, drop=("logger", "hydra", "out_dir", "resume", "stop_after_epoch", "progress", "hydra_dir",
                                    "name", "epochs", "targets", "num_workers", "threads", "cpu_isa"))
    static = dict(preset=tc.preset if isinstance(tc.preset, str) else tc.preset["preset"], model=tc.model,
                  model_kwargs=json.dumps(tc.model_kwargs, sort_keys=True) if tc.model_kwargs else "", data=data_name, seed=tc.seed, batch_size=tc.batch_size, image_size=data.image_size,
                  n_train=len(data.train), n_val=len(data.val), optim=cfg.optim.get("name", ""), run_id=run_id)
    rows: list[dict] = []
    if tc.resume and (out / "history.csv").is_file():
        # keep the epochs a resumed run already reported: history.csv is rewritten after every epoch
        import pandas as pd

        rows = pd.read_csv(out / "history.csv").to_dict("records")
    cos_rows: list[dict] = []
    prov = provenance_row(tc.device if tc.device != "auto" else ("cuda" if _cuda() else "cpu"))

    hc = HydraConfig.get()
    group = (wandb_group(hc.sweep.dir, cfg.hydra_dir, cfg.name) if _multirun() else f"train/{cfg.name}")
    with (wandb_run(cfg, "train", name=_run_name(static["preset"], tc.model, tc.seed), group=group) if rank == 0
          else _null()) as wb:
        def on_epoch(row: dict) -> None:
            rows[:] = [r for r in rows if r["epoch"] < row["epoch"]]  # a resume redoes epochs after its checkpoint
            rows.append({**static, **{k: v for k, v in row.items() if k in EPOCH_COLUMNS}, **prov})
            _write_csv(out / "history.csv", rows, [*RUN_COLS, *EPOCH_COLUMNS, *PROVENANCE_COLS])
            log_metrics(wb, wandb_metrics({k: v for k, v in row.items() if k in EPOCH_COLUMNS}), step=row["epoch"])
            log.info(f"[{static['preset']}] epoch {row['epoch']}: train loss {row['train_loss']:.4f}, "
                     f"val top-1 {row['val_top1']:.2f}% top-5 {row['val_top5']:.2f}%, {row['epoch_time_s']:.1f}s "
                     f"({row['images_per_s']:.0f} img/s)")

        res = train(tc, data, callback=on_epoch)
        if rank != 0:
            return res.summary
        # A resumed run reports its whole history (epochs from before the interruption included).
        known = {r["epoch"] for r in rows}
        old = [{**static, **{k: v for k, v in r.items() if k in EPOCH_COLUMNS}, **prov}
               for r in res.history if r["epoch"] not in known]
        rows = sorted(old + rows, key=lambda r: r["epoch"])
        _write_csv(out / "history.csv", rows, [*RUN_COLS, *EPOCH_COLUMNS, *PROVENANCE_COLS])
        if res.cosines:
            cos_rows = [{**static, **c, **prov} for c in res.cosines]
            _write_csv(out / "grad_cosine.csv", cos_rows, [*RUN_COLS, "epoch", "layer", "cosine", *PROVENANCE_COLS])
        summary = {**static, **res.summary, "status": "ok" if res.finished else "stopped", **prov,
                   "data_info": data.info, "cpu_numerics": cpu_numerics(), "config": _container(cfg)}
        atomic_write(out / "summary.json", json.dumps(summary, indent=1, default=str, allow_nan=True))
        if wb is not None:
            # time-to-accuracy (tta_<target>_epoch/_time_s) included; a target never reached has no key
            wb.summary.update({k: v for k, v in wandb_metrics(res.summary).items()
                               if isinstance(v, (int, float, str))})
        for line in report_lines(summary, tc.targets, out, wb):
            log.info(line)
    return summary


def report_lines(summary: dict, targets, out: Path, wb=None) -> list[str]:
    """What a run ends with on the console and in train.log: accuracy, time to each target, where files went."""
    p = f"[{summary.get('preset')}]"
    done, planned = summary.get("epochs_done", 0), summary.get("epochs_planned")
    if not done:
        return [f"{p} no epoch finished", f"{p} files: {out}/"]
    lines = [f"{p} {summary['status']} after {done}/{planned} epochs, {summary['total_elapsed_s']:.1f}s: val top-1 "
             f"final {summary['final_val_top1']:.2f}%, best {summary['best_val_top1']:.2f}% "
             f"(epoch {summary['best_epoch']})"]
    tta = []
    for t in targets:
        e, ts = summary.get(f"tta_{t:g}_epoch"), summary.get(f"tta_{t:g}_time_s")
        tta.append(f"{t:g}% at epoch {e} ({ts:.1f}s)" if e is not None else f"{t:g}% not reached")
    if tta:
        lines.append(f"{p} time to accuracy: {', '.join(tta)}")
    files = [f for f in ("history.csv", "summary.json", "grad_cosine.csv", "checkpoint.pt", "train.log")
             if (out / f).exists()]
    lines.append(f"{p} files: {out}/ ({', '.join(files)})")
    if wb is not None:
        mode = getattr(getattr(wb, "settings", None), "mode", "")
        where = getattr(getattr(wb, "settings", None), "sync_dir", None) or getattr(wb, "dir", "")
        lines.append(f"{p} W&B {mode} run: {where}" + (" (upload: wandb sync <that dir>)" if mode == "offline" else ""))
    return lines


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *a):
        return False


def cli() -> None:
    """Entry point: config-group choices checked first (one line and exit 2, as the other apps), then Hydra."""
    msg = preflight(sys.argv[1:], TRAIN_GROUPS)
    if msg:
        print(f"error: {msg}", file=sys.stderr)
        raise SystemExit(2)
    main()


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> dict:
    try:
        return run(cfg)
    except (ActcompError, BenchError, FileNotFoundError, PermissionError) as e:
        # SystemExit passes through Hydra (it only catches Exception): one line and status 2.
        print(f"error: {one_line(e, typed=False)}", file=sys.stderr)
        sys.exit(2)


# ----------------------------------------------------------------------------------------- collecting a study

def _kept_rows(path: Path, new, keys=("preset", "model", "seed")):
    """The rows of an earlier collection at ``path`` whose run (``keys``) is not among the ``new`` rows."""
    import pandas as pd

    old = pd.read_csv(path)
    missing = [k for k in keys if k not in old]
    if missing:
        raise ActcompError(f"{path} lacks column(s) {', '.join(missing)}: not a collected study")
    ids = set(new[list(keys)].astype(str).itertuples(index=False, name=None))
    return old[[r not in ids for r in old[list(keys)].astype(str).itertuples(index=False, name=None)]]


def collect(run_dirs, out: str | os.PathLike, baseline: str = "none", targets=(), deltas=(0.5, 1.0),
            merge: bool = False) -> dict:
    """Merge the runs' ``history.csv`` into ``out/epochs.csv``, ``out/summary.csv`` (time-to-accuracy and schedule
    overhead of each preset vs ``baseline``, by wall time and by CPU time) and ``out/grad_cosine.csv``.

    Runs are told apart by their ``preset`` column; several seeds or models in one collection are kept apart
    by grouping on (model, seed) and comparing each run with the baseline of its own group. ``merge``: add the
    runs to the collection already in ``out`` (its epochs.csv and grad_cosine.csv; a run, by preset, model and
    seed, that is in both is taken from ``run_dirs``), e.g. a preset added to a committed study without
    re-running it.
    """
    import pandas as pd

    run_dirs = [Path(d) for d in run_dirs]
    hists = [pd.read_csv(d / "history.csv") for d in run_dirs if (d / "history.csv").is_file()]
    if not hists:
        raise ActcompError(f"no history.csv under {', '.join(map(str, run_dirs)) or '(nothing)'}")
    epochs = pd.concat(hists, ignore_index=True)
    out = Path(out)
    if merge:
        if not (out / "epochs.csv").is_file():
            raise ActcompError(f"nothing to merge with: no {out / 'epochs.csv'}")
        kept = _kept_rows(out / "epochs.csv", epochs).drop(columns=["cpu_elapsed_s"], errors="ignore")
        epochs = pd.concat([kept, epochs], ignore_index=True)
    epochs["cpu_elapsed_s"] = epochs.sort_values("epoch").groupby("run_id")["cpu_time_s"].cumsum()
    atomic_write(out / "epochs.csv", epochs.to_csv(index=False))
    rows = []
    for (model, seed), g in epochs.groupby(["model", "seed"], sort=False):
        hist = {p: h.sort_values("epoch") for p, h in g.groupby("preset", sort=False)}
        if baseline not in hist:
            continue
        wall = overhead_table(hist, baseline, targets, deltas, time_key="elapsed_s")
        cpu = overhead_table(hist, baseline, targets, deltas, time_key="cpu_elapsed_s")
        for w, c in zip(wall, cpu, strict=True):
            h = hist[w["run"]]
            rows.append(dict(preset=w.pop("run"), model=model, seed=seed, baseline=baseline, **w,
                             cpu_time_s=c["time_s"], baseline_cpu_time_s=c["baseline_time_s"],
                             cpu_time_ratio=c["time_ratio"], total_cpu_time_s=float(h["cpu_time_s"].sum()),
                             mean_images_per_s=float(h["images_per_s"].mean()),
                             peak_mem_mib=float(h["peak_mem_mib"].max()), peak_mem_source=h["peak_mem_source"].iloc[-1],
                             saved_mib=float(h["saved_mib"].iloc[-1]),
                             **{k: h[k].iloc[-1] for k in PROVENANCE_COLS if k in h}))
    summary = pd.DataFrame(rows)
    atomic_write(out / "summary.csv", summary.to_csv(index=False))
    cos = [with_provenance(pd.read_csv(d / "grad_cosine.csv"), d) for d in run_dirs
           if (d / "grad_cosine.csv").is_file()]
    if merge and cos and (out / "grad_cosine.csv").is_file():
        cos.insert(0, _kept_rows(out / "grad_cosine.csv", pd.concat(cos, ignore_index=True)))
    if cos:
        atomic_write(out / "grad_cosine.csv", pd.concat(cos, ignore_index=True).to_csv(index=False))
    return dict(epochs=epochs, summary=summary)


def with_provenance(cos, run_dir: Path):
    """A run's cosine rows with its provenance; runs written before the cosine file carried it take it from the
    same run's history.csv (written by the same process)."""
    import pandas as pd

    missing = [k for k in PROVENANCE_COLS if k not in cos]
    if missing and (run_dir / "history.csv").is_file():
        h = pd.read_csv(run_dir / "history.csv")
        for k in missing:
            if k in h and len(h):
                cos[k] = h[k].iloc[-1]
    return cos


def find_runs(sweep_dir: str | os.PathLike) -> list[Path]:
    return sorted({p.parent for p in Path(sweep_dir).glob("**/history.csv")})


class CollectTrain(Callback):
    """Hydra callback: when a multirun ends, collect its runs into ``out`` (see :func:`collect`)."""

    def __init__(self, out: str, baseline: str = "none", targets=(), deltas=(0.5, 1.0), frontier: str | None = None):
        self.out, self.baseline = out, baseline
        self.targets, self.deltas = list(targets or ()), list(deltas or ())
        # a frontier study: also rebuild <frontier>/frontier.csv from every study collected below that folder
        self.frontier = frontier

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        runs = find_runs(config.hydra.sweep.dir)
        if not runs:
            return
        res = collect(runs, self.out, self.baseline, self.targets, self.deltas)
        print(f"collected {len(runs)} run(s) into {self.out}/ (epochs.csv, summary.csv)")
        s = res["summary"]
        log_overhead_wandb(config, s, self.baseline)
        if self.frontier:
            from .frontier import write_frontier

            print(f"frontier table: {write_frontier(self.frontier)}")
        if len(s):
            show = s[s["target_kind"] == "fixed"][["preset", "target", "epoch", "epochs_ratio", "time_ratio",
                                                   "cpu_time_ratio", "final_val_top1"]]
            print(show.to_string(index=False, float_format=lambda v: f"{v:.3g}" if not math.isnan(v) else "-"))


def overhead_summary(summary) -> dict:
    """summary.csv rows as flat W&B summary keys: ``<preset>/<ratio>@<target>`` (target ``88`` or
    ``baseline_best-0.5``) and ``<preset>/final_val_top1``, ``<preset>/best_val_top1``."""
    out = {}
    for r in summary.to_dict("records"):
        p = r["preset"]
        at = f"{r['target']:g}" if r["target_kind"] == "fixed" else r["target_kind"]
        for k in ("epochs_ratio", "time_ratio", "cpu_time_ratio", "epoch", "time_s"):
            v = r.get(k)
            if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
                out[f"{p}/{k}@{at}"] = v
        out[f"{p}/final_val_top1"], out[f"{p}/best_val_top1"] = r["final_val_top1"], r["best_val_top1"]
    return out


def log_overhead_wandb(config: DictConfig, summary, baseline: str) -> None:
    """One W&B run per collected sweep (job_type ``collect``, in the sweep's group) whose summary holds the
    time-to-accuracy overhead of every preset against ``baseline``. A W&B problem is reported, never fatal."""
    if not len(summary) or config.get("logger") is None:
        return
    c = OmegaConf.create(dict(logger=_container(config.logger), name=str(config.name), baseline=baseline))
    group = wandb_group(config.hydra.sweep.dir, config.hydra_dir, config.name)
    try:
        with wandb_run(c, "collect", name=f"{config.name} overhead vs {baseline}", group=group) as wb:
            if wb is not None:
                import wandb

                wb.summary.update(overhead_summary(summary))
                wb.log({"overhead": wandb.Table(dataframe=summary.astype(str))})
    except Exception as e:  # noqa: BLE001
        print(f"train: W&B logging of the overhead skipped: {one_line(e, limit=250, typed=True)}", file=sys.stderr)


def collect_cli(argv: list[str]) -> int:
    """``python -m benchmarks.train collect SWEEP_DIR OUT [--baseline none] [--targets 85,88,90]``: the
    multirun-end collection, by hand (e.g. after an interrupted sweep, or over several sweep dirs)."""
    import argparse

    ap = argparse.ArgumentParser(prog="python -m benchmarks.train collect")
    ap.add_argument("sweep_dir", nargs="+", help="folders holding run dirs with history.csv")
    ap.add_argument("--out", required=True, help="output folder (epochs.csv, summary.csv, grad_cosine.csv)")
    ap.add_argument("--baseline", default="none")
    ap.add_argument("--targets", default="85,88,90", help="comma-separated val top-1 targets (%%)")
    ap.add_argument("--deltas", default="0.5,1.0", help="targets at the baseline's best minus these")
    ap.add_argument("--merge", action="store_true",
                    help="add the runs to the collection already in --out (same preset, model and seed: replaced)")
    ap.add_argument("--frontier", default=None,
                    help="then rebuild FRONTIER/frontier.csv from every study collected below that folder")
    a = ap.parse_args(argv)
    try:
        runs = [r for d in a.sweep_dir for r in find_runs(d)]
        res = collect(runs, a.out, a.baseline, [float(t) for t in a.targets.split(",") if t],
                      [float(t) for t in a.deltas.split(",") if t], merge=a.merge)
        if a.frontier:
            from .frontier import write_frontier

            print(f"frontier table: {write_frontier(a.frontier)}")
    except (ActcompError, ValueError, OSError) as e:
        print(f"error: {one_line(e, typed=False)}", file=sys.stderr)
        return 2
    print(f"collected {len(runs)} run(s) into {a.out}/ ({len(res['epochs'])} epoch rows)")
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "collect":
        sys.exit(collect_cli(sys.argv[2:]))
    cli()
