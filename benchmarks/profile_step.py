"""Where one CPU train step's time goes, by op category, from a jax.profiler trace.

    python -m benchmarks.profile_step --model=densenet_tiny --batch_size=128 --steps=3

Compiles the library's train step as benchmarks/train.py does (every device, graycnn's
XLA defaults), runs a warm-up step, times `--steps` steps, then traces as many and sums
the time each op of the step takes on XLA's threads, by category (convolution or dot,
Eigen or YNNPACK, in the forward or the backward pass; reduce; elementwise fusions;
...). Each op is classified from the compiled step's optimized HLO
(`Compiled.as_text()`: the module that `--xla_dump_to` would write, without setting
XLA_FLAGS before JAX starts or dumping every module of the process), whose instruction
names are the names of the trace's events.

Eigen convolutions return as soon as they have queued their work on the intra-op pool;
that work runs later as pool tasks, each linked in the trace to the op that queued it, so
a task's time counts for that op. The table's ms are thread time summed over the pool's
N threads and divided by N, so its rows, with "idle", add up to the traced step's wall
time. "all-reduce: waiting" is a device's thread blocked until the other device reaches
the same all-reduce (BN statistics and gradients are summed across devices); the
"all-reduce" row is the rest of the op: the sum, and waking up once both have arrived.
Times are wall time on each thread, so on a loaded machine they include time spent
waiting for a core.
"""

import collections
import glob
import re
import tempfile
import time
from collections.abc import Callable
from typing import Any

import jax
from absl import flags

from benchmarks import markdown_table
from benchmarks import train as train_bench
from graycnn.cli import runtime

_OTHER = "other (RNG, executor, ...)"
_WAIT = "all-reduce: waiting for the other device"
_IDLE = "idle (no XLA work on a thread)"


def _instructions(hlo: str) -> tuple[dict[str, tuple[str, str]], dict[str, set[str]]]:
    """({instruction: (opcode, its line)}, {computation: opcodes in its body}).

    A fusion's line ends with the line of the convolution or dot it calls, if any, so
    that `_category` can read that op's source (its `op_name`).
    """
    ops: dict[str, tuple[str, str]] = {}
    bodies: dict[str, set[str]] = collections.defaultdict(set)
    inner: dict[str, str] = {}
    computation = ""
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.endswith("{"):
            computation = line.removeprefix("ENTRY ").split()[0].lstrip("%")
            continue
        # `%name = shape opcode(`; tuple shapes hold spaces but never ` word(`.
        m = re.match(r"\s+(?:ROOT )?%(\S+) = .*? ([a-z][a-z0-9\-]*)\(", line)
        if m:
            ops[m.group(1)] = (m.group(2), line)
            bodies[computation].add(m.group(2))
            if m.group(2) in ("convolution", "dot"):
                inner.setdefault(computation, line)
    for name, (opcode, line) in ops.items():
        called = re.search(r"calls=%([\w.\-]+)", line)
        if opcode == "fusion" and called and called.group(1) in inner:
            ops[name] = (opcode, f"{line}\n{inner[called.group(1)]}")
    return ops, bodies


def _category(op: str, ops: dict[str, tuple[str, str]], bodies: dict[str, set[str]]) -> str:
    """The category of the HLO instruction that a trace event names."""
    opcode, line = ops.get(op, ("", ""))
    body = {opcode}
    if opcode == "fusion":
        called = re.search(r"calls=%([\w.\-]+)", line)
        body = bodies.get(called.group(1), set()) if called else set()
    library = "YNNPACK" if "__ynn" in line else "Eigen"  # YNNPACK ops are custom fusions.
    # Autodiff names the ops of the backward pass `transpose(jvp(...))`; ops that XLA
    # makes itself (its kernel-gradient convolutions) have no name.
    source = re.findall(r'op_name="([^"]*)"', line)
    direction = "forward" if source and "transpose(" not in source[-1] else "backward"
    if "convolution" in body:
        return f"convolution ({library}), {direction}"
    if "dot" in body:
        return f"dot ({library}), {direction}"
    if opcode.startswith("all-") or opcode in ("reduce-scatter", "collective-permute"):
        return "all-reduce (sum across devices)"
    if "reduce-window" in body:
        return "pooling (reduce-window)"
    if "reduce" in body:
        return "reduce (BN statistics, gradient sums)"
    if "concatenate" in body:
        return "concatenate"
    if body and body <= {"copy", "transpose", "bitcast", "reshape", "slice", "parameter"}:
        return "transpose/copy"
    if opcode == "fusion":  # A transpose here moves BN/ReLU outputs to another layout.
        kind = "elementwise fusions (BN, ReLU, SGD)"
        return kind + (" with a transpose" if "transpose" in body else "")
    return _OTHER


