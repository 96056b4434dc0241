"""`sgl calibrate` end to end on the tiny pair and the demo task, and `sgl run --calibration`.

The tiny pair has random weights, so its answers are noise; labels are made from its own cached answers (some
items labelled with the small model's answer, some with the large model's), which gives sets with known
correctness whose table and choice are recomputed here by brute force from the cache.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import struct
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.metrics import exact
from sgl_cli.engine.guides.base import n_keep
from sgl_cli.engine.io.formats import read_items
from tests.conftest import write_jsonl, write_preset

runner = CliRunner()
N_LABELLED = 8
GRID = [0.5, 0.25]


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def no_models(monkeypatch) -> None:
    """Make any model load fail the test."""
    from sgl_cli.engine.pipeline.engine import Engine

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(Engine, "from_preset", refuse)


def count_calls(monkeypatch) -> dict[str, list]:
    """Record each model pass: the lines the small model answers, and (retain, lines) of each large-model pass
    (retain 1.0: the large model alone)."""
    from sgl_cli.engine.pipeline.engine import Engine

    seen: dict[str, list] = {"small": [], "large": []}
    small, large = Engine.small_answer, Engine.large_pass

    def small_answer(self, works):
        seen["small"] += [w.item.line for w in works]
        return small(self, works)

    def large_pass(self, works, inputs, guide=None, retain=None, max_new_tokens=None):
        seen["large"].append((retain, [w.item.line for w in works]))
        return large(self, works, inputs, guide=guide, retain=retain, max_new_tokens=max_new_tokens)

    monkeypatch.setattr(Engine, "small_answer", small_answer)
    monkeypatch.setattr(Engine, "large_pass", large_pass)
    return seen


def reset(seen: dict[str, list]) -> None:
    for calls in seen.values():
        calls.clear()


def demo_rows(folder: Path, n: int = N_LABELLED, seed: int = 5) -> list[dict]:
    """`n` fresh items of the demo task (the built-in pair's shapes), small images to keep the test fast."""
    from sgl_cli.engine.builtin.shapes import write_items

    src = write_items(folder, n, seed=seed, side=224)
    return [json.loads(x) for x in src.read_text().splitlines()]


def with_bad_lines(rows: list) -> list:
    rows = list(rows)
    rows.insert(2, {"image": rows[0]["image"], "question": "no answer here"})  # line 3
    rows.insert(5, "{not json")  # line 6
    rows.append({"image": "missing.png", "question": "where?", "answer": "x"})  # line 11: fails in the model pass
    return rows


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory, tiny_pair) -> dict:
    """One real calibration over retain 1, 0.5 and 0.25 whose cache the other tests reuse."""
    folder = tmp_path_factory.mktemp("calibrate")
    rows = demo_rows(folder)
    preset = write_preset(folder, tiny_pair)
    src = write_jsonl(folder / "labelled.jsonl", with_bad_lines(rows))
    res = runner.invoke(app, ["calibrate", str(src), "-p", str(preset), "--retain", "1,0.5", "--retain", "0.25",
                              "--exit-rate", "0.5", "-q"])
    (cache,) = folder.glob("labelled.calibration-cache-*.jsonl")
    return {"folder": folder, "rows": rows, "preset": preset, "src": src, "res": res, "cache": cache}


def merged_cache(cache: Path) -> dict[int, dict]:
    """Line -> every cached part of that item (lines of one item merge, the last one winning)."""
    out: dict[int, dict] = {}
    for r in records(cache):
        item = out.setdefault(r["line"], {"pruned": {}})
        item.update({k: v for k, v in r.items() if k != "pruned"})
        item["pruned"].update(r.get("pruned") or {})
    return out


