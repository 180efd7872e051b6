"""`jestkit demo --quick` end to end, the run-directory guard, and the shipped configs."""

import dataclasses
import json
from pathlib import Path

import pytest

from jestkit.cli import main
from jestkit.demo import _STEP_COST, DEMO_METHODS, DemoConfig, _run_one
from jestkit.training import LearnerConfig

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


def test_report_is_rebuilt_from_the_saved_runs(quick_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(quick_run, copy)
    before = json.loads((copy / "report.json").read_text())
    (copy / "report.md").write_text("stale")
    assert main(["report", str(copy)]) == 0
    after = json.loads((copy / "report.json").read_text())
    assert after == before  # same runs, same code: the same report
    assert "Did uniform plateau?" in (copy / "report.md").read_text()
    # Not a run directory, or a run's curves missing: a clear error, nothing rewritten.
    assert main(["report", str(tmp_path)]) == 2
    assert "neither report.json nor runs/info.json" in capsys.readouterr().err
    (copy / "runs" / "uniform.json").unlink()
    assert main(["report", str(copy)]) == 2
    assert "uniform.json" in capsys.readouterr().err
    assert json.loads((copy / "report.json").read_text()) == before


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
    for path in sorted(CONFIGS.glob("*.json")):  # every other shipped config is valid
        assert load(path.name).methods, path


def test_bad_demo_config():
    with pytest.raises(ValueError, match="methods must include 'uniform'"):
        DemoConfig(methods=("learnability-joint",))
    with pytest.raises(ValueError, match="unknown demo config fields"):
        DemoConfig.from_dict({"stepz": 3})
    with pytest.raises(ValueError, match="method must be one of"):
        DemoConfig.from_dict({"learner": {"method": "nope"}})
    assert dataclasses.replace(DemoConfig(), seeds=(5,)).seeds == (5,)
    # Flexi settings are checked when the config is made, before any training.
    with pytest.raises(ValueError, match="multires_fraction must be in"):
        DemoConfig(flexi_multires_fraction=1.5)
    with pytest.raises(ValueError, match="flexi_score_patch_size must be one of"):
        DemoConfig.from_dict({"flexi_score_patch_size": -16})
    with pytest.raises(ValueError, match=r"learner.patch_size must be one of \[1, 2, 4, 8, 16, "
                                         r"32\] \(divisors of the image size 32\), got 5"):
        DemoConfig.from_dict({"learner": {"patch_size": 5}})
    assert DemoConfig.from_dict({"learner": {"patch_size": 4},
                                 "flexi_score_patch_size": 8}).learner.patch_size == 4
    with pytest.raises(ValueError, match="text_width must be a positive int"):
        DemoConfig.from_dict({"learner": {"text_width": 0}})
    # Found in review: these were a TypeError, or accepted and silently wrong.
    with pytest.raises(ValueError, match=r"unknown learner config fields \['stepz'\]"):
        DemoConfig.from_dict({"learner": {"stepz": 3}})
    with pytest.raises(ValueError, match="unknown reference config fields"):
        DemoConfig.from_dict({"reference": {"widht": 3}})
    with pytest.raises(ValueError, match="learner must be an object of fields"):
        DemoConfig.from_dict({"learner": [1, 2]})
    with pytest.raises(ValueError, match="seeds must not repeat"):
        DemoConfig(seeds=(0, 0))
    with pytest.raises(ValueError, match="methods must not repeat"):
        DemoConfig(methods=("uniform", "uniform"))
    with pytest.raises(ValueError, match="checkpoint_every must be 0"):
        DemoConfig.from_dict({"learner": {"checkpoint_every": 10}})


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "results"
    out.write_text("keep me")
    assert main(["demo", "--quick", "--out", str(out), "--overwrite", "--no-progress"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert out.read_text() == "keep me"


def test_finished_runs_are_kept_when_the_report_fails(tmp_path, monkeypatch):
    from jestkit import demo

    def broken(*args, **kwargs):
        raise KeyError("a report bug")

    monkeypatch.setattr(demo, "write_report", broken)
    cfg = dataclasses.replace(DemoConfig.quick(), methods=("uniform",))
    with pytest.raises(RuntimeError, match="finished runs are kept in") as info:
        demo.run_demo(cfg, tmp_path / "run", show_progress=False, workers=1)
    kept = Path(str(info.value).split("kept in ")[1].split(":")[0])
    assert kept.parent == tmp_path and kept.name.startswith("run.unreported-")
    assert not (tmp_path / "run").exists()
    monkeypatch.undo()
    assert main(["report", str(kept)]) == 0  # rebuilt from the kept runs
    report = json.loads((kept / "report.json").read_text())
    assert list(report["methods"]) == ["uniform"]


def test_every_demo_method_has_a_step_cost():
    # The scheduler orders runs by it; a method added without one would fail mid-demo.
    assert set(_STEP_COST) == {name for name, *_ in DEMO_METHODS}


def test_runs_without_a_reference_do_not_wait_for_it(tmp_path):
    """uniform and hard_learner runs start while the reference trains: they must not read
    the reference checkpoint, which does not exist yet."""
    missing = str(tmp_path / "not-yet.safetensors")
    for method in ("uniform", "hard_learner"):
        cfg = LearnerConfig(method=method, steps=2, batch_size=16, n_chunks=4, width=16,
                            text_width=8, eval_every=2)
        result = _run_one(0, missing, None, cfg)
        assert result["steps"] == [2]
    with pytest.raises(FileNotFoundError):
        _run_one(0, missing, None, dataclasses.replace(cfg, method="learnability"))
