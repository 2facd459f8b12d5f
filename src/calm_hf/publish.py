"""Turn a finished pretraining run into a release: evaluate, plot, save with remote code, write the cards.

A release is two folders that belong together, the model (with its card, evaluation results and the job's
`run_summary.json`) and the tokenized dataset it was evaluated on. Both are staged completely (`stage_release`) and
then switched as one (`calm_hf.atomic.switch_folders`), so a crash never leaves a new model beside an old dataset;
both carry the same release id in their `.calm_output.json`.

Only orchestration lives here: the numbers come from `calm_hf.evaluation`, the figure from `calm_hf.figures`, the
cards from `calm_hf.cards`. Used by the main job (`calm main`) and usable on its own:

    from calm_hf.publish import write_release
    write_release(pretrain_dir="runs/pretrain", tokenized_dir="runs/tokenized", model_dir="calm-base",
                  dataset_dir="calm-base-dataset")
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import datasets
import torch

from .atomic import OUTPUT_MARKER, fsync_tree, mark_output, partial_path, read_output_marker, switch_folders
from .cards import measured_limitations, render_dataset_card, render_model_card, render_tokenizer_card
from .checkpoint import complete_checkpoint
from .data import load_session_metadata
from .evaluation import SAMPLED_EVAL_SAMPLES, SAMPLED_EVAL_TRIALS, baseline_scores, evaluate_release  # noqa: F401
from .figures import FIGURE_NAME, forecast_figure
from .forecasting import CalmForecaster
from .modeling_calm import CalmForCausalNeuralModeling
from .modeling_calm_tokenizer import CalmTokenizer


def _config_summary(model, tokenizer) -> dict:
    return {
        "hidden_size": model.config.hidden_size,
        "num_hidden_layers": model.config.num_hidden_layers,
        "num_attention_heads": model.config.num_attention_heads,
        "vocab_size": model.config.vocab_size,
        "window_size": model.config.window_size,
        "frame_rate_hz": model.config.frame_rate_hz,
        "num_parameters": model.num_parameters(),
        "tokenizer_hidden_size": tokenizer.config.hidden_size,
        "tokenizer_codebook_size": tokenizer.config.codebook_size,
    }


def _write_cards(staging: Path, metrics: dict, config_summary: dict, run_info: dict) -> None:
    baseline_rows = {
        "population ridge AR, rolled out (per session, lags/alpha on validation)": metrics["ridge_ar_pearson_r"],
        "per-neuron training-trial mean": metrics["train_mean_pearson_r"],
    }
    card = render_model_card(
        metrics={k: v for k, v in metrics.items() if not k.startswith(("ridge_ar", "train_mean"))},
        config_summary=config_summary,
        training_summary={k: v for k, v in run_info.items() if k != "sessions"},
        baselines=baseline_rows,
        figure=FIGURE_NAME,
        extra_limitations=measured_limitations(metrics),
    )
    card.save(staging / "README.md")
    render_tokenizer_card(metrics=metrics, config_summary=config_summary, training_summary=run_info).save(
        staging / "tokenizer" / "README.md"
    )


RELEASE_COMMAND = "main"  # the command named in a release folder's `.calm_output.json`


def new_release_id() -> str:
    """A release id: the UTC time it was made and a random suffix, e.g. `20260101T120000Z-1a2b3c4d`."""
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:8]


def release_id_of(folder: str | Path) -> str | None:
    """The release id a release folder carries (None when it carries none)."""
    return (read_output_marker(folder) or {}).get("release_id")


def _stage_dataset_folder(corpus: datasets.DatasetDict, tokenized_dir: Path, staging: Path, run_info: dict,
                          release_id: str) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(tokenized_dir, staging, ignore=shutil.ignore_patterns(".calm_stage*", OUTPUT_MARKER))
    render_dataset_card(corpus, generation_parameters=run_info.get("simulation", {})).save(staging / "README.md")
    mark_output(staging, RELEASE_COMMAND, release_id=release_id)
    fsync_tree(staging)


def release_journal(model_dir: str | Path) -> Path:
    """Where `write_release` journals the switch of a release by default: `.<model folder name>-release.json` beside
    it."""
    model_dir = Path(model_dir)
    return model_dir.with_name(f".{model_dir.name}-release.json")


def write_release(pretrain_dir, tokenized_dir, model_dir, dataset_dir, context_frames: int = 40,
                  eval_trials: int | None = None, forecast_samples: int = 16, bf16: bool = True,
                  run_info: dict | None = None, device: str | torch.device | None = None,
                  journal: str | Path | None = None) -> dict:
    """Evaluate the pretrained model on the test split and write the model and dataset folders with their cards, both
    switched into place as one (`stage_release`, then `calm_hf.atomic.switch_folders` with `journal`, by default
    `release_journal(model_dir)`; `calm_hf.atomic.finish_switch(journal)` completes a switch a crash interrupted).

    Returns a summary with the metrics written into the card and the release id.
    """
    summary = stage_release(pretrain_dir, tokenized_dir, model_dir, dataset_dir, context_frames=context_frames,
                            eval_trials=eval_trials, forecast_samples=forecast_samples, bf16=bf16, run_info=run_info,
                            device=device)
    staged = summary.pop("staged")
    switch_folders(journal or release_journal(model_dir), staged, release_id=summary["release_id"])
    return summary


def stage_release(pretrain_dir, tokenized_dir, model_dir, dataset_dir, context_frames: int = 40,
                  eval_trials: int | None = None, forecast_samples: int = 16, bf16: bool = True,
                  run_info: dict | None = None, device: str | torch.device | None = None,
                  release_id: str | None = None) -> dict:
    """Evaluate the pretrained model on the test split and write the model and dataset folders with their cards into
    `<model_dir>.partial` and `<dataset_dir>.partial`, both marked with the same release id. Nothing is switched.

    Args:
        device: where the evaluation runs (default: CUDA when available, else the CPU); results come back to the host.
        release_id: the id both folders carry (default: a new one).

    Returns a summary with the metrics written into the card, the release id and `staged`, the `(staged, final)`
    folder pairs to give `calm_hf.atomic.switch_folders`.
    """
    release_id = release_id or new_release_id()
    pretrain_dir, tokenized_dir = Path(pretrain_dir), Path(tokenized_dir)
    model_dir, dataset_dir = Path(model_dir), Path(dataset_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = CalmForCausalNeuralModeling.from_pretrained(pretrain_dir).eval().to(device)
    tokenizer = CalmTokenizer.from_pretrained(pretrain_dir / "tokenizer").eval().to(device)
    corpus = datasets.load_from_disk(str(tokenized_dir))
    forecaster = CalmForecaster(model, tokenizer, autocast_dtype=torch.bfloat16 if bf16 else None)
    test = corpus["test"]
    metrics = evaluate_release(forecaster, corpus, context_frames=context_frames, eval_trials=eval_trials)

    staging = partial_path(model_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging / "tokenizer")
    # tokenizer code at the root, processor, pipeline remote code and custom_pipelines
    complete_checkpoint(staging)
    forecast_figure(forecaster, test, staging / FIGURE_NAME, context_frames, forecast_samples,
                    float(model.config.frame_rate_hz))
    run_info = dict(run_info or {})
    run_info.update(
        num_test_trials=len(test) if eval_trials is None else min(eval_trials, len(test)),
        context_frames=context_frames,
        horizon_frames=int(len(test[0]["input_values"][0]) - context_frames),
        sessions=[{"name": s.name, "session_id": s.session_id, "num_neurons": s.num_neurons,
                   "neuron_ids": [s.neuron_offset, s.neuron_offset + s.num_neurons]}
                  for s in load_session_metadata(str(tokenized_dir))],
    )
    _write_cards(staging, metrics, _config_summary(model, tokenizer), run_info)
    (staging / "eval_results.json").write_text(json.dumps(metrics, indent=2))
    mark_output(staging, RELEASE_COMMAND, release_id=release_id)
    fsync_tree(staging)
    dataset_staging = partial_path(dataset_dir)
    _stage_dataset_folder(corpus, tokenized_dir, dataset_staging, run_info, release_id)
    return {"metrics": metrics, "model_dir": str(model_dir), "dataset_dir": str(dataset_dir), "release_id": release_id,
            "staged": [(staging, model_dir), (dataset_staging, dataset_dir)]}
