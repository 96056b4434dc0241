import math
import struct

import pytest
import yaml

from sgl_cli.engine.evaluation.calibration import (
    Outcome,
    choose_threshold,
    load_calibration,
    operating_points,
    save_calibration,
    to_yaml_dict,
)
from sgl_cli.engine.evaluation.fingerprint import fingerprint, fingerprint_differences, model_fingerprint
from sgl_cli.engine.preset import ModelSpec, Preset, Settings
from sgl_cli.engine.views.plots import plot_calibration

# Ten items; the large model is always right (large accuracy 1.0, so relative
# accuracy equals accuracy).  Scores with the small model's correctness,
# highest first; note the tie at 0.8:
#   0.95 1 | 0.9 1 | 0.8 1 | 0.8 0 | 0.7 1 | 0.6 1 | 0.5 0 | 0.4 1 | 0.3 0 | 0.2 0
SMALL = {0.95: 1, 0.9: 1, 0.7: 1, 0.6: 1, 0.5: 0, 0.4: 1, 0.3: 0, 0.2: 0}
OUTCOMES = [Outcome(s, c, 1.0) for s, c in SMALL.items()] + [
    Outcome(0.8, 1.0, 1.0),
    Outcome(0.8, 0.0, 1.0),
]
# Per threshold t: exited = score >= t, accuracy = (small right among exited + kept) / 10.
#   t     exits  small right  kept  accuracy
#   0.2   10     6            0     0.6
#   0.3    9     6            1     0.7
#   0.4    8     6            2     0.8
#   0.5    7     5            3     0.8
#   0.6    6     5            4     0.9
#   0.7    5     4            5     0.9
#   0.8    4     3            6     0.9
#   0.9    2     2            8     1.0
#   0.95   1     1            9     1.0
#   >0.95  0     0           10     1.0
TABLE = [
    (0.2, 10, 0.6), (0.3, 9, 0.7), (0.4, 8, 0.8), (0.5, 7, 0.8), (0.6, 6, 0.9),
    (0.7, 5, 0.9), (0.8, 4, 0.9), (0.9, 2, 1.0), (0.95, 1, 1.0),
]


def test_operating_points_table():
    points = operating_points(OUTCOMES, relative_cost_small=0.1)
    assert len(points) == len(TABLE) + 1
    for p, (t, n_exit, acc) in zip(points, TABLE):
        assert p.threshold == t
        assert p.n_exit == n_exit
        assert p.exit_rate == pytest.approx(n_exit / 10)
        assert p.accuracy == pytest.approx(acc)
        assert p.relative_accuracy == pytest.approx(acc)
        # (1 - exit rate) of the large model plus the small model on every item
        assert p.relative_compute == pytest.approx(1 - n_exit / 10 + 0.1)
    top = points[-1]  # exits nobody: just above the highest score, finite
    assert 0.95 < top.threshold < 0.95 + 1e-9
    assert (top.n_exit, top.accuracy, top.relative_accuracy) == (0, 1.0, 1.0)
    assert top.relative_compute == pytest.approx(1.1)


def test_order_of_outcomes_does_not_matter():
    assert operating_points(OUTCOMES[::-1]) == operating_points(OUTCOMES)


def test_points_hold_plain_python_numbers():
    p = operating_points(OUTCOMES)[0]
    assert all(type(getattr(p, f)) is float for f in
               ("threshold", "exit_rate", "accuracy", "relative_accuracy", "relative_compute"))
    assert type(p.n_exit) is int


def test_relative_accuracy_uses_large_accuracy():
    # large right on 2 of 4 items (0.5); exiting the top item (small right where
    # large was wrong) gives accuracy 3/4 -> relative 1.5.
    outcomes = [Outcome(0.9, 1, 0), Outcome(0.5, 0, 1), Outcome(0.4, 0, 1), Outcome(0.1, 0, 0)]
    p = operating_points(outcomes)[3]
    assert (p.threshold, p.accuracy, p.relative_accuracy) == (0.9, 0.75, 1.5)
    choice = choose_threshold(outcomes, target_accuracy=1.2)
    assert choice.met and choice.point.threshold == 0.9


def test_large_accuracy_zero():
    # Undefined ratio: 1.0 when the mixed system is also always wrong, else the cap 2.0.
    points = operating_points([Outcome(0.9, 1, 0), Outcome(0.1, 0, 0)])
    assert [p.relative_accuracy for p in points] == [2.0, 2.0, 1.0]


