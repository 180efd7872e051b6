"""Where does a method first reach the target on a finer evaluation grid than the demo's?

The demo evaluates every T / 40 steps (500 at T = 20000), so its iteration speed-up, T / the
first evaluated step at which the seed-averaged curve reaches uniform's final accuracy, can
only take the values T / (a grid step): near step 4,000 two neighbouring values are 11–14%
apart, more than issue 4's "within 10% of live". This benchmark measures the same crossing on
a finer grid without retraining whole runs:

- it retrains chosen learner runs of a *finished* demo directory (its config, reference and
  reference cache) only up to `--steps`, evaluating every `--eval-every` steps. The learning
  rate is constant after warm-up and nothing else in a run reads T, so the shorter run is the
  first `--steps` steps of the saved one;
- which it checks: at every evaluation the two grids share, the accuracy and the FLOP count
  of every phase the retraining's ledger lists must equal the saved run's, or it stops and
  names the run and step (other code, or another processor: 64-token runs differ between the
  two used here, docs/results.md);
- then it reports each method's first step on the finer grid at which its seed-averaged
  curve reaches the demo's target (from report.json), T / that step, and the compute
  speed-up there (uniform's total FLOPs, the seed mean of its saved runs, as the report
  computes it), beside the demo's own numbers.

On the finer grid a first crossing comes earlier than on the demo's or at the same step (the
finer grid holds every point of the demo's up to the crossing), so `--steps` defaults to the
latest of the chosen methods' crossings on the demo's grid. More evaluations also give a noisy
curve more chances to touch the target early, so a finer grid can only raise a speed-up;
compare methods on one grid.

Seeds differ a lot (at width 96 one seed of live JEST first reaches the target at step 2,700,
another at 3,900), so three or five seeds cannot say whether one method's speed-up is within
10% of another's. `--extra-seeds N` trains N more seeds than the demo ran (the next seed
numbers, the same config otherwise; nothing saved to check them against, so the saved seeds
retrained beside them are what vouches for the code and processor; the target stays the
demo's, uniform's final accuracy over the demo's seeds), and every method is set
against `--compare-to` with a paired bootstrap over seeds: resample the seeds with
replacement (the same resample for both methods, since a seed fixes the learner's
initialisation and its super-batch stream for both), recompute both seed-averaged curves, their
first crossings and the ratio of the speed-ups, and report the percentile interval. The same is
done for the ratio of the mean of the seeds' own first crossings, a measure less tied to one
evaluation of a noisy average curve. (The bootstrap runs with or without extra seeds. The
averaged curve's first crossing jumps when one evaluation moves across the target, so its
interval is rough and need not be centred on the estimate; the target is held fixed, so its
own uncertainty is not in either interval.)

`--reuse METHOD=JSON` takes a method's curves from an earlier `--json` of this benchmark instead
of retraining them: to set a new variant against a baseline already retrained on the same seeds
(a demo directory built from the same runs, e.g. another Flexi setting beside the same live
JEST). It is refused unless that run had the same T, grid, `--steps`, target and seeds, its
learner config where it recorded one, and its curves equal this demo's saved runs at every
evaluation both grids share; its compute speed-up is recomputed from this demo's saved runs
(FLOPs per step are the same at every step and seed of a run, which is checked).

A learner method of `jestkit demo` that the demo did not run can be named in `--methods` too
(with `--steps`): it is trained on every seed with the demo's config and reference (and its
cache, for a -cached or -flexi method), like an extra seed, with nothing saved to check it
against. At least one method the demo did run must be retrained beside it: its saved runs
check the learner code, torch and processor the two share (not the unsaved method's own
scoring path, which only the tests vouch for). This spares a demo the part of a run past
`--steps`: to set Flexi against live JEST, a demo of uniform and Flexi alone (uniform for the
target, T steps long) is enough, and live JEST, the costliest per step, is trained only up to
`--steps`. Its demo-grid columns then read "not run by the demo". Such a method's curves
cannot be `--reuse`d (there are no saved runs to check them against), so each Flexi variant
set against it retrains it.

    python benchmarks/first_crossing.py --run runs/demo-T20000 \\
        --methods learnability-joint learnability-joint-flexi --eval-every 100
    python benchmarks/first_crossing.py --run runs/demo-T20000-5-seeds \\
        --methods learnability-joint learnability-joint-flexi --steps 4500 --extra-seeds 7
    python benchmarks/first_crossing.py --run runs/demo-T20000-5-seeds-other-flexi \\
        --methods learnability-joint learnability-joint-flexi --steps 4500 --extra-seeds 7 \\
        --reuse learnability-joint=earlier.json    # its curves from the run above
    python benchmarks/first_crossing.py --run runs/demo-T20000-uniform-and-flexi \\
        --methods learnability-joint learnability-joint-flexi --steps 4500 --extra-seeds 8
    python benchmarks/first_crossing.py --quick    # a tiny demo, then this on it: < 1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from _markdown import check_outputs, command_line, publish

from jestkit.demo import (
    DEMO_METHODS,
    MAX_WORKERS,
    DemoConfig,
    _run_one,  # the demo's own worker: the same code path as the saved runs
    learner_configs,
    run_demo,
    stop_workers,
    worker_pool,
)
from jestkit.report import REACH_TOLERANCE, _first_reaching, _total_flops  # the report's rules
from jestkit.training import SCORE_VIEW_BEFORE_OPTION, LearnerConfig

MAX_EXTRA_SEEDS = 100
BOOTSTRAP_BLOCK = 2**22  # accuracies per block of resampled curves (32 MiB of float64)
TARGET_SHIFTS = (-0.005, -0.002, 0.002, 0.005)  # accuracy; the estimates are also given there


def load_run(run: Path) -> tuple[DemoConfig, dict, dict[str, list[dict]]]:
    """A finished demo directory's config, report and saved learner runs (by method)."""
    for name in ("demo_config.json", "report.json", "reference.safetensors"):  # the cache: in run()
        if not (run / name).is_file():
            raise SystemExit(f"--run {run}: no {name}; give a finished `jestkit demo` "
                             f"directory")
    cfg = DemoConfig.from_dict(json.loads((run / "demo_config.json").read_text()))
    report = json.loads((run / "report.json").read_text())
    saved = {}
    for m in cfg.methods:
        path = run / "runs" / f"{m}.json"
        if not path.is_file():
            raise SystemExit(f"--run {run}: no {path.relative_to(run)}, the saved runs of "
                             f"{m}; give a finished `jestkit demo` directory")
        saved[m] = json.loads(path.read_text())
    return cfg, report, saved


