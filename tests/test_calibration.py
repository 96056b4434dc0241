import math
import random
import struct

import pytest
import yaml

from sgl_cli.engine.calibration import VERSION, load_calibration
from sgl_cli.engine.evaluation.calibration_file import save_calibration, to_yaml_dict
from sgl_cli.engine.evaluation.operating_points import Costs, Outcome, choose, operating_points
from sgl_cli.engine.evaluation.retains import parse_retains
from sgl_cli.engine.calibration import (
    apply_calibration,
    calibration_fingerprint,
    calibration_point,
    fingerprint,
    fingerprint_differences,
    model_fingerprint,
)
from sgl_cli.engine.evaluation.operating_points import bootstrap_counts
from sgl_cli.engine.preset import ModelSpec, Preset, Settings
from sgl_cli.engine.evaluation.plots import plot_calibration

# Ten items; the large model alone is always right (large accuracy 1.0, so relative accuracy equals accuracy),
# and so is the large model at retain 0.5; at retain 0.1 it gets the two least confident items wrong. Scores with
# the small model's correctness, highest first (note the tie at 0.8):
#   0.95 1 | 0.9 1 | 0.8 1 | 0.8 0 | 0.7 1 | 0.6 1 | 0.5 0 | 0.4 1 | 0.3 0 | 0.2 0
SMALL = {0.95: 1, 0.9: 1, 0.7: 1, 0.6: 1, 0.5: 0, 0.4: 1, 0.3: 0, 0.2: 0}
RETAINS = [1.0, 0.5, 0.1]


def _outcome(score, small):
    return Outcome(score, small, 1.0, {0.5: 1.0, 0.1: 0.0 if score < 0.35 else 1.0})


OUTCOMES = [_outcome(s, c) for s, c in SMALL.items()] + [_outcome(0.8, 1.0), _outcome(0.8, 0.0)]
# Per threshold t: exited = score >= t, accuracy = (small right among exited + large right among the rest) / 10.
#   t     exits  small right  retain 1 and 0.5   retain 0.1 (0.3 and 0.2 wrong when kept)
#   0.2   10     6            0.6                0.6
#   0.3    9     6            0.7                0.6
#   0.4    8     6            0.8                0.6
#   0.5    7     5            0.8                0.6
#   0.6    6     5            0.9                0.7
#   0.7    5     4            0.9                0.7
#   0.8    4     3            0.9                0.7
#   0.9    2     2            1.0                0.8
#   0.95   1     1            1.0                0.8
#   >0.95  0     0            1.0                0.8
TABLE = [(0.2, 10, 0.6, 0.6), (0.3, 9, 0.7, 0.6), (0.4, 8, 0.8, 0.6), (0.5, 7, 0.8, 0.6), (0.6, 6, 0.9, 0.7),
         (0.7, 5, 0.9, 0.7), (0.8, 4, 0.9, 0.7), (0.9, 2, 1.0, 0.8), (0.95, 1, 1.0, 0.8)]
# Per item: the small pass 0.1, the large model alone 1.0, at retain 0.5 0.6 and at retain 0.1 0.05.
COSTS = Costs(small=0.1, large=1.0, pruned={0.5: 0.6, 0.1: 0.05})


def test_operating_points_table():
    points = operating_points(OUTCOMES, COSTS, RETAINS)
    assert [p.retain for p in points] == [1.0] * 10 + [0.5] * 10 + [0.1] * 10
    for retain, cost in ((1.0, 1.0), (0.5, 0.6), (0.1, 0.05)):
        rows = [p for p in points if p.retain == retain]
        for p, (t, n_exit, acc, acc_01) in zip(rows, TABLE):
            expected = acc_01 if retain == 0.1 else acc
            assert (p.threshold, p.n_exit) == (t, n_exit)
            assert p.exit_rate == pytest.approx(n_exit / 10)
            assert p.accuracy == pytest.approx(expected) and p.relative_accuracy == pytest.approx(expected)
            # the small pass on every item, the large model at this retain on the others
            assert p.relative_compute == pytest.approx(0.1 + (1 - n_exit / 10) * cost)
            assert p.relative_accuracy_lower is None
        top = rows[-1]  # exits nobody: just above the highest score, finite
        assert 0.95 < top.threshold < 0.95 + 1e-9
        assert (top.n_exit, top.relative_compute) == (0, pytest.approx(0.1 + cost))
    # The large model alone, exactly: retain 1, nothing exits.
    assert points[9].accuracy == 1.0 and points[9].relative_accuracy == 1.0


