"""The selection core: exactness, statistics, the BRIEF's traps, properties and bad input.

Statistical tests use fixed seeds, state their tolerances, and show they have power: the
same statistic rejects the plausible wrong samplers (the traps of BRIEF 6).
"""

import inspect
import itertools
import math
import warnings
from collections import Counter
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from jestkit.scoring import (
    easy_reference,
    hard_learner,
    learnability,
    pairwise_sigmoid_loss,
    pairwise_softmax_loss,
)
from jestkit.selection import (
    JointSelector,
    ModelEmbeddings,
    chunk_sizes,
    independent_select,
    joint_select,
    uniform_select,
)

# --- fixtures and slow, obviously-correct references -----------------------------------------


def model_embeddings(n, d=8, seed=0, dtype=torch.float64, scale=10.0, bias=-5.0, noise=0.6):
    """Normalised image/text embeddings with correlated pairs, as a trained model gives."""
    g = torch.Generator().manual_seed(seed)
    u = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    v = F.normalize(u + noise * torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)
    return ModelEmbeddings(u.to(dtype), v.to(dtype), scale, bias)


def dense_learnability(lrn: ModelEmbeddings, ref: ModelEmbeddings) -> torch.Tensor:
    return learnability(
        pairwise_sigmoid_loss(lrn.image, lrn.text, lrn.logit_scale, lrn.logit_bias),
        pairwise_sigmoid_loss(ref.image, ref.text, ref.logit_scale, ref.logit_bias),
    )


def random_scores(n, seed, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, n, generator=g, dtype=torch.float64)


def block_score(a, subset):
    idx = torch.tensor(sorted(subset))
    return a[idx][:, idx].sum().item()


def set_probability(logits, subset):
    """P(the first |subset| draws without replacement, P prop. to exp(logit), are `subset`):
    the sum over orders of the sequential (Plackett-Luce) probabilities. Slow and exact."""
    p = torch.softmax(logits.double(), 0)
    total = 0.0
    for order in itertools.permutations(subset):
        prob, left = 1.0, 1.0
        for i in order:
            prob *= p[i].item() / left
            left -= p[i].item()
        total += prob
    return total


def exact_blocked_distribution(a, sizes):
    """Exact distribution of the tuple of chunk sets the blocked procedure draws (BRIEF 3),
    by enumeration: P(C1) * P(C2 | C1) * ..., with the logits written out from the
    definition (diagonal, then diagonal + sum over the chosen set of A_ij + A_ji)."""
    n = a.shape[0]
    out = {}

    def rec(prefix, chosen, prob):
        if len(prefix) == len(sizes):
            out[tuple(prefix)] = prob
            return
        logits = torch.empty(n, dtype=torch.float64)
        for i in range(n):
            logits[i] = a[i, i] + sum(a[i, j] + a[j, i] for j in chosen)
        free = [i for i in range(n) if i not in chosen]
        logits_free = logits[free]
        for combo in itertools.combinations(range(len(free)), sizes[len(prefix)]):
            subset = frozenset(free[k] for k in combo)
            p = set_probability(logits_free, list(combo))
            rec(prefix + [subset], chosen | subset, prob * p)

    rec([], frozenset(), 1.0)
    return out


def chunked(indices, sizes):
    out, start = [], 0
    for s in sizes:
        out.append(frozenset(indices[start:start + s]))
        start += s
    return tuple(out)


def chi_square_pvalue(counts: Counter, expected_p: dict, n_draws: int) -> float:
    """Pearson chi-square p-value; cells with expected count < 5 are pooled into one."""
    assert set(counts) <= set(expected_p), "drew an outcome the exact distribution excludes"
    obs, exp, pool_obs, pool_exp = [], [], 0, 0.0
    for key, p in expected_p.items():
        if p * n_draws < 5:
            pool_obs += counts.get(key, 0)
            pool_exp += p * n_draws
        else:
            obs.append(counts.get(key, 0))
            exp.append(p * n_draws)
    if pool_exp > 0:
        obs.append(pool_obs)
        exp.append(pool_exp)
    total = sum(exp)
    assert total == pytest.approx(n_draws, rel=1e-6), "expected probabilities must sum to 1"
    return stats.chisquare(obs, [e * sum(obs) / total for e in exp]).pvalue


def lse_conditional_loss(emb, rows):
    """Slow brute force: each example's symmetric CLIP loss in the batch `rows`."""
    z = emb.logit_scale * emb.image[rows] @ emb.text[rows].T
    labels = torch.arange(len(rows))
    return (F.cross_entropy(z, labels, reduction="none")
            + F.cross_entropy(z.T, labels, reduction="none")) / 2


# --- exactness -------------------------------------------------------------------------------


def test_chunk_sizes_remainder():
    assert chunk_sizes(10, 3) == [4, 3, 3]
    assert chunk_sizes(16, 16) == [1] * 16
    assert chunk_sizes(33, 16) == [3] + [2] * 15
    for b in range(1, 40):
        for k in range(1, b + 1):
            sizes = chunk_sizes(b, k)
            assert sum(sizes) == b and len(sizes) == k and max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("args, match", [((3, 5), r"n_chunks must be in \[1, batch_size=3\]"),
                                         ((4, 0), r"n_chunks must be in \[1, batch_size=4\]"),
                                         ((-4, 2), "batch_size must be >= 1"),
                                         ((4.0, 2), "batch_size must be an int")])
def test_chunk_sizes_refuses_what_it_cannot_split(args, match):
    # Public: found in review returning [1, 1, 1, 0, 0], [-2, -2] and a ZeroDivisionError.
    with pytest.raises((ValueError, TypeError), match=match):
        chunk_sizes(*args)


def test_conditional_logits_equal_true_gain_by_brute_force():
    a = random_scores(9, seed=1)
    logs = []
    idx = joint_select(a, 7, n_chunks=3, generator=torch.Generator().manual_seed(0),
                       chunk_logits=logs)
    sizes = chunk_sizes(7, 3)
    chosen: list[int] = []
    for k, logits in enumerate(logs):
        for i in range(9):
            if i in chosen:
                assert logits[i] == float("-inf")
            else:
                gain = block_score(a, chosen + [i]) - (block_score(a, chosen) if chosen else 0)
                assert logits[i].item() == pytest.approx(gain, abs=1e-12)
        chosen += idx[sum(sizes[:k]):sum(sizes[:k + 1])].tolist()


