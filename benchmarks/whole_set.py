"""Whole-set compression targets, measured side by side in one run (predicted peaks, step time, gradient cosine).

    python -m benchmarks.whole_set            # -> scratch/whole_set/{peak,speed,cosine}.csv and a console report
    python -m benchmarks.whole_set out_dir=results/whole_set   # the published CSVs (what make reproduce runs)
"""
from __future__ import annotations

import sys
from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

import actcomp
from actcomp.data import build_data
from actcomp.diagnostics import grad_cosine
from actcomp.measure import compare_step_times, step_memory
from actcomp.models import build_model
from actcomp.provenance import provenance
from actcomp.step import train_step

from .common import atomic_write_csv, fail
from .sweep import BenchError, check_block, ensure_writable

GIB = 2.0**30


def peaks(c) -> pd.DataFrame:
    rows = []
    for model in c.models:
        for p in c.presets:
            try:
                m = step_memory(model, c.batch_size, img_size=c.img_size, preset=p, device="meta",
                                optimizer=c.optimizer)
                rows.append(dict(model=model, preset=p, peak_gib=m.peak_bytes / GIB,
                                 activation_gib=m.breakdown.get("activation", 0) / GIB,
                                 after_forward_gib=m.after_forward_bytes / GIB, status="ok", message=""))
            except (actcomp.ActcompError, RuntimeError, NotImplementedError) as e:  # recorded, run goes on
                rows.append(dict(model=model, preset=p, status="error", message=str(e).splitlines()[0][:200]))
    df = pd.DataFrame(rows)
    for col in ("peak_gib", "activation_gib", "after_forward_gib"):  # absent when every point failed
        if col not in df:
            df[col] = float("nan")
    df = df[["model", "preset", "peak_gib", "activation_gib", "after_forward_gib", "status", "message"]]
    base = df[(df.preset == "none") & (df.status == "ok")].set_index("model")["peak_gib"]
    df["ratio_to_none"] = df.peak_gib / df.model.map(base)
    df["batch_size"], df["img_size"], df["method"] = c.batch_size, c.img_size, "memtracker-meta (predicted)"
    return df


def speeds(c) -> pd.DataFrame:
    df = compare_step_times(c.model, list(c.presets), c.batch_size, img_size=c.img_size, device="cpu",
                            warmup=c.warmup, iters=c.iters)
    df["model"] = c.model
    return df


def cosines(c) -> pd.DataFrame:
    """Per-layer cosine between compressed and exact weight gradients on a real Fashion-MNIST batch.

    Runs with ``c.threads`` torch threads (restored after): the warm-up steps' summation order depends on the
    thread count, and the cosines of the warmed-up model amplify that (up to 0.2 between 1 and 2 threads; at
    a fixed count a re-run gives bitwise the same cosines on the same kind of CPU).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(int(c.get("threads") or n))
    try:
        return _cosines(c)
    finally:
        torch.set_num_threads(n)


def _cosines(c) -> pd.DataFrame:
    torch.manual_seed(0)
    data = build_data("fashion_mnist", image_size=c.img_size, channels=3, resize="pad", subset_train=2048, subset_seed=0)
    loader = torch.utils.data.DataLoader(data.train, batch_size=c.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model = build_model(c.model, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = iter(loader)
    for _ in range(c.warm_steps):  # leave the fresh init (zero-init last BN gamma: zero grads)
        x, y = next(batches)
        train_step(model, opt, x, y)
    x, y = next(batches)
    rows = []
    for p in c.presets:
        for layer, cos in grad_cosine(model, p, x, y).items():
            rows.append(dict(model=c.model, preset=p, layer=layer, cosine=cos))
    return pd.DataFrame(rows)


# quick=true: tiny models and sizes for a smoke run. They replace the defaults only: a key given on the command
# line (e.g. peak.models=[resnet18]) keeps the user's value.
QUICK = {"peak.models": ["test_resnet", "test_convnext"], "peak.batch_size": 8, "peak.img_size": 64,
         "speed.model": "test_resnet", "speed.batch_size": 4, "speed.img_size": 32, "speed.warmup": 1,
         "speed.iters": 2, "cosine.model": "test_resnet", "cosine.warm_steps": 2}
_INTS = {"peak.batch_size": 1, "peak.img_size": 1, "speed.batch_size": 1, "speed.img_size": 1, "speed.warmup": 0,
         "speed.iters": 1, "cosine.batch_size": 1, "cosine.img_size": 1, "cosine.warm_steps": 0}


def _given_keys() -> set[str]:
    """Config keys set on the command line (Hydra's task overrides)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = HydraConfig.get().overrides.task
    except (ValueError, ImportError):
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in task}


