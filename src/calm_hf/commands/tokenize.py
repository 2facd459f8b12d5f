"""`calm tokenize`, stage 1's tokenization step: add `input_ids` (int16 codes) to every trial of a DatasetDict.

    calm tokenize --tokenizer_path runs/tokenizer --trials_dataset runs/sim-trials \
        --output_dir runs/sim-tokenized --bf16

Writes to `<output_dir>.partial` and renames it into place, so an interrupted run never leaves a half-written
dataset; a stale `.partial` from a killed run is removed on the next one. A corpus of shards (`calm_hf.data.corpus`,
a folder with `corpus.json`) is tokenized shard by shard into the same layout.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field

import datasets
import torch

from ..atomic import claim_output_folder, partial_path
from ..data import load_trial_corpus, save_trial_dataset, tokenize_dataset
from ..data.corpus import MANIFEST
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


TOKENIZER_RECORD = "calm_tokenizer.json"  # which tokenizer made a tokenized dataset (its fingerprint)


def tokenizer_record(tokenizer: CalmTokenizer, path: str) -> str:
    """The JSON `calm tokenize` writes beside its output: the tokenizer's fingerprint and where it was read from."""
    return json.dumps({"fingerprint": tokenizer.fingerprint(), "tokenizer_path": os.path.abspath(path)}, indent=1)


def check_dataset_tokenizer(dataset: str, fingerprint: str | None, source: str) -> None:
    """Refuse training on `dataset` with a tokenizer other than the one that tokenized it (their codes would not
    mean the same). `fingerprint` is the tokenizer's (or a model's `config.tokenizer_fingerprint`), `source` names it
    in the message. Datasets without the record (Hub datasets, older outputs) and unknown fingerprints pass."""
    record = os.path.join(str(dataset), TOKENIZER_RECORD)
    if fingerprint is None or not os.path.isfile(record):
        return
    with open(record) as handle:
        made = json.load(handle)
    if made.get("fingerprint") != fingerprint:
        raise ValueError(
            f"{dataset} was tokenized by the tokenizer at {made.get('tokenizer_path')} (fingerprint "
            f"{made.get('fingerprint')}), not by {source} (fingerprint {fingerprint}): the codes mean something else "
            f"to it. Use the tokenizer that made the dataset, or tokenize the trials again with this one "
            f"(calm tokenize --tokenizer_path <its folder> ...)."
        )


def run(argv: list[str] | None = None) -> datasets.DatasetDict:
    """Parse `argv` (see `TokenizeArguments`), write the tokenized DatasetDict and return it."""
    args, output_args = parse_command_args((TokenizeArguments, OutputArguments), argv, prog="calm tokenize",
                                           recipe="tokenize")
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
    dtype = torch.bfloat16 if args.bf16 else None
    if os.path.isfile(os.path.join(args.trials_dataset, MANIFEST)):
        return tokenize_corpus(args.trials_dataset, target, tokenizer, args.batch_size, dtype, args.tokenizer_path)
    corpus, sessions = load_trial_corpus(args.trials_dataset)
    tokenized = datasets.DatasetDict(
        {name: tokenize_dataset(split, tokenizer, batch_size=args.batch_size, dtype=dtype) for name, split in corpus.items()}
    )
    # dataset + calm_sessions.json + the tokenizer's fingerprint go to <output_dir>.partial, are fsynced and renamed
    # into place together
    save_trial_dataset(tokenized, target, sessions, command="tokenize",
                       extra_files={TOKENIZER_RECORD: tokenizer_record(tokenizer, args.tokenizer_path)})
    logger.info("wrote %s", args.output_dir)
    return tokenized


def tokenize_corpus(corpus_dir: str, target, tokenizer, batch_size: int, dtype, tokenizer_path: str = "") -> dict:
    """Tokenize every shard of a corpus into `target` (same shard names, the manifest copied last), atomically as a
    whole; returns the manifest."""
    from pathlib import Path

    from ..atomic import atomic_folder
    from ..data import load_session_metadata
    from ..data.corpus import load_manifest

    manifest = load_manifest(corpus_dir)

    def write(staging: Path) -> None:
        staging.mkdir(parents=True, exist_ok=True)
        for shard in manifest["shards"]:
            source = Path(corpus_dir) / shard["path"]
            corpus = datasets.load_from_disk(str(source))
            tokenized = datasets.DatasetDict({name: tokenize_dataset(split, tokenizer, batch_size=batch_size,
                                                                     dtype=dtype) for name, split in corpus.items()})
            save_trial_dataset(tokenized, staging / shard["path"], load_session_metadata(source))
            logger.info("tokenized %s", shard["path"])
        (staging / TOKENIZER_RECORD).write_text(tokenizer_record(tokenizer, tokenizer_path))
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1))

    atomic_folder(target, write, command="tokenize")
    return manifest


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-tokenize` (and `calm tokenize`): returns the exit code."""
    return run_command("tokenize", lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
