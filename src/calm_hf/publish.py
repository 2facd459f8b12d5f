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
import os
import shutil
import time
import uuid
from pathlib import Path

import torch

from .atomic import OUTPUT_MARKER, fsync_tree, mark_output, partial_path, read_output_marker, switch_folders
from .cards import render_dataset_card, render_model_card, render_tokenizer_card
from .checkpoint import complete_checkpoint
from .figures import FIGURE_NAME
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
        "neuron_identity": getattr(model.config, "neuron_identity", "table"),
        "neuron_attention_block": getattr(model.config, "neuron_attention_block", None),
        "context_token_steps": getattr(model.config, "context_token_steps", None),
    }


def _heldout_rows(heldout: dict) -> list[tuple[str, ...]]:
    """One card row per held-out set and k: CalM against the best baseline fitted on the same trials."""
    from .heldout import best_baseline

    rows = []
    for name, cells in heldout.items():
        for k, models in cells.items():
            calm = models["calm"]
            best, lowest = best_baseline(models), best_baseline(models, "mse")
            rows.append((name, k, f"{calm['pearson_r']:.3f} / {calm['mse']:.3f}",
                         "–" if best is None else f"{best[0]} {best[1]['pearson_r']:.3f}",
                         "–" if lowest is None else f"{lowest[0]} {lowest[1]['mse']:.3f}",
                         f"{calm['coverage_90']:.2f}", f"{calm['crps']:.3f}"))
    return rows


def foundation_limitations(heldout: dict) -> list[str]:
    """Plain statements of the held-out cells where CalM falls short of a baseline fitted on the same trials."""
    from .heldout import best_baseline

    lines = []
    for name, cells in heldout.items():
        for k, models in cells.items():
            calm, best, lowest = models["calm"], best_baseline(models), best_baseline(models, "mse")
            if best is not None and calm["pearson_r"] < best[1]["pearson_r"]:
                lines.append(f"{name}, k = {k}: CalM's forecast r {calm['pearson_r']:.3f} is BELOW {best[0]} "
                             f"({best[1]['pearson_r']:.3f}) fitted on the same trials.")
            if lowest is not None and calm["mse"] > lowest[1]["mse"]:
                lines.append(f"{name}, k = {k}: CalM's MSE {calm['mse']:.3f} is ABOVE {lowest[0]} "
                             f"({lowest[1]['mse']:.3f}).")
            if not 0.85 <= calm["coverage_90"] <= 0.95:
                lines.append(f"{name}, k = {k}: the 5-95% band covers {calm['coverage_90']:.0%} of the truth "
                             "(nominal 90%).")
    return lines


