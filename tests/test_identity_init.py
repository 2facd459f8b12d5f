"""Data-derived neuron-identity initialisation (calm_hf.identity_init)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from calm_hf import CalmConfig, CalmForCausalNeuralModeling
from calm_hf.identity_init import coupling_factors, init_identity_embeddings, window_means


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
    config = CalmConfig.from_preset("tiny", value_head_steps=2, neuron_mixer_rank=8, num_neurons=24)
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
    model = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", neuron_mixer_rank=0))
    with pytest.raises(ValueError, match="neuron_mixer_rank"):
        init_identity_embeddings(model, [(traces, np.arange(12))])
    model = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", neuron_mixer_rank=4))
    with pytest.raises(ValueError, match="neuron_ids"):
        init_identity_embeddings(model, [(traces, np.arange(11))])


def test_adapting_rows_are_written_and_the_mixer_is_left_alone():
    traces, _ = coupled_trials()
    config = CalmConfig.from_preset("tiny", value_head_steps=2, neuron_mixer_rank=8, num_neurons=12, num_sessions=1)
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
