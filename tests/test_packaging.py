"""The wheel's package list is the tree's: every folder with an __init__.py under a mapped
root (fastft/, kernels/ as fastft.kernels, csrc/ as fastft.csrc) is listed in pyproject.toml,
and requires-python admits no interpreter the code cannot run on (tomllib: 3.11)."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def tree_packages() -> set[str]:
    names = set()
    for name, folder in PROJECT["tool"]["setuptools"]["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            if "__pycache__" not in rel:
                names.add(".".join((name, *rel)))
    return names


def test_every_package_of_the_tree_is_in_the_wheel():
    listed = set(PROJECT["tool"]["setuptools"]["packages"])
    tree = tree_packages()
    assert {"fastft", "fastft.profile", "fastft.kernels", "fastft.csrc"} <= tree
    assert tree - listed == set(), "add these to [tool.setuptools] packages in pyproject.toml"
    assert listed - tree == set(), "these listed packages have no folder"


def test_requires_python_matches_the_code():
    uses_tomllib = any("import tomllib" in p.read_text() for p in (ROOT / "fastft").rglob("*.py"))
    assert uses_tomllib and PROJECT["project"]["requires-python"] == ">=3.11"
    assert PROJECT["tool"]["ruff"]["target-version"] == "py311"
