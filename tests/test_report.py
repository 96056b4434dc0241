"""`sgl report`: a self-contained HTML page, rendered in a real browser (headless Chromium): one card per record,
filters and search that change what is shown, no script errors, a screenshot that is not blank; and its size and
build time for 5,000 records."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sgl_cli.cli import app
from tests.conftest import make_images, write_jsonl

runner = CliRunner()
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")


def browse(page: Path, tmp_path: Path, fragment: str = "", screenshot: Path | None = None) -> tuple[str, str]:
    """The page's DOM after its script ran (and stderr, where Chromium logs the console), in headless Chromium."""
    profile = tmp_path / f"chromium-{time.monotonic_ns()}"
    args = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync",
            f"--user-data-dir={profile}", "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000",
            "--window-size=1300,1600"]
    args += [f"--screenshot={screenshot}"] if screenshot else ["--dump-dom"]
    res = subprocess.run([*args, page.resolve().as_uri() + fragment], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout, res.stderr


def cards(dom: str) -> list[str]:
    return re.findall(r'<div class="card[^"]*" data-item-id="([^"]*)"', dom)


@pytest.fixture
def run_output(tmp_path, preset_file):
    """A real run: answered items with references, one that exits, one wrong, one error; scores saved."""
    imgs = make_images(tmp_path, sizes=((112, 84), (84, 112), (112, 112)))
    rows = [{"id": f"q{i}", "image": p.name, "question": f"What is in picture {i}?", "answer": "red", "type": t}
            for i, (p, t) in enumerate(zip(imgs, ["color", "shape", "color"]))]
    rows.append({"id": "broken", "image": "missing.png", "question": "Where?"})
    src = write_jsonl(tmp_path / "batch.jsonl", rows)
    scratch = tmp_path / "scratch.jsonl"
    runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--no-exit", "-q", "--out", str(scratch)])
    scores = sorted(json.loads(x)["exit_score"] for x in scratch.read_text().splitlines()[:3])
    threshold = (scores[0] + scores[1]) / 2  # one item goes to the large model, two exit
    out = tmp_path / "batch.sgl.jsonl"
    res = runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "--save-scores", "-q",
                              "--threshold", repr(threshold)])
    assert res.exit_code == 1, res.output
    (tmp_path / "threshold").write_text(repr(threshold))
    return out


def test_report_summarises_the_records(run_output):
    from sgl_cli.engine.views.report_data import gather

    data = gather(run_output)
    recs = [json.loads(x) for x in run_output.read_text().splitlines()]
    assert [c.id for c in data.cards] == [r["id"] for r in recs]
    s = data.summary
    assert (s["items"], s["errors"], s["answered"]) == (4, 1, 3)
    exited = sum(r["exit"] == "small" for r in recs)
    assert s["exit_rate"] == pytest.approx(exited / 3)
    assert s["accuracy"][1] == 3 and set(s["accuracy_by_type"]) == {"color", "shape"}
    assert data.threshold == float((run_output.parent / "threshold").read_text())
    assert sum(r["exit"] == "small" for r in recs) == 2
    assert [c.question for c in data.cards[:3]] == [f"What is in picture {i}?" for i in range(3)]
    large = [c for c in data.cards if c.exit == "large"]
    assert large and all(c.overlays and c.overlays[0]["rows"] * c.overlays[0]["cols"] == c.visual for c in large)
    assert len(data.thumbs) == 3  # one per distinct image


def test_resume_keeps_the_saved_rankings_in_step_with_the_records(run_output, tmp_path, preset_file):
    """Interrupted after two records (and a ranking torn mid-write): the resumed run's rankings are one row per
    record, no duplicates, no torn row."""
    import pyarrow as pa

    from sgl_cli.engine.io.scores import read_scores

    scores = run_output.with_name("batch.sgl.scores.arrow")
    whole_records = run_output.read_text().splitlines()
    before = read_scores(scores)
    run_output.write_text("\n".join(whole_records[:2]) + "\n")
    with scores.open("ab") as f:
        f.write(b"\xff\xff\xff\xff\x40\x01\x00\x00torn")
    res = runner.invoke(app, ["run", str(tmp_path / "batch.jsonl"), "--preset", str(preset_file), "--save-scores",
                              "--threshold", (tmp_path / "threshold").read_text(), "--resume", "-q"])
    assert res.exit_code == 1, res.output
    lines = [json.loads(x)["line"] for x in run_output.read_text().splitlines()]
    rows = pa.ipc.open_stream(str(scores)).read_all().column("line").to_pylist()
    answered = [json.loads(x)["line"] for x in run_output.read_text().splitlines() if json.loads(x)["error"] is None]
    assert lines == [1, 2, 3, 4] and sorted(rows) == answered and len(rows) == len(set(rows))
    after = read_scores(scores)
    assert all(after[k]["kept"] == before[k]["kept"] for k in before)


