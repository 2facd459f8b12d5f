"""Tests of the CalM dual-axis transformer: configuration, backbone, next-token head, generation, adaptation."""

import functools
import json
import os
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch

from calm_hf.configuration_calm import CALM_PRESETS, CalmConfig
from calm_hf.modeling_calm import CalmForCausalNeuralModeling, CalmModel, validate_inputs
from calm_hf.trainer import augment_training_batch


VOCAB = 16


def tiny_config(**overrides) -> CalmConfig:
    # the backbone and head on codes alone: the preset's raw-trace highway (which needs the traces at every call)
    # is tested in test_forecasting_direct.py and end to end through the main job and the pipeline
    # learned identity tables (what most tests here are about); the data-identity path: tests/test_data_identity.py
    return CalmConfig.from_preset("tiny", **{"hidden_dropout": 0.0, "value_skip_windows": 0, "neuron_identity": "table",
                                             "quantile_levels": None, **overrides})


def make_model(seed: int = 0, **overrides) -> CalmForCausalNeuralModeling:
    torch.manual_seed(seed)
    return CalmForCausalNeuralModeling(tiny_config(**overrides)).eval()


def codes(batch=2, neurons=5, steps=8, seed=1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, neurons, steps), generator=generator)


@pytest.fixture(scope="module")
def model() -> CalmForCausalNeuralModeling:
    return make_model()


# ----------------------------------------------------------------------------------------------------------------------
# configuration
# ----------------------------------------------------------------------------------------------------------------------


def test_presets_have_the_documented_sizes():
    assert set(CALM_PRESETS) == {"tiny", "cpu", "paper"}
    paper = CalmConfig.from_preset("paper")
    assert (paper.hidden_size, paper.num_hidden_layers, paper.num_attention_heads, paper.intermediate_size) == (
        512, 6, 8, 2048,
    )
    cpu = CalmConfig.from_preset("cpu", num_neurons=600)
    assert (cpu.hidden_size, cpu.num_hidden_layers, cpu.num_attention_heads, cpu.intermediate_size) == (96, 3, 4, 384)
    tiny = CalmConfig.from_preset("tiny", max_token_steps=20)
    assert (tiny.hidden_size, tiny.num_hidden_layers, tiny.vocab_size, tiny.max_token_steps) == (32, 2, 16, 20)
    # paper defaults of the augmentations
    assert (paper.scheduled_sampling_prob, paper.scheduled_sampling_block) == (0.6, 6)
    assert (paper.neighbor_replacement_prob, paper.neighbor_k) == (0.1, 12)
    assert CalmConfig().model_type == "calm"


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, "divisible by num_attention_heads"),
        ({"neighbor_k": 16}, "neighbor_k (16)"),
        ({"scheduled_sampling_prob": 1.5}, "scheduled_sampling_prob"),
        ({"num_neurons": 0}, "num_neurons"),
        ({"session_names": ["a", "a"], "session_neuron_ranges": [[0, 2], [2, 4]]}, "unique"),
        ({"session_names": ["a"], "session_neuron_ranges": [[0, 100]]}, "num_neurons=64"),
        ({"session_names": ["a", "b"], "session_neuron_ranges": [[0, 2]]}, "one entry per session"),
    ],
)
def test_invalid_configs_raise_with_values(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(**overrides)


def test_unknown_preset_raises():
    with pytest.raises(ValueError, match="choose one of"):
        CalmConfig.from_preset("huge")


def test_config_json_round_trip_keeps_sessions(tmp_path):
    config = tiny_config(session_names=["m1", "m2"], session_neuron_ranges=[[0, 10], [10, 30]])
    config.save_pretrained(tmp_path)
    loaded = CalmConfig.from_pretrained(tmp_path)
    assert loaded.session_names == ["m1", "m2"]
    assert loaded.session_neuron_ranges == [[0, 10], [10, 30]]
    assert loaded.session_neuron_ids("m2") == list(range(10, 30))
    with pytest.raises(ValueError, match="add_session"):
        loaded.session_id("m3")


# ----------------------------------------------------------------------------------------------------------------------
# forward
# ----------------------------------------------------------------------------------------------------------------------


def test_shapes(model):
    input_ids = codes()
    output = model(input_ids=input_ids, output_hidden_states=True)
    assert output.logits.shape == (2, 5, 8, VOCAB)
    assert len(output.hidden_states) == model.config.num_hidden_layers + 1
    assert all(h.shape == (2, 5, 8, 32) for h in output.hidden_states)
    backbone_output = model.model(input_ids=input_ids)
    assert backbone_output.last_hidden_state.shape == (2, 5, 8, 32)
    # flattened grid (as generate calls it) gives the same logits, flattened
    flat = model(input_ids=input_ids.reshape(10, 8), num_neurons=5).logits
    torch.testing.assert_close(flat, output.logits.reshape(10, 8, VOCAB))
    assert model(input_ids=input_ids, logits_to_keep=1).logits.shape == (2, 5, 1, VOCAB)
    assert isinstance(model(input_ids=input_ids, return_dict=False), tuple)


def test_loss_is_finite_and_backpropagates():
    model = make_model().train()
    input_ids = codes()
    values = torch.randn(2, 5, 8 * 4)
    output = model(input_ids=input_ids, labels=input_ids, value_labels=values)
    assert output.loss.ndim == 0 and torch.isfinite(output.loss)
    # untrained model: next-token CE close to log(vocab); the total is the weighted sum of both terms
    assert abs(output.next_token_loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.5
    torch.testing.assert_close(output.loss, output.next_token_loss + output.value_loss)
    output.loss.backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
    assert model.model.layers[0].time_attn.qkv_proj.weight.grad.abs().sum() > 0
    assert model.model.layers[0].neuron_attn.qkv_proj.weight.grad.abs().sum() > 0
    assert model.model.neuron_embeddings.weight.grad.abs().sum() > 0


def test_loss_matches_manual_shifted_cross_entropy(model):
    input_ids = codes()
    labels = input_ids.clone()
    labels[:, 1] = -100  # an ignored neuron
    output = model(input_ids=input_ids, labels=labels)
    logits = output.logits[:, :, :-1]
    keep = labels[:, :, 1:] != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], labels[:, :, 1:][keep])
    torch.testing.assert_close(output.loss, manual)


