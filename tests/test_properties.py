"""Property-based tests (hypothesis) of the two public entry points that take arbitrary user arrays.

Property: a valid input returns *finite output of the documented shape*; an invalid one raises `ValueError` or
`TypeError` with the documented message of a rule it breaks. The rules are written out below from the docstrings
(`calm_hf.validation_calm_tokenizer`, `calm_hf.validation_calm`, `CalmGenerationMixin.generate`), independently of the code that
enforces them: a valid input refused, an invalid one accepted, the message of a rule the input keeps, any other
exception, a NaN/Inf in the output or a wrong shape fails the test.

The default profile runs a few dozen examples per test (seconds). The long profile runs on demand:

    CALM_HYPOTHESIS_PROFILE=long pytest tests/test_properties.py      # 2,000 examples per test
"""

import math
import os
import re

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from hypothesis.extra import numpy as hnp  # noqa: E402

from calm_hf import CalmConfig, CalmForCausalNeuralModeling, CalmTokenizer, CalmTokenizerConfig  # noqa: E402

settings.register_profile(
    "default", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
settings.register_profile("long", max_examples=2000, deadline=None, suppress_health_check=list(HealthCheck))
settings.load_profile(os.environ.get("CALM_HYPOTHESIS_PROFILE", "default"))

torch.manual_seed(0)
TOKENIZER = CalmTokenizer(CalmTokenizerConfig.from_preset("tiny")).eval()
WINDOW = TOKENIZER.config.window_size
CODEBOOK = TOKENIZER.config.codebook_size
MODEL = CalmForCausalNeuralModeling(
    CalmConfig.from_preset("tiny", vocab_size=CODEBOOK, num_neurons=6, num_sessions=2, max_token_steps=12)
).eval()
VOCAB = MODEL.config.vocab_size


def outcome(call, broken: list[str], allowed: tuple[str, ...] = ()):
    """Run `call`; `broken` lists the documented messages (regexes) of the rules the input breaks, `allowed` those of
    rules the input may break (it is outside the range where they are guaranteed to hold). Returns the output of a
    call that succeeded, None after an expected error."""
    try:
        out = call()
    except (ValueError, TypeError) as error:
        message = str(error)
        assert broken or allowed, f"a valid input was refused: {type(error).__name__}: {message}"
        assert any(re.search(pattern, message) for pattern in [*broken, *allowed]), (
            f"{type(error).__name__}: {message!r} is none of the documented messages {broken + list(allowed)}"
        )
        event(f"refused: {next(p for p in [*broken, *allowed] if re.search(p, message))}")
        return None
    assert not broken, f"an invalid input was accepted; it breaks: {broken}"
    event("accepted")
    return out


# -- CalmTokenizer.encode ---------------------------------------------------------------------------------------------

TRACE_DTYPES = [np.float16, np.float32, np.float64, np.int16, np.int64, np.uint8, np.bool_, np.complex64]
trace_values = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.floats(-10, 10),  # plenty of valid z-scores
    st.sampled_from([0.0, 1e30, -1e30, 3.5e38, 1e300, 1e-45]),
)


@st.composite
def plausible_traces(draw):
    """Inputs a user would pass: a float tensor of the documented shape with z-score-like values (occasionally a
    huge or non-finite one)."""
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), WINDOW * draw(st.integers(1, 3)))
    elements = st.one_of(st.floats(-8, 8, width=32), st.sampled_from([0.0, 1e30, float("nan")]))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    array = draw(hnp.arrays(np.float64, shape, elements=st.floats(-8, 8) if draw(st.integers(0, 3)) else elements))
    return torch.from_numpy(array.astype(dtype))


@st.composite
def wild_traces(draw):
    dtype = draw(st.sampled_from(TRACE_DTYPES))
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=9))
    if draw(st.booleans()):  # mostly the documented rank with a few frames
        shape = (draw(st.integers(0, 2)), draw(st.integers(0, 3)), draw(st.sampled_from([0, 3, 4, 8, 9, 12])))
    with np.errstate(all="ignore"):
        if dtype in (np.int16, np.int64, np.uint8, np.bool_):
            array = draw(hnp.arrays(dtype, shape))
        else:
            array = draw(hnp.arrays(np.float64, shape, elements=trace_values)).astype(dtype)
    container = draw(st.sampled_from(["tensor", "numpy", "list"]))
    if container == "tensor":
        return torch.from_numpy(np.ascontiguousarray(array))
    return array if container == "numpy" else array.tolist()


