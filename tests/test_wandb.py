"""W&B plumbing: an offline run never touches the network; online without a server falls back once per sweep."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import common

ROOT = Path(__file__).resolve().parent.parent

# Runs one offline W&B run through benchmarks.common.wandb_run with every outbound connection and host lookup
# of this process refused and recorded (loopback and Unix sockets, which W&B uses to talk to its own service
# process, stay allowed); the record is written after W&B's exit handlers ran.
_PROBE = r'''
import atexit, json, socket, sys
seen = []
atexit.register(lambda: open(sys.argv[1], "w").write(json.dumps(seen)))
LOCAL = ("localhost", "127.0.0.1", "::1", None)
real_connect = socket.socket.connect
def connect(self, addr):
    if self.family != socket.AF_UNIX and addr[0] not in LOCAL:
        seen.append(f"connect {addr!r}")
        raise OSError("network refused by the test")
    return real_connect(self, addr)
socket.socket.connect = connect
for fn in ("getaddrinfo", "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
    def lookup(host, *a, _real=getattr(socket, fn), _fn=fn, **k):
        if host not in LOCAL:
            seen.append(f"{_fn} {host!r}")
            raise socket.gaierror("network refused by the test")
        return _real(host, *a, **k)
    setattr(socket, fn, lookup)
from omegaconf import OmegaConf
from benchmarks.common import wandb_run
cfg = OmegaConf.create({"logger": {"mode": "offline", "project": "t", "dir": sys.argv[2]}, "x": 1})
with wandb_run(cfg, "test", name="offline probe") as run:
    assert run is not None
    run.log({"a": 1.0})
    run.summary["b"] = 2
'''


def test_offline_run_never_touches_the_network(tmp_path):
    pytest.importorskip("wandb")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(PYTHONPATH=str(ROOT), HOME=str(tmp_path))  # no user W&B settings
    rec = tmp_path / "seen.json"
    r = subprocess.run([sys.executable, "-c", _PROBE, str(rec), str(tmp_path)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(rec.read_text()) == []
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # the run itself was written


def test_online_without_server_probes_once_then_offline(monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv(common.PROBE_ENV, raising=False)
    for k in ("https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(k, raising=False)
    tries = []

    def refuse(addr, timeout=None):
        tries.append(addr)
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr("socket.create_connection", refuse)
    assert [common.wandb_mode({"mode": "online"}) for _ in range(3)] == ["offline"] * 3
    assert len(tries) == 1 and os.environ[common.PROBE_ENV] == "offline"
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unreachable" in err[0] and "logging offline" in err[0]
    assert common.wandb_mode({"mode": "offline"}) == "offline" and len(tries) == 1

    # the sweep's callback probes before any point, and the points (other processes too) inherit the answer
    monkeypatch.delenv(common.PROBE_ENV)
    from omegaconf import OmegaConf

    common.WandbProbe().on_multirun_start(OmegaConf.create({"logger": {"mode": "online"}}))
    assert len(tries) == 2 and os.environ[common.PROBE_ENV] == "offline"
    monkeypatch.setenv(common.PROBE_ENV, "ok")
    assert common.wandb_mode({"mode": "online"}) == "online" and len(tries) == 2


def test_predicted_peaks_say_so_in_their_wandb_keys():
    from benchmarks.sweep import wandb_metrics

    m = dict(peak_bytes=10, predicted_peak_bytes=None, peak_activation_bytes=4, method="memtracker-meta")
    assert wandb_metrics("meta", m) == dict(predicted_peak_bytes=10, predicted_peak_activation_bytes=4,
                                            method="memtracker-meta")
    cpu = dict(peak_bytes=10, predicted_peak_bytes=9)
    assert wandb_metrics("cpu", cpu) == cpu
