"""Atomic writes: a reader (or a crash) sees the old file or the complete new one.

Checkpoints, caches and reports all go through `atomic_write` (files; `atomic_write_all` for
several that belong together) or
`replacing_directory` / `move_into_place` (a whole directory: a checkpoint, a demo run), so
nothing already computed is ever replaced by a torn, half-written one.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_write", "atomic_write_all", "move_into_place", "replacing_directory",
           "set_aside_copy_of", "sha256_file", "sha256_stream", "unfinished_write"]


@contextlib.contextmanager
def replacing_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling, then put it in place of `final`.

    Yields the temporary directory (mode 0755) to fill. On a clean exit it is put in place of
    `final` by `move_into_place` (never a half-written `final`, whenever a crash comes). On an
    error in the body the temporary directory is removed and `final` is left untouched.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.new."))
    tmp.chmod(0o755)  # mkdtemp makes 0700; these directories are data, meant to be shared
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    move_into_place(tmp, final)


def move_into_place(new: str | os.PathLike, final: str | os.PathLike) -> None:
    """Put the finished directory `new` in place of `final` (a sibling of it).

    An existing `final` is first renamed aside, `new` renamed into place, and only then the
    old one deleted: a crash at any moment leaves the old directory (under its own or a
    hidden ``.old`` name) or the new one, never a half-written `final`. If the swap fails,
    `final` is restored and `new` is kept (its path is in the error).
    """
    new, final = Path(new), Path(final)
    old = None
    try:
        if final.exists():
            old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old."))
            os.replace(final, old)  # onto the empty directory just made
        os.replace(new, final)
    except BaseException as err:
        # The swap failed (e.g. `final` is a file) or was interrupted: put the old one back
        # if the new one is not in place, keep the new one.
        if old is not None and not final.exists():
            os.replace(old, final)
        elif old is not None:
            shutil.rmtree(old, ignore_errors=True)
        if not isinstance(err, Exception):  # Ctrl-C, SIGTERM: stay what they are
            raise
        raise OSError(f"could not put {new} in place of {final} ({err}); the new contents "
                      f"are kept in {new}") from err
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` atomically.

    The bytes go to a temp file in the same directory, are flushed and fsynced, then
    `os.replace`d over `path`; the directory is fsynced too (where the platform allows), so
    the rename itself is durable. On any error the temp file is removed.
    """
    atomic_write_all({path: data})


def atomic_write_all(files: Mapping[str | os.PathLike, bytes | str]) -> None:
    """Write several files atomically, each as `atomic_write` does, and all-or-nothing as far
    as writing goes: every temp file is written and fsynced before the first rename, so a
    write that fails (a full disk, a quota) replaces none of them; on any error the temp
    files are removed. (The renames themselves are one at a time: a crash between two leaves
    some files old and some new, each of them whole.)"""
    temps: list[tuple[str, Path]] = []
    try:
        for path, data in files.items():
            path = Path(path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            temps.append((tmp, path))
            try:
                f = os.fdopen(fd, "wb")
            except BaseException:
                os.close(fd)
                raise
            with f:
                f.write(data.encode() if isinstance(data, str) else data)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are data, not secrets
        while temps:  # a temp leaves the list only once renamed: never unlinked after
            tmp, path = temps[0]
            os.replace(tmp, path)
            temps.pop(0)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):  # one that cannot go must not hide the error
                os.unlink(tmp)
        raise
    finally:  # the renames done, also when a later one failed
        for parent in {Path(path).parent for path in files}:
            _fsync_directory(parent)


def _fsync_directory(directory: Path) -> None:
    """Make the renames into `directory` durable, where the platform can open a directory."""
    try:
        dir_fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def sha256_file(path: str | os.PathLike) -> str:
    """The SHA-256 hex digest of a file's bytes, read in 1 MiB blocks (any size)."""
    with open(path, "rb") as f:
        return sha256_stream(f)


def sha256_stream(f: BinaryIO) -> str:
    """The SHA-256 hex digest of what is left to read in the binary file `f` (1 MiB blocks):
    for a caller that must go on using the very file it hashed."""
    h = hashlib.sha256()
    for block in iter(lambda: f.read(1 << 20), b""):
        h.update(block)
    return h.hexdigest()


# What a crash leaves behind. Both writers above work under hidden sibling names, so the names
# alone say what a leftover is (this module is the one place that makes them).


def unfinished_write(path: str | os.PathLike) -> bool:
    """Whether `path` is a write that never completed: a directory `replacing_directory` was
    filling (``.NAME.new.<random>``) or a temp file of `atomic_write` (``.NAME.<random>.tmp``).
    Nothing reads these; they are safe to delete."""
    name = Path(path).name
    return name.startswith(".") and (".new." in name or name.endswith(".tmp"))


def set_aside_copy_of(path: str | os.PathLike) -> str | None:
    """NAME if `path` is the old copy of NAME that `replacing_directory` moved aside
    (``.NAME.old.<random>``), else None. Redundant once NAME exists again; until then it may be
    the only copy."""
    name = Path(path).name
    if name.startswith(".") and ".old." in name:
        return name[1:name.index(".old.")]
    return None
