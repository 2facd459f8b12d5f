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


class BestValidationCallback(TrainerCallback):
    """Keep the trainable weights of the best evaluation, stop after `patience` evaluations without a better one, and
    put the best weights back when training ends (early stopping without checkpoints: the weights live in memory).

    Needs evaluations during training (`eval_strategy="epoch"` or `"steps"`); without them it does nothing.

    Args:
        metric (`str`): the evaluation metric, without the `eval_` prefix (e.g. `"mse"`).
        patience (`int`): evaluations without improvement before training stops.
        greater_is_better (`bool`, *optional*, defaults to `False`): whether a larger metric is better.
        record (`dict`, *optional*): filled with `best` (the best value), `best_step` and `stopped_early`.

    Example:

    ```python
    >>> from calm_hf.callbacks import BestValidationCallback
    >>> callback = BestValidationCallback("mse", patience=15)  # CalmTrainer(..., callbacks=[callback])
    ```
    """

    def __init__(self, metric: str, patience: int, greater_is_better: bool = False, record: dict | None = None):
        if int(patience) < 1:
            raise ValueError(f"patience must be a whole number of evaluations >= 1, got {patience!r}.")
        self.metric = f"eval_{metric}"
        self.patience = int(patience)
        self.sign = 1.0 if greater_is_better else -1.0
        self.record = {} if record is None else record
        self.record.update(best=None, best_step=None, stopped_early=False)
        self.best_weights: dict | None = None
        self.waited = 0

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        value = (metrics or {}).get(self.metric)
        if value is None or model is None:
            return control
        best = self.record["best"]
        if best is None or self.sign * (value - best) > 0:
            self.record.update(best=float(value), best_step=state.global_step)
            self.best_weights = {name: parameter.detach().clone() for name, parameter in model.named_parameters()
                                 if parameter.requires_grad}
            self.waited = 0
        else:
            self.waited += 1
            if self.waited >= self.patience:
                self.record["stopped_early"] = True
                control.should_training_stop = True
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self.best_weights is None or model is None:
            return
        parameters = dict(model.named_parameters())
        for name, value in self.best_weights.items():
            parameters[name].data.copy_(value)
