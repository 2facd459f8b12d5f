"""Input checks of the dual-axis transformer: one rule per input, each with the fix in its message.

Two kinds of rule: shape and dtype rules read no tensor values, so `forward` runs them on every call without a host
sync; value rules (codes inside the vocabulary, ids inside the tables, labels) read tensors back to the host and run
once where inputs enter (`validate_inputs`: generate, rollout, forecast_values, the forecasting pipeline, the data
collator, `CalmTrainer`, `CalmForBehaviorRegression.forward`).

Dtype problems are `TypeError`s, shape and value problems `ValueError`s.
"""

from __future__ import annotations

from typing import Any

import torch

from .configuration_calm import CalmConfig
from .identity_calm import config_identity_size


# -- shape and dtype rules (no host sync) ------------------------------------------------------------------------------


def check_integer_dtype(values: torch.Tensor, name: str) -> None:
    """Codes and ids are integers of any integer dtype (int16 is what `with_format("numpy")` gives)."""
    if values.dtype == torch.bool or values.dtype.is_floating_point or values.dtype.is_complex:
        raise TypeError(
            f"{name} must hold integers, got dtype {values.dtype}; "
            + ("tokenize traces with CalmTokenizer.encode first." if name == "input_ids" else "pass integer ids.")
        )


def as_integer_tensor(values: Any, name: str, device: torch.device | None = None) -> torch.Tensor:
    """A tensor, numpy array or nested list of integers as a long tensor (`check_integer_dtype` for the dtype)."""
    if not isinstance(values, torch.Tensor):
        try:
            values = torch.as_tensor(values)
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(
                f"{name} must be an integer tensor, numpy array or nested list of integers, got "
                f"{type(values).__name__} ({error})."
            ) from None
    check_integer_dtype(values, name)
    return values.to(device=device if device is not None else values.device, dtype=torch.long)


def check_input_ids_shape(input_ids: torch.Tensor) -> None:
    """A `(batch, neurons, token_steps)` grid of integer codes."""
    if input_ids.dim() != 3:
        raise ValueError(
            f"input_ids must be a (batch, neurons, token_steps) grid of codes, got shape {tuple(input_ids.shape)};"
            " add the missing axes (e.g. input_ids[None] for one trial)."
        )
    check_integer_dtype(input_ids, "input_ids")


def check_inputs_embeds_shape(config: CalmConfig, inputs_embeds: torch.Tensor) -> None:
    if inputs_embeds.dim() != 4 or inputs_embeds.shape[-1] != config.hidden_size:
        raise ValueError(
            f"inputs_embeds must have shape (batch, neurons, token_steps, {config.hidden_size}), got "
            f"{tuple(inputs_embeds.shape)}."
        )


def check_grid_size(config: CalmConfig, grid_shape: tuple[int, ...], past_steps: int = 0, new_steps: int = 0) -> None:
    """The grid `(batch, neurons, token_steps)` holds at least one trial, neuron and step, and the context (cached
    `past_steps` plus the grid's steps) plus `new_steps` still to generate fit in `max_token_steps`."""
    batch_size, num_neurons, num_steps = grid_shape[:3]
    if min(batch_size, num_neurons, num_steps) < 1:
        raise ValueError(
            f"The grid of shape {tuple(grid_shape[:3])} (batch, neurons, token_steps) is empty: give at least 1 token "
            "step (window_size frames) of context for at least 1 neuron and 1 trial."
        )
    context_steps = past_steps + num_steps
    if context_steps + new_steps > config.max_token_steps:
        raise ValueError(
            f"{context_steps} context steps + {new_steps} new steps exceed max_token_steps={config.max_token_steps}; "
            "crop the context (keep the most recent steps) or generate fewer new steps."
        )


