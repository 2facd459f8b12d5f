"""Neuron identity computed from data: what a CalM with `neuron_identity="data"` knows about the neurons of a
recording it has never seen, so that any recording with any number of neurons works without training.

The identity of a neuron is computed in closed form from *reference* activity of the same recording (other trials,
or the recording's history before the forecast context), z-scored like the model's inputs:

- **coupling factors** (`2 * identity_rank` values): a ridge regression of every neuron's next window mean on all
  other neurons' current window means, its diagonal removed, reduced to rank `identity_rank` by an SVD `A = D S R^T`;
  neuron i gets its row of `R sqrt(S)` ("receives") and of `D sqrt(S)` ("drives"), so that `receives_i . drives_j`
  is the weight of neuron j on neuron i. The model's coupling mixer computes `sum_j A_ji v_j` from them, a population
  regression estimated in context, linear in the number of neurons. Each component's sign is fixed so that its
  driving loadings sum to a positive number (the SVD leaves it free).
- **single-neuron statistics**: the autocorrelation at `IDENTITY_LAGS` frames, the mean, log standard deviation and
  skewness over the reference (z-scored units).
- **reliability**: how much reference there was (`log(1 + samples) / log(1000)`, `neurons / samples` capped at 1, and
  whether there was any);
- with `identity_coupling_skill` (`coupling_skill`): how well the recording's coupling forecasts *out of sample* --
  the ridge coupling fitted on half of the reference trials, scored on the other half (two folds), against each
  neuron's own one-step term: per neuron `1 - MSE(all neurons) / MSE(own term)`, clipped to [-1, 1], and the mean
  over the recording's neurons. Where neurons covary within trials in a way that does not carry over to other trials,
  it is negative, telling the model not to trust the coupling factors (zero with fewer than two reference trials);
- with `identity_highway` (a model whose head has the raw-trace highway, `value_skip_*`): each neuron's sufficient
  statistics of that highway's regression on the reference -- per window of the horizon the Gram matrix of its recent
  frames (plus a bias) and their cross-products with the frames that follow. The head turns them into the neuron's own
  highway in closed form, a ridge fit shrunk towards the pretrained shared one (`highway_weights`): with no reference
  it is the shared highway, with a long one the neuron's own linear forecast.

With no reference (zero-shot from the context alone) every feature is zero: the model was pretrained with references
of 0 to dozens of trials, so it knows what an empty identity means.

This file ships with checkpoints (the modeling file imports it), so it imports only torch.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

IDENTITY_LAGS = (1, 2, 4, 8, 16, 32)  # autocorrelation lags (frames) among the single-neuron statistics
RELIABILITY_FEATURES = 3
STATISTIC_FEATURES = len(IDENTITY_LAGS) + 3
SKILL_FEATURES = 2  # the neuron's cross-validated coupling skill and the recording's mean
EXACT_COUPLING_NEURONS = 1024  # above this, the coupling is fitted through the top principal components
COUPLING_COMPONENTS = 256  # principal components kept then


def identity_size(rank: int, lookback_windows: int = 0, horizon_windows: int = 0, window_size: int = 4,
                  coupling_skill: bool = False) -> int:
    """Features per neuron of a data identity with `rank` coupling factors, the coupling skill with
    `coupling_skill`, and, with `lookback_windows` and `horizon_windows`, the highway statistics of that shape."""
    return (base_identity_size(rank, coupling_skill)
            + highway_statistics_size(lookback_windows, horizon_windows, window_size))


def base_identity_size(rank: int, coupling_skill: bool = False) -> int:
    """Features the backbone reads: coupling factors, single-neuron statistics, reliability (and the coupling skill)."""
    return 2 * int(rank) + STATISTIC_FEATURES + RELIABILITY_FEATURES + (SKILL_FEATURES if coupling_skill else 0)


def highway_statistics_size(lookback_windows: int, horizon_windows: int, window_size: int = 4) -> int:
    """Per neuron: a `(lookback + 1)^2` Gram matrix per horizon window, and the `(lookback + 1, horizon)` cross-products
    (lookback and horizon in frames; 0 without a highway)."""
    if not lookback_windows or not horizon_windows:
        return 0
    inputs = lookback_windows * window_size + 1
    return horizon_windows * inputs * inputs + inputs * horizon_windows * window_size


def identity_settings(config) -> dict:
    """The `compute_neuron_identity` keyword arguments a `CalmConfig` implies."""
    highway = bool(getattr(config, "identity_highway", False))
    return {"rank": config.identity_rank, "window_size": config.window_size, "ridge": config.identity_ridge,
            "lookback_windows": config.value_skip_windows if highway else 0,
            "horizon_windows": config.value_head_steps if highway else 0,
            "coupling_skill": bool(getattr(config, "identity_coupling_skill", False)),
            "coupling": bool(getattr(config, "identity_coupling", True)),
            "use_reference": bool(getattr(config, "identity_reference", True))}


def config_identity_size(config) -> int:
    """`identity_size` of a `CalmConfig` (what `neuron_identity` must hold per neuron)."""
    settings = identity_settings(config)
    return identity_size(settings["rank"], settings["lookback_windows"], settings["horizon_windows"],
                         settings["window_size"], settings["coupling_skill"])


def config_base_identity_size(config) -> int:
    """`base_identity_size` of a `CalmConfig`: the leading features of `neuron_identity` the backbone reads."""
    settings = identity_settings(config)
    return base_identity_size(settings["rank"], settings["coupling_skill"])


def _window_means(values: torch.Tensor, window_size: int) -> torch.Tensor:
    steps = values.shape[-1] // window_size
    return values[..., : steps * window_size].reshape(*values.shape[:-1], steps, window_size).mean(-1)


def principal_axes(inputs: torch.Tensor, count: int) -> torch.Tensor:
    """The top `count` right singular vectors `(features, <= count)` of `inputs` `(samples, features)` (float64),
    from the eigenvectors of the smaller Gram matrix: a matrix product and a small symmetric eigenproblem instead of a
    full SVD, so the cost is linear in the larger side. Directions with no variance are left out (they carry
    nothing to a ridge fit)."""
    samples, features = inputs.shape
    small_side = inputs @ inputs.T if samples < features else inputs.T @ inputs
    values, vectors = torch.linalg.eigh(small_side)  # ascending
    values, vectors = values.flip(0)[:count], vectors.flip(1)[:, :count]
    kept = values > values[0].clamp_min(1e-300) * 1e-12
    values, vectors = values[kept], vectors[:, kept]
    if samples < features:  # right vectors from the left ones: v = X^T u / sigma
        return (inputs.T @ vectors) / values.sqrt()
    return vectors


def top_singular_triplets(matrix: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(left (rows, k), singular (k,), right (columns, k))`: the top `k <= count` singular triplets of `matrix`
    (float64), descending, from `principal_axes` (a symmetric eigenproblem of the smaller Gram matrix instead of a
    full SVD); left vectors are `matrix @ right / singular`. Directions with no variance are left out."""
    right = principal_axes(matrix, count)
    projected = matrix @ right  # left vectors times their singular values
    singular = projected.norm(dim=0)
    return projected / singular, singular, right