def broken_encode_rules(values) -> tuple[list[str], tuple[str, ...]]:
    """(broken, allowed) messages of `CalmTokenizer.encode`'s documented rules for `values`: a torch tensor of real
    numbers, shaped (batch, neurons, frames) with at least one frame window, frames a multiple of window_size, finite
    in the model's float32; traces far outside the z-scored range may overflow inside the encoder."""
    if not isinstance(values, torch.Tensor):
        return ["must be a torch.Tensor of shape"], ()
    broken = []
    if values.ndim != 3:
        broken.append("must be 3-D")
    if values.numel() == 0:
        broken.append("is empty")
    if values.ndim >= 1 and values.shape[-1] < WINDOW:
        broken.append("fewer than one token window")
    if values.ndim >= 1 and values.shape[-1] % WINDOW:
        broken.append("not a multiple of window_size")
    if values.is_complex() or values.dtype == torch.bool:
        return broken + ["must be a real float tensor"], ()
    if not torch.isfinite(values).all():
        broken.append("NaN/Inf value")
    elif not torch.isfinite(values.float()).all():
        broken.append("beyond the range of torch.float32")
    huge = values.numel() and float(values.double().abs().nan_to_num(0.0, 0.0, 0.0).max()) > 1e6
    return broken, ("non-finite states",) if huge else ()


@given(values=st.one_of(plausible_traces(), wild_traces()))
def test_encode_accepts_valid_traces_and_refuses_invalid_ones_with_the_documented_message(values):
    broken, allowed = broken_encode_rules(values)
    out = outcome(lambda: TOKENIZER.encode(values), broken, allowed)
    if out is None:
        return
    batch, neurons, frames = values.shape
    assert out.codes.shape == (batch, neurons, frames // WINDOW) and out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < CODEBOOK
    assert torch.isfinite(out.quantized_embeddings).all()


def test_the_encode_rules_see_valid_and_invalid_traces():
    # guard against an oracle that cannot fail: it must call clean traces valid and each kind of bad trace invalid
    assert broken_encode_rules(torch.randn(1, 2, WINDOW * 2)) == ([], ())
    assert broken_encode_rules(torch.randn(1, 2, WINDOW + 1))[0] == ["not a multiple of window_size"]
    assert broken_encode_rules(torch.full((1, 1, WINDOW), float("nan")))[0] == ["NaN/Inf value"]
    assert broken_encode_rules(np.zeros((1, 1, WINDOW)))[0] == ["must be a torch.Tensor of shape"]


# -- CalmForCausalNeuralModeling.generate -----------------------------------------------------------------------------

ID_DTYPES = [np.int8, np.int16, np.int32, np.int64, np.uint8, np.float32, np.bool_]


@st.composite
def plausible_generate_calls(draw):
    """What a user would pass: codes of an integer dtype in the vocabulary, sensible sampling arguments."""
    dtype = draw(st.sampled_from([np.int16, np.int64, np.int32, np.uint8]))
    shape = (draw(st.integers(1, 2)), draw(st.integers(1, 4)), draw(st.integers(1, 5)))
    ids = draw(hnp.arrays(dtype, shape, elements=st.integers(0, VOCAB - 1)))
    ids = torch.from_numpy(ids) if draw(st.booleans()) else ids
    kwargs = {"max_new_tokens": draw(st.integers(1, 4)), "do_sample": draw(st.booleans())}
    if draw(st.booleans()):
        kwargs["num_return_sequences"] = draw(st.integers(1, 3))
    if kwargs["do_sample"]:
        kwargs["top_p"] = draw(st.floats(0.05, 1.0))
        kwargs["top_k"] = draw(st.integers(0, VOCAB))
        kwargs["temperature"] = draw(st.floats(0.05, 3.0))
    return ids, kwargs


@st.composite
def wild_generate_calls(draw):
    dtype = draw(st.sampled_from(ID_DTYPES))
    shape = (draw(st.integers(0, 2)), draw(st.integers(0, 4)), draw(st.integers(0, 5)))
    if draw(st.integers(0, 4)) == 0:
        shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=0, max_side=4))
    in_vocab = st.integers(0, VOCAB - 1)
    elements = st.one_of(in_vocab, st.integers(-3, VOCAB + 3)) if dtype not in (np.bool_, np.float32) else None
    if dtype == np.uint8:
        elements = st.integers(0, 255)
    ids = draw(hnp.arrays(dtype, shape, elements=elements))
    container = draw(st.sampled_from(["tensor", "numpy", "list"]))
    ids = torch.from_numpy(np.ascontiguousarray(ids)) if container == "tensor" else ids if container == "numpy" else ids.tolist()
    kwargs = {
        "max_new_tokens": draw(st.one_of(st.integers(-1, 4), st.just(2.5))),
        "do_sample": draw(st.booleans()),
    }
    optional = {
        "num_return_sequences": st.one_of(st.integers(-1, 3), st.just(1.5)),
        "top_p": st.one_of(st.floats(-0.5, 2.0), st.just(float("nan"))),
        "top_k": st.integers(-2, VOCAB + 2),
        "temperature": st.one_of(st.floats(-1.0, 3.0), st.sampled_from([float("inf"), float("nan"), 1e-6])),
    }
    for name, strategy in optional.items():
        if draw(st.booleans()):
            kwargs[name] = draw(strategy)
    return ids, kwargs


