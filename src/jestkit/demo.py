"""`jestkit demo`: every method of the paper side by side on `digits-web`, from one command.

Trains the reference on the curated split, then learners with uniform, hard_learner,
easy_reference and learnability (joint), learnability (independent), and learnability
(joint) with the reference's embeddings from a cache and with cache + Flexi-JEST, several
seeds each, all at the same sub-batch size b and number of steps T; then reports by
BRIEF 7.

Learner runs are independent, so they run in parallel worker processes (one thread each:
these models are small enough that two single-threaded runs beat one two-threaded run),
longest first. The longest runs that need no reference (hard_learner) start at once, while
the reference trains in the main process.
Results are written to a work directory beside the run directory (`partial_dir`) and moved
into place at the end, so an existing run directory is never half-overwritten. Every learner
run is saved there the moment it finishes: an interrupted demo (Ctrl-C, SIGTERM, a crash)
keeps them, and ``--resume`` continues it, training only what is missing.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import multiprocessing
import os
import shutil
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from tqdm import tqdm

from jestkit.atomic import atomic_write, move_into_place, unfinished_write
from jestkit.cache import CACHE_VIEWS, ReferenceCache, build_reference_cache, is_cache_file
from jestkit.data import (
    CURATED_SIZE,
    EPOCH_BOUNDARY_BEFORE_OPTION,
    IMAGE_SIZE,
    MAX_SEED,
    NOISE_FRACTIONS,
    POOL_SIZE,
    WordTokenizer,
    load_digits_web,
)
from jestkit.flops import count_flops
from jestkit.models import load_model, model_fingerprint, patch_sizes, save_model
from jestkit.provenance import code_version, describe_version
from jestkit.report import (
    PLOT_FILES,
    build_report,
    caveats,
    plateau_verdict,
    read_json,
    summary_table,
    write_report,
)
from jestkit.training import (
    MULTIRES_SPLITS,
    PATCH_SIZE_BEFORE_OPTION,
    SCORE_VIEW_BEFORE_OPTION,
    SCORE_VIEWS,
    LearnerConfig,
    ReferenceConfig,
    check_field_types,
    check_trainable,
    multires_split_of_older_run,
    train_learner,
    train_reference,
)

# (report name, method, selection, scoring) of every learner the demo trains. Scoring:
# "live" runs both models on every super-batch; "cached" looks the reference's embeddings up
# in a cache built once; "flexi" is cached + Flexi-JEST (the learner scores at a coarse patch
# size, and trains `flexi_multires_fraction` of each sub-batch at it).
DEMO_METHODS: tuple[tuple[str, str, str, str], ...] = (
    ("uniform", "uniform", "joint", "live"),
    ("learnability-joint", "learnability", "joint", "live"),
    ("learnability-independent", "learnability", "independent", "live"),
    ("easy_reference-joint", "easy_reference", "joint", "live"),
    ("hard_learner-joint", "hard_learner", "joint", "live"),
    ("learnability-joint-cached", "learnability", "joint", "cached"),
    ("learnability-joint-flexi", "learnability", "joint", "flexi"),
)
# Approximate time of one step of each method against uniform's (f = 0.8, demo sizes; from
# the per-phase times in docs/step_overhead.md), to start the longest runs first: a long run
# started last would leave a core idle at the end. Only the order depends on these.
_STEP_COST = {"uniform": 1.0, "learnability-joint": 2.9, "learnability-independent": 2.9,
              "easy_reference-joint": 2.1, "hard_learner-joint": 2.1,
              "learnability-joint-cached": 2.1, "learnability-joint-flexi": 1.8}
DEMO_MAX_TEXT_LEN = 8  # the longest caption is 8 words; padding to 16 doubles the text cost


@dataclass(frozen=True)
class DemoConfig:
    """Everything the demo does. Plain data: `configs/demo.json` holds the same values."""

    seeds: tuple[int, ...] = (0, 1, 2)
    data_seed: int = 0
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    methods: tuple[str, ...] = tuple(name for name, *_ in DEMO_METHODS)
    # Flexi-JEST (the "-flexi" method): score at patch 32, 2x the training patch 16 (one
    # token instead of four). Training part of each sub-batch at the coarse size too is the
    # paper's recipe, but it cost much of JEST's gain in every setting measured (with the
    # 16-token learner at T = 1000, half of each sub-batch coarse cost 15 points and 43% of
    # the iteration speed-up; docs/results.md), so by default the coarse size is for scoring
    # only.
    flexi_score_patch_size: int = 32
    flexi_multires_fraction: float = 0.0
    # Which part of each sub-batch trains coarse: "random" (the paper's recipe) or
    # "first_drawn_fine" (the selector's last-drawn picks: how the multi-resolution results
    # in docs/results.md were measured, and their configs pin it; the random split measured
    # the same at T = 20000, a point or two lower at T = 1000).
    flexi_multires_split: str = "random"
    # Which images the -flexi run's models score (LearnerConfig.score_view): "augmented" (the
    # shifted view it trains on; its cached reference scored the stored image) or "stored"
    # (the stored images, the view the cache holds, so both models score the same images).
    flexi_score_view: str = "augmented"
    # Which images the reference cache of the -cached and -flexi runs embeds
    # (`jestkit.cache.CACHE_VIEWS`): "stored" (each stored image once; a live reference
    # scores the shifted view the learner trains on, so cached runs select a little
    # differently) or "shifts" (all 25 shifted views the sampler draws: cached scoring then
    # selects exactly as live scoring does, for 25x the caching's image FLOPs).
    cache_views: str = "stored"

    @classmethod
    def quick(cls) -> DemoConfig:
        """A smoke run (<= 2 minutes): one seed, few steps. Its numbers mean nothing."""
        return cls(seeds=(0,), learner=LearnerConfig(steps=40, warmup_steps=5),
                   reference=ReferenceConfig(steps=40, warmup_steps=5))

    @classmethod
    def from_dict(cls, d: dict) -> DemoConfig:
        if not isinstance(d, dict):
            raise ValueError(f"a demo config must be a JSON object of fields "
                             f"{sorted(f.name for f in dataclasses.fields(cls))}, got "
                             f"{type(d).__name__}")
        d = dict(d)
        known = {f.name for f in dataclasses.fields(cls)}
        if set(d) - known:
            raise ValueError(f"unknown demo config fields {sorted(set(d) - known)}; "
                             f"allowed: {sorted(known)}")
        for key, block_cls in (("learner", LearnerConfig), ("reference", ReferenceConfig)):
            if key in d:
                allowed = {f.name for f in dataclasses.fields(block_cls)}
                if not isinstance(d[key], dict):
                    raise ValueError(f"{key} must be an object of fields {sorted(allowed)}, "
                                     f"got {d[key]!r}")
                if set(d[key]) - allowed:
                    raise ValueError(f"unknown {key} config fields {sorted(set(d[key]) - allowed)}"
                                     f"; allowed: {sorted(allowed)}")
                try:
                    d[key] = block_cls(**d[key])
                except ValueError as err:  # name the block: both have steps, lr, width...
                    raise ValueError(f"{key}.{err}") from None
        for key, kind in (("seeds", "ints"), ("methods", "names")):
            if key in d:
                if not isinstance(d[key], (list, tuple)):
                    raise ValueError(f"{key} must be a list of {kind}, got {d[key]!r}")
                d[key] = tuple(d[key])
        return cls(**d)

    def __post_init__(self) -> None:
        check_field_types(self)
        if not 0 <= self.data_seed <= MAX_SEED:
            raise ValueError(f"data_seed must be in [0, {MAX_SEED}], got {self.data_seed}")
        for key, block_cls in (("learner", LearnerConfig), ("reference", ReferenceConfig)):
            if not isinstance(getattr(self, key), block_cls):
                raise ValueError(f"{key} must be a {block_cls.__name__}, got "
                                 f"{getattr(self, key)!r}")
        names = {name for name, *_ in DEMO_METHODS}
        if not all(isinstance(m, str) for m in self.methods):
            raise ValueError(f"methods must be a list of names among {sorted(names)}, got "
                             f"{list(self.methods)}")
        unknown = [m for m in self.methods if m not in names]
        if unknown or "uniform" not in self.methods:
            raise ValueError(f"methods must include 'uniform' and be among {sorted(names)}, "
                             f"got {list(self.methods)}")
        if not self.seeds:
            raise ValueError("seeds must not be empty")
        if not all(isinstance(s, int) and not isinstance(s, bool) and 0 <= s <= MAX_SEED
                   for s in self.seeds):
            raise ValueError(f"seeds must be ints in [0, {MAX_SEED}], got {list(self.seeds)}")
        for key in ("seeds", "methods"):  # a repeat would count one run as two seeds
            values = list(getattr(self, key))
            if len(set(values)) != len(values):
                raise ValueError(f"{key} must not repeat, got {values}")
        if self.learner.checkpoint_every:
            raise ValueError("learner.checkpoint_every must be 0 in the demo (its learner runs "
                             "keep no checkpoints; each takes a minute or two)")
        # Set per run from `methods` and `seeds`: a learner block's own would be ignored, yet
        # saved in report.json as if it had been used.
        per_run = {"method": "methods", "selection": "methods", "seed": "seeds"}
        defaults = LearnerConfig()
        for key, source in per_run.items():
            if getattr(self.learner, key) != getattr(defaults, key):
                raise ValueError(f"learner.{key} is set per run from {source!r}; leave it out "
                                 f"(or at its default {getattr(defaults, key)!r}), got "
                                 f"{getattr(self.learner, key)!r}")
        # In the learner block these would reach every run: the live JEST methods would no
        # longer be the full-resolution baseline Flexi is compared with.
        flexi_fields = [key for key in ("score_patch_size", "multires_fraction",
                                        "multires_split", "score_view")
                        if getattr(self.learner, key) != getattr(defaults, key)]
        if flexi_fields:
            raise ValueError(" and ".join(f"learner.{key}" for key in flexi_fields)
                             + (" must stay at their defaults" if len(flexi_fields) > 1 else
                                " must stay at its default")
                             + " in the demo (every method but the -flexi one is the live, "
                             "full-resolution baseline); set flexi_score_patch_size, "
                             "flexi_multires_fraction, flexi_multires_split and "
                             "flexi_score_view for that one")
        # Checked here, not only at the first learner run, so a bad config fails before the
        # reference is trained.
        allowed = patch_sizes(IMAGE_SIZE)
        for key in ("learner", "reference"):
            patch = getattr(self, key).patch_size
            if patch not in allowed:
                raise ValueError(f"{key}.patch_size must be one of {list(allowed)} (divisors "
                                 f"of the image size {IMAGE_SIZE}), got {patch}")
        if self.flexi_score_patch_size not in allowed:
            raise ValueError(f"flexi_score_patch_size must be one of {list(allowed)} (divisors "
                             f"of the image size), got {self.flexi_score_patch_size}")
        if not 0 <= self.flexi_multires_fraction <= 1:  # NaN too
            raise ValueError(f"flexi_multires_fraction must be in [0, 1], got "
                             f"{self.flexi_multires_fraction}")
        if self.flexi_multires_split not in MULTIRES_SPLITS:
            raise ValueError(f"flexi_multires_split must be one of {list(MULTIRES_SPLITS)}, got "
                             f"{self.flexi_multires_split!r}")
        if self.flexi_score_view not in SCORE_VIEWS:
            raise ValueError(f"flexi_score_view must be one of {list(SCORE_VIEWS)}, got "
                             f"{self.flexi_score_view!r}")
        if self.cache_views not in CACHE_VIEWS:
            raise ValueError(f"cache_views must be one of {list(CACHE_VIEWS)}, got "
                             f"{self.cache_views!r}")
        cached_runs = [m for m in self.methods if m.endswith(("-cached", "-flexi"))]
        if self.cache_views != CACHE_VIEWS[0] and not cached_runs:
            # Like flexi_multires_split: a setting that changes nothing is refused.
            raise ValueError(f"cache_views={self.cache_views!r} applies only to the methods "
                             f"that read the reference cache (-cached, -flexi), and methods "
                             f"has none; leave it at {CACHE_VIEWS[0]!r}")
        scoring = {name: how for name, _, _, how in DEMO_METHODS}
        jest_runs = [m for m in self.methods if m != "uniform"]
        flexi_runs = [m for m in self.methods if scoring[m] == "flexi"]
        if flexi_runs and self.flexi_score_patch_size < self.learner.patch_size:
            raise ValueError(f"flexi_score_patch_size must be at least learner.patch_size="
                             f"{self.learner.patch_size} (Flexi scores coarser than it trains), "
                             f"got {self.flexi_score_patch_size}")
        if flexi_runs and self.flexi_multires_fraction > 0 and (self.flexi_score_patch_size
                                                  == self.learner.patch_size):
            raise ValueError(f"flexi_multires_fraction > 0 trains that share at "
                             f"flexi_score_patch_size, which equals learner.patch_size="
                             f"{self.learner.patch_size}: one resolution; give a coarser "
                             f"flexi_score_patch_size, or flexi_multires_fraction=0")
        if (flexi_runs and self.flexi_multires_fraction == 0
                and self.flexi_multires_split != MULTIRES_SPLITS[0]):
            raise ValueError(f"flexi_multires_split={self.flexi_multires_split!r} applies only "
                             f"with flexi_multires_fraction > 0 (which pairs train coarse); "
                             f"leave it at {MULTIRES_SPLITS[0]!r}")
        b, fraction = self.learner.batch_size, self.flexi_multires_fraction
        if flexi_runs and 0 < fraction < 1 and not 0 < round(b * fraction) < b:
            # Found in review: refused only when the runs were built, naming the learner's
            # multires_fraction, a field this config does not have.
            raise ValueError(f"flexi_multires_fraction={fraction} trains round(learner."
                             f"batch_size * flexi_multires_fraction) = {round(b * fraction)} "
                             f"of learner.batch_size={b} pairs at the coarse patch size: give "
                             f"a fraction in [{1 / b:.3g}, {1 - 1 / b:.3g}] (or 0 or 1)")
        if self.learner.batch_size > POOL_SIZE:
            raise ValueError(f"learner.batch_size must be in [1, {POOL_SIZE}] (digits-web's "
                             f"pool size), got {self.learner.batch_size}")
        # The learner block is learnability-joint (its method and selection are checked above),
        # so it is valid as every JEST run uses it. The splits' sizes are fixed: a batch they
        # cannot serve fails here, not in a worker after the reference has trained.
        if jest_runs:
            if self.learner.super_batch_size > POOL_SIZE:
                raise ValueError(f"learner.batch_size / (1 - learner.filter_ratio) = "
                                 f"{self.learner.super_batch_size} (the JEST methods' super-batch) "
                                 f"exceeds digits-web's pool size {POOL_SIZE}; lower "
                                 f"learner.batch_size or learner.filter_ratio")
        if self.reference.batch_size > CURATED_SIZE:
            raise ValueError(f"reference.batch_size must be in [1, {CURATED_SIZE}] (digits-web's "
                             f"curated split), got {self.reference.batch_size}")


def learner_configs(cfg: DemoConfig) -> list[tuple[str, bool, LearnerConfig]]:
    """(method name, uses the reference cache, config) of every learner run, seeds innermost."""
    spec = {name: rest for name, *rest in DEMO_METHODS}
    runs = []
    for name in cfg.methods:
        method, selection, scoring = spec[name]
        flexi = {}
        if scoring == "flexi":
            flexi = {"score_patch_size": cfg.flexi_score_patch_size,
                     "multires_fraction": cfg.flexi_multires_fraction,
                     "multires_split": cfg.flexi_multires_split,
                     "score_view": cfg.flexi_score_view}
        for seed in cfg.seeds:
            runs.append((name, scoring in ("cached", "flexi"),
                         dataclasses.replace(cfg.learner, method=method, selection=selection,
                                             seed=seed, **flexi)))
    return runs


@lru_cache(maxsize=2)
def _data(seed: int):
    return load_digits_web(seed, max_len=DEMO_MAX_TEXT_LEN)


def _run_one(data_seed: int, reference_path: str, cache_dir: str | None,
             cfg: LearnerConfig, cache_views: str = "stored") -> dict:
    """Worker: one learner run, with the version of the code that ran it. Single-threaded so
    parallel workers do not contend."""
    torch.set_num_threads(1)
    version = code_version()  # this worker's code, as imported
    data = _data(data_seed)
    if not cfg.needs_reference:  # may run while the reference is still being trained
        result = train_learner(data, cfg)
    else:
        reference = load_model(reference_path).eval()
        if cache_dir is None:
            result = train_learner(data, cfg, reference)
        else:
            cache = ReferenceCache.open(cache_dir, split=data.pool, model=reference,
                                        views=cache_views)
            result = train_learner(data, cfg, reference_embedder=cache.embeddings)
    return {**result.to_dict(), "code_version": version}


def exit_with_parent(parent_pid: int, poll_s: float = 1.0) -> None:
    """Worker initializer: end this process once its parent has died.

    A parent killed with SIGKILL (the OOM killer, `kill -9`, a scheduler) cannot stop its
    workers; they would finish their run, then wait for the next one forever. A daemon
    thread polls the parent's pid (portable, unlike Linux's PR_SET_PDEATHSIG) and exits the
    worker once it has been re-parented."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)  # the parent is gone: nothing can receive this worker's results

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


