"""The vLLM backend's parts that need no vLLM (this environment has none): its refusals, its option checks, the
pruned M-RoPE numbering against the transformers path, the seam's defaults (image_token_id, num_layers, context)
against the LoadedModel's, and the downsample guide's requests (the resized images, every token kept) against the
transformers backend's reduced input, on an engine whose vLLM is a stand-in that records what it is sent. The tests
that run vLLM are in tests_vllm/, run in the vLLM environment (scripts/vllm_env.sh)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from sgl_cli.engine.backends.vllm import UnsupportedFamily, VllmLarge, VllmUnavailable
from sgl_cli.engine.backends.vllm.positions import ImageSpan, pruned_mrope_positions, split_kept
from sgl_cli.engine.errors import SglError


def folder(tmp_path, model_type: str):
    path = tmp_path / model_type
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": model_type}))
    return path


def test_vllm_not_installed_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` fails as where it is not installed
    with pytest.raises(VllmUnavailable) as err:
        VllmLarge(folder(tmp_path, "qwen2_vl"))
    assert isinstance(err.value, SglError)
    assert str(err.value) == ("the vLLM backend needs vLLM, which is not installed: pip install 'sgl-cli[vllm]' on a "
                              "GPU machine, or scripts/vllm_env.sh DIR on a CPU")


def test_unsupported_family_is_refused_before_vllm_loads(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # refused before vLLM is even imported
    path = folder(tmp_path, "llava")
    with pytest.raises(UnsupportedFamily) as err:
        VllmLarge(path)
    assert isinstance(err.value, SglError)
    assert str(err.value) == (f"{path}: the vLLM backend runs Qwen2-VL, Qwen2.5-VL, Qwen3-VL models, not llava "
                              "(use the transformers backend)")
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("option, value, message", [
    ("tensor_parallel_size", 0, "vLLM option tensor_parallel_size: 0 must be a whole number >= 1"),
    ("gpu_memory_utilization", 1.5, "vLLM option gpu_memory_utilization: 1.5 must be a fraction in (0, 1]"),
    ("max_model_len", -3, "vLLM option max_model_len: -3 must be a whole number >= 1"),
    ("max_num_seqs", 2.5, "vLLM option max_num_seqs: 2.5 must be a whole number >= 1"),
    ("dtype", "int8", "vLLM option dtype: 'int8' must be one of auto, float32, float16, bfloat16"),
])
def test_bad_vllm_options(tmp_path, option, value, message):
    with pytest.raises(SglError) as err:
        VllmLarge(folder(tmp_path, "qwen2_vl"), **{option: value})
    assert str(err.value) == message


def test_importing_the_backend_imports_neither_vllm_nor_torch():
    code = ("import sys, sgl_cli.engine.backends.vllm, sgl_cli.engine.backends.vllm.plugin; "
            "print(sorted(m for m in ('vllm', 'torch', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_split_kept():
    assert [t.tolist() for t in split_kept([1, 4, 5, 9], [5, 3, 2])] == [[1, 4], [0], [1]]
    assert [t.tolist() for t in split_kept(None, [2, 1])] == [[0, 1], [0]]
    for kept, message in [([0, 10], "kept indices must lie in 0..9 (the item's 10 visual tokens)"),
                          ([2, 2], "kept indices must be strictly increasing (the visual tokens in sequence order)"),
                          ([0, 1], "image 2 of 3 keeps none of its 3 visual tokens; the vLLM backend needs at least "
                                   "one per image")]:
        with pytest.raises(ValueError) as err:
            split_kept(kept, [5, 3, 2])
        assert str(err.value) == message


@pytest.fixture(scope="module", params=["qwen2_vl", "qwen2_5_vl", "qwen3_vl"])
def tiny_large(request, tmp_path_factory):
    from sgl_cli.engine.builtin.pair import TINY_SPEC, build_pair
    from sgl_cli.engine.backends.transformers import load_model
    from sgl_cli.engine.preset import ModelSpec

    from .families import build_family

    out = tmp_path_factory.mktemp(request.param)
    path = build_family("qwen3_vl", out) if request.param == "qwen3_vl" else \
        build_pair(dataclasses.replace(TINY_SPEC, arch=request.param), out)
    return load_model(ModelSpec(str(path["large"]), dtype="float32"), "large")


@pytest.mark.parametrize("retain", [1.0, 0.25, 0.09])
def test_pruned_positions_equal_the_transformers_path(tiny_large, retain):
    """For items of one, two and three images of different shapes (tall ones included), the pruned prompt's
    M-RoPE ids equal the family's full-prompt ids (transformers' get_rope_index) at the kept columns."""
    from PIL import Image

    m = tiny_large
    shapes = [(112, 84), (56, 140), (140, 56)]
    ims = [Image.new("RGB", s, (10 * i, 80, 160)) for i, s in enumerate(shapes)]
    gen = torch.Generator().manual_seed(int(retain * 100))
    for group in ([ims[1]], [ims[0], ims[1]], [ims[2], ims[0], ims[1]]):
        enc = m.family.encode(m.processor, group, "What is here?")
        full = m.family.position_ids(m.model, enc)
        visual = m.family.visual_mask(m.model, enc)
        n = int(visual.sum())
        grids = m.family.token_grids(m.model, enc)
        counts = [int(g.tokens.size) for g in grids]
        kept = torch.randperm(n, generator=gen)[:max(len(group), round(retain * n))].sort().values
        firsts = torch.tensor([sum(counts[:i]) for i in range(len(group))])
        kept = torch.unique(torch.cat([kept, firsts]))  # every image keeps one token at least
        columns = ~visual
        columns[visual.nonzero()[kept, 0]] = True
        per_image = split_kept(kept.tolist(), counts)
        pruned_ids = enc["input_ids"][0][columns]
        starts = (pruned_ids == m.image_token_id).nonzero()[:, 0]
        spans, at = [], 0
        for g, idx in zip(grids, per_image):
            spans.append(ImageSpan(int(starts[at]), (1, *g.tokens.shape), idx))
            at += len(idx)
        positions, delta = pruned_mrope_positions(len(pruned_ids), spans)
        assert torch.equal(positions, full[:, columns])
        assert delta == int(full.max()) + 1 - len(pruned_ids)


# -- the seam's defaults and the downsample guide, with a stand-in for vLLM's engine ---------------------------------
class RecordingLarge:
    """Stands in for `VllmLarge`: its settings, a prompt that shows what it was given, and answers that record the
    requests (tokens [5, 6, EOS])."""

    def __init__(self, settings, eos: int):
        self.settings = settings
        self.eos = eos
        self.requests = []

    def prompt(self, images, prompt) -> str:
        return f"{len(images)} image(s) | {json.dumps(prompt)}"

    def check_request(self, i, request) -> None:
        pass  # every request is one the plugin takes

    def generate(self, requests):
        from sgl_cli.engine.backends.vllm import LargeReply

        self.requests += list(requests)
        return [LargeReply([5, 6, self.eos], "", "stop") for _ in requests]


def config_only(m, max_model_len=None):
    """The vLLM backend as `VllmBackend.load` makes it (the checkpoint's processor, its config alone, the family
    read from the config) over a LoadedModel's checkpoint, its engine the recording stand-in."""
    from sgl_cli.engine.backends.vllm.backend import VllmBackend
    from sgl_cli.engine.backends.vllm.large import VllmSettings
    from sgl_cli.engine.families import family_for

    large = RecordingLarge(VllmSettings(max_model_len=max_model_len), min(m.eos_ids))
    return VllmBackend(m.spec, large, m.processor, m.model.config, family_for(SimpleNamespace(config=m.model.config)),
                       m.eos_ids)