def test_bf16_autocast_forward_and_loss_in_float32():
    model = make_model().train()
    input_ids = codes(batch=1, neurons=3, steps=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(input_ids=input_ids, labels=input_ids)
    assert output.loss.dtype == torch.float32 and torch.isfinite(output.loss)
    output.loss.backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        generated = model.eval().generate(input_ids, max_new_tokens=2)
    assert generated.shape == (1, 3, 6)


def test_causality_in_time(model):
    input_ids = codes()
    changed = input_ids.clone()
    changed[:, :, 5:] = (changed[:, :, 5:] + 3) % VOCAB
    logits = model(input_ids=input_ids).logits
    changed_logits = model(input_ids=changed).logits
    torch.testing.assert_close(logits[:, :, :5], changed_logits[:, :, :5], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, :, 5:], changed_logits[:, :, 5:])


def test_neuron_axis_mixes_neurons(model):
    # changing one neuron's codes changes the other neurons' predictions at the same and later steps
    input_ids = codes()
    changed = input_ids.clone()
    changed[:, 0, 3] = (changed[:, 0, 3] + 5) % VOCAB
    logits, changed_logits = model(input_ids=input_ids).logits, model(input_ids=changed).logits
    assert not torch.allclose(logits[:, 1:, 3], changed_logits[:, 1:, 3])
    torch.testing.assert_close(logits[:, :, :3], changed_logits[:, :, :3], rtol=0, atol=1e-6)


def test_permutation_equivariance_across_neurons(model):
    input_ids = codes()
    neuron_ids = torch.tensor([[3, 7, 1, 9, 20], [4, 5, 6, 30, 2]])
    permutation = torch.tensor([2, 0, 4, 1, 3])
    logits = model(input_ids=input_ids, neuron_ids=neuron_ids).logits
    permuted = model(input_ids=input_ids[:, permutation], neuron_ids=neuron_ids[:, permutation]).logits
    torch.testing.assert_close(permuted, logits[:, permutation], rtol=1e-5, atol=1e-5)
    # neuron identity matters: permuting codes without their ids changes the output
    shuffled = model(input_ids=input_ids[:, permutation], neuron_ids=neuron_ids).logits
    assert not torch.allclose(shuffled, logits[:, permutation], atol=1e-4)


def test_padded_neurons_do_not_change_real_neurons(model):
    input_ids = codes(batch=1, neurons=4)
    neuron_ids = torch.tensor([[0, 1, 2, 3]])
    reference = model(input_ids=input_ids, neuron_ids=neuron_ids, session_ids=torch.tensor([1])).logits
    padded_ids = torch.cat([input_ids, codes(batch=1, neurons=3, seed=9)], dim=1)
    padded_neurons = torch.tensor([[0, 1, 2, 3, 40, 41, 42]])
    mask = torch.tensor([[True] * 4 + [False] * 3])
    padded = model(
        input_ids=padded_ids, neuron_ids=padded_neurons, session_ids=torch.tensor([1]), neuron_mask=mask
    ).logits
    torch.testing.assert_close(padded[:, :4], reference, rtol=1e-5, atol=1e-5)
    unmasked = model(input_ids=padded_ids, neuron_ids=padded_neurons, session_ids=torch.tensor([1])).logits
    assert not torch.allclose(unmasked[:, :4], reference, atol=1e-4)
    # padded neurons are left out of the loss
    loss = model(input_ids=padded_ids, neuron_ids=padded_neurons, session_ids=torch.tensor([1]),
                 neuron_mask=mask, labels=padded_ids).loss
    reference_loss = model(input_ids=input_ids, neuron_ids=neuron_ids, session_ids=torch.tensor([1]),
                           labels=input_ids).loss
    torch.testing.assert_close(loss, reference_loss, rtol=1e-5, atol=1e-5)


def test_inputs_embeds_path_matches_input_ids(model):
    input_ids = codes()
    embeds = model.get_input_embeddings()(input_ids)
    torch.testing.assert_close(model(inputs_embeds=embeds).logits, model(input_ids=input_ids).logits)


def test_kv_cache_forward_matches_full_forward(model):
    input_ids = codes()
    full = model(input_ids=input_ids).logits
    prefix = model(input_ids=input_ids[:, :, :5], use_cache=True)
    step = model(input_ids=input_ids[:, :, 5:], cache=prefix.cache, use_cache=True)
    torch.testing.assert_close(step.logits, full[:, :, 5:], rtol=1e-5, atol=1e-5)


def test_the_cache_argument_keeps_its_pre_rename_name(model):
    # transformers 5.24 renamed past_key_values to cache; code written against the old name gets the same result
    input_ids = codes()
    prefix = model(input_ids=input_ids[:, :, :5], use_cache=True)
    step = model(input_ids=input_ids[:, :, 5:], cache=prefix.cache, use_cache=False).logits
    prefix = model(input_ids=input_ids[:, :, :5], use_cache=True)
    old_name = model(input_ids=input_ids[:, :, 5:], past_key_values=prefix.cache, use_cache=False).logits
    assert torch.equal(old_name, step)


def test_generate_feeds_only_the_new_step_once_the_cache_holds_the_context(model, monkeypatch):
    # whichever name the installed transformers hands the cache over by, each decoding step sees one new step
    seen = []
    forward = type(model).forward

    @functools.wraps(forward)  # generate checks its arguments against the forward's signature
    def recording_forward(self, *args, **kwargs):
        seen.append(kwargs["input_ids"].shape[-1])
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", recording_forward)
    model.generate(input_ids=codes(steps=6), max_new_tokens=3)
    assert seen == [6, 1, 1]


# ----------------------------------------------------------------------------------------------------------------------
# generation
# ----------------------------------------------------------------------------------------------------------------------


def test_generation_config_defaults(model):
    assert model.generation_config.max_new_tokens == 15
    assert model.generation_config.eos_token_id is None and model.generation_config.pad_token_id is None
    generated = model.generate(codes(steps=4))
    assert generated.shape == (2, 5, 19)  # never stops early


def test_cached_and_uncached_greedy_generation_are_identical(model):
    input_ids = codes()
    cached = model.generate(input_ids, max_new_tokens=6)
    uncached = model.generate(input_ids, max_new_tokens=6, use_cache=False)
    assert cached.shape == (2, 5, 14)
    assert torch.equal(cached[:, :, :8], input_ids)
    assert torch.equal(cached, uncached)
    # and the manual greedy rollout agrees
    assert torch.equal(model.rollout(input_ids, 6, mode="greedy").codes, cached)