def _write_cards(staging: Path, metrics: dict, heldout: dict, config_summary: dict, run_info: dict) -> None:
    card = render_model_card(
        metrics=metrics,
        config_summary=config_summary,
        training_summary=run_info,
        figure=FIGURE_NAME,
        heldout_rows=_heldout_rows(heldout),
        extra_limitations=foundation_limitations(heldout),
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


def _link_or_copy(source: str, destination: str) -> str:
    """Hard-link a file of the work folder into the release (no second copy of a large corpus), else copy it."""
    try:
        os.link(source, destination)
        return destination
    except OSError:
        return shutil.copy2(source, destination)


def _stage_dataset_folder(manifest: dict, tokenized_dir: Path, staging: Path, run_info: dict,
                          release_id: str) -> None:
    shutil.rmtree(staging, ignore_errors=True)
    shutil.copytree(tokenized_dir, staging, ignore=shutil.ignore_patterns(".calm_stage*", OUTPUT_MARKER),
                    copy_function=_link_or_copy)
    splits: dict[str, int] = {}
    for shard in manifest["shards"]:
        for split, rows in shard["trials"].items():
            splits[split] = splits.get(split, 0) + rows
    real = manifest["spec"].get("real_recordings") or []
    description = (
        f"The pretraining corpus of a CalM foundation model: {manifest['num_sessions']} sessions in "
        f"{len(manifest['shards'])} shards (each a trial DatasetDict with its `calm_sessions.json`; `corpus.json` lists "
        f"them and the parameters every simulated session was drawn with). "
        f"{manifest['spec']['num_simulated_sessions']} simulated sessions drawn from the ranges of "
        "`calm_hf.data.corpus.SIMULATION_RANGES` (connectivity gain and rank, time constants, shared and "
        "stimulus-locked inputs, firing rates, indicator kernels, noise, neuron counts, native frame rates, "
        "trial-structured and continuous)" + (f", plus the training trials of {', '.join(real)}" if real else "")
        + ". Traces are z-scored per neuron at 5 Hz (`input_values`) with their tokenizer codes (`input_ids`). Read it "
        "with `calm_hf.data.streaming.CalmCorpusStream`.")
    note = ("The simulated data are the project's own." + (
        " Real recordings keep their own licences: Park et al. 2024 (MIT), Cascade ground truth (GPL-3.0), Triplett et "
        "al. 2018 (CC BY 4.0); see ../shared/data/README.md." if real else ""))
    render_dataset_card(splits, generation_parameters=run_info.get("corpus", {}), description=description,
                        license_note=note).save(staging / "README.md")
    mark_output(staging, RELEASE_COMMAND, release_id=release_id)
    fsync_tree(staging)


def release_journal(model_dir: str | Path) -> Path:
    """Where `write_release` journals the switch of a release by default: `.<model folder name>-release.json` beside
    it."""
    model_dir = Path(model_dir)
    return model_dir.with_name(f".{model_dir.name}-release.json")


def write_release(pretrain_dir, tokenized_dir, model_dir, dataset_dir, evaluation: dict | None = None,
                  forecast_samples: int = 16, bf16: bool = True,
                  run_info: dict | None = None, device: str | torch.device | None = None,
                  journal: str | Path | None = None) -> dict:
    """Evaluate the pretrained model on held-out recordings and write the model and dataset folders with their cards, both
    switched into place as one (`stage_release`, then `calm_hf.atomic.switch_folders` with `journal`, by default
    `release_journal(model_dir)`; `calm_hf.atomic.finish_switch(journal)` completes a switch a crash interrupted).

    Returns a summary with the metrics written into the card and the release id.
    """
    summary = stage_release(pretrain_dir, tokenized_dir, model_dir, dataset_dir, evaluation=evaluation,
                            forecast_samples=forecast_samples, bf16=bf16, run_info=run_info, device=device)
    staged = summary.pop("staged")
    switch_folders(journal or release_journal(model_dir), staged, release_id=summary["release_id"])
    return summary


def stage_release(pretrain_dir, tokenized_dir, model_dir, dataset_dir, evaluation: dict | None = None,
                  forecast_samples: int = 16, bf16: bool = True, run_info: dict | None = None,
                  device: str | torch.device | None = None, release_id: str | None = None) -> dict:
    """Evaluate the pretrained model on held-out recordings and write the model and dataset folders with their cards
    into `<model_dir>.partial` and `<dataset_dir>.partial`, both marked with the same release id. Nothing is switched.

    Args:
        tokenized_dir: the tokenized corpus the model was pretrained on (the release's dataset).
        evaluation: keyword arguments of `calm_hf.evaluation.evaluate_foundation_release` (`sets`, `sessions`,
            `test_trials`, `max_neurons`, `seed`).
        device: where the evaluation runs (default: CUDA when available, else the CPU); results come back to the host.
        release_id: the id both folders carry (default: a new one).

    Returns a summary with the metrics written into the card, the release id and `staged`, the `(staged, final)`
    folder pairs to give `calm_hf.atomic.switch_folders`.
    """
    from .evaluation import evaluate_foundation_release
    from .figures import heldout_figure
    from .heldout import k_subsets

    release_id = release_id or new_release_id()
    pretrain_dir, tokenized_dir = Path(pretrain_dir), Path(tokenized_dir)
    model_dir, dataset_dir = Path(model_dir), Path(dataset_dir)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = CalmForCausalNeuralModeling.from_pretrained(pretrain_dir).eval().to(device)
    tokenizer = CalmTokenizer.from_pretrained(pretrain_dir / "tokenizer").eval().to(device)
    forecaster = CalmForecaster(model, tokenizer, autocast_dtype=torch.bfloat16 if bf16 else None)
    evaluation = dict(evaluation or {"sets": ["sim_in"]})
    metrics, heldout, sessions = evaluate_foundation_release(forecaster, **evaluation)

    staging = partial_path(model_dir)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging / "tokenizer")
    # tokenizer code at the root, processor, pipeline remote code and custom_pipelines
    complete_checkpoint(staging)
    shown = "sim_paper" if "sim_paper" in sessions else next(iter(sessions))
    session = sessions[shown][0]
    reference = k_subsets(session, evaluation.get("seed", 0), ("16", "all"))
    heldout_figure(forecaster, session, reference.get("16", reference["all"]), staging / FIGURE_NAME,
                   f"{model_dir.name} on a recording it never saw ({shown}: {session.name})")
    manifest = json.loads((tokenized_dir / "corpus.json").read_text())
    run_info = dict(run_info or {})
    run_info.update(corpus_sessions=manifest["num_sessions"], corpus_shards=len(manifest["shards"]),
                    evaluation=evaluation)
    _write_cards(staging, metrics, heldout, _config_summary(model, tokenizer), run_info)
    (staging / "eval_results.json").write_text(json.dumps({**metrics, "heldout": heldout}, indent=2))
    mark_output(staging, RELEASE_COMMAND, release_id=release_id)
    fsync_tree(staging)
    dataset_staging = partial_path(dataset_dir)
    _stage_dataset_folder(manifest, tokenized_dir, dataset_staging, run_info, release_id)
    return {"metrics": metrics, "heldout": heldout, "model_dir": str(model_dir), "dataset_dir": str(dataset_dir),
            "release_id": release_id, "staged": [(staging, model_dir), (dataset_staging, dataset_dir)]}

