"""Tests for jestkit.flops: measured FLOPs behave as the architecture says they must."""

from __future__ import annotations

import pytest
import torch

from jestkit.flops import (
    PHASES,
    FlopLedger,
    count_flops,
    measure_forward_flops,
    measure_image_forward_flops,
    measure_text_forward_flops,
    measure_train_step_flops,
)
from jestkit.models import DualEncoder, DualEncoderConfig

VOCAB = 50


@pytest.fixture(scope="module")
def model() -> DualEncoder:
    # Two blocks of four heads in both towers, so depth and heads are in what is counted.
    return DualEncoder(DualEncoderConfig(vocab_size=VOCAB, image_width=48, image_depth=2,
                                         image_heads=4, text_width=48, text_depth=2,
                                         text_heads=4, mlp_ratio=2), seed=0)


@pytest.fixture(scope="module")
def tiny() -> DualEncoder:
    # The accounting identities hold for any architecture; a small one keeps the tests fast.
    return DualEncoder(DualEncoderConfig(vocab_size=VOCAB, embed_dim=16, image_width=32,
                                         image_depth=1, image_heads=2, text_width=32,
                                         text_depth=1, text_heads=2))


def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    tokens = torch.randint(1, VOCAB, (n, 16), generator=g)
    tokens[:, 10:] = 0
    return torch.rand(n, 1, 32, 32, generator=g), tokens


def test_count_flops_of_a_matmul() -> None:
    a, b = torch.rand(3, 5), torch.rand(5, 7)
    assert count_flops(lambda: a @ b) == 2 * 3 * 5 * 7


def test_train_flops_scale_linearly_with_batch(model) -> None:
    small = measure_train_step_flops(model, *batch(4))
    large = measure_train_step_flops(model, *batch(8))
    # Everything is per-example except the N x N logits matrix, which is tiny here.
    assert 1.8 <= large / small <= 2.2


def test_coarse_patch_cuts_image_flops(model) -> None:
    images, _ = batch(8)
    fine = measure_image_forward_flops(model, images, 4)
    coarse = measure_image_forward_flops(model, images, 8)
    ratio = coarse / fine  # measured 0.216 for the reference preset
    # 4x fewer tokens: per-token layers cost 1/4, attention 1/16; the patch embedding costs
    # about half (the coarse patches are shrunk to the base size before the stored kernel).
    assert 1 / 16 < ratio < 0.4


def test_train_step_is_three_forwards(model) -> None:
    images, tokens = batch(8)
    ratio = measure_train_step_flops(model, images, tokens) / measure_forward_flops(
        model, images, tokens
    )
    # Measured 2.990 (reference preset, batch 8); why it is just under 3: see below. The N x N
    # logits grow quadratically and push it just over 3 at large batches (3.003 at 320).
    assert 2.9 <= ratio <= 3.0


def test_train_step_flops_exactly_accounted(tiny) -> None:
    cfg = tiny.config
    embed = tiny.image.patch_embed
    base, width, chans = cfg.patch_size, cfg.image_width, cfg.in_channels
    cases = [(4, 4), (4, 8), (2, 2), (3, 16)]
    assert [embed.uses_downsample(p) for _, p in cases] == [False, True, False, True]
    for n, p in cases:
        images, tokens = batch(n)
        train = measure_train_step_flops(tiny, images, tokens, p)
        fwd = measure_forward_flops(tiny, images, tokens, p)
        # Backward of a matmul costs two forwards (grads w.r.t. both inputs), so train = 3 x
        # forward, except: matmuls with no input that needs a gradient are not differentiated
        # at all (1x: shrinking coarse patches by P X P^T, whose inputs are pixels and a fixed
        # matrix), those with one such input once (2x: the patch embedding, no gradient w.r.t.
        # pixels; the PI-resize of the kernel, none w.r.t. its fixed matrix), and only the
        # train step forms the N x N logits u @ v.T (3x).
        grid = 32 // p
        logits = 2 * n * n * cfg.embed_dim
        if embed.uses_downsample(p):
            down = 2 * n * chans * (32 * grid * p * base + grid * base * p * grid * base)
            conv = 2 * n * grid**2 * width * chans * base * base
            assert train == 3 * fwd - 2 * down - conv + 3 * logits
        else:
            conv = 2 * n * grid**2 * width * chans * p * p
            resize = 0 if p == base else 2 * width * chans * base**2 * p * p
            assert train == 3 * fwd - conv - resize + 3 * logits


def test_forward_is_image_plus_text(model) -> None:
    images, tokens = batch(8)
    assert measure_forward_flops(model, images, tokens) == (
        measure_image_forward_flops(model, images) + measure_text_forward_flops(model, tokens)
    )


def test_measuring_train_flops_leaves_grads_alone(tiny) -> None:
    model = tiny
    images, tokens = batch(2)
    for p in model.parameters():
        p.grad = None
    measure_train_step_flops(model, images, tokens)
    assert all(p.grad is None for p in model.parameters())
    # Every parameter holds a gradient (as mid-accumulation in a training loop): measuring
    # must give each back as it was, the same tensor with the same values, not add into it.
    markers = {name: torch.full_like(p, 0.5) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = markers[name]
    measure_train_step_flops(model, images, tokens)
    for name, p in model.named_parameters():
        assert p.grad is markers[name], name
        assert torch.equal(p.grad, torch.full_like(p, 0.5)), name
        p.grad = None


def test_attention_is_counted(model) -> None:
    # FlopCounterMode has no formula for CPU flash attention; the model's explicit attention
    # matmuls must show up: text flops grow faster than linearly in sequence length.
    _, tokens = batch(4)
    short = measure_text_forward_flops(model, tokens[:, :8])
    full = measure_text_forward_flops(model, tokens)
    assert full > 2 * short


def test_ledger() -> None:
    ledger = FlopLedger()
    ledger.add("train", 100)
    ledger.add("learner_scoring", 20)
    ledger.add("reference_scoring", 5)
    ledger.add("selection", 3)
    ledger.add("reference_training", 1000)
    ledger.add("train", 1)
    assert ledger.total() == 129  # the selector's matmuls count; the reference's training not
    assert ledger.total(include_reference_training=True) == 1129
    assert ledger.as_dict() == {"train": 101, "learner_scoring": 20, "reference_scoring": 5,
                                "selection": 3, "reference_training": 1000}
    assert tuple(ledger.as_dict()) == PHASES
    with pytest.raises(ValueError, match=r"phase.*reference_training"):
        ledger.add("scoring", 1)
    for bad in (-1, True, 2.5):  # a bool or a float would silently corrupt the int sums
        with pytest.raises(ValueError, match="flops must be a non-negative int"):
            ledger.add("train", bad)
    assert ledger.train == 101


def test_measuring_a_frozen_model_is_refused() -> None:
    frozen = DualEncoder(DualEncoderConfig(vocab_size=VOCAB, image_width=16, image_depth=1,
                                           text_width=16, text_depth=1), seed=0)
    frozen.requires_grad_(False)
    images, tokens = batch(2)
    with pytest.raises(ValueError, match="no parameters with requires_grad=True"):
        measure_train_step_flops(frozen, images, tokens)
