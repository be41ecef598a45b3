"""The committed CSVs under results/ that the README tables and figures are drawn from.

Generic over files (every results/**/*.csv) and over column spellings (the apps write ``model.name`` and
``compression.name``, the older stand-alone tables ``model`` and ``preset``), so these checks follow the CSVs
when they move or are re-written by another app. Nothing here runs a measurement: reading ~35 CSVs takes a second.
"""
import re
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
CSVS = sorted(RESULTS.glob("**/*.csv"))
# The first spelling found wins; every committed CSV carries one of each (the provenance of its numbers).
PROVENANCE = {"commit": ("git_sha",), "torch": ("torch_version", "torch"), "timm": ("timm_version", "timm"),
              "python": ("python_version", "python"), "device": ("device_name", "device"), "date": ("date",)}
GIB = 2**30
# results/logs/ records every stage run, failed ones included (a failure there is history, not a result)
WITH_STATUS = [p for p in CSVS if "status" in p.open().readline().strip().split(",") and "logs" not in p.parts]


def _rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


def _col(df: pd.DataFrame, *names: str) -> str | None:
    return next((n for n in names if n in df.columns), None)


@pytest.fixture(scope="module")
def tables() -> dict[str, pd.DataFrame]:
    return {_rel(p): pd.read_csv(p) for p in CSVS}


def _with_columns(tables, *groups):
    """(path, frame, [column per group]) for every CSV that has a column of each alias group."""
    out = []
    for path, df in tables.items():
        cols = [_col(df, *g) for g in groups]
        if all(cols):
            out.append((path, df, cols))
    return out


def _peaks(tables, model: str, batch: int, img: int = 224) -> list[tuple[str, dict[str, float]]]:
    """Per CSV that holds them: {preset: predicted step peak in GiB} of ``model`` at ``batch`` and ``img`` px."""
    found = []
    for path, df, (m, p, b, i) in _with_columns(tables, ("model.name", "model"), ("compression.name", "preset"),
                                                ("batch_size",), ("img_size",)):
        peak = _col(df, "peak_bytes", "peak_gib")
        if peak is None or "timeline" in path:
            continue
        rows = df[(df[m] == model) & (df[b] == batch) & (df[i] == img)]
        if "device.name" in df.columns:
            rows = rows[rows["device.name"] == "meta"]
        if len(rows):
            scale = GIB if peak == "peak_bytes" else 1
            found.append((path, {k: v / scale for k, v in rows.groupby(p)[peak].first().items()}))
    return found


def test_results_are_there():
    assert len(CSVS) >= 10, f"only {len(CSVS)} CSVs under results/"


@pytest.mark.parametrize("path", [_rel(p) for p in CSVS])
def test_every_csv_has_rows_and_provenance(tables, path):
    df = tables[path]
    assert len(df) > 0, f"{path}: no rows"
    missing = [k for k, names in PROVENANCE.items() if _col(df, *names) is None]
    assert not missing, f"{path}: no provenance column for {missing}"
    for names in PROVENANCE.values():
        col = _col(df, *names)
        assert df[col].notna().all() and (df[col].astype(str).str.strip() != "").all(), f"{path}: empty {col}"
    sha = df[_col(df, *PROVENANCE["commit"])].astype(str)
    # A run log may record a run from an uncommitted tree; a published number must come from a commit.
    pattern = r"[0-9a-f]{7,40}(-dirty)?" if "/logs/" in path else r"[0-9a-f]{7,40}"
    bad = sorted(set(s for s in sha if not re.fullmatch(pattern, s)))
    assert not bad, f"{path}: git_sha {bad[:3]} is not a clean commit"
    dates = pd.to_datetime(df[_col(df, *PROVENANCE["date"])], utc=True, errors="coerce")
    assert dates.notna().all(), f"{path}: unparseable date"


@pytest.mark.parametrize("path", [_rel(p) for p in WITH_STATUS])
def test_status_is_ok_wherever_there_is_one(tables, path):
    df = tables[path]
    bad = df[df.status.notna() & (df.status != "ok")]
    assert bad.empty, f"{path}: status {sorted(set(bad.status))}: {bad.iloc[0].to_dict()}"
    if "point" in df.columns:  # a sweep point always has a status; only a log's TOTAL line leaves it empty
        assert df.status.notna().all(), f"{path}: a sweep point without status"


