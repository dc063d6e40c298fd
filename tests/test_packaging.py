"""Every subpackage is listed in pyproject.toml, so a non-editable install (a wheel) ships all of it, and the
top-level `rewards/` and `eval/` folders install under the posttrain namespace, never as top-level modules."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_subpackage_is_packaged():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed, dirs = set(cfg["packages"]), cfg["package-dir"]
    found = {"posttrain." + ".".join(p.parent.relative_to(ROOT / "posttrain").parts)
             for p in (ROOT / "posttrain").rglob("__init__.py") if p.parent != ROOT / "posttrain"}
    assert found <= listed, f"not in pyproject packages: {sorted(found - listed)}"
    assert dirs["posttrain.rewards"] == "rewards" and dirs["posttrain.eval"] == "eval"
    assert not {"rewards", "eval"} & listed
