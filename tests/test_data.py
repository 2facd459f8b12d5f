"""Tests of calm_hf.data: simulator, preprocessing, loaders, datasets and collators."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from datasets import load_from_disk

from calm_hf.data import (
    CalmDataCollator,
    SessionTrials,
    SimulationConfig,
    TraceCollator,
    ZScoreStats,
    build_trial_dataset,
    causal_ema,
    check_traces,
    cut_trials,
    default_data_dir,
    load_cascade_groundtruth,
    load_npz_recording,
    load_park_sessions,
    load_session_metadata,
    load_triplett_zebrafish,
    prepare_session,
    read_session_metadata,
    resample,
    save_session_metadata,
    simulate_benchmark,
    simulate_session,
    spikes_to_calcium,
    split_trials,
    tokenize_dataset,
)


SMALL = dict(num_trials=24, num_neurons=30, num_steps=40, burn_in_steps=30)


@pytest.fixture(scope="module")
def small_sessions():
    return simulate_benchmark(num_sessions=2, seed=3, **SMALL)


# ----------------------------------------------------------------------------------------------- simulation


def test_simulator_deterministic_by_seed():
    a = simulate_session(SimulationConfig(seed=5, **SMALL))
    b = simulate_session(SimulationConfig(seed=5, **SMALL))
    c = simulate_session(SimulationConfig(seed=6, **SMALL))
    np.testing.assert_array_equal(a.traces, b.traces)
    np.testing.assert_array_equal(a.behavior, b.behavior)
    np.testing.assert_array_equal(a.extras["spikes"], b.extras["spikes"])
    assert not np.allclose(a.traces, c.traces)
    assert not np.allclose(a.extras["recurrent_weights"], c.extras["recurrent_weights"])


def test_simulate_benchmark_names_seeds_and_shapes(small_sessions):
    assert [s.name for s in small_sessions] == ["sim-s3", "sim-s4"]
    np.testing.assert_array_equal(
        small_sessions[1].traces, simulate_session(SimulationConfig(seed=4, **SMALL)).traces
    )
    session = small_sessions[0]
    assert session.traces.shape == (24, 30, 40) and session.traces.dtype == np.float32
    assert session.behavior.shape == (24, 3, 40) and session.behavior.dtype == np.float32
    assert session.behavior_names == ["velocity_0", "velocity_1", "velocity_2"]
    assert session.fs == pytest.approx(5.0)
    assert session.extras["latents"].shape == (24, 30, 40)
    assert session.extras["spikes"].shape == (24, 30, 40)
    assert session.extras["recurrent_weights"].shape == (30, 30)
    assert session.extras["behavior_weights"].shape == (3, 30)
    with pytest.raises(ValueError, match="seed"):
        simulate_benchmark(num_sessions=2, seed=0, name="x")


def test_recurrent_weights_have_gain_variance():
    session = simulate_session(SimulationConfig(num_trials=2, num_neurons=400, num_steps=4, burn_in_steps=1))
    weights = session.extras["recurrent_weights"]
    assert weights.std() * math.sqrt(400) == pytest.approx(1.6, rel=0.02)


def test_calcium_nonnegative_without_noise_and_plausible():
    clean = simulate_session(SimulationConfig(calcium_noise_std=0.0, **SMALL))
    assert clean.traces.min() >= 0.0
    noisy = simulate_session(SimulationConfig(**SMALL))
    # same seed: only the imaging noise differs, and it has the configured std
    np.testing.assert_array_equal(clean.extras["spikes"], noisy.extras["spikes"])
    assert (noisy.traces - clean.traces).std() == pytest.approx(0.1, rel=0.05)
    # steady state: mean calcium = mean spike count per frame x kernel area (in frames)
    config = SimulationConfig()
    t_peak = 0.05 * 2.0 / 1.95 * math.log(2.0 / 0.05)
    peak = math.exp(-t_peak / 2.0) - math.exp(-t_peak / 0.05)
    area_frames = (2.0 - 0.05) / config.dt / peak
    spikes_per_frame = clean.extras["spikes"].mean()
    assert 0.1 < spikes_per_frame < 0.9  # rates within (0, 5 Hz) x 0.2 s
    assert clean.traces.mean() == pytest.approx(spikes_per_frame * area_frames, rel=0.1)
    # slow, forecastable dynamics: strong correlation 1 s apart, far weaker 12 s apart
    z = (clean.traces - clean.traces.mean(axis=(0, 2), keepdims=True)) / clean.traces.std(axis=(0, 2), keepdims=True)
    assert (z[..., :-5] * z[..., 5:]).mean() > 0.6
    assert (z[..., :-35] * z[..., 35:]).mean() < (z[..., :-5] * z[..., 5:]).mean() - 0.3


def test_calcium_kernel_shape():
    config = SimulationConfig()
    impulse = np.zeros(60)
    impulse[0] = 1
    response = spikes_to_calcium(impulse, config)
    assert response.min() >= 0
    assert 0.8 < response.max() <= 1.0  # frame-averaged peak of a unit-amplitude kernel
    # decay 2 s: one second (5 frames) later the response is exp(-1/2) times smaller
    assert response[25] / response[20] == pytest.approx(math.exp(-0.5), rel=1e-3)


def test_behavior_decodable_from_latents_with_true_weights(small_sessions):
    session = small_sessions[0]
    weights, latents = session.extras["behavior_weights"], session.extras["latents"]
    predicted = np.einsum("cn,knt->kct", weights, latents)
    residual = session.behavior - predicted
    assert residual.std() == pytest.approx(0.1, rel=0.1)
    assert session.behavior.std() > 3 * residual.std()  # the signal dominates the readout noise
    # least squares from the latents recovers the readout
    design = latents.transpose(0, 2, 1).reshape(-1, latents.shape[1])
    target = session.behavior.transpose(0, 2, 1).reshape(-1, 3)
    fitted, *_ = np.linalg.lstsq(design, target, rcond=None)
    assert np.corrcoef(fitted.T.ravel(), weights.ravel())[0, 1] > 0.9


def test_simulation_config_rejects_bad_values():
    with pytest.raises(ValueError, match="tau"):
        SimulationConfig(tau=0)
    with pytest.raises(ValueError, match="calcium_rise_s"):
        SimulationConfig(calcium_rise_s=3.0)
    with pytest.raises(ValueError, match="num_neurons"):
        SimulationConfig(num_neurons=0)


@pytest.mark.slow
def test_full_benchmark_has_the_papers_shape():
    # speed is a benchmark matter (timed unit tests are flaky on a shared CPU); this checks the protocol's sizes
    sessions = simulate_benchmark()
    assert [s.traces.shape for s in sessions] == [(400, 200, 100)] * 3
    assert [s.fs for s in sessions] == [5.0] * 3


# -------------------------------------------------------------------------------------------- preprocessing


def test_split_deterministic_disjoint_complete():
    a, b = split_trials(100, seed=1), split_trials(100, seed=1)
    for key in ("train", "validation", "test"):
        np.testing.assert_array_equal(a[key], b[key])
    assert (len(a["train"]), len(a["validation"]), len(a["test"])) == (70, 15, 15)
    together = np.concatenate([a["train"], a["validation"], a["test"]])
    assert sorted(together.tolist()) == list(range(100))
    assert not np.array_equal(split_trials(100, seed=2)["test"], a["test"])
    assert all(len(part) == 1 for part in split_trials(3).values())
    with pytest.raises(ValueError, match="at least 3"):
        split_trials(2)
    with pytest.raises(ValueError, match="sum"):
        split_trials(10, fractions=(0.5, 0.2, 0.2))


def test_resample_length_and_frequency():
    fs_in, fs_out, frequency = 16.0, 5.0, 0.5
    t = np.arange(1600) / fs_in
    x = np.sin(2 * np.pi * frequency * t).astype(np.float32)[None]
    y = resample(x, fs_in, fs_out)
    assert y.shape == (1, math.ceil(1600 * 5 / 16)) and y.dtype == np.float32
    spectrum = np.abs(np.fft.rfft(y[0]))
    peak = np.fft.rfftfreq(y.shape[-1], d=1 / fs_out)[spectrum.argmax()]
    assert peak == pytest.approx(frequency, abs=0.01)
    # non-zero baselines do not sag at the edges; identity for equal rates; 2.2 Hz -> 5 Hz
    constant = np.full((2, 49), 3.0, dtype=np.float32)
    np.testing.assert_allclose(resample(constant, 16.0, 5.0), 3.0, atol=1e-3)
    np.testing.assert_array_equal(resample(x, 5.0, 5.0), x)
    assert resample(np.zeros((3, 22)), 2.2, 5.0).shape == (3, 50)
    assert resample(np.zeros((2, 3, 30)), 30.0, 5.0, axis=-1).shape == (2, 3, 5)
    with pytest.raises(ValueError, match="positive"):
        resample(x, 0.0, 5.0)
    with pytest.raises(ValueError, match="positive"):
        resample(x, 16.0, -5.0)


def test_causal_ema_is_causal_and_matches_recursion():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 50)).astype(np.float32)
    y = causal_ema(x, alpha=0.15)
    expected = np.empty_like(x)
    previous = x[:, 0]
    for t in range(50):
        previous = 0.15 * x[:, t] + 0.85 * previous
        expected[:, t] = previous
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)
    changed = x.copy()
    changed[:, 30:] += 10.0
    y_changed = causal_ema(changed, alpha=0.15)
    np.testing.assert_array_equal(y_changed[:, :30], y[:, :30])
    assert not np.allclose(y_changed[:, 30:], y[:, 30:])
    np.testing.assert_allclose(causal_ema(x.T, alpha=1.0, axis=0), x.T)
    with pytest.raises(ValueError, match="alpha"):
        causal_ema(x, alpha=0.0)


def test_cut_trials():
    traces = np.arange(2 * 23, dtype=np.float32).reshape(2, 23)
    behavior = -traces[:1]
    trials, behavior_trials = cut_trials(traces, 5, behavior=behavior)
    assert trials.shape == (4, 2, 5) and behavior_trials.shape == (4, 1, 5)  # tail of 3 frames dropped
    np.testing.assert_array_equal(trials[2], traces[:, 10:15])
    np.testing.assert_array_equal(behavior_trials[3], behavior[:, 15:20])
    overlapping = cut_trials(traces, 5, stride=2)
    assert overlapping.shape == (10, 2, 5)
    np.testing.assert_array_equal(overlapping[1], traces[:, 2:7])
    with pytest.raises(ValueError, match="23 frames, shorter than one trial of 30"):
        cut_trials(traces, 30)
    with pytest.raises(ValueError, match="rank 2"):
        cut_trials(traces[None], 5)


def test_check_traces_reports_bad_inputs():
    x = np.zeros((4, 5, 6), dtype=np.float32)
    x[2, 3, 1] = np.nan
    with pytest.raises(ValueError, match="trial 2, neuron 3, frame 1"):
        check_traces(x)
    with pytest.raises(ValueError, match=r"rank 3.*x\[None\]"):
        check_traces(np.zeros((5, 6)), ndim=3)
    with pytest.raises(ValueError, match="empty"):
        check_traces(np.zeros((0, 5, 6)))
    with pytest.raises(ValueError, match="at least 8"):
        check_traces(np.zeros((5, 6)), min_frames=8)
    with pytest.raises(ValueError, match="numeric"):
        check_traces(np.array(["a", "b"]))
    assert check_traces(np.ones((2, 3), dtype=np.int64)).dtype == np.float32


def test_session_trials_validation():
    traces = np.ones((3, 4, 8), dtype=np.float64)
    session = SessionTrials("s", traces, fs=5.0)
    assert session.traces.dtype == np.float32 and session.num_neurons == 4
    traces[1, 2, 5] = np.inf
    with pytest.raises(ValueError, match="session 's'.*trial 1, neuron 2"):
        SessionTrials("s", traces, fs=5.0)
    with pytest.raises(ValueError, match="rank 3"):
        SessionTrials("s", np.ones((4, 8)), fs=5.0)
    with pytest.raises(ValueError, match="behavior"):
        SessionTrials("s", np.ones((3, 4, 8)), fs=5.0, behavior=np.ones((3, 2, 7)))
    with pytest.raises(ValueError, match="fs"):
        SessionTrials("s", np.ones((3, 4, 8)), fs=0.0)


def test_zscore_stats_roundtrip_and_floor():
    rng = np.random.default_rng(0)
    trials = rng.standard_normal((10, 3, 20)) * np.array([1.0, 5.0, 0.0])[None, :, None] + 7.0
    stats = ZScoreStats.fit(trials)
    np.testing.assert_allclose(stats.mean, [7.0, 7.0, 7.0], atol=0.5)
    assert stats.std[2] == 1.0  # constant neuron: only centred
    z = stats.transform(trials)
    np.testing.assert_allclose(z[:, 2], 0.0, atol=1e-5)
    np.testing.assert_allclose(z[:, :2].std(axis=(0, 2)), 1.0, rtol=1e-4)
    np.testing.assert_allclose(stats.inverse_transform(z), trials, rtol=1e-5, atol=1e-4)
    tensor = torch.as_tensor(z, dtype=torch.float32)
    np.testing.assert_allclose(stats.inverse_transform(tensor).numpy(), trials, rtol=1e-5, atol=1e-4)
    restored = ZScoreStats.from_dict(__import__("json").loads(__import__("json").dumps(stats.to_dict())))
    np.testing.assert_array_equal(restored.mean, stats.mean)
    np.testing.assert_array_equal(restored.std, stats.std)
    with pytest.raises(ValueError, match="3 neurons"):
        stats.transform(np.zeros((4, 20)))


def test_prepare_session_uses_training_trials_only(small_sessions):
    session = small_sessions[0]
    prepared = prepare_session(session, split_seed=0)
    assert prepared.traces.shape == (24, 30, 40) and prepared.fs == 5.0
    train = prepared.split("train")
    np.testing.assert_allclose(train.mean(axis=(0, 2)), 0.0, atol=1e-4)
    np.testing.assert_allclose(train.std(axis=(0, 2)), 1.0, rtol=1e-3)
    np.testing.assert_allclose(prepared.stats.inverse_transform(prepared.traces), session.traces, rtol=1e-4, atol=1e-3)
    assert prepared.behavior.shape == (24, 3, 40)
    np.testing.assert_allclose(prepared.behavior[prepared.splits["train"]].mean(axis=(0, 2)), 0.0, atol=1e-4)

    test_trial = int(prepared.splits["test"][0])
    changed = SessionTrials(session.name, session.traces.copy(), session.fs, session.behavior.copy(), session.behavior_names)
    changed.traces[test_trial] += 100.0
    changed.behavior[test_trial] -= 50.0
    prepared_changed = prepare_session(changed, split_seed=0)
    np.testing.assert_array_equal(prepared_changed.stats.mean, prepared.stats.mean)
    np.testing.assert_array_equal(prepared_changed.stats.std, prepared.stats.std)
    np.testing.assert_array_equal(prepared_changed.behavior_stats.mean, prepared.behavior_stats.mean)
    np.testing.assert_array_equal(prepared_changed.split("train"), train)

    train_trial = int(prepared.splits["train"][0])
    changed.traces[train_trial] += 100.0
    assert not np.allclose(prepare_session(changed, split_seed=0).stats.mean, prepared.stats.mean)


def test_prepare_session_resamples_and_crops_to_window():
    rng = np.random.default_rng(0)
    session = SessionTrials("park-like", rng.standard_normal((10, 3, 49)), fs=16.0, behavior=rng.random((10, 2, 49)))
    prepared = prepare_session(session, target_fs=5.0, ema_alpha=0.15, window_size=4)
    assert prepared.traces.shape == (10, 3, 16) and prepared.behavior.shape == (10, 2, 16)  # ceil(49*5/16)=16
    assert prepared.ema_alpha == 0.15 and prepared.source_fs == 16.0
    odd = prepare_session(SessionTrials("odd", rng.standard_normal((5, 2, 43)), fs=5.0))
    assert odd.num_frames == 40
    with pytest.raises(ValueError, match="fewer than one token window"):
        prepare_session(SessionTrials("short", rng.standard_normal((5, 2, 9)), fs=16.0))


# ----------------------------------------------------------------------------------------------- datasets


class WindowMeanTokenizer(torch.nn.Module):
    """A stand-in tokenizer: code = bucket of the mean of each 4-frame window (refuses non-multiples of 4)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))
        self.calls = []

    def encode(self, input_values):
        assert not self.training and not torch.is_grad_enabled()
        self.calls.append(tuple(input_values.shape))
        batch, neurons, frames = input_values.shape
        if frames % 4:
            raise ValueError("crop to a multiple of 4")
        means = (input_values * self.scale).reshape(batch, neurons, frames // 4, 4).mean(-1)
        return SimpleNamespace(codes=torch.clamp(((means + 2) * 4).long(), 0, 15))


@pytest.fixture(scope="module")
def prepared_pair():
    a = prepare_session(simulate_session(SimulationConfig(seed=1, **SMALL)))
    b = prepare_session(simulate_session(SimulationConfig(seed=2, **{**SMALL, "num_neurons": 12})))
    return [a, b]


def test_build_dataset_rows_ids_and_roundtrip(prepared_pair, tmp_path):
    dataset = build_trial_dataset(prepared_pair)
    assert set(dataset) == {"train", "validation", "test"}
    assert sum(len(split) for split in dataset.values()) == 48
    train = dataset["train"].with_format("numpy")
    row = train[0]
    session = prepared_pair[row["session_id"]]
    np.testing.assert_array_equal(row["input_values"], session.traces[row["trial_index"]])
    np.testing.assert_array_equal(row["behavior"], session.behavior[row["trial_index"]])
    ids = {int(r["session_id"]): r["neuron_ids"] for r in train}
    np.testing.assert_array_equal(ids[0], np.arange(30))
    np.testing.assert_array_equal(ids[1], np.arange(30, 42))
    assert set(dataset["test"]["trial_index"][:6]) <= set(prepared_pair[0].splits["test"].tolist()) | set(
        prepared_pair[1].splits["test"].tolist()
    )

    dataset.save_to_disk(tmp_path / "ds")
    reloaded = load_from_disk(str(tmp_path / "ds"))
    assert reloaded["train"].features == dataset["train"].features
    for split in dataset:
        original, loaded = dataset[split].with_format("numpy"), reloaded[split].with_format("numpy")
        for i in (0, len(original) - 1):
            for key in ("input_values", "behavior", "neuron_ids", "session_id", "trial_index"):
                np.testing.assert_array_equal(original[i][key], loaded[i][key])
    infos = read_session_metadata(reloaded)
    assert [info.neuron_range for info in infos] == [(0, 30), (30, 42)]
    np.testing.assert_array_equal(infos[0].stats.mean, prepared_pair[0].stats.mean)

    path = save_session_metadata(tmp_path / "ds", dataset)
    assert path.name == "calm_sessions.json"
    loaded_infos = load_session_metadata(tmp_path / "ds")
    assert loaded_infos[1].name == prepared_pair[1].name and loaded_infos[1].neuron_offset == 30
    np.testing.assert_array_equal(loaded_infos[1].stats.std, prepared_pair[1].stats.std)


def test_build_dataset_rejects_bad_inputs(prepared_pair):
    rng = np.random.default_rng(0)
    other = prepare_session(SessionTrials("other", rng.standard_normal((6, 3, 20)), fs=5.0))
    with pytest.raises(ValueError, match="same number of frames"):
        build_trial_dataset([prepared_pair[0], other])
    no_behavior = prepare_session(SessionTrials("nob", rng.standard_normal((6, 3, 40)), fs=5.0))
    with pytest.raises(ValueError, match="no behaviour"):
        build_trial_dataset([prepared_pair[0], no_behavior])
    with pytest.raises(ValueError, match="overlap"):
        build_trial_dataset(prepared_pair, neuron_id_offsets=[0, 10])
    custom = build_trial_dataset(prepared_pair, neuron_id_offsets=[100, 0])
    assert read_session_metadata(custom)[0].neuron_range == (100, 130)
    with pytest.raises(ValueError, match="at least one"):
        build_trial_dataset([])


def test_tokenize_dataset_adds_int16_codes(prepared_pair):
    dataset = build_trial_dataset(prepared_pair)
    tokenizer = WindowMeanTokenizer().train()
    tokenized = tokenize_dataset(dataset, tokenizer, batch_size=8)
    assert tokenizer.training  # mode restored
    feature = tokenized["train"].features["input_ids"]
    assert feature.shape == (None, 10) and feature.dtype == "int16"
    # rows with different neuron counts were encoded in stacked groups, never mixed
    assert {shape[1] for shape in tokenizer.calls} == {30, 12}
    assert max(shape[0] for shape in tokenizer.calls) <= 8
    assert "int16" in str(tokenized["validation"].data.schema.field("input_ids").type.storage_type)  # on disk
    rows = tokenized["validation"].with_format("numpy")
    tokenizer.eval()
    for i in range(len(rows)):
        row = rows[i]
        with torch.no_grad():
            expected = tokenizer.encode(torch.as_tensor(row["input_values"])[None]).codes[0].numpy()
        np.testing.assert_array_equal(row["input_ids"], expected)
        assert row["input_ids"].shape[0] == len(row["neuron_ids"])
    assert len(np.unique(rows["input_ids"][0])) > 1  # a real code grid, not constant
    assert tokenized["train"].with_format("torch")[0]["input_ids"].dtype == torch.int64
    with pytest.raises(ValueError, match="input_values"):
        tokenize_dataset(dataset["train"].remove_columns("input_values"), tokenizer)


# ----------------------------------------------------------------------------------------------- collators


def _rows(neuron_counts, steps=5, behavior=True):
    rows = []
    for session_id, n in enumerate(neuron_counts):
        row = {
            "input_ids": np.arange(n * steps, dtype=np.int16).reshape(n, steps) % 16 + 1,
            "neuron_ids": np.arange(100 * session_id, 100 * session_id + n, dtype=np.int32),
            "session_id": session_id,
        }
        if behavior:
            row["behavior"] = np.full((2, steps * 4), float(session_id), dtype=np.float32)
        rows.append(row)
    return rows


def test_calm_collator_pads_and_masks():
    rows = _rows([3, 5])
    batch = CalmDataCollator()(rows)
    assert batch["input_ids"].shape == (2, 5, 5) and batch["input_ids"].dtype == torch.long
    assert batch["neuron_mask"].tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert (batch["input_ids"][0, 3:] == 0).all()
    assert (batch["labels"][0, 3:] == -100).all()
    assert torch.equal(batch["labels"][1], batch["input_ids"][1])
    assert torch.equal(batch["labels"][0, :3], torch.as_tensor(rows[0]["input_ids"], dtype=torch.long))
    assert batch["neuron_ids"][0].tolist() == [0, 1, 2, 0, 0]
    assert batch["neuron_ids"][1].tolist() == [100, 101, 102, 103, 104]
    assert batch["session_ids"].tolist() == [0, 1]
    assert batch["behavior_labels"].shape == (2, 2, 20) and batch["behavior_labels"].dtype == torch.float32
    torch_rows = [{k: torch.as_tensor(v) for k, v in row.items()} for row in _rows([3, 5], behavior=False)]
    assert "behavior_labels" not in CalmDataCollator()(torch_rows)
    with pytest.raises(ValueError, match="token steps"):
        CalmDataCollator()(_rows([3]) + _rows([3], steps=6))
    with pytest.raises(ValueError, match="input_ids"):
        CalmDataCollator()([{"input_values": np.zeros((2, 8))}])
    with pytest.raises(ValueError, match="Some rows"):
        CalmDataCollator()(_rows([3], behavior=True) + _rows([3], behavior=False))


def test_calm_collator_subsamples_reproducibly():
    rows = _rows([3, 40])
    first, second = CalmDataCollator(max_neurons=8, seed=1), CalmDataCollator(max_neurons=8, seed=1)
    batch_a = first(rows)
    batch_b = second(rows)  # same seed, epoch and rows -> same subset, however many batches came before
    assert batch_a["input_ids"].shape == (2, 8, 5)
    assert torch.equal(batch_a["neuron_ids"], batch_b["neuron_ids"])
    kept = batch_a["neuron_ids"][1] - 100  # positions of the kept neurons in row 1
    assert len(set(kept.tolist())) == 8 and kept.tolist() == sorted(kept.tolist())
    expected = torch.as_tensor(rows[1]["input_ids"], dtype=torch.long)[kept]
    assert torch.equal(batch_a["input_ids"][1], expected)  # values stay with their ids
    assert batch_a["neuron_ids"][0, :3].tolist() == [0, 1, 2]  # small rows untouched
    first.set_epoch(1)
    assert not torch.equal(first(rows)["neuron_ids"], batch_a["neuron_ids"])  # next epoch, new subset
    assert not torch.equal(first(list(reversed(rows)))["neuron_ids"], batch_a["neuron_ids"].flip(0))  # new batch
    assert not torch.equal(CalmDataCollator(max_neurons=8, seed=2)(rows)["neuron_ids"], batch_a["neuron_ids"])
    with pytest.raises(ValueError, match="max_neurons"):
        CalmDataCollator(max_neurons=0)


def test_trace_collator_subsamples_and_crops():
    rng = np.random.default_rng(0)
    rows = [{"input_values": rng.standard_normal((n, 30)).astype(np.float32)} for n in (6, 9)]
    batch = TraceCollator(max_neurons=4, crop_frames=14, seed=0)(rows)["input_values"]
    assert batch.shape == (2, 4, 12) and batch.dtype == torch.float32  # 14 -> multiple of 4
    for i, row in enumerate(rows):  # each output row is a contiguous window of a real neuron
        for trace in batch[i].numpy():
            hits = [
                (n, s) for n in range(row["input_values"].shape[0]) for s in range(19)
                if np.array_equal(row["input_values"][n, s : s + 12], trace)
            ]
            assert hits
    full = TraceCollator()(rows)["input_values"]
    assert full.shape == (2, 6, 28)
    np.testing.assert_array_equal(full[0].numpy(), rows[0]["input_values"][:, :28])
    with pytest.raises(ValueError, match="crop_frames"):
        TraceCollator(crop_frames=3)
    with pytest.raises(ValueError, match="Cannot take"):
        TraceCollator(crop_frames=40)(rows)


# ------------------------------------------------------------------------------------------------------ I/O


def _write_npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def test_npz_loader_synthetic(tmp_path):
    rng = np.random.default_rng(0)
    traces = rng.standard_normal((4, 60)).astype(np.float32)
    path = _write_npz(
        tmp_path / "rec.npz",
        traces=traces,
        fs=np.float32(2.2),
        behavior=rng.standard_normal((1, 60)).astype(np.float32),
        behavior_names=np.array(["speed"]),
        trial_starts=np.array([0, 20, 40]),
        trial_direction_deg=np.array([0, 90, 180], dtype=np.int16),
    )
    recording = load_npz_recording(path)
    assert recording.name == "rec" and recording.fs == 2.2
    np.testing.assert_array_equal(recording.traces, traces)
    assert recording.behavior_names == ["speed"]
    np.testing.assert_array_equal(recording.extras["trial_direction_deg"], [0, 90, 180])
    session = recording.to_session()
    assert session.traces.shape == (3, 4, 20) and session.behavior.shape == (3, 1, 20)
    np.testing.assert_array_equal(session.traces[1], traces[:, 20:40])

    continuous = load_npz_recording(_write_npz(tmp_path / "cont.npz", traces=traces, fs=5.0))
    assert continuous.to_session(trial_length=25).traces.shape == (2, 4, 25)
    with pytest.raises(ValueError, match="trial_length"):
        continuous.to_session()

    with pytest.raises(FileNotFoundError, match="CALM_DATA_DIR"):
        load_npz_recording(tmp_path / "missing.npz")
    with pytest.raises(ValueError, match="'fs'"):
        load_npz_recording(_write_npz(tmp_path / "nofs.npz", traces=traces))
    bad = traces.copy()
    bad[2, 7] = np.nan
    with pytest.raises(ValueError, match="neuron 2, frame 7"):
        load_npz_recording(_write_npz(tmp_path / "nan.npz", traces=bad, fs=5.0))
    with pytest.raises(ValueError, match="frames"):
        load_npz_recording(_write_npz(tmp_path / "beh.npz", traces=traces, fs=5.0, behavior=np.zeros((1, 50))))


def test_default_data_dir_and_missing_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("CALM_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    with pytest.raises(FileNotFoundError, match=f"{tmp_path}.*CALM_DATA_DIR"):
        load_park_sessions()
    monkeypatch.delenv("CALM_DATA_DIR")
    assert default_data_dir().parts[-2:] == ("shared", "data")


@pytest.fixture(scope="module")
def real_data_dir():
    path = default_data_dir()
    if not (path / "park2024_v1_gratings_behavior").is_dir():
        pytest.skip(f"real recordings not found at {path}; set CALM_DATA_DIR to the folder holding them")
    return path


@pytest.mark.data
def test_real_park_sessions(real_data_dir):
    sessions = load_park_sessions(real_data_dir)
    assert [s.name for s in sessions] == ["mrcuts24", "mrcuts25", "mrcuts26", "mrcuts27", "mrcuts28"]
    assert [s.num_neurons for s in sessions] == [28, 53, 74, 39, 56]
    for session in sessions:
        assert session.traces.shape[::2] == (128, 49) and session.fs == 16.0
        assert session.behavior.shape == (128, 2, 49)
        assert len(session.extras["trial_direction_deg"]) == 128
    prepared = prepare_session(sessions[0], target_fs=5.0, ema_alpha=0.15)
    assert prepared.traces.shape == (128, 28, 16)
    assert np.isfinite(prepared.traces).all()


@pytest.mark.data
def test_real_cascade_and_triplett(real_data_dir):
    cascade = load_cascade_groundtruth(real_data_dir)
    assert cascade.traces.shape == (764, 1024) and cascade.fs == 30.0
    assert cascade.extras["spikes"].shape == (764, 1024)
    assert cascade.extras["dataset_id"].max() < len(cascade.extras["dataset_names"])
    zebrafish = load_triplett_zebrafish(real_data_dir)
    assert zebrafish.traces.shape == (114, 4245) and zebrafish.fs == 2.2
    assert zebrafish.extras["cell_xy"].shape == (114, 2)
    session = zebrafish.to_session(trial_length=88)  # 40 s trials
    assert session.traces.shape == (48, 114, 88)
    assert prepare_session(session, target_fs=5.0).traces.shape == (48, 114, 200)
