"""Smoke run of the forecasting benchmark suite (benchmarks/forecasting.py) on tiny data and tiny configs.

One `--size tiny --ablations` run of every dataset (sim, zebrafish and park when the recordings are present, heldout)
and every model: every model trains, every table and the figure are written, metrics are finite, the reported Pearson
r and MSE match a direct numpy computation on the arrays the benchmark scored (also for park's sessions of different
sizes), band calibration and the trial-swap probe are reported, and the time budgets really stop training.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark

bench = load_benchmark("forecasting.py")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("forecasting-bench")
    results = bench.main(["--size", "tiny", "--out", str(out), "--work_dir", str(out / "work"), "--ablations",
                          "--save_predictions", "--seed", "0"])
    return out, results


def _strict_json(path: Path) -> dict:
    def refuse(constant):
        raise ValueError(f"non-standard JSON constant {constant} in {path}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.slow  # the tiny forecasting benchmark end to end (the `smoke` fixture)
def test_every_model_trains_with_finite_metrics(smoke):
    out, results = smoke
    written = _strict_json(out / "forecasting.json")
    assert list(written["datasets"]) == ["sim", "zebrafish", "heldout", "park"]
    expected_calm = {
        "sim": ["calm_direct", "calm_greedy", "calm_sample_mean2", "calm_no_scheduled_sampling_direct",
                "calm_no_scheduled_sampling_greedy", "calm_no_neighbor_replacement_direct",
                "calm_no_neighbor_replacement_greedy"],
        "zebrafish": ["calm_direct", "calm_greedy", "calm_sample_mean2"],
        "heldout": ["calm_adapted_direct", "calm_adapted_greedy", "calm_adapted_sample_mean2"],
        "park": ["calm_direct", "calm_greedy", "calm_sample_mean2"],
    }
    for name, dataset in written["datasets"].items():
        if name in ("zebrafish", "park") and dataset["status"].startswith("skipped"):
            continue  # the real recording is absent on this machine: a clear message instead of numbers
        assert dataset["status"] == "ok", (name, dataset["status"])
        models = dataset["models"]
        for baseline in ("ridge_ar", "mean", "per_neuron_ar", "tcn", "patchtst_hf"):
            entry = models[baseline]
            assert entry["status"] == "ok"
            assert entry["search_log"] and all(log.get("grid") for log in entry["search_log"].values())
            assert all(choice for choice in entry["chosen"].values())
        for nf in ("nf_patchtst", "nf_itransformer"):
            if not bench.neuralforecast_available():
                assert models[nf] == {"status": bench.NF_NOT_INSTALLED}
            else:
                assert models[nf]["status"] == "ok"
        for calm in expected_calm[name]:
            assert models[calm]["status"] == "ok", calm
            assert models[calm]["training"]["pretrain"]["max_steps"] >= 1
        for calm in expected_calm[name][:3]:  # the main CalM of the dataset: probe on every variant, bands calibrated
            probe = models[calm]["swap_probe"]
            assert probe["status"] == "ok" and probe["trials"] >= 2, (name, calm, probe)
            for key in ("next_token_ce", "next_token_ce_swapped", "pearson_r", "pearson_r_swapped"):
                assert math.isfinite(probe[key]), (name, calm, key)
        for calm in (expected_calm[name][0], expected_calm[name][2]):  # direct and sample-mean carry a band
            calibration = models[calm]["calibration"]
            assert calibration["num_samples"] == 2 and 0 <= calibration["coverage"] <= 1
            assert math.isfinite(calibration["crps"]) and calibration["crps"] >= 0
        for model, entry in models.items():
            if entry["status"] != "ok":
                continue
            assert math.isfinite(entry["pearson_r"]) and -1 <= entry["pearson_r"] <= 1, (name, model)
            assert math.isfinite(entry["mse"]) and entry["mse"] > 0, (name, model)
            assert all(v is not None for v in entry["per_session_pearson_r"].values()), (name, model)
            cost = entry["cost"]
            assert cost["train_seconds"] is not None and cost["train_seconds"] > 0, (name, model)
            assert cost["inference_seconds_per_trial"] > 0 and cost["parameters"] > 0, (name, model)
            assert cost["peak_memory_mb"] is not None and cost["peak_memory_mb"] >= 0, (name, model)
    # every model is scored on the same test trials of a dataset
    for dataset in written["datasets"].values():
        counts = {e["num_test_trials"] for e in dataset["models"].values() if e["status"] == "ok"}
        assert len(counts) <= 1, counts
    heldout = written["datasets"]["heldout"]
    assert heldout["held_out_session"] == "sim-s2"
    assert list(heldout["models"]["calm_adapted_greedy"]["per_session_pearson_r"]) == ["2"]
    adapt = heldout["models"]["calm_adapted_greedy"]["training"]["adapt"]
    # the adapt command's own score of the adapted model (its default forecast) equals the benchmark's
    assert adapt["script_forecast_mode"] == "direct"
    assert adapt["script_test_forecast_pearson_r"] == pytest.approx(
        heldout["models"]["calm_adapted_direct"]["pearson_r"], abs=1e-6)


@pytest.mark.slow  # the tiny forecasting benchmark end to end (the `smoke` fixture)
def test_tables_and_figure_are_written(smoke):
    out, results = smoke
    markdown = (out / "forecasting.md").read_text()
    for heading in ("Mean forecast Pearson r", "sim: per session", "sim: cost", "heldout: cost", "Peak memory",
                    "Forecast bands: calibration", "Trial-swap probe"):
        assert heading in markdown
    assert "| sim | calm | " in markdown and "| heldout | calm_adapted | " in markdown  # one probe row per model
    for model in results["datasets"]["sim"]["models"]:
        assert f"| {model} |" in markdown
    if not bench.neuralforecast_available():
        assert bench.NF_NOT_INSTALLED in markdown
    png = (out / "forecasting.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


@pytest.mark.slow  # the tiny forecasting benchmark end to end (the `smoke` fixture)
@pytest.mark.parametrize("model", ["ridge_ar", "tcn", "calm_direct", "calm_greedy", "calm_sample_mean2"])
def test_reported_metrics_match_direct_numpy(smoke, model):
    out, results = smoke
    arrays = np.load(out / "forecasting_predictions_sim.npz")
    truth, sessions, pred = arrays["truth"], arrays["session_ids"], arrays[f"pred_{model}"]
    assert pred.shape == truth.shape and truth.shape[-1] == 60 - bench.CONTEXT_FRAMES
    session_means = {}
    for session in np.unique(sessions):
        trial_means = []
        for trial in np.flatnonzero(sessions == session):
            neuron_r = [np.corrcoef(pred[trial, n], truth[trial, n])[0, 1] for n in range(truth.shape[1])]
            neuron_r = [r for r in neuron_r if np.isfinite(r)]
            if neuron_r:
                trial_means.append(np.mean(neuron_r))
        session_means[str(session)] = np.mean(trial_means)
    entry = _strict_json(out / "forecasting.json")["datasets"]["sim"]["models"][model]
    assert entry["pearson_r"] == pytest.approx(np.mean(list(session_means.values())), abs=1e-6)
    for session, value in session_means.items():
        assert entry["per_session_pearson_r"][session] == pytest.approx(value, abs=1e-6)
    assert entry["mse"] == pytest.approx(np.mean((pred.astype(np.float64) - truth) ** 2), rel=1e-6)


@pytest.mark.slow  # the tiny forecasting benchmark end to end (the `smoke` fixture)
def test_park_metrics_match_direct_numpy_on_padded_sessions(smoke):
    """Park's sessions have different neuron counts: arrays are zero-padded and only real neurons are scored."""
    out, results = smoke
    park = _strict_json(out / "forecasting.json")["datasets"]["park"]
    if park["status"].startswith("skipped"):
        pytest.skip(park["status"])
    assert park["context_frames"] == 24 and park["rate_hz"] == 16.0
    arrays = np.load(out / "forecasting_predictions_park.npz")
    truth, sessions = arrays["truth"], arrays["session_ids"]
    mask = arrays["neuron_mask"] if "neuron_mask" in arrays else np.ones(truth.shape[:2], dtype=bool)
    assert truth.shape[-1] == 48 - 24
    for model in ("ridge_ar", "calm_direct"):
        pred = arrays[f"pred_{model}"]
        session_means = []
        for session in np.unique(sessions):
            trial_means = []
            for trial in np.flatnonzero(sessions == session):
                real = np.flatnonzero(mask[trial])
                neuron_r = [np.corrcoef(pred[trial, n], truth[trial, n])[0, 1] for n in real]
                trial_means.append(np.mean([r for r in neuron_r if np.isfinite(r)]))
            session_means.append(np.mean(trial_means))
        entry = park["models"][model]
        assert entry["pearson_r"] == pytest.approx(np.mean(session_means), abs=1e-6), model
        squared = (pred.astype(np.float64) - truth) ** 2
        assert entry["mse"] == pytest.approx(squared[mask].mean(), rel=1e-6), model


