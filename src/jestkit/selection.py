"""Joint example selection: pick a sub-batch of b out of a super-batch of N.

The blocked sampler (BRIEF 3, Evans et al. 2024). With an additive score matrix A whose block
sums score sub-batches, it draws the sub-batch in K chunks:

  1. the first chunk: n indices without replacement, P(i) proportional to exp(A_ii);
  2. every later chunk: for each candidate i not yet chosen,
         logit_i = A_ii + sum_{j in S} (A_ij + A_ji)   ( = s(S + {i}) - s(S) ),
     and n more indices without replacement, P proportional to exp(logit).

"Without replacement, proportional to exp(logit)" is drawn as the top-n of logit + Gumbel
noise (the Gumbel-top-k trick): one vectorised draw per chunk, exact, and it never
exponentiates anything, so no logit is too large (the max-subtraction a softmax would need
is not even required). The indices come back in the order drawn: chunk by chunk, and inside
a chunk in the order of a sequential draw (the Plackett-Luce order of the top-k).

Chunk sizes when batch_size is not a multiple of n_chunks: the first ``batch_size % n_chunks``
chunks get one extra index (`chunk_sizes`), e.g. b = 10, K = 3 -> sizes 4, 3, 3.

Two ways in:
- `joint_select` on a dense [N, N] score matrix (small N, tests, custom scores);
- `JointSelector`, from the two models' *embeddings*: it computes only the rows and columns
  of A against each newly chosen chunk, block by block, so memory grows as O(N * block) and
  never O(N^2). For the sigmoid loss its conditional logits equal `joint_select`'s on the
  dense learnability matrix, chunk by chunk. For the softmax (CLIP) loss it uses a
  conditional score (see `JointSelector`).

Nothing here touches torch's global RNG: every random draw takes a `torch.Generator`
(a fresh, OS-seeded one when none is given). Nothing here calls torch.distributed either:
a multi-process caller gathers the super-batch's embeddings first and selects once.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor

from jestkit.scoring import (
    CRITERIA,
    LOSSES,
    USES_LEARNER,
    USES_REFERENCE,
    _as_scalar,
    all_finite,
    check_device,
    check_embeddings,
    check_unit_rows,
    compute_dtype,
    get_criterion,
)

__all__ = [
    "JointSelector",
    "ModelEmbeddings",
    "chunk_sizes",
    "independent_select",
    "joint_select",
    "uniform_select",
]

SELECTIONS = ("joint", "independent")


# --- validation helpers ----------------------------------------------------------------------


def _check_int(value: object, name: str) -> int:
    # numbers.Integral: numpy's integers too (np.int64(20) from a config array), never bools.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    return int(value)


def _check_batch_size(batch_size: object, n: int) -> int:
    batch_size = _check_int(batch_size, "batch_size")
    if not 1 <= batch_size <= n:
        raise ValueError(f"batch_size must be in [1, {n}] (the super-batch size), got {batch_size}")
    return batch_size


def _check_n_chunks(n_chunks: object, batch_size: int) -> int:
    n_chunks = _check_int(n_chunks, "n_chunks")
    if not 1 <= n_chunks <= batch_size:
        raise ValueError(f"n_chunks must be in [1, batch_size={batch_size}], got {n_chunks}")
    return n_chunks


def _check_temperature(temperature: object) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float >= 0, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite float >= 0, got {temperature}")
    return float(temperature)


def _generator(generator: object, device: torch.device) -> torch.Generator:
    """The caller's generator, or a fresh OS-seeded one: never torch's global RNG."""
    if generator is None:
        generator = torch.Generator(device=device)
        generator.seed()
        return generator
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, "
                        f"got {type(generator).__name__}")
    return generator


def _check_scores(scores: object, name: str = "scores", ndims: Sequence[int] = (2,)) -> Tensor:
    if not isinstance(scores, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {scores.dtype}")
    if scores.ndim not in ndims:
        raise ValueError(f"{name} must have {' or '.join(map(str, ndims))} dims, "
                         f"got shape {tuple(scores.shape)}")
    if scores.ndim == 2 and scores.shape[0] != scores.shape[1]:
        raise ValueError(f"{name} must be a square [N, N] matrix, got shape {tuple(scores.shape)}")
    if scores.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(scores.shape)}")
    if not all_finite(scores):
        raise ValueError(f"{name} contains NaN or Inf")
    # Accumulate gains in float32 (float64 stays float64), whatever the input dtype: bf16
    # sums over hundreds of chosen examples would be off by whole nats.
    return scores.to(compute_dtype(scores))


# --- the sampler -----------------------------------------------------------------------------


def chunk_sizes(batch_size: int, n_chunks: int) -> list[int]:
    """Sizes of the K chunks a sub-batch of `batch_size` is drawn in.

    The first ``batch_size % n_chunks`` chunks take one extra index, so sizes differ by at most
    one and sum to batch_size: ``chunk_sizes(10, 3) == [4, 3, 3]``.
    """
    batch_size = _check_int(batch_size, "batch_size")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n_chunks = _check_n_chunks(n_chunks, batch_size)
    base, extra = divmod(batch_size, n_chunks)
    return [base + 1] * extra + [base] * (n_chunks - extra)


def _gumbel(shape: tuple[int, ...], dtype: torch.dtype, generator: torch.Generator,
            device: torch.device, temperature: float) -> Tensor | None:
    """Gumbel noise -log(Exp(1)) of `shape`, every entry finite, drawn on the generator's
    device: times the temperature when it is below 1, standard above (`_top_k` then divides
    the logits by it instead, which cannot overflow however large it is); None for
    temperature 0 (the greedy limit needs no noise)."""
    if temperature == 0:
        return None
    exp_noise = torch.empty(shape, dtype=dtype, device=generator.device)
    exp_noise.exponential_(generator=generator)
    # Finite noise keeps excluded entries at -inf (-inf + inf would be NaN, which topk picks
    # first): a draw of exactly 0 is clamped to the smallest normal number (it changes a draw
    # only where the law has probability ~1e-38).
    noise = -torch.log(exp_noise.clamp_min_(torch.finfo(dtype).tiny))
    if temperature < 1:
        noise = noise.mul_(temperature)
    return noise.to(device)


_NAN_LOGITS = ("the conditional logits contain NaN: a logit_scale or score so large that "
               "the losses overflowed")
_INF_LOGITS = ("a drawn logit is infinite: the summed losses overflowed (a logit_scale, "
               "logit_bias or score near the float's range)")


def _check_drawn(values: Tensor) -> None:
    """ValueError unless every drawn logit + noise is finite. Inputs are finite, so any
    infinity is an overflow: a NaN, or an -inf shared by every candidate left (topk would
    return already-chosen ones again: duplicates), or a +inf (ties broken by index, not by
    the law). One device sync."""
    if not bool(torch.isfinite(values).all()):
        raise ValueError(_NAN_LOGITS if bool(torch.isnan(values).any()) else _INF_LOGITS)


def _top_k(logits: Tensor, k: int, noise: Tensor | None,
           temperature: float) -> tuple[Tensor, Tensor]:
    """(values, indices) of the k largest logits + noise (from `_gumbel` at `temperature`;
    None: greedy). Below temperature 1 the noise is scaled (logits + T * noise), above it
    the logits (logits / T + noise): the same ranking, and neither can overflow, where
    T * noise would for a huge T and tie most candidates at the float's maximum.

    topk ranks NaN above every number, and the noise is finite, so a NaN logit among the
    candidates always comes out first: ``values[0]`` is NaN exactly when one was drawn.
    """
    if noise is None:
        return torch.topk(logits, k)
    return torch.topk((logits / temperature if temperature > 1 else logits) + noise, k)


def _gumbel_top_k(logits: Tensor, k: int, generator: torch.Generator,
                  temperature: float) -> Tensor:
    """k indices without replacement with P proportional to exp(logits / temperature).

    Top-k of logits/temperature + Gumbel noise is an exact draw of k items in sequential
    (Plackett-Luce) order; logits + temperature * noise ranks the same and cannot overflow
    for a tiny temperature. Entries at -inf are never drawn. temperature 0 is the greedy
    (deterministic) limit. Noise is drawn in logits' dtype on the generator's device, so the
    same generator state gives the same draw on any path that produces the same logits.
    """
    values, indices = _top_k(logits, k, _gumbel(logits.shape, logits.dtype, generator,
                                                logits.device, temperature), temperature)
    _check_drawn(values)
    return indices


class _ConditionalLogits(Protocol):
    """The state a blocked sampler needs: current logits of every candidate, and an update."""

    def logits(self) -> Tensor:
        """[N] logits of every candidate given the chunks added so far; a new tensor each
        call (the sampler masks it in place)."""

    def add(self, chunk: Tensor) -> None:
        """Account for the newly chosen indices `chunk` (LongTensor [n])."""


def _blocked_sample(state: _ConditionalLogits, n: int, sizes: list[int],
                    generator: torch.Generator, temperature: float,
                    chunk_logits: list[Tensor] | None) -> Tensor:
    """Draw chunk after chunk; already chosen candidates are excluded (logit -inf)."""
    chosen = None
    drawn: list[Tensor] = []
    # Every chunk's noise in one draw (`_gumbel_top_k` per chunk, with the noise drawn up
    # front): the chunks' draws are independent whatever the logits, and with few candidates
    # the per-call cost of K draws is a measurable share of the selector's time.
    noise = None
    drawn_values: list[Tensor] = []  # every drawn logit + noise, checked once at the end
    for k, size in enumerate(sizes):
        logits = state.logits()
        if k == 0:
            noise = _gumbel((len(sizes), n), logits.dtype, generator, logits.device,
                            temperature)
        if chosen is not None:
            logits = logits.masked_fill_(chosen, float("-inf"))  # logits() returns a new tensor
        if chunk_logits is not None:
            chunk_logits.append(logits.detach().clone())
        values, idx = _top_k(logits, size, None if noise is None else noise[k], temperature)
        drawn_values.append(values)
        drawn.append(idx)
        if k + 1 < len(sizes):  # the last chunk's gains are never needed
            if chosen is None:
                chosen = torch.zeros(n, dtype=torch.bool, device=logits.device)
            chosen[idx] = True
            state.add(idx)
    # One check for all chunks (a per-chunk check costs a device sync each); nothing drawn
    # is returned if a NaN logit was among any chunk's candidates, or an infinite one drawn.
    _check_drawn(torch.cat(drawn_values))
    return torch.cat(drawn)


class _DenseAdditive:
    """Conditional logits from a dense additive score matrix A (the published pseudo-code's
    maths, updated incrementally: each chunk adds its rows and columns, O(N * n) per chunk)."""

    def __init__(self, scores: Tensor):
        self.scores = scores
        self.diag = scores.diagonal().clone()
        self.gain = torch.zeros_like(self.diag)

    def logits(self) -> Tensor:
        return self.diag + self.gain

    def add(self, chunk: Tensor) -> None:
        self.gain += self.scores[:, chunk].sum(dim=1) + self.scores[chunk, :].sum(dim=0)


def joint_select(
    scores: Tensor,
    batch_size: int,
    *,
    n_chunks: int = 16,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
    chunk_logits: list[Tensor] | None = None,
) -> Tensor:
    """JEST's blocked joint sampler on a dense additive score matrix.

    Args:
        scores: [N, N] score matrix A (e.g. ``learnability(L, R)`` of two pairwise loss
            matrices); a sub-batch S scores ``A[S][:, S].sum()``.
        batch_size: b, the sub-batch size, in [1, N].
        n_chunks: K, the number of chunks, in [1, b] (paper default 16); see `chunk_sizes`.
        generator: the source of randomness (never the global RNG).
        temperature: sample proportional to exp(logit / temperature); 0 means greedy.
        chunk_logits: if a list is given, the [N] conditional logits of every chunk are
            appended to it (already chosen candidates at -inf), for inspection and tests.

    Returns:
        LongTensor [batch_size] of distinct indices into the super-batch, in the order drawn.
    """
    if chunk_logits is not None and not isinstance(chunk_logits, list):
        raise TypeError(f"chunk_logits must be a list to append to (or None), got "
                        f"{type(chunk_logits).__name__}")
    scores = _check_scores(scores)
    batch_size = _check_batch_size(batch_size, scores.shape[0])
    n_chunks = _check_n_chunks(n_chunks, batch_size)
    temperature = _check_temperature(temperature)
    generator = _generator(generator, scores.device)
    return _blocked_sample(_DenseAdditive(scores), scores.shape[0],
                           chunk_sizes(batch_size, n_chunks), generator, temperature,
                           chunk_logits)


def independent_select(
    scores: Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    temperature: float = 1.0,
) -> Tensor:
    """The independent-selection ablation: every example scored alone, b drawn in one go.

    Args:
        scores: either [N] per-example scores, or an [N, N] additive score matrix A, reduced
            to each example's own share of the super-batch's score,
            ``(A[i, :].sum() + A[:, i].sum()) / 2`` (these shares sum to ``A.sum()``, just as
            per-example losses sum to the batch loss). Only for sigmoid-loss matrices: a
            softmax loss is not a sum of pair terms (for CLIP's per-example loss pass the
            diagonal of `pairwise_softmax_loss`, or use ``JointSelector(loss="softmax",
            selection="independent")``).
        batch_size: b in [1, N].

    Returns:
        LongTensor [batch_size]: b distinct indices drawn without replacement with
        P proportional to exp(score / temperature), in the order drawn.
    """
    scores = _check_scores(scores, ndims=(1, 2))
    if scores.ndim == 2:
        scores = (scores.sum(dim=1) + scores.sum(dim=0)) / 2
    batch_size = _check_batch_size(batch_size, scores.shape[0])
    temperature = _check_temperature(temperature)
    generator = _generator(generator, scores.device)
    return _gumbel_top_k(scores, batch_size, generator, temperature)


def uniform_select(
    super_batch_size: int,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> Tensor:
    """The uniform baseline: b of N indices uniformly at random without replacement.

    Returns:
        LongTensor [batch_size] on `device` (default: the generator's device, else CPU).
    """
    n = _check_int(super_batch_size, "super_batch_size")
    if n < 1:
        raise ValueError(f"super_batch_size must be >= 1, got {n}")
    batch_size = _check_batch_size(batch_size, n)
    device = check_device(device)
    generator = _generator(generator, device if device is not None else torch.device("cpu"))
    idx = torch.randperm(n, generator=generator, device=generator.device)[:batch_size]
    return idx.to(device) if device is not None else idx


# --- the memory-linear selector from embeddings ----------------------------------------------


@dataclass(frozen=True)
class ModelEmbeddings:
    """One model's view of a super-batch.

    Attributes:
        image: [N, d] image embeddings (L2-normalised, as the model outputs them).
        text: [N, d] text embeddings of the same pairs, same order.
        logit_scale: the temperature multiplier t, already exponentiated (open_clip's
            ``logit_scale.exp()``); a float or one-element tensor.
        logit_bias: the sigmoid loss's learned bias c (open_clip SigLIP's ``logit_bias``);
            required by the sigmoid loss, ignored by the softmax loss. None (the default,
            and a 3-tuple) means the model has none: the sigmoid loss then refuses it
            rather than assume c = 0 (a CLIP model's embeddings with the sigmoid loss, say);
            a SigLIP model whose bias is really 0 passes 0.0.
    """

    image: Tensor
    text: Tensor
    logit_scale: float | Tensor
    logit_bias: float | Tensor | None = None


class _Model:
    """Validated embeddings of one model in the compute dtype, t folded into the images."""

    def __init__(self, emb: ModelEmbeddings, what: str, device: torch.device | None,
                 dtype: torch.dtype, max_block_elements: int, needs_bias: bool = True):
        image, text = emb.image, emb.text
        if device is not None:
            image, text = image.to(device), text.to(device)
        self.dtype = dtype
        self.max_block_elements = max_block_elements
        self.t = _as_scalar(emb.logit_scale, f"{what} logit_scale", self.dtype, image.device)
        self.t_value = float(self.t)  # one read, for the checks here and the selector's
        if self.t_value <= 0:
            raise ValueError(f"{what} logit_scale must be > 0 (it is t, already exponentiated), "
                             f"got {self.t_value}")
        bias = emb.logit_bias
        if bias is None:
            if needs_bias:
                raise ValueError(
                    f"{what} logit_bias is missing: the sigmoid loss needs the model's learned "
                    f"bias c (open_clip SigLIP: model.logit_bias; a 4-tuple (image, text, "
                    f"logit_scale, logit_bias)). A CLIP model has no bias: use "
                    f"JointSelector(loss='softmax'); a bias that is really 0: pass 0.0")
            bias = 0.0  # the softmax loss never reads c
        self.c = _as_scalar(bias, f"{what} logit_bias", self.dtype, image.device)
        # t * u_i . v_j is all the maths ever needs; scaling the images once saves a multiply
        # per pair in every block.
        self.scaled_image = self.t * image.to(self.dtype)
        self.text = text.to(self.dtype)
        self.n = image.shape[0]
        self.device = image.device
        self.diag_z = (self.scaled_image * self.text).sum(dim=1)  # t u_i . v_i  [N]

    def blocks(self, cols: Tensor):
        """Yield (rows, z_rc, z_cr): z_rc[a, b] = t u_{rows[a]} . v_{cols[b]} and
        z_cr[a, b] = t u_{cols[b]} . v_{rows[a]}, bias excluded, for row blocks of all N,
        each block at most max_block_elements large (at least one row: |cols| entries)."""
        image_c, text_c = self.scaled_image[cols], self.text[cols]
        block_rows = max(1, self.max_block_elements // max(1, image_c.shape[0]))
        for start in range(0, self.n, block_rows):
            rows = slice(start, min(start + block_rows, self.n))
            yield rows, self.scaled_image[rows] @ text_c.T, self.text[rows] @ image_c.T

    def full_blocks(self):
        """Yield (rows, z): z[a, j] = t u_{rows[a]} . v_j for all N columns, bias excluded,
        for row blocks of all N, each at most max_block_elements large (at least one row: N
        entries). The [N, N] matrix once, in one orientation: a reduction over j is per
        block, one over i accumulates across blocks (z_ji needs no second matmul: it is z
        transposed)."""
        block_rows = max(1, self.max_block_elements // max(1, self.n))
        for start in range(0, self.n, block_rows):
            rows = slice(start, min(start + block_rows, self.n))
            yield rows, self.scaled_image[rows] @ self.text.T


_DENSE_MAX_N = 512  # the largest N whose sigmoid selector builds the [N, N] pair matrix


class _SigmoidState:
    """Conditional logits for the sigmoid loss, from embeddings, block by block.

    A_ij = crit(l^L_ij, l^R_ij) is linear in the two losses, so the gain of a chunk C for
    candidate i is crit applied to each model's sum_{j in C} (l_ij + l_ji). Candidates never
    pair with themselves in that sum (a chosen i is excluded from later chunks), so every
    term is a negative pair: l_ij = softplus(z_ij + c). The diagonal A_ii uses the positive
    term softplus(-(z_ii + c)).
    """

    def __init__(self, learner: _Model | None, reference: _Model | None, criterion):
        self.models = (learner, reference)
        self.criterion = criterion
        diag = [None if m is None else F.softplus(-(m.diag_z + m.c)) for m in self.models]
        self.diag = criterion(*diag)
        self.gain = torch.zeros_like(self.diag)
        # Small super-batches: build the negative-pair matrix crit(l^L, l^R) once (a few
        # [N, N] ops) and let each chunk gather its rows. Same maths as the block path, with
        # a handful of tensor ops per chunk instead of two matmuls and softplus per model.
        # Measured (benchmarks/selector_paths.py: CPU, 1 thread, b = N/5, K = 16): 1.2-2x
        # faster up to N = 320, about even at 512 (0.9-1.5x by embedding dim), slower from
        # 640 on, where the N^2 elementwise work outgrows the per-op overhead.
        # Built on the first chunk, so independent selection never pays for it.
        present = [m for m in self.models if m is not None]
        n = present[0].n
        self.dense = n <= _DENSE_MAX_N and n * n <= min(m.max_block_elements for m in present)
        self.pairs: Tensor | None = None

    def _pair_sums(self, m: _Model, cols: Tensor) -> Tensor:
        """[N]: sum over j in cols of the negative-pair terms l_ij + l_ji."""
        out = torch.empty(m.n, dtype=m.dtype, device=m.device)
        for rows, z_rc, z_cr in m.blocks(cols):
            out[rows] = (F.softplus(z_rc + m.c).sum(dim=1) + F.softplus(z_cr + m.c).sum(dim=1))
        return out

    def _all_pair_sums(self, m: _Model) -> Tensor:
        """[N]: sum over all j of the negative-pair terms l_ij + l_ji (row + column sums of
        one [N, N] pass)."""
        row = torch.empty(m.n, dtype=m.dtype, device=m.device)
        col = torch.zeros(m.n, dtype=m.dtype, device=m.device)
        for rows, z in m.full_blocks():
            terms = F.softplus(z + m.c)
            row[rows] = terms.sum(dim=1)
            col += terms.sum(dim=0)
        return row + col

    def logits(self) -> Tensor:
        return self.diag + self.gain

    def add(self, chunk: Tensor) -> None:
        if self.dense:
            if self.pairs is None:
                terms = [None if m is None else F.softplus(m.scaled_image @ m.text.T + m.c)
                         for m in self.models]
                pairs = self.criterion(*terms)  # [N, N]; its diagonal is never read
                # A chunk's gain is one row gather of A_ij + A_ji. The transpose is copied
                # contiguous first: on CPU that and a contiguous add beat one strided add.
                self.pairs = pairs + pairs.T.contiguous()
            self.gain += self.pairs[chunk].sum(dim=0)
            return
        sums = [None if m is None else self._pair_sums(m, chunk) for m in self.models]
        self.gain += self.criterion(*sums)

    def independent_scores(self) -> Tensor:
        """[N]: each example's share (A_i. + A_.i) / 2 of the super-batch's block sum."""
        shares = []
        for m in self.models:
            if m is None:
                shares.append(None)
                continue
            # All-negative sums, with the i == j term corrected to the positive label:
            # softplus(-z) - softplus(z) = -z, once in the row and once in the column.
            shares.append(self._all_pair_sums(m) / 2 - (m.diag_z + m.c))
        return self.criterion(*shares)


class _SoftmaxState:
    """Conditional scores for the softmax (CLIP) loss, from embeddings.

    A softmax batch loss is not a block sum, so instead of the block-sum gain each candidate
    i is scored by its own symmetric CLIP loss in the batch S + {i}, against the negatives
    already chosen:

        l_i(S) = ( logsumexp(z_ii, z_iS) - z_ii + logsumexp(z_ii, z_Si) - z_ii ) / 2,

    with z = t u . v, and the criterion applied to the two models' l_i(S). The running
    log-sum-exps over S are updated chunk by chunk, O(N * n) per chunk. For the first chunk
    S is empty and l_i = 0 for every i, which carries no information; the first chunk is
    therefore drawn from each example's CLIP loss within the whole super-batch (the
    independent score), computed block by block.
    """

    def __init__(self, learner: _Model | None, reference: _Model | None, criterion):
        self.models = (learner, reference)
        self.criterion = criterion
        empty = [None if m is None else torch.full((m.n,), float("-inf"), dtype=m.dtype,
                                                   device=m.device) for m in self.models]
        # running logsumexp over the chosen set S of z_iS (rows) and z_Si (columns)
        self.row_lse = list(empty)
        self.col_lse = [None if e is None else e.clone() for e in empty]
        self.n_added = 0

    def _lse(self, m: _Model, cols: Tensor) -> tuple[Tensor, Tensor]:
        """([N], [N]): logsumexp over j in cols of z_ij, and of z_ji."""
        row = torch.empty(m.n, dtype=m.dtype, device=m.device)
        col = torch.empty_like(row)
        for rows, z_rc, z_cr in m.blocks(cols):
            row[rows] = torch.logsumexp(z_rc, dim=1)
            col[rows] = torch.logsumexp(z_cr, dim=1)
        return row, col

    def _all_lse(self, m: _Model) -> tuple[Tensor, Tensor]:
        """([N], [N]): logsumexp over all j of z_ij, and of z_ji (row and column reductions
        of one [N, N] pass; the column ones accumulate over the row blocks)."""
        row = torch.empty(m.n, dtype=m.dtype, device=m.device)
        col = torch.full_like(row, float("-inf"))
        for rows, z in m.full_blocks():
            row[rows] = torch.logsumexp(z, dim=1)
            col = torch.logaddexp(col, torch.logsumexp(z, dim=0))
        return row, col

    def _conditional(self, i: int) -> Tensor | None:
        m = self.models[i]
        if m is None:
            return None
        z = m.diag_z
        return (torch.logaddexp(z, self.row_lse[i]) + torch.logaddexp(z, self.col_lse[i])) / 2 - z

    def logits(self) -> Tensor:
        if self.n_added == 0:
            return self.independent_scores()
        return self.criterion(self._conditional(0), self._conditional(1))

    def add(self, chunk: Tensor) -> None:
        for i, m in enumerate(self.models):
            if m is not None:
                row, col = self._lse(m, chunk)
                self.row_lse[i] = torch.logaddexp(self.row_lse[i], row)
                self.col_lse[i] = torch.logaddexp(self.col_lse[i], col)
        self.n_added += chunk.numel()

    def independent_scores(self) -> Tensor:
        """[N]: each example's symmetric CLIP loss within the whole super-batch."""
        losses = []
        for m in self.models:
            if m is None:
                losses.append(None)
                continue
            row, col = self._all_lse(m)
            losses.append((row + col) / 2 - m.diag_z)
        return self.criterion(*losses)