def test_order_of_outcomes_does_not_matter():
    assert operating_points(OUTCOMES[::-1], COSTS, RETAINS) == operating_points(OUTCOMES, COSTS, RETAINS)


def test_points_hold_plain_python_numbers():
    p = operating_points(OUTCOMES, COSTS, RETAINS)[0]
    assert all(type(getattr(p, f)) is float for f in
               ("retain", "threshold", "exit_rate", "accuracy", "relative_accuracy", "relative_compute"))
    assert type(p.n_exit) is int


def test_relative_accuracy_uses_the_large_model_alone():
    # large alone right on 2 of 4 items (0.5); exiting the top item (small right where large was wrong) gives
    # accuracy 3/4 -> relative 1.5. Pruned at 0.5 the large model is right on one item only.
    outcomes = [Outcome(0.9, 1, 0, {0.5: 0}), Outcome(0.5, 0, 1, {0.5: 1}), Outcome(0.4, 0, 1, {0.5: 0}),
                Outcome(0.1, 0, 0, {0.5: 0})]
    points = operating_points(outcomes, COSTS, [1.0, 0.5])
    assert (points[3].threshold, points[3].accuracy, points[3].relative_accuracy) == (0.9, 0.75, 1.5)
    assert (points[8].threshold, points[8].accuracy, points[8].relative_accuracy) == (0.9, 0.5, 1.0)
    choice = choose(outcomes, COSTS, [1.0, 0.5], target_accuracy=1.2)
    assert choice.met and (choice.point.retain, choice.point.threshold) == (1.0, 0.9)


def test_large_accuracy_zero():
    # Undefined ratio: 1.0 when the mixed system is also always wrong, else the cap 2.0.
    points = operating_points([Outcome(0.9, 1, 0), Outcome(0.1, 0, 0)], COSTS, [1.0])
    assert [p.relative_accuracy for p in points] == [2.0, 2.0, 1.0]


@pytest.mark.parametrize("target, retain, threshold, exit_rate, accuracy, compute", [
    (1.0, 0.5, 0.9, 0.2, 1.0, 0.1 + 0.8 * 0.6),   # retain 1 reaches it too, at 0.9
    (0.9, 0.5, 0.6, 0.6, 0.9, 0.1 + 0.4 * 0.6),   # retain 0.1 never does; retain 1: 0.5
    (0.8, 0.1, 0.9, 0.2, 0.8, 0.1 + 0.8 * 0.05),  # retain 0.5 at 0.4: 0.22; retain 1 at 0.4: 0.3
    (0.7, 0.1, 0.6, 0.6, 0.7, 0.1 + 0.4 * 0.05),  # retain 0.5 at 0.3: 0.16
])
def test_choose_the_cheapest_point_that_meets_the_target(target, retain, threshold, exit_rate, accuracy, compute):
    choice = choose(OUTCOMES, COSTS, RETAINS, target_accuracy=target)
    p = choice.point
    assert choice.met and (p.retain, p.threshold) == (retain, threshold)
    assert (p.exit_rate, p.accuracy, p.relative_compute) == pytest.approx((exit_rate, accuracy, compute))
    assert choice.target == {"target_accuracy": target} and choice.n_items == 10
    assert p in choice.points and choice.best[retain] == p
    assert f"met most cheaply at retain {retain:g}, threshold {threshold:g}" in choice.message


