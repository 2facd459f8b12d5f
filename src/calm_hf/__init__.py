"""calm_hf: CalM, a self-supervised foundation model for calcium-imaging population dynamics, Hugging Face native.

Importing the package registers the models with the transformers Auto classes and the `"neural-forecasting"`
pipeline task (also under the Hub's name for it, `"time-series-forecasting"`):

    import calm_hf
    from transformers import AutoFeatureExtractor, AutoModel, AutoModelForCausalLM, pipeline
    backbone = AutoModel.from_pretrained("calm-base")
    model = AutoModelForCausalLM.from_pretrained("calm-base")
    forecaster = pipeline("neural-forecasting", model="calm-base")
    processor = AutoFeatureExtractor.from_pretrained("calm-base")   # CalmTraceProcessor saved with the checkpoint

The import itself is light: the classes below are imported on first use, and the registration happens the moment
transformers is imported too (`calm_hf.registration`), so `calm --help` does not load torch.
"""

from __future__ import annotations

import importlib
import importlib.util

from . import registration

__version__ = "0.1.0"

# public name -> the module that defines it, imported on first access (PEP 562)
_EXPORTS = {
    "CalmBehaviorRidgeReadout": "behavior_readout",
    "CalmConfig": "configuration_calm",
    "CalmForBehaviorRegression": "modeling_calm_behavior",
    "CalmForCausalNeuralModeling": "modeling_calm",
    "CalmForecaster": "forecasting",
    "CalmModel": "modeling_calm",
    "CalmPreTrainedModel": "modeling_calm",
    "CalmStreamingForecaster": "streaming",
    "CalmTokenizer": "modeling_calm_tokenizer",
    "CalmTokenizerConfig": "configuration_calm_tokenizer",
    "CalmTraceProcessor": "processing_calm",
    "NeuralForecastingPipeline": "pipeline_neural_forecasting",
    "PopulationReadout": "population_readout",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    """`calm_hf.CalmModel` and `from calm_hf import CalmModel` import the defining module; `calm_hf.data` and other
    subpackages import themselves, as they did when the package imported everything up front."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    elif not name.startswith("_") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


registration.register_when_ready()
