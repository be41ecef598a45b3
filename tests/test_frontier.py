"""The memory-accuracy frontier: the tidy per-run table, the Pareto front, figure 10, the study configs and stages."""
import math

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir

import benchmarks.frontier as fr
from benchmarks import reproduce, verify
from benchmarks.hydra_conf import CONF_DIR, VERSION_BASE


def _summary(model="resnet18", seeds=(0, 1), presets=("none", "pool4", "full4")):
    """summary.csv rows as benchmarks.train.collect writes them: per run, two fixed targets and native best - 0.5."""
    rows = []
    peak = {"none": 100.0, "pool4": 101.0, "full4": 40.0}
    for seed in seeds:
        for p in presets:
            final = {"none": 90.0, "pool4": 88.5, "full4": 89.0}[p] + seed
            for kind, target, epoch in (("fixed", 85.0, 2), ("fixed", 88.0, 4 if p == "none" else 6),
                                        ("baseline_best-0.5", 89.5 + seed, 8 if p == "none" else math.nan)):
                base_epoch = 4 if target == 88.0 else (2 if target == 85.0 else 8)
                rows.append(dict(preset=p, model=model, seed=seed, baseline="none", final_val_top1=final,
                                 best_val_top1=final + 0.2, epochs=10, total_time_s=100.0, target_kind=kind,
                                 target=target, reached=not math.isnan(epoch), epoch=epoch, time_s=epoch * 10,
                                 epochs_ratio=epoch / base_epoch, cpu_time_s=epoch * 9,
                                 total_cpu_time_s=90.0, peak_mem_mib=peak[p],
                                 peak_mem_source="predicted step peak (meta)", git_sha="abc", date="2026-11-29"))
    return pd.DataFrame(rows)


@pytest.fixture
def fake_r50(monkeypatch):
    # The real prediction (ResNet-50, batch 256, 224 px on meta) takes seconds per preset; its value is tested
    # through actcomp.step_memory elsewhere. Here: the plumbing.
    monkeypatch.setattr(fr, "r50_peak_bytes", lambda p: {"none": 4.0, "pool4": 4.2, "full4": 1.0}.get(p, math.nan))


def test_frontier_table_one_row_per_run_with_targets_and_ratios(fake_r50):
    t = fr.frontier_table(pd.concat([_summary(), _summary("mobilenetv3_small_050", seeds=(0,))]))
    assert len(t) == 9 and not t.duplicated(["model", "preset", "seed"]).any()
    r = t[(t.model == "resnet18") & (t.preset == "full4") & (t.seed == 1)].iloc[0]
    assert r.final_val_top1 == 90.0 and r.best_val_top1 == pytest.approx(90.2)
    assert r.peak_ratio == pytest.approx(0.4) and r.r50_b256_peak_ratio == pytest.approx(0.25)
    assert r.epochs_to_88 == 6 and r.epochs_ratio_88 == pytest.approx(1.5) and r.cpu_time_to_88_s == 54
    assert r["target_native_best_m0.5"] == 90.5 and math.isnan(r["epochs_to_native_best_m0.5"])
    n = t[(t.preset == "none")]
    assert (n.peak_ratio == 1.0).all() and (n.r50_b256_peak_ratio == 1.0).all()
    assert list(t.columns[:7]) == ["model", "preset", "seed", "final_val_top1", "best_val_top1", "peak_ratio",
                                   "r50_b256_peak_ratio"]
    assert list(t.columns[-2:]) == ["git_sha", "date"]
    # every column is one verify knows how to compare
    assert not [c for c in t.columns if verify.kind_of("train/frontier/frontier.csv", c) is None]


def test_write_frontier_merges_studies_and_cli_errors(tmp_path, fake_r50, capsys):
    assert fr.main([str(tmp_path)]) == 2
    assert "no " in capsys.readouterr().err
    for name, model in (("frontier_resnet18", "resnet18"), ("frontier_mobile", "mobilenetv3_small_050")):
        (tmp_path / name).mkdir()
        _summary(model).to_csv(tmp_path / name / "summary.csv", index=False)
    assert fr.main([str(tmp_path)]) == 0
    t = pd.read_csv(tmp_path / "frontier.csv")
    assert len(t) == 12 and set(t.model) == {"resnet18", "mobilenetv3_small_050"}
    assert fr.main([]) == 2 and fr.main(["--help"]) == 2


def test_pareto_front_keeps_the_undominated():
    pts = pd.DataFrame(dict(preset=list("abcde"), x=[1.0, 0.25, 0.25, 0.5, 1.0], acc=[90, 88, 87, 89.5, 89]))
    front = fr.pareto_front(pts, "x", "acc")
    assert list(front.preset) == ["b", "d", "a"]