def test_best_point_per_retain():
    best = choose(OUTCOMES, COSTS, RETAINS, target_accuracy=0.9).best
    assert [(r, p.threshold) for r, p in best.items()] == [(1.0, 0.6), (0.5, 0.6), (0.1, 0.9)]
    # Retain 0.1 cannot meet 0.9: its best is its most accurate point, the cheapest of those (exit rate 20%).
    assert best[0.1].relative_accuracy == pytest.approx(0.8)


def test_unmeetable_accuracy_target_takes_the_best_achievable():
    choice = choose(OUTCOMES, COSTS, RETAINS, target_accuracy=1.2)
    assert not choice.met
    # Relative accuracy 1.0 is the best (retains 1 and 0.5, threshold 0.9 or above); the cheapest of those.
    assert (choice.point.retain, choice.point.threshold, choice.point.relative_accuracy) == (0.5, 0.9, 1.0)
    assert "cannot be met; best achievable is 1.000 at retain 0.5" in choice.message


def test_choose_for_exit_rate_takes_the_most_accurate_retain():
    choice = choose(OUTCOMES, COSTS, RETAINS, exit_rate=0.4)
    # Threshold 0.8 exits 4 at every retain; accuracy 0.9 at retains 1 and 0.5 (0.7 at 0.1): 0.5 is cheaper.
    assert choice.met and (choice.point.retain, choice.point.threshold) == (0.5, 0.8)
    assert choice.point.exit_rate == pytest.approx(0.4) and choice.point.accuracy == pytest.approx(0.9)
    assert [p.threshold for p in choice.best.values()] == [0.8, 0.8, 0.8]
    assert choice.target == {"exit_rate": 0.4}
    # 0.3 would need 3 exits, but the tie at 0.8 jumps from 2 to 4: the highest below is 0.2.
    choice = choose(OUTCOMES, COSTS, RETAINS, exit_rate=0.3)
    assert not choice.met and choice.point.threshold == 0.9 and "tied" in choice.message
    assert choose(OUTCOMES, COSTS, RETAINS, exit_rate=0.25).met
    choice = choose(OUTCOMES, COSTS, RETAINS, exit_rate=0.58)
    assert choice.met and choice.point.n_exit == 5 and "as closely as 10 items allow" in choice.message
    assert choose(OUTCOMES, COSTS, RETAINS, exit_rate=0.0).point.n_exit == 0
    assert choose(OUTCOMES, COSTS, [0.1], exit_rate=1.0).point.threshold == 0.2


def _brute_points(outcomes, costs, retains):
    """Every (retain, threshold) row by loops, as a user would tabulate them."""
    n = len(outcomes)
    large = sum(o.large_correct for o in outcomes) / n
    thresholds = sorted({o.exit_score for o in outcomes}) + [math.inf]
    rows = []
    for r in retains:
        for t in thresholds:
            exits = [o.exit_score >= t for o in outcomes]
            acc = sum(o.small_correct if e else o.at(r) for o, e in zip(outcomes, exits)) / n
            e = sum(exits) / n
            rows.append((r, t, e, acc, acc / large, (costs.small + (1 - e) * costs.at(r)) / costs.large))
    return rows


def test_the_choice_is_the_cheapest_qualifying_row_of_a_random_table():
    rng = random.Random(3)
    retains = [1.0, 0.4, 0.2, 0.05]
    outcomes = []
    for _ in range(40):
        s = round(rng.random(), 2)  # rounded: ties
        outcomes.append(Outcome(s, float(rng.random() < s), float(rng.random() < 0.9),
                                {r: float(rng.random() < 0.7 + r / 4) for r in retains[1:]}))
    costs = Costs(0.2, 1.0, {0.4: 0.5, 0.2: 0.3, 0.05: 0.2})
    rows = _brute_points(outcomes, costs, retains)
    points = operating_points(outcomes, costs, retains)
    assert len(points) == len(rows)
    for p, (r, t, e, acc, rel, compute) in zip(points, rows):
        assert p.retain == r and (p.threshold == t or (t == math.inf and p.n_exit == 0))
        assert (p.exit_rate, p.accuracy, p.relative_accuracy, p.relative_compute) == pytest.approx((e, acc, rel,
                                                                                                   compute))
    for target in (0.85, 0.95, 1.0, 1.05):
        qualifying = [row for row in rows if row[4] >= target - 1e-12]
        choice = choose(outcomes, costs, retains, target_accuracy=target)
        if qualifying:
            cheapest = min(row[5] for row in qualifying)
            assert choice.met and choice.point.relative_compute == pytest.approx(cheapest)
            assert choice.point.relative_accuracy >= target - 1e-12
        else:
            assert not choice.met
            assert choice.point.relative_accuracy == pytest.approx(max(row[4] for row in rows))


