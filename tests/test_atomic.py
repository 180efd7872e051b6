"""Atomic writes of files and whole directories: old or new, never torn; errors keep the old."""

import os
import stat
from pathlib import Path

import pytest

from jestkit.atomic import (
    atomic_write,
    atomic_write_all,
    replacing_directory,
    set_aside_copy_of,
    unfinished_write,
)


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    path = tmp_path / "a.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_replacing_directory_puts_the_new_one_in_place(tmp_path):
    final = tmp_path / "run"
    final.mkdir()
    (final / "stale.txt").write_text("from the previous run")
    with replacing_directory(final) as tmp:
        assert tmp != final and tmp.parent == tmp_path
        assert (final / "stale.txt").exists()  # untouched while the new one is built
        (tmp / "report.json").write_text("{}")
    assert sorted(p.name for p in final.iterdir()) == ["report.json"]
    assert stat.S_IMODE(final.stat().st_mode) == 0o755
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no temp or old copy left


def test_replacing_directory_creates_missing_parents(tmp_path):
    final = tmp_path / "a" / "b"
    with replacing_directory(final) as tmp:
        (tmp / "x").write_text("1")
    assert (final / "x").read_text() == "1"


def test_replacing_directory_keeps_the_old_one_on_error(tmp_path):
    final = tmp_path / "ckpt"
    final.mkdir()
    (final / "model.safetensors").write_text("precious")
    with pytest.raises(RuntimeError, match="crash"):
        with replacing_directory(final) as tmp:
            (tmp / "model.safetensors").write_text("half")
            raise RuntimeError("crash while writing")
    assert (final / "model.safetensors").read_text() == "precious"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_replacing_directory_restores_the_old_one_if_the_swap_fails(tmp_path, monkeypatch):
    final = tmp_path / "run"
    final.mkdir()
    (final / "report.json").write_text("old")
    real_replace = os.replace

    def fail_second_rename(src, dst):
        if Path(src).name.startswith(".run.new."):
            raise OSError("disk trouble")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_second_rename)
    with pytest.raises(OSError, match="new contents are kept in") as info:
        with replacing_directory(final) as tmp:
            (tmp / "report.json").write_text("new")
    monkeypatch.undo()
    assert (final / "report.json").read_text() == "old"  # put back
    assert (tmp / "report.json").read_text() == "new"  # and the new results are not lost
    assert str(tmp) in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["run", tmp.name])


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, SystemExit])
@pytest.mark.parametrize("swapped", [False, True])
def test_an_interrupt_during_the_swap_stays_an_interrupt(tmp_path, monkeypatch, swapped,
                                                        interrupt):
    # SIGTERM (SystemExit from the command's handler) or Ctrl-C right at the swap: the old
    # directory is put back if the new one is not in place, and the interrupt is re-raised
    # as itself, not turned into an OSError.
    final = tmp_path / "run"
    final.mkdir()
    (final / "report.json").write_text("old")
    real_replace = os.replace

    def interrupted(src, dst):
        if Path(src).name.startswith(".run.new."):
            if swapped:
                real_replace(src, dst)
            raise interrupt
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(interrupt):
        with replacing_directory(final) as tmp:
            (tmp / "report.json").write_text("new")
    monkeypatch.undo()
    assert (final / "report.json").read_text() == ("new" if swapped else "old")
    assert [p.name for p in tmp_path.iterdir() if p.name != tmp.name] == ["run"]


