"""`calm` console script: one entry for every stage, each a module of `calm_hf.commands` (also `calm-<stage>`).

    calm main [--fresh] [--size tiny] [--use_cpu]   # the whole pipeline -> ./calm-base
    calm prepare --output_dir runs/trials       # simulate, or --npz files
    calm train-tokenizer --trials_dataset ... --output_dir ...
    calm tokenize --tokenizer_path ... --trials_dataset ... --output_dir ...
    calm pretrain --tokenized_dataset ... --tokenizer_path ... --output_dir ...
    calm adapt --model_path calm-base --tokenized_dataset ... --session_name ... --output_dir ...
    calm finetune-behavior ...
    calm forecast --model calm-base --traces traces.npy --horizon 60 [--sampling_rate 30] [--num_samples 20]
                  [--holdout] [--plot out.png]
    calm push --model_dir calm-base --repo_id you/calm-base [--dataset_dir calm-base-dataset ...]
    calm analyze --model calm-base --dataset calm-base-dataset --labels labels.json --output_dir analysis

Each subcommand takes its module's flags (`calm pretrain --help`) and `--config file.json` with the same fields.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys

from .commands import COMMANDS  # the standard library only: `calm --help` starts without torch or transformers


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand and return its exit code (the `calm` console script exits with it): 0 on success, 1 when the
    command fails (the error is printed as one line; set CALM_DEBUG=1 for the traceback), 2 for bad flags, 141 when
    the reader of its output went away (`calm --help | head -1`), as for other command-line tools."""
    try:
        code = _run(sys.argv[1:] if argv is None else argv)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        # nothing more can be written; point stdout at /dev/null so the interpreter's final flush stays quiet
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 128 + getattr(signal, "SIGPIPE", 13)


def _run(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"calm: unknown command {command!r}; choose one of {sorted(COMMANDS)}.", file=sys.stderr)
        return 2
    module = importlib.import_module(f"calm_hf.commands.{COMMANDS[command]}")
    return module.main(rest)


if __name__ == "__main__":
    sys.exit(main())
