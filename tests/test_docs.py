"""The notes stay within their sizes, and their relative links point to files."""

from docs import check_docs


def test_notes_are_within_their_sizes_and_links_resolve():
    assert check_docs.check() == []


def test_a_broken_link_and_a_long_file_are_reported(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "README.md").write_text("[ok](docs/results.md) [web](https://x.org)\n")
    (tmp_path / "BUILD_NOTES.md").write_text("line\n" * 401)
    (tmp_path / "docs" / "results.md").write_text("[up](../README.md) [gone](nothing.md#a)\n")
    (tmp_path / "benchmarks" / "README.md").write_text("[b](../docs/missing.md)\n")
    problems = check_docs.check(str(tmp_path))
    assert problems == [
        "BUILD_NOTES.md: 401 lines, more than 400",
        "benchmarks/README.md: link to ../docs/missing.md, which does not exist",
        "docs/results.md: link to nothing.md, which does not exist",
    ]


def test_relative_links_skip_urls_and_anchors():
    text = "[a](docs/x.md#y) [b](https://e.org) [c](#z) [d](../R.md) ![i](fig.png)"
    assert check_docs.relative_links(text) == ["docs/x.md", "../R.md", "fig.png"]
