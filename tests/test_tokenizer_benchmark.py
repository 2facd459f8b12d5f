"""benchmarks/tokenizer_benchmark.py: the objective ablation's table is composed from its variants' results."""

import json

from benchmark_scripts import load_benchmark


def _variant_result(r_sim: float, r_zebrafish: float, steps: int, dead: int) -> dict:
    return {
        "training": {"segments": 1000, "steps": steps, "seconds": 60.0 * steps / 782},
        "reconstruction": [
            {"dataset": "simulated", "calm_pearson_r": r_sim, "kmeans_pearson_r": 0.989},
            {"dataset": "zebrafish", "calm_pearson_r": r_zebrafish, "kmeans_pearson_r": 0.898},
        ],
        "codebook_health": {"dead_codes": dead},
    }


def test_objective_ablation_table_reuses_finished_variants(tmp_path):
    bench = load_benchmark("tokenizer_benchmark.py")
    out = tmp_path / "tokenizer_objective"
    out.mkdir()
    values = {"paper_terms": (0.974, 0.823, 782, 6), "no_ar": (0.987, 0.896, 782, 0), "plain": (0.988, 0.892, 782, 0),
              "plain_x3": (0.991, 0.904, 2346, 0)}
    assert [name for _, name, _, _ in bench.OBJECTIVE_VARIANTS] == list(values)
    for name, args in values.items():
        (out / f"{name}.json").write_text(json.dumps(_variant_result(*args)))
    summary = bench.objective_ablation(["--output", str(out), "--reuse"])  # nothing is trained
    table = (tmp_path / "tokenizer_objective.md").read_text()
    assert "| simulated | 0.989 | 0.974 | 0.987 | 0.988 | 0.991 |" in table
    assert "| zebrafish | 0.898 | 0.823 | 0.896 | 0.892 | 0.904 |" in table
    assert "| steps / minutes (1 thread) | | 782 / 1.0 | 782 / 1.0 | 782 / 1.0 | 2346 / 3.0 |" in table
    assert "| dead codes (held-out sim) | | 6 | 0 | 0 | 0 |" in table
    saved = json.loads((tmp_path / "tokenizer_objective.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    plain = next(v for v in saved["variants"] if v["result"].endswith("plain"))
    assert plain["overrides"] == bench.PLAIN and plain["epochs"] == 2.0