def test_what_a_crash_leaves_is_recognised_by_name(tmp_path, monkeypatch):
    # The names the writers really use, caught at the moment a crash would leave them.
    import jestkit.atomic as atomic

    final = tmp_path / "step_0000004.v2"  # a dot in the name must not confuse the parse
    final.mkdir()
    left = {}
    with replacing_directory(final) as tmp:
        left["new"] = tmp
    real_rmtree = atomic.shutil.rmtree

    def keep_old(path, *args, **kwargs):  # the swap's last act: delete the set-aside copy
        left["old"] = Path(path)

    monkeypatch.setattr(atomic.shutil, "rmtree", keep_old)
    with replacing_directory(final):
        pass
    monkeypatch.setattr(atomic.shutil, "rmtree", real_rmtree)

    def fail(src, dst):
        left["tmp"] = Path(src)
        raise OSError("crash")

    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(OSError):
        atomic_write(tmp_path / "latest", "x")
    assert unfinished_write(left["new"]) and unfinished_write(left["tmp"])
    assert left["tmp"].name.startswith(".latest.")
    assert not unfinished_write(left["old"]) and not unfinished_write(final)
    assert set_aside_copy_of(left["old"]) == "step_0000004.v2"
    assert set_aside_copy_of(final) is None and set_aside_copy_of(left["new"]) is None
    assert not unfinished_write(tmp_path / "latest") and set_aside_copy_of("latest") is None


def test_atomic_write_fsyncs_the_data_before_the_rename(tmp_path, monkeypatch):
    # Found in review: deleting the fsync passed every test. The order is the promise: the
    # bytes are on disk before the name points at them, and the directory after.
    from jestkit import atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        kind = "dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file"
        events.append(("fsync", kind))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", Path(dst).name))
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic_write(tmp_path / "f", b"data")
    assert events == [("fsync", "file"), ("replace", "f"), ("fsync", "dir")]


def test_a_failed_write_leaves_no_temp_file(tmp_path, monkeypatch):
    # Found in review: deleting the unlink in the error path passed every test.
    from jestkit import atomic

    (tmp_path / "f").write_bytes(b"old")
    monkeypatch.setattr(atomic.os, "replace", lambda src, dst: (_ for _ in ()).throw(
        OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "f", b"new")
    assert os.listdir(tmp_path) == ["f"] and (tmp_path / "f").read_bytes() == b"old"


def test_atomic_write_all_replaces_none_when_one_write_fails(tmp_path, monkeypatch):
    # A full disk on the third of three files: the first two must not be replaced beside an
    # old third (the report's files are read together), and no temp file stays behind.
    from jestkit import atomic

    names = ["a.png", "report.json", "report.md"]
    for name in names:
        (tmp_path / name).write_text(f"old {name}")
    real_fsync, synced = os.fsync, []

    def fsync(fd):  # where a full disk shows on a buffered write: its flush and fsync
        synced.append(fd)
        if len(synced) == 3:
            raise OSError(28, "No space left on device")
        real_fsync(fd)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    with pytest.raises(OSError, match="No space left"):
        atomic_write_all({tmp_path / name: f"new {name}" for name in names})
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    assert all((tmp_path / name).read_text() == f"old {name}" for name in names)
    monkeypatch.undo()
    atomic_write_all({tmp_path / name: f"new {name}".encode() for name in names})
    assert sorted(os.listdir(tmp_path)) == sorted(names)
    assert all((tmp_path / name).read_text() == f"new {name}" for name in names)
    assert all(oct((tmp_path / name).stat().st_mode & 0o777) == "0o644" for name in names)


def test_atomic_write_all_writes_every_file_before_the_first_rename(tmp_path, monkeypatch):
    from jestkit import atomic

    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append("dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    def replace(src, dst):
        events.append(Path(dst).name)
        real_replace(src, dst)

    monkeypatch.setattr(atomic.os, "fsync", fsync)
    monkeypatch.setattr(atomic.os, "replace", replace)
    atomic_write_all({tmp_path / "x": b"1", tmp_path / "y": "2"})
    assert events == ["file", "file", "x", "y", "dir"]


def test_atomic_write_all_keeps_what_it_renamed_when_a_later_rename_fails(tmp_path):
    # A directory where the second file goes: the first is already replaced (whole), the
    # third is not, and no temp file is left, nor any renamed file deleted as a temp.
    (tmp_path / "b").mkdir()
    (tmp_path / "a").write_text("old a")
    (tmp_path / "c").write_text("old c")
    with pytest.raises(OSError):
        atomic_write_all({tmp_path / n: f"new {n}" for n in "abc"})
    assert (tmp_path / "a").read_text() == "new a" and (tmp_path / "c").read_text() == "old c"
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"] and not os.listdir(tmp_path / "b")
