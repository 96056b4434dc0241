"""`sgl eval`: its shared-computation numbers equal separate engine runs per setting, counted by hand."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine.metrics import vqa
from sgl_cli.engine.io.formats import read_items

from .conftest import write_jsonl, write_preset

runner = CliRunner()


@pytest.fixture
def labelled(tmp_path, engine_factory):
    """Six shapes items whose references are the large model's own answers on items 1, 2 and 4 (random tiny
    models answer noise, so true labels would give 0 everywhere and prove nothing)."""
    from sgl_cli.engine.builtin.shapes import write_items

    src = write_items(tmp_path, 6, seed=5)
    eng = engine_factory(retain=1.0, threshold=None)
    rows = [json.loads(x) for x in src.read_text().splitlines()]
    records = eng.process(list(read_items(src)))
    for i, (row, rec) in enumerate(zip(rows, records)):
        row["answer"] = rec["answer"] if i in (0, 1, 3) else "not this"
    return write_jsonl(tmp_path / "labelled.jsonl", rows)


def _hand_accuracy(engine, items, by_type=False):
    records = engine.process(items)
    scores = [vqa(r["answer"], str(i.reference)) for r, i in zip(records, items)]
    if not by_type:
        return sum(scores) / len(scores), records
    out = {}
    for s, i in zip(scores, items):
        out.setdefault(i.type, []).append(s)
    return {k: sum(v) / len(v) for k, v in out.items()}, records


def test_eval_json_matches_separate_runs(tmp_path, tiny_pair, engine_factory, labelled):
    preset = write_preset(tmp_path, tiny_pair, max_new_tokens=5)
    res = runner.invoke(app, ["eval", str(labelled), "-p", str(preset), "--retain", "1,0.25", "--guide",
                              "sgl,cls", "--guide", "fastv", "--guide", "random", "--json", "-q", "--details",
                              str(tmp_path / "d.jsonl")])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    items = list(read_items(labelled))
    assert out["items"] == 6 and out["threshold"] is None and out["errors"] == []
    assert out["large_alone"]["accuracy"] == pytest.approx(0.5)
    assert out["large_alone"]["large_calls"] == 6
    by_setting = {(r["guide"], r["retain"]): r for r in out["results"]}
    assert set(by_setting) == {(g, r) for g in ("sgl", "cls", "fastv", "random") for r in (1.0, 0.25)}
    for (guide, retain), r in by_setting.items():
        eng = engine_factory(retain=retain, threshold=None, guide=guide)
        acc, records = _hand_accuracy(eng, items)
        per_type, _ = _hand_accuracy(eng, items, by_type=True)
        assert r["accuracy"] == pytest.approx(acc, abs=1e-4), (guide, retain)
        assert r["per_type"] == pytest.approx(per_type, abs=1e-4)
        assert r["exit_rate"] == 0 and r["large_calls"] == 6
        assert r["retained_tokens"] == pytest.approx(sum(x["retained_tokens"] for x in records) / 6, abs=0.1)
        if retain == 1.0:
            assert r["accuracy"] == pytest.approx(0.5)
    # Small alone: the small model's own answers, scored by hand.
    small = engine_factory(retain=1.0, threshold=None).process(items)
    assert out["small_alone"]["accuracy"] == pytest.approx(
        sum(vqa(r["small_answer"], str(i.reference)) for r, i in zip(small, items)) / 6, abs=1e-4)
    details = [json.loads(x) for x in (tmp_path / "d.jsonl").read_text().splitlines()]
    assert [d["line"] for d in details] == [1, 2, 3, 4, 5, 6]
    assert sum(d["large"]["correct"] for d in details) == 3


def test_eval_with_threshold_is_the_mixed_system(tmp_path, tiny_pair, engine_factory, labelled):
    preset = write_preset(tmp_path, tiny_pair, max_new_tokens=5)
    items = list(read_items(labelled))
    scores = sorted(r["exit_score"] for r in engine_factory(threshold=None).process(items))
    threshold = (scores[2] + scores[3]) / 2  # three of six items exit
    res = runner.invoke(app, ["eval", str(labelled), "-p", str(preset), "--retain", "0.5", "--guide", "sgl,random",
                              "--threshold", str(threshold), "--json", "-q"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    sgl, rnd = out["results"]
    assert sgl["exit_rate"] == pytest.approx(0.5) and sgl["large_calls"] == 3
    assert rnd["exit_rate"] == 0 and rnd["large_calls"] == 6  # only the sgl guide exits
    acc, _ = _hand_accuracy(engine_factory(retain=0.5, threshold=threshold), items)
    assert sgl["accuracy"] == pytest.approx(acc, abs=1e-4)


def test_eval_checks_the_calibrated_operating_point(tmp_path, tiny_pair, engine_factory, labelled):
    """--calibration runs the file's operating point (sgl at its retain and threshold) beside the asked settings
    and reports it next to what the file predicted; the threshold is --threshold with the file's value for the
    other sgl rows. A file made with other exit settings (max_new_tokens) is refused before any model call."""
    import yaml

    preset = write_preset(tmp_path, tiny_pair, max_new_tokens=5, retain=0.09)
    cal_path = tmp_path / "cal.yaml"
    res = runner.invoke(app, ["calibrate", str(labelled), "-p", str(preset), "--retain", "0.25", "--exit-rate",
                              "0.5", "--out", str(cal_path), "-q"])
    assert res.exit_code == 0, res.output
    cal = yaml.safe_load(cal_path.read_text())
    threshold = cal["threshold"]
    assert cal["retain"] == 0.25
    common = ["eval", str(labelled), "-p", str(preset), "--guide", "random", "--json", "-q"]
    by_file = runner.invoke(app, [*common, "--retain", "0.5", "--calibration", str(cal_path)])
    by_value = runner.invoke(app, [*common, "--guide", "sgl", "--retain", "0.5,0.25", "--threshold", repr(threshold)])
    assert by_file.exit_code == 0 and by_value.exit_code == 0, by_file.output + by_value.output
    a, b = json.loads(by_file.stdout), json.loads(by_value.stdout)
    assert a["threshold"] == pytest.approx(threshold)
    assert sorted((r["guide"], r["retain"]) for r in a["results"]) == [("random", 0.25), ("random", 0.5),
                                                                        ("sgl", 0.25), ("sgl", 0.5)]

    def key(result):
        return sorted((r["guide"], r["retain"], r["accuracy"], r["exit_rate"], r["large_calls"])
                      for r in result["results"])

    assert key(a) == key(b)
    check = a["calibration"]
    assert (check["file"], check["retain"], check["prune_layer"], check["threshold"]) == (str(cal_path), 0.25, 0,
                                                                                          threshold)
    keys = ("exit_rate", "accuracy", "relative_accuracy", "relative_compute")
    assert check["predicted"] == {k: cal["chosen"][k] for k in keys} and check["predicted_items"] == 6
    row = next(r for r in a["results"] if (r["guide"], r["retain"]) == ("sgl", 0.25))
    assert check["measured"] == {k: row[k] for k in keys} and check["measured_items"] == 6
    # The same items as the calibration: what it predicted is what it measures (timings aside).
    assert check["measured"]["exit_rate"] == pytest.approx(0.5) == check["predicted"]["exit_rate"]
    # By hand, item by item as the calibration ran them (a batch of six rounds differently in the last bits, which
    # can move an exit score that equals the threshold across it).
    engine = engine_factory(retain=0.25, threshold=threshold)
    records = [engine.process([item])[0] for item in read_items(labelled)]
    acc = sum(vqa(r["answer"], r["reference"]) for r in records) / 6
    assert check["measured"]["accuracy"] == pytest.approx(acc, abs=1e-4)
    assert check["predicted"]["accuracy"] == pytest.approx(acc, abs=1e-4)
    assert check["measured"]["relative_compute"] > 0

    table = runner.invoke(app, [*common[:-2], "-q", "--retain", "0.5", "--calibration", str(cal_path)])
    assert table.exit_code == 0, table.output
    assert "calibrated operating point" in table.stdout and "measured (these items)" in table.stdout

    (tmp_path / "other").mkdir()
    other = write_preset(tmp_path / "other", tiny_pair, max_new_tokens=3)
    bad = runner.invoke(app, [*common[:3], str(other), *common[4:], "--calibration", str(cal_path)])
    assert bad.exit_code == 2 and "made for other models or settings" in bad.output
    assert "max_new_tokens" in bad.output


def test_relative_compute_follows_the_measured_stage_times(engine_factory, labelled):
    """Each setting's compute: (small + (1 - exit rate) x its large-model time) / the large model alone's, medians
    of the times per item (the small model counts only for the guides that run it)."""
    import statistics

    from sgl_cli.engine.evaluation.evaluate import Evaluation

    items = list(read_items(labelled))
    scores = sorted(r["exit_score"] for r in engine_factory(threshold=None).process(items))
    ev = Evaluation(engine_factory(threshold=None), ["sgl", "random"], [0.5], "vqa",
                    threshold=(scores[1] + scores[2]) / 2)  # four of six items exit
    for i in range(0, 6, 2):
        ev.add_batch(items[i:i + 2])
    out = {r["guide"]: r for r in ev.result()["results"]}
    assert len(ev.small_ms) == len(ev.alone_ms) == 6
    # Paired: each item's small-model time over the large model alone's on the same item (its batch's share).
    small = statistics.median(s / a for s, a in zip(ev.small_ms, ev.alone_ms))
    sgl, rnd = ev.tallies[("sgl", 0.5)], ev.tallies[("random", 0.5)]
    assert len(sgl.large_cost) == out["sgl"]["large_calls"] == 2 and len(rnd.large_cost) == 6
    assert out["sgl"]["exit_rate"] == pytest.approx(4 / 6, abs=1e-4)
    assert out["sgl"]["relative_compute"] == pytest.approx(small + 2 / 6 * statistics.median(sgl.large_cost),
                                                           abs=1e-4)
    assert out["random"]["relative_compute"] == pytest.approx(statistics.median(rnd.large_cost), abs=1e-4)


def test_eval_table_plot_and_errors(tmp_path, tiny_pair, labelled):
    preset = write_preset(tmp_path, tiny_pair, max_new_tokens=5)
    res = runner.invoke(app, ["eval", str(labelled), "-p", str(preset), "--retain", "0.5", "--guide", "cls",
                              "--plot", str(tmp_path / "e.png"), "-q"])
    assert res.exit_code == 0, res.output
    assert "large alone" in res.stdout and "small alone" in res.stdout and "cls" in res.stdout
    from PIL import Image

    assert Image.open(tmp_path / "e.png").size[0] > 0
    bad = runner.invoke(app, ["eval", str(labelled), "-p", str(preset), "--guide", "fast"])
    assert bad.exit_code == 2 and "unknown fast" in bad.stderr
    bad = runner.invoke(app, ["eval", str(labelled), "-p", str(preset), "--retain", "0"])
    assert bad.exit_code == 2 and "not in (0, 1]" in bad.stderr
    unlabelled = write_jsonl(tmp_path / "u.jsonl", [{"image": "x.png", "question": "q"}])
    bad = runner.invoke(app, ["eval", str(unlabelled), "-p", str(preset)])
    assert bad.exit_code == 2 and "no line has an 'answer'" in bad.stderr


def test_settings_reuse_does_not_leak_between_guides(engine_factory, labelled):
    """The evaluation's engines share models; each guide's engine must leave them as it found them."""
    from sgl_cli.engine.evaluation.evaluate import evaluate

    eng = engine_factory(threshold=None)
    items = list(read_items(labelled))
    a = evaluate(eng, items, ["fastv", "cls", "sgl"], [0.25], "vqa")
    b = evaluate(eng, items, ["sgl"], [0.25], "vqa")
    assert a["results"][2]["accuracy"] == b["results"][0]["accuracy"]
    assert a["large_alone"] == {**b["large_alone"], "items_per_s": a["large_alone"]["items_per_s"]}


def test_eval_save_scores_equal_sgl_run_per_setting(tmp_path, tiny_pair, engine_factory, labelled):
    """`sgl eval --details --save-scores`: one row per item and setting, each equal (field by field) to what the
    engine alone saves at that setting, early exits included."""
    import numpy as np
    import pyarrow as pa

    from sgl_cli.engine.pipeline.record import SCORES_KEY

    items = list(read_items(labelled))
    exit_scores = sorted(r["exit_score"] for r in engine_factory(threshold=None).process(items))
    threshold = (exit_scores[2] + exit_scores[3]) / 2  # three of six exit
    preset = write_preset(tmp_path, tiny_pair, max_new_tokens=5)
    details = tmp_path / "details.jsonl"
    res = runner.invoke(app, ["eval", str(labelled), "-p", str(preset), "--retain", "1,0.25", "--guide", "sgl,cls",
                              "--threshold", str(threshold), "--json", "-q", "--details", str(details),
                              "--save-scores"])
    assert res.exit_code == 0, res.output
    assert all(SCORES_KEY not in json.loads(x) for x in details.read_text().splitlines())
    table = pa.ipc.open_stream(str(tmp_path / "details.scores.arrow")).read_all().to_pylist()
    assert [(r["line"], r["setting"]) for r in table] == [
        (line, s) for line in range(1, 7) for s in ("sgl@1", "sgl@0.25", "cls@1", "cls@0.25")]
    rows = {(r["line"], r["setting"]): r for r in table}
    exits = 0
    for guide in ("sgl", "cls"):
        for retain in (1.0, 0.25):
            eng = engine_factory(retain=retain, threshold=threshold, guide=guide)
            eng.save_scores = True
            try:
                records = eng.process(items)
            finally:
                eng.save_scores = False
            for rec in records:
                want, got = rec[SCORES_KEY], rows[(rec["line"], f"{guide}@{retain:g}")]
                exits += rec["exit"] == "small"
                assert got["kept"] == want["kept"].tolist()
                assert np.array_equal(np.asarray(got["scores"], dtype=np.float16), want["scores"])
                assert [(g["image"], g["name"], g["rows"], g["cols"], g["tokens"]) for g in got["grids"]] == [
                    (g["image"], g["name"], g["rows"], g["cols"], g["tokens"].tolist()) for g in want["grids"]]
    assert exits == 6  # three items exit at each sgl setting; only sgl exits early

    res = runner.invoke(app, ["eval", str(labelled), "-p", str(preset), "--save-scores"])
    assert res.exit_code == 2 and "--save-scores writes beside --details FILE" in res.output
