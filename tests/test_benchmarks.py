"""The benchmarks' shared helper that writes results into a doc (benchmarks/_markdown.py)."""

import dataclasses
import functools
import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from procs import _alive

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _benchmark(monkeypatch, script: str, name: str | None = None):
    """A fresh import of benchmarks/<script>.py (as module `name`), with benchmarks/ on the
    path for its own imports (_markdown, dense_reference)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name or f"bench_{script}",
                                                  BENCHMARKS / f"{script}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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


@pytest.mark.parametrize("script", ["step_overhead", "selection_speed", "clean_oracle",
                                    "demo_budget", "batched_runs", "scoring_agreement"])
def test_a_benchmark_refuses_its_out_file_before_timing_anything(script, tmp_path,
                                                                 monkeypatch, capsys):
    module = _benchmark(monkeypatch, script)

    def must_not_run(*args, **kwargs):
        raise AssertionError("the benchmark started before checking --out")

    for name in ("run", "measure", "spawn", "measure_peak", "wait_until_quiet"):
        if hasattr(module, name):
            monkeypatch.setattr(module, name, must_not_run)
    def refused(argv, message):
        with pytest.raises(SystemExit) as info:
            module.main(argv)
        assert info.value.code == 2 and message in capsys.readouterr().err, argv

    doc = tmp_path / "results.md"
    doc.write_text("hand-written results, no markers\n")
    refused(["--quick", "--out", str(doc)], "without the markers")
    assert doc.read_text() == "hand-written results, no markers\n"
    # Markers in the wrong order passed the check, then failed after the measuring.
    doc.write_text(f"<!-- {script}:end -->\n<!-- {script}:start -->\n")  # section = script
    refused(["--quick", "--out", str(doc)], "(in that order)")
    # A --json that exists (maybe the only copy of earlier results) or is a directory:
    # found in review to fail only when written, after the measuring, losing the results.
    earlier = tmp_path / "earlier.json"
    earlier.write_text("{}")
    for path in (earlier, tmp_path):
        refused(["--quick", "--json", str(path)], "it exists; give a new path")
    assert earlier.read_text() == "{}"
    if script != "selection_speed":  # a bad --config: named, not a traceback
        for content in ("[1, 2]", "not json", "[" * 100_000 + "]" * 100_000):
            earlier.write_text(content)
            refused(["--config", str(earlier)], f"--config {earlier}:")


@pytest.mark.parametrize("script, argv, message", [
    # Found in review: each failed only after all the timing (or timed the wrong thing).
    ("step_overhead", ["--rounds", "0"], "--rounds must be >= 1, got 0"),
    ("step_overhead", ["--overhead-repeats", "0"], "--overhead-repeats must be >= 1"),
    ("step_overhead", ["--filter-ratios", "1.5"], "--filter-ratios must all be in (0, 1)"),
    ("step_overhead", ["--overhead-batches", "10000"], "--overhead-batches must all be in "
                                                       "[1, 3500], got [10000]"),
    ("selection_speed", ["--matmul-repeats", "0"], "--matmul-repeats must be >= 1"),
    ("selection_speed", ["--repeats", "0"], "--repeats must be >= 1, got 0"),
    ("selection_speed", ["--filter-ratios", "1.0"], "--filter-ratios must all be in (0, 1)"),
    ("selection_speed", ["--timeout", "0"], "--timeout must be > 0"),
    ("reference_sizes", ["--folds", "5", "--jobs", str(10**11)],
     "--jobs must be in [1, 256], got 100000000000"),
    ("batched_runs", ["--runs", "0", "3"], "--runs must all be in [1, 64], got [0, 3]"),
    ("batched_runs", ["--runs", "65"], "--runs must all be in [1, 64]"),
    ("batched_runs", ["--rounds", "0"], "--rounds must be >= 1, got 0"),
    ("batched_runs", ["--steps", "0"], "--steps must all be >= 1"),
    ("scoring_agreement", ["--super-batches", "1"], "--super-batches must be >= 2 (its "
                                                    "bootstrap interval resamples them)"),
    ("scoring_agreement", ["--quick", "--super-batches", "5"], "--quick sets its own"),
    ("scoring_agreement", ["--at-steps", "500", "500"], "--at-steps must increase, within "
                                                        "[1, 6000]"),
    ("scoring_agreement", ["--at-steps", "0"], "--at-steps must increase"),
    ("scoring_agreement", ["--at-steps", "6001"], "(the learner's steps), got [6001]"),
    ("scoring_agreement", ["--learners", "uniform"], "--learners must be among the config's "
                                                     "learnability-joint runs"),
    ("scoring_agreement", ["--learners", "learnability-independent"], "--learners must be"),
    ("scoring_agreement", ["--seed", "-1"], "--seed: seeds must be ints in"),
    ("scoring_agreement", ["--workers", "0"], "--workers must be in [1, "),
    ("scoring_agreement", ["--learner-weights", "1"], "--learner-weights must be distinct finite "
                                                      "numbers > 0 other than 1"),
    ("scoring_agreement", ["--learner-weights", "0.5", "0.5"], "--learner-weights must be"),
    ("scoring_agreement", ["--learner-weights", "nan"], "--learner-weights must be"),
    ("scoring_agreement", ["--learner-weights", "-2"], "--learner-weights must be"),
])
def test_benchmark_numbers_are_checked_before_any_timing(script, argv, message, monkeypatch,
                                                         capsys):
    module = _benchmark(monkeypatch, script)
    if hasattr(module, "run"):  # a check that let it through fails here, not minutes later

        def must_not_run(*args, **kwargs):
            raise AssertionError(f"{script} started before refusing {argv}")

        monkeypatch.setattr(module, "run", must_not_run)
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_selection_speed_checks_its_merge_file_before_measuring(tmp_path, monkeypatch, capsys):
    module = _benchmark(monkeypatch, "selection_speed")
    merge = tmp_path / "earlier.json"
    for content, message in (("{}", "is not a --json file of this benchmark"),
                             ("not json", "is not valid JSON")):
        merge.write_text(content)
        with pytest.raises(SystemExit):
            module.main(["--quick", "--merge", str(merge)])
        assert message in capsys.readouterr().err
    # The one existing --json allowed is the --merge file it updates.
    merge.write_text(json.dumps({"results": [], "commands": [], "matmul": None}))
    args = module.parse_args(["--merge", str(merge), "--json", str(merge)])
    assert args.previous == {"results": [], "commands": [], "matmul": None}


def test_clean_oracle_trains_only_on_clean_pairs_and_reports_by_the_protocol(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out, raw = tmp_path / "doc.md", tmp_path / "raw.json"
    out.write_text("prose\n<!-- co:start -->\n<!-- co:end -->\n")
    # A subprocess, as it is run: its spawned workers import the script by its own name.
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "clean_oracle.py"),
                           "--quick", "--workers", "1", "--out", str(out), "--section", "co",
                           "--json", str(raw)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    res = json.loads(raw.read_text())
    methods = res["methods"]
    assert set(methods) == {"uniform", "clean-oracle", "learnability-joint"}
    assert methods["clean-oracle"]["clean_fraction"] == 1.0
    assert res["clean_pool_size"] == round(0.45 * res["pool_size"])
    assert abs(methods["uniform"]["clean_fraction"] - 0.45) < 0.1  # 40 x 64 uniform draws
    for m in methods.values():  # every method is measured against uniform's final accuracy
        assert m["target_accuracy"] == methods["uniform"]["final_accuracy"]["mean"]
    assert methods["uniform"]["iteration_speedup"] == 1.0  # by definition, as in the demo
    assert methods["uniform"]["step_reaching_target"] == 40
    assert 0 < res["reference_accuracy"] <= 1
    text = out.read_text()
    assert text.startswith("prose\n<!-- co:start -->\nCommand: ")
    assert "| clean-oracle | " in text and text.endswith("<!-- co:end -->\n")


@pytest.fixture
def step_overhead(monkeypatch):
    """A fresh benchmarks/step_overhead.py module (its imports from benchmarks/ resolvable)."""
    return _benchmark(monkeypatch, "step_overhead", "bench_step_overhead_fresh")


def test_step_overhead_times_the_demo_configs_learner(step_overhead):
    # Every field of the config's learner (here: 4 text heads, another lr) reaches the timed
    # variants, not only the sizes that used to be copied one by one.
    module = step_overhead
    from jestkit.demo import DemoConfig
    from jestkit.training import LearnerConfig

    learner = LearnerConfig(text_heads=4, lr=3e-3, width=32)
    setup = module.Setup.from_demo(DemoConfig(learner=learner))
    for kind in ("uniform", "live", "cached", "cached+flexi", "cached+flexi+multires"):
        cfg = module.variant_config(kind, None if kind == "uniform" else 0.8, 5, setup)
        assert (cfg.text_heads, cfg.lr, cfg.width, cfg.seed) == (4, 3e-3, 32, 5), kind
        assert cfg.method == ("uniform" if kind == "uniform" else "learnability")
        assert bool(cfg.score_patch_size) == kind.startswith("cached+flexi")
    assert module.variant_config("live", 0.5, 0, setup).filter_ratio == 0.5
    # The demo's setup is the demo's learner; another setup changed nothing module-wide.
    assert module.variant_config("uniform", None, 0, module.DEMO_SETUP) == dataclasses.replace(
        DemoConfig().learner, method="uniform", seed=0, selection="joint")
    from jestkit.data import load_digits_web
    runner = module.Runner("uniform", module.variant_config("uniform", None, 0, setup),
                           load_digits_web(0, max_len=8), None, None)
    assert runner.model.config.text_heads == 4  # the timed model is the config's
    # The variants are joint, and only the flexi ones take the config's Flexi setting (a demo
    # config's learner block cannot set selection or Flexi: DemoConfig refuses them).
    learner = LearnerConfig(patch_size=4)
    setup = module.Setup.from_demo(DemoConfig(learner=learner, flexi_score_patch_size=8,
                                              flexi_multires_fraction=0.25))
    want = {"uniform": (0, 0.0), "live": (0, 0.0), "cached": (0, 0.0),
            "cached+flexi": (8, 0.25), "cached+flexi+multires": (8, 0.5)}
    for kind, flexi in want.items():
        cfg = module.variant_config(kind, None if kind == "uniform" else 0.8, 0, setup)
        assert (cfg.score_patch_size, cfg.multires_fraction) == flexi, kind
        assert cfg.selection == "joint" and cfg.patch_size == 4, kind


@pytest.mark.parametrize("view", ["augmented", "stored"])
def test_step_overhead_steps_are_train_learners(step_overhead, view, tmp_path):
    # The timed loop is train_learner's (check_faithful: the same FLOP ledger and loss) for
    # every variant that scores, and a demo config's flexi_score_view reaches the flexi ones.
    module = step_overhead
    from jestkit.cache import build_reference_cache
    from jestkit.data import load_digits_web
    from jestkit.demo import DemoConfig
    from jestkit.models import DualEncoder
    from jestkit.training import LearnerConfig, model_config

    data = load_digits_web(0, max_len=8)
    learner = LearnerConfig(width=16, batch_size=16, n_chunks=4, patch_size=8)
    setup = module.Setup.from_demo(DemoConfig(learner=learner, flexi_score_patch_size=16,
                                              flexi_score_view=view))
    reference = DualEncoder(model_config(DemoConfig().reference, data.tokenizer.vocab_size),
                            seed=1).eval()
    cache = build_reference_cache(reference, data.pool, tmp_path / "cache")
    for kind in ("live", "cached+flexi"):
        cfg = module.variant_config(kind, 0.8, 0, setup)
        assert cfg.score_view == (view if kind == "cached+flexi" else "augmented")
        ref, used = (None, cache) if kind.startswith("cached") else (reference, None)
        runner = functools.partial(module.Runner, kind, cfg, data, ref, used)
        check = module.check_faithful(runner, cfg, data, ref, used, 3)
        assert check["identical"], check


def test_clean_oracle_refuses_bad_arguments_before_training(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "clean_oracle.py"
    for args, message in ((["--quick", "--config", "configs/demo.json"], "drop --config"),
                          (["--json", str(tmp_path / "missing" / "x.json")], "does not exist"),
                          (["--out", str(tmp_path / "missing" / "x.md")], "does not exist"),
                          (["--workers", "0"], "--workers must be in [1, 256], got 0"),
                          (["--workers", str(10**11)], "--workers must be in [1, 256]")):
        done = subprocess.run([sys.executable, str(script), *args], capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == 2 and message in done.stderr, (args, done.stderr)


def _clean_oracle_module(monkeypatch):
    return _benchmark(monkeypatch, "clean_oracle")


class _InlinePool:
    """ProcessPoolExecutor stand-in that runs each job at submit, in this process."""

    def __init__(self, **kwargs):
        pass

    def submit(self, fn, *args):
        from concurrent.futures import Future
        fut = Future()
        fut.set_result(fn(*args))
        return fut

    def shutdown(self, wait=True, cancel_futures=False):
        pass


def test_clean_oracle_trains_each_method_as_named_for_every_seed(monkeypatch):
    import torch

    from jestkit.demo import DemoConfig
    from jestkit.training import LearnerConfig, ReferenceConfig
    module = _clean_oracle_module(monkeypatch)
    calls = []
    real = module.train_learner

    def recording(data, cfg, reference=None):
        calls.append((cfg.method, cfg.selection, cfg.seed, reference is not None,
                      bool(data.pool.is_clean.all()), len(data.pool)))
        return real(data, cfg, reference)

    monkeypatch.setattr(module, "train_learner", recording)
    monkeypatch.setattr(module, "worker_pool", lambda workers: _InlinePool())
    demo = DemoConfig(seeds=(0, 1), learner=LearnerConfig(steps=4, warmup_steps=1, width=16),
                      reference=ReferenceConfig(steps=2, warmup_steps=1, width=16))
    threads = torch.get_num_threads()
    try:
        res = module.run(demo, workers=1)
    finally:
        torch.set_num_threads(threads)  # the workers set one thread
    pool, clean = res["pool_size"], res["clean_pool_size"]
    assert calls == [("uniform", "joint", 0, False, False, pool),
                     ("uniform", "joint", 1, False, False, pool),
                     ("uniform", "joint", 0, False, True, clean),
                     ("uniform", "joint", 1, False, True, clean),
                     ("learnability", "joint", 0, True, False, pool),
                     ("learnability", "joint", 1, True, False, pool)]
    assert [r for r in res["methods"]] == ["uniform", "clean-oracle", "learnability-joint"]


def test_clean_oracle_markdown_says_what_was_measured(monkeypatch):
    module = _clean_oracle_module(monkeypatch)

    def method(final, std, step, speedup, clean):
        return {"final_accuracy": {"mean": final, "std": std}, "step_reaching_target": step,
                "iteration_speedup": speedup, "clean_fraction": clean, "target_accuracy": 0.5}

    res = {"config": {"learner": {"steps": 100, "batch_size": 8}, "seeds": [0, 1]},
           "wall_s": 3.0, "pool_size": 20, "clean_pool_size": 9, "reference_accuracy": 0.7,
           "methods": {"uniform": method(0.5, 0.01, 100, 1.0, 0.45),
                       "clean-oracle": method(0.8, None, 50, 2.0, 1.0),
                       "learnability-joint": method(0.4, 0.02, None, None, 0.6)},
           "levels": {"levels": [0.5, 0.6],
                      "methods": {"uniform": {"steps": [100, None],
                                              "iteration_speedup": [1.0, None]},
                                  "clean-oracle": {"steps": [50, 80],
                                                   "iteration_speedup": [2.0, None]},
                                  "learnability-joint": {"steps": [None, None],
                                                         "iteration_speedup": [None, None]}}}}
    text = module.markdown(res, "cmd")
    assert "Target (uniform's final accuracy): 50.0%." in text
    assert "clean pool 9 of 20 pairs; reference 70.0%" in text
    assert "| uniform | 50.0 ± 1.0 | 100 | 1.00x | 45.0% |" in text
    assert "| clean-oracle | 80.0 | 50 | 2.00x | 100.0% |" in text
    assert "| learnability-joint | 40.0 ± 2.0 | not reached | not reached | 60.0% |" in text
    assert "| uniform | 100 | not reached |" in text  # the baseline's cells carry no ratio
    assert "| clean-oracle | 50 (2.0x) | 80 |" in text
    res["levels"] = {"levels": [], "methods": {}}
    assert "No method reached any of the levels" in module.markdown(res, "cmd")


def test_sampling_paths_baseline_is_the_same_draw_as_the_sampler():
    # The benchmark times the sampler's window gather against a per-pixel gather; the
    # comparison means something only if both draw the same images from the same generator.
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sampling_paths.py"
    spec = importlib.util.spec_from_file_location("bench_sampling_paths", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import torch

    from jestkit.data import _shifted_rows, _zero_pad

    images = torch.rand(50, 3, 9, 11, generator=torch.Generator().manual_seed(0))
    padded = _zero_pad(images, 3)
    for seed in range(5):
        rows = torch.randperm(50, generator=torch.Generator().manual_seed(seed))[:20]
        want = _shifted_rows(padded, rows, 3, torch.Generator().manual_seed(seed))
        got = module.per_pixel_gather(padded, rows, 3, torch.Generator().manual_seed(seed))
        assert torch.equal(got, want)


def test_reference_sizes_trains_each_spec_and_refuses_bad_ones(capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_sizes.py"
    spec = importlib.util.spec_from_file_location("bench_reference_sizes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--spec", '{"steps": 3, "batch_size": 8, "width": 16}',
                        "--spec", '{"steps": 2, "batch_size": 8, "seed": 4}']) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [r.split(" | ")[0] for r in rows[1:]] == ["| steps=3, batch_size=8, width=16",
                                                      "| steps=2, batch_size=8, seed=4"]
    for row in rows[1:]:
        assert 0 <= float(row.split(" | ")[1].rstrip("%")) <= 100
    for bad, says in (('{"widht": 3}', "ReferenceConfig fields"),
                      ('{"width": 30}', "width must be a multiple of 4"),
                      ('{"patch_size": 5}', "patch_size must be one of [1, 2, 4, 8, 16, 32]"),
                      ("{", "must be a JSON object")):
        with pytest.raises(SystemExit) as err:
            module.main(["--spec", bad])
        assert err.value.code == 2
        assert says in capsys.readouterr().err


def test_reference_sizes_checks_every_spec_before_training_and_prints_what_it_measured(
        monkeypatch, capsys):
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "reference_sizes.py"
    spec = importlib.util.spec_from_file_location("bench_reference_sizes_fake", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trained = []

    def fake(data, cfg):
        trained.append(cfg)
        return None, {"metrics": {"zero_shot_accuracy": 0.5}, "flops": 2e12}

    monkeypatch.setattr(module, "train_reference", fake)
    with pytest.raises(SystemExit) as err:  # the bad second spec stops it before the first
        module.main(["--spec", '{"steps": 2}', "--spec", '{"batch_size": 501}'])
    assert err.value.code == 2 and trained == []
    assert "batch_size must be in [1, 500]" in capsys.readouterr().err
    assert module.main(["--spec", '{"batch_size": 500}']) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| batch")]
    assert row == ["| batch_size=500 | 50.0% | 2.000 | " + row[0].rsplit(" | ", 1)[1]]
    trained.clear()
    assert module.main(["--quick"]) == 0
    assert [dict(steps=c.steps, batch_size=c.batch_size) for c in trained] == [
        dict(steps=q["steps"], batch_size=q["batch_size"]) for q in module.QUICK]
    # --patch-size reaches every config without its own (the tables measured at patch 8
    # before the default became 16 reproduce with it), and a bad one stops before training.
    assert {c.patch_size for c in trained} == {16}
    trained.clear()
    assert module.main(["--patch-size", "8", "--spec", "{}", "--spec", '{"patch_size": 4}']) == 0
    assert [c.patch_size for c in trained] == [8, 4]
    assert "| patch_size=8 |" in capsys.readouterr().out
    trained.clear()
    with pytest.raises(SystemExit) as err:
        module.main(["--patch-size", "5"])
    assert err.value.code == 2 and trained == []
    assert "--patch-size must be one of [1, 2, 4, 8, 16, 32]" in capsys.readouterr().err


@pytest.fixture
def reference_sizes(monkeypatch):
    # Imported by name from benchmarks/ on sys.path: spawned worker processes inherit the
    # path and import it the same way to run its functions.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("reference_sizes")


def test_curated_folds_are_a_stratified_seeded_partition(reference_sizes):
    module = reference_sizes
    import torch

    labels = torch.arange(10).repeat_interleave(50)[torch.randperm(500,
                                                   generator=torch.Generator().manual_seed(3))]
    folds = module.curated_folds(labels, 5)
    rows = np.concatenate(folds)
    assert len(folds) == 5 and sorted(rows.tolist()) == list(range(500))  # disjoint, covering
    for fold in folds:
        assert np.bincount(labels.numpy()[fold], minlength=10).tolist() == [10] * 10
    again = module.curated_folds(labels, 5)
    assert all(np.array_equal(a, b) for a, b in zip(folds, again, strict=True))
    other = module.curated_folds(labels, 5, seed=1)
    assert not all(np.array_equal(a, b) for a, b in zip(folds, other, strict=True))
    # Uneven classes: each class's count differs by at most one between folds.
    uneven = torch.tensor([0] * 7 + [1] * 3 + [2] * 5)
    counts = np.array([np.bincount(uneven.numpy()[fold], minlength=3)
                       for fold in module.curated_folds(uneven, 3)])
    assert counts.sum(axis=0).tolist() == [7, 3, 5]
    assert (counts.max(axis=0) - counts.min(axis=0)).tolist() == [1, 0, 1]
    assert counts.sum(axis=1).tolist() == [5, 5, 5]  # the deal runs on across classes
    for bad in (1, 4):
        with pytest.raises(ValueError, match=r"folds must be in \[2, 3\]"):
            module.curated_folds(uneven, bad)


def test_reference_cross_validation_never_reads_test_and_holds_out_each_fold_once(
        reference_sizes, monkeypatch, capsys):
    module = reference_sizes
    from jestkit.data import load_digits_web

    test_ids = set(load_digits_web(0).test.ids.tolist())
    seen = []

    def fake(data, cfg):
        train, held = set(data.curated.ids.tolist()), set(data.test.ids.tolist())
        seen.append((cfg.steps, frozenset(held)))
        assert not (train | held) & test_ids  # the real test split is nowhere
        assert not train & held and len(train) == 400 and len(held) == 100
        # Config steps=3 scores best on every fold; steps=2 only on the first.
        return None, {"metrics": {"zero_shot_accuracy": 0.5 + 0.01 * cfg.steps
                                  - (0.02 if len(seen) % 5 == 1 else 0.0)}, "flops": 1e9}

    monkeypatch.setattr(module, "train_reference", fake)
    assert module.main(["--folds", "5", "--spec", '{"steps": 2}',
                        "--spec", '{"steps": 3}']) == 0
    out = capsys.readouterr().out
    assert [s for s, _ in seen] == [2] * 5 + [3] * 5
    for steps in (2, 3):  # each curated pair held out exactly once per config
        held = [h for s, h in seen if s == steps]
        assert len(set().union(*held)) == 500 and sum(map(len, held)) == 500
    rows = [line for line in out.splitlines() if line.startswith("| steps=")]
    assert rows[0].startswith("| steps=2 | 51.6 ± 0.9% | 50.0, 52.0, 52.0, 52.0, 52.0 | 0.001 |")
    assert rows[1].startswith("| steps=3 | 52.6 ± 0.9% | 51.0, 53.0, 53.0, 53.0, 53.0 | 0.001 |")
    assert "Highest held-out accuracy: steps=3 (52.6%)" in out
    for argv, says in ((["--folds", "1"], "--folds must be in [2, 50]"),
                       (["--folds", "51"], "--folds must be in [2, 50]"),
                       (["--jobs", "2"], "--jobs needs --folds"),
                       (["--folds", "2", "--jobs", "0"], "--jobs must be in [1, 256], got 0"),
                       (["--folds", "5", "--spec", '{"batch_size": 401}'],
                        "batch_size must be in [1, 400] (the pairs one fold trains on")):
        with pytest.raises(SystemExit) as err:
            module.main(argv)
        assert err.value.code == 2 and says in capsys.readouterr().err


def test_reference_cross_validation_gives_the_same_table_in_parallel(reference_sizes, capsys):
    argv = ["--folds", "2", "--spec", '{"steps": 3, "batch_size": 8, "width": 16}',
            "--spec", '{"steps": 2, "batch_size": 8}']
    tables = []
    for jobs in ("1", "2"):
        assert reference_sizes.main([*argv, "--jobs", jobs]) == 0
        out = capsys.readouterr().out
        main, paired = out.split("Highest held-out accuracy")
        rows = [line for line in main.splitlines() if line.startswith("| steps=")]
        tables.append([row.rsplit(" | ", 1)[0] for row in rows])  # all but the wall time
        tables[-1] += [line for line in paired.splitlines() if line.startswith("| steps=")]
    assert len(tables[0]) == 3 and tables[0] == tables[1]


def test_reference_cross_validation_repeats_deal_new_folds_and_pairs_them(
        reference_sizes, monkeypatch, capsys):
    module = reference_sizes
    seen = []

    def fake(data, cfg):
        held = frozenset(data.test.ids.tolist())
        seen.append((cfg.steps, held))
        # steps=2 is four points below steps=3 on every fold of the first deal and two
        # above on every fold of the second; the fold's own difficulty (from its ids) is the
        # same for both, and pairing cancels it.
        difficulty = 0.001 * (min(held) % 7)
        bonus = (-0.03 if len(seen) <= 5 else 0.03) if cfg.steps == 2 else 0.0
        return None, {"metrics": {"zero_shot_accuracy": 0.5 + 0.01 * cfg.steps + difficulty
                                  + bonus}, "flops": 1e9}

    monkeypatch.setattr(module, "train_reference", fake)
    assert module.main(["--folds", "5", "--repeats", "2", "--spec", '{"steps": 2}',
                        "--spec", '{"steps": 3}']) == 0
    out = capsys.readouterr().out
    assert [s for s, _ in seen] == [2] * 10 + [3] * 10
    deals = [[h for _, h in seen[i:i + 5]] for i in (0, 5, 10, 15)]
    for deal in deals:  # each deal holds every curated pair out once
        assert len(set().union(*deal)) == 500 and sum(map(len, deal)) == 500
    assert set(deals[0]) != set(deals[1])  # a new deal, not the same folds again
    assert deals[0] == deals[2] and deals[1] == deals[3]  # the same deals for every config
    assert "2 deals (seeds 0-1) of 5-fold" in out
    assert "| per deal (all held-out pairs) |" in out
    main, paired = out.split("Highest held-out accuracy: steps=3")
    rows = {line.split(" | ")[0]: line.split(" | ") for line in main.splitlines()
            if line.startswith("| steps=")}
    # The per-deal pooled accuracies, and the mean over deals.
    accs = {steps: [100 * (0.5 + 0.01 * steps + 0.001 * (min(h) % 7)) for h in deal]
            for steps, deal in ((2, deals[0] + deals[1]), (3, deals[2] + deals[3]))}
    accs[2] = [a - 3.0 for a in accs[2][:5]] + [a + 3.0 for a in accs[2][5:]]
    for steps in (2, 3):
        per_deal = [statistics.mean(accs[steps][:5]), statistics.mean(accs[steps][5:])]
        assert rows[f"| steps={steps}"][2] == ", ".join(f"{a:.1f}" for a in per_deal)
        assert rows[f"| steps={steps}"][1] == (f"{statistics.mean(per_deal):.1f} ± "
                                              f"{statistics.stdev(accs[steps]):.1f}%")
    # Paired: five folds at -4 points and five at +2: mean -1.0, std sqrt(10), corrected
    # SE = sqrt(10) * sqrt(1/10 + 1/4) = 1.87 (pstdev would give 1.77, sqrt(n - 1) 1.97).
    (row,) = [line for line in paired.splitlines() if line.startswith("| steps=")]
    assert row == "| steps=2 | -1.0 ± 1.9 | 5 of 10 |"
    for argv, says in ((["--folds", "5", "--repeats", "0"], "--repeats must be >= 1"),
                       (["--repeats", "2"], "--repeats needs --folds")):
        with pytest.raises(SystemExit) as err:
            module.main(argv)
        assert err.value.code == 2 and says in capsys.readouterr().err


def test_reference_sizes_json_keeps_every_run_and_what_finished_before_an_interrupt(
        reference_sizes, monkeypatch, capsys, tmp_path):
    module = reference_sizes
    calls = []

    def fake(data, cfg):
        calls.append(cfg.steps)
        if cfg.steps == 4:
            raise KeyboardInterrupt  # the third config never finishes
        held = sorted(data.test.ids.tolist())
        return None, {"metrics": {"zero_shot_accuracy": 0.5 + 0.01 * cfg.steps
                                  + 0.001 * (held[0] % 5)}, "flops": 1e9 * cfg.steps}

    monkeypatch.setattr(module, "train_reference", fake)
    path = tmp_path / "cv.json"
    specs = ["--spec", '{"steps": 2}', "--spec", '{"steps": 3}', "--spec", '{"steps": 4}']
    with pytest.raises(KeyboardInterrupt):
        module.main(["--folds", "5", "--repeats", "2", "--json", str(path), *specs])
    out = capsys.readouterr().out
    saved = json.loads(path.read_text())
    assert saved["complete"] is False and saved["folds"] == 5 and saved["repeats"] == 2
    assert [r["spec"] for r in saved["results"]] == [{"steps": 2}, {"steps": 3}]
    rows = {line.split(" | ")[0]: line.split(" | ") for line in out.splitlines()
            if line.startswith("| steps=")}
    for result in saved["results"]:
        runs = result["runs"]
        assert [(r["deal"], r["fold"]) for r in runs] == [(d, i) for d in (0, 1)
                                                          for i in range(5)]
        assert all(r["held_out_pairs"] == 100 for r in runs)
        # The printed row is recomputed from the saved runs: each deal's pooled accuracy.
        per_deal = [statistics.mean(r["held_out_accuracy"] for r in runs if r["deal"] == d)
                    for d in (0, 1)]
        assert result["repeat_pooled"] == pytest.approx(per_deal)
        row = rows[f"| steps={result['spec']['steps']}"]
        assert row[2] == ", ".join(f"{100 * a:.1f}" for a in per_deal)
        assert result["flops"] == 1e9 * result["spec"]["steps"]
    # An existing file is never overwritten, and that is said before any training.
    calls.clear()
    before = path.read_bytes()
    with pytest.raises(SystemExit) as err:
        module.main(["--folds", "5", "--json", str(path), *specs[:2]])
    assert err.value.code == 2 and "it exists" in capsys.readouterr().err
    assert calls == [] and path.read_bytes() == before
    # Without --folds: each config's test accuracy; complete once all have finished. A
    # missing directory is made.
    done = tmp_path / "new" / "test.json"
    assert module.main(["--json", str(done), *specs[:4]]) == 0
    saved = json.loads(done.read_text())
    assert saved["complete"] is True and saved["folds"] is None
    assert [(r["spec"], r["flops"]) for r in saved["results"]] == [({"steps": 2}, 2e9),
                                                                  ({"steps": 3}, 3e9)]
    assert all(0 <= r["test_accuracy"] <= 1 for r in saved["results"])


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_reference_cross_validation_stops_its_workers_when_interrupted(reference_sizes):
    import multiprocessing
    import time

    from jestkit.data import load_digits_web

    tiny, huge = {"steps": 2, "batch_size": 8, "width": 16}, {"steps": 10**6, "batch_size": 8}
    before = {p.pid for p in multiprocessing.active_children()}
    runs = reference_sizes.cross_validate(load_digits_web(0, max_len=8), [tiny, huge], 2, 2)
    try:
        first = next(runs)  # the tiny config's two folds; the workers go on to the huge one's
        assert len(first["accuracies"]) == 2
        workers = [p.pid for p in multiprocessing.active_children() if p.pid not in before]
        assert len(workers) == 2 and all(_alive(pid) for pid in workers)
        t0 = time.monotonic()
        runs.close()  # what Ctrl-C or SIGTERM (SystemExit) does to the loop consuming it
        # Not the hours a million steps would take: SIGTERM, else a kill after 10 s.
        assert time.monotonic() - t0 < 30
        assert not any(_alive(pid) for pid in workers)
    finally:
        runs.close()  # a failed assertion must not leave the pool training for hours


def test_reference_cross_validation_weighs_unequal_folds_by_their_pairs(
        reference_sizes, monkeypatch, capsys):
    from jestkit.data import load_digits_web

    data = load_digits_web(0, max_len=8)
    # 3 folds of the 500 curated pairs hold 167, 167 and 166: right only on the smallest.
    monkeypatch.setattr(reference_sizes, "train_reference", lambda d, cfg: (None, {
        "metrics": {"zero_shot_accuracy": float(len(d.test) == 166)}, "flops": 1.0}))
    (result,) = reference_sizes.cross_validate(data, [{"steps": 2}], 3, 1)
    assert result["accuracies"] == [0.0, 0.0, 1.0]
    assert result["pooled"] == pytest.approx(166 / 500)  # not the folds' mean, 1/3
    # The batch-size check allows what the smallest training part holds (333), not more.
    with pytest.raises(SystemExit):
        reference_sizes.main(["--folds", "3", "--spec", '{"batch_size": 334}'])
    assert "batch_size must be in [1, 333]" in capsys.readouterr().err
    # A tie goes to the first config given (grid order), as documented.
    monkeypatch.setattr(reference_sizes, "train_reference", lambda d, cfg: (None, {
        "metrics": {"zero_shot_accuracy": 0.5}, "flops": 1.0}))
    assert reference_sizes.main(["--folds", "2", "--spec", '{"steps": 3}',
                                 "--spec", '{"steps": 2}']) == 0
    assert "Highest held-out accuracy: steps=3 (50.0%)" in capsys.readouterr().out


def test_reference_cross_validation_workers_compute_what_one_process_does(reference_sizes,
                                                                         monkeypatch):
    import os

    import torch

    from jestkit.data import load_digits_web
    from jestkit.demo import DEMO_MAX_TEXT_LEN

    data = load_digits_web(0, max_len=DEMO_MAX_TEXT_LEN)
    specs = [{"steps": 2, "batch_size": 8, "width": 16}]
    serial, parallel = ([{k: v for k, v in r.items() if k != "wall_s"}
                         for r in reference_sizes.cross_validate(data, specs, 2, jobs)]
                        for jobs in (1, 2))
    assert serial == parallel  # the same data (caption length too), FLOPs and accuracies
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        watched = []  # not the real watcher: it would end pytest if pytest's parent exited
        monkeypatch.setattr(reference_sizes, "exit_with_parent", watched.append)
        reference_sizes._init_worker(os.getpid())
        assert watched == [os.getpid()]  # its workers end if the benchmark is killed
        assert torch.get_num_threads() == 1  # one thread per worker, as documented
    finally:
        torch.set_num_threads(threads)
        reference_sizes._WORKER_DATA = None


def test_step_overhead_times_the_setup_it_is_given(step_overhead, monkeypatch, tmp_path):
    import argparse

    from jestkit.data import load_digits_web
    from jestkit.demo import DemoConfig
    from jestkit.training import LearnerConfig, ReferenceConfig

    module = step_overhead
    demo = DemoConfig(learner=LearnerConfig(width=16, patch_size=4, batch_size=8, n_chunks=2),
                      reference=ReferenceConfig(width=24), flexi_score_patch_size=8)
    setup = module.Setup.from_demo(demo)
    # per_call_overhead: the setup's learner, patches and batch.
    optimized = []
    real = module._optimizer
    monkeypatch.setattr(module, "_optimizer", lambda m, cfg: optimized.append(cfg) or real(m, cfg))
    overhead = module.per_call_overhead(load_digits_web(0, max_len=8), 0, [8], 1, setup)
    assert (overhead["base_patch"], overhead["coarse_patch"]) == (4, 8)
    assert optimized and all((c.width, c.batch_size) == (16, 8) for c in optimized)

    # run: the setup's reference and learner.
    class Stop(Exception):
        pass

    got = {}
    monkeypatch.setattr(module, "build_reference_cache",
                        lambda ref, pool, d, views: got.update(reference=ref.config,
                                                               views=views))

    def runner(name, cfg, *rest):
        got["learner"] = cfg
        raise Stop

    monkeypatch.setattr(module, "Runner", runner)
    args = argparse.Namespace(threads=1, data_seed=0, seed=0, filter_ratios=[0.8],
                              kinds=["live"], check_steps=0, quick=True)
    with pytest.raises(Stop):
        module.run(args, setup)
    assert (got["learner"].width, got["learner"].patch_size) == (16, 4)
    assert got["reference"].image_width == 24 and got["views"] == "stored"
    got.clear()  # the demo config's cache views reach the cache it builds
    with pytest.raises(Stop):
        module.run(args, setup._replace(cache_views="shifts"))
    assert got["views"] == "shifts"

    # main: --config reaches run.
    path = tmp_path / "demo.json"
    path.write_text(json.dumps(dataclasses.asdict(demo)))

    def fake_run(args, setup):
        got["setup"] = setup
        raise Stop

    monkeypatch.setattr(module, "run", fake_run)
    with pytest.raises(Stop):
        module.main(["--quick", "--config", str(path)])
    assert got["setup"] == setup


@pytest.fixture
def demo_budget(monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    return importlib.import_module("demo_budget")


@pytest.mark.parametrize("steps, eval_every", [(81, 0), (83, 20), (7, 0)])
def test_demo_budget_counts_the_evaluations_train_learner_runs(demo_budget, steps, eval_every):
    from jestkit.data import load_digits_web
    from jestkit.training import LearnerConfig, train_learner

    cfg = LearnerConfig(method="uniform", steps=steps, eval_every=eval_every, width=16,
                        text_width=16)
    result = train_learner(load_digits_web(0, max_len=8), cfg)
    assert demo_budget.evaluations(steps, eval_every) == len(result.steps)


def test_demo_budget_prices_what_a_real_demo_computes(demo_budget, tmp_path):
    # A small real demo (one seed, 40 steps; a method with no reference, one scoring with the
    # live reference, one reading the cache) against the benchmark on the same config: the
    # FLOPs it prices are the FLOPs the demo's runs, reference and cache counted.
    from jestkit.demo import DemoConfig, run_demo

    methods = ["uniform", "hard_learner-joint", "easy_reference-joint",
               "learnability-joint-flexi"]
    demo = dataclasses.replace(DemoConfig.quick(), methods=tuple(methods))
    report = run_demo(demo, tmp_path / "demo", workers=1, show_progress=False)
    config, doc, raw = tmp_path / "cfg.json", tmp_path / "doc.md", tmp_path / "raw.json"
    config.write_text(json.dumps(dataclasses.asdict(demo)))
    doc.write_text("prose\n<!-- demo_budget:start -->\nold\n<!-- demo_budget:end -->\ntail\n")
    t = demo.learner.steps
    assert demo_budget.main(["--quick", "--config", str(config), "--steps", str(t), "5000",
                             "--out", str(doc), "--json", str(raw)]) == 0
    res = json.loads(raw.read_text())
    assert list(res["methods"]) == methods
    assert res["checks"] and all(c["identical"] for c in res["checks"])  # the library's step
    assert res["seeds"] == len(demo.seeds) == 1
    run_flops = {}
    for name in methods:
        run_flops[name] = sum(report["methods"][name]["flops_at_end"].values())
        assert res["methods"][name]["flops_per_step"] * t == pytest.approx(run_flops[name],
                                                                          rel=1e-12), name
    assert res["reference"]["flops"] == pytest.approx(report["reference"]["flops"], rel=1e-12)
    assert res["cache"]["flops"] == report["reference"]["caching_flops"] > 0
    short, long = res["demos"]
    n_eval = len(report["methods"]["uniform"]["curves"]["steps"])
    assert short["evaluations_per_run"] == n_eval == 40
    assert short["flops"] == pytest.approx(
        res["reference"]["flops"] + res["cache"]["flops"]
        + sum(run_flops[m] + n_eval * res["evaluation"]["flops"] for m in methods), rel=1e-12)
    for cost in res["demos"]:
        assert 0 < cost["lower_bound_s"] < cost["estimate_s"]  # nothing beats the matmul peak
    assert long["flops"] > short["flops"]
    text = doc.read_text()
    assert text.startswith("prose\n<!-- demo_budget:start -->\nCommand: ")
    assert text.endswith("<!-- demo_budget:end -->\ntail\n") and "old" not in text
    assert "| 5,000 | 40 |" in text
    # The verdict reads the budget against both times (T = 40's row comes first).
    def verdict(budget_s: float) -> str:
        row = demo_budget.markdown(dict(res, budget_min=budget_s / 60), "cmd").split(
            f"| {t} | 40 | ")[1]
        return row.split("\n")[0].rsplit("|", 2)[-2].strip()

    assert verdict(short["lower_bound_s"] / 2) == "no, not even at the peak"
    assert verdict((short["lower_bound_s"] + short["estimate_s"]) / 2) == \
        "no, at the measured speed"
    assert verdict(2 * short["estimate_s"]) == "yes"


def test_demo_budget_prices_the_reference_from_a_few_steps(demo_budget):
    from jestkit.data import load_digits_web
    from jestkit.training import ReferenceConfig, train_reference

    data = load_digits_web(0, max_len=8)
    cfg = ReferenceConfig(steps=30, width=16)
    _, cost = demo_budget.reference_cost(data, cfg, timed_steps=5)
    _, info = train_reference(data, cfg)
    assert cost["flops"] == pytest.approx(info["flops"], rel=1e-12)
    assert cost["steps"] == 30 and cost["timed_steps"] == 5 and cost["s"] > 0
    _, one = demo_budget.reference_cost(data, dataclasses.replace(cfg, steps=1), timed_steps=5)
    assert one["timed_steps"] == 1 and one["s"] > 0  # too short to leave out its first step


@pytest.mark.parametrize("args, message", [
    (["--workers", "0"], "--workers must be >= 1"),
    (["--steps", "1000", "0"], "--steps must all be >= 1"),
    (["--budget-min", "0"], "--budget-min must be > 0"),
    (["--check-steps", "-1"], "--check-steps must be >= 0"),
    (["--warmup", "-1"], "--warmup must be >= 0"),
])
def test_demo_budget_refuses_bad_arguments_before_measuring(demo_budget, monkeypatch, capsys,
                                                            args, message):
    monkeypatch.setattr(demo_budget, "measure", lambda *a: pytest.fail("measured"))
    with pytest.raises(SystemExit):
        demo_budget.main(args)
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("script", ["demo_budget", "batched_runs"])
def test_pricing_benchmarks_price_the_configs_own_T_by_default(script, monkeypatch, tmp_path):
    # Found in review: both priced T = 1000, 12000 and 14000 whatever the config, the 16-token
    # demo's lengths, after the default demo became T = 6000.
    module = _benchmark(monkeypatch, script)
    priced = []

    class Stop(Exception):
        pass

    def measure(cfg, args):
        priced.append(list(args.steps))
        raise Stop

    monkeypatch.setattr(module, "measure", measure)
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"learner": {"steps": 250}}))
    for argv, expected in (([], [6000]), (["--config", str(config)], [250]),
                           (["--steps", "7", "9"], [7, 9])):
        with pytest.raises(Stop):
            module.main(argv)
        assert priced.pop() == expected


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_selection_speed_sigterm_ends_its_measuring_child(tmp_path):
    # Found in review: SIGTERM to the benchmark left its measuring child running (re-parented
    # to init); now it ends as Ctrl-C does, and subprocess.run kills the child.
    import signal
    import subprocess
    import sys
    import time

    from procs import _alive, _children, _cmdline

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "selection_speed.py"
    proc = subprocess.Popen([sys.executable, str(script), "--sizes", "--large-sizes",
                             "--threads", "1", "--wait-idle", "0", "--matmul-size", "4096",
                             "--matmul-repeats", "1000"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while not (child := [c for c in _children(proc.pid) if b"--one" in _cmdline(c)]):
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 128 + signal.SIGTERM
        deadline = time.time() + 10
        while _alive(child[0]) and time.time() < deadline:
            time.sleep(0.1)
        assert not _alive(child[0])
    finally:
        proc.kill()
        for pid in child if "child" in locals() else []:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_softmax_paths_refuses_arguments_instead_of_running(monkeypatch, capsys):
    # Found in review: it took no options, so `--help` (or a typo) ran the whole benchmark.
    module = _benchmark(monkeypatch, "softmax_paths")
    monkeypatch.setattr(module, "_median_us", lambda *a, **k: pytest.fail("it ran"))
    with pytest.raises(SystemExit) as info:
        module.main(["--rounds", "3"])
    assert info.value.code == 2 and "unrecognized arguments" in capsys.readouterr().err


# --- batched_runs.py: what batching several runs as one model could buy -------------------


def test_batched_loss_is_the_sum_of_each_runs_own_sigmoid_loss(monkeypatch):
    # The stand-in's loss must be what a vmap over runs computes: each run's pairs against
    # each other only. Against models.sigmoid_loss run by run, values and gradients.
    import torch

    from jestkit.models import sigmoid_loss
    module = _benchmark(monkeypatch, "batched_runs")
    gen = torch.Generator().manual_seed(0)
    runs, b, d = 3, 5, 4
    u = torch.nn.functional.normalize(torch.randn(runs * b, d, generator=gen), dim=1)
    v = torch.nn.functional.normalize(torch.randn(runs * b, d, generator=gen), dim=1)
    u.requires_grad_(True)
    t, c = torch.tensor(10.0, requires_grad=True), torch.tensor(-3.0, requires_grad=True)
    batched = module.batched_sigmoid_loss(u, v, t, c, runs)
    grads = torch.autograd.grad(batched, (u, t, c))
    each = sum(sigmoid_loss(u[r * b:(r + 1) * b], v[r * b:(r + 1) * b], t, c)
               for r in range(runs))
    expected = torch.autograd.grad(each, (u, t, c))
    torch.testing.assert_close(batched, each, rtol=1e-6, atol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # One loss over all rows would differ: the runs' pairs would be each other's negatives.
    assert abs(float(sigmoid_loss(u, v, t, c).detach() - each.detach())) > 1e-3


def test_batched_runs_stand_in_does_the_library_steps_work(monkeypatch):
    # Per method, the components the benchmark times are the phases `train_learner` runs,
    # with the same FLOPs per step at K = 1, and K times them at K runs (at most).
    import torch

    from jestkit.data import load_digits_web
    from jestkit.demo import DEMO_MAX_TEXT_LEN, DemoConfig, learner_configs
    from jestkit.flops import count_flops
    from jestkit.models import DualEncoder
    from jestkit.selection import ModelEmbeddings
    from jestkit.training import LearnerConfig, ReferenceConfig, model_config, train_learner

    module = _benchmark(monkeypatch, "batched_runs")
    cfg = dataclasses.replace(
        DemoConfig.quick(), learner=LearnerConfig(width=16, batch_size=8, n_chunks=4, steps=2),
        reference=ReferenceConfig(width=16, steps=2), flexi_multires_fraction=0.5)
    data = load_digits_web(cfg.data_seed, max_len=DEMO_MAX_TEXT_LEN)
    vocab = data.tokenizer.vocab_size
    reference = DualEncoder(model_config(cfg.reference, vocab), seed=1).eval()
    parts = module.method_parts(cfg)
    assert list(parts) == list(cfg.methods)
    assert any(c.startswith("train@") for p in parts.values() for c in p["components"])

    def embedder(batch):  # what the cache returns, computed (its FLOPs are not counted)
        with torch.no_grad():
            return ModelEmbeddings(*reference(batch.images, batch.tokens))

    for name, uses_cache, lc in learner_configs(cfg):
        lc = dataclasses.replace(lc, eval_every=lc.steps)
        kwargs = {}
        if lc.needs_reference:
            kwargs = ({"reference_embedder": embedder} if uses_cache
                      else {"reference": reference})
        ledger = train_learner(data, lc, **kwargs).cumulative_flops[-1]
        comps = parts[name]["components"]
        learner = DualEncoder(model_config(lc, vocab), seed=0)
        phase_of = {"train": "train", "learner_scoring": "learner_scoring",
                    "reference_scoring": "reference_scoring"}
        timed = {phase_of[c.split("@")[0]]: c for c in comps if c != "adamw"}
        assert {p for p, f in ledger.items() if f and p != "selection"} == set(timed), name
        assert (ledger["selection"] > 0) == (parts[name]["selector"] is not None), name
        for phase, comp in timed.items():
            one = count_flops(module._component(comp, 1, cfg, data, learner, reference))
            assert one * lc.steps == ledger[phase], (name, comp)
            three = count_flops(module._component(comp, 3, cfg, data, learner, reference))
            coarse = cfg.flexi_score_patch_size
            if f"@{coarse}" in comp:
                # At a coarse patch the kernel is resized once per call, whatever the rows
                # (at this width `uses_downsample` is False): the stand-in does it once for
                # K runs, which would each do it. In the route's favour.
                assert not learner.image.patch_embed.uses_downsample(coarse)
                assert one < three < 3 * one, (name, comp)
            else:
                assert three == 3 * one, (name, comp)


def test_batched_runs_end_to_end(monkeypatch, tmp_path):
    module = _benchmark(monkeypatch, "batched_runs")
    doc, raw = tmp_path / "doc.md", tmp_path / "raw.json"
    doc.write_text("prose\n<!-- batched_runs:start -->\nold\n<!-- batched_runs:end -->\n")
    assert module.main(["--quick", "--steps", "1000", "12000", "--out", str(doc),
                        "--json", str(raw)]) == 0
    res = json.loads(raw.read_text())
    assert res["runs"] == [1, 2]
    assert res["block_check"]["max_abs_diff"] < 1e-5  # the real vmap computes the model
    for comp, by_k in res["per_run_s"].items():
        assert set(by_k) == ({"1"} if comp.startswith("selection:") else {"1", "2"}), comp
        assert all(s > 0 for s in by_k.values())
    short, long = res["demos"]
    assert 0 < short["best_s"] < short["k1_s"] and long["k1_s"] > short["k1_s"]
    text = doc.read_text()
    assert text.startswith("prose\n<!-- batched_runs:start -->\nCommand: ") and "old" not in text
    assert "| 12,000 |" in text


def test_batched_runs_prices_a_step_and_the_demo_from_its_parts(monkeypatch):
    # Hand-made part times (seconds per run): today's step is every part at K = 1 with its
    # selection; the best case each part at its fastest K, the selection free, and the live
    # reference's forward once per seed for all the methods that share it.
    module = _benchmark(monkeypatch, "batched_runs")
    res = {"seeds": 2, "methods": {
        "uniform": {"components": ["train", "adamw"], "selector": None},
        "a": {"components": ["train", "adamw", "learner_scoring@8", "reference_scoring"],
              "selector": ["learnability", "joint"]},
        "b": {"components": ["train", "adamw", "reference_scoring"],
              "selector": ["easy_reference", "joint"]}},
        "per_run_s": {"train": {1: 4.0, 3: 2.0}, "adamw": {1: 1.0, 3: 0.5},
                      "learner_scoring@8": {1: 8.0, 3: 6.0},
                      "reference_scoring": {1: 5.0, 3: 3.0},
                      "selection:learnability-joint": {1: 2.0},
                      "selection:easy_reference-joint": {1: 1.0}}}
    assert module.step_seconds(res, "a", best=False) == 4 + 1 + 8 + 5 + 2
    assert module.step_seconds(res, "a", best=True) == 2 + 0.5 + 6 + 3
    assert module.step_seconds(res, "uniform", best=True) == 2.5
    # Per step: 5 + 20 + 11 today; 2.5 + 11.5 + 5.5 - 3 (b shares a's reference forward).
    assert module.demo_steps_seconds(res, steps=10, workers=2, best=False) == 36 * 2 * 10 / 2
    assert module.demo_steps_seconds(res, steps=10, workers=2, best=True) == 16.5 * 2 * 10 / 2


def test_gpu_check_compares_devices_and_says_when_there_is_no_cuda(monkeypatch, capsys):
    import torch
    module = _benchmark(monkeypatch, "gpu_check")
    cpu = torch.device("cpu")
    # CPU against CPU: no difference, the same learnability selections.
    assert module.agreement(cpu) == 0.0
    assert "learnability selection: the same on cpu and cuda in 5/5 draws" in \
        capsys.readouterr().out
    # A second copy that differs (one weight nudged) is found; so is a NaN, which max()
    # would drop.
    built = []

    def nudged(cfg, seed=0):
        model = module_dual_encoder(cfg, seed=seed)
        built.append(model)
        if len(built) == 2:  # the copy `agreement` moves to the device under test
            with torch.no_grad():
                model.image.head.weight[0, 0] += 0.5
        return model
    module_dual_encoder = module.DualEncoder
    monkeypatch.setattr(module, "DualEncoder", nudged)
    assert module.agreement(cpu) > module.TOLERANCE
    monkeypatch.undo()
    assert module._diff(torch.tensor([0.0]), torch.tensor([float("nan")])) == float("inf")
    # Exit codes: 2 without CUDA (said), 1 when a check fails.
    module = _benchmark(monkeypatch, "gpu_check")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert module.main([]) == 2
    assert "needs CUDA" in capsys.readouterr().err
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake")
    monkeypatch.setattr(module, "selection_table", lambda dev, sizes: True)
    monkeypatch.setattr(module, "agreement", lambda dev: 1.0)
    assert module.main([]) == 1
    monkeypatch.setattr(module, "agreement", lambda dev: 0.0)
    assert module.main([]) == 0
    monkeypatch.setattr(module, "selection_table", lambda dev, sizes: False)  # held N x N
    assert module.main([]) == 1


def test_corruption_readability_reads_each_kind_as_it_is_made(monkeypatch, capsys):
    # The pool's corrupted pairs count as noise; how readable each corruption leaves the
    # digit is measured, not assumed (docs/results.md, "How noisy is a corrupted image?").
    module = _benchmark(monkeypatch, "corruption_readability")
    assert module.main(["--seeds", "0"]) == 0
    rows = {}
    for line in capsys.readouterr().out.splitlines()[2:]:
        name, seed0, mean = [cell.strip() for cell in line.strip("|").split("|")]
        assert seed0 == mean  # one seed: its mean is itself
        rows[name] = float(seed0.rstrip("%"))
    assert list(rows) == ["test clean", "test gaussian_noise", "test blank", "test occlusion",
                          "pool clean", "pool corrupt_image"]
    assert rows["test blank"] == 10.0  # every blank image is the same: one class of ten
    assert rows["test clean"] > 75 and rows["pool clean"] > 75
    assert 10 < rows["test occlusion"] < rows["test gaussian_noise"] < rows["test clean"] - 15
    assert rows["pool corrupt_image"] < rows["pool clean"] - 40
    with pytest.raises(SystemExit):
        module.main(["--seeds", "-1"])
    assert "--seeds must be in [0, 4294967295]" in capsys.readouterr().err


@pytest.fixture(scope="module")
def tiny_demo(tmp_path_factory):
    """A finished tiny demo (24 steps evaluated every 8, two seeds, cached and Flexi runs):
    what benchmarks/first_crossing.py retrains parts of."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        module = _benchmark(monkeypatch, "first_crossing", "bench_first_crossing_fixture")
        return module._quick_run(tmp_path_factory.mktemp("first_crossing"))
    finally:
        monkeypatch.undo()


