"""The paper's linear analyses of a trained CalM (§5.4, §6.4, Fig. 5, Appendix E) as plain functions on arrays.

- `trial_responses`, `tuning_dprime`, `tuned_groups`: functional tuning of each neuron to a per-trial task variable.
- `embedding_pca`, `embedding_lda`, `probe_embeddings`: what learned neuron/session embeddings encode, with
  cross-validated accuracies and a shuffled-label control (the same fit with permuted labels) beside each number.
- `pc_trajectory_correlation`, `shuffle_control`: low-dimensional dynamics of forecasts (PCA on the true traces of
  each session, forecasts projected on the same axes, Pearson r of predicted vs true PC trajectories) and the
  trial-shuffle control (trial identities permuted within a session).

PCA, LDA and logistic regression are scikit-learn's (the `[analysis]` extra); nothing here is hand-written.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


def _sklearn():
    try:
        import sklearn  # noqa: F401
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError(
            "calm_hf.analysis needs scikit-learn: pip install 'calm_hf[analysis]' (or pip install scikit-learn)."
        ) from error


def _as_2d(name: str, value: Any) -> np.ndarray:
    array = np.asarray(value, dtype=np.float64)
    if array.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D array (items, features), got shape {array.shape}.")
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or inf; drop or impute those rows first.")
    return array


def _as_labels(name: str, labels: Any, length: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.ndim != 1 or labels.shape[0] != length:
        raise ValueError(f"`{name}` must be 1-D with one label per row ({length}), got shape {labels.shape}.")
    return labels


def trial_responses(traces: np.ndarray, window: tuple[int, int] | None = None) -> np.ndarray:
    """Trial-averaged response of each neuron in a frame window.

    Args:
        traces (`np.ndarray` of shape `(trials, neurons, frames)`): traces (z-scored or raw).
        window (`tuple[int, int]`, *optional*): `[start, stop)` frames averaged; the whole trial when None.

    Returns:
        `np.ndarray` of shape `(trials, neurons)`.
    """
    traces = np.asarray(traces, dtype=np.float64)
    if traces.ndim != 3:
        raise ValueError(f"`traces` must be (trials, neurons, frames), got shape {traces.shape}.")
    start, stop = (0, traces.shape[-1]) if window is None else (int(window[0]), int(window[1]))
    if not 0 <= start < stop <= traces.shape[-1]:
        raise ValueError(f"window {window} is not a non-empty [start, stop) inside the {traces.shape[-1]} frames.")
    return traces[..., start:stop].mean(axis=-1)


def tuning_dprime(responses: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """d' = (mu_1 - mu_2) / sqrt((sigma_1^2 + sigma_2^2) / 2) of every neuron for a per-trial condition.

    Two conditions: one d' per neuron (the second condition in sorted order minus the first, i.e. positive means
    "prefers `classes[1]`"). More than two (e.g. 8 grating directions): one-vs-rest d' of each condition.

    Args:
        responses (`np.ndarray` of shape `(trials, neurons)`): trial-averaged responses (`trial_responses`).
        labels (`np.ndarray` of shape `(trials,)`): condition of each trial (ints or strings).

    Returns:
        `(dprime, classes)`: `dprime` of shape `(neurons,)` for two conditions, `(conditions, neurons)` otherwise;
        `classes` the sorted conditions. A neuron with zero variance in both groups gets d' = 0.
    """
    responses = _as_2d("responses", responses)
    labels = _as_labels("labels", labels, responses.shape[0])
    classes = np.unique(labels)
    if classes.size < 2:
        raise ValueError(f"tuning_dprime needs at least two conditions, got {classes.tolist()}.")

    def dprime(first: np.ndarray, second: np.ndarray) -> np.ndarray:
        if first.shape[0] < 2 or second.shape[0] < 2:
            raise ValueError("every condition needs at least two trials to estimate its variance.")
        pooled = np.sqrt((first.var(axis=0, ddof=1) + second.var(axis=0, ddof=1)) / 2)
        difference = second.mean(axis=0) - first.mean(axis=0)
        with np.errstate(invalid="ignore", divide="ignore"):
            value = difference / pooled
        return np.where(pooled > 0, value, 0.0)

    if classes.size == 2:
        return dprime(responses[labels == classes[0]], responses[labels == classes[1]]), classes
    return np.stack([dprime(responses[labels != c], responses[labels == c]) for c in classes]), classes


def tuned_groups(dprime: np.ndarray, classes: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """Preferred condition of every neuron whose |d'| exceeds `threshold`, else None.

    Args:
        dprime (`np.ndarray` of shape `(neurons,)` or `(conditions, neurons)`): output of `tuning_dprime`.
        classes (`np.ndarray` of shape `(conditions,)`): its conditions.
        threshold (`float`, *optional*, defaults to 0.5): minimal |d'| (two conditions) or largest one-vs-rest d'.

    Returns:
        `np.ndarray` of objects, shape `(neurons,)`: the preferred condition, or None for untuned neurons.
    """
    dprime = np.asarray(dprime, dtype=np.float64)
    if dprime.ndim == 1:
        preferred = np.where(dprime > 0, classes[1], classes[0]).astype(object)
        strength = np.abs(dprime)
    else:
        preferred = classes[np.argmax(dprime, axis=0)].astype(object)
        strength = dprime.max(axis=0)
    preferred[strength <= threshold] = None
    return preferred


def embedding_pca(embeddings: np.ndarray, num_components: int = 2) -> dict[str, np.ndarray]:
    """PCA of embeddings (sklearn `PCA`).

    Args:
        embeddings (`np.ndarray` of shape `(items, hidden)`): e.g. rows of `model.neuron_embeddings`.
        num_components (`int`, *optional*, defaults to 2).

    Returns:
        dict with `projection` `(items, num_components)`, `explained_variance_ratio` `(num_components,)`,
        `components` `(num_components, hidden)`.
    """
    _sklearn()
    from sklearn.decomposition import PCA

    embeddings = _as_2d("embeddings", embeddings)
    num_components = int(min(num_components, *embeddings.shape))
    if num_components < 1:
        raise ValueError(f"embedding_pca needs at least one item and one feature, got shape {embeddings.shape}.")
    pca = PCA(n_components=num_components).fit(embeddings)
    return {
        "projection": pca.transform(embeddings),
        "explained_variance_ratio": pca.explained_variance_ratio_,
        "components": pca.components_,
    }


def _num_folds(labels: np.ndarray, num_folds: int) -> int:
    _, counts = np.unique(labels, return_counts=True)
    if counts.size < 2:
        raise ValueError(f"a probe needs at least two classes, got {counts.size}.")
    folds = int(min(num_folds, counts.min()))
    if folds < 2:
        raise ValueError(
            f"the smallest class has {counts.min()} item(s): cross-validation needs at least 2 per class (drop the "
            "rare classes, or the attribute is not testable on this data)."
        )
    return folds


def _cv_accuracy(make_model: Callable, features: np.ndarray, labels: np.ndarray, num_folds: int, seed: int) -> np.ndarray:
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    folds = StratifiedKFold(n_splits=num_folds, shuffle=True, random_state=seed)
    return cross_val_score(make_model(), features, labels, cv=folds, scoring="accuracy")


def _with_shuffle(make_model, features, labels, num_folds, num_shuffles, seed) -> dict[str, Any]:
    """Cross-validated accuracy, its shuffled-label control and chance level (majority-class fraction)."""
    labels = np.asarray([str(label) for label in labels])  # one dtype for mixed/None-free labels
    folds = _num_folds(labels, num_folds)
    scores = _cv_accuracy(make_model, features, labels, folds, seed)
    rng = np.random.default_rng(seed)
    shuffled = np.array(
        [_cv_accuracy(make_model, features, rng.permutation(labels), folds, seed).mean() for _ in range(num_shuffles)]
    )
    _, counts = np.unique(labels, return_counts=True)
    return {
        "accuracy": float(scores.mean()),
        "accuracy_std": float(scores.std()),
        "fold_accuracies": scores.tolist(),
        "shuffled_accuracy": float(shuffled.mean()),
        "shuffled_accuracy_std": float(shuffled.std()),
        "chance": float(counts.max() / counts.sum()),
        "num_items": int(labels.size),
        "num_classes": int(counts.size),
        "num_folds": folds,
    }


def embedding_lda(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_folds: int = 5,
    num_shuffles: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """LDA of embeddings against groups (sklearn `LinearDiscriminantAnalysis`, eigen solver with Ledoit-Wolf
    shrinkage, so it stays well posed when items are fewer than dimensions).

    The discriminant axes are fitted on all items (for the figure); how well they SEPARATE the groups is measured
    out of sample: stratified k-fold accuracy of the same LDA, beside the accuracy with shuffled labels (in sample,
    LDA separates any labelling of fewer points than dimensions, so an in-sample score would mean nothing).

    Args:
        embeddings (`np.ndarray` of shape `(items, hidden)`).
        labels (`np.ndarray` of shape `(items,)`): group of each item (at least 2 per group).
        num_folds (`int`, *optional*, defaults to 5): folds (fewer when the smallest group is smaller).
        num_shuffles (`int`, *optional*, defaults to 20): label permutations of the control.
        seed (`int`, *optional*, defaults to 0).

    Returns:
        dict with `projection` `(items, min(groups - 1, hidden))`, `classes`, `accuracy`, `accuracy_std`,
        `shuffled_accuracy`, `shuffled_accuracy_std`, `chance`, `num_items`, `num_classes`, `num_folds`.
    """
    _sklearn()
    from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

    embeddings = _as_2d("embeddings", embeddings)
    labels = _as_labels("labels", labels, embeddings.shape[0])

    def make_model():
        return LinearDiscriminantAnalysis(solver="eigen", shrinkage="auto")

    result = _with_shuffle(make_model, embeddings, labels, num_folds, num_shuffles, seed)
    string_labels = np.asarray([str(label) for label in labels])
    lda = make_model().fit(embeddings, string_labels)
    result["projection"] = lda.transform(embeddings)
    result["classes"] = lda.classes_.tolist()
    return result


def probe_embeddings(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_folds: int = 5,
    num_shuffles: int = 20,
    seed: int = 0,
    regularization: float = 1.0,
) -> dict[str, Any]:
    """Cross-validated linear probe (sklearn `LogisticRegression` on standardised features) for an attribute.

    Args:
        embeddings (`np.ndarray` of shape `(items, hidden)`): neuron or session embeddings.
        labels (`np.ndarray` of shape `(items,)`): the attribute (subject, layer, assembly, ...).
        num_folds (`int`, *optional*, defaults to 5): stratified folds (the paper uses 5).
        num_shuffles (`int`, *optional*, defaults to 20): label permutations of the control.
        seed (`int`, *optional*, defaults to 0).
        regularization (`float`, *optional*, defaults to 1.0): inverse L2 strength `C`.

    Returns:
        dict with `accuracy` and `accuracy_std` (over folds), `fold_accuracies`, `shuffled_accuracy` and
        `shuffled_accuracy_std` (over permutations), `chance` (majority-class fraction), `num_items`, `num_classes`,
        `num_folds`.
    """
    _sklearn()
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    embeddings = _as_2d("embeddings", embeddings)
    labels = _as_labels("labels", labels, embeddings.shape[0])

    def make_model():
        return make_pipeline(StandardScaler(), LogisticRegression(C=regularization, max_iter=2000))

    return _with_shuffle(make_model, embeddings, labels, num_folds, num_shuffles, seed)


def _check_forecasts(prediction: Any, truth: Any, session_ids: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    prediction = np.asarray(prediction, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if prediction.shape != truth.shape or prediction.ndim != 3:
        raise ValueError(
            f"prediction {prediction.shape} and truth {truth.shape} must both be (trials, neurons, horizon) of one "
            "shape (crop the forecast to the scored horizon)."
        )
    if prediction.shape[-1] < 2:
        raise ValueError(f"the horizon must have at least 2 frames to correlate trajectories, got {prediction.shape[-1]}.")
    if not (np.isfinite(prediction).all() and np.isfinite(truth).all()):
        raise ValueError("prediction or truth contains NaN/inf.")
    session_ids = np.zeros(truth.shape[0], dtype=np.int64) if session_ids is None else np.asarray(session_ids)
    if session_ids.shape != (truth.shape[0],):
        raise ValueError(f"session_ids must have shape ({truth.shape[0]},), got {session_ids.shape}.")
    return prediction, truth, session_ids


def _rowwise_pearson(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Pearson r over the last axis; NaN where either row is constant."""
    first = first - first.mean(axis=-1, keepdims=True)
    second = second - second.mean(axis=-1, keepdims=True)
    denominator = np.sqrt((first**2).sum(-1) * (second**2).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (first * second).sum(-1) / denominator
    return np.where(denominator > 1e-12, r, np.nan)


def pc_trajectory_correlation(
    prediction: np.ndarray,
    truth: np.ndarray,
    session_ids: np.ndarray | None = None,
    num_components: int = 3,
    return_trajectories: bool = False,
) -> dict[str, Any]:
    """Correlation of predicted and true population trajectories in the true traces' principal subspace.

    Per session: PCA (sklearn) on the true traces concatenated over trials and horizon frames, `(trials * horizon,
    neurons)`; true and predicted traces are projected onto the same axes (centred with the truth's mean); for each
    trial and PC, Pearson r of the two trajectories over the horizon. Averaged over trials per PC, then over PCs,
    then over sessions (NaN where a trajectory is constant is excluded).

    Args:
        prediction (`np.ndarray` of shape `(trials, neurons, horizon)`): forecasts.
        truth (`np.ndarray` of shape `(trials, neurons, horizon)`): true traces of the same trials.
        session_ids (`np.ndarray` of shape `(trials,)`, *optional*): session of each trial (one PCA per session).
        num_components (`int`, *optional*, defaults to 3): PCs scored (fewer if a session has fewer neurons).
        return_trajectories (`bool`, *optional*): also return each session's projected trajectories
            (`(trials, components, horizon)` for truth and prediction) for figures.

    Returns:
        dict with `pc_r` (mean over PCs and sessions), `per_pc` `(components,)` (mean over sessions),
        `per_session` {session: per-PC list}, `explained_variance_ratio` {session: list}, and `trajectories`
        {session: {"truth", "prediction"}} when asked.
    """
    _sklearn()
    from sklearn.decomposition import PCA

    prediction, truth, session_ids = _check_forecasts(prediction, truth, session_ids)
    per_session, variance, trajectories = {}, {}, {}
    for session in np.unique(session_ids):
        rows = session_ids == session
        true, pred = truth[rows], prediction[rows]
        trials, neurons, horizon = true.shape
        components = int(min(num_components, neurons, trials * horizon))
        flat = true.transpose(0, 2, 1).reshape(-1, neurons)  # (trials * horizon, neurons)
        pca = PCA(n_components=components).fit(flat)

        def project(x: np.ndarray) -> np.ndarray:  # (trials, neurons, horizon) -> (trials, components, horizon)
            scores = pca.transform(x.transpose(0, 2, 1).reshape(-1, neurons))
            return scores.reshape(trials, horizon, components).transpose(0, 2, 1)

        true_pcs, pred_pcs = project(true), project(pred)
        r = _rowwise_pearson(true_pcs, pred_pcs)  # (trials, components)
        key = str(session.item() if hasattr(session, "item") else session)
        per_session[key] = np.nanmean(r, axis=0).tolist() if np.isfinite(r).any() else [float("nan")] * components
        variance[key] = pca.explained_variance_ratio_.tolist()
        if return_trajectories:
            trajectories[key] = {"truth": true_pcs, "prediction": pred_pcs}
    width = max(len(v) for v in per_session.values())
    padded = np.array([v + [np.nan] * (width - len(v)) for v in per_session.values()])
    per_pc = np.nanmean(padded, axis=0)
    result = {
        "pc_r": float(np.nanmean(np.nanmean(padded, axis=1))),
        "per_pc": per_pc.tolist(),
        "per_session": per_session,
        "explained_variance_ratio": variance,
    }
    if return_trajectories:
        result["trajectories"] = trajectories
    return result


def shuffle_control(
    metric: Callable[[np.ndarray, np.ndarray, np.ndarray], float],
    prediction: np.ndarray,
    truth: np.ndarray,
    session_ids: np.ndarray | None = None,
    num_shuffles: int = 20,
    seed: int = 0,
) -> dict[str, float]:
    """Trial-shuffle control: the same score with the predictions' trial identities permuted within each session.

    A forecast that tracks its own trial scores above this control; one that only reproduces what is common to all
    trials (a stimulus-locked mean, the session's typical trajectory) does not.

    Args:
        metric (`Callable`): `metric(prediction, truth, session_ids) -> float`, e.g.
            `lambda p, t, s: pc_trajectory_correlation(p, t, s)["pc_r"]`.
        prediction, truth (`np.ndarray` of shape `(trials, neurons, horizon)`).
        session_ids (`np.ndarray` of shape `(trials,)`, *optional*).
        num_shuffles (`int`, *optional*, defaults to 20): permutations.
        seed (`int`, *optional*, defaults to 0).

    Returns:
        dict with `mean` and `std` over permutations and `values`.
    """
    prediction, truth, session_ids = _check_forecasts(prediction, truth, session_ids)
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(int(num_shuffles)):
        order = np.arange(truth.shape[0])
        for session in np.unique(session_ids):
            rows = np.flatnonzero(session_ids == session)
            order[rows] = rng.permutation(rows)
        values.append(float(metric(prediction[order], truth, session_ids)))
    values = np.asarray(values)
    return {"mean": float(np.nanmean(values)), "std": float(np.nanstd(values)), "values": values.tolist()}
