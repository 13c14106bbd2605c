"""The study application: compress a color CNN into a smaller gray one, with the
study's baselines, controls and statistics.

config.py    the settings (flags are made from them)
inputs.py    the data, the color model and the checks before any long work
stages.py    the stages, as functions of plain data (inputs.py's re-exported)
pipeline.py  `compress`: the stages in order
writer.py    figures, JSON, checkpoints
report.py    report.md
pool.py      one row of several runs against its bar, pooled
budget.py    the plans for FLOPs or parameter targets (a sweep: one search)
table.py     the report's rows
schema.py    report.json, typed and versioned (rows, comparisons, from_json)
controls.py  random and prune_l1 groupings at the same widths
stats.py     paired bootstrap intervals and McNemar
baselines.py the study's Tables 1 and 2
figures/     every figure of a report
"""

from graycnn.study.config import ACTIVATION, OBJECTIVES, CompressConfig, validate
from graycnn.study.pipeline import compress
from graycnn.study.report import format_report
from graycnn.study.stages import PRETRAINED, filter_responses

__all__ = [
    "ACTIVATION",
    "OBJECTIVES",
    "PRETRAINED",
    "CompressConfig",
    "compress",
    "filter_responses",
    "format_report",
    "validate",
]
