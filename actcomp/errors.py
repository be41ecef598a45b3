"""The library's one error type and the one way it turns any exception into a one-line message."""
from __future__ import annotations


class ActcompError(ValueError):
    """Invalid configuration, model or input (the message is one line, fit for a CLI)."""


def one_line(e: BaseException, limit: int = 400, typed: bool | None = None) -> str:
    """First line of ``str(e)``, cut to ``limit`` characters.

    ``typed``: prefix the exception's class name (default: for anything but an ActcompError, whose messages are
    written for users; a bare ``KeyError: 'x'`` would not say what went wrong without it).
    """
    lines = str(e).strip().splitlines()
    msg = lines[0] if lines else ""
    if typed is None:
        typed = not isinstance(e, ActcompError)
    if typed or not msg:
        msg = f"{type(e).__name__}: {msg}" if msg else type(e).__name__
    return msg[:limit]


def check_int(v, what: str, lo: int = 1, none_ok: bool = False, error: type[Exception] = ActcompError) -> None:
    """``v`` must be an int (not a bool) >= ``lo`` (or None where ``none_ok``)."""
    if none_ok and v is None:
        return
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise error(f"{what} must be an int >= {lo}{' or None' if none_ok else ''}, got {v!r}")
