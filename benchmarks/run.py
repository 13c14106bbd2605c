"""Every benchmark in one command, on whatever devices JAX sees; writes Markdown and JSON.

    python -m benchmarks.run --out=DIR
    python -m benchmarks.run --out=DIR --quick    # fewer steps, rounds, layers
    python -m benchmarks.run --out=DIR --runs=default=runs/compress,target=runs/target

Writes DIR/benchmarks.md and DIR/benchmarks.json with:
  - train and eval img/s of densenet_tiny and densenet_seed (benchmarks/train.py), with
    PyTorch eager on the same network in interleaved rounds when torch is importable,
    and each step's peak memory;
  - on CPU, the train step without each of its CPU speed-ups (`variants`);
  - receptive fields, every filter of a layer batched vs one at a time, with the loop
    kind (benchmarks/receptive_field.py);
  - pairwise IMED and SSIM for N = 36, 234 and 1,000 (benchmarks/distance.py);
  - the compress stages on the default (benchmarks/compress_stages.py);
  - with --runs, each compress row's measured speed-up against its FLOPs cut
    (benchmarks/compress_speed.py);
  - on CPU, where a train step's time goes by op category, for both models
    (benchmarks/profile_step.py).
No XLA_FLAGS are needed: it runs with graycnn's defaults, as the CLIs do.
"""

import datetime
import json
import os
import platform
import resource
import sys
import time
from typing import Any

import jax
from absl import flags

from benchmarks import (
    compress_speed,
    compress_stages,
    distance,
    markdown_table,
    profile_step,
    receptive_field,
)
from benchmarks import train as train_bench
from graycnn.cli import runtime

_OUT = flags.DEFINE_string("out", None, "Directory for benchmarks.md and benchmarks.json.")
_QUICK = flags.DEFINE_bool("quick", False, "Fewer steps, rounds and layers (~5 min).")
_STEPS = flags.DEFINE_integer("steps", None, "Train/eval steps per round (default 3, quick 1).")
_ROUNDS = flags.DEFINE_integer("rounds", None, "Interleaved rounds (default 5, quick 2).")
_ALL_SECTIONS = ["train", "variants", "fields", "distances", "compress", "profile"]
_SECTIONS = flags.DEFINE_list("sections", _ALL_SECTIONS, "Which benchmarks to run.")
_BATCH = flags.DEFINE_integer("batch_size", 128, "Train/eval batch size.")
_RUNS = flags.DEFINE_list(
    "runs",
    [],
    "NAME=DIR of finished compress runs (e.g. the default and a --target_flops "
    "run): their rows' measured speed-up against FLOPs cut (benchmarks/compress_speed.py).",
)


def _machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if "model name" in line)
    except (OSError, StopIteration):
        pass
    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": "python -m benchmarks.run " + " ".join(sys.argv[1:]),
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "load_before": list(os.getloadavg()),
    }
    if train_bench.torch_available():
        import torch

        info |= {"torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    return info


def _fields_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["layer", "filters", "way", "loop", "chunk", "compile s", "run s", "ms/filter-step"]
    return markdown_table(
        header,
        [
            [r["layer"], r["filters"], r["way"], r["loop"], r["chunk"], f"{r['compile_s']:.2f}",
             f"{r['run_s']:.2f}", f"{r['ms_per_filter_step']:.3f}"]
            for r in rows
        ],
    )  # fmt: skip


def _distance_table(rows: list[dict[str, Any]]) -> list[str]:
    header = ["metric", "method", "N", "pairs", "compile s", "run s", "note"]
    return markdown_table(
        header,
        [
            [r["metric"], r["method"], f"{r['n']:,}", f"{r['pairs']:,}",
             "-" if r["compile_s"] is None else f"{r['compile_s']:.3f}", f"{r['run_s']:.4f}",
             r["note"]]
            for r in rows
        ],
    )  # fmt: skip


def _markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        "# graycnn benchmarks",
        "",
        f"`{m['command']}` on {m['date']}: {m['cpu']}, {m['cpus']} CPUs, jax {m['jax']} "
        f"({m['devices']}), XLA_FLAGS `{m['xla_flags']}`"
        + (f", torch {m['torch']} ({m['torch_threads']} threads)" if "torch" in m else "")
        + f". Load average before {m['load_before'][0]:.1f}, after "
        f"{m['load_after'][0]:.1f}; process peak RSS {m['peak_rss_mib']:,.0f} MiB; "
        f"{m['seconds']:.0f} s in all.",
    ]
    for section, text in _SECTION_TEXT.items():
        if section in report:
            lines += ["", *text(report)]
    return "\n".join(lines) + "\n"


