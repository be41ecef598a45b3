"""Harness trust (issue 10): where ad-hoc runs write, one-line errors instead of tracebacks, no silent data loss,
what figures draw and what their footers say, file modes. Tiny models, W&B off; apps run in this process."""
from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from test_benchmarks import CONF, TINY, _results_snapshot, last_line, run_app

from benchmarks import exactness, figures, sweep
from benchmarks.common import atomic_write
from benchmarks.hydra_conf import VERSION_BASE
from benchmarks.plots import data as plot_data
from benchmarks.plots import memory as plot_memory
from benchmarks.plots import style as plot_style
from benchmarks.plots.readme import README_RENDERERS
from benchmarks.plots.tables import md_fit, md_peak

pytestmark = pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema:UserWarning")
REPO = Path(__file__).resolve().parent.parent


# ------------------------------------------------------------------------------------------ 7: where runs write

@pytest.mark.parametrize("app", ["memory", "fit", "speed", "table", "timeline", "exactness", "train"])
def test_ad_hoc_runs_default_to_git_ignored_scratch(app):
    # one results root for every app (conf/paths/default.yaml); each app writes under <out_dir>/<app>/
    with initialize_config_dir(config_dir=CONF, version_base=VERSION_BASE):
        assert compose(app).out_dir == "scratch"
    assert "scratch/" in (REPO / ".gitignore").read_text().split()


def test_reproduce_writes_results_explicitly(tmp_path):
    from benchmarks import reproduce

    o = reproduce.parse(["paper=false", "dry_run=true"])
    for st in reproduce.plan(o):
        if st.module in ("benchmarks.memory", "benchmarks.fit", "benchmarks.speed", "benchmarks.table",
                         "benchmarks.timeline", "benchmarks.exactness", "benchmarks.train"):
            outs = [a for a in st.args if a.startswith("out_dir=")]
            assert outs and outs[0].split("=", 1)[1].startswith(str(REPO / "results")), st.name


def test_all_points_done_says_so_and_how_to_redo(tmp_path, monkeypatch, capsys):
    args = ["model=test_resnet", "batch_size=2", "saved_by_op=false", *TINY]
    assert run_app("memory", args, tmp_path, monkeypatch) == 0
    assert "already done" not in capsys.readouterr().out
    assert run_app("memory", args, tmp_path, monkeypatch) == 0
    out = capsys.readouterr().out
    assert "every point was already done" in out and "force=true" in out and "out_dir=" in out


# ------------------------------------------------------------------------------------------ 12: one-line errors

def test_multirun_with_failed_points_ends_with_a_count_and_exit_1(tmp_path, monkeypatch, capsys):
    args = ["-m", "model=test_resnet", "batch_size=2,0", "saved_by_op=false", *TINY]
    assert run_app("memory", args, tmp_path, monkeypatch) == 1
    line, _ = last_line(capsys)
    assert "1 of 2 points failed" in line and "t.csv" in line
    df = pd.read_csv(tmp_path / "results" / "memory" / "t.csv")
    assert sorted(df.status) == ["error", "ok"]  # both recorded all the same


def test_collect_warns_on_truncated_or_incomplete_records(tmp_path, monkeypatch, capsys):
    assert run_app("memory", ["-m", "model=test_resnet", "batch_size=2,4", "saved_by_op=false", *TINY],
                   tmp_path, monkeypatch) == 0
    rec_dir = tmp_path / "results" / "memory" / "t"
    recs = sorted(rec_dir.glob("*.json"))
    recs[0].write_text(recs[0].read_text()[:50])  # truncated
    # a job summary without its app/sweep keys (e.g. written by an older version)
    job = next((tmp_path / "outputs").rglob("summary.json"))
    d = json.loads(job.read_text())
    del d["app"]
    job.write_text(json.dumps(d))
    capsys.readouterr()
    from benchmarks import collect

    assert collect.main([str(tmp_path / "outputs"), str(tmp_path / "results")]) == 0
    err = capsys.readouterr().err
    assert f"{recs[0]}: unreadable" in err and "left out of t.csv" in err
    assert "lacks key(s) app" in err
    assert len(pd.read_csv(tmp_path / "results" / "memory" / "t.csv")) == 1


