"""Quantized large model (bitsandbytes NF4 with bf16 compute, and LLM.int8) on the CPU, through the engine and
`sgl run`: pruning at retain 1.0 reproduces the quantized model's own unpruned `generate`, token for token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.errors import ModelLoadError, PresetError
from sgl_cli.engine.preset import ModelSpec, Settings, parse_preset
from tests.conftest import make_images, write_jsonl, write_preset

runner = CliRunner()
SUFFIX = "Answer with one word."


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def small(tiny_pair):
    from sgl_cli.engine.backends.transformers import load_model

    return load_model(ModelSpec(str(tiny_pair["small"]), dtype="float32"), "small")


@pytest.fixture(scope="module")
def large_nf4(tiny_pair):
    from sgl_cli.engine.backends.transformers import load_model

    return load_model(ModelSpec(str(tiny_pair["large"]), dtype="float32", quantize="4bit"), "large")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return make_images(tmp_path_factory.mktemp("qimg"))


def _items(images):
    from sgl_cli.engine.io.items import ImageRef, Item

    questions = ["What color is the square?", "How many circles are there?", "What shape is red?"]
    return [Item(line=i + 1, id=i, images=[ImageRef.path(p)], question=q)
            for i, (p, q) in enumerate(zip(images, questions))]


def _generate(m, item) -> list[int]:
    """The quantized model's own `generate` on the whole (unpruned) input."""
    from PIL import Image

    enc = m.family.encode(m.processor, Image.open(item.images[0].value).convert("RGB"), f"{item.question}\n{SUFFIX}")
    with torch.inference_mode():
        out = m.model.generate(**enc, max_new_tokens=5, do_sample=False, eos_token_id=sorted(m.eos_ids),
                               pad_token_id=m.pad_id)
    return out[0, enc["input_ids"].shape[1]:].tolist()


def _engine_answers(small, large, images, **settings):
    from sgl_cli.engine.pipeline.engine import Engine

    engine = Engine(Settings(threshold=None, max_new_tokens=5, prompt_suffix=SUFFIX, **settings), small, large)
    return list(engine.run(_items(images)))


def test_nf4_quantizes_the_language_model_only(large_nf4):
    kinds = {name: type(module).__name__ for name, module in large_nf4.model.named_modules()}
    lm = [n for n, k in kinds.items() if ".language_model.layers." in n and k.startswith("Linear")]
    assert lm and all(kinds[n] == "Linear4bit" for n in lm)
    assert not any(k == "Linear4bit" for n, k in kinds.items() if ".visual." in n or n == "lm_head")
    assert large_nf4.model.config.quantization_config.bnb_4bit_quant_type == "nf4"
    assert large_nf4.model.config.quantization_config.bnb_4bit_compute_dtype in ("bfloat16", torch.bfloat16)


@pytest.mark.parametrize("batch_size", [1, 2])
def test_nf4_pruned_at_retain_1_equals_unpruned_generate(small, large_nf4, images, batch_size):
    recs = _engine_answers(small, large_nf4, images, retain=1.0, batch_size=batch_size)
    for item, rec in zip(_items(images), recs):
        assert rec["error"] is None and rec["exit"] == "large"
        assert rec["retained_tokens"] == rec["visual_tokens"]
        assert rec["large_quantize"] == "nf4"
        want = large_nf4.processor.tokenizer.decode(_generate(large_nf4, item), skip_special_tokens=True).strip()
        assert rec["answer"] == want


def test_nf4_pruned_run_completes_below_retain_1(small, large_nf4, images, engine_factory):
    recs = _engine_answers(small, large_nf4, images, retain=0.25, prune_layer=1, batch_size=2)
    assert all(r["error"] is None and 0 < r["retained_tokens"] < r["visual_tokens"] for r in recs)
    # Same small model, so the same kept tokens as the float run; only the large model's weights differ.
    plain = list(engine_factory(retain=0.25, prune_layer=1, batch_size=2).run(_items(images)))
    assert [r["small_answer"] for r in recs] == [r["small_answer"] for r in plain]
    assert all(r["large_quantize"] is None for r in plain)


def test_8bit_pruned_at_retain_1_equals_unpruned_generate(tiny_pair, small, images):
    from sgl_cli.engine.backends.transformers import load_model

    large = load_model(ModelSpec(str(tiny_pair["large"]), dtype="float32", quantize="8bit"), "large")
    assert any(type(m).__name__ == "Linear8bitLt" for m in large.model.modules())
    recs = _engine_answers(small, large, images[:2], retain=1.0)
    for item, rec in zip(_items(images), recs):
        assert rec["large_quantize"] == "8bit"
        assert rec["answer"] == large.processor.tokenizer.decode(_generate(large, item),
                                                                 skip_special_tokens=True).strip()