def test_greedy_generation_follows_the_model_argmax(model):
    input_ids = codes(batch=1)
    generated = model.generate(input_ids, max_new_tokens=1)
    expected = model(input_ids=input_ids).logits[:, :, -1].argmax(-1)
    assert torch.equal(generated[:, :, -1], expected)


def test_sampling_is_reproducible_by_seed_and_differs_across_seeds(model):
    input_ids = codes()
    kwargs = {"max_new_tokens": 6, "do_sample": True, "temperature": 1.5, "top_k": 8, "top_p": 0.95}
    torch.manual_seed(0)
    first = model.generate(input_ids, **kwargs)
    torch.manual_seed(0)
    again = model.generate(input_ids, **kwargs)
    torch.manual_seed(1)
    other = model.generate(input_ids, **kwargs)
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_num_return_sequences_shape_and_grouping(model):
    input_ids = codes(batch=2, neurons=5)
    neuron_ids = torch.tensor([[0, 1, 2, 3, 4], [10, 11, 12, 13, 14]])
    session_ids = torch.tensor([0, 2])
    identity = {"neuron_ids": neuron_ids, "session_ids": session_ids}
    greedy = model.generate(input_ids, max_new_tokens=4, **identity)
    repeated = model.generate(input_ids, max_new_tokens=4, num_return_sequences=3, **identity)
    assert repeated.shape == (6, 5, 12)
    # rows [b*R + r] belong to input b, each with its own neurons and identity
    for b in range(2):
        for r in range(3):
            assert torch.equal(repeated[b * 3 + r], greedy[b])
    torch.manual_seed(0)
    sampled = model.generate(input_ids, max_new_tokens=4, num_return_sequences=3, do_sample=True, **identity)
    assert sampled.shape == (6, 5, 12)
    for b in range(2):
        assert all(torch.equal(sampled[b * 3 + r, :, :8], input_ids[b]) for r in range(3))
    assert not torch.equal(sampled[0, :, 8:], sampled[1, :, 8:])


def test_return_dict_in_generate_has_grid_shapes(model):
    output = model.generate(codes(), max_new_tokens=3, return_dict_in_generate=True, output_scores=True)
    assert output.sequences.shape == (2, 5, 11)
    assert len(output.scores) == 3 and output.scores[0].shape == (2, 5, VOCAB)


def test_generation_with_identity_and_padding_matches_unpadded(model):
    input_ids = codes(batch=1, neurons=3)
    reference = model.generate(input_ids, neuron_ids=torch.tensor([[5, 6, 7]]), session_ids=torch.tensor([3]),
                               max_new_tokens=4)
    padded = model.generate(
        torch.cat([input_ids, codes(batch=1, neurons=2, seed=4)], dim=1),
        neuron_ids=torch.tensor([[5, 6, 7, 0, 0]]),
        session_ids=torch.tensor([3]),
        neuron_mask=torch.tensor([[True, True, True, False, False]]),
        max_new_tokens=4,
    )
    assert torch.equal(padded[:, :3], reference)


def test_rollout_modes(model):
    input_ids = codes()
    soft = model.rollout(input_ids, 5, mode="soft")
    greedy = model.rollout(input_ids, 5, mode="greedy")
    assert soft.codes.shape == (2, 5, 13) and soft.probabilities.shape == (2, 5, 5, VOCAB)
    torch.testing.assert_close(soft.probabilities.sum(-1), torch.ones(2, 5, 5))
    assert torch.equal(soft.codes[:, :, 8:], soft.probabilities.argmax(-1))
    # the first step sees the same context; later steps are fed the expected embedding instead of a code
    torch.testing.assert_close(soft.probabilities[:, :, 0], greedy.probabilities[:, :, 0])
    assert not torch.allclose(soft.probabilities[:, :, 1:], greedy.probabilities[:, :, 1:])
    first = model.rollout(input_ids, 5, mode="sample", generator=torch.Generator().manual_seed(0))
    again = model.rollout(input_ids, 5, mode="sample", generator=torch.Generator().manual_seed(0))
    other = model.rollout(input_ids, 5, mode="sample", generator=torch.Generator().manual_seed(1))
    assert torch.equal(first.codes, again.codes) and not torch.equal(first.codes, other.codes)
    top1 = model.rollout(input_ids, 3, mode="sample", top_k=1, temperature=0.5)
    assert torch.equal(top1.codes, model.rollout(input_ids, 3).codes)
    with pytest.raises(ValueError, match="mode"):
        model.rollout(input_ids, 2, mode="beam")


# ----------------------------------------------------------------------------------------------------------------------
# training-time augmentations
# ----------------------------------------------------------------------------------------------------------------------


def test_scheduled_sampling_changes_inputs_only_in_train_mode():
    model = make_model(scheduled_sampling_prob=1.0, neighbor_replacement_prob=0.0, scheduled_sampling_block=3)
    input_ids = codes(steps=10)
    unchanged, applied = model.eval().augment_input_ids(input_ids)
    assert torch.equal(unchanged, input_ids) and not applied
    model.train()
    augmented, applied = model.augment_input_ids(input_ids)
    assert applied
    differs = (augmented != input_ids).any(dim=(0, 1))
    assert differs.any() and int(differs.sum()) <= 3 and not differs[0]  # one block of <= 3 steps, never step 0
    # the block holds the model's own one-step predictions
    start = int(differs.nonzero()[0])
    with torch.no_grad():
        predictions = model.lm_head(model.model(input_ids=input_ids).last_hidden_state).argmax(-1)
    assert torch.equal(augmented[:, :, start], predictions[:, :, start - 1])
    # the training step corrupts the inputs but keeps the true targets; forward itself never corrupts anything
    batch, applied = augment_training_batch(model, {"input_ids": input_ids, "labels": input_ids})
    assert bool(applied) and torch.equal(batch["labels"], input_ids) and not torch.equal(batch["input_ids"], input_ids)
    output = model(**batch)
    with torch.no_grad():
        eval_loss = model.eval()(input_ids=input_ids, labels=input_ids).loss
    assert not torch.isclose(output.loss, eval_loss)
    model.train()
    torch.manual_seed(0)
    train_forward = model(input_ids=input_ids, labels=input_ids)  # no hidden augmentation: dropout is 0 here
    torch.testing.assert_close(train_forward.loss, eval_loss)
    assert train_forward.scheduled_sampling_applied is None
    assert augment_training_batch(model.eval(), {"input_ids": input_ids, "labels": input_ids})[1] is None


