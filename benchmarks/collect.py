"""Aggregate sweep results into one tidy CSV per sweep (what the multirun-end callback does, on demand).

    python -m benchmarks.collect outputs/memory/adhoc/multirun-2026-01-01_12-00-00   # a Hydra sweep dir
    python -m benchmarks.collect results/                                          # rebuild every sweep's CSV
    python -m benchmarks.collect /scratch/slurm-sweep --out-dir results            # a sweep run elsewhere

Use it after a sweep was interrupted or ran on a cluster: each job's summary.json is copied into
results/<app>/<sweep>/ (if that point is not there yet) and results/<app>/<sweep>.csv is rebuilt atomically.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from actcomp.errors import one_line

from .sweep import BenchError, collect


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.collect", description=__doc__.splitlines()[0])
    ap.add_argument("dirs", nargs="+", type=Path, help="Hydra run/multirun dirs, records folders or results/")
    ap.add_argument("--out-dir", type=Path, default=None,
                    help="results root for records found in Hydra dirs (default: each job's own out_dir)")
    args = ap.parse_args(argv)
    try:
        written = collect(args.dirs, out_dir=args.out_dir)
    except BenchError as e:
        print(f"collect: {one_line(e)}", file=sys.stderr)
        return 2
    if not written:
        print(f"collect: no sweep records or job summaries under {', '.join(map(str, args.dirs))}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
