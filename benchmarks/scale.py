#!/usr/bin/env python
"""Time and peak memory against the number of neurons, for the four things a user runs at today's recording sizes.

    python benchmarks/scale.py --model calm-base                       # 200 -> 100,000 neurons
    python benchmarks/scale.py --model calm-base --neurons 200 1000    # chosen sizes

Tasks, each size in a fresh subprocess (its peak RSS is its own high-water mark, `getrusage`):

- `point_band`: the `neural-forecasting` pipeline on a 10-minute 30 Hz recording, the point forecast with its 5-95%
  band from the quantile head (one pass), `--horizon` input frames, the forecaster's default memory budget.
- `samples16`: the same call with 16 sampled futures.
- `stream_update`: `CalmStreamingForecaster` primed with `STREAM_CONTEXT_STEPS` windows, then fed `STREAM_WINDOWS`
  windows frame by frame; `seconds` is the mean time per new frame (a window end runs the models, the other frames
  only shift the forecast), `window_seconds` the median time of a frame that completes a window.
- `train_step`: one AdamW step of the "cpu" preset on batch 1 x neurons x `TRAIN_STEPS` token steps, as
  `benchmarks/speed.py` measures it (FLOPs counted by `FlopCounterMode`); `fraction_of_peak` is its achieved GFLOP/s
  over the fp32 matmul peak measured in the same run (square `PEAK_SIZE` matmuls, all threads).

Guards: a watchdog kills a run whose RSS passes `--max_rss_gib`, and each run stops after `--timeout` s; a size is
skipped (reason recorded) when the recording alone would pass the guard, or when a smaller size of the same task
already ran out of time or memory (time and memory grow with the neurons). Forecast timings use the released model's
weights; `train_step` a randomly initialised cpu preset (speed does not depend on the weights).

Allocator (`--keep_freed_memory`): by default each task runs as the `calm` commands run it, `train_step` with freed
memory kept in the process (`calm_hf.hardware.keep_freed_memory`) and the forecasts with glibc's default; `on` / `off`
apply one setting to every task.

Writes benchmarks/results/scale.json (`{"machine": ..., "rows": [{"neurons", "task", "seconds", "peak_gib", ...}]}`),
scale.md and scale.png.
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
import warnings
from pathlib import Path

import numpy as np
import torch


RESULTS = Path(__file__).resolve().parent / "results"
TASKS = ("point_band", "samples16", "stream_update", "train_step")
NEURONS = (200, 1000, 2000, 5000, 10000, 20000, 50000, 100000)
RECORDING_SECONDS, RECORDING_RATE = 600, 30.0
STREAM_CONTEXT_STEPS, STREAM_WINDOWS = 40, 8
TRAIN_STEPS, TRAIN_REPEATS = 25, 3
PEAK_SIZE = 2048
# the worker's float32 recording plus what the pipeline keeps at the model rate (float64 resampled, z-scored
# history): about twice the float32 recording in all
RECORDING_BYTES_PER_VALUE = 8
GOALS = {  # (neurons, task): (seconds, GiB) the issue asks for on a 2-core CPU
    (10000, "point_band"): (10.0, 4.0),
    (1000, "samples16"): (10.0, 2.0),
    (1000, "stream_update"): (0.010, None),
}
TRAIN_GOAL = 0.5  # training step: at least this fraction of the fp32 matmul peak


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def recording(neurons: int) -> np.ndarray:
    """A 10-minute 30 Hz recording (neurons, frames) of slow random walks around 1 (float32, dF/F-like)."""
    rng = np.random.default_rng(neurons)
    frames = int(RECORDING_SECONDS * RECORDING_RATE)
    traces = np.empty((neurons, frames), dtype=np.float32)
    for start in range(0, neurons, 1000):  # in blocks: the float64 random walk of a large recording is not held at once
        block = rng.standard_normal((min(1000, neurons - start), frames)).cumsum(-1) * 0.02 + 1.0
        traces[start : start + block.shape[0]] = block
    return traces


# ----------------------------------------------------------------------------------------------------------------------
# Workers (one per task and size)
# ----------------------------------------------------------------------------------------------------------------------


def set_neuron_block(model, spec: dict) -> None:
    """`--neuron_block`: 'full' = attention over all neurons, a number = that block, absent = the checkpoint's;
    `--context_steps`: 'all' = as many as fit, a number = that many token steps, absent = the checkpoint's."""
    if spec.get("neuron_block") is not None:
        model.config.neuron_attention_block = None if spec["neuron_block"] == "full" else int(spec["neuron_block"])
    if spec.get("context_steps") is not None:
        model.config.context_token_steps = None if spec["context_steps"] == "all" else int(spec["context_steps"])


