"""Causal temporal convolutional network shared by `TCNForecaster` and `TCNDecoder`.

`CalmBaselineTCN` maps `(batch, in_channels, frames)` to `(batch, out_channels, frames)` where output frame `t`
depends only on input frames `<= t`. Each layer is a pre-norm residual block
`h = h + GELU(dilated_causal_conv(LayerNorm(h)))`; the LayerNorm acts over channels at each frame, so the block stays
causal. `stream` runs the same network one frame at a time with per-layer buffers (WaveNet-style fast generation),
which makes autoregressive rollouts cost one frame of compute per step instead of a full forward.

Also here: `train_sequence_model`, the bounded-time Adam loop both TCN baselines use, with an evaluation callback that
implements early stopping / epoch selection on the validation split.
"""

from __future__ import annotations

import contextlib
import copy
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CalmBaselineTCN", "TCNStreamState", "autocast_context", "search_learning_rate", "train_sequence_model"]


class CalmBaselineTCNLayer(nn.Module):
    """Pre-norm residual block with one dilated causal convolution."""

    def __init__(self, hidden_size: int, kernel_size: int, dilation: int, dropout: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size)
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, dilation=dilation)
        self.dropout = nn.Dropout(dropout)
        self.kernel_size = kernel_size
        self.dilation = dilation

    @property
    def history(self) -> int:
        """Past frames one output frame needs besides the current one."""
        return (self.kernel_size - 1) * self.dilation

    def normalize(self, hidden: torch.Tensor) -> torch.Tensor:
        # (batch, hidden, frames) -> LayerNorm over hidden at each frame -> (batch, hidden, frames)
        return self.norm(hidden.transpose(1, 2)).transpose(1, 2)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        normed = F.pad(self.normalize(hidden), (self.history, 0))  # left pad only: causal
        return hidden + self.dropout(F.gelu(self.conv(normed)))


