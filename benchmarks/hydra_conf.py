"""The one place the Hydra apps and tests take their config folder and ``version_base`` from."""
from __future__ import annotations

from pathlib import Path

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
VERSION_BASE = "1.3"  # every @hydra.main and every test's initialize(...) use this one


def experiment_file(app: str, name: str) -> Path:
    """conf/experiment/<app>/<name>.yaml (``experiment=<app>/<name>`` on the command line)."""
    return CONF_DIR / "experiment" / app / f"{name}.yaml"


__all__ = ["CONF_DIR", "VERSION_BASE", "experiment_file"]