MAX_WORKERS = 256  # far above any machine's useful count; a typo's 10**11 fails in the OS


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """Worker processes for learner runs: spawned (fork + torch threads is unsafe), and
    ending themselves if this process dies without stopping them."""
    return ProcessPoolExecutor(max_workers=workers,
                               mp_context=multiprocessing.get_context("spawn"),
                               initializer=exit_with_parent, initargs=(os.getpid(),))


def stop_workers(pool: ProcessPoolExecutor) -> None:
    """Drop a pool's queued runs and end its running ones now.

    ``shutdown(cancel_futures=True)`` alone lets every running run finish first: up to a whole
    long run after the caller has already failed, and the interpreter waits for them at exit.
    So the worker processes are terminated. A learner run here returns its results and
    writes no files: what a run that ends this way had computed is lost, and the caller
    saves every run that had finished before calling this.
    """
    # Private, but there since Python 3.2 (3.14 adds a public terminate_workers()); read
    # before shutdown, which drops it.
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        process.terminate()  # a no-op for one that has exited
    running = _still_running(processes, seconds=10)
    if running:  # still there after 10 s: they ignored or outlived SIGTERM
        for process in running:
            process.kill()
        running = _still_running(running, seconds=10)
    if running:  # stuck in the kernel, or reaped by someone else (exitcode never set)
        print(f"warning: worker processes {[p.pid for p in running]} still running after "
              "SIGKILL", file=sys.stderr)


