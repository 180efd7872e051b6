"""Tests for jestkit.models: FlexiViT PI-resize, the dual encoder, the SigLIP loss, checkpoints."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, replace

import numpy as np
import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from jestkit import models
from jestkit.models import (
    DualEncoder,
    DualEncoderConfig,
    FlexiPatchEmbed,
    bilinear_resize_matrix,
    load_model,
    model_fingerprint,
    pi_downsample_matrix,
    pi_resize_matrix,
    resize_pos_embed,
    save_model,
    sigmoid_loss,
)
from jestkit.training import LearnerConfig, ReferenceConfig, model_config, small_model

VOCAB = 50


def tiny_config(**overrides) -> DualEncoderConfig:
    base = dict(vocab_size=VOCAB, embed_dim=16, image_width=32, image_depth=1, image_heads=2,
                text_width=32, text_depth=1, text_heads=2)
    return DualEncoderConfig(**{**base, **overrides})


def batch(n: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(n, 1, 32, 32, generator=g)
    tokens = torch.randint(1, VOCAB, (n, 12), generator=g)
    lengths = torch.randint(1, 13, (n,), generator=g)
    tokens[torch.arange(12)[None, :] >= lengths[:, None]] = 0  # right padding
    return images, tokens


def upsample_patchwise(images: torch.Tensor, patch: int, k: int) -> torch.Tensor:
    """Bilinearly upsample every patch x patch tile by k on its own (align_corners=False).

    This is the resize B that PI-resize inverts. A whole-image F.interpolate is NOT the same
    thing: near tile borders it mixes in pixels of the neighbouring tile, which no per-patch
    kernel can reproduce (see test_whole_image_interpolation_does_not_reproduce_tokens).
    """
    b, c, h, w = images.shape
    tiles = images.reshape(b, c, h // patch, patch, w // patch, patch).permute(0, 2, 4, 1, 3, 5)
    up = F.interpolate(tiles.reshape(-1, c, patch, patch), scale_factor=k, mode="bilinear",
                       align_corners=False)
    up = up.reshape(b, h // patch, w // patch, c, patch * k, patch * k).permute(0, 3, 1, 4, 2, 5)
    return up.reshape(b, c, h * k, w * k)


# ---------------------------------------------------------------------------------- FlexiViT


@pytest.mark.parametrize("k", [2, 4])
def test_pi_resize_upsampled_image_reproduces_tokens(k: int) -> None:
    model = DualEncoder(tiny_config(), seed=1)
    embed = model.image.patch_embed
    images, _ = batch()
    base_tokens = embed(images, 4)  # [B, 64, width]
    up = upsample_patchwise(images, 4, k)  # [B, 1, 32k, 32k]
    flexi_tokens = embed(up, 4 * k)  # the same 8 x 8 grid at patch 4k
    assert flexi_tokens.shape == base_tokens.shape == (6, 64, 32)
    torch.testing.assert_close(flexi_tokens, base_tokens, atol=1e-4, rtol=0)


def test_pi_resize_identity_on_every_patch_when_growing() -> None:
    # <B x, pinv(B^T) w> = <x, w> for all x iff B^T pinv(B^T) = I: check the matrix itself.
    for old, new in [(4, 8), (4, 16), (2, 4), (4, 6)]:
        b, m = bilinear_resize_matrix(old, new), pi_resize_matrix(old, new)
        torch.testing.assert_close(b.T @ m.T, torch.eye(old * old, dtype=torch.float64),
                                   atol=1e-10, rtol=0)


def test_pi_resize_is_separable() -> None:
    # pinv(B1 (x) B1) = pinv(B1) (x) pinv(B1): the 2-D PI-resize is the 1-D one on rows and
    # columns, which is what lets a coarse patch be shrunk before the stored kernel.
    for old, new in [(4, 8), (8, 16), (8, 32), (4, 6), (2, 32)]:
        down = pi_downsample_matrix(old, new)
        assert down.shape == (old, new)
        torch.testing.assert_close(torch.kron(down, down), pi_resize_matrix(old, new),
                                   atol=1e-10, rtol=0)
    with pytest.raises(ValueError, match="growing"):
        pi_downsample_matrix(8, 4)


@pytest.mark.parametrize("channels, width, base", [(1, 48, 8), (3, 32, 4), (2, 6, 4)])
def test_coarse_tokens_and_gradients_equal_the_resized_kernel(channels, width, base) -> None:
    # Slow, obvious version: the PI-resized kernel as a stride-p convolution. `forward` must
    # give the same tokens and the same gradients at every coarse patch size, whichever path
    # `uses_downsample` picks (width 6 is one where the resized kernel is cheaper).
    g = torch.Generator().manual_seed(0)
    embed = FlexiPatchEmbed(channels, width, base, 32).double()
    with torch.no_grad():
        for param in (embed.weight, embed.bias):
            param.copy_(torch.randn(param.shape, generator=g, dtype=torch.float64))
    images = torch.rand(5, channels, 32, 32, generator=g, dtype=torch.float64)
    paths = set()
    for p in [q for q in embed.allowed_patch_sizes if q > base]:
        paths.add(embed.uses_downsample(p))
        want = F.conv2d(images, embed.kernel(p), embed.bias, stride=p).flatten(2).transpose(1, 2)
        (gw_want, gb_want) = torch.autograd.grad(want.square().sum(), (embed.weight, embed.bias))
        got = embed(images, p)
        (gw, gb) = torch.autograd.grad(got.square().sum(), (embed.weight, embed.bias))
        torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(gw, gw_want, atol=1e-8, rtol=1e-10)
        torch.testing.assert_close(gb, gb_want, atol=1e-8, rtol=1e-10)
    assert paths == ({False, True} if width == 6 else {True})


def test_whole_image_interpolation_does_not_reproduce_tokens() -> None:
    # Documents why the property test resizes tile by tile: whole-image bilinear/nearest
    # upsampling changes border pixels of every tile, and the tokens move by O(0.1).
    model = DualEncoder(tiny_config(), seed=1)
    images, _ = batch()
    base_tokens = model.image.patch_embed(images, 4)
    up = F.interpolate(images, scale_factor=2, mode="bilinear", align_corners=False)
    assert (model.image.patch_embed(up, 8) - base_tokens).abs().max() > 1e-2


def test_coarser_and_finer_patch_sizes_run() -> None:
    model = DualEncoder(tiny_config())
    images, _ = batch()
    for p in (1, 2, 4, 8, 16, 32):
        tokens = model.image.patch_embed(images, p)
        assert tokens.shape == (6, (32 // p) ** 2, 32)
        emb = model.encode_image(images, p)
        assert emb.shape == (6, 16) and torch.isfinite(emb).all()


def test_resize_matrices_are_cached() -> None:
    assert pi_resize_matrix(4, 8) is pi_resize_matrix(4, 8)
    embed = FlexiPatchEmbed(1, 8, 4, 32)
    embed.kernel(8)
    assert (8, embed.weight.device, embed.weight.dtype) in embed._resize_cache
    assert embed.kernel(4) is embed.weight  # base size: no resize at all


def test_coarse_patch_gradient_reaches_base_kernel_and_pos_embed() -> None:
    model = DualEncoder(tiny_config())
    images, tokens = batch()
    sigmoid_loss(*model(images, tokens, patch_size=8)).backward()
    assert model.image.patch_embed.weight.grad.abs().sum() > 0
    assert model.image.pos_embed.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
# patch 2 and (16, width 16): the resized-kernel path; (16, width 48): the downsample path
@pytest.mark.parametrize("patch, width", [(2, 32), (16, 16), (16, 48)])
def test_first_use_under_inference_mode_does_not_break_training(dtype, patch, width):
    """Found in review: resize matrices first built under torch.inference_mode (evaluation,
    scoring) were cached as inference tensors, and every later backward at that patch size
    failed; in float64 the shared lru_cache was poisoned for models built afterwards too."""
    for build in (bilinear_resize_matrix, pi_resize_matrix, pi_downsample_matrix):
        build.cache_clear()
    config = tiny_config(image_width=width)
    model = DualEncoder(config, seed=0).to(dtype)
    images, tokens = batch()
    images = images.to(dtype)
    with torch.inference_mode():
        model(images, tokens, patch)
    for m in (model, DualEncoder(config, seed=1).to(dtype)):
        x = images.clone().requires_grad_()  # the downsample path's matmuls save the images
        sigmoid_loss(*m(x, tokens, patch)).backward()
        assert m.image.patch_embed.weight.grad.abs().sum() > 0 and x.grad is not None


@pytest.mark.parametrize("bad", [3, 5, 0, -4, 64, 4.0, True, "4"])
def test_invalid_patch_size_raises(bad) -> None:
    model = DualEncoder(tiny_config())
    images, tokens = batch(2)
    with pytest.raises(ValueError, match=r"patch_size.*\(1, 2, 4, 8, 16, 32\)"):
        model.encode_image(images, bad)
    with pytest.raises(ValueError, match="patch_size"):
        model(images, tokens, bad)


# ----------------------------------------------------------------------------- dual encoder


def multi_head_config(vocab_size: int) -> DualEncoderConfig:
    """Two blocks of four heads in both towers: more than the demo's models exercise."""
    return DualEncoderConfig(vocab_size=vocab_size, image_width=48, image_depth=2,
                             image_heads=4, text_width=48, text_depth=2, text_heads=4,
                             mlp_ratio=2)


