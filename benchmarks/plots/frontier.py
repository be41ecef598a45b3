"""Figure 10: the memory–accuracy frontier (train/frontier/frontier.csv, written by benchmarks.frontier)."""
from __future__ import annotations

import numpy as np
import pandas as pd

from ..frontier import pareto_front
from .data import Missing, Results, provenance_note
from .style import COLORS, footer, marker, sort_presets

HINT = "run: make study (python -m benchmarks.reproduce study=true)"
NEVER = "epochs_ratio_native_best_m0.5"


def _per_preset(df: pd.DataFrame, x: str) -> pd.DataFrame:
    """Mean and range over seeds of final top-1 and of the epochs ratio to (native best - 0.5), per preset."""
    rows = []
    for p, g in df.groupby("preset", sort=False):
        acc = g["final_val_top1"]
        er = g[NEVER] if NEVER in g else pd.Series(np.nan, index=g.index)
        rows.append(dict(preset=p, x=float(g[x].mean()), acc=float(acc.mean()), acc_lo=float(acc.min()),
                         acc_hi=float(acc.max()), seeds=int(g["seed"].nunique()),
                         # a seed that never reached the target makes the preset's ratio "not reached"
                         epochs_ratio=float(er.mean()) if er.notna().all() else np.nan,
                         reached=int(er.notna().sum())))
    return pd.DataFrame(rows)


def fig10_frontier(R: Results, plt):
    path = R.csvs("train/frontier/frontier.csv", HINT)[0]
    df = R.read(path, ("model", "preset", "seed", "final_val_top1", "peak_ratio"))
    # The memory axis: ResNet-50 at batch 256, 224 px (the scale users size GPUs for) where predicted for every
    # preset, else the trained model's own predicted step peak.
    x = "r50_b256_peak_ratio" if "r50_b256_peak_ratio" in df and df["r50_b256_peak_ratio"].notna().all() else "peak_ratio"
    xlab = ("predicted step peak / native, ResNet-50 batch 256, 224 px" if x == "r50_b256_peak_ratio"
            else "predicted step peak / native (the trained model at its batch)")
    if df[x].isna().all():
        raise Missing(f"{R.rel(path)} has no predicted peak ratios (the studies ran with memory=false)")
    models = list(dict.fromkeys(df["model"]))
    fig, axes = plt.subplots(2, len(models), figsize=(max(9.0, 6.4 * len(models)), 8.6), squeeze=False)
    for j, model in enumerate(models):
        agg = _per_preset(df[df["model"] == model], x)
        if agg.empty:
            raise Missing(f"{R.rel(path)} has no runs of {model}")
        a_acc, a_ep = axes[0, j], axes[1, j]
        missed = 0  # presets that never reached the target, stacked so their labels do not overlap
        for r in agg.itertuples():
            color = "black" if r.preset == "none" else COLORS.get(r.preset, "#444444")
            a_acc.errorbar(r.x, r.acc, yerr=[[r.acc - r.acc_lo], [r.acc_hi - r.acc]], fmt=marker(r.preset),
                           color=color, ms=7, capsize=3, label=f"{r.preset} ({r.seeds} seed{'s' * (r.seeds > 1)})")
            a_acc.annotate(r.preset, (r.x, r.acc), textcoords="offset points", xytext=(5, 4), fontsize=7.5)
            if np.isfinite(r.epochs_ratio):
                a_ep.plot(r.x, r.epochs_ratio, marker(r.preset), color=color, ms=7)
                a_ep.annotate(r.preset, (r.x, r.epochs_ratio), textcoords="offset points", xytext=(5, 4), fontsize=7.5)
            else:
                y = 0.06 + 0.12 * missed
                missed += 1
                a_ep.plot(r.x, y, "x", color=color, ms=8)
                a_ep.annotate(f"{r.preset}: not reached ({r.reached}/{r.seeds} seeds)", (r.x, y),
                              textcoords="offset points", xytext=(6, -3), fontsize=7)
        front = pareto_front(agg, "x", "acc")
        a_acc.step(front["x"], front["acc"], where="post", color="#888888", ls=":", lw=1.5,
                   label="Pareto front (less memory, higher mean accuracy)")
        a_acc.scatter(front["x"], front["acc"], s=160, facecolors="none", edgecolors="#888888", lw=1.2)
        a_acc.set_ylabel("final val top-1, % (mean; bar: min-max over seeds)")
        a_acc.set_title(f"{model}: accuracy vs memory", fontsize=10)
        a_acc.legend(fontsize=7, loc="lower right")
        a_ep.axhline(1.0, color="black", lw=1.2)
        a_ep.set_ylim(0, max(2.0, float(np.nanmax(agg["epochs_ratio"].to_numpy(float), initial=1.0)) * 1.15))
        a_ep.set_ylabel("epochs to (native best - 0.5) / native's (mean over seeds)")
        a_ep.set_title(f"{model}: schedule overhead vs memory (x: never reached)", fontsize=10)
        for a in (a_acc, a_ep):
            a.set_xlabel(xlab)
            a.set_xscale("log", base=2)
    presets = ", ".join(sort_presets(df["preset"]))
    fig.suptitle(f"Memory–accuracy frontier on real Fashion-MNIST ({presets}); memory predicted (meta), "
                 "accuracy and epochs measured", fontsize=11)
    footer(fig, f"{R.rel(path)}; {provenance_note(df)}")
    fig.tight_layout(rect=(0, 0.02, 1, 0.97))
    return fig