def is_positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def broken_generate_rules(ids, kwargs: dict) -> list[str]:
    """Messages of the documented rules of `generate` that a call breaks: codes of an integer dtype in a non-empty
    (batch, neurons, token_steps) grid (a tensor, numpy array or nested list), inside the vocabulary, context plus
    new steps within max_token_steps; max_new_tokens and num_return_sequences positive integers, top_p in (0, 1],
    top_k a non-negative integer, a positive finite temperature when sampling."""
    broken = []
    new_steps = kwargs["max_new_tokens"]
    if not is_positive_int(new_steps):
        broken.append("max_new_tokens must be a positive integer")
        new_steps = 0
    top_p, top_k, temperature = kwargs.get("top_p"), kwargs.get("top_k"), kwargs.get("temperature")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        broken.append(r"top_p must lie in \(0, 1\]")
    if top_k is not None and top_k < 0:
        broken.append("top_k must be a non-negative integer")
    if kwargs["do_sample"] and temperature is not None and not 0.0 < temperature < math.inf:
        broken.append("temperature must be a positive finite number")
    if "num_return_sequences" in kwargs and not is_positive_int(kwargs["num_return_sequences"]):
        broken.append("num_return_sequences must be a positive integer")
    codes = torch.as_tensor(ids)  # the containers the docstring names, as torch reads them
    if codes.dtype == torch.bool or codes.dtype.is_floating_point:
        return broken + ["input_ids must hold integers"]
    if codes.dim() != 3:
        return broken + [r"must be a \(batch, neurons, token_steps\) grid"]
    if 0 in codes.shape:
        return broken + ["is empty"]
    if codes.shape[-1] + new_steps > MODEL.config.max_token_steps:
        broken.append(f"exceed max_token_steps={MODEL.config.max_token_steps}")
    if int(codes.min()) < 0 or int(codes.max()) >= VOCAB:
        broken.append(f"differs from model vocab_size {VOCAB}")
    return broken


@given(call=st.one_of(plausible_generate_calls(), wild_generate_calls()))
def test_generate_accepts_valid_calls_and_refuses_invalid_ones_with_the_documented_message(call):
    ids, kwargs = call
    out = outcome(lambda: MODEL.generate(input_ids=ids, **kwargs), broken_generate_rules(ids, kwargs))
    if out is None:
        return
    batch, neurons, steps = np.asarray(ids).shape
    repeats = kwargs.get("num_return_sequences", 1)
    assert out.shape == (batch * repeats, neurons, steps + kwargs["max_new_tokens"])
    assert out.dtype == torch.long and int(out.min()) >= 0 and int(out.max()) < VOCAB
    assert torch.equal(out[::repeats, :, :steps], torch.as_tensor(np.asarray(ids)).long())
    assert math.isfinite(float(out.float().sum()))


def test_the_generate_rules_see_valid_and_invalid_calls():
    ids = np.zeros((1, 2, 3), dtype=np.int16)
    assert broken_generate_rules(ids, {"max_new_tokens": 2, "do_sample": True, "top_p": 0.5, "top_k": 0}) == []
    assert broken_generate_rules(ids.astype(np.float32), {"max_new_tokens": 2, "do_sample": False}) == [
        "input_ids must hold integers"]
    assert broken_generate_rules(ids + VOCAB, {"max_new_tokens": 20, "do_sample": False}) == [
        "exceed max_token_steps=12", f"differs from model vocab_size {VOCAB}"]
