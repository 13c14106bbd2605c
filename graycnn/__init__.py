"""graycnn: turn a color-trained CNN into a smaller gray one (README.md)."""

from graycnn import runtime as _runtime

# Before any JAX backend starts: XLA reads XLA_FLAGS once, at its first use.
_runtime.apply_xla_defaults()
