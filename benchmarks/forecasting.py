#!/usr/bin/env python
"""Forecasting benchmark: CalM against established forecasters, every model on the same splits.

    python benchmarks/forecasting.py                                    # everything, CPU sizes, 5 min per model fit
    python benchmarks/forecasting.py --models calm,ridge_ar,mean,per_neuron_ar,tcn --time_budget_minutes 1.5  # ~40 min
    python benchmarks/forecasting.py --calm_dir .calm-base-work         # reuse the main job's tokenizer + DAT on sim
    python benchmarks/forecasting.py --size tiny --out /tmp/fb          # the seconds-long smoke version

Protocol (DESIGN.md): trials z-scored per neuron with training statistics, split 70/15/15 by trial; the first 40 frames
(park: 24) are the context, the rest of the trial is forecast. Score: Pearson r per neuron over the horizon, averaged
neurons -> trials -> sessions (`calm_hf.metrics.functional.forecast_pearson_r`), and MSE in z-scored units;
per-session numbers are kept. Every baseline picks its hyperparameters on the validation trials (its `search_log_` is
written to the JSON); CalM is pretrained with a fixed preset (no search) and reported with every forecast in
`--calm_modes` (default direct, greedy, mean): `direct` = the continuous head's conditional-mean forecast (the
package default), `greedy` / `soft` = token rollouts, `mean` = the mean of `--num_samples` sampled token rollouts.

Forecast bands: the `--num_samples` sampled rollouts are drawn once per model; `mean` averages them and
`direct`'s band is the same samples recentred on the direct forecast (`CalmForecaster.forecast(mode="direct",
num_samples=...)`). Both entries carry `calibration` (`band_calibration`): empirical coverage of the 5-95% band (the
fraction of true values inside it) and the sample CRPS, mean|X - y| - 0.5 mean|X - X'|, averaged over test points.

Trial-swap probe: every trained CalM is probed on (up to `probe_trials`) test trials with
`calm_hf.forecasting.trial_swap_probe`: next-token CE and direct-forecast r / MSE with the true population vs the other
neurons' tokens taken from another trial of the same session (`swap_probe` in every entry of that model). Neuron
blocks are a fixed share of the population (`probe_blocks`), so small populations are probed too.

Datasets
- `sim`: the paper's simulated benchmark (3 sessions x 400 trials x 200 neurons x 100 frames at 5 Hz, seeds
  `seed..seed+2`). CalM: tokenizer + dual-axis transformer pretrained on all sessions' training trials. Baselines: one
  fit per session (they have neuron-specific weights), scores pooled with the session ids.
- `heldout`: CalM pretrained on sim sessions 0-1 only (same tokenizer and tokens as `sim`; with `--calm_dir`, for as
  many steps as that run pretrained), then only the new session's and neurons' embeddings are learned on session
  2's training trials (`calm adapt`, 30 epochs in up to 3 budgets); scored on session 2's test trials. Baselines
  are trained on session 2's training trials directly (when `sim` runs in the same invocation these are the very fits
  of `sim`'s session 2, reused).
- `zebrafish`: Triplett et al. 2018 tectum recording (114 neurons, 2.2 Hz) resampled to 5 Hz as one continuous
  recording, cut into non-overlapping 100-frame (20 s) trials, split 70/15/15, z-scored with training statistics.
  CalM: its own tokenizer and DAT trained on this recording's training trials.
- `park`: Park et al. 2024 mouse V1 gratings, 5 sessions (5 mice, 28-74 neurons) at their native 16 Hz: each of the
  128 trials per session is cut at its `trial_starts` entry (time is not continuous across trials) and cropped to 48
  frames (3 s, 12 tokens); context 24 frames -> 24 frames. Each session is split 70/15/15 and z-scored with its own
  training statistics. CalM: one tokenizer + DAT trained on every session's training trials; baselines per session.
  Arrays of sessions with different neuron counts are zero-padded and scored with a neuron mask.
- `--ablations` (sim only): CalM without scheduled sampling and without neighbourhood replacement, same preset,
  budget, tokenizer and tokens (reported as not run when the preset already has them off, as `cpu` does).

CalM sizes (`SIZES`): pretraining and adaptation see whole populations (`max_neurons` 256 is above every dataset's
neuron count); the tokenizer is trained on segments of the trial length, since it encodes and decodes whole trials.

Budgets: every trainable model has a wall-clock cap. `--time_budget_minutes N` is the cap of one baseline fit (one
session; split over its learning-rate grid). CalM's tokenizer and its pretraining each get N per training session
(the same total as one per-session baseline over all sessions), adaptation N. CalM's step count is planned from a
measured step time so the cosine schedule ends inside the budget; a callback stops training at the cap regardless.
Finished stages (trials, tokenizer, tokens, pretraining, adaptation) live in `--work_dir` and are reused on a re-run
with the same settings; an interrupted training stage resumes from its last checkpoint.

Cost table (same run): training wall time, inference time per test trial (wall time of the test forecasts / trials),
parameters, and peak memory = highest resident set size (RSS) during the fit minus RSS just before it, sampled every
5 ms from /proc/self/statm (covers numpy and torch allocations; `ru_maxrss` deltas are recorded too but stay 0 once
the process high-water mark is above the fit's needs).

Writes `<out>/forecasting.json`, `forecasting.md`, `forecasting.png` (default out: benchmarks/results).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
# context of the 5 Hz datasets (sim, heldout, zebrafish); park runs at its native rate with its own (SIZES["..."]["park"])
CONTEXT_FRAMES = 40
MODEL_RATE = 5.0
ALL_DATASETS = ("sim", "zebrafish", "heldout", "park")
# `calm pretrain`'s data-derived starts, spelled out so a change of the command's defaults re-runs the stage
PRETRAIN_INIT = {"identity_init": "coupling", "value_skip_init": "ridge"}
# this benchmark trains a CalM on each recording (the specialist of issue 9's protocol) with learned identity tables;
# the foundation model, calm-base, is measured on recordings it never saw by benchmarks/foundation.py
TABLE_IDENTITY = {"neuron_identity": "table", "quantile_levels": None}
CALM_MODES = ("direct", "greedy", "mean", "soft", "sample")
RIDGE_LAGS = (1, 2, 4, 8)  # the baselines' own default grids, cut to the dataset's context
PER_NEURON_LAGS = (1, 2, 4, 8, 16)
BAND = (0.05, 0.95)  # quantiles of the reported forecast band (its coverage is checked against 90%)
ALL_MODELS = ("calm", "ridge_ar", "mean", "per_neuron_ar", "tcn", "patchtst_hf", "nf_patchtst", "nf_itransformer")
NF_NOT_INSTALLED = "not run: neuralforecast not installed (pip install calm_hf[bench])"
ABLATIONS = {
    "no_scheduled_sampling": {"scheduled_sampling_prob": 0.0},
    "no_neighbor_replacement": {"neighbor_replacement_prob": 0.0},
}

# "cpu": the real run on this 2-core machine; "tiny": the smoke test (seconds per model).
SIZES: dict[str, dict[str, Any]] = {
    "cpu": {
        "sim": {"num_sessions": 3, "num_neurons": 200, "num_trials": 400, "num_steps": 100},
        "zebrafish": {"trial_frames": 100, "max_neurons": None, "max_trials": None},
        "park": {"trial_frames": 48, "context_frames": 24, "max_neurons": None, "max_trials": None,
                 "max_sessions": None},
        # min_steps: a small recording is trained for several epochs (one epoch of zebrafish is 31 tokenizer steps and
        # 17 DAT steps; the earlier runs stopped there, inside the tokenizer's codebook warm-up); the budget still caps
        "tokenizer": {"preset": "cpu", "epochs": 1.0, "batch": 256, "lr": 2e-3, "max_segments": 120_000,
                      "min_steps": 600},
        # 64 random neurons per trial, as the main job: at equal wall-clock this beat whole populations (validation r
        # 0.399 vs 0.346, benchmarks/results/dat_ablations.md); the step count is capped by the time budget. Every
        # eval_steps the direct forecast is scored on eval_trials validation trials and the best checkpoint is kept
        # (many epochs over a small recording can overfit; the test split is never looked at)
        "calm": {"preset": "cpu", "epochs": 10.0, "batch": 4, "lr": 3e-3, "max_neurons": 64, "min_steps": 1500,
                 "eval_steps": 150, "eval_trials": 30, "config_overrides": TABLE_IDENTITY},
        # the new rows' loss still falls after 10 epochs: 30 epochs (1,687 steps, 11 min) scored validation r 0.368 /
        # MSE 0.376 against 0.356 / 0.384 for 10 (559 steps in one 5-minute budget); whole-model fine-tuning
        # (backbone_lr) gave nothing (0.351 vs 0.350), so it stays 0
        "adapt": {"epochs": 30.0, "batch": 4, "lr": 1e-2, "max_neurons": 64, "budgets": 3},
        "tcn": {"hidden_size": 256, "kernel_size": 5, "dilations": (1, 2, 4, 8, 16)},
        "patchtst_hf": {},
        "nf": {"max_steps": 1000},
        "time_budget_minutes": 5.0,
        "num_samples": 4,
        # trial-swap probe: test trials (spread over the sessions) and neuron blocks (each keeps its true tokens)
        "probe_trials": 30,
        "probe_blocks": 4,
    },
    "tiny": {
        "sim": {"num_sessions": 3, "num_neurons": 10, "num_trials": 20, "num_steps": 60},
        "zebrafish": {"trial_frames": 60, "max_neurons": 10, "max_trials": 20},
        "park": {"trial_frames": 48, "context_frames": 24, "max_neurons": 10, "max_trials": 20, "max_sessions": 2},
        "tokenizer": {"preset": "tiny", "epochs": 1.0, "batch": 64, "lr": 3e-3, "max_segments": 1_000},
        "calm": {"preset": "tiny", "epochs": 1.0, "batch": 4, "lr": 1e-3, "max_neurons": 8, "eval_steps": 2,
                 "eval_trials": 2, "config_overrides": TABLE_IDENTITY},
        "adapt": {"epochs": 1.0, "batch": 4, "lr": 1e-2, "max_neurons": 8},
        "tcn": {"hidden_size": 16, "kernel_size": 3, "dilations": (1, 2), "max_epochs": 2, "learning_rates": (1e-3,)},
        "patchtst_hf": {"d_model": 16, "num_hidden_layers": 1, "num_attention_heads": 2, "ffn_dim": 32,
                        "batch_size": 64, "batches_per_eval": 3, "max_epochs": 2, "learning_rates": (1e-3,)},
        "nf": {"max_steps": 5},
        "time_budget_minutes": 0.05,
        "num_samples": 2,
        "probe_trials": 60,
        "probe_blocks": 4,
    },
}


# ----------------------------------------------------------------------------------------------------------------------
# Measurement helpers
# ----------------------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):  # not Linux: fall back to the high-water mark
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak RSS increase over a block, sampled every `interval` s from a background thread (see module docstring)."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak_delta_mb = 0.0
        self.maxrss_delta_mb = 0.0

    def _sample(self):
        while not self._stop.is_set():
            self._peak = max(self._peak, _rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakMemory:
        self._start = _rss_bytes()
        self._peak = self._start
        self._maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, _rss_bytes())
        self.peak_delta_mb = (self._peak - self._start) / 2**20
        self.maxrss_delta_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._maxrss) / 1024
        return False


def score(pred: np.ndarray, truth: np.ndarray, session_ids: np.ndarray,
          neuron_mask: np.ndarray | None = None) -> dict[str, Any]:
    """The benchmark's metrics: hierarchical Pearson r (with per-session values and the spread over sessions, or
    the SEM over trials for one session), per-trial means, MSE and per-session MSE. `neuron_mask` (trials, neurons)
    marks real neurons when sessions with different neuron counts are padded into one array (see `split_arrays`)."""
    from calm_hf.metrics.functional import forecast_pearson_r, mse, pearson_r_per_neuron

    result = forecast_pearson_r(pred, truth, session_ids=session_ids, neuron_mask=neuron_mask)
    with warnings.catch_warnings():  # a trial whose neurons are all undefined (constant) has no mean: NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        neuron_r = pearson_r_per_neuron(pred, truth)
        if neuron_mask is not None:
            neuron_r = np.where(neuron_mask, neuron_r, np.nan)
        per_trial = np.nanmean(neuron_r, axis=1)
    per_session = {str(k): float(v) for k, v in result["per_session"].items()}
    values = np.array([v for v in per_session.values() if math.isfinite(v)])
    if len(values) > 1:
        error, error_kind = float(values.std(ddof=1)), "std over sessions"
    else:
        finite = per_trial[np.isfinite(per_trial)]
        error = float(finite.std(ddof=1) / math.sqrt(len(finite))) if len(finite) > 1 else float("nan")
        error_kind = "SEM over test trials (one session)"
    return {
        "pearson_r": float(result["pearson_r"]),
        "pearson_r_error": error,
        "pearson_r_error_kind": error_kind,
        "per_session_pearson_r": per_session,
        "mse": float(mse(pred, truth, neuron_mask)),
        "per_session_mse": {str(s): float(mse(pred[session_ids == s], truth[session_ids == s],
                                              None if neuron_mask is None else neuron_mask[session_ids == s]))
                            for s in np.unique(session_ids)},
        "num_nan": int(result["num_nan"]),
        "num_test_trials": int(len(truth)),
    }


def split_arrays(split) -> tuple[np.ndarray, np.ndarray]:
    """(trials, neurons, frames) float32 and (trials,) session ids of a trial split, in row order.

    Sessions with different neuron counts (park) are zero-padded at the end of the neuron axis to the largest;
    `neuron_counts` gives each session's real count (`session_trials` crops them back, `padding_mask` marks them).
    """
    rows = split.with_format("numpy", columns=["input_values", "session_id"])
    values = list(rows["input_values"])
    width = max(v.shape[0] for v in values)
    out = np.zeros((len(values), width, values[0].shape[-1]), dtype=np.float32)
    for i, trial in enumerate(values):
        out[i, : trial.shape[0]] = trial
    return out, np.asarray(rows["session_id"], dtype=np.int64)


def neuron_counts(split) -> dict[int, int]:
    """{session id: neurons} of a trial split."""
    rows = split.with_format("numpy", columns=["input_values", "session_id"])
    return {int(s): int(v.shape[0]) for s, v in zip(rows["session_id"], rows["input_values"])}


def padding_mask(session_ids: np.ndarray, width: int, neurons: dict[int, int] | None) -> np.ndarray | None:
    """(trials, width) True at real neurons, or None when every session has `width` neurons (no padding)."""
    if neurons is None or all(n == width for n in neurons.values()):
        return None
    return np.arange(width)[None, :] < np.array([neurons[int(s)] for s in session_ids])[:, None]


def session_trials(data: dict, split: str, session: int, neurons: dict[int, int] | None = None) -> np.ndarray:
    """The unpadded trials (trials, neurons, frames) of one session in one split."""
    x, ids = data[split]
    x = x[ids == session]
    return x if neurons is None else x[:, : neurons[session]]


def jsonable(value: Any) -> Any:
    """Numpy/tuple/non-finite-safe copy for strict JSON (non-finite floats become None)."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    return str(value)


