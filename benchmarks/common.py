"""Shared plumbing for the Hydra apps: W&B run (offline by default, never hangs), provenance, config hash.

No method code here: apps compose ``actcomp``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from omegaconf import DictConfig

from actcomp.errors import one_line
from actcomp.provenance import provenance  # noqa: F401  (re-exported for the apps)


def config_hash(cfg: DictConfig | dict, drop: tuple[str, ...] = ("logger", "hydra", "force", "out_dir")) -> str:
    """Stable short hash of the resolved config, ignoring keys that do not change the measurement."""
    from omegaconf import (  # imported here: gpu_check runs where no omegaconf is installed
        DictConfig,
        OmegaConf,
    )

    d = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    d = {k: v for k, v in d.items() if k not in drop}
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


# W&B's own network traffic besides the run data: error reporting/telemetry (the SDK and wandb-core send it
# even for offline runs), system metrics (probe cloud metadata endpoints), git and code capture.
_OFFLINE_SETTINGS = dict(x_disable_stats=True, x_disable_meta=True, x_disable_machine_info=True, disable_git=True,
                         disable_code=True, x_save_requirements=False, disable_job_creation=True)
# The online probe's answer ("ok" or "offline"), in the environment so that a sweep's points (joblib, submitit
# workers started after the probe) inherit it and the network is tried once per sweep, not once per point.
PROBE_ENV = "ACTCOMP_WANDB_ONLINE"


def _probe_wandb(timeout: float = 5.0) -> str | None:
    """None if the W&B server accepts a TCP connection within ``timeout`` s, else why not (one line)."""
    import socket
    from urllib.parse import urlsplit

    if any(os.environ.get(k) for k in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY")):
        return None  # through a proxy: a direct connection says nothing; let W&B try
    url = urlsplit(os.environ.get("WANDB_BASE_URL") or _default_base_url())
    host, port = url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port} unreachable ({type(e).__name__}: {e.strerror or e})"
    return None


def _default_base_url() -> str:
    try:
        import wandb

        return str(wandb.Settings().base_url)
    except Exception:  # noqa: BLE001  (settings files or versions we do not know)
        return "https://api.wandb.ai"


def wandb_mode(logger_cfg) -> str:
    """The W&B mode to use: ``logger.mode``, except that ``online`` without a reachable server falls back to
    ``offline`` with one warning line, decided once per process tree (see PROBE_ENV)."""
    import sys

    mode = str((logger_cfg or {}).get("mode", "offline"))
    if os.environ.get("WANDB_MODE") == "disabled":
        return "disabled"
    if mode != "online":
        return mode
    seen = os.environ.get(PROBE_ENV)
    if seen is None:
        why = _probe_wandb()
        seen = os.environ[PROBE_ENV] = "ok" if why is None else "offline"
        if why is not None:
            print(f"W&B: {why}; logging offline instead for this run/sweep (upload later with "
                  f"`wandb sync --sync-all`)", file=sys.stderr, flush=True)
    return "online" if seen == "ok" else "offline"


@contextlib.contextmanager
def wandb_run(cfg: DictConfig, job_type: str, name: str | None = None, group: str | None = None):
    """Yield a W&B run (or None when ``logger.mode=disabled``/wandb missing).

    Default mode is ``offline``: runs are written under ``logger.dir`` and can be uploaded later with
    ``wandb sync``; an offline run never touches the network. ``online`` is used only when a user asks for it
    and the server answers (:func:`wandb_mode`). ``group``: used when ``logger.group`` is null.
    """
    from omegaconf import OmegaConf

    lg = cfg.get("logger") or {}
    mode = wandb_mode(lg)
    if mode == "disabled":
        yield None
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    if mode == "offline":
        os.environ["WANDB_ERROR_REPORTING"] = "false"  # read by the SDK and passed on to wandb-core
    else:
        os.environ.setdefault("WANDB_ERROR_REPORTING", "false")
    try:
        import wandb
    except ImportError:
        yield None
        return
    extra = {}
    if mode == "offline":
        known = getattr(wandb.Settings, "model_fields", {})
        extra = {k: v for k, v in _OFFLINE_SETTINGS.items() if k in known}
        with contextlib.suppress(Exception):  # a telemetry recorder made before the variable was set
            from wandb.analytics.opentelemetry import opentelemetry_proxy

            opentelemetry_proxy.disable()
    run = wandb.init(
        project=lg.get("project", "actcomp"),
        entity=lg.get("entity"),
        group=lg.get("group") or group,
        job_type=job_type,
        name=name,
        mode=mode,
        dir=lg.get("dir") or os.getcwd(),
        config=OmegaConf.to_container(cfg, resolve=True),
        settings=wandb.Settings(mode=mode, init_timeout=60, silent=True, **extra),
        reinit="finish_previous",
    )
    try:
        yield run
    finally:
        run.finish()


try:
    from hydra.experimental.callback import Callback as _Callback
except ImportError:  # pragma: no cover
    _Callback = object


SWEPT_ENV = "ACTCOMP_SWEPT_KEYS"  # the keys a sweep varies, for its points' run names (set by WandbProbe)


class WandbProbe(_Callback):
    """Hydra callback: with ``logger=online``, probe the W&B server once before a sweep's points start, so that
    every point (also in joblib/submitit workers) inherits the answer instead of waiting on its own. Also
    records which keys the sweep varies (a job only sees its own values), for readable run names."""

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        from .sweep import swept_keys

        if config.get("hydra") is not None:
            os.environ[SWEPT_ENV] = ",".join(swept_keys(config))
        if config.get("logger") is not None:
            wandb_mode(config.logger)


def log_metrics(run: Any, metrics: dict, step: int | None = None) -> None:
    if run is not None:
        run.log({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)


def atomic_write(path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder + os.replace (never half a file)."""
    import tempfile
    from pathlib import Path

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (others can read a shared results/).
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it; set straight back
    os.umask(mask)
    return mask


def atomic_write_csv(df, path) -> None:
    """A DataFrame as CSV through :func:`atomic_write` (parent folders created)."""
    atomic_write(path, df.to_csv(index=False))


# Two column schemes for the same provenance, both in committed CSVs (whose columns never change):
# PROVENANCE_COLS (provenance_row) in the sweeps' CSVs (memory/, speed/, fit/), train/, exactness/, timeline/ and
# logs/reproduce_stages.csv; actcomp.provenance's own keys (git_sha, torch, timm, python, device, date) in table/
# and whole_set/. Both come from actcomp.provenance.provenance, the one place that reads them.
PROVENANCE_COLS = ("git_sha", "torch_version", "timm_version", "python_version", "device_name", "date")


def provenance_row(device: str) -> dict:
    """:func:`provenance` under the column names of most result CSVs (PROVENANCE_COLS; see above)."""
    p = provenance(device)
    return dict(git_sha=p["git_sha"], torch_version=p["torch"], timm_version=p["timm"],
                python_version=p["python"], device_name=p["device"], date=p["date"])


def fail(err: BaseException, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit (for bad input in the apps)."""
    import sys

    print(f"error: {one_line(err, typed=False)}", file=sys.stderr)
    raise SystemExit(code)
