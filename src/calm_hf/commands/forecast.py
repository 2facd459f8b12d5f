"""`calm forecast`: forecast traces from a recording file with the `neural-forecasting` pipeline.

    calm forecast --model calm-base --traces traces.npy --horizon 60 [--sampling_rate 30] [--num_samples 20]
                  [--holdout] [--plot out.png] [--plot_kind heatmap] [--max_memory_gib 2]
    calm forecast --model calm-base --traces traces.npy --horizon 60 --stream [--speed 10]

Reads .npy `(neurons, frames)`, .npz with a `traces` array (and optional `fs`, `roi_ids`), .nwb, CaImAn .hdf5 or a
suite2p folder (`--sampling_rate` replaces the rate the file stores, so a suite2p folder without ops.npy reads too);
writes `--output` (.npz with `forecast`, its quantile bands, `neuron_ids` (the rows of the input) and, when the
recording names them, `roi_ids` (suite2p ROI index, CaImAn component, NWB ROI id); `truth`, `pearson_r`, `mse` and the
last second's mean's `last_second_mean_mse` with `--holdout`). `--plot` draws the forecast in seconds, titled with
the recording, the model and the horizon, the neurons labelled by their ROI ids, and a heatmap of every neuron for
large recordings.

`--stream` replays the file frame by frame at its frame rate (times `--speed`) through `CalmStreamingForecaster`, as
a closed-loop experiment would see it, and writes the rolling forecasts instead (see `stream`).
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
    sampling_rate: float | None = field(default=None, metadata={"help": "Hz of the input, replacing the rate the file "
                                                                         "stores; default: the file's, else the "
                                                                         "model's."})
    num_samples: int = field(default=1, metadata={"help": "Sampled futures (a 5-95 percentile band when > 1)."})
    session: str | None = field(default=None, metadata={"help": "Table-identity models: a session name the model "
                                                                 "knows (`calm adapt`)."})
    output: str = field(default="forecast.npz", metadata={"help": "Where the forecast .npz is written."})
    holdout: bool = field(
        default=False,
        metadata={"help": "Hold out the last --horizon frames as the truth: forecast them from the frames before, "
                          "report the Pearson r (per neuron over the horizon, averaged) and draw them with --plot."},
    )
    plot: str | None = field(default=None, metadata={"help": "Write a figure (e.g. out.png): context, truth, forecast."})
    plot_neurons: int = field(default=4, metadata={"help": "Neurons drawn by --plot as traces (the most variable)."})
    plot_kind: str = field(
        default="auto", metadata={"help": "traces (one panel per neuron), heatmap (every neuron a row) or auto (the "
                                          "heatmap above 30 neurons)."})
    units: str | None = field(default=None, metadata={"help": "What the traces are, for the plot's axis (e.g. dF/F); "
                                                               "default: what the file says, where it does."})
    max_memory_gib: float | None = field(
        default=None, metadata={"help": "Working memory of the forecast in GiB (recordings, sampled futures and "
                                        "neurons are processed in chunks that fit it); default: the forecaster's."})
    choose_identity: bool = field(
        default=True,
        metadata={"help": "Data-identity models: check on chunks of the recording before the context how much of the "
                          "neurons' identity to read (whole, without the coupling between neurons, or zero-shot); "
                          "false reads all of it."})
    stream: bool = field(
        default=False,
        metadata={"help": "Replay the file frame by frame at its frame rate and update the forecast as each frame "
                          "arrives (KV caches, no recomputation of the past); writes the rolling forecasts."})
    speed: float = field(default=1.0, metadata={"help": "--stream: replay this many times faster than real time."})
    baseline_seconds: float = field(
        default=60.0, metadata={"help": "--stream: the first seconds of the file set each neuron's z-score statistics "
                                        "and data identity (a stream cannot read its future), and are replayed too."})


@dataclass
class RecordingFile:
    """What `calm forecast` reads from a recording file: traces `(neurons, frames)`, their rate (None: not stated) and
    what names the neurons and the units, where the file says."""

    traces: np.ndarray
    sampling_rate: float | None
    name: str
    roi_ids: np.ndarray | None = None
    roi_planes: np.ndarray | None = None
    units: str | None = None


def _read_npz_traces(path: str, sampling_rate: float | None) -> RecordingFile:
    from ..data.io import check_roi_ids

    with np.load(path, allow_pickle=False) as data:
        if "traces" not in data:
            raise ValueError(f"{path} holds {sorted(data.files)} but no `traces` array.")
        fs = float(data["fs"]) if "fs" in data and sampling_rate is None else sampling_rate
        traces = data["traces"]
        roi_ids = check_roi_ids(data["roi_ids"], traces.shape[0], path) if "roi_ids" in data else None
        return RecordingFile(traces, fs, Path(path).stem, roi_ids)


def load_traces(path: str, sampling_rate: float | None) -> RecordingFile:
    """The recording in a file (`RecordingFile`), with a clear error for files that are truncated, corrupt or of
    another format. `sampling_rate` replaces the rate the file stores (and lets a file without one be read)."""
    try:
        if path.endswith(".npz"):
            return _read_npz_traces(path, sampling_rate)
        if path.endswith(".npy"):
            traces = np.load(path, allow_pickle=False)
            if isinstance(traces, np.lib.npyio.NpzFile):  # an .npz archive under a .npy name
                traces.close()
                return _read_npz_traces(path, sampling_rate)
            return RecordingFile(traces, sampling_rate, Path(path).stem)
        from ..data import load_recording  # .nwb, CaImAn .hdf5/.h5, a suite2p folder: the readers of `calm prepare`

        recording = load_recording(path, sampling_rate=sampling_rate)
        planes = recording.extras.get("plane")
        several = planes is not None and len(np.unique(planes)) > 1
        return RecordingFile(recording.traces, recording.fs, recording.name, recording.extras.get("roi_ids"),
                             np.asarray(planes) if several else None, recording.extras.get("units"))
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


def _looks_local(name: str) -> bool:
    """Whether `--model` can only be a folder: a Hub id is `namespace/name` (no dots or slashes in front)."""
    return name.startswith((".", "/", "~")) or name.count("/") != 1


def load_forecaster(model: str):
    """The `neural-forecasting` pipeline of `--model`: a folder, else a Hub id; a name that is neither is refused as
    "no such folder" (not as a failed connection to the Hub)."""
    from transformers import pipeline  # the task is registered by calm_hf/__init__, already imported here

    path = os.path.expanduser(model)
    missing = (f"--model {model}: no such folder ({os.path.abspath(path)}); pass the folder `calm main` wrote "
               "(e.g. calm-base) or a Hub id namespace/name")
    if not os.path.isdir(path):
        if _looks_local(model):
            raise FileNotFoundError(missing + ".")
        try:
            return pipeline("neural-forecasting", model=model)
        except OSError as error:
            raise FileNotFoundError(f"{missing}; the Hub has no model {model} reachable from here "
                                    f"({str(error).splitlines()[0]}).") from error
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"--model {model}: {path} has no config.json, so it is not a checkpoint folder; pass "
                                "the folder `calm main` or `calm adapt` wrote.")
    return pipeline("neural-forecasting", model=path)


def _forecast_with_warnings(args: ForecastArguments, forecaster, traces: np.ndarray, fs: float | None) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        budget = {} if args.max_memory_gib is None else {"max_memory_gib": args.max_memory_gib}
    out = forecaster(traces, sampling_rate=fs, horizon=args.horizon, num_samples=args.num_samples,
                     session=args.session, **budget)
    for warning in caught:
        print(f"calm forecast: warning: {warning.message}", file=sys.stderr)
    return out


def last_second_mean(context: np.ndarray, horizon: int, sampling_rate: float) -> np.ndarray:
    """The simplest forecast a user has: each neuron's mean over the context's last second, held flat for `horizon`
    frames `(neurons, horizon)`."""
    last_second = max(1, int(round(float(sampling_rate))))
    return np.repeat(context[..., -last_second:].mean(axis=-1, keepdims=True), horizon, axis=-1)


def holdout_scores(forecast: np.ndarray, truth: np.ndarray, context: np.ndarray, sampling_rate: float) -> dict:
    """Pearson r and MSE of the forecast against the held-out frames, in the file's units, beside the MSE of
    `last_second_mean`."""
    from ..metrics.functional import forecast_pearson_r

    horizon = truth.shape[-1]
    flat = last_second_mean(context, horizon, sampling_rate)
    return {"pearson_r": float(forecast_pearson_r(forecast[None], truth[None])["pearson_r"]),
            "mse": float(np.mean((forecast - truth) ** 2)), "baseline_mse": float(np.mean((flat - truth) ** 2)),
            "horizon": horizon}


def run(argv: list[str] | None = None) -> dict:
    """Parse `argv` (see `ForecastArguments`), forecast, write `--output` (and `--plot`), return the pipeline output."""
    from ..figures import PLOT_KINDS

    args, output = parse_command_args((ForecastArguments, OutputArguments), argv, prog="calm forecast")
    if args.plot_kind not in PLOT_KINDS:
        raise ValueError(f"--plot_kind must be one of {', '.join(PLOT_KINDS)}, got {args.plot_kind!r}.")
    inputs = [args.traces, args.model]
    target = claim_output_file(args.output, "forecast", inputs, output.overwrite, is_own=written_by_forecast)
    if args.plot:
        claim_output_file(args.plot, "forecast", inputs + [target], output.overwrite, is_own=written_by_forecast)
    recording = load_traces(args.traces, args.sampling_rate)
    traces, fs = recording.traces, recording.sampling_rate
    forecaster = load_forecaster(args.model)
    forecaster.forecaster.choose_identity = args.choose_identity
    if args.stream:
        return stream(args, recording, forecaster, target)
    truth = None
    if args.holdout:
        if traces.shape[-1] <= args.horizon:
            raise SystemExit(f"calm forecast: --holdout needs more than --horizon={args.horizon} frames.")
        traces, truth = traces[..., : -args.horizon], traces[..., -args.horizon :]
    if fs is None:
        print(f"calm forecast: warning: {args.traces} does not state its frame rate; it is taken to be the model's "
              f"{forecaster.trace_processor.sampling_rate:g} Hz (pass --sampling_rate if it is not)", file=sys.stderr)
    out = _forecast_with_warnings(args, forecaster, traces, fs)
    rate = float(out["sampling_rate"])
    arrays = {"forecast": out["forecast"], "sampling_rate": np.float64(rate),
              "neuron_ids": np.arange(traces.shape[0], dtype=np.int64)}
    if recording.roi_ids is not None:
        arrays["roi_ids"] = np.asarray(recording.roi_ids, dtype=np.int64)
    if recording.roi_planes is not None:
        arrays["roi_planes"] = np.asarray(recording.roi_planes, dtype=np.int64)
    if out["samples"] is not None:
        arrays["samples"] = out["samples"]
    if out["quantiles"] is not None:  # the quantile head's band, or the samples'
        arrays.update({f"quantile_{q:g}": v for q, v in out["quantiles"].items()})
    summary = f"wrote {args.output}: forecast {out['forecast'].shape} at {rate:g} Hz"
    scores = None
    if truth is not None:
        scores = holdout_scores(out["forecast"], truth, np.asarray(traces, dtype=np.float64), rate)
        arrays.update(truth=truth, pearson_r=np.float64(scores["pearson_r"]), mse=np.float64(scores["mse"]),
                      last_second_mean_mse=np.float64(scores["baseline_mse"]))
        summary += (f"; vs the held-out {args.horizon} frames: forecast Pearson r = {scores['pearson_r']:.3f}, MSE = "
                    f"{scores['mse']:.4g} (the last second's mean held flat: MSE {scores['baseline_mse']:.4g})")
    _save_npz(target, arrays)
    if args.plot:
        kind = plot(args, recording, np.asarray(traces, dtype=np.float64), out, truth, scores)
        summary += f"; figure {args.plot} ({kind})"
    print(summary)
    return out


def _stream_identity(args: ForecastArguments, pipe, baseline: np.ndarray) -> dict:
    """The identity inputs of `CalmStreamingForecaster` for the replayed neurons: a data identity from the z-scored
    model-rate `baseline` (neurons, frames), as much of it as forecasts well on its 20 s chunks
    (`CalmForecaster.reference_identity`), or a table model's session ids."""
    from ..forecasting import context_token_steps
    from ..pipeline_neural_forecasting import history_chunks

    if pipe.forecaster.uses_data_identity:
        chunks = history_chunks(baseline.astype(np.float32), pipe.trace_processor.window_size)
        if chunks is None:
            return {"neuron_identity": pipe.forecaster.neuron_identity(None, num_neurons=baseline.shape[0])}
        config = pipe.model.config
        context = (context_token_steps(config) or config.max_token_steps) * config.window_size
        return {"neuron_identity": pipe.forecaster.reference_identity(chunks, context)[0]}
    session_id, neuron_ids = pipe._resolve_session(args.session, baseline.shape[0], None)
    return {"neuron_ids": neuron_ids, "session_ids": session_id}


