"""A short GPU check of jestkit (needs CUDA): the models and the selector on the device against
the CPU, and the selector's time and peak GPU memory at large N, where it must never hold an
N x N matrix. What a GPU machine lent for a few minutes can show; results:
`docs/benchmarks.md` ("On a GPU").

    python benchmarks/gpu_check.py                     # N = 4096 ... 262144 (~1 min on an H200)
    python benchmarks/gpu_check.py --sizes 4096 16384

Exits 0 if every check passes; 1 if a forward, a gradient or a selection differs from the
CPU's (by more than 1e-3; NaN counts as a difference), if the selector's peak memory reaches
one N x N float32 matrix, or on any error; 2 without CUDA.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time

import torch

from jestkit.data import load_digits_web
from jestkit.demo import DEMO_MAX_TEXT_LEN
from jestkit.models import DualEncoder, sigmoid_loss
from jestkit.selection import JointSelector, ModelEmbeddings
from jestkit.training import LearnerConfig, _split_sizes, encode_image_parts, model_config

TOLERANCE = 1e-3


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| (b moved to a's device); inf where either holds a NaN, which max() would
    otherwise drop."""
    d = float((a - b.to(a.device)).abs().max())
    return math.inf if math.isnan(d) else d


def agreement(dev: torch.device) -> float:
    """The demo's learner on the CPU and on `dev`: forwards at every patch size, one Flexi
    multi-resolution training step's gradients, and selections with a second model as the
    reference. Prints each; returns the largest difference (inf for a different selection)."""
    data = load_digits_web(0, max_len=DEMO_MAX_TEXT_LEN)
    cfg = model_config(LearnerConfig(), data.tokenizer.vocab_size)
    model, gpu = DualEncoder(cfg, seed=0), DualEncoder(cfg, seed=0).to(dev)
    images, tokens = data.pool.images[:320], data.pool.tokens[:320]
    worst = 0.0
    with torch.no_grad():
        for patch in (8, 16, 32, 4):
            a = model(images, tokens, patch)
            b = gpu(images.to(dev), tokens.to(dev), patch)
            for x, y in zip(a[:2], b[:2], strict=True):
                d = _diff(x, y)
                worst = max(worst, d)
                print(f"forward patch {patch}: max |cpu - cuda| = {d:.2e}", flush=True)
    for m, dv in ((model, torch.device("cpu")), (gpu, dev)):
        m.zero_grad()
        fine = cfg.patch_size  # the demo's Flexi step: half of 64 at twice the patch
        emb = encode_image_parts(m, images[:64].to(dv), _split_sizes(64, (fine, 2 * fine), 0.5))
        sigmoid_loss(emb, m.encode_text(tokens[:64].to(dv)), m.logit_scale,
                     m.logit_bias).backward()
    grad = max(_diff(p.grad, q.grad) / (float(p.grad.abs().max()) + 1e-12)
               for p, q in zip(model.parameters(), gpu.parameters(), strict=True))
    print(f"gradients, multires step: max relative |cpu - cuda| = {grad:.2e}", flush=True)
    # Learnability needs two different models: with one as both, every score is 0 and only
    # the sampling noise (the same CPU generator on both devices) would be compared.
    reference, reference_gpu = DualEncoder(cfg, seed=1), DualEncoder(cfg, seed=1).to(dev)
    with torch.no_grad():
        lc, rc = (ModelEmbeddings(*m(images, tokens)) for m in (model, reference))
        lg, rg = (ModelEmbeddings(*m(images.to(dev), tokens.to(dev)))
                  for m in (gpu, reference_gpu))
    same = sum(torch.equal(
        JointSelector(batch_size=64)(lc, rc, generator=torch.Generator().manual_seed(s)),
        JointSelector(batch_size=64)(lg, rg, generator=torch.Generator().manual_seed(s)).cpu())
        for s in range(5))
    print(f"learnability selection: the same on cpu and cuda in {same}/5 draws", flush=True)
    return max(worst, grad, 0.0 if same == 5 else math.inf)


def selection_table(dev: torch.device, sizes: list[int], dim: int = 64) -> bool:
    """JointSelector (learnability, f = 0.8, 16 chunks) on random unit embeddings of `dim`.
    Returns whether its peak memory stayed below one N x N float32 matrix at every N."""
    print("| N | d | f | joint selection, ms (median of 5; of 2 from N = 262,144) | peak GPU "
          "memory growth, MiB | N*N*4 bytes, MiB |\n|---|---|---|---|---|---|")
    below = True
    for n in sizes:
        g = torch.Generator(device=dev).manual_seed(n)
        image_l, text_l, image_r, text_r = (torch.nn.functional.normalize(
            torch.randn(n, dim, device=dev, generator=g), dim=1) for _ in range(4))
        lrn = ModelEmbeddings(image_l, text_l, 10.0, -10.0)
        ref = ModelEmbeddings(image_r, text_r, 10.0, -10.0)
        sel, gen = JointSelector(filter_ratio=0.8, n_chunks=16), torch.Generator().manual_seed(0)
        sel(lrn, ref, generator=gen)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        times = []
        for _ in range(5 if n < 262144 else 2):
            t0 = time.perf_counter()
            idx = sel(lrn, ref, generator=gen)
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
        assert idx.numel() == sel.sub_batch_size(n) and idx.unique().numel() == idx.numel()
        print(f"| {n:,} | {dim} | 0.8 | {statistics.median(times) * 1e3:.1f} | {peak:.0f} | "
              f"{n * n * 4 / 2**20:,.0f} |", flush=True)
        below = below and peak * 2**20 < n * n * 4
    return below


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536, 262144],
                   help="super-batch sizes N of the selection table")
    args = p.parse_args(argv)
    if min(args.sizes) < 78:  # f = 0.8 keeps round(N / 5), at least one per chunk (16)
        p.error(f"--sizes must all be >= 78, got {args.sizes}")
    if not torch.cuda.is_available():
        print("gpu_check.py: needs CUDA, and torch sees no CUDA device here", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 against float32
    torch.backends.cudnn.allow_tf32 = False
    dev = torch.device("cuda")
    print("torch", torch.__version__, torch.cuda.get_device_name(0), flush=True)
    worst = agreement(dev)
    below = selection_table(dev, args.sizes)
    return 0 if worst < TOLERANCE and below else 1


if __name__ == "__main__":
    sys.exit(main())
