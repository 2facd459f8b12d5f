"""CalmForBehaviorRegression: shapes, frozen backbone, held-out adaptation, decoding quality, save/load, bad inputs."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from calm_hf.configuration_calm import CalmConfig
from calm_hf.data import simulate_session
from calm_hf.metrics.functional import r2_score
from calm_hf.modeling_calm import CalmForCausalNeuralModeling
from calm_hf.modeling_calm_behavior import CalmForBehaviorRegression


VOCAB, NEURONS, STEPS, CHANNELS, WINDOW = 16, 6, 5, 2, 4


def tiny_config(**overrides) -> CalmConfig:
    return CalmConfig.from_preset("tiny", hidden_dropout=0.0, **{"neuron_identity": "table", **overrides})


def make_model(head: str = "glu", seed: int = 0, **overrides) -> CalmForBehaviorRegression:
    torch.manual_seed(seed)
    return CalmForBehaviorRegression(tiny_config(), num_behavior_channels=CHANNELS, behavior_head=head, **overrides)


def random_batch(batch: int = 3, neurons: int = NEURONS, steps: int = STEPS, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        "input_ids": torch.randint(0, VOCAB, (batch, neurons, steps), generator=generator),
        "labels": torch.randn(batch, CHANNELS, steps * WINDOW, generator=generator),
    }


@pytest.mark.parametrize("head", ["glu", "linear"])
def test_predictions_at_frame_rate_and_loss_backpropagates_to_head_only(head):
    model = make_model(head)
    batch = random_batch()
    out = model(**batch)
    assert out.predictions.shape == (3, CHANNELS, STEPS * WINDOW)
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    assert torch.allclose(out.loss, torch.mean((out.predictions - batch["labels"]) ** 2))
    out.loss.backward()
    assert all(p.grad is None for p in model.model.parameters())
    assert model.behavior_head.neuron_weights.grad is not None
    assert float(model.behavior_head.neuron_weights.grad.abs().sum()) > 0
    # hidden states on request, from the backbone
    hidden = model(input_ids=batch["input_ids"], output_hidden_states=True).hidden_states
    assert len(hidden) == model.config.num_hidden_layers + 1 and hidden[-1].shape == (3, NEURONS, STEPS, 32)


@pytest.mark.parametrize("head", ["glu", "linear"])
def test_padded_neurons_do_not_contribute_and_time_is_causal(head):
    model = make_model(head).eval()
    with torch.no_grad():  # non-zero banks so every neuron would matter
        model.behavior_head.neuron_weights.normal_()
    batch = random_batch(batch=2)
    mask = torch.ones(2, NEURONS, dtype=torch.bool)
    mask[:, -2:] = False
    neuron_ids = torch.arange(NEURONS).expand(2, -1).clone()
    base = model(input_ids=batch["input_ids"], neuron_ids=neuron_ids, neuron_mask=mask).predictions
    changed_ids = batch["input_ids"].clone()
    changed_ids[:, -2:] = (changed_ids[:, -2:] + 5) % VOCAB
    other_neurons = neuron_ids.clone()
    other_neurons[:, -2:] = 40
    padded = model(input_ids=changed_ids, neuron_ids=other_neurons, neuron_mask=mask).predictions
    torch.testing.assert_close(padded, base, rtol=0, atol=1e-6)
    # a real neuron does matter
    changed_real = batch["input_ids"].clone()
    changed_real[:, 0] = (changed_real[:, 0] + 5) % VOCAB
    assert not torch.allclose(model(input_ids=changed_real, neuron_ids=neuron_ids, neuron_mask=mask).predictions, base)
    # causality: changing token steps >= 3 leaves the frames of steps 0..2 unchanged, and changes later frames
    future = batch["input_ids"].clone()
    future[:, :, 3:] = (future[:, :, 3:] + 7) % VOCAB
    later = model(input_ids=future, neuron_ids=neuron_ids, neuron_mask=mask).predictions
    torch.testing.assert_close(later[..., : 3 * WINDOW], base[..., : 3 * WINDOW], rtol=0, atol=1e-6)
    assert not torch.allclose(later[..., 3 * WINDOW :], base[..., 3 * WINDOW :])


def test_from_causal_checkpoint_loads_backbone_and_fresh_head(tmp_path):
    torch.manual_seed(0)
    causal = CalmForCausalNeuralModeling(tiny_config())
    causal.save_pretrained(tmp_path)
    for head in ("glu", "linear"):
        model = CalmForBehaviorRegression.from_pretrained(tmp_path, num_behavior_channels=2, behavior_head=head)
        assert model.config.behavior_head == head and model.config.num_behavior_channels == 2
        backbone = causal.model.state_dict()
        for name, value in model.model.state_dict().items():
            assert torch.equal(value, backbone[name]), name
        assert not any(name.startswith("lm_head") for name, _ in model.named_parameters())
        assert not any(p.requires_grad for p in model.model.parameters())  # frozen after loading, too
        assert float(model.behavior_head.neuron_weights.detach().abs().sum()) == 0.0
        identity = torch.zeros_like(model.smoothing.weight)
        identity[..., -1] = 1
        assert torch.equal(model.smoothing.weight, identity)


def test_backbone_bit_identical_after_finetuning_steps():
    model = make_model("glu")
    backbone_before = {k: v.clone() for k, v in model.model.state_dict().items()}
    head_before = {k: v.clone() for k, v in model.behavior_head.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(not name.startswith("model.") for name, p in model.named_parameters() if p.requires_grad)
    optimizer = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    model.train()
    assert not model.model.training  # frozen backbone keeps dropout off
    for step in range(4):
        loss = model(**random_batch(seed=step)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name, value in model.model.state_dict().items():
        assert torch.equal(value, backbone_before[name]), name
    assert any(not torch.equal(v, head_before[k]) for k, v in model.behavior_head.state_dict().items())


@pytest.mark.parametrize("head", ["glu", "linear"])
def test_held_out_adaptation_changes_only_that_sessions_neuron_rows(head):
    config = tiny_config(session_names=["a", "b"], session_neuron_ranges=[[0, 6], [6, 12]])
    torch.manual_seed(0)
    model = CalmForBehaviorRegression(config, num_behavior_channels=CHANNELS, behavior_head=head)
    with torch.no_grad():
        model.behavior_head.neuron_weights.normal_()  # as if trained on session "a"
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = model.train_only_session_neurons("b")
    assert params == [model.behavior_head.neuron_weights]
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["behavior_head.neuron_weights"]
    optimizer = torch.optim.Adam(params, lr=1e-2)
    model.train()
    for step in range(3):
        batch = random_batch(seed=step)
        # batches mix a trial of session b with one of session a: only b's rows may move
        neuron_ids = torch.stack([torch.arange(6, 12), torch.arange(0, 6), torch.arange(6, 12)])
        loss = model(**batch, neuron_ids=neuron_ids, session_ids=torch.tensor([1, 0, 1])).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    for name, value in after.items():
        if name != "behavior_head.neuron_weights":
            assert torch.equal(value, before[name]), name
    bank, bank_before = after["behavior_head.neuron_weights"], before["behavior_head.neuron_weights"]
    assert torch.equal(bank[:6], bank_before[:6]) and torch.equal(bank[12:], bank_before[12:])
    assert (bank[6:12] != bank_before[6:12]).flatten(1).any(1).all()


def test_add_session_grows_the_bank():
    model = make_model("linear")
    session_id, neuron_ids = model.add_session("new", 5)
    assert model.behavior_head.neuron_weights.shape[0] == model.config.num_neurons == 64 + 5
    assert float(model.behavior_head.neuron_weights.detach()[neuron_ids].abs().sum()) == 0.0
    model.train_only_session_neurons(neuron_ids)
    batch = random_batch(neurons=5)
    out = model(**batch, neuron_ids=neuron_ids.expand(3, -1), session_ids=torch.full((3,), session_id))
    out.loss.backward()
    grad = model.behavior_head.neuron_weights.grad
    assert float(grad[neuron_ids].abs().sum()) > 0 and float(grad[:64].abs().sum()) == 0


def quantize(traces: np.ndarray, edges: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A fixed scalar tokenizer for the test: the window mean of 4 frames binned into VOCAB codes."""
    window_means = traces.reshape(*traces.shape[:-1], -1, WINDOW).mean(-1)  # (trials, neurons, steps)
    codes = np.clip(np.digitize(window_means, edges), 0, VOCAB - 1)
    centres = np.concatenate([[edges[0]], (edges[1:] + edges[:-1]) / 2, [edges[-1]]])
    return codes, centres[codes]


