"""Data-derived neuron-identity initialisation (calm_hf.identity_init)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calm_hf import CalmConfig, CalmForCausalNeuralModeling
from calm_hf.identity_init import (
    coupling_factors,
    fit_value_skip,
    init_identity_embeddings,
    init_value_skip_from_dataset,
    window_means,
)


def coupled_trials(num_trials=60, neurons=12, frames=80, seed=0):
    """Neuron 0 drives neuron 1 one window later; everything else is noise."""
    rng = np.random.default_rng(seed)
    windows = frames // 4
    means = rng.normal(size=(num_trials, neurons, windows))
    means[:, 1, 1:] += 0.9 * means[:, 0, :-1]
    return np.repeat(means, 4, axis=-1).astype(np.float32), means


def test_window_means_and_shape_errors():
    traces, means = coupled_trials()
    np.testing.assert_allclose(window_means(traces, 4), means, atol=1e-6)
    with pytest.raises(ValueError, match="trials, neurons, frames"):
        window_means(traces[0], 4)
    with pytest.raises(ValueError, match="at least 2"):
        window_means(traces[..., :5], 4)


def test_coupling_factors_find_the_driver():
    traces, _ = coupled_trials()
    drivers, receivers, singular = coupling_factors(traces, 4, rank=2)
    coupling = drivers @ receivers.T  # (in, out) with the diagonal removed
    i, j = np.unravel_index(np.abs(coupling).argmax(), coupling.shape)
    assert (i, j) == (0, 1)
    assert coupling[0, 1] == pytest.approx(0.9, abs=0.1)
    assert singular[0] > 3 * singular[1]


def test_init_writes_factors_that_the_mixer_reads():
    traces, _ = coupled_trials()
    config = CalmConfig.from_preset("tiny", value_head_steps=2, neuron_mixer_rank=8, num_neurons=24, neuron_identity="table")
    model = CalmForCausalNeuralModeling(config).eval()
    before = model.model.neuron_embeddings.weight.detach().clone()
    report = init_identity_embeddings(model, [(traces, np.arange(12, 24))])
    after = model.model.neuron_embeddings.weight.detach()
    assert torch.equal(before[:12], after[:12]), "rows of other neurons must not change"
    assert not torch.equal(before[12:], after[12:])
    assert report["rank"] == 8 and len(report["sessions"]) == 1 and 0 < report["sessions"][0]["energy_kept"] <= 1
    mixer = model.model.layers[0].mixer
    identity = after[12:24]
    scores = mixer.query(identity) @ mixer.key(identity).T  # (receiver i, driver j)
    off = scores - torch.diag(torch.diag(scores))
    i, j = np.unravel_index(int(off.abs().argmax()), off.shape)
    assert (i, j) == (1, 0), "neuron 0 should be the strongest driver of neuron 1"
    # still a working model
    ids = torch.randint(0, config.vocab_size, (2, 12, 6))
    out = model(input_ids=ids, neuron_ids=torch.arange(12, 24).expand(2, -1), session_ids=torch.zeros(2, dtype=torch.long))
    assert torch.isfinite(out.logits).all()


def test_init_needs_a_mixer_and_matching_ids():
    traces, _ = coupled_trials()
    model = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", neuron_mixer_rank=0, neuron_identity="table"))
    with pytest.raises(ValueError, match="neuron_mixer_rank"):
        init_identity_embeddings(model, [(traces, np.arange(12))])
    model = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", neuron_mixer_rank=4, neuron_identity="table"))
    with pytest.raises(ValueError, match="neuron_ids"):
        init_identity_embeddings(model, [(traces, np.arange(11))])


def test_adapting_rows_are_written_and_the_mixer_is_left_alone():
    traces, _ = coupled_trials()
    config = CalmConfig.from_preset("tiny", value_head_steps=2, neuron_mixer_rank=8, num_neurons=12, num_sessions=1,
                                    neuron_identity="table")
    model = CalmForCausalNeuralModeling(config)
    session_id, neuron_ids = model.add_session("new", 12)
    model.freeze_backbone_except_embeddings(session_ids=[session_id], neuron_ids=list(neuron_ids))
    mixer_before = model.model.layers[0].mixer.query.weight.detach().clone()
    frozen_before = model.model.neuron_embeddings.weight.detach()[:12].clone()
    init_identity_embeddings(model, [(traces, np.asarray(neuron_ids))], align_mixer=False)
    assert torch.equal(model.model.layers[0].mixer.query.weight, mixer_before)
    table = model.model.neuron_embeddings
    assert table.is_adapting
    assert torch.equal(table.weight.detach()[:12], frozen_before), "the pretrained rows must stay bit-identical"
    written = table(torch.as_tensor(neuron_ids))
    assert not torch.allclose(written[:, :8], torch.zeros_like(written[:, :8]))
    state = model.state_dict()["model.neuron_embeddings.weight"]
    assert torch.equal(state[12:24], written.detach()), "saved checkpoints carry the written rows"


def ar_trials(num_trials=40, neurons=6, frames=48, seed=0):
    """Every neuron follows the same AR(1), x_t = 0.8 x_{t-1} + noise, with trials of two lengths."""
    rng = np.random.default_rng(seed)
    trials = []
    for index in range(num_trials):
        length = frames if index % 2 else frames - 8
        x = np.zeros((neurons, length))
        x[:, 0] = rng.normal(size=neurons)
        for t in range(1, length):
            x[:, t] = 0.8 * x[:, t - 1] + 0.6 * rng.normal(size=neurons)
        trials.append(x.astype(np.float32))
    return trials


def test_fit_value_skip_recovers_a_shared_linear_forecast():
    weight, bias = fit_value_skip(ar_trials(), window_size=4, lookback_windows=2, horizon_windows=3)
    assert weight.shape == (12, 8) and bias.shape == (12,)
    # the forecast k + 1 frames ahead of an AR(1) reads the last frame only, with weight 0.8 ** (k + 1)
    np.testing.assert_allclose(weight[:, -1], 0.8 ** np.arange(1, 13), atol=0.06)
    assert np.abs(weight[:, :-1]).max() < 0.08 and np.abs(bias).max() < 0.05
    with pytest.raises(ValueError, match="NaN"):
        fit_value_skip([np.full((2, 16), np.nan)], 4, 2, 3)
    with pytest.raises(ValueError, match="nothing to fit"):
        fit_value_skip([np.zeros((2, 3))], 4, 2, 3)


def test_value_skip_init_makes_the_head_start_at_the_linear_forecast():
    import datasets

    trials = ar_trials(frames=32)
    trials = [t for t in trials if t.shape[-1] == 32]
    table = datasets.Dataset.from_dict({"input_values": [t.tolist() for t in trials]})
    config = CalmConfig.from_preset("tiny", value_head_steps=3, value_skip_windows=2, num_neurons=6)
    model = CalmForCausalNeuralModeling(config).eval()
    init_value_skip_from_dataset(model, table)
    weight, bias = fit_value_skip(trials, 4, 2, 3)
    np.testing.assert_allclose(model.value_skip.weight.detach().numpy(), weight, atol=1e-6)
    traces = torch.as_tensor(np.stack(trials[:2]))
    ids = torch.randint(0, config.vocab_size, (2, 6, 8))
    out = model(input_ids=ids, neuron_ids=torch.arange(6).expand(2, -1), session_ids=torch.zeros(2, dtype=torch.long),
                value_inputs=traces)
    # the head's own output starts at zero: the forecast from step 3 is the linear map of frames 8..15
    expected = traces[:, :, 8:16] @ torch.as_tensor(weight).float().T + torch.as_tensor(bias).float()
    torch.testing.assert_close(out.value_predictions[:, :, 3].float(), expected.float(), atol=1e-5, rtol=1e-5)
    no_highway = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", value_head_steps=3, value_skip_windows=0))
    with pytest.raises(ValueError, match="no raw-trace highway"):
        init_value_skip_from_dataset(no_highway, table)
