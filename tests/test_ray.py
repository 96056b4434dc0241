"""`sgl run --backend ray` on a local Ray cluster (2 CPU workers, tiny models): the local backend's records, in
input order, and the same --resume. Skipped only where Ray Data is not installed (`pip install 'sgl-cli[ray]'`)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from tests.conftest import make_images, write_jsonl, write_preset

runner = CliRunner()
NEEDS_RAY = "the Ray backend needs Ray Data: pip install 'sgl-cli[ray]'"


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def without_ms(recs: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "ms"} for r in recs]




@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_pair):
    """Mixed image sizes, a bad line, a missing image and a blank line; batch size 2; the local run's records."""
    folder = tmp_path_factory.mktemp("rayjob")
    imgs = make_images(folder)
    questions = ["What color is the square?", "How many circles are there?", "What shape is red?"]
    rows = [{"image": p.name, "question": q, "answer": "red", "id": f"q{i}"}
            for i, (p, q) in enumerate(zip(imgs * 3, questions * 3))]
    rows[3:3] = ["{not json", {"image": "missing.png", "question": "where?"}, ""]
    src = write_jsonl(folder / "batch.jsonl", rows)
    preset = write_preset(folder, tiny_pair, batch_size=2, retain=0.2)
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-o", str(folder / "local.jsonl"), "-q"])
    assert res.exit_code == 1, res.output  # the two bad lines
    return src, preset, folder


def test_ray_backend_gives_the_local_records_in_input_order(ray_cluster, job):
    src, preset, folder = job
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-o", str(folder / "ray.jsonl"),
                              "--backend", "ray", "--num-workers", "2", "-q"])
    assert res.exit_code == 1, res.output
    local, ray = records(folder / "local.jsonl"), records(folder / "ray.jsonl")
    assert [r["line"] for r in ray] == [1, 2, 3, 4, 5, 7, 8, 9, 10, 11, 12]  # blank line 6 skipped, in order
    assert without_ms(ray) == without_ms(local)
    assert sum(r["error"] is not None for r in ray) == 2 and ray[3]["error"].startswith("line 4: not valid JSON")
    assert (folder / "ray.preset.yaml").read_text() == (folder / "local.preset.yaml").read_text()


def test_ray_backend_resumes_like_the_local_backend(ray_cluster, job):
    src, preset, folder = job
    lines = (folder / "local.jsonl").read_text().splitlines(keepends=True)
    resumed = {}
    for backend in ("local", "ray"):
        out = folder / f"resumed-{backend}.jsonl"
        # An interrupted run: three records written, the fourth torn by a kill.
        out.write_text("".join(lines[:3]) + lines[3][:25])
        shutil.copy(folder / "local.preset.yaml", folder / f"resumed-{backend}.preset.yaml")
        res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-o", str(out), "--resume",
                                  "--backend", backend, *(["--num-workers", "2"] if backend == "ray" else [])])
        assert res.exit_code == 1, res.output
        assert "+3 already done" in res.output
        resumed[backend] = records(out)
        assert resumed[backend][:3] == [json.loads(line) for line in lines[:3]]  # kept as they were
        assert [r["line"] for r in resumed[backend]] == [r["line"] for r in records(folder / "local.jsonl")]
    # The resumed run batches from line 4 on (so its float noise may differ from the uninterrupted run's);
    # both backends resume identically.
    assert without_ms(resumed["ray"]) == without_ms(resumed["local"])
    # Different settings are refused before any worker starts, as with the local backend.
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-o", str(folder / "resumed-ray.jsonl"),
                              "--resume", "--retain", "0.5", "--backend", "ray"])
    assert res.exit_code == 2 and "cannot resume: settings differ" in res.output


def test_ray_records_carry_the_input_fingerprint_and_resume_checks_it(ray_cluster, job):
    """The Ray backend's records carry the local backend's input_sha, and a resumed Ray run refuses an input whose
    answered lines changed (an item inserted at the top), naming the first one, before any worker starts."""
    src, preset, folder = job
    local = records(folder / "local.jsonl")
    assert all(isinstance(r["input_sha"], str) and len(r["input_sha"]) == 16 for r in local)
    assert len({r["input_sha"] for r in local}) == len(local)  # every item's content differs
    out = folder / "edited-ray.jsonl"
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-o", str(out), "--backend", "ray",
                              "--num-workers", "2", "-q"])
    assert res.exit_code == 1, res.output
    assert [r["input_sha"] for r in records(out)] == [r["input_sha"] for r in local]
    lines = (folder / "edited-ray.jsonl").read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:3]))
    edited = folder / "edited.jsonl"
    first = json.loads(src.read_text().splitlines()[0])
    edited.write_text(json.dumps({**first, "question": "What is in the corner?"}) + "\n" + src.read_text())
    res = runner.invoke(app, ["run", str(edited), "-p", str(preset), "-o", str(out), "--resume", "--backend", "ray",
                              "--num-workers", "2"])
    assert res.exit_code == 2, res.output
    assert (f"sgl: error: cannot resume: line 1 of {edited} is not the item record 1 of {out} answered: the input "
            "changed since the interrupted run; write to a new --out") in res.output
    assert out.read_text() == "".join(lines[:3])


