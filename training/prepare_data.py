#!/usr/bin/env python
"""Data step: simulated benchmark or real `.npz` recordings -> a trial DatasetDict (train/validation/test).

    python training/prepare_data.py --output_dir runs/sim-trials                      # the paper's simulation
    python training/prepare_data.py --output_dir runs/zf --npz ../shared/data/triplett2018_zf_tectum_spont/zf_20151104-f1.npz \
        --trial_seconds 20

Every session is resampled to the model rate, optionally EMA-smoothed, split 70/15/15 by trial and z-scored with its
training trials' statistics (kept in `calm_sessions.json` beside the dataset so forecasts map back to input units).
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field

from transformers import HfArgumentParser

from calm_hf.data import (
    SessionTrials,
    build_trial_dataset,
    cut_trials,
    load_npz_recording,
    prepare_session,
    save_session_metadata,
    simulate_benchmark,
)

logger = logging.getLogger("calm_hf.prepare_data")


@dataclass
class PrepareArguments:
    output_dir: str = field(metadata={"help": "Where the DatasetDict (and calm_sessions.json) is written."})
    npz: list[str] = field(default_factory=list, metadata={"help": "Real recordings (.npz); none = simulate."})
    num_sessions: int = field(default=3, metadata={"help": "Simulated sessions (one recurrent matrix each)."})
    seed: int = field(default=0, metadata={"help": "Simulation seed (session i uses seed + i) and split seed."})
    num_neurons: int = field(default=200, metadata={"help": "Simulated neurons per session."})
    num_trials: int = field(default=400, metadata={"help": "Simulated trials per session."})
    num_steps: int = field(default=100, metadata={"help": "Simulated frames per trial (dt = 0.2 s)."})
    target_fs: float = field(default=5.0, metadata={"help": "Model frame rate in Hz."})
    ema_alpha: float | None = field(default=None, metadata={"help": "Causal EMA smoothing (authors: 0.15); None = off."})
    trial_seconds: float | None = field(
        default=None, metadata={"help": "Cut continuous recordings (no trial_starts) into trials of this length."}
    )
    window_size: int = field(default=4, metadata={"help": "Tokenizer window L: frames are cropped to a multiple."})


def load_sessions(args: PrepareArguments) -> list[SessionTrials]:
    if not args.npz:
        return simulate_benchmark(
            num_sessions=args.num_sessions,
            seed=args.seed,
            num_neurons=args.num_neurons,
            num_trials=args.num_trials,
            num_steps=args.num_steps,
        )
    sessions = []
    for path in args.npz:
        recording = load_npz_recording(path)
        if args.trial_seconds is None:
            raise ValueError(
                f"{path} is a continuous recording: pass --trial_seconds to cut it into fixed-length trials."
            )
        length = int(round(args.trial_seconds * recording.fs))
        traces, behavior = cut_trials(recording.traces, length, behavior=recording.behavior)
        sessions.append(
            SessionTrials(
                name=recording.name,
                traces=traces,
                fs=recording.fs,
                behavior=behavior,
                behavior_names=recording.behavior_names if behavior is not None else None,
            )
        )
    return sessions


def main(argv: list[str] | None = None):
    (args,) = HfArgumentParser(PrepareArguments).parse_args_into_dataclasses(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    sessions = load_sessions(args)
    prepared = [
        prepare_session(
            session, target_fs=args.target_fs, ema_alpha=args.ema_alpha, split_seed=args.seed, window_size=args.window_size
        )
        for session in sessions
    ]
    corpus = build_trial_dataset(prepared)
    corpus.save_to_disk(args.output_dir)
    save_session_metadata(args.output_dir, prepared)
    logger.info("wrote %s: %s", args.output_dir, {name: len(split) for name, split in corpus.items()})
    return corpus


if __name__ == "__main__":
    main()
