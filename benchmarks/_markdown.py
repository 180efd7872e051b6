"""Write a benchmark's results into its section of a markdown doc, keeping the prose around it."""

from __future__ import annotations

from pathlib import Path


def replace_section(path: Path, body: str, name: str, title: str) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->` in `path` with
    `body`; a file without the markers is created as `# title` followed by the section."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}{end}"
    if path.exists():
        text = path.read_text()
        if start in text and end in text:
            head, rest = text.split(start, 1)
            tail = rest.split(end, 1)[1]
            path.write_text(head + block + tail)
            return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"# {title}\n\n{block}\n")