def test_the_backends_defaults_give_the_loaded_models_values(tiny_large):
    from sgl_cli.engine.backends.transformers import TransformersLarge

    m = tiny_large
    assert m.context > 64
    for backend in (TransformersLarge(m), config_only(m)):
        assert (backend.image_token_id, backend.num_layers, backend.context) == (m.image_token_id, m.num_layers,
                                                                                 m.context)
    assert config_only(m, max_model_len=64).context == 64  # vLLM's cap, its one override
    assert config_only(m, max_model_len=1 << 30).context == m.context


def test_vllm_offers_downsample_and_still_refuses_cls_fastv_and_a_prune_layer():
    from sgl_cli.engine.backends.base import CapabilityError, check
    from sgl_cli.engine.backends.vllm.backend import VllmBackend
    from sgl_cli.engine.guides import guide_class

    assert VllmBackend.offers == {"reduced_input"}
    check(guide_class("downsample"), VllmBackend, 0)
    check(guide_class("sgl"), VllmBackend, 0)
    for guide, k, what in (("cls", 0, "vision_attention"), ("fastv", 0, "lm_attention, prune_inside_lm"),
                           ("sgl", 1, "prune_inside_lm"), ("downsample", 2, "prune_inside_lm")):
        with pytest.raises(CapabilityError) as err:
            check(guide_class(guide), VllmBackend, k)
        at = f" at prune_layer {k}" if k else ""
        assert str(err.value) == f"the {guide} guide{at} needs {what}, which the vllm large backend " \
                                 "(large_backend) does not offer"


