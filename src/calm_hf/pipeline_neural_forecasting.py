"""The `"neural-forecasting"` pipeline: raw traces in, forecasts in the same units and rate out.

    from transformers import pipeline
    import calm_hf  # registers the task (or: pipeline(..., trust_remote_code=True) without calm_hf)
    forecaster = pipeline("neural-forecasting", model="calm-base")
    out = forecaster(traces, sampling_rate=30.0, horizon=90, num_samples=20)   # traces: (neurons, frames)
    out["forecast"]          # (neurons, 90) in the units of `traces`
    out["quantiles"][0.05]   # lower band of the sampled futures

Steps, all in the checkpoint's `CalmTraceProcessor`: check -> fill NaN gaps -> resample to the model rate (end of the
context aligned) -> z-score each neuron (context statistics, or the statistics you pass) -> keep the most recent
frames that fit the model -> roll out -> decode -> undo the z-score -> resample back to the input rate.

This file ships with checkpoints (`custom_pipelines` in `config.json`), so it imports only numpy, torch, transformers
and its siblings.
"""

from __future__ import annotations

import math
import os
import warnings

import numpy as np
import torch
from transformers import Pipeline

from .forecasting import DEFAULT_MAX_MEMORY_GIB, CalmForecaster, context_token_steps, default_forecast_mode
from .population_readout import READOUT_FILE, PopulationReadout
from .processing_calm import MAX_ABS_INPUT, CalmTraceProcessor


DEFAULT_QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)
REFERENCE_STEPS = 25  # a data-identity model reads the recording before the context in chunks of this many token steps


def history_chunks(history: np.ndarray, window: int, steps: int = REFERENCE_STEPS) -> np.ndarray | None:
    """The z-scored model-rate frames before the context `(neurons, frames)` cut into consecutive chunks of `steps`
    token windows, newest last: `(chunks, neurons, steps * window)`; one shorter chunk when the history is shorter
    than one chunk but at least two windows; None below that."""
    frames = history.shape[-1]
    length = steps * window
    if frames >= length:
        count = frames // length
        kept = history[..., frames - count * length:]
        return np.ascontiguousarray(kept.reshape(history.shape[0], count, length).transpose(1, 0, 2))
    usable = frames - frames % window
    return history[None, :, frames - usable:] if usable >= 2 * window else None


def quantiles_at(levels: tuple[float, ...], model_levels: tuple[float, ...], values: np.ndarray) -> dict:
    """`{level: (neurons, horizon)}` at the requested `levels` from quantiles `(levels_model, neurons, horizon)` at
    `model_levels`: linear interpolation between neighbouring model levels, the outermost ones beyond them."""
    return {level: mixed.astype(np.float32) for level, mixed in _levels_mixed(levels, model_levels, values).items()}


def _levels_mixed(levels: tuple[float, ...], model_levels: tuple[float, ...], values: np.ndarray) -> dict:
    """`quantiles_at` in the values' own dtype. The mix of two neighbouring levels commutes with every later map of
    the pipeline (per-neuron affine, linear resampling in time), so requested levels can be picked at the model rate."""
    grid = np.asarray(model_levels, dtype=np.float64)
    out = {}
    for level in levels:
        upper = int(np.clip(np.searchsorted(grid, level), 1, len(grid) - 1))
        lower = upper - 1
        weight = float(np.clip((level - grid[lower]) / (grid[upper] - grid[lower]), 0.0, 1.0))
        out[float(level)] = (1 - weight) * values[lower] + weight * values[upper]
    return out
PROCESSOR_FILE = "preprocessor_config.json"
# Inside the calm_hf package the Auto classes are registered; as remote code they come from the checkpoint.
_REMOTE = not __name__.startswith("calm_hf.")


def _same_value(value, alias, name: str, alias_name: str):
    """`value` or its `alias` (another library's name for the same argument); both given must agree."""
    if alias is None:
        return value
    if value is not None and not np.array_equal(np.asarray(value), np.asarray(alias)):
        raise ValueError(f"{name}={value!r} and {alias_name}={alias!r} are the same argument; pass one of them.")
    return alias


def _model_source(model) -> str | None:
    return getattr(model, "name_or_path", None) or getattr(model.config, "_name_or_path", None) or None


