"""Figures 8-9: step-time overhead vs native and memory over one training step."""
from __future__ import annotations

import numpy as np
import pandas as pd

from .data import SWEEPS, Missing, Results, default_settings, most_common, provenance_note, sweep_frame
from .style import MIB, PHASE_COLORS, footer, label, line_style, sort_presets


def _compiled(v) -> bool:
    return str(v).strip().lower() in ("true", "1", "1.0")


def one_run_per_point(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (series, mode, preset): for a point measured more than once the newest run (the code and the
    machine as they are now; a rerun with more blocks comes after the one it refines), then the one with more
    blocks. CSV rows are in point order, not time order."""
    bcol = "blocks_run" if "blocks_run" in df else "blocks" if "blocks" in df else None
    df = df.assign(_b=pd.to_numeric(df[bcol], errors="coerce").fillna(0) if bcol else 0)
    return df.sort_values(["date", "_b"] if "date" in df else ["_b"], kind="stable").drop_duplicates(
        subset=["series", "mode", "preset"], keep="last")


def fig8_speed(R: Results, plt):
    """Bars: ratio to native per preset, one colour per model/setting, eager filled and torch.compile'd hatched
    (ratios of compiled vs compiled native); error bars: the ratio's interquartile range over the interleaved
    blocks, where the CSV has it (older CSVs, one block, draw without)."""
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
        return " ".join(b for b in bits if b)

    df["series"] = [series(r) for _, r in df.iterrows()]
    df["mode"] = ["compiled" if _compiled(v) else "eager" for v in df.get("compile", pd.Series(False, df.index))]
    for c in ("ratio_q25", "ratio_q75"):
        df[c] = pd.to_numeric(df[c], errors="coerce") if c in df else np.nan
    df = one_run_per_point(df)
    bcol = "blocks_run" if "blocks_run" in df else "blocks" if "blocks" in df else None
    presets = sort_presets(df["preset"])
    ser = list(dict.fromkeys(df["series"]))  # colour: model and setting
    bars_of = [(s, m) for s in ser for m in ("eager", "compiled") if ((df["series"] == s) & (df["mode"] == m)).any()]
    fig, ax = plt.subplots(figsize=(min(15, max(8, 0.6 * len(presets) * max(1, len(bars_of) / 2) + 3)), 5.6))
    w = 0.85 / len(bars_of)
    cmap = plt.get_cmap("tab10")
    small = 6 if len(bars_of) > 4 else 7 if len(bars_of) > 2 else 8
    for j, (s, mode) in enumerate(bars_of):
        g = df[(df["series"] == s) & (df["mode"] == mode)].set_index("preset").reindex(presets)
        xs = np.arange(len(presets)) + (j - (len(bars_of) - 1) / 2) * w
        v = g["ratio_to_none"].to_numpy(float)
        col = cmap(ser.index(s) % 10)
        if mode == "eager":
            bars = ax.bar(xs, v, w, color=col)
        else:  # compiled: the model's colour, hatched, so eager and compiled of one model sit side by side
            bars = ax.bar(xs, v, w, color="white", edgecolor=col, hatch="....", lw=1.0)
        lo, hi = g["ratio_q25"].to_numpy(float), g["ratio_q75"].to_numpy(float)
        has = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(v)
        if has.any():
            # clipped at 0: a CSV edited by hand (or rounded) may put the median a hair outside its quartiles
            yerr = np.maximum(0, [v[has] - lo[has], hi[has] - v[has]])
            ax.errorbar(xs[has], v[has], yerr=yerr, fmt="none", ecolor="black",
                        elinewidth=0.8, capsize=1.5)
        for b, y, top in zip(bars, v, np.where(has, hi, v)):
            if np.isfinite(y):
                # Two digits: the spread over blocks (and between runs) does not support a third.
                ax.text(b.get_x() + b.get_width() / 2, top, f"{y:.1f}", ha="center", va="bottom", fontsize=small)
        for x, p, y in zip(xs, presets, v):
            if p == "authors_b1" and np.isfinite(y):  # the authors' baseline: hatched, as elsewhere
                ax.bar(x, y, w, color="none", edgecolor="black", hatch="///")
    ax.axhline(1.0, color="black", lw=2)
    from matplotlib.patches import Patch

    handles = [Patch(color=cmap(i % 10), label=s) for i, s in enumerate(ser)]
    modes = set(df["mode"])
    if "eager" in modes:
        handles.append(Patch(facecolor="#999999", label="eager"))
    if "compiled" in modes:
        handles.append(Patch(facecolor="white", edgecolor="#555555", hatch="....",
                             label="torch.compile (vs compiled native)"))
    handles.append(plt.Line2D([], [], color="black", lw=2, label="none (native PyTorch) = 1"))
    ax.set_xticks(range(len(presets)), presets, rotation=30, ha="right")
    for t in ax.get_xticklabels():
        if t.get_text() == "authors_b1":
            t.set_fontweight("bold")
    ax.set_ylabel("training-step time / native step time")
    iters = sorted({int(i) for i in df["iters"].dropna()}) if "iters" in df else []
    blocks = sorted({int(b) for b in pd.to_numeric(df[bcol], errors="coerce").dropna()}) if bcol else []
    steps = f"{'/'.join(map(str, iters))} interleaved steps" if iters else "interleaved steps"
    if blocks and df["ratio_q25"].notna().any():
        per_bar = (f"median over {'/'.join(map(str, blocks))} blocks of {steps}; error bars: interquartile range "
                   f"over blocks")
        if df["ratio_q25"].isna().any():
            per_bar += " (none: one block)"
    else:
        per_bar = f"one median of {steps} per bar"
    ax.set_title(f"Step-time overhead vs native PyTorch (measured, same process; {per_bar})", fontsize=10,
                 pad=8 + 14 * ((len(handles) + 2) // 3))
    top = np.nanmax(np.concatenate([df["ratio_to_none"].to_numpy(float), df["ratio_q75"].to_numpy(float)]))
    ax.set_ylim(0, top * 1.12)
    # Legend above the bars (a corner would hide the labels of the first group).
    ax.legend(handles=handles, fontsize=8.5, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, frameon=False)
    footer(fig, f"{', '.join(sorted(set(df['_source'])))}; {provenance_note(df)}")
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
    footer(fig, f"{'; '.join(R.rel(p) for p in paths)}; {provenance_note(pd.concat(frames, ignore_index=True))}")
    fig.tight_layout(rect=(0, 0.02, 1, 1))
    return fig

