"""Make a saved CalM checkpoint folder complete: the tokenizer in `tokenizer/`, the trace processor
(`preprocessor_config.json`), and the remote-code files and `custom_pipelines` entry that let
`pipeline("neural-forecasting", model=..., trust_remote_code=True)` (or `"time-series-forecasting"`) work in a Python
without calm_hf.

Every stage that saves a dual-axis transformer (pretrain, adapt, finetune-behavior, the main job, `CalmTrainer` and
so the Trainer's `push_to_hub=True`) calls `complete_checkpoint` after `save_pretrained`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .registration import PIPELINE_TASKS

# The pipeline module and the siblings it imports; modeling/configuration files are copied by save_pretrained.
REMOTE_PIPELINE_FILES = ("pipeline_neural_forecasting.py", "forecasting.py", "processing_calm.py",
                         "population_readout.py")
# both task names, as with calm_hf installed: the pipeline's own and the Hub's tag for it
CUSTOM_PIPELINES = {
    task: {
        "impl": "pipeline_neural_forecasting.NeuralForecastingPipeline",
        "pt": ["AutoModelForCausalLM"],
        "tf": [],
        "type": "time_series",
    }
    for task in PIPELINE_TASKS
}


def complete_checkpoint(folder: str | os.PathLike, tokenizer=None, processor=None) -> Path:
    """Add what a checkpoint folder needs besides the weights.

    Args:
        folder (`str` or `os.PathLike`): a folder with `config.json` written by `save_pretrained` of a CalM model.
        tokenizer (`CalmTokenizer`, *optional*): saved to `folder/tokenizer` when that folder has no config yet.
        processor (`CalmTraceProcessor`, *optional*): saved as `preprocessor_config.json`; default: one matching the
            model config (its `frame_rate_hz` and `window_size`) unless the folder already has one.

    Returns:
        `Path` of the folder.
    """
    from .configuration_calm import CalmConfig
    from .processing_calm import CalmTraceProcessor

    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} is missing; save the model with save_pretrained({str(folder)!r}) first.")
    if tokenizer is not None and not (folder / "tokenizer" / "config.json").is_file():
        tokenizer.save_pretrained(folder / "tokenizer")
    if processor is not None or not (folder / "preprocessor_config.json").is_file():
        if processor is None:
            processor = CalmTraceProcessor.from_model_config(CalmConfig.from_pretrained(folder))
        processor.save_pretrained(folder)
    package = Path(__file__).resolve().parent
    for name in REMOTE_PIPELINE_FILES:
        shutil.copyfile(package / name, folder / name)
    # transformers resolves the remote code of a `subfolder=` load at the repository root, so the tokenizer's code
    # files go there too: AutoModel.from_pretrained(repo, subfolder="tokenizer", trust_remote_code=True) works.
    for path in sorted((folder / "tokenizer").glob("*.py")):
        shutil.copyfile(path, folder / path.name)
    config = json.loads(config_path.read_text())
    before = json.dumps(config, sort_keys=True)
    # A behaviour head does not forecast traces, so no forecasting pipeline is advertised for it (its save_pretrained
    # already wrote its AutoModelForTimeSeriesPrediction entry and copied its remote code).
    if "CalmForBehaviorRegression" not in (config.get("architectures") or []):
        config["custom_pipelines"] = CUSTOM_PIPELINES
    if json.dumps(config, sort_keys=True) != before:
        tmp = config_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, config_path)
    return folder
