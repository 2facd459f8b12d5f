"""`TrainerCallback`s the commands and benchmarks pass to `CalmTrainer` (budgets are callbacks, not trainer subclasses)."""

from __future__ import annotations

import time

from transformers import TrainerCallback


class TimeBudgetCallback(TrainerCallback):
    """Stop training once `max_seconds` of wall clock have passed since training began.

    The check runs after each optimizer step, so a run stops within one step of the budget; the Trainer then saves and
    evaluates as it would at the planned end (`control.should_training_stop`).

    Args:
        max_seconds (`float`):
            Wall-clock budget of `trainer.train()` in seconds (evaluation inside training counts too).
        record (`dict`, *optional*):
            Filled as training runs: `steps` (the last global step) and `stopped_by_budget` (`True` when this callback
            ended training), so callers can report what happened.

    Example:

    ```python
    >>> from calm_hf.callbacks import TimeBudgetCallback
    >>> record = {}
    >>> callback = TimeBudgetCallback(600, record)  # CalmTrainer(..., callbacks=[callback])
    ```
    """

    def __init__(self, max_seconds: float, record: dict | None = None):
        if not max_seconds >= 0:  # 0 stops after the first step (a smoke run)
            raise ValueError(f"max_seconds must be >= 0 seconds, got {max_seconds!r}.")
        self.max_seconds = float(max_seconds)
        self.record = {} if record is None else record
        self.record.setdefault("stopped_by_budget", False)
        self.start: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.record["steps"] = state.global_step
        if self.start is not None and time.perf_counter() - self.start > self.max_seconds:
            self.record["stopped_by_budget"] = True
            control.should_training_stop = True
        return control
