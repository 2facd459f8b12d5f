"""CalM neural quantizer (NQ): a VQ-VAE that turns each neuron's calcium trace into discrete tokens.

Pipeline for traces `(batch, neurons, frames)`: neurons are independent, so they are folded into the batch;
a strided Conv1d (kernel = stride = L) cuts every trace into token windows, RoPE Transformer layers (causal along
time) encode them, each vector snaps to its nearest codebook entry (Euclidean, fp32), and Transformer layers plus a
transposed conv decode the codes back to frames. Training losses follow the paper: reconstruction
`MSE + a (1 - r)`, commitment, codebook (embed) loss with EMA updates, Gumbel-softmax codebook entropy,
codebook orthogonality, dead-code revival from a queue of recent encoder vectors, and an auxiliary
autoregressive head predicting the next `ar_horizon` codes.
"""

import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils import ModelOutput, logging
from transformers.utils.generic import can_return_tuple

from .checked_loading import check_tokenizer_fingerprint, load_checked_pretrained, write_weight_checksums
from .configuration_calm_tokenizer import (
    CalmTokenizerConfig,
    plain_auto_map,
    rewrite_calm_tokenizer_auto_map,
)
from .validation_calm_tokenizer import check_codes, check_encoder_states, check_input_values

logger = logging.get_logger(__name__)


@dataclass
class CalmTokenizerEncoderOutput(ModelOutput):
    r"""
    codes (`torch.LongTensor` of shape `(batch, neurons, token_steps)`):
        Index of the nearest codebook entry for every window of `window_size` frames.
    quantized_embeddings (`torch.FloatTensor` of shape `(batch, neurons, token_steps, hidden_size)`):
        The codebook vectors of `codes` (what the decoder consumes).
    """

    codes: torch.LongTensor | None = None
    quantized_embeddings: torch.FloatTensor | None = None


@dataclass
class CalmTokenizerDecoderOutput(ModelOutput):
    r"""
    trace_values (`torch.FloatTensor` of shape `(batch, neurons, token_steps * window_size)`):
        Traces reconstructed from the codes.
    """

    trace_values: torch.FloatTensor | None = None


