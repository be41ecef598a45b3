"""Step-time ratios over repeated interleaved blocks: the block/IQR arithmetic and the adaptive stop on a fake
step clock (deterministic: no real timing is asserted), bad block options (library and app), and the speed
app's new columns and point keys."""
from __future__ import annotations

import os
import types

import pandas as pd
import pytest

import actcomp
import actcomp.measure.speed as speed_mod
from actcomp.measure import compare_step_times
from actcomp.measure.speed import quantile


class FakeClock:
    """Replaces the step and the clock: a step of preset p "takes" the next duration of p's schedule (warm-up
    steps first), and the order of the steps is kept."""

    def __init__(self, schedule: dict[str, list[float]]):
        self.now, self.schedule, self.calls = 0.0, schedule, []

    def perf_counter(self) -> float:
        return self.now

    def train_step(self, m, opt, x, y, label="", **kw):
        name = label.rsplit("[", 1)[1].rstrip("]")
        k = sum(c == name for c in self.calls)
        self.calls.append(name)
        self.now += self.schedule[name][k]


def fake_run(monkeypatch, schedule, loads=(1.5, 2.5), **kw):
    clock = FakeClock(schedule)
    monkeypatch.setattr(speed_mod, "train_step", clock.train_step)
    monkeypatch.setattr(speed_mod, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    it = iter(loads)
    monkeypatch.setattr(os, "getloadavg", lambda: (next(it), 0.0, 0.0))
    df = compare_step_times("test_resnet", ["pool4"], batch_size=2, img_size=32, **kw)
    return df.set_index("preset"), clock


def block_schedule(ratios, iters=5, warmup=2):
    """none: 1 s per step; pool4: each block at its ratio (one outlier step per block, which the median ignores)."""
    pool = [7.0] * warmup
    for r in ratios:
        pool += [r, 9.0, r, 0.1, r][:iters] if iters == 5 else [r] * iters
    return {"none": [1.0] * (warmup + iters * len(ratios)), "pool4": pool}


def test_quantile_linear_interpolation():
    assert quantile([1.1, 1.5, 1.2], 0.25) == pytest.approx(1.15)
    assert quantile([1.1, 1.5, 1.2], 0.75) == pytest.approx(1.35)
    assert quantile([1.1, 1.5, 1.2], 0.5) == pytest.approx(1.2)
    assert quantile([2.0], 0.25) == quantile([2.0], 0.75) == 2.0
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.25) == pytest.approx(1.75)


def test_blocks_median_and_iqr_of_block_ratios(monkeypatch):
    df, clock = fake_run(monkeypatch, block_schedule([1.2, 1.5, 1.1]), warmup=2, iters=5, blocks=3)
    p, n = df.loc["pool4"], df.loc["none"]
    assert p.blocks == n.blocks == 3 and p.iters == 5
    assert p.ratio_to_none == pytest.approx(1.2)
    assert (p.ratio_q25, p.ratio_q75) == (pytest.approx(1.15), pytest.approx(1.35))
    assert n.ratio_to_none == n.ratio_q25 == n.ratio_q75 == 1.0
    # step times over all 15 timed steps: the outliers are in min/max, not in the median
    assert (p.median_s, p.min_s, p.max_s) == (pytest.approx(1.2), pytest.approx(0.1), pytest.approx(9.0))
    assert p.images_per_s == pytest.approx(2 / 1.2)
    assert (p.load_start, p.load_end) == (1.5, 2.5) and (n.load_start, n.load_end) == (1.5, 2.5)
    # warm-up (2 rounds in a fixed order), then 15 timed rounds whose first preset alternates across blocks
    assert clock.calls[:4] == ["none", "pool4", "none", "pool4"]
    firsts = clock.calls[4::2]
    assert firsts == ["none", "pool4"] * 7 + ["none"]


def test_one_block_is_the_plain_median_ratio(monkeypatch):
    df, _ = fake_run(monkeypatch, block_schedule([1.3]), warmup=2, iters=5, blocks=1)
    p = df.loc["pool4"]
    assert p.blocks == 1 and p.ratio_to_none == p.ratio_q25 == p.ratio_q75 == pytest.approx(1.3)


