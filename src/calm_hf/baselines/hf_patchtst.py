"""PatchTST forecasting baseline on transformers' `PatchTSTForPrediction`.

PatchTST is channel-independent: every channel goes through the same patch embedding, encoder and head. We therefore
feed every neuron of every trial as its own univariate series (`num_input_channels=1`, batch = trials * neurons),
which is the same model as one multichannel PatchTST with shared weights, but trains on any neuron count and lets one
model serve several sessions. Direct multi-horizon: one forward predicts all `horizon` frames from the `context`
frames (patch 8, stride 4 -> 9 patches for 40 frames). Instance scaling (`scaling="std"`, RevIN-like) as in the paper.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from transformers import PatchTSTConfig, PatchTSTForPrediction

from ..metrics.functional import mse
from .forecasting import BaseForecaster, check_trials, forecast_score
from .tcn import autocast_context, search_learning_rate

__all__ = ["PatchTSTForecaster"]


class PatchTSTForecaster(BaseForecaster):
    """Channel-independent PatchTST (transformers) trained with MSE on the forecasting protocol.

    Hyperparameter search: each learning rate in `learning_rates` trains for an equal share of `max_seconds`; the
    validation forecast Pearson r is measured every `batches_per_eval` minibatches and the best (learning rate, step)
    weights are kept.

    Args:
        context (`int`, *optional*, defaults to 40): Context frames (`context_length`).
        patch_length (`int`, defaults to 8), patch_stride (`int`, defaults to 4), d_model (`int`, defaults to 128),
        num_hidden_layers (`int`, defaults to 3), num_attention_heads (`int`, defaults to 8), ffn_dim (`int`,
        defaults to 256), dropout (`float`, defaults to 0.1): PatchTST architecture.
        learning_rates (`tuple[float, ...]`, *optional*, defaults to `(1e-3, 3e-4)`): Learning-rate grid.
        max_seconds (`float`, *optional*, defaults to 300): Total training budget, split over the grid.
        max_epochs (`int`, *optional*, defaults to 1000): Cap on evaluation rounds per learning rate.
        batch_size (`int`, *optional*, defaults to 256): Series (neuron-trials) per minibatch.
        batches_per_eval (`int`, *optional*, defaults to 50): Minibatches between validation evaluations.
        max_val_trials (`int`, *optional*, defaults to 64): Validation trials scored per evaluation (speed).
        bf16 (`bool`, defaults to False), device (`str`, defaults to `"cpu"`), seed (`int`, defaults to 0).
    """

    def __init__(
        self,
        context: int = 40,
        patch_length: int = 8,
        patch_stride: int = 4,
        d_model: int = 128,
        num_hidden_layers: int = 3,
        num_attention_heads: int = 8,
        ffn_dim: int = 256,
        dropout: float = 0.1,
        learning_rates: tuple[float, ...] = (1e-3, 3e-4),
        max_seconds: float = 300.0,
        max_epochs: int = 1000,
        batch_size: int = 256,
        batches_per_eval: int = 50,
        max_val_trials: int | None = 64,
        bf16: bool = False,
        device: str = "cpu",
        seed: int = 0,
    ):
        super().__init__(context)
        if patch_length > context:
            raise ValueError(f"patch_length ({patch_length}) must be <= context ({context}).")
        if d_model % num_attention_heads:
            raise ValueError(f"d_model ({d_model}) must be divisible by num_attention_heads ({num_attention_heads}).")
        if not learning_rates or min(learning_rates) <= 0 or max_seconds <= 0:
            raise ValueError(f"learning_rates={learning_rates} must be positive and max_seconds ({max_seconds}) > 0.")
        self.architecture = {
            "patch_length": patch_length,
            "patch_stride": patch_stride,
            "d_model": d_model,
            "num_hidden_layers": num_hidden_layers,
            "num_attention_heads": num_attention_heads,
            "ffn_dim": ffn_dim,
            "attention_dropout": dropout,
            "ff_dropout": dropout,
            "positional_dropout": dropout,
            "head_dropout": dropout,
        }
        self.learning_rates, self.max_seconds, self.max_epochs = tuple(learning_rates), max_seconds, max_epochs
        self.batch_size, self.batches_per_eval, self.max_val_trials = batch_size, batches_per_eval, max_val_trials
        self.bf16, self.device, self.seed = bf16, torch.device(device), seed

    def _new_model(self, horizon: int) -> PatchTSTForPrediction:
        torch.manual_seed(self.seed)
        config = PatchTSTConfig(
            num_input_channels=1,
            context_length=self.context,
            prediction_length=horizon,
            loss="mse",
            scaling="std",
            share_embedding=True,
            channel_attention=False,
            **self.architecture,
        )
        return PatchTSTForPrediction(config).to(self.device)

    @torch.no_grad()
    def _forecast(self, model: PatchTSTForPrediction, context: np.ndarray, chunk: int = 4096) -> np.ndarray:
        trials, neurons, _ = context.shape
        series = torch.as_tensor(context[:, :, -self.context :].reshape(trials * neurons, self.context, 1),
                                 dtype=torch.float32)
        outputs = []
        for start in range(0, len(series), chunk):
            with autocast_context(self.bf16, self.device):
                out = model(past_values=series[start : start + chunk].to(self.device)).prediction_outputs
            outputs.append(out.float().cpu())
        return torch.cat(outputs)[:, :, 0].reshape(trials, neurons, -1).numpy()

    def fit(self, train_trials: Any, val_trials: Any) -> PatchTSTForecaster:
        train, val = self._check_fit_inputs(train_trials, val_trials)
        horizon = train.shape[-1] - self.context
        if self.max_val_trials is not None:
            val = val[: self.max_val_trials]
        val_context, val_future = val[:, :, : self.context], val[:, :, self.context : self.context + horizon]
        # (trials * neurons, frames, 1): one univariate series per neuron-trial
        series = torch.as_tensor(train.reshape(-1, train.shape[-1], 1), dtype=torch.float32)

        def loss_fn(model, index):
            batch = series[index].to(self.device)
            with autocast_context(self.bf16, self.device):
                out = model(past_values=batch[:, : self.context], future_values=batch[:, self.context :])
            return out.loss.float()

        def evaluate(model):
            return forecast_score(self._forecast(model, val_context)[:, :, : val_future.shape[-1]], val_future)

        run, self.learning_rate_, self.model_, results = search_learning_rate(
            lambda: self._new_model(horizon), loss_fn, len(series), evaluate, self.learning_rates, self.max_seconds,
            max_epochs=self.max_epochs, batch_size=self.batch_size, seed=self.seed,
            batches_per_epoch=self.batches_per_eval,
        )
        self.horizon_ = horizon
        self.search_log_ = {
            "grid": {"learning_rate": list(self.learning_rates),
                     "step": f"every {self.batches_per_eval} minibatches of {self.batch_size} series"},
            "criterion": "val_pearson_r (direct forecast from the validation context)",
            "results": results,
            "chosen": {"learning_rate": self.learning_rate_, "evaluation_round": run["best_epoch"]},
            "best_val_pearson_r": run["best_score"],
            "val_mse_at_choice": mse(self._forecast(self.model_, val_context)[:, :, : val_future.shape[-1]],
                                     val_future),
        }
        return self

    def _check_context(self, context: Any, min_frames: int = 1) -> np.ndarray:
        # Channel-independent: any neuron count works, so only the fit and the frame count are checked.
        self._check_fitted()
        return check_trials("context", context, min_frames=min_frames)

    def predict(self, context: Any, horizon: int) -> np.ndarray:
        """Direct forecast of `horizon <= prediction_length` frames from the last `context` frames of `context`."""
        context = self._check_context(context, min_frames=self.context)
        if horizon > self.horizon_:
            raise ValueError(
                f"PatchTST was trained for a horizon of {self.horizon_} frames and predicts them in one shot; "
                f"{horizon} were requested. Refit on longer trials or request <= {self.horizon_}."
            )
        return self._forecast(self.model_, context)[:, :, :horizon].astype(np.float32)
