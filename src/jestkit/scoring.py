"""Pairwise contrastive losses and the scoring criteria of JEST.

A super-batch of N image-text pairs, embedded by a model, gives an N x N matrix of per-pair
loss terms. With the sigmoid (SigLIP) loss every pair (i, j) has its own term

    l_ij = -log sigmoid(y_ij * (t * u_i . v_j + c)),   y_ii = +1, y_ij = -1 (i != j),

so the loss of any sub-batch S is the sum of the square block l[S, S] (over |S|). The score
of a sub-batch under a criterion is then the sum of a block of the score matrix A (BRIEF 2):

    learnability     A = l_learner - l_reference     (the method)
    hard_learner     A = l_learner                   (baseline)
    easy_reference   A = -l_reference                (baseline)
    uniform          A = 0                           (baseline: a random sub-batch)

The criteria are plain element-wise functions, so they apply equally to whole matrices, to
blocks of them, and to per-example vectors: the memory-linear selector in `selection` relies
on that (and on their linearity) to score blocks without ever forming the N x N matrix.

Everything here accumulates in float32 (float64 stays float64) whatever the input dtype, so
bfloat16 / float16 embeddings give the same scores as float32 ones up to input rounding.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "CRITERIA",
    "LOSSES",
    "easy_reference",
    "hard_learner",
    "learnability",
    "pairwise_sigmoid_loss",
    "pairwise_softmax_loss",
    "get_criterion",
    "uniform",
    "compute_dtype",
    "scalar_tensor",
    "check_unit_rows",
    "check_device",
    "NORM_TOLERANCE",
]

LOSSES = ("sigmoid", "softmax")


def check_device(device: torch.device | str | None,
                 instead: str = "pass device=None to compute where the inputs are"
                 ) -> torch.device | None:
    """The device, refused up front with a ValueError naming `device=` if it is not one, is
    CUDA on a machine without it, is 'meta' or is a backend this torch lacks (torch's own
    errors come from deep inside a generator or a copy, or as an assert); `instead` says what
    to pass instead."""
    if device is None:
        return None
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0' (or None), "
                         f"got {device!r} ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={str(device)!r}, but CUDA is not available here; {instead}")
    if device.type == "meta":  # shapes without values: nothing to compute
        raise ValueError(f"device='meta' holds no values; {instead}")
    if device.type not in ("cpu", "cuda"):
        try:  # mps, xpu, ...: torch's own error for a missing backend is an assert or deep
            torch.empty(1, device=device)
        except (RuntimeError, AssertionError) as err:
            raise ValueError(f"device={str(device)!r} is not usable here ({err}); "
                             f"{instead}") from None
    return device


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """The dtype scores are accumulated in: float64 if any input is float64, else float32."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def scalar_tensor(value: float | Tensor, name: str, dtype: torch.dtype,
                  device: torch.device) -> Tensor:
    """A 0-d tensor of `dtype` on `device` from a real number or a one-element tensor (e.g.
    an nn.Parameter, whose gradient it keeps). A per-GPU [n_gpus] t from nn.DataParallel, or
    an [N] vector, would broadcast into a wrong loss, a string be parsed and a bool read as
    0 or 1: all refused. Reads no value (no GPU sync)."""
    if not isinstance(value, Tensor) and hasattr(value, "__array__"):  # numpy, np.array(10.)
        value = torch.as_tensor(value)
    if isinstance(value, Tensor):
        if value.dtype == torch.bool:  # np.bool_ too, through __array__
            raise TypeError(f"{name} must be a float or a one-element tensor, got a bool "
                            f"tensor")
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar (one element), "
                             f"got shape {tuple(value.shape)}")
        return value.reshape(()).to(device=device, dtype=dtype)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float or a one-element tensor, got {value!r}")
    return torch.tensor(float(value), dtype=dtype, device=device)