def test_calm_trainer_applies_the_augmentations_in_compute_loss(tmp_path):
    from transformers import TrainingArguments

    from calm_hf.trainer import CalmTrainer

    model = make_model(scheduled_sampling_prob=1.0, neighbor_replacement_prob=0.0).train()
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, save_strategy="no")
    trainer = CalmTrainer(model=model, args=args)
    input_ids = codes(steps=10)
    loss, outputs = trainer.compute_loss(model, {"input_ids": input_ids, "labels": input_ids}, return_outputs=True)
    assert bool(outputs.scheduled_sampling_applied)
    with torch.no_grad():
        plain = model(input_ids=input_ids, labels=input_ids).loss
    assert not torch.isclose(loss, plain)  # the loss was computed on the corrupted inputs


def test_neighbor_replacement_uses_codebook_neighbors_only_in_train_mode():
    model = make_model(scheduled_sampling_prob=0.0, neighbor_replacement_prob=1.0, neighbor_k=2)
    input_ids = codes()
    model.train()
    with pytest.warns(UserWarning, match="set_codebook_neighbors"):
        skipped, _ = model.augment_input_ids(input_ids)
    assert torch.equal(skipped, input_ids)
    codebook = torch.randn(VOCAB, 8, generator=torch.Generator().manual_seed(0))
    neighbors = model.set_codebook_neighbors(codebook)
    assert neighbors.shape == (VOCAB, 2)
    unit = torch.nn.functional.normalize(codebook, dim=-1)
    similarity = unit @ unit.T
    similarity.fill_diagonal_(-2)
    assert torch.equal(neighbors[:, 0], similarity.argmax(-1))
    augmented, _ = model.augment_input_ids(input_ids)
    assert (augmented != input_ids).all()
    assert ((augmented[..., None] == neighbors[input_ids]).any(-1)).all()
    model.eval()
    assert torch.equal(model.augment_input_ids(input_ids)[0], input_ids)
    with pytest.raises(ValueError, match="codebook_size"):
        model.set_codebook_neighbors(torch.randn(VOCAB + 1, 8))


def test_neighbor_replacement_probability_is_respected():
    model = make_model(scheduled_sampling_prob=0.0, neighbor_replacement_prob=0.1).train()
    model.set_codebook_neighbors(torch.randn(VOCAB, 8))
    input_ids = codes(batch=8, neurons=16, steps=16)
    augmented, _ = model.augment_input_ids(input_ids)
    fraction = (augmented != input_ids).float().mean().item()
    assert 0.05 < fraction < 0.15


# ----------------------------------------------------------------------------------------------------------------------
# save / load / remote code
# ----------------------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_is_exact(tmp_path, model):
    model.set_codebook_neighbors(torch.randn(VOCAB, 8, generator=torch.Generator().manual_seed(3)))
    model.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    # the modeling file and every file it imports relatively travel with the weights as remote code
    assert {"config.json", "model.safetensors", "generation_config.json", "configuration_calm.py", "presets.py",
            "modeling_calm.py", "validation_calm.py", "generation_calm.py", "sessions_calm.py", "augmentation_calm.py",
            "checked_loading.py"} <= files
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_calm.CalmModel"
    assert auto_map["AutoModelForCausalLM"] == "modeling_calm.CalmForCausalNeuralModeling"
    assert auto_map["AutoConfig"] == "configuration_calm.CalmConfig"
    loaded = CalmForCausalNeuralModeling.from_pretrained(tmp_path).eval()
    original_state, loaded_state = model.state_dict(), loaded.state_dict()
    assert original_state.keys() == loaded_state.keys()
    for key in original_state:
        assert torch.equal(original_state[key], loaded_state[key]), key
    input_ids = codes()
    assert torch.equal(model(input_ids=input_ids).logits, loaded(input_ids=input_ids).logits)
    assert loaded.generation_config.max_new_tokens == 15
    backbone = CalmModel.from_pretrained(tmp_path)
    assert torch.equal(backbone.embed_tokens.weight, model.model.embed_tokens.weight)


@pytest.mark.slow
def test_remote_code_load_and_generate_in_fresh_process(tmp_path, model):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "presets.py").is_file()  # configuration_calm imports the preset table: it travels along
    input_ids = codes(batch=1, neurons=3, steps=4)
    expected = model.generate(input_ids, max_new_tokens=3)
    torch.save({"input_ids": input_ids, "expected": expected}, tmp_path / "io.pt")
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["calm_hf"] = None  # the package must not be importable
        import torch
        from transformers import AutoModel, AutoModelForCausalLM
        io = torch.load({str(tmp_path / "io.pt")!r})
        model = AutoModelForCausalLM.from_pretrained({str(tmp_path)!r}, trust_remote_code=True).eval()
        assert "calm_hf" not in type(model).__module__, type(model).__module__
        assert type(model).__name__ == "CalmForCausalNeuralModeling"
        generated = model.generate(io["input_ids"], max_new_tokens=3)
        assert torch.equal(generated, io["expected"]), (generated, io["expected"])
        backbone = AutoModel.from_pretrained({str(tmp_path)!r}, trust_remote_code=True)
        assert type(backbone).__name__ == "CalmModel"
        print("REMOTE_OK")
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "REMOTE_OK" in result.stdout


# ----------------------------------------------------------------------------------------------------------------------
# new sessions / animals
# ----------------------------------------------------------------------------------------------------------------------


def test_resize_tables_mean_init_and_config_sync():
    model = make_model()
    old_neurons = model.model.neuron_embeddings.weight.detach().clone()
    model.resize_neuron_embeddings(70)
    assert model.config.num_neurons == 70 and model.model.neuron_embeddings.weight.shape == (70, 32)
    assert torch.equal(model.model.neuron_embeddings.weight[:64], old_neurons)
    torch.testing.assert_close(model.model.neuron_embeddings.weight[64:], old_neurons.mean(0).expand(6, -1))
    model.resize_session_embeddings(6)
    assert model.config.num_sessions == 6 and model.model.session_embeddings.weight.shape == (6, 32)
    model(input_ids=codes(batch=1, neurons=2), neuron_ids=torch.tensor([[68, 69]]), session_ids=torch.tensor([5]))


