"""The README blocks between ``<!-- BEGIN <csv> -->`` and ``<!-- END <csv> -->``, re-rendered from their CSV."""
from __future__ import annotations

import os
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from actcomp.errors import one_line

from .tables import (
    md_conv_layers,
    md_exactness,
    md_exactness_padding,
    md_fit,
    md_frontier,
    md_peak,
    md_saved_bytes,
    md_speed,
    md_train_summary,
    md_whole_model,
)

README_RENDERERS: list[tuple[str, Callable[[pd.DataFrame, str], str]]] = [
    (r"(.*/)?table/.+_saved_bytes\.csv", md_saved_bytes),
    (r"(.*/)?table/.+_conv_layers\.csv", md_conv_layers),
    (r"(.*/)?fit/[^/]+\.csv", md_fit),
    (r"(.*/)?train/frontier/frontier\.csv", md_frontier),
    (r"(.*/)?train/(.+/)?summary\.csv", md_train_summary),
    (r"(.*/)?memory/whole_set_peak\.csv", md_peak),
    (r"(.*/)?speed/[^/]+\.csv", md_speed),
    (r"(.*/)?exactness/exactness\.csv", md_exactness),
    (r"(.*/)?exactness/padding\.csv", md_exactness_padding),
    (r"(.*/)?exactness/whole_model\.csv", md_whole_model),
]
_BLOCK = re.compile(r"(<!-- BEGIN (?P<path>[^>]+?) -->\n)(?P<body>.*?)(\n<!-- END (?P=path) -->)", re.S)


def update_readme(readme: Path, root: Path, warn: Callable[[str], None]) -> int:
    """Re-render every marked block of ``readme`` from its CSV. Returns the number of blocks changed.

    A marker names the CSV as the repository sees it (``results/table/x.csv``); ``results/`` stands for ``root``.
    """
    text = readme.read_text()
    changed = 0

    def sub(m: re.Match) -> str:
        nonlocal changed
        rel = m.group("path").strip()
        render = next((f for pat, f in README_RENDERERS if re.fullmatch(pat, rel)), None)
        if render is None:
            warn(f"README block {rel}: no renderer for this kind of CSV; left as is")
            return m.group(0)
        csv = root / rel[len("results/"):] if rel.startswith("results/") else readme.parent / rel
        if not csv.is_file():
            warn(f"README block {rel}: CSV missing; left as is")
            return m.group(0)
        try:
            body = render(pd.read_csv(csv), rel)
        except (KeyError, ValueError, IndexError, OSError, pd.errors.ParserError) as e:
            warn(f"README block {rel}: cannot render ({one_line(e, typed=True)}); left as is")
            return m.group(0)
        if body != m.group("body"):
            changed += 1
        return m.group(1) + body + m.group(4)

    new = _BLOCK.sub(sub, text)
    if new != text:
        tmp = readme.with_name(f".{readme.name}.tmp")
        tmp.write_text(new)
        os.replace(tmp, readme)
    return changed
