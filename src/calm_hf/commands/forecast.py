"""`calm forecast`: forecast traces from a recording file with the `neural-forecasting` pipeline.

    calm forecast --model calm-base --traces traces.npy --horizon 60 [--sampling_rate 30] [--num_samples 20]
                  [--holdout] [--plot out.png]

Reads .npy `(neurons, frames)`, .npz with a `traces` array (and optional `fs`), .nwb, CaImAn .hdf5 or a suite2p
folder; writes `--output` (.npz with `forecast`, and `samples` / quantiles when sampled, `truth` / `pearson_r` with
`--holdout`).
"""

from __future__ import annotations

import os
import sys
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import claim_output_file, partial_path
from . import OutputArguments, parse_command_args, run_command

# what marks the files `calm forecast` writes (an entry of the .npz, the PNG's Software field), so it may replace them
WRITTEN_BY = "calm forecast"


@dataclass
class ForecastArguments:
    model: str = field(metadata={"help": "Checkpoint folder or hub id, e.g. calm-base."})
    traces: str = field(metadata={"help": ".npy (neurons, frames), .npz with a `traces` array, .nwb, CaImAn .hdf5 or "
                                          "a suite2p folder."})
    horizon: int = field(metadata={"help": "Frames to forecast at --sampling_rate."})
    sampling_rate: float | None = field(default=None, metadata={"help": "Hz of the input; default: the file's or the "
                                                                         "model's."})
    num_samples: int = field(default=1, metadata={"help": "Sampled futures (a 5-95 percentile band when > 1)."})
    session: str | None = field(default=None, metadata={"help": "Session name the model knows (`calm adapt`)."})
    output: str = field(default="forecast.npz", metadata={"help": "Where the forecast .npz is written."})
    holdout: bool = field(
        default=False,
        metadata={"help": "Hold out the last --horizon frames as the truth: forecast them from the frames before, "
                          "report the Pearson r (per neuron over the horizon, averaged) and draw them with --plot."},
    )
    plot: str | None = field(default=None, metadata={"help": "Write a figure (e.g. out.png): context, truth, forecast."})
    plot_neurons: int = field(default=4, metadata={"help": "Neurons drawn by --plot."})


def _read_npz_traces(path: str, sampling_rate: float | None) -> tuple[np.ndarray, float | None]:
    with np.load(path, allow_pickle=False) as data:
        if "traces" not in data:
            raise ValueError(f"{path} holds {sorted(data.files)} but no `traces` array.")
        fs = float(data["fs"]) if "fs" in data and sampling_rate is None else sampling_rate
        return data["traces"], fs


def load_traces(path: str, sampling_rate: float | None) -> tuple[np.ndarray, float | None]:
    """(traces `(neurons, frames)`, sampling rate or None) of a recording file, with a clear error for files that are
    truncated, corrupt or of another format."""
    try:
        if path.endswith(".npz"):
            return _read_npz_traces(path, sampling_rate)
        if path.endswith(".npy"):
            traces = np.load(path, allow_pickle=False)
            if isinstance(traces, np.lib.npyio.NpzFile):  # an .npz archive under a .npy name
                traces.close()
                return _read_npz_traces(path, sampling_rate)
            return traces, sampling_rate
        from ..data import load_recording  # .nwb, CaImAn .hdf5/.h5, a suite2p folder: the readers of `calm prepare`

        recording = load_recording(path)
        return recording.traces, sampling_rate or recording.fs
    except (zipfile.BadZipFile, EOFError, OSError, ValueError) as error:
        if isinstance(error, FileNotFoundError) or (isinstance(error, ValueError) and path in str(error)):
            raise
        # truncated/corrupt archives and renamed files otherwise fail with "File is not a zip file" and no path
        raise ValueError(
            f"{path} is not a readable recording ({type(error).__name__}: {error}); it may be truncated, "
            "corrupt or of another format. Save it again with np.save / np.savez."
        ) from error


def written_by_forecast(path: Path) -> bool:
    """Whether `path` is an earlier output of `calm forecast`: an .npz holding its `written_by` entry, or a PNG figure
    whose metadata names it."""
    try:
        if zipfile.is_zipfile(path):
            with np.load(path, allow_pickle=False) as data:
                return "written_by" in data.files and str(data["written_by"]) == WRITTEN_BY
        from PIL import Image

        with Image.open(path) as image:
            return image.info.get("Software") == WRITTEN_BY
    except Exception:  # noqa: BLE001 - unreadable or of another format: not ours
        return False


