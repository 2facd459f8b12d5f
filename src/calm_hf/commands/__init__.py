"""Every stage a user runs, as a package module with a `main(argv) -> int` and a console entry (LeRobot's layout).

    calm-prepare / calm prepare               calm_hf.commands.prepare
    calm-train-tokenizer / calm train-tokenizer   calm_hf.commands.train_tokenizer
    calm-tokenize / calm tokenize             calm_hf.commands.tokenize
    calm-pretrain / calm pretrain             calm_hf.commands.pretrain
    calm-adapt / calm adapt                   calm_hf.commands.adapt
    calm-finetune-behavior / calm finetune-behavior   calm_hf.commands.finetune_behavior
    calm-forecast / calm forecast             calm_hf.commands.forecast
    calm-push / calm push                     calm_hf.commands.push
    calm-analyze / calm analyze               calm_hf.commands.analyze
    calm-main / calm main                     calm_hf.commands.main (the whole pipeline)

Each module has `run(argv, ...)`, which returns what the stage produced (metrics, a dataset, a summary) for Python
callers such as the main job and the benchmarks, and `main(argv)`, which returns the exit code for the console.
All of them read their flags with `parse_command_args`: `HfArgumentParser` dataclasses, `--snake_case` flags and
`--config file.json` (or a lone `file.json`) holding the same fields, with flags on the command line overriding it.
Every command that writes takes `OutputArguments` (`--overwrite`) and checks its output with
`calm_hf.atomic.claim_output_folder` before doing any work.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

COMMANDS = {
    "main": "main",
    "prepare": "prepare",
    "train-tokenizer": "train_tokenizer",
    "tokenize": "tokenize",
    "pretrain": "pretrain",
    "adapt": "adapt",
    "finetune-behavior": "finetune_behavior",
    "forecast": "forecast",
    "push": "push",
    "analyze": "analyze",
}


@dataclass
class OutputArguments:
    overwrite: bool = field(
        default=False,
        metadata={"help": "Write even where the output folder (or file) is not empty and was not written by this "
                          "command: replace it (training commands and analyze write into it instead, deleting "
                          "nothing). Inputs, a folder holding them, the working directory and the home folder are "
                          "never replaced."},
    )


def claim_training_output(command: str, training_args, output: OutputArguments, inputs: Iterable) -> None:
    """`claim_output_folder` for a Trainer command: its `output_dir` receives checkpoints as training goes (so a run
    resumes from its own folder); only the main process checks and marks it, so DDP ranks do not race."""
    from ..atomic import claim_output_folder

    if training_args.process_index == 0:
        claim_output_folder(training_args.output_dir, command, inputs, output.overwrite, in_place=True)


def _read_config(path: str) -> dict[str, Any]:
    try:
        with open(os.path.abspath(os.path.expanduser(path))) as handle:
            values = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path}: no such file; pass a JSON file of the command's fields.") from None
    except json.JSONDecodeError as error:
        raise ValueError(f"--config {path} is not valid JSON ({error}).") from error
    if not isinstance(values, dict):
        raise ValueError(f"--config {path} must hold a JSON object of field: value pairs, got {type(values).__name__}.")
    return values


def _split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """(`--config` path or None, the remaining flags). A lone `file.json` argument is the same as `--config file.json`
    (the form the training scripts always accepted)."""
    if len(argv) == 1 and argv[0].endswith(".json"):
        return argv[0], []
    rest, config = [], None
    iterator = iter(argv)
    for item in iterator:
        if item == "--config":
            config = next(iterator, None)
            if config is None:
                raise ValueError("--config needs a path to a JSON file.")
        elif item.startswith("--config="):
            config = item.split("=", 1)[1]
        else:
            rest.append(item)
    return config, rest


def parse_command_args(dataclass_types: tuple, argv: list[str] | None = None, prog: str | None = None,
                       recipe: str | None = None, uses_torch: bool = True, trains: bool = False) -> tuple:
    """What every command does first: parse its dataclasses, set up logging and the torch thread count.

    Args:
        dataclass_types (`tuple` of dataclass types):
            The command's argument dataclasses, e.g. `(ModelArguments, DataArguments, TrainingArguments)`.
        argv (`list[str]`, *optional*):
            The flags; `sys.argv[1:]` when `None`. `--config file.json` supplies defaults for any field (required ones
            included); flags given next to it override the file.
        prog (`str`, *optional*):
            Program name shown by `--help`, e.g. `"calm pretrain"`.
        recipe (`str`, *optional*):
            A command of `calm_hf.commands.recipes`: its measured recipe becomes the defaults (`--help` shows them and
            says where they were measured); `--config` and flags override them.
        uses_torch (`bool`, *optional*, defaults to `True`):
            Set the torch thread count (`calm_hf.hardware.default_num_threads`), importing torch; `False` for a
            command that never computes with torch.
        trains (`bool`, *optional*, defaults to `False`):
            A training command: freed tensor memory is kept in the process for the next step's activations
            (`calm_hf.hardware.keep_freed_memory`). Forecasting commands keep glibc's default, so their resident
            memory follows the forecaster's memory budget.

    Returns:
        `tuple`: one instance per dataclass type.
    """
    from transformers import HfArgumentParser  # without torch: `calm forecast --help` stays quick

    from .recipes import recipe_defaults, recipe_help

    parser = HfArgumentParser(dataclass_types, prog=prog, description=recipe and recipe_help(recipe))
    # listed for --help only: `_split_config` takes it out of argv before parsing
    parser.add_argument("--config", default=None, help="A JSON file of these fields (flags next to it override it).")
    argv = list(sys.argv[1:] if argv is None else argv)
    config_path, argv = _split_config(argv)
    values = _read_config(config_path) if config_path is not None else {}
    if recipe is not None:
        given = {item[2:].split("=", 1)[0] for item in argv if item.startswith("--")} | set(values)
        parser.set_defaults(**recipe_defaults(recipe, given))
    if config_path is not None:
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"--config {config_path} has fields {unknown} that {prog or 'this command'} does not take; "
                             f"see --help for its fields.")
        # the file's values become defaults, so a required field given there is no longer required on the command line
        for action in parser._actions:
            if action.dest in values:
                action.required = False
        parser.set_defaults(**values)
    *parsed, remaining = parser.parse_args_into_dataclasses(argv, return_remaining_strings=True)
    if remaining:  # argparse's convention for bad flags: usage and exit code 2
        parser.error(f"unrecognized arguments: {' '.join(remaining)}")
    parsed = parsed[: len(dataclass_types)]  # without the --config namespace
    check_environment()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if uses_torch:  # `calm prepare` never computes with torch, and starts faster without importing it
        from ..hardware import configure_torch_threads, keep_freed_memory

        configure_torch_threads()
        if trains:
            keep_freed_memory()
    return tuple(parsed)


# environment variables the package reads, each a positive number; a typo would otherwise fail deep inside a forward
# (a float() of the attention budget) or be ignored (the thread count)
NUMERIC_ENVIRONMENT = {"CALM_EAGER_ATTENTION_MAX_GIB": ("number of GiB", float),
                       "CALM_NUM_THREADS": ("whole number", int)}


def check_environment() -> None:
    """Refuse a set but unusable numeric `CALM_*` environment variable, naming it."""
    for name, (kind, convert) in NUMERIC_ENVIRONMENT.items():
        value = os.environ.get(name)
        if value is None or value == "":
            continue
        try:
            valid = convert(value) > 0
        except ValueError:
            valid = False
        if not valid:
            raise ValueError(f"{name} must be a positive {kind}, got {value!r}; set it to one, or unset it for the "
                             "default.")


def run_command(name: str, run: Callable[[], Any]) -> int:
    """Run a command's body and turn the outcome into an exit code, as the console expects.

    0 on success; the code of a `SystemExit` (argparse uses 2 for bad flags); 130 on Ctrl-C; 1 for any other error,
    printed as one line naming the command (set `CALM_DEBUG=1` to get the traceback instead).
    """
    try:
        result = run()
    except KeyboardInterrupt:
        print(f"calm {name}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as error:  # argparse (bad flags) and explicit exits keep their code; None/0 means success
        if error.code is None or isinstance(error.code, int):
            return int(error.code or 0)
        print(error.code, file=sys.stderr)
        return 1
    except Exception as error:
        if os.environ.get("CALM_DEBUG"):
            raise
        print(f"calm {name}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return int(result) if isinstance(result, int) and not isinstance(result, bool) else 0
