"""The small model behind its interface (`SmallModel`): a pair of plugin backends with no model at all
(examples/backend-plugin's `echo`, both roles: answers, probabilities and SGP importance from a rule) runs `Run`,
the CLI, `--resume` and Ray exactly as a real pair does; backend-owned options reach the backend and are checked."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from tests.conftest import make_images, write_jsonl, write_preset

runner = CliRunner()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_ms(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "ms"} for r in recs]


@pytest.fixture
def no_weights(monkeypatch):
    """No model's weights load: transformers' loader fails the test."""
    from transformers import AutoModelForImageTextToText

    from sgl_cli.engine.backends import transformers as hf_backend

    monkeypatch.setattr(hf_backend, "load_model", lambda *a, **k: pytest.fail("a transformers model loaded"))
    monkeypatch.setattr(AutoModelForImageTextToText, "from_pretrained",
                        classmethod(lambda *a, **k: pytest.fail("weights loaded")))


@pytest.fixture
def job(tmp_path, tiny_pair):
    imgs = make_images(tmp_path)
    questions = ["What color is the square?", "How many circles?", "Which shape is red?", "Where is it?"]
    rows = [{"image": imgs[i % 3].name, "question": q, "id": f"q{i}"} for i, q in enumerate(questions * 2)]
    rows[2:2] = ["{not json"]
    src = write_jsonl(tmp_path / "batch.jsonl", rows)
    preset = write_preset(tmp_path, tiny_pair, batch_size=3, retain=0.25, threshold=0.6, max_new_tokens=20,
                          small={"model": str(tiny_pair["small"]), "backend": "echo"},
                          large={"model": str(tiny_pair["large"]), "backend": "echo"})
    return src, preset


def _sure(line: int, question: str) -> float:  # the echo small model's rule (examples/backend-plugin)
    return (zlib.crc32(f"{line}:{question}".encode()) % 10_000) / 10_000


def test_a_pair_with_no_model_runs_the_whole_pipeline(echo, job, no_weights, tmp_path):
    from sgl_cli.engine import Run, load_preset
    from sgl_cli.engine.guides.base import n_keep

    src, preset = job
    recs = list(Run(src, load_preset(str(preset)), out=tmp_path / "out.jsonl"))
    assert [r["line"] for r in recs] == list(range(1, 10)) and recs[2]["error"].startswith("line 3: not valid JSON")
    answered = [r for r in recs if r["error"] is None]
    assert len(answered) == 8
    questions = [json.loads(x)["question"] for x in src.read_text().splitlines() if x.startswith("{\"")]
    for r, q in zip(answered, questions):
        assert r["small_answer"] == f"small: {q.split()[0]}"
        sure = _sure(r["line"], q)
        # SEE from the small model's rule: confidence 0.5 + sure/2, consistency `sure`
        assert r["confidence"] == pytest.approx(0.5 + 0.5 * sure) and r["consistency"] == pytest.approx(sure)
        assert r["exit"] == ("small" if r["exit_score"] >= 0.6 else "large")
        if r["exit"] == "large":  # the echo large backend answers from the kept set the sgl guide chose
            kept = n_keep(r["visual_tokens"], 0.25)
            assert r["retained_tokens"] == kept and r["answer"].startswith(f"kept {kept} of {r['visual_tokens']}: ")
            assert r["large_backend"] == "echo"
        else:
            assert r["answer"] == r["small_answer"] and r["retained_tokens"] == 0
    assert {r["exit"] for r in answered} == {"small", "large"}  # the rule makes both happen


def test_the_cli_and_resume_with_no_model(echo, job, no_weights, tmp_path):
    src, preset = job
    out = tmp_path / "cli.jsonl"
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-o", str(out), "-q"])
    assert res.exit_code == 1, res.output  # the bad line
    whole = records(out)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:4]))  # interrupted after 4 records
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-o", str(out), "--resume", "-q"])
    assert res.exit_code == 0, res.output  # the bad line was recorded before the interruption
    assert without_ms(records(out)) == without_ms(whole)


def test_backend_options_reach_the_backend_and_are_checked(echo, job, no_weights, tmp_path):
    src, preset = job
    out = tmp_path / "opt.jsonl"
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-o", str(out), "--large-option", "prefix=seen",
                              "-q"])
    assert res.exit_code == 1, res.output
    large = [r for r in records(out) if r["exit"] == "large"]
    assert large and all(r["answer"].startswith("seen ") for r in large)
    for bad, said in (("nope=1", "unknown option 'nope' of the echo large backend; it takes: prefix"),
                      ("prefix=", "large.options.prefix: must be a non-empty word, got ''"),
                      ("prefix", "--large-option: give KEY=VALUE")):
        out = tmp_path / "bad.jsonl"
        res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-o", str(out), "--large-option", bad])
        assert res.exit_code == 2 and said in res.output and len(res.output.strip().splitlines()) == 1, res.output
        assert not out.exists()


def test_an_unknown_small_backend_is_one_line_before_anything_loads(job, no_weights, tmp_path, tiny_pair):
    src, _ = job
    preset = write_preset(tmp_path, tiny_pair, small={"model": str(tiny_pair["small"]), "backend": "vllm"})
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-o", str(tmp_path / "x.jsonl")])
    assert res.exit_code == 2
    assert len(res.output.strip().splitlines()) == 1  # (echo too, where this module's plugin is on the path)
    assert res.output.startswith(f"sgl: error: {preset}: small.backend: unknown small backend 'vllm'; choose one "
                                 "of transformers")


def test_ray_runs_a_pair_with_no_model(ray_cluster, echo, job, tmp_path):
    src, preset = job
    got = {}
    for backend in ("local", "ray"):
        out = tmp_path / f"{backend}.jsonl"
        res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-o", str(out), "--backend", backend,
                                  *(["--num-workers", "2"] if backend == "ray" else []), "-q"])
        assert res.exit_code == 1, res.output
        got[backend] = records(out)
    assert without_ms(got["ray"]) == without_ms(got["local"]) and len(got["ray"]) == 9
