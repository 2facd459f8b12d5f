#!/usr/bin/env python
"""The main job: from nothing to a pretrained `calm-base/` checkpoint with a model card, on the simulated corpus.

    calm main                       # or: python training/run_all.py
    calm main --fresh               # start over instead of reusing finished stages
    calm main --size tiny --output_dir /tmp/x   # seconds-long smoke version (tests use it)

Stages: simulate -> train tokenizer -> tokenize to `datasets` -> pretrain the dual-axis transformer -> evaluate
forecasting on held-out trials -> write `calm-base/` (DAT weights, `tokenizer/`, generation config, remote-code
files, model card with this run's numbers, forecast figure) and `calm-base-dataset/` (tokenized trials + card).

Re-running reuses every finished stage (a stage is finished when its folder holds a `.calm_stage.json` written with
the same parameters: its script's whole command line and the keys of the stages it reads) and resumes an interrupted
training stage from its last *complete* Trainer checkpoint of the same parameters (a stage folder written with other
parameters is removed with its checkpoints first). Data stages and the release folders are written to `.partial` and
renamed into place; markers are written atomically; SIGTERM stops the job cleanly and stale `.partial` folders are
removed on the next run.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import HfArgumentParser

from calm_hf.atomic import atomic_write_text, fsync_tree, partial_path, remove_stale_partials, replace_folder
from calm_hf.hardware import configure_torch_threads
from calm_hf.cli import load_training_script as load_script

logger = logging.getLogger("calm_hf.main")

# Sizes of the main job. "cpu" is the default run (<= 15 minutes on 2 cores); "tiny" is the smoke run of the tests.
SIZES = {
    # The tokenizer trains on whole trials (tokenizer_segment_frames = num_steps): it is used on whole trials, and
    # one trained on 48-frame segments reconstructed the ends of 100-frame trials 6-9x worse than their middle.
    # Pretraining sees a random 64 of a trial's neurons: at equal wall-clock that trains 3.6x more steps than whole
    # populations and forecast better (validation r 0.399 vs 0.346 in benchmarks/results/dat_ablations.md), while the
    # trial-swap probe shows the neuron mixer still learns population coupling.
    "cpu": dict(
        num_sessions=3, num_neurons=200, num_trials=400, num_steps=100,
        tokenizer_preset="cpu", tokenizer_epochs=1.0, tokenizer_batch=128, tokenizer_lr=2e-3, tokenizer_segments=100_000,
        tokenizer_segment_frames=100,
        model_preset="cpu", pretrain_epochs=6.0, pretrain_batch=4, pretrain_lr=3e-3, max_neurons=64,
        eval_trials=None, forecast_samples=16,
    ),
    "tiny": dict(
        num_sessions=2, num_neurons=12, num_trials=20, num_steps=60,
        tokenizer_preset="tiny", tokenizer_epochs=1.0, tokenizer_batch=64, tokenizer_lr=3e-3, tokenizer_segments=2_000,
        tokenizer_segment_frames=60,
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


MARKER = ".calm_stage.json"
KEY_FILE = ".calm_stage_key"
# flags naming where things are (not what they are): the upstream stages' keys already identify their content
PATH_FLAGS = ("--output_dir", "--resume_from_checkpoint", "--trials_dataset", "--tokenizer_path", "--tokenized_dataset")


def stage_argv(argv: list[str]) -> list[str]:
    """A stage script's command line without its path flags: the part of the key that says what the stage does."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item in PATH_FLAGS:
            skip = True
        else:
            kept.append(item)
    return kept


