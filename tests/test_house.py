"""The code's shape, as the house rules say: modules of one idea, classes of few parts.

Records (dataclasses, settings models) hold as many fields as the thing they describe has;
every other class owns at most ~12 attributes, and a module past ~300 lines says in its
docstring why it is still one idea.  (Imports between the layers: `lint-imports`, in CI.)
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "pangea"
MODULES = sorted(PACKAGE.rglob("*.py"))
MOST_ATTRIBUTES = 12
MOST_LINES = 300


def _is_record(node: ast.ClassDef) -> bool:
    decorators = {ast.unparse(d).split("(")[0] for d in node.decorator_list}
    bases = {ast.unparse(b) for b in node.bases}
    return bool(decorators & {"dataclass", "dataclasses.dataclass"}) or bool(
        bases & {"BaseSettings", "_Base", "BusSettings", "TrainSettings", "OrchestratorSettings", "NamedTuple"}
    )


def _attributes(node: ast.ClassDef) -> set[str]:
    """Names the class's methods assign on self."""
    names = set()
    for sub in ast.walk(node):
        if isinstance(sub, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
            for target in sub.targets if isinstance(sub, ast.Assign) else [sub.target]:
                for e in ast.walk(target):
                    if isinstance(e, ast.Attribute) and isinstance(e.value, ast.Name) and e.value.id == "self":
                        names.add(e.attr)
    return names


def _classes():
    for path in MODULES:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and not _is_record(node):
                yield pytest.param(path, node, id=f"{path.relative_to(PACKAGE)}:{node.name}")


@pytest.mark.parametrize(("path", "node"), list(_classes()))
def test_a_class_owns_few_attributes(path, node):
    owned = _attributes(node)
    assert len(owned) <= MOST_ATTRIBUTES, f"{node.name} owns {len(owned)} attributes: {sorted(owned)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_a_long_module_says_why_it_is_one_idea(path):
    lines = path.read_text().count("\n")
    if lines > MOST_LINES:
        doc = ast.get_docstring(ast.parse(path.read_text())) or ""
        assert "one module" in doc, f"{path.name}: {lines} lines and no note on why it is one idea"


def test_the_rules_catch_what_they_are_for():
    """A class with 13 attributes and a long module without a note are caught (the checks can fail)."""
    body = "\n".join(f"        self.a{i} = {i}" for i in range(13))
    tree = ast.parse(f"class Big:\n    def __init__(self):\n{body}\n")
    assert len(_attributes(tree.body[0])) == 13 and not _is_record(tree.body[0])
    record = ast.parse("@dataclass\nclass R:\n    x: int\n").body[0]
    assert _is_record(record)
