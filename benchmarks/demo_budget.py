"""What a demo config costs on this machine, and whether a longer demo fits a time budget.

The demo (`jestkit demo`) must fit in 10 minutes *and* run long enough for uniform to plateau
(issue 3). This benchmark measures the cost of each part of a demo config and prices the
demo at other lengths T:

- per method of the config (seed 0): FLOPs per training step, from the library's own ledger
  (`step_overhead.Runner`, the body of `train_learner`'s loop; a few steps are first run
  through both and must give the same ledger and loss), and its median wall time per step,
  the methods taking turns in rounds so that load from other processes hits all alike;
- one evaluation (`evaluate` on `test`; every run evaluates every T/40 steps): FLOPs and time;
- the reference's training (per step, times the config's reference steps) and the reference
  cache over the pool (FLOPs and time), which the demo pays once;
- the machine's float32 matmul peak for one thread (the demo's workers run one torch thread
  each), best of several 2048^3 products, from `selection_speed.measure_matmul`.

Then, for each T of ``--steps``, the demo's whole work (every method x every seed of the
config at T steps, their evaluations, the reference and the cache) in FLOPs, and two times:

- **lower bound**: those FLOPs at the matmul peak on min(workers, cores) cores at once. The
  flop counter counts matrix products (and the like) only, which nothing here runs faster
  than the peak, and leaves out elementwise work, Python and process start-up: no demo of
  that length can finish sooner on this machine with these models;
- **estimate**: the measured time per step, per evaluation, of the reference and the cache,
  spread perfectly over the workers (the real demo packs runs by their measured cost, so it
  comes close; process start-up, the reference running beside the workers and the report
  come on top).

Run from the repository root::

    python benchmarks/demo_budget.py            # the default demo at T = 1000, 12000, 14000
    python benchmarks/demo_budget.py --config configs/demo-64-tokens.json --steps 1000 20000
    python benchmarks/demo_budget.py --quick    # smoke test (< 15 s)

``--out FILE`` writes the tables between ``<!-- demo_budget:start -->`` and
``<!-- demo_budget:end -->`` of FILE, keeping the text around them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _markdown import check_section, replace_section
from selection_speed import measure_matmul
from step_overhead import Runner, check_faithful, machine_info

from jestkit.cache import ReferenceCache, build_reference_cache
from jestkit.data import load_digits_web
from jestkit.demo import DEMO_MAX_TEXT_LEN, DemoConfig, learner_configs
from jestkit.flops import count_flops
from jestkit.training import evaluate, train_reference

DEFAULT_STEPS = (1000, 12000, 14000)  # the demo's T, and the T a plateaued uniform needs
BUDGET_MIN = 10.0  # issue 3: the whole demo in <= 10 minutes
MATMUL_SIZE = 2048


def evaluations(steps: int, eval_every: int = 0) -> int:
    """How many evaluations `train_learner` runs in `steps` steps (every `eval_every`, by
    default steps // 40, and at the last step)."""
    interval = eval_every or max(1, steps // 40)
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

    Returns {"steps", "flops", "lower_bound_s", "estimate_s"}: the whole demo's FLOPs; those
    FLOPs at the peak on `workers` threads; measured unit times over `workers`.
    """
    n_eval = evaluations(steps, eval_every)
    flops = once["flops"] + seeds * sum(m["flops_per_step"] * steps + evaluation["flops"] * n_eval
                                        for m in methods.values())
    seconds = once["s"] + seeds * sum(m["s_per_step"] * steps + evaluation["s"] * n_eval
                                      for m in methods.values())
    return {"steps": steps, "flops": flops, "lower_bound_s": flops / (peak_flops_per_s * workers),
            "estimate_s": seconds / workers}


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(cfg: DemoConfig, args) -> dict:
    """Unit costs of `cfg`'s demo on this machine (one thread, as the demo's workers)."""
    torch.set_num_threads(1)
    data = load_digits_web(cfg.data_seed, max_len=DEMO_MAX_TEXT_LEN)
    # The reference: its FLOPs and time per step, times the config's steps (untrained weights
    # score as fast as trained ones). Timed as the difference between a run of 2k and one of
    # k steps, so model building, the first step's FLOP count and the final evaluation cancel;
    # the k-step run twice, before and after, the faster kept (the first call of a process
    # also pays one-time set-up).
    k = min(args.reference_steps, max(1, cfg.reference.steps // 2))
    spent: dict[int, float] = {}
    for n in (k, 2 * k, k):
        t0 = time.perf_counter()
        reference, info = train_reference(data, dataclasses.replace(cfg.reference, steps=n))
        spent[n] = min(spent.get(n, float("inf")), time.perf_counter() - t0)
        if n == 2 * k:
            ref_flops = info["flops"] / n * cfg.reference.steps
    ref_s = max(0.0, spent[2 * k] - spent[k]) / k * cfg.reference.steps
    tmp = tempfile.TemporaryDirectory(prefix="demo_budget_cache.")
    needs_cache = any(cached for _, cached, _ in learner_configs(cfg))
    cache, cache_flops, cache_s = None, 0, 0.0
    if needs_cache:
        t0 = time.perf_counter()
        cache_flops = count_flops(lambda: build_reference_cache(reference, data.pool, tmp.name))
        cache_s = time.perf_counter() - t0
        cache = ReferenceCache.open(tmp.name, split=data.pool, model=reference)

    seed = cfg.seeds[0]
    configs = {name: (cached, lc) for name, cached, lc in learner_configs(cfg) if lc.seed == seed}
    runners, checks = {}, []
    for name, (cached, lc) in configs.items():
        live_ref = reference if lc.needs_reference and not cached else None
        use_cache = cache if cached else None

        def make(name=name, lc=lc, live_ref=live_ref, use_cache=use_cache):
            return Runner(name, lc, data, live_ref, use_cache)
        if args.check_steps:
            checks.append(check_faithful(make, lc, data, live_ref, use_cache, args.check_steps))
        runners[name] = make()
    for r in runners.values():
        for _ in range(args.warmup):
            r.step()
    names = list(runners)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rnd in range(args.rounds):
        for name in names[rnd % len(names):] + names[:rnd % len(names)]:
            for _ in range(args.steps_per_round):
                times[name].append(runners[name].step()[0])
    methods = {n: {"flops_per_step": runners[n].total_flops_per_step(),
                   "s_per_step": statistics.median(times[n]), "timed_steps": len(times[n])}
               for n in names}

    model = runners[names[0]].model  # every method trains the same architecture
    eval_flops = count_flops(lambda: evaluate(model, data.test, data.tokenizer))
    eval_s = _median_time(lambda: evaluate(model, data.test, data.tokenizer), args.eval_repeats)
    matmul = measure_matmul(1, MATMUL_SIZE, args.matmul_repeats)
    torch.set_num_threads(1)
    tmp.cleanup()
    return {"methods": methods, "evaluation": {"flops": eval_flops, "s": eval_s},
            "reference": {"flops": ref_flops, "s": ref_s, "steps": cfg.reference.steps,
                          "timed_steps": k},
            "cache": {"flops": cache_flops, "s": cache_s},
            "once": {"flops": ref_flops + cache_flops, "s": ref_s + cache_s},
            "peak_flops_per_s": matmul["square_gflops"] * 1e9, "matmul": matmul,
            "checks": checks, "seeds": len(cfg.seeds),
            "eval_every": cfg.learner.eval_every}


def _min(seconds: float) -> str:
    return f"{seconds / 60:.1f}"


def markdown(res: dict, command: str) -> str:
    m = res["machine"]
    lines = [f"Command: `{command}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; "
             f"{res['workers']} workers, one thread each; run took {res['wall_s']:.0f} s.", "",
             "Faithfulness: " + ("every method's benchmark loop and `train_learner` gave "
                                 "identical FLOP ledgers and losses." if res["checks"] and all(
                                     c["identical"] for c in res["checks"]) else
                                 "not checked." if not res["checks"] else
                                 "**the benchmark loop and `train_learner` disagree.**"), "",
             f"Float32 matmul peak, one thread ({MATMUL_SIZE}^3, best of "
             f"{res['matmul_repeats']}): **{res['peak_flops_per_s'] / 1e9:.1f} GFLOP/s**.", "",
             "| part | MFLOP per step (or once) | ms per step (or once), median | "
             "GFLOP/s | % of matmul peak |", "|---|---|---|---|---|"]
    peak = res["peak_flops_per_s"]

    def row(what, flops, seconds):
        rate = f"{flops / seconds / 1e9:.1f} | {100 * flops / seconds / peak:.0f}%" if seconds > 0 \
            else "– | –"  # a difference of two noisy times can come out at 0
        lines.append(f"| {what} | {flops / 1e6:,.1f} | {seconds * 1e3:,.1f} | {rate} |")
    for name, u in res["methods"].items():
        row(f"step: {name}", u["flops_per_step"], u["s_per_step"])
    row("one evaluation (`test`)", res["evaluation"]["flops"], res["evaluation"]["s"])
    k = res["reference"]["timed_steps"]
    row(f"reference training ({res['reference']['steps']} steps; timed as {2 * k} steps less "
        f"{k})", res["reference"]["flops"], res["reference"]["s"])
    if res["cache"]["flops"]:
        row("reference cache over the pool", res["cache"]["flops"], res["cache"]["s"])
    lines += ["", f"The whole demo ({len(res['methods'])} methods x {res['seeds']} seeds, "
              f"their evaluations, the reference and its cache) at T steps, against a "
              f"{res['budget_min']:g}-minute budget:", "",
              "| T | evaluations per run | total TFLOP | lower bound at the matmul peak, min | "
              "estimate at the measured speed, min | fits the budget? |",
              "|---|---|---|---|---|---|"]
    for c in res["demos"]:
        lb, est = c["lower_bound_s"] / 60, c["estimate_s"] / 60
        verdict = ("no, not even at the peak" if lb > res["budget_min"] else
                   "no, at the measured speed" if est > res["budget_min"] else "yes")
        lines.append(f"| {c['steps']:,} | {evaluations(c['steps'], res['eval_every'])} | "
                     f"{c['flops'] / 1e12:.1f} | {_min(c['lower_bound_s'])} | "
                     f"{_min(c['estimate_s'])} | {verdict} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="a demo config (JSON); default: the demo's")
    p.add_argument("--steps", type=int, nargs="+", default=list(DEFAULT_STEPS),
                   help="demo lengths T to price (default: 1000 12000 14000)")
    p.add_argument("--workers", type=int, default=2,
                   help="learner runs at once, as `jestkit demo --workers` (default 2)")
    p.add_argument("--budget-min", type=float, default=BUDGET_MIN)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--steps-per-round", type=int, default=5)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--check-steps", type=int, default=3,
                   help="steps of the benchmark loop vs train_learner per method (0: skip)")
    p.add_argument("--reference-steps", type=int, default=50,
                   help="reference steps timed, k: a run of 2k steps against one of k (its "
                        "FLOPs and time are scaled to the config's steps)")
    p.add_argument("--eval-repeats", type=int, default=5)
    p.add_argument("--matmul-repeats", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="smoke test (< 1 min)")
    p.add_argument("--out", type=Path, help="write the markdown tables into this doc")
    p.add_argument("--json", type=Path, help="write the raw numbers as JSON here")
    args = p.parse_args(argv)
    for name in ("workers", "rounds", "steps_per_round", "reference_steps", "eval_repeats",
                 "matmul_repeats"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if min(args.steps) < 1:
        p.error(f"--steps must all be >= 1, got {args.steps}")
    if not args.budget_min > 0:
        p.error(f"--budget-min must be > 0, got {args.budget_min}")
    check_section(args.out, "demo_budget")  # before minutes of timing, not after
    cfg = DemoConfig()
    if args.config:
        cfg = DemoConfig.from_dict(json.loads(args.config.read_text()))
    if args.quick:
        args.rounds, args.steps_per_round, args.warmup, args.check_steps = 2, 2, 1, 2
        args.reference_steps, args.eval_repeats, args.matmul_repeats = 10, 1, 2
    started = time.time()
    info = machine_info()
    res = measure(cfg, args)
    workers = min(args.workers, os.cpu_count() or 1)
    res.update(machine=info, workers=workers, budget_min=args.budget_min,
               matmul_repeats=args.matmul_repeats,
               demos=[demo_cost(res["methods"], res["seeds"], t, res["eval_every"],
                                res["evaluation"], res["once"], workers,
                                res["peak_flops_per_s"]) for t in args.steps])
    res["wall_s"] = time.time() - started
    command = "python benchmarks/demo_budget.py " + " ".join(
        argv if argv is not None else sys.argv[1:])
    md = markdown(res, command.strip())
    print(md)
    if args.out:
        replace_section(args.out, md, "demo_budget", "What a demo costs")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1, default=str))
    if res["checks"] and not all(c["identical"] for c in res["checks"]):
        print("the benchmark loop and train_learner disagree: the costs are not of the "
              "library's step", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
