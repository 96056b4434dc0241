"""The vLLM backend's parts that need no vLLM (this environment has none): its refusals, its option checks, and
the pruned M-RoPE numbering against the transformers path. The tests that run vLLM are in tests_vllm/, run in the
vLLM environment (scripts/vllm_env.sh)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

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
    from sgl_cli.engine.pipeline.models import load_model
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