def _as_scalar(value: float | Tensor, name: str, dtype: torch.dtype,
               device: torch.device) -> Tensor:
    """`scalar_tensor`, detached, and checked finite (which reads it: scoring only)."""
    value = scalar_tensor(value, name, dtype, device).detach()
    if not math.isfinite(value.item()):  # one read, not an elementwise isfinite kernel
        raise ValueError(f"{name} must be finite, got {value.item()}")
    return value


def _positive_scale(logit_scale: float | Tensor, dtype: torch.dtype,
                    device: torch.device) -> Tensor:
    """`_as_scalar` for t, which must also be > 0: it is the temperature already
    exponentiated (a t <= 0 would rank every pair backwards, silently)."""
    t = _as_scalar(logit_scale, "logit_scale", dtype, device)
    if t.item() <= 0:
        raise ValueError(f"logit_scale must be > 0 (it is t, already exponentiated; "
                         f"open_clip's model.logit_scale is log t: pass its .exp()), "
                         f"got {t.item()}")
    return t


def all_finite(x: Tensor) -> bool:
    """Whether every entry of `x` is finite (no NaN, no Inf).

    A finite sum implies finite entries (a NaN or Inf anywhere makes the sum NaN or Inf), and
    one reduction is several times cheaper than the elementwise isfinite; only a non-finite
    sum, which overflow can also cause, needs the exact check.
    """
    return bool(torch.isfinite(x.sum())) or bool(torch.isfinite(x).all())


