#!/usr/bin/env python
"""Interpretability benchmark: the paper's linear analyses (§5.4, Fig. 5, App. E) on three datasets with known answers.

    python benchmarks/analysis.py                          # prepare + train + analyze all three datasets
    python benchmarks/analysis.py --stages analyze         # re-analyse existing models (e.g. a newer checkpoint)
    python benchmarks/analysis.py --datasets sim --size tiny --work /tmp/a --out /tmp/a/results   # smoke run

Datasets (each gets its own small CalM, trained with the repository's training scripts, and a `labels.json`):

- `sim`: the simulator with its two-condition task (`task_fraction=0.4`): which neurons the task input drives, and
  with which condition, is KNOWN (`task_group` neuron label); the per-trial `condition` gives d'-tuned groups.
- `park`: Park et al. 2024 mouse V1, 5 mice x 128 trials of drifting gratings at 16 Hz (model rate 16 Hz, 48 frames,
  so the 1 s pre-stimulus baseline + 2 s response fit 12 tokens). Trial labels `direction` (8) and `orientation` (4);
  the response window is the 2 s after stimulus onset. Neuron label: the mouse each neuron comes from.
- `zebrafish`: Triplett et al. 2018 tectum, spontaneous, one fish, cut into 32-frame trials at 2.2 Hz. Neuron label
  `assembly`: the authors' detected assembly (neurons in several assemblies or none are left unlabelled).

Every analysis is run on the trained model AND on an untrained model of the same config (the control for
"structure comes from training, not from the data pipeline"), and every probe/LDA number has a shuffled-label
control beside it (`calm analyze` does this). Results: `benchmarks/results/analysis_<dataset>/` (report.md,
report.json, figures) and `benchmarks/results/analysis.md`, a summary across datasets.

Training runs the package's commands (`python -m calm_hf.commands.<stage>`) as subprocesses, one thread each (they
pin themselves with `calm_hf.hardware`); the sizes are chosen to fit a few minutes per dataset on one CPU core.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Per dataset: model rate, forecast context (frames), response window for d' (frames at the model rate),
# pretraining epochs relative to the size's (the real datasets are much smaller than the simulation). "tiny" is the
# smoke size used by the tests.
DATASETS = {
    "sim": dict(fs=5.0, context_frames=40, response_window=(20, 50), tokenizer_segment_frames=48, epoch_scale=1),
    "park": dict(fs=16.0, context_frames=24, response_window=(16, 48), tokenizer_segment_frames=48, epoch_scale=3),
    "zebrafish": dict(fs=2.2, context_frames=16, response_window=None, tokenizer_segment_frames=32, epoch_scale=5),
}
SIZES = {
    "cpu": dict(sim_sessions=3, sim_neurons=100, sim_trials=240, tokenizer_preset="cpu", tokenizer_segments=20_000,
                tokenizer_epochs=1.0, model_preset="cpu", pretrain_epochs=2.0, max_neurons=64, batch=8),
    "tiny": dict(sim_sessions=2, sim_neurons=16, sim_trials=24, tokenizer_preset="tiny", tokenizer_segments=500,
                 tokenizer_epochs=1.0, model_preset="tiny", pretrain_epochs=1.0, max_neurons=16, batch=4),
}


def _prepare(name: str, size: dict, out: Path) -> None:
    """Write the trial DatasetDict (`trials/`) and `labels.json` of one dataset."""
    from calm_hf.data import (
        build_trial_dataset,
        load_park_sessions,
        load_triplett_zebrafish,
        prepare_session,
        save_session_metadata,
        simulate_benchmark,
    )

    spec = DATASETS[name]
    labels: dict = {"neuron": {}, "session": {}, "trial": {}}
    if name == "sim":
        sessions = simulate_benchmark(
            num_sessions=size["sim_sessions"], seed=0, num_neurons=size["sim_neurons"], num_trials=size["sim_trials"],
            task_fraction=0.4,
        )
        labels["trial"]["condition"] = {s.name: s.extras["task_condition"].tolist() for s in sessions}
        # known ground truth: the condition whose input drives the neuron (None = not driven)
        labels["neuron"]["task_group"] = {
            s.name: [None if g < 0 else int(g) for g in s.extras["task_groups"]] for s in sessions
        }
        # known coupling to the task: for neurons WITHOUT task input, whether their recurrent input from the
        # condition-1 group exceeds that from the condition-0 group (row i of W), i.e. their expected indirect tuning
        coupling = {}
        for s in sessions:
            weights, groups = s.extras["recurrent_weights"], s.extras["task_groups"]
            net = weights[:, groups == 1].sum(axis=1) - weights[:, groups == 0].sum(axis=1)
            coupling[s.name] = [None if g >= 0 else int(n > 0) for g, n in zip(groups, net)]
        labels["neuron"]["coupling_to_condition_1"] = coupling
    elif name == "park":
        sessions = load_park_sessions()
        for s in sessions:
            # the loader's 49-frame trials end one frame before the next trial; resampling is not needed at 16 Hz
            direction = np.asarray(s.extras["trial_direction_deg"]).astype(int)
            labels["trial"].setdefault("direction", {})[s.name] = direction.tolist()
            labels["trial"].setdefault("orientation", {})[s.name] = (direction % 180).tolist()
    elif name == "zebrafish":
        recording = load_triplett_zebrafish()
        session = recording.to_session(trial_length=32)
        session.name = "zf_20151104-f1"
        sessions = [session]
        assemblies = np.asarray(recording.extras["assemblies"])
        membership: dict[int, list[int]] = {}
        for index, row in enumerate(assemblies):
            for neuron in row[row >= 0]:
                membership.setdefault(int(neuron), []).append(index)
        labels["neuron"]["assembly"] = {
            session.name: [
                membership[n][0] if len(membership.get(n, [])) == 1 else None for n in range(recording.num_neurons)
            ]
        }
    else:
        raise ValueError(f"unknown dataset {name!r}; choose from {sorted(DATASETS)}")
    prepared = [prepare_session(s, target_fs=spec["fs"], split_seed=0) for s in sessions]
    corpus = build_trial_dataset(prepared)
    corpus.save_to_disk(str(out / "trials"))
    save_session_metadata(str(out / "trials"), prepared)
    (out / "labels.json").write_text(json.dumps(labels))


def _run(command_name: str, args: list[str], log: Path) -> None:
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    # the benchmark owns its work folders, and those of earlier runs carry no output marker
    command = [sys.executable, "-m", f"calm_hf.commands.{command_name}", *args, "--overwrite"]
    with log.open("a") as handle:
        handle.write(f"$ {' '.join(command)}\n")
        handle.flush()
        subprocess.run(command, check=True, stdout=handle, stderr=subprocess.STDOUT, env=env)


def _train(name: str, size: dict, out: Path) -> None:
    """Tokenizer -> tokenize -> pretrain with the package's commands (as `calm main` chains them)."""
    spec = DATASETS[name]
    log = out / "train.log"
    common = ["--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0", "--seed", "0", "--data_seed", "0",
              "--save_strategy", "no", "--logging_steps", "25", "--disable_tqdm", "True", "--lr_scheduler_type", "cosine",
              "--warmup_steps", "0.05", "--weight_decay", "0.01"]
    _run("train_tokenizer", ["--trials_dataset", str(out / "trials"), "--preset", size["tokenizer_preset"],
                             "--max_segments", str(size["tokenizer_segments"]),
                             "--segment_frames", str(spec["tokenizer_segment_frames"]),
                             "--validation_segments", "256", "--output_dir", str(out / "tokenizer"),
                             "--num_train_epochs", str(size["tokenizer_epochs"]), "--per_device_train_batch_size", "64",
                             "--learning_rate", "3e-3", *common], log)
    _run("tokenize", ["--tokenizer_path", str(out / "tokenizer"), "--trials_dataset", str(out / "trials"),
                             "--output_dir", str(out / "tokenized")], log)
    _run("pretrain", ["--tokenized_dataset", str(out / "tokenized"), "--tokenizer_path", str(out / "tokenizer"),
                      "--preset", size["model_preset"], "--max_neurons", str(size["max_neurons"]),
                      "--forecast_eval_trials", "0", "--output_dir", str(out / "model"),
                      "--num_train_epochs", str(size["pretrain_epochs"] * spec["epoch_scale"]),
                      "--per_device_train_batch_size", str(size["batch"]),
                      "--per_device_eval_batch_size", str(size["batch"]), "--learning_rate", "1e-3", *common], log)


