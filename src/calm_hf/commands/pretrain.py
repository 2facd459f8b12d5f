"""`calm pretrain`, stage 2: pretrain the dual-axis transformer on tokenized trials with the stock Trainer.

    calm pretrain --tokenized_dataset runs/sim-tokenized --tokenizer_path runs/tokenizer --output_dir runs/calm [--bf16]

With no optional flag it trains as `calm main` pretrains calm-base: preset, neurons per example, steps, batch, learning
rate and schedule are the cpu recipe's (`calm_hf.commands.recipes`); flags override them (`--num_train_epochs N`
alone trains N passes instead of the recipe's steps).

`--tokenized_dataset` is a tokenized DatasetDict (`calm tokenize`) or a tokenized corpus of shards (`calm tokenize` of
a `calm_hf.data.corpus` folder). A data-identity model (`neuron_identity="data"`, every preset's default) reads it as a
stream (`calm_hf.data.streaming.CalmCorpusStream`): every example carries its neurons' identity computed from 0 to
`--reference_trials` other training trials of the same session, so the model learns to use identities estimated
from many trials, from a few and from none; training runs for `--max_steps`, or `--num_train_epochs` passes over the
training trials. A table-identity model reads the DatasetDict with its session and neuron ids.

Two-process DDP on CPU (gloo), same module (training/launch_pretrain_ddp.sh):

    torchrun --nproc_per_node 2 -m calm_hf.commands.pretrain --tokenized_dataset ... --output_dir ... --use_cpu

Or `calm pretrain --config config.json` with the same fields as JSON.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import torch
from transformers import GenerationConfig, TrainingArguments, set_seed

import math
from functools import partial
from pathlib import Path

from ..configuration_calm import CalmConfig
from ..data import CalmDataCollator, CollatorEpochCallback, load_session_metadata, load_trial_corpus
from ..data.corpus import MANIFEST, load_manifest
from ..data.streaming import CalmCorpusStream
from ..identity_calm import compute_neuron_identity, identity_settings
from ..forecasting import CalmForecaster, check_tokenizer_matches_model, evaluate_forecasting
from ..modeling_calm import CalmForCausalNeuralModeling
from ..modeling_calm_tokenizer import CalmTokenizer
from ..presets import preset_fields
from ..processing_calm import CalmTraceProcessor
from ..trainer import CalmTrainer
from ..identity_init import init_identity_from_dataset, init_value_skip, init_value_skip_from_dataset
from .tokenize import check_dataset_tokenizer
from . import OutputArguments, claim_training_output, parse_command_args, run_command
from .recipes import command_defaults

logger = logging.getLogger("calm_hf.pretrain")
RECIPE = command_defaults("pretrain")  # the flags' defaults (TrainingArguments' ones are set by the parser)


@dataclass
class ModelArguments:
    tokenizer_path: str = field(metadata={"help": "Folder of the trained CalmTokenizer (stage 1)."})
    preset: str = field(default=RECIPE["preset"],
                        metadata={"help": "Named CalmConfig: tiny, cpu or paper (default: the recipe's)."})
    config_overrides: str | None = field(
        default=None, metadata={"help": 'JSON of CalmConfig fields overriding the preset, e.g. \'{"num_hidden_layers": 2}\'.'}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "Continue pretraining from this CalmForCausalNeuralModeling checkpoint."}
    )
    context_token_steps: int | None = field(
        default=RECIPE["context_token_steps"],
        metadata={"help": "Token steps of context the model's forecasts read (CalmConfig.context_token_steps; default: "
                          "the recipe's, measured on validation by benchmarks/context_length.py; unset = as many as "
                          "fit)."})
    identity_init: str = field(
        default="coupling",
        metadata={"help": "Neuron embeddings of a fresh model: 'coupling' starts the neuron mixer at each session's "
                          "measured one-step coupling (calm_hf.identity_init; 2.7x fewer steps to the same "
                          "validation r), 'random' is the plain init."},
    )
    value_skip_init: str = field(
        default="ridge",
        metadata={"help": "Raw-trace highway of a fresh model with value_skip_windows > 0: 'ridge' starts it at the "
                          "training trials' best linear forecast from each neuron's own recent trace (and the head's "
                          "output at zero; calm_hf.identity_init.init_value_skip_from_dataset), 'random' is the "
                          "plain init."},
    )


@dataclass
class DataArguments:
    tokenized_dataset: str = field(metadata={"help": "DatasetDict folder written by `calm tokenize`."})
    max_neurons: int | None = field(
        default=RECIPE["max_neurons"],
        metadata={"help": "Neurons per training example (random subset, so large sessions fit; default: the recipe's)."}
    )
    context_frames: int = field(default=40, metadata={"help": "Forecast context at evaluation (frames)."})
    forecast_eval_trials: int = field(
        default=48, metadata={"help": "Validation trials rolled out at each evaluation (0 = skip the forecast metric)."}
    )
    forecast_eval_mode: str | None = field(
        default=None, metadata={"help": "direct, greedy, sample, mean or soft; default: the package's default forecast "
                                        "(direct for a model with the continuous head, else greedy)."}
    )
    reference_trials: str = field(
        default="0,1,2,4,8,16,32",
        metadata={"help": "Data-identity models: the number of reference trials behind each example's identities is "
                          "drawn from these (0 = none, the zero-shot case), so the model meets every amount of "
                          "reference a user can have."},
    )


def reference_choices(text: str) -> tuple[int, ...]:
    """`--reference_trials "0,4,16"` as a tuple of non-negative counts, with a clear error otherwise."""
    try:
        counts = tuple(int(item) for item in str(text).split(",") if item.strip())
    except ValueError:
        counts = ()
    if not counts or min(counts) < 0:
        raise ValueError(f"--reference_trials must be comma-separated counts >= 0 (e.g. 0,4,16), got {text!r}.")
    return counts


def corpus_folders(path: str) -> list[Path]:
    """The shard folders of a tokenized corpus (`corpus.json`), or the one DatasetDict folder given."""
    if (Path(path) / MANIFEST).is_file():
        return [Path(path) / shard["path"] for shard in load_manifest(path)["shards"]]
    return [Path(path)]


def identity_function(config: CalmConfig):
    """The stream's `identity_fn` for `config`: the data identity of a reference (None = no reference)."""
    return partial(compute_neuron_identity, **identity_settings(config))


