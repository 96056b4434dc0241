"""The seam to vLLM's internals (backends/vllm/compat.py) on the real vLLM: every name it probes exists here and
takes what sgl passes, the probes pass on this (tested) release, a moved internal is named, and a forced release
outside the tested range is refused in one line before vLLM starts or any item runs."""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.backends.vllm import compat

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


@pytest.fixture
def fresh_probe():
    compat.check_vllm.cache_clear()
    yield
    compat.check_vllm.cache_clear()


def _get(module: str, path: str):
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def test_every_probed_name_exists_in_this_vllm():
    """Resolved here without compat's own helpers: each name, each method with the parameters the plugin's
    overrides and calls rely on, each record field."""
    for module, name in compat.NAMES:
        assert _get(module, name) is not None, (module, name)
    for module, path, expected in compat.SIGNATURES:
        params = [p for p in inspect.signature(_get(module, path)).parameters.values() if p.name != "self"]
        names = [p.name for p in params]
        lead = list(expected[:expected.index("*")]) if "*" in expected else [n for n in expected if n != "**"]
        assert names[:len(lead)] == lead, (module, path, names)
        after = expected[expected.index("*") + 1:] if "*" in expected else ()
        assert all(k in names for k in after if k != "**"), (module, path, names)
        if "**" in expected:
            assert any(p.kind is p.VAR_KEYWORD for p in params), (module, path)
    for module, name, fields in compat.FIELDS:
        cls = _get(module, name)
        have = {f.name for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else \
            set(getattr(cls, "__struct_fields__", ())) | set(getattr(cls, "__annotations__", {}))  # msgspec, TypedDict
        assert set(fields) <= have, (module, name, set(fields) - have)


def test_the_probes_pass_on_this_vllm(fresh_probe):
    import vllm

    assert compat.in_range(vllm.__version__), vllm.__version__
    assert compat.problems() == []
    assert compat.check_vllm() is None


def test_a_moved_internal_is_named(fresh_probe, monkeypatch):
    from vllm.model_executor.models.qwen2_vl import Qwen2VLMultiModalProcessor
    from vllm.multimodal.inputs import MultiModalFieldConfig

    def renamed(self, mm_items, processor_kwargs, out_mm_kwargs):
        raise AssertionError("not called")

    monkeypatch.setattr(Qwen2VLMultiModalProcessor, "_get_prompt_updates", renamed)
    monkeypatch.delattr(MultiModalFieldConfig, "batched")
    found = compat.problems()
    assert "vllm.multimodal.inputs.MultiModalFieldConfig.batched is gone" in found
    assert ("vllm.model_executor.models.qwen2_vl.Qwen2VLMultiModalProcessor._get_prompt_updates takes (mm_items, "
            "processor_kwargs, out_mm_kwargs), not (mm_items, hf_processor_mm_kwargs, out_mm_kwargs)") in found
    with pytest.raises(compat.IncompatibleVllm) as err:
        compat.check_vllm()
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"vLLM {compat.TESTED[0]}: {found[0]} (and ")
    assert message.endswith("supports vLLM 0.32 (pip install 'vllm>=0.32,<0.33', or scripts/vllm_env.sh DIR on a CPU)")


def test_a_forced_newer_vllm_is_refused_before_vllm_starts(tmp_path, vllm_preset, fresh_probe, monkeypatch):
    """The real vLLM under a newer release number: `sgl run --large-backend vllm` exits 2 with one line naming the
    release and the tested range; vLLM's engine is never made and no record is written."""
    import vllm

    monkeypatch.setattr(vllm, "__version__", "0.34.0")
    monkeypatch.setattr(vllm.LLM, "__init__", lambda *a, **k: pytest.fail("vLLM started"))
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["run", str(EXAMPLES / "batch.jsonl"), "-p", str(vllm_preset), "-o", str(out),
                                   "-q"])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == ("sgl: error: vLLM 0.34.0: not a release sgl's vLLM plugin was tested on; sgl's vLLM "
                                  "backend supports vLLM 0.32 (pip install 'vllm>=0.32,<0.33', or scripts/vllm_env.sh "
                                  "DIR on a CPU)")
    assert not out.exists() or not out.read_text().strip()
