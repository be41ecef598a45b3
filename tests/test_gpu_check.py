"""benchmarks.gpu_check: its code path on CPU at toy size, and its one-line refusals."""
import pandas as pd
import pytest

from benchmarks import gpu_check


def test_gpu_check_cpu_path_writes_three_csvs_with_provenance(tmp_path):
    # 64 px: the largest-batch search starts at batch 1, where BatchNorm needs more than one value per channel.
    rc = gpu_check.main(["device=cpu", "toy=true", "models=test_resnet", "presets=none,pool4", "batches=2",
                         "img_size=64", "blocks=2", "iters=1", "warmup=0", "compile=eager",
                         f"out={tmp_path}"])
    assert rc == 0
    mem = pd.read_csv(tmp_path / "memory.csv")
    assert list(mem["preset"]) == ["none", "pool4"] and (mem["status"] == "ok").all()
    # CPU measurement (MemTracker) and the meta prediction of the same step agree to the byte.
    assert (mem["peak_bytes"] == mem["predicted_peak_bytes"]).all() and (mem["prediction_error"] == 0).all()
    speed = pd.read_csv(tmp_path / "speed.csv")
    assert set(speed["preset"]) == {"none", "pool4"} and (speed["blocks"] == 2).all()
    assert (speed["ratio_min"] <= speed["ratio_median"]).all() and (speed["ratio_median"] <= speed["ratio_max"]).all()
    assert speed.loc[speed["preset"] == "none", "ratio_median"].item() == 1.0
    fit = pd.read_csv(tmp_path / "fit.csv")
    assert list(fit["preset"]) == ["none", "full4"] and (fit["status"] == "unverified").all()
    assert (fit["predicted_batch"] >= 1).all()
    for df in (mem, speed, fit):
        assert {"git_sha", "torch_version", "device_name", "date"} <= set(df.columns)


def test_gpu_check_time_limit_records_skipped_points(tmp_path):
    rc = gpu_check.main(["device=cpu", "toy=true", "models=test_resnet", "presets=none", "batches=2",
                         "time_limit_s=0.000001", "compile=eager", f"out={tmp_path}"])
    assert rc == 1
    assert (pd.read_csv(tmp_path / "memory.csv")["status"] == "skipped").all()


@pytest.mark.parametrize("args,msg", [
    (["device=tpu"], "device="), (["compile=maybe"], "compile="), (["batches=a"], "batches="),
    (["blocks=0"], "blocks="), (["fit_budget_gib=-1"], "positive"), (["toy=perhaps"], "toy="),
    (["bogus=1"], "unknown option"), (["device=cpu", "out=results/gpu"], "never writes into results"),
])
def test_gpu_check_bad_options_one_line_exit_2(args, msg, tmp_path, capsys):
    assert gpu_check.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert msg in err and len(err.splitlines()) == 1


def test_gpu_check_without_cuda_refuses_in_one_line(capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["models=resnet18"]) == 2
    err = capsys.readouterr().err.strip()
    assert "no CUDA" in err and len(err.splitlines()) == 1
