"""The layers of sgl_cli/engine hold: every module's imports (top-level and inside functions, parsed with `ast`)
reach only its own layer or lower ones, so no two folders import each other. docs/design.md explains the order."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[1] / "sgl_cli" / "engine"

# Lowest first. A folder is named by itself; the modules at the top of sgl_cli/engine by their stem. The package's
# own __init__.py (the public API, lazy) may import anything.
LAYERS = [
    ("base", {"errors", "safe_yaml", "plugins"}),  # domain errors, YAML, the plugin registries
    ("io", {"io"}),  # what the engine reads and writes: items, formats, images, URL fetching, records, scores
    ("core", {"core"}),  # the transformers seam, processors, generation, importance capture, pruning
    ("families", {"families"}),
    ("guides", {"guides"}),
    ("builtin", {"builtin"}),  # the shipped pair and the shapes task
    ("settings", {"preset", "metrics", "calibration"}),  # presets, answer metrics, calibration files
    ("backends", {"backends"}),  # the two models' interfaces and their backends (transformers, vLLM, the registry)
    ("pipeline", {"pipeline"}),  # the staged Engine, its typed results, its records
    ("evaluation", {"evaluation"}),  # eval, calibrate, the comparison of guides, bench
    ("runs", {"runs"}),  # Run (sgl run) and the Ray backend
    ("views", {"views"}),  # inspect, report, tables
]
RANK = {name: i for i, (_, names) in enumerate(LAYERS) for name in names}


def unit(parts: tuple[str, ...]) -> str:
    """The folder (or top-level module) a module path under sgl_cli/engine belongs to."""
    return parts[0] if len(parts) > 1 or (ENGINE / parts[0]).is_dir() else parts[0].removesuffix(".py")


def imports(path: Path) -> list[tuple[int, tuple[str, ...]]]:
    """(line, module path under sgl_cli/engine) of every import of an engine module in `path`."""
    rel = path.relative_to(ENGINE).with_suffix("").parts
    package = rel[:-1] if rel[-1] != "__init__" else rel[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level - 1 > len(package):
                continue  # above sgl_cli/engine (sgl_cli's own version)
            base = package[: len(package) - (node.level - 1)]
            target = base + tuple(node.module.split(".") if node.module else ())
            if target:
                found.append((node.lineno, target))
            else:  # from . import x (at the top): x is the unit
                found += [(node.lineno, (a.name,)) for a in node.names]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.startswith("sgl_cli.engine."):
                    found.append((node.lineno, tuple(name.split(".")[2:])))
    return found


def test_every_unit_has_a_layer():
    units = {unit(p.relative_to(ENGINE).parts) for p in ENGINE.rglob("*.py")} - {"__init__"}
    assert units <= set(RANK), sorted(units - set(RANK))


def test_a_lower_layer_never_imports_a_higher_one():
    wrong = []
    for path in sorted(ENGINE.rglob("*.py")):
        rel = path.relative_to(ENGINE)
        here = unit(rel.parts)
        if here == "__init__":
            continue
        for line, target in imports(path):
            there = unit(target)
            if there in RANK and RANK[there] > RANK[here]:
                wrong.append(f"{rel}:{line} ({here}) imports {'.'.join(target)} ({there})")
    assert not wrong, "\n".join(wrong)


def test_the_checker_sees_imports_inside_functions(tmp_path):
    """The parser finds a function-level relative import (what most of the cycles it removed were)."""
    probe = ENGINE / "io" / "formats" / "__init__.py"
    assert ((probe.read_text().count("from ..items import Item")) == 1
            and (("io", "items") in [t for _, t in imports(probe)]))
    found = [t for _, t in imports(ENGINE / "pipeline" / "engine.py")]
    assert ("calibration",) in found  # from ..calibration import resolve_calibration, inside from_preset