def _thread_times(
    xspace: str, module: str, categorize: Callable[[str], str]
) -> tuple[dict[str, float], int]:
    """Nanoseconds per category summed over XLA's threads, and the intra-op pool's size.

    Each thread's time goes to its innermost open event: an op of `module`, a wait in a
    rendezvous, the thunk executor, or a pool task, which counts for the op that queued it.
    Tasks queue tasks too, so all threads' events are swept together in time order.
    """
    plane = jax.profiler.ProfileData.from_file(xspace).find_plane_with_name("/host:CPU")
    lines = [line for line in plane.lines if line.name.startswith("tf_XLA")]
    marks = []  # (time, 0 = close before 1 = open at the same time, thread, what, payload)
    for t, line in enumerate(lines):
        region = None
        for e in line.events:
            stats = dict(e.stats)
            if e.name == "ThreadpoolListener::StartRegion":
                region = (e.start_ns, stats.get("_c"))
                continue
            if e.name == "ThreadpoolListener::StopRegion" and region:
                marks += [(region[0], 1, t, "task", region), (e.start_ns, 0, t, "task", region)]
                region = None
                continue
            if e.name == "ThreadpoolListener::Record":
                marks.append((e.start_ns, 1, t, "queue", stats.get("_p")))
                continue
            if stats.get("hlo_module") == module:
                what = categorize(e.name)
            elif e.name.startswith("Wait"):  # inside a collective's rendezvous
                what = _WAIT
            elif e.name == "ThunkExecutor::Execute":
                what = _OTHER
            elif "wait for completion" in e.name:  # a client thread blocked on the step
                what = None
            else:
                continue
            marks += [(e.start_ns, 1, t, what, e), (e.end_ns, 0, t, what, e)]
    queued: dict[Any, str] = {}  # pool task id -> category of the op that queued it
    stacks: list[list[tuple[str, Any]]] = [[] for _ in lines]
    times: dict[str | None, float] = collections.defaultdict(float)
    last = [0] * len(lines)
    for when, opens, t, what, payload in sorted(marks, key=lambda m: m[:3]):
        stack = stacks[t]
        if stack:
            times[stack[-1][0]] += when - last[t]
        last[t] = when
        if what == "queue":
            queued[payload] = (stack[-1][0] if stack else None) or _OTHER
        elif opens:
            stack.append((queued.get(payload[1], _OTHER) if what == "task" else what, payload))
        else:
            stacks[t] = [s for s in stack if s[1] is not payload]
    times.pop(None, None)
    return times, sum(line.name.startswith("tf_XLAEigen") for line in lines)


def profile(model_name: str, batch_size: int, steps: int) -> list[dict[str, Any]]:
    """Traces `steps` train steps of `model_name` after a warm-up step.

    Returns:
        Rows {'category', 'ms' (per step), 'percent' (of the traced step's wall time)},
        largest first, then 'idle', then the total row 'step (wall, traced)', which also
        holds 'untraced_ms', the step's wall time without the profiler.
    """
    jx = train_bench.jax_steps(model_name, batch_size)
    hlo = jx["train_compiled"].as_text()
    module = re.match(r"HloModule ([^\s,]+)", hlo).group(1)
    ops, bodies = _instructions(hlo)
    jx["train"](1)  # warm-up: first-call allocations, thread pools.
    start = time.perf_counter()  # untraced too: the profiler's own cost shows.
    jx["train"](steps)
    untraced_ms = (time.perf_counter() - start) * 1e3 / steps
    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp):
            start = time.perf_counter()
            jx["train"](steps)
            wall_ms = (time.perf_counter() - start) * 1e3 / steps
        xspace = glob.glob(f"{tmp}/**/*.xplane.pb", recursive=True)[0]
        times, threads = _thread_times(xspace, module, lambda op: _category(op, ops, bodies))
    ms = {k: v / 1e6 / steps / threads for k, v in times.items()}
    ms[_IDLE] = max(0.0, wall_ms - sum(ms.values()))
    rows = [
        {"category": k, "ms": v, "percent": 100 * v / wall_ms}
        for k, v in sorted(ms.items(), key=lambda kv: (kv[0] == _IDLE, -kv[1]))
    ]
    total = {"category": "step (wall, traced)", "ms": wall_ms, "percent": 100.0}
    return rows + [total | {"untraced_ms": untraced_ms}]


def format_rows(rows: list[dict[str, Any]]) -> list[str]:
    """Markdown table lines: category, ms per step, % of step."""
    lines = markdown_table(
        ["category", "ms per step", "% of step"],
        [[r["category"], f"{r['ms']:,.1f}", f"{r['percent']:.1f}"] for r in rows],
    )
    return lines + ["", f"Step wall time without the profiler: {rows[-1]['untraced_ms']:,.1f} ms."]


def main(argv):
    del argv
    FLAGS = flags.FLAGS
    rows = profile(FLAGS.model, FLAGS.batch_size, FLAGS.steps)
    print(
        f"{FLAGS.model}, batch {FLAGS.batch_size}, {jax.device_count()} x "
        f"{jax.devices()[0].device_kind}, {FLAGS.steps} traced steps\n"
    )
    print("\n".join(format_rows(rows)))


if __name__ == "__main__":
    # Defined only when run as a script, so that benchmarks.run can import `profile`.
    flags.DEFINE_string("model", "densenet_tiny", "Model name.")
    flags.DEFINE_integer("batch_size", 128, "Global batch size.")
    flags.DEFINE_integer("steps", 3, "Traced steps (after one warm-up step).")
    runtime.setup()
    runtime.run(main)
