"""The seam to vLLM's internals (backends/vllm/compat.py), without vLLM (tests_vllm/test_compat.py probes the real
one): the admitted range agrees with pyproject.toml, every vLLM name the plugin imports and every method it
overrides is probed, an untested or changed vLLM is refused in one line before any model loads or item runs, and
the plugin registers nothing on an untested release."""

from __future__ import annotations

import ast
import re
import sys
import types
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.backends.vllm import IncompatibleVllm, compat, plugin
from sgl_cli.engine.errors import SglError
from tests.conftest import make_images, write_jsonl

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = ROOT / "sgl_cli" / "engine" / "backends" / "vllm"
TAIL = "; sgl's vLLM backend supports vLLM 0.32 (pip install 'vllm>=0.32,<0.33', or scripts/vllm_env.sh DIR on a CPU)"


@pytest.fixture
def fake_vllm(monkeypatch):
    """A `vllm` module of a given release and nothing else (none of the internals the plugin uses), probed afresh."""
    def install(version: str, **attrs) -> types.ModuleType:
        module = types.ModuleType("vllm")
        module.__version__ = version
        for name, value in attrs.items():
            setattr(module, name, value)
        monkeypatch.setitem(sys.modules, "vllm", module)
        return module

    compat.check_vllm.cache_clear()
    yield install
    compat.check_vllm.cache_clear()


def test_the_vllm_extra_is_the_tested_range():
    (spec,) = re.findall(r'"vllm(>=[^"]+)"', (ROOT / "pyproject.toml").read_text())
    assert spec == compat.admitted() == ">=0.32,<0.33"
    assert compat.tested_range() == "0.32"


@pytest.mark.parametrize("release, admitted", [("0.32.0", True), ("0.32.0+cpu", True), ("0.32.1.dev12+g0abc", True),
                                               ("0.31.2", False), ("0.33.0", False), ("0.34.0", False),
                                               ("0.33.0.dev3", False), ("unknown", False)])
def test_the_admitted_releases(release, admitted):
    assert compat.in_range(release) is admitted


def _vllm_uses(tree: ast.AST) -> set[tuple[str, str]]:
    """(module, name) of every vLLM name a module imports, and (module, "Name.attr") of every attribute it reads
    off one (`vllm.X` too, where `vllm` is the module import_vllm returns)."""
    bound: dict[str, tuple[str, str | None]] = {"vllm": ("vllm", None)}
    uses = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "vllm":
            for alias in node.names:
                bound[alias.asname or alias.name] = (node.module, alias.name)
                uses.add((node.module, alias.name))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            module, name = bound[node.value.id]
            if not node.attr.startswith("__"):
                uses.add((module, node.attr) if name is None else (module, f"{name}.{node.attr}"))
    return uses


