"""Which code made a result: jestkit's version, a hash of its source, torch's and Python's.

Runs are deterministic for a given code and library version, so a result saved by one and
continued or reported by another must say so. `jestkit demo --resume` refuses to mix them
(unless told to), and report.json records what made its runs.
"""

from __future__ import annotations

import hashlib
import platform
from pathlib import Path

__all__ = ["code_version", "describe_version"]


_THIS_PROCESS: dict | None = None


def code_version(package_dir: str | Path | None = None) -> dict:
    """{"jestkit", "source_sha256", "torch", "python"} of the running code (a fresh dict).

    source_sha256 hashes the name and content of every module of the package, so it changes
    with any edit to the code, released or not. For this jestkit (no `package_dir`) it is
    hashed once per process, at the first call: a process runs the code it imported, whatever
    is on disk later, and its first call comes after its imports. With `package_dir`, the
    package there, as it is now.
    """
    global _THIS_PROCESS
    if package_dir is None:
        if _THIS_PROCESS is None:
            import jestkit

            _THIS_PROCESS = _hash(Path(jestkit.__file__).parent)
        return dict(_THIS_PROCESS)
    return _hash(Path(package_dir))


def _hash(folder: Path) -> dict:
    import torch

    import jestkit

    digest = hashlib.sha256()
    for path in sorted(folder.glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return {"jestkit": jestkit.__version__, "source_sha256": digest.hexdigest(),
            "torch": torch.__version__, "python": platform.python_version()}


def describe_version(version: object) -> str:
    """One line for an error message; anything but a dict reads as unrecorded."""
    if not isinstance(version, dict):
        return "a jestkit that did not record its version"
    return (f"jestkit {version.get('jestkit')} (source "
            f"{str(version.get('source_sha256'))[:12]}, torch {version.get('torch')}, "
            f"Python {version.get('python')})")