def test_fig10_draws_with_and_without_reached_targets(tmp_path, fake_r50):
    from benchmarks.plots.data import Missing, Results
    from benchmarks.plots.frontier import fig10_frontier
    from benchmarks.plots.style import pyplot

    plt = pyplot()
    with pytest.raises(Missing, match="make study"):
        fig10_frontier(Results(tmp_path), plt)
    d = tmp_path / "train" / "frontier"
    d.mkdir(parents=True)
    fr.frontier_table(pd.concat([_summary(), _summary("mobilenetv3_small_050")])).to_csv(d / "frontier.csv", index=False)
    fig = fig10_frontier(Results(tmp_path), plt)
    assert len(fig.axes) == 4
    plt.close(fig)


@pytest.mark.parametrize("exp,model,seeds", [("frontier_resnet18", "resnet18", [0, 1, 2]),
                                              ("frontier_mobile", "mobilenetv3_small_050", [0, 1]),
                                              ("frontier_resnet18_quick", "resnet18", [0, 1])])
def test_frontier_experiments_compose(exp, model, seeds):
    with initialize_config_dir(str(CONF_DIR), version_base=VERSION_BASE):
        c = compose("train", overrides=[f"experiment=train/{exp}"], return_hydra_config=True)
    assert c.name == exp and c.model.name == model and c.data.name == "fashion_mnist"
    params = c.hydra.sweeper.params
    assert [int(s) for s in str(params.seed).split(",")] == seeds
    assert {"none", "pool4", "full4"} <= set(str(params.compression).split(","))
    cb = c.hydra.callbacks.collect_train
    assert cb.out.endswith(f"train/frontier/{exp}") and cb.frontier.endswith("train/frontier")
    assert c.hydra.sweep.subdir == f"{c.compression.name}-s{c.seed}"  # one folder per preset and seed
    if model == "resnet18":  # the reference recipe: the narrow ResNet-18 of fmnist_reference
        assert list(c.model.kwargs.channels) == [16, 32, 64, 128]


def test_reproduce_adds_the_frontier_stages_only_with_study(tmp_path):
    base = [s.name for s in reproduce.plan(reproduce.parse([f"out={tmp_path}", "paper=false"]))]
    assert not [s for s in base if s.startswith("frontier")]
    st = {s.name: s for s in reproduce.plan(reproduce.parse([f"out={tmp_path}", "paper=false", "study=true"]))}
    assert "experiment=train/frontier_resnet18" in st["frontier_resnet18"].args
    q = {s.name: s for s in reproduce.plan(reproduce.parse(["quick=true", f"out={tmp_path}", "study=true"]))}
    assert "experiment=train/frontier_mobile_quick" in q["frontier_mobile"].args
    assert verify.stage_of("train/frontier/frontier_mobile/summary.csv") == "frontier_mobile"
    assert verify.stage_of("train/frontier/frontier_resnet18_quick/epochs.csv") == "frontier_resnet18"


def test_md_frontier_tables_and_pick_by_affordable_memory():
    from benchmarks.plots.tables import md_frontier

    rows = []
    for model, seeds in (("mob", [0, 1]), ("r18", [0, 1, 2])):
        for p, r50, acc, ep in (("none", 1.0, 90.0, 1.0), ("full4", 0.24, 88.0, None), ("full_q2", 0.26, 89.8, 1.1),
                                ("q4", 0.6, 89.9, 1.0)):
            for s in seeds:
                rows.append(dict(model=model, preset=p, seed=s, final_val_top1=acc + s * 0.1, peak_ratio=r50,
                                 r50_b256_peak_ratio=r50, total_cpu_time_s=100.0 * (2 if p.startswith("full") else 1),
                                 epochs_ratio_native_best_m0_5=ep))
    df = pd.DataFrame(rows).rename(columns={"epochs_ratio_native_best_m0_5": "epochs_ratio_native_best_m0.5"})
    df["cpu_time_to_native_best_m0.5_s"] = 50.0 * df["epochs_ratio_native_best_m0.5"]
    md = md_frontier(df, "results/train/frontier/frontier.csv")
    assert md.index("**r18**") < md.index("**mob**")  # the reference (most seeds) first
    r18 = md[md.index("**r18**"):md.index("**mob**")]
    assert "| full4 | 3 | 0.240× | 0.240× | 88.10% (88.00–88.20) | -2.00 | not reached 0/3 | — | 2.00× |" in r18
    assert "| full_q2 | 3 | 0.260× | 0.260× | 89.90% (89.80–90.00) | -0.20 | 1.10× | 1.10× | 2.00× |" in r18
    assert "| ≤ 0.5× | full_q2 | 0.260× | -0.20 | -0.20 | 1.10× |" in md  # q4 (0.6×) does not fit
    assert "| ≤ 0.25× | full4 | 0.240× | -2.00 | -2.00 | not reached 0/3 |" in md
    assert "| ≤ 0.125× | no studied preset reaches it (lowest: 0.240×)" in md
