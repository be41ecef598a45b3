"""Draw every figure of the study from the committed CSVs alone (nothing is run), and refresh the README tables.

    python -m benchmarks.figures                          # results/ -> results/figures/*.png, README.md tables
    python -m benchmarks.figures results=results-quick    # another results root (README left alone)
    python -m benchmarks.figures strict=true only=3,9     # exit 1 if a figure's CSV is missing; some figures only

Options (key=value): ``results`` (results root, default ``results``), ``out`` (default ``<results>/figures``),
``readme`` (``auto``: README.md next to this repo's ``results/`` when that is the root drawn from; a path; or
``none``), ``strict`` (a missing or unreadable CSV is an error, exit status 1; default: a one-line warning and
that figure is skipped), ``only`` (comma-separated figure numbers).

Every number drawn comes from a CSV written by a real run (the apps in ``benchmarks/``); titles say whether a
value is predicted (meta device) or measured (CPU, GPU). The README's blocks between
``<!-- BEGIN <csv path> -->`` and ``<!-- END <csv path> -->`` are re-rendered from that CSV.
"""
from __future__ import annotations

import os
import re
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from .cli import flag, parse_kv

REPO = Path(__file__).resolve().parent.parent
MIB, GIB = 2.0**20, 2.0**30

# ------------------------------------------------------------------------------------------ styles

PRESET_ORDER = ["none", "authors_b1", "pool2", "pool4", "pool8", "maxpool2", "pool2_gf", "pool4_gf", "full2", "full4",
                "ckpt", "int8", "offload"]
PRESET_LABEL = {"none": "none (native PyTorch)", "authors_b1": "authors_b1 (authors' b=1 baseline)",
                "pool2": "pool2 (paper, b=2)", "pool4": "pool4 (paper, b=4)", "pool8": "pool8 (b=8)",
                "full2": "full2 (whole set, b=2)", "full4": "full4 (whole set, b=4)"}
_COLORS = {"pool2": "#1f77b4", "pool4": "#ff7f0e", "pool8": "#bcbd22", "maxpool2": "#17becf", "pool2_gf": "#9edae5",
           "pool4_gf": "#ffbb78", "full2": "#2ca02c", "full4": "#d62728", "ckpt": "#7f7f7f", "int8": "#9467bd",
           "offload": "#8c564b"}
KIND_ORDER = ["conv input", "norm input", "activation", "pool", "linear input", "mul", "matmul", "attention"]
KIND_COLORS = {"conv input": "#1f77b4", "norm input": "#ff7f0e", "activation": "#2ca02c", "pool": "#d62728",
               "linear input": "#9467bd", "other": "#7f7f7f"}
FIG2_MODELS = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "efficientnet_b0",
               "mobilenetv3_large_100", "convnext_tiny", "vit_small_patch16_224"]
FIG3_MODELS = ["resnet18", "resnet50"]
# The sweeps each figure draws (what make reproduce writes); any other CSV in the same folder, e.g. an ad-hoc
# sweep written with out_dir=results, is never drawn.
SWEEPS = {"fig2": "memory/memory_by_op.csv", "fig3": "memory/memory_batch.csv",
          "fig3_gpu": ("gpu/**/*.csv", "memory/gpu_memory.csv"), "fig4": ("fit/fit_models.csv", "fit/fit_models_cuda.csv"),
          "fig8": ("speed/speed_cpu.csv", "speed/whole_set_speed.csv")}
PHASE_COLORS = {"batch": "#bdbdbd", "forward": "#9ecae1", "backward": "#fdae6b", "optimizer": "#74c476",
                "after step": "#dddddd"}


def preset_key(p: str) -> tuple:
    return (PRESET_ORDER.index(p) if p in PRESET_ORDER else len(PRESET_ORDER), str(p))


def sort_presets(ps) -> list[str]:
    return sorted(set(ps), key=preset_key)


def label(p: str) -> str:
    return PRESET_LABEL.get(p, p)


_MARKERS = {"none": "o", "authors_b1": "s", "pool2": "^", "pool4": "v", "pool8": "<", "maxpool2": ">", "full2": "D",
            "full4": "P", "ckpt": "X", "int8": "*", "offload": "h"}


def line_style(p: str) -> dict:
    """Lines: native = black solid, authors' baseline = black dashed, every other preset its own colour."""
    if p == "none":
        return dict(color="black", ls="-", lw=2.2)
    if p == "authors_b1":
        return dict(color="black", ls="--", lw=2.2)
    return dict(color=_COLORS.get(p, "#444444"), ls="-", lw=1.6)


def marker(p: str) -> str:
    return _MARKERS.get(p, "o")


