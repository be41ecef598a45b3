"""The memory/speed/fit Hydra apps: configs, sweeps end to end, skip-on-rerun, failures recorded, bad input.

Apps run in this process (Hydra's entry point called with a patched argv) to avoid re-importing torch and
timm per run; only the submitit_local sweep starts other processes. Tiny timm models, small images, W&B off.
"""
from __future__ import annotations

import importlib
import json
import os
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from benchmarks import sweep
from benchmarks.common import atomic_write
from benchmarks.hydra_conf import VERSION_BASE

# Our launcher yamls share the plugins' schema names on purpose (see benchmarks/sweep/__init__.py).
pytestmark = pytest.mark.filterwarnings("ignore:(?s).*is validated against ConfigStore schema:UserWarning")

CONF = str(Path(__file__).resolve().parent.parent / "conf")
PROV = ["git_sha", "torch_version", "timm_version", "python_version", "device_name", "date"]


def run_app(app: str, args: list[str], tmp: Path, monkeypatch) -> int:
    """Run ``python -m benchmarks.<app> <args>`` in-process into ``tmp``; returns the exit code."""
    mod = importlib.import_module(f"benchmarks.{app}")
    base = [f"out_dir={tmp / 'results'}", f"hydra_dir={tmp / 'outputs'}", "logger=disabled"]
    argv, seen = [], set()
    for a in [*args, *base]:  # the first value of a key wins (Hydra rejects a key given twice)
        k = a.split("=")[0]
        if k not in seen or a.startswith("-"):
            argv.append(a)
            seen.add(k)
    monkeypatch.setattr(sys, "argv", [f"benchmarks/{app}.py", *argv])
    GlobalHydra.instance().clear()
    try:
        sweep.cli(app, mod.main)
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else 1
    finally:
        GlobalHydra.instance().clear()


def last_line(capsys) -> tuple[str, list[str]]:
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]
    return (lines[-1] if lines else ""), lines


# ------------------------------------------------------------------------------------------ configs

