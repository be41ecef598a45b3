"""Hydra app: training-step time of one point against native PyTorch, measured in the same process.

    python -m benchmarks.speed model=resnet18 compression=pool4 batch_size=32 img_size=128
    python -m benchmarks.speed -m model=resnet18,resnet50 compression=pool2,pool4,full4
    python -m benchmarks.speed model=resnet18 compression=pool4 compile=true   # both under torch.compile
    python -m benchmarks.speed model=resnet18 compression=pool4 blocks=3 max_blocks=8 target_iqr=0.05

``actcomp.measure.compare_step_times`` runs `none` and this point's preset side by side, interleaved step by
step (rotating which goes first), after warm-up, in `blocks` blocks of `iters` steps; CUDA-synchronised on GPU.
Records the median step time, images/s, the ratio to `none` (above 1: slower; the median of the per-block
ratios), its spread (`ratio_q25`, `ratio_q75` over the blocks), the blocks timed (`blocks_run`; more than
`blocks` only in adaptive mode) and the 1-minute load average before and after (`load_start`, `load_end`).
Results: <out_dir>/speed/<sweep>.csv (scratch/ by default).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from actcomp.measure import compare_step_times

from .hydra_conf import CONF_DIR, VERSION_BASE
from .sweep import BenchError, check_block, check_common, cli, compression_spec, int_option, run_point

DISPLAY = ("median_step_s", "images_per_s", "ratio_to_none", "ratio_q25", "ratio_q75")


def measure(cfg: DictConfig) -> dict:
    check_common(cfg)
    if cfg.device.name == "meta":
        raise BenchError("speed needs real compute: use device=cpu or device=cuda (meta only predicts memory)")
    if cfg.model.in_chans != 3:
        raise BenchError(f"model.in_chans={cfg.model.in_chans}: speed measures 3-channel inputs only")
    if not isinstance(cfg.compile, bool):
        raise BenchError(f"compile={cfg.compile!r}: must be true or false")
    blocks = int_option(cfg.get("blocks"), "blocks")
    max_blocks = int_option(cfg.get("max_blocks"), "max_blocks", lo=blocks, none_ok=True)
    target_iqr = cfg.get("target_iqr")
    if target_iqr is not None and (isinstance(target_iqr, bool) or not isinstance(target_iqr, (int, float))
                                   or not 0 <= target_iqr < float("inf")):
        raise BenchError(f"target_iqr={target_iqr!r}: must be a number >= 0 or null")
    if (max_blocks is None) != (target_iqr is None):
        raise BenchError(f"max_blocks={max_blocks!r}, target_iqr={target_iqr!r}: adaptive mode needs both "
                         f"(or neither)")
    spec = compression_spec(cfg.compression)
    check_block(cfg.img_size, spec)
    name = str(cfg.compression.name)
    df = compare_step_times(cfg.model.name, [spec], cfg.batch_size, img_size=cfg.img_size, device=cfg.device.name,
                            warmup=cfg.warmup, iters=cfg.iters, optimizer=cfg.optimizer, amp=cfg.amp,
                            channels_last=cfg.channels_last, num_classes=cfg.model.num_classes,
                            compile=cfg.compile, blocks=blocks, max_blocks=max_blocks, target_iqr=target_iqr)
    row, base = df[df.preset == name].iloc[0], df[df.preset == "none"].iloc[0]
    # `blocks_run`, not `blocks`: the config key `blocks` is already a column (the blocks asked for)
    return dict(median_step_s=float(row.median_s), min_step_s=float(row.min_s), max_step_s=float(row.max_s),
                images_per_s=float(row.images_per_s), ratio_to_none=float(row.ratio_to_none),
                ratio_q25=float(row.ratio_q25), ratio_q75=float(row.ratio_q75), blocks_run=int(row.blocks),
                load_start=float(row.load_start), load_end=float(row.load_end),
                none_median_step_s=float(base.median_s), none_images_per_s=float(base.images_per_s))


@hydra.main(config_path=str(CONF_DIR), config_name="speed", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> dict:
    return run_point(cfg, measure, DISPLAY)


if __name__ == "__main__":
    cli("speed", main)
