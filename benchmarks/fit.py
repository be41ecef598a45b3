"""Hydra app: the largest batch that fits each memory budget, for one model x compression.

    python -m benchmarks.fit model=efficientnet_b0 compression=pool4
    python -m benchmarks.fit -m model=resnet18,resnet50,efficientnet_b0 compression=none,authors_b1,pool2,pool4

From the predicted step peak (``actcomp.memory.largest_batches``: exact search on meta, started from a linear estimate). With
device=cuda each answer is also checked by a real out-of-memory search with the allocator capped at the budget
(``verify_largest_batch_cuda``); budgets above the GPU's memory are left unverified. Results:
results/fit/<sweep>.csv, one row per model x compression with a ``max_batch_<N>gib`` column per budget.
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from actcomp.memory import largest_batches, verify_largest_batch_cuda

from .sweep import CONF_DIR, BenchError, check_block, check_common, cli, compression_spec, run_point


def _label(gib) -> str:
    return f"{gib:g}".replace(".", "p") + "gib"


def measure(cfg: DictConfig) -> dict:
    check_common(cfg, batch=False)
    budgets = list(cfg.budgets_gib)
    if not budgets or any(isinstance(g, bool) or not isinstance(g, (int, float)) or g <= 0 for g in budgets):
        raise BenchError(f"budgets_gib={budgets}: give a list of positive numbers (GiB)")
    spec = compression_spec(cfg.compression)
    check_block(cfg.img_size, spec)
    dev = str(cfg.device.name)
    cuda = dev.startswith("cuda")
    kw = dict(optimizer=cfg.optimizer, dtype=cfg.dtype, amp=cfg.amp, channels_last=cfg.channels_last,
              num_classes=cfg.model.num_classes, in_chans=cfg.model.in_chans)
    out = {}
    total = None
    if cuda:
        import torch

        total = torch.cuda.get_device_properties(torch.device(dev)).total_memory
    # The prediction runs on meta for cuda too (a GPU stand-in that allocates nothing).
    found = largest_batches(cfg.model.name, spec, [int(g * 2**30) for g in budgets], img_size=cfg.img_size,
                            device="cpu" if dev == "cpu" else "meta", max_batch=cfg.max_batch, **kw)
    for g, b in zip(budgets, found):
        budget = int(g * 2**30)
        out[f"max_batch_{_label(g)}"] = b
        if cuda and cfg.verify_cuda:
            out[f"verified_batch_{_label(g)}"] = (
                verify_largest_batch_cuda(cfg.model.name, spec, budget, img_size=cfg.img_size, max_batch=cfg.max_batch,
                                          start=max(b, 2), device=dev, **kw) if budget <= total else None)
    return out


@hydra.main(config_path=str(CONF_DIR), config_name="fit", version_base="1.3")
def main(cfg: DictConfig) -> dict:
    return run_point(cfg, measure, tuple(f"max_batch_{_label(g)}" for g in cfg.budgets_gib))


if __name__ == "__main__":
    cli("fit", main)
