#!/usr/bin/env python
"""Whole recordings through the pipeline: does choosing how much identity to read from the recording's own past help?

    python benchmarks/history_identity.py --model calm-base            # zebrafish and the two held-out Park mice
    python benchmarks/history_identity.py --model calm-base --every 40 --horizon 4

A user hands the pipeline a whole recording; the frames before the context give each neuron its identity, in 20 s
chunks. With `choose_identity` (the default) the forecaster first checks on those chunks whether to read the whole
identity, the identity without its coupling factors, or the zero-shot identity (`CalmForecaster.reference_identity`).
Here each recording is cut at points every `--every` seconds through its second half (a recording of concatenated
trials, `trial_starts` in the file: at two thirds of each trial of its second half, forecasting the trial's last third),
and the pipeline forecasts the next `--horizon` seconds from everything before each cut, once with the choice and once
reading the whole identity.
Scores per cut, in the file's units and rate: Pearson r per neuron over the horizon averaged over neurons, and MSE
in units of each neuron's standard deviation over the recording; the paired gain of the choice is reported with its
standard error over cuts. Recordings come from `$CALM_DATA_DIR` (skipped with a message when absent); none of them was
in calm-base's corpus. Writes benchmarks/results/history_identity.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
RECORDINGS = {"zebrafish zf_20151104-f1": "triplett2018_zf_tectum_spont/zf_20151104-f1.npz",
              "park mrcuts27": "park2024_v1_gratings_behavior/230804_mrcuts27_fov3_grat-000.npz",
              "park mrcuts28": "park2024_v1_gratings_behavior/230809_mrcuts28_fov4_grat-000.npz"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="calm-base", help="A data-identity CalM checkpoint folder.")
    parser.add_argument("--every", type=float, default=20.0, help="Seconds between cut points.")
    parser.add_argument("--horizon", type=float, default=8.0, help="Seconds forecast after each cut.")
    parser.add_argument("--recordings", nargs="+", default=list(RECORDINGS), choices=list(RECORDINGS))
    parser.add_argument("--out", type=Path, default=RESULTS / "history_identity")
    args = parser.parse_args(argv)
    if not (args.every > 0 and args.horizon > 0):
        parser.error("--every and --horizon must be positive.")
    return args


def cut_scores(pred: np.ndarray, truth: np.ndarray, scale: np.ndarray) -> tuple[float, float]:
    """(mean over neurons of the per-neuron r over the horizon, MSE in units of each neuron's recording std)."""
    from calm_hf.forecasting import trial_pearson_r

    r = float(trial_pearson_r(pred[None], truth[None])[0])
    return r, float(np.mean(((pred - truth) / scale[:, None]) ** 2))


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import pipeline

    import calm_hf  # noqa: F401 - registers the pipeline
    from calm_hf.data import default_data_dir, load_npz_recording

    forecaster = pipeline("neural-forecasting", model=str(args.model))
    inner = forecaster.forecaster
    chosen_log: list = []
    real = type(inner).reference_identity

    def logged(self, reference, context_frames, horizon=None):
        identity, info = real(self, reference, context_frames, horizon)
        if self.choose_identity:
            chosen_log.append(info["chosen"])
        return identity, info

    type(inner).reference_identity = logged
    out = {"recordings": {}, "skipped": {}}
    start = time.perf_counter()
    try:
        for name in args.recordings:
            path = default_data_dir() / RECORDINGS[name]
            if not path.exists():
                out["skipped"][name] = f"{path} not found (set CALM_DATA_DIR to the shared data folder)"
                print(f"skipping {name}: {out['skipped'][name]}")
                continue
            recording = load_npz_recording(path)
            traces, fs = recording.traces.astype(np.float64), float(recording.fs)
            frames = traces.shape[1]
            if recording.trial_starts is not None:  # concatenated trials: forecast the last third of each
                starts = np.asarray(recording.trial_starts)
                length = int(np.min(np.diff(np.append(starts, frames))))
                horizon = max(2, length // 3)
                cuts = starts[len(starts) // 2 :] + length - horizon
            else:
                horizon = max(2, int(round(args.horizon * fs)))
                cuts = np.arange(frames // 2, frames - horizon + 1, max(1, int(round(args.every * fs))))
            scale = traces.std(axis=1) + 1e-12
            rows = {"choose": [], "full": []}
            chosen_log.clear()
            for cut in cuts:
                truth = traces[:, cut : cut + horizon]
                for setting in rows:
                    inner.choose_identity = setting == "choose"
                    with torch.no_grad():
                        pred = forecaster(traces[:, :cut], sampling_rate=fs, horizon=horizon)["forecast"]
                    rows[setting].append(cut_scores(np.asarray(pred, dtype=np.float64), truth, scale))
            choose, full = np.asarray(rows["choose"]), np.asarray(rows["full"])
            gain = choose - full
            se = gain.std(axis=0, ddof=1) / np.sqrt(len(gain)) if len(gain) > 1 else np.full(2, np.nan)
            out["recordings"][name] = {
                "neurons": int(traces.shape[0]), "rate_hz": fs, "cuts": int(len(cuts)), "horizon_frames": horizon,
                "choose": {"pearson_r": float(choose[:, 0].mean()), "mse": float(choose[:, 1].mean())},
                "full": {"pearson_r": float(full[:, 0].mean()), "mse": float(full[:, 1].mean())},
                "gain": {"pearson_r": float(gain[:, 0].mean()), "pearson_r_se": float(se[0]),
                         "mse": float(gain[:, 1].mean()), "mse_se": float(se[1])},
                "chosen": dict(Counter(str(c) for c in chosen_log))}
            print(name, json.dumps(out["recordings"][name]), flush=True)
    finally:
        type(inner).reference_identity = real
        inner.choose_identity = True
    out["meta"] = {"date": time.strftime("%Y-%m-%d"), "model": str(args.model), "every_s": args.every,
                   "horizon_s": args.horizon, "threads": torch.get_num_threads(),
                   "seconds": round(time.perf_counter() - start, 1)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    lines = ["# The identity choice on a whole recording's past (pipeline)", "",
             f"{out['meta']['date']}, `{args.model}`, a cut every {args.every:g} s through each recording's second "
             f"half, {args.horizon:g} s forecast from everything before it; r and MSE (units of each neuron's std) in "
             "the file's rate, mean over cuts; gain = with the choice minus the whole identity, +- its standard error.",
             "", "| recording | neurons | cuts | r with the choice | r, whole identity | r gain | MSE with the choice "
             "| MSE, whole identity | MSE gain | chosen (per forecast) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, row in out["recordings"].items():
        gain = row["gain"]
        lines.append(f"| {name} | {row['neurons']} | {row['cuts']} | {row['choose']['pearson_r']:.3f} | "
                     f"{row['full']['pearson_r']:.3f} | {gain['pearson_r']:+.3f} +- {gain['pearson_r_se']:.3f} | "
                     f"{row['choose']['mse']:.3f} | {row['full']['mse']:.3f} | {gain['mse']:+.3f} +- "
                     f"{gain['mse_se']:.3f} | " + ", ".join(f"{k} {v}" for k, v in row["chosen"].items()) + " |")
    lines += [f"- skipped {name}: {why}" for name, why in out["skipped"].items()]
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    return out


if __name__ == "__main__":
    main()