def _analyze(name: str, out: Path, results: Path, forecast_trials: int | None, forecast_mode: str) -> dict:
    from calm_hf.commands.analyze import run as analyze_main

    spec = DATASETS[name]
    argv = ["--model", str(out / "model"), "--dataset", str(out / "tokenized"), "--labels", str(out / "labels.json"),
            "--output_dir", str(results), "--context_frames", str(spec["context_frames"]), "--forecast_mode", forecast_mode,
            "--overwrite"]  # its own results folder, committed before output markers existed
    if spec["response_window"] is not None:
        argv += ["--response_window", f"{spec['response_window'][0]}:{spec['response_window'][1]}"]
    if forecast_trials is not None:
        argv += ["--max_forecast_trials", str(forecast_trials)]
    return analyze_main(argv)


def sim_ground_truth(out: Path) -> dict:
    """How well the DATA recover the simulator's known structure (the ceiling for the embeddings): does each driven
    neuron's d'-preferred condition equal the condition that drives it, and does a non-driven neuron's d' sign follow
    its known recurrent coupling to the two driven groups?"""
    import datasets

    from calm_hf.analysis import trial_responses, tuning_dprime
    from calm_hf.data import load_session_metadata

    labels = json.loads((out / "labels.json").read_text())
    corpus = datasets.load_from_disk(str(out / "trials"))
    direct, indirect = [], []
    for info in load_session_metadata(out / "trials"):
        values, trials = [], []
        for split in corpus.values():
            rows = split.filter(lambda row: row["session_id"] == info.session_id).with_format("numpy")
            values.append(np.stack(list(rows["input_values"])))
            trials.append(np.asarray(rows["trial_index"]))
        values, trials = np.concatenate(values), np.concatenate(trials)
        condition = np.asarray(labels["trial"]["condition"][info.name])[trials]
        dprime, _ = tuning_dprime(trial_responses(values, DATASETS["sim"]["response_window"]), condition)
        group = labels["neuron"]["task_group"][info.name]
        coupling = labels["neuron"]["coupling_to_condition_1"][info.name]
        direct += [int(d > 0) == g for d, g in zip(dprime, group) if g is not None]
        indirect += [int(d > 0) == c for d, c in zip(dprime, coupling) if c is not None]
    return {"driven_neurons_preferring_their_driving_condition": float(np.mean(direct)),
            "undriven_neurons_whose_dprime_sign_follows_their_coupling": float(np.mean(indirect)),
            "num_driven": len(direct), "num_undriven": len(indirect)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--datasets", default="sim,park,zebrafish")
    parser.add_argument("--stages", default="prepare,train,analyze")
    parser.add_argument("--size", default="cpu", choices=sorted(SIZES))
    parser.add_argument("--work", default=str(REPO / ".analysis-work"), help="datasets and trained models")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="analysis_<dataset>/ go here")
    parser.add_argument("--max_forecast_trials", type=int, default=None, help="cap on test trials forecast")
    # soft rollouts (probability-weighted embeddings fed back) approximate the conditional mean, the right point
    # forecast for Pearson r; greedy argmax freezes on one code with these small models (measured: sim r 0.04 vs 0.18)
    parser.add_argument("--forecast_mode", default="soft", help="CalmForecaster rollout mode for the CalM forecasts")
    args = parser.parse_args(argv)
    stages = set(args.stages.split(","))
    size = SIZES[args.size]
    summary = {}
    for name in args.datasets.split(","):
        out = Path(args.work) / name
        out.mkdir(parents=True, exist_ok=True)
        timings = {}
        for stage, fn in (("prepare", lambda: _prepare(name, size, out)), ("train", lambda: _train(name, size, out))):
            if stage in stages:
                start = time.perf_counter()
                fn()
                timings[stage] = round(time.perf_counter() - start, 1)
                print(f"[{name}] {stage}: {timings[stage]} s", flush=True)
        if "analyze" in stages:
            start = time.perf_counter()
            report = _analyze(name, out, Path(args.out) / f"analysis_{name}", args.max_forecast_trials,
                              args.forecast_mode)
            timings["analyze"] = round(time.perf_counter() - start, 1)
            summary[name] = {"headline": report.get("headline", {}), "seconds": timings,
                             "embedding_change": report.get("embedding_change")}
            if name == "sim":
                summary[name]["ground_truth"] = sim_ground_truth(out)
            print(f"[{name}] analyze: {timings['analyze']} s", flush=True)
    if summary:
        write_summary(summary, Path(args.out), args.size)
    return summary


