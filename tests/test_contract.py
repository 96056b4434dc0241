"""The model seams are declared in code: outside `engine/backends/`, the library reads of the large backend and of the
small model only what `LargeBackend` and `SmallModel` (backends/base.py) declare, checked by parsing the library with
`ast`. A new member a driver needs is declared (typed, documented) on the interface first, so that every backend,
built-in or plugin, is held to it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

LIBRARY = Path(__file__).resolve().parents[1] / "sgl_cli"
BASE = LIBRARY / "engine" / "backends" / "base.py"
ROLES = {"large": ("LargeBackend", "Model", "ModelFacts"), "small": ("SmallModel", "Model", "ModelFacts")}
# Who holds a model of the pair under that name: `engine.large`, `eng.small`, `self.engine.large`, and `self.large`
# inside the Engine itself (elsewhere `.large` is a preset's ModelSpec or a Work's answer).
HOLDERS = {"engine", "eng"}


def declared(role: str) -> set[str]:
    """Every name the role's classes (and their bases in base.py) define: methods, properties, attributes."""
    tree = ast.parse(BASE.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and node.name in ROLES[role]:
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    names |= {t.id for t in item.targets if isinstance(t, ast.Name)}
    return names


def _role_of(node: ast.AST, in_engine: bool, aliases: dict[str, str]) -> str | None:
    """The role whose model `node` denotes, or None."""
    if isinstance(node, ast.Name):
        return aliases.get(node.id)
    if isinstance(node, ast.Attribute) and node.attr in ROLES:
        holder = node.value
        if isinstance(holder, ast.Name) and (holder.id in HOLDERS or (holder.id == "self" and in_engine)):
            return node.attr
        if isinstance(holder, ast.Attribute) and holder.attr == "engine":
            return node.attr
    return None


def _annotated_role(annotation: ast.AST | None) -> str | None:
    text = ast.unparse(annotation) if annotation is not None else ""
    if "LargeBackend" in text:
        return "large"
    if "SmallModel" in text:
        return "small"
    return None


def reads(path: Path) -> list[tuple[int, str, str]]:
    """(line, role, member) of every attribute read of a model of the pair in the module at `path`."""
    tree = ast.parse(path.read_text())
    found: list[tuple[int, str, str]] = []

    def visit_function(fn, in_engine: bool) -> None:
        aliases: dict[str, str] = {}
        for arg in [*fn.args.args, *fn.args.kwonlyargs]:
            role = _annotated_role(arg.annotation)
            if role:
                aliases[arg.arg] = role
        nodes = list(ast.walk(fn))
        for node in nodes:  # names bound to a model: `m = self.large`, `small, large = eng.small, eng.large`
            if isinstance(node, ast.Assign):
                pairs = []
                for target in node.targets:
                    if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                        pairs += list(zip(target.elts, node.value.elts))
                    else:
                        pairs.append((target, node.value))
                for target, value in pairs:
                    role = _role_of(value, in_engine, {})
                    if role and isinstance(target, ast.Name):
                        aliases[target.id] = role
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                role = _annotated_role(node.annotation)
                if role:
                    aliases[node.target.id] = role
        for node in nodes:
            if isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load):
                role = _role_of(node.value, in_engine, aliases)
                if role:
                    found.append((node.lineno, role, node.attr))

    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    visit_function(item, node.name == "Engine")
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            visit_function(node, False)
    return found


def library_outside_backends() -> list[Path]:
    backends = LIBRARY / "engine" / "backends"
    return [p for p in sorted(LIBRARY.rglob("*.py")) if backends not in p.parents]


def test_the_library_reads_only_declared_members_of_both_models():
    members = {role: declared(role) for role in ROLES}
    wrong = [f"{path.relative_to(LIBRARY)}:{line}: the {role} model's `{attr}` is not declared by "
             f"{ROLES[role][0]}"
             for path in library_outside_backends() for line, role, attr in reads(path)
             if attr not in members[role]]
    assert not wrong, "\n".join(wrong)


def test_the_checker_finds_the_reads(tmp_path):
    """The parser sees reads through the engine, through a name bound to a model, and through an annotated
    parameter; an undeclared member is reported."""
    probe = tmp_path / "probe.py"
    probe.write_text(
        "class Engine:\n"
        "    def a(self):\n"
        "        m = self.large\n"
        "        return m.generate, self.small.reread, m.secret_engine\n"
        "def b(engine, x: 'LargeBackend'):\n"
        "    return engine.large.name, x.llm, engine.small.family\n")
    got = {(role, attr) for _, role, attr in reads(probe)}
    assert got == {("large", "generate"), ("small", "reread"), ("large", "secret_engine"), ("large", "name"),
                   ("large", "llm"), ("small", "family")}
    assert "secret_engine" not in declared("large") and "llm" not in declared("large")
    assert {"generate", "answer", "offers", "options", "spec", "eos_ids", "random_weights", "decode",
            "rank_in_prefill", "reduced", "generate_reduced", "check_prune_layer", "inputs"} <= declared("large")
    assert {"answer", "reread", "decode", "eos_ids", "spec"} <= declared("small")


@pytest.mark.parametrize("role", ROLES)
def test_every_declared_method_is_documented(role):
    """A declared method says what it returns and takes: a docstring on the interface."""
    tree = ast.parse(BASE.read_text())
    undocumented = [f"{cls.name}.{fn.name}" for cls in tree.body if isinstance(cls, ast.ClassDef)
                    and cls.name == ROLES[role][0] for fn in cls.body
                    if isinstance(fn, ast.FunctionDef) and not fn.name.startswith("_") and not ast.get_docstring(fn)]
    assert not undocumented, undocumented