def deep_config(vocab_size: int) -> DualEncoderConfig:
    """Three blocks of four heads, width 64."""
    return DualEncoderConfig(vocab_size=vocab_size, image_width=64, image_depth=3,
                             image_heads=4, text_width=64, text_depth=3, text_heads=4,
                             mlp_ratio=2)


@pytest.mark.parametrize("make", [multi_head_config, deep_config])
def test_shapes_normalisation_and_logit_init(make) -> None:
    model = DualEncoder(make(VOCAB))
    images, tokens = batch()
    image_emb, text_emb, scale, bias = model(images, tokens)
    dim = model.config.embed_dim
    assert image_emb.shape == text_emb.shape == (6, dim)
    torch.testing.assert_close(image_emb.norm(dim=-1), torch.ones(6))
    torch.testing.assert_close(text_emb.norm(dim=-1), torch.ones(6))
    assert scale.shape == bias.shape == ()
    assert scale.item() == pytest.approx(10.0) and model.logit_scale.item() == pytest.approx(10.0)
    assert bias.item() == -10.0
    assert model.logit_scale_log.item() == pytest.approx(math.log(10.0))
    assert scale.requires_grad and bias.requires_grad  # learned, not hard-coded


def test_default_reference_is_smaller_than_default_learner() -> None:
    """Issue 3: "by default the reference is the smaller one" (the configs training uses)."""
    ref, lrn = ReferenceConfig(), LearnerConfig()

    def size(cfg) -> int:
        model = DualEncoder(model_config(cfg, VOCAB))  # what training builds
        return sum(p.numel() for p in model.parameters())

    assert size(ref) < size(lrn)
    assert (ref.width, ref.depth) <= (lrn.width, lrn.depth)