def test_first_calibration_caches_one_pass_per_model_and_retain(calibrated, engine_factory):
    res, folder = calibrated["res"], calibrated["folder"]
    assert res.exit_code == 1, res.output  # line 11 failed; the calibration is still written
    out = folder / "labelled.calibration.yaml"
    assert res.stdout.strip() == str(out)
    assert "skipped line 6: not valid JSON" in res.stderr
    assert "skipped 1 line(s) without 'answer': 3" in res.stderr
    assert "left out line 11: image 'missing.png' not found" in res.stderr
    cached = merged_cache(calibrated["cache"])
    assert sorted(cached) == [1, 2, 4, 5, 7, 8, 9, 10, 11]
    assert cached[11]["error"] and "small" not in cached[11]

    # The shared passes give what separate engine runs give: the small model's answer and exit score, the
    # large model alone (retain 1), and the large model at each retain of the grid from the SGP ranking.
    items = [i for i in read_items(calibrated["src"]) if i.line in cached and i.line != 11]
    def one_by_one(engine):  # as the calibration ran them (batch size 1)
        return [engine.process([item])[0] for item in items]

    alone = one_by_one(engine_factory(retain=1.0))
    pruned = {r: one_by_one(engine_factory(retain=r)) for r in GRID}
    for k, item in enumerate(items):
        c = cached[item.line]
        assert c["error"] is None and c["small"]["answer"] == alone[k]["small_answer"]
        assert c["small"]["exit_score"] == alone[k]["exit_score"]
        assert c["large"]["answer"] == alone[k]["answer"]
        assert set(c["pruned"]) == {"0.5", "0.25"}
        for r in GRID:
            assert c["pruned"][str(r)]["answer"] == pruned[r][k]["answer"]
            assert c["pruned"][str(r)]["kept"] == pruned[r][k]["retained_tokens"] == n_keep(
                alone[k]["visual_tokens"], r)
        assert min(c["small"]["ms"], c["large"]["ms"], *(p["ms"] for p in c["pruned"].values())) > 0

    data = yaml.safe_load(out.read_text())
    assert data["version"] == 2 and data["n_items"] == N_LABELLED and data["metric"] == "vqa"
    assert data["target"] == {"exit_rate": 0.5} and data["retains"] == [1.0, 0.5, 0.25]
    fp = data["fingerprint"]
    assert "retain" not in fp and fp["small"].startswith("folder:") and fp["small"] != fp["large"]
    assert (fp["guide"], fp["prune_layer"], fp["consistency_retain"]) == ("sgl", 0, 0.05)
    assert (fp["prompt_suffix"], fp["max_new_tokens"]) == ("Answer with one word.", 5)
    assert data["retain"] in (1.0, 0.5, 0.25) and data["prune_layer"] == 0
    assert data["chosen"] in data["table"] and data["chosen"]["threshold"] == data["threshold"]
    assert data["chosen"]["exit_rate"] == 0.5
    scores = {c["small"]["exit_score"] for line, c in cached.items() if line != 11}
    assert len(data["table"]) == 3 * (len(scores) + 1)
    assert {r["retain"] for r in data["table"]} == {1.0, 0.5, 0.25}