def worker_forecast(spec: dict) -> dict:
    from transformers import pipeline

    import calm_hf  # noqa: F401 - registers the neural-forecasting task

    pipe = pipeline("neural-forecasting", model=spec["model"])
    set_neuron_block(pipe.model, spec)
    traces = recording(spec["neurons"])
    kwargs = {"sampling_rate": RECORDING_RATE, "horizon": spec["horizon"]}
    if spec["task"] == "samples16":
        kwargs["num_samples"] = 16
    pipe(traces[:8, -600:], **kwargs)  # warm-up on a small slice
    before = peak_gib()
    start = time.perf_counter()
    out = pipe(traces, **kwargs)
    seconds = time.perf_counter() - start
    assert np.isfinite(out["forecast"]).all() and out["quantiles"] is not None
    return {"seconds": seconds, "peak_gib": peak_gib(), "peak_gib_before": before}


def worker_stream(spec: dict) -> dict:
    from transformers import pipeline

    import calm_hf  # noqa: F401
    from calm_hf.streaming import CalmStreamingForecaster

    pipe = pipeline("neural-forecasting", model=spec["model"])
    set_neuron_block(pipe.model, spec)
    window = pipe.forecaster.window_size
    rng = np.random.default_rng(0)
    frames = torch.from_numpy(rng.standard_normal((spec["neurons"], (STREAM_CONTEXT_STEPS + STREAM_WINDOWS) * window))
                              .astype(np.float32))
    stream = CalmStreamingForecaster(pipe.forecaster, spec["neurons"])
    stream.prime(frames[:, : STREAM_CONTEXT_STEPS * window])
    before = peak_gib()
    times = []
    for index in range(STREAM_CONTEXT_STEPS * window, frames.shape[1]):
        start = time.perf_counter()
        stream.update(frames[:, index])
        times.append(time.perf_counter() - start)
    window_ends = times[window - 1 :: window]
    return {"seconds": float(np.mean(times)), "window_seconds": float(np.median(window_ends)),
            "peak_gib": peak_gib(), "peak_gib_before": before}


def worker_train(spec: dict) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import speed  # the training-step measurement of benchmarks/speed.py, FLOP counting included

    result = speed.worker_train({"variant": "cpu", "dtype": "fp32", "batch": 1, "neurons": spec["neurons"],
                                 "steps": TRAIN_STEPS, "repeats": TRAIN_REPEATS})
    return {"seconds": result["median_step_seconds"], "peak_gib": result["peak_rss_mib"] / 1024,
            "tokens_per_second": result["tokens_per_second"], "achieved_gflops": result["achieved_gflops"],
            "tokens_per_step": result["tokens_per_step"]}


def worker_peak(spec: dict) -> dict:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import speed

    return speed.matmul_gflops(torch.float32, (PEAK_SIZE,) * 3, repeats=5)


WORKERS = {"point_band": worker_forecast, "samples16": worker_forecast, "stream_update": worker_stream,
           "train_step": worker_train, "peak": worker_peak}


# ----------------------------------------------------------------------------------------------------------------------
# Parent: one subprocess per run, a watchdog on its RSS
# ----------------------------------------------------------------------------------------------------------------------


