"""Figures of forecasts: the model card's example forecast and `calm forecast --plot`.

matplotlib is imported inside each function (Agg backend), so importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIGURE_NAME = "forecast_example.png"


def plot_forecast(path, context, forecast, sampling_rate: float, truth=None, lower=None, upper=None,
                  neurons: int = 4, context_frames: int | None = None, software: str | None = None) -> None:
    """Draw context, truth (when given), forecast and the sampled band (when given) for the first `neurons` neurons.

    Arrays are `(neurons, frames)` at `sampling_rate`; the forecast starts one frame after the context's last frame.
    `software` is written into a PNG's metadata.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    count = min(int(neurons), context.shape[0])
    shown = context.shape[-1] if context_frames is None else min(context_frames, context.shape[-1])
    past = (np.arange(-shown + 1, 1)) / sampling_rate
    future = np.arange(1, forecast.shape[-1] + 1) / sampling_rate
    figure, axes = plt.subplots(count, 1, figsize=(8, 1.8 * count + 0.6), sharex=True, squeeze=False)
    for row, axis in zip(range(count), axes[:, 0]):
        axis.plot(past, context[row, -shown:], color="0.3", lw=1, label="context")
        if truth is not None:
            axis.plot(future, truth[row], color="black", lw=1, ls="--", label="truth")
        if lower is not None and upper is not None:
            axis.fill_between(future, lower[row], upper[row], color="tab:blue", alpha=0.25, label="5-95% of samples")
        axis.plot(future, forecast[row], color="tab:blue", lw=1.5, label="forecast")
        axis.axvline(0.0, color="0.6", lw=0.8)
        axis.set_ylabel(f"neuron {row}")
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("time from the end of the context (s)")
    figure.tight_layout()
    # a PNG says which command wrote it, so that command may replace it later (`claim_output_file`)
    png = str(path).lower().endswith(".png")
    figure.savefig(path, dpi=120, metadata={"Software": software} if software and png else None)
    plt.close(figure)


def forecast_figure(forecaster, split: datasets.Dataset, path: Path, context_frames: int,
                    num_samples: int, frame_rate: float, num_neurons: int = 4, seed: int = 0) -> None:
    """PNG: context, truth and forecast (the continuous head's conditional mean, or the mean of sampled rollouts for
    checkpoints without it, with a 5-95% band of sampled futures) and a greedy rollout, for a few neurons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    import torch

    row = split.with_format("numpy")[0]
    values = np.asarray(row["input_values"], dtype=np.float32)
    ids = torch.as_tensor(np.asarray(row["input_ids"], dtype=np.int64))[None, :, : context_frames // forecaster.window_size]
    horizon = values.shape[-1] - context_frames
    torch.manual_seed(seed)
    mode = "direct" if forecaster.model.value_head is not None else ("mean" if num_samples > 1 else "greedy")
    result = forecaster.forecast(
        values[None, :, :context_frames], horizon=horizon, context_ids=ids,
        neuron_ids=torch.as_tensor(np.asarray(row["neuron_ids"], dtype=np.int64))[None],
        session_ids=torch.as_tensor([int(row["session_id"])]), mode=mode, num_samples=num_samples,
    )
    greedy = forecaster.forecast(
        None, horizon=horizon, context_ids=ids,
        neuron_ids=torch.as_tensor(np.asarray(row["neuron_ids"], dtype=np.int64))[None],
        session_ids=torch.as_tensor([int(row["session_id"])]), mode="greedy",
    ).forecast[0]
    # the most active neurons of this trial make the clearest panels
    chosen = np.argsort(values.std(axis=-1))[::-1][:num_neurons]
    time = np.arange(values.shape[-1]) / frame_rate
    future = time[context_frames:]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 1.9 * len(chosen)), sharex=True)
    for ax, neuron in zip(np.atleast_1d(axes), chosen):
        ax.plot(time[: context_frames + 1], values[neuron, : context_frames + 1], color="black", lw=1.2, label="context")
        ax.plot(future, values[neuron, context_frames:], color="0.55", lw=1.2, label="truth")
        if result.samples is not None:
            low, high = np.quantile(result.samples[0, :, neuron], [0.05, 0.95], axis=0)
            ax.fill_between(future, low, high, color="tab:red", alpha=0.2, lw=0, label="5-95% of samples")
        point_label = "CalM forecast (conditional mean)" if mode == "direct" else "sample mean"
        ax.plot(future, result.forecast[0, neuron], color="tab:red", lw=1.2, label=point_label)
        ax.plot(future, greedy[neuron], color="tab:blue", lw=1.0, ls="--", label="greedy")
        ax.axvline(time[context_frames], color="0.3", lw=0.6, ls=":")
        ax.set_ylabel(f"neuron {neuron}\n(z)")
    np.atleast_1d(axes)[0].legend(loc="upper left", fontsize=7, ncol=5, frameon=False)
    np.atleast_1d(axes)[-1].set_xlabel("time (s)")
    fig.suptitle(f"CalM forecast, held-out trial (context {context_frames} frames)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def heldout_figure(forecaster, session, reference_index, path: Path, title: str, num_neurons: int = 4) -> None:
    """PNG for a foundation checkpoint's card: a test trial of a held-out recording, its context and truth, CalM's
    forecast zero-shot and with the identity from `reference_index` training trials, and the 5-95% band of the
    quantile head (z-scored units, time in seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .heldout import context_frames

    context = context_frames(session)
    trial = session.split("test")[:1]
    horizon = trial.shape[-1] - context
    informed = forecaster.forecast(trial[:, :, :context], horizon, reference=session.traces[reference_index])
    zero_shot = forecaster.forecast(trial[:, :, :context], horizon, reference=None).forecast[0]
    values = trial[0]
    chosen = np.argsort(values.std(axis=-1))[::-1][:num_neurons]
    time = np.arange(values.shape[-1]) / session.fs
    future = time[context:]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 1.9 * len(chosen) + 0.4), sharex=True, squeeze=False)
    for ax, neuron in zip(axes[:, 0], chosen):
        ax.plot(time[: context + 1], values[neuron, : context + 1], color="black", lw=1.2, label="context")
        ax.plot(future, values[neuron, context:], color="0.55", lw=1.2, label="truth")
        if informed.quantiles is not None:
            levels = list(informed.quantile_levels)
            band = informed.quantiles[0, neuron]
            ax.fill_between(future, band[:, levels.index(0.05)], band[:, levels.index(0.95)], color="tab:red",
                            alpha=0.2, lw=0, label="5-95% band (quantile head)")
        ax.plot(future, informed.forecast[0, neuron], color="tab:red", lw=1.2,
                label=f"CalM, identity from {len(reference_index)} trials")
        ax.plot(future, zero_shot[neuron], color="tab:blue", lw=1.0, ls="--", label="CalM zero-shot")
        ax.axvline(time[context], color="0.3", lw=0.6, ls=":")
        ax.set_ylabel(f"neuron {neuron}\n(z)")
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=3, frameon=False)
    axes[-1, 0].set_xlabel(f"time (s, {session.fs:g} Hz)")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
