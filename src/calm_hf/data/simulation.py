"""The CalM paper's simulated benchmark: a chaotic rate RNN read out through Poisson spikes and calcium.

Per session (one seed, one recurrent matrix):

    tau dr/dt = -r + W tanh(r) + noise,  W ~ N(0, g^2 / N), g = 1.6
    spikes[t] ~ Poisson((tanh(r_t) + 1) / 2 * max_rate_hz * dt)
    calcium   = spikes * double-exponential kernel (rise 0.05 s, decay 2.0 s) + Gaussian noise
    behaviour = B tanh(r_t) + Gaussian noise   (3 "velocity" channels, B fixed per session)

Choices the paper leaves open (documented here, all fields of `SimulationConfig`):

- `tau = 1.0` s with Euler-Maruyama integration in `substeps = 10` steps per frame (20 ms, well below tau). With
  g = 1.6 the network is chaotic but its correlation time is a few seconds, so a 12 s horizon (60 frames at
  dt = 0.2 s) is forecastable for a good while before it decorrelates.
- process noise: white noise of intensity `rnn_noise_std` in units of r per sqrt(tau), integrated split-step: the
  Wiener increment of each frame, `rnn_noise_std * sqrt(dt / tau) * N(0, 1)`, is added once at the frame start and
  the drift is integrated in `substeps` Euler steps (same noise variance per frame as per-substep
  Euler-Maruyama, 10x fewer random numbers).
- every trial starts from a fresh random state `r ~ N(0, 1)` and runs `burn_in_steps` frames (default 50 = 10 s,
  five calcium decay constants and ten RNN time constants) before its first frame, so both the RNN and the
  calcium are in steady state; calcium is filtered over burn-in + trial so it is continuous.
- calcium kernel: `k(t) = (exp(-t/decay) - exp(-t/rise)) / peak`, i.e. one spike peaks at `calcium_amplitude`
  (1.0 dF/F-like unit). A frame's value is the kernel averaged over one frame (spike time uniform within its
  frame), computed exactly with two first-order IIR filters (no truncation). Before noise it is >= 0.

Regimes beyond the paper's protocol (all off by default, so the default session is exactly the protocol above;
`calm_hf.data.corpus` draws them per session to build a pretraining corpus):

- low-rank structure in the connectivity, `W += connectivity_rank_gain * U U^T / N` (rank `connectivity_rank`),
  which gives slow, shared population modes on top of the chaotic bulk;
- shared external input: `shared_input_dims` Ornstein-Uhlenbeck signals (time constant `shared_input_tau_s`, std
  `shared_input_std`) reaching every neuron through random loadings, fixed for the session or partly drawn anew
  every trial (`trial_loading_mix`), so that which neurons co-vary need not carry over between trials;
- per-neuron firing-rate heterogeneity (log-normal, `rate_heterogeneity`);
- a slow per-neuron baseline drift of the fluorescence (OU, `baseline_drift_std`, `baseline_drift_tau_s`), as
  bleaching and neuropil changes give real recordings;
- continuous recordings (`continuous=True`): trials are consecutive windows of a few long runs instead of
  independent restarts, so the state and the calcium carry over from one trial to the next;
- any native frame period `dt`: the number of Euler substeps follows from `tau` when `substeps` is 0.

The whole session is vectorised over trials: 3 sessions x 400 trials x 200 neurons x 100 frames take a few
seconds on one core.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np

from .session import SessionTrials


def _lfilter(b, a, x, axis=-1):
    """`scipy.signal.lfilter`, imported on first use (slow to import; most commands never simulate)."""
    from scipy import signal

    return signal.lfilter(b, a, x, axis=axis)


@dataclass
class SimulationConfig:
    """Parameters of one simulated session (paper values where the paper gives them).

    Args:
        num_neurons (`int`, defaults to 200): RNN units, each one recorded neuron.
        num_trials (`int`, defaults to 400): trials per session.
        num_steps (`int`, defaults to 100): frames per trial.
        dt (`float`, defaults to 0.2): frame period in seconds (5 Hz, the model frame rate).
        tau (`float`, defaults to 1.0): RNN time constant in seconds (not given by the paper; slow enough to
            forecast over 12 s).
        substeps (`int`, defaults to 10): Euler-Maruyama substeps per frame.
        gain (`float`, defaults to 1.6): g, the recurrent gain (W ~ N(0, g^2/N); chaotic for g > 1).
        rnn_noise_std (`float`, defaults to 0.1): process noise level (see module docstring).
        max_rate_hz (`float`, defaults to 5.0): firing rate at tanh(r) = 1.
        calcium_rise_s (`float`, defaults to 0.05): kernel rise time constant.
        calcium_decay_s (`float`, defaults to 2.0): kernel decay time constant.
        calcium_amplitude (`float`, defaults to 1.0): peak calcium response to one spike.
        calcium_noise_std (`float`, defaults to 0.1): std of additive Gaussian imaging noise (0 = clean calcium).
        burn_in_steps (`int`, defaults to 50): frames simulated (and filtered) before each trial starts.
        num_behavior_channels (`int`, defaults to 3): linear "velocity" readouts of tanh(r); 0 = no behaviour.
        behavior_noise_std (`float`, defaults to 0.1): std of the readout noise.
        task_fraction (`float`, defaults to 0.0): fraction of neurons driven by the two-condition task input
            (0 = no task; the simulation is then exactly the paper's protocol).
        task_amplitude (`float`, defaults to 1.5): drive added to `tau dr/dt` of the stimulated group.
        task_onset_step (`int`, defaults to 20): first frame of the stimulus window within the trial.
        task_duration_steps (`int`, defaults to 30): frames the stimulus lasts.
        connectivity_rank (`int`, defaults to 0): rank R of a structured part of the connectivity, 0 = none.
        connectivity_rank_gain (`float`, defaults to 0.0): its strength: `W += gain * U U^T / N`, `U ~ N(0, 1)` of
            shape `(N, R)`; a gain near or above 1 gives slow shared modes.
        shared_input_dims (`int`, defaults to 0): number of shared external inputs (OU processes), 0 = none.
        shared_input_std (`float`, defaults to 0.0): stationary std of each shared input (units of r per tau).
        shared_input_tau_s (`float`, defaults to 2.0): time constant of the shared inputs in seconds.
        trial_loading_mix (`float`, defaults to 0.0): how much of each neuron's loading on the shared inputs is drawn
            anew for every trial, in [0, 1]: the loadings of a trial are `sqrt(1 - mix) * session + sqrt(mix) *
            fresh`, so at 0 the correlations the shared inputs cause carry over from trial to trial and at 1 they do
            not (a population coupling fitted on some trials then misleads on others). With `continuous`, each
            window of a run takes its own loadings.
        rate_heterogeneity (`float`, defaults to 0.0): std of the log of each neuron's maximum rate (0 = all equal).
        baseline_drift_std (`float`, defaults to 0.0): stationary std of a slow per-neuron baseline drift added to the
            calcium (units of one spike's peak).
        baseline_drift_tau_s (`float`, defaults to 60.0): time constant of that drift in seconds.
        continuous (`bool`, defaults to `False`): trials are consecutive windows of a few continuous runs (no restart
            between trials) instead of independent trials with their own burn-in.
        seed (`int`, defaults to 0): session seed (recurrent matrix, readout, initial states, noise, spikes).
        name (`str`, *optional*): session name; defaults to `"sim-s{seed}"`.

    Example:

    ```python
    >>> from calm_hf.data import SimulationConfig, simulate_session
    >>> session = simulate_session(SimulationConfig(num_trials=8, num_neurons=20, seed=1))
    >>> session.traces.shape
    (8, 20, 100)
    ```
    """

    num_neurons: int = 200
    num_trials: int = 400
    num_steps: int = 100
    dt: float = 0.2
    tau: float = 1.0
    substeps: int = 10
    gain: float = 1.6
    rnn_noise_std: float = 0.1
    max_rate_hz: float = 5.0
    calcium_rise_s: float = 0.05
    calcium_decay_s: float = 2.0
    calcium_amplitude: float = 1.0
    calcium_noise_std: float = 0.1
    burn_in_steps: int = 50
    num_behavior_channels: int = 3
    behavior_noise_std: float = 0.1
    task_fraction: float = 0.0
    task_amplitude: float = 1.5
    task_onset_step: int = 20
    task_duration_steps: int = 30
    connectivity_rank: int = 0
    connectivity_rank_gain: float = 0.0
    shared_input_dims: int = 0
    shared_input_std: float = 0.0
    shared_input_tau_s: float = 2.0
    trial_loading_mix: float = 0.0
    rate_heterogeneity: float = 0.0
    baseline_drift_std: float = 0.0
    baseline_drift_tau_s: float = 60.0
    continuous: bool = False
    seed: int = 0
    name: str | None = None

    def __post_init__(self):
        for key in ("num_neurons", "num_trials", "num_steps"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"SimulationConfig.{key} must be >= 1, got {getattr(self, key)}.")
        if int(self.substeps) < 0:
            raise ValueError(f"SimulationConfig.substeps must be >= 1, or 0 to derive it from tau, got {self.substeps}.")
        for key in ("burn_in_steps", "num_behavior_channels", "connectivity_rank", "shared_input_dims"):
            if int(getattr(self, key)) < 0:
                raise ValueError(f"SimulationConfig.{key} must be >= 0, got {getattr(self, key)}.")
        for key in ("dt", "tau", "max_rate_hz", "calcium_rise_s", "calcium_decay_s", "calcium_amplitude",
                    "shared_input_tau_s", "baseline_drift_tau_s"):
            value = float(getattr(self, key))
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"SimulationConfig.{key} must be a positive number, got {value}.")
        for key in ("gain", "rnn_noise_std", "calcium_noise_std", "behavior_noise_std", "connectivity_rank_gain",
                    "shared_input_std", "rate_heterogeneity", "baseline_drift_std"):
            value = float(getattr(self, key))
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"SimulationConfig.{key} must be >= 0, got {value}.")
        if not (0.0 <= float(self.trial_loading_mix) <= 1.0):
            raise ValueError(f"SimulationConfig.trial_loading_mix must lie in [0, 1], got {self.trial_loading_mix}.")
        if not (0.0 <= float(self.task_fraction) <= 1.0):
            raise ValueError(f"SimulationConfig.task_fraction must lie in [0, 1], got {self.task_fraction}.")
        if not math.isfinite(float(self.task_amplitude)):
            raise ValueError(f"SimulationConfig.task_amplitude must be finite, got {self.task_amplitude}.")
        if int(self.task_onset_step) < 0 or int(self.task_duration_steps) < 1:
            raise ValueError(
                f"SimulationConfig.task_onset_step ({self.task_onset_step}) must be >= 0 and task_duration_steps "
                f"({self.task_duration_steps}) >= 1."
            )
        if self.task_fraction > 0 and int(self.task_onset_step) >= int(self.num_steps):
            raise ValueError(
                f"task_onset_step={self.task_onset_step} lies after the last of num_steps={self.num_steps} frames; "
                "the stimulus would never be shown."
            )
        if self.calcium_rise_s >= self.calcium_decay_s:
            raise ValueError(
                f"calcium_rise_s ({self.calcium_rise_s}) must be shorter than calcium_decay_s ({self.calcium_decay_s})."
            )
        if self.name is None:
            self.name = f"sim-s{self.seed}"

    @property
    def fs(self) -> float:
        return 1.0 / self.dt

    @property
    def num_substeps(self) -> int:
        """Euler substeps per frame: `substeps`, or (when 0) enough to keep each step at most a tenth of `tau`."""
        return int(self.substeps) if self.substeps else max(1, math.ceil(10.0 * self.dt / self.tau))


def _calcium_filters(config: SimulationConfig) -> list[tuple[float, float]]:
    """(gain, pole) of the two first-order filters whose difference is the frame-averaged double exponential."""
    rise, decay, dt = config.calcium_rise_s, config.calcium_decay_s, config.dt
    t_peak = rise * decay / (decay - rise) * math.log(decay / rise)
    peak = math.exp(-t_peak / decay) - math.exp(-t_peak / rise)
    scale = config.calcium_amplitude / peak
    filters = []
    for tau, sign in ((decay, 1.0), (rise, -1.0)):
        pole = math.exp(-dt / tau)
        # mean of exp(-t/tau) over [k dt, (k+1) dt] = (tau/dt) (1 - pole) pole^k
        filters.append((sign * scale * tau / dt * (1.0 - pole), pole))
    return filters


def spikes_to_calcium(spikes: np.ndarray, config: SimulationConfig) -> np.ndarray:
    """Noise-free calcium `(..., frames)` from spike counts `(..., frames)` (starting from zero calcium)."""
    spikes = np.asarray(spikes, dtype=np.float64)
    calcium = np.zeros_like(spikes)
    for gain, pole in _calcium_filters(config):
        calcium += _lfilter([gain], [1.0, -pole], spikes, axis=-1)
    return np.maximum(calcium, 0.0)  # exact kernel is >= 0; clip float round-off only


def _task_design(config: SimulationConfig) -> dict[str, np.ndarray]:
    """Conditions per trial, driven groups per neuron and the (trials, neurons) drive of the stimulus window.

    Uses its own random stream (spawn key 6 of the session seed), so enabling the task leaves the six streams of the
    default simulation untouched."""
    rng = np.random.default_rng(np.random.SeedSequence(int(config.seed), spawn_key=(6,)))
    num_neurons, num_trials = int(config.num_neurons), int(config.num_trials)
    condition = rng.integers(0, 2, size=num_trials).astype(np.int64)
    num_driven = int(round(config.task_fraction * num_neurons))
    groups = np.full(num_neurons, -1, dtype=np.int64)
    driven = rng.permutation(num_neurons)[:num_driven]
    groups[driven] = np.arange(num_driven) % 2  # half to condition 0, half to condition 1
    drive = (groups[None, :] == condition[:, None]).astype(np.float32) * np.float32(config.task_amplitude)
    return {"condition": condition, "groups": groups, "drive": drive}


CONTINUOUS_RUNS = 8  # a continuous session is simulated as at most this many long runs (vectorised), cut into trials
TRIALS_PER_RUN = 4  # and each run holds at least this many consecutive trials


def _sequence_layout(config: SimulationConfig) -> tuple[int, int]:
    """(sequences, frames per sequence after burn-in): one sequence per trial, or with `continuous` a few long runs
    that hold consecutive trials."""
    num_trials, num_steps = int(config.num_trials), int(config.num_steps)
    if not config.continuous:
        return num_trials, num_steps
    runs = max(1, min(CONTINUOUS_RUNS, num_trials // TRIALS_PER_RUN))
    return runs, math.ceil(num_trials / runs) * num_steps


def _sequences_to_trials(array: np.ndarray, config: SimulationConfig) -> np.ndarray:
    """`(sequences, channels, frames)` -> `(trials, channels, num_steps)`: a continuous run is cut into consecutive
    trials (trial `run * per_run + j` is window j of run `run`); independent trials pass through."""
    if not config.continuous:
        return array
    runs, channels, frames = array.shape
    num_steps = int(config.num_steps)
    per_run = frames // num_steps
    trials = array.reshape(runs, channels, per_run, num_steps).transpose(0, 2, 1, 3).reshape(-1, channels, num_steps)
    return np.ascontiguousarray(trials[: int(config.num_trials)])


def _ornstein_uhlenbeck(rng: np.random.Generator, shape: tuple[int, ...], frames: int, dt: float, tau: float,
                        std: float) -> np.ndarray:
    """`(*shape, frames)` float32 stationary OU paths with time constant `tau` and std `std`, sampled every `dt`."""
    pole = math.exp(-dt / tau)
    innovations = rng.standard_normal((*shape, frames)).astype(np.float32) * np.float32(std * math.sqrt(1 - pole**2))
    innovations[..., 0] = rng.standard_normal(shape).astype(np.float32) * np.float32(std)  # start in steady state
    return _lfilter([1.0], [1.0, -pole], innovations, axis=-1).astype(np.float32)


def _external_input(config: SimulationConfig, task: dict | None, rng: np.random.Generator | None,
                    sequences: int, total_frames: int):
    """`input(frame)`: the external drive `(sequences, neurons)` of one frame (task stimulus and shared inputs), or
    None when there is none at that frame."""
    burn_in, num_steps = int(config.burn_in_steps), int(config.num_steps)
    shared = None
    if rng is not None and config.shared_input_dims > 0 and config.shared_input_std > 0:
        dims = int(config.shared_input_dims)
        loadings = rng.standard_normal((int(config.num_neurons), dims)).astype(np.float32) / np.float32(math.sqrt(dims))
        paths = _ornstein_uhlenbeck(rng, (sequences, dims), total_frames, config.dt, config.shared_input_tau_s,
                                    config.shared_input_std)
        mix = float(config.trial_loading_mix)
        if mix == 0.0:
            shared = np.einsum("sdf,nd->fsn", paths, loadings)  # (frames, sequences, neurons)
        else:  # each trial (a window of a continuous run) mixes the session's loadings with its own
            windows = _sequence_layout(config)[1] // num_steps if config.continuous else 1
            shared = np.empty((total_frames, sequences, int(config.num_neurons)), dtype=np.float32)
            for window in range(windows):
                fresh = rng.standard_normal((sequences, int(config.num_neurons), dims)).astype(np.float32)
                mixed = np.float32(math.sqrt(1.0 - mix)) * loadings + fresh * np.float32(math.sqrt(mix / dims))
                # the burn-in belongs to the first window; the last window runs to the end
                start = 0 if window == 0 else burn_in + window * num_steps
                stop = total_frames if window == windows - 1 else burn_in + (window + 1) * num_steps
                shared[start:stop] = np.einsum("sdf,snd->fsn", paths[..., start:stop], mixed)
    per_run = None
    if task is not None and config.continuous:
        per_run = _sequence_layout(config)[1] // num_steps
        trial_of = np.arange(sequences)[:, None] * per_run + np.arange(per_run)[None]  # (runs, trials per run)
        trial_of = np.minimum(trial_of, int(config.num_trials) - 1)

    def external(frame: int) -> np.ndarray | None:
        drive = None
        if task is not None:
            offset = frame - burn_in
            within = offset % num_steps if config.continuous else offset
            if offset >= 0 and 0 <= within - config.task_onset_step < config.task_duration_steps:
                # (sequences, neurons): the condition of the trial this frame belongs to drives its group
                drive = task["drive"] if per_run is None else task["drive"][trial_of[:, offset // num_steps]]
        if shared is not None:
            drive = shared[frame] if drive is None else drive + shared[frame]
        return drive

    return external


def _integrate_rate_rnn(config: SimulationConfig, weights_t: np.ndarray, external, sequences: int, total_frames: int,
                        rng_init: np.random.Generator, rng_noise: np.random.Generator) -> np.ndarray:
    """tanh(r) of `tau dr/dt = -r + W tanh(r) + input + noise` for every sequence (a trial, or a continuous run),
    burn-in included: `(sequences, neurons, total_frames)` float32. `weights_t` is W transposed (row-major update);
    `external(frame)` gives the input of a frame."""
    num_neurons = int(config.num_neurons)
    substeps = config.num_substeps
    h = config.dt / substeps
    decay = np.float32(h / config.tau)
    noise_scale = np.float32(config.rnn_noise_std * math.sqrt(config.dt / config.tau))
    state = rng_init.standard_normal((sequences, num_neurons), dtype=np.float32)  # (sequences, neurons)
    latents = np.empty((total_frames, sequences, num_neurons), dtype=np.float32)
    noise = np.empty((sequences, num_neurons), dtype=np.float32)
    for frame in range(total_frames):
        stimulus = external(frame)
        if noise_scale > 0:  # one Wiener increment per frame (split-step), drift integrated in substeps
            rng_noise.standard_normal(out=noise, dtype=np.float32)
            noise *= noise_scale
            state += noise
        for _ in range(substeps):
            drive = np.tanh(state) @ weights_t  # (sequences, neurons)
            drive -= state
            if stimulus is not None:
                drive += stimulus
            drive *= decay
            state += drive
        latents[frame] = np.tanh(state)
    return np.ascontiguousarray(latents.transpose(1, 2, 0))


def _behavior_readout(config: SimulationConfig, latents: np.ndarray, rng_behavior: np.random.Generator):
    """(behaviour `(trials, channels, frames)` or None, channel names or None, B `(channels, neurons)`):
    behaviour = B @ latents + noise."""
    num_neurons, num_channels = int(config.num_neurons), int(config.num_behavior_channels)
    behavior_weights = np.zeros((num_channels, num_neurons), dtype=np.float32)
    if num_channels == 0:
        return None, None, behavior_weights
    behavior_weights = (rng_behavior.standard_normal((num_channels, num_neurons)) / math.sqrt(num_neurons))
    behavior_weights = behavior_weights.astype(np.float32)
    behavior = np.einsum("cn,knt->kct", behavior_weights, latents)  # (trials, channels, frames)
    behavior = behavior + config.behavior_noise_std * rng_behavior.standard_normal(behavior.shape)
    return behavior, [f"velocity_{i}" for i in range(num_channels)], behavior_weights


def simulate_session(config: SimulationConfig | None = None, **overrides: Any) -> SessionTrials:
    """Simulate one session of the benchmark.

    Args:
        config (`SimulationConfig`, *optional*): parameters (defaults: the paper's protocol, seed 0).
        **overrides: fields replaced in `config`.

    Returns:
        `SessionTrials` with `traces` calcium `(trials, neurons, frames)` float32 at `1/dt` Hz, `behavior`
        `(trials, channels, frames)` (or `None` when `num_behavior_channels=0`) and `extras`:
        `"latents"` tanh(r) `(trials, neurons, frames)` float32, `"spikes"` counts `(trials, neurons, frames)`
        uint8, `"recurrent_weights"` W `(neurons, neurons)`, `"behavior_weights"` B `(channels, neurons)`
        (behaviour = B @ latents + noise), `"config"` the parameters as a dict. With `task_fraction > 0` also
        `"task_condition"` int64 `(trials,)` in {0, 1} and `"task_groups"` int64 `(neurons,)`: the condition that
        drives each neuron, -1 for neurons without task input.
    """
    config = SimulationConfig() if config is None else config
    if overrides:
        config = replace(config, **overrides)
    num_neurons, burn_in = int(config.num_neurons), int(config.burn_in_steps)
    rng_weights, rng_init, rng_noise, rng_spikes, rng_calcium, rng_behavior = (
        np.random.default_rng(child) for child in np.random.SeedSequence(int(config.seed)).spawn(6)
    )
    # the regimes beyond the paper's protocol draw from their own stream (spawn key 7), so the default session is
    # unchanged by their existence
    rng_regime = np.random.default_rng(np.random.SeedSequence(int(config.seed), spawn_key=(7,)))

    # (neurons, neurons): W ~ N(0, g^2/N); transposed once so the update is a row-major matmul
    recurrent_weights = (rng_weights.standard_normal((num_neurons, num_neurons)) * config.gain / math.sqrt(num_neurons))
    if config.connectivity_rank > 0 and config.connectivity_rank_gain > 0:
        modes = rng_regime.standard_normal((num_neurons, int(config.connectivity_rank)))
        recurrent_weights = recurrent_weights + config.connectivity_rank_gain * (modes @ modes.T) / num_neurons
    recurrent_weights = recurrent_weights.astype(np.float32)
    weights_t = np.ascontiguousarray(recurrent_weights.T)
    task = _task_design(config) if config.task_fraction > 0 else None

    sequences, frames = _sequence_layout(config)
    total_frames = burn_in + frames
    external = _external_input(config, task, rng_regime, sequences, total_frames)
    latents = _integrate_rate_rnn(config, weights_t, external, sequences, total_frames, rng_init, rng_noise)

    max_rate = config.max_rate_hz
    if config.rate_heterogeneity > 0:  # log-normal per neuron, mean max_rate_hz
        sigma = config.rate_heterogeneity
        max_rate = max_rate * np.exp(sigma * rng_regime.standard_normal(num_neurons) - sigma**2 / 2)[None, :, None]
    rates_hz = (latents + 1.0) * (0.5 * max_rate)
    spikes = rng_spikes.poisson(rates_hz * config.dt)
    if spikes.max(initial=0) > 255:
        raise ValueError("More than 255 spikes in one frame; lower max_rate_hz, rate_heterogeneity or dt.")
    spikes = spikes.astype(np.uint8)
    calcium = spikes_to_calcium(spikes, config)[..., burn_in:]  # filtered over burn-in: continuous and stationary
    if config.calcium_noise_std > 0:
        calcium = calcium + config.calcium_noise_std * rng_calcium.standard_normal(calcium.shape)
    if config.baseline_drift_std > 0:
        calcium = calcium + _ornstein_uhlenbeck(rng_regime, (sequences, num_neurons), frames, config.dt,
                                                config.baseline_drift_tau_s, config.baseline_drift_std)
    calcium = _sequences_to_trials(calcium, config)
    latents = _sequences_to_trials(np.ascontiguousarray(latents[..., burn_in:]), config)
    spikes = _sequences_to_trials(np.ascontiguousarray(spikes[..., burn_in:]), config)

    behavior, behavior_names, behavior_weights = _behavior_readout(config, latents, rng_behavior)

    extras = {}
    if task is not None:
        extras = {"task_condition": task["condition"], "task_groups": task["groups"]}
    return SessionTrials(
        name=config.name,
        traces=calcium.astype(np.float32),
        fs=config.fs,
        behavior=None if behavior is None else behavior.astype(np.float32),
        behavior_names=behavior_names,
        extras={
            "latents": latents,
            "spikes": spikes,
            "recurrent_weights": recurrent_weights,
            "behavior_weights": behavior_weights,
            "config": asdict(config),
            **extras,
        },
    )


def simulate_benchmark(num_sessions: int = 3, seed: int = 0, **overrides: Any) -> list[SessionTrials]:
    """Simulate the benchmark: `num_sessions` sessions with seeds `seed + i`, named `"sim-s{seed + i}"`.

    Args:
        num_sessions (`int`, *optional*, defaults to 3): number of sessions (one recurrent matrix each).
        seed (`int`, *optional*, defaults to 0): seed of the first session.
        **overrides: `SimulationConfig` fields applied to every session (e.g. `num_trials=40`).
    """
    if int(num_sessions) < 1:
        raise ValueError(f"num_sessions must be >= 1, got {num_sessions}.")
    if "seed" in overrides or "name" in overrides:
        raise ValueError("Pass the first session's seed as `seed=`; names are derived as 'sim-s{seed + i}'.")
    return [
        simulate_session(SimulationConfig(seed=seed + i, name=f"sim-s{seed + i}", **overrides))
        for i in range(int(num_sessions))
    ]
