"""`calm adapt`: fit a pretrained CalM to one recording.

    calm adapt --model_path calm-base --tokenized_dataset runs/zf-tokenized --output_dir runs/calm-zf

A data-identity model (every preset's default; calm-base) already reads a new recording's neurons from its data, so
adapting is optional: it fine-tunes the whole model on the recording's training trials (`calm_hf.adaptation.adapt`;
each trial's neurons get their identity from the other training trials) and keeps the weights with the best forecast
Pearson r on the recording's validation trials, stopping after `--adapt_patience` evaluations without a gain or at the
time budget. It then fits the recording's population readout (`calm_hf.population_readout`: a ridge AR across its
neurons and a per-neuron AR, mixed with the network by weights chosen on validation, keeping the network's course
at the mix's level where that forecasts the validation trials better) and saves it with the checkpoint; the pipeline and
`calm forecast` apply it to recordings of the same neurons. The defaults are the recipe `benchmarks/foundation.py`
measures as `calm_readout` (`--population_readout false`: `calm_adapted`).

A table-identity model learns only a new session's session and neuron embeddings (`--session_name` required). The
tokenized dataset must hold one session (neuron ids 0..N-1 of its own); the model grows its session and neuron
tables (new rows start at the mean of the existing rows), every other weight stays bit-identical, and the adapted
checkpoint is saved with the new session's name so `pipeline(..., session="mouse7")` finds it.

`--backbone_learning_rate 3e-4` also fine-tunes the rest of the model (never the other sessions' rows); it is off by
default because it measured no better than the rows alone on a held-out simulated session (`benchmarks/README.md`).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

import datasets
import numpy as np
import torch
from transformers import TrainingArguments, set_seed

from ..adaptation import AdaptationSettings, adapt, fit_population_readout
from ..checkpoint import complete_checkpoint
from ..configuration_calm import CalmConfig
from ..data import CalmDataCollator, CollatorEpochCallback, load_trial_corpus
from ..evaluation import split_arrays
from ..identity_init import init_identity_from_dataset
from ..forecasting import CalmForecaster, check_tokenizer_matches_model, evaluate_forecasting
from ..modeling_calm import CalmForCausalNeuralModeling
from ..modeling_calm_tokenizer import CalmTokenizer
from ..trainer import CalmTrainer
from .tokenize import check_dataset_tokenizer
from . import OutputArguments, claim_training_output, parse_command_args, run_command

logger = logging.getLogger("calm_hf.adapt_session")


@dataclass
class AdaptArguments:
    model_path: str = field(metadata={"help": "Pretrained CalmForCausalNeuralModeling folder (e.g. calm-base)."})
    tokenized_dataset: str = field(metadata={"help": "Tokenized DatasetDict of the new session."})
    session_name: str | None = field(default=None, metadata={"help": "Table-identity models: the name recorded for "
                                                                      "the new session (a data-identity model needs "
                                                                      "none)."})
    tokenizer_path: str | None = field(default=None, metadata={"help": "Default: <model_path>/tokenizer."})
    max_neurons: int | None = field(default=64, metadata={"help": "Neurons per training example."})
    context_frames: int | None = field(default=None, metadata={
        "help": "Forecast context (frames) for validation and the final test score. Default: 40 frames, or half the "
                "trial (a whole number of token windows) when trials are shorter than 80 frames."})
    backbone_learning_rate: float = field(
        default=0.0,
        metadata={"help": "0 (default): every pretrained weight stays bit-identical and only the new session's rows "
                          "learn. > 0: the rest of the model (not the other sessions' rows) is fine-tuned too, at this "
                          "learning rate, while the new rows keep --learning_rate."},
    )
    identity_init: str = field(
        default="random",
        metadata={"help": "New neuron rows: 'random' keeps the plain init; 'coupling' writes the session's measured "
                          "one-step coupling in the layout the mixer was initialised with (calm_hf.identity_init); "
                          "not the default, as it measured no better (benchmarks/README.md)."},
    )
    # data-identity models: the fine-tuning recipe (calm_hf.adaptation.AdaptationSettings)
    adapt_learning_rate: float = field(default=AdaptationSettings.learning_rate,
                                       metadata={"help": "Data-identity models: AdamW learning rate of the fine-tuning."})
    adapt_max_steps: int = field(default=AdaptationSettings.max_steps,
                                 metadata={"help": "Data-identity models: optimizer steps at most."})
    adapt_max_minutes: float = field(default=AdaptationSettings.max_seconds / 60,
                                     metadata={"help": "Data-identity models: wall-clock budget of the fine-tuning."})
    adapt_batch_size: int = field(default=AdaptationSettings.batch_size,
                                  metadata={"help": "Data-identity models: trials per fine-tuning step."})
    adapt_eval_every: int = field(default=AdaptationSettings.eval_every,
                                  metadata={"help": "Data-identity models: steps between validation forecasts."})
    adapt_patience: int = field(default=AdaptationSettings.patience,
                                metadata={"help": "Data-identity models: validation forecasts without a better r "
                                                  "before stopping (the best weights are kept)."})
    adapt_choose_identity: bool = field(
        default=AdaptationSettings.choose_identity,
        metadata={"help": "Data-identity models: before fine-tuning, read the whole identity, the identity without its "
                          "coupling factors, or the zero-shot identity, whichever forecasts the validation trials best, "
                          "a lesser one only beyond the noise of the trials (calm_hf.adaptation.choose_identity); the "
                          "choice is saved in the checkpoint's config "
                          "(identity_coupling, identity_reference)."})
    population_readout: bool = field(
        default=True,
        metadata={"help": "Data-identity models: after fine-tuning, fit the recording's population readout (a ridge AR "
                          "across its neurons and a per-neuron AR, mixed with the network by weights chosen on the "
                          "validation trials; "
                          "calm_hf.population_readout) and save it with the checkpoint, where the pipeline and calm "
                          "forecast apply it. It is what benchmarks/foundation.py measures as calm_readout."},
    )


def remap_to_session(split: datasets.Dataset, session_id: int, neuron_ids: np.ndarray) -> datasets.Dataset:
    """Point a one-session split at the model's new table rows."""
    local = split.unique("session_id")
    if len(local) != 1:
        raise ValueError(
            f"the tokenized dataset holds sessions {local}; adapt one session at a time (filter it with "
            "dataset.filter(lambda r: r['session_id'] == k))."
        )

    def remap(row):
        ids = np.asarray(row["neuron_ids"])
        ids = ids - ids.min()
        if ids.max() >= len(neuron_ids):
            raise ValueError(f"row has neuron ids up to {ids.max()} but the new session has {len(neuron_ids)} neurons.")
        return {"neuron_ids": neuron_ids[ids].tolist(), "session_id": session_id}

    return split.map(remap)