def bar_style(p: str) -> dict:
    """Bars: native = solid black, authors' baseline = white with black hatching, others their colour."""
    if p == "none":
        return dict(color="black", edgecolor="black")
    if p == "authors_b1":
        return dict(color="white", edgecolor="black", hatch="///")
    return dict(color=_COLORS.get(p, "#444444"), edgecolor="none")


# ------------------------------------------------------------------------------------------ reading CSVs

class Missing(Exception):
    """A CSV a figure needs is absent or unusable (one line: what is missing and how to produce it)."""


class Results:
    def __init__(self, root: Path):
        self.root = Path(root)

    def rel(self, p: Path) -> str:
        try:
            return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(p)

    def csvs(self, pattern: str | tuple[str, ...], hint: str) -> list[Path]:
        pats = (pattern,) if isinstance(pattern, str) else pattern
        found = sorted({p for pat in pats for p in self.root.glob(pat) if p.is_file() and not p.name.startswith(".")})
        if not found:
            raise Missing(f"no {' nor '.join(f'{self.rel(self.root)}/{pat}' for pat in pats)} ({hint})")
        return found

    def read(self, path: Path, need: tuple[str, ...] = ()) -> pd.DataFrame:
        try:
            df = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            raise Missing(f"{self.rel(path)} is unreadable: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                          ) from None
        lack = [c for c in need if c not in df.columns]
        if lack:
            raise Missing(f"{self.rel(path)} lacks column(s) {', '.join(lack)}")
        return df

    def read_all(self, pattern: str | tuple[str, ...], hint: str, need: tuple[str, ...] = (), skip_lacking: bool = False
                 ) -> pd.DataFrame:
        """Every CSV matching ``pattern``, concatenated (``_source`` column). ``skip_lacking``: CSVs without the
        ``need`` columns are left out (e.g. peak-only sweeps for the by-op figure) instead of an error."""
        frames, lacking, cols = [], [], set()
        for p in self.csvs(pattern, hint):
            try:
                df = self.read(p, need)
            except Missing as e:
                if not skip_lacking or "lacks column" not in str(e):
                    raise
                lacking.append(self.rel(p))
                cols.update(str(e).rsplit("lacks column(s) ", 1)[-1].split(", "))
                continue
            df["_source"] = self.rel(p)
            frames.append(df)
        if not frames:
            raise Missing(f"{', '.join(lacking)} lack(s) column(s) {', '.join(sorted(cols))} ({hint})")
        return pd.concat(frames, ignore_index=True)


def sweep_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A sweep CSV (benchmarks/sweep.py layout) with short column names; ok points only."""
    df = df.rename(columns={"model.name": "model", "compression.name": "preset", "device.name": "device"})
    if "status" in df:
        df = df[df["status"] == "ok"]
    return df.copy()


def default_settings(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the default training-step settings (fp32, no AMP, NCHW, SGD) where a sweep varied them."""
    for col, val in (("amp", False), ("channels_last", False)):
        if col in df:
            df = df[df[col].astype(str).str.lower() == str(val).lower()]
    if "dtype" in df:
        df = df[df["dtype"].astype(str) == "float32"]
    if "optimizer" in df:
        df = df[df["optimizer"].astype(str) == "sgd"]
    return df


def most_common(s: pd.Series):
    return s.value_counts().index[0]


def provenance_note(df: pd.DataFrame) -> str:
    """Every device, git sha and date among the rows drawn (not the most common one: a figure that mixes runs
    must say so)."""
    def every(col: str, n: int | None = None) -> list[str]:
        return sorted({str(v)[:n] for v in df[col].dropna()}) if col in df else []

    bits = []
    for col in ("device_name", "device"):
        if every(col):
            bits.append(" + ".join(every(col)))
            break
    if every("git_sha"):
        bits.append("git " + ", ".join(every("git_sha")))
    if every("date"):
        bits.append(", ".join(every("date", 10)))
    return ", ".join(bits)


# ------------------------------------------------------------------------------------------ figures

def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8.5,
                         "figure.dpi": 110, "savefig.dpi": 110, "axes.grid": True, "grid.alpha": 0.3,
                         "hatch.linewidth": 0.8})
    return plt


def _footer(fig, text: str) -> None:
    fig.text(0.995, 0.003, text, ha="right", va="bottom", fontsize=7, color="#666666")


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
            ("pool2_mib", "2×2 pooled", _COLORS["pool2"], None), ("pool4_mib", "4×4 pooled", _COLORS["pool4"], None)]
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
    _footer(fig, f"{how} saved-for-backward bytes; {R.rel(path)}; {provenance_note(df)}")
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
    _footer(fig, f"{how}; {src}; {provenance_note(df)}")
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
    _footer(fig, f"{', '.join(sorted(set(pred['_source'])))}{meas}; {provenance_note(drawn)}")
    fig.tight_layout(rect=(0, 0.02, 1, 0.95))
    return fig