@pytest.mark.parametrize("retain", [0.25, 0.09])
def test_downsample_on_vllm_sends_the_transformers_reduced_images_with_every_token_kept(tiny_large, tmp_path, retain):
    """On the engine, `sgl eval`'s comparison (with and without answers): what vLLM is sent is the image the
    transformers backend reduces (its size and, encoded, its ids and pixels), every token kept, the item's prompt;
    the records count what it received."""
    from sgl_cli.engine.backends.transformers import TransformersLarge
    from sgl_cli.engine.evaluation.compare import Comparison
    from sgl_cli.engine.guides import make_guide
    from sgl_cli.engine.io.formats import read_items
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.preset import Settings

    from .conftest import make_images, write_jsonl

    m = tiny_large
    sizes = ((336, 224), (168, 280), (700, 90), (56, 56))
    rows = [{"id": f"q{i}", "image": str(p), "question": "What color?", "max_new_tokens": 3 + i}
            for i, p in enumerate(make_images(tmp_path, sizes=sizes))]
    items = list(read_items(write_jsonl(tmp_path / "b.jsonl", rows)))
    settings = Settings(guide="downsample", retain=retain, threshold=None, max_new_tokens=8, prompt_suffix="One word.")
    ref = Engine(settings, None, TransformersLarge(m))
    ref_works = ref.prepare(items)
    want = TransformersLarge(m).reduced(ref_works, make_guide("downsample", settings), retain)
    assert any(r.image_sizes != [w.encoded.image_sizes[0]] for r, w in zip(want, ref_works))  # some were resized

    backend = config_only(m)
    eng = Engine(settings, None, backend)  # refused before reduced_input was offered
    records = eng.process(items)
    sent = backend.large.requests
    assert len(sent) == len(items)
    for it, rec, r, w, req in zip(items, records, want, ref_works, sent):
        assert req.kept is None and req.max_new_tokens == it.max_new_tokens
        assert [im.size for im in req.images] == r.image_sizes
        assert req.prompt == f"1 image(s) | {json.dumps(it.messages('One word.'))}"
        enc = m.family.encode(m.processor, list(req.images), it.messages("One word."))
        assert torch.equal(enc["input_ids"], r.encoding["input_ids"])
        assert torch.equal(enc["pixel_values"], r.encoding["pixel_values"])
        assert (rec["retained_tokens"], rec["visual_tokens"]) == (r.n_visual, w.encoded.n_visual)
        assert rec["error"] is None and rec["exit"] == "large" and rec["finish_reason"] == "stop"

    comparison = Comparison(eng, [("downsample", retain)])
    backend.large.requests.clear()
    (quiet,) = comparison.batch(items, answers=False, large_alone=False).outcomes.values()
    assert backend.large.requests == []  # what the large model would see, with no request
    (answered,) = comparison.batch(items, answers=True, large_alone=False).outcomes.values()
    assert len(backend.large.requests) == len(items)
    for q, a, r in zip(quiet, answered, want):
        assert q.answer is None and q.reduced.n_visual == a.reduced.n_visual == r.n_visual
        assert q.reduced.image_sizes == a.reduced.image_sizes == r.image_sizes
        assert a.kept is None and torch.equal(a.ranking()[1], torch.arange(r.n_visual))  # all of it, unranked


def test_downsample_on_vllm_refuses_a_fixed_resolution_tower(tiny_large):
    backend = config_only(tiny_large)
    backend.family = SimpleNamespace(fixed_resolution=True, name="llava-1.5")
    guide = SimpleNamespace(name="downsample")
    for call in (lambda: backend.reduced([], guide, 0.25), lambda: backend.generate_reduced([], guide, 0.25, [])):
        with pytest.raises(ValueError) as err:
            call()
        assert str(err.value) == ("the vLLM backend cannot pool llava-1.5 image features (the downsample guide on a "
                                  "fixed-resolution tower): use the transformers backend")


