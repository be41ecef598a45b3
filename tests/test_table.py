"""The per-layer table app: CSVs with both baselines and provenance; bad input is one line, exit 2."""
import subprocess
import sys

import pandas as pd
import pytest


def _run(*args, cwd):
    return subprocess.run([sys.executable, "-m", "benchmarks.table", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_table_writes_layers_and_totals(tmp_path):
    r = _run("model=test_resnet", "batch_size=2", "img_size=32", "device=meta", f"out_dir={tmp_path}",
             f"hydra.run.dir={tmp_path}/h", cwd=".")
    assert r.returncode == 0, r.stderr
    layers = pd.read_csv(tmp_path / "table" / "test_resnet_b2_32px_conv_layers.csv")
    totals = pd.read_csv(tmp_path / "table" / "test_resnet_b2_32px_saved_bytes.csv").set_index("preset")
    assert layers.layer.iloc[-1] == "TOTAL"
    assert layers.input_mib.iloc[-1] == pytest.approx(layers.input_mib.iloc[:-1].sum())
    assert (layers.pool2_mib.iloc[:-1] <= layers.input_mib.iloc[:-1]).all()
    assert totals.loc["none", "vs_none_pct"] == 0 and totals.loc["authors_b1", "vs_authors_b1_pct"] == 0
    assert totals.loc["authors_b1", "saved_mib"] > totals.loc["none", "saved_mib"]  # the copy costs memory
    assert {"git_sha", "torch", "timm", "device", "date"} <= set(totals.columns)


@pytest.mark.parametrize("args,msg", [
    (["batch_size=0"], "batch_size must be >= 1"),
    (["presets=[pool3]"], "unknown preset 'pool3'"),
    (["model=resnt18"], "unknown model 'resnt18'"),
    (["batch_size=abc"], "batch_size must be >= 1 (an integer), got 'abc'"),
    (["img_size=2", "presets=[none,pool4]"], "img_size=2 is smaller than the 4x4 pooling block of preset 'pool4'"),
    (["img_size=3", "blocks=[4]", "presets=[none]"], "img_size=3 is smaller than the 4x4 block of blocks=[4]"),
])
def test_table_bad_input_one_line_exit_2(tmp_path, args, msg):
    (tmp_path / "table").mkdir()
    (tmp_path / "table" / "keep.csv").write_text("x\n1\n")  # <out_dir>/table/: where the table writes
    r = _run(*args, f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/h", cwd=".")
    assert r.returncode == 2
    assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert (tmp_path / "table" / "keep.csv").read_text() == "x\n1\n"
