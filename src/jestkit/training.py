"""Training: the reference on curated data, the learner on the pool with online selection,
and evaluation. Read top to bottom: config, evaluation, reference training, learner training.

One learner step (BRIEF 1):
  1. draw a super-batch of N = b / (1 - f) pairs from the pool (uniform: N = b, no scoring);
  2. embed it under no-grad with the learner (and with the reference, unless its embeddings
     are looked up in a cache), 3. let `JointSelector` pick b of the N,
  4. one ordinary sigmoid-loss step on those b.
FLOPs of every phase are measured with torch's flop counter (once per distinct shape: the
count depends on shapes only) and accumulated in a `FlopLedger`.

The loop never reads the pool's hidden `is_clean` flag for training; it only records, for the
report, which fraction of the selected examples were clean.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from jestkit.atomic import (
    atomic_write,
    replacing_directory,
    set_aside_copy_of,
    sha256_file,
    unfinished_write,
)
from jestkit.cache import ReferenceCache
from jestkit.data import (
    EPOCH_BOUNDARIES,
    EPOCH_BOUNDARY_BEFORE_OPTION,
    MAX_SEED,
    Batch,
    DigitsWeb,
    Split,
    SuperBatchSampler,
    class_prompts,
)
from jestkit.flops import FlopLedger, count_flops
from jestkit.models import (
    DualEncoder,
    DualEncoderConfig,
    check_fits_in_memory,
    load_model,
    model_fingerprint,
    patch_sizes,
    save_model,
    sigmoid_loss,
)
from jestkit.scoring import CRITERIA, USES_LEARNER, USES_REFERENCE
from jestkit.selection import SELECTIONS, JointSelector, ModelEmbeddings

METHODS = tuple(CRITERIA)  # learnability, hard_learner, easy_reference, uniform


# --- configuration ---------------------------------------------------------------------------


IMAGE_HEADS = 4  # attention heads of small_model's image tower: `width` must be a multiple


def small_model(vocab_size: int, width: int, depth: int, patch_size: int = 16,
                text_width: int | None = None, text_heads: int = 1) -> DualEncoderConfig:
    """A dual encoder sized for a 2-core CPU: 32x32 images at patch 16 are 4 tokens (at 8,
    16); captions are a few words from a ~100-word vocabulary, so one narrow text block
    suffices.

    `text_width` defaults to `width`. A narrow text tower keeps the image tower the bulk of
    the compute, which is what makes Flexi's coarse scoring cheap (BRIEF 4): the text tower
    costs the same at every patch size. One text head by default: at width 16, four heads
    of width 4 made the same FLOPs take ~2x the time (1280 tiny matmuls per attention for
    a 320-caption super-batch instead of 320) and learned no better (docs/step_overhead.md,
    docs/results.md).
    """
    return DualEncoderConfig(vocab_size=vocab_size, embed_dim=32, patch_size=patch_size,
                             image_width=width, image_depth=depth, image_heads=IMAGE_HEADS,
                             text_width=text_width or width, text_depth=1,
                             text_heads=text_heads, mlp_ratio=2)


def model_config(cfg: ReferenceConfig | LearnerConfig, vocab_size: int) -> DualEncoderConfig:
    """The architecture `train_reference` / `train_learner` build for `cfg`."""
    return small_model(vocab_size, cfg.width, cfg.depth, patch_size=cfg.patch_size,
                       text_width=cfg.text_width, text_heads=cfg.text_heads)


def check_trainable(cfg: ReferenceConfig | LearnerConfig, vocab_size: int, what: str,
                    prefix: str = "") -> None:
    """Refuse, before anything runs, a config whose model cannot be trained on this machine:
    its weights, gradients and AdamW's two moments exceed the memory and swap. The
    ValueError starts with `what` and names the config's width, depth and text_width, each
    after `prefix` (e.g. "learner." for a demo config's block)."""
    sizes = ", ".join(f"{prefix}{name}={getattr(cfg, name)}"
                      for name in ("width", "depth", "text_width"))
    check_fits_in_memory(model_config(cfg, vocab_size), 4, what, sizes=sizes)


#: How a multi-resolution step chooses the share of the sub-batch it trains coarse.
MULTIRES_SPLITS = ("random", "first_drawn_fine")
# Which images selection scores (LearnerConfig.score_view): "augmented", the shifted view the
# sub-batch then trains on; or "stored", the pool's images as stored, the view a reference
# cache of views="stored" holds the reference's embeddings of.
SCORE_VIEWS = ("augmented", "stored")
#: The view configs and states saved before LearnerConfig.score_view scored (its default).
SCORE_VIEW_BEFORE_OPTION = "augmented"

#: The patch size of configs and states saved before it was a field: the learner's before
#: checkpoint state version 2, the reference's before ReferenceConfig.patch_size.
PATCH_SIZE_BEFORE_OPTION = 8


@dataclass(frozen=True)
class ReferenceConfig:
    """How the reference model is trained on the curated split (smaller than the learner)."""

    steps: int = 800
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    width: int = 32
    text_width: int = 16
    text_heads: int = 1
    depth: int = 1
    # The reference's patch size, set apart from the learner's (a demo config that changes
    # learner.patch_size leaves this one as it is). The default is the default learner's, 16
    # (4 tokens; see LearnerConfig). It scores at this size always: Flexi's coarse scoring is
    # the learner's.
    patch_size: int = 16
    seed: int = 0
    # How the curated sampler starts each epoch (`SuperBatchSampler`): "random", or
    # "tail_last", the rule before the option, which results measured with it pin.
    epoch_boundary: str = "random"

    def __post_init__(self) -> None:
        check_field_types(self)
        _check_positive(self, ("steps", "batch_size", "width", "text_width", "text_heads",
                                "depth", "patch_size"))
        _check_heads(self)
        _check_seed(self)
        _check_lr(self)
        _check_epoch_boundary(self)


@dataclass(frozen=True)
class LearnerConfig:
    """One learner run. `filter_ratio` f sets the super-batch N = round(b / (1 - f))."""

    method: str = "learnability"
    selection: str = "joint"
    filter_ratio: float = 0.8
    n_chunks: int = 16
    batch_size: int = 64
    # Long enough for uniform to plateau with the default model (its accuracy moves < 1 point
    # over the last quarter; docs/results.md), which the speed-up protocol assumes.
    steps: int = 6000
    seed: int = 0
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 30
    width: int = 48
    text_width: int = 16
    text_heads: int = 1
    depth: int = 1
    # The training (fine) patch: 32x32 images at 16 are 4 tokens. At 8 (16 tokens) this
    # one-block ViT learns ~3x slower per step on digits-web, for ~3x the FLOPs, and uniform
    # needs T ~ 14,000 to plateau instead of ~6,000 (docs/results.md).
    patch_size: int = 16
    eval_every: int = 0  # 0: steps // 40
    checkpoint_every: int = 0  # 0: never
    score_patch_size: int = 0  # 0: the training patch size (live, full resolution)
    multires_fraction: float = 0.0  # share of each sub-batch trained at score_patch_size
    # Which share: "random" (a random part of each sub-batch, the paper's recipe) or
    # "first_drawn_fine" (the selector's first-drawn examples, the most learnable alone,
    # train at the fine size and the last-drawn at the coarse one).
    multires_split: str = "random"
    # How the pool sampler starts each epoch (`SuperBatchSampler`): "random", or
    # "tail_last", the rule before the option, which results measured with it pin.
    epoch_boundary: str = "random"
    # What the scoring models see: "augmented" (the shifted view the sub-batch trains on) or
    # "stored" (the pool's images as stored: the view a reference cache of views="stored"
    # holds, so with such a cache the learner and reference score the same images, as live
    # scoring's do; the selected examples still train on their augmented view). Both models
    # of a live run, and a cache of views="shifts", score the chosen view.
    score_view: str = "augmented"

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {list(METHODS)}, got {self.method!r}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {list(SELECTIONS)}, "
                             f"got {self.selection!r}")
        _check_positive(self, ("steps", "batch_size", "n_chunks", "width", "text_width",
                                "text_heads", "depth", "patch_size"))
        _check_heads(self)
        _check_seed(self)
        if not 0 < self.filter_ratio < 1:
            raise ValueError(f"filter_ratio must be in (0, 1), got {self.filter_ratio}")
        if self.method != "uniform" and self.selection == "joint" and (
                self.n_chunks > self.batch_size):
            raise ValueError(f"n_chunks must be in [1, batch_size={self.batch_size}], "
                             f"got {self.n_chunks}")
        if not 0 <= self.multires_fraction <= 1:
            raise ValueError(f"multires_fraction must be in [0, 1], got {self.multires_fraction}")
        if self.multires_split not in MULTIRES_SPLITS:
            raise ValueError(f"multires_split must be one of {list(MULTIRES_SPLITS)}, got "
                             f"{self.multires_split!r}")
        _check_epoch_boundary(self)
        if self.score_view not in SCORE_VIEWS:
            raise ValueError(f"score_view must be one of {list(SCORE_VIEWS)}, got "
                             f"{self.score_view!r}")
        if self.score_view != "augmented" and self.method == "uniform":
            # Would be silently ignored: uniform scores nothing.
            raise ValueError(f"score_view={self.score_view!r} applies to methods that score "
                             f"(every method but 'uniform')")
        if self.multires_fraction > 0 and not self.score_patch_size:
            # Would silently train at one resolution only.
            raise ValueError("multires_fraction > 0 needs score_patch_size > 0 (the coarse "
                             "patch size to train that share at)")
        if self.multires_fraction > 0 and self.score_patch_size == self.patch_size:
            # Found in review: "multi-resolution" training at one resolution, silently.
            raise ValueError(f"multires_fraction > 0 trains that share at score_patch_size, "
                             f"which equals patch_size={self.patch_size}: one resolution; give "
                             f"a coarser score_patch_size, or multires_fraction=0")
        if self.multires_split != MULTIRES_SPLITS[0] and not self.multires_fraction:
            # Found in review: accepted and ignored (no sub-batch is split at fraction 0).
            raise ValueError(f"multires_split={self.multires_split!r} applies only with "
                             f"multires_fraction > 0 (which pairs train coarse); leave it at "
                             f"{MULTIRES_SPLITS[0]!r}")
        n_coarse = round(self.batch_size * self.multires_fraction)
        if 0 < self.multires_fraction < 1 and not 0 < n_coarse < self.batch_size:
            # round(b * f) rows train coarse: 0 or all b would be one resolution, silently.
            raise ValueError(f"multires_fraction={self.multires_fraction} trains round("
                             f"batch_size * multires_fraction) = {n_coarse} of batch_size="
                             f"{self.batch_size} rows at the coarse patch size: give a "
                             f"fraction in [{1 / self.batch_size:.3g}, "
                             f"{1 - 1 / self.batch_size:.3g}] (or 0 or 1)")
        if (self.score_patch_size and not self.multires_fraction
                and not USES_LEARNER[self.method]):
            # Would be silently ignored: nothing is scored with the learner.
            raise ValueError(f"score_patch_size applies to methods that score with the learner "
                             f"({[m for m in METHODS if USES_LEARNER[m]]}) or with "
                             f"multires_fraction > 0; method {self.method!r} has neither")
        for name in ("eval_every", "checkpoint_every", "score_patch_size"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if 0 < self.score_patch_size < self.patch_size:
            # Flexi's scoring and its coarse half are coarser than training; a finer patch
            # costs more than full resolution (a "4 tokens" meant as a patch size, say).
            raise ValueError(f"score_patch_size must be 0 (the training patch) or at least "
                             f"patch_size={self.patch_size} (Flexi scores coarser), got "
                             f"{self.score_patch_size}")
        _check_lr(self)

    @property
    def super_batch_size(self) -> int:
        """N: b for uniform (no scoring), else round(b / (1 - f))."""
        if self.method == "uniform":
            return self.batch_size
        return round(self.batch_size / (1 - self.filter_ratio))

    @property
    def needs_reference(self) -> bool:
        """Whether the method scores with the reference (learnability, easy_reference)."""
        return USES_REFERENCE[self.method]

    @property
    def eval_interval(self) -> int:
        return self.eval_every or max(1, self.steps // 40)


_FIELD_KINDS = {"int": (int,), "float": (int, float), "str": (str,)}
_KIND_NAMES = {"int": "an int", "float": "a number", "str": "a string"}


def check_field_types(cfg) -> None:
    """Refuse a config field of the wrong type (a JSON config can say "lr": "1e-3"), with its
    name, before a comparison deep inside fails with a TypeError. bool is not a number here."""
    for f in dataclasses.fields(cfg):
        # A string under postponed evaluation of annotations, else the class itself.
        kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", None)
        value = getattr(cfg, f.name)
        if kind in _FIELD_KINDS and (isinstance(value, bool)
                                     or not isinstance(value, _FIELD_KINDS[kind])):
            raise ValueError(f"{f.name} must be {_KIND_NAMES[kind]}, got {value!r}")


def _check_positive(cfg, names) -> None:
    for name in names:
        value = getattr(cfg, name)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _check_seed(cfg) -> None:
    if not 0 <= cfg.seed <= MAX_SEED:
        raise ValueError(f"seed must be in [0, {MAX_SEED}], got {cfg.seed}")


def _check_epoch_boundary(cfg) -> None:
    if cfg.epoch_boundary not in EPOCH_BOUNDARIES:
        raise ValueError(f"epoch_boundary must be one of {list(EPOCH_BOUNDARIES)}, got "
                         f"{cfg.epoch_boundary!r}")


def _check_heads(cfg) -> None:
    if cfg.width % IMAGE_HEADS:
        raise ValueError(f"width must be a multiple of {IMAGE_HEADS} (the image tower's "
                         f"attention heads), got {cfg.width}")
    if cfg.text_width % cfg.text_heads:
        divisors = [h for h in range(1, cfg.text_width + 1) if cfg.text_width % h == 0]
        raise ValueError(f"text_heads must divide text_width={cfg.text_width}: one of "
                         f"{divisors}, got {cfg.text_heads}")


def _check_lr(cfg) -> None:
    if not (math.isfinite(cfg.lr) and cfg.lr > 0):
        raise ValueError(f"lr must be a finite float > 0, got {cfg.lr}")
    if not (math.isfinite(cfg.weight_decay) and cfg.weight_decay >= 0):
        raise ValueError(f"weight_decay must be a finite float >= 0, got {cfg.weight_decay}")
    if cfg.warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0, got {cfg.warmup_steps}")


def _lr_at(step: int, cfg) -> float:
    """Linear warm-up, then constant: a plateau at the end means the model saturated, not
    that a decaying learning rate froze it."""
    if cfg.warmup_steps and step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    return cfg.lr


# --- evaluation ------------------------------------------------------------------------------


@torch.no_grad()
def evaluate(model: DualEncoder, split: Split, tokenizer, batch_size: int = 500) -> dict:
    """Zero-shot accuracy and retrieval on a clean split, at the model's full resolution.

    - zero_shot_accuracy: each image against the 10 class embeddings, each the mean of the
      normalised embeddings of that class's caption under every template, renormalised
      (CLIP's prompt ensembling).
    - i2t_recall@1 / t2i_recall@1 over the split's (image, caption) pairs: a retrieval counts
      as correct when the retrieved item shows / names the pair's digit. Captions describe
      only the digit, so many pairs share a caption text; exact-pair recall would reward
      arbitrary tie-breaking among identical captions.

    Returns a dict of floats in [0, 1], each an exact count / len(split) (a Python float, not
    a float32 mean, so a curve that lands on a level compares equal to it). A split with noisy
    pairs (is_clean not all true) is refused: a wrong caption would be scored by its image's
    digit. So are embeddings that are not finite (diverged weights), which argmax would turn
    into a chance-level score.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"evaluate's batch_size must be an int >= 1 (images encoded at "
                         f"once), got {batch_size!r}")
    if split.is_clean is not None and not bool(split.is_clean.all()):
        raise ValueError(f"evaluate needs a clean split (every caption names its image's "
                         f"digit); {split.name or 'this split'} has "
                         f"{int((~split.is_clean).sum())} noisy pairs: evaluate on data.test")
    was_training = model.training
    model.eval()
    try:
        images = torch.cat([model.encode_image(split.images[i:i + batch_size])
                            for i in range(0, len(split), batch_size)])
        texts = model.encode_text(split.tokens)
        prompts = class_prompts(tokenizer)
        n_templates = len(prompts[0])
        flat = tokenizer.encode([p for cls in prompts for p in cls],
                                max_len=split.tokens.shape[1])
        class_emb = model.encode_text(flat).reshape(len(prompts), n_templates, -1).mean(1)
        class_emb = torch.nn.functional.normalize(class_emb, dim=-1)
        if not all(bool(torch.isfinite(e).all()) for e in (images, texts, class_emb)):
            raise ValueError("evaluate: the model's embeddings contain NaN or Inf: its "
                             "weights have diverged (lower the learning rate)")
        labels = split.labels
        n = len(labels)
        zero_shot = int((images @ class_emb.T).argmax(1).eq(labels).sum()) / n
        sim = images @ texts.T
        i2t = int(labels[sim.argmax(1)].eq(labels).sum()) / n
        t2i = int(labels[sim.argmax(0)].eq(labels).sum()) / n
    finally:
        model.train(was_training)
    return {"zero_shot_accuracy": zero_shot, "i2t_recall@1": i2t, "t2i_recall@1": t2i}


# --- shared step machinery -------------------------------------------------------------------


class _FlopMeter:
    """Measure a phase's FLOPs the first time each shape runs; reuse the count afterwards."""

    def __init__(self, ledger: FlopLedger):
        self.ledger = ledger
        self.known: dict[tuple, int] = {}

    def run(self, phase: str, key: tuple, fn: Callable[[], object]):
        key = (phase, *key)
        if key not in self.known:
            out = []
            self.known[key] = count_flops(lambda: out.append(fn()))
            self.ledger.add(phase, self.known[key])
            return out[0]
        self.ledger.add(phase, self.known[key])
        return fn()


def _optimizer(model: DualEncoder, cfg) -> torch.optim.Optimizer:
    # No weight decay on vectors (norms, biases) nor on SigLIP's temperature and bias:
    # decaying log t and c toward 0 would fight their initialisation (t = 10, c = -10).
    decay = [p for p in model.parameters() if p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.ndim < 2]
    # foreach: one multi-tensor call per AdamW operation instead of a Python loop over every
    # parameter (torch picks it by default only on CUDA). The same arithmetic in the same
    # order: on CPU it updates every parameter bit for bit as the loop does (tested), with
    # less per-call overhead.
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr,
                             foreach=True)


def _load_optimizer_state(opt: torch.optim.Optimizer, state: dict) -> None:
    """Load a checkpoint's optimizer state, keeping how this optimizer computes its steps.

    ``load_state_dict`` also takes every saved group setting, ``foreach`` included: a
    checkpoint written before `_optimizer` chose the multi-tensor kernels would turn them off
    for the rest of the run (the same numbers on CPU, only slower)."""
    implementation = [group["foreach"] for group in opt.param_groups]
    opt.load_state_dict(state)
    for group, foreach in zip(opt.param_groups, implementation, strict=True):
        group["foreach"] = foreach


def _train_step(model, opt, images, tokens, step, cfg, meter, patch_sizes=(None,),
                coarse_fraction: float = 0.0) -> float:
    """One optimizer step on the sigmoid loss. With several patch sizes the sub-batch's
    images are split in contiguous parts, one per size (Flexi-JEST multi-resolution
    training); the loss is still the one over the whole sub-batch."""
    for group in opt.param_groups:
        group["lr"] = _lr_at(step, cfg)
    opt.zero_grad(set_to_none=True)
    parts = _split_sizes(images.shape[0], patch_sizes, coarse_fraction)

    def forward_backward():
        if len(parts) == 1:
            loss = sigmoid_loss(*model(images, tokens, parts[0][0]))
        else:
            # Only how each image is encoded differs between the parts: every image still
            # meets every caption of the sub-batch, so the contrastive loss keeps all b - 1
            # negatives per pair. (Separate losses per part would halve them; measured, that
            # learned slower: docs/results.md.)
            loss = sigmoid_loss(encode_image_parts(model, images, parts),
                                model.encode_text(tokens), model.logit_scale, model.logit_bias)
        loss.backward()
        return loss.item()

    loss = meter.run("train", (images.shape[0], tuple(parts)), forward_backward)
    opt.step()
    return loss


def _order_for_training(idx: torch.Tensor, cfg: LearnerConfig, train_patches: tuple,
                       generator: torch.Generator) -> torch.Tensor:
    """The selected indices idx [b] in the order the training step takes them.

    The selector returns its picks in the order drawn (the first chunk, the most learnable
    alone, first), and a multi-resolution step trains contiguous parts, the coarse one last.
    So with ``multires_split="random"`` they are shuffled (from the selection's generator:
    a resumed run shuffles alike); with "first_drawn_fine", and with one resolution, they
    keep the order drawn."""
    if len(train_patches) > 1 and cfg.multires_split == "random":
        return idx[torch.randperm(len(idx), generator=generator)]
    return idx


def _diverged(model: DualEncoder) -> bool:
    """Whether a weight is not finite, or the temperature t = exp(log t) the scores use is
    not finite and positive: a huge step can drive log t so low that t underflows to 0,
    which leaves every logit at the bias (chance-level scores, and a selector error)."""
    with torch.no_grad():
        t = float(model.logit_scale)
        return not (math.isfinite(t) and t > 0
                    and all(bool(torch.isfinite(p).all()) for p in model.parameters()))


def _evaluate_run(model: DualEncoder, data: DigitsWeb, step: int, cfg, what: str) -> dict:
    """`evaluate` on test during a run, once the weights and temperature are checked finite:
    an update that broke them (the loss before it was still finite) is the run diverging,
    said so, rather than an evaluation error or a chance-level score."""
    if _diverged(model):
        raise _divergence(what, cfg, f"at step {step + 1}: its weights or temperature are no "
                                     f"longer finite (or t underflowed to 0)")
    return evaluate(model, data.test, data.tokenizer)


def _check_loss(loss: float, step: int, cfg, what: str) -> None:
    """ValueError once a training loss is not finite: the run has diverged, and every later
    step and evaluation would be NaN (found in review: a demo reported such a run as a
    plateaued baseline)."""
    if not math.isfinite(loss):
        raise _divergence(what, cfg, f"at step {step + 1}: the loss is {loss}")


def _divergence(what: str, cfg, when: str) -> ValueError:
    """The error of a diverged run: `what` ("learner"/"reference") diverged `when`, and the
    field to change (its own, and a demo config's)."""
    return ValueError(f"{what} training diverged {when}; lower the learning rate "
                      f"(lr={cfg.lr}; in a demo config {what}.lr)")


def _split_sizes(b: int, patch_sizes, coarse_fraction: float) -> list[tuple[int | None, int]]:
    if len(patch_sizes) == 1:
        return [(patch_sizes[0], b)]
    fine, coarse = patch_sizes
    n_coarse = round(b * coarse_fraction)
    return [(fine, b - n_coarse), (coarse, n_coarse)]


def encode_image_parts(model: DualEncoder, images: torch.Tensor,
                       parts: list[tuple[int | None, int]]) -> torch.Tensor:
    """Image embeddings [B, D] of images [B, C, S, S], each contiguous part at its own patch
    size (`parts`: (patch size, rows) in order, as `_split_sizes` gives them): Flexi-JEST's
    multi-resolution training forward."""
    return torch.cat([model.encode_image(images[sl], patch)
                      for patch, sl in _part_slices(parts)])


def _part_slices(parts: list[tuple[int | None, int]]) -> list[tuple[int | None, slice]]:
    """(patch size, slice of the sub-batch) of every non-empty part, in order."""
    out, start = [], 0
    for patch, size in parts:
        if size:
            out.append((patch, slice(start, start + size)))
        start += size
    return out


# --- the reference ---------------------------------------------------------------------------


def _check_patch_divides(patch_size: int, image_size: int, prefix: str = "") -> None:
    """ValueError unless the patch tiles the image (the config knows no image size)."""
    if image_size % patch_size:
        raise ValueError(f"{prefix}patch_size must divide the image size {image_size}: one "
                         f"of {list(patch_sizes(image_size))}, got {patch_size}")


def train_reference(data: DigitsWeb, cfg: ReferenceConfig = ReferenceConfig(),
                    progress: Callable[[int, int], None] | None = None) -> tuple[DualEncoder, dict]:
    """Train the reference on the curated split (uniform minibatches, sigmoid loss).

    Returns (model, info) with info = {"metrics": evaluate(...) on test, "flops": its
    training FLOPs, "config": asdict(cfg)}.
    """
    if not isinstance(data, DigitsWeb):
        raise TypeError(f"data must be a DigitsWeb (load_digits_web(...)), got "
                        f"{type(data).__name__}")
    if not isinstance(cfg, ReferenceConfig):  # a LearnerConfig would train, silently, as one
        raise TypeError(f"cfg must be a ReferenceConfig, got {type(cfg).__name__}")
    if cfg.batch_size > len(data.curated):
        raise ValueError(f"reference batch_size must be in [1, {len(data.curated)}] (the "
                         f"curated split's size), got {cfg.batch_size}")
    _check_patch_divides(cfg.patch_size, data.curated.images.shape[-1], "reference ")
    check_trainable(cfg, data.tokenizer.vocab_size, "ReferenceConfig")
    model = DualEncoder(model_config(cfg, data.tokenizer.vocab_size), seed=cfg.seed)
    opt = _optimizer(model, cfg)
    sampler = SuperBatchSampler(data.curated, cfg.batch_size, seed=cfg.seed,
                                epoch_boundary=cfg.epoch_boundary)
    ledger = FlopLedger()
    meter = _FlopMeter(ledger)
    model.train()
    for step in range(cfg.steps):
        batch = sampler.next()
        loss = _train_step(model, opt, batch.images, batch.tokens, step, cfg, meter)
        _check_loss(loss, step, cfg, "reference")
        if progress:
            progress(step + 1, cfg.steps)
    model.eval()
    return model, {"metrics": _evaluate_run(model, data, cfg.steps - 1, cfg, "reference"),
                   "flops": ledger.train,
                   "config": asdict(cfg)}


# --- the learner -----------------------------------------------------------------------------


@dataclass
class RunResult:
    """What a learner run produced. Curves are aligned lists, one entry per evaluation."""

    config: dict
    steps: list[int] = field(default_factory=list)
    zero_shot_accuracy: list[float] = field(default_factory=list)
    i2t_recall: list[float] = field(default_factory=list)
    t2i_recall: list[float] = field(default_factory=list)
    cumulative_flops: list[dict] = field(default_factory=list)  # ledger at each evaluation
    clean_fraction: list[float] = field(default_factory=list)  # of selected, since last eval
    train_loss: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


#: Looks up the reference's embeddings of a super-batch (e.g. in a cache) by its example ids.
ReferenceEmbedder = Callable[[Batch], ModelEmbeddings]


def _check_run_arguments(data, cfg, reference, reference_embedder) -> None:
    """The arguments' types, with what to pass instead, and a cache checked against the
    data it scores: a ReferenceCache opened without split= would otherwise serve any data
    whose ids it holds."""
    if not isinstance(data, DigitsWeb):
        hint = " (the whole data set, not one split)" if isinstance(data, Split) else ""
        raise TypeError(f"data must be a DigitsWeb (load_digits_web(...)){hint}, got "
                        f"{type(data).__name__}")
    if not isinstance(cfg, LearnerConfig):
        raise TypeError(f"cfg must be a LearnerConfig, got {type(cfg).__name__}")
    if data.pool.is_clean is None:  # read by the clean-fraction curve only, never by selection
        raise ValueError("data.pool.is_clean is None: a run records the clean fraction of what "
                         "it selects; give the pool a bool [n] is_clean")
    if reference is not None and not isinstance(reference, DualEncoder):
        hint = (": a cache goes in reference_embedder=cache.embeddings"
                if isinstance(reference, ReferenceCache) else
                ": load a saved one with jestkit.models.load_model(path)"
                if isinstance(reference, (str, os.PathLike)) else "")
        raise TypeError(f"reference must be a jestkit DualEncoder or None, got "
                        f"{type(reference).__name__}{hint}")
    if reference_embedder is None:
        return
    if isinstance(reference_embedder, ReferenceCache):
        raise TypeError("reference_embedder is a function of a Batch: pass cache.embeddings, "
                        "not the cache itself")
    if not callable(reference_embedder):
        raise TypeError(f"reference_embedder must be callable (Batch -> ModelEmbeddings), got "
                        f"{type(reference_embedder).__name__}")
    cache = getattr(reference_embedder, "__self__", None)
    if isinstance(cache, ReferenceCache):
        cache.check(split=data.pool, model=reference)  # the reference, if given: its own
    elif reference is not None:
        raise ValueError("give reference or reference_embedder, not both: the embedder "
                         "replaces the reference's forward, so the reference would go unused "
                         "(with a ReferenceCache's embeddings it is checked against the cache)")


def train_learner(
    data: DigitsWeb,
    cfg: LearnerConfig,
    reference: DualEncoder | None = None,
    *,
    reference_embedder: ReferenceEmbedder | None = None,
    run_dir: str | os.PathLike | None = None,
    resume: bool = False,
    stop_after: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> RunResult:
    """Train a learner on the pool with the configured selection.

    Args:
        data: the benchmark data (pool to train on, test to evaluate on).
        cfg: the run's configuration.
        reference: the frozen reference model (needed unless method is uniform or
            hard_learner, or a `reference_embedder` is given).
        reference_embedder: looks up the reference's embeddings of a super-batch (e.g. from a
            cache) instead of running the reference; its FLOPs then count as zero. A
            ReferenceCache's `embeddings` is first checked against data.pool, and against
            `reference` if that is given too; with any other embedder, give no reference.
        run_dir: where checkpoints go, atomically: every cfg.checkpoint_every steps and at
            the last step run (None: no checkpoints, whatever checkpoint_every says). A fresh
            run (resume=False) refuses a run_dir that already holds checkpoints (a
            half-written one left by a crash does not count; each save removes such debris).
        resume: continue from the newest checkpoint in run_dir that verifies (its checksums;
            a damaged one is named in a warning and the one before it taken); the result
            equals an uninterrupted run's. The checkpoint must come from the same config and
            the same reference (the same model, live or from a cache of it, by fingerprint).
        stop_after: stop once this many steps are done, after writing a checkpoint to
            run_dir (required), to resume later. A run resumed past it is returned as it is,
            with a warning.

    Returns:
        RunResult with the evaluation curves and the cumulative FLOPs per phase.
    """
    _check_run_arguments(data, cfg, reference, reference_embedder)
    if cfg.needs_reference and reference is None and reference_embedder is None:
        raise ValueError(f"method {cfg.method!r} needs a reference model or reference_embedder")
    if cfg.batch_size > len(data.pool):
        raise ValueError(f"batch_size must be in [1, {len(data.pool)}] (the pool size), "
                         f"got {cfg.batch_size}")
    if cfg.super_batch_size > len(data.pool):
        raise ValueError(f"batch_size / (1 - filter_ratio) = {cfg.super_batch_size} exceeds the "
                         f"pool size {len(data.pool)}; lower batch_size or filter_ratio")
    if stop_after is not None and (isinstance(stop_after, bool) or not isinstance(stop_after, int)
                                   or stop_after < 1):
        raise ValueError(f"stop_after must be an int >= 1, got {stop_after!r}")
    if not isinstance(resume, bool):  # "no" would resume
        raise TypeError(f"resume must be a bool, got {resume!r}")
    if run_dir is None and (stop_after is not None or resume):
        raise ValueError("stop_after and resume need a run_dir to keep checkpoints in")
    if run_dir is not None and str(run_dir) == "":  # as `jestkit demo --out ""`
        raise ValueError("run_dir must name a directory, got '' (an unset variable?)")
    ckpt_root = None if run_dir is None else Path(run_dir) / "checkpoints"
    if ckpt_root is not None:
        for path in (Path(run_dir), ckpt_root):
            if path.exists() and not path.is_dir():
                raise ValueError(f"run_dir: {path} exists and is not a directory")
        _check_not_inside_a_checkpoint(Path(run_dir))
    if not resume and ckpt_root is not None and ckpt_root.exists() and any(
            not unfinished_write(p) for p in ckpt_root.iterdir()):
        raise FileExistsError(f"{ckpt_root} already holds checkpoints: pass resume=True to "
                              f"continue that run, or use another run_dir")
    reference_id = _reference_identity(cfg, reference, reference_embedder)

    _check_patch_divides(cfg.patch_size, data.pool.images.shape[-1])
    check_trainable(cfg, data.tokenizer.vocab_size, "LearnerConfig")
    model_cfg = model_config(cfg, data.tokenizer.vocab_size)
    model = DualEncoder(model_cfg, seed=cfg.seed)
    if cfg.score_patch_size and cfg.score_patch_size not in model_cfg.allowed_patch_sizes:
        raise ValueError(f"score_patch_size must be one of {model_cfg.allowed_patch_sizes}, "
                         f"got {cfg.score_patch_size}")
    opt = _optimizer(model, cfg)
    sampler = SuperBatchSampler(data.pool, cfg.super_batch_size, seed=cfg.seed,
                                epoch_boundary=cfg.epoch_boundary)
    select_gen = torch.Generator().manual_seed(cfg.seed * 7919 + 1)
    selector = None
    if cfg.method != "uniform":
        selector = JointSelector(cfg.method, batch_size=cfg.batch_size, n_chunks=cfg.n_chunks,
                                 selection=cfg.selection)
    ledger = FlopLedger()
    meter = _FlopMeter(ledger)
    result = RunResult(config=asdict(cfg))
    start = 0
    clean_seen = [0, 0]  # clean selected, all selected, since the last evaluation
    if resume:
        start = _load_checkpoint(run_dir, cfg, model, opt, sampler, select_gen, ledger, result,
                                 clean_seen, reference_id)
    train_patches = (None,)
    if cfg.score_patch_size and cfg.multires_fraction > 0:
        train_patches = (model_cfg.patch_size, cfg.score_patch_size)

    model.train()
    end = cfg.steps if stop_after is None else min(cfg.steps, stop_after)
    if start > end:  # resumed past it: the run is not cut back, and the caller should know
        warnings.warn(f"stop_after={stop_after}, but the run resumed from step {start}: it is "
                      f"returned as it is, at step {start}", stacklevel=2)
    if ckpt_root is not None and start < end:  # now, not at the first save after training
        _check_writable(ckpt_root)
        _check_saves_can_land(ckpt_root, start, end, cfg.checkpoint_every)
    for step in range(start, end):
        batch = sampler.next()
        if selector is not None:
            try:
                idx = _select(batch, model, cfg, selector, select_gen, meter, reference,
                              reference_embedder, data.pool)
            except ValueError as err:  # the selector's checks of the learner's embeddings
                if not _diverged(model):
                    raise
                raise _divergence("learner", cfg, f"by step {step}: its weights or temperature "
                                                  f"are no longer finite (or t underflowed to "
                                                  f"0: {err})") from None
            idx = _order_for_training(idx, cfg, train_patches, select_gen)
            batch = batch.take(idx)
        clean_seen[0] += int(data.pool.is_clean[batch.indices].sum())  # report only
        clean_seen[1] += len(batch.indices)
        loss = _train_step(model, opt, batch.images, batch.tokens, step, cfg, meter,
                           train_patches, cfg.multires_fraction)
        _check_loss(loss, step, cfg, "learner")
        done = step + 1
        if done % cfg.eval_interval == 0 or done == cfg.steps:
            metrics = _evaluate_run(model, data, step, cfg, "learner")
            result.steps.append(done)
            result.zero_shot_accuracy.append(metrics["zero_shot_accuracy"])
            result.i2t_recall.append(metrics["i2t_recall@1"])
            result.t2i_recall.append(metrics["t2i_recall@1"])
            result.cumulative_flops.append(ledger.as_dict())
            result.clean_fraction.append(clean_seen[0] / max(1, clean_seen[1]))
            result.train_loss.append(loss)
            clean_seen[:] = [0, 0]
        if run_dir is not None and (done == end or (cfg.checkpoint_every
                                                    and done % cfg.checkpoint_every == 0)):
            _save_checkpoint(run_dir, cfg, done, model, opt, sampler, select_gen, ledger,
                             result, clean_seen, reference_id)
        if progress:
            progress(done, cfg.steps)
    return result


def _select(batch, model, cfg, selector, gen, meter, reference, reference_embedder, pool):
    """Score the super-batch under no-grad and return the indices of the sub-batch (rows of
    `batch`, which `pool` holds at `batch.indices`)."""
    n = batch.images.shape[0]
    # The view both models score (a cache of views="stored" holds the stored images only;
    # one of views="shifts" looks up each row's own view, or the stored one under "stored").
    images = batch.images if cfg.score_view == "augmented" else pool.images[batch.indices]
    if cfg.score_view == "stored":  # the batch as the reference embedder is to score it
        batch = dataclasses.replace(batch, images=images, views=None)
    learner_emb = None
    if USES_LEARNER[cfg.method]:
        patch = cfg.score_patch_size or None
        with torch.no_grad():
            img, txt, t, c = meter.run("learner_scoring", (n, patch),
                                       lambda: model(images, batch.tokens, patch))
        learner_emb = ModelEmbeddings(img, txt, t, c)
    reference_emb = None
    if cfg.needs_reference:
        if reference_embedder is not None:
            reference_emb = reference_embedder(batch)  # cached: no model FLOPs
        else:
            with torch.no_grad():
                img, txt, t, c = meter.run("reference_scoring", (n,),
                                           lambda: reference(images, batch.tokens))
            reference_emb = ModelEmbeddings(img, txt, t, c)
    # The selector's own matmuls (pairwise logits) are compute too: a ledger phase of their
    # own. Its FLOPs depend on N, b, K and the embedding dims, all fixed within a run.
    return meter.run("selection", (n,),
                     lambda: selector(learner_emb, reference_emb, generator=gen))


# --- checkpoints -----------------------------------------------------------------------------
# A checkpoint is a directory step_XXXXXXX/ with the weights (safetensors), the rest of the
# state (optimizer, RNGs, data position, curves; torch.save) and checksums.json (the SHA-256
# of both files, and the step). It is written under a temporary name and renamed into place,
# so a directory under a step_ name is complete; `latest` then names it, for people and tools.
# A resume does not trust `latest`: it takes the newest step_ directory that verifies (its
# checksums, its step, its state's keys), and falls back to the one before, with a warning,
# if the newest is damaged. Either continues to the same result (every run is deterministic).


def _reference_identity(cfg, reference, reference_embedder) -> str | None:
    """What a resumed run must score with again: "live:<fingerprint>",
    "cached:<fingerprint>" (a cache of views="stored" scores un-shifted images, so under
    score_view="augmented" the two differ; under "stored" they would select alike, but a run
    resumes with the kind it started with all the same) or "cached-shifts:<fingerprint>" (a
    cache of every shifted view),
    "embedder" for a lookup of unknown origin, None when the method uses no reference."""
    if not cfg.needs_reference:
        return None
    if reference_embedder is None:
        return f"live:{model_fingerprint(reference)}"
    cache = getattr(reference_embedder, "__self__", None)  # e.g. ReferenceCache.embeddings
    manifest = getattr(cache, "manifest", None)
    if isinstance(manifest, dict) and "model" in manifest:
        kind = "cached" if getattr(cache, "views", "stored") == "stored" else "cached-shifts"
        return f"{kind}:{manifest['model']['fingerprint']}"
    return "embedder"


# 2: LearnerConfig has patch_size, and multi-resolution training is one loss over the whole
# sub-batch. State without a version (1) was written before both.
# 3: LearnerConfig has text_heads (the text tower had 4 heads before).
# 4: every checkpoint has checksums.json (a version-4 state without it is damaged).
# 5: LearnerConfig has multires_split; before, multi-resolution training always trained the
#    first-drawn examples at the fine patch size ("first_drawn_fine").
# 6: LearnerConfig has epoch_boundary; before, the sampler always drew "tail_last". The
#    sampler's state holds the data's content digest.
# 7: LearnerConfig has score_view; before, the models always scored the augmented view.
_STATE_VERSION = 7
_CHECKSUMS = "checksums.json"
_CHECKPOINT_FILES = ("model.safetensors", "state.pt")
_STEP_DIR = re.compile(r"step_(\d{7,})")  # f"{step:07d}": 8 digits from step 10**7
_STATE_KEYS = ("config", "step", "optimizer", "sampler", "select_generator", "ledger",
               "result", "clean_seen")


def _check_writable(ckpt_root: Path) -> None:
    """run_dir/checkpoints must be a directory this process can write into (made if absent)."""
    try:
        ckpt_root.mkdir(parents=True, exist_ok=True)
        # A hidden temp name: if this process dies right here, it is debris a save removes.
        fd, probe = tempfile.mkstemp(dir=ckpt_root, prefix=".write-test.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise ValueError(f"run_dir: cannot write checkpoints into {ckpt_root} "
                         f"({err.strerror or err})") from None


def _check_not_inside_a_checkpoint(run_dir: Path) -> None:
    """run_dir must not lie inside another run's checkpoint directory (found in review: that
    run's next save removed the older checkpoint with this run's inside it)."""
    parts = run_dir.resolve().parts
    for i in range(1, len(parts) - 1):
        if parts[i] == "checkpoints" and _STEP_DIR.fullmatch(parts[i + 1]):
            raise ValueError(f"run_dir {run_dir} is inside another run's checkpoint "
                             f"({Path(*parts[:i + 2])}), which that run replaces or removes "
                             f"as it saves; give a directory of its own")


def _check_saves_can_land(ckpt_root: Path, start: int, end: int, every: int) -> None:
    """Before training: no file where a save of this run (steps start+1..end) puts its
    step directory, and `latest` not a directory (found in review: both failed only at the
    save, after the training, and the first left the only copy of its state in a temporary
    directory that the next save deletes)."""
    latest = ckpt_root / "latest"
    if latest.is_dir():
        raise ValueError(f"run_dir: {latest} is a directory, where a save writes the name of "
                         f"the newest checkpoint; move it away")
    for path in ckpt_root.iterdir():
        match = _STEP_DIR.fullmatch(path.name)
        if not match or path.is_dir():
            continue
        step = int(match.group(1))
        if start < step <= end and (step == end or (every and step % every == 0)):
            raise ValueError(f"run_dir: {path} is not a directory, where this run saves its "
                             f"step-{step} checkpoint; move it away")


def _only_checkpoint_files(ckpt: Path) -> bool:
    """Whether the directory `ckpt` holds nothing but a checkpoint's own files (what a save
    may remove: never another run's files put there)."""
    own = {*_CHECKPOINT_FILES, _CHECKSUMS}
    try:
        return all(p.name in own and p.is_file() and not p.is_symlink()
                   for p in ckpt.iterdir())
    except OSError:
        return False


def _save_checkpoint(run_dir, cfg, step, model, opt, sampler, gen, ledger, result, clean_seen,
                     reference_id):
    run_dir = Path(run_dir)
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    final = ckpt_root / f"step_{step:07d}"
    with replacing_directory(final) as tmp:
        save_model(model, tmp / "model.safetensors")
        state = {"version": _STATE_VERSION, "config": asdict(cfg), "step": step,
                 "optimizer": opt.state_dict(), "sampler": sampler.state_dict(),
                 "select_generator": gen.get_state(),
                 "ledger": ledger.as_dict(), "result": result.to_dict(),
                 "clean_seen": list(clean_seen), "reference": reference_id}
        with open(tmp / "state.pt", "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        sums = {"step": step, "sha256": {name: sha256_file(tmp / name)
                                         for name in _CHECKPOINT_FILES}}
        atomic_write(tmp / _CHECKSUMS, json.dumps(sums, indent=1))
    atomic_write(ckpt_root / "latest", final.name)
    # Keep this one and, as a spare, the newest earlier one that verifies (a damaged one is
    # no spare); remove the other earlier ones. Never touch a step after this one.
    older = sorted((s, p) for s, p in _step_dirs(ckpt_root) if s < step)
    spare = next((p for s, p in reversed(older) if _verifies(p, s)), None)
    for _, old in older:
        if old != spare and _only_checkpoint_files(old):  # anything else there stays
            shutil.rmtree(old, ignore_errors=True)
    # What a crash mid-save left behind (a run has one writer, so any is from an earlier,
    # interrupted save): a half-written checkpoint, or the set-aside copy of a replaced one
    # whose replacement is in place. A set-aside copy without its replacement is the only
    # copy of that checkpoint and stays.
    for debris in ckpt_root.iterdir():
        original = set_aside_copy_of(debris)
        if unfinished_write(debris) or (original and (ckpt_root / original).is_dir()):
            if debris.is_dir():
                shutil.rmtree(debris, ignore_errors=True)
            else:
                debris.unlink(missing_ok=True)


def _checksum_problem(ckpt: Path, step: int) -> str | None:
    """What is wrong with checkpoint directory `ckpt` (named for `step`) by its checksums.json:
    a file missing, altered or truncated, or the checkpoint of another step. None if nothing,
    or if it has no checksums.json (written before them: `_read_checkpoint` decides)."""
    sums_path = ckpt / _CHECKSUMS
    if not sums_path.is_file():
        return None
    try:
        sums = json.loads(sums_path.read_text())
        digests, sums_step = sums["sha256"], sums["step"]
        if not isinstance(digests, dict):
            raise TypeError("sha256 is not an object")
    except (ValueError, KeyError, TypeError, RecursionError) as err:
        what = "JSON nested too deeply" if isinstance(err, RecursionError) else err
        return f"{sums_path} cannot be read ({what})"
    for name in _CHECKPOINT_FILES:
        path = ckpt / name
        if not path.is_file():
            return f"{path} is missing"
        if sha256_file(path) != digests.get(name):
            return f"{path} fails its checksum (altered or truncated)"
    if sums_step != step:
        return f"{ckpt} holds step {sums_step}'s checkpoint (moved or copied?)"
    return None


def _read_checkpoint(ckpt: Path, step: int) -> dict:
    """The state of checkpoint directory `ckpt` (named for `step`), verified: ValueError
    naming what is wrong if it is damaged (see `_checksum_problem`; also a state torch cannot
    read, of another step, or without a state's keys)."""
    problem = _checksum_problem(ckpt, step)
    if problem:
        raise ValueError(problem)
    sums_path = ckpt / _CHECKSUMS
    path = ckpt / "state.pt"
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        state = torch.load(path, weights_only=True)
    except Exception as err:  # torch's errors for torn or foreign files name no file
        raise ValueError(f"{path} cannot be read ({type(err).__name__}: "
                         f"{str(err).splitlines()[0] if str(err) else 'empty'})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}: not a checkpoint's state")
    missing = [k for k in _STATE_KEYS if k not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}: not a checkpoint's state")
    if not sums_path.is_file():
        if state.get("version", 1) >= 4:
            raise ValueError(f"{sums_path} is missing")
        load_model(ckpt / "model.safetensors")  # no checksums then: read it to know it whole
    if state["step"] != step:
        raise ValueError(f"{path} is step {state['step']}'s state (moved or copied?)")
    return state


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """(step, directory) of every checkpoint directory under root, in no particular order."""
    return [(int(m.group(1)), p) for p in (root.iterdir() if root.is_dir() else ())
            if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]


def _verifies(ckpt: Path, step: int) -> bool:
    """Whether a checkpoint's files are there and match its checksums (cheap: no unpickling).
    One written before checksums cannot be told: it counts as verified if its files are there."""
    return (all((ckpt / name).is_file() for name in _CHECKPOINT_FILES)
            and _checksum_problem(ckpt, step) is None)


def _newest_checkpoint(run_dir) -> tuple[Path, dict]:
    """The newest checkpoint of run_dir that verifies, and its state; older ones are tried, with
    a warning, when newer ones are damaged."""
    root = Path(run_dir) / "checkpoints"
    found = sorted(_step_dirs(root), reverse=True)
    if not found:
        raise FileNotFoundError(f"no checkpoint to resume in {run_dir} (no {root}/step_*)")
    damaged = []
    for step, ckpt in found:
        try:
            state = _read_checkpoint(ckpt, step)
        except ValueError as err:
            damaged.append(str(err))
            continue
        if damaged:
            warnings.warn(f"resuming from {ckpt}: the newer checkpoints are damaged ("
                          + "; ".join(damaged) + "). The run continues from this one to the "
                          "same result. A damaged one is replaced when the run saves that step "
                          "again; one it never saves stays until it is deleted.",
                          stacklevel=4)
        return ckpt, state
    raise ValueError(f"no checkpoint in {root} can be resumed: " + "; ".join(damaged))


def multires_split_of_older_run(config: dict, default: str) -> str:
    """The multires_split a learner run saved before the option existed ran with (its
    config, as a dict): a selected multi-resolution run trained its first-drawn picks at the
    fine patch size, "first_drawn_fine"; any other run never split, so `default` fits it."""
    multires = (config.get("multires_fraction") and config.get("score_patch_size")
                and config.get("method") != "uniform")
    return "first_drawn_fine" if multires else default


def _load_checkpoint(run_dir, cfg, model, opt, sampler, gen, ledger, result, clean_seen,
                     reference_id) -> int:
    ckpt, state = _newest_checkpoint(run_dir)
    saved = dict(state["config"])
    if state.get("version", 1) < 2:
        if saved.get("multires_fraction"):
            raise ValueError(f"checkpoint {ckpt} was written before multi-resolution training "
                             f"computed one loss over the whole sub-batch (it had one per part);"
                             f" resuming would change the loss mid-run: start the run afresh")
        saved.setdefault("patch_size", PATCH_SIZE_BEFORE_OPTION)
    if state.get("version", 1) < 3:
        saved.setdefault("text_heads", 4)  # always 4 then: resumable with text_heads=4
    if state.get("version", 1) < 5:
        saved.setdefault("multires_split", multires_split_of_older_run(saved,
                                                                       cfg.multires_split))
    if state.get("version", 1) < 6:
        saved.setdefault("epoch_boundary", EPOCH_BOUNDARY_BEFORE_OPTION)
    if state.get("version", 1) < 7:
        saved.setdefault("score_view", SCORE_VIEW_BEFORE_OPTION)
    if saved != asdict(cfg):
        diff = {k: (saved.get(k), v) for k, v in asdict(cfg).items() if saved.get(k) != v}
        why = (" (checkpoints written before multires_split existed trained the first-drawn "
               "picks at the fine patch size: resume them with "
               "multires_split='first_drawn_fine')"
               if "multires_split" in diff and state.get("version", 1) < 5 else "")
        if "score_view" in diff and state.get("version", 1) < 7:
            why += (" (checkpoints written before score_view existed scored the augmented "
                    "view: resume them with score_view='augmented')")
        if "epoch_boundary" in diff and state.get("version", 1) < 6:
            why += (" (checkpoints written before epoch_boundary existed drew their super-"
                    "batches by the old rule: resume them with epoch_boundary='tail_last')")
        raise ValueError(f"checkpoint {ckpt} was written by a different config; differing "
                         f"fields (checkpoint, now): {diff}{why}. If it is not this run's "
                         f"(copied in?), move it away to resume from an earlier checkpoint")
    if set(state["ledger"]) != set(ledger.as_dict()):
        # e.g. written before the selector's FLOPs were a phase: resuming would undercount
        raise ValueError(f"checkpoint {ckpt} has FLOP phases {sorted(state['ledger'])}, this "
                         f"version counts {sorted(ledger.as_dict())}; start the run afresh")
    if state.get("reference") != reference_id:
        raise ValueError(f"checkpoint {ckpt} was scored with reference {state.get('reference')}"
                         f", this run with {reference_id}: resuming would not continue the same "
                         f"run")
    loaded = load_model(ckpt / "model.safetensors")
    if loaded.config != model.config:
        raise ValueError(f"checkpoint {ckpt} holds a model of another architecture")
    model.load_state_dict(loaded.state_dict())
    _load_optimizer_state(opt, state["optimizer"])
    try:
        sampler.load_state_dict(state["sampler"])
    except ValueError as err:  # e.g. saved for another split: another data set
        raise ValueError(f"checkpoint {ckpt}: {err}") from None
    gen.set_state(state["select_generator"])
    for k, v in state["ledger"].items():
        setattr(ledger, k, v)
    for f in dataclasses.fields(result):
        setattr(result, f.name, state["result"][f.name])
    # An older checkpoint's result holds its config as written then; the fields filled in
    # above (defaults of later versions) are the run's too, as an uninterrupted run reports.
    result.config = asdict(cfg)
    clean_seen[:] = state["clean_seen"]
    return state["step"]


__all__ = [
    "METHODS",
    "MULTIRES_SPLITS",
    "SCORE_VIEWS",
    "SCORE_VIEW_BEFORE_OPTION",
    "LearnerConfig",
    "ReferenceConfig",
    "RunResult",
    "check_trainable",
    "encode_image_parts",
    "evaluate",
    "model_config",
    "small_model",
    "train_learner",
    "train_reference",
]
