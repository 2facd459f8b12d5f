"""Held-out evaluation of a foundation CalM: recordings its pretraining corpus never saw, with k training trials each.

Held-out sets (`heldout_set`):
- `sim_in`: simulated sessions drawn from the corpus' ranges (`calm_hf.data.corpus.SIMULATION_RANGES`) with seeds
  the corpus never uses;
- `sim_out`: simulated sessions drawn OUTSIDE those ranges (`OUT_OF_RANGE`);
- `sim_paper`: the paper's simulation protocol (rate RNN, g = 1.6, 200 neurons);
- `zebrafish`: the Triplett et al. tectum recording, 20-s trials;
- `park`: the two Park et al. mice the corpus leaves out (`mrcuts27`, `mrcuts28`), 3-s trials.

For each k, every model sees the first k trials of one seeded permutation of each session's training split (nested:
the 4 are among the 16), the session's validation split (for choosing hyperparameters and early stopping only), and
is scored on its test split: Pearson r (per neuron over the horizon, then neurons -> trials -> sessions), MSE, 5-95%
coverage and CRPS from quantiles at `calm_hf.metrics.probabilistic.CRPS_LEVELS` (CalM: its quantile head; the point
baselines: Gaussian bands of their validation residuals). The main job reports a few of these cells in the model
card; `benchmarks/foundation.py` runs them all, with adaptation, a TCN and training from scratch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from .metrics.probabilistic import CRPS_LEVELS, interval_coverage, quantile_crps, residual_quantiles, residual_scale

HELDOUT_SEED = 9_000  # seed namespace of the held-out simulated sessions (a corpus draws from its own seed)
K_VALUES = ("0", "4", "16", "64", "all")
SETS = ("sim_in", "sim_out", "sim_paper", "zebrafish", "park")
REAL_SETS = {"zebrafish": ("zebrafish/zf_20151104-f1",), "park": ("park/mrcuts27", "park/mrcuts28")}
BAND_LEVELS = (0.05, 0.95)  # the 90% band whose coverage is reported


def heldout_set(name: str, sessions: int = 3, trials: int = 48, paper_trials: int = 120, seed: int = 0,
                max_neurons: int | None = None, data_dir: str | None = None) -> list:
    """The prepared sessions (z-scored with their own training trials, at the model rate) of held-out set `name`."""
    from .data import SimulationConfig, prepare_session, simulate_session
    from .data.corpus import draw_simulation_config, real_sessions

    if name in REAL_SETS:
        return [prepare_session(session, split_seed=seed) for session in real_sessions(REAL_SETS[name], data_dir)]
    if name in ("sim_in", "sim_out"):
        configs = [draw_simulation_config(np.random.default_rng([HELDOUT_SEED + seed, index, name == "sim_out"]),
                                          name=f"{name}-{index}", seed=HELDOUT_SEED + 97 * index + seed,
                                          num_trials=trials, out_of_range=name == "sim_out")
                   for index in range(sessions)]
    elif name == "sim_paper":
        configs = [SimulationConfig(num_trials=paper_trials, num_behavior_channels=0, name=f"paper-{index}",
                                    seed=HELDOUT_SEED + index + seed) for index in range(sessions)]
    else:
        raise ValueError(f"unknown held-out set {name!r}; choose from {list(SETS)}.")
    if max_neurons:
        for config in configs:
            config.num_neurons = min(config.num_neurons, max_neurons)
    return [prepare_session(simulate_session(config), split_seed=seed) for config in configs]


def context_frames(session) -> int:
    """40 frames (8 s at 5 Hz) where trials are long enough, else two thirds of the trial in whole token windows."""
    if session.num_frames >= 60:
        return 40
    return max(session.window_size, (2 * session.num_frames // 3) // session.window_size * session.window_size)


def k_subsets(session, seed: int = 0, ks: tuple[str, ...] = K_VALUES) -> dict[str, np.ndarray]:
    """Nested subsets of the training split: the first k trials of one seeded permutation (k < the split's size;
    "all" is every training trial)."""
    order = np.random.default_rng([seed, 17]).permutation(session.splits["train"])
    subsets = {}
    for k in ks:
        if k == "all":
            subsets[k] = order
        elif int(k) < len(order):
            subsets[k] = order[: int(k)]
    return subsets


def scores(pred: np.ndarray, truth: np.ndarray, quantiles: np.ndarray, levels=CRPS_LEVELS) -> dict[str, float]:
    """r, MSE, 5-95% coverage and CRPS of a forecast with its quantiles `(levels, trials, neurons, horizon)`."""
    from .metrics.functional import forecast_pearson_r, mse

    lower, upper = levels.index(BAND_LEVELS[0]), levels.index(BAND_LEVELS[1])
    return {"pearson_r": float(forecast_pearson_r(pred, truth)["pearson_r"]), "mse": float(mse(pred, truth)),
            "coverage_90": interval_coverage(quantiles[lower], quantiles[upper], truth),
            "crps": quantile_crps(quantiles, levels, truth)}


def pooled(per_session: list[dict]) -> dict[str, float]:
    """The mean over sessions of every float score (for r: the session level of neurons -> trials -> sessions)."""
    keys = [key for key, value in per_session[0].items() if isinstance(value, float)]
    out = {}
    for key in keys:  # NaN where no session has a value (e.g. r of a forecast that is constant over the horizon)
        values = np.asarray([row[key] for row in per_session], dtype=np.float64)
        out[key] = float(values[np.isfinite(values)].mean()) if np.isfinite(values).any() else float("nan")
    return out


def baseline_forecasters(k: str, context: int, tcn_seconds: float | None = None, seed: int = 0) -> dict[str, Any]:
    """The baselines of cell k: context-only ones always; with training trials also ridge AR, per-neuron AR, the
    training-trial mean and (with `tcn_seconds`) a causal TCN."""
    from .baselines import MeanForecaster, PerNeuronARForecaster, RidgeARForecaster, TCNForecaster
    from .baselines.context import ContextARForecaster, LastSecondMeanForecaster

    lags = tuple(lag for lag in (1, 2, 4, 8, 16) if lag <= context)
    models: dict[str, Any] = {"last_second_mean": LastSecondMeanForecaster(context=context),
                              "context_ar": ContextARForecaster(context=context)}
    if k != "0":
        models.update(ridge_ar=RidgeARForecaster(context=context, lags_grid=lags),
                      per_neuron_ar=PerNeuronARForecaster(context=context, lags_grid=lags),
                      train_mean=MeanForecaster(context=context))
        if tcn_seconds:
            models["tcn"] = TCNForecaster(context=context, max_seconds=tcn_seconds, seed=seed, hidden_size=64,
                                          max_val_trials=32)
    return models


def baseline_scores(session, train_index: np.ndarray, k: str, test_trials: int | None = None,
                    tcn_seconds: float | None = None, seed: int = 0) -> dict[str, dict]:
    """Every baseline of cell k fitted on the session's trials `train_index` (hyperparameters on its validation
    split) and scored on its test split."""
    context = context_frames(session)
    train, val = session.traces[train_index], session.split("validation")
    test = session.split("test")[:test_trials]
    truth = test[:, :, context:]
    out = {}
    for name, model in baseline_forecasters(k, context, tcn_seconds, seed).items():
        model.fit(train if len(train) else None, val)
        pred = np.asarray(model.predict(test[:, :, :context], truth.shape[-1]), dtype=np.float64)
        val_pred = np.asarray(model.predict(val[:, :, :context], truth.shape[-1]), dtype=np.float64)
        out[name] = scores(pred, truth, residual_quantiles(pred, residual_scale(val_pred, val[:, :, context:])))
    return out


def calm_scores(forecaster, session, reference_index: np.ndarray, test_trials: int | None = None) -> dict:
    """CalM's direct forecast of the session's test trials, its identity computed from the trials `reference_index`
    (none: zero-shot), scored with the quantile head's bands."""
    context = context_frames(session)
    test = session.split("test")[:test_trials]
    reference = session.traces[reference_index] if len(reference_index) else None
    result = forecaster.forecast(test[:, :, :context], horizon=test.shape[-1] - context, reference=reference)
    if result.quantile_levels != CRPS_LEVELS:
        raise ValueError(f"the model's quantile levels {result.quantile_levels} are not the scoring grid "
                         f"{CRPS_LEVELS}: score it with its own levels.")
    return scores(result.forecast, test[:, :, context:], np.moveaxis(result.quantiles, -1, 0))


