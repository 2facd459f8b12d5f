"""The `"neural-forecasting"` pipeline: raw traces in, forecasts in the same units and rate out.

    from transformers import pipeline
    import calm_hf  # registers the task
    forecaster = pipeline("neural-forecasting", model="calm-base")
    out = forecaster(traces, sampling_rate=30.0, horizon=90, num_samples=20)   # traces: (neurons, frames)
    out["forecast"]          # (neurons, 90) in the units of `traces`
    out["quantiles"][0.05]   # lower band of the sampled futures

Steps: check -> resample to the model rate -> z-score each neuron with its context statistics (or the statistics
you pass) -> tokenize (the oldest frames are dropped to a multiple of the token window) -> roll out -> decode ->
undo the z-score -> resample back to the input rate.
"""

from __future__ import annotations

import os

import numpy as np
import torch
from transformers import Pipeline
from transformers.utils import logging

from .forecasting import CalmForecaster

logger = logging.get_logger(__name__)

DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


def _resample(traces: np.ndarray, fs_in: float, fs_out: float) -> np.ndarray:
    from .data.preprocessing import resample

    return resample(traces, fs_in, fs_out, axis=-1)


def _load_neural_tokenizer(model):
    """The CalmTokenizer saved in the checkpoint's `tokenizer/` subfolder."""
    from .modeling_calm_tokenizer import CalmTokenizer

    source = getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None)
    if not source:
        raise ValueError(
            "the model was not loaded from a folder, so its tokenizer cannot be found: pass "
            "neural_tokenizer=CalmTokenizer.from_pretrained(...) to pipeline()."
        )
    if os.path.isdir(source):
        return CalmTokenizer.from_pretrained(os.path.join(source, "tokenizer"))
    return CalmTokenizer.from_pretrained(source, subfolder="tokenizer")