def test_confidence_uses_the_bootstrap_lower_bound():
    rng = random.Random(5)
    outcomes = [Outcome(s := rng.random(), float(rng.random() < s), float(rng.random() < 0.85),
                        {0.2: float(rng.random() < 0.8)}) for _ in range(30)]
    costs = Costs(0.2, 1.0, {0.2: 0.3})
    points = operating_points(outcomes, costs, [1.0, 0.2], confidence=0.9, n_boot=200, seed=4)
    # The same resamples by hand: items in ascending score order, each resample's mixed and large accuracy.
    items = sorted(outcomes, key=lambda o: o.exit_score)
    counts = bootstrap_counts(len(items), 200, 4)
    for p in points[::7]:
        rel = []
        for w in counts:
            mixed = sum(c * (o.small_correct if o.exit_score >= p.threshold else o.at(p.retain))
                        for c, o in zip(w, items))
            large = sum(c * o.large_correct for c, o in zip(w, items))
            rel.append(mixed / large)
        rel.sort()
        # numpy's default quantile: linear between order statistics
        k = 0.1 * (len(rel) - 1)
        expected = rel[int(k)] + (k - int(k)) * (rel[int(k) + 1] - rel[int(k)])
        assert p.relative_accuracy_lower == pytest.approx(expected)
        assert p.relative_accuracy_lower <= p.relative_accuracy + 1e-12
    plain = choose(outcomes, costs, [1.0, 0.2], target_accuracy=0.95)
    strict = choose(outcomes, costs, [1.0, 0.2], target_accuracy=0.95, confidence=0.9, n_boot=200, seed=4)
    assert strict.target == {"target_accuracy": 0.95, "confidence": 0.9}
    assert strict.met and strict.point.relative_accuracy_lower >= 0.95
    qualifying = [p for p in strict.points if p.relative_accuracy_lower >= 0.95]
    assert strict.point.relative_compute == min(p.relative_compute for p in qualifying)
    assert strict.point.relative_compute >= plain.point.relative_compute


def test_bootstrap_interval():
    a = choose(OUTCOMES, COSTS, RETAINS, target_accuracy=0.9)
    b = choose(OUTCOMES, COSTS, RETAINS, target_accuracy=0.9)
    lo, hi = a.interval
    assert lo <= a.point.accuracy <= hi and 0.0 <= lo < hi <= 1.0
    assert a.interval == b.interval  # seeded
    # 100 items at accuracy 0.9: standard error sqrt(0.9 * 0.1 / 100) = 0.03, so a 95% interval is about
    # 2 * 1.96 * 0.03 = 0.118 wide (min..max would be ~0.2)
    lo, hi = choose(OUTCOMES * 10, COSTS, RETAINS, target_accuracy=0.9).interval
    assert lo < 0.9 < hi and 0.09 < hi - lo < 0.15
    # all correct at the chosen point: no spread
    assert choose(OUTCOMES, COSTS, RETAINS, target_accuracy=1.0).interval == (1.0, 1.0)


