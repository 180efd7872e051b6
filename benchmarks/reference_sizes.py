"""How good a reference the 500 curated pairs can give: train references of several sizes and
lengths, report each one's zero-shot accuracy on `test`, its training FLOPs and wall time; or,
with ``--folds K``, choose among them without looking at `test` at all: K-fold
cross-validation on the curated pairs.

    python benchmarks/reference_sizes.py               # the grid below, ~6 min (one thread)
    python benchmarks/reference_sizes.py --quick       # smoke test, seconds
    python benchmarks/reference_sizes.py --spec '{"width": 96, "steps": 3200}'
    python benchmarks/reference_sizes.py --folds 5 --jobs 2   # the grid, cross-validated
    python benchmarks/reference_sizes.py --folds 5 --repeats 3 --jobs 2   # three deals
    python benchmarks/reference_sizes.py --folds 5 --json runs/cv.json   # also every fold's

Every reference is `jestkit.training.train_reference` on digits-web's curated split (data seed
0, captions padded as in the demo), one thread, fields not given taken from
`ReferenceConfig()` (patch 16 since it became the default; the tables in docs/results.md
measured before that reproduce with ``--patch-size 8 --epoch-boundary tail_last``); each run
is deterministic, so the table reproduces. One seed per size:
differences of a point or so are within what another seed would move.

Why: learnability is learner loss minus reference loss, so once the learner passes its
reference, wrong captions start to score as learnable (docs/results.md). A bigger, longer
trained reference is the paper's "JEST++" lever; this table is how the reference of
configs/demo-long-reference-w96.json and demo-T20000-reference-w96.json was chosen (the
largest here, without looking at any learner run), ``--folds 5`` how that of
configs/demo-*-reference-w64.json was (the highest pooled held-out accuracy), and
``--folds 5 --repeats 3`` how that of configs/demo-T20000-reference-w64-3200.json was.

Choosing by `test` accuracy would leak the split every learner is scored on into the choice of
reference, so ``--folds K`` picks by cross-validation instead: the curated pairs are dealt into
K folds, stratified by digit (seeded, `curated_folds`); each reference config is trained K
times, each time on the other K - 1 folds (same steps, batch size and seed), and scored by
zero-shot accuracy on the held-out fold's images (class prompts, as on `test`). The table
gives each config's accuracy over all held-out pairs (every curated pair is held out once;
the mean of the folds' accuracies when they are equal in size) and the spread over folds,
and names the config with the highest; `test` is never read. ``--repeats R`` deals the
folds R times (seeds 0 .. R-1, the same deals for every config; deal 0 is the one of
``--folds`` alone) and averages the deals' accuracies over all held-out pairs. A second table
then sets each config against the highest fold by fold: every config is scored on the same
held-out folds, so the paired differences cancel how hard each fold is; their standard error
is Nadeau and Bengio's corrected one (the folds share training pairs, so they are not
independent draws), a rough guide to whether the ranking is more than noise. ``--jobs J``
trains J references at a time in worker processes, one thread each (the numbers are the same
for any J: every training run is deterministic); Ctrl-C or SIGTERM stops them at once.

``--json PATH`` also writes every number measured, per run (with ``--folds``: each deal's
and fold's held-out accuracy and size), so a table can be re-analysed without retraining. The
file is rewritten atomically after each config, so an interrupted run keeps the configs it
finished (``"complete": false`` until the last); an existing file is never overwritten.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import signal
import statistics
import sys
import time
import zlib
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
import torch

from jestkit.atomic import atomic_write
from jestkit.data import EPOCH_BOUNDARIES, IMAGE_SIZE, DigitsWeb, load_digits_web
from jestkit.demo import DEMO_MAX_TEXT_LEN, MAX_WORKERS, exit_with_parent, stop_workers
from jestkit.models import patch_sizes
from jestkit.training import ReferenceConfig, train_reference

GRID = [
    {"steps": 800},  # the default demo's reference
    {"steps": 1600},  # the "strong" reference of the long-run configs
    {"steps": 3200},
    {"steps": 6400},
    {"steps": 1600, "lr": 0.002},
    {"steps": 1600, "width": 48},
    {"steps": 3200, "width": 48},
    {"steps": 1600, "width": 48, "depth": 2},
    {"steps": 3200, "width": 48, "depth": 2},
    {"steps": 1600, "width": 64},
    {"steps": 3200, "width": 64},
    {"steps": 3200, "width": 64, "depth": 2},
    {"steps": 1600, "width": 96},
    {"steps": 3200, "width": 96},
]
QUICK = [{"steps": 5, "batch_size": 16, "width": 16}, {"steps": 5, "batch_size": 16}]


def _spec(text: str) -> dict:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--spec must be a JSON object: {err}") from None
    known = {f.name for f in fields(ReferenceConfig)}
    if not isinstance(spec, dict) or not set(spec) <= known:
        raise argparse.ArgumentTypeError(
            f"--spec must be a JSON object with ReferenceConfig fields {sorted(known)}, "
            f"got {text}")
    try:
        ReferenceConfig(**spec)  # validates the values; the message names the field
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"--spec {text}: {err}") from None
    if "patch_size" in spec and (problem := _patch_problem(spec["patch_size"])):
        # ReferenceConfig knows no image size; train_reference would refuse it only after
        # the specs before it had trained.
        raise argparse.ArgumentTypeError(f"--spec {text}: patch_size {problem}")
    return spec


def _patch_problem(patch_size: int) -> str | None:
    """What is wrong with a reference patch size for digits-web's images, or None."""
    if patch_size in patch_sizes(IMAGE_SIZE):
        return None
    return (f"must be one of {list(patch_sizes(IMAGE_SIZE))} (divisors of the image size "
            f"{IMAGE_SIZE}), got {patch_size}")


