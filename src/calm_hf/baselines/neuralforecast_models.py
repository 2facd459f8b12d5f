"""PatchTST and iTransformer through Nixtla's NeuralForecast (the library the DESIGN's 0.28 / 0.26 numbers used).

NeuralForecast is an optional dependency (it pulls in pytorch-lightning, ray[tune], optuna, pandas, ...): install
it with `pip install calm_hf[bench]`. It is imported lazily, so importing this module never fails; constructing a
forecaster without it raises an ImportError that says how to install it.

Data layout (NeuralForecast wants a long data frame with `unique_id`, `ds`, `y`):
- `NeuralForecastPatchTST` (univariate, channel-independent): one series per (trial, neuron) of `context + horizon`
  frames, so the only training window of a series is exactly the protocol's (first `context` frames -> the rest).
- `NeuralForecastITransformer` (multivariate over neurons, `n_series = neurons`): one series per neuron with the
  training trials concatenated in time, and `step_size = frames = input_size + h`, so every training window is exactly
  one trial (no window straddles two trials). Forecasts are made one trial at a time.

Both search a small learning-rate grid on the validation trials by forecast Pearson r (`search_log_`), with training
bounded by `max_steps` and Lightning's `max_time`.
"""

from __future__ import annotations

import datetime
import importlib
from typing import Any

import numpy as np

from ..metrics.functional import mse
from .forecasting import BaseForecaster, check_trials, forecast_score

__all__ = ["NeuralForecastPatchTST", "NeuralForecastITransformer", "require_neuralforecast"]

_INSTALL_HINT = (
    "NeuralForecast is not installed. Install the benchmark extras with `pip install calm_hf[bench]` "
    "(or `pip install neuralforecast==3.3.0`) to use the NeuralForecast PatchTST/iTransformer baselines; "
    "the transformers-based `calm_hf.baselines.PatchTSTForecaster` needs no extra dependency."
)


def require_neuralforecast():
    """Import `neuralforecast` (and pandas) or raise an ImportError naming the install command."""
    try:
        neuralforecast = importlib.import_module("neuralforecast")
        models = importlib.import_module("neuralforecast.models")
        pandas = importlib.import_module("pandas")
    except ImportError as error:
        raise ImportError(_INSTALL_HINT) from error
    return neuralforecast, models, pandas


class _NeuralForecastBase(BaseForecaster):
    model_name = ""

    def __init__(
        self,
        context: int = 40,
        learning_rates: tuple[float, ...] = (1e-3, 3e-4),
        max_steps: int = 1000,
        max_seconds: float = 300.0,
        batch_size: int = 32,
        accelerator: str = "cpu",
        seed: int = 1,
        model_kwargs: dict | None = None,
    ):
        super().__init__(context)
        self._nf, self._models, self._pd = require_neuralforecast()
        if not learning_rates or min(learning_rates) <= 0 or max_seconds <= 0 or max_steps < 1:
            raise ValueError(
                f"learning_rates={learning_rates} must be positive, max_steps ({max_steps}) >= 1, max_seconds "
                f"({max_seconds}) > 0."
            )
        self.learning_rates, self.max_steps, self.max_seconds = tuple(learning_rates), max_steps, max_seconds
        self.batch_size, self.accelerator, self.seed = batch_size, accelerator, seed
        self.model_kwargs = dict(model_kwargs or {})

    def _trainer_kwargs(self) -> dict:
        return {
            "accelerator": self.accelerator,
            "max_time": datetime.timedelta(seconds=self.max_seconds / len(self.learning_rates)),
            "enable_progress_bar": False,
            "logger": False,
            "enable_checkpointing": False,
        }

    def _predictions(self, frame, trials: int, neurons: int, horizon: int) -> np.ndarray:
        if "unique_id" not in frame.columns:
            frame = frame.reset_index()
        frame = frame.sort_values(["unique_id", "ds"])
        values = frame[self.model_alias].to_numpy(dtype=np.float64)
        return self._reshape_predictions(values, trials, neurons, horizon)

    @property
    def model_alias(self) -> str:
        return self.model_name

    def fit(self, train_trials: Any, val_trials: Any):
        train, val = self._check_fit_inputs(train_trials, val_trials)
        self.horizon_ = train.shape[-1] - self.context
        val_context, val_future = val[:, :, : self.context], val[:, :, self.context : self.context + self.horizon_]
        results, best = [], None
        for lr in self.learning_rates:
            forecaster = self._nf.NeuralForecast(models=[self._build(lr, train.shape[1])], freq=1)
            forecaster.fit(df=self._train_frame(train))
            pred = self._predict_with(forecaster, val_context)[:, :, : val_future.shape[-1]]
            row = {"learning_rate": lr, "val_pearson_r": forecast_score(pred, val_future),
                   "val_mse": mse(pred, val_future)}
            results.append(row)
            if best is None or row["val_pearson_r"] > best[0]["val_pearson_r"]:
                best = (row, forecaster)
        row, self.forecaster_ = best
        self.learning_rate_ = row["learning_rate"]
        self.search_log_ = {
            "grid": {"learning_rate": list(self.learning_rates)},
            "criterion": "val_pearson_r",
            "results": results,
            "chosen": {"learning_rate": self.learning_rate_},
            "budget": {"max_steps": self.max_steps, "max_seconds_per_lr": self.max_seconds / len(self.learning_rates)},
        }
        return self

    def predict(self, context: Any, horizon: int) -> np.ndarray:
        context = self._check_context(context, min_frames=self.context)
        if horizon > self.horizon_:
            raise ValueError(f"{self.model_name} was trained for a horizon of {self.horizon_}; {horizon} requested.")
        return self._predict_with(self.forecaster_, context[:, :, -self.context :])[:, :, :horizon].astype(np.float32)


