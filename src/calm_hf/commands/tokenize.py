"""`calm tokenize`, stage 1's tokenization step: add `input_ids` (int16 codes) to every trial of a DatasetDict.

    calm tokenize --tokenizer_path runs/tokenizer --trials_dataset runs/sim-trials \
        --output_dir runs/sim-tokenized --bf16

Writes to `<output_dir>.partial` and renames it into place, so an interrupted run never leaves a half-written
dataset; a stale `.partial` from a killed run is removed on the next one.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass, field

import datasets
import torch

from ..atomic import claim_output_folder, partial_path
from ..data import load_trial_corpus, save_trial_dataset, tokenize_dataset
from ..modeling_calm_tokenizer import CalmTokenizer
from . import OutputArguments, parse_command_args, run_command

logger = logging.getLogger("calm_hf.tokenize_trials")


@dataclass
class TokenizeArguments:
    tokenizer_path: str = field(metadata={"help": "Folder of the trained CalmTokenizer."})
    trials_dataset: str = field(metadata={"help": "Trial DatasetDict folder (`calm prepare`) or Hub id."})
    output_dir: str = field(metadata={"help": "Where the tokenized DatasetDict is written."})
    batch_size: int = field(default=16, metadata={"help": "Trials per encode call."})
    bf16: bool = field(default=False, metadata={"help": "Encode under bf16 autocast (codes can differ in rare ties)."})


def run(argv: list[str] | None = None) -> datasets.DatasetDict:
    """Parse `argv` (see `TokenizeArguments`), write the tokenized DatasetDict and return it."""
    args, output_args = parse_command_args((TokenizeArguments, OutputArguments), argv, prog="calm tokenize")
    target = claim_output_folder(args.output_dir, "tokenize", [args.tokenizer_path, args.trials_dataset],
                                 overwrite=output_args.overwrite)
    # a .partial left by a run killed while saving is stale: remove it before starting (never read it)
    output = os.path.abspath(args.output_dir.rstrip("/"))
    for stale in (partial_path(output), partial_path(output + ".old")):
        if stale.exists():
            logger.info("removing %s left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
    tokenizer = CalmTokenizer.from_pretrained(args.tokenizer_path).eval()
    if tokenizer.codebook_frozen():
        logger.warning(
            "%s stopped training at step %d, inside its %d-step codebook warm-up: its codebook was not fitted to the "
            "encoder, so the codes will be few and poor. Retrain it longer (`calm train-tokenizer` fits the warm-up to "
            "the run).", args.tokenizer_path, int(tokenizer.training_step), tokenizer.config.codebook_warmup_steps)
    corpus, sessions = load_trial_corpus(args.trials_dataset)
    dtype = torch.bfloat16 if args.bf16 else None
    tokenized = datasets.DatasetDict(
        {name: tokenize_dataset(split, tokenizer, batch_size=args.batch_size, dtype=dtype) for name, split in corpus.items()}
    )
    # dataset + calm_sessions.json go to <output_dir>.partial, are fsynced and renamed into place together
    save_trial_dataset(tokenized, target, sessions, command="tokenize")
    logger.info("wrote %s", args.output_dir)
    return tokenized


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-tokenize` (and `calm tokenize`): returns the exit code."""
    return run_command("tokenize", lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
