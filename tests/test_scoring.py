"""Pairwise losses and criteria against slow, obviously-correct versions."""

import math

import pytest
import torch
import torch.nn.functional as F

from jestkit.scoring import (
    all_finite,
    easy_reference,
    get_criterion,
    hard_learner,
    learnability,
    pairwise_sigmoid_loss,
    pairwise_softmax_loss,
    uniform,
)


def embeddings(n=6, d=5, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    v = F.normalize(u + 0.7 * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return u.to(dtype), v.to(dtype)


def test_sigmoid_matches_double_loop():
    u, v = embeddings()
    t, c = 9.0, -4.0
    out = pairwise_sigmoid_loss(u, v, t, c)
    for i in range(6):
        for j in range(6):
            y = 1.0 if i == j else -1.0
            z = t * float(u[i] @ v[j]) + c
            expected = -math.log(1.0 / (1.0 + math.exp(-y * z)))
            assert out[i, j].item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


def test_sigmoid_block_sum_is_the_siglip_batch_loss():
    # The identity the whole method rests on: a sub-batch's loss is a block sum.
    u, v = embeddings(n=8)
    t, c = torch.tensor(10.0), torch.tensor(-10.0)
    full = pairwise_sigmoid_loss(u, v, t, c)
    s = torch.tensor([1, 4, 6])
    sub = pairwise_sigmoid_loss(u[s], v[s], t, c)
    assert torch.allclose(full[s][:, s], sub)
    labels = 2 * torch.eye(3, dtype=u.dtype) - 1
    siglip = -F.logsigmoid(labels * (t * u[s] @ v[s].T + c)).sum() / 3
    assert torch.allclose(sub.sum() / 3, siglip)


def test_softmax_matches_cross_entropy():
    u, v = embeddings(n=7)
    t = 5.0
    out = pairwise_softmax_loss(u, v, t, logit_bias=3.0)  # bias cancels
    logits = t * u @ v.T
    labels = torch.arange(7)
    clip = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert torch.allclose(out.diagonal().mean(), clip)
    i, j = 2, 5
    expected = -(torch.log_softmax(logits[i], 0)[j] + torch.log_softmax(logits[:, j], 0)[i]) / 2
    assert torch.allclose(out[i, j], expected)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_input_accumulates_in_float32(dtype):
    u, v = embeddings(n=32, d=16, dtype=dtype)
    out = pairwise_sigmoid_loss(u, v, 10.0, -10.0)
    assert out.dtype == torch.float32
    exact = pairwise_sigmoid_loss(u.double(), v.double(), 10.0, -10.0)
    assert torch.allclose(out.double(), exact, rtol=1e-5, atol=1e-5)


def test_criteria():
    lrn = torch.tensor([[3.0, 1.0], [2.0, 5.0]])
    ref = torch.tensor([[1.0, 1.5], [0.5, 1.0]])
    assert torch.equal(learnability(lrn, ref), lrn - ref)
    assert torch.equal(hard_learner(lrn, ref), lrn)
    assert torch.equal(hard_learner(lrn), lrn)
    assert torch.equal(easy_reference(None, ref), -ref)
    assert torch.equal(uniform(lrn, None), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="criterion"):
        get_criterion("learnabilty")
    with pytest.raises(ValueError, match="reference_loss"):
        learnability(lrn, None)
    # Found in review: shapes that broadcast gave the outer difference l_i - r_j (BRIEF 6),
    # or [N, N] - [N], silently.
    l_vec, r_vec = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 0.25])
    with pytest.raises(ValueError, match=r"same shape, got \(2, 1\) and \(1, 2\)"):
        learnability(l_vec[:, None], r_vec[None, :])
    with pytest.raises(ValueError, match="same shape"):
        learnability(lrn, r_vec)


@pytest.mark.parametrize("loss", [pairwise_sigmoid_loss, pairwise_softmax_loss])
def test_pair_losses_take_unnormalised_embeddings_when_told(loss):
    gen = torch.Generator().manual_seed(0)
    u, v = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
    with pytest.raises(TypeError, match="require_normalized must be a bool"):
        loss(u, v, 10.0, -10.0, require_normalized="no")
    # Opting out scores the raw embeddings: the same as the normalised ones scaled back in.
    raw = loss(u, v, 10.0, -10.0, require_normalized=False)
    nu, nv = torch.nn.functional.normalize(u, dim=1), torch.nn.functional.normalize(v, dim=1)
    scaled = loss(nu * u.norm(dim=1, keepdim=True), nv * v.norm(dim=1, keepdim=True), 10.0,
                  -10.0, require_normalized=False)
    torch.testing.assert_close(raw, scaled)
    assert not torch.allclose(raw, loss(nu, nv, 10.0, -10.0))