class NeuralForecastingPipeline(Pipeline):
    """Forecast calcium traces with a CalM checkpoint.

    Call arguments:
        traces (`np.ndarray` of shape `(neurons, frames)` or `(batch, neurons, frames)`): context in the user's units.
        sampling_rate (`float`, *optional*): frame rate of `traces` in Hz; defaults to the model's rate.
        horizon (`int`): frames to forecast, at `sampling_rate`.
        num_samples (`int`, defaults to 1): 1 = one greedy rollout; more = sampled futures, returned with their mean
            and quantile bands.
        temperature, top_k, top_p: sampling controls when `num_samples > 1`.
        mode (`str`, *optional*): force `greedy`, `sample`, `mean` or `soft` rollouts.
        session (`str` or `int`, *optional*): the recording session whose learned identity to use; required when the
            model knows several sessions with different neuron counts.
        neuron_ids (`array`, *optional*): global neuron ids, (neurons,); default: the session's neurons in order.
        mean, std (`array` of shape `(neurons,)`, *optional*): z-score statistics in the input units (e.g. from
            training trials); by default each neuron's context mean and standard deviation.

    Returns a dict (a list of dicts for a batch): `forecast` (neurons, horizon), `samples` (num_samples, neurons,
    horizon) or None, `quantiles` {q: (neurons, horizon)} or None, `sampling_rate`.
    """

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, neural_tokenizer=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.neural_tokenizer = neural_tokenizer if neural_tokenizer is not None else _load_neural_tokenizer(self.model)
        self.neural_tokenizer.to(self.model.device)
        self.forecaster = CalmForecaster(self.model, self.neural_tokenizer)

    def _sanitize_parameters(
        self,
        sampling_rate=None,
        horizon=None,
        num_samples=None,
        temperature=None,
        top_k=None,
        top_p=None,
        mode=None,
        session=None,
        neuron_ids=None,
        mean=None,
        std=None,
        quantiles=None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(f"unknown arguments {sorted(kwargs)} for the neural-forecasting pipeline.")
        preprocess = {
            k: v
            for k, v in dict(
                sampling_rate=sampling_rate, horizon=horizon, session=session, neuron_ids=neuron_ids, mean=mean, std=std
            ).items()
            if v is not None
        }
        forward = {
            k: v
            for k, v in dict(num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p, mode=mode).items()
            if v is not None
        }
        postprocess = {"quantiles": quantiles} if quantiles is not None else {}
        return preprocess, forward, postprocess

    def _resolve_session(self, session, num_neurons: int, neuron_ids):
        config = self.model.config
        names = list(config.session_names or [])
        ranges = list(config.session_neuron_ranges or [])
        if session is None:
            if len(names) > 1:
                matching = [i for i, (a, b) in enumerate(ranges) if b - a == num_neurons]
                session_id = matching[0] if matching else 0
                logger.warning_once(
                    f"no session given; using the identity embeddings of session {names[session_id]!r} "
                    f"(known sessions: {names}). Pass session=... to choose, or adapt a new session with "
                    "training/adapt_session.py."
                )
            else:
                session_id = 0
        elif isinstance(session, str):
            if session not in names:
                raise ValueError(
                    f"unknown session {session!r}; this model knows {names}. Add it with "
                    "model.add_session(name, num_neurons) and train its embeddings with training/adapt_session.py."
                )
            session_id = names.index(session)
        else:
            session_id = int(session)
            if not 0 <= session_id < config.num_sessions:
                raise ValueError(
                    f"unknown session id {session_id}; the model has {config.num_sessions} sessions (0.."
                    f"{config.num_sessions - 1}). Add one with model.add_session(...)."
                )
        if neuron_ids is None:
            if ranges:
                start, stop = ranges[session_id]
                if num_neurons > stop - start:
                    raise ValueError(
                        f"traces have {num_neurons} neurons but session {names[session_id]!r} has {stop - start}: "
                        "pass neuron_ids=..., or add a session of that size with model.add_session(name, "
                        f"{num_neurons}) and adapt it with training/adapt_session.py."
                    )
                neuron_ids = np.arange(start, start + num_neurons)
            else:
                neuron_ids = np.arange(num_neurons)
        neuron_ids = np.asarray(neuron_ids, dtype=np.int64)
        if neuron_ids.shape != (num_neurons,):
            raise ValueError(f"neuron_ids must have shape ({num_neurons},), got {neuron_ids.shape}.")
        if neuron_ids.max() >= config.num_neurons or neuron_ids.min() < 0:
            raise ValueError(
                f"neuron_ids must lie in [0, {config.num_neurons}) (the model's neuron table); grow it with "
                "model.add_session(...) or model.resize_neuron_embeddings(...)."
            )
        return session_id, neuron_ids

    def preprocess(self, traces, sampling_rate=None, horizon=None, session=None, neuron_ids=None, mean=None, std=None):
        values = np.asarray(traces, dtype=np.float64)
        if values.ndim == 2:
            values = values[None]
            single = True
        elif values.ndim == 3:
            single = False
        else:
            raise ValueError(
                f"traces must be (neurons, frames) or (batch, neurons, frames), got shape {values.shape}; "
                "for one neuron use x[None]."
            )
        if values.size == 0:
            raise ValueError("traces are empty: give at least one neuron and one token window of frames.")
        if not np.isfinite(values).all():
            b, n, t = np.argwhere(~np.isfinite(values))[0]
            raise ValueError(
                f"traces contain NaN/Inf (batch {b}, neuron {n}, frame {t}): interpolate the gap or drop that neuron."
            )
        if horizon is None or int(horizon) < 1:
            raise ValueError("pass horizon=<number of frames to forecast, at the input sampling rate> (>= 1).")
        model_rate = float(self.model.config.frame_rate_hz)
        fs = model_rate if sampling_rate is None else float(sampling_rate)
        if fs <= 0:
            raise ValueError(f"sampling_rate={sampling_rate} must be positive (Hz).")
        resampled = _resample(values, fs, model_rate) if fs != model_rate else values
        window = self.model.config.window_size
        if resampled.shape[-1] < window:
            raise ValueError(
                f"the context is {values.shape[-1]} frames at {fs} Hz = {resampled.shape[-1]} frames at the model rate "
                f"{model_rate} Hz, shorter than one token window ({window} frames): give at least "
                f"{int(np.ceil(window * fs / model_rate))} frames."
            )
        if mean is None or std is None:
            mean_ = resampled.mean(axis=-1, keepdims=True)
            std_ = resampled.std(axis=-1, keepdims=True)
        else:
            mean_ = np.broadcast_to(np.asarray(mean, dtype=np.float64)[..., :, None], resampled.shape[:-1] + (1,))
            std_ = np.broadcast_to(np.asarray(std, dtype=np.float64)[..., :, None], resampled.shape[:-1] + (1,))
        std_ = np.maximum(std_, 1e-6)
        session_id, ids = self._resolve_session(session, values.shape[1], neuron_ids)
        batch = values.shape[0]
        horizon_model = int(np.ceil(int(horizon) * model_rate / fs)) + (1 if fs != model_rate else 0)
        return {
            "values": torch.as_tensor((resampled - mean_) / std_, dtype=torch.float32),
            "neuron_ids": torch.as_tensor(np.broadcast_to(ids, (batch, ids.shape[0])).copy()),
            "session_ids": torch.full((batch,), session_id, dtype=torch.long),
            "mean": mean_,
            "std": std_,
            "fs": fs,
            "horizon": int(horizon),
            "horizon_model": horizon_model,
            "single": single,
        }

    def _forward(self, inputs, num_samples=1, temperature=1.0, top_k=None, top_p=None, mode=None):
        if mode is None:
            mode = "greedy" if num_samples == 1 else "mean"
        result = self.forecaster.forecast(
            inputs["values"],
            horizon=inputs["horizon_model"],
            neuron_ids=inputs["neuron_ids"],
            session_ids=inputs["session_ids"],
            mode=mode,
            num_samples=num_samples,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
        )
        return {"result": result, **{k: v for k, v in inputs.items() if k not in ("values",)}}

    def postprocess(self, outputs, quantiles=DEFAULT_QUANTILES):
        result = outputs["result"]
        std, mean = outputs["std"], outputs["mean"]  # (batch, neurons, 1)
        rate = float(self.model.config.frame_rate_hz)

        def to_units(z: np.ndarray) -> np.ndarray:  # (batch, [samples,] neurons, horizon_model)
            if z.ndim == 4:
                values = z * std[:, None] + mean[:, None]
            else:
                values = z * std + mean
            if outputs["fs"] != rate:
                values = _resample(values, rate, outputs["fs"])
            return values[..., : outputs["horizon"]].astype(np.float32)

        forecast = to_units(result.forecast)
        samples = to_units(result.samples) if result.samples is not None else None
        records = []
        for b in range(forecast.shape[0]):
            record = {"forecast": forecast[b], "samples": None, "quantiles": None, "sampling_rate": outputs["fs"]}
            if samples is not None:
                record["samples"] = samples[b]
                record["quantiles"] = {float(q): np.quantile(samples[b], q, axis=0).astype(np.float32) for q in quantiles}
            records.append(record)
        return records[0] if outputs["single"] else records