@pytest.mark.parametrize("kwargs, match", [
    ({}, "exactly one"),
    ({"target_accuracy": 0.9, "exit_rate": 0.5}, "exactly one"),
    ({"target_accuracy": 0.0}, "target_accuracy"),
    ({"target_accuracy": 2.5}, "target_accuracy"),
    ({"exit_rate": 1.5}, "exit_rate"),
    ({"exit_rate": -0.1}, "exit_rate"),
    ({"target_accuracy": 0.9, "confidence": 1.0}, "confidence"),
])
def test_choose_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose(OUTCOMES, COSTS, RETAINS, **kwargs)


def test_no_items_and_missing_answers():
    with pytest.raises(ValueError, match="no labelled items"):
        choose([], COSTS, RETAINS, target_accuracy=0.9)
    with pytest.raises(ValueError, match="no answer of the large model at retain 0.25"):
        operating_points(OUTCOMES, Costs(0.1, 1.0, {0.25: 0.5}), [0.25])


def test_outcome_and_costs_validation():
    with pytest.raises(ValueError, match="small_correct"):
        Outcome(0.5, 1.5, 1.0)
    with pytest.raises(ValueError, match=r"pruned_correct\[0.5\]"):
        Outcome(0.5, 1.0, 1.0, {0.5: 2.0})
    with pytest.raises(ValueError, match="exit_score"):
        Outcome(math.nan, 1.0, 1.0)
    with pytest.raises(ValueError, match="large model's time"):
        Costs(0.1, 0.0)


def test_paired_costs_are_medians_of_per_item_ratios():
    # The machine slows down twofold for the last two items: ratios to the large model alone on the same item
    # do not move, medians of the raw times would (small 10/20 = 0.5 -> median 15 / median 30 = 0.5 here, but
    # the pruned stage's raw median would sit between regimes).
    large = [20.0, 20.0, 20.0, 40.0, 40.0]
    costs = Costs.paired([10.0, 10.0, 11.0, 20.0, 20.0], large, {0.5: [12.0, 13.0, 12.0, 24.0, 24.0]})
    assert costs.large == 1.0
    assert costs.small == pytest.approx(0.5)  # ratios 0.5, 0.5, 0.55, 0.5, 0.5
    assert costs.at(0.5) == pytest.approx(0.6)  # ratios 0.6, 0.65, 0.6, 0.6, 0.6
    assert costs.relative(0.5, 0.25) == pytest.approx(0.5 + 0.75 * 0.6)
    assert costs.at(1.0) == 1.0


def test_parse_retains():
    assert parse_retains(["auto"]) == [1.0, 0.5, 0.25, 0.15, 0.09, 0.05, 0.03]
    assert parse_retains(["0.09", 0.5, "0.5", "1"]) == [1.0, 0.5, 0.09]
    for bad, match in (("0", "not in"), ("1.5", "not in"), ("half", "neither a number nor auto")):
        with pytest.raises(ValueError, match=match):
            parse_retains([bad])


def _write_calibration(tmp_path, target=0.9, fp=None):
    choice = choose(OUTCOMES, COSTS, RETAINS, target_accuracy=target)
    data = to_yaml_dict(choice, metric="vqa", fingerprint=fp or {"small": "s-model", "large": "l-model"},
                        prune_layer=0, costs=COSTS, retains=RETAINS)
    path = tmp_path / "calibration.yaml"
    save_calibration(data, path)
    return path, data


