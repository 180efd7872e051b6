"""code_version: what made a result, and that any edit to the source shows in it."""

import shutil
from pathlib import Path

import torch

import jestkit
from jestkit.provenance import code_version, describe_version


def test_code_version_names_this_jestkit_torch_and_python():
    v = code_version()
    assert v["jestkit"] == jestkit.__version__ and v["torch"] == torch.__version__
    assert len(v["source_sha256"]) == 64 and v["python"].count(".") == 2
    v["jestkit"] = "changed"  # a fresh dict each call: nobody can alter another's copy
    assert code_version()["jestkit"] == jestkit.__version__
    # This process's version is its own package's, hashed as it is on disk.
    assert code_version(Path(jestkit.__file__).parent) == code_version()


def test_any_edit_to_the_source_changes_the_hash(tmp_path):
    package = tmp_path / "jestkit"
    shutil.copytree(Path(jestkit.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__"))
    base = code_version(package)["source_sha256"]
    assert base == code_version()["source_sha256"]  # same files, same hash

    report = package / "report.py"
    original = report.read_text()
    report.write_text(original + "# a comment\n")
    assert code_version(package)["source_sha256"] != base
    report.write_text(original)
    assert code_version(package)["source_sha256"] == base

    (package / "extra.py").write_text("")  # a new module
    assert code_version(package)["source_sha256"] != base
    (package / "extra.py").unlink()
    report.rename(package / "report2.py")  # same content under another name
    assert code_version(package)["source_sha256"] != base


def test_describe_version():
    text = describe_version({"jestkit": "1.2", "source_sha256": "ab" * 32, "torch": "2.0",
                             "python": "3.11.0"})
    assert text == "jestkit 1.2 (source abababababab, torch 2.0, Python 3.11.0)"
    for unrecorded in (None, [1], "x"):
        assert describe_version(unrecorded) == "a jestkit that did not record its version"


def test_this_jestkit_is_hashed_once_per_process(monkeypatch):
    # Found in review: the promise (a process reports the code it imported, whatever is on
    # disk later) had no test; hashing on every call passed.
    import jestkit.provenance as provenance

    first = code_version()
    calls = []
    monkeypatch.setattr(provenance, "_hash", lambda folder: calls.append(folder) or {})
    assert code_version() == first and not calls
    monkeypatch.setattr(provenance, "_THIS_PROCESS", None)  # a fresh process hashes once
    code_version()
    code_version()
    assert len(calls) == 1