def test_whole_set_peak_every_point_of_a_model_fails_no_traceback(tmp_path, monkeypatch):
    """The whole-set peak experiment: a model that cannot be built is recorded as error points, the rest measured."""
    args = ["-m", "experiment=memory/whole_set_peak_quick", "model=test_resnet", "model.name=test_resnet,no_such_model",
            "compression=none,pool4", "batch_size=2", "img_size=32", "logger=disabled"]
    assert run_app("memory", args, tmp_path, monkeypatch) == 1
    df = pd.read_csv(tmp_path / "results" / "memory" / "whole_set_peak.csv")
    assert sorted(zip(df["model.name"], df.status)) == [("no_such_model", "error"), ("no_such_model", "error"),
                                                        ("test_resnet", "ok"), ("test_resnet", "ok")]
    assert df[df["model.name"] == "no_such_model"].peak_bytes.isna().all()


def test_quick_experiments_keep_user_overrides():
    """Toy scale is configuration: the _quick experiment's values, except where the command line gives one."""
    with initialize_config_dir(config_dir=CONF, version_base=VERSION_BASE):
        peak = compose("memory", overrides=["experiment=memory/whole_set_peak_quick", "img_size=32"])
        speed = compose("speed", overrides=["experiment=speed/whole_set_speed_quick", "iters=3"])
        cos = compose("exactness", overrides=["experiment=exactness/grad_cosine_quick", "grad_cosine.warm_steps=5"])
    assert peak.img_size == 32 and peak.batch_size == 8 and peak.sweep == "whole_set_peak"  # the user's, quick's
    assert speed.iters == 3 and speed.warmup == 1 and speed.batch_size == 4
    assert cos.grad_cosine.warm_steps == 5 and cos.grad_cosine.model == "test_resnet" and list(cos.parts) == [
        "grad_cosine"]


def test_grad_cosine_bad_input_exit_2_nothing_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["exactness", "experiment=exactness/grad_cosine", "grad_cosine.batch_size=abc",
                                      f"out_dir={tmp_path / 'ws'}", f"hydra.run.dir={tmp_path / 'h'}"])
    monkeypatch.setenv("HYDRA_MAIN_MODULE", "__main__")
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as e:
        exactness.main()
    GlobalHydra.instance().clear()
    assert e.value.code == 2 and not (tmp_path / "ws").exists()
    assert capsys.readouterr().err.strip().splitlines() == [
        "error: grad_cosine.batch_size must be an int >= 1, got 'abc'"]


# ------------------------------------------------------------------------------------------ 13: no silent loss

def test_fit_answer_at_max_batch_is_a_lower_bound(tmp_path, monkeypatch):
    args = ["model=test_resnet", "compression=full4", "img_size=64", "budgets_gib=[0.001,1]", "max_batch=4", *TINY]
    assert run_app("fit", args, tmp_path, monkeypatch) == 0
    r = pd.read_csv(tmp_path / "results" / "fit" / "t.csv").iloc[0]
    assert r.max_batch_1gib == 4 and bool(r.lower_bound_1gib)
    assert r.max_batch_0p001gib < 4 and not bool(r.lower_bound_0p001gib)
    assert "hit max_batch=4: lower bounds" in r.fit_note
    # figures and the README table mark it
    md = md_fit(pd.read_csv(tmp_path / "results" / "fit" / "t.csv"), "x")
    assert "| ≥4 |" in md


def test_fit_cpu_budget_above_ram_not_searched(tmp_path, monkeypatch):
    from benchmarks import fit

    ram = fit.machine_ram()
    assert ram and ram > 2**30
    huge = int(ram / 2**30 * 4)
    args = ["model=test_resnet", "compression=full4", "img_size=64", "device=cpu", f"budgets_gib=[1,{huge}]",
            "max_batch=4", *TINY]
    assert run_app("fit", args, tmp_path, monkeypatch) == 0
    r = pd.read_csv(tmp_path / "results" / "fit" / "t.csv").iloc[0]
    assert r.max_batch_1gib == 4 and pd.isna(r[f"max_batch_{huge}gib"])  # the smaller answer is kept
    assert "RAM: not searched" in r.fit_note


def test_fit_cpu_every_budget_above_ram_one_line(seeded, monkeypatch, capsys):
    from benchmarks import fit

    huge = int(fit.machine_ram() / 2**30 * 4)
    capsys.readouterr()
    before = _results_snapshot(seeded)
    assert run_app("fit", ["model=test_resnet", "device=cpu", f"budgets_gib=[{huge}]", *TINY], seeded,
                   monkeypatch) == 2
    line, lines = last_line(capsys)
    assert "exceeds this machine's" in line and "device=meta" in line and len(lines) == 1
    assert _results_snapshot(seeded) == before


