"""Hugging Face `datasets` views of prepared sessions: one row per trial, and its tokenized form.

Rows (`build_trial_dataset`):

| column | feature | content |
|---|---|---|
| `input_values` | `Array2D((None, frames), "float32")` | z-scored traces `(neurons, frames)` |
| `session_id` | `int32` | index of the session in the list given |
| `session_name` | `string` | |
| `neuron_ids` | `Sequence(int32)` | global neuron vocabulary ids (`offset .. offset + neurons`) |
| `trial_index` | `int32` | trial index within its session |
| `behavior` | `Array2D((None, frames), "float32")` | z-scored behaviour `(channels, frames)` (only when present) |

`tokenize_dataset` adds `input_ids` `Array2D((None, token_steps), "int16")`. `Array2D` batches ~30x faster than
nested lists; note that `with_format("torch")` turns int16 into int64, and that `with_format("numpy")` is the
fastest way to feed `CalmDataCollator` (it accepts numpy arrays, tensors and lists).

Per-session metadata (z-score statistics, neuron ranges, rates) travels as JSON in every split's
`info.description` and can be written next to the dataset with `save_session_metadata`.
"""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from datasets import Array2D, Dataset, DatasetDict, DatasetInfo, Features, Sequence, Value

from ..atomic import atomic_folder, atomic_write_text
from .preprocessing import PreparedSession, ZScoreStats


SPLITS = ("train", "validation", "test")
METADATA_KEY = "calm_sessions"
METADATA_FILENAME = "calm_sessions.json"


@dataclass
class SessionInfo:
    """What maps a dataset row back to its session: ids, neuron range and normalisation.

    Attributes:
        session_id (`int`), name (`str`).
        neuron_offset (`int`), num_neurons (`int`): the session's neuron ids are
            `range(neuron_offset, neuron_offset + num_neurons)`.
        fs (`float`): frame rate of the rows; `source_fs` (`float` or `None`) the raw rate.
        num_frames (`int`), window_size (`int`), ema_alpha (`float` or `None`).
        stats (`ZScoreStats`): per-neuron training statistics (`stats.inverse_transform` -> raw units).
        behavior_stats (`ZScoreStats` or `None`), behavior_names (`list[str]` or `None`).
        splits (`dict[str, list[int]]`): trial indices per split.
        split_method (`dict` or `None`): how the splits were made (`PreparedSession.split_method`).
        roi_ids (`list[int]` or `None`): each neuron's id in the software that found it (suite2p ROI index, CaImAn
            component, NWB ROI id), in the order of the rows' neurons; `roi_planes` (`list[int]` or `None`) its
            imaging plane, for recordings of several planes.
    """

    session_id: int
    name: str
    neuron_offset: int
    num_neurons: int
    fs: float
    num_frames: int
    stats: ZScoreStats
    window_size: int = 4
    source_fs: float | None = None
    ema_alpha: float | None = None
    behavior_stats: ZScoreStats | None = None
    behavior_names: list[str] | None = None
    splits: dict[str, list[int]] | None = None
    split_method: dict[str, Any] | None = None
    roi_ids: list[int] | None = None
    roi_planes: list[int] | None = None

    @property
    def neuron_range(self) -> tuple[int, int]:
        """`[start, stop)` of the session's global neuron ids."""
        return self.neuron_offset, self.neuron_offset + self.num_neurons

    def to_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "name": self.name,
            "neuron_offset": self.neuron_offset,
            "num_neurons": self.num_neurons,
            "neuron_range": list(self.neuron_range),
            "fs": self.fs,
            "num_frames": self.num_frames,
            "window_size": self.window_size,
            "source_fs": self.source_fs,
            "ema_alpha": self.ema_alpha,
            "stats": self.stats.to_dict(),
            "behavior_stats": None if self.behavior_stats is None else self.behavior_stats.to_dict(),
            "behavior_names": self.behavior_names,
            "splits": self.splits,
            "split_method": self.split_method,
            "roi_ids": self.roi_ids,
            "roi_planes": self.roi_planes,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SessionInfo:
        return cls(
            session_id=int(data["session_id"]),
            name=str(data["name"]),
            neuron_offset=int(data["neuron_offset"]),
            num_neurons=int(data["num_neurons"]),
            fs=float(data["fs"]),
            num_frames=int(data["num_frames"]),
            stats=ZScoreStats.from_dict(data["stats"]),
            window_size=int(data.get("window_size", 4)),
            source_fs=data.get("source_fs"),
            ema_alpha=data.get("ema_alpha"),
            behavior_stats=None if data.get("behavior_stats") is None else ZScoreStats.from_dict(data["behavior_stats"]),
            behavior_names=data.get("behavior_names"),
            splits=data.get("splits"),
            split_method=data.get("split_method"),
            roi_ids=data.get("roi_ids"),
            roi_planes=data.get("roi_planes"),
        )


