"""`jestkit demo --quick` end to end, the run-directory guard, and the shipped configs."""

import dataclasses
import json
import shutil
import sys
from pathlib import Path

import pytest
from procs import _alive, _children, _cmdline

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
    md = (quick_run / "report.md").read_text()
    assert "Did uniform plateau?" in md and "How much the speed-up varies between seeds" in md
    assert "Fewer than 3 seeds" in md  # one seed: the report says its numbers mean little
    # Which code made these numbers: the same in the main process and every worker.
    version = json.loads((quick_run / "code_version.json").read_text())
    assert report["config"]["code_version"] == version
    assert report["config"]["run_code_versions"] == [version]


def documented_keys() -> dict[str, set[str]]:
    """docs/report_json.md: section heading -> the keys its table lists."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "report_json.md").read_text()
    sections: dict[str, set[str]] = {}
    heading = None
    for line in doc.splitlines():
        if line.startswith("## "):
            heading = line[3:].strip().strip("`")
            sections[heading] = set()
        elif heading and line.startswith("| `"):
            sections[heading].add(line.split("`")[1])
    return sections


def test_report_json_is_documented_key_by_key(quick_run):
    report = json.loads((quick_run / "report.json").read_text())
    doc = documented_keys()
    # rebuilt_by appears only in a report `jestkit report` rebuilt (tested below).
    assert doc.pop("Top level") - {"rebuilt_by"} == set(report)
    for heading, keys in doc.items():
        parts = heading.split(".")
        objects = [report]
        for part in parts:  # "<name>": every method's entry
            objects = [v for o in objects for v in (o.values() if part == "<name>" else
                                                    [o[part]])]
        for obj in objects:
            assert set(obj) == keys, heading


def test_report_is_rebuilt_from_the_saved_runs(quick_run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(quick_run, copy)
    before = json.loads((copy / "report.json").read_text())
    (copy / "report.md").write_text("stale")
    assert main(["report", str(copy)]) == 0
    rebuilt = (copy / "report.json").read_bytes()
    after = json.loads(rebuilt)
    # What rebuilt it is recorded: here the code that ran the demo.
    assert after.pop("rebuilt_by") == before["config"]["code_version"]
    assert after == before  # same runs, same code: the same report
    assert "Did uniform plateau?" in (copy / "report.md").read_text()
    # The reference cache's line only where a run used the cache (found in review: always).
    assert "Reference cache (one reference forward" in (copy / "report.md").read_text()
    only = ["uniform", "learnability-joint"]
    (copy / "report.json").write_text(json.dumps({**before, "methods": only}))
    assert main(["report", str(copy)]) == 0
    assert "Reference cache (one reference forward" not in (copy / "report.md").read_text()
    (copy / "report.json").write_bytes(rebuilt)
    assert main(["report", str(copy)]) == 0
    # Not a run directory, or a run's curves missing: a clear error, nothing rewritten.
    assert main(["report", str(tmp_path)]) == 2
    assert "neither report.json nor runs/info.json" in capsys.readouterr().err
    assert main(["report", str(tmp_path / "nowhere")]) == 2
    assert "nowhere does not exist" in capsys.readouterr().err
    # Damaged per-run curves: errors that name the file (found in review: a KeyError and
    # JSON errors that named no file).
    runs = copy / "runs" / "uniform.json"
    good = runs.read_text()
    nan_run = json.loads(good)
    nan_run[0]["zero_shot_accuracy"][1] = float("nan")  # json writes NaN, and reads it back
    files = {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()}
    for content, message in (("{}", "holds a JSON object, expected an array of runs"),
                             ("[]", "holds no runs"),
                             (good[:200], "is not valid JSON"),
                             ("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                             ('[{"steps": [1]}]', "run 0 lacks ['config', 'zero_shot_accuracy'"),
                             ("null", "holds a JSON null, expected an array of runs"),
                             (json.dumps(nan_run), "run 0's ['zero_shot_accuracy'] are not "
                                                   "lists of finite numbers"),
                             (json.dumps([{**json.loads(good)[0], "steps": [],
                                           **{k: [] for k in ("zero_shot_accuracy",
                                                              "i2t_recall", "t2i_recall",
                                                              "clean_fraction")}}]),
                              "are not lists of finite numbers, one per evaluated step"),
                             # Found in a second review: each was read, silently wrong, or a
                             # ZeroDivisionError.
                             ((copy / "runs" / "learnability-joint.json").read_text(),
                              "run 0 is not one of uniform's runs (its config: method "
                              "'learnability'"),
                             (json.dumps([json.loads(good)[0]] * 3), "seed 0 appears 3 times"),
                             (json.dumps([{**json.loads(good)[0], "zero_shot_accuracy": [
                                 100 * a for a in json.loads(good)[0]["zero_shot_accuracy"]]}]),
                              "zero_shot_accuracy must lie in [0, 1] (fractions, not "
                              "percentages"),
                             (json.dumps([{**json.loads(good)[0], "steps": [
                                 0, *json.loads(good)[0]["steps"][1:]]}]),
                              "steps must be increasing ints >= 1"),
                             (json.dumps([{**json.loads(good)[0], "cumulative_flops": [
                                 {k: 0 for k in f} for f in json.loads(good)[0][
                                     "cumulative_flops"]]}]), "above zero and never falling")):
        runs.write_text(content)
        assert main(["report", str(copy)]) == 2
        err = capsys.readouterr().err
        assert "uniform.json" in err and message in err, (content, err)
    # Well-formed files whose content the report cannot use: the run directory is named.
    runs.write_text(json.dumps([{**json.loads(good)[0], "config": {
        "method": "uniform", "selection": "joint", "score_patch_size": 0, "seed": 0}}]))
    assert main(["report", str(copy)]) == 2
    assert f"{copy}: the saved runs or report do not hold what `jestkit demo` writes " \
           f"(KeyError" in capsys.readouterr().err
    runs.unlink()
    assert main(["report", str(copy)]) == 2
    assert "uniform.json" in capsys.readouterr().err
    runs.write_text(good)
    # A report.json whose method list is not one (found in review: a TypeError traceback).
    for methods in (5, [5], "uniform"):
        (copy / "report.json").write_text(json.dumps({**after, "methods": methods}))
        assert main(["report", str(copy)]) == 2
        assert "methods must be the demo's method names" in capsys.readouterr().err
    for accuracy in ("a", None, 7.0):  # found in review: "Unknown format code 'f'"
        reference = {**after["reference"], "metrics": {"zero_shot_accuracy": accuracy}}
        (copy / "report.json").write_text(json.dumps({**after, "reference": reference}))
        assert main(["report", str(copy)]) == 2
        assert "reference.metrics.zero_shot_accuracy must be a number in [0, 1]" in (
            capsys.readouterr().err)
    for change, message in (({"config": [1]}, "config must be an object"),
                            ({"config": {**after["config"], "pool_clean_fraction": "x"}},
                             "config.pool_clean_fraction must be a number in [0, 1]"),
                            ({"reference": {**after["reference"], "flops": float("nan")}},
                             "reference.flops must be a finite number >= 0")):
        (copy / "report.json").write_text(json.dumps({**after, **change}))
        assert main(["report", str(copy)]) == 2
        assert message in capsys.readouterr().err, message
    (copy / "report.json").write_bytes(rebuilt)
    assert (copy / "report.json").read_bytes() == rebuilt
    # Nothing was rewritten by the failed rebuilds: not the plots either.
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == files
    # A directory where the report writes a file: refused before any file is rewritten
    # (found in review: the plots and report.json were, and report.md was not).
    (copy / "report.md").unlink()
    (copy / "report.md").mkdir()
    assert main(["report", str(copy)]) == 2
    assert "report.md is a directory, where the report writes a file" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in copy.iterdir() if p.is_file()} == {
        k: v for k, v in files.items() if k != "report.md"}


def test_summary_of_a_report_without_wall_time(quick_run, capsys):
    # Reports of older versions have no config.wall_time_s: `jestkit report` still prints.
    from jestkit.demo import print_summary

    report = json.loads((quick_run / "report.json").read_text())
    del report["config"]["wall_time_s"]
    print_summary(report)
    out = capsys.readouterr().out
    assert "over its last quarter" in out and "wall time" not in out
    # A baseline still improving is said to be one, with where the plateaued demo is.
    for plateaued in (False, True):
        report["plateau"].update(checkable=True, plateaued=plateaued)
        print_summary(report)
        out = capsys.readouterr().out
        hint = "give more steps (learner.steps)" in out
        assert hint is ("configs/demo-T14000-all-methods-random-boundary.json" in out)
        assert hint is not plateaued
    # Which way it moved is said as it is (found in review: a fall was "still improving").
    for moved, words in ((+2.5, "still improving"), (-1.5, "that fell over its last quarter")):
        report["plateau"].update(checkable=True, plateaued=False, moved_points=moved)
        print_summary(report)
        out = capsys.readouterr().out
        assert f"compare with a uniform baseline {words}" in out
        assert ("still improving" in out) is (moved > 0)


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
    with pytest.raises(ValueError, match=r"reference.patch_size must be one of \[1, 2, 4, 8, "
                                         r"16, 32\] \(divisors of the image size 32\), got 3"):
        DemoConfig.from_dict({"reference": {"patch_size": 3}})
    # What only the JEST or Flexi runs need is checked only when they are in `methods`, under
    # the field the user set.
    coarse = {"learner": {"patch_size": 16}, "flexi_score_patch_size": 8}
    with pytest.raises(ValueError, match=r"^flexi_score_patch_size must be at least "
                                         r"learner.patch_size=16 .*got 8$"):
        DemoConfig.from_dict(coarse)
    DemoConfig.from_dict({**coarse, "methods": ["uniform", "learnability-joint"]})
    big = {"learner": {"batch_size": 1000}}  # a JEST super-batch of 5000 > the pool's 3500
    with pytest.raises(ValueError, match="exceeds digits-web's pool size 3500"):
        DemoConfig.from_dict(big)
    assert DemoConfig.from_dict({**big, "methods": ["uniform"]}).learner.batch_size == 1000
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
    # Found in review: accepted, ignored, and saved in report.json as if used.
    for field, value, source in (("seed", 5, "seeds"), ("method", "hard_learner", "methods"),
                                 ("selection", "independent", "methods")):
        with pytest.raises(ValueError, match=f"learner.{field} is set per run from '{source}'"):
            DemoConfig.from_dict({"learner": {field: value}})
    assert DemoConfig.from_dict({"learner": {"seed": 0, "method": "learnability"}}) == DemoConfig()
    # In the learner block these would reach the live JEST runs too (and fail on uniform's).
    with pytest.raises(ValueError, match=r"^learner.score_patch_size must stay at its default "
                                         r"in the demo.*set flexi_score_patch_size"):
        DemoConfig.from_dict({"learner": {"score_patch_size": 16}})
    with pytest.raises(ValueError, match="learner.score_patch_size and learner.multires_fraction "
                                         "must stay at their defaults"):
        DemoConfig.from_dict({"learner": {"score_patch_size": 32, "multires_fraction": 0.5}})
    from jestkit.demo import run_demo

    with pytest.raises(ValueError, match=r"learner.eval_every=5 gives 2 evaluations in 10 "
                                         r"steps; .*mean of the last 3.*give learner.eval_every "
                                         r"at most 4, or 0"):
        run_demo(DemoConfig.from_dict({"learner": {"steps": 10, "eval_every": 5}}),
                 "/nonexistent/never-made")
    with pytest.raises(ValueError, match="learner.steps must be at least 3"):
        run_demo(DemoConfig.from_dict({"learner": {"steps": 2}}), "/nonexistent/never-made")
    with pytest.raises(ValueError, match="learner.multires_split='first_drawn_fine' applies "
                                         "only with multires_fraction > 0"):
        DemoConfig.from_dict({"learner": {"multires_split": "first_drawn_fine"}})
    with pytest.raises(ValueError, match="learner.score_patch_size and learner.multires_fraction "
                                         "and learner.multires_split must stay"):
        DemoConfig.from_dict({"learner": {"score_patch_size": 32, "multires_fraction": 0.5,
                                          "multires_split": "first_drawn_fine"}})
    with pytest.raises(ValueError, match=r"flexi_multires_split must be one of \['random', "
                                         r"'first_drawn_fine'\], got 'fine_first'"):
        DemoConfig.from_dict({"flexi_multires_split": "fine_first"})
    with pytest.raises(ValueError, match=r"^learner.score_view must stay at its default in the "
                                         r"demo.*and flexi_score_view for that one"):
        DemoConfig.from_dict({"learner": {"score_view": "stored"}})
    with pytest.raises(ValueError, match=r"flexi_score_view must be one of \['augmented', "
                                         r"'stored'\], got 'shifted'"):
        DemoConfig.from_dict({"flexi_score_view": "shifted"})


def test_cache_views_is_checked_and_read_from_json():
    with pytest.raises(ValueError, match=r"cache_views must be one of \['stored', 'shifts'\], "
                                         r"got 'all'"):
        DemoConfig.from_dict({"cache_views": "all"})
    assert DemoConfig.from_dict({"cache_views": "shifts"}).cache_views == "shifts"
    assert DemoConfig().cache_views == "stored"
    with pytest.raises(ValueError, match=r"cache_views='shifts' applies only to the methods "
                                         r"that read the reference cache"):
        DemoConfig.from_dict({"cache_views": "shifts",
                              "methods": ["uniform", "learnability-joint"]})


def test_flexi_score_view_reaches_the_flexi_runs_only():
    from jestkit.demo import learner_configs

    cfg = dataclasses.replace(DemoConfig.quick(), flexi_score_view="stored")
    views = {name: lc.score_view for name, _, lc in learner_configs(cfg)}
    assert views.pop("learnability-joint-flexi") == "stored"
    assert set(views.values()) == {"augmented"} and "learnability-joint" in views


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys):
    out = tmp_path / "results"
    out.write_text("keep me")
    assert main(["demo", "--quick", "--out", str(out), "--overwrite", "--no-progress"]) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert out.read_text() == "keep me"
    assert main(["demo", "--quick", "--out", str(out / "run"), "--no-progress"]) == 2
    assert f"--out {out / 'run'} cannot be made: {out} is a file" in capsys.readouterr().err
    assert out.read_text() == "keep me"


@pytest.mark.parametrize("block", ["learner", "reference"])
def test_a_model_too_large_for_this_machine_is_refused_before_any_work(block, tmp_path,
                                                                       capsys, monkeypatch):
    # A width that cannot fit failed in a worker, in torch's allocator, after the reference
    # (minutes, at real sizes) had trained. Now before anything is made or trained.
    from jestkit import demo

    def must_not_run(*args, **kwargs):
        raise AssertionError("the demo started training before checking the model sizes")
    monkeypatch.setattr(demo, "train_reference", must_not_run)
    config = tmp_path / "big.json"
    config.write_text(json.dumps({block: {"width": 2**20}}))
    out = tmp_path / "out"
    assert main(["demo", "--config", str(config), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert f"demo config: {block}.width={2**20}, {block}.depth=1" in err
    assert "more than this machine's" in err
    assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_a_users_folder_named_like_an_interrupted_demo_is_never_touched(tmp_path, capsys,
                                                                        monkeypatch):
    # Found in review: results.partial (a user's, no demo's) was taken for an interrupted
    # demo of --out results; "--resume", as the error advised, then deleted it with its
    # files when the run failed before anything finished.
    from jestkit import demo

    work = tmp_path / "results.partial"
    work.mkdir()
    (work / "thesis.tex").write_text("keep me")

    def fails_early(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_train_and_report", fails_early)
    for resume in ([], ["--resume"]):
        assert main(["demo", "--quick", "--out", str(tmp_path / "results"), "--no-progress",
                     *resume]) == 2
        err = capsys.readouterr().err
        assert "holds files no demo writes (thesis.tex)" in err and "move it away" in err
        assert sorted(p.name for p in work.iterdir()) == ["thesis.tex"]  # no lock file either
        assert (work / "thesis.tex").read_text() == "keep me"


def test_overwrite_replaces_only_a_run_directory(tmp_path, capsys, monkeypatch):
    # Found in review: --overwrite with a mistyped --out deleted any directory it named.
    data = tmp_path / "thesis"
    data.mkdir()
    (data / "thesis.tex").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(data), "--overwrite", "--no-progress"]) == 2
    assert "is not a demo run directory" in capsys.readouterr().err
    assert (data / "thesis.tex").read_text() == "keep me"
    assert not (tmp_path / "thesis.partial").exists()
    # ".", "..", "/" and "" (an unset shell variable) name no run directory of their own.
    monkeypatch.chdir(data)
    for out in ("", ".", "..", "/", "sub/.."):
        assert main(["demo", "--quick", "--out", out, "--overwrite", "--no-progress"]) == 2
        assert "--out must name the run directory" in capsys.readouterr().err, out
    assert sorted(p.name for p in data.iterdir()) == ["thesis.tex"]


def test_overwrite_needs_a_demos_own_run_directory(quick_run, tmp_path, capsys):
    # Found in review: any file named report.json passed as a demo's mark, and --overwrite
    # deleted the directory around it.
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "report.json").write_text('{"coverage": 81}')
    (project / "thesis.tex").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(project), "--overwrite", "--no-progress"]) == 2
    assert "no demo's report.json or demo_config.json" in capsys.readouterr().err
    # A demo's run directory that someone has added their own files to is not replaced.
    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    (run / "notes.txt").write_text("keep me")
    assert main(["demo", "--quick", "--out", str(run), "--overwrite", "--no-progress"]) == 2
    assert "also holds what a demo never writes: notes.txt" in capsys.readouterr().err
    assert (run / "notes.txt").read_text() == "keep me"
    assert (project / "thesis.tex").read_text() == "keep me"
    # What a killed write leaves, and macOS's .DS_Store, are no one's data (found in review:
    # they made a run directory foreign).
    from jestkit.demo import _is_demo_run_dir

    (run / "notes.txt").unlink()
    (run / ".report.md.k3j_2x.tmp").write_text("half a report")
    (run / ".DS_Store").write_bytes(b"\0")
    assert _is_demo_run_dir(run) == (True, "")
    # So are the finished runs a crash right after the move into place leaves.
    (run / "runs" / "finished").mkdir()
    (run / "runs" / "finished" / "uniform.seed0.json").write_text("{}")
    assert _is_demo_run_dir(run) == (True, "")
    # Found in review: only top-level names were checked, and any *.png passed, so a user's
    # plot, and files in runs/ or reference_cache/, were deleted by --overwrite.
    for mine in ("figure_final.png", "runs/notes/results.csv", "runs/finished/table.json",
                 "runs/uniform.seedX.json", "reference_cache/thesis.tex"):
        path = run / mine
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("keep me")
        is_run, why = _is_demo_run_dir(run)
        named = "runs/notes" if "notes" in mine else mine  # a folder is named, not its files
        assert not is_run and why.endswith(f"what a demo never writes: {named}"), why
        assert main(["demo", "--quick", "--out", str(run), "--overwrite", "--no-progress"]) == 2
        assert "also holds what a demo never writes" in capsys.readouterr().err
        assert path.read_text() == "keep me"
        path.unlink()
        if path.parent.name == "notes":
            path.parent.rmdir()
    assert _is_demo_run_dir(run) == (True, "")
    # A marker must be a demo's in full: one demo key in someone's JSON does not make it one
    # (found in review: any() in place of all() passed).
    for content in ('{"config": {}, "tests": 3}', '{"methods": ["a"]}',
                    '{"config": {}, "methods": {}}'):
        other = tmp_path / "other"
        other.mkdir(exist_ok=True)
        (other / "report.json").write_text(content)
        (other / "demo_config.json").write_text('{"learner": {}, "reference": {}}')
        assert _is_demo_run_dir(other)[0] is False
    # With --resume as well, a directory that is not a run's is named as such at once.
    assert main(["demo", "--quick", "--out", str(project), "--resume", "--no-progress"]) == 2
    assert "is not a demo run directory" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "project", "run"]


def test_out_that_is_a_symlink_or_a_work_directory_is_refused_up_front(quick_run, tmp_path,
                                                                       capsys):
    # Found in review: a symlinked --out failed only when moved into place, after training.
    link = tmp_path / "link"
    link.symlink_to(quick_run, target_is_directory=True)
    assert main(["demo", "--quick", "--out", str(link), "--overwrite", "--no-progress"]) == 2
    assert f"--out {link} is a symbolic link; give the directory itself" in (
        capsys.readouterr().err)
    # The work directory an interrupted demo names is continued through its final --out.
    work = tmp_path / "run.partial"
    work.mkdir()
    assert main(["demo", "--quick", "--out", str(work), "--resume", "--no-progress"]) == 2
    assert f"pass --out {tmp_path / 'run'} --resume" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "run.partial"]


def test_resume_of_a_finished_demo_says_there_is_nothing_to_do(quick_run, capsys):
    before = (quick_run / "report.json").read_bytes()
    assert main(["demo", "--quick", "--out", str(quick_run), "--resume", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished demo and there is no interrupted one" in err
    assert f"`jestkit report {quick_run}` rewrites its report" in err
    assert (quick_run / "report.json").read_bytes() == before


def test_a_diverging_run_is_named_by_method_and_seed(tmp_path, capsys):
    config = tmp_path / "diverges.json"
    config.write_text(json.dumps({"seeds": [0], "methods": ["uniform"],
                                  "learner": {"steps": 20, "warmup_steps": 2, "lr": 1e6},
                                  "reference": {"steps": 5, "warmup_steps": 1}}))
    out = tmp_path / "out"
    assert main(["demo", "--config", str(config), "--out", str(out), "--no-progress",
                 "--workers", "1"]) == 2
    assert ("learner run uniform seed 0: learner training diverged at step"
            in capsys.readouterr().err)
    assert not out.exists()


@pytest.mark.parametrize("failure", [KeyError("a report bug"), SystemExit(143)])
def test_finished_runs_are_kept_when_the_report_fails(tmp_path, monkeypatch, capsys, failure):
    # A bug in the report, or SIGTERM / Ctrl-C while it is written (SystemExit from the
    # command's handler): the error stays what it was, every run is kept, and both
    # `jestkit report` and --resume (which trains nothing) write the report from them.
    from jestkit import demo

    def broken(*args, **kwargs):
        raise failure

    monkeypatch.setattr(demo, "write_report", broken)
    cfg = dataclasses.replace(DemoConfig.quick(), methods=("uniform",))
    out = tmp_path / "run"
    with pytest.raises(type(failure)) as info:
        demo.run_demo(cfg, out, show_progress=False, workers=1)
    assert info.value is failure
    kept = demo.partial_dir(out)
    assert "while writing the report; all 1 learner runs are kept in " + str(kept) in (
        capsys.readouterr().err)
    assert not out.exists()
    monkeypatch.undo()
    assert main(["report", str(kept)]) == 0  # rebuilt from the kept runs, in place
    assert list(json.loads((kept / "report.json").read_text())["methods"]) == ["uniform"]
    report = demo.run_demo(cfg, out, resume=True, show_progress=False, workers=1)
    assert report["config"]["resumed_runs"] == 1 and list(report["methods"]) == ["uniform"]
    assert (out / "report.md").is_file() and not kept.exists()


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


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_sigterm_stops_the_workers_and_leaves_no_run_directory(tmp_path):
    # A demo whose learner runs would take hours: SIGTERM (kill, a scheduler's time limit)
    # must end it now, with its worker processes, and leave no --out behind; of its work
    # directory at most the trained reference, for --resume (no learner run finished).
    import os
    import signal
    import subprocess
    import sys
    import time

    cfg = dataclasses.asdict(DemoConfig.quick())
    cfg["learner"]["steps"] = 10**6
    cfg["methods"] = ["uniform", "hard_learner-joint"]  # start while the reference trains
    config = tmp_path / "long.json"
    config.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "jestkit.cli", "demo", "--config",
                             str(config), "--out", str(out), "--no-progress", "--workers", "2"],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        workers = []
        while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.5)
            workers = [pid for pid in _children(proc.pid) if b"spawn_main" in _cmdline(pid)]
        assert len(workers) == 2, proc.stderr.read().decode() if proc.poll() is not None else ""
        time.sleep(2)  # let them start training
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
        deadline = time.time() + 20
        while any(_alive(pid) for pid in workers) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(_alive(pid) for pid in workers)
        assert not out.exists()
        left = sorted(p.name for p in tmp_path.iterdir())
        assert left in (["long.json"], ["long.json", "run.partial"])
        if left[-1] == "run.partial":
            work = tmp_path / "run.partial"
            assert (work / "reference.json").is_file()
            assert not list((work / "runs" / "finished").iterdir())
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


# What a worker does on SIGTERM, as code run before its task: the default (exit); ignore it,
# as a worker stuck in code that blocks it would; or close its files (the pool's sentinel among
# them) and live on, so that it looks exited to anything that reads the sentinel.
ON_SIGTERM = {
    "exit": "",
    "ignore": "signal.signal(signal.SIGTERM, signal.SIG_IGN); ",
    "close_files": "signal.signal(signal.SIGTERM, lambda *_: os.closerange(3, 65536)); ",
}


def _pool_running(tmp_path, on_sigterm: tuple[str, str]):
    """A spawn pool of 2 workers, each running a task that marks it has started (a builtin,
    so it pickles under spawn) and then sleeps far longer than a test may take; the i-th
    handles SIGTERM as ON_SIGTERM[on_sigterm[i]] says. Returns (pool, its worker processes,
    a queued task), once both tasks run."""
    import multiprocessing
    import time
    from concurrent.futures import ProcessPoolExecutor

    pool = ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"))
    markers = [tmp_path / f"started-{i}" for i in range(2)]
    for marker, behaviour in zip(markers, on_sigterm, strict=True):
        pool.submit(exec, f"import os, pathlib, signal, time; {ON_SIGTERM[behaviour]}"
                          f"pathlib.Path({str(marker)!r}).write_text(str(os.getpid())); "
                          "time.sleep(600)")
    queued = pool.submit(time.sleep, 600)
    deadline = time.time() + 120
    while not all(m.exists() and m.read_text() for m in markers) and time.time() < deadline:
        time.sleep(0.1)
    assert all(m.exists() and m.read_text() for m in markers)
    # In task order: which worker takes which task is the pool's choice.
    processes = [pool._processes[int(m.read_text())] for m in markers]
    assert len(processes) == 2 and all(_alive(p.pid) for p in processes)
    return pool, processes, queued


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_stop_workers_ends_running_tasks_now(tmp_path):
    import signal
    import time
    from concurrent.futures import CancelledError

    from jestkit.demo import stop_workers

    pool, processes, queued = _pool_running(tmp_path, ("exit", "exit"))
    try:
        started = time.monotonic()
        stop_workers(pool)
        # SIGTERM ended them: not the 600 s sleeps, nor SIGKILL after the 10 s deadline. And
        # ended means gone from the process table when it returns, not just closing down.
        assert time.monotonic() - started < 5
        assert not any(_alive(p.pid) for p in processes)
        assert [p.exitcode for p in processes] == [-signal.SIGTERM] * 2  # not SIGKILL
        # Queued: cancelled, or (if already handed to the pool's call queue) failed once the
        # pool's manager thread sees its workers gone; never run.
        try:
            assert queued.exception(timeout=30) is not None
        except CancelledError:
            pass
    finally:
        stop_workers(pool)  # a no-op once stopped; ends the sleeps if an assert failed


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_stop_workers_kills_workers_that_outlive_sigterm_within_one_deadline(tmp_path):
    import os
    import signal
    import time
    from multiprocessing.connection import wait

    from jestkit.demo import stop_workers

    # One ignores SIGTERM; the other closes its files on it (its sentinel with them) and lives
    # on: still running, though a wait on sentinels would call it exited and spare it.
    pool, processes, _ = _pool_running(tmp_path, ("ignore", "close_files"))
    try:
        # The case this test is for: its sentinel says exited, yet it runs.
        os.kill(processes[1].pid, signal.SIGTERM)
        assert wait([processes[1].sentinel], timeout=10) and _alive(processes[1].pid)
        started = time.monotonic()
        stop_workers(pool)
        # One shared 10 s deadline for SIGTERM, then SIGKILL: not 10 s per worker.
        assert time.monotonic() - started < 15
        assert not any(_alive(p.pid) for p in processes)
        assert [p.exitcode for p in processes] == [-signal.SIGKILL] * 2  # outlived SIGTERM
    finally:
        stop_workers(pool)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_workers_end_when_their_parent_is_killed_with_sigkill(tmp_path):
    # Found in review: a demo's main process killed with SIGKILL (alone, not its process
    # group) left both workers running forever, waiting for their next run.
    import os
    import signal
    import subprocess
    import sys
    import time

    workers: list[int] = []
    # Each worker runs a task that marks that it started, then blocks (so the second task
    # goes to the other worker): both marks mean both workers are past their initializer,
    # which starts the watch. (Killed earlier, under heavy load, a worker still importing
    # torch ends only once the import is done: seen on a 16-process test run.)
    marks = [tmp_path / f"running{i}" for i in range(2)]
    parent = subprocess.Popen([sys.executable, "-c", (
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).parent)!r})\n"
        "from procs import touch_then_sleep\n"
        "from jestkit.demo import worker_pool\n"
        "pool = worker_pool(2)\n"
        f"futures = [pool.submit(touch_then_sleep, m, 600) for m in {list(map(str, marks))!r}]\n"
        "time.sleep(600)\n")])
    try:
        deadline = time.time() + 300
        while not all(m.exists() for m in marks) and time.time() < deadline:
            time.sleep(0.1)
        workers = [p for p in _children(parent.pid) if b"spawn_main" in _cmdline(p)]
        assert len(workers) == 2 and all(m.exists() for m in marks), workers
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 20
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not any(_alive(p) for p in workers), workers  # gone within a few polls
    finally:  # whatever failed: no sleeping worker outlives the test
        parent.kill()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


# --- resuming an interrupted demo ---------------------------------------------------------------

# Three methods, one seed, 40 steps: a run that needs no reference, a live one and a cached one.
RESUME_CFG = dataclasses.replace(
    DemoConfig.quick(), methods=("uniform", "learnability-joint", "learnability-joint-cached"))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """RESUME_CFG run without interruption: what every resumed run must reproduce."""
    from jestkit.demo import run_demo

    report = run_demo(RESUME_CFG, tmp_path_factory.mktemp("straight") / "run",
                      show_progress=False)
    assert report["config"]["resumed_runs"] == 0
    return report


def test_a_demo_with_a_shifted_view_cache_runs_cached_as_live(tmp_path, straight):
    # cache_views="shifts": the cached run's reference embeddings are the live reference's of
    # every shifted view the sampler drew, so its curves are the live run's; the caching costs
    # more (the 25 views' image forwards) and the stored-view demo's cached run differs.
    from jestkit.demo import run_demo

    cfg = dataclasses.replace(RESUME_CFG, cache_views="shifts")
    report = run_demo(cfg, tmp_path / "run", show_progress=False)
    live = report["methods"]["learnability-joint"]
    cached = report["methods"]["learnability-joint-cached"]
    for key in ("zero_shot_accuracy", "clean_fraction"):
        assert cached["curves"][key] == pytest.approx(live["curves"][key], abs=1e-6), key
    assert cached["flops_at_end"]["reference_scoring"] == 0
    assert live == straight["methods"]["learnability-joint"]  # the view changes no live run
    stored = straight["methods"]["learnability-joint-cached"]["curves"]["clean_fraction"]
    assert stored != pytest.approx(cached["curves"]["clean_fraction"], abs=1e-6)
    ratio = report["reference"]["caching_flops"] / straight["reference"]["caching_flops"]
    assert 5 < ratio < 25  # 25 image forwards per example, one text forward
    assert report["config"]["cache_views"] == "shifts"


def _same_results(a: dict, b: dict) -> None:
    """The same runs and reference; only wall time and `resumed_runs` may differ."""
    assert a["methods"] == b["methods"]
    assert a["reference"] == b["reference"]  # caching FLOPs included
    assert a["reference_accuracy"] == b["reference_accuracy"]


def _interrupt_after_first_finished_run(monkeypatch):
    """Make the demo's first save of a finished learner run its last act: Ctrl-C right after."""
    from jestkit import demo

    real = demo.atomic_write

    def write_then_interrupt(path, data):
        real(path, data)
        if Path(path).parent.name == "finished":
            raise KeyboardInterrupt

    monkeypatch.setattr(demo, "atomic_write", write_then_interrupt)


