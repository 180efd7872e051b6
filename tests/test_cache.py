"""The reference-embedding cache (BRIEF 4): it must never be silently wrong.

A mismatched cache (other data, other order, other model, other dim), an incomplete one, or a
damaged shard is refused with a CacheError saying what is wrong; an interrupted build (even a
SIGKILL) resumes to exactly the bytes of an uninterrupted one; lookups give the reference's
own embeddings in the query's order, memory-mapped; and selecting with cached embeddings picks
the very same sub-batches as selecting with the live reference.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch

import jestkit.cache as cache_mod
from jestkit.cache import (
    CacheError,
    ReferenceCache,
    build_reference_cache,
    data_fingerprint,
    model_identity,
)
from jestkit.data import Batch, SuperBatchSampler, load_digits_web
from jestkit.models import DualEncoder, load_model, save_model
from jestkit.selection import JointSelector, ModelEmbeddings
from jestkit.training import small_model

SUBSET = 600  # examples in the small cache used by the mismatch and damage tests
SHARD = 100  # -> 6 shards of the small cache
N_SHARDS = SUBSET // SHARD


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on 2 contended cores are ~10x faster single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def data():
    return load_digits_web(0)


@pytest.fixture(scope="module")
def config(data):
    return small_model(vocab_size=data.tokenizer.vocab_size, width=16, depth=1)


@pytest.fixture(scope="module")
def model(config):
    return DualEncoder(config, seed=0).eval()


@pytest.fixture(scope="module")
def split(data):
    """A fixed, shuffled subset of the pool (ids not in ascending order)."""
    perm = torch.randperm(len(data.pool), generator=torch.Generator().manual_seed(0))
    return data.pool.subset(perm[:SUBSET])


@pytest.fixture(scope="module")
def built(tmp_path_factory, model, split):
    """A complete cache of `split` (6 shards); tests copy it before touching it."""
    out = tmp_path_factory.mktemp("cache") / "ref"
    build_reference_cache(model, split, out, shard_size=SHARD)
    return out


@pytest.fixture
def cache_dir(built, tmp_path):
    out = tmp_path / "ref"
    shutil.copytree(built, out)
    return out


@pytest.fixture(scope="module")
def pool_cache(tmp_path_factory, model, data):
    """A cache of the whole pool (3,500 examples, 7 shards of 512)."""
    out = tmp_path_factory.mktemp("pool") / "ref"
    return build_reference_cache(model, data.pool, out, shard_size=512)


def snapshot(root: Path) -> dict:
    """name -> (bytes, inode, mtime) of every file in `root`."""
    return {p.name: (p.read_bytes(), p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(root.iterdir())}


def shard_files(root: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(root.glob("shard_*"))}


def as_interrupted(built: Path, out: Path) -> Path:
    """A copy of the cache `built` at `out` as an interrupted build leaves it: every shard
    written, the manifest not yet marked complete."""
    shutil.copytree(built, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return float((a - b).abs().max())


def expect_cache_error(fn, *fragments):
    with pytest.raises(CacheError) as info:
        fn()
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


# --- 1. manifest mismatch --------------------------------------------------------------------


def test_matching_cache_opens(cache_dir, split, model):
    cache = ReferenceCache.open(cache_dir, split=split, model=model)
    cache.verify()
    assert len(cache) == SUBSET and cache.embed_dim == 32
    assert cache.manifest["n_shards"] == N_SHARDS and cache.manifest["complete"] is True
    assert cache.manifest["data"] == data_fingerprint(split)
    assert cache.manifest["model"] == model_identity(model)
    np.testing.assert_array_equal(np.load(cache_dir / "ids.npy"), split.ids.numpy())


def test_other_subset_is_refused(cache_dir, split, model):
    other = split.subset(range(SUBSET - 1))  # one example fewer
    message = expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=other),
                                 "does not match", "data count", f"{SUBSET - 1}",
                                 "ids_sha256", "content_sha256")
    assert "order" not in message
    ReferenceCache.open(cache_dir, split=split.subset(range(SUBSET)), model=model)  # control
    swapped = split.subset(range(SUBSET))
    swapped.ids = swapped.ids.clone()
    swapped.ids[3] += 100_000  # same count, one id different
    message = expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=swapped),
                                 "ids_sha256", "content_sha256")
    assert "count" not in message and "order" not in message


def test_modified_image_is_refused(cache_dir, split):
    images = split.images.clone()
    images[SUBSET // 2, 0, 16, 16] += 1e-3  # one pixel of one example
    other = dataclasses.replace(split, images=images)
    message = expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=other),
                                 "does not match", "data content_sha256",
                                 "same ids, other images or captions")
    assert "count" not in message and "ids_sha256" not in message and "order" not in message
    tokens = split.tokens.clone()
    tokens[0, 0] = tokens[0, 0] % 5 + 1  # one token of one caption
    other = dataclasses.replace(split, tokens=tokens)
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=other), "content_sha256")
    # The same captions padded to another length are other data to the cache (found in
    # review: the CLI padded to 16, the demo to 8); the error says what that may be.
    other = dataclasses.replace(split, tokens=split.tokens[:, :8])
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=other), "content_sha256",
                       "captions padded to another length")


def test_same_ids_with_each_others_content_are_refused(cache_dir, split):
    # Found in review: no test bound an example's content to its id. Same ids, same order,
    # every image and caption moved to the next id: the same set of examples, but a lookup
    # by id would return another example's embedding.
    roll = torch.roll(torch.arange(len(split)), 1)
    moved = dataclasses.replace(split, images=split.images[roll], tokens=split.tokens[roll])
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=moved), "content_sha256")


def test_same_data_other_order_is_refused(cache_dir, split):
    perm = torch.randperm(SUBSET, generator=torch.Generator().manual_seed(1))
    message = expect_cache_error(
        lambda: ReferenceCache.open(cache_dir, split=split.subset(perm)),
        "does not match", "ids_sha256", "same examples, in another order")
    assert "content_sha256" not in message and "count" not in message
    swap_two = list(range(SUBSET))
    swap_two[10], swap_two[11] = 11, 10
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=split.subset(swap_two)),
                       "another order")


def test_other_model_is_refused(cache_dir, config, split):
    other = DualEncoder(config, seed=1)
    message = expect_cache_error(lambda: ReferenceCache.open(cache_dir, model=other),
                                 "does not match", "model fingerprint")
    assert "embed_dim" not in message
    nudged = DualEncoder(config, seed=0)
    with torch.no_grad():
        nudged.logit_bias += 1e-4  # one scalar weight
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=split, model=nudged),
                       "model fingerprint")


def test_other_embed_dim_is_refused(cache_dir, config):
    other = DualEncoder(dataclasses.replace(config, embed_dim=24), seed=0)
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, model=other),
                       "does not match", "model embed_dim", "24", "32", "model fingerprint")


def test_incomplete_cache_is_refused_then_resumed(tmp_path, built, model, split):
    out = tmp_path / "ref"

    def interrupt(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_reference_cache(model, split, out, shard_size=SHARD, progress=interrupt)
    assert json.loads((out / "manifest.json").read_text())["complete"] is False
    expect_cache_error(lambda: ReferenceCache.open(out), "incomplete")
    expect_cache_error(lambda: ReferenceCache.open(out, split=split, model=model), "incomplete")
    calls = []
    with mock.patch.object(model, "encode_image", wraps=model.encode_image) as enc:
        build_reference_cache(model, split, out, shard_size=SHARD,
                              progress=lambda d, t: calls.append(d))
    assert enc.call_count == N_SHARDS - 2  # the two finished shards were kept
    assert calls == list(range(1, N_SHARDS + 1))
    assert snapshot(out).keys() == snapshot(built).keys()
    for name in snapshot(out):
        assert (out / name).read_bytes() == (built / name).read_bytes(), name


def test_missing_cache_is_refused(tmp_path):
    expect_cache_error(lambda: ReferenceCache.open(tmp_path), "manifest.json")


def test_building_over_another_cache_is_refused(cache_dir, config, model, split):
    before = snapshot(cache_dir)
    other_model = DualEncoder(config, seed=1)
    other_data = split.subset(range(SUBSET - 50))
    for m, s, fragment in [(other_model, split, "fingerprint"),
                           (model, other_data, "count"),
                           (model, split.subset(range(SUBSET)[::-1]), "ids_sha256")]:
        expect_cache_error(lambda m=m, s=s: build_reference_cache(m, s, cache_dir,
                                                                  shard_size=SHARD),
                           "overwrite", fragment)
        assert snapshot(cache_dir) == before  # nothing deleted, rewritten or added
    ReferenceCache.open(cache_dir, split=split, model=model).verify()
    # With overwrite=True it is replaced by the new cache (and no stale shard survives).
    cache = build_reference_cache(other_model, other_data, cache_dir, shard_size=SHARD,
                                  overwrite=True)
    cache.verify()
    assert len(sorted(cache_dir.glob("shard_*.npy"))) == cache.manifest["n_shards"] == 6
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=split), "count")
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, model=model), "fingerprint")


def test_shards_without_a_manifest_are_refused_and_never_reused(cache_dir, config, split):
    # Found in review: with manifest.json deleted, a build with another model kept every shard
    # whose checksum verified, i.e. the old model's embeddings, and the cache then opened.
    (cache_dir / "manifest.json").unlink()
    before = snapshot(cache_dir)
    other = DualEncoder(config, seed=1).eval()
    expect_cache_error(lambda: build_reference_cache(other, split, cache_dir, shard_size=SHARD),
                       "no manifest.json", "overwrite")
    assert snapshot(cache_dir) == before
    cache = build_reference_cache(other, split, cache_dir, shard_size=SHARD, overwrite=True)
    image, text = cache.lookup(split.ids)
    with torch.no_grad():
        assert torch.equal(image, other.encode_image(split.images))
        assert torch.equal(text, other.encode_text(split.tokens))


def test_a_directory_that_holds_no_cache_is_never_written_into(tmp_path, model, split, capsys):
    # Found in review: a user's ids.npy was replaced without --overwrite, and --overwrite
    # deleted any file named shard_* (webdataset's shard_000000.tar, say).
    mine = tmp_path / "mine"
    mine.mkdir()
    np.save(mine / "ids.npy", np.arange(5))
    before = snapshot(mine)
    expect_cache_error(lambda: build_reference_cache(model, split, mine, shard_size=SHARD),
                       "holds cache files but no manifest.json", "overwrite")
    assert snapshot(mine) == before
    wds = tmp_path / "wds"
    wds.mkdir()
    for name in ("shard_000000.tar", "shard_000001.tar", "notes.txt"):
        (wds / name).write_text("data")
    before = snapshot(wds)

    def refused_with_or_without_overwrite(folder, listed):
        for overwrite in (False, True):
            expect_cache_error(lambda o=overwrite: build_reference_cache(
                model, split, folder, shard_size=SHARD, overwrite=o),
                f"holds no cache (no manifest.json): {listed}")

    refused_with_or_without_overwrite(wds, "notes.txt, shard_000000.tar")
    assert snapshot(wds) == before
    # Six-digit .npy shards are someone else's too (found in review: "holds cache files",
    # and --overwrite deleted them).
    npy = tmp_path / "npy"
    npy.mkdir()
    for k in range(3):
        np.save(npy / f"shard_{k:06d}.npy", np.arange(4))
    npy_before = snapshot(npy)
    refused_with_or_without_overwrite(npy, "shard_000000.npy")
    assert snapshot(npy) == npy_before
    # Files a file manager or git leaves in any directory do not make it someone's data.
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / ".gitkeep").write_text("")
    build_reference_cache(model, split, kept, shard_size=SHARD).verify()
    assert (kept / ".gitkeep").exists()
    # The command line says the same, by its own flags.
    from jestkit.cli import main

    ref = tmp_path / "reference.safetensors"
    save_model(model, ref)
    assert main(["cache-reference", "--reference", str(ref), "--out", str(wds),
                 "--overwrite", "--no-progress"]) == 2
    assert "holds no cache" in capsys.readouterr().err
    assert snapshot(wds) == before
    for flag, value, allowed in (("--data-seed", "4294967296", "[0, 4294967295]"),
                                 ("--shard-size", "3000000000", "[1, 2147483647]")):
        assert main(["cache-reference", "--reference", str(ref), "--out", str(tmp_path / "c"),
                     flag, value, "--no-progress"]) == 2
        assert f"{flag} must be in {allowed}, got {value}" in capsys.readouterr().err
    assert not (tmp_path / "c").exists()


def test_a_shard_stamped_by_another_build_is_recomputed(tmp_path, built, config, split):
    # An interrupted build of model B finds a shard (with its checksum sidecar) of model A:
    # the checksum verifies, but the stamp names A's build, so it is recomputed.
    other = DualEncoder(config, seed=1).eval()
    mine = tmp_path / "b"
    build_reference_cache(other, split, mine, shard_size=SHARD)
    want = shard_files(mine)
    manifest = json.loads((mine / "manifest.json").read_text())
    manifest["complete"] = False  # as if killed after the last shard
    (mine / "manifest.json").write_text(json.dumps(manifest))
    for name in ("shard_00002.npy", "shard_00002.npy.sha256"):
        shutil.copy(built / name, mine / name)
    assert shard_files(mine)["shard_00002.npy"] != want["shard_00002.npy"]
    build_reference_cache(other, split, mine, shard_size=SHARD).verify()
    assert shard_files(mine) == want


def test_a_shard_stamped_with_another_index_is_recomputed(tmp_path, built, model, split):
    # Found in review: no test read the index in the stamp. Shard 1 and its sidecar copied
    # to index 3 in an interrupted build verify by checksum and build; only the index says
    # they hold rows 100-199, not 300-399.
    out = as_interrupted(built, tmp_path / "ref")
    want = shard_files(built)
    for suffix in ("", ".sha256"):
        shutil.copy(built / f"shard_00001.npy{suffix}", out / f"shard_00003.npy{suffix}")
    cache = build_reference_cache(model, split, out, shard_size=SHARD)
    assert cache.computed_shards == [3]
    assert shard_files(out) == want


def test_building_a_complete_cache_again_leaves_it_alone(cache_dir, model, split):
    # No rewrite: a reader opening it meanwhile never sees it marked incomplete.
    before = snapshot(cache_dir)
    cache = build_reference_cache(model, split, cache_dir, shard_size=SHARD)
    cache.verify()
    assert snapshot(cache_dir) == before and cache.computed_shards == []


def test_a_build_says_which_shards_it_computed(tmp_path, model, split):
    out = tmp_path / "c"
    assert build_reference_cache(model, split, out, shard_size=SHARD).computed_shards == \
        list(range(N_SHARDS))
    (out / "shard_00004.npy").unlink()
    assert build_reference_cache(model, split, out, shard_size=SHARD).computed_shards == [4]
    assert ReferenceCache.open(out).computed_shards == []  # opening computes nothing


def test_an_unreadable_manifest_is_named_and_kept_until_overwrite(cache_dir, built, model,
                                                                  split):
    manifest = cache_dir / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])  # truncated
    before = snapshot(cache_dir)
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=split),
                       "manifest.json is not valid JSON")
    expect_cache_error(lambda: build_reference_cache(model, split, cache_dir, shard_size=SHARD),
                       "manifest.json is not valid JSON", "overwrite")
    assert snapshot(cache_dir) == before  # nothing touched without overwrite
    cache = build_reference_cache(model, split, cache_dir, shard_size=SHARD, overwrite=True)
    assert cache.computed_shards == list(range(N_SHARDS))
    assert shard_files(cache_dir) == shard_files(built)


@pytest.mark.parametrize("damage", ["no ids checksum", "short shard list", "data not an object",
                                    "data without its count", "model without embed_dim",
                                    "n_shards not the count's"])
def test_a_damaged_manifest_is_named_and_rebuilt_only_with_overwrite(cache_dir, built, model,
                                                                     split, damage):
    # Valid JSON that still matches the data and model, but lacks what a reader needs: a
    # CacheError naming the file (found in review: a KeyError, and --overwrite did not help).
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    if damage == "no ids checksum":
        del manifest["ids_sha256_file"]
    elif damage == "short shard list":
        manifest["shards"] = manifest["shards"][:-1]
    elif damage == "data not an object":
        manifest["data"] = "pool"
    elif damage == "data without its count":  # found in review: a KeyError at open
        del manifest["data"]["count"]
    elif damage == "model without embed_dim":
        del manifest["model"]["embed_dim"]
    else:
        manifest["n_shards"] += 1
    path.write_text(json.dumps(manifest))
    before = snapshot(cache_dir)
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=split), "manifest.json",
                       "damaged")
    expect_cache_error(lambda: build_reference_cache(model, split, cache_dir, shard_size=SHARD),
                       "damaged", "overwrite")
    assert snapshot(cache_dir) == before
    build_reference_cache(model, split, cache_dir, shard_size=SHARD, overwrite=True).verify()
    assert shard_files(cache_dir) == shard_files(built)
    assert path.read_bytes() == (built / "manifest.json").read_bytes()


def test_captions_longer_than_the_model_takes_are_refused_before_writing(tmp_path, model, data):
    from jestkit.data import load_digits_web as load

    long_captions = load(0, max_len=model.config.max_text_len + 4).pool
    with pytest.raises(ValueError, match=r"captions have 20 tokens, more than the model takes "
                                         r"\(max_text_len=16\)"):
        build_reference_cache(model, long_captions, tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_wrong_argument_types_and_an_out_dir_that_is_a_file(tmp_path, cache_dir, model,
                                                             split):
    with pytest.raises(TypeError, match="split must be a jestkit.data.Split"):
        ReferenceCache.open(cache_dir, split="pool")
    with pytest.raises(TypeError, match="split must be a jestkit.data.Split"):
        build_reference_cache(model, "pool", tmp_path / "x")
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        build_reference_cache(model, split, afile, shard_size=SHARD)
    assert afile.read_text() == "keep me"


def test_repeated_ids_are_refused(tmp_path, model, split):
    repeated = split.subset([0, 1, 2, 1])
    with pytest.raises(ValueError, match="ids must be unique"):
        build_reference_cache(model, repeated, tmp_path / "c", shard_size=SHARD)
    assert not (tmp_path / "c").exists()


def test_an_open_cache_checks_against_data_and_model_on_request(cache_dir, split, model,
                                                                 config):
    """ReferenceCache.check: what open(split=, model=) checks, for a cache already open
    (train_learner calls it with its data's pool)."""
    cache = ReferenceCache.open(cache_dir)
    cache.check(split=split, model=model)  # the data and model it was built from
    message = expect_cache_error(lambda: cache.check(split=split.subset(range(SUBSET - 1))),
                                 "does not match: data")
    assert "count" in message
    expect_cache_error(lambda: cache.check(model=DualEncoder(config, seed=1)),
                       "does not match: model")
    with pytest.raises(TypeError, match="split must be a jestkit.data.Split"):
        cache.check(split=split.ids)
    with pytest.raises(TypeError, match=r"model must be the reference DualEncoder .* got str"):
        cache.check(model="ref.safetensors")


def test_cli_refuses_a_cache_of_other_data(tmp_path, cache_dir, config, capsys):
    from jestkit.cli import main

    # The cache was built from a subset; the CLI's full pool is other data -> refused. (Another
    # model over the same data: test_cli.py, test_cache_reference_makes_the_cache_...)
    ckpt = tmp_path / "ref.safetensors"
    save_model(DualEncoder(config, seed=0), ckpt)
    before = snapshot(cache_dir)
    rc = main(["cache-reference", "--reference", str(ckpt), "--out", str(cache_dir),
               "--shard-size", str(SHARD), "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "overwrite" in err and "count" in err
    assert snapshot(cache_dir) == before


# --- 2. shard damage -------------------------------------------------------------------------


def data_offset(path: Path) -> int:
    """Byte offset where the array data of an .npy file starts."""
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


def rebuild_recomputes_only(out: Path, bad: int, model, split, built: Path) -> None:
    """Rebuilding recomputes shard `bad` alone and ends byte-identical to `built`."""
    stat = {k: (out / f"shard_{k:05d}.npy").stat() for k in range(N_SHARDS) if k != bad}
    with mock.patch.object(model, "encode_image", wraps=model.encode_image) as enc:
        cache = build_reference_cache(model, split, out, shard_size=SHARD)
    assert enc.call_count == 1  # one batch: shard_size <= batch_size
    assert cache.computed_shards == [bad]
    for k, st in stat.items():
        now = (out / f"shard_{k:05d}.npy").stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), k
    cache.verify()
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in built.iterdir())
    for p in built.iterdir():
        assert (out / p.name).read_bytes() == p.read_bytes(), p.name


@pytest.mark.parametrize("keep", ["empty", "half_header", "header_only", "half_data",
                                  "one_byte_short"])
def test_truncated_shard_is_named_at_open(cache_dir, built, model, split, keep):
    path = cache_dir / "shard_00002.npy"
    size, start = path.stat().st_size, data_offset(path)
    new_size = {"empty": 0, "half_header": start // 2, "header_only": start,
                "half_data": (start + size) // 2, "one_byte_short": size - 1}[keep]
    with open(path, "r+b") as f:
        f.truncate(new_size)
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=split, model=model),
                       "shard_00002.npy", "truncated")
    expect_cache_error(lambda: ReferenceCache.open(cache_dir), "shard_00002.npy")
    rebuild_recomputes_only(cache_dir, 2, model, split, built)