def test_the_speed_benchmarks_dense_baseline_draws_the_same_law():
    """benchmarks/dense_reference.py (the outside baseline of selection_speed.py, written
    without jestkit) must be JEST too, or the benchmark's speed-up compares against something
    else: its draws follow the exact blocked distribution."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "dense_reference.py"
    spec = importlib.util.spec_from_file_location("dense_reference", path)
    dense = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dense)
    a = random_scores(7, seed=11)
    sizes = dense.dense_chunk_sizes(4, 2)
    assert sizes == chunk_sizes(4, 2)
    exact = exact_blocked_distribution(a, sizes)
    gen, draws = torch.Generator().manual_seed(5), 20000
    counts = Counter(chunked(dense.dense_joint_select(a, sizes, gen).tolist(), sizes)
                     for _ in range(draws))
    assert chi_square_pvalue(counts, exact, draws) > 1e-3


@pytest.mark.parametrize("n, b, k, draws", [(7, 4, 2, 20000), (8, 5, 2, 20000), (6, 3, 3, 12000)])
def test_joint_select_matches_exact_blocked_distribution(n, b, k, draws):
    a = random_scores(n, seed=n + b)
    sizes = chunk_sizes(b, k)
    exact = exact_blocked_distribution(a, sizes)
    assert sum(exact.values()) == pytest.approx(1.0, abs=1e-9)
    gen = torch.Generator().manual_seed(1234)
    counts = Counter(chunked(joint_select(a, b, n_chunks=k, generator=gen).tolist(), sizes)
                     for _ in range(draws))
    tv = 0.5 * sum(abs(counts.get(key, 0) / draws - p) for key, p in exact.items())
    # p > 1e-3 at a fixed seed; the total-variation distance is within sampling error
    # (about sqrt(#outcomes / draws) / 2 for a correct sampler).
    assert chi_square_pvalue(counts, exact, draws) > 1e-3
    assert tv < 0.6 * math.sqrt(len(exact) / draws)


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_independent_select_matches_exact_distribution(temperature):
    a = random_scores(8, seed=5)
    scores = (a.sum(1) + a.sum(0)) / 2

    def law(logits):
        return {frozenset(c): set_probability(logits, list(c))
                for c in itertools.combinations(range(8), 3)}

    gen = torch.Generator().manual_seed(99)
    draws = 20000
    counts = Counter(frozenset(independent_select(a, 3, generator=gen,
                                                  temperature=temperature).tolist())
                     for _ in range(draws))
    assert chi_square_pvalue(counts, law(scores / temperature), draws) > 1e-3
    if temperature != 1.0:  # an ignored temperature is rejected
        assert chi_square_pvalue(counts, law(scores), draws) < 1e-6


def test_uniform_select_draws_every_sub_batch_equally():
    # All C(12, 4) = 495 sub-batches equally likely: chi-square over 20,000 draws (expected
    # ~40 per cell). A sampler that never picks some index misses 165 cells and fails.
    gen = torch.Generator().manual_seed(7)
    draws = 20000
    counts = Counter(frozenset(uniform_select(12, 4, generator=gen).tolist())
                     for _ in range(draws))
    cells = [frozenset(c) for c in itertools.combinations(range(12), 4)]
    assert chi_square_pvalue(counts, {c: 1 / len(cells) for c in cells}, draws) > 1e-3


def test_joint_batches_score_far_above_uniform_and_near_the_best():
    # A learnability matrix of two small "models": every 4-of-12 sub-batch enumerated.
    lrn = model_embeddings(12, d=4, seed=3, scale=10.0, bias=-5.0, noise=1.0)
    ref = model_embeddings(12, d=4, seed=4, scale=10.0, bias=-5.0, noise=0.3)
    a = dense_learnability(lrn, ref)
    all_scores = torch.tensor([block_score(a, c) for c in itertools.combinations(range(12), 4)])
    gen = torch.Generator().manual_seed(7)
    joint = torch.tensor([block_score(a, joint_select(a, 4, n_chunks=4, generator=gen).tolist())
                          for _ in range(2000)])
    uni = torch.tensor([block_score(a, uniform_select(12, 4, generator=gen).tolist())
                        for _ in range(2000)])
    percentile = (all_scores < joint.mean()).double().mean().item()
    top_decile = (joint >= all_scores.quantile(0.9)).double().mean().item()
    # Measured (seed 7, 2,000 draws): the mean jointly-selected batch beats 97.2% of all 495
    # sub-batches (the best scores 22.9, joint's mean 14.5, the mean sub-batch 3.9); it sits
    # 1.96 standard deviations above uniform; 84% of joint draws are in the top decile.
    # Asserted with margin:
    assert percentile > 0.95
    assert joint.mean() - uni.mean() > 1.5 * all_scores.std()
    assert top_decile > 0.75
    assert uni.mean().item() == pytest.approx(all_scores.mean().item(),
                                              abs=4 * all_scores.std().item() / math.sqrt(2000))


# --- the embedding path equals the dense path ------------------------------------------------


@pytest.mark.parametrize("n, b, k", [(64, 16, 4), (50, 13, 4), (37, 10, 10), (40, 7, 1),
                                     (600, 40, 4)])  # N > 512: blocks at any block size
@pytest.mark.parametrize("block", [1 << 22, 97])  # the [N, N] fast path, and row blocks
def test_selector_equals_dense_in_float64(n, b, k, block):
    lrn = model_embeddings(n, seed=1, scale=10.0, bias=-5.0)
    ref = model_embeddings(n, seed=2, scale=7.0, bias=-3.0, noise=0.3)
    dense_logs, emb_logs = [], []
    expected = joint_select(dense_learnability(lrn, ref), b, n_chunks=k,
                            generator=torch.Generator().manual_seed(3), chunk_logits=dense_logs)
    sel = JointSelector(batch_size=b, n_chunks=k, max_block_elements=block)
    got = sel(lrn, ref, generator=torch.Generator().manual_seed(3), chunk_logits=emb_logs)
    assert torch.equal(got, expected)
    assert len(dense_logs) == len(emb_logs) == k
    for x, y in zip(dense_logs, emb_logs, strict=True):
        assert torch.equal(torch.isinf(x), torch.isinf(y))
        assert torch.allclose(x[~torch.isinf(x)], y[~torch.isinf(y)], rtol=0, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_selector_logits_equal_dense_in_low_precision(dtype):
    # The selector accumulates in float32; compare with the dense float32 matrix of the same
    # (rounded) embeddings. Tolerance: float32 sums of ~N terms of size ~10.
    lrn = model_embeddings(48, seed=5, dtype=dtype)
    ref = model_embeddings(48, seed=6, dtype=dtype, scale=5.0, bias=-2.0)
    dense = dense_learnability(lrn, ref)
    assert dense.dtype == torch.float32
    dense_logs, emb_logs = [], []
    expected = joint_select(dense, 12, n_chunks=3, generator=torch.Generator().manual_seed(0),
                            chunk_logits=dense_logs)
    got = JointSelector(batch_size=12, n_chunks=3)(
        lrn, ref, generator=torch.Generator().manual_seed(0), chunk_logits=emb_logs)
    assert torch.equal(got, expected)
    for x, y in zip(dense_logs, emb_logs, strict=True):
        finite = ~torch.isinf(x)
        assert torch.allclose(x[finite], y[finite], rtol=1e-5, atol=1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_selector_on_cuda_equals_cpu():
    lrn = model_embeddings(256, seed=1, dtype=torch.float64)
    ref = model_embeddings(256, seed=2, dtype=torch.float64)
    cpu = JointSelector(filter_ratio=0.8)(lrn, ref, generator=torch.Generator().manual_seed(0))
    cuda_lrn = ModelEmbeddings(lrn.image.cuda(), lrn.text.cuda(), 10.0, -5.0)
    cuda_ref = ModelEmbeddings(ref.image.cuda(), ref.text.cuda(), 10.0, -5.0)
    got = JointSelector(filter_ratio=0.8)(cuda_lrn, cuda_ref,
                                          generator=torch.Generator().manual_seed(0))
    assert got.device.type == "cuda"
    assert torch.equal(got.cpu(), cpu)


@pytest.mark.parametrize("n, block, dense", [(64, 1 << 22, True), (64, 97, False),
                                             (600, 1 << 22, False)])
def test_which_super_batches_take_the_pair_matrix_path(n, block, dense):
    # The equality tests above cover both paths only if the parameters really pick them.
    from jestkit import selection

    models = [selection._Model(e, name, None, torch.float64, block)
              for name, e in (("learner", model_embeddings(n, seed=1)),
                              ("reference", model_embeddings(n, seed=2)))]
    state = selection._SigmoidState(*models, learnability)
    assert state.dense == dense and state.pairs is None  # nothing built before a chunk
    state.independent_scores()
    assert state.pairs is None  # independent selection never builds it
    state.add(torch.tensor([0, 1]))
    assert (state.pairs is not None) == dense


@pytest.mark.parametrize("block", [1 << 22, 97])  # one [N, N] block, and 20 row blocks of 2
def test_independent_selector_equals_dense(block):
    lrn = model_embeddings(40, seed=1)
    ref = model_embeddings(40, seed=2, scale=7.0, bias=-3.0)
    logs = []
    got = JointSelector(batch_size=9, selection="independent", max_block_elements=block)(
        lrn, ref, generator=torch.Generator().manual_seed(4), chunk_logits=logs)
    dense = dense_learnability(lrn, ref)
    expected = independent_select(dense, 9, generator=torch.Generator().manual_seed(4))
    assert torch.equal(got, expected)
    assert torch.allclose(logs[0], (dense.sum(1) + dense.sum(0)) / 2, atol=1e-10)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("block", [1 << 22, 97])
def test_independent_scores_compute_the_pair_matrix_once(loss, block):
    """z_ji is z_ij transposed: independent scores need one N x N matmul per model (2 N^2 d
    FLOPs), not one per orientation."""
    from jestkit.flops import count_flops

    n, d = 40, 8
    lrn, ref = model_embeddings(n, d, seed=1), model_embeddings(n, d, seed=2)
    selector = JointSelector(batch_size=9, selection="independent", loss=loss,
                             max_block_elements=block)
    assert count_flops(lambda: selector(lrn, ref)) == 2 * (2 * n * n * d)


def test_softmax_conditional_scores_equal_brute_force_batch_losses():
    lrn = model_embeddings(20, seed=1, scale=8.0)
    ref = model_embeddings(20, seed=2, scale=5.0, noise=0.2)
    logs = []
    idx = JointSelector(batch_size=8, n_chunks=4, loss="softmax", max_block_elements=30)(
        lrn, ref, generator=torch.Generator().manual_seed(0), chunk_logits=logs)
    assert len(set(idx.tolist())) == 8
    # First chunk: each example's own CLIP loss within the whole super-batch.
    full = (pairwise_softmax_loss(lrn.image, lrn.text, 8.0).diagonal()
            - pairwise_softmax_loss(ref.image, ref.text, 5.0).diagonal())
    assert torch.allclose(logs[0], full, atol=1e-10)
    # Later chunks: candidate i's loss in the batch S + {i}, learner minus reference.
    sizes = chunk_sizes(8, 4)
    for k in range(1, 4):
        chosen = idx[:sum(sizes[:k])].tolist()
        for i in range(20):
            if i in chosen:
                assert logs[k][i] == float("-inf")
                continue
            rows = torch.tensor(chosen + [i])
            expected = (lse_conditional_loss(lrn, rows)[-1] - lse_conditional_loss(ref, rows)[-1])
            assert logs[k][i].item() == pytest.approx(expected.item(), abs=1e-10)


# --- the traps of BRIEF 6, one test each -----------------------------------------------------


@pytest.mark.filterwarnings("ignore:.*logit_scale t = .* is small")  # small t on purpose
def test_trap_first_chunk_is_proportional_to_exp_diagonal():
    """Not uniform, not (score - min): the first chunk is drawn with P prop. to exp(A_ii)."""
    a = random_scores(6, seed=11, scale=1.0)
    diag = a.diagonal()
    gen = torch.Generator().manual_seed(0)
    draws = 30000
    counts = Counter(joint_select(a, 1, n_chunks=1, generator=gen).item() for _ in range(draws))
    right = {i: p.item() for i, p in enumerate(torch.softmax(diag, 0))}
    assert chi_square_pvalue(counts, right, draws) > 1e-3
    # The same statistic rejects the wrong first chunks of public attempts (test has power).
    shifted = diag - diag.min()
    for wrong in (torch.full((6,), 1 / 6), shifted / shifted.sum()):
        wrong = wrong.clamp_min(1e-12) / wrong.clamp_min(1e-12).sum()
        wrong_p = {i: p.item() for i, p in enumerate(wrong)}
        assert chi_square_pvalue(counts, wrong_p, draws) < 1e-6
    # And the embedding path's first chunk is the diagonal of the learnability matrix.
    lrn, ref = model_embeddings(30, seed=1), model_embeddings(30, seed=2, scale=4.0)
    logs = []
    JointSelector(batch_size=8, n_chunks=4)(lrn, ref, generator=gen, chunk_logits=logs)
    assert torch.allclose(logs[0], dense_learnability(lrn, ref).diagonal(), atol=1e-12)


def test_trap_learnability_has_real_pairwise_terms():
    """Not an outer difference A_ij = l_i - r_j (which makes joint == independent)."""
    lrn, ref = model_embeddings(10, seed=1), model_embeddings(10, seed=2, scale=4.0)
    a = dense_learnability(lrn, ref)
    # An outer difference has zero "interaction": A_ij - A_ik - A_lj + A_lk == 0.
    interaction = (a[:, None, :, None] - a[:, None, None, :]
                   - a[None, :, :, None] + a[None, :, None, :])
    assert interaction.abs().max() > 0.1
    # And the joint sampler uses those terms: an example whose value is in its pairing
    # with the first pick is chosen jointly, but not by independent scores.
    s = torch.zeros(10, 10, dtype=torch.float64)
    s[0, 0] = 5.0
    s[0, 1] = s[1, 0] = 4.0
    s[3, :] = 1.0  # example 3: a little with everyone, much in total
    joint = joint_select(s, 2, n_chunks=2, temperature=0)
    indep = independent_select(s, 2, temperature=0)
    assert joint.tolist() == [0, 1]
    assert sorted(indep.tolist()) == [0, 3]


@pytest.mark.filterwarnings("ignore:.*logit_scale t = .* is small")  # small t on purpose
def test_trap_huge_logits_do_not_overflow():
    a = random_scores(50, seed=3)
    for scale in (1e4, 1e30):
        big = a * scale
        idx = joint_select(big, 20, n_chunks=4, generator=torch.Generator().manual_seed(0))
        assert len(set(idx.tolist())) == 20
    # Adding a constant to every logit (exp would overflow at 1e6) leaves the draw unchanged.
    base = random_scores(60, seed=4)
    shifted = base + torch.eye(60, dtype=torch.float64) * 1e6
    x = joint_select(base, 10, n_chunks=1, generator=torch.Generator().manual_seed(5))
    y = joint_select(shifted, 10, n_chunks=1, generator=torch.Generator().manual_seed(5))
    assert torch.equal(x, y)
    # The embedding path with an extreme temperature multiplier stays finite.
    logs = []
    lrn = model_embeddings(40, seed=1, scale=1e6, bias=0.0)
    ref = model_embeddings(40, seed=2, scale=1.0, bias=0.0)
    idx = JointSelector(batch_size=10, n_chunks=5)(lrn, ref, chunk_logits=logs,
                                                   generator=torch.Generator().manual_seed(0))
    assert len(set(idx.tolist())) == 10
    assert all(not torch.isnan(x).any() for x in logs)


@pytest.mark.parametrize("loss", ["sigmoid", "softmax"])
@pytest.mark.parametrize("selection", ["joint", "independent"])
@pytest.mark.parametrize("block", [1 << 22, 7])  # the pair-matrix path and the block path
def test_overflowing_losses_raise_instead_of_drawing_nan(loss, selection, block):
    """A logit_scale so large that t * u . v overflows makes inf - inf = NaN scores; topk
    would draw those first. Every path must raise, never return such a draw."""
    g = torch.Generator().manual_seed(0)
    emb = [(10 * torch.randn(12, 3, generator=g), 10 * torch.randn(12, 3, generator=g),
            1e38, 0.0) for _ in range(2)]
    selector = JointSelector("learnability", batch_size=6, n_chunks=3, loss=loss,
                             selection=selection, max_block_elements=block,
                             require_normalized=False)  # the norm check would refuse first
    with pytest.raises(ValueError, match="contain NaN"):
        selector(*emb, generator=g)


@pytest.mark.parametrize("temperature", [1.0, 0.0])
def test_infinite_logits_raise_instead_of_returning_duplicates(temperature):
    """float32 gains can overflow from finite inputs: every remaining candidate at -inf ties
    with the masked, already-chosen ones, and topk returned those again (found in review:
    [3, 5, 3, 5]); at +inf ties were broken by index. Both must raise."""
    g = torch.Generator().manual_seed(0)
    for fill in (-3e38, 3e38):
        with pytest.raises(ValueError, match="infinite"):
            joint_select(torch.full((6, 6), fill), 4, n_chunks=2, generator=g,
                         temperature=temperature)
    # Through the selector: identical unit rows and a finite but absurd logit_scale.
    e = torch.nn.functional.normalize(torch.ones(8, 4), dim=1)
    selector = JointSelector("easy_reference", batch_size=6, n_chunks=3,
                             temperature=temperature)
    with pytest.raises(ValueError, match="infinite"):
        selector(None, (e, e, 1e38, 0.0), generator=g)


def test_nan_that_appears_only_in_a_middle_chunk_is_caught():
    """Softmax state: a diagonal z_ii = -inf gives (r + logaddexp(-inf, c)) / 2 - z = NaN
    while the running column log-sum-exp c is still -inf, and +inf once it is finite: the NaN
    exists at chunk 1 only, is drawn there first, and is gone by the last chunk. (Found in
    review: checking only the first and last chunks' logits returned this draw.)"""
    img = torch.tensor([[-0.01], [-0.01], [-0.01], [-0.01], [10.0], [-0.01], [-1.0], [0.01]])
    txt = torch.tensor([[-0.01], [-0.01], [10.0], [-10.0], [-10.0], [0.01], [10.0], [10.0]])
    selector = JointSelector("easy_reference", batch_size=6, n_chunks=3, loss="softmax",
                             temperature=0.0, require_normalized=False)
    logs: list[torch.Tensor] = []
    with pytest.raises(ValueError, match="contain NaN"):
        selector(reference=(img, txt, 1e38, 0.0), chunk_logits=logs)
    assert [bool(torch.isnan(x).any()) for x in logs] == [False, True, False]


def test_trap_no_collective_calls_in_single_process():
    lrn, ref = model_embeddings(64, seed=1), model_embeddings(64, seed=2)
    dist = torch.distributed
    names = ["all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "barrier",
             "reduce", "gather", "scatter", "get_rank", "get_world_size"]
    patches = [mock.patch.object(dist, name, side_effect=AssertionError(f"called {name}"))
               for name in names if hasattr(dist, name)]
    for p in patches:
        p.start()
    try:
        assert not dist.is_initialized()
        joint_select(dense_learnability(lrn, ref), 16)
        for loss in ("sigmoid", "softmax"):
            for selection in ("joint", "independent"):
                JointSelector(filter_ratio=0.75, loss=loss, selection=selection)(lrn, ref)
    finally:
        for p in patches:
            p.stop()


@pytest.mark.filterwarnings("ignore:.*logit_scale t = .* is small")  # small t on purpose
def test_trap_reference_temperature_is_the_references_own():
    lrn = model_embeddings(30, seed=1, scale=10.0, bias=-5.0)
    results = []
    for t_ref in (3.3, 20.0):
        ref = model_embeddings(30, seed=2, scale=t_ref, bias=-2.0)
        logs = []
        JointSelector(batch_size=8, n_chunks=2)(lrn, ref, chunk_logits=logs,
                                                generator=torch.Generator().manual_seed(0))
        assert torch.allclose(logs[0], dense_learnability(lrn, ref).diagonal(), atol=1e-12)
        results.append(logs[0])
    assert not torch.allclose(results[0], results[1])


def test_trap_default_is_16_chunks():
    assert inspect.signature(joint_select).parameters["n_chunks"].default == 16
    assert JointSelector(filter_ratio=0.5).n_chunks == 16


def test_trap_reference_loss_kept_when_device_given():
    lrn = model_embeddings(30, seed=1)
    ref = model_embeddings(30, seed=2, scale=6.0, bias=-1.0)
    for device in (None, "cpu", torch.device("cpu")):
        logs = []
        JointSelector(batch_size=6, n_chunks=3, device=device)(
            lrn, ref, chunk_logits=logs, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(logs[0], dense_learnability(lrn, ref).diagonal(), atol=1e-12)
        lrn_only = pairwise_sigmoid_loss(lrn.image, lrn.text, 10.0, -5.0).diagonal()
        assert not torch.allclose(logs[0], lrn_only)
    # The same model as learner and reference has zero learnability everywhere.
    logs = []
    JointSelector(batch_size=6, n_chunks=3, device="cpu")(lrn, lrn, chunk_logits=logs)
    assert all(torch.all(x[~torch.isinf(x)] == 0) for x in logs)


# --- properties ------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 40), data=st.data(), seed=st.integers(0, 2**31 - 1),
       temperature=st.sampled_from([0.0, 0.5, 1.0, 3.0]))
def test_property_size_distinct_in_range(n, data, seed, temperature):
    b = data.draw(st.integers(1, n))
    k = data.draw(st.integers(1, b))
    a = random_scores(n, seed % 1000, scale=data.draw(st.sampled_from([0.1, 1.0, 50.0])))
    gen = torch.Generator().manual_seed(seed)
    for idx in (joint_select(a, b, n_chunks=k, generator=gen, temperature=temperature),
                independent_select(a, b, generator=gen, temperature=temperature),
                uniform_select(n, b, generator=gen)):
        assert idx.shape == (b,) and idx.dtype == torch.long
        assert len(set(idx.tolist())) == b
        assert 0 <= idx.min() and idx.max() < n


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 30), data=st.data(), seed=st.integers(0, 10_000))
def test_property_permuting_the_super_batch_permutes_the_selection(n, data, seed):
    b = data.draw(st.integers(1, n))
    k = data.draw(st.integers(1, b))
    a = random_scores(n, seed)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    # Greedy (temperature 0) so the draw is a function of the scores alone.
    original = joint_select(a, b, n_chunks=k, temperature=0)
    permuted = joint_select(a[perm][:, perm], b, n_chunks=k, temperature=0)
    assert torch.equal(perm[permuted], original)
    # The same for the embedding path (greedy as well).
    lrn, ref = model_embeddings(n, seed=seed), model_embeddings(n, seed=seed + 7)
    sel = JointSelector(batch_size=b, n_chunks=k, temperature=0)
    got = sel(ModelEmbeddings(lrn.image[perm], lrn.text[perm], 10.0, -5.0),
              ModelEmbeddings(ref.image[perm], ref.text[perm], 10.0, -5.0))
    assert torch.equal(perm[got], sel(lrn, ref))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), criterion=st.sampled_from(["easy_reference", "uniform"]))
