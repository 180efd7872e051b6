"""How much of a speed-up could *any* noise filter give on digits-web? The clean-pool ceiling.

JEST's iteration speed-up on digits-web comes mostly from not training on the pool's noisy
pairs. This benchmark trains the demo's learner three ways, same T, b and seeds:

- `uniform`: uniform sampling from the whole pool (the protocol's baseline);
- `clean-oracle`: uniform sampling from only the pool's clean pairs (45% of it). It reads the
  hidden `is_clean` flag, which no method is allowed to read: a perfect noise filter at no
  scoring cost, i.e. a ceiling on what filtering noise alone can buy;
- `learnability-joint`: the demo's JEST (live scoring), with the demo's reference.

and reports each by the demo's protocol (`jestkit.report`, BRIEF 7): final accuracy,
iteration speed-up against uniform's final accuracy, and the first step reaching each level.
If the clean-oracle's speed-up is well short of 5x, the issue's 5x cannot come from removing
noise on this benchmark: it would have to come from choosing among clean pairs.

    python benchmarks/clean_oracle.py                      # the demo's config, 3 seeds
    python benchmarks/clean_oracle.py --out docs/results.md --section clean_oracle
    python benchmarks/clean_oracle.py --quick              # smoke test, < 1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
from _markdown import check_outputs, command_line, load_demo_config, publish

from jestkit.data import load_digits_web
from jestkit.demo import (
    DEMO_MAX_TEXT_LEN,
    MAX_WORKERS,
    DemoConfig,
    stop_workers,
    worker_pool,
)
from jestkit.models import load_model, save_model
from jestkit.report import LEVELS, fmt_speedup, steps_to_reach, summarize_methods
from jestkit.training import train_learner, train_reference

REPO = Path(__file__).resolve().parents[1]
KINDS = ("uniform", "clean-oracle", "learnability-joint")


def _run(kind: str, cfg, data_seed: int, reference_path: str | None) -> dict:
    """Worker: one learner run, single-threaded like the demo's."""
    torch.set_num_threads(1)
    data = load_digits_web(data_seed, max_len=DEMO_MAX_TEXT_LEN)
    if kind == "clean-oracle":
        data = dataclasses.replace(data, pool=data.pool.subset(data.pool.is_clean))
    if kind == "learnability-joint":
        reference = load_model(reference_path).eval()
        return train_learner(data, dataclasses.replace(cfg, method="learnability",
                                                       selection="joint"), reference).to_dict()
    return train_learner(data, dataclasses.replace(cfg, method="uniform")).to_dict()


def run(demo: DemoConfig, workers: int, kinds: tuple[str, ...] = KINDS) -> dict:
    started = time.time()
    data = load_digits_web(demo.data_seed, max_len=DEMO_MAX_TEXT_LEN)
    with tempfile.TemporaryDirectory(prefix="clean_oracle.") as tmp:
        reference_path = str(Path(tmp) / "reference.safetensors")
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the demo trains it: the same reference, bit for bit
        try:
            # Trained even when learnability-joint is not run: its accuracy is reported.
            reference, ref_info = train_reference(data, demo.reference)
        finally:
            torch.set_num_threads(threads)
        save_model(reference, reference_path)
        jobs = [(kind, dataclasses.replace(demo.learner, seed=seed))
                for kind in kinds for seed in demo.seeds]
        pool = worker_pool(workers)  # as the demo's
        runs: dict[str, list[dict]] = {kind: [] for kind in kinds}
        try:
            futures = [(kind, pool.submit(_run, kind, cfg, demo.data_seed, reference_path))
                       for kind, cfg in jobs]
            for kind, fut in futures:  # in submission order: seeds in order
                runs[kind].append(fut.result())
        except BaseException:
            stop_workers(pool)  # fail now, not after every running run
            raise
        pool.shutdown()
    methods = summarize_methods(runs)  # as the demo's report: uniform is 1x by definition
    return {
        "config": dataclasses.asdict(demo),
        "pool_size": len(data.pool),
        "clean_pool_size": int(data.pool.is_clean.sum()),
        "reference_accuracy": ref_info["metrics"]["zero_shot_accuracy"],
        "methods": methods,
        "levels": steps_to_reach(methods),
        "wall_s": round(time.time() - started, 1),
    }