def _budget_cols(df: pd.DataFrame, prefix: str) -> list[tuple[str, float]]:
    out = []
    for c in df.columns:
        m = re.fullmatch(prefix + r"(\d+(?:p\d+)?)gib", c)
        if m:
            out.append((c, float(m.group(1).replace("p", "."))))
    return sorted(out, key=lambda t: t[1])


def _lower_bound(row: pd.Series, max_col: str) -> bool:
    """The fit app marks an answer that hit its search ceiling (max_batch) as a lower bound."""
    v = row.get(max_col.replace("max_batch_", "lower_bound_", 1))
    return bool(v) if pd.notna(v) and str(v).lower() not in ("false", "0") else False


def fig4_fit(R: Results, plt):
    df = sweep_frame(R.read_all(SWEEPS["fig4"], "run: python -m benchmarks.fit -m experiment=fit/fit_models",
                                ("model.name", "compression.name")))
    budgets = _budget_cols(df, "max_batch_")
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
    capped = np.array([[_lower_bound(df[(df.model == m) & (df.preset == p)].iloc[0], c) for c, _ in budgets]
                       for m, p in rows], bool).reshape(vals.shape)
    verified = _budget_cols(df, "verified_batch_")
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
    _footer(fig, f"{', '.join(sorted(set(df['_source'])))}; {provenance_note(df)}")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


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
    _footer(fig, f"{'; '.join(dict.fromkeys(srcs))}; {'; '.join(sorted(set(notes)))}")
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
    _footer(fig, f"{'; '.join(dict.fromkeys(srcs))}; {'; '.join(sorted(set(notes)))}")
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
    _footer(fig, f"measured on CPU; {R.rel(R.root / 'exactness/grad_cosine.csv')}; {provenance_note(df)}")
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
    _footer(fig, "; ".join(b for b in (", ".join(R.rel(p) for _, p in studies), provenance_note(df)) if b))
    return fig