@pytest.mark.parametrize(
    "target, threshold, exit_rate, accuracy",
    [
        (1.0, 0.9, 0.2, 1.0),  # lowest threshold with accuracy 1.0
        (0.9, 0.6, 0.6, 0.9),  # 0.5 gives only 0.8
        (0.8, 0.4, 0.8, 0.8),
    ],
)
def test_choose_for_accuracy(target, threshold, exit_rate, accuracy):
    choice = choose_threshold(OUTCOMES, target_accuracy=target)
    assert choice.met
    assert choice.point.threshold == threshold
    assert choice.point.exit_rate == pytest.approx(exit_rate)
    assert choice.point.accuracy == pytest.approx(accuracy)
    assert choice.target == {"target_accuracy": target}
    assert choice.n_items == 10


def test_unmeetable_accuracy_target():
    choice = choose_threshold(OUTCOMES, target_accuracy=1.2)
    assert not choice.met
    # best relative accuracy is 1.0, first reached (lowest threshold) at 0.9
    assert choice.point.relative_accuracy == 1.0
    assert choice.point.threshold == 0.9
    assert "cannot be met" in choice.message and "1.000" in choice.message


def test_choose_for_exit_rate():
    choice = choose_threshold(OUTCOMES, exit_rate=0.4)
    assert choice.met
    assert choice.point.threshold == 0.8
    assert choice.point.exit_rate == pytest.approx(0.4)
    assert choice.point.accuracy == pytest.approx(0.9)
    assert choice.target == {"exit_rate": 0.4}
    # 0.3 would need 3 exits, but the tie at 0.8 jumps from 2 to 4: highest below is 0.2.
    choice = choose_threshold(OUTCOMES, exit_rate=0.3)
    assert not choice.met
    assert choice.point.threshold == 0.9 and choice.point.exit_rate == pytest.approx(0.2)
    assert "tied" in choice.message
    # 0.25 -> 0.2 and 0.58 -> 0.5 are as close as 10 items allow: met.
    assert choose_threshold(OUTCOMES, exit_rate=0.25).met
    choice = choose_threshold(OUTCOMES, exit_rate=0.58)
    assert choice.met and choice.point.n_exit == 5
    assert choose_threshold(OUTCOMES, exit_rate=0.0).point.n_exit == 0
    assert choose_threshold(OUTCOMES, exit_rate=1.0).point.threshold == 0.2


def test_bootstrap_interval():
    a = choose_threshold(OUTCOMES, target_accuracy=0.9)
    b = choose_threshold(OUTCOMES, target_accuracy=0.9)
    lo, hi = a.interval
    assert lo <= a.point.accuracy <= hi
    assert 0.0 <= lo < hi <= 1.0
    assert a.interval == b.interval  # seeded
    # 100 items at accuracy 0.9: standard error sqrt(0.9 * 0.1 / 100) = 0.03, so a
    # 95% interval is about 2 * 1.96 * 0.03 = 0.118 wide (min..max would be ~0.2)
    lo, hi = choose_threshold(OUTCOMES * 10, target_accuracy=0.9).interval
    assert lo < 0.9 < hi and 0.09 < hi - lo < 0.15
    # the seed is used (needs varied soft scores: 0/1 items give coarse percentiles)
    soft = [Outcome(i / 60, (i * 7 % 11) / 10, 1.0) for i in range(60)]
    assert (choose_threshold(soft, exit_rate=1.0, seed=1).interval
            != choose_threshold(soft, exit_rate=1.0, seed=2).interval)
    # all correct at the chosen threshold: no spread
    assert choose_threshold(OUTCOMES, target_accuracy=1.0).interval == (1.0, 1.0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "exactly one"),
        ({"target_accuracy": 0.9, "exit_rate": 0.5}, "exactly one"),
        ({"target_accuracy": 0.0}, "target_accuracy"),
        ({"target_accuracy": 2.5}, "target_accuracy"),
        ({"exit_rate": 1.5}, "exit_rate"),
        ({"exit_rate": -0.1}, "exit_rate"),
    ],
)
def test_choose_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        choose_threshold(OUTCOMES, **kwargs)


def test_no_items():
    with pytest.raises(ValueError, match="no labelled items"):
        choose_threshold([], target_accuracy=0.9)


