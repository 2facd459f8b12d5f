"""Registering CalM with the transformers Auto classes and pipeline tasks, as soon as calm_hf and transformers' Auto
classes are both imported.

`import calm_hf` imports nothing heavy, so `calm --help` and the data tools do not pay for torch; yet
`import calm_hf` followed by `AutoModel.from_pretrained("calm-base")` or `pipeline("neural-forecasting", ...)` must
find the models. Every one of those goes through `transformers.models.auto` (the Auto classes; `transformers.pipelines`
imports it), so the registration runs the moment that is imported, at once where it already is. Registering imports
the model modules, which import transformers, so it waits until no module of calm_hf or transformers is half-way
through its import (`calm_hf.modeling_calm` imports transformers on its first lines; `transformers.pipelines` imports
the Auto classes on its). `_AfterImport`, an import hook (`sys.meta_path`), sees both moments and takes itself out
once the registration is done. `calm forecast --help` imports transformers' argument parser but not the Auto classes,
so it does not load torch either.
"""

from __future__ import annotations

import importlib.abc
import sys

# `neural-forecasting` is what the pipeline does; `time-series-forecasting` is the Hub's tag for it (the model card's
# pipeline_tag), so a user who reads the card can use either name
PIPELINE_TASKS = ("neural-forecasting", "time-series-forecasting")
TRIGGER = "transformers.models.auto"
WATCHED = ("calm_hf.", "transformers.")

_registered = False
_importing = 0  # modules of calm_hf and transformers being imported right now, nested


def register() -> None:
    """Register the configurations, models, processor and pipeline tasks with transformers (once; later calls return
    at once). Runs by itself once calm_hf and the Auto classes are both imported; call it to register earlier."""
    global _registered
    if _registered:
        return
    _registered = True
    for finder in [finder for finder in sys.meta_path if isinstance(finder, _AfterImport)]:
        sys.meta_path.remove(finder)
    from transformers import (
        AutoConfig,
        AutoFeatureExtractor,
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForTimeSeriesPrediction,
        AutoProcessor,
    )
    from transformers.pipelines import PIPELINE_REGISTRY

    from .configuration_calm import CalmConfig
    from .configuration_calm_tokenizer import CalmTokenizerConfig
    from .modeling_calm import CalmForCausalNeuralModeling, CalmModel
    from .modeling_calm_behavior import CalmForBehaviorRegression
    from .modeling_calm_tokenizer import CalmTokenizer
    from .pipeline_neural_forecasting import NeuralForecastingPipeline
    from .processing_calm import CalmTraceProcessor

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
    for task in PIPELINE_TASKS:
        if task not in PIPELINE_REGISTRY.supported_tasks:
            PIPELINE_REGISTRY.register_pipeline(task, pipeline_class=NeuralForecastingPipeline,
                                                pt_model=AutoModelForCausalLM, type="time_series")


def register_when_ready() -> None:
    """Register now if the Auto classes are imported and no module of calm_hf or transformers is half-way through its
    import; else leave `_AfterImport` in place to do it at the first moment both hold."""
    if _registered:
        return
    if _importing == 0 and TRIGGER in sys.modules:
        register()
    elif not any(isinstance(finder, _AfterImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AfterImport())


class _AfterImport(importlib.abc.MetaPathFinder):
    """Finds the modules of calm_hf and transformers as the other finders do, but with a loader that counts the
    imports under way and calls `register_when_ready` once each module has run."""

    def find_spec(self, name, path, target=None):
        if not name.startswith(WATCHED) and name != "transformers":
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader)
                return spec
        return None


class _ThenRegister:
    """A module's own loader, followed by `register_when_ready`; the module keeps its own loader as `__loader__`, and
    whoever asks this one for anything else (`get_code` for `python -m`, `get_source`) gets the real loader's."""

    def __init__(self, loader: importlib.abc.Loader):
        self.loader = loader

    def __getattr__(self, name: str):
        return getattr(self.loader, name)

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        global _importing
        module.__loader__ = module.__spec__.loader = self.loader  # importlib.resources and inspect ask the real one
        _importing += 1
        try:
            self.loader.exec_module(module)
        finally:
            _importing -= 1
        register_when_ready()
