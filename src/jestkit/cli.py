"""The `jestkit` command line."""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import sys
import threading
from pathlib import Path

from jestkit import __version__
from jestkit.data import CAPTION_MAX_WORDS
from jestkit.demo import DEMO_MAX_TEXT_LEN, MAX_WORKERS


def _demo(args: argparse.Namespace) -> int:
    from jestkit.demo import DemoConfig, run_demo

    if args.quick and args.config:
        raise ValueError("give either --quick or --config, not both")
    if args.config:
        try:
            raw = json.loads(Path(args.config).read_text())
        except OSError as err:  # a directory, unreadable, ...
            raise ValueError(f"--config {args.config}: cannot read it "
                             f"({err.strerror or err})") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ValueError(f"--config {args.config} is not valid JSON ({err})") from None
        except RecursionError:  # json's parser recurses once per nesting level
            raise ValueError(f"--config {args.config} is not a demo config (JSON nested too "
                             f"deeply to read)") from None
        cfg = DemoConfig.from_dict(raw)
    else:
        cfg = DemoConfig.quick() if args.quick else DemoConfig()
    if args.out is None:
        args.out = "runs/demo-quick" if args.quick else "runs/demo"
    out = Path(args.out)  # "" (an unset variable) is refused as "." is, not defaulted
    if args.allow_other_code and not args.resume:
        raise ValueError("--allow-other-code only applies with --resume")
    report = run_demo(cfg, out, overwrite=args.overwrite, resume=args.resume,
                      allow_other_code=args.allow_other_code, workers=args.workers,
                      show_progress=not args.no_progress)
    return _show(report, f"\nreport: {out / 'report.md'}  (machine-readable: "
                         f"{out / 'report.json'})")


def _show(report: dict, last_line: str) -> int:
    """Print a finished report's summary and `last_line`; 0 even if the reader stops reading
    (`jestkit demo | head`): the run is complete and on disk, and an error exit would have a
    script retry it into "already exists". Ctrl-C while printing still says interrupted."""
    from jestkit.demo import print_summary

    try:
        print_summary(report)
        print(last_line)
        sys.stdout.flush()
    except BrokenPipeError:
        try:  # Python flushes stdout again at exit: point it at nothing, as its docs advise
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, io.UnsupportedOperation):
            pass  # not a real file (captured): nothing will be flushed to a closed pipe
    except KeyboardInterrupt:
        print(f"interrupted while printing the summary; the report is complete: "
              f"{last_line.strip()}", file=sys.stderr)
        return 130
    return 0


def _report(args: argparse.Namespace) -> int:
    from jestkit.report import rebuild_report

    report = rebuild_report(args.run_dir)
    return _show(report, f"\nreport rewritten: {Path(args.run_dir) / 'report.md'}")


