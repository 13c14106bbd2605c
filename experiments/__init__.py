"""Thin absl-flags entry points: `python -m experiments.<name> --helpfull`.

Importing graycnn sets its CPU defaults (2 host devices, XLA's Eigen convolutions for
the train step; graycnn/xla_options.py) before JAX starts; XLA_FLAGS set by the user
take precedence.
"""