def test_first_crossing_retrains_the_saved_runs_prefix_and_finds_the_first_crossing(
        tiny_demo, monkeypatch):
    module = _benchmark(monkeypatch, "first_crossing")
    report = json.loads((tiny_demo / "report.json").read_text())
    target = report["methods"]["uniform"]["target_accuracy"]
    methods = ["learnability-joint-cached", "learnability-joint-flexi"]
    res = module.run(tiny_demo, methods, 20, 2, workers=1)
    uniform = json.loads((tiny_demo / "runs" / "uniform.json").read_text())
    uniform_flops = statistics.fmean(sum(r["cumulative_flops"][-1].values()) for r in uniform)
    for name in methods:
        r = res["methods"][name]
        saved = json.loads((tiny_demo / "runs" / f"{name}.json").read_text())
        assert r["steps"] == list(range(2, 21, 2)) and r["seeds"] == [0, 1]
        # The demo's grid (8, 16, 24) up to step 20: two shared steps per seed, all equal.
        assert r["shared_evaluations_checked"] == 4
        for i, step in enumerate(r["steps"]):  # the seed mean of what was retrained
            if step in (8, 16):
                j = saved[0]["steps"].index(step)
                assert r["zero_shot_accuracy"][i] == pytest.approx(statistics.fmean(
                    s["zero_shot_accuracy"][j] for s in saved), abs=1e-12)
        # Slow version of the crossing: the first grid step whose seed mean reaches the target.
        per_seed = r["per_seed_zero_shot_accuracy"]
        slow = [step for i, step in enumerate(r["steps"])
                if sum(seed[i] for seed in per_seed) / len(per_seed) >= target - 1e-6]
        assert r["step"] == (slow[0] if slow else None)
        if r["demo_step"] is not None and r["demo_step"] <= 20:
            assert r["step"] is not None and r["step"] <= r["demo_step"]  # finer: never later
        if r["step"] is not None:
            assert r["iteration_speedup"] == pytest.approx(24 / r["step"])
            # Every step of a run costs the same FLOPs, so by the crossing it has spent
            # step / T of what the saved run spent in all.
            spent = statistics.fmean(sum(s["cumulative_flops"][-1].values()) for s in saved)
            assert r["compute_speedup"] == pytest.approx(uniform_flops / (spent * r["step"] / 24),
                                                         rel=1e-9)
        assert r["demo_iteration_speedup"] == report["methods"][name]["iteration_speedup"]
    assert all(res["methods"][name]["step"] is not None for name in methods)  # checked above
    text = module.markdown(res, "cmd", compare_to="learnability-joint-cached")
    assert "| learnability-joint-flexi | " in text and "(8 in all)" in text
    assert "- learnability-joint-flexi, every 2: " in text