def test_native_is_its_own_baseline(tables):
    checked = 0
    for path, df, (p,) in _with_columns(tables, ("compression.name", "preset")):
        for col, base, want in [("ratio_to_none", "none", 1.0), ("epochs_ratio", "none", 1.0),
                                ("time_ratio", "none", 1.0), ("cpu_time_ratio", "none", 1.0),
                                ("vs_none_pct", "none", 0.0), ("vs_authors_b1_pct", "authors_b1", 0.0)]:
            if col not in df.columns:
                continue
            rows = df[df[p] == base]
            if not len(rows) and col == "ratio_to_none":  # the speed app: none is timed alongside, in each row
                # one block: the ratio of the two medians; several: the median of the block ratios, inside their
                # quartiles (the steps of all blocks pooled need not give the same median)
                blocks = df["blocks_run"] if "blocks_run" in df else pd.Series(1, index=df.index)
                one = df[blocks.fillna(1) <= 1]
                ref = (one.median_step_s / one.none_median_step_s - one[col]).abs()
                assert (ref < 1e-9).all(), f"{path}: ratio_to_none is not median / none's median"
                many = df[blocks.fillna(1) > 1]
                assert (many.ratio_q25 <= many[col]).all() and (many[col] <= many.ratio_q75).all(), path
                assert (df[col] > 0).all(), f"{path}: non-positive {col}"
                checked += 1
                continue
            assert len(rows), f"{path}: {col} but no {base} row"
            if col in ("epochs_ratio", "time_ratio", "cpu_time_ratio") and "epoch" in df:
                # a fixed target native itself never reached (e.g. 90% for a small model): no ratio, and no epoch
                unreached = rows[col].isna()
                assert rows.loc[unreached, "epoch"].isna().all(), f"{path}: {base} reached a target but has no {col}"
                rows = rows[~unreached]
            assert (rows[col] == want).all(), f"{path}: {col} of {base} is {sorted(set(rows[col]))}, not {want}"
            ratios = df[col].dropna()
            if col.endswith("ratio") or col.startswith("ratio"):
                assert (ratios > 0).all(), f"{path}: non-positive {col}"
            checked += 1
    assert checked >= 5


def test_ratio_to_none_is_the_ratio_to_the_none_row(tables):
    # Peak tables: ratio_to_none = peak / none's peak of the same model and batch (the README's "x of native"); a
    # sweep without that column (memory/whole_set_peak.csv: the README renders the ratio) needs one none row per
    # model and batch for the ratio to be defined.
    checked = 0
    for path, df, (m, p) in _with_columns(tables, ("model.name", "model"), ("compression.name", "preset")):
        peak, r = _col(df, "peak_bytes", "peak_gib"), _col(df, "ratio_to_none")
        if peak is None or (r is None and "whole_set_peak" not in path):
            continue
        keys = [m] + [c for c in ("batch_size", "img_size") if c in df.columns]
        for _, g in df[df[peak].notna()].groupby(keys):
            none = g[g[p] == "none"][peak]
            assert len(none) == 1, f"{path}: {len(none)} none rows"
            if r is not None:
                assert (g[r] - g[peak] / none.iloc[0]).abs().max() < 1e-9, path
            checked += 1
    assert checked


def test_resnet50_headline_peaks_are_ordered_as_the_readme_says(tables):
    # README headline (ResNet-50, batch 256, 224 px): full4 5.3 < full2 6.7 < native 20.9 < pool4 21.4 < authors
    # b=1 30.9 GiB — the paper's pool4 beats the authors' baseline but not native PyTorch.
    found = _peaks(tables, "resnet50", 256)
    assert found, "no predicted resnet50 batch-256 peaks in results/"
    for path, peak in found:
        have = [k for k in ("full4", "full2", "none", "pool4", "authors_b1") if k in peak]
        assert len(have) >= 4, f"{path}: only {have}"
        values = [peak[k] for k in have]
        assert values == sorted(values) and len(set(values)) == len(values), f"{path}: {dict(zip(have, values))}"
        if {"none", "full4", "pool4", "authors_b1"} <= set(peak):
            assert peak["full4"] < 0.3 * peak["none"], f"{path}: full4 not ~-75% vs native"
            assert 0.65 < peak["pool4"] / peak["authors_b1"] < 0.75, f"{path}: pool4 not ~-30% vs authors b=1"


def test_whole_set_presets_lower_every_models_peak(tables):
    # Every model of the whole-set comparison: the whole-set presets below native, full4 at most full2.
    checked = 0
    for path, df, (m, p) in _with_columns(tables, ("model.name", "model"), ("compression.name", "preset")):
        peak = _col(df, "peak_bytes", "peak_gib")
        if peak is None or "timeline" in path or "full4" not in set(df[p]):
            continue
        keys = [c for c in (m, "batch_size", "img_size", "device.name", "amp", "dtype") if c in df.columns]
        for key, g in df.groupby(keys):
            v = g.groupby(p)[peak].first()
            if {"none", "full2", "full4"} <= set(v.index):
                assert v["full4"] <= v["full2"] < v["none"], f"{path} {key}: {v.to_dict()}"
                checked += 1
    assert checked >= 10


