"""The trace processor and the neural-forecasting pipeline on what people have: any rate (forecast aligned with the
truth within one input frame), whole recordings, batches, NaN gaps, tiny or huge units, constant neurons, chosen
quantiles, identity borrowing, and loading without calm_hf."""

import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
from transformers import pipeline

from calm_hf import CalmConfig, CalmForCausalNeuralModeling, CalmTokenizer, CalmTokenizerConfig, CalmTraceProcessor
from calm_hf.checkpoint import complete_checkpoint
from calm_hf.forecasting import ForecastResult

BLOCK_CALM_HF = 'import sys; sys.modules["calm_hf"] = None  # a Python without calm_hf\n'
RATES = (30.0, 16.0, 7.5, 2.2)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny untrained table-identity checkpoint with two named sessions (12 and 8 neurons), saved complete (the
    data-identity pipeline: tests/test_pipeline_data_identity.py)."""
    folder = tmp_path_factory.mktemp("ckpt") / "calm-tiny"
    torch.manual_seed(0)
    tokenizer = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny", codebook_size=16)).eval()
    model = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", hidden_dropout=0.0, num_sessions=2,
                                                               num_neurons=20, neuron_identity="table",
                                                               quantile_levels=None)).eval()
    model.config.session_names = ["s0", "s1"]
    model.config.session_neuron_ranges = [[0, 12], [12, 20]]
    model.save_pretrained(folder)
    complete_checkpoint(folder, tokenizer=tokenizer)
    return folder


@pytest.fixture(scope="module")
def forecaster(checkpoint):
    return pipeline("neural-forecasting", model=str(checkpoint))


def ramp_stand_in(values, horizon, **kwargs):
    """A perfect forecaster for ramps: continue each z-scored model-rate context along its last step."""
    values = np.asarray(values, dtype=np.float64)
    step = values[..., -1] - values[..., -2]
    future = values[..., -1:] + step[..., None] * np.arange(1, horizon + 1)
    num = kwargs.get("num_samples", 1)
    samples = np.repeat(future[:, None], num, axis=1) if num > 1 else None
    return ForecastResult(forecast=future, samples=samples, codes=np.zeros((1,)))


def ramp(neurons, frames, fs, scale=1.0):
    t = np.arange(frames) / fs
    slopes = np.linspace(0.5, 2.0, neurons)[:, None]
    return scale * (10.0 + slopes * t[None])


@pytest.mark.parametrize("fs", RATES)
def test_processor_alignment_and_inverse(fs):
    processor = CalmTraceProcessor(sampling_rate=5.0, window_size=4)
    frames, horizon = 241 if fs > 5 else 97, 37  # neither a multiple of the rate ratio
    truth = ramp(3, frames + horizon + 1, fs)
    features = processor(truth[:, :frames], sampling_rate=fs)
    assert features["input_values"].shape[-1] % 4 == 0
    future = ramp_stand_in(features["input_values"], processor.model_horizon(horizon, fs)).forecast
    out = processor.postprocess_forecast(future, features, horizon)[0]
    slope_per_frame = np.linspace(0.5, 2.0, 3)[:, None] / fs
    assert np.all(np.abs(out - truth[:, frames : frames + horizon]) <= slope_per_frame)  # within one input frame
    # a half-frame shift would already fail: the check can fail
    assert not np.all(np.abs(out - truth[:, frames + 1 : frames + horizon + 1]) <= 0.5 * slope_per_frame)
    back = processor.inverse(features["input_values"], features)[0]
    np.testing.assert_allclose(back, truth[:, frames - back.shape[-1] : frames], rtol=1e-5)


def test_processor_exact_inverse_with_ema_and_save_load(tmp_path):
    processor = CalmTraceProcessor(sampling_rate=5.0, window_size=4, ema_alpha=0.15)
    traces = np.random.default_rng(0).standard_normal((4, 42)) * 7 + 3
    features = processor(traces)  # same rate: resampling is the identity, so the inverse is exact
    np.testing.assert_allclose(processor.inverse(features["input_values"], features)[0], traces[:, 2:], atol=1e-4)
    processor.save_pretrained(tmp_path)
    from transformers import AutoFeatureExtractor

    loaded = AutoFeatureExtractor.from_pretrained(tmp_path)
    assert isinstance(loaded, CalmTraceProcessor) and loaded.to_dict() == processor.to_dict()


def test_the_hub_task_name_is_the_same_pipeline(forecaster, checkpoint):
    """The model card's pipeline_tag, `time-series-forecasting`, names the same pipeline as `neural-forecasting`."""
    alias = pipeline("time-series-forecasting", model=str(checkpoint))
    assert type(alias) is type(forecaster)
    traces = np.random.default_rng(3).standard_normal((12, 77))
    np.testing.assert_array_equal(alias(traces, sampling_rate=7.5, horizon=11, session="s0")["forecast"],
                                  forecaster(traces, sampling_rate=7.5, horizon=11, session="s0")["forecast"])


