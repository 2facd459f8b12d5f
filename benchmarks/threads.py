#!/usr/bin/env python
"""Torch threads vs speed on this machine: one DAT training step and one direct forecast, 1..N threads.

    python benchmarks/threads.py                # cpu preset, threads 1 and all cores, medians of 10 repeats
    python benchmarks/threads.py --quick        # tiny preset, 3 repeats (smoke test)

Run it on an idle machine: with other processes busy, more threads than free cores slows small ops sharply, so the
1-minute load average at the start is recorded next to the numbers. Each thread count runs in a fresh subprocess
(torch's thread pool cannot be shrunk reliably once grown). Writes benchmarks/results/threads.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def measure(preset: str, repeats: int) -> dict:
    """In this process: median seconds of a training step (batch 4 x 64 neurons x 25 steps) and a direct forecast."""
    import torch

    from calm_hf import CalmConfig, CalmForCausalNeuralModeling

    torch.manual_seed(0)
    config = CalmConfig.from_preset(preset, num_neurons=200, num_sessions=1)
    model = CalmForCausalNeuralModeling(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    steps = 25 if preset != "tiny" else 8
    ids = torch.randint(0, config.vocab_size, (4, 64 if preset != "tiny" else 16, steps))
    values = torch.randn(*ids.shape[:2], steps * config.window_size) if config.value_head_steps else None

    def train_step():
        optimizer.zero_grad(set_to_none=True)
        model(input_ids=ids, labels=ids, value_labels=values).loss.backward()
        optimizer.step()

    context = torch.randint(0, config.vocab_size, (1, 200 if preset != "tiny" else 16, 10))
    # a head with the raw-trace highway (the cpu preset's) also reads the traces behind the codes
    traces = ({"context_values": torch.randn(*context.shape[:2], 10 * config.window_size)}
              if config.value_skip_windows else {})

    def forecast():
        with torch.no_grad():
            model.eval()
            model.forecast_values(context, **traces) if config.value_head_steps else model(input_ids=context)
            model.train()

    out = {}
    for name, fn in (("train_step", train_step), ("direct_forecast_200_neurons", forecast)):
        fn()  # warm-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        out[name] = {"median_seconds": statistics.median(times), "repeats": repeats}
    out["tokens_per_second"] = ids.numel() / out["train_step"]["median_seconds"]
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", default=None, help="comma list (default: 1 and every core)")
    parser.add_argument("--out", default=str(RESULTS / "threads"))
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset, repeats = ("tiny", 3) if args.quick else ("cpu", 10)
    if args.child:  # one thread count, in a fresh process
        import torch

        torch.set_num_threads(int(args.child))
        print(json.dumps(measure(preset, repeats)))
        return {}
    cores = os.cpu_count() or 1
    counts = [int(t) for t in args.threads.split(",")] if args.threads else sorted({1, cores})
    load = os.getloadavg()[0]
    rows = {}
    for count in counts:
        env = {**os.environ, "OMP_NUM_THREADS": str(count), "MKL_NUM_THREADS": str(count)}
        done = subprocess.run([sys.executable, __file__, "--child", str(count)] + (["--quick"] if args.quick else []),
                              env=env, capture_output=True, text=True, check=True)
        rows[count] = json.loads(done.stdout.strip().splitlines()[-1])
        print(count, rows[count], flush=True)
    import torch

    result = {"preset": preset, "cores": cores, "load_average_1min_at_start": load, "torch": torch.__version__,
              "by_threads": rows}
    base = rows[counts[0]]
    lines = [f"# Torch threads vs speed ({preset} preset, fp32)", "",
             f"`python benchmarks/threads.py` on {cores} cores, torch {torch.__version__}; 1-minute load average "
             f"{load:.2f} at the start (near 0 = idle). Medians of {repeats} repeats after a warm-up, one fresh "
             "process per thread count.", "",
             "| threads | training step (s) | tokens/s | speed-up | direct forecast, 200 neurons (s) | speed-up |",
             "|---:|---:|---:|---:|---:|---:|"]
    for count, row in rows.items():
        step, fc = row["train_step"]["median_seconds"], row["direct_forecast_200_neurons"]["median_seconds"]
        lines.append(f"| {count} | {step:.3f} | {row['tokens_per_second']:,.0f} | "
                     f"{base['train_step']['median_seconds'] / step:.2f}x | {fc:.3f} | "
                     f"{base['direct_forecast_200_neurons']['median_seconds'] / fc:.2f}x |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