def _still_running(processes: list, seconds: float) -> list:
    """Those of `processes` that have not exited within `seconds` (one deadline for all).

    Exit is read from ``exitcode``, which reaps a finished worker, not from its sentinel: the
    sentinel closes with the worker's files, a moment before the kernel has the process exited
    (a moment long enough to see on a busy machine), and a worker that closes its files and
    lives on would look exited for good.
    """
    deadline = time.monotonic() + seconds
    running = [p for p in processes if p.exitcode is None]
    while running and time.monotonic() < deadline:
        time.sleep(0.01)
        running = [p for p in running if p.exitcode is None]
    return running


# What a demo writes into its run directory: a directory holding anything else is not one, and
# --overwrite never replaces it (found in review: any report.json passed as the mark; later,
# any *.png and anything inside runs/ or reference_cache/ went unchecked).
RUN_DIR_MARKERS = ("report.json", "demo_config.json")
_RUN_DIR_FILES = {"report.md", "report.json", "demo_config.json", "code_version.json",
                  "reference.json", "reference.safetensors", ".lock", *PLOT_FILES}


def _not_a_demos(out: Path) -> list[str]:
    """Paths under `out` (relative) that no demo writes: everything but its own files, its
    runs (runs/METHOD.json, runs/info.json, runs/finished/METHOD.seedK.json), its reference
    cache's files, what a killed write leaves (`unfinished_write`) and macOS's .DS_Store."""
    methods = {name for name, *_ in DEMO_METHODS}

    def ours(p: Path) -> bool:
        return unfinished_write(p) or p.name == ".DS_Store"

    def is_run_file(p: Path, finished: bool) -> bool:
        if not p.is_file() or p.suffix != ".json":
            return False
        if finished:  # METHOD.seedK
            method, _, seed = p.stem.rpartition(".seed")
            return method in methods and seed.isdigit()
        return p.stem in methods or p.name == "info.json"

    foreign = []
    for p in sorted(out.iterdir()):
        if ours(p) or (p.name in _RUN_DIR_FILES and p.is_file()):
            continue
        if p.name == "reference_cache" and p.is_dir():
            foreign += [f"{p.name}/{q.name}" for q in sorted(p.iterdir())
                        if not (ours(q) or q.is_file() and (
                            is_cache_file(q) or q.name == ".lock"))]
        elif p.name == "runs" and p.is_dir():
            for q in sorted(p.iterdir()):
                if ours(q) or is_run_file(q, finished=False):
                    continue
                if q.name == "finished" and q.is_dir():
                    foreign += [f"runs/finished/{r.name}" for r in sorted(q.iterdir())
                                if not (ours(r) or is_run_file(r, finished=True))]
                else:
                    foreign.append(f"runs/{q.name}")
        else:
            foreign.append(p.name)
    return foreign