def test_property_criterion_that_ignores_learner_ignores_it(seed, criterion):
    ref = model_embeddings(32, seed=seed)
    sel = JointSelector(criterion, filter_ratio=0.75, n_chunks=4)
    picks = [sel(model_embeddings(32, seed=seed + s, scale=s + 1.0), ref,
                 generator=torch.Generator().manual_seed(seed)) for s in (1, 2)]
    assert torch.equal(picks[0], picks[1])
    assert torch.equal(picks[0], sel(None, ref, generator=torch.Generator().manual_seed(seed)))


def test_hard_learner_needs_no_reference_and_ignores_it():
    lrn = model_embeddings(32, seed=1)
    sel = JointSelector("hard_learner", batch_size=8, n_chunks=2)
    a = sel(lrn, None, generator=torch.Generator().manual_seed(0))
    b = sel(lrn, model_embeddings(32, seed=9), generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)
    dense = hard_learner(pairwise_sigmoid_loss(lrn.image, lrn.text, 10.0, -5.0))
    assert torch.equal(a, joint_select(dense, 8, n_chunks=2,
                                       generator=torch.Generator().manual_seed(0)))
    assert torch.equal(easy_reference(None, dense), -dense)


def test_global_rng_untouched_and_generator_reproducible():
    lrn, ref = model_embeddings(50, seed=1), model_embeddings(50, seed=2)
    state = torch.random.get_rng_state()
    sel = JointSelector(filter_ratio=0.8, n_chunks=5)
    a = sel(lrn, ref, generator=torch.Generator().manual_seed(3))
    b = sel(lrn, ref, generator=torch.Generator().manual_seed(3))
    sel(lrn, ref)  # no generator: a fresh OS-seeded one, not the global RNG
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b)
    assert sel.sub_batch_size(50) == 10 and a.numel() == 10
    # ... and freshly seeded each call: with equal scores every 10-of-50 sub-batch has
    # probability 1 / C(50, 10) ~ 1e-10, so three unseeded draws never repeat by chance.
    flat = torch.zeros(50, 50)
    for draw in (lambda: joint_select(flat, 10, n_chunks=5), lambda: independent_select(flat, 10),
                 lambda: uniform_select(50, 10)):
        assert len({tuple(sorted(draw().tolist())) for _ in range(3)}) == 3


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "scores, kwargs, error, match",
    [
        (torch.full((4, 4), float("nan")), {}, ValueError, "scores contains NaN or Inf"),
        (torch.full((4, 4), float("inf")), {}, ValueError, "scores contains NaN or Inf"),
        (torch.zeros(4, 5), {}, ValueError, "square"),
        (torch.zeros(0, 0), {}, ValueError, "empty"),
        (torch.zeros(4), {}, ValueError, "scores must have 2 dims"),
        (torch.zeros(4, 4, dtype=torch.long), {}, TypeError, "floating-point"),
        ([[0.0]], {}, TypeError, "scores must be a torch.Tensor"),
        (torch.zeros(4, 4), dict(batch_size=0), ValueError, r"batch_size must be in \[1, 4\]"),
        (torch.zeros(4, 4), dict(batch_size=5), ValueError, r"batch_size must be in \[1, 4\]"),
        (torch.zeros(4, 4), dict(batch_size=2.0), TypeError, "batch_size must be an int"),
        (torch.zeros(4, 4), dict(n_chunks=0), ValueError, r"n_chunks must be in \[1, batch_"),
        (torch.zeros(4, 4), dict(n_chunks=3), ValueError, r"n_chunks must be in \[1, batch_"),
        (torch.zeros(4, 4), dict(temperature=-1.0), ValueError, "temperature"),
        (torch.zeros(4, 4), dict(generator=0), TypeError, "generator must be a torch.Gen"),
    ],
)
def test_joint_select_bad_input(scores, kwargs, error, match):
    args = dict(batch_size=2, n_chunks=2)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        joint_select(scores, **args)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(filter_ratio=0.0), r"filter_ratio must be in \(0, 1\)"),
        (dict(filter_ratio=1.0), r"filter_ratio must be in \(0, 1\)"),
        (dict(filter_ratio=1.5), r"filter_ratio must be in \(0, 1\)"),
        (dict(), "exactly one of filter_ratio"),
        (dict(filter_ratio=0.5, batch_size=4), "exactly one of filter_ratio"),
        (dict(batch_size=0), "batch_size must be >= 1"),
        (dict(batch_size=4, n_chunks=5), r"n_chunks must be in \[1, batch_size=4\]"),
        (dict(batch_size=4, n_chunks=0), r"n_chunks must be >= 1, got 0"),
        (dict(filter_ratio=0.8, n_chunks=0), r"n_chunks must be >= 1, got 0"),
        (dict(batch_size=4, criterion="learnabilty"), "criterion must be one of"),
        (dict(batch_size=4, loss="hinge"), "loss must be one of"),
        (dict(batch_size=4, selection="greedy"), "selection must be one of"),
    ],
)
def test_selector_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        JointSelector(**kwargs)


