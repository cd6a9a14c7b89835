"""The package's shape is a rule, not a wish: imports flow down the layers, stages stay apart, modules stay small.

Layers, bottom to top (docs/design.md §3): core -> layouts -> images -> participant | group -> cli, generate
-> platforms (descriptors made from the command line).
A module imports only from its own layer or below; the two levels never import each other; a group stage
(group/stages/X.py) never imports another stage, and no group library module imports a stage.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "clinicadl_app"
LAYERS = {"core": 0, "layouts": 1, "images": 2, "participant": 3, "group": 3, "cli": 4, "generate": 4,
          "platforms": 5}
MAX_LINES = 400


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, package_root: Path = PACKAGE) -> set[str]:
    """Every clinicadl_app module a file imports (relative imports resolved), at any depth of the file."""
    name = module_name(path, package_root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{alias.name}" for alias in node.names}  # `from pkg import module`
    modules = {module_name(p, package_root) for p in package_root.rglob("*.py")}
    return {m for m in found if m in modules}


def layer(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None  # None: the package root (its version), open to all


def stage(module: str) -> str | None:
    parts = module.split(".")
    return parts[3] if parts[1:3] == ["group", "stages"] and len(parts) > 3 else None


SOURCES = sorted(PACKAGE.rglob("*.py"))


def violations(path: Path, package_root: Path = PACKAGE) -> list[str]:
    me = module_name(path, package_root)
    mine = layer(me)
    problems = []
    for other in sorted(imported(path, package_root)):
        theirs = layer(other)
        if theirs is None or theirs == mine or mine is None:
            continue
        if LAYERS[theirs] > LAYERS[mine]:
            problems.append(f"{other} is in a higher layer ({theirs}) than {me} ({mine})")
        elif LAYERS[theirs] == LAYERS[mine]:
            problems.append(f"{me} ({mine}) imports the other level {other}")
    if mine == "group" and not me.endswith(".pipeline") and me != "clinicadl_app.group":
        for other in sorted(imported(path, package_root)):
            if stage(other) and stage(other) != stage(me):
                problems.append(f"{me} imports the stage {other}" + (" (a stage never imports another stage)"
                                                                      if stage(me) else " (a library below stages)"))
    return problems


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_follow_the_layers(path):
    problems = violations(path)
    assert not problems, "\n".join(problems)


def test_the_rule_catches_each_kind_of_violation(tmp_path):
    package = tmp_path / "clinicadl_app"
    files = {
        "__init__.py": "", "core/__init__.py": "", "core/errors.py": "", "layouts/__init__.py": "",
        "layouts/caps.py": "from clinicadl_app.group import data\nfrom clinicadl_app.core import errors\n",
        "participant/__init__.py": "", "participant/pipeline.py": "from clinicadl_app.group.data import x\n",
        "group/__init__.py": "", "group/data.py": "from .stages.predict import run\n", "group/stages/__init__.py": "",
        "group/stages/predict.py": "def f():\n    from . import train\n", "group/stages/train.py": "from .. import data\n",
        "group/pipeline.py": "from clinicadl_app.group.stages import predict, train\n",
    }
    for name, text in files.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    found = {name: violations(package / name, package) for name in files}
    assert ("clinicadl_app.group.data is in a higher layer (group) than clinicadl_app.layouts.caps (layouts)"
            in found["layouts/caps.py"]) and not any("core" in p for p in found["layouts/caps.py"])
    assert found["participant/pipeline.py"] == ["clinicadl_app.participant.pipeline (participant) imports the "
                                                "other level clinicadl_app.group.data"]
    assert "library below stages" in found["group/data.py"][0]
    assert "never imports another stage" in found["group/stages/predict.py"][0]  # even inside a function
    assert found["group/stages/train.py"] == [] and found["group/pipeline.py"] == []


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_modules_stay_small(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(PACKAGE)}: {lines} lines; split it by what its parts do"
