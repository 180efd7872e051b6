"""Atomic file writes: a reader (or a crash) sees the old file or the complete new one.

Checkpoints, caches and reports all go through `atomic_write`, so nothing already computed
is ever replaced by a torn, half-written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write"]


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` atomically.

    The bytes go to a temp file in the same directory, are flushed and fsynced, then
    `os.replace`d over `path`; the directory is fsynced too (where the platform allows), so
    the rename itself is durable. On any error the temp file is removed.
    """
    path = Path(path)
    if isinstance(data, str):
        data = data.encode()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these files are data, not secrets
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    try:  # not every platform can open a directory
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)
