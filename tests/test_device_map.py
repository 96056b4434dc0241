"""Device placement: `device_map` in presets (validated), role-aware defaults for several GPUs, and, on the CPU,
multi-part device maps (also with accelerate's per-module hooks forced on) giving the single-device records."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.errors import PresetError
from sgl_cli.engine.preset import ModelSpec, Settings, parse_preset
from tests.conftest import write_preset

runner = CliRunner()

# The tiny Qwen2-VL pair, split module by module (every part on the CPU: the only device here).
LARGE_MAP = {
    "model.visual": "cpu",
    "model.language_model.embed_tokens": "cpu",
    "model.language_model.layers.0": "cpu",
    "model.language_model.layers.1": "cpu",
    "model.language_model.norm": "cpu",
    "model.language_model.rotary_emb": "cpu",
    "lm_head": "cpu",
}
SMALL_MAP = {"model.visual": "cpu", "model.language_model": "cpu", "lm_head": "cpu"}


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_ms(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "ms"} for r in recs]


# -- where models go ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gpus, small, large", [
    (0, {"": "cpu"}, {"": "cpu"}),
    (1, {"": "cuda:0"}, {"": "cuda:0"}),
    (4, {"": "cuda:0"}, "auto"),  # several GPUs: the large model spread over all, the small one on the first
])
def test_default_placement(gpus, small, large):
    from sgl_cli.engine.backends.transformers import device_map_for

    assert device_map_for(ModelSpec("s"), "small", gpus=gpus) == small
    assert device_map_for(ModelSpec("l"), "large", gpus=gpus) == large


def test_explicit_placement_wins():
    from sgl_cli.engine.backends.transformers import device_map_for

    assert device_map_for(ModelSpec("m", device="cuda:1"), "large", gpus=4) == {"": "cuda:1"}
    assert device_map_for(ModelSpec("m", device_map="sequential"), "small", gpus=4) == "sequential"
    assert device_map_for(ModelSpec("m", device_map="auto"), "large", gpus=0) == {"": "cpu"}  # no GPU: the CPU
    assert device_map_for(ModelSpec("m", device_map={"": 1}), "large", gpus=2) == {"": 1}


def test_preset_device_map_reads_and_round_trips():
    data = {"name": "p", "small": {"model": "a", "device": "cuda:0"},
            "large": {"model": "b", "device_map": {"model.visual": 0, "model.language_model": "cuda:1", "lm_head": 1}}}
    preset = parse_preset(data, "p.yaml")
    assert preset.small.device == "cuda:0" and preset.small.device_map is None
    assert preset.large.device_map == {"model.visual": 0, "model.language_model": "cuda:1", "lm_head": 1}
    assert parse_preset(preset.to_dict(), "p.yaml") == preset
    assert parse_preset({**data, "large": {"model": "b", "device_map": "auto"}}, "p.yaml").large.device_map == "auto"


@pytest.mark.parametrize("large, message", [
    ({"device_map": "everywhere"}, r"p\.yaml: large\.device_map: 'everywhere' is not one of auto, balanced, "
                                   r"balanced_low_0, sequential"),
    ({"device_map": {"lm_head": "disk"}}, r"p\.yaml: large\.device_map\['lm_head'\]: 'disk' is not a device"),
    ({"device_map": {"lm_head": -1}}, r"large\.device_map\['lm_head'\]: -1 is not a device"),
    ({"device_map": {}}, r"large\.device_map: an empty mapping places nothing"),
    ({"device_map": ["cpu"]}, r"p\.yaml: large\.device_map must be str \| dict \| None, got \['cpu'\]"),
    ({"device": "cuda:0", "device_map": "auto"}, r"p\.yaml: large: give device \('cuda:0'\) or device_map, not both"),
])
def test_preset_device_map_errors(large, message):
    with pytest.raises(PresetError, match=message):
        parse_preset({"name": "p", "small": {"model": "a"}, "large": {"model": "b", **large}}, "p.yaml")


# -- results do not depend on placement --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def split_pair(tiny_pair):
    from sgl_cli.engine.backends.transformers import load_model

    small = load_model(ModelSpec(str(tiny_pair["small"]), dtype="float32", device_map=SMALL_MAP), "small")
    large = load_model(ModelSpec(str(tiny_pair["large"]), dtype="float32", device_map=LARGE_MAP), "large")
    return small, large


def _items(folder: Path):
    from sgl_cli.engine.io.formats import read_items

    return list(read_items(folder / "batch.jsonl"))


@pytest.mark.parametrize("settings", [dict(retain=0.3, batch_size=2), dict(retain=0.3, prune_layer=1, batch_size=2),
                                      dict(retain=1.0, batch_size=1)])
def test_multi_part_device_map_equals_single_device(batch, engine_factory, split_pair, settings):
    from sgl_cli.engine.pipeline.engine import Engine

    items = _items(batch.parent)
    want = without_ms(list(engine_factory(**settings).run(items)))
    small, large = split_pair
    base = dict(threshold=None, max_new_tokens=5, prompt_suffix="Answer with one word.")
    got = without_ms(list(Engine(Settings(**base, **settings), small, large).run(items)))
    assert all(r["error"] is None for r in got)
    assert got == want


def test_accelerate_hooks_on_every_part_give_the_same_records(batch, engine_factory, tiny_pair):
    """accelerate's dispatch (what several GPUs use: a hook per part moving its inputs to the part's device and
    the outputs back), forced on for a CPU-only split: the engine's tensors go through those hooks unchanged."""
    from accelerate import dispatch_model

    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.backends.transformers import load_model

    small = load_model(ModelSpec(str(tiny_pair["small"]), dtype="float32"), "small")
    large = load_model(ModelSpec(str(tiny_pair["large"]), dtype="float32"), "large")
    dispatch_model(small.model, device_map=SMALL_MAP, main_device="cpu", force_hooks=True)
    dispatch_model(large.model, device_map=LARGE_MAP, main_device="cpu", force_hooks=True)
    assert hasattr(large.model, "_hf_hook") and hasattr(large.model.model.language_model.layers[1], "_hf_hook")
    items = _items(batch.parent)
    for settings in (dict(retain=0.3, batch_size=2), dict(retain=0.3, prune_layer=1, batch_size=2)):
        want = without_ms(list(engine_factory(**settings).run(items)))
        base = dict(threshold=None, max_new_tokens=5, prompt_suffix="Answer with one word.")
        got = without_ms(list(Engine(Settings(**base, **settings), small, large).run(items)))
        assert got == want


def test_cli_with_device_maps_in_the_preset_equals_plain(batch, tmp_path, tiny_pair):
    import yaml

    plain = write_preset(tmp_path, tiny_pair)
    res = runner.invoke(app, ["run", str(batch), "-p", str(plain), "-o", str(tmp_path / "plain.jsonl"), "-q"])
    assert res.exit_code == 0, res.output
    data = yaml.safe_load(plain.read_text())
    data["small"]["device_map"], data["large"]["device_map"] = SMALL_MAP, LARGE_MAP
    split = tmp_path / "split.yaml"
    split.write_text(yaml.safe_dump(data))
    res = runner.invoke(app, ["run", str(batch), "-p", str(split), "-o", str(tmp_path / "split.jsonl"), "-q"])
    assert res.exit_code == 0, res.output
    assert without_ms(records(tmp_path / "split.jsonl")) == without_ms(records(tmp_path / "plain.jsonl"))
    saved = yaml.safe_load((tmp_path / "split.preset.yaml").read_text())
    assert saved["large"]["device_map"] == LARGE_MAP