def rss_gib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def run_worker(spec: dict, timeout: float, max_rss_gib: float, threads: int) -> dict:
    """Run one measurement in a fresh process; `{"error": ...}` when it ran out of time or memory or failed."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": str(threads),
           "MKL_NUM_THREADS": str(threads)}
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    highest, reason = 0.0, None
    while process.poll() is None:
        highest = max(highest, rss_gib(process.pid))
        if highest > max_rss_gib:
            reason = f"killed: RSS passed the {max_rss_gib:g} GiB guard"
        elif time.perf_counter() - started > timeout:
            reason = f"did not finish in {timeout:g} s"
        if reason:
            process.kill()
            process.wait()
            return {"error": reason, "peak_gib_seen": round(highest, 2)}
        time.sleep(0.2)
    stdout, stderr = process.communicate()
    if process.returncode != 0:
        return {"error": f"failed: {stderr.strip().splitlines()[-1] if stderr.strip() else process.returncode}"}
    return json.loads(stdout.strip().splitlines()[-1])


def machine(threads: int) -> dict:
    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "torch_threads": threads, "torch": torch.__version__,
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def skip_reason(task: str, neurons: int, failed: dict, max_rss_gib: float) -> str | None:
    if task in failed:
        return f"skipped: {failed[task][1]} neurons already {failed[task][0]}"
    if task in ("point_band", "samples16"):
        recording_gib = neurons * RECORDING_SECONDS * RECORDING_RATE * RECORDING_BYTES_PER_VALUE / 2**30
        if recording_gib > max_rss_gib:
            return (f"skipped: the 10-minute recording alone is about {recording_gib:.1f} GiB in the worker and the "
                    f"pipeline, above the {max_rss_gib:g} GiB guard")
    return None


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="checkpoint folder of the released model (forecast tasks)")
    parser.add_argument("--neurons", type=int, nargs="+", default=list(NEURONS))
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--horizon", type=int, default=300, help="input frames forecast (10 s at 30 Hz)")
    parser.add_argument("--timeout", type=float, default=180.0, help="seconds one run may take")
    parser.add_argument("--max_rss_gib", type=float, default=12.0, help="RSS at which a run is killed")
    parser.add_argument("--threads", type=int, default=os.cpu_count(),
                        help="torch threads of every run (default: every core, as the goals assume)")
    parser.add_argument("--neuron_block", default=None,
                        help="neuron-axis attention block of the forecast runs: a number of neurons, or 'full' "
                             "(default: the checkpoint's config.neuron_attention_block)")
    parser.add_argument("--context_steps", default=None,
                        help="token steps of context the forecast runs read: a number, or 'all' (as many as fit) "
                             "(default: the checkpoint's config.context_token_steps)")
    parser.add_argument("--output", default=str(RESULTS / "scale"), help="path stem of the .json/.md/.png")
    parser.add_argument("--merge", nargs="+", help="JSON results of several runs to merge into --output (rows by "
                        "neurons, a later run's measurement replacing an earlier one; the first run's machine and "
                        "settings head the table, every command is listed)")
    parser.add_argument("--keep_freed_memory", choices=("commands", "on", "off"), default="commands",
                        help="the allocator setting (`calm_hf.hardware.keep_freed_memory`): as the `calm` commands "
                        "(on for train_step, off for the forecasts), on for every task, or off (glibc's default: every "
                        "large tensor mapped and zeroed afresh)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.merge:
        return write_merged(args.merge, Path(args.output))
    if args.worker:
        spec = json.loads(args.worker)
        warnings.simplefilter("ignore")
        if spec.get("keep_freed_memory", True):  # as the `calm` commands do (off: glibc's default allocator)
            from calm_hf.hardware import keep_freed_memory

            keep_freed_memory()
        print(json.dumps(WORKERS[spec["task"]](spec)))
        return {}
    if any(task != "train_step" for task in args.tasks) and not args.model:
        parser.error("--model (the released checkpoint folder, e.g. calm-base) is needed for the forecast tasks.")
    started = time.perf_counter()
    load = os.getloadavg()[0]
    peak = run_worker({"task": "peak"}, args.timeout, args.max_rss_gib, args.threads)
    print(f"fp32 matmul peak: {peak.get('gflops', float('nan')):.1f} GFLOP/s", flush=True)
    rows, failed = [], {}
    for neurons in sorted(args.neurons):
        for task in args.tasks:
            row = {"neurons": neurons, "task": task, "seconds": None, "peak_gib": None}
            reason = skip_reason(task, neurons, failed, args.max_rss_gib)
            if reason is None:
                spec = {"task": task, "neurons": neurons, "model": args.model, "horizon": args.horizon,
                        "neuron_block": args.neuron_block, "context_steps": args.context_steps,
                        "keep_freed_memory": args.keep_freed_memory == "on"
                        or (args.keep_freed_memory == "commands" and task == "train_step")}
                result = run_worker(spec, args.timeout, args.max_rss_gib, args.threads)
                reason = result.pop("error", None)
                row.update(result)
                if reason:
                    failed[task] = ("ran out of time or memory" if "guard" in reason or "finish" in reason else
                                    "failed", neurons)
            if reason:
                row["note"] = reason
            if task == "train_step" and row.get("achieved_gflops") and peak.get("gflops"):
                row["fraction_of_peak"] = row["achieved_gflops"] / peak["gflops"]
            rows.append(row)
            print(f"  {neurons:>7} {task:13s} "
                  + (f"{row['seconds']:.4g} s, {row['peak_gib']:.2f} GiB" if row["seconds"] is not None else reason),
                  flush=True)
    result = {"machine": {**machine(args.threads), "fp32_matmul_peak_gflops": peak.get("gflops"), "load_average_at_start": load,
                          "load_average_at_end": os.getloadavg()[0]},
              "settings": {"model": args.model, "neuron_block": args.neuron_block,
                           "context_steps": args.context_steps, "recording": f"{RECORDING_SECONDS} s at {RECORDING_RATE:g} Hz",
                           "horizon_frames": args.horizon, "timeout_s": args.timeout, "max_rss_gib": args.max_rss_gib,
                           "keep_freed_memory": args.keep_freed_memory,
                           "train": f"cpu preset, batch 1 x neurons x {TRAIN_STEPS} token steps, fp32",
                           "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))},
              "wall_seconds": time.perf_counter() - started, "rows": rows}
    write_outputs(result, Path(args.output), f"in {result['wall_seconds']:.0f} s")
    return result


def write_outputs(result: dict, stem: Path, how: str) -> None:
    """`stem`.json, .md (the table) and .png (the figure) of a result."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    figure(result, stem.with_suffix(".png"))
    print(f"wrote {stem}.json/.md/.png {how}")


