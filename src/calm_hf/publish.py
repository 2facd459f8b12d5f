"""Turn a finished pretraining run into a release folder: evaluate, plot, save with remote code, write the cards.

Used by the main job (`calm main`) and usable on its own:

    from calm_hf.publish import write_release
    write_release(pretrain_dir="runs/pretrain", tokenized_dir="runs/tokenized", model_dir="calm-base",
                  dataset_dir="calm-base-dataset")
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import torch

from .atomic import fsync_tree, replace_folder
from .baselines.forecasting import MeanForecaster, RidgeARForecaster
from .cards import render_dataset_card, render_model_card, render_tokenizer_card
from .checkpoint import complete_checkpoint
from .data import load_session_metadata
from .forecasting import CalmForecaster, evaluate_forecasting, trial_swap_probe
from .metrics.functional import forecast_pearson_r, mse
from .modeling_calm import CalmForCausalNeuralModeling
from .modeling_calm_tokenizer import CalmTokenizer

FIGURE_NAME = "forecast_example.png"
SAMPLED_EVAL_TRIALS = 36
SAMPLED_EVAL_SAMPLES = 4


def _split_arrays(split: datasets.Dataset, max_trials: int | None = None):
    rows = split if max_trials is None else split.select(range(min(max_trials, len(split))))
    rows = rows.with_format("numpy", columns=["input_values", "session_id"])
    return np.stack(list(rows["input_values"])).astype(np.float32), np.asarray(rows["session_id"])


def baseline_scores(corpus: datasets.DatasetDict, context_frames: int, max_trials: int | None) -> dict:
    """Per-session ridge autoregression and training-mean forecasts on the same test trials as CalM."""
    train_x, train_s = _split_arrays(corpus["train"])
    val_x, val_s = _split_arrays(corpus["validation"])
    test_x, test_s = _split_arrays(corpus["test"], max_trials)
    scores = {}
    for name, factory in (("ridge_ar", lambda: RidgeARForecaster(context=context_frames)),
                          ("train_mean", lambda: MeanForecaster(context=context_frames))):
        preds = np.zeros_like(test_x[..., context_frames:])
        for session in np.unique(test_s):
            model = factory()
            model.fit(train_x[train_s == session], val_x[val_s == session])
            mask = test_s == session
            preds[mask] = model.predict(test_x[mask][..., :context_frames], test_x.shape[-1] - context_frames)
        truth = test_x[..., context_frames:]
        scores[name] = {
            "pearson_r": float(forecast_pearson_r(preds, truth, session_ids=test_s)["pearson_r"]),
            "mse": float(mse(preds, truth)),
        }
    return scores


def forecast_figure(forecaster: CalmForecaster, split: datasets.Dataset, path: Path, context_frames: int,
                    num_samples: int, frame_rate: float, num_neurons: int = 4, seed: int = 0) -> None:
    """PNG: context, truth and forecast (the continuous head's conditional mean, or the mean of sampled rollouts for
    checkpoints without it, with a 5-95% band of sampled futures) and a greedy rollout, for a few neurons."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    row = split.with_format("numpy")[0]
    values = np.asarray(row["input_values"], dtype=np.float32)
    ids = torch.as_tensor(np.asarray(row["input_ids"], dtype=np.int64))[None, :, : context_frames // forecaster.window_size]
    horizon = values.shape[-1] - context_frames
    torch.manual_seed(seed)
    mode = "direct" if forecaster.model.value_head is not None else ("mean" if num_samples > 1 else "greedy")
    result = forecaster.forecast(
        values[None, :, :context_frames], horizon=horizon, context_ids=ids,
        neuron_ids=torch.as_tensor(np.asarray(row["neuron_ids"], dtype=np.int64))[None],
        session_ids=torch.as_tensor([int(row["session_id"])]), mode=mode, num_samples=num_samples,
    )
    greedy = forecaster.forecast(
        None, horizon=horizon, context_ids=ids,
        neuron_ids=torch.as_tensor(np.asarray(row["neuron_ids"], dtype=np.int64))[None],
        session_ids=torch.as_tensor([int(row["session_id"])]), mode="greedy",
    ).forecast[0]
    # the most active neurons of this trial make the clearest panels
    chosen = np.argsort(values.std(axis=-1))[::-1][:num_neurons]
    time = np.arange(values.shape[-1]) / frame_rate
    future = time[context_frames:]
    fig, axes = plt.subplots(len(chosen), 1, figsize=(8, 1.9 * len(chosen)), sharex=True)
    for ax, neuron in zip(np.atleast_1d(axes), chosen):
        ax.plot(time[: context_frames + 1], values[neuron, : context_frames + 1], color="black", lw=1.2, label="context")
        ax.plot(future, values[neuron, context_frames:], color="0.55", lw=1.2, label="truth")
        if result.samples is not None:
            low, high = np.quantile(result.samples[0, :, neuron], [0.05, 0.95], axis=0)
            ax.fill_between(future, low, high, color="tab:red", alpha=0.2, lw=0, label="5-95% of samples")
        point_label = "CalM forecast (conditional mean)" if mode == "direct" else "sample mean"
        ax.plot(future, result.forecast[0, neuron], color="tab:red", lw=1.2, label=point_label)
        ax.plot(future, greedy[neuron], color="tab:blue", lw=1.0, ls="--", label="greedy")
        ax.axvline(time[context_frames], color="0.3", lw=0.6, ls=":")
        ax.set_ylabel(f"neuron {neuron}\n(z)")
    np.atleast_1d(axes)[0].legend(loc="upper left", fontsize=7, ncol=5, frameon=False)
    np.atleast_1d(axes)[-1].set_xlabel("time (s)")
    fig.suptitle(f"CalM forecast, held-out trial (context {context_frames} frames)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def measured_limitations(metrics: dict) -> list[str]:
    """Plain statements of where this run's model falls short of the baselines measured with it."""
    best_calm = max(v for k, v in metrics.items() if k.startswith("forecast_pearson_r"))
    lines = []
    if best_calm < metrics["ridge_ar_pearson_r"]:
        lines.append(
            f"In this run the model forecasts WORSE than a population ridge autoregression fitted per session "
            f"(best CalM Pearson r {best_calm:.3f} vs ridge AR {metrics['ridge_ar_pearson_r']:.3f} on the same test "
            "trials): for forecasting alone, the linear model is the better tool at this training budget."
        )
    greedy = metrics.get("forecast_pearson_r_greedy")
    if greedy is not None and greedy < best_calm - 0.05:
        lines.append(
            f"Greedy (argmax) rollouts drift to typical codes (r {greedy:.3f}); average several sampled rollouts "
            "(`num_samples` in the pipeline) instead."
        )
    return lines


def write_release(pretrain_dir, tokenized_dir, model_dir, dataset_dir, context_frames: int = 40,
                  eval_trials: int | None = None, forecast_samples: int = 16, bf16: bool = True,
                  run_info: dict | None = None) -> dict:
    """Evaluate the pretrained model on the test split and write the model and dataset folders with their cards.

    Returns a summary with the metrics written into the card.
    """
    pretrain_dir, tokenized_dir = Path(pretrain_dir), Path(tokenized_dir)
    model_dir, dataset_dir = Path(model_dir), Path(dataset_dir)
    model = CalmForCausalNeuralModeling.from_pretrained(pretrain_dir).eval()
    tokenizer = CalmTokenizer.from_pretrained(pretrain_dir / "tokenizer").eval()
    corpus = datasets.load_from_disk(str(tokenized_dir))
    forecaster = CalmForecaster(model, tokenizer, autocast_dtype=torch.bfloat16 if bf16 else None)
    test = corpus["test"]

    torch.manual_seed(0)
    direct = None
    if model.value_head is not None:  # the default forecast: the continuous head's conditional mean
        direct = evaluate_forecasting(forecaster, test, context_frames=context_frames, max_trials=eval_trials,
                                      mode="direct")
    greedy = evaluate_forecasting(forecaster, test, context_frames=context_frames, max_trials=eval_trials,
                                  mode="greedy")
    # Sampled rollouts cost num_samples greedy ones: the sample mean is scored on the first test trials only.
    sample_trials = min(len(test), eval_trials or SAMPLED_EVAL_TRIALS)
    sampled = evaluate_forecasting(forecaster, test, context_frames=context_frames, max_trials=sample_trials,
                                   mode="mean", num_samples=SAMPLED_EVAL_SAMPLES)
    baselines = baseline_scores(corpus, context_frames, eval_trials)
    metrics = {
        **({"forecast_pearson_r_direct": direct["pearson_r"], "forecast_mse_direct": direct["mse"]} if direct else {}),
        "forecast_pearson_r_greedy": greedy["pearson_r"],
        "forecast_mse_greedy": greedy["mse"],
        f"forecast_pearson_r_sample_mean_{SAMPLED_EVAL_SAMPLES}x_first_{sample_trials}_trials": sampled["pearson_r"],
        f"forecast_mse_sample_mean_{SAMPLED_EVAL_SAMPLES}x_first_{sample_trials}_trials": sampled["mse"],
        "ridge_ar_pearson_r": baselines["ridge_ar"]["pearson_r"],
        "ridge_ar_mse": baselines["ridge_ar"]["mse"],
        "train_mean_pearson_r": baselines["train_mean"]["pearson_r"],
        "train_mean_mse": baselines["train_mean"]["mse"],
    }
    num_test = len(test) if eval_trials is None else min(eval_trials, len(test))
    # Tokenizer reconstruction on the same test trials: decode(encode(x)) vs x.
    values, _ = _split_arrays(test, eval_trials)
    with torch.no_grad():
        ids = np.stack(list(test.select(range(num_test)).with_format("numpy", columns=["input_ids"])["input_ids"]))
        recon = forecaster.decode(torch.as_tensor(ids.astype(np.int64))).numpy()
    metrics["tokenizer_reconstruction_pearson_r"] = float(
        forecast_pearson_r(recon, values[..., : recon.shape[-1]])["pearson_r"]
    )
    # error by position: a tokenizer used beyond its training length reconstructs the ends of a trial worse
    window = model.config.window_size
    per_window = ((recon - values[..., : recon.shape[-1]]) ** 2).reshape(*recon.shape[:2], -1, window).mean(axis=(0, 1, 3))
    metrics["tokenizer_reconstruction_mse_first_window"] = float(per_window[0])
    metrics["tokenizer_reconstruction_mse_middle_windows"] = float(per_window[1:-1].mean()) if len(per_window) > 2 else float(per_window.mean())
    metrics["tokenizer_reconstruction_mse_last_window"] = float(per_window[-1])
    # population use: the same trials with every other neuron's tokens taken from another trial of the session
    probe = trial_swap_probe(model, test, context_frames=context_frames, max_trials=60)
    metrics.update({f"trial_swap_{key}": value for key, value in probe.items() if key != "trials"})

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
        num_test_trials=num_test,
        context_frames=context_frames,
        horizon_frames=int(len(test[0]["input_values"][0]) - context_frames),
        sessions=[{"name": s.name, "session_id": s.session_id, "num_neurons": s.num_neurons,
                   "neuron_ids": [s.neuron_offset, s.neuron_offset + s.num_neurons]}
                  for s in load_session_metadata(str(tokenized_dir))],
    )
    config_summary = {
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
    (staging / "eval_results.json").write_text(json.dumps(metrics, indent=2))
    fsync_tree(staging)
    replace_folder(staging, model_dir)  # the old release stays whole until the new one is complete

    dataset_staging = dataset_dir.with_name(dataset_dir.name + ".partial")
    shutil.rmtree(dataset_staging, ignore_errors=True)
    shutil.copytree(tokenized_dir, dataset_staging, ignore=shutil.ignore_patterns(".calm_stage*"))
    render_dataset_card(corpus, generation_parameters=run_info.get("simulation", {})).save(dataset_staging / "README.md")
    fsync_tree(dataset_staging)
    replace_folder(dataset_staging, dataset_dir)
    return {"metrics": metrics, "model_dir": str(model_dir), "dataset_dir": str(dataset_dir)}