UNIT = torch.full((3, 2), 2**-0.5)  # rows of norm 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(image_emb=torch.full((3, 2), float("nan"))), "image_emb contains NaN"),
        (dict(text_emb=torch.full((3, 2), float("inf"))), "text_emb contains NaN or Inf"),
        (dict(text_emb=torch.ones(4, 2)), "same shape"),
        (dict(image_emb=torch.ones(3), text_emb=torch.ones(3)), r"shape \[N, d\]"),
        (dict(image_emb=torch.ones(0, 2), text_emb=torch.ones(0, 2)), r"shape \[N, d\]"),
        (dict(logit_scale=float("nan")), "logit_scale must be finite"),
        (dict(logit_scale=torch.ones(2)), "logit_scale must be a scalar"),
        (dict(logit_scale=0.0), "logit_scale must be > 0"),  # found in review: accepted
        (dict(logit_scale=-10.0), "logit_scale must be > 0"),
        # Found in review: accepted, while the selector refuses the same embeddings.
        (dict(image_emb=10 * UNIT), "image embeddings must be L2-normalised"),
        (dict(text_emb=torch.ones(3, 2)), r"text embeddings must be L2-normalised.*1\.414"),
    ],
)
@pytest.mark.parametrize("loss", [pairwise_sigmoid_loss, pairwise_softmax_loss])
def test_bad_input(kwargs, match, loss):
    args = dict(image_emb=UNIT, text_emb=UNIT, logit_scale=1.0, logit_bias=0.0)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        loss(**args)


def test_pair_losses_are_for_scoring_t_and_c_are_constants():
    # What the docstrings promise: gradients reach the embeddings, never t or c (the
    # selector scores under no-grad; training uses models.sigmoid_loss, which learns them).
    gen = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(4, 3, generator=gen)).requires_grad_()
    t = torch.tensor(10.0, requires_grad=True)
    c = torch.tensor(-10.0, requires_grad=True)
    pairwise_sigmoid_loss(u, u, t, c).sum().backward()
    assert u.grad is not None and u.grad.abs().sum() > 0
    assert t.grad is None and c.grad is None


def test_bias_is_required_and_bools_are_not_numbers():
    u = torch.nn.functional.normalize(torch.randn(3, 2, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(TypeError, match="logit_bias"):  # c = 0 would be a different loss
        pairwise_sigmoid_loss(u, u, 10.0)
    with pytest.raises(TypeError, match="logit_scale must be a float .*True"):
        pairwise_sigmoid_loss(u, u, True, -10.0)


def test_integer_embeddings_rejected():
    with pytest.raises(TypeError, match="image_emb must be a floating-point"):
        pairwise_sigmoid_loss(torch.ones(3, 2, dtype=torch.long), torch.ones(3, 2), 1.0, 0.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_all_finite_agrees_with_elementwise_isfinite(dtype):
    """The fast check (a finite sum) must never pass a NaN or Inf, and must not reject
    finite entries whose sum overflows (it falls back to the exact check)."""
    big = torch.finfo(dtype).max
    cases = {
        "normal": torch.randn(64, 8, generator=torch.Generator().manual_seed(0)),
        "sum overflows": torch.full((64, 8), big / 2, dtype=dtype),  # the exact fallback
        "nan": torch.tensor([[1.0, math.nan]]),
        "inf": torch.tensor([[1.0, math.inf]]),
        "-inf": torch.tensor([[-math.inf, 1.0]]),
        "inf - inf": torch.tensor([[math.inf, -math.inf]]),
    }
    cases["empty"] = torch.empty(0, 8)
    cases["subnormal, -0.0"] = torch.tensor([[torch.finfo(dtype).tiny / 4, -0.0]])
    for name, x in cases.items():
        x = x.to(dtype)
        for view in (x, x.T, x[:, ::2]):  # contiguous and not
            assert all_finite(view) == bool(torch.isfinite(view).all()), name
