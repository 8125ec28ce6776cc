"""One version: hoshikage_sd/__init__.py, which pyproject.toml reads, and debian/changelog."""

from __future__ import annotations

import re
import tomllib

from hoshikage_sd import __version__
from testbed import REPO_ROOT

CHANGELOG = REPO_ROOT / "packaging/debian/changelog"


def changelog_version() -> str:
    first = CHANGELOG.read_text().splitlines()[0]
    match = re.fullmatch(r"hoshikage \(([^)\s]+)\) \S+; urgency=\w+", first)
    assert match, f"not a changelog heading: {first!r}"
    return match.group(1)


def test_pyproject_reads_the_package_version() -> None:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
    assert attr == "hoshikage_sd.__version__"


def test_changelog_is_the_same_version() -> None:
    upstream, _, revision = changelog_version().rpartition("-")
    assert upstream == __version__, f"debian/changelog {upstream} != hoshikage_sd {__version__}"
    assert revision.isdigit()