def test_file_round_trip(tmp_path):
    path, data = _write_calibration(tmp_path, target=1.2)
    text = path.read_text()
    assert text.startswith("# sgl calibration")
    # one table row per line
    assert "\n- {retain: 0.1, threshold: 0.2, exit_rate: 1.0, accuracy: 0.6, relative_accuracy: 0.6, " in text
    loaded = load_calibration(path)
    assert loaded == data
    assert loaded["version"] == VERSION == 2 and loaded["met"] is False
    assert (loaded["retain"], loaded["threshold"], loaded["prune_layer"]) == (0.5, 0.9, 0)
    assert loaded["chosen"] == {"retain": 0.5, "threshold": 0.9, "exit_rate": 0.2, "accuracy": 1.0,
                                "relative_accuracy": 1.0, "relative_compute": 0.58}
    assert loaded["chosen"] in loaded["table"] and len(loaded["table"]) == 30
    assert loaded["stage_cost"] == {"small": 0.1, "pruned": {1.0: 1.0, 0.5: 0.6, 0.1: 0.05}}
    assert "stage_ms" not in loaded  # only when given
    assert loaded["retains"] == RETAINS and loaded["large_accuracy"] == 1.0 and loaded["small_accuracy"] == 0.6
    assert loaded["accuracy_interval"][0] <= loaded["chosen"]["accuracy"] <= loaded["accuracy_interval"][1]
    # the exit-nobody threshold survives unrounded, still above the highest score
    assert 0.95 < loaded["table"][9]["threshold"] < 0.95 + 1e-9


def test_a_large_set_writes_a_bounded_table_that_keeps_the_choice(tmp_path):
    """20,000 distinct exit scores are 60,003 candidate rows; the file keeps per retain the rows nearest each
    whole percent of exit rate and the chosen threshold, and is read back within the settings-file bounds."""
    rng = random.Random(5)
    retains = [1.0, 0.5, 0.1]
    outcomes = [Outcome(s := rng.random(), float(rng.random() < s), float(rng.random() < 0.9),
                        {0.5: float(rng.random() < 0.85), 0.1: float(rng.random() < 0.7)}) for _ in range(20_000)]
    costs = Costs(0.2, 1.0, {0.5: 0.6, 0.1: 0.3})
    choice = choose(outcomes, costs, retains, target_accuracy=0.97)
    assert len(choice.points) == 3 * 20_001
    data = to_yaml_dict(choice, metric="vqa", fingerprint={"small": "s", "large": "l"}, prune_layer=0,
                        costs=costs, retains=retains)
    path = tmp_path / "calibration.yaml"
    save_calibration(data, path)
    loaded = load_calibration(path)
    table = loaded["table"]
    assert len(table) <= 3 * 102 and loaded["chosen"] in table
    for r in retains:
        rows = [t for t in table if t["retain"] == r]
        assert [t["threshold"] for t in rows] == sorted(t["threshold"] for t in rows)
        rates = sorted(t["exit_rate"] for t in rows)
        assert rates[0] == 0.0 and rates[-1] == 1.0 and max(b - a for a, b in zip(rates, rates[1:])) <= 0.0101
        assert any(t["threshold"] == loaded["threshold"] for t in rows)  # what an explicit --retain R reports
    # every kept row is the computed point, not an approximation
    full = {(p.retain, p.threshold): p for p in choice.points}
    for t in table:
        assert full[t["retain"], t["threshold"]].relative_compute == pytest.approx(t["relative_compute"], abs=1e-6)


def test_version_1_files_are_read(tmp_path):
    path = tmp_path / "v1.yaml"
    path.write_text(yaml.safe_dump({
        "version": 1, "threshold": 0.64, "target": {"target_accuracy": 0.99}, "met": True, "metric": "vqa",
        "n_items": 500, "exit_rate": 0.832, "accuracy": 0.914, "relative_accuracy": 0.991,
        "relative_compute": 0.31, "fingerprint": {"small": "s", "retain": 0.09, "prune_layer": 0}}))
    loaded = load_calibration(path)
    assert "retain" not in loaded  # a version-1 file gives no retain: it is valid for its fingerprint's only
    assert loaded["chosen"] == {"retain": 0.09, "threshold": 0.64, "exit_rate": 0.832, "accuracy": 0.914,
                                "relative_accuracy": 0.991, "relative_compute": 0.31}


