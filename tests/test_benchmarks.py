"""The benchmarks' shared helper that writes results into a doc (benchmarks/_markdown.py)."""

import importlib.util
from pathlib import Path

import pytest


def _markdown():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "_markdown.py"
    spec = importlib.util.spec_from_file_location("_markdown", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_results_replace_only_their_section(tmp_path):
    md = _markdown()
    new = tmp_path / "new.md"
    md.replace_section(new, "table 1\n", "bench", "Title")
    assert new.read_text() == "# Title\n\n<!-- bench:start -->\ntable 1\n<!-- bench:end -->\n"
    doc = tmp_path / "doc.md"
    doc.write_text("prose\n<!-- bench:start -->\nold\n<!-- bench:end -->\nmore prose\n"
                   "<!-- other:start -->\nkept\n<!-- other:end -->\n")
    md.replace_section(doc, "table 2\n", "bench", "Title")
    assert doc.read_text() == ("prose\n<!-- bench:start -->\ntable 2\n<!-- bench:end -->\n"
                               "more prose\n<!-- other:start -->\nkept\n<!-- other:end -->\n")


def test_a_doc_without_the_markers_is_refused_not_overwritten(tmp_path):
    md = _markdown()
    doc = tmp_path / "results.md"
    doc.write_text("measured results\n<!-- bench:start -->\nno end marker\n")
    before = doc.read_text()
    with pytest.raises(SystemExit, match="without the markers"):
        md.check_section(doc, "bench")  # what the benchmarks call before they run
    with pytest.raises(SystemExit, match="without the markers"):
        md.replace_section(doc, "table\n", "bench", "Title")
    assert doc.read_text() == before
    md.check_section(tmp_path / "absent.md", "bench")  # a new file is fine
    md.check_section(None, "bench")  # no --out


@pytest.mark.parametrize("script", ["step_overhead", "selection_speed"])
def test_a_benchmark_refuses_its_out_file_before_timing_anything(script, tmp_path,
                                                                 monkeypatch):
    benchmarks = Path(__file__).resolve().parents[1] / "benchmarks"
    monkeypatch.syspath_prepend(str(benchmarks))
    spec = importlib.util.spec_from_file_location(f"bench_{script}", benchmarks / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark started before checking --out")

    for name in ("run", "spawn", "measure_peak", "wait_until_quiet"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, must_not_run)
    doc = tmp_path / "results.md"
    doc.write_text("hand-written results, no markers\n")
    with pytest.raises(SystemExit, match="without the markers"):
        module.main(["--quick", "--out", str(doc)])
    assert doc.read_text() == "hand-written results, no markers\n"
