"""Per-step cost of JEST against uniform training: FLOPs by phase and measured wall time.

Variants (all with the demo's model sizes, taken from ``DemoConfig()`` or ``--config``: by
default learner image width 48, text width 16, at patch 16 (4 image tokens); reference image
width 32, text width 16, at patch 16; ``--config configs/demo-16-tokens.json``: both at patch
8, 16 tokens; sub-batch b = 64, one thread; "coarse" below is the config's
``flexi_score_patch_size``: 32 by default, 16 for the 16-token config):

  uniform             b = 64, no scoring (N = b);
  live                learnability, joint, K = 16: learner and reference score the super-batch
                      of N = b / (1 - f) at full resolution;
  cached              the reference's embeddings come from a ``ReferenceCache`` (looked up by
                      example id); the learner scores live at full resolution;
  cached+flexi        cached, and the learner scores at the coarse patch (the demo's Flexi
                      setting: ``multires_fraction`` from the config, 0 by default);
  cached+flexi+multires  as cached+flexi, and half of each sub-batch is trained at the coarse
                      patch (``multires_fraction=0.5``, the paper's recipe);

each JEST variant at f = 0.5, 0.8, 0.9.

The step loop mirrors ``jestkit.training.train_learner`` line for line (``sampler.next()``,
``_select``, the sub-batch gather, ``_train_step``) and calls the same internal functions, so
only training steps are timed (``train_learner`` also evaluates at the end of a run). Before
timing, every variant runs a few steps through this loop *and* through ``train_learner`` with
the same config and checks that both give the same FLOP ledger and the same training loss: the
benchmark times the library's code path, not a copy that could drift.

FLOPs come from the library's own meter (``_FlopMeter``: torch's FlopCounterMode, once per
shape) in the phases of the ledger (train, learner_scoring, reference_scoring, selection: the
selector's own pairwise matmuls). All of them are in the FLOP ratio the targets use; the ratio
without the selector's FLOPs (how earlier rounds counted) is given beside it.

Timing: each variant keeps its own model, optimizer, sampler and generators; after a warm-up
the variants take turns in rounds (order rotated each round) so that load from other
processes hits all alike. Per-step wall time is reported as the median and interquartile
range over all timed steps; the ratio against uniform is the ratio of medians, with the range
of the per-round ratios beside it. Each phase of a step is timed too (sampling, learner
scoring, reference scoring or cache lookup, selection, train forward+backward, optimizer).

A second measurement quantifies fixed per-call overhead: single forward passes of the learner
at several batch sizes and both patch sizes, time against FLOPs, fitted as
t = t0 + FLOPs / rate.

Run from the repository root::

    python benchmarks/step_overhead.py --quick            # smoke test (< 1 min)
    python benchmarks/step_overhead.py --out docs/step_overhead.md

``--config configs/X.json`` benchmarks another demo config's models and Flexi setting
instead of the default demo's (e.g. ``configs/demo-64-tokens.json``: the learner at patch 4,
64 image tokens, scoring at patch 8). Everything above then reads with that config's numbers:
the training patch is ``learner.patch_size``, the coarse one ``flexi_score_patch_size``, and
cached+flexi trains ``flexi_multires_fraction`` of each sub-batch at it; when that fraction is
0.5 cached+flexi *is* cached+flexi+multires, which is then not timed a second time.

``--out`` writes the results between ``<!-- step_overhead:start -->`` and
``<!-- step_overhead:end -->`` (``--section NAME``: ``<!-- NAME:start -->`` …), keeping the
text around them; a new file is created with just the section, and an existing file without
the markers is refused before anything is timed.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import torch
from _markdown import check_outputs, command_line, load_demo_config, publish

from jestkit.cache import build_reference_cache
from jestkit.data import POOL_SIZE, SuperBatchSampler, load_digits_web
from jestkit.demo import DEMO_MAX_TEXT_LEN, DemoConfig
from jestkit.flops import FlopLedger, count_flops
from jestkit.models import DualEncoder
from jestkit.selection import JointSelector
from jestkit.training import (
    LearnerConfig,
    ReferenceConfig,
    _FlopMeter,
    _optimizer,
    _order_for_training,
    _select,
    _train_step,
    model_config,
    train_learner,
)

FILTER_RATIOS = (0.5, 0.8, 0.9)
JEST_KINDS = ("live", "cached", "cached+flexi", "cached+flexi+multires")
FLOP_TARGET = 1.3  # cached+flexi at f = 0.8: FLOPs/step <= 1.3x uniform's
TIME_TOLERANCE = 0.15  # measured time ratio within 15% of the FLOP-implied ratio
TARGET_F = 0.8
PHASES = ("sample", "learner_scoring", "reference_scoring", "cache_lookup", "selection",
          "train_fwd_bwd", "optimizer", "other")


class Setup(NamedTuple):
    """What is benchmarked: the learner and reference configs and the Flexi setting of a demo
    config (`DemoConfig()` by default; ``--config FILE`` for another, e.g.
    ``configs/demo-64-tokens.json``: a learner at patch 4)."""

    learner: LearnerConfig
    reference: ReferenceConfig
    flexi_patch: int  # the coarse scoring patch of the flexi variants
    multires: dict[str, float]  # flexi variant -> fraction of each sub-batch trained coarse
    multires_split: str = "random"  # which part trains coarse (the demo config's)
    score_view: str = "augmented"  # which images the flexi variants score (the demo config's)
    cache_views: str = "stored"  # which images the cache embeds (the demo config's)

    @classmethod
    def from_demo(cls, demo: DemoConfig) -> Setup:
        return cls(demo.learner, demo.reference, demo.flexi_score_patch_size,
                   {"cached+flexi": demo.flexi_multires_fraction, "cached+flexi+multires": 0.5},
                   demo.flexi_multires_split, demo.flexi_score_view, demo.cache_views)


DEMO_SETUP = Setup.from_demo(DemoConfig())


# --- variants --------------------------------------------------------------------------------


def variant_config(kind: str, f: float | None, seed: int, setup: Setup) -> LearnerConfig:
    """The setup's learner config (every field: sizes, heads, optimizer) as `kind` at f."""
    base = dataclasses.replace(setup.learner, seed=seed, selection="joint", score_patch_size=0,
                               multires_fraction=0.0)
    if kind == "uniform":
        return dataclasses.replace(base, method="uniform")
    if kind in setup.multires:
        return dataclasses.replace(base, method="learnability", filter_ratio=f,
                                   score_patch_size=setup.flexi_patch,
                                   multires_fraction=setup.multires[kind],
                                   multires_split=setup.multires_split,
                                   score_view=setup.score_view)
    return dataclasses.replace(base, method="learnability", filter_ratio=f)


