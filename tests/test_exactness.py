"""The per-op exactness app (README "Exactness, per op"): what each op claims to be exact is bitwise native,
the approximations are real and bounded, bad input exits 2 without touching an earlier CSV, and the README table
is rendered from the committed CSV."""
from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra.core.global_hydra import GlobalHydra

from benchmarks import exactness, figures, reproduce

pytestmark = pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema:UserWarning")

REPO = Path(__file__).resolve().parent.parent
PROV = ["git_sha", "torch_version", "timm_version", "python_version", "device_name", "date"]


def run(argv: list[str], monkeypatch) -> int:
    monkeypatch.setattr(sys, "argv", ["benchmarks/exactness.py", *argv])
    monkeypatch.setenv("HYDRA_MAIN_MODULE", "__main__")
    threads = torch.get_num_threads()
    GlobalHydra.instance().clear()
    try:
        exactness.main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        GlobalHydra.instance().clear()
        torch.set_num_threads(threads)  # the app sets one thread for the whole process


def test_exactness_claims_hold_and_approximations_are_bounded(tmp_path, monkeypatch):
    out = tmp_path / "ex"
    argv = [f"out_dir={out}", f"hydra.run.dir={tmp_path / 'h'}", "conv_inputs=[noise,block_constant]",
            "conv_presets=[authors_b1,pool2,pool4,maxpool2,int8]"]
    assert run(argv, monkeypatch) == 0
    df = pd.read_csv(out / "exactness.csv")
    assert set(PROV) <= set(df.columns) and (df["torch_threads"] == 1).all()
    # Every output an op claims to be exact is bitwise native PyTorch; forward outputs always are.
    assert df[df["exact_by_design"]]["bitwise"].all()
    assert df[df["output"] == "forward"]["bitwise"].all()
    conv_w = df[df["op"].str.startswith("conv") & (df["output"] == "weight")].set_index(["input", "preset"])
    blocks, noise = "N(0, 1), constant on 4×4 blocks", "N(0, 1) i.i.d."
    # Pooling loses nothing when the input is constant over the blocks (up to rounding of the mean)...
    for p in ("pool2", "pool4", "maxpool2"):
        assert conv_w.loc[(blocks, p), "rel_l2"] < 1e-6, p
    # ...and is a real approximation on noise.
    assert conv_w.loc[(noise, "pool4"), "rel_l2"] > 0.1
    assert conv_w.loc[(noise, "authors_b1"), "bitwise"]
    # The whole-set 8-bit codes stay within the bounds the README states (Hardswish: kinks of its derivative).
    ws = df[(df["preset"] == exactness.WHOLE_SET) & ~df["bitwise"]]
    assert len(ws) and ws["op"].nunique() >= 8
    bound = ws["op"].str.startswith("Hardswish").map({True: 6e-2, False: 2e-2})
    assert (ws["rel_l2"] <= bound).all(), ws[ws["rel_l2"] > bound]
    relu = df[df["op"].str.startswith("ReLU,") & (df["output"] == "input")].set_index("preset")
    assert relu.loc[exactness.WHOLE_SET, "bitwise"] and not relu.loc["int8", "bitwise"]
    # The README renderer turns it into the two tables.
    md = figures.md_exactness(df, "results/exactness/exactness.csv")
    assert "| pool4 | bitwise | " in md and "| ReLU, 1-bit mask | N(1, 3²)" in md


def test_exactness_bad_input_exits_2_and_keeps_earlier_csv(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ex"
    out.mkdir()
    (out / "exactness.csv").write_text("earlier\n")
    base = [f"out_dir={out}", f"hydra.run.dir={tmp_path / 'h'}"]
    assert run([*base, "conv_presets=[pool4,nope]"], monkeypatch) == 2
    assert run([*base, "conv_inputs=[bogus]", "conv_presets=[pool2]"], monkeypatch) == 2
    assert run([*base, "conv_inputs=[]"], monkeypatch) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 3 and all(ln.startswith("error: ") for ln in err), err
    assert "nope" in err[0] and "bogus" in err[1]
    assert (out / "exactness.csv").read_text() == "earlier\n"


def test_committed_exactness_csv_backs_the_readme(capsys):
    csv = REPO / "results/exactness/exactness.csv"
    df = pd.read_csv(csv)
    assert set(PROV) <= set(df.columns) and (df["torch_threads"] == 1).all()
    assert not df["git_sha"].str.endswith("dirty").any()
    text = (REPO / "README.md").read_text()
    assert "<!-- BEGIN results/exactness/exactness.csv -->" in text  # its content: test_figures checks it
    # make reproduce runs it
    assert reproduce.main(["dry_run=true", "paper=false", "stages=exactness", "force=true"]) == 0
    assert "python -m benchmarks.exactness out_dir=" in capsys.readouterr().out
