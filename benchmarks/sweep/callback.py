"""The Hydra callback of every sweep app: refuse an unwritable results folder, a progress bar, then the CSV and a
console table."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from actcomp.errors import one_line

from ..errors import OutputError
from .checks import count_points, swept_keys
from .errors import die
from .paths import abs_path, ensure_writable, sweep_paths
from .records import console_table, count_statuses, read_record, write_csv
from .signals import STOP_SIGNALS, kill_joblib_workers

try:
    from hydra.experimental.callback import Callback
except ImportError:  # pragma: no cover
    Callback = object

_BARS: dict[int, Any] = {}  # (tqdm bar, stop event, poll thread) of the launcher process; never pickled


class CollectCallback(Callback):
    """Registered in conf (hydra.callbacks.collect): progress over a sweep, then its CSV and a console table.

    The bar lives in the launcher process and counts job summaries on disk, so it also moves for launchers that
    run points in other processes (joblib, submitit); there ``on_job_end`` runs in the worker and does nothing.
    """

    def __init__(self) -> None:
        self.pid: int | None = None
        self.n = 0
        self.swept: list[str] = []

    # -- start: refuse an unwritable results folder before any point runs (one line, exit 2)
    def _check_out(self, config: DictConfig, run_dir: str, keep: bool = False) -> None:
        app = config.get("app", "bench")
        try:
            ensure_writable(sweep_paths(abs_path(config.out_dir), app, str(config.sweep))[0], keep=keep)
            ensure_writable(abs_path(run_dir).parent)
        except OutputError as e:
            die(app, str(e), 2)

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check_out(config, config.hydra.run.dir)

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check_out(config, config.hydra.sweep.dir, keep=True)
        import threading

        from tqdm import tqdm

        if "joblib" in str(config.hydra.launcher.get("_target_", "")).lower():
            self._install_stop_handlers()
        self.pid, self.n = os.getpid(), count_points(config)
        self.swept = swept_keys(config)
        bar = tqdm(total=self.n, desc=f"{config.app}/{config.sweep}", unit="point", file=sys.stderr,
                   dynamic_ncols=True, mininterval=0.5)
        # The bar counts job summaries in the sweep dir, so it moves whichever launcher runs the points
        # (in this process, joblib workers or submitit jobs).
        stop = threading.Event()
        thread = threading.Thread(target=_poll, args=(bar, Path(config.hydra.sweep.dir), stop), daemon=True)
        thread.start()
        _BARS[self.pid] = (bar, stop, thread)

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        from hydra.types import RunMode

        if config.hydra.mode != RunMode.MULTIRUN:
            return
        try:
            s = job_return.return_value
        except Exception as e:  # noqa: BLE001  (a job that raised: e.g. an unwritable folder)
            s = {"status": "error", "message": one_line(e)}
        status = (("skipped" if s.get("run") == "skipped" else s.get("status", "?"))
                  if isinstance(s, dict) else "?")
        label = " ".join(o for o in config.hydra.overrides.task if o.split("=")[0] in self.swept) or config.sweep
        entry = _BARS.get(os.getpid()) if os.getpid() == self.pid else None
        if entry is not None:  # the launcher process; in joblib/submitit workers the bar's poller counts it
            entry[0].set_postfix_str(f"{status}: {label}"[:70], refresh=False)

    def _install_stop_handlers(self) -> None:
        import signal
        import threading

        self._old_handlers = {}
        if threading.current_thread() is not threading.main_thread():
            return  # signal handlers can only be set from the main thread
        for name in STOP_SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                self._old_handlers[sig] = signal.signal(sig, kill_joblib_workers)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        import signal

        for sig, h in getattr(self, "_old_handlers", {}).items():
            signal.signal(sig, h)
        sweep_dir = Path(config.hydra.sweep.dir)
        entry = _BARS.pop(os.getpid(), None)
        if entry is not None:
            bar, stop, thread = entry
            stop.set()
            thread.join()
            _advance(bar, sweep_dir)
            bar.close()
        summaries = [read_record(p) for p in sorted(sweep_dir.glob("*/summary.json"), key=_job_num)]
        self._finish(config, [s for s in summaries if s])

    def on_run_end(self, config: DictConfig, **kwargs: Any) -> None:
        s = read_record(Path(config.hydra.runtime.output_dir) / "summary.json")
        self._finish(config, [s] if s else [])

    def _finish(self, config: DictConfig, summaries: list[dict]) -> None:
        app, sweep = str(config.app), str(config.sweep)
        rec_dir, csv_path = sweep_paths(abs_path(config.out_dir), app, sweep)
        try:
            df = write_csv(rec_dir, csv_path)
        except OutputError as e:
            die(app, str(e), 2)
        print(console_table(summaries))
        statuses = [_status(s) for s in summaries]
        print(f"{app}/{sweep}: this run {len(summaries)} points ({count_statuses(statuses)}); "
              f"{csv_path} now holds {len(df)} points")
        if summaries and all(st == "skipped" for st in statuses):
            print(f"{app}/{sweep}: every point was already done in {rec_dir}; nothing measured. To measure again "
                  f"add force=true, or write elsewhere with out_dir=<folder>")
        failed = statuses.count("error")
        if self.n > len(summaries):  # multirun only (self.n is 0 otherwise)
            failed += self.n - len(summaries)  # jobs that died before writing their summary
        if failed:
            die(app, f"{failed} of {max(len(summaries), self.n)} points failed (status error; see the message column of "
                      f"{csv_path}); a rerun retries them", 1)


def _advance(bar, sweep_dir: Path) -> None:
    k = len(list(sweep_dir.glob("*/summary.json")))
    if k > bar.n:
        bar.update(k - bar.n)


def _poll(bar, sweep_dir: Path, stop) -> None:
    while not stop.wait(1.0):
        _advance(bar, sweep_dir)


def _status(s: dict) -> str:
    return "skipped" if s.get("run") == "skipped" else s.get("status", "?")


def _job_num(p: Path):
    return int(p.parent.name) if p.parent.name.isdigit() else p.parent.name