def test_an_interrupted_demo_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, capsys,
                                                                 straight):
    import fcntl
    import os

    from jestkit import demo

    out = tmp_path / "run"
    work = demo.partial_dir(out)
    _interrupt_after_first_finished_run(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(RESUME_CFG, out, show_progress=False)
    monkeypatch.undo()
    assert "rerun the same command with --resume" in capsys.readouterr().err
    assert not out.exists()
    finished = sorted((work / "runs" / "finished").glob("*.json"))
    assert finished and (work / "reference.json").is_file()
    saved = {p: p.read_bytes() for p in finished}

    # A plain rerun refuses to throw the finished run away; another config is refused, and
    # so is a saved run of another config.
    with pytest.raises(FileExistsError, match="pass --resume"):
        demo.run_demo(RESUME_CFG, out, show_progress=False)
    other = dataclasses.replace(RESUME_CFG, learner=dataclasses.replace(RESUME_CFG.learner,
                                                                        steps=50))
    with pytest.raises(ValueError, match=r"learner.steps: 40 then, 50 now"):
        demo.run_demo(other, out, resume=True, show_progress=False)
    changed = json.loads(saved[finished[0]])
    changed["config"]["lr"] *= 2
    finished[0].write_text(json.dumps(changed))
    with pytest.raises(ValueError, match="is not a run of this demo's config; delete that"):
        demo.run_demo(RESUME_CFG, out, resume=True, show_progress=False)
    finished[0].write_bytes(saved[finished[0]])
    # What other code made is refused too (jestkit's source, torch or Python), the demo's
    # own record or any saved run's, and so is what did not record its version.
    this = demo.code_version()
    monkeypatch.setattr(demo, "code_version", lambda: {**this, "source_sha256": "f" * 64})
    with pytest.raises(ValueError, match=rf"\(the demo and {len(finished)} more\) was made by "
                                         rf"jestkit {this['jestkit']} \(source "
                                         rf"{this['source_sha256'][:12]}, .*\), this is "
                                         r"jestkit .* \(source ffffffffffff, .*--allow-other"):
        demo.run_demo(RESUME_CFG, out, resume=True, show_progress=False)
    monkeypatch.undo()
    changed = json.loads(saved[finished[0]])
    changed["code_version"]["torch"] = "0.0"
    finished[0].write_text(json.dumps(changed))
    with pytest.raises(ValueError, match=rf"\(run {finished[0].stem}\) was made by .*torch "
                                         r"0\.0, "):
        demo.run_demo(RESUME_CFG, out, resume=True, show_progress=False)
    finished[0].write_bytes(saved[finished[0]])
    version = (work / "code_version.json").read_bytes()
    for unrecorded in (None, "{", "[1]"):  # deleted, torn, not a version: an error, no traceback
        (work / "code_version.json").unlink(missing_ok=True)
        if unrecorded is not None:
            (work / "code_version.json").write_text(unrecorded)
        with pytest.raises(ValueError, match=r"\(the demo\) was made by a jestkit that did "
                                             r"not record its version"):
            demo.run_demo(RESUME_CFG, out, resume=True, show_progress=False)
    (work / "code_version.json").write_bytes(version)
    # Damaged files of the work directory: errors that name them (found in review: JSON
    # errors naming no file, an AttributeError, a KeyError).
    for path, content, message in (
            (finished[0], saved[finished[0]][:100], "is not valid JSON.*delete it to train"),
            (finished[0], b"[1, 2]", "holds a JSON array, expected an object; delete it"),
            (work / "demo_config.json", b"[]", "demo_config.json holds a JSON array"),
            (work / "reference.json", b"{", "reference.json is not valid JSON.*delete .*"
                                            "reference.json to train the reference again")):
        good = path.read_bytes()
        path.write_bytes(content)
        for resume in (True, False):  # the plain rerun counts the finished runs first
            if resume or path == finished[0]:
                with pytest.raises(ValueError, match=message):
                    demo.run_demo(RESUME_CFG, out, resume=resume, show_progress=False)
        path.write_bytes(good)
    reference_info = (work / "reference.json").read_bytes()
    (work / "reference.json").write_text("{}")  # no fingerprint: not this reference
    with pytest.raises(ValueError, match="is not the reference this demo trained"):
        demo.run_demo(RESUME_CFG, out, resume=True, show_progress=False)
    (work / "reference.json").write_bytes(reference_info)

    # Another demo working in the same directory at the same time is refused.
    fd = os.open(work / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        with pytest.raises(FileExistsError, match="another `jestkit demo` is working"):
            demo.run_demo(RESUME_CFG, out, resume=True, show_progress=False)
    finally:
        os.close(fd)
    assert {p: p.read_bytes() for p in finished} == saved  # none of that touched them

    resumed = demo.run_demo(RESUME_CFG, out, resume=True, show_progress=False)
    assert resumed["config"]["resumed_runs"] == len(finished)
    _same_results(resumed, straight)  # deterministic runs: reusing some changes nothing
    assert not work.exists()
    assert not (out / "runs" / "finished").exists() and not (out / ".lock").exists()
    assert json.loads((out / "report.json").read_text())["methods"] == straight["methods"]


def test_resume_reuses_the_finished_runs_instead_of_training_them_again(tmp_path, monkeypatch,
                                                                       capsys):
    from jestkit import demo

    out = tmp_path / "run"
    _interrupt_after_first_finished_run(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(RESUME_CFG, out, show_progress=False, workers=1)
    monkeypatch.undo()
    path = sorted((demo.partial_dir(out) / "runs" / "finished").glob("*.json"))[0]
    # Mark the saved run: a retrained one could not carry this value into the report.
    saved = json.loads(path.read_text())
    saved["zero_shot_accuracy"][-1] = 0.123456
    path.write_text(json.dumps(saved))
    # And the reference's info: a retrained reference would report its measured FLOPs.
    info_path = demo.partial_dir(out) / "reference.json"
    info = json.loads(info_path.read_text())
    info["flops"] = 123456
    info_path.write_text(json.dumps(info))
    # Listing the methods in another order is the same demo: its report follows the new order.
    # And --allow-other-code continues what other code started (here this process claims
    # another version; the workers report their own), saying so and recording both.
    this = demo.code_version()
    other = {**this, "source_sha256": "0" * 64}
    monkeypatch.setattr(demo, "code_version", lambda: dict(other))
    reordered = dataclasses.replace(RESUME_CFG, methods=RESUME_CFG.methods[::-1])
    report = demo.run_demo(reordered, out, resume=True, allow_other_code=True,
                           show_progress=False, workers=1)
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert "warning: --allow-other-code: the interrupted demo" in err
    assert "runs were made by 1 versions of the code" in err
    assert report["config"]["code_version"] == other
    assert report["config"]["run_code_versions"] == [this]
    assert list(report["methods"]) == list(reordered.methods)
    name = path.stem.rsplit(".seed", 1)[0]
    assert report["methods"][name]["curves"]["zero_shot_accuracy"][-1] == 0.123456
    assert report["reference"]["flops"] == 123456
    assert "fingerprint" not in report["reference"]


class _RecordingPool:
    """Stands in for ProcessPoolExecutor in the demo and records every submitted run."""

    futures: list = []

    def __init__(self, *args, **kwargs):
        from concurrent.futures import ProcessPoolExecutor

        self._pool = ProcessPoolExecutor(*args, **kwargs)
        self._processes = self._pool._processes  # what stop_workers reads
        _RecordingPool.futures = []

    def submit(self, *args, **kwargs):
        fut = self._pool.submit(*args, **kwargs)
        _RecordingPool.futures.append(fut)
        self._processes = self._pool._processes
        return fut

    def shutdown(self, *args, **kwargs):
        return self._pool.shutdown(*args, **kwargs)


def test_runs_finished_while_the_reference_trains_are_kept_on_an_interrupt(
        tmp_path, monkeypatch, straight):
    # uniform starts while the reference trains; it may finish before the demo collects
    # results. Ctrl-C then must keep it too, not only the runs collected so far.
    from concurrent.futures import wait

    from jestkit import demo

    real = demo._prepare_reference

    def reference_then_interrupt(*args, **kwargs):
        real(*args, **kwargs)
        wait(_RecordingPool.futures)  # the early runs, done but not collected
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "ProcessPoolExecutor", _RecordingPool)
    monkeypatch.setattr(demo, "_prepare_reference", reference_then_interrupt)
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        demo.run_demo(RESUME_CFG, out, show_progress=False)
    monkeypatch.undo()
    finished = demo.partial_dir(out) / "runs" / "finished"
    assert [p.name for p in finished.iterdir()] == ["uniform.seed0.json"]
    resumed = demo.run_demo(RESUME_CFG, out, resume=True, show_progress=False)
    assert resumed["config"]["resumed_runs"] == 1
    _same_results(resumed, straight)


def test_a_crash_after_every_run_finished_loses_none_of_them(tmp_path, monkeypatch, straight):
    # The last step, putting the run directory in place, fails: every run stays in
    # OUT.partial, and --resume only writes the report.
    from jestkit import demo

    def broken(new, final):
        raise OSError("disk full")

    monkeypatch.setattr(demo, "move_into_place", broken)
    out = tmp_path / "run"
    with pytest.raises(OSError, match="disk full"):
        demo.run_demo(RESUME_CFG, out, show_progress=False)
    monkeypatch.undo()
    assert len(list((demo.partial_dir(out) / "runs" / "finished").iterdir())) == 3
    resumed = demo.run_demo(RESUME_CFG, out, resume=True, show_progress=False)
    assert resumed["config"]["resumed_runs"] == 3
    _same_results(resumed, straight)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_a_demo_killed_with_sigkill_resumes_from_the_command_line(tmp_path, straight):
    # No cleanup at all: the kernel ends the demo and its workers mid-run.
    import os
    import signal
    import subprocess
    import sys
    import time

    config = tmp_path / "resume.json"
    config.write_text(json.dumps(dataclasses.asdict(RESUME_CFG)))
    out = tmp_path / "run"
    finished = tmp_path / "run.partial" / "runs" / "finished"
    proc = subprocess.Popen([sys.executable, "-m", "jestkit.cli", "demo", "--config",
                             str(config), "--out", str(out), "--no-progress"],
                            start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 300
        while (not (finished.is_dir() and any(finished.glob("*.json")))
               and time.time() < deadline and proc.poll() is None):
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()
    assert main(["demo", "--config", str(config), "--out", str(out), "--no-progress"]) == 2
    assert main(["demo", "--config", str(config), "--out", str(out), "--no-progress",
                 "--resume"]) == 0
    resumed = json.loads((out / "report.json").read_text())
    assert resumed["config"]["resumed_runs"] >= 1
    _same_results(resumed, straight)


def test_only_the_order_of_methods_and_seeds_may_change_on_resume():
    from jestkit.demo import _config_differences, _order_free

    saved = {"methods": ["uniform", "learnability-joint"], "seeds": [0, 1, 2],
             "learner": {"steps": 40}}
    assert not _config_differences(_order_free(saved), _order_free(
        {"methods": ["learnability-joint", "uniform"], "seeds": [2, 0, 1],
         "learner": {"steps": 40}}))
    assert _config_differences(_order_free(saved), _order_free(
        {**saved, "seeds": [0, 1]})) == ["seeds: [0, 1, 2] then, [0, 1] now"]


def _partial_demo_as_saved_before(work: Path, cfg: DemoConfig, keys: dict[str, str]) -> None:
    """An interrupted demo of `cfg` in `work`, its demo_config.json and finished runs written
    as code before later options did: without the learner field `key` (in the learner block
    and in every run's config) and the demo field `keys[key]`, for each key of `keys`."""
    from dataclasses import asdict

    from jestkit import demo
    from jestkit.provenance import code_version

    def without(config: dict, drop) -> dict:
        return {k: v for k, v in json.loads(json.dumps(config)).items() if k not in drop}

    (work / "runs" / "finished").mkdir(parents=True)
    saved = without(asdict(cfg), keys.values())
    saved["learner"] = without(saved["learner"], keys)
    (work / "demo_config.json").write_text(json.dumps(saved))
    (work / "code_version.json").write_text(json.dumps(code_version()))
    for name, _, lc in demo.learner_configs(cfg):
        run = {"config": without(asdict(lc), keys), "code_version": code_version()}
        (work / "runs" / "finished" / f"{name}.seed{lc.seed}.json").write_text(json.dumps(run))


@pytest.mark.parametrize("fraction", [0.5, 0.0])
def test_an_interrupted_demo_from_before_the_split_option_resumes(tmp_path, fraction):
    # Found in review: its demo_config.json and finished runs lack the multires_split keys,
    # and every such demo was refused as "another config". They resume by the rule old
    # checkpoints follow: selected multi-resolution runs split first_drawn_fine, the rest
    # never used the split. (Such a demo predates score_view as well.)
    from jestkit import demo

    split = "first_drawn_fine" if fraction else "random"
    cfg = dataclasses.replace(DemoConfig.quick(), methods=("uniform", "learnability-joint-flexi"),
                              flexi_multires_fraction=fraction, flexi_multires_split=split)
    work = tmp_path / "run.partial"
    _partial_demo_as_saved_before(work, cfg, {"multires_split": "flexi_multires_split",
                                              "score_view": "flexi_score_view"})
    assert len(demo._check_resumable(work, cfg)) == 2
    if fraction:  # the split mattered: today's default is another config
        with pytest.raises(ValueError, match="flexi_multires_split: 'first_drawn_fine' then, "
                                             "'random' now"):
            demo._check_resumable(work, dataclasses.replace(cfg, flexi_multires_split="random"))


def test_an_interrupted_demo_from_before_the_score_view_option_resumes_as_it_scored(tmp_path):
    # Before score_view every model scored the augmented view: such a demo continues as
    # "augmented", and is another config than a stored-view one (refused, by name).
    from jestkit import demo

    cfg = dataclasses.replace(DemoConfig.quick(), methods=("uniform", "learnability-joint",
                                                           "learnability-joint-flexi"))
    work = tmp_path / "run.partial"
    _partial_demo_as_saved_before(work, cfg, {"score_view": "flexi_score_view"})
    done = demo._check_resumable(work, cfg)
    assert len(done) == 3
    assert {r["config"]["score_view"] for r in done.values()} == {"augmented"}
    with pytest.raises(ValueError, match="flexi_score_view: 'augmented' then, 'stored' now"):
        demo._check_resumable(work, dataclasses.replace(cfg, flexi_score_view="stored"))


def test_an_interrupted_demo_from_before_the_cache_views_option_resumes(tmp_path):
    # Found in review: its demo_config.json lacks cache_views and was refused as "another
    # config". Every cache then held the stored images: it resumes as "stored", and is
    # another config than a shifted-view one.
    from jestkit import demo

    work = tmp_path / "run.partial"
    _partial_demo_as_saved_before(work, RESUME_CFG, {"cache_views": "cache_views"})
    assert "cache_views" not in json.loads((work / "demo_config.json").read_text())
    assert len(demo._check_resumable(work, RESUME_CFG)) == 3
    with pytest.raises(ValueError, match="cache_views: 'stored' then, 'shifts' now"):
        demo._check_resumable(work, dataclasses.replace(RESUME_CFG, cache_views="shifts"))


def test_resume_with_nothing_to_resume_starts_afresh(tmp_path, capsys):
    from jestkit import demo

    cfg = dataclasses.replace(DemoConfig.quick(), methods=("uniform",))
    report = demo.run_demo(cfg, tmp_path / "run", resume=True, show_progress=False, workers=1)
    assert report["config"]["resumed_runs"] == 0
    assert "no interrupted demo" in capsys.readouterr().err
    assert (tmp_path / "run" / "report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_a_reader_that_stops_reading_does_not_fail_a_finished_command(quick_run, tmp_path):
    # Found in review: `jestkit report DIR | head -1` (and the same after a demo) exited 2
    # with "error: [Errno 32] Broken pipe" although the report was complete, and a script
    # retrying the demo was then refused with "already exists".
    import subprocess

    run = tmp_path / "run"
    shutil.copytree(quick_run, run)
    proc = subprocess.Popen([sys.executable, "-m", "jestkit.cli", "report", str(run)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0, err
    assert "Broken pipe" not in err and "Traceback" not in err
    assert json.loads((run / "report.json").read_text())["methods"]


def test_a_demo_that_fails_before_anything_finished_leaves_no_debris(tmp_path, monkeypatch,
                                                                      capsys):
    # Found in review: the clean-up of a work directory with nothing worth keeping had no
    # test (the SIGTERM test accepts either outcome).
    import jestkit.demo as demo

    def fail(*args, **kwargs):
        raise ValueError("reference training diverged at step 3")

    monkeypatch.setattr(demo, "train_reference", fail)
    out = tmp_path / "run"
    assert main(["demo", "--quick", "--out", str(out), "--no-progress"]) == 2
    assert "reference training diverged at step 3" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither run nor run.partial


def test_an_interrupted_demo_from_before_the_epoch_boundary_option_resumes_as_it_drew(
        tmp_path):
    # Its demo_config.json and finished runs lack epoch_boundary: every sampler then drew
    # "tail_last", so it continues under a config that pins it, and is another config for
    # today's default.
    from dataclasses import asdict

    from jestkit import demo
    from jestkit.provenance import code_version

    quick = DemoConfig.quick()
    cfg = dataclasses.replace(
        quick, methods=("uniform", "learnability-joint"),
        learner=dataclasses.replace(quick.learner, epoch_boundary="tail_last"),
        reference=dataclasses.replace(quick.reference, epoch_boundary="tail_last",
                                      patch_size=8))
    work = tmp_path / "run.partial"
    (work / "runs" / "finished").mkdir(parents=True)
    saved = json.loads(json.dumps(asdict(cfg)))
    for block in ("learner", "reference"):
        saved[block].pop("epoch_boundary")
    saved["reference"].pop("patch_size")  # the reference's patch was always 8 then
    (work / "demo_config.json").write_text(json.dumps(saved))
    (work / "code_version.json").write_text(json.dumps(code_version()))
    for name, _, lc in demo.learner_configs(cfg):
        run = {"config": {k: v for k, v in asdict(lc).items() if k != "epoch_boundary"},
               "code_version": code_version()}
        (work / "runs" / "finished" / f"{name}.seed{lc.seed}.json").write_text(json.dumps(run))
    assert len(demo._check_resumable(work, cfg)) == 2
    with pytest.raises(ValueError, match="learner.epoch_boundary: 'tail_last' then, 'random' "
                                         "now"):
        demo._check_resumable(work, dataclasses.replace(cfg, learner=quick.learner,
                                                        reference=quick.reference))
    with pytest.raises(ValueError, match=r"reference.patch_size: 8 then, 16 now"):
        demo._check_resumable(work, dataclasses.replace(
            cfg, reference=dataclasses.replace(cfg.reference, patch_size=16)))
