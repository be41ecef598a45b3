"""Draw every figure of the study from the committed CSVs alone (nothing is run), and refresh the README tables.

    python -m benchmarks.figures                          # results/ -> results/figures/*.png, README.md tables
    python -m benchmarks.figures results=results-quick    # another results root (README left alone)
    python -m benchmarks.figures strict=true only=3,9     # exit 1 if a figure's CSV is missing; some figures only

Options (key=value): ``results`` (results root, default ``results``), ``out`` (default ``<results>/figures``),
``readme`` (``auto``: README.md next to this repo's ``results/`` when that is the root drawn from; a path; or
``none``), ``strict`` (a missing or unreadable CSV is an error, exit status 1; default: a one-line warning and
that figure is skipped), ``only`` (comma-separated figure numbers).

Every number drawn comes from a CSV written by a real run (the apps in ``benchmarks/``); titles say whether a
value is predicted (meta device) or measured (CPU, GPU). The README's blocks between
``<!-- BEGIN <csv path> -->`` and ``<!-- END <csv path> -->`` are re-rendered from that CSV.

The drawing lives in ``benchmarks/plots/`` (style, data, one module per figure family, README tables); this module
is the command line only.
"""
from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

from actcomp.errors import one_line

from .cli import flag, parse_kv
from .plots import FIGURES
from .plots.data import Missing, Results
from .plots.readme import update_readme
from .plots.style import pyplot

REPO = Path(__file__).resolve().parent.parent

# ------------------------------------------------------------------------------------------ CLI

def parse_args(argv: list[str]) -> dict:
    opts = parse_kv(argv, dict(results="results", out=None, readme="auto", strict="false", only=""), __doc__)
    opts["strict"] = flag(opts, "strict")
    try:
        opts["only"] = {int(x) for x in opts["only"].split(",") if x.strip()}
    except ValueError:
        raise ValueError(f"only={opts['only']!r}: give figure numbers, e.g. only=1,3") from None
    bad = opts["only"] - {n for n, *_ in FIGURES}
    if bad:
        raise ValueError(f"only: no figure {sorted(bad)}; figures are 1-{len(FIGURES)}")
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        opts = parse_args(argv)
    except ValueError as e:
        print(f"figures: {e}", file=sys.stderr)
        return 2
    root = Path(opts["results"]).expanduser()
    if not root.is_dir():
        print(f"figures: results folder {root} does not exist (run: make reproduce, or make reproduce QUICK=1)",
              file=sys.stderr)
        return 2
    out = Path(opts["out"]).expanduser() if opts["out"] else root / "figures"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        print(f"figures: output folder {out} is not writable ({e.strerror or e})", file=sys.stderr)
        return 2
    plt = pyplot()
    R = Results(root)
    t0 = time.perf_counter()
    drawn, skipped, failed = [], [], []
    for num, fname, fn, desc in FIGURES:
        if opts["only"] and num not in opts["only"]:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # tight_layout notes on dense panels
                fig = fn(R, plt)
                fig.savefig(out / fname, bbox_inches="tight")
            plt.close(fig)
            drawn.append(fname)
            print(f"figure {num}: {R.rel(out / fname)}")
        except Missing as e:
            plt.close("all")
            skipped.append(num)
            print(f"figures: {'error' if opts['strict'] else 'warning'}: figure {num} ({desc}) skipped: {e}",
                  file=sys.stderr)
        except Exception as e:  # noqa: BLE001  a bug or an unforeseen CSV: one line, the other figures still drawn
            plt.close("all")
            failed.append(num)
            print(f"figures: error: figure {num} ({desc}) failed: {one_line(e, typed=True)}", file=sys.stderr)
    readme = None
    if opts["readme"] == "auto":
        if root.resolve() == (REPO / "results").resolve() and (REPO / "README.md").is_file():
            readme = REPO / "README.md"
    elif opts["readme"].lower() not in ("none", "false", ""):
        readme = Path(opts["readme"]).expanduser()
        if not readme.is_file():
            print(f"figures: readme={readme}: no such file", file=sys.stderr)
            return 2
    if readme is not None:
        warn = lambda m: print(f"figures: warning: {m}", file=sys.stderr)  # noqa: E731
        n = update_readme(readme, root, warn)
        print(f"{readme}: {n} table(s) updated from the CSVs")
    print(f"figures: {len(drawn)} drawn, {len(skipped)} skipped, {len(failed)} failed, into {R.rel(out)} in "
          f"{time.perf_counter() - t0:.1f}s")
    return 1 if failed or (skipped and opts["strict"]) else 0


if __name__ == "__main__":
    sys.exit(main())
