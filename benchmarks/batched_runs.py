"""What training several runs as one batched model could buy, at best, on this machine.

A plateaued demo needs T of about 12,000-14,000 steps, 4.4-5.7x what fits in 10 minutes here
(`benchmarks/demo_budget.py`), and the steps of the demo's small models run far below the
machine's matmul peak. The route `docs/results.md` names is to make each operation bigger:
train a method's seeds (or all the demo's runs, which share one architecture) as one model
with stacked weights (`torch.func.vmap`). This benchmark prices that route without building
it, from an optimistic stand-in:

- **the stand-in**: K runs batched do the work of one run with K times the rows: training
  forward+backward at K*b pairs, each scoring forward at K*N pairs, one AdamW step over K
  stacked copies of the learner's parameters; the loss is each run's own over its b pairs.
  A vmap over K stacked models issues the same operations, each over K times the rows, with
  the same FLOPs, but its matrix products are batched products over K weights, which run no
  faster than one product over K*b rows with one weight. (Work per call that does not grow
  with the rows, such as resizing the patch kernel for a coarse patch at some widths, the
  stand-in does once where K models would each do it: also in the route's favour.) The
  benchmark checks the stand-in against a real vmap on the learner's image-tower block:
  ``torch.func.vmap`` over K stacked copies, forward and backward, against the stand-in and
  against K separate calls (the vmap's outputs must agree with the separate calls' to float
  rounding).
- **left out, all in the batched route's favour**: at the best K, the selection (timed per
  run and counted at K = 1; the selector is not batched here, so the best K counts it as
  free), and in the demo's total all but one of each seed's live-reference forwards (the
  methods that score with the live reference see the same super-batches, as the sampler
  depends on the seed alone, so a batched demo could run that forward once per seed); at
  every K, sampling, the cache lookup, evaluation, the reference's training and process
  start-up. Each part is also taken at its own fastest K, whether or not that many runs
  share it. So the best-K totals are lower bounds on what a batched demo's steps would
  take, and their speed-ups upper bounds.

Per component and K, the time per run (the K-batched call's time / K) is timed in rounds, all
K in every round, so drifts of this machine's speed hit every K alike; K = 1 is today's
per-run cost, measured in the same process. Then, per method, the time per run-step at K = 1
(with its selection) and at the best K of each component (without), and the whole demo's
learner steps at each T of ``--steps`` on ``--workers`` one-thread workers.

Run from the repository root::

    python benchmarks/batched_runs.py              # the default demo at its T, K = 1 3 7 21
    python benchmarks/batched_runs.py --config configs/demo-16-tokens.json --steps 1000 12000 14000
    python benchmarks/batched_runs.py --quick      # smoke test (< 20 s)

``--out FILE`` writes the tables between ``<!-- batched_runs:start -->`` and
``<!-- batched_runs:end -->`` of FILE, keeping the text around them.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _markdown import check_outputs, command_line, load_demo_config, publish
from step_overhead import machine_info
from torch.func import functional_call, stack_module_state, vmap

from jestkit.data import load_digits_web
from jestkit.demo import DEMO_MAX_TEXT_LEN, DemoConfig, learner_configs
from jestkit.models import DualEncoder
from jestkit.scoring import USES_LEARNER
from jestkit.selection import JointSelector, ModelEmbeddings
from jestkit.training import _split_sizes, encode_image_parts, model_config

DEFAULT_RUNS = (1, 3, 7, 21)  # one run; a method's 3 seeds; 7 methods; the demo's 21 runs
BUDGET_MIN = 10.0


def _rows(split, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` pairs of `split` (cycled): images [n, C, S, S], tokens [n, L]."""
    idx = torch.arange(n) % len(split.ids)
    return split.images[idx], split.tokens[idx]


def method_parts(cfg: DemoConfig) -> dict[str, dict]:
    """Per method of `cfg`: the components one of its steps runs.

    Returns name -> {"components": [...], "selector": (criterion, selection) | None}.
    Components: "train" or "train@<p>x<fraction>" (multi-resolution), "adamw",
    "learner_scoring@<patch>", "reference_scoring"."""
    parts = {}
    for name, uses_cache, lc in learner_configs(cfg):
        if name in parts:
            continue
        comps = ["train" if not (lc.score_patch_size and lc.multires_fraction > 0)
                 else f"train@{lc.score_patch_size}x{lc.multires_fraction:g}", "adamw"]
        if lc.method != "uniform" and USES_LEARNER[lc.method]:
            comps.append(f"learner_scoring@{lc.score_patch_size or lc.patch_size}")
        if lc.needs_reference and not uses_cache:
            comps.append("reference_scoring")
        selector = None if lc.method == "uniform" else (lc.method, lc.selection)
        parts[name] = {"components": comps, "selector": selector}
    return parts