@pytest.mark.parametrize("edit", [(b"}", b" "), (b"'descr'", b"'descr "),
                                  (b"'<f4'", b"'|O' ")])
def test_damaged_shard_header_is_named_at_open_and_rebuilt(cache_dir, built, model, split,
                                                           edit):
    # A header numpy cannot parse makes it raise whatever its parser raised (tokenize's
    # TokenError for the brace; found in review: a traceback, and the build could not repair
    # it); an object dtype would need unpickling. Each is a CacheError naming the shard.
    path = cache_dir / "shard_00001.npy"
    raw = path.read_bytes()
    header = raw[:data_offset(path)]
    assert edit[0] in header and len(edit[0]) == len(edit[1])
    path.write_bytes(header.replace(edit[0], edit[1], 1) + raw[len(header):])
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=split, model=model),
                       "shard_00001.npy", "corrupt")
    rebuild_recomputes_only(cache_dir, 1, model, split, built)


@pytest.mark.parametrize("sidecar", ["not utf-8", "garbage", "empty"])
def test_a_damaged_checksum_sidecar_only_means_recompute(tmp_path, built, model, split,
                                                         sidecar):
    # An interrupted build whose sidecar for shard 2 is damaged (found in review: invalid
    # UTF-8 failed every later build, --overwrite included).
    out = as_interrupted(built, tmp_path / "ref")
    (out / "shard_00002.npy.sha256").write_bytes(
        {"not utf-8": b"\xff\xfe\x00", "garbage": b"x y z", "empty": b""}[sidecar])
    rebuild_recomputes_only(out, 2, model, split, built)


