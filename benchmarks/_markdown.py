"""Where a benchmark's results go: its section of a markdown doc (keeping the prose around
it) and a raw JSON file. Both are checked before any work and written atomically, so neither
a failed check after minutes of measuring nor an interrupted write can lose results or
truncate a doc that holds other benchmarks' sections."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from jestkit.atomic import atomic_write


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def check_section(path: Path | None, name: str) -> None:
    """Refuse, before any work, an existing `path` that `replace_section` could not write."""
    if path is None or not path.exists():
        return
    if path.is_dir():
        raise SystemExit(f"{path} is a directory; --out takes a markdown file")
    start, end = _markers(name)
    text = path.read_text()
    if start not in text or end not in text or text.index(end) < text.index(start):
        raise SystemExit(f"{path} exists without the markers {start} ... {end} (in that "
                         f"order); add them where the results go, or write to a new file")


def replace_section(path: Path, body: str, name: str, title: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in `path` with
    `body`; a new file is created as `# title` followed by the section. An existing file
    without both markers is refused, not overwritten: it may be a doc with other results."""
    start, end = _markers(name)
    block = f"{start}\n{body}{end}"
    if path.exists():
        check_section(path, name)
        text = path.read_text()
        head, rest = text.split(start, 1)
        tail = rest.split(end, 1)[1]
        atomic_write(path, head + block + tail)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, f"# {title}\n\n{block}\n")


def check_outputs(parser: argparse.ArgumentParser, out: Path | None, section: str | None,
                  json_path: Path | None, may_replace: Path | None = None) -> None:
    """Before any work: `out` (a doc whose section is replaced) and `json_path` (a new file,
    or `may_replace`, the earlier results a run merges into) must be writable where they are;
    an existing JSON file is not overwritten (it may be the only copy of earlier results)."""
    if out is not None and section is not None:
        try:
            check_section(out, section)
        except SystemExit as err:
            parser.error(str(err))
    for flag, path in (("--out", out), ("--json", json_path)):
        if path is not None and not path.parent.is_dir():
            parser.error(f"{flag} {path}: directory {path.parent} does not exist")
    if json_path is not None and json_path.exists():
        same = may_replace is not None and json_path.resolve() == may_replace.resolve()
        if json_path.is_dir() or not same:
            parser.error(f"--json {json_path}: it exists; give a new path (nothing is "
                         f"overwritten)")


def write_json(path: Path, results: object) -> None:
    """The raw results as JSON, atomically (objects it cannot encode as their str)."""
    atomic_write(path, json.dumps(results, indent=1, default=str))


def command_line(script: str, argv: list[str] | None) -> str:
    """The command that reproduced these results (`argv`, or this process's arguments), for
    the header of the markdown it writes."""
    return " ".join(["python", f"benchmarks/{script}", *(sys.argv[1:] if argv is None else argv)])


def publish(md: str, results: object, json_path: Path | None, out: Path | None, section: str,
            title: str) -> None:
    """A finished benchmark's outputs: the raw JSON first (what a failed --out would lose),
    then the markdown printed, then its section of `out` replaced (both checked writable by
    `check_outputs` before the work)."""
    if json_path is not None:
        write_json(json_path, results)
    print(md)
    if out is not None:
        replace_section(out, md, section, title)


def load_demo_config(parser: argparse.ArgumentParser, path: Path):
    """A `jestkit.demo.DemoConfig` from a JSON file, or the parser's error naming --config."""
    from jestkit.demo import DemoConfig

    try:
        return DemoConfig.from_dict(json.loads(path.read_text()))
    except OSError as err:
        parser.error(f"--config {path}: cannot read it ({err.strerror or err})")
    except RecursionError:  # json's parser recurses once per nesting level
        parser.error(f"--config {path}: not a demo config (JSON nested too deeply to read)")
    except (ValueError, TypeError) as err:  # not JSON, not a demo config
        parser.error(f"--config {path}: {err}")
