"""The continuous-head forecast path: collator value targets, direct forecasts, the trial-swap probe."""

import numpy as np
import pytest
import torch
from datasets import Array2D, Dataset, Features, Sequence, Value

from calm_hf import CalmConfig, CalmForCausalNeuralModeling, CalmTokenizer, CalmTokenizerConfig
from calm_hf.data import CalmDataCollator
from calm_hf.forecasting import CalmForecaster, default_forecast_mode, evaluate_forecasting, trial_swap_probe


def make_pair(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", num_neurons=64, **overrides)).eval()
    tokenizer = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny")).eval()
    return model, tokenizer


def tokenized_rows(trials=6, neurons=5, frames=48, sessions=(0, 1)):
    rng = np.random.default_rng(0)
    model, tokenizer = make_pair()
    values = rng.standard_normal((trials, neurons, frames)).astype(np.float32)
    with torch.no_grad():
        ids = tokenizer.encode(torch.from_numpy(values)).codes.numpy().astype(np.int16)
    session = np.array([sessions[i % len(sessions)] for i in range(trials)])
    features = Features({
        "input_values": Array2D((None, frames), "float32"), "input_ids": Array2D((None, frames // 4), "int16"),
        "neuron_ids": Sequence(Value("int32")), "session_id": Value("int32"),
    })
    return Dataset.from_dict({
        "input_values": list(values), "input_ids": list(ids),
        "neuron_ids": [list(range(s * neurons, (s + 1) * neurons)) for s in session], "session_id": session.tolist(),
    }, features=features)


def test_collator_batches_value_labels_with_the_same_neuron_subset():
    rows = [{"input_ids": np.arange(6 * 3).reshape(6, 3) % 16, "input_values": np.arange(6 * 12, dtype=np.float32).reshape(6, 12),
             "neuron_ids": np.arange(6), "session_id": 0},
            {"input_ids": np.zeros((4, 3), dtype=np.int64), "input_values": np.ones((4, 12), dtype=np.float32),
             "neuron_ids": np.arange(10, 14), "session_id": 1}]
    batch = CalmDataCollator(max_neurons=3, seed=1, with_values=True)(rows)
    assert batch["value_labels"].shape == (2, 3, 12)
    # the kept neurons' values are exactly their own rows
    for kept, local in zip(batch["neuron_ids"][0].tolist(), range(3)):
        np.testing.assert_array_equal(batch["value_labels"][0, local].numpy(), rows[0]["input_values"][kept])
    assert "value_labels" not in CalmDataCollator()(rows)
    with pytest.raises(ValueError, match="input_values"):
        CalmDataCollator(with_values=True)([{"input_ids": np.zeros((2, 3), dtype=np.int64)}])


def test_direct_is_the_default_for_models_with_the_head_and_covers_long_horizons():
    model, tokenizer = make_pair()
    assert default_forecast_mode(model) == "direct"
    assert default_forecast_mode(make_pair(value_head_steps=0)[0]) == "greedy"
    forecaster = CalmForecaster(model, tokenizer)
    context = torch.randn(2, 5, 24)
    chunk = model.config.value_head_steps * 4
    result = forecaster.forecast(context, horizon=chunk)
    codes = forecaster.tokenize(context)
    np.testing.assert_allclose(result.forecast, model.forecast_values(codes, context_values=context).numpy(),
                               rtol=1e-6, atol=1e-6)
    # beyond one chunk: the first chunk is unchanged, the rest continues from the re-tokenized forecast
    longer = forecaster.forecast(context, horizon=2 * chunk + 3)
    assert longer.forecast.shape == (2, 5, 2 * chunk + 3) and np.isfinite(longer.forecast).all()
    np.testing.assert_allclose(longer.forecast[..., :chunk], result.forecast, rtol=1e-6, atol=1e-6)
    # sampled futures are centred on the direct forecast
    torch.manual_seed(0)
    sampled = forecaster.forecast(context, horizon=chunk, num_samples=4)
    assert sampled.samples.shape == (2, 4, 5, chunk)
    np.testing.assert_allclose(sampled.samples.mean(axis=1), sampled.forecast, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="mode"):
        forecaster.forecast(context, horizon=4, mode="best")


def test_evaluate_forecasting_defaults_to_direct():
    model, tokenizer = make_pair()
    rows = tokenized_rows()
    forecaster = CalmForecaster(model, tokenizer)
    direct = evaluate_forecasting(forecaster, rows, context_frames=24, return_predictions=True)
    explicit = evaluate_forecasting(forecaster, rows, context_frames=24, mode="direct", return_predictions=True)
    np.testing.assert_array_equal(direct["predictions"], explicit["predictions"])
    greedy = evaluate_forecasting(forecaster, rows, context_frames=24, mode="greedy", return_predictions=True)
    assert not np.allclose(direct["predictions"], greedy["predictions"])


def test_trial_swap_probe_changes_only_with_population_coupling():
    rows = tokenized_rows(trials=8)
    coupled, _ = make_pair()
    probe = trial_swap_probe(coupled, rows, context_frames=24, block_neurons=2)
    assert {"next_token_ce", "next_token_ce_swapped", "pearson_r", "pearson_r_swapped", "mse", "mse_swapped"} <= set(probe)
    assert probe["mse"] != probe["mse_swapped"]
    # a model without any cross-neuron path (no neuron attention effect, no mixer) cannot notice the swap:
    # with one neuron per block and block_neurons >= neurons nothing is swapped, so both scores agree exactly
    same = trial_swap_probe(coupled, rows, context_frames=24, block_neurons=5)
    assert same["mse"] == pytest.approx(same["mse_swapped"])
    with pytest.raises(ValueError, match="no session has two trials"):
        trial_swap_probe(coupled, rows.select([0, 1]), context_frames=24, max_trials=2)


def test_forecasting_stays_in_torch_on_the_model_device_until_the_result(monkeypatch):
    """Inputs (torch or numpy) go to the model's device once and nothing is copied to host numpy before the model is
    done: with `.numpy()` / `__array__` of every tensor disabled, every mode still runs with `return_tensors=True` and
    returns tensors on the model's device, equal to the default host-numpy result."""
    model, tokenizer = make_pair()
    forecaster = CalmForecaster(model, tokenizer)
    context = torch.randn(2, 5, 24)
    identity = {"neuron_ids": torch.arange(5).repeat(2, 1), "session_ids": torch.zeros(2, dtype=torch.long)}
    expected, samples = {}, {"direct": 3, "greedy": 1, "mean": 3}  # greedy gives one future
    for mode in ("direct", "greedy", "mean"):
        torch.manual_seed(0)
        expected[mode] = forecaster.forecast(context.numpy(), horizon=10, mode=mode, num_samples=samples[mode],
                                             **identity)
        assert isinstance(expected[mode].forecast, np.ndarray)

    def host_copy(self, *args, **kwargs):
        raise AssertionError("a tensor was copied to host numpy before the forecast was returned")

    results = {}
    with monkeypatch.context() as patched:
        patched.setattr(torch.Tensor, "numpy", host_copy)
        patched.setattr(torch.Tensor, "__array__", host_copy)
        for mode in ("direct", "greedy", "mean"):
            torch.manual_seed(0)
            results[mode] = forecaster.forecast(context, horizon=10, mode=mode, num_samples=samples[mode],
                                                return_tensors=True, **identity)
    for mode, result in results.items():
        for value in (result.forecast, result.codes) + (() if result.samples is None else (result.samples,)):
            assert isinstance(value, torch.Tensor) and value.device == forecaster.device, mode
        np.testing.assert_allclose(result.forecast.numpy(), expected[mode].forecast, rtol=1e-5, atol=1e-5)
    assert results["mean"].samples.shape == (2, 3, 5, 10)


def test_value_skip_highway_reads_each_neurons_own_last_windows():
    model, tokenizer = make_pair(value_skip_windows=2)
    window, head = 4, model.config.value_head_steps * 4
    traces = torch.randn(2, 5, 24)
    ids = tokenizer.encode(traces).codes
    with torch.no_grad():
        model.value_skip.weight.normal_()
        full = model(input_ids=ids, value_inputs=traces).value_predictions  # (2, 5, 6 steps, head)
        assert full.shape == (2, 5, 6, head)
        # step t reads frames [(t - 1) L, (t + 1) L) of its own neuron: changing a later frame or another neuron's
        # trace leaves it alone (the backbone reads codes only, which stay the same here)
        later = traces.clone()
        later[0, 1, 3 * window:] += 5.0
        other = traces.clone()
        other[0, 2] += 5.0
        moved = model(input_ids=ids, value_inputs=later).value_predictions
        torch.testing.assert_close(moved[:, :, :3], full[:, :, :3])
        assert not torch.allclose(moved[0, 1, 3], full[0, 1, 3])
        torch.testing.assert_close(model(input_ids=ids, value_inputs=other).value_predictions[0, 1], full[0, 1])
        # training: value_labels are the traces, so the loss needs nothing else
        out = model(input_ids=ids, labels=ids, value_labels=traces)
        torch.testing.assert_close(out.value_predictions, full)
        assert model(input_ids=ids).value_predictions is None  # no traces: no head forecast, never a silent one
        with pytest.raises(ValueError, match="context_values"):
            model.forecast_values(ids)
        with pytest.raises(ValueError, match="value_inputs must be"):
            model(input_ids=ids, value_inputs=traces[..., :22])
        torch.testing.assert_close(model.forecast_values(ids, context_values=traces), full[:, :, -1])
    # the forecaster passes the context traces itself; the probe runs
    result = CalmForecaster(model, tokenizer).forecast(traces, horizon=head + 8)
    assert result.forecast.shape == (2, 5, head + 8) and np.isfinite(result.forecast).all()
    probe = trial_swap_probe(model, tokenized_rows(), context_frames=24, max_trials=6)
    assert np.isfinite(probe["pearson_r"]) and np.isfinite(probe["mse_swapped"])
    with pytest.raises(ValueError, match="value_head_steps"):
        CalmConfig.from_preset("tiny", value_head_steps=0, value_skip_windows=2)


def test_value_skip_survives_save_and_load(tmp_path):
    model, _ = make_pair(value_skip_windows=3)
    model.save_pretrained(tmp_path)
    loaded = CalmForCausalNeuralModeling.from_pretrained(tmp_path)
    assert loaded.config.value_skip_windows == 3
    torch.testing.assert_close(loaded.value_skip.weight, model.value_skip.weight)
    assert CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", value_skip_windows=0)).value_skip is None
    assert CalmConfig().value_skip_windows == 0  # off unless a preset or the user asks (old checkpoints load as they were)
    assert CalmConfig.from_preset("cpu").value_skip_windows == 4


def test_evaluate_forecasting_scores_sessions_of_different_sizes():
    # sessions with 5 and 3 neurons in one split must not meet in one np.stack (calm pretrain's default forecast evaluation)
    rng = np.random.default_rng(1)
    model, tokenizer = make_pair()
    rows = {"input_values": [], "input_ids": [], "neuron_ids": [], "session_id": []}
    for trial in range(6):
        session, neurons = trial % 2, (5, 3)[trial % 2]
        values = rng.standard_normal((neurons, 48)).astype(np.float32)
        with torch.no_grad():
            ids = tokenizer.encode(torch.from_numpy(values)[None]).codes[0].numpy()
        rows["input_values"].append(values)
        rows["input_ids"].append(ids)
        rows["neuron_ids"].append(list(range(session * 8, session * 8 + neurons)))
        rows["session_id"].append(session)
    dataset = Dataset.from_dict(rows)
    forecaster = CalmForecaster(model, tokenizer)
    metrics = evaluate_forecasting(forecaster, dataset, context_frames=24, return_predictions=True, progress=False)
    assert np.isfinite(metrics["pearson_r"]) and np.isfinite(metrics["mse"])
    assert metrics["predictions"].shape == (6, 5, 24)
    assert metrics["neuron_mask"][1].tolist() == [True, True, True, False, False]
    # each session scored alone gives the same per-session r as the mixed split
    alone = evaluate_forecasting(forecaster, dataset.filter(lambda s: s == 1, input_columns="session_id"),
                                 context_frames=24, progress=False)
    assert alone["per_session_pearson_r"]["1"] == pytest.approx(metrics["per_session_pearson_r"]["1"], abs=1e-6)