def test_a_shard_renamed_over_after_its_check_is_not_served(cache_dir, tmp_path, config, model,
                                                            split, built):
    # Another process rebuilding the cache (another model, --overwrite) renames its shard
    # into place between this reader's checksum and its memory map. The reader must serve
    # the bytes it verified, not the new file (found in review: it mapped the path again).
    other_dir = tmp_path / "other"
    build_reference_cache(DualEncoder(config, seed=5), split, other_dir, shard_size=SHARD)
    cache = ReferenceCache.open(cache_dir, split=split, model=model)
    real = cache_mod._read_npy_header
    swapped = []

    def swap_then_read(f):  # runs after the checksum, before the map
        if not swapped:
            shutil.copyfile(other_dir / "shard_00000.npy", cache_dir / "incoming.npy")
            os.replace(cache_dir / "incoming.npy", cache_dir / "shard_00000.npy")
            swapped.append(True)
        return real(f)

    ids = split.ids[:5]
    with mock.patch.object(cache_mod, "_read_npy_header", swap_then_read):
        image, text = cache.lookup(ids)
    assert swapped
    want_image, want_text = ReferenceCache.open(built).lookup(ids)
    assert torch.equal(image, want_image) and torch.equal(text, want_text)
    other_image, _ = ReferenceCache.open(other_dir).lookup(ids)
    assert not torch.equal(image, other_image)  # the swap would have been visible
    expect_cache_error(lambda: ReferenceCache.open(cache_dir).verify(), "shard_00000.npy",
                       "checksum")  # and a new reader sees the swapped file for what it is