def write_merged(paths: list[str], stem: Path) -> dict:
    runs = [json.loads(Path(path).read_text()) for path in paths]
    # one row per size and task: a later run's measurement replaces an earlier row (a rerun after a change), and a
    # measurement is never replaced by a skip or a failure
    kept: dict[tuple[int, str], dict] = {}
    for run in runs:
        for row in run["rows"]:
            key = (row["neurons"], row["task"])
            if key not in kept or row["seconds"] is not None or kept[key]["seconds"] is None:
                kept[key] = row
    result = {**runs[0], "rows": sorted(kept.values(), key=lambda row: (row["neurons"], TASKS.index(row["task"]))),
              "wall_seconds": sum(run["wall_seconds"] for run in runs),
              "runs": [{"command": run["settings"]["command"], "machine": run["machine"]} for run in runs]}
    result["settings"] = {**runs[0]["settings"], "command": " ; ".join(run["settings"]["command"] for run in runs)}
    allocators = []  # one per measuring run, a merged file's own runs included
    for run in runs:
        setting = allocator_setting(run["settings"])
        allocators += setting if isinstance(setting, list) else [setting] * len(run.get("runs", [run]))
    result["settings"]["keep_freed_memory"] = allocators[0] if len(set(allocators)) == 1 else allocators
    write_outputs(result, stem, f"from {len(runs)} runs")
    return result


ALLOCATOR_TEXT = {"commands": "as the `calm` commands (freed blocks kept for train_step, `keep_freed_memory`; "
                                "glibc's default for the forecasts)",
                  "on": "freed blocks kept for every task (`keep_freed_memory`)", "off": "glibc's default"}


def allocator_setting(settings: dict) -> str | list[str]:
    """`--keep_freed_memory` of a run ("off" for runs from before the flag; a list for merged runs that differ)."""
    value = settings.get("keep_freed_memory", "off")
    return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value


