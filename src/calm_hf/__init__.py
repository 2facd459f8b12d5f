"""calm_hf: CalM, a self-supervised foundation model for calcium-imaging population dynamics, Hugging Face native.

Importing the package registers the models with the transformers Auto classes and the `"neural-forecasting"`
pipeline task:

    import calm_hf
    from transformers import AutoModel, AutoModelForCausalLM, pipeline
    backbone = AutoModel.from_pretrained("calm-base")
    model = AutoModelForCausalLM.from_pretrained("calm-base")
    forecaster = pipeline("neural-forecasting", model="calm-base")
    processor = AutoFeatureExtractor.from_pretrained("calm-base")   # CalmTraceProcessor saved with the checkpoint
"""

from transformers import (
    AutoConfig,
    AutoFeatureExtractor,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForTimeSeriesPrediction,
    AutoProcessor,
)

from .configuration_calm import CalmConfig
from .configuration_calm_tokenizer import CalmTokenizerConfig
from .forecasting import CalmForecaster
from .modeling_calm import CalmForCausalNeuralModeling, CalmModel, CalmPreTrainedModel
from .modeling_calm_behavior import CalmForBehaviorRegression
from .modeling_calm_tokenizer import CalmTokenizer
from .pipeline_neural_forecasting import NeuralForecastingPipeline
from .processing_calm import CalmTraceProcessor

__version__ = "0.1.0"

__all__ = [
    "CalmConfig",
    "CalmForBehaviorRegression",
    "CalmForCausalNeuralModeling",
    "CalmForecaster",
    "CalmModel",
    "CalmPreTrainedModel",
    "CalmTokenizer",
    "CalmTokenizerConfig",
    "CalmTraceProcessor",
    "NeuralForecastingPipeline",
    "__version__",
]


def _register() -> None:
    from transformers.pipelines import PIPELINE_REGISTRY

    AutoConfig.register(CalmConfig.model_type, CalmConfig, exist_ok=True)
    AutoConfig.register(CalmTokenizerConfig.model_type, CalmTokenizerConfig, exist_ok=True)
    AutoModel.register(CalmConfig, CalmModel, exist_ok=True)
    AutoModel.register(CalmTokenizerConfig, CalmTokenizer, exist_ok=True)
    AutoModelForCausalLM.register(CalmConfig, CalmForCausalNeuralModeling, exist_ok=True)
    AutoModelForTimeSeriesPrediction.register(CalmConfig, CalmForBehaviorRegression, exist_ok=True)
    AutoFeatureExtractor.register(CalmConfig, CalmTraceProcessor, exist_ok=True)
    AutoProcessor.register(CalmConfig, CalmTraceProcessor, exist_ok=True)  # no remote-code prompt for AutoProcessor
    # save_pretrained then writes auto_map and copies processing_calm.py, for trust_remote_code loading
    CalmTraceProcessor.register_for_auto_class("AutoFeatureExtractor")
    if "neural-forecasting" not in PIPELINE_REGISTRY.supported_tasks:
        PIPELINE_REGISTRY.register_pipeline(
            "neural-forecasting",
            pipeline_class=NeuralForecastingPipeline,
            pt_model=AutoModelForCausalLM,
            type="time_series",
        )


_register()