def curated_folds(labels: torch.Tensor, k: int, seed: int = 0) -> list[np.ndarray]:
    """K disjoint folds of the rows of a split with these `labels` [n], stratified: each
    class's rows, in a seeded random order, are dealt round-robin, so fold sizes differ by at
    most one per class. Returns K sorted int64 arrays of row indices that cover every row."""
    labels = np.asarray(labels.cpu())
    counts = np.bincount(labels)
    smallest = int(counts[counts > 0].min()) if labels.size else 0
    if not 2 <= k <= smallest:
        raise ValueError(f"folds must be in [2, {smallest}] (the rarest class's count), got {k}")
    rng = np.random.default_rng([seed, zlib.crc32(b"reference-folds")])
    folds: list[list[int]] = [[] for _ in range(k)]
    dealt = 0  # continue the deal across classes, so no fold is always the largest
    for cls in np.flatnonzero(counts):
        for row in rng.permutation(np.flatnonzero(labels == cls)):
            folds[dealt % k].append(int(row))
            dealt += 1
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds]


def fold_data(data: DigitsWeb, folds: list[np.ndarray], i: int) -> DigitsWeb:
    """`data` with `curated` = every fold but fold i, and `test` = fold i of the curated
    pairs (what `train_reference` trains on and evaluates): the real `test` split is gone."""
    train = np.sort(np.concatenate([f for j, f in enumerate(folds) if j != i]))
    return replace(data, curated=data.curated.subset(train),
                   test=data.curated.subset(folds[i]))


_WORKER_DATA: DigitsWeb | None = None  # each worker process's own copy of the data


def _init_worker(parent_pid: int) -> None:
    global _WORKER_DATA
    exit_with_parent(parent_pid)  # as the demo's workers: not orphaned by a SIGKILLed parent
    torch.set_num_threads(1)
    _WORKER_DATA = load_digits_web(0, max_len=DEMO_MAX_TEXT_LEN)