def test_band_calibration_matches_brute_force():
    rng = np.random.default_rng(0)
    samples = rng.normal(size=(3, 5, 4, 6))
    truth = rng.normal(size=(3, 4, 6))
    got = bench.band_calibration(samples, truth, point=samples.mean(axis=1))
    pairs = np.abs(samples[:, :, None] - samples[:, None, :]).mean(axis=(1, 2))
    crps = np.abs(samples - truth[:, None]).mean(axis=1) - 0.5 * pairs
    assert got["crps"] == pytest.approx(crps.mean(), rel=1e-9)
    lower, upper = np.quantile(samples, [0.05, 0.95], axis=1)
    assert got["coverage"] == pytest.approx(np.mean((truth >= lower) & (truth <= upper)))
    assert got["point_mae"] == pytest.approx(np.abs(samples.mean(axis=1) - truth).mean())
    # a band around the truth covers it and has a lower CRPS than one far away
    near = bench.band_calibration(truth[:, None] + rng.normal(scale=0.1, size=(3, 8, 4, 6)), truth)
    far = bench.band_calibration(truth[:, None] + 3 + rng.normal(scale=0.1, size=(3, 8, 4, 6)), truth)
    assert near["coverage"] > 0.8 and far["coverage"] == 0 and near["crps"] < far["crps"]
    # padded neurons are not scored
    mask = np.ones((3, 4), dtype=bool)
    mask[:, 3] = False
    padded = samples.copy()
    padded[:, :, 3] = 100.0
    assert bench.band_calibration(padded, truth, neuron_mask=mask)["crps"] == pytest.approx(
        bench.band_calibration(samples[:, :, :3], truth[:, :3])["crps"])


