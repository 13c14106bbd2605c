"""The parts of the receptive-field computation (`graycnn.receptive_field`, its entry
point): `options`, the checks of its arguments before any work."""

from graycnn.fields.options import LOOPS, OBJECTIVES, check_filters, check_fit, check_options

__all__ = ["LOOPS", "OBJECTIVES", "check_filters", "check_fit", "check_options"]
