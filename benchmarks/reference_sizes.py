"""How good a reference the 500 curated pairs can give: train references of several sizes and
lengths, report each one's zero-shot accuracy on `test`, its training FLOPs and wall time.

    python benchmarks/reference_sizes.py               # the grid below, ~6 min (one thread)
    python benchmarks/reference_sizes.py --quick       # smoke test, seconds
    python benchmarks/reference_sizes.py --spec '{"width": 96, "steps": 3200}'

Every reference is `jestkit.training.train_reference` on digits-web's curated split (data seed
0, captions padded as in the demo), one thread, fields not given taken from
`ReferenceConfig()`; each run is deterministic, so the table reproduces. One seed per size:
differences of a point or so are within what another seed would move.

Why: learnability is learner loss minus reference loss, so once the learner passes its
reference, wrong captions start to score as learnable (docs/results.md). A bigger, longer
trained reference is the paper's "JEST++" lever; this table is how the reference of
configs/demo-long-reference-w96.json and demo-T20000-reference-w96.json was chosen (the
largest here, without looking at any learner run).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, fields

import torch

from jestkit.data import load_digits_web
from jestkit.demo import DEMO_MAX_TEXT_LEN
from jestkit.training import ReferenceConfig, train_reference

GRID = [
    {"steps": 800},  # the default demo's reference
    {"steps": 1600},  # the "strong" reference of the long-run configs
    {"steps": 3200},
    {"steps": 6400},
    {"steps": 1600, "lr": 0.002},
    {"steps": 1600, "width": 48},
    {"steps": 3200, "width": 48},
    {"steps": 1600, "width": 48, "depth": 2},
    {"steps": 3200, "width": 48, "depth": 2},
    {"steps": 1600, "width": 64},
    {"steps": 3200, "width": 64},
    {"steps": 3200, "width": 64, "depth": 2},
    {"steps": 1600, "width": 96},
    {"steps": 3200, "width": 96},
]
QUICK = [{"steps": 5, "batch_size": 16, "width": 16}, {"steps": 5, "batch_size": 16}]


def _spec(text: str) -> dict:
    try:
        spec = json.loads(text)
    except json.JSONDecodeError as err:
        raise argparse.ArgumentTypeError(f"--spec must be a JSON object: {err}") from None
    known = {f.name for f in fields(ReferenceConfig)}
    if not isinstance(spec, dict) or not set(spec) <= known:
        raise argparse.ArgumentTypeError(
            f"--spec must be a JSON object with ReferenceConfig fields {sorted(known)}, "
            f"got {text}")
    try:
        ReferenceConfig(**spec)  # validates the values; the message names the field
    except (TypeError, ValueError) as err:
        raise argparse.ArgumentTypeError(f"--spec {text}: {err}") from None
    return spec


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=_spec, action="append",
                        help="a ReferenceConfig as JSON (repeatable); default: the grid")
    parser.add_argument("--quick", action="store_true", help="two tiny references (smoke test)")
    args = parser.parse_args(argv)
    specs = args.spec or (QUICK if args.quick else GRID)
    torch.set_num_threads(1)
    data = load_digits_web(0, max_len=DEMO_MAX_TEXT_LEN)
    for spec in specs:  # before any training, not after the first references
        if ReferenceConfig(**spec).batch_size > len(data.curated):
            parser.error(f"--spec {json.dumps(spec)}: batch_size must be in [1, "
                         f"{len(data.curated)}] (the curated split's size)")
    default = asdict(ReferenceConfig())
    print(f"torch {torch.__version__}, 1 thread; curated split: {len(data.curated)} pairs; "
          f"defaults {default}\n")
    print("| reference (fields given; the rest default) | zero-shot acc. on test | "
          "training TFLOP | wall s |")
    print("|---|---|---|---|")
    for spec in specs:
        t0 = time.perf_counter()
        _, info = train_reference(data, ReferenceConfig(**spec))
        changed = ", ".join(f"{k}={v}" for k, v in spec.items()) or "default"
        print(f"| {changed} | {100 * info['metrics']['zero_shot_accuracy']:.1f}% | "
              f"{info['flops'] / 1e12:.3f} | {time.perf_counter() - t0:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
