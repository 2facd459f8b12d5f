"""Generation on the neuron grid for [`CalmForCausalNeuralModeling`]: `generate` (transformers' `GenerationMixin` on
the grid flattened to `(batch*neurons, steps)`) and `rollout` (greedy, sampled or soft feedback with a KV cache).

Kept beside the modeling file as transformers keeps a model's generation code (`generation_whisper.py`); the model
class inherits [`CalmGenerationMixin`].
"""

from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from transformers import GenerationConfig, GenerationMixin
from transformers.cache_utils import Cache, DynamicLayer
from transformers.utils import ModelOutput

from .validation_calm import as_integer_tensor, identity_inputs, validate_inputs


ROLLOUT_MODES = ("greedy", "sample", "soft")
# float32 values alive per (sequence, token step) during one transformer layer's forward, in units of the hidden size:
# input, residual, norm output, fused q/k/v, attention output and the axis-swapped copies; the FFN's intermediate and
# the logits are counted apart. An estimate for planning chunks under a memory budget, not an exact account.
LAYER_ACTIVATIONS = 12


def sequence_bytes(hidden_size: int, intermediate_size: int, steps: int, vocab_size: int = 0, cached_steps: int = 0,
                   num_layers: int = 0) -> int:
    """Estimated peak bytes one sequence (one neuron of one recording or sample) adds to a transformer forward over
    `steps` new token steps, plus the time-axis KV cache of `num_layers` layers over `cached_steps + steps` steps."""
    per_step = LAYER_ACTIVATIONS * hidden_size + 2 * intermediate_size + vocab_size
    cache = 2 * num_layers * hidden_size * (cached_steps + steps)
    return 4 * (steps * per_step + cache)


@dataclass
class CalmRolloutOutput(ModelOutput):
    """
    Output of [`CalmForCausalNeuralModeling.rollout`].

    Args:
        codes (`torch.LongTensor` of shape `(batch, neurons, token_steps + max_new_tokens)`):
            Context followed by the rolled-out codes (argmax codes in "greedy" and "soft" mode, drawn codes in
            "sample" mode).
        probabilities (`torch.FloatTensor` of shape `(batch, neurons, max_new_tokens, vocab_size)`):
            Predicted code distribution at every rolled-out step (after temperature / top-k / top-p).
    """

    codes: torch.LongTensor | None = None
    probabilities: torch.FloatTensor | None = None


def is_positive_integer(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, numbers.Integral) and value >= 1


