"""Tests for calm_hf.cards: rendered cards parse back with huggingface_hub and carry the run's numbers."""


import datasets
import numpy as np
import pytest
from huggingface_hub import DatasetCard, ModelCard, metadata_load

from calm_hf.cards import CALM_CITATION, render_dataset_card, render_model_card, render_tokenizer_card, template_path
from calm_hf.registration import PIPELINE_TASKS

METRICS = {"pearson_r": 0.41234, "mse": 0.8312, "num_nan": 3, "pearson_r_session_1": np.float32(0.3875), "bad": float("nan")}
CONFIG = {"hidden_size": 256, "num_hidden_layers": 4, "codebook_size": 128, "window_size": 4, "frame_rate_hz": 5.0}
TRAINING = {"sessions": 3, "training trials": 840, "optimizer": {"lr": 3e-4, "steps": 20000}}


def _saved(card, tmp_path):
    path = tmp_path / "README.md"
    card.save(path)
    return path


def test_model_card_metadata_and_numbers(tmp_path):
    card = render_model_card(
        METRICS, CONFIG, TRAINING, repo_id="someone/calm-base", baselines={"population ridge AR": 0.5712},
        dataset_repo_id="someone/calm-base-dataset",
    )
    path = _saved(card, tmp_path)
    metadata = metadata_load(path)
    assert metadata["license"] == "apache-2.0"
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "time-series-forecasting"
    assert metadata["pipeline_tag"] in PIPELINE_TASKS  # pipeline(<the card's tag>, model=...) is the forecasting pipeline
    assert {"neuroscience", "calcium-imaging", "time-series-forecasting", "foundation-model"} <= set(metadata["tags"])
    assert metadata["datasets"] == ["someone/calm-base-dataset"]
    (entry,) = metadata["model-index"]
    assert entry["name"] == "calm-base"
    (result,) = entry["results"]
    assert result["task"]["type"] == "time-series-forecasting"
    assert result["dataset"]["name"] == "CalM simulated benchmark"
    values = {metric["type"]: metric["value"] for metric in result["metrics"]}
    # NaN metrics are left out of the model-index (the hub rejects them); the others carry the exact numbers.
    assert values == {"pearson_r": 0.41234, "mse": 0.8312, "num_nan": 3, "pearson_r_session_1": pytest.approx(0.3875)}

    loaded = ModelCard.load(path)
    eval_results = {result.metric_type: result.metric_value for result in loaded.data.eval_results}
    assert eval_results["pearson_r"] == 0.41234
    assert loaded.data.model_name == "calm-base"

    text = loaded.text
    for needle in ("| Forecast Pearson r | 0.4123 |", "| Forecast MSE (z-scored units) | 0.8312 |",
                   "| Forecast Pearson r, session 1 | 0.3875 |", "| bad | n/a |", "| population ridge AR | 0.5712 |",
                   "| `codebook_size` | 128 |", "| optimizer.steps | 20,000 |", "| optimizer.lr | 0.0003 |"):
        assert needle in text, needle
    for section in ("## What it is", "## Intended use", "## How to use", "## Training data", "## Evaluation results",
                    "## Limitations", "## How to fine-tune", "## Citation"):
        assert section in text, section
    for needle in ('pipeline("neural-forecasting"', '"time-series-forecasting"', "trust_remote_code=True", 'AutoModel.from_pretrained("someone/calm-base")',
                   "calm pretrain", "calm adapt", "calm finetune-behavior",
                   "simulated data only", "5 Hz", "z-scored", CALM_CITATION, "arXiv 2604.04958"):
        assert needle in text, needle
    assert "{{" not in str(card) and "{%" not in str(card)  # every template variable was filled


def test_tokenizer_card(tmp_path):
    card = render_tokenizer_card(
        {"reconstruction_r": 0.9731, "reconstruction_mse": 0.052, "codebook_perplexity": 97.5},
        {"codebook_size": 128, "window_size": 4},
        {"segments": 120000},
        repo_id="someone/calm-base",
        baselines={"k-means, 128 centroids": 0.9902},
    )
    path = _saved(card, tmp_path)
    metadata = metadata_load(path)
    assert metadata["license"] == "apache-2.0"
    assert "tokenizer" in metadata["tags"]
    values = {m["type"]: m["value"] for m in metadata["model-index"][0]["results"][0]["metrics"]}
    assert values == {"reconstruction_r": 0.9731, "reconstruction_mse": 0.052, "codebook_perplexity": 97.5}
    text = ModelCard.load(path).text
    assert '"someone/calm-base", subfolder="tokenizer"' in text
    assert "| Reconstruction Pearson r | 0.9731 |" in text and "| k-means, 128 centroids | 0.9902 |" in text
    assert "{{" not in text


def test_dataset_card_from_dataset_dict(tmp_path):
    features = datasets.Features(
        {"input_ids": datasets.Array2D(shape=(None, 25), dtype="int16"), "session_id": datasets.Value("int64")}
    )
    rows = {"input_ids": [np.zeros((3, 25), dtype=np.int16)] * 4, "session_id": [0, 0, 1, 1]}
    dataset = datasets.DatasetDict(
        train=datasets.Dataset.from_dict(rows, features=features),
        test=datasets.Dataset.from_dict({k: v[:2] for k, v in rows.items()}, features=features),
    )
    card = render_dataset_card(dataset, {"simulator": {"g": 1.6, "num_neurons": 200}, "dt_s": 0.2},
                               repo_id="someone/calm-data")
    assert isinstance(card, DatasetCard)
    path = _saved(card, tmp_path)
    metadata = metadata_load(path)
    assert metadata["license"] == "apache-2.0"
    assert metadata["task_categories"] == ["time-series-forecasting"]
    assert metadata["size_categories"] == ["n<1K"]
    text = DatasetCard.load(path).text
    for needle in ("| `input_ids` | Array2D", "| `session_id` |", "| train | 4 |", "| test | 2 |", "Total: 6 rows.",
                   "| `simulator.g` | 1.6 |", "| `simulator.num_neurons` | 200 |", "| `dt_s` | 0.2 |",
                   'load_dataset("someone/calm-data")', "apache-2.0"):
        assert needle in text, needle
    sized = render_dataset_card({"train": 25000, "test": 5000}, {}, repo_id="x/y")
    assert sized.data.size_categories == ["10K<n<100K"]


def test_bad_inputs():
    with pytest.raises(ValueError, match="dict of metric name"):
        render_model_card([0.4], CONFIG, TRAINING)
    with pytest.raises(ValueError, match="split -> number of rows"):
        render_dataset_card({"train": "many"}, {})
    with pytest.raises(ValueError, match="model_card.md"):
        template_path("nope.md")


def test_templates_ship_with_package():
    for name in ("model_card.md", "tokenizer_card.md", "dataset_card.md"):
        assert "{{ card_data }}" in open(template_path(name), encoding="utf-8").read()


def test_model_card_states_the_context_length_and_the_neuron_groups():
    config = {**CONFIG, "context_token_steps": 4, "neuron_attention_block": 64}
    text = render_model_card(METRICS, config, TRAINING).text
    assert "reads the last 4 token steps of context (3.2 s;" in text
    assert "groups of at most 64" in text
    plain = render_model_card(METRICS, CONFIG, TRAINING).text  # neither set: neither sentence
    assert "token steps of context" not in plain and "groups of at most" not in plain