def test_first_crossing_refuses_a_retraining_that_is_not_the_saved_run(tiny_demo, tmp_path,
                                                                        monkeypatch):
    import shutil

    module = _benchmark(monkeypatch, "first_crossing")
    run = tmp_path / "demo"
    shutil.copytree(tiny_demo, run)
    path = run / "runs" / "learnability-joint-cached.json"
    saved = json.loads(path.read_text())
    saved[1]["zero_shot_accuracy"][1] += 0.001  # seed 1 at step 16
    path.write_text(json.dumps(saved))
    with pytest.raises(SystemExit, match="learnability-joint-cached seed 1 at step 16: "):
        module.run(run, ["learnability-joint-cached"], 16, 4, workers=1)


@pytest.mark.parametrize("argv, message", [
    ([], "give --run DIR (a finished demo) or --quick"),
    (["--quick", "--run", "x"], "give --run DIR (a finished demo) or --quick"),
    (["--run", "no-such-dir"], "--run no-such-dir: not a directory"),
    (["--run", "empty"], "no demo_config.json; give a finished `jestkit demo` directory"),
    (["--eval-every", "3"], "--eval-every must divide the demo's evaluation interval (8 steps)"),
    (["--eval-every", "0"], "--eval-every must divide"),
    (["--steps", "25", "--eval-every", "1"], "--steps must be a multiple of --eval-every (1) "
                                             "in [1, 24] (T), got 25"),
    (["--steps", "6"], "--steps must be a multiple of --eval-every (4)"),
    (["--methods", "uniform"], "--methods ['uniform']: not learner methods of"),
    (["--methods", "nope"], "--methods ['nope']: not learner methods of"),
    (["--workers", "0"], "--workers must be in [1, 256], got 0"),
])
def test_first_crossing_refuses_bad_arguments_before_training(argv, message, tiny_demo,
                                                              tmp_path, monkeypatch, capsys):
    module = _benchmark(monkeypatch, "first_crossing")
    monkeypatch.setattr(module, "_run_one", lambda *a: pytest.fail("trained"))
    (tmp_path / "empty").mkdir()
    argv = [{"x": str(tiny_demo), "empty": str(tmp_path / "empty")}.get(a, a) for a in argv]
    if "--run" not in argv and "--quick" not in argv and argv:
        argv = ["--run", str(tiny_demo), "--eval-every", "4", *argv]
    with pytest.raises(SystemExit) as info:
        module.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_first_crossing_needs_steps_for_a_method_that_never_crossed(tiny_demo, tmp_path,
                                                                    monkeypatch):
    import shutil

    module = _benchmark(monkeypatch, "first_crossing")
    run = tmp_path / "demo"
    shutil.copytree(tiny_demo, run)
    report = json.loads((run / "report.json").read_text())
    report["methods"]["learnability-joint-flexi"]["step_reaching_target"] = None
    (run / "report.json").write_text(json.dumps(report))
    with pytest.raises(SystemExit, match=r"never reached the target on the demo's grid; give "
                                         r"--steps \(up to T = 24\)"):
        module.run(run, ["learnability-joint-flexi"], None, 4, workers=1)


