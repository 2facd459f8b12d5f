"""A closed-form behaviour decoder on the frozen CalM backbone: ridge regression from per-frame features to behaviour,
fitted on one recording's training trials with every choice made on its validation trials.

The gradient-trained heads of [`CalmForBehaviorRegression`] learn a per-neuron weight bank and shared projections
from a recording's training trials; with short trials and few of them they fit the training trials far better than
held-out ones. [`CalmBehaviorRidgeReadout`] has no iterative training: for each frame t it builds

- `lags` causal lags of the z-scored traces, `[x[t], ..., x[t - lags + 1]]` of every neuron (what the ridge GLM
  baseline reads, `calm_hf.baselines.behavior.causal_lag_features`), and
- the backbone's hidden state of the last token complete at frame t (token k holds frames `k*L .. k*L + L - 1`, so
  frame t reads token `(t + 1) // L - 1` and frames before the first complete token read zeros and an indicator),
  reduced over neurons so that any neuron count works: `"pooled"`, the mean and standard deviation over neurons
  (`2 * hidden_size` values), or `"neuron_pca"`, every neuron's hidden state projected on the top `pca_size` principal
  directions of the training trials' hidden states (`neurons * pca_size` values), times a block weight (a larger
  weight is a weaker penalty on the backbone block relative to the traces),

and solves the ridge regression of behaviour on them in closed form (`calm_hf.baselines.forecasting.ridge_system`:
in the dual with fewer training frames than features). The number of lags, the reduction, the PCA size
and the block weight are chosen jointly by the channel-mean validation error (each channel at its best penalty);
the penalty is then chosen per channel, since ridge solves each output column on its own. Nothing is chosen on test
trials. Without hidden states (`reductions=()`) it is a ridge GLM on the traces alone with the same search: the
ablation that measures what the backbone adds.

With `causal=True` (default) every feature of frame t comes from frames <= t. `causal=False` reads the token holding
frame t instead (up to `L - 1` frames of look-ahead, as the gradient-trained heads do).

A readout belongs to one recording's neurons in their order; it is saved beside a checkpoint as
`behavior_readout.safetensors` ([`CalmBehaviorRidgeReadout.save`] / [`CalmBehaviorRidgeReadout.load`]).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
import torch

from .baselines.behavior import causal_lag_features
from .baselines.forecasting import DEFAULT_ALPHA_GRID, check_trials, ridge_system

READOUT_FILE = "behavior_readout.safetensors"
REDUCTIONS = ("pooled", "neuron_pca")

__all__ = ["READOUT_FILE", "REDUCTIONS", "CalmBehaviorRidgeReadout", "frame_token_index"]


def frame_token_index(num_frames: int, window_size: int, causal: bool = True) -> np.ndarray:
    """`(num_frames,)` the token step whose hidden state frame t reads: the last token complete at t
    (`(t + 1) // window_size - 1`, -1 before the first complete token) or, with `causal=False`, the token holding t."""
    frames = np.arange(num_frames)
    return (frames + 1) // window_size - 1 if causal else frames // window_size


def _as_hidden(name: str, hidden: Any) -> np.ndarray:
    if isinstance(hidden, torch.Tensor):
        hidden = hidden.detach().float().cpu().numpy()
    array = np.asarray(hidden, dtype=np.float64)
    if array.ndim != 4:
        raise ValueError(
            f"`{name}` must be the backbone's last_hidden_state (trials, neurons, token_steps, hidden_size), got shape "
            f"{array.shape}."
        )
    if not np.isfinite(array).all():
        raise ValueError(f"`{name}` contains NaN or inf; check the backbone's inputs (codes, identity) for those trials.")
    return array


def _flat_targets(behavior: np.ndarray) -> np.ndarray:
    return behavior.transpose(0, 2, 1).reshape(-1, behavior.shape[1])  # (trials * frames, channels)


class CalmBehaviorRidgeReadout:
    """Ridge decoder from causal trace lags and the frozen backbone's hidden states to behaviour (module docstring).

    Args:
        lags_grid (`tuple[int, ...]`, *optional*, defaults to `(1, 2, 4, 8)`): Candidate numbers of trace lags.
        reductions (`tuple[str, ...]`, *optional*, defaults to `("pooled", "neuron_pca")`): Candidate reductions of
            the hidden states over neurons; `()` decodes from the traces alone.
        pca_sizes (`tuple[int, ...]`, *optional*, defaults to `(2, 4)`): Candidate `pca_size` of `"neuron_pca"`.
        hidden_weights (`tuple[float, ...]`, *optional*, defaults to `(0.1, 0.3, 1.0)`): Candidate scales of the
            (standardised) backbone block; a small one lets the penalty shrink the backbone block harder than the
            traces.
        alpha_grid (`tuple[float, ...]`, *optional*): Relative ridge penalties (times the mean Gram eigenvalue);
            default `logspace(-4, 2, 7)`.
        window_size (`int`, *optional*, defaults to 4): Frames per token (`config.window_size` of the backbone).
        causal (`bool`, *optional*, defaults to `True`): Read the last complete token (frames <= t) rather than the
            token holding the frame.

    Example:

    ```python
    >>> backbone = CalmForBehaviorRegression.from_pretrained("calm-base", num_behavior_channels=2).model
    >>> hidden = backbone(input_ids=codes, neuron_identity=identity).last_hidden_state  # (trials, N, steps, hidden)
    >>> readout = CalmBehaviorRidgeReadout(window_size=backbone.config.window_size)
    >>> readout.fit(traces[train], behavior[train], traces[val], behavior[val], hidden[train], hidden[val])
    >>> behaviour = readout.predict(traces[test], hidden[test])  # (trials, channels, frames)
    >>> readout.save("calm-base-finetuned")  # behavior_readout.safetensors; CalmBehaviorRidgeReadout.load(...)
    ```
    """

    def __init__(
        self,
        lags_grid: tuple[int, ...] = (1, 2, 4, 8),
        reductions: tuple[str, ...] = REDUCTIONS,
        pca_sizes: tuple[int, ...] = (2, 4),
        hidden_weights: tuple[float, ...] = (0.1, 0.3, 1.0),
        alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID,
        window_size: int = 4,
        causal: bool = True,
    ):
        if not lags_grid or min(lags_grid) < 1:
            raise ValueError(f"lags_grid={lags_grid} must be non-empty with every lag >= 1.")
        unknown = sorted(set(reductions) - set(REDUCTIONS))
        if unknown:
            raise ValueError(f"reductions {unknown} are unknown; use a subset of {REDUCTIONS} (or () for traces only).")
        if "neuron_pca" in reductions and (not pca_sizes or min(pca_sizes) < 1):
            raise ValueError(f"pca_sizes={pca_sizes} must be non-empty positive integers for reduction 'neuron_pca'.")
        if reductions and (not hidden_weights or min(hidden_weights) <= 0):
            raise ValueError(f"hidden_weights={hidden_weights} must be non-empty and positive.")
        if not alpha_grid or min(alpha_grid) < 0:
            raise ValueError(f"alpha_grid={alpha_grid} must be non-empty with alphas >= 0.")
        if window_size < 1:
            raise ValueError(f"window_size must be >= 1 frame, got {window_size}.")
        self.lags_grid = tuple(int(lag) for lag in lags_grid)
        self.reductions = tuple(reductions)
        self.pca_sizes = tuple(int(size) for size in pca_sizes)
        self.hidden_weights = tuple(float(weight) for weight in hidden_weights)
        self.alpha_grid = tuple(float(alpha) for alpha in alpha_grid)
        self.window_size, self.causal = int(window_size), bool(causal)
        self.num_neurons_: int | None = None
        self.search_log_: dict[str, Any] = {}

    # -- features -----------------------------------------------------------------------------------------------------

    @property
    def uses_backbone(self) -> bool:
        return bool(self.reductions)

    @staticmethod
    def _reduce(hidden: np.ndarray, design: dict) -> np.ndarray:
        """`(trials, token_steps, features)`: the hidden states reduced over neurons."""
        if design["reduction"] == "pooled":  # (trials, steps, 2 * hidden)
            return np.concatenate([hidden.mean(axis=1), hidden.std(axis=1)], axis=-1)
        # (trials, neurons, steps, pca_size) -> (trials, steps, neurons * pca_size)
        projected = (hidden - design["pca_mean"]) @ design["pca_basis"]
        return projected.transpose(0, 2, 1, 3).reshape(hidden.shape[0], hidden.shape[2], -1)

    def _backbone_block(self, hidden: np.ndarray, num_frames: int, design: dict) -> np.ndarray:
        """`(trials * frames, features)`: the reduced hidden state of the token each frame reads, standardised with
        the training statistics and scaled by the block weight, plus a column marking frames without a token."""
        reduced = (self._reduce(hidden, design) - design["feature_mean"]) / design["feature_scale"]
        tokens = frame_token_index(num_frames, self.window_size, self.causal)
        known = tokens >= 0
        per_frame = reduced[:, np.clip(tokens, 0, None)] * known[None, :, None]  # (trials, frames, features)
        missing = np.broadcast_to((~known)[None, :, None], (len(hidden), num_frames, 1)).astype(np.float64)
        block = np.concatenate([design["hidden_weight"] * per_frame, missing], axis=-1)
        return block.reshape(-1, block.shape[-1])

    def _features(self, values: np.ndarray, hidden: np.ndarray | None, design: dict) -> np.ndarray:
        lags = causal_lag_features(values, design["lags"])
        if design["reduction"] is None:
            return lags
        return np.concatenate([lags, self._backbone_block(hidden, values.shape[-1], design)], axis=1)

    def _reduction_designs(self, train_hidden: np.ndarray | None) -> list[dict]:
        """Every backbone-feature choice with the statistics it needs from the training trials (PCA basis, feature
        mean and scale); `[{"reduction": None}]` for traces only."""
        if not self.uses_backbone:
            return [{"reduction": None}]
        designs = []
        flat = train_hidden.reshape(-1, train_hidden.shape[-1])
        for reduction in self.reductions:
            sizes = self.pca_sizes if reduction == "neuron_pca" else (0,)
            if reduction == "neuron_pca":
                pca_mean = flat.mean(axis=0)
                _, _, right = np.linalg.svd(flat - pca_mean, full_matrices=False)
            for size in sizes:
                design = {"reduction": reduction, "pca_size": size}
                if reduction == "neuron_pca":
                    size = min(size, right.shape[0])
                    design.update(pca_size=size, pca_mean=pca_mean, pca_basis=right[:size].T)
                # standardise each feature over the training tokens, so one weight grid fits every reduction
                reduced = self._reduce(train_hidden, design)
                reduced = reduced.reshape(-1, reduced.shape[-1])  # (trials * token_steps, features)
                design.update(feature_mean=reduced.mean(axis=0), feature_scale=np.maximum(reduced.std(axis=0), 1e-8))
                designs.append(design)
        return designs

    # -- checks -------------------------------------------------------------------------------------------------------

    def _check_pair(self, prefix: str, values: Any, behavior: Any, hidden: Any) -> tuple:
        values = check_trials(f"{prefix}_values", values, min_frames=1)
        behavior = check_trials(f"{prefix}_behavior", behavior, min_frames=1)
        if behavior.shape[0] != values.shape[0] or behavior.shape[2] != values.shape[2]:
            raise ValueError(
                f"`{prefix}_values` {values.shape} and `{prefix}_behavior` {behavior.shape} must share trials and "
                "frames: traces (trials, neurons, frames) and behaviour (trials, channels, frames) at one frame rate."
            )
        return values, behavior, self._check_hidden(f"{prefix}_hidden", hidden, values)

    def _check_hidden(self, name: str, hidden: Any, values: np.ndarray) -> np.ndarray | None:
        if not self.uses_backbone:
            return None
        if hidden is None:
            raise ValueError(
                f"`{name}` is missing: this readout decodes from the backbone's hidden states (reductions="
                f"{self.reductions}); pass last_hidden_state (trials, neurons, token_steps, hidden_size), or build it "
                "with reductions=() to decode from the traces alone."
            )
        hidden = _as_hidden(name, hidden)
        trials, neurons, frames = values.shape
        if hidden.shape[:2] != (trials, neurons) or hidden.shape[2] != frames // self.window_size:
            raise ValueError(
                f"`{name}` {hidden.shape} does not match traces {values.shape}: it needs (trials={trials}, neurons="
                f"{neurons}, token_steps={frames // self.window_size} = frames // window_size {self.window_size}, hidden)"
                "; compute it from the same trials' codes."
            )
        if getattr(self, "hidden_size_", None) is not None and hidden.shape[3] != self.hidden_size_:
            raise ValueError(f"`{name}` has hidden size {hidden.shape[3]} but the readout was fitted on "
                             f"{self.hidden_size_}; use the backbone it was fitted with.")
        return hidden

    # -- fit / predict ------------------------------------------------------------------------------------------------

    def fit(self, train_values: Any, train_behavior: Any, val_values: Any, val_behavior: Any,
            train_hidden: Any = None, val_hidden: Any = None) -> CalmBehaviorRidgeReadout:
        """Fits on the training trials; lags, reduction, PCA size, block weight and per-channel penalty are chosen on
        the validation trials (grid, scores and choice in `search_log_`).

        Args:
            train_values, val_values (`np.ndarray` or `torch.Tensor` of shape `(trials, neurons, frames)`): z-scored
                traces at the model's frame rate.
            train_behavior, val_behavior (`(trials, channels, frames)`): behaviour at the same frames.
            train_hidden, val_hidden (`(trials, neurons, frames // window_size, hidden_size)`, *optional*): the frozen
                backbone's `last_hidden_state` for the same trials; required unless `reductions=()`.
        """
        self.num_neurons_ = self.hidden_size_ = None
        train_values, train_behavior, train_hidden = self._check_pair("train", train_values, train_behavior, train_hidden)
        val_values, val_behavior, val_hidden = self._check_pair("val", val_values, val_behavior, val_hidden)
        if train_values.shape[1] != val_values.shape[1] or train_behavior.shape[1] != val_behavior.shape[1]:
            raise ValueError(
                f"train and validation disagree on neurons ({train_values.shape[1]} vs {val_values.shape[1]}) or "
                f"behaviour channels ({train_behavior.shape[1]} vs {val_behavior.shape[1]}); split one recording's trials."
            )
        train_targets, val_targets = _flat_targets(train_behavior), _flat_targets(val_behavior)
        # validation error in units of each channel's training variance (behaviour z-scored on training: ~MSE)
        channel_scale = np.maximum(train_targets.var(axis=0), 1e-12)
        results, best = [], None
        for reduction in self._reduction_designs(train_hidden):
            weights_grid = self.hidden_weights if reduction["reduction"] is not None else (1.0,)
            for lags in self.lags_grid:
                for hidden_weight in weights_grid:
                    design = {**reduction, "lags": lags, "hidden_weight": hidden_weight}
                    features = self._features(train_values, train_hidden, design)
                    system = ridge_system(features, train_targets)  # the dual with more features than frames
                    val_features = self._features(val_values, val_hidden, design)
                    solutions = [system.solve(alpha) for alpha in self.alpha_grid]
                    errors = np.stack([((val_features @ w + b - val_targets) ** 2).mean(axis=0) / channel_scale
                                       for w, b in solutions])  # (alphas, channels)
                    chosen = errors.argmin(axis=0)
                    score = float(errors[chosen, np.arange(errors.shape[1])].mean())
                    results.append({"reduction": design["reduction"], "pca_size": design.get("pca_size", 0),
                                    "lags": lags, "hidden_weight": hidden_weight,
                                    "alpha": [self.alpha_grid[i] for i in chosen], "val_relative_mse": score})
                    if best is None or score < best[0]:
                        weights = np.stack([solutions[i][0][:, c] for c, i in enumerate(chosen)], axis=1)
                        bias = np.array([solutions[i][1][c] for c, i in enumerate(chosen)])
                        best = (score, design, weights, bias, results[-1])
        score, self.design_, self.weights_, self.bias_, row = best
        self.num_neurons_, self.num_channels_ = train_values.shape[1], train_behavior.shape[1]
        self.hidden_size_ = None if train_hidden is None else train_hidden.shape[3]
        self.alphas_ = row["alpha"]
        self.search_log_ = {
            "grid": {"lags": list(self.lags_grid), "reduction": list(self.reductions), "pca_size": list(self.pca_sizes),
                     "hidden_weight": list(self.hidden_weights), "alpha": list(self.alpha_grid)},
            "criterion": "validation MSE / training variance, channel mean (penalty per channel)",
            "results": results,
            "chosen": {k: row[k] for k in ("reduction", "pca_size", "lags", "hidden_weight", "alpha")},
            "best_val_relative_mse": score,
        }
        return self

    def predict(self, values: Any, hidden: Any = None) -> np.ndarray:
        """Decodes `(trials, neurons, frames)` traces (and the backbone's `(trials, neurons, frames // window_size,
        hidden_size)` hidden states) -> behaviour `(trials, channels, frames)`, float32."""
        if self.num_neurons_ is None:
            raise ValueError("CalmBehaviorRidgeReadout is not fitted yet; call fit(...) or CalmBehaviorRidgeReadout.load(dir).")
        values = check_trials("values", values, min_frames=1)
        if values.shape[1] != self.num_neurons_:
            raise ValueError(f"values have {values.shape[1]} neurons but the readout was fitted on {self.num_neurons_}; "
                             "fit one readout per recording (its neurons in the same order).")
        hidden = self._check_hidden("hidden", hidden, values)
        trials, _, frames = values.shape
        out = self._features(values, hidden, self.design_) @ self.weights_ + self.bias_
        return out.reshape(trials, frames, -1).transpose(0, 2, 1).astype(np.float32)

    # -- save / load --------------------------------------------------------------------------------------------------

    _ARRAYS = ("pca_mean", "pca_basis", "feature_mean", "feature_scale")

    def save(self, directory: str | os.PathLike) -> str:
        """Writes `behavior_readout.safetensors` into `directory` (e.g. beside the backbone checkpoint); returns its
        path."""
        from safetensors.torch import save_file

        if self.num_neurons_ is None:
            raise ValueError("CalmBehaviorRidgeReadout is not fitted yet; call fit(...) before save(directory).")
        os.makedirs(directory, exist_ok=True)
        tensors = {"weights": torch.as_tensor(self.weights_), "bias": torch.as_tensor(self.bias_)}
        for name in self._ARRAYS:
            if isinstance(self.design_.get(name), np.ndarray):
                tensors[name] = torch.as_tensor(self.design_[name])
        design = {k: v for k, v in self.design_.items() if k not in self._ARRAYS}
        settings = {"lags_grid": self.lags_grid, "reductions": self.reductions, "pca_sizes": self.pca_sizes,
                    "hidden_weights": self.hidden_weights, "alpha_grid": self.alpha_grid,
                    "window_size": self.window_size, "causal": self.causal}
        fitted = {"num_neurons": self.num_neurons_, "num_channels": self.num_channels_,
                  "hidden_size": self.hidden_size_, "alphas": self.alphas_}
        metadata = {"settings": json.dumps(settings), "design": json.dumps(design), "fitted": json.dumps(fitted),
                    "search_log": json.dumps(self.search_log_, default=float)}
        path = os.path.join(directory, READOUT_FILE)
        save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata=metadata)
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike | None) -> CalmBehaviorRidgeReadout | None:
        """The readout saved in `directory`, or None when it has none."""
        if directory is None or not os.path.isfile(os.path.join(directory, READOUT_FILE)):
            return None
        from safetensors import safe_open

        with safe_open(os.path.join(directory, READOUT_FILE), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name).numpy() for name in handle.keys()}
        readout = cls(**json.loads(metadata["settings"]))
        fitted = json.loads(metadata["fitted"])
        readout.design_ = {**json.loads(metadata["design"]),
                           **{name: tensors[name] for name in cls._ARRAYS if name in tensors}}
        readout.weights_, readout.bias_ = tensors["weights"], tensors["bias"]
        readout.num_neurons_, readout.num_channels_ = fitted["num_neurons"], fitted["num_channels"]
        readout.hidden_size_, readout.alphas_ = fitted["hidden_size"], fitted["alphas"]
        readout.search_log_ = json.loads(metadata["search_log"])
        return readout
