"""Data layer of calm_hf: the simulated benchmark, real-recording loaders, preprocessing, datasets and collators.

Typical use:

```python
from calm_hf.data import simulate_benchmark, prepare_session, build_trial_dataset, tokenize_dataset, CalmDataCollator

sessions = simulate_benchmark(num_sessions=3, seed=0)          # list[SessionTrials], raw calcium units
prepared = [prepare_session(s, target_fs=5.0) for s in sessions]  # resample, split 70/15/15, z-score (train stats)
dataset = build_trial_dataset(prepared)                          # DatasetDict train/validation/test
dataset = tokenize_dataset(dataset, tokenizer)                   # adds input_ids (neurons, token_steps) int16
batch = CalmDataCollator(max_neurons=128)(list(dataset["train"].with_format("numpy").select(range(8))))
```
"""

import importlib

from .datasets import (
    SessionInfo,
    build_trial_dataset,
    load_session_metadata,
    load_trial_corpus,
    read_session_metadata,
    save_session_metadata,
    save_trial_dataset,
    session_metadata,
    tokenize_dataset,
)
from .caiman import load_caiman_recording
from .io import (
    Recording,
    default_data_dir,
    load_cascade_groundtruth,
    load_npz_recording,
    load_park_sessions,
    load_triplett_zebrafish,
    recording_from_arrays,
)
from .nwb import load_nwb_recording
from .preprocessing import (
    PreparedSession,
    ZScoreStats,
    causal_ema,
    cut_trials,
    prepare_session,
    resample,
    split_trials,
    split_trials_by_time,
)
from .readers import load_recording
from .session import SessionTrials, check_traces
from .simulation import SimulationConfig, simulate_benchmark, simulate_session, spikes_to_calcium
from .suite2p import load_suite2p_recording


__all__ = [
    "CalmDataCollator",
    "CollatorEpochCallback",
    "PreparedSession",
    "Recording",
    "SessionInfo",
    "SessionTrials",
    "SimulationConfig",
    "TraceCollator",
    "ZScoreStats",
    "build_trial_dataset",
    "causal_ema",
    "check_traces",
    "cut_trials",
    "default_data_dir",
    "load_caiman_recording",
    "load_cascade_groundtruth",
    "load_npz_recording",
    "load_nwb_recording",
    "load_park_sessions",
    "load_recording",
    "load_suite2p_recording",
    "load_trial_corpus",
    "load_session_metadata",
    "load_triplett_zebrafish",
    "prepare_session",
    "read_session_metadata",
    "recording_from_arrays",
    "resample",
    "save_session_metadata",
    "save_trial_dataset",
    "session_metadata",
    "simulate_benchmark",
    "simulate_session",
    "spikes_to_calcium",
    "split_trials",
    "split_trials_by_time",
    "tokenize_dataset",
]

# the collators need torch and transformers; commands that only read and prepare recordings never import them
_LAZY = {"CalmDataCollator": "collator", "CollatorEpochCallback": "collator", "TraceCollator": "collator"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
