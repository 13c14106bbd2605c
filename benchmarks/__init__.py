"""Speed benchmarks; `python -m benchmarks.run --out=DIR` runs them all (README.md here).

Importing this package opts the process into graycnn's CPU tuning, as the experiment
CLIs do (`graycnn.xla_options.enable_cpu_defaults`).
"""

from graycnn import xla_options

xla_options.enable_cpu_defaults()


def markdown_table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Lines of a Markdown table: the header, its rule, then one line per row of cells."""
    return [
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
        *("| " + " | ".join(str(c) for c in row) + " |" for row in rows),
    ]
