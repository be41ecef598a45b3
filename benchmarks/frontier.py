"""The memory–accuracy frontier: one tidy row per training run of the frontier studies.

    python -m benchmarks.frontier results/train/frontier        # rebuild frontier.csv from the studies below it

A frontier study is a train-app multirun over presets × seeds (``conf/experiment/train/frontier_*.yaml``); its
collect callback writes ``<root>/<study>/{epochs,summary,grad_cosine}.csv`` and then calls :func:`write_frontier`,
which merges every ``<root>/*/summary.csv`` into ``<root>/frontier.csv``: one row per (model, preset, seed) with
final/best val top-1, epochs, wall and CPU time to each fixed target and to the native run's best − 0.5 (same model
and seed), the predicted training-step peak of that model at its batch as a ratio to native, and the predicted peak
of ResNet-50 at batch 256, 224 px for the same preset (meta device) as a ratio to native.
"""
from __future__ import annotations

import math
import sys
from functools import cache
from pathlib import Path

import pandas as pd

from actcomp.errors import one_line

from .common import PROVENANCE_COLS, atomic_write_csv

# The reference point of the memory axis users quote: ImageNet-scale ResNet-50 training at batch 256.
R50 = dict(model="resnet50", batch_size=256, img_size=224)
BASELINE = "none"
RUN_KEYS = ("model", "preset", "seed")


# A budget preset is planned per model: for ResNet-50 on this many random-normal 224 px images (seed 0). The
# plan's byte fraction does not depend on the batch size, so it is applied as planned to the batch-256 prediction.
R50_CALIB_BATCH = 8


@cache
def r50_peak_bytes(preset: str) -> float:
    """Predicted (meta device) training-step peak of ResNet-50, batch 256, 224 px, under ``preset``; NaN for a
    preset name actcomp does not know (e.g. a per-run custom configuration)."""
    import torch

    import actcomp
    from actcomp.models import build_model
    from actcomp.policy import budget_spec, config_for_budget

    spec = budget_spec(preset)
    if spec is not None:
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(R50_CALIB_BATCH, 3, R50["img_size"], R50["img_size"], generator=gen)
        model = build_model(R50["model"], seed=0)
        preset = config_for_budget(model, spec, x)  # seed: the spec's, else plan_budget's default 0
    elif preset not in actcomp.PRESETS:
        return math.nan
    return float(actcomp.step_memory(R50["model"], R50["batch_size"], R50["img_size"], preset=preset).peak_bytes)


def _target_tag(row) -> str:
    if row["target_kind"] == "fixed":
        return f"{row['target']:g}"
    return "native_best_m" + row["target_kind"].split("-", 1)[1]  # baseline_best-0.5 -> native_best_m0.5


def frontier_table(summary: pd.DataFrame, r50: bool = True) -> pd.DataFrame:
    """summary.csv rows (one per run and target, see ``benchmarks.train.collect``) -> one row per run."""
    if summary.empty:
        return pd.DataFrame(columns=list(RUN_KEYS))
    rows = []
    for (model, preset, seed), g in summary.groupby(list(RUN_KEYS), sort=False):
        first = g.iloc[0]
        row = dict(model=model, preset=preset, seed=int(seed), final_val_top1=float(first["final_val_top1"]),
                   best_val_top1=float(first["best_val_top1"]), epochs=int(first["epochs"]),
                   total_time_s=float(first["total_time_s"]), total_cpu_time_s=float(first["total_cpu_time_s"]),
                   peak_mem_mib=float(first["peak_mem_mib"]), peak_mem_source=first["peak_mem_source"])
        for _, t in g.iterrows():
            tag = _target_tag(t)
            if t["target_kind"] != "fixed":
                row[f"target_{tag}"] = float(t["target"])
            row[f"epochs_to_{tag}"] = t["epoch"]
            row[f"time_to_{tag}_s"] = t["time_s"]
            row[f"cpu_time_to_{tag}_s"] = t["cpu_time_s"]
            row[f"epochs_ratio_{tag}"] = t["epochs_ratio"]
        row.update({k: first[k] for k in PROVENANCE_COLS if k in g})
        rows.append(row)
    df = pd.DataFrame(rows)
    # Peak ratio against the native run of the same model and seed (same batch and input size by construction).
    base = df[df["preset"] == BASELINE].set_index(["model", "seed"])["peak_mem_mib"]
    df["peak_ratio"] = [r.peak_mem_mib / base.get((r.model, r.seed), math.nan) for r in df.itertuples()]
    if r50:
        native = r50_peak_bytes(BASELINE)
        df["r50_b256_peak_ratio"] = [r50_peak_bytes(p) / native for p in df["preset"]]
    front = [c for c in ("model", "preset", "seed", "final_val_top1", "best_val_top1", "peak_ratio",
                         "r50_b256_peak_ratio") if c in df]
    tail = [c for c in PROVENANCE_COLS if c in df]
    return df[front + [c for c in df.columns if c not in front and c not in tail] + tail]


def write_frontier(root: str | Path, r50: bool = True) -> Path:
    """Merge ``<root>/*/summary.csv`` into ``<root>/frontier.csv`` (atomically); returns its path."""
    root = Path(root)
    parts = [pd.read_csv(p) for p in sorted(root.glob("*/summary.csv"))]
    parts = [p for p in parts if len(p)]
    if not parts:
        raise FileNotFoundError(f"no {root}/*/summary.csv with rows (run a frontier study first: make study)")
    table = frontier_table(pd.concat(parts, ignore_index=True), r50=r50)
    out = root / "frontier.csv"
    atomic_write_csv(table.sort_values(list(RUN_KEYS), kind="stable"), out)
    return out


def pareto_front(points: pd.DataFrame, x: str, y: str) -> pd.DataFrame:
    """Rows not dominated by another (lower or equal ``x`` and higher or equal ``y``, one strictly), by ``x``."""
    pts = points.sort_values([x, y], ascending=[True, False])
    keep, best = [], -math.inf
    for i, r in pts.iterrows():
        if r[y] > best:
            keep.append(i)
            best = r[y]
    return pts.loc[keep]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m benchmarks.frontier RESULTS_DIR   (e.g. results/train/frontier)", file=sys.stderr)
        return 2
    try:
        out = write_frontier(argv[0])
    except (FileNotFoundError, KeyError, ValueError, pd.errors.ParserError) as e:
        print(f"frontier: {one_line(e, typed=False)}", file=sys.stderr)
        return 2
    print(f"frontier: wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