def _train_fold(spec: dict, k: int, i: int, repeat: int = 0,
                data: DigitsWeb | None = None) -> tuple[float, int, float, float]:
    """(held-out accuracy, held-out pairs, training FLOPs, wall s) of config `spec` trained
    on every fold of the curated pairs but fold i, of the k folds dealt with seed `repeat`."""
    t0 = time.perf_counter()
    data = data if data is not None else _WORKER_DATA
    folds = curated_folds(data.curated.labels, k, seed=repeat)
    _, info = train_reference(fold_data(data, folds, i), ReferenceConfig(**spec))
    return (info["metrics"]["zero_shot_accuracy"], len(folds[i]), info["flops"],
            time.perf_counter() - t0)


def cross_validate(data: DigitsWeb, specs: list[dict], k: int, jobs: int,
                   repeats: int = 1) -> Iterator[dict]:
    """Yield, spec by spec in order as soon as its K x R runs are done (R = `repeats`
    deals of the K folds, seeds 0 .. R-1, the same for every spec): its K x R held-out
    accuracies (repeat by repeat), each repeat's pooled accuracy over all held-out pairs
    and their mean, its training FLOPs (one fold's) and its runs' summed wall s. With
    jobs > 1, runs go to `jobs` worker processes. `accuracies` and `held_out` (each run's
    held-out pairs) run deal by deal, fold by fold: run r * K + i is fold i of deal r."""
    tasks = [(spec, k, i, r) for spec in specs for r in range(repeats) for i in range(k)]
    pool = None
    if jobs == 1:
        runs = (_train_fold(*t, data=data) for t in tasks)
    else:
        # spawn, as the demo: fork + torch threads is unsafe
        pool = ProcessPoolExecutor(min(jobs, len(tasks)), initializer=_init_worker,
                                   initargs=(os.getpid(),),
                                   mp_context=multiprocessing.get_context("spawn"))
        runs = pool.map(_train_fold, *zip(*tasks, strict=True))  # results in task order
    try:
        for _ in specs:
            out = [next(runs) for _ in range(k * repeats)]
            # Each repeat holds every curated pair out once: its pooled accuracy is over them
            # all, and the mean over repeats is the accuracy over all R x n predictions.
            by_repeat = [out[r * k:(r + 1) * k] for r in range(repeats)]
            repeat_pooled = [sum(a * n for a, n, _, _ in o) / sum(n for _, n, _, _ in o)
                             for o in by_repeat]
            yield {"accuracies": [a for a, _, _, _ in out],
                   "held_out": [n for _, n, _, _ in out],
                   "repeat_pooled": repeat_pooled,
                   "pooled": sum(repeat_pooled) / repeats,
                   "flops": out[0][2], "wall_s": sum(w for _, _, _, w in out)}
    except BaseException:
        if pool is not None:
            stop_workers(pool)  # now, not after every queued training has run
        raise
    if pool is not None:
        pool.shutdown()