def _load_neural_tokenizer(model):
    """The CalmTokenizer saved in the checkpoint's `tokenizer/` subfolder."""
    from transformers import AutoModel

    source = _model_source(model)
    if not source:
        raise ValueError(
            "the model was not loaded from a folder, so its tokenizer cannot be found: pass "
            "neural_tokenizer=CalmTokenizer.from_pretrained(...) to pipeline()."
        )
    if os.path.isdir(source):
        return AutoModel.from_pretrained(os.path.join(source, "tokenizer"), trust_remote_code=_REMOTE)
    return AutoModel.from_pretrained(source, subfolder="tokenizer", trust_remote_code=_REMOTE)


def _load_population_readout(model) -> PopulationReadout | None:
    """The population readout `calm adapt` saved with the checkpoint (a folder, or a Hub repository), else None."""
    source = _model_source(model)
    if not source:
        return None
    if not os.path.isdir(source):
        from transformers.utils import cached_file

        path = cached_file(source, READOUT_FILE, _raise_exceptions_for_missing_entries=False,
                           _raise_exceptions_for_connection_errors=False)
        source = None if path is None else os.path.dirname(path)
    return PopulationReadout.load(source)


def _load_processor(model) -> CalmTraceProcessor:
    """The checkpoint's saved processor, or one matching the model config for checkpoints saved without it."""
    source = _model_source(model)
    if source and os.path.isdir(source) and os.path.isfile(os.path.join(source, PROCESSOR_FILE)):
        return CalmTraceProcessor.from_pretrained(source)
    if source and not os.path.isdir(source):
        try:
            return CalmTraceProcessor.from_pretrained(source)
        except OSError:  # an older checkpoint without preprocessor_config.json
            pass
    return CalmTraceProcessor.from_model_config(model.config)


def _host(values: torch.Tensor | np.ndarray) -> np.ndarray:
    """float32 numpy on the host from a model output (a tensor on any device) or an array."""
    if isinstance(values, torch.Tensor):
        return values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=np.float32)


def _check_count(value, name: str, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or int(value) < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}.")
    return int(value)


def fill_nan_frames(values: np.ndarray) -> tuple[np.ndarray, int]:
    """Linearly interpolate NaN frames of `(batch, neurons, frames)` per neuron along time (edges take the nearest
    valid value). Returns the filled array and the number of filled values; a neuron with no valid frame raises."""
    if not math.isnan(float(values.max())):  # no NaN anywhere (one pass, no copy)
        return values, 0
    missing = np.isnan(values)
    count = int(missing.sum())
    if not count:
        return values, 0
    filled = values.copy()
    frames = np.arange(values.shape[-1])
    for b, n in zip(*np.nonzero(missing.any(axis=-1))):
        good = ~missing[b, n]
        if not good.any():
            raise ValueError(f"neuron {n} (batch {b}) is NaN in every frame: drop it or give a context where it was recorded.")
        filled[b, n] = np.interp(frames, frames[good], values[b, n, good])
    return filled, count


