"""`sgl run`, `sgl demo` and `sgl presets` through typer's CliRunner, and a real kill -9 / --resume in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml
from typer.testing import CliRunner

from sgl_cli.cli import app
from tests.conftest import long_job, make_images, write_jsonl, write_preset

runner = CliRunner()


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_help_is_fast_and_lists_commands():
    out = subprocess.run([sys.executable, "-c", "import sys, sgl_cli.cli; print('torch' in sys.modules)"],
                         capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"  # heavy imports are lazy
    res = runner.invoke(app, ["--help"])
    assert res.exit_code == 0 and "run" in res.output and "demo" in res.output


def test_help_prose_wraps_to_the_terminal_and_examples_keep_their_lines():
    """Typer keeps every line break of a docstring: prose must reach it unwrapped, examples as written."""
    from sgl_cli.commands import run

    doc = run.run.__doc__
    input_paragraph = next(p for p in doc.split("\n\n") if p.startswith("Input:"))
    assert "\n" not in input_paragraph
    examples = next(p for p in doc.split("\n\n") if p.startswith("Examples:")).splitlines()
    assert len(examples) >= 3 and all(x.startswith("  sgl ") for x in examples[1:])
    wide = CliRunner().invoke(app, ["run", "--help"], terminal_width=200, env={"COLUMNS": "200"})
    assert input_paragraph[:150] in " ".join(wide.output.split())


def test_every_command_help_is_unwrapped_prose():
    import typer.main

    group = typer.main.get_command(app)
    for name, command in group.commands.items():
        for para in command.help.split("\n\n"):
            lines = para.splitlines()
            assert len(lines) == 1 or any(x.startswith(" ") for x in lines), (name, para)
    assert {"run", "eval", "calibrate", "demo", "inspect", "bench", "presets"} <= set(group.commands)


def test_presets_lists_the_shipped_files_and_prints_one():
    from sgl_cli.engine.preset import available_presets

    res = runner.invoke(app, ["presets"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert lines[0].split() == ["name", "small", "large", "guide", "retain"]
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == set(available_presets())
    for name, path in available_presets().items():
        data = yaml.safe_load(path.read_text())
        small = (data.get("small") or {}).get("model", "-")
        assert rows[name][1:3] == [small, data["large"]["model"]], name
    one = runner.invoke(app, ["presets", "qwen2.5-vl-3b-72b"])
    assert one.exit_code == 0 and one.output == available_presets()["qwen2.5-vl-3b-72b"].read_text()
    bad = runner.invoke(app, ["presets", "qwen-nope"])
    assert bad.exit_code == 2 and "unknown preset 'qwen-nope'" in bad.output and bad.output.count("\n") == 1


def test_run_writes_one_record_per_item_and_settings(batch, preset_file):
    res = runner.invoke(app, ["run", str(batch), "--preset", str(preset_file), "--retain", "0.09", "-q"])
    assert res.exit_code == 0, res.output
    out = batch.with_name("batch.sgl.jsonl")
    recs = records(out)
    assert [r["line"] for r in recs] == [1, 2, 3]
    for r in recs:
        assert r["error"] is None and r["exit"] == "large" and r["reference"] == "red"
        assert r["retained_tokens"] == max(1, int(0.09 * r["visual_tokens"]))
        assert set(r["ms"]) == {"small", "large", "total"}
    saved = yaml.safe_load(batch.with_name("batch.sgl.preset.yaml").read_text())
    assert saved["retain"] == 0.09 and saved["threshold"] is None and saved["max_new_tokens"] == 5


def test_flags_override_preset(batch, preset_file):
    res = runner.invoke(app, ["run", str(batch), "-p", str(preset_file), "--threshold", "0", "--max-new-tokens", "2",
                              "-o", str(batch.with_name("o.jsonl")), "-q"])
    assert res.exit_code == 0, res.output
    recs = records(batch.with_name("o.jsonl"))
    assert all(r["exit"] == "small" and r["retained_tokens"] == 0 for r in recs)
    saved = yaml.safe_load(batch.with_name("o.preset.yaml").read_text())
    assert saved["threshold"] == 0.0 and saved["max_new_tokens"] == 2


def test_bad_input_becomes_error_records_and_the_run_goes_on(tmp_path, preset_file):
    good = make_images(tmp_path, sizes=((224, 224),))[0]
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    rows = [
        {"image": good.name, "question": "ok?"},
        "{not json",
        {"question": "where is the image?"},
        {"image": good.name, "question": 7},
        {"image": "cat.png", "question": "missing file?"},
        {"image": "corrupt.png", "question": "corrupt?"},
        "",
        {"image": good.name, "question": "ok again?", "id": "last", "max_new_tokens": 0},
        {"image": good.name, "question": "fine", "id": "fine"},
    ]
    src = write_jsonl(tmp_path / "bad.jsonl", rows)
    res = runner.invoke(app, ["run", str(src), "-p", str(preset_file), "-q"])
    assert res.exit_code == 1
    recs = records(tmp_path / "bad.sgl.jsonl")
    errors = {r["line"]: r["error"] for r in recs}
    assert [r["line"] for r in recs] == [1, 2, 3, 4, 5, 6, 8, 9]  # the blank line 7 is skipped
    assert errors[1] is None and errors[9] is None
    assert errors[2].startswith("line 2: not valid JSON")
    assert errors[3] == "line 3: missing field 'image' (or 'video')"
    assert errors[4].startswith("line 4: field 'question' must be a non-empty string")
    assert errors[5].startswith("line 5: image 'cat.png' not found")
    assert errors[6].startswith("line 6: image 'corrupt.png' cannot be read")
    assert errors[8].startswith("line 8: field 'max_new_tokens' must be a positive integer")
    assert recs[-1]["id"] == "fine" and recs[0]["id"] == 1


def test_model_failure_is_confined_to_its_item(tmp_path, tiny_pair, monkeypatch):
    """An exception inside a model fails that item's record (batch retried item by item), not the run."""
    import sgl_cli.engine.backends.transformers as engine_mod  # where both models generate

    imgs = make_images(tmp_path)
    src = write_jsonl(tmp_path / "b.jsonl", [{"image": p.name, "question": f"q{i}"} for i, p in enumerate(imgs)])
    preset = write_preset(tmp_path, tiny_pair, batch_size=3)
    real = engine_mod.greedy

    def flaky(model, batch, *a, **k):
        per_row = (batch.input_ids == model.config.image_token_id).sum(1)
        if 60 in per_row.tolist():  # the 168x280 image: 6 x 10 merged patches
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(model, batch, *a, **k)

    monkeypatch.setattr(engine_mod, "greedy", flaky)
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-q"])
    recs = records(tmp_path / "b.sgl.jsonl")
    assert res.exit_code == 1
    assert [r["error"] is None for r in recs] == [True, False, True]
    assert "line 2: small stage failed: RuntimeError: CUDA out of memory (simulated)" == recs[1]["error"]