@pytest.mark.parametrize("edit, key", [
    (lambda d: d.pop("threshold"), "threshold"),
    (lambda d: d.pop("fingerprint"), "fingerprint"),
    (lambda d: d.update(threshold="high"), "threshold"),
    (lambda d: d.update(metric="bleu"), "metric"),
    (lambda d: d.update(version=3), "version"),
    (lambda d: d.update(retain=0), "retain"),
    (lambda d: d.update(prune_layer=-1), "prune_layer"),
])
def test_load_calibration_errors(tmp_path, edit, key):
    path, data = _write_calibration(tmp_path)
    edit(data)
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError) as err:
        load_calibration(path)
    assert str(path) in str(err.value) and key in str(err.value)


def test_load_calibration_not_a_mapping(tmp_path):
    path = tmp_path / "cal.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="cal.yaml"):
        load_calibration(path)


def test_plot_writes_png(tmp_path):
    for kwargs in ({"target_accuracy": 0.9}, {"target_accuracy": 0.9, "confidence": 0.9}, {"exit_rate": 0.5}):
        path = tmp_path / "calibration.png"
        plot_calibration(choose(OUTCOMES, COSTS, RETAINS, **kwargs), path, title="calibration test")
        raw = path.read_bytes()
        assert raw[:8] == b"\x89PNG\r\n\x1a\n"
        # first chunk is IHDR: length (4), type (4), then width and height, big-endian
        assert raw[12:16] == b"IHDR"
        width, height = struct.unpack(">II", raw[16:24])
        assert 400 <= width <= 2000 and 300 <= height <= 2000


# -- applying a file to a run ------------------------------------------------------------------------------------
PRESET = Preset("p", ModelSpec("org/small"), ModelSpec("org/large"), Settings(retain=0.2, threshold=0.5))


def test_a_file_gives_its_retain_and_threshold_and_explicit_settings_win(tmp_path):
    path, data = _write_calibration(tmp_path, fp=calibration_fingerprint(PRESET))  # retain 0.5, threshold 0.6
    notes, warnings = [], []
    applied = apply_calibration(PRESET, path, notify=notes.append, warn=warnings.append)
    assert (applied.settings.retain, applied.settings.threshold) == (0.5, 0.6) and not warnings
    assert notes == [f"retain 0.5 and threshold 0.6 from the calibration {path} (target_accuracy 0.9, 10 items)"]
    assert apply_calibration(applied, path) is applied  # applied once

    notes.clear()
    explicit = apply_calibration(PRESET.with_settings(retain=0.1), path, notify=notes.append, warn=warnings.append)
    assert (explicit.settings.retain, explicit.settings.threshold) == (0.1, 0.6)
    # The file measured retain 0.1 at its threshold 0.6: 6 exits, accuracy 0.7, compute 0.1 + 0.4 x 0.05.
    assert warnings == [f"--retain 0.1 overrides the retain 0.5 of the calibration {path}; with its threshold it "
                        "measured at retain 0.1: exit rate 60.0%, 0.700 x large accuracy, relative compute 0.12"]
    assert notes == [f"threshold 0.6 from the calibration {path} (target_accuracy 0.9, 10 items)"]

    warnings.clear()
    apply_calibration(PRESET.with_settings(retain=0.3, threshold=0.2), path, warn=warnings.append)
    assert warnings == [f"--threshold 0.2 overrides the threshold 0.6 of the calibration {path}",
                        f"--retain 0.3 overrides the retain 0.5 of the calibration {path}, which measured no "
                        "accuracy at retain 0.3 (it covers 1, 0.5, 0.1)"]


def test_a_file_for_other_settings_is_refused_naming_each(tmp_path):
    from sgl_cli.engine.errors import SglError

    path, _ = _write_calibration(tmp_path, fp=calibration_fingerprint(PRESET))
    other = Preset("p", ModelSpec("org/small"), ModelSpec("org/large2"), Settings(retain=0.2, max_new_tokens=8))
    with pytest.raises(SglError) as err:
        apply_calibration(other, path)
    assert str(err.value).startswith(f"calibration {path} was made for other settings: large (calibrated "
                                     "'org/large', this run 'org/large2'); max_new_tokens (calibrated 16, this run 8)")
    # sgl eval and inspect take its point whatever the retain, prune layer and guide
    point = calibration_point(PRESET.with_settings(retain=0.9, prune_layer=2, guide="random"), path)
    assert (point.retain, point.threshold, point.prune_layer, point.n_items) == (0.5, 0.6, 0, 10)
    assert point.predicted["relative_compute"] == pytest.approx(0.34)


