"""Hydra app: memory of one training step for one point (model x compression x batch x ...).

    python -m benchmarks.memory model=resnet50 compression=pool4 batch_size=64
    python -m benchmarks.memory -m model=resnet18,resnet50,efficientnet_b0 compression=none,pool2,pool4 batch_size=32,64,128
    python -m benchmarks.memory -m experiment=memory/memory_models

Records, per point: saved-for-backward bytes by op kind (``actcomp.saved_bytes``; on meta, or on cpu for
device=cpu; not available for the hook-based peers ckpt/int8/offload, noted in ``saved_note``) and the peak
of a full step with its breakdown (``actcomp.measure.step_memory``: predicted on meta, measured on cpu, measured
+ predicted on cuda). Results: <out_dir>/memory/<sweep>.csv, out_dir=scratch by default (see benchmarks/sweep/ for the layout).
"""
from __future__ import annotations

import contextlib

import hydra
import torch
from omegaconf import DictConfig

import actcomp
from actcomp.errors import one_line
from actcomp.measure import step_memory
from actcomp.models import build_model

from .hydra_conf import CONF_DIR, VERSION_BASE
from .sweep import check_block, check_common, cli, compression_spec, run_point

DISPLAY = ("peak_bytes", "saved_total_bytes", "predicted_peak_bytes", "method")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def saved_by_op(cfg: DictConfig, spec) -> dict:
    """actcomp.saved_bytes for this point, by op kind; on meta unless device=cpu (shapes do not depend on it)."""
    name = spec if isinstance(spec, str) else spec["preset"]
    if actcomp.get_preset(name).peer != "none":
        return dict(saved_note=f"saved-by-op not available for peer {name!r} (its hooks hide saved tensors); "
                               f"see peak_bytes")
    dev = "cpu" if cfg.device.name == "cpu" else "meta"
    ctx, dev_amp = contextlib.nullcontext(), dev
    if cfg.amp and dev == "meta":
        # meta has no autocast: like step_memory, use fake CPU tensors with CPU bf16 autocast (same sizes as fp16).
        from torch._subclasses.fake_tensor import FakeTensorMode

        ctx, dev, dev_amp = FakeTensorMode(), "cpu", "cpu"
    dtype = _DTYPES.get(str(cfg.dtype), torch.float32)
    with ctx:
        model = build_model(cfg.model.name, num_classes=cfg.model.num_classes, in_chans=cfg.model.in_chans,
                            device=dev, img_size=cfg.img_size)
        actcomp.compress(model, spec)
        model = model.to(dtype=dtype)
        x = torch.randn(cfg.batch_size, cfg.model.in_chans, cfg.img_size, cfg.img_size, device=dev,
                        dtype=torch.float32 if cfg.amp else dtype)
        if cfg.channels_last:
            model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
        amp = torch.autocast(dev_amp, dtype=torch.bfloat16) if cfg.amp else contextlib.nullcontext()
        try:
            with amp:
                rep = actcomp.saved_bytes(model, x)
        except (RuntimeError, ValueError, AssertionError, IndexError, ZeroDivisionError) as e:
            raise actcomp.ActcompError(f"{cfg.model.name} failed in forward at img_size={cfg.img_size} "
                                       f"(image too small for the model or block size?): {one_line(e, typed=False)}"
                                       ) from None
    out = dict(saved_total_bytes=rep.total_bytes, saved_device=dev if not cfg.amp else f"{cfg.device.name}+amp")
    out.update({f"saved_{k.replace(' ', '_')}_bytes": v for k, v in sorted(rep.by_kind.items())})
    return out


def measure(cfg: DictConfig) -> dict:
    check_common(cfg)
    spec = compression_spec(cfg.compression)
    check_block(cfg.img_size, spec)
    sm = step_memory(cfg.model.name, cfg.batch_size, img_size=cfg.img_size, preset=spec, device=cfg.device.name,
                     optimizer=cfg.optimizer, dtype=cfg.dtype, amp=cfg.amp, channels_last=cfg.channels_last,
                     num_classes=cfg.model.num_classes, in_chans=cfg.model.in_chans)
    out = dict(peak_bytes=sm.peak_bytes, after_forward_bytes=sm.after_forward_bytes, method=sm.method,
               predicted_peak_bytes=sm.predicted_peak_bytes, reserved_bytes=sm.reserved_bytes)
    out.update({f"peak_{k}_bytes": v for k, v in sm.breakdown.items()})
    if cfg.saved_by_op:
        out.update(saved_by_op(cfg, spec))
    return out


@hydra.main(config_path=str(CONF_DIR), config_name="memory", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> dict:
    return run_point(cfg, measure, DISPLAY)


if __name__ == "__main__":
    cli("memory", main)
