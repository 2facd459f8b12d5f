"""`CalmCorpusStream`: a corpus of shards (`calm_hf.data.corpus`) read as a `torch.utils.data.IterableDataset`.

Shards are visited in a random order each pass and their rows in a random order within the shard; only one shard is
open at a time (memory-mapped), so a corpus larger than memory trains the same way. Each example is one trial of one
session, with a random subset of at most `max_neurons` neurons. With `identity_fn` every example also carries the
data identity of its neurons, computed from `k` other training trials of the same session (the reference), `k`
drawn from `reference_trials` per example: the model learns to read identities estimated from many trials, from a
few, and from none (zero-shot). Shards hold sessions of one trial length, so consecutive examples (one batch) share
their length.

The stream is a pure function of `(seed, pass)`: the same seed gives the same examples in the same order, so a run
resumed from a checkpoint (Trainer skips the batches it has seen) continues exactly where it stopped. Under
`accelerate launch` / `torchrun`, accelerate's default for iterable datasets dispatches: the main process reads the
stream and sends each process its slice of every batch.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .corpus import load_manifest


def corpus_shards(corpus_dir: str | os.PathLike) -> list[Path]:
    """The shard folders of a corpus (from its `corpus.json`)."""
    manifest = load_manifest(corpus_dir)
    return [Path(corpus_dir) / shard["path"] for shard in manifest["shards"]]


class CalmCorpusStream(torch.utils.data.IterableDataset):
    """Trials of a sharded corpus as an endless (or `passes`-long) stream of examples.

    Args:
        shards (`list[str | Path]` or `str`): shard folders, or a corpus folder (its `corpus.json` lists them).
        split (`str`, defaults to `"train"`): which split's trials are streamed; references always come from the
            training trials of the same session (never from the streamed trial itself).
        max_neurons (`int`, *optional*, defaults to 64): neurons per example (a random subset of larger sessions).
        reference_trials (`tuple[int, ...]`, defaults to `(0, 1, 2, 4, 8, 16, 32)`): the number of reference trials
            is drawn uniformly from these (capped by what the session has); 0 = no reference (zero-shot).
        identity_fn (`callable`, *optional*): `identity_fn(reference (trials, neurons, frames) float32 tensor or
            None, num_neurons) -> (neurons, features)` tensor; without it no `neuron_identity` is produced.
        seed (`int`, defaults to 0): seed of every random choice.
        passes (`int`, *optional*): stop after this many passes over the shards (default: endless).
        columns (`tuple[str, ...]`): row columns carried into the example (those present in the shard).
    """

    def __init__(
        self,
        shards: list[str | os.PathLike] | str | os.PathLike,
        split: str = "train",
        max_neurons: int | None = 64,
        reference_trials: tuple[int, ...] = (0, 1, 2, 4, 8, 16, 32),
        identity_fn: Callable[[torch.Tensor | None, int], torch.Tensor] | None = None,
        seed: int = 0,
        passes: int | None = None,
        columns: tuple[str, ...] = ("input_ids", "input_values", "session_id"),
    ):
        super().__init__()
        if isinstance(shards, (str, os.PathLike)):
            shards = corpus_shards(shards)
        self.shards = [Path(s) for s in shards]
        if not self.shards:
            raise ValueError("CalmCorpusStream got no shards; build a corpus first (calm_hf.data.corpus.build_corpus).")
        if max_neurons is not None and int(max_neurons) < 1:
            raise ValueError(f"max_neurons must be a positive number or None, got {max_neurons}.")
        if not reference_trials or min(reference_trials) < 0:
            raise ValueError(f"reference_trials must be non-negative counts, got {reference_trials}.")
        self.split = split
        self.max_neurons = None if max_neurons is None else int(max_neurons)
        self.reference_trials = tuple(int(k) for k in reference_trials)
        self.identity_fn = identity_fn
        self.seed = int(seed)
        self.passes = passes
        self.columns = tuple(columns)

    def _open(self, shard: Path):
        """(streamed split, the training trials' traces per session) of one shard, memory-mapped."""
        import datasets

        corpus = datasets.load_from_disk(str(shard))
        if self.split not in corpus:
            raise ValueError(f"shard {shard} has no split {self.split!r}; it has {sorted(corpus)}.")
        rows = corpus[self.split].with_format("numpy")
        bank: dict[int, np.ndarray] = {}
        if self.identity_fn is not None:
            train = corpus["train"].with_format("numpy", columns=["session_id", "input_values", "trial_index"])
            sessions = np.asarray(train["session_id"])
            for session in np.unique(sessions):
                index = np.flatnonzero(sessions == session)
                block = train.select(index.tolist())
                bank[int(session)] = (np.stack(list(block["input_values"])).astype(np.float32),
                                       np.asarray(block["trial_index"]))
        return rows, bank

    def _reference(self, bank: dict, session: int, trial_index: int, subset: np.ndarray,
                   rng: np.random.Generator) -> torch.Tensor | None:
        traces, trial_ids = bank.get(session, (None, None))
        if traces is None:
            return None
        available = np.flatnonzero(trial_ids != trial_index) if self.split == "train" else np.arange(len(traces))
        count = min(self.reference_trials[int(rng.integers(len(self.reference_trials)))], len(available))
        if count == 0:
            return None
        chosen = np.sort(rng.choice(available, size=count, replace=False))
        return torch.from_numpy(np.ascontiguousarray(traces[chosen][:, subset]))

    def _example(self, row: dict, bank: dict, rng: np.random.Generator) -> dict[str, Any]:
        num_neurons = int(np.asarray(row["input_values"]).shape[0])
        subset = np.arange(num_neurons)
        if self.max_neurons is not None and num_neurons > self.max_neurons:
            subset = np.sort(rng.choice(num_neurons, size=self.max_neurons, replace=False))
        example: dict[str, Any] = {}
        for name in self.columns:
            if name in row:
                value = np.asarray(row[name])
                example[name] = value[subset] if value.ndim >= 1 and value.shape[0] == num_neurons else value
        example["neuron_ids"] = np.arange(len(subset))
        if self.identity_fn is not None:
            reference = self._reference(bank, int(row["session_id"]), int(row["trial_index"]), subset, rng)
            example["neuron_identity"] = self.identity_fn(reference, len(subset))
        return example

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = torch.utils.data.get_worker_info()
        workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        for pass_index in (itertools.count() if self.passes is None else range(int(self.passes))):
            order = np.random.default_rng([self.seed, pass_index]).permutation(len(self.shards))
            for position, shard_index in enumerate(order):
                if position % workers != worker_id:  # DataLoader workers split the shards
                    continue
                rng = np.random.default_rng([self.seed, pass_index, int(shard_index)])
                rows, bank = self._open(self.shards[shard_index])
                for index in rng.permutation(len(rows)):
                    yield self._example(rows[int(index)], bank, rng)


__all__ = ["CalmCorpusStream", "corpus_shards"]