class TCNStreamState:
    """Per-layer buffers of normalised inputs for `CalmBaselineTCN.stream` (the last `history` frames)."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.buffers = buffers


class CalmBaselineTCN(nn.Module):
    """Causal dilated TCN.

    Args:
        in_channels (`int`): Input channels (neurons of a session).
        out_channels (`int`): Output channels (neurons for forecasting, behaviour channels for decoding).
        hidden_size (`int`, *optional*, defaults to 256): Channels of every residual block.
        kernel_size (`int`, *optional*, defaults to 5): Convolution kernel size.
        dilations (`tuple[int, ...]`, *optional*, defaults to `(1, 2, 4, 8, 16)`): One residual block per dilation.
        dropout (`float`, *optional*, defaults to 0.0): Dropout on every block's output.
        residual_input (`bool`, *optional*, defaults to False): Add the input to the output (requires
            `in_channels == out_channels`); the forecaster uses it so the network predicts the next-frame change.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        hidden_size: int = 256,
        kernel_size: int = 5,
        dilations: tuple[int, ...] = (1, 2, 4, 8, 16),
        dropout: float = 0.0,
        residual_input: bool = False,
    ):
        super().__init__()
        if residual_input and in_channels != out_channels:
            raise ValueError(
                f"residual_input=True needs in_channels == out_channels, got {in_channels} and {out_channels}; "
                "set residual_input=False."
            )
        if kernel_size < 1 or any(d < 1 for d in dilations) or len(dilations) == 0:
            raise ValueError(
                f"kernel_size ({kernel_size}) and every dilation ({dilations}) must be >= 1, with at least one layer."
            )
        self.input_projection = nn.Conv1d(in_channels, hidden_size, 1)
        self.layers = nn.ModuleList(CalmBaselineTCNLayer(hidden_size, kernel_size, d, dropout) for d in dilations)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.output_projection = nn.Conv1d(hidden_size, out_channels, 1)
        self.residual_input = residual_input
        # Start as a near-identity / near-zero map: the residual forecaster then begins at persistence.
        nn.init.zeros_(self.output_projection.bias)
        nn.init.normal_(self.output_projection.weight, std=0.02 / math.sqrt(hidden_size))

    @property
    def receptive_field(self) -> int:
        return 1 + sum(layer.history for layer in self.layers)

    def _head(self, hidden: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        out = self.output_projection(self.output_norm(hidden.transpose(1, 2)).transpose(1, 2))
        return out + inputs if self.residual_input else out

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """
        Args:
            inputs (`torch.Tensor` of shape `(batch, in_channels, frames)`): Input traces.

        Returns:
            `torch.Tensor` of shape `(batch, out_channels, frames)`: output frame t sees input frames <= t only.
        """
        hidden = self.input_projection(inputs)  # (batch, hidden, frames)
        for layer in self.layers:
            hidden = layer(hidden)
        return self._head(hidden, inputs)

    @torch.no_grad()
    def prefill(self, inputs: torch.Tensor) -> tuple[torch.Tensor, TCNStreamState]:
        """Run the full causal forward over a context and keep the buffers `stream` needs.

        Returns the output at the last context frame `(batch, out_channels)` and the stream state.
        """
        hidden = self.input_projection(inputs)
        buffers = []
        for layer in self.layers:
            normed = layer.normalize(hidden)
            # keep the last `history` normalised frames (left-padded with zeros like the causal conv)
            buffers.append(F.pad(normed, (layer.history, 0))[:, :, normed.shape[-1] :])
            hidden = hidden + layer.dropout(F.gelu(layer.conv(F.pad(normed, (layer.history, 0)))))
        return self._head(hidden, inputs)[:, :, -1], TCNStreamState(buffers)

    @torch.no_grad()
    def stream(self, frame: torch.Tensor, state: TCNStreamState) -> torch.Tensor:
        """Advance by one input frame `(batch, in_channels)`; return the new output frame `(batch, out_channels)`.

        Equal to the last frame of `forward` on the whole sequence seen so far (tested), at one frame of cost.
        """
        inputs = frame[:, :, None]
        hidden = self.input_projection(inputs)  # (batch, hidden, 1)
        for index, layer in enumerate(self.layers):
            normed = layer.normalize(hidden)
            window = torch.cat([state.buffers[index], normed], dim=-1)  # (batch, hidden, history + 1)
            state.buffers[index] = window[:, :, 1:]
            hidden = hidden + layer.dropout(F.gelu(layer.conv(window)))
        return self._head(hidden, inputs)[:, :, -1]


def autocast_context(bf16: bool, device: torch.device | str = "cpu"):
    """bf16 autocast on the given device when `bf16` is True, else a no-op.

    Only worth it where bf16 matmuls are native (CPUs with AMX / AVX512-BF16, GPUs). On a CPU without them, PyTorch
    emulates bf16 and it is far slower: measured here on an AMD EPYC without avx512_bf16, a 1584x1280x256 matmul ran
    at 0.5 GFLOP/s in bf16 vs 35 GFLOP/s in fp32, and a TCN training step was ~15x slower.
    """
    if not bf16:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)


def _train_epoch(model: nn.Module, loss_fn, optimizer, order: torch.Tensor, batch_size: int,
                 batches_per_epoch: int | None, grad_clip: float, deadline: float) -> tuple[float, bool]:
    """One pass over `order` in minibatches: (mean training loss, whether the wall-clock `deadline` was hit)."""
    model.train()
    losses = []
    starts = list(range(0, len(order), batch_size))
    if batches_per_epoch is not None:
        starts = starts[:batches_per_epoch]
    for start_index in starts:
        loss = loss_fn(model, order[start_index : start_index + batch_size])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        losses.append(float(loss.detach()))
        if time.perf_counter() > deadline:
            return float(sum(losses) / max(len(losses), 1)), True
    return float(sum(losses) / max(len(losses), 1)), False