def _is_demo_run_dir(out: Path) -> tuple[bool, str]:
    """(whether `out` is a demo's run directory, why not): a report.json that is a demo
    report or a demo_config.json that is a demo config, and nothing a demo does not write."""
    marked = False
    for marker, keys in (("report.json", ("methods", "config", "reference_accuracy")),
                         ("demo_config.json", ("learner", "reference", "methods"))):
        path = out / marker
        if path.is_file():
            try:
                content = read_json(path, dict)
            except (OSError, ValueError):
                continue
            marked = marked or all(k in content for k in keys)
    if not marked:
        return False, (f"it has no demo's {' or '.join(RUN_DIR_MARKERS)} (a file of that name "
                       f"that is not a demo's does not count)")
    foreign = _not_a_demos(out)
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5
                                          else "")
        return False, f"it also holds what a demo never writes: {shown}"
    return True, ""


def prepare_out_dir(out: Path, overwrite: bool, resume: bool = False) -> None:
    """Refuse to touch an existing, non-empty run directory unless overwrite is set, any other
    non-empty directory even then (a mistyped --out must not delete someone's data), and
    anything that is not a directory at all; all before any work starts."""
    if out.name in ("", ".."):  # ".", "/", "..": no run directory of its own
        raise ValueError(f"--out must name the run directory to create or replace, got "
                         f"{str(out)!r}")
    if out.is_symlink():  # found in review: refused only when moved into place, after training
        raise ValueError(f"--out {out} is a symbolic link; give the directory itself "
                         f"({os.path.realpath(out)})")
    if out.name.endswith(".partial"):
        final = out.with_name(out.name.removesuffix(".partial"))
        raise ValueError(f"--out {out} is the work directory of a demo into {final}; to continue "
                         f"it, pass --out {final} --resume")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"--out {out} exists and is not a directory")
    blocking = next((p for p in out.parents if p.exists() and not p.is_dir()), None)
    if blocking is not None:  # found in review: "[Errno 17] File exists", naming no flag
        raise FileExistsError(f"--out {out} cannot be made: {blocking} is a file, not a "
                              f"directory")
    if out.exists() and any(out.iterdir()):
        is_run, why = _is_demo_run_dir(out)
        if not is_run:
            raise FileExistsError(f"{out} is not empty and is not a demo run directory ({why}): "
                                  f"--overwrite replaces only a run directory; give another "
                                  f"--out")
        if not overwrite:
            if resume and not partial_dir(out).exists() and is_run:
                raise FileExistsError(
                    f"{out} holds a finished demo and there is no interrupted one "
                    f"({partial_dir(out)}) to resume: nothing to do. `jestkit report {out}` "
                    f"rewrites its report; --overwrite without --resume runs it again")
            also = " too (a resumed demo also replaces it when it finishes)" if resume else ""
            raise FileExistsError(f"{out} already exists and is not empty; pass --overwrite"
                                  f"{also} to replace it (its contents are kept until the new "
                                  f"run succeeds)")


