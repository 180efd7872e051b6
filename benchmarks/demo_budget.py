"""What a demo config costs on this machine, and whether a longer demo fits a time budget.

The demo (`jestkit demo`) must fit in 10 minutes *and* run long enough for uniform to plateau
(issue 3). This benchmark measures the cost of each part of a demo config and prices the
demo at other lengths T:

- per method of the config (its first seed): FLOPs per training step, from the library's own
  ledger (`step_overhead.Runner`, the body of `train_learner`'s loop; a few steps are first
  run through both and must give the same ledger and loss), and its median wall time per
  step; the methods take turns in rounds, with one evaluation timed per round, so that load
  from other processes and drifts in the machine's speed hit every part alike;
- one evaluation (`evaluate` on `test`; every run evaluates every T/40 steps): FLOPs and time;
- the reference's training (FLOPs and median time of a few steps, times the config's steps)
  and the reference cache over the pool, which the demo pays once;
- the machine's float32 matmul peak for one thread (the demo's workers run one torch thread
  each), best of several 2048^3 products, from `selection_speed.measure_matmul`.

Then, for each T of ``--steps``, the demo's whole work (every method x every seed of the
config at T steps, their evaluations, the reference and the cache) in FLOPs, and two times:

- **lower bound**: those FLOPs at the measured peak on `--workers` one-thread workers (at most
  one per core). The flop counter counts matrix products (and the like) only, and leaves out
  elementwise work, Python and process start-up: a demo of that length run that way cannot
  finish sooner, unless the machine's true peak is above the measured one;
- **estimate**: the measured times per step, per evaluation, of the reference and the cache,
  spread perfectly over the workers. Not modelled: process start-up, the report, the demo's
  order of runs (longest first by an approximate cost, `demo._STEP_COST`), and two
  processes sharing the machine's caches and memory bandwidth, which one-process timings do
  not see.

Run from the repository root::

    python benchmarks/demo_budget.py            # the default demo at its own T (6000)
    python benchmarks/demo_budget.py --config configs/demo-16-tokens.json --steps 1000 12000 14000
    python benchmarks/demo_budget.py --config configs/demo-64-tokens.json --steps 1000 20000
    python benchmarks/demo_budget.py --quick    # smoke test (< 15 s)

``--out FILE`` writes the tables between ``<!-- demo_budget:start -->`` and
``<!-- demo_budget:end -->`` of FILE, keeping the text around them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _markdown import check_outputs, command_line, load_demo_config, publish
from selection_speed import measure_matmul
from step_overhead import Runner, check_faithful, machine_info

from jestkit.cache import ReferenceCache, build_reference_cache
from jestkit.data import load_digits_web
from jestkit.demo import DEMO_MAX_TEXT_LEN, DemoConfig, learner_configs
from jestkit.flops import count_flops
from jestkit.models import DualEncoder
from jestkit.training import LearnerConfig, ReferenceConfig, evaluate, train_reference

BUDGET_MIN = 10.0  # issue 3: the whole demo in <= 10 minutes
MATMUL_SIZE = 2048


def evaluations(steps: int, eval_every: int = 0) -> int:
    """How many evaluations `train_learner` runs in `steps` steps: one every
    `LearnerConfig.eval_interval` steps, and one at the last step."""
    interval = LearnerConfig(steps=steps, eval_every=eval_every).eval_interval
    return steps // interval + (steps % interval != 0)


def demo_cost(methods: dict[str, dict], seeds: int, steps: int, eval_every: int,
              evaluation: dict, once: dict, workers: int, peak_flops_per_s: float) -> dict:
    """Price a demo of `steps` steps from measured unit costs.

    Args:
        methods: name -> {"flops_per_step", "s_per_step"} of one learner step.
        seeds: runs per method.
        evaluation: {"flops", "s"} of one evaluation.
        once: {"flops", "s"} of the work done once (the reference's training, the cache).
        workers: learner runs at once (one thread each); capped at the machine's cores
            by the caller.
        peak_flops_per_s: one thread's float32 matmul peak.

    Returns {"steps", "evaluations_per_run", "flops", "lower_bound_s", "estimate_s"}: the
    whole demo's FLOPs; those FLOPs at the peak on `workers` threads; the measured unit
    times spread over `workers`.
    """
    n_eval = evaluations(steps, eval_every)
    flops = once["flops"] + seeds * sum(m["flops_per_step"] * steps + evaluation["flops"] * n_eval
                                        for m in methods.values())
    seconds = once["s"] + seeds * sum(m["s_per_step"] * steps + evaluation["s"] * n_eval
                                      for m in methods.values())
    return {"steps": steps, "evaluations_per_run": n_eval, "flops": flops,
            "lower_bound_s": flops / (peak_flops_per_s * workers),
            "estimate_s": seconds / workers}


def reference_cost(data, cfg: ReferenceConfig, timed_steps: int) -> tuple[DualEncoder, dict]:
    """Train a reference for `timed_steps` + 1 steps (at most `cfg.steps`) and price the
    config's whole training from them: FLOPs per step from the ledger, time per step the
    median of the steps after the first (which also counts FLOPs); model building and the
    final evaluation are outside the timed steps. Untrained weights score as fast as trained
    ones, so the returned model serves for the cache and live scoring too."""
    n = min(timed_steps + 1, cfg.steps)
    stamps = [time.perf_counter()]
    reference, info = train_reference(data, dataclasses.replace(cfg, steps=n),
                                      progress=lambda done, total: stamps.append(
                                          time.perf_counter()))
    per_step = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    per_step = per_step[1:] or per_step  # a 1-step reference has only its first step
    return reference, {"flops": info["flops"] / n * cfg.steps,
                       "s": statistics.median(per_step) * cfg.steps,
                       "steps": cfg.steps, "timed_steps": len(per_step)}


def measure(cfg: DemoConfig, args) -> dict:
    """Unit costs of `cfg`'s demo on this machine (one thread, as the demo's workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with tempfile.TemporaryDirectory(prefix="demo_budget_cache.") as tmp:
            return _measure(cfg, args, tmp)
    finally:
        torch.set_num_threads(threads)


def _measure(cfg: DemoConfig, args, tmp: str) -> dict:
    data = load_digits_web(cfg.data_seed, max_len=DEMO_MAX_TEXT_LEN)
    reference, ref = reference_cost(data, cfg.reference, args.reference_steps)
    cache, cached = None, {"flops": 0, "s": 0.0}
    if any(uses_cache for _, uses_cache, _ in learner_configs(cfg)):
        t0 = time.perf_counter()
        cached["flops"] = count_flops(lambda: build_reference_cache(reference, data.pool, tmp,
                                                                    views=cfg.cache_views))
        cached["s"] = time.perf_counter() - t0
        cache = ReferenceCache.open(tmp, split=data.pool, model=reference, views=cfg.cache_views)

    # One run per method (the first seed: a step costs the same whatever the seed), built as
    # the demo's workers build it (`demo._run_one`): live reference or cache.
    runners, checks = {}, []
    for name, uses_cache, lc in learner_configs(cfg):
        if lc.seed != cfg.seeds[0]:
            continue
        live = reference if lc.needs_reference and not uses_cache else None
        lookup = cache if uses_cache else None

        def make(name=name, lc=lc, live=live, lookup=lookup):
            return Runner(name, lc, data, live, lookup)
        if args.check_steps:
            checks.append(check_faithful(make, lc, data, live, lookup, args.check_steps))
        runners[name] = make()
    for r in runners.values():
        for _ in range(args.warmup):
            r.step()
    model = next(iter(runners.values())).model  # every method trains the same architecture
    eval_flops = count_flops(lambda: evaluate(model, data.test, data.tokenizer))

    # Rounds, the order rotated each round, an evaluation in every round: load from other
    # processes, and this machine's speed, which drifts by tens of percent within minutes,
    # hit every part alike.
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in [*names, "evaluation"]}
    for rnd in range(args.rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            times[name] += [runners[name].step()[0] for _ in range(args.steps_per_round)]
        t0 = time.perf_counter()
        evaluate(model, data.test, data.tokenizer)
        times["evaluation"].append(time.perf_counter() - t0)
    methods = {n: {"flops_per_step": runners[n].total_flops_per_step(),
                   "s_per_step": statistics.median(times[n]), "timed_steps": len(times[n])}
               for n in names}
    matmul = measure_matmul(1, MATMUL_SIZE, args.matmul_repeats)
    return {"methods": methods,
            "evaluation": {"flops": eval_flops, "s": statistics.median(times["evaluation"])},
            "reference": ref, "cache": cached,
            "once": {"flops": ref["flops"] + cached["flops"], "s": ref["s"] + cached["s"]},
            "peak_flops_per_s": matmul["square_gflops"] * 1e9, "matmul": matmul,
            "checks": checks, "seeds": len(cfg.seeds), "eval_every": cfg.learner.eval_every}


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def _faithfulness(checks: list[dict]) -> str:
    if not checks:
        return "not checked."
    if all(c["identical"] for c in checks):
        return "every method's benchmark loop and `train_learner` gave identical FLOP ledgers " \
               "and losses."
    return "**the benchmark loop and `train_learner` disagree.**"


def markdown(res: dict, command: str) -> str:
    m, peak = res["machine"], res["peak_flops_per_s"]
    lines = [f"Command: `{command}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; "
             f"{res['workers']} workers, one thread each; load average "
             f"{m['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at end; run "
             f"took {res['wall_s']:.0f} s.", "",
             "Faithfulness: " + _faithfulness(res["checks"]), "",
             f"Float32 matmul peak, one thread ({MATMUL_SIZE}^3, best of "
             f"{res['matmul_repeats']}): **{peak / 1e9:.1f} GFLOP/s**.", "",
             "| part | MFLOP | ms, median | GFLOP/s | % of matmul peak |", "|---|---|---|---|---|"]

    def row(what, flops, seconds):
        lines.append(f"| {what} | {flops / 1e6:,.1f} | {seconds * 1e3:,.1f} | "
                     f"{flops / seconds / 1e9:.1f} | {100 * flops / seconds / peak:.0f}% |")
    for name, u in res["methods"].items():
        row(f"one step: {name} ({u['timed_steps']} timed)", u["flops_per_step"], u["s_per_step"])
    row(f"one evaluation on `test` ({res['rounds']} timed)", res["evaluation"]["flops"],
        res["evaluation"]["s"])
    ref = res["reference"]
    row(f"the reference's training, all {ref['steps']} steps (median of {ref['timed_steps']} "
        f"timed steps x {ref['steps']})", ref["flops"], ref["s"])
    if res["cache"]["flops"]:
        row("the reference cache over the pool (once)", res["cache"]["flops"], res["cache"]["s"])
    lines += ["", f"The whole demo ({len(res['methods'])} methods x {res['seeds']} seeds, "
              f"their evaluations, the reference and its cache) at T steps, against a "
              f"{res['budget_min']:g}-minute budget. Lower bound: its FLOPs at the measured "
              f"peak on {res['workers']} one-thread workers; estimate: the measured times "
              f"spread over them.", "",
              "| T | evaluations per run | total TFLOP | lower bound, min | estimate, min | "
              "fits the budget? |", "|---|---|---|---|---|---|"]
    for c in res["demos"]:
        lb, est = c["lower_bound_s"] / 60, c["estimate_s"] / 60
        verdict = ("no, not even at the peak" if lb > res["budget_min"] else
                   "no, at the measured speed" if est > res["budget_min"] else "yes")
        lines.append(f"| {c['steps']:,} | {c['evaluations_per_run']} | "
                     f"{c['flops'] / 1e12:.1f} | {_minutes(c['lower_bound_s'])} | "
                     f"{_minutes(c['estimate_s'])} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="a demo config (JSON); default: the demo's")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="demo lengths T to price (default: the config's own, learner.steps)")
    p.add_argument("--workers", type=int, default=2,
                   help="learner runs at once, as `jestkit demo --workers` (default 2)")
    p.add_argument("--budget-min", type=float, default=BUDGET_MIN)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--check-steps", type=int, default=3,
                   help="steps of the benchmark loop vs train_learner per method (0: skip)")
    p.add_argument("--reference-steps", type=int, default=50,
                   help="reference steps timed (its FLOPs and time are scaled to the "
                        "config's steps)")
    p.add_argument("--matmul-repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="smoke test (< 15 s)")
    p.add_argument("--out", type=Path, help="write the markdown tables into this doc")
    p.add_argument("--json", type=Path, help="write the raw numbers as JSON here")
    args = p.parse_args(argv)
    for name, least in (("workers", 1), ("rounds", 1), ("steps_per_round", 1), ("warmup", 0),
                        ("check_steps", 0), ("reference_steps", 1), ("matmul_repeats", 1)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if args.steps is not None and min(args.steps) < 1:
        p.error(f"--steps must all be >= 1, got {args.steps}")
    if not args.budget_min > 0:
        p.error(f"--budget-min must be > 0, got {args.budget_min}")
    check_outputs(p, args.out, "demo_budget", args.json)  # before minutes of timing
    cfg = load_demo_config(p, args.config) if args.config else DemoConfig()
    if args.steps is None:
        args.steps = [cfg.learner.steps]
    if args.quick:
        args.rounds, args.steps_per_round, args.warmup, args.check_steps = 2, 2, 1, 2
        args.reference_steps, args.matmul_repeats = 10, 2
    started = time.time()
    info = machine_info()
    res = measure(cfg, args)
    workers = min(args.workers, os.cpu_count() or 1)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    res.update(machine=info, workers=workers, budget_min=args.budget_min, rounds=args.rounds,
               matmul_repeats=args.matmul_repeats, loadavg_end=list(load_end),
               demos=[demo_cost(res["methods"], res["seeds"], t, res["eval_every"],
                                res["evaluation"], res["once"], workers,
                                res["peak_flops_per_s"]) for t in args.steps])
    res["wall_s"] = time.time() - started
    md = markdown(res, command_line("demo_budget.py", argv))
    publish(md, res, args.json, args.out, "demo_budget", "What a demo costs")
    if res["checks"] and not all(c["identical"] for c in res["checks"]):
        print("the benchmark loop and train_learner disagree: the costs are not of the "
              "library's step", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
