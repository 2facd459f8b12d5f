#!/usr/bin/env python
"""How long the console takes to answer: `calm --help`, `calm forecast --help` and `python -c "import calm_hf"`.

    python benchmarks/cli_startup.py               # median of 5 runs of each, after one warm-up run
    python benchmarks/cli_startup.py --repeats 1   # smoke test

Each run is a fresh process, as when a user types the command; `calm` is the console script next to this Python
(`python -m calm_hf.cli` where there is none). The 1-minute load average at the start and end is recorded next to the
numbers, since other processes on a small machine slow a start-up. Writes benchmarks/results/cli_startup.{json,md}.
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


def calm_command() -> list[str]:
    """The `calm` console script of this Python's environment, else the module behind it."""
    script = Path(sys.executable).parent / "calm"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "calm_hf.cli"]


def commands() -> dict[str, list[str]]:
    calm = calm_command()
    return {"calm --help": [*calm, "--help"], "calm forecast --help": [*calm, "forecast", "--help"],
            'python -c "import calm_hf"': [sys.executable, "-c", "import calm_hf"]}


def time_command(argv: list[str], repeats: int) -> dict:
    """Seconds of `repeats` runs of `argv` (each a fresh process) after one warm-up run, and their median."""
    subprocess.run(argv, capture_output=True, check=True)  # warm-up: compiled bytecode and the disk cache
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        seconds.append(time.perf_counter() - start)
    return {"argv": argv, "seconds": seconds, "median_seconds": statistics.median(seconds)}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs of each command (after one warm-up)")
    parser.add_argument("--out", default=str(RESULTS / "cli_startup"), help="output path without suffix")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    from calm_hf.hardware import machine_description

    load_at_start = os.getloadavg()[0]
    rows = {}
    for name, command in commands().items():
        rows[name] = time_command(command, args.repeats)
        print(f"{name}: {rows[name]['median_seconds']:.2f} s", flush=True)
    package = subprocess.run([sys.executable, "-c", "import calm_hf; print(calm_hf.__file__)"], capture_output=True,
                             text=True, check=True).stdout.strip()
    # the checkout whose calm_hf was timed (empty for an installed wheel), not necessarily this script's
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(package).parent).stdout.strip()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "commit": commit,
        "command": " ".join(["python", "benchmarks/cli_startup.py", *(argv if argv is not None else sys.argv[1:])]),
        "calm_hf": package,
        "repeats": args.repeats,
        "machine": {**machine_description(), "load_average_1min_at_start": load_at_start,
                    "load_average_1min_at_end": os.getloadavg()[0]},
        "commands": rows,
    }
    machine = result["machine"]
    lines = ["# Console start-up", "",
             f"*{result['date']}, commit `{commit or 'none'}`, {machine['processor']}, {machine['cores']} cores; "
             f"`{result['command']}`. Median of {args.repeats} fresh processes after a warm-up; 1-minute load average "
             f"{load_at_start:.2f} at the start, {machine['load_average_1min_at_end']:.2f} at the end (near 0 = "
             "idle).*", "",
             "| command | median (s) | runs (s) |", "|---|---:|---|"]
    for name, row in rows.items():
        lines.append(f"| `{name}` | {row['median_seconds']:.2f} | "
                     f"{', '.join(f'{value:.2f}' for value in row['seconds'])} |")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


if __name__ == "__main__":
    main()
