"""Figures 5-7 from the training studies: convergence, time-to-accuracy, gradient cosine."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .data import Missing, Results, most_common, provenance_note
from .style import footer, label, line_style, marker, sort_presets


def _train_studies(R: Results, name: str, hint: str) -> list[tuple[str, Path]]:
    paths = R.csvs(f"train/**/{name}", hint)
    return [(p.parent.name if p.parent != R.root / "train" else "train", p) for p in paths]


def _study_frames(R: Results, name: str, need: tuple[str, ...], hint: str):
    """(study label, frame, path) per study folder and model (a study that trained several models: one each)."""
    out = []
    for study, path in _train_studies(R, name, hint):
        df = R.read(path, need)
        if "model" in df and df["model"].nunique() > 1:
            out += [(f"{study} [{m}]", g.copy(), path) for m, g in df.groupby("model", sort=False)]
        else:
            out.append((study, df, path))
    return out


def _study_title(study: str, df: pd.DataFrame) -> str:
    bits = [study]
    for col, fmt in (("model", "{}"), ("data", "{}"), ("image_size", "{} px"), ("n_train", "{} train images")):
        if col in df and df[col].notna().any():
            bits.append(fmt.format(most_common(df[col].dropna())))
    return ", ".join(str(b) for b in bits)


def fig5_convergence(R: Results, plt):
    from matplotlib.ticker import MaxNLocator

    studies = _study_frames(R, "epochs.csv", ("preset", "epoch", "val_top1", "elapsed_s"),
                            "run: python -m benchmarks.train -m experiment=train/fmnist_reference")
    fig, axes = plt.subplots(len(studies), 2, figsize=(12, 4.3 * len(studies)), squeeze=False)
    srcs, notes = [], []
    for (study, df, path), (a1, a2) in zip(studies, axes):
        srcs.append(R.rel(path))
        notes.append(provenance_note(df))
        for p in sort_presets(df["preset"]):
            g = df[df["preset"] == p]
            by = g.groupby("epoch").agg(acc=("val_top1", "mean"), lo=("val_top1", "min"), hi=("val_top1", "max"),
                                        t=("elapsed_s", "mean")).reset_index()
            seeds = g["seed"].nunique() if "seed" in g else 1
            st = line_style(p)
            lab = label(p) + (f" (mean of {seeds} seeds)" if seeds > 1 else "")
            a1.plot(by["epoch"], by["acc"], marker=marker(p), ms=4, label=lab, **st)
            a2.plot(by["t"] / 60, by["acc"], marker=marker(p), ms=4, label=lab, **st)
            if seeds > 1:
                a1.fill_between(by["epoch"], by["lo"], by["hi"], color=st["color"], alpha=0.12)
        a1.set_xlabel("epoch")
        a2.set_xlabel("wall time since start of training, min (train + eval)")
        for a in (a1, a2):
            a.set_ylabel("validation top-1, %")
        a1.set_title(f"Convergence by epoch — {_study_title(study, df)}", fontsize=10)
        a2.set_title("Convergence by wall time (measured on " + str(most_common(df["device_name"]))
                     + ")" if "device_name" in df else "Convergence by wall time (measured)", fontsize=10)
        top, lo = df["val_top1"].max(), df["val_top1"].min()
        for a in (a1, a2):
            a.set_ylim(max(0.0, lo - 2), min(100.0, top + 2))
        a1.xaxis.set_major_locator(MaxNLocator(integer=True))
        a1.legend(loc="lower right")
    footer(fig, f"{'; '.join(dict.fromkeys(srcs))}; {'; '.join(sorted(set(notes)))}")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def fig6_time_to_accuracy(R: Results, plt):
    studies = _study_frames(R, "summary.csv", ("preset", "target", "target_kind", "epochs_ratio", "time_ratio"),
                            "run: python -m benchmarks.train -m experiment=train/fmnist_reference")
    metrics = [("epochs_ratio", "epochs to target / baseline's"), ("time_ratio", "wall time to target / baseline's"),
               ("cpu_time_ratio", "CPU time to target / baseline's")]
    fig, axes = plt.subplots(len(studies), 3, figsize=(15, 4.6 * len(studies)), squeeze=False)
    srcs, notes = [], []
    for (study, df, path), row in zip(studies, axes):
        srcs.append(R.rel(path))
        notes.append(provenance_note(df))
        base = str(df["baseline"].iloc[0]) if "baseline" in df else "none"
        df["tlabel"] = [f"{t:g}%" if k == "fixed" else f"{t:.1f}% (base best−{k.split('-')[-1]})"
                        for t, k in zip(df["target"], df["target_kind"])]
        df["_ord"] = df["target_kind"] != "fixed"  # fixed targets first, then "baseline best - delta"
        targets = list(dict.fromkeys(df.sort_values(["_ord", "target"])["tlabel"]))
        presets = sort_presets(df["preset"])
        cmap = plt.get_cmap("viridis")
        for ax, (col, ylab) in zip(row, metrics):
            if col not in df:
                ax.axis("off")
                continue
            w = 0.8 / max(len(targets), 1)
            for j, t in enumerate(targets):
                for i, p in enumerate(presets):
                    s = df[(df["preset"] == p) & (df["tlabel"] == t)]
                    v = float(s[col].mean()) if len(s) else np.nan
                    x = i + (j - (len(targets) - 1) / 2) * w
                    color = cmap(j / max(len(targets) - 1, 1))
                    hatch = "///" if p == "authors_b1" else None
                    if np.isfinite(v):
                        ax.bar(x, v, w, color=color, edgecolor="black" if hatch else "none", hatch=hatch,
                               label=t if i == 0 else None)
                        ax.text(x, v, f"{v:.2f}", rotation=90, ha="center", va="bottom", fontsize=6.5)
                    else:
                        ax.bar(x, 0, w, color=color, label=t if i == 0 else None)
                        ax.text(x, 0.02, "not reached", rotation=90, ha="center", va="bottom", fontsize=7)
            ax.axhline(1.0, color="black", lw=1.5, label=f"baseline `{base}` = 1")
            ax.set_xticks(range(len(presets)), presets, rotation=30, ha="right")
            for t in ax.get_xticklabels():
                if t.get_text() in ("none", "authors_b1"):
                    t.set_fontweight("bold")
            ax.set_ylabel(ylab + " (ratio)")
        row[-1].legend(title="target val top-1", loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7.5)
        for ax in row:
            ax.set_ylim(0, max(ax.get_ylim()[1], 1.0) * 1.12)
        row[1].set_title(f"Time-to-accuracy / schedule overhead vs `{base}` — {_study_title(study, df)}",
                         fontsize=10)
    footer(fig, f"{'; '.join(dict.fromkeys(srcs))}; {'; '.join(sorted(set(notes)))}")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def fig7_cosine(R: Results, plt):
    try:
        studies = [(s, p) for s, p in _train_studies(R, "grad_cosine.csv", "") if _nonempty(p)]
    except Missing:
        studies = []
    if studies:
        return _fig7_epochs(R, plt, studies)
    try:
        df = R.read(R.csvs("exactness/grad_cosine.csv", "")[0], ("preset", "layer", "cosine"))
    except Missing:
        raise Missing(f"neither {R.rel(R.root)}/train/*/grad_cosine.csv (train with grad_cosine=true) nor "
                      f"{R.rel(R.root)}/exactness/grad_cosine.csv (run: python -m benchmarks.exactness "
                      f"experiment=exactness/grad_cosine)") from None
    presets = sort_presets(df["preset"])
    layers = list(dict.fromkeys(df["layer"]))
    mat = np.array([[df[(df.preset == p) & (df.layer == layer)]["cosine"].mean() for layer in layers]
                    for p in presets], float)
    fig, ax = plt.subplots(figsize=(max(8.0, 0.55 * len(layers) + 2.5), 0.42 * len(presets) + 2.4))
    im = ax.imshow(mat, aspect="auto", cmap="RdYlGn", vmin=min(0.0, float(np.nanmin(mat))), vmax=1.0)
    for i in range(len(presets)):
        for j in range(len(layers)):
            v = mat[i, j]
            ax.text(j, i, "nan" if not np.isfinite(v) else f"{v:.2f}", ha="center", va="center", fontsize=6.5)
    ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7.5)
    ax.set_yticks(range(len(presets)), [label(p) for p in presets], fontsize=8)
    for t in ax.get_yticklabels():
        if t.get_text().startswith(("none", "authors_b1")):
            t.set_fontweight("bold")
    ax.grid(False)
    ax.set_xlabel("layer (weight gradient), input to output")
    cb = fig.colorbar(im, ax=ax, fraction=0.03, pad=0.01)
    cb.set_label("cosine(compressed, exact weight gradient)")
    model = most_common(df["model"]) if "model" in df else ""
    ax.set_title(f"Per-layer gradient cosine vs exact, on one real Fashion-MNIST batch, {model} — from "
                 f"exactness/grad_cosine.csv (no per-epoch training log found)", fontsize=10)
    footer(fig, f"measured on CPU; {R.rel(R.root / 'exactness/grad_cosine.csv')}; {provenance_note(df)}")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def _nonempty(p: Path) -> bool:
    try:
        return len(pd.read_csv(p)) > 0
    except (OSError, ValueError, pd.errors.ParserError):
        return False


def _fig7_epochs(R: Results, plt, studies):
    frames = []
    for study, path in studies:
        d = R.read(path, ("preset", "epoch", "layer", "cosine"))
        d["_study"] = study
        frames.append(d)
    df = pd.concat(frames, ignore_index=True)
    df = df[df["preset"] != "none"]  # native vs itself is 1 by construction
    keys = [(s, p) for s in dict.fromkeys(df["_study"]) for p in sort_presets(df[df["_study"] == s]["preset"])]
    if not keys:
        raise Missing("grad_cosine.csv holds only the native run")
    ncol = min(3, len(keys))
    nrow = int(np.ceil(len(keys) / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(5 * ncol, 3.8 * nrow + 0.7), squeeze=False, sharey=True,
                             layout="constrained")
    import matplotlib as mpl
    from matplotlib.ticker import MaxNLocator

    for ax, (study, p) in zip(axes.flat, keys):
        g = df[(df["_study"] == study) & (df["preset"] == p)]
        layers = list(dict.fromkeys(g["layer"]))
        cmap = mpl.colormaps["plasma"]
        for k, layer in enumerate(layers):
            s = g[g["layer"] == layer].groupby("epoch")["cosine"].mean()
            ax.plot(s.index, s.values, color=cmap(k / max(len(layers) - 1, 1)), lw=1, alpha=0.8)
        m = g.groupby("epoch")["cosine"].mean()
        ax.plot(m.index, m.values, color="black", lw=2.2, ls="--" if p == "authors_b1" else "-", label="mean of layers")
        ax.set_title(f"{label(p)} ({study})", fontsize=10)
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("cosine(compressed, exact weight grad)")
        ax.legend(loc="lower left", fontsize=7.5)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    sm = mpl.cm.ScalarMappable(cmap=mpl.colormaps["plasma"], norm=mpl.colors.Normalize(0, 1))
    cb = fig.colorbar(sm, ax=axes, fraction=0.02, pad=0.01)
    cb.set_label("layer depth (0 = first layer, 1 = last)")
    fig.suptitle("Per-layer gradient cosine similarity vs epoch, from the training logs (measured, fixed batch "
                 "each epoch)", fontsize=11)
    footer(fig, "; ".join(b for b in (", ".join(R.rel(p) for _, p in studies), provenance_note(df)) if b))
    return fig

