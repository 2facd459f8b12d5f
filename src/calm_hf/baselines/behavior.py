"""Behaviour-decoding baselines: neural activity `(trials, neurons, frames)` -> behaviour `(trials, channels, frames)`.

Every decoder has `fit(train_x, train_y, val_x, val_y)`, which fits on the training trials and picks its
hyperparameters on the validation trials (grid, scores and choice in `self.search_log_`), and `predict(x)` ->
`(trials, channels, frames)`. All decoders are causal: behaviour at frame t is read from neural frames <= t, as the
CalM heads are. Scores are `calm_hf.metrics.functional.r2_score` (per channel over all trial-frames, then averaged
over channels) and MSE.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from ..metrics.functional import mse, r2_score
from .forecasting import DEFAULT_ALPHA_GRID, _RidgeGram, check_trials
from .tcn import CalmBaselineTCN, autocast_context, search_learning_rate

__all__ = ["RidgeGLMDecoder", "ReducedRankDecoder", "TCNDecoder", "behavior_r2", "causal_lag_features"]


def behavior_r2(pred: np.ndarray, truth: np.ndarray) -> float:
    """Channel-averaged R^2 of `(trials, channels, frames)` predictions (pooled over trials and frames)."""
    value = r2_score(np.swapaxes(pred, 1, 2), np.swapaxes(truth, 1, 2), multioutput="uniform_average")
    return value if math.isfinite(value) else -math.inf


def causal_lag_features(x: np.ndarray, lags: int) -> np.ndarray:
    """Features `[x[t], x[t-1], ..., x[t-lags+1]]` for every frame, zeros before the first frame.

    Args:
        x: `(trials, neurons, frames)`.

    Returns:
        `(trials * frames, neurons * lags)`, rows ordered trial-major, block k holds lag k.
    """
    trials, neurons, frames = x.shape
    padded = np.concatenate([np.zeros((trials, neurons, lags - 1)), x], axis=-1)
    blocks = [padded[:, :, lags - 1 - k : lags - 1 - k + frames] for k in range(lags)]
    return np.concatenate(blocks, axis=1).transpose(0, 2, 1).reshape(trials * frames, neurons * lags)


def _check_pairs(x_name: str, x: Any, y_name: str, y: Any) -> tuple[np.ndarray, np.ndarray]:
    x = check_trials(x_name, x, min_frames=1)
    y = check_trials(y_name, y, min_frames=1)
    if x.shape[0] != y.shape[0] or x.shape[2] != y.shape[2]:
        raise ValueError(
            f"`{x_name}` {x.shape} and `{y_name}` {y.shape} must share trials and frames: neural (trials, neurons, "
            "frames) and behaviour (trials, channels, frames) at the same frame rate."
        )
    return x, y


class _BaseDecoder:
    def _check_fit(self, train_x, train_y, val_x, val_y):
        train_x, train_y = _check_pairs("train_x", train_x, "train_y", train_y)
        val_x, val_y = _check_pairs("val_x", val_x, "val_y", val_y)
        if train_x.shape[1] != val_x.shape[1] or train_y.shape[1] != val_y.shape[1]:
            raise ValueError(
                f"train and validation disagree on neurons ({train_x.shape[1]} vs {val_x.shape[1]}) or behaviour "
                f"channels ({train_y.shape[1]} vs {val_y.shape[1]}); split one session's trials."
            )
        self.num_neurons_, self.num_channels_ = train_x.shape[1], train_y.shape[1]
        return train_x, train_y, val_x, val_y

    def _check_x(self, x: Any) -> np.ndarray:
        if getattr(self, "num_neurons_", None) is None:
            raise ValueError(f"{type(self).__name__} is not fitted yet; call fit(train_x, train_y, val_x, val_y) first.")
        x = check_trials("x", x, min_frames=1)
        if x.shape[1] != self.num_neurons_:
            raise ValueError(f"x has {x.shape[1]} neurons but the decoder was fitted on {self.num_neurons_}.")
        return x

    def score(self, x: Any, y: Any) -> dict[str, float]:
        """`r2` (channel-averaged) and `mse` of the decoded behaviour."""
        x, y = _check_pairs("x", x, "y", y)
        pred = self.predict(x)
        return {"r2": behavior_r2(pred, y), "mse": mse(pred, y)}


class RidgeGLMDecoder(_BaseDecoder):
    """Linear-Gaussian GLM: ridge regression on `lags` causal lags of all neurons; alpha chosen by validation R^2.

    Args:
        lags (`int`, *optional*, defaults to 4): Causal lags (frames t, t-1, ..., t-lags+1).
        alpha_grid (`tuple[float, ...]`, *optional*): Relative ridge penalties (times the mean Gram eigenvalue);
            default `logspace(-4, 2, 7)`.
    """

    def __init__(self, lags: int = 4, alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID):
        if lags < 1:
            raise ValueError(f"lags must be >= 1, got {lags}.")
        if not alpha_grid or min(alpha_grid) < 0:
            raise ValueError(f"alpha_grid={alpha_grid} must be non-empty with alphas >= 0.")
        self.lags = lags
        self.alpha_grid = tuple(float(a) for a in alpha_grid)
        self.search_log_: dict[str, Any] = {}

    def _gram(self, x: np.ndarray, y: np.ndarray) -> _RidgeGram:
        features = causal_lag_features(x, self.lags)
        targets = y.transpose(0, 2, 1).reshape(-1, y.shape[1])
        return _RidgeGram.from_chunks([(features, targets)])

    def _apply(self, x: np.ndarray, weights: np.ndarray, bias: np.ndarray) -> np.ndarray:
        trials, _, frames = x.shape
        out = causal_lag_features(x, self.lags) @ weights + bias  # (trials * frames, channels)
        return out.reshape(trials, frames, -1).transpose(0, 2, 1)

    def fit(self, train_x: Any, train_y: Any, val_x: Any, val_y: Any) -> RidgeGLMDecoder:
        train_x, train_y, val_x, val_y = self._check_fit(train_x, train_y, val_x, val_y)
        gram = self._gram(train_x, train_y)
        results, best = [], None
        for alpha in self.alpha_grid:
            weights, bias = gram.solve(alpha)
            pred = self._apply(val_x, weights, bias)
            row = {"alpha": alpha, "val_r2": behavior_r2(pred, val_y), "val_mse": mse(pred, val_y)}
            results.append(row)
            if best is None or row["val_r2"] > best[0]["val_r2"]:
                best = (row, weights, bias)
        row, self.weights_, self.bias_ = best
        self.alpha_ = row["alpha"]
        self.search_log_ = {"grid": {"alpha": list(self.alpha_grid)}, "criterion": "val_r2", "results": results,
                            "chosen": {"alpha": self.alpha_}, "best_val_r2": row["val_r2"]}
        return self

    def predict(self, x: Any) -> np.ndarray:
        """Decode `(trials, neurons, frames)` -> `(trials, channels, frames)`."""
        return self._apply(self._check_x(x), self.weights_, self.bias_).astype(np.float32)


class ReducedRankDecoder(RidgeGLMDecoder):
    """Reduced-rank ridge regression on the same causal lag features as `RidgeGLMDecoder`.

    The ridge solution `W` is projected on the top-r right singular directions of the fitted training outputs
    (`W_r = W V_r V_r^T`, `V_r` = top-r eigenvectors of `(X W)^T (X W)`), i.e. behaviour is read out through r latent
    factors. Rank and alpha are chosen jointly by validation R^2; on an exact tie the lower rank wins.

    Args:
        lags (`int`, *optional*, defaults to 4): Causal lags.
        ranks (`tuple[int, ...]`, *optional*): Candidate ranks; default `1..channels`.
        alpha_grid (`tuple[float, ...]`, *optional*): Relative ridge penalties.
    """

    def __init__(self, lags: int = 4, ranks: tuple[int, ...] | None = None,
                 alpha_grid: tuple[float, ...] = DEFAULT_ALPHA_GRID):
        super().__init__(lags, alpha_grid)
        if ranks is not None and (not ranks or min(ranks) < 1):
            raise ValueError(f"ranks={ranks} must be positive integers.")
        self.ranks = None if ranks is None else tuple(int(r) for r in ranks)

    def fit(self, train_x: Any, train_y: Any, val_x: Any, val_y: Any) -> ReducedRankDecoder:
        train_x, train_y, val_x, val_y = self._check_fit(train_x, train_y, val_x, val_y)
        channels = train_y.shape[1]
        ranks = self.ranks or tuple(range(1, channels + 1))
        if max(ranks) > channels:
            raise ValueError(f"ranks={ranks} exceed the {channels} behaviour channels; use ranks <= {channels}.")
        gram = self._gram(train_x, train_y)
        xtx = gram.xtx  # centred X'X
        results, best = [], None
        for alpha in self.alpha_grid:
            weights, _ = gram.solve(alpha)
            fitted_cov = weights.T @ xtx @ weights  # (channels, channels) = (XW)'(XW)
            _, vectors = np.linalg.eigh(fitted_cov)
            vectors = vectors[:, ::-1]  # descending variance
            for rank in sorted(ranks):
                projector = vectors[:, :rank] @ vectors[:, :rank].T
                weights_r = weights @ projector
                bias_r = gram.y_mean - gram.x_mean @ weights_r
                pred = self._apply(val_x, weights_r, bias_r)
                row = {"alpha": alpha, "rank": rank, "val_r2": behavior_r2(pred, val_y), "val_mse": mse(pred, val_y)}
                results.append(row)
                better = best is None or row["val_r2"] > best[0]["val_r2"]
                tie_lower = best is not None and row["val_r2"] == best[0]["val_r2"] and rank < best[0]["rank"]
                if better or tie_lower:
                    best = (row, weights_r, bias_r)
        row, self.weights_, self.bias_ = best
        self.alpha_, self.rank_ = row["alpha"], row["rank"]
        self.search_log_ = {
            "grid": {"alpha": list(self.alpha_grid), "rank": list(ranks)},
            "criterion": "val_r2",
            "results": results,
            "chosen": {"alpha": self.alpha_, "rank": self.rank_},
            "best_val_r2": row["val_r2"],
        }
        return self


class TCNDecoder(_BaseDecoder):
    """Causal TCN decoder (4 layers, kernel 5, hidden 64), MSE on z-scored behaviour, early stopping on validation.

    Behaviour channels are z-scored with training statistics inside the decoder (so channels in different units
    weigh equally in the loss) and mapped back on `predict`. Each learning rate in `learning_rates` gets an equal share
    of `max_seconds`; within a run the epoch with the lowest validation MSE is kept and training stops after
    `patience` epochs without improvement.

    Args:
        hidden_size (`int`, *optional*, defaults to 64), kernel_size (`int`, defaults to 5),
        dilations (`tuple[int, ...]`, defaults to `(1, 2, 4, 8)`): Network size (one layer per dilation).
        learning_rates (`tuple[float, ...]`, *optional*, defaults to `(1e-3,)`): Learning-rate grid.
        max_epochs (`int`, *optional*, defaults to 200), patience (`int`, defaults to 10): Early stopping.
        max_seconds (`float`, *optional*, defaults to 120): Total training budget.
        batch_size (`int`, *optional*, defaults to 16), dropout (`float`, defaults to 0.1),
        weight_decay (`float`, defaults to 1e-4), bf16 (`bool`, defaults to False), device (`str`, defaults to
        `"cpu"`), seed (`int`, defaults to 0).
    """

    def __init__(
        self,
        hidden_size: int = 64,
        kernel_size: int = 5,
        dilations: tuple[int, ...] = (1, 2, 4, 8),
        learning_rates: tuple[float, ...] = (1e-3,),
        max_epochs: int = 200,
        patience: int = 10,
        max_seconds: float = 120.0,
        batch_size: int = 16,
        dropout: float = 0.1,
        weight_decay: float = 1e-4,
        bf16: bool = False,
        device: str = "cpu",
        seed: int = 0,
    ):
        if not learning_rates or min(learning_rates) <= 0:
            raise ValueError(f"learning_rates={learning_rates} must be non-empty and positive.")
        if max_seconds <= 0 or max_epochs < 1 or patience < 1:
            raise ValueError(
                f"max_seconds ({max_seconds}) must be > 0, max_epochs ({max_epochs}) and patience ({patience}) >= 1."
            )
        self.hidden_size, self.kernel_size, self.dilations = hidden_size, kernel_size, tuple(dilations)
        self.learning_rates, self.max_epochs, self.patience = tuple(learning_rates), max_epochs, patience
        self.max_seconds, self.batch_size, self.dropout = max_seconds, batch_size, dropout
        self.weight_decay, self.bf16, self.device, self.seed = weight_decay, bf16, torch.device(device), seed
        self.search_log_: dict[str, Any] = {}

    @torch.no_grad()
    def _forward(self, model: CalmBaselineTCN, x: np.ndarray) -> np.ndarray:
        tensor = torch.as_tensor(x, dtype=torch.float32, device=self.device)
        with autocast_context(self.bf16, self.device):
            out = model(tensor).float().cpu().numpy()
        return out * self.y_std_[None, :, None] + self.y_mean_[None, :, None]

    def fit(self, train_x: Any, train_y: Any, val_x: Any, val_y: Any) -> TCNDecoder:
        train_x, train_y, val_x, val_y = self._check_fit(train_x, train_y, val_x, val_y)
        self.y_mean_ = train_y.mean(axis=(0, 2))
        self.y_std_ = train_y.std(axis=(0, 2)) + 1e-8
        x_t = torch.as_tensor(train_x, dtype=torch.float32, device=self.device)
        y_t = torch.as_tensor((train_y - self.y_mean_[None, :, None]) / self.y_std_[None, :, None],
                              dtype=torch.float32, device=self.device)

        def loss_fn(model, index):
            index = index.to(self.device)
            with autocast_context(self.bf16, self.device):
                pred = model(x_t[index])
            return torch.mean((pred.float() - y_t[index]) ** 2)

        def evaluate(model):
            return -mse(self._forward(model, val_x), val_y)  # higher is better

        def new_model():
            torch.manual_seed(self.seed)
            return CalmBaselineTCN(self.num_neurons_, self.num_channels_, self.hidden_size, self.kernel_size,
                                   self.dilations, self.dropout).to(self.device)

        def score_run(model, run):
            run["val_mse"] = -run["best_score"]
            run["val_r2"] = behavior_r2(self._forward(model, val_x), val_y)

        run, self.learning_rate_, self.model_, results = search_learning_rate(
            new_model, loss_fn, len(train_x), evaluate, self.learning_rates, self.max_seconds, after_run=score_run,
            max_epochs=self.max_epochs, batch_size=self.batch_size, patience=self.patience,
            weight_decay=self.weight_decay, seed=self.seed,
        )
        self.epochs_ = run["best_epoch"]
        self.search_log_ = {
            "grid": {"learning_rate": list(self.learning_rates), "epoch": f"early stopping, patience {self.patience}"},
            "criterion": "val_mse",
            "results": results,
            "chosen": {"learning_rate": self.learning_rate_, "epoch": self.epochs_},
            "best_val_mse": run["val_mse"],
            "best_val_r2": run["val_r2"],
        }
        return self

    def predict(self, x: Any) -> np.ndarray:
        """Decode `(trials, neurons, frames)` -> `(trials, channels, frames)`."""
        return self._forward(self.model_, self._check_x(x)).astype(np.float32)
