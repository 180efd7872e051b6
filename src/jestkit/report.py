"""The comparison protocol of BRIEF 7, and the tables, JSON and plots that report it.

- Baseline: uniform, same learner, same b, same number of steps T.
- Target: the baseline's final accuracy = mean of its last 3 evaluations, averaged over seeds.
- Iteration speed-up: T / the first evaluated step at which the method's seed-averaged curve
  reaches the target. Compute speed-up: the baseline's total FLOPs / the method's cumulative
  FLOPs (training + all scoring + the selector's matmuls) at that step. The reference's
  training FLOPs are reported beside, never hidden inside. A method that never reaches the
  target reports None ("not reached"), never a number.

Inputs are plain dicts (`RunResult.to_dict()`), so a report can be rebuilt from saved JSON.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from pathlib import Path

from jestkit.atomic import atomic_write_all
from jestkit.provenance import code_version

__all__ = ["FINAL_EVALS", "LEVELS", "build_report", "plateau_check", "plateau_verdict",
           "read_json", "rebuild_report", "steps_to_reach",
           "fmt_speedup", "summarize_method", "summarize_methods", "summary_table",
           "write_report"]

FINAL_EVALS = 3  # "final accuracy" = mean of the last 3 evaluations
LEVELS = (0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.9)  # accuracy levels of `steps_to_reach`
# "Reaches" is acc >= level - REACH_TOLERANCE: accuracies are counts / n stored as floats
# (float32 in runs saved before evaluate returned exact ratios), so a curve exactly on a level
# may sit a few 1e-8 below it. Seed means of counts / 1000 are >= 1e-4 apart: 1e-6 cannot
# make a point below a level reach it.
REACH_TOLERANCE = 1e-6


def _first_reaching(accuracies: list[float], level: float) -> int | None:
    """Index of the first evaluation at or above `level` (within REACH_TOLERANCE), or None."""
    return next((i for i, acc in enumerate(accuracies) if acc >= level - REACH_TOLERANCE),
                None)


def _mean_curve(runs: list[dict], key: str) -> list[float]:
    steps = runs[0]["steps"]
    for r in runs:
        if r["steps"] != steps:
            raise ValueError("runs of one method must be evaluated at the same steps")
    return [statistics.fmean(r[key][i] for r in runs) for i in range(len(steps))]


def _total_flops(ledger: dict) -> int:
    """Training + learner scoring + reference scoring + selection (reference *training*
    excluded). Curves saved before the selection phase existed count it as 0."""
    return (ledger["train"] + ledger["learner_scoring"] + ledger["reference_scoring"]
            + ledger.get("selection", 0))


def final_accuracy(run: dict) -> float:
    return statistics.fmean(run["zero_shot_accuracy"][-FINAL_EVALS:])


def _spread(values: list[float]) -> float | None:
    """Sample standard deviation; None for a single value (no spread to report)."""
    return statistics.stdev(values) if len(values) > 1 else None


def plateau_check(runs: list[dict]) -> dict:
    """How much the seed-averaged accuracy moved over the last quarter of training.

    Compares the mean of the last 3 evaluations with the mean of the 3 evaluations one
    quarter of T earlier (windows of the same width whose centres are T/4 apart; averaging 3
    points damps evaluation noise). Plateaued when it moved < 1 point. With too few
    evaluations (fewer than ~10) the two windows share evaluations, which would shrink the
    movement measured: then `checkable` is False and so is `plateaued`.
    """
    curve = _mean_curve(runs, "zero_shot_accuracy")
    steps = runs[0]["steps"]
    last = steps[-FINAL_EVALS:]
    centre = last[len(last) // 2]  # the middle of the last 3 evaluations
    q = min(range(len(steps)), key=lambda i: abs(steps[i] - (centre - steps[-1] / 4)))
    lo, hi = max(0, q - 1), min(len(curve), q + 2)
    at_q = statistics.fmean(curve[lo:hi])
    at_end = statistics.fmean(curve[-FINAL_EVALS:])
    moved = 100 * (at_end - at_q)
    checkable = hi <= len(curve) - FINAL_EVALS  # the windows do not overlap
    return {"step_three_quarters": steps[q], "accuracy_at_three_quarters": at_q,
            "accuracy_at_end": at_end, "moved_points": moved, "checkable": checkable,
            "plateaued": checkable and abs(moved) < 1.0}


def plateau_verdict(plateau: dict) -> str:
    """The plateau check's result in words."""
    if not plateau.get("checkable", True):  # reports saved before the field: checkable
        return ("cannot tell: too few evaluations (the two windows of 3 share evaluations; "
                "give at least 10)")
    return "plateaued (< 1 point)" if plateau["plateaued"] else "NOT plateaued (>= 1 point)"


