"""Data-derived initialisation of neuron identities: start the neuron mixer at the population's measured coupling.

Why: the dual-axis transformer learns *which* neurons drive which through the neuron embeddings, one SGD step at a
time (each row gets a gradient only when its neuron is sampled), while a ridge regression solves the same coupling
in closed form. Learning curves (`benchmarks/results/learning_curves/dat_ablations.md`) showed the gap to population ridge AR is
optimisation steps, not capacity. This module fits, per session and in seconds, a one-step linear coupling of the
training trials' window means (ridge, diagonal removed: a neuron's own history is the time axis' job), factors it
`A ~= P S Q^T` and writes the factors into the neuron embeddings so that every layer's `CalmNeuronMixer` starts with
`q_i . k_j ~ A_ji` (neuron j drives neuron i). Everything stays trainable; only the starting point changes.

With `align_mixer=False` it writes the new rows of an unseen session (`calm adapt --identity_init coupling`;
opt-in, it measured no gain on the held-out simulated session).

The same idea starts the forecast head's raw-trace highway (`init_value_skip`, `calm pretrain --value_skip_init
ridge`, the default): a ridge fit, shared by all neurons, of the next frames on a neuron's own last frames, with the
head's own output at zero. The model then starts at the best linear single-neuron forecast instead of noise
(zebrafish: best validation r 0.222 over 3 seeds vs 0.207 over 2 from the random init; sim unchanged).

    >>> from calm_hf.identity_init import init_identity_from_dataset
    >>> report = init_identity_from_dataset(model, corpus["train"])   # before Trainer.train()
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import numpy as np
import torch


def window_means(traces: np.ndarray, window_size: int) -> np.ndarray:
    """`(trials, neurons, frames)` -> `(trials, neurons, frames // window_size)`: the mean of each token window."""
    traces = np.asarray(traces, dtype=np.float64)
    if traces.ndim != 3:
        raise ValueError(f"traces must be (trials, neurons, frames), got shape {traces.shape}.")
    steps = traces.shape[-1] // window_size
    if steps < 2:
        raise ValueError(f"{traces.shape[-1]} frames give {steps} windows of {window_size}; need at least 2.")
    return traces[..., : steps * window_size].reshape(*traces.shape[:2], steps, window_size).mean(-1)


def coupling_factors(traces: np.ndarray, window_size: int, rank: int, ridge: float = 1e-2
                     ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Reduced-rank one-step coupling of one session.

    Args:
        traces: `(trials, neurons, frames)` z-scored training trials of the session.
        window_size: frames per token window.
        rank: number of factors kept.
        ridge: ridge strength relative to the mean diagonal of the Gram matrix.

    Returns:
        `(drivers, receivers, singular_values)`: `drivers` `(neurons, rank)` and `receivers` `(neurons, rank)`, each
        scaled by `sqrt(S)`, so that `receivers @ drivers.T ~= A.T` with `A[j, i]` the weight of neuron j's window
        mean on neuron i's next one (diagonal removed); `singular_values` `(min(neurons, ...),)` all of them.
    """
    means = window_means(traces, window_size)
    inputs = means[..., :-1].transpose(0, 2, 1).reshape(-1, means.shape[1])  # (samples, neurons)
    targets = means[..., 1:].transpose(0, 2, 1).reshape(-1, means.shape[1])
    gram = inputs.T @ inputs
    gram[np.diag_indices_from(gram)] += ridge * max(float(np.trace(gram)) / len(gram), 1e-12)
    coupling = np.linalg.solve(gram, inputs.T @ targets)  # (in, out)
    coupling[np.diag_indices_from(coupling)] = 0.0
    drivers, singular, receivers_t = np.linalg.svd(coupling)
    rank = min(rank, len(singular))
    root = np.sqrt(singular[:rank])
    return drivers[:, :rank] * root, receivers_t[:rank].T * root, singular


