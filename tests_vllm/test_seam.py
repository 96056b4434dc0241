"""The vLLM backend behind the seam: `sgl run examples/batch.jsonl --large-backend vllm` writes the transformers
backend's records (answers, exits, kept tokens, finish reasons; timings and `large_backend` aside), and the backend
contract of tests/test_backends.py holds on vLLM: batch equals batch 1, the same image with two questions equals two
runs, the kept set is the top `retain` of the small model's importance and vLLM answers from exactly it; with two
images per item too (kept sets over both images' tokens, answers and records equal to the transformers backend's)."""

from __future__ import annotations

import gc
import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import analyze, comparable, records
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.preset import load_preset

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
runner = CliRunner()


def test_sgl_run_large_backend_vllm_gives_the_transformers_records(tmp_path, vllm_preset):
    src = EXAMPLES / "batch.jsonl"
    t, v = tmp_path / "t.jsonl", tmp_path / "v.jsonl"
    res = runner.invoke(app, ["run", str(src), "-o", str(t), "-q", "--threads", "2"])
    assert res.exit_code == 0, res.output
    # The flag over the default preset, with the vLLM options of a preset that names them.
    res = runner.invoke(app, ["run", str(src), "-p", str(vllm_preset), "-o", str(v), "-q", "--large-backend", "vllm"])
    assert res.exit_code == 0, res.output
    gc.collect()
    tr, vr = records(t), records(v)
    assert [r["large_backend"] for r in tr] == ["transformers"] * 8 and [r["large_backend"] for r in vr] == ["vllm"] * 8
    assert comparable(vr) == comparable(tr)
    assert {r["exit"] for r in tr} == {"small", "large"}  # both paths are in the comparison
    assert yaml.safe_load(v.with_name("v.preset.yaml").read_text())["large"]["backend"] == "vllm"


@pytest.fixture(scope="module")
def vllm_engine(vllm_preset):
    from sgl_cli.engine import Engine

    engine = Engine.load(load_preset(str(vllm_preset)).with_settings(no_exit=True, retain=0.25))
    yield engine
    engine.large.close()
    gc.collect()


@pytest.fixture
def items(tmp_path):
    from sgl_cli.engine import read_items

    rows = [json.loads(line) for line in (EXAMPLES / "batch.jsonl").read_text().splitlines()[:3]]
    rows.append({**rows[0], "id": "again", "question": "What shape is red?"})  # the first image, another question
    for r in rows:
        r["image"] = str(EXAMPLES / r["image"])
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return lambda: list(read_items(tmp_path / "b.jsonl"))


def test_contract_batch_equals_batch_one_on_vllm(vllm_engine, items):
    together = [{k: v for k, v in r.items() if k != "ms"} for r in vllm_engine.with_settings(batch_size=4).run(items())]
    alone = [{k: v for k, v in vllm_engine.with_settings(batch_size=1).process([it])[0].items() if k != "ms"}
             for it in items()]
    assert [r["id"] for r in together] == ["shapes-7-0", "shapes-7-1", "shapes-7-2", "again"]
    for a, b in zip(together, alone):  # the small model's float scores may move in their last bits with padding
        assert {k: v for k, v in a.items() if k not in ("exit_score", "confidence", "consistency")} == \
            {k: v for k, v in b.items() if k not in ("exit_score", "confidence", "consistency")}
    assert together[0]["visual_tokens"] == together[3]["visual_tokens"]
    assert all(r["large_backend"] == "vllm" and r["exit"] == "large" and r["error"] is None for r in together)


@pytest.fixture(scope="module")
def hf_large(vllm_engine):
    """The same large model on the transformers backend (loaded once for the module's contract tests)."""
    from sgl_cli.engine.backends.transformers import TransformersLarge

    large = TransformersLarge.load(vllm_engine.preset.large)
    yield large
    large.close()


def test_contract_the_kept_set_is_what_vllm_answers_from(vllm_engine, hf_large, items):
    """The kept set is the top 0.25 of the small model's importance; vLLM's answers from it equal sgl's
    transformers large model's from the same kept tokens."""
    from sgl_cli.engine.guides.base import n_keep, top_k_in_order
    from sgl_cli.engine.pipeline.engine import Engine

    works = analyze(vllm_engine, items())
    answers = vllm_engine.large_pass(works, vllm_engine.large_inputs(works))
    for w, a in zip(works, answers):
        assert torch.equal(a.kept, top_k_in_order(w.small.importance, n_keep(len(w.small.importance), 0.25)))
    ref = Engine(vllm_engine.settings, vllm_engine.small, hf_large)
    ref_works = analyze(ref, items())
    ref_answers = ref.large_pass(ref_works, ref.large_inputs(ref_works))
    assert [a.tokens for a in answers] == [a.tokens for a in ref_answers]
    assert [a.answer for a in answers] == [a.answer for a in ref_answers]