def fig8_speed(R: Results, plt):
    frames = []
    for p in [p for pat in SWEEPS["fig8"] for p in sorted(R.root.glob(pat))]:
        d = sweep_frame(R.read(p, ("model.name", "compression.name", "ratio_to_none")))
        d = default_settings(d)
        d["_source"] = R.rel(p)
        frames.append(d)
    if not frames:
        raise Missing(f"no {R.rel(R.root)}/speed/speed_cpu.csv nor speed/whole_set_speed.csv "
                      f"(run: python -m benchmarks.speed -m experiment=speed/speed_cpu)")
    df = pd.concat(frames, ignore_index=True)
    df = df[df["preset"] != "none"]
    if df.empty:
        raise Missing("the speed CSVs hold no point other than none at the default settings "
                      "(fp32, no AMP, NCHW, SGD)")

    def series(r) -> str:
        bits = [str(r.get("model", "?"))]
        if pd.notna(r.get("batch_size", np.nan)):
            bits.append(f"b{int(r['batch_size'])}")
        if pd.notna(r.get("img_size", np.nan)):
            bits.append(f"{int(r['img_size'])}px")
        dev = r.get("device_name", r.get("device", ""))
        bits.append(str(dev).split(":")[0] if pd.notna(dev) else "")
        return " ".join(b for b in bits if b) + f" [{Path(r['_source']).stem}]"

    df["series"] = [series(r) for _, r in df.iterrows()]
    df = df.drop_duplicates(subset=["series", "preset"], keep="last")
    presets = sort_presets(df["preset"])
    ser = list(dict.fromkeys(df["series"]))
    fig, ax = plt.subplots(figsize=(min(14, max(8, 0.6 * len(presets) * max(1, len(ser) / 2) + 3)), 5.4))
    w = 0.85 / len(ser)
    cmap = plt.get_cmap("tab10")
    for j, s in enumerate(ser):
        g = df[df["series"] == s].set_index("preset").reindex(presets)
        xs = np.arange(len(presets)) + (j - (len(ser) - 1) / 2) * w
        bars = ax.bar(xs, g["ratio_to_none"], w, color=cmap(j % 10), label=s)
        for b, v in zip(bars, g["ratio_to_none"]):
            if np.isfinite(v):
                # Two digits: one median of a few steps per bar does not support a third.
                ax.text(b.get_x() + b.get_width() / 2, v, f"{v:.1f}", ha="center", va="bottom",
                        fontsize=7 if len(ser) > 2 else 8)
        for x, p, v in zip(xs, presets, g["ratio_to_none"]):
            if p == "authors_b1" and np.isfinite(v):  # the authors' baseline: hatched, as elsewhere
                ax.bar(x, v, w, color="none", edgecolor="black", hatch="///")
    ax.axhline(1.0, color="black", lw=2, label="none (native PyTorch) = 1")
    ax.set_xticks(range(len(presets)), presets, rotation=30, ha="right")
    for t in ax.get_xticklabels():
        if t.get_text() == "authors_b1":
            t.set_fontweight("bold")
    ax.set_ylabel("training-step time / native step time")
    iters = sorted({int(i) for i in df["iters"].dropna()}) if "iters" in df else []
    per_bar = f"one median of {'/'.join(map(str, iters))} interleaved steps per bar" if iters else \
        "median of interleaved steps"
    ax.set_title(f"Step-time overhead vs native PyTorch (measured, {per_bar}, same process)",
                 pad=8 + 14 * ((len(ser) + 2) // 3))
    ax.set_ylim(0, np.nanmax(df["ratio_to_none"].to_numpy(float)) * 1.1)
    # Legend above the bars (a corner would hide the labels of the first group).
    ax.legend(fontsize=8.5, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    _footer(fig, f"{', '.join(sorted(set(df['_source'])))}; {provenance_note(df)}")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


def fig9_timeline(R: Results, plt):
    paths = R.csvs("timeline/*.csv", "run: python -m benchmarks.timeline")
    frames = [R.read(p, ("preset", "op_index", "phase", "allocated_bytes")) for p in paths]
    heights = []
    for df in frames:
        heights += [4.0, 0.28 * df["preset"].nunique() + 0.2]
    fig, axes = plt.subplots(len(heights), 1, figsize=(12, sum(heights) + 1.0 * len(paths)),
                             gridspec_kw=dict(height_ratios=heights), squeeze=False)
    axes = axes[:, 0]
    for k, (path, df) in enumerate(zip(paths, frames)):
        ax, strip = axes[2 * k], axes[2 * k + 1]
        presets = sort_presets(df["preset"])
        for p in presets:
            g = df[df["preset"] == p].sort_values("op_index")
            st = line_style(p)
            y = g["allocated_bytes"].to_numpy() / MIB
            ax.plot(g["op_index"], y, label=f"{label(p)}: peak {y.max():.0f} MiB, {len(g)} ops",
                    drawstyle="steps-post", **{**st, "lw": st["lw"] * 0.75})
            ipk = int(np.argmax(y))
            ax.plot(g["op_index"].iloc[ipk], y[ipk], marker="v", color=st["color"], ms=8, ls="none")
        # Phase strip: which part of the step each op belongs to, per preset (op counts differ between presets).
        for i, p in enumerate(presets):
            g = df[df["preset"] == p].sort_values("op_index")
            runs = (g["phase"] != g["phase"].shift()).cumsum()
            for _, seg in g.groupby(runs):
                ph = seg["phase"].iloc[0]
                strip.barh(i, seg["op_index"].iloc[-1] + 1 - seg["op_index"].iloc[0], left=seg["op_index"].iloc[0],
                           height=0.8, color=PHASE_COLORS.get(ph, "#cccccc"), edgecolor="none")
        strip.set_yticks(range(len(presets)), presets, fontsize=8)
        strip.invert_yaxis()
        strip.set_xlim(ax.get_xlim())
        strip.grid(False)
        from matplotlib.patches import Patch

        seen = [ph for ph in PHASE_COLORS if ph in set(df["phase"])]
        strip.legend([Patch(color=PHASE_COLORS[ph]) for ph in seen], seen, ncol=len(seen), fontsize=7.5,
                     loc="upper center", bbox_to_anchor=(0.5, -0.35), frameon=False)
        model = most_common(df["model"]) if "model" in df else path.stem
        bs = int(most_common(df["batch_size"])) if "batch_size" in df else "?"
        img = int(most_common(df["img_size"])) if "img_size" in df else "?"
        how = str(most_common(df["method"])) if "method" in df else ""
        strip.set_xlabel("op index within the training step (aten ops in dispatch order)")
        ax.set_ylabel("allocated, MiB")
        ax.set_ylim(bottom=0)
        ax.set_xticklabels([])
        ax.set_title(f"Memory over one training step: {model}, batch {bs}, {img} px, fp32, SGD momentum — {how}",
                     fontsize=10)
        ax.legend(loc="upper right")
    _footer(fig, f"{'; '.join(R.rel(p) for p in paths)}; {provenance_note(pd.concat(frames, ignore_index=True))}")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig


FIGURES: list[tuple[int, str, Callable, str]] = [
    (1, "fig1_layer_table.png", fig1_layers, "per-layer table, ResNet-18 batch 32 (table/*_conv_layers.csv)"),
    (2, "fig2_saved_by_kind.png", fig2_by_kind, "saved bytes by op kind (memory/memory_by_op.csv)"),
    (3, "fig3_peak_vs_batch.png", fig3_peak_vs_batch, "peak vs batch size (memory/memory_batch.csv, memory/gpu_memory.csv, gpu/*.csv)"),
    (4, "fig4_smallest_gpu.png", fig4_fit, "largest batch per GPU budget (fit/fit_models.csv, fit/fit_models_cuda.csv)"),
    (5, "fig5_convergence.png", fig5_convergence, "convergence (train/*/epochs.csv)"),
    (6, "fig6_time_to_accuracy.png", fig6_time_to_accuracy, "time-to-accuracy ratios (train/*/summary.csv)"),
    (7, "fig7_grad_cosine.png", fig7_cosine, "gradient cosine (train/*/grad_cosine.csv or exactness/grad_cosine.csv)"),
    (8, "fig8_step_time.png", fig8_speed, "step-time overhead (speed/speed_cpu.csv, speed/whole_set_speed.csv)"),
    (9, "fig9_step_timeline.png", fig9_timeline, "memory over one step (timeline/*.csv)"),
]


# ------------------------------------------------------------------------------------------ README tables

def _pct(v: float) -> str:
    return "+0.0%" if abs(v) < 0.05 else f"{v:+.1f}%"


def md_saved_bytes(df: pd.DataFrame, rel: str) -> str:
    r0 = df.iloc[0]
    how = "measured on CPU" if "cpu" in str(r0.get("device", "cpu")).lower() else "predicted on meta"
    lines = [f"Whole-model bytes saved for backward, timm {r0['model']}, batch {int(r0['batch_size'])}, "
             f"{int(r0['img_size'])} px, fp32, {how}",
             f"(`python -m benchmarks.table`, `{rel}`):", "",
             "| preset | saved for backward MiB | vs native | vs authors' b=1 |", "|---|---|---|---|"]
    for _, r in df.iterrows():
        lines.append(f"| {r['preset']} | {r['saved_mib']:.1f} | {_pct(r['vs_none_pct'])} | "
                     f"{_pct(r['vs_authors_b1_pct'])} |")
    return "\n".join(lines)


def md_conv_layers(df: pd.DataFrame, rel: str) -> str:
    lines = ["| conv | weights MiB | saved input MiB | 2×2 pooled MiB | 4×4 pooled MiB |", "|---|---|---|---|---|"]
    for _, r in df.iterrows():
        lines.append(f"| {r['layer']} | {r['weight_mib']:.2f} | {r['input_mib']:.2f} | {r['pool2_mib']:.2f} | "
                     f"{r['pool4_mib']:.2f} |")
    return "\n".join(lines)


def md_fit(df: pd.DataFrame, rel: str) -> str:
    df = sweep_frame(df)
    budgets = _budget_cols(df, "max_batch_")
    lines = ["| model | preset | " + " | ".join(f"{g:g} GiB" for _, g in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for m in dict.fromkeys(df["model"]):
        g = df[df["model"] == m]
        for p in sort_presets(g["preset"]):
            r = g[g["preset"] == p].iloc[-1]
            lines.append(f"| {m} | {p} | " + " | ".join(
                "—" if pd.isna(r[c]) else ("≥" if _lower_bound(r, c) else "") + str(int(r[c])) for c, _ in budgets)
                + " |")
    return "\n".join(lines)


def md_train_summary(df: pd.DataFrame, rel: str) -> str:
    base = str(df["baseline"].iloc[0]) if "baseline" in df else "none"
    df = df.copy()
    df["t"] = [f"{t:g}%" if k == "fixed" else f"best−{k.split('-')[-1]} ({t:.1f}%)"
               for t, k in zip(df["target"], df["target_kind"])]

    def cell(s):
        if not len(s) or not bool(s["reached"].iloc[0]):
            return "not reached"
        e, tr = s["epochs_ratio"].iloc[0], s["time_ratio"].iloc[0]
        er = "—" if pd.isna(e) else f"{e:.2f}×"
        return f"ep {int(s['epoch'].iloc[0])} ({er}), {'—' if pd.isna(tr) else f'{tr:.2f}×'} time"

    targets = list(dict.fromkeys(df["t"]))
    lines = [f"| preset (vs `{base}`) | final top-1 | best top-1 | " + " | ".join(targets) + " |",
             "|---|---|---|" + "---|" * len(targets)]
    for p in sort_presets(df["preset"]):
        g = df[df["preset"] == p]
        lines.append(f"| {p} | {g['final_val_top1'].iloc[0]:.2f}% | {g['best_val_top1'].iloc[0]:.2f}% | "
                     + " | ".join(cell(g[g["t"] == t]) for t in targets) + " |")
    return "\n".join(lines)


def _preset_by_model(df: pd.DataFrame, header: Callable[[str], str], cell: Callable[[pd.DataFrame], str]) -> str:
    """A markdown table: one row per preset, one column per model, ``cell`` of that (model, preset) slice."""
    models = list(dict.fromkeys(df["model"]))
    lines = ["| preset | " + " | ".join(header(m) for m in models) + " |", "|---|" + "---|" * len(models)]
    for p in sort_presets(df["preset"]):
        cells = [df[(df.model == m) & (df.preset == p)] for m in models]
        lines.append(f"| {p} | " + " | ".join("—" if s.empty else cell(s) for s in cells) + " |")
    return "\n".join(lines)


def md_peak(df: pd.DataFrame, rel: str) -> str:
    """Step peak (GiB) and its ratio to `none` of the same model, from a memory sweep CSV."""
    df = sweep_frame(df)
    df["peak_gib"] = df["peak_bytes"] / 2.0**30
    df["ratio_to_none"] = df["peak_gib"] / df["model"].map(df[df["preset"] == "none"].set_index("model")["peak_gib"])
    return _preset_by_model(df, str, lambda s: f"{s['peak_gib'].iloc[0]:.2f} GiB ({s['ratio_to_none'].iloc[0]:.2f}×)")


def md_speed(df: pd.DataFrame, rel: str) -> str:
    return _preset_by_model(sweep_frame(df), lambda m: f"{m} step time vs native",
                            lambda s: f"{s['ratio_to_none'].iloc[-1]:.2f}×")


def _rel_err(r) -> str:
    """One gradient's error against native: 'bitwise', or relative L2 (2 significant digits)."""
    if bool(r["bitwise"]):
        return "bitwise"
    v = float(r["rel_l2"])
    pct = v * 100
    if v < 1e-5:
        return f"{pct:.0e}% (rounding)"
    return f"{pct:.0f}%" if pct >= 10 else f"{pct:#.2g}%"


def md_exactness(df: pd.DataFrame, rel: str) -> str:
    """Two tables from results/exactness/exactness.csv: conv presets (weight gradient per input), other ops."""
    r0 = df.iloc[0]
    thr = f", {int(r0['torch_threads'])} torch thread" if "torch_threads" in df else ""
    lines = [f"Measured on CPU, fp32, seed {int(r0['seed'])}{thr} (`python -m benchmarks.exactness`, `{rel}`). "
             "Error = ‖g − g_native‖ / ‖g_native‖ against native PyTorch on the same input and output gradient; "
             "cos = cosine similarity.", ""]
    conv = df[df["op"].str.startswith("conv")]
    if len(conv):
        inputs = list(dict.fromkeys(conv["input"]))
        shapes = dict(zip(conv["input"], conv["shape"]))
        lines += [f"| {conv['op'].iloc[0]}: preset | forward, input grad, bias grad | "
                  + " | ".join(f"weight grad, {i} ({shapes[i]})" for i in inputs) + " |",
                  "|---|---|" + "---|" * len(inputs)]
        for p in dict.fromkeys(conv["preset"]):
            g = conv[conv["preset"] == p]
            rest = g[g["output"] != "weight"]
            exact = "bitwise" if rest["bitwise"].all() else "; ".join(
                f"{o} {_rel_err(r)}" for o, r in zip(rest["output"], rest.to_dict("records")) if not r["bitwise"])
            cells = []
            for i in inputs:
                w = g[(g["input"] == i) & (g["output"] == "weight")]
                if w.empty:
                    cells.append("—")
                    continue
                cells.append(_grad_cell(w.iloc[0]))
            lines.append(f"| {p} | {exact} | " + " | ".join(cells) + " |")
        lines.append("")
    other = df[~df["op"].str.startswith("conv")]
    if len(other):
        presets = list(dict.fromkeys(other["preset"]))
        lines += ["| op | input | forward | " + " | ".join(f"gradients, {p}" for p in presets) + " |",
                  "|---|---|---|" + "---|" * len(presets)]
        for op in dict.fromkeys(other["op"]):
            g = other[other["op"] == op]
            fwd = g[g["output"] == "forward"]
            cells = []
            for p in presets:
                s = g[(g["preset"] == p) & (g["output"] != "forward")]
                cells.append("; ".join(f"{o} {_rel_err(r)}" for o, r in zip(s["output"], s.to_dict("records")))
                             or "—")
            fcell = "bitwise" if fwd["bitwise"].all() else _rel_err(fwd.iloc[fwd["rel_l2"].argmax()])
            lines.append(f"| {op} | {g['input'].iloc[0]} {g['shape'].iloc[0]} | {fcell} | " + " | ".join(cells) + " |")
    return "\n".join(lines).rstrip("\n")


def _grad_cell(r) -> str:
    """A weight-gradient error cell: the error alone when (nearly) exact, else with its cosine."""
    e = _rel_err(r)
    return e if r["bitwise"] or float(r["rel_l2"]) < 1e-5 else f"{e}, cos {r['cosine']:.2f}"


def md_exactness_padding(df: pd.DataFrame, rel: str) -> str:
    """results/exactness/padding.csv: weight-grad error of self-padding convs under pooling, saved bytes vs native."""
    r0 = df.iloc[0]
    w, b = df[df["part"] == "weight_grad"], df[df["part"] == "saved_bytes"]
    wcols = list(dict.fromkeys(zip(w["input"], w["preset"])))
    bcols = list(dict.fromkeys(b["preset"]))
    shapes = dict(zip(df["input"], df["shape"]))
    lines = [f"Measured on CPU, fp32, seed {int(r0['seed'])}, {int(r0['torch_threads'])} torch thread "
             f"(`python -m benchmarks.exactness`, `{rel}`). Weight gradient against native PyTorch (error = relative "
             "L2, cos = cosine); saved = bytes autograd keeps after forward (`actcomp.saved_bytes`, input and conv "
             f"together) relative to native, on {b['input'].iloc[0] if len(b) else '—'} "
             f"({shapes.get(b['input'].iloc[0], '') if len(b) else ''}). Each conv has 32 output channels.", "",
             "| conv | " + " | ".join(f"weight grad, {p}, {i} ({shapes[i]})" for i, p in wcols)
             + " | " + " | ".join(f"saved vs native, {p}" for p in bcols) + " |",
             "|---|" + "---|" * (len(wcols) + len(bcols))]
    for conv in dict.fromkeys(df["conv"]):
        cells = []
        for i, p in wcols:
            s = w[(w["conv"] == conv) & (w["input"] == i) & (w["preset"] == p)]
            if s.empty:
                cells.append("—")
                continue
            cells.append(_grad_cell(s.iloc[0]))
        for p in bcols:
            s = b[(b["conv"] == conv) & (b["preset"] == p)]
            cells.append("—" if s.empty else f"{s['ratio_to_native'].iloc[0]:.3f}×")
        lines.append(f"| {conv} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def md_whole_model(df: pd.DataFrame, rel: str) -> str:
    """results/exactness/whole_model.csv: whole-model gradient cosine per model × preset over batch × image size."""
    r0 = df.iloc[0]
    points = list(dict.fromkeys(zip(df["batch_size"], df["img_size"])))
    inp = {"fashion_mnist": "Fashion-MNIST test images", "noise": "i.i.d. N(0, 1) images"}.get(r0["input"], r0["input"])
    lines = [f"Measured on CPU, fp32, seed {int(r0['seed'])}, {int(r0['torch_threads'])} torch thread "
             f"(`python -m benchmarks.exactness`, `{rel}`): cosine between all parameter gradients concatenated, "
             f"compressed vs native, same random init (pretrained=False, 10 classes) and the same batch of {inp} "
             "(the first `batch` of the test set, resized).", "",
             "| model | preset | " + " | ".join(f"batch {n}, {s} px" for n, s in points) + " |",
             "|---|---|" + "---|" * len(points)]
    for (m, p), g in df.groupby(["model", "preset"], sort=False):
        cells = []
        for n, s in points:
            c = g[(g["batch_size"] == n) & (g["img_size"] == s)]
            cells.append("—" if c.empty else f"{c['cosine'].iloc[0]:.2f}")
        lines.append(f"| {m} | {p} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


README_RENDERERS: list[tuple[str, Callable[[pd.DataFrame, str], str]]] = [
    (r"(.*/)?table/.+_saved_bytes\.csv", md_saved_bytes),
    (r"(.*/)?table/.+_conv_layers\.csv", md_conv_layers),
    (r"(.*/)?fit/[^/]+\.csv", md_fit),
    (r"(.*/)?train/(.+/)?summary\.csv", md_train_summary),
    (r"(.*/)?memory/whole_set_peak\.csv", md_peak),
    (r"(.*/)?speed/[^/]+\.csv", md_speed),
    (r"(.*/)?exactness/exactness\.csv", md_exactness),
    (r"(.*/)?exactness/padding\.csv", md_exactness_padding),
    (r"(.*/)?exactness/whole_model\.csv", md_whole_model),
]
_BLOCK = re.compile(r"(<!-- BEGIN (?P<path>[^>]+?) -->\n)(?P<body>.*?)(\n<!-- END (?P=path) -->)", re.S)


def update_readme(readme: Path, root: Path, warn: Callable[[str], None]) -> int:
    """Re-render every marked block of ``readme`` from its CSV. Returns the number of blocks changed.

    A marker names the CSV as the repository sees it (``results/table/x.csv``); ``results/`` stands for ``root``.
    """
    text = readme.read_text()
    changed = 0

    def sub(m: re.Match) -> str:
        nonlocal changed
        rel = m.group("path").strip()
        render = next((f for pat, f in README_RENDERERS if re.fullmatch(pat, rel)), None)
        if render is None:
            warn(f"README block {rel}: no renderer for this kind of CSV; left as is")
            return m.group(0)
        csv = root / rel[len("results/"):] if rel.startswith("results/") else readme.parent / rel
        if not csv.is_file():
            warn(f"README block {rel}: CSV missing; left as is")
            return m.group(0)
        try:
            body = render(pd.read_csv(csv), rel)
        except (KeyError, ValueError, IndexError, OSError, pd.errors.ParserError) as e:
            warn(f"README block {rel}: cannot render ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
                 f"; left as is")
            return m.group(0)
        if body != m.group("body"):
            changed += 1
        return m.group(1) + body + m.group(4)

    new = _BLOCK.sub(sub, text)
    if new != text:
        tmp = readme.with_name(f".{readme.name}.tmp")
        tmp.write_text(new)
        os.replace(tmp, readme)
    return changed


# ------------------------------------------------------------------------------------------ CLI

def parse_args(argv: list[str]) -> dict:
    opts = parse_kv(argv, dict(results="results", out=None, readme="auto", strict="false", only=""), __doc__)
    opts["strict"] = flag(opts, "strict")
    try:
        opts["only"] = {int(x) for x in opts["only"].split(",") if x.strip()}
    except ValueError:
        raise ValueError(f"only={opts['only']!r}: give figure numbers, e.g. only=1,3") from None
    bad = opts["only"] - {n for n, *_ in FIGURES}
    if bad:
        raise ValueError(f"only: no figure {sorted(bad)}; figures are 1-{len(FIGURES)}")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(argv)
    except ValueError as e:
        print(f"figures: {e}", file=sys.stderr)
        return 2
    root = Path(opts["results"]).expanduser()
    if not root.is_dir():
        print(f"figures: results folder {root} does not exist (run: make reproduce, or make reproduce QUICK=1)",
              file=sys.stderr)
        return 2
    out = Path(opts["out"]).expanduser() if opts["out"] else root / "figures"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        print(f"figures: output folder {out} is not writable ({e.strerror or e})", file=sys.stderr)
        return 2
    plt = _plt()
    R = Results(root)
    t0 = time.perf_counter()
    drawn, skipped, failed = [], [], []
    for num, fname, fn, desc in FIGURES:
        if opts["only"] and num not in opts["only"]:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # tight_layout notes on dense panels
                fig = fn(R, plt)
                fig.savefig(out / fname, bbox_inches="tight")
            plt.close(fig)
            drawn.append(fname)
            print(f"figure {num}: {R.rel(out / fname)}")
        except Missing as e:
            plt.close("all")
            skipped.append(num)
            print(f"figures: {'error' if opts['strict'] else 'warning'}: figure {num} ({desc}) skipped: {e}",
                  file=sys.stderr)
        except Exception as e:  # noqa: BLE001  a bug or an unforeseen CSV: one line, the other figures still drawn
            plt.close("all")
            failed.append(num)
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            print(f"figures: error: figure {num} ({desc}) failed: {type(e).__name__}: {msg}", file=sys.stderr)
    readme = None
    if opts["readme"] == "auto":
        if root.resolve() == (REPO / "results").resolve() and (REPO / "README.md").is_file():
            readme = REPO / "README.md"
    elif opts["readme"].lower() not in ("none", "false", ""):
        readme = Path(opts["readme"]).expanduser()
        if not readme.is_file():
            print(f"figures: readme={readme}: no such file", file=sys.stderr)
            return 2
    if readme is not None:
        warn = lambda m: print(f"figures: warning: {m}", file=sys.stderr)  # noqa: E731
        n = update_readme(readme, root, warn)
        print(f"{readme}: {n} table(s) updated from the CSVs")
    print(f"figures: {len(drawn)} drawn, {len(skipped)} skipped, {len(failed)} failed, into {R.rel(out)} in "
          f"{time.perf_counter() - t0:.1f}s")
    return 1 if failed or (skipped and opts["strict"]) else 0


if __name__ == "__main__":
    sys.exit(main())