def check_embeddings(image_emb: Tensor, text_emb: Tensor, what: str = "",
                     finite: bool = True) -> None:
    """Validate one model's embeddings: two float [N, d] tensors, same shape and device, and
    (if `finite`) no NaN or Inf."""
    prefix = f"{what} " if what else ""
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if not isinstance(emb, Tensor):
            raise TypeError(f"{prefix}{name} must be a torch.Tensor, got {type(emb).__name__}")
        if not emb.is_floating_point():
            raise TypeError(f"{prefix}{name} must be a floating-point tensor, got {emb.dtype}")
        if emb.ndim != 2 or emb.shape[0] == 0 or emb.shape[1] == 0:
            raise ValueError(f"{prefix}{name} must have shape [N, d] with N, d >= 1, "
                             f"got {tuple(emb.shape)}")
    if image_emb.shape != text_emb.shape:
        raise ValueError(f"{prefix}image_emb and text_emb must have the same shape, got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    if image_emb.device != text_emb.device:
        raise ValueError(f"{prefix}image_emb and text_emb must be on the same device, got "
                         f"{image_emb.device} and {text_emb.device}")
    for name, emb in (("image_emb", image_emb), ("text_emb", text_emb)):
        if finite and not all_finite(emb):
            raise ValueError(f"{prefix}{name} contains NaN or Inf")


# Unit rows stored in bfloat16 are within ~4e-3 of norm 1, and stay so when cast up to
# float32 afterwards (open_clip under bf16 autocast); a norm 2% off still scales every logit
# by 4% at most, while the mistake this catches, unnormalised features, is off by ~10x.
NORM_TOLERANCE = 2e-2


def check_unit_rows(x: Tensor, what: str, opt_out: str) -> None:
    """ValueError unless every row of the [N, d] tensor `x` is finite and of L2 norm within
    NORM_TOLERANCE of 1. t and c were learned for t u . v with |u| = |v| = 1: open_clip's
    encode_image without normalize=True gives norms of ~10, which multiplies every logit by
    ~100, a silently wrong score rather than an error. `what` names the tensor ("learner
    image"), `opt_out` says how to skip the check. One read of the norms' range."""
    norms = torch.linalg.vector_norm(x, dim=1, dtype=torch.promote_types(x.dtype, torch.float32))
    low, high = torch.stack(torch.aminmax(norms)).tolist()  # one read
    if not (math.isfinite(low) and math.isfinite(high)) and not all_finite(x):
        # A NaN or Inf entry makes its row's norm one too: the check_embeddings error,
        # without a second pass over every tensor when all is well.
        raise ValueError(f"{what}_emb contains NaN or Inf")
    if max(high - 1, 1 - low) > NORM_TOLERANCE:
        raise ValueError(
            f"{what} embeddings must be L2-normalised (every row, one example of the [N, d] "
            f"tensor, of norm within {NORM_TOLERANCE:g} of 1), got norms in [{low:.4g}, "
            f"{high:.4g}] over {len(norms)} rows: normalise them (F.normalize(x, dim=-1); "
            f"open_clip: encode_image/encode_text(..., normalize=True)), or {opt_out} if "
            f"your model's loss is defined on unnormalised embeddings")


def _check_pair_inputs(image_emb: Tensor, text_emb: Tensor, require_normalized: bool) -> None:
    check_embeddings(image_emb, text_emb)
    if not isinstance(require_normalized, bool):
        raise TypeError(f"require_normalized must be a bool, got {require_normalized!r}")
    if require_normalized:
        for part, x in (("image", image_emb), ("text", text_emb)):
            check_unit_rows(x, part, "pass require_normalized=False")


def pairwise_sigmoid_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor,
    *,
    require_normalized: bool = True,
) -> Tensor:
    """Per-pair sigmoid (SigLIP) loss terms of a batch.

    Args:
        image_emb: [N, d] image embeddings (normalised, as the model outputs them).
        text_emb: [N, d] text embeddings of the same N pairs.
        logit_scale: the temperature multiplier t, *already exponentiated* (open_clip's
            convention), a float or a one-element tensor.
        logit_bias: the learned bias c; required, as by the selector: a SigLIP score with
            c = 0 in place of the model's (init -10) is a silently different loss.
        require_normalized: refuse embeddings whose rows are not unit vectors (norms within
            2e-2 of 1), as `JointSelector` does; False for a model whose loss is defined on
            unnormalised embeddings.

    Returns:
        [N, N] float32 (float64 for float64 input) matrix with
        ``out[i, j] = -log sigmoid(y_ij * (t * image_emb[i] . text_emb[j] + c))``,
        ``y_ii = +1`` and ``y_ij = -1`` otherwise. ``out.sum() / N`` is the SigLIP loss's
        value. For scoring: t and c enter as constants (detached; gradients reach only the
        embeddings). To train a model use `jestkit.models.sigmoid_loss`, which learns t and c.
    """
    _check_pair_inputs(image_emb, text_emb, require_normalized)
    dtype = compute_dtype(image_emb, text_emb)
    t = _positive_scale(logit_scale, dtype, image_emb.device)
    c = _as_scalar(logit_bias, "logit_bias", dtype, image_emb.device)
    z = t * (image_emb.to(dtype) @ text_emb.to(dtype).T) + c
    # -log sigmoid(-z) = softplus(z) for negatives; -log sigmoid(z) = softplus(-z) on the diagonal.
    loss = F.softplus(z)
    diag = torch.diagonal(z)
    loss.diagonal().copy_(F.softplus(-diag))
    return loss


def pairwise_softmax_loss(
    image_emb: Tensor,
    text_emb: Tensor,
    logit_scale: float | Tensor,
    logit_bias: float | Tensor = 0.0,
    *,
    require_normalized: bool = True,
) -> Tensor:
    """Per-pair softmax (CLIP) loss matrix of a batch.

    ``out[i, j] = (-log softmax_row(z)[i, j] - log softmax_col(z)[i, j]) / 2`` with
    ``z = t * image_emb @ text_emb.T + c``: the symmetric cross-entropy pair (i, j) would
    incur as the positive of row i (image -> text) and column j (text -> image) in this batch.
    Its diagonal is each example's own CLIP loss within the batch, and ``diag.mean()`` is the
    CLIP batch loss. Unlike the sigmoid matrix, the loss of a sub-batch is *not* a block sum
    of this matrix (the log-sum-exp runs over the batch), which is why `JointSelector` uses a
    conditional score for softmax (see `selection`). The bias cancels in a softmax; it is
    accepted so both losses share one signature. `require_normalized` as in
    `pairwise_sigmoid_loss`.

    Returns:
        [N, N] float32 (float64 for float64 input). For scoring: t enters as a constant
        (detached; gradients reach only the embeddings).
    """
    _check_pair_inputs(image_emb, text_emb, require_normalized)
    dtype = compute_dtype(image_emb, text_emb)
    t = _positive_scale(logit_scale, dtype, image_emb.device)
    _as_scalar(logit_bias, "logit_bias", dtype, image_emb.device)  # validated, cancels
    z = t * (image_emb.to(dtype) @ text_emb.to(dtype).T)
    return -(torch.log_softmax(z, dim=1) + torch.log_softmax(z, dim=0)) / 2