def build_model(model_args: ModelArguments, tokenizer: CalmTokenizer, sessions: list, max_token_steps: int,
                max_neurons: int | None = None):
    """A fresh (or continued) CalmForCausalNeuralModeling sized to the corpus' neuron and session tables; its
    neuron-axis attention groups are as wide as a training example (`max_neurons`, None = whole sessions), so a
    larger recording is read the way training read it."""
    if model_args.init_from:
        model = CalmForCausalNeuralModeling.from_pretrained(model_args.init_from)
        check_tokenizer_matches_model(model, tokenizer)
        return model
    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    tables = {}
    if {**preset_fields(model_args.preset, "model"), **overrides}.get("neuron_identity", "table") == "table":
        # one block of table rows per session
        tables = dict(num_neurons=max(s.neuron_offset + s.num_neurons for s in sessions), num_sessions=len(sessions),
                      session_names=[s.name for s in sessions],
                      session_neuron_ranges=[[s.neuron_offset, s.neuron_offset + s.num_neurons] for s in sessions])
    config = CalmConfig.from_preset(
        model_args.preset,
        vocab_size=tokenizer.config.codebook_size,
        window_size=tokenizer.config.window_size,
        max_token_steps=max(max_token_steps, 64),
        **{"neuron_attention_block": max_neurons, "context_token_steps": model_args.context_token_steps, **tables,
           **overrides},
    )
    # recorded so a tokenizer from another run (same codebook size, different codes) is refused when paired later
    config.tokenizer_fingerprint = tokenizer.fingerprint()
    model = CalmForCausalNeuralModeling(config)
    model.set_codebook_neighbors(tokenizer.get_codebook())
    return model


