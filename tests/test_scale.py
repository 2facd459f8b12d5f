"""Recordings at scale: forecasts in chunks under a memory budget equal the unchunked ones, and the streaming
forecaster equals the batch direct forecast on the same context."""

import numpy as np
import pytest
import torch

from calm_hf import CalmConfig, CalmForCausalNeuralModeling, CalmTokenizer, CalmTokenizerConfig
from calm_hf.forecasting import CalmForecaster
from calm_hf.streaming import CalmStreamingForecaster


def make_forecaster(max_memory_gib: float = 2.0, seed: int = 0, **overrides) -> CalmForecaster:
    torch.manual_seed(seed)
    model = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", num_neurons=64, **overrides)).eval()
    tokenizer = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny")).eval()
    return CalmForecaster(model, tokenizer, max_memory_gib=max_memory_gib)


def layer_chunks_taken(monkeypatch) -> list[int]:
    """The neurons per chunk of every chunked layer pass from now on (a spy on `_forward_in_chunks`)."""
    from calm_hf import modeling_calm as modeling

    calls = []
    original = modeling.CalmDualAxisLayer._forward_in_chunks

    def counted(self, *args):
        calls.append(args[-1])
        return original(self, *args)

    monkeypatch.setattr(modeling.CalmDualAxisLayer, "_forward_in_chunks", counted)
    return calls


# small enough that every chunk holds one item (one recording, one sample, one neuron of the tokenizer)
ONE_PER_CHUNK = 1e-9


