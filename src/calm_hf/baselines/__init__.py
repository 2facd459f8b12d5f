"""Baselines CalM has to beat: forecasters (mean, population ridge AR, per-neuron AR, TCN, PatchTST) and
behaviour decoders (ridge GLM, reduced-rank regression, TCN). NeuralForecast models live in
`calm_hf.baselines.neuralforecast_models` and import their optional dependency lazily."""

from .behavior import ReducedRankDecoder, RidgeGLMDecoder, TCNDecoder
from .forecasting import (
    MeanForecaster,
    PerNeuronARForecaster,
    RidgeARForecaster,
    TCNForecaster,
    forecast_score,
)
from .hf_patchtst import PatchTSTForecaster
from .tcn import CalmBaselineTCN

__all__ = [
    "MeanForecaster",
    "RidgeARForecaster",
    "PerNeuronARForecaster",
    "TCNForecaster",
    "PatchTSTForecaster",
    "RidgeGLMDecoder",
    "ReducedRankDecoder",
    "TCNDecoder",
    "CalmBaselineTCN",
    "forecast_score",
]
