"""The `jestkit` command line: flags reach what they set, bad input is a clear error (rc 2).

The commands' work (`run_demo`, `build_reference_cache`) is replaced by fakes that record
their arguments and stop, so these tests check the wiring without training anything.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from jestkit.cli import main
from jestkit.data import load_digits_web
from jestkit.demo import DemoConfig


@pytest.fixture
def fake_demo(monkeypatch):
    from jestkit import demo

    seen = {}

    def fake(cfg, out, **kwargs):
        seen.update(cfg=cfg, out=Path(out), **kwargs)
        raise ValueError("stop here")  # -> rc 2, nothing trained

    monkeypatch.setattr(demo, "run_demo", fake)
    return seen


def test_demo_flags_reach_run_demo(fake_demo, tmp_path, monkeypatch):
    assert main(["demo", "--quick", "--out", str(tmp_path / "o"), "--overwrite",
                 "--workers", "3", "--no-progress"]) == 2
    assert fake_demo["cfg"] == DemoConfig.quick() and fake_demo["out"] == tmp_path / "o"
    assert fake_demo["overwrite"] is True and fake_demo["workers"] == 3
    assert fake_demo["show_progress"] is False
    main(["demo", "--out", str(tmp_path / "o")])
    assert fake_demo["overwrite"] is False and fake_demo["cfg"] == DemoConfig()
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"seeds": [7]}))
    main(["demo", "--config", str(cfg), "--out", str(tmp_path / "o")])
    assert fake_demo["cfg"].seeds == (7,)
    monkeypatch.chdir(tmp_path)  # the default run directories
    main(["demo", "--quick"])
    assert fake_demo["out"] == Path("runs/demo-quick")
    main(["demo"])
    assert fake_demo["out"] == Path("runs/demo")
    assert fake_demo["resume"] is False and fake_demo["allow_other_code"] is False
    main(["demo", "--resume", "--allow-other-code"])
    assert fake_demo["resume"] is True and fake_demo["allow_other_code"] is True


def test_small_bad_inputs_found_in_review(fake_demo, tmp_path, monkeypatch, capsys):
    # A worker count the OS cannot give: argparse's error, not an OverflowError from SemLock.
    with pytest.raises(SystemExit) as info:
        main(["demo", "--workers", str(10**11)])
    assert info.value.code == 2 and "must be in [1, 256]" in capsys.readouterr().err
    # A binary --config: named, not a bare UnicodeDecodeError.
    binary = tmp_path / "c.json"
    binary.write_bytes(b"\x89PNG\xff\xfe")
    assert main(["demo", "--config", str(binary), "--out", str(tmp_path / "o")]) == 2
    assert f"--config {binary} is not valid JSON" in capsys.readouterr().err
    # Ctrl-C: the command has said what it kept; no traceback after that, exit status 130.
    from jestkit import demo

    def interrupted(cfg, out, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_demo", interrupted)
    assert main(["demo", "--quick", "--out", str(tmp_path / "o")]) == 130
    assert capsys.readouterr().err == "jestkit demo: interrupted\n"
    # A reference whose tensors do not fit its metadata: a ValueError naming the file.
    from safetensors.torch import load_file, save_file

    from jestkit.models import DualEncoder, load_model, save_model
    from jestkit.training import small_model
    path = tmp_path / "r.safetensors"
    save_model(DualEncoder(small_model(50, 16, 1)), path)
    import safetensors
    with safetensors.safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    state = load_file(str(path))
    state.pop(sorted(state)[0])
    save_file(state, str(path), metadata=metadata)
    with pytest.raises(ValueError, match="r.safetensors: its tensors do not fit the model"):
        load_model(path)


def test_allow_other_code_needs_resume(fake_demo, capsys):
    assert main(["demo", "--allow-other-code", "--out", "x"]) == 2
    assert "--allow-other-code only applies with --resume" in capsys.readouterr().err
    assert not fake_demo  # refused before run_demo


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "either --quick or --config"),  # with --quick
        ("[1, 2]", "must be a JSON object of fields"),
        ("{not json", "is not valid JSON"),
        # Found in review: json's parser recursed into a RecursionError traceback.
        ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply to read"),
        ('{"seeds": "x"}', "seeds must be a list of ints"),
        ('{"seeds": [1, true]}', r"seeds must be ints in \[0, 4294967295\], got \[1, True\]"),
        ('{"seeds": [-1]}', r"seeds must be ints in \[0, 4294967295\]"),
        # Found in review: an OverflowError in a worker, after the reference had trained.
        ('{"seeds": [4611686018427387904]}', r"seeds must be ints in \[0, 4294967295\]"),
        ('{"reference": {"seed": 4294967296}}',
         r"reference.seed must be in \[0, 4294967295\], got 4294967296"),
        ('{"methods": "uniform"}', "methods must be a list of names"),
        ("directory", "cannot read it"),
        # Wrong types and values name their field, and the block it is in.
        ('{"learner": {"lr": "1e-3"}}', "learner.lr must be a number, got '1e-3'"),
        ('{"learner": {"filter_ratio": "0.8"}}', "learner.filter_ratio must be a number"),
        ('{"learner": {"steps": true}}', "learner.steps must be an int, got True"),
        ('{"reference": {"steps": 0}}', "reference.steps must be a positive int, got 0"),
        ('{"learner": {"steps": 0}}', "learner.steps must be a positive int, got 0"),
        ('{"flexi_multires_fraction": "0.5"}', "flexi_multires_fraction must be a number"),
        ('{"flexi_score_patch_size": "16"}', "flexi_score_patch_size must be an int, got '16'"),
        ('{"data_seed": "x"}', "data_seed must be an int"),
        ('{"data_seed": -1}', r"data_seed must be in \[0, 4294967295\], got -1"),
        ('{"data_seed": 4294967296}', r"data_seed must be in \[0, 4294967295\], got 4294967296"),
        ('{"flexi_multires_fraction": 2.0}', r"flexi_multires_fraction must be in \[0, 1\]"),
        # Found in review: refused only as the runs were built, naming the learner's field.
        ('{"flexi_multires_fraction": 0.001}',
         r"flexi_multires_fraction=0.001 trains round\(learner.batch_size \* "
         r"flexi_multires_fraction\) = 0 of learner.batch_size=64 pairs"),
        ('{"flexi_multires_fraction": 0.5, "flexi_score_patch_size": 16}',
         "flexi_multires_fraction > 0 trains that share at flexi_score_patch_size, which "
         "equals learner.patch_size=16: one resolution"),
        ('{"flexi_multires_split": "first_drawn_fine"}',
         "flexi_multires_split='first_drawn_fine' applies only with flexi_multires_fraction > 0"),
        ('{"flexi_multires_fraction": 0.999}', r"= 64 of learner.batch_size=64 pairs.*"
         r"give a fraction in \[0.0156, 0.984\]"),
        ('{"methods": [["uniform"]]}', "methods must be a list of names"),
        # The learner block's method is set per run: one given there is refused, not ignored.
        ('{"learner": {"method": "uniform", "n_chunks": 100}}',
         r"learner.method is set per run from 'methods'.*got 'uniform'"),
        ('{"learner": {"n_chunks": 100}}', r"learner.n_chunks must be in \[1, batch_size=64\]"),
        # Sizes the data cannot serve: refused here, not in a worker after the reference.
        ('{"learner": {"batch_size": 4000}}',
         r"learner.batch_size must be in \[1, 3500\] \(digits-web's pool size\), got 4000"),
        ('{"learner": {"batch_size": 800}}',
         r"learner.batch_size / \(1 - learner.filter_ratio\) = 4000 \(the JEST methods' "
         r"super-batch\) exceeds digits-web's pool size 3500"),
        ('{"reference": {"batch_size": 501}}',
         r"reference.batch_size must be in \[1, 500\] \(digits-web's curated split\)"),
    ],
)
def test_demo_bad_config_is_a_clear_error_before_any_work(fake_demo, tmp_path, capsys,
                                                          content, message):
    # Found in review: a list, a directory or non-int seeds gave a traceback (the seeds one
    # only after ~20 s of training, from a worker).
    path = tmp_path / "c.json"
    if content == "directory":
        path.mkdir()
    else:
        path.write_text(content or "{}")
    argv = ["demo", "--config", str(path), "--out", str(tmp_path / "o")]
    assert main(argv + (["--quick"] if content is None else [])) == 2
    err = capsys.readouterr().err
    assert err.startswith("jestkit demo: error:") and re.search(message, err)
    assert "cfg" not in fake_demo  # refused before run_demo


def test_cache_reference_flags(monkeypatch, tmp_path, capsys):
    import jestkit.cache
    import jestkit.models

    seen = {}
    from types import SimpleNamespace

    reference = SimpleNamespace(config=SimpleNamespace(max_text_len=16))  # what the CLI reads
    monkeypatch.setattr(jestkit.models, "load_model", lambda path: reference)

    def fake(model, split, out, **kwargs):
        seen.update(split=split, out=out, **kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(jestkit.cache, "build_reference_cache", fake)
    argv = ["cache-reference", "--reference", "r.safetensors", "--out", str(tmp_path / "c"),
            "--no-progress"]
    assert main([*argv, "--split", "test", "--data-seed", "1", "--overwrite",
                 "--shard-size", "7"]) == 2
    assert torch.equal(seen["split"].ids, load_digits_web(1).test.ids)
    assert seen["overwrite"] is True and seen["shard_size"] == 7
    assert main(argv) == 2
    assert seen["overwrite"] is False and len(seen["split"]) == 3500
    assert seen["views"] == "stored"
    assert main([*argv, "--views", "shifts"]) == 2 and seen["views"] == "shifts"
    # Captions padded as the demo pads them, unless told otherwise: a cache is for one length.
    from jestkit.demo import DEMO_MAX_TEXT_LEN
    assert seen["split"].tokens.shape[1] == DEMO_MAX_TEXT_LEN
    assert main([*argv, "--max-len", "16"]) == 2 and seen["split"].tokens.shape[1] == 16
    capsys.readouterr()
    assert main([*argv, "--data-seed", "-1"]) == 2
    assert "--data-seed must be in [0, 4294967295], got -1" in capsys.readouterr().err
    seen.clear()
    assert main([*argv, "--max-len", "20"]) == 2  # longer than the reference takes
    assert "--max-len must be in [8, 16]" in capsys.readouterr().err and not seen
    # Found in review: checked only after the captions were padded to it (~28 GB for 1e6).
    import jestkit.data

    def no_data(*args, **kwargs):
        raise AssertionError("the data were built before --max-len was checked")

    monkeypatch.setattr(jestkit.data, "load_digits_web", no_data)
    assert main([*argv, "--max-len", str(10**15)]) == 2
    assert "--max-len must be in [8, 16]" in capsys.readouterr().err and not seen
    # Shorter than the longest caption would cut the digit out of captions, silently.
    assert main([*argv, "--max-len", "5"]) == 2
    assert "--max-len must be in [8, 16]" in capsys.readouterr().err and not seen
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    assert main([*argv[:3], "--out", str(afile), "--no-progress"]) == 2
    assert "exists and is not a directory" in capsys.readouterr().err
    assert afile.read_text() == "keep me" and not seen
    seen.clear()
    assert main([*argv, "--data", "laion"]) == 2
    assert "digits-web" in capsys.readouterr().err and not seen
    monkeypatch.undo()  # the real load_model, load_digits_web and build
    from jestkit.models import DualEncoder, save_model
    from jestkit.training import small_model
    save_model(DualEncoder(small_model(load_digits_web(0).tokenizer.vocab_size, 16, 1)),
               tmp_path / "r.safetensors")
    assert main(["cache-reference", "--reference", str(tmp_path / "r.safetensors"), "--out",
                 str(tmp_path / "c"), "--shard-size", str(10**20), "--no-progress"]) == 2
    assert "--shard-size must be in [1, 2147483647]" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before anything was written
    with pytest.raises(SystemExit) as info:
        main([*argv, "--shard-size", "0"])
    assert info.value.code == 2


def test_module_entry_point_exit_code(tmp_path):
    r = subprocess.run([sys.executable, "-m", "jestkit.cli", "cache-reference", "--reference",
                        str(tmp_path / "missing.safetensors"), "--out", str(tmp_path / "c")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "no model checkpoint" in r.stderr


@pytest.fixture
def demo_sees_sigterm(monkeypatch):
    """run_demo replaced by a fake that records the SIGTERM handler it runs under."""
    import signal

    from jestkit import demo

    seen = []

    def fake(cfg, out, **kwargs):
        seen.append(signal.getsignal(signal.SIGTERM))
        raise ValueError("stop here")

    monkeypatch.setattr(demo, "run_demo", fake)
    return seen


def test_sigterm_handler_is_installed_for_the_command_and_then_restored(demo_sees_sigterm,
                                                                       tmp_path):
    import signal

    from jestkit import cli

    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert main(["demo", "--quick", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert demo_sees_sigterm == [cli._exit_on_sigterm]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    with pytest.raises(SystemExit) as err:
        cli._exit_on_sigterm(signal.SIGTERM, None)
    assert err.value.code == 128 + signal.SIGTERM


def test_an_inherited_ignore_or_handler_for_sigterm_is_left_alone(demo_sees_sigterm, tmp_path):
    import signal

    def theirs(signum, frame):
        pass

    for inherited in (signal.SIG_IGN, theirs):
        previous = signal.signal(signal.SIGTERM, inherited)
        try:
            assert main(["demo", "--quick", "--out", str(tmp_path / "o"),
                         "--no-progress"]) == 2
            assert demo_sees_sigterm[-1] is inherited
            assert signal.getsignal(signal.SIGTERM) is inherited
        finally:
            signal.signal(signal.SIGTERM, previous)


def test_commands_run_outside_the_main_thread(demo_sees_sigterm, tmp_path):
    # Signal handlers can only be set in the main thread: elsewhere none is installed.
    import signal
    import threading

    codes = []
    thread = threading.Thread(target=lambda: codes.append(
        main(["demo", "--quick", "--out", str(tmp_path / "o"), "--no-progress"])))
    thread.start()
    thread.join()
    assert codes == [2] and demo_sees_sigterm == [signal.SIG_DFL]


def test_cache_reference_makes_the_cache_the_demo_reads_and_says_what_it_computed(
        tmp_path, capsys):
    # Found in review: the command padded captions to 16 tokens, the demo to 8, so the cache
    # the README's command made was refused by the demo's data.
    from jestkit.cache import ReferenceCache
    from jestkit.demo import _data
    from jestkit.models import DualEncoder, save_model
    from jestkit.training import small_model

    data = _data(0)  # the demo's data, as its workers load it
    model = DualEncoder(small_model(data.tokenizer.vocab_size, 16, 1), seed=0).eval()
    save_model(model, tmp_path / "ref.safetensors")
    out = tmp_path / "cache"
    argv = ["cache-reference", "--reference", str(tmp_path / "ref.safetensors"), "--out",
            str(out), "--no-progress"]
    assert main(argv) == 0
    assert "computed 7 of 7 shards" in capsys.readouterr().out
    ReferenceCache.open(out, split=data.pool, model=model).verify()
    shard = out / "shard_00003.npy"
    raw = bytearray(shard.read_bytes())
    raw[-5] ^= 0x10
    shard.write_bytes(bytes(raw))
    assert main(argv) == 0
    assert "computed 1 of 7 shards (shards 3: missing or failing" in capsys.readouterr().out
    assert main(argv) == 0
    assert "all 7 shards were there and verified; nothing computed" in capsys.readouterr().out
    # Another reference over the same data: refused, named, and the cache left as it was.
    before = {p.name: p.read_bytes() for p in sorted(out.iterdir())}
    save_model(DualEncoder(small_model(data.tokenizer.vocab_size, 16, 1), seed=1),
               tmp_path / "other.safetensors")
    argv[2] = str(tmp_path / "other.safetensors")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "model fingerprint" in err and "--overwrite" in err, err
    assert {p.name: p.read_bytes() for p in sorted(out.iterdir())} == before
    # The shifted views: another cache, told apart from this one and built beside it.
    argv[2] = str(tmp_path / "ref.safetensors")
    assert main([*argv, "--views", "shifts"]) == 2
    err = capsys.readouterr().err
    assert "views: cache has stored, expected shifts" in err and "--overwrite" in err, err
    argv[4] = str(tmp_path / "shifts")
    assert main([*argv, "--views", "shifts"]) == 0
    assert "3500 reference embeddings (dim 32, 25 shifted views each)" in \
        capsys.readouterr().out
    ReferenceCache.open(tmp_path / "shifts", split=data.pool, model=model,
                        views="shifts").verify()


def test_version_and_argument_type_errors(capsys):
    import jestkit

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and capsys.readouterr().out == f"jestkit {jestkit.__version__}\n"
    with pytest.raises(SystemExit) as info:
        main(["demo", "--workers", "abc"])
    assert info.value.code == 2
    assert "invalid worker count value: 'abc'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["cache-reference", "--reference", "r", "--out", "o", "--shard-size", "abc"])
    assert info.value.code == 2
    assert "invalid positive int value: 'abc'" in capsys.readouterr().err


def test_shard_lists_are_printed_as_runs():
    from jestkit.cli import _ranges

    assert _ranges([3]) == "3"
    assert _ranges([0, 2, 3, 4, 7]) == "0, 2-4, 7"
    assert _ranges(list(range(5, 35))) == "5-34"
