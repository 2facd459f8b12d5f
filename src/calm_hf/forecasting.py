"""Forecasting with a CalM checkpoint: tokenize a context, roll out the dual-axis transformer, decode.

`CalmForecaster` works on z-scored traces at the model's frame rate (`forecast`), or on raw traces through the
checkpoint's `CalmTraceProcessor` (`forecast_traces`); the `"neural-forecasting"` pipeline
(`pipeline_neural_forecasting.py`) wraps the latter. `evaluate_forecasting` scores a held-out split with the paper's
protocol and serves `calm pretrain`, the main job and the benchmarks.

This file ships with checkpoints (the pipeline imports it), so it imports only the standard library, numpy, torch and
its siblings.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import numbers
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .generation_calm import sequence_bytes
from .identity_calm import compute_neuron_identity, config_identity_size, identity_settings
from .modeling_calm_tokenizer import check_tokenizer_fingerprint

logger = logging.getLogger(__name__)

ROLLOUT_MODES = ("greedy", "sample", "mean", "soft")
# "direct": the continuous head's conditional-mean forecast (models with `config.value_head_steps > 0`; the default)
FORECAST_MODES = ("direct",) + ROLLOUT_MODES
# working memory of one forecast call when the caller sets none: what a laptop spares beside the recording itself;
# `max_memory_gib` raises it on a larger machine (fewer, larger chunks) or lowers it beside other work
DEFAULT_MAX_MEMORY_GIB = 1.0
# share of `max_memory_gib` one chunk of neurons of a layer's inference pass may hold (the default budget gives the
# backbone's default chunk, `modeling_calm.INFERENCE_CHUNK_BYTES`)
LAYER_CHUNK_SHARE = 0.25


def context_token_steps(config) -> int | None:
    """The token steps of context a forecast reads (`CalmConfig.context_token_steps`; None = as many as fit), also for
    a model whose remote-code config predates the field."""
    return getattr(config, "context_token_steps", None)


def default_forecast_mode(model) -> str:
    """"direct" for models with a continuous forecast head (the best estimator measured), else "greedy"."""
    return "direct" if getattr(model, "value_head", None) is not None else "greedy"


@dataclass
class ForecastResult:
    """Forecast of `horizon` frames for every neuron, z-scored units: host numpy arrays, or torch tensors on the model's
    device when `CalmForecaster.forecast(..., return_tensors=True)` asked for them.

    Attributes:
        forecast: (batch, neurons, horizon) point forecast (the mean of the samples when several were drawn).
        samples: (batch, num_samples, neurons, horizon) sampled futures, or None for a single rollout.
        codes: (batch, num_samples, neurons, context_steps + new_steps) the token grids that were decoded.
        quantiles: (batch, neurons, horizon, levels) quantiles from the model's quantile head at `quantile_levels`
            (direct forecasts of a model with `config.quantile_levels`), else None.
        quantile_levels: the levels of `quantiles`.
    """

    forecast: np.ndarray | torch.Tensor
    samples: np.ndarray | torch.Tensor | None
    codes: np.ndarray | torch.Tensor
    quantiles: np.ndarray | torch.Tensor | None = None
    quantile_levels: tuple[float, ...] | None = None


def to_numpy(result: ForecastResult) -> ForecastResult:
    """The same result as host numpy arrays (float32 forecasts, integer codes)."""

    def host(tensor):
        return tensor.detach().float().cpu().numpy() if tensor.is_floating_point() else tensor.detach().cpu().numpy()

    return ForecastResult(forecast=host(result.forecast), samples=None if result.samples is None else host(result.samples),
                          codes=host(result.codes), quantiles=None if result.quantiles is None else host(result.quantiles),
                          quantile_levels=result.quantile_levels)


def check_finite_context(values: torch.Tensor) -> None:
    """Entry-point check of a context tensor (one host sync per forecast call, not per model step)."""
    finite = torch.isfinite(values)
    if not bool(finite.all()):
        bad = torch.nonzero(~finite)[0].tolist()
        raise ValueError(
            f"context_values contain NaN/Inf (first at batch {bad[0]}, neuron {bad[1]}, frame {bad[2]}): "
            "interpolate or drop that neuron before forecasting."
        )


# a context whose typical neuron sits this many units from zero, or spreads this wide, was not z-scored: z-scored
# traces have mean 0 and std 1 over their recording, so even a bursting neuron's window stays well inside it
RAW_SCALE = 4.0


def check_z_scored(values: torch.Tensor) -> None:
    """Warn when a `(batch, neurons, frames)` context looks like raw traces (one host sync per forecast call): the
    tokenizer and the heads read z-scored units, and raw fluorescence gives a forecast of the wrong scale."""
    mean = values.mean(dim=-1).abs().flatten().median()
    std = values.std(dim=-1, correction=0).flatten().median()
    typical_mean, typical_std = torch.stack([mean, std]).tolist()
    if typical_mean > RAW_SCALE or typical_std > RAW_SCALE:
        warnings.warn(
            f"context_values do not look z-scored: the median neuron has mean {typical_mean:.3g} and std "
            f"{typical_std:.3g} over the context, where z-scored traces have mean 0 and std 1. z-score each neuron "
            "((x - mean) / std with its recording's statistics, e.g. CalmTraceProcessor), or call forecast_traces, "
            "which z-scores raw traces and maps the forecast back to their units.",
            UserWarning,
            stacklevel=3,
        )


def check_forecast_arguments(mode: str, horizon, num_samples, temperature, top_k, top_p,
                             max_direct_horizon: int) -> None:
    """Arguments of `CalmForecaster.forecast` that would otherwise be dropped or run without end: the count
    arguments, sampling settings in a mode that does not sample, and a direct horizon past the model's span."""
    for name, value in (("horizon", horizon), ("num_samples", num_samples)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if mode in ("greedy", "soft") and num_samples > 1:
        raise ValueError(
            f"mode={mode!r} gives one deterministic future, not num_samples={num_samples} different ones: pass "
            "mode='sample' or 'mean' for sampled futures (or 'direct' for the head's forecast with a sampled band), or "
            "num_samples=1."
        )
    sampled = mode in ("sample", "mean", "soft") or (mode == "direct" and num_samples > 1)
    set_settings = [f"{name}={value!r}" for name, value, default in (
        ("temperature", temperature, 1.0), ("top_k", top_k, None), ("top_p", top_p, None))
        if value is not None and value != default]
    if set_settings and not sampled:
        raise ValueError(
            f"{', '.join(set_settings)} would have no effect: mode={mode!r} with num_samples={num_samples} draws no "
            "token. Sampling settings apply to mode='sample', 'mean' and 'soft', and to mode='direct' with "
            "num_samples > 1 (its band); drop them or choose one of those."
        )
    if mode == "direct" and horizon > max_direct_horizon:
        raise ValueError(
            f"horizon={horizon} frames is longer than this model's span of {max_direct_horizon} frames "
            "((max_token_steps - 1) * window_size, one token window left for the context): past it the model reads "
            f"only its own forecasts. Ask for at most {max_direct_horizon} frames, or forecast again from new data."
        )


# how many dimensions each identity input has when it holds one entry per recording (else it is shared by all of them)
PER_RECORDING_DIMS = {"neuron_ids": 2, "session_ids": 1, "neuron_mask": 2, "neuron_identity": 3}


def recording_rows(identity: dict, rows: slice) -> dict:
    """The identity inputs (`neuron_ids`, `session_ids`, `neuron_mask`, `neuron_identity`) of the recordings `rows`;
    an input shared by every recording stays whole."""
    return {name: value[rows] if value is not None and value.dim() == PER_RECORDING_DIMS[name] else value
            for name, value in identity.items()}


def check_memory_budget(max_memory_gib) -> float:
    """`max_memory_gib` as a float, or a ValueError naming the problem."""
    if isinstance(max_memory_gib, bool) or not isinstance(max_memory_gib, numbers.Real) or not (
            0 < max_memory_gib < float("inf")):
        raise ValueError(f"max_memory_gib must be a positive number of GiB (e.g. {DEFAULT_MAX_MEMORY_GIB}), got "
                         f"{max_memory_gib!r}.")
    return float(max_memory_gib)


def check_tokenizer_matches_model(model, tokenizer) -> None:
    """Raise a ValueError naming the mismatch when a tokenizer cannot feed this dual-axis transformer."""
    codebook = tokenizer.config.codebook_size
    vocab = model.config.vocab_size
    if codebook != vocab:
        raise ValueError(
            f"tokenizer codebook_size={codebook} differs from the model's vocab_size={vocab}: load the tokenizer that "
            "was saved with this checkpoint (its `tokenizer/` subfolder) or retokenize and pretrain with this one."
        )
    if tokenizer.config.window_size != model.config.window_size:
        raise ValueError(
            f"tokenizer window_size={tokenizer.config.window_size} differs from the model's "
            f"window_size={model.config.window_size}: use the tokenizer saved with this checkpoint."
        )
    check_tokenizer_fingerprint(model, tokenizer)


# how much of a recording's data identity a model reads, fullest first: (identity_coupling, identity_reference)
IDENTITY_CHOICES = {"full": (True, True), "no_coupling": (False, True), "zero_shot": (True, False)}
CHOICE_MIN_TRIALS = 4  # reference trials needed to choose on a split of them (two per half)
CHOICE_MAX_TRIALS = 16  # reference trials forecast per half and identity, at most
CHOICE_NEURON_TRIALS = 16_000  # neurons x trials forecast per half and identity, at most (bounds the choice's cost)


def trial_pearson_r(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Per trial of `(trials, neurons, horizon)`: each neuron's Pearson r over the horizon, averaged over the neurons
    (NaN where no neuron's traces vary)."""
    pred = pred - pred.mean(axis=-1, keepdims=True)
    truth = truth - truth.mean(axis=-1, keepdims=True)
    scale = np.sqrt((pred**2).sum(-1) * (truth**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(scale > 0, (pred * truth).sum(-1) / np.where(scale > 0, scale, 1.0), np.nan)
        valid = np.isfinite(r)
        return np.where(valid.any(-1), np.where(valid, r, 0.0).sum(-1) / np.maximum(valid.sum(-1), 1), np.nan)


def significant_gain(candidate: np.ndarray, best: np.ndarray) -> bool:
    """Whether per-trial r `candidate` beats `best` on the same trials by more than one standard error of the paired
    gain (with one scored trial, by any margin), so that the best of a few noisy trials is not just their noise."""
    gain = np.asarray(candidate, dtype=np.float64) - np.asarray(best, dtype=np.float64)
    gain = gain[np.isfinite(gain)]
    if not len(gain):
        return bool(np.isfinite(candidate).any() and not np.isfinite(best).any())
    margin = gain.std(ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else 0.0
    return bool(gain.mean() > margin)


def pick_identity(per_trial: dict[str, np.ndarray]) -> str:
    """Which of `IDENTITY_CHOICES` to read, from each one's per-trial r on the same trials: a lesser identity replaces
    the full one only with a `significant_gain` over it on two or more trials (a few noisy trials do not move the
    choice); among those, the highest mean r, a tie keeping the fuller."""
    full = np.asarray(per_trial["full"], dtype=np.float64)
    best, best_r = "full", float(np.nanmean(full)) if np.isfinite(full).any() else -np.inf
    for name in list(IDENTITY_CHOICES)[1:]:
        candidate = np.asarray(per_trial[name], dtype=np.float64)
        if np.isfinite(candidate - full).sum() < 2:
            continue
        mean_r = float(np.nanmean(candidate))
        if significant_gain(candidate, full) and mean_r > best_r:
            best, best_r = name, mean_r
    return best


class CalmForecaster:
    """Roll a `CalmForCausalNeuralModeling` forward from a context of z-scored traces.

    Args:
        model: the dual-axis transformer with its next-token head.
        tokenizer: the `CalmTokenizer` it was pretrained on.
        autocast_dtype: `torch.bfloat16` to run under CPU/GPU autocast (fast on AMX CPUs), or None for fp32.
        max_memory_gib: working memory one call may use, in GiB: recordings, sampled futures and the tokenizer's
            neurons are processed in chunks that fit it. Chunking leaves the results unchanged: direct forecasts and
            token codes are computed row by row either way, and sampled futures draw from one seed per future. The
            neuron-axis attention needs every neuron of a recording at once, so one recording is the smallest chunk of
            the dual-axis transformer.
        choose_identity: data-identity models given reference trials: read as much of their identity as forecasts
            best on a split of them (`reference_identity`); False reads what the model's config says.
    """

    def __init__(self, model, tokenizer, autocast_dtype: torch.dtype | None = None,
                 max_memory_gib: float = DEFAULT_MAX_MEMORY_GIB, choose_identity: bool = True):
        check_tokenizer_matches_model(model, tokenizer)
        self.model = model.eval()
        self.tokenizer = tokenizer.eval()
        self.autocast_dtype = autocast_dtype
        self.window_size = model.config.window_size
        # one recording's closed-form population term (`calm_hf.population_readout`), blended into direct forecasts
        self.population_readout = None
        self.max_memory_gib = check_memory_budget(max_memory_gib)
        self.choose_identity = bool(choose_identity)

    def with_memory_budget(self, max_memory_gib: float) -> CalmForecaster:
        """The same forecaster (model, tokenizer and population readout shared, not copied) with another budget."""
        other = copy.copy(self)
        other.max_memory_gib = check_memory_budget(max_memory_gib)
        return other

    def chunk_size(self, bytes_per_item: int, items: int) -> int:
        """How many items of `bytes_per_item` each fit in `max_memory_gib` together (at least one, at most `items`)."""
        return max(1, min(items, int(self.max_memory_gib * 2**30) // max(1, bytes_per_item)))

    def grid_bytes(self, neurons: int, steps: int, cached_steps: int = 0) -> int:
        """Estimated working memory of one dual-axis transformer forward over one `(neurons, steps)` grid."""
        config = self.model.config
        return neurons * sequence_bytes(config.hidden_size, config.intermediate_size, steps, config.vocab_size,
                                        cached_steps, config.num_hidden_layers)

    def _tokenizer_rows(self, function, rows: torch.Tensor, steps: int) -> torch.Tensor:
        """`function` (the tokenizer's encode or decode, `(1, rows, length)` -> `(1, rows, ...)`) applied to
        `(..., length)` rows in chunks of `max_memory_gib`; neurons are independent in the tokenizer."""
        config = self.tokenizer.config
        flat = rows.reshape(1, -1, rows.shape[-1])
        per_chunk = self.chunk_size(sequence_bytes(config.hidden_size, config.intermediate_size, steps,
                                                   config.codebook_size), flat.shape[1])
        with self._autocast():
            pieces = [function(flat[:, start : start + per_chunk]) for start in range(0, flat.shape[1], per_chunk)]
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)
        return out.reshape(*rows.shape[:-1], out.shape[-1])

    @property
    def uses_data_identity(self) -> bool:
        """Whether the model computes neuron identities from data (`config.neuron_identity == "data"`)."""
        return getattr(self.model.config, "neuron_identity", "table") == "data"

    @torch.no_grad()
    def neuron_identity(self, reference: torch.Tensor | np.ndarray | None, num_neurons: int | None = None,
                        choice: str | None = None) -> torch.Tensor | None:
        """The data identity `(neurons, identity_size)` of a recording's neurons from reference trials `(trials,
        neurons, frames)` of the same recording, z-scored and at the model rate like the context (training trials, or
        the recording before the context cut into trials). `None` (no reference) gives the zero-shot identity.
        `choice` (one of `IDENTITY_CHOICES`) reads that much of it instead of what the model's config says."""
        if not self.uses_data_identity:
            raise ValueError("This model reads neuron identities from its tables (config.neuron_identity='table'): "
                             "pass neuron_ids / session_ids instead of a reference.")
        config = self.model.config
        if reference is not None:
            reference = torch.as_tensor(np.asarray(reference, dtype=np.float32) if not isinstance(
                reference, torch.Tensor) else reference.float().cpu())
            num_neurons = reference.shape[1] if reference.ndim == 3 else num_neurons
        if num_neurons is None:
            raise ValueError("give the number of neurons when there is no reference.")
        settings = identity_settings(config)
        if choice is not None:
            if choice not in IDENTITY_CHOICES:
                raise ValueError(f"choice={choice!r} is not one of {tuple(IDENTITY_CHOICES)}.")
            settings["coupling"], settings["use_reference"] = IDENTITY_CHOICES[choice]
        identity = compute_neuron_identity(reference, num_neurons, **settings)
        return identity.to(self.device)

    @torch.no_grad()
    def reference_identity(self, reference: torch.Tensor | np.ndarray, context_frames: int,
                           horizon: int | None = None) -> tuple[torch.Tensor, dict]:
        """The data identity from reference trials `(trials, neurons, frames)`, reading as much of it as forecasts
        best on a split of the same trials: the identity of each half (whole, without its coupling factors, zero-shot)
        forecasts the other half's frames after `context_frames` (up to `horizon` of them; at most
        `CHOICE_MAX_TRIALS` trials and `CHOICE_NEURON_TRIALS` neurons x trials of each half), and `pick_identity`
        chooses by the per-trial r (a population readout is left out of these forecasts). Returns the chosen identity
        of all reference trials and `{"chosen": name, "pearson_r": {name: mean r}}`; `chosen` is None, with the
        model's own identity, where there is nothing to choose (a config that fixes the identity or already leaves a
        part out, fewer than `CHOICE_MIN_TRIALS` trials, trials too short for the context and one window) and with
        `choose_identity=False`."""
        config = self.model.config
        reference = np.asarray(reference.float().cpu() if isinstance(reference, torch.Tensor) else reference,
                               dtype=np.float32)
        given = (bool(getattr(config, "identity_coupling", True)), bool(getattr(config, "identity_reference", True)))
        read = context_token_steps(config)  # the network reads no more of a context than this: the same scores
        start = 0 if read is None else max(0, context_frames - read * self.window_size)
        frames = reference.shape[-1] - context_frames
        limit = (config.max_token_steps - 1) * self.window_size
        if (not self.choose_identity or getattr(config, "identity_fixed", False) or given != IDENTITY_CHOICES["full"]
                or len(reference) < CHOICE_MIN_TRIALS
                or context_frames < self.window_size or frames < self.window_size):
            return self.neuron_identity(reference), {"chosen": None}
        horizon = min(frames, limit, horizon or frames)
        network = copy.copy(self)  # the choice is the network's: without a population readout blended in
        network.population_readout = None
        halves = np.array_split(np.random.default_rng(0).permutation(len(reference)), 2)
        scored_trials = max(2, min(CHOICE_MAX_TRIALS, CHOICE_NEURON_TRIALS // reference.shape[1]))
        per_trial = {}
        for name in IDENTITY_CHOICES:
            scores = []
            for fit, scored in (halves, halves[::-1]):
                trials = reference[scored[:scored_trials]]
                identity = self.neuron_identity(reference[fit], choice=name)
                pred = network.forecast(trials[:, :, start:context_frames], horizon, neuron_identity=identity).forecast
                scores.append(trial_pearson_r(pred, trials[:, :, context_frames : context_frames + horizon]))
            per_trial[name] = np.concatenate(scores)
        chosen = pick_identity(per_trial)
        scores = {name: float(np.nanmean(r)) for name, r in per_trial.items()}
        logger.info("identity from %d reference trials: r on a split of them %s; reading the %s identity",
                    len(reference), ", ".join(f"{name} {r:.3f}" for name, r in scores.items()),
                    chosen.replace("_", "-"))
        return self.neuron_identity(reference, choice=chosen), {"chosen": chosen, "pearson_r": scores}

    @property
    def device(self) -> torch.device:
        """Where the model's weights are; inputs are moved there and stay there until the result is returned."""
        return next(self.model.parameters()).device

    def _to_device(self, tensor: torch.Tensor | np.ndarray | None, dtype: torch.dtype | None = None):
        """A tensor on the model's device (None stays None); numpy input is converted once, torch input only moved."""
        if tensor is None:
            return None
        if not isinstance(tensor, torch.Tensor):
            tensor = torch.as_tensor(np.asarray(tensor))
        return tensor.to(device=self.device, dtype=dtype)

    @contextlib.contextmanager
    def _layer_chunks(self):
        """The backbone's layer-by-layer chunking of a large grid at inference (`CalmModel.inference_chunk_bytes`)
        follows this forecaster's `max_memory_gib` for the calls inside (a share of it, `LAYER_CHUNK_SHARE`: the rest
        holds the grid, the caches and the heads' outputs)."""
        backbone = self.model.base_model
        before = getattr(backbone, "inference_chunk_bytes", None)
        backbone.inference_chunk_bytes = max(1, int(self.max_memory_gib * 2**30 * LAYER_CHUNK_SHARE))
        try:
            yield
        finally:
            backbone.inference_chunk_bytes = before

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        device_type = next(self.model.parameters()).device.type
        return torch.autocast(device_type=device_type, dtype=self.autocast_dtype)

    @torch.no_grad()
    def tokenize(self, context_values: torch.Tensor) -> torch.Tensor:
        """(batch, neurons, frames) z-scored -> codes (batch, neurons, frames // L); the OLDEST frames are dropped
        when frames is not a multiple of L, so the context stays aligned with its end."""
        frames = context_values.shape[-1]
        if frames < self.window_size:
            raise ValueError(
                f"context has {frames} frames, shorter than one token window of {self.window_size} frames at the "
                f"model rate: give at least {self.window_size} frames (the paper uses 40)."
            )
        usable = frames - frames % self.window_size
        return self._tokenizer_rows(lambda rows: self.tokenizer.encode(rows).codes,
                                    context_values[..., frames - usable :], usable // self.window_size)

    @torch.no_grad()
    def rollout(
        self,
        context_ids: torch.Tensor,
        new_steps: int,
        neuron_ids: torch.Tensor | None = None,
        session_ids: torch.Tensor | None = None,
        neuron_mask: torch.Tensor | None = None,
        mode: str = "greedy",
        num_samples: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        neuron_identity: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token rollout. Returns (batch, num_samples, neurons, context_steps + new_steps) codes.

        `greedy` takes the argmax (one rollout), `sample`/`mean` draw `num_samples` futures (`mean` is `sample`
        whose decoded traces the caller averages), `soft` feeds back the probability-weighted embedding of the
        temperature / top-k / top-p distribution (one rollout).
        """
        if mode not in ROLLOUT_MODES:
            raise ValueError(f"mode={mode!r} is not one of {ROLLOUT_MODES}.")
        batch, neurons, _ = context_ids.shape
        if mode in ("greedy", "soft") and num_samples != 1:
            raise ValueError(f"mode={mode!r} gives one future: pass num_samples=1, or mode='sample' for several.")
        identity = {} if neuron_identity is None else {"neuron_identity": neuron_identity}
        if mode in ("sample", "mean"):
            return self._sample(context_ids, new_steps, num_samples, temperature, top_k, top_p, neuron_ids=neuron_ids,
                                session_ids=session_ids, neuron_mask=neuron_mask, **identity)
        with self._autocast():
            if mode == "soft":
                sequences = self.model.rollout(
                    context_ids,
                    max_new_tokens=new_steps,
                    mode="soft",
                    neuron_ids=neuron_ids,
                    session_ids=session_ids,
                    neuron_mask=neuron_mask,
                    temperature=temperature,
                    top_k=top_k,
                    top_p=top_p,
                    **identity,
                ).codes
            else:
                sequences = self.model.generate(
                    input_ids=context_ids,
                    neuron_ids=neuron_ids,
                    session_ids=session_ids,
                    neuron_mask=neuron_mask,
                    max_new_tokens=new_steps,
                    min_new_tokens=new_steps,
                    do_sample=False,
                    **identity,
                )
        return sequences.reshape(batch, num_samples, neurons, -1)

    def _sample(self, context_ids: torch.Tensor, new_steps: int, num_samples: int, temperature: float,
                top_k: int | None, top_p: float | None, **identity) -> torch.Tensor:
        """Sampled futures `(batch, num_samples, neurons, steps + new_steps)`: recordings and samples in chunks that fit
        `max_memory_gib`, the context run once per recording chunk. One seed per future, drawn from torch's global
        generator (`torch.manual_seed` makes a call reproducible), so the chunking does not change the futures."""
        batch, neurons, steps = context_ids.shape
        seeds = torch.randint(0, 2**62, (batch, num_samples))
        recordings = self.chunk_size(self.grid_bytes(neurons, steps), batch)
        samples = self.chunk_size(self.grid_bytes(neurons * recordings, 1, steps + new_steps), num_samples)
        pieces = []
        for start in range(0, batch, recordings):
            rows = slice(start, start + recordings)
            with self._autocast():
                pieces.append(self.model.sample_futures(
                    context_ids[rows], new_steps, seeds[rows].to(context_ids.device), samples_per_chunk=samples,
                    temperature=temperature, top_k=top_k, top_p=top_p, **recording_rows(identity, rows)))
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces)

    @torch.no_grad()
    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., neurons, steps) codes -> (..., neurons, steps * L) z-scored traces."""
        values = self._tokenizer_rows(lambda rows: self.tokenizer.decode(rows).trace_values, codes, codes.shape[-1])
        return values.float()

    @torch.no_grad()
    def direct(
        self,
        context_ids: torch.Tensor,
        horizon: int,
        context_values: torch.Tensor | None = None,
        neuron_ids: torch.Tensor | None = None,
        session_ids: torch.Tensor | None = None,
        neuron_mask: torch.Tensor | None = None,
        neuron_identity: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Conditional-mean forecast from the continuous head, (batch, neurons, horizon) z-scored, and the quantile
        head's quantiles (batch, neurons, horizon, levels) when the model has one (else None).

        One forward pass covers `value_head_steps * L` frames; longer horizons append that chunk to the context,
        re-tokenize and predict again (the quantiles of later chunks are then conditional on the forecast path, so
        they understate the spread there). `context_values` (batch, neurons, steps * L) are the frames behind
        `context_ids`; they are decoded from the codes when not given and a second chunk is needed.
        """
        identity = {"neuron_ids": neuron_ids, "session_ids": session_ids, "neuron_mask": neuron_mask}
        if neuron_identity is not None:
            identity["neuron_identity"] = neuron_identity
        with_quantiles = getattr(self.model, "quantile_head", None) is not None
        max_steps = self.model.config.max_token_steps
        # a head with the raw-trace highway (config.value_skip_windows) reads the traces behind the codes too
        needs_values = getattr(self.model.config, "value_skip_windows", 0) > 0
        if context_values is None and needs_values:
            context_values = self.decode(context_ids)
        if context_values is not None:  # the frames behind the codes, aligned at the end
            context_values = context_values[..., -context_ids.shape[-1] * self.window_size :]
        pieces, bands, produced, ids = [], [], 0, context_ids
        while True:
            kept = ids[..., -max_steps:]
            values = context_values[..., -kept.shape[-1] * self.window_size :] if needs_values else None
            with self._autocast(), self._layer_chunks():
                prediction = self.model.forecast_values(kept, **identity, return_quantiles=with_quantiles, **(
                    {"context_values": values} if needs_values else {}))
            prediction, quantiles = prediction if with_quantiles else (prediction, None)
            pieces.append(prediction.float()[..., : horizon - produced])
            if quantiles is not None:
                bands.append(quantiles.float()[..., : horizon - produced, :])
            produced += pieces[-1].shape[-1]
            if produced >= horizon:
                return torch.cat(pieces, dim=-1), torch.cat(bands, dim=-2) if bands else None
            if context_values is None:
                context_values = self.decode(context_ids)
            context_values = torch.cat([context_values[..., -ids.shape[-1] * self.window_size :], prediction.float()],
                                       dim=-1)
            ids = self.tokenize(context_values)

    def forecast(
        self,
        context_values: torch.Tensor | np.ndarray,
        horizon: int,
        neuron_ids: torch.Tensor | None = None,
        session_ids: torch.Tensor | None = None,
        neuron_mask: torch.Tensor | None = None,
        context_ids: torch.Tensor | None = None,
        mode: str | None = None,
        num_samples: int = 1,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        return_tensors: bool = False,
        reference: torch.Tensor | np.ndarray | None = None,
        neuron_identity: torch.Tensor | None = None,
    ) -> ForecastResult:
        """Forecast `horizon` frames after a context.

        Args:
            context_values: (batch, neurons, frames) z-scored context at the model rate (a context that looks raw
                gets a warning).
            horizon: number of future frames wanted.
            context_ids: pre-computed context codes (batch, neurons, steps); skips tokenization when given.
            mode: "direct" (the continuous head's conditional mean; default for models that have the head, with
                `num_samples > 1` adding sampled token rollouts recentred on it as `samples`), or a token rollout
                mode of `rollout` (default for older checkpoints: "greedy").
            num_samples, temperature, top_k, top_p: see `rollout`; "greedy" and "soft" give one future
                (num_samples=1), and the sampling settings apply where tokens are drawn or weighted ("sample", "mean",
                "soft", and "direct" with num_samples > 1); anything else is refused rather than ignored. "direct"
                covers at most `(max_token_steps - 1) * window_size` frames.
            return_tensors: return torch tensors on the model's device instead of host numpy arrays (the pipeline
                does, and converts in its postprocess).
            reference: data-identity models: reference trials (trials, neurons, frames) of the same neurons, z-scored
                at the model rate (e.g. training trials, or the recording before the context); None = zero-shot. How
                much of their identity is read is chosen on a split of them (`reference_identity`).
            neuron_identity: data-identity models: a precomputed identity `(neurons, identity_size)` or `(batch,
                neurons, identity_size)` (`neuron_identity(reference)`), instead of `reference`.

        Inputs (numpy or torch, on any device) are moved to the model's device once; everything up to the result
        stays there in torch.
        """
        mode = default_forecast_mode(self.model) if mode is None else mode
        if mode not in FORECAST_MODES:
            raise ValueError(f"mode={mode!r} is not one of {FORECAST_MODES}.")
        check_forecast_arguments(mode, horizon, num_samples, temperature, top_k, top_p,
                                 (self.model.config.max_token_steps - 1) * self.window_size)
        values = self._to_device(context_values, torch.float32)
        if values is not None and values.ndim != 3:
            raise ValueError(
                f"context_values must be (batch, neurons, frames), got shape {tuple(values.shape)}; "
                "for one recording use x[None]."
            )
        steps = context_token_steps(self.model.config)  # the network reads the most recent ones
        read = values if steps is None or values is None else values[..., -steps * self.window_size :]
        if context_ids is None:
            if values is None:
                raise ValueError("pass context_values (batch, neurons, frames) or pre-computed context_ids.")
            check_finite_context(values)
            context_ids = self.tokenize(read)
        if values is not None:  # tokenized here, or read by the head's raw-trace highway
            check_z_scored(values)
        context_ids = self._to_device(context_ids)
        if steps is not None:
            context_ids = context_ids[..., -steps:]
        identity = {"neuron_ids": self._to_device(neuron_ids), "session_ids": self._to_device(session_ids),
                    "neuron_mask": self._to_device(neuron_mask)}
        if self.uses_data_identity:
            if neuron_identity is None and reference is not None:
                context_frames = values.shape[-1] if values is not None else context_ids.shape[-1] * self.window_size
                neuron_identity = self.reference_identity(reference, context_frames, horizon)[0]
            elif neuron_identity is None:
                neuron_identity = self.neuron_identity(None, num_neurons=context_ids.shape[1])
            identity["neuron_identity"] = self._to_device(neuron_identity, torch.float32).expand(
                context_ids.shape[0], -1, -1)
        elif reference is not None or neuron_identity is not None:
            raise ValueError("This model reads neuron identities from its tables (config.neuron_identity='table'): "
                             "pass neuron_ids / session_ids, not a reference or neuron_identity.")
        sampling = {"temperature": temperature, "top_k": top_k, "top_p": top_p}
        if mode == "direct":  # recordings in chunks that fit max_memory_gib; each one's forecast is its own
            batch, neurons, steps = context_ids.shape
            per_chunk = self.chunk_size(self.grid_bytes(neurons, min(steps, self.model.config.max_token_steps)), batch)
            pieces = [self.direct(context_ids[rows], horizon, None if read is None else read[rows],
                                  **recording_rows(identity, rows))
                      for rows in (slice(start, start + per_chunk) for start in range(0, batch, per_chunk))]
            point = torch.cat([piece[0] for piece in pieces])
            quantiles = None if pieces[0][1] is None else torch.cat([piece[1] for piece in pieces])
            samples = None
            if num_samples > 1:  # spread of sampled token rollouts, recentred on the conditional mean
                sampled = self._predict(context_ids, horizon, mode="sample", num_samples=num_samples, **sampling,
                                        **identity)
                samples = point[:, None] + (sampled.samples - sampled.forecast[:, None])
            if self.population_readout is not None:
                past = values if values is not None else self.decode(context_ids)
                point, quantiles, samples = self.population_readout.apply(past, point, quantiles, samples)
            levels = tuple(self.model.config.quantile_levels) if quantiles is not None else None
            result = ForecastResult(forecast=point, samples=samples, codes=context_ids[:, None], quantiles=quantiles,
                                    quantile_levels=levels)
        else:
            result = self._predict(context_ids, horizon, mode=mode, num_samples=num_samples, **sampling, **identity)
        # the one device -> host transfer, after the model is done (the model may sit on a GPU)
        return result if return_tensors else to_numpy(result)

    def _predict(self, context_ids: torch.Tensor, horizon: int, **rollout_kwargs) -> ForecastResult:
        """The model call: context codes (batch, neurons, steps) -> `horizon` z-scored frames after the context, as
        tensors on the model's device. Token rollouts only; the continuous head's forecast is `direct`."""
        new_steps = -(-horizon // self.window_size)
        codes = self.rollout(context_ids, new_steps, **rollout_kwargs)
        # The decoder sees context and rollout together so the seam is decoded with its left context.
        decoded = self.decode(codes)  # (batch, samples, neurons, frames)
        context_frames = context_ids.shape[-1] * self.window_size
        future = decoded[..., context_frames : context_frames + horizon]
        samples = future if future.shape[1] > 1 else None
        return ForecastResult(forecast=future.mean(dim=1), samples=samples, codes=codes)

    def forecast_traces(
        self,
        traces: np.ndarray,
        horizon: int,
        processor=None,
        sampling_rate: float | None = None,
        mean: np.ndarray | None = None,
        std: np.ndarray | None = None,
        max_context_frames: int | None = None,
        **forecast_kwargs,
    ) -> dict:
        """Forecast raw traces `(batch, neurons, frames)` (or `(neurons, frames)`) in their own units and rate.

        `processor` (a `CalmTraceProcessor`; default: one matching the model config) resamples (end aligned),
        z-scores and crops; the model forecasts at its rate; the processor maps the forecast back. Returns a dict
        with `forecast` `(batch, neurons, horizon)`, `samples` `(batch, samples, neurons, horizon)` or None, and
        the processor's `features`."""
        if processor is None:
            from .processing_calm import CalmTraceProcessor

            processor = CalmTraceProcessor.from_model_config(self.model.config)
        features = processor(traces, sampling_rate=sampling_rate, mean=mean, std=std, max_frames=max_context_frames)
        fs = features["sampling_rate"]
        result = self.forecast(features["input_values"], horizon=processor.model_horizon(horizon, fs), **forecast_kwargs)
        forecast = processor.postprocess_forecast(result.forecast, features, horizon)
        samples = None if result.samples is None else processor.postprocess_forecast(result.samples, features, horizon)
        return {"forecast": forecast, "samples": samples, "features": features}


def split_identities(config, reference_split, sessions: dict[int, int]) -> dict[int, torch.Tensor]:
    """Data-identity models (`config`): each session's neuron identity `(neurons, identity_size)` from its trials in
    `reference_split` (a dataset split with `input_values` and `session_id`, e.g. the training split; all of them), or
    the zero-shot identity where `reference_split` is None or holds no trial of it. `sessions`: session id -> neurons."""
    trials: dict[int, list] = {}
    if reference_split is not None:
        rows = reference_split.with_format("numpy", columns=["input_values", "session_id"])
        for start in range(0, len(rows), 256):
            batch = rows[start : start + 256]
            for values, session in zip(batch["input_values"], batch["session_id"]):
                trials.setdefault(int(session), []).append(np.asarray(values, dtype=np.float32))
    settings = identity_settings(config)
    return {int(session): compute_neuron_identity(
                torch.as_tensor(np.stack(trials[int(session)])) if int(session) in trials else None, num_neurons,
                **settings)
            for session, num_neurons in sessions.items()}


def session_identities(forecaster: CalmForecaster, reference_split, sessions) -> dict[int, torch.Tensor]:
    """`split_identities` for `forecaster`'s model, on its device."""
    return {session: identity.to(forecaster.device)
            for session, identity in split_identities(forecaster.model.config, reference_split, sessions).items()}


def _forecast_batch(forecaster: CalmForecaster, batch: dict, context_frames: int,
                    identities: dict[int, torch.Tensor] | None = None, **forecast_kwargs):
    """(forecast, truth) `(batch, neurons, frames - context_frames)` of a batch of dataset rows (numpy format)."""
    window = forecaster.window_size
    values = np.stack(list(batch["input_values"])).astype(np.float32)  # (B, N, F)
    frames = values.shape[-1]
    if frames <= context_frames:
        raise ValueError(f"trials have {frames} frames, not more than the context of {context_frames}: nothing to "
                         "forecast.")
    ids = torch.as_tensor(np.stack(list(batch["input_ids"])).astype(np.int64))[..., : context_frames // window]
    if identities is not None:  # a data-identity model: who each neuron is comes from its session's reference
        forecast_kwargs["neuron_identity"] = torch.stack([identities[int(s)] for s in batch["session_id"]])
    else:
        forecast_kwargs["neuron_ids"] = torch.as_tensor(np.stack(list(batch["neuron_ids"])).astype(np.int64))
        forecast_kwargs["session_ids"] = torch.as_tensor(np.asarray(batch["session_id"], dtype=np.int64))
    result = forecaster.forecast(values[..., :context_frames], horizon=frames - context_frames, context_ids=ids,
                                 **forecast_kwargs)
    return result.forecast, values[..., context_frames:]


def evaluate_forecasting(
    forecaster: CalmForecaster,
    dataset,
    context_frames: int = 40,
    batch_size: int = 8,
    mode: str | None = None,
    num_samples: int = 1,
    temperature: float = 1.0,
    max_trials: int | None = None,
    return_predictions: bool = False,
    progress: bool = True,
    reference_split=None,
) -> dict:
    """Score forecasts on a split with the paper's protocol.

    Each row needs `input_values` (neurons, frames) z-scored, `input_ids` (neurons, steps) codes of the same trial,
    `neuron_ids` and `session_id`. The context is the first `context_frames` frames; the horizon is the rest of the
    trial. Pearson r per neuron over the horizon, averaged over neurons -> trials -> sessions, and MSE in z-scored
    units. `progress` shows a progress bar over the batches (rollouts are the slow part). A data-identity model
    computes each session's identity from its trials in `reference_split` (e.g. the training split; None: zero-shot).
    """
    try:  # imported here, not at the top: this file also ships inside checkpoints, without calm_hf's metrics
        from calm_hf.metrics.functional import forecast_pearson_r, mse
    except ImportError as error:  # pragma: no cover
        raise ImportError("evaluate_forecasting needs the calm_hf package (pip install calm_hf).") from error
    window = forecaster.window_size
    mode = default_forecast_mode(forecaster.model) if mode is None else mode
    if context_frames % window:
        raise ValueError(f"context_frames={context_frames} must be a multiple of the token window {window}.")
    rows = dataset if max_trials is None else dataset.select(range(min(max_trials, len(dataset))))
    columns = ["input_values", "input_ids", "neuron_ids", "session_id"]
    rows = rows.with_format("numpy", columns=columns)
    # sessions of different sizes cannot share a batch: batch trials of equal neuron count, score padded arrays
    counts = np.asarray([len(ids) for ids in rows["neuron_ids"]])
    order = np.argsort(counts, kind="stable")
    groups = [order[counts[order] == size] for size in np.unique(counts)]
    batches = [group[start : start + batch_size] for group in groups for start in range(0, len(group), batch_size)]
    width = int(counts.max())
    prediction = truth = None
    identities = None
    if forecaster.uses_data_identity:
        sessions = dict(zip(np.asarray(rows["session_id"]).tolist(), counts.tolist()))
        identities = session_identities(forecaster, reference_split, sessions)
    from tqdm.auto import tqdm

    for chosen in tqdm(batches, desc="Forecasting trials", unit="batch", disable=not progress):
        forecast, target = _forecast_batch(forecaster, rows[chosen.tolist()], context_frames, identities, mode=mode,
                                           num_samples=num_samples, temperature=temperature)
        if prediction is None:
            prediction = np.zeros((len(rows), width, forecast.shape[-1]), dtype=np.float32)
            truth = np.zeros_like(prediction)
        prediction[chosen, : forecast.shape[1]] = forecast
        truth[chosen, : target.shape[1]] = target
    session_ids = np.asarray(rows["session_id"])
    neuron_mask = np.arange(width)[None, :] < counts[:, None]
    mask = None if neuron_mask.all() else neuron_mask
    scores = forecast_pearson_r(prediction, truth, session_ids=session_ids, neuron_mask=mask)
    metrics = {"pearson_r": float(scores["pearson_r"]), "mse": float(mse(prediction, truth, mask=mask))}
    metrics["per_session_pearson_r"] = {str(k): float(v) for k, v in scores["per_session"].items()}
    if return_predictions:
        metrics["predictions"] = prediction
        metrics["truth"] = truth
        metrics["session_ids"] = session_ids
        if mask is not None:  # trials of smaller sessions are zero-padded to the largest
            metrics["neuron_mask"] = mask
    return metrics


def _probe_rows(dataset, max_trials: int):
    """Evenly spaced trials (splits are often grouped by session), keeping only sessions with at least two of them."""
    chosen = np.unique(np.linspace(0, len(dataset) - 1, min(max_trials, len(dataset))).round().astype(int))
    chosen_sessions = np.asarray(dataset.select(chosen.tolist())["session_id"])
    counts = {s: int((chosen_sessions == s).sum()) for s in np.unique(chosen_sessions)}
    chosen = [int(i) for i, s in zip(chosen, chosen_sessions) if counts[s] > 1]
    if not chosen:
        raise ValueError(
            f"no session has two trials among the {min(max_trials, len(dataset))} probed: the probe swaps the population "
            "with another trial of the same session; raise max_trials or give more trials."
        )
    return dataset.select(chosen).with_format("numpy", columns=["input_values", "input_ids", "neuron_ids", "session_id"])


def _swap_partners(sessions: np.ndarray, seed: int) -> np.ndarray:
    """For each trial, another trial of the same session (drawn with `seed`) whose population replaces its own."""
    rng = np.random.default_rng(seed)
    trials = len(sessions)
    partner = np.empty(trials, dtype=np.int64)
    for i in range(trials):
        same = np.flatnonzero((sessions == sessions[i]) & (np.arange(trials) != i))
        partner[i] = rng.choice(same)
    return partner


@torch.no_grad()
def _probe_pass(model, ids: torch.Tensor, neuron_ids: torch.Tensor, session_ids: torch.Tensor,
                partner: np.ndarray | None, block_neurons: int, context_steps: int, horizon: int,
                values: torch.Tensor | None = None, neuron_identity: torch.Tensor | None = None):
    """Teacher-forced CE (summed, nats) and, when `horizon > 0`, the direct forecasts `(trials, neurons, horizon)`,
    scoring `block_neurons` neurons at a time; with `partner`, every other neuron's tokens come from the partner
    trial. `values` (the trials' own traces) feed the head's raw-trace highway, which reads each neuron's own trace
    only, so the scored block's forecasts see their own traces either way."""
    import torch.nn.functional as F

    trials, neurons, _ = ids.shape
    ce_total, preds = 0.0, np.zeros((trials, neurons, max(horizon, 0)), dtype=np.float32)
    for start in range(0, neurons, block_neurons):
        keep = slice(start, min(start + block_neurons, neurons))
        grid = ids
        if partner is not None:
            grid = ids[torch.as_tensor(partner, device=ids.device)].clone()
            grid[:, keep] = ids[:, keep]
        extra = {"value_inputs": values} if values is not None else {}
        if neuron_identity is not None:  # who each neuron is stays: only the other neurons' activity is swapped
            extra["neuron_identity"] = neuron_identity
        out = model(input_ids=grid, neuron_ids=neuron_ids, session_ids=session_ids, use_cache=False, return_dict=True,
                    **extra)
        logits = out.logits[:, keep, :-1].float()
        ce_total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, keep, 1:].reshape(-1),
                                          reduction="sum"))
        if horizon > 0:
            pred = out.value_predictions[:, keep, context_steps - 1, :horizon].float().cpu().numpy()
            preds[:, keep, : pred.shape[-1]] = pred
    return ce_total, preds


@torch.no_grad()
def trial_swap_probe(
    model,
    dataset,
    context_frames: int = 40,
    max_trials: int = 60,
    block_neurons: int | None = None,
    seed: int = 0,
    identities: dict[int, torch.Tensor] | None = None,
) -> dict:
    """Does the model use the other neurons' activity? Scores every neuron twice: with the true population, and
    with every OTHER neuron's tokens taken from a different trial of the same session (its own tokens kept).

    A model that forecasts each neuron from its own history and identity scores the same both ways; a model of
    population dynamics loses accuracy when the population comes from another trial. Neurons are scored in blocks
    of `block_neurons` (the block keeps its true tokens, everything else is swapped) to bound the cost.

    Each row needs `input_values` (neurons, frames), `input_ids`, `neuron_ids`, `session_id`. A data-identity model
    takes each session's identity from `identities` (`session_identities`; zero-shot where missing).

    Returns:
        `dict` with `next_token_ce` / `next_token_ce_swapped` (teacher-forced, nats) and, for models with a
        continuous head, `pearson_r` / `pearson_r_swapped` and `mse` / `mse_swapped` of the direct forecast of
        the frames after `context_frames`, plus `trials`.
    """
    try:  # not at the top (and inside try, which transformers' remote-code import check skips): this file ships
        from calm_hf.metrics.functional import forecast_pearson_r, mse  # inside checkpoints, without calm_hf
    except ImportError as error:  # pragma: no cover
        raise ImportError("trial_swap_probe needs the calm_hf package (pip install calm_hf).") from error

    model = model.eval()
    device = next(model.parameters()).device  # the probe runs where the model is; only scores come back to the host
    rows = _probe_rows(dataset, max_trials)
    values = np.stack(list(rows["input_values"])).astype(np.float32)
    ids = torch.as_tensor(np.stack(list(rows["input_ids"])).astype(np.int64), device=device)
    neuron_ids = torch.as_tensor(np.stack(list(rows["neuron_ids"])).astype(np.int64), device=device)
    sessions = np.asarray(rows["session_id"], dtype=np.int64)
    trials, neurons, steps = ids.shape
    block_neurons = max(1, -(-neurons // 4)) if block_neurons is None else int(block_neurons)
    partner = _swap_partners(sessions, seed)
    session_ids = torch.as_tensor(sessions, device=device)
    context_steps = context_frames // model.config.window_size
    horizon = values.shape[-1] - context_frames

    has_head = getattr(model, "value_head", None) is not None
    highway_values = None
    if getattr(model.config, "value_skip_windows", 0) > 0:
        highway_values = torch.as_tensor(values[..., : steps * model.config.window_size], device=device)
    neuron_identity = None
    if getattr(model.config, "neuron_identity", "table") == "data":
        identities = identities or {}
        zero = torch.zeros(neurons, config_identity_size(model.config), device=device)
        neuron_identity = torch.stack([identities.get(int(s), zero).to(device) for s in sessions])
    results = {}
    for label, swapped in (("", False), ("_swapped", True)):
        ce_total, preds = _probe_pass(model, ids, neuron_ids, session_ids, partner if swapped else None, block_neurons,
                                      context_steps, horizon if has_head else 0, highway_values, neuron_identity)
        results[f"next_token_ce{label}"] = ce_total / ids[:, :, 1:].numel()
        if has_head:
            truth = values[..., context_frames:]
            chunk = min(horizon, model.config.value_head_steps * model.config.window_size)
            results[f"pearson_r{label}"] = float(
                forecast_pearson_r(preds[..., :chunk], truth[..., :chunk], session_ids=sessions)["pearson_r"]
            )
            results[f"mse{label}"] = float(mse(preds[..., :chunk], truth[..., :chunk]))
    results["trials"] = int(trials)
    return results