def _train_text(report: dict[str, Any]) -> list[str]:
    lines = [
        "## Train and eval throughput",
        "",
        "img/s as median (min-max) over interleaved rounds; ratio = JAX / PyTorch eager "
        "in the same round. Step peak MiB: XLA's buffer assignment of one step "
        "(arguments + outputs + temporaries).",
        "",
        *train_bench.format_rows(report["train"]),
    ]
    diffs = [
        f"{r['model']} {r['torch_max_logit_diff']:.1e}"
        for r in report["train"]
        if "torch_max_logit_diff" in r
    ]
    if diffs:
        lines += [
            "",
            "PyTorch twin vs JAX, max |logit difference| on the batch: " + ", ".join(diffs),
        ]
    return lines


def _variants_text(report: dict[str, Any]) -> list[str]:
    return [
        "## The train step's CPU speed-ups, one at a time",
        "",
        "Train img/s of the library's step (`default`), with nn.BatchNorm instead of the "
        "one-pass BatchNorm (`flax_bn`), with YNNPACK's convolutions instead of Eigen's "
        "(`ynnpack_conv`), with XLA's convolutions instead of the dot forwards and kernel "
        "gradients (`xla_conv`), and with none of them (`neither`); interleaved rounds, ratio "
        "per round.",
        "",
        *train_bench.format_variant_rows(report["variants"]),
    ]


def _fields_text(report: dict[str, Any]) -> list[str]:
    return [
        f"## Receptive fields ({report['fields_config']})",
        "",
        *_fields_table(report["fields"]),
    ]


def _distances_text(report: dict[str, Any]) -> list[str]:
    return ["## Pairwise distances (32x32 gray)", "", *_distance_table(report["distances"])]


def _compress_text(report: dict[str, Any]) -> list[str]:
    c = report["compress"]
    return [
        f"## Compress stages (default config, layers {c['layers']})",
        "",
        *markdown_table(
            ["stage", "seconds"],
            [[r["stage"], f"{r['seconds']:.2f}"] for r in c["stages"]]
            + [["total", f"{sum(r['seconds'] for r in c['stages']):.2f}"]],
        ),
        "",
        f"Merged model: {c['summary']}",
    ] + (
        [
            "",
            "The same stages with the train step's CPU speed-ups on and off "
            "(xla_options.set_cpu_speedups), alternating, seconds per round: on "
            + ", ".join(f"{t:.1f}" for t in c["speedups"]["on"])
            + "; off "
            + ", ".join(f"{t:.1f}" for t in c["speedups"]["off"])
            + ".",
        ]
        if "speedups" in c
        else []
    )


def _profile_text(report: dict[str, Any]) -> list[str]:
    lines = [
        "## Where a train step's time goes (CPU)",
        "",
        "Thread time of each op category, summed over XLA's N intra-op threads and divided "
        "by N, so that the rows add up to the traced step's wall time "
        "(benchmarks/profile_step.py).",
    ]
    for p in report["profile"]:
        lines += ["", f"{p['model']}, batch {p['batch_size']}:", ""]
        lines += profile_step.format_rows(p["rows"])
    return lines


