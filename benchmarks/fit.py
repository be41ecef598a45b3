"""Hydra app: the largest batch that fits each memory budget, for one model x compression.

    python -m benchmarks.fit model=efficientnet_b0 compression=pool4
    python -m benchmarks.fit -m model=resnet18,resnet50,efficientnet_b0 compression=none,authors_b1,pool2,pool4

From the predicted step peak (``actcomp.measure.largest_batches``: exact search on meta, started from a linear estimate). With
device=cuda each answer is also checked by a real out-of-memory search with the allocator capped at the budget
(``verify_largest_batch_cuda``); budgets above the GPU's memory are left unverified. With device=cpu the search
allocates for real: budgets above this machine's RAM are left unanswered (noted), and an out-of-memory during
one budget's search keeps the smaller budgets' answers. Results: <out_dir>/fit/<sweep>.csv (out_dir: scratch/,
or results/ for make reproduce), one row per model x compression with a ``max_batch_<N>gib`` column per budget
and ``lower_bound_<N>gib`` (true: the answer hit ``max_batch``, the real largest batch may be larger).
"""
from __future__ import annotations

import os

import hydra
from omegaconf import DictConfig, ListConfig

from actcomp.errors import one_line
from actcomp.measure import largest_batches, verify_largest_batch_cuda

from .hydra_conf import CONF_DIR, VERSION_BASE
from .sweep import (
    BenchError,
    check_block,
    check_common,
    cli,
    compression_spec,
    is_oom,
    run_point,
)

GIB = 2**30


def _label(gib) -> str:
    return f"{gib:g}".replace(".", "p") + "gib"


def budgets_of(cfg: DictConfig) -> list[float]:
    """``budgets_gib`` as a list of positive numbers; BenchError (one line) otherwise."""
    b = cfg.get("budgets_gib")
    budgets = list(b) if isinstance(b, (list, tuple, ListConfig)) else None
    if not budgets or any(isinstance(g, bool) or not isinstance(g, (int, float)) or g <= 0 for g in budgets):
        raise BenchError(f"budgets_gib={b!r}: give a list of positive numbers (GiB), e.g. budgets_gib=[4,8]")
    return budgets


def machine_ram() -> int | None:
    """Physical memory of this machine in bytes (None where the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def measure(cfg: DictConfig) -> dict:
    check_common(cfg, batch=False)
    budgets = budgets_of(cfg)
    mb = cfg.get("max_batch")
    if isinstance(mb, bool) or not isinstance(mb, int) or mb < 1:
        raise BenchError(f"max_batch={mb!r}: must be an integer >= 1")
    if not isinstance(cfg.get("verify_cuda"), bool):
        raise BenchError(f"verify_cuda={cfg.get('verify_cuda')!r}: use true or false")
    spec = compression_spec(cfg.compression)
    check_block(cfg.img_size, spec)
    dev = str(cfg.device.name)
    cuda = dev.startswith("cuda")
    kw = dict(optimizer=cfg.optimizer, dtype=cfg.dtype, amp=cfg.amp, channels_last=cfg.channels_last,
              num_classes=cfg.model.num_classes, in_chans=cfg.model.in_chans)
    total = None
    if cuda:
        import torch

        total = torch.cuda.get_device_properties(torch.device(dev)).total_memory
    found: dict[float, int | None] = {}
    notes = []
    if dev == "cpu":
        # A real search allocates up to ~the budget (more while bracketing): budgets above the RAM cannot be
        # answered here, and an out-of-memory must not cost the smaller budgets' answers.
        ram = machine_ram()
        over = [g for g in budgets if ram is not None and g * GIB > ram]
        if over and len(over) == len(budgets):
            raise BenchError(f"budgets_gib={budgets}: every budget exceeds this machine's "
                             f"{ram / GIB:.1f} GiB of RAM; use device=meta to predict them")
        if over:
            notes.append(f"budgets {over} GiB above this machine's {ram / GIB:.1f} GiB RAM: not searched")
        for g in sorted(set(budgets) - set(over)):
            if any(found.get(h) is None and h in found for h in budgets if h < g):
                found[g] = None  # a smaller budget already ran out of memory
                continue
            try:
                found[g] = largest_batches(cfg.model.name, spec, [int(g * GIB)], img_size=cfg.img_size,
                                           device="cpu", max_batch=cfg.max_batch, **kw)[0]
            except (MemoryError, RuntimeError) as e:
                if not is_oom(e):
                    raise
                found[g] = None
                notes.append(f"{g:g} GiB: out of memory during the search ({one_line(e)[:120]})")
    else:
        # The prediction runs on meta for cuda too (a GPU stand-in that allocates nothing).
        found = dict(zip(budgets, largest_batches(cfg.model.name, spec, [int(g * GIB) for g in budgets],
                                                  img_size=cfg.img_size, device="meta", max_batch=cfg.max_batch,
                                                  **kw)))
    out = {}
    for g in budgets:
        b = found.get(g)
        out[f"max_batch_{_label(g)}"] = b
        out[f"lower_bound_{_label(g)}"] = b is not None and b >= cfg.max_batch  # capped by the search ceiling
        if cuda and cfg.verify_cuda:
            budget = int(g * GIB)
            out[f"verified_batch_{_label(g)}"] = (
                verify_largest_batch_cuda(cfg.model.name, spec, budget, img_size=cfg.img_size, max_batch=cfg.max_batch,
                                          start=max(b, 2), device=dev, **kw) if budget <= total else None)
    capped = [g for g in budgets if out[f"lower_bound_{_label(g)}"]]
    if capped:
        notes.append(f"budgets {capped} GiB hit max_batch={cfg.max_batch}: lower bounds (raise max_batch)")
    if notes:
        out["fit_note"] = "; ".join(notes)
    return out


def _display(cfg: DictConfig) -> tuple[str, ...]:
    try:
        return tuple(f"max_batch_{_label(g)}" for g in budgets_of(cfg))
    except BenchError:
        return ()  # measure() reports the bad value


@hydra.main(config_path=str(CONF_DIR), config_name="fit", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> dict:
    return run_point(cfg, measure, _display(cfg))


if __name__ == "__main__":
    cli("fit", main)