def swap_probe_scores(forecaster, session, reference_index: np.ndarray, test_trials: int | None = None,
                      seed: int = 0, blocks: int = 4, identity=None) -> dict[str, float]:
    """The trial-swap probe on the session's test trials: CalM's r and MSE with the true population, and with the
    other neurons' activity taken from another test trial (the neurons are scored in `blocks` groups; each group keeps
    its own traces, every neuron its identity). `identity`: the neurons' identity when the caller has it already
    (default: from the trials `reference_index`, as `calm_scores` reads it)."""
    from .metrics.functional import forecast_pearson_r, mse

    context = context_frames(session)
    test = session.split("test")[:test_trials]
    if len(test) < 2:
        return {}
    horizon = test.shape[-1] - context
    if identity is None:
        identity = (forecaster.reference_identity(session.traces[reference_index], context, horizon)[0]
                    if len(reference_index) else forecaster.neuron_identity(None, num_neurons=session.num_neurons))
    truth = test[:, :, context:]
    partner = (np.arange(len(test)) + 1 + np.random.default_rng(seed).integers(len(test) - 1)) % len(test)
    true = forecaster.forecast(test[:, :, :context], horizon, neuron_identity=identity).forecast
    swapped = np.zeros_like(true)
    for group in np.array_split(np.arange(session.num_neurons), min(blocks, session.num_neurons)):
        mixed = test[partner, :, :context].copy()
        mixed[:, group] = test[:, group, :context]
        swapped[:, group] = forecaster.forecast(mixed, horizon, neuron_identity=identity).forecast[:, group]
    return {"pearson_r": float(forecast_pearson_r(true, truth)["pearson_r"]),
            "pearson_r_swapped": float(forecast_pearson_r(swapped, truth)["pearson_r"]),
            "mse": float(mse(true, truth)), "mse_swapped": float(mse(swapped, truth))}


