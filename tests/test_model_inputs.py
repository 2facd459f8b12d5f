"""Bad arguments to the model-level entry points get a clear error, and unusual but valid ones the right result:
generate, rollout, labels, the behaviour head, the configurations and `CalmForecaster`.

Each case states what must happen: the error (its type and the words that name the problem) or the result. Before
these checks each one was either accepted with a wrong result (codes for trials without a neuron, one neuron's
identity given to two, NaN logits from a negative epsilon, sampling settings dropped) or failed with an error that
named neither the problem nor the fix.
"""

import math
import warnings

import numpy as np
import pytest
import torch

from calm_hf import (
    CalmConfig,
    CalmForBehaviorRegression,
    CalmForCausalNeuralModeling,
    CalmTokenizer,
    CalmTokenizerConfig,
)
from calm_hf.forecasting import CalmForecaster

IDS = torch.randint(0, 16, (2, 3, 4), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def tokenizer():
    torch.manual_seed(0)
    return CalmTokenizer(CalmTokenizerConfig.from_preset("tiny")).eval()


@pytest.fixture(scope="module")
def models(tokenizer):
    """A data-identity and a table-identity model of the tiny preset."""
    torch.manual_seed(0)
    common = dict(vocab_size=tokenizer.config.codebook_size, tokenizer_fingerprint=tokenizer.fingerprint())
    data = CalmForCausalNeuralModeling(CalmConfig.from_preset("tiny", **common)).eval()
    table = CalmForCausalNeuralModeling(
        CalmConfig.from_preset("tiny", neuron_identity="table", num_neurons=10, num_sessions=2, **common)).eval()
    return {"data": data, "table": table}


# -- the neuron mask and the neuron ids --------------------------------------------------------------------------------

NO_NEURON = torch.zeros(2, 3, dtype=torch.bool)
ONE_EMPTY_TRIAL = torch.tensor([[True, True, True], [False, False, False]])


@pytest.mark.parametrize("identity", ["data", "table"])
@pytest.mark.parametrize("mask", [NO_NEURON, ONE_EMPTY_TRIAL], ids=["all-false", "one-trial-false"])
@pytest.mark.parametrize("entry", ["generate", "rollout", "forecast_values"])
def test_a_trial_without_a_real_neuron_is_refused(models, identity, mask, entry):
    model = models[identity]
    call = {
        "generate": lambda: model.generate(input_ids=IDS, neuron_mask=mask, max_new_tokens=2),
        "rollout": lambda: model.rollout(IDS, 2, neuron_mask=mask),
        "forecast_values": lambda: model.forecast_values(IDS, neuron_mask=mask, context_values=torch.zeros(2, 3, 16)),
    }[entry]
    with pytest.raises(ValueError, match=r"neuron_mask is False for every neuron of trial\(s\) \[" +
                       ("0, 1" if mask is NO_NEURON else "1")):  # before: codes for trials with no neuron
        call()


def test_a_partly_padded_trial_still_generates(models):
    mask = torch.tensor([[True, True, False], [True, True, True]])
    out = models["table"].generate(input_ids=IDS, neuron_mask=mask, max_new_tokens=2,
                                   neuron_ids=torch.tensor([[0, 1, 0], [2, 3, 4]]))  # padding may repeat an id
    assert out.shape == (2, 3, 6)


@pytest.mark.parametrize("entry", ["generate", "rollout"])
def test_duplicate_neuron_ids_of_a_table_model_are_refused(models, entry):
    ids = torch.tensor([[0, 0, 1], [2, 3, 4]])
    model = models["table"]
    call = (lambda: model.generate(input_ids=IDS, neuron_ids=ids, max_new_tokens=2)) if entry == "generate" else (
        lambda: model.rollout(IDS, 2, neuron_ids=ids))
    with pytest.raises(ValueError, match="neuron_ids of trial 0 repeat id 0: each real neuron needs its own id"):
        call()  # before: two neurons read the same table row and codes came back


def test_the_collator_and_trainer_check_runs_the_new_rules(models):
    with pytest.raises(ValueError, match="repeat id 3"):
        models["table"].validate_inputs(input_ids=IDS, neuron_ids=torch.tensor([[0, 1, 2], [3, 4, 3]]))
    models["table"].validate_inputs(input_ids=IDS, neuron_ids=torch.tensor([[0, 1, 2], [3, 4, 5]]))  # distinct: fine


# -- rollout and generate arguments ------------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["sample", "soft"])
def test_rollout_top_k_zero_means_no_limit(models, mode):
    torch.manual_seed(0)
    unfiltered = models["data"].rollout(IDS, 2, mode=mode, generator=torch.Generator().manual_seed(1))
    out = models["data"].rollout(IDS, 2, mode=mode, top_k=0, generator=torch.Generator().manual_seed(1))
    # before: RuntimeError "The size of tensor a (16) must match the size of tensor b (0)"
    assert torch.equal(out.codes, unfiltered.codes) and torch.allclose(out.probabilities, unfiltered.probabilities)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=float("nan"), mode="sample"), "temperature must be a positive finite number"),
        (dict(top_k=-1, mode="sample"), "top_k must be a non-negative integer"),
        (dict(top_p=0.0, mode="soft"), r"top_p must lie in \(0, 1\]"),
        (dict(top_p=float("nan"), mode="sample"), r"top_p must lie in \(0, 1\]"),
    ],
    ids=["temperature-nan", "top_k-neg", "top_p-0", "top_p-nan"],
)
def test_rollout_refuses_bad_sampling_settings(models, kwargs, match):
    with pytest.raises(ValueError, match=match):
        models["data"].rollout(IDS, 2, **kwargs)


