"""``make reproduce``: run every experiment the figures need, in order, then draw the figures.

    python -m benchmarks.reproduce                  # CPU scale into results/ (paper scale too where CUDA is present)
    python -m benchmarks.reproduce quick=true       # toy scale into results-quick/ (never touches results/)
    python -m benchmarks.reproduce data.root=/data/imagenet     # + the paper's ImageNet runs (needs CUDA)
    python -m benchmarks.reproduce stages=timeline,figures force=true dry_run=true
    python -m benchmarks.reproduce verify=true      # re-run into scratch/ and compare with results/ (benchmarks/verify.py)

Options (key=value):
  quick=false       toy scale: tiny timm models, small batches, 2 epochs on a data subset; results-quick/
  out=              results root (default results/, or results-quick/ with quick=true)
  force=false       run stages again although their CSVs exist (the sweeps then measure every point again)
  stages=           comma-separated subset of the stage names (default: all that apply)
  paper=auto        auto: the CUDA stages run when torch.cuda.is_available(); true/false to force
  study=false       also the memory-accuracy frontier studies (train/frontier/, figure 10; ~3 h on 2 idle
                    cores, toy scale with quick=true); `make study` runs only them and the figures
  data.root=        an ImageNet folder: adds the paper's ResNet-18/34/50 ImageNet runs (with CUDA)
  logger=           W&B mode for the apps that log (offline by default; quick: disabled)
  dry_run=false     print each stage's command and what would be skipped, run nothing
  fork=true         start each stage from a pre-imported process (fork; saves ~10 s of imports per stage)
  verify=false      re-run the stages into out= (default scratch/verify-<time>/) and compare every committed
                    CSV with its re-run, number by number (tolerances: conf/verify.yaml); exit 1 if any differs
  reference=        verify: the committed results to compare with (default results/, quick: results/quick/)
  compare_only=false  verify: compare an existing out= folder again, run nothing

Each stage is one app of ``benchmarks/``; the driver only orders them, says which stage k/n is running and for
how long, skips what is done (the Hydra sweeps skip recorded points by themselves; every other stage is skipped
when its output CSVs exist, unless force=true), goes on after a failed stage, and ends with ``benchmarks.figures``
and a summary table. Exit status: 0 when every stage ran or was skipped, 1 when one failed, 2 on bad options.
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from .cli import flag, parse_kv

REPO = Path(__file__).resolve().parent.parent
PRELOAD = ("torch", "timm", "hydra", "omegaconf", "pandas", "matplotlib")


@dataclass
class Stage:
    name: str
    what: str
    module: str
    args: list[str]
    outputs: list[Path] = field(default_factory=list)  # skip when all exist (unless force); empty: never skipped
    self_skipping: bool = False  # a Hydra sweep: points already recorded are skipped by the app itself
    note: str = ""


def fmt_duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


# ------------------------------------------------------------------------------------------ the plan

def train_callback_args(experiment: str | None, out: Path, targets: str | None = None) -> list[str]:
    """Overrides that make the study's collect callback write into ``out`` (the experiment's own key when it
    declares a ``benchmarks.train.CollectTrain`` callback, else one added here)."""
    key = None
    if experiment:
        try:
            from omegaconf import OmegaConf

            cb = OmegaConf.load(REPO / "conf/experiment" / f"{experiment}.yaml").get("hydra", {}).get("callbacks") or {}
            key = next((k for k, v in cb.items() if str(v.get("_target_", "")).endswith("CollectTrain")), None)
        except (OSError, ValueError):
            key = None
    if key:
        return [f"hydra.callbacks.{key}.out={out}"]
    return ["+hydra.callbacks.collect_train._target_=benchmarks.train.CollectTrain",
            f"+hydra.callbacks.collect_train.out={out}",
            *([f"+hydra.callbacks.collect_train.targets={targets}"] if targets else [])]


def composed(app: str, overrides: list[str]):
    """The app's config with ``overrides`` (no Hydra run): what a stage's output file names derive from."""
    from hydra import compose, initialize_config_dir

    from .hydra_conf import CONF_DIR, VERSION_BASE

    with initialize_config_dir(str(CONF_DIR), version_base=VERSION_BASE):
        return compose(app, overrides=overrides)


def plan(o: dict) -> list[Stage]:
    R: Path = o["out"]
    # Hydra's per-job dirs: outputs/ for results/, else inside the results root, so that a run into another
    # folder (quick, verify) never resumes the training runs of results/
    H = REPO / "outputs" if R.resolve() == (REPO / "results").resolve() else R / "outputs"
    q = o["quick"]
    lg = [f"logger={o['logger']}"] if o["logger"] else []
    paths = [f"out_dir={R}", f"hydra_dir={H}"]
    S: list[Stage] = []

    def exp(app: str, name: str) -> list[str]:
        """The experiment conf/experiment/<app>/<name>.yaml, or its toy scale <name>_quick.yaml (quick=true)."""
        return [f"experiment={app}/{name}{'_quick' if q else ''}"]

    def toy(app: str) -> list[str]:
        """Apps whose defaults are the study's scale: the toy experiment only with quick=true."""
        return [f"experiment={app}/{app}_quick"] if q else []

    def sweep(name: str, what: str, app: str, experiment: str, *extra: str) -> Stage:
        return Stage(name, what, f"benchmarks.{app}", ["-m", *exp(app, experiment), *extra, *paths, *lg],
                     self_skipping=True)

    def resumable(study: str) -> list[str]:
        """A fixed sweep folder + resume=true: a rerun continues interrupted runs from their last checkpoint and
        finished ones end at once. force=true: a fresh (timestamped) sweep folder, everything trained again."""
        return [] if o["force"] else [f"hydra.sweep.dir={H}/train/{study}/reproduce", "resume=true"]

    # 1. the per-layer table (figure 1, README)
    c = composed("table", toy("table"))
    stem = R / "table" / f"{c.model.name}_b{c.batch_size}_{c.img_size}px"
    S.append(Stage("table", "per-layer table + saved bytes per preset (fig. 1, README)", "benchmarks.table",
                   [*toy("table"), *paths], [Path(f"{stem}_conv_layers.csv"), Path(f"{stem}_saved_bytes.csv")]))

    # 2-4. memory sweeps on meta (figures 2, 3); memory_models has no toy scale
    S.append(sweep("memory_by_op", "saved bytes by op kind, 9 models x 6 presets (fig. 2)", "memory", "memory_by_op"))
    S.append(sweep("memory_batch", "peak vs batch size, ResNet-18/50 (fig. 3)", "memory", "memory_batch"))
    if not q:
        S.append(sweep("memory_models", "step peak, 20 models x 4 presets x 3 batch sizes", "memory", "memory_models"))

    # 5. largest batch per budget (figure 4)
    S.append(sweep("fit", "largest batch per memory budget, 4-80 GiB (fig. 4)", "fit", "fit_models"))

    # 6. step time (figure 8)
    S.append(sweep("speed", "step-time ratio to native on CPU (fig. 8)", "speed", "speed_cpu"))
    S.append(sweep("speed_compiled", "step-time ratio to native, both under torch.compile, CPU (fig. 8)", "speed",
                   "speed_compiled"))

    # 7. whole-set targets: predicted peaks of 5 models x 9 presets at batch 256, step time of every preset (fig. 8),
    # per-layer gradient cosine on one real batch (fig. 7)
    S.append(sweep("whole_set_peak", "whole-set targets: predicted step peak, batch 256", "memory", "whole_set_peak"))
    S.append(sweep("whole_set_speed", "whole-set targets: step time of every preset (fig. 8)", "speed",
                   "whole_set_speed"))
    ex = R / "exactness"
    S.append(Stage("grad_cosine", "per-layer gradient cosine on one real batch (fig. 7)", "benchmarks.exactness",
                   [*exp("exactness", "grad_cosine"), *paths], [ex / "grad_cosine.csv"]))

    # 7b. per-op exactness against native PyTorch (README "Exactness, per op"), self-padding convs, whole-model
    # cosine; about two minutes (quick: the whole-model cosine at one point only)
    S.append(Stage("exactness", "per-op forward/gradient error vs native (README exactness tables)",
                   "benchmarks.exactness", [*toy("exactness"), *paths],
                   [ex / "exactness.csv", ex / "padding.csv", ex / "whole_model.csv"]))

    # 8. memory over one step (figure 9)
    c = composed("timeline", toy("timeline"))
    S.append(Stage("timeline", "memory over one training step, none/pool2/full4 (fig. 9)", "benchmarks.timeline",
                   [*toy("timeline"), *paths], [R / "timeline" / f"{c.model.name}_b{c.batch_size}.csv"]))

    # 9. training: convergence, time-to-accuracy, gradient cosine per epoch (figures 5, 6, 7); the experiment's
    # collect callback writes <out_dir>/train/<name>/
    study = "fmnist_quick" if q else "fmnist_reference"
    out = R / "train" / study
    S.append(Stage("train", "Fashion-MNIST toy study: 5 presets x 2 epochs (figs. 5-7)" if q else
                   "Fashion-MNIST CPU reference study (figs. 5-7)", "benchmarks.train",
                   ["-m", f"experiment=train/{study}", *paths, *resumable(study), *lg],
                   [out / "epochs.csv", out / "summary.csv"]))

    # 10+. paper scale: measured GPU memory, GPU-verified fit, the authors' ImageNet recipe
    if o["paper"]:
        gpu = ["-m", "device=cuda", "model=resnet18,resnet50,efficientnet_b0",
               "compression=none,authors_b1,pool2,pool4,full2,full4", "batch_size=64", "img_size=224"]
        S.append(Stage("gpu_memory", "measured GPU step peak vs prediction, batch 64 (fig. 3 points)",
                       "benchmarks.memory", [*gpu, "sweep=gpu_memory", *paths, *lg], self_skipping=True))
        S.append(Stage("gpu_fit", "largest batch per budget, verified by real OOM searches (fig. 4)",
                       "benchmarks.fit", ["-m", "experiment=fit/fit_models", "device=cuda", "sweep=fit_models_cuda",
                                          *paths, *lg], self_skipping=True))
        if o["data_root"]:
            for study in ("paper_imagenet_resnet18", "paper_imagenet_resnet34", "paper_imagenet_resnet50"):
                out = R / "train" / study
                S.append(Stage(study, "the authors' ImageNet recipe, b = 1, 2, 4 + baselines (figs. 5-7)",
                               "benchmarks.train",
                               ["-m", f"experiment=train/{study}", f"data.root={o['data_root']}", *paths,
                                *resumable(study), *lg],
                               [out / "epochs.csv", out / "summary.csv"]))
    # the memory-accuracy frontier (figure 10): presets x seeds on two architecture families; opt-in (hours)
    if o["study"]:
        for fam in ("resnet18", "mobile"):
            study = f"frontier_{fam}{'_quick' if q else ''}"
            out = R / "train" / "frontier" / study
            S.append(Stage(f"frontier_{fam}", f"memory-accuracy frontier, {fam}: presets x seeds on Fashion-MNIST (fig. 10)",
                           "benchmarks.train", ["-m", f"experiment=train/{study}", *paths, *resumable(study), *lg],
                           [out / "summary.csv", R / "train" / "frontier" / "frontier.csv"]))
    S.append(Stage("figures", "draw every figure from the CSVs", "benchmarks.figures",
                   [f"results={R}", *([] if not q and R.resolve() == (REPO / "results").resolve() else ["readme=none"])]))
    return S


