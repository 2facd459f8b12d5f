"""`calm` console script: the stages users run daily, each one a training script of `training/`.

    calm main [--fresh] [--size tiny]          # the whole pipeline -> ./calm-base
    calm prepare --output_dir runs/trials       # simulate, or --npz files
    calm train-tokenizer --trials_dataset ... --output_dir ...
    calm tokenize --tokenizer_path ... --trials_dataset ... --output_dir ...
    calm pretrain --tokenized_dataset ... --tokenizer_path ... --output_dir ...
    calm adapt --model_path calm-base --tokenized_dataset ... --session_name ... --output_dir ...
    calm finetune-behavior ...
    calm forecast --model calm-base --traces traces.npy --horizon 60 [--sampling_rate 30] [--num_samples 20]
    calm push --model_dir calm-base --repo_id you/calm-base [--dataset_dir calm-base-dataset ...]
    calm analyze --model calm-base --dataset calm-base-dataset --labels labels.json --output_dir analysis

Each subcommand takes the flags of its script (`calm pretrain --help`).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

SCRIPTS = {
    "main": "run_all",
    "prepare": "prepare_data",
    "train-tokenizer": "train_tokenizer",
    "tokenize": "tokenize_trials",
    "pretrain": "pretrain",
    "adapt": "adapt_session",
    "finetune-behavior": "finetune_behavior",
}


def training_dir() -> Path:
    """The repository's training/ folder (calm_hf is installed editable from a checkout by scripts/*.sh)."""
    candidate = Path(__file__).resolve().parents[2] / "training"
    if not candidate.is_dir():
        raise SystemExit(
            f"calm: the training scripts were not found at {candidate}. Install calm_hf from a source checkout "
            "(`pip install -e .`, as scripts/main.sh does) to use the training subcommands."
        )
    return candidate


def parse_script_args(dataclass_types: tuple, argv: list[str] | None = None) -> tuple:
    """What every training script does first: parse its dataclasses from the command line, or from a single `.json`
    file of the same fields; set up logging; pick the torch thread count (`calm_hf.hardware.default_num_threads`)."""
    import logging
    import os

    from transformers import HfArgumentParser

    from .hardware import configure_torch_threads

    parser = HfArgumentParser(dataclass_types)
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        parsed = parser.parse_json_file(os.path.abspath(argv[0]))
    else:
        parsed = parser.parse_args_into_dataclasses(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    configure_torch_threads()
    return tuple(parsed)


def load_training_script(name: str):
    """Import training/<name>.py as module `calm_training_<name>` (the training scripts are scripts, not package
    modules); registered in sys.modules first so its dataclasses resolve their annotations."""
    module_name = f"calm_training_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, training_dir() / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[module_name]
        raise
    return module


def run_script(name: str, argv: list[str]):
    sys.argv = [str(training_dir() / f"{name}.py"), *argv]
    return load_training_script(name).main(argv)


def forecast_command(argv: list[str]) -> None:
    import argparse

    import numpy as np

    parser = argparse.ArgumentParser(prog="calm forecast", description="Forecast traces from a .npy/.npz file.")
    parser.add_argument("--model", required=True, help="checkpoint folder, e.g. calm-base")
    parser.add_argument("--traces", required=True, help=".npy (neurons, frames) or .npz with a `traces` array")
    parser.add_argument("--horizon", type=int, required=True, help="frames to forecast at --sampling_rate")
    parser.add_argument("--sampling_rate", type=float, default=None, help="Hz of the input; default: the model's")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--session", default=None)
    parser.add_argument("--output", default="forecast.npz")
    args = parser.parse_args(argv)
    from transformers import pipeline

    import calm_hf  # noqa: F401  (registers the task)

    if args.traces.endswith(".npz"):
        with np.load(args.traces, allow_pickle=False) as data:
            traces = data["traces"]
            fs = float(data["fs"]) if "fs" in data and args.sampling_rate is None else args.sampling_rate
    else:
        traces, fs = np.load(args.traces, allow_pickle=False), args.sampling_rate
    forecaster = pipeline("neural-forecasting", model=args.model)
    out = forecaster(traces, sampling_rate=fs, horizon=args.horizon, num_samples=args.num_samples, session=args.session)
    arrays = {"forecast": out["forecast"]}
    if out["samples"] is not None:
        arrays["samples"] = out["samples"]
        arrays.update({f"quantile_{q:g}": v for q, v in out["quantiles"].items()})
    np.savez(args.output, **arrays)
    print(f"wrote {args.output}: forecast {out['forecast'].shape} at {out['sampling_rate']} Hz")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return
    command, rest = argv[0], argv[1:]
    if command in SCRIPTS:
        run_script(SCRIPTS[command], rest)
    elif command == "forecast":
        forecast_command(rest)
    elif command == "push":
        from .hub import main as push_main

        push_main(rest)
    elif command == "analyze":
        from .analysis.report import main as analyze_main

        analyze_main(rest)
    else:
        raise SystemExit(
            f"calm: unknown command {command!r}; choose one of {sorted([*SCRIPTS, 'forecast', 'push', 'analyze'])}."
        )


if __name__ == "__main__":
    main()