def first_reaching(steps: list[int], curve: list[float], target: float) -> int | None:
    """The first step whose accuracy is at or above `target` (the report's rule), or None."""
    i = _first_reaching(curve, target)
    return None if i is None else steps[i]


def first_crossings(curves: torch.Tensor, target: float) -> torch.Tensor:
    """Index of each row's first evaluation at or above `target` (the report's rule, with
    its tolerance), or -1 where a row never reaches it. curves: [R, E] -> [R] int64."""
    reached = curves >= target - REACH_TOLERANCE
    first = reached.int().argmax(dim=1)  # argmax: the first maximum, i.e. the first True
    return torch.where(reached.any(dim=1), first, torch.full_like(first, -1))


def paired_bootstrap(steps: list[int], curves: list[list[float]],
                     base_curves: list[list[float]], target: float, *, n_boot: int = 10_000,
                     level: float = 0.9, seed: int = 0) -> dict:
    """Paired bootstrap over seeds of a method's iteration speed-up relative to a baseline's.

    `curves` and `base_curves` are [S, E] accuracies of the same S seeds (row s of each is
    seed s) at the evaluation `steps` [E]. Each of `n_boot` resamples draws S seeds with
    replacement, the same draw for both methods, and computes two ratios, each minus 1 (so
    -0.1 is "10% below the baseline"):

    - ``curve``: (speed-up of the method) / (speed-up of the baseline) by the demo's rule, the
      first step at which the seed-averaged curve reaches `target`: base step / method step;
    - ``mean_seed_step``: mean over seeds of the baseline's own first crossings / the method's.

    A resample in which a curve never reaches the target within `steps` counts as crossing one
    evaluation after the last (its speed-up a bound); how many did is reported, and the
    interval is None where the estimate itself never crossed. Returns, for each ratio, the
    estimate on all seeds, the percentile interval at `level`, the resamples' median and that
    count; and both estimates at the target moved by each of TARGET_SHIFTS.
    """
    if not 0 < level < 1 or n_boot < 1:
        raise ValueError(f"level must be in (0, 1) and n_boot >= 1, got {level}, {n_boot}")
    a = torch.tensor(curves, dtype=torch.float64)
    b = torch.tensor(base_curves, dtype=torch.float64)
    if a.shape != b.shape or a.ndim != 2 or a.shape[1] != len(steps) or a.shape[0] < 2:
        raise ValueError(f"curves {tuple(a.shape)} and base_curves {tuple(b.shape)} must both "
                         f"be [seeds >= 2, {len(steps)} evaluations]")
    grid = torch.tensor([*steps, steps[-1] + (steps[-1] - steps[-2] if len(steps) > 1
                                              else steps[-1])], dtype=torch.float64)
    n_seeds = a.shape[0]
    g = torch.Generator().manual_seed(seed)  # its own generator: never the global RNG
    idx = torch.cat([torch.arange(n_seeds)[None], torch.randint(n_seeds, (n_boot, n_seeds),
                                                                 generator=g)])

    def step_of(first: torch.Tensor) -> torch.Tensor:  # -1 (never) -> one evaluation later
        return grid[torch.where(first < 0, torch.full_like(first, len(steps)), first)]

    def ratios_at(level_: float, draws: torch.Tensor) -> tuple[dict, dict]:
        """Both ratios, and which draws never reached `level_`, for each row of `draws`."""
        per_seed_a, per_seed_b = first_crossings(a, level_), first_crossings(b, level_)
        curve, curve_never = [], []
        # Averaged curves of a block of resamples at a time: [rows, E], never [n_boot, S, E].
        for rows in draws.split(max(1, BOOTSTRAP_BLOCK // (n_seeds * len(steps)))):
            fa = first_crossings(a[rows].mean(dim=1), level_)
            fb = first_crossings(b[rows].mean(dim=1), level_)
            curve.append(step_of(fb) / step_of(fa) - 1)
            curve_never.append((fa < 0) | (fb < 0))
        sa = step_of(per_seed_a)[draws].mean(dim=1)
        sb = step_of(per_seed_b)[draws].mean(dim=1)
        return ({"curve": torch.cat(curve), "mean_seed_step": sb / sa - 1},
                {"curve": torch.cat(curve_never),
                 "mean_seed_step": ((per_seed_a < 0)[draws]
                                    | (per_seed_b < 0)[draws]).any(dim=1)})

    ratios, never = ratios_at(target, idx)
    out = {"n_boot": n_boot, "level": level, "seed": seed, "n_seeds": n_seeds}
    lo, hi = (1 - level) / 2, (1 + level) / 2
    for key, r in ratios.items():
        boot = r[1:]
        out[key] = {
            "estimate": None if never[key][0] else r[0].item(),
            "interval": None if never[key][0] else
            [torch.quantile(boot, lo).item(), torch.quantile(boot, hi).item()],
            "median": torch.quantile(boot, 0.5).item(),
            "share_below_minus_10pct": (boot < -0.1).double().mean().item(),
            "resamples_not_reaching": int(never[key][1:].sum()),
        }
    # How much each estimate moves with the target, which is itself a noisy mean of seeds.
    out["estimate_at_other_targets"] = []
    for shift in TARGET_SHIFTS:
        r, n = ratios_at(target + shift, idx[:1])
        out["estimate_at_other_targets"].append(
            {"target": target + shift,
             **{k: None if n[k][0] else r[k][0].item() for k in r}})
    return out


def check_prefix(method: str, fine: dict, saved: dict) -> int:
    """Raise SystemExit unless `fine` (a shortened, finer-evaluated run) equals `saved` at
    every step both evaluated; returns how many such steps there were."""
    at = {s: i for i, s in enumerate(saved["steps"])}
    shared = 0
    for i, step in enumerate(fine["steps"]):
        if step not in at:
            continue
        j = at[step]
        ours = (fine["zero_shot_accuracy"][i], fine["cumulative_flops"][i])
        theirs = (saved["zero_shot_accuracy"][j],
                  {p: saved["cumulative_flops"][j].get(p, 0) for p in fine["cumulative_flops"][i]})
        if ours != theirs:
            raise SystemExit(
                f"{method} seed {fine['config']['seed']} at step {step}: accuracy "
                f"{ours[0]} and FLOPs {_total_flops(ours[1]):.0f} here, {theirs[0]} and "
                f"{_total_flops(theirs[1]):.0f} in the saved run: this retraining is not the saved "
                f"run (other code, torch or processor), so its finer grid would not say where "
                f"that run crossed")
        shared += 1
    return shared


def flops_per_step(method: str, saved: list[dict]) -> float:
    """The FLOPs one training step of `method`'s saved runs costs: the same at every step
    and seed (shapes fix them), which is checked on every evaluation of every saved run, so
    that a run retrained elsewhere can be priced from these."""
    per_step = [_total_flops(r["cumulative_flops"][i]) / step for r in saved
                for i, step in enumerate(r["steps"])]
    if max(per_step) - min(per_step) > 1e-9 * max(per_step):
        raise SystemExit(f"{method}: its saved runs' FLOPs per step differ between steps or "
                         f"seeds ({min(per_step):.0f} to {max(per_step):.0f}), so a reused "
                         f"curve cannot be priced from them; retrain it instead of --reuse")
    return statistics.fmean(per_step)


def load_reused(reuse: dict[str, Path], *, expected: dict, seeds: list[int],
                learner: dict[str, dict], saved: dict[str, list[dict]]) -> dict[str, dict]:
    """For each method of `reuse` (method -> an earlier `--json` of this benchmark), its
    results there, checked to be the runs this one would retrain: the same T, grid, steps and
    target (`expected`), the same `seeds` in order, the same learner config (seed aside)
    where the earlier run recorded it, and at every evaluation both grids share, per seed,
    the accuracy of this demo's `saved` run. SystemExit names what differs."""
    out = {}
    for m, path in reuse.items():
        try:
            earlier = json.loads(path.read_text())
            r = earlier["methods"][m]
        except KeyError:
            raise SystemExit(f"--reuse {m}={path}: it holds no {m}") from None
        except (OSError, ValueError, TypeError) as err:
            raise SystemExit(f"--reuse {m}={path}: not a JSON written by this benchmark's "
                             f"--json ({err})") from None
        for key, value in expected.items():
            if earlier.get(key) != value:
                raise SystemExit(f"--reuse {m}={path}: its {key} is {earlier.get(key)}, this "
                                 f"run's {value}; reuse only a run retrained alike")
        missing = [k for k in ("seeds", "steps", "per_seed_zero_shot_accuracy") if k not in r]
        if missing:
            raise SystemExit(f"--reuse {m}={path}: its {m} has no {missing} (written before "
                             f"--extra-seeds, or not by this benchmark); retrain it instead")
        if r["seeds"] != seeds:
            raise SystemExit(f"--reuse {m}={path}: {m} was retrained there for seeds "
                             f"{r['seeds']}, this run's are {seeds}")
        # score_view is newer than some saved JSONs: recorded without it, a run scored the
        # augmented view, as that option's default still does.
        then = {"score_view": SCORE_VIEW_BEFORE_OPTION, **(r.get("learner_config") or {})}
        if "learner_config" in r and then != learner[m]:
            diff = sorted(k for k in {*then, *learner[m]} if then.get(k) != learner[m].get(k))
            raise SystemExit(f"--reuse {m}={path}: {m}'s learner config there differs in "
                             f"{diff}")
        by_seed = {run["config"]["seed"]: run for run in saved[m]}
        shared = 0
        for seed, curve in zip(r["seeds"], r["per_seed_zero_shot_accuracy"], strict=True):
            if seed not in by_seed:
                continue
            at = dict(zip(by_seed[seed]["steps"], by_seed[seed]["zero_shot_accuracy"],
                          strict=True))
            for step, acc in zip(r["steps"], curve, strict=True):
                if step in at:
                    if acc != at[step]:
                        raise SystemExit(
                            f"--reuse {m}={path}: seed {seed} at step {step}: accuracy {acc} "
                            f"there, {at[step]} in this demo's saved run: not the same run")
                    shared += 1
        out[m] = {**r, "shared_evaluations_checked": shared, "reused_from": str(path)}
    return out


def run(path: Path, methods: list[str], steps: int | None, eval_every: int,
        workers: int, extra_seeds: int = 0, compare_to: str | None = None,
        n_boot: int = 10_000, reuse: dict[str, Path] | None = None) -> dict:
    started = time.time()
    cfg, report, saved = load_run(path)
    target = report["methods"]["uniform"]["target_accuracy"]
    total_steps = cfg.learner.steps
    coarse = cfg.learner.eval_interval
    learners = [name for name, *_ in DEMO_METHODS if name != "uniform"]
    unknown = [m for m in methods if m not in learners]
    if unknown:
        raise SystemExit(f"--methods {unknown}: not learner methods of {path} (it ran "
                         f"{[m for m in cfg.methods if m != 'uniform']}) or of `jestkit "
                         f"demo` ({learners})")
    if len(set(methods)) != len(methods):
        raise SystemExit(f"--methods {methods}: name each method once")
    # A learner method the demo did not run is trained here on every seed, with the demo's
    # config and reference, and nothing saved to check it against (as for the extra seeds);
    # a method it did run, retrained beside it, checks the code and processor they share.
    unsaved = [m for m in methods if m not in saved]
    if unsaved:
        if steps is None:
            raise SystemExit(f"--methods {unsaved}: the demo did not run them, so it has no "
                             f"crossing to retrain up to; give --steps (up to T = "
                             f"{cfg.learner.steps})")
        if set(reuse or {}) & set(unsaved):
            raise SystemExit(f"--reuse {sorted(set(reuse) & set(unsaved))}: the demo did not "
                             f"run them, so reused curves could not be checked against its "
                             f"saved runs; retrain them instead")
        if not [m for m in methods if m in saved and m not in (reuse or {})]:
            raise SystemExit(f"--methods {unsaved}: the demo did not run them; also retrain a "
                             f"method it did run (one of "
                             f"{[m for m in cfg.methods if m != 'uniform']}), whose saved runs "
                             f"check this code and processor")
        needs_cache = [m for m in unsaved if m.endswith(("-cached", "-flexi"))]
        if needs_cache and not (path / "reference_cache").is_dir():
            raise SystemExit(f"--methods {needs_cache}: they read the reference cache, which "
                             f"this demo did not build (it ran no -cached or -flexi method)")
    if eval_every < 1 or coarse % eval_every:
        raise SystemExit(f"--eval-every must divide the demo's evaluation interval "
                         f"({coarse} steps) and be >= 1, got {eval_every}")
    coarse_step = {m: report["methods"][m]["step_reaching_target"] for m in methods
                   if m in saved}
    if steps is None:
        never = [m for m in methods if coarse_step[m] is None]
        if never:
            raise SystemExit(f"{never} never reached the target on the demo's grid; give "
                             f"--steps (up to T = {total_steps}) to look on a finer one")
        steps = max(coarse_step.values())
    if not 1 <= steps <= total_steps or steps % eval_every:
        raise SystemExit(f"--steps must be a multiple of --eval-every ({eval_every}) in "
                         f"[1, {total_steps}] (T), got {steps}")
    if not 0 <= extra_seeds <= MAX_EXTRA_SEEDS:
        raise SystemExit(f"--extra-seeds must be in [0, {MAX_EXTRA_SEEDS}], got {extra_seeds}")
    if compare_to is not None and compare_to not in methods:
        raise SystemExit(f"--compare-to {compare_to}: not among --methods {methods}")
    # The extra seeds are the next numbers after the demo's: the same config otherwise.
    seeds = (*cfg.seeds, *range(max(cfg.seeds) + 1, max(cfg.seeds) + 1 + extra_seeds))
    try:  # a seed past the learner's range is refused here, not in a worker
        with_seeds = dataclasses.replace(cfg, seeds=seeds)
    except ValueError as err:
        raise SystemExit(f"--extra-seeds {extra_seeds} after the demo's seeds "
                         f"{list(cfg.seeds)}: {err}") from None
    try:  # the demo's checks of its methods, for those it did not run
        every = learner_configs(dataclasses.replace(
            with_seeds, methods=(*cfg.methods, *unsaved)))
    except ValueError as err:
        raise SystemExit(f"--methods {unsaved}: with this demo's config: {err}") from None
    learner = {n: {k: v for k, v in dataclasses.asdict(dataclasses.replace(
        lc, steps=steps, eval_every=eval_every)).items() if k != "seed"}
        for n, _, lc in every}
    if reuse and set(reuse) - set(methods):
        raise SystemExit(f"--reuse {sorted(set(reuse) - set(methods))}: not among --methods "
                         f"{methods}")
    reused = load_reused(reuse or {}, seeds=list(seeds), learner=learner, saved=saved,
        expected={"T": total_steps, "eval_every": eval_every, "steps": steps,
                  "target_accuracy": target})
    jobs = [(name, cached, dataclasses.replace(lc, steps=steps, eval_every=eval_every))
            for name in methods if name not in reused  # method by method, seeds in order
            for n, cached, lc in every if n == name]
    reference = str(path / "reference.safetensors")
    cache = str(path / "reference_cache")
    if any(cached for _, cached, _ in jobs) and not (path / "reference_cache").is_dir():
        raise SystemExit(f"--run {path}: no reference_cache/, which its cached and Flexi runs "
                         f"read; give a finished `jestkit demo` directory")
    fine: dict[str, list[dict]] = {m: [] for m in methods if m not in reused}
    if jobs:
        pool = worker_pool(workers)
        try:
            futures = [(name, pool.submit(_run_one, cfg.data_seed, reference,
                                          cache if cached else None, lc, cfg.cache_views))
                       for name, cached, lc in jobs]
            for name, fut in futures:  # in submission order: seeds in order
                fine[name].append(fut.result())
        except BaseException:
            stop_workers(pool)
            raise
        pool.shutdown()
    uniform_flops = statistics.fmean(_total_flops(r["cumulative_flops"][-1])
                                     for r in saved["uniform"])
    results = {}
    for m in methods:
        by_seed = {r["config"]["seed"]: r for r in saved.get(m, [])}
        # The per-seed curves, retrained here or reused (checked in load_reused): everything
        # below is computed from them alike; only the FLOPs spent come from different places.
        if m in reused:
            grid, run_seeds = reused[m]["steps"], reused[m]["seeds"]
            curves = reused[m]["per_seed_zero_shot_accuracy"]
            shared = reused[m]["shared_evaluations_checked"]
        else:
            shared = sum(check_prefix(m, r, by_seed[r["config"]["seed"]]) for r in fine[m]
                         if r["config"]["seed"] in by_seed)  # extra seeds: nothing saved
            grid = fine[m][0]["steps"]
            run_seeds = [r["config"]["seed"] for r in fine[m]]
            curves = [r["zero_shot_accuracy"] for r in fine[m]]
        curve = [statistics.fmean(c[i] for c in curves) for i in range(len(grid))]
        step = first_reaching(grid, curve, target)
        if step is None:
            flops = None
        elif m in reused:  # priced from this demo's saved runs of the method
            flops = flops_per_step(m, saved[m]) * step
        else:
            flops = statistics.fmean(_total_flops(r["cumulative_flops"][grid.index(step)])
                                     for r in fine[m])
        demo = report["methods"][m] if m in saved else {}
        results[m] = {
            "in_demo": m in saved,
            "demo_step": coarse_step.get(m),
            "demo_iteration_speedup": demo.get("iteration_speedup"),
            "demo_compute_speedup": demo.get("compute_speedup"),
            "step": step,
            "iteration_speedup": None if step is None else total_steps / step,
            "compute_speedup": None if step is None else uniform_flops / flops,
            "per_seed_step": [first_reaching(grid, c, target) for c in curves],
            "seeds": run_seeds,
            "saved_seeds": sorted(by_seed),
            "shared_evaluations_checked": shared,
            "steps": grid,
            "zero_shot_accuracy": curve,
            "per_seed_zero_shot_accuracy": curves,
            "learner_config": learner[m],
        }
        if m in reused:
            results[m]["reused_from"] = reused[m]["reused_from"]
            earlier, ours = reused[m].get("compute_speedup"), results[m]["compute_speedup"]
            if earlier is not None and ours is not None and abs(ours / earlier - 1) > 1e-9:
                raise SystemExit(f"--reuse {m}={reused[m]['reused_from']}: its compute "
                                 f"speed-up was {earlier} there, {ours} from this demo's runs: "
                                 f"other FLOPs, not the same runs")
    if compare_to is not None and len(seeds) >= 2:
        base = results[compare_to]["per_seed_zero_shot_accuracy"]
        for m in methods:
            # Paired by row: both lists must hold the same seeds in the same order.
            assert results[m]["seeds"] == results[compare_to]["seeds"], (m, compare_to)
            if m != compare_to:
                results[m]["bootstrap"] = {"compare_to": compare_to, **paired_bootstrap(
                    results[m]["steps"], results[m]["per_seed_zero_shot_accuracy"], base,
                    target, n_boot=n_boot)}
    return {"run": str(path), "target_accuracy": target, "T": total_steps,
            "demo_eval_every": coarse, "eval_every": eval_every, "steps": steps,
            "uniform_flops": uniform_flops, "methods": results,
            "wall_s": round(time.time() - started, 1)}


def _extra_seeds_line(m: dict) -> str:
    extra = sorted({s for r in m.values() if r.get("in_demo", True) for s in r["seeds"]
                    if s not in r["saved_seeds"]})
    if not extra:
        return ""
    seeds = (f"seed {extra[0]} was" if len(extra) == 1 else
             f"seeds {extra[0]}–{extra[-1]} were")
    return (f"; {seeds} trained here only (--extra-seeds: the demo did not run them, so "
            f"nothing is saved to check them against)")


def _unsaved_line(m: dict) -> str:
    unsaved = [name for name, r in m.items() if not r.get("in_demo", True)]
    if not unsaved:
        return ""
    cache = (" (and its cache)" if any(n.endswith(("-cached", "-flexi")) for n in unsaved)
             else "")
    return (f"; {', '.join(unsaved)} {'was' if len(unsaved) == 1 else 'were'} not run by the "
            f"demo: trained here on every seed, with the demo's config and reference{cache}, "
            f"and nothing saved to check against")


def _reused_line(m: dict) -> str:
    reused = [(name, r) for name, r in m.items() if "reused_from" in r]
    return "".join(f"; {name}'s curves are {r['reused_from']}'s (--reuse: not retrained here; "
                   f"its {r['shared_evaluations_checked']} shared evaluations checked against "
                   f"this demo's saved runs, accuracy only)" for name, r in reused)


def _pct(x: float | None) -> str:
    return "never reached" if x is None else f"{100 * x:+.1f}%"


def _bootstrap_lines(name: str, b: dict, eval_every: int) -> str:
    """One paragraph: the paired bootstrap's estimates and intervals, in words."""
    out = [f"{name} against {b['compare_to']}, paired bootstrap over {b['n_seeds']} seeds "
           f"({b['n_boot']} resamples, {100 * b['level']:.0f}% percentile intervals; "
           f"evaluated every {eval_every} steps):"]
    for key, what in (("curve", "speed-up by the seed-averaged curve (the demo's rule)"),
                      ("mean_seed_step", "by the mean of the seeds' own first crossings")):
        r = b[key]
        interval = ("" if r["interval"] is None else
                    f", interval [{_pct(r['interval'][0])}, {_pct(r['interval'][1])}]")
        missing = (f"; {r['resamples_not_reaching']} resamples had a seed or curve not "
                   f"reaching the target (counted one evaluation after the last)"
                   if r["resamples_not_reaching"] else "")
        out.append(f"- {what}: {_pct(r['estimate'])}{interval}, median {_pct(r['median'])}; "
                   f"{100 * r['share_below_minus_10pct']:.0f}% of resamples below −10%{missing}")
    shifted = "; ".join(f"{100 * t['target']:.1f}%: {_pct(t['curve'])} and "
                        f"{_pct(t['mean_seed_step'])}" for t in b["estimate_at_other_targets"])
    out.append(f"- the two estimates at other targets: {shifted}")
    return "\n".join(out)


def _x(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.2f}x"


def markdown(res: dict, command: str, compare_to: str = "learnability-joint") -> str:
    m = res["methods"]
    lines = [
        f"Command: `{command}` ({res['wall_s']:.0f} s; target {100 * res['target_accuracy']:.1f}%"
        f", T = {res['T']}; each run retrained to step {res['steps']}, evaluated every "
        f"{res['eval_every']} steps instead of {res['demo_eval_every']}).",
        "",
        "Check: at every evaluation the two grids share "
        f"({sum(r['shared_evaluations_checked'] for r in m.values() if 'reused_from' not in r)}"
        " in all), accuracy and FLOPs equal the saved runs'" + _extra_seeds_line(m)
        + _unsaved_line(m) + _reused_line(m) + ".",
        "",
        f"| method | demo grid: step | iteration | compute | every {res['eval_every']}: "
        "step | iteration | compute | per seed (step) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, r in m.items():
        seeds = ", ".join(f"{s}: {'–' if st is None else st}"
                          for s, st in zip(r["seeds"], r["per_seed_step"], strict=True))
        demo = (f"{r['demo_step'] or 'not reached'} | {_x(r['demo_iteration_speedup'])} | "
                f"{_x(r['demo_compute_speedup'])}" if r.get("in_demo", True)
                else "not run by the demo | – | –")
        lines.append(f"| {name} | {demo} | "
                     f"{r['step'] or 'not reached'} | {_x(r['iteration_speedup'])} | "
                     f"{_x(r['compute_speedup'])} | {seeds} |")
    base = m.get(compare_to)
    if base and base["iteration_speedup"]:
        lines += ["", f"Iteration speed-up against {compare_to}'s (issue 4 allows −10%):", ""]
        for name, r in m.items():
            if name == compare_to:
                continue
            for grid, key in (("demo grid", "demo_iteration_speedup"),
                              (f"every {res['eval_every']}", "iteration_speedup")):
                if key == "demo_iteration_speedup" and not (r.get("in_demo", True)
                                                            and base.get("in_demo", True)):
                    lines.append(f"- {name}, {grid}: not both run by the demo")
                elif r[key] is None or base[key] is None:
                    lines.append(f"- {name}, {grid}: not reached")
                else:
                    lines.append(f"- {name}, {grid}: {r[key]:.2f}x against {base[key]:.2f}x, "
                                 f"{100 * (r[key] / base[key] - 1):+.0f}%")
    for name, r in m.items():
        if "bootstrap" in r:
            lines += ["", _bootstrap_lines(name, r["bootstrap"], res["eval_every"])]
    return "\n".join(lines) + "\n"


def _quick_run(tmp: Path) -> Path:
    """A tiny finished demo to run this on: 24 steps evaluated every 8, two seeds."""
    learner = LearnerConfig(width=16, batch_size=8, n_chunks=4, steps=24, eval_every=8,
                            warmup_steps=2, patch_size=8)
    demo = dataclasses.replace(
        DemoConfig.quick(), seeds=(0, 1), learner=learner,
        methods=("uniform", "learnability-joint-cached", "learnability-joint-flexi"),
        flexi_score_patch_size=16, flexi_multires_fraction=0.5)
    out = tmp / "demo"
    run_demo(demo, out, workers=2, show_progress=False)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", type=Path, help="a finished `jestkit demo` directory")
    p.add_argument("--methods", nargs="+",
                   help="its learner methods to retrain (default: every one but uniform); "
                        "a demo method it did not run is trained on every seed (needs --steps)")
    p.add_argument("--steps", type=int,
                   help="retrain each run to this step (default: the latest of the methods' "
                        "crossings on the demo's grid)")
    p.add_argument("--eval-every", type=int, default=100,
                   help="evaluate every this many steps; must divide the demo's interval")
    p.add_argument("--compare-to",
                   help="the method the others' iteration speed-ups are set against "
                        "(default: learnability-joint, where it is among --methods)")
    p.add_argument("--extra-seeds", type=int, default=0,
                   help="also train this many more seeds than the demo ran (the next seed "
                        "numbers); with or without them, each method is set against "
                        "--compare-to by a paired bootstrap over all the seeds")
    p.add_argument("--bootstrap", type=int, default=10_000,
                   help="resamples of the paired bootstrap (default 10000)")
    p.add_argument("--reuse", nargs="+", default=[], metavar="METHOD=JSON",
                   help="take METHOD's curves from JSON, an earlier --json of this benchmark "
                        "that retrained the same runs (same T, grid, steps, target, seeds and "
                        "saved runs, checked), instead of retraining them")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: a tiny demo in a temporary directory, then this on it")
    p.add_argument("--out", type=Path, help="write the markdown results into this doc")
    p.add_argument("--section", default="first_crossing",
                   help="--out replaces the text between <!-- SECTION:start --> and "
                        "<!-- SECTION:end --> (default: first_crossing)")
    p.add_argument("--json", type=Path, help="write the raw results as JSON here")
    args = p.parse_args(argv)
    if not 1 <= args.workers <= MAX_WORKERS:
        p.error(f"--workers must be in [1, {MAX_WORKERS}], got {args.workers}")
    if not 100 <= args.bootstrap <= 100_000:
        p.error(f"--bootstrap must be in [100, 100000], got {args.bootstrap}")
    if args.quick == (args.run is not None):
        p.error("give --run DIR (a finished demo) or --quick, one of them")
    reuse = {}
    for item in args.reuse:
        method, _, path = item.partition("=")
        if not method or not path or method in reuse:
            p.error(f"--reuse {item}: give METHOD=JSON, each method once")
        if not Path(path).is_file():
            p.error(f"--reuse {item}: {path} is not a file (give an earlier --json of this "
                    f"benchmark)")
        reuse[method] = Path(path)
    check_outputs(p, args.out, args.section, args.json)
    with tempfile.TemporaryDirectory(prefix="first_crossing.") as tmp:
        if args.quick:
            args.run, args.eval_every = _quick_run(Path(tmp)), 4
            args.steps = args.steps or 24  # a tiny run may never reach its target
        elif not args.run.is_dir():
            p.error(f"--run {args.run}: not a directory")
        try:
            methods = args.methods or [m for m in load_run(args.run)[0].methods
                                       if m != "uniform"]
            compare_to = args.compare_to
            if compare_to is None and "learnability-joint" in methods:
                compare_to = "learnability-joint"
            res = run(args.run, methods, args.steps, args.eval_every, args.workers,
                      args.extra_seeds, compare_to, args.bootstrap, reuse)
        except SystemExit as err:
            p.error(str(err))
    md = markdown(res, command_line("first_crossing.py", argv), compare_to)
    publish(md, res, args.json, args.out, args.section, "First crossings on a finer grid")
    return 0


if __name__ == "__main__":
    # SIGTERM ends the run as Ctrl-C does: workers stopped, temporary files removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