def test_a_build_removes_what_a_killed_build_left_and_nothing_else(tmp_path, built, model,
                                                                   split):
    out = as_interrupted(built, tmp_path / "ref")
    debris = [".shard_00002.npy.k2j4_x9.tmp", ".shard_00002.npy.sha256.a8b7.tmp",
              ".manifest.json.q1w2e3.tmp", ".ids.npy.zz_top.tmp"]
    # A user's shard_000001.npy (six digits) is not a name this module gives (found in
    # review: any shard_<digits>.npy was deleted by --overwrite).
    mine = ["shard_notes.txt", ".results.csv.abc.tmp", "shard_0001x.npy", "shard_000001.npy",
            "shard_7.npy", "shard_000001.npy.sha256"]
    for name in debris + mine:
        (out / name).write_bytes(b"partial")
    (out / "shard_backup").mkdir()
    build_reference_cache(model, split, out, shard_size=SHARD).verify()
    left = {p.name for p in out.iterdir()}
    assert not left & set(debris)
    assert set(mine) | {"shard_backup"} <= left  # a user's files are never touched
    # --overwrite deletes shards, not every file named shard_*
    build_reference_cache(DualEncoder(model.config, seed=9), split, out, shard_size=SHARD,
                          overwrite=True)
    assert set(mine) | {"shard_backup"} <= {p.name for p in out.iterdir()}


def test_one_build_at_a_time_in_a_directory(cache_dir, model, split):
    # Found in review: a second build deleted the first one's unfinished writes (its temp
    # files) while the first was still writing them.
    import fcntl

    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["complete"] = False  # an interrupted build, which the second build would resume
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(cache_dir)
    fd = os.open(cache_dir / ".lock", os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # as a running build holds it
        expect_cache_error(lambda: build_reference_cache(model, split, cache_dir,
                                                         shard_size=SHARD),
                           "another build is writing the cache")
        assert snapshot(cache_dir) == before
    finally:
        os.close(fd)
    build_reference_cache(model, split, cache_dir, shard_size=SHARD).verify()


def test_flipped_byte_is_named_on_use(cache_dir, built, model, split):
    path = cache_dir / "shard_00003.npy"
    raw = bytearray(path.read_bytes())
    start = data_offset(path)
    middle = (start + len(raw)) // 2
    raw[middle] ^= 0x01  # one bit of one float in the middle of the data
    path.write_bytes(bytes(raw))
    cache = ReferenceCache.open(cache_dir, split=split, model=model)  # shapes are fine
    # Lookups that do not touch shard 3 still work and agree with the intact cache.
    good = ReferenceCache.open(built)
    ids_other = split.ids[torch.tensor([0, 150, 250, 599])]
    for a, b in zip(cache.lookup(ids_other), good.lookup(ids_other), strict=True):
        assert torch.equal(a, b)
    ids_bad = split.ids[torch.tensor([5, 310, 599])]  # row 310 lies in shard 3
    for _ in range(2):  # and it stays refused: never cached as verified
        expect_cache_error(lambda: cache.lookup(ids_bad), "shard_00003.npy", "checksum")
    with pytest.raises(CacheError, match="shard_00003.npy"):
        cache.embeddings(Batch(split.images[:1], split.tokens[:1], split.ids[300:301],
                               torch.tensor([300])))
    expect_cache_error(lambda: ReferenceCache.open(cache_dir).verify(), "shard_00003.npy")
    rebuild_recomputes_only(cache_dir, 3, model, split, built)


def test_shard_replaced_by_another_is_named_on_use(cache_dir, built, model, split):
    shutil.copyfile(cache_dir / "shard_00001.npy", cache_dir / "shard_00004.npy")
    cache = ReferenceCache.open(cache_dir, split=split, model=model)  # same shape
    expect_cache_error(cache.verify, "shard_00004.npy", "checksum")
    expect_cache_error(lambda: cache.lookup(split.ids[400:401]), "shard_00004.npy")
    rebuild_recomputes_only(cache_dir, 4, model, split, built)


def test_deleted_shard_is_named_at_open(cache_dir, built, model, split):
    (cache_dir / "shard_00005.npy").unlink()
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=split, model=model),
                       "shard_00005.npy", "missing")
    rebuild_recomputes_only(cache_dir, 5, model, split, built)


