"""A trustworthy cache of the frozen reference's embeddings, looked up by example id.

The reference never changes during learner training, so its image and text embeddings of the
whole pool can be computed once and looked up per super-batch (BRIEF 4). Only embeddings can
be cached, never losses: a pair's loss depends on the rest of its super-batch.

A silently mismatched cache is the worst bug this system can have, so:

- `manifest.json` fingerprints the data (count, the ids in order, an order-independent hash
  of every example's content) and the model (hash of weights and config, embedding dim,
  dtype); `ReferenceCache.open(..., split=, model=)` refuses a cache that does not match and
  says what differs;
- the embeddings live in shards of `shard_size` examples, each written atomically (temp
  file, fsync, rename) with its sha256 in a sidecar file (stamped with the build's data and
  model fingerprint, so only a build of the same data and model reuses it) and, once
  complete, in the manifest;
  a shard is verified against its checksum before its first use in a process, and a
  truncated, altered or missing shard is named in the error, never read as data;
- an interrupted build resumes: shards whose checksum verifies are kept, missing or
  corrupt ones are recomputed;
- lookups are vectorised (a sorted id index and one gather per shard touched) and read the
  shards memory-mapped, so a pool far larger than RAM works.

Which images: by default (``views="stored"``) the reference embeds each stored image once.
The sampler shifts every image it draws by a random ``(dy, dx)`` in ``[-2, 2]`` pixels, so a
live reference scores the shifted view the learner trains on, and such a cache an un-shifted
one: the two select differently. ``views="shifts"`` embeds all 25 shifted views of every
image (25x the build's image FLOPs, 13x the shards' size); lookups then take the view each
row of the super-batch holds (``Batch.views``), and cached scoring selects as live scoring
does, augmentation and all.

Layout of a cache directory::

    manifest.json         fingerprints, logit_scale / logit_bias, shard list, "complete",
                          and, for views="shifts", "views": {"kind", "max_shift", "count"}
    ids.npy               int64 [N]: example ids in data order (row r of the cache)
    shard_00000.npy       float [n, V + 1, d]: per example, its V image embeddings (V = 1, the
                          stored image, or V = 25 shifted views in `shift_view` order) and
                          its text embedding last
    shard_00000.npy.sha256  "<sha256 of the shard> <build fingerprint> <shard index>"
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from jestkit.atomic import atomic_write, sha256_file, sha256_stream, unfinished_write
from jestkit.data import MAX_SHIFT, Batch, Split, shift_view, shifted_views
from jestkit.models import DualEncoder, model_fingerprint
from jestkit.selection import ModelEmbeddings

__all__ = ["CACHE_VIEWS", "CacheError", "ReferenceCache", "build_reference_cache",
           "data_fingerprint", "model_identity"]

FORMAT = "jestkit.reference_cache.v1"
#: Which images a cache embeds: "stored" (each stored image once, the default) or "shifts"
#: (every shifted view the sampler can draw; see the module docstring).
CACHE_VIEWS = ("stored", "shifts")


def _views_entry(views: str) -> dict | None:
    """The manifest's "views" entry for `views`: none for "stored", so a stored-view cache's
    manifest is byte for byte what it was before the option existed (old caches still open,
    and still resume)."""
    if views == "stored":
        return None
    side = 2 * MAX_SHIFT + 1
    return {"kind": "shifts", "max_shift": MAX_SHIFT, "count": side * side}


def _views_name(entry: object) -> str:
    """A manifest's "views" entry (or its absence) in words, for an error message."""
    if entry is None:
        return "stored"
    if isinstance(entry, dict):
        return f"shifts (max_shift {entry.get('max_shift')!r})"
    return repr(entry)


class CacheError(ValueError):
    """The cache does not match, is incomplete, or a shard is corrupt (the message says which)."""


# --- fingerprints ----------------------------------------------------------------------------


def data_fingerprint(split: Split) -> dict:
    """Identity of a data split: count, ids in order, and an order-independent content hash.

    The content hash is the sha256 of the sorted per-example digests of (id, image bytes,
    token bytes): the same examples in another order give the same content hash but another
    ids hash, so the error can say "same data, other order".
    """
    ids = split.ids.numpy().astype(np.int64)
    images = split.images.contiguous().numpy()
    tokens = split.tokens.contiguous().numpy().astype(np.int64)
    digests = sorted(
        hashlib.sha256(ids[i].tobytes() + images[i].tobytes() + tokens[i].tobytes()).digest()
        for i in range(len(ids)))
    return {"count": int(len(ids)),
            "ids_sha256": hashlib.sha256(ids.tobytes()).hexdigest(),
            "content_sha256": hashlib.sha256(b"".join(digests)).hexdigest()}


def model_identity(model: DualEncoder) -> dict:
    """Identity of the reference: weights+config hash, embedding dim, output dtype."""
    param = next(model.parameters())
    return {"fingerprint": model_fingerprint(model), "embed_dim": model.config.embed_dim,
            "dtype": str(param.dtype).removeprefix("torch.")}