class _Clock:
    """Wall time (perf_counter) and CPU time of this thread (thread_time) per phase of a step.
    With one torch thread all of a step's work runs on this thread, so its CPU time is the
    work done, less sensitive than wall time to other processes taking the CPU."""

    def __init__(self):
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def clear(self) -> None:
        self.wall.clear()
        self.cpu.clear()

    def add(self, name: str, wall: float, cpu: float) -> None:
        self.wall[name] = self.wall.get(name, 0.0) + wall
        self.cpu[name] = self.cpu.get(name, 0.0) + cpu

    def time(self, name: str, fn):
        w0, c0 = time.perf_counter(), time.thread_time()
        out = fn()
        self.add(name, time.perf_counter() - w0, time.thread_time() - c0)
        return out


class _TimedMeter(_FlopMeter):
    """The library's FLOP meter, also timing each phase it runs."""

    def __init__(self, ledger, clock: _Clock):
        super().__init__(ledger)
        self.clock = clock

    def run(self, phase, key, fn):
        name = "train_fwd_bwd" if phase == "train" else phase
        return self.clock.time(name, lambda: super(_TimedMeter, self).run(phase, key, fn))


class _Timed:
    """Wraps a callable (the cache's embedder) to time it; its first call is also run under
    torch's FLOP counter (the FLOPs depend on shapes only). The selector needs no wrapper:
    `_select` runs it as the meter's "selection" phase, which `_TimedMeter` times."""

    def __init__(self, fn, name: str, clock: _Clock):
        self.fn, self.name, self.clock = fn, name, clock
        self.flops: int | None = None

    def __call__(self, *args, **kwargs):
        if self.flops is None:
            out = []
            self.flops = self.clock.time(
                self.name, lambda: count_flops(lambda: out.append(self.fn(*args, **kwargs))))
            return out[0]
        return self.clock.time(self.name, lambda: self.fn(*args, **kwargs))