@pytest.mark.slow
def test_head_decodes_a_known_linear_readout_on_simulated_trials():
    """Simulated calcium, a known linear readout of the tokens: the tuned head beats the mean on held-out trials."""
    session = simulate_session(num_neurons=12, num_trials=96, num_steps=40, seed=3, num_behavior_channels=0)
    traces = (session.traces - session.traces.mean((0, 2), keepdims=True)) / session.traces.std((0, 2), keepdims=True)
    edges = np.quantile(traces, np.linspace(0, 1, VOCAB + 1)[1:-1])
    codes, values = quantize(traces, edges)
    readout = np.random.default_rng(0).standard_normal((CHANNELS, 12)) / np.sqrt(12)
    behavior = np.repeat(np.einsum("mn,knt->kmt", readout, values), WINDOW, axis=-1)  # (trials, channels, frames)
    behavior = (behavior - behavior[:64].mean((0, 2), keepdims=True)) / behavior[:64].std((0, 2), keepdims=True)
    input_ids, labels = torch.as_tensor(codes), torch.as_tensor(behavior, dtype=torch.float32)
    for head in ("glu", "linear"):
        model = make_model(head, behavior_dropout=0.0)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        with torch.no_grad():  # the frozen backbone runs once: cache its hidden states
            hidden = model.model(input_ids=input_ids).last_hidden_state
        model.train()
        generator = torch.Generator().manual_seed(0)
        for _ in range(250):
            index = torch.randint(0, 64, (16,), generator=generator)
            loss = model(backbone_hidden_states=hidden[index], labels=labels[index]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            pred = model(input_ids=input_ids[64:]).predictions.numpy()
        truth = behavior[64:]
        r2 = r2_score(pred.transpose(0, 2, 1), truth.transpose(0, 2, 1))
        mean_mse = float(((truth - behavior[:64].mean((0, 2), keepdims=True)) ** 2).mean())
        assert r2.min() > 0.5, (head, r2)
        assert float(((pred - truth) ** 2).mean()) < 0.5 * mean_mse, head


def test_save_load_round_trip(tmp_path):
    model = make_model("linear", behavior_rank=3, behavior_smoothing_kernel=3)
    with torch.no_grad():
        for parameter in model.behavior_head.parameters():
            parameter.normal_()
        model.smoothing.weight.normal_()
    model.save_pretrained(tmp_path)
    loaded = CalmForBehaviorRegression.from_pretrained(tmp_path)
    assert loaded.config.behavior_head == "linear" and loaded.config.behavior_rank == 3
    assert loaded.config.behavior_smoothing_kernel == 3 and loaded.config.num_behavior_channels == CHANNELS
    original = model.state_dict()
    assert set(loaded.state_dict()) == set(original)
    for name, value in loaded.state_dict().items():
        assert torch.equal(value, original[name]), name
    assert not any(p.requires_grad for p in loaded.model.parameters())
    batch = random_batch()
    model.eval(), loaded.eval()
    assert torch.equal(model(**batch).predictions, loaded(**batch).predictions)


def test_invalid_head_configs_raise():
    with pytest.raises(ValueError, match="num_behavior_channels is not set"):
        CalmForBehaviorRegression(tiny_config())
    with pytest.raises(ValueError, match="num_behavior_channels must be a positive integer"):
        CalmForBehaviorRegression(tiny_config(), num_behavior_channels=0)
    with pytest.raises(ValueError, match="behavior_rank must be a positive integer"):
        CalmForBehaviorRegression(tiny_config(), num_behavior_channels=2, behavior_head="linear", behavior_rank=0)
    with pytest.raises(ValueError, match="exceeds the backbone hidden_size"):
        CalmForBehaviorRegression(tiny_config(), num_behavior_channels=2, behavior_rank=33)
    with pytest.raises(ValueError, match="Unknown behavior_head 'mlp'"):
        CalmForBehaviorRegression(tiny_config(), num_behavior_channels=2, behavior_head="mlp")
    with pytest.raises(ValueError, match="behavior_dropout"):
        CalmForBehaviorRegression(tiny_config(), num_behavior_channels=2, behavior_dropout=1.5)
    with pytest.raises(ValueError, match="Unknown CalmForBehaviorRegression arguments"):
        CalmForBehaviorRegression(tiny_config(), num_behavior_channels=2, behaviour_head="glu")


def test_bad_inputs_raise_with_the_fix():
    model = make_model("glu")
    batch = random_batch()
    with pytest.raises(ValueError, match=r"behaviour has 19 frames but traces have 5\*4 = 20; resample/crop"):
        model(input_ids=batch["input_ids"], labels=batch["labels"][..., :19])
    nan_labels = batch["labels"].clone()
    nan_labels[1, 0, 7] = float("nan")
    with pytest.raises(ValueError, match="NaN/Inf .*trial 1, channel 0, frame 7"):
        model(input_ids=batch["input_ids"], labels=nan_labels)
    # masked-out missing samples are allowed and left out of the loss
    mask = torch.isfinite(nan_labels)
    out = model(input_ids=batch["input_ids"], labels=nan_labels, behavior_mask=mask)
    assert torch.isfinite(out.loss)
    assert torch.allclose(out.loss, ((out.predictions - batch["labels"]) ** 2)[mask].mean())
    with pytest.raises(ValueError, match="decodes 2 channels"):
        model(input_ids=batch["input_ids"], labels=batch["labels"][:, :1])
    with pytest.raises(ValueError, match="Unknown session id"):
        model(input_ids=batch["input_ids"], session_ids=torch.tensor([0, 9, 0]))
    with pytest.raises(ValueError, match="add_session"):
        model(input_ids=batch["input_ids"], neuron_ids=torch.full((3, NEURONS), 64))
    with pytest.raises(ValueError, match="input_ids must be a"):
        model(input_ids=batch["input_ids"][0])
    with pytest.raises(ValueError, match="outside the head's bank"):
        model.train_only_session_neurons([70])


def load_script(relative_path: str):
    """Import a script of the repository (training/, benchmarks/) as a module."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / relative_path
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


class BinTokenizer:
    """Stand-in tokenizer with the `encode(...).codes` interface `tokenize_dataset` needs."""

    def encode(self, input_values: torch.Tensor):
        edges = torch.linspace(-2, 2, VOCAB - 1)
        window_means = input_values.unflatten(-1, (-1, WINDOW)).mean(-1)
        return type("Encoded", (), {"codes": torch.bucketize(window_means.contiguous(), edges)})()


@pytest.mark.slow
def test_finetune_script_trains_and_adapts_a_held_out_session(tmp_path):
    import datasets  # noqa: F401

    from calm_hf.data import build_trial_dataset, prepare_session, save_session_metadata, simulate_benchmark, tokenize_dataset
    from calm_hf.commands.finetune_behavior import run as main

    sessions = simulate_benchmark(num_sessions=2, seed=0, num_neurons=6, num_trials=20, num_steps=20)
    dataset = tokenize_dataset(build_trial_dataset([prepare_session(s) for s in sessions]), BinTokenizer())
    data_dir = tmp_path / "data"
    dataset.save_to_disk(data_dir)
    save_session_metadata(data_dir, dataset)
    config = tiny_config(session_names=["sim-s0", "sim-s1"], session_neuron_ranges=[[0, 6], [6, 12]])
    torch.manual_seed(0)
    CalmForCausalNeuralModeling(config).save_pretrained(tmp_path / "backbone")
    common = ["--per_device_train_batch_size", "4", "--max_steps", "3", "--learning_rate", "1e-2", "--report_to", "none",
              "--save_strategy", "no", "--eval_strategy", "no", "--use_cpu", "--logging_steps", "1"]
    metrics = main(["--model_name_or_path", str(tmp_path / "backbone"), "--tokenized_dataset", str(data_dir),
                    "--sessions", "sim-s0", "--behavior_head", "linear", "--output_dir", str(tmp_path / "head"), *common])
    assert {"test_r2", "test_mse", "test_r2_velocity_0", "eval_mse_velocity_2"} <= set(metrics)
    trained = CalmForBehaviorRegression.from_pretrained(tmp_path / "head")
    assert trained.config.behavior_head == "linear" and trained.config.num_behavior_channels == 3
    assert float(trained.behavior_head.neuron_weights.detach()[:6].abs().sum()) > 0  # session sim-s0 trained
    assert float(trained.behavior_head.neuron_weights.detach()[6:].abs().sum()) == 0
    main(["--model_name_or_path", str(tmp_path / "head"), "--tokenized_dataset", str(data_dir),
          "--adapt_session", "sim-s1", "--output_dir", str(tmp_path / "adapted"), *common])
    adapted = CalmForBehaviorRegression.from_pretrained(tmp_path / "adapted")
    before, after = trained.state_dict(), adapted.state_dict()
    for name, value in after.items():
        if name != "behavior_head.neuron_weights":
            assert torch.equal(value, before[name]), name
    bank, bank_before = after["behavior_head.neuron_weights"], before["behavior_head.neuron_weights"]
    assert torch.equal(bank[:6], bank_before[:6]) and float(bank[6:12].abs().sum()) > 0



def test_finetune_script_on_a_data_identity_backbone(tmp_path):
    """calm-base computes neuron identities from data: the command gives every row its session's identity (from the
    training trials), grows the head's bank to the dataset's neurons and trains only the head."""
    from calm_hf.data import build_trial_dataset, prepare_session, save_session_metadata, simulate_benchmark, tokenize_dataset
    from calm_hf.commands.finetune_behavior import run as main

    sessions = simulate_benchmark(num_sessions=2, seed=0, num_neurons=6, num_trials=20, num_steps=20)
    dataset = tokenize_dataset(build_trial_dataset([prepare_session(s) for s in sessions]), BinTokenizer())
    data_dir = tmp_path / "data"
    dataset.save_to_disk(data_dir)
    save_session_metadata(data_dir, dataset)
    torch.manual_seed(0)
    config = CalmConfig.from_preset("tiny", hidden_dropout=0.0, num_neurons=4)  # data identity; a bank too small
    causal = CalmForCausalNeuralModeling(config)
    causal.save_pretrained(tmp_path / "backbone")
    main(["--model_name_or_path", str(tmp_path / "backbone"), "--tokenized_dataset", str(data_dir),
          "--output_dir", str(tmp_path / "head"), "--per_device_train_batch_size", "4", "--max_steps", "3",
          "--learning_rate", "1e-2", "--report_to", "none", "--save_strategy", "no", "--eval_strategy", "no",
          "--use_cpu"])
    trained = CalmForBehaviorRegression.from_pretrained(tmp_path / "head")
    assert trained.config.neuron_identity == "data" and trained.behavior_head.neuron_weights.shape[0] == 12
    assert float(trained.behavior_head.neuron_weights.detach().abs().sum()) > 0
    backbone = causal.model.state_dict()
    for name, value in trained.model.state_dict().items():
        assert torch.equal(value, backbone[name]), name

def test_behavior_checkpoint_of_the_one_file_layout_loads_through_its_auto_class(tmp_path):
    """Behaviour checkpoints completed before the behaviour heads had their own file name
    `modeling_calm.CalmForBehaviorRegression` in auto_map; with calm_hf installed they load as the package's class."""
    import json
    import shutil
    from pathlib import Path

    from safetensors.torch import load_file
    from transformers import AutoModelForTimeSeriesPrediction

    fixture = Path(__file__).resolve().parent / "fixtures" / "main_checkpoint"
    folder = tmp_path / "behavior"
    shutil.copytree(fixture / "behavior", folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"]["AutoModelForTimeSeriesPrediction"] = "modeling_calm.CalmForBehaviorRegression"
    (folder / "config.json").write_text(json.dumps(config))
    model = AutoModelForTimeSeriesPrediction.from_pretrained(folder).eval()
    assert type(model) is CalmForBehaviorRegression
    expected = load_file(fixture / "expected.safetensors")
    inputs = {name: expected[name] for name in ("input_ids", "neuron_ids", "session_ids")}
    with torch.no_grad():
        predictions = model(**inputs, neuron_mask=expected["neuron_mask"].bool()).predictions
    torch.testing.assert_close(predictions, expected["behavior_predictions"], rtol=1e-5, atol=1e-6)