def write_summary(summary: dict, out: Path, summary_size: str = "cpu") -> None:
    """`analysis.md` / `analysis.json`: the headline numbers of every dataset, controls beside them."""
    out.mkdir(parents=True, exist_ok=True)
    if (out / "analysis.json").is_file():  # re-analysing one dataset keeps the others' rows
        summary = {**json.loads((out / "analysis.json").read_text()), **summary}
    (out / "analysis.json").write_text(json.dumps(summary, indent=2, default=float))
    lines = ["# Interpretability benchmark (benchmarks/analysis.py)", "",
             "Each row: trained CalM | untrained CalM (same config) | shuffled labels (trained). Full reports: "
             "`analysis_<dataset>/report.md`.", "",
             f"Models (size `{summary_size}`): {SIZES[summary_size]}; pretraining epochs x "
             f"{ {name: DATASETS[name]['epoch_scale'] for name in summary} } per dataset. CalM forecasts: soft "
             "rollouts. Reproduce: `python benchmarks/analysis.py` (prepare, train, analyze).", "",
             "| dataset | analysis | trained | untrained | shuffled labels | chance |", "|---|---|---|---|---|---|"]
    for name, item in summary.items():
        for row in item["headline"].get("rows", []):
            lines.append(f"| {name} | {row['analysis']} | {row['trained']} | {row['untrained']} | {row['shuffled']} | "
                         f"{row.get('chance', '')} |")
    lines += ["", "Neuron embeddings after training vs the untrained control (= the model's own initialisation, same seed): "
              + "; ".join(f"{name} cosine {item['embedding_change']['mean_cosine_to_untrained']:.2f}, relative change "
                          f"{item['embedding_change']['mean_relative_change']:.2f}"
                          for name, item in summary.items() if item.get("embedding_change"))]
    for name, item in summary.items():
        if "ground_truth" in item:
            truth = item["ground_truth"]
            lines += ["", f"Ground truth ({name}): the data's d' recovers the known structure -- "
                      f"{100 * truth['driven_neurons_preferring_their_driving_condition']:.0f}% of the "
                      f"{truth['num_driven']} driven neurons prefer the condition that drives them, and "
                      f"{100 * truth['undriven_neurons_whose_dprime_sign_follows_their_coupling']:.0f}% of the "
                      f"{truth['num_undriven']} undriven neurons have the d' sign their recurrent coupling predicts "
                      "(50% = no relation)."]
    (out / "analysis.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