def log(message: str) -> None:
    print(f"[forecasting {time.strftime('%H:%M:%S')}] {message}", flush=True)


# ----------------------------------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------------------------------


def neuralforecast_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("neuralforecast") is not None


def make_baseline(name: str, size: dict, budget_s: float, seed: int, context: int = CONTEXT_FRAMES):
    from calm_hf.baselines import (
        MeanForecaster,
        PatchTSTForecaster,
        PerNeuronARForecaster,
        RidgeARForecaster,
        TCNForecaster,
    )

    if name == "ridge_ar":  # AR orders longer than the context cannot be rolled out from it (park: 24 frames)
        return RidgeARForecaster(context=context, lags_grid=tuple(lag for lag in RIDGE_LAGS if lag <= context))
    if name == "mean":
        return MeanForecaster(context=context)
    if name == "per_neuron_ar":
        return PerNeuronARForecaster(context=context,
                                     lags_grid=tuple(lag for lag in PER_NEURON_LAGS if lag <= context))
    if name == "tcn":
        return TCNForecaster(context=context, max_seconds=budget_s, seed=seed, bf16=False, **size["tcn"])
    if name == "patchtst_hf":
        return PatchTSTForecaster(context=context, max_seconds=budget_s, seed=seed, bf16=False,
                                  **size["patchtst_hf"])
    from calm_hf.baselines.neuralforecast_models import NeuralForecastITransformer, NeuralForecastPatchTST

    if name == "nf_patchtst":  # patch 8 / stride 4, dim 128, 3 layers, 8 heads (the wrapper's defaults)
        return NeuralForecastPatchTST(context=context, max_seconds=budget_s, seed=seed, **size["nf"])
    if name == "nf_itransformer":  # dim 64, 2 layers, 4 heads
        return NeuralForecastITransformer(context=context, max_seconds=budget_s, seed=seed, **size["nf"],
                                          model_kwargs={"hidden_size": 64, "n_heads": 4, "e_layers": 2, "d_ff": 256})
    raise ValueError(f"unknown baseline {name!r}; choose from {ALL_MODELS[1:]}.")


def count_parameters(model) -> int:
    """Trainable numbers of a fitted baseline: torch weights, or the fitted numpy arrays of the linear models."""
    network = getattr(model, "model_", None)
    if network is None and getattr(model, "forecaster_", None) is not None:  # NeuralForecast: its fitted modules
        models = getattr(model.forecaster_, "models", [])
        return int(sum(p.numel() for m in models for p in m.parameters())) or -1
    if network is not None and hasattr(network, "parameters"):
        return int(sum(p.numel() for p in network.parameters()))
    names = {"RidgeARForecaster": ("weights_", "bias_"), "PerNeuronARForecaster": ("weights_", "bias_")}
    if type(model).__name__ == "MeanForecaster":
        names = {"MeanForecaster": ("frame_mean_",) if model.variant_ == "per_frame" else ("global_mean_",)}
    arrays = [getattr(model, attr, None) for attr in names.get(type(model).__name__, ())]
    return int(sum(np.asarray(a).size for a in arrays if a is not None)) or -1


def fit_baseline_sessions(name: str, data: dict, sessions: list[int], size: dict, budget_s: float, seed: int,
                          context: int = CONTEXT_FRAMES, neurons: dict[int, int] | None = None) -> dict:
    """Fit one forecaster per session; return per-session predictions on the test trials and costs."""
    per_session = {}
    for session in sessions:
        train, val, test = (session_trials(data, split, session, neurons) for split in ("train", "validation", "test"))
        model = make_baseline(name, size, budget_s, seed, context)
        start = time.perf_counter()
        with PeakMemory() as memory:
            model.fit(train, val)
        train_seconds = time.perf_counter() - start
        start = time.perf_counter()
        pred = model.predict(test[:, :, :context], test.shape[-1] - context)
        infer_seconds = time.perf_counter() - start
        per_session[session] = {
            "pred": np.asarray(pred, dtype=np.float32),
            "train_seconds": train_seconds,
            "inference_seconds": infer_seconds,
            "num_test_trials": len(test),
            "parameters": count_parameters(model),
            "peak_memory_mb": memory.peak_delta_mb,
            "maxrss_delta_mb": memory.maxrss_delta_mb,
            "search_log": getattr(model, "search_log_", {}),
        }
        chosen = per_session[session]["search_log"].get("chosen")
        log(f"  {name} session {session}: fit {train_seconds:.1f} s, chosen {chosen}")
    return per_session


def baseline_result(per_session: dict, data: dict, note: str | None = None, context: int = CONTEXT_FRAMES,
                    neurons: dict[int, int] | None = None) -> tuple[dict, np.ndarray]:
    """Assemble per-session fits into one scored model entry over the test trials of those sessions."""
    test_x, test_s = data["test"]
    sessions = sorted(per_session)
    keep = np.isin(test_s, sessions)
    truth, session_ids = test_x[keep][:, :, context:], test_s[keep]
    pred = np.zeros_like(truth)
    for session in sessions:
        fitted = per_session[session]["pred"]
        pred[session_ids == session, : fitted.shape[1]] = fitted
    entry = {
        "status": "ok",
        **score(pred, truth, session_ids, padding_mask(session_ids, truth.shape[1], neurons)),
        "cost": {
            "train_seconds": sum(p["train_seconds"] for p in per_session.values()),
            "inference_seconds_per_trial": sum(p["inference_seconds"] for p in per_session.values()) / len(truth),
            "parameters": sum(p["parameters"] for p in per_session.values()),
            "peak_memory_mb": max(p["peak_memory_mb"] for p in per_session.values()),
            "maxrss_delta_mb": max(p["maxrss_delta_mb"] for p in per_session.values()),
            "fits": len(sessions),
        },
        "search_log": {str(s): per_session[s]["search_log"] for s in sessions},
        "chosen": {str(s): per_session[s]["search_log"].get("chosen") for s in sessions},
    }
    if note:
        entry["note"] = note
    return entry, pred


def run_baselines(models: list[str], data: dict, sessions: list[int], size: dict, budget_s: float, seed: int,
                  reuse: dict | None = None, context: int = CONTEXT_FRAMES,
                  neurons: dict[int, int] | None = None) -> tuple[dict, dict, dict]:
    """Returns (entries, predictions, raw per-session fits) for every requested baseline."""
    entries, predictions, fits = {}, {}, {}
    for name in models:
        if name.startswith("nf_") and not neuralforecast_available():
            entries[name] = {"status": NF_NOT_INSTALLED}
            continue
        note = None
        if reuse is not None and name in reuse and all(s in reuse[name] for s in sessions):
            per_session = {s: reuse[name][s] for s in sessions}
            note = "same fit as in `sim` (trained on this session's training trials)"
        else:
            log(f"baseline {name} on sessions {sessions}")
            per_session = fit_baseline_sessions(name, data, sessions, size, budget_s, seed, context, neurons)
        fits[name] = per_session
        entries[name], predictions[name] = baseline_result(per_session, data, note, context, neurons)
        log(f"  {name}: r = {entries[name]['pearson_r']:.3f}, mse = {entries[name]['mse']:.3f}")
    return entries, predictions, fits


# ----------------------------------------------------------------------------------------------------------------------
# CalM through the package's commands
# ----------------------------------------------------------------------------------------------------------------------


def command(name: str):
    """A stage of the package, `calm_hf.commands.<name>` (prepare, train_tokenizer, tokenize, pretrain, adapt; `stages`
    is the main job's stage machinery). Training stages take `callbacks=[TimeBudgetCallback(...)]` for the budget."""
    import importlib

    return importlib.import_module(f"calm_hf.commands.{name}")