class NeuralForecastingPipeline(Pipeline):
    """Forecast calcium traces with a CalM checkpoint.

    Call arguments:
        traces (`np.ndarray` of shape `(neurons, frames)` or `(batch, neurons, frames)`, or a list of such arrays):
            context in the user's units; a whole recording is fine (the most recent frames the model can hold are
            kept, with a warning). NaN frames are interpolated per neuron (with a warning); Inf is refused.
        sampling_rate (`float`, *optional*): frame rate of `traces` in Hz; defaults to the model's rate.
        horizon (`int`): frames to forecast, at `sampling_rate` (`prediction_length` is the same argument).
        num_samples (`int`, defaults to 1): 1 = one greedy rollout; more = sampled futures, returned with their mean
            and quantile bands.
        quantiles (`sequence of float`, *optional*): levels of the bands, each in (0, 1); default 5/25/50/75/95 %
            (`quantile_levels` is the same argument). `predict_quantiles` returns them as arrays, as Chronos does.
        batch_size (`int`, *optional*): recordings per model call (a 3-D input or a list is split into chunks).
        max_memory_gib (`float`, *optional*): working memory of the forecast in GiB, replacing the one given to
            `pipeline(..., max_memory_gib=...)` (default `DEFAULT_MAX_MEMORY_GIB`) for this call: recordings, sampled
            futures and the tokenizer's neurons are processed in chunks that fit it (see `CalmForecaster`).
        temperature, top_k, top_p: sampling controls when `num_samples > 1`.
        mode (`str`, *optional*): `direct` (default for models with a continuous head), or force `greedy`,
            `sample`, `mean` or `soft` token rollouts.
        session (`str` or `int`, *optional*): table-identity models only: the recording session whose learned
            identity to use. Without it a new recording borrows a known session's identity (a warning says which).
            A data-identity model (every preset's default) needs none: it reads each neuron's identity from the
            recording before the context (in chunks of 25 token steps), or from `reference`, as much of it as
            forecasts well on a split of those chunks or trials (`pipeline(..., choose_identity=False)` reads all of
            it; `CalmForecaster.reference_identity`).
        neuron_ids (`array`, *optional*): table-identity models only: global neuron ids, (neurons,).
        reference (`np.ndarray` of shape `(trials, neurons, frames)` or `(neurons, frames)`, *optional*): data-identity
            models: other trials of the same neurons, in the units and rate of `traces` (e.g. training trials); they
            replace the history before the context as the source of the neurons' identity.
        mean, std (`array` of shape `(neurons,)`, *optional*): z-score statistics in the input units (e.g. from
            training trials), both or neither; by default each neuron's context mean and standard deviation, with a
            std floor relative to the data's scale (constant neurons are only centred).

    Returns a dict (a list of dicts for a batch): `forecast` (neurons, horizon) -- the continuous head's conditional
    mean, the greedy rollout, or the mean of the samples --, `mean` (neurons, horizon) or None, `samples`
    (num_samples, neurons, horizon) or None, `quantiles` {q: (neurons, horizon)} (from the model's quantile head in
    the same pass, or from the samples) or None, `sampling_rate`, `context_frames` (input frames the model used).
    """

    _load_processor = False
    _load_image_processor = False
    _load_video_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, neural_tokenizer=None, trace_processor=None, max_memory_gib=DEFAULT_MAX_MEMORY_GIB,
                 choose_identity: bool = True, **kwargs):
        super().__init__(*args, **kwargs)
        self.neural_tokenizer = neural_tokenizer if neural_tokenizer is not None else _load_neural_tokenizer(self.model)
        self.neural_tokenizer.to(self.model.device)
        self.trace_processor = trace_processor if trace_processor is not None else _load_processor(self.model)
        self.forecaster = CalmForecaster(self.model, self.neural_tokenizer, max_memory_gib=max_memory_gib,
                                         choose_identity=choose_identity)
        self.forecaster.population_readout = _load_population_readout(self.model)

    def __call__(self, traces, batch_size: int | None = None, **kwargs):
        if isinstance(traces, (list, tuple)) and traces and np.ndim(traces[0]) == 2:
            groups: dict[tuple, list[int]] = {}
            for index, recording in enumerate(traces):
                groups.setdefault(np.shape(recording), []).append(index)
            if len(groups) > 1:  # one batch per size (neurons, frames), the results in the order given
                results: list = [None] * len(traces)
                for indices in groups.values():
                    group = np.stack([np.asarray(traces[i], dtype=np.float64) for i in indices])
                    records = self(group, batch_size=batch_size, **kwargs)
                    for index, record in zip(indices, records if isinstance(records, list) else [records]):
                        results[index] = record
                return results
            traces = np.stack([np.asarray(t, dtype=np.float64) for t in traces])
        if batch_size is not None:
            kwargs["batch_size_"] = _check_count(batch_size, "batch_size")
        return super().__call__(traces, **kwargs)

    def predict_quantiles(self, context, prediction_length: int,
                          quantile_levels=(0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9), **kwargs):
        """Quantile forecasts in the convention of time-series libraries (Chronos' `predict_quantiles`).

        Args:
            context (`np.ndarray` of shape `(neurons, frames)` or `(batch, neurons, frames)`, or a list of
                `(neurons, frames)` arrays): recordings in their own units, as for `__call__`.
            prediction_length (`int`): frames to forecast, at `sampling_rate` (a keyword of `kwargs`; default the
                model's rate).
            quantile_levels (`sequence of float`): levels in (0, 1).
            kwargs: any other call argument (`sampling_rate`, `reference`, `num_samples`, ...).

        Returns:
            `(quantiles, mean)`: `quantiles` of shape `(..., neurons, prediction_length, len(quantile_levels))` and
            `mean` of shape `(..., neurons, prediction_length)` (the point forecast), numpy arrays with the leading
            batch axis of a 3-D `context`; for a list of recordings, a list of such pairs.
        """
        levels = tuple(float(q) for q in np.atleast_1d(np.asarray(quantile_levels, dtype=np.float64)))
        out = self(context, horizon=prediction_length, quantiles=levels, **kwargs)

        def pair(record):
            if record["quantiles"] is None:
                raise ValueError("this model has no quantile head: pass num_samples=N (e.g. 20) to take the quantiles "
                                 "from N sampled futures.")
            return np.stack([record["quantiles"][q] for q in levels], axis=-1), record["forecast"]

        if isinstance(out, dict):
            return pair(out)
        pairs = [pair(record) for record in out]
        if isinstance(context, (list, tuple)):
            return pairs
        return np.stack([q for q, _ in pairs]), np.stack([m for _, m in pairs])

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
        batch_size_=None,
        reference=None,
        prediction_length=None,
        quantile_levels=None,
        max_memory_gib=None,
        **kwargs,
    ):
        if kwargs:
            raise ValueError(f"unknown arguments {sorted(kwargs)} for the neural-forecasting pipeline.")
        # the names time-series forecasting libraries (Chronos) use: prediction_length = horizon,
        # quantile_levels = quantiles
        horizon = _same_value(horizon, prediction_length, "horizon", "prediction_length")
        quantiles = _same_value(quantiles, quantile_levels, "quantiles", "quantile_levels")
        preprocess = {
            k: v
            for k, v in dict(
                sampling_rate=sampling_rate, horizon=horizon, session=session, neuron_ids=neuron_ids, mean=mean,
                std=std, reference=reference,
            ).items()
            if v is not None
        }
        if num_samples is not None:
            _check_count(num_samples, "num_samples")
        forward = {
            k: v
            for k, v in dict(
                num_samples=num_samples, temperature=temperature, top_k=top_k, top_p=top_p, mode=mode,
                batch_size=batch_size_, max_memory_gib=max_memory_gib,
            ).items()
            if v is not None
        }
        postprocess = {}
        if quantiles is not None:
            levels = [float(q) for q in np.atleast_1d(np.asarray(quantiles, dtype=np.float64))]
            if not levels or not all(0.0 < q < 1.0 for q in levels):
                raise ValueError(f"quantiles must be levels in (0, 1), e.g. (0.05, 0.5, 0.95); got {quantiles!r}.")
            postprocess["quantiles"] = tuple(levels)
        return preprocess, forward, postprocess

    def _resolve_session(self, session, num_neurons: int, neuron_ids):
        config = self.model.config
        names = list(config.session_names or [])
        ranges = list(config.session_neuron_ranges or [])
        if session is None:
            matching = [i for i, (a, b) in enumerate(ranges) if b - a == num_neurons]
            session_id = matching[0] if matching else 0
            if neuron_ids is None:
                known = names[session_id] if session_id < len(names) else f"#{session_id}"
                warnings.warn(
                    f"no session given: this recording borrows the identity (session and neuron embeddings) of session "
                    f"{known!r}, which the model learned on another recording (known sessions: {names or '[unnamed]'}); "
                    "forecasts are then only as good as that match. To give it its own identity: `calm prepare` the "
                    "recording, `calm tokenize` it, `calm adapt --model_path <this checkpoint> --session_name NAME`, and "
                    "pass session='NAME'. Pass session=... explicitly to silence this warning.",
                    UserWarning,
                    stacklevel=4,
                )
        elif isinstance(session, str):
            if session not in names:
                raise ValueError(
                    f"unknown session {session!r}; this model knows {names}. Add it with `calm adapt --session_name "
                    f"{session} ...`, which learns its embeddings with the backbone frozen."
                )
            session_id = names.index(session)
        else:
            session_id = _check_count(session, "session", minimum=0)
            if session_id >= config.num_sessions:
                raise ValueError(
                    f"unknown session id {session_id}; the model has {config.num_sessions} sessions (0.."
                    f"{config.num_sessions - 1}). Add one with `calm adapt`."
                )
        if neuron_ids is None:
            if session_id < len(ranges):
                start, stop = ranges[session_id]
                if num_neurons > stop - start:
                    label = names[session_id] if session_id < len(names) else session_id
                    raise ValueError(
                        f"traces have {num_neurons} neurons but session {label!r} has {stop - start}: pass "
                        f"neuron_ids=..., or adapt a session of {num_neurons} neurons with `calm adapt`."
                    )
                neuron_ids = np.arange(start, start + num_neurons)
            elif session is not None or ranges:
                raise ValueError(
                    f"session {session_id} has no neuron range recorded in the model config, so which neuron "
                    "embeddings belong to these traces is unknown: pass neuron_ids=... (one global id per neuron)."
                )
            else:  # a model that never recorded session ranges: neurons in order
                neuron_ids = np.arange(num_neurons)
        neuron_ids = np.asarray(neuron_ids)
        if neuron_ids.shape != (num_neurons,) or not np.issubdtype(neuron_ids.dtype, np.integer):
            raise ValueError(f"neuron_ids must be {num_neurons} integers (one per neuron), got shape {neuron_ids.shape}.")
        if neuron_ids.max() >= config.num_neurons or neuron_ids.min() < 0:
            raise ValueError(
                f"neuron_ids must lie in [0, {config.num_neurons}) (the model's neuron table); grow it with "
                "model.add_session(...) or model.resize_neuron_embeddings(...)."
            )
        return session_id, neuron_ids.astype(np.int64)

    def _check_traces(self, traces) -> tuple[np.ndarray, bool]:
        if isinstance(traces, torch.Tensor):  # resampling and z-scoring run on the host, once per call
            traces = traces.detach().cpu().numpy()
        values = np.asarray(traces)
        if values.dtype == object or not np.issubdtype(values.dtype, np.number):
            raise ValueError(f"traces must be a numeric array (neurons, frames), got dtype {values.dtype}.")
        # float32 and float64 stay as they are (no copy of a large recording; nothing below writes into it, and the
        # processor widens what it computes with), anything else becomes float64
        values = values if values.dtype in (np.float32, np.float64) else values.astype(np.float64)
        single = values.ndim == 2
        if single:
            values = values[None]
        if values.ndim != 3:
            raise ValueError(
                f"traces must be (neurons, frames) or (batch, neurons, frames), got shape {values.shape}; "
                "for one neuron use x[None]."
            )
        if values.size == 0:
            raise ValueError(f"traces are empty (shape {values.shape}): give at least one neuron and some frames.")
        highest, lowest = float(values.max()), float(values.min())  # one pass each, no copy
        if math.isnan(highest) or math.isnan(lowest):  # NaN frames (filled later): look past them
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN input: caught when filling
                highest, lowest = float(np.nanmax(values)), float(np.nanmin(values))
        if math.isinf(highest) or math.isinf(lowest):
            b, n, t = np.argwhere(np.isinf(values))[0]
            raise ValueError(f"traces contain Inf (batch {b}, neuron {n}, frame {t}); fix or drop that neuron.")
        peak = 0.0 if math.isnan(highest) else max(highest, -lowest)
        if peak >= MAX_ABS_INPUT:
            raise ValueError(
                f"traces reach {peak:.3g}, too large for float32 forecasts (limit {MAX_ABS_INPUT:.3g}); rescale them "
                "(e.g. divide by their median) and scale the forecast back."
            )
        return values, single

    def _identity_inputs(self, features, values: np.ndarray, fs: float, reference, session, neuron_ids,
                         horizon_model: int) -> dict:
        """Data-identity models: `{"neuron_identity": (batch, neurons, features)}` from `reference` (processed with the
        context's statistics) or from the recording before the context (in chunks of `REFERENCE_STEPS` windows), how
        much of it to read chosen on a split of those trials or chunks (`CalmForecaster.reference_identity`); table
        models: their ids."""
        if not self.forecaster.uses_data_identity:
            if reference is not None:
                raise ValueError("reference= is for data-identity models; this checkpoint reads learned tables: pass "
                                 "session=... (and neuron_ids=...) instead.")
            session_id, ids = self._resolve_session(session, values.shape[1], neuron_ids)
            batch = values.shape[0]
            return {"neuron_ids": torch.as_tensor(np.broadcast_to(ids, (batch, ids.shape[0])).copy()),
                    "session_ids": torch.full((batch,), session_id, dtype=torch.long)}
        if session is not None or neuron_ids is not None:
            raise ValueError("this model computes every neuron's identity from the recording itself "
                             "(config.neuron_identity='data'): drop session= and neuron_ids= (pass reference= to give "
                             "it other trials of the same neurons).")
        window = self.trace_processor.window_size
        if reference is not None:
            reference = np.asarray(reference, dtype=np.float64)
            reference = reference[None] if reference.ndim == 2 else reference
            if reference.ndim != 3 or reference.shape[1] != values.shape[1]:
                raise ValueError(f"reference must be (trials, neurons={values.shape[1]}, frames) in the units and rate "
                                 f"of traces, got shape {reference.shape}.")
            processed = self.trace_processor(reference, sampling_rate=fs, mean=features["mean"][0],
                                             std=features["std"][0])["input_values"]
            identity, _ = self.forecaster.reference_identity(processed.astype(np.float32),
                                                             features["input_values"].shape[-1], horizon_model)
            identity = [identity] * values.shape[0]
        else:  # the recording before the context, in chunks that serve as its trials
            chunks = [history_chunks(history, window) for history in features["history_values"]]
            identity = [self.forecaster.neuron_identity(None, num_neurons=values.shape[1]) if chunk is None else
                        self.forecaster.reference_identity(chunk, features["input_values"].shape[-1], horizon_model)[0]
                        for chunk in chunks]
        return {"neuron_identity": torch.stack(identity).cpu()}

    def preprocess(self, traces, sampling_rate=None, horizon=None, session=None, neuron_ids=None, mean=None, std=None,
                   reference=None):
        values, single = self._check_traces(traces)
        if horizon is None:
            raise ValueError("pass horizon=<number of frames to forecast, at the input sampling rate> (>= 1).")
        horizon = _check_count(horizon, "horizon")
        processor = self.trace_processor
        model_rate = processor.sampling_rate
        fs = model_rate if sampling_rate is None else float(sampling_rate)
        if not math.isfinite(fs) or fs <= 0:
            raise ValueError(f"sampling_rate={sampling_rate} must be a positive frame rate in Hz.")
        values, filled = fill_nan_frames(values)
        if filled:
            warnings.warn(
                f"traces had {filled} NaN value(s) ({filled / values.shape[1] / values.shape[0]:.1f} frames per neuron on "
                f"average); they were linearly interpolated in time before forecasting.",
                UserWarning,
                stacklevel=4,
            )
        window = processor.window_size
        horizon_model = processor.model_horizon(horizon, fs)
        new_steps = -(-horizon_model // window)
        max_steps = self.model.config.max_token_steps
        if new_steps >= max_steps:
            most = int(math.floor((max_steps - 1) * window * fs / model_rate))
            raise ValueError(
                f"horizon={horizon} frames ({horizon / fs:g} s at {fs:g} Hz) is longer than this model can roll out "
                f"after a context: ask for at most {most} frames ({most / fs:g} s)."
            )
        max_context = (max_steps - new_steps) * window  # model frames
        if context_token_steps(self.model.config) is not None:  # the context length the model is run with
            max_context = min(max_context, context_token_steps(self.model.config) * window)
        available = processor.model_frames(values.shape[-1], fs)
        # a data-identity model reads its neurons' identity from the frames before the context (unless reference= is
        # given), so a whole recording loses nothing: only where those frames are otherwise unused is it worth a word
        history_unused = not self.forecaster.uses_data_identity or reference is not None
        if available - available % window > max_context and history_unused:
            kept = int(math.floor(max_context * fs / model_rate))
            warnings.warn(
                f"the context is {values.shape[-1]} frames ({values.shape[-1] / fs:.1f} s at {fs:g} Hz); with a "
                f"{horizon}-frame horizon the model holds {kept} frames ({kept / fs:.1f} s), so the most recent {kept} "
                "frames are used and the older ones only set the z-score statistics.",
                UserWarning,
                stacklevel=4,
            )
        if (mean is None) != (std is None):
            raise ValueError("pass mean and std together (both in the traces' units), or neither (context statistics).")
        features = processor(values, sampling_rate=fs, mean=mean, std=std, max_frames=max_context)
        identity = self._identity_inputs(features, values, fs, reference, session, neuron_ids, horizon_model)
        used_model = features["input_values"].shape[-1]
        return {
            "values": torch.as_tensor(features["input_values"]),
            **identity,
            "features": features,
            "horizon": horizon,
            "horizon_model": horizon_model,
            "single": single,
            "context_frames": min(values.shape[-1], int(math.floor((used_model - 1) * fs / model_rate)) + 1),
        }

    def _forward(self, inputs, num_samples=1, temperature=1.0, top_k=None, top_p=None, mode=None, batch_size=None,
                 max_memory_gib=None):
        if mode is None:  # the continuous head's conditional mean when the model has one (samples recentred on it)
            mode = default_forecast_mode(self.model)
            if mode != "direct":
                mode = "greedy" if num_samples == 1 else "mean"
        values = inputs["values"]
        forecaster = self.forecaster
        if max_memory_gib is not None:  # this call's budget
            forecaster = forecaster.with_memory_budget(max_memory_gib)
        step = values.shape[0] if batch_size is None else batch_size
        forecasts, samples, bands = [], [], []
        identity_names = [name for name in ("neuron_ids", "session_ids", "neuron_identity") if name in inputs]
        for start in range(0, values.shape[0], step):
            chunk = slice(start, start + step)
            # torch on the model's device until postprocess (Pipeline.forward moved `values` there)
            result = forecaster.forecast(
                values[chunk],
                horizon=inputs["horizon_model"],
                **{name: inputs[name][chunk] for name in identity_names},
                mode=mode,
                num_samples=num_samples,
                temperature=temperature,
                top_k=top_k,
                top_p=top_p,
                return_tensors=True,
            )
            forecasts.append(torch.as_tensor(result.forecast))
            samples.append(None if result.samples is None else torch.as_tensor(result.samples))
            # (batch, levels, neurons, frames): the samples' layout, so the processor maps them back alike
            bands.append(None if result.quantiles is None else torch.as_tensor(result.quantiles).permute(0, 3, 1, 2))
        stacked = None if samples[0] is None else torch.cat(samples)
        return {"forecast": torch.cat(forecasts), "samples": stacked,
                "model_quantiles": None if bands[0] is None else torch.cat(bands),
                "quantile_levels": result.quantile_levels,
                **{k: v for k, v in inputs.items() if k != "values"}}

    def postprocess(self, outputs, quantiles=DEFAULT_QUANTILES):
        processor, features, horizon = self.trace_processor, outputs["features"], outputs["horizon"]
        # the only device -> host conversion: Pipeline.forward brought the tensors to the CPU, numpy from here on
        forecast = processor.postprocess_forecast(_host(outputs["forecast"]), features, horizon)
        samples = bands = None
        if outputs["samples"] is not None:
            samples = processor.postprocess_forecast(_host(outputs["samples"]), features, horizon)
        if outputs.get("model_quantiles") is not None:  # the quantile head's, in the same pass as the forecast
            # the requested levels are picked at the model rate, so only they are mapped back to the input rate
            per_level = np.moveaxis(np.asarray(_host(outputs["model_quantiles"]), dtype=np.float64), 1, 0)
            picked = _levels_mixed(tuple(quantiles), outputs["quantile_levels"], per_level)
            bands = processor.postprocess_forecast(np.stack(list(picked.values()), axis=1), features, horizon)
        records = []
        for b in range(forecast.shape[0]):
            record = {"forecast": forecast[b], "mean": None, "samples": None, "quantiles": None,
                      "sampling_rate": float(features["sampling_rate"]), "context_frames": outputs["context_frames"]}
            if samples is not None:
                record["samples"] = samples[b]
                record["mean"] = samples[b].mean(axis=0)
                record["quantiles"] = {float(q): np.quantile(samples[b], q, axis=0).astype(np.float32) for q in quantiles}
            if bands is not None:
                record["quantiles"] = {level: bands[b, index] for index, level in enumerate(picked)}
            records.append(record)
        return records[0] if outputs["single"] else records
