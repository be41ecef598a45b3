"""Memory over one training step (figure 9): bytes allocated after every op for a few presets, one CSV.

    python -m benchmarks.timeline                       # resnet18, batch 64, 224 px -> scratch/timeline/resnet18_b64.csv
    python -m benchmarks.timeline out_dir=results        # the published results/timeline/ (what make reproduce runs)
    python -m benchmarks.timeline model=resnet50 batch_size=32 device=cpu img_size=64   # measured on CPU
    python -m benchmarks.timeline model.name=<any timm model>

Columns: model, preset, batch_size, img_size, method, op_index, op, phase, allocated_bytes + provenance
(``actcomp.measure.step_timeline``; ``method`` says predicted on meta or measured on cpu).
"""
from __future__ import annotations

from pathlib import Path

import hydra
import pandas as pd
from omegaconf import DictConfig, ListConfig

import actcomp
from actcomp.measure import step_timeline

from .common import atomic_write_csv, fail, provenance_row
from .hydra_conf import CONF_DIR, VERSION_BASE
from .sweep import BenchError, check_block, cli

MIB = 2.0**20


def measure(cfg: DictConfig) -> pd.DataFrame:
    for key in ("batch_size", "img_size"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise BenchError(f"{key}={v!r}: must be an integer >= 1")
    if not isinstance(cfg.get("presets"), ListConfig) or not cfg.presets:
        raise BenchError(f"presets={cfg.get('presets')!r}: give a list, e.g. presets=[none,pool2,full4]")
    presets = list(cfg.presets)
    for p in presets:
        check_block(cfg.img_size, p)  # also rejects an unknown preset (actcomp's one line)
    device = str(cfg.device.name)
    method = {"meta": "memtracker-meta (predicted)", "cpu": "memtracker-cpu (measured)"}.get(device)
    if method is None:
        raise BenchError(f"device={device!r}: the timeline runs on device=meta (predicted) or device=cpu (measured)")
    frames = []
    for p in presets:
        df = step_timeline(cfg.model.name, cfg.batch_size, img_size=cfg.img_size, preset=p, device=device,
                           optimizer=cfg.optimizer, num_classes=cfg.model.num_classes,
                           in_chans=cfg.model.in_chans)
        df.insert(0, "model", cfg.model.name)
        df.insert(1, "preset", p)
        df.insert(2, "batch_size", cfg.batch_size)
        df.insert(3, "img_size", cfg.img_size)
        df.insert(4, "method", method)
        frames.append(df)
    out = pd.concat(frames, ignore_index=True)
    for k, v in provenance_row(device).items():
        out[k] = v
    return out


@hydra.main(config_path=str(CONF_DIR), config_name="timeline", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> None:
    try:
        df = measure(cfg)
        path = Path(hydra.utils.to_absolute_path(cfg.out_dir)) / "timeline" / f"{cfg.model.name}_b{cfg.batch_size}.csv"
        atomic_write_csv(df, path)
    except (actcomp.ActcompError, BenchError, OSError) as e:
        fail(e)
    peaks = df.groupby("preset", sort=False).agg(ops=("op_index", "size"), peak_mib=("allocated_bytes", "max"))
    peaks["peak_mib"] /= MIB
    print(peaks.to_string(float_format="{:.1f}".format))
    print(f"wrote {path}")


if __name__ == "__main__":
    cli("timeline", main)