def _name(spec: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in spec.items()) or "default"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=_spec, action="append",
                        help="a ReferenceConfig as JSON (repeatable); default: the grid")
    parser.add_argument("--quick", action="store_true", help="two tiny references (smoke test)")
    parser.add_argument("--folds", type=int, default=None,
                        help="K-fold cross-validation on the curated pairs instead of test "
                             "accuracy (K >= 2)")
    parser.add_argument("--repeats", type=int, default=1,
                        help="with --folds: R deals of the K folds (seeds 0 .. R-1), K x R "
                             "runs per config (R >= 1)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="references trained at a time with --folds (one thread each)")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH",
                        help="also write every run's numbers here (a new file; rewritten "
                             "after each config)")
    parser.add_argument("--epoch-boundary", choices=EPOCH_BOUNDARIES, default="random",
                        help="how the curated sampler starts each epoch, for every config "
                             "without its own (default: random; the results in "
                             "docs/results.md were measured with tail_last)")
    parser.add_argument("--patch-size", type=int, default=None,
                        help="the references' patch size, for every config without its own "
                             "(default: ReferenceConfig's, 16; the tables in docs/results.md "
                             "before the default became 16 were measured with 8)")
    args = parser.parse_args(argv)
    if args.patch_size is not None and (problem := _patch_problem(args.patch_size)):
        parser.error(f"--patch-size {problem}")
    if not 1 <= args.jobs <= MAX_WORKERS:  # as the demo's --workers
        parser.error(f"--jobs must be in [1, {MAX_WORKERS}], got {args.jobs}")
    if args.jobs > 1 and args.folds is None:
        parser.error("--jobs needs --folds (the test-accuracy table trains one at a time)")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.repeats > 1 and args.folds is None:
        parser.error("--repeats needs --folds")
    if args.json is not None and args.json.exists():
        parser.error(f"--json {args.json}: it exists; give a new path (nothing is overwritten)")
    specs = args.spec or (QUICK if args.quick else GRID)
    if args.epoch_boundary != "random":  # named in each row: a config unlike the default
        specs = [{**spec, "epoch_boundary": spec.get("epoch_boundary", args.epoch_boundary)}
                 for spec in specs]
    if args.patch_size is not None:  # named in each row, like the epoch rule
        specs = [{**spec, "patch_size": spec.get("patch_size", args.patch_size)}
                 for spec in specs]
    torch.set_num_threads(1)
    data = load_digits_web(0, max_len=DEMO_MAX_TEXT_LEN)
    train_size, what = len(data.curated), "the curated split's size"
    if args.folds is not None:
        try:
            deals = [curated_folds(data.curated.labels, args.folds, seed=r)
                     for r in range(args.repeats)]
        except ValueError as err:
            parser.error(f"--{err}")
        train_size = min(len(data.curated) - len(f) for folds in deals for f in folds)
        what = f"the pairs one fold trains on, of {len(data.curated)} in {args.folds} folds"
    for spec in specs:  # before any training, not after the first references
        if ReferenceConfig(**spec).batch_size > train_size:
            parser.error(f"--spec {json.dumps(spec)}: batch_size must be in [1, "
                         f"{train_size}] ({what})")
    default = asdict(ReferenceConfig())
    record = _Record(args.json, {"torch": torch.__version__, "defaults": default,
                                 "folds": args.folds, "repeats": args.repeats,
                                 "specs": specs})
    if args.folds is not None:
        return _print_cross_validation(data, specs, args.folds, args.jobs, default,
                                       args.repeats, record)
    print(f"torch {torch.__version__}, 1 thread; curated split: {len(data.curated)} pairs; "
          f"defaults {default}\n")
    print("| reference (fields given; the rest default) | zero-shot acc. on test | "
          "training TFLOP | wall s |")
    print("|---|---|---|---|")
    for spec in specs:
        t0 = time.perf_counter()
        _, info = train_reference(data, ReferenceConfig(**spec))
        wall_s = time.perf_counter() - t0
        print(f"| {_name(spec)} | {100 * info['metrics']['zero_shot_accuracy']:.1f}% | "
              f"{info['flops'] / 1e12:.3f} | {wall_s:.1f} |", flush=True)
        record.add({"spec": spec, "test_accuracy": info["metrics"]["zero_shot_accuracy"],
                    "flops": info["flops"], "wall_s": wall_s})
    return 0


class _Record:
    """The ``--json`` file: the setup, then one entry per config as it finishes, rewritten
    atomically each time (a reader never sees half a file; an interrupted run keeps what it
    finished). A no-op without a path."""

    def __init__(self, path: Path | None, setup: dict) -> None:
        self.path, self.data = path, {**setup, "complete": False, "results": []}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, result: dict) -> None:
        self.data["results"].append(result)
        self.data["complete"] = len(self.data["results"]) == len(self.data["specs"])
        if self.path is not None:
            atomic_write(self.path, json.dumps(self.data, indent=1) + "\n")


