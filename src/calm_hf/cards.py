"""Model, tokenizer and dataset cards for CalM checkpoints, rendered from a run's numbers.

The Jinja templates live in `calm_hf/card_templates/`. The YAML header (licence, library, tags, pipeline tag, datasets
and a `model-index` built from `EvalResult`s) and the body tables are filled from the same dicts, so the numbers in the
metadata and in the text always agree.

```python
>>> from calm_hf.cards import render_model_card
>>> card = render_model_card({"pearson_r": 0.41}, {"hidden_size": 256}, {"steps": 20000}, repo_id="me/calm-base")
>>> card.save("calm-base/README.md")
```
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from importlib import resources
from typing import Any

from huggingface_hub import DatasetCard, DatasetCardData, EvalResult, ModelCard, ModelCardData

__all__ = [
    "CALM_CITATION",
    "DEFAULT_TAGS",
    "render_dataset_card",
    "render_model_card",
    "render_tokenizer_card",
    "format_value",
    "template_path",
]

CALM_CITATION = """@article{calm2026selfsupervised,
  title         = {Self-Supervised Foundation Model for Calcium-imaging Population Dynamics},
  year          = {2026},
  journal       = {arXiv preprint arXiv:2604.04958},
  eprint        = {2604.04958},
  archivePrefix = {arXiv},
  url           = {https://arxiv.org/abs/2604.04958}
}"""

DEFAULT_TAGS = ["neuroscience", "calcium-imaging", "time-series-forecasting", "foundation-model", "calm_hf"]
EVAL_DATASET_NAME = "CalM simulated benchmark"
EVAL_DATASET_TYPE = "calm-simulated-benchmark"

# metric key -> (pretty name, number of decimals in the tables). Keys may carry an "eval_"/"test_" prefix.
_METRIC_NAMES = {
    "pearson_r": "Forecast Pearson r",
    "mse": "Forecast MSE (z-scored units)",
    "num_nan": "Neuron-trials excluded (constant trace)",
    "behavior_r2": "Behaviour decoding R²",
    "behavior_mse": "Behaviour decoding MSE",
    "r2": "R²",
    "reconstruction_r": "Reconstruction Pearson r",
    "reconstruction_mse": "Reconstruction MSE (z-scored units)",
    "codebook_perplexity": "Codebook perplexity",
    "codebook_usage": "Codebook usage (fraction of codes used)",
    "dead_codes": "Dead codes",
}

_MODEL_LIMITATIONS = [
    "Trained on simulated data only (a chaotic rate RNN, spikes, and a calcium kernel); it has not seen real recordings "
    "unless the training table above says otherwise, so expect a domain gap on real data.",
    "The model runs at {frame_rate_hz} Hz on traces z-scored per neuron; other rates must be resampled and raw traces "
    "normalised (the `neural-forecasting` pipeline does both), and trials must be cropped to a multiple of "
    "{window_size} frames.",
    "Neuron and session embeddings exist only for the sessions seen in training; a new session or animal needs "
    "`calm adapt` (frozen backbone, new embeddings) before its forecasts are meaningful.",
    "The default forecast is the continuous head's conditional mean over the next value_head_steps windows (one "
    "forward pass; longer horizons re-tokenize the forecast and continue). It is the right point estimate for "
    "Pearson r and MSE but is smooth by construction: use sampled token rollouts (`num_samples`) for the spread of "
    "possible futures. Token rollouts alone (greedy) drift towards typical codes. A strong linear baseline "
    "(population ridge autoregression) is a bar the model must be compared against; see the table above.",
    "Calcium signals are an indirect, slow proxy of spiking; forecasts are not spike predictions.",
]

_TOKENIZER_LIMITATIONS = [
    "Trained on simulated calcium traces only, at {frame_rate_hz} Hz, z-scored per neuron.",
    "Reconstruction is lossy: fast transients shorter than a {window_size}-frame window are smoothed.",
    "Codes are only meaningful together with the decoder and the dual-axis transformer trained on them.",
]


def template_path(name: str) -> str:
    """Path of a card template shipped with the package (`model_card.md`, `tokenizer_card.md`, `dataset_card.md`)."""
    path = resources.files("calm_hf") / "card_templates" / name
    if not path.is_file():
        raise ValueError(f"No card template {name!r} in calm_hf/card_templates; use model_card.md, "
                         "tokenizer_card.md or dataset_card.md.")
    return str(path)


def _metric_key(name: str) -> str:
    for prefix in ("eval_", "test_", "validation_"):
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def _pretty_metric(name: str) -> str:
    key = _metric_key(name)
    if key in _METRIC_NAMES:
        return _METRIC_NAMES[key]
    if key.startswith("pearson_r_session_"):
        return f"Forecast Pearson r, session {key.removeprefix('pearson_r_session_')}"
    return key.replace("_", " ")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) or hasattr(value, "item")


def _to_float(value: Any) -> float:
    return float(value.item() if hasattr(value, "item") else value)


def format_value(value: Any) -> str:
    """Format a metric for a card table: integers as is, floats with 4 decimals, NaN as `n/a`."""
    if isinstance(value, bool) or not _is_number(value):
        return str(value)
    if isinstance(value, int) or (hasattr(value, "dtype") and value.dtype.kind in "iu"):
        return str(int(value))
    number = _to_float(value)
    return "n/a" if math.isnan(number) else f"{number:.4f}"


def format_fact(value: Any) -> str:
    """Format a configuration/training fact: integers with thousands separators, floats with 6 significant digits."""
    if isinstance(value, bool) or not _is_number(value):
        return str(value)
    number = _to_float(value)
    if isinstance(value, int) or (hasattr(value, "dtype") and value.dtype.kind in "iu"):
        return f"{int(number):,}"
    return f"{number:.6g}"


def _flatten(summary: Mapping[str, Any] | None, parent: str = "") -> list[tuple[str, str]]:
    rows = []
    for key, value in (summary or {}).items():
        name = f"{parent}.{key}" if parent else str(key)
        if isinstance(value, Mapping):
            rows.extend(_flatten(value, name))
        elif isinstance(value, (list, tuple)):
            rows.append((name, ", ".join(format_fact(item) for item in value)))
        else:
            rows.append((name, format_fact(value)))
    return rows


def _numeric_metrics(metrics: Mapping[str, Any]) -> dict[str, float | int]:
    """Finite scalar metrics (what can go into `model-index`). Nested dicts such as `per_session` are skipped."""
    numbers = {}
    for name, value in metrics.items():
        if _is_number(value) and not isinstance(value, bool):
            number = _to_float(value)
            if math.isfinite(number):
                numbers[name] = int(number) if isinstance(value, int) else number
    return numbers


def _eval_results(
    metrics: Mapping[str, Any], task_type: str, task_name: str, split: str, dataset_type: str, dataset_name: str
) -> list[EvalResult]:
    return [
        EvalResult(
            task_type=task_type,
            task_name=task_name,
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=_metric_key(name),
            metric_name=_pretty_metric(name),
            metric_value=value,
        )
        for name, value in _numeric_metrics(metrics).items()
    ]


def _metric_rows(metrics: Mapping[str, Any]) -> list[tuple[str, str]]:
    return [
        (_pretty_metric(name), format_value(value))
        for name, value in metrics.items()
        if _is_number(value) and not isinstance(value, bool)
    ]


def _render(
    kind: str,
    metrics: Mapping[str, Any],
    config_summary: Mapping[str, Any],
    training_summary: Mapping[str, Any],
    repo_id: str | None,
    baselines: Mapping[str, Any] | None,
    task_type: str,
    task_name: str,
    pipeline_tag: str,
    eval_split: str,
    datasets: list[str] | None,
    template_kwargs: dict[str, Any],
) -> ModelCard:
    if not isinstance(metrics, Mapping):
        raise ValueError(f"`metrics` must be a dict of metric name -> number, got {type(metrics).__name__}.")
    repo_id = repo_id or ("calm-base" if kind == "model" else "calm-base/tokenizer")
    model_name = repo_id.split("/")[-1]
    eval_results = _eval_results(metrics, task_type, task_name, eval_split, EVAL_DATASET_TYPE, EVAL_DATASET_NAME)
    card_data = ModelCardData(
        license="apache-2.0",
        library_name="transformers",
        pipeline_tag=pipeline_tag,
        tags=list(DEFAULT_TAGS) + (["tokenizer", "vq-vae"] if kind == "tokenizer" else []),
        datasets=datasets or None,
        metrics=sorted({_metric_key(name) for name in _numeric_metrics(metrics)}) or None,
        model_name=model_name,
        eval_results=eval_results or None,
    )
    window_size = config_summary.get("window_size", 4)
    frame_rate_hz = config_summary.get("frame_rate_hz", 5.0)
    limitations = _MODEL_LIMITATIONS if kind == "model" else _TOKENIZER_LIMITATIONS
    kwargs = dict(
        model_title=model_name,
        repo_id=repo_id,
        window_size=window_size,
        frame_rate_hz=f"{float(frame_rate_hz):g}",
        config_rows=_flatten(config_summary),
        training_rows=_flatten(training_summary),
        metric_rows=_metric_rows(metrics),
        baseline_rows=[(name, format_value(value)) for name, value in (baselines or {}).items()],
        eval_dataset_name=EVAL_DATASET_NAME,
        eval_split=eval_split,
        limitations=[line.format(window_size=window_size, frame_rate_hz=f"{float(frame_rate_hz):g}") for line in limitations],
        training_data_description=(
            "A corpus of simulated sessions whose dynamics and observation model are drawn per session from documented "
            "ranges (`calm_hf.data.corpus.SIMULATION_RANGES`: rate RNNs with random and low-rank connectivity, time "
            "constants, shared and stimulus-locked inputs, firing rates, indicator kernels from fast to slow, imaging "
            "noise, 16 to 1,024 neurons, native rates of 2-30 Hz resampled to 5 Hz, trial-structured and continuous "
            "recordings, baseline drift), plus the training trials of the real recordings named in the training table; "
            "every session z-scored per neuron with its training trials' statistics."
        ),
        data_identity=config_summary.get("neuron_identity", "table") == "data",
        neuron_attention_block=config_summary.get("neuron_attention_block"),
        context_token_steps=config_summary.get("context_token_steps"),
        context_seconds=f"{(config_summary.get('context_token_steps') or 0) * window_size / float(frame_rate_hz):g}",
        heldout_rows=[],
        citation=CALM_CITATION,
    )
    kwargs["limitations"] += list(template_kwargs.pop("extra_limitations", None) or [])
    kwargs.update(template_kwargs)
    template = "model_card.md" if kind == "model" else "tokenizer_card.md"
    return ModelCard.from_template(card_data, template_path=template_path(template), **kwargs)


def render_model_card(
    metrics: dict,
    config_summary: dict,
    training_summary: dict,
    repo_id: str | None = None,
    *,
    baselines: dict | None = None,
    dataset_repo_id: str | None = None,
    eval_split: str = "test",
    **template_kwargs: Any,
) -> ModelCard:
    """Render the model card (`README.md`) of a CalM dual-axis transformer checkpoint.

    Args:
        metrics (`dict[str, float]`):
            The run's evaluation numbers, e.g. `{"pearson_r": 0.41, "mse": 0.83, "num_nan": 0}` (an `eval_`/`test_`
            prefix is accepted). Every finite number becomes an `EvalResult` in the `model-index` and a table row.
        config_summary (`dict`):
            Architecture facts for the configuration table (e.g. `hidden_size`, `num_hidden_layers`, `codebook_size`,
            `window_size`, `frame_rate_hz`, `num_parameters`); nested dicts are flattened with dots.
        training_summary (`dict`):
            Training facts for the training table (sessions, trials, steps, runtime, hardware...).
        repo_id (`str`, *optional*):
            Hub id used in the usage snippets and as the model-index name; `"calm-base"` when omitted.
        baselines (`dict[str, float]`, *optional*):
            Forecast Pearson r of baselines measured in the same run (`{"population ridge AR": 0.57}`).
        dataset_repo_id (`str`, *optional*):
            Hub id of the tokenized training dataset, listed under `datasets` in the metadata.
        eval_split (`str`, *optional*, defaults to `"test"`):
            Split the metrics were measured on.
        template_kwargs:
            Extra Jinja variables that override the defaults (e.g. `training_data_description`, `model_title`).

    Returns:
        `huggingface_hub.ModelCard`; `card.save(path)` writes it, `card.data` holds the metadata.
    """
    return _render(
        "model",
        metrics,
        config_summary,
        training_summary,
        repo_id,
        baselines,
        task_type="time-series-forecasting",
        task_name="Neural population forecasting",
        pipeline_tag="time-series-forecasting",
        eval_split=eval_split,
        datasets=[dataset_repo_id] if dataset_repo_id else None,
        template_kwargs=template_kwargs,
    )


def render_tokenizer_card(
    metrics: dict,
    config_summary: dict,
    training_summary: dict,
    repo_id: str | None = None,
    *,
    subfolder: str | None = "tokenizer",
    baselines: dict | None = None,
    eval_split: str = "test",
    **template_kwargs: Any,
) -> ModelCard:
    """Render the card of the CalM neural quantizer (`tokenizer/README.md` inside a checkpoint).

    Args:
        metrics (`dict[str, float]`):
            Reconstruction numbers, e.g. `{"reconstruction_r": 0.97, "reconstruction_mse": 0.06,
            "codebook_perplexity": 96.0, "dead_codes": 0}`.
        config_summary (`dict`): Architecture facts (`hidden_size`, `codebook_size`, `window_size`, layers...).
        training_summary (`dict`): Training facts (segments, steps, runtime...).
        repo_id (`str`, *optional*): Hub id of the repository holding the tokenizer.
        subfolder (`str`, *optional*, defaults to `"tokenizer"`): Folder of the tokenizer inside `repo_id`
            (`None` when the tokenizer is the repository's root).
        baselines (`dict[str, float]`, *optional*): Reconstruction r of baseline tokenizers measured in the same run
            (`{"k-means, 128 centroids": 0.99}`).
        eval_split (`str`, *optional*, defaults to `"test"`): Split the metrics were measured on.
        template_kwargs: Extra Jinja variables that override the defaults.

    Returns:
        `huggingface_hub.ModelCard`.
    """
    template_kwargs.setdefault("subfolder_argument", f', subfolder="{subfolder}"' if subfolder else "")
    if repo_id and subfolder:
        template_kwargs.setdefault("model_title", f"{repo_id.split('/')[-1]} tokenizer")
    return _render(
        "tokenizer",
        metrics,
        config_summary,
        training_summary,
        repo_id,
        baselines,
        task_type="feature-extraction",
        task_name="Calcium trace tokenization (reconstruction)",
        pipeline_tag="feature-extraction",
        eval_split=eval_split,
        datasets=None,
        template_kwargs=template_kwargs,
    )


def _size_category(num_rows: int) -> str:
    for bound, label in ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M")):
        if num_rows < bound:
            return label
    return "1M<n<10M" if num_rows < 10_000_000 else "n>10M"


def _describe_dataset(dataset: Any) -> tuple[list[tuple[str, str]], list[tuple[str, str]], int]:
    """(feature rows, split rows, total rows) from a `datasets.Dataset`/`DatasetDict` or a `{split: num_rows}` dict."""
    if hasattr(dataset, "features") and hasattr(dataset, "num_rows") and not hasattr(dataset, "keys"):
        dataset = {"train": dataset}
    splits: dict[str, int] = {}
    features: dict[str, str] = {}
    for split, value in dict(dataset).items():
        if hasattr(value, "num_rows"):
            splits[split] = int(value.num_rows)
            for name, feature in value.features.items():
                features.setdefault(name, repr(feature))
        elif isinstance(value, int) and not isinstance(value, bool):
            splits[split] = value
        else:
            raise ValueError(
                f"Split {split!r} is a {type(value).__name__}; pass a DatasetDict, a Dataset or a dict of "
                "split -> number of rows."
            )
    return list(features.items()), [(split, str(rows)) for split, rows in splits.items()], sum(splits.values())


def render_dataset_card(
    dataset: Any,
    generation_parameters: dict,
    repo_id: str | None = None,
    *,
    features: dict[str, str] | None = None,
    description: str | None = None,
    license: str = "apache-2.0",
    **template_kwargs: Any,
) -> DatasetCard:
    """Render the card of a CalM (tokenized) trial dataset.

    Args:
        dataset (`datasets.DatasetDict`, `datasets.Dataset` or `dict[str, int]`):
            The dataset itself (features and split sizes are read from it) or `{split: number_of_rows}`.
        generation_parameters (`dict`):
            How the data were made: simulator settings (neurons, trials, steps, dt, g, kernel...), preprocessing,
            tokenizer checkpoint, seeds.
        repo_id (`str`, *optional*): Hub id of the dataset (usage snippet and title).
        features (`dict[str, str]`, *optional*): Feature name -> description; overrides what is read from `dataset`.
        description (`str`, *optional*): Opening paragraph.
        license (`str`, *optional*, defaults to `"apache-2.0"`): Licence of the data.
        template_kwargs: Extra Jinja variables that override the defaults.

    Returns:
        `huggingface_hub.DatasetCard`.
    """
    feature_rows, split_rows, total_rows = _describe_dataset(dataset)
    if features is not None:
        feature_rows = list(features.items())
    repo_id = repo_id or "calm-base-dataset"
    card_data = DatasetCardData(
        license=license,
        pretty_name=f"CalM tokenized trials ({repo_id.split('/')[-1]})",
        task_categories=["time-series-forecasting"],
        tags=["neuroscience", "calcium-imaging", "simulated", "calm_hf"],
        size_categories=[_size_category(total_rows)],
        source_datasets=["original"],
    )
    kwargs = dict(
        dataset_title=card_data.pretty_name,
        repo_id=repo_id,
        description=description
        or (
            "Trials of simulated calcium imaging (CalM benchmark protocol: chaotic rate RNN, Poisson spikes, "
            "double-exponential calcium kernel, 5 Hz), z-scored per neuron, with their CalM tokenizer codes "
            "(`input_ids`, one token per 4-frame window) next to the traces (`input_values`)."
        ),
        feature_rows=feature_rows,
        split_rows=split_rows,
        total_rows=total_rows,
        generation_rows=_flatten(generation_parameters),
        license=license,
        license_note="The data are simulated; no animal recordings are included.",
        citation=CALM_CITATION,
    )
    kwargs.update(template_kwargs)
    return DatasetCard.from_template(card_data, template_path=template_path("dataset_card.md"), **kwargs)


def measured_limitations(metrics: dict) -> list[str]:
    """Plain statements of where this run's model falls short of the baselines measured with it."""
    best_calm = max(v for k, v in metrics.items() if k.startswith("forecast_pearson_r"))
    lines = []
    if best_calm < metrics["ridge_ar_pearson_r"]:
        lines.append(
            f"In this run the model forecasts WORSE than a population ridge autoregression fitted per session "
            f"(best CalM Pearson r {best_calm:.3f} vs ridge AR {metrics['ridge_ar_pearson_r']:.3f} on the same test "
            "trials): for forecasting alone, the linear model is the better tool at this training budget."
        )
    greedy = metrics.get("forecast_pearson_r_greedy")
    if greedy is not None and greedy < best_calm - 0.05:
        lines.append(
            f"Greedy (argmax) rollouts drift to typical codes (r {greedy:.3f}); average several sampled rollouts "
            "(`num_samples` in the pipeline) instead."
        )
    return lines
