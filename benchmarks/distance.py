"""Benchmark of pairwise IMED and SSIM on 32 x 32 images, on whatever JAX backend is default.

Command:
  python -m benchmarks.distance            # full table
  python -m benchmarks.distance --quick    # N = 36 only, a smoke run

IMED is timed three ways for N = 36, 234 and 1,000:
  - separable: `graycnn.distance.pairwise(images, "imed")`, the jitted
    standardizing transform G_y^(1/2) (x) G_x^(1/2) and one Gram matrix;
  - explicit G, per pair: jitted (x - y)^T G (x - y) with the dense (HW x HW)
    metric for all N^2 ordered pairs, the literal definition;
  - explicit G, Gram: jitted X G X^T, the dense metric but one Gram matrix;
  - numpy loop: a Python loop over the N (N - 1) / 2 pairs, float64
    `v @ G @ v` on one BLAS thread, as the study would have run it.
and SSIM (`pairwise(images, "ssim")`, dm_pix in chunks of pairs) for N = 36, 234.
Run times are the median of a few repeats after compilation, synchronised with
jax.block_until_ready; compile time is `jit(...).lower(...).compile()`. Where
the full computation would take minutes, a subset is timed and extrapolated
linearly, and the note column says so. The target is IMED for N = 1,000 in
under 0.5 s on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import threadpoolctl

from graycnn import distance

SIZE = 32
SIGMA = 1.0
TARGET_N, TARGET_S = 1000, 0.5


def _dense_metric(h: int, w: int, sigma: float) -> np.ndarray:
    """(HW, HW) float64 IMED metric, built directly from pixel positions."""
    ys, xs = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    p = np.stack([ys.ravel(), xs.ravel()], axis=1).astype(np.float64)
    sq = np.sum((p[:, None] - p[None]) ** 2, axis=-1)
    return np.exp(-sq / (2 * sigma**2)) / (2 * np.pi * sigma**2)


@jax.jit
def _explicit_per_pair(flat: jax.Array, rows: jax.Array, metric: jax.Array) -> jax.Array:
    """IMED of rows x all items, one (N, HW) @ (HW, HW) product per row: N^2 (HW)^2."""

    def one_row(i):
        diff = flat - flat[i]
        quad = jnp.sum(jnp.matmul(diff, metric, precision="highest") * diff, axis=-1)
        return jnp.sqrt(jnp.maximum(quad, 0.0))

    return jax.lax.map(one_row, rows)


@jax.jit
def _explicit_gram(flat: jax.Array, metric: jax.Array) -> jax.Array:
    """IMED through X G X^T with the dense metric: N (HW)^2 + N^2 HW."""
    flat = flat - jnp.mean(flat, axis=0, keepdims=True)
    gram = jnp.matmul(jnp.matmul(flat, metric, precision="highest"), flat.T, precision="highest")
    norms = jnp.diagonal(gram)
    return jnp.sqrt(jnp.maximum(norms[:, None] + norms[None] - 2 * gram, 0.0))


def _numpy_loop(flat: np.ndarray, metric: np.ndarray, pairs: int) -> float:
    """Seconds for the first `pairs` pairs (i < j) of a Python loop."""
    n = flat.shape[0]
    done = 0
    # One gemv per pair is memory-bound; OpenBLAS threads only add wake-up
    # jitter (seconds of it on a loaded 2-core machine), so use one thread.
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        start = time.perf_counter()
        for i in range(n):
            for j in range(i + 1, n):
                v = flat[i] - flat[j]
                np.sqrt(v @ metric @ v)
                done += 1
                if done == pairs:
                    return time.perf_counter() - start
        return time.perf_counter() - start


def _median_seconds(fn: Callable[[], object], repeats: int) -> float:
    jax.block_until_ready(fn())  # warm-up: caches, first dispatch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _compile_seconds(jitted, *args, **kwargs) -> float:
    start = time.perf_counter()
    jitted.lower(*args, **kwargs).compile()
    return time.perf_counter() - start


_ROWS: list[dict] = []


def _row(metric, method, n, compile_s, run_s, note=""):
    compile_text = "-" if compile_s is None else f"{compile_s:8.3f}"
    print(
        f"{metric:5s} {method:24s} {n:5d} {n * (n - 1) // 2:8d} {compile_text:>8s} "
        f"{run_s:10.4f}  {note}",
        flush=True,
    )
    _ROWS.append(
        {
            "metric": metric,
            "method": method,
            "n": n,
            "pairs": n * (n - 1) // 2,
            "compile_s": compile_s,
            "run_s": run_s,
            "note": note,
        }
    )
    return run_s


def _bench_imed(n: int, repeats: int) -> float:
    images = np.random.default_rng(n).random((n, SIZE, SIZE)).astype(np.float32)
    stack = jnp.asarray(images[..., None])
    sqrt_1d = distance.gaussian_metric_sqrt(SIZE, SIGMA)
    compile_s = _compile_seconds(distance._imed_core, stack, sqrt_1d, sqrt_1d)
    separable = _row(
        "imed",
        "separable (pairwise)",
        n,
        compile_s,
        _median_seconds(lambda: distance.pairwise(images, "imed", sigma=SIGMA), repeats),
        "public call, incl. input checks",
    )

    metric64 = _dense_metric(SIZE, SIZE, SIGMA)
    metric = jnp.asarray(metric64, jnp.float32)
    flat = jnp.asarray(images.reshape(n, -1))
    # Per pair costs N^2 (HW)^2: ~1e12 multiply-adds at N = 1,000, so time a few rows.
    rows_timed = n if n <= 256 else 20
    rows = jnp.arange(rows_timed)
    compile_s = _compile_seconds(_explicit_per_pair, flat, rows, metric)
    seconds = _median_seconds(lambda: _explicit_per_pair(flat, rows, metric), max(1, repeats // 2))
    note = "" if rows_timed == n else f"extrapolated from {rows_timed} of {n} rows"
    _row("imed", "explicit G, per pair", n, compile_s, seconds * n / rows_timed, note)
    compile_s = _compile_seconds(_explicit_gram, flat, metric)
    _row(
        "imed",
        "explicit G, Gram",
        n,
        compile_s,
        _median_seconds(lambda: _explicit_gram(flat, metric), repeats),
    )

    flat64 = images.reshape(n, -1).astype(np.float64)
    total = n * (n - 1) // 2
    pairs = min(total, 2000)
    seconds = _numpy_loop(flat64, metric64, pairs)
    note = "" if pairs == total else f"extrapolated from {pairs:,} of {total:,} pairs"
    _row("imed", "numpy loop over pairs", n, None, seconds * total / pairs, note)
    return separable


def _bench_ssim(n: int, repeats: int) -> None:
    images = np.random.default_rng(n).random((n, SIZE, SIZE)).astype(np.float32)
    stack = jnp.asarray(images[..., None])
    compile_s = _compile_seconds(
        distance._ssim_core,
        stack,
        jnp.asarray(1.0, jnp.float32),
        filter_size=11,
        filter_sigma=1.5,
        k1=0.01,
        k2=0.03,
    )
    _row(
        "ssim",
        "dm_pix, vmapped pairs",
        n,
        compile_s,
        _median_seconds(lambda: distance.pairwise(images, "ssim", data_range=1.0), repeats),
        "public call, incl. input checks",
    )


def run_table(imed_sizes: list[int], ssim_sizes: list[int], repeats: int = 5) -> list[dict]:
    """Prints the timing table and returns its rows as dicts."""
    _ROWS.clear()
    print(
        f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}, "
        f"{os.cpu_count()} CPUs; images {SIZE}x{SIZE} gray float32, IMED sigma={SIGMA}"
    )
    print(
        f"{'metric':5s} {'method':24s} {'N':>5s} {'pairs':>8s} {'compile':>8s} "
        f"{'run (s)':>10s}  note"
    )
    separable = {n: _bench_imed(n, repeats) for n in imed_sizes}
    for n in ssim_sizes:
        _bench_ssim(n, repeats)
    if TARGET_N in separable:
        verdict = "met" if separable[TARGET_N] < TARGET_S else "MISSED"
        print(
            f"target: IMED for N={TARGET_N} in < {TARGET_S} s: {verdict} "
            f"({separable[TARGET_N]:.4f} s)"
        )
    return list(_ROWS)


def main() -> None:
    """Parses flags and prints the timing table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 36 only")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per entry")
    args = parser.parse_args()
    sizes = [36] if args.quick else [36, 234, 1000]
    run_table(sizes, [36] if args.quick else [36, 234], args.repeats)


if __name__ == "__main__":
    main()
