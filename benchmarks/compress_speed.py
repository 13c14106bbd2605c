"""Measured speed-up against FLOPs cut, for the rows of finished compress runs.

    python -m benchmarks.compress_speed --runs=default=runs/compress,target=runs/target

Every gray row of a run's BN budget (its bar, the merged rows and their controls) is
loaded from its checkpoint and timed in the same interleaved rounds on one device
(`graycnn.study.speed.measure_rows`): images per second at batch 1 and `--batch_size`,
and each row's speed-up over its bar beside the FLOPs it cuts. `efficiency` is the
speed-up divided by the FLOPs cut: 1.0 when time falls as fast as FLOPs.
"""

import json
import os
from collections.abc import Sequence
from typing import Any

from absl import app, flags

from benchmarks import markdown_table
from graycnn.study.inputs import Model
from graycnn.study.schema import Report
from graycnn.study.speed import bars_of, device_name, measure_rows
from graycnn.training import checkpoint


def run_table(runs: Sequence[tuple[str, str]], batch_size: int, rounds: int) -> dict[str, Any]:
    """{'device', 'batch_sizes', 'rounds', 'rows': [one dict per timed row]}."""
    batch_sizes = sorted({1, batch_size})
    rows = []
    for name, workdir in runs:
        with open(os.path.join(workdir, "report.json")) as f:
            report = Report.from_json(json.load(f), os.path.join(workdir, "report.json"))
        timed = [r for r in report.rows if r.image_type == "gray" and r.budget == "bn"]
        models = {}
        for r in timed:
            config, variables, _ = checkpoint.load_model(os.path.join(workdir, r.checkpoint))
            models[r.key] = Model(config, variables)
        speeds = measure_rows(models, bars_of(timed), batch_sizes, rounds)
        flops = {r.key: r.flops for r in timed}
        for r in timed:
            s = speeds[r.key]
            if s.against is None or s.speedup is None or s.against == r.key:
                continue
            cut = flops[s.against] / r.flops
            rows.append({
                "run": name, "row": r.key, "flops_cut": cut,
                "images_per_second": s.images_per_second, "speedup": s.speedup,
                "efficiency": s.speedup[batch_size] / cut,
            })  # fmt: skip
    return {"device": device_name(), "batch_sizes": batch_sizes, "rounds": rounds, "rows": rows}


def format_table(table: dict[str, Any]) -> list[str]:
    b = max(table["batch_sizes"])
    return markdown_table(
        ["run", "row", "FLOPs cut", f"speed-up (batch {b})", "speed-up (batch 1)", "efficiency"],
        [
            [r["run"], r["row"], f"{r['flops_cut']:.2f}x", f"{r['speedup'][b]:.2f}x",
             f"{r['speedup'][1]:.2f}x", f"{r['efficiency']:.2f}"]
            for r in table["rows"]
        ],
    )  # fmt: skip


def parse_runs(values: Sequence[str]) -> list[tuple[str, str]]:
    """NAME=DIR pairs, or ValueError naming the entry."""
    runs = []
    for value in values:
        name, sep, workdir = value.partition("=")
        if not sep or not name or not os.path.isfile(os.path.join(workdir, "report.json")):
            raise ValueError(f"--runs: {value!r} is not NAME=DIR of a finished compress run")
        runs.append((name, workdir))
    return runs


def main(argv):
    del argv
    table = run_table(parse_runs(flags.FLAGS.runs), flags.FLAGS.batch_size, flags.FLAGS.rounds)
    print("\n".join(format_table(table)))


if __name__ == "__main__":
    flags.DEFINE_list("runs", None, "NAME=DIR of finished compress runs.", required=True)
    flags.DEFINE_integer("batch_size", 128, "Batch size timed besides 1.")
    flags.DEFINE_integer("rounds", 5, "Interleaved rounds.")
    app.run(main)