def test_selector_bad_embeddings():
    lrn, ref = model_embeddings(16, seed=1), model_embeddings(16, seed=2)
    sel = JointSelector(batch_size=4, n_chunks=2)
    nan = lrn.image.clone()
    nan[3, 1] = float("nan")
    inf = ref.text.clone()
    inf[15, 0] = float("-inf")
    cases = [
        ((ModelEmbeddings(nan, lrn.text, 10.0), ref), "learner image_emb contains NaN"),
        ((lrn, ModelEmbeddings(ref.image, inf, 10.0, -5.0)), "reference text_emb contains NaN "
                                                             "or Inf"),
        ((lrn, ModelEmbeddings(ref.image, ref.text[:8], 10.0)), "reference image_emb and "
                                                                "text_emb must have the same"),
        ((lrn, model_embeddings(12, seed=3)), "same super-batch"),
        ((lrn, None), "needs reference embeddings"),
        ((None, ref), "needs learner embeddings"),
        ((ModelEmbeddings(lrn.image, lrn.text, -1.0), ref), "logit_scale must be > 0"),
        ((ModelEmbeddings(lrn.image, lrn.text, float("inf")), ref), "logit_scale must be fin"),
        ((lrn, ModelEmbeddings(ref.image, ref.text, 1.0, float("nan"))), "logit_bias must be"),
    ]
    for (a, b), match in cases:
        with pytest.raises(ValueError, match=match):
            sel(a, b)
    with pytest.raises(ValueError, match="learner image_emb contains NaN"):  # the other path
        JointSelector(batch_size=4, n_chunks=2, require_normalized=False)(
            ModelEmbeddings(nan, lrn.text, 10.0, -5.0), ref)
    with pytest.raises(TypeError, match="learner must be a ModelEmbeddings"):
        sel("embeddings", ref)
    with pytest.raises(ValueError, match=r"batch_size must be in \[1, 3\]"):
        JointSelector(batch_size=4, n_chunks=2)(model_embeddings(3), model_embeddings(3, seed=1))
    # b = round(16 * 0.1) = 2 < 16 chunks: the error says why and which N would do.
    with pytest.raises(ValueError, match=r"N = 16 keeps b = 2 examples \(round\(N \* \(1 - "
                                         r"filter_ratio=0.9\)\), at least 1\), fewer than "
                                         r"n_chunks = 16: give at least N = 156"):
        JointSelector(filter_ratio=0.9, n_chunks=16)(lrn, ref)
    # The README's numbers: at f = 0.8, N = 77 keeps 15 < 16, N = 78 keeps 16.
    with pytest.raises(ValueError, match="give at least N = 78"):
        JointSelector(filter_ratio=0.8)(model_embeddings(77), model_embeddings(77, seed=1))
    assert len(JointSelector(filter_ratio=0.8)(model_embeddings(78),
                                                model_embeddings(78, seed=1))) == 16


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16,
                                   torch.bfloat16])