def partial_dir(out: str | os.PathLike) -> Path:
    """Where a demo into `out` works until it has finished: ``OUT.partial`` beside it.

    It holds the config, the reference, its cache and every learner run finished so far; an
    interrupted demo leaves it for ``--resume``, a finished one is moved into place as `out`."""
    out = Path(out)
    return out.with_name(f"{out.name}.partial")


def _run_key(name: str, seed: int) -> str:
    return f"{name}.seed{seed}"


def _finished_runs(work: Path) -> dict[str, dict]:
    """The learner runs saved in `work` so far, by `_run_key` (atomic writes: each complete)."""
    folder = work / "runs" / "finished"
    if not folder.is_dir():
        return {}
    runs = {}
    for path in sorted(folder.glob("*.json")):
        try:  # written atomically, so damaged only by hand or by the disk
            runs[path.stem] = read_json(path, dict)
        except (OSError, ValueError) as err:
            raise ValueError(f"{err}; delete it to train that run again") from None
    return runs


# Their order only orders the report: a resume may list them in another.
_ORDER_FREE = ("methods", "seeds")


def _order_free(config: dict) -> dict:
    return {k: sorted(v) if k in _ORDER_FREE and isinstance(v, list) else v
            for k, v in config.items()}


_ABSENT = object()


def _config_differences(saved: dict, now: dict, prefix: str = "") -> list[str]:
    diffs = []
    for key in sorted(set(saved) | set(now)):
        a, b = saved.get(key, _ABSENT), now.get(key, _ABSENT)
        if isinstance(a, dict) and isinstance(b, dict):
            diffs += _config_differences(a, b, f"{prefix}{key}.")
        elif a != b:  # the sentinel equals nothing else: a missing key differs from None
            diffs.append(f"{prefix}{key}: {'absent' if a is _ABSENT else repr(a)} then, "
                         f"{'absent' if b is _ABSENT else repr(b)} now")
    return diffs


def _as_json(value):
    """`value` as it reads back from JSON (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value))


def _saved_version(path: Path) -> dict | None:
    try:
        version = json.loads(path.read_text()) if path.is_file() else None
    except ValueError:  # torn or edited by hand: no version it could be shown to match
        return None
    return version if isinstance(version, dict) else None


def _check_code_version(work: Path, done: dict[str, dict], allow_other_code: bool) -> None:
    """Refuse (or, with allow_other_code, warn) when the interrupted demo in `work`, or any
    of its saved runs, was made by other code than this: jestkit's source, torch, Python."""
    now = code_version()
    saved = {"the demo": _saved_version(work / "code_version.json")}
    saved |= {f"run {key}": result.get("code_version") for key, result in done.items()}
    other = {what: v for what, v in saved.items() if v != now}
    if not other:
        return
    what, version = next(iter(other.items()))
    mismatch = (f"the interrupted demo in {work} ({what}"
                f"{f' and {len(other) - 1} more' if len(other) > 1 else ''}) was made by "
                f"{describe_version(version)}, this is {describe_version(now)}")
    if allow_other_code:
        print(f"warning: --allow-other-code: {mismatch}; continuing it, and report.json's "
              f"config lists every version its runs were made by", file=sys.stderr)
        return
    report_only = (f"; every run has finished, so `jestkit report {work}` writes the report "
                   f"from them" if (work / "runs" / "info.json").is_file() else "")
    raise ValueError(f"--resume: {mismatch}: one report would mix results of two versions of "
                     f"the code. Continue it with the code that started it, pass "
                     f"--allow-other-code if the change cannot alter a run, or delete {work} "
                     f"to start afresh{report_only}")


