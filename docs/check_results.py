"""Checks docs/results.md: its sections' structure, and its tables against real runs.

    python docs/check_results.py
    python docs/check_results.py --run default=DIR [--run target=DIR ...]

Structure (always): every `##`/`###` section that states numbers names a command that
reproduces them (a code block, or inline code starting `python `, `pip ` or `.ci/`), its
own or its `##` parent's; no line says its numbers come from an earlier split or
sample unless the section says why they are current (`<!-- current: WHY -->`); each
quantity stated in several notes (QUANTITIES) has one value, or a range holding it.

Runs: `<!-- check: NAME -->` under a heading marks that section (with its subsections)
as the run NAME's report.md: each table in it must equal, cell for cell, the report.md
table under the heading of the same text. `<!-- check: lever_table -->` marks a table of
`python -m docs.lever_table`: the rows of each run NAME given must equal its output for
that run. DIR is a compress workdir, e.g. `python -m experiments.compress --layers=1,2
--workdir=DIR` for default and `--target_flops=0.7 --workdir=DIR` for target.

Prints one line per problem and per checked section (`ok`, `skipped` or the first
differing cell); exits with status 1 on any problem or difference.
"""

import argparse
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "docs", "results.md")

_HEADING = re.compile(r"^(#{1,6}) (.*)$")
_MARKER = re.compile(r"<!-- check: (\S+) -->")
_CURRENT = re.compile(r"<!-- current: .+ -->")
_HISTORY = re.compile(r"earlier (split|sample)|previous (split|sample)", re.IGNORECASE)
_COMMAND = re.compile(r"`(python |pip |\.ci/)[^`]*`")

# A quantity stated in several notes: (file, pattern whose group 1 is the value). The
# first place gives the value; a value "A-B" elsewhere (a range, in minutes) must hold it.
QUANTITIES = {
    "the new user's main job (minutes)": [
        ("docs/results.md", r"experiments\.compress --layers=1,2` took (\d+m\d+s) alone"),
        ("README.md", r"no download\), in (\d+-\d+)\s+minutes"),
    ],
    "the new user's test suite (minutes)": [
        ("docs/results.md", r"pytest -q` took (\d+m\d+s)"),
        ("README.md", r"Run the tests \((\d+-\d+) minutes"),
    ],
    "the fast tier (minutes)": [
        ("docs/results.md", r"skipped` in (\d+m\d+s), the slow tier"),
        ("README.md", r"is the fast tier \(([\d.]+-[\d.]+) minutes"),
    ],
    "the default run, warm cache (s)": [
        ("docs/results.md", r"\n\n(\d+(?:-\d+)?) s on the 2 cores with a warm compilation cache"),
        ("docs/results.md", r"\| (\d+(?:-\d+)?) s warm \|"),
    ],
}


def sections(text: str) -> list[tuple[int, str, list[str]]]:
    """The `#`, `##` and `###` sections of Markdown `text`: (level, title, body lines).

    >>> sections("# T\\nx\\n## A\\na\\n### B\\nb\\n")
    [(1, 'T', ['x']), (2, 'A', ['a']), (3, 'B', ['b'])]
    """
    found: list[tuple[int, str, list[str]]] = []
    fenced = False
    for line in text.splitlines():
        fenced ^= line.startswith("```")
        heading = None if fenced or line.startswith("    ") else _HEADING.match(line)
        if heading and len(heading.group(1)) <= 3:
            found.append((len(heading.group(1)), heading.group(2).strip(), []))
        elif found:
            found[-1][2].append(line)
    return found


def _prose(lines: list[str]) -> tuple[str, bool]:
    """The lines' text without code (blocks, spans) and comments; whether they name a command."""
    text, command, fenced = [], False, False
    for line in lines:
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            command = command or bool(line.strip())
            continue
        text.append(line)
    joined = "\n".join(text)
    command = command or bool(_COMMAND.search(joined))
    return re.sub(r"`[^`]*`|<!--.*?-->|\]\([^)]*\)", "", joined, flags=re.S), command


def structure_problems(text: str) -> list[str]:
    """Every problem of results.md `text`'s structure, one line each."""
    problems = []
    parent_command = False
    for level, title, lines in sections(text):
        prose, command = _prose(lines)
        if level == 2:
            parent_command = command
        numbers = level > 1 and re.search(r"\d", prose)
        if numbers and not (command or (level == 3 and parent_command)):
            problems.append(f"{title}: states numbers but names no command")
        if not _CURRENT.search("\n".join(lines)):
            for line in lines:
                if _HISTORY.search(line):
                    problems.append(f"{title}: from an earlier split: {line.strip()[:70]}")
    return problems


def _minutes(value: str) -> float:
    m, s = re.fullmatch(r"(\d+)m(\d+)s", value).groups()  # type: ignore[union-attr]
    return int(m) + int(s) / 60


def quantity_problems(root: str = ROOT) -> list[str]:
    """Each quantity of QUANTITIES stated with two values, or not found, one line each."""
    problems = []
    for name, places in QUANTITIES.items():
        values = []
        for path, pattern in places:
            with open(os.path.join(root, path), encoding="utf-8") as f:
                found = re.search(pattern, f.read())
            if not found:
                problems.append(f"{name}: not found in {path} (/{pattern}/)")
                continue
            values.append((path, found.group(1)))
        for path, value in values[1:]:
            first_path, first = values[0]
            if re.fullmatch(r"[\d.]+-[\d.]+", value) and re.fullmatch(r"\d+m\d+s", first):
                low, high = (float(v) for v in value.split("-"))
                agree = low <= _minutes(first) <= high
            else:
                agree = value == first
            if not agree:
                problems.append(f"{name}: {first_path} says {first}, {path} says {value}")
    return problems