def batched_sigmoid_loss(image_emb: torch.Tensor, text_emb: torch.Tensor,
                         logit_scale: torch.Tensor, logit_bias: torch.Tensor,
                         runs: int) -> torch.Tensor:
    """The sum of `runs` runs' sigmoid losses (`models.sigmoid_loss`), run r's pairs being
    rows [r*b, (r+1)*b) of image_emb and text_emb [runs*b, D]: each run's pairs meet only
    each other, as under vmap. (One loss over all runs*b rows would do runs times the FLOPs
    of its [rows, rows] logits.) Returns a scalar."""
    rows, dim = image_emb.shape
    b = rows // runs
    u, v = image_emb.reshape(runs, b, dim), text_emb.reshape(runs, b, dim)
    logits = logit_scale * (u @ v.transpose(1, 2)) + logit_bias  # [runs, b, b]
    labels = 2.0 * torch.eye(b, dtype=logits.dtype) - 1.0
    return -F.logsigmoid(labels * logits).sum() / b


def _component(name: str, k: int, cfg: DemoConfig, data, learner: DualEncoder,
               reference: DualEncoder) -> Callable[[], object]:
    """The K-batched stand-in of one component, as a call to time."""
    lc = cfg.learner
    b, n = lc.batch_size, lc.super_batch_size
    if name == "adamw":
        # K stacked copies of every parameter, grouped as `training._optimizer` groups them.
        params = [torch.zeros(k, *p.shape, requires_grad=True) for p in learner.parameters()]
        gen = torch.Generator().manual_seed(k)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        shapes = [p.ndim for p in learner.parameters()]
        opt = torch.optim.AdamW(
            [{"params": [p for p, d in zip(params, shapes, strict=True) if d >= 2],
              "weight_decay": lc.weight_decay},
             {"params": [p for p, d in zip(params, shapes, strict=True) if d < 2],
              "weight_decay": 0.0}], lr=lc.lr, foreach=True)
        return opt.step
    if name.startswith("train"):
        images, tokens = _rows(data.pool, k * b)
        patches, fraction = (None,), 0.0
        if "@" in name:
            coarse, fraction = name.split("@")[1].split("x")
            patches, fraction = (lc.patch_size, int(coarse)), float(fraction)
        parts = _split_sizes(k * b, patches, fraction)

        def train():  # `training._train_step`'s forward_backward, at K*b rows
            learner.zero_grad(set_to_none=True)
            batched_sigmoid_loss(encode_image_parts(learner, images, parts),
                                 learner.encode_text(tokens), learner.logit_scale,
                                 learner.logit_bias, k).backward()
        return train
    images, tokens = _rows(data.pool, k * n)
    if name == "reference_scoring":
        return torch.no_grad()(lambda: reference(images, tokens))
    patch = int(name.split("@")[1])
    return torch.no_grad()(lambda: learner(images, tokens, patch))


def _selection(criterion: str, selection: str, cfg: DemoConfig, data, learner, reference):
    lc = cfg.learner
    images, tokens = _rows(data.pool, lc.super_batch_size)
    with torch.no_grad():
        emb_l = ModelEmbeddings(*learner(images, tokens))
        emb_r = ModelEmbeddings(*reference(images, tokens))
    selector = JointSelector(criterion, batch_size=lc.batch_size, n_chunks=lc.n_chunks,
                             selection=selection)
    gen = torch.Generator().manual_seed(0)
    return lambda: selector(emb_l, emb_r, generator=gen)


