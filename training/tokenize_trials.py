#!/usr/bin/env python
"""Stage 1, tokenization step: add `input_ids` (int16 codes) to every trial of a DatasetDict for stage 2.

    python training/tokenize_trials.py --tokenizer_path runs/tokenizer --trials_dataset runs/sim-trials \
        --output_dir runs/sim-tokenized --bf16

Writes to a temporary folder and renames it into place, so an interrupted run never leaves a half-written dataset.
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
from calm_hf.data import load_trial_corpus, save_session_metadata, tokenize_dataset

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
    tokenizer = CalmTokenizer.from_pretrained(args.tokenizer_path).eval()
    corpus, sessions = load_trial_corpus(args.trials_dataset)
    dtype = torch.bfloat16 if args.bf16 else None
    tokenized = datasets.DatasetDict(
        {name: tokenize_dataset(split, tokenizer, batch_size=args.batch_size, dtype=dtype) for name, split in corpus.items()}
    )
    partial = args.output_dir.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    tokenized.save_to_disk(partial)
    save_session_metadata(partial, sessions)
    shutil.rmtree(args.output_dir, ignore_errors=True)
    os.replace(partial, args.output_dir)
    logger.info("wrote %s", args.output_dir)
    return tokenized


if __name__ == "__main__":
    main()
