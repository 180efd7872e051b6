"""Write a benchmark's results into its section of a markdown doc, keeping the prose around it."""

from __future__ import annotations

from pathlib import Path


def _markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def check_section(path: Path | None, name: str) -> None:
    """Refuse, before any work, an existing `path` that `replace_section` could not write."""
    if path is None or not path.exists():
        return
    start, end = _markers(name)
    text = path.read_text()
    if start not in text or end not in text:
        raise SystemExit(f"{path} exists without the markers {start} ... {end}; add them "
                         f"where the results go, or write to a new file")


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
        path.write_text(head + block + tail)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{block}\n")