def _cache_reference(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from jestkit.cache import MAX_SHARD_SIZE, build_reference_cache
    from jestkit.data import MAX_SEED, load_digits_web
    from jestkit.models import load_model

    if args.data != "digits-web":
        raise ValueError(f"--data must be 'digits-web' (the built-in set), got {args.data!r}")
    if not 0 <= args.data_seed <= MAX_SEED:
        raise ValueError(f"--data-seed must be in [0, {MAX_SEED}], got {args.data_seed}")
    if args.shard_size > MAX_SHARD_SIZE:
        raise ValueError(f"--shard-size must be in [1, {MAX_SHARD_SIZE}], got {args.shard_size}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    model = load_model(args.reference)
    if not CAPTION_MAX_WORDS <= args.max_len <= model.config.max_text_len:  # before padding
        raise ValueError(f"--max-len must be in [{CAPTION_MAX_WORDS}, "
                         f"{model.config.max_text_len}] (every caption whole; the longest "
                         f"caption this reference takes), got {args.max_len}")
    # Captions padded as the demo pads them (--max-len): the cache fingerprints the tokens,
    # so a cache of the same captions at another length is another data set to it.
    data = load_digits_web(args.data_seed, max_len=args.max_len)
    split = getattr(data, args.split)
    n_shards = -(-len(split) // args.shard_size)
    with tqdm(total=n_shards, desc="shards", disable=args.no_progress) as bar:
        cache = build_reference_cache(model, split, out, shard_size=args.shard_size,
                                      overwrite=args.overwrite, views=args.views,
                                      progress=lambda done, total: bar.update(1))
    computed = cache.computed_shards
    done = (f"computed {len(computed)} of {n_shards} shards" if computed else
            f"all {n_shards} shards were there and verified; nothing computed")
    if computed and len(computed) < n_shards:
        done += f" (shards {_ranges(computed)}: missing or failing their checks)"
    views = "" if cache.n_views == 1 else f", {cache.n_views} shifted views each"
    print(f"{len(cache)} reference embeddings (dim {cache.embed_dim}{views}) at {out}: {done}")
    return 0


def _ranges(numbers: list[int]) -> str:
    """Sorted ints as runs: [0, 2, 3, 4, 7] -> "0, 2-4, 7"."""
    runs: list[list[int]] = []
    for k in numbers:
        if runs and k == runs[-1][1] + 1:
            runs[-1][1] = k
        else:
            runs.append([k, k])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


_positive_int.__name__ = "positive int"  # argparse names the type in its errors

def _workers(text: str) -> int:
    value = int(text)
    if not 1 <= value <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be in [1, {MAX_WORKERS}], got {value}")
    return value


_workers.__name__ = "worker count"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jestkit", description="Joint example selection (JEST) for contrastive image-text "
                                    "training: the demo, its reports, and the reference cache.")
    parser.add_argument("--version", action="version", version=f"jestkit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train reference + learners with every method on "
                                       "digits-web and report the speed-ups")
    demo.add_argument("--quick", action="store_true", help="a <= 2-minute smoke run")
    demo.add_argument("--out", help="run directory (default runs/demo, or runs/demo-quick)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace an existing run directory (only once the new run is done; "
                           "only a directory a demo wrote)")
    demo.add_argument("--resume", action="store_true",
                      help="continue an interrupted demo into --out (kept in OUT.partial): "
                           "same config, only the unfinished learner runs are trained")
    demo.add_argument("--allow-other-code", action="store_true",
                      help="with --resume: continue a demo that another jestkit, torch or "
                           "Python version started (refused by default; report.json lists "
                           "every version)")
    demo.add_argument("--config", help="a JSON demo config (see configs/demo.json)")
    demo.add_argument("--workers", type=_workers, default=2,
                      help=f"parallel learner runs (default 2, sized for a 2-core machine; "
                           f"1-{MAX_WORKERS})")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.set_defaults(func=_demo)

    report = sub.add_parser("report", help="rebuild report.md/json and the plots of a demo run "
                                           "directory from its saved per-run curves")
    report.add_argument("run_dir", help="a directory written by `jestkit demo`")
    report.set_defaults(func=_report)

    cache = sub.add_parser(
        "cache-reference", help="embed a data set once with the frozen reference, for lookups "
                                "by example id",
        description="Embed a split of digits-web once with a frozen reference, in checksummed "
                    "shards under a manifest that fingerprints the data and the model. An "
                    "interrupted build resumes; a complete, matching cache is left as it is; "
                    "the command says which shards it computed.")
    cache.add_argument("--reference", required=True, help="reference checkpoint (.safetensors)")
    cache.add_argument("--out", required=True, help="cache directory (resumed if interrupted)")
    cache.add_argument("--data", default="digits-web",
                       help="the data set: only digits-web, the built-in one")
    cache.add_argument("--split", default="pool", choices=("pool", "curated", "test"),
                       help="which split to embed (default pool, the one JEST selects from)")
    cache.add_argument("--data-seed", type=int, default=0,
                       help="the data set's seed, as the demo config's data_seed (default 0)")
    cache.add_argument("--max-len", type=_positive_int, default=DEMO_MAX_TEXT_LEN,
                       help=f"caption length in tokens (default {DEMO_MAX_TEXT_LEN}, as the "
                            f"demo pads them; at least {CAPTION_MAX_WORDS}, the longest "
                            f"caption, and at most the reference's max_text_len; a cache is "
                            f"made for one length)")
    cache.add_argument("--shard-size", type=_positive_int, default=512,
                       help="examples per shard file (default 512)")
    cache.add_argument("--views", default="stored", choices=("stored", "shifts"),
                       help="which images to embed: 'stored' (each once), or 'shifts' (all 25 "
                            "shifted views the training sampler draws, so cached scoring "
                            "selects exactly as a live reference; 25x the image FLOPs, 13x "
                            "the disk) (default: stored)")
    cache.add_argument("--overwrite", action="store_true",
                       help="replace what --out holds if it is not this cache (other data, "
                            "another model, a damaged manifest, shards without one): its "
                            "shards are deleted and rebuilt")
    cache.add_argument("--no-progress", action="store_true", help="no progress bar")
    cache.set_defaults(func=_cache_reference)
    return parser


def _exit_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # SIGTERM (`kill`, a scheduler's time limit) ends a command as Ctrl-C does, by an
    # exception: the demo stops its worker processes and keeps what finished for --resume
    # (removing its work directory if nothing did). (Python's default for SIGTERM is to die
    # on the spot, with no cleanup.)
    # An inherited "ignore" is left alone (as Python does for SIGINT), and so is a handler
    # from outside Python, and signals can only be handled in the main thread.
    install = (threading.current_thread() is threading.main_thread()
               and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if install:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        return args.func(args)
    except (ValueError, OSError) as err:  # CacheError, FileExistsError... included
        print(f"jestkit {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # no traceback; the demo has said what it kept, if anything
        print(f"jestkit {args.command}: interrupted", file=sys.stderr)
        return 130
    finally:
        if install:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