def test_text_padding_is_masked() -> None:
    model = DualEncoder(tiny_config())
    _, tokens = batch()
    emb = model.encode_text(tokens)
    padded = F.pad(tokens, (0, 4))  # four more padding columns change nothing
    torch.testing.assert_close(model.encode_text(padded), emb, atol=1e-5, rtol=0)
    changed = tokens.clone()
    changed[tokens == 0] = 7  # ... but real tokens there do
    assert not torch.allclose(model.encode_text(changed), emb, atol=1e-3)
    all_pad = torch.zeros(2, 5, dtype=torch.long)
    assert torch.isfinite(model.encode_text(all_pad)).all()


@pytest.mark.parametrize("keys", [1, 2, 4, 8, 15, 16, 20])
def test_attention_softmax_equals_torch_softmax_values_and_gradients(keys: int,
                                                                     monkeypatch) -> None:
    # Both sides of AVX-512's SHORT_SOFTMAX_KEYS (1-15; set here, so that the same key axes
    # take the same paths on every machine), with masked keys (-inf) as the text tower makes them
    # (at least one unmasked key per row), including one row with a single unmasked key.
    monkeypatch.setattr(models, "SHORT_SOFTMAX_KEYS", range(1, 16))
    g = torch.Generator().manual_seed(keys)
    scores = torch.randn(5, 3, 7, keys, generator=g, dtype=torch.float64) * 4
    if keys > 1:
        masked = torch.rand(5, 1, 1, keys, generator=g) < 0.3
        masked[..., 0] = False
        masked[0, ..., 1:] = True
        scores = scores.masked_fill(masked, float("-inf"))
    grad_out = torch.randn(scores.shape, generator=g, dtype=torch.float64)
    ours_in = scores.clone().requires_grad_()
    torch_in = scores.clone().requires_grad_()
    ours, expected = models.attention_softmax(ours_in), torch_in.softmax(dim=-1)
    torch.testing.assert_close(ours, expected, atol=1e-12, rtol=0)
    ours.backward(grad_out)
    expected.backward(grad_out)
    torch.testing.assert_close(ours_in.grad, torch_in.grad, atol=1e-12, rtol=0)
    if keys > 1:
        assert (ours_in.grad[masked.expand_as(scores)] == 0).all()
    # float32, the dtype models run in: equal to rounding.
    x32 = scores.float()
    torch.testing.assert_close(models.attention_softmax(x32), x32.softmax(-1), atol=1e-6,
                               rtol=0)


