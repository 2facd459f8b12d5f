"""The neural-forecasting pipeline with a data-identity checkpoint: any number of neurons, no session, identities from
the recording's own history (or a given reference), bands from the quantile head in the same pass."""

import warnings

import numpy as np
import pytest
import torch
from transformers import pipeline

from calm_hf import CalmConfig, CalmForCausalNeuralModeling, CalmTokenizer, CalmTokenizerConfig
from calm_hf.checkpoint import complete_checkpoint
from calm_hf.pipeline_neural_forecasting import history_chunks, quantiles_at


@pytest.fixture(scope="module")
def forecaster(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ckpt") / "calm-data"
    torch.manual_seed(0)
    tokenizer = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny", codebook_size=16)).eval()
    model = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", hidden_dropout=0.0)).eval()
    model.save_pretrained(folder)
    complete_checkpoint(folder, tokenizer=tokenizer)
    return pipeline("neural-forecasting", model=str(folder))


@pytest.mark.parametrize("neurons", [1, 20, 1000])
def test_any_neuron_count_without_a_session(forecaster, neurons):
    rng = np.random.default_rng(neurons)
    traces = rng.standard_normal((neurons, 150)).cumsum(axis=1) * 0.1 + 3.0
    out = forecaster(traces, sampling_rate=10.0, horizon=12)
    assert out["forecast"].shape == (neurons, 12) and np.isfinite(out["forecast"]).all()
    bands = out["quantiles"]  # from the quantile head, without sampling
    assert sorted(bands) == [0.05, 0.25, 0.5, 0.75, 0.95]
    assert all(bands[a].shape == (neurons, 12) for a in bands)
    assert np.all(bands[0.05] <= bands[0.5] + 1e-6) and np.all(bands[0.5] <= bands[0.95] + 1e-6)


def test_history_and_reference_set_the_identity(forecaster):
    rng = np.random.default_rng(0)
    traces = rng.standard_normal((6, 400))
    long = forecaster(traces, sampling_rate=5.0, horizon=8)
    short = forecaster(traces[:, -40:], sampling_rate=5.0, horizon=8)  # no history before the context
    assert not np.allclose(long["forecast"], short["forecast"])
    given = forecaster(traces[:, -40:], sampling_rate=5.0, horizon=8, reference=rng.standard_normal((3, 6, 100)))
    assert not np.allclose(given["forecast"], short["forecast"])
    with pytest.raises(ValueError, match="drop session= and neuron_ids="):
        forecaster(traces, sampling_rate=5.0, horizon=8, session="sim-s0")
    with pytest.raises(ValueError, match=r"reference must be \(trials, neurons=6, frames\)"):
        forecaster(traces, sampling_rate=5.0, horizon=8, reference=np.zeros((2, 5, 100)))


def test_a_whole_recording_warns_only_where_the_older_frames_go_unused(forecaster):
    """Without reference= the frames before the context give the neurons' identity (no warning); with it they only
    set the z-score statistics, which the warning says."""
    traces = np.random.default_rng(1).standard_normal((6, 3000))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forecaster(traces, sampling_rate=30.0, horizon=30)
    with pytest.warns(UserWarning, match=r"3000 frames \(100.0 s at 30 Hz\).*only set the z-score statistics"):
        forecaster(traces, sampling_rate=30.0, horizon=30, reference=traces[None, :, :300])


def test_history_is_cut_into_whole_chunks_newest_last():
    history = np.arange(2 * 230, dtype=np.float32).reshape(2, 230)
    chunks = history_chunks(history, window=4, steps=25)
    assert chunks.shape == (2, 2, 100)
    np.testing.assert_array_equal(chunks[-1, 0], history[0, -100:])
    assert history_chunks(history[:, :7], window=4) is None  # less than two windows
    assert history_chunks(history[:, :30], window=4).shape == (1, 2, 28)


def test_requested_levels_are_read_off_the_model_grid():
    grid = (0.1, 0.5, 0.9)
    values = np.stack([np.full((2, 3), v) for v in (-1.0, 0.0, 1.0)])
    out = quantiles_at((0.1, 0.3, 0.5, 0.95), grid, values)
    assert float(out[0.1][0, 0]) == -1.0 and float(out[0.5][0, 0]) == 0.0
    assert abs(float(out[0.3][0, 0]) + 0.5) < 1e-6 and float(out[0.95][0, 0]) == 1.0  # clamped beyond the grid


def test_chronos_style_predict_quantiles(forecaster):
    """`predict_quantiles(context, prediction_length, quantile_levels)` -> `(quantiles, mean)` arrays, as time-series
    libraries return them; `prediction_length` / `quantile_levels` also work as call arguments."""
    rng = np.random.default_rng(1)
    traces = rng.standard_normal((7, 120))
    levels = [0.1, 0.5, 0.9]
    quantiles, mean = forecaster.predict_quantiles(traces, prediction_length=10, quantile_levels=levels,
                                                   sampling_rate=5.0)
    assert quantiles.shape == (7, 10, 3) and mean.shape == (7, 10)
    direct = forecaster(traces, sampling_rate=5.0, prediction_length=10, quantile_levels=levels)
    np.testing.assert_allclose(quantiles[..., 1], direct["quantiles"][0.5])
    np.testing.assert_allclose(mean, direct["forecast"])
    assert np.all(quantiles[..., 0] <= quantiles[..., 2] + 1e-6)
    batch_q, batch_mean = forecaster.predict_quantiles(np.stack([traces, traces]), 10, levels, sampling_rate=5.0)
    assert batch_q.shape == (2, 7, 10, 3) and batch_mean.shape == (2, 7, 10)
    pairs = forecaster.predict_quantiles([traces, traces[:3]], 10, levels, sampling_rate=5.0)
    assert [p[0].shape for p in pairs] == [(7, 10, 3), (3, 10, 3)]
    with pytest.raises(ValueError, match="same argument"):
        forecaster(traces, sampling_rate=5.0, horizon=8, prediction_length=10)


def test_the_pipeline_chooses_the_identity_on_the_history_chunks_or_the_reference(forecaster, monkeypatch):
    """The chunks of the recording before the context (or the reference trials) are where the identity choice is
    made, with the context the network reads and the horizon asked for, in model frames."""
    inner = forecaster.forecaster
    calls = []
    real = type(inner).reference_identity

    def spy(self, reference, context_frames, horizon=None):
        calls.append((np.asarray(reference).shape, context_frames, horizon))
        return real(self, reference, context_frames, horizon)

    monkeypatch.setattr(type(inner), "reference_identity", spy)
    traces = np.random.default_rng(2).standard_normal((6, 1000))  # 200 s at 5 Hz: a 120-frame context, 8 chunks
    forecaster(traces, sampling_rate=5.0, horizon=8)
    assert calls == [((8, 6, 100), 120, 8)]
    calls.clear()
    forecaster(traces[:, -40:], sampling_rate=5.0, horizon=8, reference=traces[None, :, :300].repeat(4, 0))
    assert calls == [((4, 6, 300), 40, 8)]
    calls.clear()
    forecaster(traces[:, -40:], sampling_rate=5.0, horizon=8)  # nothing before the context: zero-shot, nothing chosen
    assert calls == []


def test_the_choice_scores_what_the_network_reads_of_a_longer_context(forecaster, monkeypatch):
    """A context longer than the network reads is scored from the frames it reads: the same per-trial r as forecasting
    each scored trial from its whole context."""
    from calm_hf import forecasting

    inner = forecaster.forecaster
    monkeypatch.setattr(inner.model.config, "context_token_steps", 4)
    assert 4 * inner.window_size < 40
    seen = []
    monkeypatch.setattr(forecasting, "pick_identity", lambda per_trial: seen.append(per_trial) or "full")
    reference = np.random.default_rng(3).standard_normal((6, 6, 60)).astype(np.float32)
    inner.reference_identity(reference, 40, 12)
    halves = np.array_split(np.random.default_rng(0).permutation(6), 2)
    expected = []
    for fit, scored in (halves, halves[::-1]):
        identity = inner.neuron_identity(reference[fit], choice="no_coupling")
        pred = inner.forecast(reference[scored][:, :, :40], 12, neuron_identity=identity).forecast
        expected.append(forecasting.trial_pearson_r(pred, reference[scored][:, :, 40:52]))
    np.testing.assert_allclose(seen[0]["no_coupling"], np.concatenate(expected), atol=1e-5)