def _differences(expected: dict, found: dict, what: str) -> list[str]:
    return [f"{what} {key}: cache has {found.get(key)!r}, expected {value!r}"
            for key, value in expected.items() if found.get(key) != value]


def _data_hint(expected: dict, found: dict) -> list[str]:
    """What two data fingerprints' differences mean, when they can say more than hashes."""
    if not isinstance(found, dict) or found.get("count") != expected["count"]:
        return []
    same_ids = found.get("ids_sha256") == expected["ids_sha256"]
    same_content = found.get("content_sha256") == expected["content_sha256"]
    if same_content and not same_ids:
        return ["(same examples, in another order)"]
    if same_ids and not same_content:
        return ["(same ids, other images or captions: e.g. another data seed's noise, or "
                "captions padded to another length; `jestkit cache-reference` takes the "
                "data's --data-seed and --max-len)"]
    return []


def _check_split(split: object) -> None:
    if not isinstance(split, Split):
        raise TypeError(f"split must be a jestkit.data.Split (e.g. data.pool), got "
                        f"{type(split).__name__} {split!r:.40}")


_MANIFEST_KEYS = {"format": str, "data": dict, "model": dict, "logit_scale": float,
                  "logit_bias": float, "shard_size": int, "n_shards": int, "complete": bool}
_COMPLETE_KEYS = {"shards": list, "ids_sha256_file": str}  # written when the build finishes
# What `data_fingerprint` and `model_identity` write, which readers index by key.
_SUB_KEYS = {"data": {"count": int, "ids_sha256": str, "content_sha256": str},
             "model": {"fingerprint": str, "embed_dim": int, "dtype": str}}


def _load_json(path: Path) -> object:
    """The JSON document at `path`; CacheError for anything that is not one (a directory,
    an unreadable file, bytes that are not JSON, nesting too deep to parse)."""
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        what = "nested too deeply" if isinstance(err, RecursionError) else str(err)
        raise CacheError(f"{path} is not valid JSON (truncated or altered?): {what}") from None
    except OSError as err:
        raise CacheError(f"{path} cannot be read as the cache's manifest: "
                         f"{err.strerror or err}") from None


def _check_not_foreign(out: Path) -> None:
    """CacheError if `out`'s manifest.json is another tool's file (found in review:
    --overwrite replaced another tool's manifest.json and ids.npy): never overwritten."""
    path = out / "manifest.json"
    foreign = _foreign_manifest(path)
    if foreign:
        raise CacheError(f"{path}: {foreign}; {out} holds someone else's files, never "
                         f"overwritten: give a new or empty directory")


def _foreign_manifest(path: Path) -> str | None:
    """Why the manifest.json at `path` is someone else's file, not a damaged one of ours: a
    JSON document that does not say it is a cache of this format. None when it may be ours
    (our format, or not JSON at all: a truncated file cannot say whose it was)."""
    try:
        doc = _load_json(path)
    except CacheError:
        return None
    if isinstance(doc, dict) and doc.get("format") == FORMAT:
        return None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    kind = f"format {fmt!r}" if fmt is not None else "no 'format' field"
    return f"it is JSON of another kind ({kind}), not a {FORMAT} manifest"