def test_rollout_top_p_keeps_the_smallest_likely_set(models):
    out = models["data"].rollout(IDS, 3, mode="soft", top_p=0.3)
    kept = out.probabilities > 0
    assert kept.sum(-1).min() >= 1  # the most likely code always stays
    full = models["data"].rollout(IDS, 3, mode="soft").probabilities
    assert (kept.sum(-1) < full.gt(0).sum(-1)).any()  # the filter removed codes
    assert torch.allclose(out.probabilities.sum(-1), torch.ones(()))


@pytest.mark.parametrize("max_length", [2, 4, np.int64(3)])
def test_generate_max_length_within_the_context_names_both(models, max_length):
    # before: "max_new_tokens must be a positive integer, got -2" for an argument the caller never passed
    with pytest.raises(ValueError, match=rf"max_length={int(max_length)} counts the 4 context token steps too.*> 4"):
        models["data"].generate(input_ids=IDS, max_length=max_length)


def test_generate_and_rollout_take_numpy_numbers(models):
    model = models["data"]
    torch.manual_seed(3)
    plain = model.generate(input_ids=IDS, max_new_tokens=2, do_sample=True, top_k=3, top_p=0.9, temperature=0.7,
                           num_return_sequences=2)
    torch.manual_seed(3)
    # before: transformers' "`top_k` has to be a strictly positive integer, but is 3"
    numpy = model.generate(input_ids=IDS, max_new_tokens=np.int64(2), do_sample=True, top_k=np.int64(3),
                           top_p=np.float32(0.9), temperature=np.float64(0.7), num_return_sequences=np.int32(2))
    assert torch.equal(plain, numpy)
    assert torch.equal(model.generate(input_ids=IDS, max_length=np.int64(6)),
                       model.generate(input_ids=IDS, max_new_tokens=2))
    assert model.rollout(IDS, np.int64(2)).codes.shape == (2, 3, 6)
    assert torch.equal(model.rollout(IDS.to(torch.int16), 2).codes, model.rollout(IDS, 2).codes)  # int16 codes


# -- labels ------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [99, 16, -5])
def test_forward_with_labels_outside_the_vocabulary_names_them(models, value):
    # before: IndexError "Target 99 is out of bounds" from inside cross_entropy
    with pytest.raises(ValueError, match=r"labels hold a code outside \[0, 16\) that is not -100"):
        models["data"](input_ids=IDS, labels=torch.full_like(IDS, value))
    assert torch.isfinite(models["data"](input_ids=IDS, labels=IDS).loss)


@pytest.fixture(scope="module")
def behavior(tokenizer):
    torch.manual_seed(0)
    return CalmForBehaviorRegression(CalmConfig.from_preset(
        "tiny", vocab_size=tokenizer.config.codebook_size, neuron_identity="table", num_behavior_channels=2)).eval()