def test_selector_refuses_embeddings_that_are_not_unit_vectors(dtype):
    """open_clip's encode_image without normalize=True gives rows of norm ~10: t u . v is
    then ~100x too large and the draw is near-greedy on meaningless scores. Refused, with the
    argument, the norms seen and the fix; require_normalized=False lets such a model in."""
    lrn, ref = model_embeddings(32, seed=1), model_embeddings(32, seed=2)
    lrn = ModelEmbeddings(lrn.image.to(dtype), lrn.text.to(dtype), 10.0, -10.0)
    ref = ModelEmbeddings(ref.image.to(dtype), ref.text.to(dtype), 10.0, -10.0)
    sel = JointSelector(batch_size=8, n_chunks=4)
    g = torch.Generator().manual_seed(0)
    assert len(sel(lrn, ref, generator=g)) == 8  # unit rows, rounded to dtype: accepted
    for which, scale_row in (("reference text", 0), ("learner image", 31)):
        bad_l, bad_r = lrn.image.clone(), ref.text.clone()
        target = bad_r if which == "reference text" else bad_l
        target[scale_row] *= 1.1  # one row 10% long is enough
        args = (ModelEmbeddings(bad_l, lrn.text, 10.0, -10.0),
                ModelEmbeddings(ref.image, bad_r, 10.0, -10.0))
        with pytest.raises(ValueError, match=rf"{which} embeddings must be L2-normalised "
                                             r"\(every row, one example of the \[N, d\] tensor, "
                                             r"of norm within .* of 1\), got norms in "
                                             r"\[(1|0\.99\d*), 1\.1\] over 32 rows.*"
                                             r"normalize=True.*"
                                             r"require_normalized=False"):
            sel(*args, generator=g)
        loose = JointSelector(batch_size=8, n_chunks=4, require_normalized=False)
        assert len(loose(*args, generator=g)) == 8
    # A zero row (an empty caption embedded as zeros, say) is not a unit vector either.
    zero = lrn.text.clone()
    zero[5] = 0
    with pytest.raises(ValueError, match=r"learner text .* got norms in \[0, 1(\.00\d*)?\]"):
        sel(ModelEmbeddings(lrn.image, zero, 10.0, -10.0), ref, generator=g)
    # Normalised in bfloat16, then cast up (open_clip under bf16 autocast): still unit rows
    # to within bfloat16's rounding, and accepted whatever the dtype now is.
    up = ModelEmbeddings(F.normalize(lrn.image.bfloat16(), dim=-1).to(dtype),
                         F.normalize(lrn.text.bfloat16(), dim=-1).to(dtype), 10.0, -10.0)
    assert len(sel(up, ref, generator=g)) == 8
    # uniform reads no embedding values: any rows will do.
    assert len(JointSelector("uniform", batch_size=8)(
        ModelEmbeddings(10 * lrn.image, lrn.text, 10.0, -10.0), None, generator=g)) == 8
    with pytest.raises(TypeError, match="require_normalized must be a bool"):
        JointSelector(batch_size=8, n_chunks=4, require_normalized="yes")


