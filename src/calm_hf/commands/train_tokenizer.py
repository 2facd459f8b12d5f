"""`calm train-tokenizer`, stage 1: train the neural quantizer (CalmTokenizer) with the stock Trainer.

    calm train-tokenizer --trials_dataset runs/sim-trials --output_dir runs/tokenizer \
        --preset cpu --bf16 --num_train_epochs 1 --per_device_train_batch_size 256 --learning_rate 2e-3

Every neuron's trace of the training split is cut into segments of `segment_frames` frames; optional real traces
(`--extra_npz` files, resampled to the model rate) are mixed in. Each loss component, the codebook perplexity and the
dead-code count are logged. Tokenize the trials afterwards with `calm tokenize`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field

import datasets
import numpy as np
from transformers import TrainingArguments, default_data_collator, set_seed

from ..configuration_calm_tokenizer import CalmTokenizerConfig
from ..data import load_trial_corpus
from ..modeling_calm_tokenizer import CalmTokenizer
from ..trainer import CalmTrainer
from . import parse_command_args, run_command

logger = logging.getLogger("calm_hf.train_tokenizer")


@dataclass
class ModelArguments:
    preset: str = field(default="cpu", metadata={"help": "Named CalmTokenizerConfig: tiny, cpu or paper."})
    config_overrides: str | None = field(
        default=None, metadata={"help": 'JSON of CalmTokenizerConfig fields overriding the preset, e.g. \'{"codebook_size": 64}\'.'}
    )


@dataclass
class DataArguments:
    trials_dataset: str = field(metadata={"help": "Trial DatasetDict folder (`calm prepare`) or Hub dataset id."})
    segment_frames: int = field(default=48, metadata={"help": "Frames per training segment (multiple of the window)."})
    max_segments: int | None = field(
        default=None, metadata={"help": "Cap on training segments (random subset); None = all."}
    )
    extra_traces: str | None = field(
        default=None,
        metadata={"help": "A .npy file of extra z-scored single-neuron traces (traces, frames) at the model rate to mix in."},
    )
    validation_segments: int = field(default=2048, metadata={"help": "Validation segments for the eval loss."})


def cut_segments(traces: np.ndarray, segment_frames: int) -> np.ndarray:
    """(traces, frames) -> (traces * k, segment_frames): non-overlapping segments, incomplete tail dropped."""
    per_trace = traces.shape[-1] // segment_frames
    if per_trace == 0:
        raise ValueError(
            f"traces have {traces.shape[-1]} frames, shorter than segment_frames={segment_frames}: lower "
            "--segment_frames (a multiple of the token window)."
        )
    usable = traces[:, : per_trace * segment_frames]
    return usable.reshape(-1, segment_frames)


def trial_traces(split: datasets.Dataset) -> np.ndarray:
    """All neurons of all trials of a split as single traces (traces, frames)."""
    values = split.with_format("numpy", columns=["input_values"])["input_values"]
    return np.concatenate([np.asarray(trial, dtype=np.float32) for trial in values], axis=0)


def segment_dataset(segments: np.ndarray) -> datasets.Dataset:
    features = datasets.Features({"input_values": datasets.Array2D(shape=(1, segments.shape[-1]), dtype="float32")})
    return datasets.Dataset.from_dict({"input_values": segments[:, None, :]}, features=features).with_format("torch")


def build_segments(data_args: DataArguments, window_size: int, seed: int):
    if data_args.segment_frames % window_size:
        raise ValueError(
            f"segment_frames={data_args.segment_frames} is not a multiple of the token window {window_size}."
        )
    corpus, _ = load_trial_corpus(data_args.trials_dataset)  # a folder or a Hub dataset id
    rng = np.random.default_rng(seed)
    train = cut_segments(trial_traces(corpus["train"]), data_args.segment_frames)
    if data_args.extra_traces:
        extra = np.load(data_args.extra_traces).astype(np.float32)
        if not np.isfinite(extra).all():
            raise ValueError(f"{data_args.extra_traces} contains NaN/Inf values: clean those traces first.")
        train = np.concatenate([train, cut_segments(extra, data_args.segment_frames)])
    if data_args.max_segments is not None and len(train) > data_args.max_segments:
        train = train[rng.choice(len(train), data_args.max_segments, replace=False)]
    validation = cut_segments(trial_traces(corpus["validation"]), data_args.segment_frames)
    validation = validation[rng.permutation(len(validation))[: data_args.validation_segments]]
    return segment_dataset(train), segment_dataset(validation)


def run(argv: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Parse `argv` (see the argument dataclasses), train and save the tokenizer, return the metrics.

    `callbacks` (e.g. `calm_hf.callbacks.TimeBudgetCallback`) are added to the trainer's.
    """
    model_args, data_args, training_args = parse_command_args(
        (ModelArguments, DataArguments, TrainingArguments), argv, prog="calm train-tokenizer")
    set_seed(training_args.seed)

    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    config = CalmTokenizerConfig.from_preset(model_args.preset, **overrides)
    train, validation = build_segments(data_args, config.window_size, training_args.seed)
    logger.info("training segments: %d x %d frames", len(train), data_args.segment_frames)
    model = CalmTokenizer(config)
    trainer = CalmTrainer(
        model=model,
        args=training_args,
        train_dataset=train,
        eval_dataset=validation,
        data_collator=default_data_collator,
        callbacks=list(callbacks or []),
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    if trainer.is_world_process_zero():
        trainer.save_model(training_args.output_dir)
    metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        trainer.save_metrics("all", metrics)
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-train-tokenizer` (and `calm train-tokenizer`): returns the exit code."""
    return run_command("train-tokenizer", lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
