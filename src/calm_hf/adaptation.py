"""Fitting a data-identity CalM to one recording: fine-tuning from a pretrained checkpoint (`adapt`), or training the
same architecture from scratch (`train_from_scratch`, the control that shows what pretraining buys).

Both run the same loop on the recording's training trials `(trials, neurons, frames)` (z-scored, model rate): each
step takes a few trials (at most `max_neurons` random neurons of them), gives their neurons the identity computed from
the *other* training trials (so a trial never informs its own identity), and minimises the model's loss (next-token
cross-entropy, the continuous head's MSE, the quantile head's pinball loss). Every `eval_every` steps the forecast of
the validation trials (identity from all training trials) is scored; the weights with the best validation Pearson r
are kept (a later state replaces them only with a `significant_gain`) and training stops after `patience` evaluations
without a gain in mean r, or at the time budget. `calm adapt` runs
this on a tokenized dataset; `benchmarks/foundation.py` on each held-out recording.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch

from .forecasting import IDENTITY_CHOICES, CalmForecaster, pick_identity, significant_gain, trial_pearson_r
from .metrics.functional import mse
from .population_readout import (DEFAULT_BLOCKS, PerNeuronTerm, PopulationReadout, frame_blocks, mix_weights,
                                 shape_forecast)

logger = logging.getLogger(__name__)


@dataclass
class AdaptationSettings:
    """How `adapt` and `train_from_scratch` train (the defaults are the recipe `benchmarks/foundation.py` measured).

    Args:
        learning_rate: AdamW learning rate (fine-tuning starts from pretrained weights: small).
        max_steps: optimizer steps at most.
        max_seconds: wall-clock budget of the loop (evaluations included).
        batch_size: trials per step.
        max_neurons: random neurons per trial of a step (all when the recording has fewer).
        eval_every: steps between validation forecasts.
        patience: evaluations without a better validation r before stopping.
        weight_decay: AdamW weight decay.
        seed: seed of the trial and neuron draws.
        choose_identity: before fine-tuning, forecast the validation trials with the whole identity, without its
            coupling factors and with the zero-shot identity, and keep the one `pick_identity` chooses
            (`choose_identity`; `adapt` only).
    """

    learning_rate: float = 3e-4
    max_steps: int = 600
    max_seconds: float = 180.0
    batch_size: int = 4
    max_neurons: int = 64
    eval_every: int = 25
    patience: int = 4
    weight_decay: float = 0.01
    seed: int = 0
    choose_identity: bool = True

    def __post_init__(self):
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be a positive number, got {self.learning_rate!r}.")
        for name in ("max_steps", "batch_size", "max_neurons", "eval_every", "patience"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)!r}.")
        if not self.max_seconds > 0:
            raise ValueError(f"max_seconds must be positive, got {self.max_seconds!r}.")


SCRATCH_LEARNING_RATE = 3e-3  # a fresh model trains at the pretraining learning rate of the cpu recipe


def _check_trials(name: str, trials, window: int, min_trials: int) -> np.ndarray:
    array = np.asarray(trials, dtype=np.float32)
    if array.ndim != 3:
        raise ValueError(f"{name} must be (trials, neurons, frames), got shape {array.shape}.")
    if len(array) < min_trials:
        raise ValueError(f"{name} has {len(array)} trials; adapting needs at least {min_trials}.")
    if array.shape[-1] < 2 * window:
        raise ValueError(f"{name} trials have {array.shape[-1]} frames, fewer than two token windows ({2 * window}).")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} hold NaN/Inf values: clean the traces first.")
    return array[..., : array.shape[-1] // window * window]


def validation_r(forecaster: CalmForecaster, val: np.ndarray, context_frames: int, identity: torch.Tensor) -> float:
    """Forecast Pearson r of the validation trials' frames after `context_frames` (the early-stopping criterion)."""
    return mean_r(validation_trial_r(forecaster, val, context_frames, identity))


