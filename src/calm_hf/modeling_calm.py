"""CalM dual-axis transformer (DAT): attention across neurons at every step, causal attention across time per neuron."""

from __future__ import annotations

import inspect
import numbers
import os
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationConfig, GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging

from .configuration_calm import CalmConfig


logger = logging.get_logger(__name__)


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
        past_key_values (`Cache`, *optional*):
            Time-axis KV cache, one layer per DAT layer, batch dimension `batch * neurons`.
        hidden_states (`tuple(torch.FloatTensor)`, *optional*):
            Embedding output and the output of every layer, each `(batch, neurons, token_steps, hidden_size)`.
    """

    last_hidden_state: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
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
        past_key_values (`Cache`, *optional*):
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
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    past_key_values: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    scheduled_sampling_applied: torch.BoolTensor | None = None
    next_token_loss: torch.FloatTensor | None = None
    value_loss: torch.FloatTensor | None = None
    value_predictions: torch.FloatTensor | None = None


@dataclass
class CalmRolloutOutput(ModelOutput):
    """
    Output of [`CalmForCausalNeuralModeling.rollout`].

    Args:
        codes (`torch.LongTensor` of shape `(batch, neurons, token_steps + max_new_tokens)`):
            Context followed by the rolled-out codes (argmax codes in "greedy" and "soft" mode, drawn codes in
            "sample" mode).
        probabilities (`torch.FloatTensor` of shape `(batch, neurons, max_new_tokens, vocab_size)`):
            Predicted code distribution at every rolled-out step (after temperature / top-k).
    """

    codes: torch.LongTensor | None = None
    probabilities: torch.FloatTensor | None = None


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
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


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


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1 = x[..., : x.shape[-1] // 2]
    x2 = x[..., x.shape[-1] // 2 :]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(
    query: torch.Tensor, key: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    # query/key (sequences, heads, steps, head_dim); cos/sin (steps, head_dim)
    cos, sin = cos.to(query.dtype), sin.to(query.dtype)
    return (query * cos) + (rotate_half(query) * sin), (key * cos) + (rotate_half(key) * sin)


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


def eager_attention_max_bytes() -> int:
    """Memory the eager attention may spend on its score matrices per call (env `CALM_EAGER_ATTENTION_MAX_GIB`,
    default 4 GiB). Eager attention materialises (sequences, heads, length, length) float32 scores: across 20k
    neurons that is ~370 GB, so larger calls are split over sequences, and refused when one sequence alone is too big."""
    return int(float(os.environ.get("CALM_EAGER_ATTENTION_MAX_GIB", "4")) * 2**30)


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
        past_key_values: Cache | None = None,
    ) -> torch.Tensor:
        # hidden_states (sequences, length, hidden): sequences = batch*steps (neuron axis) or batch*neurons (time axis)
        num_sequences, length, hidden_size = hidden_states.shape
        qkv = self.qkv_proj(hidden_states).view(num_sequences, length, 3, self.num_heads, self.head_dim)
        query, key, value = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (sequences, heads, length, head_dim)
        if position_embeddings is not None:
            query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        is_causal = self.is_causal
        kv_len = key.shape[2]
        if is_causal and 1 < length < kv_len:
            # several new steps on top of a cache: SDPA's is_causal is top-left aligned, so give the mask explicitly
            attention_mask = torch.ones(length, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - length)
            is_causal = False
        elif is_causal and length == 1:
            is_causal = False  # one new step attends to the whole cache

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
        self, hidden_states: torch.Tensor, identity_states: torch.Tensor, neuron_weight: torch.Tensor
    ) -> torch.Tensor:
        # hidden_states (batch, neurons, steps, hidden); identity_states (batch, neurons, hidden);
        # neuron_weight (batch, neurons): 1/n_real for real neurons, 0 for padding
        keys = self.key(identity_states) * neuron_weight[:, :, None]  # (batch, neurons, rank)
        values = self.value(self.norm(hidden_states))  # (batch, neurons, steps, hidden)
        summary = torch.einsum("bnr,bnth->btrh", keys, values)  # (batch, steps, rank, hidden): population state
        mixed = torch.einsum("bnr,btrh->bnth", self.query(identity_states), summary)
        return self.o_proj(mixed)


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
        self.dropout = nn.Dropout(config.hidden_dropout)

    def forward(
        self,
        hidden_states: torch.Tensor,
        neuron_attention_mask: torch.Tensor | None = None,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        past_key_values: Cache | None = None,
        identity_states: torch.Tensor | None = None,
        neuron_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        batch_size, num_neurons, num_steps, hidden_size = hidden_states.shape

        # (batch*steps, neurons, hidden): bidirectional attention across neurons within each step
        residual = hidden_states
        hidden = self.neuron_norm(hidden_states).transpose(1, 2).reshape(batch_size * num_steps, num_neurons, -1)
        hidden = self.neuron_attn(hidden, attention_mask=neuron_attention_mask)
        hidden = hidden.view(batch_size, num_steps, num_neurons, hidden_size).transpose(1, 2)
        if self.mixer is not None:
            hidden = hidden + self.mixer(hidden_states, identity_states, neuron_weight)
        hidden_states = residual + self.dropout(hidden)

        # (batch*neurons, steps, hidden): causal attention across time for each neuron
        residual = hidden_states
        hidden = self.time_norm(hidden_states).reshape(batch_size * num_neurons, num_steps, hidden_size)
        hidden = self.time_attn(hidden, position_embeddings=position_embeddings, past_key_values=past_key_values)
        hidden_states = residual + self.dropout(hidden.view(batch_size, num_neurons, num_steps, hidden_size))

        residual = hidden_states
        hidden_states = residual + self.dropout(self.mlp(self.ffn_norm(hidden_states)))
        return hidden_states


class CalmIdEmbedding(nn.Embedding):
    """Neuron / session embedding table that can train a subset of rows while the others stay bit-identical.

    In adaptation mode (`train_only_rows`) the table itself is frozen and the selected rows live in a separate
    parameter `trainable_rows`; the forward writes them into a copy of the table. `state_dict()` folds them back into
    `weight` (checkpoints keep the usual layout), so saving mid-adaptation works.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.register_parameter("trainable_rows", None)
        self.register_buffer("trainable_row_ids", None, persistent=False)
        self.register_state_dict_post_hook(self._fold_trainable_rows)
        self.register_load_state_dict_pre_hook(self._unfold_trainable_rows)

    @property
    def is_adapting(self) -> bool:
        return self.trainable_rows is not None

    def train_only_rows(self, row_ids: torch.Tensor) -> nn.Parameter:
        row_ids = torch.as_tensor(row_ids, dtype=torch.long, device=self.weight.device).flatten().unique()
        if row_ids.numel() and not 0 <= int(row_ids.min()) <= int(row_ids.max()) < self.num_embeddings:
            raise ValueError(
                f"Rows {row_ids.tolist()} are outside the table of {self.num_embeddings} rows; grow it first "
                "(model.add_session(...) or resize_*_embeddings)."
            )
        self.merge_trainable_rows()
        self.weight.requires_grad_(False)
        self.trainable_row_ids = row_ids
        self.trainable_rows = nn.Parameter(self.weight.detach()[row_ids].clone())
        return self.trainable_rows

    @torch.no_grad()
    def merge_trainable_rows(self) -> None:
        if self.trainable_rows is not None:
            self.weight[self.trainable_row_ids] = self.trainable_rows.to(self.weight.dtype)
            self.trainable_rows = None
            self.trainable_row_ids = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.trainable_rows is not None:
            weight = weight.index_copy(0, self.trainable_row_ids, self.trainable_rows.to(weight.dtype))
        return F.embedding(ids, weight)

    @staticmethod
    def _fold_trainable_rows(module, state_dict, prefix, local_metadata) -> None:
        if module.trainable_rows is not None:
            weight = state_dict[prefix + "weight"].detach().clone()
            weight[module.trainable_row_ids] = module.trainable_rows.detach().to(weight.dtype)
            state_dict[prefix + "weight"] = weight
            state_dict.pop(prefix + "trainable_rows", None)

    def _unfold_trainable_rows(self, state_dict, prefix, *args) -> None:
        if self.trainable_rows is not None and prefix + "trainable_rows" not in state_dict:
            state_dict[prefix + "trainable_rows"] = state_dict[prefix + "weight"][self.trainable_row_ids].clone()


