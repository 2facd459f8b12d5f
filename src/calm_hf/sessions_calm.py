"""Neuron and session identity of the dual-axis transformer: the embedding tables that grow for new sessions (as
`resize_token_embeddings` grows a vocabulary) and adapt row by row while the rest of the model stays frozen.

[`CalmSessionsMixin`] gives the CalM models these methods the way transformers' `EmbeddingAccessMixin` gives every
`PreTrainedModel` `resize_token_embeddings`; it works on `self.base_model`, the [`CalmModel`] backbone, whose
`neuron_embeddings` and `session_embeddings` are [`CalmIdEmbedding`] tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


def as_id_tensor(ids: int | Sequence[int] | torch.Tensor | None) -> torch.LongTensor:
    """Ids as a flat long tensor (`None` gives an empty one)."""
    if ids is None:
        return torch.zeros(0, dtype=torch.long)
    return torch.as_tensor(ids, dtype=torch.long).flatten()


class CalmIdEmbedding(nn.Embedding):
    """Neuron / session embedding table that can train a subset of rows while the others stay bit-identical.

    In adaptation mode (`train_only_rows`) the table itself is frozen and the selected rows live in a separate
    parameter `trainable_rows`; the forward writes them into a copy of the table. `state_dict()` folds them back into
    `weight` (checkpoints keep the usual layout), so saving mid-adaptation works.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, **kwargs) -> None:
        super().__init__(num_embeddings, embedding_dim, **kwargs)
        self.register_parameter("trainable_rows", None)
        self.register_buffer("trainable_row_ids", None, persistent=False)
        self.register_state_dict_post_hook(self._fold_trainable_rows)
        self.register_load_state_dict_pre_hook(self._unfold_trainable_rows)

    @property
    def is_adapting(self) -> bool:
        return self.trainable_rows is not None

    def train_only_rows(self, row_ids: torch.Tensor) -> nn.Parameter:
        row_ids = torch.as_tensor(row_ids, dtype=torch.long, device=self.weight.device).flatten().unique()
        if row_ids.numel() and not 0 <= int(row_ids.min()) <= int(row_ids.max()) < self.num_embeddings:
            raise ValueError(
                f"Rows {row_ids.tolist()} are outside the table of {self.num_embeddings} rows; grow it first "
                "(model.add_session(...) or resize_*_embeddings)."
            )
        self.merge_trainable_rows()
        self.weight.requires_grad_(False)
        self.trainable_row_ids = row_ids
        self.trainable_rows = nn.Parameter(self.weight.detach()[row_ids].clone())
        return self.trainable_rows

    @torch.no_grad()
    def merge_trainable_rows(self) -> None:
        if self.trainable_rows is not None:
            self.weight[self.trainable_row_ids] = self.trainable_rows.to(self.weight.dtype)
            self.trainable_rows = None
            self.trainable_row_ids = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        weight = self.weight
        if self.trainable_rows is not None:
            weight = weight.index_copy(0, self.trainable_row_ids, self.trainable_rows.to(weight.dtype))
        return F.embedding(ids, weight)

    @staticmethod
    def _fold_trainable_rows(module, state_dict, prefix, local_metadata) -> None:
        if module.trainable_rows is not None:
            weight = state_dict[prefix + "weight"].detach().clone()
            weight[module.trainable_row_ids] = module.trainable_rows.detach().to(weight.dtype)
            state_dict[prefix + "weight"] = weight
            state_dict.pop(prefix + "trainable_rows", None)

    def _unfold_trainable_rows(self, state_dict, prefix, *args) -> None:
        if self.trainable_rows is not None and prefix + "trainable_rows" not in state_dict:
            state_dict[prefix + "trainable_rows"] = state_dict[prefix + "weight"][self.trainable_row_ids].clone()