def test_deleted_shard_after_open_is_named_on_use(cache_dir, split):
    cache = ReferenceCache.open(cache_dir)
    (cache_dir / "shard_00000.npy").unlink()
    expect_cache_error(lambda: cache.lookup(split.ids[:3]), "shard_00000.npy", "missing")


def test_deleted_ids_file_is_named_and_a_build_repairs_it(cache_dir, split, model):
    # Found in review: a FileNotFoundError, which the build's repair path did not catch.
    (cache_dir / "ids.npy").unlink()
    expect_cache_error(lambda: ReferenceCache.open(cache_dir), "ids.npy", "missing")
    cache = build_reference_cache(model, split, cache_dir, shard_size=SHARD)
    assert cache.computed_shards == []  # the shards were fine: only the ids are rewritten
    np.testing.assert_array_equal(np.load(cache_dir / "ids.npy"), split.ids.numpy())


def test_an_ids_file_that_repeats_an_id_is_refused_at_open(cache_dir):
    # Builds refuse repeated ids; a cache whose ids.npy repeats one (its checksum updated
    # to match, as a hand-made cache would be) must not open: a lookup would return one
    # row for two examples.
    ids = np.load(cache_dir / "ids.npy")
    ids[1] = ids[0]
    np.save(cache_dir / "ids.npy", ids)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["ids_sha256_file"] = hashlib.sha256((cache_dir / "ids.npy").read_bytes()).hexdigest()
    manifest["data"]["ids_sha256"] = hashlib.sha256(ids.tobytes()).hexdigest()
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    expect_cache_error(lambda: ReferenceCache.open(cache_dir), "ids.npy repeats example ids")


def test_ids_swapped_with_their_file_checksum_updated_are_refused(cache_dir, split):
    # Found in review: two coordinated edits (two ids swapped in ids.npy, its file checksum
    # updated in the manifest) opened, and lookups served each other's rows. ids.npy is now
    # also held to the data fingerprint's ids hash.
    ids = np.load(cache_dir / "ids.npy")
    ids[[0, 1]] = ids[[1, 0]]
    np.save(cache_dir / "ids.npy", ids)
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    manifest["ids_sha256_file"] = hashlib.sha256((cache_dir / "ids.npy").read_bytes()).hexdigest()
    (cache_dir / "manifest.json").write_text(json.dumps(manifest))
    for kwargs in ({}, {"split": split}):
        expect_cache_error(lambda kwargs=kwargs: ReferenceCache.open(cache_dir, **kwargs),
                           "ids.npy", "data fingerprint")


@pytest.mark.parametrize("key, value", [("logit_scale", 1000.0), ("logit_bias", 5.0)])
def test_an_edited_temperature_or_bias_is_refused(cache_dir, model, split, key, value):
    # Found in review: t and c are read from the manifest and handed to every selection; an
    # edit there was used without a word. Against the model they are compared directly;
    # without it, the manifest no longer names the build its shards' sidecars were written by.
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest[key] == float(getattr(model, key).detach())
    manifest[key] = value
    path.write_text(json.dumps(manifest))
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=split, model=model),
                       f"{key}: cache has {value!r}")
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=split),
                       "does not match the build that wrote shard_00000.npy")
    # Sidecars gone (copied without them): the model still catches it, nothing else can.
    for sidecar in cache_dir.glob("*.sha256"):
        sidecar.unlink()
    expect_cache_error(lambda: ReferenceCache.open(cache_dir, split=split, model=model), key)


@pytest.mark.parametrize("key, value, fragment", [
    ("logit_scale", float("nan"), "logit_scale (the temperature t: finite and > 0)"),
    ("logit_scale", 0.0, "logit_scale (the temperature t: finite and > 0)"),
    ("logit_scale", -1.0, "logit_scale (the temperature t: finite and > 0)"),
    ("logit_bias", float("inf"), "logit_bias (finite)"),
    ("logit_bias", float("-inf"), "logit_bias (finite)")])
def test_a_temperature_or_bias_no_selection_can_use_is_named_at_open(cache_dir, key, value,
                                                                     fragment):
    path = cache_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest[key] = value
    path.write_text(json.dumps(manifest))  # NaN / Infinity: Python's json reads them back
    expect_cache_error(lambda: ReferenceCache.open(cache_dir), "damaged", fragment)


@pytest.mark.parametrize("manifest_text", ['{"name": "my web app"}', '{"format": "other.v2"}',
                                           "[1, 2, 3]"])
def test_another_tools_manifest_is_never_overwritten(tmp_path, model, split, manifest_text):
    # Found in review: --overwrite replaced a user's manifest.json and ids.npy (the error
    # without it even suggested --overwrite). JSON that does not say it is our manifest is
    # someone else's file: refused either way, nothing touched.
    out = tmp_path / "proj"
    out.mkdir()
    (out / "manifest.json").write_text(manifest_text)
    np.save(out / "ids.npy", np.arange(5))
    (out / "notes.txt").write_text("important")
    before = snapshot(out)
    for overwrite in (False, True):
        message = expect_cache_error(
            lambda overwrite=overwrite: build_reference_cache(model, split, out,
                                                              shard_size=SHARD,
                                                              overwrite=overwrite),
            "not a jestkit.reference_cache.v1 manifest", "someone else's files")
        assert "--overwrite" not in message
        assert snapshot(out) == before


def test_a_damaged_manifest_beside_foreign_files_is_not_rebuilt_over(cache_dir, model, split):
    # A truncated manifest cannot say whose it was: --overwrite rebuilds over it only where
    # every other file is a cache's own.
    manifest = cache_dir / "manifest.json"
    manifest.write_text(manifest.read_text()[:50])
    (cache_dir / "notes.txt").write_text("important")
    before = snapshot(cache_dir)
    expect_cache_error(lambda: build_reference_cache(model, split, cache_dir, shard_size=SHARD,
                                                     overwrite=True),
                       "notes.txt", "damaged manifest.json", "not rebuilt over")
    assert snapshot(cache_dir) == before


