"""graycnn: turn a color-trained CNN into a smaller gray one (README.md).

Importing it changes no process state; CPU tuning is opt-in: graycnn.xla_options.
"""