def test_attention_softmax_gradcheck_and_double_backward(monkeypatch) -> None:
    monkeypatch.setattr(models, "SHORT_SOFTMAX_KEYS", range(1, 16))  # our path on every machine
    # Double backward too (a gradient penalty through attention), against torch's softmax.
    x = torch.randn(2, 2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(models.attention_softmax, (x,))
    assert torch.autograd.gradgradcheck(models.attention_softmax, (x,))
    w = torch.randn(x.shape, dtype=torch.float64)
    grads = []
    for f in (models.attention_softmax, lambda t: t.softmax(-1)):
        (g,) = torch.autograd.grad((f(x) * w).sum(), x, create_graph=True)
        (gg,) = torch.autograd.grad(g.pow(2).sum(), x)
        grads.append(gg)
    torch.testing.assert_close(grads[0], grads[1], atol=1e-10, rtol=0)


def test_attention_softmax_works_under_torch_func_transforms(monkeypatch) -> None:
    monkeypatch.setattr(models, "SHORT_SOFTMAX_KEYS", range(1, 16))  # our path on every machine
    # vmap over stacked weights (benchmarks/batched_runs.py) failed on a 4-token image tower
    # once the short path was taken: an autograd.Function needs setup_context for functorch.
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    w = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    torch.testing.assert_close(torch.func.vmap(models.attention_softmax)(x), x.softmax(-1))

    def loss(f):
        return lambda xi, wi: (f(xi) * wi).sum()

    per_row = torch.func.vmap(torch.func.grad(loss(models.attention_softmax)))(x, w)
    expected = torch.func.vmap(torch.func.grad(loss(lambda t: t.softmax(-1))))(x, w)
    torch.testing.assert_close(per_row, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("keys, dtype, ours", [(15, torch.float32, True),
                                               (16, torch.float32, False),
                                               (7, torch.float32, True),
                                               (8, torch.float64, True),
                                               (8, torch.bfloat16, False),
                                               (0, torch.float32, False)])
def test_attention_softmax_takes_its_own_path_only_where_meant(keys, dtype, ours,
                                                               monkeypatch) -> None:
    # Short float32/float64 key axes only: half precision keeps torch's float32 accumulation,
    # and an empty axis gives torch's empty result, not an error. With AVX-512's key lengths
    # (1-15), whatever this machine's are; they are read at call time.
    monkeypatch.setattr(models, "SHORT_SOFTMAX_KEYS", range(1, 16))
    x = torch.randn(3, 4, keys, dtype=dtype, requires_grad=True)
    y = models.attention_softmax(x)
    assert ("ShortSoftmax" in type(y.grad_fn).__name__) == ours
    torch.testing.assert_close(y, x.softmax(-1))


@pytest.mark.parametrize("capability, keys", [("AVX512", range(1, 16)), ("AVX2", range(4, 8)),
                                              ("DEFAULT", range(0)), ("SVE256", range(0)),
                                              ("Z VECTOR", range(0)), ("NO AVX", range(0)),
                                              ("", range(0))])
def test_short_softmax_key_lengths_follow_the_vector_unit(capability, keys,
                                                          monkeypatch) -> None:
    # exp/sum below one register of float32 lanes (16 with AVX-512, 8 with AVX2), where it
    # measured faster than torch's kernel; where nothing was measured, torch's kernel always.
    assert models.short_softmax_keys(capability) == keys
    assert models.SHORT_SOFTMAX_KEYS == models.short_softmax_keys(
        torch.backends.cpu.get_cpu_capability())
    monkeypatch.setattr(models, "SHORT_SOFTMAX_KEYS", keys)
    for n_keys in (1, 3, 4, 7, 8, 15, 16):
        x = torch.randn(2, 3, n_keys, requires_grad=True)
        y = models.attention_softmax(x)
        assert ("ShortSoftmax" in type(y.grad_fn).__name__) == (n_keys in keys), n_keys
        torch.testing.assert_close(y, x.softmax(-1))


def test_attention_softmax_subtracts_the_row_max() -> None:
    # Scores far beyond exp's float32 range (~88) must not overflow to inf / NaN.
    x = torch.tensor([[1000.0, 0.0, -1000.0], [88.0, 89.0, 90.0], [-200.0, -201.0, -1e4]])
    torch.testing.assert_close(models.attention_softmax(x), x.softmax(-1))


def test_attention_softmax_off_cpu_keeps_torch_kernel_and_blocks_use_it(monkeypatch) -> None:
    x = torch.randn(2, 3, 8, device="meta", requires_grad=True)
    assert "ShortSoftmax" not in type(models.attention_softmax(x).grad_fn).__name__
    seen = []
    real = models.attention_softmax
    monkeypatch.setattr(models, "attention_softmax", lambda s: seen.append(s.shape) or real(s))
    DualEncoder(tiny_config()).encode_text(torch.ones(2, 5, dtype=torch.long))
    assert seen == [(2, 2, 5, 5)]  # the text block's attention: [B, heads, L, L]


def test_text_heads_change_the_computation_not_the_parameters() -> None:
    one, four = DualEncoder(tiny_config(text_heads=1)), DualEncoder(tiny_config(text_heads=4))
    assert {k: v.shape for k, v in one.state_dict().items()} == {
        k: v.shape for k, v in four.state_dict().items()}
    four.load_state_dict(one.state_dict())
    _, tokens = batch()
    assert not torch.allclose(one.encode_text(tokens), four.encode_text(tokens), atol=1e-4)


def test_bad_inputs_raise() -> None:
    model = DualEncoder(tiny_config())
    images, tokens = batch(2)
    with pytest.raises(ValueError, match="token length"):
        model.encode_text(torch.ones(2, 17, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_size"):
        model.encode_text(torch.full((2, 3), VOCAB))
    with pytest.raises(ValueError, match="tokens"):
        model.encode_text(tokens.float())
    with pytest.raises(ValueError, match="images"):
        model.encode_image(torch.rand(2, 3, 32, 32))


def test_every_parameter_gets_a_gradient() -> None:
    model = DualEncoder(tiny_config())
    images, tokens = batch(8)
    sigmoid_loss(*model(images, tokens)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_a_few_steps_reduce_the_loss() -> None:
    # Cheap smoke test: the first steps mostly fit the bias; on this fixed batch the model
    # goes on to memorise it (loss ~0.3 after 150 Adam steps), too slow to test here.
    model = DualEncoder(tiny_config())
    images, tokens = batch(8)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        loss = sigmoid_loss(*model(images, tokens))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]


# --------------------------------------------------------------------------- config checks


@pytest.mark.parametrize("field", ["vocab_size", "embed_dim", "image_width", "image_depth",
                                   "image_heads", "patch_size", "image_size", "in_channels",
                                   "text_width", "text_depth", "text_heads", "max_text_len"])
def test_config_rejects_non_positive_sizes(field: str) -> None:
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match=field):
            tiny_config(**{field: bad})


@pytest.mark.parametrize("config", [
    tiny_config(),
    small_model(100, 48, 1),
    small_model(100, 16, 2, patch_size=4, text_width=8, text_heads=2),
    DualEncoderConfig(vocab_size=11, embed_dim=5, image_width=12, image_depth=3, image_heads=3,
                      patch_size=2, image_size=8, in_channels=3, text_width=6, text_depth=2,
                      text_heads=2, max_text_len=5, mlp_ratio=3),
])
def test_parameter_count_is_what_the_model_holds(config) -> None:
    assert models.parameter_count(config) == sum(p.numel() for p in
                                                 DualEncoder(config).parameters())


def test_a_model_larger_than_memory_is_refused_before_allocating(monkeypatch, tmp_path) -> None:
    # width 2**16 once ended in torch's allocator ("can't allocate memory: you tried to
    # allocate 51539607552 bytes"), naming no size. Now the sizes, the need and the memory.
    # (2**20: terabytes, more than any machine has, so nothing is ever allocated.)
    with pytest.raises(ValueError, match=r"DualEncoder: vocab_size=50, .*image_width=1048576, "
                                         r"image_depth=1, .* parameters; its float32 weights "
                                         r"need [\d.,]+ GiB, more than this machine's"):
        DualEncoder(tiny_config(image_width=2**20, image_heads=1))
    # A size from the vocabulary is named too (the message lists every size field).
    with pytest.raises(ValueError, match=r"vocab_size=100000000000, "):
        DualEncoder(tiny_config(vocab_size=10**11))
    n = models.parameter_count(tiny_config())
    monkeypatch.setattr(models, "memory_bytes", lambda: 4 * n - 1)
    with pytest.raises(ValueError, match="more than this machine's"):
        DualEncoder(tiny_config())
    with pytest.raises(ValueError, match=r"training it \(float32 weights, gradients"):
        models.check_fits_in_memory(tiny_config(), 4, "what")
    monkeypatch.setattr(models, "memory_bytes", lambda: 4 * n)  # just fits
    model = DualEncoder(tiny_config())
    monkeypatch.setattr(models, "memory_bytes", lambda: None)  # the OS does not say
    DualEncoder(tiny_config())
    # A checkpoint too large to build is refused by name, before its tensors are read.
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    monkeypatch.setattr(models, "memory_bytes", lambda: 4 * n - 1)
    monkeypatch.setattr(safetensors.torch, "load_file", lambda *a, **k: pytest.fail("read"))
    with pytest.raises(ValueError, match=rf"{path}: vocab_size=50, "):
        load_model(path)


def test_memory_is_what_the_os_says_or_unknown(monkeypatch) -> None:
    total = models.memory_bytes()
    assert total is None or total > 2**20
    # Memory and swap (allocations can reach both), whatever other lines say.
    meminfo = "MemTotal:   1000 kB\nHugepagesize: \nSwapTotal:  24 kB\nMemFree: 7 kB\n"
    monkeypatch.setattr(models.Path, "read_text", lambda self: meminfo)
    assert models.memory_bytes() == 1024 * 1024
    # /proc/meminfo unreadable: the page counts; a count the OS cannot tell (-1): unknown,
    # not a negative total that would refuse every model.
    monkeypatch.setattr(models.Path, "read_text", lambda self: "")
    monkeypatch.setattr(models.os, "sysconf", lambda name: -1 if name == "SC_PHYS_PAGES"
                        else 4096)
    assert models.memory_bytes() is None
    monkeypatch.setattr(models.os, "sysconf", lambda name: 1000 if name == "SC_PHYS_PAGES"
                        else 4096)
    assert models.memory_bytes() == 4096 * 1000


def test_config_divisibility_and_round_trip() -> None:
    with pytest.raises(ValueError, match="patch_size"):
        tiny_config(patch_size=5)
    with pytest.raises(ValueError, match="image_width"):
        tiny_config(image_width=30, image_heads=4)
    with pytest.raises(ValueError, match="text_width"):
        tiny_config(text_width=30, text_heads=4)
    with pytest.raises(ValueError, match="init_logit_scale"):
        tiny_config(init_logit_scale=float("nan"))
    cfg = deep_config(VOCAB)
    assert DualEncoderConfig.from_dict(asdict(cfg)) == cfg
    with pytest.raises(ValueError, match="unknown"):
        DualEncoderConfig.from_dict({**asdict(cfg), "dropout": 0.1})
    assert cfg.allowed_patch_sizes == (1, 2, 4, 8, 16, 32)


# ------------------------------------------------------------------------------ determinism


def states_equal(a: DualEncoder, b: DualEncoder) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_construction_is_deterministic_and_leaves_global_rng_alone() -> None:
    cfg = tiny_config()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        before = torch.random.get_rng_state()
        a = DualEncoder(cfg, seed=7)
        assert torch.equal(torch.random.get_rng_state(), before)
        torch.manual_seed(999)  # a different global state must not matter
        b = DualEncoder(cfg, seed=7)
    assert states_equal(a, b)
    assert not states_equal(a, DualEncoder(cfg, seed=8))
    assert states_equal(a, DualEncoder(cfg, generator=torch.Generator().manual_seed(7)))


# ------------------------------------------------------------------------------ checkpoints


@pytest.mark.parametrize("grid, new_grid", [(4, 2), (4, 1), (4, 8), (4, 16), (2, 32),
                                            (4, 4)])
def test_resize_pos_embed_keeps_the_grid_oriented(grid, new_grid) -> None:
    # Each token's embedding is its own (row, column) centre in [0, 1]. Resized, channel 0
    # must still vary down the rows only and channel 1 across the columns only, both
    # increasing: a transposed or flipped grid fails (found in review: a transposing permute
    # passed every test). Growing, bilinear resizing of these linear functions is exact,
    # held at the edge values beyond the outer centres.
    centers = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid
    pos = torch.stack(torch.meshgrid(centers, centers, indexing="ij"), dim=-1)
    out = resize_pos_embed(pos.reshape(1, grid * grid, 2), new_grid)
    assert out.shape == (1, new_grid * new_grid, 2)
    if new_grid == grid:
        assert torch.equal(out, pos.reshape(1, grid * grid, 2))
        return
    rows, cols = out.reshape(new_grid, new_grid, 2).unbind(-1)
    torch.testing.assert_close(rows, rows[:, :1].expand_as(rows), atol=1e-9, rtol=0)
    torch.testing.assert_close(cols, cols[:1, :].expand_as(cols), atol=1e-9, rtol=0)
    torch.testing.assert_close(rows, cols.T, atol=1e-9, rtol=0)
    if new_grid > 1:  # increasing down the rows (held flat at the edges when growing)
        assert (rows[1:, 0] >= rows[:-1, 0]).all() and rows[-1, 0] > rows[0, 0]
    if new_grid > grid:
        new_centers = (torch.arange(new_grid, dtype=torch.float64) + 0.5) / new_grid
        want = new_centers.clamp(0.5 / grid, 1 - 0.5 / grid)
        torch.testing.assert_close(rows[:, 0], want, atol=1e-9, rtol=0)


def test_save_load_round_trip(tmp_path) -> None:
    model = DualEncoder(tiny_config(), seed=3)
    with torch.no_grad():
        model.logit_bias.fill_(-7.5)  # a trained value, not the init, must come back
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    assert os.listdir(tmp_path) == ["model.safetensors"]  # no temp file left behind
    loaded = load_model(path)
    assert loaded.config == model.config
    assert model_fingerprint(loaded) == model_fingerprint(model)
    images, tokens = batch()
    with torch.no_grad():
        for x, y in zip(model(images, tokens, 8), loaded(images, tokens, 8), strict=True):
            assert torch.equal(x, y)
    save_model(loaded, path)  # overwriting works, still no stray files
    assert os.listdir(tmp_path) == ["model.safetensors"]
    # A half-precision model comes back in its own precision, with the same fingerprint
    # (a cache made with it must still match).
    half = DualEncoder(tiny_config(), seed=3).to(torch.bfloat16)
    save_model(half, path)
    back = load_model(path)
    assert next(back.parameters()).dtype == torch.bfloat16
    assert model_fingerprint(back) == model_fingerprint(half)


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch) -> None:
    path = tmp_path / "model.safetensors"
    old = DualEncoder(tiny_config(), seed=1)
    save_model(old, path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(models.os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        save_model(DualEncoder(tiny_config(), seed=2), path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["model.safetensors"]
    assert model_fingerprint(load_model(path)) == model_fingerprint(old)


def test_a_weight_altered_on_disk_is_refused_and_old_files_still_load(tmp_path) -> None:
    # Found in review: safetensors has no checksum, so a flipped bit in the tensor data
    # loaded silently as another model. The fingerprint is saved with the tensors.
    model = DualEncoder(tiny_config(), seed=3)
    path = tmp_path / "model.safetensors"
    save_model(model, path)
    raw = bytearray(path.read_bytes())
    header = 8 + int.from_bytes(raw[:8], "little")  # safetensors: u64 header size, header
    assert safetensors.torch.load(bytes(raw)).keys() == model.state_dict().keys()
    raw[header + (len(raw) - header) // 2] ^= 0x04  # one bit of one weight
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="model.safetensors: its tensors do not match the "
                                         "fingerprint saved with them"):
        load_model(path)
    # A file written before the fingerprint was saved loads as it did.
    old = tmp_path / "old.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(old), metadata={"format": "jestkit.dual_encoder.v1",
                                                    "config": model.config.to_json()})
    assert model_fingerprint(load_model(old)) == model_fingerprint(model)


def test_load_rejects_foreign_safetensors(tmp_path) -> None:
    path = tmp_path / "other.safetensors"
    safetensors.torch.save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="checkpoint"):
        load_model(path)
    not_safetensors = tmp_path / "notes.txt"
    not_safetensors.write_text("not a model")
    with pytest.raises(ValueError, match="notes.txt is not a safetensors file"):
        load_model(not_safetensors)
    with pytest.raises(FileNotFoundError, match="no model checkpoint"):
        load_model(tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match=r"no model checkpoint at .* \(a directory: give "
                                                r"the .safetensors file in it\)"):
        load_model(tmp_path)


@pytest.mark.parametrize("config", ["[]", "{\"nope\": 1}", "{not json"])
def test_load_names_a_damaged_config_in_the_metadata(tmp_path, config) -> None:
    # Found in review: a TypeError ("argument after ** must be a mapping") or a
    # JSONDecodeError naming no file, past the CLI's handlers.
    model = DualEncoder(tiny_config(), seed=0)
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                                str(path), metadata={"format": "jestkit.dual_encoder.v1",
                                                     "config": config})
    with pytest.raises(ValueError, match=r"model.safetensors: the model config in its metadata "
                                         r"is damaged"):
        load_model(path)


def test_fingerprint_tracks_weights_and_config() -> None:
    model = DualEncoder(tiny_config(), seed=0)
    fp = model_fingerprint(model)
    assert fp == model_fingerprint(DualEncoder(tiny_config(), seed=0))
    assert len(fp) == 64
    # Every tensor counts, the 0-d temperature and bias included (found in review: one weight
    # was the only one tested).
    for name in DualEncoder(tiny_config(), seed=0).state_dict():
        changed = DualEncoder(tiny_config(), seed=0)
        with torch.no_grad():
            changed.state_dict()[name].view(-1)[0] += 1e-3
        assert model_fingerprint(changed) != fp, name
    with torch.no_grad():
        model.text.blocks[0].fc1.weight[3, 5] += 1e-6
    assert model_fingerprint(model) != fp
    # Same weights, different config (an unused knob) -> different model identity.
    other = DualEncoder(tiny_config(), seed=0)
    other.config = replace(other.config, init_logit_bias=-9.0)
    assert model_fingerprint(other) != fp


# ------------------------------------------------------------------------------------ loss


def slow_sigmoid_loss(u: torch.Tensor, v: torch.Tensor, t: float, c: float) -> float:
    n = u.shape[0]
    total = 0.0
    for i in range(n):
        for j in range(n):
            y = 1.0 if i == j else -1.0
            z = y * (t * float(u[i].double() @ v[j].double()) + c)
            total += math.log1p(math.exp(-z))  # -log sigmoid(z)
    return total / n


def test_sigmoid_loss_matches_double_loop() -> None:
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(7, 5, generator=g), dim=-1)
    v = F.normalize(torch.randn(7, 5, generator=g), dim=-1)
    for t, c in [(10.0, -10.0), (3.0, 0.5), (1.0, 0.0)]:
        got = sigmoid_loss(u, v, torch.tensor(t), torch.tensor(c))
        assert got.dtype == torch.float32 and got.shape == ()
        assert got.item() == pytest.approx(slow_sigmoid_loss(u, v, t, c), rel=1e-5)
    low = sigmoid_loss(u.bfloat16(), v.bfloat16(), 10.0, -10.0)
    assert low.dtype == torch.float32