@pytest.mark.parametrize("name", ["manifest.json", "ids.npy", ".lock", "shard_00002.npy",
                                  "shard_00002.npy.sha256"])
def test_a_directory_where_the_cache_keeps_a_file_is_named(cache_dir, model, split, name):
    # Found in review: an IsADirectoryError from deep inside a write (or a read).
    target = cache_dir / name
    if target.exists():
        target.unlink()
    target.mkdir()
    (target / "inside").write_text("kept")
    expect_cache_error(lambda: build_reference_cache(model, split, cache_dir, shard_size=SHARD,
                                                     overwrite=True),
                       f"{name} is a directory", "move it away")
    assert (target / "inside").read_text() == "kept"
    if name == "manifest.json":
        expect_cache_error(lambda: ReferenceCache.open(cache_dir), "manifest.json cannot be read")


def test_a_read_only_cache_directory(cache_dir, tmp_path, model, split):
    # Found in review: a rerun on a complete cache the user cannot write (a shared or
    # read-only one) failed on its lock file, though nothing needed writing. (Tests run as
    # root, which permissions do not stop: the lock's open is made to fail instead.)
    real_open = os.open

    def read_only(path, *args, **kwargs):
        if str(path).endswith(".lock"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    before = snapshot(cache_dir)
    with mock.patch.object(cache_mod.os, "open", read_only):
        cache = build_reference_cache(model, split, cache_dir, shard_size=SHARD)
        assert cache.computed_shards == []
        assert snapshot(cache_dir) == before
        # Not complete, or another model's: nothing can be written, and it says so.
        (cache_dir / "shard_00001.npy").unlink()
        expect_cache_error(lambda: build_reference_cache(model, split, cache_dir,
                                                         shard_size=SHARD),
                           "cannot write into", "Permission denied", "shard_00001.npy",
                           "give a writable directory")
    with pytest.raises(ValueError, match=r"out_dir .*afile/sub: cannot create it"):
        (tmp_path / "afile").write_text("x")
        build_reference_cache(model, split, tmp_path / "afile" / "sub", shard_size=SHARD)


def test_a_manifest_nested_too_deeply_to_parse_is_named(cache_dir, model, split):
    # Found in review: json's parser raised RecursionError, a traceback.
    (cache_dir / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    expect_cache_error(lambda: ReferenceCache.open(cache_dir), "manifest.json is not valid JSON",
                       "nested too deeply")
    expect_cache_error(lambda: build_reference_cache(model, split, cache_dir, shard_size=SHARD),
                       "nested too deeply", "overwrite")


def test_another_shard_size_over_the_same_cache_says_which_size_it_has(cache_dir, model, split):
    # Found in review: "other data or another model", and only --overwrite (which recomputes
    # every shard) offered, where the data and model were the same.
    before = snapshot(cache_dir)
    expect_cache_error(lambda: build_reference_cache(model, split, cache_dir, shard_size=2 * SHARD),
                       f"built with shard_size={SHARD}", "--shard-size", "--overwrite")
    assert snapshot(cache_dir) == before
    assert build_reference_cache(model, split, cache_dir, shard_size=SHARD).computed_shards == []


def test_an_empty_split_is_refused(tmp_path, model, split):
    # Found in review: it built a cache of nothing, whose every lookup failed unhelpfully.
    with pytest.raises(ValueError, match="split is empty"):
        build_reference_cache(model, split.subset(torch.tensor([], dtype=torch.long)),
                              tmp_path / "ref")
    assert not (tmp_path / "ref").exists()


def test_altered_ids_file_is_refused(cache_dir, split):
    ids = np.load(cache_dir / "ids.npy")
    np.save(cache_dir / "ids.npy", ids[::-1].copy())
    expect_cache_error(lambda: ReferenceCache.open(cache_dir), "ids.npy", "checksum")


# --- 3. SIGKILL mid-build, then resume -------------------------------------------------------


def test_sigkill_mid_build_resumes_to_identical_cache(tmp_path, data):
    # A somewhat larger reference and small shards, so the build (35 shards) takes long enough
    # to be killed mid-way; every build single-threaded, as the byte comparison needs.
    ref = tmp_path / "reference.safetensors"
    save_model(DualEncoder(small_model(data.tokenizer.vocab_size, width=48, depth=2), seed=3),
               ref)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    command = [sys.executable, "-m", "jestkit.cli", "cache-reference", "--reference", str(ref),
               "--out", str(killed), "--shard-size", "100", "--no-progress"]

    # The uninterrupted build runs in this process (one thread) while the CLI starts up, on
    # the data the CLI caches: captions padded as the demo pads them.
    from jestkit.demo import DEMO_MAX_TEXT_LEN
    pool = load_digits_web(0, max_len=DEMO_MAX_TEXT_LEN).pool
    uninterrupted = threading.Thread(target=build_reference_cache,
                                     args=(load_model(ref), pool, clean),
                                     kwargs={"shard_size": 100})
    victim = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    uninterrupted.start()
    try:
        deadline = time.monotonic() + 120
        while victim.poll() is None and time.monotonic() < deadline:
            if len(list(killed.glob("shard_*.npy.sha256"))) >= 3:
                os.kill(victim.pid, signal.SIGKILL)
                break
            time.sleep(0.001)
        assert victim.wait(timeout=30) == -signal.SIGKILL, victim.stderr.read().decode()
    finally:
        if victim.poll() is None:
            victim.kill()
        victim.communicate()
        uninterrupted.join()
    manifest = json.loads((killed / "manifest.json").read_text())
    assert manifest["complete"] is False  # really killed mid-build
    assert manifest["n_shards"] == 35
    done = sorted(killed.glob("shard_*.npy.sha256"))
    assert 3 <= len(done) < 35
    expect_cache_error(lambda: ReferenceCache.open(killed), "incomplete")
    kept = {}
    for sidecar in done:
        shard = sidecar.with_suffix("")
        digest = hashlib.sha256(shard.read_bytes()).hexdigest() if shard.exists() else None
        if digest == sidecar.read_text().split()[0]:
            kept[shard.name] = shard.stat().st_ino
    assert len(kept) >= 3

    resumed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    # It says what it did: computed only the shards the kill left unfinished.
    assert "3500 reference embeddings (dim 32)" in resumed.stdout
    from jestkit.cli import _ranges
    assert (f"computed {35 - len(kept)} of 35 shards (shards {_ranges(list(range(len(kept), 35)))}"
            f": missing or failing" in resumed.stdout)

    for name, inode in kept.items():  # finished shards were kept, not recomputed
        assert (killed / name).stat().st_ino == inode, name
    assert (killed / "ids.npy").read_bytes() == (clean / "ids.npy").read_bytes()
    assert (killed / "manifest.json").read_bytes() == (clean / "manifest.json").read_bytes()
    a, b = shard_files(killed), shard_files(clean)
    assert len(a) == 70 and a.keys() == b.keys()
    for name in a:
        assert a[name] == b[name], name
    # Every entry: the killed build's temp files are gone too (found in review: an earlier
    # version of this test compared only names without a leading dot, and hid them).
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in clean.iterdir())
    ReferenceCache.open(killed, split=pool, model=load_model(ref)).verify()


# --- 4. lookups ------------------------------------------------------------------------------


def test_lookup_of_permutation_matches_direct_embedding(pool_cache, data, model):
    pool = data.pool
    gen = torch.Generator().manual_seed(5)
    rows = torch.randperm(len(pool), generator=gen)[:700]
    rows = torch.cat([rows, rows[:20]])  # repeats are fine
    image, text = pool_cache.lookup(pool.ids[rows])
    with torch.no_grad():
        want_image = model.encode_image(pool.images[rows])
        want_text = model.encode_text(pool.tokens[rows])
    assert image.shape == text.shape == (720, 32) and image.dtype == torch.float32
    assert max_diff(image, want_image) <= 1e-6 and max_diff(text, want_text) <= 1e-6
    # Power: a mis-ordered answer would be far off (embeddings of different examples).
    assert max_diff(image[1:], want_image[:-1]) > 0.1
    # Whole pool, in its own order.
    image, text = pool_cache.lookup(pool.ids)
    with torch.no_grad():
        assert max_diff(image, model.encode_image(pool.images)) <= 1e-6
        assert max_diff(text, model.encode_text(pool.tokens)) <= 1e-6
    # ids as any integer tensor
    i32, _ = pool_cache.lookup(pool.ids[rows].to(torch.int32))
    assert torch.equal(i32, pool_cache.lookup(pool.ids[rows])[0])


def test_embeddings_of_batch(pool_cache, data):
    pool = data.pool
    idx = torch.arange(100, 164).flip(0)
    batch = Batch(pool.images[idx], pool.tokens[idx], pool.ids[idx], idx)
    emb = pool_cache.embeddings(batch)
    image, text = pool_cache.lookup(pool.ids[idx])
    assert torch.equal(emb.image, image) and torch.equal(emb.text, text)
    assert emb.logit_scale == pool_cache.logit_scale == pytest.approx(10.0, rel=1e-6)
    assert emb.logit_bias == pool_cache.logit_bias == -10.0


def test_empty_lookup(pool_cache):
    image, text = pool_cache.lookup(torch.empty(0, dtype=torch.long))
    assert image.shape == text.shape == (0, 32) and image.dtype == torch.float32


def test_unknown_ids_are_refused(pool_cache, data):
    pool = data.pool
    foreign = data.test.ids[:2]  # ids from another split
    assert not np.isin(foreign.numpy(), pool.ids.numpy()).any()
    for bad in (foreign, torch.tensor([int(pool.ids.max()) + 1]), torch.tensor([-1]),
                torch.tensor([int(pool.ids.min()) - 1])):
        query = torch.cat([pool.ids[:3], bad])
        message = expect_cache_error(lambda q=query: pool_cache.lookup(q), "not in")
        assert str(int(bad[0])) in message


def test_ids_of_the_wrong_kind_are_refused_and_array_likes_work(pool_cache, data):
    """Float ids were truncated (3799.7 -> row of 3799) and bool ones read as 0/1: silently
    the wrong rows. A list or a numpy array of ints is what a user may well pass."""
    ids = data.pool.ids[:6]
    image, text = pool_cache.lookup(ids)
    for same in (ids.tolist(), ids.numpy(), ids.int()):
        got = pool_cache.lookup(same)
        assert torch.equal(got[0], image) and torch.equal(got[1], text)
    cases = [
        (ids.double() + 0.7, TypeError, "ids must be integer example ids .* got float64"),
        (torch.tensor([True, False]), TypeError, "got bool"),
        (["a", "b"], TypeError, "ids must be integer example ids"),
        (ids[0], ValueError, r"one-dimensional \[n\], got shape \(\) \(one id: pass "
                             r"ids.reshape\(1\)\)"),
        (ids.reshape(2, 3), ValueError, r"one-dimensional \[n\], got shape \(2, 3\)"),
    ]
    for bad, error, match in cases:
        with pytest.raises(error, match=match):
            pool_cache.lookup(bad)
    batch = SuperBatchSampler(data.pool, 4, seed=0).next()
    with pytest.raises(TypeError, match=r"batch.ids.*ReferenceCache.embeddings\(batch\)"):
        pool_cache.lookup(batch)


def test_lookups_are_memory_mapped(pool_cache, data):
    pool = data.pool
    pool_cache.lookup(pool.ids[torch.tensor([0, 600, 3499])])
    assert pool_cache._shards, "no shard was read"
    for k, arr in pool_cache._shards.items():
        assert isinstance(arr, np.memmap), k
        assert arr.shape[1:] == (2, 32)
    pool_cache.verify()
    assert set(pool_cache._shards) == set(range(7))
    assert all(isinstance(a, np.memmap) for a in pool_cache._shards.values())


# --- 5. cached vs live selection -------------------------------------------------------------


def test_cached_and_live_reference_select_identically(pool_cache, data, model, config):
    pool = data.pool
    learner = DualEncoder(config, seed=11).eval()
    selector = JointSelector(filter_ratio=0.8)
    picks = set()
    for seed in range(4):
        rows = torch.randperm(len(pool), generator=torch.Generator().manual_seed(100 + seed))
        rows = rows[:320]
        images, tokens, ids = pool.images[rows], pool.tokens[rows], pool.ids[rows]
        with torch.no_grad():
            learner_emb = ModelEmbeddings(*learner(images, tokens))
            live = ModelEmbeddings(*model(images, tokens))
        cached = pool_cache.embeddings(Batch(images, tokens, ids, rows))
        got = selector(learner_emb, cached, generator=torch.Generator().manual_seed(seed))
        want = selector(learner_emb, live, generator=torch.Generator().manual_seed(seed))
        assert got.shape == (64,)
        assert torch.equal(got, want), seed
        picks.add(tuple(got.tolist()))
        # Power: the reference does matter to the selection (another reference differs).
        other = pool_cache.lookup(ids.roll(1))
        wrong = selector(learner_emb, ModelEmbeddings(*other, cached.logit_scale,
                                                      cached.logit_bias),
                         generator=torch.Generator().manual_seed(seed))
        assert not torch.equal(wrong, want), seed
    assert len(picks) == 4


# --- 6. a cache of every shifted view (views="shifts") -----------------------------------------


@pytest.fixture(scope="module")
def shifts_cache(tmp_path_factory, model, split):
    """The small subset's cache of all 25 shifted views (6 shards)."""
    out = tmp_path_factory.mktemp("shifts") / "ref"
    return build_reference_cache(model, split, out, shard_size=SHARD, views="shifts")


def test_a_shifted_view_cache_holds_each_views_live_embedding(shifts_cache, built, split,
                                                              model):
    from jestkit.data import MAX_SHIFT, shift_view, shifted_views

    assert shifts_cache.views == "shifts" and shifts_cache.n_views == (2 * MAX_SHIFT + 1) ** 2
    rows = torch.tensor([17, 3, 599, 250, 3])
    ids = split.ids[rows]
    views = shifted_views(split.images[rows], MAX_SHIFT)
    with torch.no_grad():
        want_text = model.encode_text(split.tokens[rows])
        for v in range(shifts_cache.n_views):
            image, text = shifts_cache.lookup(ids, torch.full((len(rows),), v))
            assert max_diff(image, model.encode_image(views[v])) <= 1e-6, v
            assert max_diff(text, want_text) <= 1e-6
        # A view per row, mixed; no views: the stored image, as a stored-view cache has it.
        mixed = torch.tensor([0, 24, 12, 7, 7])
        image, _ = shifts_cache.lookup(ids, mixed)
        want = model.encode_image(views[mixed, torch.arange(len(rows))])
        assert max_diff(image, want) <= 1e-6
    stored = ReferenceCache.open(built)
    assert max_diff(shifts_cache.lookup(ids)[0], stored.lookup(ids)[0]) <= 1e-6
    assert int(shift_view(0, 0)) == shifts_cache._stored_view
    # Only the stored-view cache's manifest lacks the entry: it is what it was before.
    assert "views" not in stored.manifest
    assert shifts_cache.manifest["views"] == {"kind": "shifts", "max_shift": MAX_SHIFT,
                                              "count": 25}


def test_cached_shifted_views_select_as_the_live_reference_on_augmented_batches(
        tmp_path, model, data, config):
    # The sampler shifts every image: the live reference scores that view, a stored-view
    # cache the stored image (another selection), a shifted-view cache the very view.
    pool = data.pool
    shifts = build_reference_cache(model, pool, tmp_path / "shifts", views="shifts")
    stored = build_reference_cache(model, pool, tmp_path / "stored")
    learner = DualEncoder(config, seed=11).eval()
    selector = JointSelector(filter_ratio=0.8)
    sampler = SuperBatchSampler(pool, 320, seed=5)
    differs = 0
    for seed in range(4):
        batch = sampler.next()
        with torch.no_grad():
            learner_emb = ModelEmbeddings(*learner(batch.images, batch.tokens))
            live = ModelEmbeddings(*model(batch.images, batch.tokens))

        def pick(emb, seed=seed, learner_emb=learner_emb):
            return selector(learner_emb, emb, generator=torch.Generator().manual_seed(seed))

        want = pick(live)
        assert torch.equal(pick(shifts.embeddings(batch)), want), seed
        differs += not torch.equal(pick(stored.embeddings(batch)), want)
    assert differs >= 2  # power: the view matters to the selection


def test_views_are_part_of_the_caches_identity(shifts_cache, built, split, model, tmp_path):
    stored_dir, shifts_dir = tmp_path / "stored", tmp_path / "shifts"
    shutil.copytree(built, stored_dir)
    shutil.copytree(shifts_cache.root, shifts_dir)
    before = snapshot(stored_dir)
    expect_cache_error(lambda: build_reference_cache(model, split, stored_dir,
                                                     shard_size=SHARD, views="shifts"),
                       "other views", "views: cache has stored, expected shifts")
    assert snapshot(stored_dir) == before  # nothing computed is lost
    expect_cache_error(lambda: build_reference_cache(model, split, shifts_dir,
                                                     shard_size=SHARD),
                       "views: cache has shifts (max_shift 2), expected stored")
    expect_cache_error(lambda: ReferenceCache.open(stored_dir, views="shifts"),
                       "holds views='stored', expected 'shifts'", "--views shifts")
    expect_cache_error(lambda: ReferenceCache.open(shifts_dir, views="stored"),
                       "holds views='shifts', expected 'stored'")
    assert ReferenceCache.open(shifts_dir, split=split, model=model, views="shifts").views \
        == "shifts"
    with pytest.raises(ValueError, match="views must be one of"):
        ReferenceCache.open(shifts_dir, views="shifted")
    with pytest.raises(ValueError, match=r"views must be one of \['stored', 'shifts'\]"):
        build_reference_cache(model, split, tmp_path / "new", views="all")
    # --overwrite replaces it with the other kind, whole.
    cache = build_reference_cache(model, split, stored_dir, shard_size=SHARD, views="shifts",
                                  overwrite=True)
    assert cache.views == "shifts" and cache.computed_shards == list(range(N_SHARDS))
    assert shard_files(stored_dir) == shard_files(shifts_dir)


def test_a_damaged_shifted_view_shard_is_named_and_rebuilt_alone(shifts_cache, split, model,
                                                                  tmp_path):
    out = tmp_path / "ref"
    shutil.copytree(shifts_cache.root, out)
    want = shard_files(out)
    path = out / "shard_00003.npy"
    blob = bytearray(path.read_bytes())
    blob[-5] ^= 0x10
    path.write_bytes(bytes(blob))
    cache = ReferenceCache.open(out, split=split, model=model)
    expect_cache_error(cache.verify, "shard_00003.npy fails its checksum")
    rebuilt = build_reference_cache(model, split, out, shard_size=SHARD, views="shifts")
    assert rebuilt.computed_shards == [3] and shard_files(out) == want


def test_bad_views_in_a_lookup_or_manifest_are_named(shifts_cache, built, split, tmp_path):
    ids = split.ids[:4]
    stored = ReferenceCache.open(built)
    expect_cache_error(lambda: stored.lookup(ids, torch.zeros(4, dtype=torch.long)),
                       "stored images only (views='stored')", "--views shifts")
    cases = [
        (torch.tensor([0, 1, 25, 2]), ValueError, r"views must be in \[0, 24\].*\[25\]"),
        (torch.tensor([0, -1, 2, 2]), ValueError, r"views must be in \[0, 24\].*\[-1\]"),
        (torch.zeros(3, dtype=torch.long), ValueError, r"views must be \[n\] = \[4\]"),
        (torch.zeros(4), TypeError, "views must be integer view indices"),
    ]
    for views, error, match in cases:
        with pytest.raises(error, match=match):
            shifts_cache.lookup(ids, views)
    # A stored-view cache serves a batch with views as it always did: the stored images.
    batch = Batch(split.images[:4], split.tokens[:4], ids, torch.arange(4),
                  views=torch.tensor([0, 1, 2, 3]))
    assert torch.equal(stored.embeddings(batch).image, stored.lookup(ids)[0])
    # An edited manifest that names other views is damaged, not silently misread.
    out = tmp_path / "ref"
    shutil.copytree(shifts_cache.root, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for key, value in (("max_shift", 3), ("count", 25.0), ("kind", "all")):
        edited = {**manifest, "views": {**manifest["views"], key: value}}
        (out / "manifest.json").write_text(json.dumps(edited))
        expect_cache_error(lambda: ReferenceCache.open(out), "is damaged", "views")
    # A bad views argument is named before anything is read (here: nothing to read).
    with pytest.raises(ValueError, match="views must be one of"):
        ReferenceCache.open(tmp_path / "nothing-here", views="shifted")
