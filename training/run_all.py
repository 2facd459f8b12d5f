#!/usr/bin/env python
"""The main job: from nothing to a pretrained `calm-base/` checkpoint with a model card, on the simulated corpus.

    calm main                       # or: python training/run_all.py
    calm main --fresh               # start over instead of reusing finished stages
    calm main --size tiny --output_dir /tmp/x   # seconds-long smoke version (tests use it)

Stages: simulate -> train tokenizer -> tokenize to `datasets` -> pretrain the dual-axis transformer -> evaluate
forecasting on held-out trials -> write `calm-base/` (DAT weights, `tokenizer/`, generation config, remote-code
files, model card with this run's numbers, forecast figure) and `calm-base-dataset/` (tokenized trials + card).

Re-running reuses every finished stage (a stage is finished when its folder holds a `.calm_stage.json` written with
the same parameters) and resumes an interrupted training stage from its last Trainer checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from calm_hf.hardware import configure_torch_threads
from calm_hf.cli import load_training_script as load_script

logger = logging.getLogger("calm_hf.main")

# Sizes of the main job. "cpu" is the default run (<= 15 minutes on 2 cores); "tiny" is the smoke run of the tests.
SIZES = {
    "cpu": dict(
        num_sessions=3, num_neurons=200, num_trials=400, num_steps=100,
        tokenizer_preset="cpu", tokenizer_epochs=1.0, tokenizer_batch=128, tokenizer_lr=2e-3, tokenizer_segments=200_000,
        model_preset="cpu", pretrain_epochs=4.0, pretrain_batch=8, pretrain_lr=1e-3, max_neurons=64,
        eval_trials=None, forecast_samples=16,
    ),
    "tiny": dict(
        num_sessions=2, num_neurons=12, num_trials=20, num_steps=60,
        tokenizer_preset="tiny", tokenizer_epochs=1.0, tokenizer_batch=64, tokenizer_lr=3e-3, tokenizer_segments=2_000,
        model_preset="tiny", pretrain_epochs=1.0, pretrain_batch=4, pretrain_lr=1e-3, max_neurons=8,
        eval_trials=4, forecast_samples=3,
    ),
}


@dataclass
class MainArguments:
    output_dir: str = field(default=".", metadata={"help": "Where calm-base/ and calm-base-dataset/ are written."})
    size: str = field(default="cpu", metadata={"help": "cpu (the real run) or tiny (a seconds-long smoke run)."})
    fresh: bool = field(default=False, metadata={"help": "Delete earlier stages and start over."})
    seed: int = field(default=0, metadata={"help": "Seed of the simulation, the splits and training."})
    bf16: str = field(
        default="auto",
        metadata={"help": "bf16 autocast: auto (measured: on only where bf16 matmuls beat fp32, e.g. AMX CPUs), true, false."},
    )
    model_name: str = field(default="calm-base", metadata={"help": "Name of the checkpoint folder."})
    pretrain_epochs: float | None = field(default=None, metadata={"help": "Override the size's pretraining epochs."})
    num_neurons: int | None = field(default=None, metadata={"help": "Override the size's simulated neurons per session."})
    context_frames: int = field(default=40, metadata={"help": "Forecast context (frames) of the evaluation."})


class Stage:
    """A stage folder with a completion marker keyed by the stage's parameters."""

    def __init__(self, path: Path, params: dict):
        self.path = path
        self.params = params
        self.key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.marker = path / ".calm_stage.json"

    def done(self) -> bool:
        if not self.marker.exists():
            return False
        return json.loads(self.marker.read_text()).get("key") == self.key

    def finish(self, seconds: float, **info) -> None:
        self.marker.write_text(json.dumps({"key": self.key, "seconds": seconds, "params": self.params, **info}, default=str))

    def seconds(self) -> float:
        return float(json.loads(self.marker.read_text()).get("seconds", 0.0))

    def last_checkpoint(self) -> str | None:
        checkpoints = sorted(self.path.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
        return str(checkpoints[-1]) if checkpoints else None


def training_flags(output_dir: Path, epochs: float, batch: int, lr: float, seed: int, bf16: bool, resume: str | None,
                   eval_steps: bool = False) -> list[str]:
    flags = [
        "--output_dir", str(output_dir), "--num_train_epochs", str(epochs),
        "--per_device_train_batch_size", str(batch), "--per_device_eval_batch_size", str(batch),
        "--learning_rate", str(lr), "--lr_scheduler_type", "cosine", "--warmup_steps", "0.05",
        "--weight_decay", "0.01", "--seed", str(seed), "--data_seed", str(seed),
        "--logging_steps", "25", "--save_strategy", "steps", "--save_steps", "200", "--save_total_limit", "1",
        "--report_to", "none", "--use_cpu", "--dataloader_num_workers", "0", "--disable_tqdm", "False",
    ]
    if bf16:
        flags.append("--bf16")
    if resume:
        flags += ["--resume_from_checkpoint", resume]
    return flags


def run_stage(stage: Stage, name: str, fn, timings: dict) -> None:
    if stage.done():
        timings[name] = {"seconds": stage.seconds(), "reused": True}
        logger.info("[%s] reusing %s", name, stage.path)
        return
    logger.info("[%s] running -> %s", name, stage.path)
    start = time.perf_counter()
    info = fn() or {}
    seconds = time.perf_counter() - start
    stage.path.mkdir(parents=True, exist_ok=True)
    stage.finish(seconds, **info)
    timings[name] = {"seconds": seconds, "reused": False}


def main(argv: list[str] | None = None) -> dict:
    (args,) = HfArgumentParser(MainArguments).parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    configure_torch_threads()
    if args.size not in SIZES:
        raise ValueError(f"--size {args.size!r} is not one of {sorted(SIZES)}.")
    size = dict(SIZES[args.size])
    if args.pretrain_epochs is not None:
        size["pretrain_epochs"] = args.pretrain_epochs
    if args.num_neurons is not None:
        size["num_neurons"] = args.num_neurons
    from calm_hf.hardware import resolve_bf16

    args.bf16 = resolve_bf16(args.bf16)
    logger.info("bf16 autocast: %s", "on" if args.bf16 else "off (bf16 matmuls are not faster than fp32 here)")
    torch.manual_seed(args.seed)
    out = Path(args.output_dir).resolve()
    work = out / f".{args.model_name}-work"
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    timings: dict[str, dict] = {}
    total_start = time.perf_counter()

    # 1. simulate -----------------------------------------------------------------------------------------------
    sim_params = {k: size[k] for k in ("num_sessions", "num_neurons", "num_trials", "num_steps")} | {"seed": args.seed}
    trials = Stage(work / "trials", sim_params)
    run_stage(
        trials,
        "simulate",
        lambda: load_script("prepare_data").main(
            ["--output_dir", str(trials.path), "--seed", str(args.seed)]
            + [f"--{k}={v}" for k, v in sim_params.items() if k != "seed"]
        )
        and None,
        timings,
    )

    # 2. train the tokenizer --------------------------------------------------------------------------------------
    tok_params = {"after": trials.key, "bf16": args.bf16} | {k: size[k] for k in size if k.startswith("tokenizer")}
    tokenizer_stage = Stage(work / "tokenizer", tok_params)

    def train_tokenizer():
        flags = training_flags(tokenizer_stage.path, size["tokenizer_epochs"], size["tokenizer_batch"], size["tokenizer_lr"],
                               args.seed, args.bf16, tokenizer_stage.last_checkpoint())
        metrics = load_script("train_tokenizer").main(
            ["--trials_dataset", str(trials.path), "--preset", size["tokenizer_preset"],
             "--max_segments", str(size["tokenizer_segments"])] + flags
        )
        return {"metrics": metrics}

    run_stage(tokenizer_stage, "train_tokenizer", train_tokenizer, timings)

    # 3. tokenize ------------------------------------------------------------------------------------------------
    tokenized = Stage(work / "tokenized", {"after": tokenizer_stage.key})
    run_stage(
        tokenized,
        "tokenize",
        lambda: load_script("tokenize_trials").main(
            ["--tokenizer_path", str(tokenizer_stage.path), "--trials_dataset", str(trials.path),
             "--output_dir", str(tokenized.path)] + (["--bf16"] if args.bf16 else [])
        )
        and None,
        timings,
    )

    # 4. pretrain ------------------------------------------------------------------------------------------------
    pre_params = {"after": tokenized.key, "bf16": args.bf16} | {
        k: size[k] for k in ("model_preset", "pretrain_epochs", "pretrain_batch", "pretrain_lr", "max_neurons")
    }
    pretrain = Stage(work / "pretrain", pre_params)

    def run_pretrain():
        flags = training_flags(pretrain.path, size["pretrain_epochs"], size["pretrain_batch"], size["pretrain_lr"],
                               args.seed, args.bf16, pretrain.last_checkpoint())
        metrics = load_script("pretrain").main(
            ["--tokenized_dataset", str(tokenized.path), "--tokenizer_path", str(tokenizer_stage.path),
             "--preset", size["model_preset"], "--max_neurons", str(size["max_neurons"]),
             "--forecast_eval_trials", "0"] + flags
        )
        return {"metrics": metrics}

    run_stage(pretrain, "pretrain", run_pretrain, timings)

    # 5. evaluate + 6. write the checkpoint ------------------------------------------------------------------------
    start = time.perf_counter()
    from calm_hf.publish import write_release

    summary = write_release(
        pretrain_dir=pretrain.path,
        tokenized_dir=tokenized.path,
        model_dir=out / args.model_name,
        dataset_dir=out / f"{args.model_name}-dataset",
        context_frames=args.context_frames,
        eval_trials=size["eval_trials"],
        forecast_samples=size["forecast_samples"],
        bf16=args.bf16,
        run_info={
            "size": args.size,
            "seed": args.seed,
            "simulation": sim_params,
            "tokenizer_training": tok_params,
            "pretraining": pre_params,
            "stage_seconds": {k: round(v["seconds"], 1) for k, v in timings.items()},
        },
    )
    timings["evaluate_and_write"] = {"seconds": time.perf_counter() - start, "reused": False}
    total = time.perf_counter() - total_start
    summary["timings"] = timings
    summary["total_seconds"] = total
    (out / args.model_name / "run_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print_summary(summary, out / args.model_name)
    return summary


def print_summary(summary: dict, model_dir: Path) -> None:
    lines = ["", "=" * 72, f"CalM main job finished: {model_dir}", "-" * 72]
    for name, timing in summary["timings"].items():
        note = " (reused)" if timing.get("reused") else ""
        lines.append(f"  {name:<22} {timing['seconds']:8.1f} s{note}")
    stage_sum = sum(timing["seconds"] for timing in summary["timings"].values())
    lines.append(f"  {'all stages':<22} {stage_sum:8.1f} s   (this invocation: {summary['total_seconds']:.1f} s)")
    lines.append("-" * 72)
    for name, value in summary["metrics"].items():
        if isinstance(value, float):
            lines.append(f"  {name:<40} {value:.4f}")
    lines += [
        "-" * 72,
        "Try it:",
        f'  from transformers import AutoModel; AutoModel.from_pretrained("{model_dir.name}")',
        f'  from transformers import pipeline; import calm_hf; pipeline("neural-forecasting", model="{model_dir.name}")',
        "=" * 72,
    ]
    print("\n".join(lines))


if __name__ == "__main__":
    main()