def _check_resumable(work: Path, cfg: DemoConfig, allow_other_code: bool = False
                     ) -> dict[str, dict]:
    """The finished runs to reuse from the interrupted demo in `work`, once its config, every
    saved run and its reference are shown to be this demo's. Checked before any work, so a
    mismatch is an error that says what to delete, never a mixed report."""
    config_path = work / "demo_config.json"
    info_path = work / "reference.json"
    done = _finished_runs(work)
    if not config_path.is_file():
        # Killed before it wrote its config (its first act): nothing in it to reuse.
        if done or info_path.exists():
            raise FileExistsError(f"{work} holds runs but no demo_config.json, so what "
                                  f"config made them is unknown; move it away")
        return {}
    _check_code_version(work, done, allow_other_code)
    now = _as_json(asdict(cfg))
    saved_config = _with_options_of_older_versions(read_json(config_path, dict), now)
    diffs = _config_differences(_order_free(saved_config), _order_free(now))
    if diffs:
        raise ValueError(f"--resume: the interrupted demo in {work} ran another config; give "
                         f"the same config to continue it, or delete {work} to start afresh. "
                         f"Differences: " + "; ".join(diffs))
    expected = {_run_key(name, lc.seed): _as_json(asdict(lc))
                for name, _, lc in learner_configs(cfg)}
    for key, result in done.items():
        run = result.get("config")
        if isinstance(run, dict) and "multires_split" not in run and key in expected:
            # Saved before the split was an option: the split it ran with.
            run = result["config"] = {**run, "multires_split": multires_split_of_older_run(
                run, expected[key]["multires_split"])}
        if isinstance(run, dict) and "epoch_boundary" not in run:
            run = result["config"] = {**run, "epoch_boundary": EPOCH_BOUNDARY_BEFORE_OPTION}
        if isinstance(run, dict) and "score_view" not in run:
            result["config"] = {**run, "score_view": SCORE_VIEW_BEFORE_OPTION}
        if expected.get(key) != result.get("config"):
            raise ValueError(f"{work / 'runs' / 'finished' / (key + '.json')} is not a run of "
                             f"this demo's config; delete that file to train the run again")
    if info_path.is_file():
        retrain = f"delete {info_path} to train the reference again"
        try:
            reference = load_model(work / "reference.safetensors")
        except Exception as err:
            raise ValueError(f"cannot read the interrupted demo's reference ({err}); "
                             f"{retrain}") from None
        try:
            saved = read_json(info_path, dict).get("fingerprint")
        except ValueError as err:
            raise ValueError(f"{err}; {retrain}") from None
        if model_fingerprint(reference) != saved:
            raise ValueError(f"{work / 'reference.safetensors'} is not the reference this demo "
                             f"trained (its fingerprint differs); {retrain}")
    return done


def _with_options_of_older_versions(saved: dict, now: dict) -> dict:
    """A demo config saved before later options existed, as it would be saved now (`now`:
    this demo's): the -flexi runs of a multi-resolution demo trained their first-drawn picks
    at the fine patch size, in any other demo the split was never used; every sampler
    drew its epochs "tail_last"; the reference's patch was 8; and every model scored the
    augmented view, and every cache held the stored images."""
    saved = dict(saved)
    for block in ("learner", "reference"):
        if isinstance(saved.get(block), dict) and "epoch_boundary" not in saved[block]:
            saved[block] = {**saved[block], "epoch_boundary": EPOCH_BOUNDARY_BEFORE_OPTION}
    if isinstance(saved.get("reference"), dict) and "patch_size" not in saved["reference"]:
        saved["reference"] = {**saved["reference"], "patch_size": PATCH_SIZE_BEFORE_OPTION}
    if isinstance(saved.get("learner"), dict) and "multires_split" not in saved["learner"]:
        saved["learner"] = {**saved["learner"],
                            "multires_split": now["learner"]["multires_split"]}
    if isinstance(saved.get("learner"), dict) and "score_view" not in saved["learner"]:
        saved["learner"] = {**saved["learner"], "score_view": SCORE_VIEW_BEFORE_OPTION}
    saved.setdefault("flexi_score_view", SCORE_VIEW_BEFORE_OPTION)
    saved.setdefault("cache_views", "stored")
    if "flexi_multires_split" not in saved:
        multires = saved.get("flexi_multires_fraction") and any(
            name.endswith("-flexi") for name in saved.get("methods") or [])
        saved["flexi_multires_split"] = ("first_drawn_fine" if multires
                                         else now["flexi_multires_split"])
    return saved