@torch.no_grad()
def init_identity_embeddings(model: Any, sessions: list[tuple[np.ndarray, np.ndarray]], rank: int | None = None,
                             ridge: float = 1e-2, align_mixer: bool = True) -> dict:
    """Writes coupling factors into `model`'s neuron embeddings and aligns every neuron mixer's query/key with them.

    Args:
        model: a `CalmForCausalNeuralModeling` / `CalmModel` whose config has `neuron_mixer_rank > 0`.
        sessions: one `(traces, neuron_ids)` per session: z-scored training trials `(trials, neurons, frames)` and
            the global neuron ids `(neurons,)` of those neurons in the embedding table.
        rank: factors per session (default `min(neuron_mixer_rank, hidden_size // 2)`).
        ridge: relative ridge strength of the coupling fit.
        align_mixer: also set every mixer's query/key to read dims `[0, rank)` / `[rank, 2 rank)` (a fresh model).
            False for a pretrained model gaining a session (`calm adapt`): its trained mixer keeps its weights and
            the new rows are written in the layout it was initialised with.

    Returns:
        A report: rank, per-session share of the coupling's energy the factors keep.
    """
    backbone = getattr(model, "model", model)
    config = backbone.config
    if config.neuron_mixer_rank <= 0:
        raise ValueError("init_identity_embeddings needs a neuron mixer (config.neuron_mixer_rank > 0): the "
                         "factors are read by the mixer's query/key projections.")
    rank = min(rank or config.neuron_mixer_rank, config.neuron_mixer_rank, config.hidden_size // 2)
    table = backbone.neuron_embeddings
    weight = table.trainable_rows if table.is_adapting else table.weight
    row_of = ({int(r): i for i, r in enumerate(table.trainable_row_ids.tolist())} if table.is_adapting else None)
    scale_ref = float(table.weight.float().std())  # all rows: a trained table's scale for a new session's rows
    report = {"rank": rank, "sessions": []}
    for traces, neuron_ids in sessions:
        neuron_ids = np.asarray(neuron_ids, dtype=np.int64)
        if len(neuron_ids) != np.asarray(traces).shape[1]:
            raise ValueError(f"{len(neuron_ids)} neuron_ids for traces with {np.asarray(traces).shape[1]} neurons.")
        if len(neuron_ids) < 3:
            continue  # no coupling to speak of
        drivers, receivers, singular = coupling_factors(traces, config.window_size, rank, ridge)
        r = drivers.shape[1]
        scale = scale_ref / max(float(drivers.std()), 1e-8)
        rows = neuron_ids if row_of is None else np.array([row_of[int(n)] for n in neuron_ids])
        rows_t = torch.as_tensor(rows, device=weight.device)
        weight[rows_t, :r] = torch.as_tensor(receivers * scale, dtype=weight.dtype, device=weight.device)
        weight[rows_t, rank : rank + r] = torch.as_tensor(drivers * scale, dtype=weight.dtype, device=weight.device)
        report["sessions"].append({"neurons": int(len(neuron_ids)), "energy_kept": float(
            (singular[:r] ** 2).sum() / max((singular**2).sum(), 1e-12))})
    if not report["sessions"] or not align_mixer:
        return report
    # every mixer reads dims [0, rank) as its query and [rank, 2 rank) as its key; keep 10% of the random init so
    # the other directions still get gradients
    gain = 1.0 / (10.0 * max(scale_ref, 1e-8))
    for layer in backbone.layers:
        mixer = layer.mixer
        eye = torch.eye(rank, dtype=mixer.query.weight.dtype, device=mixer.query.weight.device)
        mixer.query.weight.mul_(0.1)
        mixer.key.weight.mul_(0.1)
        mixer.query.weight[:rank, :rank] += gain * eye
        mixer.key.weight[:rank, rank : 2 * rank] += gain * eye
    return report


def init_identity_from_dataset(model: Any, dataset: Any, rank: int | None = None, ridge: float = 1e-2,
                               max_trials_per_session: int = 2000, align_mixer: bool = True) -> dict:
    """`init_identity_embeddings` from a trial dataset (`input_values`, `neuron_ids`, `session_id` columns, e.g.
    the `train` split of `calm_hf.data.load_trial_corpus`)."""
    missing = {"input_values", "neuron_ids", "session_id"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"the dataset lacks columns {sorted(missing)}; pass a trial dataset "
                         "(calm_hf.data.build_trial_dataset / load_trial_corpus).")
    rows = dataset.with_format("numpy")
    by_session: dict[int, list[int]] = defaultdict(list)
    for index, session in enumerate(rows["session_id"]):
        by_session[int(session)].append(index)
    sessions = []
    for session, index in sorted(by_session.items()):
        index = index[:max_trials_per_session]
        subset = rows.select(index)
        traces = np.stack([np.asarray(x, dtype=np.float32) for x in subset["input_values"]])
        sessions.append((traces, np.asarray(subset[0]["neuron_ids"], dtype=np.int64)))
    return init_identity_embeddings(model, sessions, rank=rank, ridge=ridge, align_mixer=align_mixer)


def fit_value_skip(trials: Any, window_size: int, lookback_windows: int, horizon_windows: int,
                   ridge: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form start of the head's raw-trace highway: one linear map, shared by every neuron, from a neuron's
    last `lookback_windows` windows to its next `horizon_windows` windows, fitted by ridge regression on exactly
    the samples the head's loss scores (every token step of every training trial, history zero-padded before the
    trial starts, target frames past the trial's end left out).

    Args:
        trials: iterable of `(neurons, frames)` z-scored training trials (any lengths).
        window_size, lookback_windows, horizon_windows: the model's `window_size`, `value_skip_windows` and
            `value_head_steps`.
        ridge: ridge strength relative to the mean diagonal of each output frame's Gram matrix.

    Returns:
        `(weight, bias)`: `(horizon_windows * window_size, lookback_windows * window_size)` and `(horizon *
        window_size,)`, the `nn.Linear` layout of `CalmForCausalNeuralModeling.value_skip`.
    """
    lookback, horizon = lookback_windows * window_size, horizon_windows * window_size
    # sums per (trial frames, step): every frame offset k of the horizon is scored at the steps whose target frame
    # exists, so its normal equations add the Gram matrices of those steps
    grams: dict[tuple[int, int], np.ndarray] = defaultdict(lambda: np.zeros((lookback + 1, lookback + 1)))
    cross: dict[tuple[int, int], np.ndarray] = defaultdict(lambda: np.zeros((lookback + 1, horizon)))
    for trial in trials:
        trial = np.asarray(trial, dtype=np.float64)
        if trial.ndim != 2:
            raise ValueError(f"each trial must be (neurons, frames), got shape {trial.shape}.")
        if not np.isfinite(trial).all():
            raise ValueError("a training trial holds NaN/Inf values; clean the traces before fitting the highway.")
        steps = trial.shape[-1] // window_size
        frames = steps * window_size
        padded = np.concatenate([np.zeros((trial.shape[0], lookback - window_size)), trial[:, :frames],
                                 np.zeros((trial.shape[0], horizon))], axis=-1)
        for t in range(steps - 1):  # the last step has no target frame left
            history = padded[:, t * window_size : t * window_size + lookback]
            inputs = np.concatenate([history, np.ones((len(history), 1))], axis=-1)
            start = (t + 1) * window_size
            targets = padded[:, lookback - window_size + start : lookback - window_size + start + horizon]
            key = (frames, t)
            grams[key] += inputs.T @ inputs
            cross[key] += inputs.T @ targets
    if not grams:
        raise ValueError(f"no trial has two token steps of {window_size} frames: nothing to fit the highway on.")
    weight = np.zeros((lookback + 1, horizon))
    for k in range(horizon):
        # step t of a trial of `frames` frames scores offset k when (t + 1) * window + k < frames
        keys = [key for key in grams if (key[1] + 1) * window_size + k < key[0]]
        if not keys:
            continue  # no trial is long enough to score this offset: the head learns it alone
        gram = sum(grams[key] for key in keys)
        gram[np.arange(lookback), np.arange(lookback)] += ridge * max(float(np.trace(gram[:lookback, :lookback]))
                                                                      / lookback, 1e-12)
        weight[:, k] = np.linalg.solve(gram, sum(cross[key][:, k] for key in keys))
    return weight[:lookback].T.copy(), weight[lookback].copy()


@torch.no_grad()
def init_value_skip(model: Any, trials: Any, ridge: float = 1e-3) -> dict:
    """Writes `fit_value_skip` of `trials` (`(neurons, frames)` z-scored training trials) into `model.value_skip`
    and zeroes the head's output layer, so that a fresh model's continuous forecast starts as the best linear
    forecast from each neuron's own recent trace and the backbone learns what the population adds to it."""
    if getattr(model, "value_skip", None) is None:
        raise ValueError("the model has no raw-trace highway (config.value_skip_windows = 0): nothing to initialise.")
    config = model.config
    counted = {"trials": 0}

    def counting(items):  # trials stream through the fit (a large recording never sits in memory at once)
        for item in items:
            counted["trials"] += 1
            yield item

    weight, bias = fit_value_skip(counting(trials), config.window_size, config.value_skip_windows,
                                  config.value_head_steps, ridge)
    skip = model.value_skip
    skip.weight.copy_(torch.as_tensor(weight, dtype=skip.weight.dtype))
    skip.bias.copy_(torch.as_tensor(bias, dtype=skip.bias.dtype))
    model.value_head.weight.zero_()
    model.value_head.bias.zero_()
    return {"trials": counted["trials"], "ridge": ridge}


def init_value_skip_from_dataset(model: Any, dataset: Any, ridge: float = 1e-3, max_trials: int = 2000) -> dict:
    """`init_value_skip` from a trial dataset with `input_values` (the `train` split; its first `max_trials`)."""
    if "input_values" not in dataset.column_names:
        raise ValueError("the dataset lacks `input_values`; pass a trial dataset (calm_hf.data.build_trial_dataset).")
    rows = dataset.select(range(min(len(dataset), max_trials))).select_columns(["input_values"]).with_format("numpy")
    return init_value_skip(model, (np.asarray(row["input_values"], dtype=np.float32) for row in rows), ridge)