def evaluate_heldout(forecaster, sets: dict[str, list], ks: tuple[str, ...] = ("0", "16"), test_trials: int | None = None,
                     tcn_seconds: float | None = None, seed: int = 0, extra: Callable | None = None,
                     log: Callable[[str], None] | None = None) -> dict[str, dict]:
    """`{set: {k: {model: scores}}}` for CalM (`forecaster`, None to skip it) and the baselines on every session of
    every set (`{name: sessions}` from `heldout_set`), pooled over sessions. `extra(session, train_index, k)` may add
    more rows per cell (the benchmark's adapted and from-scratch CalMs)."""
    results: dict[str, dict] = {}
    for name, sessions in sets.items():
        cells: dict[str, dict[str, list]] = {}
        for session in sessions:
            for k, index in k_subsets(session, seed, ks).items():
                rows = baseline_scores(session, index, k, test_trials, tcn_seconds, seed)
                if forecaster is not None:
                    rows["calm"] = calm_scores(forecaster, session, index, test_trials)
                if extra is not None:
                    rows.update(extra(session, index, k))
                for model, row in rows.items():
                    cells.setdefault(k, {}).setdefault(model, []).append(row)
                if log is not None:
                    log(f"{name} {session.name} k={k}: " + ", ".join(
                        f"{m} {r['pearson_r']:.3f}/{r['mse']:.3f}" for m, r in rows.items() if "mse" in r))
        results[name] = {k: {model: pooled(rows) for model, rows in models.items()} for k, models in cells.items()}
    return results


def best_baseline(models: dict[str, dict], metric: str = "pearson_r") -> tuple[str, dict] | None:
    """(name, scores) of the best non-CalM model of a cell by `metric` (higher r, or lower MSE / CRPS)."""
    lower_is_better = metric in ("mse", "crps")
    candidates = {name: row for name, row in models.items()
                  if not name.startswith("calm") and math.isfinite(row.get(metric, float("nan")))}
    if not candidates:
        return None
    pick = (min if lower_is_better else max)(candidates, key=lambda name: candidates[name][metric])
    return pick, candidates[pick]


__all__ = ["K_VALUES", "SETS", "baseline_scores", "best_baseline", "calm_scores", "context_frames",
           "evaluate_heldout", "heldout_set", "k_subsets", "pooled", "scores", "swap_probe_scores"]