def test_sigmoid_loss_rejects_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="image_emb"):
        sigmoid_loss(torch.zeros(3, 4), torch.zeros(4, 4), 1.0, 0.0)


def test_sigmoid_loss_refuses_what_would_broadcast_or_be_parsed() -> None:
    """The README's training loss: a [N] or per-GPU [2] t would broadcast into a wrong loss
    (or fail deep in torch), numpy or integer embeddings into an AttributeError or a cast."""
    u = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=-1)
    cases = [
        ((u, u, torch.linspace(1, 20, 6), -10.0), ValueError,
         r"logit_scale must be a scalar \(one element\), got shape \(6,\)"),
        ((u, u, torch.tensor([10.0, 10.0]), -10.0), ValueError, r"got shape \(2,\)"),
        ((u, u, 10.0, torch.zeros(3, 1, 1)), ValueError, "logit_bias must be a scalar"),
        ((u, u, "10", -10.0), TypeError, "logit_scale must be a float or a one-element"),
        ((u, u, 10.0, np.bool_(False)), TypeError, "logit_bias must be a float .*bool"),
        ((u, u, torch.tensor(True), -10.0), TypeError, "logit_scale must be a float .*bool"),
        ((u.numpy(), u, 10.0, -10.0), TypeError, "image_emb must be a torch.Tensor"),
        ((u, u.long(), 10.0, -10.0), TypeError, "text_emb must be a floating-point"),
        ((u[0], u[0], 10.0, -10.0), ValueError, r"must have shape \[N, d\]"),
    ]
    for args, error, match in cases:
        with pytest.raises(error, match=match):
            sigmoid_loss(*args)
    # A one-element t of any shape, a Parameter with its gradient, a numpy float: fine.
    t = torch.nn.Parameter(torch.tensor([[math.log(10.0)]]))
    loss = sigmoid_loss(u, u, t.exp(), np.array(-10.0, dtype=np.float32))
    loss.backward()
    assert t.grad is not None and t.grad.shape == (1, 1)
    assert loss.item() == pytest.approx(sigmoid_loss(u, u, 10.0, -10.0).item(), rel=1e-4)
    assert sigmoid_loss(u, u, np.float32(10.0), -10).item() == pytest.approx(loss.item(),
                                                                               rel=1e-4)


