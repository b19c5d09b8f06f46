"""The wheel holds every package: pyproject lists packages by hand (services live in services/
under the collafuse.services name), so a new sub-package must be added there, or the image,
which installs the project without -e, would lack it while the editable checkout works."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _packages_on_disk() -> set[str]:
    found = set()
    for base, name in (
        (ROOT / "src" / "collafuse", "collafuse"),
        (ROOT / "services", "collafuse.services"),
    ):
        for init in base.rglob("__init__.py"):
            rel = init.parent.relative_to(base).parts
            found.add(".".join((name, *rel)))
    return found


def test_every_package_is_in_the_wheel() -> None:
    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    assert _packages_on_disk() == listed
