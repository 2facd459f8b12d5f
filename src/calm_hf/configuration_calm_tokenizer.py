"""Configuration of the CalM neural quantizer (NQ), the VQ-VAE that turns single-neuron traces into tokens."""

import functools
import json
import math
import os

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig

from .presets import PRESETS, preset_fields


CALM_TOKENIZER_AUTO_MAP = {
    "AutoConfig": "configuration_calm_tokenizer.CalmTokenizerConfig",
    "AutoModel": "modeling_calm_tokenizer.CalmTokenizer",
}


def rewrite_calm_tokenizer_auto_map(save_directory: str | os.PathLike) -> None:
    """Rewrite `auto_map` in `save_directory/config.json` to plain strings.

    transformers' remote-code copier treats any class whose name contains "Tokenizer" as a text tokenizer and
    writes `[slow, fast]` lists into `auto_map`; `AutoConfig`/`AutoModel` then fail to load the folder with
    `trust_remote_code=True`. This puts back the two plain entries the loaders expect.
    """
    config_file = os.path.join(save_directory, "config.json")
    if not os.path.isfile(config_file):
        return
    with open(config_file, encoding="utf-8") as handle:
        config_dict = json.load(handle)
    if "auto_map" not in config_dict:
        return
    config_dict["auto_map"] = plain_auto_map(config_dict["auto_map"])
    with open(config_file, "w", encoding="utf-8") as handle:
        handle.write(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def plain_auto_map(auto_map: dict) -> dict:
    """`auto_map` with our entries as plain "module.Class" strings (list entries -> their first non-null item)."""
    fixed = {}
    for auto_class, reference in auto_map.items():
        if auto_class in CALM_TOKENIZER_AUTO_MAP:
            reference = CALM_TOKENIZER_AUTO_MAP[auto_class]
        elif isinstance(reference, (list, tuple)):
            reference = next(item for item in reference if item is not None)
        fixed[auto_class] = reference
    return fixed


# Copied from calm_hf.configuration_calm.plain_validation_errors
def plain_validation_errors(cls: type) -> type:
    """Make a `@strict` config raise the failed check's own `ValueError`/`TypeError`.

    `@strict` wraps every failed field or `validate_*` check in a `StrictDataclassError`, which is neither; callers
    (and the rest of calm_hf) catch `ValueError`. The message is kept and the strict error stays chained.
    """
    strict_init = cls.__init__

    @functools.wraps(strict_init)
    def __init__(self, *args, **kwargs) -> None:
        try:
            strict_init(self, *args, **kwargs)
        except StrictDataclassError as error:
            cause = error.__cause__
            if not isinstance(cause, (ValueError, TypeError)):
                raise
            raise type(cause)(f"{type(self).__name__}: {cause}") from error

    cls.__init__ = __init__
    return cls


@plain_validation_errors
@strict
class CalmTokenizerConfig(PreTrainedConfig):
    r"""
    Configuration of [`CalmTokenizer`], the neural quantizer (NQ) of CalM: a strided Conv1d cuts each neuron's trace
    into windows of `window_size` frames, a RoPE Transformer encodes them (causal along time), each vector snaps to
    its nearest codebook entry, and a Transformer plus a transposed conv decode the tokens back to the trace.
    Defaults are the paper's sizes; see `CALM_TOKENIZER_PRESETS` / [`~CalmTokenizerConfig.from_preset`] for the
    `"tiny"` (tests), `"cpu"` (real use on a small CPU) and `"paper"` configurations.

    Args:
        window_size (`int`, *optional*, defaults to 4):
            Frames per token (L). Traces must have a multiple of L frames.
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the encoder/decoder Transformers and of the codebook vectors.
        codebook_size (`int`, *optional*, defaults to 128):
            Number of codebook entries K (the token vocabulary of the dual-axis transformer).
        num_encoder_layers (`int`, *optional*, defaults to 4):
            Transformer layers in the encoder.
        num_decoder_layers (`int`, *optional*, defaults to 4):
            Transformer layers in the decoder.
        num_attention_heads (`int`, *optional*, defaults to 4):
            Attention heads in every layer; must divide `hidden_size` into an even head size (RoPE).
        intermediate_size (`int`, *optional*):
            Width of the feed-forward block; defaults to `4 * hidden_size`.
        dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities and residual branches.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            Base of the rotary position embedding along time.
        max_token_steps (`int`, *optional*, defaults to 1024):
            Longest trace in token steps the tokenizer is meant for (kept in config.json; RoPE sin/cos are computed
            for every call, so longer inputs are still accepted).
        causal_encoder (`bool`, *optional*, defaults to `True`):
            Causal attention along time in the encoder, so a token only depends on past and present frames (needed
            for forecasting: context tokens never see the future).
        causal_decoder (`bool`, *optional*, defaults to `False`):
            Causal attention along time in the decoder.
        layer_norm_eps (`float`, *optional*, defaults to 1e-5):
            Epsilon of the LayerNorms.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal initialiser of linear and conv weights.
        ema_decay (`float`, *optional*, defaults to 0.99):
            Decay of the exponential moving averages: used codes move towards the mean of their assigned encoder
            vectors (EMA codebook update, as in the paper) and the per-code usage that drives dead-code revival.
        codebook_warmup_steps (`int`, *optional*, defaults to 1000):
            Training steps during which the codebook is frozen (no gradient, no EMA, no revival) and the model trains
            as a plain autoencoder (the decoder reads the continuous encoder output, only the reconstruction loss
            trains), so the encoder first learns a rich space; the codebook is then seeded from it (see
            `codebook_kmeans_iterations`). Without this, a frozen random codebook collapses the encoder onto a few codes.
        codebook_kmeans_iterations (`int`, *optional*, defaults to 10):
            At the first training step after a non-empty warm-up, the codebook is re-initialised by this many k-means
            iterations on the queued encoder vectors (0: random queued vectors), so codes start where the data are
            instead of collapsing onto the few random codes nearest to the encoder outputs.
        reconstruction_pearson_weight (`float`, *optional*, defaults to 1.0):
            Weight `a` in the reconstruction loss `MSE + a * (1 - r)`: MSE fits amplitude, the Pearson term fits the
            shape of each trace, which is what forecasting is scored on.
        commitment_weight (`float`, *optional*, defaults to 0.5):
            Weight of `||z - sg[e]||^2`, which keeps encoder outputs close to their codes (paper: 0.5).
        embed_weight (`float`, *optional*, defaults to 1.0):
            Weight of the codebook ("embed") loss `||sg[z] - e||^2` (paper: 1.0). It pulls codes towards their
            encoder vectors through the optimizer, alongside the EMA update that does the same directly; set it to 0
            for a pure EMA codebook.
        entropy_weight (`float`, *optional*, defaults to 0.5):
            Weight of `log(K) - H(mean soft assignment)`, which spreads usage over the whole codebook (paper: 0.5).
        gumbel_temperature_start (`float`, *optional*, defaults to 2.5):
            Gumbel-softmax temperature at step 0: soft assignments that give the entropy term useful gradients.
        gumbel_temperature_end (`float`, *optional*, defaults to 0.01):
            Gumbel-softmax temperature at the end of annealing: nearly hard assignments, matching inference.
        gumbel_anneal_steps (`int`, *optional*, defaults to 10000):
            Steps over which the temperature decays geometrically from start to end.
        orthogonality_weight (`float`, *optional*, defaults to 0.1):
            Weight of `||E E^T - I||_F^2` (mean over entries) on the L2-normalised codebook, which keeps codes
            pointing in different directions so that none are redundant.
        dead_code_threshold (`float`, *optional*, defaults to 0.1):
            A code is dead when its EMA usage is below this fraction of the uniform share `1 / K`.
        revival_interval (`int`, *optional*, defaults to 200):
            Every this many training steps (after warm-up) dead codes are reset to recent encoder vectors.
        revival_queue_size (`int`, *optional*, defaults to 2048):
            Size of the FIFO queue of recent encoder vectors that revived codes are drawn from.
        ar_weight (`float`, *optional*, defaults to 0.5):
            Weight of the auxiliary autoregressive loss, which makes tokens predictable from the causal encoder
            state, i.e. easy for the dual-axis transformer to forecast (paper: 0.5).
        ar_horizon (`int`, *optional*, defaults to 4):
            The AR head predicts the codes 1..ar_horizon steps ahead from each encoder output.

    Example:

    ```python
    >>> from calm_hf import CalmTokenizer, CalmTokenizerConfig

    >>> config = CalmTokenizerConfig.from_preset("tiny")
    >>> model = CalmTokenizer(config)
    >>> config.hidden_size, config.codebook_size
    (32, 16)
    ```"""

    model_type = "calm_tokenizer"

    window_size: int = 4
    hidden_size: int = 512
    codebook_size: int = 128
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int | None = None
    dropout: float | int = 0.0
    rope_theta: float | int = 10000.0
    max_token_steps: int = 1024
    causal_encoder: bool = True
    causal_decoder: bool = False
    layer_norm_eps: float | int = 1e-5
    initializer_range: float | int = 0.02
    # codebook learning
    ema_decay: float | int = 0.99
    codebook_warmup_steps: int = 1000
    codebook_kmeans_iterations: int = 10
    # loss weights and regularisers
    reconstruction_pearson_weight: float | int = 1.0
    commitment_weight: float | int = 0.5
    embed_weight: float | int = 1.0
    entropy_weight: float | int = 0.5
    gumbel_temperature_start: float | int = 2.5
    gumbel_temperature_end: float | int = 0.01
    gumbel_anneal_steps: int = 10000
    orthogonality_weight: float | int = 0.1
    dead_code_threshold: float | int = 0.1
    revival_interval: int = 200
    revival_queue_size: int = 2048
    ar_weight: float | int = 0.5
    ar_horizon: int = 4

    def __post_init__(self, **kwargs):
        if self.intermediate_size is None:
            self.intermediate_size = 4 * self.hidden_size
        super().__post_init__(**kwargs)

    # `@strict` runs every `validate_*` method after __init__ and before save_pretrained writes config.json

    def validate_architecture(self) -> None:
        """Sizes, loss weights and schedules: positive where they count something, a head size RoPE can rotate."""
        super().validate_architecture()
        positive = {
            "window_size": self.window_size,
            "hidden_size": self.hidden_size,
            "codebook_size": self.codebook_size,
            "num_attention_heads": self.num_attention_heads,
            "intermediate_size": self.intermediate_size,
            "max_token_steps": self.max_token_steps,
            "rope_theta": self.rope_theta,
            "layer_norm_eps": self.layer_norm_eps,
            "revival_interval": self.revival_interval,
            "revival_queue_size": self.revival_queue_size,
            "ar_horizon": self.ar_horizon,
            "gumbel_anneal_steps": self.gumbel_anneal_steps,
        }
        for name, value in positive.items():
            if not (value > 0 and math.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number > 0, got {name}={value!r}.")
        if not self.rope_theta > 1:
            raise ValueError(
                f"`rope_theta` must be > 1 (the RoPE base: its powers set the rotation wavelengths, which only grow with "
                f"the dimension when it exceeds 1), got rope_theta={self.rope_theta!r}; the default is 10000."
            )
        non_negative = {
            "num_encoder_layers": self.num_encoder_layers,
            "num_decoder_layers": self.num_decoder_layers,
            "codebook_warmup_steps": self.codebook_warmup_steps,
            "codebook_kmeans_iterations": self.codebook_kmeans_iterations,
            "initializer_range": self.initializer_range,
            "reconstruction_pearson_weight": self.reconstruction_pearson_weight,
            "commitment_weight": self.commitment_weight,
            "embed_weight": self.embed_weight,
            "entropy_weight": self.entropy_weight,
            "orthogonality_weight": self.orthogonality_weight,
            "dead_code_threshold": self.dead_code_threshold,
            "ar_weight": self.ar_weight,
        }
        for name, value in non_negative.items():
            if not (value >= 0 and math.isfinite(value)):
                raise ValueError(f"`{name}` must be a finite number >= 0, got {name}={value!r}.")
        if self.codebook_size < 2:
            raise ValueError(f"`codebook_size` must be >= 2 to form a vocabulary, got codebook_size={self.codebook_size}.")
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"`hidden_size` ({self.hidden_size}) must be divisible by `num_attention_heads` "
                f"({self.num_attention_heads}); pick e.g. num_attention_heads=4 with a hidden_size multiple of 4."
            )
        head_dim = self.hidden_size // self.num_attention_heads
        if head_dim % 2 != 0:
            raise ValueError(
                f"RoPE needs an even head size, got hidden_size={self.hidden_size} / num_attention_heads="
                f"{self.num_attention_heads} = {head_dim}."
            )

    def validate_training(self) -> None:
        """Dropout, the EMA decay and the Gumbel temperature schedule."""
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1), got dropout={self.dropout}.")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"`ema_decay` must be in [0, 1), got ema_decay={self.ema_decay}.")
        temperatures = (self.gumbel_temperature_start, self.gumbel_temperature_end)
        if not all(value > 0 and math.isfinite(value) for value in temperatures):
            raise ValueError(
                "Gumbel temperatures must be > 0 and finite, got gumbel_temperature_start="
                f"{self.gumbel_temperature_start}, gumbel_temperature_end={self.gumbel_temperature_end}."
            )
        if self.gumbel_temperature_end > self.gumbel_temperature_start:
            raise ValueError(
                "The Gumbel temperature anneals downwards: need gumbel_temperature_end <= gumbel_temperature_start, "
                f"got {self.gumbel_temperature_end} > {self.gumbel_temperature_start}."
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "CalmTokenizerConfig":
        """Build a named configuration (`"tiny"`, `"cpu"` or `"paper"`), with keyword overrides applied on top.

        Example:

        ```python
        >>> config = CalmTokenizerConfig.from_preset("cpu", codebook_warmup_steps=0)
        ```"""
        return cls(**{**preset_fields(name, "tokenizer"), **overrides})

    def save_pretrained(self, save_directory: str | os.PathLike, push_to_hub: bool = False, **kwargs):
        super().save_pretrained(save_directory, push_to_hub=push_to_hub, **kwargs)
        # see `rewrite_calm_tokenizer_auto_map`: the copier writes list entries for "*Tokenizer*" classes
        if getattr(self, "auto_map", None) is not None:
            self.auto_map = plain_auto_map(self.auto_map)
        rewrite_calm_tokenizer_auto_map(save_directory)


# the tokenizer part of the one preset table shared with the model ("tiny", "cpu", "paper"; see presets.py)
CALM_TOKENIZER_PRESETS: dict[str, dict] = {name: parts["tokenizer"] for name, parts in PRESETS.items()}

# remote code: save_pretrained copies this file next to the weights and writes auto_map
CalmTokenizerConfig.register_for_auto_class()


__all__ = ["CALM_TOKENIZER_PRESETS", "CalmTokenizerConfig"]
