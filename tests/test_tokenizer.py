"""Tests of the CalM neural quantizer (CalmTokenizer) with a tiny configuration."""

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from calm_hf.configuration_calm_tokenizer import CALM_TOKENIZER_PRESETS, CalmTokenizerConfig
from calm_hf.modeling_calm_tokenizer import CalmTokenizer, CalmTokenizerOutput


WINDOW = 4


def tiny_config(**overrides) -> CalmTokenizerConfig:
    return CalmTokenizerConfig.from_preset("tiny", **overrides)


def make_model(seed: int = 0, **overrides) -> CalmTokenizer:
    torch.manual_seed(seed)
    return CalmTokenizer(tiny_config(**overrides))


def smooth_traces(batch: int, neurons: int, frames: int, seed: int = 0) -> torch.Tensor:
    """Sums of two slow sinusoids per neuron, z-scored: a simple, learnable signal."""
    generator = torch.Generator().manual_seed(seed)
    time = torch.arange(frames, dtype=torch.float32)
    freqs = torch.rand(batch, neurons, 2, 1, generator=generator) * 0.25 + 0.03
    phases = torch.rand(batch, neurons, 2, 1, generator=generator) * 2 * math.pi
    traces = torch.sin(freqs * time + phases).sum(2)
    return (traces - traces.mean(-1, keepdim=True)) / traces.std(-1, keepdim=True)


# ---------------------------------------------------------------------------------------------------- shapes


def test_output_shapes_and_types():
    model = make_model(codebook_warmup_steps=0).eval()
    traces = torch.randn(2, 3, 40)
    with torch.no_grad():
        output = model(traces)
        encoded = model.encode(traces)
        decoded = model.decode(encoded.codes)
    assert isinstance(output, CalmTokenizerOutput)
    assert list(output.keys())[0] == "loss"
    for name in [
        "loss", "reconstruction_loss", "mse_loss", "pearson_loss", "commitment_loss", "embed_loss",
        "entropy_loss", "orthogonality_loss", "ar_loss", "codebook_perplexity", "dead_codes",
    ]:  # fmt: skip
        assert getattr(output, name).shape == (), name
    assert output.codes.shape == (2, 3, 10) and output.codes.dtype == torch.long
    assert output.trace_values.shape == (2, 3, 40)
    assert encoded.codes.shape == (2, 3, 10) and encoded.codes.dtype == torch.long
    assert encoded.quantized_embeddings.shape == (2, 3, 10, 32)
    assert decoded.trace_values.shape == (2, 3, 40)
    assert int(encoded.codes.min()) >= 0 and int(encoded.codes.max()) < 16
    # quantized embeddings are the codebook rows of the codes; forward and encode agree
    torch.testing.assert_close(encoded.quantized_embeddings, model.get_codebook()[encoded.codes])
    assert torch.equal(output.codes, encoded.codes)
    # decode(encode(x)) is what forward reconstructs (straight-through is the identity in value)
    torch.testing.assert_close(decoded.trace_values, output.trace_values, atol=1e-5, rtol=1e-5)
    assert model.get_codebook().shape == (16, 32)
    # tuple outputs
    assert isinstance(model.encode(traces, return_dict=False), tuple)
    assert torch.equal(model(traces, return_dict=False)[-2], output.codes)
    # perplexity of hard usage lies in [1, K]
    assert 1.0 <= float(output.codebook_perplexity) <= 16.0 + 1e-4


def test_hf_attributes():
    assert CalmTokenizer.accepts_loss_kwargs is False
    assert CalmTokenizer.main_input_name == "input_values"
    assert CalmTokenizerConfig.model_type == "calm_tokenizer"


# ---------------------------------------------------------------------------------------------------- gradients


def test_finite_loss_backpropagates_to_every_part():
    model = make_model(codebook_warmup_steps=0).train()
    output = model(smooth_traces(2, 3, 32))
    assert torch.isfinite(output.loss)
    output.loss.backward()
    for name in ["encoder.patch_embed.weight", "encoder.layers.0.self_attn.q_proj.weight", "decoder.unpatch.weight",
                 "decoder.layers.1.mlp.fc2.weight", "quantizer.codebook", "ar_head.weight"]:  # fmt: skip
        grad = model.get_parameter(name).grad
        assert grad is not None, name
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # forward changed no state; the training step's update does
    assert int(model.training_step) == 0
    model.update_codebook_state(output)
    assert int(model.training_step) == 1