def steps_to_reach(methods: dict[str, dict], levels=LEVELS) -> dict:
    """For each accuracy level, the first evaluated step at which each method's seed-averaged
    curve reaches it (None if never), and uniform's step divided by it.

    The protocol's speed-up is measured at one level, uniform's final accuracy; this shows how
    the speed-up depends on the level chosen (a baseline still climbing at T makes the
    protocol's level, and so its number, move with T). Levels uniform never reaches have no
    ratio; levels no method reaches are left out.
    """
    def first(curve):
        reached = {lv: _first_reaching(curve["zero_shot_accuracy"], lv) for lv in levels}
        return {lv: None if i is None else curve["steps"][i] for lv, i in reached.items()}

    reached = {name: first(m["curves"]) for name, m in methods.items()}
    kept = [lv for lv in levels if any(r[lv] is not None for r in reached.values())]
    base = reached.get("uniform", {})
    out = {"levels": kept, "methods": {}}
    for name, r in reached.items():
        out["methods"][name] = {
            "steps": [r[lv] for lv in kept],
            "iteration_speedup": [base[lv] / r[lv] if base.get(lv) and r[lv] else None
                                  for lv in kept],
        }
    return out


def _run_clean_fraction(run: dict) -> float:
    """A run's clean fraction over all its steps: each interval's fraction weighted by its
    number of steps (the last interval is shorter when T is not a multiple of the eval
    interval)."""
    lengths = [b - a for a, b in zip([0, *run["steps"]], run["steps"], strict=False)]
    return sum(f * n for f, n in zip(run["clean_fraction"], lengths, strict=True)) / sum(lengths)


def _per_seed_crossings(runs: list[dict], target: float, total_steps: int,
                        baseline_flops: float) -> dict:
    """Each seed's own first evaluated step at or above the (common) target, and the speed-ups
    it implies: T / that step, and uniform's seed-mean total FLOPs / that seed's cumulative
    FLOPs there (None where the seed never reaches it). Not the protocol's number, which reads
    the seed-averaged curve: a gauge of how much a first crossing moves between seeds."""
    steps, iters, computes = [], [], []
    for r in runs:
        i = _first_reaching(r["zero_shot_accuracy"], target)
        steps.append(None if i is None else r["steps"][i])
        iters.append(None if i is None else total_steps / r["steps"][i])
        computes.append(None if i is None
                        else baseline_flops / _total_flops(r["cumulative_flops"][i]))
    return {"seeds": [r["config"]["seed"] for r in runs], "step_reaching_target": steps,
            "iteration_speedup": iters, "compute_speedup": computes}


