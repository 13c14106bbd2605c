"""Transfer to the user's own gray task: a new head, and scratch / transfer / merged
trained the same number of steps (`python -m experiments.transfer`)."""

from graycnn.transfer.config import TransferConfig
from graycnn.transfer.head import find_head, new_head, replace_head
from graycnn.transfer.report import write_report
from graycnn.transfer.run import KINDS, transfer

__all__ = [
    "KINDS",
    "TransferConfig",
    "find_head",
    "new_head",
    "replace_head",
    "transfer",
    "write_report",
]
