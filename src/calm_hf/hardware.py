"""Hardware facts that change what is fast: is bf16 faster than fp32 here, for this model?

CPUs with AMX (Sapphire Rapids and newer) run bf16 matmuls several times faster than fp32; CPUs without AMX or
avx512_bf16 (e.g. many AMD EPYC parts) run them tens of times SLOWER through a fallback. A fast bf16 matmul does not
make a small model's training step faster: on a 2-core AMX Xeon bf16 matmuls ran 5-6x faster than fp32, yet a
training step of the `cpu` preset (0.6 M parameters, batch 4 x 64 neurons x 25 steps) took 0.41 s under bf16
autocast against 0.25 s in fp32 (the casts and the unfused elementwise work outweigh the matmuls). So `--bf16 auto`
times the job's own training step both ways (`bf16_training_speedup`) where it knows the model, and falls back to
the matmul test (`bf16_is_faster`) where it does not.

A timing is noisy, and a decision that flips between two identical runs changes their results. So the step is timed
in interleaved rounds, bf16 is chosen only with a clear margin (`decide_bf16`), and `bf16_decision` records each
decision with its measurements per machine (`bf16_decisions.json` in `$CALM_CACHE_DIR`, default `~/.cache/calm_hf`),
so the same workload on the same machine gets the same answer until that record is deleted.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

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


# bf16 must make the step this much faster (median over the rounds), and no round may be slower than fp32: fp32 is
# always correct, so bf16 has to be clearly worth it
BF16_MIN_SPEEDUP = 1.2
BF16_TIMING_ROUNDS = 3


def bf16_training_speedup(build_model: Callable[[], torch.nn.Module], batch: dict, repeats: int = 2,
                          rounds: int = BF16_TIMING_ROUNDS) -> dict:
    """Time the same training step in fp32 and under bf16 autocast, each on a fresh `build_model()` (same seed).

    The two are timed in `rounds` interleaved rounds of `repeats` steps each (after one warm-up step), so a burst of
    load from elsewhere slows both alike. Returns `fp32_seconds` and `bf16_seconds` (medians over every timed step),
    `speedup` (their ratio, fp32 / bf16) and `round_speedups` (each round's ratio)."""
    models, optimizers = {}, {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)
        models[name] = build_model()
        models[name].train()
        optimizers[name] = torch.optim.AdamW([p for p in models[name].parameters() if p.requires_grad], lr=1e-6)

    def step(name: str) -> float:
        start = time.perf_counter()
        optimizers[name].zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
            loss = models[name](**batch).loss
        loss.backward()
        optimizers[name].step()
        return time.perf_counter() - start

    step("fp32"), step("bf16")  # warm-up: allocations, kernel selection
    times: dict[str, list[list[float]]] = {"fp32": [], "bf16": []}
    for _ in range(max(1, rounds)):
        for name in ("fp32", "bf16"):
            times[name].append([step(name) for _ in range(max(1, repeats))])
    result = {f"{name}_seconds": statistics.median(t for round_ in rounds_ for t in round_)
              for name, rounds_ in times.items()}
    result["speedup"] = result["fp32_seconds"] / result["bf16_seconds"]
    result["round_speedups"] = [statistics.median(f) / statistics.median(b) for f, b in zip(times["fp32"],
                                                                                           times["bf16"])]
    return result


def decide_bf16(measured: dict) -> bool:
    """bf16 on only with a clear margin: the measured `speedup` is at least `BF16_MIN_SPEEDUP` and no round of
    `round_speedups` (when given) was slower than fp32."""
    rounds = measured.get("round_speedups") or [measured["speedup"]]
    return measured["speedup"] >= BF16_MIN_SPEEDUP and min(rounds) >= 1.0


def decision_record_path() -> Path:
    """Where per-machine bf16 decisions are kept: `$CALM_CACHE_DIR/bf16_decisions.json` (default `~/.cache/calm_hf`)."""
    return Path(os.environ.get("CALM_CACHE_DIR") or "~/.cache/calm_hf").expanduser() / "bf16_decisions.json"


def machine_description(device: str = "cpu") -> dict:
    """What makes a timing of this machine comparable: processor, cores, torch threads and version, accelerator."""
    processor = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            processor = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")),
                             processor)
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    accelerator = torch.cuda.get_device_name() if device != "cpu" and torch.cuda.is_available() else None
    return {"processor": processor, "cores": cores, "threads": torch.get_num_threads(), "torch": torch.__version__,
            "device": device, "accelerator": accelerator}