@needs_browser
def test_the_page_renders_in_a_browser_with_working_filters(run_output, tmp_path):
    res = runner.invoke(app, ["report", str(run_output)])
    assert res.exit_code == 0, res.output
    page = Path(res.stdout.strip())
    assert page == run_output.with_name("batch.sgl.report.html")
    text = page.read_text()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text  # self-contained
    recs = [json.loads(x) for x in run_output.read_text().splitlines()]
    dom, log = browse(page, tmp_path)
    assert cards(dom) == [r["id"] for r in recs]
    assert '<pre id="js-errors"></pre>' in dom and "Uncaught" not in log
    assert "page 1 of 1 (4 of 4 items)" in dom
    for r in recs:
        if r["error"] is None:
            assert f"answer: <b>{r['answer']}</b>" in dom
    assert "line 4: image 'missing.png' not found" in dom
    # The filters and the search change what is shown (set through the URL fragment, as the buttons set it).
    for fragment, want in (("#filter=errors", ["broken"]),
                           ("#filter=exited", [r["id"] for r in recs if r["exit"] == "small"]),
                           ("#filter=large", [r["id"] for r in recs if r["exit"] == "large"]),
                           ("#filter=all&q=picture%202", ["q2"])):
        dom, _ = browse(page, tmp_path, fragment)
        assert cards(dom) == want, fragment
    # Large calls have their dropped tokens shaded.
    dom, _ = browse(page, tmp_path, "#filter=large")
    gallery = dom.split('<div id="cards">')[1].split('<pre id="js-errors"')[0]
    assert gallery.count('fill-opacity="0.55"') == sum(r["exit"] == "large" for r in recs)
    shot = tmp_path / "shot.png"
    browse(page, tmp_path, screenshot=shot)
    from PIL import Image, ImageStat

    stat = ImageStat.Stat(Image.open(shot).convert("L"))
    assert stat.stddev[0] > 10  # not blank


@needs_browser
def test_an_openai_output_and_a_run_without_scores(tmp_path, preset_file):
    imgs = make_images(tmp_path, sizes=((112, 84),))
    line = {"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
            "body": {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": imgs[0].name}},
                {"type": "text", "text": "What is it?"}]}]}}
    src = write_jsonl(tmp_path / "req.jsonl", [line])
    assert runner.invoke(app, ["run", str(src), "--preset", str(preset_file), "-q"]).exit_code == 0
    res = runner.invoke(app, ["report", str(tmp_path / "req.sgl.jsonl"), "-o", str(tmp_path / "r.html")])
    assert res.exit_code == 0, res.output
    assert "no saved rankings (run with --save-scores" in res.stderr
    dom, log = browse(tmp_path / "r.html", tmp_path)
    gallery = dom.split('<div id="cards">')[1].split('<pre id="js-errors"')[0]
    assert cards(dom) == ["r1"] and "What is it?" in gallery and "<img" in gallery and "<svg" not in gallery
    assert '<pre id="js-errors"></pre>' in dom


@needs_browser
def test_five_thousand_records_stay_small_and_quick(tmp_path):
    """5,000 records over 10 images, each with a 16 x 16 ranking: the page's size, its build time, and a page of
    cards in the browser."""
    import numpy as np

    from sgl_cli.engine.io.scores import ScoreWriter, score_payload

    imgs = make_images(tmp_path, sizes=[(96, 96)] * 10)
    n = 5000
    src = write_jsonl(tmp_path / "in.jsonl", [{"image": imgs[i % 10].name, "question": f"question {i}?",
                                               "answer": "yes"} for i in range(n)])
    out = tmp_path / "in.sgl.jsonl"
    rng = np.random.default_rng(0)

    class Grid:
        image, name, shape, tokens = 0, "image", (16, 16), np.arange(256).reshape(16, 16)

    writer = ScoreWriter(tmp_path / "in.sgl.scores.arrow", append=False)
    with out.open("w") as f:
        for i in range(n):
            exited = i % 3 == 0
            f.write(json.dumps({"id": i, "line": i + 1, "answer": "yes" if i % 4 else "no",
                                "exit": "small" if exited else "large", "exit_score": float(rng.random()),
                                "small_answer": "yes", "visual_tokens": 256, "retained_tokens": 0 if exited else 23,
                                "ms": {"small": 10.0, "large": 0.0 if exited else 30.0, "total": 40.0},
                                "reference": "yes", "error": None}) + "\n")
            writer.write(i + 1, score_payload(rng.random(256), [] if exited else sorted(rng.choice(256, 23, False)),
                                              [Grid]))
    writer.close()
    (tmp_path / "in.sgl.run.json").write_text(json.dumps({"input": str(src), "format": "sgl", "threshold": 0.5,
                                                           "scores": "in.sgl.scores.arrow"}))
    t0 = time.perf_counter()
    res = runner.invoke(app, ["report", str(out)])
    seconds = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    page = tmp_path / "in.sgl.report.html"
    size = page.stat().st_size
    print(f"5,000 records: {size / 1e6:.1f} MB, {seconds:.1f} s")
    assert size < 8e6 and seconds < 120
    dom, log = browse(page, tmp_path, "#filter=all&page=84")
    assert len(cards(dom)) == 20 and "page 84 of 84 (5000 of 5000 items)" in dom  # 83 pages of 60, then 20
    assert '<pre id="js-errors"></pre>' in dom and "Uncaught" not in log


def test_a_parquet_run_and_a_ray_run_report_alike(tmp_path, preset_file, ray_cluster):
    """Rows of a Parquet input (images as bytes) get their thumbnails; the Ray backend's output and rankings give
    the report the local backend's gives."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from sgl_cli.engine.views.report_data import gather

    imgs = make_images(tmp_path, sizes=((112, 84), (84, 112)))
    pq.write_table(pa.table({"image": [p.read_bytes() for p in imgs], "question": ["What is it?"] * 2,
                             "answer": ["red", "blue"]}), tmp_path / "t.parquet")
    cards = {}
    for backend in ("local", "ray"):
        out = tmp_path / f"{backend}.jsonl"
        res = runner.invoke(app, ["run", str(tmp_path / "t.parquet"), "--preset", str(preset_file), "--out", str(out),
                                  "--save-scores", "--no-exit", "--backend", backend, "-q"])
        assert res.exit_code == 0, res.output
        data = gather(out)
        assert len(data.thumbs) == 2 and all(c.overlays[0] is not None for c in data.cards)
        cards[backend] = [(c.id, c.answer, c.overlays, c.images) for c in data.cards]
    assert cards["local"] == cards["ray"]
