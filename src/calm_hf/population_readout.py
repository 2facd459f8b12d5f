"""A recording's population readout: the part of its future a linear model across its neurons predicts, solved in
closed form from the recording's own training trials and blended with the network's forecast.

The pretrained network forecasts every neuron mostly from its own past and the identity it reads from the data; the
coupling *between the neurons of one recording* is specific to that recording and needs that recording's data. Given
training trials, `calm_hf.adaptation.fit_population_readout`:

1. fits a population ridge autoregression on every one-step transition of the training trials (order and penalty
   chosen by the rolled-out forecast r on the validation trials, `calm_hf.baselines.RidgeARForecaster`; solved in the
   dual when there are more features than transitions, so thousands of neurons stay cheap);
2. forecasts the validation trials with the network and with the ridge AR, and chooses, for each of a few blocks of
   the horizon, the blend weight `w` in [0, 1] that minimises the validation MSE of `w * network + (1 - w) * ridge`
   (closed form). With few or uninformative trials the validation data set `w` to 1: the network alone.

`CalmForecaster` applies an attached readout to its direct forecasts: the point forecast is blended and the quantile
band and any sampled futures are moved with it (their spread is the network's). `calm adapt` fits one after
fine-tuning and saves it with the adapted checkpoint (`population_readout.safetensors`); the pipeline and
`calm forecast` load it from there. A readout belongs to one recording's neurons, in their order: a context with
another number of neurons is refused.

This file ships with checkpoints for the remote-code pipeline, so it imports only numpy, torch and safetensors.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

READOUT_FILE = "population_readout.safetensors"
DEFAULT_BLOCKS = 4


def frame_blocks(horizon: int, blocks: int, fitted_horizon: int | None = None) -> np.ndarray:
    """`(horizon,)` the block of each forecast frame: `blocks` equal parts of `fitted_horizon` (default `horizon`),
    frames beyond it in the last block. The one partition both fitting and applying a blend use."""
    fitted = max(int(fitted_horizon or horizon), 1)
    return np.minimum(np.arange(horizon) * blocks // fitted, blocks - 1)


def blend_weights(network: np.ndarray, ridge: np.ndarray, truth: np.ndarray, blocks: int) -> np.ndarray:
    """The weight of the network in each of `blocks` equal parts of the horizon (`frame_blocks`): the least-squares
    `w` of `truth ~ w * network + (1 - w) * ridge`, clipped to [0, 1] (1 where the two forecasts agree; a block
    without frames, when there are more blocks than frames, takes the one before it)."""
    index = frame_blocks(truth.shape[-1], blocks)
    weights = np.ones(blocks)
    for block in range(blocks):
        frames = np.flatnonzero(index == block)
        if not len(frames):
            weights[block] = weights[block - 1] if block else 1.0
            continue
        gap = (network[..., frames] - ridge[..., frames]).ravel()
        denominator = float(gap @ gap)
        if denominator > 0:
            weights[block] = np.clip(float(gap @ (truth[..., frames] - ridge[..., frames]).ravel()) / denominator, 0, 1)
    return weights


class PopulationReadout:
    """A fitted population readout of one recording (see the module docstring).

    Attributes:
        weights: `(neurons * lags, neurons)` ridge AR weights (block k of the rows holds lag k, newest first).
        bias: `(neurons,)`.
        lags: AR order.
        network_weight: `(blocks,)` the network's share in each block of `validation_horizon` frames (later frames
            use the last block's).
        validation_horizon: the horizon, in model frames, the blend was chosen on.
        info: what was chosen and the validation scores.
    """

    def __init__(self, weights, bias, lags: int, network_weight, validation_horizon: int, info: dict | None = None):
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        self.bias = torch.as_tensor(np.asarray(bias, dtype=np.float32))
        self.lags = int(lags)
        self.network_weight = torch.as_tensor(np.asarray(network_weight, dtype=np.float32))
        self.validation_horizon = int(validation_horizon)
        self.info = info or {}
        if self.weights.shape != (self.num_neurons * self.lags, self.num_neurons):
            raise ValueError(f"readout weights {tuple(self.weights.shape)} do not match {self.num_neurons} neurons x "
                             f"{self.lags} lags.")

    @property
    def num_neurons(self) -> int:
        return int(self.bias.shape[0])

    def network_weights(self, horizon: int) -> torch.Tensor:
        """`(horizon,)` the network's share at each forecast frame."""
        index = frame_blocks(horizon, len(self.network_weight), self.validation_horizon)
        return self.network_weight[torch.as_tensor(index)]

    def blend(self, network: torch.Tensor, ridge: torch.Tensor) -> torch.Tensor:
        weight = self.network_weights(network.shape[-1]).to(device=network.device, dtype=network.dtype)
        return weight * network + (1 - weight) * ridge.to(network.dtype)

    @torch.no_grad()
    def predict_ridge(self, context: torch.Tensor, horizon: int) -> torch.Tensor:
        """The ridge AR rolled out `horizon` frames after `context` `(batch, neurons, frames)` (on its device)."""
        self.check_neurons(context.shape[1])
        if context.shape[-1] < self.lags:
            raise ValueError(f"the context has {context.shape[-1]} frames; the population readout needs {self.lags}.")
        weights = self.weights.to(device=context.device)
        bias = self.bias.to(device=context.device)
        history = context.float().flip(-1)[..., : self.lags].transpose(1, 2)  # (batch, lags, neurons), newest first
        out = []
        for _ in range(horizon):
            nxt = history.reshape(history.shape[0], -1) @ weights + bias
            out.append(nxt)
            history = torch.cat([nxt[:, None], history[:, :-1]], dim=1)
        return torch.stack(out, dim=-1)

    def check_neurons(self, num_neurons: int) -> None:
        if num_neurons != self.num_neurons:
            raise ValueError(f"this checkpoint's population readout was fitted to a {self.num_neurons}-neuron recording "
                             f"and the context has {num_neurons} neurons: forecast that recording (its neurons in the "
                             "same order), or use the pretrained model (or drop the readout: "
                             "forecaster.population_readout = None).")

    def apply(self, context: torch.Tensor, point: torch.Tensor, quantiles: torch.Tensor | None,
              samples: torch.Tensor | None) -> tuple:
        """Blend a direct forecast `point` `(batch, neurons, horizon)`; quantiles `(..., horizon, levels)` and
        samples `(batch, samples, neurons, horizon)` move with it."""
        ridge = self.predict_ridge(context, point.shape[-1])
        if not torch.isfinite(ridge).all():  # an AR that diverges on this context: the network alone
            return point, quantiles, samples
        blended = self.blend(point, ridge)
        shift = blended - point
        if quantiles is not None:
            quantiles = quantiles + shift[..., None]
        if samples is not None:
            samples = samples + shift[:, None]
        return blended, quantiles, samples

    def save(self, directory: str) -> str:
        from safetensors.torch import save_file

        path = os.path.join(directory, READOUT_FILE)
        metadata = {"lags": str(self.lags), "validation_horizon": str(self.validation_horizon),
                    "info": json.dumps(self.info, default=float)}
        save_file({"weights": self.weights.contiguous(), "bias": self.bias.contiguous(),
                   "network_weight": self.network_weight.contiguous()}, path, metadata=metadata)
        return path

    @classmethod
    def load(cls, directory: str | None) -> PopulationReadout | None:
        """The readout saved in a checkpoint folder, or None when it has none."""
        if directory is None or not os.path.isfile(os.path.join(directory, READOUT_FILE)):
            return None
        from safetensors import safe_open

        with safe_open(os.path.join(directory, READOUT_FILE), framework="pt") as handle:
            metadata = handle.metadata()
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
        return cls(tensors["weights"], tensors["bias"], int(metadata["lags"]), tensors["network_weight"],
                   int(metadata["validation_horizon"]), json.loads(metadata.get("info", "{}")))


__all__ = ["PopulationReadout", "READOUT_FILE", "blend_weights", "frame_blocks"]
