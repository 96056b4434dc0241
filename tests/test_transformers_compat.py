"""The seam to transformers' internals (`engine/hf.py`): probes, the cache keyword, the admitted range, no
deprecation warnings from sgl's own calls, and the processor fallback by model_type."""

from __future__ import annotations

import functools
import json
import re
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.core import hf
from tests.conftest import make_images, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def test_probes_pass_on_the_installed_transformers(engine_factory):
    hf.check_transformers()
    eng = engine_factory()
    for m in (eng.small, eng.large):
        hf.check_model(m.model)
        m.family.check(m.model)


def test_admitted_range_is_the_tested_one():
    """pyproject.toml admits exactly the releases between the oldest and the newest the suite passed on."""
    text = (ROOT / "pyproject.toml").read_text()
    (spec,) = re.findall(r'"transformers(>=[^"]+)"', text)
    assert spec == hf.admitted()
    import transformers
    from packaging.specifiers import SpecifierSet

    assert transformers.__version__ in SpecifierSet(spec)


def test_ci_tests_the_oldest_admitted_releases():
    """.ci/oldest.txt pins exactly the lower bounds pyproject.toml admits (transformers, accelerate, bitsandbytes)."""
    text = (ROOT / "pyproject.toml").read_text()
    pins = dict(line.strip().split("==") for line in (ROOT / ".ci" / "oldest.txt").read_text().splitlines()
                if "==" in line and not line.lstrip().startswith("#"))
    assert set(pins) == {"transformers", "accelerate", "bitsandbytes"}
    for name, version in pins.items():
        (spec,) = re.findall(rf'"{name}(>=[^"]+)"', text)
        assert spec.startswith(f">={version},<"), (name, spec, version)
    assert pins["transformers"] == hf.TESTED[0]


def test_a_missing_internal_is_one_line_naming_it_and_the_range(monkeypatch):
    hf.check_transformers.cache_clear()
    monkeypatch.setattr(hf, "_STATIC", hf._STATIC + (("transformers.masking_utils", "sdpa_mask_v99"),))
    with pytest.raises(hf.IncompatibleTransformers) as exc:
        hf.check_transformers()
    hf.check_transformers.cache_clear()
    message = str(exc.value)
    assert "\n" not in message
    assert "transformers.masking_utils.sdpa_mask_v99 is gone" in message
    assert f"sgl supports transformers {hf.tested_range()}" in message


@pytest.mark.parametrize("release, admitted", [("5.18.0", True), ("5.25.0", True), ("5.25.3", True),
                                               ("5.25.0.dev0", True), ("5.21.1+local", True), ("5.17.9", False),
                                               ("5.26.0", False), ("5.26.0.dev0", False), ("6.0.0", False),
                                               ("nightly", False)])
def test_the_admitted_releases(release, admitted):
    assert hf.in_range(release) is admitted


@pytest.fixture
def fresh_probe():
    """check_transformers probes again in this test (it is cached per process), and again after it."""
    hf.check_transformers.cache_clear()
    yield
    hf.check_transformers.cache_clear()


@pytest.mark.parametrize("release", ["5.26.0", "5.17.0", "6.0.0.dev0"])
def test_an_untested_transformers_is_refused_in_one_line_before_any_item_runs(shapes_batch, preset_file, release,
                                                                             fresh_probe, monkeypatch):
    """A forced release outside the tested range, whose internals sgl finds all in place, is still refused: before
    any weights load, one line naming the release and the tested range, no record written."""
    import transformers

    monkeypatch.setattr(transformers, "__version__", release)
    monkeypatch.setattr(transformers.AutoModelForImageTextToText, "from_pretrained",
                        lambda *a, **k: pytest.fail("weights loaded"))
    out = shapes_batch.with_suffix(".out.jsonl")
    res = CliRunner().invoke(app, ["run", str(shapes_batch), "--preset", str(preset_file), "-q", "--out", str(out)])
    assert res.exit_code == 2, res.output
    assert res.output.strip() == (f"sgl: error: transformers {release}: not a release sgl was tested on; sgl supports "
                                  "transformers 5.18-5.25 (pip install 'transformers>=5.18.0,<5.26')")
    assert not out.exists() or not out.read_text().strip()


def test_a_decoder_layer_without_a_cache_keyword_is_refused_at_load(engine_factory, monkeypatch):
    model = engine_factory().large.model
    layer_cls = type(hf.decoder_layers(model)[0])

    def forward(self, hidden_states, attention_mask=None, position_embeddings=None, kv_store=None):
        raise AssertionError("not called")

    monkeypatch.setattr(layer_cls, "forward", forward)
    with pytest.raises(hf.IncompatibleTransformers, match="take neither `cache` nor `past_key_values`"):
        hf.check_model(model)


