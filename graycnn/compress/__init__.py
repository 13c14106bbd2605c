"""compress: a color CNN becomes a smaller gray one, with the study's baselines.

config.py    the settings (flags are made from them)
stages.py    the stages, as functions of plain data
pipeline.py  `compress`: the stages in order
writer.py    figures, JSON, checkpoints
report.py    report.md
pool.py      one row of several runs against its bar, pooled
"""

from graycnn.compress.config import ACTIVATION, OBJECTIVES, CompressConfig, validate
from graycnn.compress.pipeline import compress
from graycnn.compress.report import format_report
from graycnn.compress.stages import PRETRAINED, filter_responses

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
