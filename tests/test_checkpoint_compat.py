"""Checkpoints saved by calm_hf before strict configs and slim forwards still load and compute the same.

`tests/fixtures/main_checkpoint/` was written by `tests/fixtures/make_main_checkpoint.py` running the package of
main 4b6b784, together with the outputs those models gave at save time.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calm_hf import CalmForBehaviorRegression, CalmForCausalNeuralModeling, CalmTokenizer
from calm_hf.modeling_calm_tokenizer import check_tokenizer_fingerprint


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "main_checkpoint"


@pytest.fixture(scope="module")
def expected() -> dict[str, torch.Tensor]:
    return load_file(FIXTURE / "expected.safetensors")


def model_inputs(expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": expected["input_ids"],
        "neuron_ids": expected["neuron_ids"],
        "session_ids": expected["session_ids"],
        "neuron_mask": expected["neuron_mask"].bool(),
    }


def test_tokenizer_from_main_gives_the_same_codes_and_reconstruction(expected):
    tokenizer = CalmTokenizer.from_pretrained(FIXTURE / "model" / "tokenizer").eval()
    with torch.no_grad():
        codes = tokenizer.encode(expected["input_values"]).codes
        reconstruction = tokenizer.decode(codes).trace_values
        loss = tokenizer(expected["input_values"]).loss
    assert torch.equal(codes, expected["tokenizer_codes"])
    torch.testing.assert_close(reconstruction, expected["tokenizer_reconstruction"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss.reshape(1), expected["tokenizer_loss"], rtol=1e-5, atol=1e-6)


def test_model_from_main_gives_the_same_logits_and_loss(expected):
    model = CalmForCausalNeuralModeling.from_pretrained(FIXTURE / "model").eval()
    tokenizer = CalmTokenizer.from_pretrained(FIXTURE / "model" / "tokenizer")
    check_tokenizer_fingerprint(model, tokenizer)  # the recorded pairing still matches
    inputs = model_inputs(expected)
    with torch.no_grad():
        outputs = model(**inputs, labels=inputs["input_ids"], value_labels=expected["input_values"])
    torch.testing.assert_close(outputs.logits, expected["model_logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs.value_predictions, expected["model_value_predictions"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs.loss.reshape(1), expected["model_loss"], rtol=1e-5, atol=1e-6)


def test_model_config_without_newer_fields_loads_with_their_defaults(expected):
    config = json.loads((FIXTURE / "legacy_model" / "config.json").read_text())
    assert "value_head_steps" not in config and "neuron_mixer_rank" not in config
    model = CalmForCausalNeuralModeling.from_pretrained(FIXTURE / "legacy_model").eval()
    assert model.config.value_head_steps == 0 and model.config.neuron_mixer_rank == 0
    assert model.value_head is None
    inputs = model_inputs(expected)
    with torch.no_grad():
        outputs = model(**inputs, labels=inputs["input_ids"])
    torch.testing.assert_close(outputs.logits, expected["legacy_logits"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs.loss.reshape(1), expected["legacy_loss"], rtol=1e-5, atol=1e-6)


def test_behavior_model_from_main_gives_the_same_predictions(expected):
    model = CalmForBehaviorRegression.from_pretrained(FIXTURE / "behavior").eval()
    assert model.config.behavior_head == "linear" and model.config.num_behavior_channels == 2
    with torch.no_grad():
        predictions = model(**model_inputs(expected)).predictions
    torch.testing.assert_close(predictions, expected["behavior_predictions"], rtol=1e-5, atol=1e-6)


def test_tokenizer_config_without_newer_fields_loads(tmp_path, expected):
    folder = tmp_path / "tokenizer"
    shutil.copytree(FIXTURE / "model" / "tokenizer", folder)
    config_path = folder / "config.json"
    config = json.loads(config_path.read_text())
    # fields added after the first tokenizer checkpoints: k-means seeding and the optimizer-side codebook loss
    for name in ("codebook_kmeans_iterations", "embed_weight"):
        config.pop(name)
    config_path.write_text(json.dumps(config))
    (folder / "checksums.sha256").unlink()  # the weights are unchanged, only the config was edited
    tokenizer = CalmTokenizer.from_pretrained(folder)
    assert tokenizer.config.codebook_kmeans_iterations == 10 and tokenizer.config.embed_weight == 1.0
    with torch.no_grad():
        assert torch.equal(tokenizer.eval().encode(expected["input_values"]).codes, expected["tokenizer_codes"])


def test_behavior_head_on_a_causal_checkpoint_from_main_with_keyword_settings():
    model = CalmForBehaviorRegression.from_pretrained(FIXTURE / "model", num_behavior_channels=3, behavior_rank=2)
    assert model.config.num_behavior_channels == 3 and model.behavior_head.neuron_weights.shape == (16, 3 * 4)
    # keyword settings set after the config is built are still cross-checked (rank 99 > hidden_size 16)
    with pytest.raises(ValueError, match="exceeds the backbone hidden_size"):
        CalmForBehaviorRegression.from_pretrained(FIXTURE / "model", num_behavior_channels=3, behavior_rank=99,
                                                  behavior_head="linear")
