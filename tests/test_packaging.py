"""The package list in pyproject.toml names every package of the source tree (a wheel ships only those)."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_every_package_is_listed_for_the_wheel():
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"([\w.]+)"', re.search(r"^packages = \[(.*)\]$", text, re.M).group(1)))
    found = {".".join(path.parent.relative_to(ROOT).parts)
             for top in ("hvp", "optimizers") for path in (ROOT / top).rglob("__init__.py")}
    assert found == listed
