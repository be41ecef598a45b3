"""Reading the result CSVs for the figures and README tables: one line when a CSV is missing, sweep frames,
provenance notes."""
from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from actcomp.errors import one_line

# The sweeps each figure draws (what make reproduce writes); any other CSV in the same folder, e.g. an ad-hoc
# sweep written with out_dir=results, is never drawn.
SWEEPS = {"fig2": "memory/memory_by_op.csv", "fig3": "memory/memory_batch.csv",
          "fig3_gpu": ("gpu/**/*.csv", "memory/gpu_memory.csv"), "fig4": ("fit/fit_models.csv", "fit/fit_models_cuda.csv"),
          "fig8": ("speed/speed_cpu.csv", "speed/speed_compiled.csv", "speed/whole_set_speed.csv")}


class Missing(Exception):
    """A CSV a figure needs is absent or unusable (one line: what is missing and how to produce it)."""


class Results:
    def __init__(self, root: Path):
        self.root = Path(root)

    def rel(self, p: Path) -> str:
        try:
            return str(Path(p).resolve().relative_to(Path.cwd().resolve()))
        except ValueError:
            return str(p)

    def csvs(self, pattern: str | tuple[str, ...], hint: str) -> list[Path]:
        pats = (pattern,) if isinstance(pattern, str) else pattern
        found = sorted({p for pat in pats for p in self.root.glob(pat) if p.is_file() and not p.name.startswith(".")})
        if not found:
            raise Missing(f"no {' nor '.join(f'{self.rel(self.root)}/{pat}' for pat in pats)} ({hint})")
        return found

    def read(self, path: Path, need: tuple[str, ...] = ()) -> pd.DataFrame:
        try:
            df = pd.read_csv(path)
        except (OSError, ValueError, pd.errors.ParserError) as e:
            raise Missing(f"{self.rel(path)} is unreadable: {one_line(e, typed=False)}") from None
        lack = [c for c in need if c not in df.columns]
        if lack:
            raise Missing(f"{self.rel(path)} lacks column(s) {', '.join(lack)}")
        return df

    def read_all(self, pattern: str | tuple[str, ...], hint: str, need: tuple[str, ...] = (), skip_lacking: bool = False
                 ) -> pd.DataFrame:
        """Every CSV matching ``pattern``, concatenated (``_source`` column). ``skip_lacking``: CSVs without the
        ``need`` columns are left out (e.g. peak-only sweeps for the by-op figure) instead of an error."""
        frames, lacking, cols = [], [], set()
        for p in self.csvs(pattern, hint):
            try:
                df = self.read(p, need)
            except Missing as e:
                if not skip_lacking or "lacks column" not in str(e):
                    raise
                lacking.append(self.rel(p))
                cols.update(str(e).rsplit("lacks column(s) ", 1)[-1].split(", "))
                continue
            df["_source"] = self.rel(p)
            frames.append(df)
        if not frames:
            raise Missing(f"{', '.join(lacking)} lack(s) column(s) {', '.join(sorted(cols))} ({hint})")
        return pd.concat(frames, ignore_index=True)


def sweep_frame(df: pd.DataFrame) -> pd.DataFrame:
    """A sweep CSV (benchmarks/sweep/ layout) with short column names; ok points only."""
    df = df.rename(columns={"model.name": "model", "compression.name": "preset", "device.name": "device"})
    if "status" in df:
        df = df[df["status"] == "ok"]
    return df.copy()


def default_settings(df: pd.DataFrame) -> pd.DataFrame:
    """Keep the default training-step settings (fp32, no AMP, NCHW, SGD) where a sweep varied them."""
    for col, val in (("amp", False), ("channels_last", False)):
        if col in df:
            df = df[df[col].astype(str).str.lower() == str(val).lower()]
    if "dtype" in df:
        df = df[df["dtype"].astype(str) == "float32"]
    if "optimizer" in df:
        df = df[df["optimizer"].astype(str) == "sgd"]
    return df


def most_common(s: pd.Series):
    return s.value_counts().index[0]


def provenance_note(df: pd.DataFrame) -> str:
    """Every device, git sha and date among the rows drawn (not the most common one: a figure that mixes runs
    must say so)."""
    def every(col: str, n: int | None = None) -> list[str]:
        return sorted({str(v)[:n] for v in df[col].dropna()}) if col in df else []

    bits = []
    for col in ("device_name", "device"):
        if every(col):
            bits.append(" + ".join(every(col)))
            break
    if every("git_sha"):
        bits.append("git " + ", ".join(every("git_sha")))
    if every("date"):
        bits.append(", ".join(every("date", 10)))
    return ", ".join(bits)



def budget_cols(df: pd.DataFrame, prefix: str) -> list[tuple[str, float]]:
    out = []
    for c in df.columns:
        m = re.fullmatch(prefix + r"(\d+(?:p\d+)?)gib", c)
        if m:
            out.append((c, float(m.group(1).replace("p", "."))))
    return sorted(out, key=lambda t: t[1])


def lower_bound(row: pd.Series, max_col: str) -> bool:
    """The fit app marks an answer that hit its search ceiling (max_batch) as a lower bound."""
    v = row.get(max_col.replace("max_batch_", "lower_bound_", 1))
    return bool(v) if pd.notna(v) and str(v).lower() not in ("false", "0") else False

