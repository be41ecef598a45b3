"""The figure pipeline end to end at toy scale: every stage writes its CSVs into a temporary results root, every
figure is drawn from those CSVs, and drawn again from the CSVs alone (``make figures``); the ``make reproduce``
driver (plan, skip-on-rerun, quick root, bad options) and the step timeline of figure 9.

Stages run in this process (Hydra's entry point with a patched argv) with tiny settings, so torch and timm are
imported once; one ``python -m benchmarks.reproduce quick=true`` subprocess runs two real stages through the driver.
"""
from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra.core.global_hydra import GlobalHydra

from benchmarks import figures, reproduce, sweep
from benchmarks.plots.readme import update_readme

pytestmark = pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema:UserWarning")

REPO = Path(__file__).resolve().parent.parent
FIGS = [f for _, f, _, _ in figures.FIGURES]


def run_app(app: str, argv: list[str], monkeypatch) -> int:
    """``python -m benchmarks.<app> <argv>`` in this process; returns the exit status."""
    mod = importlib.import_module(f"benchmarks.{app}")
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{app}.py", *argv])
    # An imported app would make Hydra look for a Python package ``conf``; as __main__ it uses the file's ../conf.
    monkeypatch.setenv("HYDRA_MAIN_MODULE", "__main__")
    GlobalHydra.instance().clear()
    try:
        if app in ("memory", "speed", "fit"):
            sweep.cli(app, mod.main)
        else:
            mod.main()
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        GlobalHydra.instance().clear()


@pytest.fixture(scope="module")
def toy_results(tmp_path_factory):
    """Every stage the figures read, at toy scale, into one results root (built once for this module)."""
    tmp = tmp_path_factory.mktemp("pipeline")
    R, H = tmp / "results", tmp / "outputs"
    mp = pytest.MonkeyPatch()
    sw = [f"out_dir={R}", f"hydra_dir={H}", "logger=disabled", "hydra/launcher=basic", "device=meta"]
    try:
        steps = [
            ("table", ["batch_size=2", "img_size=32", f"out_dir={R}", f"hydra.run.dir={H}/table"]),
            ("memory", ["-m", "model=test_resnet", "compression=none,authors_b1,pool4,full4",
                        "batch_size=2,4", "img_size=32", "saved_by_op=true", "sweep=memory_by_op", *sw]),
            ("memory", ["-m", "model=test_resnet", "compression=none,full4", "batch_size=2,4", "img_size=32",
                        "saved_by_op=false", "sweep=memory_batch", *sw]),  # figure 3 draws this sweep only
            ("fit", ["-m", "model=test_resnet", "compression=none,full4", "img_size=64",
                     "budgets_gib=[0.0078125,0.015625]", "max_batch=64", "sweep=fit_models", *sw]),
            ("speed", ["-m", "model=test_resnet", "compression=authors_b1,pool4", "batch_size=2", "img_size=32",
                       "warmup=0", "iters=1", "sweep=speed_cpu", *sw[:-1], "device=cpu"]),
            ("timeline", ["model=test_resnet", "batch_size=2", "img_size=32", f"out_dir={R}",
                          f"hydra.run.dir={H}/timeline"]),
            ("train", ["-m", "data=fashion_mnist", "data.subset_train=128", "data.subset_val=64", "model=test_resnet",
                       "compression=none,authors_b1,pool4", "epochs=2", "batch_size=32", "optim=sgd_cosine",
                       "grad_cosine=true", "memory=true", "progress=false", "logger=disabled", "name=toy",
                       f"hydra_dir={H}", *reproduce.train_callback_args(None, R / "train" / "toy", "[20,30]")]),
        ]
        for app, argv in steps:
            assert run_app(app, argv, mp) == 0, f"stage {app} failed"
    finally:
        mp.undo()
    # figure 10's table from the toy study's summary (a frontier study is that, over seeds; r50=False: the
    # figure then falls back to the trained model's own peak ratio, and no ResNet-50 is predicted here)
    from benchmarks.frontier import write_frontier

    (R / "train" / "frontier" / "toy").mkdir(parents=True)
    shutil.copy(R / "train" / "toy" / "summary.csv", R / "train" / "frontier" / "toy" / "summary.csv")
    write_frontier(R / "train" / "frontier", r50=False)
    return R


