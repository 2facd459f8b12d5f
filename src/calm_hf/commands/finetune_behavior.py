"""`calm finetune-behavior`: decode behaviour from the frozen dual-axis transformer (CalmForBehaviorRegression).

    calm finetune-behavior --model_name_or_path runs/calm --tokenized_dataset runs/park-tokenized \
        --behavior_head glu --output_dir runs/calm-behavior

With no optional flag it trains as `benchmarks/behavior_benchmark.py` measured (`calm_hf/recipes/behavior.json`):
AdamW learning rate, weight decay and batch, evaluation every epoch, and the head of the best validation MSE kept once
`--early_stopping_patience` epochs bring no better one (at most `--num_train_epochs`); flags override them.

Held-out session: start from a behaviour checkpoint trained on other sessions and train only the new session's rows
of the head's neuron-weight bank (backbone, projections, bias and smoothing stay bit-identical; weight decay is forced
to 0 because it would shrink the frozen rows):

    calm finetune-behavior --model_name_or_path runs/calm-behavior --tokenized_dataset runs/park-tokenized \
        --adapt_session mrcuts28 --output_dir runs/calm-behavior-mrcuts28

The tokenized DatasetDict (`calm prepare` + `calm tokenize`) must carry a `behavior` column
(z-scored with training statistics by the data layer). Dataset sessions are matched to the model's sessions by name
(`config.session_names`); an adapted session unknown to the model is added with `model.add_session` (its backbone
embeddings then start at the mean of the known ones). Reports per-channel R^2 and MSE on validation and test.
Or `calm finetune-behavior --config config.json` with the same fields as JSON.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import datasets
import numpy as np
from transformers import EvalPrediction, TrainingArguments, set_seed

from ..data import CalmDataCollator, SessionInfo, load_trial_corpus
from ..metrics.functional import mse, r2_score
from ..modeling_calm_behavior import CalmForBehaviorRegression
from ..callbacks import BestValidationCallback
from ..trainer import CalmTrainer
from .tokenize import check_dataset_tokenizer
from . import OutputArguments, claim_training_output, parse_command_args, run_command
from .recipes import command_defaults

logger = logging.getLogger("calm_hf.finetune_behavior")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        metadata={"help": "CalmForCausalNeuralModeling checkpoint (new head) or CalmForBehaviorRegression checkpoint."}
    )
    behavior_head: str | None = field(default=None, metadata={"help": "glu or linear (default: checkpoint's, else glu)."})
    behavior_rank: int | None = field(default=None, metadata={"help": "Rank R of the linear head (default 4)."})
    behavior_dropout: float | None = field(default=None, metadata={"help": "Dropout on the GLU features (default 0.1)."})
    behavior_smoothing_kernel: int | None = field(
        default=None, metadata={"help": "Frames of the causal smoothing conv (default 5)."}
    )
    freeze_backbone: bool = field(default=True, metadata={"help": "Keep the backbone frozen (the paper's protocol)."})


@dataclass
class DataArguments:
    tokenized_dataset: str = field(metadata={"help": "Tokenized DatasetDict with a `behavior` column."})
    adapt_session: str | None = field(
        default=None, metadata={"help": "Train only this session's neuron weights (held-out session); uses its trials."}
    )
    sessions: list[str] | None = field(
        default=None, metadata={"help": "Train/evaluate on these sessions only (default: all, or --adapt_session)."}
    )
    max_neurons: int | None = field(
        default=None, metadata={"help": "Random neuron subset per trial (default: all neurons, as at test time)."}
    )
    early_stopping_patience: int = field(
        default=command_defaults("finetune-behavior")["early_stopping_patience"],
        metadata={"help": "Evaluations without a better validation MSE before training stops; the best head is kept "
                          "(0 = train every epoch and keep the last)."},
    )


class CalmBehaviorCollator:
    """`CalmDataCollator` for behaviour decoding: its `behavior_labels` become `labels` (the token `labels` are
    dropped). Rows need `input_ids`, `neuron_ids`, `session_id` and `behavior` `(channels, frames)`."""

    def __init__(self, max_neurons: int | None = None, seed: int = 0):
        self.collator = CalmDataCollator(max_neurons=max_neurons, seed=seed)

    def __call__(self, features: list[dict[str, Any]]) -> dict:
        if any(row.get("behavior") is None for row in features):
            raise ValueError(
                "Rows need a `behavior` column (channels, frames); build the dataset from sessions with behaviour."
            )
        batch = self.collator(features)
        batch.pop("labels")
        batch["labels"] = batch.pop("behavior_labels")
        return batch


def behavior_metrics(channel_names: list[str] | None = None):
    """`compute_metrics` for the Trainer: channel-averaged and per-channel R^2 and MSE at frame rate."""

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        pred = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
        truth = prediction.label_ids
        pred, truth = np.asarray(pred, dtype=np.float64), np.asarray(truth, dtype=np.float64)
        # (trials, channels, frames) -> (trials, frames, channels): R^2 per channel over all trial-frames
        r2 = r2_score(pred.transpose(0, 2, 1), truth.transpose(0, 2, 1))
        names = channel_names if channel_names and len(channel_names) == len(r2) else [str(i) for i in range(len(r2))]
        metrics = {"r2": float(np.nanmean(r2)), "mse": mse(pred, truth)}
        for index, name in enumerate(names):
            metrics[f"r2_{name}"] = float(r2[index])
            metrics[f"mse_{name}"] = mse(pred[:, index], truth[:, index])
        return metrics

    return compute_metrics


def session_mapping(model: CalmForBehaviorRegression, sessions: list[SessionInfo], adapt_session: str | None):
    """Dataset session id -> (model session id, first model neuron id). Adds the adapted session when it is new."""
    config = model.config
    mapping = {}
    for info in sessions:
        known = config.session_names is not None and info.name in config.session_names
        if known:
            session_id = config.session_id(info.name)
            start, stop = config.session_neuron_ranges[session_id]
            if stop - start != info.num_neurons:
                raise ValueError(
                    f"Session {info.name!r} has {info.num_neurons} neurons in the dataset but {stop - start} in the "
                    "model; use the dataset the backbone was pretrained on."
                )
            mapping[info.session_id] = (session_id, start)
        elif info.name == adapt_session:
            session_id, neuron_ids = model.add_session(info.name, info.num_neurons)
            logger.warning(
                "session %r is new to the backbone: added as session %d with neurons %d..%d (embeddings start at the "
                "mean of the known ones; only the head's neuron weights train)",
                info.name, session_id, int(neuron_ids[0]), int(neuron_ids[-1]),
            )
            mapping[info.session_id] = (session_id, int(neuron_ids[0]))
        elif config.session_names is None:
            mapping[info.session_id] = (info.session_id, info.neuron_offset)  # ids as in the dataset
        else:
            raise ValueError(
                f"Session {info.name!r} is unknown to the model (sessions {config.session_names}); train on the "
                "sessions the backbone knows, or pass --adapt_session to add and adapt it."
            )
    return mapping


def remap_split(split: datasets.Dataset, sessions: list[SessionInfo], mapping: dict) -> datasets.Dataset:
    offsets = {info.session_id: info.neuron_offset for info in sessions}

    def remap(row):
        model_session, start = mapping[int(row["session_id"])]
        ids = np.asarray(row["neuron_ids"]) - offsets[int(row["session_id"])] + start
        return {"neuron_ids": ids.tolist(), "session_id": model_session}

    return split.map(remap, desc="Mapping neuron ids to the model")


def with_data_identity(model: CalmForBehaviorRegression, corpus: datasets.DatasetDict,
                       sessions: list[SessionInfo]) -> datasets.DatasetDict:
    """A data-identity backbone: every row gets its session's `neuron_identity` `(neurons, features)`, computed from
    the session's training trials (as the backbone was pretrained), and the head's neuron bank grows to cover the
    dataset's neuron ids."""
    from ..forecasting import split_identities

    identities = {session: identity.numpy() for session, identity in split_identities(
        model.config, corpus["train"], {info.session_id: info.num_neurons for info in sessions}).items()}
    needed = max(info.neuron_offset + info.num_neurons for info in sessions)
    if needed > model.config.num_neurons:
        model.resize_neuron_embeddings(needed)

    def add(row):
        return {"neuron_identity": identities[int(row["session_id"])].tolist()}

    return datasets.DatasetDict({name: split.map(add, desc="Neuron identities from the training trials")
                                 for name, split in corpus.items()})


