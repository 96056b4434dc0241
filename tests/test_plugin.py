"""Third-party guides: examples/guide-plugin (the `norm` guide) installed by pip, offline, works in run, eval,
inspect and presets like a built-in guide, and ranks exactly by the L2 norm of the large model's image features."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine import guides
from sgl_cli.engine.io.formats import read_items
from tests.conftest import analyze, make_images, plugin_on_path, write_jsonl, write_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def plugin(example_site):
    """examples/guide-plugin installed by pip (its dist-info carries the entry point, as a real install does), on
    sys.path for this module."""
    with plugin_on_path(example_site("guide-plugin"), "sgl_norm_guide", guides.refresh) as site:
        yield site


@pytest.fixture
def items(tmp_path):
    imgs = make_images(tmp_path)
    rows = [{"image": p.name, "question": q, "answer": "red"}
            for p, q in zip(imgs, ["What color is the square?", "How many circles?", "What shape is red?"])]
    return write_jsonl(tmp_path / "batch.jsonl", rows)


def test_the_plugin_is_registered_after_the_built_ins(plugin):
    assert guides.guide_names() == ["sgl", "cls", "fastv", "random", "downsample", "norm"]
    guide = guides.make_guide("norm")
    assert type(guide).__module__ == "sgl_norm_guide" and not guide.needs_small and guide.prune_layer(
        type("S", (), {"prune_layer": 0})(), 4) == 0


def test_norm_scores_are_the_feature_norms(plugin, engine_factory, items):
    """Independent reference: the large model's own get_image_features, norm per merged token, top retain."""
    eng = engine_factory(guide="norm", retain=0.25)
    m = eng.large
    with torch.inference_mode():
        works = analyze(eng, list(read_items(items)))
        eng.large_pass(works, eng.large_inputs(works))
        for w in works:
            enc = w.encoded.large
            feats = m.model.model.get_image_features(enc["pixel_values"], enc["image_grid_thw"]).pooler_output[0]
            ref = feats.double().norm(dim=-1)
            assert torch.allclose(w.large.scores.double(), ref, rtol=1e-5)
            k = max(1, int(len(ref) * 0.25))
            assert w.large.kept.tolist() == sorted(torch.topk(ref, k).indices.tolist())
            assert w.large.guide == "norm" and w.large.prune_layer == 0


def test_norm_works_in_run_eval_inspect_and_a_preset(plugin, items, tiny_pair, tmp_path):
    preset = write_preset(tmp_path, tiny_pair, guide="norm", retain=0.25)
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(app, ["run", str(items), "--preset", str(preset), "--out", str(out), "-q"])
    assert res.exit_code == 0, res.output
    records = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["guide"] for r in records] == ["norm"] * 3 and all(r["error"] is None for r in records)
    assert all(r["retained_tokens"] == max(1, r["visual_tokens"] // 4) for r in records)

    res = CliRunner().invoke(app, ["eval", str(items), "--preset", str(preset), "--guide", "norm,random",
                                   "--retain", "0.25", "--json", "-q"])
    assert res.exit_code == 0, res.output
    assert [(r["guide"], r["retain"]) for r in json.loads(res.stdout)["results"]] == [("norm", 0.25),
                                                                                       ("random", 0.25)]

    (image,) = make_images(tmp_path, sizes=((224, 224),))
    res = CliRunner().invoke(app, ["inspect", str(image), "--question", "What is red?", "--preset", str(preset),
                                   "--guide", "all", "--json"])
    assert res.exit_code == 0, res.output
    got = json.loads(res.stdout)
    assert list(got["guides"]) == ["sgl", "cls", "fastv", "random", "norm"]
    assert len(got["guides"]["norm"]["kept"]) == max(1, got["visual_tokens"] // 4)


def test_help_lists_the_plugin(plugin):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(plugin), str(ROOT)])}
    for command in ("run", "eval", "inspect"):
        res = subprocess.run([sys.executable, "-m", "sgl_cli", command, "--help"], capture_output=True, text=True,
                             env={**env, "COLUMNS": "200"})
        assert res.returncode == 0, res.stderr
        assert "random, downsample, norm" in res.stdout, (command, res.stdout)


def test_a_broken_plugin_is_one_line(tmp_path, monkeypatch):
    """A registered guide that cannot be imported is named in one error line, not a traceback."""
    (tmp_path / "broken_guide-0.1.dist-info").mkdir()
    (tmp_path / "broken_guide-0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-guide\n"
                                                                     "Version: 0.1\n")
    (tmp_path / "broken_guide-0.1.dist-info" / "entry_points.txt").write_text("[sgl.guides]\nbroken = nowhere:Guide\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    guides.refresh()
    try:
        assert "broken" in guides.guide_names()
        from sgl_cli.engine.errors import PresetError

        with pytest.raises(PresetError, match=r"guide 'broken' \(nowhere:Guide\) cannot be loaded: ModuleNotFound"):
            guides.make_guide("broken")
    finally:
        guides.refresh()
