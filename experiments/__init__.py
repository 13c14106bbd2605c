"""Thin absl-flags entry points: `python -m experiments.<name> --helpfull`.

Importing graycnn sets its CPU defaults (2 host devices, XLA's Eigen convolutions for
the train step; graycnn/xla_options.py) before JAX starts; XLA_FLAGS set by the user
take precedence.
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
