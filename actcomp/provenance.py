"""Provenance stamped on every result row: git sha, library versions, device, date."""
from __future__ import annotations

import datetime as _dt
import functools
import platform
import subprocess
from pathlib import Path

import torch


@functools.lru_cache(maxsize=1)
def git_sha() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        # Dirty = the code differs from HEAD. Outputs (results/, the README tables the figures app re-renders)
        # are written by the runs themselves and must not mark later rows of the same run dirty.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)results", ":(exclude)results-quick", ":(exclude)README.md"],
                               cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()
        return (sha + ("-dirty" if dirty else "")) if sha else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_name(device: str | torch.device = "cpu") -> str:
    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    if dev.type == "meta":
        return "meta (predicted, no allocation)"
    # The kernel ISA is in the name: the same run gives other bits under AVX2 and AVX-512 kernels.
    cap = torch.backends.cpu.get_cpu_capability()
    return f"cpu: {platform.processor() or platform.machine()} {cap} x{torch.get_num_threads()} threads"


def provenance(device: str | torch.device = "cpu") -> dict:
    import timm

    return dict(
        git_sha=git_sha(),
        torch=torch.__version__,
        timm=timm.__version__,
        python=platform.python_version(),
        device=device_name(device),
        date=_dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    )
