"""One row of several compress runs against its bar, pooled over runs, seeds and images.

    python -m experiments.pool --runs=default=/tmp/tiny_s3,/tmp/tiny_seed1_s3
    # | setting | runs | validation | held out | per workdir, validation | per workdir, held out |
    # | default | 6 | -0.40 [-1.45, +0.60] | -0.05 [-0.95, +0.85] | +0.27 / -1.07 | ...

Each --runs is LABEL=WORKDIR[,WORKDIR...], one line of the table: e.g. the `--seeds=3`
runs of two color models with the same flags. The label may hold '='
(`--runs=--bn_loss=kd=A,B`). Every run's checkpoints of --row and --bar are evaluated
again on its validation and held-out images (the runs must share them), and the
differences, in points, get one paired bootstrap interval over images and runs
(docs/results.md "Pooled over color models"); --figure draws them. Every input error is
found before the first evaluation. Runs planned to a target have keys of their own plans:
name their rows by role, `--row=merged@finetune --bar=prune_l1@finetune`.
"""

import os

from absl import flags

from graycnn import io
from graycnn.cli import runtime, workdir
from graycnn.study import pool
from graycnn.study.figures import charts

flags.DEFINE_multi_string(
    "runs", None, "LABEL=WORKDIR[,WORKDIR...]: compress workdirs pooled into one line; "
    "repeat for more lines.", required=True,
)  # fmt: skip
flags.DEFINE_string(
    "row", "merged_1+2", "Key of the row compared (report.json 'key'), or ROLE@BUDGET: "
    "e.g. merged@finetune, the one merged row of the fine-tune budget in each run.",
)  # fmt: skip
flags.DEFINE_string(
    "bar", "gray_bn", "Key of the row it is compared against, or ROLE@BUDGET (ROLE: merged, "
    "bar, refit, random, prune_l1 or scratch; BUDGET: bn, finetune or none).",
)  # fmt: skip
flags.DEFINE_string("out", None, "Also write the results here, as JSON.")
flags.DEFINE_string("figure", None, "Also draw them here, as a PNG (one panel per split).")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    runs = [_parse(spec) for spec in FLAGS.runs]
    for flag in ("out", "figure"):
        _check_writable(flag, FLAGS[flag].value)
    results = pool.compare_settings(runs, FLAGS.row, FLAGS.bar)
    if FLAGS.out:
        io.write_json(FLAGS.out, dict(results))
    if FLAGS.figure:
        print(f"figure: {charts.plot_pooled(results, FLAGS.figure)}")
    print(pool.format_table(results))


def _check_writable(flag: str, path: str | None) -> None:
    """An output that could not be written fails now, not after the evaluations."""
    if path is None:
        return
    if os.path.isdir(path):
        raise ValueError(f"--{flag} {path} is a directory; give a file name")
    workdir.prepare(os.path.dirname(os.path.abspath(path)), flag=f"--{flag}'s directory")


def _parse(spec: str) -> tuple[str, list[str]]:
    label, _, dirs = spec.rpartition("=")  # a label may be a flag: --bn_loss=kd=DIR,DIR
    workdirs = [d for d in dirs.split(",") if d]
    if not label or not workdirs:
        raise ValueError(f"--runs: {spec!r} is not LABEL=WORKDIR[,WORKDIR...]")
    return label, workdirs


if __name__ == "__main__":
    runtime.run(main)