def test_sigmoid_loss_refuses_embeddings_without_a_bias():
    """A 3-tuple (open_clip's CLIP output: no logit_bias) used to mean c = 0, a silently
    wrong score for a SigLIP model whose bias is -10. The sigmoid loss now asks for it; the
    softmax loss, which never reads c, and uniform, which reads nothing, take it as it is."""
    lrn, ref = model_embeddings(32, seed=1), model_embeddings(32, seed=2)
    no_bias = (ref.image, ref.text, 10.0)
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"reference logit_bias is missing: the sigmoid loss "
                                         r"needs .* use JointSelector\(loss='softmax'\)"):
        JointSelector(batch_size=8, n_chunks=4)(lrn, no_bias, generator=g)
    with pytest.raises(ValueError, match="learner logit_bias is missing"):
        JointSelector("hard_learner", batch_size=8, n_chunks=4)(
            ModelEmbeddings(lrn.image, lrn.text, 10.0), None, generator=g)
    # An explicit 0.0 is a bias of 0, and scores as the 4-tuple with 0.0 does.
    zero = JointSelector(batch_size=8, n_chunks=4)(lrn, (*no_bias, 0.0),
                                                   generator=torch.Generator().manual_seed(1))
    same = JointSelector(batch_size=8, n_chunks=4)(
        lrn, ModelEmbeddings(ref.image, ref.text, 10.0, 0.0),
        generator=torch.Generator().manual_seed(1))
    assert torch.equal(zero, same)
    soft = JointSelector(batch_size=8, n_chunks=4, loss="softmax")
    assert torch.equal(soft(lrn, no_bias, generator=torch.Generator().manual_seed(2)),
                       soft(lrn, (*no_bias, -10.0), generator=torch.Generator().manual_seed(2)))
    # (uniform draws no chunks, so the default n_chunks = 16 > b = 8 is no error for it)
    assert len(JointSelector("uniform", batch_size=8)(None, no_bias, generator=g)) == 8