class CalmSessionsMixin:
    """Growing and adapting the identity tables of `self.base_model` (a `CalmModel`); the config records the
    sessions (`num_neurons`, `num_sessions`, `session_names`, `session_neuron_ranges`)."""

    def _require_tables(self) -> None:
        """Sessions and neuron ids exist only where identities are table rows (`config.neuron_identity="table"`)."""
        if self.config.neuron_identity != "table":
            raise ValueError(
                "This model computes every neuron's identity from data (config.neuron_identity='data'): it has no "
                "session or neuron tables to grow or adapt. Pass neuron_identity (calm_hf.identity_calm."
                "compute_neuron_identity on reference trials) instead, or fine-tune the model (`calm adapt`)."
            )

    def _resize_id_table(self, name: str, new_size: int) -> CalmIdEmbedding:
        self._require_tables()
        backbone = self.base_model
        old: CalmIdEmbedding = getattr(backbone, name)
        if old.is_adapting:
            raise ValueError(
                f"{name} is in adaptation mode; call model.merge_adapted_embeddings() before resizing it."
            )
        if not isinstance(new_size, int) or new_size < 1:
            raise ValueError(f"The new size of {name} must be a positive integer, got {new_size!r}.")
        new = CalmIdEmbedding(new_size, old.embedding_dim, device=old.weight.device, dtype=old.weight.dtype)
        with torch.no_grad():
            keep = min(new_size, old.num_embeddings)
            new.weight[:keep] = old.weight[:keep]
            if new_size > old.num_embeddings:
                # mean init, like resize_token_embeddings(mean_resizing=True): new ids start at the population mean
                new.weight[old.num_embeddings :] = old.weight.mean(dim=0, keepdim=True)
        new.weight.requires_grad_(old.weight.requires_grad)
        setattr(backbone, name, new)
        return new

    def resize_neuron_embeddings(self, new_num_neurons: int) -> nn.Embedding:
        """Grows (or shrinks) the global neuron table to `new_num_neurons` rows; new rows start at the mean of the
        existing rows. Updates `config.num_neurons`."""
        ranges = self.config.session_neuron_ranges or []
        highest = max((stop for _, stop in ranges), default=0)
        if new_num_neurons < highest:
            raise ValueError(
                f"Cannot shrink the neuron table to {new_num_neurons} rows: session_neuron_ranges use ids up to "
                f"{highest}. Remove those sessions from the config first."
            )
        table = self._resize_id_table("neuron_embeddings", new_num_neurons)
        self.config.num_neurons = new_num_neurons
        return table

    def resize_session_embeddings(self, new_num_sessions: int) -> nn.Embedding:
        """Grows (or shrinks) the session table to `new_num_sessions` rows (mean init); updates `config.num_sessions`
        and truncates `session_names` / `session_neuron_ranges` when shrinking."""
        table = self._resize_id_table("session_embeddings", new_num_sessions)
        self.config.num_sessions = new_num_sessions
        if self.config.session_names is not None:
            self.config.session_names = self.config.session_names[:new_num_sessions]
        if self.config.session_neuron_ranges is not None:
            self.config.session_neuron_ranges = self.config.session_neuron_ranges[:new_num_sessions]
        return table

    def add_session(self, name: str, num_neurons: int) -> tuple[int, torch.Tensor]:
        """Adds a new session (e.g. a held-out animal): one session row and a fresh block of `num_neurons` neuron ids,
        both initialised at the mean of the existing rows and recorded in `config.session_names` /
        `config.session_neuron_ranges`. Sessions without a recorded name get `"session_<id>"` with an empty range.

        Returns:
            `(session_id, neuron_ids)` with `neuron_ids` a long tensor of shape `(num_neurons,)`.
        """
        config = self.config
        if not isinstance(num_neurons, int) or num_neurons < 1:
            raise ValueError(f"num_neurons must be a positive integer, got {num_neurons!r}.")
        names = list(config.session_names or [])
        ranges = [list(r) for r in (config.session_neuron_ranges or [])]
        if name in names:
            raise ValueError(f"Session {name!r} already exists (id {names.index(name)}); pick a new name.")
        old_sessions, old_neurons = config.num_sessions, config.num_neurons
        names += [f"session_{i}" for i in range(len(names), old_sessions)]
        ranges += [[0, 0] for _ in range(len(ranges), old_sessions)]
        self.resize_session_embeddings(old_sessions + 1)
        self.resize_neuron_embeddings(old_neurons + num_neurons)
        config.session_names = names + [name]
        config.session_neuron_ranges = ranges + [[old_neurons, old_neurons + num_neurons]]
        return old_sessions, torch.arange(old_neurons, old_neurons + num_neurons)

    def freeze_backbone_except_embeddings(
        self,
        session_ids: int | Sequence[int] | torch.Tensor | None = None,
        neuron_ids: int | Sequence[int] | torch.Tensor | None = None,
    ) -> list[nn.Parameter]:
        """Freezes every parameter and makes only the given rows of the session / neuron tables trainable.

        The rows are moved into separate parameters (`*.trainable_rows`), so every other weight, including the other
        rows of the same tables, stays bit-identical under any optimizer, weight decay included. Give the optimizer
        only the returned parameters (or `[p for p in model.parameters() if p.requires_grad]`, which is the same
        set; `Trainer` does this). `state_dict()`/`save_pretrained` fold the rows back into the tables; call
        [`merge_adapted_embeddings`] to end adaptation.

        Returns:
            The trainable parameters: `trainable_rows` of the session table and/or the neuron table.
        """
        self._require_tables()
        session_ids, neuron_ids = as_id_tensor(session_ids), as_id_tensor(neuron_ids)
        if session_ids.numel() == 0 and neuron_ids.numel() == 0:
            raise ValueError("Pass the session_ids and/or neuron_ids to train, e.g. the ones add_session returned.")
        self.requires_grad_(False)
        backbone = self.base_model
        trainable = []
        if session_ids.numel():
            trainable.append(backbone.session_embeddings.train_only_rows(session_ids))
        if neuron_ids.numel():
            trainable.append(backbone.neuron_embeddings.train_only_rows(neuron_ids))
        return trainable

    def merge_adapted_embeddings(self) -> None:
        """Writes the adapted rows back into the (still frozen) tables and leaves adaptation mode."""
        if self.config.neuron_identity != "table":
            return
        backbone = self.base_model
        backbone.session_embeddings.merge_trainable_rows()
        backbone.neuron_embeddings.merge_trainable_rows()


__all__ = ["CalmIdEmbedding", "CalmSessionsMixin", "as_id_tensor"]
