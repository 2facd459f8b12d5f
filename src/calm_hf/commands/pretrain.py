"""`calm pretrain`, stage 2: pretrain the dual-axis transformer on tokenized trials with the stock Trainer.

    calm pretrain --tokenized_dataset runs/sim-tokenized --tokenizer_path runs/tokenizer \
        --output_dir runs/calm --preset cpu --bf16 --num_train_epochs 4

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

from ..configuration_calm import CalmConfig
from ..data import CalmDataCollator, CollatorEpochCallback, load_trial_corpus
from ..forecasting import CalmForecaster, check_tokenizer_matches_model, evaluate_forecasting
from ..modeling_calm import CalmForCausalNeuralModeling
from ..modeling_calm_tokenizer import CalmTokenizer
from ..processing_calm import CalmTraceProcessor
from ..trainer import CalmTrainer
from ..identity_init import init_identity_from_dataset, init_value_skip_from_dataset
from . import OutputArguments, claim_training_output, parse_command_args, run_command

logger = logging.getLogger("calm_hf.pretrain")


@dataclass
class ModelArguments:
    tokenizer_path: str = field(metadata={"help": "Folder of the trained CalmTokenizer (stage 1)."})
    preset: str = field(default="cpu", metadata={"help": "Named CalmConfig: tiny, cpu or paper."})
    config_overrides: str | None = field(
        default=None, metadata={"help": 'JSON of CalmConfig fields overriding the preset, e.g. \'{"num_hidden_layers": 2}\'.'}
    )
    init_from: str | None = field(
        default=None, metadata={"help": "Continue pretraining from this CalmForCausalNeuralModeling checkpoint."}
    )
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
        default=64, metadata={"help": "Neurons per training example (random subset, so large sessions fit)."}
    )
    context_frames: int = field(default=40, metadata={"help": "Forecast context at evaluation (frames)."})
    forecast_eval_trials: int = field(
        default=48, metadata={"help": "Validation trials rolled out at each evaluation (0 = skip the forecast metric)."}
    )
    forecast_eval_mode: str | None = field(
        default=None, metadata={"help": "direct, greedy, sample, mean or soft; default: the package's default forecast "
                                        "(direct for a model with the continuous head, else greedy)."}
    )


def build_model(model_args: ModelArguments, tokenizer: CalmTokenizer, sessions: list, max_token_steps: int):
    """A fresh (or continued) CalmForCausalNeuralModeling sized to the corpus' neuron and session tables."""
    if model_args.init_from:
        model = CalmForCausalNeuralModeling.from_pretrained(model_args.init_from)
        check_tokenizer_matches_model(model, tokenizer)
        return model
    overrides = json.loads(model_args.config_overrides) if model_args.config_overrides else {}
    config = CalmConfig.from_preset(
        model_args.preset,
        vocab_size=tokenizer.config.codebook_size,
        window_size=tokenizer.config.window_size,
        num_neurons=max(s.neuron_offset + s.num_neurons for s in sessions),
        num_sessions=len(sessions),
        session_names=[s.name for s in sessions],
        session_neuron_ranges=[[s.neuron_offset, s.neuron_offset + s.num_neurons] for s in sessions],
        max_token_steps=max(max_token_steps, 64),
        **overrides,
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


def run(argv: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Parse `argv` (see the argument dataclasses), pretrain and save the model (with its `tokenizer/`), return the
    metrics. `callbacks` (e.g. `calm_hf.callbacks.TimeBudgetCallback`) are added to the trainer's."""
    model_args, data_args, training_args, output = parse_command_args(
        (ModelArguments, DataArguments, TrainingArguments, OutputArguments), argv, prog="calm pretrain")
    claim_training_output("pretrain", training_args, output,
                          [data_args.tokenized_dataset, model_args.tokenizer_path, model_args.init_from])
    training_args.remove_unused_columns = False  # the collator needs session_id/neuron_ids before renaming
    set_seed(training_args.seed)

    tokenizer = CalmTokenizer.from_pretrained(model_args.tokenizer_path)
    corpus, sessions, token_steps = load_tokenized(data_args.tokenized_dataset)
    model = build_model(model_args, tokenizer, sessions, token_steps)
    if model_args.identity_init not in ("coupling", "random"):
        raise ValueError(f"--identity_init must be 'coupling' or 'random', got {model_args.identity_init!r}.")
    if model_args.identity_init == "coupling" and not model_args.init_from and model.config.neuron_mixer_rank > 0:
        report = init_identity_from_dataset(model, corpus["train"])
        logger.info("identity init from the training trials' coupling: rank %d, energy kept %s", report["rank"],
                    [round(s["energy_kept"], 2) for s in report["sessions"]])
    if model_args.value_skip_init not in ("ridge", "random"):
        raise ValueError(f"--value_skip_init must be 'ridge' or 'random', got {model_args.value_skip_init!r}.")
    if model_args.value_skip_init == "ridge" and not model_args.init_from and model.value_skip is not None:
        report = init_value_skip_from_dataset(model, corpus["train"])
        logger.info("raw-trace highway started at the ridge forecast of %d training trials", report["trials"])
    model.generation_config = GenerationConfig(
        max_new_tokens=max(1, token_steps - data_args.context_frames // tokenizer.config.window_size),
        do_sample=False,
    )
    logger.info("model: %s parameters; world size %d", f"{model.num_parameters():,}", training_args.world_size)
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
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-pretrain` (and `calm pretrain`): returns the exit code."""
    return run_command("pretrain", lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