# ----------------------------------------------------------------------------------------------------------------------
# Pretrained base: init, auto_map, adaptation to new sessions
# ----------------------------------------------------------------------------------------------------------------------


def _as_integer_tensor(values: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    """Accept integer codes/ids of any integer dtype (int16 is what `with_format("numpy")` gives for tokenized
    datasets), as a tensor, numpy array or nested list, and return them as a long tensor; refuse everything else
    (floats, bools, complex, objects) with a message instead of an indexing error deep inside an embedding."""
    if not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"{name} must be an integer tensor, numpy array or nested list of integers, got "
                f"{type(values).__name__} ({error})."
            ) from None
    if values.dtype == torch.bool or values.dtype.is_floating_point or values.dtype.is_complex:
        raise TypeError(
            f"{name} must hold integers, got dtype {values.dtype}; "
            + ("tokenize traces with CalmTokenizer.encode first." if name == "input_ids" else "pass integer ids.")
        )
    return values.to(device=device if device is not None else values.device, dtype=torch.long)


def _as_id_tensor(ids: int | Sequence[int] | torch.Tensor | None) -> torch.Tensor:
    if ids is None:
        return torch.zeros(0, dtype=torch.long)
    return torch.as_tensor(ids, dtype=torch.long).flatten()


def _check_input_id_values(config: CalmConfig, input_ids: torch.Tensor) -> None:
    """Grid shape, integer dtype, codes inside the vocabulary, at least one step and neuron, at most max_token_steps."""
    if input_ids.dim() != 3:
        raise ValueError(
            f"input_ids must be a (batch, neurons, token_steps) grid of codes, got shape {tuple(input_ids.shape)};"
            " add the missing axes (e.g. input_ids[None] for one trial)."
        )
    if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
        raise ValueError(
            f"input_ids must hold integer codes, got dtype {input_ids.dtype}; tokenize traces with "
            "CalmTokenizer.encode first."
        )
    if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= config.vocab_size):
        raise ValueError(
            f"input_ids contain codes in [{int(input_ids.min())}, {int(input_ids.max())}]: the tokenizer "
            f"codebook_size (at least {int(input_ids.max()) + 1}) differs from model vocab_size "
            f"{config.vocab_size}. Use the tokenizer this model was trained with."
        )
    _check_grid_size(config, input_ids.shape[1], input_ids.shape[2])


def _check_grid_size(config: CalmConfig, num_neurons: int, num_steps: int, past_length: int = 0) -> None:
    """Shape-only checks (no host sync): forward runs them on every call."""
    if num_steps < 1 or num_neurons < 1:
        raise ValueError(
            f"The context must hold at least 1 token step and 1 neuron, got {num_neurons} neurons x {num_steps} "
            "steps; give at least window_size frames of context."
        )
    if past_length + num_steps > config.max_token_steps:
        raise ValueError(
            f"{past_length + num_steps} token steps exceed max_token_steps={config.max_token_steps}; crop the "
            "context (keep the most recent steps) or generate fewer new tokens."
        )


def _check_identity_values(config: CalmConfig, neuron_ids: torch.Tensor, session_ids: torch.Tensor) -> None:
    """Neuron and session ids inside the embedding tables (two host syncs)."""
    if neuron_ids.numel() and (int(neuron_ids.min()) < 0 or int(neuron_ids.max()) >= config.num_neurons):
        raise ValueError(
            f"neuron_ids range over [{int(neuron_ids.min())}, {int(neuron_ids.max())}] but the model has "
            f"num_neurons={config.num_neurons}; for a new session call model.add_session(name, num_neurons) "
            "or resize_neuron_embeddings(...)."
        )
    if session_ids.numel() and (int(session_ids.min()) < 0 or int(session_ids.max()) >= config.num_sessions):
        raise ValueError(
            f"Unknown session id {session_ids.tolist()}: the model has num_sessions={config.num_sessions} "
            f"(names: {config.session_names}); add the session with model.add_session(name, num_neurons)."
        )


def _check_label_values(config: CalmConfig, labels: Any, neuron_mask: torch.Tensor | None) -> None:
    """Out-of-vocabulary targets give an IndexError (or a device assert) inside cross_entropy, and a batch whose
    targets are all -100 trains nothing: name both (one host sync)."""
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"labels must hold integer codes (or -100 to ignore), got dtype {labels.dtype}.")
    if neuron_mask is not None and labels.dim() == 3:
        labels = labels.masked_fill(~neuron_mask.to(labels.device).bool()[:, :, None], -100)
    shift_labels = labels[..., 1:]
    scored = shift_labels != -100
    out_of_vocab = scored & ((shift_labels < 0) | (shift_labels >= config.vocab_size))
    num_scored, num_bad = torch.stack([scored.sum(), out_of_vocab.sum()]).tolist()
    if num_bad:
        bad = shift_labels[out_of_vocab]
        raise ValueError(
            f"labels hold {num_bad} code(s) outside [0, {config.vocab_size}) and not -100 (e.g. {int(bad[0])}): use "
            "codes from the tokenizer this model was built for, and -100 for targets to ignore."
        )
    if num_scored == 0:
        raise ValueError(
            "Every label is -100 (or masked by neuron_mask) after the one-step shift, so nothing would be trained: "
            "give at least 2 token steps and at least one real neuron with real labels."
        )


def validate_inputs(
    config: CalmConfig,
    input_ids: Any = None,
    neuron_ids: Any = None,
    session_ids: Any = None,
    neuron_mask: Any = None,
    labels: Any = None,
) -> None:
    r"""
    Checks a batch for a CalM model once, where it enters (`generate`, `rollout`, `forecast_values`, the forecasting
    pipeline, the data collator, `CalmForBehaviorRegression.forward`), with the fix in every message. The value checks
    read tensors back to the host; `forward` itself only checks shapes, so training and generation steps do not sync.

    Args:
        config ([`CalmConfig`]): the model's config.
        input_ids (`torch.LongTensor` of shape `(batch, neurons, token_steps)`, *optional*): codes.
        neuron_ids (`torch.LongTensor` of shape `(batch, neurons)` or `(neurons,)`, *optional*): global neuron ids.
        session_ids (`torch.LongTensor` of shape `(batch,)` or `()`, *optional*): session ids.
        neuron_mask (`torch.BoolTensor` of shape `(batch, neurons)`, *optional*): False marks padded neurons.
        labels (`torch.LongTensor` of shape `(batch, neurons, token_steps)`, *optional*): next-token targets.

    Raises:
        `ValueError` / `TypeError` naming the problem and the fix.
    """
    if input_ids is not None:
        if not isinstance(input_ids, torch.Tensor):  # numpy arrays and nested lists of codes
            input_ids = _as_integer_tensor(input_ids, "input_ids")
        _check_input_id_values(config, input_ids)
        batch_size, num_neurons, _ = input_ids.shape
        neuron_ids, session_ids, neuron_mask = _identity_inputs(
            batch_size, num_neurons, input_ids.device, neuron_ids, session_ids, neuron_mask
        )
        _check_identity_values(config, neuron_ids, session_ids)
    if labels is not None:
        if input_ids is not None and tuple(torch.as_tensor(labels).shape) != tuple(input_ids.shape):
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                f"{tuple(torch.as_tensor(labels).shape)}."
            )
        _check_label_values(config, labels, neuron_mask)


