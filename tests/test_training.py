"""Training: the Hydra app end to end, resume after a kill, DDP with gloo, equal starts, time-to-accuracy."""
import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from actcomp.data import build_data
from actcomp.train import (
    TrainConfig,
    TrainError,
    build_model,
    overhead_table,
    schedule_overhead,
    time_to_accuracy,
    train,
)
from benchmarks.hydra_conf import VERSION_BASE

ROOT = Path(__file__).resolve().parent.parent
CONF = ROOT / "conf"
ENV = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
# A tiny run: timm's test_resnet on 16 px synthetic data, one CPU thread (two threads on a busy 2-core box are
# slower than one), no W&B, no memory prediction.
TINY = ["data=synthetic", "data.n_train=64", "data.n_val=32", "data.image_size=16", "model=test_resnet",
        "optim=sgd_cosine", "batch_size=16", "logger=disabled", "threads=1", "memory=false", "progress=false"]


def _app(args, **kw):
    return subprocess.run([sys.executable, "-m", "benchmarks.train", *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300, **kw)


def _tiny_cfg(**kw) -> TrainConfig:
    base = dict(model="test_resnet", preset="pool2", epochs=3, batch_size=16, opt=dict(opt="sgd", lr=0.05),
                sched=dict(sched="cosine", step_on_epochs=False), progress=False, memory=False, threads=1,
                model_kwargs=dict(drop_rate=0.3))  # dropout: the RNG state must survive a resume as well
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture(scope="module")
def tiny_data():
    return build_data("synthetic", n_train=64, n_val=32, image_size=16)


def test_app_one_epoch_writes_history_and_summary(tmp_path):
    r = _app([*TINY, "compression=pool2", "epochs=1", "grad_cosine=true", f"hydra.run.dir={tmp_path}"])
    assert r.returncode == 0, r.stderr[-2000:]
    h = pd.read_csv(tmp_path / "history.csv")
    assert len(h) == 1 and h["preset"].iloc[0] == "pool2"
    for col in ("train_loss", "val_loss", "val_top1", "val_top5", "epoch_time_s", "images_per_s", "git_sha",
                "torch_version", "device_name", "grad_cos_mean"):
        assert col in h and h[col].notna().all(), col
    assert 0 < h["grad_cos_mean"].iloc[0] <= 1
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["status"] == "ok" and s["epochs_done"] == 1 and s["n_val"] == 32
    assert "tta_85_epoch" in s
    cos = pd.read_csv(tmp_path / "grad_cosine.csv")
    assert {"epoch", "layer", "cosine", "git_sha", "device_name", "date"} <= set(cos.columns) and len(cos) > 5
    assert cos["git_sha"].notna().all()
    assert (tmp_path / "checkpoint.pt").is_file()


def test_app_bad_input_is_one_line_exit_2(tmp_path):
    r = _app([*TINY, "model.name=resnet999", f"hydra.run.dir={tmp_path / 'a'}"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown timm model 'resnet999'"), r.stderr
    no_data = [a for a in TINY if not a.startswith("data")]
    r = _app([*no_data, "data=fashion_mnist", f"data.root={tmp_path}", f"hydra.run.dir={tmp_path / 'b'}"])
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()] and "make data" in r.stderr


def test_resume_after_stop_equals_uninterrupted(tiny_data, tmp_path):
    full = train(_tiny_cfg(ckpt_path=str(tmp_path / "a.pt"), epochs=2), tiny_data)
    part = train(_tiny_cfg(ckpt_path=str(tmp_path / "b.pt"), epochs=2, stop_after_epoch=1), tiny_data)
    assert not part.finished and len(part.history) == 1
    with pytest.raises(TrainError, match="already exists"):  # never overwrite a checkpoint silently
        train(_tiny_cfg(ckpt_path=str(tmp_path / "b.pt"), epochs=2), tiny_data)
    with pytest.raises(TrainError, match="different run"):  # nor continue it with other settings
        train(_tiny_cfg(ckpt_path=str(tmp_path / "b.pt"), epochs=2, resume=True, seed=1), tiny_data)
    rest = train(_tiny_cfg(ckpt_path=str(tmp_path / "b.pt"), epochs=2, resume=True), tiny_data)
    assert rest.finished and len(rest.history) == 2
    keys = ("train_loss", "train_top1", "val_loss", "val_top1", "val_top5", "lr")
    assert [[r[k] for k in keys] for r in rest.history] == [[r[k] for k in keys] for r in full.history]


def test_budget_preset_plans_on_the_first_batch_and_resumes_bitwise(tiny_data, tmp_path):
    """A budget preset is planned inside the run (calibration: the first training samples, the run's seed): the
    model meets the budget, and a stopped run resumes to the same plan and the same metrics."""
    from actcomp import config_of
    from actcomp.policy import conv_input_fraction
    from actcomp.train.probes import first_batch

    cfg = dict(preset="full_budget0.0625", epochs=2, model_kwargs={})
    full = train(_tiny_cfg(ckpt_path=str(tmp_path / "a.pt"), **cfg), tiny_data)
    part = train(_tiny_cfg(ckpt_path=str(tmp_path / "b.pt"), stop_after_epoch=1, **cfg), tiny_data)
    rest = train(_tiny_cfg(ckpt_path=str(tmp_path / "b.pt"), resume=True, **cfg), tiny_data)
    assert not part.finished and rest.finished
    keys = ("train_loss", "val_loss", "val_top1")
    assert [[r[k] for k in keys] for r in rest.history] == [[r[k] for k in keys] for r in full.history]
    xs, ys = first_batch(tiny_data.train, 16)
    m = build_model(_tiny_cfg(**cfg), tiny_data.num_classes, tiny_data.in_chans, (xs, ys))
    c = config_of(m)
    assert c.name == "full_budget0.0625" and c.grad_error and c.relu  # planned, whole set compressed
    assert conv_input_fraction(m, xs) <= 0.0625 + 1e-9
    with pytest.raises(TrainError, match="needs a calibration batch"):
        build_model(_tiny_cfg(**cfg), tiny_data.num_classes, tiny_data.in_chans)


def test_killed_app_resumes_to_the_same_metrics(tiny_data, tmp_path):
    """SIGKILL the app once its first checkpoint exists; rerun with resume=true; compare with a run in-process."""
    run = tmp_path / "run"
    args = [*TINY, "compression=pool4", "epochs=4", "+model.kwargs.drop_rate=0.3", f"hydra.run.dir={run}"]
    p = subprocess.Popen([sys.executable, "-m", "benchmarks.train", *args], cwd=ROOT, env=ENV,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 240
        while not (run / "checkpoint.pt").exists() and p.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        os.kill(p.pid, signal.SIGKILL)
    finally:
        p.wait(timeout=60)
    if p.returncode != -signal.SIGKILL:
        pytest.skip("the run finished before it could be killed")  # a very fast machine; the stop test covers it
    done = torch.load(run / "checkpoint.pt", weights_only=False)["epoch"]
    assert 1 <= done < 4
    r = _app([*args, "resume=true"])
    assert r.returncode == 0, r.stderr[-2000:]
    got = pd.read_csv(run / "history.csv")
    assert got["epoch"].tolist() == [1, 2, 3, 4]

    from hydra import compose, initialize_config_dir

    from benchmarks.train import train_config

    with initialize_config_dir(str(CONF), version_base=VERSION_BASE):
        cfg = compose("train", overrides=args[:-1])
    ref = train(train_config(cfg, None), tiny_data)
    for k in ("train_loss", "val_loss", "val_top1"):
        assert got[k].tolist() == pytest.approx([h[k] for h in ref.history], rel=1e-12, abs=0), k


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_two_processes_gloo(tmp_path):
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                        f"--master_port={_free_port()}", "-m", "benchmarks.train", *TINY, "device=cpu", "epochs=2",
                        "compression=pool2", f"hydra.run.dir={tmp_path}"],
                       cwd=ROOT, env=dict(ENV, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    h = pd.read_csv(tmp_path / "history.csv")
    assert h["epoch"].tolist() == [1, 2]
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["world_size"] == 2 and s["n_val"] == 32
    # every val sample counted once across the two processes: accuracies are multiples of 1/32
    assert all(abs(v * 32 / 100 - round(v * 32 / 100)) < 1e-9 for v in h["val_top1"])


def test_same_start_and_batches_for_every_preset(tiny_data):
    a = build_model(_tiny_cfg(preset="none"), 10, 3).state_dict()
    b = build_model(_tiny_cfg(preset="full4"), 10, 3).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # authors_b1 computes bitwise the native gradients: with the same start and the same batches the two
    # runs must be identical, which they are only if nothing else (init, order, RNG) differs.
    kw = dict(epochs=2, model_kwargs={})
    h1 = train(_tiny_cfg(preset="none", **kw), tiny_data).history
    h2 = train(_tiny_cfg(preset="authors_b1", **kw), tiny_data).history
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]
    assert [r["val_loss"] for r in h1] == [r["val_loss"] for r in h2]


def test_time_to_accuracy_and_overhead_on_a_hand_made_history():
    base = [dict(epoch=e, val_top1=v, elapsed_s=10.0 * e) for e, v in enumerate([70, 85, 88, 90, 90.5], 1)]
    slow = [dict(epoch=e, val_top1=v, elapsed_s=12.0 * e) for e, v in enumerate([60, 80, 86, 88.5, 89.6, 90.2], 1)]
    assert time_to_accuracy(base, 88).epoch == 3 and time_to_accuracy(base, 88).time_s == 30.0
    assert time_to_accuracy(slow, 95).epoch is None
    o = schedule_overhead(slow, base, target=88)
    assert (o["epoch"], o["baseline_epoch"]) == (4, 3)
    assert o["epochs_ratio"] == pytest.approx(4 / 3) and o["time_ratio"] == pytest.approx(48 / 30)
    o = schedule_overhead(slow, base, target=None, delta=0.5)  # baseline best 90.5 - 0.5 = 90
    assert o["target"] == 90 and o["epoch"] == 6 and o["baseline_epoch"] == 4 and o["epochs_ratio"] == 1.5
    o = schedule_overhead(slow, base, target=90.4)
    assert not o["reached"] and math.isnan(o["epochs_ratio"]) and o["baseline_epoch"] == 5
    rows = overhead_table({"none": pd.DataFrame(base), "pool4": slow}, targets=[85, 90], deltas=[1.0])
    assert [(r["run"], r["target"], r["epochs_ratio"]) for r in rows][:3] == [("none", 85, 1.0), ("none", 90, 1.0),
                                                                              ("none", 89.5, 1.0)]
    assert rows[-1]["run"] == "pool4" and rows[-1]["target"] == 89.5 and rows[-1]["epochs_ratio"] == 1.25
    with pytest.raises(TrainError, match="baseline"):
        overhead_table({"pool4": slow}, baseline="none")


def test_epoch_sampler_covers_each_pass_once():
    from actcomp.train import EpochSampler

    s = EpochSampler(10, 4, seed=0)
    epochs = []
    for e in range(5):  # 20 samples = exactly two passes over 10
        s.set_epoch(e)
        epochs.append(list(s))
    stream = sum(epochs, [])
    assert sorted(stream[:10]) == list(range(10)) and sorted(stream[10:]) == list(range(10))
    s.set_epoch(3)
    assert list(s) == epochs[3]  # a pure function of (seed, epoch): the same after a resume
    halves = []
    for r in (0, 1):
        h = EpochSampler(10, 4, seed=0, rank=r, world=2)
        h.set_epoch(1)
        halves += list(h)
    assert sorted(halves) == sorted(epochs[1])


def test_collect_gives_cosine_rows_their_runs_provenance(tmp_path):
    """Cosine files written without provenance take it from the same run's history (collect)."""
    from benchmarks.train import with_provenance

    (tmp_path / "history.csv").write_text("epoch,val_top1,git_sha,device_name,date\n1,50,abc123,cpu,2026-01-01\n")
    cos = with_provenance(pd.DataFrame({"epoch": [1, 1], "layer": ["a", "b"], "cosine": [0.9, 0.8]}), tmp_path)
    assert list(cos["git_sha"]) == ["abc123", "abc123"] and list(cos["date"]) == ["2026-01-01"] * 2
    kept = with_provenance(pd.DataFrame({"epoch": [1], "git_sha": ["own"]}), tmp_path)
    assert list(kept["git_sha"]) == ["own"]


def _history(run_dir: Path, preset: str, seed: int, accs):
    run_dir.mkdir(parents=True)
    rows = [dict(preset=preset, model="m", seed=seed, run_id=f"{preset}{seed}", epoch=e + 1, val_top1=a,
                 cpu_time_s=10.0, elapsed_s=10.0 * (e + 1), images_per_s=1.0, peak_mem_mib=1.0,
                 peak_mem_source="meta", saved_mib=1.0) for e, a in enumerate(accs)]
    pd.DataFrame(rows).to_csv(run_dir / "history.csv", index=False)
    pd.DataFrame({"epoch": [1], "layer": ["conv"], "cosine": [0.5], "preset": [preset], "model": ["m"],
                  "seed": [seed]}).to_csv(run_dir / "grad_cosine.csv", index=False)


def test_collect_merge_adds_runs_to_an_earlier_collection(tmp_path):
    """collect --merge: new runs join a collected study (its rows unchanged; a re-run run replaces its old
    rows), compared with the baseline collected earlier; without an earlier collection: one line, exit 2."""
    from benchmarks.train import collect, collect_cli

    old, new, out = tmp_path / "old", tmp_path / "new", tmp_path / "out"
    _history(old / "none-s0", "none", 0, [80, 90])
    _history(old / "pool4-s0", "pool4", 0, [70, 85])
    first = collect([old / "none-s0", old / "pool4-s0"], out, targets=[85])["summary"]
    _history(new / "q2-s0", "q2", 0, [88, 89])
    _history(new / "pool4-s0", "pool4", 0, [75, 86])  # a re-run of pool4 replaces the old one
    assert collect_cli([str(new), "--out", str(out), "--merge", "--targets", "85"]) == 0
    s = pd.read_csv(out / "summary.csv")
    fixed = s[s["target_kind"] == "fixed"].set_index("preset")
    assert sorted(fixed.index) == ["none", "pool4", "q2"]
    assert fixed.loc["q2", "epoch"] == 1 and fixed.loc["none", "epoch"] == 2  # against the earlier baseline
    assert fixed.loc["pool4", "final_val_top1"] == 86  # the new run, not the old one
    assert first[first["target_kind"] == "fixed"].set_index("preset").loc["none", "final_val_top1"] == 90
    e = pd.read_csv(out / "epochs.csv")
    assert len(e) == 6 and sorted(e[e["preset"] == "pool4"]["val_top1"]) == [75, 86]
    cos = pd.read_csv(out / "grad_cosine.csv")
    assert sorted(cos["preset"]) == ["none", "pool4", "q2"]
    assert collect_cli([str(new), "--out", str(tmp_path / "empty"), "--merge"]) == 2


def test_app_bad_config_is_one_line_exit_2(tmp_path):
    """A typo in a scalar key, an unknown config-group choice and an image smaller than the pooling block: one
    line and exit 2, like the memory/speed/fit apps (not a traceback, a Hydra listing, or a run)."""
    from hydra import compose, initialize_config_dir

    from benchmarks.sweep import BenchError
    from benchmarks.train import TRAIN_GROUPS, check_config, preflight

    cases = [(["compression=pool3"], "error: unknown preset 'pool3'"),
             (["compression=pool4", "data.image_size=2"], "error: img_size=2 is smaller than the 4x4 pooling block")]
    for i, (extra, start) in enumerate(cases):
        r = _app([*TINY, *extra, "epochs=1", f"hydra.run.dir={tmp_path / str(i)}"])
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith(start), (extra, r.returncode, r.stderr)
        assert not (tmp_path / str(i) / "history.csv").exists()
    # the same paths in-process (main turns a BenchError into one line and exit 2, as above)
    import warnings

    warnings.filterwarnings("ignore", message=r"(?s).*is validated against ConfigStore schema")  # Hydra noise
    assert preflight(["optim=sgd_cosin"], TRAIN_GROUPS).startswith("unknown optim 'sgd_cosin'")
    assert preflight(["data=fmnist"], TRAIN_GROUPS).startswith("unknown data 'fmnist'")
    with initialize_config_dir(str(CONF), version_base=VERSION_BASE):
        for bad, msg in (("seed=abc", "seed='abc': must be an integer >= 0"),
                         ("threads=0", "threads=0: must be an integer >= 1 or null"),
                         ("targets=[a]", "targets=['a']: must be a list of numbers")):
            with pytest.raises(BenchError, match=msg.replace("[", r"\[")):
                check_config(compose("train", overrides=[*TINY, bad]))
        check_config(compose("train", overrides=TINY))


def test_app_end_report_train_log_and_resume_note(tmp_path):
    """Each run ends with accuracy, time to each target and where its files are, also in train.log; resume=true
    in a new (timestamped) dir says that it starts from scratch; a sweep over a key that is not part of the run
    dir's name (optim.lr) still gives every run its own dir."""
    r = _app(["-m", *TINY, "epochs=2", "targets=[1,99.5]", f"hydra_dir={tmp_path}", "resume=true",
              "optim.lr=0.05,0.1"])
    assert r.returncode == 0, r.stderr[-2000:]
    (sweep,) = (tmp_path / "train" / "adhoc").iterdir()
    runs = sorted(sweep.glob("*/summary.json"))
    assert len(runs) == 2 and r.stderr.count("from scratch") == 2
    assert "note: resume=true but" in r.stderr and "resume=<its run dir>" in r.stderr
    for f in runs:
        run, s = f.parent, json.loads(f.read_text())
        assert f"final {s['final_val_top1']:.2f}%, best {s['best_val_top1']:.2f}%" in r.stdout
        assert f"files: {run}/ (history.csv, summary.json, checkpoint.pt, train.log)" in r.stdout
        logged = (run / "train.log").read_text()
        assert "epoch 2: train loss" in logged and "time to accuracy: 1% at epoch 1" in logged
        assert "99.5% not reached" in logged and "files:" in logged


def test_resume_with_more_epochs_keeps_or_refuses_the_schedule(tiny_data, tmp_path):
    """A cosine schedule is fitted to the run's length: more epochs on resume would train at its minimum rate,
    so that is refused; a step schedule does not depend on the length and continues as if planned so."""
    ck = str(tmp_path / "c.pt")
    train(_tiny_cfg(ckpt_path=ck, epochs=2, model_kwargs={}), tiny_data)
    with pytest.raises(TrainError, match="2-epoch cosine schedule and epochs=3 would change it") as e:
        train(_tiny_cfg(ckpt_path=ck, epochs=3, resume=True, model_kwargs={}), tiny_data)
    assert "\n" not in str(e.value)
    with pytest.raises(TrainError, match="already holds 2 epochs"):
        train(_tiny_cfg(ckpt_path=ck, epochs=1, resume=True, model_kwargs={}), tiny_data)
    state = torch.load(ck, weights_only=False)  # a checkpoint from before the length was stored
    del state["epochs"]
    torch.save(state, ck)
    with pytest.raises(TrainError, match="would change it"):
        train(_tiny_cfg(ckpt_path=ck, epochs=3, resume=True, model_kwargs={}), tiny_data)
    same = train(_tiny_cfg(ckpt_path=ck, epochs=2, resume=True, model_kwargs={}), tiny_data)
    assert same.finished and len(same.history) == 2

    step = dict(sched="step", decay_epochs=1, decay_rate=0.5)
    full = train(_tiny_cfg(ckpt_path=str(tmp_path / "f.pt"), epochs=3, sched=step, model_kwargs={}), tiny_data)
    train(_tiny_cfg(ckpt_path=str(tmp_path / "s.pt"), epochs=2, sched=step, model_kwargs={}), tiny_data)
    more = train(_tiny_cfg(ckpt_path=str(tmp_path / "s.pt"), epochs=3, sched=step, resume=True, model_kwargs={}),
                 tiny_data)
    assert more.summary["epochs_planned"] == 3 and [r["lr"] for r in more.history] == [0.05, 0.025, 0.0125]
    assert [r["val_loss"] for r in more.history] == [r["val_loss"] for r in full.history]


def test_wandb_keys_groups_names_and_overhead_summary(tmp_path, monkeypatch):
    from hydra.types import RunMode
    from omegaconf import OmegaConf

    import benchmarks.train as bt
    from benchmarks.common import SWEPT_ENV, WandbProbe
    from benchmarks.train import overhead_summary, wandb_group, wandb_metrics

    # a run's W&B name: preset, model, seed and whatever else its sweep varies (the launcher records that)
    monkeypatch.delenv(SWEPT_ENV, raising=False)
    WandbProbe().on_multirun_start(OmegaConf.create(
        {"hydra": {"sweeper": {"params": {"compression": "none,pool2"}}, "overrides": {"task": ["optim.lr=0.05,0.1",
                                                                                               "epochs=2"]}},
         "logger": {"mode": "disabled"}}))
    job = OmegaConf.create({"mode": RunMode.MULTIRUN, "overrides": {"task": ["compression=pool2", "optim.lr=0.05",
                                                                             "epochs=2"]}})
    monkeypatch.setattr(bt.HydraConfig, "get", lambda: job)
    assert bt._run_name("pool2", "resnet18", 0) == "pool2 resnet18 s0 optim.lr=0.05"

    pred = wandb_metrics(dict(epoch=1, peak_mem_mib=12.5, peak_mem_source="predicted step peak (meta)", saved_mib=3.0))
    assert pred == dict(epoch=1, predicted_step_peak_mib=12.5, peak_mem_source="predicted step peak (meta)",
                        saved_mib=3.0)
    assert "peak_mem_mib" not in wandb_metrics(dict(peak_mem_mib=3.0, peak_mem_source="saved-for-backward (accounting)"))
    assert wandb_metrics(dict(peak_mem_mib=7.0, peak_mem_source="cuda max_memory_allocated"))["cuda_max_allocated_mib"] == 7
    assert wandb_group(str(tmp_path / "train" / "s" / "multirun-1"), str(tmp_path), "s") == "train/s/multirun-1"
    assert wandb_group("/elsewhere/sweep", str(tmp_path), "s") == "train/s/sweep"
    rows = pd.DataFrame([dict(preset="pool4", target_kind="fixed", target=88.0, epochs_ratio=1.75, time_ratio=1.9,
                              cpu_time_ratio=2.0, epoch=7, time_s=70.0, final_val_top1=89.2, best_val_top1=89.3),
                         dict(preset="pool4", target_kind="baseline_best-0.5", target=90.3, epochs_ratio=math.nan,
                              time_ratio=math.nan, cpu_time_ratio=math.nan, epoch=None, time_s=None,
                              final_val_top1=89.2, best_val_top1=89.3)])
    s = overhead_summary(rows)
    assert s["pool4/epochs_ratio@88"] == 1.75 and s["pool4/cpu_time_ratio@88"] == 2.0 and s["pool4/epoch@88"] == 7
    assert s["pool4/final_val_top1"] == 89.2 and not any("baseline_best" in k for k in s)