def test_every_figure_from_the_pipeline_csvs(toy_results, tmp_path, capsys):
    R = toy_results
    for csv in ["table/resnet18_b2_32px_conv_layers.csv", "memory/memory_by_op.csv", "memory/memory_batch.csv",
                "fit/fit_models.csv",
                "speed/speed_cpu.csv", "timeline/test_resnet_b2.csv", "train/toy/epochs.csv", "train/toy/summary.csv",
                "train/toy/grad_cosine.csv"]:
        assert (R / csv).is_file(), csv
    assert figures.main([f"results={R}", "strict=true"]) == 0
    for f in FIGS:
        assert (R / "figures" / f).stat().st_size > 10_000, f
    capsys.readouterr()

    # `make figures`: the CSVs alone (no records, no Hydra dirs, no PNGs) redraw every figure.
    only = tmp_path / "csv-only"
    for p in R.rglob("*.csv"):
        if "figures" not in p.parts:
            (only / p.relative_to(R)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, only / p.relative_to(R))
    assert not list(only.rglob("*.json"))
    assert figures.main([f"results={only}", "strict=true", "readme=none"]) == 0
    assert sorted(p.name for p in (only / "figures").glob("*.png")) == sorted(FIGS)

    # A missing CSV: one warning line and that figure skipped; strict=true makes it an error.
    (only / "timeline" / "test_resnet_b2.csv").unlink()
    (only / "figures" / FIGS[8]).unlink()
    assert figures.main([f"results={only}", "only=9"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "figure 9" in err[0] and "timeline" in err[0] and err[0].startswith("figures: warning")
    assert not (only / "figures" / FIGS[8]).exists()
    assert figures.main([f"results={only}", "only=9", "strict=true"]) == 1


def test_readme_blocks_render_from_csvs(toy_results, tmp_path):
    R = toy_results
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- BEGIN results/table/resnet18_b2_32px_saved_bytes.csv -->\nold\n"
                      "<!-- END results/table/resnet18_b2_32px_saved_bytes.csv -->\n"
                      "<!-- BEGIN results/fit/fit_models.csv -->\n\n<!-- END results/fit/fit_models.csv -->\n"
                      "<!-- BEGIN results/train/toy/summary.csv -->\nx\n<!-- END results/train/toy/summary.csv -->\n"
                      "<!-- BEGIN results/nothing.csv -->\nkeep\n<!-- END results/nothing.csv -->\nend\n")
    assert figures.main([f"results={R}", "only=1", f"readme={readme}"]) == 0
    text = readme.read_text()
    saved = pd.read_csv(R / "table/resnet18_b2_32px_saved_bytes.csv")
    row = saved.set_index("preset").loc["full4"]
    assert f"| full4 | {row.saved_mib:.1f} | {row.vs_none_pct:+.1f}% |" in text
    assert "Whole-model bytes saved for backward, timm resnet18, batch 2, 32 px" in text
    assert "| test_resnet | full4 |" in text and "| preset (vs `none`) |" in text
    assert "keep" in text and text.startswith("intro\n") and text.endswith("end\n")
    # rendering is idempotent
    assert update_readme(readme, R, lambda m: None) == 0


def test_committed_readme_tables_match_committed_csvs(tmp_path):
    """The README's marked tables are exactly what `make figures` renders from the committed CSVs."""
    copy = tmp_path / "README.md"
    shutil.copy(REPO / "README.md", copy)
    notes = []
    assert update_readme(copy, REPO / "results", notes.append) == 0, notes
    assert copy.read_text() == (REPO / "README.md").read_text()


def test_figures_bad_input(tmp_path, capsys):
    assert figures.main(["bogus=1"]) == 2
    assert figures.main([f"results={tmp_path / 'nope'}"]) == 2
    assert figures.main([f"results={tmp_path}", "only=12"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(err) == 3 and all(ln.startswith("figures: ") for ln in err)
    # an empty results root: every figure skipped with a warning, exit 0 (1 with strict=true)
    assert figures.main([f"results={tmp_path}", "readme=none"]) == 0
    assert figures.main([f"results={tmp_path}", "readme=none", "strict=true"]) == 1


def test_reproduce_plan_and_options(tmp_path, capsys):
    out = tmp_path / "rq"
    assert reproduce.main(["quick=true", f"out={out}", "dry_run=true", "paper=true", f"data.root={tmp_path}"]) == 0
    text = capsys.readouterr().out
    for name in ["table", "memory_by_op", "memory_batch", "fit", "speed", "whole_set_peak", "whole_set_speed", "grad_cosine",
                 "timeline", "train",
                 "gpu_memory", "gpu_fit", "paper_imagenet_resnet18", "figures"]:
        assert f"] {name}" in text, name
    assert "device=cuda" in text and f"out_dir={out}" in text and "readme=none" in text
    assert not out.exists()  # a dry run writes nothing
    # the CPU-scale plan never touches results-quick and quick never writes into results/
    assert reproduce.main(["dry_run=true", "paper=false"]) == 0
    text = capsys.readouterr().out
    assert "experiment=memory/memory_models" in text and "results-quick" not in text
    assert reproduce.main(["quick=true", f"out={REPO / 'results'}", "dry_run=true"]) == 2
    assert reproduce.main(["stages=nope", "dry_run=true", "paper=false"]) == 2
    assert reproduce.main(["quick=maybe"]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln]
    assert len(err) == 3 and all(ln.startswith("reproduce: ") for ln in err)


def test_reproduce_driver_runs_and_skips(tmp_path):
    """`make reproduce QUICK=1` through the real driver (two stages), then a rerun that skips them."""
    out = tmp_path / "rq"
    cmd = [sys.executable, "-m", "benchmarks.reproduce", "quick=true", f"out={out}", "stages=timeline,figures"]
    env = {**os.environ, "WANDB_MODE": "disabled"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "[1/2] timeline" in r.stdout and "[2/2] figures" in r.stdout and "summary" in r.stdout
    tl = pd.read_csv(out / "timeline" / "test_resnet_b8.csv")
    assert set(tl["preset"]) == {"none", "pool2", "full4"}
    assert (out / "figures" / "fig9_step_timeline.png").is_file()
    r = subprocess.run([*cmd[:-1], "stages=timeline", "fork=false"], cwd=REPO, capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0 and "timeline: done before" in r.stdout and "skipped" in r.stdout
    # The first run's stage times are kept, with provenance; the rerun measured nothing and logs nothing
    # (a fresh clone's `make reproduce` must leave the committed files as they are).
    st = pd.read_csv(out / "logs" / "reproduce_stages.csv")
    assert list(st["stage"]) == ["timeline", "figures", "TOTAL"]
    assert list(st["status"].fillna("")) == ["ok", "ok", ""]
    assert st["run_started"].nunique() == 1 and st["git_sha"].notna().all() and (st["seconds"] >= 0).all()


def test_step_timeline_matches_step_peak():
    from actcomp import ActcompError
    from actcomp.measure import PHASES, step_memory, step_timeline

    df = step_timeline("test_resnet", 4, img_size=32, preset="pool2")
    assert list(df.columns) == ["op_index", "op", "phase", "allocated_bytes"]
    assert df["op_index"].tolist() == list(range(len(df)))
    assert df["allocated_bytes"].max() == step_memory("test_resnet", 4, img_size=32, preset="pool2").peak_bytes
    seen = list(dict.fromkeys(df["phase"]))
    assert seen == [p for p in PHASES if p in seen] and {"forward", "backward", "optimizer"} <= set(seen)
    assert df["op"].iloc[-1] == "end" and "convolution.default" in set(df["op"])
    with pytest.raises(ActcompError):
        step_timeline("test_resnet", 0, img_size=32)
    with pytest.raises(ActcompError):
        step_timeline("not_a_model", 2)


def _speed_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    base = dict(app="speed", status="ok", message="", batch_size=16, img_size=128, amp=False, channels_last=False,
                optimizer="sgd", warmup=2, iters=5, git_sha="abc1234", device_name="cpu: x86_64 x2 threads",
                date="2026-11-29T00:00:00Z")
    pd.DataFrame([{**base, **r} for r in rows]).to_csv(path, index=False)


def test_fig8_error_bars_and_compiled_bars(tmp_path):
    """Figure 8 from an older speed CSV (one median per bar, no spread columns), then with the spread over blocks
    (error bars from ratio_q25/q75) and compiled rows (hatched bars beside the eager ones)."""
    from matplotlib.container import ErrorbarContainer

    from benchmarks.plots.data import Results
    from benchmarks.plots.speed import fig8_speed
    from benchmarks.plots.style import pyplot

    plt = pyplot()
    R = tmp_path / "results"
    old = [{"model.name": m, "compression.name": p, "ratio_to_none": r}
           for m, p, r in [("resnet50", "pool4", 1.11), ("resnet50", "full4", 1.34), ("resnet18", "full4", 1.47)]]
    _speed_csv(R / "speed" / "speed_cpu.csv", old)
    fig = fig8_speed(Results(R), plt)
    ax = fig.axes[0]
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert "one median of 5 interleaved steps per bar" in ax.get_title()
    assert sum(p.get_hatch() == "...." for p in ax.patches) == 0
    plt.close(fig)

    new = [{**r, "blocks": 3, "blocks_run": 3, "ratio_q25": r["ratio_to_none"] - 0.05,
            "ratio_q75": r["ratio_to_none"] + 0.1, "compile": False} for r in old]
    _speed_csv(R / "speed" / "speed_cpu.csv", new)
    comp = [{"model.name": "resnet50", "compression.name": p, "ratio_to_none": r, "ratio_q25": r - 0.02,
             "ratio_q75": r + 0.03, "blocks": 3, "blocks_run": 3, "compile": True}
            for p, r in [("pool4", 1.04), ("full4", 1.09)]]
    _speed_csv(R / "speed" / "speed_compiled.csv", comp)
    fig = fig8_speed(Results(R), plt)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 3  # resnet50 eager, resnet50 compiled, resnet18 eager
    segs = [s for c in bars for s in c.lines[2][0].get_segments()]
    spans = sorted(round(float(s[1][1] - s[0][1]), 6) for s in segs)
    assert spans == [0.05, 0.05, 0.15, 0.15, 0.15]  # q75 - q25 of each bar
    assert sum(p.get_hatch() == "...." for p in ax.patches) == 2  # the compiled bars
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert "torch.compile (vs compiled native)" in labels and "eager" in labels
    assert "interquartile range over blocks" in ax.get_title()
    assert ax.get_ylim()[1] >= 1.47 + 0.1
    plt.close(fig)


def test_fig8_point_measured_twice_shows_the_run_with_more_blocks(tmp_path):
    from benchmarks.plots.data import Results
    from benchmarks.plots.speed import fig8_speed
    from benchmarks.plots.style import pyplot

    plt = pyplot()
    R = tmp_path / "results"
    # The 5-block run first in the file, so that keeping the last row would pick the 3-block one.
    rows = [{"model.name": "resnet50", "compression.name": "pool4", "ratio_to_none": r, "ratio_q25": r - 0.01,
             "ratio_q75": r + 0.01, "blocks": b, "blocks_run": b, "compile": True} for r, b in [(1.01, 5), (0.92, 3)]]
    _speed_csv(R / "speed" / "speed_compiled.csv", rows)
    fig = fig8_speed(Results(R), plt)
    heights = [round(p.get_height(), 6) for p in fig.axes[0].patches if p.get_height() > 0]
    assert heights == [1.01]
    plt.close(fig)


def test_fig8_draws_the_newest_run_of_a_point_then_the_one_with_more_blocks():
    from benchmarks.plots.speed import one_run_per_point
    df = pd.DataFrame(dict(series="resnet50", mode="eager", preset=["full4"] * 4, blocks_run=[6, 3, 5, 5],
                           date=["2026-12-04", "2026-12-07", "2026-12-07", "2026-12-03"], ratio_to_none=[1, 2, 3, 4]))
    assert one_run_per_point(df)["ratio_to_none"].tolist() == [3]
