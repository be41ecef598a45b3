"""The per-op exactness app (README "Exactness, per op"): what each op claims to be exact is bitwise native,
the approximations are real and bounded, bad input exits 2 without touching an earlier CSV, and the README table
is rendered from the committed CSV."""
from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
from test_figures import run_app

from benchmarks import exactness, reproduce
from benchmarks.plots import tables

pytestmark = pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema:UserWarning")

REPO = Path(__file__).resolve().parent.parent
PROV = ["git_sha", "torch_version", "timm_version", "python_version", "device_name", "date"]


def run(argv: list[str], monkeypatch) -> int:
    threads = torch.get_num_threads()
    try:
        return run_app("exactness", argv, monkeypatch)
    finally:
        torch.set_num_threads(threads)  # the app sets one thread for the whole process


def test_exactness_claims_hold_and_approximations_are_bounded(tmp_path, monkeypatch):
    out = tmp_path / "ex" / "exactness"  # out_dir is the results root
    argv = [f"out_dir={out.parent}", f"hydra.run.dir={tmp_path / 'h'}", "conv_inputs=[noise,block_constant]",
            "conv_presets=[authors_b1,pool2,pool4,maxpool2,int8]", "parts=[ops]"]
    assert run(argv, monkeypatch) == 0
    df = pd.read_csv(out / "exactness.csv")
    assert set(PROV) <= set(df.columns) and (df["torch_threads"] == 1).all()
    # Every output an op claims to be exact is bitwise native PyTorch; forward outputs always are.
    assert df[df["exact_by_design"]]["bitwise"].all()
    assert df[df["output"] == "forward"]["bitwise"].all()
    conv_w = df[df["op"].str.startswith("conv") & (df["output"] == "weight")].set_index(["input", "preset"])
    blocks, noise = "N(0, 1), constant on 4×4 blocks", "N(0, 1) i.i.d."
    # Pooling loses nothing when the input is constant over the blocks, up to rounding of the mean and summation
    # order: on CPU the weight gradient is summed at block resolution (ops/blockgrad.py), in another order than
    # native's fp32 sum, whose own error against fp64 is ~1.5e-6 here (tests/test_blockgrad.py)...
    for p in ("pool2", "pool4", "maxpool2"):
        assert conv_w.loc[(blocks, p), "rel_l2"] < 1e-5, p
    # ...and is a real approximation on noise.
    assert conv_w.loc[(noise, "pool4"), "rel_l2"] > 0.1
    assert conv_w.loc[(noise, "authors_b1"), "bitwise"]
    # The whole-set 8-bit codes stay within the bounds the README states (Hardswish, Hardsigmoid: kinks of their derivative).
    ws = df[(df["preset"] == exactness.WHOLE_SET) & ~df["bitwise"]]
    assert len(ws) and ws["op"].nunique() >= 8
    bound = ws["op"].str.startswith("Hardswish").map({True: 6e-2, False: 2e-2})
    bound[ws["op"].str.startswith("Hardsigmoid")] = 7e-2  # its derivative jumps 1/6 -> 0 at ±3 (measured 6.0%)
    assert (ws["rel_l2"] <= bound).all(), ws[ws["rel_l2"] > bound]
    relu = df[df["op"].str.startswith("ReLU,") & (df["output"] == "input")].set_index("preset")
    assert relu.loc[exactness.WHOLE_SET, "bitwise"] and not relu.loc["int8", "bitwise"]
    # The README renderer turns it into the two tables.
    md = tables.md_exactness(df, "results/exactness/exactness.csv")
    assert "| pool4 | bitwise | " in md and "| ReLU, 1-bit mask | N(1, 3²)" in md


