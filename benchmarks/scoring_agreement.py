"""How close are the picks a learner makes scoring at the coarse patch size to the picks it
would make scoring at its training patch size?

Flexi-JEST's learner scores the super-batch at `flexi_score_patch_size` (e.g. 16 tokens
instead of 64). Its training runs cannot say how much of its selection that costs: by then it
has trained on other data. This benchmark asks the learner itself. It trains a demo run's
learner (the config's, seed and all: the same run the demo trains) and, at a few steps
along the way, scores a fixed set of super-batches five ways with that learner's weights:

- `fine`: at its training patch size (what live JEST scores with);
- `coarse`: at the score patch size, the kernel PI-resized (`jestkit.models`; what Flexi
  scores with);
- `shrunk image`: the image shrunk by score patch / patch (antialiased bilinear, FlexiViT's
  resize) under the stored kernel at the training patch: the same token count the other
  common way, to tell whether PI-resize is the cost;
- `fine, shifted anew`: at the training patch size, each image shifted afresh as the sampler
  would have drawn it: a calibration. Any scoring but fine itself scores below fine by
  fine's own yardstick, and this one says how much a change that live JEST makes by chance
  (another draw of its augmentation) moves it. Whether that shortfall costs training steps,
  when the picks of one view train on another, this benchmark cannot say (round 33 found, by
  training, that picks from the stored view cost steps with the default demo's models);
- `fine, stored view`: at the training patch size, the pool's stored (unshifted) images:
  what a learner with `score_view="stored"` scores. The same as `fine` for a run that
  scores the stored view itself.

With `--learner-weights W ...`, each W adds a scoring `coarse, learner ×W`: the coarse
losses times W in the learnability, A = W·L_coarse - R. Not the paper's score (W = 1 is): a
probe of how the picks move when the coarse learner term counts less (a noisy estimate of
the fine one, shrunk toward its mean) or more (against the reference-easy, clean tilt of
coarse picks) than the reference's.

Only the learner's image embeddings differ between them: its text embeddings and the run's
own reference embeddings (its cache, or the live reference, on the view the run scores) are
shared, and each gives the learnability matrix A = L - R. The joint sampler draws a
sub-batch under each with the *same* random draws (and again with other draws). Per scoring:

- `overlap`: the share of fine scoring's picks it picks too, with the same draws and with
  other draws (fine redrawn, and a uniform draw, b/N, beside them);
- `gain kept`: the fine learnability of the picked block, Σ_{i,j∈S} A_ij / b under fine
  scoring's A, above a uniform draw's (its exact expectation), as a share of what fine
  scoring's own picks get above it (means over super-batches before the ratio; a 90%
  bootstrap interval over super-batches). Fine scoring's own picks are drawn by
  that yardstick, so every other scoring reads below 1: read it against the calibration;
- `r`: Pearson correlation of the learner's pairwise losses with fine scoring's, on a pair's
  own (diagonal) and between pairs (the pairwise terms the joint sampler adds);
- `clean`: the share of picked pairs that are clean (the pool's hidden flag, read only here).

    python benchmarks/scoring_agreement.py \\
        --config configs/demo-T20000-64-tokens-width-96-multires-fraction-0.125.json
    python benchmarks/scoring_agreement.py --learners learnability-joint-flexi \\
        --config configs/demo-T20000-64-tokens-width-96-multires-fraction-0.125.json \\
        --learner-weights 0.5 0.75 1.25 1.5
    python benchmarks/scoring_agreement.py --quick        # smoke test, < 1 minute
"""

from __future__ import annotations

import argparse
import dataclasses
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _markdown import check_outputs, command_line, load_demo_config, publish

from jestkit.cache import ReferenceCache, build_reference_cache
from jestkit.data import (
    IMAGE_SIZE,
    MAX_SHIFT,
    Batch,
    DigitsWeb,
    SuperBatchSampler,
    load_digits_web,
    random_shift,
)
from jestkit.demo import (
    DEMO_MAX_TEXT_LEN,
    MAX_WORKERS,
    DemoConfig,
    learner_configs,
    stop_workers,
    worker_pool,
)
from jestkit.models import DualEncoder, _resize_2d, load_model, save_model
from jestkit.scoring import learnability, pairwise_sigmoid_loss
from jestkit.selection import ModelEmbeddings, joint_select
from jestkit.training import LearnerConfig, train_learner, train_reference