def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a Trainer checkpoint cannot be resumed from (None when it is complete): a run killed while saving leaves
    folders without trainer_state.json or with truncated weights, which would make every later resume fail."""
    state = checkpoint / "trainer_state.json"
    if not state.is_file():
        return "no trainer_state.json"
    try:
        json.loads(state.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
        return f"unreadable trainer_state.json ({error})"
    weights = checkpoint / "model.safetensors"
    if not weights.is_file():
        return "no model.safetensors"
    try:
        from safetensors.torch import load_file

        load_file(str(weights))
    except Exception as error:  # safetensors raises its own error type for truncated/garbled files
        return f"unreadable model.safetensors ({type(error).__name__}: {error})"
    for name in ("optimizer.pt", "scheduler.pt"):
        if not (checkpoint / name).is_file():
            return f"no {name}"
        try:
            torch.load(checkpoint / name, map_location="cpu", weights_only=True)
        except Exception as error:
            return f"unreadable {name} ({type(error).__name__})"
    return None


class Stage:
    """A stage folder whose reuse is keyed by every parameter that shapes its output.

    - `done()`: the folder holds a `.calm_stage.json` with this key (an unreadable marker counts as not done).
    - `start()`: before running, a folder left by a run with *other* parameters (its `.calm_stage_key` differs) is
      removed with its Trainer checkpoints, so a changed run never resumes another run's checkpoints.
    - `atomic=True` stages write into `<folder>.partial`, which is renamed into place only when complete.
    - Markers and key files are written atomically (`.partial` + fsync + rename).
    """

    def __init__(self, path: Path, params: dict, atomic: bool = False):
        self.path = path
        self.params = params
        self.atomic = atomic
        self.key = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
        self.marker = path / MARKER

    @property
    def output(self) -> Path:
        """Where the stage's script writes: the staging folder of an atomic stage, else the stage folder."""
        return partial_path(self.path) if self.atomic else self.path

    def _read_marker(self) -> dict | None:
        try:
            marker = json.loads(self.marker.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError, OSError) as error:
            logger.warning("%s is unreadable (%s): running the stage again", self.marker, error)
            return None
        return marker if isinstance(marker, dict) else None

    def done(self) -> bool:
        marker = self._read_marker()
        return marker is not None and marker.get("key") == self.key

    def start(self) -> None:
        if self.atomic:
            shutil.rmtree(self.output, ignore_errors=True)
            return
        key_file = self.path / KEY_FILE
        owner = key_file.read_text().strip() if key_file.is_file() else None
        if self.path.exists() and owner != self.key:
            logger.info("%s was written with other parameters (key %s, now %s): removing it and its checkpoints",
                        self.path, owner, self.key)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write_text(key_file, self.key)

    def finish(self, seconds: float, **info) -> None:
        marker = json.dumps({"key": self.key, "seconds": seconds, "params": self.params, **info}, default=str)
        if self.atomic:
            self.output.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.output / MARKER, marker)
            fsync_tree(self.output)
            replace_folder(self.output, self.path)
        else:
            atomic_write_text(self.marker, marker)

    def seconds(self) -> float:
        marker = self._read_marker() or {}
        return float(marker.get("seconds", 0.0))

    def last_checkpoint(self) -> str | None:
        """The newest complete Trainer checkpoint of this stage's run; incomplete ones are logged and removed."""
        checkpoints = sorted(
            (p for p in self.path.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
            key=lambda p: int(p.name.split("-")[-1]),
            reverse=True,
        )
        for checkpoint in checkpoints:
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                logger.info("resuming from %s", checkpoint)
                return str(checkpoint)
            logger.warning("skipping incomplete checkpoint %s (%s): removing it", checkpoint, problem)
            shutil.rmtree(checkpoint, ignore_errors=True)
        return None


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
        logger.info("[%s] reusing %s (key %s)", name, stage.path, stage.key)
        return
    logger.info("[%s] running -> %s (key %s)", name, stage.path, stage.key)
    stage.start()
    start = time.perf_counter()
    try:
        info = fn() or {}
    except BaseException:
        if stage.atomic:  # never leave a half-written staging folder behind
            shutil.rmtree(stage.output, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    stage.finish(seconds, **info)
    timings[name] = {"seconds": seconds, "reused": False}


class _Terminated(SystemExit):
    """Raised by the SIGTERM handler so `finally`/cleanup code runs (the default action kills without it)."""


@contextlib.contextmanager
def terminate_cleanly():
    """Turn SIGTERM into an exception for the duration of the job, so staging folders are removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise _Terminated(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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
    # staging folders/files of a killed run are never read: remove them (the job's own names only)
    remove_stale_partials(work, max_depth=3)
    for stale in (partial_path(out / args.model_name), partial_path(out / f"{args.model_name}-dataset"),
                  partial_path(out / f"{args.model_name}.old"), partial_path(out / f"{args.model_name}-dataset.old")):
        if stale.exists():
            logger.info("removing %s left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)
    with terminate_cleanly():
        return run_job(args, size, out, work)


def run_job(args: MainArguments, size: dict, out: Path, work: Path) -> dict:
    timings: dict[str, dict] = {}
    total_start = time.perf_counter()

    # Every stage's key covers all it depends on: the command line of its script (minus paths) and the keys of the
    # stages it reads, so a change anywhere (seed, sizes, dtype, schedule) re-runs it and everything downstream.
    # 1. simulate -----------------------------------------------------------------------------------------------
    sim_params = {k: size[k] for k in ("num_sessions", "num_neurons", "num_trials", "num_steps")} | {"seed": args.seed}
    sim_argv = ["--seed", str(args.seed)] + [f"--{k}={v}" for k, v in sim_params.items() if k != "seed"]
    trials = Stage(work / "trials", {"argv": sim_argv}, atomic=True)
    run_stage(
        trials,
        "simulate",
        lambda: load_script("prepare_data").main(["--output_dir", str(trials.output)] + sim_argv) and None,
        timings,
    )

    # 2. train the tokenizer --------------------------------------------------------------------------------------
    tokenizer_stage_path = work / "tokenizer"
    tok_argv = ["--trials_dataset", str(trials.path), "--preset", size["tokenizer_preset"],
                "--max_segments", str(size["tokenizer_segments"]),
                "--segment_frames", str(size["tokenizer_segment_frames"])] + training_flags(
        tokenizer_stage_path, size["tokenizer_epochs"], size["tokenizer_batch"], size["tokenizer_lr"], args.seed,
        args.bf16, None)
    tok_params = {"after": [trials.key], "argv": stage_argv(tok_argv)}
    tokenizer_stage = Stage(tokenizer_stage_path, tok_params)

    def train_tokenizer():
        resume = tokenizer_stage.last_checkpoint()
        metrics = load_script("train_tokenizer").main(tok_argv + (["--resume_from_checkpoint", resume] if resume else []))
        return {"metrics": metrics}

    run_stage(tokenizer_stage, "train_tokenizer", train_tokenizer, timings)

    # 3. tokenize ------------------------------------------------------------------------------------------------
    tokenize_argv = ["--tokenizer_path", str(tokenizer_stage.path), "--trials_dataset", str(trials.path)] + (
        ["--bf16"] if args.bf16 else [])
    tokenized = Stage(work / "tokenized", {"after": [trials.key, tokenizer_stage.key], "argv": stage_argv(tokenize_argv)},
                      atomic=True)
    run_stage(
        tokenized,
        "tokenize",
        lambda: load_script("tokenize_trials").main(tokenize_argv + ["--output_dir", str(tokenized.output)]) and None,
        timings,
    )

    # 4. pretrain ------------------------------------------------------------------------------------------------
    pretrain_path = work / "pretrain"
    pre_argv = ["--tokenized_dataset", str(tokenized.path), "--tokenizer_path", str(tokenizer_stage.path),
                "--preset", size["model_preset"], "--max_neurons", str(size["max_neurons"]),
                "--forecast_eval_trials", "0"] + training_flags(
        pretrain_path, size["pretrain_epochs"], size["pretrain_batch"], size["pretrain_lr"], args.seed, args.bf16, None)
    pre_params = {"after": [tokenizer_stage.key, tokenized.key], "argv": stage_argv(pre_argv)}
    pretrain = Stage(pretrain_path, pre_params)

    def run_pretrain():
        resume = pretrain.last_checkpoint()
        metrics = load_script("pretrain").main(pre_argv + (["--resume_from_checkpoint", resume] if resume else []))
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
    atomic_write_text(out / args.model_name / "run_summary.json", json.dumps(summary, indent=2, default=str))
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