def test_plot_is_a_png_of_sensible_size(calibrated):
    raw = (calibrated["folder"] / "labelled.calibration.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    assert 400 <= width <= 2000 and 300 <= height <= 2000


def brute_force(cached: dict[int, dict], labels: dict[int, str], retains: list[float]) -> list[tuple]:
    """Every (retain, threshold) row from the cache by loops: (retain, threshold, exit rate, accuracy,
    relative accuracy, relative compute)."""
    lines = sorted(labels)

    def answer(line, r):
        return cached[line]["large"]["answer"] if r == 1.0 else cached[line]["pruned"][str(r)]["answer"]

    def cost(ms) -> float:  # the median over items of a stage's time / the large model alone's on the item
        return statistics.median(ms(line) / cached[line]["large"]["ms"] for line in lines)

    small_cost = cost(lambda line: cached[line]["small"]["ms"])
    n = len(lines)
    large_acc = sum(exact(answer(line, 1.0), labels[line]) for line in lines) / n
    rows = []
    for r in retains:
        large_cost = 1.0 if r == 1.0 else cost(lambda line: cached[line]["pruned"][str(r)]["ms"])
        for t in sorted({cached[line]["small"]["exit_score"] for line in lines}) + [math.inf]:
            exits = {line: cached[line]["small"]["exit_score"] >= t for line in lines}
            acc = sum(exact(cached[line]["small"]["answer"] if exits[line] else answer(line, r), labels[line])
                      for line in lines) / n
            e = sum(exits.values()) / n
            rows.append((r, t, e, acc, acc / large_acc, small_cost + (1 - e) * large_cost))
    return rows


def test_targets_met_and_unmet_choose_from_the_table_without_model_calls(calibrated, monkeypatch):
    folder, src = calibrated["folder"], calibrated["src"]
    cached = {line: c for line, c in merged_cache(calibrated["cache"]).items() if line != 11}
    lines = sorted(cached)  # the labelled lines, in input order
    # By rank of exit score: the two most confident right by the small model, the rest by the large model alone
    # (so the large model alone scores at least 6/8, and the best relative accuracy is at most 8/6).
    ranked = sorted(lines, key=lambda line: -cached[line]["small"]["exit_score"])
    labels = {line: cached[line]["small" if rank < 2 else "large"]["answer"] for rank, line in enumerate(ranked)}
    rows = [dict(r, answer=labels[line]) for r, line in zip(calibrated["rows"], lines)]
    original = src.read_text()
    table = brute_force(cached, labels, [1.0, 0.5, 0.25])
    best = max(row[4] for row in table)
    no_models(monkeypatch)
    try:
        # Same images and questions, so the cache still holds; only the references change.
        write_jsonl(src, with_bad_lines(rows))
        for target in (round(best * 0.9, 4), round(best + 0.05, 4)):  # one the set meets, one it cannot
            out = folder / f"acc{target}.yaml"
            res = runner.invoke(app, ["calibrate", str(src), "-p", str(calibrated["preset"]), "--retain",
                                      "1,0.5,0.25", "--target-accuracy", str(target), "--metric", "exact", "--out",
                                      str(out)])
            assert res.exit_code == 1, res.output  # line 11 again, from the cache
            assert isinstance(res.exception, SystemExit)  # not the AssertionError of a model load
            assert "no model calls" in res.stderr and "chosen" in res.stderr
            data = yaml.safe_load(out.read_text())
            assert len(data["table"]) == len(table)
            for got, (r, t, e, acc, rel, compute) in zip(data["table"], table):
                assert got["retain"] == r and (got["threshold"] == t or (t == math.inf and got["exit_rate"] == 0))
                assert (got["exit_rate"], got["accuracy"], got["relative_accuracy"], got["relative_compute"]) == \
                    pytest.approx((e, acc, rel, compute), abs=2e-6)
            qualifying = [row for row in data["table"] if row["relative_accuracy"] >= target - 1e-9]
            if target < best:
                assert data["met"] is True and qualifying
                cheapest = min(row["relative_compute"] for row in qualifying)
                assert data["chosen"] in qualifying and data["chosen"]["relative_compute"] == cheapest
                assert "sgl: target" in res.stderr and "met most cheaply" in res.stderr
            else:
                assert data["met"] is False and not qualifying
                assert data["chosen"]["relative_accuracy"] == pytest.approx(best, abs=2e-6)
                assert f"sgl: warning: target {target:g} x large accuracy cannot be met; best achievable is " \
                       f"{best:.3f}" in res.stderr
            assert (data["retain"], data["threshold"]) == (data["chosen"]["retain"], data["chosen"]["threshold"])
            assert "only 8 labelled items" in res.stderr

        # --confidence: the lower bound must meet the target; still no model call.
        out = folder / "confident.yaml"
        res = runner.invoke(app, ["calibrate", str(src), "-p", str(calibrated["preset"]), "--retain", "1,0.5,0.25",
                                  "--target-accuracy", "0.5", "--confidence", "0.9", "--out", str(out), "-q"])
        data = yaml.safe_load(out.read_text())
        assert data["target"] == {"target_accuracy": 0.5, "confidence": 0.9}
        assert all("relative_accuracy_lower" in row for row in data["table"])
        qualifying = [row for row in data["table"] if row["relative_accuracy_lower"] >= 0.5 - 1e-9]
        assert data["met"] == bool(qualifying)
        if qualifying:
            assert data["chosen"]["relative_compute"] == min(row["relative_compute"] for row in qualifying)
    finally:
        src.write_text(original)


def test_run_uses_the_calibrated_retain_and_refuses_a_mismatch(calibrated, tmp_path, tiny_pair):
    folder, preset = calibrated["folder"], calibrated["preset"]
    cal = folder / "r25.yaml"  # one retain: the choice is at 0.25, the preset's retain is 0.09
    res = runner.invoke(app, ["calibrate", str(calibrated["src"]), "-p", str(preset), "--retain", "0.25",
                              "--exit-rate", "0.5", "--out", str(cal), "-q"])
    assert res.exit_code == 1, res.output
    data = yaml.safe_load(cal.read_text())
    threshold = data["threshold"]
    assert data["retain"] == 0.25
    src = write_jsonl(tmp_path / "batch.jsonl", [{k: (str(folder / v) if k == "image" else v) for k, v in r.items()}
                                                 for r in calibrated["rows"]])

    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "--calibration", str(cal), "--max-new-tokens", "4"])
    assert res.exit_code == 2
    assert "was made for other settings: max_new_tokens (calibrated 5, this run 4)" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1

    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "--calibration", str(cal)])
    assert res.exit_code == 0, res.output
    assert f"retain 0.25 and threshold {threshold:.6g} from the calibration" in res.stderr
    recs = records(tmp_path / "batch.sgl.jsonl")
    assert all((r["exit"] == "small") == (r["exit_score"] >= threshold) for r in recs)
    large = [r for r in recs if r["exit"] == "large"]
    assert large and all(r["retained_tokens"] == n_keep(r["visual_tokens"], 0.25) for r in large)
    saved = yaml.safe_load((tmp_path / "batch.sgl.preset.yaml").read_text())
    assert (saved["retain"], saved["threshold"]) == (0.25, threshold)

    # An explicit --retain wins, and says what the file measured there (nothing, here).
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "--calibration", str(cal), "--retain", "0.5",
                              "-o", str(tmp_path / "r.jsonl")])
    assert res.exit_code == 0, res.output
    assert f"--retain 0.5 overrides the retain 0.25 of the calibration {cal}, which measured no accuracy at retain " \
           "0.5 (it covers 0.25)" in res.stderr
    assert all(r["retained_tokens"] == n_keep(r["visual_tokens"], 0.5)
               for r in records(tmp_path / "r.jsonl") if r["exit"] == "large")

    # A preset's calibration resolves relative to the preset file; --threshold overrides it, the retain stays.
    with_cal = tmp_path / "presets"
    with_cal.mkdir()
    shutil.copy(cal, with_cal / "cal.yaml")
    named = write_preset(with_cal, tiny_pair, calibration="cal.yaml")
    res = runner.invoke(app, ["run", str(src), "-p", str(named), "--overwrite", "-o", str(tmp_path / "a.jsonl")])
    assert res.exit_code == 0, res.output
    saved = yaml.safe_load((tmp_path / "a.preset.yaml").read_text())
    assert (saved["retain"], saved["threshold"]) == (0.25, threshold)
    res = runner.invoke(app, ["run", str(src), "-p", str(named), "--threshold", "0", "-q",
                              "-o", str(tmp_path / "b.jsonl")])
    assert res.exit_code == 0, res.output
    assert "--threshold 0 overrides the threshold" in res.stderr
    assert all(r["exit"] == "small" for r in records(tmp_path / "b.jsonl"))
    assert yaml.safe_load((tmp_path / "b.preset.yaml").read_text())["retain"] == 0.25


