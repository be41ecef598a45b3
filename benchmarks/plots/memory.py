"""Figures 1-4: saved bytes per conv layer and by op kind, peak memory vs batch size, the smallest GPU."""
from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .data import (
    SWEEPS,
    Missing,
    Results,
    budget_cols,
    default_settings,
    lower_bound,
    most_common,
    provenance_note,
    sweep_frame,
)
from .style import COLORS, GIB, KIND_COLORS, MIB, footer, label, line_style, marker, sort_presets

FIG2_MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "efficientnet_b0",
               "mobilenetv3_large_100", "convnext_tiny", "vit_small_patch16_224"]
FIG3_MODELS = ["resnet18", "resnet50"]


def fig1_layers(R: Results, plt):
    paths = R.csvs("table/*_conv_layers.csv", "run: python -m benchmarks.table")
    pref = [p for p in paths if p.name.startswith("resnet18_b32_224px")]
    path = (pref or paths)[0]
    df = R.read(path, ("layer", "weight_mib", "input_mib", "pool2_mib", "pool4_mib"))
    m = re.match(r"(.+)_b(\d+)_(\d+)px_conv_layers\.csv", path.name)
    model, batch, img = (m.group(1), m.group(2), m.group(3)) if m else (str(df["model"].iloc[0]), "?", "?")
    total = df[df["layer"] == "TOTAL"]
    layers = df[df["layer"] != "TOTAL"]
    cols = [("weight_mib", "weights", "#7f7f7f", None), ("input_mib", "saved input (full)", "black", None),
            ("pool2_mib", "2×2 pooled", COLORS["pool2"], None), ("pool4_mib", "4×4 pooled", COLORS["pool4"], None)]
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(13, 5.2), gridspec_kw=dict(width_ratios=[5, 1]))
    x = np.arange(len(layers))
    w = 0.2
    for i, (c, lab, col, _) in enumerate(cols):
        ax.bar(x + (i - 1.5) * w, layers[c], w, label=lab, color=col)
    ax.set_xticks(x, layers["layer"], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("MiB")
    ax.set_title(f"Per conv layer: weights vs the input it saves for backward ({model}, batch {batch}, {img} px, fp32)")
    ax.legend(loc="upper right")
    if len(total):
        t = total.iloc[0]
        vals = [t[c] for c, *_ in cols]
        bars = ax2.bar(range(4), vals, color=[c for _, _, c, _ in cols])
        for b, v in zip(bars, vals):
            ax2.text(b.get_x() + b.get_width() / 2, v, f"{v:.0f}", ha="center", va="bottom", fontsize=8)
        ax2.set_xticks(range(4), [lab for _, lab, _, _ in cols], rotation=60, ha="right", fontsize=8)
        ax2.set_ylabel("MiB")
        ax2.set_title("Total, all convs")
    else:
        ax2.axis("off")
    how = "measured" if "cpu" in str(df.get("device", pd.Series(["cpu"])).iloc[0]).lower() else "predicted"
    footer(fig, f"{how} saved-for-backward bytes; {R.rel(path)}; {provenance_note(df)}")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def fig2_by_kind(R: Results, plt):
    df = sweep_frame(R.read_all(SWEEPS["fig2"], "run: python -m benchmarks.memory -m experiment=memory/memory_by_op",
                                ("model.name", "compression.name", "batch_size", "saved_total_bytes"),
                                skip_lacking=True))
    df = default_settings(df[df["saved_total_bytes"].notna()])
    if df.empty:
        raise Missing("no memory sweep point has saved-by-op columns (saved_by_op=true)")
    models = [m for m in FIG2_MODELS if m in set(df["model"])] or sorted(set(df["model"]))[:9]
    df = df[df["model"].isin(models)]
    batch = 32 if (df["batch_size"] == 32).any() else int(df["batch_size"].min())
    df = df[df["batch_size"] == batch]
    img = int(most_common(df["img_size"])) if "img_size" in df else None
    if img is not None:
        df = df[df["img_size"] == img]
    kinds_all = [c[len("saved_"):-len("_bytes")] for c in df.columns
                 if c.startswith("saved_") and c.endswith("_bytes") and c != "saved_total_bytes"]
    main = [k.replace(" ", "_") for k in ["conv input", "norm input", "activation", "pool", "linear input"]]
    shown = [k for k in main if k in kinds_all]
    df = df.drop_duplicates(subset=["model", "preset"], keep="last")
    n = len(models)
    ncol = 3 if n > 4 else n
    nrow = int(np.ceil(n / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.3 * ncol, 3.3 * nrow + 0.9), squeeze=False)
    for ax, model in zip(axes.flat, models):
        g = df[df["model"] == model].set_index("preset")
        presets = sort_presets(g.index)
        bottom = np.zeros(len(presets))
        for k in shown + ["other"]:
            if k == "other":
                vals = np.array([g.loc[p, "saved_total_bytes"] for p in presets], float) / MIB - bottom
                vals = np.clip(vals, 0, None)
            else:
                vals = np.array([g.loc[p, f"saved_{k}_bytes"] for p in presets], float) / MIB
            name = k.replace("_", " ")
            ax.bar(range(len(presets)), vals, 0.7, bottom=bottom, color=KIND_COLORS.get(name, "#7f7f7f"),
                   label=name if k != "other" else "other (mul, attention, …)")
            bottom += vals
        if "none" in presets:
            ref = bottom[presets.index("none")]
            for i, tot in enumerate(bottom):
                ax.text(i, tot, f"{tot / ref * 100:.0f}%", ha="center", va="bottom", fontsize=7.5)
        ax.set_xticks(range(len(presets)), presets, fontsize=8)
        for t in ax.get_xticklabels():
            if t.get_text() in ("none", "authors_b1"):
                t.set_fontweight("bold")
        ax.set_ylim(0, bottom.max() * 1.15 if len(bottom) else 1)
        ax.set_title(model, fontsize=10)
        ax.set_ylabel("saved for backward, MiB")
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    h, lab = axes.flat[0].get_legend_handles_labels()
    height = 3.3 * nrow + 0.6
    fig.legend(h, lab, loc="lower center", bbox_to_anchor=(0.5, 0.35 / height), ncol=len(lab), frameon=False)
    src = ", ".join(sorted(set(df["_source"])))
    predicted = (df.get("saved_device", pd.Series(["meta"])).astype(str) == "meta").all()
    how = "predicted on meta" if predicted else "measured/predicted (see saved_device)"
    fig.suptitle(f"Where the saved-for-backward bytes go, by op kind — {'predicted (meta device)' if predicted else how}"
                 f" (batch {batch}, {img} px, fp32; bar labels: % of native `none`)", fontsize=11)
    footer(fig, f"{how}; {src}; {provenance_note(df)}")
    fig.tight_layout(rect=(0, 0.75 / height, 1, 1 - 0.15 / height))
    return fig


def _measured_gpu(R: Results) -> pd.DataFrame:
    """Measured GPU step peaks: results/gpu/*.csv and the gpu_memory sweep's points with method 'cuda'."""
    frames = []
    for pattern in SWEEPS["fig3_gpu"]:
        for p in sorted(R.root.glob(pattern)):
            try:
                df = sweep_frame(pd.read_csv(p))
            except (OSError, ValueError, pd.errors.ParserError):
                continue
            if "method" in df and "peak_bytes" in df and {"model", "preset", "batch_size"} <= set(df.columns):
                df = df[df["method"].astype(str) == "cuda"]
                if len(df):
                    df["_source"] = R.rel(p)
                    frames.append(df)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def fig3_peak_vs_batch(R: Results, plt):
    df = sweep_frame(R.read_all(SWEEPS["fig3"], "run: python -m benchmarks.memory -m experiment=memory/memory_batch",
                                ("model.name", "compression.name", "batch_size", "peak_bytes", "method"),
                                skip_lacking=True))
    pred = default_settings(df[df["method"].astype(str).str.startswith("memtracker-meta")])
    if pred.empty:
        raise Missing("no predicted (device=meta) points in the memory sweeps")
    models = [m for m in FIG3_MODELS if m in set(pred["model"])]
    if not models:
        models = list(pred.groupby("model")["batch_size"].nunique().sort_values(ascending=False).index[:2])
    gpu = _measured_gpu(R)
    big = pred[pred["model"].isin(models)]["peak_bytes"].max() >= GIB
    unit, div = ("GiB", GIB) if big else ("MiB", MIB)
    fig, axes = plt.subplots(1, len(models), figsize=(6.2 * len(models), 4.8), squeeze=False)
    for ax, model in zip(axes.flat, models):
        g = pred[pred["model"] == model]
        img = int(most_common(g["img_size"]))
        g = g[g["img_size"] == img].drop_duplicates(subset=["preset", "batch_size"], keep="last")
        for p in sort_presets(g["preset"]):
            s = g[g["preset"] == p].sort_values("batch_size")
            ax.plot(s["batch_size"], s["peak_bytes"] / div, marker=marker(p), ms=5, label=f"{label(p)}, predicted",
                    **line_style(p))
        if len(gpu):
            mg = gpu[(gpu["model"] == model) & (gpu["img_size"] == img)] if "img_size" in gpu else gpu[
                gpu["model"] == model]
            for p in sort_presets(mg["preset"]):
                s = mg[mg["preset"] == p]
                st = line_style(p)
                ax.scatter(s["batch_size"], s["peak_bytes"] / div, marker="X", s=70, color=st["color"],
                           edgecolor="black" if p not in ("none", "authors_b1") else "white", zorder=5,
                           label=f"{p}, measured on GPU (max_memory_allocated)")
        ax.set_xscale("log", base=2)
        bs = sorted(g["batch_size"].unique())
        ax.set_xticks(bs, [str(b) for b in bs])
        ax.minorticks_off()
        ax.set_xlabel("batch size")
        ax.set_ylabel(f"peak memory of one training step, {unit}")
        ax.set_title(f"{model}, {img} px, fp32, SGD momentum")
        ax.legend(loc="upper left")
    meas = f"; measured GPU points from {', '.join(sorted(set(gpu['_source'])))}" if len(gpu) else \
        f"; no measured GPU points ({R.rel(R.root / 'gpu')}/ has none)"
    fig.suptitle("Peak training-step memory vs batch size: predicted on the meta device (lines)"
                 + (", measured on a GPU (×)" if len(gpu) else ""), fontsize=11)
    drawn = pd.concat([pred[pred["model"].isin(models)], gpu[gpu["model"].isin(models)] if len(gpu) else gpu])
    footer(fig, f"{', '.join(sorted(set(pred['_source'])))}{meas}; {provenance_note(drawn)}")
    fig.tight_layout(rect=(0, 0.02, 1, 0.95))
    return fig



def fig4_fit(R: Results, plt):
    df = sweep_frame(R.read_all(SWEEPS["fig4"], "run: python -m benchmarks.fit -m experiment=fit/fit_models",
                                ("model.name", "compression.name")))
    budgets = budget_cols(df, "max_batch_")
    if not budgets or df.empty:
        raise Missing("the fit CSVs have no ok points with max_batch_<N>gib columns")
    df = default_settings(df)
    if df.empty:
        raise Missing("the fit CSVs hold no point at the default settings (fp32, no AMP, NCHW, SGD)")
    img = int(most_common(df["img_size"])) if "img_size" in df else None
    if img is not None:
        df = df[df["img_size"] == img]
    df = df.drop_duplicates(subset=["model", "preset"], keep="last")
    models = list(dict.fromkeys(df["model"]))
    rows = [(m, p) for m in models for p in sort_presets(df[df["model"] == m]["preset"])]
    vals = np.array([[df[(df.model == m) & (df.preset == p)][c].iloc[0] for c, _ in budgets] for m, p in rows], float)
    capped = np.array([[lower_bound(df[(df.model == m) & (df.preset == p)].iloc[0], c) for c, _ in budgets]
                       for m, p in rows], bool).reshape(vals.shape)
    verified = budget_cols(df, "verified_batch_")
    ver = {}
    if verified:
        for i, (m, p) in enumerate(rows):
            r = df[(df.model == m) & (df.preset == p)].iloc[0]
            for j, (_c, g) in enumerate(budgets):
                vc = [vc for vc, vg in verified if vg == g]
                if vc and pd.notna(r[vc[0]]):
                    ver[i, j] = int(r[vc[0]])
    fig, ax = plt.subplots(figsize=(1.05 * len(budgets) + 4.2, 0.3 * len(rows) + 1.6))
    shown = np.log2(np.where(vals > 0, vals, 0.5))
    im = ax.imshow(shown, aspect="auto", cmap="viridis")
    for i in range(len(rows)):
        for j in range(len(budgets)):
            v = vals[i, j]
            txt = "—" if not np.isfinite(v) else ("0" if v == 0 else f"{'≥' if capped[i, j] else ''}{int(v)}")
            if (i, j) in ver:
                txt += f" / {ver[i, j]}"
            ax.text(j, i, txt, ha="center", va="center", fontsize=7.5,
                    color="white" if shown[i, j] < np.nanmean(shown) else "black")
    ax.set_xticks(range(len(budgets)), [f"{g:g} GiB" if g >= 1 else f"{g * 1024:g} MiB" for _, g in budgets])
    ax.set_yticks(range(len(rows)), [f"{m}  ·  {p}" for m, p in rows], fontsize=8)
    for t, (_m, p) in zip(ax.get_yticklabels(), rows):
        if p in ("none", "authors_b1"):
            t.set_fontweight("bold")
    for i in range(1, len(rows)):
        if rows[i][0] != rows[i - 1][0]:
            ax.axhline(i - 0.5, color="white", lw=2)
    ax.grid(False)
    ax.set_xlabel("GPU memory budget")
    cb = fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    lo, hi = np.floor(np.nanmin(shown)), np.ceil(np.nanmax(shown))
    ticks = np.arange(lo, hi + 1, max(1, int((hi - lo) // 6) or 1))
    cb.set_ticks(ticks, labels=[f"{2 ** t:g}" for t in ticks])
    cb.set_label("largest batch (log colour scale)")
    what = "predicted on meta" + (" / verified by a real OOM search on the GPU" if ver else "") + (
        "; ≥: search ceiling max_batch reached, a lower bound" if capped.any() else "")
    ax.set_title(f"Smallest GPU: largest batch whose training step fits each budget ({img} px, fp32, SGD; {what})",
                 fontsize=10)
    footer(fig, f"{', '.join(sorted(set(df['_source'])))}; {provenance_note(df)}")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig

