"""Speed and memory of JEST joint selection: a dense baseline against jestkit.

Three ways to pick a sub-batch of b = round(N (1 - f)) out of a super-batch of N with the
learnability criterion, K = 16 chunks, from two models' float32 embeddings (d = 256):

  (a) ``dense_reference.dense_jest``: the published pseudo-code, dense, written independently
      of jestkit: both N x N sigmoid loss matrices, A = L - R, masked N x N sums per chunk;
  (b) ``jestkit.selection.joint_select`` on a precomputed dense learnability matrix (the
      matrix build and the selection are timed apart);
  (c) ``jestkit.selection.JointSelector``, from the embeddings, scoring included; it never
      builds an N x N matrix.

Each (path, N, f) runs in a fresh subprocess (this script with the hidden ``--one`` option),
so its peak memory is its own: the peak RSS growth is ``ru_maxrss`` after the measured calls
minus the RSS (``/proc/self/statm``) just before them, once the embeddings exist; the kernel's
peak-RSS mark is reset first (``/proc/self/clear_refs``) so building the embeddings does not
leak into the peak. The machine's float32 matmul rate is measured in the same run, and for
(c) the achieved rate on its pairwise matmul work.

Run from the repository root::

    python benchmarks/selection_speed.py                 # the full run (several minutes)
    python benchmarks/selection_speed.py --quick         # smoke test, N in {1024, 4096}
    python benchmarks/selection_speed.py --out docs/benchmarks.md

``--out`` writes the results (machine, table, target checks) into the file between the
markers ``<!-- selection_speed:start -->`` and ``<!-- selection_speed:end -->``, keeping the
text around them; a new file is created with just the section, and an existing file without
the markers is refused before anything is timed.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path
from statistics import median

from _markdown import check_outputs, command_line, replace_section, write_json

DIM = 256
N_CHUNKS = 16
LEARNER_TC = (10.0, -10.0)  # learner logit_scale t (exponentiated) and bias c
REFERENCE_TC = (7.0, -5.0)  # the reference's own t and c
DEFAULT_SIZES = [1024, 4096, 16384, 65536]
DEFAULT_LARGE_SIZES = [131072]  # path (c) only
QUICK_SIZES = [1024, 4096]
DEFAULT_RATIOS = [0.8, 0.9]
PATHS = ("a", "b", "c")
DENSE_BYTES_PER_ELEMENT = 16  # ~four float32 N x N matrices alive at once (L, R, A, a temp)

RESULT_TAG = "SELECTION_SPEED_RESULT "
MIB = 2**20
QUIET_CORES = 0.25  # other processes using fewer cores than this: a quiet machine


# --- helpers shared by the parent and the measuring child ------------------------------------


def sub_batch_size(n: int, filter_ratio: float) -> int:
    """b = round(N (1 - f)), at least 1 (the rule of JointSelector.sub_batch_size)."""
    return max(1, round(n * (1 - filter_ratio)))


def chunk_sizes(batch_size: int, n_chunks: int) -> list[int]:
    base, extra = divmod(batch_size, n_chunks)
    return [base + 1] * extra + [base] * (n_chunks - extra)


def default_repeats(n: int) -> int:
    """Timing repeats (best of): several for small N, fewer for large N."""
    if n <= 4096:
        return 5
    if n <= 16384:
        return 3
    if n <= 65536:
        return 2
    return 1


def pairwise_flops(n: int, b: int, d: int = DIM, n_chunks: int = N_CHUNKS,
                   n_models: int = 2) -> int:
    """Pairwise matmul FLOPs of path (c): for each of the K - 1 chunk updates, for each model,
    two [N, d] x [d, n] matmuls (2 N d n flops each), plus each model's diagonal (2 N d)."""
    sizes = chunk_sizes(b, n_chunks)
    updates = sum(sizes[:-1])  # the last chunk's gains are never computed
    return n_models * (2 * 2 * n * d * updates + 2 * n * d)


def dense_bytes(n: int) -> int:
    return DENSE_BYTES_PER_ELEMENT * n * n


def rss_mib() -> float:
    """Current resident set size (MiB), from /proc/self/statm."""
    with open("/proc/self/statm") as fh:
        resident_pages = int(fh.read().split()[1])
    return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB


def maxrss_mib() -> float:
    """Peak resident set size of this process so far (MiB); ru_maxrss is in KiB on Linux."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark to the current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def machine_busy_s() -> float:
    """CPU-seconds all processes on the machine have been busy (not idle/iowait), /proc/stat."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal
    return (total - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU-seconds (user + system, all threads) of this process so far."""
    t = os.times()
    return t.user + t.system


def others_load(seconds: float) -> float:
    """Average number of cores busy with other processes over the next `seconds`."""
    busy0, own0, t0 = machine_busy_s(), own_cpu_s(), time.perf_counter()
    time.sleep(seconds)
    busy1, own1, t1 = machine_busy_s(), own_cpu_s(), time.perf_counter()
    return max(0.0, (busy1 - busy0) - (own1 - own0)) / (t1 - t0)


def wait_until_quiet(max_wait: float, threshold: float = QUIET_CORES,
                     sample: float = 2.0) -> float:
    """Wait (up to max_wait s) until other processes use < threshold cores; the last sample."""
    deadline = time.perf_counter() + max_wait
    load = others_load(sample) if max_wait > 0 else float("nan")
    while load >= threshold and time.perf_counter() < deadline:
        load = others_load(sample)
    return load


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


# --- the measuring child ---------------------------------------------------------------------


def make_embeddings(n: int, d: int, seed: int):
    """Random L2-normalised image/text embeddings of one super-batch for two models.

    Each pair has a shared "cleanliness" q in [0, 1]; a model's text embedding is its image
    embedding mixed with noise, cosine about rho = lo + span * q, so clean pairs have low
    loss under both models and the reference (larger rho) fits them better than the learner.
    Returns (learner, reference) as (image, text, t, c) tuples.
    """
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(seed)
    quality = torch.rand(n, 1, generator=g)

    def model(lo: float, span: float, tc: tuple[float, float]):
        image = F.normalize(torch.randn(n, d, generator=g), dim=1)
        noise = F.normalize(torch.randn(n, d, generator=g), dim=1)
        rho = (lo + span * quality).clamp_(0.0, 0.99)
        noise.mul_((1 - rho * rho).sqrt_()).add_(rho * image)
        text = F.normalize(noise, dim=1)
        return image, text, tc[0], tc[1]

    learner = model(0.2, 0.5, LEARNER_TC)
    reference = model(0.3, 0.65, REFERENCE_TC)
    return learner, reference


def run_path(path: str, learner, reference, b: int, filter_ratio: float, generator):
    """One selection by path a, b or c; returns (indices, {sub-timings})."""
    if path == "a":
        from dense_reference import dense_jest

        timings: dict = {}
        idx = dense_jest(learner, reference, b, n_chunks=N_CHUNKS, generator=generator,
                         timings=timings)
        return idx, timings
    if path == "b":
        from jestkit.scoring import learnability, pairwise_sigmoid_loss
        from jestkit.selection import joint_select

        t0 = time.perf_counter()
        learner_loss = pairwise_sigmoid_loss(*learner)
        ref_loss = pairwise_sigmoid_loss(*reference)
        scores = learnability(learner_loss, ref_loss)
        del learner_loss, ref_loss
        t1 = time.perf_counter()
        idx = joint_select(scores, b, n_chunks=N_CHUNKS, generator=generator)
        t2 = time.perf_counter()
        return idx, {"build_s": t1 - t0, "select_s": t2 - t1}
    if path == "c":
        from jestkit.selection import JointSelector

        selector = JointSelector("learnability", filter_ratio=filter_ratio, n_chunks=N_CHUNKS)
        n = learner[0].shape[0]
        if selector.sub_batch_size(n) != b:
            raise RuntimeError(f"b mismatch: {selector.sub_batch_size(n)} != {b}")
        return selector(learner=learner, reference=reference, generator=generator), {}
    raise ValueError(f"unknown path {path!r}")


def measure_matmul(threads: int, size: int, repeats: int) -> dict:
    """Best-of float32 GFLOP/s of a square matmul, and of a block shape path (c) uses."""
    import torch

    torch.set_num_threads(threads)
    out = {"path": "matmul", "threads": threads, "size": size}

    def best_rate(m: int, k: int, n: int) -> float:
        x, y = torch.randn(m, k), torch.randn(k, n)
        x @ y  # warm-up
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            x @ y
            best = min(best, time.perf_counter() - t0)
        return 2 * m * k * n / best / 1e9

    out["square_gflops"] = best_rate(size, size, size)
    # A typical block of path (c): [rows, d] x [d, n] with rows * n ~ 2^22 elements.
    out["block_shape"] = [4096, DIM, 1024]
    out["block_gflops"] = best_rate(4096, DIM, 1024)
    out["torch"] = torch.__version__
    return out


def profile_c(spec: dict) -> dict:
    """One path-(c) selection under torch.profiler: where does its time go?"""
    import torch
    from torch.profiler import ProfilerActivity, profile

    n, f = spec["n"], spec["f"]
    learner, reference = make_embeddings(n, DIM, spec["seed"])
    b = sub_batch_size(n, f)
    small = [tuple(x[:512] if torch.is_tensor(x) else x for x in e) for e in (learner, reference)]
    run_path("c", *small, sub_batch_size(min(n, 512), f), f, torch.Generator().manual_seed(0))
    busy0, own0, t0 = machine_busy_s(), own_cpu_s(), time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run_path("c", learner, reference, b, f, torch.Generator().manual_seed(1))
    wall = time.perf_counter() - t0
    own = own_cpu_s() - own0
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    table = [{"op": e.key, "calls": e.count, "self_s": e.self_cpu_time_total / 1e6,
              "share": e.self_cpu_time_total / total} for e in ops[:12]]
    return dict(spec, b=b, wall_s=wall, cpu_s=own,
                others_cores=max(0.0, machine_busy_s() - busy0 - own) / wall, ops=table)


def child(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec["threads"])
    if spec["path"] == "matmul":
        return measure_matmul(spec["threads"], spec.get("size", 2048), spec.get("repeats", 5))
    if spec["path"] == "profile":
        return profile_c(spec)

    n, f, path, seed = spec["n"], spec["f"], spec["path"], spec["seed"]
    b = sub_batch_size(n, f)
    learner, reference = make_embeddings(n, DIM, seed)
    # Warm-up on a small slice (thread pool, lazy imports, allocator); not measured.
    m = min(n, 512)
    small = [tuple(x[:m] if torch.is_tensor(x) else x for x in e) for e in (learner, reference)]
    run_path(path, *small, sub_batch_size(m, f), f, torch.Generator().manual_seed(0))
    del small
    gc.collect()

    peak_reset = reset_peak_rss()
    rss_before = rss_mib()
    maxrss_before = maxrss_mib()
    times, cpus, others, extras = [], [], [], []
    spent = 0.0
    while True:
        r = len(times)
        generator = torch.Generator().manual_seed(seed + 1 + r)
        busy0, own0 = machine_busy_s(), own_cpu_s()
        t0 = time.perf_counter()
        idx, extra = run_path(path, learner, reference, b, f, generator)
        wall = time.perf_counter() - t0
        own = own_cpu_s() - own0
        times.append(wall)
        cpus.append(own)
        # cores kept busy by *other* processes on the machine meanwhile (contention)
        others.append(max(0.0, machine_busy_s() - busy0 - own) / wall)
        extras.append(extra)
        spent += wall
        if idx.shape != (b,) or idx.unique().numel() != b or not (0 <= idx.min() <= idx.max() < n):
            raise RuntimeError(f"path {path} returned bad indices: shape {tuple(idx.shape)}")
        del idx
        if len(times) < spec["repeats"]:
            continue
        # On a shared machine: while the best repeat so far was disturbed by other processes,
        # try again, within a time budget.
        best = min(range(len(times)), key=times.__getitem__)
        if others[best] < QUIET_CORES or spent + times[best] > spec.get("extra_s", 0.0) + sum(
                times[: spec["repeats"]]):
            break
    peak = maxrss_mib()
    result = dict(spec, b=b, times_s=times, time_s=times[best], cpu_s=cpus[best],
                  others_cores=others[best], others_cores_all=others, rss_before_mib=rss_before,
                  maxrss_before_mib=maxrss_before, peak_rss_mib=peak,
                  peak_growth_mib=peak - rss_before, peak_reset=peak_reset)
    for key in sorted({k for e in extras for k in e}):
        result[key] = min(e[key] for e in extras)
    return result


# --- the parent: plan, spawn, tabulate, check ------------------------------------------------


def spawn(spec: dict, timeout: float) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]),
               MKL_NUM_THREADS=str(spec["threads"]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return dict(spec, status=f"timeout (> {timeout:.0f} s)")
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return dict(json.loads(line[len(RESULT_TAG):]), status="ok")
    why = "killed (out of memory?)" if proc.returncode in (-9, 137) else "failed"
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return dict(spec, status=f"{why}, rc {proc.returncode}", error=" | ".join(tail))


def plan(args) -> list[dict]:
    sizes = QUICK_SIZES if args.quick else args.sizes
    large = [] if args.quick else args.large_sizes
    runs = []
    for n in sizes:
        for f in args.filter_ratios:
            for path in PATHS:
                runs.append({"path": path, "n": n, "f": f})
    for n in large:
        for f in args.filter_ratios:
            runs.append({"path": "c", "n": n, "f": f})
    for r in runs:
        repeats = args.repeats or (2 if args.quick else default_repeats(r["n"]))
        r.update(threads=args.threads, seed=args.seed, extra_s=args.extra_repeat_s,
                 repeats=repeats)
    return runs


def fmt_s(x: float) -> str:
    return f"{x:.3g}" if x < 100 else f"{x:.0f}"


def fmt_mib(x: float) -> str:
    return f"{x:,.0f}" if x >= 10 else f"{x:.1f}"


def cell(res: dict | None, key: str, fmt) -> str:
    if res is None:
        return "—"
    if res["status"] != "ok":
        return res["status"] if res["status"] == "OOM-skipped" else "failed"
    return fmt(res[key])


def repeats_cell(r: dict) -> str:
    extra = len(r["times_s"]) - r["repeats"]
    return f"{r['repeats']} + {extra} extra" if extra > 0 else str(r["repeats"])


def make_tables(results: list[dict], peak_gflops: float) -> tuple[str, str]:
    by = {(r["path"], r["n"], r["f"]): r for r in results}
    keys = sorted({(r["n"], r["f"]) for r in results})
    main = ["| N | f | b | (a) time s | (a) peak MB | (b) build s | (b) select s | (c) time s "
            "| (c) peak MB | speed-up (a)/(c) | memory (c)/(a) | (c) GFLOP/s | % of matmul peak |",
            "|" + "---:|" * 13]
    detail = ["| N | f | path | repeats run | best time s | its CPU s | others' cores "
              "| median / worst s | peak growth MB | RSS before MB | total peak RSS MB | notes |",
              "|---:|---:|:---|---:|---:|---:|---:|:---|---:|---:|---:|:---|"]
    for n, f in keys:
        a, b_, c = (by.get((p, n, f)) for p in PATHS)
        ok = [r for r in (a, b_, c) if r is not None and r["status"] == "ok"]
        b = ok[0]["b"] if ok else sub_batch_size(n, f)
        speed = mem = gflops = pct = "—"
        if c is not None and c["status"] == "ok":
            rate = pairwise_flops(n, b) / c["time_s"] / 1e9
            gflops, pct = f"{rate:.1f}", f"{100 * rate / peak_gflops:.0f}%"
            if a is not None and a["status"] == "ok":
                speed = f"{a['time_s'] / c['time_s']:.1f}×"
                mem = f"1/{a['peak_growth_mib'] / c['peak_growth_mib']:.0f}"
        main.append(
            f"| {n} | {f} | {b} | {cell(a, 'time_s', fmt_s)} | "
            f"{cell(a, 'peak_growth_mib', fmt_mib)} | {cell(b_, 'build_s', fmt_s)} | "
            f"{cell(b_, 'select_s', fmt_s)} | {cell(c, 'time_s', fmt_s)} | "
            f"{cell(c, 'peak_growth_mib', fmt_mib)} | {speed} | {mem} | {gflops} | {pct} |")
        for path, r in zip(PATHS, (a, b_, c), strict=True):
            if r is None:
                continue
            if r["status"] != "ok":
                detail.append(f"| {n} | {f} | ({path}) | — | — | — | — | — | — | — | — | "
                              f"{r['status']} {r.get('error', '')} |")
                continue
            notes = []
            if "build_s" in r:
                notes.append(f"build {fmt_s(r['build_s'])} s + select {fmt_s(r['select_s'])} s")
            if not r["peak_reset"]:
                notes.append("peak-RSS mark not reset: growth may be overstated")
            detail.append(
                f"| {n} | {f} | ({path}) | {repeats_cell(r)} | {fmt_s(r['time_s'])} | "
                f"{fmt_s(r['cpu_s'])} | {r['others_cores']:.2f} | "
                f"{fmt_s(median(r['times_s']))} / {fmt_s(max(r['times_s']))} "
                f"| {fmt_mib(r['peak_growth_mib'])} "
                f"| {fmt_mib(r['rss_before_mib'])} | {fmt_mib(r['peak_rss_mib'])} "
                f"| {'; '.join(notes)} |")
    return "\n".join(main), "\n".join(detail)


def check_targets(results: list[dict], ratios: list[float]) -> list[tuple[str, str, str]]:
    """[(target, measured, PASS/FAIL/NOT RUN)]."""
    by = {(r["path"], r["n"], r["f"]): r for r in results}

    def ok(path, n, f):
        r = by.get((path, n, f))
        return r if r is not None and r["status"] == "ok" else None

    checks = []
    for f, need in ((0.8, 2.0), (0.9, 4.0)):  # the speed targets are set for these two f
        a, c = ok("a", 16384, f), ok("c", 16384, f)
        name = f"N=16384, f={f}: (c) >= {need:.0f}x faster than (a)"
        mname = f"N=16384, f={f}: (c) peak growth <= 1/20 of (a)'s"
        if a is None or c is None:
            checks += [(name, "not measured", "NOT RUN"), (mname, "not measured", "NOT RUN")]
            continue
        speed = a["time_s"] / c["time_s"]
        checks.append((name, f"{speed:.1f}x ({fmt_s(a['time_s'])} s vs {fmt_s(c['time_s'])} s)",
                       "PASS" if speed >= need else "FAIL"))
        ratio = c["peak_growth_mib"] / a["peak_growth_mib"]
        checks.append((mname, f"1/{1 / ratio:.0f} ({fmt_mib(c['peak_growth_mib'])} MB vs "
                              f"{fmt_mib(a['peak_growth_mib'])} MB)",
                       "PASS" if ratio <= 1 / 20 else "FAIL"))
    for f in ratios:
        r = by.get(("c", 65536, f))
        name = f"N=65536, f={f}: (c) under 60 s"
        if r is None or r["status"] != "ok":
            checks.append((name, r["status"] if r else "not measured", "FAIL" if r else "NOT RUN"))
        else:
            checks.append((name, f"{fmt_s(r['time_s'])} s", "PASS" if r["time_s"] < 60 else "FAIL"))
    for f in ratios:
        r = by.get(("c", 131072, f))
        name = f"N=131072, f={f}: (c) completes, peak RSS growth under 2 GB (2048 MiB)"
        if r is None or r["status"] != "ok":
            checks.append((name, r["status"] if r else "not measured", "FAIL" if r else "NOT RUN"))
        else:
            g = r["peak_growth_mib"]
            checks.append((name, f"growth {fmt_mib(g)} MB, total peak RSS "
                                 f"{fmt_mib(r['peak_rss_mib'])} MB, {fmt_s(r['time_s'])} s",
                           "PASS" if g < 2048 else "FAIL"))
    return checks


def repeats_note(results: list[dict]) -> str:
    by_n: dict[int, set] = {}
    for r in results:
        if r.get("status") == "ok":
            by_n.setdefault(r["n"], set()).add(r["repeats"])
    return ", ".join(f"N={n}: {'/'.join(map(str, sorted(v)))}" for n, v in sorted(by_n.items()))


def report(args, results: list[dict], matmul: dict, commands: list[str]) -> str:
    import torch

    main, detail = make_tables(results, matmul["square_gflops"])
    checks = check_targets(results, sorted({*args.filter_ratios, *(r["f"] for r in results)}))
    lines = [
        "Command" + ("s (results of later runs replace those of earlier ones):"
                     if len(commands) > 1 else ":"),
        "",
        *(f"    {c}" for c in commands),
        "",
        f"Machine: {cpu_name()}, {os.cpu_count()} cores; torch {torch.__version__}, "
        f"torch.set_num_threads({args.threads}); Python {platform.python_version()}; "
        f"{platform.system()} {platform.release()}.",
        "",
        f"Matmul peak (float32, {matmul['size']}³, best of {args.matmul_repeats}, measured at "
        f"the start and at the end of each run, the best kept): "
        f"**{matmul['square_gflops']:.1f} GFLOP/s**; a {'×'.join(map(str, matmul['block_shape']))}"
        f" block-shaped matmul like (c)'s: {matmul['block_gflops']:.1f} GFLOP/s.",
        "",
        f"Setup: d = {DIM}, K = {N_CHUNKS} chunks, learnability criterion, float32; learner "
        f"t = {LEARNER_TC[0]:g}, c = {LEARNER_TC[1]:g}; reference t = {REFERENCE_TC[0]:g}, "
        f"c = {REFERENCE_TC[1]:g}; b = round(N (1 - f)). Times are the best of the repeats "
        f"listed in the detail table ({repeats_note(results)}). Peak MB = peak RSS growth "
        f"over the RSS just before the call "
        f"(MB = MiB, 2^20 bytes). (a) and (b) are skipped (OOM-skipped) where their N×N "
        f"matrices would need more than {args.dense_max_gb:g} GB "
        f"(~{DENSE_BYTES_PER_ELEMENT} N² bytes).",
        "",
        "Shared machine: before each measurement the driver waits (up to --wait-idle s) until "
        f"other processes use < {QUIET_CORES} cores, and a measurement whose best repeat was "
        "disturbed is repeated while the extra time stays under --extra-repeat-s s (see the "
        "commands). \"others' cores\" in the detail table is the "
        "average number of cores other processes kept busy during the best repeat "
        "(/proc/stat busy time minus this process's own CPU time, over the wall time); well "
        "above 0 means that time is inflated by contention. \"its CPU s\" is the process's "
        "own user + system CPU time in that repeat.",
        "",
        main,
        "",
        "Target checks:",
        "",
        "| target | measured | result |",
        "|:---|:---|:---|",
        *(f"| {t} | {m} | **{v}** |" for t, m, v in checks),
        "",
        "Detail (every subprocess):",
        "",
        detail,
    ]
    return "\n".join(lines) + "\n"


def write_out(path: Path, body: str) -> None:
    replace_section(path, body, "selection_speed", "Selection speed benchmark")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="*", default=DEFAULT_SIZES,
                   help="super-batch sizes N for all three paths (default %(default)s; none: omit)")
    p.add_argument("--large-sizes", type=int, nargs="*", default=DEFAULT_LARGE_SIZES,
                   help="extra N for path (c) only (default %(default)s; none: omit)")
    p.add_argument("--filter-ratios", type=float, nargs="+", default=DEFAULT_RATIOS,
                   help="filter ratios f (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke test: N in {1024, 4096}, no large sizes")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--repeats", type=int, default=None,
                   help="timing repeats for every N (default: 5 up to N=4096, 3 at 16384, "
                        "2 at 65536, 1 above; 2 with --quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dense-max-gb", type=float, default=16.0,
                   help="skip (a) and (b) when ~16 N^2 bytes exceed this (default 16)")
    p.add_argument("--matmul-size", type=int, default=2048)
    p.add_argument("--matmul-repeats", type=int, default=5)
    p.add_argument("--wait-idle", type=float, default=None,
                   help="before each measurement wait up to this many seconds for other "
                        "processes to use < 0.25 cores (shared machines; 0: do not wait; "
                        "default 120, 0 with --quick)")
    p.add_argument("--extra-repeat-s", type=float, default=None,
                   help="if the best repeat was disturbed by other processes, repeat again "
                        "while the extra time stays under this many seconds (default 60, "
                        "0 with --quick)")
    p.add_argument("--timeout", type=float, default=3600.0,
                   help="seconds per measuring subprocess")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown file to write the results into (e.g. docs/benchmarks.md)")
    p.add_argument("--json", type=Path, default=None, help="also dump the raw results here")
    p.add_argument("--profile", action="store_true",
                   help="instead: profile path (c) with torch.profiler at each --sizes x "
                        "--filter-ratios and print where its time goes")
    p.add_argument("--merge", type=Path, default=None,
                   help="a --json file of an earlier run: its results are kept except those "
                        "this run measures again (e.g. rerun one N on a quieter machine)")
    p.add_argument("--report-only", action="store_true",
                   help="measure nothing: rewrite the report from the --merge file")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one is None:  # the parent: every argument before minutes of measuring
        _check_arguments(p, args)
        args.previous = _read_merge(p, args.merge)
    if args.wait_idle is None:
        args.wait_idle = 0.0 if args.quick else 120.0
    if args.extra_repeat_s is None:
        args.extra_repeat_s = 0.0 if args.quick else 60.0
    return args


def _check_arguments(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for name, least in (("threads", 1), ("matmul_size", 1), ("matmul_repeats", 1), ("seed", 0)):
        if getattr(args, name) < least:
            p.error(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    if not all(0 < f < 1 for f in args.filter_ratios):
        p.error(f"--filter-ratios must all be in (0, 1), got {args.filter_ratios}")
    if any(n < 1 for n in args.sizes + args.large_sizes):
        p.error(f"--sizes and --large-sizes must all be >= 1, got "
                f"{args.sizes + args.large_sizes}")
    if not args.timeout > 0:
        p.error(f"--timeout must be > 0, got {args.timeout}")
    check_outputs(p, args.out, "selection_speed", args.json, may_replace=args.merge)


def _read_merge(p: argparse.ArgumentParser, path: Path | None) -> dict:
    """The earlier run's --json to merge into, checked now (not after the measuring)."""
    if path is None:
        return {"results": [], "commands": [], "matmul": None}
    try:
        previous = json.loads(path.read_text())
    except OSError as err:
        p.error(f"--merge {path}: cannot read it ({err.strerror or err})")
    except ValueError as err:
        p.error(f"--merge {path} is not valid JSON ({err})")
    if not (isinstance(previous, dict) and isinstance(previous.get("results"), list)
            and isinstance(previous.get("commands"), list)
            and isinstance(previous.get("matmul"), (dict, type(None)))
            and all(isinstance(r, dict) and "path" in r for r in previous["results"])):
        p.error(f"--merge {path} is not a --json file of this benchmark (it needs results, "
                f"commands and matmul)")
    return previous


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.one is not None:
        print(RESULT_TAG + json.dumps(child(json.loads(args.one))), flush=True)
        return 0

    command = command_line("selection_speed.py", argv)
    start = time.perf_counter()
    if args.profile:
        for n in args.sizes:
            for f in args.filter_ratios:
                wait_until_quiet(args.wait_idle)
                r = spawn({"path": "profile", "n": n, "f": f, "threads": args.threads,
                           "seed": args.seed}, args.timeout)
                if r["status"] != "ok":
                    print(f"N={n} f={f}: {r['status']} {r.get('error', '')}")
                    continue
                print(f"\n(c) N={n} f={f} b={r['b']}: {r['wall_s']:.2f} s wall under the "
                      f"profiler, CPU {r['cpu_s']:.2f} s, others' cores {r['others_cores']:.2f}")
                print("| op | calls | self CPU s | share |\n|:---|---:|---:|---:|")
                for o in r["ops"]:
                    print(f"| {o['op']} | {o['calls']} | {o['self_s']:.3f} | "
                          f"{100 * o['share']:.1f}% |")
        return 0
    previous: dict = args.previous
    if args.report_only:
        if not previous["results"]:
            raise SystemExit("--report-only needs --merge with an earlier run's --json file")
        body = report(args, previous["results"], previous["matmul"], previous["commands"])
        print(body)
        if args.out is not None:
            write_out(args.out, body)
            print(f"written to {args.out}")
        return 0
    matmul_spec = {"path": "matmul", "threads": args.threads, "size": args.matmul_size,
                   "repeats": args.matmul_repeats}

    def measure_peak(best: dict | None) -> dict:
        wait_until_quiet(args.wait_idle)
        m = spawn(matmul_spec, args.timeout)
        if m["status"] != "ok":
            raise SystemExit(f"matmul measurement failed: {m}")
        print(f"matmul: {m['square_gflops']:.1f} GFLOP/s "
              f"(block shape {m['block_gflops']:.1f})", flush=True)
        if best is None:
            return m
        return {**m, **{k: max(m[k], best[k]) for k in ("square_gflops", "block_gflops")}}

    matmul = measure_peak(None)

    results = []
    for spec in plan(args):
        label = f"({spec['path']}) N={spec['n']} f={spec['f']}"
        if spec["path"] in ("a", "b") and dense_bytes(spec["n"]) > args.dense_max_gb * 1e9:
            results.append(dict(spec, status="OOM-skipped"))
            print(f"{label}: OOM-skipped (~{dense_bytes(spec['n']) / 1e9:.0f} GB)", flush=True)
            continue
        quiet = wait_until_quiet(args.wait_idle)
        res = spawn(spec, args.timeout)
        res["others_cores_before"] = quiet
        results.append(res)
        if res["status"] == "ok":
            print(f"{label}: {fmt_s(res['time_s'])} s (cpu {fmt_s(res['cpu_s'])} s, others "
                  f"{res['others_cores']:.2f} cores), peak growth "
                  f"{fmt_mib(res['peak_growth_mib'])} MB", flush=True)
        else:
            print(f"{label}: {res['status']} {res.get('error', '')}", flush=True)

    if not args.quick:
        matmul = measure_peak(matmul)  # again at the end: the peak is the better of the two
    elapsed = time.perf_counter() - start
    commands = [*previous.get("commands", []), f"{command}  # {elapsed / 60:.1f} min"]
    if previous["results"]:
        redone = {(r["path"], r["n"], r["f"]) for r in results}
        results = [r for r in previous["results"]
                   if (r["path"], r["n"], r["f"]) not in redone] + results
    if previous.get("matmul"):
        matmul = {**matmul, **{k: max(matmul[k], previous["matmul"][k])
                               for k in ("square_gflops", "block_gflops")}}
    body = report(args, results, matmul, commands)
    print()
    print(body)
    if args.json is not None:
        write_json(args.json, {"matmul": matmul, "results": results, "commands": commands})
    if args.out is not None:
        write_out(args.out, body)
        print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    # SIGTERM ends the run as Ctrl-C does, by an exception: subprocess.run then kills the
    # measuring child (found in review: it was left running, re-parented to init).
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    sys.exit(main())
