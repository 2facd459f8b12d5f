"""Collators turning dataset rows into model batches (usable as `Trainer(data_collator=...)`).

Rows may hold numpy arrays, torch tensors or nested lists; `dataset.with_format("numpy")` is the fastest input.
Random neuron subsets are a pure function of (seed, epoch, batch content): `numpy.random.default_rng([seed, epoch,
crc32 of the batch])`. Shuffling makes every epoch's batches (and so their subsets) new, `set_epoch` (called by
`CollatorEpochCallback` under Trainer) separates epochs, and nothing depends on how many batches were collated before —
so a run resumed from a checkpoint mid-epoch draws exactly the subsets of an uninterrupted run. (A call counter
restarts at zero on resume, and a draw from torch's RNG happens before Trainer restores its RNG state.)
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import numpy as np
import torch
from transformers import TrainerCallback


def _as_array(value: Any, name: str, ndim: int) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    array = np.asarray(value)
    if array.dtype == object:
        array = np.stack([np.asarray(row) for row in value]) if len(value) else array
    if array.ndim != ndim:
        raise ValueError(f"Row field '{name}' must have rank {ndim}, got shape {array.shape}.")
    return array


def _batch_key(features: list[dict[str, Any]]) -> int:
    """crc32 of the batch's arrays: the same rows in the same order give the same key."""
    key = 0
    for row in features:
        for name in ("input_ids", "input_values", "neuron_ids", "session_id", "trial_index"):
            if row.get(name) is not None:
                value = row[name]
                value = value.detach().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
                key = zlib.crc32(np.ascontiguousarray(value).tobytes(), key)
    return key


class _NeuronSampler:
    def __init__(self, max_neurons: int | None, seed: int):
        if max_neurons is not None and int(max_neurons) < 1:
            raise ValueError(f"max_neurons must be a positive number or None, got {max_neurons}.")
        self.max_neurons = None if max_neurons is None else int(max_neurons)
        self.seed = int(seed)
        self.epoch = 0

    def next_rng(self, features: list[dict[str, Any]]) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, _batch_key(features)])

    @staticmethod
    def subset(rng: np.random.Generator, num_neurons: int, keep: int) -> np.ndarray:
        """Sorted random subset of `keep` out of `num_neurons` indices (all of them when keep >= num_neurons)."""
        if keep >= num_neurons:
            return np.arange(num_neurons)
        return np.sort(rng.choice(num_neurons, size=keep, replace=False))



def _pad_neurons(rows: list[np.ndarray], shape: tuple[int, int], mismatch: str) -> torch.Tensor:
    """Rows `(neurons_i, width)` zero-padded into `(batch, neurons, width)` (`shape` = (batch, neurons)); rows of
    different widths are refused with `mismatch` (formatted with the widths seen)."""
    widths = {row.shape[1] for row in rows}
    if len(widths) != 1:
        raise ValueError(mismatch.format(sorted(widths)))
    padded = torch.zeros(*shape, widths.pop())
    for i, row in enumerate(rows):
        padded[i, : row.shape[0]] = torch.from_numpy(row)
    return padded

