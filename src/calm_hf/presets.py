"""Named sizes of CalM: one table for the tokenizer (NQ) and the dual-axis transformer (DAT).

`CalmTokenizerConfig.from_preset(name)` reads `PRESETS[name]["tokenizer"]` and `CalmConfig.from_preset(name)` reads
`PRESETS[name]["model"]`, so a preset name means the same pair everywhere (training recipes, benchmarks, tests).
Only the fields that differ from the configs' defaults (the paper's sizes) are listed.

- "tiny": seconds-long unit tests.
- "cpu": real use on a 2-core CPU in fp32: sized so the main job's tokenizer and pretraining fit its time budget there
  (step times in benchmarks/results/speed.md).
- "paper": the publication's sizes (NQ: dim 512, codebook 128, 4 + 4 layers, 4 heads, window 4; DAT: dim 512,
  6 layers, 8 heads, FFN 2048).

Every DAT preset computes neuron identities from data (`neuron_identity="data"`: any recording, any number of neurons,
zero-shot; `CalmConfig.from_preset(name, neuron_identity="table")` gives learned per-session tables instead) and
predicts quantiles of its forecast. The cpu and paper DATs carry the continuous forecast head and the linear neuron mixer (what makes the model use the
population; see `CalmConfig`), and the cpu tokenizer trains a plain VQ-VAE objective (the paper's AR, entropy,
orthogonality and Pearson terms cost held-out reconstruction at this size; the paper preset keeps them). The cpu and
tiny DATs' head also reads each neuron's own last windows of raw trace: the raw-trace highway (`value_skip_*`), since
the codes lose the exact level of the last context window, which costs the first forecast frames. `calm pretrain`
starts that highway at the training trials' ridge forecast (`--value_skip_init ridge`).

This module is stdlib-only: `save_pretrained` copies it next to the configuration files (they import it), so remote
code keeps working without calm_hf.
"""

from typing import Any

# quantiles of the forecast head: an evenly spaced grid, so CRPS is twice their mean pinball loss and 5-95% is a band
QUANTILE_LEVELS = [round(0.05 * i, 2) for i in range(1, 20)]

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "tokenizer": {
            "hidden_size": 32,
            "codebook_size": 16,
            "num_encoder_layers": 2,
            "num_decoder_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "max_token_steps": 64,
            "codebook_warmup_steps": 10,
            "gumbel_anneal_steps": 200,
            "revival_interval": 20,
            "revival_queue_size": 256,
        },
        "model": {
            "vocab_size": 16,
            "hidden_size": 32,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "intermediate_size": 64,
            "num_neurons": 64,
            "num_sessions": 4,
            "max_token_steps": 32,
            "neighbor_k": 4,
            "value_head_steps": 4,
            "neuron_mixer_rank": 8,
            "value_skip_windows": 2,
            "neuron_identity": "data",
            "identity_rank": 4,
            "identity_highway": False,
            "quantile_levels": QUANTILE_LEVELS,
        },
    },
    "cpu": {
        "tokenizer": {
            "hidden_size": 64,
            "codebook_size": 128,
            "num_encoder_layers": 2,
            "num_decoder_layers": 2,
            "num_attention_heads": 4,
            "intermediate_size": 256,
            "max_token_steps": 256,
            "codebook_warmup_steps": 200,
            "gumbel_anneal_steps": 2000,
            "revival_interval": 100,
            "revival_queue_size": 4096,
            # a plain VQ-VAE objective (MSE, commitment, EMA codebook): the paper's extra terms (AR, entropy,
            # orthogonality, Pearson) cost held-out reconstruction on every dataset of
            # benchmarks/results/tokenizer_objective.md
            "ar_weight": 0.0,
            "entropy_weight": 0.0,
            "orthogonality_weight": 0.0,
            "reconstruction_pearson_weight": 0.0,
        },
        "model": {
            "vocab_size": 128,
            "hidden_size": 96,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "intermediate_size": 384,
            "num_neurons": 600,
            "num_sessions": 3,
            "max_token_steps": 64,
            "value_head_steps": 15,
            "neuron_mixer_rank": 64,
            # the raw-trace highway: the head also reads each neuron's own last 4 windows of raw trace (a linear
            # map, as LSTNet's AR component), because the backbone reads codes only and without it the first
            # forecast frames of zebrafish's test trials were far off (benchmarks/results/value_skip/). `calm
            # pretrain` starts it at the training trials' ridge forecast (calm_hf.identity_init.init_value_skip;
            # benchmarks/results/value_skip_ridge/)
            "value_skip_windows": 4,
            # at this budget dropout, scheduled sampling and neighbour replacement cost next-token CE and step time
            # without raising forecast r (benchmarks/results/dat_ablations.md; the paper preset keeps the paper's values)
            "hidden_dropout": 0.0,
            "scheduled_sampling_prob": 0.0,
            "neighbor_replacement_prob": 0.0,
            # a foundation model: identities computed from each recording's own data (any recording, any neuron
            # count, zero-shot), bands from a quantile head (calm_hf.identity_calm, benchmarks/foundation.py)
            "neuron_identity": "data",
            "identity_rank": 32,
            # one shared raw-trace highway: per-neuron highways fitted from a recording's reference trials forecast
            # its validation trials worse on real held-out recordings (benchmarks/README.md, foundation section)
            "identity_highway": False,
            "quantile_levels": QUANTILE_LEVELS,
        },
    },
    "paper": {
        "tokenizer": {
            "window_size": 4,
            "hidden_size": 512,
            "codebook_size": 128,
            "num_encoder_layers": 4,
            "num_decoder_layers": 4,
            "num_attention_heads": 4,
        },
        "model": {
            "vocab_size": 128,
            "hidden_size": 512,
            "num_hidden_layers": 6,
            "num_attention_heads": 8,
            "intermediate_size": 2048,
            "num_neurons": 4096,
            "num_sessions": 64,
            "max_token_steps": 64,
            "value_head_steps": 15,
            "neuron_mixer_rank": 64,
            "neuron_identity": "data",
            "identity_rank": 32,
            "quantile_levels": QUANTILE_LEVELS,
        },
    },
}


def preset_fields(name: str, part: str) -> dict[str, Any]:
    """The fields of preset `name` for `part` (`"tokenizer"` or `"model"`), as a fresh dict.

    Raises:
        `ValueError` naming the known presets when `name` is not one of them.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
    return dict(PRESETS[name][part])


__all__ = ["PRESETS", "preset_fields"]