def test_default_size_pair_runs_4bit(tmp_path):
    """The built-in pair at the shipped default's size (random weights) quantizes and answers on the CPU."""
    from sgl_cli.engine.builtin.pair import ensure_pair

    pair = ensure_pair("random", tmp_path / "cache")  # the random pair at the default's size
    preset = write_preset(tmp_path, pair, max_new_tokens=3)
    src = write_jsonl(tmp_path / "in.jsonl", [{"image": p.name, "question": "What shape?"}
                                              for p in make_images(tmp_path, sizes=((224, 224), (280, 168)))])
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "--quantize", "4bit", "--batch-size", "2", "-q"])
    assert res.exit_code == 0, res.output
    recs = records(tmp_path / "in.sgl.jsonl")
    assert len(recs) == 2 and all(r["error"] is None and r["large_quantize"] == "nf4" for r in recs)


def test_cli_records_and_saved_preset_say_quantized_and_resume_checks_it(tmp_path, tiny_pair):
    src = write_jsonl(tmp_path / "in.jsonl", [{"image": p.name, "question": "What color?"}
                                              for p in make_images(tmp_path, sizes=((224, 224),))])
    preset = write_preset(tmp_path, tiny_pair)
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "--quantize", "4bit", "-q"])
    assert res.exit_code == 0, res.output
    (rec,) = records(tmp_path / "in.sgl.jsonl")
    assert rec["large_quantize"] == "nf4" and rec["error"] is None
    saved = yaml.safe_load((tmp_path / "in.sgl.preset.yaml").read_text())
    assert saved["large"]["quantize"] == "nf4" and saved["small"]["quantize"] is None
    assert parse_preset(saved, "saved").large.quantize == "nf4"  # the saved preset reads back
    # Resuming without --quantize would mix unquantized answers into a quantized run: refused.
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "--resume", "-q"])
    assert res.exit_code == 2 and "cannot resume" in res.output and "large" in res.output
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "--resume", "--quantize", "nf4", "-q"])
    assert res.exit_code == 0, res.output


def test_bad_quantize_is_one_line(tmp_path, tiny_pair):
    src = write_jsonl(tmp_path / "in.jsonl", [{"image": "x.png", "question": "q"}])
    res = runner.invoke(app, ["run", str(src), "-p", str(write_preset(tmp_path, tiny_pair)), "--quantize", "3bit"])
    assert res.exit_code == 2
    assert res.output.strip() == "sgl: error: --quantize: '3bit' is not one of none, nf4, 4bit, 8bit"


@pytest.mark.parametrize("value, expected", [("4bit", "nf4"), ("nf4", "nf4"), ("8bit", "8bit"), ("none", None),
                                             (None, None)])
def test_preset_quantize_values(value, expected):
    data = {"name": "p", "small": {"model": "a"}, "large": {"model": "b", "quantize": value}}
    assert parse_preset(data, "p.yaml").large.quantize == expected


def test_preset_quantize_errors_name_key_and_file():
    data = {"name": "p", "small": {"model": "a"}, "large": {"model": "b", "quantize": "fp8"}}
    with pytest.raises(PresetError, match=r"p\.yaml: large\.quantize: 'fp8' is not one of none, nf4, 4bit, 8bit"):
        parse_preset(data, "p.yaml")
    data["large"]["quantize"] = 4
    with pytest.raises(PresetError, match=r"p\.yaml: large\.quantize must be str \| None, got 4"):
        parse_preset(data, "p.yaml")


def test_4bit_on_cpu_needs_widths_in_blocks_of_64():
    import bitsandbytes as bnb

    from sgl_cli.engine.backends.transformers import _check_quantized_on_cpu

    model = torch.nn.Sequential(bnb.nn.Linear4bit(128, 64), bnb.nn.Linear4bit(96, 64))
    for layer in model:
        layer.support_avx512bf16_for_cpu = True  # the packed CPU kernels (this machine's; set for any machine)
    with pytest.raises(ModelLoadError, match=r"layer 1 has input width 96, not a multiple of 64"):
        _check_quantized_on_cpu(model, ModelSpec("m", quantize="nf4"), "large")
    _check_quantized_on_cpu(model[:1], ModelSpec("m", quantize="nf4"), "large")


def test_resume_of_a_run_saved_before_quantize_existed(tmp_path, tiny_pair):
    """A saved preset without the model keys added later (quantize, device_map) resumes as their defaults."""
    src = write_jsonl(tmp_path / "in.jsonl", [{"image": p.name, "question": "What color?"}
                                              for p in make_images(tmp_path, sizes=((224, 224), (168, 280)))])
    preset = write_preset(tmp_path, tiny_pair)
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-q"])
    assert res.exit_code == 0, res.output
    out, saved = tmp_path / "in.sgl.jsonl", tmp_path / "in.sgl.preset.yaml"
    old = yaml.safe_load(saved.read_text())
    for role in ("small", "large"):
        del old[role]["quantize"], old[role]["device_map"]
    saved.write_text(yaml.safe_dump(old))
    out.write_text(out.read_text().splitlines(keepends=True)[0])  # the second record is still to come
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "--resume"])
    assert res.exit_code == 0, res.output
    assert "+1 already done" in res.output and [r["line"] for r in records(out)] == [1, 2]
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "--resume", "--quantize", "8bit", "-q"])
    assert res.exit_code == 2 and "cannot resume" in res.output
