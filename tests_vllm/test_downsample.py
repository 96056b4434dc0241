"""The downsample guide on the vLLM backend: each image resized before the request (the processor's arithmetic),
vLLM sent the resized images with every visual token kept.

- the built-in pair: `sgl run examples/batch.jsonl --guide downsample --retain R --large-backend vllm` writes the
  transformers backend's records (answers, exits, retained and visual tokens, finish reasons; timings aside);
- a tiny Qwen2.5-VL (random weights, float32): for images of several sizes and aspects, the vLLM backend's
  reduced answers equal the transformers backend's `generate_reduced` tokens and what it saw (`Reduced`), and a
  batch equals batch size one.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
from conftest import ENGINE, comparable, records
from typer.testing import CliRunner

from sgl_cli.cli import app

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


@pytest.mark.parametrize("retain", [0.25, 0.09])
def test_sgl_run_downsample_on_vllm_gives_the_transformers_records(tmp_path, vllm_preset, retain):
    src = EXAMPLES / "batch.jsonl"
    t, v = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    args = ["run", str(src), "--guide", "downsample", "--retain", str(retain), "-q"]
    res = runner.invoke(app, [*args, "-o", str(t), "--threads", "2"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, [*args, "-p", str(vllm_preset), "-o", str(v), "--large-backend", "vllm"])
    assert res.exit_code == 0, res.output
    gc.collect()
    tr, vr = records(t), records(v)
    assert [r["large_backend"] for r in vr] == ["vllm"] * 8 and [r["large_backend"] for r in tr] == ["transformers"] * 8
    assert comparable(vr) == comparable(tr)
    assert all(r["guide"] == "downsample" and r["exit"] == "large" and r["error"] is None for r in vr)
    # The images were reduced: each received about `retain` of its tokens.
    assert all(r["retained_tokens"] < r["visual_tokens"] for r in vr)


# -- a tiny Qwen2.5-VL, images of several sizes ------------------------------------------------------------------
SIZES = ((336, 224), (168, 280), (700, 90), (140, 140), (56, 56))
MAX_NEW = 8
MARGIN = 2e-3


@pytest.fixture(scope="module")
def pair(tiny_models):
    """(the vLLM backend, the transformers backend) over the tiny Qwen2.5-VL: one vLLM engine for the module."""
    from sgl_cli.engine.backends.transformers import TransformersLarge
    from sgl_cli.engine.backends.vllm.backend import VllmBackend
    from sgl_cli.engine.preset import ModelSpec

    spec = ModelSpec(str(tiny_models["qwen2_5_vl"]), dtype="float32")
    vllm = VllmBackend.load(spec, "large", dict(ENGINE))
    yield vllm, TransformersLarge.load(spec)
    vllm.close()
    gc.collect()


@pytest.fixture(scope="module")
def reference(tiny_models):
    from reference import Transformers

    return Transformers(tiny_models["qwen2_5_vl"])


@pytest.fixture(scope="module")
def items(tmp_path_factory):
    from PIL import Image

    from sgl_cli.engine.io.formats import read_items

    folder = tmp_path_factory.mktemp("sizes")
    rows = []
    for i, size in enumerate(SIZES):
        Image.effect_noise(size, 30 + 10 * i).convert("RGB").save(folder / f"im{i}.png")
        rows.append({"id": f"q{i}", "image": str(folder / f"im{i}.png"), "question": "What is in the image?"})
    (folder / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return lambda: list(read_items(folder / "b.jsonl"))


def engine(backend, retain: float, batch_size: int = 8):
    from sgl_cli.engine.pipeline.engine import Engine
    from sgl_cli.engine.preset import Settings

    return Engine(Settings(guide="downsample", retain=retain, threshold=None, max_new_tokens=MAX_NEW,
                           batch_size=batch_size), None, backend)


@pytest.mark.parametrize("retain", [0.5, 0.25, 0.09])
def test_reduced_answers_equal_the_transformers_generate_reduced(pair, items, reference, retain):
    """Random weights can leave near-ties between the top two tokens (tests_vllm/test_backend.py): the tokens are
    equal up to the first step where transformers' top-two logit margin is below MARGIN, and all of them where
    there is none."""
    vllm, hf = pair
    eng = engine(vllm, retain)
    works = eng.prepare(items())
    assert all(w.ok for w in works)
    answers = eng.large_pass(works, None)
    guide = eng.guide
    ref_works = engine(hf, retain).prepare(items())
    with torch.inference_mode():
        gen, seen = hf.generate_reduced(ref_works, guide, retain, [MAX_NEW] * len(ref_works))
    suffix = eng.settings.prompt_suffix.strip()
    for i, (a, w, tokens) in enumerate(zip(answers, ref_works, gen.tokens)):
        images = guide.prepare_images(hf, list(w.encoded.images), retain)
        (ref,) = reference.run([(images, f"{w.item.question}\n{suffix}", None)], MAX_NEW)
        assert ref.tokens == tokens, f"item {i}"  # the reference's own rows: generate_reduced is plain greedy
        top2 = ref.logits.topk(2, dim=-1).values
        decided = next((j for j, m in enumerate((top2[:, 0] - top2[:, 1]).tolist()) if m < MARGIN), len(tokens))
        assert a.tokens[:decided] == tokens[:decided], f"item {i}"
        if decided == len(tokens):
            assert a.tokens == tokens and a.answer == hf.decode(tokens), f"item {i}"
    for a, s, w in zip(answers, seen, works):
        assert a.reduced.image_sizes == s.image_sizes and a.reduced.n_visual == s.n_visual == a.n_kept
        assert a.kept is None  # every token of the reduced input, unranked
        assert a.reduced.encoding["input_ids"].tolist() == s.encoding["input_ids"].tolist()
    resized = [s.image_sizes != [w.encoded.image_sizes[0]] for s, w in zip(seen, works)]
    assert sum(resized) >= 3  # most of the images were reduced (56 x 56 is the processor's smallest already)
    # What the large model would see with no answer asked for (sgl eval / inspect): the same.
    assert [(r.image_sizes, r.n_visual) for r in vllm.reduced(works, guide, retain)] == \
        [(s.image_sizes, s.n_visual) for s in seen]


def test_reduced_batch_equals_batch_one(pair, items):
    vllm, _ = pair
    together = [{k: v for k, v in r.items() if k != "ms"} for r in engine(vllm, 0.25, batch_size=8).run(items())]
    alone = [{k: v for k, v in engine(vllm, 0.25, batch_size=1).process([it])[0].items() if k != "ms"}
             for it in items()]
    assert together == alone and len(together) == len(SIZES)
    assert all(r["error"] is None and r["large_backend"] == "vllm" for r in together)
