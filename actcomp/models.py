"""The one model builder: ``timm.create_model(pretrained=False)`` with a checked name, on any device.

    from actcomp.models import build_model
    build_model("resnet18", num_classes=10, in_chans=1)                         # CPU, timm's own init
    build_model("resnet50", device="meta")                                      # shapes only, nothing allocated
    build_model("resnet18", num_classes=10, seed=0, preset="pool4")             # seeded init, then converted
"""
from __future__ import annotations

import contextlib
import difflib
import functools
import random

import torch
import torch.nn as nn

from .errors import ActcompError, one_line

__all__ = ["build_model", "check_model_name", "in_chans_of", "timm_names"]


@functools.lru_cache(maxsize=1)
def timm_names() -> tuple[str, ...]:
    import timm

    return tuple(timm.list_models())


def check_model_name(name) -> None:
    """ActcompError (with did-you-mean suggestions) unless ``name`` is a timm model name."""
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        close = difflib.get_close_matches(str(name), timm_names(), n=3, cutoff=0.6)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise ActcompError(f"unknown timm model {name!r}{hint}")


@contextlib.contextmanager
def _seeded(seed: int | None):
    """``torch.manual_seed(seed)`` for the block, with every global random stream restored afterwards, so a seeded
    build never shifts the caller's random numbers (python, numpy, torch CPU and CUDA)."""
    if seed is None:
        yield
        return
    import numpy as np

    py, npst = random.getstate(), np.random.get_state()
    cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if cuda else []):
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npst)


def build_model(name: str, num_classes: int = 1000, in_chans: int = 3, device="cpu", img_size: int | None = None,
                *, seed: int | None = None, model_kwargs: dict | None = None, preset=None, example_input=None,
                target=None, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained=False)`` built directly on ``device`` (``meta``: no allocation).

    ``img_size`` is passed to models that take it (ViT-style models have a fixed patch grid); models that do not
    accept it are built without it. ``model_kwargs`` and ``kwargs``: extra ``timm.create_model`` arguments.
    ``seed``: the weights are initialised under ``torch.manual_seed(seed)`` (the caller's random streams are left
    as they were), so every preset built with one seed starts from bitwise the same weights. ``preset``: converted
    with :func:`actcomp.compress` after building (None: returned unconverted); ``example_input``/``target``: the
    calibration batch and labels a budget preset plans on.
    """
    import timm

    check_model_name(name)
    extra = dict(model_kwargs or {})
    # The kwargs a caller chose are named in the error: a bad stem_width is not a bad model name.
    what = f"{name} with {extra}" if extra else name
    kw = dict(pretrained=False, num_classes=num_classes, in_chans=in_chans, **extra, **kwargs)
    with _seeded(seed), torch.device(device):
        model = None
        if img_size is not None:
            try:
                model = timm.create_model(name, img_size=img_size, **kw)
            except TypeError as e:
                if "img_size" not in str(e):
                    raise ActcompError(f"cannot build {what}: {one_line(e, 300, typed=True)}") from None
            except (RuntimeError, ValueError, AssertionError, ZeroDivisionError) as e:
                raise ActcompError(f"cannot build {what} for img_size={img_size}: "
                                   f"{one_line(e, 300, typed=True)}") from None
        if model is None:
            try:
                model = timm.create_model(name, **kw)
            except (TypeError, RuntimeError, ValueError, AssertionError) as e:
                raise ActcompError(f"cannot build {what}: {one_line(e, 300, typed=True)}") from None
    if preset is not None:
        from .convert import compress

        compress(model, preset, example_input=example_input, target=target)
    return model


def in_chans_of(model: nn.Module, default: int = 3) -> int:
    """Input channels of ``model``: its first Conv2d's, else ``default``."""
    conv = next((c for c in model.modules() if isinstance(c, nn.Conv2d)), None)
    return conv.in_channels if conv is not None else default