def test_hook_reads_the_cache_under_either_name():
    cache = object()
    assert hf.layer_cache({"cache": cache}) is cache
    assert hf.layer_cache({"past_key_values": cache}) is cache
    assert hf.layer_cache({}) is None


def test_model_calls_pass_the_keyword_the_model_takes(engine_factory, monkeypatch):
    """The forward call names the cache as this transformers' forward does (no deprecated alias)."""
    import transformers
    from packaging.version import Version

    model = engine_factory().small.model
    seen = {}
    real = type(model).forward

    @functools.wraps(real)
    def spy(self, *args, **kwargs):
        seen.update({k: v for k, v in kwargs.items() if k in ("cache", "past_key_values")})
        return real(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", spy)
    hf.forward_cache_name.cache_clear()
    ids = torch.tensor([[1, 2, 3]])
    try:
        with torch.inference_mode():
            _, cache = hf.forward(model, None, input_ids=ids, use_cache=True)
    finally:
        hf.forward_cache_name.cache_clear()
    expected = hf.cache_keyword(real)
    assert list(seen) == [expected]
    assert expected == ("cache" if Version(transformers.__version__) >= Version("5.24") else "past_key_values")
    assert cache is not None and cache.get_seq_length() == 3


@pytest.fixture
def shapes_batch(tmp_path):
    imgs = make_images(tmp_path)
    return write_jsonl(tmp_path / "b.jsonl", [{"image": p.name, "question": "What shape is red?"} for p in imgs])


@pytest.mark.parametrize("args", [["--prune-layer", "1"], ["--guide", "fastv"], ["--guide", "cls"]])
def test_no_upstream_warning_reaches_the_terminal(shapes_batch, preset_file, args, capfd):
    """sgl's own calls use the names the running transformers expects: neither a Python warning nor transformers'
    logger says anything on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = CliRunner().invoke(app, ["run", str(shapes_batch), "--preset", str(preset_file), "-q", "--overwrite",
                                       "--out", str(shapes_batch.with_suffix(".out.jsonl")), *args])
    assert res.exit_code == 0, res.output
    records = [json.loads(x) for x in shapes_batch.with_suffix(".out.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(r["error"] is None for r in records)
    ours = [w for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))
            and "transformers" in str(w.filename)]
    assert not ours, [str(w.message) for w in ours]
    captured = capfd.readouterr()
    assert "deprecated" not in res.stderr + captured.err, res.stderr + captured.err


def test_inspect_prints_no_upstream_warning(tmp_path, preset_file):
    (img,) = make_images(tmp_path, sizes=((224, 224),))
    res = CliRunner().invoke(app, ["inspect", str(img), "--question", "What is red?", "--preset", str(preset_file),
                                   "--guide", "all"])
    assert res.exit_code == 0, res.output
    assert "Warning" not in res.stderr and "deprecated" not in res.stderr, res.stderr


def test_processor_without_processor_class_loads_by_model_type(tiny_pair, tmp_path):
    """A checkpoint whose configs name no processor_class loads through the class its model_type maps to, without
    torchvision (the image-only variant), and encodes exactly as the original."""
    import shutil

    from PIL import Image

    from sgl_cli.engine.core.processors import load_processor

    folder = tmp_path / "no-class"
    shutil.copytree(tiny_pair["small"], folder)
    stripped = []
    for name in ("processor_config.json", "preprocessor_config.json", "tokenizer_config.json"):
        f = folder / name
        if f.exists():
            data = json.loads(f.read_text())
            if data.pop("processor_class", None) is not None:
                stripped.append(name)
            f.write_text(json.dumps(data))
    assert stripped, "the fixture names a processor_class somewhere"
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2_vl"
    proc = load_processor(folder)
    original = load_processor(tiny_pair["small"])
    assert type(proc).__name__ == "Qwen2VLProcessor"
    assert isinstance(proc, hf.processor_mixin())
    image = Image.new("RGB", (112, 84), (200, 30, 30))
    a = proc(text=["<|vision_start|><|image_pad|><|vision_end|>what?"], images=[image], return_tensors="pt")
    b = original(text=["<|vision_start|><|image_pad|><|vision_end|>what?"], images=[image], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["pixel_values"], b["pixel_values"])