def summarize_method(runs: list[dict], baseline: list[dict]) -> dict:
    """Per-method summary by the protocol (see module docstring).

    Returns final_accuracy {mean, std, per_seed}, iteration_speedup, compute_speedup (None
    when the target is never reached), step_reaching_target, clean_fraction (of selected
    examples, mean over the run and seeds), flops per phase at T (seed mean), per_seed (each
    seed's own crossing of the target, `_per_seed_crossings`) and the seed-averaged curves.
    """
    finals = [final_accuracy(r) for r in runs]
    target = statistics.fmean(final_accuracy(r) for r in baseline)
    total_steps = baseline[0]["config"]["steps"]
    baseline_flops = statistics.fmean(_total_flops(r["cumulative_flops"][-1]) for r in baseline)
    curve = _mean_curve(runs, "zero_shot_accuracy")
    steps = runs[0]["steps"]
    reach = _first_reaching(curve, target)
    if reach is None:
        iteration_speedup = compute_speedup = step_reached = flops_at_target = None
    else:
        step_reached = steps[reach]
        iteration_speedup = total_steps / step_reached
        flops_at_target = statistics.fmean(_total_flops(r["cumulative_flops"][reach])
                                           for r in runs)
        compute_speedup = baseline_flops / flops_at_target
    per_seed = _per_seed_crossings(runs, target, total_steps, baseline_flops)
    phases = runs[0]["cumulative_flops"][-1].keys()
    flops_at_end = {p: statistics.fmean(r["cumulative_flops"][-1][p] for r in runs)
                    for p in phases}
    flops_curve = [statistics.fmean(_total_flops(r["cumulative_flops"][i]) for r in runs)
                   for i in range(len(steps))]
    return {
        "final_accuracy": {"mean": statistics.fmean(finals), "std": _spread(finals),
                           "per_seed": finals},
        "target_accuracy": target,
        "step_reaching_target": step_reached,
        "iteration_speedup": iteration_speedup,
        "compute_speedup": compute_speedup,
        "flops_at_target": flops_at_target,
        "flops_at_end": flops_at_end,
        "flops_per_step": {p: v / total_steps for p, v in flops_at_end.items()},
        # False for curves saved before the selector's matmuls were a ledger phase: their
        # totals (and so the compute speed-ups) leave those FLOPs out.
        "selection_counted": all("selection" in r["cumulative_flops"][-1]
                                 for r in [*runs, *baseline]),
        "clean_fraction": statistics.fmean(_run_clean_fraction(r) for r in runs),
        "n_seeds": len(runs),
        "per_seed": per_seed,
        "curves": {
            "steps": steps,
            "zero_shot_accuracy": curve,
            "zero_shot_accuracy_std": [_spread([r["zero_shot_accuracy"][i] for r in runs])
                                       for i in range(len(steps))],
            "i2t_recall@1": _mean_curve(runs, "i2t_recall"),
            "t2i_recall@1": _mean_curve(runs, "t2i_recall"),
            "cumulative_flops": flops_curve,
            "clean_fraction": _mean_curve(runs, "clean_fraction"),
        },
    }


def summarize_methods(runs: dict[str, list[dict]]) -> dict[str, dict]:
    """`summarize_method` for every method against runs["uniform"], the baseline, which is 1x
    by definition: its own first crossing of its final accuracy only says how early it
    plateaued, which `plateau_check` reports. Its per_seed crossings are kept as measured:
    where uniform's own seeds first reach their mean final accuracy shows how far a first
    crossing moves between seeds of one method."""
    if "uniform" not in runs:
        raise ValueError("the report needs the uniform baseline's runs")
    baseline = runs["uniform"]
    methods = {name: summarize_method(r, baseline) for name, r in runs.items()}
    methods["uniform"].update(
        iteration_speedup=1.0, compute_speedup=1.0,
        step_reaching_target=baseline[0]["config"]["steps"],
        flops_at_target=methods["uniform"]["curves"]["cumulative_flops"][-1])  # seed mean at T
    return methods


def fmt_speedup(x: float | None) -> str:
    return "not reached" if x is None else f"{x:.2f}x"


def _fmt_flops(x: float) -> str:
    """TFLOP with two decimals; GFLOP below 0.005 T (a smoke run), which would read 0.00 T."""
    return f"{x / 1e12:.2f} T" if x >= 5e9 else f"{x / 1e9:.2f} G"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _fmt_selection(per_step: dict) -> str:
    return "n/a" if "selection" not in per_step else f"{per_step['selection'] / 1e9:.3f} G"


def caveats(report: dict) -> list[str]:
    """Why a report's speed-ups may mean little (report.md and the CLI print these)."""
    out = []
    if min(m["n_seeds"] for m in report["methods"].values()) < 3:
        out.append("Fewer than 3 seeds: the protocol asks for at least 3; these numbers carry "
                   "no spread and mean little.")
    uniform = report["methods"]["uniform"]
    curve = uniform["curves"]["zero_shot_accuracy"]
    early = [name for name, m in report["methods"].items() if name != "uniform"
             and m.get("step_reaching_target") == m["curves"]["steps"][0]]
    if early and _first_reaching(curve, uniform["target_accuracy"]) != 0:
        out.append(f"{', '.join(early)} already reach{'es' if len(early) == 1 else ''} the "
                   f"target at the first evaluation: {'its' if len(early) == 1 else 'their'} "
                   f"speed-ups are lower bounds (no earlier step was evaluated).")
    if _first_reaching(curve, uniform["target_accuracy"]) == 0:
        out.append(f"Uniform's seed-averaged curve already reaches its final accuracy "
                   f"({100 * uniform['target_accuracy']:.1f}%) at its first evaluation "
                   f"(step {uniform['curves']['steps'][0]}): it did not improve over the run "
                   f"(too short, or it fell back), so the speed-ups here are meaningless.")
    return out


