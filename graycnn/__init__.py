"""graycnn: turn a color-trained CNN into a smaller gray one (README.md)."""

from graycnn import host_memory as _host_memory
from graycnn import xla_options as _xla_options

# Before any JAX backend starts: XLA reads XLA_FLAGS once, at its first use, and malloc
# settings reach only the threads that have not allocated yet.
_xla_options.apply_xla_defaults()
_host_memory.keep_freed_memory()
