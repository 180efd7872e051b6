"""How much of its digit does each image corruption of digits-web leave readable?

The pool's "corrupt_image" pairs (15%) keep a caption naming the right digit and count as
not clean: reports and the clean-pool ceiling treat them as noise. How much that label is
right depends on the corruption. This benchmark fits a plain classifier on the curated
split's clean images (500, 50 per digit; logistic regression on the pixels) and reads:

- the test split's clean images (1,000, never seen in the fit);
- the same test images after each corruption `digits-web` applies (`jestkit.data.CORRUPTIONS`,
  made by the data's own `_corrupt`, one seeded draw per image);
- the pool's own clean and corrupted images.

Chance is 10%. An image the classifier still reads is one a contrastive learner can still
learn its caption from.

    python benchmarks/corruption_readability.py               # data seeds 0, 1, 2
    python benchmarks/corruption_readability.py --seeds 0     # one data seed, ~10 s
"""

from __future__ import annotations

import argparse

import numpy as np
from sklearn.linear_model import LogisticRegression

from jestkit.data import CORRUPTIONS, NOISE_KINDS, _corrupt, load_digits_web

_CORRUPT = NOISE_KINDS.index("corrupt_image")
_CLEAN = NOISE_KINDS.index("clean")


def readability(seed: int) -> dict[str, float]:
    """Accuracy of a classifier fit on the curated images of data seed `seed`, on each kind
    of image (keys: "test clean", "test <corruption>", "pool clean", "pool corrupt_image")."""
    data = load_digits_web(seed)

    def pixels(images) -> np.ndarray:
        return np.asarray(images).reshape(len(images), -1)

    fit = LogisticRegression(C=0.1, max_iter=2000).fit(pixels(data.curated.images),
                                                       data.curated.labels.numpy())
    test = data.test.images[:, 0].numpy()
    labels = data.test.labels.numpy()
    out = {"test clean": float(fit.score(pixels(test), labels))}
    for kind in CORRUPTIONS:
        rng = np.random.default_rng(seed)
        corrupted = np.stack([_corrupt(img, kind, rng) for img in test])
        out[f"test {kind}"] = float(fit.score(pixels(corrupted), labels))
    kinds = data.pool.noise_kind.numpy()
    for name, code in (("pool clean", _CLEAN), ("pool corrupt_image", _CORRUPT)):
        rows = kinds == code
        out[name] = float(fit.score(pixels(data.pool.images.numpy()[rows]),
                                    data.pool.labels.numpy()[rows]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="data seeds (default 0 1 2)")
    args = parser.parse_args(argv)
    if any(not 0 <= s <= 2**32 - 1 for s in args.seeds):
        parser.error(f"--seeds must be in [0, {2**32 - 1}], got {args.seeds}")
    results = {seed: readability(seed) for seed in args.seeds}
    keys = list(next(iter(results.values())))
    print("| images | " + " | ".join(f"data seed {s}" for s in args.seeds) + " | mean |")
    print("|---|" + "---|" * (len(args.seeds) + 1))
    for key in keys:
        values = [results[s][key] for s in args.seeds]
        print(f"| {key} | " + " | ".join(f"{100 * v:.1f}%" for v in values)
              + f" | {100 * float(np.mean(values)):.1f}% |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
