"""Hardware facts that change what is fast: is bf16 matrix math faster than fp32 on this CPU?

CPUs with AMX (Sapphire Rapids and newer) run bf16 matmuls several times faster than fp32; CPUs without AMX or
avx512_bf16 (e.g. many AMD EPYC parts) run them tens of times SLOWER through a fallback. `bf16_is_faster()` measures
instead of guessing, and the training entry points use it for `--bf16 auto`.
"""

from __future__ import annotations

import functools
import os
import time

import torch


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


def resolve_bf16(choice: str | bool | None, device: str = "cpu") -> bool:
    """Map a `--bf16 auto|true|false` choice to a bool; `auto` measures (see `bf16_is_faster`)."""
    if isinstance(choice, bool):
        return choice
    value = (choice or "auto").strip().lower()
    if value == "auto":
        return bf16_is_faster(device)
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"bf16 must be auto, true or false, got {choice!r}.")


def default_num_threads() -> int:
    """Torch threads for the training entry points: $CALM_NUM_THREADS or $OMP_NUM_THREADS when set; otherwise every
    core that is free now (cores minus the 1-minute load average, at least 1).

    Why: on an idle 2-core machine the second thread speeds a cpu-preset training step up 1.88x and a direct forecast
    1.89x (`benchmarks/results/threads.md`), but with one more runnable thread than free cores PyTorch's OpenMP
    workers spin-wait and a step was measured 10-40x SLOWER (2 threads on a shared 2-core box: 1.4 s vs 33 ms).
    """
    for name in ("CALM_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name)
        if value and value.isdigit() and int(value) > 0:
            return int(value)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
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
