"""torch's CPU softmax against `jestkit.models.attention_softmax` at the attention shapes of
the demo, forward and backward, one thread, in the same process.

    python benchmarks/softmax_paths.py          # ~10 s; prints a markdown table

The shapes are [batch, heads, queries, keys] of the 16-token learner the demo had when this
was measured (patch 8; `configs/demo-16-tokens.json`): the text tower's attention over a
320-caption super-batch (8 tokens), the coarse image tower's (4 tokens at patch 16), and the
training step's text (64 captions) and image (16 tokens: torch's kernel, above
SHORT_SOFTMAX_MAX). Today's default learner (patch 16) trains on 4 image tokens, one of the
short shapes measured here, and scores at one token.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from jestkit.models import SHORT_SOFTMAX_MAX, attention_softmax

SHAPES = [(320, 1, 8, 8), (320, 4, 8, 8), (320, 4, 4, 4), (64, 1, 8, 8), (64, 4, 16, 16)]


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
    print(f"torch {torch.__version__}, 1 thread; SHORT_SOFTMAX_MAX = {SHORT_SOFTMAX_MAX}\n")
    print("| shape [B, H, Lq, Lk] | forward: torch µs | ours µs | backward: torch µs | ours µs |")
    print("|---|---|---|---|---|")
    for shape in SHAPES:
        x = torch.randn(shape, generator=gen)
        g = torch.randn(shape, generator=gen)
        times = []
        for f in (lambda t: t.softmax(-1), attention_softmax):
            times.append(_median_us(lambda f=f, x=x: f(x)))
            xg = x.clone().requires_grad_()
            y = f(xg)
            times.append(_median_us(lambda y=y, xg=xg, g=g: torch.autograd.grad(
                y, xg, g, retain_graph=True)))
        print(f"| {list(shape)} | {times[0]:.0f} | {times[2]:.0f} | {times[1]:.0f} | "
              f"{times[3]:.0f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