@pytest.mark.parametrize("convert", [lambda y: y, lambda y: y.numpy(), lambda y: y.numpy().astype(np.float64),
                                     lambda y: y.tolist()], ids=["tensor", "numpy", "numpy-float64", "list"])
def test_behavior_labels_may_be_numpy_or_lists(behavior, convert):
    labels = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(0))
    expected = behavior(input_ids=IDS, labels=labels).loss
    # before: AttributeError "'numpy.ndarray' object has no attribute 'dim'"
    assert torch.allclose(behavior(input_ids=IDS, labels=convert(labels)).loss, expected)


@pytest.mark.parametrize("labels, error, match", [
    (np.zeros((2, 2, 16), dtype=complex), TypeError, "real numbers, got dtype torch.complex"),
    (np.zeros((2, 2, 16), dtype=bool), TypeError, "real numbers, got dtype torch.bool"),
    ("abc", TypeError, "labels must be a tensor, numpy array or nested list of real numbers"),
    (np.zeros((2, 16)), ValueError, r"labels must be behaviour of shape \(batch, num_behavior_channels, frames\)"),
], ids=["complex", "bool", "string", "2-d"])
def test_behavior_labels_of_the_wrong_kind_are_refused(behavior, labels, error, match):
    with pytest.raises(error, match=match):
        behavior(input_ids=IDS, labels=labels)


# -- configurations ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides, match", [
    (dict(rms_norm_eps=-1), r"rms_norm_eps must be a positive finite number .*got -1"),
    (dict(rms_norm_eps=0), "rms_norm_eps must be a positive finite number"),
    (dict(rms_norm_eps=float("nan")), "rms_norm_eps must be a positive finite number"),
    (dict(rope_theta=0), r"rope_theta must be a finite number > 1 .*got 0"),
    (dict(rope_theta=1), "rope_theta must be a finite number > 1"),
    (dict(rope_theta=float("inf")), "rope_theta must be a finite number > 1"),
    (dict(frame_rate_hz=float("nan")), "frame_rate_hz must be a positive finite rate"),
    (dict(initializer_range=-0.1), "initializer_range must be a finite number >= 0"),
], ids=["eps-neg", "eps-0", "eps-nan", "theta-0", "theta-1", "theta-inf", "rate-nan", "init-neg"])
def test_model_config_refuses_values_that_break_the_model(overrides, match):
    with pytest.raises(ValueError, match=match):  # before: accepted; eps -1 gave NaN logits and code 0 everywhere
        CalmConfig.from_preset("tiny", **overrides)


def test_model_config_checks_assigned_fields_before_use():
    config = CalmConfig.from_preset("tiny")
    config.rms_norm_eps = -1.0  # assigned after construction: cross-checked by raise_if_invalid / save_pretrained
    with pytest.raises(ValueError, match="rms_norm_eps must be a positive finite number"):
        config.raise_if_invalid()


@pytest.mark.parametrize("overrides, match", [
    (dict(layer_norm_eps=float("inf")), "`layer_norm_eps` must be a finite number > 0"),
    (dict(rope_theta=1), r"`rope_theta` must be > 1"),
    (dict(rope_theta=float("inf")), "`rope_theta` must be a finite number > 0"),
    (dict(gumbel_temperature_start=float("inf")), "Gumbel temperatures must be > 0 and finite"),
    (dict(initializer_range=float("inf")), "`initializer_range` must be a finite number >= 0"),
], ids=["eps-inf", "theta-1", "theta-inf", "gumbel-inf", "init-inf"])
def test_tokenizer_config_refuses_values_that_break_the_tokenizer(overrides, match):
    with pytest.raises(ValueError, match=match):
        CalmTokenizerConfig.from_preset("tiny", **overrides)


def test_valid_configs_still_build():
    for preset in ("tiny", "cpu", "paper"):
        assert math.isfinite(CalmConfig.from_preset(preset).rms_norm_eps)
        assert CalmTokenizerConfig.from_preset(preset).rope_theta > 1
    CalmConfig.from_preset("tiny", rms_norm_eps=1, rope_theta=500)  # integers from older config files


# -- CalmForecaster ----------------------------------------------------------------------------------------------------

