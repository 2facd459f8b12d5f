"""`calm train-tokenizer`, stage 1: train the neural quantizer (CalmTokenizer) with the stock Trainer.

    calm train-tokenizer --trials_dataset runs/sim-trials --output_dir runs/tokenizer [--bf16]

With no optional flag it trains as `calm main` trains calm-base's tokenizer: preset, segment length, segment cap,
epochs, batch, learning rate and schedule are the cpu recipe's (`calm_hf.commands.recipes`); flags override them.

Every neuron's trace of the training split is cut into segments of `segment_frames` frames; optional real traces
(`--extra_npz` files, resampled to the model rate) are mixed in. Each loss component, the codebook perplexity and the
dead-code count are logged. Tokenize the trials afterwards with `calm tokenize`.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field

import datasets
import numpy as np
from transformers import TrainingArguments, default_data_collator, set_seed

from ..configuration_calm_tokenizer import CalmTokenizerConfig
from ..data import load_trial_corpus
from ..modeling_calm_tokenizer import CalmTokenizer
from ..trainer import CalmTrainer
from . import OutputArguments, claim_training_output, parse_command_args, run_command
from .recipes import DEFAULT_SIZE, command_defaults, load_recipe

logger = logging.getLogger("calm_hf.train_tokenizer")
RECIPE = command_defaults("train-tokenizer")  # the flags' defaults (TrainingArguments' ones are set by the parser)
# the recipe trains on whole trials of its corpus: by default segments are whole trials, at most this long
SEGMENT_FRAMES_CAP = load_recipe(DEFAULT_SIZE)["tokenizer_segment_frames"]


@dataclass
class ModelArguments:
    preset: str = field(default=RECIPE["preset"],
                        metadata={"help": "Named CalmTokenizerConfig: tiny, cpu or paper (default: the recipe's)."})
    config_overrides: str | None = field(
        default=None, metadata={"help": 'JSON of CalmTokenizerConfig fields overriding the preset, e.g. \'{"codebook_size": 64}\'.'}
    )


@dataclass
class DataArguments:
    trials_dataset: str = field(metadata={"help": "Trial DatasetDict folder (`calm prepare`) or Hub dataset id."})
    segment_frames: int | None = field(
        default=None,
        metadata={"help": f"Frames per training segment at the model rate, a multiple of the window. Default: whole "
                          f"trials, at most the recipe's {SEGMENT_FRAMES_CAP} (a tokenizer used on whole trials "
                          "reconstructs their ends better when it trained on them)."})
    max_segments: int | None = field(
        default=RECIPE["max_segments"],
        metadata={"help": "Cap on training segments (random subset; default: the recipe's); None = all."}
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


def corpus_segments(corpus_dir: str, split: str, segment_frames: int, cap: int | None,
                    rng: np.random.Generator) -> np.ndarray:
    """Segments of a corpus of shards (`calm_hf.data.corpus`): every shard whose trials hold at least one segment
    gives an equal share of `cap` (all of its segments without a cap), read one shard at a time."""
    from ..data.corpus import load_manifest

    shards = [shard for shard in load_manifest(corpus_dir)["shards"] if shard["frames"] >= segment_frames]
    if not shards:
        raise ValueError(f"no shard of {corpus_dir} has trials of {segment_frames} frames: lower --segment_frames.")
    share = None if cap is None else max(1, cap // len(shards))
    pieces = []
    for shard in shards:
        segments = cut_segments(trial_traces(datasets.load_from_disk(f"{corpus_dir}/{shard['path']}/{split}")),
                                segment_frames)
        if share is not None and len(segments) > share:
            segments = segments[rng.choice(len(segments), share, replace=False)]
        pieces.append(segments)
    return np.concatenate(pieces)


def default_segment_frames(trial_frames: int, window_size: int) -> int:
    """Whole trials of `trial_frames` (cropped to whole windows), at most `SEGMENT_FRAMES_CAP` frames."""
    return min(SEGMENT_FRAMES_CAP, trial_frames - trial_frames % window_size)


def build_segments(data_args: DataArguments, window_size: int, seed: int):
    """(train, validation) segment datasets; resolves `data_args.segment_frames` when it was left to the default."""
    corpus = None
    if data_args.segment_frames is None:
        if os.path.isfile(os.path.join(data_args.trials_dataset, "corpus.json")):
            from ..data.corpus import load_manifest

            frames = max(shard["frames"] for shard in load_manifest(data_args.trials_dataset)["shards"])
        else:
            corpus, _ = load_trial_corpus(data_args.trials_dataset)
            frames = len(corpus["train"][0]["input_values"][0])
        data_args.segment_frames = default_segment_frames(frames, window_size)
    if data_args.segment_frames % window_size:
        raise ValueError(
            f"segment_frames={data_args.segment_frames} is not a multiple of the token window {window_size}."
        )
    rng = np.random.default_rng(seed)
    if os.path.isfile(os.path.join(data_args.trials_dataset, "corpus.json")):  # a corpus of shards
        train = corpus_segments(data_args.trials_dataset, "train", data_args.segment_frames, data_args.max_segments,
                                rng)
        validation = corpus_segments(data_args.trials_dataset, "validation", data_args.segment_frames,
                                     data_args.validation_segments, rng)
        return segment_dataset(train), segment_dataset(validation)
    if corpus is None:
        corpus, _ = load_trial_corpus(data_args.trials_dataset)  # a folder or a Hub dataset id
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


# share of the run the codebook warm-up and the Gumbel annealing may take at most (see `fit_schedule_to_run`)
MAX_WARMUP_SHARE = 0.25
MAX_ANNEAL_SHARE = 0.75


def planned_optimizer_steps(training_args: TrainingArguments, num_segments: int) -> int:
    """Optimizer steps the Trainer will run: `max_steps` when set, else epochs x batches per epoch."""
    if training_args.max_steps > 0:
        return int(training_args.max_steps)
    per_step = (training_args.per_device_train_batch_size * max(1, training_args.world_size)
                * training_args.gradient_accumulation_steps)
    return max(1, math.ceil(training_args.num_train_epochs * math.ceil(num_segments / per_step)))


def fit_schedule_to_run(config: CalmTokenizerConfig, total_steps: int) -> dict[str, int]:
    """The codebook warm-up and the Gumbel annealing shortened to fit a run of `total_steps` optimizer steps.

    The codebook is only seeded (k-means on the encoder's outputs) when the warm-up ends; a run shorter than the warm-up
    saves a tokenizer whose random codebook was never fitted, and every trace collapses onto a few codes (the
    forecasting benchmark's zebrafish and Park tokenizers trained 31 and 50 steps against the cpu preset's 200-step
    warm-up). The warm-up is capped at `MAX_WARMUP_SHARE` of the run. The temperature should also reach its end value
    before the run ends (argmax codes are used at inference), so the annealing is capped at `MAX_ANNEAL_SHARE`: the
    main job's cpu recipe would otherwise stop early in its anneal. Returns the fields that changed
    (empty when the run is long enough).
    """
    changes: dict[str, int] = {}
    if config.codebook_warmup_steps > 0 and config.codebook_warmup_steps > MAX_WARMUP_SHARE * total_steps:
        changes["codebook_warmup_steps"] = max(1, int(MAX_WARMUP_SHARE * total_steps))
    if config.gumbel_anneal_steps > MAX_ANNEAL_SHARE * total_steps:
        changes["gumbel_anneal_steps"] = max(1, int(MAX_ANNEAL_SHARE * total_steps))
    return changes


def run(argv: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Parse `argv` (see the argument dataclasses), train and save the tokenizer, return the metrics.

    `callbacks` (e.g. `calm_hf.callbacks.TimeBudgetCallback`) are added to the trainer's.
    """
    model_args, data_args, training_args, output = parse_command_args(
        (ModelArguments, DataArguments, TrainingArguments, OutputArguments), argv, prog="calm train-tokenizer",
        recipe="train-tokenizer", trains=True)
    claim_training_output("train-tokenizer", training_args, output, [data_args.trials_dataset, data_args.extra_traces])
    set_seed(training_args.seed)

    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    config = CalmTokenizerConfig.from_preset(model_args.preset, **overrides)
    train, validation = build_segments(data_args, config.window_size, training_args.seed)
    logger.info("training segments: %d x %d frames", len(train), data_args.segment_frames)
    total_steps = planned_optimizer_steps(training_args, len(train))
    changes = fit_schedule_to_run(config, total_steps)
    if changes:
        logger.warning(
            "the run has %d optimizer steps: %s shortened from %s to fit it (the codebook is seeded when the warm-up "
            "ends, so a warm-up longer than the run would save an unfitted codebook)", total_steps, changes,
            {name: getattr(config, name) for name in changes})
        config = CalmTokenizerConfig.from_preset(model_args.preset, **{**overrides, **changes})
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