def load_model(model_args: ModelArguments, num_channels: int) -> CalmForBehaviorRegression:
    head_kwargs = {
        name: getattr(model_args, name)
        for name in ("behavior_head", "behavior_rank", "behavior_dropout", "behavior_smoothing_kernel")
        if getattr(model_args, name) is not None
    }
    model = CalmForBehaviorRegression.from_pretrained(
        model_args.model_name_or_path,
        num_behavior_channels=num_channels,
        freeze_backbone=model_args.freeze_backbone,
        **head_kwargs,
    )
    return model


def load_behavior_corpus(data_args: DataArguments) -> tuple:
    """(corpus, sessions) restricted to the sessions asked for; a clear error when a split lacks behaviour."""
    corpus, sessions = load_trial_corpus(data_args.tokenized_dataset)  # a folder or a Hub dataset id
    for name, split in corpus.items():
        missing = {"input_ids", "behavior", "neuron_ids", "session_id"} - set(split.column_names)
        if missing:
            raise ValueError(
                f"{data_args.tokenized_dataset} split {name!r} lacks columns {sorted(missing)}: build it from sessions "
                "with behaviour (`calm prepare`) and tokenize it (`calm tokenize`)."
            )
    wanted = [data_args.adapt_session] if data_args.adapt_session else data_args.sessions
    if wanted:
        unknown = sorted(set(wanted) - {s.name for s in sessions})
        if unknown:
            raise ValueError(f"Sessions {unknown} are not in the dataset (it has {[s.name for s in sessions]}).")
        sessions = [s for s in sessions if s.name in wanted]
        keep = {s.session_id for s in sessions}
        corpus = datasets.DatasetDict({k: v.filter(lambda row: row["session_id"] in keep) for k, v in corpus.items()})
    return corpus, sessions


