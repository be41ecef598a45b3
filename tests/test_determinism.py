"""Bitwise reproducibility of CPU runs: thread count and kernel ISA pinned, separate processes, other hosts."""
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from omegaconf import OmegaConf

from actcomp.train import TrainError, pin_cpu_numerics

ROOT = Path(__file__).resolve().parent.parent
BASE = dict(os.environ, WANDB_MODE="disabled", HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "MKL_CBWR", "OMP_NUM_THREADS"):
    BASE.pop(k, None)
# The kernels an older host would pick by itself (no AVX2 in ATen, SSE4.1 convolutions, SSE2 GEMMs).
OTHER_HOST = dict(ATEN_CPU_CAPABILITY="default", ONEDNN_MAX_CPU_ISA="SSE41", MKL_CBWR="COMPATIBLE")
TINY = ["data=synthetic", "data.n_train=64", "data.n_val=32", "data.image_size=16", "model=test_resnet",
        "compression=pool2", "optim=sgd_cosine", "batch_size=16", "epochs=2", "logger=disabled", "memory=false",
        "progress=false", "channels_last=true"]
needs_avx2 = pytest.mark.skipif(torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"),
                                reason="pinning to AVX2 needs an AVX2 CPU")


def _start(run: Path, args, **env):
    return subprocess.Popen([sys.executable, "-m", "benchmarks.train", *TINY, *args, f"hydra.run.dir={run}"],
                            cwd=ROOT, env=dict(BASE, **env), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _result(run: Path):
    h = pd.read_csv(run / "history.csv")
    state = torch.load(run / "checkpoint.pt", weights_only=False)["model"]
    return h[["train_loss", "train_top1", "val_loss", "val_top1"]].values.tolist(), state


@needs_avx2
def test_pinned_runs_are_bitwise_equal_across_processes_threads_and_hosts(tmp_path):
    """Three processes at once: two pinned runs (ambient 2 threads on this CPU's kernels; ambient 1 thread on the
    kernels of another host) must end bitwise equal; an unpinned run on the other host's kernels must not (so
    the simulated host really changes the bits)."""
    pinned = ["threads=1", "cpu_isa=avx2"]
    procs = {"a": _start(tmp_path / "a", pinned, OMP_NUM_THREADS="2"),
             "b": _start(tmp_path / "b", pinned, OMP_NUM_THREADS="1", **OTHER_HOST),
             "c": _start(tmp_path / "c", ["threads=1"], OMP_NUM_THREADS="1", **OTHER_HOST)}
    for name, p in procs.items():
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, f"{name}: {err[-2000:]}"
    (ha, sa), (hb, sb), (hc, sc) = (_result(tmp_path / n) for n in "abc")
    assert ha == hb
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)
    dev = pd.read_csv(tmp_path / "a" / "history.csv")["device_name"].iloc[0]
    assert "AVX2" in dev and "x1 threads" in dev, dev


def test_pinning_after_kernels_ran_is_refused_and_changes_nothing():
    torch.ones(4).add_(1)  # the process has chosen its kernels now
    cur = torch.backends.cpu.get_cpu_capability().lower()
    other = "default" if cur != "default" else "avx2"
    env = {k: os.environ.get(k) for k in OTHER_HOST}
    with pytest.raises(TrainError, match=f"cpu_isa={other} could not be pinned"):
        pin_cpu_numerics(other)
    assert {k: os.environ.get(k) for k in OTHER_HOST} == env
    with pytest.raises(TrainError, match="cpu_isa must be one of"):
        pin_cpu_numerics("avx3")
    n = torch.get_num_threads()
    with pytest.raises(TrainError, match="threads must be a positive int"):
        pin_cpu_numerics(None, 0)
    assert torch.get_num_threads() == n


def test_grad_cosine_runs_with_the_configured_threads(monkeypatch):
    """The cosine measurement sets its own thread count (the bits depend on it) and restores the caller's."""
    import benchmarks.exactness as ex

    seen = []

    def fake(c):
        seen.append(torch.get_num_threads())
        return pd.DataFrame()

    monkeypatch.setattr(ex, "_grad_cosines", fake)
    cfg = OmegaConf.load(ROOT / "conf" / "exactness.yaml")
    c = cfg.grad_cosine
    n = torch.get_num_threads()
    ambient = 3 if c.threads != 3 else 1
    torch.set_num_threads(ambient)
    try:
        ex.measure_grad_cosine(cfg)
        assert seen == [c.threads] and torch.get_num_threads() == ambient
    finally:
        torch.set_num_threads(n)


def test_resume_under_another_thread_count_says_so(tmp_path, capsys):
    from actcomp.data import build_data
    from actcomp.train import TrainConfig, train

    data = build_data("synthetic", n_train=32, n_val=16, image_size=16)
    cfg = dict(model="test_resnet", epochs=2, batch_size=16, progress=False, memory=False,
               ckpt_path=str(tmp_path / "c.pt"))
    n = torch.get_num_threads()
    try:
        train(TrainConfig(**cfg, threads=1, stop_after_epoch=1), data)
        assert torch.load(tmp_path / "c.pt", weights_only=False)["numerics"]["threads"] == 1
        capsys.readouterr()
        train(TrainConfig(**cfg, threads=2, resume=True), data)
        assert "not bitwise" in capsys.readouterr().err
    finally:
        torch.set_num_threads(n)