def test_time_budget_stops_trainer(tmp_path):
    """`TimeBudgetCallback` (what the benchmark passes to the package's commands) ends training at the budget,
    whatever max_steps says."""
    from datasets import Dataset
    from transformers import TrainingArguments

    from calm_hf.callbacks import TimeBudgetCallback
    from calm_hf.trainer import CalmTrainer

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = torch.nn.Linear(4, 1)

        def forward(self, x, y):
            return {"loss": torch.mean((self.linear(x).squeeze(-1) - y) ** 2)}

    features = np.random.default_rng(0).normal(size=(64, 4)).astype(np.float32)
    data = Dataset.from_dict({"x": features, "y": np.zeros(64, dtype=np.float32)})
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=500, per_device_train_batch_size=4,
                             report_to="none", use_cpu=True, save_strategy="no", disable_tqdm=True)
    record = {}
    trainer = CalmTrainer(model=Regression(), args=args, train_dataset=data.with_format("torch"),
                          callbacks=[TimeBudgetCallback(0.0, record)])
    trainer.train()
    assert record["stopped_by_budget"] is True
    assert trainer.state.global_step == 1 == record["steps"]
    # a budget that is not reached leaves training alone
    record = {}
    args.max_steps = 3
    trainer = CalmTrainer(model=Regression(), args=args, train_dataset=data.with_format("torch"),
                          callbacks=[TimeBudgetCallback(600.0, record)])
    trainer.train()
    assert record == {"stopped_by_budget": False, "steps": 3}
    with pytest.raises(ValueError, match="max_seconds"):
        TimeBudgetCallback(-1.0)
    assert bench.plan_steps(1000, step_seconds=0.5, budget_s=10.0) == 18
    assert bench.plan_steps(5, step_seconds=0.5, budget_s=10.0) == 5


