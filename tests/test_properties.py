"""Property-based tests (hypothesis) of the two public entry points that take arbitrary user arrays.

Property: every input either returns *finite output of the documented shape* or raises `ValueError`/`TypeError`
with a message; any other exception, a NaN/Inf in the output or a wrong shape fails the test.

The default profile runs a few dozen examples per test (seconds). The long profile runs on demand:

    CALM_HYPOTHESIS_PROFILE=long pytest tests/test_properties.py      # 2,000 examples per test
"""

import math
import os

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


def assert_clear_error(error: BaseException) -> None:
    assert isinstance(error, (ValueError, TypeError)), f"obscure {type(error).__name__}: {error}"
    assert len(str(error)) > 20, f"an error without a useful message: {error!r}"
    event(f"clear {type(error).__name__}")  # --hypothesis-show-statistics gives the split


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


@given(values=st.one_of(plausible_traces(), wild_traces()))
def test_encode_returns_finite_codes_or_a_clear_error(values):
    try:
        out = TOKENIZER.encode(values)
    except Exception as error:  # noqa: BLE001 - the property is about which exceptions occur
        assert_clear_error(error)
        return
    event("returned finite codes")
    batch, neurons, frames = values.shape
    assert out.codes.shape == (batch, neurons, frames // WINDOW) and out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < CODEBOOK
    assert torch.isfinite(out.quantized_embeddings).all()


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


@given(call=st.one_of(plausible_generate_calls(), wild_generate_calls()))
def test_generate_returns_codes_of_the_documented_shape_or_a_clear_error(call):
    ids, kwargs = call
    try:
        out = MODEL.generate(input_ids=ids, **kwargs)
    except Exception as error:  # noqa: BLE001
        assert_clear_error(error)
        return
    event("returned codes")
    batch, neurons, steps = np.asarray(ids).shape
    repeats = kwargs.get("num_return_sequences", 1)
    assert out.shape == (batch * repeats, neurons, steps + kwargs["max_new_tokens"])
    assert out.dtype == torch.long and int(out.min()) >= 0 and int(out.max()) < VOCAB
    assert torch.equal(out[::repeats, :, :steps], torch.as_tensor(np.asarray(ids)).long())
    assert math.isfinite(float(out.float().sum()))