def test_fingerprint_and_differences():
    preset = Preset("p", ModelSpec("org/small"), ModelSpec("org/large"),
                    Settings(retain=0.2, threshold=0.5, batch_size=4))
    fp = fingerprint(preset)
    assert fp == {"small": "org/small", "large": "org/large", "large_quantize": None, "guide": "sgl", "retain": 0.2,
                  "prune_layer": 0,
                  "consistency_retain": 0.05, "prompt_suffix": Settings().prompt_suffix, "max_new_tokens": 16}
    assert calibration_fingerprint(preset) == {k: v for k, v in fp.items() if k != "retain"}
    # threshold and batch size are not part of it
    other = Preset("p", ModelSpec("org/small"), ModelSpec("org/large"), Settings(retain=0.2))
    assert fingerprint_differences(fp, fingerprint(other)) == []
    changed = Preset("p", ModelSpec("org/small"), ModelSpec("org/large2"), Settings(retain=0.09))
    assert fingerprint_differences(fp, fingerprint(changed)) == [
        "large (calibrated 'org/large', this run 'org/large2')", "retain (calibrated 0.2, this run 0.09)"]
    assert fingerprint_differences({**fp, "extra": 1}, fp) == ["extra (calibrated 1, this run None)"]


def _folder(path, config='{"hidden": 1}', weights=b"1234"):
    path.mkdir()
    (path / "config.json").write_text(config)
    (path / "model.safetensors").write_bytes(weights)
    (path / "README.md").write_text("not part of the fingerprint")
    return path


def test_model_fingerprint(tmp_path):
    a = model_fingerprint(ModelSpec(str(_folder(tmp_path / "a"))))
    assert a.startswith("folder:") and len(a) == len("folder:") + 12
    # content, not location: a copy elsewhere is the same model
    assert model_fingerprint(ModelSpec(str(_folder(tmp_path / "b")))) == a
    assert model_fingerprint(ModelSpec(str(_folder(tmp_path / "c", config='{"hidden": 2}')))) != a
    assert model_fingerprint(ModelSpec(str(_folder(tmp_path / "d", weights=b"12345")))) != a
    assert model_fingerprint(ModelSpec("Qwen/Qwen2-VL-2B-Instruct")) == "Qwen/Qwen2-VL-2B-Instruct"
    assert model_fingerprint(ModelSpec("Qwen/Qwen2-VL-2B-Instruct", revision="abc")) == "Qwen/Qwen2-VL-2B-Instruct@abc"


def test_builtin_fingerprint_follows_the_weights(tmp_path, monkeypatch):
    """A retrained shipped pair has the same file sizes, so its fingerprint hashes the files themselves: a
    calibration (or its cache) made with the old weights must not match the new ones."""
    import shutil

    from sgl_cli.engine.builtin import pair as builtin

    shipped = tmp_path / "default"
    shutil.copytree(builtin.SHIPPED["default"], shipped)
    monkeypatch.setitem(builtin.SHIPPED, "default", shipped)
    before = model_fingerprint(ModelSpec("builtin:default/small"))
    assert before.startswith("builtin:default/small#")
    assert model_fingerprint(ModelSpec("builtin:default/small")) == before
    assert model_fingerprint(ModelSpec("builtin:default/large")) != before.replace("small", "large")
    weights = shipped / "small" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1  # same size, different weights
    weights.write_bytes(bytes(data))
    assert model_fingerprint(ModelSpec("builtin:default/small")) != before
    # Pairs built on demand are fixed by their spec.
    assert model_fingerprint(ModelSpec("builtin:tiny/small")) == f"builtin:tiny/small#{builtin.TINY_SPEC.key()}"