def stream(args: ForecastArguments, recording: RecordingFile, pipe, target: Path) -> dict:
    """`--stream`: feed the recording to a `CalmStreamingForecaster` one input frame at a time, at the file's rate times
    `--speed`. Input frames are block-averaged to the model rate (a model frame when its `1 / rate` s have passed) and
    z-scored with the statistics of the first `--baseline_seconds`. Writes `--output` with the one-frame-ahead
    forecast after every model frame (`forecast_next`, (updates, neurons), file units), their times (`times`, s), the
    seconds each update took (`update_seconds`) and the last forecast (`forecast`, (neurons, horizon) at the model rate,
    with its 5-95% band when the model has a quantile head)."""
    import time

    from ..streaming import CalmStreamingForecaster

    processor = pipe.trace_processor
    traces = np.asarray(recording.traces, dtype=np.float64)
    fs = recording.sampling_rate or processor.sampling_rate
    if args.speed <= 0 or args.baseline_seconds <= 0:
        raise ValueError(f"--speed and --baseline_seconds must be positive, got {args.speed} and {args.baseline_seconds}.")
    baseline_frames = max(2, min(traces.shape[-1], int(round(args.baseline_seconds * fs))))
    features = processor(traces[None, :, :baseline_frames], sampling_rate=fs)
    mean, std = features["mean"][0][:, None], features["std"][0][:, None]  # (neurons, 1): the baseline's statistics
    baseline = processor.resample((traces[:, :baseline_frames] - mean) / std, fs)
    horizon = processor.model_horizon(args.horizon, fs)
    streamer = CalmStreamingForecaster(pipe.forecaster, traces.shape[0], horizon=horizon,
                                       **_stream_identity(args, pipe, baseline))
    per_model_frame = fs / processor.sampling_rate
    start, pending, times, nexts, seconds, latest = time.perf_counter(), [], [], [], [], None
    for index in range(traces.shape[-1]):
        delay = start + index / (fs * args.speed) - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        pending.append(traces[:, index])
        if (index + 1) < (len(times) + 1) * per_model_frame:
            continue
        frame = ((np.mean(pending, axis=0) - mean[:, 0]) / std[:, 0]).astype(np.float32)
        pending = []
        began = time.perf_counter()
        latest = streamer.update(frame)
        seconds.append(time.perf_counter() - began)
        times.append((index + 1) / fs)
        nexts.append(np.full(traces.shape[0], np.nan) if latest is None else latest.forecast[:, 0] * std[:, 0] + mean[:, 0])
    if latest is None:
        raise ValueError(f"{args.traces} is shorter than one token window at the model rate: nothing was forecast.")
    arrays = {"forecast_next": np.stack(nexts), "times": np.asarray(times), "update_seconds": np.asarray(seconds),
              "forecast": latest.forecast * std + mean, "sampling_rate": np.float64(processor.sampling_rate),
              "neuron_ids": np.arange(traces.shape[0], dtype=np.int64)}
    if latest.quantiles is not None:
        levels = np.asarray(latest.quantile_levels)
        for level in (0.05, 0.95):
            arrays[f"quantile_{level:g}"] = latest.quantiles[..., int(np.abs(levels - level).argmin())] * std + mean
    _save_npz(target, arrays)
    print(f"wrote {args.output}: {len(times)} streamed updates of {traces.shape[0]} neurons; update time median "
          f"{1e3 * float(np.median(seconds)):.2f} ms, max {1e3 * float(np.max(seconds)):.2f} ms")
    return arrays