def identity_inputs(
    batch_size: int,
    num_neurons: int,
    device: torch.device,
    neuron_ids: Any = None,
    session_ids: Any = None,
    neuron_mask: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Fills defaults (`neuron_ids = arange(neurons)`, `session_ids = 0`) and checks dtypes and shapes; returns
    `(neuron_ids (batch, neurons), session_ids (batch,), neuron_mask (batch, neurons) or None)` as long, long and
    bool tensors on `device`."""
    if neuron_ids is None:
        neuron_ids = torch.arange(num_neurons, device=device).expand(batch_size, num_neurons)
    neuron_ids = as_integer_tensor(neuron_ids, "neuron_ids", device)
    if neuron_ids.dim() == 1:
        neuron_ids = neuron_ids.expand(batch_size, -1)
    if neuron_ids.shape != (batch_size, num_neurons):
        raise ValueError(
            f"neuron_ids must have shape (batch, neurons) = {(batch_size, num_neurons)}, got "
            f"{tuple(neuron_ids.shape)}."
        )
    if session_ids is None:
        session_ids = torch.zeros(batch_size, dtype=torch.long, device=device)
    session_ids = as_integer_tensor(session_ids, "session_ids", device)
    if session_ids.dim() == 0:
        session_ids = session_ids.expand(batch_size)
    if session_ids.shape != (batch_size,):
        raise ValueError(f"session_ids must have shape (batch,) = ({batch_size},), got {tuple(session_ids.shape)}.")
    if neuron_mask is not None:
        neuron_mask = torch.as_tensor(neuron_mask, device=device)
        if neuron_mask.shape != (batch_size, num_neurons):
            raise ValueError(
                f"neuron_mask must have shape (batch, neurons) = {(batch_size, num_neurons)}, got "
                f"{tuple(neuron_mask.shape)}."
            )
        neuron_mask = neuron_mask.bool()
    return neuron_ids, session_ids, neuron_mask


def check_neuron_identity_shape(config: CalmConfig, neuron_identity: Any, batch_size: int, num_neurons: int,
                                device: torch.device) -> torch.Tensor | None:
    """A data-identity model takes `neuron_identity` `(batch, neurons, identity_size)` floats (None: zeros, the
    zero-shot case) and returns it as a tensor on `device`; a table model takes none (it reads `neuron_ids`)."""
    if config.neuron_identity == "table":
        if neuron_identity is not None:
            raise ValueError(
                "neuron_identity was given to a model whose identities are learned table rows "
                "(config.neuron_identity='table'): pass neuron_ids / session_ids instead, or use a data-identity model."
            )
        return None
    size = config_identity_size(config)
    if neuron_identity is None:
        return torch.zeros(batch_size, num_neurons, size, device=device)
    if not isinstance(neuron_identity, torch.Tensor):
        neuron_identity = torch.as_tensor(neuron_identity)
    if not neuron_identity.dtype.is_floating_point:
        raise TypeError(f"neuron_identity must hold floats, got dtype {neuron_identity.dtype}.")
    if neuron_identity.dim() == 2:  # one identity shared by every trial of the batch
        neuron_identity = neuron_identity.expand(batch_size, -1, -1)
    if tuple(neuron_identity.shape) != (batch_size, num_neurons, size):
        raise ValueError(
            f"neuron_identity must have shape (batch, neurons, identity_size) = {(batch_size, num_neurons, size)}, "
            f"got {tuple(neuron_identity.shape)}: compute it for these neurons with "
            "calm_hf.identity_calm.compute_neuron_identity(reference, num_neurons, "
            "**identity_settings(config))."
        )
    return neuron_identity.to(device)


# -- value rules (host syncs: once where inputs enter) -----------------------------------------------------------------


def check_code_values(config: CalmConfig, input_ids: torch.Tensor) -> None:
    """Codes lie inside the model's vocabulary (two host syncs)."""
    low, high = (int(value) for value in torch.stack([input_ids.min(), input_ids.max()]))
    if low < 0 or high >= config.vocab_size:
        raise ValueError(
            f"input_ids contain codes in [{low}, {high}]: the tokenizer codebook_size (at least {high + 1}) differs "
            f"from model vocab_size {config.vocab_size}. Use the tokenizer this model was trained with."
        )


def check_identity_values(config: CalmConfig, neuron_ids: torch.Tensor, session_ids: torch.Tensor) -> None:
    """Neuron and session ids lie inside the embedding tables."""
    if neuron_ids.numel() and (int(neuron_ids.min()) < 0 or int(neuron_ids.max()) >= config.num_neurons):
        raise ValueError(
            f"neuron_ids range over [{int(neuron_ids.min())}, {int(neuron_ids.max())}] but the model has "
            f"num_neurons={config.num_neurons}; for a new session call model.add_session(name, num_neurons) "
            "or resize_neuron_embeddings(...)."
        )
    if session_ids.numel() and (int(session_ids.min()) < 0 or int(session_ids.max()) >= config.num_sessions):
        raise ValueError(
            f"Unknown session id {session_ids.tolist()}: the model has num_sessions={config.num_sessions} "
            f"(names: {config.session_names}); add the session with model.add_session(name, num_neurons)."
        )


def check_real_neurons(neuron_mask: torch.Tensor | None) -> None:
    """Every trial has at least one real neuron (one host sync): a trial whose neurons are all padding has nothing to
    generate or forecast from, and `forward` would quietly return codes for it."""
    if neuron_mask is None:
        return
    empty = torch.nonzero(~neuron_mask.any(dim=1)).flatten().tolist()
    if empty:
        raise ValueError(
            f"neuron_mask is False for every neuron of trial(s) {empty[:5]}: each trial needs at least one real neuron "
            "(True = real, False = padding). Drop those trials, or pass neuron_mask=None when nothing is padded."
        )


def check_unique_neuron_ids(neuron_ids: torch.Tensor, neuron_mask: torch.Tensor | None) -> None:
    """The real neurons of a trial have distinct ids (one host sync): the same table row twice is the same neuron
    recorded twice, so one of them borrows another neuron's identity. Padded neurons may share ids."""
    if neuron_ids.shape[1] < 2:
        return
    ids = neuron_ids.clone()
    if neuron_mask is not None:  # padding gets distinct negative ids, never equal to a real one
        padding = -1 - torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        ids = torch.where(neuron_mask, ids, padding)
    ordered = ids.sort(dim=1).values
    repeated = (ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)
    found = torch.nonzero(repeated)
    if found.numel():
        trial, position = found[0].tolist()
        raise ValueError(
            f"neuron_ids of trial {trial} repeat id {int(ordered[trial, position + 1])}: each real neuron needs its own "
            "id (its row of the neuron table). Give every neuron of a recording a distinct id, e.g. "
            "config.session_neuron_ids(session), or mark repeated padding with neuron_mask=False."
        )


def check_label_values(config: CalmConfig, labels: Any, neuron_mask: torch.Tensor | None) -> None:
    """Next-token targets are codes or -100, and at least one is scored after the one-step shift: an out-of-vocabulary
    target is an IndexError (or a device assert) inside cross_entropy, and a batch of -100 trains nothing."""
    labels = torch.as_tensor(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool or labels.dtype.is_complex:
        raise TypeError(f"labels must hold integer codes (or -100 to ignore), got dtype {labels.dtype}.")
    if neuron_mask is not None and labels.dim() == 3:
        labels = labels.masked_fill(~neuron_mask.to(labels.device).bool()[:, :, None], -100)
    shift_labels = labels[..., 1:]
    scored = shift_labels != -100
    out_of_vocab = scored & ((shift_labels < 0) | (shift_labels >= config.vocab_size))
    num_scored, num_bad = torch.stack([scored.sum(), out_of_vocab.sum()]).tolist()
    if num_bad:
        bad = shift_labels[out_of_vocab]
        raise ValueError(
            f"labels hold {num_bad} code(s) outside [0, {config.vocab_size}) and not -100 (e.g. {int(bad[0])}): use "
            "codes from the tokenizer this model was built for, and -100 for targets to ignore."
        )
    if num_scored == 0:
        raise ValueError(
            "Every label is -100 (or masked by neuron_mask) after the one-step shift, so nothing would be trained: "
            "give at least 2 token steps and at least one real neuron with real labels."
        )


def validate_inputs(
    config: CalmConfig,
    input_ids: Any = None,
    neuron_ids: Any = None,
    session_ids: Any = None,
    neuron_mask: Any = None,
    labels: Any = None,
    new_steps: int = 0,
    neuron_identity: Any = None,
) -> torch.Tensor | None:
    r"""
    Checks a batch for a CalM model once, where it enters, with every rule of this module.

    Args:
        config ([`CalmConfig`]): the model's config.
        input_ids (`torch.LongTensor` of shape `(batch, neurons, token_steps)`, *optional*): codes (a tensor, numpy
            array or nested list of any integer dtype).
        neuron_ids (`torch.LongTensor` of shape `(batch, neurons)` or `(neurons,)`, *optional*): global neuron ids,
            distinct among a trial's real neurons (table models).
        session_ids (`torch.LongTensor` of shape `(batch,)` or `()`, *optional*): session ids.
        neuron_mask (`torch.BoolTensor` of shape `(batch, neurons)`, *optional*): False marks padded neurons; every
            trial keeps at least one real neuron.
        labels (`torch.LongTensor` of shape `(batch, neurons, token_steps)`, *optional*): next-token targets.
        new_steps (`int`, *optional*, defaults to 0): token steps the caller will generate after the context.
        neuron_identity (`torch.FloatTensor` of shape `(batch, neurons, identity_size)`, *optional*): the data
            identity of a `neuron_identity="data"` model (shape and finiteness are checked).

    Returns:
        `input_ids` as a long tensor (None when not given).

    Raises:
        `TypeError` for a wrong dtype, `ValueError` for a wrong shape or value, each naming the problem and the fix.
    """
    if input_ids is not None:
        input_ids = as_integer_tensor(input_ids, "input_ids")
        check_input_ids_shape(input_ids)
        check_grid_size(config, input_ids.shape, new_steps=new_steps)
        check_code_values(config, input_ids)
        batch_size, num_neurons, _ = input_ids.shape
        neuron_ids, session_ids, neuron_mask = identity_inputs(
            batch_size, num_neurons, input_ids.device, neuron_ids, session_ids, neuron_mask
        )
        check_real_neurons(neuron_mask)
        if config.neuron_identity == "table":
            check_identity_values(config, neuron_ids, session_ids)
            check_unique_neuron_ids(neuron_ids, neuron_mask)
        identity = check_neuron_identity_shape(config, neuron_identity, batch_size, num_neurons, input_ids.device)
        if identity is not None and not bool(torch.isfinite(identity).all()):
            raise ValueError("neuron_identity holds NaN/Inf: compute it from finite reference traces.")
    if labels is not None:
        if input_ids is not None and tuple(torch.as_tensor(labels).shape) != tuple(input_ids.shape):
            raise ValueError(
                f"labels must have the shape of input_ids {tuple(input_ids.shape)}, got "
                f"{tuple(torch.as_tensor(labels).shape)}."
            )
        check_label_values(config, labels, neuron_mask)
    return input_ids


__all__ = ["validate_inputs"]
