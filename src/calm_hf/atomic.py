"""Crash-safe writes: a file or folder either appears whole under its final name or not at all.

Everything is first written under `<name>.partial`, flushed to disk (`fsync`) and then renamed into place with
`os.replace`, which is atomic on POSIX file systems. A process killed half-way (SIGTERM, SIGKILL, power loss) leaves
at most a `.partial` next to the untouched old version; `remove_stale_partials` cleans those on the next run.
"""

from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
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


def atomic_folder(path: str | os.PathLike, write: Callable[[Path], object]) -> object:
    """Build a folder atomically: `write(staging)` fills `<path>.partial`, which is then flushed and renamed to
    `path`, replacing any previous version. If `write` fails (or the process is interrupted), the old `path` is left
    as it was and the staging folder is removed. Returns what `write` returned."""
    path = Path(path)
    staging = partial_path(path)
    shutil.rmtree(staging, ignore_errors=True)
    try:
        result = write(staging)
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
    shutil.rmtree(old, ignore_errors=True)
    if destination.exists():
        os.replace(destination, old)
    os.replace(source, destination)
    _fsync_dir(destination.parent)
    shutil.rmtree(old, ignore_errors=True)


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
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                removed.append(entry)
            elif entry.is_dir() and not entry.is_symlink() and depth + 1 < max_depth:
                pending.append((entry, depth + 1))
    return removed


__all__ = [
    "PARTIAL_SUFFIX",
    "atomic_folder",
    "atomic_write_text",
    "fsync_tree",
    "partial_path",
    "remove_stale_partials",
    "replace_folder",
]