def _print_cross_validation(data: DigitsWeb, specs: list[dict], k: int, jobs: int,
                            default: dict, repeats: int, record: _Record) -> int:
    t0 = time.perf_counter()
    runs = k * repeats * len(specs)
    deals = f"{repeats} deals (seeds 0-{repeats - 1}) of " if repeats > 1 else ""
    print(f"torch {torch.__version__}, 1 thread per run, {min(jobs, runs)} at a time; "
          f"{deals}{k}-fold cross-validation on the curated pairs (stratified by digit), test "
          f"never read; defaults {default}\n")
    # One deal: each fold's accuracy. Several: each deal's accuracy over all held-out pairs.
    each = "per fold" if repeats == 1 else "per deal (all held-out pairs)"
    print("| reference (fields given; the rest default) | held-out zero-shot acc. (all held-out "
          f"pairs; ± std over folds) | {each} | training TFLOP (one fold) | wall s (all folds) |")
    print("|---|---|---|---|---|", flush=True)
    results = []
    for spec, r in zip(specs, cross_validate(data, specs, k, jobs, repeats), strict=True):
        accs = [100 * a for a in r["accuracies"]]
        shown = accs if repeats == 1 else [100 * a for a in r["repeat_pooled"]]
        results.append(r)
        record.add({"spec": spec, "pooled": r["pooled"], "repeat_pooled": r["repeat_pooled"],
                    "runs": [{"deal": j // k, "fold": j % k, "held_out_accuracy": a,
                              "held_out_pairs": n}
                             for j, (a, n) in enumerate(zip(r["accuracies"], r["held_out"],
                                                            strict=True))],
                    "flops": r["flops"], "wall_s": r["wall_s"]})
        print(f"| {_name(spec)} | {100 * r['pooled']:.1f} ± {statistics.stdev(accs):.1f}% "
              f"| {', '.join(f'{a:.1f}' for a in shown)} | {r['flops'] / 1e12:.3f} "
              f"| {r['wall_s']:.1f} |", flush=True)
    best = max(range(len(specs)), key=lambda s: results[s]["pooled"])  # ties: grid order
    print(f"\nHighest held-out accuracy: {_name(specs[best])} "
          f"({100 * results[best]['pooled']:.1f}%). Took {time.perf_counter() - t0:.0f} s.")
    if len(specs) > 1:
        _print_paired(specs, results, best, k)
    return 0


def _print_paired(specs: list[dict], results: list[dict], best: int, k: int) -> None:
    """Each config against the highest, fold by fold: every config is held out on the same
    folds, so the per-fold differences cancel how hard each fold is. The K x R differences
    are not independent (a deal's folds train on overlapping pairs, and every deal reuses
    the same pairs), so stdev / sqrt(K R) would understate the error and shrink with R
    without new data; the standard error is Nadeau and Bengio's corrected one,
    stdev * sqrt(1 / (K R) + 1 / (K - 1)) (held-out over training pairs), still a heuristic."""
    n = len(results[best]["accuracies"])
    print(f"\nAgainst the highest, paired over the same {n} held-out folds (difference in "
          "points, weighted by fold size: mean ± corrected standard error; folds where it is "
          "at least as high):\n")
    print("| reference | difference | folds ≥ the highest |")
    print("|---|---|---|")
    for s, r in enumerate(results):
        if s == best:
            continue
        diffs = [100 * (a - b) for a, b in zip(r["accuracies"], results[best]["accuracies"],
                                               strict=True)]
        # The difference of pooled accuracies: the fold-size-weighted mean of `diffs`.
        mean = 100 * (r["pooled"] - results[best]["pooled"])
        se = statistics.stdev(diffs) * (1 / n + 1 / (k - 1)) ** 0.5
        print(f"| {_name(specs[s])} | {mean:+.1f} ± {se:.1f} "
              f"| {sum(d >= 0 for d in diffs)} of {n} |")


if __name__ == "__main__":
    # SIGTERM ends the run as Ctrl-C does: worker processes stopped.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