# --- found in review -------------------------------------------------------------------------


def _slow_antialiased_resize_1d(old: int, new: int) -> torch.Tensor:
    """[new, old] weights of shrinking by s = old / new the way jax.image.resize('linear')
    does (FlexiViT): a triangle kernel stretched to half-width s, centred at each output
    pixel's centre in input coordinates, normalised over the input pixels it covers."""
    s = old / new
    m = torch.zeros(new, old, dtype=torch.float64)
    for j in range(new):
        centre = (j + 0.5) * s - 0.5
        for i in range(old):
            m[j, i] = max(0.0, 1 - abs(i - centre) / s)
        m[j] /= m[j].sum()
    return m


@pytest.mark.parametrize("grid, new_grid", [(8, 2), (4, 2), (8, 3), (6, 4), (4, 1)])
def test_shrinking_pos_embed_is_antialiased(grid, new_grid) -> None:
    # Every coarse forward shrinks the positional grid (4x4 -> 2x2 at Flexi's scoring
    # patch). Without antialiasing a 4x shrink reads 2 of every 4 rows and drops the rest;
    # the orientation test's linear grids cannot tell (found in review).
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(1, grid * grid, 3, generator=g, dtype=torch.float64)
    m = _slow_antialiased_resize_1d(grid, new_grid)
    want = torch.einsum("ai,bj,ijc->abc", m, m, pos.reshape(grid, grid, 3))
    out = resize_pos_embed(pos, new_grid).reshape(new_grid, new_grid, 3)
    torch.testing.assert_close(out, want, atol=1e-12, rtol=0)


