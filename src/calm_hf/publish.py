"""Turn a finished pretraining run into a release folder: evaluate, plot, save with remote code, write the cards.

Only orchestration lives here: the numbers come from `calm_hf.evaluation`, the figure from `calm_hf.figures`, the
cards from `calm_hf.cards`. Used by the main job (`calm main`) and usable on its own:

    from calm_hf.publish import write_release
    write_release(pretrain_dir="runs/pretrain", tokenized_dir="runs/tokenized", model_dir="calm-base",
                  dataset_dir="calm-base-dataset")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import torch

from .atomic import fsync_tree, replace_folder
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


def _write_dataset_folder(corpus: datasets.DatasetDict, tokenized_dir: Path, dataset_dir: Path, run_info: dict) -> None:
    staging = dataset_dir.with_name(dataset_dir.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(tokenized_dir, staging, ignore=shutil.ignore_patterns(".calm_stage*"))
    render_dataset_card(corpus, generation_parameters=run_info.get("simulation", {})).save(staging / "README.md")
    fsync_tree(staging)
    replace_folder(staging, dataset_dir)


def write_release(pretrain_dir, tokenized_dir, model_dir, dataset_dir, context_frames: int = 40,
                  eval_trials: int | None = None, forecast_samples: int = 16, bf16: bool = True,
                  run_info: dict | None = None, device: str | torch.device | None = None) -> dict:
    """Evaluate the pretrained model on the test split and write the model and dataset folders with their cards.

    Args:
        device: where the evaluation runs (default: CUDA when available, else the CPU); results come back to the host.

    Returns a summary with the metrics written into the card.
    """
    pretrain_dir, tokenized_dir = Path(pretrain_dir), Path(tokenized_dir)
    model_dir, dataset_dir = Path(model_dir), Path(dataset_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = CalmForCausalNeuralModeling.from_pretrained(pretrain_dir).eval().to(device)
    tokenizer = CalmTokenizer.from_pretrained(pretrain_dir / "tokenizer").eval().to(device)
    corpus = datasets.load_from_disk(str(tokenized_dir))
    forecaster = CalmForecaster(model, tokenizer, autocast_dtype=torch.bfloat16 if bf16 else None)
    test = corpus["test"]
    metrics = evaluate_release(forecaster, corpus, context_frames=context_frames, eval_trials=eval_trials)

    staging = model_dir.with_name(model_dir.name + ".partial")
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
    fsync_tree(staging)
    replace_folder(staging, model_dir)  # the old release stays whole until the new one is complete
    _write_dataset_folder(corpus, tokenized_dir, dataset_dir, run_info)
    return {"metrics": metrics, "model_dir": str(model_dir), "dataset_dir": str(dataset_dir)}