def _neuron_offsets(prepared: list[PreparedSession], neuron_id_offsets: list[int] | None) -> list[int]:
    counts = [session.num_neurons for session in prepared]
    if neuron_id_offsets is None:
        return [int(x) for x in np.concatenate([[0], np.cumsum(counts)[:-1]])]
    offsets = [int(x) for x in neuron_id_offsets]
    if len(offsets) != len(prepared):
        raise ValueError(f"Got {len(offsets)} neuron_id_offsets for {len(prepared)} sessions; give one per session.")
    ranges = sorted((start, start + count, s.name) for start, count, s in zip(offsets, counts, prepared))
    for (start, stop, name), (next_start, _, next_name) in zip(ranges, ranges[1:]):
        if next_start < stop:
            raise ValueError(
                f"neuron_id_offsets make sessions {name!r} [{start}, {stop}) and {next_name!r} overlap at "
                f"{next_start}; each session needs its own contiguous block of neuron ids."
            )
    if ranges[0][0] < 0:
        raise ValueError(f"neuron_id_offsets must be >= 0, got {offsets}.")
    return offsets


def roi_metadata(session: PreparedSession) -> dict[str, list[int] | None]:
    """`roi_ids` (and `roi_planes` when the neurons come from several planes) of a prepared session, as JSON lists."""
    ids, planes = session.extras.get("roi_ids"), session.extras.get("plane")
    if ids is None or len(ids) != session.num_neurons:
        return {"roi_ids": None, "roi_planes": None}
    several = planes is not None and len(planes) == session.num_neurons and len(np.unique(planes)) > 1
    return {"roi_ids": [int(i) for i in ids], "roi_planes": [int(p) for p in planes] if several else None}


def session_metadata(prepared: list[PreparedSession], neuron_id_offsets: list[int] | None = None) -> list[SessionInfo]:
    """`SessionInfo` for each prepared session (session id = position in the list)."""
    offsets = _neuron_offsets(prepared, neuron_id_offsets)
    return [
        SessionInfo(
            session_id=i,
            name=session.name,
            neuron_offset=offset,
            num_neurons=session.num_neurons,
            fs=session.fs,
            num_frames=session.num_frames,
            stats=session.stats,
            window_size=session.window_size,
            source_fs=session.source_fs,
            ema_alpha=session.ema_alpha,
            behavior_stats=session.behavior_stats,
            behavior_names=session.behavior_names,
            splits={k: [int(i) for i in v] for k, v in session.splits.items()},
            split_method=session.split_method,
            **roi_metadata(session),
        )
        for i, (session, offset) in enumerate(zip(prepared, offsets))
    ]