def _lock(work: Path) -> int | None:
    """Hold an exclusive lock on ``work/.lock`` until the returned descriptor is closed: one
    demo at a time in a work directory. None (with a warning) where the file system cannot
    lock, so the demo still runs there."""
    fd = os.open(work / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise FileExistsError(f"another `jestkit demo` is working in {work}") from None
    except OSError as err:  # e.g. a network file system without flock
        os.close(fd)
        print(f"warning: cannot lock {work / '.lock'} ({err.strerror or err}); running "
              f"without a lock: start no second demo into the same --out", file=sys.stderr)
        return None
    return fd


def run_demo(cfg: DemoConfig, out_dir: str | os.PathLike, *, overwrite: bool = False,
             resume: bool = False, allow_other_code: bool = False, workers: int = 2,
             show_progress: bool = True) -> dict:
    """Run the whole demo and write report.md, report.json and plots into out_dir.

    Works in `partial_dir(out_dir)` and saves every learner run there as it finishes. An
    interrupted or failed demo keeps that directory if it holds a finished run or the trained
    reference; `resume` continues it (the same config, checked): the reference, its cache and
    the finished runs are reused, the rest trained. Without `resume` such a directory is
    refused, so nothing finished is thrown away by a plain rerun. A resume also refuses what
    other code made (jestkit's source, torch, Python: `code_version`) unless
    `allow_other_code`.
    """
    out = Path(out_dir)
    # Here, not in a worker after the reference has trained for minutes. One model at a time:
    # workers training side by side can still run out of memory together.
    vocab = WordTokenizer().vocab_size  # digits-web's: fixed, whatever the data seed
    for block in ("learner", "reference"):
        check_trainable(getattr(cfg, block), vocab, "demo config", prefix=f"{block}.")
    evaluations = -(-cfg.learner.steps // cfg.learner.eval_interval)
    if evaluations < 3:  # found in review: the mean of 1 or 2 evaluations, silently
        fix = ("learner.steps must be at least 3" if cfg.learner.steps < 3 else
               f"give learner.eval_every at most {(cfg.learner.steps - 1) // 2}, or 0 for "
               f"steps // 40")
        raise ValueError(f"demo config: learner.eval_every={cfg.learner.eval_every} gives "
                         f"{evaluations} evaluations in {cfg.learner.steps} steps; the "
                         f"protocol's final accuracy is the mean of the last 3 (the plateau "
                         f"check needs 10): {fix}")
    prepare_out_dir(out, overwrite, resume)
    work = partial_dir(out)
    if work.exists() and not work.is_dir():
        raise FileExistsError(f"{work} exists and is not a directory; move it away")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        work.mkdir()  # atomic: of two demos started at once, one creates it
        created = True
    except FileExistsError:
        created = False
        # Found in review: a user's folder named OUT.partial was taken for an interrupted
        # demo, and deleted with everything in it when the "resume" failed early.
        foreign = _not_a_demos(work)
        if foreign:
            raise FileExistsError(f"{work} holds files no demo writes ("
                                  f"{', '.join(foreign[:5])}{' ...' if len(foreign) > 5 else ''}"
                                  f"): it is not an interrupted demo of {out}; move it away "
                                  f"or give another --out") from None
    lock = _lock(work)  # before reading anything there: a running demo may be writing it
    try:
        if not created and not resume:
            n = len(_finished_runs(work))
            reference = ", reference trained" if (work / "reference.json").exists() else ""
            raise FileExistsError(f"{work} holds an interrupted demo ({n} learner runs "
                                  f"finished{reference}): pass --resume to continue it with "
                                  f"the same config, or delete it to start afresh")
        if resume and created:
            print(f"--resume: no interrupted demo at {work}; starting afresh", file=sys.stderr)
        done = {} if created else _check_resumable(work, cfg, allow_other_code)
        return _run_in_work_dir(cfg, out, work, done, workers, show_progress)
    finally:
        if lock is not None:
            os.close(lock)


def _run_in_work_dir(cfg: DemoConfig, out: Path, work: Path, done: dict[str, dict],
                     workers: int, show_progress: bool) -> dict:
    """run_demo once `work` is ours: on failure keep what finished, on success put it in
    place of `out`."""
    try:
        report = _train_and_report(cfg, work, done, workers, show_progress)
    except BaseException as err:
        finished = len(_finished_runs(work))
        has_reference = (work / "reference.json").is_file()
        if not finished and not has_reference:  # nothing worth keeping: leave no debris
            if not _not_a_demos(work):  # (and never anything a demo did not write)
                shutil.rmtree(work, ignore_errors=True)
            raise
        what = "interrupted" if not isinstance(err, Exception) else "failed"
        if (work / "runs" / "info.json").is_file():  # every run finished: the report did not
            print(f"\n{what} while writing the report; all {finished} learner runs are kept in "
                  f"{work}: rerun the same command with --resume to write the report (no "
                  f"training), or `jestkit report {work}` to write it there", file=sys.stderr)
            raise
        then = ("" if what == "interrupted" else
                " once its cause is fixed (if the fix is in the config, delete it instead: a "
                "resume takes only the config that started it)")
        print(f"\n{what}: {finished} of {len(learner_configs(cfg))} learner runs finished "
              f"({len(done)} of them before this command)"
              f"{', the reference trained' if has_reference else ''}; kept in {work}: rerun "
              f"the same command with --resume{then} to continue", file=sys.stderr)
        raise
    move_into_place(work, out)
    # Kept until now: a crash before the move leaves every run in `work` for --resume.
    shutil.rmtree(out / "runs" / "finished", ignore_errors=True)
    (out / ".lock").unlink(missing_ok=True)
    return report


def _prepare_reference(cfg: DemoConfig, data, work: Path, needs_cache: bool,
                       show_progress: bool) -> dict:
    """Train the frozen reference into `work` and cache it, or reuse the pair an interrupted
    demo completed there (the cache verified, and rebuilt where a shard is missing or
    corrupt). Returns its info for the report."""
    reference_path = work / "reference.safetensors"
    cache_dir = work / "reference_cache"
    info_path = work / "reference.json"
    if info_path.is_file():  # checked against this config by _check_resumable
        ref_info = json.loads(info_path.read_text())
        del ref_info["fingerprint"]  # for the resume check, not the report
        if needs_cache:
            build_reference_cache(load_model(reference_path).eval(), data.pool, cache_dir,
                                  views=cfg.cache_views)
        return ref_info
    # No reference.json: anything an interrupted demo left here is unfinished. Both are
    # rebuilt whole (training is deterministic), so the caching FLOPs count one full build.
    shutil.rmtree(cache_dir, ignore_errors=True)
    bar = tqdm(total=cfg.reference.steps, desc="reference", disable=not show_progress,
               leave=False)
    threads = torch.get_num_threads()
    # One thread: the reference shares the cores with the early runs for its few seconds.
    torch.set_num_threads(1)
    try:
        reference, ref_info = train_reference(data, cfg.reference,
                                              progress=lambda done, total: bar.update(1))
        save_model(reference, reference_path)
        caching_flops = 0
        if needs_cache:
            caching_flops = count_flops(lambda: build_reference_cache(
                reference, data.pool, cache_dir, views=cfg.cache_views))
    finally:
        torch.set_num_threads(threads)
        bar.close()
    ref_info["caching_flops"] = caching_flops
    # Written last: its presence says the reference and its cache are complete.
    atomic_write(info_path, json.dumps({**ref_info,
                                        "fingerprint": model_fingerprint(reference)}))
    return ref_info


def _train_and_report(cfg: DemoConfig, work: Path, done: dict[str, dict], workers: int,
                      show_progress: bool) -> dict:
    """Train the reference and every learner run not in `done` into the work directory
    `work`, saving each as it finishes, then write the report there."""
    started = time.time()
    data = _data(cfg.data_seed)
    reference_path = work / "reference.safetensors"
    cache_dir = work / "reference_cache"
    # Left by a demo stopped while it wrote its report: this command writes it afresh.
    (work / "runs" / "info.json").unlink(missing_ok=True)
    if not (work / "demo_config.json").is_file():  # the version first: a config never lacks it
        atomic_write(work / "code_version.json", json.dumps(code_version(), indent=2))
        atomic_write(work / "demo_config.json", json.dumps(asdict(cfg), indent=2))
    finished_dir = work / "runs" / "finished"
    finished_dir.mkdir(parents=True, exist_ok=True)
    # Longest runs first, so the last ones to finish are short and no core idles long.
    all_runs = sorted(learner_configs(cfg), key=lambda r: -r[2].steps * _STEP_COST[r[0]])
    runs = [r for r in all_runs if _run_key(r[0], r[2].seed) not in done]
    # While the reference trains here, the workers start the longest runs that need no
    # reference (hard_learner); the rest are queued once the reference is saved.
    early = [r for r in runs if not r[2].needs_reference][:workers]
    late = [r for r in runs if r not in early]
    results: dict[str, list[dict]] = {name: [] for name in cfg.methods}
    for key, result in done.items():
        results[key.rsplit(".seed", 1)[0]].append(result)
    pool = worker_pool(workers)
    futures = {}

    def submit(name, cached, lc):
        futures[pool.submit(_run_one, cfg.data_seed, str(reference_path),
                            str(cache_dir) if cached else None, lc,
                            cfg.cache_views)] = (name, lc)

    def save(fut) -> None:
        """Keep a finished run: in `results`, and on disk at once (--resume reuses it)."""
        name, lc = futures.pop(fut)
        try:
            result = fut.result()
        except ValueError as err:  # say which run: the worker's message cannot
            raise ValueError(f"learner run {name} seed {lc.seed}: {err}") from err
        atomic_write(finished_dir / f"{_run_key(name, lc.seed)}.json", json.dumps(result))
        results[name].append(result)

    try:
        for run in early:
            submit(*run)
        ref_info = _prepare_reference(cfg, data, work, any(cached for _, cached, _ in runs),
                                      show_progress)
        for run in late:
            submit(*run)
        with tqdm(total=len(all_runs), initial=len(done), desc="learner runs",
                  disable=not show_progress) as bar:
            for fut in as_completed(list(futures)):
                name, lc = futures[fut]
                save(fut)
                bar.set_postfix_str(f"{name} seed {lc.seed}")
                bar.update(1)
    except BaseException:
        try:  # runs that finished but were not collected yet (e.g. while the reference trained)
            for fut in [f for f in futures if f.done() and not f.cancelled()]:
                if fut.exception() is None:
                    save(fut)
        finally:
            stop_workers(pool)  # fail now: not after the running runs have finished
        raise
    pool.shutdown()
    versions = _distinct([r.get("code_version") for rs in results.values() for r in rs])
    if versions != [code_version()]:
        print(f"warning: this demo's runs were made by {len(versions)} versions of the code "
              f"(report.json's config lists them under run_code_versions)", file=sys.stderr)
    for name in results:  # seed order, whatever order they finished in
        results[name].sort(key=lambda r: r["config"]["seed"])
        atomic_write(work / "runs" / f"{name}.json", json.dumps(results[name]))

    pool_split = data.pool
    config = {
        **asdict(cfg),
        "batch_size": cfg.learner.batch_size,
        "filter_ratio": cfg.learner.filter_ratio,
        "n_chunks": cfg.learner.n_chunks,
        "steps": cfg.learner.steps,
        "pool_size": len(pool_split),
        "curated_size": len(data.curated),
        "pool_clean_fraction": NOISE_FRACTIONS[0],
        "workers": workers,
        # What made these numbers: this process's code, and every version a run was made by
        # (more than one only after --allow-other-code, or with the source edited mid-demo).
        "code_version": code_version(),
        "run_code_versions": versions,
        # Learner runs taken from an interrupted earlier demo (--resume): the wall time below
        # is this command's alone, so it leaves theirs out.
        "resumed_runs": len(done),
        "wall_time_s": None,
    }
    config["wall_time_s"] = round(time.time() - started, 1)
    # What `jestkit report` needs besides the curves, should the report itself fail below.
    atomic_write(work / "runs" / "info.json", json.dumps({"reference": ref_info,
                                                         "config": config}))
    report = build_report(results, ref_info, config)
    write_report(report, work)
    return report


def _distinct(values: list) -> list:
    out = []
    for v in values:
        if v not in out:
            out.append(v)
    return out


def print_summary(report: dict) -> None:
    print(summary_table(report))
    for caveat in caveats(report):
        print(f"\n{caveat}")
    p = report["plateau"]
    wall = report["config"].get("wall_time_s")  # absent from reports of older versions
    print(f"\nuniform moved {p['moved_points']:+.2f} points over its last quarter: "
          f"{plateau_verdict(p)}" + (f"; wall time {wall} s" if wall is not None else ""))
    if p.get("checkable", True) and not p["plateaued"]:
        moving = ("still improving" if p["moved_points"] > 0 else
                  "that fell over its last quarter (its target, the mean of its last "
                  "evaluations, is below its own earlier accuracy)")
        print(f"So these speed-ups compare with a uniform baseline {moving}, where the "
              "protocol's target assumes it has plateaued: give more steps (learner.steps). "
              "On digits-web the default demo (4 image tokens, T = 6000) plateaus; a 16-token "
              "learner (learner.patch_size 8) needs T of about 14,000: `jestkit demo --config "
              "configs/demo-T14000-all-methods-random-boundary.json` in a checkout of the "
              "repository (results in docs/results.md).")
