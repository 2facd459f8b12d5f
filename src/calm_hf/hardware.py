"""Hardware facts that change what is fast: is bf16 faster than fp32 here, for this model?

CPUs with AMX (Sapphire Rapids and newer) run bf16 matmuls several times faster than fp32; CPUs without AMX or
avx512_bf16 (e.g. many AMD EPYC parts) run them tens of times SLOWER through a fallback. A fast bf16 matmul does not
make a small model's training step faster: on a 2-core AMX Xeon bf16 matmuls ran 5-6x faster than fp32, yet a
training step of the `cpu` preset (0.6 M parameters, batch 4 x 64 neurons x 25 steps) took 0.41 s under bf16
autocast against 0.25 s in fp32 (the casts and the unfused elementwise work outweigh the matmuls). So `--bf16 auto`
times the job's own training step both ways (`bf16_training_speedup`) where it knows the model, and falls back to
the matmul test (`bf16_is_faster`) where it does not.
"""

from __future__ import annotations

import functools
import logging
import os
import statistics
import time
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


def matmul_gflops(dtype: torch.dtype, size: int = 256, repeats: int = 5, device: str = "cpu") -> float:
    """Best-of-`repeats` GFLOP/s of a (size x size) @ (size x size) matmul in `dtype`."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times) / 1e9


@functools.lru_cache(maxsize=None)
def bf16_is_faster(device: str = "cpu") -> bool:
    """True when bf16 matmuls beat fp32 on this device by a margin (measured once per process, ~50 ms)."""
    if device != "cpu":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    fp32 = matmul_gflops(torch.float32, size=256)
    bf16 = matmul_gflops(torch.bfloat16, size=256, repeats=2)
    return bf16 > 1.2 * fp32


def training_step_seconds(model: torch.nn.Module, batch: dict, bf16: bool, repeats: int = 3, warmup: int = 1) -> float:
    """Median wall time of one training step of `model` on `batch` on the CPU: forward (under bf16 autocast when
    `bf16`), backward of `outputs.loss`, and an AdamW update. The model's weights change; pass a throwaway copy."""
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()
    times = []
    for index in range(warmup + repeats):
        start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        if index >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bf16_training_speedup(build_model: Callable[[], torch.nn.Module], batch: dict, repeats: int = 3) -> dict:
    """Time the same training step in fp32 and under bf16 autocast, each on a fresh `build_model()` (same seed).
    Returns {"fp32_seconds", "bf16_seconds", "speedup"} with speedup = fp32 time / bf16 time."""
    result = {}
    for name, bf16 in (("fp32", False), ("bf16", True)):
        torch.manual_seed(0)
        result[f"{name}_seconds"] = training_step_seconds(build_model(), batch, bf16, repeats=repeats)
    result["speedup"] = result["fp32_seconds"] / result["bf16_seconds"]
    return result


def resolve_bf16(choice: str | bool | None, device: str = "cpu",
                 workload: Callable[[], dict] | None = None, name: str = "training") -> bool:
    """Map a `--bf16 auto|true|false` choice to a bool. `auto` on the CPU with a `workload` (a callable returning
    `bf16_training_speedup`'s dict for the job's own model and batch) turns bf16 on only when that step is at least
    1.2x faster; without one it asks `bf16_is_faster` (matmuls only). On an accelerator `auto` means bf16 where it
    is supported."""
    if isinstance(choice, bool):
        return choice
    value = (choice or "auto").strip().lower()
    if value == "auto":
        if device != "cpu" or workload is None:
            return bf16_is_faster(device)
        measured = workload()
        use = measured["speedup"] >= 1.2
        logger.info("bf16 autocast for %s: %s (measured step: fp32 %.3f s, bf16 %.3f s)", name,
                    "on" if use else "off", measured["fp32_seconds"], measured["bf16_seconds"])
        return use
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"bf16 must be auto, true or false, got {choice!r}.")


def _cpu_times(path: str = "/proc/stat") -> dict[int, tuple[int, int]]:
    """{cpu index: (busy jiffies, total jiffies)} from the per-CPU lines of /proc/stat (Linux)."""
    times = {}
    with open(path) as handle:
        for line in handle:
            name, *values = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            ticks = [int(v) for v in values]
            idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
            times[int(name[3:])] = (sum(ticks[:8]) - idle, sum(ticks[:8]))
    return times


def busy_cores_now(cpus: set[int] | None = None, interval: float = 0.2) -> float | None:
    """Cores of `cpus` (default: this process's affinity) kept busy by other processes over the next `interval`
    seconds, measured from /proc/stat; None where that file does not exist. Unlike the 1-minute load average it does
    not count a job that ended a minute ago (the main job started right after a benchmark got 1 thread of 2)."""
    if not os.path.exists("/proc/stat"):
        return None
    if cpus is None:
        cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    try:
        before = _cpu_times()
        time.sleep(interval)
        after = _cpu_times()
    except (OSError, ValueError, IndexError):
        return None
    busy = 0.0
    for cpu, (busy_after, total_after) in after.items():
        if (cpus is not None and cpu not in cpus) or cpu not in before:
            continue
        elapsed = total_after - before[cpu][1]
        if elapsed > 0:
            busy += (busy_after - before[cpu][0]) / elapsed
    return busy


def default_num_threads() -> int:
    """Torch threads for the training entry points: $CALM_NUM_THREADS or $OMP_NUM_THREADS when set; otherwise every
    core that is free now (cores minus the cores other processes keep busy over 0.2 s, from /proc/stat; where that
    is not available, minus the 1-minute load average; at least 1).

    Why: on an idle 2-core machine the second thread speeds a cpu-preset training step up 1.83x and a direct forecast
    1.86x (`benchmarks/results/threads.md`), but with one more runnable thread than free cores PyTorch's OpenMP
    workers spin-wait and a step was measured 10-40x SLOWER (2 threads on a shared 2-core box: 1.4 s vs 33 ms).
    """
    for name in ("CALM_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name)
        if value and value.isdigit() and int(value) > 0:
            return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    busy = busy_cores_now()
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):  # no load average (Windows): assume a machine shared with one other job
            busy = 1.0 if cores <= 4 else 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def configure_torch_threads() -> int:
    """Apply `default_num_threads()` to torch; returns the number used."""
    threads = default_num_threads()
    torch.set_num_threads(threads)
    return threads