def forecast_evaluation(tokenizer, validation, data_args: DataArguments, bf16: bool):
    """Returns the callable CalmTrainer runs after each evaluation: forecast Pearson r on validation trials."""

    def evaluate(model) -> dict[str, float]:
        forecaster = CalmForecaster(model, tokenizer, autocast_dtype=torch.bfloat16 if bf16 else None)
        metrics = evaluate_forecasting(
            forecaster,
            validation,
            context_frames=data_args.context_frames,
            mode=data_args.forecast_eval_mode,
            max_trials=data_args.forecast_eval_trials,
        )
        return {"forecast_pearson_r": metrics["pearson_r"], "forecast_mse": metrics["mse"]}

    return evaluate


def load_tokenized(path: str) -> tuple:
    """(corpus, sessions, token_steps) of a tokenized DatasetDict; a clear error when it was never tokenized."""
    corpus, sessions = load_trial_corpus(path)  # a folder or a Hub dataset id
    if "input_ids" not in corpus["train"].column_names:
        raise ValueError(
            f"{path} has no `input_ids` column: tokenize it first with `calm tokenize` (stage 1's tokenization step)."
        )
    return corpus, sessions, len(corpus["train"][0]["input_ids"][0])


def build_trainer(model, tokenizer, corpus, sessions, data_args: DataArguments, training_args: TrainingArguments,
                  callbacks: list | None = None) -> CalmTrainer:
    """The CalmTrainer of pretraining: token columns (plus traces for the value head), neuron-subsampling collator,
    the trace processor saved with each checkpoint and, when asked, forecast Pearson r at each evaluation."""
    columns = ["input_ids", "neuron_ids", "session_id"]
    with_values = model.config.value_head_steps > 0
    if with_values:  # the continuous forecast head trains on the z-scored traces the codes were made from
        columns.append("input_values")
    validation = corpus["validation"]
    extra = None
    if data_args.forecast_eval_trials > 0:
        extra = forecast_evaluation(tokenizer, validation, data_args, training_args.bf16)
    collator = CalmDataCollator(max_neurons=data_args.max_neurons, seed=training_args.seed, with_values=with_values)
    return CalmTrainer(
        model=model,
        args=training_args,
        train_dataset=corpus["train"].select_columns(columns),
        eval_dataset=validation.select_columns(columns),
        data_collator=collator,
        callbacks=[CollatorEpochCallback(collator), *(callbacks or [])],
        neural_tokenizer=tokenizer,
        # saved with the checkpoint: the rate, window and smoothing the training data were prepared with
        trace_processor=CalmTraceProcessor(sampling_rate=model.config.frame_rate_hz, window_size=model.config.window_size,
                                           ema_alpha=sessions[0].ema_alpha if sessions else None),
        extra_evaluation=extra,
    )


def local_tokenized_dataset(source: str) -> str:
    """`source` as a local folder: a folder is returned as it is; a Hub dataset id (`namespace/name`, pushed by
    `calm_hf.hub.push_to_hub`) is read with `load_trial_corpus` and saved once more, with its session metadata, under
    `$CALM_CACHE_DIR/hub-datasets/` (default `~/.cache/calm_hf`; refreshed on every call), so both training paths
    read it like a local one."""
    if Path(source).is_dir():
        return source
    from ..data import load_trial_corpus, save_trial_dataset

    corpus, sessions = load_trial_corpus(source)  # refuses what is neither a folder nor a Hub id, naming both
    cache = Path(os.environ.get("CALM_CACHE_DIR") or "~/.cache/calm_hf").expanduser() / "hub-datasets"
    target = cache / source.replace("/", "--")
    save_trial_dataset(corpus, target, sessions)
    logger.info("read Hub dataset %s into %s", source, target)
    return str(target)


