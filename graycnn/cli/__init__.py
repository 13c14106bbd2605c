"""Command-line plumbing of experiments/: process setup, one-line errors, workdirs.

runtime.py  setup, distributed flags, `run` (one `error:` line, resume on Ctrl-C)
workdir.py  a run's directory, written by one run at a time
"""
