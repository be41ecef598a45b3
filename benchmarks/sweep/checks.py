"""Config checks every app shares (one clear line each) and the preflight of the command line before Hydra."""
from __future__ import annotations

import difflib
import math
import sys
from collections.abc import Callable
from typing import Any

from omegaconf import DictConfig, OmegaConf

from actcomp import ActcompError, get_preset
from actcomp.errors import one_line
from actcomp.policy import budget_spec, check_budget

from ..errors import BenchError, int_option
from .paths import CONF_DIR

GROUPS = ("model", "compression", "device", "logger", "experiment", "hydra/launcher")


def compression_spec(comp: DictConfig | dict, budget: bool = False):
    """The compression group as actcomp input: the preset name, or {preset, **overrides} when keys were added.

    Checked here so that an unknown preset is one line with suggestions (actcomp.get_preset's message).
    ``budget``: the app can plan a budget preset (``budget0.25``, ``full_budget0.0625``) on real data; the
    spec is then the preset name, or {budget, base, **overrides}.
    """
    d = OmegaConf.to_container(comp, resolve=True) if isinstance(comp, DictConfig) else dict(comp)
    name = d.pop("name", None)
    if name is None:
        raise BenchError("compression.name is missing; pick a preset, e.g. compression=pool4")
    planned = budget_spec(name)
    if planned is None:
        get_preset(name)
        return {"preset": name, **d} if d else name
    if not budget:
        raise BenchError(f"preset {name!r} plans its per-layer codes on a calibration batch of real data: only "
                         f"the train app takes it (python -m benchmarks.train compression={name})")
    check_budget(planned["budget"])
    return {**planned, **d} if d else name


def check_block(img_size: int, spec) -> None:
    """An image smaller than the pooling block leaves nothing to pool (the first conv sees the image itself)."""
    from collections.abc import Mapping

    from actcomp import as_config

    if budget_spec(spec) is not None:
        return  # planned per layer: a candidate that pools by more than the map is not chosen
    c = as_config(spec)
    b = max(c.block.values()) if isinstance(c.block, Mapping) else c.block
    if b > 1 and img_size < b:
        raise BenchError(f"img_size={img_size} is smaller than the {b}x{b} pooling block of preset {c.name!r}; "
                         f"use img_size >= {b}")


def check_common(cfg: DictConfig, batch: bool = True) -> None:
    """Config-level checks every app shares (one clear line each)."""
    import torch

    def _int(key, lo=1):
        int_option(cfg.get(key), key, lo)

    if batch:
        _int("batch_size")
    _int("img_size")
    for key in ("channels_last", "saved_by_op"):  # a string like "maybe" would count as true (amp, dtype: actcomp)
        if key in cfg and not isinstance(cfg.get(key), bool):
            raise BenchError(f"{key}={cfg.get(key)!r}: use true or false")
    for key, lo in (("warmup", 0), ("iters", 1)):
        if key in cfg:
            _int(key, lo)
    dev = str(cfg.device.name)
    if dev.split(":")[0] not in ("meta", "cpu", "cuda"):
        raise BenchError(f"device.name={dev!r}: use device=meta, device=cpu or device=cuda")
    if dev.startswith("cuda") and not torch.cuda.is_available():
        raise BenchError(f"device=cuda but CUDA is not available (torch {torch.__version__}, "
                         f"built for CUDA {torch.version.cuda or 'none'}); use device=meta or device=cpu")



# ------------------------------------------------------------------------------------------ CLI preflight

def count_points(config: DictConfig) -> int:
    """Number of jobs the basic sweeper will launch (its own cartesian-product rule, last override wins)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    args += list(config.hydra.overrides.task)
    sizes: dict[str, int] = {}
    for o in OverridesParser.create().parse_overrides(args):
        sizes[o.get_key_element()] = len(list(o.sweep_string_iterator())) if o.is_sweep_override() else 1
    return math.prod(sizes.values()) if sizes else 1


def swept_keys(config: DictConfig) -> list[str]:
    """Keys that take more than one value in this sweep (what tells its points apart)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = [f"{k}={v}" for k, v in (config.hydra.sweeper.get("params") or {}).items()]
    args += list(config.hydra.overrides.task)
    return [o.get_key_element() for o in OverridesParser.create().parse_overrides(args) if o.is_sweep_override()]


def group_options(group: str) -> list[str]:
    # nested folders are options too: experiment=memory/memory_models is conf/experiment/memory/memory_models.yaml
    return sorted(p.relative_to(CONF_DIR / group).with_suffix("").as_posix() for p in (CONF_DIR / group).rglob("*.yaml"))


def preflight(argv: list[str], groups: tuple[str, ...] = GROUPS) -> str | None:
    """Check config-group choices on the command line (Hydra would print a multi-line error). None if fine.

    ``groups``: the config groups of the app (conf/<group>/*.yaml are the choices)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    for arg in argv:
        if arg.startswith("-") or "=" not in arg:
            continue
        try:
            o = parser.parse_override(arg)
        except HydraException as e:
            return f"cannot parse override {arg!r}: {one_line(e)}"
        key = o.key_or_group
        if key not in groups or o.is_delete():
            continue
        vals = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
        opts = group_options(key) + (["basic", "joblib", "submitit_local", "submitit_slurm"]
                                     if key == "hydra/launcher" else [])
        for v in vals:
            if v in opts or (key == "experiment" and v == "null"):
                continue
            if key == "compression":
                try:
                    get_preset(v)
                except ActcompError as e:
                    return str(e)
                return f"preset {v!r} has no conf/compression/{v}.yaml"
            if key == "model":
                return _unknown_model(v, opts)
            close = difflib.get_close_matches(v, opts, n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            return f"unknown {key} {v!r}{hint}; known: {', '.join(opts)}"
    return None


def _unknown_model(v: str, curated: list[str]) -> str:
    import timm

    if timm.is_model(v):
        return f"no config conf/model/{v}.yaml; {v} is a timm model: use model.name={v}"
    close = difflib.get_close_matches(v, curated, n=2) + difflib.get_close_matches(v, timm.list_models(), n=3)
    close = list(dict.fromkeys(close))[:4]
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"unknown model {v!r}{hint}; curated configs: conf/model/, any timm model: model.name=<timm name>"


def cli(app: str, hydra_main: Callable[[], Any]) -> None:
    """Entry point of an app: one-line preflight of the command line, then Hydra."""
    msg = preflight(sys.argv[1:])
    if msg:
        print(f"{app}: {msg}", file=sys.stderr)
        raise SystemExit(2)
    hydra_main()
