"""A plain dense JEST selector: the baseline of `selection_speed.py`.

This is the published pseudo-code of joint example selection (Evans et al. 2024, BRIEF 3),
written directly in torch and deliberately *independent of jestkit* (nothing from
``jestkit.selection`` or ``jestkit.scoring`` is imported), so the benchmark compares the
library against an outside baseline rather than against itself.

What it does, as the pseudo-code does:

1. build both models' dense N x N sigmoid (SigLIP) loss matrices from the embeddings,
       l_ij = -log sigmoid(y_ij (t u_i . v_j + c)),  y_ii = +1, y_ij = -1 otherwise;
2. the learnability matrix A = L - R;
3. first chunk: n indices without replacement with P proportional to softmax(diag(A));
4. each later chunk: an ``is_sampled`` 0/1 mask vector of the chosen set,
       logits = diag(A) + (A * mask[:, None]).sum(0) + (A * mask[None, :]).sum(1),
   chosen ones pushed to -1e8 (excluded), and n more drawn without replacement from
   softmax(logits) (``torch.multinomial`` on the probabilities; torch's softmax subtracts the
   maximum first, so nothing overflows).

It is O(N^2) in memory and in time per chunk, which is the point: it is the baseline. Peak
memory is about four N x N float32 matrices (L, R, A and one masked product), i.e. 16 N^2
bytes. The loss matrices are built without any N x N label matrix (the diagonal is patched
in place), so the baseline is not inflated beyond what the pseudo-code needs.

Chunk sizes follow the same rule as jestkit (the first ``b % K`` chunks take one extra
index), so both selectors return exactly b indices for the same (N, f, K).
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["dense_chunk_sizes", "dense_jest", "dense_joint_select", "sigmoid_loss_matrix"]


def dense_chunk_sizes(batch_size: int, n_chunks: int) -> list[int]:
    """K chunk sizes summing to batch_size; the first ``batch_size % n_chunks`` get one more."""
    base, extra = divmod(batch_size, n_chunks)
    return [base + 1] * extra + [base] * (n_chunks - extra)


def sigmoid_loss_matrix(image: Tensor, text: Tensor, logit_scale: float,
                        logit_bias: float) -> Tensor:
    """Dense [N, N] per-pair SigLIP loss: softplus(z) off the diagonal, softplus(-z) on it,
    with z = t * image @ text.T + c (since -log sigmoid(-z) = softplus(z))."""
    z = image @ text.T
    z.mul_(logit_scale).add_(logit_bias)
    diag = z.diagonal().clone()
    loss = F.softplus(z)
    del z
    loss.diagonal().copy_(F.softplus(-diag))
    return loss


def dense_joint_select(scores: Tensor, sizes: list[int],
                       generator: torch.Generator | None = None) -> Tensor:
    """The pseudo-code's blocked sampler on a dense score matrix A (learnability = L - R)."""
    n = scores.shape[0]
    logits_ii = scores.diagonal().clone()
    inds = torch.multinomial(torch.softmax(logits_ii, dim=0), sizes[0], replacement=False,
                             generator=generator)
    for size in sizes[1:]:
        is_sampled = torch.zeros(n, dtype=scores.dtype)
        is_sampled[inds] = 1.0
        logits_ij = (scores * is_sampled[:, None]).sum(dim=0)  # sum_{i in S} A_ij
        logits_ji = (scores * is_sampled[None, :]).sum(dim=1)  # sum_{j in S} A_ij for row i
        logits = logits_ii + logits_ij + logits_ji
        logits = logits - is_sampled * 1e8  # remove the already sampled examples
        new = torch.multinomial(torch.softmax(logits, dim=0), size, replacement=False,
                                generator=generator)
        inds = torch.cat([inds, new])
    return inds


def dense_jest(learner: tuple, reference: tuple, batch_size: int, *, n_chunks: int = 16,
               generator: torch.Generator | None = None,
               timings: dict | None = None) -> Tensor:
    """Dense JEST (learnability) from embeddings.

    Args:
        learner, reference: ``(image [N, d], text [N, d], logit_scale t, logit_bias c)``, with
            t already exponentiated.
        batch_size: b.
        n_chunks: K.
        generator: torch.Generator for the draws.
        timings: if a dict, ``build_s`` (the two loss matrices and A) and ``select_s`` (the
            chunk loop) are stored in it.

    Returns:
        LongTensor [batch_size] of distinct indices, in the order drawn.
    """
    t0 = time.perf_counter()
    learner_loss = sigmoid_loss_matrix(*learner)
    ref_loss = sigmoid_loss_matrix(*reference)
    scores = learner_loss - ref_loss  # learnability
    t1 = time.perf_counter()
    inds = dense_joint_select(scores, dense_chunk_sizes(batch_size, n_chunks), generator)
    t2 = time.perf_counter()
    if timings is not None:
        timings["build_s"] = t1 - t0
        timings["select_s"] = t2 - t1
    return inds