def _identity_inputs(
    batch_size: int,
    num_neurons: int,
    device: torch.device,
    neuron_ids: Any = None,
    session_ids: Any = None,
    neuron_mask: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fills defaults (`neuron_ids = arange(neurons)`, `session_ids = 0`) and checks dtypes and shapes (no host
    sync); returns `(neuron_ids, session_ids, neuron_mask)` as long, long and bool tensors on `device`."""
    if neuron_ids is None:
        neuron_ids = torch.arange(num_neurons, device=device).expand(batch_size, num_neurons)
    neuron_ids = _as_integer_tensor(neuron_ids, "neuron_ids", device)
    if neuron_ids.dim() == 1:
        neuron_ids = neuron_ids.expand(batch_size, -1)
    if neuron_ids.shape != (batch_size, num_neurons):
        raise ValueError(
            f"neuron_ids must have shape (batch, neurons) = {(batch_size, num_neurons)}, got "
            f"{tuple(neuron_ids.shape)}."
        )
    if session_ids is None:
        session_ids = torch.zeros(batch_size, dtype=torch.long, device=device)
    session_ids = _as_integer_tensor(session_ids, "session_ids", device)
    if session_ids.dim() == 0:
        session_ids = session_ids.expand(batch_size)
    if session_ids.shape != (batch_size,):
        raise ValueError(f"session_ids must have shape (batch,) = ({batch_size},), got {tuple(session_ids.shape)}.")
    if neuron_mask is not None:
        neuron_mask = torch.as_tensor(neuron_mask, device=device)
        if neuron_mask.shape != (batch_size, num_neurons):
            raise ValueError(
                f"neuron_mask must have shape (batch, neurons) = {(batch_size, num_neurons)}, got "
                f"{tuple(neuron_mask.shape)}."
            )
        neuron_mask = neuron_mask.bool()
    return neuron_ids, session_ids, neuron_mask


WEIGHT_CHECKSUMS = "checksums.sha256"


def _sha256_of_file(path: str) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_weight_checksums(save_directory) -> None:
    """Record the sha256 of every weights file in `<save_directory>/checksums.sha256` (the `sha256sum` format, so
    `sha256sum -c checksums.sha256` checks a copy by hand); `load_checked_pretrained` verifies it on load."""
    names = sorted(name for name in os.listdir(save_directory) if name.endswith(".safetensors"))
    lines = [f"{_sha256_of_file(os.path.join(save_directory, name))}  {name}\n" for name in names]
    staging = os.path.join(save_directory, WEIGHT_CHECKSUMS + ".partial")
    with open(staging, "w") as handle:
        handle.writelines(lines)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, os.path.join(save_directory, WEIGHT_CHECKSUMS))


def verify_weight_checksums(folder: str) -> None:
    """Raise a ValueError naming the file when a weights file differs from the hash recorded at save time (bit
    flips, a partial copy that still parses). Folders saved without checksums are not checked."""
    record = os.path.join(folder, WEIGHT_CHECKSUMS)
    if not os.path.isfile(record):
        return
    with open(record) as handle:
        entries = [line.strip().split(None, 1) for line in handle if line.strip()]
    for entry in entries:
        if len(entry) != 2:
            raise ValueError(f"{record} is garbled (line {' '.join(entry)!r}); re-save the checkpoint.")
        expected, name = entry[0], entry[1].lstrip("*")
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue  # a missing file gets transformers' own error
        actual = _sha256_of_file(path)
        if actual != expected:
            raise ValueError(
                f"{path} does not match the sha256 recorded when it was saved ({record}): expected {expected}, "
                f"got {actual}. The file is corrupt (bit flips or an incomplete copy): copy or download it again. (If you "
                "replaced the weights on purpose without save_pretrained, delete checksums.sha256 or re-save.)"
            )


def load_checked_pretrained(load: Callable, pretrained_model_name_or_path, args: tuple, kwargs: dict):
    """`PreTrainedModel.from_pretrained` with the checks a user needs to trust what loaded: a missing local folder
    (e.g. a checkpoint without its `tokenizer/` subfolder) is a FileNotFoundError naming it, not a "Repo id must be
    in the form ..." hub error; a truncated or garbled safetensors file is an error naming the file; and layers that
    `config.json` declares but the weights lack (or the reverse) are an error, not freshly initialised layers."""
    kwargs = dict(kwargs)
    want_info = kwargs.pop("output_loading_info", False)
    folder = None
    if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
        path = os.path.expanduser(os.fspath(pretrained_model_name_or_path))
        parent = os.path.dirname(path)
        looks_local = os.path.isabs(path) or path.startswith(".") or os.path.isdir(path) or (parent and os.path.isdir(parent))
        if looks_local:
            folder = os.path.join(path, kwargs.get("subfolder") or "")
            if not os.path.isdir(folder):
                hint = ""
                if os.path.basename(os.path.normpath(folder)) == "tokenizer":
                    hint = (
                        " A CalM checkpoint keeps its CalmTokenizer in a `tokenizer/` subfolder (written by pretraining "
                        "and by the main job); point to the tokenizer folder you trained, or re-save the checkpoint."
                    )
                raise FileNotFoundError(f"No checkpoint folder at {folder}.{hint}")
    if folder is not None:
        verify_weight_checksums(folder)
    try:
        model, info = load(pretrained_model_name_or_path, *args, output_loading_info=True, **kwargs)
    except Exception as error:
        if "safetensor" not in type(error).__name__.lower() and "deserializ" not in str(error).lower():
            raise
        where = os.path.join(folder, "model.safetensors") if folder else f"the weights of {pretrained_model_name_or_path}"
        raise ValueError(
            f"{where} is truncated or corrupt and cannot be read ({type(error).__name__}: {error}); copy or download "
            "the checkpoint again, or re-save it with save_pretrained."
        ) from error
    layer_keys = [
        key
        for key in [*info.get("missing_keys", []), *info.get("unexpected_keys", [])]
        if re.search(r"(^|\.)layers\.\d+\.", key)
    ]
    if layer_keys:
        missing = sorted({re.search(r"([\w.]*layers\.\d+)\.", k).group(1) for k in info.get("missing_keys", []) if k in layer_keys})
        extra = sorted({re.search(r"([\w.]*layers\.\d+)\.", k).group(1) for k in info.get("unexpected_keys", []) if k in layer_keys})
        raise ValueError(
            f"config.json of {pretrained_model_name_or_path} does not match its weights: layers in the config but "
            f"not in the weights: {missing or 'none'}; layers in the weights but not in the config: {extra or 'none'}. "
            "Loading would leave randomly initialised (or dropped) layers; fix num_hidden_layers (or the encoder/decoder "
            "layer counts) in config.json to match the weights."
        )
    return (model, info) if want_info else model


class CalmPreTrainedModel(PreTrainedModel):
    config: CalmConfig
    config_class = CalmConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CalmDualAxisLayer"]
    _skip_keys_device_placement = ["past_key_values"]
    _supports_sdpa = True
    _supports_flash_attn = False
    _supports_flex_attn = False
    _supports_attention_backend = True

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

    def save_pretrained(self, save_directory, *args, **kwargs):
        # Both auto classes in auto_map, whichever class is saved, so AutoModel and AutoModelForCausalLM both load
        # the checkpoint with trust_remote_code=True.
        if self.is_remote_code():
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

    # -- growing the identity tables for new sessions / animals ------------------------------------------------------

    def _calm_backbone(self) -> CalmModel:
        return self.base_model

    def _resize_id_table(self, name: str, new_size: int) -> CalmIdEmbedding:
        backbone = self._calm_backbone()
        old: CalmIdEmbedding = getattr(backbone, name)
        if old.is_adapting:
            raise ValueError(
                f"{name} is in adaptation mode; call model.merge_adapted_embeddings() before resizing it."
            )
        if not isinstance(new_size, int) or new_size < 1:
            raise ValueError(f"The new size of {name} must be a positive integer, got {new_size!r}.")
        new = CalmIdEmbedding(new_size, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            keep = min(new_size, old.num_embeddings)
            new.weight[:keep] = old.weight[:keep]
            if new_size > old.num_embeddings:
                # mean init, like resize_token_embeddings(mean_resizing=True): new ids start at the population mean
                new.weight[old.num_embeddings :] = old.weight.mean(dim=0, keepdim=True)
        new.weight.requires_grad_(old.weight.requires_grad)
        setattr(backbone, name, new)
        return new

    def resize_neuron_embeddings(self, new_num_neurons: int) -> nn.Embedding:
        """Grows (or shrinks) the global neuron table to `new_num_neurons` rows; new rows start at the mean of the
        existing rows. Updates `config.num_neurons`."""
        ranges = self.config.session_neuron_ranges or []
        highest = max((stop for _, stop in ranges), default=0)
        if new_num_neurons < highest:
            raise ValueError(
                f"Cannot shrink the neuron table to {new_num_neurons} rows: session_neuron_ranges use ids up to "
                f"{highest}. Remove those sessions from the config first."
            )
        table = self._resize_id_table("neuron_embeddings", new_num_neurons)
        self.config.num_neurons = new_num_neurons
        return table

    def resize_session_embeddings(self, new_num_sessions: int) -> nn.Embedding:
        """Grows (or shrinks) the session table to `new_num_sessions` rows (mean init); updates `config.num_sessions`
        and truncates `session_names` / `session_neuron_ranges` when shrinking."""
        table = self._resize_id_table("session_embeddings", new_num_sessions)
        self.config.num_sessions = new_num_sessions
        if self.config.session_names is not None:
            self.config.session_names = self.config.session_names[:new_num_sessions]
        if self.config.session_neuron_ranges is not None:
            self.config.session_neuron_ranges = self.config.session_neuron_ranges[:new_num_sessions]
        return table

    def add_session(self, name: str, num_neurons: int) -> tuple[int, torch.Tensor]:
        """Adds a new session (e.g. a held-out animal): one session row and a fresh block of `num_neurons` neuron ids,
        both initialised at the mean of the existing rows and recorded in `config.session_names` /
        `config.session_neuron_ranges`. Sessions without a recorded name get `"session_<id>"` with an empty range.

        Returns:
            `(session_id, neuron_ids)` with `neuron_ids` a long tensor of shape `(num_neurons,)`.
        """
        config = self.config
        if not isinstance(num_neurons, int) or num_neurons < 1:
            raise ValueError(f"num_neurons must be a positive integer, got {num_neurons!r}.")
        names = list(config.session_names or [])
        ranges = [list(r) for r in (config.session_neuron_ranges or [])]
        if name in names:
            raise ValueError(f"Session {name!r} already exists (id {names.index(name)}); pick a new name.")
        old_sessions, old_neurons = config.num_sessions, config.num_neurons
        names += [f"session_{i}" for i in range(len(names), old_sessions)]
        ranges += [[0, 0] for _ in range(len(ranges), old_sessions)]
        self.resize_session_embeddings(old_sessions + 1)
        self.resize_neuron_embeddings(old_neurons + num_neurons)
        config.session_names = names + [name]
        config.session_neuron_ranges = ranges + [[old_neurons, old_neurons + num_neurons]]
        return old_sessions, torch.arange(old_neurons, old_neurons + num_neurons)

    def freeze_backbone_except_embeddings(
        self,
        session_ids: int | Sequence[int] | torch.Tensor | None = None,
        neuron_ids: int | Sequence[int] | torch.Tensor | None = None,
    ) -> list[nn.Parameter]:
        """Freezes every parameter and makes only the given rows of the session / neuron tables trainable.

        The rows are moved into separate parameters (`*.trainable_rows`), so every other weight, including the other
        rows of the same tables, stays bit-identical under any optimizer, weight decay included. Give the optimizer
        only the returned parameters (or `[p for p in model.parameters() if p.requires_grad]`, which is the same
        set; `Trainer` does this). `state_dict()`/`save_pretrained` fold the rows back into the tables; call
        [`merge_adapted_embeddings`] to end adaptation.

        Returns:
            The trainable parameters: `trainable_rows` of the session table and/or the neuron table.
        """
        session_ids, neuron_ids = _as_id_tensor(session_ids), _as_id_tensor(neuron_ids)
        if session_ids.numel() == 0 and neuron_ids.numel() == 0:
            raise ValueError("Pass the session_ids and/or neuron_ids to train, e.g. the ones add_session returned.")
        self.requires_grad_(False)
        backbone = self._calm_backbone()
        trainable = []
        if session_ids.numel():
            trainable.append(backbone.session_embeddings.train_only_rows(session_ids))
        if neuron_ids.numel():
            trainable.append(backbone.neuron_embeddings.train_only_rows(neuron_ids))
        return trainable

    def merge_adapted_embeddings(self) -> None:
        """Writes the adapted rows back into the (still frozen) tables and leaves adaptation mode."""
        backbone = self._calm_backbone()
        backbone.session_embeddings.merge_trainable_rows()
        backbone.neuron_embeddings.merge_trainable_rows()


# ----------------------------------------------------------------------------------------------------------------------
# Backbone
# ----------------------------------------------------------------------------------------------------------------------


class CalmModel(CalmPreTrainedModel):
    """The dual-axis transformer backbone: token grid `(batch, neurons, steps)` -> hidden states
    `(batch, neurons, steps, hidden)`."""

    # loading the backbone alone from a head checkpoint drops the head quietly
    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^codebook_neighbors$"]

    def __init__(self, config: CalmConfig) -> None:
        super().__init__(config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.neuron_embeddings = CalmIdEmbedding(config.num_neurons, config.hidden_size)
        self.session_embeddings = CalmIdEmbedding(config.num_sessions, config.hidden_size)
        self.embed_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList([CalmDualAxisLayer(config, idx) for idx in range(config.num_hidden_layers)])
        self.norm = CalmRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = CalmRotaryEmbedding(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    def prepare_identity_inputs(
        self,
        batch_size: int,
        num_neurons: int,
        device: torch.device,
        neuron_ids: torch.Tensor | None = None,
        session_ids: torch.Tensor | None = None,
        neuron_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Fills defaults (`neuron_ids = arange(neurons)`, `session_ids = 0`) and checks shapes and dtypes (the id
        ranges are checked by `validate_inputs`, where inputs enter)."""
        return _identity_inputs(batch_size, num_neurons, device, neuron_ids, session_ids, neuron_mask)

    def validate_input_ids(self, input_ids: torch.Tensor) -> None:
        """Shape, dtype and vocabulary range of a code grid (see `validate_inputs`)."""
        _check_input_id_values(self.config, input_ids)

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> CalmModelOutput | tuple:
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
            past_key_values (`Cache`, *optional*):
                Time-axis KV cache from a previous call; `input_ids` then holds only the new steps.
            use_cache (`bool`, *optional*):
                Return the KV cache (default: `config.use_cache` outside training).
            output_hidden_states (`bool`, *optional*):
                Return the embedding output and every layer's output.
            return_dict (`bool`, *optional*):
                Return a [`CalmModelOutput`] instead of a tuple.
        """
        config = self.config
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        return_dict = return_dict if return_dict is not None else config.return_dict
        use_cache = use_cache if use_cache is not None else (config.use_cache and not self.training)
        # shape checks only: value checks (code and id ranges) need host syncs and run once in `validate_inputs`
        batch_size, num_neurons, num_steps, device = self._grid_shape(input_ids, inputs_embeds)
        neuron_ids, session_ids, neuron_mask = _identity_inputs(
            batch_size, num_neurons, device, neuron_ids, session_ids, neuron_mask
        )
        if use_cache and past_key_values is None:
            past_key_values = DynamicCache(config=config)
        past_length = self._past_length(past_key_values, batch_size * num_neurons)
        _check_grid_size(config, num_neurons, num_steps, past_length)

        hidden_states, identity_states = self._embed(input_ids, inputs_embeds, neuron_ids, session_ids)
        position_ids = torch.arange(past_length, past_length + num_steps, device=device)
        layer_kwargs = {
            "neuron_attention_mask": self._neuron_attention_mask(neuron_mask, num_steps),
            "position_embeddings": self.rotary_emb(position_ids),
            "past_key_values": past_key_values,
            "identity_states": identity_states,
            "neuron_weight": self._neuron_weight(neuron_mask, batch_size, num_neurons, device),
        }

        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, **layer_kwargs)  # positional: gradient checkpointing needs it
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        hidden_states = self.norm(hidden_states)

        output = CalmModelOutput(
            last_hidden_state=hidden_states,
            past_key_values=past_key_values if use_cache else None,
            hidden_states=all_hidden_states,
        )
        return output if return_dict else output.to_tuple()

    def _grid_shape(
        self, input_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None
    ) -> tuple[int, int, int, torch.device]:
        """`(batch, neurons, steps, device)` of the grid, with the shape and dtype checks that need no host sync."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of input_ids (batch, neurons, steps) or inputs_embeds.")
        if input_ids is not None:
            if input_ids.dim() != 3:
                raise ValueError(
                    f"input_ids must be a (batch, neurons, token_steps) grid of codes, got shape "
                    f"{tuple(input_ids.shape)}; add the missing axes (e.g. input_ids[None] for one trial)."
                )
            if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
                raise ValueError(
                    f"input_ids must hold integer codes, got dtype {input_ids.dtype}; tokenize traces with "
                    "CalmTokenizer.encode first."
                )
            return (*input_ids.shape, input_ids.device)
        if inputs_embeds.dim() != 4 or inputs_embeds.shape[-1] != self.config.hidden_size:
            raise ValueError(
                f"inputs_embeds must have shape (batch, neurons, token_steps, {self.config.hidden_size}), got "
                f"{tuple(inputs_embeds.shape)}."
            )
        return (*inputs_embeds.shape[:3], inputs_embeds.device)

    def _embed(
        self,
        input_ids: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        neuron_ids: torch.Tensor,
        session_ids: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`(hidden_states (batch, neurons, steps, hidden), identity_states (batch, neurons, hidden))`: the token
        embedding plus who each neuron is (neuron + session embedding), which the neuron mixer reads again."""
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
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
    def _past_length(past_key_values: Cache | None, num_sequences: int) -> int:
        """Steps already in the time-axis cache (its shape, no host sync); the cache must belong to this grid."""
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_length and past_key_values.layers[0].keys.shape[0] != num_sequences:
            raise ValueError(
                f"past_key_values hold {past_key_values.layers[0].keys.shape[0]} sequences but the input has "
                f"batch*neurons = {num_sequences}; pass the cache returned for this same grid."
            )
        return past_length

    @staticmethod
    def _neuron_attention_mask(neuron_mask: torch.Tensor | None, num_steps: int) -> torch.Tensor | None:
        """`(batch*steps, 1, 1, neurons)` key mask of the neuron-axis attention (True = may be attended to)."""
        if neuron_mask is None:
            return None
        batch_size, num_neurons = neuron_mask.shape
        # a sample whose neurons are all padding attends to all of them (avoids NaN rows; its outputs are ignored)
        key_mask = neuron_mask | ~neuron_mask.any(dim=1, keepdim=True)
        key_mask = key_mask[:, None, :].expand(batch_size, num_steps, num_neurons)
        return key_mask.reshape(batch_size * num_steps, 1, 1, num_neurons)


# ----------------------------------------------------------------------------------------------------------------------
# Next-token head + generation
# ----------------------------------------------------------------------------------------------------------------------


class CalmForCausalNeuralModeling(CalmPreTrainedModel, GenerationMixin):
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
        # linear highway from each neuron's own last value_skip_windows windows of raw trace into the head's output
        self.value_skip = (
            nn.Linear(config.value_skip_windows * config.window_size, config.value_head_steps * config.window_size)
            if config.value_skip_windows > 0
            else None
        )
        # (vocab, k) nearest codebook neighbours by cosine similarity; -1 = not set (see set_codebook_neighbors)
        self.register_buffer(
            "codebook_neighbors", torch.full((config.vocab_size, config.neighbor_k), -1, dtype=torch.long)
        )
        self._warned_no_neighbors = False
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

    # -- training-time augmentations ----------------------------------------------------------------------------------

    @torch.no_grad()
    def set_codebook_neighbors(self, codebook: torch.Tensor) -> torch.Tensor:
        """Stores, for every code, its `config.neighbor_k` nearest other codes by cosine similarity.

        Args:
            codebook (`torch.FloatTensor` of shape `(vocab_size, dim)`): the tokenizer's codebook vectors.
        """
        vocab_size, k = self.config.vocab_size, self.config.neighbor_k
        if codebook.dim() != 2 or codebook.shape[0] != vocab_size:
            raise ValueError(
                f"codebook must have shape (vocab_size={vocab_size}, dim), got {tuple(codebook.shape)}: the tokenizer "
                f"codebook_size {codebook.shape[0] if codebook.dim() else '?'} differs from model vocab_size {vocab_size}."
            )
        unit = F.normalize(codebook.detach().float(), dim=-1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(float("-inf"))  # a code is not its own neighbour
        neighbors = similarity.topk(k, dim=-1).indices
        self.codebook_neighbors.copy_(neighbors.to(self.codebook_neighbors.device))
        return self.codebook_neighbors

    def augment_input_ids(
        self,
        input_ids: torch.LongTensor,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Applies the paper's training-time input corruptions (only in `model.train()`; identity in eval). The
        training step calls it (`calm_hf.trainer.augment_training_batch`, used by `CalmTrainer.compute_loss`);
        `forward` never does, so a forward is one pass of the model on the inputs it is given:
        scheduled sampling (probability `scheduled_sampling_prob` per batch, one block of `scheduled_sampling_block`
        steps replaced by the model's own one-step argmax predictions) and neighbourhood replacement (each token with
        probability `neighbor_replacement_prob` swapped for one of its `neighbor_k` nearest codes).

        Returns:
            `(input_ids, scheduled_sampling_applied)`.
        """
        config = self.config
        applied = torch.tensor(False, device=input_ids.device)
        if not self.training:
            return input_ids, applied
        num_steps = input_ids.shape[-1]
        block = min(config.scheduled_sampling_block, num_steps - 1)
        if config.scheduled_sampling_prob > 0 and block >= 1 and bool(torch.rand(()) < config.scheduled_sampling_prob):
            with torch.no_grad():
                hidden = self.model(
                    input_ids=input_ids, neuron_ids=neuron_ids, session_ids=session_ids, neuron_mask=neuron_mask,
                    use_cache=False,
                ).last_hidden_state
                # logits at step t predict step t+1
                predictions = self.lm_head(hidden[:, :, :-1]).argmax(dim=-1)
            start = int(torch.randint(1, num_steps - block + 1, ()))
            input_ids = input_ids.clone()
            input_ids[:, :, start : start + block] = predictions[:, :, start - 1 : start - 1 + block]
            applied = torch.tensor(True, device=input_ids.device)
        if config.neighbor_replacement_prob > 0:
            if int(self.codebook_neighbors[0, 0]) < 0:
                if not self._warned_no_neighbors:
                    warnings.warn(
                        "Neighbourhood replacement is enabled but model.set_codebook_neighbors(tokenizer codebook) "
                        "was never called; skipping it.",
                        stacklevel=2,
                    )
                    self._warned_no_neighbors = True
            else:
                replace = torch.rand(input_ids.shape, device=input_ids.device) < config.neighbor_replacement_prob
                choice = torch.randint(0, config.neighbor_k, input_ids.shape, device=input_ids.device)
                neighbors = self.codebook_neighbors[input_ids, choice]
                input_ids = torch.where(replace, neighbors, input_ids)
        return input_ids, applied

    # -- forward ------------------------------------------------------------------------------------------------------

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        labels: torch.LongTensor | None = None,
        value_labels: torch.FloatTensor | None = None,
        past_key_values: Cache | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        num_neurons: int | None = None,
        logits_to_keep: int = 0,
        value_inputs: torch.FloatTensor | None = None,
    ) -> CalmCausalNeuralModelingOutput | tuple:
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
            past_key_values (`Cache`, *optional*): time-axis KV cache.
            use_cache (`bool`, *optional*): return the KV cache.
            output_hidden_states (`bool`, *optional*): return the backbone's hidden states.
            return_dict (`bool`, *optional*): return a ModelOutput instead of a tuple.
            num_neurons (`int`, *optional*): number of neurons when the grid comes flattened.
            logits_to_keep (`int`, *optional*, defaults to 0): compute logits only for the last this many steps
                (0 = all).
            value_inputs (`torch.FloatTensor` of shape `(batch, neurons, token_steps * window_size)`, *optional*):
                The z-scored traces behind `input_ids`, read by the highway of a model with `value_skip_windows > 0`
                (default: `value_labels`, the same traces in training). Without either, such a model returns no
                `value_predictions`: its head is defined with the highway only.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if (labels is not None or value_labels is not None) and logits_to_keep:
            raise ValueError("labels cannot be combined with logits_to_keep; use logits_to_keep=0 for training.")
        flat_batch = None
        if num_neurons is not None:  # generate's flattened (batch*neurons, steps) form
            flat_batch, input_ids, inputs_embeds, labels = self._unflatten_grid(num_neurons, input_ids, inputs_embeds, labels)

        outputs = self.model(
            input_ids=input_ids,
            inputs_embeds=inputs_embeds,
            neuron_ids=neuron_ids,
            session_ids=session_ids,
            neuron_mask=neuron_mask,
            past_key_values=past_key_values,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
        )
        hidden_states = outputs.last_hidden_state
        if logits_to_keep:
            hidden_states = hidden_states[:, :, -logits_to_keep:]
        logits = self.lm_head(hidden_states)
        value_predictions = self.value_head(hidden_states) if self.value_head is not None else None
        if self.value_skip is not None:
            traces = value_inputs if value_inputs is not None else value_labels
            if traces is None:
                value_predictions = None
            else:
                value_predictions = value_predictions + self.value_skip_term(traces, hidden_states.shape)

        next_token_loss = self.next_token_loss(logits, labels, neuron_mask) if labels is not None else None
        value_loss = None
        if value_labels is not None:
            value_loss = self.value_loss(value_predictions, value_labels, neuron_mask)
        if flat_batch is not None:
            logits = logits.reshape(flat_batch, logits.shape[2], logits.shape[3])

        output = CalmCausalNeuralModelingOutput(
            loss=self.weighted_loss(next_token_loss, value_loss),
            logits=logits,
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            next_token_loss=next_token_loss,
            value_loss=value_loss,
            value_predictions=value_predictions,
        )
        return output if return_dict else output.to_tuple()

    def value_skip_term(self, traces: torch.Tensor, hidden_shape: torch.Size) -> torch.Tensor:
        """The highway's share of the head's forecast at each kept step: a linear map of the neuron's own trace over
        the last `value_skip_windows` windows up to that step (zeros before the trial starts)."""
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
        return self.value_skip(history)

    def weighted_loss(self, next_token_loss: torch.Tensor | None, value_loss: torch.Tensor | None) -> torch.Tensor | None:
        """`next_token_loss_weight * next_token_loss + value_loss_weight * value_loss` over the terms given."""
        terms = [self.config.next_token_loss_weight * next_token_loss] if next_token_loss is not None else []
        terms += [self.config.value_loss_weight * value_loss] if value_loss is not None else []
        return sum(terms) if terms else None

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
        frames = num_steps * window
        # (steps, horizon) frame index predicted by step t, offset k: (t + 1) * L + k
        target_index = (torch.arange(num_steps, device=value_labels.device)[:, None] + 1) * window + torch.arange(
            horizon, device=value_labels.device
        )
        valid = (target_index < frames).to(value_predictions.dtype)
        targets = value_labels.float()[:, :, target_index.clamp_max(frames - 1)]  # (batch, neurons, steps, horizon)
        weight = valid.expand(batch_size, num_neurons, num_steps, horizon)
        if neuron_mask is not None:
            weight = weight * neuron_mask.to(value_predictions.dtype)[:, :, None, None]
        squared = (value_predictions.float() - targets).pow(2) * weight
        return squared.sum() / weight.sum().clamp_min(1.0)

    @torch.no_grad()
    def forecast_values(
        self,
        input_ids: torch.LongTensor,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        context_values: torch.FloatTensor | None = None,
    ) -> torch.FloatTensor:
        r"""
        Point forecast of the continuous head: the conditional mean of the next `value_head_steps * window_size`
        frames after the context, in z-scored units, from one forward pass (no token rollout, so no drift).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, neurons, token_steps)`): context codes.
            neuron_ids, session_ids, neuron_mask: as in `forward`.
            context_values (`torch.FloatTensor` of shape `(batch, neurons, token_steps * window_size)`, *optional*):
                The z-scored context traces behind `input_ids`; required by a model with `value_skip_windows > 0`.

        Returns:
            `torch.FloatTensor` of shape `(batch, neurons, value_head_steps * window_size)`.
        """
        if self.value_head is None:
            raise ValueError(
                "This checkpoint has no continuous forecast head (config.value_head_steps=0); forecast by token "
                "rollout instead (generate / CalmForecaster with mode='greedy', 'mean' or 'soft')."
            )
        validate_inputs(self.config, input_ids, neuron_ids, session_ids, neuron_mask)
        if self.value_skip is not None and context_values is None:
            raise ValueError(
                f"This model's forecast head also reads each neuron's last {self.config.value_skip_windows} windows of "
                "raw trace (config.value_skip_windows): pass context_values, the z-scored traces behind input_ids "
                "(CalmForecaster does)."
            )
        outputs = self(
            input_ids=input_ids, neuron_ids=neuron_ids, session_ids=session_ids, neuron_mask=neuron_mask,
            use_cache=False, logits_to_keep=1, return_dict=True, value_inputs=context_values,
        )
        return outputs.value_predictions[:, :, -1].float()

    # -- generation ---------------------------------------------------------------------------------------------------

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        next_sequence_length: int | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        # input_ids (batch*neurons, steps so far); with a cache only the steps it has not seen are fed (one per step)
        past_length = past_key_values.get_seq_length() if past_key_values is not None else 0
        if past_length:
            input_ids = input_ids[:, past_length:]
        model_inputs = {"input_ids": input_ids.contiguous(), "past_key_values": past_key_values}
        if inputs_embeds is not None and is_first_iteration and not past_length:
            model_inputs = {"input_ids": None, "inputs_embeds": inputs_embeds, "past_key_values": past_key_values}
        forward_args = set(inspect.signature(self.forward).parameters)
        for key, value in kwargs.items():
            if key in forward_args and key not in model_inputs and key != "labels":
                model_inputs[key] = value
        return model_inputs

    def _generation_setting(self, name: str, generation_config: GenerationConfig | None, kwargs: dict):
        if kwargs.get(name) is not None:
            return kwargs[name]
        config = generation_config if generation_config is not None else self.generation_config
        return getattr(config, name, None)

    def _check_generation_arguments(self, generation_config: GenerationConfig | None, kwargs: dict) -> None:
        """Range-check the sampling arguments GenerationMixin accepts silently (top_p > 1 samples from the whole
        vocabulary, a fractional max_new_tokens adds an extra step)."""
        max_new_tokens = self._generation_setting("max_new_tokens", generation_config, kwargs)
        if max_new_tokens is not None and (
            isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, numbers.Integral) or max_new_tokens < 1
        ):
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        top_p = self._generation_setting("top_p", generation_config, kwargs)
        if top_p is not None and not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
            raise ValueError(f"top_p must lie in (0, 1] (1 = no nucleus filtering), got {top_p!r}.")
        top_k = self._generation_setting("top_k", generation_config, kwargs)
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
            raise ValueError(f"top_k must be a non-negative integer (0 = no top-k filtering), got {top_k!r}.")
        temperature = self._generation_setting("temperature", generation_config, kwargs)
        do_sample = self._generation_setting("do_sample", generation_config, kwargs)
        if do_sample and temperature is not None and not (
            isinstance(temperature, numbers.Real) and 0.0 < temperature < float("inf")
        ):
            raise ValueError(f"temperature must be a positive finite number, got {temperature!r}; use greedy for argmax.")

    def _prepare_generation(
        self,
        input_ids: Any,
        neuron_ids: Any,
        session_ids: Any,
        neuron_mask: Any,
        generation_config: GenerationConfig | None,
        generate_kwargs: dict,
    ) -> tuple[torch.LongTensor, dict[str, torch.Tensor | None]]:
        """Validates a `generate` call once (inputs and sampling arguments; `generate_kwargs` is edited in place) and
        expands the grid for `num_return_sequences` so the R samples of a trial keep their neurons together.

        Returns:
            `(input_ids (batch*R, neurons, steps), {"neuron_ids", "session_ids", "neuron_mask"} expanded alike)`.
        """
        if input_ids is None:
            raise ValueError("generate needs input_ids of shape (batch, neurons, token_steps): the context codes.")
        input_ids = _as_integer_tensor(input_ids, "input_ids")
        if input_ids.dim() == 3 and 0 in input_ids.shape:
            raise ValueError(
                f"input_ids of shape {tuple(input_ids.shape)} (batch, neurons, token_steps) is empty: generate needs "
                "at least 1 trial, 1 neuron and 1 token step (window_size frames) of context."
            )
        # the one value check of the whole rollout: the per-step forwards only check shapes
        validate_inputs(self.config, input_ids, neuron_ids, session_ids, neuron_mask)
        if generate_kwargs.get("inputs_embeds") is not None:
            raise ValueError("generate takes input_ids; for embedding feedback use model.rollout(..., mode='soft').")
        batch_size, num_neurons, num_steps = input_ids.shape
        self._check_generation_arguments(generation_config, generate_kwargs)
        identity = dict(zip(("neuron_ids", "session_ids", "neuron_mask"), self.model.prepare_identity_inputs(
            batch_size, num_neurons, input_ids.device, neuron_ids, session_ids, neuron_mask
        )))
        num_beams = self._generation_setting("num_beams", generation_config, generate_kwargs) or 1
        if num_beams > 1:
            raise ValueError("Beam search is not supported on the neuron grid; use greedy or do_sample=True.")
        num_return = generate_kwargs.pop("num_return_sequences", None)
        if num_return is None:
            config = generation_config if generation_config is not None else self.generation_config
            num_return = config.num_return_sequences or 1
        if isinstance(num_return, bool) or not isinstance(num_return, numbers.Integral) or num_return < 1:
            raise ValueError(f"num_return_sequences must be a positive integer, got {num_return!r}.")
        if generate_kwargs.get("max_length") is not None and generate_kwargs.get("max_new_tokens") is None:
            # max_length counts token steps of the grid; the default max_new_tokens would otherwise win
            generate_kwargs["max_new_tokens"] = generate_kwargs.pop("max_length") - num_steps
        max_new_tokens = self._generation_setting("max_new_tokens", generation_config, generate_kwargs)
        if max_new_tokens is not None and num_steps + max_new_tokens > self.config.max_token_steps:
            raise ValueError(
                f"{num_steps} context steps + {max_new_tokens} new steps exceed max_token_steps="
                f"{self.config.max_token_steps}; crop the context or lower max_new_tokens."
            )
        if num_return > 1:  # (batch*R, neurons, T)
            input_ids = input_ids.repeat_interleave(num_return, dim=0)
            identity = {name: None if value is None else value.repeat_interleave(num_return, dim=0)
                        for name, value in identity.items()}
        return input_ids, identity

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        generation_config: GenerationConfig | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor | ModelOutput:
        r"""
        Rolls the token grid forward in time with a KV cache (greedy, or sampling with temperature / top_k / top_p).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, neurons, token_steps)`): context codes.
            neuron_ids (`torch.LongTensor` of shape `(batch, neurons)`, *optional*): global neuron ids.
            session_ids (`torch.LongTensor` of shape `(batch,)`, *optional*): session ids.
            neuron_mask (`torch.BoolTensor` of shape `(batch, neurons)`, *optional*): False marks padded neurons.
            generation_config (`GenerationConfig`, *optional*): defaults to `model.generation_config`
                (`max_new_tokens=15`, greedy, no eos/pad).
            generate_kwargs: any `GenerationConfig` field (`max_new_tokens`, `do_sample`, `temperature`, `top_k`,
                `top_p`, `num_return_sequences`, `return_dict_in_generate`, `output_scores`, ...). Seed with
                `torch.manual_seed`.

        Returns:
            `torch.LongTensor` of shape `(batch * num_return_sequences, neurons, token_steps + new)`, rows grouped by
            input (`[b * R + r]` is sample r of input b); with `return_dict_in_generate=True` a
            `GenerateDecoderOnlyOutput` whose `sequences` has that shape and whose `scores`/`logits` are tuples of
            `(batch * R, neurons, vocab_size)`.
        """
        if input_ids is None:
            input_ids = generate_kwargs.pop("inputs", None)
        input_ids, identity = self._prepare_generation(
            input_ids, neuron_ids, session_ids, neuron_mask, generation_config, generate_kwargs
        )
        grid_batch, num_neurons, num_steps = input_ids.shape

        outputs = super().generate(
            input_ids.reshape(grid_batch * num_neurons, num_steps),
            generation_config=generation_config,
            num_return_sequences=1,
            num_neurons=num_neurons,
            **identity,
            **generate_kwargs,
        )

        def to_grid(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(grid_batch, num_neurons, *tensor.shape[1:])

        if isinstance(outputs, torch.Tensor):
            return to_grid(outputs)
        outputs.sequences = to_grid(outputs.sequences)
        for name in ("scores", "logits"):
            if getattr(outputs, name, None) is not None:
                setattr(outputs, name, tuple(to_grid(step) for step in getattr(outputs, name)))
        return outputs

    @staticmethod
    def _next_codes(
        logits: torch.Tensor, mode: str, temperature: float, top_k: int | None, generator: torch.Generator | None
    ) -> tuple[torch.Tensor, torch.LongTensor]:
        """`(probabilities, codes)` of one rollout step from `(batch, neurons, vocab)` logits (see `rollout`)."""
        logits = logits.float()
        if mode != "greedy":
            logits = logits / temperature
            if top_k is not None and top_k < logits.shape[-1]:
                threshold = logits.topk(top_k, dim=-1).values[..., -1:]
                logits = logits.masked_fill(logits < threshold, float("-inf"))
        probs = logits.softmax(dim=-1)
        if mode == "sample":
            next_codes = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
            return probs, next_codes.view(probs.shape[:-1])
        return probs, probs.argmax(dim=-1)

    @torch.no_grad()
    def rollout(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        mode: str = "greedy",
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
    ) -> CalmRolloutOutput:
        r"""
        Autoregressive rollout with a KV cache, with a choice of what is fed back at each step.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, neurons, token_steps)`): context codes.
            max_new_tokens (`int`): number of token steps to roll out.
            neuron_ids, session_ids, neuron_mask: as in `forward`.
            mode (`str`, *optional*, defaults to `"greedy"`):
                `"greedy"` feeds back the argmax code, `"sample"` a code drawn from the (temperature / top-k)
                distribution, `"soft"` the probability-weighted code embedding `probs @ embed_tokens.weight` (a
                mean-field rollout that does not collapse to typical codes); its returned codes are the argmax.
            temperature (`float`, *optional*, defaults to 1.0): softmax temperature ("sample" and "soft").
            top_k (`int`, *optional*): keep only the k most likely codes ("sample" and "soft").
            generator (`torch.Generator`, *optional*): random generator for "sample".

        Returns:
            [`CalmRolloutOutput`] with `codes` `(batch, neurons, token_steps + max_new_tokens)` and
            `probabilities` `(batch, neurons, max_new_tokens, vocab_size)`.
        """
        if mode not in ("greedy", "sample", "soft"):
            raise ValueError(f"mode must be 'greedy', 'sample' or 'soft', got {mode!r}.")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}; use mode='greedy' for argmax.")
        validate_inputs(self.config, input_ids, neuron_ids, session_ids, neuron_mask)
        if input_ids.shape[-1] + max_new_tokens > self.config.max_token_steps:
            raise ValueError(
                f"{input_ids.shape[-1]} context steps + {max_new_tokens} new steps exceed max_token_steps="
                f"{self.config.max_token_steps}; crop the context or roll out fewer steps."
            )
        identity = {"neuron_ids": neuron_ids, "session_ids": session_ids, "neuron_mask": neuron_mask}
        outputs = self(input_ids=input_ids, use_cache=True, logits_to_keep=1, return_dict=True, **identity)
        cache = outputs.past_key_values
        codes, probabilities = [], []
        for step in range(max_new_tokens):
            # (batch, neurons, vocab) distribution of the next step and the codes picked from it
            probs, next_codes = self._next_codes(outputs.logits[:, :, -1], mode, temperature, top_k, generator)
            codes.append(next_codes)
            probabilities.append(probs)
            if step == max_new_tokens - 1:
                break
            if mode == "soft":
                embedding = self.get_input_embeddings().weight
                feed = {"inputs_embeds": (probs.to(embedding.dtype) @ embedding)[:, :, None, :]}
            else:
                feed = {"input_ids": next_codes[:, :, None]}
            outputs = self(past_key_values=cache, use_cache=True, logits_to_keep=1, return_dict=True, **feed, **identity)
            cache = outputs.past_key_values
        return CalmRolloutOutput(
            codes=torch.cat([input_ids, torch.stack(codes, dim=-1)], dim=-1),
            probabilities=torch.stack(probabilities, dim=2),
        )


