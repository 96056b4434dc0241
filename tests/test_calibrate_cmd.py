"""`sgl calibrate` end to end on the tiny pair, and `sgl run --calibration`.

The tiny pair has random weights, so its answers are noise; labels are made from its own cached answers
(some lines labelled with the small model's answer, some with the large model's, some wrong), which gives
a set with known correctness whose threshold is recomputed here by brute force.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.evaluation.calibrate import relative_cost
from sgl_cli.engine.evaluation.metrics import exact
from tests.conftest import make_images, write_jsonl, write_preset

runner = CliRunner()
N_LABELLED = 8


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def no_models(monkeypatch) -> None:
    """Make any model load fail the test."""
    from sgl_cli.engine.core.engine import Engine

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Engine, "from_preset", refuse)


def count_items(monkeypatch) -> list[int]:
    """Record the input lines the engine processes."""
    from sgl_cli.engine.core.engine import Engine

    seen: list[int] = []
    real = Engine.process

    def process(self, items):
        seen.extend(item.line for item in items)
        return real(self, items)

    monkeypatch.setattr(Engine, "process", process)
    return seen


def labelled_rows(images: list[Path], answers: list) -> list:
    rows = [{"image": images[i % 3].name, "question": f"question {i}?", "answer": a} for i, a in enumerate(answers)]
    rows.insert(2, {"image": images[0].name, "question": "no answer here"})  # line 3
    rows.insert(5, "{not json")  # line 6
    rows.append({"image": "missing.png", "question": "where?", "answer": "x"})  # line 11: fails in the model pass
    return rows


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_pair) -> dict:
    """One real calibration (both models on every labelled line) whose cache the other tests reuse."""
    folder = tmp_path_factory.mktemp("calibrate")
    images = make_images(folder)
    preset = write_preset(folder, tiny_pair)
    src = write_jsonl(folder / "labelled.jsonl", labelled_rows(images, ["placeholder"] * N_LABELLED))
    res = runner.invoke(app, ["calibrate", str(src), "-p", str(preset), "--exit-rate", "0.5", "-q"])
    caches = list(folder.glob("labelled.calibration-cache-*.jsonl"))
    return {"folder": folder, "images": images, "preset": preset, "src": src, "res": res, "cache": caches[0]}


def test_first_calibration_reports_skips_and_caches_both_answers(calibrated):
    res, folder = calibrated["res"], calibrated["folder"]
    assert res.exit_code == 1, res.output  # line 11 failed; the calibration is still written
    out = folder / "labelled.calibration.yaml"
    assert res.stdout.strip() == str(out)
    assert "skipped line 6: not valid JSON" in res.stderr
    assert "skipped 1 line(s) without 'answer': 3" in res.stderr
    assert "left out line 11: image 'missing.png' not found" in res.stderr
    cached = records(calibrated["cache"])
    assert sorted(r["line"] for r in cached) == [1, 2, 4, 5, 7, 8, 9, 10, 11]
    for r in cached:
        if r["line"] != 11:
            assert r["exit"] == "large" and r["error"] is None and r["item_key"]
            assert isinstance(r["small_answer"], str) and isinstance(r["answer"], str)
    data = yaml.safe_load(out.read_text())
    assert data["n_items"] == N_LABELLED and data["metric"] == "vqa" and data["target"] == {"exit_rate": 0.5}
    fp = data["fingerprint"]
    assert fp["small"].startswith("folder:") and fp["small"] != fp["large"]
    assert (fp["guide"], fp["retain"], fp["prune_layer"], fp["consistency_retain"]) == ("sgl", 0.09, 0, 0.05)
    assert (fp["prompt_suffix"], fp["max_new_tokens"]) == ("Answer with one word.", 5)
    assert data["relative_cost_small"] > 0


def test_plot_is_a_png_of_sensible_size(calibrated):
    raw = (calibrated["folder"] / "labelled.calibration.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    assert 400 <= width <= 2000 and 300 <= height <= 2000


def test_relabelled_calibration_matches_brute_force_without_model_calls(calibrated, monkeypatch):
    folder, src = calibrated["folder"], calibrated["src"]
    cached = {r["line"]: r for r in records(calibrated["cache"]) if r["error"] is None}
    lines = sorted(cached)  # the labelled lines, in input order
    # By rank of exit score: the most confident half right by the small model, the rest by the large one,
    # one line wrong for both (given as a number: references may be numbers), one as a list of references.
    ranked = sorted(lines, key=lambda line: -cached[line]["exit_score"])
    labels = {line: cached[line]["small_answer" if rank < 4 else "answer"] for rank, line in enumerate(ranked)}
    labels[ranked[1]] = 12345
    labels[ranked[5]] = ["zebra", labels[ranked[5]]]
    original = src.read_text()
    try:
        # Same images and questions, so the cache still holds; only the references change.
        write_jsonl(src, labelled_rows(calibrated["images"], [labels[line] for line in lines]))
        no_models(monkeypatch)
        out = folder / "acc.yaml"
        res = runner.invoke(app, ["calibrate", str(src), "-p", str(calibrated["preset"]), "--target-accuracy", "0.8",
                                  "--metric", "exact", "--out", str(out)])
    finally:
        src.write_text(original)
    assert res.exit_code == 1, res.output  # line 11 again, from the cache
    assert isinstance(res.exception, SystemExit)  # not the AssertionError of a model load
    assert "no model calls" in res.stderr and "chosen" in res.stderr

    # Brute force: every distinct score as a threshold, lowest first, then one that exits nothing.
    items = [(cached[n]["exit_score"], exact(cached[n]["small_answer"], _ref(labels[n])),
              exact(cached[n]["answer"], _ref(labels[n]))) for n in lines]
    large_accuracy = sum(big for _, _, big in items) / len(items)
    for t in sorted({s for s, _, _ in items}) + [float("inf")]:
        accuracy = sum(small if s >= t else big for s, small, big in items) / len(items)
        if accuracy >= 0.8 * large_accuracy - 1e-12:
            break
    data = yaml.safe_load(out.read_text())
    n_exit = sum(s >= t for s, _, _ in items)
    if n_exit:
        assert data["threshold"] == t
    else:
        assert data["threshold"] > max(s for s, _, _ in items)
    assert data["exit_rate"] == pytest.approx(n_exit / len(items), abs=1e-6)
    assert data["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert data["large_accuracy"] == pytest.approx(large_accuracy, abs=1e-6)
    assert data["met"] is True and data["metric"] == "exact" and data["n_items"] == len(items)
    lo, hi = data["accuracy_interval"]
    assert lo <= data["accuracy"] <= hi


def _ref(label):
    return [str(x) for x in label] if isinstance(label, list) else str(label)


def test_run_uses_the_calibration_and_refuses_a_mismatch(calibrated, tmp_path, tiny_pair):
    folder, preset = calibrated["folder"], calibrated["preset"]
    cal = folder / "labelled.calibration.yaml"
    threshold = yaml.safe_load(cal.read_text())["threshold"]
    images = calibrated["images"]
    src = write_jsonl(tmp_path / "batch.jsonl", [{"image": str(p), "question": f"question {i}?"}
                                                 for i, p in enumerate(images)])

    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "--calibration", str(cal), "--retain", "0.5"])
    assert res.exit_code == 2
    assert "was made for other settings: retain (calibrated 0.09, this run 0.5)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1

    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "--calibration", str(cal)])
    assert res.exit_code == 0, res.output
    assert f"threshold {threshold:.6g} from the calibration" in res.stderr
    recs = records(tmp_path / "batch.sgl.jsonl")
    assert all((r["exit"] == "small") == (r["exit_score"] >= threshold) for r in recs)
    assert yaml.safe_load((tmp_path / "batch.sgl.preset.yaml").read_text())["threshold"] == threshold

    # A preset's calibration resolves relative to the preset file; --threshold overrides it.
    with_cal = tmp_path / "presets"
    with_cal.mkdir()
    shutil.copy(cal, with_cal / "cal.yaml")
    named = write_preset(with_cal, tiny_pair, calibration="cal.yaml")
    res = runner.invoke(app, ["run", str(src), "-p", str(named), "--overwrite", "-o", str(tmp_path / "a.jsonl")])
    assert res.exit_code == 0, res.output
    assert yaml.safe_load((tmp_path / "a.preset.yaml").read_text())["threshold"] == threshold
    res = runner.invoke(app, ["run", str(src), "-p", str(named), "--threshold", "0", "-q",
                              "-o", str(tmp_path / "b.jsonl")])
    assert res.exit_code == 0, res.output
    assert "--threshold 0 overrides the threshold" in res.stderr
    assert all(r["exit"] == "small" for r in records(tmp_path / "b.jsonl"))


def test_model_mismatch_names_the_model(calibrated, tmp_path, tiny_pair, monkeypatch):
    """Another large model (here: the same weights with another config) is refused before any model loads."""
    other = tmp_path / "other-large"
    shutil.copytree(tiny_pair["large"], other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-6
    (other / "config.json").write_text(json.dumps(config))
    changed = write_preset(tmp_path, {"small": tiny_pair["small"], "large": other})
    src = write_jsonl(tmp_path / "b.jsonl", [{"image": str(calibrated["images"][0]), "question": "q?"}])
    no_models(monkeypatch)
    res = runner.invoke(app, ["run", str(src), "-p", str(changed), "--calibration",
                              str(calibrated["folder"] / "labelled.calibration.yaml")])
    assert res.exit_code == 2
    assert "other settings: large (calibrated 'folder:" in res.stderr and "small (" not in res.stderr


def test_interrupted_calibration_resumes_and_edits_recompute_only_their_line(tmp_path, tiny_pair, monkeypatch):
    images = make_images(tmp_path)
    preset = write_preset(tmp_path, tiny_pair)
    rows = [{"image": images[i % 3].name, "question": f"q{i}?", "answer": "red"} for i in range(4)]
    src = write_jsonl(tmp_path / "l.jsonl", rows)
    args = ["calibrate", str(src), "-p", str(preset), "--exit-rate", "0.5", "-q"]
    assert runner.invoke(app, args).exit_code == 0
    first = yaml.safe_load((tmp_path / "l.calibration.yaml").read_text())
    (cache,) = tmp_path.glob("l.calibration-cache-*.jsonl")
    full = cache.read_text().splitlines(keepends=True)
    cache.write_text(full[0] + full[1][: len(full[1]) // 2])  # killed while writing the second record

    seen = count_items(monkeypatch)
    assert runner.invoke(app, args).exit_code == 0
    assert seen == [2, 3, 4]
    assert [r["line"] for r in records(cache)] == [1, 2, 3, 4]
    assert yaml.safe_load((tmp_path / "l.calibration.yaml").read_text())["threshold"] == first["threshold"]

    seen.clear()
    rows[2]["question"] = "another question?"
    write_jsonl(src, rows)
    assert runner.invoke(app, args).exit_code == 0
    assert seen == [3]

    seen.clear()
    assert runner.invoke(app, args + ["--rerun"]).exit_code == 0
    assert seen == [1, 2, 3, 4] and len(records(cache)) == 4


@pytest.mark.parametrize("extra, message", [
    ([], "give exactly one of --target-accuracy or --exit-rate"),
    (["--target-accuracy", "0.9", "--exit-rate", "0.3"], "exactly one"),
    (["--target-accuracy", "3"], "--target-accuracy is a fraction of the large model's accuracy"),
    (["--exit-rate", "1.5"], "--exit-rate must be in [0, 1]"),
    (["--exit-rate", "0.5", "--metric", "bleu"], "unknown metric 'bleu'; known metrics: contains, exact, vqa"),
    (["--exit-rate", "0.5", "--retain", "0"], "retain must be in (0, 1]"),
])
def test_usage_errors_before_any_model_call(calibrated, monkeypatch, extra, message):
    no_models(monkeypatch)
    res = runner.invoke(app, ["calibrate", str(calibrated["src"]), "-p", str(calibrated["preset"]), *extra])
    assert res.exit_code == 2 and message in res.stderr
    assert res.stderr.startswith("sgl: error:") and len(res.stderr.strip().splitlines()) == 1


def test_no_labelled_lines_and_missing_input(tmp_path, monkeypatch):
    no_models(monkeypatch)
    src = write_jsonl(tmp_path / "u.jsonl", [{"image": "a.png", "question": "q?"}])
    res = runner.invoke(app, ["calibrate", str(src), "--exit-rate", "0.5"])
    assert res.exit_code == 2 and "no line has an 'answer'" in res.stderr
    res = runner.invoke(app, ["calibrate", str(tmp_path / "nope.jsonl"), "--exit-rate", "0.5"])
    assert res.exit_code == 2 and "not found" in res.stderr


def test_relative_cost_is_a_ratio_of_medians():
    # The first item's warm-up (100 ms) does not move the median.
    assert relative_cost([100.0, 10.0, 12.0], [30.0, 20.0, 24.0]) == pytest.approx(12 / 24)