def test_processor_loads_from_a_checkpoint_with_auto_classes(checkpoint):
    from transformers import AutoFeatureExtractor, AutoProcessor

    for auto in (AutoFeatureExtractor, AutoProcessor):  # registered: no remote-code prompt with calm_hf installed
        assert isinstance(auto.from_pretrained(checkpoint), CalmTraceProcessor)


@pytest.mark.parametrize("fs", RATES)
def test_pipeline_forecast_lines_up_with_truth(forecaster, monkeypatch, fs):
    monkeypatch.setattr(forecaster.forecaster, "forecast", ramp_stand_in)
    frames, horizon = (241, 37) if fs > 5 else (61, 9)
    truth = ramp(12, frames + horizon, fs, scale=3.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = forecaster(truth[:, :frames], sampling_rate=fs, horizon=horizon, session="s0")
    slope_per_frame = 3.0 * np.linspace(0.5, 2.0, 12)[:, None] / fs
    assert out["forecast"].shape == (12, horizon)
    assert np.all(np.abs(out["forecast"] - truth[:, frames:]) <= slope_per_frame)


def test_whole_recording_is_cropped_with_a_warning_in_frames_and_seconds(forecaster):
    traces = np.random.default_rng(1).standard_normal((12, 3000)) + 5
    with pytest.warns(UserWarning, match=r"3000 frames \(100.0 s at 30 Hz\).*most recent \d+ frames"):
        out = forecaster(traces, sampling_rate=30.0, horizon=30, session="s0")
    assert out["forecast"].shape == (12, 30) and out["context_frames"] < 3000
    with pytest.raises(ValueError, match=r"horizon=1000 frames \(33.3333 s at 30 Hz\).*at most \d+ frames"):
        forecaster(traces, sampling_rate=30.0, horizon=1000, session="s0")


def test_batch_size_lists_and_quantiles(forecaster):
    rng = np.random.default_rng(2)
    batch = rng.standard_normal((5, 12, 40)) * 2 + 1
    full = forecaster(batch, horizon=8, session="s0")
    chunked = forecaster(batch, horizon=8, session="s0", batch_size=2)
    assert len(chunked) == 5
    for a, b in zip(full, chunked):
        np.testing.assert_allclose(a["forecast"], b["forecast"], atol=1e-5)
    listed = forecaster([batch[0], batch[1]], horizon=8, session="s0", batch_size=1)
    np.testing.assert_allclose(listed[1]["forecast"], full[1]["forecast"], atol=1e-5)
    torch.manual_seed(0)
    sampled = forecaster(batch[0], horizon=8, session="s0", num_samples=6, quantiles=[0.1, 0.9])
    assert set(sampled["quantiles"]) == {0.1, 0.9} and sampled["samples"].shape == (6, 12, 8)
    np.testing.assert_allclose(sampled["mean"], sampled["samples"].mean(axis=0), atol=1e-5)
    np.testing.assert_allclose(sampled["forecast"], sampled["mean"], atol=1e-4)
    with pytest.raises(ValueError, match="quantiles must be levels in"):
        forecaster(batch[0], horizon=8, session="s0", num_samples=2, quantiles=[1.5])


def test_a_list_of_recordings_of_different_sizes_is_forecast_one_batch_per_size(forecaster, monkeypatch):
    rng = np.random.default_rng(3)
    recordings = [rng.standard_normal((12, frames)) * 2 + 1 for frames in (40, 48, 40, 48, 44)]
    alone = [forecaster(recording, horizon=8, session="s0") for recording in recordings]
    calls = []
    forecast = forecaster.forecaster.forecast

    def counted(context, *args, **kwargs):
        calls.append(tuple(context.shape))
        return forecast(context, *args, **kwargs)

    monkeypatch.setattr(forecaster.forecaster, "forecast", counted)
    listed = forecaster(recordings, horizon=8, session="s0")
    assert sorted(call[0] for call in calls) == [1, 2, 2]  # one model call per size, not one per recording
    assert len(listed) == len(recordings)
    for one, batched in zip(alone, listed):  # in the order given, as forecast alone
        np.testing.assert_allclose(batched["forecast"], one["forecast"], atol=1e-5)


def test_nan_frames_are_interpolated_with_a_warning(forecaster, monkeypatch):
    monkeypatch.setattr(forecaster.forecaster, "forecast", ramp_stand_in)
    truth = ramp(12, 50, 5.0)
    holed = truth[:, :40].copy()
    holed[3, 10:13] = np.nan
    holed[5, 0] = np.nan
    with pytest.warns(UserWarning, match="4 NaN value"):
        out = forecaster(holed, horizon=10, session="s0")
    np.testing.assert_allclose(out["forecast"], truth[:, 40:], rtol=1e-4)
    holed[7] = np.nan
    with pytest.raises(ValueError, match="neuron 7 .* NaN in every frame"):
        forecaster(holed, horizon=10, session="s0")


def test_scale_free_and_constant_neurons(forecaster, monkeypatch):
    monkeypatch.setattr(forecaster.forecaster, "forecast", ramp_stand_in)
    truth = ramp(12, 50, 5.0, scale=5e-29)
    out = forecaster(truth[:, :40], horizon=10, session="s0")
    assert np.all(np.abs(out["forecast"] - truth[:, 40:]) <= 5e-29 * np.linspace(0.5, 2.0, 12)[:, None] / 5.0)
    constant = ramp(12, 40, 5.0)
    constant[4] = 7.0
    out = forecaster(constant, horizon=10, session="s0")
    np.testing.assert_allclose(out["forecast"][4], 7.0, rtol=1e-6)  # only centred: stays at its value
    with pytest.raises(ValueError, match="every neuron is constant"):
        forecaster(np.full((12, 40), 3.0), horizon=10, session="s0")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mean=np.zeros(12)), "mean and std together"),
        (dict(std=np.ones(12)), "mean and std together"),
        (dict(mean=np.zeros(12), std=-np.ones(12)), "std must be positive"),
        (dict(mean=np.zeros(11), std=np.ones(11)), r"mean must have shape \(12,\)"),
        (dict(mean=np.zeros(12), std=np.ones((2, 3))), r"std must have shape \(12,\)"),
        (dict(num_samples=0), "num_samples must be a whole number >= 1"),
        (dict(num_samples=-1), "num_samples must be a whole number >= 1"),
        (dict(num_samples=2.5), "num_samples must be a whole number >= 1"),
        (dict(horizon=0), "horizon must be a whole number >= 1"),
        (dict(batch_size=0), "batch_size must be a whole number >= 1"),
        (dict(session=3), "unknown session id 3"),
        (dict(session="nope"), "unknown session 'nope'.*calm adapt"),
    ],
)
def test_bad_pipeline_inputs(forecaster, kwargs, message):
    traces = np.random.default_rng(3).standard_normal((12, 40))
    call = dict(horizon=5, session="s0") | kwargs
    with pytest.raises(ValueError, match=message):
        forecaster(traces, **call)