def load_stream_source(path: str) -> tuple[list[Path], list, int, int]:
    """(shard folders, their sessions, the longest trial in token steps, training trials) of a tokenized corpus or
    DatasetDict, read from the shards' metadata without loading any trials."""
    import datasets

    shards = corpus_folders(path)
    sessions, token_steps, train_rows = [], 0, 0
    for shard in shards:
        if not (shard / "dataset_dict.json").is_file():
            raise FileNotFoundError(f"{shard} is not a DatasetDict folder: pass a `calm tokenize` output (a tokenized "
                                    "DatasetDict, or a tokenized corpus with corpus.json).")
        train = datasets.load_from_disk(str(shard / "train"))
        if "input_ids" not in train.column_names:
            raise ValueError(f"{shard} has no `input_ids` column: tokenize it first with `calm tokenize`.")
        sessions += load_session_metadata(shard)
        token_steps = max(token_steps, len(train[0]["input_ids"][0]))
        train_rows += len(train)
    return shards, sessions, token_steps, train_rows


def stream_steps(training_args: TrainingArguments, train_rows: int) -> int:
    """`--max_steps`, or the steps of `--num_train_epochs` passes over the training trials (a stream has no length)."""
    if training_args.max_steps > 0:
        return training_args.max_steps
    per_step = (training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
                * max(1, training_args.world_size))
    return max(1, math.ceil(training_args.num_train_epochs * train_rows / per_step))


def highway_trials(shards: list[Path], per_shard: int = 200):
    """Training trials (z-scored traces) for the highway's ridge start: the first `per_shard` of every shard, read one
    at a time."""
    import datasets

    for shard in shards:
        train = datasets.load_from_disk(str(shard / "train")).select_columns(["input_values"]).with_format("numpy")
        for row in train.select(range(min(per_shard, len(train)))):
            yield row["input_values"]


def build_stream_trainer(model, tokenizer, shards: list[Path], sessions: list, data_args: DataArguments,
                         training_args: TrainingArguments, callbacks: list | None = None) -> CalmTrainer:
    """The CalmTrainer of a data-identity model: the training trials as a stream with their identities, the
    validation trials (identities from every training trial of their session) for the evaluation loss."""
    identity = identity_function(model.config)
    columns = ("input_ids", "input_values", "session_id")
    train = CalmCorpusStream(shards, "train", max_neurons=data_args.max_neurons, columns=columns,
                             reference_trials=reference_choices(data_args.reference_trials), identity_fn=identity,
                             seed=training_args.seed)
    validation = CalmCorpusStream(shards, "validation", max_neurons=data_args.max_neurons, columns=columns,
                                  reference_trials=(10**6,), identity_fn=identity, seed=training_args.seed, passes=1)
    collator = CalmDataCollator(seed=training_args.seed, with_values=True, crop_to_shortest=True,
                                window_size=model.config.window_size)
    return CalmTrainer(
        model=model, args=training_args, train_dataset=train, eval_dataset=validation, data_collator=collator,
        callbacks=list(callbacks or []), neural_tokenizer=tokenizer,
        trace_processor=CalmTraceProcessor(sampling_rate=model.config.frame_rate_hz, window_size=model.config.window_size,
                                           ema_alpha=sessions[0].ema_alpha if sessions else None),
    )