def _read_manifest(path: Path) -> dict:
    """The manifest at `path`, checked to hold every field a reader uses (CacheError if not:
    a damaged manifest is named, never a KeyError deep inside)."""
    manifest = _load_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CacheError(f"{path} is not a {FORMAT} manifest")
    keys = {**_MANIFEST_KEYS, **(_COMPLETE_KEYS if manifest.get("complete") else {})}
    bad = [k for k, kind in keys.items()  # bool is an int to isinstance: not here
           if not isinstance(manifest.get(k), kind)
           or (isinstance(manifest.get(k), bool) and kind is not bool)]
    for block, sub in _SUB_KEYS.items():
        if block not in bad:
            bad += [f"{block}.{k}" for k, kind in sub.items()
                    if not isinstance(manifest[block].get(k), kind)
                    or isinstance(manifest[block].get(k), bool)]
    if not bad:
        count, size = manifest["data"]["count"], manifest["shard_size"]
        if count < 0 or size < 1 or manifest["n_shards"] != -(-count // size):
            bad = ["n_shards (not ceil(data.count / shard_size))"]
        elif manifest["complete"] and len(manifest["shards"]) != manifest["n_shards"]:
            bad = ["shards"]
        # The reference's t and c, handed to every selection: never NaN, inf or t <= 0 (an
        # edited manifest would otherwise fail deep inside the selector, or not at all).
        elif not (np.isfinite(manifest["logit_scale"]) and manifest["logit_scale"] > 0):
            bad = ["logit_scale (the temperature t: finite and > 0)"]
        elif not np.isfinite(manifest["logit_bias"]):
            bad = ["logit_bias (finite)"]
        elif "views" in manifest and (
                not isinstance(manifest["views"], dict)
                or json.dumps(manifest["views"], sort_keys=True)
                != json.dumps(_views_entry("shifts"), sort_keys=True)):
            # Compared as JSON text: 25.0 == 25 in Python, and a float count must not pass.
            # Only what this code writes: another max_shift would serve views this sampler
            # never draws under the indices it does.
            bad = [f"views (expected {_views_entry('shifts')} or none)"]
    if bad:
        raise CacheError(f"{path} is damaged: {bad} missing or malformed")
    return manifest


# --- atomic files ----------------------------------------------------------------------------


def _npy_bytes(array: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def _shard_name(k: int) -> str:
    return f"shard_{k:05d}.npy"


def _is_shard_file(path: Path) -> bool:
    """A shard or its checksum sidecar, by the names this module gives them
    (``shard_00012.npy``, ``shard_00012.npy.sha256``): nothing else in a directory is ever
    deleted as one."""
    name = path.name.removesuffix(".sha256")
    digits = name.removeprefix("shard_").removesuffix(".npy")
    # Exactly the name `_shard_name` gives: a user's shard_000001.npy (six digits) or
    # shard_7.npy is not this module's, and is never deleted as one.
    return digits.isdigit() and digits.isascii() and name == _shard_name(int(digits))


def is_cache_file(path: Path) -> bool:
    """Whether `path` is, by its name, one of the files a build writes: manifest.json,
    ids.npy, a shard or a shard's checksum sidecar (its lock and killed writes aside)."""
    return path.name in ("manifest.json", "ids.npy") or _is_shard_file(path)


# Files a file manager, git or this module's lock put into any directory: they make no
# directory someone's data (and are never deleted).
_HARMLESS_NAMES = (".DS_Store", ".gitkeep", ".lock")


def _check_without_manifest(out: Path, overwrite: bool) -> None:
    """CacheError unless a build may write into `out`, a directory without a manifest: it
    is empty, or holds only a cache's own files and `overwrite` is set (they are deleted).
    Anything else is someone's data, never written into."""
    present = [p for p in out.iterdir()
               if not (unfinished_write(p) or p.name in _HARMLESS_NAMES)]
    foreign = _foreign_files(out)
    if foreign:
        raise CacheError(f"{out} is not empty and holds no cache (no manifest.json): "
                         f"{_some(foreign)}; give a new or empty directory")
    if present and not overwrite:
        raise CacheError(f"{out} holds cache files but no manifest.json; pass "
                         f"overwrite=True (--overwrite) to delete them and rebuild")


_IDENTITY_KEYS = ("format", "data", "model", "logit_scale", "logit_bias", "shard_size",
                  "n_shards")


def _identity(manifest: dict) -> dict:
    """The entries that name a build: `_IDENTITY_KEYS`, and "views" where there is one."""
    identity = {k: manifest[k] for k in _IDENTITY_KEYS}
    if manifest.get("views") is not None:
        identity["views"] = manifest["views"]
    return identity


def _build_stamp(manifest: dict) -> str:
    """The build a manifest's identity names (written into every shard's sidecar)."""
    return hashlib.sha256(json.dumps(_identity(manifest), sort_keys=True).encode()).hexdigest()


def _foreign_files(out: Path) -> list[str]:
    """Names in `out` that no build writes (any directory among them): someone's data."""
    return sorted(p.name for p in out.iterdir()
                  if not (unfinished_write(p) or p.name in _HARMLESS_NAMES)
                  and (not is_cache_file(p) or p.is_dir()))


def _some(names: list[str]) -> str:
    return f"{', '.join(names[:5])}{' ...' if len(names) > 5 else ''}"


def _check_only_cache_files(out: Path) -> None:
    """CacheError unless `out` holds only a cache's own files: a damaged manifest.json
    vouches for nothing, so a rebuild over it must find nothing else to delete or replace."""
    foreign = _foreign_files(out)
    if foreign:
        raise CacheError(f"{out} holds files no cache build writes ({_some(foreign)}) beside "
                         f"a damaged manifest.json: not rebuilt over; give a new or empty "
                         f"directory")


def _delete_shards(out: Path) -> None:
    for p in out.iterdir():
        if _is_shard_file(p) and not p.is_dir():
            p.unlink()


def _delete_unfinished_writes(out: Path) -> None:
    """Remove what a killed build left: `atomic_write` temp files of this cache's own files
    (``.shard_00002.npy.<random>.tmp``, ``.manifest.json.<random>.tmp``, ...). Nothing ever
    reads them, and a build never finishes them."""
    for p in out.iterdir():
        if not (unfinished_write(p) and p.is_file()):
            continue
        target = Path(p.name[1:].rsplit(".", 2)[0])  # ".NAME.<random>.tmp" -> NAME
        if target.name in ("manifest.json", "ids.npy") or _is_shard_file(target):
            p.unlink()


def _read_npy_header(f) -> tuple[tuple, np.dtype, bool]:
    """(shape, dtype, fortran_order) of the .npy file open at its start as `f`, which is
    left at the first data byte. A damaged header is a CacheError, whatever numpy's parser
    raised (a flipped byte can make it raise ValueError, EOFError, SyntaxError, TypeError,
    tokenize's TokenError, ...)."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as err:  # noqa: BLE001 -- any parser failure means a damaged header
        raise CacheError(f"bad .npy header: {type(err).__name__}: {err}") from None
    if dtype.hasobject or not (isinstance(shape, tuple)
                               and all(isinstance(n, int) and n >= 0 for n in shape)):
        raise CacheError(f"bad .npy header: dtype {dtype}, shape {shape!r}")
    return shape, dtype, bool(fortran)


# --- building --------------------------------------------------------------------------------


#: The largest shard: lookups compute positions // shard_size in int64.
MAX_SHARD_SIZE = 2**31 - 1


@torch.no_grad()
def build_reference_cache(
    model: DualEncoder,
    split: Split,
    out_dir: str | os.PathLike,
    *,
    shard_size: int = 512,
    batch_size: int = 256,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    views: str = "stored",
) -> ReferenceCache:
    """Embed every example of `split` with the frozen `model` into a cache at `out_dir`.

    `views` says which images: "stored" (each stored image once) or "shifts" (all
    ``(2 * MAX_SHIFT + 1) ** 2`` shifted views the sampler draws, so cached scoring of an
    augmented super-batch selects as live scoring does; 25x the image FLOPs, 13x the size).

    Resumes an interrupted build of the same data and model (keeping every shard whose
    checksum verifies and whose stamp names this build); a complete, verified cache of the
    same data and model is returned as it is. A directory holding a cache of *other* data or
    another model, an unreadable manifest, or shards without a manifest, is refused unless
    `overwrite`, so nothing computed is lost by a typo. ``split.ids`` must be unique (lookups
    go by id).

    Returns the opened, verified cache; its ``computed_shards`` lists the shards this call
    computed (missing, corrupt, or of another build), empty when all were reused.
    """
    _check_split(split)
    if not isinstance(model, DualEncoder):
        raise TypeError(f"model must be the frozen reference DualEncoder (load_model(path) for "
                        f"a saved one), got {type(model).__name__}")
    if (isinstance(shard_size, bool) or not isinstance(shard_size, int)
            or not 1 <= shard_size <= MAX_SHARD_SIZE):  # lookups divide int64 positions by it
        raise ValueError(f"shard_size must be an int in [1, {MAX_SHARD_SIZE}], got "
                         f"{shard_size!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if views not in CACHE_VIEWS:
        raise ValueError(f"views must be one of {list(CACHE_VIEWS)}, got {views!r}")
    if views == "shifts" and min(split.images.shape[-2:]) <= MAX_SHIFT:
        raise ValueError(f"views='shifts' needs images larger than the shift ({MAX_SHIFT} "
                         f"pixels), got {tuple(split.images.shape[-2:])}")
    if split.tokens.shape[1] > model.config.max_text_len:  # before anything is written
        raise ValueError(f"the split's captions have {split.tokens.shape[1]} tokens, more than "
                         f"the model takes (max_text_len={model.config.max_text_len})")
    if len(split) == 0:  # a cache of nothing: every later lookup would fail, unhelpfully
        raise ValueError("split is empty: there is nothing to cache")
    ids = split.ids.numpy().astype(np.int64)
    repeats = len(ids) - len(np.unique(ids))
    if repeats:
        # Lookups go by id: a repeated id would silently return one row's embedding for both.
        raise ValueError(f"split.ids must be unique to cache by id; found {repeats} repeats")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"out_dir {out} exists and is not a directory")
    if out.is_dir() and not (out / "manifest.json").exists():
        _check_without_manifest(out, overwrite)  # before a lock file is made in it
    elif out.is_dir() and (out / "manifest.json").is_file():
        _check_not_foreign(out)  # likewise (and again once locked)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a parent that is a file, no permission, ...
        raise ValueError(f"out_dir {out}: cannot create it ({err.strerror or err})") from None
    in_the_way = sorted(p.name for p in out.iterdir()
                        if p.is_dir() and (is_cache_file(p) or p.name == ".lock"))
    if in_the_way:  # else an IsADirectoryError from deep inside a write
        raise CacheError(f"{out}: {', '.join(in_the_way)} "
                         f"{'is a directory' if len(in_the_way) == 1 else 'are directories'}"
                         f" where the cache keeps a file; move "
                         f"{'it' if len(in_the_way) == 1 else 'them'} away")
    # One build at a time in a directory: a second would delete the first's unfinished
    # writes (`_delete_unfinished_writes`) while it is still writing them.
    try:
        lock = os.open(out / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        # Not writable (a read-only mount, a cache shared by another user): a complete cache
        # of this data and model needs no write, and is returned as a rerun on it would be.
        try:
            cache = ReferenceCache.open(out, split=split, model=model)
            cache.verify()
            return cache
        except CacheError as why:
            raise CacheError(f"cannot write into {out} ({err.strerror or err}), and what is "
                             f"there is not a complete cache of this data and model "
                             f"({why}); give a writable directory") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise CacheError(f"another build is writing the cache at {out}; wait for it "
                             f"(its result will be this one, if data and model match)") from None
        except OSError:
            pass  # a file system without locks: build anyway, as before locks were taken
        return _build_locked(model, split, out, ids, shard_size, batch_size, overwrite,
                             progress, views)
    finally:
        os.close(lock)


def _build_locked(model: DualEncoder, split: Split, out: Path, ids: np.ndarray,
                  shard_size: int, batch_size: int, overwrite: bool,
                  progress: Callable[[int, int], None] | None, views: str) -> ReferenceCache:
    """`build_reference_cache` once its arguments are checked and its lock taken."""
    model = model.eval()
    manifest = {
        "format": FORMAT,
        "data": data_fingerprint(split),
        "model": model_identity(model),
        "logit_scale": float(model.logit_scale),
        "logit_bias": float(model.logit_bias),
        "shard_size": shard_size,
        "n_shards": -(-len(split) // shard_size),
        "complete": False,
    }
    if _views_entry(views) is not None:
        manifest["views"] = _views_entry(views)
    manifest_path = out / "manifest.json"
    identity = _identity(manifest)  # all but "complete" (and "shards")
    if manifest_path.exists():
        try:
            old = _read_manifest(manifest_path)
        except CacheError as err:
            _check_not_foreign(out)
            if not overwrite:
                raise CacheError(f"{err}; pass overwrite=True (--overwrite) to rebuild the "
                                 f"cache") from None
            _check_only_cache_files(out)  # a damaged manifest vouches for nothing beside it
            old = {}  # differs in everything: every shard is deleted and rebuilt
        diffs = []
        for k, v in identity.items():
            if k == "views":
                continue
            if isinstance(v, dict) and isinstance(old.get(k), dict):
                diffs += _differences(v, old[k], k)  # only the entries that differ
            elif old.get(k) != v:
                diffs.append(f"{k}: cache has {old.get(k)!r}, expected {v!r}")
        if old.get("views") != manifest.get("views"):  # either may have none
            diffs.append(f"views: cache has {_views_name(old.get('views'))}, expected "
                         f"{_views_name(manifest.get('views'))} (views={views!r})")
        diffs += _data_hint(identity["data"], old.get("data"))
        if diffs and not overwrite:
            only_size = all(d.startswith(("shard_size:", "n_shards:")) for d in diffs)
            if only_size:  # same data and model: nothing to rebuild, only another size asked
                raise CacheError(f"{out} holds this data's cache by this model, built with "
                                 f"shard_size={old.get('shard_size')!r} (--shard-size), not "
                                 f"{shard_size}: pass that size to resume or reuse it, or "
                                 f"overwrite=True (--overwrite) to rebuild every shard at "
                                 f"{shard_size}")
            raise CacheError(f"{out} holds a cache of other data, another model or other "
                             f"views; pass overwrite=True (--overwrite) to replace it. "
                             f"Differences: "
                             + "; ".join(diffs))
        if diffs:
            _delete_shards(out)
        elif old.get("complete"):
            try:  # already built: leave the complete cache (and its readers) alone
                cache = ReferenceCache.open(out, split=split, model=model)
                cache.verify()
                return cache  # computed_shards == []
            except CacheError:
                pass  # a shard is bad: rebuild what is missing or corrupt below
    else:
        # A build writes its manifest before anything else, so what is here was not made by a
        # build this function can vouch for (a deleted manifest, copied files), or is not a
        # cache at all: never overwritten without overwrite, and never deleted unless it is
        # named as a cache's own (found in review: a user's ids.npy was replaced silently).
        _check_without_manifest(out, overwrite)
        _delete_shards(out)
    _delete_unfinished_writes(out)
    atomic_write(manifest_path, json.dumps(manifest, indent=1).encode())
    atomic_write(out / "ids.npy", _npy_bytes(ids))

    # Each shard's sidecar holds its checksum *and* the build it belongs to (data, model,
    # shard size, index): a shard is reused only by a build of the same data and model.
    build = _build_stamp(identity)
    checksums, computed = [], []
    for k in range(manifest["n_shards"]):
        path = out / _shard_name(k)
        sidecar = path.with_name(path.name + ".sha256")
        try:  # an unreadable or damaged sidecar only means "recompute this shard"
            stamp = sidecar.read_text().split() if sidecar.exists() else []
        except (OSError, UnicodeDecodeError):
            stamp = []
        if (path.exists() and stamp[1:] == [build, str(k)]
                and sha256_file(path) == stamp[0]):
            checksums.append(stamp[0])
        else:
            rows = slice(k * shard_size, min((k + 1) * shard_size, len(split)))
            parts = []
            for start in range(rows.start, rows.stop, batch_size):
                sl = slice(start, min(start + batch_size, rows.stop))
                parts.append(torch.stack(_image_embeddings(model, split.images[sl], views)
                                         + [model.encode_text(split.tokens[sl])], dim=1))
            data = _npy_bytes(torch.cat(parts).numpy())
            atomic_write(path, data)
            digest = hashlib.sha256(data).hexdigest()
            atomic_write(sidecar, f"{digest} {build} {k}".encode())
            checksums.append(digest)
            computed.append(k)
        if progress:
            progress(k + 1, manifest["n_shards"])
    manifest["shards"] = checksums
    manifest["ids_sha256_file"] = sha256_file(out / "ids.npy")
    manifest["complete"] = True
    atomic_write(manifest_path, json.dumps(manifest, indent=1).encode())
    cache = ReferenceCache.open(out, split=split, model=model)
    cache.computed_shards = computed
    return cache


def _image_embeddings(model: DualEncoder, images: torch.Tensor,
                      views: str) -> list[torch.Tensor]:
    """The reference's image embeddings [n, d] of each view a cache of `views` holds, in its
    order: the stored images, or every shifted view (`shifted_views`, `shift_view` order),
    each embedded as one batch of the n images, as a live reference embeds a super-batch."""
    if views == "stored":
        return [model.encode_image(images)]
    return [model.encode_image(view) for view in shifted_views(images, MAX_SHIFT)]


# --- reading ---------------------------------------------------------------------------------


def _as_ids(ids: object) -> np.ndarray:
    """Example ids as an int64 [n] array. Float ids would be truncated (3799.7 -> 3799) and
    bool ones read as 0 and 1, silently the wrong rows: refused, as is any other shape."""
    if isinstance(ids, Batch):
        raise TypeError("lookup takes the batch's ids (batch.ids); for a whole Batch use "
                        "ReferenceCache.embeddings(batch)")
    if isinstance(ids, torch.Tensor):
        ids = ids.detach().cpu().numpy()
    try:
        query = np.asarray(ids)
    except (TypeError, ValueError):
        query = None
    if query is None or query.dtype == object or not (
            np.issubdtype(query.dtype, np.integer) or query.size == 0):
        what = query.dtype if query is not None and query.dtype != object else type(ids).__name__
        raise TypeError(f"ids must be integer example ids (a LongTensor [n]), got {what}")
    if query.ndim != 1:
        raise ValueError(f"ids must be one-dimensional [n], got shape {query.shape}"
                         + (" (one id: pass ids.reshape(1))" if query.ndim == 0 else ""))
    return query.astype(np.int64, copy=False)


def _check_against(root: Path, manifest: dict, split: Split | None,
                   model: DualEncoder | None) -> None:
    if model is not None and not isinstance(model, DualEncoder):
        raise TypeError(f"model must be the reference DualEncoder the cache was built with "
                        f"(load_model(path) for a saved one), got {type(model).__name__}")
    diffs = []
    if split is not None:
        found = data_fingerprint(split)
        diffs += _differences(found, manifest["data"], "data")
        diffs += _data_hint(found, manifest["data"])
    if model is not None:
        diffs += _differences(model_identity(model), manifest["model"], "model")
        # The weights' fingerprint covers t and c, but selection reads them from the
        # manifest (found in review: edited there, they were used without a word).
        for key in ("logit_scale", "logit_bias"):
            value = float(getattr(model, key).detach())
            if value != manifest[key]:
                diffs.append(f"{key}: cache has {manifest[key]!r}, the model {value!r}")
    if diffs:
        raise CacheError(f"the reference cache at {root} does not match: " + "; ".join(diffs))


class ReferenceCache:
    """A complete reference-embedding cache, opened read-only. Use `open`."""

    def __init__(self, root: Path, manifest: dict):
        self.root = root
        self.manifest = manifest
        self.logit_scale = manifest["logit_scale"]
        self.logit_bias = manifest["logit_bias"]
        ids = np.load(root / "ids.npy", allow_pickle=False)
        # ids.npy against the data fingerprint too, not only its own file checksum (found in
        # review: two coordinated edits, ids swapped and the checksum updated, served other
        # examples' rows).
        if (ids.dtype != np.int64 or ids.shape != (manifest["data"]["count"],)
                or hashlib.sha256(ids.tobytes()).hexdigest() != manifest["data"]["ids_sha256"]):
            raise CacheError(f"{root / 'ids.npy'} does not hold the ids the manifest's data "
                             f"fingerprint names (altered?); rebuild with `jestkit "
                             f"cache-reference`")
        # Sorted index for vectorised id -> row lookups.
        self._order = np.argsort(ids, kind="stable")
        self._sorted_ids = ids[self._order]
        if (self._sorted_ids[1:] == self._sorted_ids[:-1]).any():
            raise CacheError(f"{root / 'ids.npy'} repeats example ids; a cache needs unique ids")
        self._shards: dict[int, np.ndarray] = {}  # verified, memory-mapped
        self.computed_shards: list[int] = []  # set by build_reference_cache
        #: "stored" or "shifts": which images the cache embedded (`CACHE_VIEWS`).
        self.views = "stored" if manifest.get("views") is None else "shifts"
        #: Image embeddings per example: 1, or one per shifted view; the text's comes after.
        self.n_views = 1 if manifest.get("views") is None else manifest["views"]["count"]
        # The view a lookup without views takes: the stored image (the unshifted view).
        self._stored_view = 0 if self.n_views == 1 else int(shift_view(0, 0, MAX_SHIFT))

    @classmethod
    def open(cls, root: str | os.PathLike, *, split: Split | None = None,
             model: DualEncoder | None = None, views: str | None = None) -> ReferenceCache:
        """Open the cache at `root`, checking it against the data and model it must match.

        Args:
            split: the data the cache must have been made from (fingerprint compared).
            model: the reference it must have been made with (weights, config, dim, dtype).
            views: the images it must hold, "stored" or "shifts" (`CACHE_VIEWS`); any if
                None.

        Raises:
            CacheError naming every difference, an incomplete build, or a missing or
            truncated shard (checksums of shard contents are verified on first use).
        """
        if split is not None:
            _check_split(split)
        if views is not None and views not in CACHE_VIEWS:
            raise ValueError(f"views must be one of {list(CACHE_VIEWS)} or None, got {views!r}")
        root = Path(root)
        path = root / "manifest.json"
        if not path.exists():
            raise CacheError(f"no reference cache at {root} (missing manifest.json)")
        manifest = _read_manifest(path)
        if not manifest.get("complete"):
            raise CacheError(f"the cache at {root} is incomplete (an interrupted build); run "
                             f"`jestkit cache-reference` again to resume it")
        _check_against(root, manifest, split, model)
        if not (root / "ids.npy").is_file():  # a CacheError, so a build repairs it
            raise CacheError(f"{root / 'ids.npy'} is missing (deleted?)")
        if sha256_file(root / "ids.npy") != manifest["ids_sha256_file"]:
            raise CacheError(f"{root / 'ids.npy'} fails its checksum (altered or truncated)")
        cache = cls(root, manifest)
        if views is not None and cache.views != views:
            raise CacheError(f"the reference cache at {root} holds views={cache.views!r}, "
                             f"expected {views!r}; build one with `jestkit cache-reference "
                             f"--views {views}`")
        build = _build_stamp(manifest)
        for k in range(manifest["n_shards"]):
            cache._check_shape(k)
            cache._check_stamp(k, build)
        return cache

    def check(self, *, split: Split | None = None, model: DualEncoder | None = None) -> None:
        """Check an open cache against data and a model, as `open` does: a CacheError
        naming every difference. `train_learner` calls it with its data's pool (and the
        reference, if given) whenever it scores with a cache's `embeddings`."""
        if split is not None:
            _check_split(split)
        _check_against(self.root, self.manifest, split, model)

    def __len__(self) -> int:
        return self.manifest["data"]["count"]

    @property
    def embed_dim(self) -> int:
        return self.manifest["model"]["embed_dim"]

    def _shard_rows(self, k: int) -> int:
        size = self.manifest["shard_size"]
        return min(size, len(self) - k * size)

    def _check_shape(self, k: int) -> None:
        """CacheError unless shard k exists and its header says the expected shape (a cheap
        check of every shard when the cache is opened; contents are checked on first use)."""
        path = self.root / _shard_name(k)
        if not path.exists():
            raise CacheError(f"shard {path.name} of the cache at {self.root} is missing")
        try:
            with open(path, "rb") as f:
                shape, dtype, _ = _read_npy_header(f)
                expected = f.tell() + int(np.prod(shape)) * dtype.itemsize
                size = os.fstat(f.fileno()).st_size
            if size != expected:
                raise CacheError(f"{size} bytes where its header makes {expected}")
        except (OSError, CacheError) as err:
            raise CacheError(f"shard {path.name} of the cache at {self.root} is truncated or "
                             f"corrupt ({err})") from None
        self._check_rows(k, shape)

    def _check_stamp(self, k: int, build: str) -> None:
        """CacheError if shard k's sidecar names another build than this manifest's
        identity: the manifest was edited since (its t or c, say). A sidecar that is gone
        or unreadable says nothing (the shard's checksum in the manifest still guards it)."""
        sidecar = self.root / (_shard_name(k) + ".sha256")
        try:
            stamp = sidecar.read_text().split()
        except (OSError, UnicodeDecodeError):
            return
        if len(stamp) == 3 and stamp[1:] != [build, str(k)]:
            raise CacheError(f"the manifest of the cache at {self.root} does not match the "
                             f"build that wrote {_shard_name(k)} (the manifest was edited, or "
                             f"the shard copied from another cache); rebuild with `jestkit "
                             f"cache-reference`")

    def _check_rows(self, k: int, shape: tuple) -> None:
        expected = (self._shard_rows(k), self.n_views + 1, self.embed_dim)
        if shape != expected:
            raise CacheError(f"shard {_shard_name(k)} has shape {shape}, expected {expected}")

    def _shard(self, k: int) -> np.ndarray:
        """Shard k, memory-mapped, from the very file whose bytes were checked against the
        manifest: one open for both, so a shard renamed into place between the check and
        the map (a rebuild in another process) is never served as verified."""
        if k not in self._shards:
            path = self.root / _shard_name(k)
            if not path.exists():
                raise CacheError(f"shard {path.name} of the cache at {self.root} is missing")
            with open(path, "rb") as f:
                if sha256_stream(f) != self.manifest["shards"][k]:
                    raise CacheError(f"shard {path.name} fails its checksum: altered or "
                                     f"truncated since the cache was built; rebuild it with "
                                     f"`jestkit cache-reference` (it recomputes only bad "
                                     f"shards)")
                f.seek(0)
                shape, dtype, fortran = _read_npy_header(f)  # checksum passed: well formed
                self._check_rows(k, shape)
                # The map holds its own reference to the file: it stays this file's bytes
                # after the handle closes, whatever is renamed over the path later.
                try:
                    self._shards[k] = np.memmap(f, dtype=dtype, mode="r", shape=shape,
                                                order="F" if fortran else "C",
                                                offset=f.tell())
                except (ValueError, OSError) as err:  # cut short since it was read
                    raise CacheError(f"shard {path.name} of the cache at {self.root} changed "
                                     f"while it was read ({err})") from None
        return self._shards[k]

    def verify(self) -> None:
        """Check every shard's checksum now (otherwise each is checked on first use)."""
        for k in range(self.manifest["n_shards"]):
            self._shard(k)

    def rows(self, ids: torch.Tensor) -> np.ndarray:
        """Cache rows of the given example ids (LongTensor [n]; an integer numpy array or a
        list of ints will do); unknown ids are an error."""
        query = _as_ids(ids)
        pos = np.searchsorted(self._sorted_ids, query)
        pos_clipped = np.minimum(pos, len(self._sorted_ids) - 1)
        missing = self._sorted_ids[pos_clipped] != query
        if missing.any():
            raise CacheError(f"{int(missing.sum())} ids are not in the reference cache, e.g. "
                             f"{query[missing][:5].tolist()}")
        return self._order[pos_clipped]

    def lookup(self, ids: torch.Tensor,
               views: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(image [n, d], text [n, d]) reference embeddings of the examples `ids` [n].

        `views` [n] (a cache of views="shifts" only) names each row's shifted view
        (`jestkit.data.shift_view`, as `Batch.views`); None takes the stored images.
        """
        rows = self.rows(ids)
        column = self._view_columns(views, len(rows))
        size = self.manifest["shard_size"]
        shard_of, offset = rows // size, rows % size
        out = None
        for k in np.unique(shard_of):  # one vectorised gather per shard touched
            take = shard_of == k
            shard = self._shard(int(k))
            # Only the rows' own view and text: [m, 2, d] from the [m, V + 1, d] rows.
            block = np.asarray(shard[offset[take][:, None],
                                     np.stack([column[take],
                                               np.full(int(take.sum()), self.n_views)], 1)])
            if out is None:
                out = np.empty((len(rows), 2, block.shape[-1]), dtype=block.dtype)
            out[take] = block
        if out is None:  # no ids asked for: empty [0, d] embeddings, not a TypeError
            out = np.empty((0, 2, self.embed_dim), dtype=self._shard(0).dtype)
        t = torch.from_numpy(out)
        return t[:, 0], t[:, 1]

    def _view_columns(self, views: object, n: int) -> np.ndarray:
        """Each row's image column in a shard row: `views` checked, or the stored image's."""
        if views is None:
            return np.full(n, self._stored_view, dtype=np.int64)
        if self.n_views == 1:
            raise CacheError(f"the reference cache at {self.root} holds the stored images "
                             f"only (views='stored'): it has no shifted views to look up; "
                             f"build one with `jestkit cache-reference --views shifts`")
        if isinstance(views, torch.Tensor):
            views = views.detach().cpu().numpy()
        query = np.asarray(views)
        if query.dtype == object or not (np.issubdtype(query.dtype, np.integer)
                                         or query.size == 0):
            raise TypeError(f"views must be integer view indices (a LongTensor [n]), got "
                            f"{query.dtype}")
        if query.shape != (n,):
            raise ValueError(f"views must be [n] = [{n}], one per id, got shape {query.shape}")
        bad = (query < 0) | (query >= self.n_views)
        if bad.any():
            raise ValueError(f"views must be in [0, {self.n_views - 1}] (shift_view of shifts "
                             f"within {MAX_SHIFT} pixels), got {query[bad][:5].tolist()}")
        return query.astype(np.int64, copy=False)

    def embeddings(self, batch: Batch) -> ModelEmbeddings:
        """The reference's ModelEmbeddings of a super-batch, by its example ids (a
        `ReferenceEmbedder` for `train_learner`): of each row's own shifted view
        (`batch.views`) if the cache holds every shifted view, else of the stored images."""
        image, text = self.lookup(batch.ids, batch.views if self.n_views > 1 else None)
        device = batch.images.device
        return ModelEmbeddings(image.to(device), text.to(device), self.logit_scale,
                               self.logit_bias)