@pytest.mark.parametrize("app", ["memory", "speed", "fit"])
def test_compose_every_app(app):
    with initialize_config_dir(config_dir=CONF, version_base=VERSION_BASE):
        cfg = compose(app, return_hydra_config=True)
        assert cfg.app == app and cfg.model.name == "resnet18" and cfg.compression.name == "none"
        assert cfg.logger.mode == "offline" and cfg.sweep == "adhoc"
        assert cfg.hydra.callbacks.collect._target_ == "benchmarks.sweep.CollectCallback"
        assert cfg.hydra.launcher._target_.endswith("BasicLauncher")
        for launcher, target in [("joblib", "JoblibLauncher"), ("submitit_local", "LocalLauncher"),
                                 ("submitit_slurm", "SlurmLauncher")]:
            c = compose(app, overrides=[f"hydra/launcher={launcher}"], return_hydra_config=True)
            assert c.hydra.launcher._target_.endswith(target)
        slurm = compose(app, overrides=["hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
                        return_hydra_config=True).hydra.launcher
        assert slurm.partition == "gpu" and {"gpus_per_node", "timeout_min", "account", "mem_gb"} <= set(slurm)
        for dev in ("cpu", "cuda", "meta"):
            assert compose(app, overrides=[f"device={dev}"]).device.name == dev
        for lg in ("offline", "online", "disabled"):
            assert compose(app, overrides=[f"logger={lg}"]).logger.mode == lg
        if app == "memory":
            for p in sweep.group_options("compression"):  # every preset has its config, and back
                assert compose(app, overrides=[f"compression={p}"]).compression.name == p
    import actcomp

    # plus the budget policy's named presets (planned per model: actcomp.policy, train app only)
    assert set(sweep.group_options("compression")) == set(actcomp.PRESETS) | {"budget0.0625", "full_budget0.0625", "full_budget0.08"}


@pytest.mark.parametrize("app,exp", [("memory", "memory_models"), ("fit", "fit_models"), ("speed", "speed_cpu")])
def test_compose_experiments(app, exp):
    with initialize_config_dir(config_dir=CONF, version_base=VERSION_BASE):
        cfg = compose(app, overrides=[f"experiment={app}/{exp}"], return_hydra_config=True)
    assert cfg.sweep == exp
    n = sweep.count_points(cfg)
    if exp == "memory_models":
        assert n == 20 * 4 * 3 and cfg.device.name == "meta"
        for m in cfg.hydra.sweeper.params.model.split(","):
            assert m in sweep.group_options("model")


def test_every_experiment_composes_with_its_app():
    """conf/experiment/<app>/*.yaml: each composes with that app; a *_quick toy config keeps its study's sweep name."""
    apps = sorted(p.name for p in (Path(CONF) / "experiment").iterdir() if p.is_dir())
    assert apps == ["exactness", "fit", "memory", "speed", "table", "timeline", "train"]
    with initialize_config_dir(config_dir=CONF, version_base=VERSION_BASE):
        for app in apps:
            for name in sweep.group_options(f"experiment/{app}"):
                cfg = compose(app, overrides=[f"experiment={app}/{name}"], return_hydra_config=True)
                if name.endswith("_quick") and "sweep" in cfg:
                    full = compose(app, overrides=[f"experiment={app}/{name[:-6]}"], return_hydra_config=True)
                    assert cfg.sweep == full.sweep, name
                    assert cfg.hydra.launcher._target_.endswith("BasicLauncher"), name


def test_point_key_ignores_bookkeeping():
    with initialize_config_dir(config_dir=CONF, version_base=VERSION_BASE):
        a = compose("memory", overrides=["model=test_resnet"])
        b = compose("memory", overrides=["model=test_resnet", "out_dir=/x", "logger=disabled", "sweep=s", "force=true"])
        c = compose("memory", overrides=["model=test_resnet", "batch_size=4"])
    assert sweep.point_key(a) == sweep.point_key(b) != sweep.point_key(c)


# ------------------------------------------------------------------------------------------ sweeps

TINY = ["img_size=32", "sweep=t"]


def test_multirun_end_to_end_skip_and_failure(tmp_path, monkeypatch, capsys):
    args = ["-m", "model=test_resnet,test_efficientnet", "compression=none,pool2", "batch_size=2", *TINY]
    assert run_app("memory", args, tmp_path, monkeypatch) == 0
    csv = tmp_path / "results" / "memory" / "t.csv"
    df = pd.read_csv(csv)
    assert len(df) == 4 and (df.status == "ok").all()
    assert set(df["model.name"]) == {"test_resnet", "test_efficientnet"} and set(df["compression.name"]) == {"none", "pool2"}
    for col in [*PROV, "point", "message", "batch_size", "img_size", "device.name", "peak_bytes",
                "peak_activation_bytes", "saved_total_bytes", "saved_conv_input_bytes"]:
        assert col in df.columns, col
    assert df.git_sha.notna().all() and (df.torch_version == torch.__version__).all()
    assert (df.peak_bytes > df.saved_total_bytes).all() and df.point.is_unique
    jobs = sorted((tmp_path / "outputs" / "memory" / "t").glob("multirun-*/*/summary.json"))
    assert len(jobs) == 4 and all(json.loads(j.read_text())["run"] == "measured" for j in jobs)
    out = capsys.readouterr().out
    assert "this run 4 points (4 ok)" in out and "peak_MiB" in out

    # Re-run with one more batch size, one of them invalid: done points are skipped, the failing point is
    # recorded with its one-line message, and the sweep finishes normally.
    before = csv.stat().st_mtime_ns
    args = ["-m", "model=test_resnet", "compression=none,pool2", "batch_size=2,0", *TINY]
    assert run_app("memory", args, tmp_path, monkeypatch) == 1  # points failed: exit 1 after the sweep ends
    assert "2 skipped, 2 error" in capsys.readouterr().out
    df2 = pd.read_csv(csv)
    assert len(df2) == 6 and csv.stat().st_mtime_ns != before
    bad = df2[df2.status == "error"]
    assert len(bad) == 2 and (bad.batch_size == 0).all() and bad.message.str.contains("batch_size=0").all()
    assert df2[df2.status == "ok"].peak_bytes.tolist() == df.peak_bytes.tolist()  # untouched by the re-run

    # collect rebuilds the same CSV from the Hydra dirs alone.
    os.unlink(csv)
    assert sweep.collect([tmp_path / "outputs"], quiet=True) == [csv]
    pd.testing.assert_frame_equal(pd.read_csv(csv), df2)


def test_force_remeasures(tmp_path, monkeypatch, capsys):
    args = ["model=test_resnet", "batch_size=2", *TINY]
    assert run_app("memory", args, tmp_path, monkeypatch) == 0
    assert run_app("memory", args, tmp_path, monkeypatch) == 0
    assert "1 skipped" in capsys.readouterr().out
    assert run_app("memory", [*args, "force=true"], tmp_path, monkeypatch) == 0
    assert "(1 ok)" in capsys.readouterr().out
    assert len(pd.read_csv(tmp_path / "results" / "memory" / "t.csv")) == 1


def test_peer_preset_notes_saved_by_op(tmp_path, monkeypatch):
    assert run_app("memory", ["model=test_resnet", "compression=ckpt", "batch_size=2", *TINY],
                   tmp_path, monkeypatch) == 0
    row = pd.read_csv(tmp_path / "results" / "memory" / "t.csv").iloc[0]
    assert row.status == "ok" and row.peak_bytes > 0 and "ckpt" in row.saved_note


def test_speed_and_fit_apps(tmp_path, monkeypatch):
    assert run_app("speed", ["model=test_resnet", "compression=pool2", "batch_size=2", "warmup=0", "iters=1",
                             *TINY], tmp_path, monkeypatch) == 0
    s = pd.read_csv(tmp_path / "results" / "speed" / "t.csv").iloc[0]
    assert s.status == "ok" and s.median_step_s > 0 and s.ratio_to_none > 0 and s.none_median_step_s > 0
    assert s.images_per_s == pytest.approx(2 / s.median_step_s)
    # 3 blocks by default: the median ratio lies within its interquartile range; the load is recorded
    assert s.blocks == s.blocks_run == 3 and s.ratio_q25 <= s.ratio_to_none <= s.ratio_q75
    assert s.load_start >= 0 and s.load_end >= 0
    # 64 px: at 32 px the last feature map is 1x1 and BatchNorm cannot train on batch 1 (the search starts at 1)
    assert run_app("fit", ["model=test_resnet", "compression=pool2", "budgets_gib=[0.01,0.05]", "img_size=64", *TINY],
                   tmp_path, monkeypatch) == 0
    f = pd.read_csv(tmp_path / "results" / "fit" / "t.csv").iloc[0]
    assert f.status == "ok" and 1 <= f.max_batch_0p01gib < f.max_batch_0p05gib


def test_submitit_local_sweep(tmp_path, monkeypatch):
    args = ["-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5", "model=test_resnet",
            "compression=none,pool2", "batch_size=2", "saved_by_op=false", "img_size=16", "sweep=sub"]
    assert run_app("memory", args, tmp_path, monkeypatch) == 0
    df = pd.read_csv(tmp_path / "results" / "memory" / "sub.csv")
    assert len(df) == 2 and (df.status == "ok").all()
    assert list((tmp_path / "outputs" / "memory" / "sub").glob("multirun-*/.submitit/*/*_log.out"))


# ------------------------------------------------------------------------------------------ bad input

def _results_snapshot(tmp: Path) -> dict:
    return {p: p.read_bytes() for p in (tmp / "results").rglob("*") if p.is_file()}


@pytest.fixture
def seeded(tmp_path, monkeypatch):
    """A results folder with one aggregated sweep in it, which bad input must leave untouched."""
    assert run_app("memory", ["model=test_resnet", "batch_size=2", "saved_by_op=false", *TINY],
                   tmp_path, monkeypatch) == 0
    return tmp_path


BAD = [
    ("memory", ["model=resnet19"], "unknown model 'resnet19' (did you mean resnet18"),
    ("memory", ["-m", "model=test_resnet,resnet19"], "unknown model 'resnet19'"),
    ("memory", ["model=test_vit"], "use model.name=test_vit"),
    ("memory", ["model.name=resnet19"], "unknown timm model 'resnet19'"),
    ("memory", ["compression=pool3"], "unknown preset 'pool3' (did you mean"),
    ("fit", ["compression.name=pool3"], "unknown preset 'pool3'"),
    ("memory", ["model=test_resnet", "compression=full_budget0.0625"], "only the train app takes it"),
    ("speed", ["model=test_resnet", "compression.name=budget0.5"], "only the train app takes it"),
    ("memory", ["model=test_resnet", "batch_size=0"], "batch_size=0: must be an integer >= 1"),
    ("speed", ["model=test_resnet", "batch_size=-3"], "batch_size=-3: must be an integer >= 1"),
    ("memory", ["model=test_resnet", "compression=pool4", "img_size=2"], "img_size=2 is smaller than the 4x4"),
    ("memory", ["model.name=vit_small_patch16_224", "img_size=8", "batch_size=2"], "img_size=8"),
    ("memory", ["device=gpu"], "unknown device 'gpu'"),
    ("speed", ["model=test_resnet", "device=meta"], "speed needs real compute"),
    ("speed", ["model=test_resnet", "compile=maybe"], "compile='maybe': must be true or false"),
    ("fit", ["model=test_resnet", "budgets_gib=[0]"], "budgets_gib=[0]"),
    ("fit", ["model=test_resnet", "budgets_gib=abc"], "budgets_gib='abc': give a list of positive numbers"),
    ("fit", ["model=test_resnet", "max_batch=0"], "max_batch=0: must be an integer >= 1"),
    ("memory", ["model=test_resnet", "force=maybe"], "force='maybe': use true or false"),
    ("memory", ["model=test_resnet", "channels_last=maybe"], "channels_last='maybe': use true or false"),
    ("speed", ["model=test_resnet", "iters=0"], "iters=0: must be an integer >= 1"),
    ("speed", ["model=test_resnet", "blocks=0"], "blocks=0: must be an integer >= 1"),
    ("speed", ["model=test_resnet", "blocks=2.5"], "blocks=2.5: must be an integer >= 1"),
    ("speed", ["model=test_resnet", "max_blocks=2", "target_iqr=0.1"], "max_blocks=2: must be an integer >= 3 or null"),
    ("speed", ["model=test_resnet", "max_blocks=5", "target_iqr=-1"], "target_iqr=-1: must be a number >= 0 or null"),
    ("speed", ["model=test_resnet", "max_blocks=5", "target_iqr=abc"], "target_iqr='abc': must be a number"),
    ("speed", ["model=test_resnet", "max_blocks=5"], "adaptive mode needs both"),
]


@pytest.mark.parametrize("app,args,expect", BAD, ids=[" ".join(a) for _, a, _ in BAD])
def test_bad_input_one_line_nonzero_results_untouched(seeded, monkeypatch, capsys, app, args, expect):
    capsys.readouterr()
    before = _results_snapshot(seeded)
    code = run_app(app, [*args, *TINY], seeded, monkeypatch)
    line, lines = last_line(capsys)
    assert code == 2 and expect in line, lines
    assert len(lines) == 1, lines
    assert _results_snapshot(seeded) == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_cuda_without_cuda(seeded, monkeypatch, capsys):
    capsys.readouterr()
    before = _results_snapshot(seeded)
    assert run_app("memory", ["model=test_resnet", "device=cuda", *TINY], seeded, monkeypatch) == 2
    line, lines = last_line(capsys)
    assert "device=cuda but CUDA is not available" in line and len(lines) == 1
    assert _results_snapshot(seeded) == before


@pytest.mark.parametrize("multirun", [False, True])
def test_unwritable_output_dir(seeded, monkeypatch, capsys, multirun):
    capsys.readouterr()
    blocker = seeded / "afile"
    blocker.write_text("not a folder")  # root can write anywhere, but never below a file
    before = _results_snapshot(seeded)
    args = (["-m", "compression=none,pool2"] if multirun else []) + ["model=test_resnet", f"out_dir={blocker}/r", *TINY]
    assert run_app("memory", args, seeded, monkeypatch) == 2
    line, lines = last_line(capsys)
    assert "is not writable" in line and str(blocker) in line and len(lines) == 1, lines
    assert _results_snapshot(seeded) == before
    assert sweep.collect([seeded / "results"], quiet=True)  # the existing sweep still aggregates


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    p = tmp_path / "a.csv"
    atomic_write(p, "old\n")

    with pytest.raises(TypeError):
        atomic_write(p, 123)  # fails while writing: the old content stays, no temp file left
    assert p.read_text() == "old\n" and [f.name for f in tmp_path.iterdir()] == ["a.csv"]


def test_wandb_offline_logs_without_network(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("WANDB_DISABLE_GIT", "true")
    args = ["model=test_resnet", "batch_size=2", "saved_by_op=false", "logger=offline", f"logger.dir={tmp_path}",
            *TINY]
    assert run_app("memory", args, tmp_path, monkeypatch) == 0
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))