# -- what the vLLM backend refuses before anything loads (issue 32) ------------------------------------------------
UNQUANTIZED = "(bitsandbytes) applies to the transformers large backend, not to vllm ({}), which would run the " \
              "weights unquantized"


def _no_model_loads(monkeypatch):
    """Loading a model, building the built-in pair or importing vLLM fails the test."""
    from sgl_cli.engine.backends import transformers
    from sgl_cli.engine.builtin import pair

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the refusal")

    for module, name in ((transformers, "load_model"), (pair, "build_pair"), (pair, "ensure_pair")):
        monkeypatch.setattr(module, name, refuse)
    monkeypatch.setitem(sys.modules, "vllm", None)


def _preset(tmp_path, **large) -> str:
    import yaml

    from sgl_cli.engine.preset import presets_dir

    data = yaml.safe_load((presets_dir() / "default.yaml").read_text())
    data["large"].update(large)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path)


# --quantize is sgl run's; eval and calibrate take the preset's.
@pytest.mark.parametrize("command, case", [("run", "flags"), ("run", "preset+flag"),
                                           *((c, x) for c in ("run", "eval", "calibrate")
                                             for x in ("preset", "flag+preset"))])
def test_quantize_on_vllm_is_refused_in_one_line_before_any_model_loads(tmp_path, monkeypatch, command, case):
    """vLLM runs no bitsandbytes weights: --quantize (or a preset's large.quantize) with the vllm large backend
    (--large-backend or the preset's large.backend) is refused, where every record would have said
    `large_quantize: nf4` of an unquantized model."""
    from typer.testing import CliRunner

    from sgl_cli.cli import app

    from .conftest import ROOT

    path = _preset(tmp_path, **{"flags": {}, "preset": {"backend": "vllm", "quantize": "4bit"},
                                "preset+flag": {"backend": "vllm"}, "flag+preset": {"quantize": "4bit"}}[case])
    args = {"flags": ["--large-backend", "vllm", "--quantize", "4bit"], "preset": [],
            "preset+flag": ["--quantize", "8bit"], "flag+preset": ["--large-backend", "vllm"]}[case]
    args = ["--preset", path, *args]
    _no_model_loads(monkeypatch)
    more = {"run": ["--out", "-"], "eval": [], "calibrate": ["--exit-rate", "0.5"]}[command]
    res = CliRunner().invoke(app, [command, str(ROOT / "examples" / "batch.jsonl"), *args, *more])
    assert res.exit_code == 2, res.output
    if case == "preset":
        want = (f"sgl: error: {path}: large.quantize: nf4 (bitsandbytes) applies to the transformers large backend, "
                "not to backend: vllm, which would run the weights unquantized")
    else:
        want = "sgl: error: --quantize " + ("8bit " if case == "preset+flag" else "nf4 ") + UNQUANTIZED.format(
            "--large-backend")
    assert res.stderr.strip() == want and res.stdout == ""


def test_the_library_refuses_quantize_on_vllm_before_any_model_loads(monkeypatch):
    """A preset built in code (no file, no flags): Engine.load asks the backend's check_spec first."""
    from sgl_cli.engine.backends.vllm.backend import VllmBackend
    from sgl_cli.engine.errors import SettingError
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.preset import load_preset

    preset = load_preset("default")
    preset = dataclasses.replace(preset, large=dataclasses.replace(preset.large, backend="vllm", quantize="4bit"))
    _no_model_loads(monkeypatch)
    for call in (lambda: Engine.load(preset), lambda: VllmBackend.check_spec(preset.large),
                 lambda: VllmBackend.load(preset.large, "large", {})):
        with pytest.raises(SettingError) as err:
            call()
        assert str(err.value) == "large_quantize nf4 " + UNQUANTIZED.format("large_backend")
        assert err.value.settings == ("large_quantize", "large_backend")


