"""A recording's population readout: the part of its future a linear model across its neurons predicts, solved in
closed form from the recording's own training trials and blended with the network's forecast.

The pretrained network forecasts every neuron mostly from its own past and the identity it reads from the data; the
coupling *between the neurons of one recording* is specific to that recording and needs that recording's data. Given
training trials, `calm_hf.adaptation.fit_population_readout`:

1. fits a population ridge autoregression on every one-step transition of the training trials (order and penalty
   chosen by the rolled-out forecast r on the validation trials, `calm_hf.baselines.RidgeARForecaster`; solved in the
   dual when there are more features than transitions, so thousands of neurons stay cheap);
2. fits a per-neuron AR (each neuron from its own history; mode, order and penalty chosen on the validation trials,
   `calm_hf.baselines.PerNeuronARForecaster`), which covers recordings whose neurons are better predicted one by one;
3. forecasts the validation trials with the network and both ARs, and chooses, for each of a few blocks of the
   horizon, the mix (non-negative weights summing to 1) of the three forecasts with the lowest validation MSE
   (exact, by enumerating the active sets). With few or uninformative trials the validation data keep the network
   alone;
4. chooses the forecast's shape: the mix itself, or the network's course over the horizon (its deviations from its
   own mean, times a factor chosen by the validation MSE) around the mix's level. The ARs can lower the error mostly
   through each neuron's level while the network follows its course better; the network's shape is kept only when
   it forecasts the validation trials' course (per-trial r) better by more than its noise;
5. scales the network's quantile band around the mixed forecast, one factor per block, chosen from a grid by the
   validation pinball loss (a better point forecast usually needs a narrower band).

`CalmForecaster` applies an attached readout to its direct forecasts: the point forecast is blended and the quantile
band and any sampled futures are moved with it (their spread is the network's, times the band scale). `calm adapt` fits one after
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


SHAPES = ("mix", "network")


def shape_forecast(network, blended, scale: float = 1.0):
    """`blended`'s mean over the horizon (last axis) plus `scale` times `network`'s deviations from its own mean:
    the network's course at the mix's level (numpy arrays or tensors of one shape)."""
    return blended.mean(-1, keepdims=True) + scale * (network - network.mean(-1, keepdims=True))


def simplex_mix(forecasts: list[np.ndarray], truth: np.ndarray) -> np.ndarray:
    """`(len(forecasts),)` the non-negative weights summing to 1 whose mix of `forecasts` has the least squared error
    to `truth`. Exact: the optimum is the equality-constrained solution on one of the supports (every subset is
    tried; a tie keeps the earlier forecast, so identical forecasts give the first one all the weight)."""
    count = len(forecasts)
    flat = np.stack([np.asarray(f, dtype=np.float64).ravel() for f in forecasts])  # (count, points)
    target = np.asarray(truth, dtype=np.float64).ravel()
    best, best_error = np.eye(count)[0], np.inf
    for support in range(1, 2 ** count):
        members = [i for i in range(count) if support >> i & 1]
        base = flat[members[0]]
        weights = np.zeros(count)
        if len(members) == 1:
            weights[members[0]] = 1.0
        else:  # w_0 = 1 - sum(rest): least squares of (target - base) on (f_i - base)
            design = (flat[members[1:]] - base).T
            rest, *_ = np.linalg.lstsq(design, target - base, rcond=None)
            if (rest < 0).any() or rest.sum() > 1:
                continue
            weights[members[1:]] = rest
            weights[members[0]] = 1.0 - rest.sum()
        error = float(np.sum((weights @ flat - target) ** 2))
        if error < best_error * (1 - 1e-12) - 1e-12:
            best, best_error = weights, error
    return best


def mix_weights(forecasts: list[np.ndarray], truth: np.ndarray, blocks: int) -> np.ndarray:
    """`(blocks, len(forecasts))` the simplex mix (`simplex_mix`) chosen in each of `blocks` equal parts of the horizon
    (`frame_blocks`); a block without frames, when there are more blocks than frames, takes the one before it."""
    index = frame_blocks(truth.shape[-1], blocks)
    weights = np.zeros((blocks, len(forecasts)))
    for block in range(blocks):
        frames = np.flatnonzero(index == block)
        if not len(frames):
            weights[block] = weights[block - 1] if block else np.eye(len(forecasts))[0]
            continue
        weights[block] = simplex_mix([f[..., frames] for f in forecasts], truth[..., frames])
    return weights


def blend_weights(network: np.ndarray, ridge: np.ndarray, truth: np.ndarray, blocks: int) -> np.ndarray:
    """The weight of the network in each of `blocks` equal parts of the horizon when it is mixed with the ridge AR
    alone: the least-squares `w` of `truth ~ w * network + (1 - w) * ridge` in [0, 1] (1 where the two agree)."""
    return mix_weights([network, ridge], truth, blocks)[:, 0]


class PerNeuronTerm:
    """A per-neuron linear forecast: each neuron from its own last `lags` frames, either rolled out one frame at a
    time (`mode="autoregressive"`, `weights` `(neurons, lags, 1)`) or mapped to every horizon frame at once
    (`mode="direct"`, `weights` `(neurons, lags, fitted frames)`; it forecasts no further than that)."""

    MODES = ("autoregressive", "direct")

    def __init__(self, weights, bias, lags: int, mode: str):
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        self.bias = torch.as_tensor(np.asarray(bias, dtype=np.float32))
        self.lags, self.mode = int(lags), str(mode)
        if self.mode not in self.MODES:
            raise ValueError(f"per-neuron term mode must be one of {self.MODES}, got {self.mode!r}.")
        if self.weights.ndim != 3 or self.weights.shape[1] != self.lags or self.bias.shape != (
                self.weights.shape[0], self.weights.shape[2]):
            raise ValueError(f"per-neuron weights {tuple(self.weights.shape)} and bias {tuple(self.bias.shape)} do not "
                             f"match {self.lags} lags.")

    def frames(self, horizon: int) -> int:
        """How many of `horizon` frames this term forecasts."""
        return horizon if self.mode == "autoregressive" else min(horizon, int(self.weights.shape[-1]))

    @torch.no_grad()
    def predict(self, context: torch.Tensor, horizon: int) -> torch.Tensor:
        """`(batch, neurons, frames(horizon))` after `context` `(batch, neurons, >= lags frames)`."""
        weights, bias = self.weights.to(context.device), self.bias.to(context.device)
        history = context.float().flip(-1)[..., : self.lags]  # (batch, neurons, lags), newest first
        if self.mode == "direct":
            return (torch.einsum("bnk,nko->bno", history, weights) + bias)[..., : self.frames(horizon)]
        out = []
        for _ in range(horizon):
            nxt = (history * weights[:, :, 0]).sum(-1) + bias[:, 0]
            out.append(nxt)
            history = torch.cat([nxt[..., None], history[..., :-1]], dim=-1)
        return torch.stack(out, dim=-1)


class PopulationReadout:
    """A fitted population readout of one recording (see the module docstring).

    Attributes:
        weights: `(neurons * lags, neurons)` ridge AR weights (block k of the rows holds lag k, newest first).
        bias: `(neurons,)`.
        lags: AR order.
        mix: `(blocks, 3)` the shares of the network, the ridge AR and the per-neuron AR in each block of
            `validation_horizon` frames (later frames use the last block's). Passing `network_weight` as `(blocks,)`
            means the network and the ridge AR alone.
        per_neuron: the `PerNeuronTerm`, or None.
        band_scale: `(blocks,)` the factor on the network's band (quantiles and samples minus its point forecast)
            in each block; ones by default.
        shape: `"mix"` (the mixed forecast) or `"network"` (the network's deviations from its mean over the horizon,
            times `shape_scale`, around the mixed forecast's mean over the horizon).
        shape_scale: the factor on the network's deviations where `shape="network"`.
        validation_horizon: the horizon, in model frames, the mix was chosen on.
        info: what was chosen and the validation scores.
    """

    def __init__(self, weights, bias, lags: int, network_weight, validation_horizon: int, info: dict | None = None,
                 per_neuron: PerNeuronTerm | None = None, band_scale=None, shape: str = "mix",
                 shape_scale: float = 1.0):
        if shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}.")
        if not (np.isfinite(shape_scale) and shape_scale > 0):
            raise ValueError(f"shape_scale must be a positive number, got {shape_scale!r}.")
        self.shape, self.shape_scale = shape, float(shape_scale)
        self.weights = torch.as_tensor(np.asarray(weights, dtype=np.float32))
        self.bias = torch.as_tensor(np.asarray(bias, dtype=np.float32))
        self.lags = int(lags)
        mix = torch.as_tensor(np.asarray(network_weight, dtype=np.float32))
        if mix.ndim == 1:
            mix = torch.stack([mix, 1 - mix, torch.zeros_like(mix)], dim=-1)
        if mix.ndim != 2 or mix.shape[1] != 3:
            raise ValueError(f"the mix must be (blocks,) or (blocks, 3), got {tuple(mix.shape)}.")
        self.mix = mix
        self.per_neuron = per_neuron
        scale = torch.ones(len(mix)) if band_scale is None else torch.as_tensor(np.asarray(band_scale, np.float32))
        if scale.shape != (len(mix),) or not bool((scale > 0).all()):
            raise ValueError(f"band_scale must be {len(mix)} positive factors (one per block), got {scale.tolist()}.")
        self.band_scale = scale
        if per_neuron is None and bool((mix[:, 2] != 0).any()):
            raise ValueError("the mix gives the per-neuron AR a share but no per-neuron term was given.")
        self.validation_horizon = int(validation_horizon)
        self.info = info or {}
        if self.weights.shape != (self.num_neurons * self.lags, self.num_neurons):
            raise ValueError(f"readout weights {tuple(self.weights.shape)} do not match {self.num_neurons} neurons x "
                             f"{self.lags} lags.")
        if per_neuron is not None and per_neuron.weights.shape[0] != self.num_neurons:
            raise ValueError(f"the per-neuron term has {per_neuron.weights.shape[0]} neurons, the ridge AR "
                             f"{self.num_neurons}.")

    @property
    def num_neurons(self) -> int:
        return int(self.bias.shape[0])

    @property
    def network_weight(self) -> torch.Tensor:
        """`(blocks,)` the network's share in each block."""
        return self.mix[:, 0]

    def frame_mix(self, horizon: int, per_neuron_frames: int | None = None) -> torch.Tensor:
        """`(horizon, 3)` the shares at each forecast frame; frames the per-neuron term does not reach give its share
        to the network."""
        index = frame_blocks(horizon, len(self.mix), self.validation_horizon)
        mix = self.mix[torch.as_tensor(index)].clone()
        if per_neuron_frames is not None and per_neuron_frames < horizon:
            mix[per_neuron_frames:, 0] += mix[per_neuron_frames:, 2]
            mix[per_neuron_frames:, 2] = 0
        return mix

    def band_scales(self, horizon: int) -> torch.Tensor:
        """`(horizon,)` the band's factor at each forecast frame."""
        return self.band_scale[torch.as_tensor(frame_blocks(horizon, len(self.mix), self.validation_horizon))]

    def network_weights(self, horizon: int) -> torch.Tensor:
        """`(horizon,)` the network's share at each forecast frame."""
        return self.frame_mix(horizon)[:, 0]

    def blend(self, network: torch.Tensor, ridge: torch.Tensor | None, per_neuron: torch.Tensor | None = None
              ) -> torch.Tensor:
        """The mixed forecast; `ridge` or `per_neuron` may be None where the mix gives that term no share."""
        reach = 0 if per_neuron is None else per_neuron.shape[-1]
        mix = self.frame_mix(network.shape[-1], reach).to(device=network.device, dtype=network.dtype)
        blended = mix[:, 0] * network
        if ridge is not None:
            blended = blended + mix[:, 1] * ridge.to(network.dtype)
        if reach:
            blended[..., :reach] += mix[:reach, 2] * per_neuron.to(network.dtype)
        return blended

    def shaped(self, network: torch.Tensor, blended: torch.Tensor) -> torch.Tensor:
        """The readout's point forecast from the network's and the mixed forecast `(..., horizon)` (`shape`)."""
        return shape_forecast(network, blended, self.shape_scale) if self.shape == "network" else blended

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

    def predict_per_neuron(self, context: torch.Tensor, horizon: int) -> torch.Tensor | None:
        """The per-neuron term's forecast (up to `horizon` frames), or None when the mix never uses it."""
        if self.per_neuron is None or not bool((self.mix[:, 2] > 0).any()):
            return None
        if context.shape[-1] < self.per_neuron.lags:
            raise ValueError(f"the context has {context.shape[-1]} frames; the population readout's per-neuron term "
                             f"needs {self.per_neuron.lags}.")
        return self.per_neuron.predict(context, horizon)

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
        self.check_neurons(context.shape[1])
        # each AR is rolled out only where the mix gives it a share (a streaming forecast calls this every frame)
        ridge = self.predict_ridge(context, point.shape[-1]) if bool((self.mix[:, 1] > 0).any()) else None
        per_neuron = self.predict_per_neuron(context, point.shape[-1])
        if any(term is not None and not torch.isfinite(term).all() for term in (ridge, per_neuron)):
            return point, quantiles, samples  # an AR that diverges on this context: the network alone
        blended = self.shaped(point, self.blend(point, ridge, per_neuron))
        scale = self.band_scales(point.shape[-1]).to(device=point.device, dtype=point.dtype)
        if quantiles is not None:
            quantiles = blended[..., None] + scale[:, None] * (quantiles - point[..., None])
        if samples is not None:
            samples = blended[:, None] + scale * (samples - point[:, None])
        return blended, quantiles, samples

    def save(self, directory: str) -> str:
        from safetensors.torch import save_file

        path = os.path.join(directory, READOUT_FILE)
        metadata = {"lags": str(self.lags), "validation_horizon": str(self.validation_horizon),
                    "shape": self.shape, "shape_scale": repr(self.shape_scale),
                    "info": json.dumps(self.info, default=float)}
        tensors = {"weights": self.weights.contiguous(), "bias": self.bias.contiguous(), "mix": self.mix.contiguous(),
                   "band_scale": self.band_scale.contiguous()}
        if self.per_neuron is not None:
            metadata.update(per_neuron_lags=str(self.per_neuron.lags), per_neuron_mode=self.per_neuron.mode)
            tensors.update(per_neuron_weights=self.per_neuron.weights.contiguous(),
                           per_neuron_bias=self.per_neuron.bias.contiguous())
        save_file(tensors, path, metadata=metadata)
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
        per_neuron = None
        if "per_neuron_weights" in tensors:
            per_neuron = PerNeuronTerm(tensors["per_neuron_weights"], tensors["per_neuron_bias"],
                                       int(metadata["per_neuron_lags"]), metadata["per_neuron_mode"])
        mix = tensors["mix"] if "mix" in tensors else tensors["network_weight"]  # a file with the network's share only
        return cls(tensors["weights"], tensors["bias"], int(metadata["lags"]), mix,
                   int(metadata["validation_horizon"]), json.loads(metadata.get("info", "{}")), per_neuron,
                   tensors.get("band_scale"), metadata.get("shape", "mix"), float(metadata.get("shape_scale", 1.0)))


__all__ = ["PerNeuronTerm", "PopulationReadout", "READOUT_FILE", "SHAPES", "blend_weights", "frame_blocks",
           "mix_weights", "shape_forecast", "simplex_mix"]
