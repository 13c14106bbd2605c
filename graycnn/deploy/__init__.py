"""Shipping a model: artifacts that run without graycnn (StableHLO, TFLite), each checked
against the Flax model at export time.

Example:
    >>> config, variables, _ = checkpoint.load_model("runs/compress/models/merged_1_2")
    >>> result = export_model(config, variables, "out/", images)
"""

from graycnn.deploy.export import (
    FILES,
    FORMATS,
    TOLERANCE,
    Exported,
    export_model,
    export_stablehlo,
    export_tflite,
    inference_function,
    run_stablehlo,
    run_tflite,
    signature,
    view_of,
)
from graycnn.deploy.speed import Timed, measure_speed

__all__ = [
    "FILES",
    "FORMATS",
    "TOLERANCE",
    "Exported",
    "Timed",
    "export_model",
    "export_stablehlo",
    "export_tflite",
    "inference_function",
    "measure_speed",
    "run_stablehlo",
    "run_tflite",
    "signature",
    "view_of",
]
