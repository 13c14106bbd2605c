"""Checks the notes: their sizes, and that every relative link points to a file.

    python -m docs.check_docs

Prints one line per problem and exits with status 1 if there is any; tests/test_docs.py
runs it. The size limits keep the notes to current facts (a number that changes is
replaced, not appended to).
"""

import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Path relative to the repository root -> the most lines it may have.
MAX_LINES = {"BUILD_NOTES.md": 400, "docs/results.md": 500, "README.md": 300}

# [text](target) and [text](target "title"); images too.
_LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def notes_files(root: str = ROOT) -> list[str]:
    """The Markdown files checked, relative to `root`."""
    names = ["README.md", "BUILD_NOTES.md", "benchmarks/README.md"]
    names += sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(root, "docs", "*.md")))
    return [n for n in names if os.path.exists(os.path.join(root, n))]


def relative_links(text: str) -> list[str]:
    """The targets of the relative links in Markdown `text`, without their #anchors.

    >>> relative_links("[a](docs/x.md#y) [b](https://e.org) [c](#z) [d](../R.md)")
    ['docs/x.md', '../R.md']
    """
    targets = []
    for target in _LINK.findall(text):
        if re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL (https:, mailto:) or an anchor in the same file
        targets.append(target.split("#", 1)[0])
    return targets


def check(root: str = ROOT) -> list[str]:
    """Every problem found, one line each; empty when the notes are fine."""
    problems = []
    for name, limit in MAX_LINES.items():
        path = os.path.join(root, name)
        if not os.path.exists(path):
            problems.append(f"{name}: missing")
            continue
        with open(path, encoding="utf-8") as f:
            lines = len(f.read().splitlines())
        if lines > limit:
            problems.append(f"{name}: {lines} lines, more than {limit}")
    for name in notes_files(root):
        with open(os.path.join(root, name), encoding="utf-8") as f:
            text = f.read()
        base = os.path.dirname(os.path.join(root, name))
        for target in relative_links(text):
            if not os.path.exists(os.path.normpath(os.path.join(base, target))):
                problems.append(f"{name}: link to {target}, which does not exist")
    return problems


def main() -> int:
    problems = check()
    for line in problems:
        print(line)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