def test_add_session_records_name_and_range():
    model = make_model(session_names=["m1", "m2"], session_neuron_ranges=[[0, 30], [30, 60]], num_sessions=2)
    session_id, neuron_ids = model.add_session("m3", 7)
    assert session_id == 2 and torch.equal(neuron_ids, torch.arange(64, 71))
    assert model.config.session_names == ["m1", "m2", "m3"]
    assert model.config.session_neuron_ranges == [[0, 30], [30, 60], [64, 71]]
    assert (model.config.num_sessions, model.config.num_neurons) == (3, 71)
    assert model.config.session_neuron_ids("m3") == list(range(64, 71))
    with pytest.raises(ValueError, match="already exists"):
        model.add_session("m3", 2)
    # sessions without a recorded name get placeholders
    unnamed = make_model()
    session_id, _ = unnamed.add_session("new", 3)
    assert session_id == 4 and unnamed.config.session_names[:4] == [f"session_{i}" for i in range(4)]


def test_adaptation_trains_only_the_new_rows(tmp_path):
    model = make_model()
    session_id, neuron_ids = model.add_session("held_out", 4)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    trainable = model.freeze_backbone_except_embeddings(session_ids=[session_id], neuron_ids=neuron_ids)
    assert {id(p) for p in trainable} == {id(p) for p in model.parameters() if p.requires_grad}
    assert sum(p.numel() for p in trainable) == (1 + 4) * 32
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    input_ids = codes(batch=2, neurons=4)
    batch = {"neuron_ids": neuron_ids.expand(2, -1), "session_ids": torch.tensor([session_id] * 2)}
    for _ in range(3):
        loss = model(input_ids=input_ids, labels=input_ids, **batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    assert after.keys() == before.keys()  # adapted rows are folded into the usual checkpoint layout
    for key in before:
        if key in ("model.neuron_embeddings.weight", "model.session_embeddings.weight"):
            continue
        assert torch.equal(before[key], after[key]), key
    neurons_before, neurons_after = before["model.neuron_embeddings.weight"], after["model.neuron_embeddings.weight"]
    assert torch.equal(neurons_before[:64], neurons_after[:64])
    assert not torch.equal(neurons_before[64:], neurons_after[64:])
    sessions_before, sessions_after = before["model.session_embeddings.weight"], after["model.session_embeddings.weight"]
    assert torch.equal(sessions_before[:session_id], sessions_after[:session_id])
    assert not torch.equal(sessions_before[session_id], sessions_after[session_id])
    # saving mid-adaptation keeps the adapted rows; the loaded model matches
    model.eval().save_pretrained(tmp_path)
    loaded = CalmForCausalNeuralModeling.from_pretrained(tmp_path).eval()
    assert loaded.config.session_names[-1] == "held_out"
    torch.testing.assert_close(loaded(input_ids=input_ids, **batch).logits, model(input_ids=input_ids, **batch).logits)
    model.merge_adapted_embeddings()
    assert torch.equal(model.model.neuron_embeddings.weight, neurons_after)
    assert not any(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="session_ids and/or neuron_ids"):
        model.freeze_backbone_except_embeddings()


def test_adaptation_with_a_backbone_learning_rate_keeps_other_sessions_rows():
    from calm_hf.commands.adapt import adaptation_optimizer

    model = make_model()
    session_id, neuron_ids = model.add_session("held_out", 4)
    before = {key: value.clone() for key, value in model.state_dict().items()}
    model.freeze_backbone_except_embeddings(session_ids=[session_id], neuron_ids=neuron_ids)
    assert adaptation_optimizer(model, 1e-2, 0.0) is None  # rows only: the trainer builds its own optimizer
    with pytest.raises(ValueError, match="backbone_learning_rate must be >= 0"):
        adaptation_optimizer(model, 1e-2, -1.0)
    optimizer = adaptation_optimizer(model, 1e-2, 1e-3)
    assert [group["lr"] for group in optimizer.param_groups] == [1e-2, 1e-3]
    assert sum(p.numel() for p in optimizer.param_groups[0]["params"]) == (1 + 4) * 32
    model.train()
    input_ids = codes(batch=2, neurons=4)
    batch = {"neuron_ids": neuron_ids.expand(2, -1), "session_ids": torch.tensor([session_id] * 2)}
    for _ in range(2):
        model(input_ids=input_ids, labels=input_ids, **batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    after = model.state_dict()
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    # the shared tables' other rows never move; the new ones do
    for key, old in (("model.neuron_embeddings.weight", 64), ("model.session_embeddings.weight", session_id)):
        assert torch.equal(before[key][:old], after[key][:old]), key
        assert not torch.equal(before[key][old:], after[key][old:]), key


# ----------------------------------------------------------------------------------------------------------------------
# input validation
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"input_ids": torch.zeros(5, 8, dtype=torch.long)}, r"\(batch, neurons, token_steps\)"),
        ({"input_ids": torch.full((1, 2, 4), VOCAB)}, "codebook_size .* differs from model vocab_size 16"),
        ({"input_ids": torch.zeros(1, 2, 4, dtype=torch.long), "neuron_ids": torch.tensor([[0, 64]])},
         r"add_session\(.*resize_neuron_embeddings"),
        ({"input_ids": torch.zeros(1, 2, 4, dtype=torch.long), "session_ids": torch.tensor([4])},
         "Unknown session id"),
        ({"input_ids": torch.zeros(1, 2, 33, dtype=torch.long)}, "max_token_steps=32"),
        ({"input_ids": torch.zeros(1, 2, 0, dtype=torch.long)}, "at least 1 token step"),
        ({"input_ids": torch.zeros(1, 2, 4, dtype=torch.long), "neuron_mask": torch.ones(1, 3, dtype=torch.bool)},
         "neuron_mask must have shape"),
    ],
)
def test_bad_inputs_raise_helpful_errors(model, kwargs, message):
    # where inputs enter (generate, pipeline, collator) validate_inputs runs first; forward only checks shapes
    with pytest.raises(ValueError, match=message):
        model.validate_inputs(**kwargs)
        model(**kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [{"input_ids": torch.zeros(5, 8, dtype=torch.long)}, {"input_ids": torch.zeros(1, 2, 33, dtype=torch.long)},
     {"input_ids": torch.zeros(1, 2, 4, dtype=torch.long), "neuron_mask": torch.ones(1, 3, dtype=torch.bool)}],
)
def test_forward_still_refuses_bad_shapes(model, kwargs):
    with pytest.raises(ValueError):
        model(**kwargs)