def _save_npz(path: Path, arrays: dict) -> None:
    """`np.savez` under the exact name given (no `.npz` appended), via `<path>.partial` + fsync + rename."""
    staging = partial_path(path)
    with open(staging, "wb") as handle:
        np.savez(handle, written_by=np.str_(WRITTEN_BY), **arrays)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)


def _forecast_with_warnings(args: ForecastArguments, traces: np.ndarray, fs: float | None) -> dict:
    from transformers import pipeline  # the task is registered by calm_hf/__init__, already imported here

    forecaster = pipeline("neural-forecasting", model=args.model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = forecaster(traces, sampling_rate=fs, horizon=args.horizon, num_samples=args.num_samples,
                         session=args.session)
    for warning in caught:
        print(f"calm forecast: warning: {warning.message}", file=sys.stderr)
    return out


def run(argv: list[str] | None = None) -> dict:
    """Parse `argv` (see `ForecastArguments`), forecast, write `--output` (and `--plot`), return the pipeline output."""
    args, output = parse_command_args((ForecastArguments, OutputArguments), argv, prog="calm forecast")
    inputs = [args.traces, args.model]
    target = claim_output_file(args.output, "forecast", inputs, output.overwrite, is_own=written_by_forecast)
    if args.plot:
        claim_output_file(args.plot, "forecast", inputs + [target], output.overwrite, is_own=written_by_forecast)
    traces, fs = load_traces(args.traces, args.sampling_rate)
    model_path = os.path.expanduser(args.model)
    if (os.path.isabs(model_path) or model_path.startswith(".")) and not os.path.isdir(model_path):
        raise FileNotFoundError(f"No checkpoint folder at {args.model}; pass the folder written by `calm main`.")
    truth = None
    if args.holdout:
        if traces.shape[-1] <= args.horizon:
            raise SystemExit(f"calm forecast: --holdout needs more than --horizon={args.horizon} frames.")
        traces, truth = traces[..., : -args.horizon], traces[..., -args.horizon :]
    out = _forecast_with_warnings(args, traces, fs)
    arrays = {"forecast": out["forecast"]}
    if out["samples"] is not None:
        arrays["samples"] = out["samples"]
    if out["quantiles"] is not None:  # the quantile head's band, or the samples'
        arrays.update({f"quantile_{q:g}": v for q, v in out["quantiles"].items()})
    summary = f"wrote {args.output}: forecast {out['forecast'].shape} at {out['sampling_rate']} Hz"
    if truth is not None:
        from ..metrics.functional import forecast_pearson_r

        arrays["truth"] = truth
        r = float(forecast_pearson_r(out["forecast"][None], truth[None])["pearson_r"])
        arrays["pearson_r"] = np.float64(r)
        # in the units of the file, and against the simplest forecast a user has: the last second held flat
        last_second = max(1, int(round(float(out["sampling_rate"]))))
        flat = np.repeat(traces[..., -last_second:].mean(axis=-1, keepdims=True), args.horizon, axis=-1)
        arrays["mse"] = np.float64(np.mean((out["forecast"] - truth) ** 2))
        arrays["last_second_mean_mse"] = np.float64(np.mean((flat - truth) ** 2))
        summary += (f"; vs the held-out {args.horizon} frames: forecast Pearson r = {r:.3f}, MSE = "
                    f"{float(arrays['mse']):.4g} (the last second's mean held flat: MSE "
                    f"{float(arrays['last_second_mean_mse']):.4g})")
    _save_npz(target, arrays)
    if args.plot:
        from ..figures import plot_forecast

        quantiles = out["quantiles"] or {}
        plot_forecast(args.plot, np.asarray(traces, dtype=np.float64), out["forecast"], float(out["sampling_rate"]),
                      truth=truth, lower=quantiles.get(0.05), upper=quantiles.get(0.95), neurons=args.plot_neurons,
                      context_frames=3 * args.horizon, software=WRITTEN_BY)
        summary += f"; figure {args.plot}"
    print(summary)
    return out


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-forecast` (and `calm forecast`): returns the exit code."""
    return run_command("forecast", lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