def test_adaptive_blocks_stop_at_target_iqr(monkeypatch):
    # IQR after 3 blocks 0.2, after 4 blocks 0.1, after 5 blocks 0: stops at 5 of at most 8
    df, clock = fake_run(monkeypatch, block_schedule([1.2, 1.5, 1.1, 1.2, 1.2, 1.2, 1.2, 1.2]), warmup=2, iters=5,
                         blocks=3, max_blocks=8, target_iqr=0.05)
    p = df.loc["pool4"]
    assert p.blocks == 5 and p.ratio_to_none == pytest.approx(1.2) and p.ratio_q75 - p.ratio_q25 <= 0.05
    assert len(clock.calls) == 2 * (2 + 5 * 5)
    # never within the target: max_blocks blocks
    df, _ = fake_run(monkeypatch, block_schedule([1.2, 1.5, 1.1, 1.3, 1.4, 1.6]), warmup=2, iters=5, blocks=3,
                     max_blocks=6, target_iqr=0.01)
    assert df.loc["pool4"].blocks == 6
    # within the target from the start: still the `blocks` asked for
    df, _ = fake_run(monkeypatch, block_schedule([1.2] * 4), warmup=2, iters=5, blocks=4, max_blocks=9,
                     target_iqr=0.5)
    assert df.loc["pool4"].blocks == 4


@pytest.mark.parametrize("kw,msg", [
    (dict(blocks=0), "blocks must be an int >= 1, got 0"),
    (dict(blocks=True), "blocks must be an int >= 1, got True"),
    (dict(blocks=3, max_blocks=2, target_iqr=0.1), "max_blocks must be an int >= 3 or None, got 2"),
    (dict(max_blocks=5), "max_blocks and target_iqr go together"),
    (dict(target_iqr=0.1), "max_blocks and target_iqr go together"),
    (dict(max_blocks=5, target_iqr=-0.1), "target_iqr must be a finite number >= 0 or None, got -0.1"),
    (dict(max_blocks=5, target_iqr=float("nan")), "target_iqr must be a finite number >= 0"),
    (dict(max_blocks=5, target_iqr="0.1"), "target_iqr must be a finite number >= 0"),
])
def test_bad_block_options(kw, msg):
    with pytest.raises(actcomp.ActcompError, match=msg) as e:
        compare_step_times("test_resnet", ["pool4"], 2, img_size=32, **kw)
    assert "\n" not in str(e.value)


def _fake_rows(seen):
    def fake(model, presets, batch_size, **kw):
        seen.append(kw)
        return pd.DataFrame([dict(preset=p, median_s=1.0, min_s=1.0, max_s=1.0, images_per_s=2.0,
                                  ratio_to_none=r, ratio_q25=r - 0.1, ratio_q75=r + 0.2, blocks=4, load_start=0.5,
                                  load_end=0.75) for p, r in (("none", 1.0), ("pool2", 1.3))])
    return fake


def test_speed_app_records_spread_and_load(tmp_path, monkeypatch):
    from test_benchmarks import TINY, run_app

    import benchmarks.speed as app

    seen = []
    monkeypatch.setattr(app, "compare_step_times", _fake_rows(seen))
    args = ["model=test_resnet", "compression=pool2", "batch_size=2", *TINY]
    assert run_app("speed", [*args, "max_blocks=6", "target_iqr=0.05"], tmp_path, monkeypatch) == 0
    assert seen[-1]["blocks"] == 3 and seen[-1]["max_blocks"] == 6 and seen[-1]["target_iqr"] == 0.05
    row = pd.read_csv(tmp_path / "results" / "speed" / "t.csv").iloc[0]
    assert row.ratio_to_none == 1.3 and row.ratio_q25 == pytest.approx(1.2) and row.ratio_q75 == pytest.approx(1.5)
    assert row.blocks == 3 and row.blocks_run == 4 and row.max_blocks == 6 and row.target_iqr == 0.05
    assert (row.load_start, row.load_end) == (0.5, 0.75)


def test_speed_point_keys_blocks():
    """Records made before `blocks` existed measured one block: blocks=1 keeps their key, the new default 3 (a
    different ratio: the median over blocks) is a new point; max_blocks/target_iqr at null change nothing."""
    from omegaconf import OmegaConf

    from benchmarks.common import config_hash
    from benchmarks.sweep import NOT_MEASURED, point_key

    old = config_hash(OmegaConf.create({"app": "speed", "batch_size": 2}), drop=NOT_MEASURED)
    cfg = OmegaConf.create({"app": "speed", "batch_size": 2, "compile": False, "blocks": 1, "max_blocks": None,
                            "target_iqr": None})
    assert point_key(cfg) == old
    assert point_key(OmegaConf.merge(cfg, {"blocks": 3})) != old
    assert point_key(OmegaConf.merge(cfg, {"blocks": True})) != old  # True == 1, but not the same setting
    assert point_key(OmegaConf.merge(cfg, {"max_blocks": 6, "target_iqr": 0.05})) != old
