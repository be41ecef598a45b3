"""actcomp: backpropagation with compressed activations (Barley & Froening, arXiv 2409.11902), for any timm model.

    import actcomp, timm
    model = actcomp.compress(timm.create_model("resnet18"), "pool4")   # the paper's method
    model = actcomp.compress(model, "full4")                           # + every other saved tensor compressed
    actcomp.saved_bytes(model, x).by_kind                              # what backward keeps, by op
"""
from .accounting import SavedReport, conv_table, saved_bytes
from .config import PRESETS, ActcompError, CompressionConfig, as_config, get_preset
from .convert import compress, config_of, plan, restore, summary
from .policy import BudgetPlan, conv_input_fraction, plan_budget

__all__ = [
    "PRESETS", "ActcompError", "BudgetPlan", "CompressionConfig", "SavedReport", "as_config", "compress", "config_of",
    "conv_input_fraction", "conv_table", "get_preset", "plan", "plan_budget", "restore", "saved_bytes",
    "summary",
]
__version__ = "0.1.0"

# Measurement API (adds ~10 ms: timm and MemTracker are imported on first use only).
from .measure import StepMemory, compare_step_times, largest_batch, step_memory  # noqa: E402

__all__ += ["StepMemory", "compare_step_times", "largest_batch", "step_memory"]