def time_budget(max_seconds: float, record: dict):
    """The callback that stops a command's training after `max_seconds`; `record` gets `steps`/`stopped_by_budget`."""
    from calm_hf.callbacks import TimeBudgetCallback

    return TimeBudgetCallback(max_seconds, record)


def seconds_per_step(model, batch: dict, steps: int = 2) -> float:
    """Measured wall time of one AdamW training step in fp32 (median of `steps` after one warm-up step); used to plan
    step counts."""
    from calm_hf.hardware import training_step_seconds

    return training_step_seconds(model, batch, bf16=False, repeats=steps, warmup=1)


def plan_steps(planned_steps: int, step_seconds: float, budget_s: float) -> int:
    """Steps that fit 90% of the budget (the rest covers saving/evaluation), at most the planned epochs' steps."""
    return max(1, min(planned_steps, int(0.9 * budget_s / max(step_seconds, 1e-6))))


def fingerprint(path: Path) -> float | None:
    """Modification time of a finished stage's main file: stage keys change when an upstream stage was redone."""
    for name in ("model.safetensors", "dataset_dict.json"):
        if (Path(path) / name).is_file():
            return (Path(path) / name).stat().st_mtime
    return None


def trainer_flags(output_dir: Path, epochs: float, batch: int, lr: float, seed: int, max_steps: int,
                  resume: str | None) -> list[str]:
    flags = command("main").training_flags(output_dir, epochs, batch, lr, seed, False, resume, use_cpu=True)
    return flags + ["--max_steps", str(max_steps), "--logging_steps", str(max(1, min(25, max_steps // 4)))]


def train_tokenizer_stage(work: Path, trials_dir: Path, size: dict, budget_s: float, seed: int) -> dict:
    """Tokenizer stage (reused when finished with the same parameters). Returns stage info."""
    import datasets
    import torch

    from calm_hf import CalmTokenizer, CalmTokenizerConfig

    from calm_hf.configuration_calm_tokenizer import CALM_TOKENIZER_PRESETS

    run_all = command("stages")
    cfg = size["tokenizer"]
    corpus = datasets.load_from_disk(str(trials_dir))
    row = corpus["train"].with_format("numpy")[0]["input_values"]
    # the tokenizer encodes and decodes whole trials, so it is trained on segments of exactly that length:
    # a tokenizer trained on 48 frames and run on 100 reconstructs the trial ends badly)
    segment_frames = int(row.shape[-1])
    stage = run_all.Stage(work / "tokenizer", {"trials": str(trials_dir), "trials_version": fingerprint(trials_dir),
                                               **cfg, "segment_frames": segment_frames,
                                               "preset_config": CALM_TOKENIZER_PRESETS.get(cfg["preset"]),
                                               "budget_s": budget_s, "seed": seed})
    info: dict[str, Any] = {"budget_seconds": budget_s, "segment_frames": segment_frames, **cfg}

    def run():
        segments = min(len(corpus["train"]) * row.shape[0], cfg["max_segments"])  # one segment per neuron and trial
        planned = max(math.ceil(cfg["epochs"] * segments / cfg["batch"]), int(cfg.get("min_steps", 0)))
        model = CalmTokenizer(CalmTokenizerConfig.from_preset(cfg["preset"]))
        step_s = seconds_per_step(model, {"input_values": torch.randn(min(cfg["batch"], segments), 1, segment_frames)})
        max_steps = plan_steps(planned, step_s, budget_s)
        info.update(seconds_per_step=step_s, planned_steps=planned, max_steps=max_steps)
        with PeakMemory() as memory:
            command("train_tokenizer").run(
                ["--trials_dataset", str(trials_dir), "--preset", cfg["preset"], "--max_segments", str(cfg["max_segments"]),
                 "--segment_frames", str(segment_frames)]
                + trainer_flags(stage.path, cfg["epochs"], cfg["batch"], cfg["lr"], seed, max_steps,
                                stage.last_checkpoint()),
                callbacks=[time_budget(budget_s, info)])
        info["peak_memory_mb"] = memory.peak_delta_mb
        return {"info": info}

    timings: dict = {}
    run_all.run_stage(stage, "train_tokenizer", run, timings)
    info = json.loads(stage.marker.read_text()).get("info", info)
    info["seconds"], info["reused"] = timings["train_tokenizer"]["seconds"], timings["train_tokenizer"]["reused"]
    return info


def tokenize_stage(work: Path, trials_dir: Path, tokenizer_dir: Path) -> Path:
    run_all = command("stages")
    stage = run_all.Stage(work / "tokenized", {"trials": str(trials_dir), "tokenizer": str(tokenizer_dir),
                                               "tokenizer_version": fingerprint(tokenizer_dir),
                                               "trials_version": fingerprint(trials_dir)})
    run_all.run_stage(stage, "tokenize", lambda: command("tokenize").run(
        ["--tokenizer_path", str(tokenizer_dir), "--trials_dataset", str(trials_dir), "--output_dir", str(stage.path)]
    ) and None, {})
    return stage.path


def pretrain_stage(stage_dir: Path, tokenized_dir: Path, tokenizer_dir: Path, size: dict, budget_s: float, seed: int,
                   overrides: dict | None = None, context: int = CONTEXT_FRAMES, steps: int | None = None) -> dict:
    """Pretrain the DAT with `calm pretrain` within `budget_s` (reused when finished). Returns stage info. `steps`:
    train exactly that many steps, the budget raised to fit them at the measured step time."""
    import datasets

    from calm_hf import CalmTokenizer
    from calm_hf.configuration_calm import CALM_PRESETS
    from calm_hf.data import CalmDataCollator, load_session_metadata

    run_all = command("stages")
    cfg = size["calm"]
    overrides = {**cfg.get("config_overrides", {}), **(overrides or {})}
    stage = run_all.Stage(stage_dir, {"tokenized": str(tokenized_dir), "tokenized_version": fingerprint(tokenized_dir),
                                      "tokenizer": str(tokenizer_dir), **cfg,
                                      "preset_config": CALM_PRESETS.get(cfg["preset"]),
                                      "overrides": overrides, "budget_s": budget_s, "seed": seed,
                                      "init": PRETRAIN_INIT, **({"steps": steps} if steps else {})})
    info: dict[str, Any] = {"budget_seconds": budget_s, "config_overrides": overrides, **cfg}
    script = command("pretrain")

    def run():
        corpus = datasets.load_from_disk(str(tokenized_dir))
        tokenizer = CalmTokenizer.from_pretrained(tokenizer_dir)
        sessions = load_session_metadata(tokenized_dir)
        token_steps = len(corpus["train"][0]["input_ids"][0])
        model_args = script.ModelArguments(tokenizer_path=str(tokenizer_dir), preset=cfg["preset"],
                                           config_overrides=json.dumps(overrides) if overrides else None)
        model = script.build_model(model_args, tokenizer, sessions, token_steps)
        # the probe batch is what `calm pretrain` will feed: with the traces when the model has the value head
        with_values = model.config.value_head_steps > 0
        columns = ["input_ids", "neuron_ids", "session_id"] + (["input_values"] if with_values else [])
        rows = corpus["train"].select_columns(columns).with_format("numpy")
        batch = CalmDataCollator(max_neurons=cfg["max_neurons"], seed=seed, with_values=with_values)(
            [rows[i] for i in range(min(cfg["batch"], len(rows)))])
        step_s = seconds_per_step(model, batch)
        planned = max(math.ceil(cfg["epochs"] * math.ceil(len(corpus["train"]) / cfg["batch"])),
                      int(cfg.get("min_steps", 0)))
        budget = budget_s
        if steps:  # a fixed step count: the cap only guards against a step far slower than measured
            planned, budget = int(steps), max(budget_s, 1.5 * steps * step_s)
            info["budget_seconds"] = budget
        max_steps = plan_steps(planned, step_s, budget)
        info.update(seconds_per_step=step_s, planned_steps=planned, max_steps=max_steps,
                    parameters=int(model.num_parameters()))
        del model
        eval_steps, eval_trials = int(cfg.get("eval_steps", 0)), int(cfg.get("eval_trials", 0))
        argv = ["--tokenized_dataset", str(tokenized_dir), "--tokenizer_path", str(tokenizer_dir),
                "--preset", cfg["preset"], "--max_neurons", str(cfg["max_neurons"]),
                "--forecast_eval_trials", str(eval_trials if eval_steps else 0), "--context_frames", str(context)]
        for name, value in PRETRAIN_INIT.items():
            argv += [f"--{name}", value]
        if overrides:
            argv += ["--config_overrides", json.dumps(overrides)]
        flags = trainer_flags(stage.path, cfg["epochs"], cfg["batch"], cfg["lr"], seed, max_steps,
                              stage.last_checkpoint())
        if eval_steps:  # keep the checkpoint with the best validation forecast r (later flags win in argparse)
            if eval_trials <= 0:
                raise ValueError("SIZES: eval_steps needs eval_trials > 0 (the forecast r it selects on).")
            flags += ["--eval_strategy", "steps", "--eval_steps", str(eval_steps), "--save_steps", str(eval_steps),
                      "--load_best_model_at_end", "True", "--metric_for_best_model", "forecast_pearson_r",
                      "--greater_is_better", "True"]
        with PeakMemory() as memory:
            script.run(argv + flags, callbacks=[time_budget(budget, info), validation_recorder(info)])
        info["peak_memory_mb"] = memory.peak_delta_mb
        return {"info": info}

    timings: dict = {}
    run_all.run_stage(stage, "pretrain", run, timings)
    info = json.loads(stage.marker.read_text()).get("info", info)
    info["seconds"], info["reused"] = timings["pretrain"]["seconds"], timings["pretrain"]["reused"]
    return info


def validation_recorder(record: dict):
    """A callback that writes each evaluation's validation forecast r / MSE into `record["validation_curve"]` and,
    at the end, the step `load_best_model_at_end` kept (`best_step`, `best_validation_forecast_r`)."""
    from transformers import TrainerCallback

    class ValidationRecorder(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # CalmTrainer logs the forecast metrics
            if logs and "eval_forecast_pearson_r" in logs:
                record.setdefault("validation_curve", []).append(
                    {"step": int(state.global_step), "val_r": float(logs["eval_forecast_pearson_r"]),
                     "val_mse": float(logs.get("eval_forecast_mse", float("nan")))})

        def on_train_end(self, args, state, control, **kwargs):
            if state.best_model_checkpoint:
                record["best_step"] = int(Path(state.best_model_checkpoint).name.split("-")[-1])
                record["best_validation_forecast_r"] = state.best_metric

    return ValidationRecorder()


def reused_calm_info(calm_dir: Path, stage: str) -> dict:
    marker = calm_dir / stage / ".calm_stage.json"
    info = {"reused_from": str(calm_dir / stage), "reused": True}
    if marker.is_file():
        data = json.loads(marker.read_text())
        info.update(seconds=data.get("seconds"), params=data.get("params"))
        metrics = data.get("metrics") or {}  # the trainer's: optimizer steps = runtime x steps per second
        runtime, rate = metrics.get("train_runtime"), metrics.get("train_steps_per_second")
        if runtime and rate:
            info["steps"] = int(round(float(runtime) * float(rate)))
    return info


def band_calibration(samples: np.ndarray, truth: np.ndarray, point: np.ndarray | None = None,
                     band: tuple[float, float] = BAND, neuron_mask: np.ndarray | None = None) -> dict[str, Any]:
    """Calibration of a sampled forecast band against the truth.

    Args:
        samples: (trials, num_samples, neurons, horizon) sampled futures (z-scored).
        truth: (trials, neurons, horizon) the true future.
        point: (trials, neurons, horizon) the point forecast the band belongs to (its MAE is reported as the CRPS
            of a band of zero width, the reference a useful band must beat).
        band: lower and upper quantiles of the band.
        neuron_mask: (trials, neurons) True at real neurons (padded sessions); padding is not scored.

    Returns:
        `coverage`: fraction of truth values inside the [band[0], band[1]] sample quantiles at their own point
        (nominal `band[1] - band[0]`; with few samples the band is close to the sample range, so coverage is
        limited by the sample count); `crps`: the sample estimator mean_s |X_s - y| - 0.5 mean_{s,s'} |X_s - X_s'|
        averaged over every (trial, neuron, frame); `point_mae`; `num_samples`.
    """
    x = np.asarray(samples, dtype=np.float64)
    y = np.asarray(truth, dtype=np.float64)
    if x.ndim != 4 or x.shape[:1] + x.shape[2:] != y.shape:
        raise ValueError(f"samples {x.shape} must be (trials, num_samples, neurons, horizon) for truth {y.shape}.")
    num = x.shape[1]
    keep = np.ones(y.shape, dtype=bool) if neuron_mask is None else np.broadcast_to(
        np.asarray(neuron_mask, dtype=bool)[:, :, None], y.shape)
    lower, upper = np.quantile(x, band, axis=1)
    inside = (y >= lower) & (y <= upper)
    spread_to_truth = np.abs(x - y[:, None]).mean(axis=1)
    # sum_{s,s'} |x_s - x_s'| = 2 sum_k (2k - S - 1) x_(k) over the sorted samples: O(S log S) instead of O(S^2)
    weights = 2.0 * np.arange(1, num + 1) - num - 1
    pairwise = 2.0 * np.einsum("k,tknh->tnh", weights, np.sort(x, axis=1)) / num**2
    result = {
        "coverage": float(inside[keep].mean()),
        "nominal_coverage": float(band[1] - band[0]),
        "band_quantiles": list(band),
        "crps": float((spread_to_truth - 0.5 * pairwise)[keep].mean()),
        "num_samples": int(num),
    }
    if point is not None:
        result["point_mae"] = float(np.abs(np.asarray(point, dtype=np.float64) - y)[keep].mean())
    return result


def sampled_futures(forecaster, dataset, context: int, num_samples: int, batch_size: int = 8
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Sampled token rollouts of every test trial, batched like `evaluate_forecasting`.

    Returns (samples (trials, num_samples, neurons, horizon), truth (trials, neurons, horizon)).
    """
    import torch

    window = forecaster.window_size
    rows = dataset.with_format("numpy", columns=["input_values", "input_ids", "neuron_ids", "session_id"])
    samples, truths = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        values = np.stack(list(batch["input_values"])).astype(np.float32)
        ids = torch.as_tensor(np.stack(list(batch["input_ids"])).astype(np.int64))[..., : context // window]
        result = forecaster.forecast(
            values[..., :context], horizon=values.shape[-1] - context, context_ids=ids,
            neuron_ids=torch.as_tensor(np.stack(list(batch["neuron_ids"])).astype(np.int64)),
            session_ids=torch.as_tensor(np.asarray(batch["session_id"], dtype=np.int64)),
            mode="sample", num_samples=num_samples)
        samples.append(result.samples if result.samples is not None else result.forecast[:, None])
        truths.append(values[..., context:])
    return np.concatenate(samples).astype(np.float32), np.concatenate(truths)


def probe_rows(dataset, max_trials: int):
    """At most `max_trials` test rows spread evenly over the sessions (the probe needs >= 2 trials per session;
    the first rows of a split all belong to its first session)."""
    sessions = np.asarray(dataset.with_format("numpy")["session_id"])
    unique = np.unique(sessions)
    per_session = max(2, max_trials // len(unique))
    index = np.concatenate([np.flatnonzero(sessions == s)[:per_session] for s in unique])
    return dataset.select(np.sort(index)[: max(max_trials, 2 * len(unique))].tolist())


def run_swap_probe(model, test, context: int, max_trials: int, blocks: int = 4) -> dict[str, Any]:
    """`calm_hf.forecasting.trial_swap_probe` on test trials: next-token CE and direct-forecast r/MSE with the true
    population vs the other neurons' tokens taken from another trial of the same session.

    The probe scores neurons in blocks that keep their own true tokens (only the rest is swapped); its default block
    of 50 neurons would swap nothing in a population of <= 50 (park's sessions, 28-74 neurons). Here the block is a
    fixed fraction of the population, `ceil(neurons / blocks)`, so every scored neuron sees (blocks - 1) / blocks of
    the population from another trial, whatever the session's size (cost: 2 * blocks forward passes).
    """
    from calm_hf.forecasting import trial_swap_probe

    if max_trials < 2:
        return {"status": "not run: probe_trials < 2"}
    start = time.perf_counter()
    try:
        rows = probe_rows(test, max_trials)
        first = rows.with_format("numpy")[0]
        block = math.ceil(first["input_ids"].shape[0] / blocks)
        probe = trial_swap_probe(model, rows, context_frames=context, max_trials=len(rows), block_neurons=block)
    except ValueError as error:  # e.g. a session with a single test trial: nothing to swap with
        return {"status": f"not run: {error}"}
    probe.update(status="ok", seconds=time.perf_counter() - start, block_neurons=block,
                 swapped_fraction=1.0 - block / first["input_ids"].shape[0],
                 sessions=sorted(int(s) for s in np.unique(rows.with_format("numpy")["session_id"])),
                 tokens=int(probe["trials"] * first["input_ids"].shape[0] * (first["input_ids"].shape[1] - 1)),
                 values=int(probe["trials"] * first["input_ids"].shape[0]))
    return probe


def combine_probes(probes: list[dict]) -> dict[str, Any]:
    """One probe summary over sessions probed separately (sessions with different neuron counts): CE and MSE
    weighted by the tokens / neuron-trials they cover, r averaged over sessions like the forecast r."""
    done = [p for p in probes if p.get("status") == "ok"]
    if not done:
        return probes[0] if probes else {"status": "not run"}
    if len(done) == 1 and len(probes) == 1:
        combined = dict(done[0])
    else:
        combined = {"status": "ok", "per_session": probes, "trials": sum(p["trials"] for p in done),
                    "seconds": sum(p["seconds"] for p in done), "sessions": sum((p["sessions"] for p in done), []),
                    "swapped_fraction": float(np.mean([p["swapped_fraction"] for p in done]))}
        for key, weight in (("next_token_ce", "tokens"), ("mse", "values")):
            for suffix in ("", "_swapped"):
                if all(f"{key}{suffix}" in p for p in done):
                    combined[f"{key}{suffix}"] = (sum(p[f"{key}{suffix}"] * p[weight] for p in done)
                                                  / sum(p[weight] for p in done))
        for suffix in ("", "_swapped"):
            if all(f"pearson_r{suffix}" in p for p in done):
                combined[f"pearson_r{suffix}"] = float(np.nanmean([p[f"pearson_r{suffix}"] for p in done]))
    for key in ("next_token_ce", "pearson_r", "mse"):
        if key in combined and f"{key}_swapped" in combined:
            combined[f"{key}_change"] = combined[f"{key}_swapped"] - combined[key]
    log(f"  swap probe ({combined['trials']} trials, {combined['seconds']:.0f} s): CE {combined['next_token_ce']:.4f} "
        f"-> {combined['next_token_ce_swapped']:.4f}" + (
            f", r {combined['pearson_r']:.3f} -> {combined['pearson_r_swapped']:.3f}" if "pearson_r" in combined
            else ""))
    return combined


def evaluate_calm(model_dir: Path, tokenizer_dir: Path, test, truth: np.ndarray, session_ids: np.ndarray,
                  modes: list[str], num_samples: int, seed: int, model=None, context: int = CONTEXT_FRAMES,
                  probe_trials: int = 60, neuron_mask: np.ndarray | None = None, probe_blocks: int = 4
                  ) -> tuple[dict, dict]:
    """Score CalM forecasts on the test split; returns (entries per variant, predictions per variant).

    "direct" is the continuous head's conditional mean; its band is the spread of the `num_samples` sampled token
    rollouts recentred on it (exactly `CalmForecaster.forecast(mode="direct", num_samples=...)`), and "mean" is the
    mean of those same rollouts, so the sampling is paid once. Both report `band_calibration`. Every variant of one
    model carries the model's trial-swap probe (`swap_probe`). With `neuron_mask` (sessions with different neuron
    counts, zero-padded in `truth`) every session is forecast and probed on its own and the predictions are
    padded back.
    """
    import torch

    from calm_hf import CalmForCausalNeuralModeling, CalmTokenizer
    from calm_hf.forecasting import CalmForecaster, evaluate_forecasting

    model = model if model is not None else CalmForCausalNeuralModeling.from_pretrained(model_dir)
    tokenizer = CalmTokenizer.from_pretrained(tokenizer_dir)
    forecaster = CalmForecaster(model.eval(), tokenizer.eval())
    params = {"dat": int(model.num_parameters()), "tokenizer": int(tokenizer.num_parameters())}
    has_head = getattr(model, "value_head", None) is not None
    if neuron_mask is None:
        groups = [(np.arange(len(truth)), test)]
    else:  # one group per session: rows of a batch must share the neuron count
        test_sessions = np.asarray(test.with_format("numpy")["session_id"])
        if not np.array_equal(test_sessions, session_ids):
            raise RuntimeError("CalM's test rows are not in the order of the scored trials; the splits must match.")
        groups = [(np.flatnonzero(session_ids == s), test.select(np.flatnonzero(session_ids == s).tolist()))
                  for s in np.unique(session_ids)]

    def padded(pieces: list[np.ndarray], lead: tuple = ()) -> np.ndarray:
        """Per-group predictions (rows, *lead, neurons, horizon) back into the padded (trials, *lead, N, H)."""
        out = np.zeros((len(truth),) + lead + truth.shape[1:], dtype=np.float32)
        for (rows, _), piece in zip(groups, pieces):
            out[rows, ..., : piece.shape[-2], :] = piece
        return out

    def check(got: np.ndarray, rows: np.ndarray):
        want = truth[rows][:, : got.shape[1]]
        if got.shape != want.shape or not np.allclose(got, want, atol=1e-6):
            raise RuntimeError("CalM was scored on different trials than the baselines; the splits must match.")

    entries, predictions = {}, {}
    names = {"direct": "direct", "greedy": "greedy", "mean": f"sample_mean{num_samples}", "soft": "soft",
             "sample": "sample"}
    sampled, sample_seconds = None, 0.0
    if "mean" in modes or ("direct" in modes and has_head and num_samples > 1):
        torch.manual_seed(seed)
        start, pieces = time.perf_counter(), []
        for rows, group in groups:
            samples, group_truth = sampled_futures(forecaster, group, context, num_samples)
            check(group_truth, rows)
            pieces.append(samples)
        sampled, sample_seconds = padded(pieces, (num_samples,)), time.perf_counter() - start
        log(f"  calm: {num_samples} sampled rollouts per trial ({sample_seconds:.0f} s)")
    probe = combine_probes([run_swap_probe(model, group, context, probe_trials * len(rows) // len(truth),
                                           probe_blocks) for rows, group in groups])
    for mode in modes:
        if mode == "direct" and not has_head:
            entries[names[mode]] = {"status": "not run: the model has no continuous forecast head "
                                              "(config.value_head_steps = 0)"}
            continue
        start = time.perf_counter()
        if mode == "mean":
            pred, seconds = sampled.mean(axis=1), sample_seconds
        else:
            pieces = []
            for rows, group in groups:
                torch.manual_seed(seed)
                out = evaluate_forecasting(forecaster, group, context_frames=context, mode=mode,
                                           num_samples=num_samples if mode == "sample" else 1,
                                           return_predictions=True)
                check(out["truth"], rows)
                pieces.append(out["predictions"])
            pred, seconds = padded(pieces), time.perf_counter() - start
        entry = {
            "status": "ok",
            **score(pred, truth, session_ids, neuron_mask),
            "rollout": {"mode": mode, "num_samples": num_samples if mode in ("mean", "sample") else 1},
            "inference_seconds_per_trial": seconds / len(truth),
            "parameters": params,
            "swap_probe": probe,
        }
        if mode == "mean":
            entry["calibration"] = {**band_calibration(sampled, truth, pred, neuron_mask=neuron_mask),
                                    "band": "the sampled rollouts"}
        elif mode == "direct" and sampled is not None:
            band = pred[:, None] + (sampled - sampled.mean(axis=1, keepdims=True))
            entry["calibration"] = {**band_calibration(band, truth, pred, neuron_mask=neuron_mask),
                                    "band": "sampled rollouts recentred on the direct forecast"}
            entry["rollout"]["band_num_samples"] = num_samples
            entry["band_inference_seconds_per_trial"] = sample_seconds / len(truth)
        entries[names[mode]] = entry
        predictions[names[mode]] = pred
        calibration = entry.get("calibration")
        log(f"  calm {names[mode]}: r = {entry['pearson_r']:.3f}, mse = {entry['mse']:.3f} ({seconds:.0f} s)"
            + (f", coverage {calibration['coverage']:.2f}, CRPS {calibration['crps']:.3f}" if calibration else ""))
    return entries, predictions


def calm_entries(prefix: str, entries: dict, predictions: dict, train_info: dict) -> tuple[dict, dict]:
    """Name CalM variants `<prefix>_<rollout>` and attach the training cost to each."""
    out, preds = {}, {}
    for variant, entry in entries.items():
        name = f"{prefix}_{variant}"
        if entry["status"] != "ok":
            out[name] = entry
            continue
        params = entry.pop("parameters")
        entry["cost"] = {
            "train_seconds": train_info.get("train_seconds"),
            "inference_seconds_per_trial": entry.pop("inference_seconds_per_trial"),
            "parameters": params["dat"] + params["tokenizer"],
            "parameters_detail": params,
            "peak_memory_mb": train_info.get("peak_memory_mb"),
        }
        entry["training"] = train_info
        entry["search_log"] = {"note": "no hyperparameter search: fixed preset and budget; rollout variants are all "
                                       "reported (choosing the best on test would be optimistic)"}
        out[name], preds[name] = entry, predictions[variant]
    return out, preds


# ----------------------------------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------------------------------


def sim_corpus(args, size: dict, work: Path, budget_s: float) -> dict:
    """Trials, tokenizer and tokens of the simulated benchmark: from `--calm_dir` or built in `work/sim`."""
    import datasets

    run_all = command("stages")
    if args.calm_dir:
        calm = Path(args.calm_dir).resolve()
        missing = [p for p in ("trials", "tokenizer", "tokenized", "pretrain") if not (calm / p).is_dir()]
        if missing:
            raise ValueError(f"--calm_dir {calm} lacks {missing}; point it at a main job's .calm-base-work folder.")
        corpus = {"trials": calm / "trials", "tokenizer": calm / "tokenizer", "tokenized": calm / "tokenized",
                  "pretrain": calm / "pretrain", "tokenizer_info": reused_calm_info(calm, "tokenizer"),
                  "simulation": reused_calm_info(calm, "trials").get("params")}
    else:
        sim = size["sim"]
        trials = run_all.Stage(work / "trials", {**sim, "seed": args.seed})
        run_all.run_stage(trials, "simulate", lambda: command("prepare").run(
            ["--output_dir", str(trials.path), "--seed", str(args.seed)] + [f"--{k}={v}" for k, v in sim.items()]
        ) and None, {})
        tokenizer_info = train_tokenizer_stage(work, trials.path, size, budget_s * sim["num_sessions"], args.seed)
        corpus = {"trials": trials.path, "tokenizer": work / "tokenizer",
                  "tokenized": tokenize_stage(work, trials.path, work / "tokenizer"), "pretrain": None,
                  "tokenizer_info": tokenizer_info, "simulation": {**sim, "seed": args.seed}}
    tokenized = datasets.load_from_disk(str(corpus["tokenized"]))
    corpus["dataset"] = tokenized
    corpus["arrays"] = {split: split_arrays(tokenized[split]) for split in ("train", "validation", "test")}
    return corpus


def run_sim(args, size, work, budget_s, models, corpus) -> tuple[dict, dict, dict]:
    from calm_hf.data import load_session_metadata

    data = corpus["arrays"]
    sessions = sorted(int(s) for s in np.unique(data["train"][1]))
    infos = load_session_metadata(corpus["tokenized"])
    result: dict[str, Any] = {
        "status": "ok",
        "description": f"simulated benchmark, {len(sessions)} sessions x {infos[0].num_neurons} neurons, "
                       f"{infos[0].num_frames} frames per trial at {infos[0].fs} Hz",
        "simulation": corpus["simulation"],
        "sessions": [i.name for i in infos],
        "split_sizes": {k: int(len(v[0])) for k, v in data.items()},
        "context_frames": CONTEXT_FRAMES,
        "rate_hz": float(infos[0].fs),
        "models": {},
    }
    entries, predictions, fits = run_baselines([m for m in models if m != "calm"], data, sessions, size, budget_s,
                                               args.seed)
    result["models"].update(entries)
    test_x, test_s = data["test"]
    truth = test_x[:, :, CONTEXT_FRAMES:]
    if "calm" in models:
        tokenizer_info = corpus["tokenizer_info"]
        if corpus["pretrain"] is not None:
            pretrain_dir, info = corpus["pretrain"], reused_calm_info(Path(args.calm_dir).resolve(), "pretrain")
        else:
            log("calm: pretraining on all sessions' training trials")
            pretrain_dir = work / "pretrain"
            info = pretrain_stage(pretrain_dir, corpus["tokenized"], corpus["tokenizer"], size,
                                  budget_s * len(sessions), args.seed)
        train_info = {"tokenizer": tokenizer_info, "pretrain": info,
                      "train_seconds": _sum_seconds(tokenizer_info, info), "peak_memory_mb": info.get("peak_memory_mb")}
        calm, calm_preds = evaluate_calm(pretrain_dir, pretrain_dir / "tokenizer", corpus["dataset"]["test"], truth,
                                         test_s, args.calm_modes, args.num_samples, args.seed,
                                         probe_trials=size["probe_trials"],
                                         probe_blocks=size["probe_blocks"])
        entries, preds = calm_entries("calm", calm, calm_preds, train_info)
        result["models"].update(entries)
        predictions.update(preds)
        if args.ablations:
            ablation_budget, ablation_size = budget_s * len(sessions), calm_size(size, corpus)
            if corpus["pretrain"] is not None and info.get("seconds"):  # the reused run's own training time
                ablation_budget = 1.1 * float(info["seconds"])
            for name, overrides in ABLATIONS.items():
                same = ablation_is_noop(ablation_size["calm"]["preset"], overrides)
                if same:  # e.g. the cpu preset already trains without scheduled sampling: nothing to ablate
                    for mode in args.ablation_modes:
                        result["models"][f"calm_{name}_{mode}"] = {"status": f"not run: {same}"}
                    log(f"calm ablation {name}: skipped ({same})")
                    continue
                log(f"calm ablation {name}: {overrides}")
                ab_info = pretrain_stage(work / f"pretrain_{name}", corpus["tokenized"], corpus["tokenizer"],
                                         ablation_size,
                                         ablation_budget, args.seed, overrides)
                ab_train = {"tokenizer": tokenizer_info, "pretrain": ab_info,
                            "train_seconds": _sum_seconds(tokenizer_info, ab_info),
                            "peak_memory_mb": ab_info.get("peak_memory_mb")}
                ab, ab_preds = evaluate_calm(work / f"pretrain_{name}", corpus["tokenizer"], corpus["dataset"]["test"],
                                             truth, test_s, args.ablation_modes, args.num_samples, args.seed,
                                             probe_trials=0)
                entries, preds = calm_entries(f"calm_{name}", ab, ab_preds, ab_train)
                result["models"].update(entries)
                predictions.update(preds)
    return result, {"truth": truth, "session_ids": test_s, "context": test_x[:, :, :CONTEXT_FRAMES],
                    "predictions": predictions, "rate_hz": MODEL_RATE}, fits


def ablation_is_noop(preset: str, overrides: dict) -> str | None:
    """A reason when the preset already has every overridden value (the ablation would retrain the same model)."""
    from calm_hf import CalmConfig

    config = CalmConfig.from_preset(preset)
    if all(getattr(config, key, None) == value for key, value in overrides.items()):
        return f"preset {preset!r} already has {overrides}"
    return None


def calm_size(size: dict, corpus: dict) -> dict:
    """The size dict with CalM's pretraining settings taken from a reused `--calm_dir` run (so ablations and the
    held-out pretraining match it), else unchanged."""
    if corpus.get("pretrain") is None:
        return size
    params = reused_calm_info(corpus["pretrain"].parent, "pretrain").get("params") or {}
    keys = (("preset", "model_preset"), ("epochs", "pretrain_epochs"), ("batch", "pretrain_batch"),
            ("lr", "pretrain_lr"), ("max_neurons", "max_neurons"))
    settings = {k: params[p] for k, p in keys if p in params}
    # a main job's stage records only the `calm pretrain` command line: read the same settings from it
    argv = list(params.get("argv") or [])
    flags = (("preset", "--preset", str), ("epochs", "--num_train_epochs", float),
             ("batch", "--per_device_train_batch_size", int), ("lr", "--learning_rate", float),
             ("max_neurons", "--max_neurons", int))
    for key, flag, kind in flags:
        if key not in settings and flag in argv[:-1]:
            settings[key] = kind(argv[argv.index(flag) + 1])
    return {**size, "calm": {**size["calm"], **settings}}


def heldout_pretrain_budget(budget_s: float, num_sessions: int, corpus: dict) -> float:
    """Seconds for the held-out protocol's pretraining: one budget per pretraining session, or, when the sim CalM is
    a reused run that trained longer, that run's pretraining time (the held-out model then gets the same schedule
    as the sim model it is compared with; its 10-minute pretraining scored 0.335 where the same session seen in the
    23-minute pretraining scored 0.362). `heldout_pretrain_steps` makes it the same number of steps too."""
    seconds = budget_s * num_sessions
    if corpus.get("pretrain") is not None:
        reused = reused_calm_info(corpus["pretrain"].parent, "pretrain").get("seconds")
        if reused:
            seconds = max(seconds, float(reused))
    return seconds


def heldout_pretrain_steps(corpus: dict) -> int | None:
    """Optimizer steps of a reused sim CalM's pretraining (from its trainer metrics), or None. The held-out model
    trains that many steps, whatever this run's thread count: the main job pretrains on two threads, the benchmark
    usually on one, and the same seconds would give it fewer steps."""
    if corpus.get("pretrain") is None:
        return None
    return reused_calm_info(corpus["pretrain"].parent, "pretrain").get("steps")


def _sum_seconds(*infos: dict) -> float | None:
    values = [i.get("seconds") for i in infos]
    return float(sum(values)) if all(v is not None for v in values) else None


def run_heldout(args, size, work, budget_s, models, corpus, sim_fits: dict | None) -> tuple[dict, dict]:
    import datasets

    from calm_hf import CalmForCausalNeuralModeling
    from calm_hf.data import load_session_metadata, save_session_metadata

    infos = load_session_metadata(corpus["tokenized"])
    if len(infos) < 2:
        message = (f"skipped: the held-out protocol needs >= 2 simulated sessions (pretrain on all but the last), the "
                   f"corpus has {len(infos)}; simulate more sessions or drop --calm_dir")
        log(message)
        return {"status": message, "models": {}}, None
    held = infos[-1]
    pretrain_infos = infos[:-1]
    data = corpus["arrays"]
    result: dict[str, Any] = {
        "status": "ok",
        "description": f"CalM pretrained on {[i.name for i in pretrain_infos]}, embeddings adapted on {held.name}; "
                       f"scored on {held.name}'s test trials",
        "held_out_session": held.name,
        "context_frames": CONTEXT_FRAMES,
        "rate_hz": float(held.fs),
        "models": {},
    }
    entries, predictions, _ = run_baselines([m for m in models if m != "calm"], data, [held.session_id], size,
                                            budget_s, args.seed, reuse=sim_fits)
    result["models"].update(entries)
    test_x, test_s = data["test"]
    keep = test_s == held.session_id
    truth, session_ids = test_x[keep][:, :, CONTEXT_FRAMES:], test_s[keep]
    if "calm" in models:
        tokenized = corpus["dataset"]
        heldout_work = work / "heldout"
        pre_dir = heldout_work / "splits" / "pretrain_tokenized"
        own_dir = heldout_work / "splits" / "session_tokenized"
        keep_ids = {i.session_id for i in pretrain_infos}

        def split_sessions():
            tokenized.filter(lambda s: s in keep_ids, input_columns="session_id").save_to_disk(str(pre_dir))
            save_session_metadata(pre_dir, pretrain_infos)
            tokenized.filter(lambda s: s == held.session_id, input_columns="session_id").save_to_disk(str(own_dir))
            save_session_metadata(own_dir, [held])

        run_all = command("stages")
        split_stage = run_all.Stage(heldout_work / "splits", {"tokenized": str(corpus["tokenized"]),
                                                              "tokenized_version": fingerprint(corpus["tokenized"]),
                                                              "held_out": held.session_id})
        run_all.run_stage(split_stage, "heldout_split", split_sessions, {})
        log(f"heldout: pretraining on {[i.name for i in pretrain_infos]}")
        pre_info = pretrain_stage(heldout_work / "pretrain", pre_dir, corpus["tokenizer"], calm_size(size, corpus),
                                  heldout_pretrain_budget(budget_s, len(pretrain_infos), corpus), args.seed,
                                  steps=heldout_pretrain_steps(corpus))
        adapt_info = adapt_stage(heldout_work, own_dir, held.name, size, budget_s * size["adapt"].get("budgets", 1),
                                 args.seed, pre_info)
        adapted = CalmForCausalNeuralModeling.from_pretrained(heldout_work / "adapted")
        session_id = adapted.config.session_names.index(held.name)
        neuron_ids = np.arange(*adapted.config.session_neuron_ranges[session_id])
        own = datasets.load_from_disk(str(own_dir))
        test = command("adapt").remap_to_session(own["test"], session_id, neuron_ids)
        train_info = {"tokenizer": corpus["tokenizer_info"], "pretrain": pre_info, "adapt": adapt_info,
                      "train_seconds": _sum_seconds(corpus["tokenizer_info"], pre_info, adapt_info),
                      "adapt_seconds": adapt_info.get("seconds"),
                      "peak_memory_mb": max(pre_info.get("peak_memory_mb") or 0, adapt_info.get("peak_memory_mb") or 0)}
        calm, calm_preds = evaluate_calm(heldout_work / "adapted", heldout_work / "adapted" / "tokenizer", test,
                                         truth, session_ids, args.calm_modes, args.num_samples, args.seed,
                                         model=adapted, probe_trials=size["probe_trials"],
                                         probe_blocks=size["probe_blocks"])
        entries, preds = calm_entries("calm_adapted", calm, calm_preds, train_info)
        result["models"].update(entries)
        predictions.update(preds)
    return result, {"truth": truth, "session_ids": session_ids, "context": test_x[keep][:, :, :CONTEXT_FRAMES],
                    "predictions": predictions, "rate_hz": MODEL_RATE}


def adapt_stage(heldout_work: Path, own_dir: Path, session_name: str, size: dict, budget_s: float, seed: int,
                pre_info: dict) -> dict:
    import datasets

    run_all = command("stages")
    cfg = size["adapt"]
    stage = run_all.Stage(heldout_work / "adapted", {"data": str(own_dir), "data_version": fingerprint(own_dir),
                                                     "model_version": fingerprint(heldout_work / "pretrain"),
                                                     **cfg, "budget_s": budget_s, "seed": seed})
    info: dict[str, Any] = {"budget_seconds": budget_s, **cfg}
    script = command("adapt")

    def run():
        rows = len(datasets.load_from_disk(str(own_dir))["train"])
        planned = math.ceil(cfg["epochs"] * math.ceil(rows / cfg["batch"]))
        # the frozen backbone still runs forward and backward: the pretraining step time is the estimate
        max_steps = plan_steps(planned, float(pre_info.get("seconds_per_step") or 1.0), budget_s)
        info.update(planned_steps=planned, max_steps=max_steps)
        with PeakMemory() as memory:
            metrics = script.run(
                ["--model_path", str(heldout_work / "pretrain"), "--tokenized_dataset", str(own_dir),
                 "--session_name", session_name, "--max_neurons", str(cfg["max_neurons"]),
                 "--context_frames", str(CONTEXT_FRAMES),
                 "--backbone_learning_rate", str(cfg.get("backbone_lr", 0.0))]
                + trainer_flags(stage.path, cfg["epochs"], cfg["batch"], cfg["lr"], seed, max_steps, None),
                callbacks=[time_budget(budget_s, info)])
        info["peak_memory_mb"] = memory.peak_delta_mb
        # the script scores with the package's default forecast (`calm_hf.forecasting.default_forecast_mode`):
        # direct for a model with the continuous head, else greedy
        from calm_hf import CalmConfig

        config = CalmConfig.from_pretrained(heldout_work / "pretrain")
        info["script_forecast_mode"] = "direct" if config.value_head_steps > 0 else "greedy"
        info["script_test_forecast_pearson_r"] = float(metrics["test_forecast_pearson_r"])
        return {"info": info}

    timings: dict = {}
    run_all.run_stage(stage, "adapt", run, timings)
    info = json.loads(stage.marker.read_text()).get("info", info)
    info["seconds"], info["reused"] = timings["adapt"]["seconds"], timings["adapt"]["reused"]
    return info


def run_zebrafish(args, size, work, budget_s, models) -> tuple[dict, dict | None]:
    import datasets

    from calm_hf.data import (
        SessionTrials,
        build_trial_dataset,
        cut_trials,
        default_data_dir,
        load_triplett_zebrafish,
        prepare_session,
        resample,
        save_session_metadata,
    )

    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    try:
        recording = load_triplett_zebrafish(data_dir)
    except FileNotFoundError as error:
        message = f"skipped: zebrafish recording not found ({error})"
        log(message)
        return {"status": message, "models": {}}, None
    cfg = size["zebrafish"]
    run_all = command("stages")
    zf_work = work / "zebrafish"
    trials = run_all.Stage(zf_work / "trials", {**cfg, "seed": args.seed, "source": str(data_dir)})

    def prepare():
        traces = recording.traces if cfg["max_neurons"] is None else recording.traces[: cfg["max_neurons"]]
        continuous = resample(traces, recording.fs, MODEL_RATE)  # the whole recording at once: no per-trial edges
        cut = cut_trials(continuous, cfg["trial_frames"])
        if cfg["max_trials"] is not None:
            cut = cut[: cfg["max_trials"]]
        session = SessionTrials(name=recording.name, traces=cut, fs=MODEL_RATE)
        prepared = prepare_session(session, target_fs=MODEL_RATE, split_seed=args.seed)
        build_trial_dataset(prepared).save_to_disk(str(trials.path))
        save_session_metadata(trials.path, [prepared])

    run_all.run_stage(trials, "zebrafish_trials", prepare, {})
    corpus = datasets.load_from_disk(str(trials.path))
    data = {split: split_arrays(corpus[split]) for split in ("train", "validation", "test")}
    result: dict[str, Any] = {
        "status": "ok",
        "description": f"Triplett 2018 zebrafish tectum ({recording.name}), {data['train'][0].shape[1]} neurons, "
                       f"{recording.fs} Hz resampled to {MODEL_RATE} Hz, {cfg['trial_frames']}-frame trials",
        "split_sizes": {k: int(len(v[0])) for k, v in data.items()},
        "calm_setup": "own tokenizer + DAT trained on this recording's training trials",
        "context_frames": CONTEXT_FRAMES,
        "rate_hz": MODEL_RATE,
        "models": {},
    }
    entries, predictions, _ = run_baselines([m for m in models if m != "calm"], data, [0], size, budget_s, args.seed)
    result["models"].update(entries)
    test_x, test_s = data["test"]
    truth = test_x[:, :, CONTEXT_FRAMES:]
    if "calm" in models:
        log("zebrafish: calm tokenizer + pretraining")
        entries, preds = own_corpus_calm(args, size, zf_work, trials.path, budget_s, truth, test_s, CONTEXT_FRAMES)
        result["models"].update(entries)
        predictions.update(preds)
    return result, {"truth": truth, "session_ids": test_s, "context": test_x[:, :, :CONTEXT_FRAMES],
                    "predictions": predictions, "rate_hz": MODEL_RATE}


def own_corpus_calm(args, size: dict, work: Path, trials_dir: Path, budget_s: float, truth: np.ndarray,
                    session_ids: np.ndarray, context: int, neuron_mask: np.ndarray | None = None
                    ) -> tuple[dict, dict]:
    """A dataset's own CalM: tokenizer and DAT trained on its training trials (each stage gets `budget_s`), scored
    on its test trials. Returns (entries, predictions) named `calm_<mode>`."""
    import datasets

    tokenizer_info = train_tokenizer_stage(work, trials_dir, size, budget_s, args.seed)
    tokenized_dir = tokenize_stage(work, trials_dir, work / "tokenizer")
    info = pretrain_stage(work / "pretrain", tokenized_dir, work / "tokenizer", size, budget_s, args.seed,
                          context=context)
    train_info = {"tokenizer": tokenizer_info, "pretrain": info,
                  "train_seconds": _sum_seconds(tokenizer_info, info), "peak_memory_mb": info.get("peak_memory_mb")}
    tokenized = datasets.load_from_disk(str(tokenized_dir))
    calm, calm_preds = evaluate_calm(work / "pretrain", work / "pretrain" / "tokenizer", tokenized["test"], truth,
                                     session_ids, args.calm_modes, args.num_samples, args.seed, context=context,
                                     probe_trials=size["probe_trials"], probe_blocks=size["probe_blocks"],
                                     neuron_mask=neuron_mask)
    return calm_entries("calm", calm, calm_preds, train_info)


def run_park(args, size, work, budget_s, models) -> tuple[dict, dict | None]:
    """Park et al. 2024 mouse V1 (5 sessions, 16 Hz, 128 trials of 49 frames each, NOT continuous across trials).

    Trials are 3 s long, so the 5 Hz / 40-frame protocol cannot apply: the dataset runs at its native 16 Hz, every
    trial cut at its `trial_starts` entry and cropped to `trial_frames` (48 = 12 tokens), context `context_frames`
    (24) -> the remaining 24 frames. Each session is split 70/15/15 by trial and z-scored with its own training
    statistics; one CalM (own tokenizer + DAT) is trained on every session's training trials (tokenizer and
    pretraining get one budget per session each), the baselines are fitted per session.
    """
    import datasets

    from calm_hf.data import (
        SessionTrials,
        build_trial_dataset,
        default_data_dir,
        load_park_sessions,
        prepare_session,
        save_session_metadata,
    )

    cfg = size["park"]
    context = int(cfg["context_frames"])
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    try:
        sessions = load_park_sessions(data_dir, trial_length=cfg["trial_frames"])
    except FileNotFoundError as error:
        message = f"skipped: Park 2024 recordings not found ({error})"
        log(message)
        return {"status": message, "models": {}}, None
    sessions = sessions[: cfg["max_sessions"]]
    rate = float(sessions[0].fs)
    if any(s.fs != rate for s in sessions) or cfg["trial_frames"] % 4 or cfg["trial_frames"] <= context:
        raise ValueError(f"park: sessions must share one rate (got {[s.fs for s in sessions]}) and trial_frames="
                         f"{cfg['trial_frames']} must be a multiple of the token window (4) longer than the context "
                         f"{context}.")
    run_all = command("stages")
    park_work = work / "park"
    trials = run_all.Stage(park_work / "trials", {**cfg, "seed": args.seed, "source": str(data_dir),
                                                  "sessions": [s.name for s in sessions]})

    def prepare():
        prepared = []
        for session in sessions:
            traces = session.traces[: cfg["max_trials"], : cfg["max_neurons"]]
            # behaviour (pupil, running) is not forecast; the trials are already at the model rate (no resampling)
            own = SessionTrials(name=session.name, traces=traces, fs=session.fs, extras=session.extras)
            prepared.append(prepare_session(own, target_fs=rate, split_seed=args.seed))
        build_trial_dataset(prepared).save_to_disk(str(trials.path))
        save_session_metadata(trials.path, prepared)

    run_all.run_stage(trials, "park_trials", prepare, {})
    corpus = datasets.load_from_disk(str(trials.path))
    data = {split: split_arrays(corpus[split]) for split in ("train", "validation", "test")}
    session_ids = sorted(int(s) for s in np.unique(data["train"][1]))
    neurons = neuron_counts(corpus["train"])  # sessions differ (28-74 neurons): arrays are padded, see split_arrays
    result: dict[str, Any] = {
        "status": "ok",
        "description": f"Park 2024 mouse V1 gratings, {len(sessions)} sessions "
                       f"({', '.join(str(neurons[s]) for s in session_ids)} "
                       f"neurons), native {rate:g} Hz, trials cut at trial_starts and cropped to {cfg['trial_frames']} "
                       f"frames ({cfg['trial_frames'] - context} forecast)",
        "sessions": [s.name for s in sessions],
        "split_sizes": {k: int(len(v[0])) for k, v in data.items()},
        "calm_setup": "own tokenizer + DAT trained on every session's training trials",
        "context_frames": context,
        "rate_hz": rate,
        "models": {},
    }
    entries, predictions, _ = run_baselines([m for m in models if m != "calm"], data, session_ids, size, budget_s,
                                            args.seed, context=context, neurons=neurons)
    result["models"].update(entries)
    test_x, test_s = data["test"]
    truth = test_x[:, :, context:]
    mask = padding_mask(test_s, truth.shape[1], neurons)
    if "calm" in models:
        log("park: calm tokenizer + pretraining on every session")
        entries, preds = own_corpus_calm(args, size, park_work, trials.path, budget_s * len(session_ids), truth,
                                         test_s, context, mask)
        result["models"].update(entries)
        predictions.update(preds)
    example = {"truth": truth, "session_ids": test_s, "context": test_x[:, :, :context], "predictions": predictions,
               "rate_hz": rate}
    if mask is not None:
        example["neuron_mask"] = mask
    return result, example


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return f"{value:.{digits}f}"


def calibration_lines(results: dict, datasets_run: list[str]) -> list[str]:
    """Markdown table of the sampled bands' calibration (CalM direct and sample-mean entries)."""
    rows = []
    for name in datasets_run:
        for model, entry in results["datasets"][name].get("models", {}).items():
            calibration = entry.get("calibration") if entry.get("status") == "ok" else None
            if calibration:
                rows.append(f"| {name} | {model} | {calibration['band']} | {calibration['num_samples']} | "
                            f"{_fmt(calibration['coverage'], 2)} | {_fmt(calibration['crps'])} | "
                            f"{_fmt(calibration.get('point_mae'))} |")
    if not rows:
        return []
    low, high = BAND
    return ["", f"## Forecast bands: calibration ({low:.0%}-{high:.0%} band, nominal coverage {high - low:.0%})", "",
            "Coverage = fraction of true test values inside the band; CRPS = mean |X - y| - 0.5 mean |X - X'| over "
            "the samples X, averaged over every neuron, frame and test trial (lower is better; a band of zero width "
            "scores the point forecast's MAE, shown for reference). With few samples the band is close to the sample "
            "range, so its coverage is bounded by the sample count.", "",
            "| dataset | model | band | samples | coverage | CRPS | point MAE |", "|---|---|---|---|---|---|---|", *rows]


VARIANT_SUFFIX = ("_direct", "_greedy", "_soft", "_sample")


def _model_prefix(name: str) -> str:
    """`calm_adapted_sample_mean4` -> `calm_adapted`: the trained model behind a forecast variant."""
    if "_sample_mean" in name:
        return name[: name.index("_sample_mean")]
    for suffix in VARIANT_SUFFIX:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def swap_probe_lines(results: dict, datasets_run: list[str]) -> list[str]:
    """Markdown table of the trial-swap probe, one row per trained CalM."""
    rows, seen = [], set()
    for name in datasets_run:
        for model, entry in results["datasets"][name].get("models", {}).items():
            probe = entry.get("swap_probe") if entry.get("status") == "ok" else None
            key = (name, _model_prefix(model))
            if probe is None or key in seen:
                continue
            seen.add(key)
            if probe.get("status") != "ok":
                rows.append(f"| {name} | {key[1]} | {probe.get('status')} | | | | |")
                continue
            change = probe.get("next_token_ce_change")
            r = (f"{_fmt(probe['pearson_r'])} -> {_fmt(probe['pearson_r_swapped'])}" if "pearson_r" in probe
                 else "no continuous head")
            mse_cell = f"{_fmt(probe['mse'])} -> {_fmt(probe['mse_swapped'])}" if "mse" in probe else ""
            rows.append(f"| {name} | {key[1]} | {probe['trials']} | {_fmt(probe.get('swapped_fraction'), 2)} | "
                        f"{_fmt(probe['next_token_ce'], 4)} -> "
                        f"{_fmt(probe['next_token_ce_swapped'], 4)} ({'+' if (change or 0) >= 0 else ''}"
                        f"{_fmt(change, 4)}) | {r} | {mse_cell} |")
    if not rows:
        return []
    return ["", "## Trial-swap probe: does CalM use the other neurons?", "",
            "Test trials scored twice: with the true population, and with the other neurons' tokens taken from a "
            "different trial of the same session (`calm_hf.forecasting.trial_swap_probe`). Neurons are scored in "
            "blocks that keep their own true tokens; the block is a fixed share of the population (column "
            "'swapped' = the share each scored neuron sees from another trial). Teacher-forced next-token CE (nats) "
            "and the direct forecast's r / MSE over the head's horizon after the context (this r is not the main "
            "table's: the horizon can be shorter). A model of population dynamics gets worse when the population "
            "is swapped; a per-neuron model does not.", "",
            "| dataset | model | trials | swapped | next-token CE own -> swapped (change) | direct r own -> swapped | "
            "direct MSE own -> swapped |", "|---|---|---|---|---|---|---|", *rows]


def write_markdown(results: dict, path: Path) -> None:
    datasets_run = [d for d in results["datasets"]]
    models: list[str] = []
    for name in datasets_run:
        for model in results["datasets"][name].get("models", {}):
            if model not in models:
                models.append(model)
    lines = ["# Forecasting benchmark", "",
             f"Size `{results['config']['size']}`, seed {results['config']['seed']}; context and rate per dataset "
             "below, horizon = rest of the trial. Pearson r per neuron over the horizon, averaged "
             "neurons -> trials -> sessions (± std over sessions; SEM over test trials for one-session datasets); "
             "MSE in z-scored units. CalM `direct` = the continuous head's conditional-mean forecast, `greedy` / "
             "`soft` = token rollouts, `sample_meanN` = the mean of N sampled token rollouts. Command: `"
             + results["config"]["command"] + "`", ""]
    for name in datasets_run:
        data = results["datasets"][name]
        if data["status"] != "ok":
            lines.append(f"- **{name}**: {data['status']}")
        else:
            lines.append(f"- **{name}**: {data['description']}; context {data.get('context_frames')} frames at "
                         f"{_fmt(data.get('rate_hz'), 0)} Hz")
    lines += ["", "## Mean forecast Pearson r (higher is better) and MSE", ""]
    header = "| model | " + " | ".join(f"{d} r | {d} MSE" for d in datasets_run) + " |"
    lines += [header, "|" + "---|" * (1 + 2 * len(datasets_run))]
    for model in models:
        cells = []
        for name in datasets_run:
            entry = results["datasets"][name].get("models", {}).get(model)
            if entry is None:
                cells += ["", ""]
            elif entry["status"] != "ok":
                cells += [entry["status"], ""]
            else:
                cells += [f"{_fmt(entry['pearson_r'])} ± {_fmt(entry['pearson_r_error'])}", _fmt(entry["mse"])]
        lines.append(f"| {model} | " + " | ".join(cells) + " |")
    lines += calibration_lines(results, datasets_run) + swap_probe_lines(results, datasets_run)
    for name in datasets_run:
        data = results["datasets"][name]
        ok = {m: e for m, e in data.get("models", {}).items() if e["status"] == "ok"}
        if not ok:
            continue
        sessions = list(next(iter(ok.values()))["per_session_pearson_r"])
        lines += ["", f"## {name}: per session (r / MSE)", "",
                  "| model | " + " | ".join(f"session {s}" for s in sessions) + " |",
                  "|" + "---|" * (1 + len(sessions))]
        for model, entry in ok.items():
            lines.append(f"| {model} | " + " | ".join(
                f"{_fmt(entry['per_session_pearson_r'].get(s))} / {_fmt(entry['per_session_mse'].get(s))}"
                for s in sessions) + " |")
        lines += ["", f"## {name}: cost (same run)", "",
                  "| model | training wall time (s) | inference per trial (ms) | parameters | peak memory (MB) | "
                  "hyperparameters chosen on validation |", "|---|---|---|---|---|---|"]
        for model, entry in ok.items():
            cost = entry["cost"]
            chosen = entry.get("chosen")
            if chosen is None:
                pre = entry.get("training", {}).get("pretrain", {})
                if pre.get("reused_from"):
                    params = pre.get("params") or {}
                    argv = params.get("argv") or []  # stage markers record the command line of the stage

                    def flag(name: str, default: str = "?") -> str:
                        return argv[argv.index(name) + 1] if name in argv[:-1] else default

                    chosen = (f"reused run {pre['reused_from']} (preset "
                              f"{params.get('model_preset', flag('--preset'))}, "
                              f"{params.get('pretrain_epochs', flag('--num_train_epochs'))} epochs)")
                else:
                    chosen = (f"fixed preset {pre.get('preset', '?')}, {pre.get('max_steps', '?')} steps"
                              f"{' (stopped by budget)' if pre.get('stopped_by_budget') else ''}")
                chosen += f"; rollout {entry['rollout']['mode']}"
            else:
                chosen = "; ".join(f"s{s}: " + ", ".join(f"{k}={v}" for k, v in (c or {}).items())
                                   for s, c in chosen.items())
            note = f" ({entry['note']})" if entry.get("note") else ""
            lines.append(f"| {model} | {_fmt(cost.get('train_seconds'), 1)} | "
                         f"{_fmt(1000 * cost['inference_seconds_per_trial'], 2)} | {cost.get('parameters'):,} | "
                         f"{_fmt(cost.get('peak_memory_mb'), 1)} | {chosen}{note} |")
    lines += ["", "Peak memory: " + results["config"]["memory_method"], "",
              "Validation search grids, every score and the choices are in `forecasting.json` "
              "(`datasets.<name>.models.<model>.search_log`).", ""]
    path.write_text("\n".join(lines))


def write_figure(results: dict, arrays: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [d for d in results["datasets"] if results["datasets"][d]["status"] == "ok"]
    if not names:
        names = list(results["datasets"])
    fig, axes = plt.subplots(2, max(1, len(names)), figsize=(5.2 * max(1, len(names)), 7.5), squeeze=False)
    for column, name in enumerate(names):
        ax = axes[0, column]
        models = {m: e for m, e in results["datasets"][name].get("models", {}).items() if e["status"] == "ok"}
        if not models:
            ax.text(0.5, 0.5, results["datasets"][name]["status"], ha="center", va="center", wrap=True, fontsize=8)
            ax.set_axis_off()
            axes[1, column].set_axis_off()
            continue
        labels = list(models)
        values = [models[m]["pearson_r"] for m in labels]
        errors = [models[m]["pearson_r_error"] if math.isfinite(models[m]["pearson_r_error"]) else 0 for m in labels]
        colors = ["tab:red" if m.startswith("calm") else "tab:gray" for m in labels]
        ax.bar(range(len(labels)), values, yerr=errors, color=colors, capsize=3)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_ylabel("forecast Pearson r")
        kind = next(iter(models.values()))["pearson_r_error_kind"]
        ax.set_title(f"{name} (error bars: {kind})", fontsize=9)
        # example forecasts: the first test trial, its most variable neuron
        example = arrays.get(name)
        ax = axes[1, column]
        if example is None:
            ax.set_axis_off()
            continue
        truth, context = example["truth"][0], example["context"][0]
        neuron = int(np.argmax(np.concatenate([context, truth], axis=-1).std(axis=-1)))
        rate = example.get("rate_hz", MODEL_RATE)
        t_context = np.arange(context.shape[-1]) / rate
        t_future = (context.shape[-1] + np.arange(truth.shape[-1])) / rate
        ax.plot(t_context, context[neuron], color="black", lw=1.2, label="context")
        ax.plot(t_future, truth[neuron], color="black", lw=1.2, ls=":", label="truth")
        shown = [m for m in example["predictions"] if not m.startswith("calm_no_")][:8]
        for model in shown:
            ax.plot(t_future, example["predictions"][model][0, neuron], lw=1.0, label=model,
                    ls="-" if model.startswith("calm") else "--")
        ax.axvline(t_context[-1] + 0.5 / rate, color="0.5", lw=0.6)
        ax.set_xlabel("time (s)")
        ax.set_ylabel(f"neuron {neuron} (z)")
        ax.set_title(f"{name}: test trial 0, example forecasts", fontsize=9)
        ax.legend(fontsize=6, ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# Entry point
# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", default=",".join(ALL_DATASETS), help=f"comma list of {ALL_DATASETS}")
    parser.add_argument("--models", default=",".join(ALL_MODELS), help=f"comma list of {ALL_MODELS}")
    parser.add_argument("--ablations", action="store_true", help="CalM without scheduled sampling / neighbourhood "
                                                                 "replacement (sim only)")
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES))
    parser.add_argument("--time_budget_minutes", type=float, default=None,
                        help="wall-clock cap of one baseline fit (default: the size's); CalM: see module docstring")
    parser.add_argument("--out", default=str(RESULTS), help="where forecasting.{json,md,png} are written")
    parser.add_argument("--work_dir", default=None, help="training stages (default: runs/forecasting_<size>, "
                                                         "gitignored); finished stages are reused on a re-run")
    parser.add_argument("--calm_dir", default=None, help="reuse a finished CalM run on sim (a main job's "
                                                         ".calm-base-work: trials/ tokenizer/ tokenized/ pretrain/)")
    parser.add_argument("--data_dir", default=None, help="real recordings folder (default: CALM_DATA_DIR or "
                                                         "../shared/data)")
    parser.add_argument("--num_samples", type=int, default=None,
                        help="sampled token rollouts per trial: averaged by CalM 'mean', the band of 'direct'")
    parser.add_argument("--calm_modes", default="direct,greedy,mean",
                        help=f"CalM forecasts to report, comma list of {CALM_MODES}: direct = the continuous head's "
                             "conditional mean (its band from --num_samples sampled rollouts), greedy / soft / sample "
                             "= token rollouts, mean = the mean of --num_samples sampled rollouts")
    parser.add_argument("--ablation_modes", default="direct,greedy", help="CalM forecasts reported for the ablations")
    parser.add_argument("--save_predictions", action="store_true",
                        help="also write forecasting_predictions_<dataset>.npz (truth, session ids, every forecast)")
    parser.add_argument("--calm_config_overrides", default=None,
                        help="JSON of CalmConfig fields for every CalM pretrained here, e.g. '{\"value_skip_windows\": 4}' "
                             "(its stages get their own keys, so earlier runs are not reused)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    args.datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    args.calm_modes = [m.strip() for m in args.calm_modes.split(",") if m.strip()]
    args.ablation_modes = [m.strip() for m in args.ablation_modes.split(",") if m.strip()]
    for value, allowed, flag in ((args.datasets, ALL_DATASETS, "--datasets"), (args.models, ALL_MODELS, "--models"),
                                 (args.calm_modes, CALM_MODES, "--calm_modes"),
                                 (args.ablation_modes, CALM_MODES, "--ablation_modes")):
        unknown = sorted(set(value) - set(allowed))
        if unknown:
            parser.error(f"{flag}: unknown {unknown}; choose from {list(allowed)}")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import torch
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.set_verbosity_warning()
    if args.threads:
        torch.set_num_threads(args.threads)
    size = SIZES[args.size]
    if args.calm_config_overrides:
        size = {**size, "calm": {**size["calm"], "config_overrides": json.loads(args.calm_config_overrides)}}
    if args.num_samples is None:
        args.num_samples = size["num_samples"]
    budget_minutes = args.time_budget_minutes if args.time_budget_minutes is not None else size["time_budget_minutes"]
    budget_s = 60.0 * budget_minutes
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(args.work_dir).resolve() if args.work_dir else REPO / "runs" / f"forecasting_{args.size}"
    work.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict[str, Any] = {
        "config": {
            "command": "python benchmarks/forecasting.py " + " ".join(sys.argv[1:] if argv is None else argv),
            "size": args.size, "seed": args.seed, "datasets": args.datasets, "models": args.models,
            "ablations": args.ablations, "time_budget_minutes_per_fit": budget_minutes,
            "calm_budgets": "tokenizer and pretraining: 1 budget per training session each (held-out pretraining: at "
                            "least the reused sim run's pretraining time); adaptation: SIZES adapt budgets "
                            f"({size['adapt'].get('budgets', 1)})",
            "context_frames": {"sim, heldout, zebrafish": CONTEXT_FRAMES, "park": size["park"]["context_frames"]},
            "model_rate_hz": {"sim, heldout, zebrafish": MODEL_RATE, "park": "native (16 Hz)"},
            "num_samples": args.num_samples,
            "calm_modes": args.calm_modes, "ablation_modes": args.ablation_modes, "calm_dir": args.calm_dir,
            "sizes": size, "precision": "fp32 (no bf16 autocast here; whether bf16 pays is CPU-specific, see calm_hf.hardware)",
            "torch_threads": torch.get_num_threads(),
            "memory_method": "peak resident set size during the fit minus the RSS just before it, sampled every 5 ms "
                             "from /proc/self/statm (ru_maxrss deltas also in the JSON as maxrss_delta_mb); CalM: "
                             "the pretraining stage (not measured when a finished run was reused).",
            "neuralforecast": "installed" if neuralforecast_available() else NF_NOT_INSTALLED,
        },
        "datasets": {},
    }
    arrays: dict[str, dict] = {}
    corpus = None
    sim_fits = None
    for name in args.datasets:
        log(f"=== {name} ===")
        if name in ("sim", "heldout") and corpus is None:
            corpus = sim_corpus(args, size, work / "sim", budget_s)
        if name == "sim":
            results["datasets"][name], arrays[name], sim_fits = run_sim(args, size, work / "sim", budget_s,
                                                                        args.models, corpus)
        elif name == "heldout":
            results["datasets"][name], example = run_heldout(args, size, work / "sim", budget_s, args.models,
                                                             corpus, sim_fits)
            if example is not None:
                arrays[name] = example
        else:
            runner = run_park if name == "park" else run_zebrafish
            results["datasets"][name], example = runner(args, size, work, budget_s, args.models)
            if example is not None:
                arrays[name] = example
    if args.ablations and "sim" not in args.datasets:
        results["config"]["ablations_note"] = "ablations run only with --datasets including sim"
    results["total_seconds"] = time.perf_counter() - started
    (out / "forecasting.json").write_text(json.dumps(jsonable(results), indent=2, allow_nan=False))
    write_markdown(results, out / "forecasting.md")
    write_figure(results, arrays, out / "forecasting.png")
    if args.save_predictions:
        for name, example in arrays.items():
            extra = {"neuron_mask": example["neuron_mask"]} if "neuron_mask" in example else {}
            np.savez_compressed(out / f"forecasting_predictions_{name}.npz", truth=example["truth"],
                                session_ids=example["session_ids"], context=example["context"], **extra,
                                **{f"pred_{m}": p for m, p in example["predictions"].items()})
    log(f"done in {results['total_seconds']:.0f} s: {out / 'forecasting.md'}")
    return results


if __name__ == "__main__":
    main()
