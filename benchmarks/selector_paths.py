"""Which way the sigmoid `JointSelector` should score a small super-batch: one N x N pair matrix
built up front, or row blocks per chunk.

Both paths compute the same conditional logits (tests/test_selection.py checks them against
the dense reference at every chunk). For each N the two are timed in the same process,
interleaved round by round, on the same embeddings:

  pair matrix  the negative-pair matrix crit(l^L, l^R) + its transpose is built once, and each
               chunk's update is a row gather and a sum (forced for every N here by raising
               the library's size bound `_DENSE_MAX_N` for this measurement only);
  row blocks   each chunk computes its N x n block of pairs from the embeddings (forced by a
               `max_block_elements` of N * N - 1, which still fits every chunk in one block).

Setup: learnability, f = 0.8 (b = N / 5), K = 16, two models with float32 embeddings of
dimension d (32 is the demo's), one torch thread as in the demo's workers. Time: median over
rounds of the mean of `--calls` calls. Also reported: the FLOPs each path executes (torch's
flop counter, as the training loop's "selection" ledger phase counts them: the pair matrix
costs 2 N^2 d FLOPs per model, the blocks ~4 N b d), and whether both paths picked the same indices
from the same generator state (float32 rounding may differ in the last bit).

    python benchmarks/selector_paths.py            # ~1 minute
    python benchmarks/selector_paths.py --quick    # smoke test
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

from jestkit import selection
from jestkit.flops import count_flops
from jestkit.selection import JointSelector, ModelEmbeddings


def embeddings(n: int, d: int, seed: int, noise: float) -> ModelEmbeddings:
    g = torch.Generator().manual_seed(seed)
    image = F.normalize(torch.randn(n, d, generator=g), dim=1)
    text = F.normalize(image + noise * torch.randn(n, d, generator=g), dim=1)
    return ModelEmbeddings(image, text, 10.0, -10.0)


def timed(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="*", default=[128, 256, 320, 512, 640, 1024])
    p.add_argument("--dims", type=int, nargs="*", default=[32, 256])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="N in {128, 640}, d = 32, 3 rounds")
    args = p.parse_args()
    for name in ("rounds", "calls"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(v < 1 for v in args.sizes + args.dims):
        p.error(f"--sizes and --dims must all be >= 1, got {args.sizes + args.dims}")
    if args.quick:
        args.sizes, args.dims, args.rounds, args.calls = [128, 640], [32], 3, 3
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread; learnability, f = 0.8, K = 16; "
          f"{args.rounds} rounds x {args.calls} calls, median of round means\n")
    print("| d | N | b | pair matrix ms | row blocks ms | blocks / matrix | pair matrix MFLOP "
          "| row blocks MFLOP | same indices | library's choice |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for d in args.dims:
        for n in args.sizes:
            learner, reference = embeddings(n, d, 1, 0.8), embeddings(n, d, 2, 0.4)
            matrix = JointSelector(filter_ratio=0.8)
            blocks = JointSelector(filter_ratio=0.8, max_block_elements=n * n - 1)

            def run(sel, learner=learner, reference=reference):
                return sel(learner, reference, generator=torch.Generator().manual_seed(0))

            with mock.patch.object(selection, "_DENSE_MAX_N", n):
                same = torch.equal(run(matrix), run(blocks))
                flops = {k: count_flops(lambda s=sel: run(s)) / 1e6
                         for k, sel in (("matrix", matrix), ("blocks", blocks))}
                times = {"matrix": [], "blocks": []}
                pair = [("matrix", matrix), ("blocks", blocks)]
                for r in range(args.rounds):  # alternate which path goes first
                    for name, sel in pair if r % 2 == 0 else pair[::-1]:
                        run(sel)  # warm
                        times[name].append(timed(lambda s=sel: run(s), args.calls))
            t_m, t_b = (statistics.median(times[k]) * 1e3 for k in ("matrix", "blocks"))
            choice = "pair matrix" if n <= selection._DENSE_MAX_N else "row blocks"
            print(f"| {d} | {n} | {matrix.sub_batch_size(n)} | {t_m:.2f} | {t_b:.2f} | "
                  f"{t_b / t_m:.2f} | {flops['matrix']:.1f} | {flops['blocks']:.1f} | "
                  f"{'yes' if same else 'no'} | {choice} |")


if __name__ == "__main__":
    main()