def allocator_text(settings: dict) -> str:
    setting = allocator_setting(settings)
    if isinstance(setting, list):
        return "per run in the command's order: " + "; ".join(ALLOCATOR_TEXT[item] for item in setting)
    return ALLOCATOR_TEXT[setting]


def markdown(result: dict) -> str:
    settings, machine_info = result["settings"], result["machine"]
    lines = [
        "# Scale: time and peak memory against neurons",
        "",
        f"`python benchmarks/{settings['command']}` on {machine_info['processor']} ({machine_info['cpus']} CPUs, "
        f"{machine_info['torch_threads']} torch threads, torch {machine_info['torch']}); 1-min load average "
        f"{machine_info['load_average_at_start']:.1f} at start and {machine_info['load_average_at_end']:.1f} at end "
        "(the machine is shared: a load above the core count slows every timing here). fp32 matmul peak "
        f"{machine_info['fp32_matmul_peak_gflops']:.1f} GFLOP/s ({PEAK_SIZE}x{PEAK_SIZE}). Forecasts: "
        f"{settings['model']} (neuron-axis attention block: "
        f"{settings.get('neuron_block') or 'as in its config'}; context token steps: "
        f"{settings.get('context_steps') or 'as in its config'}), a {settings['recording']} recording, horizon "
        f"{settings['horizon_frames']} frames; "
        f"training: {settings['train']}. Each run in a fresh process, peak = its RSS high-water mark; allocator: "
        + allocator_text(settings) + ".",
        "",
        "| neurons | task | seconds | peak GiB | goal | note |",
        "|---:|---|---:|---:|---|---|",
    ]
    for row in result["rows"]:
        goal = GOALS.get((row["neurons"], row["task"]))
        goal_text, note = "", row.get("note", "")
        if goal:
            goal_text = f"< {goal[0]:g} s" + (f", < {goal[1]:g} GiB" if goal[1] else "")
            if row["seconds"] is not None:
                met = row["seconds"] < goal[0] and (goal[1] is None or row["peak_gib"] < goal[1])
                goal_text += " (met)" if met else " (not met)"
        if row["task"] == "stream_update" and row.get("window_seconds") is not None:
            note = f"per frame (mean); a frame that completes a window: {1e3 * row['window_seconds']:.1f} ms"
        if row["task"] == "train_step" and row.get("tokens_per_second"):
            fraction = row.get("fraction_of_peak")
            note = (f"{row['tokens_per_second']:,.0f} tokens/s, {row['achieved_gflops']:.1f} GFLOP/s"
                    + (f" = {100 * fraction:.1f}% of the fp32 matmul peak" if fraction else ""))
            goal_text = f">= {100 * TRAIN_GOAL:g}% of peak" + (
                "" if fraction is None else " (met)" if fraction >= TRAIN_GOAL else " (not met)")
        seconds = "" if row["seconds"] is None else f"{row['seconds']:.4g}"
        peak = "" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        lines.append(f"| {row['neurons']:,} | {row['task']} | {seconds} | {peak} | {goal_text} | {note} |")
    return "\n".join(lines) + "\n"


def figure(result: dict, path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (time_axis, memory_axis) = plt.subplots(1, 2, figsize=(11, 4))
    for task in TASKS:
        rows = [row for row in result["rows"] if row["task"] == task and row["seconds"] is not None]
        if not rows:
            continue
        neurons = [row["neurons"] for row in rows]
        time_axis.plot(neurons, [row["seconds"] for row in rows], marker="o", label=task)
        memory_axis.plot(neurons, [row["peak_gib"] for row in rows], marker="o", label=task)
    for axis, label in ((time_axis, "seconds (stream_update: per frame)"), (memory_axis, "peak RSS (GiB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # decade labels only: no overlap
        axis.set_xlabel("neurons")
        axis.set_ylabel(label)
        axis.grid(True, which="both", alpha=0.3)
    time_axis.legend()
    fig.suptitle(f"calm_hf at scale ({result['machine']['processor']}, {result['machine']['torch_threads']} threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