def test_model_mismatch_names_the_model(calibrated, tmp_path, tiny_pair, monkeypatch):
    """Another large model (here: the same weights with another config) is refused before any model loads."""
    other = tmp_path / "other-large"
    shutil.copytree(tiny_pair["large"], other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-6
    (other / "config.json").write_text(json.dumps(config))
    changed = write_preset(tmp_path, {"small": tiny_pair["small"], "large": other})
    image = calibrated["folder"] / calibrated["rows"][0]["image"]
    src = write_jsonl(tmp_path / "b.jsonl", [{"image": str(image), "question": "q?"}])
    no_models(monkeypatch)
    res = runner.invoke(app, ["run", str(src), "-p", str(changed), "--calibration",
                              str(calibrated["folder"] / "labelled.calibration.yaml")])
    assert res.exit_code == 2
    assert "other settings: large (calibrated 'folder:" in res.stderr and "small (" not in res.stderr


def test_the_cache_runs_only_what_it_lacks(tmp_path, tiny_pair, engine_factory, monkeypatch):
    """Counted model passes: an interrupted calibration continues; a retain added later runs only the large
    model at it (from the cached ranking); an edited item is recomputed alone; --rerun recomputes all."""
    rows = demo_rows(tmp_path, n=4, seed=7)
    preset = write_preset(tmp_path, tiny_pair)
    src = write_jsonl(tmp_path / "l.jsonl", rows)
    args = ["calibrate", str(src), "-p", str(preset), "--target-accuracy", "0.9", "-q"]
    seen = count_calls(monkeypatch)
    assert runner.invoke(app, [*args, "--retain", "0.5"]).exit_code == 0
    assert seen["small"] == [1, 2, 3, 4]
    # Batch size 1: per item the large model alone, then at retain 0.5.
    assert seen["large"] == [call for n in (1, 2, 3, 4) for call in ((1.0, [n]), (0.5, [n]))]
    first = yaml.safe_load((tmp_path / "l.calibration.yaml").read_text())
    (cache,) = tmp_path.glob("l.calibration-cache-*.jsonl")
    full = cache.read_text().splitlines(keepends=True)
    cache.write_text(full[0] + full[1][: len(full[1]) // 2])  # killed while writing the second record

    reset(seen)
    assert runner.invoke(app, [*args, "--retain", "0.5"]).exit_code == 0
    assert seen["small"] == [2, 3, 4] and {lines[0] for _, lines in seen["large"]} == {2, 3, 4}
    assert [r["line"] for r in records(cache)] == [1, 2, 3, 4]
    again = yaml.safe_load((tmp_path / "l.calibration.yaml").read_text())
    assert (again["retain"], again["threshold"]) == (first["retain"], first["threshold"])

    # Another retain: only the large model at it, for every item; nothing for the cached ones.
    reset(seen)
    assert runner.invoke(app, [*args, "--retain", "0.5,0.2"]).exit_code == 0
    assert seen["small"] == [] and seen["large"] == [(0.2, [n]) for n in (1, 2, 3, 4)]
    cached = merged_cache(cache)
    pruned = [engine_factory(retain=0.2).process([item])[0] for item in read_items(src)]
    assert [cached[n]["pruned"]["0.2"]["answer"] for n in (1, 2, 3, 4)] == [r["answer"] for r in pruned]
    data = yaml.safe_load((tmp_path / "l.calibration.yaml").read_text())
    assert data["retains"] == [0.5, 0.2] and {r["retain"] for r in data["table"]} == {0.5, 0.2}

    # Another target, metric or confidence: nothing runs.
    reset(seen)
    for extra in (["--metric", "contains"], ["--confidence", "0.95"], ["--retain", "0.2"]):
        assert runner.invoke(app, [*args, "--retain", "0.5", *extra]).exit_code == 0
    assert seen == {"small": [], "large": []}

    # An edited item: that one, every pass.
    rows[2]["question"] = "What shape is blue?"
    write_jsonl(src, rows)
    assert runner.invoke(app, [*args, "--retain", "0.5,0.2"]).exit_code == 0
    assert seen["small"] == [3] and sorted(r for r, _ in seen["large"]) == [0.2, 0.5, 1.0]
    assert all(lines == [3] for _, lines in seen["large"])

    # A pass that fails (here: the large model at a retain added later) leaves the item out and keeps its good
    # parts; a cached run does not retry it; --retry-failed runs only what it lacks, once.
    from sgl_cli.engine.evaluation.compare import Comparison

    original = Comparison.batch

    def flaky(self, items, **kwargs):
        if any(i.line == 2 for i in items) and kwargs.get("small") is not None:
            raise RuntimeError("CUDA out of memory")
        return original(self, items, **kwargs)

    monkeypatch.setattr(Comparison, "batch", flaky)
    reset(seen)
    res = runner.invoke(app, [*args, "--retain", "0.5,0.2,0.1"])
    assert res.exit_code == 1 and "left out line 2: model pass failed: RuntimeError: CUDA out of memory" in res.stderr
    assert "--retry-failed" in res.stderr
    assert seen["small"] == [] and sorted(lines[0] for _, lines in seen["large"]) == [1, 3, 4]
    assert merged_cache(cache)[2]["small"] and merged_cache(cache)[2]["error"]
    reset(seen)
    assert runner.invoke(app, [*args, "--retain", "0.5,0.2,0.1"]).exit_code == 1
    assert seen == {"small": [], "large": []}
    monkeypatch.setattr(Comparison, "batch", original)
    assert runner.invoke(app, [*args, "--retain", "0.5,0.2,0.1", "--retry-failed"]).exit_code == 0
    assert seen == {"small": [], "large": [(0.1, [2])]}
    assert merged_cache(cache)[2]["error"] is None
    assert runner.invoke(app, [*args, "--retain", "0.5,0.2,0.1"]).exit_code == 0

    # A retain timed in another session, at another batch size: the choice says its costs mix conditions.
    assert "measured under different conditions" not in runner.invoke(app, [*args, "--retain", "0.5,0.2,0.1"]).stderr
    res = runner.invoke(app, [*args, "--retain", "0.5,0.2,0.1,0.05", "--batch-size", "2"])
    assert res.exit_code == 0 and "sgl: warning: the cache's stage times were measured under different conditions" \
        in res.stderr and "batch_size 1" in res.stderr and "batch_size 2" in res.stderr

    reset(seen)
    assert runner.invoke(app, [*args, "--retain", "0.5", "--rerun"]).exit_code == 0
    assert seen["small"] == [1, 2, 3, 4] and len(records(cache)) == 4
    assert "measured under different conditions" not in runner.invoke(app, [*args, "--retain", "0.5"]).stderr


def test_batches_give_the_answers_of_one_item_at_a_time(tmp_path, tiny_pair, engine_factory):
    """Batches of 3 over 4 items (so one short batch), first computed and then from cached small passes."""
    src = write_jsonl(tmp_path / "l.jsonl", demo_rows(tmp_path, n=4, seed=9))
    args = ["calibrate", str(src), "-p", str(write_preset(tmp_path, tiny_pair)), "--exit-rate", "0.5", "-q",
            "--batch-size", "3"]
    assert runner.invoke(app, [*args, "--retain", "0.5"]).exit_code == 0
    assert runner.invoke(app, [*args, "--retain", "0.5,0.2"]).exit_code == 0
    (cache,) = tmp_path.glob("l.calibration-cache-*.jsonl")
    cached = merged_cache(cache)
    items = list(read_items(src))
    for retain in (1.0, 0.5, 0.2):
        engine = engine_factory(retain=retain)
        for item in items:
            rec = engine.process([item])[0]
            c = cached[item.line]
            assert c["small"]["answer"] == rec["small_answer"]
            assert c["small"]["exit_score"] == pytest.approx(rec["exit_score"], rel=1e-6)
            assert (c["large"] if retain == 1.0 else c["pruned"][str(retain)])["answer"] == rec["answer"]


@pytest.mark.parametrize("extra, message", [
    ([], "give exactly one of --target-accuracy or --exit-rate"),
    (["--target-accuracy", "0.9", "--exit-rate", "0.3"], "exactly one"),
    (["--target-accuracy", "3"], "--target-accuracy is a fraction of the large model's accuracy"),
    (["--exit-rate", "1.5"], "--exit-rate must be in [0, 1]"),
    (["--exit-rate", "0.5", "--metric", "bleu"], "unknown metric 'bleu'; known metrics: contains, exact, vqa"),
    (["--exit-rate", "0.5", "--retain", "0"], "--retain: retain 0 is not in (0, 1]"),
    (["--exit-rate", "0.5", "--retain", "most"], "--retain: retain 'most' is neither a number nor auto"),
    (["--exit-rate", "0.5", "--confidence", "0.9"], "--confidence applies to --target-accuracy"),
    (["--target-accuracy", "0.9", "--confidence", "1.5"], "--confidence must be in [0.5, 1)"),
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