class CalmDataCollator:
    """Pad rows of token grids with different neuron counts into one batch for the dual-axis transformer.

    Each row needs `input_ids` `(neurons, token_steps)`; optional `neuron_ids` `(neurons,)` (default
    `0..neurons-1`), `session_id` (default 0) and `behavior` `(channels, frames)`. Token steps must be equal
    across rows (and behaviour shapes too).

    Args:
        max_neurons (`int`, *optional*): rows with more neurons keep a random subset of this many (sorted, with
            their ids); reproducible from `seed` and the call counter.
        seed (`int`, *optional*, defaults to 0): seed of the neuron subsets.
        label_pad (`int`, *optional*, defaults to -100): label at padded neurons (ignored by the loss).
        with_values (`bool`, *optional*, defaults to `False`): also batch the rows' z-scored `input_values`
            `(neurons, frames)` as `value_labels` (same neuron subset, zero at padded neurons), the targets of the
            continuous forecast head (`CalmConfig.value_head_steps > 0`).
        crop_to_shortest (`bool`, *optional*, defaults to `False`): rows of different lengths keep their first
            `min` token steps instead of being refused (a corpus stream moving from one shard to the next).
        window_size (`int`, *optional*, defaults to 4): frames per token step, to crop `input_values` alike.

    Rows may also carry `neuron_identity` `(neurons, features)` (the data identity of a `CalmConfig` with
    `neuron_identity="data"`): it is cut to the same neuron subset and zero-padded.

    Returns (on call) a dict of tensors:
        `input_ids` long `(batch, max_neurons_in_batch, token_steps)` (padding 0), `labels` the same with
        `label_pad` at padded neurons (the model shifts them), `neuron_ids` long `(batch, neurons)` (padding 0),
        `neuron_mask` bool `(batch, neurons)` (True = real), `session_ids` long `(batch,)`, and
        `behavior_labels` float `(batch, channels, frames)` when rows carry `behavior`, `value_labels` float
        `(batch, neurons, frames)` with `with_values=True`, and `neuron_identity` float `(batch, neurons, features)`
        when rows carry it.
    """

    def __init__(self, max_neurons: int | None = None, seed: int = 0, label_pad: int = -100, with_values: bool = False,
                 crop_to_shortest: bool = False, window_size: int = 4):
        self.sampler = _NeuronSampler(max_neurons, seed)
        self.label_pad = int(label_pad)
        self.with_values = bool(with_values)
        self.crop_to_shortest = bool(crop_to_shortest)
        self.window_size = int(window_size)

    @property
    def max_neurons(self) -> int | None:
        return self.sampler.max_neurons

    def set_epoch(self, epoch: int) -> None:
        """Draw new neuron subsets in a new epoch (Trainer: `CollatorEpochCallback`)."""
        self.sampler.epoch = int(epoch)

    def _row(self, row: dict[str, Any], rng) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None]:
        """One row's (codes `(neurons, steps)`, neuron ids `(neurons,)`, traces `(neurons, frames)` or None, data
        identity `(neurons, features)` or None), checked and cut to the neuron subset."""
        if "input_ids" not in row:
            raise ValueError(
                f"Rows need 'input_ids' (neurons, token_steps); got keys {sorted(row)}. Tokenize the dataset "
                "first with calm_hf.data.tokenize_dataset."
            )
        grid = _as_array(row["input_ids"], "input_ids", 2).astype(np.int64)
        neuron_ids = row.get("neuron_ids")
        neuron_ids = (
            np.arange(grid.shape[0]) if neuron_ids is None else _as_array(neuron_ids, "neuron_ids", 1).astype(np.int64)
        )
        if neuron_ids.shape[0] != grid.shape[0]:
            raise ValueError(
                f"Row has {grid.shape[0]} neurons in input_ids but {neuron_ids.shape[0]} neuron_ids; they must match."
            )
        trace = None
        if self.with_values:
            if row.get("input_values") is None:
                raise ValueError(
                    "with_values=True needs rows with 'input_values' (neurons, frames): keep that column of the "
                    "tokenized dataset (it holds the z-scored traces the codes were made from)."
                )
            trace = _as_array(row["input_values"], "input_values", 2).astype(np.float32)
            if trace.shape[0] != grid.shape[0] or trace.shape[1] < grid.shape[1]:
                raise ValueError(
                    f"input_values {trace.shape} do not match input_ids {grid.shape}: expected (neurons, "
                    "token_steps * window_size) frames of the same trial."
                )
        identity = None
        if row.get("neuron_identity") is not None:
            identity = _as_array(row["neuron_identity"], "neuron_identity", 2).astype(np.float32)
            if identity.shape[0] != grid.shape[0]:
                raise ValueError(f"Row has {grid.shape[0]} neurons in input_ids but neuron_identity for "
                                 f"{identity.shape[0]}; compute the identity for the row's neurons.")
        if self.max_neurons is not None and grid.shape[0] > self.max_neurons:
            keep = self.sampler.subset(rng, grid.shape[0], self.max_neurons)
            grid, neuron_ids = grid[keep], neuron_ids[keep]
            trace = None if trace is None else trace[keep]
            identity = None if identity is None else identity[keep]
        return grid, neuron_ids, trace, identity

    def _common_length(self, grids: list[np.ndarray], values: list[np.ndarray]) -> tuple[list, list]:
        """With `crop_to_shortest`, rows of different lengths (a stream crossing from one shard to the next) keep
        their first `min` token steps (and frames); otherwise they are returned as they are."""
        steps = {grid.shape[1] for grid in grids}
        if not self.crop_to_shortest or len(steps) == 1:
            return grids, values
        shortest = min(steps)
        grids = [grid[:, :shortest] for grid in grids]
        values = [trace[:, : self.window_size * shortest] for trace in values]
        return grids, values

    def _pad(self, grids: list[np.ndarray], ids: list[np.ndarray], sessions: list[int]) -> dict[str, torch.Tensor]:
        """Codes, labels, neuron ids and the neuron mask padded to the batch's largest population."""
        steps = {grid.shape[1] for grid in grids}
        if len(steps) != 1:
            raise ValueError(
                f"Rows have different numbers of token steps {sorted(steps)}; crop trials to a common length "
                "before batching."
            )
        batch_size, num_steps = len(grids), steps.pop()
        max_neurons = max(grid.shape[0] for grid in grids)
        input_ids = torch.zeros(batch_size, max_neurons, num_steps, dtype=torch.long)
        labels = torch.full((batch_size, max_neurons, num_steps), self.label_pad, dtype=torch.long)
        neuron_ids = torch.zeros(batch_size, max_neurons, dtype=torch.long)
        neuron_mask = torch.zeros(batch_size, max_neurons, dtype=torch.bool)
        for i, (grid, row_ids) in enumerate(zip(grids, ids)):
            n = grid.shape[0]
            input_ids[i, :n] = torch.from_numpy(grid)
            labels[i, :n] = input_ids[i, :n]
            neuron_ids[i, :n] = torch.from_numpy(row_ids)
            neuron_mask[i, :n] = True
        return {"input_ids": input_ids, "labels": labels, "neuron_ids": neuron_ids, "neuron_mask": neuron_mask,
                "session_ids": torch.tensor(sessions, dtype=torch.long)}

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("CalmDataCollator got an empty list of rows.")
        rng = self.sampler.next_rng(features)
        grids, ids, sessions, behaviors, values, identities = [], [], [], [], [], []
        for row in features:
            grid, neuron_ids, trace, identity = self._row(row, rng)
            if trace is not None:
                values.append(trace)
            if identity is not None:
                identities.append(identity)
            grids.append(grid)
            ids.append(neuron_ids)
            session = row.get("session_id", 0)
            sessions.append(int(np.asarray(session.item() if isinstance(session, torch.Tensor) else session)))
            if row.get("behavior") is not None:
                behaviors.append(_as_array(row["behavior"], "behavior", 2).astype(np.float32))
        if behaviors and len(behaviors) != len(features):
            raise ValueError("Some rows carry 'behavior' and others do not; batch rows of one kind only.")
        if identities and len(identities) != len(features):
            raise ValueError("Some rows carry 'neuron_identity' and others do not; batch rows of one kind only.")
        grids, values = self._common_length(grids, values)
        batch = self._pad(grids, ids, sessions)
        if identities:
            batch["neuron_identity"] = _pad_neurons(identities, batch["neuron_mask"].shape,
                                                    "Rows have neuron_identity of different widths {}.")
        if values:
            batch["value_labels"] = _pad_neurons(
                values, batch["neuron_mask"].shape,
                "Rows have input_values of different lengths {}; crop trials first.")
        if behaviors:
            shapes = {b.shape for b in behaviors}
            if len(shapes) != 1:
                raise ValueError(f"Rows have behaviour of different shapes {sorted(shapes)}; they must match.")
            batch["behavior_labels"] = torch.from_numpy(np.stack(behaviors))
        return batch