@dataclass
class CalmTokenizerOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor` of shape `()`):
        Weighted sum of all training losses below (only `reconstruction_loss` during the codebook warm-up).
    reconstruction_loss (`torch.FloatTensor` of shape `()`):
        `mse_loss + reconstruction_pearson_weight * pearson_loss`.
    mse_loss (`torch.FloatTensor` of shape `()`):
        Mean squared error between the reconstruction and the input traces.
    pearson_loss (`torch.FloatTensor` of shape `()`):
        `1 - r`, with `r` the Pearson correlation per trace averaged over traces.
    commitment_loss (`torch.FloatTensor` of shape `()`):
        `||z - sg[e]||^2` averaged over vectors and dimensions.
    embed_loss (`torch.FloatTensor` of shape `()`):
        `||sg[z] - e||^2` averaged over vectors and dimensions (codebook loss).
    entropy_loss (`torch.FloatTensor` of shape `()`):
        `log(K) - H(p)`, with `p` the batch-averaged Gumbel-softmax assignment (0 for perfectly even usage).
    orthogonality_loss (`torch.FloatTensor` of shape `()`):
        Mean of `(E E^T - I)^2` over the L2-normalised codebook.
    ar_loss (`torch.FloatTensor` of shape `()`):
        Cross-entropy of the auxiliary head predicting codes 1..`ar_horizon` steps ahead.
    codebook_perplexity (`torch.FloatTensor` of shape `()`):
        `exp(entropy)` of the hard code usage in the batch (K when all codes are used evenly).
    dead_codes (`torch.LongTensor` of shape `()`):
        Number of codes whose EMA usage is below `dead_code_threshold / K` (the revival criterion).
    codes (`torch.LongTensor` of shape `(batch, neurons, token_steps)`):
        The tokens of the input.
    trace_values (`torch.FloatTensor` of shape `(batch, neurons, frames)`):
        The reconstruction (decoded from the codes with straight-through gradients; from the continuous encoder
        output during the codebook warm-up).
    encoder_vectors (`torch.FloatTensor` of shape `(vectors, hidden_size)`, *optional*):
        Training mode only: the real neurons' encoder outputs (detached, fp32), what the codebook state update
        ([`CalmTokenizer.update_codebook_state`]) learns from.
    encoder_codes (`torch.LongTensor` of shape `(vectors,)`, *optional*):
        Training mode only: the code assigned to each of `encoder_vectors`.
    """

    loss: torch.FloatTensor | None = None
    reconstruction_loss: torch.FloatTensor | None = None
    mse_loss: torch.FloatTensor | None = None
    pearson_loss: torch.FloatTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    embed_loss: torch.FloatTensor | None = None
    entropy_loss: torch.FloatTensor | None = None
    orthogonality_loss: torch.FloatTensor | None = None
    ar_loss: torch.FloatTensor | None = None
    codebook_perplexity: torch.FloatTensor | None = None
    dead_codes: torch.LongTensor | None = None
    codes: torch.LongTensor | None = None
    trace_values: torch.FloatTensor | None = None
    encoder_vectors: torch.FloatTensor | None = None
    encoder_codes: torch.LongTensor | None = None


@dataclass
class CalmTokenizerQuantizerOutput(ModelOutput):
    r"""
    Output of [`CalmTokenizerQuantizer`].

    quantized (`torch.FloatTensor` of shape `(sequences, token_steps, hidden_size)`):
        The code vectors with straight-through gradients to the encoder (`z + sg[e - z]`).
    codes (`torch.LongTensor` of shape `(sequences, token_steps)`):
        Index of the nearest codebook entry of every encoder vector.
    commitment_loss, embed_loss, entropy_loss, orthogonality_loss, codebook_perplexity (`torch.FloatTensor` of shape `()`):
        As in [`CalmTokenizerOutput`], over the real neurons.
    encoder_vectors (`torch.FloatTensor` of shape `(vectors, hidden_size)`):
        The real neurons' encoder vectors (detached, fp32) and `encoder_codes` `(vectors,)` their codes: the
        statistics of the codebook state update.
    """

    quantized: torch.FloatTensor | None = None
    codes: torch.LongTensor | None = None
    commitment_loss: torch.FloatTensor | None = None
    embed_loss: torch.FloatTensor | None = None
    entropy_loss: torch.FloatTensor | None = None
    orthogonality_loss: torch.FloatTensor | None = None
    codebook_perplexity: torch.FloatTensor | None = None
    encoder_vectors: torch.FloatTensor | None = None
    encoder_codes: torch.LongTensor | None = None


# Copied from calm_hf.modeling_calm.apply_rotary_to_heads
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


# a new step attends to at most this many cached steps through `decode_step_attention` on a CPU
DECODE_STEP_MAX_KEYS = 16


# Copied from calm_hf.modeling_calm.decode_step_attention
def decode_step_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of one new step over a short cache, as a few elementwise passes: `query` `(sequences, heads, 1,
    head_dim)`, `key`/`value` `(sequences, heads, keys, head_dim)` (any strides) -> `(sequences, 1, heads, head_dim)`,
    the layout the attention interfaces return. Softmax in float32. On a CPU a fused attention kernel spends most of its
    time on per-sequence set-up when each of thousands of sequences has one query and a few keys."""
    scores = (query * key).sum(dim=-1, keepdim=True).float() * scaling  # (sequences, heads, keys, 1)
    weights = scores.softmax(dim=2).to(value.dtype)
    return (weights * value).sum(dim=2, keepdim=True).transpose(1, 2)


# Copied from calm_hf.modeling_calm.eager_attention_forward
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


# Copied from calm_hf.modeling_calm.CalmRotaryEmbedding with Calm->CalmTokenizer
class CalmTokenizerRotaryEmbedding(nn.Module):
    """RoPE over token steps (time axis only; neurons are an unordered set)."""

    def __init__(self, config: CalmTokenizerConfig) -> None:
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


class CalmTokenizerAttention(nn.Module):
    """Multi-head self-attention along time with RoPE; causal or bidirectional."""

    def __init__(self, config: CalmTokenizerConfig, is_causal: bool):
        super().__init__()
        self.config = config
        self.num_heads = config.num_attention_heads
        self.head_dim = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = is_causal
        self.num_key_value_groups = 1
        self.attention_dropout = config.dropout
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.o_proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                past: list | None = None) -> torch.Tensor:
        # past: this layer's [keys, values] of the steps seen before (a causal encoder fed piecewise), extended in place
        input_shape = hidden_states.shape[:-1]
        hidden_shape = (*input_shape, self.num_heads, self.head_dim)
        # (batch*neurons, heads, steps, head_dim)
        query = apply_rotary_to_heads(self.q_proj(hidden_states).view(hidden_shape), *position_embeddings)
        key = apply_rotary_to_heads(self.k_proj(hidden_states).view(hidden_shape), *position_embeddings)
        value = self.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)
        mask, is_causal = None, self.is_causal
        if past is not None:
            if past[0] is not None:
                key, value = torch.cat([past[0], key], dim=2), torch.cat([past[1], value], dim=2)
            past[:] = [key, value]
            steps, kv_len = query.shape[2], key.shape[2]
            if steps < kv_len:  # new steps on top of the past: bottom-right aligned causal mask (all of it for one)
                mask = torch.ones(steps, kv_len, dtype=torch.bool, device=query.device).tril(kv_len - steps)
                is_causal = False

        if (query.shape[2] == 1 and key.shape[2] <= DECODE_STEP_MAX_KEYS and query.device.type == "cpu"
                and not self.training and self.config._attn_implementation in ("sdpa", "eager")):
            # one new window on top of the past (the mask, if any, lets it see every key)
            attn_output = decode_step_attention(query, key, value, self.scaling)
            return self.o_proj(attn_output.reshape(*input_shape, -1))

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        attn_output, _ = attention_interface(
            self,
            query,
            key,
            value,
            mask,
            dropout=self.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            is_causal=is_causal,
        )
        # (batch*neurons, steps, hidden)
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.o_proj(attn_output)


class CalmTokenizerMLP(nn.Module):
    def __init__(self, config: CalmTokenizerConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = nn.GELU()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(hidden_states)))


class CalmTokenizerLayer(nn.Module):
    """Pre-norm Transformer layer over the token steps of one trace."""

    def __init__(self, config: CalmTokenizerConfig, is_causal: bool):
        super().__init__()
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = CalmTokenizerAttention(config, is_causal=is_causal)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CalmTokenizerMLP(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                past: list | None = None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, past)
        hidden_states = hidden_states + self.dropout(attn)
        return hidden_states + self.dropout(self.mlp(self.post_attention_layernorm(hidden_states)))


class CalmTokenizerEncoder(nn.Module):
    """Traces `(batch*neurons, frames)` -> latents `(batch*neurons, frames // L, hidden)`."""

    def __init__(self, config: CalmTokenizerConfig):
        super().__init__()
        # kernel = stride = L: one token per non-overlapping window, so a token never sees later windows
        self.patch_embed = nn.Conv1d(1, config.hidden_size, kernel_size=config.window_size, stride=config.window_size)
        self.rotary_emb = CalmTokenizerRotaryEmbedding(config)
        self.layers = nn.ModuleList(
            [CalmTokenizerLayer(config, is_causal=config.causal_encoder) for _ in range(config.num_encoder_layers)]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, traces: torch.Tensor, cache: list[list] | None = None) -> torch.Tensor:
        # cache: one [keys, values] per layer of the windows encoded before `traces` (causal encoder), extended in place
        # (batch*neurons, frames) -> (batch*neurons, steps, window) -> (batch*neurons, steps, hidden)
        # the convolution's kernel equals its stride, so it is one linear map of each window's frames (a matmul; the
        # convolution kernel is markedly slower on a CPU for these shapes)
        windows = traces.unflatten(-1, (-1, self.patch_embed.kernel_size[0]))
        hidden_states = F.linear(windows, self.patch_embed.weight.flatten(1), self.patch_embed.bias)
        past_steps = 0 if cache is None or cache[0][0] is None else cache[0][0].shape[2]
        positions = torch.arange(past_steps, past_steps + hidden_states.shape[1], device=hidden_states.device)
        position_embeddings = self.rotary_emb(positions)
        for index, layer in enumerate(self.layers):
            hidden_states = layer(hidden_states, position_embeddings, None if cache is None else cache[index])
        return self.norm(hidden_states)


class CalmTokenizerDecoder(nn.Module):
    """Code embeddings `(batch*neurons, steps, hidden)` -> traces `(batch*neurons, steps * L)`."""

    def __init__(self, config: CalmTokenizerConfig):
        super().__init__()
        self.rotary_emb = CalmTokenizerRotaryEmbedding(config)
        self.layers = nn.ModuleList(
            [CalmTokenizerLayer(config, is_causal=config.causal_decoder) for _ in range(config.num_decoder_layers)]
        )
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.unpatch = nn.ConvTranspose1d(
            config.hidden_size, 1, kernel_size=config.window_size, stride=config.window_size
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        position_embeddings = self.rotary_emb(torch.arange(embeddings.shape[1], device=embeddings.device))
        hidden_states = embeddings
        for layer in self.layers:
            hidden_states = layer(hidden_states, position_embeddings)
        hidden_states = self.norm(hidden_states)
        # (batch*neurons, hidden, steps) -> (batch*neurons, 1, steps * L)
        return self.unpatch(hidden_states.transpose(1, 2)).squeeze(1)


class CalmTokenizerQuantizer(nn.Module):
    """Codebook with nearest-neighbour lookup, EMA updates, usage tracking and a revival queue.

    All distance computations run in fp32 (autocast disabled) so that bf16 training does not flip assignments.
    """

    def __init__(self, config: CalmTokenizerConfig):
        super().__init__()
        self.codebook_size = config.codebook_size
        self.hidden_size = config.hidden_size
        self.ema_decay = config.ema_decay
        self.codebook = nn.Parameter(torch.empty(config.codebook_size, config.hidden_size))
        # EMA of the fraction of vectors assigned to each code; uniform = 1 / K
        self.register_buffer("code_usage", torch.full((config.codebook_size,), 1.0 / config.codebook_size))
        # FIFO ring buffer of recent encoder vectors that dead codes are reset to
        self.register_buffer("revival_queue", torch.zeros(config.revival_queue_size, config.hidden_size))
        self.register_buffer("revival_queue_pointer", torch.zeros((), dtype=torch.long))
        self.register_buffer("revival_queue_filled", torch.zeros((), dtype=torch.long))

    @staticmethod
    def squared_distances(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """`(n, hidden)` x `(K, hidden)` -> `(n, K)` squared Euclidean distances in fp32."""
        with torch.autocast(device_type=latents.device.type, enabled=False):
            latents = latents.float()
            codebook = codebook.float()
            return (
                latents.pow(2).sum(-1, keepdim=True)
                - 2.0 * latents @ codebook.t()
                + codebook.pow(2).sum(-1).unsqueeze(0)
            )

    def nearest_codes(self, latents: torch.Tensor) -> torch.LongTensor:
        """`(..., hidden)` -> `(...)` index of the nearest codebook entry."""
        flat = latents.reshape(-1, latents.shape[-1])
        return self.squared_distances(flat, self.codebook).argmin(dim=-1).reshape(latents.shape[:-1])

    def dead_code_mask(self, threshold: float) -> torch.BoolTensor:
        return self.code_usage * self.codebook_size < threshold

    def forward(
        self,
        latents: torch.Tensor,
        valid: torch.BoolTensor | None = None,
        frozen: bool = False,
        temperature: float = 1.0,
        sample_gumbel: bool = False,
    ) -> CalmTokenizerQuantizerOutput:
        r"""
        Snap encoder vectors to their nearest codes and compute the quantizer's losses.

        Args:
            latents (`torch.FloatTensor` of shape `(sequences, token_steps, hidden_size)`): encoder outputs.
            valid (`torch.BoolTensor` of shape `(sequences,)`, *optional*): False marks padded neurons, left out of
                the losses and statistics.
            frozen (`bool`): codebook warm-up; no gradient reaches the codebook.
            temperature (`float`): Gumbel-softmax temperature of the entropy term.
            sample_gumbel (`bool`): draw Gumbel noise (training) instead of a plain tempered softmax.
        """
        # clone: the in-place state updates must never touch a tensor saved for backward
        codebook = self.codebook.clone()
        if frozen:
            codebook = codebook.detach()
        codes = self.nearest_codes(latents)  # (sequences, steps)
        code_vectors = F.embedding(codes, codebook)
        # straight-through estimator: forward uses the code, backward passes gradients to the encoder
        quantized = latents + (code_vectors - latents).detach()
        if valid is not None:
            latents, codes_v, code_vectors = latents[valid], codes[valid], code_vectors[valid]
        else:
            codes_v = codes
        latents_flat = latents.reshape(-1, self.hidden_size).float()
        codes_flat = codes_v.reshape(-1)
        code_vectors_flat = code_vectors.reshape(-1, self.hidden_size).float()
        # codebook entropy through Gumbel-softmax over negative (per-dimension) squared distances
        logits = -self.squared_distances(latents_flat, codebook) / self.hidden_size
        if sample_gumbel:
            soft_assignment = F.gumbel_softmax(logits, tau=temperature, hard=False, dim=-1)
        else:
            soft_assignment = F.softmax(logits / temperature, dim=-1)
        mean_assignment = soft_assignment.mean(0)
        soft_entropy = -(mean_assignment * torch.log(mean_assignment + 1e-10)).sum()
        normalized_codebook = F.normalize(codebook.float(), dim=-1)
        gram = normalized_codebook @ normalized_codebook.t()
        identity = torch.eye(self.codebook_size, device=gram.device, dtype=gram.dtype)
        with torch.no_grad():
            usage = torch.bincount(codes_flat, minlength=self.codebook_size).float()
            usage = usage / usage.sum()
            perplexity = torch.exp(-(usage * torch.log(usage + 1e-10)).sum())
        return CalmTokenizerQuantizerOutput(
            quantized=quantized,
            codes=codes,
            commitment_loss=F.mse_loss(latents_flat, code_vectors_flat.detach()),
            embed_loss=F.mse_loss(code_vectors_flat, latents_flat.detach()),
            entropy_loss=math.log(self.codebook_size) - soft_entropy,
            orthogonality_loss=(gram - identity).pow(2).mean(),
            codebook_perplexity=perplexity,
            encoder_vectors=latents_flat.detach(),
            encoder_codes=codes_flat,
        )

    @torch.no_grad()
    def update_state(self, latents: torch.Tensor, codes: torch.LongTensor, update_codebook: bool) -> None:
        """Training-time state updates from flat `latents` `(n, hidden)` and their `codes` `(n,)`."""
        latents = latents.detach().float()
        counts = torch.bincount(codes, minlength=self.codebook_size).float()
        share = (counts / counts.sum().clamp_min(1.0)).to(self.code_usage.dtype)
        self.code_usage.mul_(self.ema_decay).add_(share, alpha=1.0 - self.ema_decay)
        if update_codebook:
            # EMA codebook: every used code moves towards the mean of the vectors assigned to it
            sums = torch.zeros_like(self.codebook).index_add_(0, codes, latents)
            used = counts > 0
            means = sums[used] / counts[used].unsqueeze(-1)
            self.codebook[used] = torch.lerp(self.codebook[used], means.to(self.codebook.dtype), 1.0 - self.ema_decay)
        # push a random subset so the queue spans several recent steps
        queue_size = self.revival_queue.shape[0]
        num_push = min(latents.shape[0], max(1, queue_size // 8))
        pushed = latents[torch.randperm(latents.shape[0], device=latents.device)[:num_push]]
        slots = (self.revival_queue_pointer + torch.arange(num_push, device=latents.device)) % queue_size
        self.revival_queue[slots] = pushed.to(self.revival_queue.dtype)
        self.revival_queue_pointer.copy_((self.revival_queue_pointer + num_push) % queue_size)
        self.revival_queue_filled.copy_(torch.clamp(self.revival_queue_filled + num_push, max=queue_size))

    @torch.no_grad()
    def initialize_from_queue(self, kmeans_iterations: int) -> bool:
        """Data-dependent codebook init: k-means (Lloyd) on the queued encoder vectors, seeded with random ones.

        Returns False (and leaves the codebook alone) when the queue is still empty."""
        filled = int(self.revival_queue_filled)
        if filled == 0:
            return False
        data = self.revival_queue[:filled].float()
        if filled >= self.codebook_size:
            picks = torch.randperm(filled, device=data.device)[: self.codebook_size]
        else:
            picks = torch.randint(filled, (self.codebook_size,), device=data.device)
        centroids = data[picks].clone()
        for _ in range(kmeans_iterations):
            assignment = self.squared_distances(data, centroids).argmin(-1)
            counts = torch.bincount(assignment, minlength=self.codebook_size).float()
            sums = torch.zeros_like(centroids).index_add_(0, assignment, data)
            filled_clusters = counts > 0  # empty clusters keep their seed vector
            centroids[filled_clusters] = sums[filled_clusters] / counts[filled_clusters].unsqueeze(-1)
        self.codebook.copy_(centroids.to(self.codebook.dtype))
        self.code_usage.fill_(1.0 / self.codebook_size)
        return True

    @torch.no_grad()
    def revive_dead_codes(self, threshold: float) -> int:
        """Reset codes whose EMA usage is below `threshold / K` to queued encoder vectors; returns how many."""
        dead = self.dead_code_mask(threshold).nonzero().squeeze(-1)
        available = int(self.revival_queue_filled)
        if dead.numel() == 0 or available == 0:
            return 0
        if available >= dead.numel():
            picks = torch.randperm(available, device=dead.device)[: dead.numel()]
        else:
            picks = torch.randint(available, (dead.numel(),), device=dead.device)
        self.codebook[dead] = self.revival_queue[picks].to(self.codebook.dtype)
        self.code_usage[dead] = 1.0 / self.codebook_size
        return int(dead.numel())


class CalmTokenizerPreTrainedModel(PreTrainedModel):
    config_class = CalmTokenizerConfig
    config: CalmTokenizerConfig
    base_model_prefix = "calm_tokenizer"
    main_input_name = "input_values"
    _no_split_modules = ["CalmTokenizerLayer"]
    _supports_sdpa = True

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        return load_checked_pretrained(super().from_pretrained, pretrained_model_name_or_path, args, kwargs)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.Conv1d, nn.ConvTranspose1d)):
            # the patch convs see only L inputs: torch's fan-in init keeps their outputs at unit scale
            module.reset_parameters()
        elif isinstance(module, nn.LayerNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, CalmTokenizerRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())
        elif isinstance(module, CalmTokenizerQuantizer):
            # unit-variance codes match the LayerNorm-ed encoder outputs
            init.normal_(module.codebook, mean=0.0, std=1.0)
            init.constant_(module.code_usage, 1.0 / module.codebook_size)
            init.zeros_(module.revival_queue)
            init.zeros_(module.revival_queue_pointer)
            init.zeros_(module.revival_queue_filled)
        elif isinstance(module, CalmTokenizer):
            init.zeros_(module.training_step)


class CalmTokenizer(CalmTokenizerPreTrainedModel):
    r"""
    The CalM neural quantizer: tokenizes each neuron's trace into `frames // window_size` codes from a shared
    codebook and decodes codes back to traces.

    Example:

    ```python
    >>> import torch
    >>> from calm_hf import CalmTokenizer, CalmTokenizerConfig

    >>> model = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny")).eval()
    >>> traces = torch.randn(2, 5, 40)  # (batch, neurons, frames), z-scored per neuron
    >>> codes = model.encode(traces).codes  # (2, 5, 10)
    >>> reconstruction = model.decode(codes).trace_values  # (2, 5, 40)
    ```"""

    # Trainer: the loss is a mean over the batch, let Trainer scale it for gradient accumulation
    accepts_loss_kwargs = False

    def __init__(self, config: CalmTokenizerConfig):
        super().__init__(config)
        self.encoder = CalmTokenizerEncoder(config)
        self.quantizer = CalmTokenizerQuantizer(config)
        self.decoder = CalmTokenizerDecoder(config)
        # logits of the codes 1..ar_horizon steps ahead, from the causal encoder state
        self.ar_head = nn.Linear(config.hidden_size, config.ar_horizon * config.codebook_size)
        # training forward passes so far; drives codebook warm-up, Gumbel annealing and dead-code revival
        self.register_buffer("training_step", torch.zeros((), dtype=torch.long))
        self.post_init()

    # ------------------------------------------------------------------ schedules
    def gumbel_temperature(self, step: int | None = None) -> float:
        """Gumbel-softmax temperature at `step` (default: the current training step), decaying geometrically."""
        step = int(self.training_step) if step is None else step
        progress = min(step / self.config.gumbel_anneal_steps, 1.0)
        start, end = self.config.gumbel_temperature_start, self.config.gumbel_temperature_end
        return float(start * (end / start) ** progress)

    def codebook_frozen(self) -> bool:
        return int(self.training_step) < self.config.codebook_warmup_steps

    # ------------------------------------------------------------------ public API
    def get_codebook(self) -> torch.Tensor:
        """The codebook, `(codebook_size, hidden_size)` (a detached copy)."""
        return self.quantizer.codebook.detach().clone()

    def fingerprint(self) -> str:
        """A short hash identifying this trained tokenizer: its codebook (rounded to bfloat16, so an fp32 and a bf16
        load agree), `window_size` and every CalmTokenizerConfig field. Pretraining stores it in the DAT's config
        (`tokenizer_fingerprint`); `check_tokenizer_fingerprint` refuses a tokenizer whose hash differs, which catches
        another run's tokenizer with the same codebook size that would otherwise feed the DAT codes it never saw."""
        import dataclasses
        import hashlib
        import json

        from transformers import PreTrainedConfig

        base_fields = {f.name for f in dataclasses.fields(PreTrainedConfig)}
        settings = {
            f.name: getattr(self.config, f.name)
            for f in dataclasses.fields(type(self.config))
            if f.name not in base_fields
        }
        digest = hashlib.sha256()
        digest.update(json.dumps(settings, sort_keys=True, default=str).encode())
        digest.update(f"window_size={self.config.window_size}".encode())
        codebook = self.quantizer.codebook.detach().to("cpu", torch.bfloat16).float().contiguous()
        digest.update(codebook.numpy().tobytes())
        return digest.hexdigest()[:16]

    @can_return_tuple
    def encode(self, input_values: torch.Tensor, cache: list[list] | None = None) -> CalmTokenizerEncoderOutput:
        r"""
        Args:
            input_values (`torch.FloatTensor` of shape `(batch, neurons, frames)`):
                Traces z-scored per neuron; `frames` must be a multiple of `window_size`.
            cache (`list`, *optional*):
                A causal encoder fed piecewise (a stream): one `[keys, values]` per encoder layer, `[None, None]` at the
                start, holding the windows encoded before `input_values` and extended in place. The codes equal those
                of encoding all windows at once; each call must keep the same batch and neurons.
            return_dict (`bool`, *optional*):
                Return a [`CalmTokenizerEncoderOutput`] instead of a tuple.

        Returns:
            [`CalmTokenizerEncoderOutput`] with `codes` `(batch, neurons, frames // window_size)` and
            `quantized_embeddings` `(batch, neurons, frames // window_size, hidden_size)`.
        """
        input_values = check_input_values(input_values, self.config.window_size, self.dtype)
        batch, neurons, frames = input_values.shape
        if cache is not None and (not self.config.causal_encoder or len(cache) != self.config.num_encoder_layers):
            raise ValueError(
                "cache= needs a causal encoder (config.causal_encoder=True; this one reads later windows) and one "
                f"[keys, values] per encoder layer ({self.config.num_encoder_layers}), got {len(cache)}: start a stream "
                "with [[None, None] for _ in range(config.num_encoder_layers)], or encode all windows at once."
            )
        # neurons are independent: fold them into the batch -> (batch*neurons, steps, hidden)
        latents = self.encoder(input_values.reshape(batch * neurons, frames), cache)
        check_encoder_states(latents, input_values)
        codes = self.quantizer.nearest_codes(latents)
        embeddings = F.embedding(codes, self.quantizer.codebook)
        codes = codes.reshape(batch, neurons, -1)
        embeddings = embeddings.reshape(batch, neurons, codes.shape[-1], -1)
        return CalmTokenizerEncoderOutput(codes=codes, quantized_embeddings=embeddings)

    @can_return_tuple
    def decode(self, codes: torch.LongTensor) -> CalmTokenizerDecoderOutput:
        r"""
        Args:
            codes (`torch.LongTensor` of shape `(batch, neurons, token_steps)`):
                Token indices in `[0, codebook_size)`.
            return_dict (`bool`, *optional*):
                Return a [`CalmTokenizerDecoderOutput`] instead of a tuple.

        Returns:
            [`CalmTokenizerDecoderOutput`] with `trace_values` `(batch, neurons, token_steps * window_size)`.
        """
        codes = check_codes(codes, self.config.codebook_size)
        batch, neurons, steps = codes.shape
        embeddings = F.embedding(codes.reshape(batch * neurons, steps), self.quantizer.codebook).to(self.dtype)
        trace_values = self.decoder(embeddings).reshape(batch, neurons, steps * self.config.window_size)
        return CalmTokenizerDecoderOutput(trace_values=trace_values)

    @can_return_tuple
    def forward(self, input_values: torch.Tensor, neuron_mask: torch.Tensor | None = None) -> CalmTokenizerOutput:
        r"""
        Tokenize, reconstruct and compute every training loss. The call changes no state: in training mode it also
        returns the encoder statistics that [`update_codebook_state`] applies after the backward pass (EMA codebook,
        usage, revival queue, step counter, dead-code revival, k-means seeding). `CalmTrainer` does that through
        `CalmTokenizerTrainingCallback`; a hand-written loop calls `model.update_codebook_state(outputs)` itself.

        Args:
            input_values (`torch.FloatTensor` of shape `(batch, neurons, frames)`):
                Traces z-scored per neuron; `frames` must be a multiple of `window_size`.
            neuron_mask (`torch.BoolTensor` of shape `(batch, neurons)`, *optional*):
                True for real neurons, False for padding; padded neurons are left out of losses and state updates.
            return_dict (`bool`, *optional*):
                Return a [`CalmTokenizerOutput`] instead of a tuple.
        """
        input_values = check_input_values(input_values, self.config.window_size, self.dtype)
        batch, neurons, frames = input_values.shape
        traces = input_values.reshape(batch * neurons, frames)
        valid = self._valid_neurons(neuron_mask, batch, neurons, traces.device)

        frozen = self.codebook_frozen()
        latents = self.encoder(traces)  # (batch*neurons, steps, hidden)
        quantizer_output = self.quantizer(
            latents, valid, frozen=frozen, temperature=self.gumbel_temperature(), sample_gumbel=self.training
        )
        # warm-up trains a plain autoencoder on the continuous latents: quantizing against a frozen random codebook
        # would collapse the encoder onto the few codes nearest to it before k-means can seed the codebook
        decoder_input = latents if frozen else quantizer_output.quantized.to(latents.dtype)
        reconstruction = self.decoder(decoder_input)  # (batch*neurons, frames)
        losses = self.training_losses(traces, reconstruction, latents, quantizer_output, valid, frozen)

        output = CalmTokenizerOutput(
            **losses,
            codebook_perplexity=quantizer_output.codebook_perplexity,
            dead_codes=self.quantizer.dead_code_mask(self.config.dead_code_threshold).sum(),
            codes=quantizer_output.codes.reshape(batch, neurons, -1),
            trace_values=reconstruction.reshape(batch, neurons, frames),
            encoder_vectors=quantizer_output.encoder_vectors if self.training else None,
            encoder_codes=quantizer_output.encoder_codes if self.training else None,
        )
        if self.training and torch.is_grad_enabled():
            self._warn_if_state_is_not_updated()
        return output

    def _warn_if_state_is_not_updated(self) -> None:
        """A hand-written loop that never calls `update_codebook_state` trains a tokenizer whose codebook is never
        seeded, updated or revived: it collapses onto a few codes without any error. Say so once (a Python counter,
        no host sync); `Trainer` runs with `CalmTokenizerTrainingCallback` never see it."""
        self._forwards_without_update = getattr(self, "_forwards_without_update", 0) + 1
        if self._forwards_without_update == 10:
            logger.warning(
                "CalmTokenizer: 10 training forwards without update_codebook_state(outputs): the codebook is not "
                "being seeded, EMA-updated or revived, so it will collapse. Call model.update_codebook_state(outputs) "
                "after each backward, or train with calm_hf.trainer.CalmTrainer (it adds "
                "CalmTokenizerTrainingCallback)."
            )

    @staticmethod
    def _valid_neurons(
        neuron_mask: torch.Tensor | None, batch: int, neurons: int, device: torch.device
    ) -> torch.BoolTensor | None:
        """`(batch*neurons,)` True for real neurons (None without a mask)."""
        if neuron_mask is None:
            return None
        if tuple(neuron_mask.shape) != (batch, neurons):
            raise ValueError(
                f"`neuron_mask` must have shape (batch, neurons) = {(batch, neurons)}, got {tuple(neuron_mask.shape)}."
            )
        valid = neuron_mask.reshape(-1).to(device=device, dtype=torch.bool)
        if not bool(valid.any()):
            raise ValueError("`neuron_mask` marks every neuron as padding; pass at least one real neuron.")
        return valid

    def training_losses(
        self,
        traces: torch.Tensor,
        reconstruction: torch.Tensor,
        latents: torch.Tensor,
        quantizer_output: CalmTokenizerQuantizerOutput,
        valid: torch.BoolTensor | None,
        frozen: bool,
    ) -> dict[str, torch.Tensor]:
        """Loss assembly, on real neurons only and in fp32: reconstruction `MSE + a (1 - r)`, the quantizer's terms
        and the auxiliary AR loss, weighted by the config (only the reconstruction trains during warm-up).

        Args:
            traces, reconstruction (`torch.FloatTensor` of shape `(batch*neurons, frames)`): input and output traces.
            latents (`torch.FloatTensor` of shape `(batch*neurons, token_steps, hidden_size)`): encoder outputs.
            quantizer_output ([`CalmTokenizerQuantizerOutput`]): codes and quantizer losses.
            valid (`torch.BoolTensor` of shape `(batch*neurons,)`, *optional*): real neurons.
            frozen (`bool`): codebook warm-up.
        """
        config = self.config
        codes = quantizer_output.codes
        if valid is not None:
            traces, reconstruction, latents, codes = traces[valid], reconstruction[valid], latents[valid], codes[valid]
        target, prediction = traces.float(), reconstruction.float()
        mse_loss = F.mse_loss(prediction, target)
        centered_prediction = prediction - prediction.mean(-1, keepdim=True)
        centered_target = target - target.mean(-1, keepdim=True)
        correlation = (centered_prediction * centered_target).sum(-1) / (
            centered_prediction.norm(dim=-1) * centered_target.norm(dim=-1) + 1e-8
        )
        pearson_loss = 1.0 - correlation.mean()
        reconstruction_loss = mse_loss + config.reconstruction_pearson_weight * pearson_loss
        ar_loss = self.ar_loss(latents, codes)
        # the quantizer terms are reported during warm-up but only train once the codebook is live
        quantizer_loss = (
            config.commitment_weight * quantizer_output.commitment_loss
            + config.embed_weight * quantizer_output.embed_loss
            + config.entropy_weight * quantizer_output.entropy_loss
            + config.orthogonality_weight * quantizer_output.orthogonality_loss
            + config.ar_weight * ar_loss
        )
        return {
            "loss": reconstruction_loss if frozen else reconstruction_loss + quantizer_loss,
            "reconstruction_loss": reconstruction_loss,
            "mse_loss": mse_loss,
            "pearson_loss": pearson_loss,
            "commitment_loss": quantizer_output.commitment_loss,
            "embed_loss": quantizer_output.embed_loss,
            "entropy_loss": quantizer_output.entropy_loss,
            "orthogonality_loss": quantizer_output.orthogonality_loss,
            "ar_loss": ar_loss,
        }

    def ar_loss(self, latents: torch.Tensor, codes: torch.LongTensor) -> torch.Tensor:
        """Auxiliary AR head: from the encoder state at step t, cross-entropy of the codes at t+1 .. t+ar_horizon.

        Args:
            latents (`torch.FloatTensor` of shape `(sequences, token_steps, hidden_size)`): encoder outputs.
            codes (`torch.LongTensor` of shape `(sequences, token_steps)`): their codes.
        """
        config = self.config
        sequences, steps = codes.shape
        ar_logits = self.ar_head(latents).float().reshape(sequences, steps, config.ar_horizon, config.codebook_size)
        ar_terms = []
        for offset in range(1, config.ar_horizon + 1):
            if steps > offset:
                ar_terms.append(
                    F.cross_entropy(
                        ar_logits[:, : steps - offset, offset - 1].reshape(-1, config.codebook_size),
                        codes[:, offset:].reshape(-1),
                    )
                )
        return torch.stack(ar_terms).mean() if ar_terms else ar_logits.new_zeros(())

    @torch.no_grad()
    def update_codebook_state(self, outputs: CalmTokenizerOutput) -> None:
        """The training-time state update after one training forward (call it after `backward`, before the
        optimizer step; `CalmTokenizerTrainingCallback` does it for `Trainer`): usage EMA, EMA codebook update
        (after warm-up), revival-queue push, step counter, dead-code revival every `revival_interval` steps after
        warm-up, and k-means seeding of the codebook when the warm-up ends.

        Args:
            outputs ([`CalmTokenizerOutput`]): the output of a training-mode forward (it carries
                `encoder_vectors` and `encoder_codes`).
        """
        if outputs.encoder_vectors is None or outputs.encoder_codes is None:
            raise ValueError(
                "update_codebook_state needs the output of a training-mode forward (model.train()): an eval-mode "
                "output carries no encoder_vectors / encoder_codes."
            )
        config = self.config
        self._forwards_without_update = 0
        self.quantizer.update_state(
            outputs.encoder_vectors, outputs.encoder_codes, update_codebook=not self.codebook_frozen()
        )
        self.training_step.add_(1)
        step = int(self.training_step)
        if step > config.codebook_warmup_steps and step % config.revival_interval == 0:
            self.quantizer.revive_dead_codes(config.dead_code_threshold)
        if config.codebook_warmup_steps > 0 and step == config.codebook_warmup_steps:
            # end of warm-up: move the random codebook onto the encoder's distribution before it starts learning
            self.quantizer.initialize_from_queue(config.codebook_kmeans_iterations)

    def save_pretrained(self, save_directory: str | os.PathLike, *args, **kwargs):
        """Save as safetensors with config.json; `auto_map` is rewritten to plain strings so the folder loads with
        `AutoModel.from_pretrained(folder, trust_remote_code=True)` (see `rewrite_calm_tokenizer_auto_map`)."""
        result = super().save_pretrained(save_directory, *args, **kwargs)
        if getattr(self.config, "auto_map", None) is not None:
            self.config.auto_map = plain_auto_map(self.config.auto_map)
        rewrite_calm_tokenizer_auto_map(save_directory)
        if kwargs.get("is_main_process", True):
            write_weight_checksums(save_directory)
        return result


CalmTokenizer.register_for_auto_class("AutoModel")


__all__ = [
    "CalmTokenizer",
    "check_tokenizer_fingerprint",
    "CalmTokenizerDecoderOutput",
    "CalmTokenizerEncoderOutput",
    "CalmTokenizerOutput",
    "CalmTokenizerPreTrainedModel",
    "CalmTokenizerQuantizerOutput",
]