# The one wording of every backend's options (backends.base.check_options).
@pytest.mark.parametrize("options, message", [
    ({"enable_prefix_cache": False}, "vLLM options: unknown option 'enable_prefix_cache' of the vllm large backend "
                                     "(did you mean 'enable_prefix_caching'?); it takes: tensor_parallel_size, "
                                     "gpu_memory_utilization, max_model_len, max_num_seqs, enforce_eager, dtype, seed, "
                                     "enable_prefix_caching, load_format"),
    ({"max_num_seqs": 4, "quantization": "fp8"}, "vLLM options: unknown option 'quantization' of the vllm large "
                                                 "backend; it takes: tensor_parallel_size, "),
    ({"enable_prefix_caching": 1}, "vLLM options.enable_prefix_caching: must be true or false, got 1"),
    ({"max_num_seqs": 0}, "vLLM options.max_num_seqs: must be an integer >= 1 or null, got 0"),
])
def test_the_backend_refuses_options_it_does_not_take(monkeypatch, options, message):
    """VllmBackend.load used to drop a key it did not know and load without it; now it says so before anything
    loads (here vLLM is absent: without the refusal, the error would be that)."""
    from sgl_cli.engine.backends.vllm.backend import VllmBackend
    from sgl_cli.engine.errors import SglError
    from sgl_cli.engine.preset import load_preset

    _no_model_loads(monkeypatch)
    with pytest.raises(SglError) as err:
        VllmBackend.load(load_preset("default").large, "large", options)
    assert not isinstance(err.value, VllmUnavailable)
    assert str(err.value).startswith(message)


def test_presets_take_enable_prefix_caching_and_refuse_other_vllm_keys(tmp_path):
    """A preset's `vllm:` (the alias of `options:`) is checked by the backend's declared options, before any model
    loads (`check_preset`), naming the file."""
    from sgl_cli.engine.backends import check_preset
    from sgl_cli.engine.errors import SglError
    from sgl_cli.engine.preset import load_preset

    good = load_preset(_preset(tmp_path, backend="vllm", vllm={"enable_prefix_caching": True}))
    check_preset(good)
    assert good.large.options == {"enable_prefix_caching": True}
    for vllm, message in (({"enable_prefix_caching": "yes"},
                           "large.options.enable_prefix_caching: must be true or false"),
                          ({"kv_cache_dtype": "fp8"}, "large.options: unknown option 'kv_cache_dtype' of the vllm "
                                                      "large backend; it takes: tensor_parallel_size, "
                                                      "gpu_memory_utilization, max_model_len, max_num_seqs, "
                                                      "enforce_eager, dtype, seed, enable_prefix_caching, "
                                                      "load_format")):
        path = _preset(tmp_path, backend="vllm", vllm=vllm)
        with pytest.raises(SglError) as err:
            check_preset(load_preset(path))
        assert message in str(err.value) and path in str(err.value)


def test_vllm_large_refuses_a_keyword_vllm_does_not_take(tmp_path, monkeypatch):
    """`VllmLarge(**extra)` passes extra keywords to vLLM's `LLM`: each must be an `LLM` parameter or an `EngineArgs`
    field of the vLLM installed (here a stand-in module), and none may replace what sgl sets; refused before the
    engine is made."""
    import types
    from dataclasses import dataclass

    @dataclass
    class EngineArgs:
        model: str = ""
        max_num_batched_tokens: int | None = None
        enable_prefix_caching: bool | None = None

    class LLM:
        def __init__(self, model, seed=0, hf_overrides=None, **kwargs):
            raise AssertionError("the engine was made")

    monkeypatch.setitem(sys.modules, "vllm", types.SimpleNamespace(LLM=LLM, EngineArgs=EngineArgs,
                                                                   __version__="0.32.0"))
    from sgl_cli.engine.backends.vllm import compat

    monkeypatch.setattr(compat, "check_vllm", lambda: None)  # the stand-in has none of the plugin's internals
    path = folder(tmp_path, "qwen2_vl")
    for extra, message in (({"max_num_batched_token": 64}, "vLLM option 'max_num_batched_token': not an argument of "
                                                           "vLLM 0.32.0's LLM or EngineArgs (did you mean "
                                                           "'max_num_batched_tokens'?)"),
                           ({"mm_processor_cache_gb": 4}, "vLLM option 'mm_processor_cache_gb': sgl sets it itself "
                                                          "(the large model, its plugin architecture, images only, no "
                                                          "processor cache)")):
        with pytest.raises(SglError) as err:
            VllmLarge(path, **extra)
        assert str(err.value) == message
    from sgl_cli.engine.errors import ModelLoadError

    with pytest.raises(ModelLoadError, match="AssertionError: the engine was made"):  # known keys reach LLM
        VllmLarge(path, max_num_batched_tokens=64, enable_prefix_caching=False)
