#!/usr/bin/env python
"""Stage 1, tokenization step: add `input_ids` (int16 codes) to every trial of a DatasetDict for stage 2.

    python training/tokenize_trials.py --tokenizer_path runs/tokenizer --trials_dataset runs/sim-trials \
        --output_dir runs/sim-tokenized --bf16

Writes to `<output_dir>.partial` and renames it into place, so an interrupted run never leaves a half-written
dataset; a stale `.partial` from a killed run is removed on the next one.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
from dataclasses import dataclass, field

import datasets
import torch
from transformers import HfArgumentParser

from calm_hf.hardware import configure_torch_threads
from calm_hf import CalmTokenizer
from calm_hf.atomic import partial_path
from calm_hf.data import load_trial_corpus, save_trial_dataset, tokenize_dataset

logger = logging.getLogger("calm_hf.tokenize_trials")


@dataclass
class TokenizeArguments:
    tokenizer_path: str = field(metadata={"help": "Folder of the trained CalmTokenizer."})
    trials_dataset: str = field(metadata={"help": "Trial DatasetDict folder (training/prepare_data.py) or Hub id."})
    output_dir: str = field(metadata={"help": "Where the tokenized DatasetDict is written."})
    batch_size: int = field(default=16, metadata={"help": "Trials per encode call."})
    bf16: bool = field(default=False, metadata={"help": "Encode under bf16 autocast (codes can differ in rare ties)."})


def main(argv: list[str] | None = None):
    (args,) = HfArgumentParser(TokenizeArguments).parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    configure_torch_threads()
    # a .partial left by a run killed while saving is stale: remove it before starting (never read it)
    output = os.path.abspath(args.output_dir.rstrip("/"))
    for stale in (partial_path(output), partial_path(output + ".old")):
        if stale.exists():
            logger.info("removing %s left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
    tokenizer = CalmTokenizer.from_pretrained(args.tokenizer_path).eval()
    corpus, sessions = load_trial_corpus(args.trials_dataset)
    dtype = torch.bfloat16 if args.bf16 else None
    tokenized = datasets.DatasetDict(
        {name: tokenize_dataset(split, tokenizer, batch_size=args.batch_size, dtype=dtype) for name, split in corpus.items()}
    )
    # dataset + calm_sessions.json go to <output_dir>.partial, are fsynced and renamed into place together
    save_trial_dataset(tokenized, args.output_dir.rstrip("/"), sessions)
    logger.info("wrote %s", args.output_dir)
    return tokenized


if __name__ == "__main__":
    main()