def test_existing_output_needs_resume_or_overwrite(batch, preset_file):
    assert runner.invoke(app, ["run", str(batch), "-p", str(preset_file), "-q"]).exit_code == 0
    res = runner.invoke(app, ["run", str(batch), "-p", str(preset_file), "-q"])
    assert res.exit_code == 2 and "--resume" in res.output
    assert runner.invoke(app, ["run", str(batch), "-p", str(preset_file), "-q", "--overwrite"]).exit_code == 0
    assert len(records(batch.with_name("batch.sgl.jsonl"))) == 3


def test_resume_repairs_torn_line_and_skips_done(batch, preset_file):
    out = batch.with_name("batch.sgl.jsonl")
    assert runner.invoke(app, ["run", str(batch), "-p", str(preset_file), "-q"]).exit_code == 0
    full = out.read_text().splitlines(keepends=True)
    out.write_text(full[0] + full[1][: len(full[1]) // 2])  # killed while writing the second record
    res = runner.invoke(app, ["run", str(batch), "-p", str(preset_file), "-q", "--resume"])
    assert res.exit_code == 0, res.output
    recs = records(out)
    assert [r["line"] for r in recs] == [1, 2, 3]
    for got, line in zip(recs[1:], full[1:]):
        want = json.loads(line)
        got.pop("ms"), want.pop("ms")  # timings differ between runs; everything else must not
        assert got == want


def test_resume_refuses_changed_settings(batch, preset_file):
    assert runner.invoke(app, ["run", str(batch), "-p", str(preset_file), "-q"]).exit_code == 0
    res = runner.invoke(app, ["run", str(batch), "-p", str(preset_file), "-q", "--resume", "--retain", "0.5"])
    assert res.exit_code == 2 and "retain" in res.output


def test_kill_9_midway_then_resume(tmp_path, tiny_pair):
    src, preset, out = long_job(tmp_path, tiny_pair)
    cmd = [sys.executable, "-m", "sgl_cli", "run", str(src), "-p", str(preset), "-q", "--threads", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and (not out.exists() or len(out.read_text().splitlines()) < 3):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len(records(out)) if out.read_text().endswith("\n") else len(out.read_text().splitlines()) - 1
    assert 3 <= partial < 12, "the run should have been killed midway"
    done = subprocess.run(cmd + ["--resume"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert [r["line"] for r in records(out)] == list(range(1, 13))


def test_unknown_preset_lists_available(batch):
    res = runner.invoke(app, ["run", str(batch), "--preset", "nope"])
    assert res.exit_code == 2
    assert "unknown preset 'nope'" in res.output and "qwen2.5-vl-3b-72b" in res.output and "default" in res.output


def test_preset_unknown_key_names_key_and_file(tmp_path, tiny_pair, batch):
    path = write_preset(tmp_path, tiny_pair, retian=0.1)
    res = runner.invoke(app, ["run", str(batch), "--preset", str(path)])
    assert res.exit_code == 2
    assert "unknown key 'retian'" in res.output and str(path) in res.output


def test_preset_wrong_type_and_bad_flag(tmp_path, tiny_pair, batch):
    path = write_preset(tmp_path, tiny_pair, retain="lots")
    res = runner.invoke(app, ["run", str(batch), "--preset", str(path)])
    assert res.exit_code == 2 and "retain must be" in res.output
    good = write_preset(tmp_path, tiny_pair)
    res = runner.invoke(app, ["run", str(batch), "--preset", str(good), "--retain", "1.5"])
    assert res.exit_code == 2 and "retain must be in (0, 1]" in res.output


def test_missing_input_is_a_usage_error(tmp_path):
    res = runner.invoke(app, ["run", str(tmp_path / "nope.jsonl")])
    assert res.exit_code == 2 and "not found" in res.output


def test_pair_mismatch_names_both_counts(tmp_path, tiny_pair, batch):
    """A 'large' model whose processor tokenizes images differently is refused per item, with both counts."""
    import shutil

    other = tmp_path / "other-large"
    shutil.copytree(tiny_pair["large"], other)
    cfg_path = other / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["image_processor"]["size"]["longest_edge"] = 112 * 112
    cfg_path.write_text(json.dumps(cfg))
    preset = write_preset(tmp_path, {"small": tiny_pair["small"], "large": other})
    res = runner.invoke(app, ["run", str(batch), "-p", str(preset), "-q"])
    assert res.exit_code == 1
    rec = records(batch.with_name("batch.sgl.jsonl"))[0]
    assert rec["error"].startswith("line 1: small and large processors disagree on this image (64 vs 16 visual tokens")


def test_stdout_output(batch, preset_file):
    res = runner.invoke(app, ["run", str(batch), "-p", str(preset_file), "-q", "--out", "-"])
    assert res.exit_code == 0
    assert [json.loads(line)["line"] for line in res.stdout.splitlines()] == [1, 2, 3]


def test_demo_writes_a_runnable_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    res = runner.invoke(app, ["demo", str(tmp_path / "d"), "--n", "3"])
    assert res.exit_code == 0, res.output
    lines = records(tmp_path / "d" / "batch.jsonl")
    assert len(lines) == 3 and all("answer" in x for x in lines)
    preset = yaml.safe_load((tmp_path / "d" / "preset.yaml").read_text())
    assert preset["small"]["model"] == "models/small"
    res = runner.invoke(app, ["run", str(tmp_path / "d" / "batch.jsonl"), "-p", str(tmp_path / "d" / "preset.yaml"),
                              "-q", "--no-exit"])
    assert res.exit_code == 0, res.output
    assert "random weights" not in res.stderr  # the shipped pair is trained
    assert (tmp_path / "d" / "models" / "large" / "model.safetensors").is_file()
    assert len(records(tmp_path / "d" / "batch.sgl.jsonl")) == 3
