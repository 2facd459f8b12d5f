"""The pretraining corpus of a foundation CalM: many simulated regimes plus real recordings, stored as shards.

Simulated sessions are drawn one by one from documented ranges (`SIMULATION_RANGES`): connectivity gain and rank,
time constants, shared and stimulus-locked inputs, firing rates, indicator kernels from fast to slow, noise, neuron
counts, native frame rates (resampled to the model rate), trial-structured and continuous recordings, baseline drift.
Real recordings of `../shared/data` add their training trials; named recordings can be held out whole for evaluation
(`REAL_RECORDINGS` lists the names).

The corpus is written as shards, each a trial `DatasetDict` (train/validation/test, `calm_sessions.json`) of a few
sessions of equal trial length, plus `corpus.json` (the manifest: shards, sessions, the parameters each simulated
session was drawn with). `calm_hf.data.streaming.CalmCorpusStream` reads it as an `IterableDataset`, shard by shard,
so a corpus larger than memory trains the same way.

    >>> from calm_hf.data.corpus import CorpusSpec, build_corpus
    >>> manifest = build_corpus(CorpusSpec(num_simulated_sessions=8, real_recordings=[]), "runs/corpus")
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from datasets import DatasetDict

from ..atomic import atomic_folder, atomic_write_text
from .datasets import build_trial_dataset, save_session_metadata, session_metadata
from .preprocessing import PreparedSession, prepare_session
from .session import SessionTrials
from .simulation import SimulationConfig, simulate_session

logger = logging.getLogger(__name__)

MANIFEST = "corpus.json"

# Approximate single-spike kinetics (rise, decay time constants in seconds) of common indicators; each simulated
# session takes one and scales both by a random factor (`kernel_jitter`), so kinetics cover fast to slow.
INDICATOR_KERNELS: dict[str, tuple[float, float]] = {
    "GCaMP8m": (0.02, 0.3),
    "GCaMP6f": (0.05, 0.4),
    "GCaMP7f": (0.04, 0.6),
    "OGB-1": (0.03, 1.0),
    "GCaMP6s": (0.1, 1.5),
}

# Each entry: (distribution, low, high). "log" draws log-uniformly, "uniform" uniformly, "int" an integer in
# [low, high], "choice" one of the listed values, "chance" a probability that the regime is on at all.
# Ranges are wide on purpose: the model must meet recordings from any lab; held-out sets drawn OUTSIDE them
# (`OUT_OF_RANGE`) check how far that carries.
SIMULATION_RANGES: dict[str, tuple] = {
    "num_neurons": ("log", 16, 1024),  # population size
    "native_rate_hz": ("log", 2.0, 30.0),  # imaging rate before resampling to the model rate
    "gain": ("uniform", 0.6, 2.0),  # recurrent gain g: below 1 decaying, above 1 chaotic
    "connectivity_rank": ("choice", (0, 1, 2, 4)),  # structured low-rank part of W (slow shared modes)
    "connectivity_rank_gain": ("uniform", 0.5, 1.5),
    "tau": ("log", 0.2, 2.0),  # RNN time constant (s)
    "rnn_noise_std": ("log", 0.05, 0.5),  # private process noise
    "shared_input_dims": ("choice", (0, 1, 2, 3)),  # external inputs shared across the population
    "shared_input_std": ("uniform", 0.0, 1.0),
    "shared_input_tau_s": ("log", 0.5, 10.0),
    "task_chance": ("chance", 0.5),  # a stimulus-locked input to a subset of neurons (two conditions)
    "task_fraction": ("uniform", 0.1, 0.6),
    "task_amplitude": ("uniform", 0.5, 2.0),
    "max_rate_hz": ("log", 1.0, 20.0),  # firing rate at full drive
    "rate_heterogeneity": ("uniform", 0.0, 1.0),  # std of log max rate across neurons
    "indicator": ("choice", tuple(INDICATOR_KERNELS)),
    "kernel_jitter": ("log", 0.7, 1.4),
    "calcium_noise_std": ("log", 0.02, 0.5),  # imaging noise, units of one spike's peak
    "drift_chance": ("chance", 0.5),  # slow per-neuron baseline drift (bleaching, neuropil)
    "baseline_drift_std": ("uniform", 0.0, 0.5),
    "baseline_drift_tau_s": ("uniform", 20.0, 120.0),
    "continuous_chance": ("chance", 0.5),  # consecutive windows of a continuous recording vs independent trials
}

# Held-out simulated sessions "outside the ranges": every field listed here is drawn from these values instead.
OUT_OF_RANGE: dict[str, tuple] = {
    "gain": ("uniform", 2.0, 2.6),
    "tau": ("log", 2.0, 4.0),
    "native_rate_hz": ("choice", (1.5, 45.0)),
    "indicator": ("choice", ("slow",)),
    "num_neurons": ("log", 1024, 1500),
}
SLOW_KERNEL = (0.15, 3.0)  # slower than any indicator in INDICATOR_KERNELS: only in OUT_OF_RANGE draws

# Sessions whose shared inputs reach the neurons through loadings partly drawn anew every trial
# (`SimulationConfig.trial_loading_mix`): a population coupling fitted on some trials of such a session misleads on
# the others, as on real recordings whose co-active groups change. A draw is on with `CorpusSpec.trial_loading_chance`
# and then takes its values from here (the shared inputs are made present and strong enough to matter). It is drawn
# after every other field, so a chance of 0 leaves every other draw, and the held-out sets, as they were.
TRIAL_LOADING_RANGES: dict[str, tuple] = {
    "trial_loading_mix": ("uniform", 0.25, 1.0),
    "shared_input_dims": ("choice", (1, 2, 3)),
    "shared_input_std": ("uniform", 0.5, 1.0),
}

# Named real recordings of ../shared/data that the corpus can include (training trials only) or hold out whole.
REAL_RECORDINGS = (
    "park/mrcuts24", "park/mrcuts25", "park/mrcuts26", "park/mrcuts27", "park/mrcuts28",
    "zebrafish/zf_20151104-f1", "cascade",
)


def _draw(rng: np.random.Generator, spec: tuple):
    kind = spec[0]
    if kind == "log":
        return float(math.exp(rng.uniform(math.log(spec[1]), math.log(spec[2]))))
    if kind == "uniform":
        return float(rng.uniform(spec[1], spec[2]))
    if kind == "choice":
        return spec[1][int(rng.integers(len(spec[1])))]
    if kind == "chance":
        return bool(rng.random() < spec[1])
    raise ValueError(f"unknown distribution {kind!r} in a regime range; use log, uniform, choice or chance.")


def draw_simulation_config(rng: np.random.Generator, name: str, seed: int, trial_seconds: float = 20.0,
                           num_trials: int = 32, out_of_range: bool = False,
                           ranges: dict[str, tuple] | None = None,
                           trial_loading_chance: float = 0.0) -> SimulationConfig:
    """One simulated session's parameters, drawn from `ranges` (default `SIMULATION_RANGES`; with `out_of_range`,
    the fields of `OUT_OF_RANGE` are drawn from there instead).

    Args:
        rng: the generator the draw consumes (the corpus seeds one per session).
        name, seed: the session's name and simulation seed.
        trial_seconds: trial length in seconds (frames follow from the native rate).
        num_trials: trials of the session.
        trial_loading_chance: the probability that the session's shared-input loadings change from trial to trial
            (values from `TRIAL_LOADING_RANGES`).
    """
    table = dict(SIMULATION_RANGES if ranges is None else ranges)
    if out_of_range:
        table.update(OUT_OF_RANGE)
    value = {key: _draw(rng, spec) for key, spec in table.items()}
    rate = value["native_rate_hz"]
    rise, decay = SLOW_KERNEL if value["indicator"] == "slow" else INDICATOR_KERNELS[value["indicator"]]
    steps = max(8, int(round(trial_seconds * rate)))
    fields: dict[str, Any] = dict(
        num_neurons=int(round(value["num_neurons"])), num_trials=int(num_trials), num_steps=steps, dt=1.0 / rate,
        substeps=0, tau=value["tau"], gain=value["gain"], rnn_noise_std=value["rnn_noise_std"],
        max_rate_hz=value["max_rate_hz"], rate_heterogeneity=value["rate_heterogeneity"],
        calcium_rise_s=rise * value["kernel_jitter"], calcium_decay_s=decay * value["kernel_jitter"],
        calcium_noise_std=value["calcium_noise_std"], connectivity_rank=int(value["connectivity_rank"]),
        connectivity_rank_gain=value["connectivity_rank_gain"], shared_input_dims=int(value["shared_input_dims"]),
        shared_input_std=value["shared_input_std"], shared_input_tau_s=value["shared_input_tau_s"],
        baseline_drift_std=value["baseline_drift_std"] if value["drift_chance"] else 0.0,
        baseline_drift_tau_s=value["baseline_drift_tau_s"], continuous=bool(value["continuous_chance"]),
        burn_in_steps=int(round(5.0 * rate)), num_behavior_channels=0, seed=int(seed), name=name,
    )
    if value["task_chance"]:
        onset = int(rng.integers(0, steps // 2))
        fields.update(task_fraction=value["task_fraction"], task_amplitude=value["task_amplitude"],
                      task_onset_step=onset, task_duration_steps=int(rng.integers(max(1, steps // 10), steps // 2)))
    if trial_loading_chance > 0 and rng.random() < trial_loading_chance:
        fields.update({key: _draw(rng, spec) for key, spec in TRIAL_LOADING_RANGES.items()})
    return SimulationConfig(**fields)


@dataclass
class CorpusSpec:
    """What `build_corpus` writes.

    Args:
        num_simulated_sessions: simulated sessions drawn from `SIMULATION_RANGES`.
        trials_per_session: trials of each simulated session (split 70/15/15).
        trial_seconds: simulated trial length in seconds.
        max_stored_neurons: a larger simulated population keeps a random subset of this many neurons (training
            examples see a few dozen neurons at a time, and a subset's coupling is what the model estimates).
        real_recordings: names from `REAL_RECORDINGS` whose training trials join the corpus (`[]` for none).
        real_trial_seconds: trial length of continuous real recordings (zebrafish, Cascade windows).
        target_fs: the model frame rate.
        window_size: the token window; frames are cropped to a multiple of it.
        sessions_per_shard: sessions written into one shard.
        seed: seed of the draws (session i of the corpus is drawn with `[seed, i]`).
        data_dir: where the real recordings are (default `calm_hf.data.default_data_dir()`).
        out_of_range: draw the simulated sessions outside the ranges (held-out evaluation sets).
        name_prefix: prefix of the simulated session names.
        trial_loading_chance: the share of simulated sessions whose shared-input loadings change from trial to trial
            (`TRIAL_LOADING_RANGES`); 0 draws every session as before.
    """

    num_simulated_sessions: int = 256
    trials_per_session: int = 32
    trial_seconds: float = 20.0
    max_stored_neurons: int = 256
    real_recordings: list[str] = field(default_factory=lambda: ["park/mrcuts24", "park/mrcuts25", "park/mrcuts26",
                                                                "cascade"])
    real_trial_seconds: float = 20.0
    target_fs: float = 5.0
    window_size: int = 4
    sessions_per_shard: int = 32
    seed: int = 0
    data_dir: str | None = None
    out_of_range: bool = False
    name_prefix: str = "sim"
    trial_loading_chance: float = 0.0

    def __post_init__(self):
        for name in ("num_simulated_sessions", "max_stored_neurons", "sessions_per_shard"):
            if int(getattr(self, name)) < (0 if name == "num_simulated_sessions" else 1):
                raise ValueError(f"CorpusSpec.{name} must be a positive integer, got {getattr(self, name)!r}.")
        if int(self.trials_per_session) < 3:
            raise ValueError(f"trials_per_session must be >= 3 (train/validation/test), got {self.trials_per_session}.")
        for name in ("trial_seconds", "real_trial_seconds", "target_fs"):
            value = float(getattr(self, name))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"CorpusSpec.{name} must be a positive number, got {value!r}.")
        if not (0.0 <= float(self.trial_loading_chance) <= 1.0):
            raise ValueError(f"CorpusSpec.trial_loading_chance must lie in [0, 1], got {self.trial_loading_chance!r}.")
        unknown = sorted(set(self.real_recordings) - set(REAL_RECORDINGS))
        if unknown:
            raise ValueError(f"unknown real recordings {unknown}; choose from {list(REAL_RECORDINGS)}.")
        if self.num_simulated_sessions == 0 and not self.real_recordings:
            raise ValueError("the corpus would be empty: give simulated sessions or real recordings.")


def simulated_configs(spec: CorpusSpec) -> list[SimulationConfig]:
    """The parameters of every simulated session of `spec` (deterministic in `spec.seed`)."""
    configs = []
    for index in range(int(spec.num_simulated_sessions)):
        rng = np.random.default_rng([int(spec.seed), index])
        configs.append(draw_simulation_config(
            rng, name=f"{spec.name_prefix}-{spec.seed}-{index:04d}", seed=int(spec.seed) * 100_003 + index,
            trial_seconds=spec.trial_seconds, num_trials=spec.trials_per_session, out_of_range=spec.out_of_range,
            trial_loading_chance=float(spec.trial_loading_chance)))
    return configs


def _subsample_neurons(session: SessionTrials, max_neurons: int, seed: int) -> SessionTrials:
    if session.traces.shape[1] <= max_neurons:
        return session
    keep = np.sort(np.random.default_rng(seed).choice(session.traces.shape[1], size=max_neurons, replace=False))
    session.traces = np.ascontiguousarray(session.traces[:, keep])
    session.extras = {k: v for k, v in session.extras.items() if k == "config"}
    session.extras["stored_neurons"] = keep
    return session


def real_sessions(names: Iterable[str], data_dir: str | os.PathLike | None = None,
                  trial_seconds: float = 20.0) -> list[SessionTrials]:
    """The named real recordings (`REAL_RECORDINGS`) as sessions: Park mice cut at their trial starts, the zebrafish
    recording in consecutive `trial_seconds` windows, the Cascade windows one session per indicator dataset (single
    neurons recorded separately: each trial is one neuron, so these sessions teach single-trace dynamics only)."""
    from .io import load_cascade_groundtruth, load_park_sessions, load_triplett_zebrafish

    names = list(names)
    sessions: list[SessionTrials] = []
    park = [n.split("/", 1)[1] for n in names if n.startswith("park/")]
    if park:
        sessions += [s for s in load_park_sessions(data_dir) if s.name in park]
    if "zebrafish/zf_20151104-f1" in names:
        recording = load_triplett_zebrafish(data_dir)
        session = recording.to_session(trial_length=int(round(trial_seconds * recording.fs)))
        session.name = "zf_20151104-f1"
        sessions.append(session)
    if "cascade" in names:
        recording = load_cascade_groundtruth(data_dir)
        dataset_ids = np.asarray(recording.extras["dataset_id"]).astype(int)
        dataset_names = [str(n) for n in recording.extras["dataset_names"]]
        for dataset in np.unique(dataset_ids):
            rows = recording.traces[dataset_ids == dataset]  # (windows, frames): independent single neurons
            if len(rows) < 3:
                continue
            sessions.append(SessionTrials(name=f"cascade-{dataset_names[dataset]}", traces=rows[:, None, :],
                                          fs=recording.fs))
    return sessions


def _prepared(sessions: Iterable[SessionTrials], spec: CorpusSpec) -> Iterator[PreparedSession]:
    for session in sessions:
        yield prepare_session(session, target_fs=spec.target_fs, window_size=spec.window_size, split_seed=spec.seed)


def _simulate_one(args: tuple[SimulationConfig, int]) -> SessionTrials:
    config, max_neurons = args
    session = simulate_session(config)
    session.extras = {"config": session.extras["config"]}
    return _subsample_neurons(session, max_neurons, config.seed)


def _simulated_sessions(spec: CorpusSpec, workers: int) -> Iterator[SessionTrials]:
    jobs = [(config, int(spec.max_stored_neurons)) for config in simulated_configs(spec)]
    if workers <= 1 or len(jobs) < 2:
        yield from map(_simulate_one, jobs)
        return
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(_simulate_one, jobs, chunksize=1)


def _write_shard(folder: Path, prepared: list[PreparedSession], first_session_id: int) -> dict:
    """One shard: the trial DatasetDict of `prepared` with session ids global across shards and neuron ids local to
    each session (0..n-1): a data-identity model reads neither as a table index."""
    corpus = build_trial_dataset(prepared)
    infos = session_metadata(prepared)
    for info in infos:
        info.session_id += first_session_id
        info.neuron_offset = 0
    ids = {info.name: info.session_id for info in infos}

    def relabel(row: dict) -> dict:
        return {"session_id": ids[row["session_name"]], "neuron_ids": list(range(len(row["neuron_ids"])))}

    corpus = DatasetDict({name: split.map(relabel, desc="Labelling sessions") for name, split in corpus.items()})

    def write(staging: Path) -> None:
        corpus.save_to_disk(str(staging))
        save_session_metadata(staging, infos)

    atomic_folder(folder, write)
    return {"path": folder.name, "sessions": [p.name for p in prepared], "first_session_id": first_session_id,
            "frames": int(prepared[0].num_frames), "trials": {k: len(v) for k, v in corpus.items()}}


def build_corpus(spec: CorpusSpec, output_dir: str | os.PathLike, workers: int = 1) -> dict:
    """Simulate, read and prepare every session of `spec` and write the shards and `corpus.json` under `output_dir`.

    Sessions are resampled to `spec.target_fs`, z-scored with their own training trials' statistics and split
    70/15/15 (`prepare_session`); shards hold sessions of equal trial length. Returns the manifest.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    pending: dict[int, list[PreparedSession]] = {}
    session_count = 0
    configs = {c.name: asdict(c) for c in simulated_configs(spec)} if spec.num_simulated_sessions else {}

    def flush(frames: int) -> None:
        nonlocal session_count
        group = pending.pop(frames)
        folder = output_dir / f"shard-{len(shards):05d}"
        shards.append(_write_shard(folder, group, session_count))
        session_count += len(group)
        logger.info("corpus shard %s: %d sessions of %d frames", folder.name, len(group), frames)

    sources = [_simulated_sessions(spec, workers)] if spec.num_simulated_sessions else []
    if spec.real_recordings:
        sources.append(iter(real_sessions(spec.real_recordings, spec.data_dir, spec.real_trial_seconds)))
    for source in sources:
        for prepared in _prepared(source, spec):
            pending.setdefault(prepared.num_frames, []).append(prepared)
            if len(pending[prepared.num_frames]) >= spec.sessions_per_shard:
                flush(prepared.num_frames)
    for frames in sorted(pending):
        flush(frames)
    manifest = {"spec": asdict(spec), "shards": shards, "num_sessions": session_count,
                "simulation_configs": configs}
    atomic_write_text(output_dir / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def load_manifest(corpus_dir: str | os.PathLike) -> dict:
    """The `corpus.json` of a corpus folder, with a clear error when the folder is not one."""
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"{corpus_dir} holds no {MANIFEST}: build a corpus with calm_hf.data.corpus.build_corpus "
                                "(or `calm main`).")
    return json.loads(path.read_text())


__all__ = [
    "CorpusSpec",
    "INDICATOR_KERNELS",
    "OUT_OF_RANGE",
    "REAL_RECORDINGS",
    "SIMULATION_RANGES",
    "build_corpus",
    "draw_simulation_config",
    "load_manifest",
    "real_sessions",
    "simulated_configs",
]
