#!/usr/bin/env python
"""Peak memory of the dual-axis transformer vs the number of neurons (the eager attention memory guard).

    python benchmarks/memory_neurons.py                      # 1k, 5k, 20k, 50k neurons with SDPA + eager rows
    python benchmarks/memory_neurons.py --neurons 1000 5000  # a subset

Every configuration runs in a fresh subprocess (so numbers do not mix): build `CalmForCausalNeuralModeling` with the
given preset and attention implementation, one no-grad forward over a (1, neurons, steps) token grid, and report the
RSS before the forward (imports, weights, inputs) and the process's RSS high-water mark (`resource.getrusage`) after
it. Eager attention materialises (steps, heads, neurons, neurons) float32 scores, so it is O(neurons^2); SDPA is
linear. Above `CALM_EAGER_ATTENTION_MAX_GIB` (default 4 GiB) eager attention is split over sequences or, when one
sequence alone is too large, refused with the estimate: those rows record the refusal message.

Writes benchmarks/results/memory_neurons.json and memory_neurons.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def child(neurons: int, attention: str, preset: str, steps: int) -> dict:
    import torch

    from calm_hf import CalmConfig, CalmForCausalNeuralModeling

    torch.manual_seed(0)
    config = CalmConfig.from_preset(preset, num_neurons=neurons, num_sessions=1, attn_implementation=attention)
    model = CalmForCausalNeuralModeling(config).eval()
    ids = torch.randint(0, config.vocab_size, (1, neurons, steps))
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB (Linux)
    start = time.perf_counter()
    row = {"neurons": neurons, "attention": attention, "preset": preset, "token_steps": steps,
           "rss_before_gib": round(rss_before, 3)}
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, use_cache=False).logits
        row["finite"] = bool(torch.isfinite(logits).all())
        row["status"] = "ok"
    except ValueError as error:
        row["status"] = "refused"
        row["message"] = str(error)
    row["seconds"] = round(time.perf_counter() - start, 2)
    row["peak_rss_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3)
    return row


def run(neurons: int, attention: str, preset: str, steps: int) -> dict:
    command = [sys.executable, __file__, "--child", str(neurons), attention, preset, str(steps)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        return {"neurons": neurons, "attention": attention, "preset": preset, "token_steps": steps,
                "status": f"crashed (exit {result.returncode})", "stderr": result.stderr[-500:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# Peak memory vs neurons",
        "",
        f"`CalmForCausalNeuralModeling` preset `{meta['preset']}`, one no-grad forward over a (1, neurons, "
        f"{meta['token_steps']}) token grid, {meta['threads']} thread(s), fresh process per row; "
        f"{meta['machine']}. Reproduce: `{meta['command']}`.",
        "",
        "| attention | neurons | status | RSS before (GiB) | peak RSS (GiB) | forward (s) |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['attention']} | {row['neurons']:,} | {row['status']} | {row.get('rss_before_gib', '')} | "
            f"{row.get('peak_rss_gib', '')} | {row.get('seconds', '')} |"
        )
    refused = [row for row in rows if row["status"] == "refused"]
    if refused:
        lines += ["", "Refusals (the guard's message, with its estimate):", ""]
        lines += [f"- {row['attention']}, {row['neurons']:,} neurons: {row['message']}" for row in refused]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--neurons", type=int, nargs="+", default=[1000, 5000, 20000, 50000])
    parser.add_argument("--eager_neurons", type=int, nargs="*", default=[1000, 2000, 20000],
                        help="neuron counts also run with eager attention (large ones show the guard's refusal)")
    parser.add_argument("--preset", default="cpu")
    parser.add_argument("--token_steps", type=int, default=2)
    parser.add_argument("--child", nargs=4, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        neurons, attention, preset, steps = args.child
        print(json.dumps(child(int(neurons), attention, preset, int(steps))))
        return
    rows = []
    for attention, counts in (("sdpa", args.neurons), ("eager", args.eager_neurons)):
        for neurons in counts:
            row = run(neurons, attention, args.preset, args.token_steps)
            print(json.dumps(row), flush=True)
            rows.append(row)
    meta = {
        "preset": args.preset,
        "token_steps": args.token_steps,
        "threads": os.environ.get("OMP_NUM_THREADS", "default"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "command": "OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/memory_neurons.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "memory_neurons.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    (RESULTS / "memory_neurons.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