def summary_table(report: dict) -> str:
    """The markdown summary table (also what the CLI prints)."""
    lines = [
        "| method | final zero-shot acc. (mean ± std) | iteration speed-up | compute speed-up "
        "| clean fraction selected | FLOPs/step train | learner scoring | reference scoring "
        "| selection |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, m in report["methods"].items():
        fa = m["final_accuracy"]
        per = m["flops_per_step"]
        spread = "(1 seed)" if fa["std"] is None else f"± {100 * fa['std']:.1f}"
        lines.append(
            f"| {name} | {100 * fa['mean']:.1f} {spread} | "
            f"{fmt_speedup(m['iteration_speedup'])} | {fmt_speedup(m['compute_speedup'])} | "
            f"{100 * m['clean_fraction']:.1f}% | {per['train'] / 1e9:.2f} G | "
            f"{per['learner_scoring'] / 1e9:.2f} G | {per['reference_scoring'] / 1e9:.2f} G | "
            f"{_fmt_selection(per)} |")
    ref = report["reference"]
    lines.append(f"| reference (curated only) | {100 * ref['metrics']['zero_shot_accuracy']:.1f} "
                 f"| | | | training: {_fmt_flops(ref['flops'])} in all | | | |")
    return "\n".join(lines)


#: The plots a report writes beside report.md.
PLOT_FILES = ("accuracy_vs_steps.png", "accuracy_vs_flops.png", "clean_fraction.png")


def _plots(report: dict) -> dict[str, bytes]:
    """The PNG plots, rendered in memory (file name -> bytes): nothing is written until the
    whole report is built."""
    import io

    import matplotlib

    matplotlib.use("Agg")  # headless; never opens a window
    import matplotlib.pyplot as plt

    files = {}
    specs = [  # their names are PLOT_FILES
        ("accuracy_vs_steps.png", "steps", "zero_shot_accuracy", "training step",
         "zero-shot accuracy (test)"),
        ("accuracy_vs_flops.png", "cumulative_flops", "zero_shot_accuracy",
         "cumulative FLOPs (training + scoring)", "zero-shot accuracy (test)"),
        ("clean_fraction.png", "steps", "clean_fraction", "training step",
         "fraction of selected pool items that are clean"),
    ]
    target = report["methods"]["uniform"]["target_accuracy"]  # a report always has uniform
    for fname, xkey, ykey, xlabel, ylabel in specs:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, m in report["methods"].items():
            c = m["curves"]
            ax.plot(c[xkey], c[ykey], label=name, lw=1.6)
            if ykey == "zero_shot_accuracy" and None not in c["zero_shot_accuracy_std"]:
                lo = [a - s for a, s in zip(c[ykey], c["zero_shot_accuracy_std"], strict=True)]
                hi = [a + s for a, s in zip(c[ykey], c["zero_shot_accuracy_std"], strict=True)]
                ax.fill_between(c[xkey], lo, hi, alpha=0.15)
        if ykey == "zero_shot_accuracy":
            ax.axhline(target, color="k", ls="--", lw=0.8, label="uniform's final (target)")
            ax.axhline(report["reference"]["metrics"]["zero_shot_accuracy"], color="gray",
                       ls=":", lw=0.8, label="reference")
        if ykey == "clean_fraction":
            ax.axhline(report["config"].get("pool_clean_fraction", 0.45), color="k", ls="--",
                       lw=0.8, label="pool")
        if xkey == "cumulative_flops":
            ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        plt.close(fig)
        files[fname] = buffer.getvalue()
    return files


def build_report(runs: dict[str, list[dict]], reference: dict, config: dict) -> dict:
    """{method name: [run dicts, one per seed]} -> the report dict (report.json's content)."""
    if "uniform" not in runs:
        raise ValueError("the report needs the uniform baseline's runs")
    baseline = runs["uniform"]
    total_steps = baseline[0]["config"]["steps"]
    # The protocol compares at the same T and b; a mix of run directories must not pass.
    for name, method_runs in runs.items():
        for r in method_runs:
            for key in ("steps", "batch_size"):
                if r["config"][key] != baseline[0]["config"][key]:
                    raise ValueError(f"{name} (seed {r['config']['seed']}) has {key} = "
                                     f"{r['config'][key]}, uniform {baseline[0]['config'][key]}"
                                     f": the protocol compares runs of the same T and b")
    methods = summarize_methods(runs)
    return {
        "reference_accuracy": reference["metrics"]["zero_shot_accuracy"],
        "reference": reference,
        "reference_training_flops_amortised_per_step": reference["flops"] / total_steps,
        "reference_caching_flops_amortised_per_step":
            reference.get("caching_flops", 0) / total_steps,
        "config": config,
        "plateau": plateau_check(baseline),
        "methods": methods,
        "steps_to_reach": steps_to_reach(methods),
    }


def _levels_table(table: dict | None) -> list[str]:
    if not table or not table["levels"]:
        return ["(no level reached)"]
    lines = ["| method | " + " | ".join(f"{100 * lv:.0f}%" for lv in table["levels"]) + " |",
             "|---|" + "---|" * len(table["levels"])]
    for name, m in table["methods"].items():
        cells = []
        for step, ratio in zip(m["steps"], m["iteration_speedup"], strict=True):
            if step is None:
                cells.append("not reached")
            elif name == "uniform" or ratio is None:
                cells.append(f"{step}")
            else:
                cells.append(f"{step} ({ratio:.1f}x)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def _per_seed_section(report: dict) -> list[str]:
    """How far each seed's own first crossing of the target is from the seed-averaged one
    (reports written before per-seed crossings existed have none: no section)."""
    methods = report["methods"]
    if not all("per_seed" in m for m in methods.values()):
        return []

    def cells(values: list) -> str:
        return ", ".join("not reached" if v is None else f"{v:.2f}x" for v in values)

    lines = [
        "## How much the speed-up varies between seeds",
        "Each seed's own curve against the same target (uniform's final accuracy, averaged "
        "over seeds): T / its first evaluated step at or above it, and uniform's total FLOPs / "
        "its cumulative FLOPs there; seeds in the order "
        f"{', '.join(map(str, methods['uniform']['per_seed']['seeds']))}. The protocol's numbers "
        "above read the seed-averaged curve instead. Uniform's own row is where each of its "
        "seeds first reaches the seed-mean of their final accuracies: near a plateau a curve "
        "hovers around that level, so the first crossing moves a lot from seed to seed, and "
        "a method's speed-up moves with it.",
        "",
        "| method | iteration speed-up per seed | compute speed-up per seed |",
        "|---|---|---|",
    ]
    for name, m in methods.items():
        ps = m["per_seed"]
        seeds = ("" if ps["seeds"] == methods["uniform"]["per_seed"]["seeds"]
                 else f" (seeds {', '.join(map(str, ps['seeds']))})")
        lines.append(f"| {name}{seeds} | {cells(ps['iteration_speedup'])} | "
                     f"{cells(ps['compute_speedup'])} |")
    return [*lines, ""]


def write_report(report: dict, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write report.json, report.md and the PNG plots into out_dir; returns their paths.

    Everything is built in memory first (a report that cannot be written, e.g. one holding a
    NaN, fails before any file is touched), then every file is written before any is
    replaced (`atomic_write_all`)."""
    out = Path(out_dir)
    report_json = json.dumps(report, indent=1, allow_nan=False)
    pngs = _plots(report)
    plateau = report["plateau"]
    cfg = report["config"]
    md = [
        "# jestkit demo report",
        "",
        f"Data: `digits-web` (pool of {cfg.get('pool_size')} web-like pairs, "
        f"{100 * cfg.get('pool_clean_fraction', 0.45):.0f}% clean; reference trained on "
        f"{cfg.get('curated_size')} curated pairs). Sub-batch b = {cfg.get('batch_size')}, "
        f"filter ratio f = {cfg.get('filter_ratio')}, n_chunks = {cfg.get('n_chunks')}, "
        f"T = {cfg.get('steps')} steps, seeds {', '.join(map(str, cfg.get('seeds') or []))}.",
        "",
        "Protocol (BRIEF 7): target = uniform's final zero-shot accuracy (mean of its last "
        f"{FINAL_EVALS} evaluations, averaged over seeds) = "
        f"{100 * report['methods']['uniform']['target_accuracy']:.1f}%. Iteration speed-up = "
        "T / first step where the method's seed-averaged curve reaches it; compute speed-up = "
        "uniform's total FLOPs / the method's cumulative FLOPs (training + learner scoring + "
        "reference scoring + the selector's own matmuls) at that step. FLOPs are measured "
        "with torch's flop counter.",
        "",
        summary_table(report),
        "",
        *[line for caveat in caveats(report) for line in (caveat, "")],
        *([] if all(m.get("selection_counted", True) for m in report["methods"].values())
          else ["Selection n/a: these runs were saved before the selector's own matmuls were "
                "counted, so their compute speed-ups leave those FLOPs out.", ""]),
        f"Reference training: {_fmt_flops(report['reference']['flops'])} FLOPs in all, "
        f"{report['reference_training_flops_amortised_per_step'] / 1e9:.2f} GFLOP per learner "
        "step if amortised over one run (not included in the compute speed-ups above).",
        "",
        *([f"Reference cache (one reference forward over the pool, built once and shared by "
           f"the `-cached` and `-flexi` runs): "
           f"{report['reference'].get('caching_flops', 0) / 1e9:.2f} GFLOP, "
           f"{report['reference_caching_flops_amortised_per_step'] / 1e9:.3f} GFLOP per "
           "learner step if charged to one run; not included above either, since it is paid "
           "once per pool and reference, not per run.", ""]
          if any(m.endswith(("-cached", "-flexi")) for m in report["methods"]) else []),
        "## Did uniform plateau?",
        f"Seed-averaged accuracy around step {plateau['step_three_quarters']} (mean of 3 "
        f"evaluations, one quarter of T before the last 3): "
        f"{100 * plateau['accuracy_at_three_quarters']:.1f}%; at the end (mean of the last 3): "
        f"{100 * plateau['accuracy_at_end']:.1f}%; moved "
        f"{plateau['moved_points']:+.2f} points -> {plateau_verdict(plateau)}.",
        "",
        "## Speed-up at other accuracy levels",
        "First evaluated step at which each method's seed-averaged curve reaches the level, "
        "and uniform's own first step at that level / the method's. (The protocol's speed-up "
        "above divides T, not uniform's first crossing, by the method's step at uniform's final "
        "accuracy.) Steps are those of the evaluation grid (every "
        f"{_plural(report['methods']['uniform']['curves']['steps'][0], 'step')}), so a speed-up "
        "can only "
        "take the values T / (a grid step): neighbouring values are several percent apart.",
        "",
        *_levels_table(report.get("steps_to_reach")),
        "",
        *_per_seed_section(report),
        "## Plots",
        *[f"![{p}]({p})" for p in pngs],
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    # All or nothing where it can be told beforehand (found in review: with a directory
    # named report.md, the plots and report.json were rewritten and report.md was not).
    in_the_way = [name for name in (*pngs, "report.json", "report.md") if (out / name).is_dir()]
    if in_the_way:
        raise ValueError(f"{out}: {', '.join(in_the_way)} "
                         f"{'is a directory' if len(in_the_way) == 1 else 'are directories'}, "
                         f"where the report writes a file; move it away (nothing was written)")
    # Every file written before any is replaced: a full disk leaves the old report whole.
    atomic_write_all({**{out / name: data for name, data in pngs.items()},
                      out / "report.json": report_json, out / "report.md": "\n".join(md)})
    return {"json": out / "report.json", "md": out / "report.md",
            **{p: out / p for p in pngs}}


_RUN_KEYS = ("config", "steps", "zero_shot_accuracy", "i2t_recall", "t2i_recall",
             "cumulative_flops", "clean_fraction")


_CURVE_KEYS = ("zero_shot_accuracy", "i2t_recall", "t2i_recall", "clean_fraction")


def _is_number(value: object) -> bool:
    """A finite int or float (a bool is not one)."""
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _is_curve(values: object, steps: object) -> bool:
    """A non-empty list of finite numbers, one per evaluated step."""
    return (isinstance(values, list) and isinstance(steps, list) and len(values) == len(steps)
            and len(steps) > 0 and all(_is_number(v) for v in values))


def read_json(path: Path, kind: type) -> dict | list:
    """A JSON file's content, which must be a `kind` (dict or list); errors (ValueError)
    name the file."""
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON (truncated or altered?): {err}") from None
    except RecursionError:  # json's parser recurses once per nesting level
        raise ValueError(f"{path} is not valid JSON for this (nested too deeply)") from None
    if not isinstance(value, kind):
        json_name = {dict: "object", list: "array", str: "string", int: "number",
                     float: "number", bool: "boolean", type(None): "null"}[type(value)]
        raise ValueError(f"{path} holds a JSON {json_name}, expected "
                         f"{'an array of runs' if kind is list else 'an object'}")
    return value


def _check_info(path: Path, info: dict) -> None:
    """What the report reads from report.json (or runs/info.json) besides the runs: named
    errors, not a traceback or a NaN in the written report (found in review)."""
    if not isinstance(info["config"], dict):
        raise ValueError(f"{path}: config must be an object (the demo's config), got "
                         f"{info['config']!r:.40}")
    clean = info["config"].get("pool_clean_fraction", 0.45)
    if not (_is_number(clean) and 0 <= clean <= 1):
        raise ValueError(f"{path}: config.pool_clean_fraction must be a number in [0, 1], got "
                         f"{clean!r:.40} (altered?)")
    reference = info["reference"]
    for key in ("flops", "caching_flops"):
        value = reference.get(key, 0) if isinstance(reference, dict) else None
        if not (_is_number(value) and value >= 0):
            raise ValueError(f"{path}: reference.{key} must be a finite number >= 0, got "
                             f"{value!r:.40} (altered?)")


def _check_run(path: Path, i: int, name: str, run: dict) -> None:
    """A saved run is one of method `name`'s, with curves a report can be built from: its
    config's method and selection those of `name` (found in review: another method's runs
    copied in as uniform's became the baseline), evaluated at increasing steps >= 1, rates in
    [0, 1], and FLOP ledgers of finite counts, growing from above zero."""
    from jestkit.demo import DEMO_METHODS  # (demo imports this module)

    config = run["config"]
    if not isinstance(config, dict):
        raise ValueError(f"{path}: run {i}'s config must be an object, got {config!r:.40}")
    spec = {m: (method, selection, scoring) for m, method, selection, scoring in DEMO_METHODS}
    if name in spec:
        method, selection, scoring = spec[name]
        got = (config.get("method"), config.get("selection"))
        flexi = bool(config.get("score_patch_size"))
        if got != (method, selection) or flexi != (scoring == "flexi"):
            raise ValueError(f"{path}: run {i} is not one of {name}'s runs (its config: method "
                             f"{got[0]!r}, selection {got[1]!r}, score_patch_size "
                             f"{config.get('score_patch_size')!r}); copied from another "
                             f"method's file?")
    steps = run["steps"]
    if not (all(isinstance(s, int) and not isinstance(s, bool) and s >= 1 for s in steps)
            and all(a < b for a, b in zip(steps, steps[1:], strict=False))):
        raise ValueError(f"{path}: run {i}'s steps must be increasing ints >= 1 (altered?)")
    for key in _CURVE_KEYS:
        if not all(0 <= v <= 1 for v in run[key]):
            raise ValueError(f"{path}: run {i}'s {key} must lie in [0, 1] (fractions, not "
                             f"percentages; altered?)")
    ledgers = run["cumulative_flops"]
    if not (isinstance(ledgers, list) and all(
            isinstance(ledger, dict) and all(_is_number(v) and v >= 0 for v in ledger.values())
            for ledger in ledgers)):
        raise ValueError(f"{path}: run {i}'s cumulative_flops must be objects of finite "
                         f"counts >= 0, one per evaluated step (altered?)")
    totals = [sum(ledger.values()) for ledger in ledgers]
    if len(totals) != len(steps) or totals[0] <= 0 or any(
            a > b for a, b in zip(totals, totals[1:], strict=False)):
        raise ValueError(f"{path}: run {i}'s cumulative_flops must give one total per evaluated "
                         f"step, above zero and never falling (altered?)")


def rebuild_report(run_dir: str | os.PathLike) -> dict:
    """Rebuild a demo run directory's report (report.json, report.md, plots) from the per-run
    curves it saved in runs/<method>.json, with this version's report code. The reference
    info and the run config are taken from the existing report.json, or from runs/info.json
    where no report was written (a demo whose report failed); the new files are written only
    once the report is built."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir} does not exist or is not a directory")
    old_path = run_dir / "report.json"
    if not old_path.is_file():
        old_path = run_dir / "runs" / "info.json"
    if not old_path.is_file():
        raise FileNotFoundError(f"{run_dir} has neither report.json nor runs/info.json: not a "
                                f"`jestkit demo` run directory")
    old = read_json(old_path, dict)
    if "methods" not in old and isinstance(old.get("config"), dict):
        old["methods"] = old["config"].get("methods")
    missing = [k for k in ("methods", "reference", "config") if not old.get(k)]
    if missing:
        raise ValueError(f"{old_path} lacks {missing}: not written by `jestkit demo`")
    _check_info(old_path, old)
    methods = old["methods"]
    if not (isinstance(methods, dict | list) and all(isinstance(m, str) for m in methods)):
        raise ValueError(f"{old_path}: methods must be the demo's method names (an object or "
                         f"list), got {methods!r:.60}")
    reference = old["reference"]
    accuracy = (reference.get("metrics") or {}).get("zero_shot_accuracy") if isinstance(
        reference, dict) and isinstance(reference.get("metrics"), dict) else None
    if not (_is_number(accuracy) and 0 <= accuracy <= 1):
        raise ValueError(f"{old_path}: reference.metrics.zero_shot_accuracy must be a number in "
                         f"[0, 1], got {accuracy!r:.40} (altered?)")
    runs = {}
    for name in old["methods"]:
        path = run_dir / "runs" / f"{name}.json"
        if not path.is_file():
            raise FileNotFoundError(f"missing per-run curves {path}")
        runs[name] = read_json(path, list)
        if not runs[name]:
            raise ValueError(f"{path} holds no runs")
        for i, run in enumerate(runs[name]):
            lacking = [k for k in _RUN_KEYS if not isinstance(run, dict) or k not in run]
            if lacking:
                raise ValueError(f"{path}: run {i} lacks {lacking}: not curves saved by "
                                 f"`jestkit demo`")
            bad = [k for k in _CURVE_KEYS if not _is_curve(run[k], run["steps"])]
            if bad:
                raise ValueError(f"{path}: run {i}'s {bad} are not lists of finite numbers, "
                                 f"one per evaluated step (altered?)")
            _check_run(path, i, name, run)
            total = run["config"].get("steps")
            if _is_number(total) and run["steps"][-1] != total:
                raise ValueError(f"{path}: run {i}'s curves end at step {run['steps'][-1]}, "
                                 f"not at its config's steps={total} (cut short or altered?)")
        seeds = [run["config"].get("seed") for run in runs[name]]
        repeated = [seed for seed in seeds if seeds.count(seed) > 1]
        if repeated:  # found in review: one run three times read as three seeds
            raise ValueError(f"{path}: seed {repeated[0]!r} appears {seeds.count(repeated[0])} "
                             f"times; each run must be another seed's")
    try:
        report = build_report(runs, old["reference"], old["config"])
    except (KeyError, TypeError, IndexError, AttributeError, ZeroDivisionError) as err:
        raise ValueError(f"{run_dir}: the saved runs or report do not hold what `jestkit "
                         f"demo` writes ({type(err).__name__}: {err})") from err
    # config.code_version made the runs; this code made the report from their curves.
    report["rebuilt_by"] = code_version()
    write_report(report, run_dir)
    return report
