"""Per-layer conv table of the study + whole-model saved-for-backward bytes per preset, against both baselines.

    python -m benchmarks.table                       # resnet18, batch 32, 224 px -> scratch/table/
    python -m benchmarks.table out_dir=results           # the published results/table/ (what make reproduce runs)
    python -m benchmarks.table model=resnet50 batch_size=8 device=meta
"""
from __future__ import annotations

from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig, ListConfig

import actcomp
from actcomp.models import build_model
from actcomp.provenance import provenance

from .common import atomic_write_csv, fail
from .hydra_conf import CONF_DIR, VERSION_BASE
from .sweep import BenchError, check_block, cli, int_option

MIB = 2.0**20


def _positive_int(cfg: DictConfig, key: str) -> int:
    return int_option(cfg.get(key), key, 1, message="{key} must be >= {lo} (an integer), got {v!r}")


def measure(cfg: DictConfig) -> tuple[pd.DataFrame, pd.DataFrame]:
    _positive_int(cfg, "batch_size")
    img = _positive_int(cfg, "img_size")
    presets, blocks = cfg.get("presets"), cfg.get("blocks")
    if not isinstance(presets, ListConfig) or not presets:
        raise BenchError(f"presets={presets!r}: give a list of presets, e.g. presets=[none,pool4]")
    if not isinstance(blocks, ListConfig) or not blocks or any(
            isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in blocks):
        raise BenchError(f"blocks={blocks!r}: give a list of block sizes >= 1, e.g. blocks=[2,4]")
    for p in presets:
        check_block(img, p)  # as memory/speed/fit: an image smaller than a preset's block is refused
    if img < max(blocks):
        raise BenchError(f"img_size={img} is smaller than the {max(blocks)}x{max(blocks)} block of blocks={list(blocks)}; "
                         f"use img_size >= {max(blocks)}")
    torch.manual_seed(0)
    name, device = cfg.model.name, cfg.device.name
    model = build_model(name, num_classes=cfg.model.get("num_classes", 1000), device=device)
    with torch.device(device):
        x = torch.randn(cfg.batch_size, 3, cfg.img_size, cfg.img_size)
    prov = provenance(device)
    layers = actcomp.conv_table(model, x, blocks=tuple(cfg.blocks))
    layers.insert(0, "model", name)
    rows = []
    for p in cfg.presets:
        actcomp.compress(model, p)
        rep = actcomp.saved_bytes(model, x)
        rows.append(dict(model=name, preset=p, batch_size=cfg.batch_size, img_size=cfg.img_size,
                         saved_mib=rep.total_bytes / MIB, **{f"{k.replace(' ', '_')}_mib": v / MIB
                                                            for k, v in sorted(rep.by_kind.items())}))
    actcomp.restore(model)
    totals = pd.DataFrame(rows)
    by = totals.set_index("preset")["saved_mib"]
    for base in ("none", "authors_b1"):
        if base in by:
            totals[f"vs_{base}_pct"] = (totals["saved_mib"] / by[base] - 1) * 100
    for df in (layers, totals):
        for k, v in prov.items():
            df[k] = v
    return layers, totals


@hydra.main(config_path=str(CONF_DIR), config_name="table", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> None:
    try:
        layers, totals = measure(cfg)
        out = Path(hydra.utils.to_absolute_path(cfg.out_dir)) / "table"
        stem = f"{cfg.model.name}_b{cfg.batch_size}_{cfg.img_size}px"
        atomic_write_csv(layers, out / f"{stem}_conv_layers.csv")
        atomic_write_csv(totals, out / f"{stem}_saved_bytes.csv")
    except (actcomp.ActcompError, BenchError, OSError, RuntimeError, ValueError) as e:  # e.g. BatchNorm at batch 1 / tiny image
        fail(e)
    with pd.option_context("display.width", 160, "display.max_rows", 100, "display.float_format", "{:.2f}".format):
        print(layers.drop(columns=[c for c in layers if c in provenance("cpu")]).to_string(index=False))
        print(totals.drop(columns=[c for c in totals if c in provenance("cpu")]).to_string(index=False))
    print(f"wrote {out / stem}_*.csv")


if __name__ == "__main__":
    cli("table", main)
