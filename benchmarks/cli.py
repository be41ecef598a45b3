"""key=value command lines of the plain (non-Hydra) drivers: ``figures`` and ``reproduce``. Torch-free."""
from __future__ import annotations

TRUE, FALSE = ("true", "1", "yes"), ("false", "0", "no")


def parse_kv(argv: list[str], defaults: dict[str, str], doc: str | None = None) -> dict[str, str]:
    """``["k=v", ...]`` over ``defaults`` (a leading ``+`` is allowed, as in Hydra); ``-h`` prints ``doc``.
    Unknown keys and bare words raise ValueError with one line."""
    opts = dict(defaults)
    for a in argv:
        if a in ("-h", "--help"):
            print(doc or "")
            raise SystemExit(0)
        if "=" not in a:
            raise ValueError(f"argument {a!r}: use key=value ({', '.join(opts)})")
        k, v = a.split("=", 1)
        k = k.lstrip("+")
        if k not in opts:
            raise ValueError(f"unknown option {k!r}; known: {', '.join(opts)}")
        opts[k] = v
    return opts


def flag(opts: dict[str, str], key: str) -> bool:
    v = str(opts[key]).strip().lower()
    if v not in TRUE + FALSE:
        raise ValueError(f"{key}={opts[key]!r}: use true or false")
    return v in TRUE