def test_first_crossing_checks_where_its_results_go_before_training(tiny_demo, tmp_path,
                                                                    monkeypatch, capsys):
    module = _benchmark(monkeypatch, "first_crossing")
    monkeypatch.setattr(module, "run", lambda *a: pytest.fail("trained before the check"))
    doc, earlier = tmp_path / "results.md", tmp_path / "earlier.json"
    doc.write_text("hand-written results, no markers\n")
    earlier.write_text("{}")
    for argv, message in ((["--out", str(doc)], "without the markers"),
                          (["--json", str(earlier)], "it exists; give a new path")):
        with pytest.raises(SystemExit) as info:
            module.main(["--run", str(tiny_demo), *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err
    assert doc.read_text() == "hand-written results, no markers\n"
    assert earlier.read_text() == "{}"


def test_first_crossing_names_a_missing_runs_file(tiny_demo, tmp_path, monkeypatch):
    import shutil

    module = _benchmark(monkeypatch, "first_crossing")
    run = tmp_path / "demo"
    shutil.copytree(tiny_demo, run)
    (run / "runs" / "learnability-joint-flexi.json").unlink()
    with pytest.raises(SystemExit, match=r"no runs/learnability-joint-flexi.json, the saved "
                                         r"runs of learnability-joint-flexi"):
        module.run(run, ["learnability-joint-cached"], 16, 4, workers=1)


def test_first_crossing_names_a_missing_reference_cache(tiny_demo, tmp_path, monkeypatch):
    import shutil

    module = _benchmark(monkeypatch, "first_crossing")
    run = tmp_path / "demo"
    shutil.copytree(tiny_demo, run)
    shutil.rmtree(run / "reference_cache")
    with pytest.raises(SystemExit, match=r"no reference_cache/, which its cached and Flexi runs "
                                         r"read"):
        module.run(run, ["learnability-joint-cached"], 16, 4, workers=1)


def test_first_crossing_trains_a_method_the_demo_did_not_run_as_it_retrains_a_saved_one(
        tiny_demo, tmp_path, monkeypatch):
    """A demo method the demo left out is trained on every seed with the demo's config,
    reference and cache: the very runs that retraining it gives where the demo did run it
    (and there they are checked against the saved runs), reported as not run by the demo."""
    import shutil

    module = _benchmark(monkeypatch, "first_crossing")
    name, flexi = "learnability-joint-cached", "learnability-joint-flexi"
    run = tmp_path / "demo"
    shutil.copytree(tiny_demo, run)
    cfg = json.loads((run / "demo_config.json").read_text())
    cfg["methods"] = [m for m in cfg["methods"] if m != name]
    (run / "demo_config.json").write_text(json.dumps(cfg))
    (run / "runs" / f"{name}.json").unlink()
    report = json.loads((run / "report.json").read_text())
    del report["methods"][name]
    (run / "report.json").write_text(json.dumps(report))

    checked = module.run(tiny_demo, [name, flexi], 20, 2, workers=1, compare_to=name)
    got = module.run(run, [name, flexi], 20, 2, workers=1, compare_to=name)
    a, b = checked["methods"][name], got["methods"][name]
    assert a["step"] is not None  # so the FLOPs spent by then are compared below
    assert a["in_demo"] and not b["in_demo"]
    assert a["shared_evaluations_checked"] == 4 and b["shared_evaluations_checked"] == 0
    assert b["saved_seeds"] == [] and b["seeds"] == a["seeds"] == [0, 1]
    assert b["demo_step"] is None and b["demo_iteration_speedup"] is None
    for key in ("steps", "per_seed_zero_shot_accuracy", "step", "per_seed_step",
                "iteration_speedup", "compute_speedup", "learner_config"):
        assert b[key] == a[key], key
    assert got["methods"][flexi] == checked["methods"][flexi]  # still checked: the same runs
    assert got["methods"][flexi]["shared_evaluations_checked"] == 4
    md = module.markdown(got, "cmd", compare_to=name)
    assert f"| {name} | not run by the demo | – | – | " in md
    assert (f"{name} was not run by the demo: trained here on every seed, with the demo's "
            f"config and reference (and its cache)") in md
    assert "trained here only (--extra-seeds" not in md  # its seeds are not extra seeds
    assert f"- {flexi}, demo grid: not both run by the demo" in md
    assert f"- {flexi}, every 2: " in md

    with pytest.raises(SystemExit, match=r"the demo did not run them, so it has no crossing "
                                         r"to retrain up to; give --steps \(up to T = 24\)"):
        module.run(run, [name], None, 4, workers=1)
    with pytest.raises(SystemExit, match=r"--reuse \['learnability-joint-cached'\]: the demo "
                                         r"did not run them"):
        module.run(run, [name], 16, 4, workers=1, reuse={name: tmp_path / "earlier.json"})


def test_first_crossing_trains_live_jest_beside_a_flexi_only_demo_with_extra_seeds(
        tiny_demo, tmp_path, monkeypatch):
    """The intended use: live JEST, which the demo did not run, set against its Flexi runs,
    with extra seeds: live gets the demo's seeds and the extra ones, reads no cache, and only
    the extra seeds are called extra."""
    module = _benchmark(monkeypatch, "first_crossing")
    live, flexi = "learnability-joint", "learnability-joint-flexi"
    calls, real_pool = [], module.worker_pool

    def pool_that_records(workers):  # the runs go to worker processes: record what is sent
        pool = real_pool(workers)
        submit = pool.submit

        def record(fn, data_seed, reference, cache, lc, views):
            calls.append((lc.method, lc.score_patch_size, lc.seed, cache is not None))
            return submit(fn, data_seed, reference, cache, lc, views)

        pool.submit = record
        return pool

    monkeypatch.setattr(module, "worker_pool", pool_that_records)
    got = module.run(tiny_demo, [live, flexi], 8, 4, workers=1, extra_seeds=1,
                     compare_to=live)
    assert got["methods"][live]["seeds"] == got["methods"][flexi]["seeds"] == [0, 1, 2]
    assert got["methods"][live]["shared_evaluations_checked"] == 0
    assert got["methods"][flexi]["shared_evaluations_checked"] == 2  # step 8, seeds 0 and 1
    assert got["methods"][flexi]["bootstrap"]["n_seeds"] == 3  # set against live
    flexi_patch = json.loads((tiny_demo / "demo_config.json").read_text())[
        "flexi_score_patch_size"]
    assert calls == [("learnability", 0, s, False) for s in (0, 1, 2)] + [
        ("learnability", flexi_patch, s, True) for s in (0, 1, 2)]
    md = module.markdown(got, "cmd")
    assert "seed 2 was trained here only (--extra-seeds" in md
    assert (f"{live} was not run by the demo: trained here on every seed, with the demo's "
            f"config and reference, and nothing saved") in md


def test_first_crossing_refuses_a_method_the_demo_did_not_run_with_nothing_to_check(
        tiny_demo, tmp_path, monkeypatch):
    import shutil

    module = _benchmark(monkeypatch, "first_crossing")
    monkeypatch.setattr(module, "_run_one", lambda *a: pytest.fail("trained"))
    live, cached = "learnability-joint", "learnability-joint-cached"
    with pytest.raises(SystemExit, match=r"--methods \['learnability-joint'\]: the demo did "
                                         r"not run them; also retrain a method it did run"):
        module.run(tiny_demo, [live], 8, 4, workers=1)
    with pytest.raises(SystemExit, match=r"name each method once"):
        module.run(tiny_demo, [live, cached, live], 8, 4, workers=1)
    run = tmp_path / "demo"
    shutil.copytree(tiny_demo, run)
    cfg = json.loads((run / "demo_config.json").read_text())
    cfg["methods"] = [m for m in cfg["methods"] if m != cached]
    (run / "demo_config.json").write_text(json.dumps(cfg))
    shutil.rmtree(run / "reference_cache")
    with pytest.raises(SystemExit, match=r"--methods \['learnability-joint-cached'\]: they "
                                         r"read the reference cache, which this demo did not "
                                         r"build"):
        module.run(run, [cached, "learnability-joint-flexi"], 8, 4, workers=1)


def _slow_paired_bootstrap(steps, curves, base, target, n_boot, seed):
    """The bootstrap written out one resample at a time with the report's own crossing rule
    (the same seed draw as the benchmark's: torch.randint on a generator seeded `seed`)."""
    import torch

    from jestkit.report import _first_reaching

    n = len(curves)
    g = torch.Generator().manual_seed(seed)
    draws = [list(range(n))] + torch.randint(n, (n_boot, n), generator=g).tolist()
    after = steps[-1] + (steps[-1] - steps[-2])

    def step(curve):
        i = _first_reaching(curve, target)
        return after if i is None else steps[i]

    def mean_curve(rows, pick):
        return [sum(rows[s][e] for s in pick) / len(pick) for e in range(len(steps))]

    curve_ratio, seed_ratio = [], []
    for pick in draws:
        curve_ratio.append(step(mean_curve(base, pick)) / step(mean_curve(curves, pick)) - 1)
        seed_ratio.append(statistics.fmean(step(base[s]) for s in pick)
                          / statistics.fmean(step(curves[s]) for s in pick) - 1)
    return curve_ratio, seed_ratio


def test_first_crossing_paired_bootstrap_matches_a_slow_one_resample_at_a_time(monkeypatch):
    module = _benchmark(monkeypatch, "first_crossing")
    rng = np.random.default_rng(3)
    steps = list(range(100, 2100, 100))
    # Noisy rising curves, 7 seeds, the method a little slower than the baseline.
    ramp = np.linspace(0.3, 0.95, len(steps))
    base = (ramp + rng.normal(0, 0.03, (7, len(steps)))).tolist()
    curves = (ramp - 0.02 + rng.normal(0, 0.03, (7, len(steps)))).tolist()
    out = module.paired_bootstrap(steps, curves, base, 0.85, n_boot=300, level=0.8, seed=5)
    slow_curve, slow_seed = _slow_paired_bootstrap(steps, curves, base, 0.85, 300, 5)
    # Averaged curves in blocks of 10 resamples instead of one block: the same numbers.
    monkeypatch.setattr(module, "BOOTSTRAP_BLOCK", 7 * len(steps) * 10)
    assert module.paired_bootstrap(steps, curves, base, 0.85, n_boot=300, level=0.8,
                                   seed=5) == out
    for key, slow in (("curve", slow_curve), ("mean_seed_step", slow_seed)):
        r = out[key]
        assert r["estimate"] == pytest.approx(slow[0], abs=1e-12)
        lo, hi = np.quantile(slow[1:], [0.1, 0.9])  # numpy's default: torch.quantile's linear
        assert r["interval"] == pytest.approx([lo, hi], abs=1e-12)
        assert r["median"] == pytest.approx(np.quantile(slow[1:], 0.5), abs=1e-12)
        assert r["share_below_minus_10pct"] == pytest.approx(
            np.mean(np.array(slow[1:]) < -0.1), abs=1e-12)
    # The estimates at moved targets: the slow version's all-seeds draw at those targets.
    assert [t["target"] for t in out["estimate_at_other_targets"]] == pytest.approx(
        [0.85 + d for d in module.TARGET_SHIFTS])
    for t in out["estimate_at_other_targets"]:
        slow_curve_t, slow_seed_t = _slow_paired_bootstrap(steps, curves, base, t["target"], 1, 5)
        assert t["curve"] == pytest.approx(slow_curve_t[0], abs=1e-12)
        assert t["mean_seed_step"] == pytest.approx(slow_seed_t[0], abs=1e-12)
    assert out["n_seeds"] == 7 and out["n_boot"] == 300


def test_first_crossing_paired_bootstrap_exact_cases(monkeypatch):
    module = _benchmark(monkeypatch, "first_crossing")
    steps = [100, 200, 300, 400, 500, 600, 700, 800]

    def step_curve(cross):  # 0 before the crossing, 1 from it on
        return [1.0 if s >= cross else 0.0 for s in steps]

    base = [step_curve(c) for c in (200, 300, 400, 200)]
    # The same curves: every resample gives exactly +0%.
    same = module.paired_bootstrap(steps, base, base, 0.5, n_boot=500)
    for key in ("curve", "mean_seed_step"):
        assert same[key]["estimate"] == 0 and same[key]["interval"] == [0, 0]
        assert same[key]["resamples_not_reaching"] == 0
    # Every seed crossing at twice the step: the mean crossing is exactly 2x later in every
    # resample (-50%), whatever seeds it draws.
    twice = [step_curve(2 * c) for c in (200, 300, 400, 200)]
    r = module.paired_bootstrap(steps, twice, base, 0.5, n_boot=500)["mean_seed_step"]
    assert r["estimate"] == pytest.approx(-0.5) and r["interval"] == pytest.approx([-0.5, -0.5])
    assert r["share_below_minus_10pct"] == 1
    # A seed that never reaches the target: no estimate, and the resamples that drew it are
    # counted (about 1 - (3/4)^4 = 68% of them).
    never = [step_curve(c) for c in (200, 300, 400)] + [[0.0] * len(steps)]
    r = module.paired_bootstrap(steps, never, base, 0.5, n_boot=4000, seed=1)["mean_seed_step"]
    assert r["estimate"] is None and r["interval"] is None
    assert 0.64 < r["resamples_not_reaching"] / 4000 < 0.72
    with pytest.raises(ValueError, match=r"must both be \[seeds >= 2, 8 evaluations\]"):
        module.paired_bootstrap(steps, base[:3], base, 0.5)
    with pytest.raises(ValueError, match="level must be in"):
        module.paired_bootstrap(steps, base, base, 0.5, level=1.0)


def test_first_crossing_paired_bootstrap_interval_covers_the_true_ratio(monkeypatch):
    """Statistical check of the interval: 15 seeds (what the docs' run used), each seed's
    first crossings for the two methods sharing a per-seed offset (as a seed's initialisation
    and data order would), plus each method's own noise, all from known distributions; 90%
    percentile intervals of the ratio of mean crossings. Over 2,000 repeats the interval holds
    the true ratio (the ratio of the two distributions' means) in 0.84-0.89 of them: a
    percentile bootstrap of a ratio of means at 15 draws under-covers a little (0.86-0.87
    measured in 2,000-repeat runs), and the band is about +-3 standard errors (0.0075). A 95%
    interval (~0.92) or a bootstrap that resampled the two methods' seeds independently
    (~0.997 here, since it ignores the shared offset) would fail it."""
    module = _benchmark(monkeypatch, "first_crossing")
    steps = list(range(100, 6100, 100))
    rng = np.random.default_rng(0)
    offsets = np.arange(-600, 700, 100)
    base_noise, method_noise = np.arange(-200, 300, 100), np.arange(-300, 400, 100)
    truth = ((2800 + offsets.mean() + base_noise.mean())
             / (3300 + offsets.mean() + method_noise.mean()) - 1)
    covered, repeats = 0, 2000
    for repeat in range(repeats):
        shared = rng.choice(offsets, 15)
        b = 2800 + shared + rng.choice(base_noise, 15)
        m = 3300 + shared + rng.choice(method_noise, 15)
        curves = [[1.0 if s >= c else 0.0 for s in steps] for c in m]
        base = [[1.0 if s >= c else 0.0 for s in steps] for c in b]
        lo, hi = module.paired_bootstrap(steps, curves, base, 0.5, n_boot=1000,
                                         seed=repeat)["mean_seed_step"]["interval"]
        covered += lo <= truth <= hi
    assert 0.84 <= covered / repeats <= 0.89


def test_first_crossing_extra_seeds_are_the_demos_config_at_the_next_seeds(
        tiny_demo, tmp_path, monkeypatch):
    """--extra-seeds trains seed 2 of the tiny two-seed demo: the very run a demo of that seed
    saves, and the saved seeds are still the only ones checked."""
    module = _benchmark(monkeypatch, "first_crossing")
    methods = ["learnability-joint-cached", "learnability-joint-flexi"]
    res = module.run(tiny_demo, methods, 24, 8, workers=1, extra_seeds=1,
                     compare_to="learnability-joint-cached", n_boot=200)
    cfg = module.DemoConfig.from_dict(json.loads((tiny_demo / "demo_config.json").read_text()))
    seed2 = tmp_path / "seed2"
    module.run_demo(dataclasses.replace(cfg, seeds=(2,)), seed2, workers=1,
                    show_progress=False)
    for name in methods:
        r = res["methods"][name]
        assert r["seeds"] == [0, 1, 2] and r["saved_seeds"] == [0, 1]
        assert r["shared_evaluations_checked"] == 6  # 3 evaluations x the 2 saved seeds
        demo2 = json.loads((seed2 / "runs" / f"{name}.json").read_text())[0]
        assert r["per_seed_zero_shot_accuracy"][2] == demo2["zero_shot_accuracy"]
    flexi = res["methods"]["learnability-joint-flexi"]
    assert flexi["bootstrap"]["compare_to"] == "learnability-joint-cached"
    assert flexi["bootstrap"]["n_seeds"] == 3
    assert "bootstrap" not in res["methods"]["learnability-joint-cached"]
    md = module.markdown(res, "cmd", "learnability-joint-cached")
    assert "seed 2 was trained here only" in md
    assert "paired bootstrap over 3 seeds (200 resamples" in md
    assert "- the two estimates at other targets: " in md


@pytest.mark.parametrize("argv, message", [
    (["--extra-seeds", "-1"], "--extra-seeds must be in [0, 100], got -1"),
    (["--compare-to", "learnability-joint"], "--compare-to learnability-joint: not among "
                                              "--methods"),
    (["--bootstrap", "10"], "--bootstrap must be in [100, 100000], got 10"),
])
def test_first_crossing_refuses_bad_seed_and_bootstrap_arguments_before_training(
        argv, message, tiny_demo, monkeypatch, capsys):
    module = _benchmark(monkeypatch, "first_crossing")
    monkeypatch.setattr(module, "_run_one", lambda *a: pytest.fail("trained"))
    with pytest.raises(SystemExit) as info:
        module.main(["--run", str(tiny_demo), "--eval-every", "4", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_first_crossing_refuses_extra_seeds_past_the_learners_range(tiny_demo, tmp_path,
                                                                    monkeypatch):
    import shutil

    from jestkit.training import MAX_SEED

    module = _benchmark(monkeypatch, "first_crossing")
    monkeypatch.setattr(module, "_run_one", lambda *a: pytest.fail("trained"))
    run = tmp_path / "demo"
    shutil.copytree(tiny_demo, run)
    cfg = json.loads((run / "demo_config.json").read_text())
    cfg["seeds"] = [MAX_SEED - 1, MAX_SEED]
    (run / "demo_config.json").write_text(json.dumps(cfg))
    with pytest.raises(SystemExit, match=rf"--extra-seeds 1 after the demo's seeds "
                                         rf"\[{MAX_SEED - 1}, {MAX_SEED}\]: seeds must be "
                                         rf"ints in \[0, {MAX_SEED}\]"):
        module.run(run, ["learnability-joint-cached"], 16, 4, workers=1, extra_seeds=1)


def test_first_crossing_reuse_gives_what_retraining_gives_without_retraining(
        tiny_demo, tmp_path, monkeypatch):
    """--reuse METHOD=JSON: a method's curves from an earlier run of the benchmark give the
    same results, compute speed-up and paired bootstrap as retraining it, and it is not
    retrained (only the other method's runs reach a worker)."""
    module = _benchmark(monkeypatch, "first_crossing")
    methods = ["learnability-joint-cached", "learnability-joint-flexi"]
    kwargs = dict(workers=1, extra_seeds=1, compare_to="learnability-joint-cached", n_boot=200)
    first = module.run(tiny_demo, methods, 24, 4, **kwargs)
    earlier = tmp_path / "earlier.json"
    earlier.write_text(json.dumps(first))
    trained, workers_started = [], []
    worker_pool = module.worker_pool

    class RecordingPool:  # what reaches a worker: (the learner's score patch, its seed)
        def __init__(self, n):
            workers_started.append(n)
            self.pool = worker_pool(n)

        def submit(self, fn, *args):  # _run_one(data_seed, reference, cache, cfg, views)
            trained.append((args[3].score_patch_size, args[3].seed))
            return self.pool.submit(fn, *args)

        def shutdown(self):
            self.pool.shutdown()

    monkeypatch.setattr(module, "worker_pool", RecordingPool)
    again = module.run(tiny_demo, methods, 24, 4, reuse={methods[0]: earlier}, **kwargs)
    flexi_patch = first["methods"][methods[1]]["learner_config"]["score_patch_size"]
    assert flexi_patch and trained == [(flexi_patch, 0), (flexi_patch, 1), (flexi_patch, 2)]
    for name in methods:
        a, b = first["methods"][name], again["methods"][name]
        assert {k: v for k, v in b.items() if k != "reused_from"} == a
    reused = again["methods"][methods[0]]
    assert reused["reused_from"] == str(earlier)
    assert reused["shared_evaluations_checked"] == 6  # 3 demo evaluations x 2 saved seeds
    md = module.markdown(again, "cmd", methods[0])
    assert f"learnability-joint-cached's curves are {earlier}'s (--reuse: not retrained" in md
    # Both reused: nothing trained, no worker pool started, the same numbers again.
    trained.clear()
    both = module.run(tiny_demo, methods, 24, 4, reuse={m: earlier for m in methods}, **kwargs)
    assert trained == [] and workers_started == [1]
    assert both["methods"][methods[1]]["bootstrap"] == first["methods"][methods[1]]["bootstrap"]


@pytest.fixture(scope="module")
def earlier_crossings(tiny_demo):
    """What the benchmark returns for the tiny demo's cached runs, to 16 every 4 steps."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        module = _benchmark(monkeypatch, "first_crossing", "bench_first_crossing_earlier")
        return module.run(tiny_demo, ["learnability-joint-cached"], 16, 4, workers=1)
    finally:
        monkeypatch.undo()


def _earlier_json(earlier_crossings, tmp_path, **change):
    """earlier_crossings, with `change` made (a value, or a function that edits in place),
    as an earlier --json of the benchmark."""
    import copy

    res = copy.deepcopy(earlier_crossings)
    r = res["methods"]["learnability-joint-cached"]
    for key, value in change.items():
        target = res if key in res else r
        if callable(value):
            value(target)
        else:
            target[key] = value
    path = tmp_path / "earlier.json"
    path.write_text(json.dumps(res))
    return path


def _bump_seed1_step8(r):
    r["per_seed_zero_shot_accuracy"][1][1] += 0.001  # grid 4, 8, 12, 16: step 8


def _other_lr(r):
    r["learner_config"]["lr"] *= 2


@pytest.mark.parametrize("change, message", [
    ({"steps": 12}, "its steps is 12, this run's 16; reuse only a run retrained alike"),
    ({"target_accuracy": 0.5}, "its target_accuracy is 0.5, this run's"),
    ({"seeds": [0]}, "was retrained there for seeds [0], this run's are [0, 1]"),
    ({"per_seed_zero_shot_accuracy": _bump_seed1_step8}, "seed 1 at step 8: accuracy"),
    ({"learner_config": _other_lr}, "learner config there differs in ['lr']"),
    ({"compute_speedup": 1.5}, "its compute speed-up was 1.5 there"),
    ({"per_seed_zero_shot_accuracy": lambda r: r.pop("per_seed_zero_shot_accuracy")},
     "has no ['per_seed_zero_shot_accuracy'] (written before --extra-seeds"),
])
def test_first_crossing_reuse_refuses_a_run_that_is_not_this_ones(change, message, tiny_demo,
                                                                  earlier_crossings, tmp_path,
                                                                  monkeypatch):
    module = _benchmark(monkeypatch, "first_crossing")
    path = _earlier_json(earlier_crossings, tmp_path, **change)
    if "compute_speedup" in change:  # refused after pricing, which needs the crossing
        assert json.loads(path.read_text())["methods"]["learnability-joint-cached"]["step"]
    monkeypatch.setattr(module, "_run_one", lambda *a: pytest.fail("trained"))
    with pytest.raises(SystemExit) as info:
        module.run(tiny_demo, ["learnability-joint-cached"], 16, 4, workers=1,
                   reuse={"learnability-joint-cached": path})
    assert f"--reuse learnability-joint-cached={path}: " in str(info.value)
    assert message in str(info.value)


def test_first_crossing_reuse_takes_a_config_recorded_before_score_view_as_augmented(
        tiny_demo, earlier_crossings, tmp_path, monkeypatch):
    # A JSON written before the option ran the default view; one that scored "stored" is
    # another method's run, and refused by name.
    module = _benchmark(monkeypatch, "first_crossing")
    monkeypatch.setattr(module, "_run_one", lambda *a: pytest.fail("trained"))
    method = "learnability-joint-cached"
    for view, refused in ((None, False), ("stored", True)):
        def change(r, view=view):
            del r["learner_config"]["score_view"]
            if view:
                r["learner_config"]["score_view"] = view
        path = _earlier_json(earlier_crossings, tmp_path, learner_config=change)
        if refused:
            with pytest.raises(SystemExit, match=r"learner config there differs in "
                                                 r"\['score_view'\]"):
                module.run(tiny_demo, [method], 16, 4, workers=1, reuse={method: path})
        else:
            got = module.run(tiny_demo, [method], 16, 4, workers=1, reuse={method: path})
            assert got["methods"][method]["step"] == earlier_crossings["methods"][method]["step"]


def test_first_crossing_reuse_prices_only_runs_whose_steps_cost_alike(tiny_demo,
                                                                     earlier_crossings,
                                                                     tmp_path, monkeypatch):
    import shutil

    module = _benchmark(monkeypatch, "first_crossing")
    saved = json.loads((tiny_demo / "runs" / "learnability-joint-cached.json").read_text())
    assert module.flops_per_step("m", saved) == pytest.approx(
        sum(saved[0]["cumulative_flops"][-1].values()) / 24, rel=1e-12)
    run = tmp_path / "demo"
    shutil.copytree(tiny_demo, run)
    path = run / "runs" / "learnability-joint-cached.json"
    first = saved[0]["cumulative_flops"][0]
    first[next(iter(first))] *= 1.01  # seed 0's first 8 steps dearer than the rest
    path.write_text(json.dumps(saved))
    earlier = _earlier_json(earlier_crossings, tmp_path)
    with pytest.raises(SystemExit, match="saved runs' FLOPs per step differ between steps or "
                                         "seeds"):
        module.run(run, ["learnability-joint-cached"], 16, 4, workers=1,
                   reuse={"learnability-joint-cached": earlier})


@pytest.mark.parametrize("argv, message", [
    (["--reuse", "learnability-joint-cached"], "give METHOD=JSON, each method once"),
    (["--reuse", "learnability-joint-cached=no-such.json"], "no-such.json is not a file"),
    (["--reuse", "learnability-joint-cached=E", "learnability-joint-cached=E"],
     "each method once"),
    (["--methods", "learnability-joint-flexi", "--reuse", "learnability-joint-cached=E"],
     "--reuse ['learnability-joint-cached']: not among --methods"),
    (["--methods", "learnability-joint-flexi", "--reuse", "learnability-joint-flexi=E"],
     "it holds no learnability-joint-flexi"),
])
def test_first_crossing_refuses_bad_reuse_arguments_before_training(argv, message, tiny_demo,
                                                                    earlier_crossings, tmp_path,
                                                                    monkeypatch, capsys):
    module = _benchmark(monkeypatch, "first_crossing")
    earlier = _earlier_json(earlier_crossings, tmp_path)
    monkeypatch.setattr(module, "_run_one", lambda *a: pytest.fail("trained"))
    argv = [a.replace("=E", f"={earlier}") for a in argv]
    with pytest.raises(SystemExit) as info:
        module.main(["--run", str(tiny_demo), "--eval-every", "4", "--steps", "16", *argv])
    assert info.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture
def scoring_agreement(monkeypatch):
    return _benchmark(monkeypatch, "scoring_agreement", "bench_scoring_agreement_fresh")


def test_scoring_agreement_compares_picks_under_the_same_draws(scoring_agreement):
    import torch

    from jestkit.selection import joint_select

    gen = torch.Generator().manual_seed(0)
    n, b, k = 60, 12, 4
    fine = torch.rand(n, n, generator=gen) * 3
    reference = torch.rand(n, n, generator=gen)
    other = fine + 0.8 * torch.randn(n, n, generator=gen)
    clean = torch.rand(n, generator=gen) < 0.5
    got = scoring_agreement.compare_selections(
        {"fine": fine, "same": fine.clone(), "shifted": fine + 3.0, "other": other},
        reference, b, k, draw_seed=5, is_clean=clean)
    assert got.keys() == {"fine", "same", "shifted", "other", "redrawn", "uniform"}
    for name in ("same", "shifted"):  # a constant added to every pair moves no pick
        assert got[name]["overlap"] == 1.0 and got[name]["value"] == got["fine"]["value"]
        assert got[name]["diag_r"] == pytest.approx(1.0)
        assert got[name]["pair_r"] == pytest.approx(1.0)
        assert got[name]["overlap_other_draws"] == got["redrawn"]["overlap"]
    # Each figure against a slow version: picks drawn again here on A = L - R, the block and
    # the correlation summed by hand, the learner's losses alone correlated.
    a_fine, a_other = fine - reference, other - reference

    def draw(a, seed):
        return joint_select(a, b, n_chunks=k, generator=torch.Generator().manual_seed(seed))

    picks, base = draw(a_other, 5), draw(a_fine, 5)
    value = sum(float(a_fine[i, j]) for i in picks.tolist() for j in picks.tolist()) / b
    assert got["other"]["value"] == pytest.approx(value, rel=1e-5)
    assert got["other"]["overlap"] == len(set(picks.tolist()) & set(base.tolist())) / b
    again = draw(a_other, 5 + 1_000_003)
    assert got["other"]["overlap_other_draws"] == len(set(again.tolist())
                                                      & set(base.tolist())) / b
    assert got["other"]["clean"] == pytest.approx(sum(bool(clean[i]) for i in picks) / b)
    off = [(i, j) for i in range(n) for j in range(n) if i != j]
    x = np.array([float(other[i, j]) for i, j in off])
    y = np.array([float(fine[i, j]) for i, j in off])
    assert got["other"]["pair_r"] == pytest.approx(statistics.correlation(x, y), abs=1e-6)
    assert 0.6 < got["other"]["pair_r"] < 0.85  # sd 3/sqrt(12) = 0.87 against noise 0.8
    assert got["fine"]["overlap"] == 1.0
    assert got["uniform"]["value"] == pytest.approx(
        scoring_agreement.uniform_value(a_fine, b))
    ref = sum(float(reference[i, j]) for i in picks.tolist() for j in picks.tolist()) / b
    assert got["other"]["reference"] == pytest.approx(ref, rel=1e-5)
    assert got["uniform"]["reference"] == pytest.approx(
        scoring_agreement.uniform_value(reference, b))


def test_scoring_agreement_weighted_learner_term_picks_on_w_l_minus_r(scoring_agreement):
    import torch

    from jestkit.selection import joint_select

    gen = torch.Generator().manual_seed(3)
    n, b, k = 40, 8, 4
    losses = {"fine": torch.rand(n, n, generator=gen) * 3,
              "coarse": torch.rand(n, n, generator=gen) * 3}
    reference = torch.rand(n, n, generator=gen) * 3
    scoring_agreement.add_weighted(losses, [0.5, 2.0])
    assert set(losses) == {"fine", "coarse", "coarse, learner ×0.5", "coarse, learner ×2"}
    got = scoring_agreement.compare_selections(losses, reference, b, k, draw_seed=7,
                                               is_clean=torch.ones(n, dtype=torch.bool))
    for weight in (0.5, 2.0):
        picks = joint_select(weight * losses["coarse"] - reference, b, n_chunks=k,
                             generator=torch.Generator().manual_seed(7))
        block = (losses["fine"] - reference)[picks][:, picks].sum().item() / b
        name = scoring_agreement.weighted_name(weight)
        assert got[name]["value"] == pytest.approx(block, rel=1e-5)
    # Counting the reference more (a small W) picks blocks it finds easier.
    assert got["coarse, learner ×0.5"]["reference"] < got["coarse, learner ×2"]["reference"]


def test_scoring_agreement_uniform_value_is_the_mean_over_every_sub_batch(scoring_agreement):
    import itertools

    import torch

    a = torch.randn(7, 7, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    for b in (1, 3, 7):
        blocks = [scoring_agreement._block_value(a, torch.tensor(s))
                  for s in itertools.combinations(range(7), b)]
        assert scoring_agreement.uniform_value(a, b) == pytest.approx(np.mean(blocks))


def test_scoring_agreement_redrawn_and_uniform_picks_overlap_by_chance(scoring_agreement):
    import torch

    # With no preference at all (A = 0), the picks are b of N at random: another draw and a
    # uniform draw share b/N of them on average. 400 super-batches: the mean overlap's
    # standard error is ~0.006 (one draw's ~0.11); tolerance 0.03, five of them.
    n, b = 50, 10
    zero = torch.zeros(n, n)
    clean = torch.arange(n) < n // 2
    over = {"redrawn": [], "uniform": []}
    for seed in range(400):
        got = scoring_agreement.compare_selections({"fine": zero, "coarse": zero}, zero, b, 2,
                                                   seed, clean)
        assert got["coarse"]["overlap"] == 1.0  # same draws, same (empty) preference
        assert np.isnan(got["coarse"]["diag_r"])  # nothing to correlate, and said so
        for name in over:
            over[name].append(got[name]["overlap"])
        over["redrawn"].append(got["coarse"]["overlap_other_draws"])
    for name, values in over.items():
        assert abs(np.mean(values) - b / n) < 0.03, (name, np.mean(values))


def test_scoring_agreement_gain_kept_and_its_interval(scoring_agreement):
    rng = np.random.default_rng(0)
    uniform = rng.normal(0, 1, 40)
    fine = uniform + rng.uniform(1, 2, 40)
    half = uniform + 0.5 * (fine - uniform)
    assert scoring_agreement.gain_kept(fine, fine, uniform) == pytest.approx(1.0)
    assert scoring_agreement.gain_kept(uniform, fine, uniform) == pytest.approx(0.0)
    assert scoring_agreement.gain_kept(half, fine, uniform) == pytest.approx(0.5)
    # Every resample of an exact half is a half; a noisy one's interval holds its estimate.
    assert scoring_agreement._interval(half, fine, uniform, 0) == pytest.approx((0.5, 0.5))
    noisy = half + rng.normal(0, 0.3, 40)
    low, high = scoring_agreement._interval(noisy, fine, uniform, 0)
    assert low < scoring_agreement.gain_kept(noisy, fine, uniform) < high
    assert high - low < 0.5
    # No gain to keep (fine no better than uniform): no ratio, not a sign-flipped one.
    assert scoring_agreement.gain_kept(half, uniform, uniform) is None
    assert scoring_agreement._interval(half, uniform, uniform, 0) is None
    summary = scoring_agreement.summarize(
        {"fine": {"value": list(uniform), "diag_r": [1.0, 1.0]},
         "coarse": {"value": list(half), "diag_r": [float("nan"), 0.5]},
         "uniform": {"value": list(uniform)}}, 0)
    assert summary["coarse"]["gain_kept"] is None and summary["coarse"]["gain_kept_90"] is None
    assert summary["coarse"]["diag_r"] == 0.5  # the mean of the finite ones
    assert scoring_agreement._num(None) == scoring_agreement._num(float("nan")) == "n/a"


def test_scoring_agreement_shrunk_image_path(scoring_agreement):
    import torch

    from jestkit.models import DualEncoder, DualEncoderConfig

    model = DualEncoder(DualEncoderConfig(vocab_size=20, image_width=16, text_width=8,
                                          patch_size=4, image_size=16), seed=0).eval()
    images = torch.rand(5, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    tokens = []
    model.image.blocks[0].register_forward_pre_hook(lambda mod, args: tokens.append(
        args[0].shape[1]))
    with torch.no_grad():
        fine = model.encode_image(images)
        # At the training patch size it is the model's own forward, bit for bit.
        assert torch.equal(scoring_agreement.shrunk_image_embeddings(model, images, 4), fine)
        shrunk = scoring_agreement.shrunk_image_embeddings(model, images, 8)
        coarse = model.encode_image(images, 8)
    assert tokens == [16, 16, 4, 4]  # the coarse scorings' token count, both ways
    assert shrunk.shape == fine.shape
    assert torch.allclose(shrunk.norm(dim=-1), torch.ones(5))
    assert not torch.allclose(shrunk, fine, atol=1e-3)
    assert not torch.allclose(shrunk, coarse, atol=1e-3)  # another way to 4 tokens


@pytest.mark.parametrize("view", ["augmented", "stored"])
@pytest.mark.parametrize("cached", [False, True])
def test_scoring_agreement_scores_and_picks_what_the_runs_selection_does(
        scoring_agreement, view, cached, tmp_path):
    # The analysis's fine scoring must be a live run's selection, its coarse scoring a Flexi
    # run's: the same images, reference embeddings and sampler, so the same picks.
    import torch

    from jestkit.cache import build_reference_cache
    from jestkit.data import SuperBatchSampler, load_digits_web
    from jestkit.flops import FlopLedger
    from jestkit.models import DualEncoder
    from jestkit.selection import JointSelector, ModelEmbeddings, joint_select
    from jestkit.training import (
        LearnerConfig,
        ReferenceConfig,
        _FlopMeter,
        _select,
        model_config,
        train_reference,
    )

    data = load_digits_web(0, max_len=8)
    reference, _ = train_reference(data, ReferenceConfig(steps=2, batch_size=16, width=16,
                                                         depth=1))
    cache = build_reference_cache(reference, data.pool, tmp_path / "c") if cached else None
    for score_patch, scoring in ((0, "fine"), (16, "coarse")):
        cfg = LearnerConfig(steps=2, batch_size=16, n_chunks=4, width=16, depth=1,
                            patch_size=8, score_patch_size=score_patch, score_view=view)
        learner = DualEncoder(model_config(cfg, data.tokenizer.vocab_size), seed=1).eval()
        batch = SuperBatchSampler(data.pool, cfg.super_batch_size, seed=4).next()
        embedder = cache.embeddings if cached else None
        picks = _select(batch, learner, cfg, JointSelector(batch_size=16, n_chunks=4),
                        torch.Generator().manual_seed(9), _FlopMeter(FlopLedger()),
                        None if cached else reference, embedder, data.pool)
        stored = data.pool.images[batch.indices]
        images = batch.images if view == "augmented" else stored
        if cached:
            ref = cache.embeddings(batch)
        else:
            with torch.no_grad():
                ref = ModelEmbeddings(*reference(images, batch.tokens))
        losses, r = scoring_agreement._score(learner, ref, images, stored, stored,
                                             batch.tokens, 16)
        mine = joint_select(losses[scoring] - r, 16, n_chunks=4,
                            generator=torch.Generator().manual_seed(9))
        assert torch.equal(mine, picks), (view, cached, scoring)
        # "fine, stored view" is what a run scoring the stored view scores at the fine patch.
        if view == "stored":
            torch.testing.assert_close(losses["fine, stored view"], losses["fine"], rtol=0,
                                       atol=1e-5)


def test_scoring_agreement_end_to_end(tmp_path):
    root = Path(__file__).resolve().parents[1]
    out, raw = tmp_path / "doc.md", tmp_path / "raw.json"
    out.write_text("prose\n<!-- sa:start -->\n<!-- sa:end -->\n")
    # A subprocess, as it is run: its spawned workers import the script by its own name.
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "scoring_agreement.py"),
                           "--quick", "--workers", "1", "--learners",
                           "learnability-joint-flexi", "--out", str(out), "--section", "sa",
                           "--json", str(raw), "--learner-weights", "0.5", "2"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    res = json.loads(raw.read_text())
    rows = {(r["step"], r["scoring"]): r for r in res["rows"]}
    assert set(rows) == {(s, name) for s in (10, 20) for name in
                         ("fine", "coarse", "shrunk image", "fine, shifted anew",
                          "fine, stored view", "redrawn", "uniform", "coarse, learner ×0.5",
                          "coarse, learner ×2")}
    assert res["learner_weights"] == [0.5, 2.0]
    assert {r["method"] for r in res["rows"]} == {"learnability-joint-flexi"}
    for step in (10, 20):
        fine, uniform = rows[step, "fine"], rows[step, "uniform"]
        assert fine["overlap"] == fine["gain_kept"] == 1.0
        assert fine["diag_r"] == pytest.approx(1.0)
        assert uniform["gain_kept"] == 0.0 and uniform["gain_kept_90"] is None
        coarse = rows[step, "coarse"]
        for weight in ("0.5", "2"):  # the same losses, scaled: correlated as the coarse ones
            weighted = rows[step, f"coarse, learner ×{weight}"]
            assert weighted["diag_r"] == pytest.approx(coarse["diag_r"])
            assert weighted["pair_r"] == pytest.approx(coarse["pair_r"])
        if coarse["gain_kept_90"] is not None:  # None: 20 steps may leave fine no gain
            low, high = coarse["gain_kept_90"]
            assert low <= coarse["gain_kept"] <= high
    # The same super-batches at every step: a uniform draw does not depend on the learner.
    assert rows[10, "uniform"]["clean"] == rows[20, "uniform"]["clean"]
    text = out.read_text()
    assert text.startswith("prose\n<!-- sa:start -->\nCommand: ")
    # The picks, the learner's scores, the reference's loss of the picks, the weighted terms.
    assert text.count("| learnability-joint-flexi | 20 | ") == 4
    assert "| gain kept: coarse | coarse, learner ×0.5 | coarse, learner ×2 | clean: fine |" in text