def bf16_decision(choice: str | bool | None, device: str = "cpu", workload: Callable[[], dict] | None = None,
                  name: str = "training", record_key: dict | None = None) -> dict:
    """Decide bf16 autocast for one workload and say why.

    `choice` is `--bf16` (auto, true or false). `auto` on the CPU with a `workload` (a callable returning
    `bf16_training_speedup`'s dict for the job's own model and batch) follows `decide_bf16`; without one it asks
    `bf16_is_faster` (matmuls only); on an accelerator it means bf16 where it is supported. With `record_key` (what
    identifies the workload, e.g. the recipe), a measured decision is recorded per machine (`decision_record_path`)
    and later calls with the same key and machine reuse it instead of timing again.

    Returns:
        `dict` with `bf16` (bool), `reason` (one line for logs and the model card), `measured` (the timing or None)
        and `recorded` (when the reused record was made, or None).
    """
    if isinstance(choice, bool):
        return {"bf16": choice, "reason": f"{'on' if choice else 'off'} (asked for)", "measured": None,
                "recorded": None}
    value = (choice or "auto").strip().lower()
    if value in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        use = value in ("1", "true", "yes", "on")
        return {"bf16": use, "reason": f"{'on' if use else 'off'} (--bf16 {value})", "measured": None, "recorded": None}
    if value != "auto":
        raise ValueError(f"bf16 must be auto, true or false, got {choice!r}.")
    if device != "cpu" or workload is None:
        use = bf16_is_faster(device)
        why = "supported by the accelerator" if device != "cpu" else "bf16 matmuls faster here"
        return {"bf16": use, "reason": f"{'on' if use else 'off'} (auto: {why})", "measured": None, "recorded": None}
    key = None
    if record_key is not None:
        blob = json.dumps({"workload": name, **record_key, "machine": machine_description(device)}, sort_keys=True,
                          default=str)
        key = hashlib.sha256(blob.encode()).hexdigest()[:20]
        recorded = _read_decisions().get(key)
        if recorded is not None:
            reason = f"{recorded['reason']}; reused from this machine's record {decision_record_path()}"
            logger.info("bf16 autocast for %s: %s", name, reason)
            return {"bf16": bool(recorded["bf16"]), "reason": reason, "measured": recorded.get("measured"),
                    "recorded": recorded.get("when")}
    measured = workload()
    use = decide_bf16(measured)
    rounds = measured.get("round_speedups") or [measured["speedup"]]
    reason = (f"{'on' if use else 'off'} (auto: a training step took {measured['fp32_seconds']:.3f} s in fp32 and "
              f"{measured['bf16_seconds']:.3f} s in bf16, speedup {measured['speedup']:.2f} over {len(rounds)} "
              f"round(s), {min(rounds):.2f}-{max(rounds):.2f}; bf16 needs >= {BF16_MIN_SPEEDUP} and no slower round; "
              f"measured {time.strftime('%Y-%m-%d %H:%M')})")
    logger.info("bf16 autocast for %s: %s", name, reason)
    decision = {"bf16": use, "reason": reason, "measured": measured, "recorded": None}
    if key is not None:
        _record_decision(key, {**decision, "when": time.strftime("%Y-%m-%dT%H:%M:%S"), "workload": name})
    return decision


def _read_decisions() -> dict:
    try:
        records = json.loads(decision_record_path().read_text())
    except (OSError, ValueError):  # none yet, or unreadable: measure again
        return {}
    return records if isinstance(records, dict) else {}


def _record_decision(key: str, decision: dict) -> None:
    from .atomic import atomic_write_text

    records = _read_decisions()
    records[key] = decision
    try:
        atomic_write_text(decision_record_path(), json.dumps(records, indent=2, default=str))
    except OSError as error:  # a read-only home: the decision still holds for this job (kept in its work folder)
        logger.warning("could not record the bf16 decision in %s (%s)", decision_record_path(), error)


def resolve_bf16(choice: str | bool | None, device: str = "cpu",
                 workload: Callable[[], dict] | None = None, name: str = "training") -> bool:
    """Map a `--bf16 auto|true|false` choice to a bool (`bf16_decision` without a record): `auto` on the CPU with a
    `workload` follows `decide_bf16` on the job's own timed step; without one it asks `bf16_is_faster` (matmuls
    only). On an accelerator `auto` means bf16 where it is supported."""
    return bf16_decision(choice, device, workload, name)["bf16"]


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


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
# allocations up to this size are served from (and freed back to) the process's heap
KEEP_FREED_MEMORY_UP_TO = 1 << 30


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Let freed tensor memory be reused inside the process instead of returning it to the kernel (glibc's malloc on
    Linux; a no-op elsewhere). Returns whether it applied; `CALM_KEEP_FREED_MEMORY=0` turns it off.

    Why: glibc serves every allocation above its mmap threshold (dynamic, at most 32 MiB) with a fresh mapping and
    unmaps it when freed, so each new large activation (a 1,000-neuron grid's hidden states are tens of MiB) is
    page-faulted and zeroed by the kernel again, on every training step and every forward pass. Raising the threshold
    to `KEEP_FREED_MEMORY_UP_TO` and no longer trimming the heap's top keeps those blocks for the next tensors
    (`benchmarks/README.md` has the measurements). The process's resident memory then stays near its high-water mark
    instead of falling between steps, and it can sit above a forecaster's `max_memory_gib` (blocks freed by one chunk
    are kept, not all reusable by the next). The training commands call it; a training script or notebook may call it
    once at its start. It changes allocator settings only, never a result.
    """
    if os.environ.get("CALM_KEEP_FREED_MEMORY", "1").strip() in ("0", "false", "False", "no"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
        applied = libc.mallopt(_M_MMAP_THRESHOLD, KEEP_FREED_MEMORY_UP_TO) == 1
        applied = libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1) == 1 and applied
    except (OSError, AttributeError):
        return False
    if applied:
        logger.debug("keep_freed_memory: glibc keeps freed blocks up to %d MiB", KEEP_FREED_MEMORY_UP_TO >> 20)
    return applied


def configure_torch_threads() -> int:
    """Apply `default_num_threads()` to torch; returns the number used."""
    threads = default_num_threads()
    torch.set_num_threads(threads)
    return threads