class Runner:
    """One variant's training state, built exactly as `train_learner` builds it, and its step
    (the body of `train_learner`'s loop without evaluation and checkpoints)."""

    def __init__(self, name: str, cfg: LearnerConfig, data, reference, cache):
        self.name, self.cfg, self.data = name, cfg, data
        self.clock = _Clock()
        model_cfg = model_config(cfg, data.tokenizer.vocab_size)  # as train_learner
        self.model = DualEncoder(model_cfg, seed=cfg.seed)
        self.opt = _optimizer(self.model, cfg)
        self.sampler = SuperBatchSampler(data.pool, cfg.super_batch_size, seed=cfg.seed,
                                         epoch_boundary=cfg.epoch_boundary)
        self.select_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1)
        self.selector = None  # timed, and its FLOPs counted, by the meter's "selection" phase
        if cfg.method != "uniform":
            self.selector = JointSelector(cfg.method, batch_size=cfg.batch_size,
                                          n_chunks=cfg.n_chunks, selection=cfg.selection)
        self.ledger = FlopLedger()
        self.meter = _TimedMeter(self.ledger, self.clock)
        self.train_patches = (None,)
        if cfg.score_patch_size and cfg.multires_fraction > 0:
            self.train_patches = (model_cfg.patch_size, cfg.score_patch_size)
        self.reference = reference
        self.embedder = None
        if cache is not None:
            self.embedder = _Timed(cache.embeddings, "cache_lookup", self.clock)
        self.clean_seen = [0, 0]
        self.step_index = 0
        self.model.train()
        self.times: list[float] = []  # wall time of each timed step
        self.cpu_times: list[float] = []  # thread CPU time of each timed step
        self.round_times: list[list[float]] = []
        self.round_cpu: list[list[float]] = []
        self.phase_wall: list[dict[str, float]] = []
        self.phase_cpu: list[dict[str, float]] = []
        self.last_loss = float("nan")

    def step(self) -> tuple[float, float]:
        """One training step; returns its (wall, CPU) time in seconds."""
        cfg, data, clock = self.cfg, self.data, self.clock
        clock.clear()
        w0, c0 = time.perf_counter(), time.thread_time()
        batch = clock.time("sample", self.sampler.next)
        if self.selector is not None:
            idx = _select(batch, self.model, cfg, self.selector, self.select_gen, self.meter,
                          self.reference, self.embedder, data.pool)
            idx = _order_for_training(idx, cfg, self.train_patches, self.select_gen)
            batch = batch.take(idx)
        self.clean_seen[0] += int(data.pool.is_clean[batch.indices].sum())  # as in the loop
        self.clean_seen[1] += len(batch.indices)
        self.last_loss = clock.time("train_step", lambda: _train_step(
            self.model, self.opt, batch.images, batch.tokens, self.step_index, cfg, self.meter,
            self.train_patches, cfg.multires_fraction))
        wall, cpu = time.perf_counter() - w0, time.thread_time() - c0
        self.step_index += 1
        for src, total, out in ((clock.wall, wall, self.phase_wall),
                                (clock.cpu, cpu, self.phase_cpu)):
            phases = {p: src.get(p, 0.0) for p in PHASES}
            phases["optimizer"] = src["train_step"] - phases["train_fwd_bwd"]
            phases["other"] = total - sum(phases[p] for p in PHASES if p != "other")
            out.append(phases)
        return wall, cpu

    def flops_per_step(self) -> dict[str, float]:
        n = max(1, self.step_index)
        return {k: v / n for k, v in self.ledger.as_dict().items()}

    def total_flops_per_step(self) -> float:
        """The ledger's total (all phases but the reference's own training) per step."""
        return self.ledger.total() / max(1, self.step_index)


def check_faithful(runner_factory, cfg, data, reference, cache, steps: int) -> dict:
    """Run `steps` steps through the benchmark loop and through `train_learner`; the FLOP
    ledgers and final training losses must agree exactly."""
    runner = runner_factory()
    for _ in range(steps):
        runner.step()
    cfg_run = dataclasses.replace(cfg, steps=steps, eval_every=steps)
    result = train_learner(data, cfg_run, reference,
                           reference_embedder=cache.embeddings if cache is not None else None)
    ours, theirs = runner.ledger.as_dict(), result.cumulative_flops[-1]
    same = ours == theirs and runner.last_loss == result.train_loss[-1]
    return {"variant": runner.name, "steps": steps, "ledger_bench": ours,
            "ledger_train_learner": theirs, "loss_bench": runner.last_loss,
            "loss_train_learner": result.train_loss[-1], "identical": same}


