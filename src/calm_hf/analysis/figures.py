"""Figures of the interpretability report, one function per figure, each saved as a PNG (matplotlib, Agg backend).

Every function takes the arrays/dicts returned by `calm_hf.analysis.linear` and a `path`; it returns the path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def _group_colors(groups: np.ndarray) -> tuple[list[str], dict[str, Any]]:
    plt = _pyplot()
    names = sorted({str(g) for g in groups}, key=lambda s: (len(s), s))
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    return names, {name: cmap(i % cmap.N) for i, name in enumerate(names)}


def plot_embedding_pca(
    projections: dict[str, np.ndarray],
    groups: np.ndarray,
    path: str | Path,
    title: str,
    explained: dict[str, np.ndarray] | None = None,
) -> Path:
    """Scatter of PC1 vs PC2 of neuron embeddings coloured by group, one panel per model (e.g. trained/untrained).

    Args:
        projections (`dict[str, np.ndarray]`): panel name -> `(items, >=2)` PCA projection (`embedding_pca`).
        groups (`np.ndarray` of shape `(items,)`): colour labels (e.g. preferred condition).
        path: output PNG. title (`str`): figure title.
        explained (`dict[str, np.ndarray]`, *optional*): panel name -> explained variance ratios for the axis labels.
    """
    plt = _pyplot()
    names, colors = _group_colors(groups)
    fig, axes = plt.subplots(1, len(projections), figsize=(4.5 * len(projections), 4), squeeze=False)
    for ax, (panel, projection) in zip(axes[0], projections.items()):
        for name in names:
            rows = np.array([str(g) == name for g in groups])
            y = projection[rows, 1] if projection.shape[1] > 1 else np.zeros(rows.sum())
            ax.scatter(projection[rows, 0], y, s=12, alpha=0.8, color=colors[name], label=name)
        ratio = None if explained is None else explained.get(panel)
        ax.set_xlabel("PC1" + ("" if ratio is None else f" ({100 * ratio[0]:.0f}% var)"))
        ax.set_ylabel("PC2" + ("" if ratio is None or len(ratio) < 2 else f" ({100 * ratio[1]:.0f}% var)"))
        ax.set_title(panel)
    axes[0][-1].legend(title="group", fontsize=8, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


def plot_embedding_lda(
    projections: dict[str, np.ndarray],
    groups: np.ndarray,
    path: str | Path,
    title: str,
    accuracies: dict[str, str] | None = None,
) -> Path:
    """Neuron embeddings on the LDA discriminant axes, one panel per model: a histogram per group for one axis
    (two groups), a scatter of the first two axes otherwise.

    Args:
        projections (`dict[str, np.ndarray]`): panel name -> `(items, axes)` LDA projection (`embedding_lda`).
        groups (`np.ndarray` of shape `(items,)`): the groups the LDA was fitted on.
        path, title: output PNG and title. accuracies (`dict[str, str]`, *optional*): panel name -> text shown
            under the panel title (e.g. cross-validated accuracy vs shuffled).
    """
    plt = _pyplot()
    names, colors = _group_colors(groups)
    fig, axes = plt.subplots(1, len(projections), figsize=(4.5 * len(projections), 4), squeeze=False)
    for ax, (panel, projection) in zip(axes[0], projections.items()):
        for name in names:
            rows = np.array([str(g) == name for g in groups])
            if projection.shape[1] == 1:
                ax.hist(projection[rows, 0], bins=20, alpha=0.6, color=colors[name], label=name)
            else:
                ax.scatter(projection[rows, 0], projection[rows, 1], s=12, alpha=0.8, color=colors[name], label=name)
        ax.set_xlabel("LD1 (in-sample fit)")
        ax.set_ylabel("neurons" if projection.shape[1] == 1 else "LD2")
        ax.set_title(panel if accuracies is None else f"{panel}\n{accuracies.get(panel, '')}", fontsize=9)
    axes[0][-1].legend(title="group", fontsize=8, loc="best")
    fig.suptitle(title)
    return _save(fig, path)


def plot_probe_accuracies(rows: list[dict[str, Any]], path: str | Path, title: str) -> Path:
    """Grouped bars: cross-validated probe accuracy of the trained model, the untrained model and shuffled labels
    for every probed attribute, with chance level as a tick.

    Args:
        rows (`list[dict]`): one per attribute with `name`, `trained`, `untrained` (dicts from `probe_embeddings`).
        path, title: output PNG and title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(rows) + 2), 4))
    x = np.arange(len(rows))
    width = 0.26
    series = [
        ("trained", lambda r: (r["trained"]["accuracy"], r["trained"]["accuracy_std"]), "tab:blue"),
        ("untrained", lambda r: (r["untrained"]["accuracy"], r["untrained"]["accuracy_std"]), "tab:gray"),
        ("shuffled labels", lambda r: (r["trained"]["shuffled_accuracy"], r["trained"]["shuffled_accuracy_std"]),
         "tab:orange"),
    ]
    for i, (label, getter, color) in enumerate(series):
        values = np.array([getter(r) for r in rows])
        ax.bar(x + (i - 1) * width, values[:, 0], width, yerr=values[:, 1], color=color, label=label, capsize=2)
    for i, r in enumerate(rows):
        ax.hlines(r["trained"]["chance"], i - 1.5 * width, i + 1.5 * width, colors="k", linestyles="--",
                  label="chance" if i == 0 else None)
    ax.set_xticks(x, [r["name"] for r in rows], rotation=20, ha="right", fontsize=8)
    ax.set_ylabel("5-fold CV accuracy")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    ax.set_title(title)
    return _save(fig, path)