REPO = Path(__file__).resolve().parents[1]
SCORINGS = ("fine", "coarse", "shrunk image", "fine, shifted anew", "fine, stored view")
CLEAN_COLUMNS = ("fine", "coarse", "fine, shifted anew", "fine, stored view", "uniform")
ANALYSIS_SEED = 20_261_202  # the super-batches scored: one fixed set, not the run's own
AT_STEPS = [500, 1000, 2000, 3000]
SUPER_BATCHES = 30
BOOTSTRAP = 2000


def shrunk_image_embeddings(model: DualEncoder, images: torch.Tensor,
                            score_patch_size: int) -> torch.Tensor:
    """The image tower's embeddings [B, D] (normalised) of `images` [B, C, S, S] shrunk by
    score_patch_size / patch_size under the stored kernel: as many tokens as scoring at
    score_patch_size, the other way (the image resized instead of the kernel). Equal to
    `model.encode_image(images)` when the two patch sizes are equal."""
    tower = model.image
    patch = tower.config.patch_size
    size = images.shape[-1] * patch // score_patch_size
    small = images if size == images.shape[-1] else _resize_2d(images, size)
    return F.normalize(tower.encode_patches(tower.patch_embed(small, patch), size // patch),
                       dim=-1)


def _pearson(x: torch.Tensor, y: torch.Tensor) -> float:
    """Pearson correlation; NaN when either is constant (no correlation to speak of)."""
    x, y = x.double() - x.double().mean(), y.double() - y.double().mean()
    norm = float(x.norm() * y.norm())
    return float((x @ y) / norm) if norm > 0 else float("nan")


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """The share of sub-batch `a` [b] (indices) that sub-batch `b` [b] holds too."""
    return len(set(a.tolist()) & set(b.tolist())) / len(a)


def _block_value(scores: torch.Tensor, picks: torch.Tensor) -> float:
    """Σ_{i,j∈S} A_ij / |S| for scores A [N, N] and picks S [b]: the sub-batch's
    learnability under A (the quantity the joint sampler favours)."""
    return scores[picks][:, picks].sum().item() / len(picks)


def uniform_value(scores: torch.Tensor, batch_size: int) -> float:
    """The expected `_block_value` of b pairs drawn uniformly without replacement from the
    N of scores A [N, N]: tr(A) / N + (b - 1) / (N (N - 1)) Σ_{i≠j} A_ij (exact; each pair
    is in S with probability b / N, each ordered pair of two with b (b-1) / (N (N-1)))."""
    n = scores.shape[0]
    trace = scores.diagonal().sum().item()
    if n == 1:
        return trace
    return trace / n + (batch_size - 1) / (n * (n - 1)) * (scores.sum().item() - trace)


def compare_selections(learner_losses: dict[str, torch.Tensor], reference_loss: torch.Tensor,
                       batch_size: int, n_chunks: int, draw_seed: int,
                       is_clean: torch.Tensor) -> dict[str, dict[str, float]]:
    """One super-batch: the joint sampler's picks under each scoring of the learner, compared
    with the picks under `learner_losses["fine"]`.

    Args:
        learner_losses: {"fine": L [N, N], other scoring: L [N, N], ...} the learner's
            pairwise sigmoid losses of the same super-batch, each scored another way.
        reference_loss: R [N, N], the reference's (the same for every scoring); each
            scoring's learnability is A = L - R.
        batch_size, n_chunks: the sampler's b and K.
        draw_seed: seeds the draws every scoring shares; `draw_seed + 1_000_003` the "other
            draws".
        is_clean: [N] bool, which pairs are clean (reported only).

    Returns:
        {scoring: {"diag_r", "pair_r", "overlap", "overlap_other_draws", "value", "clean",
        "reference"}}
        and two baselines: "redrawn" (fine scoring, the other draws) and "uniform" (b of N at
        random: its "value" is `uniform_value`, exact; overlap and clean from one draw).
        diag_r / pair_r: Pearson r of the learner's losses with fine scoring's, on a pair's
        own (diagonal) and between pairs (off it); the reference's shared term is left out,
        so they say how much the scoring itself moves. overlap: the share of fine scoring's
        picks it picks too, with the same draws; overlap_other_draws: with the other draws.
        value: `_block_value` of the picks under fine scoring's A; reference: under R, the
        reference's loss of the picked block (lower: pairs the reference finds easier; for
        "uniform" its exact expectation too).
    """
    scores = {name: learnability(loss, reference_loss) for name, loss in learner_losses.items()}
    fine, fine_loss = scores["fine"], learner_losses["fine"]
    n = fine.shape[0]
    off = ~torch.eye(n, dtype=torch.bool)

    def draw(a: torch.Tensor, seed: int) -> torch.Tensor:
        return joint_select(a, batch_size, n_chunks=n_chunks,
                            generator=torch.Generator().manual_seed(seed))

    picks = {name: draw(a, draw_seed) for name, a in scores.items()}
    out = {}
    for name, a in scores.items():
        loss = learner_losses[name]
        out[name] = {
            "diag_r": _pearson(loss.diagonal(), fine_loss.diagonal()),
            "pair_r": _pearson(loss[off], fine_loss[off]),
            "overlap_other_draws": _overlap(draw(a, draw_seed + 1_000_003), picks["fine"]),
        }
    picks["redrawn"] = draw(fine, draw_seed + 1_000_003)
    picks["uniform"] = torch.randperm(n, generator=torch.Generator().manual_seed(
        draw_seed + 2_000_003))[:batch_size]
    for name, s in picks.items():
        out.setdefault(name, {}).update(
            overlap=_overlap(s, picks["fine"]), value=_block_value(fine, s),
            clean=float(is_clean[s].float().mean()),
            reference=_block_value(reference_loss, s))
    out["uniform"]["value"] = uniform_value(fine, batch_size)
    out["uniform"]["reference"] = uniform_value(reference_loss, batch_size)
    return out


def gain_kept(values: np.ndarray, fine: np.ndarray, uniform: np.ndarray) -> float | None:
    """(mean value - mean uniform) / (mean fine - mean uniform), over super-batches; None
    when fine scoring's own picks are no better than uniform on average (nothing to keep)."""
    gain = fine.mean() - uniform.mean()
    return float((values.mean() - uniform.mean()) / gain) if gain > 0 else None


def _interval(values: np.ndarray, fine: np.ndarray, uniform: np.ndarray,
              seed: int) -> tuple[float, float] | None:
    """90% bootstrap interval of `gain_kept`, resampling super-batches (paired); None when a
    resample leaves fine scoring no gain to keep."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(BOOTSTRAP, len(values)))
    v, f, u = values[idx].mean(1), fine[idx].mean(1), uniform[idx].mean(1)
    if (f - u).min() <= 0:
        return None
    ratios = (v - u) / (f - u)
    return float(np.quantile(ratios, 0.05)), float(np.quantile(ratios, 0.95))


def _score(model: DualEncoder, reference_emb: ModelEmbeddings, images: torch.Tensor,
           anew: torch.Tensor, stored: torch.Tensor, tokens: torch.Tensor,
           score_patch_size: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The learner's pairwise losses L [N, N] of one super-batch (`images` [N, C, S, S],
    `tokens` [N, L]) under each of SCORINGS ("fine, shifted anew" scores `anew`, the same
    images shifted again; "fine, stored view" scores `stored`, the pool's unshifted images),
    and the reference's R [N, N] from its embeddings."""
    with torch.no_grad():
        img, txt, t, c = model(images, tokens)
        by = {"fine": img, "coarse": model.encode_image(images, score_patch_size),
              "shrunk image": shrunk_image_embeddings(model, images, score_patch_size),
              "fine, shifted anew": model.encode_image(anew),
              "fine, stored view": model.encode_image(stored)}
        ref = pairwise_sigmoid_loss(reference_emb.image, reference_emb.text,
                                    reference_emb.logit_scale, reference_emb.logit_bias)
        return {name: pairwise_sigmoid_loss(by[name], txt, t, c) for name in SCORINGS}, ref


def weighted_name(weight: float) -> str:
    """The scoring that counts the coarse learner loss `weight` times (`--learner-weights`)."""
    return f"coarse, learner ×{weight:g}"


def add_weighted(losses: dict[str, torch.Tensor], learner_weights: list[float]) -> None:
    """Add to `losses` (scoring -> L [N, N]) a scoring W·L_coarse per W in `learner_weights`:
    its learnability is then W·L_coarse - R."""
    for weight in learner_weights:
        losses[weighted_name(weight)] = weight * losses["coarse"]


def _analyse(model: DualEncoder, data: DigitsWeb, cfg: LearnerConfig,
             reference_emb_of: Callable[[Batch, torch.Tensor], ModelEmbeddings],
             score_patch_size: int, super_batches: int,
             learner_weights: list[float]) -> dict[str, dict[str, list[float]]]:
    """Per scoring (and "redrawn", "uniform"), each metric of `compare_selections` over the
    fixed super-batches (the same at every call: the same seeds)."""
    model.eval()
    sampler = SuperBatchSampler(data.pool, cfg.super_batch_size, seed=ANALYSIS_SEED,
                                epoch_boundary=cfg.epoch_boundary)
    per: dict[str, dict[str, list[float]]] = {}
    for k in range(super_batches):
        batch = sampler.next()
        stored = data.pool.images[batch.indices]
        # The view the run's models score (LearnerConfig.score_view).
        images = batch.images if cfg.score_view == "augmented" else stored
        anew = random_shift(stored, MAX_SHIFT, torch.Generator().manual_seed(k + 3_000_003))
        losses, ref = _score(model, reference_emb_of(batch, images), images, anew, stored,
                             batch.tokens, score_patch_size)
        add_weighted(losses, learner_weights)
        got = compare_selections(losses, ref, cfg.batch_size, cfg.n_chunks, k,
                                 data.pool.is_clean[batch.indices])
        for name, metrics in got.items():
            for metric, value in metrics.items():
                per.setdefault(name, {}).setdefault(metric, []).append(value)
    return per


def _run(name: str, cached: bool, cfg: LearnerConfig, data_seed: int, reference_path: str,
         cache_dir: str | None, at_steps: list[int], score_patch_size: int,
         super_batches: int, learner_weights: list[float], cache_views: str = "stored") -> dict:
    """Worker: train one demo run's learner, analysing its weights at each of `at_steps`
    (the run stops there, checkpointed, and resumes: the same run as uninterrupted)."""
    torch.set_num_threads(1)
    data = load_digits_web(data_seed, max_len=DEMO_MAX_TEXT_LEN)
    reference = load_model(reference_path).eval()
    if cached:
        cache = ReferenceCache.open(cache_dir, split=data.pool, model=reference,
                                    views=cache_views)
        run_kwargs = {"reference_embedder": cache.embeddings}

        def reference_emb_of(batch, images):
            # As the run's selection looks it up (`training._select`): a stored-view cache
            # has the stored images whatever the view; a shifted-view one the scored view.
            if cfg.score_view == "stored":
                batch = dataclasses.replace(batch, images=images, views=None)
            return cache.embeddings(batch)
    else:
        run_kwargs = {"reference": reference}

        def reference_emb_of(batch, images):
            with torch.no_grad():
                return ModelEmbeddings(*reference(images, batch.tokens))
    snapshots = {}
    with tempfile.TemporaryDirectory(prefix="scoring_agreement.") as run_dir:
        for i, step in enumerate(at_steps):
            train_learner(data, cfg, run_dir=run_dir, resume=i > 0, stop_after=step,
                          **run_kwargs)
            model = load_model(Path(run_dir) / "checkpoints" / f"step_{step:07d}"
                               / "model.safetensors")
            snapshots[step] = _analyse(model, data, cfg, reference_emb_of, score_patch_size,
                                       super_batches, learner_weights)
    return {"method": name, "seed": cfg.seed, "snapshots": snapshots}


def _mean(values: list[float]) -> float:
    """The mean of the finite values (a correlation of a constant is NaN); NaN if none."""
    finite = [v for v in values if np.isfinite(v)]
    return float(np.mean(finite)) if finite else float("nan")


def summarize(per: dict[str, dict[str, list[float]]], seed: int) -> dict[str, dict]:
    """Means of each metric over the super-batches, and gain kept with its interval, per
    scoring (and per baseline)."""
    fine = np.array(per["fine"]["value"])
    uniform = np.array(per["uniform"]["value"])
    out = {}
    for name, metrics in per.items():
        row = {m: _mean(v) for m, v in metrics.items()}
        values = np.array(metrics["value"])
        row["gain_kept"] = gain_kept(values, fine, uniform)
        row["gain_kept_90"] = (_interval(values, fine, uniform, seed)
                               if name not in ("fine", "uniform") else None)
        out[name] = row
    return out


def run(demo: DemoConfig, learners: list[str], seed: int, at_steps: list[int],
        super_batches: int, workers: int, learner_weights: Sequence[float] = ()) -> dict:
    started = time.time()
    data = load_digits_web(demo.data_seed, max_len=DEMO_MAX_TEXT_LEN)
    jobs = [(name, cached, cfg) for name, cached, cfg in learner_configs(
        dataclasses.replace(demo, seeds=(seed,))) if name in learners]
    with tempfile.TemporaryDirectory(prefix="scoring_agreement.") as tmp:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as the demo trains it: the same reference, bit for bit
        try:
            reference, ref_info = train_reference(data, demo.reference)
            reference_path = str(Path(tmp) / "reference.safetensors")
            save_model(reference, reference_path)
            cache_dir = None
            if any(cached for _, cached, _ in jobs):
                cache_dir = str(Path(tmp) / "reference_cache")
                build_reference_cache(reference, data.pool, cache_dir, views=demo.cache_views)
        finally:
            torch.set_num_threads(threads)
        pool = worker_pool(workers)
        try:
            futures = [pool.submit(_run, name, cached, cfg, demo.data_seed, reference_path,
                                   cache_dir, at_steps, demo.flexi_score_patch_size,
                                   super_batches, list(learner_weights), demo.cache_views)
                       for name, cached, cfg in jobs]
            done = [fut.result() for fut in futures]
        except BaseException:
            stop_workers(pool)
            raise
        pool.shutdown()
    rows = []
    for res in done:
        for step, per in res["snapshots"].items():
            for name, summary in summarize(per, ANALYSIS_SEED + step).items():
                rows.append({"method": res["method"], "step": step, "scoring": name,
                             **summary})
    return {"config": dataclasses.asdict(demo), "seed": seed, "at_steps": at_steps,
            "super_batches": super_batches, "analysis_seed": ANALYSIS_SEED,
            "learner_weights": list(learner_weights),
            "reference_accuracy": ref_info["metrics"]["zero_shot_accuracy"],
            "rows": rows, "raw": done, "wall_s": round(time.time() - started, 1)}


def _num(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or not np.isfinite(value) else f"{value:.{digits}f}"


def markdown(res: dict, command: str) -> str:
    cfg = res["config"]
    learner = cfg["learner"]
    n = round(learner["batch_size"] / (1 - learner["filter_ratio"]))
    patch, coarse = learner["patch_size"], cfg["flexi_score_patch_size"]
    tokens = (IMAGE_SIZE // patch) ** 2, (IMAGE_SIZE // coarse) ** 2
    by = {(r["method"], r["step"], r["scoring"]): r for r in res["rows"]}
    keys = list(dict.fromkeys((r["method"], r["step"]) for r in res["rows"]))
    others = SCORINGS[1:]  # every scoring but fine itself

    def gain(row: dict) -> str:
        interval = row["gain_kept_90"]
        return _num(row["gain_kept"]) + (
            "" if interval is None else f" ({interval[0]:.3f}–{interval[1]:.3f})")

    lines = [
        f"Command: `{command}` ({res['wall_s']:.0f} s; seed {res['seed']}; reference "
        f"{100 * res['reference_accuracy']:.1f}%; the same {res['super_batches']} "
        f"super-batches of {n} at every step, b = {learner['batch_size']}, K = "
        f"{learner['n_chunks']}; learner width {learner['width']}, trained at patch {patch} "
        f"({tokens[0]} tokens), scoring coarse at patch {coarse} ({tokens[1]} tokens)).",
        "",
        "The picks. Overlap: the share of fine scoring's picks each scoring picks too, with "
        "the same random draws and with other draws; gain kept: the picks' learnability under "
        "fine scoring's A above a uniform draw's, as a share of fine scoring's own (90% "
        "interval over super-batches):",
        "",
        "| run | step | " + " | ".join(f"overlap, same draws: {x}" if i == 0 else x
                                     for i, x in enumerate(others))
        + " | other draws: fine | coarse | uniform | "
        + " | ".join(f"gain kept: {x}" if i == 0 else x
                     for i, x in enumerate((*others, "fine redrawn"))) + " |",
        "|---|---|" + "---|" * (2 * len(others) + 4),
    ]
    for method, step in keys:
        row = {name: by[method, step, name] for name in (*SCORINGS, "redrawn", "uniform")}
        lines.append(
            f"| {method} | {step} | "
            + " | ".join(_num(row[name]["overlap"]) for name in others) + " | "
            + " | ".join(_num(row[name]["overlap_other_draws"]) for name in ("fine", "coarse"))
            + f" | {_num(row['uniform']['overlap'])} | "
            + " | ".join(gain(row[name]) for name in (*others, "redrawn")) + " |")
    lines += [
        "",
        "The learner's scores: Pearson r of its pairwise losses with fine scoring's, a pair's "
        "own (diagonal) and between pairs (off it; the reference's term, the same in every "
        "scoring, left out); and the share of clean pairs picked:",
        "",
        "| run | step | " + " | ".join(f"r, own pair: {x}" if i == 0 else x
                                     for i, x in enumerate(others)) + " | "
        + " | ".join(f"r, between pairs: {x}" if i == 0 else x for i, x in enumerate(others))
        + " | " + " | ".join(f"clean: {x}" if i == 0 else x
                             for i, x in enumerate(CLEAN_COLUMNS)) + " |",
        "|---|---|" + "---|" * (2 * len(others) + len(CLEAN_COLUMNS)),
    ]
    for method, step in keys:
        row = {name: by[method, step, name] for name in (*SCORINGS, "redrawn", "uniform")}
        lines.append(
            f"| {method} | {step} | "
            + " | ".join(_num(row[name][metric]) for metric in ("diag_r", "pair_r")
                         for name in others)
            + " | " + " | ".join(f"{100 * row[name]['clean']:.1f}%"
                                 for name in CLEAN_COLUMNS) + " |")
    if all("reference" in r for r in res["rows"]):  # results of round 32's first runs lack it
        lines += [
            "",
            "The reference's loss of the picked block, Σ_{i,j∈S} R_ij / b (lower: pairs the "
            "reference finds easier):",
            "",
            "| run | step | " + " | ".join(f"reference loss: {x}" if i == 0 else x
                                         for i, x in enumerate(CLEAN_COLUMNS)) + " |",
            "|---|---|" + "---|" * len(CLEAN_COLUMNS),
        ]
        for method, step in keys:
            lines.append(f"| {method} | {step} | " + " | ".join(
                f"{by[method, step, name]['reference']:.2f}" for name in CLEAN_COLUMNS) + " |")
    weights = res.get("learner_weights") or []
    if weights:
        columns = ["coarse", *map(weighted_name, weights)]
        lines += [
            "",
            "The coarse learner term counted W times, A = W·L_coarse - R (not the paper's "
            "score: W = 1 is, the coarse column): gain kept (90% interval), the share of clean "
            "pairs picked, and the reference's loss of the picked block:",
            "",
            "| run | step | " + " | ".join([f"gain kept: {columns[0]}", *columns[1:],
                                            "clean: fine", *columns,
                                            "reference loss: fine", *columns]) + " |",
            "|---|---|" + "---|" * (3 * len(columns) + 2),
        ]
        for method, step in keys:
            row = {name: by[method, step, name] for name in ("fine", *columns)}
            lines.append(
                f"| {method} | {step} | " + " | ".join(gain(row[name]) for name in columns)
                + " | " + " | ".join(f"{100 * row[name]['clean']:.1f}%"
                                     for name in ("fine", *columns))
                + " | " + " | ".join(f"{row[name]['reference']:.2f}"
                                     for name in ("fine", *columns)) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", type=Path,
                   help="a demo config (JSON); its learner, reference, data seed and "
                        "flexi_* fields (default: configs/demo.json)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: the quick demo's config, steps 10 and 20, 3 super-batches")
    p.add_argument("--learners", nargs="+",
                   help="which of the config's learnability-joint runs (live, cached, flexi) "
                        "to train and analyse (default: each of them in its methods)")
    p.add_argument("--seed", type=int, help="the runs' seed (default: the config's first)")
    p.add_argument("--at-steps", type=int, nargs="+",
                   help=f"analyse the learner's weights after these steps (increasing; "
                        f"default {' '.join(map(str, AT_STEPS))})")
    p.add_argument("--super-batches", type=int,
                   help=f"super-batches scored at each step (default {SUPER_BATCHES})")
    p.add_argument("--learner-weights", type=float, nargs="+", default=[], metavar="W",
                   help="also score with the coarse learner loss counted W times, "
                        "A = W*L_coarse - R (each W > 0, not 1: that is the coarse scoring)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", type=Path, help="write the markdown results into this doc")
    p.add_argument("--section", default="scoring_agreement",
                   help="--out replaces the text between <!-- SECTION:start --> and "
                        "<!-- SECTION:end --> (default: scoring_agreement)")
    p.add_argument("--json", type=Path, help="write the raw results as JSON here")
    args = p.parse_args(argv)
    if args.quick and args.config:
        p.error("--quick runs its own tiny config; drop --config (or --quick)")
    if not 1 <= args.workers <= MAX_WORKERS:
        p.error(f"--workers must be in [1, {MAX_WORKERS}], got {args.workers}")
    weights = args.learner_weights
    if any(not (np.isfinite(w) and w > 0) or w == 1 for w in weights) or (
            len(set(weights)) < len(weights)):
        p.error(f"--learner-weights must be distinct finite numbers > 0 other than 1 (the "
                f"coarse scoring itself), got {weights}")
    if args.quick and (args.at_steps or args.super_batches):
        p.error("--quick sets its own --at-steps and --super-batches; drop them (or --quick)")
    if args.quick:
        demo = DemoConfig.quick()
        steps, super_batches = [10, 20], 3
    else:
        demo = load_demo_config(p, args.config or REPO / "configs" / "demo.json")
        steps = args.at_steps or AT_STEPS
        super_batches = SUPER_BATCHES if args.super_batches is None else args.super_batches
    if super_batches < 2:
        p.error(f"--super-batches must be >= 2 (its bootstrap interval resamples them), got "
                f"{super_batches}")
    if steps[0] < 1 or any(b <= a for a, b in zip(steps, steps[1:], strict=False)) or (
            steps[-1] > demo.learner.steps):
        p.error(f"--at-steps must increase, within [1, {demo.learner.steps}] (the learner's "
                f"steps), got {steps}" + ("" if args.at_steps else " (the default)"))
    # The JEST runs (live, cached, flexi): the analysis draws as their selector does.
    jest = list(dict.fromkeys(name for name, _, cfg in learner_configs(demo)
                              if (cfg.method, cfg.selection) == ("learnability", "joint")))
    learners = args.learners or jest
    if not learners or any(name not in jest for name in learners):
        p.error(f"--learners must be among the config's learnability-joint runs {jest}, got "
                f"{learners}")
    seed = demo.seeds[0] if args.seed is None else args.seed
    try:
        demo = dataclasses.replace(demo, seeds=(seed,))
    except ValueError as err:
        p.error(f"--seed: {err}")
    if demo.flexi_score_patch_size <= demo.learner.patch_size:
        p.error(f"the config's flexi_score_patch_size ({demo.flexi_score_patch_size}) must be "
                f"larger than learner.patch_size ({demo.learner.patch_size}): there is no "
                f"coarse scoring to compare")
    check_outputs(p, args.out, args.section, args.json)
    res = run(demo, learners, seed, steps, super_batches, args.workers, weights)
    md = markdown(res, command_line("scoring_agreement.py", argv))
    publish(md, res, args.json, args.out, args.section, "Coarse scoring's agreement")
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