# --- statistics ------------------------------------------------------------------------------


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return q[0], statistics.median(xs), q[2]


# --- per-call overhead -----------------------------------------------------------------------


def _interleaved(calls: dict, repeats: int) -> dict:
    """Wall and thread-CPU times of each call, `repeats` rounds, order rotated per round."""
    keys = list(calls)
    for k in keys:  # warm-up
        calls[k]()
    wall: dict = {k: [] for k in keys}
    cpu: dict = {k: [] for k in keys}
    for r in range(repeats):
        for k in keys[r % len(keys):] + keys[:r % len(keys)]:
            w0, c0 = time.perf_counter(), time.thread_time()
            calls[k]()
            wall[k].append(time.perf_counter() - w0)
            cpu[k].append(time.thread_time() - c0)
    return {k: (quartiles(wall[k]), statistics.median(cpu[k])) for k in keys}


def _fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares t = t0 + flops / rate; returns (t0, rate)."""
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x, _ in points)
    return my - slope * mx, 1.0 / slope


def per_call_overhead(data, seed: int, batches: list[int], repeats: int,
                      setup: Setup) -> dict:
    """Fixed per-call cost, measured two ways.

    1. Single no-grad learner forwards (whole model, image tower, text tower) at the
       training patch (8 in the demo) and the Flexi scoring patch (16) for several batch
       sizes; t = t0 + FLOPs / rate fitted over the whole-model points.
    2. One `_train_step` (forward + backward + AdamW step) on the sub-batch of b = 64 as one
       part at the training patch (uniform, live, cached) against the Flexi split into two
       parts of 32 (training and scoring patch), and each part alone.
    """
    learner, coarse = setup.learner, setup.flexi_patch
    model_cfg = model_config(learner, data.tokenizer.vocab_size)
    model = DualEncoder(model_cfg, seed=seed).eval()
    images, tokens = data.pool.images, data.pool.tokens
    fine = model_cfg.patch_size
    configs = [(what, n, p) for n in batches for p in (fine, coarse)
               for what in ("model", "image", "text") if what != "text" or p == fine]

    def call(what, n, p):
        with torch.no_grad():
            if what == "model":
                return model(images[:n], tokens[:n], p)
            if what == "text":
                return model.encode_text(tokens[:n])
            return model.encode_image(images[:n], p)

    flops = {c: count_flops(lambda c=c: call(*c)) for c in configs}
    timed = _interleaved({c: (lambda c=c: call(*c)) for c in configs}, repeats)
    rows = []
    for c in configs:
        (q1, med, q3), cpu = timed[c]
        rows.append({"what": c[0], "n": c[1], "patch": c[2], "flops": flops[c],
                     "median_s": med, "q1_s": q1, "q3_s": q3, "cpu_median_s": cpu})
    fit_wall = _fit([(r["flops"], r["median_s"]) for r in rows if r["what"] == "model"])
    fit_cpu = _fit([(r["flops"], r["cpu_median_s"]) for r in rows if r["what"] == "model"])

    # Training steps: the library's _train_step, on a learner in train mode.
    train_model = DualEncoder(model_cfg, seed=seed).train()
    b = learner.batch_size
    half = b // 2
    uniform = variant_config("uniform", None, seed, setup)
    train_cfgs = {  # name: (batch, patch_sizes, config)
        f"{b}@p{fine} (one part)": (b, (None,), uniform),
        f"{half}@p{fine} + {half}@p{coarse} (Flexi)": (
            b, (fine, coarse), variant_config("cached+flexi+multires", TARGET_F, seed, setup)),
        f"{half}@p{fine} (one part)": (half, (None,), uniform),
        f"{half}@p{coarse} (one part)": (half, (coarse,), uniform),
    }
    meter = _FlopMeter(FlopLedger())
    opts = {k: _optimizer(train_model, cfg) for k, (_, _, cfg) in train_cfgs.items()}
    train_calls = {}
    for k, (n, patches, cfg) in train_cfgs.items():
        def step(n=n, patches=patches, cfg=cfg, opt=opts[k]):
            _train_step(train_model, opt, images[:n], tokens[:n], 100, cfg, meter, patches,
                        cfg.multires_fraction)
        train_calls[k] = step
    train_calls_flops = {}
    for k, fn in train_calls.items():
        before = meter.ledger.train
        fn()
        train_calls_flops[k] = meter.ledger.train - before
    timed = _interleaved(train_calls, repeats)
    train_rows = []
    for k in train_calls:
        (q1, med, q3), cpu = timed[k]
        train_rows.append({"what": k, "flops": train_calls_flops[k], "median_s": med,
                           "q1_s": q1, "q3_s": q3, "cpu_median_s": cpu})
    return {"rows": rows, "fit_t0_s": fit_wall[0], "fit_rate_flops_per_s": fit_wall[1],
            "fit_cpu_t0_s": fit_cpu[0], "fit_cpu_rate_flops_per_s": fit_cpu[1],
            "base_patch": fine, "coarse_patch": coarse, "train_rows": train_rows}


# --- the run ---------------------------------------------------------------------------------


def machine_info() -> dict:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(), "loadavg_start": list(load)}


def run(args, setup: Setup) -> dict:
    torch.set_num_threads(args.threads)
    info = machine_info()
    t_start = time.time()
    data = load_digits_web(args.data_seed, max_len=DEMO_MAX_TEXT_LEN)  # as the demo
    vocab = data.tokenizer.vocab_size
    # Untrained reference: its speed does not depend on its weights.
    ref = setup.reference
    reference = DualEncoder(model_config(ref, vocab), seed=args.seed + 1000).eval()
    tmp = tempfile.TemporaryDirectory(prefix="step_overhead_cache.")
    cache = build_reference_cache(reference, data.pool, tmp.name, views=setup.cache_views)

    specs = [("uniform", "uniform", None)]
    for f in args.filter_ratios:
        for kind in args.kinds:
            specs.append((f"{kind} f={f}", kind, f))

    def factory(name, kind, f):
        cfg = variant_config(kind, f, args.seed, setup)
        use_cache = kind.startswith("cached")
        return (lambda: Runner(name, cfg, data, None if use_cache else reference,
                               cache if use_cache else None)), cfg, use_cache

    # 1. Faithfulness: the benchmark loop == train_learner (ledger and loss).
    checks = []
    if args.check_steps:
        for name, kind, f in specs:
            if args.quick and f not in (None, TARGET_F):
                continue  # --quick: uniform and the f = 0.8 variants only
            make, cfg, use_cache = factory(name, kind, f)
            checks.append(check_faithful(make, cfg, data, None if use_cache else reference,
                                         cache if use_cache else None, args.check_steps))
            print(f"check {name}: {'identical' if checks[-1]['identical'] else 'DIFFERENT'}",
                  file=sys.stderr)

    # 2. Timing, interleaved.
    runners = [factory(*s)[0]() for s in specs]
    for r in runners:
        for _ in range(args.warmup):
            r.step()
        r.phase_wall.clear()
        r.phase_cpu.clear()
    for rnd in range(args.rounds):
        k = rnd % len(runners)
        for r in runners[k:] + runners[:k]:
            ts = [r.step() for _ in range(args.steps_per_round)]
            r.round_times.append([w for w, _ in ts])
            r.round_cpu.append([c for _, c in ts])
            r.times += r.round_times[-1]
            r.cpu_times += r.round_cpu[-1]
        print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)

    # 3. Fixed per-call overhead of forwards.
    overhead = per_call_overhead(data, args.seed, args.overhead_batches,
                                 args.overhead_repeats, setup)
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else []
    info["wall_s"] = round(time.time() - t_start, 1)
    tmp.cleanup()

    base = runners[0]
    base_total = base.total_flops_per_step()
    base_med = statistics.median(base.times)
    base_cpu = statistics.median(base.cpu_times)
    rows = []
    for (name, kind, f), r in zip(specs, runners, strict=True):
        fl = r.flops_per_step()
        total = r.total_flops_per_step()
        without_selector = (total - fl["selection"]) / base_total  # as earlier rounds counted
        q1, med, q3 = quartiles(r.times)
        round_ratios = [statistics.median(a) / statistics.median(b)
                        for a, b in zip(r.round_times, base.round_times, strict=True)]
        round_cpu = [statistics.median(a) / statistics.median(b)
                     for a, b in zip(r.round_cpu, base.round_cpu, strict=True)]
        flop_ratio = total / base_total
        time_ratio = med / base_med
        cpu_med = statistics.median(r.cpu_times)
        phases = {p: statistics.median(pt[p] for pt in r.phase_wall) for p in PHASES}
        phases_cpu = {p: statistics.median(pt[p] for pt in r.phase_cpu) for p in PHASES}
        rows.append({"variant": name, "kind": kind, "f": f, "N": r.cfg.super_batch_size,
                     "flops": fl, "flops_total": total, "flop_ratio": flop_ratio,
                     "flop_ratio_without_selector": without_selector,
                     "excess_without_selector": time_ratio / without_selector - 1,
                     "time_median_s": med, "time_q1_s": q1, "time_q3_s": q3,
                     "n_steps": len(r.times), "time_ratio": time_ratio,
                     "round_ratio_min": min(round_ratios), "round_ratio_max": max(round_ratios),
                     "excess": time_ratio / flop_ratio - 1, "phase_median_s": phases,
                     "phase_cpu_median_s": phases_cpu,
                     "cpu_median_s": cpu_med, "cpu_ratio": cpu_med / base_cpu,
                     "cpu_round_ratio_min": min(round_cpu), "cpu_round_ratio_max": max(round_cpu),
                     "cpu_excess": cpu_med / base_cpu / flop_ratio - 1})
    target = next((row for row in rows if row["kind"] == "cached+flexi"
                   and row["f"] == TARGET_F), None)
    targets = {}
    if target is not None:
        targets = {
            "flops": {"value": target["flop_ratio"], "limit": FLOP_TARGET,
                      "pass": target["flop_ratio"] <= FLOP_TARGET},
            "time": {"value": target["excess"], "limit": TIME_TOLERANCE,
                     "pass": abs(target["excess"]) <= TIME_TOLERANCE},
            "cpu_time": {"value": target["cpu_excess"], "limit": TIME_TOLERANCE,
                         "pass": abs(target["cpu_excess"]) <= TIME_TOLERANCE},
            "flops_without_selector": target["flop_ratio_without_selector"],
            "time_without_selector": target["excess_without_selector"],
        }
    return {"machine": info, "args": vars(args), "checks": checks, "rows": rows,
            "targets": targets, "overhead": overhead, "cache_views": setup.cache_views}


# --- markdown --------------------------------------------------------------------------------


def _g(x: float) -> str:
    return f"{x / 1e6:.1f}"


def _ms(x: float) -> str:
    return f"{x * 1e3:.1f}"


def markdown(res: dict, command: str) -> str:
    m = res["machine"]
    lines = [
        f"Command: `{command}`",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} thread), Python {m['python']}; load average "
        f"{m['loadavg_start'][0]:.2f} at start, "
        f"{m['loadavg_end'][0] if m['loadavg_end'] else float('nan'):.2f} at end; "
        f"run took {m['wall_s']} s.",
        "",
    ]
    if res["checks"]:
        ok = all(c["identical"] for c in res["checks"])
        which = ("every variant" if len(res["checks"]) == len(res["rows"])
                 else ", ".join(c["variant"] for c in res["checks"]))
        lines += [f"Faithfulness: for {which}, {res['checks'][0]['steps']} steps of the "
                  f"benchmark loop and `train_learner` with the same config gave "
                  f"{'identical' if ok else 'DIFFERENT'} FLOP ledgers and training losses.", ""]
    if res.get("cache_views", "stored") != "stored":  # absent from results before the option
        lines += [f"The cached variants look up a reference cache of views="
                  f"{res['cache_views']!r} (every shifted view of each image: the view each "
                  f"super-batch row was drawn in).", ""]
    a = res["args"]
    lines += [
        f"Timing: {a['warmup']} warm-up steps, then {a['rounds']} rounds x "
        f"{a['steps_per_round']} steps per variant, interleaved "
        f"({a['rounds'] * a['steps_per_round']} timed steps per variant). MFLOP per step from "
        f"the ledger; \"selection\" = the selector's own matmuls (a ledger phase, in the total and "
        f"the ratio). Implied = FLOP ratio, the time ratio if time were proportional to FLOPs.",
        "",
        "| variant | f | N | MFLOP/step total | train | learner scoring | reference scoring "
        "| selection | FLOP ratio | time/step ms median [IQR] | time ratio [per-round range] "
        "| implied | measured/implied − 1 | CPU ms/step median | CPU ratio [per-round range] "
        "| CPU/implied − 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in res["rows"]:
        fl = r["flops"]
        lines.append(
            f"| {r['kind']} | {r['f'] if r['f'] is not None else '–'} | {r['N']} | "
            f"{_g(r['flops_total'])} | {_g(fl['train'])} | {_g(fl['learner_scoring'])} | "
            f"{_g(fl['reference_scoring'])} | {_g(fl['selection'])} | "
            f"{r['flop_ratio']:.2f} | {_ms(r['time_median_s'])} "
            f"[{_ms(r['time_q1_s'])}–{_ms(r['time_q3_s'])}] | {r['time_ratio']:.2f} "
            f"[{r['round_ratio_min']:.2f}–{r['round_ratio_max']:.2f}] | "
            f"{r['flop_ratio']:.2f} | {r['excess'] * 100:+.0f}% | {_ms(r['cpu_median_s'])} | "
            f"{r['cpu_ratio']:.2f} [{r['cpu_round_ratio_min']:.2f}–"
            f"{r['cpu_round_ratio_max']:.2f}] | {r['cpu_excess'] * 100:+.0f}% |")
    lines += ["", "Median thread CPU time per phase of a step, ms (wall-time medians are in "
              "the JSON output; under load they are longer and noisier):", "",
              "| variant | f | " + " | ".join(PHASES) + " |",
              "|---|---|" + "---|" * len(PHASES)]
    for r in res["rows"]:
        ph = r["phase_cpu_median_s"]
        lines.append(f"| {r['kind']} | {r['f'] if r['f'] is not None else '–'} | "
                     + " | ".join(_ms(ph[p]) for p in PHASES) + " |")
    t = res["targets"]
    if t:
        lines += ["", f"Targets (JEST cached+flexi, f = {TARGET_F}):", "",
                  f"- FLOPs/step ≤ {FLOP_TARGET}× uniform's: {t['flops']['value']:.2f}× — "
                  f"**{'PASS' if t['flops']['pass'] else 'FAIL'}**",
                  f"- measured time ratio within {TIME_TOLERANCE:.0%} of the FLOP-implied "
                  f"ratio: measured/implied − 1 = {t['time']['value'] * 100:+.0f}% — "
                  f"**{'PASS' if t['time']['pass'] else 'FAIL'}** (on thread CPU time "
                  f"instead of wall time: {t['cpu_time']['value'] * 100:+.0f}% — "
                  f"{'PASS' if t['cpu_time']['pass'] else 'FAIL'})",
                  f"- the same without the selector's FLOPs in the ratios (as counted before "
                  f"they were a ledger phase): FLOPs/step {t['flops_without_selector']:.2f}×, "
                  f"measured/implied − 1 = {t['time_without_selector'] * 100:+.0f}%"]
    o = res["overhead"]
    lines += ["", f"Per-call overhead, (1) single no-grad learner forwards, "
              f"{a['overhead_repeats']} interleaved repeats. Fit over the whole-model points: "
              f"wall t = {o['fit_t0_s'] * 1e3:.2f} ms + FLOPs / "
              f"{o['fit_rate_flops_per_s'] / 1e9:.2f} GFLOP/s; CPU t = "
              f"{o['fit_cpu_t0_s'] * 1e3:.2f} ms + FLOPs / "
              f"{o['fit_cpu_rate_flops_per_s'] / 1e9:.2f} GFLOP/s.", "",
              "| forward | batch | patch | MFLOP | wall ms median [IQR] | CPU ms median "
              f"| CPU ratio p{o['coarse_patch']}/p{o['base_patch']} "
              f"| FLOP ratio p{o['coarse_patch']}/p{o['base_patch']} |",
              "|---|---|---|---|---|---|---|---|"]
    by = {(r["what"], r["n"], r["patch"]): r for r in o["rows"]}
    for r in o["rows"]:
        ratio_t = ratio_f = ""
        if r["patch"] == o["coarse_patch"]:
            fine = by[(r["what"], r["n"], o["base_patch"])]
            ratio_t = f"{r['cpu_median_s'] / fine['cpu_median_s']:.2f}"
            ratio_f = f"{r['flops'] / fine['flops']:.2f}"
        lines.append(f"| {r['what']} | {r['n']} | {r['patch']} | {_g(r['flops'])} | "
                     f"{_ms(r['median_s'])} [{_ms(r['q1_s'])}–{_ms(r['q3_s'])}] | "
                     f"{_ms(r['cpu_median_s'])} | {ratio_t} | {ratio_f} |")
    base_train = o["train_rows"][0]
    lines += ["", "(2) One `_train_step` (forward + backward + AdamW), same repeats:", "",
              "| training step on | MFLOP | wall ms median [IQR] | CPU ms median "
              "| CPU ratio | FLOP ratio |", "|---|---|---|---|---|---|"]
    for r in o["train_rows"]:
        lines.append(f"| {r['what']} | {_g(r['flops'])} | {_ms(r['median_s'])} "
                     f"[{_ms(r['q1_s'])}–{_ms(r['q3_s'])}] | {_ms(r['cpu_median_s'])} | "
                     f"{r['cpu_median_s'] / base_train['cpu_median_s']:.2f} | "
                     f"{r['flops'] / base_train['flops']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="smoke test (< 1 min)")
    p.add_argument("--config", type=Path,
                   help="a demo config (JSON): benchmark its learner, reference and Flexi "
                        "setting instead of the default demo's")
    p.add_argument("--out", type=Path, help="write the markdown results here")
    p.add_argument("--json", type=Path, help="write the raw results as JSON here")
    p.add_argument("--section", default="step_overhead",
                   help="--out replaces the text between <!-- SECTION:start --> and "
                        "<!-- SECTION:end --> (default: step_overhead)")
    p.add_argument("--filter-ratios", type=float, nargs="+", default=list(FILTER_RATIOS))
    p.add_argument("--kinds", nargs="+", default=list(JEST_KINDS), choices=JEST_KINDS)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--steps-per-round", type=int, default=6)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--check-steps", type=int, default=3,
                   help="steps of the benchmark loop vs train_learner per variant (0: skip)")
    p.add_argument("--overhead-batches", type=int, nargs="+", default=[64, 160, 320, 640])
    p.add_argument("--overhead-repeats", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-seed", type=int, default=0)
    args = p.parse_args(argv)
    # Every number before minutes of timing, not after (0 rounds failed only at the end).
    for name, least in (("rounds", 1), ("steps_per_round", 1), ("warmup", 0),
                        ("check_steps", 0), ("overhead_repeats", 1), ("threads", 1),
                        ("seed", 0), ("data_seed", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if not all(0 < f < 1 for f in args.filter_ratios):
        p.error(f"--filter-ratios must all be in (0, 1), got {args.filter_ratios}")
    if not all(1 <= b <= POOL_SIZE for b in args.overhead_batches):  # images[:b] of the pool
        p.error(f"--overhead-batches must all be in [1, {POOL_SIZE}], got "
                f"{args.overhead_batches}")
    check_outputs(p, args.out, args.section, args.json)
    setup = DEMO_SETUP
    if args.config:
        setup = Setup.from_demo(load_demo_config(p, args.config))
        if (setup.multires["cached+flexi"] == setup.multires["cached+flexi+multires"]
                and "cached+flexi+multires" in args.kinds and "cached+flexi" in args.kinds):
            args.kinds.remove("cached+flexi+multires")  # the same variant under two names
            print("cached+flexi trains half of each sub-batch at the coarse patch in this "
                  "config: it is cached+flexi+multires, timed once", file=sys.stderr)
    if args.quick:
        args.rounds, args.steps_per_round, args.warmup = 2, 2, 2
        args.check_steps, args.overhead_batches, args.overhead_repeats = 2, [64, 320], 3
    res = run(args, setup)
    md = markdown(res, command_line("step_overhead.py", argv))
    publish(md, res, args.json, args.out, args.section, "Step overhead of JEST")
    if not all(c["identical"] for c in res["checks"]):
        print("the benchmark loop and train_learner disagree: timings are not of the "
              "library's step", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
