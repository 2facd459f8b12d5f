"""Evaluation of a pretrained CalM on a tokenized corpus: forecasting (direct, greedy, sampled), the baselines fitted
on the same trials, tokenizer reconstruction and the trial-swap probe. The main job writes these numbers into the
model card (`calm_hf.publish.write_release`).
"""

from __future__ import annotations

import datasets
import numpy as np
import torch

from .baselines.forecasting import MeanForecaster, RidgeARForecaster
from .forecasting import CalmForecaster, evaluate_forecasting, trial_swap_probe
from .metrics.functional import forecast_pearson_r, mse

SAMPLED_EVAL_TRIALS = 36
SAMPLED_EVAL_SAMPLES = 4


def split_arrays(split: datasets.Dataset, max_trials: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(traces `(trials, neurons, frames)` float32, session ids `(trials,)`) of the first `max_trials` rows."""
    rows = split if max_trials is None else split.select(range(min(max_trials, len(split))))
    rows = rows.with_format("numpy", columns=["input_values", "session_id"])
    return np.stack(list(rows["input_values"])).astype(np.float32), np.asarray(rows["session_id"])


def baseline_scores(corpus: datasets.DatasetDict, context_frames: int, max_trials: int | None) -> dict:
    """Per-session ridge autoregression and training-mean forecasts on the same test trials as CalM."""
    train_x, train_s = split_arrays(corpus["train"])
    val_x, val_s = split_arrays(corpus["validation"])
    test_x, test_s = split_arrays(corpus["test"], max_trials)
    scores = {}
    for name, factory in (("ridge_ar", lambda: RidgeARForecaster(context=context_frames)),
                          ("train_mean", lambda: MeanForecaster(context=context_frames))):
        preds = np.zeros_like(test_x[..., context_frames:])
        for session in np.unique(test_s):
            model = factory()
            model.fit(train_x[train_s == session], val_x[val_s == session])
            mask = test_s == session
            preds[mask] = model.predict(test_x[mask][..., :context_frames], test_x.shape[-1] - context_frames)
        truth = test_x[..., context_frames:]
        scores[name] = {
            "pearson_r": float(forecast_pearson_r(preds, truth, session_ids=test_s)["pearson_r"]),
            "mse": float(mse(preds, truth)),
        }
    return scores


def forecasting_metrics(forecaster: CalmForecaster, test: datasets.Dataset, context_frames: int,
                        eval_trials: int | None) -> dict[str, float]:
    """CalM's forecast r and MSE on the test split: the continuous head's conditional mean (when the model has it),
    greedy rollouts, and the mean of a few sampled rollouts on the first trials (they cost `num_samples` rollouts)."""
    torch.manual_seed(0)
    metrics = {}
    if forecaster.model.value_head is not None:  # the default forecast: the continuous head's conditional mean
        direct = evaluate_forecasting(forecaster, test, context_frames=context_frames, max_trials=eval_trials,
                                      mode="direct")
        metrics.update(forecast_pearson_r_direct=direct["pearson_r"], forecast_mse_direct=direct["mse"])
    greedy = evaluate_forecasting(forecaster, test, context_frames=context_frames, max_trials=eval_trials,
                                  mode="greedy")
    metrics.update(forecast_pearson_r_greedy=greedy["pearson_r"], forecast_mse_greedy=greedy["mse"])
    sample_trials = min(len(test), eval_trials or SAMPLED_EVAL_TRIALS)
    sampled = evaluate_forecasting(forecaster, test, context_frames=context_frames, max_trials=sample_trials,
                                   mode="mean", num_samples=SAMPLED_EVAL_SAMPLES)
    label = f"sample_mean_{SAMPLED_EVAL_SAMPLES}x_first_{sample_trials}_trials"
    metrics[f"forecast_pearson_r_{label}"] = sampled["pearson_r"]
    metrics[f"forecast_mse_{label}"] = sampled["mse"]
    return metrics


@torch.no_grad()
def reconstruction_metrics(forecaster: CalmForecaster, test: datasets.Dataset, eval_trials: int | None) -> dict:
    """Tokenizer reconstruction decode(codes) vs the traces on the test trials, overall r and MSE by window position
    (a tokenizer used beyond its training length reconstructs the ends of a trial worse)."""
    values, _ = split_arrays(test, eval_trials)
    ids = np.stack(list(test.select(range(len(values))).with_format("numpy", columns=["input_ids"])["input_ids"]))
    codes = torch.as_tensor(ids.astype(np.int64), device=forecaster.device)
    recon = forecaster.decode(codes).cpu().numpy()
    values = values[..., : recon.shape[-1]]
    window = forecaster.window_size
    per_window = ((recon - values) ** 2).reshape(*recon.shape[:2], -1, window).mean(axis=(0, 1, 3))
    middle = per_window[1:-1] if len(per_window) > 2 else per_window
    return {
        "tokenizer_reconstruction_pearson_r": float(forecast_pearson_r(recon, values)["pearson_r"]),
        "tokenizer_reconstruction_mse_first_window": float(per_window[0]),
        "tokenizer_reconstruction_mse_middle_windows": float(middle.mean()),
        "tokenizer_reconstruction_mse_last_window": float(per_window[-1]),
    }


def evaluate_release(forecaster: CalmForecaster, corpus: datasets.DatasetDict, context_frames: int = 40,
                     eval_trials: int | None = None) -> dict[str, float]:
    """Every number of the model card, on the first `eval_trials` test trials (all when None)."""
    test = corpus["test"]
    metrics = forecasting_metrics(forecaster, test, context_frames, eval_trials)
    for name, scores in baseline_scores(corpus, context_frames, eval_trials).items():
        metrics.update({f"{name}_pearson_r": scores["pearson_r"], f"{name}_mse": scores["mse"]})
    metrics.update(reconstruction_metrics(forecaster, test, eval_trials))
    # population use: the same trials with every other neuron's tokens taken from another trial of the session
    probe = trial_swap_probe(forecaster.model, test, context_frames=context_frames, max_trials=60)
    metrics.update({f"trial_swap_{key}": value for key, value in probe.items() if key != "trials"})
    return metrics


def heldout_sets(sets: list[str], sessions: int = 2, seed: int = 0, max_neurons: int | None = None) -> dict[str, list]:
    """The held-out sets a release is scored on (`calm_hf.heldout.heldout_set`); a real recording that is not on this
    machine is left out with a warning (the job runs without `../shared/data`)."""
    import logging

    from .heldout import REAL_SETS, heldout_set

    found = {}
    for name in sets:
        try:
            found[name] = heldout_set(name, sessions=sessions, seed=seed, max_neurons=max_neurons)
        except FileNotFoundError as error:
            if name not in REAL_SETS:
                raise
            logging.getLogger(__name__).warning("held-out set %s left out: %s", name, error)
    return found


@torch.no_grad()
def heldout_reconstruction(forecaster: CalmForecaster, session, test_trials: int | None = None) -> float:
    """Tokenizer reconstruction r (decode(encode(x)) vs x) on a held-out session's test trials."""
    test = session.split("test")[:test_trials]
    values = torch.as_tensor(test, device=forecaster.device)
    recon = forecaster.decode(forecaster.tokenize(values)).cpu().numpy()
    return float(forecast_pearson_r(recon, test[..., -recon.shape[-1]:])["pearson_r"])


def evaluate_foundation_release(forecaster: CalmForecaster, sets: list[str], sessions: int = 2,
                                test_trials: int | None = None, max_neurons: int | None = None, seed: int = 0,
                                ks: tuple[str, ...] = ("0", "16")) -> tuple[dict[str, float], dict, dict]:
    """The numbers of a foundation checkpoint's card: on held-out sets the pretraining corpus never saw, CalM
    zero-shot (k = 0) and with its neurons' identity from 16 training trials (k = 16), against the baselines fitted
    on the same trials (`calm_hf.heldout.evaluate_heldout`), the tokenizer's reconstruction and the trial-swap probe
    on the first simulated set. Returns `(flat metrics, nested results, the held-out sessions by set)`."""
    from .heldout import best_baseline, evaluate_heldout, k_subsets, swap_probe_scores

    found = heldout_sets(sets, sessions, seed, max_neurons)
    results = evaluate_heldout(forecaster, found, ks=ks, test_trials=test_trials, seed=seed)
    metrics: dict[str, float] = {}
    for name, cells in results.items():
        for k, models in cells.items():
            for metric, value in models["calm"].items():
                metrics[f"{name}_k{k}_calm_{metric}"] = value
            best = best_baseline(models)
            if best is not None:
                metrics[f"{name}_k{k}_best_baseline_pearson_r"] = best[1]["pearson_r"]
                metrics[f"{name}_k{k}_best_baseline_mse"] = best[1]["mse"]
            lowest = best_baseline(models, "mse")
            if lowest is not None:
                metrics[f"{name}_k{k}_lowest_baseline_mse"] = lowest[1]["mse"]
    simulated = next((name for name in found if name.startswith("sim")), None)
    if simulated is not None:
        session = found[simulated][0]
        metrics["tokenizer_reconstruction_pearson_r"] = heldout_reconstruction(forecaster, session, test_trials)
        probe = swap_probe_scores(forecaster, session, k_subsets(session, seed, ("16",)).get("16", []), test_trials)
        metrics.update({f"trial_swap_{key}": value for key, value in probe.items()})
    return metrics, results, found
