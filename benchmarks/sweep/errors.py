"""How a sweep reports a failure: out of memory is an answer (is_oom), anything else stops it with one line (die)."""
from __future__ import annotations

import sys


def is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (torch.OutOfMemoryError, MemoryError)):
        return True
    s = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in s or "can't allocate memory" in s)


def die(app: str, message: str, code: int):
    """``<app>: <message>`` on stderr and exit ``code`` (2: bad input, 1: a failure)."""
    print(f"{app}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(code)

