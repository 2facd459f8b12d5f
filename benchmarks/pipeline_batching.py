#!/usr/bin/env python
"""Forecasting several recordings in one pipeline call against one call per recording.

    python benchmarks/pipeline_batching.py --model calm-base                    # 8 recordings of 200 and 150 neurons
    python benchmarks/pipeline_batching.py --model calm-base --neurons 200      # 8 recordings of one size

The recordings (random traces, `--seconds` at `--rate` Hz each, neuron counts cycling through `--neurons`) are forecast
`--horizon` frames ahead with the 5-95% band, as a list in one call (the pipeline forecasts each size as one batch)
and one by one, alternating the two `--repeats` times after a warm-up of each; medians are reported with their ratio
and the largest difference between the two forecasts. Writes benchmarks/results/pipeline_batching.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="calm-base", help="A data-identity CalM checkpoint folder.")
    parser.add_argument("--recordings", type=int, default=8)
    parser.add_argument("--neurons", type=int, nargs="+", default=[200, 150])
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--rate", type=float, default=5.0, help="Frame rate of the recordings (Hz).")
    parser.add_argument("--horizon", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "pipeline_batching")
    args = parser.parse_args(argv)
    if args.recordings < 1 or args.repeats < 1 or args.horizon < 1 or min(args.neurons) < 1:
        parser.error("--recordings, --repeats, --horizon and --neurons must be positive.")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    import torch
    from transformers import pipeline

    import calm_hf  # noqa: F401 - registers the pipeline

    forecaster = pipeline("neural-forecasting", model=str(args.model))
    rng = np.random.default_rng(0)
    frames = int(round(args.seconds * args.rate))
    recordings = [rng.standard_normal((args.neurons[i % len(args.neurons)], frames)) for i in range(args.recordings)]
    call = dict(horizon=args.horizon, sampling_rate=args.rate, quantiles=(0.05, 0.95))

    def batched():
        return forecaster(recordings, **call)

    def one_by_one():
        return [forecaster(recording, **call) for recording in recordings]

    outputs = {"batched": batched(), "one_by_one": one_by_one()}  # warm-up, and the forecasts compared
    difference = max(float(np.abs(a["forecast"] - b["forecast"]).max())
                     for a, b in zip(outputs["batched"], outputs["one_by_one"]))
    times: dict[str, list[float]] = {"batched": [], "one_by_one": []}
    load_start = os.getloadavg()[0]
    for _ in range(args.repeats):
        for name, run in (("batched", batched), ("one_by_one", one_by_one)):
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {
        "machine": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()[0]},
        "settings": {"model": str(args.model), "recordings": args.recordings, "neurons": args.neurons,
                     "frames": frames, "rate_hz": args.rate, "horizon": args.horizon, "repeats": args.repeats},
        "seconds": times, "median_seconds": medians, "speedup": medians["one_by_one"] / medians["batched"],
        "max_abs_forecast_difference": difference,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    sizes = ", ".join(str(n) for n in args.neurons)
    args.out.with_suffix(".md").write_text("\n".join([
        "# Several recordings in one pipeline call", "",
        f"{args.recordings} recordings of {sizes} neurons x {frames} frames ({args.rate:g} Hz), horizon "
        f"{args.horizon} frames with the 5-95% band; model {args.model}; {result['machine']['torch_threads']} torch "
        f"threads, load {load_start:.1f} at start and {result['machine']['load_average_at_end']:.1f} at end; "
        f"medians of {args.repeats} alternating runs.", "",
        "| call | median seconds |", "|---|---|",
        f"| one list (one batch per size) | {medians['batched']:.3f} |",
        f"| one call per recording | {medians['one_by_one']:.3f} |", "",
        f"Speed-up {result['speedup']:.2f}x; largest difference between the two forecasts {difference:.1e}.", ""]))
    print(json.dumps({"median_seconds": medians, "speedup": result["speedup"], "max_abs_difference": difference}))
    return result


if __name__ == "__main__":
    main()