def check_sampling_arguments(
    max_new_tokens: Any, top_p: Any, top_k: Any, temperature: Any, do_sample: bool | None
) -> None:
    """Range checks for the sampling arguments `GenerationMixin` accepts silently (top_p > 1 samples from the whole
    vocabulary, a fractional max_new_tokens adds an extra step). None means "not set"."""
    if max_new_tokens is not None and not is_positive_integer(max_new_tokens):
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}.")
    if top_p is not None and not (isinstance(top_p, numbers.Real) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must lie in (0, 1] (1 = no nucleus filtering), got {top_p!r}.")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0):
        raise ValueError(f"top_k must be a non-negative integer (0 = no top-k filtering), got {top_k!r}.")
    if do_sample and temperature is not None and not (
        isinstance(temperature, numbers.Real) and 0.0 < temperature < float("inf")
    ):
        raise ValueError(f"temperature must be a positive finite number, got {temperature!r}; use greedy for argmax.")


def plain_numbers(settings: dict) -> dict:
    """numpy integers and floats (`np.int64(2)`, `np.float32(0.7)`) as Python ints and floats, which
    `GenerationConfig`'s own checks require; bools and everything else unchanged."""
    def plain(value):
        if isinstance(value, bool) or isinstance(value, (int, float)):
            return value
        if isinstance(value, numbers.Integral):
            return int(value)
        return float(value) if isinstance(value, numbers.Real) else value

    return {name: plain(value) for name, value in settings.items()}


def filter_logits(logits: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """`(..., vocab)` logits with every code outside the top `top_k` (None or 0: no limit) and outside the smallest
    set whose probability reaches `top_p` (None or 1: no limit) set to -inf; the most likely code always stays."""
    if top_k and top_k < logits.shape[-1]:
        threshold = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < threshold, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        outside = probs.cumsum(dim=-1) - probs >= top_p  # the mass before a code already reaches top_p
        logits = logits.masked_fill(torch.zeros_like(outside).scatter(-1, order, outside), float("-inf"))
    return logits


def inverse_cdf_codes(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.LongTensor:
    """Codes `(...)` drawn from `probs` `(..., vocab)` by inverting their cumulative sum at `uniforms` `(...)` in
    [0, 1): the distribution `torch.multinomial` draws from, for every row in one pass (one uniform per row, so each
    row can have its own generator). A code of zero probability is never drawn."""
    cdf = probs.double().cumsum(dim=-1)
    codes = torch.searchsorted(cdf, (uniforms.double() * cdf[..., -1]).unsqueeze(-1), right=True).squeeze(-1)
    last = probs.shape[-1] - 1 - (probs.flip(-1) > 0).int().argmax(dim=-1)  # a rounded-up target stops at the last
    return torch.minimum(codes, last)


def next_codes(
    logits: torch.Tensor, mode: str, temperature: float, top_k: int | None, generator: torch.Generator | None,
    top_p: float | None = None,
) -> tuple[torch.Tensor, torch.LongTensor]:
    """`(probabilities, codes)` of one rollout step from `(batch, neurons, vocab)` logits (see `rollout`)."""
    logits = logits.float()
    if mode != "greedy":
        logits = filter_logits(logits / temperature, top_k, top_p)
    probs = logits.softmax(dim=-1)
    if mode == "sample":
        codes = torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator)
        return probs, codes.view(probs.shape[:-1])
    return probs, probs.argmax(dim=-1)


class CalmFixedCacheLayer(DynamicLayer):
    """One layer of a time-axis cache allocated once for `capacity` steps and written in place: a new step copies only
    itself, where `DynamicLayer`'s concatenation copies the whole cache at every step. `keys` / `values` are views of
    the steps written so far."""

    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity, self.length, self.buffers = int(capacity), 0, None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # (sequences, heads, steps, head_dim) -> buffers (sequences, heads, capacity, head_dim)
        self.buffers = [states.new_empty(*states.shape[:2], self.capacity, states.shape[-1])
                        for states in (key_states, value_states)]
        self.device, self.is_initialized = key_states.device, True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        end = self.length + key_states.shape[-2]
        if end > self.capacity:
            raise ValueError(f"this time-axis cache holds {self.capacity} steps; {end} were asked for.")
        for buffer, states in zip(self.buffers, (key_states, value_states)):
            buffer[:, :, self.length : end] = states
        self.length = end
        self.keys, self.values = (buffer[:, :, :end] for buffer in self.buffers)
        return self.keys, self.values


class CalmSampleCacheLayer(CalmFixedCacheLayer):
    """One layer of the time-axis cache of a chunk of sampled futures, allocated once for the whole rollout: the
    context's keys/values are copied once per sample (no intermediate copy), then new steps are written in place."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, count: int, capacity: int) -> None:
        # keys, values (batch, neurons, heads, steps, head_dim) of the context -> (batch*count*neurons, heads, capacity, ...)
        super().__init__(capacity)
        batch, neurons, heads, steps, head_dim = keys.shape
        self.buffers = []
        for states in (keys, values):
            buffer = states.new_empty(batch, count, neurons, heads, capacity, head_dim)
            buffer[..., :steps, :] = states[:, None]
            self.buffers.append(buffer.view(batch * count * neurons, heads, capacity, head_dim))
        self.device, self.is_initialized, self.length = keys.device, True, steps
        self.keys, self.values = (buffer[:, :, :steps] for buffer in self.buffers)


class CalmGenerationMixin(GenerationMixin):
    """`generate` and `rollout` for a model whose forward takes the `(batch, neurons, token_steps)` code grid, the
    identity inputs and a time-axis `cache`, and returns `logits` and `cache`."""

    def prepare_inputs_for_generation(
        self,
        input_ids: torch.LongTensor,
        cache: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        next_sequence_length: int | None = None,
        is_first_iteration: bool | None = False,
        **kwargs,
    ) -> dict:
        # transformers < 5.24 hands the KV cache over as `past_key_values` (5.24 renamed it `cache`)
        cache = cache if cache is not None else kwargs.pop("past_key_values", None)
        # input_ids (batch*neurons, steps so far); with a cache only the steps it has not seen are fed (one per step)
        past_length = cache.get_seq_length() if cache is not None else 0
        if past_length:
            input_ids = input_ids[:, past_length:]
        model_inputs = {"input_ids": input_ids.contiguous(), "cache": cache}
        if inputs_embeds is not None and is_first_iteration and not past_length:
            model_inputs = {"input_ids": None, "inputs_embeds": inputs_embeds, "cache": cache}
        forward_args = set(inspect.signature(self.forward).parameters)
        for key, value in kwargs.items():
            if key in forward_args and key not in model_inputs and key != "labels":
                model_inputs[key] = value
        return model_inputs

    def _generation_setting(self, name: str, generation_config: GenerationConfig | None, kwargs: dict):
        if kwargs.get(name) is not None:
            return kwargs[name]
        config = generation_config if generation_config is not None else self.generation_config
        return getattr(config, name, None)

    def _prepare_generation(
        self,
        input_ids: Any,
        identity: dict[str, Any],
        generation_config: GenerationConfig | None,
        generate_kwargs: dict,
    ) -> tuple[torch.LongTensor, dict[str, torch.Tensor | None]]:
        """Validates a `generate` call once (the per-step forwards only check shapes; `generate_kwargs` is edited in
        place) and expands the grid for `num_return_sequences` so the R samples of a trial keep their neurons together.

        Returns:
            `(input_ids (batch*R, neurons, steps), {"neuron_ids", "session_ids", "neuron_mask"} expanded alike)`.
        """
        if input_ids is None:
            raise ValueError("generate needs input_ids of shape (batch, neurons, token_steps): the context codes.")
        if generate_kwargs.get("inputs_embeds") is not None:
            raise ValueError("generate takes input_ids; for embedding feedback use model.rollout(..., mode='soft').")
        generate_kwargs.update(plain_numbers(generate_kwargs))
        setting = lambda name: self._generation_setting(name, generation_config, generate_kwargs)  # noqa: E731
        if generate_kwargs.get("max_length") is not None and generate_kwargs.get("max_new_tokens") is None:
            # max_length counts token steps of the grid; the default max_new_tokens would otherwise win
            max_length = generate_kwargs.pop("max_length")
            grid = as_integer_tensor(input_ids, "input_ids")
            context_steps = grid.shape[-1] if grid.dim() else 0
            if not is_positive_integer(max_length) or max_length <= context_steps:
                raise ValueError(
                    f"max_length={max_length!r} counts the {context_steps} context token steps too, so it must exceed "
                    f"them: pass max_length > {context_steps}, or max_new_tokens=<token steps to generate>."
                )
            generate_kwargs["max_new_tokens"] = max_length - context_steps
        check_sampling_arguments(
            setting("max_new_tokens"), setting("top_p"), setting("top_k"), setting("temperature"), setting("do_sample")
        )
        max_new_tokens = setting("max_new_tokens")
        input_ids = validate_inputs(self.config, input_ids, **identity, new_steps=max_new_tokens or 0)
        neuron_identity = identity.pop("neuron_identity", None)
        if (setting("num_beams") or 1) > 1:
            raise ValueError("Beam search is not supported on the neuron grid; use greedy or do_sample=True.")
        num_return = generate_kwargs.pop("num_return_sequences", None)
        if num_return is None:
            num_return = setting("num_return_sequences") or 1
        if not is_positive_integer(num_return):
            raise ValueError(f"num_return_sequences must be a positive integer, got {num_return!r}.")
        identity = dict(zip(identity, identity_inputs(*input_ids.shape[:2], input_ids.device, **identity)))
        if neuron_identity is not None:
            identity["neuron_identity"] = torch.as_tensor(neuron_identity, device=input_ids.device).expand(
                input_ids.shape[0], -1, -1)
        if num_return > 1:  # (batch*R, neurons, T)
            input_ids = input_ids.repeat_interleave(num_return, dim=0)
            identity = {name: None if value is None else value.repeat_interleave(num_return, dim=0)
                        for name, value in identity.items()}
        return input_ids, identity

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.LongTensor | None = None,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        generation_config: GenerationConfig | None = None,
        neuron_identity: torch.FloatTensor | None = None,
        **generate_kwargs,
    ) -> torch.LongTensor | ModelOutput:
        r"""
        Rolls the token grid forward in time with a KV cache (greedy, or sampling with temperature / top_k / top_p).

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, neurons, token_steps)`): context codes.
            neuron_ids (`torch.LongTensor` of shape `(batch, neurons)`, *optional*): global neuron ids.
            session_ids (`torch.LongTensor` of shape `(batch,)`, *optional*): session ids.
            neuron_mask (`torch.BoolTensor` of shape `(batch, neurons)`, *optional*): False marks padded neurons.
            neuron_identity (`torch.FloatTensor` of shape `(batch, neurons, identity_size)`, *optional*): data
                identity (a `neuron_identity="data"` model; None = zero-shot).
            generation_config (`GenerationConfig`, *optional*): defaults to `model.generation_config`
                (`max_new_tokens=15`, greedy, no eos/pad).
            generate_kwargs: any `GenerationConfig` field (`max_new_tokens`, `do_sample`, `temperature`, `top_k`,
                `top_p`, `num_return_sequences`, `return_dict_in_generate`, `output_scores`, ...). Seed with
                `torch.manual_seed`.

        Returns:
            `torch.LongTensor` of shape `(batch * num_return_sequences, neurons, token_steps + new)`, rows grouped by
            input (`[b * R + r]` is sample r of input b); with `return_dict_in_generate=True` a
            `GenerateDecoderOnlyOutput` whose `sequences` has that shape and whose `scores`/`logits` are tuples of
            `(batch * R, neurons, vocab_size)`.
        """
        if input_ids is None:
            input_ids = generate_kwargs.pop("inputs", None)
        identity = {"neuron_ids": neuron_ids, "session_ids": session_ids, "neuron_mask": neuron_mask,
                    "neuron_identity": neuron_identity}
        input_ids, identity = self._prepare_generation(input_ids, identity, generation_config, generate_kwargs)
        grid_batch, num_neurons, num_steps = input_ids.shape

        outputs = super().generate(
            input_ids.reshape(grid_batch * num_neurons, num_steps),
            generation_config=generation_config,
            num_return_sequences=1,
            num_neurons=num_neurons,
            **identity,
            **generate_kwargs,
        )

        def to_grid(tensor: torch.Tensor) -> torch.Tensor:
            return tensor.reshape(grid_batch, num_neurons, *tensor.shape[1:])

        if isinstance(outputs, torch.Tensor):
            return to_grid(outputs)
        outputs.sequences = to_grid(outputs.sequences)
        for name in ("scores", "logits"):
            if getattr(outputs, name, None) is not None:
                setattr(outputs, name, tuple(to_grid(step) for step in getattr(outputs, name)))
        return outputs

    @torch.no_grad()
    def rollout(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        mode: str = "greedy",
        temperature: float = 1.0,
        top_k: int | None = None,
        generator: torch.Generator | None = None,
        neuron_identity: torch.FloatTensor | None = None,
        top_p: float | None = None,
    ) -> CalmRolloutOutput:
        r"""
        Autoregressive rollout with a KV cache, with a choice of what is fed back at each step.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, neurons, token_steps)`): context codes.
            max_new_tokens (`int`): number of token steps to roll out.
            neuron_ids, session_ids, neuron_mask: as in `forward`.
            mode (`str`, *optional*, defaults to `"greedy"`):
                `"greedy"` feeds back the argmax code, `"sample"` a code drawn from the (temperature / top-k / top-p)
                distribution, `"soft"` the probability-weighted code embedding `probs @ embed_tokens.weight` (a
                mean-field rollout that does not collapse to typical codes); its returned codes are the argmax.
            temperature (`float`, *optional*, defaults to 1.0): softmax temperature ("sample" and "soft").
            top_k (`int`, *optional*): keep only the k most likely codes ("sample" and "soft"); None or 0 keeps all.
            generator (`torch.Generator`, *optional*): random generator for "sample".
            neuron_identity (`torch.FloatTensor`, *optional*): data identity, as in `forward`.
            top_p (`float`, *optional*): keep only the smallest set of most likely codes whose probability reaches
                `top_p` ("sample" and "soft"); None or 1 keeps all.

        Returns:
            [`CalmRolloutOutput`] with `codes` `(batch, neurons, token_steps + max_new_tokens)` and
            `probabilities` `(batch, neurons, max_new_tokens, vocab_size)`.
        """
        if mode not in ROLLOUT_MODES:
            raise ValueError(f"mode must be 'greedy', 'sample' or 'soft', got {mode!r}.")
        check_sampling_arguments(max_new_tokens, top_p, top_k, temperature, do_sample=True)
        input_ids = validate_inputs(self.config, input_ids, neuron_ids, session_ids, neuron_mask, new_steps=max_new_tokens,
                                    neuron_identity=neuron_identity)
        identity = {"neuron_ids": neuron_ids, "session_ids": session_ids, "neuron_mask": neuron_mask,
                    "neuron_identity": neuron_identity}
        outputs = self(input_ids=input_ids, use_cache=True, logits_to_keep=1, return_dict=True, **identity)
        codes, probabilities = [], []
        for step in range(max_new_tokens):
            # (batch, neurons, vocab) distribution of the next step and the codes picked from it
            probs, step_codes = next_codes(outputs.logits[:, :, -1], mode, temperature, top_k, generator, top_p)
            codes.append(step_codes)
            probabilities.append(probs)
            if step == max_new_tokens - 1:
                break
            if mode == "soft":
                embedding = self.get_input_embeddings().weight
                feed = {"inputs_embeds": (probs.to(embedding.dtype) @ embedding)[:, :, None, :]}
            else:
                feed = {"input_ids": step_codes[:, :, None]}
            outputs = self(cache=outputs.cache, use_cache=True, logits_to_keep=1, return_dict=True, **feed, **identity)
        return CalmRolloutOutput(
            codes=torch.cat([input_ids, torch.stack(codes, dim=-1)], dim=-1),
            probabilities=torch.stack(probabilities, dim=2),
        )

    @torch.no_grad()
    def sample_futures(
        self,
        input_ids: torch.LongTensor,
        max_new_tokens: int,
        seeds: torch.LongTensor,
        samples_per_chunk: int | None = None,
        neuron_ids: torch.LongTensor | None = None,
        session_ids: torch.LongTensor | None = None,
        neuron_mask: torch.BoolTensor | None = None,
        neuron_identity: torch.FloatTensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
    ) -> torch.LongTensor:
        r"""
        Sampled token futures that share one pass over the context: the context is run once, its time-axis cache is
        copied for `samples_per_chunk` samples at a time, and each chunk is rolled out with a cache of its own, so
        memory grows with the chunk, not with the number of samples.

        Sample `s` of input `b` draws its codes from its own generator seeded with `seeds[b, s]`, so the futures do not
        depend on how the samples are chunked.

        Args:
            input_ids (`torch.LongTensor` of shape `(batch, neurons, token_steps)`): context codes.
            max_new_tokens (`int`): token steps to roll out.
            seeds (`torch.LongTensor` of shape `(batch, num_samples)`): one seed per future.
            samples_per_chunk (`int`, *optional*): futures rolled out together (default: all of them).
            neuron_ids, session_ids, neuron_mask, neuron_identity: as in `forward`.
            temperature, top_k, top_p: as in `rollout`.

        Returns:
            `torch.LongTensor` of shape `(batch, num_samples, neurons, token_steps + max_new_tokens)`.
        """
        check_sampling_arguments(max_new_tokens, top_p, top_k, temperature, do_sample=True)
        input_ids = validate_inputs(self.config, input_ids, neuron_ids, session_ids, neuron_mask,
                                    new_steps=max_new_tokens, neuron_identity=neuron_identity)
        batch, neurons, _ = input_ids.shape
        if seeds.dim() != 2 or seeds.shape[0] != batch:
            raise ValueError(f"seeds must be (batch={batch}, num_samples), got shape {tuple(seeds.shape)}.")
        num_samples = seeds.shape[1]
        chunk = num_samples if samples_per_chunk is None else max(1, min(int(samples_per_chunk), num_samples))
        identity = dict(zip(("neuron_ids", "session_ids", "neuron_mask"),
                            identity_inputs(batch, neurons, input_ids.device, neuron_ids, session_ids, neuron_mask)))
        if neuron_identity is not None:
            identity["neuron_identity"] = neuron_identity.expand(batch, -1, -1)
        context = self(input_ids=input_ids, use_cache=True, logits_to_keep=1, return_dict=True, **identity)
        first_logits = context.logits[:, :, -1]  # (batch, neurons, vocab)
        host_seeds = seeds.tolist()  # one host sync per call, not per step
        futures = []
        for start in range(0, num_samples, chunk):
            count = min(chunk, num_samples - start)
            generators = [torch.Generator(device=input_ids.device).manual_seed(host_seeds[b][s])
                          for b in range(batch) for s in range(start, start + count)]
            futures.append(self._sample_chunk(context.cache, first_logits, count, max_new_tokens, generators,
                                              identity, temperature, top_k, top_p))
        future = torch.cat(futures, dim=1)  # (batch, num_samples, neurons, max_new_tokens)
        return torch.cat([input_ids[:, None].expand(-1, num_samples, -1, -1), future], dim=-1)

    def _sample_chunk(self, cache: Cache, first_logits: torch.Tensor, count: int, max_new_tokens: int,
                      generators: list[torch.Generator], identity: dict, temperature: float, top_k: int | None,
                      top_p: float | None) -> torch.LongTensor:
        """`count` futures of every input from a copy of the context's `cache`: `(batch, count, neurons, new)`."""
        batch, neurons, vocab = first_logits.shape

        def per_sample(tensor: torch.Tensor) -> torch.Tensor:  # (batch, ...) -> (batch*count, ...), samples of b together
            return tensor[:, None].expand(batch, count, *tensor.shape[1:]).reshape(batch * count, *tensor.shape[1:])

        # (batch*neurons, heads, steps, head_dim) per layer -> (batch*count*neurons, heads, steps + new - 1, head_dim)
        capacity = cache.get_seq_length() + max_new_tokens - 1
        chunk_cache = Cache(layers=[
            CalmSampleCacheLayer(*(t.reshape(batch, neurons, *t.shape[1:]) for t in (layer.keys, layer.values)),
                                 count, capacity) for layer in cache.layers])
        chunk_identity = {name: None if value is None else per_sample(value) for name, value in identity.items()}
        logits = per_sample(first_logits)  # (batch*count, neurons, vocab)
        codes = []
        for step in range(max_new_tokens):
            probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
            uniforms = torch.stack([torch.rand(neurons, generator=generator, device=probs.device)
                                    for generator in generators])  # (batch*count, neurons): each future its own draws
            step_codes = inverse_cdf_codes(probs, uniforms)
            codes.append(step_codes)
            if step == max_new_tokens - 1:
                break
            outputs = self(input_ids=step_codes[:, :, None], cache=chunk_cache, use_cache=True, logits_to_keep=1,
                           return_dict=True, **chunk_identity)
            chunk_cache, logits = outputs.cache, outputs.logits[:, :, -1]
        return torch.stack(codes, dim=-1).reshape(batch, count, neurons, max_new_tokens)


__all__ = ["CalmFixedCacheLayer", "CalmGenerationMixin", "CalmRolloutOutput"]
