"""Behaviour decoding from the (by default frozen) CalM dual-axis transformer: [`CalmForBehaviorRegression`] with a
linear low-rank or a GLU readout on the backbone's hidden states, smoothed by a causal depthwise conv.

A head is a module `(hidden_states (batch, neurons, steps, hidden), neuron_ids, neuron_weight) -> (batch, steps,
num_behavior_channels * window_size)` with a `neuron_weights` bank indexed by global neuron id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init
from transformers.utils import ModelOutput
from transformers.utils.generic import can_return_tuple

from .configuration_calm import CalmConfig
from .modeling_calm import CalmModel, CalmModelOutput, CalmPreTrainedModel
from .sessions_calm import as_id_tensor
from .validation_calm import check_identity_values, identity_inputs, validate_inputs


# Behaviour-head settings: typed CalmConfig fields (their defaults and checks live there). They can also be passed
# as keyword arguments: `CalmForBehaviorRegression(config, num_behavior_channels=2)` or
# `CalmForBehaviorRegression.from_pretrained(causal_checkpoint, num_behavior_channels=2, behavior_head="glu")`.
BEHAVIOR_HEAD_SETTINGS = (
    "behavior_head", "num_behavior_channels", "behavior_rank", "behavior_dropout", "behavior_smoothing_kernel",
    "freeze_backbone",
)
# read from CalmConfig's field defaults, not a second copy of them
BEHAVIOR_HEAD_DEFAULTS: dict[str, Any] = {
    name: CalmConfig.__dataclass_fields__[name].default for name in BEHAVIOR_HEAD_SETTINGS
}


@dataclass
class CalmBehaviorRegressionOutput(ModelOutput):
    """
    Output of [`CalmForBehaviorRegression`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Mean squared error over the scored (finite, `behavior_mask`) label entries; returned with `labels`.
        predictions (`torch.FloatTensor` of shape `(batch, num_behavior_channels, token_steps * window_size)`):
            Decoded behaviour at frame rate.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Backbone hidden states `(batch, neurons, token_steps, hidden_size)` (embedding output and every layer),
            returned with `output_hidden_states=True`.
    """

    loss: torch.FloatTensor | None = None
    predictions: torch.FloatTensor | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


def behavior_head_settings(config: CalmConfig) -> dict[str, Any]:
    """The head settings of `config` (`BEHAVIOR_HEAD_SETTINGS`; `CalmConfig` validates their values).

    Raises:
        `ValueError` when a setting is out of range (e.g. set by a `from_pretrained` keyword after construction) or
        `num_behavior_channels` is not set: a head needs the number of behaviour channels.
    """
    config.raise_if_invalid()
    if config.num_behavior_channels is None:
        raise ValueError(
            "num_behavior_channels is not set; pass the number of behaviour channels M, e.g. "
            "CalmForBehaviorRegression.from_pretrained(path, num_behavior_channels=2)."
        )
    return {name: getattr(config, name) for name in BEHAVIOR_HEAD_SETTINGS}


def config_with_head_settings(config: CalmConfig, **head_kwargs: Any) -> CalmConfig:
    """A copy of `config` with behaviour-head settings overridden (and validated by `CalmConfig`); `config` itself is
    left unchanged. Without overrides, `config` is returned as it is."""
    unknown = sorted(set(head_kwargs) - set(BEHAVIOR_HEAD_SETTINGS))
    if unknown:
        raise ValueError(
            f"Unknown CalmForBehaviorRegression arguments {unknown}; head settings are {sorted(BEHAVIOR_HEAD_SETTINGS)}."
        )
    if not head_kwargs:
        return config
    return type(config).from_dict({**config.to_dict(), **head_kwargs})


class CalmBehaviorLinearHead(nn.Module):
    """Linear low-rank readout `y[t, o] = sum_n sum_r (h[n, t] . B1[o, r]) * B2[neuron_id[n], o, r] + b[o]`.

    `B1` `(outputs, rank, hidden)` is shared by all neurons; `B2` (`neuron_weights`, `(num_neurons, outputs, rank)`)
    is a global bank indexed by neuron id; `outputs = num_behavior_channels * window_size` (one value per frame of a
    token step).
    """

    def __init__(self, config: CalmConfig, num_outputs: int, rank: int) -> None:
        super().__init__()
        self.num_outputs, self.rank = num_outputs, rank
        # B1 as one (hidden -> outputs*rank) matmul
        self.readout = nn.Linear(config.hidden_size, num_outputs * rank, bias=False)
        self.neuron_weights = nn.Parameter(torch.zeros(config.num_neurons, num_outputs, rank))
        self.bias = nn.Parameter(torch.zeros(num_outputs))

    def forward(self, hidden_states: torch.Tensor, neuron_ids: torch.Tensor, neuron_weight: torch.Tensor) -> torch.Tensor:
        # hidden_states (batch, neurons, steps, hidden); neuron_weight (batch, neurons): 1 real, 0 padding
        projected = self.readout(hidden_states)  # (batch, neurons, steps, outputs*rank)
        weights = self.neuron_weights[neuron_ids].flatten(2) * neuron_weight[:, :, None]  # (batch, neurons, outputs*rank)
        out = torch.einsum("bntk,bnk->btk", projected, weights.to(projected.dtype))
        out = out.unflatten(-1, (self.num_outputs, self.rank)).sum(-1)  # (batch, steps, outputs)
        return out + self.bias


class CalmBehaviorGLUHead(nn.Module):
    """GLU readout: per neuron `z = dropout((h W3) * GELU(h W4))` `(outputs,)`, weighted by a global neuron-weight
    bank `w[neuron_id]` (`neuron_weights`, `(num_neurons, outputs)`) and summed over real neurons, plus a bias."""

    def __init__(self, config: CalmConfig, num_outputs: int, dropout: float) -> None:
        super().__init__()
        self.value_proj = nn.Linear(config.hidden_size, num_outputs)  # W3
        self.gate_proj = nn.Linear(config.hidden_size, num_outputs)  # W4
        self.dropout = nn.Dropout(dropout)
        self.neuron_weights = nn.Parameter(torch.zeros(config.num_neurons, num_outputs))
        self.bias = nn.Parameter(torch.zeros(num_outputs))

    def forward(self, hidden_states: torch.Tensor, neuron_ids: torch.Tensor, neuron_weight: torch.Tensor) -> torch.Tensor:
        # (batch, neurons, steps, outputs): neuron-wise gated features
        features = self.dropout(self.value_proj(hidden_states) * F.gelu(self.gate_proj(hidden_states)))
        weights = self.neuron_weights[neuron_ids] * neuron_weight[:, :, None]  # (batch, neurons, outputs)
        out = torch.einsum("bnto,bno->bto", features, weights.to(features.dtype))
        return out + self.bias


class CalmBehaviorSmoothing(nn.Module):
    """Depthwise causal temporal conv over behaviour frames, initialised as the identity (last tap 1, others 0).

    The weights live on this module (no `nn.Conv1d` child) so that `_init_weights` sees and initialises them.
    """

    def __init__(self, num_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.weight = nn.Parameter(torch.zeros(num_channels, 1, kernel_size))  # (channels, 1, kernel): depthwise
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def identity_weight(self) -> torch.Tensor:
        weight = torch.zeros_like(self.weight)
        weight[..., -1] = 1.0
        return weight

    def forward(self, predictions: torch.Tensor) -> torch.Tensor:
        # (batch, channels, frames); left padding only: frame t sees frames t-K+1..t
        padded = F.pad(predictions, (self.kernel_size - 1, 0))
        return F.conv1d(padded, self.weight.to(padded.dtype), self.bias.to(padded.dtype), groups=self.weight.shape[0])


class CalmForBehaviorRegression(CalmPreTrainedModel):
    r"""
    Behaviour decoding from the (by default frozen) dual-axis transformer: a readout head on the hidden states
    `(batch, neurons, token_steps, hidden)` outputs `num_behavior_channels * window_size` values per token step, which
    are laid out as frames `(batch, channels, token_steps * window_size)` and smoothed by a causal depthwise conv.

    Heads (`config.behavior_head`): `"linear"`, a low-rank readout with a per-neuron weight bank `(num_neurons,
    M * L, behavior_rank)`; `"glu"`, gated per-neuron features `(h W3) * GELU(h W4)` weighted by a per-neuron bank
    `(num_neurons, M * L)`. Both banks are indexed by global neuron id and summed over real neurons (padded neurons,
    `neuron_mask == False`, contribute nothing), so one head serves every session, and a new session only needs its
    own bank rows (see [`train_only_session_neurons`]). Banks start at zero: an untrained neuron contributes nothing.

    Timing: the prediction for the frames of token step t reads the hidden state at step t, which has seen frames up
    to the end of that token (up to `window_size - 1` frames after the predicted frame within the token), and never
    later tokens.

    With one recording's few short trials, the per-neuron banks and shared projections fit the training trials far
    better than held-out ones. [`calm_hf.behavior_readout.CalmBehaviorRidgeReadout`] is the closed-form alternative on
    the same frozen backbone: a ridge regression from causal lags of the traces and this backbone's hidden state of the
    last complete token (`model.model(...).last_hidden_state`, strictly causal), every choice made on the validation
    trials, saved beside the checkpoint as `behavior_readout.safetensors`. It needs the recording's traces as well as
    its codes and fits one recording's neurons, which is why it is a separate object and not a `behavior_head` here;
    `benchmarks/results/behavior_calm_base.md` compares both.

    Head settings are `CalmConfig` fields (`BEHAVIOR_HEAD_SETTINGS`) and can be given as keyword arguments, which
    build a copy of the config with them (the config passed in is not changed):

    ```python
    >>> model = CalmForBehaviorRegression.from_pretrained("calm-base", num_behavior_channels=2, behavior_head="glu")
    ```

    Args:
        config ([`CalmConfig`]): backbone configuration (plus optional head settings).
        behavior_head (`str`, *optional*): `"glu"` (default) or `"linear"`.
        num_behavior_channels (`int`): M, number of behaviour channels (required).
        behavior_rank (`int`, *optional*, defaults to 4): R of the linear head.
        behavior_dropout (`float`, *optional*, defaults to 0.1): dropout on the GLU features.
        behavior_smoothing_kernel (`int`, *optional*, defaults to 5): frames of the smoothing conv.
        freeze_backbone (`bool`, *optional*, defaults to `True`): freeze the backbone (no gradient, dropout off, run
            under `torch.no_grad`).
    """

    # the forecasting heads of a causal checkpoint are dropped quietly; the new behaviour head is reported as missing
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^codebook_neighbors$", r"^value_head\.", r"^value_skip\.",
                                          r"^quantile_head\."]
    accepts_loss_kwargs = False

    def __init__(self, config: CalmConfig, **head_kwargs: Any) -> None:
        # keyword overrides go through a validated copy of the config; the head is then built from the config alone
        config = config_with_head_settings(config, **head_kwargs)
        settings = behavior_head_settings(config)
        super().__init__(config)
        self.model = CalmModel(config)
        self.num_behavior_channels = settings["num_behavior_channels"]
        self.window_size = config.window_size
        num_outputs = self.num_behavior_channels * self.window_size
        if settings["behavior_head"] == "linear":
            self.behavior_head = CalmBehaviorLinearHead(config, num_outputs, settings["behavior_rank"])
        else:
            self.behavior_head = CalmBehaviorGLUHead(config, num_outputs, settings["behavior_dropout"])
        self.smoothing = CalmBehaviorSmoothing(self.num_behavior_channels, settings["behavior_smoothing_kernel"])
        self._bank_hook = None
        self.post_init()
        if settings["freeze_backbone"]:
            self.freeze_backbone()
        else:
            self.backbone_frozen = False

    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, CalmBehaviorLinearHead):
            # unit-variance projections of the RMS-normalised hidden state; bank at zero (LoRA-style start)
            init.normal_(module.readout.weight, mean=0.0, std=module.readout.in_features**-0.5)
            init.zeros_(module.neuron_weights)
            init.zeros_(module.bias)
        elif isinstance(module, CalmBehaviorGLUHead):
            for linear in (module.value_proj, module.gate_proj):
                init.normal_(linear.weight, mean=0.0, std=linear.in_features**-0.5)
                init.zeros_(linear.bias)
            init.zeros_(module.neuron_weights)
            init.zeros_(module.bias)
        elif isinstance(module, CalmBehaviorSmoothing):
            init.copy_(module.weight, module.identity_weight())
            init.zeros_(module.bias)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        # loading replaces the parameters (requires_grad=True again): re-apply the freeze recorded in the config
        loaded = super().from_pretrained(*args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        if getattr(model.config, "freeze_backbone", True):
            model.freeze_backbone()
        return loaded

    # -- freezing and held-out sessions -------------------------------------------------------------------------------

    def freeze_backbone(self) -> None:
        """Freezes the backbone: no gradients, dropout off (it stays in eval mode under `model.train()`), and its
        forward runs under `torch.no_grad`."""
        self.model.requires_grad_(False)
        self.model.eval()
        self.backbone_frozen = True

    def unfreeze_backbone(self) -> None:
        """Lets the backbone train with the head (full fine-tuning)."""
        self.model.requires_grad_(True)
        self.model.train(self.training)
        self.backbone_frozen = False

    def train(self, mode: bool = True) -> CalmForBehaviorRegression:
        super().train(mode)
        if getattr(self, "backbone_frozen", False):
            self.model.eval()
        return self

    def train_only_session_neurons(self, neuron_ids: int | str | Sequence[int] | torch.Tensor) -> list[nn.Parameter]:
        """Held-out session adaptation: only the given rows of the head's neuron-weight bank train; the backbone,
        the shared projections (`W3`/`W4` or `B1`), the bias and the smoothing conv stay fixed.

        Every other parameter gets `requires_grad=False`, and a gradient hook zeroes the bank's gradient outside the
        given rows. Give the optimizer only the returned parameter (the Trainer does: it keeps parameters with
        `requires_grad`), with `weight_decay=0`: decay would shrink the other rows, whose gradient is zero. With
        Adam/AdamW (fresh state, no decay) the other rows then stay bit-identical. Calling it again replaces the rows.

        Args:
            neuron_ids (`int`, `str`, `Sequence[int]` or `torch.Tensor`): global neuron ids of the held-out session,
                or its session name / id as recorded in `config.session_names` (its `session_neuron_ranges` block).

        Returns:
            `[neuron_weights]`: the parameters to optimise.
        """
        if isinstance(neuron_ids, str):
            neuron_ids = self.config.session_neuron_ids(neuron_ids)
        ids = as_id_tensor(neuron_ids).unique()
        bank = self.behavior_head.neuron_weights
        if ids.numel() == 0:
            raise ValueError("train_only_session_neurons needs at least one neuron id (the held-out session's ids).")
        if int(ids.min()) < 0 or int(ids.max()) >= bank.shape[0]:
            raise ValueError(
                f"neuron ids [{int(ids.min())}, {int(ids.max())}] are outside the head's bank of {bank.shape[0]} "
                "neurons; add the session first with model.add_session(name, num_neurons)."
            )
        self.requires_grad_(False)
        self.freeze_backbone()
        bank.requires_grad_(True)
        row_mask = torch.zeros(bank.shape[0], dtype=bank.dtype, device=bank.device)
        row_mask[ids.to(bank.device)] = 1.0
        row_mask = row_mask.view(-1, *([1] * (bank.dim() - 1)))
        if self._bank_hook is not None:
            self._bank_hook.remove()
        self._bank_hook = bank.register_hook(lambda grad: grad * row_mask.to(grad.dtype))
        self.adapted_neuron_ids = ids
        return [bank]

    def end_session_adaptation(self) -> None:
        """Removes the gradient hook of [`train_only_session_neurons`] and makes the head trainable again (the
        backbone stays as it is)."""
        if self._bank_hook is not None:
            self._bank_hook.remove()
            self._bank_hook = None
        self.behavior_head.requires_grad_(True)
        self.smoothing.requires_grad_(True)
        self.adapted_neuron_ids = None

    def resize_neuron_embeddings(self, new_num_neurons: int) -> nn.Embedding | None:
        """Grows the backbone's neuron table (see [`CalmPreTrainedModel.resize_neuron_embeddings`]) and the head's
        neuron-weight bank alike; new bank rows start at zero (the neuron contributes nothing until trained). A
        data-identity backbone has no neuron table: only the bank grows (and `config.num_neurons`); returns None."""
        if self.model.neuron_embeddings is not None:
            table = super().resize_neuron_embeddings(new_num_neurons)
        else:
            if not isinstance(new_num_neurons, int) or new_num_neurons < 1:
                raise ValueError(f"new_num_neurons must be a positive integer, got {new_num_neurons!r}.")
            table, self.config.num_neurons = None, new_num_neurons
        head = self.behavior_head
        old = head.neuron_weights
        new = torch.zeros(new_num_neurons, *old.shape[1:], dtype=old.dtype, device=old.device)
        keep = min(new_num_neurons, old.shape[0])
        new[:keep] = old.detach()[:keep]
        if self._bank_hook is not None:
            self.end_session_adaptation()
        head.neuron_weights = nn.Parameter(new, requires_grad=old.requires_grad)
        return table

    # -- forward ------------------------------------------------------------------------------------------------------

    def _check_labels(self, labels: Any, behavior_mask: Any, batch_size: int, num_frames: int,
                      device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """`(labels, scored)`: the behaviour as a float tensor on `device` (a tensor, numpy array or nested list of
        real numbers) and the bool mask of the entries the loss scores, after the shape and finiteness checks."""
        try:
            labels = torch.as_tensor(labels, device=device)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"labels must be a tensor, numpy array or nested list of real numbers, got "
                            f"{type(labels).__name__} ({error}).") from None
        if labels.dtype == torch.bool or labels.dtype.is_complex:
            raise TypeError(f"labels must be behaviour as real numbers, got dtype {labels.dtype}.")
        labels = labels.float()
        if behavior_mask is not None:
            behavior_mask = torch.as_tensor(behavior_mask, device=device)
        if labels.dim() != 3:
            raise ValueError(
                f"labels must be behaviour of shape (batch, num_behavior_channels, frames), got {tuple(labels.shape)}."
            )
        if labels.shape[0] != batch_size or labels.shape[1] != self.num_behavior_channels:
            raise ValueError(
                f"labels have shape {tuple(labels.shape)} but the batch has {batch_size} trials and the head decodes "
                f"{self.num_behavior_channels} channels; set num_behavior_channels={labels.shape[1]} or fix the batch."
            )
        if labels.shape[2] != num_frames:
            raise ValueError(
                f"behaviour has {labels.shape[2]} frames but traces have {num_frames // self.window_size}*"
                f"{self.window_size} = {num_frames}; resample/crop the behaviour to the traces."
            )
        if behavior_mask is not None and behavior_mask.shape != labels.shape:
            raise ValueError(
                f"behavior_mask must have the shape of labels {tuple(labels.shape)}, got {tuple(behavior_mask.shape)}."
            )
        scored = torch.ones_like(labels, dtype=torch.bool) if behavior_mask is None else behavior_mask.bool()
        bad = scored & ~torch.isfinite(labels)
        if bool(bad.any()):
            trial, channel, frame = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"labels contain {int(bad.sum())} NaN/Inf value(s) (first at trial {trial}, channel {channel}, frame "
                f"{frame}); interpolate the missing behaviour or pass behavior_mask=False at those entries."
            )
        return labels, scored

    def _backbone_states(
        self,
        input_ids: torch.LongTensor | None,
        identity: dict[str, Any],
        backbone_hidden_states: torch.FloatTensor | None,
        output_hidden_states: bool | None,
        neuron_identity: torch.FloatTensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | None], CalmModelOutput | None]:
        """The backbone's `(batch, neurons, steps, hidden)` states (given, or computed without gradient when the
        backbone is frozen) with the checked identity inputs `{"neuron_ids", "session_ids", "neuron_mask"}` and the
        backbone's output (None when the states were given)."""
        if backbone_hidden_states is not None:
            if backbone_hidden_states.dim() != 4 or backbone_hidden_states.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"backbone_hidden_states must have shape (batch, neurons, token_steps, {self.config.hidden_size}), "
                    f"got {tuple(backbone_hidden_states.shape)}."
                )
            if output_hidden_states:
                raise ValueError("output_hidden_states needs the backbone; pass input_ids instead of hidden states.")
            grid, device = backbone_hidden_states.shape[:2], backbone_hidden_states.device
        elif input_ids is None:
            raise ValueError("Pass input_ids (batch, neurons, token_steps) (or precomputed backbone_hidden_states).")
        else:
            # this head's forward is its entry point (no generate or pipeline in front): the value checks run here
            input_ids = validate_inputs(self.config, input_ids, **identity, neuron_identity=neuron_identity)
            grid, device = input_ids.shape[:2], input_ids.device
        identity = dict(zip(identity, identity_inputs(*grid, device, **identity)))
        if backbone_hidden_states is not None:
            if self.config.neuron_identity == "table":  # a data-identity backbone has no tables to index
                check_identity_values(self.config, identity["neuron_ids"], identity["session_ids"])
            return backbone_hidden_states, identity, None
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
            outputs = self.model(
                input_ids=input_ids, **identity, use_cache=False, output_hidden_states=output_hidden_states,
                neuron_identity=neuron_identity, return_dict=True,
            )
        return outputs.last_hidden_state, identity, outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        labels: torch.FloatTensor | None = None,
        behavior_mask: torch.BoolTensor | None = None,
        backbone_hidden_states: torch.FloatTensor | None = None,
        output_hidden_states: bool | None = None,
        neuron_identity: torch.FloatTensor | None = None,
    ) -> CalmBehaviorRegressionOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, neurons, token_steps)`):
                Codes from [`CalmTokenizer.encode`].
            neuron_ids (`torch.LongTensor` of shape `(batch, neurons)`, *optional*):
                Global neuron ids (index the backbone's neuron embeddings and the head's bank); default `arange`.
            session_ids (`torch.LongTensor` of shape `(batch,)`, *optional*): session ids; default 0.
            neuron_mask (`torch.BoolTensor` of shape `(batch, neurons)`, *optional*):
                True for real neurons, False for padding (padded neurons contribute nothing).
            labels (`torch.FloatTensor` of shape `(batch, num_behavior_channels, token_steps * window_size)`, *optional*):
                Behaviour at frame rate (z-scored by the data layer); gives the MSE `loss`.
            behavior_mask (`torch.BoolTensor` of the shape of `labels`, *optional*):
                False marks label entries left out of the loss (e.g. missing samples, which may then be NaN).
            backbone_hidden_states (`torch.FloatTensor` of shape `(batch, neurons, token_steps, hidden_size)`, *optional*):
                Precomputed `last_hidden_state` of the frozen backbone (e.g. `model.model(...)`, cached once); skips
                the backbone. `input_ids` may then be omitted.
            output_hidden_states (`bool`, *optional*): return the backbone's hidden states.
            neuron_identity (`torch.FloatTensor` of shape `(batch, neurons, identity_size)`, *optional*): the data
                identity a data-identity backbone reads (`calm_hf.identity_calm`; None = zero-shot); `neuron_ids`
                then index only this head's bank.
            return_dict (`bool`, *optional*): return a [`CalmBehaviorRegressionOutput`] instead of a tuple.
        """
        identity = {"neuron_ids": neuron_ids, "session_ids": session_ids, "neuron_mask": neuron_mask}
        hidden_states, identity, backbone_outputs = self._backbone_states(
            input_ids, identity, backbone_hidden_states, output_hidden_states, neuron_identity
        )
        batch_size, _, num_steps, _ = hidden_states.shape
        self._check_bank_covers(identity["neuron_ids"])
        scored = None
        if labels is not None:
            labels, scored = self._check_labels(labels, behavior_mask, batch_size, num_steps * self.window_size,
                                                hidden_states.device)
        predictions = self.decode_behavior(hidden_states, identity["neuron_ids"], identity["neuron_mask"])
        loss = None
        if labels is not None:
            error = (predictions - torch.nan_to_num(labels)) ** 2
            loss = (error * scored).sum() / scored.sum().clamp(min=1)
        return CalmBehaviorRegressionOutput(
            loss=loss,
            predictions=predictions,
            hidden_states=None if backbone_outputs is None else backbone_outputs.hidden_states,
        )

    def _check_bank_covers(self, neuron_ids: torch.Tensor) -> None:
        bank_size = self.behavior_head.neuron_weights.shape[0]
        if int(neuron_ids.max()) >= bank_size:
            raise ValueError(
                f"neuron_ids go up to {int(neuron_ids.max())} but the head's bank has {bank_size} neurons; grow it "
                "with model.add_session(name, num_neurons) or model.resize_neuron_embeddings(...)."
            )

    def decode_behavior(
        self, hidden_states: torch.Tensor, neuron_ids: torch.Tensor, neuron_mask: torch.Tensor | None
    ) -> torch.Tensor:
        """Behaviour `(batch, channels, token_steps * window_size)` from the backbone's hidden states `(batch, neurons,
        token_steps, hidden)`: the head's values per token step, laid out as frames and smoothed."""
        batch_size, num_neurons, num_steps, _ = hidden_states.shape
        neuron_weight = (
            torch.ones(batch_size, num_neurons, device=hidden_states.device)
            if neuron_mask is None
            else neuron_mask.to(hidden_states.device, torch.float32)
        )
        out = self.behavior_head(hidden_states, neuron_ids, neuron_weight)  # (batch, steps, channels*window)
        # token step t, output (channel m, offset l) -> frame t*L + l of channel m
        out = out.float().view(batch_size, num_steps, self.num_behavior_channels, self.window_size)
        num_frames = num_steps * self.window_size
        predictions = out.permute(0, 2, 1, 3).reshape(batch_size, self.num_behavior_channels, num_frames)
        return self.smoothing(predictions).float()


# save_pretrained copies this file (and the files it imports) next to the weights and writes its auto_map entry. No
# auto class names behaviour decoding: transformers maps time-series regression (PatchTSTForRegression) but has no
# public auto class for it, so time-series prediction is the closest one.
CalmForBehaviorRegression.register_for_auto_class("AutoModelForTimeSeriesPrediction")


__all__ = [
    "BEHAVIOR_HEAD_DEFAULTS",
    "BEHAVIOR_HEAD_SETTINGS",
    "CalmBehaviorGLUHead",
    "CalmBehaviorLinearHead",
    "CalmBehaviorRegressionOutput",
    "CalmBehaviorSmoothing",
    "CalmForBehaviorRegression",
    "behavior_head_settings",
    "config_with_head_settings",
]
