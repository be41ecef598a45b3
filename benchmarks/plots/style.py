"""How every figure draws a preset (order, label, colour, marker, line and bar style) and the pyplot setup."""
from __future__ import annotations

MIB, GIB = 2.0**20, 2.0**30

PRESET_ORDER = ["none", "authors_b1", "pool2", "pool4", "pool8", "maxpool2", "pool2_gf", "pool4_gf", "full2", "full4",
                "q8", "q4", "q2", "p2q8", "p2q4", "full_q8", "full_q4", "full_q2", "full_p2q8", "budget0.0625",
                "full_budget0.0625", "full_budget0.08", "ckpt", "int8", "offload"]
PRESET_LABEL = {"none": "none (native PyTorch)", "authors_b1": "authors_b1 (authors' b=1 baseline)",
                "pool2": "pool2 (paper, b=2)", "pool4": "pool4 (paper, b=4)", "pool8": "pool8 (b=8)",
                "full2": "full2 (whole set, b=2)", "full4": "full4 (whole set, b=4)"}
COLORS = {"pool2": "#1f77b4", "pool4": "#ff7f0e", "pool8": "#bcbd22", "maxpool2": "#17becf", "pool2_gf": "#9edae5",
          "pool4_gf": "#ffbb78", "full2": "#2ca02c", "full4": "#d62728", "ckpt": "#7f7f7f", "int8": "#9467bd",
          "offload": "#8c564b", "q8": "#aec7e8", "q4": "#6baed6", "q2": "#3182bd", "p2q8": "#e377c2",
          "p2q4": "#f7b6d2", "full_q8": "#98df8a", "full_q4": "#74c476", "full_q2": "#006d2c", "full_p2q8": "#c51b8a",
          "full_budget0.0625": "#8c6d31", "full_budget0.08": "#e6550d", "budget0.0625": "#bd9e39"}
KIND_ORDER = ["conv input", "norm input", "activation", "pool", "linear input", "mul", "matmul", "attention"]
KIND_COLORS = {"conv input": "#1f77b4", "norm input": "#ff7f0e", "activation": "#2ca02c", "pool": "#d62728",
                "linear input": "#9467bd", "other": "#7f7f7f"}
PHASE_COLORS = {"batch": "#bdbdbd", "forward": "#9ecae1", "backward": "#fdae6b", "optimizer": "#74c476",
                "after step": "#dddddd"}


def preset_key(p: str) -> tuple:
    return (PRESET_ORDER.index(p) if p in PRESET_ORDER else len(PRESET_ORDER), str(p))


def sort_presets(ps) -> list[str]:
    return sorted(set(ps), key=preset_key)


def label(p: str) -> str:
    return PRESET_LABEL.get(p, p)


_MARKERS = {"none": "o", "authors_b1": "s", "pool2": "^", "pool4": "v", "pool8": "<", "maxpool2": ">", "full2": "D",
            "full4": "P", "ckpt": "X", "int8": "*", "offload": "h", "q2": "d", "p2q8": "p", "full_q4": "H",
            "full_q2": "d", "full_p2q8": "p", "full_budget0.0625": "*", "full_budget0.08": "*", "budget0.0625": "*"}


def line_style(p: str) -> dict:
    """Lines: native = black solid, authors' baseline = black dashed, every other preset its own colour."""
    if p == "none":
        return dict(color="black", ls="-", lw=2.2)
    if p == "authors_b1":
        return dict(color="black", ls="--", lw=2.2)
    return dict(color=COLORS.get(p, "#444444"), ls="-", lw=1.6)


def marker(p: str) -> str:
    return _MARKERS.get(p, "o")


def bar_style(p: str) -> dict:
    """Bars: native = solid black, authors' baseline = white with black hatching, others their colour."""
    if p == "none":
        return dict(color="black", edgecolor="black")
    if p == "authors_b1":
        return dict(color="white", edgecolor="black", hatch="///")
    return dict(color=COLORS.get(p, "#444444"), edgecolor="none")


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8.5,
                         "figure.dpi": 110, "savefig.dpi": 110, "axes.grid": True, "grid.alpha": 0.3,
                         "hatch.linewidth": 0.8})
    return plt


def footer(fig, text: str) -> None:
    fig.text(0.995, 0.003, text, ha="right", va="bottom", fontsize=7, color="#666666")

