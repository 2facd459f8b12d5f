"""`calm prepare`: simulated benchmark or real recordings -> a trial DatasetDict (train/validation/test).

    calm prepare --output_dir runs/sim-trials                      # the paper's simulation
    calm prepare --output_dir runs/zf --npz ../shared/data/triplett2018_zf_tectum_spont/zf_20151104-f1.npz \
        --trial_seconds 20
    calm prepare --output_dir runs/mouse --nwb session.nwb --nwb_behavior speed --trial_seconds 10
    calm prepare --output_dir runs/fov --suite2p path/to/suite2p --trial_seconds 30 [--sampling_rate 30]
    calm prepare --output_dir runs/fov --caiman results.hdf5 --trial_seconds 30

Every recording, whatever its format, is read into a `calm_hf.data.Recording` and cut with `Recording.to_session`:
at its `trial_starts` when it has them (NWB trials table, npz `trial_starts`; `--trial_seconds` then sets the trial
length and may not exceed the gap between starts), else into consecutive `--trial_seconds` windows.

Every session is resampled to the model rate, optionally EMA-smoothed, split 70/15/15 by trial and z-scored with its
training trials' statistics (kept in `calm_sessions.json` beside the dataset so forecasts map back to input units).
Trials cut closer together than their length (`--trial_stride_seconds` below `--trial_seconds`) overlap in time: they
are split in contiguous time blocks separated by one trial length instead of at random, so no frame is in two splits;
`calm_sessions.json` records which split each session got (`split_method`).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field

from ..atomic import claim_output_folder
from ..data import (
    Recording,
    SessionTrials,
    build_trial_dataset,
    load_caiman_recording,
    load_npz_recording,
    load_nwb_recording,
    load_suite2p_recording,
    prepare_session,
    save_trial_dataset,
    simulate_benchmark,
)
from . import OutputArguments, parse_command_args, run_command

logger = logging.getLogger("calm_hf.prepare_data")


@dataclass
class PrepareArguments:
    output_dir: str = field(metadata={"help": "Where the DatasetDict (and calm_sessions.json) is written."})
    npz: list[str] = field(default_factory=list, metadata={"help": "Recordings as .npz files (traces, fs, ...)."})
    nwb: list[str] = field(default_factory=list, metadata={"help": "Recordings as .nwb files (needs calm_hf[nwb])."})
    suite2p: list[str] = field(default_factory=list, metadata={"help": "suite2p output folders (plane*/F.npy, ...)."})
    caiman: list[str] = field(default_factory=list, metadata={"help": "CaImAn results .hdf5 files (estimates/C)."})
    nwb_series: str | None = field(
        default=None, metadata={"help": "NWB: which RoiResponseSeries (DfOverF, Fluorescence or a series name)."}
    )
    nwb_behavior: list[str] = field(
        default_factory=list, metadata={"help": "NWB: TimeSeries names read as behaviour (e.g. running_speed)."}
    )
    neuropil_coefficient: float = field(default=0.7, metadata={"help": "suite2p: F - coefficient * Fneu."})
    sampling_rate: float | None = field(
        default=None,
        metadata={"help": "Frame rate in Hz of every recording given, instead of the rate the files store (e.g. a "
                          "suite2p folder without ops.npy, a CaImAn file without params/data/fr, an .npz without fs)."},
    )
    layout: str = field(
        default="auto", metadata={"help": "npz and CaImAn: traces layout, auto, neurons_frames or frames_neurons."}
    )
    num_sessions: int = field(default=3, metadata={"help": "Simulated sessions (one recurrent matrix each)."})
    seed: int = field(default=0, metadata={"help": "Simulation seed (session i uses seed + i) and split seed."})
    num_neurons: int = field(default=200, metadata={"help": "Simulated neurons per session."})
    num_trials: int = field(default=400, metadata={"help": "Simulated trials per session."})
    num_steps: int = field(default=100, metadata={"help": "Simulated frames per trial (dt = 0.2 s)."})
    target_fs: float = field(default=5.0, metadata={"help": "Model frame rate in Hz."})
    ema_alpha: float | None = field(default=None, metadata={"help": "Causal EMA smoothing (authors: 0.15); None = off."})
    trial_seconds: float | None = field(
        default=None,
        metadata={
            "help": "Trial length in seconds: continuous recordings are cut into consecutive windows of it; "
            "recordings with trial starts are cut at them (default there: the shortest gap between starts)."
        },
    )
    trial_stride_seconds: float | None = field(
        default=None, metadata={"help": "Continuous recordings: seconds between trial starts (default: no overlap)."}
    )
    window_size: int = field(default=4, metadata={"help": "Tokenizer window L: frames are cropped to a multiple."})


def load_recordings(args: PrepareArguments) -> list[Recording]:
    """Every recording named on the command line, read by its format's reader."""
    rate = args.sampling_rate
    recordings = [load_npz_recording(path, layout=args.layout, sampling_rate=rate) for path in args.npz]
    recordings += [load_nwb_recording(path, series=args.nwb_series, behavior_series=args.nwb_behavior or None,
                                      sampling_rate=rate) for path in args.nwb]
    recordings += [load_suite2p_recording(path, neuropil_coefficient=args.neuropil_coefficient, sampling_rate=rate)
                   for path in args.suite2p]
    recordings += [load_caiman_recording(path, layout=args.layout, sampling_rate=rate) for path in args.caiman]
    return recordings