# ------------------------------------------------------------------------------------------ running

def _preload() -> None:
    for m in PRELOAD:
        try:
            __import__(m)
        except ImportError:
            pass


def _run_forked(module: str, args: list[str]) -> int:
    """Run ``python -m module args`` in a fork of this (pre-imported) process; returns its exit status."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: a fresh __main__ run of the app
        code = 0
        try:
            import runpy

            sys.argv = [module, *args]
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
        except BaseException as e:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            code = 130 if isinstance(e, KeyboardInterrupt) else 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _run_subprocess(module: str, args: list[str]) -> int:
    return subprocess.call([sys.executable, "-m", module, *args], cwd=REPO)


class Heartbeat:
    """Prints '[k/n] stage: 3m00s elapsed' every ``every`` seconds while a stage runs."""

    def __init__(self, tag: str, every: float):
        self.tag, self.every, self.t0 = tag, every, time.perf_counter()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.wait(self.every):
            print(f"\n{self.tag}: still running, {fmt_duration(time.perf_counter() - self.t0)} elapsed", file=sys.stderr,
                  flush=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *a):
        self.stop.set()
        self.thread.join()
        return False


def parse(argv: list[str]) -> dict:
    o = parse_kv(argv, dict(quick="false", out="", force="false", stages="", paper="auto", logger="",
                            dry_run="false", fork="true", heartbeat="60", verify="false", reference="", study="false",
                            compare_only="false", **{"data.root": ""}), __doc__)

    res = dict(quick=flag(o, "quick"), force=flag(o, "force"), dry_run=flag(o, "dry_run"),
               fork=flag(o, "fork") and hasattr(os, "fork"), study=flag(o, "study"))
    res["verify"], res["compare_only"] = flag(o, "verify"), flag(o, "compare_only")
    if not res["verify"] and (o["reference"] or res["compare_only"]):
        raise ValueError("reference= and compare_only= belong to verify=true")
    if res["verify"]:
        _verify_paths(o, res)
    res["out"] = Path(o["out"] or ("results-quick" if res["quick"] else "results")).expanduser()
    if not res["out"].is_absolute():
        res["out"] = Path.cwd() / res["out"]
    if res["verify"] and (_inside(res["out"], REPO / "results") or _inside(res["out"], res["reference"])):
        raise ValueError(f"verify never writes into results/ or the reference; out={o['out']} is inside one "
                         f"(default: scratch/verify-<time>/)")
    if res["quick"] and res["out"].resolve() == (REPO / "results").resolve():
        raise ValueError("quick=true never writes into results/; pick another out= (default results-quick/)")
    p = o["paper"].strip().lower()
    if p not in ("auto", "true", "false"):
        raise ValueError(f"paper={o['paper']!r}: use auto, true or false")
    res["data_root"] = o["data.root"] or None
    if res["data_root"] and not Path(res["data_root"]).expanduser().is_dir():
        raise ValueError(f"data.root={res['data_root']}: no such folder (an ImageNet tree with train/ and val/)")
    if p == "auto" and res["quick"]:
        res["paper"] = False
    elif p == "auto":
        import torch

        res["paper"] = torch.cuda.is_available()
    else:
        res["paper"] = p == "true"
    res["logger"] = o["logger"] or ("disabled" if res["quick"] else "")
    if res["logger"] and res["logger"] not in ("offline", "online", "disabled"):
        raise ValueError(f"logger={res['logger']!r}: use offline, online or disabled")
    res["stages"] = [s.strip() for s in o["stages"].split(",") if s.strip()]
    try:
        res["heartbeat"] = float(o["heartbeat"])
    except ValueError:
        raise ValueError(f"heartbeat={o['heartbeat']!r}: seconds between progress lines") from None
    return res


def _inside(p: Path, root: Path | None) -> bool:
    if root is None:
        return False
    p, root = p.resolve(), root.resolve()
    return p == root or root in p.parents


def _verify_paths(o: dict, res: dict) -> None:
    """verify=true: the committed reference to compare with, and a fresh scratch folder for the re-run."""
    ref = Path(o["reference"] or ("results/quick" if res["quick"] else "results")).expanduser()
    res["reference"] = ref if ref.is_absolute() else (Path.cwd() if o["reference"] else REPO) / ref
    if not res["reference"].is_dir():
        raise ValueError(f"reference={res['reference']}: no such folder (the committed results to compare with)")
    if res["compare_only"] and not o["out"]:
        raise ValueError("compare_only=true needs out=<an earlier verify folder>")
    if not o["out"]:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
        o["out"] = str(REPO / "scratch" / f"verify-{'quick-' if res['quick'] else ''}{stamp}")


def main(argv: list[str] | None = None) -> int:
    try:
        o = parse(sys.argv[1:] if argv is None else argv)
    except ValueError as e:
        print(f"reproduce: {e}", file=sys.stderr)
        return 2
    if o["verify"]:
        from .verify import run_verify

        return run_verify(o)
    stages = plan(o)
    names = [s.name for s in stages]
    unknown = [s for s in o["stages"] if s not in names]
    if unknown:
        print(f"reproduce: unknown stage(s) {', '.join(unknown)}; stages here: {', '.join(names)}", file=sys.stderr)
        return 2
    if o["stages"]:
        stages = [s for s in stages if s.name in o["stages"]]
    if o["data_root"] and not o["paper"]:
        print("reproduce: note: data.root given but CUDA is not available: the ImageNet runs need a GPU and are "
              "left out (paper=true forces them)", file=sys.stderr)
    scale = "toy scale (quick)" if o["quick"] else ("paper scale (CUDA)" if o["paper"] else "CPU scale")
    print(f"reproduce: {len(stages)} stages at {scale} into {o['out']}", flush=True)
    if not o["dry_run"]:
        try:
            o["out"].mkdir(parents=True, exist_ok=True)
        except OSError as e:
            print(f"reproduce: cannot create {o['out']} ({e.strerror or e})", file=sys.stderr)
            return 2
        if o["fork"]:
            _preload()
    t_all, started = time.perf_counter(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report = []
    for k, st in enumerate(stages, 1):
        tag = f"[{k}/{len(stages)}] {st.name}"
        if not st.module:
            print(f"\n{tag}: not available ({st.note}); skipped", flush=True)
            report.append((st.name, "n/a", 0.0, st.note))
            continue
        if st.outputs and all(p.is_file() for p in st.outputs) and not o["force"]:
            print(f"\n{tag}: done before ({', '.join(rel_path(p) for p in st.outputs)}); skipped (force=true reruns)",
                  flush=True)
            report.append((st.name, "skipped", 0.0, "outputs exist"))
            continue
        args = list(st.args) + (["force=true"] if o["force"] and st.self_skipping else [])
        cmd = f"python -m {st.module} {' '.join(args)}"
        print(f"\n{'=' * 100}\n{tag} — {st.what}\n  $ {cmd}", flush=True)
        if o["dry_run"]:
            report.append((st.name, "dry run", 0.0, "recorded points are skipped by the app" if st.self_skipping
                           else ""))
            continue
        t0 = time.perf_counter()
        with Heartbeat(tag, o["heartbeat"]):
            rc = (_run_forked if o["fork"] else _run_subprocess)(st.module, args)
        dt = time.perf_counter() - t0
        missing = [p for p in st.outputs if not p.is_file()]
        status = "ok" if rc == 0 and not missing else "FAILED"
        why = f"exit {rc}" if rc else (f"missing {', '.join(rel_path(p) for p in missing)}" if missing else "")
        print(f"{tag}: {status} in {fmt_duration(dt)} {('(' + why + ')') if why else ''}(total {fmt_duration(time.perf_counter() - t_all)})",
              flush=True)
        report.append((st.name, status, dt, why))
    total = time.perf_counter() - t_all
    print(f"\n{'=' * 100}\nreproduce: summary ({scale}, {rel_path(o['out'])}, {fmt_duration(total)} in all)")
    w = max(len(r[0]) for r in report) if report else 5
    for name, status, dt, why in report:
        print(f"  {name:<{w}}  {status:<8} {fmt_duration(dt):>8}  {why}")
    # Only a run that measured something is logged: a rerun that skips every stage (and redraws the figures
    # byte for byte) leaves the committed files as they were.
    if not o["dry_run"] and any(r[1] in ("ok", "FAILED") and r[0] != "figures" for r in report):
        _log_stage_times(o["out"], scale, started, report, total)
    failed = [r[0] for r in report if r[1] == "FAILED"]
    if failed:
        print(f"reproduce: {len(failed)} stage(s) failed: {', '.join(failed)} (rerun: finished work is skipped)",
              file=sys.stderr)
    return 1 if failed else 0


def _log_stage_times(out: Path, scale: str, started: str, report: list, total: float) -> None:
    """Append this run's stage times to ``<out>/logs/reproduce_stages.csv`` (one row per stage + a total row,
    with provenance), so the time a README states is a committed measurement. Earlier runs' rows are kept."""
    import pandas as pd

    from .common import atomic_write_csv, provenance_row

    path = out / "logs" / "reproduce_stages.csv"
    prov = provenance_row("cpu")
    rows = [dict(run_started=started, scale=scale, stage=n, status=st, seconds=round(dt, 1), note=why, **prov)
            for n, st, dt, why in report]
    rows.append(dict(run_started=started, scale=scale, stage="TOTAL", status="", seconds=round(total, 1),
                     note="", **prov))
    try:
        old = pd.read_csv(path) if path.is_file() else None
        df = pd.DataFrame(rows) if old is None else pd.concat([old, pd.DataFrame(rows)], ignore_index=True)
        atomic_write_csv(df, path)
    except (OSError, ValueError) as e:  # a damaged log is left as it is, never overwritten
        print(f"reproduce: could not write {rel_path(path)} ({e})", file=sys.stderr)


def rel_path(p: Path) -> str:
    try:
        return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(p)


if __name__ == "__main__":
    sys.exit(main())
