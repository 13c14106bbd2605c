"""Thin absl-flags entry points: `python -m experiments.<name> --helpfull`.

Importing this package, before graycnn or JAX start, opts the process into graycnn's
CPU tuning (`graycnn.xla_options.enable_cpu_defaults`: 2 host devices, the train and
eval steps' CPU speed-ups); XLA_FLAGS set by the user take precedence.
"""

import os
import signal
import sys


def _interrupted(signum, frame):
    # Ctrl-C while the command is still importing (JAX takes seconds): one line, not a
    # traceback through the imports; `runtime.run` takes over once main starts.
    os.write(2, b"error: interrupted\n")
    os._exit(130)


if sys.argv[:1] == ["-m"]:  # run as `python -m experiments.<name>`, not imported
    signal.signal(signal.SIGINT, _interrupted)

# After the handler: importing xla_options imports JAX (seconds).
from graycnn import xla_options  # noqa: E402

xla_options.enable_cpu_defaults()