def markdown(res: dict, command: str) -> str:
    m, lv = res["methods"], res["levels"]
    learner = res["config"]["learner"]
    lines = [
        f"Command: `{command}` ({res['wall_s']:.0f} s; T = {learner['steps']}, "
        f"b = {learner['batch_size']}, seeds {list(res['config']['seeds'])}; clean pool "
        f"{res['clean_pool_size']} of {res['pool_size']} pairs; reference "
        f"{100 * res['reference_accuracy']:.1f}%).",
        "",
        f"Target (uniform's final accuracy): {100 * m['uniform']['target_accuracy']:.1f}%.",
        "",
        "| method | final zero-shot acc. (mean ± std) | step reaching the target | "
        "iteration speed-up | clean fraction trained on |",
        "|---|---|---|---|---|",
    ]
    for kind in res["methods"]:
        s = m[kind]
        std = s["final_accuracy"]["std"]
        acc = f"{100 * s['final_accuracy']['mean']:.1f}" + (
            "" if std is None else f" ± {100 * std:.1f}")
        clean = s["clean_fraction"]
        lines.append(f"| {kind} | {acc} | {s['step_reaching_target'] or 'not reached'} | "
                     f"{fmt_speedup(s['iteration_speedup'])} | {100 * clean:.1f}% |")
    if not lv["levels"]:
        return "\n".join([*lines, "", "No method reached any of the levels "
                           f"{[f'{100 * x:.0f}%' for x in LEVELS]}."]) + "\n"
    lines += ["", "First evaluated step reaching each accuracy level (uniform's step / the "
              "method's):", "",
              "| method | " + " | ".join(f"{100 * x:.0f}%" for x in lv["levels"]) + " |",
              "|---|" + "---|" * len(lv["levels"])]
    for kind in res["methods"]:
        row = lv["methods"][kind]
        cells = ["not reached" if s is None else
                 (f"{s} ({r:.1f}x)" if r is not None and kind != "uniform" else str(s))
                 for s, r in zip(row["steps"], row["iteration_speedup"], strict=True)]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path,
                   help="a demo config (JSON): its learner, reference, seeds and data seed "
                        "(default: configs/demo.json)")
    p.add_argument("--quick", action="store_true", help="smoke test: 40 steps, one seed")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--methods", nargs="+", choices=KINDS, default=list(KINDS),
                   help="which to train (uniform, the baseline, always is; default: all)")
    p.add_argument("--out", type=Path, help="write the markdown results into this doc")
    p.add_argument("--section", default="clean_oracle",
                   help="--out replaces the text between <!-- SECTION:start --> and "
                        "<!-- SECTION:end --> (default: clean_oracle)")
    p.add_argument("--json", type=Path, help="write the raw results as JSON here")
    args = p.parse_args(argv)
    if not 1 <= args.workers <= MAX_WORKERS:  # as the demo's --workers
        p.error(f"--workers must be in [1, {MAX_WORKERS}], got {args.workers}")
    if args.quick and args.config:
        p.error("--quick runs its own tiny config; drop --config (or --quick)")
    # Before minutes of training, not after: where the results go must be writable.
    check_outputs(p, args.out, args.section, args.json)
    demo = (DemoConfig.quick() if args.quick else
            load_demo_config(p, args.config or REPO / "configs" / "demo.json"))
    kinds = tuple(k for k in KINDS if k == "uniform" or k in args.methods)
    res = run(demo, args.workers, kinds)
    md = markdown(res, command_line("clean_oracle.py", argv))
    publish(md, res, args.json, args.out, args.section, "Clean-pool ceiling")
    return 0


if __name__ == "__main__":
    # SIGTERM ends the run as Ctrl-C does: workers stopped, temporary files removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
