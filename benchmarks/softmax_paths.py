"""torch's CPU softmax against `jestkit.models.attention_softmax`'s own exp/sum path at the
demo's attention shapes and across the key lengths where one overtakes the other, forward and
backward, one thread, in the same process.

    python benchmarks/softmax_paths.py          # ~30 s; prints a markdown table

The first shapes are [batch, heads, queries, keys] of the 16-token learner the demo had when
this was first measured (patch 8; `configs/demo-16-tokens.json`): the text tower's attention
over a 320-caption super-batch (8 tokens), the coarse image tower's (4 tokens at patch 16), and
the training step's text (64 captions) and image (16 tokens). Today's default learner (patch
16) trains on 4 image tokens and scores at one. The sweep then times [320, 1, L, L] on both
sides of one vector register of float32 lanes (8 with AVX2, 16 with AVX-512), where torch's
kernel leaves its slow path: `SHORT_SOFTMAX_KEYS` (printed) is chosen from the machine's vector
unit so that exp/sum runs only on the key lengths where it measured faster. Both paths are
timed at every shape, whichever one the model takes ("used" says which).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from jestkit.models import SHORT_SOFTMAX_KEYS, _ShortSoftmax

SHAPES = [(320, 1, 8, 8), (320, 4, 8, 8), (320, 4, 4, 4), (64, 1, 8, 8), (64, 4, 16, 16)]
SWEEP = [(320, 1, keys, keys) for keys in (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 15, 16, 17, 24, 32)]


def _median_us(fn, repeats: int = 200, rounds: int = 5) -> float:
    for _ in range(10):
        fn()
    per_round = []
    for _ in range(rounds):
        t0 = time.thread_time()
        for _ in range(repeats):
            fn()
        per_round.append((time.thread_time() - t0) / repeats * 1e6)
    return statistics.median(per_round)


def main(argv: list[str] | None = None) -> int:
    # No options; the parser gives --help and refuses any argument instead of ignoring it.
    argparse.ArgumentParser(description=__doc__.split("\n\n")[0]).parse_args(argv)
    torch.set_num_threads(1)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}: SHORT_SOFTMAX_KEYS = "
          f"{list(SHORT_SOFTMAX_KEYS)}\n")
    print("| shape [B, H, Lq, Lk] | used | forward: torch µs | exp/sum µs | backward: torch µs "
          "| exp/sum µs | exp/sum ÷ torch, fwd + bwd |")
    print("|---|---|---|---|---|---|---|")
    for shape in SHAPES + SWEEP:
        x = torch.randn(shape, generator=gen)
        g = torch.randn(shape, generator=gen)
        times = []
        # exp/sum through its autograd.Function directly: timed whatever the threshold picks
        for f in (lambda t: t.softmax(-1), _ShortSoftmax.apply):
            times.append(_median_us(lambda f=f, x=x: f(x)))
            xg = x.clone().requires_grad_()
            y = f(xg)
            times.append(_median_us(lambda y=y, xg=xg, g=g: torch.autograd.grad(
                y, xg, g, retain_graph=True)))
        used = "exp/sum" if shape[-1] in SHORT_SOFTMAX_KEYS else "torch"
        ratio = (times[2] + times[3]) / (times[0] + times[1])
        print(f"| {list(shape)} | {used} | {times[0]:.0f} | {times[2]:.0f} | {times[1]:.0f} | "
              f"{times[3]:.0f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