# --- criteria --------------------------------------------------------------------------------
# Each criterion maps (learner_loss, reference_loss) -> score, element-wise and linearly, for
# tensors of any shape: [N, N] pair losses (a pairwise_*_loss), a block of them, or [N]
# per-example losses; both arguments of one shape, the score of that shape too. Arguments a
# criterion ignores may be None (positionally: easy_reference(None, reference_loss)).


def learnability(learner_loss: Tensor, reference_loss: Tensor) -> Tensor:
    """JEST's score: learner loss minus reference loss (high = learnable, not yet learnt).
    Shapes: both any one shape ([N, N], a block, [N]); returns that shape."""
    if learner_loss is None or reference_loss is None:
        raise ValueError("learnability needs both learner_loss and reference_loss")
    if learner_loss.shape != reference_loss.shape:
        # Broadcasting [N, 1] against [1, N] would build A_ij = l_i - r_j, an outer
        # difference with no pairwise terms, on which the joint sampler is independent
        # selection (BRIEF 6); [N, N] against [N] would be as silent.
        raise ValueError(f"learner_loss and reference_loss must have the same shape, got "
                         f"{tuple(learner_loss.shape)} and {tuple(reference_loss.shape)}")
    return learner_loss - reference_loss


def hard_learner(learner_loss: Tensor, reference_loss: Tensor | None = None) -> Tensor:
    """Baseline: prefer data the learner finds hard (high learner loss). Returns
    learner_loss itself (any shape); reference_loss is ignored."""
    if learner_loss is None:
        raise ValueError("hard_learner needs learner_loss")
    return learner_loss


def easy_reference(learner_loss: Tensor | None, reference_loss: Tensor) -> Tensor:
    """Baseline: prefer data the reference finds easy (low reference loss). Returns
    -reference_loss (any shape); learner_loss is ignored."""
    if reference_loss is None:
        raise ValueError("easy_reference needs reference_loss")
    return -reference_loss


def uniform(learner_loss: Tensor | None, reference_loss: Tensor | None = None) -> Tensor:
    """Baseline: every sub-batch scores zero, so selection is uniformly random. Returns zeros
    of the shape of whichever loss is given."""
    like = learner_loss if learner_loss is not None else reference_loss
    if like is None:
        raise ValueError("uniform needs a learner_loss or reference_loss to take the shape from")
    return torch.zeros_like(like)


CRITERIA: dict[str, Callable[..., Tensor]] = {
    "learnability": learnability,
    "hard_learner": hard_learner,
    "easy_reference": easy_reference,
    "uniform": uniform,
}

# Which model's loss each criterion reads; the selector skips the forward maths of the other.
USES_LEARNER = {"learnability": True, "hard_learner": True, "easy_reference": False,
                "uniform": False}
USES_REFERENCE = {"learnability": True, "hard_learner": False, "easy_reference": True,
                  "uniform": False}


def get_criterion(name: str) -> Callable[..., Tensor]:
    """The criterion function called `name` (one of `CRITERIA`)."""
    if not isinstance(name, str) or name not in CRITERIA:
        raise ValueError(f"criterion must be one of {sorted(CRITERIA)}, got {name!r}")
    return CRITERIA[name]
