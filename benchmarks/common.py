"""Shared plumbing for the Hydra apps: W&B run (offline by default, never hangs), provenance, config hash.

No method code here: apps compose ``actcomp``.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
from typing import Any

from omegaconf import DictConfig, OmegaConf

from actcomp.provenance import provenance  # noqa: F401  (re-exported for the apps)


def config_hash(cfg: DictConfig | dict, drop: tuple[str, ...] = ("logger", "hydra", "force", "out_dir")) -> str:
    """Stable short hash of the resolved config, ignoring keys that do not change the measurement."""
    d = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else dict(cfg)
    d = {k: v for k, v in d.items() if k not in drop}
    return hashlib.sha1(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:12]


@contextlib.contextmanager
def wandb_run(cfg: DictConfig, job_type: str, name: str | None = None):
    """Yield a W&B run (or None when ``logger.mode=disabled``/wandb missing).

    Default mode is ``offline``: runs are written under ``logger.dir`` and can be uploaded later with
    ``wandb sync``. ``online`` is used only when a user asks for it.
    """
    lg = cfg.get("logger") or {}
    mode = lg.get("mode", "offline")
    if mode == "disabled" or os.environ.get("WANDB_MODE") == "disabled":
        yield None
        return
    try:
        import wandb
    except ImportError:
        yield None
        return
    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(
        project=lg.get("project", "actcomp"),
        entity=lg.get("entity"),
        group=lg.get("group"),
        job_type=job_type,
        name=name,
        mode=mode,
        dir=lg.get("dir") or os.getcwd(),
        config=OmegaConf.to_container(cfg, resolve=True),
        settings=wandb.Settings(init_timeout=60, silent=True),
        reinit="finish_previous",
    )
    try:
        yield run
    finally:
        run.finish()


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


PROVENANCE_COLS = ("git_sha", "torch_version", "timm_version", "python_version", "device_name", "date")


def provenance_row(device: str) -> dict:
    """:func:`provenance` under the column names of the result CSVs (PROVENANCE_COLS)."""
    p = provenance(device)
    return dict(git_sha=p["git_sha"], torch_version=p["torch"], timm_version=p["timm"],
                python_version=p["python"], device_name=p["device"], date=p["date"])


def fail(err: BaseException, code: int = 2) -> None:
    """One clear line on stderr and a non-zero exit (for bad input in the apps)."""
    import sys

    msg = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    print(f"error: {msg}", file=sys.stderr)
    raise SystemExit(code)
