"""Device, dtype and autocast arguments: one parser each, shared by measurement and training."""
from __future__ import annotations

import torch

from .errors import ActcompError

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}
_AMP = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}
_OFF = (False, None, "false", "none", "off", "no")
_ON = (True, "true", "on", "yes")


def parse_device(device, devices: tuple[str, ...] = ("meta", "cpu", "cuda")) -> torch.device:
    """``device`` as a torch.device of one of ``devices``; ``cuda`` gets the current index and must exist."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ActcompError(f"unknown device {device!r}; use {', '.join(devices[:-1])} or {devices[-1]}") from None
    if dev.type not in devices:
        raise ActcompError(f"device {device!r} is not supported; use {', '.join(devices[:-1])} or {devices[-1]}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ActcompError("device=cuda requested but CUDA is not available")
        if dev.index is None:  # MemTracker keys its snapshots by the tensors' device, which has an index
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index >= torch.cuda.device_count():
            raise ActcompError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s)")
    return dev


def parse_dtype(dtype) -> torch.dtype:
    """A torch.dtype or one of float32/fp32, bfloat16/bf16, float16/fp16."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if not isinstance(dtype, str) or dtype.lower() not in _DTYPES:
        raise ActcompError(f"dtype must be one of float32, bfloat16, float16, got {dtype!r}")
    return _DTYPES[dtype.lower()]


def parse_amp(amp, device_type: str) -> torch.dtype | None:
    """Autocast dtype: off (False/None/'false'/'none'/'off'), on (True/'true'/'on': fp16 on cuda, bf16
    elsewhere), 'bf16' or 'fp16' (needs CUDA, or meta as a prediction)."""
    key = amp.lower() if isinstance(amp, str) else amp
    if any(key is v or (isinstance(key, str) and key == v) for v in _OFF):
        return None
    if any(key is v or (isinstance(key, str) and key == v) for v in _ON):
        return torch.float16 if device_type == "cuda" else torch.bfloat16
    if not isinstance(key, str) or key not in _AMP:
        raise ActcompError(f"amp must be false, true, bf16 or fp16, got {amp!r}")
    dt = _AMP[key]
    if dt == torch.float16 and device_type == "cpu":
        raise ActcompError("amp=fp16 needs CUDA; use amp=bf16 on CPU (or device=meta to predict)")
    return dt