def build_trial_dataset(
    prepared: list[PreparedSession] | PreparedSession, neuron_id_offsets: list[int] | None = None
) -> DatasetDict:
    """One row per trial, splits `train`/`validation`/`test` from each session's own split.

    Args:
        prepared (`list[PreparedSession]`): sessions from `prepare_session`, all with the same number of frames.
        neuron_id_offsets (`list[int]`, *optional*): first global neuron id of each session; defaults to
            consecutive blocks (`0, n0, n0 + n1, ...`). Blocks must not overlap.

    Returns:
        `datasets.DatasetDict`; each split's `info.description` holds the JSON session metadata
        (read it back with `read_session_metadata`).
    """
    if isinstance(prepared, PreparedSession):
        prepared = [prepared]
    prepared = list(prepared)
    if not prepared:
        raise ValueError("build_trial_dataset needs at least one PreparedSession.")
    frames = {session.name: session.num_frames for session in prepared}
    if len(set(frames.values())) != 1:
        raise ValueError(
            f"All sessions of one dataset must have the same number of frames per trial (Array2D rows share the "
            f"time axis), got {frames}. Prepare them with the same target_fs and trial length, or crop to the "
            "shortest, or build one dataset per trial length."
        )
    with_behavior = [session.behavior is not None for session in prepared]
    if any(with_behavior) and not all(with_behavior):
        missing = [s.name for s, has in zip(prepared, with_behavior) if not has]
        raise ValueError(
            f"Sessions {missing} have no behaviour while others do; build behaviour datasets only from sessions "
            "that all have it (or drop the behaviour with session.behavior = None)."
        )
    num_frames = prepared[0].num_frames
    metadata = session_metadata(prepared, neuron_id_offsets)
    feature_dict = {
        "input_values": Array2D(shape=(None, num_frames), dtype="float32"),
        "session_id": Value("int32"),
        "session_name": Value("string"),
        "neuron_ids": Sequence(Value("int32")),
        "trial_index": Value("int32"),
    }
    if all(with_behavior):
        feature_dict["behavior"] = Array2D(shape=(None, num_frames), dtype="float32")
    features = Features(feature_dict)
    description = json.dumps({METADATA_KEY: [info.to_dict() for info in metadata]})

    splits = {}
    for split in SPLITS:
        columns: dict[str, list] = {name: [] for name in feature_dict}
        for session, info in zip(prepared, metadata):
            index = session.splits[split]
            neuron_ids = np.arange(info.neuron_offset, info.neuron_offset + info.num_neurons, dtype=np.int32)
            columns["input_values"].extend(session.traces[index])
            columns["session_id"].extend([info.session_id] * len(index))
            columns["session_name"].extend([session.name] * len(index))
            columns["neuron_ids"].extend([neuron_ids] * len(index))
            columns["trial_index"].extend(int(i) for i in index)
            if "behavior" in columns:
                columns["behavior"].extend(session.behavior[index])
        splits[split] = Dataset.from_dict(columns, features=features, info=DatasetInfo(description=description, features=features))
    return DatasetDict(splits)


def read_session_metadata(dataset: Dataset | DatasetDict) -> list[SessionInfo]:
    """Session metadata stored in `dataset.info.description` by `build_trial_dataset`."""
    if isinstance(dataset, DatasetDict):
        dataset = next(iter(dataset.values()))
    try:
        payload = json.loads(dataset.info.description or "")[METADATA_KEY]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            "This dataset carries no calm_hf session metadata in info.description; build it with "
            "build_trial_dataset or load the sidecar with load_session_metadata(path)."
        ) from error
    return [SessionInfo.from_dict(item) for item in payload]


def save_session_metadata(
    path: str | os.PathLike, sessions: list[SessionInfo] | list[PreparedSession] | Dataset | DatasetDict
) -> Path:
    """Write session metadata as JSON. `path` is a file, or a folder (then `<folder>/calm_sessions.json`, e.g. next
    to a dataset saved with `save_to_disk`). Returns the file written."""
    if isinstance(sessions, (Dataset, DatasetDict)):
        infos = read_session_metadata(sessions)
    else:
        sessions = list(sessions)
        infos = session_metadata(sessions) if sessions and isinstance(sessions[0], PreparedSession) else sessions
    path = Path(path)
    if path.is_dir() or path.suffix == "":
        path.mkdir(parents=True, exist_ok=True)
        path = path / METADATA_FILENAME
    # atomic: a run killed mid-write must not leave a truncated calm_sessions.json (wrong normalisation later)
    atomic_write_text(path, json.dumps({METADATA_KEY: [info.to_dict() for info in infos]}, indent=2))
    return path