def train_sequence_model(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    num_train_items: int,
    evaluate: Callable[[nn.Module], float],
    learning_rate: float,
    max_epochs: int,
    max_seconds: float,
    batch_size: int = 32,
    eval_epochs: tuple[int, ...] | None = None,
    patience: int | None = None,
    weight_decay: float = 0.0,
    grad_clip: float = 1.0,
    seed: int = 0,
    batches_per_epoch: int | None = None,
) -> dict:
    """Adam training with validation-based epoch selection, bounded in wall-clock time.

    Args:
        model: the network (modified in place; on return it holds the best validated weights).
        loss_fn: `loss_fn(model, batch_indices)` -> scalar training loss on those training items.
        num_train_items: number of training items (batches are random permutations of `range(num_train_items)`).
        evaluate: `evaluate(model)` -> validation score, HIGHER is better (the model is in eval mode during it).
        eval_epochs: epochs after which to evaluate (default: every epoch). The best-scoring epoch is kept.
        patience: stop after this many evaluations without improvement (None: never stop early).
        max_seconds: wall-clock budget for training and evaluation together; a final evaluation always runs.
        batches_per_epoch: cap an "epoch" at this many minibatches (for large item counts, so that validation
            happens often enough); None = a full pass over the training items.

    Returns:
        `dict` with `best_score`, `best_epoch`, `epochs_run`, `seconds`, `history` (list of `(epoch, score,
        train_loss)`) and `stopped` (`"max_epochs"`, `"patience"` or `"max_seconds"`).
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    start = time.perf_counter()
    best_score, best_epoch, best_state = -math.inf, 0, copy.deepcopy(model.state_dict())
    history: list[tuple[int, float, float]] = []
    stale, stopped, epoch = 0, "max_epochs", 0
    eval_set = set(eval_epochs) if eval_epochs is not None else None
    for epoch in range(1, max_epochs + 1):
        order = torch.randperm(num_train_items, generator=generator)
        train_loss, out_of_time = _train_epoch(model, loss_fn, optimizer, order, batch_size, batches_per_epoch,
                                               grad_clip, deadline=start + max_seconds)
        is_last = epoch == max_epochs or out_of_time
        if eval_set is None or epoch in eval_set or is_last:
            model.eval()
            score = float(evaluate(model))
            history.append((epoch, score, train_loss))
            if math.isfinite(score) and score > best_score:
                best_score, best_epoch, stale = score, epoch, 0
                best_state = copy.deepcopy(model.state_dict())
            else:
                stale += 1
            if patience is not None and stale >= patience:
                stopped = "patience"
                break
        if out_of_time:
            stopped = "max_seconds"
            break
    model.load_state_dict(best_state)
    model.eval()
    return {
        "best_score": best_score,
        "best_epoch": best_epoch,
        "epochs_run": epoch,
        "seconds": time.perf_counter() - start,
        "history": history,
        "stopped": stopped,
    }


def search_learning_rate(
    new_model: Callable[[], nn.Module],
    loss_fn: Callable[[nn.Module, torch.Tensor], torch.Tensor],
    num_train_items: int,
    evaluate: Callable[[nn.Module], float],
    learning_rates: Sequence[float],
    max_seconds: float,
    after_run: Callable[[nn.Module, dict], None] | None = None,
    **train_kwargs: Any,
) -> tuple[dict, float, nn.Module, list[dict]]:
    """One `train_sequence_model` run per learning rate, each on a fresh `new_model()` with an equal share of
    `max_seconds`; the run with the best validation score wins. `after_run(model, run)` may add fields to a run's
    record before it is logged. `train_kwargs` go to `train_sequence_model`.

    Returns:
        `(best run, its learning rate, its model, [{"learning_rate": lr, **run} for every run])`.
    """
    results, best = [], None
    for learning_rate in learning_rates:
        model = new_model()
        run = train_sequence_model(
            model, loss_fn, num_train_items, evaluate, learning_rate=learning_rate,
            max_seconds=max_seconds / len(learning_rates), **train_kwargs,
        )
        if after_run is not None:
            after_run(model, run)
        results.append({"learning_rate": learning_rate, **run})
        if best is None or run["best_score"] > best[0]["best_score"]:
            best = (run, learning_rate, model)
    return (*best, results)