def _seconds_to_frames(seconds: float | None, flag: str, fs: float, name: str) -> int | None:
    """Frames in `seconds` at `fs` Hz, with a clear error for a value that is not a positive duration."""
    if seconds is None:
        return None
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"{flag} must be a positive number of seconds, got {seconds}.")
    frames = int(round(seconds * fs))
    if frames < 1:
        raise ValueError(f"{flag} {seconds} is shorter than one frame of {name} at {fs:g} Hz; pass at least "
                         f"{1 / fs:g} s.")
    return frames


def recording_to_session(recording: Recording, trial_seconds: float | None, stride_seconds: float | None = None):
    """The one Recording -> SessionTrials path: cut at trial starts when the recording has them, else in windows."""
    length = _seconds_to_frames(trial_seconds, "--trial_seconds", recording.fs, recording.name)
    stride = _seconds_to_frames(stride_seconds, "--trial_stride_seconds", recording.fs, recording.name)
    if stride is not None and recording.trial_starts is not None:
        raise ValueError(f"{recording.name} has its own trial starts, so --trial_stride_seconds does not apply; leave "
                         "it out (it is for cutting continuous recordings).")
    if recording.trial_starts is None and length is None:
        raise ValueError(
            f"{recording.name} is a continuous recording ({recording.num_frames} frames = "
            f"{recording.num_frames / recording.fs:.1f} s at {recording.fs:g} Hz) without trial starts: pass "
            "--trial_seconds to cut it into trials (e.g. --trial_seconds 20)."
        )
    return recording.to_session(trial_length=length, stride=stride)


def check_simulation_args(args: PrepareArguments) -> None:
    """The simulation's sizes are whole positive counts (a split needs 3 trials, a token one window of frames)."""
    for name, least in (("num_sessions", 1), ("num_neurons", 1), ("num_trials", 3), ("num_steps", args.window_size)):
        if getattr(args, name) < least:
            raise ValueError(f"--{name} must be at least {least}, got {getattr(args, name)}.")


def load_sessions(args: PrepareArguments) -> list[SessionTrials]:
    recordings = load_recordings(args)
    if not recordings:
        check_simulation_args(args)
        from tqdm.auto import tqdm

        # one session per call (session i = seed + i, as simulate_benchmark names them) so a bar shows progress
        return [
            simulate_benchmark(num_sessions=1, seed=args.seed + i, num_neurons=args.num_neurons,
                               num_trials=args.num_trials, num_steps=args.num_steps)[0]
            for i in tqdm(range(args.num_sessions), desc="Simulating sessions", unit="session")
        ]
    names = [r.name for r in recordings]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"several recordings are named {duplicates}; session names must be unique (rename files).")
    return [recording_to_session(r, args.trial_seconds, args.trial_stride_seconds) for r in recordings]


def run(argv: list[str] | None = None):
    """Parse `argv` (see `PrepareArguments`), write the trial DatasetDict and return it."""
    args, output = parse_command_args((PrepareArguments, OutputArguments), argv, prog="calm prepare",
                                      uses_torch=False)
    target = claim_output_folder(args.output_dir, "prepare", [*args.npz, *args.nwb, *args.suite2p, *args.caiman],
                                 overwrite=output.overwrite)
    sessions = load_sessions(args)
    prepared = [
        prepare_session(
            session, target_fs=args.target_fs, ema_alpha=args.ema_alpha, split_seed=args.seed, window_size=args.window_size
        )
        for session in sessions
    ]
    corpus = build_trial_dataset(prepared)
    # written next to the target and renamed: a failure never leaves a half-written dataset under output_dir
    save_trial_dataset(corpus, target, prepared, command="prepare")
    logger.info("wrote %s: %s", args.output_dir, {name: len(split) for name, split in corpus.items()})
    return corpus


def main(argv: list[str] | None = None) -> int:
    """Console entry `calm-prepare` (and `calm prepare`): returns the exit code."""
    return run_command("prepare", lambda: run(argv))


if __name__ == "__main__":
    raise SystemExit(main())
