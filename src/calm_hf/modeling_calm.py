"""CalM dual-axis transformer (DAT): attention across neurons at every step, causal attention across time per neuron.

This file holds the backbone ([`CalmModel`]) and its next-token head ([`CalmForCausalNeuralModeling`]). Beside it,
imported relatively so that `save_pretrained` copies them with the remote code: `validation_calm.py` (input checks),
`generation_calm.py` (`generate` and `rollout`), `heads_calm.py` (the forecast heads' outputs and losses),
`identity_calm.py` (neuron identities computed from data), `sessions_calm.py` (identity tables that grow for new sessions),
`checked_loading.py` (weight checksums and checked loading); the behaviour heads live in `modeling_calm_behavior.py`.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.generic import can_return_tuple
from transformers.utils.output_capturing import capture_outputs

from .augmentation_calm import CalmAugmentationMixin
from .checked_loading import load_checked_pretrained, write_weight_checksums
from .configuration_calm import CalmConfig
from .generation_calm import CalmGenerationMixin, CalmRolloutOutput
from .heads_calm import CalmForecastHeadsMixin
from .identity_calm import config_base_identity_size
from .sessions_calm import CalmIdEmbedding, CalmSessionsMixin
from .validation_calm import (
    check_grid_size,
    check_input_ids_shape,
    check_inputs_embeds_shape,
    check_neuron_identity_shape,
    identity_inputs,
    validate_inputs,
)


logger = logging.get_logger(__name__)

# softplus^-1(50): a fresh per-neuron highway counts the shared one as 50 reference samples (a few trials' worth)
PRIOR_SAMPLES_INIT = 50.0
# transformers 5.24 renamed the KV-cache argument `past_key_values` to `cache`; the old name still works, with a warning
DEPRECATED_CACHE_ARGUMENT = deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache")


# ----------------------------------------------------------------------------------------------------------------------
# Outputs
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class CalmModelOutput(ModelOutput):
    """
    Output of [`CalmModel`].

    Args:
        last_hidden_state (`torch.FloatTensor` of shape `(batch, neurons, token_steps, hidden_size)`):
            Hidden states after the final norm.
        cache (`Cache`, *optional*):
            Time-axis KV cache, one layer per DAT layer, batch dimension `batch * neurons`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Embedding output and the output of every layer, each `(batch, neurons, token_steps, hidden_size)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None


@dataclass
class CalmCausalNeuralModelingOutput(ModelOutput):
    """
    Output of [`CalmForCausalNeuralModeling`].

    Args:
        loss (`torch.FloatTensor` of shape `()`, *optional*):
            Next-token cross-entropy over all real neurons and steps (returned when `labels` is given).
        logits (`torch.FloatTensor` of shape `(batch, neurons, token_steps, vocab_size)`):
            Next-code logits; `(batch * neurons, token_steps, vocab_size)` when called with the flattened grid
            (`num_neurons` given), as `generate` does.
        cache (`Cache`, *optional*):
            Time-axis KV cache.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Hidden states of the backbone.
        scheduled_sampling_applied (`torch.BoolTensor` of shape `()`, *optional*):
            Whether this training batch had a block of inputs replaced by the model's own predictions; set by the
            training step (`calm_hf.trainer.augment_training_batch`, which `CalmTrainer.compute_loss` calls), None
            from `forward`.
        next_token_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Next-token cross-entropy (returned when `labels` is given).
        value_loss (`torch.FloatTensor` of shape `()`, *optional*):
            MSE of the continuous forecast head over every available future frame (returned when `value_labels` is
            given).
        value_predictions (`torch.FloatTensor` of shape `(batch, neurons, token_steps, value_head_steps * window_size)`, *optional*):
            Forecast of the next `value_head_steps * window_size` frames (z-scored) made at every token step; `None`
            without a continuous head.
        quantile_loss (`torch.FloatTensor` of shape `()`, *optional*):
            Pinball loss of the quantile head, averaged over its levels (returned when `value_labels` is given).
        value_quantiles (`torch.FloatTensor` of shape `(batch, neurons, token_steps, value_head_steps * window_size, levels)`, *optional*):
            Quantiles at `config.quantile_levels` of the same frames (in eval mode; `None` in training, which reads
            `quantile_loss`, and without a quantile head).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    scheduled_sampling_applied: torch.BoolTensor | None = None
    next_token_loss: torch.FloatTensor | None = None
    value_loss: torch.FloatTensor | None = None
    value_predictions: torch.FloatTensor | None = None
    quantile_loss: torch.FloatTensor | None = None
    value_quantiles: torch.FloatTensor | None = None


# ----------------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------------


class CalmRMSNorm(nn.Module):
    """RMSNorm computed in float32 (safe under bf16 autocast)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        input_dtype = hidden_states.dtype
        if (input_dtype == torch.float32 and self.weight.dtype == torch.float32
                and not torch.is_autocast_enabled(hidden_states.device.type)):
            # the same formula as below, fused (fewer passes over memory in the forward and backward pass)
            return F.rms_norm(hidden_states, (hidden_states.shape[-1],), self.weight, self.variance_epsilon)
        return self.weight * self.unit(hidden_states)

    def unit(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """The normalisation without the weight, in the input's dtype: `forward` is `weight * unit(x)`. Norms with
        the same epsilon over the same input share it, each applying its own weight after."""
        input_dtype = hidden_states.dtype
        if input_dtype == torch.float32 and not torch.is_autocast_enabled(hidden_states.device.type):
            return F.rms_norm(hidden_states, (hidden_states.shape[-1],), None, self.variance_epsilon)
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        return (hidden_states * torch.rsqrt(variance + self.variance_epsilon)).to(input_dtype)


class CalmRotaryEmbedding(nn.Module):
    """RoPE over token steps (time axis only; neurons are an unordered set)."""

    def __init__(self, config: CalmConfig) -> None:
        super().__init__()
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.rope_theta = config.rope_theta
        self.inv_freq = nn.Buffer(self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.rope_theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))

    @torch.no_grad()
    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # position_ids (steps,) -> cos, sin (steps, head_dim), float32
        freqs = position_ids[:, None].float() * self.inv_freq[None, :].to(position_ids.device)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()


def apply_rotary_to_heads(states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE: `states` `(sequences, length, heads, head_dim)`, any strides -> rotated `(sequences, heads, length,
    head_dim)`, the layout attention reads. cos/sin `(length, head_dim)` hold each frequency twice (`[f, f]`), so
    each half of a head turns by the same angles. Without autograd the two halves are written straight into one
    contiguous output (fewer passes over memory); the values are the same either way."""
    half = states.shape[-1] // 2
    cos, sin = cos[:, None, :half].to(states.dtype), sin[:, None, :half].to(states.dtype)
    if torch.is_grad_enabled() and states.requires_grad:
        # the halves from `unbind` and the result by `stack`: their backward passes write the gradients into one
        # buffer, where two slices would each zero-fill a buffer the size of `states` first
        first, second = states.unflatten(-1, (2, half)).unbind(-2)
        rotated = torch.stack((first * cos - second * sin, second * cos + first * sin), dim=-2)
        return rotated.flatten(-2).transpose(1, 2)
    first, second = states[..., :half], states[..., half:]
    out = states.new_empty(states.shape[0], states.shape[2], states.shape[1], states.shape[3])
    rotated = out.transpose(1, 2)
    torch.sub(first * cos, second * sin, out=rotated[..., :half])
    torch.add(second * cos, first * sin, out=rotated[..., half:])
    return out


def eager_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    is_causal: bool = False,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference attention (softmax in float32). `attention_mask` is boolean (True = attend) or additive."""
    q_len, kv_len = query.shape[2], key.shape[2]
    attn_weights = torch.matmul(query, key.transpose(2, 3)).float() * scaling
    if is_causal and q_len > 1:
        # bottom-right aligned: query i sits at absolute step kv_len - q_len + i
        causal = torch.ones(q_len, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - q_len)
        attn_weights = attn_weights.masked_fill(~causal, torch.finfo(attn_weights.dtype).min)
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            attn_weights = attn_weights.masked_fill(~attention_mask, torch.finfo(attn_weights.dtype).min)
        else:
            attn_weights = attn_weights + attention_mask
    attn_weights = F.softmax(attn_weights, dim=-1).to(value.dtype)
    attn_weights = F.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value).transpose(1, 2).contiguous()
    return attn_output, attn_weights


# a new step attends to at most this many cached steps through `decode_step_attention` on a CPU (its elementwise
# products grow with the cache; the fused kernel's do not)
DECODE_STEP_MAX_KEYS = 16


def decode_step_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of one new step over a short cache, as a few elementwise passes: `query` `(sequences, heads, 1,
    head_dim)`, `key`/`value` `(sequences, heads, keys, head_dim)` (any strides) -> `(sequences, 1, heads, head_dim)`,
    the layout the attention interfaces return. Softmax in float32. On a CPU a fused attention kernel spends most of its
    time on per-sequence set-up when each of thousands of sequences has one query and a few keys."""
    scores = (query * key).sum(dim=-1, keepdim=True).float() * scaling  # (sequences, heads, keys, 1)
    weights = scores.softmax(dim=2).to(value.dtype)
    return (weights * value).sum(dim=2, keepdim=True).transpose(1, 2)


def eager_attention_max_bytes() -> int:
    """Memory the eager attention may spend on its score matrices per call (env `CALM_EAGER_ATTENTION_MAX_GIB`,
    default 4 GiB). Eager attention materialises (sequences, heads, length, length) float32 scores: across 20k
    neurons that is ~370 GB, so larger calls are split over sequences, and refused when one sequence alone is too big."""
    return int(float(os.environ.get("CALM_EAGER_ATTENTION_MAX_GIB", "4")) * 2**30)


def neuron_attention_blocks(num_neurons: int, block: int | None) -> list[tuple[int, int, int]]:
    """How the neuron axis is split for attention: `[(first neuron, groups, size)]`, contiguous groups of neurons
    that attend among themselves. All neurons in one group when `block` is None or not exceeded; else the fewest
    groups of at most `block` neurons, sizes differing by at most one (two parts: the larger groups, then the
    smaller), so no neuron is padding and cost is linear in neurons."""
    if block is None or num_neurons <= block:
        return [(0, 1, num_neurons)]
    groups = -(-num_neurons // block)
    size, larger = divmod(num_neurons, groups)
    parts = [(0, larger, size + 1)] if larger else []
    return parts + [(larger * (size + 1), groups - larger, size)]


# default activations of one chunk of neurons in an inference forward pass of a large grid (see
# `inference_neuron_chunk`); `CalmModel.inference_chunk_bytes` replaces it per model (a forecaster sets its budget's)
INFERENCE_CHUNK_BYTES = 256 * 2**20


def inference_neuron_chunk(config, batch_size: int, num_neurons: int, num_steps: int,
                           limit: int | None = None) -> int | None:
    """Neurons per chunk of a layer's inference pass (`CalmDualAxisLayer._forward_in_chunks`), or None when the
    whole grid's intermediate activations (about eight hidden-state copies and the FFN's expansion) fit in `limit`
    bytes (default `INFERENCE_CHUNK_BYTES`) anyway."""
    limit = INFERENCE_CHUNK_BYTES if limit is None else limit
    per_neuron = 4 * batch_size * num_steps * (8 * config.hidden_size + 2 * config.intermediate_size)
    if per_neuron * num_neurons <= limit:
        return None
    return max(1, limit // per_neuron)


def eager_attention_bytes(num_sequences: int, num_heads: int, q_len: int, kv_len: int) -> int:
    # scores in float32, the masked copy and the softmax output live at the same time: ~3 float32 matrices
    return 3 * 4 * num_sequences * num_heads * q_len * kv_len


class CalmAttention(nn.Module):
    """Multi-head self-attention over one axis of the grid, dispatched through transformers' attention interface.

    The same module serves both axes: `is_causal=False` (neuron axis, key padding mask from `neuron_mask`) and
    `is_causal=True` (time axis, RoPE, KV cache).
    """

    def __init__(self, config: CalmConfig, layer_idx: int, is_causal: bool) -> None:
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.is_causal = is_causal
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.num_key_value_groups = 1
        self.scaling = self.head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        # one fused projection: a single matmul is markedly faster than three on CPU
        self.qkv_proj = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        # hidden_states (sequences, length, hidden): sequences = batch*steps (neuron axis) or batch*neurons (time axis)
        num_sequences, length, hidden_size = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(num_sequences, length, 3, self.num_heads, self.head_dim)
        if position_embeddings is not None:  # each (sequences, heads, length, head_dim)
            # unbind, not three slices: its backward writes the three gradients into one buffer (a slice's backward
            # zero-fills a buffer of the whole projection, once per slice)
            query, key, value = qkv.unbind(2)
            query, key = (apply_rotary_to_heads(states, *position_embeddings) for states in (query, key))
            value = value.transpose(1, 2)
        else:
            query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        if cache is not None:
            key, value = cache.update(key, value, self.layer_idx)

        is_causal = self.is_causal
        kv_len = key.shape[2]
        if is_causal and 1 < length < kv_len:
            # several new steps on top of a cache: SDPA's is_causal is top-left aligned, so give the mask explicitly
            attention_mask = torch.ones(length, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - length)
            is_causal = False
        elif is_causal and length == 1:
            is_causal = False  # one new step attends to the whole cache

        if (length == 1 and attention_mask is None and kv_len <= DECODE_STEP_MAX_KEYS and query.device.type == "cpu"
                and not self.training and self.config._attn_implementation in ("sdpa", "eager")):
            attn_output = decode_step_attention(query, key, value, self.scaling)
            return self.o_proj(attn_output.reshape(num_sequences, length, hidden_size))

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        chunk = num_sequences
        if attention_interface is eager_attention_forward:
            chunk = self._eager_sequence_chunk(num_sequences, length, kv_len)
        outputs = []
        for start in range(0, num_sequences, chunk):
            # a per-sequence mask (neuron axis: (sequences, 1, 1, neurons)) is split with the sequences
            mask = attention_mask
            if mask is not None and mask.dim() == 4 and mask.shape[0] == num_sequences and chunk < num_sequences:
                mask = mask[start : start + chunk]
            attn_output, _ = attention_interface(
                self,
                query[start : start + chunk],
                key[start : start + chunk],
                value[start : start + chunk],
                mask,
                dropout=self.attention_dropout if self.training else 0.0,
                scaling=self.scaling,
                is_causal=is_causal,
            )
            outputs.append(attn_output)
        attn_output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=0)
        attn_output = attn_output.reshape(num_sequences, length, hidden_size)
        return self.o_proj(attn_output)

    def _eager_sequence_chunk(self, num_sequences: int, length: int, kv_len: int) -> int:
        """Sequences per eager-attention call so the score matrices stay under `eager_attention_max_bytes()`."""
        limit = eager_attention_max_bytes()
        per_sequence = eager_attention_bytes(1, self.num_heads, length, kv_len)
        if per_sequence > limit:

            def size(num_bytes: int) -> str:
                return f"{num_bytes / 2**30:.1f} GiB" if num_bytes >= 2**30 else f"{num_bytes / 2**20:.1f} MiB"

            total = eager_attention_bytes(num_sequences, self.num_heads, length, kv_len)
            raise ValueError(
                f"Eager attention over {kv_len} {'steps' if self.is_causal else 'neurons'} needs ~{size(total)} for "
                f"its score matrices ({size(per_sequence)} per sequence, above the {size(limit)} limit): load the "
                "model with attn_implementation='sdpa' (memory linear in the neurons), use fewer neurons per call, "
                "or raise CALM_EAGER_ATTENTION_MAX_GIB."
            )
        return max(1, min(num_sequences, limit // per_sequence))


class CalmMLP(nn.Module):
    def __init__(self, config: CalmConfig) -> None:
        super().__init__()
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.up_proj(hidden_states)))


class CalmNeuronMixer(nn.Module):
    """Linear population mixing across neurons: a learned low-rank linear map from all neurons' activity to each one.

    `out[i] = W_o sum_j (q_i . k_j) v_j / n_real`, with `q`, `k` projections of the identity (neuron + session
    embedding) and `v` of the activity. Computed factored, `z = K^T V` then `Q z`, so cost and memory are linear in
    neurons. Padded neurons (mask False) contribute nothing.
    """

    def __init__(self, config: CalmConfig) -> None:
        super().__init__()
        rank = config.neuron_mixer_rank
        self.norm = CalmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.query = nn.Linear(config.hidden_size, rank, bias=False)
        self.key = nn.Linear(config.hidden_size, rank, bias=False)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(
        self, hidden_states: torch.Tensor, identity_states: torch.Tensor, neuron_weight: torch.Tensor,
        unit: torch.Tensor | None = None,
    ) -> torch.Tensor:
        # hidden_states (batch, neurons, steps, hidden); identity_states (batch, neurons, hidden);
        # neuron_weight (batch, neurons): 1/n_real for real neurons, 0 for padding
        return self.apply(identity_states, self.summary(hidden_states, identity_states, neuron_weight, unit))

    def summary(self, hidden_states: torch.Tensor, identity_states: torch.Tensor, neuron_weight: torch.Tensor,
                unit: torch.Tensor | None = None) -> torch.Tensor:
        """`(batch, steps, rank, hidden)`: the population state, a sum over neurons (so over chunks of them).
        `unit`: `self.norm.unit(hidden_states)` when the caller has it already."""
        keys = self.key(identity_states) * neuron_weight[:, :, None]  # (batch, neurons, rank)
        unit = self.norm.unit(hidden_states) if unit is None else unit
        # the norm's weight (per channel) and the value projection are linear, so both are applied after the sum over
        # neurons (to rank rows, not to every neuron)
        return self.value(torch.einsum("bnr,bnth->btrh", keys, unit) * self.norm.weight)

    def apply(self, identity_states: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        """What each neuron of `identity_states` reads from the population state."""
        # the output projection is applied to the rank rows of the summary before they are spread over the neurons
        return torch.einsum("bnr,btrh->bnth", self.query(identity_states), self.o_proj(summary))


class CalmCouplingMixer(nn.Module):
    """Population regression estimated in context: `out[i] = W_o sum_j (receives_i . drives_j) v_j`, with the
    coupling factors of a data identity (`calm_hf.identity_calm`) and `v` a projection of the activity. Computed
    factored (`z = D^T V`, then `R z`), so cost and memory are linear in neurons; padded neurons have zero factors and
    contribute nothing. The output projection starts at zero: a fresh model starts without it."""

    def __init__(self, config: CalmConfig) -> None:
        super().__init__()
        self.rank = config.identity_rank
        self.norm = CalmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.value = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)

    def forward(self, hidden_states: torch.Tensor, neuron_identity: torch.Tensor, unit: torch.Tensor | None = None
                ) -> torch.Tensor:
        # hidden_states (batch, neurons, steps, hidden); neuron_identity (batch, neurons, features)
        return self.apply(neuron_identity, self.summary(hidden_states, neuron_identity, unit))

    def summary(self, hidden_states: torch.Tensor, neuron_identity: torch.Tensor, unit: torch.Tensor | None = None
                ) -> torch.Tensor:
        """`(batch, steps, rank, hidden)`: what the neurons drive, a sum over neurons (so over chunks of them).
        `unit`: `self.norm.unit(hidden_states)` when the caller has it already."""
        drives = neuron_identity[..., self.rank : 2 * self.rank].to(hidden_states.dtype)
        unit = self.norm.unit(hidden_states) if unit is None else unit
        # the norm's weight (per channel) and the value projection are linear, so both are applied after the sum over
        # neurons (to rank rows, not to every neuron)
        return self.value(torch.einsum("bnr,bnth->btrh", drives, unit) * self.norm.weight)

    def apply(self, neuron_identity: torch.Tensor, summary: torch.Tensor) -> torch.Tensor:
        """What each neuron of `neuron_identity` receives from the population."""
        receives = neuron_identity[..., : self.rank].to(summary.dtype)
        return torch.einsum("bnr,btrh->bnth", receives, self.o_proj(summary))


class CalmDualAxisLayer(GradientCheckpointingLayer):
    """Pre-norm layer: neuron-axis attention (plus the optional linear neuron mixer), then causal time-axis attention
    (RoPE), then FFN, each with a residual. Under `model.gradient_checkpointing_enable()` its activations are
    recomputed in the backward pass (call it with `hidden_states` positional)."""

    def __init__(self, config: CalmConfig, layer_idx: int) -> None:
        super().__init__()
        self.neuron_norm = CalmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.neuron_attn = CalmAttention(config, layer_idx, is_causal=False)
        self.time_norm = CalmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.time_attn = CalmAttention(config, layer_idx, is_causal=True)
        self.ffn_norm = CalmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = CalmMLP(config)
        self.mixer = CalmNeuronMixer(config) if config.neuron_mixer_rank > 0 else None
        self.coupling = CalmCouplingMixer(config) if config.neuron_identity == "data" else None
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        neuron_attention_mask: list[torch.Tensor | None] | None = None,
        neuron_blocks: list[tuple[int, int, int]] | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        cache: Cache | None = None,
        identity_states: torch.Tensor | None = None,
        neuron_weight: torch.Tensor | None = None,
        neuron_identity: torch.Tensor | None = None,
        neuron_chunk: int | None = None,
    ) -> torch.Tensor:
        batch_size, num_neurons, num_steps, hidden_size = hidden_states.shape
        if neuron_blocks is None:
            neuron_blocks = [(0, 1, num_neurons)]
        if neuron_attention_mask is None:
            neuron_attention_mask = [None] * len(neuron_blocks)
        if neuron_chunk is not None and cache is None and not torch.is_grad_enabled() and not self.training:
            return self._forward_in_chunks(hidden_states, neuron_attention_mask, neuron_blocks, position_embeddings,
                                           identity_states, neuron_weight, neuron_identity, neuron_chunk)

        # bidirectional attention across neurons within each step: over all of them, or within each block of
        # `config.neuron_attention_block` neurons; each part is (batch*blocks*steps, block size, hidden)
        residual = hidden_states
        # the neuron norm and the mixers' norms read the same input with the same epsilon: normalised once, each
        # applies its own weight
        unit = self.neuron_norm.unit(hidden_states)
        normed = unit * self.neuron_norm.weight.to(unit.dtype)
        outputs = []
        for (start, groups, size), mask in zip(neuron_blocks, neuron_attention_mask):
            outputs.append(self._neuron_attention(normed[:, start : start + groups * size], groups, size, mask))
        hidden = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
        if self.mixer is not None:
            hidden = hidden + self.mixer(hidden_states, identity_states, neuron_weight, unit=unit)
        if self.coupling is not None:
            hidden = hidden + self.coupling(hidden_states, neuron_identity, unit=unit)
        hidden_states = residual + self.dropout(hidden)

        # (batch*neurons, steps, hidden): causal attention across time for each neuron
        residual = hidden_states
        hidden = self.time_norm(hidden_states).reshape(batch_size * num_neurons, num_steps, hidden_size)
        hidden = self.time_attn(hidden, position_embeddings=position_embeddings, cache=cache)
        hidden_states = residual + self.dropout(hidden.view(batch_size, num_neurons, num_steps, hidden_size))

        residual = hidden_states
        hidden_states = residual + self.dropout(self.mlp(self.ffn_norm(hidden_states)))
        return hidden_states

    def _neuron_attention(self, normed: torch.Tensor, groups: int, size: int, mask: torch.Tensor | None
                          ) -> torch.Tensor:
        """Attention within each of `groups` consecutive groups of `size` neurons of `normed` `(batch, groups *
        size, steps, hidden)`."""
        batch_size, _, num_steps, hidden_size = normed.shape
        part = normed.reshape(batch_size, groups, size, num_steps, hidden_size).permute(0, 1, 3, 2, 4)
        part = self.neuron_attn(part.reshape(batch_size * groups * num_steps, size, hidden_size), attention_mask=mask)
        part = part.view(batch_size, groups, num_steps, size, hidden_size).permute(0, 1, 3, 2, 4)
        return part.reshape(batch_size, groups * size, num_steps, hidden_size)

    def _forward_in_chunks(self, hidden_states, neuron_attention_mask, neuron_blocks, position_embeddings,
                           identity_states, neuron_weight, neuron_identity, neuron_chunk: int) -> torch.Tensor:
        """The same layer at inference, a chunk of neurons at a time, so only one chunk's intermediate activations
        exist at once: the neuron axis couples chunks only through the linear mixers, whose population summaries are
        sums over neurons (taken first, chunk by chunk); attention groups are never split; the time axis and the FFN
        are per neuron."""
        batch_size, num_neurons, num_steps, hidden_size = hidden_states.shape
        spans = [(start, min(num_neurons, start + neuron_chunk)) for start in range(0, num_neurons, neuron_chunk)]
        mixer_summary = coupling_summary = None
        for start, stop in spans:
            chunk = hidden_states[:, start:stop]
            unit = self.neuron_norm.unit(chunk) if self.mixer is not None or self.coupling is not None else None
            if self.mixer is not None:
                piece = self.mixer.summary(chunk, identity_states[:, start:stop], neuron_weight[:, start:stop], unit)
                mixer_summary = piece if mixer_summary is None else mixer_summary + piece
            if self.coupling is not None:
                piece = self.coupling.summary(chunk, neuron_identity[:, start:stop], unit)
                coupling_summary = piece if coupling_summary is None else coupling_summary + piece
        out = torch.empty_like(hidden_states)
        for (first, groups, size), mask in zip(neuron_blocks, neuron_attention_mask):  # neuron axis, whole groups
            per_chunk = max(1, neuron_chunk // size)
            for group in range(0, groups, per_chunk):
                count = min(per_chunk, groups - group)
                start, stop = first + group * size, first + (group + count) * size
                chunk = hidden_states[:, start:stop]
                chunk_mask = None if mask is None else mask.view(batch_size, groups, num_steps, *mask.shape[1:])[
                    :, group : group + count].reshape(-1, *mask.shape[1:])
                update = self._neuron_attention(self.neuron_norm(chunk), count, size, chunk_mask)
                if self.mixer is not None:
                    update = update + self.mixer.apply(identity_states[:, start:stop], mixer_summary)
                if self.coupling is not None:
                    update = update + self.coupling.apply(neuron_identity[:, start:stop], coupling_summary)
                out[:, start:stop] = chunk + update
        for start, stop in spans:  # time axis and FFN, per neuron
            chunk = out[:, start:stop]
            count = stop - start
            hidden = self.time_attn(self.time_norm(chunk).reshape(batch_size * count, num_steps, hidden_size),
                                    position_embeddings=position_embeddings)
            chunk = chunk + hidden.view(batch_size, count, num_steps, hidden_size)
            out[:, start:stop] = chunk + self.mlp(self.ffn_norm(chunk))
        return out


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained base: init, loading and saving
# ----------------------------------------------------------------------------------------------------------------------


class CalmPreTrainedModel(PreTrainedModel, CalmSessionsMixin):
    config: CalmConfig
    config_class = CalmConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CalmDualAxisLayer"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True
    # output_hidden_states: the input of the first layer and every layer's output, hooked by transformers' output capture
    _can_record_outputs = {"hidden_states": CalmDualAxisLayer}

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        return load_checked_pretrained(super().from_pretrained, pretrained_model_name_or_path, args, kwargs)

    def validate_inputs(
        self,
        input_ids: torch.LongTensor | None = None,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
    ) -> None:
        """Checks a batch against this model's config once, where it enters (see the module-level
        `validate_inputs`); `forward` itself only checks shapes."""
        validate_inputs(self.config, input_ids, neuron_ids, session_ids, neuron_mask, labels)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
        elif isinstance(module, CalmRMSNorm):
            init.ones_(module.weight)
        elif isinstance(module, CalmRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        if getattr(module, "codebook_neighbors", None) is not None:
            init.constant_(module.codebook_neighbors, -1)  # -1 = never set: neighbour replacement is skipped
        if isinstance(module, CalmCouplingMixer):
            init.zeros_(module.o_proj.weight)  # a fresh model starts without the in-context coupling
        if isinstance(module, CalmModel) and module.identity_null is not None:
            init.normal_(module.identity_null, mean=0.0, std=std)
        if getattr(module, "value_skip_prior", None) is not None:
            init.constant_(module.value_skip_prior, PRIOR_SAMPLES_INIT)

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Both auto classes in auto_map, whichever of the two is saved, so AutoModel and AutoModelForCausalLM both
        # load the checkpoint with trust_remote_code=True (a behaviour head registers its own auto class).
        if self._auto_class in ("AutoModel", "AutoModelForCausalLM"):
            auto_map = dict(getattr(self.config, "auto_map", None) or {})
            auto_map.update(
                {
                    "AutoConfig": "configuration_calm.CalmConfig",
                    "AutoModel": "modeling_calm.CalmModel",
                    "AutoModelForCausalLM": "modeling_calm.CalmForCausalNeuralModeling",
                }
            )
            self.config.auto_map = auto_map
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_weight_checksums(save_directory)
        return result


# ----------------------------------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------------------------------


class CalmModel(CalmPreTrainedModel):
    """The dual-axis transformer backbone: token grid `(batch, neurons, steps)` -> hidden states
    `(batch, neurons, steps, hidden)`."""

    # loading the backbone alone from a head checkpoint drops the head quietly
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^codebook_neighbors$", r"^value_head\.", r"^value_skip\.",
                                          r"^quantile_head\."]

    def __init__(self, config: CalmConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.neuron_embeddings = self.session_embeddings = self.identity_proj = self.identity_null = None
        if config.neuron_identity == "table":
            self.neuron_embeddings = CalmIdEmbedding(config.num_neurons, config.hidden_size)
            self.session_embeddings = CalmIdEmbedding(config.num_sessions, config.hidden_size)
        else:  # who each neuron is, from its data identity: any recording, any neuron count
            self.identity_proj = nn.Linear(config_base_identity_size(config), config.hidden_size)
            self.identity_null = nn.Parameter(torch.zeros(config.hidden_size))
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([CalmDualAxisLayer(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm = CalmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = CalmRotaryEmbedding(config)
        # activations one chunk of neurons may hold in an inference pass of a large grid; None = the default
        # (`INFERENCE_CHUNK_BYTES`). `CalmForecaster` sets it from its `max_memory_gib` for its calls.
        self.inference_chunk_bytes: int | None = None
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @capture_outputs(tie_last_hidden_states=False)
    @DEPRECATED_CACHE_ARGUMENT
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        neuron_identity: torch.FloatTensor | None = None,
    ) -> CalmModelOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, neurons, token_steps)`):
                Codes from [`CalmTokenizer.encode`].
            inputs_embeds (`torch.FloatTensor` of shape `(batch, neurons, token_steps, hidden_size)`, *optional*):
                Token embeddings used instead of `embed_tokens(input_ids)` (e.g. probability-weighted code
                embeddings); neuron and session embeddings are still added.
            neuron_ids (`torch.LongTensor` of shape `(batch, neurons)`, *optional*):
                Global neuron ids; defaults to `arange(neurons)`.
            session_ids (`torch.LongTensor` of shape `(batch,)`, *optional*):
                Session ids; defaults to 0.
            neuron_mask (`torch.BoolTensor` of shape `(batch, neurons)`, *optional*):
                True for real neurons, False for padding; padded neurons never influence real ones.
            cache (`Cache`, *optional*):
                Time-axis KV cache from a previous call; `input_ids` then holds only the new steps.
            use_cache (`bool`, *optional*):
                Return the KV cache (default: `config.use_cache` outside training).
            output_hidden_states (`bool`, *optional*):
                Return the embedding output and every layer's output (collected by transformers' output capture).
            neuron_identity (`torch.FloatTensor` of shape `(batch, neurons, identity_size)`, *optional*):
                Data identity of every neuron (`config.neuron_identity="data"`), from
                `calm_hf.identity_calm.compute_neuron_identity` on reference activity of the same recording; None
                (or zeros) is the zero-shot case, no reference. Padded neurons must have zero rows. A table model
                takes `neuron_ids` / `session_ids` instead.
            return_dict (`bool`, *optional*):
                Return a [`CalmModelOutput`] instead of a tuple.
        """
        use_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        # shape checks only: value checks (code and id ranges) need host syncs and run once in `validate_inputs`
        batch_size, num_neurons, num_steps, device = self._grid_shape(input_ids, inputs_embeds)
        neuron_ids, session_ids, neuron_mask = identity_inputs(
            batch_size, num_neurons, device, neuron_ids, session_ids, neuron_mask
        )
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        past_length = self._past_length(cache, batch_size * num_neurons)
        check_grid_size(self.config, (batch_size, num_neurons, num_steps), past_steps=past_length)
        neuron_identity = check_neuron_identity_shape(self.config, neuron_identity, batch_size, num_neurons, device)

        hidden_states, identity_states = self._embed(input_ids, inputs_embeds, neuron_ids, session_ids, neuron_identity)
        position_ids = torch.arange(past_length, past_length + num_steps, device=device)
        blocks = neuron_attention_blocks(num_neurons, self.config.neuron_attention_block)
        chunk = None
        if cache is None and not torch.is_grad_enabled() and not self.training:
            chunk = inference_neuron_chunk(self.config, batch_size, num_neurons, num_steps, self.inference_chunk_bytes)
        layer_kwargs = {
            "neuron_chunk": chunk,
            "neuron_attention_mask": self._neuron_attention_mask(neuron_mask, num_steps, blocks),
            "neuron_blocks": blocks,
            "position_embeddings": self.rotary_emb(position_ids),
            "cache": cache,
            "identity_states": identity_states,
            "neuron_weight": self._neuron_weight(neuron_mask, batch_size, num_neurons, device),
            "neuron_identity": neuron_identity,
        }
        for layer in self.layers:
            hidden_states = layer(hidden_states, **layer_kwargs)  # positional: gradient checkpointing needs it
        return CalmModelOutput(last_hidden_state=self.norm(hidden_states), cache=cache if use_cache else None)

    def _grid_shape(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> tuple[int, int, int, torch.device]:
        """`(batch, neurons, steps, device)` of the grid, after the shape and dtype checks (no host sync)."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids (batch, neurons, steps) or inputs_embeds.")
        if input_ids is not None:
            check_input_ids_shape(input_ids)
            return (*input_ids.shape, input_ids.device)
        check_inputs_embeds_shape(self.config, inputs_embeds)
        return (*inputs_embeds.shape[:3], inputs_embeds.device)

    def _embed(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        neuron_ids: torch.Tensor,
        session_ids: torch.Tensor,
        neuron_identity: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(hidden_states (batch, neurons, steps, hidden), identity_states (batch, neurons, hidden))`: the token
        embedding plus who each neuron is (its table rows, or its projected data identity), which the neuron mixer
        reads again."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if self.identity_proj is not None:  # the highway statistics a data identity may carry are the head's
            features = neuron_identity[..., : self.identity_proj.in_features].to(self.identity_proj.weight.dtype)
            identity_states = self.identity_null + self.identity_proj(features)
        else:
            identity_states = self.neuron_embeddings(neuron_ids) + self.session_embeddings(session_ids)[:, None, :]
        return self.embed_dropout(inputs_embeds + identity_states[:, :, None, :]), identity_states

    def _neuron_weight(
        self, neuron_mask: torch.Tensor | None, batch_size: int, num_neurons: int, device: torch.device
    ) -> torch.Tensor | None:
        """`(batch, neurons)` weights of the linear neuron mixer: 1 / real neurons for real ones, 0 for padding."""
        if self.config.neuron_mixer_rank == 0:
            return None
        real = torch.ones(batch_size, num_neurons, device=device) if neuron_mask is None else neuron_mask.float()
        return real / real.sum(dim=1, keepdim=True).clamp_min(1.0)

    @staticmethod
    def _past_length(cache: Cache | None, num_sequences: int) -> int:
        """Steps already in the time-axis cache (its shape, no host sync); the cache must belong to this grid."""
        past_length = cache.get_seq_length() if cache is not None else 0
        if past_length and cache.layers[0].keys.shape[0] != num_sequences:
            raise ValueError(
                f"The cache holds {cache.layers[0].keys.shape[0]} sequences but the input has "
                f"batch*neurons = {num_sequences}; pass the cache returned for this same grid."
            )
        return past_length

    @staticmethod
    def _neuron_attention_mask(
        neuron_mask: torch.Tensor | None, num_steps: int, blocks: list[tuple[int, int, int]]
    ) -> list[torch.Tensor | None]:
        """Key masks of the neuron-axis attention, one per part of `blocks` (`neuron_attention_blocks`), each
        `(batch*groups*steps, 1, 1, size)` (True = may be attended to), or None without padding."""
        if neuron_mask is None:
            return [None] * len(blocks)
        batch_size = neuron_mask.shape[0]
        masks = []
        for start, groups, size in blocks:
            key_mask = neuron_mask[:, start : start + groups * size].reshape(batch_size, groups, size)
            # a block whose neurons are all padding attends to all of them (avoids NaN rows; its outputs are ignored)
            key_mask = key_mask | ~key_mask.any(dim=-1, keepdim=True)
            key_mask = key_mask[:, :, None, :].expand(batch_size, groups, num_steps, size)
            masks.append(key_mask.reshape(batch_size * groups * num_steps, 1, 1, size))
        return masks


# ----------------------------------------------------------------------------------------------------------------------
# Next-token head
# ----------------------------------------------------------------------------------------------------------------------


class CalmForCausalNeuralModeling(CalmPreTrainedModel, CalmGenerationMixin, CalmAugmentationMixin,
                                  CalmForecastHeadsMixin):
    """DAT with a next-code head: predicts every neuron's code at step t+1 from steps <= t of all neurons."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # forward has no **kwargs, but stay explicit: Trainer must scale the loss for gradient accumulation itself
    accepts_loss_kwargs = False

    def __init__(self, config: CalmConfig) -> None:
        super().__init__(config)
        self.model = CalmModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        # continuous forecast head: the next value_head_steps windows of raw (z-scored) trace from every position
        self.value_head = (
            nn.Linear(config.hidden_size, config.value_head_steps * config.window_size)
            if config.value_head_steps > 0
            else None
        )
        # the raw-trace highway: a linear map from each neuron's own last value_skip_windows windows of raw trace into
        # the head's output
        self.value_skip = (
            nn.Linear(config.value_skip_windows * config.window_size, config.value_head_steps * config.window_size)
            if config.value_skip_windows > 0
            else None
        )
        # with a per-neuron highway: how many reference samples the shared highway counts for (softplus of this)
        self.value_skip_prior = nn.Parameter(torch.tensor(PRIOR_SAMPLES_INIT)) if config.identity_highway else None
        # quantiles of the same frames, as offsets from the point forecast for each token window of the horizon (pinball
        # loss): bands without sampling
        levels = config.quantile_levels
        self.quantile_head = (
            nn.Linear(config.hidden_size, config.value_head_steps * len(levels))
            if levels
            else None
        )
        # (vocab, k) nearest codebook neighbours by cosine similarity; -1 = not set (see set_codebook_neighbors)
        self.register_buffer(
            "codebook_neighbors", torch.full((config.vocab_size, config.neighbor_k), -1, dtype=torch.long)
        )
        self.post_init()
        self.generation_config = self.default_generation_config()

    @staticmethod
    def default_generation_config() -> GenerationConfig:
        # codes have no special tokens: never stop early, never pad
        return GenerationConfig(
            max_new_tokens=15, do_sample=False, bos_token_id=None, eos_token_id=None, pad_token_id=None
        )

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    # -- forward ------------------------------------------------------------------------------------------------------

    @can_return_tuple
    @DEPRECATED_CACHE_ARGUMENT
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        value_labels: torch.FloatTensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        num_neurons: int | None = None,
        logits_to_keep: int = 0,
        value_inputs: torch.FloatTensor | None = None,
        neuron_identity: torch.FloatTensor | None = None,
    ) -> CalmCausalNeuralModelingOutput:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch, neurons, token_steps)`):
                Codes. The flattened form `(batch * neurons, token_steps)` is accepted together with `num_neurons`
                (this is how `generate` calls the model).
            inputs_embeds (`torch.FloatTensor` of shape `(batch, neurons, token_steps, hidden_size)`, *optional*):
                Token embeddings instead of `input_ids` (flattened form likewise).
            neuron_ids (`torch.LongTensor` of shape `(batch, neurons)`, *optional*): global neuron ids.
            session_ids (`torch.LongTensor` of shape `(batch,)`, *optional*): session ids.
            neuron_mask (`torch.BoolTensor` of shape `(batch, neurons)`, *optional*): False marks padded neurons,
                which are also left out of the loss.
            labels (`torch.LongTensor` of shape `(batch, neurons, token_steps)`, *optional*):
                Usually `input_ids`; shifted inside (logits at step t are scored against labels at t+1). -100 is
                ignored.
            value_labels (`torch.FloatTensor` of shape `(batch, neurons, token_steps * window_size)`, *optional*):
                The z-scored traces the codes were made from. The continuous head at step t is scored (MSE) on the
                `value_head_steps * window_size` frames after that step's window, as far as the trial reaches.
            cache (`Cache`, *optional*): time-axis KV cache.
            use_cache (`bool`, *optional*): return the KV cache.
            output_hidden_states (`bool`, *optional*): return the backbone's hidden states.
            num_neurons (`int`, *optional*): number of neurons when the grid comes flattened.
            logits_to_keep (`int`, *optional*, defaults to 0): compute logits only for the last this many steps
                (0 = all).
            value_inputs (`torch.FloatTensor` of shape `(batch, neurons, token_steps * window_size)`, *optional*):
                The z-scored traces behind `input_ids`, read by the highway of a model with `value_skip_windows > 0`
                (default: `value_labels`, the same traces in training). Without either, such a model returns no
                `value_predictions`: its head is defined with the highway only.
            neuron_identity (`torch.FloatTensor` of shape `(batch, neurons, identity_size)`, *optional*): data
                identity of every neuron (see [`CalmModel`]); a data-identity model only.
            return_dict (`bool`, *optional*): return a ModelOutput instead of a tuple.
        """
        if (labels is not None or value_labels is not None) and logits_to_keep:
            raise ValueError("labels cannot be combined with logits_to_keep; use logits_to_keep=0 for training.")
        flat_batch = None
        if num_neurons is not None:  # generate's flattened (batch*neurons, steps) form
            flat_batch, input_ids, inputs_embeds, labels = self._unflatten_grid(num_neurons, input_ids, inputs_embeds, labels)

        if neuron_identity is not None and neuron_identity.dim() == 2:  # one identity for every trial of the batch
            grid = input_ids if input_ids is not None else inputs_embeds
            neuron_identity = neuron_identity.expand(grid.shape[0], -1, -1)
        outputs = self.model(
            input_ids=input_ids, inputs_embeds=inputs_embeds, neuron_ids=neuron_ids, session_ids=session_ids,
            neuron_mask=neuron_mask, cache=cache, use_cache=use_cache, output_hidden_states=output_hidden_states,
            neuron_identity=neuron_identity, return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, :, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        value_predictions = self.predict_values(hidden_states, value_inputs if value_inputs is not None else value_labels,
                                                neuron_identity)
        next_token_loss = self._checked_next_token_loss(logits, labels, neuron_mask) if labels is not None else None
        value_loss = self.value_loss(value_predictions, value_labels, neuron_mask) if value_labels is not None else None
        offsets = self.quantile_offsets(hidden_states) if value_predictions is not None else None
        quantile_loss = None
        if value_labels is not None and offsets is not None:
            quantile_loss = self.quantile_loss(offsets, value_predictions, value_labels, neuron_mask)
        # the frame-level quantiles are big (every step, frame and level): training reads only the loss
        value_quantiles = None if self.training else self.predict_quantiles(offsets, value_predictions)
        if flat_batch is not None:
            logits = logits.reshape(flat_batch, logits.shape[2], logits.shape[3])
        return CalmCausalNeuralModelingOutput(
            loss=self.weighted_loss(next_token_loss, value_loss, quantile_loss),
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            next_token_loss=next_token_loss,
            value_loss=value_loss,
            value_predictions=value_predictions,
            quantile_loss=quantile_loss,
            value_quantiles=value_quantiles,
        )

    def _checked_next_token_loss(self, logits: torch.Tensor, labels: torch.Tensor,
                                 neuron_mask: torch.Tensor | None) -> torch.Tensor:
        """`next_token_loss`, with cross-entropy's "Target k is out of bounds" (a label outside the vocabulary that
        no entry point validated) named as the label problem it is; no host sync on the normal path. On CPU only: on
        a GPU the same label is a device-side assert, which the trainer's `validate_inputs` keeps from happening."""
        try:
            return self.next_token_loss(logits, labels, neuron_mask)
        except IndexError as error:
            if "out of bounds" not in str(error):
                raise
            raise ValueError(
                f"labels hold a code outside [0, {self.config.vocab_size}) that is not -100 ({error}): use codes from "
                "the tokenizer this model was built for and -100 for targets to ignore (validate_inputs(config, "
                "input_ids, labels=labels) finds them)."
            ) from None

    @staticmethod
    def _unflatten_grid(
        num_neurons: int,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        labels: torch.Tensor | None,
    ) -> tuple[int | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """`(batch*neurons, steps)` inputs (as generate passes them) -> `(batch, neurons, steps)`; returns the flat
        batch size (None when the inputs were already a grid) and the reshaped tensors."""
        main = input_ids if input_ids is not None else inputs_embeds
        expected_dim = 2 if input_ids is not None else 3
        if main is None or main.dim() != expected_dim:
            return None, input_ids, inputs_embeds, labels
        if main.shape[0] % num_neurons != 0:
            raise ValueError(f"The flattened batch {main.shape[0]} is not a multiple of num_neurons={num_neurons}.")
        if input_ids is not None:
            input_ids = input_ids.reshape(-1, num_neurons, input_ids.shape[-1])
        else:
            inputs_embeds = inputs_embeds.reshape(-1, num_neurons, *inputs_embeds.shape[1:])
        if labels is not None and labels.dim() == 2:
            labels = labels.reshape(-1, num_neurons, labels.shape[-1])
        return main.shape[0], input_ids, inputs_embeds, labels

    @torch.no_grad()
    def forecast_values(
        self,
        input_ids: torch.LongTensor,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        context_values: torch.FloatTensor | None = None,
        neuron_identity: torch.FloatTensor | None = None,
        return_quantiles: bool = False,
    ) -> torch.FloatTensor | tuple[torch.FloatTensor, torch.FloatTensor]:
        r"""
        Point forecast of the continuous head: the conditional mean of the next `value_head_steps * window_size`
        frames after the context, in z-scored units, from one forward pass (no token rollout, so no drift).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, neurons, token_steps)`): context codes.
            neuron_ids, session_ids, neuron_mask, neuron_identity: as in `forward`.
            context_values (`torch.FloatTensor` of shape `(batch, neurons, token_steps * window_size)`, *optional*):
                The z-scored context traces behind `input_ids`; required by a model with `value_skip_windows > 0`.
            return_quantiles (`bool`, *optional*, defaults to `False`): also return the quantile head's quantiles
                (a model with `config.quantile_levels`).

        Returns:
            `torch.FloatTensor` of shape `(batch, neurons, value_head_steps * window_size)`; with `return_quantiles`,
            the tuple `(forecast, quantiles)`, quantiles of shape `(batch, neurons, frames, len(quantile_levels))`.
        """
        if self.value_head is None:
            raise ValueError(
                "This checkpoint has no continuous forecast head (config.value_head_steps=0); forecast by token "
                "rollout instead (generate / CalmForecaster with mode='greedy', 'mean' or 'soft')."
            )
        if return_quantiles and self.quantile_head is None:
            raise ValueError("This checkpoint has no quantile head (config.quantile_levels is None): its bands come "
                             "from sampled rollouts (CalmForecaster(..., num_samples=16)).")
        input_ids = validate_inputs(self.config, input_ids, neuron_ids, session_ids, neuron_mask,
                                    neuron_identity=neuron_identity)
        if self.value_skip is not None and context_values is None:
            raise ValueError(
                f"This model's forecast head also reads each neuron's last {self.config.value_skip_windows} windows of "
                "raw trace (config.value_skip_windows): pass context_values, the z-scored traces behind input_ids "
                "(CalmForecaster does)."
            )
        outputs = self(
            input_ids=input_ids, neuron_ids=neuron_ids, session_ids=session_ids, neuron_mask=neuron_mask,
            use_cache=False, logits_to_keep=1, return_dict=True, value_inputs=context_values,
            neuron_identity=neuron_identity,
        )
        forecast = outputs.value_predictions[:, :, -1].float()
        return (forecast, outputs.value_quantiles[:, :, -1].float()) if return_quantiles else forecast


CalmConfig.register_for_auto_class()
CalmModel.register_for_auto_class("AutoModel")
CalmForCausalNeuralModeling.register_for_auto_class("AutoModelForCausalLM")


__all__ = [
    "CalmCausalNeuralModelingOutput",
    "CalmDualAxisLayer",
    "CalmForCausalNeuralModeling",
    "CalmModel",
    "CalmModelOutput",
    "CalmPreTrainedModel",
    "CalmRolloutOutput",
    "validate_inputs",
]
