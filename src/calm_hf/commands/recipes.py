"""The measured recipes, read from the files shipped in `calm_hf/recipes/`: what `calm main` runs, and what the stage
commands default to, so a command run with no optional flag trains the way the results were measured.

- `main_<size>.json` (size `tiny`, `cpu`, `paper`): the main job's recipe. `cpu` is how `calm main` trains calm-base,
  which `benchmarks/foundation.py` evaluates (`benchmarks/results/foundation.json`); `command_defaults` turns it into
  the defaults of `calm train-tokenizer`, `calm tokenize` and `calm pretrain`.
- `behavior.json`: the behaviour-decoding recipe `benchmarks/behavior_benchmark.py` measures
  (`benchmarks/results/behavior.json`), the defaults of `calm finetune-behavior`.

Flags on the command line or in `--config` override these defaults. `calm adapt` of a data-identity model takes its
defaults from `calm_hf.adaptation.AdaptationSettings` (the recipe `benchmarks/foundation.py` measures as adapted).
"""

from __future__ import annotations

import json
from pathlib import Path

RECIPE_FOLDER = Path(__file__).resolve().parent.parent / "recipes"
RECIPE_FIELDS = (
    "corpus_sessions", "corpus_trials", "corpus_max_neurons", "corpus_real", "trial_seconds", "tokenizer_preset",
    "tokenizer_epochs", "tokenizer_batch", "tokenizer_lr", "tokenizer_segments", "tokenizer_segment_frames",
    "model_preset", "pretrain_steps", "pretrain_minutes", "pretrain_batch", "pretrain_lr", "max_neurons",
    "context_token_steps", "eval_sessions", "eval_trials", "eval_sets", "eval_max_neurons", "forecast_samples",
    "corpus_trial_loading", "model_config_overrides",
)
DEFAULT_SIZE = "cpu"  # the recipe the stage commands default to: the one calm-base is trained with
# The optimisation both training stages of the main job share (and so the stage commands' defaults): AdamW with a
# cosine schedule after a 5% warm-up.
TRAINING_SCHEDULE = {"lr_scheduler_type": "cosine", "warmup_steps": 0.05, "weight_decay": 0.01}
# command -> {its flag: the main recipe's field holding its default}
RECIPE_FLAGS = {
    "train-tokenizer": {
        "preset": "tokenizer_preset", "max_segments": "tokenizer_segments",
        "num_train_epochs": "tokenizer_epochs", "per_device_train_batch_size": "tokenizer_batch",
        "per_device_eval_batch_size": "tokenizer_batch", "learning_rate": "tokenizer_lr",
    },
    "tokenize": {},  # codes do not depend on a training recipe: its defaults are the main job's tokenize stage's
    "pretrain": {
        "preset": "model_preset", "max_neurons": "max_neurons", "context_token_steps": "context_token_steps",
        "max_steps": "pretrain_steps",
        "per_device_train_batch_size": "pretrain_batch", "per_device_eval_batch_size": "pretrain_batch",
        "learning_rate": "pretrain_lr",
    },
}
TRAINING_COMMANDS = ("train-tokenizer", "pretrain")
# behavior.json field -> `calm finetune-behavior` flag
BEHAVIOR_FLAGS = {"learning_rate": "learning_rate", "weight_decay": "weight_decay",
                  "batch_size": "per_device_train_batch_size", "max_epochs": "num_train_epochs",
                  "patience": "early_stopping_patience"}


def recipe_path(size: str) -> Path:
    """The packaged recipe file of `size` (`calm_hf/recipes/main_<size>.json`)."""
    return RECIPE_FOLDER / f"main_{size}.json"


def load_recipe(size: str) -> dict:
    """The recipe of `size`: every field of `RECIPE_FIELDS`, None where the file leaves it out."""
    path = recipe_path(size)
    spelled = json.loads(path.read_text())
    unknown = sorted(set(spelled) - set(RECIPE_FIELDS) - {"size"})
    if unknown or spelled.get("size") != size:
        raise ValueError(f"{path} names size {spelled.get('size')!r} or unknown fields {unknown}.")
    return {name: spelled.get(name) for name in RECIPE_FIELDS}


def load_behavior_recipe() -> dict:
    """The behaviour-decoding recipe (`calm_hf/recipes/behavior.json`): every field of `BEHAVIOR_FLAGS`."""
    path = RECIPE_FOLDER / "behavior.json"
    spelled = json.loads(path.read_text())
    if set(spelled) != set(BEHAVIOR_FLAGS):
        raise ValueError(f"{path} must hold exactly the fields {sorted(BEHAVIOR_FLAGS)}, got {sorted(spelled)}.")
    return spelled


def command_defaults(command: str, size: str = DEFAULT_SIZE) -> dict:
    """The defaults of `calm <command>` from the packaged recipe: `{flag: value}` (argparse destinations). The
    tokenizer's segment length depends on the data: whole trials, at most the recipe's `tokenizer_segment_frames`
    (`calm_hf.commands.train_tokenizer.default_segment_frames`).

    `train-tokenizer` and `pretrain` take the `size` main recipe's values and `TRAINING_SCHEDULE`, `tokenize` nothing
    beyond its own defaults, `finetune-behavior` the behaviour recipe (early stopping on the validation MSE, checked
    every epoch).
    """
    if command == "finetune-behavior":
        recipe = load_behavior_recipe()
        return {flag: recipe[name] for name, flag in BEHAVIOR_FLAGS.items()} | {"eval_strategy": "epoch"}
    if command not in RECIPE_FLAGS:
        raise ValueError(f"no recipe for command {command!r}; recipes exist for {sorted(RECIPE_FLAGS)} and "
                         "finetune-behavior.")
    recipe = load_recipe(size)
    defaults = {flag: recipe[name] for flag, name in RECIPE_FLAGS[command].items()}
    return defaults | (TRAINING_SCHEDULE if command in TRAINING_COMMANDS else {})


# a recipe default that gives way when the user sets the other flag: `--num_train_epochs 4` alone means 4 epochs, not
# the recipe's step count (a positive `max_steps` would override the epochs)
GIVES_WAY_TO = {"max_steps": "num_train_epochs"}


def recipe_defaults(command: str, given: set[str]) -> dict:
    """`command_defaults(command)` without the defaults that give way to a flag in `given` (the flags, or `--config`
    fields, the user set)."""
    return {flag: value for flag, value in command_defaults(command).items()
            if GIVES_WAY_TO.get(flag) not in given}


def recipe_help(command: str) -> str:
    """What `calm <command> --help` says about its defaults: where they come from and what measured them."""
    if command == "finetune-behavior":
        return ("Defaults are the behaviour-decoding recipe (calm_hf/recipes/behavior.json) measured by "
                "benchmarks/behavior_benchmark.py on five mouse V1 sessions and simulated sessions "
                "(benchmarks/results/behavior.json); flags override them.")
    return (f"Defaults are the `calm main` {DEFAULT_SIZE} recipe (calm_hf/recipes/main_{DEFAULT_SIZE}.json), the one "
            "calm-base is trained with and benchmarks/foundation.py evaluates on held-out recordings "
            "(benchmarks/results/foundation.json); flags override them.")