# ---------------------------------------------------------------------------------------------------------------
# Behaviour decoding from the frozen backbone
# ---------------------------------------------------------------------------------------------------------------

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


def _as_id_list(ids: int | Sequence[int] | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(ids, dtype=torch.long).flatten().unique()


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

    _keys_to_ignore_on_load_unexpected = [r"^lm_head\.", r"^codebook_neighbors$"]
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
        ids = _as_id_list(neuron_ids)
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

    def resize_neuron_embeddings(self, new_num_neurons: int) -> nn.Embedding:
        """Grows the backbone's neuron table (see [`CalmPreTrainedModel.resize_neuron_embeddings`]) and the head's
        neuron-weight bank alike; new bank rows start at zero (the neuron contributes nothing until trained)."""
        table = super().resize_neuron_embeddings(new_num_neurons)
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

    def _check_labels(self, labels: torch.Tensor, behavior_mask: torch.Tensor | None, batch_size: int, num_frames: int):
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
        return scored

    def _backbone_states(
        self,
        input_ids: torch.LongTensor | None,
        neuron_ids: torch.LongTensor | None,
        session_ids: torch.LongTensor | None,
        neuron_mask: torch.BoolTensor | None,
        backbone_hidden_states: torch.FloatTensor | None,
        output_hidden_states: bool | None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, CalmModelOutput | None]:
        """The backbone's `(batch, neurons, steps, hidden)` states (given, or computed without gradient when the
        backbone is frozen), with the validated identity inputs: `(hidden_states, neuron_ids, neuron_mask, outputs)`."""
        backbone_outputs = None
        if backbone_hidden_states is not None:
            if backbone_hidden_states.dim() != 4 or backbone_hidden_states.shape[-1] != self.config.hidden_size:
                raise ValueError(
                    f"backbone_hidden_states must have shape (batch, neurons, token_steps, {self.config.hidden_size}), "
                    f"got {tuple(backbone_hidden_states.shape)}."
                )
            if output_hidden_states:
                raise ValueError("output_hidden_states needs the backbone; pass input_ids instead of hidden states.")
            hidden_states = backbone_hidden_states
            batch_size, num_neurons, num_steps, _ = hidden_states.shape
            neuron_ids, session_ids, neuron_mask = self.model.prepare_identity_inputs(
                batch_size, num_neurons, hidden_states.device, neuron_ids, session_ids, neuron_mask
            )
            _check_identity_values(self.config, neuron_ids, session_ids)
        else:
            if input_ids is None:
                raise ValueError("Pass input_ids (batch, neurons, token_steps) (or precomputed backbone_hidden_states).")
            # this head's forward is its entry point (no generate or pipeline in front): the value checks run here
            validate_inputs(self.config, input_ids, neuron_ids, session_ids, neuron_mask)
            batch_size, num_neurons, num_steps = input_ids.shape
            neuron_ids, session_ids, neuron_mask = self.model.prepare_identity_inputs(
                batch_size, num_neurons, input_ids.device, neuron_ids, session_ids, neuron_mask
            )
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.backbone_frozen):
                backbone_outputs = self.model(
                    input_ids=input_ids,
                    neuron_ids=neuron_ids,
                    session_ids=session_ids,
                    neuron_mask=neuron_mask,
                    use_cache=False,
                    output_hidden_states=output_hidden_states,
                    return_dict=True,
                )
            hidden_states = backbone_outputs.last_hidden_state

        return hidden_states, neuron_ids, neuron_mask, backbone_outputs

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
        return_dict: bool | None = None,
    ) -> CalmBehaviorRegressionOutput | tuple:
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
            return_dict (`bool`, *optional*): return a [`CalmBehaviorRegressionOutput`] instead of a tuple.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        hidden_states, neuron_ids, neuron_mask, backbone_outputs = self._backbone_states(
            input_ids, neuron_ids, session_ids, neuron_mask, backbone_hidden_states, output_hidden_states
        )
        batch_size, num_neurons, num_steps, _ = hidden_states.shape
        bank_size = self.behavior_head.neuron_weights.shape[0]
        if int(neuron_ids.max()) >= bank_size:
            raise ValueError(
                f"neuron_ids go up to {int(neuron_ids.max())} but the head's bank has {bank_size} neurons; grow it "
                "with model.add_session(name, num_neurons) or model.resize_neuron_embeddings(...)."
            )
        num_frames = num_steps * self.window_size
        scored = None
        if labels is not None:
            scored = self._check_labels(labels, behavior_mask, batch_size, num_frames)

        neuron_weight = (
            torch.ones(batch_size, num_neurons, device=hidden_states.device)
            if neuron_mask is None
            else neuron_mask.to(hidden_states.device, torch.float32)
        )
        out = self.behavior_head(hidden_states, neuron_ids, neuron_weight)  # (batch, steps, channels*window)
        # token step t, output (channel m, offset l) -> frame t*L + l of channel m
        out = out.float().view(batch_size, num_steps, self.num_behavior_channels, self.window_size)
        predictions = out.permute(0, 2, 1, 3).reshape(batch_size, self.num_behavior_channels, num_frames)
        predictions = self.smoothing(predictions).float()

        loss = None
        if labels is not None:
            error = (predictions - torch.nan_to_num(labels.float())) ** 2
            loss = (error * scored).sum() / scored.sum().clamp(min=1)

        output = CalmBehaviorRegressionOutput(
            loss=loss,
            predictions=predictions,
            hidden_states=None if backbone_outputs is None else backbone_outputs.hidden_states,
        )
        return output if return_dict else output.to_tuple()


CalmConfig.register_for_auto_class()
CalmModel.register_for_auto_class("AutoModel")
CalmForCausalNeuralModeling.register_for_auto_class("AutoModelForCausalLM")


__all__ = [
    "BEHAVIOR_HEAD_DEFAULTS",
    "BEHAVIOR_HEAD_SETTINGS",
    "CalmBehaviorGLUHead",
    "CalmBehaviorLinearHead",
    "CalmBehaviorRegressionOutput",
    "CalmBehaviorSmoothing",
    "CalmCausalNeuralModelingOutput",
    "CalmDualAxisLayer",
    "CalmForBehaviorRegression",
    "CalmForCausalNeuralModeling",
    "CalmModel",
    "CalmModelOutput",
    "CalmPreTrainedModel",
    "CalmRolloutOutput",
    "behavior_head_settings",
    "config_with_head_settings",
    "validate_inputs",
]