def test_chunked_direct_forecast_and_codes_equal_unchunked():
    whole = make_forecaster()
    chunked = CalmForecaster(whole.model, whole.tokenizer, max_memory_gib=ONE_PER_CHUNK)
    assert chunked.chunk_size(chunked.grid_bytes(5, 6), 3) == 1
    context = torch.randn(3, 5, 24)
    np.testing.assert_array_equal(chunked.tokenize(context), whole.tokenize(context))
    codes = whole.tokenize(context)
    np.testing.assert_allclose(chunked.decode(codes), whole.decode(codes), rtol=1e-6, atol=1e-6)
    expected, got = whole.forecast(context, horizon=20), chunked.forecast(context, horizon=20)
    np.testing.assert_allclose(got.forecast, expected.forecast, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.quantiles, expected.quantiles, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mode", ["sample", "direct"])
def test_sampled_futures_do_not_depend_on_the_chunking(mode):
    whole = make_forecaster()
    chunked = CalmForecaster(whole.model, whole.tokenizer, max_memory_gib=ONE_PER_CHUNK)
    context = torch.randn(2, 5, 24)
    torch.manual_seed(3)
    expected = whole.forecast(context, horizon=8, mode=mode, num_samples=4)
    torch.manual_seed(3)
    got = chunked.forecast(context, horizon=8, mode=mode, num_samples=4)
    assert got.samples.shape == (2, 4, 5, 8)
    np.testing.assert_allclose(got.samples, expected.samples, rtol=1e-5, atol=1e-5)
    torch.manual_seed(4)  # another seed draws other futures: the equality above is not vacuous
    assert not np.allclose(whole.forecast(context, horizon=8, mode=mode, num_samples=4).samples, expected.samples)


def test_sampled_futures_share_the_context_and_keep_identities_per_recording():
    forecaster = make_forecaster()
    model = forecaster.model
    codes = forecaster.tokenize(torch.randn(2, 5, 24))
    identity = forecaster.neuron_identity(torch.randn(3, 5, 24), num_neurons=5)
    seeds = torch.arange(6).reshape(2, 3)
    futures = model.sample_futures(codes, 4, seeds, samples_per_chunk=2, neuron_identity=identity[None].expand(2, -1, -1))
    assert futures.shape == (2, 3, 5, codes.shape[-1] + 4)
    assert torch.equal(futures[:, :, :, : codes.shape[-1]], codes[:, None].expand(-1, 3, -1, -1))
    # one future alone, seeded the same, is the same future
    alone = model.sample_futures(codes[1:], 4, seeds[1:, 2:], neuron_identity=identity[None])
    assert torch.equal(alone[0, 0], futures[1, 2])
    with pytest.raises(ValueError, match="seeds must be"):
        model.sample_futures(codes, 4, torch.zeros(3, dtype=torch.long))


def test_max_memory_gib_is_checked():
    forecaster = make_forecaster()
    for bad in (0, -1.0, float("inf"), True, "2"):
        with pytest.raises(ValueError, match="max_memory_gib must be a positive number"):
            CalmForecaster(forecaster.model, forecaster.tokenizer, max_memory_gib=bad)


def test_tokenizer_encodes_a_stream_window_by_window_like_all_at_once():
    tokenizer = make_forecaster().tokenizer
    values = torch.randn(2, 3, 40)
    cache = [[None, None] for _ in range(tokenizer.config.num_encoder_layers)]
    with torch.no_grad():
        pieces = [tokenizer.encode(values[..., :12], cache=cache).codes]
        pieces += [tokenizer.encode(values[..., start : start + 4], cache=cache).codes for start in range(12, 40, 4)]
        assert torch.equal(torch.cat(pieces, dim=-1), tokenizer.encode(values).codes)
    bidirectional = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny", causal_encoder=False)).eval()
    with pytest.raises(ValueError, match="causal encoder"):
        bidirectional.encode(values, cache=[[None, None] for _ in range(bidirectional.config.num_encoder_layers)])


def stream_and_compare(forecaster, frames: torch.Tensor, checked: set[int], **stream_kwargs) -> int:
    """Feed `frames` (neurons, frames) one at a time; at the frames in `checked` compare with the batch direct forecast
    from the frames the stream reads. Returns how many comparisons were made."""
    stream = CalmStreamingForecaster(forecaster, frames.shape[0], **stream_kwargs)
    window, compared = forecaster.window_size, 0
    for index in range(frames.shape[1]):
        latest = stream.update(frames[:, index])
        if index + 1 < window:
            assert latest is None
            continue
        assert latest.frames_seen == index + 1
        if index not in checked:
            continue
        ahead = (index + 1) % window  # frames of the window being filled
        end = index + 1 - ahead
        context = frames[None, :, end - latest.context_frames : end]
        batch = forecaster.forecast(context, horizon=stream.horizon + ahead, **stream_kwargs.get("forecast_kwargs", {}))
        np.testing.assert_allclose(latest.forecast, batch.forecast[0, :, ahead:], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(latest.quantiles, batch.quantiles[0, :, ahead:], rtol=1e-5, atol=1e-5)
        compared += 1
    return compared


@pytest.mark.parametrize("with_readout", [False, True])
def test_streaming_forecast_equals_the_batch_direct_forecast(with_readout):
    from calm_hf.population_readout import PopulationReadout

    forecaster = make_forecaster()
    if with_readout:  # a recording's population readout is blended in as the batch direct forecast blends it
        generator = torch.Generator().manual_seed(5)
        forecaster.population_readout = PopulationReadout(0.1 * torch.randn(2 * 5, 5, generator=generator),
                                                          torch.zeros(5), 2, [0.3, 0.7], validation_horizon=8)
    max_steps, window = forecaster.model.config.max_token_steps, forecaster.window_size
    total = window * (max_steps + 6) + 2
    frames = torch.randn(5, total)
    # first window, inside a window, just before and after the restart at max_token_steps, and the end of the stream
    checked = {window - 1, 2 * window + 1, max_steps * window - 1, max_steps * window + window - 1, total - 1}
    assert stream_and_compare(forecaster, frames, checked) == len(checked)


def test_streaming_a_table_identity_model():
    forecaster = make_forecaster(neuron_identity="table")
    ids = torch.arange(10, 15)
    frames = torch.randn(5, 30)
    stream = CalmStreamingForecaster(forecaster, 5, neuron_ids=ids, session_ids=1)
    for index in range(frames.shape[1]):
        latest = stream.update(frames[:, index])
    batch = forecaster.forecast(frames[None, :, :28], horizon=stream.horizon + 2, neuron_ids=ids[None],
                                session_ids=torch.tensor([1]))
    np.testing.assert_allclose(latest.forecast, batch.forecast[0, :, 2:], rtol=1e-5, atol=1e-5)


def test_streaming_rejects_bad_input():
    forecaster = make_forecaster()
    stream = CalmStreamingForecaster(forecaster, 4)
    with pytest.raises(ValueError, match="one value per neuron"):
        stream.update(np.zeros(5, dtype=np.float32))
    with pytest.raises(ValueError, match="NaN/Inf"):
        stream.update(np.array([0.0, np.nan, 0.0, 0.0], dtype=np.float32))
    most = forecaster.model.config.value_head_steps * forecaster.window_size - (forecaster.window_size - 1)
    with pytest.raises(ValueError, match=rf"horizon=\d+ must lie in \[1, {most}\]"):
        CalmStreamingForecaster(forecaster, 4, horizon=most + 1)
    with pytest.raises(ValueError, match="num_neurons must be a positive integer"):
        CalmStreamingForecaster(forecaster, 0)
    with pytest.raises(ValueError, match="continuous forecast head"):
        CalmStreamingForecaster(make_forecaster(value_head_steps=0, value_skip_windows=0), 4)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained data-identity checkpoint with a quantile head, saved complete."""
    from calm_hf.checkpoint import complete_checkpoint

    folder = tmp_path_factory.mktemp("ckpt") / "calm-tiny"
    forecaster = make_forecaster()
    forecaster.model.save_pretrained(folder)
    complete_checkpoint(folder, tokenizer=forecaster.tokenizer)
    return folder


def test_pipeline_passes_the_memory_budget_through(checkpoint):
    from transformers import pipeline

    pipe = pipeline("neural-forecasting", model=str(checkpoint), max_memory_gib=ONE_PER_CHUNK)
    assert pipe.forecaster.max_memory_gib == ONE_PER_CHUNK
    traces = np.random.default_rng(0).standard_normal((3, 6, 120)).cumsum(-1)
    chunked = pipe(traces, sampling_rate=10.0, horizon=12)
    whole = pipe(traces, sampling_rate=10.0, horizon=12, max_memory_gib=4.0)
    for a, b in zip(chunked, whole):
        np.testing.assert_allclose(a["forecast"], b["forecast"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(a["quantiles"][0.95], b["quantiles"][0.95], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="max_memory_gib must be a positive number"):
        pipe(traces, sampling_rate=10.0, horizon=12, max_memory_gib=-1)


def test_calm_forecast_stream_replays_a_file(checkpoint, tmp_path):
    from calm_hf.commands.forecast import run

    traces = np.random.default_rng(1).standard_normal((4, 90)).cumsum(-1).astype(np.float32)
    path = tmp_path / "rec.npz"
    np.savez(path, traces=traces, fs=np.float64(10.0))
    output = tmp_path / "stream.npz"
    arrays = run(["--model", str(checkpoint), "--traces", str(path), "--horizon", "6", "--stream", "--speed", "1000",
                  "--baseline_seconds", "4", "--output", str(output)])
    # 10 Hz input block-averaged to the model's 5 Hz: one update per two input frames
    assert arrays["forecast_next"].shape == (45, 4) and np.isnan(arrays["forecast_next"][:3]).all()
    assert np.isfinite(arrays["forecast_next"][3:]).all()
    assert arrays["forecast"].shape == (4, 3) and np.all(arrays["quantile_0.05"] <= arrays["quantile_0.95"])
    with np.load(output) as saved:
        np.testing.assert_array_equal(saved["times"], arrays["times"])
    with pytest.raises(ValueError, match="--speed and --baseline_seconds must be positive"):
        run(["--model", str(checkpoint), "--traces", str(path), "--horizon", "6", "--stream", "--speed", "0",
             "--output", str(tmp_path / "other.npz")])


def test_priming_a_stream_equals_feeding_its_frames_one_by_one():
    forecaster = make_forecaster()
    frames = torch.randn(5, 4 * forecaster.model.config.max_token_steps + 11)
    one_by_one = CalmStreamingForecaster(forecaster, 5)
    for index in range(frames.shape[1]):
        expected = one_by_one.update(frames[:, index])
    primed = CalmStreamingForecaster(forecaster, 5)
    got = primed.prime(frames[:, :90])
    for index in range(90, frames.shape[1]):
        got = primed.update(frames[:, index])
    assert got.context_frames == expected.context_frames and got.frames_seen == expected.frames_seen
    np.testing.assert_allclose(got.forecast, expected.forecast, rtol=1e-5, atol=1e-5)
    assert primed.prime(frames[:, :3]) is None
    with pytest.raises(ValueError, match="frames must be"):
        primed.prime(frames[:4])


def test_scale_benchmark_tables_skips_and_figure(tmp_path):
    from benchmark_scripts import load_benchmark

    scale = load_benchmark("scale.py")
    assert scale.skip_reason("point_band", 100000, {}, 12.0).startswith("skipped: the 10-minute recording alone")
    assert scale.skip_reason("point_band", 1000, {}, 12.0) is None
    assert "20000 neurons already ran out" in scale.skip_reason("samples16", 50000, {"samples16": (
        "ran out of time or memory", 20000)}, 12.0)
    result = {
        "machine": {"processor": "x86_64", "cpus": 2, "torch_threads": 2, "torch": "2", "fp32_matmul_peak_gflops": 100.0,
                    "load_average_at_start": 1.0, "load_average_at_end": 2.0},
        "settings": {"model": "calm-base", "recording": "600 s at 30 Hz", "horizon_frames": 300,
                     "train": "cpu preset", "command": "scale.py --model calm-base"},
        "rows": [{"neurons": 10000, "task": "point_band", "seconds": 12.0, "peak_gib": 3.0},
                 {"neurons": 1000, "task": "stream_update", "seconds": 0.004, "peak_gib": 1.0, "window_seconds": 0.016},
                 {"neurons": 1000, "task": "train_step", "seconds": 0.5, "peak_gib": 1.0, "tokens_per_second": 5e4,
                  "achieved_gflops": 60.0, "fraction_of_peak": 0.6},
                 {"neurons": 20000, "task": "samples16", "seconds": None, "peak_gib": None,
                  "note": "did not finish in 180 s"}],
    }
    table = scale.markdown(result)
    assert "| 10,000 | point_band | 12 | 3.00 | < 10 s, < 4 GiB (not met) |" in table
    assert "| 1,000 | stream_update | 0.004 | 1.00 | < 0.01 s (met) | per frame (mean); a frame that completes a " \
           "window: 16.0 ms |" in table
    assert "60.0% of the fp32 matmul peak" in table and ">= 50% of peak (met)" in table
    assert "did not finish in 180 s" in table
    scale.figure(result, tmp_path / "scale.png")
    assert (tmp_path / "scale.png").stat().st_size > 0
    # two runs merge into one table, rows by neurons, every command listed
    import json

    later = {**result, "rows": [{"neurons": 500, "task": "point_band", "seconds": 1.0, "peak_gib": 1.0},
                                {"neurons": 20000, "task": "samples16", "seconds": 90.0, "peak_gib": 5.0},
                                {"neurons": 10000, "task": "point_band", "seconds": 8.0, "peak_gib": 2.0}],
             "settings": {**result["settings"], "command": "scale.py --neurons 500"}, "wall_seconds": 3.0}
    (tmp_path / "a.json").write_text(json.dumps({**result, "wall_seconds": 2.0}))
    (tmp_path / "b.json").write_text(json.dumps(later))
    merged = scale.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--output",
                         str(tmp_path / "merged")])
    assert [row["neurons"] for row in merged["rows"]] == [500, 1000, 1000, 10000, 20000]
    assert merged["rows"][-1]["seconds"] == 90.0  # a measurement replaces another run's failure
    assert merged["rows"][3]["seconds"] == 8.0  # and a later run's measurement an earlier one
    assert "scale.py --neurons 500" in (tmp_path / "merged.md").read_text()


def test_neuron_attention_blocks_cover_every_neuron_once():
    from calm_hf.modeling_calm import neuron_attention_blocks

    assert neuron_attention_blocks(300, None) == [(0, 1, 300)]
    assert neuron_attention_blocks(300, 300) == [(0, 1, 300)]
    for neurons, block in ((301, 300), (1000, 256), (10_007, 512), (5, 1)):
        parts = neuron_attention_blocks(neurons, block)
        covered = [n for start, groups, size in parts for n in range(start, start + groups * size)]
        assert covered == list(range(neurons))
        sizes = {size for _, _, size in parts}
        assert max(sizes) <= block and max(sizes) - min(sizes) <= 1


def blocked_model(block, mixer_rank=0, seed=0):
    torch.manual_seed(seed)
    config = CalmConfig.from_preset("tiny", num_neurons=64, neuron_mixer_rank=mixer_rank,
                                    neuron_attention_block=block)
    return CalmForCausalNeuralModeling(config).eval()


def test_blocked_neuron_attention_equals_full_below_the_block_and_is_local_above_it():
    full = blocked_model(None)
    vocab = full.config.vocab_size
    ids = torch.randint(0, vocab, (2, 10, 5), generator=torch.Generator().manual_seed(1))
    same = blocked_model(10)
    torch.testing.assert_close(same(input_ids=ids).logits, full(input_ids=ids).logits)
    blocked = blocked_model(4)  # groups of 4, 3, 3 neurons
    out = blocked(input_ids=ids).logits
    assert not torch.allclose(out, full(input_ids=ids).logits, atol=1e-4)
    # a neuron reads only its group: changing neurons 4..9 leaves neurons 0..3 alone, and each group alone equals
    # the model run on that group by itself
    changed = ids.clone()
    changed[:, 4:] = (changed[:, 4:] + 7) % vocab
    torch.testing.assert_close(blocked(input_ids=changed).logits[:, :4], out[:, :4])
    for start, stop in ((0, 4), (4, 7), (7, 10)):
        alone = blocked(input_ids=ids[:, start:stop], neuron_ids=torch.arange(start, stop).expand(2, -1)).logits
        torch.testing.assert_close(alone, out[:, start:stop], rtol=1e-5, atol=1e-5)


def test_blocked_neuron_attention_with_padding_and_the_linear_mixer():
    # padding inside a group is masked there; the linear mixer still reads every neuron, so the groups are not cut off
    model = blocked_model(4, mixer_rank=4)
    for module in model.modules():  # the mixer's output starts at zero: give it weight
        if type(module).__name__ == "CalmNeuronMixer":
            torch.nn.init.normal_(module.o_proj.weight, std=0.2)
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, 9, 4), generator=torch.Generator().manual_seed(2))
    real = model(input_ids=ids[:, :7]).logits
    mask = torch.tensor([[True] * 7 + [False] * 2])
    padded = model(input_ids=ids, neuron_mask=mask).logits
    # 7 real neurons: groups (4, 3); 9 with padding: groups (3, 3, 3) -- compare a neuron's output only where both
    # layouts put it with the same real neighbours, i.e. check padding never leaks instead
    changed = ids.clone()
    changed[:, 7:] = (changed[:, 7:] + 5) % vocab
    torch.testing.assert_close(model(input_ids=changed, neuron_mask=mask).logits[:, :7], padded[:, :7])
    assert torch.isfinite(padded).all() and torch.isfinite(real).all()
    changed = ids.clone()
    changed[:, 5] = (changed[:, 5] + 5) % vocab  # neuron 5 is in another group than neuron 0: only the mixer carries it
    assert not torch.allclose(model(input_ids=changed).logits[:, 0], model(input_ids=ids).logits[:, 0], atol=1e-6)


@pytest.mark.parametrize("block", [None, 3])
def test_a_large_grid_runs_in_neuron_chunks_with_the_same_result(monkeypatch, block):
    import calm_hf.modeling_calm as modeling
    from calm_hf.identity_calm import compute_neuron_identity, identity_settings

    torch.manual_seed(0)
    config = CalmConfig.from_preset("tiny", neuron_identity="data", identity_rank=4, neuron_mixer_rank=4,
                                    hidden_dropout=0.0, quantile_levels=[0.1, 0.5, 0.9], neuron_attention_block=block)
    model = CalmForCausalNeuralModeling(config).eval()
    for module in model.modules():  # a trained model's mixers are not zero
        if type(module).__name__ in ("CalmNeuronMixer", "CalmCouplingMixer"):
            torch.nn.init.normal_(module.o_proj.weight, std=0.2)
    neurons, steps = 11, 5
    ids = torch.randint(0, config.vocab_size, (2, neurons, steps))
    identity = compute_neuron_identity(torch.randn(4, neurons, 24), neurons, **identity_settings(config))
    identity = identity.expand(2, -1, -1).clone()
    mask = torch.ones(2, neurons, dtype=torch.bool)
    mask[1, -3:] = False
    identity[1, -3:] = 0.0
    values = torch.randn(2, neurons, steps * config.window_size)

    def run():
        with torch.no_grad():
            out = model(input_ids=ids, neuron_identity=identity, neuron_mask=mask, value_inputs=values,
                        use_cache=False, logits_to_keep=1)
        return out.logits, out.value_predictions, out.value_quantiles

    whole = run()
    assert modeling.inference_neuron_chunk(config, 2, neurons, steps) is None
    calls = layer_chunks_taken(monkeypatch)
    monkeypatch.setattr(modeling, "INFERENCE_CHUNK_BYTES", 1)  # one neuron per chunk (whole attention groups)
    chunked = run()
    assert calls and set(calls) == {1}
    for a, b in zip(whole, chunked):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # training and cached decoding never take the chunked path
    calls.clear()
    with torch.no_grad():
        model(input_ids=ids, neuron_identity=identity, neuron_mask=mask, use_cache=True)
    model.train()(input_ids=ids, neuron_identity=identity, neuron_mask=mask)
    assert not calls


def test_neuron_blocks_benchmark_chooses_on_validation_and_writes_its_table():
    from benchmark_scripts import load_benchmark

    blocks = load_benchmark("neuron_blocks.py")
    rows = []
    for split, shift in (("validation", 0.0), ("test", 0.5)):  # test numbers must not move the choice
        for block, r in ((None, 0.30), (128, 0.30), (64, 0.299), (32, 0.28)):
            rows.append({"set": "sim_out", "session": "s", "neurons": 1000, "k": "0", "split": split, "block": block,
                         "pearson_r": r - shift * (block == 64), "mse": 0.5, "coverage_90": 0.9, "crps": 0.3,
                         "seconds": 1.0})
    choice = blocks.choose_block(rows, [128, 64, 32], trained_neurons=64)
    assert choice["block"] == 64  # 128 is wider than a training example, 32 loses 0.02 r on validation
    assert not choice["blocks"]["32"]["acceptable"] and choice["blocks"]["64"]["acceptable"]
    assert blocks.choose_block(rows, [128, 64, 32], trained_neurons=16)["block"] is None
    table = blocks.markdown({"rows": rows, "choice": choice, "meta": {"command": "neuron_blocks.py", "commit": "x",
                                                                     "date": "today", "seconds": 60.0}})
    assert "| sim_out | 1000 | 0 | 0.300 / 0.500 / 0.90 | 0.300 / 0.500 / 0.90 | 0.299 / 0.500 / 0.90 |" in table
    assert "Chosen: **64**" in table


def test_a_set_context_length_reads_only_the_most_recent_steps():
    forecaster = make_forecaster(context_token_steps=3)
    window = forecaster.window_size
    context = torch.randn(2, 5, 10 * window)
    recent = context[..., -3 * window :]
    for mode in ("direct", "greedy"):
        got, expected = forecaster.forecast(context, horizon=8, mode=mode), forecaster.forecast(recent, horizon=8,
                                                                                                  mode=mode)
        np.testing.assert_allclose(got.forecast, expected.forecast, rtol=1e-6, atol=1e-6)
    forecaster.model.config.context_token_steps = None  # all that fit: the older steps change the forecast
    assert not np.allclose(forecaster.forecast(context, horizon=8).forecast, forecaster.forecast(recent, horizon=8).forecast)
    with pytest.raises(ValueError, match="context_token_steps must be"):
        CalmConfig.from_preset("tiny", context_token_steps=forecaster.model.config.max_token_steps)


def test_streaming_restarts_at_the_set_context_length():
    forecaster = make_forecaster(context_token_steps=4)
    window = forecaster.window_size
    total = window * 11 + 1
    frames = torch.randn(5, total)
    stream = CalmStreamingForecaster(forecaster, 5)
    assert (stream.max_steps, stream.restart_steps) == (4, 2)
    # just before and after the first restart (at 4 windows), and the end of the stream
    checked = {4 * window - 1, 5 * window - 1, 5 * window + 1, total - 1}
    assert stream_and_compare(forecaster, frames, checked) == len(checked)


def test_inverse_cdf_sampling_draws_each_code_with_its_probability():
    from calm_hf.generation_calm import inverse_cdf_codes

    probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2, 0.0], [1.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    generator = torch.Generator().manual_seed(0)
    draws = 200_000
    codes = inverse_cdf_codes(probs[:, None].expand(-1, draws, -1), torch.rand(2, draws, generator=generator))
    frequencies = torch.stack([torch.bincount(row, minlength=6) for row in codes]).double() / draws
    torch.testing.assert_close(frequencies, probs.double(), atol=5e-3, rtol=0)
    # the ends of [0, 1) never reach a code of zero probability
    edges = torch.tensor([[0.0, 1.0 - 2**-24], [0.0, 1.0 - 2**-24]])
    assert inverse_cdf_codes(probs[:, None].expand(-1, 2, -1), edges).tolist() == [[1, 4], [0, 0]]


def test_the_layer_chunking_follows_the_forecasters_memory_budget(monkeypatch):
    roomy = make_forecaster(max_memory_gib=2.0)
    tight = CalmForecaster(roomy.model, roomy.tokenizer, max_memory_gib=1e-6)  # a few KiB: chunks of one neuron
    chunks = layer_chunks_taken(monkeypatch)
    context = torch.randn(1, 7, 24)
    expected = roomy.forecast(context, horizon=8)
    assert not chunks  # the roomy budget holds the whole grid
    got = tight.forecast(context, horizon=8)
    assert chunks and max(chunks) == 1
    np.testing.assert_allclose(got.forecast, expected.forecast, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got.quantiles, expected.quantiles, rtol=1e-5, atol=1e-5)
    assert roomy.model.base_model.inference_chunk_bytes is None  # restored after the call


def test_context_length_benchmark_chooses_on_validation_and_writes_its_table():
    from benchmark_scripts import load_benchmark

    bench = load_benchmark("context_length.py")
    rows = []
    for split, shift in (("validation", 0.0), ("test", 0.5)):  # test numbers must not move the choice
        for steps, r in ((4, 0.298), (8, 0.300), (16, 0.296), (51, 0.28)):
            for k in ("0", "16"):
                rows.append({"set": "sim_in", "session": "s", "neurons": 40, "k": k, "split": split, "steps": steps,
                             "pearson_r": r + shift * (steps == 51), "mse": 0.5, "coverage_90": 0.9, "crps": 0.3,
                             "seconds": 1.0})
    choice = bench.choose_steps(rows)
    assert choice["steps"] == 4  # within TIE_R of the best (8) and the shortest; 16 and 51 are not ties
    rows = [{**row, "pearson_r": row["pearson_r"] - 0.01 * (row["steps"] == 4)} for row in rows]
    assert bench.choose_steps(rows)["steps"] == 8  # 4 now loses more than the tie allows
    table = bench.markdown({"rows": rows, "choice": bench.choose_steps(rows),
                            "meta": {"command": "context_length.py", "commit": "x", "date": "today", "seconds": 60.0,
                                     "trial_seconds": 56.0, "horizon": 50}})
    assert "| sim_in | 40 | 0 | 0.288 / 0.500 / 0.90 | 0.300 / 0.500 / 0.90 |" in table
    assert "Chosen: **8 steps**" in table


@pytest.mark.parametrize("keys", [1, 3, 16])
def test_decode_step_attention_equals_sdpa_on_strided_caches(keys):
    import torch.nn.functional as F

    from calm_hf.modeling_calm import decode_step_attention

    generator = torch.Generator().manual_seed(keys)
    query = torch.randn(50, 4, 1, 8, generator=generator)
    buffers = torch.randn(2, 50, 4, 20, 8, generator=generator)  # a cache buffer with room for 20 steps
    key, value = buffers[0, :, :, :keys], buffers[1, :, :, :keys]  # views of its first steps, as a cache hands them
    expected = F.scaled_dot_product_attention(query, key, value, scale=0.3).transpose(1, 2)
    torch.testing.assert_close(decode_step_attention(query, key, value, 0.3), expected, rtol=1e-5, atol=1e-6)


def test_a_fixed_cache_gives_the_dynamic_caches_steps_and_refuses_to_overflow():
    from transformers.cache_utils import Cache

    from calm_hf import modeling_calm
    from calm_hf.generation_calm import CalmFixedCacheLayer

    model = make_forecaster().model
    codes = torch.randint(0, model.config.vocab_size, (1, 6, 4))
    layers = model.config.num_hidden_layers
    with torch.no_grad():
        reference = model(input_ids=codes, use_cache=False).logits
        for cache in (None, Cache(layers=[CalmFixedCacheLayer(4) for _ in range(layers)])):
            first = model(input_ids=codes[..., :2], cache=cache, use_cache=True)
            steps = [first.logits]
            for step in (2, 3):
                steps.append(model(input_ids=codes[..., step : step + 1], cache=first.cache, use_cache=True).logits)
            torch.testing.assert_close(torch.cat(steps, dim=2), reference, rtol=1e-5, atol=1e-5)
        assert first.cache.layers[0].keys.shape[2] == 4
        with pytest.raises(ValueError, match="holds 4 steps; 5 were asked for"):
            model(input_ids=codes[..., :1], cache=first.cache, use_cache=True)
    assert modeling_calm.DECODE_STEP_MAX_KEYS >= 4  # the steps above took the decode path


def test_streaming_takes_the_decode_step_path_and_a_fixed_cache(monkeypatch):
    from calm_hf import modeling_calm, modeling_calm_tokenizer
    from calm_hf.generation_calm import CalmFixedCacheLayer

    calls = {"model": 0, "tokenizer": 0}
    for name, module in (("model", modeling_calm), ("tokenizer", modeling_calm_tokenizer)):
        original = module.decode_step_attention

        def counted(*args, name=name, original=original):
            calls[name] += 1
            return original(*args)

        monkeypatch.setattr(module, "decode_step_attention", counted)
    forecaster = make_forecaster()
    stream = CalmStreamingForecaster(forecaster, 5)
    frames = torch.randn(5, 3 * forecaster.window_size)
    for frame in frames.T:
        stream.update(frame)
    assert isinstance(stream.cache.layers[0], CalmFixedCacheLayer)
    assert calls["model"] > 0 and calls["tokenizer"] > 0


def test_pipeline_batching_benchmark_writes_its_table(checkpoint, tmp_path):
    """benchmarks/pipeline_batching.py at a tiny size: both ways timed, the same forecasts, a markdown table."""
    from benchmark_scripts import load_benchmark

    result = load_benchmark("pipeline_batching.py").main([
        "--model", str(checkpoint), "--recordings", "3", "--neurons", "6", "4", "--seconds", "12", "--horizon", "4",
        "--repeats", "1", "--out", str(tmp_path / "batching")])
    assert set(result["median_seconds"]) == {"batched", "one_by_one"} and result["speedup"] > 0
    assert result["max_abs_forecast_difference"] < 1e-4
    assert "| one list (one batch per size) |" in (tmp_path / "batching.md").read_text()


def test_history_identity_benchmark_scores_both_settings(checkpoint, tmp_path, monkeypatch):
    """benchmarks/history_identity.py on small stand-in recordings (one continuous, one of concatenated trials): both
    settings scored at every cut, the choice logged, a table; a missing recording is skipped with its reason."""
    from benchmark_scripts import load_benchmark

    rng = np.random.default_rng(0)
    (tmp_path / "triplett2018_zf_tectum_spont").mkdir()
    np.savez(tmp_path / "triplett2018_zf_tectum_spont" / "zf_20151104-f1.npz",
             traces=rng.standard_normal((5, 700)).astype(np.float32), fs=np.float64(2.2))
    (tmp_path / "park2024_v1_gratings_behavior").mkdir()
    np.savez(tmp_path / "park2024_v1_gratings_behavior" / "230804_mrcuts27_fov3_grat-000.npz",
             traces=rng.standard_normal((4, 40 * 24)).astype(np.float32), fs=np.float64(16.0),
             trial_starts=np.arange(0, 40 * 24, 24))
    monkeypatch.setenv("CALM_DATA_DIR", str(tmp_path))
    result = load_benchmark("history_identity.py").main([
        "--model", str(checkpoint), "--every", "120", "--out", str(tmp_path / "history")])
    zebrafish, park = result["recordings"]["zebrafish zf_20151104-f1"], result["recordings"]["park mrcuts27"]
    assert zebrafish["cuts"] == len(range(350, 700 - 18 + 1, 264)) and zebrafish["horizon_frames"] == 18
    assert park["cuts"] == 20 and park["horizon_frames"] == 8
    for row in (zebrafish, park):
        assert sum(row["chosen"].values()) == row["cuts"]  # one choice per forecast with the choice on
        assert np.isfinite([row["choose"]["pearson_r"], row["full"]["mse"], row["gain"]["pearson_r"]]).all()
    assert "park mrcuts28" in result["skipped"]
    assert "| zebrafish zf_20151104-f1 | 5 |" in (tmp_path / "history.md").read_text()


@pytest.mark.parametrize("choose", ["true", "false"])
def test_calm_forecast_chooses_the_identity_on_the_recordings_past_unless_told_not_to(tmp_path, monkeypatch, choose):
    """`calm forecast` (and `--stream` on a long enough baseline) runs the identity choice on chunks of the recording
    before the context; `--choose_identity false` reads the whole identity."""
    from calm_hf.checkpoint import complete_checkpoint
    from calm_hf.commands.forecast import run
    from calm_hf.forecasting import CalmForecaster

    checkpoint = tmp_path / "calm-short-context"  # a context the 20 s chunks can hold, as calm-base's
    made = make_forecaster(context_token_steps=4)
    made.model.save_pretrained(checkpoint)
    complete_checkpoint(checkpoint, tokenizer=made.tokenizer)

    chosen = []
    real = CalmForecaster.reference_identity

    def spy(self, reference, context_frames, horizon=None):
        identity, info = real(self, reference, context_frames, horizon)
        chosen.append(info["chosen"])
        return identity, info

    monkeypatch.setattr(CalmForecaster, "reference_identity", spy)
    traces = np.random.default_rng(2).standard_normal((4, 1200)).cumsum(-1).astype(np.float32)  # 240 s at 5 Hz
    path = tmp_path / "rec.npz"
    np.savez(path, traces=traces, fs=np.float64(5.0))
    run(["--model", str(checkpoint), "--traces", str(path), "--horizon", "6", "--choose_identity", choose,
         "--output", str(tmp_path / "out.npz")])
    run(["--model", str(checkpoint), "--traces", str(path), "--horizon", "6", "--stream",
         "--speed", "100000", "--baseline_seconds", "100", "--choose_identity", choose,
         "--output", str(tmp_path / "stream.npz")])
    assert len(chosen) == 2  # once for the forecast, once for the stream's baseline
    assert (chosen == [None, None]) == (choose == "false")
    from transformers import pipeline

    pipe = pipeline("neural-forecasting", model=str(checkpoint), choose_identity=choose == "true")
    assert pipe.forecaster.choose_identity == (choose == "true")
