"""`calm` console script: the stages users run daily, each one a training script of `training/`.

    calm main [--fresh] [--size tiny]          # the whole pipeline -> ./calm-base
    calm prepare --output_dir runs/trials       # simulate, or --npz files
    calm train-tokenizer --trials_dataset ... --output_dir ...
    calm tokenize --tokenizer_path ... --trials_dataset ... --output_dir ...
    calm pretrain --tokenized_dataset ... --tokenizer_path ... --output_dir ...
    calm adapt --model_path calm-base --tokenized_dataset ... --session_name ... --output_dir ...
    calm finetune-behavior ...
    calm forecast --model calm-base --traces traces.npy --horizon 60 [--sampling_rate 30] [--num_samples 20]
                  [--holdout] [--plot out.png]
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


def plot_forecast(path, context, forecast, sampling_rate: float, truth=None, lower=None, upper=None,
                  neurons: int = 4, context_frames: int | None = None) -> None:
    """Draw context, truth (when given), forecast and the sampled band (when given) for the first `neurons` neurons.

    Arrays are `(neurons, frames)` at `sampling_rate`; the forecast starts one frame after the context's last frame.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    count = min(int(neurons), context.shape[0])
    shown = context.shape[-1] if context_frames is None else min(context_frames, context.shape[-1])
    past = (np.arange(-shown + 1, 1)) / sampling_rate
    future = np.arange(1, forecast.shape[-1] + 1) / sampling_rate
    figure, axes = plt.subplots(count, 1, figsize=(8, 1.8 * count + 0.6), sharex=True, squeeze=False)
    for row, axis in zip(range(count), axes[:, 0]):
        axis.plot(past, context[row, -shown:], color="0.3", lw=1, label="context")
        if truth is not None:
            axis.plot(future, truth[row], color="black", lw=1, ls="--", label="truth")
        if lower is not None and upper is not None:
            axis.fill_between(future, lower[row], upper[row], color="tab:blue", alpha=0.25, label="5-95% of samples")
        axis.plot(future, forecast[row], color="tab:blue", lw=1.5, label="forecast")
        axis.axvline(0.0, color="0.6", lw=0.8)
        axis.set_ylabel(f"neuron {row}")
    axes[0, 0].legend(loc="upper left", fontsize=7, ncol=4)
    axes[-1, 0].set_xlabel("time from the end of the context (s)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def forecast_command(argv: list[str]) -> None:
    import argparse
    import os
    import warnings

    import numpy as np

    parser = argparse.ArgumentParser(prog="calm forecast", description="Forecast traces from a .npy/.npz file.")
    parser.add_argument("--model", required=True, help="checkpoint folder or hub id, e.g. calm-base")
    parser.add_argument("--traces", required=True, help=".npy (neurons, frames), .npz with a `traces` array, .nwb, "
                        "CaImAn .hdf5 or a suite2p folder")
    parser.add_argument("--horizon", type=int, required=True, help="frames to forecast at --sampling_rate")
    parser.add_argument("--sampling_rate", type=float, default=None, help="Hz of the input; default: the model's")
    parser.add_argument("--num_samples", type=int, default=1)
    parser.add_argument("--session", default=None)
    parser.add_argument("--output", default="forecast.npz")
    parser.add_argument("--holdout", action="store_true",
                        help="hold out the last --horizon frames as the truth: forecast them from the frames before, "
                        "report the Pearson r (per neuron over the horizon, averaged) and draw them with --plot")
    parser.add_argument("--plot", default=None, help="write a figure (e.g. out.png): context, truth, forecast, band")
    parser.add_argument("--plot_neurons", type=int, default=4, help="neurons drawn by --plot")
    args = parser.parse_args(argv)
    from transformers import pipeline

    import calm_hf  # noqa: F401  (registers the task)

    import zipfile

    try:
        if args.traces.endswith(".npz"):
            with np.load(args.traces, allow_pickle=False) as data:
                if "traces" not in data:
                    raise ValueError(f"{args.traces} holds {sorted(data.files)} but no `traces` array.")
                traces = data["traces"]
                fs = float(data["fs"]) if "fs" in data and args.sampling_rate is None else args.sampling_rate
        elif args.traces.endswith(".npy"):
            traces, fs = np.load(args.traces, allow_pickle=False), args.sampling_rate
            if isinstance(traces, np.lib.npyio.NpzFile):  # an .npz archive under a .npy name
                with traces as data:
                    if "traces" not in data:
                        raise ValueError(f"{args.traces} is an .npz archive with {sorted(data.files)} but no `traces`.")
                    traces = data["traces"]
        else:  # .nwb, CaImAn .hdf5/.h5, a suite2p folder: the same readers as `calm prepare`
            from .data import load_recording

            recording = load_recording(args.traces)
            traces, fs = recording.traces, args.sampling_rate or recording.fs
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        if isinstance(error, FileNotFoundError) or (isinstance(error, ValueError) and args.traces in str(error)):
            raise
        # truncated/corrupt archives and renamed files otherwise fail with "File is not a zip file" and no path
        raise ValueError(
            f"{args.traces} is not a readable recording ({type(error).__name__}: {error}); it may be truncated, "
            "corrupt or of another format. Save it again with np.save / np.savez."
        ) from error
    model_path = os.path.expanduser(args.model)
    if (os.path.isabs(model_path) or model_path.startswith(".")) and not os.path.isdir(model_path):
        raise FileNotFoundError(f"No checkpoint folder at {args.model}; pass the folder written by `calm main`.")
    truth = None
    if args.holdout:
        if traces.shape[-1] <= args.horizon:
            raise SystemExit(f"calm forecast: --holdout needs more than --horizon={args.horizon} frames.")
        traces, truth = traces[..., : -args.horizon], traces[..., -args.horizon :]
    forecaster = pipeline("neural-forecasting", model=args.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = forecaster(traces, sampling_rate=fs, horizon=args.horizon, num_samples=args.num_samples,
                         session=args.session)
    for warning in caught:
        print(f"calm forecast: warning: {warning.message}", file=sys.stderr)
    arrays = {"forecast": out["forecast"]}
    if out["samples"] is not None:
        arrays["samples"] = out["samples"]
        arrays.update({f"quantile_{q:g}": v for q, v in out["quantiles"].items()})
    summary = f"wrote {args.output}: forecast {out['forecast'].shape} at {out['sampling_rate']} Hz"
    if truth is not None:
        from .metrics.functional import forecast_pearson_r

        arrays["truth"] = truth
        r = float(forecast_pearson_r(out["forecast"][None], truth[None])["pearson_r"])
        arrays["pearson_r"] = np.float64(r)
        summary += f"; forecast Pearson r vs the held-out {args.horizon} frames = {r:.3f}"
    np.savez(args.output, **arrays)
    if args.plot:
        quantiles = out["quantiles"] or {}
        plot_forecast(args.plot, np.asarray(traces, dtype=np.float64), out["forecast"], float(out["sampling_rate"]),
                      truth=truth, lower=quantiles.get(0.05), upper=quantiles.get(0.95), neurons=args.plot_neurons,
                      context_frames=3 * args.horizon)
        summary += f"; figure {args.plot}"
    print(summary)
    return out


def main(argv: list[str] | None = None) -> int:
    """Run a subcommand and return its exit code (the `calm` console script exits with it): 0 on success, 1 when the
    command fails (the error is printed as one line; set CALM_DEBUG=1 for the traceback), 2 for bad flags."""
    import os

    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command not in (*SCRIPTS, "forecast", "push", "analyze"):
        choices = sorted([*SCRIPTS, "forecast", "push", "analyze"])
        print(f"calm: unknown command {command!r}; choose one of {choices}.", file=sys.stderr)
        return 2
    try:
        if command in SCRIPTS:
            run_script(SCRIPTS[command], rest)
        elif command == "forecast":
            forecast_command(rest)
        elif command == "analyze":
            from .analysis.report import main as analyze_main

            analyze_main(rest)
        else:
            from .hub import main as push_main

            return int(push_main(rest) or 0)
    except KeyboardInterrupt:
        print(f"calm {command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as error:  # argparse (bad flags) and explicit exits keep their code; None/0 means success
        if error.code is None or isinstance(error.code, int):
            return int(error.code or 0)
        print(error.code, file=sys.stderr)
        return 1
    except Exception as error:
        if os.environ.get("CALM_DEBUG"):
            raise
        print(f"calm {command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
