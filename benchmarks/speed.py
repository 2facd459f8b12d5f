#!/usr/bin/env python
"""Speed and memory benchmark: matmul peak, training throughput, rollout latency, peak memory.

    python benchmarks/speed.py               # full run, < ~8 min on 2 cores
    python benchmarks/speed.py --quick       # sanity run (fewer repeats, smaller sizes), ~2 min

Everything is measured in ONE run, on this machine, with `torch.set_num_threads(--threads)`:

- Matmul peak: GFLOP/s of square fp32 and bf16 matmuls (1024 and 2048), median of repeats after a warm-up. This is
  the ceiling the model throughput is compared against (same dtype).
- Training throughput of `CalmForCausalNeuralModeling` (the "cpu" preset and a smaller variant: hidden 64, 3 layers,
  FFN 256), fp32 vs bf16 autocast, one AdamW step per repeat with the preset's own augmentations (the cpu preset
  turns the paper's scheduled sampling and neighbourhood replacement off; a preset with them draws from a random
  codebook). Tokens/s and achieved GFLOP/s. FLOPs are counted
  with `torch.utils.flop_counter.FlopCounterMode` on one step with and one step without scheduled sampling (the
  extra no-grad forward it costs), plus the CPU SDPA kernels that the stock counter does not know; an analytic
  count (6 x matmul params x tokens + attention terms) is reported next to it as a cross-check. Each repeat is
  charged the FLOPs of the branch it actually took.
- Rollout latency: `generate` 15 greedy token steps after a 10-step context, batch 1, 200 and 1000 neurons, with
  `use_cache=True` vs `use_cache=False`; speedup and whether both give identical sequences.
- Peak memory: RSS high-water (`resource.getrusage`) of a fresh subprocess per configuration (every training and
  rollout configuration above runs in its own process, so numbers do not mix), next to the RSS before the workload
  (after imports and model construction).
- Tokenizer throughput: encode+decode frames/s of the "cpu" `CalmTokenizer`, fp32 vs bf16, measured the way
  `benchmarks/tokenizer_benchmark.py` does (its stored result is quoted when present).

bf16 on a CPU without AMX / avx512_bf16 (e.g. AMD EPYC) runs matmuls tens of times slower than fp32 through a
fallback; there (bf16 matmul peak below half of fp32's) the bf16 configurations use a smaller batch and at most 2
timed repeats, and the tables say so. Where bf16 matmuls are not slow (AMX), bf16 runs the same shapes as fp32, so
step times compare directly. Models are randomly initialised (speed does not depend on the weights).

Writes benchmarks/results/speed.json and speed.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


RESULTS = Path(__file__).resolve().parent / "results"
CONTEXT_STEPS = 10
NEW_STEPS = 15

# "small" is the hidden-64 variant of the "cpu" preset the brief asks for
MODEL_VARIANTS = {
    "cpu": {},
    "small": {"hidden_size": 64, "num_hidden_layers": 3, "intermediate_size": 256, "num_attention_heads": 4},
}


# ----------------------------------------------------------------------------------------------------------------------
# Helpers shared by the parent and the workers
# ----------------------------------------------------------------------------------------------------------------------


def current_rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn, repeats: int, warmup: int = 1) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def matmul_gflops(dtype: torch.dtype, shape: tuple[int, int, int], repeats: int) -> dict:
    """Median GFLOP/s of an (m x k) @ (k x n) matmul in `dtype` after one warm-up."""
    m, k, n = shape
    generator = torch.Generator().manual_seed(m * k + n)
    a = torch.randn(m, k, generator=generator).to(dtype)
    b = torch.randn(k, n, generator=generator).to(dtype)
    times = timed(lambda: a @ b, repeats)
    median = float(np.median(times))
    return {"shape": [m, k, n], "gflops": 2 * m * k * n / median / 1e9, "median_seconds": median, "repeats": repeats}


def matmul_peak(sizes: list[int], repeats: int, bf16_repeats: dict[int, int], model_shape: tuple[int, int, int]) -> dict:
    """Square-matmul GFLOP/s per dtype (the "peak" is the best size), plus one model-shaped matmul (the FFN
    up-projection of the "cpu" preset over a training batch), whose bf16 speed differs from square matmuls here."""
    result = {}
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        result[dtype_name] = {}
        for size in sizes:
            n = repeats if dtype == torch.float32 else bf16_repeats.get(size, repeats)
            result[dtype_name][str(size)] = matmul_gflops(dtype, (size, size, size), n)
        result[dtype_name]["peak_gflops"] = max(v["gflops"] for v in result[dtype_name].values())
        result[dtype_name]["model_shaped"] = matmul_gflops(dtype, model_shape, repeats)
    result["bf16_over_fp32"] = result["bf16"]["peak_gflops"] / result["fp32"]["peak_gflops"]
    return result


def register_cpu_sdpa_flops() -> None:
    """The stock FlopCounterMode knows the CUDA SDPA kernels only; CPU SDPA runs `_scaled_dot_product_flash_attention
    _for_cpu`. Same FLOP formulas (2 matmuls forward, 4 backward; causal counted as full, like the stock counter)."""
    from torch.utils import flop_counter

    aten = torch.ops.aten
    if aten._scaled_dot_product_flash_attention_for_cpu in flop_counter.flop_registry:
        return

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_sdpa(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_sdpa_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def analytic_train_flops(config, batch: int, neurons: int, steps: int, scheduled_sampling: bool) -> float:
    """6 x matmul params x tokens + attention (neuron axis over `neurons` keys, time axis over `steps` keys, causal
    counted as full), x3 for forward+backward; scheduled sampling adds one no-grad forward (without the last step's
    head)."""
    d, f, layers, vocab = config.hidden_size, config.intermediate_size, config.num_hidden_layers, config.vocab_size
    tokens = batch * neurons * steps
    layer_params = 8 * d * d + 2 * d * f  # qkv + o for both axes, FFN up + down
    attention = layers * 4 * d * (neurons + steps)  # per token: QK^T and AV on both axes
    forward = tokens * (2 * layers * layer_params + 2 * d * vocab + attention)
    total = 3 * forward
    if scheduled_sampling:
        total += tokens * (2 * layers * layer_params + attention) + 2 * d * vocab * batch * neurons * (steps - 1)
    return float(total)


def build_model(variant: str, overrides: dict | None = None):
    from calm_hf import CalmConfig, CalmForCausalNeuralModeling

    torch.manual_seed(0)  # same weights in every worker: cached and uncached rollouts can be compared
    config = CalmConfig.from_preset("cpu", **{**MODEL_VARIANTS[variant], **(overrides or {})})
    return CalmForCausalNeuralModeling(config)


# ----------------------------------------------------------------------------------------------------------------------
# Workers (each configuration in a fresh process: clean RSS high-water mark)
# ----------------------------------------------------------------------------------------------------------------------


def worker_train(spec: dict) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    batch, neurons, steps = spec["batch"], spec["neurons"], spec["steps"]
    model = build_model(spec["variant"], {"num_neurons": max(600, neurons)})
    config = model.config
    generator = torch.Generator().manual_seed(1)
    model.set_codebook_neighbors(torch.randn(config.vocab_size, 128, generator=generator))
    input_ids = torch.randint(0, config.vocab_size, (batch, neurons, steps), generator=generator)
    inputs = {
        "input_ids": input_ids,
        "labels": input_ids,
        "neuron_ids": torch.arange(neurons).expand(batch, neurons),
        "session_ids": torch.zeros(batch, dtype=torch.long),
    }
    if config.value_head_steps > 0:  # the continuous head (and its raw-trace highway) train on the traces
        inputs["value_labels"] = torch.randn(batch, neurons, steps * config.window_size, generator=generator)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    use_bf16 = spec["dtype"] == "bf16"
    applied_log: list[bool] = []
    from calm_hf.trainer import augment_training_batch

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            # the trainer's corruptions (scheduled sampling, neighbour replacement) as CalmTrainer applies them
            batch, applied = augment_training_batch(model, inputs)
            outputs = model(**batch)
        outputs.loss.backward()
        optimizer.step()
        applied_log.append(bool(applied) if applied is not None else False)

    rss_before = current_rss_mib()
    torch.manual_seed(2)
    times = timed(step, spec["repeats"], warmup=1)
    peak = peak_rss_mib()
    applied = applied_log[1:]

    # FLOPs of one step on each scheduled-sampling branch (counted in fp32: the count does not depend on the dtype)
    register_cpu_sdpa_flops()
    flops = {}
    saved_prob = config.scheduled_sampling_prob
    for branch, prob in (("with_scheduled_sampling", 1.0), ("without_scheduled_sampling", 0.0)):
        config.scheduled_sampling_prob = prob
        counter = FlopCounterMode(display=False)
        with counter:
            optimizer.zero_grad(set_to_none=True)
            model(**augment_training_batch(model, inputs)[0]).loss.backward()
        flops[branch] = float(counter.get_total_flops())
    config.scheduled_sampling_prob = saved_prob
    optimizer.zero_grad(set_to_none=True)

    tokens = batch * neurons * steps
    per_repeat_flops = [flops["with_scheduled_sampling" if a else "without_scheduled_sampling"] for a in applied]
    per_repeat_gflops = [f / t / 1e9 for f, t in zip(per_repeat_flops, times)]
    matmul_params = sum(
        module.weight.numel() for module in model.modules() if isinstance(module, torch.nn.Linear)
    )
    return {
        "variant": spec["variant"],
        "dtype": spec["dtype"],
        "batch": batch,
        "neurons": neurons,
        "steps": steps,
        "tokens_per_step": tokens,
        "repeats": spec["repeats"],
        "step_seconds": times,
        "median_step_seconds": float(np.median(times)),
        "tokens_per_second": float(np.median([tokens / t for t in times])),
        "scheduled_sampling_applied": applied,
        "flops_per_step_counted": flops,
        "flops_per_step_analytic": {
            "with_scheduled_sampling": analytic_train_flops(config, batch, neurons, steps, True),
            "without_scheduled_sampling": analytic_train_flops(config, batch, neurons, steps, False),
        },
        "achieved_gflops": float(np.median(per_repeat_gflops)),
        "parameters": sum(p.numel() for p in model.parameters()),
        "matmul_parameters": matmul_params,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak,
    }


def worker_rollout(spec: dict) -> dict:
    neurons, use_cache = spec["neurons"], spec["use_cache"]
    model = build_model("cpu", {"num_neurons": max(600, neurons)}).eval()
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, model.config.vocab_size, (1, neurons, CONTEXT_STEPS), generator=generator)
    sequences = {}

    def run(max_new_tokens: int = NEW_STEPS) -> None:
        with torch.no_grad():
            sequences["out"] = model.generate(
                input_ids=input_ids, max_new_tokens=max_new_tokens, do_sample=False, use_cache=use_cache
            )

    rss_before = current_rss_mib()
    run(2)  # warm-up: kernels and allocator, short so the uncached 1000-neuron case stays affordable
    times = timed(run, spec["repeats"], warmup=0)
    peak = peak_rss_mib()
    out = sequences["out"]
    if tuple(out.shape) != (1, neurons, CONTEXT_STEPS + NEW_STEPS):
        raise RuntimeError(f"generate returned shape {tuple(out.shape)}")
    torch.save(out, spec["sequences_path"])
    return {
        "neurons": neurons,
        "use_cache": use_cache,
        "repeats": spec["repeats"],
        "seconds": times,
        "median_seconds": float(np.median(times)),
        "ms_per_new_step": float(np.median(times)) / NEW_STEPS * 1e3,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak,
    }


def worker_tokenizer(spec: dict) -> dict:
    from calm_hf import CalmTokenizer, CalmTokenizerConfig

    torch.manual_seed(0)
    model = CalmTokenizer(CalmTokenizerConfig.from_preset("cpu")).eval()
    use_bf16 = spec["dtype"] == "bf16"
    x = torch.randn(spec["batch"], 16, 96)

    def run() -> None:
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            model.decode(model.encode(x).codes)

    times = timed(run, spec["repeats"], warmup=1)
    median = float(np.median(times))
    return {"dtype": spec["dtype"], "input_shape": list(x.shape), "repeats": spec["repeats"], "median_seconds": median,
            "frames_per_second": x.numel() / median, "peak_rss_mib": peak_rss_mib()}


WORKERS = {"train": worker_train, "rollout": worker_rollout, "tokenizer": worker_tokenizer}


def run_worker(spec: dict, threads: int, timeout: float = 900) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec), "--threads", str(threads)]
    start = time.perf_counter()
    process = subprocess.run(command, capture_output=True, text=True, env=env, timeout=timeout)
    if process.returncode != 0:
        raise RuntimeError(f"worker {spec} failed:\n{process.stderr[-4000:]}")
    result = json.loads(process.stdout.strip().splitlines()[-1])
    print(f"  {spec['kind']:9s} {json.dumps({k: v for k, v in spec.items() if k not in ('kind', 'sequences_path')})}"
          f" -> {time.perf_counter() - start:.1f} s", flush=True)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Parent
# ----------------------------------------------------------------------------------------------------------------------


def plan(quick: bool) -> dict:
    if quick:
        return {
            "matmul_sizes": [512, 1024], "matmul_repeats": 3, "matmul_bf16_repeats": {"512": 2, "1024": 2},
            "matmul_model_shape": [1600, 128, 512],
            "train_fp32": {"batch": 2, "neurons": 32, "steps": 25, "repeats": 3},
            "train_bf16": {"batch": 1, "neurons": 8, "steps": 25, "repeats": 2},
            "rollout_neurons": [200, 1000], "rollout_repeats": 2,
            "tokenizer": {"fp32": {"batch": 16, "repeats": 3}, "bf16": {"batch": 1, "repeats": 1}},
        }
    return {
        # bf16 2048^3 takes ~10 s a matmul here: 3 repeats (after the warm-up) keep the run under 8 minutes
        "matmul_sizes": [1024, 2048], "matmul_repeats": 5, "matmul_bf16_repeats": {"1024": 5, "2048": 3},
        "matmul_model_shape": [6400, 128, 512],
        "train_fp32": {"batch": 4, "neurons": 64, "steps": 25, "repeats": 5},
        "train_bf16": {"batch": 1, "neurons": 16, "steps": 25, "repeats": 2},
        "rollout_neurons": [200, 1000], "rollout_repeats": 5,
        "tokenizer": {"fp32": {"batch": 64, "repeats": 5}, "bf16": {"batch": 2, "repeats": 2}},
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes (sanity run)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads in every measurement")
    parser.add_argument("--output", default=str(RESULTS / "speed"), help="writes <output>.json and <output>.md")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.worker is not None:
        spec = json.loads(args.worker)
        print(json.dumps(WORKERS[spec["kind"]](spec)))
        return {}

    settings = plan(args.quick)
    wall_start = time.perf_counter()
    load_at_start = os.getloadavg()
    print(f"speed benchmark ({'quick' if args.quick else 'full'}), {args.threads} threads", flush=True)

    print("matmul peak", flush=True)
    peak = matmul_peak(
        settings["matmul_sizes"],
        settings["matmul_repeats"],
        {int(size): n for size, n in settings["matmul_bf16_repeats"].items()},
        tuple(settings["matmul_model_shape"]),
    )

    # a slow bf16 fallback (no AMX / avx512_bf16) gets smaller bf16 shapes; otherwise bf16 runs fp32's shapes
    slow_bf16 = peak["bf16_over_fp32"] < 0.5
    if not slow_bf16:
        settings["train_bf16"] = dict(settings["train_fp32"])
        settings["tokenizer"]["bf16"] = dict(settings["tokenizer"]["fp32"])
    settings["slow_bf16"] = slow_bf16

    print("training throughput", flush=True)
    training = []
    for variant in MODEL_VARIANTS:
        for dtype in ("fp32", "bf16"):
            shape = settings[f"train_{dtype}"]
            row = run_worker({"kind": "train", "variant": variant, "dtype": dtype, **shape}, args.threads)
            row["fraction_of_peak"] = row["achieved_gflops"] / peak[dtype]["peak_gflops"]
            row["fraction_of_model_shaped_matmul"] = row["achieved_gflops"] / peak[dtype]["model_shaped"]["gflops"]
            training.append(row)

    print("rollout latency", flush=True)
    rollout = []
    with tempfile.TemporaryDirectory() as tmp:
        for neurons in settings["rollout_neurons"]:
            rows = {}
            for use_cache in (True, False):
                path = os.path.join(tmp, f"rollout_{neurons}_{use_cache}.pt")
                rows[use_cache] = run_worker(
                    {"kind": "rollout", "neurons": neurons, "use_cache": use_cache,
                     "repeats": settings["rollout_repeats"], "sequences_path": path},
                    args.threads,
                )
                rows[use_cache]["sequences"] = torch.load(path)
            cached, uncached = rows[True].pop("sequences"), rows[False].pop("sequences")
            new_cached, new_uncached = cached[..., CONTEXT_STEPS:], uncached[..., CONTEXT_STEPS:]
            rollout.append({
                "neurons": neurons,
                "context_steps": CONTEXT_STEPS,
                "new_steps": NEW_STEPS,
                "cached": rows[True],
                "uncached": rows[False],
                "speedup": rows[False]["median_seconds"] / rows[True]["median_seconds"],
                "identical_sequences": bool(torch.equal(cached, uncached)),
                "matching_new_tokens_fraction": float((new_cached == new_uncached).float().mean()),
            })

    print("tokenizer throughput", flush=True)
    tokenizer = {dtype: run_worker({"kind": "tokenizer", "dtype": dtype, **shape}, args.threads)
                 for dtype, shape in settings["tokenizer"].items()}
    tokenizer["bf16_speedup"] = tokenizer["fp32"]["median_seconds"] / tokenizer["bf16"]["median_seconds"] * (
        tokenizer["bf16"]["input_shape"][0] / tokenizer["fp32"]["input_shape"][0]
    )
    stored = RESULTS / "tokenizer.json"
    if stored.exists():
        tokenizer["tokenizer_benchmark_reported"] = json.loads(stored.read_text()).get("throughput")

    result = {
        "mode": "quick" if args.quick else "full",
        "command": "python benchmarks/speed.py" + (" --quick" if args.quick else "") + f" --threads {args.threads}",
        "threads": args.threads,
        "machine": {
            "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "torch": torch.__version__,
            "load_average_at_start": load_at_start,
            "load_average_at_end": os.getloadavg(),
            "bf16_note": ("no AMX / avx512_bf16 here: bf16 matmuls run through a slow fallback" if slow_bf16 else
                          "bf16 matmuls are not slow here (AMX or avx512_bf16): bf16 runs fp32's shapes"),
        },
        "settings": settings,
        "matmul_peak": peak,
        "training": training,
        "rollout": rollout,
        "tokenizer_throughput": tokenizer,
        "wall_seconds": time.perf_counter() - wall_start,
    }
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.with_suffix(".json").write_text(json.dumps(result, indent=2))
    output.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))
    return result


def markdown(result: dict) -> str:
    peak = result["matmul_peak"]
    sizes = [key for key in peak["fp32"] if key not in ("peak_gflops", "model_shaped")]
    model_shape = "x".join(str(v) for v in peak["fp32"]["model_shaped"]["shape"])
    load = result["machine"]["load_average_at_start"]
    lines = [
        f"# Speed and memory ({result['mode']} run, {result['threads']} threads)",
        "",
        f"`{result['command']}` on {result['machine']['processor']}, torch {result['machine']['torch']}; "
        f"wall time {result['wall_seconds']:.0f} s; 1-min load average {load[0]:.1f} at start (the CPU is shared: with "
        "more runnable threads than cores, multi-threaded kernels slow down sharply). Medians after a warm-up; "
        "models randomly initialised.",
        "",
        "## Matmul peak (GFLOP/s)",
        "",
        "| dtype | " + " | ".join(f"{s}x{s}" for s in sizes) + f" | peak (best square) | model-shaped {model_shape} |",
        "|---|" + "---:|" * (len(sizes) + 2),
    ]
    for dtype in ("fp32", "bf16"):
        lines.append(f"| {dtype} | " + " | ".join(f"{peak[dtype][s]['gflops']:.1f}" for s in sizes)
                     + f" | {peak[dtype]['peak_gflops']:.1f} | {peak[dtype]['model_shaped']['gflops']:.1f} |")
    slow_bf16 = result["settings"].get("slow_bf16", True)
    if slow_bf16:
        bf16_line = (f"bf16 / fp32 = {peak['bf16_over_fp32']:.3f}: this CPU has no AMX or avx512_bf16, so bf16 is a "
                     "slow fallback whose speed depends on the shape (the model-shaped m x k x n matmul, k = hidden "
                     "size, is the fairer bf16 ceiling for the model).")
    else:
        bf16_line = (f"bf16 / fp32 = {peak['bf16_over_fp32']:.3f}: bf16 matmuls are fast here (AMX or avx512_bf16). "
                     "Whether a training step gets faster is a separate question, answered by the next table.")
    lines += [
        "",
        bf16_line,
        "",
        "## Training throughput (one AdamW step with the preset's own augmentations: the cpu preset turns scheduled "
        "sampling and neighbour replacement off, the SS column shows whether a step ran it)",
        "",
        "| model | dtype | batch x neurons x steps | repeats | step (s) | tokens/s | GFLOP/step (counted / analytic, "
        "no SS) | achieved GFLOP/s | of same-dtype peak | of model-shaped matmul | SS applied | peak RSS MiB "
        "(+ over before) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in result["training"]:
        counted = row["flops_per_step_counted"]["without_scheduled_sampling"] / 1e9
        analytic = row["flops_per_step_analytic"]["without_scheduled_sampling"] / 1e9
        applied = f"{sum(row['scheduled_sampling_applied'])}/{len(row['scheduled_sampling_applied'])}"
        lines.append(
            f"| {row['variant']} ({row['parameters'] / 1e6:.2f} M) | {row['dtype']} | {row['batch']} x "
            f"{row['neurons']} x {row['steps']} | {row['repeats']} | {row['median_step_seconds']:.3f} | "
            f"{row['tokens_per_second']:,.0f} | {counted:.2f} / {analytic:.2f} | {row['achieved_gflops']:.2f} | "
            f"{100 * row['fraction_of_peak']:.1f}% | {100 * row['fraction_of_model_shaped_matmul']:.1f}% | {applied} | "
            f"{row['peak_rss_mib']:.0f} (+{row['peak_rss_mib'] - row['rss_before_mib']:.0f}) |"
        )
    if slow_bf16:
        shapes_line = ("bf16 rows use a smaller batch and at most 2 timed repeats (each step is slow on this CPU); "
                       "compare tokens/s, not step times.")
    else:
        ratios = []
        for variant in dict.fromkeys(row["variant"] for row in result["training"]):
            rows = {row["dtype"]: row for row in result["training"] if row["variant"] == variant}
            if {"fp32", "bf16"} <= set(rows):
                ratios.append(f"{variant} {rows['fp32']['median_step_seconds'] / rows['bf16']['median_step_seconds']:.2f}x")
        shapes_line = ("bf16 rows run the fp32 rows' shapes. Step-time speedup of bf16 autocast over fp32 (above 1 = "
                       f"bf16 faster): {', '.join(ratios)}. `calm main --bf16 auto` times its own training steps "
                       "both ways before choosing, because fast bf16 matmuls need not make a small model's step faster.")
    lines += [
        "",
        shapes_line + " A step with scheduled sampling (SS) also runs one no-grad forward; each repeat is charged "
        "the FLOPs of its branch.",
        "",
        f"## Rollout latency (generate, greedy, batch 1, {CONTEXT_STEPS} context + {NEW_STEPS} new token steps, "
        "\"cpu\" preset, fp32)",
        "",
        "| neurons | cached (s) | uncached (s) | speedup | identical sequences | peak RSS MiB cached / uncached "
        "(+ over before) |",
        "|---:|---:|---:|---:|---|---:|",
    ]
    for row in result["rollout"]:
        lines.append(
            f"| {row['neurons']} | {row['cached']['median_seconds']:.3f} | {row['uncached']['median_seconds']:.3f} | "
            f"{row['speedup']:.1f}x | {'yes' if row['identical_sequences'] else 'no'} "
            f"({100 * row['matching_new_tokens_fraction']:.2f}% of new tokens match) | "
            f"{row['cached']['peak_rss_mib']:.0f} (+{row['cached']['peak_rss_mib'] - row['cached']['rss_before_mib']:.0f})"
            f" / {row['uncached']['peak_rss_mib']:.0f} "
            f"(+{row['uncached']['peak_rss_mib'] - row['uncached']['rss_before_mib']:.0f}) |"
        )
    big = max(result["rollout"], key=lambda row: row["neurons"])
    lines += [
        "",
        f"Goal: cache >= 5x faster at 1000 neurons -> {big['speedup']:.1f}x at {big['neurons']} neurons "
        f"({'met' if big['speedup'] >= 5 else 'not met'}).",
        "",
        "Peak RSS is the high-water mark (`getrusage`) of a fresh process per configuration (imports + model + "
        "workload); the bracket is the rise over the RSS measured just before the workload (after imports and model "
        "construction).",
        "",
        "## Tokenizer encode+decode throughput (\"cpu\" CalmTokenizer)",
        "",
        "| dtype | input (batch, neurons, frames) | repeats | frames/s |",
        "|---|---|---:|---:|",
    ]
    tokenizer = result["tokenizer_throughput"]
    for dtype in ("fp32", "bf16"):
        row = tokenizer[dtype]
        lines.append(f"| {dtype} | {tuple(row['input_shape'])} | {row['repeats']} | {row['frames_per_second']:,.0f} |")
    lines.append("")
    lines.append(f"bf16 speedup over fp32: {tokenizer['bf16_speedup']:.3f}x.")
    reported = tokenizer.get("tokenizer_benchmark_reported")
    if reported:
        lines.append(
            f"benchmarks/results/tokenizer.json reports fp32 {reported['fp32']['frames_per_second']:,.0f} and bf16 "
            f"{reported['bf16']['frames_per_second']:,.0f} frames/s."
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
