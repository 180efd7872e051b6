"""The benchmarks' shared helper that writes results into a doc (benchmarks/_markdown.py)."""

import importlib.util
import json
import subprocess
import sys
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


@pytest.mark.parametrize("script", ["step_overhead", "selection_speed", "clean_oracle"])
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


def test_clean_oracle_trains_only_on_clean_pairs_and_reports_by_the_protocol(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out, raw = tmp_path / "doc.md", tmp_path / "raw.json"
    out.write_text("prose\n<!-- clean_oracle:start -->\n<!-- clean_oracle:end -->\n")
    # A subprocess, as it is run: its spawned workers import the script by its own name.
    subprocess.run([sys.executable, str(root / "benchmarks" / "clean_oracle.py"), "--quick",
                    "--workers", "1", "--out", str(out), "--json", str(raw)],
                   check=True, capture_output=True, timeout=300)
    res = json.loads(raw.read_text())
    methods = res["methods"]
    assert set(methods) == {"uniform", "clean-oracle", "learnability-joint"}
    assert methods["clean-oracle"]["clean_fraction"] == 1.0
    assert res["clean_pool_size"] == round(0.45 * res["pool_size"])
    assert abs(methods["uniform"]["clean_fraction"] - 0.45) < 0.1  # 40 x 64 uniform draws
    for m in methods.values():  # every method is measured against uniform's final accuracy
        assert m["target_accuracy"] == methods["uniform"]["final_accuracy"]["mean"]
    text = out.read_text()
    assert text.startswith("prose\n<!-- clean_oracle:start -->\nCommand: ")
    assert "| clean-oracle | " in text and text.endswith("<!-- clean_oracle:end -->\n")