def test_timeline_device_cpu_from_the_command_line(tmp_path, monkeypatch):
    from test_figures import run_app as run_plain

    out = tmp_path / "tl"
    assert run_plain("timeline", ["model=test_resnet", "device=cpu", "batch_size=2", "img_size=32",
                                  "presets=[none]", f"out_dir={out}", f"hydra.run.dir={tmp_path}/h"], monkeypatch) == 0
    df = pd.read_csv(out / "timeline" / "test_resnet_b2.csv")
    assert (df.method == "memtracker-cpu (measured)").all() and df.allocated_bytes.max() > 0


@pytest.mark.parametrize("args,msg", [(["batch_size=abc"], "batch_size='abc': must be an integer >= 1"),
                                      (["presets=[pool4]", "img_size=2"], "img_size=2 is smaller than the 4x4"),
                                      (["device=gpu"], "unknown device 'gpu'")])
def test_timeline_bad_input_one_line(tmp_path, monkeypatch, capsys, args, msg):
    from benchmarks import timeline

    monkeypatch.setattr(sys, "argv", ["timeline", "model=test_resnet", *args, f"out_dir={tmp_path / 'tl'}",
                                      f"hydra.run.dir={tmp_path}/h"])
    monkeypatch.setenv("HYDRA_MAIN_MODULE", "__main__")
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with pytest.raises(SystemExit) as e:
        sweep.cli("timeline", timeline.main)
    GlobalHydra.instance().clear()
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "tl").exists()


# ------------------------------------------------------------------------------------------ figures

def _fig_root(tmp_path: Path) -> Path:
    R = tmp_path / "results"
    for rel in ("memory/memory_batch.csv", "speed/speed_cpu.csv", "timeline/resnet18_b64.csv"):
        (R / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "results" / rel, R / rel)
    return R


def test_figures_draw_only_their_sweeps_and_name_every_run(tmp_path):
    R = _fig_root(tmp_path)
    adhoc = pd.read_csv(R / "memory/memory_batch.csv")
    adhoc["git_sha"] = "adhoc0000000"
    adhoc.to_csv(R / "memory/adhoc.csv", index=False)
    mixed = pd.read_csv(R / "memory/memory_batch.csv")
    mixed.loc[0, "git_sha"], mixed.loc[0, "date"] = "second000000", "2030-01-02T00:00:00Z"
    mixed.to_csv(R / "memory/memory_batch.csv", index=False)
    plt = plot_style.pyplot()
    fig = plot_memory.fig3_peak_vs_batch(plot_data.Results(R), plt)
    footer = " ".join(t.get_text() for t in fig.texts)
    plt.close(fig)
    assert "memory_batch.csv" in footer and "adhoc" not in footer
    assert "second000000" in footer and "2030-01-02" in footer  # every sha and date, not the most common
    for sha in set(pd.read_csv(REPO / "results/memory/memory_batch.csv").git_sha):
        assert sha in footer


def test_provenance_note_lists_every_run():
    df = pd.DataFrame(dict(device_name=["cpu A", "cpu A", "gpu B"], git_sha=["aaa", "aaa", "bbb"],
                           date=["2026-01-01T10:00", "2026-01-01T11:00", "2026-02-03T00:00"]))
    assert plot_data.provenance_note(df) == "cpu A + gpu B, git aaa, bbb, 2026-01-01, 2026-02-03"


def test_speed_csv_with_only_non_default_rows_skips_fig8_and_draws_fig9(tmp_path, capsys):
    R = _fig_root(tmp_path)
    sp = pd.read_csv(R / "speed/speed_cpu.csv")
    sp["amp"] = True
    sp.to_csv(R / "speed/speed_cpu.csv", index=False)
    assert figures.main([f"results={R}", "only=8,9", "readme=none"]) == 0
    err = capsys.readouterr().err
    assert "figure 8" in err and "default settings" in err and "Traceback" not in err
    assert (R / "figures" / "fig9_step_timeline.png").is_file()


