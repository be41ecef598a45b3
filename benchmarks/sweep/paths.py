"""Where a sweep writes: results folders (proved writable before any work), Hydra's job dir and run mode."""
from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from ..errors import OutputError
from ..hydra_conf import CONF_DIR  # noqa: F401  (re-exported: the apps take it from .sweep)


def ensure_writable(folder: Path, keep: bool = False) -> Path:
    """Prove ``folder`` is writable (creating it for the test); OutputError (one line) otherwise.

    Unless ``keep``, folders created only for the test are removed again, so a run that then fails leaves no
    empty ``<out_dir>/<app>/<sweep>/`` behind; the writers create them when they really write (atomic_write).
    A multirun keeps them (every point leaves a record), so parallel workers never race a removal.
    """
    folder = Path(folder)
    created = [] if keep else [p for p in (folder, *folder.parents) if not p.exists()]
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        raise OutputError(f"output dir {folder} is not writable ({e.strerror or e})") from None
    finally:
        for p in created:  # deepest first; one a concurrent job filled stays
            with contextlib.suppress(OSError):
                p.rmdir()
    return folder


def original_cwd() -> Path:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.cwd)
    except (ValueError, ImportError, AttributeError):
        return Path.cwd()


def abs_path(p: str | os.PathLike) -> Path:
    p = Path(os.path.expanduser(str(p)))
    return p if p.is_absolute() else original_cwd() / p


def is_multirun() -> bool:
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        return HydraConfig.get().mode == RunMode.MULTIRUN
    except (ValueError, ImportError):
        return False


def job_dir() -> Path | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return Path(HydraConfig.get().runtime.output_dir)
    except (ValueError, ImportError):
        return None



def sweep_paths(out_dir: Path, app: str, sweep: str) -> tuple[Path, Path]:
    """(records folder, CSV path) of one sweep."""
    return out_dir / app / sweep, out_dir / app / f"{sweep}.csv"