def test_float_codes_are_one_type_error_everywhere(model):
    # one rule for the dtype of input_ids: the same TypeError from forward, validate_inputs and generate, whether
    # the codes come as a tensor or as a numpy array
    floats = torch.zeros(1, 2, 4)
    for call in (lambda ids: model(input_ids=ids), model.validate_inputs, model.generate):
        with pytest.raises(TypeError, match="input_ids must hold integers, got dtype torch.float32"):
            call(floats)
    for call in (model.validate_inputs, model.generate):
        with pytest.raises(TypeError, match="input_ids must hold integers, got dtype torch.float64"):
            call(floats.double().numpy())


def test_validate_inputs_checks_labels_once_where_they_enter(model):
    input_ids = codes()
    validate_inputs(model.config, input_ids, labels=input_ids)  # fine
    with pytest.raises(ValueError, match="outside"):
        validate_inputs(model.config, input_ids, labels=torch.full_like(input_ids, 99))
    with pytest.raises(ValueError, match="Every label is -100"):
        model.validate_inputs(input_ids, labels=torch.full_like(input_ids, -100))
    with pytest.raises(ValueError, match="shape of input_ids"):
        model.validate_inputs(input_ids, labels=input_ids[..., :2])
    # forward needs no check to stay finite: a batch with nothing to score has a zero loss, not NaN
    loss = model(input_ids=input_ids, labels=torch.full_like(input_ids, -100)).loss
    assert float(loss.detach()) == 0.0