def test_log_temperature_is_warned_about_once():
    """open_clip's model.logit_scale is log t; passed as is (2.3 for t = 10) it flattens every
    score without an error. A warning, once per selector, names it and the fix."""
    lrn, ref = model_embeddings(32, seed=1), model_embeddings(32, seed=2)
    sel = JointSelector(batch_size=8, n_chunks=4)
    log_t = ModelEmbeddings(lrn.image, lrn.text, math.log(10.0), -10.0)
    with pytest.warns(UserWarning, match=r"learner logit_scale t = 2.303 is small .* "
                                         r"model.logit_scale.exp\(\)") as record:
        sel(log_t, ref)
    assert record[0].filename == __file__  # points at the caller's line
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel(log_t, ref)  # once per selector
        JointSelector(batch_size=8, n_chunks=4)(lrn, ref)  # t = 10: no warning
        JointSelector("uniform", batch_size=8)(log_t, ref)  # uniform reads no t


def test_numpy_scalars_are_numbers_and_strings_are_not():
    lrn, ref = model_embeddings(40, seed=1), model_embeddings(40, seed=2)
    g = torch.Generator().manual_seed(0)
    a = JointSelector(filter_ratio=np.float32(0.8), n_chunks=np.int64(4))(lrn, ref, generator=g)
    assert len(a) == 8
    assert len(JointSelector(batch_size=np.int64(8), n_chunks=4)(lrn, ref, generator=g)) == 8
    with pytest.raises(TypeError, match="filter_ratio must be a float"):
        JointSelector(filter_ratio=np.bool_(True))
    with pytest.raises(TypeError, match="learner logit_scale must be a float or a one-element"):
        JointSelector(batch_size=8, n_chunks=4)((lrn.image, lrn.text, "10", -10.0), ref)
    # A bool would be read as t = 1 or c = 0: refused, Python's, numpy's or torch's.
    for flag in (True, np.bool_(True), torch.tensor(False)):
        with pytest.raises(TypeError, match="reference logit_bias must be a float"):
            JointSelector(batch_size=8, n_chunks=4)(lrn, (ref.image, ref.text, 10.0, flag))
    # numpy numbers and a 0-d array are numbers: the same selection as Python floats.
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    sel = JointSelector(batch_size=8, n_chunks=4)
    assert torch.equal(
        sel(lrn, (ref.image, ref.text, np.float32(ref.logit_scale), np.array(ref.logit_bias)),
            generator=g1),
        sel(lrn, ref, generator=g2))
    with pytest.raises(TypeError, match="chunk_logits must be a list"):
        JointSelector(batch_size=8, n_chunks=4)(lrn, ref, chunk_logits=())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_device_without_cuda_is_refused_up_front():
    with pytest.raises(ValueError, match=r"device='cuda', but CUDA is not available"):
        JointSelector(batch_size=8, n_chunks=4, device="cuda")
    with pytest.raises(ValueError, match=r"device='cuda:1', but CUDA is not available"):
        uniform_select(16, 4, device="cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_selector_mismatched_devices():
    lrn, ref = model_embeddings(16, seed=1), model_embeddings(16, seed=2)
    cuda_ref = ModelEmbeddings(ref.image.cuda(), ref.text.cuda(), 10.0, -5.0)
    with pytest.raises(ValueError, match="different devices"):
        JointSelector(batch_size=4, n_chunks=2)(lrn, cuda_ref)
    idx = JointSelector(batch_size=4, n_chunks=2, device="cuda")(lrn, cuda_ref)
    assert idx.device.type == "cuda"


def test_selector_mismatched_devices_cpu_meta():
    # Without CUDA, the device check is exercised with the meta device.
    lrn = model_embeddings(16, seed=1)
    meta = ModelEmbeddings(torch.empty(16, 8, device="meta"), torch.empty(16, 8, device="meta"),
                           1.0)
    with pytest.raises(ValueError, match="different devices"):
        JointSelector(batch_size=4, n_chunks=2)(lrn, meta)


# --- found in review ---------------------------------------------------------------------


def test_temperature_scales_the_law():
    """P(i) prop. to exp(A_ii / temperature); ignoring or inverting temperature is rejected."""
    a = random_scores(6, seed=11, scale=1.0)
    diag, draws, tau = a.diagonal(), 30000, 0.5
    gen = torch.Generator().manual_seed(1)
    counts = Counter(joint_select(a, 1, n_chunks=1, generator=gen, temperature=tau).item()
                     for _ in range(draws))

    def law(logits):
        return {i: p.item() for i, p in enumerate(torch.softmax(logits, 0))}

    assert chi_square_pvalue(counts, law(diag / tau), draws) > 1e-3
    assert chi_square_pvalue(counts, law(diag), draws) < 1e-6
    assert chi_square_pvalue(counts, law(diag * tau), draws) < 1e-6
    # A vanishing temperature is the greedy limit, never an overflow.
    assert joint_select(torch.tensor([[1.0, 0], [0, 2.0]], dtype=torch.float64), 1,
                        n_chunks=1, temperature=1e-320).tolist() == [1]
    assert joint_select(torch.tensor([[1.0, 0], [0, 2.0]]), 1, n_chunks=1,
                        temperature=1e-40).tolist() == [1]


def test_half_precision_scores_accumulate_in_float32():
    a = random_scores(64, seed=2).to(torch.bfloat16)
    logs_half, logs_full = [], []
    x = joint_select(a, 24, n_chunks=4, generator=torch.Generator().manual_seed(0),
                     chunk_logits=logs_half)
    y = joint_select(a.float(), 24, n_chunks=4, generator=torch.Generator().manual_seed(0),
                     chunk_logits=logs_full)
    assert torch.equal(x, y)
    assert all(t.dtype == torch.float32 for t in logs_half)


def test_selector_builds_no_autograd_graph():
    lrn, ref = model_embeddings(64, seed=1), model_embeddings(64, seed=2)
    grad_lrn = ModelEmbeddings(lrn.image.clone().requires_grad_(), lrn.text, 10.0, -5.0)
    logs = []
    for selection in ("joint", "independent"):
        JointSelector(batch_size=16, n_chunks=4, selection=selection)(
            grad_lrn, ref, chunk_logits=logs)
    assert logs and not any(t.requires_grad or t.grad_fn is not None for t in logs)


@pytest.mark.parametrize("block", [1 << 22, 97])  # the [N, N] fast path, and row blocks
def test_easy_reference_selector_equals_dense(block):
    ref = model_embeddings(40, seed=2, scale=6.0, bias=-2.0)
    dense = easy_reference(None, pairwise_sigmoid_loss(ref.image, ref.text, 6.0, -2.0))
    logs_d, logs_e = [], []
    x = joint_select(dense, 10, n_chunks=5, generator=torch.Generator().manual_seed(2),
                     chunk_logits=logs_d)
    y = JointSelector("easy_reference", batch_size=10, n_chunks=5, max_block_elements=block)(
        None, ref, generator=torch.Generator().manual_seed(2), chunk_logits=logs_e)
    assert torch.equal(x, y)
    for u, v in zip(logs_d, logs_e, strict=True):
        finite = ~torch.isinf(u)
        assert torch.allclose(u[finite], v[finite], atol=1e-10)


def test_unused_embeddings_are_ignored_and_bad_types_named():
    lrn = model_embeddings(32, seed=1)
    other = model_embeddings(20, seed=2)  # another N: irrelevant to hard_learner
    idx = JointSelector("hard_learner", batch_size=8, n_chunks=2)(lrn, other)
    assert idx.numel() == 8
    with pytest.raises(TypeError, match="learner image_emb must be a torch.Tensor"):
        JointSelector(batch_size=8, n_chunks=2)((lrn.image.tolist(), lrn.text, 10.0), lrn)
    with pytest.raises(ValueError, match="criterion must be one of"):
        JointSelector(["learnability"], batch_size=8)


@pytest.mark.parametrize("selection", ["joint", "independent"])
def test_selector_temperature_scales_the_law(selection):
    """Found in review: JointSelector's temperature was tested only at 0 (greedy), so a
    selector that ignored every other temperature passed. One pick from N = 6: P(i) is
    softmax(score_i / T), score = A_ii for the joint sampler's first chunk and the example's
    share (A_i. + A_.i) / 2 for independent selection."""
    lrn, ref = model_embeddings(6, seed=3), model_embeddings(6, seed=4)
    a = dense_learnability(lrn, ref)
    score = a.diagonal() if selection == "joint" else (a.sum(1) + a.sum(0)) / 2
    assert float(score.max() - score.min()) > 1.0  # laws at T and 2T far apart
    tau, draws = 0.5, 6000
    sel = JointSelector(batch_size=1, n_chunks=1, selection=selection, temperature=tau)
    gen = torch.Generator().manual_seed(5)
    counts = Counter(sel(lrn, ref, generator=gen).item() for _ in range(draws))

    def law(logits):
        return {i: p.item() for i, p in enumerate(torch.softmax(logits, 0))}

    assert chi_square_pvalue(counts, law(score / tau), draws) > 1e-3
    assert chi_square_pvalue(counts, law(score), draws) < 1e-6  # temperature ignored


@pytest.mark.parametrize("temperature", [1e39, 1e300])
def test_huge_temperature_is_uniform_not_a_tie_at_the_float_max(temperature):
    """Found in review: the noise was scaled by T and clamped to the float's range, so for
    T > ~4e36 most candidates tied at the maximum and ties went by index: counts like
    [78, 930, 542, 1241, 133, 76] where the law, softmax(A_ii / T), is uniform."""
    a = random_scores(6, seed=0, scale=3.0).float()
    draws = 6000
    gen = torch.Generator().manual_seed(1)
    uniform_law = {i: 1 / 6 for i in range(6)}
    for draw in (lambda: joint_select(a, 1, n_chunks=1, generator=gen, temperature=temperature),
                 lambda: independent_select(a.diagonal(), 1, generator=gen,
                                            temperature=temperature)):
        counts = Counter(draw().item() for _ in range(draws))
        assert chi_square_pvalue(counts, uniform_law, draws) > 1e-3


def test_joint_select_checks_chunk_logits_before_any_work():
    with pytest.raises(TypeError, match="chunk_logits must be a list"):
        joint_select(random_scores(8, seed=0), 4, n_chunks=2, chunk_logits=())


@pytest.mark.parametrize(
    "device, match",
    [
        ("gpu", r"device must be a torch device such as 'cpu' or 'cuda:0'.*'gpu'"),
        (1.5, r"device must be a torch device.*1\.5"),
        ("meta", "device='meta' holds no values"),
    ],
)
def test_bad_devices_are_named(device, match):
    # Found in review: torch's own errors, one 7 frames deep in torch (meta).
    with pytest.raises(ValueError, match=match):
        JointSelector(batch_size=4, n_chunks=2, device=device)


@pytest.mark.skipif(torch.backends.mps.is_available(), reason="checks a machine without MPS")
def test_a_backend_this_torch_lacks_is_refused_up_front():
    with pytest.raises(ValueError, match=r"device='mps' is not usable here"):
        JointSelector(batch_size=4, n_chunks=2, device="mps")
