"""On a CUDA GPU: measured step peaks against the meta prediction, the real largest-batch search, the GPU check.

Every test but the first is marked ``cuda`` and skipped, with its reason, where ``torch.cuda.is_available()`` is
False (tests/conftest.py). The no-CUDA error paths are tested on CPU in test_memory.py and test_benchmarks.py.
"""
import importlib

import pandas as pd
import pytest
import torch

import actcomp

# The memory module, by whatever name it has: the public step_memory says where it lives.
memory = importlib.import_module(actcomp.step_memory.__module__)

# actcomp's memory docs: the prediction leaves out allocator rounding and library workspaces, "expect a GPU
# peak within about ±10%". Batch 64 at 128 px: activations, not workspaces, make the peak.
CUDA_PEAK_RTOL = 0.10


def test_cuda_marker_skips_with_a_reason_exactly_when_there_is_no_gpu(request):
    marked = [i for i in request.session.items if i.get_closest_marker("cuda") is not None]
    if not marked:
        pytest.skip("no cuda-marked test selected in this run")
    for item in marked:
        skips = [m for m in item.iter_markers("skip") if "needs a CUDA GPU" in m.kwargs.get("reason", "")]
        assert bool(skips) != torch.cuda.is_available(), item.nodeid


@pytest.mark.cuda
@pytest.mark.parametrize("preset", ["none", "full4"])
def test_measured_cuda_peak_is_the_meta_prediction_within_ten_percent(preset):
    r = actcomp.step_memory("resnet18", 64, img_size=128, preset=preset, device="cuda")
    assert r.method == "cuda" and r.peak_bytes > 0 and r.reserved_bytes >= r.peak_bytes
    assert r.predicted_peak_bytes == actcomp.step_memory("resnet18", 64, img_size=128, preset=preset).peak_bytes
    assert r.peak_bytes == pytest.approx(r.predicted_peak_bytes, rel=CUDA_PEAK_RTOL)


@pytest.mark.cuda
def test_full4_lowers_the_measured_cuda_peak():
    kw = dict(img_size=128, device="cuda")
    none = actcomp.step_memory("resnet18", 64, preset="none", **kw)
    full4 = actcomp.step_memory("resnet18", 64, preset="full4", **kw)
    assert full4.peak_bytes < none.peak_bytes
    assert full4.after_forward_bytes < 0.3 * none.after_forward_bytes


@pytest.mark.cuda
def test_verified_largest_batch_is_near_the_predicted_one():
    # A budget 1.5x the predicted peak at batch 32: the search must really fit batch 32, and land near the
    # meta prediction for the same budget (batch granularity and workspaces: within 25%).
    budget = int(1.5 * actcomp.step_memory("test_resnet", 32, img_size=64).peak_bytes)
    predicted = actcomp.largest_batch("test_resnet", "none", budget, img_size=64, max_batch=1024)
    verified = memory.verify_largest_batch_cuda("test_resnet", "none", budget, img_size=64, max_batch=1024,
                                                start=predicted)
    assert predicted >= 32 and verified >= 32
    assert verified == pytest.approx(predicted, rel=0.25)


@pytest.mark.cuda
def test_step_times_on_cuda():
    df = actcomp.compare_step_times("test_resnet", ["pool4", "full4"], batch_size=4, img_size=64, device="cuda",
                                    warmup=1, iters=2)
    assert list(df.preset) == ["none", "pool4", "full4"] and (df.median_s > 0).all()
    assert df.loc[df.preset == "none", "ratio_to_none"].item() == 1.0
    assert df.device.str.startswith("cuda").all()


@pytest.mark.cuda
def test_gpu_check_toy_run_measures_every_point(tmp_path):
    from benchmarks import gpu_check

    rc = gpu_check.main(["device=cuda", "toy=true", "models=test_resnet", "presets=none,full4", "batches=2",
                         "blocks=1", "iters=1", "warmup=1", "compile=eager", f"out={tmp_path}"])
    assert rc == 0
    mem = pd.read_csv(tmp_path / "memory.csv")
    assert (mem.status == "ok").all() and (mem.peak_bytes > 0).all() and mem.predicted_peak_bytes.notna().all()
    fit = pd.read_csv(tmp_path / "fit.csv")
    assert (fit.status == "ok").all() and (fit.verified_batch >= 1).all()