def load_and_extend(args: AdaptArguments) -> tuple:
    """(model, tokenizer, corpus, session_id, neuron_ids): the pretrained model grown by the new session (backbone
    frozen) and the new session's trials pointed at its new table rows."""
    model = CalmForCausalNeuralModeling.from_pretrained(args.model_path)
    if model.config.neuron_identity != "table":
        raise ValueError("load_and_extend grows the tables of a table-identity model; this one reads identities from "
                         "data (calm_hf.adaptation.adapt fine-tunes it).")
    tokenizer = CalmTokenizer.from_pretrained(args.tokenizer_path or os.path.join(args.model_path, "tokenizer"))
    check_tokenizer_matches_model(model, tokenizer)
    check_dataset_tokenizer(args.tokenized_dataset, tokenizer.fingerprint(),
                            args.tokenizer_path or os.path.join(args.model_path, "tokenizer"))
    corpus, _ = load_trial_corpus(args.tokenized_dataset)  # a folder or a Hub dataset id
    num_neurons = len(corpus["train"][0]["neuron_ids"])
    session_id, neuron_ids = model.add_session(args.session_name, num_neurons)
    neuron_ids = np.asarray(neuron_ids)
    model.freeze_backbone_except_embeddings(session_ids=[session_id], neuron_ids=neuron_ids.tolist())
    corpus = datasets.DatasetDict({name: remap_to_session(split, session_id, neuron_ids) for name, split in corpus.items()})
    if args.identity_init not in ("coupling", "random"):
        raise ValueError(f"--identity_init must be 'coupling' or 'random', got {args.identity_init!r}.")
    if args.identity_init == "coupling" and model.config.neuron_mixer_rank > 0:
        init_identity_from_dataset(model, corpus["train"], align_mixer=False)  # the trained mixer stays as it is
    logger.info(
        "adapting session %r (id %d, neurons %d..%d); trainable parameters: %d",
        args.session_name, session_id, neuron_ids[0], neuron_ids[-1],
        sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    return model, tokenizer, corpus, session_id, neuron_ids


def adaptation_optimizer(model: CalmForCausalNeuralModeling, learning_rate: float,
                         backbone_learning_rate: float) -> torch.optim.Optimizer | None:
    """None when only the new rows train (the trainer builds its own optimizer). Otherwise unfreezes every weight but
    the shared id tables (whose other sessions' rows must not move) and returns AdamW with two groups: the new rows at
    `learning_rate`, the rest at `backbone_learning_rate`."""
    if backbone_learning_rate < 0:
        raise ValueError(f"--backbone_learning_rate must be >= 0, got {backbone_learning_rate}.")
    if backbone_learning_rate == 0:
        return None
    rows, rest = [], []
    for name, param in model.named_parameters():
        if name.endswith("trainable_rows"):
            rows.append(param)
        elif not name.endswith(("neuron_embeddings.weight", "session_embeddings.weight")):
            param.requires_grad_(True)
            rest.append(param)
    logger.info("fine-tuning %d backbone and head parameters at lr %g", sum(p.numel() for p in rest),
                backbone_learning_rate)
    return torch.optim.AdamW([{"params": rows, "lr": learning_rate},
                              {"params": rest, "lr": backbone_learning_rate}], weight_decay=0.0)


def default_context_frames(context_frames: int | None, trial_frames: int, window_size: int) -> int:
    """`--context_frames`, or its default for `trial_frames`-long trials: 40 frames, or half the trial (whole token
    windows, at least one) when that leaves less than half of it to forecast."""
    if context_frames is not None:
        return context_frames
    half = max(window_size, (trial_frames // 2) // window_size * window_size)
    return min(40, half)


def adapt_data_identity(args: AdaptArguments, training_args: TrainingArguments, model, tokenizer) -> dict:
    """`calm adapt` of a data-identity model: fine-tune on the recording's training trials, stopped on its validation
    trials, score its test trials (identity from every training trial), save the adapted checkpoint."""
    from ..metrics.functional import forecast_pearson_r, mse

    corpus, _ = load_trial_corpus(args.tokenized_dataset)
    sessions = corpus["train"].unique("session_id")
    if len(sessions) != 1:
        raise ValueError(f"the tokenized dataset holds sessions {sessions}; adapt to one recording at a time (filter it "
                         "with dataset.filter(lambda r: r['session_id'] == k)).")
    train, val, test = (split_arrays(corpus[name])[0] for name in ("train", "validation", "test"))
    args.context_frames = default_context_frames(args.context_frames, test.shape[-1], model.config.window_size)
    if args.context_frames >= test.shape[-1]:
        raise ValueError(f"--context_frames {args.context_frames} leaves nothing to forecast in {test.shape[-1]}-frame "
                         "trials: lower it.")
    settings = AdaptationSettings(learning_rate=args.adapt_learning_rate, max_steps=args.adapt_max_steps,
                                  max_seconds=args.adapt_max_minutes * 60, batch_size=args.adapt_batch_size,
                                  max_neurons=args.max_neurons or train.shape[1], eval_every=args.adapt_eval_every,
                                  patience=args.adapt_patience, seed=training_args.seed,
                                  choose_identity=args.adapt_choose_identity)
    forecaster = CalmForecaster(model, tokenizer)
    adapted, info = adapt(forecaster, train, val, args.context_frames, settings)
    context, truth = test[:, :, : args.context_frames], test[:, :, args.context_frames:]
    network = adapted.forecast(context, horizon=truth.shape[-1], reference=train).forecast
    metrics = {"test_forecast_pearson_r": float(forecast_pearson_r(network, truth)["pearson_r"]),
               "test_forecast_mse": float(mse(network, truth)),
               "best_validation_pearson_r": info["best_validation_pearson_r"], "steps": info["steps"],
               "best_step": info["best_step"]}
    if args.population_readout:
        adapted.population_readout = fit_population_readout(adapted, train, val, args.context_frames)
        info["population_readout"] = adapted.population_readout.info
        blended = adapted.forecast(context, horizon=truth.shape[-1], reference=train).forecast
        metrics.update(test_forecast_pearson_r_network=metrics["test_forecast_pearson_r"],
                       test_forecast_mse_network=metrics["test_forecast_mse"],
                       test_forecast_pearson_r=float(forecast_pearson_r(blended, truth)["pearson_r"]),
                       test_forecast_mse=float(mse(blended, truth)))
    adapted.model.save_pretrained(training_args.output_dir)
    if adapted.population_readout is not None:
        adapted.population_readout.save(training_args.output_dir)
    tokenizer.save_pretrained(os.path.join(training_args.output_dir, "tokenizer"))
    complete_checkpoint(training_args.output_dir)
    with open(os.path.join(training_args.output_dir, "adaptation.json"), "w") as handle:
        json.dump({"metrics": metrics, "adaptation": info}, handle, indent=2)
    logger.info("adapted in %d steps (best at %d): test forecast r = %.3f, MSE = %.3f", info["steps"],
                info["best_step"], metrics["test_forecast_pearson_r"], metrics["test_forecast_mse"])
    return metrics


def run(argv: list[str] | None = None, callbacks: list | None = None) -> dict:
    """Parse `argv` (see `AdaptArguments`), adapt and save the model, return the test forecast metrics.
    `callbacks` (e.g. `calm_hf.callbacks.TimeBudgetCallback`) are added to the trainer's (table models)."""
    args, training_args, output = parse_command_args((AdaptArguments, TrainingArguments, OutputArguments), argv,
                                                     prog="calm adapt", trains=True)
    claim_training_output("adapt", training_args, output,
                          [args.model_path, args.tokenized_dataset, args.tokenizer_path])
    set_seed(training_args.seed)
    if CalmConfig.from_pretrained(args.model_path).neuron_identity == "data":
        model = CalmForCausalNeuralModeling.from_pretrained(args.model_path)
        tokenizer = CalmTokenizer.from_pretrained(args.tokenizer_path or os.path.join(args.model_path, "tokenizer"))
        check_tokenizer_matches_model(model, tokenizer)
        check_dataset_tokenizer(args.tokenized_dataset, tokenizer.fingerprint(),
                                args.tokenizer_path or os.path.join(args.model_path, "tokenizer"))
        return adapt_data_identity(args, training_args, model, tokenizer)
    if args.session_name is None:
        raise ValueError("this model learns a table row per session: pass --session_name NAME for the new session.")
    training_args.remove_unused_columns = False
    # Weight decay would shrink frozen rows of the shared tables; only the new rows may move.
    training_args.weight_decay = 0.0
    model, tokenizer, corpus, _, _ = load_and_extend(args)
    optimizer = adaptation_optimizer(model, training_args.learning_rate, args.backbone_learning_rate)
    columns = ["input_ids", "neuron_ids", "session_id"]
    with_values = model.config.value_head_steps > 0
    if with_values:  # the new session's embeddings also learn from the continuous forecast head's MSE
        columns.append("input_values")
    collator = CalmDataCollator(max_neurons=args.max_neurons, seed=training_args.seed, with_values=with_values)
    trainer = CalmTrainer(
        model=model,
        args=training_args,
        train_dataset=corpus["train"].select_columns(columns),
        eval_dataset=corpus["validation"].select_columns(columns),
        data_collator=collator,
        callbacks=[CollatorEpochCallback(collator), *(callbacks or [])],
        neural_tokenizer=tokenizer,
        optimizers=(optimizer, None),
    )
    trainer.train()
    forecaster = CalmForecaster(model, tokenizer, autocast_dtype=torch.bfloat16 if training_args.bf16 else None)
    frames = len(corpus["test"][0]["input_values"][0]) if len(corpus["test"]) else 2 * 40
    context = default_context_frames(args.context_frames, frames, model.config.window_size)
    metrics = evaluate_forecasting(forecaster, corpus["test"], context_frames=context)
    metrics = {f"test_forecast_{k}": v for k, v in metrics.items()}
    if trainer.is_world_process_zero():
        trainer.save_model(training_args.output_dir)
        tokenizer.save_pretrained(os.path.join(training_args.output_dir, "tokenizer"))
        trainer.save_metrics("test", {k: v for k, v in metrics.items() if isinstance(v, float)})
    logger.info("held-out session forecast r = %.3f", metrics["test_forecast_pearson_r"])
    return metrics


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-adapt` (and `calm adapt`): returns the exit code."""
    return run_command("adapt", lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