def test_forward_and_loss_make_no_host_sync(model, monkeypatch):
    """Reading a tensor back to Python (`int()`, `bool()`, `.item()`, `.tolist()`) stalls a GPU pipeline; on CPU we
    make every such read raise and run a training-style forward with a neuron mask, labels and value labels."""
    input_ids = codes()
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    value_labels = torch.randn(2, 5, input_ids.shape[-1] * 4)

    def sync(*args, **kwargs):
        raise AssertionError("host sync inside forward")

    for name in ("__bool__", "__int__", "__float__", "__index__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    outputs = model.train()(input_ids=input_ids, neuron_mask=mask, labels=input_ids, value_labels=value_labels)
    monkeypatch.undo()
    model.eval()
    assert torch.isfinite(outputs.loss)


def test_gradient_checkpointing_gives_the_same_gradients():
    assert CalmForCausalNeuralModeling.supports_gradient_checkpointing
    input_ids = codes()
    value_labels = torch.randn(2, 5, input_ids.shape[-1] * 4, generator=torch.Generator().manual_seed(3))
    gradients = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        # dropout on: the recompute must replay the same masks
        model = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", hidden_dropout=0.1,
                                                                   neuron_identity="table")).train()
        if checkpointing:
            # transformers 5.23 renames the switch; older 5.x only has gradient_checkpointing_enable
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        torch.manual_seed(5)
        model(input_ids=input_ids, labels=input_ids, value_labels=value_labels).loss.backward()
        gradients.append({name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None})
    assert gradients[0].keys() == gradients[1].keys() and len(gradients[0]) > 10
    for name, grad in gradients[0].items():
        torch.testing.assert_close(gradients[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)


def test_bad_generate_calls_raise(model):
    with pytest.raises(ValueError, match="max_token_steps=32"):
        model.generate(codes(steps=30), max_new_tokens=5)
    with pytest.raises(ValueError, match="max_token_steps=32"):
        model.rollout(codes(steps=30), 5)
    with pytest.raises(ValueError, match=r"\(batch, neurons, token_steps\)"):
        model.generate(torch.zeros(4, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="Beam search"):
        model.generate(codes(), num_beams=2)
    with pytest.raises(ValueError, match="vocab_size"):
        model.generate(torch.full((1, 2, 3), 99))


def test_eager_attention_matches_sdpa(model):
    eager = make_model()
    eager.set_attn_implementation("eager")
    assert eager.config._attn_implementation == "eager" and model.config._attn_implementation == "sdpa"
    input_ids = codes()
    mask = torch.tensor([[True, True, True, False, True], [True] * 5])
    torch.testing.assert_close(
        eager(input_ids=input_ids, neuron_mask=mask).logits, model(input_ids=input_ids, neuron_mask=mask).logits,
        rtol=1e-4, atol=1e-4,
    )
    prefix = eager(input_ids=input_ids[:, :, :5], use_cache=True)
    step = eager(input_ids=input_ids[:, :, 5:], cache=prefix.cache, use_cache=True)
    torch.testing.assert_close(step.logits, model(input_ids=input_ids).logits[:, :, 5:], rtol=1e-4, atol=1e-4)


def test_tied_word_embeddings():
    model = make_model(tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert make_model().lm_head.weight is not make_model().model.embed_tokens.weight


def test_max_length_counts_token_steps(model):
    assert model.generate(codes(steps=4), max_length=10).shape == (2, 5, 10)


# ----------------------------------------------------------------------------------------------------------------------
# continuous forecast head and linear neuron mixer
# ----------------------------------------------------------------------------------------------------------------------


def test_value_loss_scores_the_frames_after_each_step():
    model = make_model()
    input_ids, window, steps = codes(), 4, 8
    values = torch.randn(2, 5, steps * window)
    out = model(input_ids=input_ids, value_labels=values)
    horizon = model.config.value_head_steps * window
    assert out.value_predictions.shape == (2, 5, steps, horizon)
    # the same number computed by hand: step t predicts frames (t+1)*L ... (t+1)*L + horizon - 1 that exist
    errors = []
    for t in range(steps):
        for k in range(horizon):
            frame = (t + 1) * window + k
            if frame < steps * window:
                errors.append((out.value_predictions[:, :, t, k] - values[:, :, frame]).pow(2))
    expected = torch.stack(errors).mean()
    torch.testing.assert_close(out.value_loss, expected)
    assert out.loss is out.value_loss or torch.allclose(out.loss, out.value_loss)  # no labels: value term only
    # padded neurons are left out of the loss
    mask = torch.ones(2, 5, dtype=torch.bool)
    mask[1, 3:] = False
    garbage = values.clone()
    garbage[1, 3:] = 1e3
    masked = model(input_ids=input_ids, value_labels=garbage, neuron_mask=mask).value_loss
    assert masked.item() < 100


def test_value_labels_need_the_head_and_the_right_shape():
    model = make_model(value_head_steps=0)
    assert model.value_head is None
    with pytest.raises(ValueError, match="no continuous head"):
        model(input_ids=codes(), value_labels=torch.randn(2, 5, 32))
    with pytest.raises(ValueError, match="no continuous forecast head"):
        model.forecast_values(codes())
    with pytest.raises(ValueError, match="value_labels must be"):
        make_model()(input_ids=codes(), value_labels=torch.randn(2, 5, 31))


def test_forecast_values_is_causal_and_matches_forward():
    model = make_model()
    input_ids = codes()
    direct = model.forecast_values(input_ids)
    torch.testing.assert_close(direct, model(input_ids=input_ids).value_predictions[:, :, -1])
    # the forecast made at step 3 ignores steps 4..7
    changed = input_ids.clone()
    changed[..., 4:] = (changed[..., 4:] + 1) % VOCAB
    torch.testing.assert_close(model.forecast_values(input_ids[..., :4]), model.forecast_values(changed[..., :4]))
    torch.testing.assert_close(
        model(input_ids=input_ids).value_predictions[:, :, 3], model(input_ids=changed).value_predictions[:, :, 3]
    )


def test_neuron_mixer_mixes_neurons_and_ignores_padding():
    model = make_model()
    assert model.model.layers[0].mixer is not None
    input_ids = codes(batch=1, neurons=6)
    base = model.forecast_values(input_ids)
    # another neuron's activity changes neuron 0's forecast (population coupling through the mixer)
    other = input_ids.clone()
    other[0, 5] = (other[0, 5] + 3) % VOCAB
    assert (model.forecast_values(other)[0, 0] - base[0, 0]).abs().max() > 1e-6
    # a padded neuron changes nothing for the real ones, whatever its tokens
    padded = torch.cat([input_ids, torch.randint(0, VOCAB, (1, 2, 8))], dim=1)
    mask = torch.tensor([[True] * 6 + [False] * 2])
    out = model.forecast_values(padded, neuron_ids=torch.arange(8)[None], neuron_mask=mask)
    torch.testing.assert_close(out[:, :6], base, atol=1e-5, rtol=1e-5)


def test_mixer_and_head_weights_round_trip(tmp_path):
    model = make_model()
    model.save_pretrained(tmp_path)
    loaded = CalmForCausalNeuralModeling.from_pretrained(tmp_path).eval()
    assert loaded.config.value_head_steps == model.config.value_head_steps
    torch.testing.assert_close(loaded.forecast_values(codes()), model.forecast_values(codes()), rtol=0, atol=0)


@pytest.mark.parametrize(
    "overrides, message",
    [({"value_head_steps": -1}, "value_head_steps"), ({"neuron_mixer_rank": 1.5}, "neuron_mixer_rank"),
     ({"value_loss_weight": -1.0}, "value_loss_weight"),
     ({"value_loss_weight": 0.0, "next_token_loss_weight": 0.0}, "nothing would be trained")],
)
def test_invalid_head_settings_raise(overrides, message):
    # a wrong type (1.5 for an int) is a TypeError from the strict dataclass, a wrong value a ValueError
    with pytest.raises((ValueError, TypeError), match=message):
        tiny_config(**overrides)


def test_config_is_strict_and_checks_assignments_before_saving(tmp_path):
    config = tiny_config()
    with pytest.raises(Exception, match="hidden_size"):
        config.hidden_size = "wide"  # @strict checks the type of every assignment
    config.num_attention_heads = 5  # a cross-field inconsistency is caught when the config is validated ...
    with pytest.raises(Exception, match="divisible by num_attention_heads"):
        config.save_pretrained(tmp_path)  # ... which save_pretrained does before writing config.json
    assert not (tmp_path / "config.json").exists()


def test_float_fields_accept_integers_from_older_config_files():
    # config.json written before the config was strict may hold e.g. `"hidden_dropout": 0`
    config = tiny_config(attention_dropout=0, rope_theta=10000, frame_rate_hz=6)
    assert config.attention_dropout == 0 and config.frame_rate_hz == 6


@pytest.mark.parametrize("grad", [False, True])
def test_rotary_embedding_turns_each_half_of_a_head_by_its_angle(grad):
    """RoPE as the textbook formula `x cos + rotate_half(x) sin` in the layout attention reads, with and without
    autograd (the inference path writes into one output; gradients flow through the other)."""
    from calm_hf.modeling_calm import CalmRotaryEmbedding, apply_rotary_to_heads

    config = tiny_config()
    cos, sin = CalmRotaryEmbedding(config)(torch.arange(3, 8))
    states = torch.randn(6, 5, config.num_attention_heads, config.hidden_size // config.num_attention_heads)
    heads = states.transpose(1, 2)
    half = heads.shape[-1] // 2
    expected = heads * cos + torch.cat((-heads[..., half:], heads[..., :half]), dim=-1) * sin
    with torch.set_grad_enabled(grad):
        got = apply_rotary_to_heads(states.requires_grad_(grad), cos, sin)
    assert got.shape == expected.shape and got.requires_grad == grad
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    # a rotation keeps every pair's length, and position 0 is the identity
    torch.testing.assert_close(got.norm(dim=-1), heads.norm(dim=-1))
    cos0, sin0 = CalmRotaryEmbedding(config)(torch.zeros(5, dtype=torch.long))
    torch.testing.assert_close(apply_rotary_to_heads(states.detach(), cos0, sin0), heads.detach())
    if grad:
        got.sum().backward()
        assert states.grad is not None and torch.isfinite(states.grad).all()


def test_quantiles_sorted_per_window_equal_the_sorted_sums():
    """The head sorts each window's offsets before adding the point forecast: the same numbers as sorting every
    frame's sums, since adding one value to all levels keeps their order (also in floating point)."""
    config = tiny_config(value_head_steps=3, quantile_levels=[0.05, 0.25, 0.5, 0.75, 0.95])
    model = CalmForCausalNeuralModeling(config)
    generator = torch.Generator().manual_seed(0)
    offsets = torch.randn(2, 4, 1, 3, 5, generator=generator) * torch.tensor([1e-3, 1.0, 1e3])[:, None]
    values = torch.randn(2, 4, 1, 3 * config.window_size, generator=generator) * 1e4
    expected = (values[..., None] + offsets.repeat_interleave(config.window_size, dim=-2)).sort(dim=-1).values
    torch.testing.assert_close(model.predict_quantiles(offsets, values), expected, rtol=0, atol=0)


def test_pinball_loss_equals_the_maximum_form_in_value_and_gradient():
    """The quantile loss writes max(q e, (q - 1) e) as e (q - [e < 0]): the same loss and the same gradient."""
    config = tiny_config(value_head_steps=3, quantile_levels=[0.05, 0.25, 0.5, 0.75, 0.95])
    model = CalmForCausalNeuralModeling(config)
    generator = torch.Generator().manual_seed(0)
    steps, window = 4, config.window_size
    offsets = torch.randn(2, 3, steps, 3, 5, generator=generator, requires_grad=True)
    values = torch.randn(2, 3, steps, 3 * window, generator=generator)
    labels = torch.randn(2, 3, steps * window, generator=generator)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    torch.manual_seed(3)  # the frame scored in each window is drawn at random: the same draw for both forms
    got = model.quantile_loss(offsets, values, labels, mask)
    (got_grad,) = torch.autograd.grad(got, offsets)

    torch.manual_seed(3)
    picked = torch.arange(3) * window + torch.randint(0, window, (3,))
    targets, weight = model._head_targets(labels, steps, values.shape[-1], mask)
    levels = torch.tensor(config.quantile_levels)
    error = targets[..., picked, None] - (values[..., picked, None] + offsets)
    pinball = torch.maximum(levels * error, (levels - 1.0) * error).mean(-1)
    expected = (pinball * weight[..., picked]).sum() / weight[..., picked].sum()
    (expected_grad,) = torch.autograd.grad(expected, offsets)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got_grad, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_fused_path_equals_the_float32_formula(dtype):
    from calm_hf.modeling_calm import CalmRMSNorm

    norm = CalmRMSNorm(8)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    states = (torch.randn(3, 5, 8) * 4).to(dtype).requires_grad_()
    got = norm(states)
    reference = states.float()
    expected = norm.weight * (reference * torch.rsqrt(reference.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    assert got.dtype == expected.dtype
    torch.testing.assert_close(got, expected)
    (got_grad,) = torch.autograd.grad(got.float().sum(), states)
    (expected_grad,) = torch.autograd.grad(expected.float().sum(), states)
    torch.testing.assert_close(got_grad, expected_grad)


def test_population_mixers_project_the_summary_and_equal_the_per_neuron_formula():
    """Both linear mixers apply their value and output projections to the rank rows of the population summary instead
    of to every neuron: the same output and gradients as projecting each neuron."""
    from calm_hf.modeling_calm import CalmCouplingMixer, CalmNeuronMixer

    torch.manual_seed(0)
    config = tiny_config(neuron_identity="data", identity_rank=4, neuron_mixer_rank=4)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(2, 7, 3, config.hidden_size, generator=generator, requires_grad=True)
    identity = torch.randn(2, 7, config.hidden_size, generator=generator)
    weight = torch.rand(2, 7, generator=generator)
    factors = torch.randn(2, 7, 2 * config.identity_rank, generator=generator)
    mixer, coupling = CalmNeuronMixer(config), CalmCouplingMixer(config)
    for module in (mixer, coupling):
        torch.nn.init.normal_(module.o_proj.weight, std=0.2)
        torch.nn.init.normal_(module.value.weight, std=0.2)
        torch.nn.init.normal_(module.norm.weight, mean=1.0, std=0.3)  # its weight is applied after the sum too

    def per_neuron(module, receives, drives):
        values = module.value(module.norm(hidden))  # every neuron projected, then summed
        return module.o_proj(torch.einsum("bnr,btrh->bnth", receives, torch.einsum("bnr,bnth->btrh", drives, values)))

    rank = config.identity_rank
    cases = [
        (mixer(hidden, identity, weight), per_neuron(mixer, mixer.query(identity), mixer.key(identity) * weight[..., None])),
        (coupling(hidden, factors), per_neuron(coupling, factors[..., :rank], factors[..., rank : 2 * rank])),
    ]
    # a layer hands both mixers the normalisation it computed once for its neuron attention
    unit = mixer.norm.unit(hidden)
    cases += [(mixer(hidden, identity, weight, unit=unit), cases[0][1]), (coupling(hidden, factors, unit=unit), cases[1][1])]
    probe = torch.randn(2, 7, 3, config.hidden_size, generator=generator)
    for (got, expected), module in zip(cases, (mixer, coupling, mixer, coupling)):
        torch.testing.assert_close(got, expected)
        got_grads = torch.autograd.grad((got * probe).sum(), (hidden, module.norm.weight), retain_graph=True)
        expected_grads = torch.autograd.grad((expected * probe).sum(), (hidden, module.norm.weight), retain_graph=True)
        for got_grad, expected_grad in zip(got_grads, expected_grads):
            # the same sums in another order: equal up to float32 rounding relative to the gradient's scale
            assert (got_grad - expected_grad).abs().max() <= 1e-5 * expected_grad.abs().max()


@pytest.mark.parametrize("autocast", [False, True])
def test_rms_norm_is_its_weight_times_the_shared_unit_normalisation(autocast):
    """`CalmRMSNorm.unit` is the normalisation without the weight (what a layer computes once for the three norms
    that read its input): `weight * unit(x)` is `norm(x)`, in float32 and under bf16 autocast."""
    from calm_hf.modeling_calm import CalmRMSNorm

    norm = CalmRMSNorm(16, eps=1e-6)
    torch.nn.init.normal_(norm.weight, mean=1.0, std=0.3)
    states = torch.randn(3, 5, 16) * 4
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        got, expected = norm.weight * norm.unit(states), norm(states)
    reference = norm.weight * states * torch.rsqrt(states.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got, reference, rtol=1e-5, atol=1e-5)
