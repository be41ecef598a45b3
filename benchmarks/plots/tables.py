"""The README table renderers: one markdown table (or two) from one result CSV."""
from __future__ import annotations

from collections.abc import Callable

import pandas as pd

from .data import budget_cols, lower_bound, sweep_frame
from .style import sort_presets


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
    budgets = budget_cols(df, "max_batch_")
    lines = ["| model | preset | " + " | ".join(f"{g:g} GiB" for _, g in budgets) + " |",
             "|---|---|" + "---|" * len(budgets)]
    for m in dict.fromkeys(df["model"]):
        g = df[df["model"] == m]
        for p in sort_presets(g["preset"]):
            r = g[g["preset"] == p].iloc[-1]
            lines.append(f"| {m} | {p} | " + " | ".join(
                "—" if pd.isna(r[c]) else ("≥" if lower_bound(r, c) else "") + str(int(r[c])) for c, _ in budgets)
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



FRONTIER_TARGET = "native_best_m0.5"  # the schedule target of the frontier: native's best top-1 - 0.5 (same seed)
FRONTIER_LEVELS = (0.5, 0.25, 0.125)  # memory a user can afford, as a fraction of native's peak


def frontier_presets(df: pd.DataFrame) -> pd.DataFrame:
    """frontier.csv -> one row per (model, preset): seeds, memory ratios, final top-1 mean/min/max and its
    difference to native's mean, epochs and CPU time to (native best - 0.5) as ratios to native's (same seed;
    means over seeds; NaN when a seed never reached it), and the whole run's CPU time ratio."""
    ep, cpu = f"epochs_ratio_{FRONTIER_TARGET}", f"cpu_time_to_{FRONTIER_TARGET}_s"
    rows = []
    for model, m in df.groupby("model", sort=False):
        nat = m[m["preset"] == "none"].set_index("seed")
        nat_acc = float(nat["final_val_top1"].mean()) if len(nat) else float("nan")
        for p in sort_presets(m["preset"]):
            g = m[m["preset"] == p]
            acc = g["final_val_top1"]
            base = nat.reindex(g["seed"])
            cpu_r = (g[cpu].to_numpy(float) / base[cpu].to_numpy(float)) if cpu in g else [float("nan")]
            tot_r = g["total_cpu_time_s"].to_numpy(float) / base["total_cpu_time_s"].to_numpy(float)
            er = g[ep] if ep in g else pd.Series(float("nan"), index=g.index)
            rows.append(dict(model=model, preset=p, seeds=len(g), r50=float(g["r50_b256_peak_ratio"].mean())
                             if "r50_b256_peak_ratio" in g else float("nan"), own=float(g["peak_ratio"].mean()),
                             acc=float(acc.mean()), acc_lo=float(acc.min()), acc_hi=float(acc.max()),
                             delta=float(acc.mean()) - nat_acc, reached=int(er.notna().sum()),
                             epochs_ratio=float(er.mean()) if er.notna().all() else float("nan"),
                             cpu_ratio=float(pd.Series(cpu_r).mean()) if er.notna().all() else float("nan"),
                             total_cpu_ratio=float(pd.Series(tot_r).mean())))
    return pd.DataFrame(rows)


def md_frontier(df: pd.DataFrame, rel: str) -> str:
    """The frontier per model, then the pick at each affordable memory level (on ResNet-50 batch 256's peak)."""
    # The reference architecture (the most seeds; ties: the first) leads, and its accuracy decides the pick.
    seeds = df.groupby("model", sort=False)["seed"].nunique()
    order = sorted(seeds.index, key=lambda m: -seeds[m])
    agg = frontier_presets(df)
    agg = agg.sort_values("model", key=lambda s: s.map(order.index), kind="stable")
    nd = lambda v, f: "—" if pd.isna(v) else f.format(v)  # noqa: E731
    first = order[0]
    lines = [f"From `{rel}` (`make study`): final val top-1 as mean (min–max) over seeds; Δ against native's mean; "
             "epochs and CPU time to reach native's best − 0.5 (same seed) as ratios to native's, means over "
             "seeds (“not reached k/n”: only k of n seeds got there); memory: predicted step peak over native's, "
             "for ResNet-50 at batch 256, 224 px and for the trained model at its batch.", ""]
    for model, a in agg.groupby("model", sort=False):
        lines += [f"**{model}**", "",
                  "| preset | seeds | peak, ResNet-50 b256 | peak, this model | final top-1 | Δ top-1 | "
                  "epochs to native best − 0.5 | CPU time to it | CPU time, whole run |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in a.itertuples():
            ep = (nd(r.epochs_ratio, "{:.2f}×") if r.reached == r.seeds
                  else f"not reached {r.reached}/{r.seeds}")
            lines.append(f"| {r.preset} | {r.seeds} | {nd(r.r50, '{:.3f}×')} | {nd(r.own, '{:.3f}×')} | "
                         f"{r.acc:.2f}% ({r.acc_lo:.2f}–{r.acc_hi:.2f}) | {r.delta:+.2f} | {ep} | "
                         f"{nd(r.cpu_ratio, '{:.2f}×')} | {r.total_cpu_ratio:.2f}× |")
        lines.append("")
    ref = agg[agg["model"] == first]
    others = [m for m in dict.fromkeys(agg["model"]) if m != first]
    lines += [f"Which preset to pick for the memory you can afford (ResNet-50 batch-256 peak, predicted), by mean "
              f"final top-1 of {first}:", "",
              "| affordable peak | pick | its peak | Δ top-1, " + " | Δ top-1, ".join([first, *others])
              + f" | epochs ratio, {first} |", "|---|---|---|" + "---|" * (len(others) + 2)]
    for level in FRONTIER_LEVELS:
        fits = ref[(ref["r50"] <= level) & (ref["preset"] != "none")]
        if fits.empty:
            lines.append(f"| ≤ {level:g}× | no studied preset reaches it (lowest: {ref['r50'].min():.3f}×) | — | "
                         + " | ".join("—" for _ in [first, *others]) + " | — |")
            continue
        r = fits.sort_values(["acc", "r50"], ascending=[False, True]).iloc[0]
        deltas = [agg[(agg.model == m) & (agg.preset == r["preset"])]["delta"] for m in [first, *others]]
        ep = nd(r["epochs_ratio"], "{:.2f}×") if r["reached"] == r["seeds"] else f"not reached {r['reached']}/{r['seeds']}"
        lines.append(f"| ≤ {level:g}× | {r['preset']} | {r['r50']:.3f}× | "
                     + " | ".join(f"{d.iloc[0]:+.2f}" if len(d) else "not run" for d in deltas) + f" | {ep} |")
    return "\n".join(lines)