def save_trial_dataset(
    dataset: DatasetDict,
    output_dir: str | os.PathLike,
    sessions: list[SessionInfo] | list[PreparedSession] | Dataset | DatasetDict | None = None,
    command: str | None = None,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Save a trial (or tokenized) DatasetDict and its `calm_sessions.json` together, atomically.

    Both are written into `<output_dir>.partial`, flushed and renamed into place, so an interrupted run leaves the
    previous `output_dir` untouched (never new trials beside old session statistics). `sessions` defaults to the
    metadata carried in the dataset's `info.description`; `command` marks the folder as that command's output
    (`calm_hf.atomic.mark_output`); `extra_files` (`{name: text}`) are written beside them in the same step.
    Returns `output_dir`.
    """
    output_dir = Path(output_dir)

    def write(staging: Path) -> None:
        dataset.save_to_disk(str(staging))
        save_session_metadata(staging, sessions if sessions is not None else dataset)
        for name, text in (extra_files or {}).items():
            (staging / name).write_text(text)

    atomic_folder(output_dir, write, command=command)
    return output_dir


def load_session_metadata(path: str | os.PathLike) -> list[SessionInfo]:
    """Read what `save_session_metadata` wrote (a file, or a folder holding `calm_sessions.json`)."""
    path = Path(path)
    if path.is_dir():
        path = path / METADATA_FILENAME
    if not path.is_file():
        raise FileNotFoundError(f"No session metadata at {path}; write it with save_session_metadata(path, ...).")
    return [SessionInfo.from_dict(item) for item in json.loads(path.read_text())[METADATA_KEY]]


def _encode_groups(tokenizer, input_values: list[np.ndarray], dtype) -> list[np.ndarray]:
    """Encode trials `(neurons_i, frames)`; trials with equal neuron counts are stacked into one
    `(batch, neurons, frames)` call."""
    import torch

    parameter = next(iter(tokenizer.parameters()), None) if hasattr(tokenizer, "parameters") else None
    device = parameter.device if parameter is not None else torch.device("cpu")
    input_dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    codes: list[np.ndarray | None] = [None] * len(input_values)
    groups: dict[int, list[int]] = {}
    for i, trial in enumerate(input_values):
        groups.setdefault(trial.shape[0], []).append(i)
    for members in groups.values():
        batch = torch.as_tensor(np.stack([input_values[i] for i in members]), dtype=input_dtype, device=device)
        if dtype is not None:
            with torch.autocast(device_type=device.type, dtype=dtype):
                output = tokenizer.encode(batch).codes
        else:
            output = tokenizer.encode(batch).codes
        output = output.detach().to("cpu")
        if output.ndim != 3 or output.shape[:2] != batch.shape[:2]:
            raise ValueError(
                f"tokenizer.encode returned codes of shape {tuple(output.shape)} for input {tuple(batch.shape)}; "
                "expected (batch, neurons, token_steps)."
            )
        if output.numel() and (output.min() < np.iinfo(np.int16).min or output.max() > np.iinfo(np.int16).max):
            raise ValueError("Codes do not fit in int16; codebooks larger than 32767 entries are not supported.")
        output = output.numpy().astype(np.int16)
        for position, i in enumerate(members):
            codes[i] = output[position]
    return codes


def _check_tokenize_inputs(dataset: Dataset, tokenizer, batch_size: int) -> None:
    if "input_values" not in dataset.column_names:
        raise ValueError(f"tokenize_dataset needs an 'input_values' column, got {dataset.column_names}.")
    if not hasattr(tokenizer, "encode"):
        raise ValueError(f"tokenizer must have an encode(input_values) method, got {type(tokenizer).__name__}.")
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if len(dataset) == 0:
        raise ValueError("tokenize_dataset got an empty dataset.")


def tokenize_dataset(
    dataset: Dataset | DatasetDict,
    tokenizer: Any,
    batch_size: int = 32,
    dtype: Any | None = None,
) -> Dataset | DatasetDict:
    """Add `input_ids` codes `(neurons, token_steps)` int16 to every row by calling `tokenizer.encode`.

    Args:
        dataset (`Dataset` or `DatasetDict`): rows with `input_values` `(neurons, frames)` (frames a multiple of
            the tokenizer's window).
        tokenizer: any object with `encode(input_values (batch, neurons, frames)) -> output.codes (batch, neurons,
            token_steps)`, e.g. `CalmTokenizer`. Put in eval mode for the call (restored afterwards) and run
            under `torch.no_grad()`.
        batch_size (`int`, *optional*, defaults to 32): trials per `encode` call (trials of equal neuron count are
            stacked).
        dtype (`torch.dtype`, *optional*): autocast dtype, e.g. `torch.bfloat16` (fast on CPUs with AMX).

    Returns:
        The same kind of object with the extra column `input_ids` `Array2D((None, token_steps), "int16")`.
    """
    import torch

    if isinstance(dataset, DatasetDict):
        return DatasetDict(
            {name: tokenize_dataset(split, tokenizer, batch_size=batch_size, dtype=dtype) for name, split in dataset.items()}
        )
    _check_tokenize_inputs(dataset, tokenizer, batch_size)
    # probe one trial for the number of token steps (the tokenizer validates frames vs. its window)
    was_training = bool(getattr(tokenizer, "training", False))
    if hasattr(tokenizer, "eval"):
        tokenizer.eval()
    try:
        with torch.no_grad():
            first = np.asarray(dataset.with_format("numpy")[0]["input_values"], dtype=np.float32)
            token_steps = _encode_groups(tokenizer, [first], dtype)[0].shape[-1]
            features = dataset.features.copy()
            features["input_ids"] = Array2D(shape=(None, token_steps), dtype="int16")

            def encode_batch(batch: dict[str, Any]) -> dict[str, Any]:
                trials = [np.asarray(trial, dtype=np.float32) for trial in batch["input_values"]]
                return {"input_ids": _encode_groups(tokenizer, trials, dtype)}

            encoded = dataset.with_format("numpy").map(
                encode_batch,
                batched=True,
                batch_size=int(batch_size),
                features=features,
                desc="Tokenizing trials",
                load_from_cache_file=False,
                # a fresh fingerprint: hashing the closure would serialise the whole tokenizer
                new_fingerprint=uuid.uuid4().hex,
            )
    finally:
        if hasattr(tokenizer, "train"):
            tokenizer.train(was_training)
    return encoded.with_format(None)


def load_trial_corpus(source: str | os.PathLike) -> tuple[DatasetDict, list[SessionInfo]]:
    """A trial DatasetDict and its session metadata, from a local folder or a Hub dataset id.

    A folder written by `save_to_disk` is read with `load_from_disk` and its `calm_sessions.json`; anything else is
    taken as a Hub dataset id, read with `load_dataset` and the `calm_sessions.json` pushed beside it
    (`calm_hf.hub.push_to_hub` uploads it), falling back to the metadata in `info.description`.
    """
    from datasets import load_dataset, load_from_disk

    path = Path(source)
    if path.is_dir():
        corpus = load_from_disk(str(path))
        if (path / METADATA_FILENAME).is_file():
            return corpus, load_session_metadata(path)
        return corpus, read_session_metadata(corpus)
    if path.suffix or str(source).startswith((".", "/", "~")) or str(source).count("/") != 1:
        raise FileNotFoundError(
            f"{source} is neither a dataset folder (written by save_to_disk) nor a Hub dataset id (namespace/name)."
        )
    corpus = load_dataset(str(source))
    try:
        from huggingface_hub import hf_hub_download

        sidecar = hf_hub_download(str(source), METADATA_FILENAME, repo_type="dataset")
    except Exception:  # noqa: BLE001 - an older push without the sidecar: use the metadata in the dataset info
        return corpus, read_session_metadata(corpus)
    return corpus, load_session_metadata(sidecar)