@pytest.fixture
def pairs(tmp_path):
    """Four items of two images each: the example images two by two (sizes differ within and across items)."""
    from sgl_cli.engine import read_items

    rows = [json.loads(line) for line in (EXAMPLES / "batch.jsonl").read_text().splitlines()]
    pairs = [{"id": f"pair-{i}", "question": rows[2 * i]["question"],
              "images": [str(EXAMPLES / rows[2 * i]["image"]), str(EXAMPLES / rows[2 * i + 1]["image"])]}
             for i in range(len(rows) // 2)]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pairs))
    return lambda: list(read_items(tmp_path / "pairs.jsonl"))


def per_image_counts(engine, work) -> list[int]:
    """Each image's visual tokens in the item's sequence (its grid over the merge)."""
    merge = int(engine.large.model.config.vision_config.spatial_merge_size)
    return [int(n) for n in work.encoded.large["image_grid_thw"].prod(-1) // merge**2]


@pytest.mark.parametrize("retain", [1.0, 0.25])
def test_contract_two_images_per_item_on_vllm_equals_transformers(vllm_engine, hf_large, pairs, retain):
    """Items of two images each through the seam: the sgl guide's kept set (over both images' visual tokens,
    concatenated) and the answer from it on vLLM are the transformers backend's, item by item; at 1.0 every token
    is kept, at 0.25 the top quarter of the small model's importance, with tokens of both images."""
    from sgl_cli.engine.guides.base import n_keep, top_k_in_order
    from sgl_cli.engine.pipeline.engine import Engine

    v = vllm_engine.with_settings(retain=retain)
    got = {}
    for name, engine in (("vllm", v), ("transformers", Engine(v.settings, v.small, hf_large))):
        works = analyze(engine, pairs())
        assert all(w.ok and len(w.item.images) == 2 for w in works), [w.error for w in works]
        got[name] = (works, engine.large_pass(works, engine.large_inputs(works)))
    (works, va), (_, ta) = got["vllm"], got["transformers"]
    assert len(va) == len(ta) == 4
    for i, (w, a, b) in enumerate(zip(works, va, ta)):
        counts = per_image_counts(v, w)
        n = sum(counts)
        assert len(counts) == 2 and n == int(w.encoded.visual.sum()) == len(w.small.importance), i
        want = top_k_in_order(w.small.importance, n_keep(n, retain))
        assert torch.equal(a.kept, want) and torch.equal(b.kept, want), i
        if retain == 1.0:
            assert a.kept.tolist() == list(range(n)), i
        else:
            assert len(a.kept) < n and 0 < int((a.kept < counts[0]).sum()) < len(a.kept), i  # both images kept
        assert a.tokens == b.tokens and a.answer == b.answer, (i, a.answer, b.answer)


def test_contract_two_images_per_item_batch_equals_batch_one_on_vllm(vllm_engine, hf_large, pairs):
    """Two images per item on vLLM: a batch of 4 gives the records of 4 batches of 1, and the transformers
    backend's records (timings, `large_backend` and the input fingerprint aside)."""
    from sgl_cli.engine.pipeline.engine import Engine

    def plain(r: dict) -> dict:  # the small model's float scores may move in their last bits with padding
        return {k: v for k, v in r.items() if k not in ("ms", "exit_score", "confidence", "consistency")}

    together = [plain(r) for r in vllm_engine.with_settings(batch_size=4).run(pairs())]
    alone = [plain(vllm_engine.with_settings(batch_size=1).process([it])[0]) for it in pairs()]
    assert together == alone
    assert [r["id"] for r in together] == ["pair-0", "pair-1", "pair-2", "pair-3"]
    assert all(r["large_backend"] == "vllm" and r["exit"] == "large" and r["error"] is None for r in together)
    hf = Engine(vllm_engine.settings, vllm_engine.small, hf_large).with_settings(batch_size=4)
    assert comparable(together) == comparable([plain(r) for r in hf.run(pairs())])


def test_sgl_eval_large_backend_vllm_gives_the_transformers_answers(tmp_path, vllm_preset):
    """The comparison of guides (sgl eval: the large model alone, sgl at two retains, random) on vLLM: every item's
    answer and correctness per setting equal the transformers backend's."""
    src = EXAMPLES / "batch.jsonl"
    got = {}
    for name, preset in (("transformers", "default"), ("vllm", str(vllm_preset))):
        details = tmp_path / f"{name}.details.jsonl"
        res = runner.invoke(app, ["eval", str(src), "-p", preset, "--guide", "sgl,random", "--retain", "0.5,0.25",
                                  "--details", str(details), "--json", "-q", "--large-backend", name])
        assert res.exit_code == 0, res.output
        got[name] = [{k: v for k, v in r.items() if "ms" not in k and "compute" not in k}
                     for r in records(details)]
        gc.collect()
    assert got["vllm"] == got["transformers"] and len(got["vllm"]) == 8
