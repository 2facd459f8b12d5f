"""`CalmTrainer`: the stock `Trainer`, plus logging of every loss component a CalM model returns, and the training
step's extras that are not part of any model's `forward`.

CalM's models return each loss term in its own output field (DAC style). The stock Trainer logs only `loss`; this
subclass averages the scalar components over the steps between two logging events and adds them to the log line
(`train/commitment_loss`, `train/codebook_perplexity`, ...), so training logs show what moves.

The training step of each model (its forward stays a plain forward):
- dual-axis transformer: the paper's input corruptions (scheduled sampling, neighbourhood replacement) are applied
  to the batch in `compute_loss` (`augment_training_batch`), before the forward;
- tokenizer: the codebook state (EMA, usage, revival queue, step counter, dead-code revival, k-means seeding) is
  updated after every backward by `CalmTokenizerTrainingCallback`, which `CalmTrainer` registers by itself.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any

import torch
from transformers import Trainer, TrainerCallback

from .modeling_calm import CalmForCausalNeuralModeling
from .modeling_calm_tokenizer import CalmTokenizer

logger = logging.getLogger("calm_hf.trainer")


def augment_training_batch(
    model: CalmForCausalNeuralModeling, inputs: dict[str, Any]
) -> tuple[dict[str, Any], torch.Tensor | None]:
    """The DAT's training-time input corruptions for one batch: scheduled sampling and neighbourhood replacement
    (`CalmForCausalNeuralModeling.augment_input_ids`) replace `input_ids`; `labels` stay the true codes.

    Applied only in training mode, to batches with `labels` and `input_ids`; other batches are returned unchanged.

    Args:
        model ([`CalmForCausalNeuralModeling`]): the (unwrapped) model being trained.
        inputs (`dict`): the batch as the collator gives it (`input_ids`, `labels`, `neuron_ids`, ...).

    Returns:
        `(inputs, scheduled_sampling_applied)`: a new dict, and a bool tensor `()` (None when nothing was applied).
    """
    if not model.training or inputs.get("labels") is None or inputs.get("input_ids") is None:
        return inputs, None
    input_ids, applied = model.augment_input_ids(
        inputs["input_ids"], inputs.get("neuron_ids"), inputs.get("session_ids"), inputs.get("neuron_mask")
    )
    return {**inputs, "input_ids": input_ids}, applied


# the batch fields `validate_inputs` checks
VALIDATED_INPUTS = ("input_ids", "neuron_ids", "session_ids", "neuron_mask", "labels")


class CalmTokenizerTrainingCallback(TrainerCallback):
    """Applies `CalmTokenizer.update_codebook_state` after the backward pass of every training micro-batch, before
    the optimizer step: usage and codebook EMA, revival queue, step counter, dead-code revival, k-means seeding.

    A forward hook on the tokenizer keeps each training-mode output's encoder statistics until the update, so this
    works with the stock `Trainer` too (`callbacks=[CalmTokenizerTrainingCallback()]`); `CalmTrainer` adds it by itself
    when the model is a `CalmTokenizer`.
    """

    def __init__(self) -> None:
        self._pending: list[Any] = []
        self._hook = None
        self._tokenizer: CalmTokenizer | None = None

    def _record(self, module: CalmTokenizer, args: tuple, output: Any) -> None:
        if module.training and getattr(output, "encoder_vectors", None) is not None:
            self._pending.append(output)

    def _apply(self) -> None:
        while self._pending:
            self._tokenizer.update_codebook_state(self._pending.pop(0))

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        tokenizer = getattr(model, "module", model)  # DDP wraps; the hook goes on the tokenizer itself
        if not isinstance(tokenizer, CalmTokenizer):
            raise TypeError(f"CalmTokenizerTrainingCallback trains a CalmTokenizer, got {type(tokenizer).__name__}.")
        self._tokenizer = tokenizer
        self._hook = tokenizer.register_forward_hook(self._record)

    def on_substep_end(self, args, state, control, **kwargs):
        self._apply()  # a micro-batch of gradient accumulation

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self._apply()  # the last micro-batch of the step: after its backward, before the optimizer moves the codebook

    def on_train_end(self, args, state, control, **kwargs):
        self._pending.clear()
        tokenizer = self._tokenizer
        if tokenizer is not None and tokenizer.codebook_frozen() and int(tokenizer.training_step) > 0:
            # training stopped inside the warm-up (a time budget, or max_steps below codebook_warmup_steps): the
            # codebook was never seeded, so every trace would map onto the few random codes nearest to it
            seeded = tokenizer.quantizer.initialize_from_queue(tokenizer.config.codebook_kmeans_iterations)
            logger.warning(
                "training ended at step %d, inside the %d-step codebook warm-up: %s; the decoder never trained on "
                "quantized inputs. Train longer or lower codebook_warmup_steps (`calm train-tokenizer` caps it at a "
                "quarter of the planned steps).", int(tokenizer.training_step), tokenizer.config.codebook_warmup_steps,
                "the codebook was seeded by k-means on the encoder outputs now" if seeded else
                "no encoder outputs were queued, the codebook stays random")
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class CalmTrainer(Trainer):
    """`Trainer` that logs scalar output fields (`*_loss`, perplexities, counts) next to the loss.

    Args:
        log_fields: names of output fields to log; by default every scalar field of the model output except `loss`.
        extra_evaluation: called with the model after each evaluation; the floats it returns are logged and added to
            the metrics with the evaluation prefix (e.g. the forecasting Pearson r, which needs rollouts, not logits).
        neural_tokenizer: the `CalmTokenizer` of a dual-axis transformer being trained. Every save of such a model
            (final, intermediate, and so `push_to_hub=True`) writes a complete checkpoint: `tokenizer/`, the trace
            processor, the remote-code files and `custom_pipelines` (`calm_hf.checkpoint.complete_checkpoint`).
        trace_processor: the `CalmTraceProcessor` saved with it (default: one matching the model config).
        validate_batches: check every training batch of a dual-axis transformer with `validate_inputs` (codes and
            labels inside the vocabulary, ids inside the tables, something to score) before the forward, which checks
            shapes only. One host sync per step; turn it off when the collator already validates.
        All other arguments are `Trainer`'s.
    """

    def __init__(
        self,
        *args,
        log_fields: list[str] | None = None,
        extra_evaluation=None,
        neural_tokenizer=None,
        trace_processor=None,
        validate_batches: bool = True,
        **kwargs,
    ):
        self.validate_batches = validate_batches
        self.neural_tokenizer = neural_tokenizer
        self.trace_processor = trace_processor
        super().__init__(*args, **kwargs)
        if self.args.dataloader_pin_memory and self.args.device.type == "cpu":
            # pinned memory only speeds up copies to an accelerator; on the CPU the DataLoader warns about it instead
            self.args.dataloader_pin_memory = False
        model = self.accelerator.unwrap_model(self.model)
        has_callback = any(isinstance(cb, CalmTokenizerTrainingCallback) for cb in self.callback_handler.callbacks)
        if isinstance(model, CalmTokenizer) and not has_callback:
            self.add_callback(CalmTokenizerTrainingCallback())
        self.log_fields = log_fields
        self.extra_evaluation = extra_evaluation
        self._component_sums: dict[str, float] = defaultdict(float)
        self._component_counts: dict[str, int] = defaultdict(int)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        unwrapped = self.accelerator.unwrap_model(model)
        applied = None
        if isinstance(unwrapped, CalmForCausalNeuralModeling):
            if self.validate_batches and model.training:
                unwrapped.validate_inputs(**{name: inputs.get(name) for name in VALIDATED_INPUTS})
            inputs, applied = augment_training_batch(unwrapped, inputs)
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if applied is not None:
            outputs["scheduled_sampling_applied"] = applied
        if model.training:
            for name, value in outputs.items():
                if name in ("loss", "encoder_vectors", "encoder_codes") or (
                    self.log_fields is not None and name not in self.log_fields
                ):
                    continue
                if isinstance(value, torch.Tensor) and value.numel() == 1:
                    self._component_sums[name] += float(value.detach().float())
                    self._component_counts[name] += 1
                elif isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._component_sums[name] += float(value)
                    self._component_counts[name] += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        # Only training log lines (they carry "loss"); evaluation lines carry eval_* keys instead.
        if "loss" in logs and self._component_counts:
            for name, total in self._component_sums.items():
                logs[name] = round(total / self._component_counts[name], 6)
            self._component_sums.clear()
            self._component_counts.clear()
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict[str, float]:
        metrics = super().evaluate(eval_dataset, ignore_keys=ignore_keys, metric_key_prefix=metric_key_prefix)
        if self.extra_evaluation is not None:
            was_training = self.model.training
            extra = self.extra_evaluation(self.accelerator.unwrap_model(self.model))
            self.model.train(was_training)
            extra = {f"{metric_key_prefix}_{name}": float(value) for name, value in extra.items()}
            self.log(extra)
            metrics.update(extra)
        return metrics

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if not self.args.should_save:  # other DDP ranks wrote nothing (Trainer saves on the main process only)
            return
        model = self.accelerator.unwrap_model(self.model)
        if getattr(model.config, "model_type", None) == "calm":  # the dual-axis transformer, not the tokenizer
            from .checkpoint import complete_checkpoint

            complete_checkpoint(output_dir or self.args.output_dir, tokenizer=self.neural_tokenizer,
                                processor=self.trace_processor)

    def create_model_card(self, *args, **kwargs) -> None:
        """A CalM card instead of the generic Trainer card when pushing a dual-axis transformer."""
        model = self.accelerator.unwrap_model(self.model)
        if getattr(model.config, "model_type", None) != "calm":
            return super().create_model_card(*args, **kwargs)
        import os

        from .cards import render_model_card

        config = model.config
        summary = {name: getattr(config, name) for name in ("hidden_size", "num_hidden_layers", "num_attention_heads",
                                                            "vocab_size", "window_size", "frame_rate_hz",
                                                            "neuron_attention_block", "context_token_steps")}
        metrics = {k: v for k, v in (self.state.log_history[-1] if self.state.log_history else {}).items()
                   if isinstance(v, float) and k.startswith("eval_")}
        card = render_model_card(metrics=metrics, config_summary=summary,
                                 training_summary={"global_step": self.state.global_step},
                                 repo_id=self.hub_model_id if hasattr(self, "hub_model_id") else None)
        card.save(os.path.join(self.args.output_dir, "README.md"))