def _check_normalized(given: list[tuple[str, ModelEmbeddings]]) -> None:
    """Refuse embeddings with a NaN or Inf, or whose rows are not unit vectors
    (`check_unit_rows`; shapes, dtypes and devices already checked). Each tensor is checked
    on its own device (learner and reference may differ: device=)."""
    for name, e in given:
        for part, x in (("image", e.image), ("text", e.text)):
            check_unit_rows(x, f"{name} {part}", "pass JointSelector(require_normalized=False)")


def _as_model_embeddings(value: object, name: str) -> ModelEmbeddings | None:
    if value is None or isinstance(value, ModelEmbeddings):
        return value
    if isinstance(value, (tuple, list)) and len(value) in (3, 4):
        return ModelEmbeddings(*value)
    raise TypeError(f"{name} must be a ModelEmbeddings or a tuple (image, text, logit_scale"
                    f"[, logit_bias]), got {type(value).__name__}")


class JointSelector:
    """Selects a sub-batch from the learner's and reference's embeddings of a super-batch.

    The object to keep in a training loop. Per step::

        idx = selector(learner=(img_l, txt_l, t_l, b_l), reference=(img_r, txt_r, t_r, b_r),
                       generator=gen)

    Args:
        criterion: "learnability" (JEST), "hard_learner", "easy_reference" or "uniform".
        filter_ratio: f in (0, 1); the sub-batch keeps ``round(N * (1 - f))`` of N
            (at least 1). Give exactly one of filter_ratio and batch_size.
        batch_size: b, a fixed sub-batch size.
        n_chunks: K chunks of the blocked sampler (paper default 16); in [1, b].
        loss: "sigmoid" (SigLIP; the sum-of-a-block identity holds exactly, and the
            conditional logits equal `joint_select` on the dense matrix) or "softmax" (CLIP;
            a conditional score, see `_SoftmaxState`).
        selection: "joint" (the blocked sampler) or "independent" (each example scored
            alone by its own loss within the super-batch, b drawn in one go).
        temperature: sample proportional to exp(logit / temperature); 0 is greedy.
        device: where to compute (embeddings are moved there, e.g. reference embeddings
            cached on CPU and a learner on GPU). Default: the embeddings' own device, which
            must then be the same for both models.
        max_block_elements: the size of the largest [rows, columns] block held at once (a
            block is at least one row, N entries); memory is O(N * d + max(max_block_elements,
            N)), never more than that however large N is. With the sigmoid loss,
            a super-batch of N <= 512 with N * N <= max_block_elements has its [N, N] pair
            matrix built once (faster for small N); larger ones are scored block by block.
        require_normalized: refuse embeddings whose rows are not unit vectors (norms within
            2e-2 of 1, wide enough for bfloat16), as a SigLIP or CLIP model's are; False for
            a model whose loss is defined on unnormalised embeddings.
    """

    def __init__(
        self,
        criterion: str = "learnability",
        *,
        filter_ratio: float | None = None,
        batch_size: int | None = None,
        n_chunks: int = 16,
        loss: str = "sigmoid",
        selection: str = "joint",
        temperature: float = 1.0,
        device: torch.device | str | None = None,
        max_block_elements: int = 1 << 22,
        require_normalized: bool = True,
    ):
        get_criterion(criterion)
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {list(LOSSES)}, got {loss!r}")
        if selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {list(SELECTIONS)}, got {selection!r}")
        if (filter_ratio is None) == (batch_size is None):
            raise ValueError("give exactly one of filter_ratio (in (0, 1)) and batch_size")
        if filter_ratio is not None:
            if (isinstance(filter_ratio, bool)
                    or not isinstance(filter_ratio, numbers.Real)):
                raise TypeError(f"filter_ratio must be a float in (0, 1), got {filter_ratio!r}")
            if not 0 < filter_ratio < 1:
                raise ValueError(f"filter_ratio must be in (0, 1), got {filter_ratio}")
            filter_ratio = float(filter_ratio)
        if batch_size is not None:
            batch_size = _check_int(batch_size, "batch_size")
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n_chunks = _check_int(n_chunks, "n_chunks")
        if n_chunks < 1:
            raise ValueError(f"n_chunks must be >= 1, got {n_chunks}")
        chunked = selection == "joint" and criterion != "uniform"  # uniform draws no chunks
        if chunked and batch_size is not None and n_chunks > batch_size:
            raise ValueError(f"n_chunks must be in [1, batch_size={batch_size}], got {n_chunks}")
        max_block_elements = _check_int(max_block_elements, "max_block_elements")
        if max_block_elements < 1:
            raise ValueError(f"max_block_elements must be >= 1, got {max_block_elements}")
        self.criterion = criterion
        self.filter_ratio = filter_ratio
        self.batch_size = batch_size
        self.n_chunks = n_chunks
        self.loss = loss
        self.selection = selection
        self.temperature = _check_temperature(temperature)
        self.device = check_device(device)
        self.max_block_elements = max_block_elements
        if not isinstance(require_normalized, bool):
            raise TypeError(f"require_normalized must be a bool, got {require_normalized!r}")
        self.require_normalized = require_normalized
        self._warned_small_scale = False

    def __repr__(self) -> str:
        size = (f"filter_ratio={self.filter_ratio}" if self.filter_ratio is not None
                else f"batch_size={self.batch_size}")
        return (f"JointSelector({self.criterion!r}, {size}, n_chunks={self.n_chunks}, "
                f"loss={self.loss!r}, selection={self.selection!r}, "
                f"temperature={self.temperature})")

    def sub_batch_size(self, super_batch_size: int) -> int:
        """b for a super-batch of N: batch_size, or round(N * (1 - filter_ratio)), at least 1."""
        if self.batch_size is not None:
            return _check_batch_size(self.batch_size, super_batch_size)
        return max(1, round(super_batch_size * (1 - self.filter_ratio)))

    @torch.no_grad()  # scoring only: an autograd graph here would hold every block alive
    def select(
        self,
        learner: ModelEmbeddings | tuple | None = None,
        reference: ModelEmbeddings | tuple | None = None,
        *,
        generator: torch.Generator | None = None,
        chunk_logits: list[Tensor] | None = None,
    ) -> Tensor:
        """Pick the sub-batch.

        Args:
            learner: the learner's embeddings of the N-pair super-batch (a ModelEmbeddings or
                a tuple ``(image [N, d], text [N, d], logit_scale, logit_bias)``). Needed by
                learnability and hard_learner.
            reference: the reference's embeddings of the same N pairs, same order (its own
                d, t and c). Needed by learnability and easy_reference.
            generator: the source of randomness; never the global RNG.
            chunk_logits: if a list, the [N] logits of every chunk are appended to it.

        Returns:
            LongTensor [b] of distinct indices into the super-batch, in the order drawn, on
            the compute device. That order is not random (the first chunk, the most
            learnable examples alone, comes first): shuffle before splitting the sub-batch
            into parts that are treated differently (as `train_learner` does for
            multi-resolution training).
        """
        if chunk_logits is not None and not isinstance(chunk_logits, list):
            raise TypeError(f"chunk_logits must be a list to append to (or None), got "
                            f"{type(chunk_logits).__name__}")
        learner = _as_model_embeddings(learner, "learner")
        reference = _as_model_embeddings(reference, "reference")
        if generator is not None:
            _generator(generator, torch.device("cpu"))  # type check before any work
        needs_l, needs_r = USES_LEARNER[self.criterion], USES_REFERENCE[self.criterion]
        if needs_l and learner is None:
            raise ValueError(f"criterion {self.criterion!r} needs learner embeddings")
        if needs_r and reference is None:
            raise ValueError(f"criterion {self.criterion!r} needs reference embeddings")
        # Only the embeddings the criterion reads are validated and used (uniform reads
        # none and takes N from whichever it is given); the rest are ignored.
        given = [(name, e) for name, e, used in (("learner", learner, needs_l),
                                                 ("reference", reference, needs_r))
                 if e is not None and (used or self.criterion == "uniform")]
        if not given:
            raise ValueError("give learner and/or reference embeddings")
        for name, e in given:
            check_embeddings(e.image, e.text, name, finite=False)
        devices = {name: e.image.device for name, e in given}
        if self.device is None and len(set(devices.values())) > 1:
            raise ValueError(f"learner and reference embeddings are on different devices "
                             f"{devices}; pass device= to compute on one")
        if self.require_normalized and self.criterion != "uniform":  # uniform reads none
            _check_normalized(given)  # one pass over each tensor: finite, and unit rows
        else:
            for name, e in given:
                check_embeddings(e.image, e.text, name)
        dtype = compute_dtype(*(t for _, e in given for t in (e.image, e.text)))
        models = {name: _Model(e, name, self.device, dtype, self.max_block_elements,
                               needs_bias=self.loss == "sigmoid" and self.criterion != "uniform")
                  for name, e in given}
        self._warn_if_log_scale(models)
        sizes = {name: m.n for name, m in models.items()}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"learner and reference must embed the same super-batch, got "
                             f"N = {sizes}")
        n = next(iter(sizes.values()))
        device = next(iter(models.values())).device
        b = self.sub_batch_size(n)
        if self.selection == "joint" and self.criterion != "uniform" and self.n_chunks > b:
            if self.filter_ratio is None:
                raise ValueError(f"n_chunks must be in [1, batch_size={b}], got {self.n_chunks}")
            # The usual cause is a super-batch too small for the filter ratio: say so, with the
            # smallest N whose round(N (1 - f)) reaches K, searched just below (K - 1/2)/(1 - f)
            # (rounding ties go to even, so the formula alone can be one off).
            start = max(n, math.ceil((self.n_chunks - 0.5) / (1 - self.filter_ratio)) - 2)
            least = next(m for m in range(start, start + 8)
                         if self.sub_batch_size(m) >= self.n_chunks)
            raise ValueError(f"a super-batch of N = {n} keeps b = {b} examples (round(N * (1 - "
                             f"filter_ratio={self.filter_ratio})), at least 1), fewer than "
                             f"n_chunks = {self.n_chunks}: give at least N = {least}, or fewer "
                             f"chunks")

        if self.criterion == "uniform":  # all sub-batches score alike: skip the maths
            return uniform_select(n, b, generator=generator, device=device)

        generator = _generator(generator, device)
        learner_m, reference_m = models.get("learner"), models.get("reference")
        state_cls = _SigmoidState if self.loss == "sigmoid" else _SoftmaxState
        state = state_cls(learner_m, reference_m, CRITERIA[self.criterion])
        if self.selection == "independent":
            scores = state.independent_scores()
            if chunk_logits is not None:
                chunk_logits.append(scores.detach().clone())
            return _gumbel_top_k(scores, b, generator, self.temperature)
        return _blocked_sample(state, n, chunk_sizes(b, self.n_chunks), generator,
                               self.temperature, chunk_logits)

    __call__ = select

    # open_clip's model.logit_scale is the *log* temperature (its forward returns the exp):
    # passed as is, t = 2.3 instead of 10 silently flattens every score. A SigLIP model starts
    # at t = 10 and a CLIP model at 14.3, and both grow in training, while open_clip keeps
    # log t <= log 100 = 4.6: below this, t is almost surely a log.
    _SMALL_LOGIT_SCALE = 5.0

    def _warn_if_log_scale(self, models: dict[str, _Model]) -> None:
        if self._warned_small_scale or self.criterion == "uniform":  # uniform reads no t
            return
        for name, m in models.items():
            t = m.t_value
            if t < self._SMALL_LOGIT_SCALE:
                warnings.warn(f"{name} logit_scale t = {t:.4g} is small for a contrastive "
                              f"model (SigLIP starts at t = 10, CLIP at 14.3): if it is "
                              f"open_clip's model.logit_scale, that parameter is log t; pass "
                              f"model.logit_scale.exp() (warned once per selector)",
                              UserWarning, stacklevel=4)  # the caller of select()
                self._warned_small_scale = True
                return
