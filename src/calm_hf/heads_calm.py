"""The forecast heads of [`CalmForCausalNeuralModeling`] and their losses: the next-token cross-entropy, the
continuous head (the conditional mean of the next frames) with its raw-trace highway (`value_skip_*`), and the quantile
head (bands at `config.quantile_levels`, pinball loss).

[`CalmForecastHeadsMixin`] gives the model these methods the way `generation_calm.py` gives it `generate`; the layers
themselves (`lm_head`, `value_head`, `value_skip`, `quantile_head`) are created in the model's `__init__`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PinballLoss(torch.autograd.Function):
    """The pinball loss averaged over levels, `mean_l e_l (q_l - [e_l < 0])` with `e = targets - offsets`, and its
    gradient with respect to `offsets` (the only input that takes one), in as few passes over the large
    `(..., levels)` tensor as eager PyTorch allows: `sum_l q_l e_l` is a matrix-vector product and `sum_l e_l [e_l < 0]`
    the sum of `min(e, 0)`, written in place over `e`, which the backward pass reads again."""

    @staticmethod
    def forward(ctx, targets: torch.Tensor, offsets: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        # targets (..., 1) and offsets (..., levels) float32 -> (...) the loss of each row
        with torch.autocast(device_type=offsets.device.type, enabled=False):
            error = targets - offsets
            weighted = error @ levels
            negative = error.clamp_(max=0.0)
            loss = (weighted - negative.sum(-1)) / levels.numel()
        ctx.save_for_backward(negative, levels)
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[None, torch.Tensor, None]:
        negative, levels = ctx.saved_tensors
        count = levels.numel()
        # d/d offsets of (q_l - [e_l < 0]) e_l / count, with e = targets - offsets and [e < 0] a constant
        grad_offsets = torch.where(negative < 0, (1.0 - levels) / count, -levels / count)
        return None, grad_offsets.mul_(grad[..., None]), None


class CalmForecastHeadsMixin:
    """Head outputs and losses of a model with `lm_head`, `value_head`, `value_skip` and `quantile_head`."""

    def quantile_offsets(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        """The quantile head's offsets from the point forecast, one set per token window of the horizon:
        `(batch, neurons, kept_steps, value_head_steps, levels)`; None without a quantile head."""
        if self.quantile_head is None:
            return None
        return self.quantile_head(hidden_states).unflatten(-1, (self.config.value_head_steps, -1))

    def predict_quantiles(self, offsets: torch.Tensor | None, value_predictions: torch.Tensor | None
                          ) -> torch.Tensor | None:
        """Quantiles `(batch, neurons, kept_steps, frames, levels)` of the head's frames: the point forecast (which
        this head's loss does not train) plus the offsets of each frame's window, sorted along the levels so they never
        cross (sorted per window, before adding: adding one number to every level keeps their order, so the result is
        the same as sorting the sums, at a window's cost). None without a quantile head (or without a point
        forecast)."""
        if offsets is None or value_predictions is None:
            return None
        windows = offsets.sort(dim=-1).values  # (..., windows, levels): one set per window, broadcast over its frames
        values = value_predictions.detach().unflatten(-1, (windows.shape[-2], -1))  # (..., windows, window_size)
        return (values[..., None] + windows[..., None, :]).flatten(-3, -2)

    def predict_values(self, hidden_states: torch.Tensor, traces: torch.Tensor | None,
                       neuron_identity: torch.Tensor | None = None) -> torch.Tensor | None:
        """The continuous head's forecast `(batch, neurons, kept_steps, value_head_steps * window_size)` from the
        hidden states of the kept steps, plus the raw-trace highway's share (`value_skip_*`) read from `traces`; None
        without a head, or for a model with a highway when no traces are given."""
        if self.value_head is None:
            return None
        value_predictions = self.value_head(hidden_states)
        if self.value_skip is not None:
            if traces is None:
                return None
            value_predictions = value_predictions + self.value_skip_term(traces, hidden_states.shape, neuron_identity)
        return value_predictions

    def value_skip_term(self, traces: torch.Tensor, hidden_shape: torch.Size,
                        neuron_identity: torch.Tensor | None = None) -> torch.Tensor:
        """The highway's share of the head's forecast at each kept step: a linear map of the neuron's own trace over
        the last `value_skip_windows` windows up to that step (zeros before the trial starts) -- the shared map, or
        with `config.identity_highway` each neuron's own map fitted from the highway statistics in its identity."""
        batch_size, num_neurons, kept_steps = hidden_shape[0], hidden_shape[1], hidden_shape[2]
        window, lookback = self.config.window_size, self.config.value_skip_windows
        if traces.ndim != 3 or traces.shape[:2] != (batch_size, num_neurons) or traces.shape[-1] % window:
            raise ValueError(
                f"value_inputs must be the z-scored traces behind input_ids, (batch, neurons, token_steps * "
                f"window_size) with batch={batch_size}, neurons={num_neurons}, window_size={window}; got "
                f"{tuple(traces.shape)}."
            )
        num_steps = traces.shape[-1] // window
        if num_steps < kept_steps:
            raise ValueError(f"value_inputs cover {num_steps} token steps, fewer than the {kept_steps} scored.")
        padded = F.pad(traces.to(self.value_skip.weight.dtype), ((lookback - 1) * window, 0))
        # (batch, neurons, steps, lookback * window): frames [(t - lookback + 1) L, (t + 1) L) for every step t
        history = padded.unfold(-1, lookback * window, window)[:, :, num_steps - kept_steps :]
        if not getattr(self.config, "identity_highway", False) or neuron_identity is None:
            return self.value_skip(history)
        from .identity_calm import config_base_identity_size, highway_weights

        statistics = neuron_identity[..., config_base_identity_size(self.config) :]
        weights = highway_weights(statistics, self.value_skip.weight, self.value_skip.bias,
                                  F.softplus(self.value_skip_prior), window)  # (batch, neurons, lookback + 1, horizon)
        return torch.einsum("bntl,bnlh->bnth", history, weights[:, :, :-1]) + weights[:, :, None, -1]

    def weighted_loss(self, next_token_loss: torch.Tensor | None, value_loss: torch.Tensor | None,
                      quantile_loss: torch.Tensor | None = None) -> torch.Tensor | None:
        """The weighted sum (`*_loss_weight` of the config) of the loss terms given."""
        config = self.config
        terms = [weight * term for weight, term in ((config.next_token_loss_weight, next_token_loss),
                                                    (config.value_loss_weight, value_loss),
                                                    (config.quantile_loss_weight, quantile_loss)) if term is not None]
        return sum(terms) if terms else None

    def next_token_loss(
        self, logits: torch.Tensor, labels: torch.Tensor, neuron_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Cross-entropy of logits at step t against labels at t+1 (float32; -100 and padded neurons ignored).

        Label values are not checked here (that needs a host sync): `validate_inputs` does it where batches enter. A
        batch with no scored target gives a zero loss instead of NaN."""
        if labels.shape != logits.shape[:-1]:
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(logits.shape[:-1])}, got {tuple(labels.shape)}."
            )
        if labels.dtype.is_floating_point or labels.dtype == torch.bool:
            raise TypeError(f"labels must hold integer codes (or -100 to ignore), got dtype {labels.dtype}.")
        if neuron_mask is not None:
            labels = labels.masked_fill(~neuron_mask.to(labels.device).bool()[:, :, None], -100)
        shift_logits = logits[:, :, :-1].float().reshape(-1, self.config.vocab_size)
        shift_labels = labels[:, :, 1:].reshape(-1).to(shift_logits.device)
        total = F.cross_entropy(shift_logits, shift_labels, ignore_index=-100, reduction="sum")
        return total / (shift_labels != -100).sum().clamp_min(1)

    def value_loss(
        self, value_predictions: torch.Tensor | None, value_labels: torch.Tensor, neuron_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """MSE of the continuous head: the prediction made at step t against frames `[(t+1)L, (t+1+K)L)` of the
        trace, over the frames that exist (the tail of each trial has fewer) and real neurons only."""
        if value_predictions is None:
            raise ValueError("value_labels were given but the model has no continuous head (config.value_head_steps=0).")
        batch_size, num_neurons, num_steps, horizon = value_predictions.shape
        window = self.config.window_size
        if value_labels.shape != (batch_size, num_neurons, num_steps * window):
            raise ValueError(
                f"value_labels must be the z-scored traces (batch, neurons, token_steps * window_size) = "
                f"{(batch_size, num_neurons, num_steps * window)}, got {tuple(value_labels.shape)}."
            )
        targets, weight = self._head_targets(value_labels, num_steps, horizon, neuron_mask)
        squared = (value_predictions.float() - targets).pow(2) * weight
        return squared.sum() / weight.sum().clamp_min(1.0)

    def quantile_loss(self, offsets: torch.Tensor, value_predictions: torch.Tensor, value_labels: torch.Tensor,
                      neuron_mask: torch.Tensor | None) -> torch.Tensor:
        """Pinball loss of the quantile head, averaged over levels, real neurons and the frames that exist. Each
        window's offsets are scored at one frame of it, drawn at random per call (an unbiased estimate of the loss over
        all its frames at a quarter of the cost)."""
        num_steps, windows = offsets.shape[2], offsets.shape[3]
        window = self.config.window_size
        horizon = value_predictions.shape[-1]
        targets, weight = self._head_targets(value_labels, num_steps, horizon, neuron_mask)
        picked = torch.arange(windows, device=offsets.device) * window + torch.randint(
            0, window, (windows,), device=offsets.device)
        levels = torch.tensor(self.config.quantile_levels, device=offsets.device)
        # pinball max(q e, (q - 1) e) = e (q - [e < 0]) of e = the target minus each quantile (point forecast plus
        # offset), over (batch, neurons, steps, windows, levels)
        residual = targets[..., picked, None] - value_predictions.detach()[..., picked, None].float()
        pinball = PinballLoss.apply(residual, offsets.float(), levels)
        weight = weight[..., picked]
        return (pinball * weight).sum() / weight.sum().clamp_min(1.0)

    def _head_targets(self, value_labels: torch.Tensor, num_steps: int, horizon: int,
                      neuron_mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """`(targets, weight)` `(batch, neurons, steps, horizon)`: the frames `[(t+1)L, (t+1)L + horizon)` after every
        step t, and 1 where such a frame exists for a real neuron (the tail of each trial has fewer), else 0."""
        window = self.config.window_size
        frames = num_steps * window
        # (steps, horizon) frame index predicted by step t, offset k: (t + 1) * L + k
        target_index = (torch.arange(num_steps, device=value_labels.device)[:, None] + 1) * window + torch.arange(
            horizon, device=value_labels.device
        )
        targets = value_labels.float()[:, :, target_index.clamp_max(frames - 1)]
        weight = (target_index < frames).float().expand(*targets.shape)
        if neuron_mask is not None:
            weight = weight * neuron_mask.float()[:, :, None, None]
        return targets, weight


__all__ = ["CalmForecastHeadsMixin"]
