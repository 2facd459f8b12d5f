"""Figures of forecasts: the model card's example forecast and `calm forecast --plot`.

matplotlib is imported inside each function (Agg backend), so importing this module costs nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

FIGURE_NAME = "forecast_example.png"


HEATMAP_ABOVE = 30  # recordings with more neurons than this are drawn as a heatmap by default (`kind="auto"`)
PLOT_KINDS = ("auto", "traces", "heatmap")


def neuron_labels(count: int, roi_ids=None, roi_planes=None) -> list[str]:
    """Labels of `count` neurons: "ROI 75" (or "plane 1 ROI 75") from the ids the segmentation gave them, else
    "neuron 3" (their row in the traces)."""
    if roi_ids is None:
        return [f"neuron {row}" for row in range(count)]
    if roi_planes is None:
        return [f"ROI {int(roi)}" for roi in roi_ids]
    return [f"plane {int(plane)} ROI {int(roi)}" for plane, roi in zip(roi_planes, roi_ids)]


def score_line(scores: dict) -> str:
    """The held-out scores as one line: the forecast's Pearson r and MSE beside the last second's mean held flat."""
    return (f"held-out {scores['horizon']} frames: forecast r = {scores['pearson_r']:.3f}, MSE = {scores['mse']:.3g}"
            f"  |  last second's mean held flat: MSE = {scores['baseline_mse']:.3g} (r undefined: a flat line)")


def plot_forecast(path, context, forecast, sampling_rate: float, truth=None, lower=None, upper=None,
                  neurons: int = 4, context_frames: int | None = None, software: str | None = None,
                  labels: list[str] | None = None, title: str | None = None, units: str | None = None,
                  kind: str = "auto", scores: dict | None = None, band_label: str = "5-95% band",
                  baseline=None) -> str:
    """Draw a forecast and write it to `path`; returns the kind drawn.

    Arrays are `(neurons, frames)` at `sampling_rate`; the forecast starts one frame after the context's last frame;
    time is in seconds from the forecast's start. `kind="traces"` draws context, truth (when given), forecast and
    the band `lower`..`upper` (when given) for the `neurons` most variable neurons, one panel each, in `units`;
    `kind="heatmap"` draws every neuron as a row (recorded above, forecast below, each neuron z-scored with its
    context's statistics); `"auto"` picks the heatmap above `HEATMAP_ABOVE` neurons. `labels` name the neurons
    (`neuron_labels`), `title` heads the figure, `scores` (`pearson_r`, `mse`, `baseline_mse`, `horizon`) add the
    held-out scores under it, and `baseline` `(neurons, horizon)` (the last second's mean held flat) is drawn beside
    the forecast in the trace panels. `software` is written into a PNG's metadata.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if kind not in PLOT_KINDS:
        raise ValueError(f"kind={kind!r} is not one of {PLOT_KINDS}.")
    count = context.shape[0]
    kind = ("heatmap" if count > HEATMAP_ABOVE else "traces") if kind == "auto" else kind
    labels = labels or neuron_labels(count)
    shown = context.shape[-1] if context_frames is None else min(context_frames, context.shape[-1])
    past = np.arange(-shown + 1, 1) / sampling_rate
    future = np.arange(1, forecast.shape[-1] + 1) / sampling_rate
    units = units or "units of the input"
    if kind == "heatmap":
        figure = _heatmap(plt, context[:, -shown:], forecast, truth, past, future, labels)
    else:
        figure = _trace_panels(plt, context[:, -shown:], forecast, truth, lower, upper, past, future, labels,
                               neurons, units, band_label, baseline)
    heading = [title] if title else []
    if scores is not None:
        heading.append(score_line(scores))
    if heading:
        figure.suptitle("\n".join(heading), fontsize=9)
    figure.supxlabel(f"time from the forecast start (s; {sampling_rate:g} Hz)", fontsize=9)
    # a PNG says which command wrote it, so that command may replace it later (`claim_output_file`)
    png = str(path).lower().endswith(".png")
    figure.savefig(path, dpi=120, metadata={"Software": software} if software and png else None)
    plt.close(figure)
    return kind


def _trace_panels(plt, context, forecast, truth, lower, upper, past, future, labels, neurons, units, band_label,
                  baseline=None):
    """One panel per neuron (the most variable ones), in the input's units."""
    whole = context if truth is None else np.concatenate([context, truth], axis=-1)
    chosen = np.argsort(np.nanstd(whole, axis=-1))[::-1][: max(1, int(neurons))]
    figure, axes = plt.subplots(len(chosen), 1, figsize=(8, 1.8 * len(chosen) + 1.0), sharex=True, squeeze=False,
                             layout="constrained")
    for row, axis in zip(chosen, axes[:, 0]):
        axis.plot(past, context[row], color="0.3", lw=1, label="recorded (context)")
        if truth is not None:
            axis.plot(future, truth[row], color="black", lw=1, ls="--", label="recorded (held out)")
        if lower is not None and upper is not None:
            axis.fill_between(future, lower[row], upper[row], color="tab:blue", alpha=0.25, lw=0, label=band_label)
        if baseline is not None:
            axis.plot(future, baseline[row], color="tab:orange", lw=1, ls=":", label="last second's mean")
        axis.plot(future, forecast[row], color="tab:blue", lw=1.5, label="CalM forecast")
        axis.axvline(0.0, color="0.6", lw=0.8)
        axis.set_ylabel(f"{labels[row]}\n({units})", fontsize=8)
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=5, frameon=False)
    return figure


def _heatmap(plt, context, forecast, truth, past, future, labels):
    """Every neuron as a row: recorded (context, and the held-out truth) above, the forecast after the same context
    below; each neuron z-scored with its context's mean and standard deviation so rows compare."""
    mean = np.nanmean(context, axis=-1, keepdims=True)
    std = np.nanstd(context, axis=-1, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    recorded = context if truth is None else np.concatenate([context, truth], axis=-1)
    predicted = np.concatenate([context, forecast], axis=-1)
    step = (past[1] - past[0]) if len(past) > 1 else (future[0] if len(future) else 1.0)
    times = np.concatenate([past, future])
    edges = (times[0] - step / 2, times[-1] + step / 2)
    count = context.shape[0]
    figure, axes = plt.subplots(2, 1, figsize=(9, 2 * min(6.0, 1.0 + count / 40) + 1.2), sharex=True, squeeze=False,
                                layout="constrained")
    limit = 3.0
    panels = (("recorded" + (" (context, then held out)" if truth is not None else " (context)"), recorded),
              ("context, then CalM forecast", predicted))
    for axis, (name, values) in zip(axes[:, 0], panels):
        frames = values.shape[-1]
        image = axis.imshow((values - mean) / std, aspect="auto", interpolation="nearest", cmap="RdBu_r",
                            vmin=-limit, vmax=limit, extent=(edges[0], edges[0] + frames * step, count - 0.5, -0.5))
        axis.axvline(0.0 + step / 2, color="black", lw=0.8)
        axis.set_title(name, fontsize=8, loc="left")
        ticks = np.unique(np.linspace(0, count - 1, min(count, 8)).round().astype(int))
        axis.set_yticks(ticks, [labels[t] for t in ticks], fontsize=6)
        axis.set_xlim(*edges)
    colorbar = figure.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.03, pad=0.01)
    colorbar.set_label("z-score per neuron (context mean, s.d.)", fontsize=7)
    return figure


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