def effective_config(cfg: DictConfig) -> DictConfig:
    """``cfg`` checked (BenchError, one line), with the quick sizes applied where the user gave none."""
    if not isinstance(cfg.get("quick"), bool):
        raise BenchError(f"quick={cfg.get('quick')!r}: use true or false")
    cfg = cfg.copy()
    if cfg.quick:
        given = _given_keys()
        for key, value in QUICK.items():
            if key not in given:
                OmegaConf.update(cfg, key, value, merge=False)
    for key, lo in _INTS.items():
        v = OmegaConf.select(cfg, key)
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise BenchError(f"{key}={v!r}: must be an integer >= {lo}")
    for key in ("peak.models", "peak.presets", "speed.presets", "cosine.presets"):
        v = OmegaConf.select(cfg, key)
        if not isinstance(v, ListConfig) or not v:
            raise BenchError(f"{key}={v!r}: give a non-empty list, e.g. {key}=[a,b]")
    for p in list(cfg.peak.presets) + list(cfg.speed.presets) + list(cfg.cosine.presets):
        actcomp.get_preset(p)
    for img, presets in ((cfg.peak.img_size, cfg.peak.presets), (cfg.speed.img_size, cfg.speed.presets),
                         (cfg.cosine.img_size, cfg.cosine.presets)):
        for p in presets:
            check_block(img, p)
    return cfg


@hydra.main(version_base=None, config_path="../conf", config_name="whole_set")
def main(cfg: DictConfig) -> None:
    out = Path(hydra.utils.to_absolute_path(cfg.out_dir))
    try:
        cfg = effective_config(cfg)
        ensure_writable(out)
        prov = provenance("cpu")
        results = {"peak": peaks(cfg.peak), "speed": speeds(cfg.speed), "cosine": cosines(cfg.cosine)}
        replaced = [n for n in results if (out / f"{n}.csv").is_file()]
        for name, df in results.items():
            for k, v in {**prov, **({"device": provenance("meta")["device"]} if name == "peak" else {})}.items():
                df[k] = v
            atomic_write_csv(df, out / f"{name}.csv")
    except (actcomp.ActcompError, BenchError, OSError) as e:
        fail(e)
    report(results)
    print(f"wrote {out}/{{peak,speed,cosine}}.csv" + (f" (replacing the earlier {', '.join(replaced)})"
                                                      if replaced else ""))
    failed = int((results["peak"]["status"] != "ok").sum())
    if failed:
        print(f"whole_set: {failed} of {len(results['peak'])} peak points failed (see the message column of "
              f"{out / 'peak.csv'})", file=sys.stderr)
        raise SystemExit(1)


def report(r: dict) -> None:
    pk = r["peak"]
    with pd.option_context("display.width", 160, "display.float_format", "{:.3f}".format):
        print("\n== Predicted peak of one SGD-momentum training step (meta device), GiB and ratio to none ==")
        print(pk.pivot(index="preset", columns="model", values="peak_gib").to_string())
        print(pk.pivot(index="preset", columns="model", values="ratio_to_none").to_string())
        for model, g in pk.groupby("model"):
            ratio = g.set_index("preset")["ratio_to_none"]
            if {"full2", "full4"} <= set(ratio.index):
                print(f"{model}: full4/none = {ratio['full4']:.3f} (target <= 0.333), "
                      f"full2/none = {ratio['full2']:.3f} (target <= 0.4)")
        print("\n== Step time on CPU, interleaved in one process ==")
        print(r["speed"][["preset", "median_s", "images_per_s", "ratio_to_none"]].to_string(index=False))
        cs = r["cosine"].dropna(subset=["cosine"])
        print("\n== Cosine(compressed, exact weight gradient) per layer on a real batch: min / mean ==")
        print(cs.groupby("preset").cosine.agg(["min", "mean"]).to_string())


if __name__ == "__main__":
    main()
