"""The study's figures and README tables, drawn from the result CSVs alone (entry point: ``benchmarks.figures``)."""
from __future__ import annotations

from collections.abc import Callable

from .frontier import fig10_frontier
from .memory import fig1_layers, fig2_by_kind, fig3_peak_vs_batch, fig4_fit
from .speed import fig8_speed, fig9_timeline
from .training import fig5_convergence, fig6_time_to_accuracy, fig7_cosine

FIGURES: list[tuple[int, str, Callable, str]] = [
    (1, "fig1_layer_table.png", fig1_layers, "per-layer table, ResNet-18 batch 32 (table/*_conv_layers.csv)"),
    (2, "fig2_saved_by_kind.png", fig2_by_kind, "saved bytes by op kind (memory/memory_by_op.csv)"),
    (3, "fig3_peak_vs_batch.png", fig3_peak_vs_batch, "peak vs batch size (memory/memory_batch.csv, memory/gpu_memory.csv, gpu/*.csv)"),
    (4, "fig4_smallest_gpu.png", fig4_fit, "largest batch per GPU budget (fit/fit_models.csv, fit/fit_models_cuda.csv)"),
    (5, "fig5_convergence.png", fig5_convergence, "convergence (train/*/epochs.csv)"),
    (6, "fig6_time_to_accuracy.png", fig6_time_to_accuracy, "time-to-accuracy ratios (train/*/summary.csv)"),
    (7, "fig7_grad_cosine.png", fig7_cosine, "gradient cosine (train/*/grad_cosine.csv or exactness/grad_cosine.csv)"),
    (8, "fig8_step_time.png", fig8_speed, "step-time overhead (speed/speed_cpu.csv, speed_compiled.csv, whole_set_speed.csv)"),
    (9, "fig9_step_timeline.png", fig9_timeline, "memory over one step (timeline/*.csv)"),
    (10, "fig10_frontier.png", fig10_frontier, "memory-accuracy frontier (train/frontier/frontier.csv)"),
]