def test_outcome_validation():
    with pytest.raises(ValueError, match="small_correct"):
        Outcome(0.5, 1.5, 1.0)
    with pytest.raises(ValueError, match="exit_score"):
        Outcome(math.nan, 1.0, 1.0)


def _write_calibration(tmp_path, target=0.9):
    points = operating_points(OUTCOMES)
    choice = choose_threshold(OUTCOMES, target_accuracy=target)
    data = to_yaml_dict(choice, points, metric="vqa",
                        fingerprint={"small": "s-model", "large": "l-model"}, n_items=10)
    path = tmp_path / "calibration.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path, data


def test_yaml_round_trip(tmp_path):
    path, data = _write_calibration(tmp_path, target=1.2)
    loaded = load_calibration(path)
    assert loaded == data
    assert loaded["version"] == 1 and loaded["met"] is False
    assert loaded["threshold"] == 0.9
    assert loaded["accuracy_interval"][0] <= loaded["accuracy"] <= loaded["accuracy_interval"][1]
    assert len(loaded["table"]) == 10
    # the exit-nobody threshold survives unrounded, still above the highest score
    assert loaded["table"][-1]["threshold"] > 0.95


@pytest.mark.parametrize(
    "edit, key",
    [
        (lambda d: d.pop("threshold"), "threshold"),
        (lambda d: d.pop("fingerprint"), "fingerprint"),
        (lambda d: d.update(threshold="high"), "threshold"),
        (lambda d: d.update(metric="bleu"), "metric"),
        (lambda d: d.update(version=2), "version"),
    ],
)
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
    points = operating_points(OUTCOMES, relative_cost_small=0.15)
    chosen = choose_threshold(OUTCOMES, target_accuracy=0.9, relative_cost_small=0.15).point
    path = tmp_path / "calibration.png"
    plot_calibration(points, chosen, path, title="calibration test")
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    # first chunk is IHDR: length (4), type (4), then width and height, big-endian
    assert raw[12:16] == b"IHDR"
    width, height = struct.unpack(">II", raw[16:24])
    assert 400 <= width <= 2000 and 300 <= height <= 2000


def test_save_calibration_explains_itself_and_round_trips(tmp_path):
    points = operating_points(OUTCOMES, relative_cost_small=0.25)
    choice = choose_threshold(OUTCOMES, exit_rate=0.4, relative_cost_small=0.25)
    data = to_yaml_dict(choice, points, metric="exact", fingerprint={"small": "s"}, n_items=10,
                        relative_cost_small=0.25)
    path = tmp_path / "cal.yaml"
    save_calibration(data, path)
    assert path.read_text().startswith("# sgl calibration")
    loaded = load_calibration(path)
    assert loaded == data
    assert loaded["relative_cost_small"] == 0.25 and loaded["large_accuracy"] == 1.0
    assert loaded["relative_compute"] == pytest.approx(0.6 + 0.25)


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


def test_fingerprint_and_differences():
    preset = Preset("p", ModelSpec("org/small"), ModelSpec("org/large"),
                    Settings(retain=0.2, threshold=0.5, batch_size=4))
    fp = fingerprint(preset)
    assert fp == {"small": "org/small", "large": "org/large", "large_quantize": None, "guide": "sgl", "retain": 0.2,
                  "prune_layer": 0,
                  "consistency_retain": 0.05, "prompt_suffix": Settings().prompt_suffix, "max_new_tokens": 16}
    # threshold and batch size are not part of it
    other = Preset("p", ModelSpec("org/small"), ModelSpec("org/large"), Settings(retain=0.2))
    assert fingerprint_differences(fp, fingerprint(other)) == []
    changed = Preset("p", ModelSpec("org/small"), ModelSpec("org/large2"), Settings(retain=0.09))
    assert fingerprint_differences(fp, fingerprint(changed)) == [
        "large (calibrated 'org/large', this run 'org/large2')", "retain (calibrated 0.2, this run 0.09)"]
    assert fingerprint_differences({**fp, "extra": 1}, fp) == ["extra (calibrated 1, this run None)"]


def test_exit_rate_message_says_when_it_is_approximate():
    assert "as closely as" not in choose_threshold(OUTCOMES, exit_rate=0.4).message
    assert "as closely as 10 items allow" in choose_threshold(OUTCOMES, exit_rate=0.45).message
