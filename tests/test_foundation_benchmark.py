"""Smoke run of benchmarks/foundation.py on a tiny calm-base: every cell is scored, the JSON has the documented
layout with finite numbers, and the table and k-curve figure are written."""

import json
import math

import pytest
from benchmark_scripts import load_benchmark

bench = load_benchmark("foundation.py")


@pytest.fixture(scope="module")
def tiny_release(tmp_path_factory):
    from calm_hf.commands.main import run

    out = tmp_path_factory.mktemp("foundation-release")
    run(["--size", "tiny", "--output_dir", str(out), "--bf16", "false", "--use_cpu"])
    return out / "calm-base"


@pytest.mark.slow  # a tiny main job, then every held-out cell with adaptation and training from scratch
def test_foundation_benchmark_writes_every_cell(tiny_release, tmp_path):
    output = tmp_path / "foundation.json"
    bench.main(["--calm_dir", str(tiny_release), "--size", "smoke", "--output", str(output)])
    written = json.loads(output.read_text())
    assert sorted(written["sets"]) == ["sim_in", "sim_paper"]
    for name, cells in written["sets"].items():
        assert list(cells) == ["0", "4", "all"]
        assert {"calm", "last_second_mean", "context_ar"} <= set(cells["0"])
        assert {"calm", "calm_adapted", "calm_readout", "ridge_ar", "per_neuron_ar", "tcn", "train_mean"} <= set(
            cells["4"])
        assert "calm_scratch" in cells["all"]
        for model, row in cells["all"].items():
            assert set(row) == {"pearson_r", "mse", "coverage_90", "crps"}
            assert math.isfinite(row["mse"]) and math.isfinite(row["crps"]) and 0 <= row["coverage_90"] <= 1, model
        assert set(written["probe"][name]) == {"0", "4", "all"}
    assert written["adaptation"]["sim_in"]["4"][0]["steps"] >= 1
    assert 0 <= min(written["readout"]["sim_in"]["4"][0]["network_weight"]) <= 1
    table = output.with_suffix(".md").read_text()
    assert "| sim_in | 4 |" in table and "Transfer at k = all" in table
    assert output.with_suffix(".png").stat().st_size > 0


def test_runs_over_different_sets_merge_into_one_result(tmp_path):
    """Each set run in its own process, then merged: the cells, records and sessions of each, and a meta naming both."""
    def run(name, commit, seconds):
        cell = {"calm": {"pearson_r": 0.2, "mse": 0.9, "coverage_90": 0.9, "crps": 0.5}}
        return {"sets": {name: {"0": cell}}, "probe": {name: {}}, "adaptation": {name: {}}, "readout": {name: {}},
                "scratch": {name: []}, "meta": {"date": "2026-12-06", "commit": commit, "command": f"run {name}",
                                                "machine": "2 threads", "size": "quick", "seconds": seconds,
                                                "sessions": {name: [f"{name}-0"]}}}

    paths = []
    for name, commit, seconds in (("park", "bbb", 60.0), ("sim_in", "aaa", 120.0)):
        paths.append(tmp_path / f"{name}.json")
        paths[-1].write_text(json.dumps(run(name, commit, seconds)))
    output = tmp_path / "merged" / "foundation.json"
    bench.main(["--merge", *map(str, paths), "--output", str(output)])
    merged = json.loads(output.read_text())
    assert list(merged["sets"]) == ["sim_in", "park"]  # the benchmark's order of sets
    assert merged["meta"]["commit"] == "aaa+bbb" and merged["meta"]["seconds"] == 120.0
    assert merged["meta"]["summed_seconds"] == 180.0 and len(merged["meta"]["runs"]) == 2
    assert merged["meta"]["sessions"] == {"sim_in": ["sim_in-0"], "park": ["park-0"]}
    assert "| park | 0 |" in output.with_suffix(".md").read_text()
    with pytest.raises(SystemExit, match="in both"):
        bench.main(["--merge", str(paths[0]), str(paths[0]), "--output", str(tmp_path / "x.json")])


def test_the_measured_sizes_adapt_with_the_step_cap_calm_adapt_uses():
    """The quick and full sizes cap adaptation (and training from scratch) at `calm adapt`'s own step cap, so the
    calm_adapted rows measure what a user gets without flags; the smoke size keeps its own tiny cap."""
    from calm_hf.adaptation import AdaptationSettings

    assert bench.adaptation_steps(bench.SIZES["quick"]) == AdaptationSettings.max_steps
    assert bench.adaptation_steps(bench.SIZES["full"]) == AdaptationSettings.max_steps
    assert bench.adaptation_steps(bench.SIZES["smoke"]) == bench.SIZES["smoke"]["adapt_steps"] < 10