def plot_pc_correlations(results: dict[str, dict[str, Any]], path: str | Path, title: str) -> Path:
    """Per forecaster: per-neuron forecast r and PC-trajectory r, each beside its trial-shuffle control.

    Args:
        results (`dict[str, dict]`): forecaster name -> dict with `pearson_r`, `pearson_r_shuffled`, `pc_r`,
            `pc_r_shuffled` (floats).
        path, title: output PNG and title.
    """
    plt = _pyplot()
    names = list(results)
    x = np.arange(len(names))
    width = 0.2
    fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(names) + 2), 4))
    bars = [
        ("per-neuron r", "pearson_r", "tab:blue", None),
        ("per-neuron r, trials shuffled", "pearson_r_shuffled", "tab:blue", "//"),
        ("PC-trajectory r", "pc_r", "tab:green", None),
        ("PC-trajectory r, trials shuffled", "pc_r_shuffled", "tab:green", "//"),
    ]
    for i, (label, key, color, hatch) in enumerate(bars):
        values = [results[n][key] for n in names]
        ax.bar(x + (i - 1.5) * width, values, width, color=color, alpha=0.5 if hatch else 0.9, hatch=hatch,
               label=label)
    ax.axhline(0, color="k", linewidth=0.5)
    ax.set_xticks(x, names, rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("Pearson r over the horizon")
    ax.legend(fontsize=7)
    ax.set_title(title)
    return _save(fig, path)


def plot_pc_trajectories(
    truth: np.ndarray, predictions: dict[str, np.ndarray], path: str | Path, title: str, frame_rate: float | None = None
) -> Path:
    """True vs predicted trajectories of one trial on the first principal components of the true traces.

    Args:
        truth (`np.ndarray` of shape `(components, horizon)`): the trial's true PC trajectories.
        predictions (`dict[str, np.ndarray]`): forecaster name -> `(components, horizon)` projected forecast.
        path, title: output PNG and title. frame_rate (`float`, *optional*): Hz, for a time axis in seconds.
    """
    plt = _pyplot()
    components, horizon = truth.shape
    time = np.arange(horizon) / frame_rate if frame_rate else np.arange(horizon)
    fig, axes = plt.subplots(1, components, figsize=(3.6 * components, 3), squeeze=False)
    for c, ax in enumerate(axes[0]):
        ax.plot(time, truth[c], color="k", linewidth=2, label="truth")
        for name, prediction in predictions.items():
            ax.plot(time, prediction[c], linewidth=1.2, label=name)
        ax.set_title(f"PC{c + 1}")
        ax.set_xlabel("time after context (s)" if frame_rate else "frames after context")
    axes[0][0].set_ylabel("projection on true-trace PC")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def plot_dprime_histogram(dprime: np.ndarray, threshold: float, path: str | Path, title: str) -> Path:
    """Histogram of every neuron's tuning d' (largest one-vs-rest d' for multi-condition variables) with the
    selection threshold.

    Args:
        dprime (`np.ndarray` of shape `(neurons,)`): signed d' (two conditions) or the largest one-vs-rest d'.
        threshold (`float`): |d'| above which a neuron counts as tuned.
        path, title: output PNG and title.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    ax.hist(dprime, bins=40, color="tab:purple", alpha=0.8)
    for x in (threshold, -threshold) if (dprime < 0).any() else (threshold,):
        ax.axvline(x, color="k", linestyle="--")
    ax.set_xlabel("d'")
    ax.set_ylabel("neurons")
    ax.set_title(title, fontsize=9)
    return _save(fig, path)
