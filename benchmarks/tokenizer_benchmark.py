#!/usr/bin/env python
"""Tokenizer benchmark: reconstruction on unseen simulated and real traces, codebook health, cost.

    python benchmarks/tokenizer_benchmark.py                 # CPU preset, <= 20 min training budget
    python benchmarks/tokenizer_benchmark.py --quick         # minutes-long sanity run
    python benchmarks/tokenizer_benchmark.py --objective_ablation   # the paper's loss terms on/off (~25 min)

Protocol
- Train the CPU-sized CalmTokenizer on simulated sessions (seeds 0-2, training trials) plus the Cascade ground-truth
  windows whose indicator is NOT held out, all resampled to the model rate (5 Hz) and z-scored per trace.
- Held out, never seen in training: a simulated session with a new recurrent matrix (seed 100); every Cascade dataset
  of the GCaMP8 family; all five Park et al. V1 sessions; the Triplett zebrafish recording.
- Score (each trace cut into 96-frame segments; Park trials are concatenated per neuron first because a trial is only
  15 frames at 5 Hz): mean per-segment Pearson r between x and decode(encode(x)), per dataset. Same run: a k-means tokenizer
  (128 centroids on z-scored 4-frame windows, the DESIGN.md bar) fitted on the same training traces.
- Codebook health at the end: perplexity and dead codes over the held-out simulated codes.
- Cost: training wall time; encode+decode throughput (frames/s) fp32 vs bf16 measured back to back.

Writes benchmarks/results/tokenizer.json and tokenizer.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from calm_hf import CalmTokenizer, CalmTokenizerConfig
from calm_hf.data import (
    default_data_dir,
    load_cascade_groundtruth,
    load_park_sessions,
    load_triplett_zebrafish,
    resample,
    simulate_session,
)
from calm_hf.hardware import resolve_bf16
from calm_hf.trainer import CalmTrainer

RESULTS = Path(__file__).resolve().parent / "results"
MODEL_RATE = 5.0
HELD_OUT_INDICATOR = "GCaMP8"
EVAL_FRAMES = 96


def zscore(traces: np.ndarray) -> np.ndarray:
    mean = traces.mean(axis=-1, keepdims=True)
    std = np.maximum(traces.std(axis=-1, keepdims=True), 1e-6)
    return ((traces - mean) / std).astype(np.float32)


def crop(traces: np.ndarray, window: int) -> np.ndarray:
    return traces[..., : traces.shape[-1] - traces.shape[-1] % window]


def segments(traces: np.ndarray, length: int) -> np.ndarray:
    per = traces.shape[-1] // length
    return traces[:, : per * length].reshape(-1, length)


def pearson_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=-1, keepdims=True)
    b = b - b.mean(axis=-1, keepdims=True)
    denom = np.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        r = (a * b).sum(-1) / denom
    return r[np.isfinite(r)]


def load_corpora(data_dir: Path | None, quick: bool, with_simulated_count: bool = False,
                 segment_frames: int = EVAL_FRAMES):
    """Returns (training segments (n, segment_frames) z-scored at 5 Hz, {held-out name: traces (n, frames)}), plus,
    with `with_simulated_count`, how many of the leading training segments are simulated."""
    num_trials = 120 if quick else 400
    train_parts, held_out = [], {}
    for seed in (0, 1, 2):
        session = simulate_session(seed=seed, num_trials=num_trials)
        train_parts.append(zscore(session.traces[: int(0.7 * num_trials)].reshape(-1, session.traces.shape[-1])))
    unseen = simulate_session(seed=100, num_trials=40 if quick else 100)
    held_out["simulated (unseen session, seed 100)"] = zscore(unseen.traces.reshape(-1, unseen.traces.shape[-1]))
    if data_dir is not None and Path(data_dir).is_dir():
        cascade = load_cascade_groundtruth(data_dir)
        names = [str(n) for n in cascade.extras["dataset_names"]]
        ids = np.asarray(cascade.extras["dataset_id"])
        traces = zscore(resample(cascade.traces, cascade.fs, MODEL_RATE))
        held = np.array([HELD_OUT_INDICATOR.lower() in names[i].lower() for i in ids])
        train_parts.append(traces[~held])
        for dataset in sorted({int(i) for i in ids[held]}):
            held_out[f"cascade {names[dataset]}"] = traces[ids == dataset]
        for session in load_park_sessions(data_dir):
            # each neuron's trials resampled, then concatenated into one trace per neuron
            trials = resample(session.traces, session.fs, MODEL_RATE)  # (trials, neurons, frames)
            per_neuron = np.concatenate(list(trials), axis=-1)
            held_out[f"park {session.name}"] = zscore(per_neuron)
        zebrafish = load_triplett_zebrafish(data_dir)
        held_out["triplett zebrafish"] = zscore(resample(zebrafish.traces, zebrafish.fs, MODEL_RATE))
    # Every held-out trace is scored as 96-frame (19.2 s) segments, the length of a simulated trial.
    held_out = {name: segments(traces, EVAL_FRAMES) for name, traces in held_out.items()}
    # trained at the length it is scored at: a tokenizer trained on 48 frames and scored on 96 got worse the longer
    # it trained (plain objective, 782 -> 2,346 steps: simulated r 0.986 -> 0.951) as it fitted the shorter length
    train = [segments(p, segment_frames) for p in train_parts]
    if with_simulated_count:  # the first three parts are the simulated sessions
        return np.concatenate(train), held_out, sum(len(part) for part in train[:3])
    return np.concatenate(train), held_out


@torch.no_grad()
def reconstruct(model: CalmTokenizer, traces: np.ndarray, batch: int = 512, dtype=None):
    traces = crop(traces, model.config.window_size)
    outputs, codes = [], []
    for start in range(0, len(traces), batch):
        x = torch.as_tensor(traces[start : start + batch])[:, None, :]
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            c = model.encode(x).codes
            y = model.decode(c).trace_values
        outputs.append(y.float()[:, 0].numpy())
        codes.append(c[:, 0].numpy())
    return traces, np.concatenate(outputs), np.concatenate(codes)


def kmeans_tokenizer(train: np.ndarray, window: int, k: int, seed: int):
    from sklearn.cluster import MiniBatchKMeans

    windows = train[:, : train.shape[1] - train.shape[1] % window].reshape(-1, window)
    rng = np.random.default_rng(seed)
    windows = windows[rng.choice(len(windows), min(len(windows), 400_000), replace=False)]
    km = MiniBatchKMeans(n_clusters=k, random_state=seed, batch_size=4096, n_init=3).fit(windows)

    def recon(traces: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        traces = crop(traces, window)
        w = traces.reshape(-1, window)
        return traces, km.cluster_centers_[km.predict(w)].reshape(traces.shape)

    return recon


def codebook_health(codes: np.ndarray, codebook_size: int) -> dict:
    counts = np.bincount(codes.ravel(), minlength=codebook_size).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    perplexity = float(np.exp(-(nz * np.log(nz)).sum()))
    dead = int((counts == 0).sum())
    return {"perplexity": perplexity, "perplexity_fraction": perplexity / codebook_size, "dead_codes": dead,
            "dead_fraction": dead / codebook_size}


def throughput(model: CalmTokenizer, repeats: int = 5) -> dict:
    x = torch.randn(64, 16, 96)  # 98,304 frames per call
    frames = x.numel()
    result = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        times = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
                model.decode(model.encode(x).codes)
            times.append(time.perf_counter() - start)
        median = float(np.median(times[1:]))
        result[name] = {"median_seconds": median, "frames_per_second": frames / median}
    result["bf16_speedup"] = result["fp32"]["median_seconds"] / result["bf16"]["median_seconds"]
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small data and few steps (sanity run)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--epochs", type=float, default=2.0)
    parser.add_argument("--max_segments", type=int, default=200_000)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--segment_frames", type=int, default=EVAL_FRAMES,
                        help=f"training segment length (default {EVAL_FRAMES}, the scored length)")
    parser.add_argument("--learning_rate", type=float, default=2e-3)
    parser.add_argument("--data_dir", default=None, help="real recordings (default ../shared/data or $CALM_DATA_DIR)")
    parser.add_argument("--output", default=None, help="results path without suffix (default: results/tokenizer, or "
                                                        "results/tokenizer_shipped with --pretrained)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--bf16", default="auto", help="auto (measured), true or false")
    parser.add_argument("--config_overrides", default=None, help='JSON of CalmTokenizerConfig fields, e.g. \'{"ar_weight": 0.1}\'')
    parser.add_argument("--pretrained", default=None,
                        help="score this trained CalmTokenizer folder (e.g. calm-base/tokenizer) instead of training one; "
                             "the k-means bar is then fitted on the simulated training windows only (what the main job's "
                             "tokenizer sees)")
    args = parser.parse_args(argv)
    if args.output is None:  # a scored shipped tokenizer must not overwrite the training benchmark's table
        args.output = str(RESULTS / ("tokenizer_shipped" if args.pretrained else "tokenizer"))
    if args.pretrained:
        return score_pretrained(args)
    from transformers import TrainingArguments, default_data_collator, set_seed

    import datasets

    set_seed(args.seed)
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    train, held_out = load_corpora(data_dir if data_dir.is_dir() else None, args.quick,
                                   segment_frames=args.segment_frames)
    rng = np.random.default_rng(args.seed)
    max_segments = 20_000 if args.quick else args.max_segments
    if len(train) > max_segments:
        train = train[rng.choice(len(train), max_segments, replace=False)]
    config = CalmTokenizerConfig.from_preset(args.preset, **(json.loads(args.config_overrides) if args.config_overrides else {}))
    features = datasets.Features({"input_values": datasets.Array2D(shape=(1, train.shape[-1]), dtype="float32")})
    dataset = datasets.Dataset.from_dict({"input_values": train[:, None, :]}, features=features).with_format("torch")
    workdir = Path(tempfile.mkdtemp(prefix="calm-tokbench-"))
    training_args = TrainingArguments(
        output_dir=str(workdir), num_train_epochs=0.3 if args.quick else args.epochs,
        per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate, lr_scheduler_type="cosine",
        warmup_steps=0.05, weight_decay=0.0, bf16=resolve_bf16(args.bf16), use_cpu=True, logging_steps=50, save_strategy="no",
        report_to="none", seed=args.seed, dataloader_num_workers=0,
    )
    model = CalmTokenizer(config)
    trainer = CalmTrainer(model=model, args=training_args, train_dataset=dataset, data_collator=default_data_collator)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    model.eval()
    shutil.rmtree(workdir, ignore_errors=True)

    kmeans = kmeans_tokenizer(train, config.window_size, config.codebook_size, args.seed)
    rows, sim_codes = [], None
    for name, traces in held_out.items():
        x, y, codes = reconstruct(model, traces)
        xk, yk = kmeans(traces)
        if name.startswith("simulated"):
            sim_codes = codes
        rows.append({
            "dataset": name, "traces": int(len(x)), "frames_per_trace": int(x.shape[-1]),
            "calm_pearson_r": float(np.mean(pearson_rows(x, y))),
            "kmeans_pearson_r": float(np.mean(pearson_rows(xk, yk))),
        })
    health = codebook_health(sim_codes, config.codebook_size)
    speed = throughput(model)
    history = [h for h in trainer.state.log_history if "loss" in h]
    result = {
        "config": {"preset": args.preset, "overrides": args.config_overrides, **{k: getattr(config, k) for k in ("hidden_size", "codebook_size",
                   "num_encoder_layers", "num_decoder_layers", "window_size")}},
        "training": {"segments": int(len(train)), "segment_frames": int(train.shape[-1]), "epochs": training_args.num_train_epochs,
                     "seconds": train_seconds, "steps": trainer.state.global_step, "final_log": history[-1] if history else None,
                     "held_out_indicator": HELD_OUT_INDICATOR, "quick": args.quick},
        "reconstruction": rows,
        "codebook_health": health,
        "throughput": speed,
        "machine": {"threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def score_pretrained(args) -> dict:
    """Held-out reconstruction of an already trained tokenizer vs k-means fitted on the same simulated windows."""
    data_dir = Path(args.data_dir) if args.data_dir else default_data_dir()
    train, held_out, num_simulated = load_corpora(data_dir if data_dir.is_dir() else None, args.quick,
                                                  with_simulated_count=True)
    simulated = train[:num_simulated]
    model = CalmTokenizer.from_pretrained(args.pretrained).eval()
    kmeans = kmeans_tokenizer(simulated, model.config.window_size, model.config.codebook_size, args.seed)
    rows = []
    for name, traces in held_out.items():
        x, y, _ = reconstruct(model, traces)
        xk, yk = kmeans(traces)
        rows.append({"dataset": name, "traces": int(len(x)), "calm_pearson_r": float(np.mean(pearson_rows(x, y))),
                     "kmeans_pearson_r": float(np.mean(pearson_rows(xk, yk))), "calm_mse": float(np.mean((x - y) ** 2)),
                     "kmeans_mse": float(np.mean((xk - yk) ** 2))})
    lines = ["# Trained tokenizer vs k-means on held-out data", "",
             f"`python benchmarks/tokenizer_benchmark.py --pretrained {args.pretrained}`: the trained CalmTokenizer as "
             f"is, and a k-means codebook of the same size fitted on {len(simulated):,} simulated "
             f"{simulated.shape[-1]}-frame training segments (the data the main job's tokenizer is trained on). "
             "Held-out traces scored as 96-frame segments at 5 Hz: mean per-segment Pearson r and MSE (z units) of "
             "decode(encode(x)).", "",
             "| held-out dataset | traces | CalM NQ r | k-means r | CalM NQ MSE | k-means MSE |", "|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['dataset']} | {r['traces']} | {r['calm_pearson_r']:.3f} | {r['kmeans_pearson_r']:.3f} | "
              f"{r['calm_mse']:.3f} | {r['kmeans_mse']:.3f} |" for r in rows]
    result = {"pretrained": args.pretrained, "kmeans_training_segments": int(len(simulated)), "reconstruction": rows}
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def markdown(result: dict) -> str:
    lines = [
        "# Tokenizer benchmark", "",
        f"Training: {result['training']['segments']:,} segments x {result['training']['segment_frames']} frames, "
        f"{result['training']['steps']} steps in {result['training']['seconds'] / 60:.1f} min "
        f"({result['machine']['threads']} torch thread(s), fp32; config {result['config']}). "
        f"Held out: simulated seed 100, Cascade {result['training']['held_out_indicator']}*, Park, Triplett.", "",
        "| held-out dataset | traces | CalM NQ r | k-means r |", "|---|---:|---:|---:|",
    ]
    for row in result["reconstruction"]:
        lines.append(f"| {row['dataset']} | {row['traces']} | {row['calm_pearson_r']:.3f} | {row['kmeans_pearson_r']:.3f} |")
    h, s = result["codebook_health"], result["throughput"]
    lines += ["", f"Codebook (held-out simulated codes): perplexity {h['perplexity']:.1f} "
              f"({100 * h['perplexity_fraction']:.0f}% of {result['config']['codebook_size']}), dead codes {h['dead_codes']} "
              f"({100 * h['dead_fraction']:.0f}%).", "",
              f"Encode+decode throughput: fp32 {s['fp32']['frames_per_second']:,.0f} frames/s, bf16 "
              f"{s['bf16']['frames_per_second']:,.0f} frames/s (x{s['bf16_speedup']:.2f}), medians of 5.", ""]
    return "\n".join(lines)


# The tokenizer objective ablation: the paper's loss terms one by one, same data, steps and seed.
PLAIN = {"ar_weight": 0.0, "entropy_weight": 0.0, "orthogonality_weight": 0.0, "reconstruction_pearson_weight": 0.0}
PAPER_TERMS = {"ar_weight": 0.5, "entropy_weight": 0.5, "orthogonality_weight": 0.1, "reconstruction_pearson_weight": 1.0}
OBJECTIVE_VARIANTS = (
    ("paper terms (AR 0.5, entropy 0.5, orthogonality 0.1, Pearson 1)", "paper_terms", 2.0, PAPER_TERMS),
    ("paper terms without the AR loss", "no_ar", 2.0, {**PAPER_TERMS, "ar_weight": 0.0}),
    ("plain VQ-VAE (MSE + commitment, EMA codebook)", "plain", 2.0, PLAIN),
    ("plain VQ-VAE, 3x the steps", "plain_x3", 6.0, PLAIN),
)


def objective_ablation(argv: list[str]) -> dict:
    """Train one tokenizer per `OBJECTIVE_VARIANTS` row (a finished row's JSON is reused with --reuse) and write
    tokenizer_objective.{json,md}: held-out reconstruction r per dataset against the same k-means bar."""
    parser = argparse.ArgumentParser(prog="tokenizer_benchmark.py --objective_ablation")
    parser.add_argument("--output", default=str(RESULTS / "tokenizer_objective"))
    parser.add_argument("--reuse", action="store_true", help="keep variants whose JSON already exists")
    args, rest = parser.parse_known_args(argv)
    out = Path(args.output)
    runs = []
    for label, name, epochs, overrides in OBJECTIVE_VARIANTS:
        path = out / name
        if not (args.reuse and path.with_suffix(".json").is_file()):
            # 100,000 segments and fp32 unless given (later flags win): the main job's tokenizer size
            main(["--max_segments", "100000", "--bf16", "false"] + rest
                 + ["--epochs", str(epochs), "--config_overrides", json.dumps(overrides), "--output", str(path)])
        runs.append((label, json.loads(path.with_suffix(".json").read_text())))
    datasets_ = [row["dataset"] for row in runs[0][1]["reconstruction"]]
    kmeans = {row["dataset"]: row["kmeans_pearson_r"] for row in runs[0][1]["reconstruction"]}
    lines = ["# Tokenizer objective ablation", "",
             "`python benchmarks/tokenizer_benchmark.py --objective_ablation`: the cpu tokenizer trained on the same "
             f"{runs[0][1]['training']['segments']:,} segments, seed and learning rate with the paper's extra loss terms "
             "removed one group at a time; held-out reconstruction r (decode(encode(x)) vs x, "
             f"{EVAL_FRAMES}-frame segments at 5 Hz) against a k-means codebook of the same size fitted on the same "
             "windows.", "",
             "| held-out dataset | k-means | " + " | ".join(label for label, _ in runs) + " |",
             "|---|---:|" + "---:|" * len(runs)]
    for dataset in datasets_:
        cells = [next(r["calm_pearson_r"] for r in result["reconstruction"] if r["dataset"] == dataset)
                 for _, result in runs]
        lines.append(f"| {dataset} | {kmeans[dataset]:.3f} | " + " | ".join(f"{c:.3f}" for c in cells) + " |")
    lines.append("| steps / minutes (1 thread) | | " + " | ".join(
        f"{r['training']['steps']} / {r['training']['seconds'] / 60:.1f}" for _, r in runs) + " |")
    lines.append("| dead codes (held-out sim) | | " + " | ".join(
        str(r["codebook_health"]["dead_codes"]) for _, r in runs) + " |")
    summary = {"variants": [{"label": label, "overrides": overrides, "epochs": epochs, "result": str(out / name)}
                            for label, name, epochs, overrides in OBJECTIVE_VARIANTS],
               "kmeans_pearson_r": kmeans,
               "calm_pearson_r": {label: {r["dataset"]: r["calm_pearson_r"] for r in result["reconstruction"]}
                                  for label, result in runs}}
    out.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    if "--objective_ablation" in sys.argv[1:]:
        objective_ablation([a for a in sys.argv[1:] if a != "--objective_ablation"])
    else:
        main()