def _overrides(tree: ast.AST) -> set[tuple[str, str]]:
    """(module, "VllmBase.method") for every method an sgl class in models.py defines over a vLLM base (its own or
    its sgl mixins'), but sgl's own `_sgl*` helpers."""
    imported = {a.asname or a.name: node.module for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("vllm") for a in node.names}
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}

    def methods(cls: ast.ClassDef) -> set[str]:
        own = {f.name for f in cls.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_sgl")}
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id in classes:
                own |= methods(classes[base.id])
        return own

    found = set()
    for cls in classes.values():
        for base in cls.bases:
            if isinstance(base, ast.Name) and base.id in imported:
                found |= {(imported[base.id], f"{base.id}.{m}") for m in methods(cls)}
    return found


def test_every_vllm_internal_the_plugin_uses_is_probed():
    """What plugin.py, models.py, large.py and backend.py import from vLLM (or read off it) is in NAMES or
    SIGNATURES, and each method models.py overrides is in SIGNATURES: a new use without a probe fails here."""
    names = set(compat.NAMES)
    signatures = {(module, path) for module, path, _ in compat.SIGNATURES}
    uses = set()
    for name in ("plugin.py", "models.py", "large.py", "backend.py"):
        uses |= _vllm_uses(ast.parse((PLUGIN / name).read_text()))
    assert uses, "the plugin uses vLLM"
    assert sorted(uses - names - signatures) == []
    overrides = _overrides(ast.parse((PLUGIN / "models.py").read_text()))
    assert ("vllm.model_executor.models.qwen3_vl", "Qwen3VLMultiModalProcessor._get_prompt_updates") in overrides
    assert sorted(overrides - signatures) == []


def test_the_signature_notation():
    def override(self, mm_items, hf_kwargs): ...
    def keywords(modality, size_per_item, dim=0, *, keep_on_cpu=False): ...
    def anything(self, **kwargs): ...

    assert compat._signature_problem(override, ("mm_items", "hf_kwargs")) is None
    assert compat._signature_problem(override, ("mm_items", "hf_processor_mm_kwargs")) == \
        "takes (mm_items, hf_kwargs), not (mm_items, hf_processor_mm_kwargs)"
    assert compat._signature_problem(keywords, ("modality", "size_per_item", "*", "keep_on_cpu")) is None
    assert compat._signature_problem(keywords, ("modality", "*", "pin_memory")) == "takes no `pin_memory`"
    assert compat._signature_problem(anything, ("**",)) is None
    assert compat._signature_problem(override, ("**",)) == "takes no **kwargs"


def test_a_vllm_without_the_plugins_internals_is_one_line_naming_the_first(fake_vllm):
    fake_vllm("0.32.0")
    with pytest.raises(IncompatibleVllm) as err:
        compat.check_vllm()
    assert isinstance(err.value, SglError)
    message = str(err.value)
    more = len(compat.problems()) - 1
    assert more > 10  # every name and module after vllm.LLM is missing too
    assert message == f"vLLM 0.32.0: vllm.LLM is gone (and {more} more){TAIL}"


def test_an_untested_release_with_every_internal_is_refused(fake_vllm, monkeypatch):
    monkeypatch.setattr(compat, "problems", lambda: [])  # internals aside: the release alone
    fake_vllm("0.33.0")
    with pytest.raises(IncompatibleVllm) as err:
        compat.check_vllm()
    assert str(err.value) == f"vLLM 0.33.0: not a release sgl's vLLM plugin was tested on{TAIL}"
    compat.check_vllm.cache_clear()
    fake_vllm("0.32.0+cpu")
    assert compat.check_vllm() is None


@pytest.fixture
def items(tmp_path):
    imgs = make_images(tmp_path)
    return write_jsonl(tmp_path / "batch.jsonl", [{"image": p.name, "question": "What shape?"} for p in imgs])


@pytest.mark.parametrize("release", ["0.34.0", "0.31.0"])
def test_an_untested_vllm_is_refused_in_one_line_before_any_model_loads(items, preset_file, fake_vllm, monkeypatch,
                                                                       release):
    """`sgl run --large-backend vllm` with a vLLM outside the tested range: exit 2, one line naming what moved and
    the range, no model loaded, no record written."""
    from sgl_cli.engine.backends import transformers as hf_backend

    fake_vllm(release, LLM=lambda **k: pytest.fail("vLLM started"))
    monkeypatch.setattr(hf_backend, "load_model", lambda *a, **k: pytest.fail("a model loaded"))
    out = items.with_suffix(".out.jsonl")
    res = CliRunner().invoke(app, ["run", str(items), "-p", str(preset_file), "--large-backend", "vllm", "-q",
                                   "-o", str(out)])
    assert res.exit_code == 2, res.output
    line = res.output.strip()
    assert "\n" not in line
    assert re.fullmatch(rf"sgl: error: vLLM {re.escape(release)}: vllm\.SamplingParams is gone \(and \d+ more\)"
                        + re.escape(TAIL), line), line
    assert not out.exists() or not out.read_text().strip()


class _Registry:
    def __init__(self):
        self.registered = []

    def get_supported_archs(self):
        return {"Qwen2VLForConditionalGeneration"}

    def register_model(self, arch, cls):
        self.registered.append((arch, cls))


@pytest.mark.parametrize("release, registers", [("0.32.0", True), ("0.34.0", False)])
def test_the_plugin_registers_only_on_a_tested_release(fake_vllm, release, registers):
    """vLLM calls the plugin in every process it starts, sgl's or not: on an untested release it registers
    nothing, rather than break vLLM's own runs on a moved internal."""
    registry = _Registry()
    fake_vllm(release, ModelRegistry=registry)
    plugin.register()
    expected = [(arch, f"{plugin.MODULE}:{arch}") for arch in plugin.ARCHITECTURES]
    assert registry.registered == (expected if registers else [])