def vmap_check(learner: DualEncoder, batch_size: int, k: int) -> dict:
    """The learner's first image-tower block (its width, heads and token count), forward +
    backward, for K models with their own weights: a real vmap over K stacked copies, the
    stand-in (one block over K*b rows), and K separate calls. Returns their callables and the
    vmap's largest difference from the separate calls' outputs."""
    c = learner.config
    tokens = (c.image_size // c.patch_size) ** 2
    gen = torch.Generator().manual_seed(0)
    blocks = []
    for _ in range(k):
        block = copy.deepcopy(learner.image.blocks[0])
        with torch.no_grad():  # each model its own weights
            for p in block.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        blocks.append(block)
    params, _ = stack_module_state(blocks)  # [K, ...] leaves that require grad
    template = copy.deepcopy(blocks[0]).to("meta")
    x = torch.randn(k, batch_size, tokens, c.image_width, generator=gen)

    def one(p, xk):
        return functional_call(template, p, (xk,))
    batched = vmap(one)
    with torch.no_grad():
        diff = float((batched(params, x) - torch.stack(
            [blk(x[i]) for i, blk in enumerate(blocks)])).abs().max())
    stand_in, rows = blocks[0], x.reshape(k * batch_size, tokens, c.image_width)
    return {"max_abs_diff": diff,
            "vmap": lambda: batched(params, x).sum().backward(),
            "stand_in": lambda: stand_in(rows).sum().backward(),
            "separate": lambda: [blk(x[i]).sum().backward() for i, blk in enumerate(blocks)]}


def measure(cfg: DemoConfig, args) -> dict:
    """Time every component at every K (one thread, as the demo's workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(cfg, args)
    finally:
        torch.set_num_threads(threads)


def _measure(cfg: DemoConfig, args) -> dict:
    data = load_digits_web(cfg.data_seed, max_len=DEMO_MAX_TEXT_LEN)
    vocab = data.tokenizer.vocab_size
    # Untrained weights: a step's speed does not depend on them.
    learner = DualEncoder(model_config(cfg.learner, vocab), seed=0).train()
    reference = DualEncoder(model_config(cfg.reference, vocab), seed=1).eval()
    parts = method_parts(cfg)
    names = sorted({c for p in parts.values() for c in p["components"]})
    calls = {(c, k): _component(c, k, cfg, data, learner, reference)
             for c in names for k in args.runs}
    selectors = sorted({p["selector"] for p in parts.values() if p["selector"]})
    for crit, sel in selectors:
        calls[(f"selection:{crit}-{sel}", 1)] = _selection(crit, sel, cfg, data, learner,
                                                           reference)
    check_k = max(args.runs)
    check = vmap_check(learner, cfg.learner.batch_size, check_k)
    for kind in ("vmap", "stand_in", "separate"):
        calls[(f"block:{kind}", check_k)] = check[kind]

    keys = list(calls)
    for key in keys:
        for _ in range(args.warmup):
            calls[key]()
    times: dict[tuple, list[float]] = {key: [] for key in keys}
    for rnd in range(args.rounds):  # every key once a round, the order rotated
        for key in keys[rnd % len(keys):] + keys[:rnd % len(keys)]:
            t0 = time.perf_counter()
            calls[key]()
            times[key].append(time.perf_counter() - t0)
    per_run = {c: {k: statistics.median(times[(c, k)]) / k for k in args.runs} for c in names}
    for crit, sel in selectors:
        per_run[f"selection:{crit}-{sel}"] = {1: statistics.median(
            times[(f"selection:{crit}-{sel}", 1)])}
    block = {kind: statistics.median(times[(f"block:{kind}", check_k)])
             for kind in ("vmap", "stand_in", "separate")}
    return {"per_run_s": per_run, "methods": parts, "runs": list(args.runs),
            "block_check": {"k": check_k, "max_abs_diff": check["max_abs_diff"], **block},
            "seeds": len(cfg.seeds), "rounds": args.rounds}


def step_seconds(res: dict, method: str, best: bool) -> float:
    """One run-step of `method`: its components and its selection at K = 1 (`best` False,
    today's cost), or each component at its fastest K and the selection free (a lower
    bound)."""
    per_run, parts = res["per_run_s"], res["methods"][method]
    if best:
        return sum(min(per_run[c].values()) for c in parts["components"])
    total = sum(per_run[c][1] for c in parts["components"])
    if parts["selector"]:
        total += per_run["selection:{}-{}".format(*parts["selector"])][1]
    return total


def demo_steps_seconds(res: dict, steps: int, workers: int, best: bool) -> float:
    """The whole demo's learner steps (every method x seed, `steps` each) over `workers`;
    at the best K, the live reference's forward once per seed and step, however many of
    that seed's methods score with it (they see the same super-batches)."""
    per_step = sum(step_seconds(res, m, best) for m in res["methods"])
    if best:
        live = sum("reference_scoring" in p["components"] for p in res["methods"].values())
        if live > 1:
            per_step -= (live - 1) * min(res["per_run_s"]["reference_scoring"].values())
    return res["seeds"] * steps * per_step / workers


def markdown(res: dict, command: str) -> str:
    m, runs = res["machine"], res["runs"]
    lines = [f"Command: `{command}`", "",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']}; one thread; load "
             f"average {m['loadavg_start'][0]:.2f} at start, {res['loadavg_end'][0]:.2f} at "
             f"end; {res['rounds']} rounds; run took {res['wall_s']:.0f} s.", "",
             "Time per run (ms) of each part of a step when K runs are batched as one (the "
             "stand-in: K times the rows); the last column is K = 1's time over the fastest "
             "K's.", "",
             "| part | " + " | ".join(f"K = {k}" for k in runs) + " | best speed-up |",
             "|---" * (len(runs) + 2) + "|"]
    for c, by_k in res["per_run_s"].items():
        if c.startswith("selection:"):
            continue
        cells = " | ".join(f"{by_k[k] * 1e3:.2f}" for k in runs)
        lines.append(f"| {c} | {cells} | {by_k[1] / min(by_k.values()):.2f}x |")
    for c, by_k in res["per_run_s"].items():
        if c.startswith("selection:"):
            lines.append(f"| {c} (not batched) | {by_k[1] * 1e3:.2f} |"
                         + " |" * (len(runs) - 1) + " free in the best case |")
    chk = res["block_check"]
    lines += ["", f"The stand-in against a real vmap: one image-tower block, forward + "
              f"backward, K = {chk['k']} models: vmap over stacked weights "
              f"{chk['vmap'] * 1e3:.2f} ms, the stand-in {chk['stand_in'] * 1e3:.2f} ms, "
              f"{chk['k']} separate calls {chk['separate'] * 1e3:.2f} ms (vmap's outputs "
              f"within {chk['max_abs_diff']:.1e} of the separate calls').", "",
              "Per method, one run-step: today's (K = 1, with its selection) and the best "
              "case (each part at its fastest K, the selection free).", "",
              "| method | ms per run-step, K = 1 | at the best K | speed-up |",
              "|---|---|---|---|"]
    for name in res["methods"]:
        one, best = step_seconds(res, name, False), step_seconds(res, name, True)
        lines.append(f"| {name} | {one * 1e3:.2f} | {best * 1e3:.2f} | {one / best:.2f}x |")
    lines += ["", f"The demo's learner steps alone ({len(res['methods'])} methods x "
              f"{res['seeds']} seeds; no evaluation, sampling, reference training or "
              f"start-up; at the best K, the live reference's forward once per seed) on "
              f"{res['workers']} one-thread workers, against a {res['budget_min']:g}-minute "
              f"budget:", "",
              "| T | K = 1, min | best K, min | fits the budget at the best K? |",
              "|---|---|---|---|"]
    for c in res["demos"]:
        fits = "yes" if c["best_s"] / 60 <= res["budget_min"] else "no"
        lines.append(f"| {c['steps']:,} | {c['k1_s'] / 60:.1f} | {c['best_s'] / 60:.1f} | "
                     f"{fits} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path, help="a demo config (JSON); default: the demo's")
    p.add_argument("--runs", type=int, nargs="+", default=list(DEFAULT_RUNS),
                   help="batch sizes K, in runs (default: 1 3 7 21; 1 is always measured)")
    p.add_argument("--steps", type=int, nargs="+", default=None,
                   help="demo lengths T to price (default: the config's own, learner.steps)")
    p.add_argument("--workers", type=int, default=2,
                   help="learner processes at once, one thread each (default 2; at most "
                        "the machine's cores)")
    p.add_argument("--budget-min", type=float, default=BUDGET_MIN)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--quick", action="store_true",
                   help="smoke test (< 20 s): K = 1 2, 2 rounds, 1 warm-up (in place of "
                        "--runs, --rounds, --warmup)")
    p.add_argument("--out", type=Path, help="write the markdown tables into this doc")
    p.add_argument("--json", type=Path, help="write the raw numbers as JSON here")
    args = p.parse_args(argv)
    for name, least in (("workers", 1), ("rounds", 1), ("warmup", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name} must be >= {least}, got {getattr(args, name)}")
    if not 1 <= min(args.runs) <= max(args.runs) <= 64:
        p.error(f"--runs must all be in [1, 64], got {args.runs}")
    if args.steps is not None and min(args.steps) < 1:
        p.error(f"--steps must all be >= 1, got {args.steps}")
    if not args.budget_min > 0:
        p.error(f"--budget-min must be > 0, got {args.budget_min}")
    check_outputs(p, args.out, "batched_runs", args.json)  # before any timing
    cfg = load_demo_config(p, args.config) if args.config else DemoConfig()
    if args.steps is None:
        args.steps = [cfg.learner.steps]
    if args.quick:
        args.runs, args.rounds, args.warmup = [1, 2], 2, 1
    args.runs = sorted({1, *args.runs})
    started = time.time()
    info = machine_info()
    res = measure(cfg, args)
    workers = min(args.workers, os.cpu_count() or 1)
    load_end = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    res.update(machine=info, workers=workers, budget_min=args.budget_min,
               loadavg_end=list(load_end))
    res["demos"] = [{"steps": t, "k1_s": demo_steps_seconds(res, t, workers, False),
                     "best_s": demo_steps_seconds(res, t, workers, True)} for t in args.steps]
    res["wall_s"] = time.time() - started
    md = markdown(res, command_line("batched_runs.py", argv))
    raw = {**res, "per_run_s": {c: {str(k): v for k, v in by_k.items()}
                                for c, by_k in res["per_run_s"].items()}}
    publish(md, raw, args.json, args.out, "batched_runs", "Batched runs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