def validation_trial_r(forecaster: CalmForecaster, val: np.ndarray, context_frames: int,
                       identity: torch.Tensor) -> np.ndarray:
    """Per validation trial, the forecast Pearson r of its frames after `context_frames` (averaged over neurons)."""
    result = forecaster.forecast(val[:, :, :context_frames], horizon=val.shape[-1] - context_frames,
                                 neuron_identity=identity)
    return trial_pearson_r(result.forecast, val[:, :, context_frames:])


def mean_r(per_trial: np.ndarray) -> float:
    """The mean over trials of per-trial r (`forecast_pearson_r` of one session); -inf when nothing could be scored."""
    finite = per_trial[np.isfinite(per_trial)]
    return float(finite.mean()) if len(finite) else -math.inf


def _batch(forecaster: CalmForecaster, train: np.ndarray, rng: np.random.Generator, settings: AdaptationSettings):
    """A training batch: codes, traces, and each trial's identity from the other training trials."""
    trials = rng.choice(len(train), size=min(settings.batch_size, len(train)), replace=False)
    neurons = train.shape[1]
    subset = np.sort(rng.choice(neurons, size=min(neurons, settings.max_neurons), replace=False))
    values = torch.as_tensor(train[trials][:, subset], device=forecaster.device)
    identities = []
    for trial in trials:
        others = np.delete(np.arange(len(train)), trial)
        identities.append(forecaster.neuron_identity(train[others][:, subset] if len(others) else None,
                                                     num_neurons=len(subset)))
    codes = forecaster.tokenize(values)
    return {"input_ids": codes, "labels": codes, "value_labels": values, "neuron_identity": torch.stack(identities)}


