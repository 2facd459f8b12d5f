"""calm_hf.analysis: each linear analysis on synthetic data with a known answer, the simulator's task option, and
`calm analyze` end to end on a tiny checkpoint generated here."""

import json

import numpy as np
import pytest

pytest.importorskip("sklearn")

from calm_hf.analysis import (  # noqa: E402
    embedding_lda,
    embedding_pca,
    pc_trajectory_correlation,
    probe_embeddings,
    shuffle_control,
    trial_responses,
    tuned_groups,
    tuning_dprime,
)


def planted_clusters(num_per_class=30, num_classes=3, dim=32, separation=3.0, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((num_classes, dim)) * separation / np.sqrt(2)
    labels = np.repeat(np.arange(num_classes), num_per_class)
    return centers[labels] + rng.standard_normal((labels.size, dim)), labels


def test_dprime_of_two_gaussians_with_known_means():
    rng = np.random.default_rng(0)
    trials = 4000
    labels = np.repeat(["a", "b"], trials // 2)
    # neuron 0: mean 0 vs 1 (sd 1) -> d' = 1; neuron 1: 0 vs -2 -> d' = -2; neuron 2: untuned
    means = np.where(labels[:, None] == "a", [0.0, 0.0, 0.0], [1.0, -2.0, 0.0])
    responses = means + rng.standard_normal((trials, 3))
    dprime, classes = tuning_dprime(responses, labels)
    assert classes.tolist() == ["a", "b"]
    np.testing.assert_allclose(dprime, [1.0, -2.0, 0.0], atol=0.08)
    groups = tuned_groups(dprime, classes, threshold=0.5)
    assert groups.tolist() == ["b", "a", None]


def test_dprime_one_vs_rest_for_many_conditions():
    rng = np.random.default_rng(1)
    labels = np.tile([0, 45, 90, 135], 200)
    responses = rng.standard_normal((labels.size, 2))
    responses[labels == 90, 0] += 2.0  # neuron 0 prefers 90, neuron 1 is untuned
    dprime, classes = tuning_dprime(responses, labels)
    assert dprime.shape == (4, 2)
    assert classes[np.argmax(dprime[:, 0])] == 90
    assert tuned_groups(dprime, classes, threshold=1.0).tolist() == [90, None]


def test_trial_responses_and_bad_inputs():
    traces = np.arange(24, dtype=float).reshape(2, 3, 4)
    np.testing.assert_allclose(trial_responses(traces, (1, 3)), traces[..., 1:3].mean(-1))
    with pytest.raises(ValueError, match="window"):
        trial_responses(traces, (3, 9))
    with pytest.raises(ValueError, match="two conditions"):
        tuning_dprime(np.ones((4, 2)), np.zeros(4))
    with pytest.raises(ValueError, match="one label per row"):
        tuning_dprime(np.ones((4, 2)), np.zeros(3))


def test_lda_separates_planted_clusters_and_not_shuffled_labels():
    embeddings, labels = planted_clusters()
    result = embedding_lda(embeddings, labels, num_shuffles=5)
    assert result["accuracy"] > 0.9
    assert result["shuffled_accuracy"] < 0.55  # chance is 1/3
    assert result["projection"].shape == (90, 2)
    assert result["chance"] == pytest.approx(1 / 3)
    # no structure at all: the true labels do no better than chance either
    noise = np.random.default_rng(5).standard_normal(embeddings.shape)
    assert embedding_lda(noise, labels, num_shuffles=2)["accuracy"] < 0.6


@pytest.mark.slow
def test_probe_accuracy_with_controls_and_untestable_classes():
    embeddings, labels = planted_clusters(num_classes=2, separation=2.0)
    result = probe_embeddings(embeddings, labels, num_shuffles=5)
    assert result["accuracy"] > 0.85 and result["shuffled_accuracy"] < 0.7
    assert len(result["fold_accuracies"]) == 5 and result["num_folds"] == 5
    with pytest.raises(ValueError, match="at least 2 per class"):
        probe_embeddings(embeddings[:31], labels[:31])  # one item of class 1 only
    with pytest.raises(ValueError, match="NaN"):
        probe_embeddings(np.full((4, 2), np.nan), [0, 0, 1, 1])


def test_pca_finds_the_planted_axis():
    rng = np.random.default_rng(2)
    axis = rng.standard_normal(16)
    embeddings = rng.standard_normal((200, 1)) * 5 * axis / np.linalg.norm(axis) + 0.1 * rng.standard_normal((200, 16))
    result = embedding_pca(embeddings, num_components=2)
    assert result["projection"].shape == (200, 2)
    assert result["explained_variance_ratio"][0] > 0.95
    assert abs(result["components"][0] @ axis / np.linalg.norm(axis)) > 0.99


def low_rank_trials(trials=40, neurons=20, horizon=30, seed=0):
    rng = np.random.default_rng(seed)
    latents = np.cumsum(rng.standard_normal((trials, 3, horizon)), axis=-1)  # distinct random walks per trial
    mixing = rng.standard_normal((neurons, 3))
    return np.einsum("nk,tkh->tnh", mixing, latents) + 0.1 * rng.standard_normal((trials, neurons, horizon))


def test_pc_trajectory_correlation_is_one_for_a_perfect_forecast_and_lower_shuffled():
    truth = low_rank_trials()
    session_ids = np.repeat([0, 1], 20)
    result = pc_trajectory_correlation(truth, truth, session_ids, num_components=3)
    assert result["pc_r"] == pytest.approx(1.0)
    assert np.allclose(result["per_pc"], 1.0) and set(result["per_session"]) == {"0", "1"}

    def metric(p, t, s):
        return pc_trajectory_correlation(p, t, s)["pc_r"]

    control = shuffle_control(metric, truth, truth, session_ids, num_shuffles=5)
    assert control["mean"] < 0.5
    noisy = truth + 2.0 * np.random.default_rng(1).standard_normal(truth.shape)
    assert 0.5 < metric(noisy, truth, session_ids) < 1.0
    with pytest.raises(ValueError, match="same shape|one shape"):
        pc_trajectory_correlation(truth[:, :5], truth)


def test_simulation_defaults_unchanged_and_task_groups_are_tuned():
    from calm_hf.data import simulate_session

    # checksum of the default simulation computed with the code before the task option existed
    plain = simulate_session(num_trials=6, num_neurons=10, num_steps=30, seed=3)
    assert float(plain.traces.astype(np.float64).sum()) == 10886.2498371955
    assert int(plain.extras["spikes"].sum()) == 995 and "task_groups" not in plain.extras

    session = simulate_session(num_trials=60, num_neurons=40, num_steps=60, seed=1, task_fraction=0.5)
    groups, condition = session.extras["task_groups"], session.extras["task_condition"]
    assert (groups >= 0).sum() == 20 and set(np.unique(condition)) == {0, 1}
    dprime, _ = tuning_dprime(trial_responses(session.traces, (25, 50)), condition)
    # condition 1 minus condition 0: driven-by-1 neurons positive, driven-by-0 negative
    assert (dprime[groups == 1] > 0).mean() > 0.8 and (dprime[groups == 0] < 0).mean() > 0.8
    with pytest.raises(ValueError, match="task_fraction"):
        simulate_session(num_trials=2, num_neurons=4, task_fraction=1.5)


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny tokenizer + CalmForCausalNeuralModeling on a 2-session task simulation, saved like pretrain.py does."""
    import torch

    from calm_hf import CalmConfig, CalmForCausalNeuralModeling, CalmTokenizer, CalmTokenizerConfig
    from calm_hf.data import build_trial_dataset, prepare_session, save_session_metadata, simulate_benchmark
    from calm_hf.data import tokenize_dataset

    root = tmp_path_factory.mktemp("analysis")
    sessions = simulate_benchmark(num_sessions=2, num_neurons=12, num_trials=40, num_steps=48, task_fraction=0.5)
    prepared = [prepare_session(s, target_fs=5.0) for s in sessions]
    torch.manual_seed(0)
    tokenizer = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny"))
    dataset = tokenize_dataset(build_trial_dataset(prepared), tokenizer)
    dataset.save_to_disk(str(root / "data"))
    save_session_metadata(root / "data", prepared)
    config = CalmConfig.from_preset(
        "tiny", vocab_size=tokenizer.config.codebook_size, num_neurons=24, num_sessions=2,
        session_names=[s.name for s in sessions], session_neuron_ranges=[[0, 12], [12, 24]], neuron_identity="table",
    )
    model = CalmForCausalNeuralModeling(config)
    with torch.no_grad():  # plant the answer: neurons driven by condition 1 get a shared offset in their embedding
        for offset, session in zip((0, 12), sessions):
            driven = np.flatnonzero(session.extras["task_groups"] == 1)
            model.model.neuron_embeddings.weight[offset + driven] += 3.0
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model" / "tokenizer")
    labels = {
        "trial": {"condition": {s.name: s.extras["task_condition"].tolist() for s in sessions}},
        "neuron": {"task_group": {s.name: [None if g < 0 else int(g) for g in s.extras["task_groups"]] for s in sessions}},
        "session": {"subject": {sessions[0].name: "m1", sessions[1].name: "m2"}},
    }
    (root / "labels.json").write_text(json.dumps(labels))
    return root


@pytest.mark.slow
def test_calm_analyze_end_to_end(tiny_checkpoint, tmp_path):
    from calm_hf.cli import main

    out = tmp_path / "analysis"
    main(["analyze", "--model", str(tiny_checkpoint / "model"), "--dataset", str(tiny_checkpoint / "data"),
          "--labels", str(tiny_checkpoint / "labels.json"), "--output_dir", str(out), "--context_frames", "24",
          "--max_forecast_trials", "3", "--num_shuffles", "3", "--response_window", "20:44"])
    report = json.loads((out / "report.json").read_text())
    for name in ("report.md", "probes.png", "pca_condition.png", "lda_condition.png", "dprime_condition.png",
                 "pc_trajectory_correlation.png", "pc_trajectories.png"):
        assert (out / name).stat().st_size > 0, name
    rows = {row["analysis"]: row for row in report["headline"]["rows"]}
    assert all(row["shuffled"] for row in rows.values())  # a control beside every number
    task = next(item for item in report["neuron_probes"] if item["attribute"] == "task_group")
    # the planted embedding offset is found in the trained model, not in the untrained control
    assert task["probe"]["trained"]["accuracy"] > 0.9
    assert task["probe"]["untrained"]["accuracy"] < 0.8
    subject = report["session_probes"][0]
    assert "not testable" in subject["note"]
    forecasters = report["forecasts"]["forecasters"]
    assert {"CalM", "CalM untrained", "ridge_ar", "per_neuron_ar", "mean"} <= set(forecasters)
    assert all(np.isfinite(forecasters[name]["pc_r"]) for name in forecasters)
    assert "| analysis | trained | untrained |" in (out / "report.md").read_text()


def test_calm_analyze_rejects_labels_of_unknown_sessions(tiny_checkpoint, tmp_path):
    from calm_hf.commands.analyze import run as main

    bad = tmp_path / "labels.json"
    bad.write_text(json.dumps({"neuron": {"x": {"no-such-session": [1, 2]}}}))
    with pytest.raises(ValueError, match="no-such-session"):
        main(["--model", str(tiny_checkpoint / "model"), "--dataset", str(tiny_checkpoint / "data"),
              "--labels", str(bad), "--output_dir", str(tmp_path / "out")])
    with pytest.raises(FileNotFoundError, match="config.json"):
        main(["--model", str(tmp_path), "--dataset", str(tiny_checkpoint / "data"),
              "--output_dir", str(tmp_path / "report")])


@pytest.mark.slow
def test_analysis_benchmark_tiny_run(tmp_path):
    """benchmarks/analysis.py end to end at the tiny size on the simulation: trains with the package commands, writes
    the per-dataset report and the summary with the simulator's ground-truth check (~1-2 min on one core)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "analysis.py"
    spec = importlib.util.spec_from_file_location("calm_benchmarks_analysis", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    summary = bench.main(["--datasets", "sim", "--size", "tiny", "--work", str(tmp_path / "work"),
                          "--out", str(tmp_path / "results"), "--max_forecast_trials", "4"])
    assert (tmp_path / "results" / "analysis_sim" / "report.md").is_file()
    assert "Ground truth (sim)" in (tmp_path / "results" / "analysis.md").read_text()
    truth = summary["sim"]["ground_truth"]
    assert truth["driven_neurons_preferring_their_driving_condition"] > 0.6
