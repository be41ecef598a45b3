"""Stopping a joblib sweep: its launcher kills the loky workers, so no point goes on after the sweep was stopped."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any

STOP_SIGNALS = ("SIGTERM", "SIGHUP")  # SIGINT already aborts joblib, which then kills its workers


def kill_joblib_workers(signum: int, frame: Any = None) -> None:
    """Signal handler of a joblib sweep's launcher: kill the loky workers, then exit.

    Without it, a ``kill`` of the launcher leaves its workers running their points and writing into the run
    dirs and records after the sweep was stopped (records are atomic, so killing a worker loses no file).
    """
    import signal

    try:
        from joblib.externals.loky import reusable_executor

        ex = reusable_executor._executor
        if ex is not None:
            pids = [p.pid for p in getattr(ex, "_processes", {}).values()]
            ex.shutdown(wait=False, kill_workers=True)
            for pid in pids:  # shutdown kills from its manager thread, asynchronously: make sure before exiting
                with contextlib.suppress(OSError):
                    os.kill(pid, signal.SIGKILL)
    except Exception:  # noqa: BLE001  exit all the same
        pass
    print(f"sweep stopped by {signal.Signals(signum).name}; worker processes killed", file=sys.stderr, flush=True)
    raise SystemExit(128 + signum)

