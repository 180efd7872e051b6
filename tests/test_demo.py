"""`jestkit demo --quick` end to end, the run-directory guard, and the shipped configs."""

import dataclasses
import json
from pathlib import Path

import pytest

from jestkit.cli import main
from jestkit.demo import DEMO_METHODS, DemoConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 0
    return out


def test_quick_demo_writes_a_complete_report(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    assert 0 <= report["reference_accuracy"] <= 1
    assert set(report["methods"]) == {name for name, *_ in DEMO_METHODS}
    for name, m in report["methods"].items():
        assert set(m["final_accuracy"]) >= {"mean", "std"}
        for key in ("iteration_speedup", "compute_speedup"):
            assert m[key] is None or m[key] > 0, (name, key)
        assert 0 <= m["clean_fraction"] <= 1
        assert len(m["curves"]["steps"]) == len(m["curves"]["zero_shot_accuracy"]) == 40
    flops = {name: m["flops_at_end"] for name, m in report["methods"].items()}
    assert flops["uniform"]["learner_scoring"] == flops["uniform"]["reference_scoring"] == 0
    assert flops["learnability-joint"]["reference_scoring"] > 0
    assert flops["learnability-joint-cached"]["reference_scoring"] == 0  # looked up
    # Flexi scores at patch 16 (4 tokens instead of 16): far cheaper learner scoring.
    assert (flops["learnability-joint-flexi"]["learner_scoring"]
            < 0.6 * flops["learnability-joint-cached"]["learner_scoring"])
    assert report["reference"]["caching_flops"] > 0
    for f in ("report.md", "accuracy_vs_steps.png", "accuracy_vs_flops.png",
              "clean_fraction.png", "reference.safetensors", "reference_cache/manifest.json"):
        assert (quick_run / f).exists(), f
    assert "Did uniform plateau?" in (quick_run / "report.md").read_text()


def test_existing_run_directory_is_not_overwritten(quick_run, capsys):
    before = (quick_run / "report.json").read_bytes()
    assert main(["demo", "--quick", "--out", str(quick_run), "--no-progress"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (quick_run / "report.json").read_bytes() == before


def test_shipped_configs_are_the_built_in_ones():
    def load(name):
        return DemoConfig.from_dict(json.loads((CONFIGS / name).read_text()))

    assert load("demo.json") == DemoConfig()
    assert load("demo-quick.json") == DemoConfig.quick()


def test_bad_demo_config():
    with pytest.raises(ValueError, match="methods must include 'uniform'"):
        DemoConfig(methods=("learnability-joint",))
    with pytest.raises(ValueError, match="unknown demo config fields"):
        DemoConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="method must be one of"):
        DemoConfig.from_dict({"learner": {"method": "nope"}})
    assert dataclasses.replace(DemoConfig(), seeds=(5,)).seeds == (5,)