def test_forward_changes_no_state_and_the_update_needs_a_training_output():
    model = make_model(codebook_warmup_steps=0).train()
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    output = model(smooth_traces(2, 3, 32))
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, state[name]), name
    assert output.encoder_vectors.shape == (2 * 3 * 8, 32) and output.encoder_codes.shape == (2 * 3 * 8,)
    with torch.no_grad():
        eval_output = model.eval()(smooth_traces(2, 3, 32))
    assert eval_output.encoder_vectors is None
    with pytest.raises(ValueError, match="training-mode forward"):
        model.update_codebook_state(eval_output)


def test_bf16_autocast_forward_backward():
    model = make_model(codebook_warmup_steps=0).train()
    traces = smooth_traces(2, 3, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output = model(traces)
    assert torch.isfinite(output.loss) and output.loss.dtype == torch.float32
    output.loss.backward()
    assert model.quantizer.codebook.dtype == torch.float32
    assert torch.isfinite(model.quantizer.codebook.grad).all()
    # distances stay fp32 under autocast: codes equal an explicit fp32 nearest-neighbour search
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        latents = model.encoder(traces.reshape(6, 32))
        codes = model.quantizer.nearest_codes(latents)
    expected = torch.cdist(latents.float(), model.quantizer.codebook.float()[None]).argmin(-1)
    assert torch.equal(codes, expected)


# ---------------------------------------------------------------------------------------------------- save / load


def test_save_load_round_trip_is_exact(tmp_path):
    model = make_model(codebook_warmup_steps=0, revival_interval=2).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(3):  # move weights and every buffer away from their init
        optimizer.zero_grad()
        output = model(smooth_traces(2, 3, 32, seed=step))
        output.loss.backward()
        model.update_codebook_state(output)
        optimizer.step()
    model.eval()
    model.save_pretrained(tmp_path)

    assert (tmp_path / "model.safetensors").is_file()
    assert (tmp_path / "modeling_calm_tokenizer.py").is_file()
    assert (tmp_path / "configuration_calm_tokenizer.py").is_file()
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoConfig"] == "configuration_calm_tokenizer.CalmTokenizerConfig"
    assert auto_map["AutoModel"] == "modeling_calm_tokenizer.CalmTokenizer"

    loaded = CalmTokenizer.from_pretrained(tmp_path).eval()
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys()
    for key in state:
        assert torch.equal(state[key], loaded_state[key]), key
    assert int(loaded.training_step) == 3
    # the non-persistent RoPE frequencies are rebuilt identically
    assert torch.equal(loaded.encoder.rotary_emb.inv_freq, model.encoder.rotary_emb.inv_freq)
    traces = smooth_traces(2, 3, 40, seed=9)
    with torch.no_grad():
        codes, embeddings = model.encode(traces, return_dict=False)
        loaded_codes, loaded_embeddings = loaded.encode(traces, return_dict=False)
        assert torch.equal(codes, loaded_codes)
        assert torch.equal(embeddings, loaded_embeddings)
        assert torch.equal(model.decode(codes).trace_values, loaded.decode(codes).trace_values)


@pytest.mark.slow
def test_remote_code_load_without_calm_hf(tmp_path):
    model = make_model().eval()
    model.save_pretrained(tmp_path / "nq")
    traces = smooth_traces(1, 2, 24, seed=3)
    torch.save(traces, tmp_path / "traces.pt")
    with torch.no_grad():
        expected = model.encode(traces).codes
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["calm_hf"] = None  # the package must not be importable: only the copied files may be used
        import torch
        from transformers import AutoConfig, AutoModel
        config = AutoConfig.from_pretrained({str(tmp_path / "nq")!r}, trust_remote_code=True)
        model = AutoModel.from_pretrained({str(tmp_path / "nq")!r}, trust_remote_code=True).eval()
        assert type(model).__name__ == "CalmTokenizer", type(model)
        assert not type(model).__module__.startswith("calm_hf"), type(model).__module__
        with torch.no_grad():
            codes = model.encode(torch.load({str(tmp_path / "traces.pt")!r})).codes
        print("CODES", codes.flatten().tolist())
        """
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    line = [row for row in result.stdout.splitlines() if row.startswith("CODES")][0]
    assert json.loads(line.split(" ", 1)[1]) == expected.flatten().tolist()


# ---------------------------------------------------------------------------------------------------- behaviour


def test_causal_encoder_ignores_future_frames():
    model = make_model().eval()
    traces = smooth_traces(2, 3, 40, seed=1)
    changed = traces.clone()
    cut_step = 6
    changed[..., cut_step * WINDOW :] = torch.randn_like(changed[..., cut_step * WINDOW :]) * 3
    with torch.no_grad():
        codes = model.encode(traces).codes
        changed_codes = model.encode(changed).codes
        latents = model.encoder(traces.reshape(6, 40))
        changed_latents = model.encoder(changed.reshape(6, 40))
    assert torch.equal(codes[..., :cut_step], changed_codes[..., :cut_step])
    assert torch.equal(latents[:, :cut_step], changed_latents[:, :cut_step])
    assert not torch.allclose(latents[:, cut_step:], changed_latents[:, cut_step:])

    # control: a bidirectional encoder does let the future leak into earlier steps
    bidirectional = make_model(causal_encoder=False).eval()
    with torch.no_grad():
        leaky = bidirectional.encoder(traces.reshape(6, 40))
        leaky_changed = bidirectional.encoder(changed.reshape(6, 40))
    assert not torch.allclose(leaky[:, :cut_step], leaky_changed[:, :cut_step])


def test_codebook_frozen_during_warmup_then_learns():
    model = make_model(codebook_warmup_steps=3).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    initial = model.get_codebook()
    encoder_weight = model.encoder.patch_embed.weight.detach().clone()
    for step in range(3):
        assert model.codebook_frozen()
        optimizer.zero_grad()
        output = model(smooth_traces(2, 3, 32, seed=step))
        output.loss.backward()
        assert model.quantizer.codebook.grad is None
        model.update_codebook_state(output)  # the last warm-up step's update seeds the codebook by k-means
        seeded = model.get_codebook()
        assert torch.equal(seeded, initial) == (step < 2), step
        optimizer.step()
        assert torch.equal(model.get_codebook(), seeded), f"the optimizer moved the codebook in warm-up step {step}"
    assert not torch.equal(model.encoder.patch_embed.weight, encoder_weight)  # the rest did train
    assert not model.codebook_frozen()
    optimizer.zero_grad()
    model(smooth_traces(2, 3, 32, seed=5)).loss.backward()
    assert model.quantizer.codebook.grad is not None
    optimizer.step()
    assert not torch.equal(model.get_codebook(), initial)


def test_warmup_is_autoencoding_then_codebook_is_seeded_by_kmeans():
    model = make_model(codebook_warmup_steps=2).train()
    initial_codebook = model.get_codebook()
    for step in range(2):
        output = model(smooth_traces(2, 4, 32, seed=step))
        # only the reconstruction trains during warm-up
        torch.testing.assert_close(output.loss, output.reconstruction_loss)
        queue = torch.cat([model.quantizer.revival_queue[: int(model.quantizer.revival_queue_filled)],
                           output.encoder_vectors])
        model.update_codebook_state(output)  # the second update ends the warm-up: k-means on the queue

    def mean_distance(codebook: torch.Tensor) -> float:
        return float(model.quantizer.squared_distances(queue, codebook).min(-1).values.mean())

    assert mean_distance(model.get_codebook()) < 0.5 * mean_distance(initial_codebook)
    output = model(smooth_traces(2, 4, 32, seed=2))  # first step after warm-up: the quantizer terms train
    assert not torch.allclose(output.loss, output.reconstruction_loss)


def test_kmeans_initialization_finds_clusters():
    model = make_model(codebook_size=4)
    generator = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=generator) * 5
    data = (centers[:, None] + 0.01 * torch.randn(4, 50, 32, generator=generator)).reshape(200, 32)
    quantizer = model.quantizer
    with torch.no_grad():
        quantizer.revival_queue[:200] = data
        quantizer.revival_queue_filled.fill_(200)
    torch.manual_seed(1)
    assert quantizer.initialize_from_queue(kmeans_iterations=10)
    distances = torch.cdist(centers, quantizer.codebook.detach())
    assert float(distances.min(-1).values.max()) < 0.1  # every true centre has a code on it


def test_ema_update_moves_used_codes_towards_their_vectors():
    model = make_model(codebook_warmup_steps=0, embed_weight=0.0, ema_decay=0.5).train()
    traces = smooth_traces(2, 3, 32)
    before = model.get_codebook()
    with torch.no_grad():
        latents = model.encoder(traces.reshape(6, 32)).reshape(-1, 32)
        codes = model.quantizer.nearest_codes(latents)
        output = model(traces)
    assert torch.equal(model.get_codebook(), before)  # forward moves nothing ...
    model.update_codebook_state(output)  # ... the training step's update does
    after = model.get_codebook()
    for code in codes.unique():
        mean = latents[codes == code].mean(0)
        torch.testing.assert_close(after[code], 0.5 * before[code] + 0.5 * mean)
    unused = [code for code in range(16) if code not in codes.tolist()]
    assert unused, "test needs at least one unused code"
    assert torch.equal(after[unused], before[unused])


def test_dead_code_revival_resets_unused_codes():
    model = make_model(codebook_warmup_steps=0, revival_interval=1, dead_code_threshold=0.5).train()
    dead = [0, 3, 7]
    with torch.no_grad():
        model.quantizer.code_usage[dead] = 0.0
    before = model.get_codebook()
    output = model(smooth_traces(2, 3, 32))
    assert int(output.dead_codes) >= len(dead)  # counted before the update
    model.update_codebook_state(output)
    after = model.get_codebook()
    queue = model.quantizer.revival_queue[: int(model.quantizer.revival_queue_filled)]
    assert queue.shape[0] > 0
    for code in dead:
        assert not torch.equal(after[code], before[code]), code
        # the revived code is exactly one of the queued encoder vectors
        assert (queue == after[code]).all(-1).any(), code
    torch.testing.assert_close(model.quantizer.code_usage[dead], torch.full((3,), 1 / 16))
    assert int(model.quantizer.dead_code_mask(0.5).sum()) == 0

    # control: with revival only every 10 steps, the same dead codes stay put and are counted
    model = make_model(codebook_warmup_steps=0, revival_interval=10, dead_code_threshold=0.5).train()
    with torch.no_grad():
        model.quantizer.code_usage[dead] = 0.0
    model.update_codebook_state(model(smooth_traces(2, 3, 32)))
    assert int(model.quantizer.dead_code_mask(0.5).sum()) >= len(dead)


def test_gumbel_temperature_anneals():
    model = make_model(gumbel_anneal_steps=100)
    assert model.gumbel_temperature(0) == pytest.approx(2.5)
    assert model.gumbel_temperature(50) == pytest.approx(math.sqrt(2.5 * 0.01))
    assert model.gumbel_temperature(100) == pytest.approx(0.01)
    assert model.gumbel_temperature(10_000) == pytest.approx(0.01)


def test_neuron_mask_excludes_padding_from_losses():
    model = make_model().eval()
    traces = smooth_traces(2, 3, 32)
    padded = torch.cat([traces, torch.zeros(2, 1, 32)], dim=1)
    mask = torch.tensor([[True, True, True, False]] * 2)
    with torch.no_grad():
        reference = model(traces)
        masked = model(padded, neuron_mask=mask)
    for name in ["loss", "mse_loss", "pearson_loss", "commitment_loss", "entropy_loss", "ar_loss"]:
        torch.testing.assert_close(getattr(masked, name), getattr(reference, name), msg=name)
    assert masked.codes.shape == (2, 4, 8)


@pytest.mark.slow
def test_training_reduces_reconstruction_loss():
    torch.manual_seed(0)
    model = CalmTokenizer(tiny_config(codebook_warmup_steps=20, revival_interval=25, gumbel_anneal_steps=100))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    evaluation = smooth_traces(4, 8, 32, seed=1000)

    def evaluate() -> float:
        model.eval()
        with torch.no_grad():
            return float(model(evaluation).reconstruction_loss)

    initial = evaluate()
    model.train()
    for step in range(100):
        optimizer.zero_grad()
        output = model(smooth_traces(4, 8, 32, seed=step))
        assert torch.isfinite(output.loss)
        output.loss.backward()
        model.update_codebook_state(output)
        optimizer.step()
    final = evaluate()
    assert int(model.training_step) == 100
    assert final < 0.5 * initial, (initial, final)


def test_trainer_runs_a_few_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    from calm_hf.trainer import CalmTokenizerTrainingCallback, CalmTrainer

    class TraceDataset(torch.utils.data.Dataset):
        def __len__(self):
            return 8

        def __getitem__(self, index):
            return {"input_values": smooth_traces(1, 3, 16, seed=index)[0]}

    model = make_model(codebook_warmup_steps=0)
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, gradient_accumulation_steps=2,
        report_to=[], use_cpu=True, logging_steps=1, save_strategy="no", disable_tqdm=True,
    )  # fmt: skip
    trainer = CalmTrainer(model=model, args=args, train_dataset=TraceDataset())
    assert sum(isinstance(cb, CalmTokenizerTrainingCallback) for cb in trainer.callback_handler.callbacks) == 1
    trainer.train()
    assert int(model.training_step) == 4  # two optimizer steps x two accumulated micro-batches
    # the stock Trainer with the callback does the same; without it the codebook state would not move
    model = make_model(codebook_warmup_steps=0)
    Trainer(model=model, args=args, train_dataset=TraceDataset(), callbacks=[CalmTokenizerTrainingCallback()]).train()
    assert int(model.training_step) == 4


# ---------------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("make_input", "message"),
    [
        (lambda: torch.randn(40), r"3-D \(batch, neurons, frames\).*x\[None, None\]"),
        (lambda: torch.randn(3, 40), r"x\[None, None\]"),
        (lambda: torch.randn(1, 2, 3, 40), r"3-D"),
        (lambda: torch.randn(2, 0, 40), r"empty"),
        (lambda: torch.randn(2, 3, 3), r"fewer than one token window"),
        (lambda: torch.randn(2, 3, 42), r"crop to 40 frames, e\.g\. x\[\.\.\., :40\]"),
        (lambda: [[0.0] * 8], r"torch\.Tensor"),
    ],
)
def test_bad_input_values_raise_clear_errors(make_input, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        model.encode(make_input())
    with pytest.raises(ValueError, match=message):
        model(make_input())


@pytest.mark.parametrize("bad_value", [float("nan"), float("inf")])
def test_non_finite_input_names_batch_and_neuron(bad_value):
    traces = torch.randn(2, 3, 8)
    traces[1, 2, 5] = bad_value
    model = make_model()
    with pytest.raises(ValueError, match=r"NaN/Inf.*batch index 1, neuron 2, frame 5"):
        model.encode(traces)
    with pytest.raises(ValueError, match=r"batch index 1, neuron 2"):
        model(traces)


@pytest.mark.parametrize(
    ("codes", "message"),
    [
        (torch.full((1, 2, 3), 16), r"\[0, 15\].*got values from 16 to 16"),
        (torch.full((1, 2, 3), -1), r"\[0, 15\]"),
        (torch.zeros(2, 3, dtype=torch.long), r"3-D.*codes\[None, None\]"),
        (torch.zeros(1, 2, 3, dtype=torch.float32), r"integer tensor"),
        (torch.zeros(1, 0, 3, dtype=torch.long), r"empty"),
    ],
)
def test_bad_codes_raise_clear_errors(codes, message):
    with pytest.raises(ValueError, match=message):
        make_model().decode(codes)


def test_bad_neuron_mask_raises():
    model = make_model()
    with pytest.raises(ValueError, match=r"neuron_mask.*\(2, 3\)"):
        model(torch.randn(2, 3, 8), neuron_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="every neuron"):
        model(torch.randn(2, 3, 8), neuron_mask=torch.zeros(2, 3, dtype=torch.bool))


# ---------------------------------------------------------------------------------------------------- configs


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"hidden_size": 30, "num_attention_heads": 4}, r"hidden_size.*30.*num_attention_heads.*4"),
        ({"hidden_size": 24, "num_attention_heads": 8}, r"even head size"),
        ({"window_size": 0}, r"window_size=0"),
        ({"codebook_size": 1}, r"codebook_size=1"),
        ({"hidden_size": -8}, r"hidden_size=-8"),
        ({"gumbel_temperature_end": 0.0}, r"temperatures must be > 0"),
        ({"gumbel_temperature_start": 0.001}, r"gumbel_temperature_end <= gumbel_temperature_start"),
        ({"ema_decay": 1.0}, r"ema_decay=1.0"),
        ({"ema_decay": -0.1}, r"ema_decay"),
        ({"commitment_weight": -1.0}, r"commitment_weight=-1.0"),
        ({"dropout": 1.0}, r"dropout=1.0"),
        ({"ar_horizon": 0}, r"ar_horizon=0"),
        ({"revival_queue_size": 0}, r"revival_queue_size=0"),
    ],
)
def test_invalid_configs_raise(overrides, message):
    with pytest.raises(ValueError, match=message):
        CalmTokenizerConfig(**overrides)


def test_presets():
    assert set(CALM_TOKENIZER_PRESETS) == {"tiny", "cpu", "paper"}
    paper = CalmTokenizerConfig.from_preset("paper")
    assert (paper.hidden_size, paper.codebook_size, paper.num_encoder_layers, paper.num_decoder_layers) == (512, 128, 4, 4)
    assert (paper.num_attention_heads, paper.window_size, paper.intermediate_size) == (4, 4, 2048)
    assert (paper.ema_decay, paper.embed_weight, paper.commitment_weight, paper.entropy_weight, paper.ar_weight) == (
        0.99, 1.0, 0.5, 0.5, 0.5,
    )  # fmt: skip
    cpu = CalmTokenizerConfig.from_preset("cpu")
    assert (cpu.hidden_size, cpu.codebook_size, cpu.num_encoder_layers, cpu.num_attention_heads) == (64, 128, 2, 4)
    # the cpu preset trains a plain VQ-VAE: the paper's extra terms cost held-out reconstruction
    assert (cpu.ar_weight, cpu.entropy_weight, cpu.orthogonality_weight, cpu.reconstruction_pearson_weight) == (0, 0, 0, 0)
    assert (cpu.commitment_weight, cpu.embed_weight) == (0.5, 1.0)
    tiny = CalmTokenizerConfig.from_preset("tiny", codebook_size=8)
    assert (tiny.hidden_size, tiny.codebook_size) == (32, 8)
    with pytest.raises(ValueError, match="Unknown preset 'huge'"):
        CalmTokenizerConfig.from_preset("huge")


def test_config_round_trip(tmp_path):
    config = tiny_config(ar_horizon=2, causal_decoder=True)
    config.save_pretrained(tmp_path)
    loaded = CalmTokenizerConfig.from_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["auto_map"] == {
        "AutoConfig": "configuration_calm_tokenizer.CalmTokenizerConfig"
    }
    for name in CALM_TOKENIZER_PRESETS["tiny"]:
        assert getattr(loaded, name) == getattr(config, name), name
    assert loaded.ar_horizon == 2 and loaded.causal_decoder is True and loaded.intermediate_size == 64


def test_hand_written_loop_without_state_update_is_warned_about():
    """A loop that never calls update_codebook_state would silently train a collapsing codebook: it is warned about
    once, and a loop that does call it is not."""
    from transformers.testing_utils import CaptureLogger
    from transformers.utils import logging as hf_logging

    from calm_hf import modeling_calm_tokenizer

    logger = hf_logging.get_logger(modeling_calm_tokenizer.__name__)
    model = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny")).train()
    batch = torch.randn(2, 1, 16)
    with CaptureLogger(logger) as quiet:
        for _ in range(12):
            model.update_codebook_state(model(input_values=batch))
    assert "update_codebook_state" not in quiet.out
    with CaptureLogger(logger) as loud:
        for _ in range(12):
            model(input_values=batch)
    assert loud.out.count("without update_codebook_state") == 1


def test_patch_embedding_as_a_matmul_equals_the_convolution():
    """The encoder applies its stride = kernel convolution as one linear map of each window: the same values."""
    torch.manual_seed(0)
    config = CalmTokenizerConfig(window_size=4, hidden_size=16, intermediate_size=32, num_attention_heads=2,
                                 num_encoder_layers=1, num_decoder_layers=1, codebook_size=8)
    encoder = CalmTokenizer(config).eval().encoder
    traces = torch.randn(3, 4 * 5)
    convolved = encoder.patch_embed(traces.unsqueeze(1)).transpose(1, 2)
    windows = traces.unflatten(-1, (-1, config.window_size))
    torch.testing.assert_close(torch.nn.functional.linear(windows, encoder.patch_embed.weight.flatten(1),
                                                          encoder.patch_embed.bias),
                               convolved)
    seen = []
    handle = encoder.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        encoder(traces)
    handle.remove()
    torch.testing.assert_close(seen[0], convolved)
