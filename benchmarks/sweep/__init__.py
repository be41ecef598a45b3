"""Sweep plumbing shared by the memory, speed and fit apps: one record per point, skip-on-rerun, one CSV per sweep.

Layout (``out_dir`` = ``scratch``, a git-ignored folder, by default, relative to where the command was started;
only ``make reproduce`` or an explicit ``out_dir=results`` writes the published ``results/``)::

    <out_dir>/<app>/<sweep>/<point>.json   one record per point: the done-index. <point> = config_hash of the
                                           resolved config without logger/hydra/force/out_dir/hydra_dir/sweep
    <out_dir>/<app>/<sweep>.csv            the tidy table, rebuilt from the records after every run
    outputs/<app>/<sweep>/.../summary.json   every job's own summary in its Hydra output dir

Single run vs multirun (decided from Hydra's run mode):

* single run (no ``-m``): any failure (bad input, out of memory, error) prints ONE line on stderr and exits
  non-zero (2: bad input, 1: out of memory or another failure); nothing under ``out_dir`` is written.
* multirun (``-m``): a failing point is recorded with ``status`` (``oom`` or ``error``) and a one-line
  ``message``, and the sweep goes on; it ends with a line saying how many points failed and exits 1 when
  any point ended in ``error`` (``oom`` is an answer, not a failure). Bad input on the command line itself
  (an unknown config-group option, an unwritable ``out_dir``) stops the sweep before any point runs.

Re-runs skip points whose record says ``ok`` or ``oom`` (a definite answer); ``error`` points are tried again;
``force=true`` measures everything again. Every file is written to a temporary name and ``os.replace``-d, so a
crash never leaves a half-written record or CSV behind.

Modules, by job: ``errors`` (is_oom, die; BenchError and OutputError live in ``benchmarks.errors``), ``paths`` (out dirs, writable checks, Hydra's
job dir and run mode), ``records`` (records, CSV, console table, collect), ``checks`` (config checks, preflight of
the command line, ``cli``), ``run`` (run_point, its W&B logging), ``callback`` (CollectCallback: progress bar, CSV
at the end), ``signals`` (stopping a joblib sweep). The names the apps use are exported here.
"""
from __future__ import annotations

import warnings

from ..errors import BenchError, OutputError, int_option
from .callback import CollectCallback
from .checks import (
    GROUPS,
    check_block,
    check_common,
    cli,
    compression_spec,
    count_points,
    group_options,
    preflight,
    swept_keys,
)
from .errors import die, is_oom
from .paths import CONF_DIR, abs_path, ensure_writable, is_multirun, job_dir, original_cwd, sweep_paths
from .records import (
    DONE,
    LATER_KEYS,
    NOT_MEASURED,
    collect,
    console_table,
    load_records,
    point_key,
    read_record,
    records_frame,
    write_csv,
)
from .run import run_point, wandb_metrics
from .signals import kill_joblib_workers

# Hydra warns that our conf/hydra/launcher/*.yaml share their names with the plugins' schemas; that match is
# what we want (it type-checks our files), so the deprecation notice is only noise on every run.
warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")

__all__ = ["CONF_DIR", "DONE", "GROUPS", "LATER_KEYS", "NOT_MEASURED", "BenchError", "CollectCallback", "OutputError",
           "abs_path", "check_block", "check_common", "cli", "collect", "compression_spec", "console_table",
           "count_points", "die", "ensure_writable", "group_options", "int_option", "is_multirun", "is_oom", "job_dir",
           "kill_joblib_workers", "load_records", "original_cwd", "point_key", "preflight", "read_record",
           "records_frame", "run_point", "swept_keys", "sweep_paths", "wandb_metrics", "write_csv"]