def plot(args: ForecastArguments, recording: RecordingFile, context: np.ndarray, out: dict, truth, scores) -> str:
    """`--plot`: the figure of the forecast, titled with the recording, the model and the horizon."""
    from ..figures import neuron_labels, plot_forecast

    rate = float(out["sampling_rate"])
    quantiles = out["quantiles"] or {}
    band = "5-95% band (quantile head)" if out["samples"] is None else f"5-95% of {args.num_samples} sampled futures"
    model = Path(os.path.expanduser(args.model)).name or args.model
    title = (f"{recording.name}: {context.shape[0]} neurons at {rate:g} Hz, forecast {args.horizon} frames "
             f"({args.horizon / rate:.3g} s) ahead by {model}")
    baseline = None if truth is None else last_second_mean(context, args.horizon, rate)
    return plot_forecast(args.plot, context, out["forecast"], rate, truth=truth, lower=quantiles.get(0.05),
                         upper=quantiles.get(0.95), neurons=args.plot_neurons, context_frames=3 * args.horizon,
                         software=WRITTEN_BY, kind=args.plot_kind, title=title, scores=scores, baseline=baseline,
                         units=args.units or recording.units or f"units of {Path(args.traces).name}",
                         labels=neuron_labels(context.shape[0], recording.roi_ids, recording.roi_planes),
                         band_label=band)


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-forecast` (and `calm forecast`): returns the exit code."""
    return run_command("forecast", lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
