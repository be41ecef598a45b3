"""Whole-set compression targets, measured side by side in one run (predicted peaks, step time, gradient cosine).

    python -m benchmarks.whole_set            # -> results/whole_set/{peak,speed,cosine}.csv and a console report
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
import pandas as pd
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

import actcomp
from actcomp.data import build_data
from actcomp.diagnostics import grad_cosine
from actcomp.memory import build_model, step_memory
from actcomp.provenance import provenance
from actcomp.speed import compare_step_times

from .common import atomic_write_csv, fail

GIB = 2.0**30


def peaks(c, quick: bool) -> pd.DataFrame:
    rows = []
    for model in (["test_resnet", "test_convnext"] if quick else c.models):
        for p in c.presets:
            try:
                m = step_memory(model, 8 if quick else c.batch_size, img_size=64 if quick else c.img_size,
                                preset=p, device="meta", optimizer=c.optimizer)
                rows.append(dict(model=model, preset=p, peak_gib=m.peak_bytes / GIB,
                                 activation_gib=m.breakdown.get("activation", 0) / GIB,
                                 after_forward_gib=m.after_forward_bytes / GIB, status="ok", message=""))
            except (actcomp.ActcompError, RuntimeError, NotImplementedError) as e:  # recorded, run goes on
                rows.append(dict(model=model, preset=p, status="error", message=str(e).splitlines()[0][:200]))
    df = pd.DataFrame(rows)
    base = df[df.preset == "none"].set_index("model")["peak_gib"]
    df["ratio_to_none"] = df.peak_gib / df.model.map(base)
    df["batch_size"], df["img_size"], df["method"] = c.batch_size if not quick else 8, c.img_size if not quick else 64, \
        "memtracker-meta (predicted)"
    return df


def speeds(c, quick: bool) -> pd.DataFrame:
    df = compare_step_times("test_resnet" if quick else c.model, list(c.presets), 4 if quick else c.batch_size,
                            img_size=32 if quick else c.img_size, device="cpu", warmup=1 if quick else c.warmup,
                            iters=2 if quick else c.iters)
    df["model"] = "test_resnet" if quick else c.model
    return df


def cosines(c, quick: bool) -> pd.DataFrame:
    """Per-layer cosine between compressed and exact weight gradients on a real Fashion-MNIST batch.

    Runs with ``c.threads`` torch threads (restored after): the warm-up steps' summation order depends on the
    thread count, and the cosines of the warmed-up model amplify that (up to 0.2 between 1 and 2 threads; at
    a fixed count a re-run gives bitwise the same cosines on the same kind of CPU).
    """
    n = torch.get_num_threads()
    torch.set_num_threads(int(c.get("threads") or n))
    try:
        return _cosines(c, quick)
    finally:
        torch.set_num_threads(n)


def _cosines(c, quick: bool) -> pd.DataFrame:
    torch.manual_seed(0)
    data = build_data("fashion_mnist", image_size=c.img_size, channels=3, resize="pad", subset_train=2048, subset_seed=0)
    loader = torch.utils.data.DataLoader(data.train, batch_size=c.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model = build_model("test_resnet" if quick else c.model, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = iter(loader)
    for _ in range(2 if quick else c.warm_steps):  # leave the fresh init (zero-init last BN gamma: zero grads)
        x, y = next(batches)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    x, y = next(batches)
    rows = []
    for p in c.presets:
        for layer, cos in grad_cosine(model, p, x, y).items():
            rows.append(dict(model="test_resnet" if quick else c.model, preset=p, layer=layer, cosine=cos))
    return pd.DataFrame(rows)


@hydra.main(version_base=None, config_path="../conf", config_name="whole_set")
def main(cfg: DictConfig) -> None:
    out = Path(hydra.utils.to_absolute_path(cfg.out_dir))
    try:
        for p in list(cfg.peak.presets) + list(cfg.speed.presets) + list(cfg.cosine.presets):
            actcomp.get_preset(p)
        out.mkdir(parents=True, exist_ok=True)
        if not out.is_dir() or not _writable(out):
            raise OSError(f"output dir {out} is not writable")
        prov = provenance("cpu")
        results = {"peak": peaks(cfg.peak, cfg.quick), "speed": speeds(cfg.speed, cfg.quick),
                   "cosine": cosines(cfg.cosine, cfg.quick)}
        for name, df in results.items():
            for k, v in {**prov, **({"device": provenance("meta")["device"]} if name == "peak" else {})}.items():
                df[k] = v
            atomic_write_csv(df, out / f"{name}.csv")
    except (actcomp.ActcompError, OSError) as e:
        fail(e)
    report(results)
    print(f"wrote {out}/{{peak,speed,cosine}}.csv")


def _writable(p: Path) -> bool:
    import os

    return os.access(p, os.W_OK)


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
    if any(isinstance(v, float) and math.isnan(v) for v in pk.get("peak_gib", [])):
        print("some peak points failed; see the message column", file=sys.stderr)


if __name__ == "__main__":
    main()
