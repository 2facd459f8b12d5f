"""Crash-safe writes, and the one rule for where a command may write.

Everything is first written under `<name>.partial`, flushed to disk (`fsync`) and then renamed into place with
`os.replace`, which is atomic on POSIX file systems. A process killed half-way (SIGTERM, SIGKILL, power loss) leaves
at most a `.partial` next to the untouched old version; `remove_stale_partials` cleans those on the next run.

Output folders (`claim_output_folder`, `claim_output_file`): a command writes only into a new or empty folder, or one
it wrote itself earlier (marked by a `.calm_output.json` naming the command); any other non-empty folder needs
`--overwrite`. Even with it, a command never replaces its own inputs, a folder holding them, the working directory,
the home folder or a parent of either.

Several folders that must change together (a model and the dataset it was evaluated on) switch with
`switch_folders`: a journal written after everything is staged is the commit point, and `finish_switch` completes an
interrupted switch on the next run.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

logger = logging.getLogger(__name__)

PARTIAL_SUFFIX = ".partial"


def partial_path(path: str | os.PathLike) -> Path:
    """Where `path` is staged before it is renamed into place: `<path>.partial`."""
    path = Path(path)
    return path.with_name(path.name + PARTIAL_SUFFIX)


def fsync_tree(path: str | os.PathLike) -> None:
    """Flush every file under `path` (a file or a folder) and the folders themselves to disk."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
        return
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str | os.PathLike) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # some file systems do not allow opening folders; the rename is still atomic there
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` via `<path>.partial` + fsync + rename, so readers never see a truncated file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = partial_path(path)
    with open(staging, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(staging, path)
    _fsync_dir(path.parent)
    return path


def atomic_folder(path: str | os.PathLike, write: Callable[[Path], object], command: str | None = None) -> object:
    """Build a folder atomically: `write(staging)` fills `<path>.partial`, which is then flushed and renamed to
    `path`, replacing any previous version. If `write` fails (or the process is interrupted), the old `path` is left
    as it was and the staging folder is removed. With `command`, the folder is marked as that command's output
    (`mark_output`). Returns what `write` returned."""
    path = Path(path)
    staging = partial_path(path)
    _remove(staging)
    try:
        result = write(staging)
        if command is not None:
            mark_output(staging, command)
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    replace_folder(staging, path)
    return result


def replace_folder(source: str | os.PathLike, destination: str | os.PathLike) -> None:
    """Move the finished folder `source` to `destination`, replacing an older version. The old version is first
    renamed aside (`<destination>.old.partial`), so at every instant `destination` is either the old or the new
    complete folder (or absent), never a mix."""
    source, destination = Path(source), Path(destination)
    old = destination.with_name(destination.name + ".old" + PARTIAL_SUFFIX)
    _remove(old)
    if destination.exists() or destination.is_symlink():
        os.replace(destination, old)
    os.replace(source, destination)
    _fsync_dir(destination.parent)
    _remove(old)


def _remove(path: Path) -> None:
    """Delete a file, link or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink(missing_ok=True)


def remove_stale_partials(folder: str | os.PathLike, max_depth: int = 2) -> list[Path]:
    """Delete `*.partial` files and folders under `folder` (down to `max_depth` levels) left by an interrupted run.
    Returns what was removed (each one is logged)."""
    folder = Path(folder)
    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    pending = [(folder, 0)]
    while pending:
        current, depth = pending.pop()
        for entry in sorted(current.iterdir()):
            if entry.name.endswith(PARTIAL_SUFFIX):
                logger.info("removing %s left by an interrupted run", entry)
                _remove(entry)
                removed.append(entry)
            elif entry.is_dir() and not entry.is_symlink() and depth + 1 < max_depth:
                pending.append((entry, depth + 1))
    return removed


# ---------------------------------------------------------------------------------------------------------------------
# where a command may write
# ---------------------------------------------------------------------------------------------------------------------

OUTPUT_MARKER = ".calm_output.json"
# owner written by the main job's stage machinery (`calm_hf.commands.stages.Stage`) into a stage folder before it runs
# the stage's command there: any command may write into it
STAGE_OWNER = "stage"


def mark_output(folder: str | os.PathLike, command: str, **info) -> Path:
    """Mark `folder` as written by `calm <command>` (`.calm_output.json`, written atomically); `info` is stored too."""
    return atomic_write_text(Path(folder) / OUTPUT_MARKER,
                             json.dumps({"command": command, "written": time.strftime("%Y-%m-%dT%H:%M:%S"), **info}))


def read_output_marker(folder: str | os.PathLike) -> dict | None:
    """The `.calm_output.json` of `folder` as a dict, or None when it has none (or an unreadable one)."""
    try:
        marker = json.loads((Path(folder) / OUTPUT_MARKER).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) else None


def _resolved(path: str | os.PathLike) -> Path:
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path)))).resolve()


def _is_within(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def _forbidden_output(target: Path, inputs: Iterable) -> str | None:
    """Why `target` may never be replaced or written into as an output (None when it may)."""
    for name, place in (("the current working directory", Path.cwd()), ("your home folder", Path.home())):
        place = _resolved(place)
        if target == place:
            return f"is {name}"
        if target in place.parents:
            return f"is a parent of {name} ({place})"
    for item in inputs:
        if item is None or str(item) == "":
            continue
        path = _resolved(item)
        if not (path.exists() or path.is_symlink()):  # a Hub id, or a file the command will report as missing
            continue
        if target == path:
            return f"is the input {item}"
        if target in path.parents:
            return f"holds the input {item}"
    return None


def _describe(folder: Path, limit: int = 5) -> str:
    names = sorted(entry.name for entry in folder.iterdir())
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def claim_output_folder(path: str | os.PathLike, command: str, inputs: Iterable = (), overwrite: bool = False,
                        in_place: bool = False) -> Path:
    """Check that `calm <command>` may write its output folder `path`; returns it resolved.

    The rule every command follows: a new or empty folder is fine, and so is a folder this command wrote earlier (its
    `.calm_output.json` names the command, or the main job's stage machinery reserved it); any other non-empty folder
    is refused unless `overwrite`. Never allowed, even with `overwrite`: an input (`inputs`, paths that do not exist
    locally such as Hub ids are skipped) or a folder holding one, the working directory, the home folder, or a parent
    of either.

    Args:
        path (`str` or `os.PathLike`): the output folder.
        command (`str`): the command's name as typed after `calm` (`"prepare"`, `"pretrain"`, ...).
        inputs (iterable of paths): what the command reads.
        overwrite (`bool`): the command's `--overwrite` flag.
        in_place (`bool`): the command writes into the folder as it goes (Trainer checkpoints, reports) instead of
            replacing it whole: the folder is created and marked now, and `overwrite` lets it write into a foreign
            folder without deleting anything there.

    Raises:
        `ValueError`: the folder is an input, holds one, or is the working or home folder (or a parent of them).
        `FileExistsError`: the folder is not empty, was not written by this command, and `overwrite` is False.
    """
    target = _resolved(path)
    flag = f"output folder {path}"
    reason = _forbidden_output(target, inputs)
    if reason is not None:
        raise ValueError(f"{flag} {reason}; writing there could destroy it (--overwrite does not change this). "
                         "Pass a new folder, e.g. a subfolder such as runs/my-output.")
    if target.exists() and not target.is_dir():
        if not overwrite:
            raise FileExistsError(f"{flag} is a file, not a folder; pass another folder, or --overwrite to replace it.")
        logger.warning("%s is a file: replacing it (--overwrite)", target)
        if in_place:
            target.unlink()
    elif target.is_dir() and any(target.iterdir()):
        owner = (read_output_marker(target) or {}).get("command")
        if owner in (command, STAGE_OWNER):
            logger.info("%s holds an earlier output of calm %s: %s", target, command,
                        "writing into it" if in_place else "replacing it")
        elif not overwrite:
            written = f"was written by `calm {owner}`" if owner else "was not written by calm_hf"
            action = "write into it" if in_place else "replace it"
            raise FileExistsError(
                f"{flag} is not empty ({_describe(target)}) and {written}, so `calm {command}` will not {action}. "
                f"Pass a new or empty folder, or --overwrite to {action}"
                + (" (nothing there is deleted; files of the same names are replaced)." if in_place else "."))
        else:
            logger.warning("%s is not empty and was not written by calm %s: %s it (--overwrite)", target, command,
                           "writing into" if in_place else "replacing")
    if in_place:
        target.mkdir(parents=True, exist_ok=True)
        if (read_output_marker(target) or {}).get("command") not in (command, STAGE_OWNER):
            mark_output(target, command)
    return target


def claim_output_file(path: str | os.PathLike, command: str, inputs: Iterable = (), overwrite: bool = False,
                      is_own: Callable[[Path], bool] | None = None) -> Path:
    """`claim_output_folder` for a single output file: never an input or a folder; an existing file only when
    `is_own(path)` says this command wrote it, or with `overwrite`. Returns the path resolved."""
    target = _resolved(path)
    flag = f"output file {path}"
    for item in inputs:
        if item is not None and str(item) and _resolved(item) == target:
            raise ValueError(f"{flag} is the input {item}; writing it would destroy the input (--overwrite does not "
                             "change this). Pass another file name.")
    if target.is_dir():
        raise ValueError(f"{flag} is a folder; pass a file name, e.g. {Path(path) / 'forecast.npz'}.")
    if target.exists() and not overwrite and not (is_own is not None and is_own(target)):
        raise FileExistsError(f"{flag} already exists and was not written by `calm {command}`; pass another file "
                              "name, or --overwrite to replace it.")
    return target


# ---------------------------------------------------------------------------------------------------------------------
# several folders switched as one
# ---------------------------------------------------------------------------------------------------------------------

def switch_folders(journal: str | os.PathLike, moves: list[tuple[str | os.PathLike, str | os.PathLike]],
                   **info) -> None:
    """Replace several folders as one: each `(staged, final)` pair's finished `staged` folder replaces `final`.

    The journal (`moves` and `info`, written atomically) is the commit point: before it exists, a crash leaves every
    old `final` folder as it was; once it exists, `finish_switch(journal)` (which this calls, and which the next run
    calls after a crash) completes every move. Each move is itself atomic (`replace_folder`)."""
    for staged, _ in moves:
        if not Path(staged).is_dir():
            raise FileNotFoundError(f"{staged} is missing: stage every folder before switching.")
        fsync_tree(staged)
    atomic_write_text(journal, json.dumps({"moves": [[str(s), str(f)] for s, f in moves], **info}, indent=2))
    finish_switch(journal)


def pending_switch(journal: str | os.PathLike) -> dict | None:
    """The journal of an unfinished `switch_folders` (None when there is none)."""
    try:
        record = json.loads(Path(journal).read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:  # atomic writes never leave half a journal; a foreign file is refused
        raise ValueError(f"{journal} is not a readable switch journal ({error}); remove it if you did not expect it.")
    return record


def finish_switch(journal: str | os.PathLike) -> dict | None:
    """Complete an interrupted `switch_folders`: move every staged folder the journal names that still exists into
    place, then remove the journal. Returns the journal's record (None when nothing was pending)."""
    record = pending_switch(journal)
    if record is None:
        return None
    for staged, final in record["moves"]:
        if Path(staged).is_dir():
            replace_folder(staged, final)
    Path(journal).unlink(missing_ok=True)
    _fsync_dir(Path(journal).parent)
    return record


__all__ = [
    "OUTPUT_MARKER",
    "PARTIAL_SUFFIX",
    "atomic_folder",
    "atomic_write_text",
    "claim_output_file",
    "claim_output_folder",
    "finish_switch",
    "fsync_tree",
    "mark_output",
    "partial_path",
    "pending_switch",
    "read_output_marker",
    "remove_stale_partials",
    "replace_folder",
    "switch_folders",
]
