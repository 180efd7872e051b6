"""FLOP measurement with torch's own counter, and a per-phase ledger.

JEST's compute claims (BRIEF 4, 7) are ratios of cumulative FLOPs, so they are measured, not
derived by hand: `torch.utils.flop_counter.FlopCounterMode` counts every matmul, convolution
and attention kernel that actually runs. It counts only those ops (elementwise work, norms,
softmax are free), which is the usual convention for transformer FLOPs. One caveat: it has
no formula for the CPU flash-attention kernel behind `F.scaled_dot_product_attention`, which
is why `jestkit.models` writes attention as explicit matmuls.

The count depends only on shapes (batch size, token length, patch size), never on values, so
a training loop can measure each (batch, patch) configuration once and reuse the number.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.flop_counter import FlopCounterMode

from jestkit.models import DualEncoder, sigmoid_loss

__all__ = [
    "PHASES",
    "FlopLedger",
    "count_flops",
    "measure_forward_flops",
    "measure_image_forward_flops",
    "measure_text_forward_flops",
    "measure_train_step_flops",
]

#: Ledger phases: learner training (fwd + bwd), learner scoring forward, reference scoring
#: forward (zero when its embeddings are cached), the selector's own matmuls (the pairwise
#: logits of the super-batch, as they run: ~N^2 d per model on the small-N pair-matrix path,
#: ~4 N b d per model on the block path), and the reference's own training.
PHASES = ("train", "learner_scoring", "reference_scoring", "selection", "reference_training")


def count_flops(fn: Callable[[], Any]) -> int:
    """Run `fn()` once under `FlopCounterMode` and return the total FLOPs it executed."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def measure_train_step_flops(
    model: DualEncoder, images: Tensor, tokens: Tensor, patch_size: int | None = None
) -> int:
    """FLOPs of one training step's forward + backward of `sigmoid_loss` (optimizer excluded).

    The model's `.grad` fields are saved and restored around the measured backward, so
    measuring never leaks gradients into a real step. (`torch.autograd.grad` would avoid
    touching them at all, but FlopCounterMode's module hooks reject it on leaf tensors.)
    """
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("model has no parameters with requires_grad=True; nothing to train")

    def step() -> None:
        with torch.enable_grad():
            sigmoid_loss(*model(images, tokens, patch_size)).backward()

    saved = [p.grad for p in params]
    try:
        for p in params:
            p.grad = None
        return count_flops(step)
    finally:
        for p, g in zip(params, saved, strict=True):
            p.grad = g


def measure_forward_flops(
    model: DualEncoder, images: Tensor, tokens: Tensor, patch_size: int | None = None
) -> int:
    """FLOPs of embedding both modalities without grad (what scoring a batch costs)."""
    return count_flops(lambda: _no_grad(lambda: model(images, tokens, patch_size)))


def measure_image_forward_flops(
    model: DualEncoder, images: Tensor, patch_size: int | None = None
) -> int:
    """FLOPs of `model.encode_image(images, patch_size)` without grad."""
    return count_flops(lambda: _no_grad(lambda: model.encode_image(images, patch_size)))


def measure_text_forward_flops(model: DualEncoder, tokens: Tensor) -> int:
    """FLOPs of `model.encode_text(tokens)` without grad."""
    return count_flops(lambda: _no_grad(lambda: model.encode_text(tokens)))


def _no_grad(fn: Callable[[], Any]) -> Any:
    with torch.no_grad():
        return fn()


@dataclass
class FlopLedger:
    """Cumulative FLOPs per phase (see `PHASES`)."""

    train: int = 0
    learner_scoring: int = 0
    reference_scoring: int = 0
    selection: int = 0
    reference_training: int = 0

    def add(self, phase: str, flops: int) -> None:
        """Add `flops` (a non-negative int) to `phase`."""
        if phase not in PHASES:
            raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
        if isinstance(flops, bool) or not isinstance(flops, int) or flops < 0:
            raise ValueError(f"flops must be a non-negative int, got {flops!r}")
        setattr(self, phase, getattr(self, phase) + flops)

    def total(self, include_reference_training: bool = False) -> int:
        """Training + all scoring + selection; the reference's own training only if asked
        (BRIEF 7 reports it beside the compute speed-up, not inside it)."""
        total = self.train + self.learner_scoring + self.reference_scoring + self.selection
        return total + self.reference_training if include_reference_training else total

    def as_dict(self) -> dict[str, int]:
        """{phase: flops} for every phase, in `PHASES` order."""
        return asdict(self)