def tables(text: str) -> list[tuple[str, list[list[str]]]]:
    """The Markdown tables of `text`, each with its nearest heading above: (title, rows).

    A row is its cells, stripped; the header is the first row, the `|---|` line dropped.

    >>> tables("## A\\n| x | y |\\n|---|---|\\n| 1 | 2 |\\n")
    [('A', [['x', 'y'], ['1', '2']])]
    """
    found: list[tuple[str, list[list[str]]]] = []
    title, previous = "", ""
    for line in text.splitlines():
        heading = _HEADING.match(line)
        if heading:
            title = heading.group(2).strip()
        if line.startswith("|"):
            if not previous.startswith("|"):
                found.append((title, []))
            if not re.fullmatch(r"\|(\s*:?-+:?\s*\|)+", line.strip()):
                found[-1][1].append([c.strip() for c in line.strip().strip("|").split("|")])
        previous = line
    return found


def first_difference(shown: list[list[str]], run: list[list[str]], key: int = 1) -> str | None:
    """The first cell where table `shown` differs from `run`, in words; None if equal.

    A row is named by its first `key` cells.

    >>> first_difference([["m", "a"], ["x", "1%"]], [["m", "a"], ["x", "2%"]])
    "row 'x', column 'a': results.md 1%, run 2%"
    """
    header = run[0] if run else []

    def name(row: list[str]) -> str:
        return " | ".join(row[:key])

    for i in range(max(len(shown), len(run))):
        if i >= len(shown):
            return f"row '{name(run[i])}' of the run is missing"
        if i >= len(run):
            return f"row '{name(shown[i])}' is not in the run"
        for j in range(max(len(shown[i]), len(run[i]))):
            a = shown[i][j] if j < len(shown[i]) else "(none)"
            b = run[i][j] if j < len(run[i]) else "(none)"
            if a != b:
                column = header[j] if j < len(header) else str(j + 1)
                return f"row '{name(shown[i])}', column '{column}': results.md {a}, run {b}"
    return None


def marked_sections(text: str) -> list[tuple[str, str, str]]:
    """Each `<!-- check: NAME -->` with its section: (NAME, heading, the section's text).

    The section runs from its heading to the next heading of the same or a higher level.
    """
    lines = text.splitlines()
    found = []
    for i, line in enumerate(lines):
        marker = _MARKER.search(line)
        if not marker:
            continue
        start = next(k for k in range(i, -1, -1) if _HEADING.match(lines[k]))
        level = len(_HEADING.match(lines[start]).group(1))  # type: ignore[union-attr]
        end = next(
            (k for k in range(i + 1, len(lines)) if (h := _HEADING.match(lines[k]))
             and len(h.group(1)) <= level),
            len(lines),
        )  # fmt: skip
        found.append((marker.group(1), lines[start], "\n".join(lines[start:end])))
    return found


def check_report_section(section: str, workdir: str) -> str:
    """'ok', or the first difference between `section`'s tables and the run's report.md."""
    with open(os.path.join(workdir, "report.md"), encoding="utf-8") as f:
        report = dict(tables(f.read()))
    shown = tables(section)
    if not shown:
        return "no table to check"
    for title, rows in shown:
        if title not in report:
            return f"'{title}': report.md has no table under this heading"
        difference = first_difference(rows, report[title])
        if difference:
            return f"'{title}': {difference}"
    return "ok"


def check_lever_section(section: str, label: str, workdir: str) -> str:
    """'ok', or the first difference between `section`'s rows of run `label` and
    `python -m docs.lever_table label=workdir`."""
    from docs import lever_table  # reads report.json; results.md names it as the table's source

    run = tables(lever_table.table([(label, workdir)]))[0][1]
    for _, rows in tables(section):
        if rows and rows[0] == run[0]:
            shown = [rows[0]] + [r for r in rows[1:] if r[0] == label]
            return first_difference(shown, run, key=3) or "ok"
    return "no lever table to check"


def check_runs(text: str, runs: dict[str, str]) -> tuple[list[str], bool]:
    """One line per marked section of `text` against `runs` {NAME: workdir}; and whether
    every checked one is equal."""
    lines, equal = [], True
    for name, heading, section in marked_sections(text):
        if name == "lever_table":
            results = [(label, check_lever_section(section, label, d)) for label, d in runs.items()]
        elif name in runs:
            results = [(name, check_report_section(section, runs[name]))]
        else:
            results = [(name, f"skipped (no --run {name}=DIR)")]
        for label, result in results:
            equal = equal and (result == "ok" or result.startswith("skipped"))
            lines.append(f"{heading} [{label}]: {result}")
    return lines, equal


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--results", default=RESULTS, help="the file checked")
    args = parser.parse_args(argv)
    runs = dict(r.split("=", 1) for r in args.run)
    with open(args.results, encoding="utf-8") as f:
        text = f.read()
    problems = structure_problems(text)
    if os.path.abspath(args.results) == RESULTS:
        problems += quantity_problems()
    for line in problems:
        print(line)
    lines, equal = check_runs(text, runs) if runs else ([], True)
    for line in lines:
        print(line)
    return 1 if problems or not equal else 0


if __name__ == "__main__":
    sys.path.insert(0, ROOT)  # `python docs/check_results.py` finds docs.lever_table
    sys.exit(main())
