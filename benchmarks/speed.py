"""Hydra app: training-step time of one point against native PyTorch, measured in the same process.

    python -m benchmarks.speed model=resnet18 compression=pool4 batch_size=32 img_size=128
    python -m benchmarks.speed -m model=resnet18,resnet50 compression=pool2,pool4,full4
    python -m benchmarks.speed model=resnet18 compression=pool4 compile=true   # both under torch.compile

``actcomp.measure.compare_step_times`` runs `none` and this point's preset side by side, interleaved step by
step (rotating which goes first), after warm-up; CUDA-synchronised on GPU. Records the median step time,
images/s and the ratio to `none` (above 1: slower). Results: <out_dir>/speed/<sweep>.csv (scratch/ by default).
"""
from __future__ import annotations

import hydra
from omegaconf import DictConfig

from actcomp.measure import compare_step_times

from .hydra_conf import CONF_DIR, VERSION_BASE
from .sweep import BenchError, check_block, check_common, cli, compression_spec, run_point

DISPLAY = ("median_step_s", "images_per_s", "ratio_to_none")


def measure(cfg: DictConfig) -> dict:
    check_common(cfg)
    if cfg.device.name == "meta":
        raise BenchError("speed needs real compute: use device=cpu or device=cuda (meta only predicts memory)")
    if cfg.model.in_chans != 3:
        raise BenchError(f"model.in_chans={cfg.model.in_chans}: speed measures 3-channel inputs only")
    if not isinstance(cfg.compile, bool):
        raise BenchError(f"compile={cfg.compile!r}: must be true or false")
    spec = compression_spec(cfg.compression)
    check_block(cfg.img_size, spec)
    name = str(cfg.compression.name)
    df = compare_step_times(cfg.model.name, [spec], cfg.batch_size, img_size=cfg.img_size, device=cfg.device.name,
                            warmup=cfg.warmup, iters=cfg.iters, optimizer=cfg.optimizer, amp=cfg.amp,
                            channels_last=cfg.channels_last, num_classes=cfg.model.num_classes,
                            compile=cfg.compile)
    row, base = df[df.preset == name].iloc[0], df[df.preset == "none"].iloc[0]
    return dict(median_step_s=float(row.median_s), min_step_s=float(row.min_s), max_step_s=float(row.max_s),
                images_per_s=float(row.images_per_s), ratio_to_none=float(row.ratio_to_none),
                none_median_step_s=float(base.median_s), none_images_per_s=float(base.images_per_s))


@hydra.main(config_path=str(CONF_DIR), config_name="speed", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> dict:
    return run_point(cfg, measure, DISPLAY)


if __name__ == "__main__":
    cli("speed", main)