def test_ray_workers_run_a_plugin_backend_as_the_local_run_does(ray_cluster, echo, job, tiny_pair):
    """The seam through Ray, with neither engine: `--large-backend echo` (examples/backend-plugin: it answers from
    the kept tokens and loads no large model's weights) gives the local run's records through 2 Ray workers. The
    workers find the plugin by its entry point, as the driver does: it is installed where they run (ray_cluster's
    runtime environment), not only on the driver's sys.path."""
    src, _, folder = job
    (folder / "echo").mkdir()
    preset = write_preset(folder / "echo", tiny_pair, batch_size=2, retain=0.2, max_new_tokens=40)
    got = {}
    for backend in ("local", "ray"):
        out = folder / "echo" / f"{backend}.jsonl"
        res = runner.invoke(app, ["run", str(src), "-p", str(preset), "-o", str(out), "--large-backend", "echo",
                                  "--backend", backend, *(["--num-workers", "2"] if backend == "ray" else []), "-q"])
        assert res.exit_code == 1, res.output  # the two bad lines
        got[backend] = records(out)
    assert without_ms(got["ray"]) == without_ms(got["local"])
    answered = [r for r in got["ray"] if r["error"] is None]
    assert len(answered) == 9 and len(got["ray"]) == 11
    for r in answered:  # echo answered, from the kept set the guide chose
        assert r["large_backend"] == "echo" and r["exit"] == "large"
        assert r["answer"].startswith(f"kept {r['retained_tokens']} of {r['visual_tokens']}: ")
    # the same kept counts as the transformers backend's local run (the guide runs on the small model either way)
    transformers = {r["line"]: r for r in records(folder / "local.jsonl")}
    assert [r["retained_tokens"] for r in answered] == [transformers[r["line"]]["retained_tokens"] for r in answered]


def test_a_worker_that_cannot_load_its_model_fails_the_run_in_one_line(ray_cluster, tmp_path, tiny_pair):
    preset = write_preset(tmp_path, {"small": tiny_pair["small"], "large": tmp_path / "no-such-model"})
    src = write_jsonl(tmp_path / "in.jsonl", [{"image": p.name, "question": "q"}
                                              for p in make_images(tmp_path, sizes=((224, 224),))])
    res = runner.invoke(app, ["run", str(src), "-p", str(preset), "--backend", "ray", "--num-workers", "1"])
    assert res.exit_code == 2
    # (Ray also forwards the worker's traceback; sgl's own word is one line.)
    (ours,) = [line for line in res.output.splitlines() if line.startswith("sgl: error:")]
    # (Issue 17: a missing model folder says so, not "cannot load a processor ... Repo id must be ...".)
    assert ours.startswith("sgl: error: model folder") and "no-such-model does not exist" in ours
    assert not (tmp_path / "in.sgl.jsonl").exists() and not (tmp_path / "in.sgl.preset.yaml").exists()


def test_without_ray_the_flag_says_how_to_install(tmp_path, tiny_pair, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    src = write_jsonl(tmp_path / "in.jsonl", [{"image": "x.png", "question": "q"}])
    res = runner.invoke(app, ["run", str(src), "-p", str(write_preset(tmp_path, tiny_pair)), "--backend", "ray"])
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and "--backend ray needs Ray Data" in lines[0] and "pip install 'sgl-cli[ray]'" in lines[0]
    assert not (tmp_path / "in.sgl.jsonl").exists()


@pytest.mark.parametrize("args, message", [
    (["--num-workers", "2"], "--num-workers only applies with --backend ray"),
    (["--backend", "spark"], "--backend must be local or ray, got 'spark'"),
])
def test_backend_flag_errors(tmp_path, tiny_pair, args, message):
    src = write_jsonl(tmp_path / "in.jsonl", [{"image": "x.png", "question": "q"}])
    res = runner.invoke(app, ["run", str(src), "-p", str(write_preset(tmp_path, tiny_pair)), *args])
    assert res.exit_code == 2 and res.output.strip() == f"sgl: error: {message}"


def test_cli_import_stays_light():
    import subprocess

    code = "import sys, sgl_cli.cli; print('torch' in sys.modules, 'ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