def test_one_failing_figure_does_not_stop_the_others(tmp_path, capsys, monkeypatch):
    R = _fig_root(tmp_path)

    def boom(R, plt):
        raise ZeroDivisionError("float division by zero")

    monkeypatch.setattr(figures, "FIGURES", [(8, "fig8.png", boom, "step time"), *figures.FIGURES[8:9]])  # + fig 9
    assert figures.main([f"results={R}", "readme=none"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["figures: error: figure 8 (step time) failed: ZeroDivisionError: float division by zero"]
    assert (R / "figures" / "fig9_step_timeline.png").is_file()


# ------------------------------------------------------------------------------------------ 15: smaller

def test_written_files_are_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        atomic_write(tmp_path / "a.csv", "x\n")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a.csv").stat().st_mode) == 0o644


def test_failed_single_run_leaves_no_empty_folders(tmp_path, monkeypatch):
    assert run_app("memory", ["model=test_resnet", "batch_size=0", *TINY], tmp_path, monkeypatch) == 2
    assert not (tmp_path / "results").exists()


@pytest.fixture
def seeded(tmp_path, monkeypatch):
    assert run_app("memory", ["model=test_resnet", "batch_size=2", "saved_by_op=false", *TINY],
                   tmp_path, monkeypatch) == 0
    return tmp_path


def test_stopping_a_joblib_sweep_kills_its_workers():
    import signal
    import time

    from joblib.externals.loky import get_reusable_executor

    ex = get_reusable_executor(max_workers=1)
    ex.submit(time.sleep, 60)
    procs = list(ex._processes.values())
    assert procs and all(p.is_alive() for p in procs)
    with pytest.raises(SystemExit) as e:
        sweep.kill_joblib_workers(signal.SIGTERM)
    assert e.value.code == 128 + signal.SIGTERM

    def gone(pid):  # is_alive() is unreliable here: loky's manager thread may reap the child first
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split(")")[-1].split()[0] == "Z"
        except OSError:
            return True

    deadline = time.monotonic() + 10
    while not all(gone(p.pid) for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(gone(p.pid) for p in procs)


def test_joblib_sweep_installs_and_restores_stop_handlers(monkeypatch):
    import signal

    cb = sweep.CollectCallback()
    before = signal.getsignal(signal.SIGTERM)
    cb._install_stop_handlers()
    assert signal.getsignal(signal.SIGTERM) is sweep.kill_joblib_workers
    for sig, h in cb._old_handlers.items():
        signal.signal(sig, h)
    assert signal.getsignal(signal.SIGTERM) == before


def test_int_option_and_bench_errors_are_one_line_user_messages():
    from actcomp import ActcompError
    from actcomp.errors import one_line
    from benchmarks.errors import BenchError, OutputError, int_option

    assert issubclass(OutputError, BenchError) and issubclass(BenchError, ActcompError)
    assert one_line(BenchError("k=0: must be an integer >= 1\ndetail")) == "k=0: must be an integer >= 1"
    assert int_option(3, "k") == 3 and int_option(0, "k", lo=0) == 0
    assert int_option(None, "k", none_ok=True) is None
    assert int_option(" 8", "k", text=True) == 8  # a plain key=value command line gives text
    for v, msg in (("8", "k='8': must be an integer >= 1"), (True, "k=True: must be"), (2.0, "k=2.0: must be"),
                   (0, "k=0: must be an integer >= 1"), (None, "k=None: must be")):
        with pytest.raises(BenchError, match=msg):
            int_option(v, "k")  # a Hydra value must already be an int: "8" was quoted on purpose
    with pytest.raises(BenchError, match=r"k=-1: must be an integer >= 0 or null"):
        int_option(-1, "k", lo=0, none_ok=True)
    with pytest.raises(ValueError, match="k='x': must be an integer >= 1"):
        int_option("x", "k", text=True, error=ValueError)


def test_md_peak_renders_the_whole_set_peak_sweep():
    """README table of memory/whole_set_peak.csv: peak GiB and the ratio to `none` of the same model (ok rows)."""
    df = pd.DataFrame({"model.name": ["m", "m", "m"], "compression.name": ["none", "full4", "pool4"],
                       "peak_bytes": [2 * 2**30, 2**29, float("nan")], "status": ["ok", "ok", "error"]})
    md = md_peak(df, "memory/whole_set_peak.csv")
    assert "| none | 2.00 GiB (1.00×) |" in md and "| full4 | 0.50 GiB (0.25×) |" in md and "pool4" not in md
    rel = "results/memory/whole_set_peak.csv"
    assert [f for pat, f in README_RENDERERS if re.fullmatch(pat, rel)] == [md_peak]