def test_missing_real_data_is_skipped_with_a_message(tmp_path):
    results = bench.main(["--size", "tiny", "--datasets", "zebrafish,park", "--models", "mean", "--out", str(tmp_path),
                          "--data_dir", str(tmp_path / "nowhere"), "--work_dir", str(tmp_path / "work")])
    status = results["datasets"]["zebrafish"]["status"]
    assert status.startswith("skipped: zebrafish recording not found") and "nowhere" in status
    status = results["datasets"]["park"]["status"]
    assert status.startswith("skipped: Park 2024 recordings not found") and "nowhere" in status
    assert "zebrafish" in (tmp_path / "forecasting.md").read_text()
    assert (tmp_path / "forecasting.png").is_file()


def test_heldout_pretraining_matches_a_reused_main_job_run(tmp_path):
    # a main job's pretraining stage records only its `calm pretrain` command line and its seconds
    stage = tmp_path / "pretrain"
    stage.mkdir()
    argv = ["--preset", "cpu", "--max_neurons", "64", "--num_train_epochs", "18.0", "--per_device_train_batch_size",
            "4", "--learning_rate", "0.003"]
    (stage / ".calm_stage.json").write_text(json.dumps({"seconds": 1370.8, "params": {"argv": argv}}))
    corpus = {"pretrain": stage}
    size = bench.calm_size(bench.SIZES["cpu"], corpus)
    assert {k: size["calm"][k] for k in ("preset", "epochs", "batch", "lr", "max_neurons")} == {
        "preset": "cpu", "epochs": 18.0, "batch": 4, "lr": 0.003, "max_neurons": 64}
    assert size["calm"]["eval_steps"] == bench.SIZES["cpu"]["calm"]["eval_steps"]  # the rest is the size's
    assert bench.heldout_pretrain_budget(300.0, 2, corpus) == 1370.8  # the sim model's pretraining time
    assert bench.heldout_pretrain_budget(900.0, 2, corpus) == 1800.0  # never less than a budget per session
    assert bench.heldout_pretrain_budget(300.0, 2, {"pretrain": None}) == 600.0
    # and as many steps, whatever the thread count: read from the run's trainer metrics
    assert bench.heldout_pretrain_steps(corpus) is None  # this marker has none
    (stage / ".calm_stage.json").write_text(json.dumps({"seconds": 760.0, "params": {"argv": argv}, "metrics": {
        "train_runtime": 758.3, "train_steps_per_second": 3.628}}))
    assert bench.heldout_pretrain_steps(corpus) == 2751
    assert bench.heldout_pretrain_steps({"pretrain": None}) is None


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit):
        bench.parse_args(["--models", "calm,prophet"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--datasets", "mars"])
    with pytest.raises(SystemExit):
        bench.parse_args(["--calm_modes", "direct,beam"])
    assert bench.parse_args([]).calm_modes == ["direct", "greedy", "mean"]


@pytest.mark.slow
def test_threads_benchmark_writes_its_table(tmp_path):
    """benchmarks/threads.py --quick: one fresh process per thread count, medians, a markdown table."""
    result = load_benchmark("threads.py").main(["--quick", "--threads", "1", "--out", str(tmp_path / "threads")])
    row = result["by_threads"][1]
    assert row["train_step"]["median_seconds"] > 0 and row["tokens_per_second"] > 0
    assert "| 1 |" in (tmp_path / "threads.md").read_text()


def test_cli_startup_benchmark_writes_its_table(tmp_path):
    """benchmarks/cli_startup.py --repeats 1: each command timed in a fresh process, a markdown table."""
    result = load_benchmark("cli_startup.py").main(["--repeats", "1", "--out", str(tmp_path / "cli_startup")])
    assert set(result["commands"]) == {"calm --help", "calm forecast --help", 'python -c "import calm_hf"'}
    assert all(len(row["seconds"]) == 1 and row["median_seconds"] > 0 for row in result["commands"].values())
    assert "| `calm --help` |" in (tmp_path / "cli_startup.md").read_text()
