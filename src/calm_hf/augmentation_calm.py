"""Training-time input corruptions of the paper for [`CalmForCausalNeuralModeling`]: scheduled sampling and
neighbourhood replacement. The training step applies them (`calm_hf.trainer.augment_training_batch`, which
`CalmTrainer.compute_loss` calls); `forward` never does, so a forward is one pass of the model on the inputs it is
given. The model class inherits [`CalmAugmentationMixin`].
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F


class CalmAugmentationMixin:
    """`set_codebook_neighbors` and `augment_input_ids` for a model with `config`, a `model` backbone, an `lm_head`
    and a `codebook_neighbors` buffer `(vocab_size, neighbor_k)` (-1 = not set)."""

    _warned_no_neighbors = False

    @torch.no_grad()
    def set_codebook_neighbors(self, codebook: torch.Tensor) -> torch.Tensor:
        """Stores, for every code, its `config.neighbor_k` nearest other codes by cosine similarity.

        Args:
            codebook (`torch.FloatTensor` of shape `(vocab_size, dim)`): the tokenizer's codebook vectors.
        """
        vocab_size, k = self.config.vocab_size, self.config.neighbor_k
        if codebook.dim() != 2 or codebook.shape[0] != vocab_size:
            raise ValueError(
                f"codebook must have shape (vocab_size={vocab_size}, dim), got {tuple(codebook.shape)}: the tokenizer "
                f"codebook_size {codebook.shape[0] if codebook.dim() else '?'} differs from model vocab_size {vocab_size}."
            )
        unit = F.normalize(codebook.detach().float(), dim=-1)
        similarity = unit @ unit.T
        similarity.fill_diagonal_(float("-inf"))  # a code is not its own neighbour
        neighbors = similarity.topk(k, dim=-1).indices
        self.codebook_neighbors.copy_(neighbors.to(self.codebook_neighbors.device))
        return self.codebook_neighbors

    def augment_input_ids(
        self,
        input_ids: torch.LongTensor,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
    ) -> tuple[torch.LongTensor, torch.BoolTensor]:
        """Applies the paper's training-time input corruptions (only in `model.train()`; identity in eval). The
        training step calls it (`calm_hf.trainer.augment_training_batch`, used by `CalmTrainer.compute_loss`);
        `forward` never does, so a forward is one pass of the model on the inputs it is given:
        scheduled sampling (probability `scheduled_sampling_prob` per batch, one block of `scheduled_sampling_block`
        steps replaced by the model's own one-step argmax predictions) and neighbourhood replacement (each token with
        probability `neighbor_replacement_prob` swapped for one of its `neighbor_k` nearest codes).

        Returns:
            `(input_ids, scheduled_sampling_applied)`.
        """
        config = self.config
        applied = torch.tensor(False, device=input_ids.device)
        if not self.training:
            return input_ids, applied
        num_steps = input_ids.shape[-1]
        block = min(config.scheduled_sampling_block, num_steps - 1)
        if config.scheduled_sampling_prob > 0 and block >= 1 and bool(torch.rand(()) < config.scheduled_sampling_prob):
            with torch.no_grad():
                hidden = self.model(
                    input_ids=input_ids, neuron_ids=neuron_ids, session_ids=session_ids, neuron_mask=neuron_mask,
                    use_cache=False,
                ).last_hidden_state
                # logits at step t predict step t+1
                predictions = self.lm_head(hidden[:, :, :-1]).argmax(dim=-1)
            start = int(torch.randint(1, num_steps - block + 1, ()))
            input_ids = input_ids.clone()
            input_ids[:, :, start : start + block] = predictions[:, :, start - 1 : start - 1 + block]
            applied = torch.tensor(True, device=input_ids.device)
        if config.neighbor_replacement_prob > 0:
            if int(self.codebook_neighbors[0, 0]) < 0:
                if not self._warned_no_neighbors:
                    warnings.warn(
                        "Neighbourhood replacement is enabled but model.set_codebook_neighbors(tokenizer codebook) "
                        "was never called; skipping it.",
                        stacklevel=2,
                    )
                    self._warned_no_neighbors = True
            else:
                replace = torch.rand(input_ids.shape, device=input_ids.device) < config.neighbor_replacement_prob
                choice = torch.randint(0, config.neighbor_k, input_ids.shape, device=input_ids.device)
                neighbors = self.codebook_neighbors[input_ids, choice]
                input_ids = torch.where(replace, neighbors, input_ids)
        return input_ids, applied


__all__ = ["CalmAugmentationMixin"]
