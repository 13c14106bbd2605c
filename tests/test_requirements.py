"""requirements.txt (the README's set-up step) and pyproject.toml declare the same ranges."""

import pathlib
import tomllib

_ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_requirements_txt_lists_pyproject_dependencies_and_extras():
    lines = (_ROOT / "requirements.txt").read_text().splitlines()
    pinned = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    project = tomllib.loads((_ROOT / "pyproject.toml").read_text())["project"]
    declared = set(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        declared |= set(extra)
    assert pinned == declared