def test_peak_grows_with_batch(tables):
    checked = 0
    for path, df, (m, p, b) in _with_columns(tables, ("model.name", "model"), ("compression.name", "preset"),
                                             ("batch_size",)):
        peak = _col(df, "peak_bytes", "peak_gib")
        if peak is None or "timeline" in path:
            continue
        keys = [c for c in (m, p, "img_size", "device.name", "amp", "dtype") if c in df.columns]
        for key, g in df.groupby(keys):
            if g[b].nunique() > 1:
                s = g.sort_values(b)[peak]
                assert s.is_monotonic_increasing, f"{path} {key}: {s.tolist()}"
                checked += 1
    assert checked >= 10


def test_saved_bytes_table_matches_the_readme_order(tables):
    # README's first table (ResNet-18, batch 32): full4 < full2 < pool4 < native < pool2 < authors b=1.
    order = ["full4", "full2", "pool4", "none", "pool2", "authors_b1"]
    checked = 0
    for path, df, (p, s) in _with_columns(tables, ("preset",), ("saved_mib",)):
        v = df.set_index(p)[s]
        if set(order) <= set(v.index) and df.get("model", pd.Series(["resnet18"])).eq("resnet18").all():
            assert list(v[order]) == sorted(v[order]), f"{path}: {v.to_dict()}"
            checked += 1
    assert checked


def test_more_fits_with_full4_and_less_with_the_authors_copy(tables):
    # README: ResNet-50 on 8 GiB, batch 96 native, 65 authors' b=1, 94 pool4, 390 full4 (every budget alike).
    checked = 0
    for path, df, (m, p) in _with_columns(tables, ("model.name", "model"), ("compression.name", "preset")):
        for col in [c for c in df.columns if c.startswith("max_batch_") and c.endswith("gib")]:
            for model, g in df.groupby(m):
                v = g.groupby(p)[col].first()
                if not {"none", "full4", "authors_b1"} <= set(v.index):
                    continue
                assert v["authors_b1"] <= v["none"] < v["full4"], f"{path} {model} {col}: {v.to_dict()}"
                checked += 1
    assert checked


def test_timeline_full4_peak_is_below_native(tables):
    checked = 0
    for path, df, (p, a) in _with_columns(tables, ("preset",), ("allocated_bytes",)):
        peak = df.groupby(p)[a].max()
        if {"none", "full4"} <= set(peak.index):
            assert peak["full4"] < peak["none"], f"{path}: {peak.to_dict()}"
            checked += 1
    assert checked


def test_exact_presets_have_cosine_one(tables):
    # Per-layer gradient cosine: native and the authors' b=1 are exact (README: "exactly 1").
    checked = 0
    for path, df, (p, c) in _with_columns(tables, ("compression.name", "preset"), ("cosine",)):
        exact = df[df[p].isin(["none", "authors_b1"])]
        if "exact_by_design" in df.columns:
            exact = df[df.exact_by_design.astype(bool)]
            assert exact.bitwise.astype(bool).all(), f"{path}: an exact-by-design op is not bitwise"
        assert ((exact[c] - 1).abs() < 1e-9).all(), f"{path}: {exact[c].min()}"
        cos = df[c].dropna()  # empty where a row has no gradient to compare (padding.csv's saved-bytes part)
        assert ((cos > -1 - 1e-9) & (cos < 1 + 1e-9)).all(), f"{path}: cosine outside [-1, 1]"
        checked += len(exact) > 0
    assert checked >= 3


def test_training_native_and_authors_b1_end_identical(tables):
    checked = 0
    for path, df, (p, acc) in _with_columns(tables, ("preset",), ("final_val_top1",)):
        v = df.groupby(p)[acc].first()
        if {"none", "authors_b1"} <= set(v.index):
            assert v["none"] == v["authors_b1"], f"{path}: {v.to_dict()}"
            checked += 1
    assert checked


def test_every_table_and_figure_the_readme_shows_is_committed():
    # The rendered tables (<!-- BEGIN csv -->) and the figures; other paths may name what a GPU run would write.
    text = (ROOT / "README.md").read_text()
    named = set(re.findall(r"<!-- BEGIN (results/\S+\.csv) -->", text)) | set(re.findall(r"\]\((results/\S+\.png)\)", text))
    assert len(named) >= 5
    missing = sorted(n for n in named if not (ROOT / n).is_file())
    assert not missing, f"README shows {missing}"