def _rows_text(report: dict[str, Any]) -> list[str]:
    r = report["rows"]
    return [
        f"## Compress rows: measured speed-up against FLOPs cut ({r['device']}, one device)",
        "",
        f"Each row's speed-up over its bar, the median of {r['rounds']} interleaved rounds; "
        "efficiency = speed-up / FLOPs cut (benchmarks/compress_speed.py).",
        "",
        *compress_speed.format_table(r),
    ]


# Markdown of each section, in the order the tables appear.
_SECTION_TEXT = {
    "train": _train_text,
    "variants": _variants_text,
    "fields": _fields_text,
    "distances": _distances_text,
    "compress": _compress_text,
    "rows": _rows_text,
    "profile": _profile_text,
}


def main(argv):
    del argv
    if not _OUT.value:
        raise ValueError("--out: give a directory for benchmarks.md and benchmarks.json")
    quick = _QUICK.value
    steps = _STEPS.value or (1 if quick else 3)
    rounds = _ROUNDS.value or (2 if quick else 5)
    os.makedirs(_OUT.value, exist_ok=True)
    start = time.perf_counter()
    report: dict[str, Any] = {"machine": _machine()}
    unknown = set(_SECTIONS.value) - set(_ALL_SECTIONS)
    if unknown:
        raise ValueError(f"--sections: unknown {sorted(unknown)}; have {', '.join(_ALL_SECTIONS)}")
    if "train" in _SECTIONS.value:
        report["train"] = []
        for name in train_bench.MODELS:
            print(f"train/eval: {name}", flush=True)
            report["train"].append(train_bench.measure(name, _BATCH.value, steps, rounds))
    if "variants" in _SECTIONS.value and jax.default_backend() == "cpu":
        report["variants"] = []
        for name in train_bench.MODELS:
            print(f"train step variants: {name}", flush=True)
            report["variants"].append(
                train_bench.measure_variants(name, _BATCH.value, steps, rounds)
            )
    if "fields" in _SECTIONS.value:
        layers, rf_steps = (["1", "2"], 10) if quick else (["1", "2", "13"], 100)
        report["fields_config"] = f"densenet_seed, {rf_steps} steps, layers {', '.join(layers)}"
        report["fields"] = receptive_field.run_table(
            "densenet_seed", layers, rf_steps, ["auto"], ["one_at_a_time", "batched"], 1
        )
    if "distances" in _SECTIONS.value:
        report["distances"] = distance.run_table(
            [36, 234, 1000], [36, 234] if quick else [36, 234, 1000], 3 if quick else 5
        )
    if "compress" in _SECTIONS.value:
        stages, summary = compress_stages.time_stages()
        report["compress"] = {"layers": "1, 2", "stages": stages, "summary": summary}
        if jax.default_backend() == "cpu":
            report["compress"]["speedups"] = compress_stages.compare_speedups(1 if quick else 2)
    if _RUNS.value:
        print("compress rows: measured speed-up", flush=True)
        report["rows"] = compress_speed.run_table(
            compress_speed.parse_runs(_RUNS.value), _BATCH.value, rounds
        )
    # The profile reads XLA:CPU's thread-pool events; other backends trace differently.
    if "profile" in _SECTIONS.value and jax.default_backend() == "cpu":
        report["profile"] = []
        for name in train_bench.MODELS:
            print(f"profile: {name}", flush=True)
            rows = profile_step.profile(name, _BATCH.value, 2 if quick else 3)
            report["profile"].append({"model": name, "batch_size": _BATCH.value, "rows": rows})
    report["machine"] |= {
        "load_after": list(os.getloadavg()),
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "seconds": time.perf_counter() - start,
    }
    with open(os.path.join(_OUT.value, "benchmarks.json"), "w") as f:
        json.dump(report, f, indent=1)
    text = _markdown(report)
    with open(os.path.join(_OUT.value, "benchmarks.md"), "w") as f:
        f.write(text)
    print(text)


if __name__ == "__main__":
    runtime.setup()
    runtime.run(main)