def _slow_attention(block, x: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-head self-attention written out head by head and query by query."""
    batch, length, width = x.shape
    heads, head_dim = block.heads, width // block.heads
    q, k, v = block.qkv(x).split(width, dim=-1)
    out = torch.zeros_like(x)
    for b in range(batch):
        for h in range(heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            for i in range(length):
                logits = torch.stack([q[b, i, cols] @ k[b, j, cols] / math.sqrt(head_dim)
                                      for j in range(length)])
                if key_mask is not None:
                    logits = logits.masked_fill(~key_mask[b], float("-inf"))
                weights = torch.exp(logits - logits.max())
                weights = weights / weights.sum()
                out[b, i, cols] = sum(weights[j] * v[b, j, cols] for j in range(length))
    return block.proj(out)


@pytest.mark.parametrize("heads, length", [(1, 5), (2, 4), (4, 20)])
def test_attention_equals_a_slow_head_by_head_version(heads, length) -> None:
    # Found in review: the 1 / sqrt(head_dim) scale could be 1 / sqrt(width), or gone, and
    # the heads merged back in the wrong order, with every test passing.
    block = models.Block(width=16, heads=heads).double()
    g = torch.Generator().manual_seed(heads)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(2, length, 16, generator=g, dtype=torch.float64)
    key_mask = torch.ones(2, length, dtype=torch.bool)
    key_mask[1, length // 2:] = False  # padding in the second sequence
    for mask in (None, key_mask):
        torch.testing.assert_close(block.attention(x, mask), _slow_attention(block, x, mask),
                                   atol=1e-10, rtol=1e-10)


def test_pi_resize_to_a_finer_patch_is_the_least_squares_kernel() -> None:
    # Shrinking a patch (new < old) has no exact inverse: PI-resize promises the kernel w'
    # minimising |B^T w' - w| (unique: B^T has full column rank), i.e. the one solving the
    # normal equations B (B^T w' - w) = 0. A plainly resized kernel fails them.
    g = torch.Generator().manual_seed(0)
    for old, new in [(8, 4), (8, 2), (6, 4)]:
        b = bilinear_resize_matrix(old, new)  # [new^2, old^2]
        w = torch.randn(5, old * old, generator=g, dtype=torch.float64)
        w_new = w @ pi_resize_matrix(old, new)  # [5, new^2]
        residual = w_new @ b - w  # (B^T w' - w) per kernel row
        torch.testing.assert_close(residual @ b.T, torch.zeros(5, new * new, dtype=torch.float64),
                                   atol=1e-10, rtol=0)
        plain = w @ b.T  # the kernel bilinearly resized, as a naive FlexiViT would
        assert ((plain @ b - w) @ b.T).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.uint8, torch.float16])
def test_images_of_another_dtype_are_refused_by_name(dtype) -> None:
    # Found in review: a float64 or uint8 batch failed 9 frames deep in a matmul.
    model = DualEncoder(tiny_config())
    images = (torch.rand(2, 1, 32, 32) * 255).to(dtype)
    with pytest.raises(ValueError, match=f"images must be torch.float32 like the model's "
                                         f"weights, got {dtype}"):
        model.encode_image(images)
    with pytest.raises(ValueError, match="images must be"):
        model.image.patch_embed(images, 8)


def test_patch_embed_refuses_images_its_patch_does_not_cut() -> None:
    # Found in review: 30 x 30 failed in a reshape. (Other sizes the patch divides are
    # fine: test_pi_resize_upsampled_image_reproduces_tokens embeds 64 x 64 images.)
    embed = DualEncoder(tiny_config()).image.patch_embed
    for shape in ((2, 1, 30, 30), (2, 1, 32, 16), (2, 3, 32, 32), (1, 32, 32)):
        with pytest.raises(ValueError, match=r"images must have shape \[B, 1, S, S\] with S "
                                             r"a multiple of patch_size=8"):
            embed(torch.rand(*shape), 8)
    assert embed(torch.rand(2, 1, 16, 16), 8).shape == (2, 4, 32)
    with pytest.raises(TypeError, match="images must be a Tensor"):
        embed(np.zeros((2, 1, 32, 32), dtype=np.float32), 8)


def test_images_of_another_float_dtype_run_under_autocast() -> None:
    model = DualEncoder(tiny_config())
    images, _ = batch(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.encode_image(images.to(torch.bfloat16))
    assert out.shape == (2, 16) and torch.isfinite(out).all()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(seed=1.5), ValueError,
         r"seed must be an int in \[0, 9223372036854775807\], got 1\.5"),
        (dict(seed=True), ValueError, "seed must be an int"),
        (dict(seed=-1), ValueError, "seed must be an int"),
        (dict(seed=2**64), ValueError, "seed must be an int"),
        (dict(generator=5), TypeError, "generator must be a torch.Generator or None, got int"),
    ],
)
def test_bad_seed_or_generator_is_named(kwargs, error, match) -> None:
    with pytest.raises(error, match=match):
        DualEncoder(tiny_config(), **kwargs)


def test_load_model_names_a_bad_device(tmp_path) -> None:
    path = tmp_path / "m.safetensors"
    save_model(DualEncoder(tiny_config()), path)
    with pytest.raises(ValueError, match=r"device must be a torch device.*'gpu'"):
        load_model(path, device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"device='cuda:7', but CUDA is not available"):
            load_model(path, device="cuda:7")


def test_a_mixed_precision_model_loads_as_saved(tmp_path) -> None:
    # Found in review: a bfloat16 image tower with a float32 text tower saved fine, then
    # loaded into float32 and was refused as "altered or damaged".
    model = DualEncoder(tiny_config(), seed=2)
    model.image.to(torch.bfloat16)
    path = tmp_path / "mixed.safetensors"
    save_model(model, path)
    back = load_model(path)
    assert model_fingerprint(back) == model_fingerprint(model)
    for (name, p), q in zip(model.named_parameters(), back.parameters(), strict=True):
        assert q.dtype == p.dtype and torch.equal(q, p), name