def test_exactness_bad_input_exits_2_and_keeps_earlier_csv(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ex" / "exactness"  # out_dir is the results root
    out.mkdir(parents=True)
    (out / "exactness.csv").write_text("earlier\n")
    base = [f"out_dir={out.parent}", f"hydra.run.dir={tmp_path / 'h'}"]
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


def test_self_padding_convs_lose_block_alignment_and_keep_pad_input(tmp_path, monkeypatch):
    """A conv that pads its input itself pools the padded tensor: on a block-constant input the zero-padded conv
    is exact under pool4, the shifted ones are not; F.pad's saved input and StdConv's weight copy stay full."""
    out = tmp_path / "ex" / "exactness"  # out_dir is the results root
    argv = [f"out_dir={out.parent}", f"hydra.run.dir={tmp_path / 'h'}", "parts=[padding]", "padding.inputs=[block_constant]",
            "padding.presets=[pool4]", "padding.bytes_presets=[pool4]"]
    assert run(argv, monkeypatch) == 0
    assert not (out / "exactness.csv").exists() and not (out / "whole_model.csv").exists()
    df = pd.read_csv(out / "padding.csv")
    assert set(PROV) <= set(df.columns) and (df["torch_threads"] == 1).all()
    w = df[df["part"] == "weight_grad"].set_index("conv")["rel_l2"]
    # blocks still start at the image's corner: exact up to rounding of the block means and summation order (see
    # test_exactness_claims_hold_and_approximations_are_bounded)
    for c in ("zero padding 3×3 s1 (reference)", "zero padding 3×3 s2 (reference)", "timm Conv2dSame 3×3 s2 ('same')",
              "timm StdConv2d 3×3 s1"):
        assert w[c] < 1e-5, c
    # padded before the image: every block is shifted
    for c in ("reflect padding 3×3 s1", "replicate padding 3×3 s1", "circular padding 3×3 s1",
              "timm Conv2dSame 4×4 s1 ('same')"):
        assert w[c] > 0.3, c
    b = df[df["part"] == "saved_bytes"].set_index("conv")
    n, c, h = 8, 16, 32  # the block-constant input, fp32
    assert b.loc["zero padding 3×3 s1 (reference)", "saved_bytes"] == n * c * (h // 4) ** 2 * 4
    assert b.loc["zero padding 3×3 s1 (reference)", "saved_bytes_native"] == n * c * h * h * 4
    # reflect: F.pad keeps the full input, the conv the 4×4-pooled 34×34 padded tensor (9×9 blocks)
    assert b.loc["reflect padding 3×3 s1", "saved_bytes"] == n * c * h * h * 4 + n * c * 9 * 9 * 4
    assert b.loc["reflect padding 3×3 s1", "ratio_to_native"] > 0.5
    # StdConv: the standardized 32×16×3×3 weight is saved in full next to the pooled input
    assert b.loc["timm StdConv2d 3×3 s1", "saved_bytes"] >= n * c * (h // 4) ** 2 * 4 + 32 * c * 9 * 4
    md = tables.md_exactness_padding(df, "results/exactness/padding.csv")
    assert "| reflect padding 3×3 s1 | " in md and "saved vs native, pool4" in md


def test_whole_model_cosine_tiny(tmp_path, monkeypatch):
    out = tmp_path / "ex" / "exactness"  # out_dir is the results root
    argv = [f"out_dir={out.parent}", f"hydra.run.dir={tmp_path / 'h'}", "parts=[whole_model]", "whole_model.input=noise",
            "whole_model.models=[test_resnet]", "whole_model.presets=[none,full2]", "whole_model.points=[[2,32]]"]
    assert run(argv, monkeypatch) == 0
    df = pd.read_csv(out / "whole_model.csv").set_index("preset")
    assert set(PROV) <= set(df.columns) and list(df.index) == ["none", "full2"]
    # same init, same batch: the unconverted model reproduces native bitwise, the compressed one does not
    assert df.loc["none", "cosine"] == pytest.approx(1.0, abs=1e-12) and df.loc["none", "rel_l2"] == 0
    assert -1 <= df.loc["full2", "cosine"] < 1 and df.loc["full2", "rel_l2"] > 0
    md = tables.md_whole_model(df.reset_index(), "results/exactness/whole_model.csv")
    assert "| test_resnet | full2 | " in md and "batch 2, 32 px" in md


def test_exactness_parts_bad_input_exits_2_and_keeps_earlier_csvs(tmp_path, monkeypatch, capsys):
    out = tmp_path / "ex" / "exactness"  # out_dir is the results root
    out.mkdir(parents=True)
    for f in ("exactness.csv", "padding.csv", "whole_model.csv"):
        (out / f).write_text("earlier\n")
    base = [f"out_dir={out.parent}", f"hydra.run.dir={tmp_path / 'h'}", "conv_inputs=[noise]", "padding.inputs=[noise]"]
    assert run([*base, "parts=[ops,bogus]"], monkeypatch) == 2
    assert run([*base, "parts=[padding]", "padding.bytes_presets=[int8]"], monkeypatch) == 2
    assert run([*base, "parts=[whole_model]", "whole_model.points=[[2]]"], monkeypatch) == 2
    assert run([*base, "parts=[whole_model]", "whole_model.input=cats"], monkeypatch) == 2
    # a later part failing leaves the earlier parts' CSVs unwritten too
    assert run([*base, "parts=[padding,whole_model]", "whole_model.presets=[nope]"], monkeypatch) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 5 and all(ln.startswith("error: ") for ln in err), err
    assert "bogus" in err[0] and "int8" in err[1] and "cats" in err[3] and "nope" in err[4]
    for f in ("exactness.csv", "padding.csv", "whole_model.csv"):
        assert (out / f).read_text() == "earlier\n", f


def test_committed_limits_csvs_back_the_readme(capsys):
    text = (REPO / "README.md").read_text()
    for f in ("padding.csv", "whole_model.csv"):
        df = pd.read_csv(REPO / "results/exactness" / f)
        assert set(PROV) <= set(df.columns) and (df["torch_threads"] == 1).all()
        assert not df["git_sha"].str.endswith("dirty").any()
        assert f"<!-- BEGIN results/exactness/{f} -->" in text  # its content: test_figures checks it
    # make reproduce writes them (the exactness stage's outputs)
    stage = next(s for s in reproduce.plan(reproduce.parse(["paper=false"])) if s.name == "exactness")
    assert {p.name for p in stage.outputs} == {"exactness.csv", "padding.csv", "whole_model.csv"}