class NeuralForecastPatchTST(_NeuralForecastBase):
    """NeuralForecast `PatchTST` (univariate, one series per neuron-trial); see the module docstring.

    Args:
        context (`int`, defaults to 40), learning_rates (`tuple[float, ...]`, defaults to `(1e-3, 3e-4)`),
        max_steps (`int`, defaults to 1000), max_seconds (`float`, defaults to 300, split over the grid),
        batch_size (`int`, defaults to 32), accelerator (`str`, defaults to `"cpu"`), seed (`int`, defaults to 1),
        model_kwargs (`dict`, *optional*): extra `neuralforecast.models.PatchTST` arguments (defaults: patch 8,
            stride 4, hidden 128, 3 layers, 8 heads, RevIN).
    """

    model_name = "PatchTST"

    def _build(self, learning_rate: float, neurons: int):
        kwargs = {"patch_len": 8, "stride": 4, "hidden_size": 128, "encoder_layers": 3, "n_heads": 8,
                  "linear_hidden_size": 256, "revin": True, **self.model_kwargs}
        from neuralforecast.losses.pytorch import MSE

        return self._models.PatchTST(
            h=self.horizon_, input_size=self.context, loss=MSE(), learning_rate=learning_rate,
            max_steps=self.max_steps, batch_size=self.batch_size, windows_batch_size=self.batch_size,
            random_seed=self.seed, **kwargs, **self._trainer_kwargs(),
        )

    def _long_frame(self, trials: np.ndarray):
        count, neurons, frames = trials.shape
        ids = np.repeat(np.arange(count * neurons), frames)  # unique_id = trial * neurons + neuron
        ds = np.tile(np.arange(frames), count * neurons)
        return self._pd.DataFrame({"unique_id": ids, "ds": ds, "y": trials.reshape(-1).astype(np.float32)})

    def _train_frame(self, train: np.ndarray):
        return self._long_frame(train[:, :, : self.context + self.horizon_])

    def _predict_with(self, forecaster, context: np.ndarray) -> np.ndarray:
        frame = forecaster.predict(df=self._long_frame(context))
        return self._predictions(frame, context.shape[0], context.shape[1], self.horizon_)

    def _reshape_predictions(self, values, trials, neurons, horizon):
        return values.reshape(trials, neurons, horizon)  # unique_id order = trial-major, then neuron

    def _check_context(self, context: Any, min_frames: int = 1) -> np.ndarray:
        self._check_fitted()
        return check_trials("context", context, min_frames=min_frames)  # channel-independent: any neuron count


class NeuralForecastITransformer(_NeuralForecastBase):
    """NeuralForecast `iTransformer` (multivariate over the session's neurons); see the module docstring.

    Args: as `NeuralForecastPatchTST`; `model_kwargs` go to `neuralforecast.models.iTransformer` (defaults: hidden
    128, 8 heads, 2 encoder layers, FFN 256).
    """

    model_name = "iTransformer"

    def _build(self, learning_rate: float, neurons: int):
        kwargs = {"hidden_size": 128, "n_heads": 8, "e_layers": 2, "d_ff": 256, **self.model_kwargs}
        from neuralforecast.losses.pytorch import MSE

        return self._models.iTransformer(
            h=self.horizon_, input_size=self.context, n_series=neurons, loss=MSE(), learning_rate=learning_rate,
            max_steps=self.max_steps, batch_size=self.batch_size, step_size=self.context + self.horizon_,
            random_seed=self.seed, **kwargs, **self._trainer_kwargs(),
        )

    def _concatenated_frame(self, trials: np.ndarray):
        count, neurons, frames = trials.shape
        values = trials.transpose(1, 0, 2).reshape(neurons, count * frames)  # each neuron: trials back to back
        return self._pd.DataFrame({
            "unique_id": np.repeat(np.arange(neurons), count * frames),
            "ds": np.tile(np.arange(count * frames), neurons),
            "y": values.reshape(-1).astype(np.float32),
        })

    def _train_frame(self, train: np.ndarray):
        return self._concatenated_frame(train[:, :, : self.context + self.horizon_])

    def _predict_with(self, forecaster, context: np.ndarray) -> np.ndarray:
        out = np.empty(context.shape[:2] + (self.horizon_,))
        for trial in range(context.shape[0]):  # one trial at a time: the model is multivariate over neurons
            frame = forecaster.predict(df=self._concatenated_frame(context[trial : trial + 1]))
            out[trial] = self._predictions(frame, 1, context.shape[1], self.horizon_)[0]
        return out

    def _reshape_predictions(self, values, trials, neurons, horizon):
        return values.reshape(trials, neurons, horizon)