CONTEXT = torch.randn(2, 3, 24, generator=torch.Generator().manual_seed(0))  # z-scored: mean 0, std 1


@pytest.fixture(scope="module")
def forecaster(models, tokenizer):
    return CalmForecaster(models["data"], tokenizer)


def test_soft_forecasts_honour_top_k_and_top_p(forecaster):
    plain = forecaster.forecast(CONTEXT, horizon=12, mode="soft")
    top1 = forecaster.forecast(CONTEXT, horizon=12, mode="soft", top_k=1)
    nucleus = forecaster.forecast(CONTEXT, horizon=12, mode="soft", top_p=1e-6)  # only the most likely code stays
    # before: soft mode dropped temperature, top_k and top_p, and all three equalled the plain rollout
    assert not np.array_equal(top1.codes, plain.codes)
    np.testing.assert_array_equal(nucleus.codes, top1.codes)
    np.testing.assert_allclose(nucleus.forecast, top1.forecast)


@pytest.mark.parametrize("mode", ["greedy", "soft"])
def test_one_future_modes_refuse_several_samples(forecaster, mode):
    # before: num_samples was quietly set to 1 and the caller got one future without a spread
    with pytest.raises(ValueError, match=rf"mode='{mode}' gives one deterministic future, not num_samples=4"):
        forecaster.forecast(CONTEXT, horizon=8, mode=mode, num_samples=4)


@pytest.mark.parametrize("mode, kwargs", [
    ("greedy", dict(top_k=3)), ("greedy", dict(temperature=0.5)), ("direct", dict(top_p=0.9)),
], ids=["greedy-top_k", "greedy-temperature", "direct-one-sample-top_p"])
def test_sampling_settings_that_would_do_nothing_are_refused(forecaster, mode, kwargs):
    name = next(iter(kwargs))
    with pytest.raises(ValueError, match=rf"{name}=.* would have no effect: mode='{mode}' with num_samples=1"):
        forecaster.forecast(CONTEXT, horizon=8, mode=mode, **kwargs)


def test_direct_horizon_is_capped_at_the_model_span(forecaster):
    config = forecaster.model.config
    span = (config.max_token_steps - 1) * config.window_size
    assert forecaster.forecast(CONTEXT, horizon=span, mode="direct").forecast.shape == (2, 3, span)
    # before: any horizon was chained chunk by chunk: 10**6 frames meant tens of thousands of passes
    for horizon in (span + 1, 10**6):
        with pytest.raises(ValueError, match=rf"horizon={horizon} frames is longer than this model's span of {span} "
                                             rf"frames.*at most {span} frames"):
            forecaster.forecast(CONTEXT, horizon=horizon, mode="direct")


@pytest.mark.parametrize("name, value", [("horizon", 0), ("horizon", 2.5), ("num_samples", 0), ("num_samples", True)])
def test_forecast_counts_must_be_positive_integers(forecaster, name, value):
    arguments = {"horizon": 8, "mode": "sample", name: value}
    with pytest.raises(ValueError, match=rf"{name} must be a positive integer, got {value!r}"):
        forecaster.forecast(CONTEXT, **arguments)
    assert forecaster.forecast(CONTEXT, horizon=np.int64(8), num_samples=np.int64(2), mode="sample").samples.shape == (
        2, 2, 3, 8)


def test_raw_context_gets_a_warning_that_names_z_scoring(forecaster):
    with pytest.warns(UserWarning, match=r"context_values do not look z-scored: the median neuron has mean 4\d\.\d+"):
        forecaster.forecast(CONTEXT * 10 + 50, horizon=8)  # before: a forecast in the wrong units, without a word
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        forecaster.forecast(CONTEXT, horizon=8)  # z-scored: no warning


def test_a_tokenizer_with_another_fingerprint_is_refused(models, tokenizer):
    torch.manual_seed(1)
    other = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny")).eval()
    assert other.config.codebook_size == models["data"].config.vocab_size  # the same size: only the fingerprint differs
    assert other.fingerprint() != tokenizer.fingerprint()
    with pytest.raises(ValueError, match=rf"has fingerprint {other.fingerprint()} but the model was pretrained with "
                                         rf"the tokenizer of fingerprint {tokenizer.fingerprint()}"):
        CalmForecaster(models["data"], other)
