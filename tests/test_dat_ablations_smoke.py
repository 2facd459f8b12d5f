"""Smoke test of benchmarks/dat_ablations.py: the seconds-long version writes its JSON, table and figure."""

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "dat_ablations.py"


@pytest.mark.slow
def test_dat_ablations_quick(tmp_path):
    pytest.importorskip("sklearn")
    spec = importlib.util.spec_from_file_location("dat_ablations", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    results = module.main(["--quick", "--rows", "ce_only,head_mixer", "--out", str(tmp_path)])
    written = json.loads((tmp_path / "dat_ablations.json").read_text())
    assert set(written["rows"]) == {"ce_only", "head_mixer"} == set(results["rows"])
    assert "expected" in written["rows"]["ce_only"]["final"] and "greedy" in written["rows"]["ce_only"]["final"]
    assert "direct" in written["rows"]["head_mixer"]["final"]
    assert {"pearson_r", "pearson_r_swapped"} <= set(written["rows"]["head_mixer"]["swap_probe"])
    assert set(written["reference_lines"]) == {"ridge_ar", "per_neuron_ar"}
    table = (tmp_path / "dat_ablations.md").read_text()
    assert "| head_mixer |" in table and "| ridge_ar |" in table
    assert (tmp_path / "dat_ablations.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        module.parse_args(["--rows", "nonsense"])
