"""graycnn: turn a color-trained CNN into a smaller gray one (README.md)."""

from graycnn import xla_options as _xla_options

# Before any JAX backend starts: XLA reads XLA_FLAGS once, at its first use.
_xla_options.apply_xla_defaults()
