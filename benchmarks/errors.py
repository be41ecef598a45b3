"""The apps' bad-input errors and the one check of an integer option.

BenchError is an ActcompError, so ``actcomp.errors.one_line`` prints its message as written (no class name), like
the library's own. Torch- and omegaconf-free, so that gpu_check can use it where only torch is installed.
"""
from __future__ import annotations

from actcomp.errors import ActcompError


class BenchError(ActcompError):
    """Bad input detected by the apps (one line, fit for a CLI)."""


class OutputError(BenchError):
    """The results folder cannot be written."""


def int_option(v, key: str, lo: int = 1, none_ok: bool = False, text: bool = False, error: type[Exception] = BenchError,
               message: str = "{key}={v!r}: must be an integer >= {lo}{null}") -> int | None:
    """The value ``v`` of option ``key`` as an int >= ``lo`` (None passes where ``none_ok``); else ``error``.

    ``text``: ``v`` may be a string to parse (a plain key=value command line); a Hydra config value must already
    be an int, since ``"8"`` there was quoted on purpose. ``message``: the error's format (keys ``key``, ``v``, ``lo``,
    ``null``), for an app whose wording its tests pin.
    """
    if v is None and none_ok:
        return None
    if text and isinstance(v, str):
        try:
            v = int(v.strip())
        except ValueError:
            pass
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise error(message.format(key=key, v=v, lo=lo, null=" or null" if none_ok else ""))
    return v