def _transitions(means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(inputs, targets)` `(samples, neurons)`: every window mean and the next one, of window means `(trials, neurons,
    steps)`."""
    neurons = means.shape[1]
    inputs = means[..., :-1].transpose(1, 2).reshape(-1, neurons)
    targets = means[..., 1:].transpose(1, 2).reshape(-1, neurons)
    return inputs, targets


def _ridge_fit(inputs: torch.Tensor, targets: torch.Tensor, ridge: float) -> tuple[torch.Tensor | None, torch.Tensor]:
    """`(basis, weights)`: the ridge regression of `targets` on `inputs` (`(samples, neurons)`, ridge relative to the
    mean diagonal of the Gram matrix), `targets ~ inputs @ weights` with `basis` None; above `EXACT_COUPLING_NEURONS`
    neurons through the inputs' top principal components, `targets ~ (inputs @ basis) @ weights` (memory and time
    linear in the neurons)."""
    basis = None if inputs.shape[1] <= EXACT_COUPLING_NEURONS else principal_axes(inputs, COUPLING_COMPONENTS)
    scores = inputs if basis is None else inputs @ basis
    gram = scores.T @ scores
    gram.diagonal().add_(ridge * max(float(gram.diagonal().mean()), 1e-8))
    return basis, torch.linalg.solve(gram, scores.T @ targets)


def coupling_skill_features(reference: torch.Tensor, window_size: int, ridge: float = 1.0) -> torch.Tensor:
    """`(neurons, SKILL_FEATURES)`: how well the coupling of window means forecasts the next window *out of sample*.
    The reference trials are split in two folds (alternate trials); the ridge regression of every neuron's next window
    mean on all neurons' current ones is fitted on one fold and scored on the other, against each neuron's own
    one-step regression (same relative ridge). Per neuron `1 - MSE(all neurons) / MSE(own term)`, the squared errors
    summed over both folds, clipped to [-1, 1]; then the mean over neurons. Zero with fewer than two reference trials
    or neurons."""
    means = _window_means(reference.double(), window_size)  # (trials, neurons, steps)
    trials, neurons = means.shape[:2]
    skill = torch.zeros(neurons, SKILL_FEATURES)
    if trials < 2 or neurons < 2 or means.shape[-1] < 2:
        return skill
    fold = torch.arange(trials) % 2 == 0
    error_all = torch.zeros(neurons, dtype=torch.float64)
    error_own = torch.zeros(neurons, dtype=torch.float64)
    for fit_trials in (fold, ~fold):
        inputs, targets = _transitions(means[fit_trials])
        test_inputs, test_targets = _transitions(means[~fit_trials])
        basis, weights = _ridge_fit(inputs, targets, ridge)
        predicted = (test_inputs if basis is None else test_inputs @ basis) @ weights
        error_all += (test_targets - predicted).pow(2).sum(0)
        power = inputs.pow(2).sum(0)
        own = (inputs * targets).sum(0) / (power + ridge * max(float(power.mean()), 1e-8))
        error_own += (test_targets - test_inputs * own).pow(2).sum(0)
    per_neuron = (1.0 - error_all / error_own.clamp_min(1e-12)).clamp(-1.0, 1.0)
    skill[:, 0] = per_neuron.float()
    skill[:, 1] = float(per_neuron.mean())
    return skill


def coupling_factors(reference: torch.Tensor, window_size: int, rank: int, ridge: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
    """`(receives, drives, samples)`: rank-`rank` factors `(neurons, rank)` of the one-step coupling of window means
    (ridge relative to the mean diagonal of the Gram matrix, diagonal removed), and the number of samples it was
    fitted on. Columns beyond the neurons' count are zero."""
    means = _window_means(reference.double(), window_size)  # (trials, neurons, steps)
    neurons = means.shape[1]
    inputs, targets = _transitions(means)  # (samples, neurons)
    samples = inputs.shape[0]
    receives = torch.zeros(neurons, rank, dtype=torch.float64)
    drives = torch.zeros(neurons, rank, dtype=torch.float64)
    if samples == 0 or neurons < 2:
        return receives.float(), drives.float(), samples
    basis, weights = _ridge_fit(inputs, targets, ridge)
    if basis is None:  # weights: the coupling (in, out)
        weights.fill_diagonal_(0.0)
        left, singular, right = top_singular_triplets(weights, rank)
    else:  # weights: (components, out) on the inputs' top principal components `basis` (neurons, components)
        core_left, singular, right = top_singular_triplets(weights, rank)
        left = basis @ core_left
    kept = min(rank, singular.shape[0])
    root = singular[:kept].sqrt()
    drive, receive = left[:, :kept] * root, right[:, :kept] * root
    sign = torch.where(drive.sum(0) < 0, -1.0, 1.0).to(drive.dtype)
    drives[:, :kept], receives[:, :kept] = drive * sign, receive * sign
    return receives.float(), drives.float(), samples


def neuron_statistics(reference: torch.Tensor) -> torch.Tensor:
    """`(neurons, STATISTIC_FEATURES)`: autocorrelation at `IDENTITY_LAGS`, mean, log std and skewness (scaled by
    1/3, clipped) of every neuron over the reference trials `(trials, neurons, frames)`."""
    values = reference.double()
    frames = values.shape[-1]
    mean = values.mean(dim=(0, 2))
    centred = values - mean[None, :, None]
    variance = centred.pow(2).mean(dim=(0, 2)).clamp_min(1e-8)
    features = [torch.zeros_like(mean) if lag >= frames else
                (centred[..., lag:] * centred[..., :-lag]).mean(dim=(0, 2)) / variance for lag in IDENTITY_LAGS]
    skew = (centred.pow(3).mean(dim=(0, 2)) / variance.pow(1.5)).clamp(-10, 10) / 3
    features += [mean, 0.5 * variance.log(), skew]
    return torch.stack(features, dim=1).float()


def highway_statistics(reference: torch.Tensor, window_size: int, lookback_windows: int, horizon_windows: int
                       ) -> torch.Tensor:
    """`(neurons, highway_statistics_size)`: for every neuron, the Gram matrices `(horizon_windows, lookback + 1,
    lookback + 1)` of its last `lookback` frames (zero before a trial starts) plus a bias at every token step of the
    reference trials whose horizon window exists, and the cross-products `(lookback + 1, horizon)` with the frames
    that follow -- the samples the highway's loss scores."""
    values = reference.float()
    trials, neurons, frames = values.shape
    steps = frames // window_size
    lookback, horizon = lookback_windows * window_size, horizon_windows * window_size
    padded = F.pad(values[..., : steps * window_size], (lookback - window_size, horizon))
    positions = steps - 1  # the last step has nothing after it
    inputs = padded.unfold(-1, lookback, window_size)[:, :, :positions]  # (trials, neurons, positions, lookback)
    inputs = torch.cat([inputs, torch.ones_like(inputs[..., :1])], dim=-1)
    targets = padded[..., lookback:].unfold(-1, horizon, window_size)[:, :, :positions]  # frames after each step
    targets = targets.unflatten(-1, (horizon_windows, window_size))  # (trials, neurons, positions, windows, L)
    # horizon window k of position t exists when its last frame does, (t + 2 + k) L <= frames: for every window a
    # prefix of the positions, so its Gram matrix is a cumulative sum of the per-position ones
    last = (steps - 2 - torch.arange(horizon_windows)).clamp(min=-1)  # the last position that sees window k
    per_position = torch.einsum("rnpa,rnpb->npab", inputs, inputs)  # (neurons, positions, a, b)
    cumulative = F.pad(per_position.cumsum(dim=1), (0, 0, 0, 0, 1, 0))  # row p + 1: positions 0..p
    gram = cumulative[:, last + 1]  # (neurons, windows, a, b)
    valid = (torch.arange(positions)[:, None] <= last[None]).float()  # (positions, windows)
    cross = torch.einsum("rnpa,rnpkf->nakf", inputs, targets * valid[None, None, :, :, None])
    return torch.cat([gram.reshape(neurons, -1), cross.reshape(neurons, -1)], dim=1)


@torch.no_grad()
def compute_neuron_identity(reference: torch.Tensor | None, num_neurons: int, rank: int, window_size: int = 4,
                            ridge: float = 1.0, lookback_windows: int = 0, horizon_windows: int = 0,
                            coupling_skill: bool = False, coupling: bool = True,
                            use_reference: bool = True) -> torch.Tensor:
    """The data identity `(num_neurons, identity_size(rank))` of a recording's neurons.

    Args:
        reference (`torch.FloatTensor` of shape `(trials, neurons, frames)`, *optional*): reference activity of the
            same neurons, z-scored like the model inputs (e.g. training trials, or the recording before the forecast
            context cut into trials). `None` or zero trials: the empty identity (zero-shot).
        num_neurons (`int`): neurons of the recording (must match the reference).
        rank (`int`): coupling factors per side (`config.identity_rank`).
        window_size (`int`): frames per token window (`config.window_size`).
        ridge (`float`): relative ridge strength of the coupling fit (`config.identity_ridge`).
        lookback_windows, horizon_windows (`int`): the highway's shape (`config.value_skip_windows`,
            `config.value_head_steps`) when the identity carries its statistics (`config.identity_highway`; see
            `identity_settings`), else 0.
        coupling_skill (`bool`): append the coupling's cross-validated skill (`config.identity_coupling_skill`).
        coupling (`bool`): fit the coupling factors (`config.identity_coupling`); `False` leaves them zero.
        use_reference (`bool`): `False` returns the empty identity whatever the reference (`config.identity_reference`).
    """
    features = torch.zeros(int(num_neurons), identity_size(rank, lookback_windows, horizon_windows, window_size,
                                                           coupling_skill))
    if reference is None or reference.shape[0] == 0 or not use_reference:
        return features
    reference = torch.as_tensor(reference, dtype=torch.float32, device="cpu")
    if reference.ndim != 3 or reference.shape[1] != num_neurons:
        raise ValueError(f"the reference must be (trials, neurons={num_neurons}, frames), got {tuple(reference.shape)}.")
    if reference.shape[-1] < 2 * window_size:
        raise ValueError(f"reference trials need at least two token windows ({2 * window_size} frames), got "
                         f"{reference.shape[-1]}.")
    if not bool(torch.isfinite(reference).all()):
        raise ValueError("the reference holds NaN/Inf values: clean the traces (interpolate or drop neurons) first.")
    if coupling:
        receives, drives, samples = coupling_factors(reference, window_size, rank, ridge)
    else:  # as many samples as the fit would have had
        receives = drives = torch.zeros(int(num_neurons), rank)
        samples = reference.shape[0] * max(0, reference.shape[-1] // window_size - 1)
    reliability = torch.tensor([math.log1p(samples) / math.log(1000.0), min(1.0, num_neurons / max(samples, 1)), 1.0])
    base = base_identity_size(rank, coupling_skill)
    features[:, : 2 * rank] = torch.cat([receives, drives], dim=1)
    features[:, 2 * rank : 2 * rank + STATISTIC_FEATURES] = neuron_statistics(reference)
    reliable = 2 * rank + STATISTIC_FEATURES + RELIABILITY_FEATURES
    features[:, 2 * rank + STATISTIC_FEATURES : reliable] = reliability
    if coupling_skill:
        features[:, reliable:base] = coupling_skill_features(reference, window_size, ridge)
    if features.shape[1] > base:
        features[:, base:] = highway_statistics(reference, window_size, lookback_windows, horizon_windows)
    return features


def highway_weights(statistics: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, prior_samples: torch.Tensor,
                    window_size: int) -> torch.Tensor:
    """Each neuron's own highway `(..., lookback + 1, horizon)` (the bias last): per horizon window, the ridge fit of
    its statistics shrunk towards the shared highway (`weight` `(horizon, lookback)`, `bias` `(horizon,)`) with the
    strength of `prior_samples` samples. No reference (zero statistics) gives the shared highway itself."""
    horizon, lookback = weight.shape
    windows, inputs = horizon // window_size, lookback + 1
    split = windows * inputs * inputs
    gram = statistics[..., :split].unflatten(-1, (windows, inputs, inputs)).double()
    cross = statistics[..., split:].unflatten(-1, (inputs, windows, window_size)).movedim(-3, -2).double()
    shared = torch.cat([weight, bias[:, None]], dim=1).T.double()  # (inputs, horizon)
    shared = shared.unflatten(-1, (windows, window_size)).movedim(-2, -3)  # (windows, inputs, L)
    count = gram[..., -1, -1]  # the bias' own entry: the number of samples
    variance = gram.diagonal(dim1=-2, dim2=-1)[..., :-1].sum(-1) / (lookback * count.clamp_min(1.0))
    strength = prior_samples.double() * torch.where(count > 0, variance, torch.ones_like(variance))
    eye = torch.eye(inputs, dtype=gram.dtype, device=gram.device)
    fitted = torch.linalg.solve(gram + strength[..., None, None] * eye,
                                cross + strength[..., None, None] * shared)  # (..., windows, inputs, L)
    return fitted.movedim(-3, -2).flatten(-2).to(weight.dtype)  # (..., inputs, horizon)


__all__ = ["IDENTITY_LAGS", "base_identity_size", "compute_neuron_identity", "config_base_identity_size",
           "config_identity_size", "coupling_factors", "coupling_skill_features",
           "highway_statistics", "highway_weights", "identity_settings", "identity_size", "neuron_statistics"]
