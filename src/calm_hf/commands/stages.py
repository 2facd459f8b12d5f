"""Stage machinery of the main job (and the benchmarks): folders keyed by their parameters, reused when finished,
resumed from the last complete Trainer checkpoint, written atomically, cleaned up on SIGTERM.

A stage is finished when its folder holds a `.calm_stage.json` with the same key (a hash of every parameter that
shapes its output: its command line minus path flags, and the keys of the stages it reads).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import shutil
import signal
import threading
import time
from pathlib import Path

import torch

from ..atomic import STAGE_OWNER, atomic_write_text, fsync_tree, mark_output, partial_path, replace_folder

logger = logging.getLogger("calm_hf.main")

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
      removed with its Trainer checkpoints, so a changed run never resumes another run's checkpoints. The folder is
      marked as reserved for the stage (`calm_hf.atomic.STAGE_OWNER`), so the command it runs writes there.
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
        mark_output(self.path, STAGE_OWNER)

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


def run_stage(stage: Stage, name: str, fn, timings: dict) -> None:
    if stage.done():
        timings[name] = {"seconds": stage.seconds(), "reused": True}
        logger.info("[%s] reusing %s (key %s)", name, stage.path, stage.key)
        return
    raise_if_terminated()
    logger.info("[%s] running -> %s (key %s)", name, stage.path, stage.key)
    stage.start()
    start = time.perf_counter()
    try:
        info = fn() or {}
        raise_if_terminated()  # a SIGTERM whose exception a library swallowed still stops the job here
    except BaseException:
        if stage.atomic:  # never leave a half-written staging folder behind
            shutil.rmtree(stage.output, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    stage.finish(seconds, **info)
    timings[name] = {"seconds": seconds, "reused": False}


class _Terminated(SystemExit):
    """Raised by the SIGTERM handler so `finally`/cleanup code runs (the default action kills without it)."""


_received_signals: list[int] = []


def raise_if_terminated() -> None:
    """Raise again for a SIGTERM received earlier. The handler's exception can be lost where it lands in code that
    ignores exceptions (a `__del__`, a weakref callback, a library's broad `except`); stages check between steps."""
    if _received_signals:
        raise _Terminated(128 + _received_signals[-1])


@contextlib.contextmanager
def terminate_cleanly():
    """Turn SIGTERM into an exception for the duration of the job, so staging folders are removed on the way out."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        _received_signals.append(signum)
        raise _Terminated(128 + signum)

    _received_signals.clear()
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
        raise_if_terminated()
    finally:
        signal.signal(signal.SIGTERM, previous)
        _received_signals.clear()