def run(argv: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Parse `argv` (see the argument dataclasses), train and save the behaviour head, return validation and test
    metrics. `callbacks` (e.g. `calm_hf.callbacks.TimeBudgetCallback`) are added to the trainer's."""
    model_args, data_args, training_args, output = parse_command_args(
        (ModelArguments, DataArguments, TrainingArguments, OutputArguments), argv, prog="calm finetune-behavior",
        recipe="finetune-behavior", trains=True)
    claim_training_output("finetune-behavior", training_args, output,
                          [model_args.model_name_or_path, data_args.tokenized_dataset])
    training_args.remove_unused_columns = False  # the collator needs session_id/neuron_ids/behavior
    training_args.label_names = ["labels"]
    set_seed(training_args.seed)

    corpus, sessions = load_behavior_corpus(data_args)
    num_channels = len(corpus["train"][0]["behavior"])
    model = load_model(model_args, num_channels)
    check_dataset_tokenizer(data_args.tokenized_dataset, getattr(model.config, "tokenizer_fingerprint", None),
                            f"the tokenizer {model_args.model_name_or_path} was pretrained with")
    mapping = session_mapping(model, sessions, data_args.adapt_session)
    corpus = datasets.DatasetDict({name: remap_split(split, sessions, mapping) for name, split in corpus.items()})
    if data_args.adapt_session:
        model_session, start = next(iter(mapping.values()))
        neuron_ids = list(range(start, start + sessions[0].num_neurons))
        model.train_only_session_neurons(neuron_ids)
        # decay would shrink the frozen bank rows (their gradient is zero, decay is not)
        training_args.weight_decay = 0.0
        logger.info("adapting session %r: bank rows %d..%d only", data_args.adapt_session, start, neuron_ids[-1])
    logger.info(
        "head %s, %d channels, trainable parameters: %d",
        model.config.behavior_head, num_channels, sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    columns = ["input_ids", "neuron_ids", "session_id", "behavior"]
    if model.config.neuron_identity == "data":  # who each neuron is, from its session's training trials
        corpus = with_data_identity(model, corpus, sessions)
        columns.append("neuron_identity")
    callbacks = list(callbacks or [])
    if data_args.early_stopping_patience > 0:
        if training_args.eval_strategy == "no":
            logger.warning("--eval_strategy no: nothing to stop early on, every epoch trains and the last head is kept")
        callbacks.append(BestValidationCallback("mse", data_args.early_stopping_patience))
    trainer = CalmTrainer(
        model=model,
        args=training_args,
        train_dataset=corpus["train"].select_columns(columns),
        eval_dataset=corpus["validation"].select_columns(columns),
        data_collator=CalmBehaviorCollator(max_neurons=data_args.max_neurons, seed=training_args.seed),
        compute_metrics=behavior_metrics(sessions[0].behavior_names),
        callbacks=callbacks,
    )
    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    metrics = dict(result.metrics)
    metrics.update(trainer.evaluate())
    metrics.update(trainer.evaluate(corpus["test"].select_columns(columns), metric_key_prefix="test"))
    if trainer.is_world_process_zero():
        trainer.save_model(training_args.output_dir)
        trainer.save_metrics("all", metrics)
    logger.info("test R^2 %.3f, MSE %.3f", metrics["test_r2"], metrics["test_mse"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-finetune-behavior` (and `calm finetune-behavior`): returns the exit code."""
    return run_command("finetune-behavior", lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
