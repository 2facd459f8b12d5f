"""Configuration of the CalM dual-axis transformer (DAT)."""


import functools
import math
from typing import Any

from huggingface_hub.dataclasses import strict
from huggingface_hub.errors import StrictDataclassError
from transformers import PreTrainedConfig

from .presets import PRESETS, preset_fields


# the model part of the one preset table shared with the tokenizer ("tiny", "cpu", "paper"; see presets.py)
# the readouts of CalmForBehaviorRegression (config.behavior_head)
BEHAVIOR_HEADS = ("glu", "linear")
# where neuron identities come from (config.neuron_identity)
NEURON_IDENTITIES = ("table", "data")

CALM_PRESETS: dict[str, dict[str, Any]] = {name: parts["model"] for name, parts in PRESETS.items()}


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
class CalmConfig(PreTrainedConfig):
    r"""
    Configuration of [`CalmModel`] and its heads: a dual-axis transformer over the token grid `(neurons, token_steps)`
    produced by [`CalmTokenizer`]. Each layer attends bidirectionally across neurons at every time step, then causally
    across time for every neuron (RoPE on time), then applies an FFN.

    Args:
        vocab_size (`int`, *optional*, defaults to 128):
            Number of codes; must equal the tokenizer's `codebook_size`.
        hidden_size (`int`, *optional*, defaults to 512):
            Width of the residual stream.
        num_hidden_layers (`int`, *optional*, defaults to 6):
            Number of dual-axis layers.
        num_attention_heads (`int`, *optional*, defaults to 8):
            Heads of both the neuron-axis and the time-axis attention.
        intermediate_size (`int`, *optional*, defaults to 2048):
            Width of the FFN.
        hidden_act (`str`, *optional*, defaults to `"gelu"`):
            FFN activation.
        hidden_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the attention and FFN outputs before the residual add.
        attention_dropout (`float`, *optional*, defaults to 0.0):
            Dropout on attention probabilities.
        rms_norm_eps (`float`, *optional*, defaults to 1e-6):
            Epsilon of the pre-norm RMSNorms.
        rope_theta (`float`, *optional*, defaults to 10000.0):
            RoPE base of the time-axis attention.
        max_token_steps (`int`, *optional*, defaults to 64):
            Longest token grid (context plus generated steps) the model accepts.
        context_token_steps (`int`, *optional*):
            Token steps of context a forecast reads (`CalmForecaster`, the pipeline, `calm forecast`, streaming): the
            most recent ones; older frames only set the z-score statistics and the neuron identity. None = as many as
            `max_token_steps` leaves after the forecast's own steps. `calm pretrain` sets it from the recipe, where it
            is the length measured best on validation (`benchmarks/context_length.py`).
        num_neurons (`int`, *optional*, defaults to 1024):
            Rows of the global neuron embedding table (every session owns a contiguous block of ids).
        num_sessions (`int`, *optional*, defaults to 8):
            Rows of the session embedding table.
        window_size (`int`, *optional*, defaults to 4):
            Frames per token (kept here for downstream heads and the forecasting pipeline).
        frame_rate_hz (`float`, *optional*, defaults to 5.0):
            Frame rate the model was trained at.
        scheduled_sampling_prob (`float`, *optional*, defaults to 0.6):
            Probability per training batch of replacing a block of input steps by the model's own one-step
            predictions (paper: removing it drops forecasting r from 0.306 to 0.208).
        scheduled_sampling_block (`int`, *optional*, defaults to 6):
            Length in token steps of that block.
        neighbor_replacement_prob (`float`, *optional*, defaults to 0.1):
            Probability per input token of swapping it for one of its nearest codebook neighbours (paper ablation:
            0.306 -> 0.287 without it). Needs `model.set_codebook_neighbors(codebook)`.
        neighbor_k (`int`, *optional*, defaults to 12):
            Number of nearest codebook neighbours (cosine similarity) to draw from.
        initializer_range (`float`, *optional*, defaults to 0.02):
            Standard deviation of the normal weight initialisation.
        tie_word_embeddings (`bool`, *optional*, defaults to `False`):
            Whether the next-token head shares the token embedding matrix.
        use_cache (`bool`, *optional*, defaults to `True`):
            Whether forward returns a KV cache over time by default.
        session_names (`list[str]`, *optional*):
            Name of every session; index = session id.
        session_neuron_ranges (`list[list[int]]`, *optional*):
            `[start, stop)` block of global neuron ids of every session; index = session id (`[0, 0]` = unknown).
        tokenizer_fingerprint (`str`, *optional*):
            `CalmTokenizer.fingerprint()` of the tokenizer the model was pretrained with, recorded at pretraining;
            pairing the model with a different tokenizer is refused (`check_tokenizer_fingerprint`).
        behavior_head (`str`, *optional*, defaults to `"glu"`):
            Readout of `CalmForBehaviorRegression`: `"glu"` (gated per-neuron features weighted by a global neuron-weight
            bank) or `"linear"` (the paper's low-rank readout with a neuron-indexed bank).
        num_behavior_channels (`int`, *optional*):
            Number of behaviour channels M decoded by `CalmForBehaviorRegression` (required by that head only).
        behavior_rank (`int`, *optional*, defaults to 4):
            Rank R of the linear low-rank readout.
        behavior_dropout (`float`, *optional*, defaults to 0.1):
            Dropout on the GLU head's features (the head is small next to the data: it overfits without it).
        behavior_smoothing_kernel (`int`, *optional*, defaults to 5):
            Frames of the causal depthwise convolution that smooths the decoded behaviour (initialised as identity).
        freeze_backbone (`bool`, *optional*, defaults to `True`):
            Decode from a frozen backbone, as the paper does; only the head trains.
        value_head_steps (`int`, *optional*, defaults to 0):
            Token steps K of raw (z-scored) trace that the continuous forecast head predicts from every position:
            `K * window_size` future frames per neuron, trained with MSE against the true trace. Next-token
            cross-entropy alone rewards resolving noise inside a window, not slow population dynamics (a trial-swap
            probe showed the paper-recipe model ignoring the other neurons); this head is the forecaster's point
            estimate (the conditional mean). 0 = no head (checkpoints from before the head load unchanged).
        value_skip_windows (`int`, *optional*, defaults to 0):
            Windows W of each neuron's own raw (z-scored) trace that the raw-trace highway, a linear map, adds to the
            continuous head:
            `value = head(hidden_t) + Linear(trace of windows t-W+1..t)`, shared by all neurons (an autoregressive
            component, as in LSTNet). The backbone reads codes only, so without it the head cannot see the exact last
            frames a per-neuron AR forecasts from (benchmarks/results/value_skip/). Needs the traces behind the codes wherever the head is used (`value_inputs`; training passes
            `value_labels`, which are those traces). `calm pretrain` starts it at the training trials' closed-form
            ridge forecast, with the head's own output at zero (`calm_hf.identity_init.init_value_skip`), so the
            backbone learns what the population adds to a linear forecast. 0 = off (checkpoints from before it load
            unchanged).
        value_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the forecast head's MSE in the training loss.
        next_token_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the next-token cross-entropy (kept: it trains the token distribution used for sampled futures).
        neuron_identity (`str`, *optional*, defaults to `"table"`):
            Where a neuron's identity comes from. `"table"`: learned rows of the neuron and session embedding tables,
            indexed by `neuron_ids` / `session_ids` (a session must be known to the model, or added and adapted with
            `add_session`). `"data"`: computed in closed form from reference activity of the same recording
            (`calm_hf.identity_calm.compute_neuron_identity`: in-context coupling factors and single-neuron
            statistics) and passed as `neuron_identity`; there are no tables, so any recording with any number of
            neurons works without training, and no reference at all is the zero-shot case.
        identity_rank (`int`, *optional*, defaults to 32):
            Coupling factors per side in a data identity; the coupling mixer of every layer computes
            `sum_j (receives_i . drives_j) v_j`, a rank-`identity_rank` population regression estimated in context.
        identity_ridge (`float`, *optional*, defaults to 1.0):
            Ridge strength (relative to the mean diagonal of the Gram matrix) of that coupling fit: strong, because
            references can be a few trials of hundreds of neurons.
        identity_highway (`bool`, *optional*, defaults to `False`):
            A data identity also carries each neuron's statistics of the raw-trace highway's regression on the
            reference, and the head uses the neuron's own highway: the ridge fit of those statistics shrunk towards
            the shared, pretrained highway by a learned number of prior samples (`calm_hf.identity_calm.
            highway_weights`). With no reference it is the shared highway; with many trials, each neuron's own linear
            forecast, which a per-neuron AR baseline fits too. Needs `neuron_identity="data"` and the highway.
        identity_coupling_skill (`bool`, *optional*, defaults to `False`):
            A data identity also carries how well the recording's coupling forecasts out of sample (the ridge
            coupling fitted on half of the reference trials and scored on the other half, per neuron and its mean;
            `calm_hf.identity_calm.coupling_skill_features`), so the model can learn when to trust the coupling
            factors. Needs `neuron_identity="data"`.
        identity_coupling (`bool`, *optional*, defaults to `True`):
            A data identity carries the coupling factors fitted on the reference. `False` leaves them zero (the
            statistics stay): `calm adapt` turns it off for a recording whose validation trials forecast better
            without them, where a coupling fitted on some trials misleads on others.
        identity_reference (`bool`, *optional*, defaults to `True`):
            A data identity is computed from the reference. `False` gives every neuron the zero-shot identity
            whatever the reference: `calm adapt` chooses it for a recording whose validation trials forecast best
            that way.
        identity_fixed (`bool`, *optional*, defaults to `False`):
            Forecasters read the identity these fields say. `False` lets a forecaster given reference trials choose
            how much of it to read on a split of them (`CalmForecaster.reference_identity`); `calm adapt` sets it,
            since its model was fitted to one recording's trials and has made that choice on its validation trials.
        quantile_levels (`list[float]`, *optional*):
            Levels of the quantiles the continuous head also predicts (pinball loss), e.g. 0.05 ... 0.95: calibrated
            bands in the same forward pass as the point forecast, without sampling. None = no quantile head.
        quantile_loss_weight (`float`, *optional*, defaults to 1.0):
            Weight of the quantile head's pinball loss in the training loss.
        neuron_mixer_rank (`int`, *optional*, defaults to 0):
            Rank of a linear population-mixing branch in every layer: `out_i = W_o sum_j (q_i . k_j) v_j / N` with
            queries/keys from the neuron and session identity and values from the activity, i.e. a learned low-rank
            linear map across neurons. Softmax attention over identity-only keys can only form convex mixtures, which
            made signed population couplings hard to learn. 0 = off.
        neuron_attention_block (`int`, *optional*, defaults to 64):
            Neuron-axis attention within contiguous groups of at most this many neurons (in the order given), so its
            cost is linear in neurons; the linear mixers still read the whole population. A recording with no more
            neurons than this attends over all of them. None = always over all neurons (quadratic). The default is
            the neurons per pretraining example of the main job's recipe (what `calm pretrain` sets from
            `--max_neurons`), so a large recording is read in groups the size training used;
            `benchmarks/neuron_blocks.py` measures the forecasts against attention over all neurons.

    Example:

    ```python
    >>> from calm_hf import CalmConfig, CalmForCausalNeuralModeling
    >>> config = CalmConfig.from_preset("tiny", num_neurons=200)
    >>> model = CalmForCausalNeuralModeling(config)
    ```"""

    model_type = "calm"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]

    vocab_size: int = 128
    hidden_size: int = 512
    num_hidden_layers: int = 6
    num_attention_heads: int = 8
    intermediate_size: int = 2048
    hidden_act: str = "gelu"
    hidden_dropout: float | int = 0.1
    attention_dropout: float | int = 0.0
    rms_norm_eps: float | int = 1e-6
    rope_theta: float | int = 10000.0
    max_token_steps: int = 64
    context_token_steps: int | None = None
    num_neurons: int = 1024
    num_sessions: int = 8
    window_size: int = 4
    frame_rate_hz: float | int = 5.0
    scheduled_sampling_prob: float | int = 0.6
    scheduled_sampling_block: int = 6
    neighbor_replacement_prob: float | int = 0.1
    neighbor_k: int = 12
    initializer_range: float | int = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    session_names: list[str] | None = None
    session_neuron_ranges: list[list[int]] | None = None
    tokenizer_fingerprint: str | None = None
    behavior_head: str | None = "glu"
    num_behavior_channels: int | None = None
    behavior_rank: int = 4
    behavior_dropout: float | int = 0.1
    behavior_smoothing_kernel: int = 5
    freeze_backbone: bool = True
    value_head_steps: int = 0
    value_skip_windows: int = 0
    value_loss_weight: float | int = 1.0
    next_token_loss_weight: float | int = 1.0
    neuron_mixer_rank: int = 0
    neuron_attention_block: int | None = 64
    neuron_identity: str = "table"
    identity_rank: int = 32
    identity_ridge: float | int = 1.0
    identity_highway: bool = False
    identity_coupling_skill: bool = False
    identity_coupling: bool = True
    identity_reference: bool = True
    identity_fixed: bool = False
    quantile_levels: list[float] | None = None
    quantile_loss_weight: float | int = 1.0

    def __post_init__(self, **kwargs):
        if self.behavior_head is None:  # written by early behaviour checkpoints: the default head
            self.behavior_head = "glu"
        super().__post_init__(**kwargs)
        # `custom_pipelines` in config.json points Pythons without calm_hf at the pipeline shipped with the checkpoint;
        # the installed package registers the task itself, and transformers would otherwise insist on
        # trust_remote_code=True. The remote copy of this file keeps it (its module is not calm_hf's).
        if __name__.startswith("calm_hf.") and getattr(self, "custom_pipelines", None):
            del self.custom_pipelines

    # `@strict` runs every `validate_*` method after __init__ and before save_pretrained writes config.json

    def validate_architecture(self) -> None:
        """Sizes of the dual-axis transformer: positive, and a head size that RoPE can rotate."""
        super().validate_architecture()
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                     "max_token_steps", "num_neurons", "num_sessions", "window_size", "scheduled_sampling_block"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"CalmConfig.{name} must be a positive integer, got {value!r}.")
        for name in ("value_head_steps", "value_skip_windows", "neuron_mixer_rank"):
            value = getattr(self, name)
            if value < 0:
                raise ValueError(f"CalmConfig.{name} must be a non-negative integer (0 = off), got {value!r}.")
        steps = self.context_token_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or not
                                  1 <= steps < self.max_token_steps):
            raise ValueError(f"CalmConfig.context_token_steps must be a number of token steps in [1, max_token_steps - 1 "
                             f"= {self.max_token_steps - 1}] or None (as many as fit), got {steps!r}.")
        block = self.neuron_attention_block
        if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
            raise ValueError(f"CalmConfig.neuron_attention_block must be a positive number of neurons or None (attend "
                             f"over all neurons), got {block!r}.")
        if self.value_skip_windows > 0 and self.value_head_steps == 0:
            raise ValueError(
                f"value_skip_windows={self.value_skip_windows} adds to the continuous forecast head, which is off "
                "(value_head_steps=0): set value_head_steps > 0 or value_skip_windows=0."
            )
        if self.hidden_size % self.num_attention_heads != 0:
            raise ValueError(
                f"hidden_size ({self.hidden_size}) must be divisible by num_attention_heads "
                f"({self.num_attention_heads}); pick e.g. hidden_size={self.num_attention_heads * 32}."
            )
        if (self.hidden_size // self.num_attention_heads) % 2 != 0:
            raise ValueError(
                f"The head dimension hidden_size/num_attention_heads = {self.hidden_size}/{self.num_attention_heads}"
                " must be even for RoPE; change hidden_size or num_attention_heads."
            )
        if not (math.isfinite(self.frame_rate_hz) and self.frame_rate_hz > 0):
            raise ValueError(f"frame_rate_hz must be a positive finite rate in Hz, got {self.frame_rate_hz!r}.")
        if not (math.isfinite(self.rms_norm_eps) and self.rms_norm_eps > 0):
            raise ValueError(
                f"CalmConfig.rms_norm_eps must be a positive finite number (RMSNorm divides by sqrt(mean(x^2) + eps); "
                f"eps <= 0 gives NaN on a zero vector), got {self.rms_norm_eps!r}; the default is 1e-6."
            )
        if not (math.isfinite(self.rope_theta) and self.rope_theta > 1):
            raise ValueError(
                f"CalmConfig.rope_theta must be a finite number > 1 (the RoPE base: its powers set the rotation "
                f"wavelengths, which only grow with the dimension when it exceeds 1), got {self.rope_theta!r}; the "
                "default is 10000."
            )
        if not (math.isfinite(self.initializer_range) and self.initializer_range >= 0):
            raise ValueError(f"CalmConfig.initializer_range must be a finite number >= 0, got {self.initializer_range!r}.")

    def validate_identity(self) -> None:
        """Where neuron identities come from, and the quantile levels of the head."""
        if self.neuron_identity not in NEURON_IDENTITIES:
            raise ValueError(f"neuron_identity must be one of {list(NEURON_IDENTITIES)}, got {self.neuron_identity!r}.")
        if self.identity_rank < 1:
            raise ValueError(f"CalmConfig.identity_rank must be a positive integer, got {self.identity_rank!r}.")
        if not (math.isfinite(self.identity_ridge) and self.identity_ridge > 0):
            raise ValueError(f"CalmConfig.identity_ridge must be a positive number, got {self.identity_ridge!r}.")
        if self.identity_highway and (self.neuron_identity != "data" or self.value_skip_windows == 0):
            raise ValueError(
                f"identity_highway=True fits each neuron's raw-trace highway from its data identity: it needs "
                f"neuron_identity='data' (got {self.neuron_identity!r}) and value_skip_windows > 0 (got "
                f"{self.value_skip_windows})."
            )
        if self.identity_coupling_skill and self.neuron_identity != "data":
            raise ValueError(f"identity_coupling_skill=True adds a feature to the data identity: it needs "
                             f"neuron_identity='data' (got {self.neuron_identity!r}).")
        levels = self.quantile_levels
        if levels is None:
            return
        if self.value_head_steps == 0:
            raise ValueError(f"quantile_levels={levels} need the continuous forecast head: set value_head_steps > 0.")
        if not levels or any(not 0.0 < float(q) < 1.0 for q in levels) or any(
                b <= a for a, b in zip(levels, levels[1:])):
            raise ValueError(f"quantile_levels must be increasing numbers strictly between 0 and 1, got {levels}.")
        if not (math.isfinite(self.quantile_loss_weight) and self.quantile_loss_weight >= 0):
            raise ValueError(f"quantile_loss_weight must be a finite number >= 0, got {self.quantile_loss_weight!r}.")

    def validate_training(self) -> None:
        """Loss weights, dropout and the paper's input augmentations."""
        for name in ("value_loss_weight", "next_token_loss_weight"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"CalmConfig.{name} must be a finite number >= 0, got {value!r}.")
        if self.value_loss_weight == 0 and self.next_token_loss_weight == 0:
            raise ValueError("value_loss_weight and next_token_loss_weight are both 0: nothing would be trained.")
        for name in ("scheduled_sampling_prob", "neighbor_replacement_prob", "hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"CalmConfig.{name} must lie in [0, 1], got {value!r}.")
        if not 1 <= self.neighbor_k < self.vocab_size:
            raise ValueError(
                f"neighbor_k ({self.neighbor_k}) must be between 1 and vocab_size - 1 ({self.vocab_size - 1}); "
                "lower neighbor_k."
            )

    def validate_sessions(self) -> None:
        """Session names and neuron blocks: one entry per session, inside the embedding tables."""
        names, ranges = self.session_names, self.session_neuron_ranges
        if names is not None and len(names) > self.num_sessions:
            raise ValueError(
                f"session_names lists {len(names)} sessions but num_sessions is {self.num_sessions}; "
                "raise num_sessions or use model.add_session(...)."
            )
        if names is not None and len(set(names)) != len(names):
            raise ValueError(f"session_names must be unique, got {names}.")
        if ranges is None:
            return
        if len(ranges) > self.num_sessions:
            raise ValueError(
                f"session_neuron_ranges lists {len(ranges)} sessions but num_sessions is {self.num_sessions}; "
                "raise num_sessions."
            )
        if names is not None and len(names) != len(ranges):
            raise ValueError(
                f"session_names ({len(names)}) and session_neuron_ranges ({len(ranges)}) must have one entry per "
                "session."
            )
        for session_id, block in enumerate(ranges):
            if len(block) != 2 or not 0 <= block[0] <= block[1] <= self.num_neurons:
                raise ValueError(
                    f"session_neuron_ranges[{session_id}] = {block} is not a [start, stop) block inside "
                    f"[0, num_neurons={self.num_neurons}); raise num_neurons or fix the range."
                )

    def validate_behavior_head(self) -> None:
        """Settings of `CalmForBehaviorRegression` (the rank bound only once a head is configured)."""
        if self.behavior_head not in BEHAVIOR_HEADS:
            raise ValueError(f"Unknown behavior_head {self.behavior_head!r}; choose one of {list(BEHAVIOR_HEADS)}.")
        for name in ("num_behavior_channels", "behavior_rank", "behavior_smoothing_kernel"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        if self.num_behavior_channels is not None and self.behavior_rank > self.hidden_size:
            raise ValueError(
                f"behavior_rank ({self.behavior_rank}) exceeds the backbone hidden_size ({self.hidden_size}); "
                "a low-rank readout needs behavior_rank <= hidden_size."
            )
        if not 0.0 <= float(self.behavior_dropout) < 1.0:
            raise ValueError(f"behavior_dropout must lie in [0, 1), got {self.behavior_dropout!r}.")

    def raise_if_invalid(self) -> None:
        """Runs every `validate_*` check now, raising the failed check's own `ValueError`/`TypeError`. Fields
        assigned one by one after construction (e.g. `from_pretrained(path, behavior_rank=...)` overrides) are
        type-checked on assignment but cross-checked only here or at `save_pretrained`."""
        try:
            self.validate()
        except StrictDataclassError as error:
            cause = error.__cause__
            if not isinstance(cause, (ValueError, TypeError)):
                raise
            raise type(cause)(f"{type(self).__name__}: {cause}") from error

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "CalmConfig":
        """Builds a config from the model part of preset `name` ("tiny", "cpu", "paper"; the table is in
        `calm_hf.presets`), with fields overridden by `overrides`. Turning the preset's forecast head off
        (`value_head_steps=0`) also turns off its raw-trace highway and its quantiles, which only add to that head; the
        per-neuron highway (`identity_highway`) goes with the highway or the data identity."""
        fields = {**preset_fields(name, "model"), **overrides}
        needs = (overrides.get("value_head_steps") == 0 or overrides.get("value_skip_windows") == 0
                 or overrides.get("neuron_identity") == "table")
        if needs and "identity_highway" not in overrides:  # the per-neuron highway needs a data identity and a highway
            fields["identity_highway"] = False
        if overrides.get("neuron_identity") == "table" and "identity_coupling_skill" not in overrides:
            fields["identity_coupling_skill"] = False
        if overrides.get("value_head_steps") == 0:
            if "value_skip_windows" not in overrides:
                fields["value_skip_windows"] = 0
            if "quantile_levels" not in overrides:
                fields["quantile_levels"] = None
        return cls(**fields)

    def session_id(self, name: str) -> int:
        """Returns the session id recorded for `name` in `session_names`."""
        if self.session_names is None or name not in self.session_names:
            raise ValueError(
                f"Unknown session {name!r}; known sessions: {self.session_names}. Add it with model.add_session(...)."
            )
        return self.session_names.index(name)

    def session_neuron_ids(self, session: str | int) -> list[int]:
        """Returns the global neuron ids of a session given by name or id."""
        session_id = self.session_id(session) if isinstance(session, str) else int(session)
        if self.session_neuron_ranges is None or not 0 <= session_id < len(self.session_neuron_ranges):
            raise ValueError(f"No neuron range recorded for session {session!r}; see config.session_neuron_ranges.")
        start, stop = self.session_neuron_ranges[session_id]
        return list(range(start, stop))


__all__ = ["BEHAVIOR_HEADS", "CALM_PRESETS", "NEURON_IDENTITIES", "CalmConfig"]