def test_huge_values_and_session_without_range(forecaster, checkpoint):
    with pytest.raises(ValueError, match="too large for float32 forecasts"):
        forecaster(np.full((12, 40), 1e38) * np.linspace(1, 2, 40), horizon=5, session="s0")
    with pytest.raises(ValueError, match="Inf"):
        forecaster(np.full((12, 40), np.inf), horizon=5, session="s0")
    model = forecaster.model
    ranges = model.config.session_neuron_ranges
    model.config.session_neuron_ranges = [[0, 12]]  # session 1 without a range
    try:
        with pytest.raises(ValueError, match="session 1 has no neuron range.*neuron_ids"):
            forecaster(np.random.default_rng(4).standard_normal((8, 40)), horizon=5, session=1)
        out = forecaster(np.random.default_rng(4).standard_normal((8, 40)), horizon=5, session=1,
                         neuron_ids=np.arange(12, 20))
        assert out["forecast"].shape == (8, 5)
    finally:
        model.config.session_neuron_ranges = ranges


def test_borrowed_identity_warning(forecaster):
    with pytest.warns(UserWarning, match=r"borrows the identity .* session 's1'.*calm adapt"):
        forecaster(np.random.default_rng(5).standard_normal((8, 40)), horizon=5)


@pytest.mark.slow
def test_pipeline_loads_without_calm_hf(checkpoint):
    script = BLOCK_CALM_HF + textwrap.dedent(
        f"""
        import warnings, numpy as np
        from transformers import pipeline, AutoFeatureExtractor
        for task in ("time-series-forecasting", "neural-forecasting"):  # the Hub's tag and the pipeline's own name
            forecaster = pipeline(task, model={str(checkpoint)!r}, trust_remote_code=True)
            assert type(forecaster).__module__.startswith("transformers_modules"), type(forecaster).__module__
        out = forecaster(np.random.randn(12, 77), sampling_rate=7.5, horizon=11, session="s0", num_samples=3)
        processor = AutoFeatureExtractor.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        print("OK", out["forecast"].shape, out["samples"].shape, type(processor).__name__)
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "OK (12, 11) (3, 12, 11) CalmTraceProcessor" in result.stdout


def test_forecaster_forecast_traces_matches_the_pipeline(forecaster):
    traces = np.random.default_rng(6).standard_normal((12, 77)) * 4 + 20
    out = forecaster(traces, sampling_rate=7.5, horizon=11, session="s0")
    direct = forecaster.forecaster.forecast_traces(
        traces, horizon=11, processor=forecaster.trace_processor, sampling_rate=7.5,
        neuron_ids=torch.arange(12)[None], session_ids=torch.zeros(1, dtype=torch.long),
    )
    np.testing.assert_allclose(direct["forecast"][0], out["forecast"], rtol=1e-5, atol=1e-5)


def test_pipeline_keeps_tensors_until_postprocess(forecaster, monkeypatch):
    """The pipeline hands the forecaster torch tensors (moved to the model's device by `Pipeline.forward`) and asks for
    tensors back; numpy appears only in postprocess. Torch traces are accepted as input too."""
    calls = []
    original = forecaster.forecaster.forecast

    def recording(values, **kwargs):
        calls.append((type(values), values.device, kwargs.get("return_tensors")))
        result = original(values, **kwargs)
        assert isinstance(result.forecast, torch.Tensor)
        return result

    monkeypatch.setattr(forecaster.forecaster, "forecast", recording)
    traces = torch.randn(12, 40)
    out = forecaster(traces, horizon=8, session="s0", num_samples=2)
    assert calls == [(torch.Tensor, forecaster.model.device, True)]
    assert isinstance(out["forecast"], np.ndarray) and out["forecast"].shape == (12, 8)
    assert out["samples"].shape == (2, 12, 8) and np.isfinite(out["forecast"]).all()
    np.testing.assert_allclose(forecaster(traces.numpy(), horizon=8, session="s0")["forecast"],
                               forecaster(traces, horizon=8, session="s0")["forecast"], rtol=1e-6)