def stream_step_seconds(tokenized_dataset: str, tokenizer_path: str, preset: str, max_neurons: int, batch_size: int,
                        bf16: bool = False, steps: int = 8, seed: int = 0,
                        config_overrides: dict | None = None) -> float:
    """Median wall-clock seconds of a pretraining step of a fresh `preset` model on real batches of the stream (the
    stream's identity computation and collation included): what a time budget plans its steps from."""
    import time

    tokenizer = CalmTokenizer.from_pretrained(tokenizer_path)
    shards, sessions, token_steps, _ = load_stream_source(tokenized_dataset)
    overrides = json.dumps(config_overrides) if config_overrides else None
    model = build_model(ModelArguments(tokenizer_path=tokenizer_path, preset=preset, config_overrides=overrides),
                        tokenizer, sessions, token_steps, max_neurons)
    model.train()
    stream = iter(CalmCorpusStream(shards, "train", max_neurons=max_neurons, seed=seed,
                                   columns=("input_ids", "input_values", "session_id"),
                                   identity_fn=identity_function(model.config)))
    collator = CalmDataCollator(with_values=True, crop_to_shortest=True, window_size=model.config.window_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    times = []
    for _ in range(steps + 1):  # the first step warms up allocations
        start = time.perf_counter()
        batch = collator([next(stream) for _ in range(batch_size)])
        batch.pop("neuron_ids"), batch.pop("session_ids")
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return times[len(times) // 2]


def run(argv: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Parse `argv` (see the argument dataclasses), pretrain and save the model (with its `tokenizer/`), return the
    metrics. `callbacks` (e.g. `calm_hf.callbacks.TimeBudgetCallback`) are added to the trainer's."""
    model_args, data_args, training_args, output = parse_command_args(
        (ModelArguments, DataArguments, TrainingArguments, OutputArguments), argv, prog="calm pretrain",
        recipe="pretrain", trains=True)
    claim_training_output("pretrain", training_args, output,
                          [data_args.tokenized_dataset, model_args.tokenizer_path, model_args.init_from])
    training_args.remove_unused_columns = False  # the collator needs session_id/neuron_ids before renaming
    set_seed(training_args.seed)

    tokenizer = CalmTokenizer.from_pretrained(model_args.tokenizer_path)
    for name, value, allowed in (("--identity_init", model_args.identity_init, ("coupling", "random")),
                                 ("--value_skip_init", model_args.value_skip_init, ("ridge", "random"))):
        if value not in allowed:
            raise ValueError(f"{name} must be {' or '.join(repr(a) for a in allowed)}, got {value!r}.")
    data_args.tokenized_dataset = local_tokenized_dataset(data_args.tokenized_dataset)
    check_dataset_tokenizer(data_args.tokenized_dataset, tokenizer.fingerprint(), model_args.tokenizer_path)
    shards, sessions, token_steps, train_rows = load_stream_source(data_args.tokenized_dataset)
    model = build_model(model_args, tokenizer, sessions, token_steps, data_args.max_neurons)
    streamed = model.config.neuron_identity == "data"
    corpus = None
    if streamed:
        training_args.max_steps = stream_steps(training_args, train_rows)
    else:
        if len(shards) > 1:
            raise ValueError(f"{data_args.tokenized_dataset} is a corpus of {len(shards)} shards: a table-identity "
                             "model trains on one DatasetDict (one table row per neuron); use a data-identity preset.")
        corpus, sessions, token_steps = load_tokenized(data_args.tokenized_dataset)
    fresh = not model_args.init_from
    if model_args.identity_init == "coupling" and fresh and not streamed and model.config.neuron_mixer_rank > 0:
        report = init_identity_from_dataset(model, corpus["train"])
        logger.info("identity init from the training trials' coupling: rank %d, energy kept %s", report["rank"],
                    [round(s["energy_kept"], 2) for s in report["sessions"]])
    if model_args.value_skip_init == "ridge" and fresh and model.value_skip is not None:
        report = (init_value_skip(model, highway_trials(shards)) if streamed
                  else init_value_skip_from_dataset(model, corpus["train"]))
        logger.info("raw-trace highway started at the ridge forecast of %d training trials", report["trials"])
    model.generation_config = GenerationConfig(
        max_new_tokens=max(1, token_steps - data_args.context_frames // tokenizer.config.window_size),
        do_sample=False,
    )
    logger.info("model: %s parameters; world size %d", f"{model.num_parameters():,}", training_args.world_size)
    if streamed:
        trainer = build_stream_trainer(model, tokenizer, shards, sessions, data_args, training_args, callbacks)
    else:
        trainer = build_trainer(model, tokenizer, corpus, sessions, data_args, training_args, callbacks)
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    if trainer.is_world_process_zero():
        trainer.save_model(training_args.output_dir)
        tokenizer.save_pretrained(os.path.join(training_args.output_dir, "tokenizer"))
    if training_args.eval_strategy != "no" or training_args.do_eval:
        metrics.update(trainer.evaluate())
    if trainer.is_world_process_zero():
        trainer.save_metrics("all", metrics)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # once every rank is done (rank 0 saves alone), close the process group while the interpreter is alive: left
        # to the interpreter's exit, gloo's worker threads can abort a rank after a run that succeeded
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-pretrain` (and `calm pretrain`): returns the exit code."""
    return run_command("pretrain", lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