class TraceCollator:
    """Batch raw (z-scored) traces for tokenizer training.

    Rows need `input_values` `(neurons, frames)`. Every row keeps `n` randomly chosen neurons, `n = min(max_neurons,
    fewest neurons of any row in the batch)` (the tokenizer treats neurons independently, so no padding is needed),
    and, with `crop_frames`, a random window of `crop_frames` rounded down to a multiple of `window_size` frames
    (each row its own start). Without `crop_frames` the frames are cropped to a multiple of `window_size`.

    Args:
        max_neurons (`int`, *optional*): neurons kept per row.
        crop_frames (`int`, *optional*): length of the random crop (rounded down to a multiple of `window_size`).
        seed (`int`, *optional*, defaults to 0): seed of the subsets and crops (plus the call counter).
        window_size (`int`, *optional*, defaults to 4): tokenizer window L.

    Returns (on call): `{"input_values": float32 tensor (batch, n, frames')}`.
    """

    def __init__(
        self, max_neurons: int | None = None, crop_frames: int | None = None, seed: int = 0, window_size: int = 4
    ):
        self.sampler = _NeuronSampler(max_neurons, seed)
        self.window_size = int(window_size)
        if self.window_size < 1:
            raise ValueError(f"window_size must be >= 1, got {window_size}.")
        if crop_frames is not None:
            crop_frames = int(crop_frames) - int(crop_frames) % self.window_size
            if crop_frames < self.window_size:
                raise ValueError(
                    f"crop_frames must be at least one window of {self.window_size} frames, got {crop_frames}."
                )
        self.crop_frames = crop_frames

    def set_epoch(self, epoch: int) -> None:
        """Draw new subsets and crops in a new epoch (Trainer: `CollatorEpochCallback`)."""
        self.sampler.epoch = int(epoch)

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("TraceCollator got an empty list of rows.")
        rng = self.sampler.next_rng(features)
        traces = []
        for row in features:
            if "input_values" not in row:
                raise ValueError(f"Rows need 'input_values' (neurons, frames); got keys {sorted(row)}.")
            traces.append(_as_array(row["input_values"], "input_values", 2).astype(np.float32))
        frames = {trace.shape[1] for trace in traces}
        if len(frames) != 1:
            raise ValueError(f"Rows have different numbers of frames {sorted(frames)}; crop trials to a common length.")
        num_frames = frames.pop()
        length = num_frames - num_frames % self.window_size if self.crop_frames is None else self.crop_frames
        if length > num_frames or length < self.window_size:
            raise ValueError(
                f"Cannot take {length} frames from trials of {num_frames} frames; lower crop_frames "
                f"(multiple of {self.window_size})."
            )
        keep = min(trace.shape[0] for trace in traces)
        if self.sampler.max_neurons is not None:
            keep = min(keep, self.sampler.max_neurons)
        batch = np.empty((len(traces), keep, length), dtype=np.float32)
        for i, trace in enumerate(traces):
            neurons = self.sampler.subset(rng, trace.shape[0], keep)
            start = 0 if self.crop_frames is None else int(rng.integers(0, num_frames - length + 1))
            batch[i] = trace[neurons, start : start + length]
        return {"input_values": torch.from_numpy(batch)}


class CollatorEpochCallback(TrainerCallback):
    """Tells a collator with `set_epoch` which epoch Trainer is in (also right after resuming)."""

    def __init__(self, collator):
        self.collator = collator

    def on_epoch_begin(self, args, state, control, **kwargs):
        # state.epoch is k.0 at the start of epoch k, fractional when resuming mid-epoch
        self.collator.set_epoch(math.floor((state.epoch or 0.0) + 1e-6))
