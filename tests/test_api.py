"""The library is the product: `Run` is `sgl run`, `Engine.from_preset` honours a calibration as `sgl run` does,
and the code keeps the layout the project promises (no module over 450 lines, no reach into private names)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from sgl_cli.engine import Engine, Run, load_preset
from sgl_cli.engine.evaluation.calibration_file import save_calibration
from sgl_cli.engine.calibration import fingerprint
from tests.conftest import write_preset

PACKAGE = Path(__file__).resolve().parents[1] / "sgl_cli"


def _calibration(path: Path, preset, threshold: float) -> Path:
    save_calibration({"version": 1, "threshold": threshold, "metric": "vqa", "target": {"target_accuracy": 0.99},
                      "n_items": 10, "fingerprint": fingerprint(preset)}, path)
    return path


def test_run_is_sgl_run(batch, preset_file, tmp_path):
    preset = load_preset(str(preset_file))
    summary = Run(batch, preset, out=tmp_path / "api.jsonl").execute()
    res = CliRunner().invoke(app, ["run", str(batch), "--preset", str(preset_file), "--out",
                                   str(tmp_path / "cli.jsonl"), "-q"])
    assert res.exit_code == 0, res.output

    def records(name):
        return [{k: v for k, v in json.loads(x).items() if k != "ms"}
                for x in (tmp_path / name).read_text().splitlines()]

    assert records("api.jsonl") == records("cli.jsonl") and len(records("api.jsonl")) == 3
    assert (summary.items, summary.errors, summary.small_exits + summary.large_calls) == (3, 0, 3)
    assert (tmp_path / "api.preset.yaml").read_text() == (tmp_path / "cli.preset.yaml").read_text()


def test_engine_from_preset_takes_the_calibrated_threshold(tmp_path, tiny_pair):
    preset_path = write_preset(tmp_path, tiny_pair, threshold=0.9)
    cal = _calibration(tmp_path / "cal.yaml", load_preset(str(preset_path)), threshold=0.123)
    preset_path = write_preset(tmp_path, tiny_pair, threshold=0.9, calibration="cal.yaml")
    notes = []
    engine = Engine.from_preset(load_preset(str(preset_path)), notify=notes.append)
    assert engine.settings.threshold == 0.123
    assert notes == [f"threshold 0.123 from the calibration {cal} (target_accuracy 0.99, 10 items)"]
    # An explicit threshold wins over the file, as `--threshold` does.
    explicit = Engine.from_preset(load_preset(str(preset_path)).with_settings(threshold=0.5))
    assert explicit.settings.threshold == 0.5


def test_run_refuses_a_calibration_for_other_settings(tmp_path, tiny_pair, batch):
    from sgl_cli.engine.errors import SglError

    preset = load_preset(str(write_preset(tmp_path, tiny_pair)))
    cal = _calibration(tmp_path / "cal.yaml", preset.with_settings(retain=0.5), threshold=0.1)
    with pytest.raises(SglError, match=r"was made for other settings: retain \(calibrated 0.5, this run 0.09\)"):
        Run(batch, preset, calibration=cal, out=tmp_path / "o.jsonl")
    assert not (tmp_path / "o.jsonl").exists()


def test_no_module_over_450_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 450}
    assert not long, long


def test_no_module_imports_another_modules_private_names():
    """`from .x import _y` or `module._y(...)` across modules: private names stay in their module (transformers'
    own privates are reached only through engine/core/hf.py)."""
    found = []
    for p in PACKAGE.rglob("*.py"):
        text = p.read_text()
        found += [f"{p.name}: {m}" for m in re.findall(r"from \.[\w.]* import [^\n]*\b_[a-z]\w*", text)]
        found += [f"{p.name}: {m}" for m in re.findall(r"\b(?!self\b|cls\b|super\b)[a-z]\w*\._[a-z]\w*\(", text)]
    assert not found, found
