"""The sampler's shifted-image gather against a per-pixel gather, one thread, same process.

    python benchmarks/sampling_paths.py          # ~20 s; prints a markdown table

`SuperBatchSampler` draws a super-batch as rows of the pool's zero-padded images, each
shifted by its own (dy, dx). `jestkit.data._shifted_rows` reads every output line (one
image, channel and row: w consecutive pixels) as one window of the flattened padded array,
so a draw is one ``index_select`` of n*C*h windows. The per-pixel gather below (what the
sampler did before) builds an index of n*C*h*w positions and gathers element by element.
Both give the same images (checked here, and in tests/test_data.py against slicing).

Each timed draw follows a 16 MB write, so the padded pool (3,500 images of 36x36, 18 MB)
is read from memory as in a training step, not from a warm cache; the two paths alternate.
Batch sizes: b = 64 (uniform's step) and the demo's super-batches at f = 0.5, 0.8, 0.9.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from jestkit.data import MAX_SHIFT, _shifted_rows, _zero_pad, load_digits_web

BATCHES = (64, 128, 320, 640)


def per_pixel_gather(padded: torch.Tensor, rows: torch.Tensor, m: int,
                     generator: torch.Generator) -> torch.Tensor:
    """The same draw as `_shifted_rows` (same shifts from the same generator), as a gather of
    one position per output pixel: the sampler's code before (positions in int32 while the
    padded array has fewer than 2**31 elements, as it did)."""
    n, (chans, hp, wp) = len(rows), padded.shape[1:]
    h, w = hp - 2 * m, wp - 2 * m
    shifts = torch.randint(-m, m + 1, (2, n), generator=generator)
    dtype = torch.int32 if padded.numel() <= 2**31 - 1 else torch.int64
    dy, dx = shifts.to(dtype)
    arange = torch.arange(max(h, w, chans), dtype=dtype)
    grid = (arange[:h, None] + m) * wp + arange[None, :w] + m  # [h, w] positions in a plane
    offsets = arange[:chans, None] * (hp * wp) + grid.reshape(1, h * w)  # [C, h*w]
    base = rows.to(dtype) * (chans * hp * wp) - (dy * wp + dx)  # [n]
    index = (base[:, None, None] + offsets).reshape(-1)
    return padded.reshape(-1).index_select(0, index).reshape(n, chans, h, w)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=300, help="draws per path and size")
    repeats = parser.parse_args(argv).repeats
    if repeats < 1:
        parser.error(f"--repeats must be >= 1, got {repeats}")
    torch.set_num_threads(1)
    pool = load_digits_web(0).pool
    padded = _zero_pad(pool.images, MAX_SHIFT)
    flush = torch.empty(16 * 2**20 // 4)
    gen = torch.Generator().manual_seed(0)
    print(f"torch {torch.__version__}, 1 thread; pool {tuple(pool.images.shape)}, "
          f"max shift {MAX_SHIFT}, {repeats} draws per path and size\n")
    print("| images drawn | per-pixel gather µs | window gather (the sampler's) µs | ratio |")
    print("|---|---|---|---|")
    paths = {"per_pixel": per_pixel_gather, "window": _shifted_rows}
    for n in BATCHES:
        times: dict[str, list[float]] = {name: [] for name in paths}
        for r in range(repeats):
            rows = torch.randperm(len(pool), generator=gen)[:n]
            seed = int(torch.randint(2**31, (1,), generator=gen))
            out = {}
            order = list(paths) if r % 2 else list(paths)[::-1]
            for name in order:
                flush.fill_(r)
                g = torch.Generator().manual_seed(seed)
                t0 = time.thread_time()
                out[name] = paths[name](padded, rows, MAX_SHIFT, g)
                times[name].append((time.thread_time() - t0) * 1e6)
            if not torch.equal(out["per_pixel"], out["window"]):
                print(f"the two paths differ at n = {n}", file=sys.stderr)
                return 1
        slow, fast = (statistics.median(times[k]) for k in ("per_pixel", "window"))
        print(f"| {n} | {slow:.0f} | {fast:.0f} | {slow / fast:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