def _fit(forecaster: CalmForecaster, train, val, context_frames: int, settings: AdaptationSettings,
         initial_r: np.ndarray | None = None) -> tuple:
    """The loop shared by `adapt` and `train_from_scratch` (see the module docstring). `initial_r`: the per-trial
    validation r of the model as it is, when the caller has just measured it with the same identity. A state becomes
    the best only with a `significant_gain` over the best so far; any gain in mean r resets the patience."""
    model = forecaster.model
    if getattr(model.config, "neuron_identity", "table") != "data":
        raise ValueError("adapt / train_from_scratch fit data-identity models; a table model learns a session's rows "
                         "with `calm adapt --session_name ...`.")
    window = model.config.window_size
    train = _check_trials("train_trials", train, window, 2)
    val = _check_trials("val_trials", val, window, 1)
    if not window <= context_frames < val.shape[-1]:
        raise ValueError(f"context_frames={context_frames} must leave frames to forecast in {val.shape[-1]}-frame "
                         "validation trials.")
    rng = np.random.default_rng(settings.seed)
    torch.manual_seed(settings.seed)
    identity = forecaster.neuron_identity(train)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.learning_rate,
                                  weight_decay=settings.weight_decay)
    start = time.perf_counter()
    if initial_r is None:
        initial_r = validation_trial_r(forecaster, val, context_frames, identity)
    best = {"trials": np.asarray(initial_r, dtype=np.float64), "step": 0, "state": copy.deepcopy(model.state_dict())}
    best["r"] = top = mean_r(best["trials"])
    history, stale, step = [(0, best["r"])], 0, 0
    while step < settings.max_steps and time.perf_counter() - start < settings.max_seconds and stale < settings.patience:
        model.train()
        for _ in range(settings.eval_every):
            loss = model(**_batch(forecaster, train, rng, settings)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            step += 1
            if step >= settings.max_steps or time.perf_counter() - start >= settings.max_seconds:
                break
        model.eval()
        trials = validation_trial_r(forecaster, val, context_frames, identity)
        score = mean_r(trials)
        history.append((step, score))
        if significant_gain(trials, best["trials"]):
            best = {"trials": trials, "r": score, "step": step, "state": copy.deepcopy(model.state_dict())}
        stale = 0 if score > top else stale + 1
        top = max(top, score)
    model.load_state_dict(best["state"])
    model.eval()
    model.config.identity_fixed = True  # fitted to this recording: its identity is not chosen again
    info = {"best_validation_pearson_r": best["r"], "best_step": best["step"], "steps": step,
            "seconds": round(time.perf_counter() - start, 1), "validation_history": history,
            "settings": asdict(settings)}
    logger.info("fitted %d steps in %.0f s; best validation r %.3f at step %d", step, info["seconds"], best["r"],
                best["step"])
    return forecaster, info


def choose_identity(forecaster: CalmForecaster, train_trials, val_trials, context_frames: int) -> dict:
    """How much of this recording's data identity `forecaster`'s model reads: its validation trials are forecast with
    the identity from `train_trials` whole, without its coupling factors (`config.identity_coupling`) and as the
    zero-shot identity (`config.identity_reference`), and the config keeps the one `pick_identity` chooses by the
    per-trial Pearson r (the early-stopping criterion). A model whose config already fixes the identity or leaves a
    part out is not changed. Returns every score (mean r) and the choice."""
    config = forecaster.model.config
    given = (bool(getattr(config, "identity_coupling", True)), bool(getattr(config, "identity_reference", True)))
    if (getattr(config, "neuron_identity", "table") != "data" or getattr(config, "identity_fixed", False)
            or given != IDENTITY_CHOICES["full"]):
        return {"chosen": None}
    window = config.window_size
    train = _check_trials("train_trials", train_trials, window, 2)
    val = _check_trials("val_trials", val_trials, window, 1)
    per_trial = {name: validation_trial_r(forecaster, val, context_frames,
                                          forecaster.neuron_identity(train, choice=name))
                 for name in IDENTITY_CHOICES}
    scores = {name: mean_r(r) for name, r in per_trial.items()}
    chosen = pick_identity(per_trial)
    config.identity_coupling, config.identity_reference = IDENTITY_CHOICES[chosen]
    logger.info("validation r by identity: %s; reading the %s identity",
                ", ".join(f"{name} {score:.4f}" for name, score in scores.items()), chosen.replace("_", "-"))
    return {"chosen": chosen, "validation_r": scores,
            "validation_trial_r": {name: [float(v) for v in r] for name, r in per_trial.items()}}


def adapt(forecaster: CalmForecaster, train_trials, val_trials, context_frames: int = 40,
          settings: AdaptationSettings | None = None) -> tuple[CalmForecaster, dict]:
    """Fine-tune a copy of `forecaster`'s model on one recording's training trials, stopped on its validation
    trials; returns `(forecaster of the adapted copy, info)`. With `settings.choose_identity` the copy first chooses
    how much of the recording's data identity it reads by its validation trials (`choose_identity`). The original
    model is left untouched."""
    settings = settings or AdaptationSettings()
    model = copy.deepcopy(forecaster.model)
    model.requires_grad_(True)
    adapted = CalmForecaster(model, forecaster.tokenizer, autocast_dtype=forecaster.autocast_dtype)
    identity = (choose_identity(adapted, train_trials, val_trials, context_frames)
                if settings.choose_identity else None)
    initial_r = (np.asarray(identity["validation_trial_r"][identity["chosen"]]) if identity and identity["chosen"]
                 else None)
    adapted, info = _fit(adapted, train_trials, val_trials, context_frames, settings, initial_r)
    if identity is not None:
        info["identity"] = identity
    return adapted, info


def train_from_scratch(forecaster: CalmForecaster, train_trials, val_trials, context_frames: int = 40,
                       settings: AdaptationSettings | None = None) -> tuple[CalmForecaster, dict]:
    """Train a fresh model of `forecaster`'s architecture (same tokenizer) on one recording, the highway started at
    its training trials' ridge forecast, stopped on validation; the control for what pretraining buys."""
    from .identity_init import init_value_skip

    settings = settings or AdaptationSettings(learning_rate=SCRATCH_LEARNING_RATE)
    torch.manual_seed(settings.seed)
    model = type(forecaster.model)(copy.deepcopy(forecaster.model.config)).to(forecaster.device)  # its own config
    if model.value_skip is not None:
        init_value_skip(model, list(np.asarray(train_trials, dtype=np.float32)))
    fresh = CalmForecaster(model, forecaster.tokenizer, autocast_dtype=forecaster.autocast_dtype)
    return _fit(fresh, train_trials, val_trials, context_frames, settings)


BAND_SCALE_GRID = tuple(float(s) for s in np.round(np.geomspace(0.5, 2.0, 13), 4))


def band_scales(point: np.ndarray, offsets: np.ndarray, levels, truth: np.ndarray, blocks: int,
                grid: tuple[float, ...] = BAND_SCALE_GRID) -> tuple[np.ndarray, dict]:
    """The factor on the band `offsets` `(..., horizon, levels)` (quantiles minus the network's point forecast) around
    `point` `(..., horizon)` in each of `blocks` parts of the horizon with the lowest mean pinball loss on `truth`
    (ties keep the factor nearest 1), and the validation pinball loss with factor 1 and with the chosen ones."""
    from .metrics.probabilistic import pinball_loss

    index = frame_blocks(truth.shape[-1], blocks)
    order = sorted(grid, key=lambda s: abs(math.log(s)))  # 1 first where it is in the grid
    scale = np.ones(blocks)
    for block in range(blocks):
        frames = np.flatnonzero(index == block)
        if not len(frames):
            scale[block] = scale[block - 1] if block else 1.0
            continue
        losses = [float(pinball_loss(np.moveaxis(point[..., frames, None] + s * offsets[..., frames, :], -1, 0),
                                     levels, truth[..., frames]).mean()) for s in order]
        scale[block] = order[int(np.argmin(losses))]
    per_frame = scale[index]

    def loss(factors):
        return float(pinball_loss(np.moveaxis(point[..., None] + factors[:, None] * offsets, -1, 0), levels,
                                  truth).mean())

    return scale, {"unscaled": loss(np.ones_like(per_frame)), "scaled": loss(per_frame)}


SHAPE_SCALE_GRID = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


def choose_shape(network: np.ndarray, blended: np.ndarray, truth: np.ndarray,
                 grid: tuple[float, ...] = SHAPE_SCALE_GRID) -> dict:
    """Whether the readout keeps the mix or the network's course at the mix's level (`shape_forecast`), from
    validation forecasts `(trials, neurons, horizon)`: the factor on the network's deviations with the lowest MSE
    (ties keep the one nearest 1), and the network's shape only with a `significant_gain` in per-trial r over the mix
    on two or more trials. Returns the choice, the factor and the scores."""
    order = sorted(grid, key=lambda s: abs(math.log(s)))
    errors = [mse(shape_forecast(network, blended, s), truth) for s in order]
    factor = float(order[int(np.argmin(errors))])
    mixed_r, shaped_r = trial_pearson_r(blended, truth), trial_pearson_r(network, truth)  # r ignores level and factor
    paired = np.isfinite(shaped_r - mixed_r).sum()
    shape = "network" if paired >= 2 and significant_gain(shaped_r, mixed_r) else "mix"
    return {"shape": shape, "scale": factor, "validation_r": {"mix": mean_r(mixed_r), "network": mean_r(shaped_r)},
            "validation_mse": {"mix": float(mse(blended, truth)), "network": float(min(errors))}}


def fit_population_readout(forecaster: CalmForecaster, train_trials, val_trials, context_frames: int,
                           blocks: int = DEFAULT_BLOCKS, lags_grid: tuple[int, ...] = (1, 2, 4, 8, 16),
                           per_neuron: bool = True) -> PopulationReadout:
    """The population readout of one recording (`calm_hf.population_readout`): a ridge AR across its neurons and a
    per-neuron AR fitted on `train_trials`, orders and penalties chosen on `val_trials` (both
    `(trials, neurons, frames)`, z-scored at the model rate like the context), and the mix of the network and the two
    ARs in each of `blocks` parts of the horizon chosen on the validation forecasts of `forecaster` (its own readout,
    if any, left out; neuron identity from `train_trials`), and the factor on the network's quantile band in each
    block (`band_scales`, by the validation pinball loss), after choosing whether the forecast keeps the mix's shape
    or the network's course at the mix's level (`choose_shape`). `per_neuron=False` mixes the network and the ridge
    AR only."""
    from .baselines import PerNeuronARForecaster, RidgeARForecaster

    train, val = (np.asarray(trials, dtype=np.float64) for trials in (train_trials, val_trials))
    for name, array in (("train_trials", train), ("val_trials", val)):
        if array.ndim != 3:
            raise ValueError(f"{name} must be (trials, neurons, frames), got shape {array.shape}.")
        if array.shape[-1] <= context_frames:
            raise ValueError(f"{name} trials have {array.shape[-1]} frames: nothing to forecast after a "
                             f"{context_frames}-frame context.")
        if not np.isfinite(array).all():
            raise ValueError(f"{name} hold NaN/Inf values: clean the traces first.")
    if train.shape[1] != val.shape[1]:
        raise ValueError(f"train_trials have {train.shape[1]} neurons, val_trials {val.shape[1]}: pass trials of the "
                         "same recording.")
    if int(blocks) < 1:
        raise ValueError(f"blocks must be a positive integer, got {blocks!r}.")
    lags = tuple(lag for lag in lags_grid if lag <= context_frames and lag < train.shape[-1]) or (1,)
    ridge = RidgeARForecaster(context=context_frames, lags_grid=lags).fit(train, val)
    context, truth = val[:, :, :context_frames], val[:, :, context_frames:]
    horizon = truth.shape[-1]
    forecasts = {"ridge_ar": np.asarray(ridge.predict(context, horizon), dtype=np.float64)}
    term = None
    if per_neuron:
        single = PerNeuronARForecaster(context=context_frames, lags_grid=lags).fit(train, val)
        term = PerNeuronTerm(single.weights_, single.bias_, single.lags_, single.mode_)
        forecasts["per_neuron_ar"] = term.predict(torch.as_tensor(context), horizon).double().numpy()
    attached, forecaster.population_readout = forecaster.population_readout, None
    try:
        result = forecaster.forecast(context.astype(np.float32), horizon, reference=train.astype(np.float32))
    finally:
        forecaster.population_readout = attached
    network_val = np.asarray(result.forecast, dtype=np.float64)
    # a term that diverges on validation contexts (or does not reach the horizon) gets no share
    usable = {name: f for name, f in forecasts.items() if f.shape[-1] == horizon and np.isfinite(f).all()}
    names = ["network", *usable]
    chosen = mix_weights([network_val, *usable.values()], truth, int(blocks))
    mix = np.zeros((int(blocks), 3))
    for column, name in enumerate(names):
        mix[:, {"network": 0, "ridge_ar": 1, "per_neuron_ar": 2}[name]] = chosen[:, column]
    blended = (chosen[frame_blocks(horizon, int(blocks))].T[:, None, None, :] *
               np.stack([network_val, *usable.values()])).sum(axis=0)
    shape = choose_shape(network_val, blended, truth)
    point = shape_forecast(network_val, blended, shape["scale"]) if shape["shape"] == "network" else blended
    scale, band_loss = np.ones(int(blocks)), None
    if result.quantiles is not None:
        scale, band_loss = band_scales(point, np.asarray(result.quantiles, dtype=np.float64) - network_val[..., None],
                                       result.quantile_levels, truth, int(blocks))
    readout = PopulationReadout(ridge.weights_, ridge.bias_, ridge.lags_, mix, horizon, per_neuron=term,
                                band_scale=scale, shape=shape["shape"], shape_scale=shape["scale"])
    readout.info = {"lags": ridge.lags_, "alpha": ridge.alpha_,
                    "per_neuron": None if term is None else {"mode": single.mode_, "lags": single.lags_,
                                                             "alpha": single.alpha_},
                    "network_weight": [float(w) for w in mix[:, 0]],
                    "mix": {name: [float(w) for w in mix[:, column]]
                            for column, name in enumerate(("network", "ridge_ar", "per_neuron_ar"))},
                    "band_scale": [float(s) for s in scale], "validation_pinball": band_loss,
                    "shape": shape,
                    "train_trials": len(train), "validation_trials": len(val),
                    "validation_mse": {"network": float(mse(network_val, truth)),
                                       **{name: float(mse(f, truth)) if np.isfinite(f).all() else math.inf
                                          for name, f in forecasts.items()},
                                       "blend": float(mse(blended, truth)), "readout": float(mse(point, truth))}}
    return readout


__all__ = ["AdaptationSettings", "adapt", "choose_identity", "fit_population_readout", "train_from_scratch",
           "validation_r"]
